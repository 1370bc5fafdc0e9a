/* test_optim.c: optimizers and checkpoints.  Every optimizer step is checked
 * against a float64 reference of the update rules written plainly here
 * (SGD with and without momentum, decoupled weight decay, Adam, AdamW, lazy
 * sparse SGD and Adam for the expert rows at their own learning rate, with
 * bias correction by the global step), over several steps and fresh random
 * gradients; rows a step does not list must keep their values and moments
 * bit for bit.  Checkpoints: bit-exact round trips, training that continues
 * identically after a reload, an interrupted save that leaves the previous
 * file intact, and refusals (another layer config, another optimizer kind,
 * missing or extra state) that name what differs. */
#define _GNU_SOURCE /* nftw, mkdtemp */
#include <criterion/criterion.h>
#include <criterion/logging.h>

#include <errno.h>
#include <ftw.h>
#include <sys/stat.h>

#include "cases.h"
#include "reference.h"
#include "tempdir.h"

/* Agreement with the float64 reference: |got - ref| <= TOL * max|ref| over
 * the tensor (f32 rounding over a few steps is a few 1e-7 of that). */
#define TOL 1e-6

/* ---------------------------------------------------------------- fixture */

static uint64_t seed;
static ref_rng rng;

static void setup(void) {
  test_dir_make("optim");
  seed = ref_test_seed();
  rng.s = seed;
  cr_log_info("seed %llu (PEER_TEST_SEED replays it)", (unsigned long long)seed);
}

static void teardown(void) { test_dir_remove(); }

TestSuite(optim, .init = setup, .fini = teardown);
TestSuite(checkpoint, .init = setup, .fini = teardown);

/* ------------------------------------------------------------------ layers */

/* The layer most tests train: bias and batch norm on, so that every kind of
 * parameter is there. */
static layer_case small_case(void) {
  return case_make("d_model=8,n_heads=2,d_key=4,n_subkeys=4,top_k=2,query_bias=1,"
                   "query_norm=batchnorm,weight_dtype=f32,activation=gelu",
                   0);
}

/* The case's layer, filled with random parameters. */
static peer_layer *make_layer(const layer_case *c) {
  peer_layer *L = case_layer(c);
  ref_fill_layer(L, &rng);
  return L;
}

static peer_optimizer *make_opt(peer_layer *L, const peer_optim_config *cfg) {
  peer_optimizer *o = NULL;
  cr_assert_eq(peer_optimizer_create(&o, L, cfg), PEER_OK, "%s", peer_last_error());
  return o;
}

/* The trainable parameters, as PEER.md names them. */
static const char *const trained[] = {"query.weight",    "query.bias", "query.norm.weight",
                                      "query.norm.bias", "keys",       "experts.down",
                                      "experts.up"};
#define N_TRAINED 7
#define FIRST_EXPERT 5

/* ------------------------------------------------------------ gradients */

/* Caller-style gradient buffers for a layer: dense ones for every parameter
 * it has, experts sparse ([cap, d]) or dense ([N, d]). */
typedef struct grads {
  peer_grads g;
  float *dense[FIRST_EXPERT]; /* by trained[] index; NULL when absent */
  int64_t count[FIRST_EXPERT];
  int64_t d, N, cap;
} grads;

static void grads_init(grads *b, peer_layer *L, int64_t cap, int experts_dense) {
  memset(b, 0, sizeof *b);
  const peer_config *c = peer_layer_config(L);
  b->d = c->d_model;
  b->N = c->n_subkeys * c->n_subkeys;
  b->cap = cap;
  for (int i = 0; i < FIRST_EXPERT; i++) {
    peer_tensor t;
    b->count[i] = ref_param_count(L, trained[i], &t);
    b->dense[i] = b->count[i] ? calloc((size_t)b->count[i], sizeof(float)) : NULL;
  }
  b->g.query_weight = b->dense[0];
  b->g.query_bias = b->dense[1];
  b->g.norm_weight = b->dense[2];
  b->g.norm_bias = b->dense[3];
  b->g.keys = b->dense[4];
  b->g.experts_dense = experts_dense;
  b->g.expert_capacity = cap;
  int64_t rows = experts_dense ? b->N : cap;
  b->g.expert_rows = calloc((size_t)cap, sizeof(int64_t));
  b->g.experts_down = calloc((size_t)(rows * b->d), sizeof(float));
  b->g.experts_up = calloc((size_t)(rows * b->d), sizeof(float));
}

static void grads_free(grads *b) {
  for (int i = 0; i < FIRST_EXPERT; i++)
    free(b->dense[i]);
  free(b->g.expert_rows);
  free(b->g.experts_down);
  free(b->g.experts_up);
}

/* The gradient row of list entry j of expert table s (0 down, 1 up). */
static float *grad_row(const grads *b, int s, int64_t j) {
  float *t = s ? b->g.experts_up : b->g.experts_down;
  return t + (b->g.experts_dense ? b->g.expert_rows[j] : j) * b->d;
}

/* Fresh random gradients: every dense one, and the expert rows each listed
 * with probability 1/2 (at least one, at most cap). */
static void random_grads(grads *b) {
  for (int i = 0; i < FIRST_EXPERT; i++)
    for (int64_t j = 0; j < b->count[i]; j++)
      b->dense[i][j] = (float)ref_uniform(&rng, -1, 1);
  int64_t R = 0;
  for (int64_t r = 0; r < b->N && R < b->cap; r++)
    if (ref_next(&rng) & 1) b->g.expert_rows[R++] = r;
  if (R == 0) b->g.expert_rows[R++] = ref_int(&rng, 0, b->N - 1);
  b->g.n_expert_rows = R;
  for (int s = 0; s < 2; s++)
    for (int64_t j = 0; j < R; j++) {
      float *row = grad_row(b, s, j);
      for (int64_t i = 0; i < b->d; i++)
        row[i] = (float)ref_uniform(&rng, -1, 1);
    }
}

/* ------------------------------------------------------- the reference */

/* float64 copies of the trained parameters and their optimizer state. */
typedef struct ref_opt {
  peer_optim_config cfg;
  int64_t t;
  int64_t count[N_TRAINED], d;
  double *p[N_TRAINED], *m[N_TRAINED], *v[N_TRAINED];
} ref_opt;

static double load_elem(const peer_tensor *t, int64_t i) {
  return t->dtype == PEER_BF16 ? (double)ref_bf16_to_float(((const uint16_t *)t->data)[i])
                               : (double)((const float *)t->data)[i];
}

static void ref_init(ref_opt *r, peer_layer *L, const peer_optim_config *cfg) {
  memset(r, 0, sizeof *r);
  r->cfg = *cfg;
  r->d = peer_layer_config(L)->d_model;
  for (int i = 0; i < N_TRAINED; i++) {
    peer_tensor t;
    r->count[i] = ref_param_count(L, trained[i], &t);
    if (!r->count[i]) continue;
    size_t n = (size_t)r->count[i];
    r->p[i] = malloc(n * sizeof(double));
    r->m[i] = calloc(n, sizeof(double));
    r->v[i] = calloc(n, sizeof(double));
    for (int64_t j = 0; j < r->count[i]; j++)
      r->p[i][j] = load_elem(&t, j);
  }
}

static void ref_free(ref_opt *r) {
  for (int i = 0; i < N_TRAINED; i++)
    free(r->p[i]), free(r->m[i]), free(r->v[i]);
}

/* One weight under one rule, as the textbooks (and torch) write it. */
static void ref_update(const peer_optim_config *c, peer_optim_kind kind, double lr, double wd,
                       int64_t t, double *p, double g, double *m, double *v, int momentum) {
  double decayed = *p - lr * wd * *p;
  if (kind == PEER_OPTIM_ADAM) {
    double b1 = c->beta1, b2 = c->beta2;
    *m = b1 * *m + (1 - b1) * g;
    *v = b2 * *v + (1 - b2) * g * g;
    double mhat = *m / (1 - pow(b1, (double)t)), vhat = *v / (1 - pow(b2, (double)t));
    *p = decayed - lr * mhat / (sqrt(vhat) + c->eps);
  } else {
    if (momentum) {
      *m = c->momentum * *m + g;
      g = *m;
    }
    *p = decayed - lr * g;
  }
}

static void ref_step(ref_opt *r, const grads *b) {
  const peer_optim_config *c = &r->cfg;
  r->t++;
  for (int i = 0; i < FIRST_EXPERT; i++) {
    if (!r->count[i] || !b->dense[i]) continue;
    for (int64_t j = 0; j < r->count[i]; j++)
      ref_update(c, c->kind, c->lr, c->weight_decay, r->t, &r->p[i][j], b->dense[i][j], &r->m[i][j],
                 &r->v[i][j], c->momentum > 0);
  }
  double elr = c->expert_lr > 0 ? c->expert_lr : c->lr;
  for (int s = 0; s < 2; s++) {
    int i = FIRST_EXPERT + s;
    for (int64_t j = 0; j < b->g.n_expert_rows; j++) {
      int64_t at = b->g.expert_rows[j] * r->d;
      const float *g = grad_row(b, s, j);
      for (int64_t e = 0; e < r->d; e++)
        ref_update(c, c->expert_kind, elr, 0.0, r->t, &r->p[i][at + e], g[e], &r->m[i][at + e],
                   &r->v[i][at + e], 0);
    }
  }
}

/* After a step that rounded bf16 weights: the reference continues from the
 * stored (rounded) values, as the layer does. */
static void ref_resync_bf16(ref_opt *r, peer_layer *L) {
  for (int i = FIRST_EXPERT; i < N_TRAINED; i++) {
    peer_tensor t;
    ref_param_count(L, trained[i], &t);
    if (t.dtype != PEER_BF16) continue;
    for (int64_t j = 0; j < r->count[i]; j++)
      r->p[i][j] = load_elem(&t, j);
  }
}

static double max_abs(const double *v, int64_t n) {
  double m = 0;
  for (int64_t i = 0; i < n; i++)
    m = fmax(m, fabs(v[i]));
  return m;
}

/* A tensor of the layer or the optimizer against its reference: f32 within
 * TOL of the tensor's scale; bf16 within one bf16 rounding of the exact
 * value. */
static void expect_close(const char *what, const peer_tensor *t, const double *ref, int64_t n,
                         int step) {
  double scale = max_abs(ref, n), worst = 0;
  int64_t at = -1;
  for (int64_t i = 0; i < n; i++) {
    double got = load_elem(t, i), e = fabs(got - ref[i]);
    double tol = t->dtype == PEER_BF16 ? fabs(ref[i]) * 0x1p-8 + 1e-30 : TOL * scale + 1e-30;
    if (!(e <= tol) && (at < 0 || e > worst)) worst = e, at = i;
  }
  if (at >= 0)
    cr_expect_fail("step %d: %s[%lld] is %.9g, reference %.9g (max|ref| %.3g) seed %llu", step,
                   what, (long long)at, load_elem(t, at), ref[at], scale, (unsigned long long)seed);
}

static void expect_matches(peer_layer *L, peer_optimizer *o, const ref_opt *r, int step) {
  for (int i = 0; i < N_TRAINED; i++) {
    if (!r->count[i]) continue;
    peer_tensor t;
    cr_assert_eq(peer_layer_param_by_name(L, trained[i], &t), PEER_OK);
    expect_close(trained[i], &t, r->p[i], r->count[i], step);
    peer_optim_kind kind = i < FIRST_EXPERT ? r->cfg.kind : r->cfg.expert_kind;
    const char *suffix[2] = {"m", "v"};
    int n_state = kind == PEER_OPTIM_ADAM ? 2 : (i < FIRST_EXPERT && r->cfg.momentum > 0);
    if (kind == PEER_OPTIM_SGD) suffix[0] = "momentum";
    for (int s = 0; s < n_state; s++) {
      char name[64];
      snprintf(name, sizeof name, "optim.%s.%s", trained[i], suffix[s]);
      cr_assert_eq(peer_optimizer_state_by_name(o, name, &t), PEER_OK, "%s", peer_last_error());
      expect_close(name, &t, s ? r->v[i] : r->m[i], r->count[i], step);
    }
  }
  cr_expect_eq(peer_optimizer_step_count(o), r->t);
}

/* Copies of the expert tables and their state, to check untouched rows. */
typedef struct snapshot {
  int n;
  peer_tensor t[6];
  void *copy[6];
} snapshot;

static void snap_add(snapshot *s, const peer_tensor *t) {
  s->t[s->n] = *t;
  s->copy[s->n] = malloc(t->nbytes);
  memcpy(s->copy[s->n], t->data, t->nbytes);
  s->n++;
}

static void snap_take(snapshot *s, peer_layer *L, peer_optimizer *o) {
  s->n = 0;
  for (int i = FIRST_EXPERT; i < N_TRAINED; i++) {
    peer_tensor t;
    cr_assert_eq(peer_layer_param_by_name(L, trained[i], &t), PEER_OK);
    snap_add(s, &t);
    const char *suffix[] = {"m", "v", "momentum"};
    for (int k = 0; k < 3; k++) {
      char name[64];
      snprintf(name, sizeof name, "optim.%s.%s", trained[i], suffix[k]);
      if (peer_optimizer_state_by_name(o, name, &t) == PEER_OK) snap_add(s, &t);
    }
  }
}

static void snap_free(snapshot *s) {
  for (int i = 0; i < s->n; i++)
    free(s->copy[i]);
  s->n = 0;
}

/* Rows not in the step's list are the same bits as before it. */
static void expect_untouched_rows(const snapshot *s, const grads *b, int step) {
  for (int k = 0; k < s->n; k++) {
    const peer_tensor *t = &s->t[k];
    size_t row_bytes = t->nbytes / (size_t)t->shape[0];
    int64_t j = 0;
    for (int64_t r = 0; r < t->shape[0]; r++) {
      if (j < b->g.n_expert_rows && b->g.expert_rows[j] == r) {
        j++;
        continue;
      }
      size_t at = (size_t)r * row_bytes;
      if (memcmp((char *)t->data + at, (char *)s->copy[k] + at, row_bytes) != 0) {
        cr_expect_fail("step %d: %s row %lld changed though the step did not list it", step,
                       t->name, (long long)r);
        return;
      }
    }
  }
}

/* Run `steps` steps of random gradients through optimizer and reference. */
static void run_against_reference(const layer_case *lc, const peer_optim_config *cfg, int steps,
                                  int experts_dense) {
  peer_layer *L = make_layer(lc);
  peer_optimizer *o = make_opt(L, cfg);
  ref_opt r;
  ref_init(&r, L, cfg);
  grads b;
  grads_init(&b, L, 12, experts_dense);
  for (int s = 1; s <= steps; s++) {
    random_grads(&b);
    snapshot snap;
    snap_take(&snap, L, o);
    cr_assert_eq(peer_optimizer_step(o, &b.g), PEER_OK, "%s", peer_last_error());
    ref_step(&r, &b);
    expect_matches(L, o, &r, s);
    expect_untouched_rows(&snap, &b, s);
    snap_free(&snap);
    ref_resync_bf16(&r, L);
  }
  grads_free(&b);
  ref_free(&r);
  peer_optimizer_free(o);
  peer_layer_free(L);
}

/* ------------------------------------------------------- update rules */

Test(optim, config_default) {
  peer_optim_config c = peer_optim_config_default();
  cr_expect_eq(c.kind, PEER_OPTIM_ADAM);
  cr_expect_eq(c.expert_kind, PEER_OPTIM_ADAM);
  cr_expect_eq(c.lr, 1e-3f);
  cr_expect_eq(c.beta1, 0.9f);
  cr_expect_eq(c.beta2, 0.999f);
  cr_expect_eq(c.eps, 1e-8f);
  cr_expect_eq(c.weight_decay, 0.0f);
  cr_expect_eq(c.expert_lr, 0.0f);
  cr_expect_eq(peer_optim_config_validate(&c), PEER_OK);
}

Test(optim, sgd_plain) {
  layer_case lc = small_case();
  peer_optim_config c = peer_optim_config_default();
  c.kind = c.expert_kind = PEER_OPTIM_SGD;
  c.lr = 0.1f;
  c.expert_lr = 0.03f;
  run_against_reference(&lc, &c, 4, 0);
  c.expert_lr = 0.0f; /* experts follow lr */
  run_against_reference(&lc, &c, 3, 0);
}

Test(optim, sgd_momentum_weight_decay) {
  layer_case lc = small_case();
  peer_optim_config c = peer_optim_config_default();
  c.kind = c.expert_kind = PEER_OPTIM_SGD;
  c.lr = 0.05f;
  c.momentum = 0.9f;
  c.weight_decay = 0.1f;
  c.expert_lr = 0.2f;
  run_against_reference(&lc, &c, 4, 0);
}

Test(optim, adam) {
  layer_case lc = small_case();
  peer_optim_config c = peer_optim_config_default();
  c.lr = 0.01f;
  c.expert_lr = 0.05f;
  run_against_reference(&lc, &c, 5, 0);
  case_set(&lc, "query_bias=0,query_norm=none");
  c.beta1 = 0.5f;
  c.beta2 = 0.9f;
  c.eps = 1e-3f;
  run_against_reference(&lc, &c, 3, 1);
}

Test(optim, adamw) {
  layer_case lc = small_case();
  peer_optim_config c = peer_optim_config_default();
  c.lr = 0.02f;
  c.weight_decay = 0.5f;
  run_against_reference(&lc, &c, 4, 0);
}

Test(optim, mixed_kinds) {
  layer_case lc = small_case();
  peer_optim_config c = peer_optim_config_default();
  c.kind = PEER_OPTIM_SGD;
  c.momentum = 0.5f;
  c.lr = 0.1f;
  c.expert_kind = PEER_OPTIM_ADAM;
  c.expert_lr = 0.01f;
  run_against_reference(&lc, &c, 3, 0);
  c.kind = PEER_OPTIM_ADAM;
  c.expert_kind = PEER_OPTIM_SGD;
  run_against_reference(&lc, &c, 3, 1);
}

Test(optim, bf16_experts) {
  layer_case lc = small_case();
  case_set(&lc, "weight_dtype=bf16");
  peer_optim_config c = peer_optim_config_default();
  c.lr = 0.01f;
  run_against_reference(&lc, &c, 4, 0);
  c.kind = c.expert_kind = PEER_OPTIM_SGD;
  c.lr = 0.1f;
  run_against_reference(&lc, &c, 3, 0);
}

/* An update below half a bf16 ulp is lost in the weight; the moments still
 * move. */
Test(optim, bf16_small_updates_are_lost) {
  layer_case lc = small_case();
  case_set(&lc, "weight_dtype=bf16");
  peer_layer *L = make_layer(&lc);
  peer_optim_config c = peer_optim_config_default();
  c.lr = 1e-6f;
  peer_optimizer *o = make_opt(L, &c);
  peer_tensor down, m;
  cr_assert_eq(peer_layer_param_by_name(L, "experts.down", &down), PEER_OK);
  cr_assert_eq(peer_optimizer_state_by_name(o, "optim.experts.down.m", &m), PEER_OK);
  uint16_t *w = down.data;
  for (int64_t i = 0; i < lc.d; i++)
    w[i] = ref_float_to_bf16(1.0f); /* ulp 2^-7 */
  grads b;
  grads_init(&b, L, 4, 0);
  b.g.n_expert_rows = 1;
  b.g.expert_rows[0] = 0;
  for (int64_t i = 0; i < lc.d; i++)
    b.g.experts_down[i] = b.g.experts_up[i] = 1.0f;
  cr_assert_eq(peer_optimizer_step(o, &b.g), PEER_OK, "%s", peer_last_error());
  for (int64_t i = 0; i < lc.d; i++) {
    cr_expect_eq(w[i], ref_float_to_bf16(1.0f), "weight %lld moved", (long long)i);
    cr_expect_float_eq(((float *)m.data)[i], 0.1f, 1e-7f);
  }
  grads_free(&b);
  peer_optimizer_free(o);
  peer_layer_free(L);
}

/* The sparse and dense expert gradient formats give the same bits. */
Test(optim, sparse_and_dense_expert_formats_agree) {
  layer_case lc = small_case();
  peer_layer *L1 = make_layer(&lc);
  peer_layer *L2 = NULL;
  cr_assert_eq(peer_layer_create(&L2, peer_layer_config(L1), NULL), PEER_OK);
  for (int i = 0; i < peer_layer_n_params(L1); i++) {
    peer_tensor a, b;
    peer_layer_param(L1, i, &a);
    peer_layer_param(L2, i, &b);
    memcpy(b.data, a.data, a.nbytes);
  }
  peer_optim_config c = peer_optim_config_default();
  c.lr = 0.01f;
  peer_optimizer *o1 = make_opt(L1, &c), *o2 = make_opt(L2, &c);
  grads sp, de;
  grads_init(&sp, L1, 12, 0);
  grads_init(&de, L2, 12, 1);
  for (int s = 0; s < 3; s++) {
    random_grads(&sp);
    for (int i = 0; i < FIRST_EXPERT; i++)
      if (sp.dense[i]) memcpy(de.dense[i], sp.dense[i], (size_t)sp.count[i] * sizeof(float));
    de.g.n_expert_rows = sp.g.n_expert_rows;
    memcpy(de.g.expert_rows, sp.g.expert_rows, (size_t)sp.g.n_expert_rows * sizeof(int64_t));
    for (int t = 0; t < 2; t++)
      for (int64_t j = 0; j < sp.g.n_expert_rows; j++)
        memcpy(grad_row(&de, t, j), grad_row(&sp, t, j), (size_t)lc.d * sizeof(float));
    cr_assert_eq(peer_optimizer_step(o1, &sp.g), PEER_OK, "%s", peer_last_error());
    cr_assert_eq(peer_optimizer_step(o2, &de.g), PEER_OK, "%s", peer_last_error());
  }
  for (int i = 0; i < peer_layer_n_params(L1); i++) {
    peer_tensor a, b;
    peer_layer_param(L1, i, &a);
    peer_layer_param(L2, i, &b);
    cr_expect(memcmp(a.data, b.data, a.nbytes) == 0, "%s differs", a.name);
  }
  for (int i = 0; i < peer_optimizer_n_states(o1); i++) {
    peer_tensor a, b;
    peer_optimizer_state(o1, i, &a);
    peer_optimizer_state(o2, i, &b);
    cr_expect(memcmp(a.data, b.data, a.nbytes) == 0, "%s differs", a.name);
  }
  grads_free(&sp);
  grads_free(&de);
  peer_optimizer_free(o1);
  peer_optimizer_free(o2);
  peer_layer_free(L1);
  peer_layer_free(L2);
}

/* NULL dense gradients and no expert gradients leave those parameters and
 * their state alone; the step still counts. */
Test(optim, absent_gradients_skip_parameters) {
  layer_case lc = small_case();
  peer_layer *L = make_layer(&lc);
  peer_optim_config c = peer_optim_config_default();
  peer_optimizer *o = make_opt(L, &c);
  peer_tensor keys, wq;
  peer_layer_param_by_name(L, "keys", &keys);
  peer_layer_param_by_name(L, "query.weight", &wq);
  void *keys0 = malloc(keys.nbytes), *wq0 = malloc(wq.nbytes);
  memcpy(keys0, keys.data, keys.nbytes);
  memcpy(wq0, wq.data, wq.nbytes);
  snapshot snap;
  snap_take(&snap, L, o);
  grads b;
  grads_init(&b, L, 4, 0);
  random_grads(&b);
  peer_grads only_wq = {0};
  only_wq.query_weight = b.g.query_weight;
  cr_assert_eq(peer_optimizer_step(o, &only_wq), PEER_OK, "%s", peer_last_error());
  cr_expect(memcmp(keys0, keys.data, keys.nbytes) == 0, "keys changed without a gradient");
  cr_expect(memcmp(wq0, wq.data, wq.nbytes) != 0, "query.weight did not change");
  for (int k = 0; k < snap.n; k++)
    cr_expect(memcmp(snap.copy[k], snap.t[k].data, snap.t[k].nbytes) == 0, "%s changed",
              snap.t[k].name);
  cr_expect_eq(peer_optimizer_step_count(o), 1);
  snap_free(&snap);
  grads_free(&b);
  free(keys0);
  free(wq0);
  peer_optimizer_free(o);
  peer_layer_free(L);
}

/* ----------------------------------------------------- real training */

/* A regression task: gradients of 0.5 |y - target|^2 from the layer's own
 * backward.  Returns the loss of the forward. */
static double train_grads(peer_layer *L, peer_context *ctx, int64_t T, const float *x,
                          const float *target, grads *b) {
  const int64_t d = peer_layer_config(L)->d_model;
  float *y = malloc((size_t)(T * d) * sizeof(float)), *dy = malloc((size_t)(T * d) * sizeof(float));
  cr_assert_eq(peer_forward_train(L, ctx, T, x, y), PEER_OK, "%s", peer_last_error());
  double loss = 0;
  for (int64_t i = 0; i < T * d; i++) {
    dy[i] = y[i] - target[i];
    loss += 0.5 * (double)dy[i] * dy[i];
  }
  cr_assert_eq(peer_backward(L, ctx, dy, NULL, &b->g), PEER_OK, "%s", peer_last_error());
  free(y);
  free(dy);
  return loss;
}

typedef struct task {
  int64_t T;
  float *x, *target;
  peer_context *ctx;
  grads b;
} task;

static void task_init(task *k, peer_layer *L, int64_t T, int experts_dense) {
  const peer_config *c = peer_layer_config(L);
  k->T = T;
  k->x = ref_random_x(&rng, T, c->d_model);
  k->target = ref_random_x(&rng, T, c->d_model);
  cr_assert_eq(peer_context_create(&k->ctx, L, T), PEER_OK, "%s", peer_last_error());
  grads_init(&k->b, L, T * c->n_heads * c->top_k, experts_dense);
}

static void task_free(task *k) {
  free(k->x);
  free(k->target);
  peer_context_free(k->ctx);
  grads_free(&k->b);
}

static double train_step(peer_layer *L, peer_optimizer *o, task *k) {
  if (k->b.g.experts_dense) {
    size_t bytes = (size_t)(k->b.N * k->b.d) * sizeof(float);
    memset(k->b.g.experts_down, 0, bytes);
    memset(k->b.g.experts_up, 0, bytes);
  }
  double loss = train_grads(L, k->ctx, k->T, k->x, k->target, &k->b);
  cr_assert_eq(peer_optimizer_step(o, &k->b.g), PEER_OK, "%s", peer_last_error());
  return loss;
}

Test(optim, training_lowers_the_loss) {
  layer_case lc = small_case();
  case_set(&lc, "d_model=16,n_subkeys=8,d_key=8");
  peer_layer *L = make_layer(&lc);
  peer_optim_config c = peer_optim_config_default();
  c.lr = 0.01f;
  c.expert_lr = 0.03f;
  peer_optimizer *o = make_opt(L, &c);
  task k;
  task_init(&k, L, 16, 0);
  double first = train_step(L, o, &k), last = first;
  for (int s = 0; s < 40; s++)
    last = train_step(L, o, &k);
  cr_expect_lt(last, 0.7 * first, "loss %.6g -> %.6g after 40 steps", first, last);
  task_free(&k);
  peer_optimizer_free(o);
  peer_layer_free(L);
}

/* Element-wise updates: the same bits for 1 and 3 threads, with tensors big
 * enough to be split across threads. */
Test(optim, same_bits_any_thread_count) {
  layer_case lc = case_make("d_model=256,n_heads=4,d_key=64,n_subkeys=16,top_k=4,query_bias=1,"
                            "query_norm=batchnorm,weight_dtype=f32,activation=relu",
                            0);
  peer_layer *L[2];
  peer_optimizer *o[2];
  uint64_t s0 = rng.s;
  peer_optim_config c = peer_optim_config_default();
  c.weight_decay = 0.01f;
  for (int i = 0; i < 2; i++) {
    rng.s = s0;
    L[i] = make_layer(&lc);
    cr_assert_eq(peer_layer_set_threads(L[i], i ? 3 : 1), PEER_OK);
    o[i] = make_opt(L[i], &c);
  }
  grads b;
  grads_init(&b, L[0], 256, 0);
  for (int s = 0; s < 2; s++) {
    random_grads(&b);
    for (int i = 0; i < 2; i++)
      cr_assert_eq(peer_optimizer_step(o[i], &b.g), PEER_OK, "%s", peer_last_error());
  }
  for (int j = 0; j < peer_layer_n_params(L[0]); j++) {
    peer_tensor a, t;
    peer_layer_param(L[0], j, &a);
    peer_layer_param(L[1], j, &t);
    cr_expect(memcmp(a.data, t.data, a.nbytes) == 0, "%s differs", a.name);
  }
  for (int j = 0; j < peer_optimizer_n_states(o[0]); j++) {
    peer_tensor a, t;
    peer_optimizer_state(o[0], j, &a);
    peer_optimizer_state(o[1], j, &t);
    cr_expect(memcmp(a.data, t.data, a.nbytes) == 0, "%s differs", a.name);
  }
  grads_free(&b);
  for (int i = 0; i < 2; i++) {
    peer_optimizer_free(o[i]);
    peer_layer_free(L[i]);
  }
}

/* ------------------------------------------------------------ errors */

static void expect_fail(peer_status got, peer_status want, const char *needle) {
  cr_expect_eq(got, want, "status %d (%s), expected %d; message: %s", got, peer_status_string(got),
               want, peer_last_error());
  if (needle)
    cr_expect(strstr(peer_last_error(), needle), "message '%s' does not mention '%s'",
              peer_last_error(), needle);
}

Test(optim, bad_configs_name_the_field) {
  layer_case lc = small_case();
  peer_layer *L = make_layer(&lc);
  struct {
    const char *field;
    peer_optim_config c;
  } bad[12];
  int n = 0;
  peer_optim_config d = peer_optim_config_default();
#define BAD(name, stmt)                                                                            \
  do {                                                                                             \
    bad[n].field = name;                                                                           \
    bad[n].c = d;                                                                                  \
    peer_optim_config *c = &bad[n].c;                                                              \
    stmt;                                                                                          \
    n++;                                                                                           \
  } while (0)
  BAD("optimizer lr:", c->lr = -1e-3f);
  BAD("optimizer lr:", c->lr = NAN);
  BAD("optimizer expert_lr:", c->expert_lr = -1.0f);
  BAD("optimizer beta1:", c->beta1 = 1.0f);
  BAD("optimizer beta2:", c->beta2 = 1.5f);
  BAD("optimizer beta2:", c->beta2 = -0.1f);
  BAD("optimizer eps:", c->eps = 0.0f);
  BAD("optimizer weight_decay:", c->weight_decay = -0.1f);
  BAD("optimizer weight_decay:", c->weight_decay = INFINITY);
  BAD("optimizer momentum:", (c->kind = PEER_OPTIM_SGD, c->momentum = 1.0f));
  BAD("optimizer kind:", c->kind = (peer_optim_kind)7);
  BAD("optimizer expert_kind:", c->expert_kind = (peer_optim_kind)-1);
#undef BAD
  for (int i = 0; i < n; i++) {
    peer_optimizer *o = (peer_optimizer *)&n; /* must be reset to NULL */
    expect_fail(peer_optim_config_validate(&bad[i].c), PEER_ERR_CONFIG, bad[i].field);
    expect_fail(peer_optimizer_create(&o, L, &bad[i].c), PEER_ERR_CONFIG, bad[i].field);
    cr_expect_null(o);
  }
  /* fields a kind does not use are not checked */
  peer_optim_config sgd = {.kind = PEER_OPTIM_SGD, .expert_kind = PEER_OPTIM_SGD, .lr = 0.1f};
  cr_expect_eq(peer_optim_config_validate(&sgd), PEER_OK, "%s", peer_last_error());
  peer_optim_config adam = d;
  adam.momentum = 5.0f;
  cr_expect_eq(peer_optim_config_validate(&adam), PEER_OK, "%s", peer_last_error());

  peer_optimizer *o = make_opt(L, &d);
  expect_fail(peer_optimizer_set_lr(o, -1.0f, 0.0f), PEER_ERR_CONFIG, "optimizer lr:");
  expect_fail(peer_optimizer_set_lr(o, 0.1f, -1.0f), PEER_ERR_CONFIG, "expert_lr");
  cr_expect_eq(peer_optimizer_config(o)->lr, d.lr, "a refused set_lr changed lr");
  cr_expect_eq(peer_optimizer_set_lr(o, 0.5f, 0.25f), PEER_OK);
  cr_expect_eq(peer_optimizer_config(o)->lr, 0.5f);
  cr_expect_eq(peer_optimizer_config(o)->expert_lr, 0.25f);
  peer_optimizer_free(o);
  peer_optimizer_free(NULL);
  expect_fail(peer_optimizer_create(&o, NULL, &d), PEER_ERR_INVALID_ARGUMENT, NULL);
  expect_fail(peer_optimizer_create(&o, L, NULL), PEER_ERR_INVALID_ARGUMENT, NULL);
  peer_layer_free(L);
}

/* A refused step changes nothing: parameters, state and step count. */
static void expect_refused_step(peer_layer *L, peer_optimizer *o, const peer_grads *g,
                                peer_status want, const char *needle) {
  void *before[32];
  int n = peer_layer_n_params(L);
  for (int i = 0; i < n; i++) {
    peer_tensor t;
    peer_layer_param(L, i, &t);
    before[i] = malloc(t.nbytes);
    memcpy(before[i], t.data, t.nbytes);
  }
  int64_t steps = peer_optimizer_step_count(o);
  expect_fail(peer_optimizer_step(o, g), want, needle);
  for (int i = 0; i < n; i++) {
    peer_tensor t;
    peer_layer_param(L, i, &t);
    cr_expect(memcmp(before[i], t.data, t.nbytes) == 0, "%s changed in a refused step", t.name);
    free(before[i]);
  }
  cr_expect_eq(peer_optimizer_step_count(o), steps);
}

Test(optim, step_errors) {
  layer_case lc = small_case();
  case_set(&lc, "query_bias=0,query_norm=none");
  peer_layer *L = make_layer(&lc);
  peer_optim_config c = peer_optim_config_default();
  peer_optimizer *o = make_opt(L, &c);
  grads b;
  grads_init(&b, L, 6, 0);
  random_grads(&b);
  b.g.n_expert_rows = 3;
  b.g.expert_rows[0] = 1, b.g.expert_rows[1] = 5, b.g.expert_rows[2] = 9;
  cr_assert_eq(peer_optimizer_step(o, &b.g), PEER_OK, "%s", peer_last_error());

  b.g.expert_rows[2] = 5;
  expect_refused_step(L, o, &b.g, PEER_ERR_INVALID_ARGUMENT, "strictly ascending");
  b.g.expert_rows[2] = 16; /* N = 16 */
  expect_refused_step(L, o, &b.g, PEER_ERR_INVALID_ARGUMENT, "expert_rows[2] = 16");
  b.g.expert_rows[2] = 9;
  b.g.n_expert_rows = 7; /* capacity 6 */
  expect_refused_step(L, o, &b.g, PEER_ERR_INVALID_ARGUMENT, "n_expert_rows");
  b.g.n_expert_rows = 3;

  float keep = b.g.experts_up[1 * lc.d + 2];
  b.g.experts_up[1 * lc.d + 2] = NAN;
  expect_refused_step(L, o, &b.g, PEER_ERR_NONFINITE, "experts_up of expert 5");
  b.g.experts_up[1 * lc.d + 2] = keep;
  b.g.keys[7] = INFINITY;
  expect_refused_step(L, o, &b.g, PEER_ERR_NONFINITE, "grads.keys[7]");
  b.g.keys[7] = 0.5f;

  float bias[8] = {0};
  b.g.query_bias = bias; /* the layer has no query bias */
  expect_refused_step(L, o, &b.g, PEER_ERR_INVALID_ARGUMENT, "query_bias");
  b.g.query_bias = NULL;
  float *up = b.g.experts_up;
  b.g.experts_up = NULL;
  expect_refused_step(L, o, &b.g, PEER_ERR_INVALID_ARGUMENT, "go together");
  b.g.experts_up = up;
  expect_fail(peer_optimizer_step(NULL, &b.g), PEER_ERR_INVALID_ARGUMENT, NULL);
  expect_fail(peer_optimizer_step(o, NULL), PEER_ERR_INVALID_ARGUMENT, NULL);
  cr_expect_eq(peer_optimizer_step(o, &b.g), PEER_OK, "%s", peer_last_error());
  cr_expect_eq(peer_optimizer_step_count(o), 2);

  peer_tensor t;
  expect_fail(peer_optimizer_state_by_name(o, "optim.query.bias.m", &t), PEER_ERR_INVALID_ARGUMENT,
              "optim.query.bias.m");
  expect_fail(peer_optimizer_state(o, peer_optimizer_n_states(o), &t), PEER_ERR_INVALID_ARGUMENT,
              NULL);
  grads_free(&b);
  peer_optimizer_free(o);
  peer_layer_free(L);
}

/* State tensors, their names, shapes and sizes. */
Test(optim, state_tensors) {
  layer_case lc = small_case();
  peer_layer *L = make_layer(&lc);
  peer_optim_config c = peer_optim_config_default();
  peer_optimizer *o = make_opt(L, &c);
  cr_expect_eq(peer_optimizer_n_states(o), 14); /* 7 parameters, m and v */
  peer_tensor t;
  cr_assert_eq(peer_optimizer_state_by_name(o, "optim.experts.up.v", &t), PEER_OK);
  cr_expect_eq(t.dtype, PEER_F32);
  cr_expect(t.ndim == 2 && t.shape[0] == 16 && t.shape[1] == lc.d);
  cr_expect_eq(t.nbytes, (size_t)(16 * lc.d) * sizeof(float));
  peer_optimizer_free(o);

  c.kind = c.expert_kind = PEER_OPTIM_SGD;
  o = make_opt(L, &c);
  cr_expect_eq(peer_optimizer_n_states(o), 0);
  peer_optimizer_free(o);
  c.momentum = 0.9f;
  o = make_opt(L, &c);
  cr_expect_eq(peer_optimizer_n_states(o), 5); /* dense only */
  cr_expect_eq(peer_optimizer_state_by_name(o, "optim.keys.momentum", &t), PEER_OK);
  peer_optimizer_free(o);
  peer_layer_free(L);
}

/* ---------------------------------------------------------- checkpoints */

static void expect_same_tensors(const peer_tensor *a, const peer_tensor *b, const char *what) {
  cr_expect_str_eq(a->name, b->name);
  cr_expect(a->nbytes == b->nbytes && memcmp(a->data, b->data, a->nbytes) == 0, "%s: %s differs",
            what, a->name);
}

static void expect_same_layers(peer_layer *a, peer_layer *b, const char *what) {
  cr_assert_eq(peer_layer_n_params(a), peer_layer_n_params(b));
  for (int i = 0; i < peer_layer_n_params(a); i++) {
    peer_tensor x, y;
    peer_layer_param(a, i, &x);
    peer_layer_param(b, i, &y);
    expect_same_tensors(&x, &y, what);
  }
}

static void expect_same_optimizers(peer_optimizer *a, peer_optimizer *b, const char *what) {
  cr_assert_eq(peer_optimizer_n_states(a), peer_optimizer_n_states(b));
  for (int i = 0; i < peer_optimizer_n_states(a); i++) {
    peer_tensor x, y;
    peer_optimizer_state(a, i, &x);
    peer_optimizer_state(b, i, &y);
    expect_same_tensors(&x, &y, what);
  }
  cr_expect_eq(peer_optimizer_step_count(a), peer_optimizer_step_count(b), "%s: step", what);
}

static void *read_all(const char *path, size_t *len) {
  FILE *fp = fopen(path, "rb");
  cr_assert(fp, "cannot open %s", path);
  fseek(fp, 0, SEEK_END);
  long n = ftell(fp);
  fseek(fp, 0, SEEK_SET);
  void *buf = malloc((size_t)n + 1);
  cr_assert_eq(fread(buf, 1, (size_t)n, fp), (size_t)n);
  fclose(fp);
  *len = (size_t)n;
  return buf;
}

/* Train, save, reload into fresh objects: the same bits; then two more
 * steps on each give the same bits as well. */
static void round_trip(const layer_case *lc, const peer_optim_config *c, int experts_dense) {
  peer_layer *A = make_layer(lc);
  peer_optimizer *oa = make_opt(A, c);
  task k;
  task_init(&k, A, 8, experts_dense);
  for (int s = 0; s < 3; s++)
    train_step(A, oa, &k);
  const char *path = test_path("ckpt.safetensors");
  cr_assert_eq(peer_checkpoint_save(A, oa, path), PEER_OK, "%s", peer_last_error());

  peer_layer *B = NULL;
  cr_assert_eq(peer_layer_create(&B, peer_layer_config(A), NULL), PEER_OK);
  peer_optimizer *ob = make_opt(B, c);
  cr_assert_eq(peer_checkpoint_load(B, ob, path), PEER_OK, "%s", peer_last_error());
  expect_same_layers(A, B, "after load");
  expect_same_optimizers(oa, ob, "after load");
  cr_expect_eq(peer_optimizer_step_count(ob), 3);

  task kb = k; /* same data and gradient buffers' shapes; its own context */
  cr_assert_eq(peer_context_create(&kb.ctx, B, k.T), PEER_OK);
  grads_init(&kb.b, B, k.b.cap, experts_dense);
  for (int s = 0; s < 2; s++) {
    double la = train_step(A, oa, &k), lb = train_step(B, ob, &kb);
    cr_expect_eq(la, lb, "loss after reload differs at step %d", s);
  }
  expect_same_layers(A, B, "two steps after load");
  expect_same_optimizers(oa, ob, "two steps after load");

  /* the file is also a plain weight file's superset: weights only */
  peer_layer *C = NULL;
  cr_assert_eq(peer_layer_create(&C, peer_layer_config(A), NULL), PEER_OK);
  cr_assert_eq(peer_checkpoint_load(C, NULL, path), PEER_OK, "%s", peer_last_error());
  peer_safetensors *f = NULL;
  cr_assert_eq(peer_safetensors_open(&f, path), PEER_OK);
  cr_expect_str_eq(peer_safetensors_metadata(f, "peer.step"), "3");
  cr_expect_str_eq(peer_safetensors_metadata(f, "peer.optim.kind"),
                   c->kind == PEER_OPTIM_ADAM ? "adam" : "sgd");
  peer_safetensors_close(f);

  peer_context_free(kb.ctx);
  grads_free(&kb.b);
  task_free(&k);
  peer_optimizer_free(oa);
  peer_optimizer_free(ob);
  peer_layer_free(A);
  peer_layer_free(B);
  peer_layer_free(C);
}

Test(checkpoint, round_trip_adam) {
  layer_case lc = small_case();
  peer_optim_config c = peer_optim_config_default();
  c.lr = 0.01f;
  c.weight_decay = 0.01f;
  c.expert_lr = 0.05f;
  round_trip(&lc, &c, 0);
  case_set(&lc, "weight_dtype=bf16,query_norm=none");
  round_trip(&lc, &c, 1);
}

Test(checkpoint, round_trip_sgd) {
  layer_case lc = small_case();
  peer_optim_config c = peer_optim_config_default();
  c.kind = PEER_OPTIM_SGD;
  c.momentum = 0.9f;
  c.lr = 0.05f;
  c.expert_kind = PEER_OPTIM_SGD;
  round_trip(&lc, &c, 0);
}

/* Without an optimizer a checkpoint is a plain weight file. */
Test(checkpoint, weights_only) {
  layer_case lc = small_case();
  peer_layer *A = make_layer(&lc);
  const char *path = test_path("w.safetensors");
  cr_assert_eq(peer_checkpoint_save(A, NULL, path), PEER_OK, "%s", peer_last_error());
  peer_layer *B = NULL;
  cr_assert_eq(peer_layer_load(&B, path, NULL), PEER_OK, "%s", peer_last_error());
  expect_same_layers(A, B, "peer_layer_load of a weights-only checkpoint");
  peer_layer *C = NULL;
  cr_assert_eq(peer_layer_create(&C, peer_layer_config(A), NULL), PEER_OK);
  cr_assert_eq(peer_checkpoint_load(C, NULL, path), PEER_OK, "%s", peer_last_error());
  expect_same_layers(A, C, "checkpoint_load without optimizer");
  /* a layer saved by peer_layer_save loads too */
  cr_assert_eq(peer_layer_save(A, path), PEER_OK);
  cr_assert_eq(peer_checkpoint_load(C, NULL, path), PEER_OK, "%s", peer_last_error());

  peer_optim_config c = peer_optim_config_default();
  peer_optimizer *o = make_opt(C, &c);
  expect_fail(peer_checkpoint_load(C, o, path), PEER_ERR_FORMAT, "peer.step");
  peer_optimizer_free(o);
  peer_layer_free(A);
  peer_layer_free(B);
  peer_layer_free(C);
}

Test(checkpoint, interrupted_save_keeps_the_old_file) {
  layer_case lc = small_case();
  peer_layer *A = make_layer(&lc);
  peer_optim_config c = peer_optim_config_default();
  peer_optimizer *oa = make_opt(A, &c);
  task k;
  task_init(&k, A, 8, 0);
  train_step(A, oa, &k);
  const char *path = test_path("ckpt.safetensors");
  cr_assert_eq(peer_checkpoint_save(A, oa, path), PEER_OK, "%s", peer_last_error());
  size_t len0, len1;
  void *before = read_all(path, &len0);
  peer_layer *B = NULL; /* the state at the first save */
  cr_assert_eq(peer_layer_create(&B, peer_layer_config(A), NULL), PEER_OK);
  peer_optimizer *ob = make_opt(B, &c);
  cr_assert_eq(peer_checkpoint_load(B, ob, path), PEER_OK, "%s", peer_last_error());

  train_step(A, oa, &k);
  /* the save cannot create its temporary file (the destination's name
   * leaves no room for the temporary's): it fails before writing */
  char longname[240];
  memset(longname, 'c', sizeof longname - 1);
  longname[sizeof longname - 1] = '\0';
  char lpath[512];
  snprintf(lpath, sizeof lpath, "%s", test_path(longname));
  FILE *fp = fopen(lpath, "wb"); /* the first checkpoint, copied by hand */
  cr_assert(fp);
  cr_assert_eq(fwrite(before, 1, len0, fp), len0);
  fclose(fp);
  expect_fail(peer_checkpoint_save(A, oa, lpath), PEER_ERR_IO, "temporary");
  void *after = read_all(lpath, &len1);
  cr_expect(len0 == len1 && memcmp(before, after, len0) == 0, "the old checkpoint changed");
  free(after);
  cr_assert_eq(rename(lpath, path), 0);

  /* the target is a directory: refused before anything is written */
  const char *dpath = test_path("d.safetensors");
  cr_assert_eq(mkdir(dpath, 0700), 0);
  expect_fail(peer_checkpoint_save(A, oa, dpath), PEER_ERR_IO, "directory");

  /* the old checkpoint still loads, with the first save's contents */
  peer_layer *C = NULL;
  cr_assert_eq(peer_layer_create(&C, peer_layer_config(A), NULL), PEER_OK);
  peer_optimizer *oc = make_opt(C, &c);
  cr_assert_eq(peer_checkpoint_load(C, oc, path), PEER_OK, "%s", peer_last_error());
  expect_same_layers(B, C, "old checkpoint");
  expect_same_optimizers(ob, oc, "old checkpoint");
  cr_expect_eq(peer_optimizer_step_count(oc), 1);

  free(before);
  task_free(&k);
  peer_optimizer_free(oa);
  peer_optimizer_free(ob);
  peer_optimizer_free(oc);
  peer_layer_free(A);
  peer_layer_free(B);
  peer_layer_free(C);
}

/* A refused load leaves layer and optimizer as they were. */
static void expect_refused_load(peer_layer *L, peer_optimizer *o, const char *path,
                                peer_status want, const char *const *needles, int n_needles) {
  peer_layer *copy = NULL;
  cr_assert_eq(peer_layer_create(&copy, peer_layer_config(L), NULL), PEER_OK);
  for (int i = 0; i < peer_layer_n_params(L); i++) {
    peer_tensor a, b;
    peer_layer_param(L, i, &a);
    peer_layer_param(copy, i, &b);
    memcpy(b.data, a.data, a.nbytes);
  }
  int64_t steps = peer_optimizer_step_count(o);
  expect_fail(peer_checkpoint_load(L, o, path), want, NULL);
  for (int i = 0; i < n_needles; i++)
    cr_expect(strstr(peer_last_error(), needles[i]), "message '%s' does not mention '%s'",
              peer_last_error(), needles[i]);
  expect_same_layers(L, copy, "refused load");
  cr_expect_eq(peer_optimizer_step_count(o), steps);
  peer_layer_free(copy);
}

Test(checkpoint, another_config_is_refused) {
  layer_case lc = small_case();
  peer_layer *A = make_layer(&lc);
  peer_optim_config c = peer_optim_config_default();
  peer_optimizer *oa = make_opt(A, &c);
  const char *path = test_path("ckpt.safetensors");
  cr_assert_eq(peer_checkpoint_save(A, oa, path), PEER_OK, "%s", peer_last_error());

  layer_case other = lc;
  case_set(&other, "n_subkeys=8");
  peer_layer *B = make_layer(&other);
  peer_optimizer *ob = make_opt(B, &c);
  const char *n_keys[] = {"peer.n_subkeys", "'4'", "'8'"};
  expect_refused_load(B, ob, path, PEER_ERR_FORMAT, n_keys, 3);
  expect_refused_load(B, NULL, path, PEER_ERR_FORMAT, n_keys, 3);
  peer_optimizer_free(ob);
  peer_layer_free(B);

  other = lc;
  case_set(&other, "activation=relu");
  B = make_layer(&other);
  ob = make_opt(B, &c);
  const char *act_keys[] = {"peer.activation", "'gelu'", "'relu'"};
  expect_refused_load(B, ob, path, PEER_ERR_FORMAT, act_keys, 3);
  peer_optimizer_free(ob);
  peer_layer_free(B);

  other = lc;
  case_set(&other, "weight_dtype=bf16");
  B = make_layer(&other);
  const char *dt_keys[] = {"peer.weight_dtype", "'f32'", "'bf16'"};
  expect_refused_load(B, NULL, path, PEER_ERR_FORMAT, dt_keys, 3);
  peer_layer_free(B);

  /* the same layer config under another optimizer kind */
  B = make_layer(&lc);
  peer_optim_config sgd = c;
  sgd.kind = PEER_OPTIM_SGD;
  ob = make_opt(B, &sgd);
  const char *kind_keys[] = {"peer.optim.kind", "'adam'", "'sgd'"};
  expect_refused_load(B, ob, path, PEER_ERR_FORMAT, kind_keys, 3);
  peer_optimizer_free(ob);
  sgd = c;
  sgd.expert_kind = PEER_OPTIM_SGD;
  ob = make_opt(B, &sgd);
  const char *ekind_keys[] = {"peer.optim.expert_kind", "'adam'", "'sgd'"};
  expect_refused_load(B, ob, path, PEER_ERR_FORMAT, ekind_keys, 3);
  peer_optimizer_free(ob);

  /* SGD with and without momentum keep different state */
  sgd = c;
  sgd.kind = sgd.expert_kind = PEER_OPTIM_SGD;
  sgd.momentum = 0.9f;
  peer_optimizer *om = make_opt(A, &sgd);
  cr_assert_eq(peer_checkpoint_save(A, om, path), PEER_OK, "%s", peer_last_error());
  sgd.momentum = 0.0f;
  ob = make_opt(B, &sgd);
  const char *extra[] = {"optim.query.weight.momentum", "does not keep"};
  expect_refused_load(B, ob, path, PEER_ERR_FORMAT, extra, 2);
  peer_optimizer_free(ob);
  peer_optimizer_free(om);
  om = make_opt(A, &sgd);
  cr_assert_eq(peer_checkpoint_save(A, om, path), PEER_OK, "%s", peer_last_error());
  sgd.momentum = 0.9f;
  ob = make_opt(B, &sgd);
  const char *missing[] = {"optim.query.weight.momentum", "missing"};
  expect_refused_load(B, ob, path, PEER_ERR_FORMAT, missing, 2);
  peer_optimizer_free(ob);
  peer_optimizer_free(om);

  /* a different learning rate is no reason to refuse: it is kept */
  cr_assert_eq(peer_checkpoint_save(A, oa, path), PEER_OK, "%s", peer_last_error());
  peer_optim_config fast = c;
  fast.lr = 0.5f;
  ob = make_opt(B, &fast);
  cr_expect_eq(peer_checkpoint_load(B, ob, path), PEER_OK, "%s", peer_last_error());
  cr_expect_eq(peer_optimizer_config(ob)->lr, 0.5f);
  peer_optimizer_free(ob);

  /* objects that do not belong together */
  expect_fail(peer_checkpoint_save(B, oa, path), PEER_ERR_INVALID_ARGUMENT, "another layer");
  expect_fail(peer_checkpoint_load(B, oa, path), PEER_ERR_INVALID_ARGUMENT, "another layer");
  expect_fail(peer_checkpoint_load(B, NULL, test_path("nothing.safetensors")), PEER_ERR_IO,
              "nothing.safetensors");
  expect_fail(peer_checkpoint_save(NULL, NULL, path), PEER_ERR_INVALID_ARGUMENT, NULL);
  expect_fail(peer_checkpoint_load(B, NULL, NULL), PEER_ERR_INVALID_ARGUMENT, NULL);
  peer_layer_free(B);
  peer_optimizer_free(oa);
  peer_layer_free(A);
}

/* A weight file of another tool or a file with foreign tensors is refused
 * naming the tensor. */
Test(checkpoint, foreign_tensors_are_refused) {
  layer_case lc = small_case();
  peer_layer *A = make_layer(&lc);
  const char *path = test_path("ckpt.safetensors");
  cr_assert_eq(peer_checkpoint_save(A, NULL, path), PEER_OK, "%s", peer_last_error());
  peer_safetensors *f = NULL;
  cr_assert_eq(peer_safetensors_open(&f, path), PEER_OK);
  /* rewrite it with one extra tensor and the same metadata */
  int n = peer_safetensors_count(f);
  peer_tensor t[16];
  for (int i = 0; i < n; i++) {
    peer_safetensors_info(f, i, &t[i]);
    t[i].data = malloc(t[i].nbytes);
    cr_assert_eq(peer_safetensors_read(f, t[i].name, t[i].data, t[i].nbytes), PEER_OK);
  }
  float extra[2] = {1, 2};
  t[n] = (peer_tensor){.name = "head.weight",
                       .dtype = PEER_F32,
                       .ndim = 1,
                       .shape = {2},
                       .data = extra,
                       .nbytes = sizeof extra};
  const char *keys[] = {"peer.format",      "peer.d_model", "peer.n_heads",      "peer.d_key",
                        "peer.n_subkeys",   "peer.top_k",   "peer.subkey_top_k", "peer.shared_keys",
                        "peer.activation",  "peer.gate",    "peer.query_norm",   "peer.query_bias",
                        "peer.weight_dtype"};
  const char *meta[26];
  for (int i = 0; i < 13; i++) {
    meta[2 * i] = keys[i];
    meta[2 * i + 1] = peer_safetensors_metadata(f, keys[i]);
    cr_assert(meta[2 * i + 1], "%s missing", keys[i]);
  }
  const char *path2 = test_path("foreign.safetensors");
  cr_assert_eq(peer_safetensors_write(path2, t, n + 1, meta, 13), PEER_OK, "%s", peer_last_error());
  const char *needles[] = {"head.weight"};
  expect_refused_load(A, NULL, path2, PEER_ERR_FORMAT, needles, 1);
  for (int i = 0; i < n; i++)
    free(t[i].data);
  peer_safetensors_close(f);
  peer_layer_free(A);
}
