/* test_train.c: the training path (peer_forward_train, peer_backward).
 * Gradients of x and of every parameter are checked against central finite
 * differences of the float64 training-mode reference of reference_train.h,
 * with the top-k choice fixed (forward_train does not return ids, so the
 * reference picks them by brute force on draws free of near-ties, and they
 * are checked to be the layer's: the same y and the same used rows), for every
 * activation and gate, with and without batch norm and query bias, per-head
 * and shared keys, bf16 expert tables, k' > k, k = 1, k = n, and experts
 * picked several times (heads with identical queries, repeated tokens).  Also:
 * the sparse and dense expert gradient formats, exact zeros for sub-keys never
 * kept, the same bits for any thread count, batch-norm running statistics,
 * and the error and state rules of the training API. */
#include <criterion/criterion.h>
#include <criterion/logging.h>

#include "cases.h"
#include "reference_train.h"

/* A gradient matches when |g - ref| <= GRAD_TOL * max|ref| + GRAD_ABS over
 * its tensor.  f32 accumulation errors are a few 1e-7 relative here. */
#define GRAD_TOL 1e-4
#define GRAD_ABS 1e-5
/* Forward agreement: f32 layer against the float64 reference. */
#define Y_TOL 1e-5
/* Safety margin against near-ties and kinks, relative to a head's score scale. */
#define NEAR 1e-4

#define CASE_FMT "%s seed=%llu"
#define CASE_ARGS(c, seed) case_text(c), (unsigned long long)(seed)

static peer_layer *make_layer(const layer_case *c) { return case_layer(c); }

/* A base configuration to vary from. */
static layer_case base_case(void) {
  return case_make("d_model=16,n_heads=2,d_key=8,n_subkeys=8,top_k=3,subkey_top_k=4", 6);
}

static float *param_f32(peer_layer *L, const char *name) {
  peer_tensor t;
  cr_assert_eq(peer_layer_param_by_name(L, name, &t), PEER_OK, "no parameter %s", name);
  cr_assert_eq(t.dtype, PEER_F32, "%s is not f32", name);
  return t.data;
}

/* Every head gets head 0's query rows (and bias and norm), so with shared keys
 * all heads keep the same experts. */
static void copy_head0(peer_layer *L, const layer_case *c) {
  const int64_t dk = c->dk, d = c->d;
  float *wq = param_f32(L, "query.weight");
  for (int64_t h = 1; h < c->H; h++)
    memcpy(wq + h * dk * d, wq, (size_t)(dk * d) * sizeof(float));
  const char *vec[] = {"query.bias", "query.norm.weight", "query.norm.bias",
                       "query.norm.running_mean", "query.norm.running_var"};
  for (size_t i = 0; i < sizeof vec / sizeof vec[0]; i++) {
    peer_tensor t;
    if (peer_layer_param_by_name(L, vec[i], &t) != PEER_OK) continue;
    float *v = t.data;
    for (int64_t h = 1; h < c->H; h++)
      memcpy(v + h * dk, v, (size_t)dk * sizeof(float));
  }
}

/* Random x [T, d]; with dup, the second half of the rows repeats the first. */
static float *random_x(ref_rng *r, int64_t T, int64_t d, int dup) {
  float *x = ref_random_x(r, T, d);
  if (dup) {
    int64_t u = (T + 1) / 2;
    for (int64_t t = u; t < T; t++)
      memcpy(x + t * d, x + (t % u) * d, (size_t)d * sizeof(float));
  }
  return x;
}

static double *to_double(const float *v, int64_t n) {
  double *o = malloc((size_t)(n > 0 ? n : 1) * sizeof(double));
  for (int64_t i = 0; i < n; i++)
    o[i] = (double)v[i];
  return o;
}

static int cmp_i64(const void *a, const void *b) {
  int64_t x = *(const int64_t *)a, y = *(const int64_t *)b;
  return (x > y) - (x < y);
}

/* Distinct values of v[0..n), ascending, into out; returns their count. */
static int64_t distinct_sorted(const int64_t *v, int64_t n, int64_t *out) {
  memcpy(out, v, (size_t)n * sizeof(int64_t));
  qsort(out, (size_t)n, sizeof(int64_t), cmp_i64);
  int64_t m = 0;
  for (int64_t i = 0; i < n; i++)
    if (m == 0 || out[m - 1] != out[i]) out[m++] = out[i];
  return m;
}

/* Dense gradient buffers for every parameter a layer has, experts as
 * [N, d] (experts_dense = 1) or [T*H*k, d] (sparse). */
typedef struct gbufs {
  peer_grads g;
  int64_t n_wq, n_dq, n_keys, n_exp, cap;
} gbufs;

static void gbufs_init(gbufs *b, peer_layer *L, int64_t T, int dense, float fill) {
  const peer_config *c = peer_layer_config(L);
  const int64_t d = c->d_model, dq = c->n_heads * c->d_key, N = c->n_subkeys * c->n_subkeys;
  const int64_t G = c->shared_keys ? 1 : c->n_heads;
  memset(b, 0, sizeof *b);
  b->n_wq = dq * d;
  b->n_dq = dq;
  b->n_keys = G * 2 * c->n_subkeys * (c->d_key / 2);
  b->cap = T * c->n_heads * c->top_k;
  b->n_exp = (dense ? N : (b->cap > 0 ? b->cap : 1)) * d;
  float **all[] = {&b->g.query_weight, &b->g.query_bias,   &b->g.norm_weight, &b->g.norm_bias,
                   &b->g.keys,         &b->g.experts_down, &b->g.experts_up};
  int64_t sizes[] = {b->n_wq, dq, dq, dq, b->n_keys, b->n_exp, b->n_exp};
  for (int i = 0; i < 7; i++) {
    *all[i] = malloc((size_t)sizes[i] * sizeof(float));
    for (int64_t j = 0; j < sizes[i]; j++)
      (*all[i])[j] = fill;
  }
  if (!c->query_bias) {
    free(b->g.query_bias);
    b->g.query_bias = NULL;
  }
  if (c->query_norm != PEER_NORM_BATCHNORM) {
    free(b->g.norm_weight);
    free(b->g.norm_bias);
    b->g.norm_weight = b->g.norm_bias = NULL;
  }
  b->g.experts_dense = dense;
  b->g.expert_capacity = b->cap;
  b->g.expert_rows = malloc((size_t)(b->cap > 0 ? b->cap : 1) * sizeof(int64_t));
  b->g.n_expert_rows = -1;
}

static void gbufs_free(gbufs *b) {
  free(b->g.query_weight);
  free(b->g.query_bias);
  free(b->g.norm_weight);
  free(b->g.norm_bias);
  free(b->g.keys);
  free(b->g.experts_down);
  free(b->g.experts_up);
  free(b->g.expert_rows);
}

/* ------------------------------------------------- finite differences */

static double max_abs(const double *v, int64_t n) {
  double m = 0.0;
  for (int64_t i = 0; i < n; i++)
    m = fmax(m, fabs(v[i]));
  return m;
}

/* Compare one gradient tensor; ref entries not covered are 0.  The
 * tolerance scales with max|ref|, or with `scale` where that is larger (a
 * gradient that cancels to about 0, as the query bias's under batch norm,
 * keeps the rounding of its terms).  Returns the fraction of the tolerance
 * the worst entry used (printed with PEER_TEST_VERBOSE). */
static double check_grad(const char *what, const float *g, const double *ref, int64_t count,
                         double scale, const layer_case *c, uint64_t seed) {
  double mref = max_abs(ref, count), merr = 0.0;
  const double tol = GRAD_TOL * fmax(mref, scale) + GRAD_ABS;
  for (int64_t i = 0; i < count; i++) {
    double e = fabs((double)g[i] - ref[i]);
    if (!(e <= tol)) {
      cr_expect_fail("%s[%lld]: library %.9g, finite differences %.9g (|err| %.3g > tol %.3g, "
                     "max|ref| %.3g) " CASE_FMT,
                     what, (long long)i, (double)g[i], ref[i], e, tol, mref, CASE_ARGS(c, seed));
      return INFINITY;
    }
    merr = fmax(merr, e);
  }
  if (getenv("PEER_TEST_VERBOSE"))
    fprintf(stderr, "  %-18s max|err| %.3g max|ref| %.3g (%.3g of tol)\n", what, merr, mref,
            merr / tol);
  return merr / tol;
}

/* Finite differences of every entry of p[0..count) (where mask is NULL or
 * mask[i / row] is set) into out. */
static void fd_tensor(rt_params *P, const rt_loss_in *in, double *p, int64_t count, int64_t row,
                      const char *mask, double *out) {
  for (int64_t i = 0; i < count; i++)
    out[i] = (!mask || mask[i / row]) ? rt_fd(P, in, p + i) : 0.0;
}

/* The whole check for one configuration. */
static void fd_check(const layer_case *c, uint64_t seed) {
  peer_layer *L = make_layer(c);
  ref_rng r = {seed};
  const int64_t T = c->T, d = c->d, H = c->H, k = c->k, n = c->n, N = n * n, hk = H * k;
  const int64_t dq = H * c->dk, half = c->dk / 2, G = c->cfg.shared_keys ? 1 : H;
  int64_t *ids = malloc((size_t)(T * hk) * sizeof(int64_t));
  double *q = malloc((size_t)(T * dq) * sizeof(double));
  float *x = NULL, *R = NULL;
  rt_params P;
  int ok = 0;
  for (int attempt = 0; attempt < 200 && !ok; attempt++) {
    if (x) {
      rt_params_free(&P);
      free(x);
      free(R);
    }
    ref_fill_layer(L, &r);
    if (c->dup) copy_head0(L, c);
    x = random_x(&r, T, d, c->dup);
    R = ref_random_x(&r, T, d);
    rt_params_load(&P, L);
    double *xd = to_double(x, T * d);
    ok = rt_select(&P, T, xd, NEAR, ids, q);
    free(xd);
  }
  cr_assert(ok, "no draw free of near-ties and kinks " CASE_FMT, CASE_ARGS(c, seed));

  /* the library */
  peer_context *ctx = NULL;
  cr_assert_eq(peer_context_create(&ctx, L, T), PEER_OK, "%s", peer_last_error());
  float *y = malloc((size_t)(T * d) * sizeof(float)), *dx = malloc((size_t)(T * d) * sizeof(float));
  cr_assert_eq(peer_forward_train(L, ctx, T, x, y), PEER_OK, "forward_train: %s " CASE_FMT,
               peer_last_error(), CASE_ARGS(c, seed));
  gbufs b;
  gbufs_init(&b, L, T, 1, 0.0f);
  cr_assert_eq(peer_backward(L, ctx, R, dx, &b.g), PEER_OK, "backward: %s " CASE_FMT,
               peer_last_error(), CASE_ARGS(c, seed));

  /* the same selection: y agrees, and the used rows are the reference's */
  double *xd = to_double(x, T * d), *Rd = to_double(R, T * d);
  double *yref = malloc((size_t)(T * d) * sizeof(double));
  rt_loss_in in = {T, xd, ids, Rd, q, yref};
  rt_forward(&P, T, xd, ids, q, yref);
  double ymax = 0.0;
  for (int64_t i = 0; i < T * d; i++)
    ymax = fmax(ymax, fabs(yref[i]));
  for (int64_t i = 0; i < T * d; i++)
    cr_assert(fabs((double)y[i] - yref[i]) <= Y_TOL * ymax + 1e-6,
              "y[%lld][%lld] = %.9g, reference %.9g " CASE_FMT, (long long)(i / d),
              (long long)(i % d), (double)y[i], yref[i], CASE_ARGS(c, seed));
  int64_t *used = malloc((size_t)(T * hk) * sizeof(int64_t));
  int64_t n_used = distinct_sorted(ids, T * hk, used);
  cr_assert_eq(b.g.n_expert_rows, n_used, "n_expert_rows %lld, reference uses %lld " CASE_FMT,
               (long long)b.g.n_expert_rows, (long long)n_used, CASE_ARGS(c, seed));
  for (int64_t i = 0; i < n_used; i++)
    cr_assert_eq(b.g.expert_rows[i], used[i], "expert_rows[%lld] = %lld, reference %lld " CASE_FMT,
                 (long long)i, (long long)b.g.expert_rows[i], (long long)used[i],
                 CASE_ARGS(c, seed));
  if (c->dup)
    cr_assert_lt(n_used, T * hk, "the duplicate case picked no expert twice " CASE_FMT,
                 CASE_ARGS(c, seed));

  /* which sub-key rows and expert rows were kept */
  char *key_kept = calloc((size_t)(G * 2 * n), 1), *exp_used = calloc((size_t)N, 1);
  for (int64_t e = 0; e < T * hk; e++) {
    int64_t h = (e / k) % H, g = c->cfg.shared_keys ? 0 : h;
    key_kept[(g * 2 + 0) * n + ids[e] / n] = 1;
    key_kept[(g * 2 + 1) * n + ids[e] % n] = 1;
    exp_used[ids[e]] = 1;
  }

  /* finite differences on the reference, tensor by tensor */
  double worst = 0.0;
  double *ref = malloc((size_t)(N * d > dq * d ? N * d : dq * d) * sizeof(double));
  fd_tensor(&P, &in, xd, T * d, 1, NULL, ref);
  worst = fmax(worst, check_grad("dx", dx, ref, T * d, 0.0, c, seed));
  fd_tensor(&P, &in, P.wq, dq * d, 1, NULL, ref);
  worst = fmax(worst, check_grad("query.weight", b.g.query_weight, ref, dq * d, 0.0, c, seed));
  const double wq_scale = max_abs(ref, dq * d);
  if (c->cfg.query_bias) {
    fd_tensor(&P, &in, P.bq, dq, 1, NULL, ref);
    worst = fmax(worst, check_grad("query.bias", b.g.query_bias, ref, dq, wq_scale, c, seed));
  }
  if (c->cfg.query_norm == PEER_NORM_BATCHNORM) {
    fd_tensor(&P, &in, P.nw, dq, 1, NULL, ref);
    worst = fmax(worst, check_grad("query.norm.weight", b.g.norm_weight, ref, dq, 0.0, c, seed));
    fd_tensor(&P, &in, P.nb, dq, 1, NULL, ref);
    worst = fmax(worst, check_grad("query.norm.bias", b.g.norm_bias, ref, dq, 0.0, c, seed));
  }
  fd_tensor(&P, &in, P.keys, G * 2 * n * half, half, key_kept, ref);
  worst = fmax(worst, check_grad("keys", b.g.keys, ref, G * 2 * n * half, 0.0, c, seed));
  fd_tensor(&P, &in, P.down, N * d, d, exp_used, ref);
  worst = fmax(worst, check_grad("experts.down", b.g.experts_down, ref, N * d, 0.0, c, seed));
  fd_tensor(&P, &in, P.up, N * d, d, exp_used, ref);
  worst = fmax(worst, check_grad("experts.up", b.g.experts_up, ref, N * d, 0.0, c, seed));

  /* rows never kept: exactly zero (dense expert buffers were zero-filled) */
  for (int64_t row = 0; row < G * 2 * n; row++)
    for (int64_t i = 0; !key_kept[row] && i < half; i++)
      cr_expect(b.g.keys[row * half + i] == 0.0f,
                "keys row %lld never kept, gradient %.9g " CASE_FMT, (long long)row,
                (double)b.g.keys[row * half + i], CASE_ARGS(c, seed));
  for (int64_t row = 0; row < N; row++)
    for (int64_t i = 0; !exp_used[row] && i < d; i++)
      cr_expect(b.g.experts_down[row * d + i] == 0.0f && b.g.experts_up[row * d + i] == 0.0f,
                "expert %lld unused, yet its gradient changed " CASE_FMT, (long long)row,
                CASE_ARGS(c, seed));

  if (getenv("PEER_TEST_VERBOSE"))
    fprintf(stderr, "fd: worst %.3g of tolerance " CASE_FMT "\n", worst, CASE_ARGS(c, seed));

  free(ref);
  free(key_kept);
  free(exp_used);
  free(used);
  free(yref);
  free(xd);
  free(Rd);
  gbufs_free(&b);
  free(y);
  free(dx);
  peer_context_free(ctx);
  rt_params_free(&P);
  free(x);
  free(R);
  free(q);
  free(ids);
  peer_layer_free(L);
}

/* A fresh seed per case, derived from the run's seed. */
static uint64_t case_seed(uint64_t base, int i) {
  return base + 0x9e3779b97f4a7c15ull * (uint64_t)(i + 1);
}

Test(train_grad, activations) {
  uint64_t seed = ref_test_seed();
  const peer_activation acts[] = {PEER_ACT_RELU, PEER_ACT_GELU, PEER_ACT_GELU_TANH, PEER_ACT_SILU,
                                  PEER_ACT_IDENTITY};
  for (int i = 0; i < 5; i++) {
    layer_case c = base_case();
    c.cfg.activation = acts[i];
    fd_check(&c, case_seed(seed, i));
    case_set(&c, "query_norm=batchnorm,query_bias=1");
    fd_check(&c, case_seed(seed, 10 + i));
  }
}

Test(train_grad, gates) {
  uint64_t seed = ref_test_seed();
  const peer_gate gates[] = {PEER_GATE_SOFTMAX, PEER_GATE_SIGMOID, PEER_GATE_RELU};
  for (int i = 0; i < 3; i++) {
    layer_case c = base_case();
    c.cfg.gate = gates[i];
    fd_check(&c, case_seed(seed, i));
    case_set(&c, "query_norm=batchnorm,activation=relu");
    fd_check(&c, case_seed(seed, 10 + i));
    case_set(&c, "top_k=4,subkey_top_k=6,n_heads=3,shared_keys=1");
    fd_check(&c, case_seed(seed, 20 + i));
  }
}

/* query_norm none/batchnorm x query_bias 0/1 x shared_keys 0/1, with T from
 * 2 (the smallest batch norm accepts) up. */
Test(train_grad, norm_bias_shared) {
  uint64_t seed = ref_test_seed();
  int i = 0;
  for (int norm = 0; norm < 2; norm++)
    for (int bias = 0; bias < 2; bias++)
      for (int shared = 0; shared < 2; shared++) {
        layer_case c = base_case();
        c.cfg.query_norm = norm ? PEER_NORM_BATCHNORM : PEER_NORM_NONE;
        c.cfg.query_bias = bias;
        c.cfg.shared_keys = shared;
        c.T = 2 + 3 * (i % 5);
        c.cfg.d_model = 8 + 8 * (i % 3);
        case_sync(&c);
        fd_check(&c, case_seed(seed, i++));
      }
}

Test(train_grad, bf16_experts) {
  uint64_t seed = ref_test_seed();
  for (int i = 0; i < 4; i++) {
    layer_case c = base_case();
    case_set(&c, "weight_dtype=bf16");
    c.cfg.query_norm = i & 1 ? PEER_NORM_BATCHNORM : PEER_NORM_NONE;
    c.cfg.shared_keys = i >> 1;
    c.cfg.query_bias = i >> 1;
    c.cfg.activation = i == 2 ? PEER_ACT_SILU : PEER_ACT_GELU;
    c.cfg.gate = i == 3 ? PEER_GATE_SIGMOID : PEER_GATE_SOFTMAX;
    fd_check(&c, case_seed(seed, i));
  }
}

/* k' > k, k = 1, k = k' = n, a single head, a wide model. */
Test(train_grad, top_k_shapes) {
  uint64_t seed = ref_test_seed();
  layer_case c = base_case();
  case_set(&c, "top_k=2,subkey_top_k=6");
  fd_check(&c, case_seed(seed, 0));
  case_set(&c, "query_norm=batchnorm");
  fd_check(&c, case_seed(seed, 1));
  c = base_case();
  case_set(&c, "top_k=1,subkey_top_k=1,gate=sigmoid"); /* softmax of one score is constant */
  fd_check(&c, case_seed(seed, 2));
  case_set(&c, "top_k=1,subkey_top_k=3,gate=softmax,query_norm=batchnorm");
  fd_check(&c, case_seed(seed, 3));
  c = base_case();
  case_set(&c, "n_subkeys=4,top_k=4,subkey_top_k=4,n_heads=4");
  fd_check(&c, case_seed(seed, 4));
  c = base_case();
  c.T = 16;
  case_set(&c, "n_heads=1,d_model=32,d_key=16,n_subkeys=16,top_k=4,subkey_top_k=5,query_bias=1,"
               "query_norm=batchnorm");
  fd_check(&c, case_seed(seed, 5));
}

/* Experts picked several times: identical heads (shared keys, same query
 * rows) keep the same experts, repeated tokens too; the sparse rows must sum
 * every pick. */
Test(train_grad, duplicated_experts) {
  uint64_t seed = ref_test_seed();
  for (int i = 0; i < 6; i++) {
    layer_case c = base_case();
    case_set(&c, "shared_keys=1");
    c.dup = 1;
    case_set(&c, "n_heads=3");
    c.T = 8;
    case_set(&c, "n_subkeys=6");
    c.cfg.query_norm = i & 1 ? PEER_NORM_BATCHNORM : PEER_NORM_NONE;
    c.cfg.query_bias = (i >> 1) & 1;
    c.cfg.weight_dtype = i >= 4 ? PEER_BF16 : PEER_F32;
    c.cfg.gate = i == 5 ? PEER_GATE_RELU : PEER_GATE_SOFTMAX;
    fd_check(&c, case_seed(seed, i));
  }
}

/* ----------------------------------------- running a layer end to end */

/* A layer filled at random with a batch x (repeated rows) and dy. */
typedef struct setup {
  layer_case c;
  uint64_t seed;
  peer_layer *L;
  float *x, *dy;
} setup;

static setup make_setup(const layer_case *c, uint64_t seed) {
  setup s = {*c, seed, make_layer(c), NULL, NULL};
  ref_rng r = {seed};
  ref_fill_layer(s.L, &r);
  if (c->dup) copy_head0(s.L, c);
  s.x = random_x(&r, c->T, c->d, c->dup);
  s.dy = ref_random_x(&r, c->T, c->d);
  return s;
}

static void free_setup(setup *s) {
  peer_layer_free(s->L);
  free(s->x);
  free(s->dy);
}

/* Ids peer_retrieve picks for x: without batch norm the same computation as
 * the training forward's. */
static int64_t *retrieve_ids(setup *s) {
  int64_t m = s->c.T * s->c.H * s->c.k;
  int64_t *ids = malloc((size_t)m * sizeof(int64_t));
  cr_assert_eq(peer_retrieve(s->L, s->c.T, s->x, ids, NULL, NULL), PEER_OK, "%s",
               peer_last_error());
  return ids;
}

/* forward_train + backward into b; y and dx returned (caller frees). */
static void train_step(setup *s, gbufs *b, float **y, float **dx) {
  const int64_t T = s->c.T, d = s->c.d;
  peer_context *ctx = NULL;
  cr_assert_eq(peer_context_create(&ctx, s->L, T), PEER_OK, "%s", peer_last_error());
  *y = malloc((size_t)(T * d + 1) * sizeof(float));
  *dx = malloc((size_t)(T * d + 1) * sizeof(float));
  cr_assert_eq(peer_forward_train(s->L, ctx, T, s->x, *y), PEER_OK, "forward_train: %s " CASE_FMT,
               peer_last_error(), CASE_ARGS(&s->c, s->seed));
  cr_assert_eq(peer_backward(s->L, ctx, s->dy, *dx, &b->g), PEER_OK, "backward: %s " CASE_FMT,
               peer_last_error(), CASE_ARGS(&s->c, s->seed));
  peer_context_free(ctx);
}

static layer_case big_case(void) {
  layer_case c = base_case();
  c.T = 67;
  c.dup = 1;
  case_set(&c, "d_model=24,n_heads=4,d_key=8,n_subkeys=12,top_k=4,subkey_top_k=6");
  return c;
}

/* Sparse format: rows ascending, distinct, exactly the used ids, equal to
 * the dense-mode rows; dense format adds into the caller's buffers and
 * leaves other rows alone. */
static void sparse_vs_dense(const layer_case *c, uint64_t seed) {
  setup s = make_setup(c, seed);
  const int64_t T = c->T, d = c->d, N = c->n * c->n, hk = c->H * c->k;
  int64_t *ids = retrieve_ids(&s);
  int64_t *used = malloc((size_t)(T * hk) * sizeof(int64_t));
  int64_t n_used = distinct_sorted(ids, T * hk, used);

  gbufs sp, de;
  gbufs_init(&sp, s.L, T, 0, NAN);
  float *y1, *dx1, *y2, *dx2;
  train_step(&s, &sp, &y1, &dx1);
  cr_assert_eq(sp.g.n_expert_rows, n_used, "n_expert_rows %lld, used %lld " CASE_FMT,
               (long long)sp.g.n_expert_rows, (long long)n_used, CASE_ARGS(c, seed));
  for (int64_t i = 0; i < n_used; i++) {
    cr_assert_eq(sp.g.expert_rows[i], used[i], "expert_rows[%lld] = %lld, used %lld " CASE_FMT,
                 (long long)i, (long long)sp.g.expert_rows[i], (long long)used[i],
                 CASE_ARGS(c, seed));
    if (i > 0) cr_assert_lt(sp.g.expert_rows[i - 1], sp.g.expert_rows[i]);
  }
  for (int64_t i = 0; i < n_used * d; i++)
    cr_assert(isfinite(sp.g.experts_down[i]) && isfinite(sp.g.experts_up[i]),
              "sparse row %lld not written " CASE_FMT, (long long)(i / d), CASE_ARGS(c, seed));
  if (c->dup) cr_assert_lt(n_used, T * hk, "no duplicates " CASE_FMT, CASE_ARGS(c, seed));

  /* dense, onto known random values */
  gbufs_init(&de, s.L, T, 1, 0.0f);
  ref_rng r = {seed ^ 0x5555};
  float *v_down = malloc((size_t)(N * d) * sizeof(float)),
        *v_up = malloc((size_t)(N * d) * sizeof(float));
  for (int64_t i = 0; i < N * d; i++) {
    de.g.experts_down[i] = v_down[i] = (float)ref_uniform(&r, -3.0, 3.0);
    de.g.experts_up[i] = v_up[i] = (float)ref_uniform(&r, -3.0, 3.0);
  }
  train_step(&s, &de, &y2, &dx2);
  cr_assert_eq(de.g.n_expert_rows, n_used);
  cr_assert_eq(memcmp(de.g.expert_rows, sp.g.expert_rows, (size_t)n_used * sizeof(int64_t)), 0,
               "dense and sparse modes list different rows " CASE_FMT, CASE_ARGS(c, seed));
  char *is_used = calloc((size_t)N, 1);
  for (int64_t i = 0; i < n_used; i++) {
    int64_t id = used[i];
    is_used[id] = 1;
    for (int64_t j = 0; j < d; j++) {
      float want_d = v_down[id * d + j] + sp.g.experts_down[i * d + j];
      float want_u = v_up[id * d + j] + sp.g.experts_up[i * d + j];
      cr_assert(de.g.experts_down[id * d + j] == want_d && de.g.experts_up[id * d + j] == want_u,
                "expert %lld col %lld: dense %.9g / %.9g, prefill + sparse %.9g / %.9g " CASE_FMT,
                (long long)id, (long long)j, (double)de.g.experts_down[id * d + j],
                (double)de.g.experts_up[id * d + j], (double)want_d, (double)want_u,
                CASE_ARGS(c, seed));
    }
  }
  for (int64_t id = 0; id < N; id++)
    if (!is_used[id])
      cr_assert(!memcmp(de.g.experts_down + id * d, v_down + id * d, (size_t)d * sizeof(float)) &&
                    !memcmp(de.g.experts_up + id * d, v_up + id * d, (size_t)d * sizeof(float)),
                "unused expert %lld changed in dense mode " CASE_FMT, (long long)id,
                CASE_ARGS(c, seed));
  /* everything else is the same in both modes */
  cr_assert_eq(memcmp(y1, y2, (size_t)(T * d) * sizeof(float)), 0);
  cr_assert_eq(memcmp(dx1, dx2, (size_t)(T * d) * sizeof(float)), 0);
  cr_assert_eq(memcmp(sp.g.query_weight, de.g.query_weight, (size_t)sp.n_wq * sizeof(float)), 0);
  cr_assert_eq(memcmp(sp.g.keys, de.g.keys, (size_t)sp.n_keys * sizeof(float)), 0);

  free(is_used);
  free(v_down);
  free(v_up);
  free(y1);
  free(dx1);
  free(y2);
  free(dx2);
  gbufs_free(&sp);
  gbufs_free(&de);
  free(used);
  free(ids);
  free_setup(&s);
}

Test(train_format, sparse_and_dense_experts) {
  uint64_t seed = ref_test_seed();
  layer_case c = big_case();
  sparse_vs_dense(&c, case_seed(seed, 0));
  /* N = 25: many repeats */
  case_set(&c, "weight_dtype=bf16,shared_keys=1,n_subkeys=5,top_k=3,subkey_top_k=3");
  sparse_vs_dense(&c, case_seed(seed, 1));
  /* N = 90000: ids need three radix passes, sub-keys two */
  c = big_case();
  c.dup = 0;
  case_set(&c, "n_subkeys=300,d_model=8");
  sparse_vs_dense(&c, case_seed(seed, 2));
  c.dup = 1;
  case_set(&c, "n_subkeys=20,activation=relu,gate=relu");
  sparse_vs_dense(&c, case_seed(seed, 3));
}

/* Sub-key rows never kept get exactly 0, whatever the buffer held. */
static void keys_zero(const layer_case *c, uint64_t seed) {
  setup s = make_setup(c, seed);
  const int64_t n = c->n, H = c->H, k = c->k, half = c->dk / 2, G = c->cfg.shared_keys ? 1 : H;
  int64_t *ids = retrieve_ids(&s);
  char *kept = calloc((size_t)(G * 2 * n), 1);
  for (int64_t e = 0; e < c->T * H * k; e++) {
    int64_t g = c->cfg.shared_keys ? 0 : (e / k) % H;
    kept[(g * 2 + 0) * n + ids[e] / n] = 1;
    kept[(g * 2 + 1) * n + ids[e] % n] = 1;
  }
  gbufs b;
  gbufs_init(&b, s.L, c->T, 0, 123.0f);
  float *y, *dx;
  train_step(&s, &b, &y, &dx);
  int64_t n_kept = 0;
  for (int64_t row = 0; row < G * 2 * n; row++) {
    n_kept += kept[row];
    for (int64_t i = 0; i < half; i++) {
      float v = b.g.keys[row * half + i];
      if (kept[row])
        cr_assert(isfinite(v) && v != 123.0f, "kept keys row %lld not written " CASE_FMT,
                  (long long)row, CASE_ARGS(c, seed));
      else
        cr_assert(v == 0.0f && !signbit(v), "keys row %lld never kept, gradient %.9g " CASE_FMT,
                  (long long)row, (double)v, CASE_ARGS(c, seed));
    }
  }
  cr_assert_lt(n_kept, G * 2 * n, "every row kept; the test shows nothing " CASE_FMT,
               CASE_ARGS(c, seed));
  free(y);
  free(dx);
  gbufs_free(&b);
  free(kept);
  free(ids);
  free_setup(&s);
}

Test(train_format, keys_never_kept_are_zero) {
  uint64_t seed = ref_test_seed();
  layer_case c = base_case();
  c.T = 5;
  case_set(&c, "n_subkeys=64,top_k=2,subkey_top_k=3");
  keys_zero(&c, case_seed(seed, 0));
  case_set(&c, "shared_keys=1,n_heads=4");
  keys_zero(&c, case_seed(seed, 1));
}

/* ------------------------------------------------------- determinism */

static void same_bits(const layer_case *c, uint64_t seed) {
  setup s = make_setup(c, seed);
  const int64_t T = c->T, d = c->d, dq = c->H * c->dk;
  float *rm = NULL, *rv = NULL, *rm0 = NULL, *rv0 = NULL;
  if (c->cfg.query_norm == PEER_NORM_BATCHNORM) {
    rm = param_f32(s.L, "query.norm.running_mean");
    rv = param_f32(s.L, "query.norm.running_var");
    rm0 = malloc((size_t)dq * sizeof(float));
    rv0 = malloc((size_t)dq * sizeof(float));
    memcpy(rm0, rm, (size_t)dq * sizeof(float));
    memcpy(rv0, rv, (size_t)dq * sizeof(float));
  }
  const int threads[] = {1, 2, 3};
  gbufs b[3], bd[3];
  float *y[3], *dx[3], *yd[3], *dxd[3], *rm1[3], *rv1[3];
  for (int i = 0; i < 3; i++) {
    cr_assert_eq(peer_layer_set_threads(s.L, threads[i]), PEER_OK);
    if (rm) {
      memcpy(rm, rm0, (size_t)dq * sizeof(float));
      memcpy(rv, rv0, (size_t)dq * sizeof(float));
    }
    gbufs_init(&b[i], s.L, T, 0, 0.0f);
    train_step(&s, &b[i], &y[i], &dx[i]);
    gbufs_init(&bd[i], s.L, T, 1, 0.5f);
    train_step(&s, &bd[i], &yd[i], &dxd[i]);
    rm1[i] = rm ? malloc((size_t)dq * sizeof(float)) : NULL;
    rv1[i] = rm ? malloc((size_t)dq * sizeof(float)) : NULL;
    if (rm) {
      memcpy(rm1[i], rm, (size_t)dq * sizeof(float));
      memcpy(rv1[i], rv, (size_t)dq * sizeof(float));
    }
  }
#define SAME(a, b, count, what)                                                                    \
  cr_assert(((a) == NULL && (b) == NULL) || !memcmp((a), (b), (size_t)(count) * sizeof(*(a))),     \
            "%s differs between %d and %d threads " CASE_FMT, what, threads[0], threads[i],        \
            CASE_ARGS(c, seed))
  for (int i = 1; i < 3; i++) {
    SAME(y[0], y[i], T * d, "y");
    SAME(dx[0], dx[i], T * d, "dx");
    SAME(b[0].g.query_weight, b[i].g.query_weight, b[0].n_wq, "query.weight grad");
    SAME(b[0].g.query_bias, b[i].g.query_bias, dq, "query.bias grad");
    SAME(b[0].g.norm_weight, b[i].g.norm_weight, dq, "query.norm.weight grad");
    SAME(b[0].g.norm_bias, b[i].g.norm_bias, dq, "query.norm.bias grad");
    SAME(b[0].g.keys, b[i].g.keys, b[0].n_keys, "keys grad");
    cr_assert_eq(b[0].g.n_expert_rows, b[i].g.n_expert_rows);
    SAME(b[0].g.expert_rows, b[i].g.expert_rows, b[0].g.n_expert_rows, "expert_rows");
    SAME(b[0].g.experts_down, b[i].g.experts_down, b[0].g.n_expert_rows * d, "experts.down grad");
    SAME(b[0].g.experts_up, b[i].g.experts_up, b[0].g.n_expert_rows * d, "experts.up grad");
    SAME(yd[0], yd[i], T * d, "y (second step)");
    SAME(dxd[0], dxd[i], T * d, "dx (second step)");
    SAME(bd[0].g.experts_down, bd[i].g.experts_down, bd[0].n_exp, "dense experts.down grad");
    SAME(bd[0].g.experts_up, bd[i].g.experts_up, bd[0].n_exp, "dense experts.up grad");
    SAME(rm1[0], rm1[i], dq, "running_mean");
    SAME(rv1[0], rv1[i], dq, "running_var");
  }
#undef SAME
  cr_assert_lt(b[0].g.n_expert_rows, T * c->H * c->k, "no duplicates " CASE_FMT,
               CASE_ARGS(c, seed));
  for (int i = 0; i < 3; i++) {
    gbufs_free(&b[i]);
    gbufs_free(&bd[i]);
    free(y[i]);
    free(dx[i]);
    free(yd[i]);
    free(dxd[i]);
    free(rm1[i]);
    free(rv1[i]);
  }
  free(rm0);
  free(rv0);
  free_setup(&s);
}

Test(train_determinism, same_bits_any_thread_count) {
  uint64_t seed = ref_test_seed();
  layer_case c = big_case();
  case_set(&c, "query_norm=batchnorm,query_bias=1");
  same_bits(&c, case_seed(seed, 0));
  c = big_case();
  case_set(&c, "shared_keys=1,weight_dtype=bf16,activation=relu,gate=sigmoid");
  same_bits(&c, case_seed(seed, 1));
  c = big_case();
  c.T = 200;
  case_set(&c, "d_model=40,n_subkeys=40,d_key=16,query_norm=batchnorm");
  same_bits(&c, case_seed(seed, 2));
}

/* ------------------------------------------ batch-norm running statistics */

/* Expect running = (1 - m) old + m batch (unbiased variance) in double. */
static void check_running(setup *s, const float *old_m, const float *old_v, double mo) {
  const layer_case *c = &s->c;
  const int64_t T = c->T, dq = c->H * c->dk;
  rt_params P;
  rt_params_load(&P, s->L);
  double *xd = to_double(s->x, T * c->d), *q = malloc((size_t)(T * dq) * sizeof(double));
  rt_project(&P, T, xd, q);
  const float *rm = param_f32(s->L, "query.norm.running_mean");
  const float *rv = param_f32(s->L, "query.norm.running_var");
  for (int64_t f = 0; f < dq; f++) {
    double mean, var, mag = 0.0;
    rt_batch_stats(&P, T, q, f, &mean, &var);
    for (int64_t t = 0; t < T; t++)
      mag = fmax(mag, fabs(q[t * dq + f]));
    double unbiased = var * (double)T / (double)(T - 1);
    double em = (1.0 - mo) * old_m[f] + mo * mean, ev = (1.0 - mo) * old_v[f] + mo * unbiased;
    cr_expect(fabs(rm[f] - em) <= 1e-5 * ((1.0 - mo) * fabs(old_m[f]) + mo * mag) + 1e-7,
              "running_mean[%lld] = %.9g, expected %.9g (momentum %g) " CASE_FMT, (long long)f,
              (double)rm[f], em, mo, CASE_ARGS(c, s->seed));
    cr_expect(fabs(rv[f] - ev) <= 1e-5 * ((1.0 - mo) * fabs(old_v[f]) + mo * mag * mag) + 1e-9,
              "running_var[%lld] = %.9g, expected %.9g (momentum %g) " CASE_FMT, (long long)f,
              (double)rv[f], ev, mo, CASE_ARGS(c, s->seed));
  }
  free(xd);
  free(q);
  rt_params_free(&P);
}

/* One forward_train; checks the running statistics moved by momentum mo. */
static void train_and_check_running(setup *s, peer_context *ctx, float *y, double mo) {
  const int64_t dq = s->c.H * s->c.dk;
  float *rm = param_f32(s->L, "query.norm.running_mean");
  float *rv = param_f32(s->L, "query.norm.running_var");
  float *om = malloc((size_t)dq * sizeof(float)), *ov = malloc((size_t)dq * sizeof(float));
  memcpy(om, rm, (size_t)dq * sizeof(float));
  memcpy(ov, rv, (size_t)dq * sizeof(float));
  cr_assert_eq(peer_forward_train(s->L, ctx, s->c.T, s->x, y), PEER_OK, "%s", peer_last_error());
  if (mo == 0.0)
    cr_expect(!memcmp(om, rm, (size_t)dq * sizeof(float)) &&
                  !memcmp(ov, rv, (size_t)dq * sizeof(float)),
              "momentum 0 changed the running statistics");
  check_running(s, om, ov, mo);
  free(om);
  free(ov);
}

Test(train_norm, running_statistics) {
  uint64_t seed = ref_test_seed();
  layer_case c = base_case();
  c.T = 9;
  case_set(&c, "query_norm=batchnorm,query_bias=1");
  setup s = make_setup(&c, seed);
  peer_context *ctx = NULL;
  cr_assert_eq(peer_context_create(&ctx, s.L, c.T), PEER_OK);
  float *y = malloc((size_t)(c.T * c.d) * sizeof(float));
  train_and_check_running(&s, ctx, y, 0.1); /* the default */
  train_and_check_running(&s, ctx, y, 0.1);
  cr_assert_eq(peer_layer_set_norm_momentum(s.L, 0.3f), PEER_OK);
  train_and_check_running(&s, ctx, y, (double)0.3f);
  cr_assert_eq(peer_layer_set_norm_momentum(s.L, 1.0f), PEER_OK);
  train_and_check_running(&s, ctx, y, 1.0);
  cr_assert_eq(peer_layer_set_norm_momentum(s.L, 0.0f), PEER_OK);
  train_and_check_running(&s, ctx, y, 0.0);
  /* a constant feature (every token the same): batch variance 0 */
  cr_assert_eq(peer_layer_set_norm_momentum(s.L, 0.5f), PEER_OK);
  for (int64_t t = 1; t < c.T; t++)
    memcpy(s.x + t * c.d, s.x, (size_t)c.d * sizeof(float));
  train_and_check_running(&s, ctx, y, 0.5);
  const float bad[] = {-0.1f, 1.5f, NAN, INFINITY};
  for (int i = 0; i < 4; i++)
    cr_expect_eq(peer_layer_set_norm_momentum(s.L, bad[i]), PEER_ERR_INVALID_ARGUMENT,
                 "momentum %g accepted", (double)bad[i]);
  free(y);
  peer_context_free(ctx);
  free_setup(&s);
}

/* After training, inference (peer_forward) normalises with the running
 * statistics: it matches reference.h's inference forward. */
Test(train_norm, inference_uses_running_statistics) {
  uint64_t seed = ref_test_seed();
  layer_case c = base_case();
  c.T = 12;
  case_set(&c, "query_norm=batchnorm,query_bias=1");
  setup s = make_setup(&c, seed);
  const int64_t T = c.T, d = c.d, H = c.H, k = c.k;
  peer_context *ctx = NULL;
  cr_assert_eq(peer_context_create(&ctx, s.L, T), PEER_OK);
  float *yt = malloc((size_t)(T * d) * sizeof(float)),
        *yi = malloc((size_t)(T * d) * sizeof(float));
  cr_assert_eq(peer_layer_set_norm_momentum(s.L, 0.5f), PEER_OK);
  for (int i = 0; i < 3; i++)
    cr_assert_eq(peer_forward_train(s.L, ctx, T, s.x, yt), PEER_OK);
  int64_t *ids = malloc((size_t)(T * H * k) * sizeof(int64_t));
  cr_assert_eq(peer_forward(s.L, T, s.x, yi, ids, NULL), PEER_OK, "%s", peer_last_error());

  ref_layer R;
  ref_bind(&R, s.L);
  ref_token o;
  ref_token_alloc(&o, &R);
  int checked = 0;
  double diff = 0.0;
  for (int64_t t = 0; t < T; t++) {
    ref_forward_token(&R, s.x + t * d, &o, 1);
    int all = 1;
    for (int64_t h = 0; h < H; h++) {
      char msg[512];
      int ok_ids = 0;
      cr_assert_eq(
          ref_check_head(&R, &o, h, ids + (t * H + h) * k, NULL, NEAR, &ok_ids, msg, sizeof msg), 0,
          "token %lld: %s " CASE_FMT, (long long)t, msg, CASE_ARGS(&c, seed));
      all &= ok_ids;
    }
    if (!all) continue;
    checked++;
    double ym = ref_row_max(o.mass, d);
    for (int64_t i = 0; i < d; i++) {
      cr_assert(fabs((double)yi[t * d + i] - o.y[i]) <= Y_TOL * ym + 1e-6,
                "token %lld y[%lld] = %.9g, reference (running stats) %.9g " CASE_FMT, (long long)t,
                (long long)i, (double)yi[t * d + i], o.y[i], CASE_ARGS(&c, seed));
      diff = fmax(diff, fabs((double)yi[t * d + i] - (double)yt[t * d + i]));
    }
  }
  cr_assert_gt(checked, T / 2, "too few tokens without near-ties " CASE_FMT, CASE_ARGS(&c, seed));
  cr_assert_gt(diff, 1e-3, "inference equals training output: batch statistics used? " CASE_FMT,
               CASE_ARGS(&c, seed));
  ref_token_free(&o);
  free(ids);
  free(yt);
  free(yi);
  peer_context_free(ctx);
  free_setup(&s);
}

/* ----------------------------------------------------- errors and state */

/* A small layer and a context for T tokens, with x, y, dy, dx. */
typedef struct rig {
  setup s;
  peer_context *ctx;
  float *y, *dx;
  gbufs b;
} rig;

static rig make_rig(const layer_case *c, uint64_t seed) {
  rig g;
  g.s = make_setup(c, seed);
  cr_assert_eq(peer_context_create(&g.ctx, g.s.L, c->T), PEER_OK);
  g.y = malloc((size_t)(c->T * c->d) * sizeof(float));
  g.dx = malloc((size_t)(c->T * c->d) * sizeof(float));
  gbufs_init(&g.b, g.s.L, c->T, 0, 0.0f);
  return g;
}

static void free_rig(rig *g) {
  gbufs_free(&g->b);
  free(g->y);
  free(g->dx);
  peer_context_free(g->ctx);
  free_setup(&g->s);
}

static layer_case small_case(void) {
  layer_case c = base_case();
  c.T = 5;
  case_set(&c, "query_norm=batchnorm,query_bias=1");
  return c;
}

Test(train_errors, backward_needs_one_forward_train) {
  layer_case c = small_case();
  rig g = make_rig(&c, ref_test_seed());
  cr_expect_eq(peer_backward(g.s.L, g.ctx, g.s.dy, g.dx, &g.b.g), PEER_ERR_STATE,
               "backward before forward_train");
  cr_assert_eq(peer_forward_train(g.s.L, g.ctx, c.T, g.s.x, g.y), PEER_OK);
  cr_expect_eq(peer_backward(g.s.L, g.ctx, g.s.dy, g.dx, &g.b.g), PEER_OK, "%s", peer_last_error());
  cr_expect_eq(peer_backward(g.s.L, g.ctx, g.s.dy, g.dx, &g.b.g), PEER_ERR_STATE,
               "second backward after one forward_train");
  cr_expect_gt(strlen(peer_last_error()), 0);
  cr_assert_eq(peer_forward_train(g.s.L, g.ctx, c.T, g.s.x, g.y), PEER_OK);
  cr_expect_eq(peer_backward(g.s.L, g.ctx, g.s.dy, g.dx, &g.b.g), PEER_OK, "%s", peer_last_error());
  free_rig(&g);
}

Test(train_errors, context_of_another_layer) {
  layer_case c = small_case();
  uint64_t seed = ref_test_seed();
  rig g = make_rig(&c, seed);
  setup other = make_setup(&c, seed + 1);
  peer_context *octx = NULL;
  cr_assert_eq(peer_context_create(&octx, other.L, c.T), PEER_OK);
  cr_expect_eq(peer_forward_train(g.s.L, octx, c.T, g.s.x, g.y), PEER_ERR_INVALID_ARGUMENT);
  cr_assert_eq(peer_forward_train(other.L, octx, c.T, other.x, g.y), PEER_OK);
  cr_expect_eq(peer_backward(g.s.L, octx, g.s.dy, g.dx, &g.b.g), PEER_ERR_INVALID_ARGUMENT);
  /* the rejected call did not consume the context's forward */
  cr_expect_eq(peer_backward(other.L, octx, other.dy, g.dx, &g.b.g), PEER_OK, "%s",
               peer_last_error());
  cr_expect_eq(peer_forward_train(NULL, g.ctx, c.T, g.s.x, g.y), PEER_ERR_INVALID_ARGUMENT);
  cr_expect_eq(peer_forward_train(g.s.L, NULL, c.T, g.s.x, g.y), PEER_ERR_INVALID_ARGUMENT);
  peer_context_free(octx);
  free_setup(&other);
  free_rig(&g);
}

Test(train_errors, token_counts) {
  layer_case c = small_case();
  rig g = make_rig(&c, ref_test_seed());
  float *x = malloc((size_t)((c.T + 1) * c.d) * sizeof(float)),
        *y = malloc((size_t)((c.T + 1) * c.d) * sizeof(float));
  memcpy(x, g.s.x, (size_t)(c.T * c.d) * sizeof(float));
  memcpy(x + c.T * c.d, g.s.x, (size_t)c.d * sizeof(float));
  cr_expect_eq(peer_forward_train(g.s.L, g.ctx, c.T + 1, x, y), PEER_ERR_INVALID_ARGUMENT,
               "T > max_tokens");
  cr_expect_eq(peer_forward_train(g.s.L, g.ctx, -1, x, y), PEER_ERR_INVALID_ARGUMENT);
  cr_expect_eq(peer_backward(g.s.L, g.ctx, g.s.dy, g.dx, &g.b.g), PEER_ERR_STATE,
               "backward after a rejected forward_train");
  /* batch norm needs two tokens */
  cr_expect_eq(peer_forward_train(g.s.L, g.ctx, 1, x, y), PEER_ERR_INVALID_ARGUMENT,
               "T = 1 with batch norm");
  cr_expect_eq(peer_backward(g.s.L, g.ctx, g.s.dy, g.dx, &g.b.g), PEER_ERR_STATE);
  /* without batch norm one token is fine */
  layer_case c1 = c;
  case_set(&c1, "query_norm=none");
  rig g1 = make_rig(&c1, ref_test_seed());
  cr_expect_eq(peer_forward_train(g1.s.L, g1.ctx, 1, g1.s.x, g1.y), PEER_OK, "%s",
               peer_last_error());
  cr_expect_eq(peer_backward(g1.s.L, g1.ctx, g1.s.dy, g1.dx, &g1.b.g), PEER_OK, "%s",
               peer_last_error());
  free_rig(&g1);
  free(x);
  free(y);
  free_rig(&g);
}

Test(train_errors, expert_capacity) {
  layer_case c = small_case();
  rig g = make_rig(&c, ref_test_seed());
  cr_assert_eq(peer_forward_train(g.s.L, g.ctx, c.T, g.s.x, g.y), PEER_OK);
  g.b.g.expert_capacity = c.T * c.H * c.k - 1;
  cr_expect_eq(peer_backward(g.s.L, g.ctx, g.s.dy, g.dx, &g.b.g), PEER_ERR_INVALID_ARGUMENT,
               "expert_capacity T*H*k - 1 accepted");
  g.b.g.expert_capacity = c.T * c.H * c.k;
  float *up = g.b.g.experts_up;
  g.b.g.experts_up = NULL;
  cr_expect_eq(peer_backward(g.s.L, g.ctx, g.s.dy, g.dx, &g.b.g), PEER_ERR_INVALID_ARGUMENT,
               "experts_down without experts_up accepted");
  g.b.g.experts_up = up;
  cr_expect_eq(peer_backward(g.s.L, g.ctx, g.s.dy, g.dx, &g.b.g), PEER_OK, "%s", peer_last_error());
  cr_expect_eq(peer_backward(g.s.L, g.ctx, g.s.dy, g.dx, NULL), PEER_ERR_STATE);
  cr_assert_eq(peer_forward_train(g.s.L, g.ctx, c.T, g.s.x, g.y), PEER_OK);
  cr_expect_eq(peer_backward(g.s.L, g.ctx, g.s.dy, g.dx, NULL), PEER_ERR_INVALID_ARGUMENT,
               "NULL grads accepted");
  free_rig(&g);
}

Test(train_errors, nonfinite) {
  layer_case c = small_case();
  rig g = make_rig(&c, ref_test_seed());
  float *dy = malloc((size_t)(c.T * c.d) * sizeof(float));
  const float bad[] = {NAN, INFINITY, -INFINITY};
  for (int i = 0; i < 3; i++) {
    memcpy(dy, g.s.dy, (size_t)(c.T * c.d) * sizeof(float));
    dy[(c.T - 1) * c.d + 3] = bad[i];
    cr_assert_eq(peer_forward_train(g.s.L, g.ctx, c.T, g.s.x, g.y), PEER_OK);
    cr_expect_eq(peer_backward(g.s.L, g.ctx, dy, g.dx, &g.b.g), PEER_ERR_NONFINITE,
                 "dy holding %g accepted", (double)bad[i]);
    /* the rejected backward did not consume the forward: a retry works */
    cr_expect_eq(peer_backward(g.s.L, g.ctx, g.s.dy, g.dx, &g.b.g), PEER_OK, "%s",
                 peer_last_error());
  }
  /* NaN in x: rejected, running statistics untouched, no backward after it */
  const int64_t dq = c.H * c.dk;
  float *rm = param_f32(g.s.L, "query.norm.running_mean");
  float *om = malloc((size_t)dq * sizeof(float));
  memcpy(om, rm, (size_t)dq * sizeof(float));
  float keep = g.s.x[2 * c.d + 1];
  g.s.x[2 * c.d + 1] = NAN;
  cr_expect_eq(peer_forward_train(g.s.L, g.ctx, c.T, g.s.x, g.y), PEER_ERR_NONFINITE);
  cr_expect_eq(peer_backward(g.s.L, g.ctx, g.s.dy, g.dx, &g.b.g), PEER_ERR_STATE,
               "backward after a failed forward_train");
  cr_expect(!memcmp(om, rm, (size_t)dq * sizeof(float)), "failed forward_train moved running_mean");
  g.s.x[2 * c.d + 1] = keep;
  /* a NaN sub-key reaches scores: the same */
  float *keys = param_f32(g.s.L, "keys");
  cr_assert_eq(peer_forward_train(g.s.L, g.ctx, c.T, g.s.x, g.y), PEER_OK);
  memcpy(om, rm, (size_t)dq * sizeof(float));
  float *saved = malloc((size_t)(c.n * c.dk / 2) * sizeof(float));
  memcpy(saved, keys, (size_t)(c.n * c.dk / 2) * sizeof(float));
  for (int64_t i = 0; i < c.n * c.dk / 2; i++)
    keys[i] = NAN; /* every C1 row of head 0 */
  cr_expect_eq(peer_forward_train(g.s.L, g.ctx, c.T, g.s.x, g.y), PEER_ERR_NONFINITE);
  cr_expect_eq(peer_backward(g.s.L, g.ctx, g.s.dy, g.dx, &g.b.g), PEER_ERR_STATE);
  cr_expect(!memcmp(om, rm, (size_t)dq * sizeof(float)), "failed forward_train moved running_mean");
  memcpy(keys, saved, (size_t)(c.n * c.dk / 2) * sizeof(float));
  free(saved);
  free(om);
  free(dy);
  free_rig(&g);
}

Test(train_errors, grads_the_layer_lacks) {
  layer_case c = base_case();
  case_set(&c, "query_bias=0,query_norm=none");
  rig g = make_rig(&c, ref_test_seed());
  float *extra = calloc((size_t)(c.H * c.dk), sizeof(float));
  cr_assert_eq(peer_forward_train(g.s.L, g.ctx, c.T, g.s.x, g.y), PEER_OK);
  g.b.g.query_bias = extra;
  cr_expect_eq(peer_backward(g.s.L, g.ctx, g.s.dy, g.dx, &g.b.g), PEER_ERR_INVALID_ARGUMENT,
               "query_bias gradient on a layer without bias");
  g.b.g.query_bias = NULL;
  g.b.g.norm_weight = extra;
  cr_expect_eq(peer_backward(g.s.L, g.ctx, g.s.dy, g.dx, &g.b.g), PEER_ERR_INVALID_ARGUMENT,
               "norm gradient on a layer without batch norm");
  g.b.g.norm_weight = NULL;
  cr_expect_eq(peer_backward(g.s.L, g.ctx, g.s.dy, g.dx, &g.b.g), PEER_OK, "%s", peer_last_error());
  free(extra);
  free_rig(&g);
}

/* Only some outputs asked for: the others are skipped, the asked ones equal a
 * full call's. */
Test(train_errors, optional_outputs) {
  layer_case c = small_case();
  rig g = make_rig(&c, ref_test_seed());
  const int64_t n = c.T * c.d;
  cr_assert_eq(peer_forward_train(g.s.L, g.ctx, c.T, g.s.x, g.y), PEER_OK);
  cr_assert_eq(peer_backward(g.s.L, g.ctx, g.s.dy, g.dx, &g.b.g), PEER_OK);
  peer_grads only = {0};
  only.keys = malloc((size_t)g.b.n_keys * sizeof(float));
  float *dx2 = malloc((size_t)n * sizeof(float));
  cr_assert_eq(peer_forward_train(g.s.L, g.ctx, c.T, g.s.x, g.y), PEER_OK);
  cr_assert_eq(peer_backward(g.s.L, g.ctx, g.s.dy, NULL, &only), PEER_OK, "%s", peer_last_error());
  cr_expect_eq(memcmp(only.keys, g.b.g.keys, (size_t)g.b.n_keys * sizeof(float)), 0);
  cr_expect_eq(only.n_expert_rows, 0);
  peer_grads none = {0};
  cr_assert_eq(peer_forward_train(g.s.L, g.ctx, c.T, g.s.x, g.y), PEER_OK);
  cr_assert_eq(peer_backward(g.s.L, g.ctx, g.s.dy, dx2, &none), PEER_OK, "%s", peer_last_error());
  cr_expect_eq(memcmp(dx2, g.dx, (size_t)n * sizeof(float)), 0);
  free(only.keys);
  free(dx2);
  free_rig(&g);
}

Test(train_errors, empty_batch) {
  layer_case c = small_case();
  rig g = make_rig(&c, ref_test_seed());
  g.b.g.n_expert_rows = 99;
  cr_expect_eq(peer_forward_train(g.s.L, g.ctx, 0, NULL, NULL), PEER_OK, "%s", peer_last_error());
  cr_expect_eq(peer_backward(g.s.L, g.ctx, NULL, NULL, &g.b.g), PEER_OK, "%s", peer_last_error());
  cr_expect_eq(g.b.g.n_expert_rows, 0);
  cr_expect_eq(peer_backward(g.s.L, g.ctx, NULL, NULL, &g.b.g), PEER_ERR_STATE);
  free_rig(&g);
}

/* The header says dense gradients are overwritten: for an empty batch the
 * gradient is zero, so stale buffer contents must not survive. */
Test(train_errors, empty_batch_overwrites_dense_grads) {
  layer_case c = small_case();
  rig g = make_rig(&c, ref_test_seed());
  gbufs b;
  gbufs_init(&b, g.s.L, c.T, 0, 7.0f);
  cr_assert_eq(peer_forward_train(g.s.L, g.ctx, 0, NULL, NULL), PEER_OK);
  cr_assert_eq(peer_backward(g.s.L, g.ctx, NULL, NULL, &b.g), PEER_OK, "%s", peer_last_error());
  for (int64_t i = 0; i < b.n_wq; i++)
    cr_assert(b.g.query_weight[i] == 0.0f, "query.weight grad[%lld] = %g after T = 0", (long long)i,
              (double)b.g.query_weight[i]);
  for (int64_t i = 0; i < b.n_dq; i++)
    cr_assert(b.g.query_bias[i] == 0.0f && b.g.norm_weight[i] == 0.0f && b.g.norm_bias[i] == 0.0f,
              "bias / norm grad[%lld] not zero after T = 0", (long long)i);
  for (int64_t i = 0; i < b.n_keys; i++)
    cr_assert(b.g.keys[i] == 0.0f, "keys grad[%lld] = %g after T = 0", (long long)i,
              (double)b.g.keys[i]);
  gbufs_free(&b);
  free_rig(&g);
}

Test(train_errors, context_size) {
  layer_case c = small_case();
  setup s = make_setup(&c, ref_test_seed());
  size_t s1 = 0, s100 = 0, s1000 = 0;
  cr_assert_eq(peer_context_size(s.L, 1, &s1), PEER_OK);
  cr_assert_eq(peer_context_size(s.L, 100, &s100), PEER_OK);
  cr_assert_eq(peer_context_size(s.L, 1000, &s1000), PEER_OK);
  cr_expect_gt(s1, 0);
  cr_expect_gt(s100, s1);
  cr_expect_gt(s1000, s100);
  cr_expect_eq(peer_context_size(NULL, 10, &s1), PEER_ERR_INVALID_ARGUMENT);
  cr_expect_eq(peer_context_size(s.L, 10, NULL), PEER_ERR_INVALID_ARGUMENT);
  peer_context *ctx = (peer_context *)&s; /* must be overwritten */
  cr_expect_eq(peer_context_create(&ctx, s.L, -3), PEER_ERR_INVALID_ARGUMENT);
  cr_expect_null(ctx);
  peer_context_free(NULL);
  free_setup(&s);
}
