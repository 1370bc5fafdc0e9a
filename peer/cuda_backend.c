/* cuda_backend.c: the CUDA backend: per-layer state (device, cuBLAS handle,
 * the non-finite record, device scratch), the backend table the core calls,
 * and the device-pointer API of peer_cuda.h.  A forward is
 *   Q = X Wq^T                       cuBLAS SGEMM
 *   bias, running batch norm         peer_k_bias_norm
 *   S[t,h,half] = Q_half C^T         cuBLAS strided-batched SGEMM, per half
 *   top-k' per (t, h, half)          peer_k_subkey_topk
 *   candidate top-k, gates           peer_k_merge
 *   experts                          peer_k_experts
 * all queued on one stream.  Training is not implemented on this backend:
 * its entries say so with PEER_ERR_UNSUPPORTED. */
#include "internal.h"
#include "peer_cuda.h"

#include "experts.h"
#include "retrieval.h"

#include <cublas_v2.h>
#include <stdlib.h>
#include <string.h>

/* No record of a non-finite score. */
#define NO_BAD (~0ull)

typedef struct cuda_state {
  int device;
  cublasHandle_t blas;
  cudaStream_t own;          /* the host-pointer path's stream */
  unsigned long long *d_bad; /* smallest (t*H + h) with a non-finite score */
  void *ws;                  /* device scratch (registered or owned) */
  size_t ws_bytes;
  bool ws_owned;
  void *io; /* device copies of the host-pointer path's inputs and outputs */
  size_t io_bytes;
} cuda_state;

static peer_status cuda_fail(cudaError_t e, const char *what) {
  return peer_fail(PEER_ERR_CUDA, "%s: %s", what, cudaGetErrorString(e));
}

static peer_status blas_fail(cublasStatus_t s, const char *what) {
  return peer_fail(PEER_ERR_CUDA, "%s: cuBLAS: %s", what, cublasGetStatusString(s));
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
  size_t sizes[7] = {t * (size_t)D->dq * 4, t * (size_t)(D->H * 2 * D->n) * 4, lists * 4,
                     lists * 8, thk * 8, thk * 4, thk * 4};
  void **slots[7] = {0};
  if (w) {
    slots[0] = (void **)&w->q, slots[1] = (void **)&w->S, slots[2] = (void **)&w->list_s;
    slots[3] = (void **)&w->list_id, slots[4] = (void **)&w->ids, slots[5] = (void **)&w->scores;
    slots[6] = (void **)&w->gates;
  }
  size_t off = 0;
  for (int i = 0; i < 7; i++) {
    if (w) *slots[i] = base + off;
    off += round256(sizes[i]);
  }
  return off;
}

static peer_status device_scratch(peer_layer *L, int64_t T, dev_ws *w) {
  cuda_state *st = state_of(L);
  size_t need = dev_layout(L, T, NULL, NULL);
  if (!(st->ws && need <= st->ws_bytes)) {
    if (st->ws && !st->ws_owned)
      return peer_fail(PEER_ERR_INVALID_ARGUMENT,
                       "cuda workspace: %lld tokens need %zu bytes, the registered buffer has %zu",
                       (long long)T, need, st->ws_bytes);
    if (st->ws) cudaFree(st->ws);
    st->ws = NULL;
    st->ws_bytes = 0;
    st->ws_owned = true;
    cudaError_t e = cudaMalloc(&st->ws, need);
    if (e != cudaSuccess) {
      st->ws = NULL;
      return cuda_fail(e, "cuda workspace: cudaMalloc");
    }
    st->ws_bytes = need;
  }
  dev_layout(L, T, st->ws, w);
  return PEER_OK;
}

/* ------------------------------------------------------------ the passes */

static peer_status run_retrieval(peer_layer *L, int64_t T, const float *d_x, int64_t *ids,
                                 float *scores, float *gates, cudaStream_t stream,
                                 const dev_ws *w) {
  cuda_state *st = state_of(L);
  const peer_dims *D = &L->dims;
  const float one = 1.0f, zero = 0.0f;
  cublasStatus_t bs = cublasSetStream(st->blas, stream);
  if (bs != CUBLAS_STATUS_SUCCESS) return blas_fail(bs, "forward: cublasSetStream");
  /* Row-major Q [T, dq] = X [T, d] Wq^T is column-major Q' = Wq'^T X'. */
  bs = cublasSgemm(st->blas, CUBLAS_OP_T, CUBLAS_OP_N, (int)D->dq, (int)T, (int)D->d, &one,
                   L->slot[PEER_P_QUERY_WEIGHT].data, (int)D->d, d_x, (int)D->d, &zero, w->q,
                   (int)D->dq);
  if (bs != CUBLAS_STATUS_SUCCESS) return blas_fail(bs, "forward: query projection");
  peer_status s = peer_k_bias_norm(w->q, T, D->dq, L->slot[PEER_P_QUERY_BIAS].data,
                                   L->slot[PEER_P_NORM_WEIGHT].data,
                                   L->slot[PEER_P_NORM_BIAS].data, L->slot[PEER_P_NORM_MEAN].data,
                                   L->slot[PEER_P_NORM_VAR].data, stream);
  if (s) return s;
  /* Per half p, one batch entry per head h:
   *   S[((t*H + h)*2 + p)*n + a] = sum_j q[t*dq + h*dk + p*half + j] * C_g,p[a, j]
   * with C_g,p = keys + ((g*2 + p)*n)*half and g = h, or 0 with shared keys. */
  const float *keys = L->slot[PEER_P_KEYS].data;
  long long key_stride = L->cfg.shared_keys ? 0 : 2 * D->n * D->half;
  for (int p = 0; p < 2; p++) {
    bs = cublasSgemmStridedBatched(
        st->blas, CUBLAS_OP_T, CUBLAS_OP_N, (int)D->n, (int)T, (int)D->half, &one,
        keys + p * D->n * D->half, (int)D->half, key_stride, w->q + p * D->half, (int)D->dq,
        (long long)D->dk, &zero, w->S + p * D->n, (int)(2 * D->H * D->n), 2 * D->n, (int)D->H);
    if (bs != CUBLAS_STATUS_SUCCESS) return blas_fail(bs, "forward: sub-key scores");
  }
  if ((s = peer_k_subkey_topk(w->S, T * D->H * 2, D->n, D->kp, w->list_s, w->list_id, st->d_bad,
                              stream)))
    return s;
  return peer_k_merge(w->list_s, w->list_id, T * D->H, D->kp, D->k, D->n, (int)L->cfg.gate,
                      scores, ids, gates, st->d_bad, stream);
}

static peer_status run_forward(peer_layer *L, int64_t T, const float *d_x, float *d_y,
                               int64_t *d_indices, float *d_gates, cudaStream_t stream) {
  dev_ws w;
  peer_status s = device_scratch(L, T, &w);
  if (s) return s;
  int64_t *ids = d_indices ? d_indices : w.ids;
  float *gates = d_gates ? d_gates : w.gates;
  if ((s = run_retrieval(L, T, d_x, ids, w.scores, gates, stream, &w))) return s;
  const peer_dims *D = &L->dims;
  return peer_k_experts(d_x, d_y, L->slot[PEER_P_EXPERTS_DOWN].data,
                        L->slot[PEER_P_EXPERTS_UP].data, L->cfg.weight_dtype == PEER_BF16, ids,
                        gates, T, D->d, D->H * D->k, (int)L->cfg.activation, stream);
}

static peer_status check_stream(peer_layer *L, cudaStream_t stream) {
  cuda_state *st = state_of(L);
  const peer_dims *D = &L->dims;
  cudaError_t e = cudaStreamSynchronize(stream);
  if (e != cudaSuccess) return cuda_fail(e, "cuda check: stream");
  unsigned long long bad = NO_BAD;
  if ((e = cudaMemcpy(&bad, st->d_bad, sizeof bad, cudaMemcpyDeviceToHost)) != cudaSuccess)
    return cuda_fail(e, "cuda check: reading the non-finite record");
  if (bad == NO_BAD) return PEER_OK;
  if ((e = cudaMemset(st->d_bad, 0xff, sizeof bad)) != cudaSuccess)
    return cuda_fail(e, "cuda check: clearing the non-finite record");
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
  return e == cudaSuccess ? PEER_OK : cuda_fail(e, what);
}

peer_status peer_cuda_workspace_size(const peer_layer *L, int64_t T, size_t *bytes) {
  if (!L || !bytes) return peer_fail(PEER_ERR_INVALID_ARGUMENT, "cuda_workspace_size: NULL argument");
  if (L->opt.backend != PEER_BACKEND_CUDA)
    return peer_fail(PEER_ERR_INVALID_ARGUMENT, "cuda_workspace_size: not a CUDA layer");
  if (T < 0) return peer_fail(PEER_ERR_INVALID_ARGUMENT, "n_tokens: %lld is negative", (long long)T);
  *bytes = dev_layout(L, T, NULL, NULL);
  return PEER_OK;
}

peer_status peer_cuda_set_workspace(peer_layer *L, void *d_buffer, size_t bytes) {
  if (!L) return peer_fail(PEER_ERR_INVALID_ARGUMENT, "cuda_set_workspace: NULL layer");
  if (L->opt.backend != PEER_BACKEND_CUDA)
    return peer_fail(PEER_ERR_INVALID_ARGUMENT, "cuda_set_workspace: not a CUDA layer");
  if (d_buffer && (uintptr_t)d_buffer % 256)
    return peer_fail(PEER_ERR_INVALID_ARGUMENT, "cuda_set_workspace: buffer is not 256-byte aligned");
  cuda_state *st = state_of(L);
  if (st->ws_owned && st->ws) cudaFree(st->ws);
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

peer_status peer_cuda_retrieve(peer_layer *L, int64_t T, const float *d_x, int64_t *d_indices,
                               float *d_scores, float *d_gates, cudaStream_t stream) {
  peer_status s = enter(L, T, d_x, "cuda_retrieve");
  if (s) return s;
  if (T == 0) return PEER_OK;
  if (!d_indices) return peer_fail(PEER_ERR_INVALID_ARGUMENT, "cuda_retrieve: indices is NULL");
  dev_ws w;
  if ((s = device_scratch(L, T, &w))) return s;
  return run_retrieval(L, T, d_x, d_indices, d_scores ? d_scores : w.scores,
                       d_gates ? d_gates : w.gates, stream, &w);
}

peer_status peer_cuda_check(peer_layer *L, cudaStream_t stream) {
  peer_status s = enter(L, 0, NULL, "cuda_check");
  if (s) return s;
  return check_stream(L, stream);
}

/* ------------------------------------------------------------ host path */

/* Device copies of x, y, ids, scores and gates for the host-pointer calls. */
typedef struct io_bufs {
  float *x, *y;
  int64_t *ids;
  float *scores, *gates;
} io_bufs;

static peer_status host_io(peer_layer *L, int64_t T, io_bufs *io) {
  cuda_state *st = state_of(L);
  const peer_dims *D = &L->dims;
  size_t td = round256((size_t)T * (size_t)D->d * 4), thk = (size_t)T * (size_t)(D->H * D->k);
  size_t need = 2 * td + round256(thk * 8) + 2 * round256(thk * 4);
  if (need > st->io_bytes) {
    if (st->io) cudaFree(st->io);
    st->io = NULL;
    st->io_bytes = 0;
    cudaError_t e = cudaMalloc(&st->io, need);
    if (e != cudaSuccess) {
      st->io = NULL;
      return cuda_fail(e, "cuda host path: cudaMalloc");
    }
    st->io_bytes = need;
  }
  char *p = st->io;
  io->x = (float *)p;
  io->y = (float *)(p + td);
  io->ids = (int64_t *)(p + 2 * td);
  io->scores = (float *)(p + 2 * td + round256(thk * 8));
  io->gates = (float *)(p + 2 * td + round256(thk * 8) + round256(thk * 4));
  return PEER_OK;
}

static peer_status copy(void *dst, const void *src, size_t bytes, enum cudaMemcpyKind kind,
                        cudaStream_t stream) {
  if (!dst || bytes == 0) return PEER_OK;
  cudaError_t e = cudaMemcpyAsync(dst, src, bytes, kind, stream);
  return e == cudaSuccess ? PEER_OK : cuda_fail(e, "cuda host path: cudaMemcpyAsync");
}

static peer_status cuda_forward(peer_layer *L, int64_t T, const float *x, float *y,
                                int64_t *indices, float *gates, void *host_ws) {
  (void)host_ws;
  peer_status s = enter(L, T, x, "forward");
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
    cudaStreamSynchronize(stream);
    return s;
  }
  return check_stream(L, stream);
}

static peer_status cuda_retrieve(peer_layer *L, int64_t T, const float *x, int64_t *indices,
                                 float *scores, float *gates, bool brute, void *host_ws) {
  (void)host_ws;
  if (brute)
    return peer_fail(PEER_ERR_UNSUPPORTED,
                     "retrieve_brute: not implemented on the CUDA backend (use a CPU layer)");
  peer_status s = enter(L, T, x, "retrieve");
  io_bufs io;
  if (s || (s = host_io(L, T, &io))) return s;
  cudaStream_t stream = state_of(L)->own;
  dev_ws w;
  if ((s = device_scratch(L, T, &w))) return s;
  const peer_dims *D = &L->dims;
  size_t xb = (size_t)T * (size_t)D->d * 4, thk = (size_t)T * (size_t)(D->H * D->k);
  if ((s = copy(io.x, x, xb, cudaMemcpyHostToDevice, stream)) ||
      (s = run_retrieval(L, T, io.x, io.ids, io.scores, io.gates, stream, &w)) ||
      (s = copy(indices, io.ids, thk * 8, cudaMemcpyDeviceToHost, stream)) ||
      (s = copy(scores, io.scores, thk * 4, cudaMemcpyDeviceToHost, stream)) ||
      (s = copy(gates, io.gates, thk * 4, cudaMemcpyDeviceToHost, stream))) {
    cudaStreamSynchronize(stream);
    return s;
  }
  return check_stream(L, stream);
}

/* ------------------------------------------------------------ layer life */

static void *cuda_alloc(size_t bytes) {
  void *p = NULL;
  if (bytes == 0) bytes = 256;
  if (cudaMalloc(&p, bytes) != cudaSuccess) {
    cudaGetLastError();
    return NULL;
  }
  if (cudaMemset(p, 0, bytes) != cudaSuccess) {
    cudaFree(p);
    return NULL;
  }
  return p;
}

static void cuda_free(void *ptr, size_t bytes) {
  (void)bytes;
  if (ptr) cudaFree(ptr);
}

static peer_status cuda_upload(peer_layer *L, void *dst, const void *src, size_t bytes) {
  cudaError_t e = cudaSetDevice(state_of(L)->device);
  if (e == cudaSuccess) e = cudaMemcpy(dst, src, bytes, cudaMemcpyHostToDevice);
  return e == cudaSuccess ? PEER_OK : cuda_fail(e, "upload of parameters");
}

/* Limits of this backend's kernels (shared memory per warp / thread / block). */
static peer_status check_supported(const peer_layer *L) {
  const peer_dims *D = &L->dims;
  if (peer_k_topk_warp_smem(D->n, D->kp) > PEER_K_SMEM_MAX)
    return peer_fail(PEER_ERR_UNSUPPORTED,
                     "backend cuda: n_subkeys %lld with subkey_top_k %lld is beyond the top-k' "
                     "kernel's shared memory (keep subkey_top_k <= 120 or n_subkeys <= 3840)",
                     (long long)D->n, (long long)D->kp);
  if (peer_k_merge_thread_smem(D->k) > PEER_K_SMEM_MAX ||
      peer_k_experts_smem(D->H * D->k) > PEER_K_SMEM_MAX)
    return peer_fail(PEER_ERR_UNSUPPORTED,
                     "backend cuda: n_heads*top_k = %lld is beyond the kernels' shared memory "
                     "(at most 4096)",
                     (long long)(D->H * D->k));
  if (D->d > 0x7fffffff / 2 || D->dq > 0x7fffffff || 2 * D->H * D->n > 0x7fffffff)
    return peer_fail(PEER_ERR_UNSUPPORTED, "backend cuda: dimensions beyond cuBLAS's int sizes");
  return PEER_OK;
}

static void cuda_close(peer_layer *L) {
  cuda_state *st = state_of(L);
  if (!st) return;
  cudaSetDevice(st->device);
  if (st->blas) cublasDestroy(st->blas);
  if (st->own) cudaStreamDestroy(st->own);
  if (st->d_bad) cudaFree(st->d_bad);
  if (st->ws_owned && st->ws) cudaFree(st->ws);
  if (st->io) cudaFree(st->io);
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
  if ((e = cudaSetDevice(st->device)) != cudaSuccess) s = cuda_fail(e, "backend cuda: cudaSetDevice");
  else if ((bs = cublasCreate(&st->blas)) != CUBLAS_STATUS_SUCCESS) {
    st->blas = NULL;
    s = blas_fail(bs, "backend cuda: cublasCreate");
  } else if ((bs = cublasSetMathMode(st->blas, CUBLAS_PEDANTIC_MATH)) != CUBLAS_STATUS_SUCCESS)
    s = blas_fail(bs, "backend cuda: cublasSetMathMode");
  else if ((e = cudaStreamCreateWithFlags(&st->own, cudaStreamNonBlocking)) != cudaSuccess) {
    st->own = NULL;
    s = cuda_fail(e, "backend cuda: cudaStreamCreate");
  } else if ((e = cudaMalloc((void **)&st->d_bad, sizeof *st->d_bad)) != cudaSuccess) {
    st->d_bad = NULL;
    s = cuda_fail(e, "backend cuda: cudaMalloc");
  } else if ((e = cudaMemset(st->d_bad, 0xff, sizeof *st->d_bad)) != cudaSuccess)
    s = cuda_fail(e, "backend cuda: cudaMemset");
  if (s) cuda_close(L);
  return s;
}

/* ------------------------------------------------------------ training */

static size_t cuda_host_workspace(const peer_layer *L, int64_t T) {
  (void)L, (void)T;
  return 0; /* device scratch is peer_cuda_workspace_size's */
}

static size_t cuda_context_bytes(const peer_layer *L, int64_t T) {
  (void)L, (void)T;
  return 64;
}

static peer_status cuda_forward_train(peer_layer *L, peer_context *ctx, int64_t T,
                                      const float *x, float *y, void *ws) {
  (void)L, (void)ctx, (void)T, (void)x, (void)y, (void)ws;
  return peer_fail(PEER_ERR_UNSUPPORTED,
                   "forward_train: training is not implemented on the CUDA backend yet");
}

static peer_status cuda_backward(peer_layer *L, peer_context *ctx, const float *dy, float *dx,
                                 peer_grads *grads) {
  (void)L, (void)ctx, (void)dy, (void)dx, (void)grads;
  return peer_fail(PEER_ERR_UNSUPPORTED,
                   "backward: training is not implemented on the CUDA backend yet");
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
};
