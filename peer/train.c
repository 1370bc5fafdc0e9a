/* train.c: the training entry points: contexts, training forward, backward.
 * Arguments are checked here; the math is the backend's. */
#include "internal.h"

#include <omp.h>
#include <stdlib.h>
#include <string.h>

/* T*H*k entries are indexed with 32 bits in the backward's sorts. */
#define MAX_ENTRIES ((int64_t)1 << 31)

int peer_context_threads(const peer_layer *L) {
  int P = omp_get_max_threads();
  return L->opt.n_threads > P ? L->opt.n_threads : P;
}

static peer_status check_tokens(const peer_layer *L, int64_t T, const char *what) {
  if (T < 1)
    return peer_fail(PEER_ERR_INVALID_ARGUMENT, "%s: max_tokens %lld must be at least 1", what,
                     (long long)T);
  if (T > MAX_ENTRIES / (L->dims.H * L->dims.k) || T > ((int64_t)1 << 40) / L->dims.d)
    return peer_fail(PEER_ERR_INVALID_ARGUMENT, "%s: max_tokens %lld too large", what,
                     (long long)T);
  return L->backend->context_check ? L->backend->context_check(L, T, what) : PEER_OK;
}

peer_status peer_context_size(const peer_layer *L, int64_t T, size_t *bytes) {
  if (!L || !bytes) return peer_fail(PEER_ERR_INVALID_ARGUMENT, "context_size: NULL argument");
  peer_status st = check_tokens(L, T, "context_size");
  if (st) return st;
  *bytes = L->backend->context_bytes(L, T);
  return PEER_OK;
}

peer_status peer_context_create(peer_context **out, const peer_layer *L, int64_t T) {
  if (!out || !L) return peer_fail(PEER_ERR_INVALID_ARGUMENT, "context_create: NULL argument");
  *out = NULL;
  peer_status st = check_tokens(L, T, "context_create");
  if (st) return st;
  peer_context *c = calloc(1, sizeof *c);
  if (!c) return peer_fail(PEER_ERR_OUT_OF_MEMORY, "context_create: out of memory");
  c->layer = L;
  c->layer_id = L->id;
  c->max_tokens = T;
  c->n_threads = peer_context_threads(L);
  c->bytes = L->backend->context_bytes(L, T);
  const peer_backend_i *B = L->backend;
  c->mem = B->context_alloc ? B->context_alloc(L, c->bytes) : peer_alloc(c->bytes);
  c->mem_free = B->context_free ? B->context_free : peer_free;
  if (!c->mem) {
    size_t bytes = c->bytes;
    free(c);
    return peer_fail(PEER_ERR_OUT_OF_MEMORY, "context_create: cannot allocate %zu bytes", bytes);
  }
  *out = c;
  return PEER_OK;
}

void peer_context_free(peer_context *c) {
  if (!c) return;
  c->mem_free(c->mem, c->bytes);
  free(c);
}

peer_status peer_layer_set_norm_momentum(peer_layer *L, float m) {
  if (!L) return peer_fail(PEER_ERR_INVALID_ARGUMENT, "set_norm_momentum: NULL layer");
  if (!(m >= 0.0f && m <= 1.0f))
    return peer_fail(PEER_ERR_INVALID_ARGUMENT, "norm momentum %g is not in [0, 1]", (double)m);
  L->norm_momentum = m;
  return PEER_OK;
}

static peer_status check_context(const peer_layer *L, const peer_context *c, const char *what) {
  if (!L || !c) return peer_fail(PEER_ERR_INVALID_ARGUMENT, "%s: NULL layer or context", what);
  /* The stamp catches a context of a freed layer whose address a new layer
   * took over. */
  if (c->layer != L || c->layer_id != L->id)
    return peer_fail(PEER_ERR_INVALID_ARGUMENT, "%s: context was created for another layer", what);
  return PEER_OK;
}

peer_status peer_train_begin(const peer_layer *L, peer_context *c, int64_t T, const void *x,
                             const void *y, const char *what) {
  peer_status st = check_context(L, c, what);
  if (st) return st;
  c->ready = false;
  if (T < 0 || T > c->max_tokens)
    return peer_fail(PEER_ERR_INVALID_ARGUMENT,
                     "%s: n_tokens %lld not in [0, %lld] (the context's size)", what, (long long)T,
                     (long long)c->max_tokens);
  if (T > 0 && (!x || !y)) return peer_fail(PEER_ERR_INVALID_ARGUMENT, "%s: x or y is NULL", what);
  const size_t rows = (size_t)T * (size_t)L->dims.d * sizeof(float);
  if ((st = peer_check_disjoint(what, x, rows, "x", y, rows, "y"))) return st;
  if (L->cfg.query_norm == PEER_NORM_BATCHNORM && T == 1)
    return peer_fail(PEER_ERR_INVALID_ARGUMENT,
                     "%s: batch norm needs at least 2 tokens for batch statistics", what);
  return PEER_OK;
}

void peer_train_end(peer_context *c, int64_t T, const float *x) {
  c->n_tokens = T;
  c->x = x;
  c->ready = true;
}

/* The layer is marked busy before the context is looked at: a context is
 * one layer's, so a second thread is refused before it touches either. */
peer_status peer_forward_train(peer_layer *L, peer_context *c, int64_t T, const float *x,
                               float *y) {
  peer_status st = L ? peer_layer_enter(L, "forward_train") : PEER_OK;
  if (st) return st;
  void *ws = NULL;
  if (!(st = peer_train_begin(L, c, T, x, y, "forward_train")) && T > 0 &&
      !(st = peer_layer_scratch(L, T, &ws)))
    st = L->backend->forward_train(L, c, T, x, y, ws);
  if (!st) peer_train_end(c, T, x);
  if (L) peer_layer_leave(L);
  return st;
}

/* An empty batch has zero gradients; dense ones are still overwritten. */
static void zero_dense_grads(const peer_layer *L, peer_grads *g) {
  float *bufs[] = {g->query_weight, g->query_bias, g->norm_weight, g->norm_bias, g->keys};
  int slots[] = {PEER_P_QUERY_WEIGHT, PEER_P_QUERY_BIAS, PEER_P_NORM_WEIGHT, PEER_P_NORM_BIAS,
                 PEER_P_KEYS};
  for (int i = 0; i < 5; i++)
    if (bufs[i]) memset(bufs[i], 0, L->slot[slots[i]].nbytes);
}

peer_status peer_backward_check(const peer_layer *L, const peer_context *c, const void *dy,
                                const peer_grads *g, const char *what) {
  peer_status st = check_context(L, c, what);
  if (st) return st;
  if (!c->ready)
    return peer_fail(PEER_ERR_STATE, "%s: no successful forward_train on this context", what);
  if (!g) return peer_fail(PEER_ERR_INVALID_ARGUMENT, "%s: grads is NULL", what);
  int64_t T = c->n_tokens;
  if (T > 0 && !dy) return peer_fail(PEER_ERR_INVALID_ARGUMENT, "%s: dy is NULL", what);
  if (g->experts_down || g->experts_up || g->expert_rows) {
    if (!g->experts_down || !g->experts_up || !g->expert_rows)
      return peer_fail(PEER_ERR_INVALID_ARGUMENT,
                       "%s: expert_rows, experts_down and experts_up go together", what);
    if (g->expert_capacity < T * L->dims.H * L->dims.k)
      return peer_fail(PEER_ERR_INVALID_ARGUMENT, "%s: expert_capacity %lld < T*H*k = %lld", what,
                       (long long)g->expert_capacity, (long long)(T * L->dims.H * L->dims.k));
  }
  if (!L->slot[PEER_P_QUERY_BIAS].data && g->query_bias)
    return peer_fail(PEER_ERR_INVALID_ARGUMENT, "%s: the layer has no query bias", what);
  if (!L->slot[PEER_P_NORM_WEIGHT].data && (g->norm_weight || g->norm_bias))
    return peer_fail(PEER_ERR_INVALID_ARGUMENT, "%s: the layer has no query norm", what);
  return PEER_OK;
}

peer_status peer_backward_begin(const peer_layer *L, const peer_context *c, const float *dy,
                                const float *dx, peer_grads *g, const char *what) {
  peer_status st = peer_backward_check(L, c, dy, g, what);
  if (st) return st;
  /* dx written over dy, or over the x that backward still reads */
  const size_t rows = (size_t)c->n_tokens * (size_t)L->dims.d * sizeof(float);
  if ((st = peer_check_disjoint(what, dx, rows, "dx", dy, rows, "dy")) ||
      (st = peer_check_disjoint(what, dx, rows, "dx", c->x, rows, "the x of the training forward")))
    return st;
  g->n_expert_rows = 0;
  if (c->n_tokens == 0) zero_dense_grads(L, g);
  return PEER_OK;
}

static peer_status backward(peer_layer *L, peer_context *c, const float *dy, float *dx,
                            peer_grads *g) {
  peer_status st = peer_backward_begin(L, c, dy, dx, g, "backward");
  if (st) return st;
  if (c->n_tokens > 0 && (st = L->backend->backward(L, c, dy, dx, g))) return st;
  c->ready = false; /* one backward per training forward; a failed one may be retried */
  return PEER_OK;
}

peer_status peer_backward(peer_layer *L, peer_context *c, const float *dy, float *dx,
                          peer_grads *g) {
  peer_status st = L ? peer_layer_enter(L, "backward") : PEER_OK;
  if (st) return st;
  st = backward(L, c, dy, dx, g);
  if (L) peer_layer_leave(L);
  return st;
}
