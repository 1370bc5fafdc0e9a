/* backend.c: the CUDA backend: per-layer state (device, cuBLAS handle,
 * the non-finite records, device scratch), the backend table the core calls,
 * and the device-pointer API of peer_cuda.h.  A forward is
 *   Q = X Wq^T                       cuBLAS SGEMM
 *   bias, running batch norm         peer_k_bias_norm
 *   S[t,h,half] = Q_half C^T         cuBLAS strided-batched SGEMM, per half
 *   top-k' per (t, h, half)          peer_k_subkey_topk
 *   candidate top-k, gates           peer_k_merge
 *   experts                          peer_k_experts
 * all queued on one stream (brute force replaces the two selections with
 * peer_k_brute_topk); a forward in chunks queues each chunk's retrieval on
 * the layer's side stream and its experts on the caller's (run_chunks).  Every pass is written once, on device pointers
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
#include "backend.h"
#include "optim.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int peer_cuda_device_count(void) {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    cudaGetLastError(); /* "no device" is an answer, not an error to keep */
    return 0;
  }
  return n;
}

static size_t dev_layout(const peer_layer *L, int64_t T, char *base, dev_ws *w) {
  const peer_dims *D = &L->dims;
  size_t t = (size_t)T, thk = t * (size_t)(D->H * D->k), lists = t * (size_t)(D->H * 2 * D->kp);
  const part parts[] = {
      {(void **)&w->q, t * (size_t)D->dq * 4},
      {(void **)&w->S, t * (size_t)(D->H * 2 * D->n) * 4},
      {(void **)&w->q16, t * (size_t)D->dq * 2},
      {(void **)&w->coef, t * (size_t)(D->H * 2 * PEER_K_BF16_COEFS) * 4},
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

peer_status peer_cb_growth_allowed(const cudaStream_t *stream, const char *what, int64_t T,
                                   size_t need, size_t have) {
  enum cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
  if (stream) {
    cudaError_t e = cudaStreamIsCapturing(*stream, &capture);
    if (e != cudaSuccess) return peer_k_cuda_fail(e, what);
  }
  if (capture == cudaStreamCaptureStatusNone) return PEER_OK;
  return peer_fail(PEER_ERR_STATE,
                   "%s: %lld tokens need %zu bytes of scratch, the layer has %zu, and it cannot "
                   "grow while the stream is being captured into a CUDA graph (growing waits for "
                   "the device and allocates): make one call at the largest batch before "
                   "capturing, or register a workspace (peer_cuda_set_workspace)",
                   what, (long long)T, need, have);
}

peer_status peer_cb_device_scratch(peer_layer *L, int64_t T, dev_ws *w,
                                   const cudaStream_t *stream) {
  cuda_state *st = state_of(L);
  size_t need = dev_layout(L, T, NULL, w);
  if (!(st->ws && need <= st->ws_bytes)) {
    if (st->ws && !st->ws_owned)
      return peer_fail(PEER_ERR_INVALID_ARGUMENT,
                       "cuda workspace: %lld tokens need %zu bytes, the registered buffer has %zu",
                       (long long)T, need, st->ws_bytes);
    peer_status s = peer_cb_growth_allowed(stream, "cuda workspace", T, need, st->ws_bytes);
    if (s) return s;
    s = drop_own_scratch(st, "cuda workspace: giving back the smaller scratch");
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
peer_status peer_cb_project_query(peer_layer *L, int64_t T, const float *d_x, float *q,
                                  bool running, cudaStream_t stream) {
  cuda_state *st = state_of(L);
  const peer_dims *D = &L->dims;
  const float one = 1.0f, zero = 0.0f;
  peer_status s = blas_on(st, stream, "forward: cublasSetStream");
  if (s) return s;
  cublasStatus_t bs = cublasSgemm(st->blas, CUBLAS_OP_T, CUBLAS_OP_N, (int)D->dq, (int)T, (int)D->d,
                                  &one, L->slot[PEER_P_QUERY_WEIGHT].data, (int)D->d, d_x,
                                  (int)D->d, &zero, q, (int)D->dq);
  if (bs != CUBLAS_STATUS_SUCCESS) return blas_fail(bs, "forward: query projection");
  const bool norm = running && L->slot[PEER_P_NORM_MEAN].data;
  return peer_k_bias_norm(
      q, T, D->dq, L->slot[PEER_P_QUERY_BIAS].data, norm ? L->slot[PEER_P_NORM_WEIGHT].data : NULL,
      norm ? L->slot[PEER_P_NORM_BIAS].data : NULL, norm ? L->slot[PEER_P_NORM_MEAN].data : NULL,
      norm ? L->slot[PEER_P_NORM_VAR].data : NULL, stream);
}

/* ------------------------------------------------------------ bf16 scores */

bool peer_cb_bf16_scores(const peer_layer *L) {
  const cuda_state *st = state_of(L);
  return st->keys16 && !st->f32_scores;
}

peer_status peer_cb_set_f32_scores(peer_layer *L, bool f32) {
  if (!L || L->opt.backend != PEER_BACKEND_CUDA)
    return peer_fail(PEER_ERR_INVALID_ARGUMENT, "set_f32_scores: not a CUDA layer");
  state_of(L)->f32_scores = f32;
  return PEER_OK;
}

peer_status peer_cb_retrieval_stats(const peer_layer *L, peer_retrieval_stats *out) {
  if (!L || !out || L->opt.backend != PEER_BACKEND_CUDA)
    return peer_fail(PEER_ERR_INVALID_ARGUMENT, "retrieval_stats: not a CUDA layer");
  const cuda_state *st = state_of(L);
  unsigned long long fb = 0;
  peer_status s = device_idle("retrieval_stats");
  if (!s && st->fallbacks) {
    cudaError_t e = cudaMemcpy(&fb, st->fallbacks, sizeof fb, cudaMemcpyDeviceToHost);
    if (e != cudaSuccess) s = peer_k_cuda_fail(e, "retrieval_stats");
  }
  out->fallback = (int64_t)fb;
  out->bf16 = st->bf16_rows - (int64_t)fb;
  return s;
}

/* The bf16 copy of the keys, remade when a call that may write the keys
 * has entered the layer since (keys_gen), for every call while the keys
 * are exposed (peer_layer_param: the caller may write them at any time),
 * and for every call whose stream (`caller`: the caller's, which a chunked
 * forward forks from) is being captured into a graph (each launch of the
 * graph must refresh it: it may follow an optimizer step or a load), but
 * not again within a chunked forward (keys16_held).  Queued on `stream`. */
static peer_status keys16_fresh(peer_layer *L, cudaStream_t stream, cudaStream_t caller) {
  cuda_state *st = state_of(L);
  if (st->keys16_held) return PEER_OK;
  enum cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
  cudaError_t e = cudaStreamIsCapturing(caller, &capture);
  if (e != cudaSuccess) return peer_k_cuda_fail(e, "forward: cudaStreamIsCapturing");
  if (capture == cudaStreamCaptureStatusNone && st->keys16_made &&
      st->keys16_gen == L->keys_gen && !L->keys_exposed)
    return PEER_OK;
  const peer_dims *D = &L->dims;
  peer_status s = peer_k_keys16(L->slot[PEER_P_KEYS].data, D->G * 2 * D->n, D->half, st->keys16,
                                st->norms16, stream);
  if (s) return s;
  st->keys16_made = true;
  st->keys16_gen = L->keys_gen;
  return PEER_OK;
}

/* The first pass's scores S [T, H, 2, n] on tensor cores: bf16 queries and
 * keys, f32 accumulation and output (cuBLAS's default math mode for this
 * product: its pedantic mode, the layer's setting for the f32 products,
 * may keep it off the tensor cores). */
static peer_status bf16_scores(peer_layer *L, int64_t T, const float *q, const dev_ws *w,
                               cudaStream_t stream) {
  cuda_state *st = state_of(L);
  const peer_dims *D = &L->dims;
  const float one = 1.0f, zero = 0.0f;
  peer_status s;
  if ((s = keys16_fresh(L, stream, stream)) ||
      (s = peer_k_query16(q, T, D->H, D->dk, D->half, peer_k_bf16_gamma(D->half), w->q16, w->coef,
                          stream)))
    return s;
  cublasStatus_t bs = cublasSetMathMode(st->blas, CUBLAS_DEFAULT_MATH);
  const long long key_stride = L->cfg.shared_keys ? 0 : 2 * D->n * D->half;
  for (int p = 0; p < 2 && bs == CUBLAS_STATUS_SUCCESS; p++)
    bs = cublasGemmStridedBatchedEx(
        st->blas, CUBLAS_OP_T, CUBLAS_OP_N, (int)D->n, (int)T, (int)D->half, &one,
        st->keys16 + p * D->n * D->half, CUDA_R_16BF, (int)D->half, key_stride,
        w->q16 + p * D->half, CUDA_R_16BF, (int)D->dq, (long long)D->dk, &zero, w->S + p * D->n,
        CUDA_R_32F, (int)(2 * D->H * D->n), 2 * D->n, (int)D->H, CUBLAS_COMPUTE_32F,
        CUBLAS_GEMM_DEFAULT);
  cublasStatus_t ms = cublasSetMathMode(st->blas, CUBLAS_PEDANTIC_MATH);
  if (bs != CUBLAS_STATUS_SUCCESS) return blas_fail(bs, "forward: bf16 sub-key scores");
  return ms == CUBLAS_STATUS_SUCCESS ? PEER_OK : blas_fail(ms, "forward: cublasSetMathMode");
}

/* The bf16 first pass's buffers, where the layer is eligible (d_key/2 a
 * multiple of 8: tensor-core operands of whole 16-byte rows, and the
 * re-score's 16-byte loads; its shared memory within the limit). */
static peer_status open_bf16(const peer_layer *L, cuda_state *st) {
  const peer_dims *D = &L->dims;
  if (D->half % 8 || peer_k_topk_bf16_warp_smem(D->kp, D->half) > PEER_K_SMEM_MAX) return PEER_OK;
  const size_t rows = (size_t)(D->G * 2 * D->n);
  cudaError_t e;
  if ((e = cudaMalloc((void **)&st->keys16, rows * (size_t)D->half * 2)) != cudaSuccess)
    st->keys16 = NULL;
  else if ((e = cudaMalloc((void **)&st->norms16, rows * 3 * sizeof(float))) != cudaSuccess)
    st->norms16 = NULL;
  else if ((e = cudaMalloc((void **)&st->fallbacks, sizeof *st->fallbacks)) != cudaSuccess)
    st->fallbacks = NULL;
  else
    e = cudaMemset(st->fallbacks, 0, sizeof *st->fallbacks);
  return e == cudaSuccess ? PEER_OK : peer_k_cuda_fail(e, "backend cuda: bf16 copy of the keys");
}

/* From the final queries q [T, dq] to ids, scores and gates [T, H, k]: the
 * sub-key scores, then the product-key search (top-k' per half, exact merge)
 * or, with brute, the top-k of all n*n sums.  A non-finite score lowers
 * *bad (a record, see REC_SCORE). */
peer_status peer_cb_search(peer_layer *L, int64_t T, const float *q, int64_t *ids, float *scores,
                           float *gates, bool brute, unsigned long long *bad, cudaStream_t stream,
                           const dev_ws *w) {
  cuda_state *st = state_of(L);
  const peer_dims *D = &L->dims;
  const float one = 1.0f, zero = 0.0f;
  cublasStatus_t bs;
  peer_status s = PEER_OK;
  /* Per half p, one batch entry per head h:
   *   S[((t*H + h)*2 + p)*n + a] = sum_j q[t*dq + h*dk + p*half + j] * C_g,p[a, j]
   * with C_g,p = keys + ((g*2 + p)*n)*half and g = h, or 0 with shared keys. */
  const float *keys = L->slot[PEER_P_KEYS].data;
  long long key_stride = L->cfg.shared_keys ? 0 : 2 * D->n * D->half;
  const bool bf16 = peer_cb_bf16_scores(L);
  if (bf16 && brute) {
    s = peer_k_exact_scores(q, keys, T, D->H, D->dk, D->n, L->cfg.shared_keys, w->S, stream);
  } else if (bf16) {
    s = bf16_scores(L, T, q, w, stream);
  } else {
    for (int p = 0; p < 2; p++) {
      bs = cublasSgemmStridedBatched(st->blas, CUBLAS_OP_T, CUBLAS_OP_N, (int)D->n, (int)T,
                                     (int)D->half, &one, keys + p * D->n * D->half, (int)D->half,
                                     key_stride, q + p * D->half, (int)D->dq, (long long)D->dk,
                                     &zero, w->S + p * D->n, (int)(2 * D->H * D->n), 2 * D->n,
                                     (int)D->H);
      if (bs != CUBLAS_STATUS_SUCCESS) return blas_fail(bs, "forward: sub-key scores");
    }
  }
  if (s) return s;
  if (brute)
    return peer_k_brute_topk(w->S, T * D->H, D->n, D->k, (int)L->cfg.gate, scores, ids, gates, bad,
                             stream);
  if (bf16) {
    st->bf16_rows += T * D->H * 2;
    s = peer_k_subkey_topk_bf16(w->S, q, keys, st->norms16, w->coef, T, D->H, D->dk, D->n, D->kp,
                                L->cfg.shared_keys, w->list_s, w->list_id, bad, st->fallbacks,
                                stream);
  } else {
    s = peer_k_subkey_topk(w->S, T * D->H * 2, D->n, D->kp, w->list_s, w->list_id, bad, stream);
  }
  if (s) return s;
  return peer_k_merge(w->list_s, w->list_id, T * D->H, D->kp, D->k, D->n, (int)L->cfg.gate, scores,
                      ids, gates, bad, stream);
}

static peer_status run_retrieval(peer_layer *L, int64_t T, const float *d_x, int64_t *ids,
                                 float *scores, float *gates, bool brute, cudaStream_t stream,
                                 const dev_ws *w) {
  peer_status s = peer_cb_project_query(L, T, d_x, w->q, true, stream);
  if (s) return s;
  return peer_cb_search(L, T, w->q, ids, scores, gates, brute, state_of(L)->d_bad + REC_SCORE,
                        stream, w);
}

/* Retrieval on device pointers (scores, gates may be NULL). */
static peer_status dev_retrieve(peer_layer *L, int64_t T, const float *d_x, int64_t *ids,
                                float *scores, float *gates, bool brute, cudaStream_t stream) {
  peer_status s;
  if (brute && (s = peer_k_brute_supported(L->dims.n, L->dims.k))) return s;
  dev_ws w;
  if ((s = peer_cb_device_scratch(L, T, &w, &stream))) return s;
  return run_retrieval(L, T, d_x, ids, scores ? scores : w.scores, gates ? gates : w.gates, brute,
                       stream, &w);
}

/* Chunks of a batch of T tokens: the layer's setting, or one per 1024
 * tokens up to 8 (bench/cuda_model.py --chunks: the fill and drain of the
 * pipeline against more launches and re-read weights), never more than T. */
static int64_t chunk_count(const cuda_state *st, int64_t T) {
  int64_t c = st->chunks ? st->chunks : T / 1024;
  if (!st->chunks && c > 8) c = 8;
  if (c > T) c = T;
  return c < 1 ? 1 : c;
}

static peer_status record_wait(cudaEvent_t ev, cudaStream_t from, cudaStream_t to) {
  cudaError_t e = cudaEventRecord(ev, from);
  if (e == cudaSuccess) e = cudaStreamWaitEvent(to, ev, 0);
  return e == cudaSuccess ? PEER_OK : peer_k_cuda_fail(e, "forward: stream order");
}

/* The experts of tokens [t0, t1) of the batch (ids and gates per token). */
static peer_status chunk_experts(peer_layer *L, int64_t t0, int64_t t1, const float *d_x,
                                 float *d_y, const int64_t *ids, const float *gates,
                                 cudaStream_t stream) {
  const peer_dims *D = &L->dims;
  const int64_t at = t0 * D->d, hk = D->H * D->k;
  return peer_k_experts(d_x + at, d_y + at, L->slot[PEER_P_EXPERTS_DOWN].data,
                        L->slot[PEER_P_EXPERTS_UP].data, L->cfg.weight_dtype == PEER_BF16,
                        ids + t0 * hk, gates + t0 * hk, NULL, t1 - t0, D->d, hk,
                        (int)L->cfg.activation, stream);
}

/* The forward in chunks: chunk c's retrieval on the layer's side stream
 * (after the caller's earlier work: ev_fork), its experts on the caller's
 * stream after it (ev_chunk[c]), so chunk c+1's retrieval may run beside
 * chunk c's experts.  Every chunk reuses q, S and the lists of the scratch
 * (the side stream runs the chunks in order) and writes its own rows of
 * ids, scores and gates, which the caller's stream reads.  After a failure
 * the caller's stream still waits for what the side stream queued. */
static peer_status run_chunks(peer_layer *L, int64_t T, int64_t C, const float *d_x, float *d_y,
                              int64_t *ids, float *gates, cudaStream_t stream, const dev_ws *w) {
  cuda_state *st = state_of(L);
  const int64_t hk = L->dims.H * L->dims.k;
  peer_status s = record_wait(st->ev_fork, stream, st->side);
  if (!s && peer_cb_bf16_scores(L) && !(s = keys16_fresh(L, st->side, stream)))
    st->keys16_held = true;
  for (int64_t c = 0; c < C && !s; c++) {
    const int64_t t0 = T * c / C, t1 = T * (c + 1) / C;
    s = run_retrieval(L, t1 - t0, d_x + t0 * L->dims.d, ids + t0 * hk, w->scores + t0 * hk,
                      gates + t0 * hk, false, st->side, w);
    peer_status j = record_wait(st->ev_chunk[c], st->side, stream);
    if (!s) s = j;
    if (!s) s = chunk_experts(L, t0, t1, d_x, d_y, ids, gates, stream);
  }
  st->keys16_held = false;
  return s;
}

static peer_status run_forward(peer_layer *L, int64_t T, const float *d_x, float *d_y,
                               int64_t *d_indices, float *d_gates, cudaStream_t stream) {
  dev_ws w;
  peer_status s = peer_cb_device_scratch(L, T, &w, &stream);
  if (s) return s;
  int64_t *ids = d_indices ? d_indices : w.ids;
  float *gates = d_gates ? d_gates : w.gates;
  const int64_t C = chunk_count(state_of(L), T);
  if (C > 1) return run_chunks(L, T, C, d_x, d_y, ids, gates, stream, &w);
  if ((s = run_retrieval(L, T, d_x, ids, w.scores, gates, false, stream, &w))) return s;
  return chunk_experts(L, 0, T, d_x, d_y, ids, gates, stream);
}

/* Read the records behind the stream's work, then report and clear them: a
 * non-finite x or dy row first (the cause; the scores of such a row are
 * non-finite too), then a score.  Read and clear go on `stream` itself: the
 * read waits for the work queued before it and for nothing else, and the
 * clear comes before the next call's kernels on it.  The clear is waited
 * for too (only when there was something to clear), so that it is done
 * when this returns, whichever stream the next call uses. */
peer_status peer_cb_check_stream(peer_layer *L, cudaStream_t stream) {
  cuda_state *st = state_of(L);
  const peer_dims *D = &L->dims;
  unsigned long long rec[REC_COUNT];
  peer_status s;
  cudaError_t e = cudaMemcpyAsync(rec, st->d_bad, sizeof rec, cudaMemcpyDeviceToHost, stream);
  if (e != cudaSuccess) return peer_k_cuda_fail(e, "cuda check: stream");
  if ((s = wait_for(stream, "cuda check: stream"))) return s;
  if (rec[REC_SCORE] == PEER_K_CLEAR && rec[REC_X] == PEER_K_CLEAR && rec[REC_DY] == PEER_K_CLEAR &&
      rec[REC_GRAD] == PEER_K_CLEAR)
    return PEER_OK;
  if ((e = cudaMemsetAsync(st->d_bad, 0xff, sizeof rec, stream)) != cudaSuccess)
    return peer_k_cuda_fail(e, "cuda check: clearing the non-finite records");
  if ((s = wait_for(stream, "cuda check: clearing the non-finite records"))) return s;
  if (rec[REC_X] != PEER_K_CLEAR)
    return peer_fail(PEER_ERR_NONFINITE, "token %llu: x holds NaN or infinity", rec[REC_X]);
  if (rec[REC_DY] != PEER_K_CLEAR)
    return peer_fail(PEER_ERR_NONFINITE, "token %llu: dy holds NaN or infinity", rec[REC_DY]);
  if (rec[REC_GRAD] != PEER_K_CLEAR) {
    const int slot = (int)(rec[REC_GRAD] >> PEER_K_GRAD_SLOT_SHIFT);
    const long long at = (long long)(rec[REC_GRAD] & ((1ull << PEER_K_GRAD_SLOT_SHIFT) - 1));
    char where[64];
    const int64_t w = L->slot[slot].shape[1]; /* a shard's rows are its columns */
    if (slot == PEER_P_EXPERTS_DOWN || slot == PEER_P_EXPERTS_UP)
      snprintf(where, sizeof where, "of expert %lld, element %lld", at / w,
               at % w + (long long)L->expert_col0);
    else
      snprintf(where, sizeof where, "element %lld", at);
    return peer_fail(PEER_ERR_NONFINITE,
                     "cuda_optimizer_step: grads.%s %s is not finite; that step was not applied "
                     "(parameters and optimizer state unchanged; its step count advanced)",
                     peer_grad_name(slot), where);
  }
  const unsigned long long bad = rec[REC_SCORE];
  return peer_fail(PEER_ERR_NONFINITE,
                   "token %lld, head %d: non-finite sub-key or candidate score (NaN or infinity "
                   "in x, query weights, norm or keys)",
                   (long long)(bad / (unsigned long long)D->H),
                   (int)(bad % (unsigned long long)D->H));
}

/* ------------------------------------------------------------ public API */

peer_status peer_cb_enter(const peer_layer *L, int64_t T, const void *d_x, const char *what) {
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
  if (!L || !bytes)
    return peer_fail(PEER_ERR_INVALID_ARGUMENT, "cuda_workspace_size: NULL argument");
  if (L->opt.backend != PEER_BACKEND_CUDA)
    return peer_fail(PEER_ERR_INVALID_ARGUMENT, "cuda_workspace_size: not a CUDA layer");
  if (T < 0)
    return peer_fail(PEER_ERR_INVALID_ARGUMENT, "n_tokens: %lld is negative", (long long)T);
  dev_ws w;
  *bytes = dev_layout(L, T, NULL, &w);
  return PEER_OK;
}

static peer_status set_workspace_call(peer_layer *L, void *d_buffer, size_t bytes) {
  if (!L) return peer_fail(PEER_ERR_INVALID_ARGUMENT, "cuda_set_workspace: NULL layer");
  if (L->opt.backend != PEER_BACKEND_CUDA)
    return peer_fail(PEER_ERR_INVALID_ARGUMENT, "cuda_set_workspace: not a CUDA layer");
  if (d_buffer && (uintptr_t)d_buffer % 256)
    return peer_fail(PEER_ERR_INVALID_ARGUMENT,
                     "cuda_set_workspace: buffer is not 256-byte aligned");
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

peer_status peer_cuda_set_workspace(peer_layer *L, void *d_buffer, size_t bytes) {
  peer_status s = peer_cb_busy(L, "cuda_set_workspace");
  if (s) return s;
  s = set_workspace_call(L, d_buffer, bytes);
  peer_cb_idle(L);
  return s;
}

peer_status peer_cuda_set_chunks(peer_layer *L, int chunks) {
  peer_status s = peer_cb_busy(L, "cuda_set_chunks");
  if (s) return s;
  if (!L)
    s = peer_fail(PEER_ERR_INVALID_ARGUMENT, "cuda_set_chunks: NULL layer");
  else if (L->opt.backend != PEER_BACKEND_CUDA)
    s = peer_fail(PEER_ERR_INVALID_ARGUMENT, "cuda_set_chunks: not a CUDA layer");
  else if (chunks < 0 || chunks > PEER_CUDA_MAX_CHUNKS)
    s = peer_fail(PEER_ERR_INVALID_ARGUMENT, "cuda_set_chunks: %d chunks not in [0, %d]", chunks,
                  PEER_CUDA_MAX_CHUNKS);
  else
    state_of(L)->chunks = chunks;
  peer_cb_idle(L);
  return s;
}

static peer_status forward_call(peer_layer *L, int64_t T, const float *d_x, float *d_y,
                                int64_t *d_indices, float *d_gates, cudaStream_t stream) {
  peer_status s = peer_cb_enter(L, T, d_x, "cuda_forward");
  if (s) return s;
  if (T == 0) return PEER_OK;
  if (!d_y) return peer_fail(PEER_ERR_INVALID_ARGUMENT, "cuda_forward: y is NULL");
  return run_forward(L, T, d_x, d_y, d_indices, d_gates, stream);
}

peer_status peer_cuda_forward(peer_layer *L, int64_t T, const float *d_x, float *d_y,
                              int64_t *d_indices, float *d_gates, cudaStream_t stream) {
  peer_status s = peer_cb_busy(L, "cuda_forward");
  if (s) return s;
  s = forward_call(L, T, d_x, d_y, d_indices, d_gates, stream);
  peer_cb_idle(L);
  return s;
}

static peer_status retrieve_call(peer_layer *L, int64_t T, const float *d_x, int64_t *d_indices,
                                 float *d_scores, float *d_gates, bool brute, cudaStream_t stream) {
  const char *what = brute ? "cuda_retrieve_brute" : "cuda_retrieve";
  peer_status s = peer_cb_enter(L, T, d_x, what);
  if (s) return s;
  /* an empty batch still reports a config brute force cannot run */
  if (T == 0) return brute ? peer_k_brute_supported(L->dims.n, L->dims.k) : PEER_OK;
  if (!d_indices) return peer_fail(PEER_ERR_INVALID_ARGUMENT, "%s: indices is NULL", what);
  return dev_retrieve(L, T, d_x, d_indices, d_scores, d_gates, brute, stream);
}

/* retrieve_call marked busy (peer_cb_busy) */
static peer_status retrieve_entry(peer_layer *L, int64_t T, const float *d_x, int64_t *d_indices,
                                  float *d_scores, float *d_gates, bool brute,
                                  cudaStream_t stream) {
  peer_status s = peer_cb_busy(L, brute ? "cuda_retrieve_brute" : "cuda_retrieve");
  if (s) return s;
  s = retrieve_call(L, T, d_x, d_indices, d_scores, d_gates, brute, stream);
  peer_cb_idle(L);
  return s;
}

peer_status peer_cuda_retrieve(peer_layer *L, int64_t T, const float *d_x, int64_t *d_indices,
                               float *d_scores, float *d_gates, cudaStream_t stream) {
  return retrieve_entry(L, T, d_x, d_indices, d_scores, d_gates, false, stream);
}

peer_status peer_cuda_retrieve_brute(peer_layer *L, int64_t T, const float *d_x, int64_t *d_indices,
                                     float *d_scores, float *d_gates, cudaStream_t stream) {
  return retrieve_entry(L, T, d_x, d_indices, d_scores, d_gates, true, stream);
}

static peer_status check_call(peer_layer *L, cudaStream_t stream) {
  peer_status s = peer_cb_enter(L, 0, NULL, "cuda_check");
  if (s) return s;
  return peer_cb_check_stream(L, stream);
}

peer_status peer_cuda_check(peer_layer *L, cudaStream_t stream) {
  peer_status s = peer_cb_busy(L, "cuda_check");
  if (s) return s;
  s = check_call(L, stream);
  peer_cb_idle(L);
  return s;
}

/* ------------------------------------------------------------ host path */

/* Entry of every host-pointer call (peer.h) on a CUDA layer: enter's checks,
 * then a wait for the whole device.  The layer's own stream is not ordered
 * with the caller's, on which device-pointer calls may still be writing what
 * the host path reads or reuses (a context, the scratch, the non-finite
 * records, the running statistics); the host path is the convenience path
 * and synchronises at its end as well (peer_cuda.h). */
peer_status peer_cb_host_enter(const peer_layer *L, int64_t T, const void *x, const char *what) {
  peer_status s = peer_cb_enter(L, T, x, what);
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

static peer_status cuda_forward(peer_layer *L, int64_t T, const float *x, float *y,
                                int64_t *indices, float *gates, void *host_ws) {
  (void)host_ws;
  peer_status s = peer_cb_host_enter(L, T, x, "forward");
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
  return peer_cb_check_stream(L, stream);
}

static peer_status cuda_retrieve(peer_layer *L, int64_t T, const float *x, int64_t *indices,
                                 float *scores, float *gates, bool brute, void *host_ws) {
  (void)host_ws;
  peer_status s = peer_cb_host_enter(L, T, x, brute ? "retrieve_brute" : "retrieve");
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
  return peer_cb_check_stream(L, stream);
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
  if (peer_k_topk_warp_smem(D->kp) > PEER_K_SMEM_MAX)
    return peer_fail(PEER_ERR_UNSUPPORTED,
                     "backend cuda: subkey_top_k %lld is beyond the top-k' kernel's shared "
                     "memory (at most %lld)",
                     (long long)D->kp, (long long)peer_k_topk_kp_max());
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
  if (st->side) cudaStreamDestroy(st->side);
  if (st->ev_fork) cudaEventDestroy(st->ev_fork);
  for (int c = 0; c < PEER_CUDA_MAX_CHUNKS; c++)
    if (st->ev_chunk[c]) cudaEventDestroy(st->ev_chunk[c]);
  if (st->d_bad) cudaFree(st->d_bad);
  if (st->ws_owned && st->ws) cudaFree(st->ws);
  if (st->io) cudaFree(st->io);
  if (st->blas_ws) cudaFree(st->blas_ws);
  if (st->keys16) cudaFree(st->keys16);
  if (st->norms16) cudaFree(st->norms16);
  if (st->fallbacks) cudaFree(st->fallbacks);
  (void)cudaGetLastError(); /* a teardown reports nothing, and leaves no error behind */
  free(st);
  L->backend_data = NULL;
}

/* The chunked forward's stream and events (handles stay NULL on failure). */
static peer_status open_pipeline(cuda_state *st) {
  cudaError_t e = cudaStreamCreateWithFlags(&st->side, cudaStreamNonBlocking);
  if (e != cudaSuccess) {
    st->side = NULL;
    return peer_k_cuda_fail(e, "backend cuda: cudaStreamCreate");
  }
  cudaEvent_t *ev[PEER_CUDA_MAX_CHUNKS + 1] = {&st->ev_fork};
  for (int c = 0; c < PEER_CUDA_MAX_CHUNKS; c++)
    ev[c + 1] = &st->ev_chunk[c];
  for (int i = 0; i <= PEER_CUDA_MAX_CHUNKS; i++)
    if ((e = cudaEventCreateWithFlags(ev[i], cudaEventDisableTiming)) != cudaSuccess) {
      *ev[i] = NULL;
      return peer_k_cuda_fail(e, "backend cuda: cudaEventCreate");
    }
  return PEER_OK;
}

static peer_status cuda_open(peer_layer *L) {
  peer_status s = check_supported(L);
  if (s) return s;
  int count = peer_cuda_device_count();
  if (count == 0) return peer_fail(PEER_ERR_NO_DEVICE, "backend cuda: no CUDA device is available");
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
  } else if ((s = open_pipeline(st))) {
  } else if ((e = cudaMalloc((void **)&st->d_bad, REC_COUNT * sizeof *st->d_bad)) != cudaSuccess) {
    st->d_bad = NULL;
    s = peer_k_cuda_fail(e, "backend cuda: cudaMalloc");
  } else if ((e = cudaMalloc(&st->blas_ws, BLAS_WORKSPACE)) != cudaSuccess) {
    st->blas_ws = NULL;
    s = peer_k_cuda_fail(e, "backend cuda: cudaMalloc of cuBLAS's workspace");
  } else if ((s = open_bf16(L, st))) {
  } else if ((e = cudaMemset(st->d_bad, 0xff, REC_COUNT * sizeof *st->d_bad)) != cudaSuccess)
    s = peer_k_cuda_fail(e, "backend cuda: cudaMemset");
  else
    s = device_idle("backend cuda: clearing the non-finite records");
  if (s) cuda_close(L);
  return s;
}

const peer_backend_i peer_backend_cuda = {
    .name = "cuda",
    .alloc = cuda_alloc,
    .free = cuda_free,
    .workspace_size = peer_cb_cuda_host_workspace,
    .forward = cuda_forward,
    .retrieve = cuda_retrieve,
    .context_bytes = peer_cb_cuda_context_bytes,
    .forward_train = peer_cb_cuda_forward_train,
    .backward = peer_cb_cuda_backward,
    .open = cuda_open,
    .close = cuda_close,
    .upload = cuda_upload,
    .context_check = peer_cb_cuda_context_check,
    .context_alloc = peer_cb_cuda_context_alloc,
    .context_free = peer_cb_cuda_context_free,
    .optimizer_step = peer_cb_cuda_optimizer_step,
    .download = peer_cb_cuda_download,
};
