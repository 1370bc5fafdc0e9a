/* shard_train.c: training a sharded layer.  The forward is the CPU backend's
 * (queries, batch norm with batch statistics, retrieval) with the expert
 * phase on this rank's columns; the backward all-reduces the partial dots
 * v_i[cols] . dy[cols] (T*H*k floats), from which every rank computes the
 * same score gradients and so the same query, norm and sub-key gradients;
 * the expert gradient rows are this rank's columns, and dx's expert part is
 * all-gathered.
 *
 * Every pass between the collectives is the CPU backend's own (cpu_train.c,
 * through S->cpu: the instruction-set variant the process chose), on this
 * file's context arrays: the CPU backend's plus the partial dots and the
 * gathered rows. */
#include "shard.h"

#include <stdlib.h>

typedef struct sctx {
  peer_cpu_train_mem m;
  float *vd;         /* [T, H, k] v_i . dy */
  float *mine, *all; /* [T, cols], [world, T, cols] */
} sctx;

static size_t sctx_layout(const peer_shard *S, int64_t T, int P, char *base, sctx *s) {
  size_t off = S->cpu->layout(S->L, T, P, base, &s->m);
  const size_t hk = (size_t)T * (size_t)(S->L->dims.H * S->L->dims.k);
  const size_t tc = (size_t)T * (size_t)S->cols;
  struct {
    float **ptr;
    size_t bytes;
  } parts[] = {{&s->vd, hk * 4}, {&s->mine, tc * 4}, {&s->all, tc * 4 * (size_t)S->world}};
  for (size_t i = 0; i < sizeof parts / sizeof parts[0]; i++) {
    if (base) *parts[i].ptr = (float *)(base + off);
    off += round64(parts[i].bytes);
  }
  return off;
}

peer_status peer_shard_context_create(peer_context **out, const peer_shard *S, int64_t T) {
  if (!out || !S)
    return peer_fail(PEER_ERR_INVALID_ARGUMENT, "shard_context_create: NULL argument");
  /* The generic context (its checks and bookkeeping), with this file's memory
   * in place of the CPU backend's. */
  peer_status st = peer_context_create(out, S->L, T);
  if (st) return st;
  peer_context *c = *out;
  sctx s;
  size_t bytes = sctx_layout(S, T, c->n_threads, NULL, &s);
  c->mem_free(c->mem, c->bytes);
  c->mem = peer_alloc(bytes);
  c->bytes = bytes;
  c->mem_free = peer_free;
  if (!c->mem) {
    free(c);
    *out = NULL;
    return peer_fail(PEER_ERR_OUT_OF_MEMORY, "shard_context_create: cannot allocate %zu bytes",
                     bytes);
  }
  return PEER_OK;
}

static int threads_for(const peer_layer *L, const peer_context *c) {
  int P = peer_layer_threads(L);
  return P < c->n_threads ? P : c->n_threads;
}

/* ------------------------------------------------------------ forward */

static peer_status forward_train(peer_shard *S, peer_context *c, int64_t T, const float *x,
                                 float *y) {
  peer_layer *L = S->L;
  const peer_cpu_train_impl *cpu = S->cpu;
  int P = threads_for(L, c);
  void *ws;
  peer_status st = peer_layer_scratch(L, T, &ws);
  if (st) return st;
  cpu_ws w;
  peer_cpu_layout(L, T, ws, &w);
  sctx s;
  sctx_layout(S, c->max_tokens, c->n_threads, c->mem, &s);
  peer_cpu_train_mem *m = &s.m;
  if ((st = cpu->queries(L, T, x, &w, m, P))) return st;
  const size_t hk = (size_t)T * (size_t)(L->dims.H * L->dims.k);
  cpu->expert_dots(L, PEER_P_EXPERTS_DOWN, S->col0, S->cols, T, x, m->ids, m->z, m->per_thread,
                   m->per_thread_bytes, P);
  if ((st = peer_shard_allreduce(S, m->z, (int64_t)hk, "shard_forward_train"))) return st;
  if (L->cfg.query_norm == PEER_NORM_BATCHNORM) cpu->update_running(L, T, m);
  cpu->expert_combine(L, PEER_P_EXPERTS_UP, S->cols, T, m->ids, m->gates, m->z, s.mine,
                      m->per_thread, m->per_thread_bytes, P);
  return peer_shard_gather_rows(S, T, s.mine, s.all, y, "shard_forward_train");
}

/* As peer_forward_train: the layer is held before the context is looked at. */
peer_status peer_shard_forward_train(peer_shard *S, peer_context *c, int64_t T, const float *x,
                                     float *y) {
  if (!S) return peer_fail(PEER_ERR_INVALID_ARGUMENT, "shard_forward_train: NULL shard");
  peer_status st = peer_layer_enter(S->L, "shard_forward_train");
  if (st) return st;
  if (!(st = peer_train_begin(S->L, c, T, x, y, "shard_forward_train")) && T > 0)
    st = forward_train(S, c, T, x, y);
  if (!st) peer_train_end(c, T, x);
  peer_layer_leave(S->L);
  return st;
}

/* ------------------------------------------------------------ backward */

static peer_status backward(peer_shard *S, peer_context *c, const float *dy, float *dx,
                            peer_grads *gr) {
  peer_layer *L = S->L;
  const peer_cpu_train_impl *cpu = S->cpu;
  const int64_t T = c->n_tokens;
  const float *x = c->x;
  int P = threads_for(L, c);
  sctx s;
  sctx_layout(S, c->max_tokens, c->n_threads, c->mem, &s);
  peer_cpu_train_mem *m = &s.m;
  int64_t bad = cpu->first_nonfinite_row(dy, T, L->dims.d, P);
  if (bad < T)
    return peer_fail(PEER_ERR_NONFINITE, "token %lld: dy holds NaN or infinity", (long long)bad);
  const size_t hk = (size_t)T * (size_t)(L->dims.H * L->dims.k);
  cpu->expert_dots(L, PEER_P_EXPERTS_UP, S->col0, S->cols, T, dy, m->ids, s.vd, m->per_thread,
                   m->per_thread_bytes, P);
  peer_status st = peer_shard_allreduce(S, s.vd, (int64_t)hk, "shard_backward");
  if (st) return st;
  cpu->entry_coefficients(L, T, s.vd, m, P);
  if (dx) {
    cpu->expert_combine(L, PEER_P_EXPERTS_DOWN, S->cols, T, m->ids, m->cdown, NULL, s.mine,
                        m->per_thread, m->per_thread_bytes, P);
    if ((st = peer_shard_gather_rows(S, T, s.mine, s.all, dx, "shard_backward"))) return st;
  }
  if (gr->experts_down) cpu->expert_grads(L, T, x, dy, S->col0, S->cols, m, gr, P);
  cpu->dense_grads(L, T, x, dx, m, gr, P);
  return PEER_OK;
}

peer_status peer_shard_backward(peer_shard *S, peer_context *c, const float *dy, float *dx,
                                peer_grads *g) {
  if (!S) return peer_fail(PEER_ERR_INVALID_ARGUMENT, "shard_backward: NULL shard");
  peer_status st = peer_layer_enter(S->L, "shard_backward");
  if (st) return st;
  if (!(st = peer_backward_begin(S->L, c, dy, dx, g, "shard_backward")) && c->n_tokens > 0)
    st = backward(S, c, dy, dx, g);
  if (!st) c->ready = false;
  peer_layer_leave(S->L);
  return st;
}
