/* shard.c: a layer whose expert tables are split by columns over the ranks of
 * a caller's communicator (peer.h "sharding"): creation with the config
 * agreement check, parameter access, and the inference forward.  Retrieval
 * is the layer's own (replicated: every rank finds the same ids); the expert
 * phase works on this rank's columns: partial dots u_i[cols] . x[cols], one
 * all-reduce of T*H*k floats, then y[:, cols] = sum of c_i v_i[cols], and one
 * all-gather of y.  Training is shard_train.c, the optimizer shard_optim.c,
 * files shard_file.c. */
#include "shard.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* ------------------------------------------------------------ transport */

peer_status peer_shard_allreduce(const peer_shard *S, float *data, int64_t count,
                                 const char *what) {
  if (count == 0) return PEER_OK;
  int rc = S->comm.allreduce_sum(S->comm.handle, data, count);
  if (rc)
    return peer_fail(PEER_ERR_IO, "%s: the communicator's all-reduce of %lld floats failed (%d)",
                     what, (long long)count, rc);
  return PEER_OK;
}

peer_status peer_shard_allgather(const peer_shard *S, const void *send, void *recv, size_t bytes,
                                 const char *what) {
  int rc = S->comm.allgather(S->comm.handle, send, recv, bytes);
  if (rc)
    return peer_fail(PEER_ERR_IO, "%s: the communicator's all-gather of %zu bytes failed (%d)",
                     what, bytes, rc);
  return PEER_OK;
}

/* y[t, r*cols + j] = part[r][t][j]: the ranks' column blocks side by side. */
void peer_shard_interleave(const peer_shard *S, int64_t T, const float *parts, float *y) {
  const int64_t c = S->cols, d = S->L->dims.d;
  for (int r = 0; r < S->world; r++)
    for (int64_t t = 0; t < T; t++)
      memcpy(y + t * d + r * c, parts + ((int64_t)r * T + t) * c, (size_t)c * sizeof(float));
}

peer_status peer_shard_gather_rows(const peer_shard *S, int64_t T, const float *mine, float *all,
                                   float *out, const char *what) {
  peer_status st = peer_shard_allgather(S, mine, all, (size_t)(T * S->cols) * sizeof(float), what);
  if (!st) peer_shard_interleave(S, T, all, out);
  return st;
}

/* ------------------------------------------------------------ creation */

peer_status peer_shard_check_comm(const char *what, bool collectives, int rank, int world) {
  if (!collectives)
    return peer_fail(PEER_ERR_INVALID_ARGUMENT,
                     "%s: the communicator lacks allreduce_sum or allgather", what);
  if (world < 1 || rank < 0 || rank >= world)
    return peer_fail(PEER_ERR_INVALID_ARGUMENT, "%s: rank %d is not in [0, world %d)", what, rank,
                     world);
  return PEER_OK;
}

/* The local checks; their outcome travels to every rank before anyone
 * returns, so that all refuse together. */
static peer_status local_checks(const peer_config *cfg, const peer_options *opt,
                                const peer_comm *c) {
  peer_status st = peer_config_validate(cfg);
  if (st) return st;
  if (opt && opt->backend != PEER_BACKEND_CPU)
    return peer_fail(PEER_ERR_UNSUPPORTED, "shard_create: only the CPU backend can be sharded");
  if (cfg->d_model % c->world)
    return peer_fail(PEER_ERR_CONFIG,
                     "shard_create: d_model %lld is not divisible by the world size %d",
                     (long long)cfg->d_model, c->world);
  return PEER_OK;
}

/* What each rank tells the others at creation. */
typedef struct agree_rec {
  int32_t status, rank, world, pad;
  char config[PEER_CONFIG_TEXT_MAX];
  char message[256];
} agree_rec;

/* The same outcome on every rank: the lowest failing rank's status, then
 * ranks out of order, then configs that differ from rank 0's. */
static peer_status agree_outcome(const char *what, int rank, int world, const agree_rec *all) {
  for (int r = 0; r < world; r++)
    if (all[r].status)
      return peer_fail((peer_status)all[r].status, "%.255s (on rank %d)", all[r].message, r);
  for (int r = 0; r < world; r++) {
    if (all[r].world != world || all[r].rank != r)
      return peer_fail(PEER_ERR_CONFIG,
                       "%s: the process at position %d of the group says rank %d of "
                       "%d; this one says rank %d of %d (ranks must be 0..world-1 in order)",
                       what, r, all[r].rank, all[r].world, rank, world);
    if (strcmp(all[r].config, all[0].config) != 0)
      return peer_fail(PEER_ERR_CONFIG,
                       "%s: rank %d's config differs from rank 0's: rank 0 has "
                       "\"%.300s\", rank %d has \"%.300s\"",
                       what, r, all[0].config, r, all[r].config);
  }
  return PEER_OK;
}

peer_status peer_shard_agree(const char *what, int rank, int world, peer_status local,
                             const peer_config *cfg, peer_agree_gather gather, const void *comm) {
  agree_rec *rec = calloc((size_t)world + 1, sizeof *rec);
  if (!rec) return peer_fail(PEER_ERR_OUT_OF_MEMORY, "%s: out of memory", what);
  agree_rec *mine = &rec[world];
  mine->rank = rank;
  mine->world = world;
  mine->status = (int32_t)local;
  if (local)
    snprintf(mine->message, sizeof mine->message, "%s", peer_last_error());
  else
    peer_config_format(cfg, mine->config, sizeof mine->config);
  peer_status st = gather(comm, mine, rec, sizeof *mine);
  if (!st) st = agree_outcome(what, rank, world, rec);
  free(rec);
  return st;
}

/* The agreement's all-gather over a host communicator. */
static peer_status host_gather(const void *comm, const void *mine, void *all, size_t bytes) {
  const peer_comm *c = comm;
  int rc = c->allgather(c->handle, mine, all, bytes);
  if (rc)
    return peer_fail(PEER_ERR_IO, "shard_create: the communicator's all-gather failed (%d)", rc);
  return PEER_OK;
}

peer_status peer_shard_create(peer_shard **out, const peer_config *cfg, const peer_options *opt,
                              const peer_comm *comm) {
  if (!out || !cfg || !comm)
    return peer_fail(PEER_ERR_INVALID_ARGUMENT, "shard_create: NULL argument");
  *out = NULL;
  peer_status st = peer_shard_check_comm("shard_create", comm->allreduce_sum && comm->allgather,
                                         comm->rank, comm->world);
  if (st) return st;
  if ((st = peer_shard_agree("shard_create", comm->rank, comm->world, local_checks(cfg, opt, comm),
                             cfg, host_gather, comm)))
    return st;

  peer_shard *S = calloc(1, sizeof *S);
  if (!S) return peer_fail(PEER_ERR_OUT_OF_MEMORY, "shard_create: out of memory");
  S->comm = *comm;
  S->rank = comm->rank;
  S->world = comm->world;
  S->cols = cfg->d_model / comm->world;
  S->col0 = S->cols * comm->rank;
  /* An allocation failure here is local: creation has no collective step
   * left, so the other ranks return a shard this rank has not. */
  if ((st = peer_layer_create_cols(&S->L, cfg, opt, S->col0, S->cols))) {
    free(S);
    return st;
  }
  S->cpu = peer_cpu_select()->train; /* chosen when the layer was created */
  *out = S;
  return PEER_OK;
}

void peer_shard_free(peer_shard *S) {
  if (!S) return;
  peer_layer_free(S->L);
  peer_free(S->buf, S->buf_bytes);
  free(S);
}

const peer_config *peer_shard_config(const peer_shard *S) { return S ? &S->L->cfg : NULL; }
int peer_shard_rank(const peer_shard *S) { return S ? S->rank : -1; }
int peer_shard_world(const peer_shard *S) { return S ? S->world : 0; }

void peer_shard_columns(const peer_shard *S, int64_t *col0, int64_t *cols) {
  if (col0) *col0 = S ? S->col0 : 0;
  if (cols) *cols = S ? S->cols : 0;
}

peer_status peer_shard_set_threads(peer_shard *S, int n_threads) {
  if (!S) return peer_fail(PEER_ERR_INVALID_ARGUMENT, "shard_set_threads: NULL shard");
  return peer_layer_set_threads(S->L, n_threads);
}

int peer_shard_n_params(const peer_shard *S) { return S ? peer_layer_n_params(S->L) : 0; }

peer_status peer_shard_param(peer_shard *S, int i, peer_tensor *out) {
  if (!S) return peer_fail(PEER_ERR_INVALID_ARGUMENT, "shard_param: NULL shard");
  return peer_layer_param(S->L, i, out);
}

peer_status peer_shard_param_by_name(peer_shard *S, const char *name, peer_tensor *out) {
  if (!S) return peer_fail(PEER_ERR_INVALID_ARGUMENT, "shard_param_by_name: NULL shard");
  return peer_layer_param_by_name(S->L, name, out);
}

peer_status peer_shard_init(peer_shard *S, uint64_t seed) {
  if (!S) return peer_fail(PEER_ERR_INVALID_ARGUMENT, "shard_init: NULL shard");
  return peer_layer_init(S->L, seed);
}

/* ------------------------------------------------------------ scratch */

peer_status peer_shard_scratch(peer_shard *S, size_t bytes, void **out) {
  if (bytes > S->buf_bytes) {
    peer_free(S->buf, S->buf_bytes);
    S->buf = peer_alloc(bytes);
    S->buf_bytes = S->buf ? bytes : 0;
    if (!S->buf)
      return peer_fail(PEER_ERR_OUT_OF_MEMORY, "shard: cannot allocate %zu bytes of scratch",
                       bytes);
  }
  *out = S->buf;
  return PEER_OK;
}

/* ------------------------------------------------------- the expert phase */

size_t peer_shard_split_bytes(const peer_shard *S) {
  return round64((size_t)S->cols * sizeof(float));
}

/* ------------------------------------------------------------ inference */

peer_status peer_shard_retrieve(peer_shard *S, int64_t T, const float *x, int64_t *indices,
                                float *scores, float *gates) {
  if (!S) return peer_fail(PEER_ERR_INVALID_ARGUMENT, "shard_retrieve: NULL shard");
  return peer_retrieve(S->L, T, x, indices, scores, gates);
}

static peer_status shard_forward(peer_shard *S, int64_t T, const float *x, float *y,
                                 int64_t *indices, float *gates) {
  const peer_layer *L = S->L;
  const int P = peer_layer_threads(L);
  const size_t thk = (size_t)T * (size_t)(L->dims.H * L->dims.k), tc = (size_t)T * (size_t)S->cols;
  const size_t sb = peer_shard_split_bytes(S);
  /* ids, gates, z, this rank's y columns, every rank's, and the per-thread
   * rows of the expert phase */
  size_t bytes = round64(thk * 8) + 2 * round64(thk * 4) + round64(tc * 4) +
                 round64(tc * 4 * (size_t)S->world) + sb * (size_t)P;
  void *buf = NULL;
  peer_status st = peer_shard_scratch(S, bytes, &buf);
  if (st) return st;
  char *p = buf;
  int64_t *ids = (int64_t *)p;
  p += round64(thk * 8);
  float *g = (float *)p, *z = g + round64(thk * 4) / 4;
  float *mine = z + round64(thk * 4) / 4, *all = mine + round64(tc * 4) / 4;
  float *split = all + round64(tc * 4 * (size_t)S->world) / 4;
  if ((st = peer_retrieve_held(S->L, T, x, ids, NULL, g))) return st;
  S->cpu->expert_dots(L, PEER_P_EXPERTS_DOWN, S->col0, S->cols, T, x, ids, z, (char *)split, sb, P);
  if ((st = peer_shard_allreduce(S, z, (int64_t)thk, "shard_forward"))) return st;
  S->cpu->expert_combine(L, PEER_P_EXPERTS_UP, S->cols, T, ids, g, z, mine, (char *)split, sb, P);
  if ((st = peer_shard_gather_rows(S, T, mine, all, y, "shard_forward"))) return st;
  if (indices) memcpy(indices, ids, thk * sizeof *ids);
  if (gates) memcpy(gates, g, thk * sizeof *g);
  return PEER_OK;
}

/* The layer is held for the whole call, as peer_forward holds it: the
 * shard's scratch and the layer's are this call's alone. */
peer_status peer_shard_forward(peer_shard *S, int64_t T, const float *x, float *y, int64_t *indices,
                               float *gates) {
  if (!S) return peer_fail(PEER_ERR_INVALID_ARGUMENT, "shard_forward: NULL shard");
  peer_status st = peer_forward_check(S->L, T, x, y, indices, gates, "shard_forward");
  if (st || T == 0) return st;
  if ((st = peer_layer_enter(S->L, "shard_forward"))) return st;
  st = shard_forward(S, T, x, y, indices, gates);
  peer_layer_leave(S->L);
  return st;
}
