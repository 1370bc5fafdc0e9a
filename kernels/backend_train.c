/* backend_train.c: the CUDA backend's training: contexts (device memory of
 * what backward needs, the host path's staging), forward_train and backward
 * on device pointers (peer_cuda.h) and their host-pointer wrappers (peer.h).
 * The passes are listed in backend.c's opening comment. */
#include "backend.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* ------------------------------------------------------------ training */

size_t peer_cb_cuda_host_workspace(const peer_layer *L, int64_t T) {
  (void)L, (void)T;
  return 0; /* device scratch is peer_cuda_workspace_size's */
}

/* A training context's memory (ctx->mem): a host record of two device
 * buffers.  `dev` holds what both paths need (train_mem), peer_cb_cuda_context_bytes
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


static size_t train_layout(const peer_layer *L, int64_t T, size_t temp_bytes, char *base,
                           train_mem *m) {
  const peer_dims *D = &L->dims;
  const size_t t = (size_t)T, dq = (size_t)D->dq, e = t * (size_t)(D->H * D->k);
  const size_t red = peer_k_reduce_scratch_bytes(T, D->dq);
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
      {(void **)&m->red, red},
  };
  m->temp_bytes = temp_bytes, m->red_bytes = red;
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

/* The sorts' scratch for 2E pairs (the sub-key sort, the larger). */
static peer_status sort_temp(const peer_layer *L, int64_t T, size_t *bytes) {
  return peer_k_sort_temp_bytes(2 * T * L->dims.H * L->dims.k, bytes);
}

/* Contexts this backend can train: the backward sorts 2*T*H*k (key, entry)
 * pairs with CUB's int item count.  Also asks CUB for its scratch on the
 * layer's device, so that peer_cb_cuda_context_bytes, which the core calls next,
 * gets the same answer. */
peer_status peer_cb_cuda_context_check(const peer_layer *L, int64_t T, const char *what) {
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

size_t peer_cb_cuda_context_bytes(const peer_layer *L, int64_t T) {
  size_t temp = 0;
  /* cuda_context_check just had the same answer; should CUB differ now,
   * context_mem refuses the context at its first use */
  if (sort_temp(L, T, &temp)) peer_clear_error();
  train_mem m;
  return train_layout(L, T, temp, NULL, &m);
}

void *peer_cb_cuda_context_alloc(const peer_layer *L, size_t bytes) {
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

void peer_cb_cuda_context_free(void *mem, size_t bytes) {
  cuda_context *c = mem;
  (void)bytes;
  if (!c) return;
  free_on(c->device, c->dev);
  free_on(c->device, c->stage);
  free(c);
}

/* The context's layout; fails if CUB now wants more scratch than it has. */
peer_status peer_cb_context_mem(const peer_layer *L, const peer_context *c, train_mem *m) {
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

/* The training forward's queries and retrieval, queued on `stream`:
 * this batch's records cleared, x checked, queries with batch statistics
 * (kept in the context), retrieval into the context's ids, scores and
 * gates.  T is within the context (peer_train_begin), whose size
 * cuda_context_check accepted, so the backward's sorts fit CUB's counts. */
peer_status peer_cb_train_queries(peer_layer *L, int64_t T, const float *d_x, const train_mem *m,
                                  cudaStream_t stream) {
  const peer_dims *D = &L->dims;
  dev_ws w;
  peer_status s = peer_cb_device_scratch(L, T, &w, &stream);
  if (s) return s;
  cudaError_t e = cudaMemsetAsync(m->rec, 0xff, REC_BATCH * sizeof *m->rec, stream);
  if (e != cudaSuccess) return peer_k_cuda_fail(e, "forward_train: cudaMemsetAsync");
  if ((s = peer_k_first_nonfinite_row(d_x, T, D->d, m->rec + REC_X, stream)) ||
      (s = peer_cb_project_query(L, T, d_x, m->q, false, stream)))
    return s;
  if (L->cfg.query_norm == PEER_NORM_BATCHNORM &&
      (s = peer_k_batch_norm_train(m->q, m->qhat, m->mean, m->invstd, T, D->dq,
                                   L->slot[PEER_P_NORM_WEIGHT].data,
                                   L->slot[PEER_P_NORM_BIAS].data, m->red, m->red_bytes, stream)))
    return s;
  return peer_cb_search(L, T, m->q, m->ids, m->scores, m->gates, false, m->rec + REC_SCORE, stream,
                        &w);
}

/* After the expert phase: the running statistics, which the device leaves
 * alone when this batch met a non-finite x or score (as the CPU, which
 * fails before updating them); then this batch's records join the layer's.
 * The backward will read x from d_x. */
peer_status peer_cb_train_finish(peer_layer *L, peer_context *ctx, int64_t T, const float *d_x,
                                 const train_mem *m, cudaStream_t stream) {
  peer_status s;
  if (L->cfg.query_norm == PEER_NORM_BATCHNORM &&
      (s = peer_k_running_update(L->slot[PEER_P_NORM_MEAN].data, L->slot[PEER_P_NORM_VAR].data,
                                 m->mean, m->invstd, T, L->dims.dq, L->norm_momentum, m->rec,
                                 REC_BATCH, stream)))
    return s;
  if ((s = peer_k_record_fold(state_of(L)->d_bad, m->rec, REC_BATCH, stream))) return s;
  ctx->x_dev = d_x;
  return PEER_OK;
}

/* The training forward on device pointers, queued on `stream`: queries and
 * retrieval, the experts keeping z, the running statistics and records. */
static peer_status dev_forward_train(peer_layer *L, peer_context *ctx, int64_t T, const float *d_x,
                                     float *d_y, cudaStream_t stream) {
  const peer_dims *D = &L->dims;
  train_mem m;
  peer_status s;
  if ((s = peer_cb_context_mem(L, ctx, &m)) || (s = peer_cb_train_queries(L, T, d_x, &m, stream)) ||
      (s = peer_k_experts(d_x, d_y, L->slot[PEER_P_EXPERTS_DOWN].data,
                          L->slot[PEER_P_EXPERTS_UP].data, L->cfg.weight_dtype == PEER_BF16, m.ids,
                          m.gates, m.z, T, D->d, D->H * D->k, (int)L->cfg.activation, stream)))
    return s;
  return peer_cb_train_finish(L, ctx, T, d_x, &m, stream);
}

/* The expert gradient rows of a backward (g's expert triple; nothing when
 * it is NULL, and *n_rows = 0), from the context's cdown and cup: the w
 * columns of x and dy that start at x, dy (rows ld apart). */
peer_status peer_cb_expert_rows(const peer_layer *L, int64_t T, const train_mem *m, const float *x,
                                const float *dy, int64_t ld, int64_t w, const peer_grads *g,
                                int64_t *n_rows, cudaStream_t stream) {
  const peer_dims *D = &L->dims;
  const int64_t hk = D->H * D->k, E = T * hk;
  if (!g->experts_down) {
    cudaError_t e = n_rows ? cudaMemsetAsync(n_rows, 0, sizeof *n_rows, stream) : cudaSuccess;
    return e == cudaSuccess ? PEER_OK : peer_k_cuda_fail(e, "backward: cudaMemsetAsync");
  }
  /* The distinct rows of the sort: at most its entries, and at most the
   * rows there are (the kernel's grid is sized by this bound). */
  const int64_t expert_rows = E < D->N ? E : D->N;
  peer_status s;
  if ((s = peer_k_expert_sort_keys(m->ids, E, m->key, m->val, stream)) ||
      (s = peer_k_sorted_runs(m->key, m->val, m->key2, m->val2, m->starts, m->runs, E,
                              (uint32_t)(D->N - 1), m->temp, m->temp_bytes, stream)))
    return s;
  return peer_k_expert_grads(m->key2, m->val2, m->starts, m->runs, expert_rows, m->cdown, m->cup, x,
                             dy, ld, w, hk, g->experts_dense ? 1 : 0, g->experts_down,
                             g->experts_up, g->expert_rows, n_rows, stream);
}

/* The replicated part of a backward, from the context's score gradients
 * ds: the query gradient, the sub-key, norm, bias and projection gradients
 * g asks for, and dx += dq Wq when d_dx (its expert part already there). */
peer_status peer_cb_query_backward(peer_layer *L, int64_t T, const train_mem *m, const float *x,
                                   float *d_dx, const peer_grads *g, cudaStream_t stream) {
  cuda_state *st = state_of(L);
  const peer_dims *D = &L->dims;
  const int64_t E = T * D->H * D->k;
  const int64_t key_rows = 2 * E < D->G * 2 * D->n ? 2 * E : D->G * 2 * D->n;
  const float *keys = L->slot[PEER_P_KEYS].data;
  peer_status s;
  cudaError_t e;
  if ((s = peer_k_query_grad(m->ids, m->ds, keys, T, D->H, D->k, D->n, D->dk,
                             L->cfg.shared_keys ? 1 : 0, m->dq, stream)))
    return s;
  if (g->keys) {
    if ((e = cudaMemsetAsync(g->keys, 0, L->slot[PEER_P_KEYS].nbytes, stream)) != cudaSuccess)
      return peer_k_cuda_fail(e, "backward: cudaMemsetAsync");
    if ((s = peer_k_subkey_sort_keys(m->ids, T, D->H, D->k, D->n, L->cfg.shared_keys ? 1 : 0,
                                     m->key, m->val, stream)) ||
        (s = peer_k_sorted_runs(m->key, m->val, m->key2, m->val2, m->starts, m->runs, 2 * E,
                                (uint32_t)(D->G * 2 * D->n - 1), m->temp, m->temp_bytes, stream)) ||
        (s = peer_k_keys_grad(m->key2, m->val2, m->starts, m->runs, key_rows, m->ds, m->q, D->H,
                              D->k, D->dk, g->keys, stream)))
      return s;
  }
  if (L->cfg.query_norm == PEER_NORM_BATCHNORM &&
      (s = peer_k_norm_backward(m->dq, m->qhat, m->invstd, L->slot[PEER_P_NORM_WEIGHT].data, T,
                                D->dq, g->norm_weight, g->norm_bias, m->red, m->red_bytes,
                                stream)))
    return s;
  if (g->query_bias &&
      (s = peer_k_column_sums(m->dq, T, D->dq, g->query_bias, m->red, m->red_bytes, stream)))
    return s;
  const float one = 1.0f, zero = 0.0f;
  if ((s = blas_on(st, stream, "backward: cublasSetStream"))) return s;
  cublasStatus_t bs;
  /* dWq [dq, d] row-major = dq^T X: column-major dWq' [d, dq] = X' dq'^T */
  if (g->query_weight &&
      (bs = cublasSgemm(st->blas, CUBLAS_OP_N, CUBLAS_OP_T, (int)D->d, (int)D->dq, (int)T, &one, x,
                        (int)D->d, m->dq, (int)D->dq, &zero, g->query_weight, (int)D->d)) !=
          CUBLAS_STATUS_SUCCESS)
    return blas_fail(bs, "backward: query weight gradient");
  /* dx [T, d] += dq Wq: column-major dx' [d, T] += Wq' dq' */
  if (d_dx && (bs = cublasSgemm(st->blas, CUBLAS_OP_N, CUBLAS_OP_N, (int)D->d, (int)T, (int)D->dq,
                                &one, L->slot[PEER_P_QUERY_WEIGHT].data, (int)D->d, m->dq,
                                (int)D->dq, &one, d_dx, (int)D->d)) != CUBLAS_STATUS_SUCCESS)
    return blas_fail(bs, "backward: dx through the query projection");
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
  const peer_dims *D = &L->dims;
  const int64_t T = ctx->n_tokens, hk = D->H * D->k;
  const float *x = ctx->x_dev;
  train_mem m;
  peer_status s = peer_cb_context_mem(L, ctx, &m);
  if (s ||
      (s = peer_k_first_nonfinite_row(d_dy, T, D->d, state_of(L)->d_bad + REC_DY, stream)))
    return s;
  peer_k_expert_args a = {0};
  a.in = d_dy, a.out = d_dx;
  a.first = L->slot[PEER_P_EXPERTS_UP].data, a.second = L->slot[PEER_P_EXPERTS_DOWN].data;
  a.ids = m.ids, a.gates = m.gates, a.z = m.z, a.scores = m.scores;
  a.ds = m.ds, a.cup = m.cup, a.cdown = m.cdown;
  a.T = T, a.d = D->d, a.hk = (int)hk, a.k = (int)D->k, a.act = (int)L->cfg.activation,
  a.gate = (int)L->cfg.gate;
  if ((s = peer_k_experts_backward(&a, L->cfg.weight_dtype == PEER_BF16, stream)) ||
      (s = peer_cb_expert_rows(L, T, &m, x, d_dy, D->d, D->d, g, n_rows, stream)))
    return s;
  return peer_cb_query_backward(L, T, &m, x, d_dx, g, stream);
}

/* An empty batch's backward: dense gradients zeroed (as peer_backward
 * does), no expert rows. */
peer_status peer_cb_backward_empty(const peer_layer *L, const peer_grads *g, int64_t *n_rows,
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

static peer_status forward_train_call(peer_layer *L, peer_context *ctx, int64_t T, const float *d_x,
                                      float *d_y, cudaStream_t stream) {
  const char *what = "cuda_forward_train";
  /* peer_train_begin first: it marks ctx not ready, so that no argument
   * error leaves a backward to use the previous batch */
  peer_status s = peer_train_begin(L, ctx, T, d_x, d_y, what);
  if (s || (s = peer_cb_enter(L, T, d_x, what))) return s;
  if (T > 0 && (s = dev_forward_train(L, ctx, T, d_x, d_y, stream))) return s;
  peer_train_end(ctx, T, d_x);
  return PEER_OK;
}

peer_status peer_cuda_forward_train(peer_layer *L, peer_context *ctx, int64_t T, const float *d_x,
                                    float *d_y, cudaStream_t stream) {
  peer_status s = peer_cb_busy(L, "cuda_forward_train");
  if (s) return s;
  s = forward_train_call(L, ctx, T, d_x, d_y, stream);
  peer_cb_idle(L);
  return s;
}

static peer_status backward_call(peer_layer *L, peer_context *ctx, const float *d_dy, float *d_dx,
                                 peer_grads *d_grads, int64_t *d_n_expert_rows,
                                 cudaStream_t stream) {
  const char *what = "cuda_backward";
  peer_status s = peer_cb_enter(L, 0, NULL, what);
  if (s || (s = peer_backward_check(L, ctx, d_dy, d_grads, what))) return s;
  if (ctx->n_tokens == 0)
    s = peer_cb_backward_empty(L, d_grads, d_n_expert_rows, stream);
  else
    s = dev_backward(L, ctx, d_dy, d_dx, d_grads, d_n_expert_rows, stream);
  if (s) return s;
  ctx->ready = false; /* one backward per training forward, as peer_backward */
  return PEER_OK;
}

peer_status peer_cuda_backward(peer_layer *L, peer_context *ctx, const float *d_dy, float *d_dx,
                               peer_grads *d_grads, int64_t *d_n_expert_rows, cudaStream_t stream) {
  peer_status s = peer_cb_busy(L, "cuda_backward");
  if (s) return s;
  s = backward_call(L, ctx, d_dy, d_dx, d_grads, d_n_expert_rows, stream);
  peer_cb_idle(L);
  return s;
}

/* ------------------------------------------------------------ training, host path */

peer_status peer_cb_cuda_forward_train(peer_layer *L, peer_context *ctx, int64_t T, const float *x,
                                       float *y, void *host_ws) {
  (void)host_ws;
  peer_status s = peer_cb_host_enter(L, T, x, "forward_train");
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
  return peer_cb_check_stream(L, stream);
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
peer_status peer_cb_cuda_backward(peer_layer *L, peer_context *ctx, const float *dy, float *dx,
                                  peer_grads *g) {
  const peer_dims *D = &L->dims;
  const int64_t T = ctx->n_tokens;
  peer_status s = peer_cb_host_enter(L, T, dy, "backward");
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
  if ((s = peer_cb_check_stream(L, stream))) return s;
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
