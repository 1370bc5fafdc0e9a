/* test_cuda.c: the CUDA backend against the CPU backend.  Each case fills a
 * CPU layer (random, or coarse values whose scores tie exactly), copies every
 * parameter to a CUDA layer, and compares retrieval and forward: scores and y
 * within stated tolerances; ids exactly, except where the CPU's own scores
 * hold a near-tie (the two backends round the sub-key products differently);
 * with coarse values, where every sum is exact, ids and scores must agree
 * exactly.  The device-pointer API must give the host path's bits.
 * Training (forward_train, backward) is compared the same way: y, dx and
 * every gradient within GRAD_TOL, expert rows exactly, same bits twice.
 *
 * Without a CUDA build or a device the program exits 77 (ctest: skipped)
 * before Criterion starts.  The device probe runs in a child process so the
 * parent never initialises CUDA before Criterion forks its workers. */
#include "peer.h"

#include <stdio.h>

#ifndef PEER_USE_CUDA
int main(void) {
  fprintf(stderr, "test_cuda: skipped: this build has no CUDA backend (PEER_CUDA=OFF)\n");
  return 77;
}
#else

#include "peer_cuda.h"
#include "reference.h"

#include <criterion/criterion.h>
#include <cuda_runtime_api.h>
#include <sys/wait.h>

/* Relative tolerance of scores and y between backends: f32 sums of up to
 * max(d, d_key/2) products in different orders. */
#define SCORE_TOL 2e-5
#define Y_TOL 2e-4

typedef struct pair {
  peer_layer *cpu, *gpu;
  peer_config cfg;
} pair;

static void copy_params(pair *p) {
  for (int i = 0; i < peer_layer_n_params(p->cpu); i++) {
    peer_tensor a, b;
    cr_assert_eq(peer_layer_param(p->cpu, i, &a), PEER_OK);
    cr_assert_eq(peer_layer_param(p->gpu, i, &b), PEER_OK);
    cr_assert_eq(a.nbytes, b.nbytes);
    cr_assert_eq(cudaMemcpy(b.data, a.data, a.nbytes, cudaMemcpyHostToDevice), cudaSuccess);
  }
}

static pair make_pair(const char *config) {
  pair p;
  peer_config_default(&p.cfg);
  cr_assert_eq(peer_config_parse(&p.cfg, config), PEER_OK, "%s: %s", config, peer_last_error());
  peer_options o;
  peer_options_default(&o);
  cr_assert_eq(peer_layer_create(&p.cpu, &p.cfg, &o), PEER_OK, "%s", peer_last_error());
  o.backend = PEER_BACKEND_CUDA;
  cr_assert_eq(peer_layer_create(&p.gpu, &p.cfg, &o), PEER_OK, "%s", peer_last_error());
  return p;
}

static void free_pair(pair *p) {
  peer_layer_free(p->cpu);
  peer_layer_free(p->gpu);
}

typedef struct outs {
  int64_t *ids;
  float *sc, *g, *y;
} outs;

static outs outs_new(int64_t T, const peer_config *c) {
  size_t e = (size_t)(T * c->n_heads * c->top_k) + 1, yd = (size_t)(T * c->d_model) + 1;
  outs o = {malloc(e * 8), malloc(e * 4), malloc(e * 4), malloc(yd * 4)};
  return o;
}

static void outs_free(outs *o) {
  free(o->ids), free(o->sc), free(o->g), free(o->y);
}

static double rel(double a, double b) { return fabs(a - b) / (1.0 + fabs(b)); }

/* Compare one batch's retrieval; returns how many (token, head) rows had an
 * id differ (each at a CPU near-tie), and marks their tokens in `swapped`. */
static int64_t compare_retrieval(const pair *p, int64_t T, const outs *c, const outs *g,
                                 int exact, char *swapped, const char *what) {
  const int64_t H = p->cfg.n_heads, k = p->cfg.top_k;
  int64_t rows = 0;
  for (int64_t t = 0; t < T; t++)
    for (int64_t h = 0; h < H; h++) {
      int differs = 0;
      for (int64_t j = 0; j < k; j++) {
        int64_t e = (t * H + h) * k + j;
        double s = c->sc[e];
        cr_assert(exact ? g->sc[e] == c->sc[e] : rel(g->sc[e], s) <= SCORE_TOL,
                  "%s token %lld head %lld pos %lld: gpu score %.9g, cpu %.9g", what,
                  (long long)t, (long long)h, (long long)j, (double)g->sc[e], s);
        cr_assert(g->ids[e] >= 0 && g->ids[e] < p->cfg.n_subkeys * p->cfg.n_subkeys);
        if (g->ids[e] == c->ids[e]) continue;
        int near = j == k - 1 || rel(c->sc[e + 1], s) <= 4 * SCORE_TOL;
        near |= j > 0 && rel(c->sc[e - 1], s) <= 4 * SCORE_TOL;
        cr_assert(!exact && near,
                  "%s token %lld head %lld pos %lld: gpu id %lld, cpu id %lld (score %.9g)", what,
                  (long long)t, (long long)h, (long long)j, (long long)g->ids[e],
                  (long long)c->ids[e], s);
        differs = 1;
      }
      /* the tie rule on the GPU's own output */
      for (int64_t j = 0; j + 1 < k; j++) {
        int64_t e = (t * H + h) * k + j;
        cr_assert(g->sc[e] > g->sc[e + 1] || (g->sc[e] == g->sc[e + 1] && g->ids[e] < g->ids[e + 1]),
                  "%s token %lld head %lld pos %lld: gpu order breaks the tie rule", what,
                  (long long)t, (long long)h, (long long)j);
      }
      if (differs) {
        rows++;
        swapped[t] = 1;
      }
    }
  return rows;
}

/* Forward and retrieval on both backends for T tokens of config `config`. */
static void check_config(const char *config, int64_t T, int quantised) {
  uint64_t seed = ref_test_seed();
  ref_rng rng = {seed};
  pair p = make_pair(config);
  const int64_t d = p.cfg.d_model;
  float *x;
  if (quantised) {
    ref_fill_layer(p.cpu, &rng);
    ref_fill_quantised(p.cpu, "query.weight", &rng, -1, 1, 1.0);
    ref_fill_quantised(p.cpu, "keys", &rng, -2, 2, 0.5);
    x = malloc((size_t)(T * d) * sizeof(float));
    for (int64_t j = 0; j < T * d; j++) x[j] = (float)ref_int(&rng, -2, 2);
  } else {
    ref_fill_layer(p.cpu, &rng);
    x = ref_random_x(&rng, T, d);
  }
  copy_params(&p);
  outs c = outs_new(T, &p.cfg), g = outs_new(T, &p.cfg);
  char what[256];
  snprintf(what, sizeof what, "[%s T=%lld seed=%llu]", config, (long long)T,
           (unsigned long long)seed);

  cr_assert_eq(peer_retrieve(p.cpu, T, x, c.ids, c.sc, c.g), PEER_OK, "%s", peer_last_error());
  cr_assert_eq(peer_retrieve(p.gpu, T, x, g.ids, g.sc, g.g), PEER_OK, "%s %s", what,
               peer_last_error());
  char *swapped = calloc((size_t)T, 1);
  int64_t rows = compare_retrieval(&p, T, &c, &g, quantised, swapped, what);
  cr_assert(rows * 20 <= T * p.cfg.n_heads, "%s: %lld of %lld heads differ in ids", what,
            (long long)rows, (long long)(T * p.cfg.n_heads));
  for (int64_t e = 0; e < T * p.cfg.n_heads * p.cfg.top_k; e++)
    if (!swapped[e / (p.cfg.n_heads * p.cfg.top_k)])
      cr_assert(fabs(g.g[e] - c.g[e]) <= 1e-4, "%s entry %lld: gpu gate %.9g, cpu %.9g", what,
                (long long)e, (double)g.g[e], (double)c.g[e]);

  cr_assert_eq(peer_forward(p.cpu, T, x, c.y, NULL, NULL), PEER_OK, "%s", peer_last_error());
  cr_assert_eq(peer_forward(p.gpu, T, x, g.y, g.ids, NULL), PEER_OK, "%s %s", what,
               peer_last_error());
  for (int64_t t = 0; t < T; t++) {
    if (swapped[t]) continue;
    double m = 0.0;
    for (int64_t i = 0; i < d; i++) m = fmax(m, fabs(c.y[t * d + i]));
    for (int64_t i = 0; i < d; i++)
      cr_assert(fabs(g.y[t * d + i] - c.y[t * d + i]) <= Y_TOL * (1.0 + m),
                "%s token %lld y[%lld]: gpu %.9g, cpu %.9g", what, (long long)t, (long long)i,
                (double)g.y[t * d + i], (double)c.y[t * d + i]);
  }

  /* The device-pointer path gives the host path's bits. */
  size_t xb = (size_t)(T * d) * 4, eb = (size_t)(T * p.cfg.n_heads * p.cfg.top_k);
  float *dx, *dy;
  int64_t *dids;
  cr_assert_eq(cudaMalloc((void **)&dx, xb), cudaSuccess);
  cr_assert_eq(cudaMalloc((void **)&dy, xb), cudaSuccess);
  cr_assert_eq(cudaMalloc((void **)&dids, eb * 8), cudaSuccess);
  cudaStream_t s;
  cr_assert_eq(cudaStreamCreate(&s), cudaSuccess);
  size_t wsb;
  void *ws;
  cr_assert_eq(peer_cuda_workspace_size(p.gpu, T, &wsb), PEER_OK);
  cr_assert_eq(cudaMalloc(&ws, wsb), cudaSuccess);
  cr_assert_eq(peer_cuda_set_workspace(p.gpu, ws, wsb), PEER_OK);
  cr_assert_eq(cudaMemcpy(dx, x, xb, cudaMemcpyHostToDevice), cudaSuccess);
  cr_assert_eq(peer_cuda_forward(p.gpu, T, dx, dy, dids, NULL, s), PEER_OK, "%s", peer_last_error());
  cr_assert_eq(peer_cuda_check(p.gpu, s), PEER_OK, "%s", peer_last_error());
  float *y2 = malloc(xb);
  int64_t *ids2 = malloc(eb * 8);
  cr_assert_eq(cudaMemcpy(y2, dy, xb, cudaMemcpyDeviceToHost), cudaSuccess);
  cr_assert_eq(cudaMemcpy(ids2, dids, eb * 8, cudaMemcpyDeviceToHost), cudaSuccess);
  cr_assert(memcmp(y2, g.y, xb) == 0, "%s: device-pointer y differs from the host path", what);
  cr_assert(memcmp(ids2, g.ids, eb * 8) == 0, "%s: device-pointer ids differ", what);
  /* a batch beyond the registered workspace is refused, not overrun */
  cr_assert_eq(peer_cuda_forward(p.gpu, T + 1, dx, dy, NULL, NULL, s), PEER_ERR_INVALID_ARGUMENT);
  cr_assert_eq(peer_cuda_set_workspace(p.gpu, NULL, 0), PEER_OK);
  cudaFree(ws), cudaFree(dx), cudaFree(dy), cudaFree(dids);
  cudaStreamDestroy(s);
  free(y2), free(ids2), free(swapped), free(x);
  outs_free(&c), outs_free(&g);
  free_pair(&p);
}

#define SMALL "d_model=64,n_heads=4,d_key=32,n_subkeys=64,top_k=8"

Test(cuda, small_default_options) { check_config(SMALL, 97, 0); }
Test(cuda, wider_subkey_lists) { check_config(SMALL ",subkey_top_k=24", 64, 0); }
Test(cuda, subkey_top_k_64) { check_config(SMALL ",n_subkeys=128,top_k=16,subkey_top_k=64", 40, 0); }
Test(cuda, bf16_tables) { check_config(SMALL ",weight_dtype=bf16,activation=silu", 50, 0); }
Test(cuda, odd_width_scalar_path) { check_config("d_model=37,n_heads=3,d_key=10,n_subkeys=33,top_k=5", 31, 0); }
Test(cuda, odd_width_bf16) { check_config("d_model=36,n_heads=2,d_key=8,n_subkeys=20,top_k=3,weight_dtype=bf16", 17, 0); }
Test(cuda, shared_keys_norm_bias_sigmoid) {
  check_config(SMALL ",shared_keys=1,query_norm=batchnorm,query_bias=1,gate=sigmoid,activation=relu", 64, 0);
}
Test(cuda, relu_gates_gelu_tanh) { check_config(SMALL ",gate=relu,activation=gelu_tanh", 48, 0); }
Test(cuda, top_1_and_k_equals_n) {
  check_config("d_model=32,n_heads=2,d_key=16,n_subkeys=16,top_k=1", 33, 0);
  check_config("d_model=32,n_heads=2,d_key=16,n_subkeys=8,top_k=8,subkey_top_k=8", 33, 0);
}
Test(cuda, exact_ties_follow_the_tie_rule) {
  check_config(SMALL, 64, 1);
  check_config(SMALL ",subkey_top_k=16,shared_keys=1", 64, 1);
}
Test(cuda, million_experts) {
  check_config("d_model=64,n_heads=4,d_key=64,n_subkeys=1024,top_k=16", 64, 0);
  check_config("d_model=64,n_heads=2,d_key=64,n_subkeys=1024,top_k=8,subkey_top_k=32,weight_dtype=bf16", 32, 0);
}

/* Every head given the same query and keys picks the same experts: each is
 * counted once per head, as on the CPU. */
Test(cuda, heads_picking_the_same_experts) {
  uint64_t seed = ref_test_seed();
  ref_rng rng = {seed};
  pair p = make_pair(SMALL ",shared_keys=1");
  ref_fill_layer(p.cpu, &rng);
  peer_tensor wq;
  cr_assert_eq(peer_layer_param_by_name(p.cpu, "query.weight", &wq), PEER_OK);
  const int64_t d = p.cfg.d_model, dk = p.cfg.d_key;
  float *w = wq.data;
  for (int64_t h = 1; h < p.cfg.n_heads; h++) memcpy(w + h * dk * d, w, (size_t)(dk * d) * 4);
  copy_params(&p);
  const int64_t T = 16;
  float *x = ref_random_x(&rng, T, d);
  outs c = outs_new(T, &p.cfg), g = outs_new(T, &p.cfg);
  cr_assert_eq(peer_forward(p.cpu, T, x, c.y, c.ids, NULL), PEER_OK);
  cr_assert_eq(peer_forward(p.gpu, T, x, g.y, g.ids, NULL), PEER_OK, "%s", peer_last_error());
  const int64_t k = p.cfg.top_k;
  for (int64_t t = 0; t < T; t++)
    for (int64_t h = 1; h < p.cfg.n_heads; h++)
      cr_assert(memcmp(g.ids + (t * p.cfg.n_heads + h) * k, g.ids + t * p.cfg.n_heads * k,
                       (size_t)k * 8) == 0, "seed %llu token %lld head %lld", (unsigned long long)seed,
                (long long)t, (long long)h);
  for (int64_t i = 0; i < T * d; i++)
    cr_assert(fabs(g.y[i] - c.y[i]) <= Y_TOL * (1.0 + fabs(c.y[i])) * 4, "seed %llu y[%lld]",
              (unsigned long long)seed, (long long)i);
  free(x);
  outs_free(&c), outs_free(&g);
  free_pair(&p);
}

Test(cuda, nonfinite_x_is_an_error_with_ids_in_range) {
  pair p = make_pair(SMALL);
  cr_assert_eq(peer_layer_init(p.gpu, 7), PEER_OK, "%s", peer_last_error());
  const int64_t T = 8, d = p.cfg.d_model;
  ref_rng rng = {1};
  float *x = ref_random_x(&rng, T, d);
  x[5 * d + 3] = NAN;
  outs g = outs_new(T, &p.cfg);
  cr_assert_eq(peer_retrieve(p.gpu, T, x, g.ids, NULL, NULL), PEER_ERR_NONFINITE);
  cr_assert(strstr(peer_last_error(), "token 5") != NULL, "%s", peer_last_error());
  for (int64_t e = 0; e < T * p.cfg.n_heads * p.cfg.top_k; e++)
    cr_assert(g.ids[e] >= 0 && g.ids[e] < p.cfg.n_subkeys * p.cfg.n_subkeys);
  x[5 * d + 3] = 0.5f;
  cr_assert_eq(peer_forward(p.gpu, T, x, g.y, NULL, NULL), PEER_OK, "the record was cleared");
  free(x);
  outs_free(&g);
  free_pair(&p);
}

Test(cuda, init_matches_cpu_init) {
  pair p = make_pair(SMALL ",query_norm=batchnorm,query_bias=1,weight_dtype=bf16");
  cr_assert_eq(peer_layer_init(p.cpu, 42), PEER_OK);
  cr_assert_eq(peer_layer_init(p.gpu, 42), PEER_OK, "%s", peer_last_error());
  for (int i = 0; i < peer_layer_n_params(p.cpu); i++) {
    peer_tensor a, b;
    peer_layer_param(p.cpu, i, &a);
    peer_layer_param(p.gpu, i, &b);
    void *h = malloc(a.nbytes);
    cr_assert_eq(cudaMemcpy(h, b.data, b.nbytes, cudaMemcpyDeviceToHost), cudaSuccess);
    cr_assert(memcmp(h, a.data, a.nbytes) == 0, "%s differs", a.name);
    free(h);
  }
  free_pair(&p);
}

/* ---------------------------------------------------------------- training */

/* Relative tolerance of training outputs and gradients between backends
 * (scaled by the largest magnitude of each output): sums over up to T
 * tokens in different orders, batch statistics included. */
#define GRAD_TOL 1e-3

typedef struct train_out {
  float *y, *dx, *wq, *bq, *nw, *nb, *keys, *down, *up;
  int64_t *rows;
  peer_grads g;
} train_out;

static void close_enough(const float *g, const float *c, size_t n, const char *what,
                         const char *name) {
  double m = 0.0;
  for (size_t i = 0; i < n; i++) m = fmax(m, fabs(c[i]));
  for (size_t i = 0; i < n; i++)
    cr_assert(fabs(g[i] - c[i]) <= GRAD_TOL * (1.0 + m), "%s %s[%zu]: gpu %.9g, cpu %.9g", what,
              name, i, (double)g[i], (double)c[i]);
}

static size_t param_floats(peer_layer *L, const char *name) {
  peer_tensor t;
  return peer_layer_param_by_name(L, name, &t) == PEER_OK ? t.nbytes / 4 : 0;
}

static float *maybe(size_t n) { return n ? calloc(n, 4) : NULL; }

/* One forward_train + backward of layer L on x, dy into o. */
static void train_once(peer_layer *L, int64_t T, const float *x, const float *dy, train_out *o,
                       const char *what) {
  const peer_config *c = peer_layer_config(L);
  const size_t d = (size_t)c->d_model, E = (size_t)(T * c->n_heads * c->top_k);
  o->y = calloc((size_t)T * d, 4), o->dx = calloc((size_t)T * d, 4);
  o->wq = maybe(param_floats(L, "query.weight")), o->bq = maybe(param_floats(L, "query.bias"));
  o->nw = maybe(param_floats(L, "query.norm.weight"));
  o->nb = maybe(param_floats(L, "query.norm.bias")), o->keys = maybe(param_floats(L, "keys"));
  o->down = calloc(E * d, 4), o->up = calloc(E * d, 4), o->rows = calloc(E, 8);
  peer_grads g = {o->wq, o->bq, o->nw, o->nb, o->keys, 0, (int64_t)E, o->rows, o->down, o->up, 0};
  peer_context *ctx;
  cr_assert_eq(peer_context_create(&ctx, L, T), PEER_OK, "%s %s", what, peer_last_error());
  cr_assert_eq(peer_forward_train(L, ctx, T, x, o->y), PEER_OK, "%s %s", what, peer_last_error());
  cr_assert_eq(peer_backward(L, ctx, dy, o->dx, &g), PEER_OK, "%s %s", what, peer_last_error());
  o->g = g;
  peer_context_free(ctx);
}

static void train_free(train_out *o) {
  free(o->y), free(o->dx), free(o->wq), free(o->bq), free(o->nw), free(o->nb), free(o->keys);
  free(o->down), free(o->up), free(o->rows);
}

/* Training on both backends: y, dx and every gradient within GRAD_TOL,
 * expert rows exactly; the GPU twice gives the same bits; dense expert
 * accumulation equals the sparse rows.  Coarse (exactly representable)
 * queries and keys keep the two backends' retrieval identical, so ids, and
 * hence rows, must agree. */
static void check_training(const char *config, int64_t T) {
  uint64_t seed = ref_test_seed();
  ref_rng rng = {seed};
  pair p = make_pair(config);
  const int64_t d = p.cfg.d_model;
  ref_fill_layer(p.cpu, &rng);
  ref_fill_quantised(p.cpu, "query.weight", &rng, -1, 1, 1.0);
  ref_fill_quantised(p.cpu, "keys", &rng, -2, 2, 0.5);
  copy_params(&p);
  float *x = malloc((size_t)(T * d) * 4);
  for (int64_t j = 0; j < T * d; j++) x[j] = (float)ref_int(&rng, -2, 2);
  float *dy = ref_random_x(&rng, T, d);
  char what[256];
  snprintf(what, sizeof what, "[%s T=%lld seed=%llu]", config, (long long)T,
           (unsigned long long)seed);
  train_out c, g, g2;
  train_once(p.cpu, T, x, dy, &c, what);
  /* the running statistics moved on the CPU layer: give the GPU the same start */
  copy_params(&p);
  train_once(p.gpu, T, x, dy, &g, what);
  const size_t td = (size_t)(T * d);
  close_enough(g.y, c.y, td, what, "y");
  close_enough(g.dx, c.dx, td, what, "dx");
  if (c.wq) close_enough(g.wq, c.wq, param_floats(p.cpu, "query.weight"), what, "d query.weight");
  if (c.bq) close_enough(g.bq, c.bq, param_floats(p.cpu, "query.bias"), what, "d query.bias");
  if (c.nw) close_enough(g.nw, c.nw, param_floats(p.cpu, "query.norm.weight"), what, "d norm.weight");
  if (c.nb) close_enough(g.nb, c.nb, param_floats(p.cpu, "query.norm.bias"), what, "d norm.bias");
  close_enough(g.keys, c.keys, param_floats(p.cpu, "keys"), what, "d keys");
  cr_assert_eq(g.g.n_expert_rows, c.g.n_expert_rows, "%s expert rows", what);
  cr_assert(memcmp(g.rows, c.rows, (size_t)c.g.n_expert_rows * 8) == 0, "%s expert ids", what);
  close_enough(g.down, c.down, (size_t)c.g.n_expert_rows * (size_t)d, what, "d experts.down");
  close_enough(g.up, c.up, (size_t)c.g.n_expert_rows * (size_t)d, what, "d experts.up");
  /* the running statistics after one batch */
  if (p.cfg.query_norm == PEER_NORM_BATCHNORM) {
    const char *names[] = {"query.norm.running_mean", "query.norm.running_var"};
    for (int i = 0; i < 2; i++) {
      peer_tensor a, b;
      cr_assert_eq(peer_layer_param_by_name(p.cpu, names[i], &a), PEER_OK);
      cr_assert_eq(peer_layer_param_by_name(p.gpu, names[i], &b), PEER_OK);
      float *h = malloc(b.nbytes);
      cr_assert_eq(cudaMemcpy(h, b.data, b.nbytes, cudaMemcpyDeviceToHost), cudaSuccess);
      close_enough(h, a.data, a.nbytes / 4, what, names[i]);
      free(h);
    }
    copy_params(&p);
  }
  /* the same bits on a second run */
  train_once(p.gpu, T, x, dy, &g2, what);
  cr_assert(memcmp(g.y, g2.y, td * 4) == 0 && memcmp(g.dx, g2.dx, td * 4) == 0,
            "%s: y or dx differ between two GPU runs", what);
  cr_assert(memcmp(g.keys, g2.keys, param_floats(p.cpu, "keys") * 4) == 0, "%s: keys grad", what);
  cr_assert(memcmp(g.wq, g2.wq, param_floats(p.cpu, "query.weight") * 4) == 0, "%s: wq grad", what);
  cr_assert(memcmp(g.down, g2.down, (size_t)g.g.n_expert_rows * (size_t)d * 4) == 0 &&
                memcmp(g.up, g2.up, (size_t)g.g.n_expert_rows * (size_t)d * 4) == 0,
            "%s: expert grads differ between two GPU runs", what);
  /* dense accumulation: rows added into [N, d] buffers */
  {
    const size_t N = (size_t)(p.cfg.n_subkeys * p.cfg.n_subkeys), E = (size_t)g.g.expert_capacity;
    float *dd = calloc(N * (size_t)d, 4), *du = calloc(N * (size_t)d, 4);
    int64_t *rows = calloc(E, 8);
    for (size_t i = 0; i < N * (size_t)d; i++) dd[i] = 1.0f;
    peer_grads gd = {0};
    gd.experts_dense = 1, gd.expert_capacity = (int64_t)E, gd.expert_rows = rows;
    gd.experts_down = dd, gd.experts_up = du;
    peer_context *ctx;
    cr_assert_eq(peer_context_create(&ctx, p.gpu, T), PEER_OK);
    float *y = malloc(td * 4);
    cr_assert_eq(peer_forward_train(p.gpu, ctx, T, x, y), PEER_OK, "%s", peer_last_error());
    cr_assert_eq(peer_backward(p.gpu, ctx, dy, NULL, &gd), PEER_OK, "%s", peer_last_error());
    cr_assert_eq(gd.n_expert_rows, g.g.n_expert_rows);
    for (int64_t r = 0; r < gd.n_expert_rows; r++)
      for (int64_t i = 0; i < d; i++) {
        cr_assert(dd[rows[r] * d + i] == 1.0f + g.down[r * d + i], "%s dense down", what);
        cr_assert(du[rows[r] * d + i] == g.up[r * d + i], "%s dense up", what);
      }
    peer_context_free(ctx);
    free(dd), free(du), free(rows), free(y);
  }
  train_free(&c), train_free(&g), train_free(&g2);
  free(x), free(dy);
  free_pair(&p);
}

Test(cuda, training_matches_cpu) { check_training(SMALL, 64); }
Test(cuda, training_norm_bias_shared_keys) {
  check_training(SMALL ",query_norm=batchnorm,query_bias=1,shared_keys=1,gate=sigmoid", 48);
}
Test(cuda, training_bf16_relu_gates_odd_width) {
  check_training("d_model=36,n_heads=2,d_key=8,n_subkeys=20,top_k=3,weight_dtype=bf16,gate=relu,"
                 "activation=gelu", 33);
  check_training(SMALL ",activation=gelu_tanh,query_norm=batchnorm", 40);
}

Test(cuda, training_nonfinite_dy) {
  pair p = make_pair(SMALL);
  cr_assert_eq(peer_layer_init(p.gpu, 3), PEER_OK, "%s", peer_last_error());
  const int64_t T = 8, d = p.cfg.d_model;
  ref_rng rng = {2};
  float *x = ref_random_x(&rng, T, d), *dy = ref_random_x(&rng, T, d), *y = malloc((size_t)(T * d) * 4);
  peer_context *ctx;
  cr_assert_eq(peer_context_create(&ctx, p.gpu, T), PEER_OK);
  cr_assert_eq(peer_forward_train(p.gpu, ctx, T, x, y), PEER_OK, "%s", peer_last_error());
  dy[6 * d] = INFINITY;
  peer_grads g = {0};
  cr_assert_eq(peer_backward(p.gpu, ctx, dy, NULL, &g), PEER_ERR_NONFINITE);
  cr_assert(strstr(peer_last_error(), "token 6") != NULL, "%s", peer_last_error());
  peer_context_free(ctx);
  free(x), free(dy), free(y);
  free_pair(&p);
}

/* 1 if a device is usable, probed in a child so that this process never
 * initialises CUDA before Criterion forks. */
static int device_usable(void) {
  pid_t pid = fork();
  if (pid < 0) return 0;
  if (pid == 0) _exit(peer_cuda_device_count() > 0 ? 0 : 1);
  int status = 0;
  if (waitpid(pid, &status, 0) != pid) return 0;
  return WIFEXITED(status) && WEXITSTATUS(status) == 0;
}

int main(int argc, char *argv[]) {
  if (!device_usable()) {
    fprintf(stderr, "test_cuda: skipped: no CUDA device\n");
    return 77;
  }
  struct criterion_test_set *tests = criterion_initialize();
  int result = 0;
  if (criterion_handle_args(argc, argv, true)) result = !criterion_run_all_tests(tests);
  criterion_finalize(tests);
  return result;
}
#endif
