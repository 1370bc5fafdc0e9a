/* backend_shard.c: the CUDA sharded layer of peer_cuda.h ("sharding"): a
 * CUDA layer whose expert tables hold this rank's columns
 * (peer_layer_create_cols), the config agreement at creation over the
 * caller's device communicator, the forward:
 *   retrieval (replicated)          the layer's own passes (backend.c)
 *   z = u_i[cols] . x[cols]         peer_k_shard_dots
 *   z summed over the ranks         the communicator's all-reduce, T*H*k floats
 *   y[:, cols] = sum c_i v_i[cols]  peer_k_shard_combine
 *   every rank's y columns          the communicator's all-gather, T*d floats
 *   into y [T, d]                   peer_k_shard_interleave
 * the training forward (the same, with backend_train.c's queries and batch
 * statistics, z kept in the context), and the backward:
 *   vd = v_i[cols] . dy[cols]       peer_k_shard_dots on the up table
 *   vd summed over the ranks        the all-reduce, T*H*k floats
 *   ds, cup, cdown (replicated)     peer_k_shard_coefficients
 *   dx[:, cols] = sum cdown u_i     peer_k_shard_combine, all-gathered as y
 *   expert rows of the rank's cols  backend_train.c's sorted rows
 *   query, key, norm grads, dq Wq   backend_train.c's (replicated: no traffic)
 * all queued on the caller's stream.  With one rank the combine writes y
 * (dx) and nothing is gathered.  The optimizer is the CUDA layer's (its
 * expert rows as wide as the tables), the files shard_file.c's. */
#include "backend.h"
#include "shard.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

struct peer_cuda_shard {
  peer_layer *L; /* full config; expert tables hold columns [col0, col0 + cols) */
  peer_cuda_comm comm;
  int64_t col0, cols;
  void *ws; /* device scratch of the expert phase, grown on demand */
  size_t ws_bytes;
};

/* ------------------------------------------------------------ transport */

static peer_status comm_allreduce(const peer_cuda_shard *S, float *d, int64_t count,
                                  cudaStream_t stream, const char *what) {
  if (count == 0) return PEER_OK;
  int rc = S->comm.allreduce_sum(S->comm.handle, d, count, stream);
  if (rc)
    return peer_fail(PEER_ERR_IO, "%s: the communicator's all-reduce of %lld floats failed (%d)",
                     what, (long long)count, rc);
  return PEER_OK;
}

static peer_status comm_allgather(const peer_cuda_comm *c, const void *send, void *recv,
                                  size_t bytes, cudaStream_t stream, const char *what) {
  int rc = c->allgather(c->handle, send, recv, bytes, stream);
  if (rc)
    return peer_fail(PEER_ERR_IO, "%s: the communicator's all-gather of %zu bytes failed (%d)",
                     what, bytes, rc);
  return PEER_OK;
}

/* ------------------------------------------------------------ creation */

static peer_status local_checks(const peer_config *cfg, const peer_options *opt, int world) {
  peer_status st = peer_config_validate(cfg);
  if (st) return st;
  if (!opt || opt->backend != PEER_BACKEND_CUDA)
    return peer_fail(PEER_ERR_INVALID_ARGUMENT,
                     "cuda_shard_create: options.backend must be PEER_BACKEND_CUDA");
  if (cfg->d_model % world)
    return peer_fail(PEER_ERR_CONFIG,
                     "cuda_shard_create: d_model %lld is not divisible by the world size %d",
                     (long long)cfg->d_model, world);
  return PEER_OK;
}

/* The agreement's all-gather through the device communicator (on the
 * legacy stream, waited for). */
static peer_status exchange(const void *comm, const void *mine, void *all, size_t one) {
  const peer_cuda_comm *c = comm;
  const size_t bytes = one * (size_t)(c->world + 1);
  const char *what = "cuda_shard_create: agreement";
  char *d = NULL;
  cudaError_t e = cudaMalloc((void **)&d, bytes);
  if (e != cudaSuccess) return peer_k_cuda_fail(e, what);
  peer_status st = PEER_OK;
  if ((e = cudaMemcpy(d, mine, one, cudaMemcpyHostToDevice)) != cudaSuccess)
    st = peer_k_cuda_fail(e, what);
  else if (!(st = comm_allgather(c, d, d + one, one, 0, "cuda_shard_create")) &&
           (e = cudaMemcpy(all, d + one, one * (size_t)c->world, cudaMemcpyDeviceToHost)) !=
               cudaSuccess)
    st = peer_k_cuda_fail(e, what);
  cudaFree(d);
  (void)cudaGetLastError();
  return st;
}

peer_status peer_cuda_shard_create(peer_cuda_shard **out, const peer_config *cfg,
                                   const peer_options *opt, const peer_cuda_comm *comm) {
  if (!out || !cfg || !comm)
    return peer_fail(PEER_ERR_INVALID_ARGUMENT, "cuda_shard_create: NULL argument");
  *out = NULL;
  peer_status st = peer_shard_check_comm(
      "cuda_shard_create", comm->allreduce_sum && comm->allgather, comm->rank, comm->world);
  if (st) return st;
  /* The agreement needs this rank's device; without it the rank cannot
   * take part (the others then wait in the communicator). */
  const int count = peer_cuda_device_count(), device = opt ? opt->device : 0;
  if (device < 0 || device >= count)
    return peer_fail(PEER_ERR_NO_DEVICE, "cuda_shard_create: device %d not in [0, %d)", device,
                     count);
  cudaError_t e = cudaSetDevice(device);
  if (e != cudaSuccess) return peer_k_cuda_fail(e, "cuda_shard_create: cudaSetDevice");
  if ((st = peer_shard_agree("cuda_shard_create", comm->rank, comm->world,
                             local_checks(cfg, opt, comm->world), cfg, exchange, comm)))
    return st;

  peer_cuda_shard *S = calloc(1, sizeof *S);
  if (!S) return peer_fail(PEER_ERR_OUT_OF_MEMORY, "cuda_shard_create: out of memory");
  S->comm = *comm;
  S->cols = cfg->d_model / comm->world;
  S->col0 = S->cols * comm->rank;
  /* A failure here is local: creation has no collective step left. */
  if ((st = peer_layer_create_cols(&S->L, cfg, opt, S->col0, S->cols))) {
    free(S);
    return st;
  }
  *out = S;
  return PEER_OK;
}

void peer_cuda_shard_free(peer_cuda_shard *S) {
  if (!S) return;
  if (S->ws) free_on(state_of(S->L)->device, S->ws);
  peer_layer_free(S->L);
  free(S);
}

const peer_config *peer_cuda_shard_config(const peer_cuda_shard *S) {
  return S ? &S->L->cfg : NULL;
}

void peer_cuda_shard_columns(const peer_cuda_shard *S, int64_t *col0, int64_t *cols) {
  if (col0) *col0 = S ? S->col0 : 0;
  if (cols) *cols = S ? S->cols : 0;
}

int peer_cuda_shard_n_params(const peer_cuda_shard *S) {
  return S ? peer_layer_n_params(S->L) : 0;
}

peer_status peer_cuda_shard_param(peer_cuda_shard *S, int i, peer_tensor *out) {
  if (!S) return peer_fail(PEER_ERR_INVALID_ARGUMENT, "cuda_shard_param: NULL shard");
  return peer_layer_param(S->L, i, out);
}

peer_status peer_cuda_shard_param_by_name(peer_cuda_shard *S, const char *name, peer_tensor *out) {
  if (!S) return peer_fail(PEER_ERR_INVALID_ARGUMENT, "cuda_shard_param_by_name: NULL shard");
  return peer_layer_param_by_name(S->L, name, out);
}

peer_status peer_cuda_shard_init(peer_cuda_shard *S, uint64_t seed) {
  if (!S) return peer_fail(PEER_ERR_INVALID_ARGUMENT, "cuda_shard_init: NULL shard");
  return peer_layer_init(S->L, seed);
}

/* ------------------------------------------------------------ inference */

/* The expert phase's device scratch: z [T, H*k], and with more than one
 * rank this rank's y columns [T, cols] and every rank's [world, T, cols].
 * Grown as the layer's (backend.c): after a wait for the device. */
typedef struct shard_ws {
  float *z, *mine, *all;
} shard_ws;

static size_t shard_layout(const peer_cuda_shard *S, int64_t T, char *base, shard_ws *w) {
  const size_t thk = (size_t)T * (size_t)(S->L->dims.H * S->L->dims.k);
  const size_t tc = S->comm.world > 1 ? (size_t)T * (size_t)S->cols : 0;
  const part parts[] = {
      {(void **)&w->z, thk * 4},
      {(void **)&w->mine, tc * 4},
      {(void **)&w->all, tc * 4 * (size_t)S->comm.world},
  };
  return carve(parts, sizeof parts / sizeof parts[0], base);
}

static peer_status shard_scratch(peer_cuda_shard *S, int64_t T, shard_ws *w,
                                 const cudaStream_t *stream) {
  const size_t need = shard_layout(S, T, NULL, w);
  if (need > S->ws_bytes) {
    const char *what = "cuda_shard: device scratch";
    peer_status st = peer_cb_growth_allowed(stream, what, T, need, S->ws_bytes);
    if (!st && S->ws) st = device_idle(what);
    if (st) return st;
    if (S->ws) cudaFree(S->ws);
    S->ws = NULL;
    S->ws_bytes = 0;
    cudaError_t e = cudaMalloc(&S->ws, need);
    if (e != cudaSuccess) {
      S->ws = NULL;
      return peer_k_cuda_fail(e, what);
    }
    S->ws_bytes = need;
  }
  shard_layout(S, T, S->ws, w);
  return PEER_OK;
}

/* out [T, d] = sum over the entries of coef * row_ids[cols] of `table`, each
 * rank its columns, gathered: with z, coef = gates * act(z) (y); without,
 * coef = gates (dx's expert part, gates = cdown). */
static peer_status combine_gather(peer_cuda_shard *S, int64_t T, const float *z,
                                  const float *gates, const int64_t *ids, int table, float *out,
                                  const shard_ws *sw, cudaStream_t stream, const char *what) {
  const peer_layer *L = S->L;
  const int world = S->comm.world;
  float *mine = world > 1 ? sw->mine : out;
  peer_status st = peer_k_shard_combine(z, gates, ids, L->slot[table].data,
                                        L->cfg.weight_dtype == PEER_BF16, S->cols, T,
                                        L->dims.H * L->dims.k, (int)L->cfg.activation, mine, stream);
  if (st || world == 1) return st;
  if ((st = comm_allgather(&S->comm, mine, sw->all, (size_t)(T * S->cols) * sizeof(float), stream,
                           what)))
    return st;
  return peer_k_shard_interleave(sw->all, world, T, S->cols, out, stream);
}

/* The forward's expert phase: z = the all-reduced partial dots of x with
 * the down table's columns, then y. */
static peer_status expert_forward(peer_cuda_shard *S, int64_t T, const float *d_x,
                                  const int64_t *ids, const float *gates, float *z, float *d_y,
                                  const shard_ws *sw, cudaStream_t stream, const char *what) {
  const peer_layer *L = S->L;
  const int64_t hk = L->dims.H * L->dims.k;
  peer_status st;
  if ((st = peer_k_shard_dots(d_x, L->dims.d, S->col0, L->slot[PEER_P_EXPERTS_DOWN].data,
                              L->cfg.weight_dtype == PEER_BF16, S->cols, ids, T, hk, z, stream)) ||
      (st = comm_allreduce(S, z, T * hk, stream, what)))
    return st;
  return combine_gather(S, T, z, gates, ids, PEER_P_EXPERTS_UP, d_y, sw, stream, what);
}

static peer_status forward_call(peer_cuda_shard *S, int64_t T, const float *d_x, float *d_y,
                                int64_t *d_indices, float *d_gates, cudaStream_t stream) {
  const char *what = "cuda_shard_forward";
  peer_layer *L = S->L;
  peer_status st = peer_cb_enter(L, T, d_x, what);
  if (st) return st;
  if (T == 0) return PEER_OK;
  if (!d_y) return peer_fail(PEER_ERR_INVALID_ARGUMENT, "%s: y is NULL", what);
  dev_ws w;
  shard_ws sw;
  if ((st = peer_cb_device_scratch(L, T, &w, &stream)) || (st = shard_scratch(S, T, &sw, &stream)))
    return st;
  int64_t *ids = d_indices ? d_indices : w.ids;
  float *gates = d_gates ? d_gates : w.gates;
  if ((st = peer_cb_project_query(L, T, d_x, w.q, true, stream)) ||
      (st = peer_cb_search(L, T, w.q, ids, w.scores, gates, false, state_of(L)->d_bad + REC_SCORE,
                           stream, &w)))
    return st;
  return expert_forward(S, T, d_x, ids, gates, sw.z, d_y, &sw, stream, what);
}

peer_status peer_cuda_shard_forward(peer_cuda_shard *S, int64_t T, const float *d_x, float *d_y,
                                    int64_t *d_indices, float *d_gates, cudaStream_t stream) {
  if (!S) return peer_fail(PEER_ERR_INVALID_ARGUMENT, "cuda_shard_forward: NULL shard");
  peer_status st = peer_cb_busy(S->L, "cuda_shard_forward");
  if (st) return st;
  st = forward_call(S, T, d_x, d_y, d_indices, d_gates, stream);
  peer_cb_idle(S->L);
  return st;
}

peer_status peer_cuda_shard_retrieve(peer_cuda_shard *S, int64_t T, const float *d_x,
                                     int64_t *d_indices, float *d_scores, float *d_gates,
                                     cudaStream_t stream) {
  if (!S) return peer_fail(PEER_ERR_INVALID_ARGUMENT, "cuda_shard_retrieve: NULL shard");
  return peer_cuda_retrieve(S->L, T, d_x, d_indices, d_scores, d_gates, stream);
}

peer_status peer_cuda_shard_check(peer_cuda_shard *S, cudaStream_t stream) {
  if (!S) return peer_fail(PEER_ERR_INVALID_ARGUMENT, "cuda_shard_check: NULL shard");
  return peer_cuda_check(S->L, stream);
}

/* ------------------------------------------------------------ training */

peer_status peer_cuda_shard_context_create(peer_context **out, peer_cuda_shard *S,
                                           int64_t max_tokens) {
  const char *what = "cuda_shard_context_create";
  if (!out || !S) return peer_fail(PEER_ERR_INVALID_ARGUMENT, "%s: NULL argument", what);
  *out = NULL;
  peer_status st = peer_cb_busy(S->L, what);
  if (st) return st;
  peer_context *c = NULL;
  dev_ws w;
  shard_ws sw;
  /* the training calls then allocate nothing for T up to max_tokens */
  if (!(st = peer_cb_enter(S->L, 0, NULL, what)) &&
      !(st = peer_context_create(&c, S->L, max_tokens)) && max_tokens > 0 &&
      !(st = peer_cb_device_scratch(S->L, max_tokens, &w, NULL)))
    st = shard_scratch(S, max_tokens, &sw, NULL);
  peer_cb_idle(S->L);
  if (st) {
    peer_context_free(c);
    return st;
  }
  *out = c;
  return PEER_OK;
}

static peer_status forward_train_call(peer_cuda_shard *S, peer_context *ctx, int64_t T,
                                      const float *d_x, float *d_y, cudaStream_t stream) {
  const char *what = "cuda_shard_forward_train";
  peer_layer *L = S->L;
  /* peer_train_begin first: it marks ctx not ready, so that no argument
   * error leaves a backward to use the previous batch */
  peer_status st = peer_train_begin(L, ctx, T, d_x, d_y, what);
  if (st || (st = peer_cb_enter(L, T, d_x, what))) return st;
  if (T > 0) {
    train_mem m;
    shard_ws sw;
    if ((st = peer_cb_context_mem(L, ctx, &m)) || (st = shard_scratch(S, T, &sw, &stream)) ||
        (st = peer_cb_train_queries(L, T, d_x, &m, stream)) ||
        (st = expert_forward(S, T, d_x, m.ids, m.gates, m.z, d_y, &sw, stream, what)) ||
        (st = peer_cb_train_finish(L, ctx, T, d_x, &m, stream)))
      return st;
  }
  peer_train_end(ctx, T, d_x);
  return PEER_OK;
}

peer_status peer_cuda_shard_forward_train(peer_cuda_shard *S, peer_context *ctx, int64_t T,
                                          const float *d_x, float *d_y, cudaStream_t stream) {
  if (!S) return peer_fail(PEER_ERR_INVALID_ARGUMENT, "cuda_shard_forward_train: NULL shard");
  peer_status st = peer_cb_busy(S->L, "cuda_shard_forward_train");
  if (st) return st;
  st = forward_train_call(S, ctx, T, d_x, d_y, stream);
  peer_cb_idle(S->L);
  return st;
}

/* The backward of ctx's training forward on device pointers, queued on
 * `stream` (see the opening comment); expert rows of this rank's columns. */
static peer_status dev_backward(peer_cuda_shard *S, peer_context *ctx, const float *d_dy,
                                float *d_dx, const peer_grads *g, int64_t *n_rows,
                                cudaStream_t stream, const char *what) {
  peer_layer *L = S->L;
  const peer_dims *D = &L->dims;
  const int64_t T = ctx->n_tokens, hk = D->H * D->k;
  const float *x = ctx->x_dev;
  train_mem m;
  shard_ws sw;
  peer_status st;
  if ((st = peer_cb_context_mem(L, ctx, &m)) || (st = shard_scratch(S, T, &sw, &stream)) ||
      (st = peer_k_first_nonfinite_row(d_dy, T, D->d, state_of(L)->d_bad + REC_DY, stream)) ||
      (st = peer_k_shard_dots(d_dy, D->d, S->col0, L->slot[PEER_P_EXPERTS_UP].data,
                              L->cfg.weight_dtype == PEER_BF16, S->cols, m.ids, T, hk, m.ds,
                              stream)) ||
      (st = comm_allreduce(S, m.ds, T * hk, stream, what)) ||
      (st = peer_k_shard_coefficients(m.z, m.gates, m.scores, m.ds, m.cup, m.cdown, T, D->H, D->k,
                                      (int)L->cfg.activation, (int)L->cfg.gate, stream)))
    return st;
  if (d_dx && (st = combine_gather(S, T, NULL, m.cdown, m.ids, PEER_P_EXPERTS_DOWN, d_dx, &sw,
                                   stream, what)))
    return st;
  if ((st = peer_cb_expert_rows(L, T, &m, x + S->col0, d_dy + S->col0, D->d, S->cols, g, n_rows,
                                stream)))
    return st;
  return peer_cb_query_backward(L, T, &m, x, d_dx, g, stream);
}

static peer_status backward_call(peer_cuda_shard *S, peer_context *ctx, const float *d_dy,
                                 float *d_dx, peer_grads *d_grads, int64_t *d_n_expert_rows,
                                 cudaStream_t stream) {
  const char *what = "cuda_shard_backward";
  peer_layer *L = S->L;
  peer_status st = peer_cb_enter(L, 0, NULL, what);
  if (st || (st = peer_backward_check(L, ctx, d_dy, d_grads, what))) return st;
  /* dx is written before dy and x are read for the last time (the expert
   * rows), as on the CPU shard */
  const size_t rows = (size_t)ctx->n_tokens * (size_t)L->dims.d * sizeof(float);
  if (d_dx && ((st = peer_check_disjoint(what, d_dx, rows, "dx", d_dy, rows, "dy")) ||
               (st = peer_check_disjoint(what, d_dx, rows, "dx", ctx->x_dev, rows, "x"))))
    return st;
  if (ctx->n_tokens == 0)
    st = peer_cb_backward_empty(L, d_grads, d_n_expert_rows, stream);
  else
    st = dev_backward(S, ctx, d_dy, d_dx, d_grads, d_n_expert_rows, stream, what);
  if (st) return st;
  ctx->ready = false; /* one backward per training forward */
  return PEER_OK;
}

peer_status peer_cuda_shard_backward(peer_cuda_shard *S, peer_context *ctx, const float *d_dy,
                                     float *d_dx, peer_grads *d_grads, int64_t *d_n_expert_rows,
                                     cudaStream_t stream) {
  if (!S) return peer_fail(PEER_ERR_INVALID_ARGUMENT, "cuda_shard_backward: NULL shard");
  peer_status st = peer_cb_busy(S->L, "cuda_shard_backward");
  if (st) return st;
  st = backward_call(S, ctx, d_dy, d_dx, d_grads, d_n_expert_rows, stream);
  peer_cb_idle(S->L);
  return st;
}

peer_status peer_cuda_shard_optimizer_create(peer_optimizer **out, peer_cuda_shard *S,
                                             const peer_optim_config *cfg) {
  if (!out || !S)
    return peer_fail(PEER_ERR_INVALID_ARGUMENT, "cuda_shard_optimizer_create: NULL argument");
  return peer_optimizer_create(out, S->L, cfg);
}

/* ------------------------------------------------------------ files */

peer_status peer_cuda_shard_save(const peer_cuda_shard *S, const peer_optimizer *opt,
                                 const char *path) {
  if (!S) return peer_fail(PEER_ERR_INVALID_ARGUMENT, "cuda_shard_save: NULL shard");
  return peer_shard_file_save(S->L, opt, S->comm.rank, S->comm.world, path, "cuda_shard_save");
}

peer_status peer_cuda_shard_load(peer_cuda_shard *S, peer_optimizer *opt, const char *path) {
  if (!S) return peer_fail(PEER_ERR_INVALID_ARGUMENT, "cuda_shard_load: NULL shard");
  return peer_shard_file_load(S->L, opt, S->comm.rank, S->comm.world, path, "cuda_shard_load");
}

peer_status peer_cuda_shard_load_full(peer_cuda_shard *S, peer_optimizer *opt, const char *path) {
  if (!S) return peer_fail(PEER_ERR_INVALID_ARGUMENT, "cuda_shard_load_full: NULL shard");
  return peer_shard_file_load_full(S->L, opt, path, "cuda_shard_load_full");
}
