/* optim.c: training a layer's parameters in place: SGD and Adam(W) for the
 * dense parameters, lazy sparse SGD and Adam for the expert rows a batch
 * used (only those rows and their moments are touched), and checkpoints that
 * hold the weights, the optimizer's state and its step in one safetensors
 * file, written atomically and loaded only into a layer of the same config.
 * The update rules and their choices are documented in peer.h. */
#include "internal.h"
#include "pool.h"
#include "rowops.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define STATE_PREFIX "optim."
#define META_PREFIX PEER_META_PREFIX
#define STEP_KEY META_PREFIX "step"
#define KIND_KEY META_PREFIX "optim.kind"
#define EXPERT_KIND_KEY META_PREFIX "optim.expert_kind"
/* Element loops shorter than this run on one thread. */
#define PAR_MIN 32768
/* Config text and its fields (peer_config_format lists every field). */
#define MAX_FIELDS PEER_CONFIG_FIELDS_MAX
/* State tensors: at most two per trainable parameter. */
#define MAX_STATES (2 * PEER_P_COUNT)

/* The parameters an optimizer trains: dense ones with their gradient field,
 * then the two expert tables. */
static const int dense_slots[] = {PEER_P_QUERY_WEIGHT, PEER_P_QUERY_BIAS, PEER_P_NORM_WEIGHT,
                                  PEER_P_NORM_BIAS, PEER_P_KEYS};
#define N_DENSE ((int)(sizeof dense_slots / sizeof dense_slots[0]))
static const int expert_slots[] = {PEER_P_EXPERTS_DOWN, PEER_P_EXPERTS_UP};

const char *peer_grad_name(int slot) {
  switch (slot) {
  case PEER_P_QUERY_WEIGHT:
    return "query_weight";
  case PEER_P_QUERY_BIAS:
    return "query_bias";
  case PEER_P_NORM_WEIGHT:
    return "norm_weight";
  case PEER_P_NORM_BIAS:
    return "norm_bias";
  case PEER_P_KEYS:
    return "keys";
  case PEER_P_EXPERTS_DOWN:
    return "experts_down";
  default:
    return "experts_up";
  }
}

static const float *dense_grad(const peer_grads *g, int slot) {
  switch (slot) {
  case PEER_P_QUERY_WEIGHT:
    return g->query_weight;
  case PEER_P_QUERY_BIAS:
    return g->query_bias;
  case PEER_P_NORM_WEIGHT:
    return g->norm_weight;
  case PEER_P_NORM_BIAS:
    return g->norm_bias;
  default:
    return g->keys;
  }
}

struct peer_optimizer {
  peer_layer *layer;
  uint64_t layer_id; /* the layer's identity stamp */
  peer_optim_config cfg;
  int64_t step;
  int n_states;
  peer_tensor state[MAX_STATES];
  char state_name[MAX_STATES][48];
  /* by layer slot: Adam's m and v, or SGD's momentum buffer in m; NULL when
   * the slot keeps no state */
  float *m[PEER_P_COUNT], *v[PEER_P_COUNT];
  /* where the state lives (the layer's backend; kept here, as the optimizer
   * may be freed after its layer), and the backend's staging of host
   * gradients (optimizer_step) */
  const peer_backend_i *backend;
  void *stage;
  size_t stage_bytes;
};

/* ------------------------------------------------------------------ config */

peer_optim_config peer_optim_config_default(void) {
  peer_optim_config c;
  memset(&c, 0, sizeof c);
  c.kind = PEER_OPTIM_ADAM;
  c.lr = 1e-3f;
  c.momentum = 0.0f;
  c.beta1 = 0.9f;
  c.beta2 = 0.999f;
  c.eps = 1e-8f;
  c.weight_decay = 0.0f;
  c.expert_lr = 0.0f;
  c.expert_kind = PEER_OPTIM_ADAM;
  return c;
}

static const char *kind_name(peer_optim_kind k) {
  return k == PEER_OPTIM_SGD ? "sgd" : k == PEER_OPTIM_ADAM ? "adam" : "?";
}

static peer_status check_range(const char *field, float v, float lo, bool lo_open, float hi,
                               bool hi_open, const char *range) {
  bool ok = isfinite(v) && (lo_open ? v > lo : v >= lo) && (hi_open ? v < hi : v <= hi);
  if (!ok)
    return peer_fail(PEER_ERR_CONFIG, "optimizer %s: %g is not in %s", field, (double)v, range);
  return PEER_OK;
}

peer_status peer_optim_config_validate(const peer_optim_config *c) {
  if (!c) return peer_fail(PEER_ERR_INVALID_ARGUMENT, "optim_config_validate: NULL config");
  if (c->kind != PEER_OPTIM_SGD && c->kind != PEER_OPTIM_ADAM)
    return peer_fail(PEER_ERR_CONFIG, "optimizer kind: value %d is not SGD (0) or Adam (1)",
                     (int)c->kind);
  if (c->expert_kind != PEER_OPTIM_SGD && c->expert_kind != PEER_OPTIM_ADAM)
    return peer_fail(PEER_ERR_CONFIG, "optimizer expert_kind: value %d is not SGD (0) or Adam (1)",
                     (int)c->expert_kind);
  peer_status st;
  if ((st = check_range("lr", c->lr, 0.0f, false, INFINITY, true, "[0, inf)")) ||
      (st = check_range("expert_lr", c->expert_lr, 0.0f, false, INFINITY, true, "[0, inf)")) ||
      (st = check_range("weight_decay", c->weight_decay, 0.0f, false, INFINITY, true, "[0, inf)")))
    return st;
  if (c->kind == PEER_OPTIM_SGD &&
      (st = check_range("momentum", c->momentum, 0.0f, false, 1.0f, true, "[0, 1)")))
    return st;
  if (c->kind == PEER_OPTIM_ADAM || c->expert_kind == PEER_OPTIM_ADAM) {
    if ((st = check_range("beta1", c->beta1, 0.0f, false, 1.0f, true, "[0, 1)")) ||
        (st = check_range("beta2", c->beta2, 0.0f, false, 1.0f, true, "[0, 1)")) ||
        (st = check_range("eps", c->eps, 0.0f, true, INFINITY, true, "(0, inf)")))
      return st;
  }
  return PEER_OK;
}

/* ------------------------------------------------------------ the object */

static peer_status check_host_layer(const peer_layer *L, const char *what) {
  if (L->opt.backend != PEER_BACKEND_CPU)
    return peer_fail(PEER_ERR_UNSUPPORTED,
                     "%s: only CPU-backend layers (host parameters) are supported", what);
  return PEER_OK;
}

/* Layers an optimizer can step: host parameters, or a backend that steps
 * its own (optimizer_step). */
static peer_status check_steppable_layer(const peer_layer *L, const char *what) {
  if (L->backend->optimizer_step) return PEER_OK;
  return check_host_layer(L, what);
}

/* Add state tensor "optim.<param>.<suffix>" shaped like the parameter, f32. */
static peer_status add_state(peer_optimizer *o, int slot, const char *suffix, float **out) {
  const peer_tensor *p = &o->layer->slot[slot];
  int i = o->n_states;
  peer_tensor *t = &o->state[i];
  snprintf(o->state_name[i], sizeof o->state_name[i], STATE_PREFIX "%s.%s", p->name, suffix);
  t->name = o->state_name[i];
  t->dtype = PEER_F32;
  t->ndim = p->ndim;
  memcpy(t->shape, p->shape, sizeof t->shape);
  t->nbytes = p->nbytes / peer_dtype_size(p->dtype) * sizeof(float);
  t->data = o->backend->alloc(t->nbytes);
  if (!t->data)
    return peer_fail(PEER_ERR_OUT_OF_MEMORY, "optimizer_create: cannot allocate %s (%zu bytes)",
                     t->name, t->nbytes);
  o->n_states++;
  *out = t->data;
  return PEER_OK;
}

/* The state one slot keeps under rule `kind` (momentum applies to SGD on
 * dense parameters only). */
static peer_status add_slot_state(peer_optimizer *o, int slot, peer_optim_kind kind,
                                  bool momentum) {
  if (!o->layer->slot[slot].data) return PEER_OK;
  if (kind == PEER_OPTIM_ADAM) {
    peer_status st = add_state(o, slot, "m", &o->m[slot]);
    return st ? st : add_state(o, slot, "v", &o->v[slot]);
  }
  return momentum ? add_state(o, slot, "momentum", &o->m[slot]) : PEER_OK;
}

peer_status peer_optimizer_create(peer_optimizer **out, peer_layer *L,
                                  const peer_optim_config *cfg) {
  if (!out || !L || !cfg)
    return peer_fail(PEER_ERR_INVALID_ARGUMENT, "optimizer_create: NULL argument");
  *out = NULL;
  peer_status st = peer_optim_config_validate(cfg);
  if (st || (st = check_steppable_layer(L, "optimizer_create"))) return st;
  peer_optimizer *o = calloc(1, sizeof *o);
  if (!o) return peer_fail(PEER_ERR_OUT_OF_MEMORY, "optimizer_create: out of memory");
  o->layer = L;
  o->backend = L->backend;
  o->layer_id = L->id;
  o->cfg = *cfg;
  for (int i = 0; i < N_DENSE && !st; i++)
    st = add_slot_state(o, dense_slots[i], cfg->kind, cfg->momentum > 0.0f);
  for (int i = 0; i < 2 && !st; i++)
    st = add_slot_state(o, expert_slots[i], cfg->expert_kind, false);
  if (st) {
    peer_optimizer_free(o);
    return st;
  }
  *out = o;
  return PEER_OK;
}

void peer_optimizer_free(peer_optimizer *o) {
  if (!o) return;
  for (int i = 0; i < o->n_states; i++)
    o->backend->free(o->state[i].data, o->state[i].nbytes);
  if (o->stage) o->backend->free(o->stage, o->stage_bytes);
  free(o);
}

const peer_optim_config *peer_optimizer_config(const peer_optimizer *o) {
  return o ? &o->cfg : NULL;
}

peer_status peer_optimizer_set_lr(peer_optimizer *o, float lr, float expert_lr) {
  if (!o) return peer_fail(PEER_ERR_INVALID_ARGUMENT, "optimizer_set_lr: NULL optimizer");
  peer_optim_config c = o->cfg;
  c.lr = lr;
  c.expert_lr = expert_lr;
  peer_status st = peer_optim_config_validate(&c);
  if (st) return st;
  o->cfg = c;
  return PEER_OK;
}

int64_t peer_optimizer_step_count(const peer_optimizer *o) { return o ? o->step : 0; }

void peer_optimizer_set_step(peer_optimizer *o, int64_t step) { o->step = step; }

int peer_optimizer_n_states(const peer_optimizer *o) { return o ? o->n_states : 0; }

peer_status peer_optimizer_state(peer_optimizer *o, int i, peer_tensor *out) {
  if (!o || !out) return peer_fail(PEER_ERR_INVALID_ARGUMENT, "optimizer_state: NULL argument");
  if (i < 0 || i >= o->n_states)
    return peer_fail(PEER_ERR_INVALID_ARGUMENT, "optimizer_state: index %d not in [0, %d)", i,
                     o->n_states);
  *out = o->state[i];
  return PEER_OK;
}

static const peer_tensor *find_state(const peer_optimizer *o, const char *name) {
  for (int i = 0; i < o->n_states; i++)
    if (strcmp(o->state[i].name, name) == 0) return &o->state[i];
  return NULL;
}

peer_status peer_optimizer_state_by_name(peer_optimizer *o, const char *name, peer_tensor *out) {
  if (!o || !name || !out)
    return peer_fail(PEER_ERR_INVALID_ARGUMENT, "optimizer_state_by_name: NULL argument");
  const peer_tensor *t = find_state(o, name);
  if (!t) return peer_fail(PEER_ERR_INVALID_ARGUMENT, "optimizer keeps no state named '%s'", name);
  *out = *t;
  return PEER_OK;
}

/* -------------------------------------------------------------- the rules */

/* Per-step coefficients of one rule (optim_rule.h, shared with the CUDA
 * backend's step). */
typedef peer_optim_rule rule;

static rule make_rule(const peer_optim_config *c, peer_optim_kind kind, float lr, float decay,
                      int64_t t) {
  rule r = {.kind = kind,
            .lr = lr,
            .keep = 1.0f - lr * decay,
            .momentum = c->momentum,
            .b1 = c->beta1,
            .b2 = c->beta2,
            .eps = c->eps};
  if (kind == PEER_OPTIM_ADAM) {
    double bc1 = 1.0 - pow((double)c->beta1, (double)t);
    double bc2 = 1.0 - pow((double)c->beta2, (double)t);
    r.step_size = (float)((double)lr / bc1);
    r.rsqrt_bc2 = (float)(1.0 / sqrt(bc2));
  }
  return r;
}

/* The new value of one weight p with gradient g; m and v are its state
 * (Adam: both; SGD: m is the momentum buffer or NULL). */
static inline float update(const rule *r, float p, float g, float *m, float *v) {
  return peer_optim_update(r, p, g, m, v);
}

/* Apply the rule to n weights starting at element `at` of parameter t. */
static inline void update_span(const rule *r, const peer_tensor *t, size_t at, const float *g,
                               float *m, float *v, size_t n) {
  if (t->dtype == PEER_BF16) {
    uint16_t *p = (uint16_t *)t->data + at;
    for (size_t i = 0; i < n; i++)
      p[i] = peer_f32_to_bf16(
          update(r, peer_bf16_to_f32(p[i]), g[i], m ? m + i : NULL, v ? v + i : NULL));
  } else {
    float *p = (float *)t->data + at;
    for (size_t i = 0; i < n; i++)
      p[i] = update(r, p[i], g[i], m ? m + i : NULL, v ? v + i : NULL);
  }
}

/* What step_dense's and step_experts' items need. */
typedef struct {
  const rule *r;
  const peer_tensor *t;
  const float *g;
  float *m, *v;
  size_t count, w; /* dense: elements; experts: row width */
  const peer_grads *gr;
} step_job;

#define DENSE_CHUNK 4096 /* elements per item of a dense update */

static void dense_chunk(void *job, int64_t c, int slot) {
  const step_job *j = job;
  size_t at = (size_t)c * DENSE_CHUNK;
  size_t n = j->count - at < DENSE_CHUNK ? j->count - at : DENSE_CHUNK;
  (void)slot;
  update_span(j->r, j->t, at, j->g + at, j->m ? j->m + at : NULL, j->v ? j->v + at : NULL, n);
}

static void step_dense(peer_optimizer *o, int slot, const float *g, const rule *r, int P) {
  const peer_tensor *t = &o->layer->slot[slot];
  step_job j = {r, t, g, o->m[slot], o->v[slot], t->nbytes / sizeof(float), 0, NULL};
  peer_parallel(j.count > PAR_MIN ? P : 1, (int64_t)((j.count + DENSE_CHUNK - 1) / DENSE_CHUNK),
                dense_chunk, &j);
}

static void expert_rows_range(void *job, int64_t j0, int64_t j1, int slot) {
  const step_job *s = job;
  const size_t w = s->w;
  const peer_grads *gr = s->gr;
  (void)slot;
  for (int64_t j = j0; j < j1; j++) {
    size_t row = (size_t)gr->expert_rows[j], at = row * w;
    const float *grow = s->g + (gr->experts_dense ? row : (size_t)j) * w;
    update_span(s->r, s->t, at, grow, s->m ? s->m + at : NULL, s->v ? s->v + at : NULL, w);
  }
}

/* Lazy update of the listed rows of one expert table.  Rows are as wide as
 * the table: d_model, or a shard's d/P columns (peer_shard_optimizer_step),
 * whose gradient rows are as wide; the rules are elementwise, so a shard's
 * step is that slice of the unsharded one. */
static void step_experts(peer_optimizer *o, int slot, const peer_grads *gr, const float *g,
                         const rule *r, int P) {
  const peer_tensor *t = &o->layer->slot[slot];
  step_job j = {r, t, g, o->m[slot], o->v[slot], 0, (size_t)t->shape[1], gr};
  const int64_t R = gr->n_expert_rows;
  peer_parallel_ranges(R * (int64_t)j.w > PAR_MIN ? P : 1, R, 64, expert_rows_range, &j);
}

/* ------------------------------------------------------------- the step */

typedef struct {
  const float *x;      /* values, or rows of w values: row j at rows[j] * w */
  const int64_t *rows; /* (NULL: at j * w) */
  int64_t w;
  _Atomic int64_t bad; /* the smallest bad index: element, or row * w + column */
} finite_job;

static void note_first(_Atomic int64_t *bad, int64_t i) {
  int64_t cur = atomic_load_explicit(bad, memory_order_relaxed);
  while (i < cur && !atomic_compare_exchange_weak(bad, &cur, i)) {
  }
}

static void finite_range(void *job, int64_t i0, int64_t i1, int slot) {
  finite_job *j = job;
  (void)slot;
  for (int64_t i = i0; i < i1; i++)
    if (!isfinite(j->x[i])) {
      note_first(&j->bad, i);
      return;
    }
}

/* Index of the first non-finite value among n, or -1. */
static int64_t first_nonfinite(const float *x, int64_t n, int P) {
  finite_job j = {x, NULL, 1, n};
  peer_parallel_ranges(n > PAR_MIN ? P : 1, n, 1 << 14, finite_range, &j);
  int64_t bad = atomic_load(&j.bad);
  return bad < n ? bad : -1;
}

/* Rows j0..j1 of expert gradient rows (check_expert_grads). */
static void finite_rows(void *job, int64_t j0, int64_t j1, int slot) {
  finite_job *j = job;
  (void)slot;
  for (int64_t r = j0; r < j1; r++) {
    const float *row = j->x + (j->rows ? j->rows[r] : r) * j->w;
    for (int64_t i = 0; i < j->w; i++)
      if (!isfinite(row[i])) {
        note_first(&j->bad, r * j->w + i);
        return;
      }
  }
}

static peer_status check_dense_grads(const peer_optimizer *o, const peer_grads *g, int P) {
  const peer_layer *L = o->layer;
  for (int i = 0; i < N_DENSE; i++) {
    int slot = dense_slots[i];
    const float *gs = dense_grad(g, slot);
    if (!gs) continue;
    const peer_tensor *t = &L->slot[slot];
    if (!t->data)
      return peer_fail(PEER_ERR_INVALID_ARGUMENT,
                       "optimizer_step: grads.%s is given but the layer has no such parameter",
                       peer_grad_name(slot));
    int64_t bad = first_nonfinite(gs, (int64_t)(t->nbytes / sizeof(float)), P);
    if (bad >= 0)
      return peer_fail(PEER_ERR_NONFINITE,
                       "optimizer_step: grads.%s[%lld] is %g; nothing was updated",
                       peer_grad_name(slot), (long long)bad, (double)gs[bad]);
  }
  return PEER_OK;
}

/* The expert triple: rows strictly ascending in [0, N), gradient rows as
 * wide as the tables (step_experts) and finite; a bad element is named by
 * its column of the unsharded table. */
static peer_status check_expert_grads(const peer_optimizer *o, const peer_grads *g, int P) {
  const peer_layer *L = o->layer;
  const peer_dims *D = &L->dims;
  const int64_t w = L->slot[PEER_P_EXPERTS_DOWN].shape[1];
  if (!g->experts_down || !g->experts_up || !g->expert_rows)
    return peer_fail(PEER_ERR_INVALID_ARGUMENT,
                     "optimizer_step: expert_rows, experts_down and experts_up go together");
  const int64_t R = g->n_expert_rows;
  const int64_t most = g->experts_dense ? D->N : g->expert_capacity;
  if (R < 0 || R > most || R > D->N)
    return peer_fail(PEER_ERR_INVALID_ARGUMENT,
                     "optimizer_step: n_expert_rows %lld not in [0, %lld] (%s)", (long long)R,
                     (long long)(most < D->N ? most : D->N),
                     g->experts_dense ? "N" : "expert_capacity, N");
  for (int64_t j = 0; j < R; j++) {
    int64_t r = g->expert_rows[j];
    if (r < 0 || r >= D->N || (j > 0 && r <= g->expert_rows[j - 1]))
      return peer_fail(PEER_ERR_INVALID_ARGUMENT,
                       "optimizer_step: expert_rows[%lld] = %lld: rows must be strictly "
                       "ascending in [0, %lld)",
                       (long long)j, (long long)r, (long long)D->N);
  }
  const float *tables[2] = {g->experts_down, g->experts_up};
  for (int s = 0; s < 2; s++) {
    finite_job j = {tables[s], g->experts_dense ? g->expert_rows : NULL, w, R * w};
    peer_parallel_ranges(R * w > PAR_MIN ? P : 1, R, 64, finite_rows, &j);
    const int64_t bad = atomic_load(&j.bad), bad_j = bad < R * w ? bad / w : -1, bad_i = bad % w;
    if (bad_j >= 0)
      return peer_fail(PEER_ERR_NONFINITE,
                       "optimizer_step: grads.%s of expert %lld, element %lld, is not finite; "
                       "nothing was updated",
                       peer_grad_name(expert_slots[s]), (long long)g->expert_rows[bad_j],
                       (long long)(L->expert_col0 + bad_i));
  }
  return PEER_OK;
}

static peer_status optimizer_step(peer_optimizer *o, const peer_grads *g);

/* The step t = o->step + 1 as a backend's optimizer_step takes it: the
 * rules, the gradients by slot, the state; the caller sets where the
 * gradients live and the expert row count. */
static void plan_step(const peer_optimizer *o, const peer_grads *g, peer_optim_plan *p) {
  const int64_t t = o->step + 1;
  const peer_optim_config *c = &o->cfg;
  memset(p, 0, sizeof *p);
  p->dense = make_rule(c, c->kind, c->lr, c->weight_decay, t);
  p->rows = make_rule(c, c->expert_kind, c->expert_lr > 0.0f ? c->expert_lr : c->lr, 0.0f, t);
  for (int i = 0; i < N_DENSE; i++)
    p->grad[dense_slots[i]] = dense_grad(g, dense_slots[i]);
  if (g->experts_down || g->experts_up || g->expert_rows) {
    p->grad[PEER_P_EXPERTS_DOWN] = g->experts_down;
    p->grad[PEER_P_EXPERTS_UP] = g->experts_up;
    p->expert_rows = g->expert_rows;
    p->expert_capacity = g->expert_capacity;
    p->experts_dense = g->experts_dense != 0;
  }
  memcpy(p->m, o->m, sizeof p->m);
  memcpy(p->v, o->v, sizeof p->v);
}

/* The device-pointer step (peer_cuda_optimizer_step): the gradients are
 * the backend's device memory, checked for shape here but not read; the
 * expert row count is *d_n_rows on the device, or g->n_expert_rows when
 * d_n_rows is NULL.  Queued on `stream`. */
static peer_status device_step(peer_optimizer *o, const peer_grads *g, const int64_t *d_n_rows,
                               void *stream, const char *what) {
  const peer_layer *L = o->layer;
  const peer_dims *D = &L->dims;
  for (int i = 0; i < N_DENSE; i++) {
    int slot = dense_slots[i];
    if (dense_grad(g, slot) && !L->slot[slot].data)
      return peer_fail(PEER_ERR_INVALID_ARGUMENT,
                       "%s: grads.%s is given but the layer has no such parameter", what,
                       peer_grad_name(slot));
  }
  const bool experts = g->experts_down || g->experts_up || g->expert_rows;
  if (experts) {
    if (!g->experts_down || !g->experts_up || !g->expert_rows)
      return peer_fail(PEER_ERR_INVALID_ARGUMENT,
                       "%s: expert_rows, experts_down and experts_up go together", what);
    if (!g->experts_dense && g->expert_capacity < 0)
      return peer_fail(PEER_ERR_INVALID_ARGUMENT, "%s: expert_capacity %lld is negative", what,
                       (long long)g->expert_capacity);
    const int64_t most = g->experts_dense ? D->N : g->expert_capacity;
    if (!d_n_rows && (g->n_expert_rows < 0 || g->n_expert_rows > most || g->n_expert_rows > D->N))
      return peer_fail(PEER_ERR_INVALID_ARGUMENT, "%s: n_expert_rows %lld not in [0, %lld]", what,
                       (long long)g->n_expert_rows, (long long)(most < D->N ? most : D->N));
  }
  peer_optim_plan plan;
  plan_step(o, g, &plan);
  if (experts) {
    int64_t cap = g->experts_dense ? D->N : g->expert_capacity;
    plan.expert_capacity = cap < D->N ? cap : D->N;
  }
  plan.n_expert_rows = g->n_expert_rows;
  plan.d_n_expert_rows = d_n_rows;
  plan.stream = stream;
  peer_status st = o->layer->backend->optimizer_step(o->layer, &plan, &o->stage, &o->stage_bytes);
  if (!st) o->step++;
  return st;
}

peer_status peer_optimizer_step_device(peer_optimizer *o, const peer_grads *g,
                                       const int64_t *d_n_rows, void *stream, const char *what) {
  if (!o || !g) return peer_fail(PEER_ERR_INVALID_ARGUMENT, "%s: NULL argument", what);
  if (!o->layer->backend->optimizer_step || o->layer->opt.backend == PEER_BACKEND_CPU)
    return peer_fail(PEER_ERR_INVALID_ARGUMENT, "%s: the optimizer's layer is not on a device",
                     what);
  peer_status st = peer_layer_enter(o->layer, what);
  if (st) return st;
  st = device_step(o, g, d_n_rows, stream, what);
  peer_layer_leave(o->layer);
  return st;
}

peer_status peer_optimizer_step(peer_optimizer *o, const peer_grads *g) {
  if (!o || !g) return peer_fail(PEER_ERR_INVALID_ARGUMENT, "optimizer_step: NULL argument");
  peer_status st = peer_layer_enter(o->layer, "optimizer_step");
  if (st) return st;
  st = optimizer_step(o, g);
  peer_layer_leave(o->layer);
  return st;
}

static peer_status optimizer_step(peer_optimizer *o, const peer_grads *g) {
  const int P = peer_layer_threads(o->layer);
  const bool experts = g->experts_down || g->experts_up || g->expert_rows;
  peer_status st = check_dense_grads(o, g, P);
  if (st || (experts && (st = check_expert_grads(o, g, P)))) return st;

  const int64_t t = o->step + 1;
  const peer_optim_config *c = &o->cfg;
  rule dense = make_rule(c, c->kind, c->lr, c->weight_decay, t);
  if (o->layer->backend->optimizer_step) {
    peer_optim_plan plan;
    plan_step(o, g, &plan);
    plan.host_grads = true;
    plan.n_expert_rows = g->n_expert_rows;
    if ((st = o->layer->backend->optimizer_step(o->layer, &plan, &o->stage, &o->stage_bytes)))
      return st;
    o->step = t;
    return PEER_OK;
  }
  for (int i = 0; i < N_DENSE; i++) {
    const float *gs = dense_grad(g, dense_slots[i]);
    if (gs) step_dense(o, dense_slots[i], gs, &dense, P);
  }
  if (experts) {
    rule rows = make_rule(c, c->expert_kind, c->expert_lr > 0.0f ? c->expert_lr : c->lr, 0.0f, t);
    step_experts(o, PEER_P_EXPERTS_DOWN, g, g->experts_down, &rows, P);
    step_experts(o, PEER_P_EXPERTS_UP, g, g->experts_up, &rows, P);
  }
  o->step = t;
  return PEER_OK;
}

/* ---------------------------------------------------------- checkpoints */

/* The stamp catches an optimizer of a freed layer whose address a new layer
 * took over; o->layer itself is never read here. */
peer_status peer_optimizer_check_layer(const peer_optimizer *o, const peer_layer *L,
                                       const char *what) {
  if (o && (o->layer != L || o->layer_id != L->id))
    return peer_fail(PEER_ERR_INVALID_ARGUMENT, "%s: the optimizer belongs to another layer", what);
  return PEER_OK;
}

static peer_status check_pair(const peer_layer *L, const peer_optimizer *o, const char *what) {
  if (!L) return peer_fail(PEER_ERR_INVALID_ARGUMENT, "%s: NULL layer", what);
  peer_status st = peer_optimizer_check_layer(o, L, what);
  if (st) return st;
  if (L->backend->download && L->backend->upload) return PEER_OK; /* staged through the host */
  return check_host_layer(L, what);
}

static peer_status checkpoint_save(const peer_layer *L, const peer_optimizer *o, const char *path);

peer_status peer_checkpoint_save(const peer_layer *L, const peer_optimizer *o, const char *path) {
  peer_status st = check_pair(L, o, "checkpoint_save");
  if (st) return st;
  if (!path) return peer_fail(PEER_ERR_INVALID_ARGUMENT, "checkpoint_save: NULL path");
  if ((st = peer_layer_enter(L, "checkpoint_save"))) return st;
  st = checkpoint_save(L, o, path);
  peer_layer_leave(L);
  return st;
}

const char *const peer_optim_meta_keys[PEER_OPTIM_META_N] = {
    META_PREFIX "optim.lr", META_PREFIX "optim.momentum", META_PREFIX "optim.beta1",
    META_PREFIX "optim.beta2", META_PREFIX "optim.eps", META_PREFIX "optim.weight_decay",
    META_PREFIX "optim.expert_lr", KIND_KEY, EXPERT_KIND_KEY, STEP_KEY};

void peer_optimizer_meta_of(const peer_optimizer *o, peer_optim_meta *m) {
  const peer_optim_config *c = &o->cfg;
  const float hyper[] = {c->lr,  c->momentum,     c->beta1,    c->beta2,
                         c->eps, c->weight_decay, c->expert_lr};
  const int n_hyper = (int)(sizeof hyper / sizeof hyper[0]);
  _Static_assert(sizeof hyper / sizeof hyper[0] + 3 == PEER_OPTIM_META_N,
                 "the hyperparameters, the two kinds and the step");
  for (int i = 0; i < n_hyper; i++)
    snprintf(m->value[i], sizeof m->value[i], "%.9g", (double)hyper[i]);
  snprintf(m->value[n_hyper], sizeof m->value[0], "%s", kind_name(c->kind));
  snprintf(m->value[n_hyper + 1], sizeof m->value[0], "%s", kind_name(c->expert_kind));
  snprintf(m->value[n_hyper + 2], sizeof m->value[0], "%lld", (long long)o->step);
  for (int i = 0; i < PEER_OPTIM_META_N; i++) {
    m->pair[2 * i] = peer_optim_meta_keys[i];
    m->pair[2 * i + 1] = m->value[i];
  }
}

static peer_status checkpoint_save(const peer_layer *L, const peer_optimizer *o, const char *path) {
  peer_layer_meta lm;
  peer_status st = peer_layer_meta_of(&L->cfg, &lm);
  if (st) return st;

  /* the layer's pairs, then the optimizer's */
  const char *meta[2 * (MAX_FIELDS + 1 + PEER_OPTIM_META_N)];
  memcpy(meta, lm.pair, sizeof(char *) * 2 * (size_t)lm.n_pairs);
  int n_meta = lm.n_pairs;
  peer_optim_meta om;
  if (o) {
    peer_optimizer_meta_of(o, &om);
    memcpy(meta + 2 * n_meta, om.pair, sizeof om.pair);
    n_meta += PEER_OPTIM_META_N;
  }

  peer_tensor tensors[PEER_P_COUNT + MAX_STATES];
  int n = 0;
  for (int i = 0; i < L->n_params; i++)
    tensors[n++] = L->slot[L->param_slot[i]];
  for (int i = 0; o && i < o->n_states; i++)
    tensors[n++] = o->state[i];
  if ((st = peer_tensors_to_host(L, tensors, n, "checkpoint_save"))) return st;
  st = peer_safetensors_write(path, tensors, n, meta, n_meta);
  peer_tensors_host_free(L, tensors, n);
  return st;
}

/* The optimizer's kinds and the step, from metadata. */
peer_status peer_optimizer_file_meta(const peer_safetensors *f, const char *path,
                                     const peer_optimizer *o, int64_t *step) {
  const char *s = peer_safetensors_metadata(f, STEP_KEY);
  if (!s)
    return peer_fail(PEER_ERR_FORMAT,
                     "%s: metadata '%s' is missing: the file holds no optimizer state (load it "
                     "with a NULL optimizer)",
                     path, STEP_KEY);
  if (!peer_parse_i64(s, 0, INT64_MAX - 1, step))
    return peer_fail(PEER_ERR_FORMAT, "%s: metadata '%s' = '%.40s' is not a step count", path,
                     STEP_KEY, s);
  const char *keys[2] = {KIND_KEY, EXPERT_KIND_KEY};
  const char *want[2] = {kind_name(o->cfg.kind), kind_name(o->cfg.expert_kind)};
  for (int i = 0; i < 2; i++) {
    const char *have = peer_safetensors_metadata(f, keys[i]);
    if (!have) return peer_fail(PEER_ERR_FORMAT, "%s: metadata '%s' is missing", path, keys[i]);
    if (strcmp(have, want[i]) != 0)
      return peer_fail(PEER_ERR_FORMAT,
                       "%s: the checkpoint was saved with %s = '%.40s', this optimizer has '%s'",
                       path, keys[i], have, want[i]);
  }
  return PEER_OK;
}

/* Everything is checked (layerfile.c) before anything is read. */
static peer_status load_checked(peer_layer *L, peer_optimizer *o, const peer_safetensors *f,
                                const char *path) {
  peer_status st = peer_file_same_config(f, path, &L->cfg);
  int64_t step = 0;
  if (st || (o && (st = peer_optimizer_file_meta(f, path, o, &step)))) return st;
  peer_tensor want[PEER_P_COUNT + MAX_STATES];
  int n = 0;
  for (int i = 0; i < L->n_params; i++)
    want[n++] = L->slot[L->param_slot[i]];
  for (int i = 0; o && i < o->n_states; i++)
    want[n++] = o->state[i];
  char state_desc[96];
  if (o)
    snprintf(state_desc, sizeof state_desc, "this optimizer (%s, momentum %g)",
             kind_name(o->cfg.kind), (double)o->cfg.momentum);
  const peer_file_want w = {.t = want,
                            .n = n,
                            .skip_prefix = o ? NULL : STATE_PREFIX,
                            .layer_desc = "this layer",
                            .state_desc = o ? state_desc : NULL};
  if ((st = peer_file_check(f, path, &w)) || (st = peer_file_read_into(L, f, &w))) return st;
  if (o) o->step = step;
  return PEER_OK;
}

peer_status peer_checkpoint_load(peer_layer *L, peer_optimizer *o, const char *path) {
  peer_status st = check_pair(L, o, "checkpoint_load");
  if (st) return st;
  if (!path) return peer_fail(PEER_ERR_INVALID_ARGUMENT, "checkpoint_load: NULL path");
  peer_safetensors *f = NULL;
  if ((st = peer_safetensors_open(&f, path))) return st;
  if (!(st = peer_layer_enter(L, "checkpoint_load"))) {
    st = load_checked(L, o, f, path);
    peer_layer_leave(L);
  }
  peer_safetensors_close(f);
  return st;
}
