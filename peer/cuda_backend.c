/* cuda_backend.c: the CUDA backend: per-layer state (device, cuBLAS handle,
 * the non-finite records, device scratch), the backend table the core calls,
 * and the device-pointer API of peer_cuda.h.  A forward is
 *   Q = X Wq^T                       cuBLAS SGEMM
 *   bias, running batch norm         peer_k_bias_norm
 *   S[t,h,half] = Q_half C^T         cuBLAS strided-batched SGEMM, per half
 *   top-k' per (t, h, half)          peer_k_subkey_topk
 *   candidate top-k, gates           peer_k_merge
 *   experts                          peer_k_experts
 * all queued on one stream (brute force replaces the two selections with
 * peer_k_brute_topk).  Every pass is written once, on device pointers
 * (run_forward, dev_retrieve, dev_forward_train, dev_backward); peer.h's
 * host-pointer calls are wrappers that wait for the device, copy in, call it
 * on the layer's own stream, copy out and synchronise (their training copies
 * live in a staging buffer of the context that only they allocate).
 * Training keeps its state in the context's device memory: the forward
 * normalises with batch statistics (peer_k_batch_norm_train) and keeps z;
 * the backward is
 *   per-token expert backward, gate backward   peer_k_experts_backward
 *   sorted expert rows                         radix sort + peer_k_expert_grads
 *   dq through the kept scores                 peer_k_query_grad
 *   sorted sub-key rows                        radix sort + peer_k_keys_grad
 *   batch norm, query bias                     peer_k_norm_backward, column sums
 *   dWq = dq^T X, dx += dq Wq                  cuBLAS SGEMM
 * with no float atomics: reruns give the same bits. */
#include "internal.h"
#include "peer_cuda.h"

#include "experts.h"
#include "retrieval.h"
#include "status.h"
#include "train.h"

#include <cublas_v2.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* The layer's non-finite records: device words lowered by integer atomicMin
 * (PEER_K_CLEAR when empty), read and cleared by check_stream.  A training
 * context keeps its batch's own REC_SCORE and REC_X (they decide the running
 * statistics' update) and folds them into the layer's. */
enum {
  REC_SCORE = 0, /* smallest t*H + h with a non-finite sub-key or candidate score */
  REC_X = 1,     /* smallest row of a training forward's x holding NaN or infinity */
  REC_DY = 2,    /* smallest row of a backward's dy holding NaN or infinity */
  REC_COUNT = 3,
  REC_BATCH = 2 /* the records a training context keeps: REC_SCORE, REC_X */
};

typedef struct cuda_state {
  int device;
  cublasHandle_t blas;
  cudaStream_t own;          /* the host-pointer path's stream */
  unsigned long long *d_bad; /* [REC_COUNT] the non-finite records */
  void *ws;                  /* device scratch (registered or owned) */
  size_t ws_bytes;
  bool ws_owned;
  void *io; /* device copies of the host-pointer path's inputs and outputs */
  size_t io_bytes;
} cuda_state;

/* As peer_k_cuda_fail (status.h), for cuBLAS: its allocation failure is
 * PEER_ERR_OUT_OF_MEMORY, and a runtime error it met is not left behind. */
static peer_status blas_fail(cublasStatus_t s, const char *what) {
  (void)cudaGetLastError();
  return peer_fail(s == CUBLAS_STATUS_ALLOC_FAILED ? PEER_ERR_OUT_OF_MEMORY : PEER_ERR_CUDA,
                   "%s: cuBLAS: %s", what, cublasGetStatusString(s));
}

/* Wait for `stream`; a failure is reported as `what`. */
static peer_status wait_for(cudaStream_t stream, const char *what) {
  cudaError_t e = cudaStreamSynchronize(stream);
  return e == cudaSuccess ? PEER_OK : peer_k_cuda_fail(e, what);
}

/* After a failure on the host path: let the queued work finish (it may use
 * buffers the next call reuses) and report only the first failure. */
static void drain(cudaStream_t stream) {
  if (cudaStreamSynchronize(stream) != cudaSuccess) (void)cudaGetLastError();
}

/* Wait for the whole device, every stream (the caller's non-blocking ones
 * included).  Parameter set-up writes through the legacy stream (cudaMemset,
 * cudaMemcpy from pageable memory), which is not ordered with non-blocking
 * streams, so it waits before and after; the host-pointer calls wait before
 * they start (host_enter); memory that queued work may still use is given
 * back only after a wait (cudaFree is not documented to wait for it). */
static peer_status device_idle(const char *what) {
  cudaError_t e = cudaDeviceSynchronize();
  return e == cudaSuccess ? PEER_OK : peer_k_cuda_fail(e, what);
}

/* Teardown of memory on `device`: make it current (cudaFree acts on the
 * current device), wait for it (work queued earlier, on any stream, may
 * still use the memory), free.  A teardown reports nothing and leaves no
 * error behind. */
static void free_on(int device, void *ptr) {
  if (!ptr) return;
  if (cudaSetDevice(device) == cudaSuccess) {
    (void)cudaDeviceSynchronize();
    cudaFree(ptr);
  }
  (void)cudaGetLastError();
}

static cuda_state *state_of(const peer_layer *L) { return (cuda_state *)L->backend_data; }

int peer_cuda_device_count(void) {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    cudaGetLastError(); /* "no device" is an answer, not an error to keep */
    return 0;
  }
  return n;
}

/* ------------------------------------------------------------ scratch */

static size_t round256(size_t b) { return (b + 255) & ~(size_t)255; }

/* One buffer of a carved allocation: where its address goes, its size. */
typedef struct part {
  void **ptr;
  size_t bytes;
} part;

/* Lay `count` parts out one after another from base, each 256-byte
 * aligned, and return the bytes they take; base NULL only counts. */
static size_t carve(const part *parts, size_t count, char *base) {
  size_t off = 0;
  for (size_t i = 0; i < count; i++) {
    if (base) *parts[i].ptr = base + off;
    off += round256(parts[i].bytes);
  }
  return off;
}

/* Device scratch of one forward or retrieval, carved from one buffer. */
typedef struct dev_ws {
  float *q;        /* [T, dq] */
  float *S;        /* [T, H, 2, n] sub-key scores */
  float *list_s;   /* [T, H, 2, k'] */
  int64_t *list_id;
  int64_t *ids;    /* [T, H, k] when the caller gives none */
  float *scores;   /* [T, H, k] */
  float *gates;    /* [T, H, k] */
} dev_ws;

static size_t dev_layout(const peer_layer *L, int64_t T, char *base, dev_ws *w) {
  const peer_dims *D = &L->dims;
  size_t t = (size_t)T, thk = t * (size_t)(D->H * D->k), lists = t * (size_t)(D->H * 2 * D->kp);
  const part parts[] = {
      {(void **)&w->q, t * (size_t)D->dq * 4},
      {(void **)&w->S, t * (size_t)(D->H * 2 * D->n) * 4},
      {(void **)&w->list_s, lists * 4},
      {(void **)&w->list_id, lists * 8},
      {(void **)&w->ids, thk * 8},
      {(void **)&w->scores, thk * 4},
      {(void **)&w->gates, thk * 4},
  };
  return carve(parts, sizeof parts / sizeof parts[0], base);
}

/* Give back the layer's own scratch (if it has some), with the layer's
 * device current: after a wait for the device, as work queued earlier on
 * the caller's streams may still use it.  On failure the scratch is kept. */
static peer_status drop_own_scratch(cuda_state *st, const char *what) {
  if (!(st->ws_owned && st->ws)) return PEER_OK;
  cudaError_t e = cudaDeviceSynchronize();
  if (e == cudaSuccess) e = cudaFree(st->ws);
  if (e != cudaSuccess) return peer_k_cuda_fail(e, what);
  st->ws = NULL;
  st->ws_bytes = 0;
  return PEER_OK;
}

static peer_status device_scratch(peer_layer *L, int64_t T, dev_ws *w) {
  cuda_state *st = state_of(L);
  size_t need = dev_layout(L, T, NULL, w);
  if (!(st->ws && need <= st->ws_bytes)) {
    if (st->ws && !st->ws_owned)
      return peer_fail(PEER_ERR_INVALID_ARGUMENT,
                       "cuda workspace: %lld tokens need %zu bytes, the registered buffer has %zu",
                       (long long)T, need, st->ws_bytes);
    peer_status s = drop_own_scratch(st, "cuda workspace: giving back the smaller scratch");
    if (s) return s;
    st->ws_owned = true;
    cudaError_t e = cudaMalloc(&st->ws, need);
    if (e != cudaSuccess) {
      st->ws = NULL;
      return peer_k_cuda_fail(e, "cuda workspace: cudaMalloc");
    }
    st->ws_bytes = need;
  }
  dev_layout(L, T, st->ws, w);
  return PEER_OK;
}

/* ------------------------------------------------------------ the passes */

/* Row-major Q [T, dq] = X [T, d] Wq^T (column-major Q' = Wq'^T X'), then
 * the query bias when the layer has one and, if `running`, the batch norm
 * with running statistics (one pass; training normalises separately). */
static peer_status project_query(peer_layer *L, int64_t T, const float *d_x, float *q,
                                 bool running, cudaStream_t stream) {
  cuda_state *st = state_of(L);
  const peer_dims *D = &L->dims;
  const float one = 1.0f, zero = 0.0f;
  cublasStatus_t bs = cublasSetStream(st->blas, stream);
  if (bs != CUBLAS_STATUS_SUCCESS) return blas_fail(bs, "forward: cublasSetStream");
  bs = cublasSgemm(st->blas, CUBLAS_OP_T, CUBLAS_OP_N, (int)D->dq, (int)T, (int)D->d, &one,
                   L->slot[PEER_P_QUERY_WEIGHT].data, (int)D->d, d_x, (int)D->d, &zero, q,
                   (int)D->dq);
  if (bs != CUBLAS_STATUS_SUCCESS) return blas_fail(bs, "forward: query projection");
  const bool norm = running && L->slot[PEER_P_NORM_MEAN].data;
  return peer_k_bias_norm(q, T, D->dq, L->slot[PEER_P_QUERY_BIAS].data,
                          norm ? L->slot[PEER_P_NORM_WEIGHT].data : NULL,
                          norm ? L->slot[PEER_P_NORM_BIAS].data : NULL,
                          norm ? L->slot[PEER_P_NORM_MEAN].data : NULL,
                          norm ? L->slot[PEER_P_NORM_VAR].data : NULL, stream);
}

/* From the final queries q [T, dq] to ids, scores and gates [T, H, k]: the
 * sub-key scores, then the product-key search (top-k' per half, exact merge)
 * or, with brute, the top-k of all n*n sums.  A non-finite score lowers
 * *bad (a record, see REC_SCORE). */
static peer_status search(peer_layer *L, int64_t T, const float *q, int64_t *ids,
                          float *scores, float *gates, bool brute, unsigned long long *bad,
                          cudaStream_t stream, const dev_ws *w) {
  cuda_state *st = state_of(L);
  const peer_dims *D = &L->dims;
  const float one = 1.0f, zero = 0.0f;
  cublasStatus_t bs;
  peer_status s;
  /* Per half p, one batch entry per head h:
   *   S[((t*H + h)*2 + p)*n + a] = sum_j q[t*dq + h*dk + p*half + j] * C_g,p[a, j]
   * with C_g,p = keys + ((g*2 + p)*n)*half and g = h, or 0 with shared keys. */
  const float *keys = L->slot[PEER_P_KEYS].data;
  long long key_stride = L->cfg.shared_keys ? 0 : 2 * D->n * D->half;
  for (int p = 0; p < 2; p++) {
    bs = cublasSgemmStridedBatched(
        st->blas, CUBLAS_OP_T, CUBLAS_OP_N, (int)D->n, (int)T, (int)D->half, &one,
        keys + p * D->n * D->half, (int)D->half, key_stride, q + p * D->half, (int)D->dq,
        (long long)D->dk, &zero, w->S + p * D->n, (int)(2 * D->H * D->n), 2 * D->n, (int)D->H);
    if (bs != CUBLAS_STATUS_SUCCESS) return blas_fail(bs, "forward: sub-key scores");
  }
  if (brute)
    return peer_k_brute_topk(w->S, T * D->H, D->n, D->k, (int)L->cfg.gate, scores, ids, gates,
                             bad, stream);
  if ((s = peer_k_subkey_topk(w->S, T * D->H * 2, D->n, D->kp, w->list_s, w->list_id, bad,
                              stream)))
    return s;
  return peer_k_merge(w->list_s, w->list_id, T * D->H, D->kp, D->k, D->n, (int)L->cfg.gate,
                      scores, ids, gates, bad, stream);
}

static peer_status run_retrieval(peer_layer *L, int64_t T, const float *d_x, int64_t *ids,
                                 float *scores, float *gates, bool brute, cudaStream_t stream,
                                 const dev_ws *w) {
  peer_status s = project_query(L, T, d_x, w->q, true, stream);
  if (s) return s;
  return search(L, T, w->q, ids, scores, gates, brute, state_of(L)->d_bad + REC_SCORE, stream,
                w);
}

/* Retrieval on device pointers (scores, gates may be NULL). */
static peer_status dev_retrieve(peer_layer *L, int64_t T, const float *d_x, int64_t *ids,
                                float *scores, float *gates, bool brute, cudaStream_t stream) {
  peer_status s;
  if (brute && (s = peer_k_brute_supported(L->dims.n, L->dims.k))) return s;
  dev_ws w;
  if ((s = device_scratch(L, T, &w))) return s;
  return run_retrieval(L, T, d_x, ids, scores ? scores : w.scores, gates ? gates : w.gates, brute,
                       stream, &w);
}

static peer_status run_forward(peer_layer *L, int64_t T, const float *d_x, float *d_y,
                               int64_t *d_indices, float *d_gates, cudaStream_t stream) {
  dev_ws w;
  peer_status s = device_scratch(L, T, &w);
  if (s) return s;
  int64_t *ids = d_indices ? d_indices : w.ids;
  float *gates = d_gates ? d_gates : w.gates;
  if ((s = run_retrieval(L, T, d_x, ids, w.scores, gates, false, stream, &w))) return s;
  const peer_dims *D = &L->dims;
  return peer_k_experts(d_x, d_y, L->slot[PEER_P_EXPERTS_DOWN].data,
                        L->slot[PEER_P_EXPERTS_UP].data, L->cfg.weight_dtype == PEER_BF16, ids,
                        gates, NULL, T, D->d, D->H * D->k, (int)L->cfg.activation, stream);
}

/* Read the records behind the stream's work, then report and clear them: a
 * non-finite x or dy row first (the cause; the scores of such a row are
 * non-finite too), then a score.  Read and clear go on `stream` itself: the
 * read waits for the work queued before it and for nothing else, and the
 * clear comes before the next call's kernels on it.  The clear is waited
 * for too (only when there was something to clear), so that it is done
 * when this returns, whichever stream the next call uses. */
static peer_status check_stream(peer_layer *L, cudaStream_t stream) {
  cuda_state *st = state_of(L);
  const peer_dims *D = &L->dims;
  unsigned long long rec[REC_COUNT];
  peer_status s;
  cudaError_t e = cudaMemcpyAsync(rec, st->d_bad, sizeof rec, cudaMemcpyDeviceToHost, stream);
  if (e != cudaSuccess) return peer_k_cuda_fail(e, "cuda check: stream");
  if ((s = wait_for(stream, "cuda check: stream"))) return s;
  if (rec[REC_SCORE] == PEER_K_CLEAR && rec[REC_X] == PEER_K_CLEAR && rec[REC_DY] == PEER_K_CLEAR)
    return PEER_OK;
  if ((e = cudaMemsetAsync(st->d_bad, 0xff, sizeof rec, stream)) != cudaSuccess)
    return peer_k_cuda_fail(e, "cuda check: clearing the non-finite records");
  if ((s = wait_for(stream, "cuda check: clearing the non-finite records"))) return s;
  if (rec[REC_X] != PEER_K_CLEAR)
    return peer_fail(PEER_ERR_NONFINITE, "token %llu: x holds NaN or infinity", rec[REC_X]);
  if (rec[REC_DY] != PEER_K_CLEAR)
    return peer_fail(PEER_ERR_NONFINITE, "token %llu: dy holds NaN or infinity", rec[REC_DY]);
  const unsigned long long bad = rec[REC_SCORE];
  return peer_fail(PEER_ERR_NONFINITE,
                   "token %lld, head %d: non-finite sub-key or candidate score (NaN or infinity "
                   "in x, query weights, norm or keys)",
                   (long long)(bad / (unsigned long long)D->H), (int)(bad % (unsigned long long)D->H));
}

/* ------------------------------------------------------------ public API */

static peer_status enter(const peer_layer *L, int64_t T, const void *d_x, const char *what) {
  if (!L) return peer_fail(PEER_ERR_INVALID_ARGUMENT, "%s: NULL layer", what);
  if (L->opt.backend != PEER_BACKEND_CUDA)
    return peer_fail(PEER_ERR_INVALID_ARGUMENT, "%s: the layer is not on the CUDA backend", what);
  if (T < 0 || T > 0x7fffffff)
    return peer_fail(PEER_ERR_INVALID_ARGUMENT, "%s: n_tokens %lld not in [0, 2^31)", what,
                     (long long)T);
  if (T > 0 && !d_x) return peer_fail(PEER_ERR_INVALID_ARGUMENT, "%s: x is NULL", what);
  cudaError_t e = cudaSetDevice(state_of(L)->device);
  return e == cudaSuccess ? PEER_OK : peer_k_cuda_fail(e, what);
}

peer_status peer_cuda_workspace_size(const peer_layer *L, int64_t T, size_t *bytes) {
  if (!L || !bytes) return peer_fail(PEER_ERR_INVALID_ARGUMENT, "cuda_workspace_size: NULL argument");
  if (L->opt.backend != PEER_BACKEND_CUDA)
    return peer_fail(PEER_ERR_INVALID_ARGUMENT, "cuda_workspace_size: not a CUDA layer");
  if (T < 0) return peer_fail(PEER_ERR_INVALID_ARGUMENT, "n_tokens: %lld is negative", (long long)T);
  dev_ws w;
  *bytes = dev_layout(L, T, NULL, &w);
  return PEER_OK;
}

peer_status peer_cuda_set_workspace(peer_layer *L, void *d_buffer, size_t bytes) {
  if (!L) return peer_fail(PEER_ERR_INVALID_ARGUMENT, "cuda_set_workspace: NULL layer");
  if (L->opt.backend != PEER_BACKEND_CUDA)
    return peer_fail(PEER_ERR_INVALID_ARGUMENT, "cuda_set_workspace: not a CUDA layer");
  if (d_buffer && (uintptr_t)d_buffer % 256)
    return peer_fail(PEER_ERR_INVALID_ARGUMENT, "cuda_set_workspace: buffer is not 256-byte aligned");
  cuda_state *st = state_of(L);
  cudaError_t e = cudaSetDevice(st->device);
  if (e != cudaSuccess) return peer_k_cuda_fail(e, "cuda_set_workspace");
  peer_status s = drop_own_scratch(st, "cuda_set_workspace: giving back the internal scratch");
  if (s) return s;
  st->ws = d_buffer;
  st->ws_bytes = d_buffer ? bytes : 0;
  st->ws_owned = false;
  return PEER_OK;
}

peer_status peer_cuda_forward(peer_layer *L, int64_t T, const float *d_x, float *d_y,
                              int64_t *d_indices, float *d_gates, cudaStream_t stream) {
  peer_status s = enter(L, T, d_x, "cuda_forward");
  if (s) return s;
  if (T == 0) return PEER_OK;
  if (!d_y) return peer_fail(PEER_ERR_INVALID_ARGUMENT, "cuda_forward: y is NULL");
  return run_forward(L, T, d_x, d_y, d_indices, d_gates, stream);
}

static peer_status retrieve_entry(peer_layer *L, int64_t T, const float *d_x, int64_t *d_indices,
                                  float *d_scores, float *d_gates, bool brute,
                                  cudaStream_t stream) {
  const char *what = brute ? "cuda_retrieve_brute" : "cuda_retrieve";
  peer_status s = enter(L, T, d_x, what);
  if (s) return s;
  /* an empty batch still reports a config brute force cannot run */
  if (T == 0) return brute ? peer_k_brute_supported(L->dims.n, L->dims.k) : PEER_OK;
  if (!d_indices) return peer_fail(PEER_ERR_INVALID_ARGUMENT, "%s: indices is NULL", what);
  return dev_retrieve(L, T, d_x, d_indices, d_scores, d_gates, brute, stream);
}

peer_status peer_cuda_retrieve(peer_layer *L, int64_t T, const float *d_x, int64_t *d_indices,
                               float *d_scores, float *d_gates, cudaStream_t stream) {
  return retrieve_entry(L, T, d_x, d_indices, d_scores, d_gates, false, stream);
}

peer_status peer_cuda_retrieve_brute(peer_layer *L, int64_t T, const float *d_x,
                                     int64_t *d_indices, float *d_scores, float *d_gates,
                                     cudaStream_t stream) {
  return retrieve_entry(L, T, d_x, d_indices, d_scores, d_gates, true, stream);
}

peer_status peer_cuda_check(peer_layer *L, cudaStream_t stream) {
  peer_status s = enter(L, 0, NULL, "cuda_check");
  if (s) return s;
  return check_stream(L, stream);
}

/* ------------------------------------------------------------ host path */

/* Entry of every host-pointer call (peer.h) on a CUDA layer: enter's checks,
 * then a wait for the whole device.  The layer's own stream is not ordered
 * with the caller's, on which device-pointer calls may still be writing what
 * the host path reads or reuses (a context, the scratch, the non-finite
 * records, the running statistics); the host path is the convenience path
 * and synchronises at its end as well (peer_cuda.h). */
static peer_status host_enter(const peer_layer *L, int64_t T, const void *x, const char *what) {
  peer_status s = enter(L, T, x, what);
  return s ? s : device_idle(what);
}

/* Device copies of x, y, ids, scores and gates for the host-pointer calls. */
typedef struct io_bufs {
  float *x, *y;
  int64_t *ids;
  float *scores, *gates;
} io_bufs;

static peer_status host_io(peer_layer *L, int64_t T, io_bufs *io) {
  cuda_state *st = state_of(L);
  const peer_dims *D = &L->dims;
  size_t td = (size_t)T * (size_t)D->d * 4, thk = (size_t)T * (size_t)(D->H * D->k);
  const part parts[] = {
      {(void **)&io->x, td},           {(void **)&io->y, td},          {(void **)&io->ids, thk * 8},
      {(void **)&io->scores, thk * 4}, {(void **)&io->gates, thk * 4},
  };
  const size_t count = sizeof parts / sizeof parts[0], need = carve(parts, count, NULL);
  if (need > st->io_bytes) {
    if (st->io) cudaFree(st->io);
    st->io = NULL;
    st->io_bytes = 0;
    cudaError_t e = cudaMalloc(&st->io, need);
    if (e != cudaSuccess) {
      st->io = NULL;
      return peer_k_cuda_fail(e, "cuda host path: cudaMalloc");
    }
    st->io_bytes = need;
  }
  carve(parts, count, st->io);
  return PEER_OK;
}

static peer_status copy(void *dst, const void *src, size_t bytes, enum cudaMemcpyKind kind,
                        cudaStream_t stream) {
  if (!dst || bytes == 0) return PEER_OK;
  cudaError_t e = cudaMemcpyAsync(dst, src, bytes, kind, stream);
  return e == cudaSuccess ? PEER_OK : peer_k_cuda_fail(e, "cuda host path: cudaMemcpyAsync");
}

static peer_status cuda_forward(peer_layer *L, int64_t T, const float *x, float *y,
                                int64_t *indices, float *gates, void *host_ws) {
  (void)host_ws;
  peer_status s = host_enter(L, T, x, "forward");
  io_bufs io;
  if (s || (s = host_io(L, T, &io))) return s;
  cudaStream_t stream = state_of(L)->own;
  const peer_dims *D = &L->dims;
  size_t xb = (size_t)T * (size_t)D->d * 4, thk = (size_t)T * (size_t)(D->H * D->k);
  if ((s = copy(io.x, x, xb, cudaMemcpyHostToDevice, stream)) ||
      (s = run_forward(L, T, io.x, io.y, io.ids, io.gates, stream)) ||
      (s = copy(y, io.y, xb, cudaMemcpyDeviceToHost, stream)) ||
      (s = copy(indices, io.ids, thk * 8, cudaMemcpyDeviceToHost, stream)) ||
      (s = copy(gates, io.gates, thk * 4, cudaMemcpyDeviceToHost, stream))) {
    drain(stream);
    return s;
  }
  return check_stream(L, stream);
}

static peer_status cuda_retrieve(peer_layer *L, int64_t T, const float *x, int64_t *indices,
                                 float *scores, float *gates, bool brute, void *host_ws) {
  (void)host_ws;
  peer_status s = host_enter(L, T, x, brute ? "retrieve_brute" : "retrieve");
  io_bufs io;
  if (s || (s = host_io(L, T, &io))) return s;
  cudaStream_t stream = state_of(L)->own;
  const peer_dims *D = &L->dims;
  size_t xb = (size_t)T * (size_t)D->d * 4, thk = (size_t)T * (size_t)(D->H * D->k);
  if ((s = copy(io.x, x, xb, cudaMemcpyHostToDevice, stream)) ||
      (s = dev_retrieve(L, T, io.x, io.ids, io.scores, io.gates, brute, stream)) ||
      (s = copy(indices, io.ids, thk * 8, cudaMemcpyDeviceToHost, stream)) ||
      (s = copy(scores, io.scores, thk * 4, cudaMemcpyDeviceToHost, stream)) ||
      (s = copy(gates, io.gates, thk * 4, cudaMemcpyDeviceToHost, stream))) {
    drain(stream);
    return s;
  }
  return check_stream(L, stream);
}

/* ------------------------------------------------------------ layer life */

/* Zeroed parameter storage; the zeros are in place for every stream when
 * this returns (as device_idle).  NULL on failure (the core reports it). */
static void *cuda_alloc(size_t bytes) {
  void *p = NULL;
  if (bytes == 0) bytes = 256;
  if (cudaMalloc(&p, bytes) != cudaSuccess) {
    (void)cudaGetLastError();
    return NULL;
  }
  if (cudaMemset(p, 0, bytes) != cudaSuccess || cudaDeviceSynchronize() != cudaSuccess) {
    (void)cudaGetLastError();
    cudaFree(p);
    return NULL;
  }
  return p;
}

/* The core frees parameters without naming the layer (before cuda_close):
 * the pointer says which device holds it. */
static void cuda_free(void *ptr, size_t bytes) {
  (void)bytes;
  if (!ptr) return;
  struct cudaPointerAttributes a;
  int device = -1;
  if (cudaPointerGetAttributes(&a, ptr) == cudaSuccess) device = a.device;
  (void)cudaGetLastError();
  if (device >= 0) {
    free_on(device, ptr);
  } else {
    cudaFree(ptr);
    (void)cudaGetLastError();
  }
}

/* Host bytes into parameter storage, between two device_idle waits: work
 * queued earlier on any stream may still read the old values, and the new
 * ones must be in place for every stream when this returns. */
static peer_status cuda_upload(peer_layer *L, void *dst, const void *src, size_t bytes) {
  const char *what = "upload of parameters";
  cudaError_t e = cudaSetDevice(state_of(L)->device);
  if (e != cudaSuccess) return peer_k_cuda_fail(e, what);
  peer_status s = device_idle(what);
  if (s) return s;
  if ((e = cudaMemcpy(dst, src, bytes, cudaMemcpyHostToDevice)) != cudaSuccess)
    return peer_k_cuda_fail(e, what);
  return device_idle(what);
}

/* Limits of this backend's kernels (shared memory per warp / thread /
 * block); the messages give the limits as config sizes (retrieval.h,
 * experts.h). */
static peer_status check_supported(const peer_layer *L) {
  const peer_dims *D = &L->dims;
  if (peer_k_topk_warp_smem(D->n, D->kp) > PEER_K_SMEM_MAX) {
    const long long cap = (long long)peer_k_topk_cap_max();
    return peer_fail(PEER_ERR_UNSUPPORTED,
                     "backend cuda: n_subkeys %lld with subkey_top_k %lld is beyond the top-k' "
                     "kernel's shared memory (keep subkey_top_k <= %lld or n_subkeys <= %lld)",
                     (long long)D->n, (long long)D->kp, cap, 32 * cap);
  }
  if (peer_k_merge_thread_smem(D->k) > PEER_K_SMEM_MAX)
    return peer_fail(PEER_ERR_UNSUPPORTED,
                     "backend cuda: top_k %lld is beyond the merge kernel's shared memory (at "
                     "most %lld)",
                     (long long)D->k, (long long)peer_k_merge_k_max());
  if (peer_k_experts_smem(D->H * D->k) > PEER_K_SMEM_MAX)
    return peer_fail(PEER_ERR_UNSUPPORTED,
                     "backend cuda: n_heads*top_k = %lld is beyond the expert kernel's shared "
                     "memory (at most %lld)",
                     (long long)(D->H * D->k), (long long)peer_k_experts_hk_max());
  if (D->d > 0x7fffffff / 2 || D->dq > 0x7fffffff || 2 * D->H * D->n > 0x7fffffff)
    return peer_fail(PEER_ERR_UNSUPPORTED, "backend cuda: dimensions beyond cuBLAS's int sizes");
  return PEER_OK;
}

static void cuda_close(peer_layer *L) {
  cuda_state *st = state_of(L);
  if (!st) return;
  /* work queued on the caller's streams may still use the scratch */
  if (cudaSetDevice(st->device) == cudaSuccess) (void)cudaDeviceSynchronize();
  if (st->blas) cublasDestroy(st->blas);
  if (st->own) cudaStreamDestroy(st->own);
  if (st->d_bad) cudaFree(st->d_bad);
  if (st->ws_owned && st->ws) cudaFree(st->ws);
  if (st->io) cudaFree(st->io);
  (void)cudaGetLastError(); /* a teardown reports nothing, and leaves no error behind */
  free(st);
  L->backend_data = NULL;
}

static peer_status cuda_open(peer_layer *L) {
  peer_status s = check_supported(L);
  if (s) return s;
  int count = peer_cuda_device_count();
  if (count == 0)
    return peer_fail(PEER_ERR_NO_DEVICE, "backend cuda: no CUDA device is available");
  if (L->opt.device < 0 || L->opt.device >= count)
    return peer_fail(PEER_ERR_NO_DEVICE, "backend cuda: device %d not in [0, %d)", L->opt.device,
                     count);
  cuda_state *st = calloc(1, sizeof *st);
  if (!st) return peer_fail(PEER_ERR_OUT_OF_MEMORY, "backend cuda: out of memory");
  st->device = L->opt.device;
  L->backend_data = st;
  cudaError_t e;
  cublasStatus_t bs;
  if ((e = cudaSetDevice(st->device)) != cudaSuccess)
    s = peer_k_cuda_fail(e, "backend cuda: cudaSetDevice");
  else if ((bs = cublasCreate(&st->blas)) != CUBLAS_STATUS_SUCCESS) {
    st->blas = NULL;
    s = blas_fail(bs, "backend cuda: cublasCreate");
  } else if ((bs = cublasSetMathMode(st->blas, CUBLAS_PEDANTIC_MATH)) != CUBLAS_STATUS_SUCCESS)
    s = blas_fail(bs, "backend cuda: cublasSetMathMode");
  else if ((e = cudaStreamCreateWithFlags(&st->own, cudaStreamNonBlocking)) != cudaSuccess) {
    st->own = NULL;
    s = peer_k_cuda_fail(e, "backend cuda: cudaStreamCreate");
  } else if ((e = cudaMalloc((void **)&st->d_bad, REC_COUNT * sizeof *st->d_bad)) !=
             cudaSuccess) {
    st->d_bad = NULL;
    s = peer_k_cuda_fail(e, "backend cuda: cudaMalloc");
  } else if ((e = cudaMemset(st->d_bad, 0xff, REC_COUNT * sizeof *st->d_bad)) != cudaSuccess)
    s = peer_k_cuda_fail(e, "backend cuda: cudaMemset");
  else
    s = device_idle("backend cuda: clearing the non-finite records");
  if (s) cuda_close(L);
  return s;
}

/* ------------------------------------------------------------ training */

static size_t cuda_host_workspace(const peer_layer *L, int64_t T) {
  (void)L, (void)T;
  return 0; /* device scratch is peer_cuda_workspace_size's */
}

/* A training context's memory (ctx->mem): a host record of two device
 * buffers.  `dev` holds what both paths need (train_mem), cuda_context_bytes
 * of it, the size peer_context_size reports; `stage` holds the host path's
 * device copies of its inputs, outputs and gradients (host_stage), allocated
 * by the first host-pointer training call on the context (an allocation
 * only then, as the layer's scratch) and freed with the context, so the
 * device-pointer calls never pay for it. */
typedef struct cuda_context {
  int device; /* the layer's: the context may be freed after its layer */
  void *dev;
  void *stage;
} cuda_context;

/* The context's `dev` buffer, carved for its max_tokens T; E = T*H*k
 * entries. */
typedef struct train_mem {
  float *q, *qhat, *dq;          /* [T, dq]: final queries, normalised (batch norm), grad */
  float *mean, *invstd;          /* [dq] batch statistics */
  int64_t *ids;                  /* [E] */
  float *scores, *gates, *z;     /* [E]; z = u_i . x */
  float *ds, *cup, *cdown;       /* [E] per-entry coefficients */
  uint32_t *key, *val, *key2, *val2, *starts; /* sorts: 2E (+1) each */
  uint32_t *runs;                /* distinct rows of the last sort */
  unsigned long long *rec;       /* [REC_BATCH] this batch's REC_SCORE, REC_X records */
  void *temp;                    /* CUB scratch */
  size_t temp_bytes;
} train_mem;

static size_t train_layout(const peer_layer *L, int64_t T, size_t temp_bytes, char *base,
                           train_mem *m) {
  const peer_dims *D = &L->dims;
  const size_t t = (size_t)T, dq = (size_t)D->dq, e = t * (size_t)(D->H * D->k);
  const part parts[] = {
      {(void **)&m->q, t * dq * 4},
      {(void **)&m->qhat, t * dq * 4},
      {(void **)&m->dq, t * dq * 4},
      {(void **)&m->mean, dq * 4},
      {(void **)&m->invstd, dq * 4},
      {(void **)&m->ids, e * 8},
      {(void **)&m->scores, e * 4},
      {(void **)&m->gates, e * 4},
      {(void **)&m->z, e * 4},
      {(void **)&m->ds, e * 4},
      {(void **)&m->cup, e * 4},
      {(void **)&m->cdown, e * 4},
      {(void **)&m->key, 2 * e * 4},
      {(void **)&m->val, 2 * e * 4},
      {(void **)&m->key2, 2 * e * 4},
      {(void **)&m->val2, 2 * e * 4},
      {(void **)&m->starts, (2 * e + 1) * 4},
      {(void **)&m->runs, 4},
      {(void **)&m->rec, REC_BATCH * 8},
      {(void **)&m->temp, temp_bytes},
  };
  m->temp_bytes = temp_bytes;
  return carve(parts, sizeof parts / sizeof parts[0], base);
}

/* The context's `stage` buffer: the host path's device copies for T tokens,
 * 4*T*d + H*d_key*(d + 3) + G*n*d_key + E*(2*d + 2) floats and 8 bytes
 * (each part rounded up to 256 bytes), the expert gradient rows [E, d]
 * twice the most of it. */
typedef struct host_stage {
  float *x, *y, *dy, *dx;                    /* [T, d] */
  int64_t *n_rows;                           /* expert rows of the last backward */
  float *g_wq, *g_bq, *g_nw, *g_nb, *g_keys; /* dense gradients */
  int64_t *g_rows;                           /* [E] expert ids, ascending */
  float *g_down, *g_up;                      /* [E, d] expert gradient rows */
} host_stage;

static size_t stage_layout(const peer_layer *L, int64_t T, char *base, host_stage *h) {
  const peer_dims *D = &L->dims;
  const size_t t = (size_t)T, d = (size_t)D->d, dq = (size_t)D->dq;
  const size_t e = t * (size_t)(D->H * D->k), keys = (size_t)(D->G * 2 * D->n * D->half);
  const part parts[] = {
      {(void **)&h->x, t * d * 4},    {(void **)&h->y, t * d * 4},
      {(void **)&h->dy, t * d * 4},   {(void **)&h->dx, t * d * 4},
      {(void **)&h->n_rows, 8},       {(void **)&h->g_wq, dq * d * 4},
      {(void **)&h->g_bq, dq * 4},    {(void **)&h->g_nw, dq * 4},
      {(void **)&h->g_nb, dq * 4},    {(void **)&h->g_keys, keys * 4},
      {(void **)&h->g_rows, e * 8},   {(void **)&h->g_down, e * d * 4},
      {(void **)&h->g_up, e * d * 4},
  };
  return carve(parts, sizeof parts / sizeof parts[0], base);
}

/* CUB's scratch for sorting 2E pairs (the sub-key sort, the larger). */
static peer_status sort_temp(const peer_layer *L, int64_t T, size_t *bytes) {
  return peer_k_sort_temp_bytes(2 * T * L->dims.H * L->dims.k, bytes);
}

/* Contexts this backend can train: the backward sorts 2*T*H*k (key, entry)
 * pairs with CUB's int item count.  Also asks CUB for its scratch on the
 * layer's device, so that cuda_context_bytes, which the core calls next,
 * gets the same answer. */
static peer_status cuda_context_check(const peer_layer *L, int64_t T, const char *what) {
  const int64_t most = 0x7fffffff / (2 * L->dims.H * L->dims.k);
  if (T > most)
    return peer_fail(PEER_ERR_UNSUPPORTED,
                     "%s: max_tokens %lld is beyond the CUDA backend's limit of %lld for this "
                     "layer (its backward sorts 2*max_tokens*n_heads*top_k pairs, at most "
                     "2^31 - 1)",
                     what, (long long)T, (long long)most);
  cudaError_t e = cudaSetDevice(state_of(L)->device);
  if (e != cudaSuccess) return peer_k_cuda_fail(e, what);
  size_t temp;
  return sort_temp(L, T, &temp);
}

static size_t cuda_context_bytes(const peer_layer *L, int64_t T) {
  size_t temp = 0;
  /* cuda_context_check just had the same answer; should CUB differ now,
   * context_mem refuses the context at its first use */
  if (sort_temp(L, T, &temp)) peer_clear_error();
  train_mem m;
  return train_layout(L, T, temp, NULL, &m);
}

static void *cuda_context_alloc(const peer_layer *L, size_t bytes) {
  cuda_context *c = calloc(1, sizeof *c);
  if (!c) return NULL;
  c->device = state_of(L)->device;
  cudaError_t e = cudaSetDevice(c->device);
  if (e == cudaSuccess) e = cudaMalloc(&c->dev, bytes ? bytes : 256);
  if (e != cudaSuccess) {
    (void)cudaGetLastError();
    free(c);
    return NULL;
  }
  return c;
}

static void cuda_context_free(void *mem, size_t bytes) {
  cuda_context *c = mem;
  (void)bytes;
  if (!c) return;
  free_on(c->device, c->dev);
  free_on(c->device, c->stage);
  free(c);
}

/* The context's layout; fails if CUB now wants more scratch than it has. */
static peer_status context_mem(const peer_layer *L, const peer_context *c, train_mem *m) {
  size_t temp = 0;
  peer_status s = sort_temp(L, c->max_tokens, &temp);
  if (s) return s;
  if (train_layout(L, c->max_tokens, temp, NULL, m) > c->bytes)
    return peer_fail(PEER_ERR_CUDA, "cuda training: CUB asks for more scratch than the "
                                    "context was given");
  train_layout(L, c->max_tokens, temp, ((cuda_context *)c->mem)->dev, m);
  return PEER_OK;
}

/* The host path's staging of the context, allocated on its first use. */
static peer_status context_stage(const peer_layer *L, peer_context *c, host_stage *h) {
  cuda_context *cc = c->mem;
  const size_t need = stage_layout(L, c->max_tokens, NULL, h);
  if (!cc->stage) {
    cudaError_t e = cudaMalloc(&cc->stage, need);
    if (e != cudaSuccess) {
      cc->stage = NULL;
      char what[128];
      snprintf(what, sizeof what, "host-path training: %zu bytes of device staging", need);
      return peer_k_cuda_fail(e, what);
    }
  }
  stage_layout(L, c->max_tokens, cc->stage, h);
  return PEER_OK;
}

/* The training forward on device pointers, queued on `stream`: queries with
 * batch statistics (kept in the context), retrieval into the context's ids,
 * scores and gates, experts keeping z; then the running statistics, which
 * the device leaves alone when this batch met a non-finite x or score (as
 * the CPU, which fails before updating them); then this batch's records
 * join the layer's.  The backward will read x from d_x.  T is within the
 * context (peer_train_begin), whose size cuda_context_check accepted, so the
 * backward's sorts fit CUB's counts. */
static peer_status dev_forward_train(peer_layer *L, peer_context *ctx, int64_t T,
                                     const float *d_x, float *d_y, cudaStream_t stream) {
  const peer_dims *D = &L->dims;
  const bool bn = L->cfg.query_norm == PEER_NORM_BATCHNORM;
  train_mem m;
  dev_ws w;
  peer_status s;
  if ((s = context_mem(L, ctx, &m)) || (s = device_scratch(L, T, &w))) return s;
  cudaError_t e = cudaMemsetAsync(m.rec, 0xff, REC_BATCH * sizeof *m.rec, stream);
  if (e != cudaSuccess) return peer_k_cuda_fail(e, "forward_train: cudaMemsetAsync");
  if ((s = peer_k_first_nonfinite_row(d_x, T, D->d, m.rec + REC_X, stream)) ||
      (s = project_query(L, T, d_x, m.q, false, stream)))
    return s;
  if (bn && (s = peer_k_batch_norm_train(m.q, m.qhat, m.mean, m.invstd, T, D->dq,
                                         L->slot[PEER_P_NORM_WEIGHT].data,
                                         L->slot[PEER_P_NORM_BIAS].data, stream)))
    return s;
  if ((s = search(L, T, m.q, m.ids, m.scores, m.gates, false, m.rec + REC_SCORE, stream, &w)) ||
      (s = peer_k_experts(d_x, d_y, L->slot[PEER_P_EXPERTS_DOWN].data,
                          L->slot[PEER_P_EXPERTS_UP].data, L->cfg.weight_dtype == PEER_BF16,
                          m.ids, m.gates, m.z, T, D->d, D->H * D->k, (int)L->cfg.activation,
                          stream)))
    return s;
  if (bn && (s = peer_k_running_update(L->slot[PEER_P_NORM_MEAN].data,
                                       L->slot[PEER_P_NORM_VAR].data, m.mean, m.invstd, T,
                                       D->dq, L->norm_momentum, m.rec, REC_BATCH, stream)))
    return s;
  if ((s = peer_k_record_fold(state_of(L)->d_bad, m.rec, REC_BATCH, stream))) return s;
  ctx->x_dev = d_x;
  return PEER_OK;
}

/* The backward of ctx's last training forward on device pointers, queued on
 * `stream`: a non-finite row of dy lowers the layer's REC_DY record (the
 * results are then NaN or meaningless; peer_cuda_check says so); dx if
 * d_dx; every gradient g asks for, into g's device buffers (expert rows
 * sparse or added into dense [N, d] buffers); the expert row count into
 * *n_rows if not NULL. */
static peer_status dev_backward(peer_layer *L, peer_context *ctx, const float *d_dy, float *d_dx,
                                const peer_grads *g, int64_t *n_rows, cudaStream_t stream) {
  cuda_state *st = state_of(L);
  const peer_dims *D = &L->dims;
  const int64_t T = ctx->n_tokens, hk = D->H * D->k, E = T * hk;
  const bool bn = L->cfg.query_norm == PEER_NORM_BATCHNORM;
  const float *x = ctx->x_dev;
  train_mem m;
  peer_status s = context_mem(L, ctx, &m);
  if (s || (s = peer_k_first_nonfinite_row(d_dy, T, D->d, st->d_bad + REC_DY, stream))) return s;
  peer_k_expert_args a = {0};
  a.in = d_dy, a.out = d_dx;
  a.first = L->slot[PEER_P_EXPERTS_UP].data, a.second = L->slot[PEER_P_EXPERTS_DOWN].data;
  a.ids = m.ids, a.gates = m.gates, a.z = m.z, a.scores = m.scores;
  a.ds = m.ds, a.cup = m.cup, a.cdown = m.cdown;
  a.T = T, a.d = D->d, a.hk = (int)hk, a.k = (int)D->k, a.act = (int)L->cfg.activation,
  a.gate = (int)L->cfg.gate;
  if ((s = peer_k_experts_backward(&a, L->cfg.weight_dtype == PEER_BF16, stream))) return s;
  /* The distinct rows of a sort: at most its entries, and at most the rows
   * there are (the kernels' grids are sized by these bounds). */
  const int64_t expert_rows = E < D->N ? E : D->N;
  const int64_t key_rows = 2 * E < D->G * 2 * D->n ? 2 * E : D->G * 2 * D->n;
  cudaError_t e;
  if (g->experts_down) {
    if ((s = peer_k_expert_sort_keys(m.ids, E, m.key, m.val, stream)) ||
        (s = peer_k_sorted_runs(m.key, m.val, m.key2, m.val2, m.starts, m.runs, E,
                                (uint32_t)(D->N - 1), m.temp, m.temp_bytes, stream)) ||
        (s = peer_k_expert_grads(m.key2, m.val2, m.starts, m.runs, expert_rows, m.cdown, m.cup, x,
                                 d_dy, D->d, hk, g->experts_dense ? 1 : 0, g->experts_down,
                                 g->experts_up, g->expert_rows, n_rows, stream)))
      return s;
  } else if (n_rows && (e = cudaMemsetAsync(n_rows, 0, sizeof *n_rows, stream)) != cudaSuccess) {
    return peer_k_cuda_fail(e, "backward: cudaMemsetAsync");
  }
  const float *keys = L->slot[PEER_P_KEYS].data;
  if ((s = peer_k_query_grad(m.ids, m.ds, keys, T, D->H, D->k, D->n, D->dk,
                             L->cfg.shared_keys ? 1 : 0, m.dq, stream)))
    return s;
  if (g->keys) {
    if ((e = cudaMemsetAsync(g->keys, 0, L->slot[PEER_P_KEYS].nbytes, stream)) != cudaSuccess)
      return peer_k_cuda_fail(e, "backward: cudaMemsetAsync");
    if ((s = peer_k_subkey_sort_keys(m.ids, T, D->H, D->k, D->n, L->cfg.shared_keys ? 1 : 0, m.key,
                                     m.val, stream)) ||
        (s = peer_k_sorted_runs(m.key, m.val, m.key2, m.val2, m.starts, m.runs, 2 * E,
                                (uint32_t)(D->G * 2 * D->n - 1), m.temp, m.temp_bytes, stream)) ||
        (s = peer_k_keys_grad(m.key2, m.val2, m.starts, m.runs, key_rows, m.ds, m.q, D->H, D->k,
                              D->dk, g->keys, stream)))
      return s;
  }
  if (bn && (s = peer_k_norm_backward(m.dq, m.qhat, m.invstd, L->slot[PEER_P_NORM_WEIGHT].data,
                                      T, D->dq, g->norm_weight, g->norm_bias, stream)))
    return s;
  if (g->query_bias && (s = peer_k_column_sums(m.dq, T, D->dq, g->query_bias, stream))) return s;
  const float one = 1.0f, zero = 0.0f;
  cublasStatus_t bs = cublasSetStream(st->blas, stream);
  if (bs != CUBLAS_STATUS_SUCCESS) return blas_fail(bs, "backward: cublasSetStream");
  /* dWq [dq, d] row-major = dq^T X: column-major dWq' [d, dq] = X' dq'^T */
  if (g->query_weight &&
      (bs = cublasSgemm(st->blas, CUBLAS_OP_N, CUBLAS_OP_T, (int)D->d, (int)D->dq, (int)T, &one,
                        x, (int)D->d, m.dq, (int)D->dq, &zero, g->query_weight, (int)D->d)) !=
          CUBLAS_STATUS_SUCCESS)
    return blas_fail(bs, "backward: query weight gradient");
  /* dx [T, d] += dq Wq: column-major dx' [d, T] += Wq' dq' */
  if (d_dx &&
      (bs = cublasSgemm(st->blas, CUBLAS_OP_N, CUBLAS_OP_N, (int)D->d, (int)T, (int)D->dq, &one,
                        L->slot[PEER_P_QUERY_WEIGHT].data, (int)D->d, m.dq, (int)D->dq, &one,
                        d_dx, (int)D->d)) != CUBLAS_STATUS_SUCCESS)
    return blas_fail(bs, "backward: dx through the query projection");
  return PEER_OK;
}

/* An empty batch's backward: dense gradients zeroed (as peer_backward
 * does), no expert rows. */
static peer_status dev_backward_empty(const peer_layer *L, const peer_grads *g, int64_t *n_rows,
                                      cudaStream_t stream) {
  float *bufs[] = {g->query_weight, g->query_bias, g->norm_weight, g->norm_bias, g->keys};
  int slots[] = {PEER_P_QUERY_WEIGHT, PEER_P_QUERY_BIAS, PEER_P_NORM_WEIGHT, PEER_P_NORM_BIAS,
                 PEER_P_KEYS};
  cudaError_t e = cudaSuccess;
  for (int i = 0; i < 5 && e == cudaSuccess; i++)
    if (bufs[i]) e = cudaMemsetAsync(bufs[i], 0, L->slot[slots[i]].nbytes, stream);
  if (e == cudaSuccess && n_rows) e = cudaMemsetAsync(n_rows, 0, sizeof *n_rows, stream);
  return e == cudaSuccess ? PEER_OK : peer_k_cuda_fail(e, "cuda_backward: cudaMemsetAsync");
}

peer_status peer_cuda_forward_train(peer_layer *L, peer_context *ctx, int64_t T,
                                    const float *d_x, float *d_y, cudaStream_t stream) {
  const char *what = "cuda_forward_train";
  /* peer_train_begin first: it marks ctx not ready, so that no argument
   * error leaves a backward to use the previous batch */
  peer_status s = peer_train_begin(L, ctx, T, d_x, d_y, what);
  if (s || (s = enter(L, T, d_x, what))) return s;
  if (T > 0 && (s = dev_forward_train(L, ctx, T, d_x, d_y, stream))) return s;
  peer_train_end(ctx, T, d_x);
  return PEER_OK;
}

peer_status peer_cuda_backward(peer_layer *L, peer_context *ctx, const float *d_dy, float *d_dx,
                               peer_grads *d_grads, int64_t *d_n_expert_rows,
                               cudaStream_t stream) {
  const char *what = "cuda_backward";
  peer_status s = enter(L, 0, NULL, what);
  if (s || (s = peer_backward_check(L, ctx, d_dy, d_grads, what))) return s;
  if (ctx->n_tokens == 0) s = dev_backward_empty(L, d_grads, d_n_expert_rows, stream);
  else s = dev_backward(L, ctx, d_dy, d_dx, d_grads, d_n_expert_rows, stream);
  if (s) return s;
  ctx->ready = false; /* one backward per training forward, as peer_backward */
  return PEER_OK;
}

/* ------------------------------------------------------------ training, host path */

static peer_status cuda_forward_train(peer_layer *L, peer_context *ctx, int64_t T,
                                      const float *x, float *y, void *host_ws) {
  (void)host_ws;
  peer_status s = host_enter(L, T, x, "forward_train");
  host_stage h;
  if (s || (s = context_stage(L, ctx, &h))) return s;
  cudaStream_t stream = state_of(L)->own;
  size_t xb = (size_t)T * (size_t)L->dims.d * 4;
  if ((s = copy(h.x, x, xb, cudaMemcpyHostToDevice, stream)) ||
      (s = dev_forward_train(L, ctx, T, h.x, h.y, stream)) ||
      (s = copy(y, h.y, xb, cudaMemcpyDeviceToHost, stream))) {
    drain(stream);
    return s;
  }
  return check_stream(L, stream);
}

/* The n_rows expert rows of the staging to the caller's host buffers, on
 * `stream` (idle when called; idle again on return), dense rows added on
 * the host. */
static peer_status copy_expert_rows(const peer_layer *L, const host_stage *h, int64_t n_rows,
                                    peer_grads *g, cudaStream_t stream) {
  const size_t d = (size_t)L->dims.d, runs = (size_t)n_rows, rb = runs * d * sizeof(float);
  const enum cudaMemcpyKind out = cudaMemcpyDeviceToHost;
  float *tmp = NULL;
  if (g->experts_dense && runs > 0 && !(tmp = malloc(2 * rb)))
    return peer_fail(PEER_ERR_OUT_OF_MEMORY, "backward: out of memory");
  float *down = tmp ? tmp : g->experts_down, *up = tmp ? tmp + runs * d : g->experts_up;
  peer_status s;
  if ((s = copy(g->expert_rows, h->g_rows, runs * 8, out, stream)) ||
      (s = copy(down, h->g_down, rb, out, stream)) || (s = copy(up, h->g_up, rb, out, stream)) ||
      (s = wait_for(stream, "backward: copying expert gradients"))) {
    drain(stream);
    free(tmp);
    return s;
  }
  for (size_t r = 0; tmp && r < runs; r++) {
    float *gd = g->experts_down + (size_t)g->expert_rows[r] * d;
    float *gu = g->experts_up + (size_t)g->expert_rows[r] * d;
    for (size_t i = 0; i < d; i++)
      gd[i] += down[r * d + i], gu[i] += up[r * d + i];
  }
  free(tmp);
  g->n_expert_rows = n_rows;
  return PEER_OK;
}

/* The device backward into the context's staging (expert rows always in
 * the sparse form there); after the stream is checked (a non-finite dy
 * leaves the caller's buffers untouched), copies to the caller's host
 * buffers, with dense expert rows added on the host. */
static peer_status cuda_backward(peer_layer *L, peer_context *ctx, const float *dy, float *dx,
                                 peer_grads *g) {
  const peer_dims *D = &L->dims;
  const int64_t T = ctx->n_tokens;
  peer_status s = host_enter(L, T, dy, "backward");
  host_stage h;
  if (s || (s = context_stage(L, ctx, &h))) return s;
  cudaStream_t stream = state_of(L)->own;
  const bool experts = g->experts_down != NULL;
  peer_grads dg = {0};
  dg.query_weight = g->query_weight ? h.g_wq : NULL;
  dg.query_bias = g->query_bias ? h.g_bq : NULL;
  dg.norm_weight = g->norm_weight ? h.g_nw : NULL;
  dg.norm_bias = g->norm_bias ? h.g_nb : NULL;
  dg.keys = g->keys ? h.g_keys : NULL;
  if (experts) {
    dg.expert_capacity = T * D->H * D->k;
    dg.expert_rows = h.g_rows, dg.experts_down = h.g_down, dg.experts_up = h.g_up;
  }
  const size_t xb = (size_t)T * (size_t)D->d * 4, fb = (size_t)D->dq * 4;
  const enum cudaMemcpyKind out = cudaMemcpyDeviceToHost;
  if ((s = copy(h.dy, dy, xb, cudaMemcpyHostToDevice, stream)) ||
      (s = dev_backward(L, ctx, h.dy, dx ? h.dx : NULL, &dg, experts ? h.n_rows : NULL, stream))) {
    drain(stream);
    return s;
  }
  if ((s = check_stream(L, stream))) return s;
  int64_t n_rows = 0;
  if ((s = copy(dx, h.dx, xb, out, stream)) ||
      (s = copy(g->query_weight, h.g_wq, fb * (size_t)D->d, out, stream)) ||
      (s = copy(g->query_bias, h.g_bq, fb, out, stream)) ||
      (s = copy(g->norm_weight, h.g_nw, fb, out, stream)) ||
      (s = copy(g->norm_bias, h.g_nb, fb, out, stream)) ||
      (s = copy(g->keys, h.g_keys, L->slot[PEER_P_KEYS].nbytes, out, stream)) ||
      (s = copy(experts ? &n_rows : NULL, h.n_rows, sizeof n_rows, out, stream)) ||
      (s = wait_for(stream, "backward: copying gradients"))) {
    drain(stream);
    return s;
  }
  return experts ? copy_expert_rows(L, &h, n_rows, g, stream) : PEER_OK;
}

const peer_backend_i peer_backend_cuda = {
    .name = "cuda",
    .alloc = cuda_alloc,
    .free = cuda_free,
    .workspace_size = cuda_host_workspace,
    .forward = cuda_forward,
    .retrieve = cuda_retrieve,
    .context_bytes = cuda_context_bytes,
    .forward_train = cuda_forward_train,
    .backward = cuda_backward,
    .open = cuda_open,
    .close = cuda_close,
    .upload = cuda_upload,
    .context_check = cuda_context_check,
    .context_alloc = cuda_context_alloc,
    .context_free = cuda_context_free,
};
