/* backend_shard.c: the CUDA sharded layer of peer_cuda.h ("sharding"): a
 * CUDA layer whose expert tables hold this rank's columns
 * (peer_layer_create_cols), the config agreement at creation over the
 * caller's device communicator, and the inference forward:
 *   retrieval (replicated)          the layer's own passes (backend.c)
 *   z = u_i[cols] . x[cols]         peer_k_shard_dots
 *   z summed over the ranks         the communicator's all-reduce, T*H*k floats
 *   y[:, cols] = sum c_i v_i[cols]  peer_k_shard_combine
 *   every rank's y columns          the communicator's all-gather, T*d floats
 *   into y [T, d]                   peer_k_shard_interleave
 * all queued on the caller's stream.  With one rank the combine writes y
 * and nothing is gathered. */
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

static peer_status shard_scratch(peer_cuda_shard *S, int64_t T, shard_ws *w) {
  const size_t need = shard_layout(S, T, NULL, w);
  if (need > S->ws_bytes) {
    const char *what = "cuda_shard_forward: scratch";
    peer_status st = S->ws ? device_idle(what) : PEER_OK;
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
  if ((st = peer_cb_device_scratch(L, T, &w)) || (st = shard_scratch(S, T, &sw))) return st;
  const peer_dims *D = &L->dims;
  const int64_t hk = D->H * D->k;
  const int bf16 = L->cfg.weight_dtype == PEER_BF16, world = S->comm.world;
  int64_t *ids = d_indices ? d_indices : w.ids;
  float *gates = d_gates ? d_gates : w.gates;
  float *mine = world > 1 ? sw.mine : d_y;
  if ((st = peer_cb_project_query(L, T, d_x, w.q, true, stream)) ||
      (st = peer_cb_search(L, T, w.q, ids, w.scores, gates, false, state_of(L)->d_bad + REC_SCORE,
                           stream, &w)) ||
      (st = peer_k_shard_dots(d_x, D->d, S->col0, L->slot[PEER_P_EXPERTS_DOWN].data, bf16, S->cols,
                              ids, T, hk, sw.z, stream)) ||
      (st = comm_allreduce(S, sw.z, T * hk, stream, what)) ||
      (st = peer_k_shard_combine(sw.z, gates, ids, L->slot[PEER_P_EXPERTS_UP].data, bf16, S->cols,
                                 T, hk, (int)L->cfg.activation, mine, stream)))
    return st;
  if (world == 1) return PEER_OK;
  if ((st = comm_allgather(&S->comm, mine, sw.all, (size_t)(T * S->cols) * sizeof(float), stream,
                           what)))
    return st;
  return peer_k_shard_interleave(sw.all, world, T, S->cols, d_y, stream);
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
