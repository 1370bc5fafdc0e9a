/* test_cuda.c: the CUDA backend against the CPU backend.  Each case fills a
 * CPU layer (random, or coarse values whose scores tie exactly), copies every
 * parameter to a CUDA layer, and compares retrieval and forward: scores and y
 * within stated tolerances; ids exactly, except where the CPU's own scores
 * hold a near-tie (the two backends round the sub-key products differently);
 * with coarse values, where every sum is exact, ids and scores must agree
 * exactly.  The device-pointer API must give the host path's bits.
 * Training (forward_train, backward) is compared on inputs where both
 * backends must choose the same experts (exact sums without batch norm;
 * with it, draws the float64 reference finds free of near-ties): y, dx and
 * every gradient within GRAD_TOL, expert rows exactly, same bits twice; the
 * device-pointer training calls give the host path's bits.  Brute-force
 * retrieval on CUDA must give the CUDA product-key search's ids and scores
 * bit for bit (both rank the same sub-key scores by exact sums), and agree
 * with the CPU's brute force as retrieval does.
 *
 * In the emulated build (PEER_CUDA=EMU, kernels/README.md) the same tests
 * run on the CPU, and the `emu` suite checks the emulator's own rules.
 * Without a CUDA build the program exits 77 (ctest: skipped) at once.
 * Without a device it runs only the `cuda_limits` suite (the kernels'
 * limits, refused at layer creation before any device is looked for), then
 * exits 77 if those pass (1 if not): the rest needs a device and never
 * counts as passed without one.  The device probe runs in a child process
 * so the parent never initialises CUDA before Criterion forks its workers. */
#include "peer.h"

#include <float.h>
#include <stdio.h>

#ifndef PEER_USE_CUDA
int main(void) {
  fprintf(stderr, "test_cuda: skipped: this build has no CUDA backend (PEER_CUDA=OFF)\n");
  return 77;
}
#else

#include "cuda_test_util.h"
#include "internal.h" /* peer_layer_enter: a call of another thread, in the busy test */
#include "peer_cuda.h"
#include "../kernels/backend.h"   /* the bf16 scores' switch and counts */
#include "../kernels/retrieval.h" /* the top-k' kernel, run on crafted rows */
#include "../kernels/train.h"     /* sorted runs of an empty list */
#include "rowops.h"
#include "reference_train.h"
#include "bf16_cases.h"

#include <criterion/criterion.h>
#include <cuda_runtime_api.h>
#include <unistd.h>
#ifdef PEER_CUDA_EMULATED
#include <cublas_v2.h>
#include <peer_emu.h>
#endif

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
  /* A cudaMemcpy from pageable memory may return before the data is on the
   * device, and the legacy stream it used is not ordered with non-blocking
   * streams (the host-pointer path's own, or a caller's): wait, as
   * peer_layer_init does, so that every call after this sees the values. */
  cr_assert_eq(cudaDeviceSynchronize(), cudaSuccess);
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
      /* The GPU's own order: by exact sums (the float score, then its
       * rounding error), so scores never rise; equal float scores go to the
       * smaller id only where the sums are exact (quantised inputs: equal
       * float scores are equal sums), else two sums that round to one float
       * are ordered by what the rounding dropped. */
      for (int64_t j = 0; j + 1 < k; j++) {
        int64_t e = (t * H + h) * k + j;
        cr_assert(g->sc[e] >= g->sc[e + 1],
                  "%s token %lld head %lld pos %lld: gpu scores rise (%.9g, then %.9g)", what,
                  (long long)t, (long long)h, (long long)j, (double)g->sc[e], (double)g->sc[e + 1]);
        cr_assert(!exact || g->sc[e] > g->sc[e + 1] || g->ids[e] < g->ids[e + 1],
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

/* Random parameters on both layers and T tokens of x; quantised: coarse
 * query weights, query bias, keys and x, so that every query and score is
 * exact (f32 sums of small multiples of 1/8) and ties abound. */
static float *fill_pair(pair *p, ref_rng *rng, int64_t T, int quantised) {
  const int64_t d = p->cfg.d_model;
  float *x;
  ref_fill_layer(p->cpu, rng);
  if (quantised) {
    ref_fill_quantised(p->cpu, "query.weight", rng, -1, 1, 1.0);
    ref_fill_quantised(p->cpu, "query.bias", rng, -2, 2, 0.25);
    ref_fill_quantised(p->cpu, "keys", rng, -2, 2, 0.5);
    x = malloc((size_t)(T * d) * sizeof(float) + 4);
    for (int64_t j = 0; j < T * d; j++) x[j] = (float)ref_int(rng, -2, 2);
  } else {
    x = ref_random_x(rng, T, d);
  }
  copy_params(p);
  return x;
}

static void *dev_alloc(size_t bytes) {
  void *p = NULL;
  if (bytes == 0) return NULL;
  cr_assert_eq(cudaMalloc(&p, bytes), cudaSuccess);
  cr_assert_eq(cudaMemset(p, 0, bytes), cudaSuccess);
  return p;
}

static void *dev_copy_of(const void *h, size_t bytes) {
  void *p = dev_alloc(bytes);
  cr_assert_eq(cudaMemcpy(p, h, bytes, cudaMemcpyHostToDevice), cudaSuccess);
  return p;
}

static void to_host(void *h, const void *d, size_t bytes) {
  if (h && d && bytes) cr_assert_eq(cudaMemcpy(h, d, bytes, cudaMemcpyDeviceToHost), cudaSuccess);
}

/* The fewest tokens, more than T, whose device scratch exceeds `bytes`
 * (T + 1 may need no more than T: each part is rounded up to 256 bytes). */
static int64_t tokens_beyond(const peer_layer *L, int64_t T, size_t bytes) {
  size_t need = 0;
  int64_t t = T;
  do {
    t++;
    cr_assert_eq(peer_cuda_workspace_size(L, t, &need), PEER_OK, "%s", peer_last_error());
  } while (need <= bytes);
  return t;
}

/* Forward and retrieval on both backends for T tokens of config `config`. */
static void check_config(const char *config, int64_t T, int quantised) {
  uint64_t seed = ref_test_seed();
  ref_rng rng = {seed};
  pair p = make_pair(config);
  const int64_t d = p.cfg.d_model;
  float *x = fill_pair(&p, &rng, T, quantised);
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

  /* The device-pointer path gives the host path's bits, in a registered
   * workspace of exactly peer_cuda_workspace_size(T) bytes.  x and y have
   * room for T_over tokens, the fewest whose scratch exceeds it, used
   * below. */
  size_t wsb;
  void *ws;
  cr_assert_eq(peer_cuda_workspace_size(p.gpu, T, &wsb), PEER_OK);
  const int64_t T_over = tokens_beyond(p.gpu, T, wsb);
  size_t xb = (size_t)(T * d) * 4, eb = (size_t)(T * p.cfg.n_heads * p.cfg.top_k);
  size_t xb_over = (size_t)(T_over * d) * 4;
  float *dx = dev_alloc(xb_over), *dy = dev_alloc(xb_over);
  int64_t *dids = dev_alloc(eb * 8);
  cudaStream_t s;
  cr_assert_eq(cudaStreamCreate(&s), cudaSuccess);
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
  cr_assert_eq(peer_cuda_forward(p.gpu, T_over, dx, dy, NULL, NULL, s), PEER_ERR_INVALID_ARGUMENT,
               "%s: %lld tokens in a workspace for %lld", what, (long long)T_over, (long long)T);
  cr_assert_eq(peer_cuda_check(p.gpu, s), PEER_OK, "%s %s", what, peer_last_error());
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

/* ------------------------------------------------- bf16 sub-key scores */

/* The bf16 first pass with exact re-scoring (kernels/README.md "bf16 sub-key
 * scores"), on layers whose queries are their input (query.weight the
 * identity, d_model = H * d_key), so that both backends score the same
 * queries: the GPU's ids and score bits must be the CPU's (whose f32 path
 * is the same FMA chain), its brute force's (peer_k_exact_scores) and, with
 * the f32 cuBLAS products forced, within the f32 path's tolerance.  The
 * emulated GemmEx truncates within the bound's model (cublas_v2.h), so a
 * bound that assumed round-to-nearest sums could fail here. */

/* A CPU layer of config (plus d_model = H * d_key) with random parameters
 * and query.weight the identity. */
static peer_layer *identity_layer(const char *config, ref_rng *rng) {
  peer_config c;
  peer_config_default(&c);
  cr_assert_eq(peer_config_parse(&c, config), PEER_OK, "%s: %s", config, peer_last_error());
  c.d_model = c.n_heads * c.d_key;
  peer_layer *L;
  cr_assert_eq(peer_layer_create(&L, &c, NULL), PEER_OK, "%s", peer_last_error());
  ref_fill_layer(L, rng);
  peer_tensor w;
  cr_assert_eq(peer_layer_param_by_name(L, "query.weight", &w), PEER_OK);
  float *W = w.data;
  memset(W, 0, w.nbytes);
  for (int64_t i = 0; i < c.d_model; i++) W[i * c.d_model + i] = 1.0f;
  return L;
}

/* A CUDA copy of L through a weight file, so its keys were never exposed. */
static peer_layer *cuda_reloaded(peer_layer *L) {
  char path[] = "/tmp/peer_cuda_bf16_XXXXXX";
  int fd = mkstemp(path);
  cr_assert(fd >= 0);
  close(fd);
  cr_assert_eq(peer_layer_save(L, path), PEER_OK, "%s", peer_last_error());
  peer_options o;
  peer_options_default(&o);
  o.backend = PEER_BACKEND_CUDA;
  peer_layer *G = NULL;
  cr_assert_eq(peer_layer_load(&G, path, &o), PEER_OK, "%s", peer_last_error());
  unlink(path);
  return G;
}

/* G (CUDA) against C (CPU) on T tokens of x: see the section's comment.
 * Returns the rows (token, head, half) the bf16 pass left to its fallback. */
static int64_t check_bf16(peer_layer *C, peer_layer *G, int64_t T, const float *x,
                          const char *what) {
  const peer_config *c = peer_layer_config(C);
  const int64_t rows = T * c->n_heads * 2, ne = T * c->n_heads * c->top_k;
  cr_assert(peer_cb_bf16_scores(G), "%s: the layer does not take the bf16 path", what);
  outs g = outs_new(T, c), cc = outs_new(T, c), b = outs_new(T, c), f = outs_new(T, c);
  peer_retrieval_stats s0, s1;
  cr_assert_eq(peer_cb_retrieval_stats(G, &s0), PEER_OK, "%s", peer_last_error());
  cr_assert_eq(peer_retrieve(G, T, x, g.ids, g.sc, g.g), PEER_OK, "%s: %s", what,
               peer_last_error());
  cr_assert_eq(peer_cb_retrieval_stats(G, &s1), PEER_OK, "%s", peer_last_error());
  cr_assert_eq((s1.bf16 - s0.bf16) + (s1.fallback - s0.fallback), rows, "%s: rows counted", what);
  cr_assert_eq(peer_retrieve(C, T, x, cc.ids, cc.sc, cc.g), PEER_OK, "%s: %s", what,
               peer_last_error());
  cr_assert_eq(peer_retrieve_brute(G, T, x, b.ids, b.sc, b.g), PEER_OK, "%s: %s", what,
               peer_last_error());
  for (int64_t e = 0; e < ne; e++) {
    cr_assert(g.ids[e] == cc.ids[e] && !memcmp(&g.sc[e], &cc.sc[e], 4),
              "%s: entry %lld (token %lld): gpu id %lld score %a, cpu id %lld score %a", what,
              (long long)e, (long long)(e / (ne / T)), (long long)g.ids[e], (double)g.sc[e],
              (long long)cc.ids[e], (double)cc.sc[e]);
    cr_assert(g.ids[e] == b.ids[e] && !memcmp(&g.sc[e], &b.sc[e], 4),
              "%s: entry %lld: product keys id %lld score %a, brute force id %lld score %a", what,
              (long long)e, (long long)g.ids[e], (double)g.sc[e], (long long)b.ids[e],
              (double)b.sc[e]);
  }
  /* the f32 cuBLAS path on the same layer: the CPU's within its tolerance */
  cr_assert_eq(peer_cb_set_f32_scores(G, true), PEER_OK);
  cr_assert(!peer_cb_bf16_scores(G));
  cr_assert_eq(peer_retrieve(G, T, x, f.ids, f.sc, f.g), PEER_OK, "%s: %s", what,
               peer_last_error());
  cr_assert_eq(peer_cb_set_f32_scores(G, false), PEER_OK);
  pair p = {C, G, *c};
  char *swapped = calloc((size_t)T, 1);
  compare_retrieval(&p, T, &cc, &f, 0, swapped, what);
  free(swapped);
  outs_free(&g), outs_free(&cc), outs_free(&b), outs_free(&f);
  return s1.fallback - s0.fallback;
}

static float *keys_of(peer_layer *L) {
  peer_tensor t;
  cr_assert_eq(peer_layer_param_by_name(L, "keys", &t), PEER_OK);
  return t.data;
}

Test(cuda_bf16, random_layers_match_the_cpu_bits) {
  static const char *const configs[] = {
      "n_heads=2,d_key=32,n_subkeys=128,top_k=4",
      "n_heads=4,d_key=16,n_subkeys=64,top_k=8,subkey_top_k=16,shared_keys=1",
      "n_heads=1,d_key=64,n_subkeys=256,top_k=2,subkey_top_k=64,gate=sigmoid",
      "n_heads=2,d_key=16,n_subkeys=16,top_k=4,subkey_top_k=16", /* k' = n */
  };
  ref_rng rng = {ref_test_seed()};
  for (size_t i = 0; i < sizeof configs / sizeof configs[0]; i++) {
    peer_layer *C = identity_layer(configs[i], &rng);
    peer_layer *G = cuda_reloaded(C);
    const int64_t T = 40;
    float *x = ref_random_x(&rng, T, peer_layer_config(C)->d_model);
    cr_assert_eq(check_bf16(C, G, T, x, configs[i]), 0, "%s: random rows fell back", configs[i]);
    free(x);
    peer_layer_free(C);
    peer_layer_free(G);
  }
}

Test(cuda_bf16, traps_near_ties_and_extreme_norms) {
  ref_rng rng = {ref_test_seed()};
  {
    const char *config = "n_heads=1,d_key=128,n_subkeys=256,subkey_top_k=1,top_k=1";
    peer_layer *C = identity_layer(config, &rng);
    const int64_t T = 24, m = 64, n = 256;
    float *x = malloc((size_t)(T * 2 * m) * 4);
    cr_assert(bf16_traps(keys_of(C), x, 2, n, m, T, &rng) > 0);
    peer_layer *G = cuda_reloaded(C);
    check_bf16(C, G, T, x, "traps");
    free(x);
    peer_layer_free(C);
    peer_layer_free(G);
  }
  static const struct {
    const char *config;
    double key_scale, x_scale;
  } cases[] = {
      {"n_heads=1,d_key=64,n_subkeys=128,subkey_top_k=4,top_k=4", 1.0, 1.0},
      {"n_heads=1,d_key=64,n_subkeys=128,subkey_top_k=16,top_k=8", 0x1p60, 0x1p40},
      {"n_heads=1,d_key=64,n_subkeys=128,subkey_top_k=2,top_k=2", 0x1p-60, 0x1p-50},
      {"n_heads=1,d_key=64,n_subkeys=128,subkey_top_k=1,top_k=1", 0x1p-70, 0x1p-70},
      {"n_heads=2,d_key=64,n_subkeys=128,subkey_top_k=8,top_k=3", 1.0, 1.0},
  };
  for (size_t s = 0; s < sizeof cases / sizeof cases[0]; s++) {
    peer_layer *C = identity_layer(cases[s].config, &rng);
    const peer_config *c = peer_layer_config(C);
    const int64_t T = 24, m = c->d_key / 2, sets = c->n_heads * 2;
    float *x = malloc((size_t)(T * sets * m) * 4);
    bf16_near_ties(keys_of(C), x, sets, c->n_subkeys, m, T, cases[s].key_scale, cases[s].x_scale,
                   &rng);
    peer_layer *G = cuda_reloaded(C);
    check_bf16(C, G, T, x, cases[s].config);
    free(x);
    peer_layer_free(C);
    peer_layer_free(G);
  }
}

/* Every key the same: every score ties, every row keeps all n keys past the
 * first pass (more than 2k' + 64) and takes the fallback; ids by the tie
 * rule. */
Test(cuda_bf16, all_keys_tied_take_the_fallback) {
  ref_rng rng = {ref_test_seed()};
  peer_layer *C = identity_layer("n_heads=2,d_key=32,n_subkeys=128,top_k=4", &rng);
  const int64_t m = 16, n = 128, T = 16;
  float *K = keys_of(C);
  for (int64_t r = 1; r < 4 * n; r++) memcpy(K + r * m, K, (size_t)m * 4);
  peer_layer *G = cuda_reloaded(C);
  float *x = ref_random_x(&rng, T, 64);
  cr_assert_eq(check_bf16(C, G, T, x, "all keys tied"), T * 2 * 2, "every row falls back");
  free(x);
  peer_layer_free(C);
  peer_layer_free(G);
}

/* Key 0 of half 0 has a finite exact score (0) whose f32 FMA chain
 * overflows on the way (partial sums past FLT_MAX), while its bf16 score is
 * finite and its bracket lies far below the other keys' scores (2^118): the
 * f32 path and brute force report PEER_ERR_NONFINITE, and so must the bf16
 * path, which would otherwise never re-score the key.  Signs [+ + + + - - -
 * -] (overflow at the 4th term) and [+ + + - - - + -] at 1.375 (at the 3rd
 * term; pairwise, as a dot-product instruction adds, the sums stay small). */
Test(cuda_bf16, an_overflowing_chain_is_nonfinite) {
  static const char *const configs[] = {
      "n_heads=1,d_key=16,n_subkeys=16,top_k=2,subkey_top_k=2",
      "n_heads=1,d_key=16,n_subkeys=64,top_k=2,subkey_top_k=2",
  };
  static const float sign[2][8] = {{1, 1, 1, 1, -1, -1, -1, -1}, {1, 1, 1, -1, -1, -1, 1, -1}};
  ref_rng rng = {ref_test_seed()};
  for (int c = 0; c < 2; c++)
    for (int pat = 0; pat < 2; pat++) {
      peer_layer *C = identity_layer(configs[c], &rng);
      const int64_t n = peer_layer_config(C)->n_subkeys, m = 8;
      float *K = keys_of(C);
      for (int64_t i = 0; i < m; i++) K[i] = sign[pat][i] * (pat ? 0x1.6p63f : 0x1p63f);
      for (int64_t a = 1; a < n; a++)
        for (int64_t i = 0; i < m; i++) K[a * m + i] = 0x1p52f * (1.0f + (float)a / 64.0f);
      float x[16];
      for (int i = 0; i < 8; i++) x[i] = 0x1p63f, x[8 + i] = 1.0f;
      peer_layer *G = cuda_reloaded(C);
      cr_assert(peer_cb_bf16_scores(G));
      const peer_config *cf = peer_layer_config(C);
      outs o = outs_new(1, cf);
      const struct {
        peer_layer *L;
        bool brute;
        const char *name;
      } runs[] = {{C, false, "cpu"}, {C, true, "cpu brute"}, {G, true, "gpu brute"},
                  {G, false, "gpu"}};
      for (int r = 0; r < 4; r++) {
        for (int64_t e = 0; e < cf->top_k; e++) o.ids[e] = -7;
        const peer_status st = runs[r].brute
                                   ? peer_retrieve_brute(runs[r].L, 1, x, o.ids, o.sc, o.g)
                                   : peer_retrieve(runs[r].L, 1, x, o.ids, o.sc, o.g);
        cr_assert_eq(st, PEER_ERR_NONFINITE, "%s, signs %d, %s: status %d, ids %lld %lld",
                     configs[c], pat, runs[r].name, st, (long long)o.ids[0],
                     (long long)o.ids[1]);
        for (int64_t e = 0; e < cf->top_k; e++)
          cr_assert(o.ids[e] >= 0 && o.ids[e] < n * n, "%s: id %lld", runs[r].name,
                    (long long)o.ids[e]);
      }
      outs_free(&o);
      peer_layer_free(C);
      peer_layer_free(G);
    }
}

/* The bf16 copy of the keys follows them: keys rewritten by a call that may
 * write them (peer_layer_init: keys_gen), and keys exposed and written in
 * place (remade for every call). */
Test(cuda_bf16, a_stale_copy_is_never_used) {
  ref_rng rng = {ref_test_seed()};
  peer_layer *C = identity_layer("n_heads=2,d_key=32,n_subkeys=128,top_k=4", &rng);
  peer_layer *G = cuda_reloaded(C);
  const int64_t T = 24, d = 64;
  float *x = ref_random_x(&rng, T, d);
  check_bf16(C, G, T, x, "loaded");
  cr_assert_eq(peer_layer_init(C, 99), PEER_OK);
  cr_assert_eq(peer_layer_init(G, 99), PEER_OK);
  peer_tensor wc, wg;
  cr_assert_eq(peer_layer_param_by_name(C, "query.weight", &wc), PEER_OK);
  cr_assert_eq(peer_layer_param_by_name(G, "query.weight", &wg), PEER_OK);
  float *W = wc.data;
  memset(W, 0, wc.nbytes);
  for (int64_t i = 0; i < d; i++) W[i * d + i] = 1.0f;
  cr_assert_eq(cudaMemcpy(wg.data, W, wc.nbytes, cudaMemcpyHostToDevice), cudaSuccess);
  cr_assert(!G->keys_exposed);
  check_bf16(C, G, T, x, "after layer_init");
  peer_tensor kc, kg;
  cr_assert_eq(peer_layer_param_by_name(C, "keys", &kc), PEER_OK);
  cr_assert_eq(peer_layer_param_by_name(G, "keys", &kg), PEER_OK);
  float *K = kc.data;
  for (size_t i = 0; i < kc.nbytes / 4; i++) K[i] = -1.5f * K[i];
  cr_assert_eq(cudaMemcpy(kg.data, K, kc.nbytes, cudaMemcpyHostToDevice), cudaSuccess);
  check_bf16(C, G, T, x, "keys exposed and written");
  for (size_t i = 0; i < kc.nbytes / 4; i++) K[i] = 0.5f * K[i] + 0.25f;
  cr_assert_eq(cudaMemcpy(kg.data, K, kc.nbytes, cudaMemcpyHostToDevice), cudaSuccess);
  check_bf16(C, G, T, x, "keys written again");
  free(x);
  peer_layer_free(C);
  peer_layer_free(G);
}

/* ------------------------------------------------- top-k' on crafted rows */

/* The top-k' kernel (kernels/retrieval.h) run directly on rows built to
 * break a threshold selection: every score equal, rising rows (each score
 * beats all before it) and falling ones (none does), few distinct values, a
 * run of ties at the k'-th place, signed zeros, infinities and the largest
 * floats.  Ids and scores must be peer_topk_scan's (rowops.h, the CPU
 * backend's) and a plain sort's by the tie rule, bit for bit.  A row with a
 * NaN gets distinct ids in range.  The record holds the first (t, h) = row / 2
 * with a non-finite score. */
enum {
  ROW_RANDOM,
  ROW_EQUAL,
  ROW_RISING,
  ROW_FALLING,
  ROW_FEW_VALUES,
  ROW_THRESHOLD_TIES,
  ROW_SIGNED_ZEROS,
  ROW_EXTREMES,
  ROW_NAN,
  ROW_KINDS
};

static void fill_row(float *s, int64_t n, int64_t kp, int kind, ref_rng *rng) {
  static const float extremes[] = {-INFINITY, -FLT_MAX, -1.0f,   -0.0f,   0.0f,
                                   0x1p-149f, 1.0f,     FLT_MAX, INFINITY};
  for (int64_t i = 0; i < n; i++) switch (kind) {
    case ROW_EQUAL: s[i] = 0.5f; break;
    case ROW_RISING: s[i] = (float)i - 0.5f * (float)n; break;
    case ROW_FALLING: s[i] = -(float)i; break;
    case ROW_FEW_VALUES: s[i] = (float)ref_int(rng, 0, 3); break;
    case ROW_THRESHOLD_TIES: s[i] = 1.0f; break;
    case ROW_SIGNED_ZEROS: s[i] = ref_int(rng, 0, 1) ? 0.0f : -0.0f; break;
    case ROW_EXTREMES: s[i] = extremes[ref_int(rng, 0, 8)]; break;
    default: s[i] = (float)ref_uniform(rng, -1, 1); break;
    }
  /* k'/2 winners over a sea of equal scores: the rest of the top-k' is the
   * ties with the smallest ids */
  if (kind == ROW_THRESHOLD_TIES)
    for (int64_t j = 0; j < kp / 2; j++) s[ref_int(rng, 0, n - 1)] = 2.0f + (float)j;
  if (kind == ROW_NAN)
    for (int64_t j = 0; j < 1 + n / 50; j++) s[ref_int(rng, 0, n - 1)] = NAN;
}

static const float *sorted_row; /* by_tie_rule's scores */
static int by_tie_rule(const void *a, const void *b) {
  const int64_t i = *(const int64_t *)a, j = *(const int64_t *)b;
  const float x = sorted_row[i], y = sorted_row[j];
  if (x != y) return x > y ? -1 : 1;
  return i < j ? -1 : i > j;
}

static int row_finite(const float *s, int64_t n) {
  for (int64_t i = 0; i < n; i++)
    if (!isfinite(s[i])) return 0;
  return 1;
}

/* per_kind rows of each kind, n scores each, top kp. */
static void check_topk_rows(int64_t n, int64_t kp, int64_t per_kind, uint64_t seed) {
  ref_rng rng = {seed};
  const int64_t rows = ROW_KINDS * per_kind;
  float *S = malloc((size_t)(rows * n) * 4), *gs = malloc((size_t)(rows * kp) * 4);
  int64_t *gid = malloc((size_t)(rows * kp) * 8), *order = malloc((size_t)n * 8);
  float *cs = malloc((size_t)kp * 4);
  int64_t *cid = malloc((size_t)kp * 8);
  char *seen = malloc((size_t)n);
  unsigned long long want_bad = ~0ull, bad = 0;
  for (int64_t r = 0; r < rows; r++) {
    fill_row(S + r * n, n, kp, (int)(r / per_kind), &rng);
    if (want_bad == ~0ull && !row_finite(S + r * n, n)) want_bad = (unsigned long long)(r / 2);
  }
  float *dS = dev_copy_of(S, (size_t)(rows * n) * 4), *ds = dev_alloc((size_t)(rows * kp) * 4);
  int64_t *did = dev_alloc((size_t)(rows * kp) * 8);
  unsigned long long *dbad = dev_alloc(8);
  cr_assert_eq(cudaMemset(dbad, 0xff, 8), cudaSuccess);
  cr_assert_eq(peer_k_subkey_topk(dS, rows, n, kp, ds, did, dbad, 0), PEER_OK,
               "n=%lld k'=%lld: %s", (long long)n, (long long)kp, peer_last_error());
  cr_assert_eq(cudaDeviceSynchronize(), cudaSuccess);
  to_host(gs, ds, (size_t)(rows * kp) * 4);
  to_host(gid, did, (size_t)(rows * kp) * 8);
  to_host(&bad, dbad, 8);
  cr_assert_eq(bad, want_bad, "n=%lld k'=%lld seed=%llu: record %llu, want %llu", (long long)n,
               (long long)kp, (unsigned long long)seed, bad, want_bad);
  for (int64_t r = 0; r < rows; r++) {
    const float *s = S + r * n;
    const int kind = (int)(r / per_kind);
    const int64_t *g = gid + r * kp;
    if (kind == ROW_NAN) {
      memset(seen, 0, (size_t)n);
      for (int64_t j = 0; j < kp; j++) {
        cr_assert(g[j] >= 0 && g[j] < n && !seen[g[j]], "NaN row %lld: id %lld", (long long)r,
                  (long long)g[j]);
        seen[g[j]] = 1;
      }
      continue;
    }
    peer_topk_scan(s, (int)n, (int)kp, cs, cid);
    for (int64_t i = 0; i < n; i++) order[i] = i;
    sorted_row = s;
    qsort(order, (size_t)n, 8, by_tie_rule);
    for (int64_t j = 0; j < kp; j++) {
      cr_assert(g[j] == cid[j] && g[j] == order[j],
                "n=%lld k'=%lld seed=%llu row %lld (kind %d) place %lld: id %lld, cpu %lld, "
                "sort %lld",
                (long long)n, (long long)kp, (unsigned long long)seed, (long long)r, kind,
                (long long)j, (long long)g[j], (long long)cid[j], (long long)order[j]);
      cr_assert(memcmp(&gs[r * kp + j], &cs[j], 4) == 0, "row %lld place %lld: score %.9g, cpu %.9g",
                (long long)r, (long long)j, (double)gs[r * kp + j], (double)cs[j]);
    }
  }
  cudaFree(dS), cudaFree(ds), cudaFree(did), cudaFree(dbad);
  free(S), free(gs), free(gid), free(order), free(cs), free(cid), free(seen);
}

Test(cuda_topk, crafted_rows_match_the_cpu_and_a_sort) {
  /* n, k', rows of each kind */
  static const int64_t cases[][3] = {{1, 1, 2},     {2, 1, 2},       {5, 5, 2},
                                     {31, 1, 2},    {32, 32, 2},     {33, 16, 3},
                                     {64, 64, 2},   {65, 33, 2},     {100, 7, 16},
                                     {300, 100, 2}, {1024, 1, 2},    {1024, 16, 16},
                                     {1000, 24, 4}, {1024, 1024, 1}, {4096, 4064, 1},
                                     {40, 4, 1900}}; /* the last: warps take several rows */
  const uint64_t seed = ref_test_seed();
  for (size_t c = 0; c < sizeof cases / sizeof cases[0]; c++)
    check_topk_rows(cases[c][0], cases[c][1], cases[c][2], seed + c);
}

Test(cuda_topk, beyond_the_buffer_is_refused) {
  const int64_t kp = peer_k_topk_kp_max() + 1;
  cr_assert_eq(peer_k_subkey_topk(NULL, 2, kp, kp, NULL, NULL, NULL, 0), PEER_ERR_UNSUPPORTED);
  cr_assert(strstr(peer_last_error(), "subkey_top_k") != NULL, "%s", peer_last_error());
}

/* k' outside [1, n] is refused before anything is launched (with k' > n the
 * final sort would leave empty keys in the output and read S far outside
 * the row; found by review, it crashed the emulator). */
Test(cuda_topk, kp_outside_one_to_n_is_refused) {
  const int64_t bad[][2] = {{5, 7}, {5, 0}, {1, 2}, {64, -1}};
  for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
    cr_assert_eq(peer_k_subkey_topk(NULL, 2, bad[i][0], bad[i][1], NULL, NULL, NULL, 0),
                 PEER_ERR_INVALID_ARGUMENT, "n %lld k' %lld", (long long)bad[i][0],
                 (long long)bad[i][1]);
    cr_assert(strstr(peer_last_error(), "not in [1,") != NULL, "%s", peer_last_error());
  }
}

/* ------------------------------------------------------------- brute force */

/* Brute force on the CUDA layer against its product-key search (ids and
 * scores bit for bit, gates to rounding), through peer.h and peer_cuda.h
 * (with and without the optional outputs), and against the CPU's brute
 * force as check_config compares retrievals. */
static void check_brute(const char *config, int64_t T, int quantised) {
  uint64_t seed = ref_test_seed();
  ref_rng rng = {seed};
  pair p = make_pair(config);
  float *x = fill_pair(&p, &rng, T, quantised);
  const int64_t H = p.cfg.n_heads;
  const size_t ne = (size_t)(T * H * p.cfg.top_k), xb = (size_t)(T * p.cfg.d_model) * 4;
  char what[256];
  snprintf(what, sizeof what, "[brute %s T=%lld seed=%llu]", config, (long long)T,
           (unsigned long long)seed);
  outs pk = outs_new(T, &p.cfg), bf = outs_new(T, &p.cfg), cb = outs_new(T, &p.cfg);
  cr_assert_eq(peer_retrieve(p.gpu, T, x, pk.ids, pk.sc, pk.g), PEER_OK, "%s %s", what,
               peer_last_error());
  cr_assert_eq(peer_retrieve_brute(p.gpu, T, x, bf.ids, bf.sc, bf.g), PEER_OK, "%s %s", what,
               peer_last_error());
  for (size_t e = 0; e < ne; e++) {
    cr_assert(bf.ids[e] == pk.ids[e] && memcmp(&bf.sc[e], &pk.sc[e], 4) == 0,
              "%s entry %zu: brute id %lld score %.9g, product-key id %lld score %.9g", what, e,
              (long long)bf.ids[e], (double)bf.sc[e], (long long)pk.ids[e], (double)pk.sc[e]);
    cr_assert(fabs(bf.g[e] - pk.g[e]) <= 1e-6, "%s entry %zu: gates %.9g, %.9g", what, e,
              (double)bf.g[e], (double)pk.g[e]);
  }

  /* the device-pointer call, on a stream of ours */
  float *dx = dev_copy_of(x, xb), *dsc = dev_alloc(ne * 4), *dg = dev_alloc(ne * 4);
  int64_t *dids = dev_alloc(ne * 8);
  cudaStream_t s;
  cr_assert_eq(cudaStreamCreate(&s), cudaSuccess);
  outs dv = outs_new(T, &p.cfg);
  cr_assert_eq(peer_cuda_retrieve_brute(p.gpu, T, dx, dids, dsc, dg, s), PEER_OK, "%s %s", what,
               peer_last_error());
  cr_assert_eq(peer_cuda_check(p.gpu, s), PEER_OK, "%s %s", what, peer_last_error());
  to_host(dv.ids, dids, ne * 8), to_host(dv.sc, dsc, ne * 4), to_host(dv.g, dg, ne * 4);
  cr_assert(memcmp(dv.ids, bf.ids, ne * 8) == 0 && memcmp(dv.sc, bf.sc, ne * 4) == 0 &&
                memcmp(dv.g, bf.g, ne * 4) == 0,
            "%s: peer_cuda_retrieve_brute differs from peer_retrieve_brute", what);
  cr_assert_eq(cudaMemset(dids, 0xff, ne * 8), cudaSuccess);
  cr_assert_eq(peer_cuda_retrieve_brute(p.gpu, T, dx, dids, NULL, NULL, s), PEER_OK, "%s %s",
               what, peer_last_error());
  cr_assert_eq(peer_cuda_check(p.gpu, s), PEER_OK, "%s %s", what, peer_last_error());
  to_host(dv.ids, dids, ne * 8);
  cr_assert(memcmp(dv.ids, bf.ids, ne * 8) == 0, "%s: ids without scores and gates", what);
  cr_assert_eq(peer_cuda_retrieve_brute(p.gpu, 0, NULL, NULL, NULL, NULL, s), PEER_OK);

  /* the CPU's brute force */
  cr_assert_eq(peer_retrieve_brute(p.cpu, T, x, cb.ids, cb.sc, cb.g), PEER_OK, "%s %s", what,
               peer_last_error());
  char *swapped = calloc((size_t)T, 1);
  int64_t rows = compare_retrieval(&p, T, &cb, &bf, quantised, swapped, what);
  cr_assert(rows * 20 <= T * H, "%s: %lld of %lld heads differ in ids from the CPU", what,
            (long long)rows, (long long)(T * H));

  cudaFree(dx), cudaFree(dsc), cudaFree(dg), cudaFree(dids);
  cudaStreamDestroy(s);
  free(swapped), free(x);
  outs_free(&pk), outs_free(&bf), outs_free(&cb), outs_free(&dv);
  free_pair(&p);
}

Test(cuda, brute_small) {
  check_brute(SMALL, 64, 0);
  check_brute(SMALL ",query_norm=batchnorm,query_bias=1,gate=sigmoid", 33, 0);
}
Test(cuda, brute_ties) {
  check_brute(SMALL, 64, 1);
  check_brute(SMALL ",subkey_top_k=16,shared_keys=1,gate=relu", 64, 1);
}
Test(cuda, brute_top_1_and_k_equals_n) {
  check_brute("d_model=32,n_heads=2,d_key=16,n_subkeys=16,top_k=1", 33, 0);
  check_brute("d_model=32,n_heads=2,d_key=16,n_subkeys=8,top_k=8,subkey_top_k=8", 33, 0);
  /* k = k' = n (a config's top_k is at most subkey_top_k, at most n) */
  check_brute("d_model=32,n_heads=3,d_key=10,n_subkeys=5,top_k=5,subkey_top_k=5", 9, 1);
}
Test(cuda, brute_large_k) {
  /* one warp per block at k = 64 and the largest k the kernel takes */
  check_brute("d_model=32,n_heads=2,d_key=16,n_subkeys=128,top_k=64", 24, 0);
  check_brute("d_model=32,n_heads=2,d_key=16,n_subkeys=128,top_k=95,subkey_top_k=128", 12, 1);
}
Test(cuda, brute_million_experts) {
  check_brute("d_model=64,n_heads=2,d_key=64,n_subkeys=1024,top_k=16", 16, 0);
  check_brute("d_model=64,n_heads=2,d_key=64,n_subkeys=1024,top_k=32,shared_keys=1", 8, 1);
}

/* Beyond the kernel's shared memory brute force is refused, through both
 * APIs, before anything runs; the product-key search still works. */
Test(cuda, brute_refuses_top_k_beyond_95) {
  pair p = make_pair("d_model=32,n_heads=1,d_key=16,n_subkeys=128,top_k=96");
  cr_assert_eq(peer_layer_init(p.gpu, 5), PEER_OK, "%s", peer_last_error());
  const int64_t T = 4;
  ref_rng rng = {3};
  float *x = ref_random_x(&rng, T, p.cfg.d_model);
  outs g = outs_new(T, &p.cfg);
  cr_assert_eq(peer_retrieve_brute(p.gpu, T, x, g.ids, NULL, NULL), PEER_ERR_UNSUPPORTED);
  cr_assert(strstr(peer_last_error(), "top_k 96") != NULL, "%s", peer_last_error());
  float *dx = dev_copy_of(x, (size_t)(T * p.cfg.d_model) * 4);
  int64_t *dids = dev_alloc((size_t)(T * p.cfg.top_k) * 8);
  cr_assert_eq(peer_cuda_retrieve_brute(p.gpu, T, dx, dids, NULL, NULL, 0), PEER_ERR_UNSUPPORTED);
  cr_assert_eq(peer_cuda_retrieve_brute(p.gpu, 0, NULL, NULL, NULL, NULL, 0), PEER_ERR_UNSUPPORTED,
               "an empty batch reports the config too");
  cr_assert_eq(peer_cuda_check(p.gpu, 0), PEER_OK, "%s", peer_last_error());
  cr_assert_eq(peer_retrieve(p.gpu, T, x, g.ids, NULL, NULL), PEER_OK, "%s", peer_last_error());
  cudaFree(dx), cudaFree(dids);
  free(x);
  outs_free(&g);
  free_pair(&p);
}

/* A non-finite value in x (token 5): PEER_ERR_NONFINITE naming the token,
 * ids in range; the record is cleared, so the next good call succeeds. */
static void check_nonfinite_x(bool brute, float bad) {
  pair p = make_pair(SMALL);
  cr_assert_eq(peer_layer_init(p.gpu, 7), PEER_OK, "%s", peer_last_error());
  const int64_t T = 8, d = p.cfg.d_model;
  ref_rng rng = {1};
  float *x = ref_random_x(&rng, T, d);
  x[5 * d + 3] = bad;
  outs g = outs_new(T, &p.cfg);
  peer_status st = brute ? peer_retrieve_brute(p.gpu, T, x, g.ids, NULL, g.g)
                         : peer_retrieve(p.gpu, T, x, g.ids, NULL, NULL);
  cr_assert_eq(st, PEER_ERR_NONFINITE);
  cr_assert(strstr(peer_last_error(), "token 5") != NULL, "%s", peer_last_error());
  for (int64_t e = 0; e < T * p.cfg.n_heads * p.cfg.top_k; e++)
    cr_assert(g.ids[e] >= 0 && g.ids[e] < p.cfg.n_subkeys * p.cfg.n_subkeys);
  x[5 * d + 3] = 0.5f;
  st = brute ? peer_retrieve_brute(p.gpu, T, x, g.ids, NULL, NULL)
             : peer_forward(p.gpu, T, x, g.y, NULL, NULL);
  cr_assert_eq(st, PEER_OK, "the record was cleared: %s", peer_last_error());
  free(x);
  outs_free(&g);
  free_pair(&p);
}

Test(cuda, brute_nonfinite_x_is_an_error_with_ids_in_range) { check_nonfinite_x(true, INFINITY); }

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
  const int64_t T = 16, H = p.cfg.n_heads;
  float *x = ref_random_x(&rng, T, d);
  outs c = outs_new(T, &p.cfg), g = outs_new(T, &p.cfg);
  char what[64];
  snprintf(what, sizeof what, "[same experts seed %llu]", (unsigned long long)seed);
  /* ids as check_config compares them: equal except at a CPU near-tie,
   * where the token (all its heads alike) is left out of the y check */
  cr_assert_eq(peer_retrieve(p.cpu, T, x, c.ids, c.sc, NULL), PEER_OK, "%s", peer_last_error());
  cr_assert_eq(peer_retrieve(p.gpu, T, x, g.ids, g.sc, NULL), PEER_OK, "%s %s", what,
               peer_last_error());
  char *swapped = calloc((size_t)T, 1);
  int64_t rows = compare_retrieval(&p, T, &c, &g, 0, swapped, what);
  cr_assert(rows * 4 <= T * H, "%s: %lld of %lld heads differ in ids", what, (long long)rows,
            (long long)(T * H));
  cr_assert_eq(peer_forward(p.cpu, T, x, c.y, NULL, NULL), PEER_OK);
  cr_assert_eq(peer_forward(p.gpu, T, x, g.y, g.ids, NULL), PEER_OK, "%s", peer_last_error());
  const int64_t k = p.cfg.top_k;
  for (int64_t t = 0; t < T; t++)
    for (int64_t h = 1; h < H; h++)
      cr_assert(memcmp(g.ids + (t * H + h) * k, g.ids + t * H * k, (size_t)k * 8) == 0,
                "%s token %lld head %lld", what, (long long)t, (long long)h);
  for (int64_t i = 0; i < T * d; i++)
    cr_assert(swapped[i / d] || fabs(g.y[i] - c.y[i]) <= Y_TOL * (1.0 + fabs(c.y[i])) * 4,
              "%s y[%lld]: gpu %.9g, cpu %.9g", what, (long long)i, (double)g.y[i],
              (double)c.y[i]);
  free(swapped), free(x);
  outs_free(&c), outs_free(&g);
  free_pair(&p);
}

Test(cuda, nonfinite_x_is_an_error_with_ids_in_range) { check_nonfinite_x(false, NAN); }

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

/* Host buffers of one training step's outputs and gradients in o, and the
 * peer_grads naming them. */
static peer_grads train_out_alloc(peer_layer *L, int64_t T, train_out *o) {
  const peer_config *c = peer_layer_config(L);
  const size_t d = (size_t)c->d_model, E = (size_t)(T * c->n_heads * c->top_k);
  o->y = calloc((size_t)T * d, 4), o->dx = calloc((size_t)T * d, 4);
  o->wq = maybe(param_floats(L, "query.weight")), o->bq = maybe(param_floats(L, "query.bias"));
  o->nw = maybe(param_floats(L, "query.norm.weight"));
  o->nb = maybe(param_floats(L, "query.norm.bias")), o->keys = maybe(param_floats(L, "keys"));
  o->down = calloc(E * d, 4), o->up = calloc(E * d, 4), o->rows = calloc(E, 8);
  peer_grads g = {o->wq, o->bq, o->nw, o->nb, o->keys, 0, (int64_t)E, o->rows, o->down, o->up, 0};
  return g;
}

/* One forward_train + backward of layer L on x, dy into o. */
static void train_once(peer_layer *L, int64_t T, const float *x, const float *dy, train_out *o,
                       const char *what) {
  peer_grads g = train_out_alloc(L, T, o);
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

/* Training inputs on which the two backends must make the same choices, so
 * that every token is compared and ids, hence expert rows, must agree
 * exactly (compare_training); random dy.
 *
 * Without batch norm, exact ones: fill_pair's quantised query weights, bias,
 * keys and x, and experts.down in multiples of 1/16 (exact in bf16 too), so
 * that every query, score and expert pre-activation u . x is exact in f32.
 * Both backends then keep the same ids (ties by the tie rule) and see the
 * same side of every relu kink (gate or activation).
 *
 * Batch norm's statistics are exact for no choice of inputs, so with it,
 * random ones, drawn again until the float64 reference's training-mode
 * selection (reference_train.h's rt_select, as test_train.c uses it) has no
 * near-tie between the k-th and (k+1)-th score and no relu kink within
 * TRAIN_NEAR of the scale: f32 rounding, about 1e-6 of it in either
 * backend, cannot change a choice.  (Near-ties inside the kept k only
 * reorder entries, which moves sums by rounding.)  Skipping the tokens at a
 * near-tie would not do: a token's choice reaches every dense gradient
 * (sums over tokens, and batch norm's backward mixes the batch). */
#define TRAIN_NEAR 1e-4

static float *training_inputs(pair *p, ref_rng *rng, int64_t T, float **dy, const char *config) {
  const int64_t d = p->cfg.d_model;
  float *x = NULL;
  if (p->cfg.query_norm != PEER_NORM_BATCHNORM) {
    x = fill_pair(p, rng, T, 1);
    ref_fill_quantised(p->cpu, "experts.down", rng, -4, 4, 1.0 / 16);
  } else {
    const int64_t dq = p->cfg.n_heads * p->cfg.d_key, hk = p->cfg.n_heads * p->cfg.top_k;
    int64_t *ids = malloc((size_t)(T * hk) * sizeof(int64_t));
    double *q = malloc((size_t)(T * dq) * sizeof(double));
    double *xd = malloc((size_t)(T * d) * sizeof(double));
    int ok = 0;
    for (int attempt = 0; attempt < 200 && !ok; attempt++) {
      free(x);
      ref_fill_layer(p->cpu, rng);
      x = ref_random_x(rng, T, d);
      for (int64_t i = 0; i < T * d; i++) xd[i] = (double)x[i];
      rt_params P;
      rt_params_load(&P, p->cpu);
      ok = rt_select(&P, T, xd, TRAIN_NEAR, ids, q);
      rt_params_free(&P);
    }
    cr_assert(ok, "[%s T=%lld]: no draw free of near-ties and relu kinks", config, (long long)T);
    free(ids), free(q), free(xd);
  }
  copy_params(p);
  *dy = ref_random_x(rng, T, d);
  return x;
}

/* A GPU training step's outputs against the CPU's: y, dx and every
 * gradient within GRAD_TOL, expert rows exactly. */
static void compare_training(const pair *p, int64_t T, const train_out *g, const train_out *c,
                             const char *what) {
  const int64_t d = p->cfg.d_model;
  const size_t td = (size_t)(T * d);
  close_enough(g->y, c->y, td, what, "y");
  close_enough(g->dx, c->dx, td, what, "dx");
  if (c->wq)
    close_enough(g->wq, c->wq, param_floats(p->cpu, "query.weight"), what, "d query.weight");
  if (c->bq) close_enough(g->bq, c->bq, param_floats(p->cpu, "query.bias"), what, "d query.bias");
  if (c->nw)
    close_enough(g->nw, c->nw, param_floats(p->cpu, "query.norm.weight"), what, "d norm.weight");
  if (c->nb)
    close_enough(g->nb, c->nb, param_floats(p->cpu, "query.norm.bias"), what, "d norm.bias");
  close_enough(g->keys, c->keys, param_floats(p->cpu, "keys"), what, "d keys");
  cr_assert_eq(g->g.n_expert_rows, c->g.n_expert_rows, "%s expert rows", what);
  cr_assert(memcmp(g->rows, c->rows, (size_t)c->g.n_expert_rows * 8) == 0, "%s expert ids", what);
  close_enough(g->down, c->down, (size_t)c->g.n_expert_rows * (size_t)d, what, "d experts.down");
  close_enough(g->up, c->up, (size_t)c->g.n_expert_rows * (size_t)d, what, "d experts.up");
}

/* Two GPU runs of one step give the same bits (reruns, or the host and the
 * device-pointer paths). */
static void same_bits(const pair *p, int64_t T, const train_out *a, const train_out *b,
                      const char *what) {
  const size_t td = (size_t)(T * p->cfg.d_model), d = (size_t)p->cfg.d_model;
  const struct {
    const float *x, *y;
    size_t n;
    const char *name;
  } v[] = {
      {a->y, b->y, td, "y"},
      {a->dx, b->dx, td, "dx"},
      {a->wq, b->wq, param_floats(p->cpu, "query.weight"), "d query.weight"},
      {a->bq, b->bq, param_floats(p->cpu, "query.bias"), "d query.bias"},
      {a->nw, b->nw, param_floats(p->cpu, "query.norm.weight"), "d norm.weight"},
      {a->nb, b->nb, param_floats(p->cpu, "query.norm.bias"), "d norm.bias"},
      {a->keys, b->keys, param_floats(p->cpu, "keys"), "d keys"},
      {a->down, b->down, (size_t)a->g.n_expert_rows * d, "d experts.down"},
      {a->up, b->up, (size_t)a->g.n_expert_rows * d, "d experts.up"},
  };
  for (size_t i = 0; i < sizeof v / sizeof v[0]; i++)
    cr_assert(v[i].n == 0 || memcmp(v[i].x, v[i].y, v[i].n * 4) == 0,
              "%s: %s differs between two GPU runs", what, v[i].name);
  cr_assert_eq(a->g.n_expert_rows, b->g.n_expert_rows, "%s: expert row counts", what);
  cr_assert(memcmp(a->rows, b->rows, (size_t)a->g.n_expert_rows * 8) == 0, "%s: expert ids",
            what);
}

/* The running statistics of the two layers (after one batch each) agree. */
static void compare_running(const pair *p, const char *what) {
  if (p->cfg.query_norm != PEER_NORM_BATCHNORM) return;
  const char *names[] = {"query.norm.running_mean", "query.norm.running_var"};
  for (int i = 0; i < 2; i++) {
    peer_tensor a, b;
    cr_assert_eq(peer_layer_param_by_name(p->cpu, names[i], &a), PEER_OK);
    cr_assert_eq(peer_layer_param_by_name(p->gpu, names[i], &b), PEER_OK);
    float *h = malloc(b.nbytes);
    to_host(h, b.data, b.nbytes);
    close_enough(h, a.data, a.nbytes / 4, what, names[i]);
    free(h);
  }
}

/* Training on both backends (compare_training); the GPU twice gives the same
 * bits; dense expert accumulation equals the sparse rows.  Both layers
 * start from the same running statistics (fill_pair copied them), so after
 * one batch each they agree. */
static void check_training(const char *config, int64_t T) {
  uint64_t seed = ref_test_seed();
  ref_rng rng = {seed};
  pair p = make_pair(config);
  const int64_t d = p.cfg.d_model;
  float *dy, *x = training_inputs(&p, &rng, T, &dy, config);
  char what[256];
  snprintf(what, sizeof what, "[%s T=%lld seed=%llu]", config, (long long)T,
           (unsigned long long)seed);
  train_out c, g, g2;
  train_once(p.cpu, T, x, dy, &c, what);
  train_once(p.gpu, T, x, dy, &g, what);
  const size_t td = (size_t)(T * d);
  compare_training(&p, T, &g, &c, what);
  compare_running(&p, what);
  /* the same bits on a second run (batch statistics: the moved running
   * statistics do not enter) */
  train_once(p.gpu, T, x, dy, &g2, what);
  same_bits(&p, T, &g, &g2, what);
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
/* The reductions over tokens in many chunks, the last one short (16 tokens
 * each at these sizes: 19 for the bias gradient, 7 for batch norm), run
 * starts over 19 tiles of 1024 sorted keys. */
Test(cuda, training_many_chunks_and_tiles) {
  check_training(SMALL ",query_bias=1", 300);
  check_training("d_model=32,n_heads=1,d_key=32,n_subkeys=16,top_k=2,query_norm=batchnorm,"
                 "query_bias=1", 100);
}
/* d not a multiple of 4: the scalar backward expert kernels (f32, bf16) */
Test(cuda, training_scalar_width) {
  check_training("d_model=37,n_heads=3,d_key=10,n_subkeys=33,top_k=5", 31);
  check_training("d_model=37,n_heads=3,d_key=10,n_subkeys=33,top_k=5,weight_dtype=bf16", 31);
}

/* Every combination of the forward and training options (activation, gate,
 * query norm, query bias, expert dtype, shared keys), each on both backends,
 * at a small size with k' > k and a width that is not a multiple of 8.
 * With PEER_TEST_QUICK (the emulated build in CI, kernels/README.md) one
 * combination in QUICK_SHARE, a different share each run (by the seed);
 * QUICK_SHARE is prime to every option's count of values, so each value of
 * each option still runs.  Without it, all 240. */
#define QUICK_SHARE 7
Test(cuda, every_option_forward_and_training, .timeout = 600) {
  const int quick = ref_quick();
  const int share = (int)(ref_test_seed() % QUICK_SHARE);
  int combination = 0;
  static const char *const acts[] = {"relu", "gelu", "gelu_tanh", "silu", "identity"};
  static const char *const gates[] = {"softmax", "sigmoid", "relu"};
  static const char *const norms[] = {"none", "batchnorm"};
  static const char *const dtypes[] = {"f32", "bf16"};
  char config[192];
  for (int a = 0; a < 5; a++)
    for (int g = 0; g < 3; g++)
      for (int nm = 0; nm < 2; nm++)
        for (int bias = 0; bias < 2; bias++)
          for (int dt = 0; dt < 2; dt++)
            for (int shared = 0; shared < 2; shared++) {
              if (quick && combination++ % QUICK_SHARE != share) continue;
              snprintf(config, sizeof config,
                       "d_model=44,n_heads=3,d_key=12,n_subkeys=24,top_k=4,subkey_top_k=6,"
                       "activation=%s,gate=%s,query_norm=%s,query_bias=%d,weight_dtype=%s,"
                       "shared_keys=%d",
                       acts[a], gates[g], norms[nm], bias, dtypes[dt], shared);
              check_config(config, 19, 0);
              check_training(config, 21);
            }
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
  cr_assert(strstr(peer_last_error(), "token 6: dy") != NULL, "%s", peer_last_error());
  /* a failed backward may be retried: the record was cleared */
  dy[6 * d] = 0.5f;
  cr_assert_eq(peer_backward(p.gpu, ctx, dy, NULL, &g), PEER_OK, "%s", peer_last_error());
  peer_context_free(ctx);
  free(x), free(dy), free(y);
  free_pair(&p);
}

/* ------------------------------------------------ device-pointer training */

/* Device buffers of one training step: inputs, outputs, and a peer_grads of
 * device pointers (NULL where the layer lacks the parameter). */
typedef struct dev_step {
  float *x, *y, *dy, *dx;
  int64_t *n_rows;
  peer_grads g;
} dev_step;

static dev_step dev_step_new(peer_layer *L, int64_t T, const float *x, const float *dy) {
  const peer_config *c = peer_layer_config(L);
  const size_t td = (size_t)(T * c->d_model) * 4, E = (size_t)(T * c->n_heads * c->top_k);
  dev_step s;
  s.x = dev_copy_of(x, td), s.dy = dev_copy_of(dy, td);
  s.y = dev_alloc(td), s.dx = dev_alloc(td), s.n_rows = dev_alloc(8);
  peer_grads g = {dev_alloc(param_floats(L, "query.weight") * 4),
                  dev_alloc(param_floats(L, "query.bias") * 4),
                  dev_alloc(param_floats(L, "query.norm.weight") * 4),
                  dev_alloc(param_floats(L, "query.norm.bias") * 4),
                  dev_alloc(param_floats(L, "keys") * 4),
                  0,
                  (int64_t)E,
                  dev_alloc(E * 8),
                  dev_alloc(E * (size_t)c->d_model * 4),
                  dev_alloc(E * (size_t)c->d_model * 4),
                  0};
  s.g = g;
  return s;
}

static void dev_step_free(dev_step *s) {
  cudaFree(s->x), cudaFree(s->y), cudaFree(s->dy), cudaFree(s->dx), cudaFree(s->n_rows);
  cudaFree(s->g.query_weight), cudaFree(s->g.query_bias), cudaFree(s->g.norm_weight);
  cudaFree(s->g.norm_bias), cudaFree(s->g.keys), cudaFree(s->g.expert_rows);
  cudaFree(s->g.experts_down), cudaFree(s->g.experts_up);
}

/* A step's device results into host buffers shaped as train_once's. */
static void dev_step_fetch(peer_layer *L, int64_t T, const dev_step *s, train_out *o) {
  const peer_config *c = peer_layer_config(L);
  const size_t d = (size_t)c->d_model, E = (size_t)(T * c->n_heads * c->top_k);
  o->y = calloc((size_t)T * d, 4), o->dx = calloc((size_t)T * d, 4);
  o->wq = maybe(param_floats(L, "query.weight")), o->bq = maybe(param_floats(L, "query.bias"));
  o->nw = maybe(param_floats(L, "query.norm.weight"));
  o->nb = maybe(param_floats(L, "query.norm.bias")), o->keys = maybe(param_floats(L, "keys"));
  o->down = calloc(E * d, 4), o->up = calloc(E * d, 4), o->rows = calloc(E, 8);
  int64_t n_rows = -1;
  to_host(&n_rows, s->n_rows, 8);
  cr_assert(n_rows >= 0 && n_rows <= (int64_t)E, "expert row count %lld", (long long)n_rows);
  to_host(o->y, s->y, (size_t)T * d * 4), to_host(o->dx, s->dx, (size_t)T * d * 4);
  to_host(o->wq, s->g.query_weight, param_floats(L, "query.weight") * 4);
  to_host(o->bq, s->g.query_bias, param_floats(L, "query.bias") * 4);
  to_host(o->nw, s->g.norm_weight, param_floats(L, "query.norm.weight") * 4);
  to_host(o->nb, s->g.norm_bias, param_floats(L, "query.norm.bias") * 4);
  to_host(o->keys, s->g.keys, param_floats(L, "keys") * 4);
  to_host(o->rows, s->g.expert_rows, (size_t)n_rows * 8);
  to_host(o->down, s->g.experts_down, (size_t)n_rows * d * 4);
  to_host(o->up, s->g.experts_up, (size_t)n_rows * d * 4);
  peer_grads g = {o->wq, o->bq, o->nw, o->nb, o->keys, 0, (int64_t)E, o->rows, o->down, o->up,
                  n_rows};
  o->g = g;
}

/* One training step of L through peer_cuda.h on a stream of ours. */
static void train_device(peer_layer *L, int64_t T, const float *x, const float *dy, train_out *o,
                         const char *what) {
  dev_step s = dev_step_new(L, T, x, dy);
  cudaStream_t st;
  cr_assert_eq(cudaStreamCreate(&st), cudaSuccess);
  peer_context *ctx;
  cr_assert_eq(peer_context_create(&ctx, L, T), PEER_OK, "%s %s", what, peer_last_error());
  cr_assert_eq(peer_cuda_forward_train(L, ctx, T, s.x, s.y, st), PEER_OK, "%s %s", what,
               peer_last_error());
  cr_assert_eq(peer_cuda_backward(L, ctx, s.dy, s.dx, &s.g, s.n_rows, st), PEER_OK, "%s %s",
               what, peer_last_error());
  cr_assert_eq(peer_cuda_check(L, st), PEER_OK, "%s %s", what, peer_last_error());
  dev_step_fetch(L, T, &s, o);
  peer_context_free(ctx);
  cudaStreamDestroy(st);
  dev_step_free(&s);
}

/* The device-pointer training calls against the CPU (compare_training, the
 * running statistics) and against the host path (the same bits); one
 * context across both paths; dense expert gradients on the device, with dx
 * and the other gradients skipped. */
static void check_device_training(const char *config, int64_t T) {
  uint64_t seed = ref_test_seed();
  ref_rng rng = {seed};
  pair p = make_pair(config);
  const int64_t d = p.cfg.d_model;
  float *dy, *x = training_inputs(&p, &rng, T, &dy, config);
  char what[256];
  snprintf(what, sizeof what, "[device %s T=%lld seed=%llu]", config, (long long)T,
           (unsigned long long)seed);
  train_out c, dv, hp, mixed, reverse;
  train_once(p.cpu, T, x, dy, &c, what);
  train_device(p.gpu, T, x, dy, &dv, what);
  compare_training(&p, T, &dv, &c, what);
  compare_running(&p, what);
  train_once(p.gpu, T, x, dy, &hp, what);
  same_bits(&p, T, &dv, &hp, what);

  /* a host-path forward, then a device-pointer backward on its context */
  {
    dev_step s = dev_step_new(p.gpu, T, x, dy);
    peer_context *ctx;
    cr_assert_eq(peer_context_create(&ctx, p.gpu, T), PEER_OK);
    float *y = malloc((size_t)(T * d) * 4);
    cr_assert_eq(peer_forward_train(p.gpu, ctx, T, x, y), PEER_OK, "%s", peer_last_error());
    cr_assert_eq(cudaMemcpy(s.y, y, (size_t)(T * d) * 4, cudaMemcpyHostToDevice), cudaSuccess);
    cr_assert_eq(peer_cuda_backward(p.gpu, ctx, s.dy, s.dx, &s.g, s.n_rows, 0), PEER_OK, "%s %s",
                 what, peer_last_error());
    cr_assert_eq(peer_cuda_check(p.gpu, 0), PEER_OK, "%s %s", what, peer_last_error());
    dev_step_fetch(p.gpu, T, &s, &mixed);
    same_bits(&p, T, &dv, &mixed, what);
    peer_context_free(ctx);
    dev_step_free(&s);
    free(y);
  }

  /* the other way round: a device-pointer forward on a non-blocking stream,
   * then at once a host-pointer backward on its context, which waits for
   * the device before it reads the context */
  {
    dev_step s = dev_step_new(p.gpu, T, x, dy);
    cudaStream_t st;
    cr_assert_eq(cudaStreamCreateWithFlags(&st, cudaStreamNonBlocking), cudaSuccess);
    cr_assert_eq(cudaDeviceSynchronize(), cudaSuccess); /* dev_step_new's legacy-stream copies */
    peer_context *ctx;
    cr_assert_eq(peer_context_create(&ctx, p.gpu, T), PEER_OK);
    cr_assert_eq(peer_cuda_forward_train(p.gpu, ctx, T, s.x, s.y, st), PEER_OK, "%s %s", what,
                 peer_last_error());
    peer_grads g = train_out_alloc(p.gpu, T, &reverse);
    cr_assert_eq(peer_backward(p.gpu, ctx, dy, reverse.dx, &g), PEER_OK, "%s %s", what,
                 peer_last_error());
    reverse.g = g;
    to_host(reverse.y, s.y, (size_t)(T * d) * 4);
    same_bits(&p, T, &dv, &reverse, what);
    peer_context_free(ctx);
    cudaStreamDestroy(st);
    dev_step_free(&s);
  }

  /* dense expert rows on the device: added into [N, d]; dx skipped */
  {
    const size_t N = (size_t)(p.cfg.n_subkeys * p.cfg.n_subkeys);
    const size_t E = (size_t)(T * p.cfg.n_heads * p.cfg.top_k), nd = N * (size_t)d;
    float *dd = malloc(nd * 4), *du = calloc(nd, 4);
    for (size_t i = 0; i < nd; i++) dd[i] = 1.0f;
    float *d_dd = dev_copy_of(dd, nd * 4), *d_du = dev_copy_of(du, nd * 4);
    float *d_x = dev_copy_of(x, (size_t)(T * d) * 4), *d_dy = dev_copy_of(dy, (size_t)(T * d) * 4);
    float *d_y = dev_alloc((size_t)(T * d) * 4);
    int64_t *d_rows = dev_alloc(E * 8), *d_n = dev_alloc(8), n_rows = -1;
    peer_grads gd = {0};
    gd.experts_dense = 1, gd.expert_capacity = (int64_t)E, gd.expert_rows = d_rows;
    gd.experts_down = d_dd, gd.experts_up = d_du;
    cudaStream_t st;
    cr_assert_eq(cudaStreamCreate(&st), cudaSuccess);
    peer_context *ctx;
    cr_assert_eq(peer_context_create(&ctx, p.gpu, T), PEER_OK);
    cr_assert_eq(peer_cuda_forward_train(p.gpu, ctx, T, d_x, d_y, st), PEER_OK, "%s %s", what,
                 peer_last_error());
    cr_assert_eq(peer_cuda_backward(p.gpu, ctx, d_dy, NULL, &gd, d_n, st), PEER_OK, "%s %s", what,
                 peer_last_error());
    cr_assert_eq(peer_cuda_check(p.gpu, st), PEER_OK, "%s %s", what, peer_last_error());
    int64_t *rows = calloc(E, 8);
    to_host(&n_rows, d_n, 8), to_host(rows, d_rows, E * 8);
    to_host(dd, d_dd, nd * 4), to_host(du, d_du, nd * 4);
    cr_assert_eq(n_rows, dv.g.n_expert_rows, "%s dense: expert row count", what);
    cr_assert(memcmp(rows, dv.rows, (size_t)n_rows * 8) == 0, "%s dense: expert ids", what);
    char *listed = calloc(N, 1);
    for (int64_t r = 0; r < n_rows; r++) {
      listed[rows[r]] = 1;
      for (int64_t i = 0; i < d; i++) {
        cr_assert(dd[rows[r] * d + i] == 1.0f + dv.down[r * d + i], "%s dense down", what);
        cr_assert(du[rows[r] * d + i] == dv.up[r * d + i], "%s dense up", what);
      }
    }
    for (size_t i = 0; i < N; i++)
      for (int64_t j = 0; !listed[i] && j < d; j++)
        cr_assert(dd[i * (size_t)d + (size_t)j] == 1.0f && du[i * (size_t)d + (size_t)j] == 0.0f,
                  "%s dense: row %zu is not listed but changed", what, i);
    /* no expert gradients: the count is 0 */
    cr_assert_eq(peer_cuda_forward_train(p.gpu, ctx, T, d_x, d_y, st), PEER_OK);
    peer_grads none = {0};
    cr_assert_eq(cudaMemset(d_n, 0xff, 8), cudaSuccess);
    cr_assert_eq(peer_cuda_backward(p.gpu, ctx, d_dy, NULL, &none, d_n, st), PEER_OK, "%s %s",
                 what, peer_last_error());
    cr_assert_eq(peer_cuda_check(p.gpu, st), PEER_OK, "%s %s", what, peer_last_error());
    to_host(&n_rows, d_n, 8);
    cr_assert_eq(n_rows, 0, "%s: no expert gradients, %lld rows", what, (long long)n_rows);
    peer_context_free(ctx);
    cudaStreamDestroy(st);
    cudaFree(d_dd), cudaFree(d_du), cudaFree(d_x), cudaFree(d_dy), cudaFree(d_y);
    cudaFree(d_rows), cudaFree(d_n);
    free(dd), free(du), free(rows), free(listed);
  }
  train_free(&c), train_free(&dv), train_free(&hp), train_free(&mixed), train_free(&reverse);
  free(x), free(dy);
  free_pair(&p);
}

Test(cuda, device_training_matches_cpu_and_host_path) { check_device_training(SMALL, 64); }
Test(cuda, device_training_norm_bias_shared_keys) {
  check_device_training(SMALL ",query_norm=batchnorm,query_bias=1,shared_keys=1,gate=sigmoid", 48);
}
Test(cuda, device_training_bf16_odd_width) {
  check_device_training("d_model=36,n_heads=2,d_key=8,n_subkeys=20,top_k=3,weight_dtype=bf16,"
                        "gate=relu,activation=gelu", 33);
}

/* Host copies of the running statistics (mean then var, dq floats each). */
static float *running_stats(peer_layer *L) {
  peer_tensor m, v;
  cr_assert_eq(peer_layer_param_by_name(L, "query.norm.running_mean", &m), PEER_OK);
  cr_assert_eq(peer_layer_param_by_name(L, "query.norm.running_var", &v), PEER_OK);
  float *h = malloc(m.nbytes + v.nbytes);
  to_host(h, m.data, m.nbytes), to_host(h + m.nbytes / 4, v.data, v.nbytes);
  return h;
}

/* A batch with a NaN in x, or a NaN key (a non-finite score with a finite
 * x), is reported by peer_cuda_check and leaves the running statistics as
 * they were, through both APIs; a good batch then moves them. */
Test(cuda, device_training_bad_batch_keeps_running_stats) {
  pair p = make_pair(SMALL ",query_norm=batchnorm");
  cr_assert_eq(peer_layer_init(p.gpu, 11), PEER_OK, "%s", peer_last_error());
  const int64_t T = 8, d = p.cfg.d_model;
  const size_t bytes = (size_t)(2 * p.cfg.n_heads * p.cfg.d_key) * 4;
  ref_rng rng = {4};
  float *x = ref_random_x(&rng, T, d), *y = malloc((size_t)(T * d) * 4);
  x[3 * d + 1] = NAN;
  float *before = running_stats(p.gpu);
  float *d_x = dev_copy_of(x, (size_t)(T * d) * 4), *d_y = dev_alloc((size_t)(T * d) * 4);
  cudaStream_t st;
  cr_assert_eq(cudaStreamCreate(&st), cudaSuccess);
  peer_context *ctx;
  cr_assert_eq(peer_context_create(&ctx, p.gpu, T), PEER_OK);

  cr_assert_eq(peer_cuda_forward_train(p.gpu, ctx, T, d_x, d_y, st), PEER_OK, "%s",
               peer_last_error());
  cr_assert_eq(peer_cuda_check(p.gpu, st), PEER_ERR_NONFINITE);
  cr_assert(strstr(peer_last_error(), "token 3: x") != NULL, "%s", peer_last_error());
  float *after = running_stats(p.gpu);
  cr_assert(memcmp(before, after, bytes) == 0, "running statistics moved after a NaN x");
  free(after);
  cr_assert_eq(peer_cuda_check(p.gpu, st), PEER_OK, "the records were cleared: %s",
               peer_last_error());

  cr_assert_eq(peer_forward_train(p.gpu, ctx, T, x, y), PEER_ERR_NONFINITE);
  cr_assert(strstr(peer_last_error(), "token 3: x") != NULL, "%s", peer_last_error());
  after = running_stats(p.gpu);
  cr_assert(memcmp(before, after, bytes) == 0, "host path: running statistics moved");
  free(after);

  /* a NaN key: x is finite, the scores are not */
  x[3 * d + 1] = 0.25f;
  cr_assert_eq(cudaMemcpy(d_x, x, (size_t)(T * d) * 4, cudaMemcpyHostToDevice), cudaSuccess);
  peer_tensor keys;
  cr_assert_eq(peer_layer_param_by_name(p.gpu, "keys", &keys), PEER_OK);
  float nan = NAN, key0;
  to_host(&key0, keys.data, 4);
  cr_assert_eq(cudaMemcpy(keys.data, &nan, 4, cudaMemcpyHostToDevice), cudaSuccess);
  cr_assert_eq(peer_cuda_forward_train(p.gpu, ctx, T, d_x, d_y, st), PEER_OK, "%s",
               peer_last_error());
  cr_assert_eq(peer_cuda_check(p.gpu, st), PEER_ERR_NONFINITE);
  cr_assert(strstr(peer_last_error(), "token 0, head 0") != NULL, "%s", peer_last_error());
  after = running_stats(p.gpu);
  cr_assert(memcmp(before, after, bytes) == 0, "running statistics moved after a NaN score");
  free(after);

  /* a good batch moves them */
  cr_assert_eq(cudaMemcpy(keys.data, &key0, 4, cudaMemcpyHostToDevice), cudaSuccess);
  cr_assert_eq(peer_cuda_forward_train(p.gpu, ctx, T, d_x, d_y, st), PEER_OK, "%s",
               peer_last_error());
  cr_assert_eq(peer_cuda_check(p.gpu, st), PEER_OK, "%s", peer_last_error());
  after = running_stats(p.gpu);
  cr_assert(memcmp(before, after, bytes) != 0, "a good batch left the running statistics");
  free(after);

  peer_context_free(ctx);
  cudaStreamDestroy(st);
  cudaFree(d_x), cudaFree(d_y);
  free(before), free(x), free(y);
  free_pair(&p);
}

Test(cuda, device_training_nonfinite_dy) {
  pair p = make_pair(SMALL);
  cr_assert_eq(peer_layer_init(p.gpu, 3), PEER_OK, "%s", peer_last_error());
  const int64_t T = 8, d = p.cfg.d_model;
  ref_rng rng = {2};
  float *x = ref_random_x(&rng, T, d), *dy = ref_random_x(&rng, T, d);
  dy[6 * d + 2] = NAN;
  dev_step s = dev_step_new(p.gpu, T, x, dy);
  cudaStream_t st;
  cr_assert_eq(cudaStreamCreate(&st), cudaSuccess);
  peer_context *ctx;
  cr_assert_eq(peer_context_create(&ctx, p.gpu, T), PEER_OK);
  cr_assert_eq(peer_cuda_forward_train(p.gpu, ctx, T, s.x, s.y, st), PEER_OK, "%s",
               peer_last_error());
  cr_assert_eq(peer_cuda_backward(p.gpu, ctx, s.dy, NULL, &s.g, s.n_rows, st), PEER_OK, "%s",
               peer_last_error());
  cr_assert_eq(peer_cuda_check(p.gpu, st), PEER_ERR_NONFINITE);
  cr_assert(strstr(peer_last_error(), "token 6: dy") != NULL, "%s", peer_last_error());
  /* the backward used up the forward */
  cr_assert_eq(peer_cuda_backward(p.gpu, ctx, s.dy, NULL, &s.g, s.n_rows, st), PEER_ERR_STATE);
  peer_context_free(ctx);
  cudaStreamDestroy(st);
  dev_step_free(&s);
  free(x), free(dy);
  free_pair(&p);
}

/* Argument errors come back at once; an empty batch zeroes the dense
 * gradients and reports no expert rows. */
Test(cuda, device_training_arguments_and_empty_batch) {
  pair p = make_pair(SMALL ",query_norm=batchnorm");
  cr_assert_eq(peer_layer_init(p.gpu, 9), PEER_OK, "%s", peer_last_error());
  const int64_t T = 4, d = p.cfg.d_model;
  ref_rng rng = {6};
  float *x = ref_random_x(&rng, T, d), *dy = ref_random_x(&rng, T, d);
  dev_step s = dev_step_new(p.gpu, T, x, dy);
  peer_context *ctx, *cpu_ctx;
  cr_assert_eq(peer_context_create(&ctx, p.gpu, T), PEER_OK);
  cr_assert_eq(peer_context_create(&cpu_ctx, p.cpu, T), PEER_OK);
  cr_assert_eq(peer_cuda_backward(p.gpu, ctx, s.dy, s.dx, &s.g, s.n_rows, 0), PEER_ERR_STATE);
  cr_assert_eq(peer_cuda_forward_train(p.cpu, cpu_ctx, T, s.x, s.y, 0),
               PEER_ERR_INVALID_ARGUMENT);
  cr_assert_eq(peer_cuda_forward_train(p.gpu, cpu_ctx, T, s.x, s.y, 0),
               PEER_ERR_INVALID_ARGUMENT);
  cr_assert_eq(peer_cuda_forward_train(p.gpu, ctx, T + 1, s.x, s.y, 0),
               PEER_ERR_INVALID_ARGUMENT);
  cr_assert_eq(peer_cuda_forward_train(p.gpu, ctx, 1, s.x, s.y, 0), PEER_ERR_INVALID_ARGUMENT,
               "batch norm needs two tokens");
  cr_assert_eq(peer_cuda_forward_train(p.gpu, ctx, T, s.x, NULL, 0), PEER_ERR_INVALID_ARGUMENT);
  cr_assert_eq(peer_cuda_forward_train(p.gpu, ctx, T, s.x, s.y, 0), PEER_OK, "%s",
               peer_last_error());
  peer_grads small = s.g;
  small.expert_capacity = T * p.cfg.n_heads * p.cfg.top_k - 1;
  cr_assert_eq(peer_cuda_backward(p.gpu, ctx, s.dy, s.dx, &small, s.n_rows, 0),
               PEER_ERR_INVALID_ARGUMENT);
  cr_assert(strstr(peer_last_error(), "expert_capacity") != NULL, "%s", peer_last_error());
  peer_grads no_bias = {0};
  no_bias.query_bias = s.g.query_weight;
  cr_assert_eq(peer_cuda_backward(p.gpu, ctx, s.dy, s.dx, &no_bias, NULL, 0),
               PEER_ERR_INVALID_ARGUMENT);
  cr_assert_eq(peer_cuda_backward(p.gpu, ctx, NULL, s.dx, &s.g, s.n_rows, 0),
               PEER_ERR_INVALID_ARGUMENT);
  cr_assert_eq(peer_cuda_backward(p.gpu, ctx, s.dy, s.dx, &s.g, s.n_rows, 0), PEER_OK, "%s",
               peer_last_error());
  cr_assert_eq(peer_cuda_check(p.gpu, 0), PEER_OK, "%s", peer_last_error());

  /* a forward_train refused for its arguments leaves no forward behind:
   * the backward does not use the batch before it */
  const int64_t bad_T[] = {-1, T + 1, (int64_t)1 << 31, T};
  for (int i = 0; i < 4; i++) {
    cr_assert_eq(peer_cuda_forward_train(p.gpu, ctx, T, s.x, s.y, 0), PEER_OK, "%s",
                 peer_last_error());
    const float *bx = i == 3 ? NULL : s.x; /* the last: x NULL with T > 0 */
    cr_assert_eq(peer_cuda_forward_train(p.gpu, ctx, bad_T[i], bx, s.y, 0),
                 PEER_ERR_INVALID_ARGUMENT, "n_tokens %lld", (long long)bad_T[i]);
    cr_assert_eq(peer_cuda_backward(p.gpu, ctx, s.dy, s.dx, &s.g, s.n_rows, 0), PEER_ERR_STATE,
                 "after a refused forward_train (n_tokens %lld)", (long long)bad_T[i]);
  }
  cr_assert_eq(peer_cuda_check(p.gpu, 0), PEER_OK, "%s", peer_last_error());

  /* T = 0 */
  const size_t wq = param_floats(p.gpu, "query.weight") * 4;
  cr_assert_eq(cudaMemset(s.g.query_weight, 0x3f, wq), cudaSuccess);
  cr_assert_eq(cudaMemset(s.n_rows, 0x3f, 8), cudaSuccess);
  cr_assert_eq(peer_cuda_forward_train(p.gpu, ctx, 0, NULL, NULL, 0), PEER_OK, "%s",
               peer_last_error());
  cr_assert_eq(peer_cuda_backward(p.gpu, ctx, NULL, NULL, &s.g, s.n_rows, 0), PEER_OK, "%s",
               peer_last_error());
  cr_assert_eq(peer_cuda_check(p.gpu, 0), PEER_OK, "%s", peer_last_error());
  float *h = malloc(wq);
  int64_t n_rows = -1;
  to_host(h, s.g.query_weight, wq), to_host(&n_rows, s.n_rows, 8);
  for (size_t i = 0; i < wq / 4; i++) cr_assert(h[i] == 0.0f, "T = 0: d query.weight[%zu]", i);
  cr_assert_eq(n_rows, 0);
  free(h);
  peer_context_free(ctx), peer_context_free(cpu_ctx);
  dev_step_free(&s);
  free(x), free(dy);
  free_pair(&p);
}

/* --------------------------------------------- limits, errors, ordering */

/* Layer creation with `config` on the CUDA backend: refused with
 * PEER_ERR_UNSUPPORTED and a message holding `want` when want is not NULL;
 * else past the backend's limits (created with a device, PEER_ERR_NO_DEVICE
 * without one: the limits are checked first). */
static void check_cuda_limit(const char *config, const char *want) {
  peer_config c;
  peer_config_default(&c);
  cr_assert_eq(peer_config_parse(&c, config), PEER_OK, "%s: %s", config, peer_last_error());
  peer_options o;
  peer_options_default(&o);
  o.backend = PEER_BACKEND_CUDA;
  peer_layer *L = NULL;
  peer_status st = peer_layer_create(&L, &c, &o);
  if (want) {
    cr_assert_eq(st, PEER_ERR_UNSUPPORTED, "%s: status %d", config, (int)st);
    cr_assert(strstr(peer_last_error(), want) != NULL, "%s: message '%s' lacks '%s'", config,
              peer_last_error(), want);
  } else {
    cr_assert(st == PEER_OK || st == PEER_ERR_NO_DEVICE, "%s: %s", config, peer_last_error());
  }
  peer_layer_free(L);
}

/* Each shared-memory limit at its edge, with its own message: the top-k'
 * kernel takes k' <= 4064 (any n), the merge top_k <= 3071, the expert
 * kernel H*k <= 4096. */
Test(cuda_limits, subkey_lists_merge_and_experts) {
  check_cuda_limit("d_model=2,n_heads=1,d_key=2,n_subkeys=4065,top_k=1,subkey_top_k=4064", NULL);
  check_cuda_limit("d_model=2,n_heads=1,d_key=2,n_subkeys=4065,top_k=1,subkey_top_k=4065",
                   "subkey_top_k 4065 is beyond the top-k' kernel's shared memory (at most 4064)");
  check_cuda_limit("d_model=1,n_heads=1,d_key=2,n_subkeys=4064,top_k=3071", NULL);
  check_cuda_limit("d_model=1,n_heads=1,d_key=2,n_subkeys=4064,top_k=3072",
                   "top_k 3072 is beyond the merge kernel's shared memory (at most 3071)");
  check_cuda_limit("d_model=1,n_heads=16,d_key=2,n_subkeys=256,top_k=256", NULL);
  check_cuda_limit("d_model=1,n_heads=17,d_key=2,n_subkeys=256,top_k=241",
                   "n_heads*top_k = 4097 is beyond the expert kernel's shared memory (at most "
                   "4096)");
}

/* The CUDA backward sorts 2*T*H*k pairs with 32-bit counts: a context of
 * more than (2^31 - 1) / (2*H*k) tokens is refused when it is sized or
 * created, naming max_tokens and the limit, while the CPU backend (which
 * indexes T*H*k entries) takes it. */
Test(cuda, context_beyond_the_sort_limit_is_refused) {
  pair p = make_pair(SMALL);
  const int64_t most = 0x7fffffff / (2 * p.cfg.n_heads * p.cfg.top_k);
  size_t bytes = 0;
  cr_assert_eq(peer_context_size(p.gpu, most, &bytes), PEER_OK, "%s", peer_last_error());
  cr_assert_eq(peer_context_size(p.gpu, most + 1, &bytes), PEER_ERR_UNSUPPORTED);
  char tokens[64], limit[64];
  snprintf(tokens, sizeof tokens, "max_tokens %lld", (long long)(most + 1));
  snprintf(limit, sizeof limit, "limit of %lld", (long long)most);
  cr_assert(strstr(peer_last_error(), tokens) && strstr(peer_last_error(), limit), "%s",
            peer_last_error());
  peer_context *ctx = NULL;
  cr_assert_eq(peer_context_create(&ctx, p.gpu, most + 1), PEER_ERR_UNSUPPORTED);
  cr_assert(ctx == NULL);
  cr_assert(strstr(peer_last_error(), "context_create") && strstr(peer_last_error(), tokens), "%s",
            peer_last_error());
  cr_assert_eq(peer_context_size(p.cpu, most + 1, &bytes), PEER_OK, "%s", peer_last_error());
  free_pair(&p);
}

/* A device allocation that fails is PEER_ERR_OUT_OF_MEMORY and leaves no
 * runtime error behind: the next call's launch checks do not report it. */
Test(cuda, failed_allocation_is_out_of_memory_and_not_sticky) {
  pair p = make_pair(SMALL);
  cr_assert_eq(peer_layer_init(p.gpu, 5), PEER_OK, "%s", peer_last_error());
  const int64_t T = 16, d = p.cfg.d_model;
  ref_rng rng = {8};
  float *x = ref_random_x(&rng, T, d);
  float *d_x = dev_copy_of(x, (size_t)(T * d) * 4), *d_y = dev_alloc((size_t)(T * d) * 4);
  /* scratch for 2^31 - 1 tokens (terabytes) is beyond any device */
  cr_assert_eq(peer_cuda_forward(p.gpu, 0x7fffffff, d_x, d_y, NULL, NULL, 0),
               PEER_ERR_OUT_OF_MEMORY, "%s", peer_last_error());
  cr_assert(strstr(peer_last_error(), "cuda workspace") != NULL, "%s", peer_last_error());
  cr_assert_eq(peer_cuda_forward(p.gpu, T, d_x, d_y, NULL, NULL, 0), PEER_OK, "%s",
               peer_last_error());
  cr_assert_eq(peer_cuda_check(p.gpu, 0), PEER_OK, "%s", peer_last_error());
  float *y = malloc((size_t)(T * d) * 4);
  cr_assert_eq(peer_forward(p.gpu, T, x, y, NULL, NULL), PEER_OK, "%s", peer_last_error());
  cudaFree(d_x), cudaFree(d_y);
  free(x), free(y);
  free_pair(&p);
}

/* Records on a non-blocking stream: a check's clear is ordered before the
 * next call's kernels, so each of several bad batches in a row, checked
 * one by one, is reported with its own token; then a good batch is clean. */
Test(cuda, records_on_a_non_blocking_stream) {
  pair p = make_pair(SMALL);
  cr_assert_eq(peer_layer_init(p.gpu, 6), PEER_OK, "%s", peer_last_error());
  const int64_t T = 8, d = p.cfg.d_model;
  const size_t xb = (size_t)(T * d) * 4;
  ref_rng rng = {9};
  float *x = ref_random_x(&rng, T, d);
  float *d_x = dev_copy_of(x, xb), *d_bad[2], *d_y = dev_alloc(xb);
  const int64_t bad_token[2] = {5, 2};
  for (int i = 0; i < 2; i++) {
    float keep = x[bad_token[i] * d + 1];
    x[bad_token[i] * d + 1] = NAN;
    d_bad[i] = dev_copy_of(x, xb);
    x[bad_token[i] * d + 1] = keep;
  }
  cudaStream_t st;
  cr_assert_eq(cudaStreamCreateWithFlags(&st, cudaStreamNonBlocking), cudaSuccess);
  /* the copies above went through the legacy stream, which st does not wait for */
  cr_assert_eq(cudaDeviceSynchronize(), cudaSuccess);
  for (int round = 0; round < 20; round++) {
    for (int i = 0; i < 2; i++) {
      cr_assert_eq(peer_cuda_forward(p.gpu, T, d_bad[i], d_y, NULL, NULL, st), PEER_OK, "%s",
                   peer_last_error());
      cr_assert_eq(peer_cuda_check(p.gpu, st), PEER_ERR_NONFINITE, "round %d batch %d", round, i);
      char want[32];
      snprintf(want, sizeof want, "token %lld, head 0", (long long)bad_token[i]);
      cr_assert(strstr(peer_last_error(), want) != NULL, "round %d: %s", round, peer_last_error());
    }
    cr_assert_eq(peer_cuda_forward(p.gpu, T, d_x, d_y, NULL, NULL, st), PEER_OK, "%s",
                 peer_last_error());
    cr_assert_eq(peer_cuda_check(p.gpu, st), PEER_OK, "round %d: %s", round, peer_last_error());
  }
  cudaStreamDestroy(st);
  cudaFree(d_x), cudaFree(d_bad[0]), cudaFree(d_bad[1]), cudaFree(d_y);
  free(x);
  free_pair(&p);
}

/* peer_layer_init's parameters are in place for a non-blocking stream when
 * it returns, and a retrieval queued before a re-init reads the old ones:
 * both retrievals match the CPU's with the same seeds. */
Test(cuda, init_is_ordered_with_non_blocking_streams) {
  pair p = make_pair(SMALL ",query_bias=1");
  const int64_t T = 64, H = p.cfg.n_heads;
  const size_t ne = (size_t)(T * H * p.cfg.top_k);
  ref_rng rng = {10};
  float *x = ref_random_x(&rng, T, p.cfg.d_model);
  float *d_x = dev_copy_of(x, (size_t)(T * p.cfg.d_model) * 4);
  const uint64_t seeds[2] = {21, 22};
  outs c[2] = {outs_new(T, &p.cfg), outs_new(T, &p.cfg)};
  outs g[2] = {outs_new(T, &p.cfg), outs_new(T, &p.cfg)};
  int64_t *d_ids[2];
  float *d_sc[2];
  cudaStream_t st;
  cr_assert_eq(cudaStreamCreateWithFlags(&st, cudaStreamNonBlocking), cudaSuccess);
  for (int i = 0; i < 2; i++) {
    /* zeroed through the legacy stream; the init below waits for the device */
    d_ids[i] = dev_alloc(ne * 8), d_sc[i] = dev_alloc(ne * 4);
    cr_assert_eq(peer_layer_init(p.cpu, seeds[i]), PEER_OK);
    cr_assert_eq(peer_retrieve(p.cpu, T, x, c[i].ids, c[i].sc, NULL), PEER_OK, "%s",
                 peer_last_error());
    /* the second init comes while the first retrieval may still be queued */
    cr_assert_eq(peer_layer_init(p.gpu, seeds[i]), PEER_OK, "%s", peer_last_error());
    cr_assert_eq(peer_cuda_retrieve(p.gpu, T, d_x, d_ids[i], d_sc[i], NULL, st), PEER_OK, "%s",
                 peer_last_error());
  }
  cr_assert_eq(peer_cuda_check(p.gpu, st), PEER_OK, "%s", peer_last_error());
  char *swapped = calloc((size_t)T, 1);
  for (int i = 0; i < 2; i++) {
    to_host(g[i].ids, d_ids[i], ne * 8), to_host(g[i].sc, d_sc[i], ne * 4);
    char what[64];
    snprintf(what, sizeof what, "[init seed %llu]", (unsigned long long)seeds[i]);
    int64_t rows = compare_retrieval(&p, T, &c[i], &g[i], 0, swapped, what);
    cr_assert(rows * 20 <= T * H, "%s: %lld of %lld heads differ in ids", what, (long long)rows,
              (long long)(T * H));
    cudaFree(d_ids[i]), cudaFree(d_sc[i]);
    outs_free(&c[i]), outs_free(&g[i]);
  }
  cudaStreamDestroy(st);
  cudaFree(d_x);
  free(swapped), free(x);
  free_pair(&p);
}

/* Free device memory now (cudaMemGetInfo), signed for differences. */
static int64_t device_free_bytes(void) {
  size_t free_b = 0, total = 0;
  cr_assert_eq(cudaMemGetInfo(&free_b, &total), cudaSuccess);
  return (int64_t)free_b;
}

/* Device-pointer training takes no host-path staging: a context used only
 * by device-pointer steps takes peer_context_size, far less than the
 * staging (here the [T*H*k, d] expert rows twice are 256 MiB; 64 MiB with
 * PEER_TEST_QUICK, a quarter of the tokens), which the first host-pointer
 * call takes, once, and peer_context_free gives back. */
Test(cuda, device_pointer_training_takes_no_staging) {
  pair p = make_pair("d_model=512,n_heads=4,d_key=32,n_subkeys=64,top_k=8");
  cr_assert_eq(peer_layer_init(p.gpu, 12), PEER_OK, "%s", peer_last_error());
  const int64_t T = ref_quick() ? 512 : 2048, d = p.cfg.d_model;
  const int64_t rows = T * p.cfg.n_heads * p.cfg.top_k * d * 4 * 2;
  const int64_t slack = (int64_t)64 << 20; /* allocation granularity, cuBLAS */
  ref_rng rng = {13};
  float *x = ref_random_x(&rng, T, d), *dy = ref_random_x(&rng, T, d);
  float *y = malloc((size_t)(T * d) * 4);
  dev_step s = dev_step_new(p.gpu, T, x, dy);
  size_t ctx_bytes = 0;
  cr_assert_eq(peer_context_size(p.gpu, T, &ctx_bytes), PEER_OK, "%s", peer_last_error());
  const int64_t ctx = (int64_t)ctx_bytes;
  cr_assert(ctx < rows / 8, "context %lld bytes, expert staging %lld", (long long)ctx,
            (long long)rows);
  /* One device-pointer step on a context of its own first, so that the
   * layer's scratch, cuBLAS's workspace and every kernel (lazy loading) are
   * in place before anything is measured. */
  peer_context *c;
  int64_t free0 = 0;
  for (int pass = 0; pass < 2; pass++) {
    if (pass == 1) free0 = device_free_bytes();
    cr_assert_eq(peer_context_create(&c, p.gpu, T), PEER_OK, "%s", peer_last_error());
    cr_assert_eq(peer_cuda_forward_train(p.gpu, c, T, s.x, s.y, 0), PEER_OK, "%s",
                 peer_last_error());
    cr_assert_eq(peer_cuda_backward(p.gpu, c, s.dy, s.dx, &s.g, s.n_rows, 0), PEER_OK, "%s",
                 peer_last_error());
    cr_assert_eq(peer_cuda_check(p.gpu, 0), PEER_OK, "%s", peer_last_error());
    if (pass == 0) peer_context_free(c);
  }
  const int64_t free1 = device_free_bytes();
  cr_assert(free0 - free1 < ctx + slack, "device-pointer training took %lld bytes",
            (long long)(free0 - free1));

  peer_grads dense = {0};
  for (int i = 0; i < 2; i++) {
    cr_assert_eq(peer_forward_train(p.gpu, c, T, x, y), PEER_OK, "%s", peer_last_error());
    cr_assert_eq(peer_backward(p.gpu, c, dy, NULL, &dense), PEER_OK, "%s", peer_last_error());
  }
  const int64_t free2 = device_free_bytes();
  cr_assert(free1 - free2 >= rows && free1 - free2 < rows + rows / 8 + slack,
            "the host path took %lld bytes, its staging needs %lld and a little",
            (long long)(free1 - free2), (long long)rows);
  peer_context_free(c);
  const int64_t free3 = device_free_bytes();
  cr_assert(free3 - free2 >= rows + ctx - slack, "peer_context_free gave back %lld bytes",
            (long long)(free3 - free2));
  dev_step_free(&s);
  free(x), free(dy), free(y);
  free_pair(&p);
}

/* ------------------------------------------------- the device optimizer */

/* CPU and CUDA optimizers fed the same gradients must leave the same
 * parameters and state: bit for bit, as both run peer/optim_rule.h without
 * FMA contraction (explicitly rounded on a GPU); a build whose C code may
 * contract (an FMA target: __FMA__) gets OPTIM_TOL instead. */
#ifdef __FMA__
#define OPTIM_TOL 1e-6
#else
#define OPTIM_TOL 0.0
#endif

static void same_floats(const float *g, const float *c, size_t n, const char *what,
                        const char *name) {
  for (size_t i = 0; i < n; i++)
    cr_assert(OPTIM_TOL == 0.0 ? memcmp(g + i, c + i, 4) == 0
                               : fabs(g[i] - c[i]) <= OPTIM_TOL * (1.0 + fabs(c[i])),
              "%s %s[%zu]: gpu %.9g, cpu %.9g", what, name, i, (double)g[i], (double)c[i]);
}

/* Every parameter and state tensor of the CUDA pair against the CPU's. */
/* Parameters and optimizer state of the two layers and optimizers agree
 * (bitwise, or within OPTIM_TOL where the build contracts to FMA); so do the
 * step counts, unless og's is `extra_steps` ahead (steps it refused). */
static void compare_optimizers_after(const pair *p, peer_optimizer *oc, peer_optimizer *og,
                                     const char *what, int64_t extra_steps) {
  for (int i = 0; i < peer_layer_n_params(p->cpu); i++) {
    peer_tensor a, b;
    cr_assert_eq(peer_layer_param(p->cpu, i, &a), PEER_OK);
    cr_assert_eq(peer_layer_param(p->gpu, i, &b), PEER_OK);
    void *h = malloc(b.nbytes);
    to_host(h, b.data, b.nbytes);
    if (a.dtype == PEER_BF16)
      cr_assert(memcmp(h, a.data, a.nbytes) == 0 || OPTIM_TOL > 0, "%s %s (bf16) differs", what,
                a.name);
    else
      same_floats(h, a.data, a.nbytes / 4, what, a.name);
    free(h);
  }
  cr_assert_eq(peer_optimizer_n_states(og), peer_optimizer_n_states(oc));
  cr_assert_eq(peer_optimizer_step_count(og), peer_optimizer_step_count(oc) + extra_steps);
  for (int i = 0; i < peer_optimizer_n_states(oc); i++) {
    peer_tensor a, b;
    cr_assert_eq(peer_optimizer_state(oc, i, &a), PEER_OK);
    cr_assert_eq(peer_optimizer_state(og, i, &b), PEER_OK);
    cr_assert_str_eq(a.name, b.name);
    float *h = malloc(b.nbytes);
    to_host(h, b.data, b.nbytes);
    same_floats(h, a.data, a.nbytes / 4, what, a.name);
    free(h);
  }
}

static void compare_optimizers(const pair *p, peer_optimizer *oc, peer_optimizer *og,
                               const char *what) {
  compare_optimizers_after(p, oc, og, what, 0);
}

/* Random host gradients for L: every dense gradient the layer has, and R
 * distinct ascending expert rows (sparse [cap, d], or dense [N, d]). */
typedef struct host_grads {
  peer_grads g;
  size_t n[5];
} host_grads;

static host_grads random_grads(peer_layer *L, ref_rng *rng, int64_t R, int64_t cap, int dense) {
  const peer_config *c = peer_layer_config(L);
  const int64_t d = c->d_model, N = c->n_subkeys * c->n_subkeys;
  const char *names[5] = {"query.weight", "query.bias", "query.norm.weight", "query.norm.bias",
                          "keys"};
  host_grads h;
  memset(&h, 0, sizeof h);
  float **f[5] = {&h.g.query_weight, &h.g.query_bias, &h.g.norm_weight, &h.g.norm_bias,
                  &h.g.keys};
  for (int i = 0; i < 5; i++) {
    h.n[i] = param_floats(L, names[i]);
    if (!h.n[i]) continue;
    *f[i] = malloc(h.n[i] * 4);
    for (size_t j = 0; j < h.n[i]; j++) (*f[i])[j] = (float)ref_uniform(rng, -1.0, 1.0);
  }
  int64_t *rows = malloc((size_t)cap * 8), r = 0;
  for (int64_t id = 0; id < N && r < R; id++) /* R of N, ascending */
    if (ref_uniform(rng, 0.0, 1.0) * (double)(N - id) < (double)(R - r)) rows[r++] = id;
  const size_t nrows = dense ? (size_t)N : (size_t)cap;
  float *down = calloc(nrows * (size_t)d, 4), *up = calloc(nrows * (size_t)d, 4);
  for (int64_t j = 0; j < r; j++) {
    const size_t at = (size_t)(dense ? rows[j] : j) * (size_t)d;
    for (int64_t i = 0; i < d; i++) {
      down[at + (size_t)i] = (float)ref_uniform(rng, -1.0, 1.0);
      up[at + (size_t)i] = (float)ref_uniform(rng, -1.0, 1.0);
    }
  }
  h.g.experts_dense = dense, h.g.expert_capacity = cap, h.g.expert_rows = rows;
  h.g.experts_down = down, h.g.experts_up = up, h.g.n_expert_rows = r;
  return h;
}

static void host_grads_free(host_grads *h) {
  free(h->g.query_weight), free(h->g.query_bias), free(h->g.norm_weight), free(h->g.norm_bias);
  free(h->g.keys), free(h->g.expert_rows), free(h->g.experts_down), free(h->g.experts_up);
}

/* Device copies of h's buffers (the same layout), as peer_cuda_backward's. */
static peer_grads device_grads(const peer_layer *L, const host_grads *h, int experts) {
  const peer_config *c = peer_layer_config(L);
  const size_t d = (size_t)c->d_model, N = (size_t)(c->n_subkeys * c->n_subkeys);
  const size_t rows = h->g.experts_dense ? N : (size_t)h->g.expert_capacity;
  peer_grads g = h->g;
  const float *src[5] = {h->g.query_weight, h->g.query_bias, h->g.norm_weight, h->g.norm_bias,
                         h->g.keys};
  float **dst[5] = {&g.query_weight, &g.query_bias, &g.norm_weight, &g.norm_bias, &g.keys};
  for (int i = 0; i < 5; i++) *dst[i] = src[i] ? dev_copy_of(src[i], h->n[i] * 4) : NULL;
  if (!experts) {
    g.expert_rows = NULL, g.experts_down = g.experts_up = NULL;
    return g;
  }
  g.expert_rows = dev_copy_of(h->g.expert_rows, (size_t)h->g.expert_capacity * 8);
  g.experts_down = dev_copy_of(h->g.experts_down, rows * d * 4);
  g.experts_up = dev_copy_of(h->g.experts_up, rows * d * 4);
  return g;
}

static void device_grads_free(peer_grads *g) {
  cudaFree(g->query_weight), cudaFree(g->query_bias), cudaFree(g->norm_weight);
  cudaFree(g->norm_bias), cudaFree(g->keys), cudaFree(g->expert_rows);
  cudaFree(g->experts_down), cudaFree(g->experts_up);
}

/* Steps of a CPU optimizer on the CPU layer and of a CUDA one on the CUDA
 * layer with the same gradients: odd steps through peer_cuda_optimizer_step
 * (device gradients, the row count on the device, a stream of ours), even
 * ones through peer_optimizer_step (host gradients, staged); the last step
 * takes no expert gradients (dense parameters only). */
static void check_optimizer(const char *config, peer_optim_config oc_cfg, int dense_experts) {
  uint64_t seed = ref_test_seed();
  ref_rng rng = {seed};
  pair p = make_pair(config);
  cr_assert_eq(peer_layer_init(p.cpu, seed % 1000), PEER_OK);
  copy_params(&p);
  char what[256];
  snprintf(what, sizeof what, "[optimizer %s kind %d expert_kind %d dense %d seed=%llu]", config,
           (int)oc_cfg.kind, (int)oc_cfg.expert_kind, dense_experts, (unsigned long long)seed);
  peer_optimizer *oc, *og;
  cr_assert_eq(peer_optimizer_create(&oc, p.cpu, &oc_cfg), PEER_OK, "%s", peer_last_error());
  cr_assert_eq(peer_optimizer_create(&og, p.gpu, &oc_cfg), PEER_OK, "%s %s", what,
               peer_last_error());
  cudaStream_t st;
  cr_assert_eq(cudaStreamCreateWithFlags(&st, cudaStreamNonBlocking), cudaSuccess);
  const int steps = 5;
  const int64_t cap = 40;
  for (int s = 0; s < steps; s++) {
    host_grads h = random_grads(p.cpu, &rng, s == 2 ? cap : 7 + 5 * s, cap, dense_experts);
    const int experts = s < steps - 1;
    peer_grads hg = h.g;
    if (!experts) hg.experts_down = hg.experts_up = NULL, hg.expert_rows = NULL;
    cr_assert_eq(peer_optimizer_step(oc, &hg), PEER_OK, "%s %s", what, peer_last_error());
    if (s % 2 == 1) {
      peer_grads d = device_grads(p.gpu, &h, experts);
      int64_t *d_n = dev_copy_of(&h.g.n_expert_rows, 8);
      cr_assert_eq(cudaDeviceSynchronize(), cudaSuccess); /* the legacy-stream copies */
      cr_assert_eq(peer_cuda_optimizer_step(og, &d, d_n, st), PEER_OK, "%s step %d: %s", what, s,
                   peer_last_error());
      cr_assert_eq(cudaStreamSynchronize(st), cudaSuccess);
      device_grads_free(&d);
      cudaFree(d_n);
    } else {
      cr_assert_eq(peer_optimizer_step(og, &hg), PEER_OK, "%s step %d: %s", what, s,
                   peer_last_error());
    }
    host_grads_free(&h);
    compare_optimizers(&p, oc, og, what);
  }
  cudaStreamDestroy(st);
  peer_optimizer_free(oc);
  peer_optimizer_free(og);
  free_pair(&p);
}

static peer_optim_config optim_cfg(peer_optim_kind kind, peer_optim_kind expert_kind,
                                   float momentum, float decay) {
  peer_optim_config c = peer_optim_config_default();
  c.kind = kind, c.expert_kind = expert_kind, c.momentum = momentum, c.weight_decay = decay;
  c.lr = 0.05f, c.expert_lr = 0.2f;
  return c;
}

#define OPTIM_LAYER "d_model=24,n_heads=2,d_key=8,n_subkeys=16,top_k=4"
Test(cuda_optim, adamw_matches_cpu) {
  check_optimizer(OPTIM_LAYER ",query_norm=batchnorm,query_bias=1",
                  optim_cfg(PEER_OPTIM_ADAM, PEER_OPTIM_ADAM, 0.0f, 0.1f), 0);
}
Test(cuda_optim, sgd_momentum_sparse_sgd_matches_cpu) {
  check_optimizer(OPTIM_LAYER ",shared_keys=1",
                  optim_cfg(PEER_OPTIM_SGD, PEER_OPTIM_SGD, 0.9f, 0.01f), 0);
}
Test(cuda_optim, adam_dense_expert_rows_matches_cpu) {
  check_optimizer(OPTIM_LAYER, optim_cfg(PEER_OPTIM_ADAM, PEER_OPTIM_ADAM, 0.0f, 0.0f), 1);
}
Test(cuda_optim, bf16_tables_sgd_then_adam_rows) {
  check_optimizer(OPTIM_LAYER ",weight_dtype=bf16",
                  optim_cfg(PEER_OPTIM_SGD, PEER_OPTIM_ADAM, 0.5f, 0.0f), 0);
  check_optimizer(OPTIM_LAYER ",weight_dtype=bf16,query_bias=1",
                  optim_cfg(PEER_OPTIM_ADAM, PEER_OPTIM_SGD, 0.0f, 0.0f), 1);
}

/* The device step's argument checks: the layer must be on the device, a
 * gradient the layer lacks and an incomplete expert triple are refused
 * before anything is queued (the step count stays). */
Test(cuda_optim, device_step_arguments) {
  pair p = make_pair(OPTIM_LAYER);
  peer_optim_config c = optim_cfg(PEER_OPTIM_ADAM, PEER_OPTIM_ADAM, 0.0f, 0.0f);
  peer_optimizer *oc, *og;
  cr_assert_eq(peer_optimizer_create(&oc, p.cpu, &c), PEER_OK);
  cr_assert_eq(peer_optimizer_create(&og, p.gpu, &c), PEER_OK, "%s", peer_last_error());
  peer_grads none = {0};
  cr_assert_eq(peer_cuda_optimizer_step(oc, &none, NULL, 0), PEER_ERR_INVALID_ARGUMENT);
  cr_assert_eq(peer_cuda_optimizer_step(og, NULL, NULL, 0), PEER_ERR_INVALID_ARGUMENT);
  float *g = dev_alloc(64);
  peer_grads bias = {0};
  bias.query_bias = g;
  cr_assert_eq(peer_cuda_optimizer_step(og, &bias, NULL, 0), PEER_ERR_INVALID_ARGUMENT);
  cr_assert(strstr(peer_last_error(), "query_bias"), "%s", peer_last_error());
  peer_grads half = {0};
  half.experts_down = g;
  cr_assert_eq(peer_cuda_optimizer_step(og, &half, NULL, 0), PEER_ERR_INVALID_ARGUMENT);
  cr_assert_eq(peer_optimizer_step_count(og), 0);
  cr_assert_eq(peer_cuda_optimizer_step(og, &none, NULL, 0), PEER_OK, "%s", peer_last_error());
  cr_assert_eq(peer_optimizer_step_count(og), 1);
  cudaFree(g);
  peer_optimizer_free(oc);
  peer_optimizer_free(og);
  free_pair(&p);
}

/* Every parameter of L and state of o (a CUDA layer), downloaded into one
 * host buffer (for bitwise before/after comparisons). */
static char *snapshot(peer_layer *L, peer_optimizer *o, size_t *n) {
  size_t total = 0, at = 0;
  peer_tensor t;
  for (int i = 0; i < peer_layer_n_params(L); i++)
    total += (peer_layer_param(L, i, &t), t.nbytes);
  for (int i = 0; i < peer_optimizer_n_states(o); i++)
    total += (peer_optimizer_state(o, i, &t), t.nbytes);
  char *b = malloc(total);
  for (int i = 0; i < peer_layer_n_params(L); i++, at += t.nbytes)
    peer_layer_param(L, i, &t), to_host(b + at, t.data, t.nbytes);
  for (int i = 0; i < peer_optimizer_n_states(o); i++, at += t.nbytes)
    peer_optimizer_state(o, i, &t), to_host(b + at, t.data, t.nbytes);
  *n = total;
  return b;
}

/* The device step's gradients never reach the host, so the device checks
 * them: a step whose gradients hold NaN or infinity (a dense one, then an
 * expert row) writes no parameter and no state, peer_cuda_check names the
 * gradient (once: the record is cleared), and the next step is applied as
 * the CPU optimizer applies it (SGD with momentum: the skipped step's count,
 * which the device step cannot take back, does not enter the update). */
Test(cuda_optim, device_step_refuses_nonfinite_gradients) {
  uint64_t seed = ref_test_seed();
  ref_rng rng = {seed};
  pair p = make_pair(OPTIM_LAYER);
  cr_assert_eq(peer_layer_init(p.cpu, seed % 1000), PEER_OK);
  copy_params(&p);
  peer_optim_config c = optim_cfg(PEER_OPTIM_SGD, PEER_OPTIM_SGD, 0.9f, 0.0f);
  peer_optimizer *oc, *og;
  cr_assert_eq(peer_optimizer_create(&oc, p.cpu, &c), PEER_OK);
  cr_assert_eq(peer_optimizer_create(&og, p.gpu, &c), PEER_OK, "%s", peer_last_error());
  const int64_t cap = 12, d = peer_layer_config(p.gpu)->d_model;
  for (int round = 0; round < 3; round++) {
    host_grads h = random_grads(p.cpu, &rng, 5, cap, 0);
    if (round == 1) h.g.keys[7] = NAN;
    if (round == 2) h.g.experts_up[3 * d + 5] = -INFINITY; /* row 3 of the list */
    peer_grads dg = device_grads(p.gpu, &h, 1);
    size_t n0, n1;
    char *before = snapshot(p.gpu, og, &n0);
    cr_assert_eq(cudaDeviceSynchronize(), cudaSuccess);
    cr_assert_eq(peer_cuda_optimizer_step(og, &dg, NULL, 0), PEER_OK, "%s", peer_last_error());
    cr_assert_eq(cudaDeviceSynchronize(), cudaSuccess);
    char *after = snapshot(p.gpu, og, &n1);
    peer_status chk = peer_cuda_check(p.gpu, 0);
    if (round == 0) {
      cr_assert_eq(chk, PEER_OK, "%s", peer_last_error());
      cr_assert(memcmp(before, after, n0) != 0, "a finite step changed nothing");
    } else {
      cr_assert_eq(chk, PEER_ERR_NONFINITE, "round %d: check gave %d", round, (int)chk);
      const char *want = round == 1 ? "grads.keys element 7 " : "grads.experts_up of expert";
      cr_assert(strstr(peer_last_error(), want), "\"%s\" lacks \"%s\"", peer_last_error(), want);
      if (round == 2) {
        char id[64];
        snprintf(id, sizeof id, "expert %lld, element 5 ", (long long)h.g.expert_rows[3]);
        cr_assert(strstr(peer_last_error(), id), "\"%s\" lacks \"%s\"", peer_last_error(), id);
      }
      cr_assert(n0 == n1 && memcmp(before, after, n0) == 0,
                "round %d: a refused step wrote parameters or state", round);
      cr_assert_eq(peer_cuda_check(p.gpu, 0), PEER_OK, "the record was not cleared");
    }
    free(before), free(after);
    device_grads_free(&dg);
    if (round == 0) cr_assert_eq(peer_optimizer_step(oc, &h.g), PEER_OK);
    host_grads_free(&h);
  }
  /* One more good step on both: the same parameters and state as the CPU
   * optimizer that never saw the refused steps. */
  host_grads h = random_grads(p.cpu, &rng, 5, cap, 0);
  peer_grads dg = device_grads(p.gpu, &h, 1);
  cr_assert_eq(cudaDeviceSynchronize(), cudaSuccess);
  cr_assert_eq(peer_cuda_optimizer_step(og, &dg, NULL, 0), PEER_OK, "%s", peer_last_error());
  cr_assert_eq(peer_optimizer_step(oc, &h.g), PEER_OK);
  cr_assert_eq(peer_cuda_check(p.gpu, 0), PEER_OK, "%s", peer_last_error());
  compare_optimizers_after(&p, oc, og, "[after two refused device steps]", 2);
  device_grads_free(&dg);
  host_grads_free(&h);
  peer_optimizer_free(oc);
  peer_optimizer_free(og);
  free_pair(&p);
}

/* ------------------------------------------- saving and loading CUDA layers */

static char *read_whole(const char *path, size_t *n) {
  FILE *f = fopen(path, "rb");
  cr_assert(f, "open %s", path);
  fseek(f, 0, SEEK_END);
  *n = (size_t)ftell(f);
  fseek(f, 0, SEEK_SET);
  char *b = malloc(*n + 1);
  cr_assert_eq(fread(b, 1, *n, f), *n);
  fclose(f);
  return b;
}

static void same_file(const char *a, const char *b, const char *what) {
  size_t na, nb;
  char *x = read_whole(a, &na), *y = read_whole(b, &nb);
  cr_assert(na == nb && memcmp(x, y, na) == 0, "%s: %s and %s differ", what, a, b);
  free(x), free(y);
}

static void io_dir(char *dir, size_t n) {
  snprintf(dir, n, "/tmp/peer_test_cuda_io.XXXXXX");
  cr_assert(mkdtemp(dir), "mkdtemp");
}

static void rm_dir(const char *dir, const char *const *names, int n) {
  char p[512];
  for (int i = 0; i < n; i++) {
    snprintf(p, sizeof p, "%s/%s", dir, names[i]);
    remove(p);
  }
  remove(dir);
}

/* Every parameter of a against b's, byte for byte; a_dev, b_dev: which is a
 * CUDA layer. */
static void same_params(peer_layer *a, int a_dev, peer_layer *b, int b_dev, const char *what) {
  cr_assert_eq(peer_layer_n_params(a), peer_layer_n_params(b));
  for (int i = 0; i < peer_layer_n_params(a); i++) {
    peer_tensor ta, tb;
    cr_assert_eq(peer_layer_param(a, i, &ta), PEER_OK);
    cr_assert_eq(peer_layer_param(b, i, &tb), PEER_OK);
    cr_assert_eq(ta.nbytes, tb.nbytes);
    char *ha = malloc(ta.nbytes), *hb = malloc(tb.nbytes);
    if (a_dev) to_host(ha, ta.data, ta.nbytes);
    else memcpy(ha, ta.data, ta.nbytes);
    if (b_dev) to_host(hb, tb.data, tb.nbytes);
    else memcpy(hb, tb.data, tb.nbytes);
    cr_assert(memcmp(ha, hb, ta.nbytes) == 0, "%s: %s differs", what, ta.name);
    free(ha), free(hb);
  }
}

/* A CUDA layer's weight file is the CPU layer's, byte for byte, and loads
 * into either backend with the same parameters. */
static void check_layer_files(const char *config) {
  pair p = make_pair(config);
  cr_assert_eq(peer_layer_init(p.cpu, 21), PEER_OK);
  copy_params(&p);
  char dir[64], a[128], b[128];
  io_dir(dir, sizeof dir);
  snprintf(a, sizeof a, "%s/gpu.safetensors", dir);
  snprintf(b, sizeof b, "%s/cpu.safetensors", dir);
  cr_assert_eq(peer_layer_save(p.gpu, a), PEER_OK, "%s: %s", config, peer_last_error());
  cr_assert_eq(peer_layer_save(p.cpu, b), PEER_OK, "%s", peer_last_error());
  same_file(a, b, config);
  peer_layer *c = NULL, *g = NULL;
  cr_assert_eq(peer_layer_load(&c, a, NULL), PEER_OK, "%s", peer_last_error());
  same_params(c, 0, p.cpu, 0, "CUDA save, CPU load");
  peer_options o;
  peer_options_default(&o);
  o.backend = PEER_BACKEND_CUDA;
  cr_assert_eq(peer_layer_load(&g, b, &o), PEER_OK, "%s: %s", config, peer_last_error());
  same_params(g, 1, p.cpu, 0, "CPU save, CUDA load");
  peer_layer_free(c), peer_layer_free(g);
  const char *names[] = {"gpu.safetensors", "cpu.safetensors"};
  rm_dir(dir, names, 2);
  free_pair(&p);
}

Test(cuda_io, layer_save_and_load_across_backends) {
  check_layer_files(OPTIM_LAYER);
  check_layer_files(OPTIM_LAYER ",weight_dtype=bf16,query_norm=batchnorm,query_bias=1");
}

/* Steps with the same random gradients on a CUDA and a CPU optimizer (host
 * path on even steps, device path on odd ones, as check_optimizer). */
static void step_both(pair *p, peer_optimizer *oc, peer_optimizer *og, ref_rng *rng, int steps,
                      const char *what) {
  for (int s = 0; s < steps; s++) {
    host_grads h = random_grads(p->cpu, rng, 5 + 3 * s, 32, 0);
    cr_assert_eq(peer_optimizer_step(oc, &h.g), PEER_OK, "%s %s", what, peer_last_error());
    if (s % 2) {
      peer_grads d = device_grads(p->gpu, &h, 1);
      cr_assert_eq(cudaDeviceSynchronize(), cudaSuccess);
      cr_assert_eq(peer_cuda_optimizer_step(og, &d, NULL, 0), PEER_OK, "%s %s", what,
                   peer_last_error());
      cr_assert_eq(cudaDeviceSynchronize(), cudaSuccess);
      device_grads_free(&d);
    } else {
      cr_assert_eq(peer_optimizer_step(og, &h.g), PEER_OK, "%s %s", what, peer_last_error());
    }
    host_grads_free(&h);
  }
}

/* Checkpoints of a CUDA layer: the file equals the CPU's (same weights,
 * state and step); loading it into a fresh CUDA layer and optimizer, or into
 * a CPU pair, and training on gives the same bits as the run that never
 * stopped; a checkpoint of another config is refused and changes nothing. */
Test(cuda_io, checkpoint_round_trip_and_training_continues) {
  const char *config = OPTIM_LAYER ",query_norm=batchnorm,query_bias=1";
  uint64_t seed = ref_test_seed();
  pair p = make_pair(config);
  cr_assert_eq(peer_layer_init(p.cpu, 31), PEER_OK);
  copy_params(&p);
  peer_optim_config c = optim_cfg(PEER_OPTIM_ADAM, PEER_OPTIM_ADAM, 0.0f, 0.1f);
  peer_optimizer *oc, *og;
  cr_assert_eq(peer_optimizer_create(&oc, p.cpu, &c), PEER_OK);
  cr_assert_eq(peer_optimizer_create(&og, p.gpu, &c), PEER_OK, "%s", peer_last_error());
  char what[128];
  snprintf(what, sizeof what, "[checkpoint seed=%llu]", (unsigned long long)seed);
  ref_rng rng = {seed};
  step_both(&p, oc, og, &rng, 3, what);
  char dir[64], a[128], b[128];
  io_dir(dir, sizeof dir);
  snprintf(a, sizeof a, "%s/gpu.ckpt", dir);
  snprintf(b, sizeof b, "%s/cpu.ckpt", dir);
  cr_assert_eq(peer_checkpoint_save(p.gpu, og, a), PEER_OK, "%s", peer_last_error());
  cr_assert_eq(peer_checkpoint_save(p.cpu, oc, b), PEER_OK, "%s", peer_last_error());
  same_file(a, b, what);

  /* a fresh pair loads the CUDA checkpoint (the CPU layer too: files cross) */
  pair q = make_pair(config);
  cr_assert_eq(peer_layer_init(q.gpu, 99), PEER_OK);
  peer_optimizer *qc, *qg;
  cr_assert_eq(peer_optimizer_create(&qc, q.cpu, &c), PEER_OK);
  cr_assert_eq(peer_optimizer_create(&qg, q.gpu, &c), PEER_OK);
  cr_assert_eq(peer_checkpoint_load(q.gpu, qg, a), PEER_OK, "%s", peer_last_error());
  cr_assert_eq(peer_checkpoint_load(q.cpu, qc, a), PEER_OK, "%s", peer_last_error());
  cr_assert_eq(peer_optimizer_step_count(qg), 3);
  compare_optimizers(&q, qc, qg, what);
    same_params(q.gpu, 1, p.gpu, 1, "loaded checkpoint");

  /* training on: the interrupted run and the resumed one agree bit for bit */
  ref_rng r1 = rng, r2 = rng;
  step_both(&p, oc, og, &r1, 3, what);
  step_both(&q, qc, qg, &r2, 3, what);
  same_params(q.gpu, 1, p.gpu, 1, "resumed training");
  compare_optimizers(&q, qc, qg, what);
  for (int i = 0; i < peer_optimizer_n_states(og); i++) {
    peer_tensor x, y;
    cr_assert_eq(peer_optimizer_state(og, i, &x), PEER_OK);
    cr_assert_eq(peer_optimizer_state(qg, i, &y), PEER_OK);
    char *hx = malloc(x.nbytes), *hy = malloc(y.nbytes);
    to_host(hx, x.data, x.nbytes), to_host(hy, y.data, y.nbytes);
    cr_assert(memcmp(hx, hy, x.nbytes) == 0, "%s resumed state %s differs", what, x.name);
    free(hx), free(hy);
  }

  /* refusals: another config, another optimizer kind; nothing changes */
  pair other = make_pair(OPTIM_LAYER);
  char o_path[128];
  snprintf(o_path, sizeof o_path, "%s/other.ckpt", dir);
  cr_assert_eq(peer_checkpoint_save(other.gpu, NULL, o_path), PEER_OK, "%s", peer_last_error());
  cr_assert_eq(peer_checkpoint_load(q.gpu, qg, o_path), PEER_ERR_FORMAT);
  peer_optim_config sgd = optim_cfg(PEER_OPTIM_SGD, PEER_OPTIM_SGD, 0.9f, 0.0f);
  peer_optimizer *os;
  cr_assert_eq(peer_optimizer_create(&os, q.gpu, &sgd), PEER_OK);
  cr_assert_eq(peer_checkpoint_load(q.gpu, os, a), PEER_ERR_FORMAT);
  same_params(q.gpu, 1, p.gpu, 1, "after refused loads");
  cr_assert_eq(peer_optimizer_step_count(qg), 6);
  /* the atomic writer's refusal: a missing directory, no file left */
  char bad[160];
  snprintf(bad, sizeof bad, "%s/missing/x.ckpt", dir);
  cr_assert_neq(peer_checkpoint_save(q.gpu, qg, bad), PEER_OK);
  cr_assert_neq(access(bad, F_OK), 0);

  peer_optimizer_free(os);
  peer_optimizer_free(oc), peer_optimizer_free(og);
  peer_optimizer_free(qc), peer_optimizer_free(qg);
  const char *names[] = {"gpu.ckpt", "cpu.ckpt", "other.ckpt"};
  rm_dir(dir, names, 3);
  free_pair(&p), free_pair(&q), free_pair(&other);
}

/* One forward on device pointers on `st`, x first written on st itself by
 * a copy from src (work the layer's own stream must wait for), y and gates
 * NaN and ids 0 before it (so outputs not written, or written from another
 * batch's retrieval, differ); the results into y, ids, g on the host. */
static void forward_on(const pair *p, int64_t T, const float *src, float *d_x, float *d_y,
                       int64_t *d_ids, float *d_g, cudaStream_t st, float *y, int64_t *ids,
                       float *g) {
  peer_layer *L = p->gpu;
  const size_t xb = (size_t)(T * p->cfg.d_model) * 4,
               e = (size_t)(T * p->cfg.n_heads * p->cfg.top_k);
  cr_assert_eq(cudaMemcpyAsync(d_x, src, xb, cudaMemcpyDeviceToDevice, st), cudaSuccess);
  cr_assert_eq(cudaMemsetAsync(d_y, 0xff, xb, st), cudaSuccess);
  cr_assert_eq(cudaMemsetAsync(d_g, 0xff, e * 4, st), cudaSuccess);
  cr_assert_eq(cudaMemsetAsync(d_ids, 0, e * 8, st), cudaSuccess);
  cr_assert_eq(peer_cuda_forward(L, T, d_x, d_y, d_ids, d_g, st), PEER_OK, "%s",
               peer_last_error());
  cr_assert_eq(cudaMemcpyAsync(y, d_y, xb, cudaMemcpyDeviceToHost, st), cudaSuccess);
  cr_assert_eq(cudaMemcpyAsync(ids, d_ids, e * 8, cudaMemcpyDeviceToHost, st), cudaSuccess);
  cr_assert_eq(cudaMemcpyAsync(g, d_g, e * 4, cudaMemcpyDeviceToHost, st), cudaSuccess);
  cr_assert_eq(cudaStreamSynchronize(st), cudaSuccess);
  cr_assert_eq(peer_cuda_check(L, st), PEER_OK, "%s", peer_last_error());
}

/* The chunked forward (peer_cuda_set_chunks) gives the bits of one chunk:
 * y, ids and gates, for chunk counts that do not divide T (and more chunks
 * than tokens), batches alternating between two inputs (a chunk that read
 * another batch's ids or gates would differ), device and host paths.  The
 * emulator runs it twice more with lazy streams (peer_emu.h): mode 1 runs
 * the layer's retrieval stream only when the caller's stream waits for it
 * (a missing wait before a chunk's experts reads stale ids), mode 2 runs it
 * before the caller's earlier work (a missing wait at the fork reads the
 * previous x). */
Test(cuda, chunked_forward_matches_one_chunk) {
  pair p = make_pair(SMALL ",query_norm=batchnorm,query_bias=1,activation=silu");
  cr_assert_eq(peer_layer_init(p.gpu, 41), PEER_OK, "%s", peer_last_error());
  const int64_t T = 37, d = p.cfg.d_model, e = T * p.cfg.n_heads * p.cfg.top_k;
  const size_t xb = (size_t)(T * d) * 4;
  ref_rng rng = {42};
  float *hx[2] = {ref_random_x(&rng, T, d), ref_random_x(&rng, T, d)};
  float *src[2] = {dev_copy_of(hx[0], xb), dev_copy_of(hx[1], xb)};
  float *d_x = dev_alloc(xb), *d_y = dev_alloc(xb), *d_g = dev_alloc((size_t)e * 4);
  int64_t *d_ids = dev_alloc((size_t)e * 8);
  float *ry[2], *rg[2], *y = malloc(xb), *g = malloc((size_t)e * 4);
  int64_t *rid[2], *ids = malloc((size_t)e * 8);
  cudaStream_t st;
  cr_assert_eq(cudaStreamCreateWithFlags(&st, cudaStreamNonBlocking), cudaSuccess);
  cr_assert_eq(peer_cuda_set_chunks(p.gpu, 1), PEER_OK, "%s", peer_last_error());
  for (int i = 0; i < 2; i++) {
    ry[i] = malloc(xb), rg[i] = malloc((size_t)e * 4), rid[i] = malloc((size_t)e * 8);
    forward_on(&p, T, src[i], d_x, d_y, d_ids, d_g, st, ry[i], rid[i], rg[i]);
  }
  int modes = 1;
#ifdef PEER_CUDA_EMULATED
  modes = 3;
#endif
  const int counts[] = {2, 3, 5, 16, 0};
  for (int mode = 0; mode < modes; mode++) {
#ifdef PEER_CUDA_EMULATED
    peer_emu_lazy_streams(mode);
#endif
    for (size_t c = 0; c < sizeof counts / sizeof counts[0]; c++) {
      cr_assert_eq(peer_cuda_set_chunks(p.gpu, counts[c]), PEER_OK, "%s", peer_last_error());
      for (int i = 0; i < 2; i++) {
        forward_on(&p, T, src[i], d_x, d_y, d_ids, d_g, st, y, ids, g);
        cr_assert(!memcmp(y, ry[i], xb), "lazy mode %d, %d chunks, input %d: y differs", mode,
                  counts[c], i);
        cr_assert(!memcmp(ids, rid[i], (size_t)e * 8), "mode %d, %d chunks: ids differ", mode,
                  counts[c]);
        cr_assert(!memcmp(g, rg[i], (size_t)e * 4), "mode %d, %d chunks: gates differ", mode,
                  counts[c]);
        /* the host path, on the layer's own stream */
        cr_assert_eq(peer_forward(p.gpu, T, hx[i], y, ids, g), PEER_OK, "%s", peer_last_error());
        cr_assert(!memcmp(y, ry[i], xb), "mode %d, %d chunks, host path: y differs", mode,
                  counts[c]);
        cr_assert(!memcmp(ids, rid[i], (size_t)e * 8), "host path: ids differ");
      }
    }
  }
#ifdef PEER_CUDA_EMULATED
  peer_emu_lazy_streams(0);
#endif
  /* a batch with fewer tokens than chunks */
  cr_assert_eq(peer_cuda_set_chunks(p.gpu, 16), PEER_OK);
  forward_on(&p, 3, src[0], d_x, d_y, d_ids, d_g, st, y, ids, g);
  cr_assert(!memcmp(y, ry[0], (size_t)(3 * d) * 4), "3 tokens in 16 chunks: y differs");
  cr_assert_eq(peer_cuda_set_chunks(p.gpu, -1), PEER_ERR_INVALID_ARGUMENT);
  cr_assert_eq(peer_cuda_set_chunks(p.gpu, PEER_CUDA_MAX_CHUNKS + 1), PEER_ERR_INVALID_ARGUMENT);
  cr_assert(strstr(peer_last_error(), "17 chunks"), "%s", peer_last_error());
  cr_assert_eq(peer_cuda_set_chunks(p.cpu, 2), PEER_ERR_INVALID_ARGUMENT);
  cr_assert_eq(peer_cuda_set_chunks(NULL, 2), PEER_ERR_INVALID_ARGUMENT);
  cudaStreamDestroy(st);
  for (int i = 0; i < 2; i++) {
    free(hx[i]), free(ry[i]), free(rg[i]), free(rid[i]);
    cudaFree(src[i]);
  }
  cudaFree(d_x), cudaFree(d_y), cudaFree(d_g), cudaFree(d_ids);
  free(y), free(g), free(ids);
  free_pair(&p);
}

/* Sorted runs of no items still write the run count (0) and the closing
 * start, which the gradient kernels read. */
Test(cuda, sorted_runs_of_nothing_are_written) {
  uint32_t *d = dev_alloc(256), h[2];
  cr_assert_eq(cudaMemset(d, 0xff, 256), cudaSuccess);
  cr_assert_eq(peer_k_sorted_runs(d, d, d, d, d + 8, d + 16, 0, 1, d + 32, 64, 0), PEER_OK, "%s",
               peer_last_error());
  to_host(&h[0], d + 16, 4);
  to_host(&h[1], d + 8, 4);
  cr_assert_eq(h[0], 0u, "runs %u", h[0]);
  cr_assert_eq(h[1], 0u, "starts[0] %u", h[1]);
  cudaFree(d);
}

#ifndef PEER_CUDA_EMULATED
/* ------------------------------------------------------- CUDA graphs */

/* The hot path captured into a CUDA graph (issue 13 item 7): after a warm-up
 * step (scratch sized, momentum made), a training step (forward_train,
 * backward, an SGD-with-momentum optimizer step) and a forward are captured
 * on a stream of ours; each launch of the graphs gives the bits of the same
 * calls made directly on a twin layer, step after step, and a forward graph
 * reads the inputs its buffers hold at launch.  (A captured Adam step would
 * replay its capture's bias corrections: peer_cuda.h.)  Real GPUs only: the
 * emulator records no graphs; tools/gpu-check runs it. */
Test(cuda_graph, captured_steps_replay_as_direct_calls) {
  const char *cfg = SMALL ",query_norm=batchnorm,query_bias=1";
  pair p = make_pair(cfg), q = make_pair(cfg);
  cr_assert_eq(peer_layer_init(p.cpu, 31), PEER_OK, "%s", peer_last_error());
  cr_assert_eq(peer_layer_init(q.cpu, 31), PEER_OK, "%s", peer_last_error());
  copy_params(&p), copy_params(&q);
  const int64_t T = 24, d = p.cfg.d_model;
  const size_t xb = (size_t)(T * d) * 4;
  ref_rng rng = {32};
  float *x = ref_random_x(&rng, T, d), *dy = ref_random_x(&rng, T, d);
  float *x2 = ref_random_x(&rng, T, d);
  dev_step sp = dev_step_new(p.gpu, T, x, dy), sq = dev_step_new(q.gpu, T, x, dy);
  peer_optim_config c = optim_cfg(PEER_OPTIM_SGD, PEER_OPTIM_SGD, 0.9f, 0.0f);
  peer_optimizer *op, *oq;
  cr_assert_eq(peer_optimizer_create(&op, p.gpu, &c), PEER_OK, "%s", peer_last_error());
  cr_assert_eq(peer_optimizer_create(&oq, q.gpu, &c), PEER_OK, "%s", peer_last_error());
  peer_context *cp, *cq;
  cr_assert_eq(peer_context_create(&cp, p.gpu, T), PEER_OK, "%s", peer_last_error());
  cr_assert_eq(peer_context_create(&cq, q.gpu, T), PEER_OK, "%s", peer_last_error());
  cudaStream_t st;
  cr_assert_eq(cudaStreamCreateWithFlags(&st, cudaStreamNonBlocking), cudaSuccess);
  cr_assert_eq(peer_cuda_set_chunks(p.gpu, 2), PEER_OK); /* the forward's second stream too */
  cr_assert_eq(peer_cuda_set_chunks(q.gpu, 2), PEER_OK);
  cr_assert_eq(cudaDeviceSynchronize(), cudaSuccess);
  struct {
    peer_layer *L;
    peer_context *ctx;
    dev_step *s;
    peer_optimizer *o;
  } twin[2] = {{p.gpu, cp, &sp, op}, {q.gpu, cq, &sq, oq}};
  for (int i = 0; i < 2; i++) { /* the warm-up, direct */
    cr_assert_eq(peer_cuda_forward(twin[i].L, T, twin[i].s->x, twin[i].s->y, NULL, NULL, st),
                 PEER_OK, "%s", peer_last_error());
    cr_assert_eq(peer_cuda_forward_train(twin[i].L, twin[i].ctx, T, twin[i].s->x, twin[i].s->y, st),
                 PEER_OK, "%s", peer_last_error());
    cr_assert_eq(peer_cuda_backward(twin[i].L, twin[i].ctx, twin[i].s->dy, twin[i].s->dx,
                                    &twin[i].s->g, twin[i].s->n_rows, st),
                 PEER_OK, "%s", peer_last_error());
    cr_assert_eq(peer_cuda_optimizer_step(twin[i].o, &twin[i].s->g, twin[i].s->n_rows, st),
                 PEER_OK, "%s", peer_last_error());
  }
  cr_assert_eq(cudaStreamSynchronize(st), cudaSuccess);

  cudaGraph_t g_step, g_fwd;
  cudaGraphExec_t e_step, e_fwd;
  cr_assert_eq(cudaStreamBeginCapture(st, cudaStreamCaptureModeThreadLocal), cudaSuccess);
  peer_status s1 = peer_cuda_forward_train(p.gpu, cp, T, sp.x, sp.y, st);
  peer_status s2 = peer_cuda_backward(p.gpu, cp, sp.dy, sp.dx, &sp.g, sp.n_rows, st);
  peer_status s3 = peer_cuda_optimizer_step(op, &sp.g, sp.n_rows, st);
  cudaError_t ce = cudaStreamEndCapture(st, &g_step);
  cr_assert_eq(s1, PEER_OK, "forward_train under capture: %s", peer_last_error());
  cr_assert_eq(s2, PEER_OK, "backward under capture: %s", peer_last_error());
  cr_assert_eq(s3, PEER_OK, "optimizer step under capture: %s", peer_last_error());
  cr_assert_eq(ce, cudaSuccess, "capture of the training step: %s", cudaGetErrorString(ce));
  cr_assert_eq(cudaGraphInstantiate(&e_step, g_step, 0), cudaSuccess);
  cr_assert_eq(cudaStreamBeginCapture(st, cudaStreamCaptureModeThreadLocal), cudaSuccess);
  s1 = peer_cuda_forward(p.gpu, T, sp.x, sp.y, NULL, NULL, st);
  ce = cudaStreamEndCapture(st, &g_fwd);
  cr_assert_eq(s1, PEER_OK, "forward under capture: %s", peer_last_error());
  cr_assert_eq(ce, cudaSuccess, "capture of the forward: %s", cudaGetErrorString(ce));
  cr_assert_eq(cudaGraphInstantiate(&e_fwd, g_fwd, 0), cudaSuccess);

  float *yp = malloc(xb), *yq = malloc(xb), *dxp = malloc(xb), *dxq = malloc(xb);
  for (int step = 0; step < 3; step++) {
    cr_assert_eq(cudaGraphLaunch(e_step, st), cudaSuccess);
    cr_assert_eq(peer_cuda_forward_train(q.gpu, cq, T, sq.x, sq.y, st), PEER_OK, "%s",
                 peer_last_error());
    cr_assert_eq(peer_cuda_backward(q.gpu, cq, sq.dy, sq.dx, &sq.g, sq.n_rows, st), PEER_OK, "%s",
                 peer_last_error());
    cr_assert_eq(peer_cuda_optimizer_step(oq, &sq.g, sq.n_rows, st), PEER_OK, "%s",
                 peer_last_error());
    cr_assert_eq(cudaStreamSynchronize(st), cudaSuccess);
    to_host(yp, sp.y, xb), to_host(yq, sq.y, xb), to_host(dxp, sp.dx, xb), to_host(dxq, sq.dx, xb);
    cr_expect(!memcmp(yp, yq, xb), "step %d: the graph's y differs from the direct call's", step);
    cr_expect(!memcmp(dxp, dxq, xb), "step %d: the graph's dx differs", step);
    same_params(p.gpu, 1, q.gpu, 1, "after a replayed training step");
  }
  /* the forward graph on new inputs in the same buffers */
  cr_assert_eq(cudaMemcpy(sp.x, x2, xb, cudaMemcpyHostToDevice), cudaSuccess);
  cr_assert_eq(cudaMemcpy(sq.x, x2, xb, cudaMemcpyHostToDevice), cudaSuccess);
  cr_assert_eq(cudaGraphLaunch(e_fwd, st), cudaSuccess);
  cr_assert_eq(peer_cuda_forward(q.gpu, T, sq.x, sq.y, NULL, NULL, st), PEER_OK, "%s",
               peer_last_error());
  cr_assert_eq(cudaStreamSynchronize(st), cudaSuccess);
  to_host(yp, sp.y, xb), to_host(yq, sq.y, xb);
  cr_expect(!memcmp(yp, yq, xb), "the forward graph's y on new inputs differs");
  cr_assert_eq(peer_cuda_check(p.gpu, st), PEER_OK, "%s", peer_last_error());
  cr_assert_eq(peer_cuda_check(q.gpu, st), PEER_OK, "%s", peer_last_error());
  cudaGraphExecDestroy(e_step), cudaGraphExecDestroy(e_fwd);
  cudaGraphDestroy(g_step), cudaGraphDestroy(g_fwd);
  cudaStreamDestroy(st);
  peer_context_free(cp), peer_context_free(cq);
  peer_optimizer_free(op), peer_optimizer_free(oq);
  dev_step_free(&sp), dev_step_free(&sq);
  free(x), free(x2), free(dy), free(yp), free(yq), free(dxp), free(dxq);
  free_pair(&p), free_pair(&q);
}
#endif

#ifdef PEER_CUDA_EMULATED
/* ------------------------------------------------- the emulator's own rules */

/* No device-wide stall on the hot path: after a first pass at T tokens, a
 * loop of peer_cuda_forward, peer_cuda_forward_train, peer_cuda_backward and
 * peer_cuda_optimizer_step on device pointers, at T and at a smaller batch,
 * makes no cudaDeviceSynchronize, stream synchronisation, cudaMalloc or
 * cudaFree (so it can be captured in a CUDA graph), and every cuBLAS product
 * runs on the layer's own workspace (cublasSetWorkspace after each
 * cublasSetStream). */
/* peer_cuda.h's device-pointer calls take the layer's one-call-at-a-time
 * flag as peer.h's do: while another call holds the layer, each is refused
 * with PEER_ERR_BUSY naming both calls, and queues nothing; after it, all
 * work. */
Test(cuda_api, device_calls_on_a_busy_layer_are_refused) {
  pair p = make_pair(SMALL);
  cr_assert_eq(peer_layer_init(p.gpu, 23), PEER_OK, "%s", peer_last_error());
  const int64_t T = 8, d = p.cfg.d_model;
  ref_rng rng = {24};
  float *x = ref_random_x(&rng, T, d), *dy = ref_random_x(&rng, T, d);
  dev_step s = dev_step_new(p.gpu, T, x, dy);
  peer_optim_config c = optim_cfg(PEER_OPTIM_SGD, PEER_OPTIM_SGD, 0.0f, 0.01f);
  peer_optimizer *o;
  cr_assert_eq(peer_optimizer_create(&o, p.gpu, &c), PEER_OK, "%s", peer_last_error());
  peer_context *ctx;
  cr_assert_eq(peer_context_create(&ctx, p.gpu, T), PEER_OK, "%s", peer_last_error());
  int64_t *ids = dev_alloc((size_t)(T * p.cfg.n_heads * p.cfg.top_k) * 8);
  cr_assert_eq(cudaDeviceSynchronize(), cudaSuccess);
  cr_assert_eq(peer_cuda_forward_train(p.gpu, ctx, T, s.x, s.y, 0), PEER_OK, "%s",
               peer_last_error());
  cr_assert_eq(peer_layer_enter(p.gpu, "forward"), PEER_OK); /* as another thread's call */
  const struct {
    const char *what;
    peer_status st;
  } calls[] = {
      {"cuda_forward", peer_cuda_forward(p.gpu, T, s.x, s.y, NULL, NULL, 0)},
      {"cuda_retrieve", peer_cuda_retrieve(p.gpu, T, s.x, ids, NULL, NULL, 0)},
      {"cuda_retrieve_brute", peer_cuda_retrieve_brute(p.gpu, T, s.x, ids, NULL, NULL, 0)},
      {"cuda_forward_train", peer_cuda_forward_train(p.gpu, ctx, T, s.x, s.y, 0)},
      {"cuda_backward", peer_cuda_backward(p.gpu, ctx, s.dy, s.dx, &s.g, s.n_rows, 0)},
      {"cuda_optimizer_step", peer_cuda_optimizer_step(o, &s.g, s.n_rows, 0)},
      {"cuda_check", peer_cuda_check(p.gpu, 0)},
      {"cuda_set_workspace", peer_cuda_set_workspace(p.gpu, NULL, 0)},
  };
  for (size_t i = 0; i < sizeof calls / sizeof calls[0]; i++)
    cr_expect_eq(calls[i].st, PEER_ERR_BUSY, "%s on a busy layer gave %s", calls[i].what,
                 peer_status_string(calls[i].st));
  cr_assert(strstr(peer_last_error(), "cuda_set_workspace: the layer is busy: another thread is "
                                      "in forward"),
            "%s", peer_last_error());
  peer_layer_leave(p.gpu);
  /* the refused forward_train did not spoil the context: backward still runs */
  cr_assert_eq(peer_cuda_backward(p.gpu, ctx, s.dy, s.dx, &s.g, s.n_rows, 0), PEER_OK, "%s",
               peer_last_error());
  cr_assert_eq(peer_cuda_forward(p.gpu, T, s.x, s.y, ids, NULL, 0), PEER_OK, "%s",
               peer_last_error());
  cr_assert_eq(peer_cuda_optimizer_step(o, &s.g, s.n_rows, 0), PEER_OK, "%s", peer_last_error());
  cr_assert_eq(peer_cuda_check(p.gpu, 0), PEER_OK, "%s", peer_last_error());
  cudaFree(ids);
  peer_context_free(ctx);
  peer_optimizer_free(o);
  dev_step_free(&s);
  free(x), free(dy);
  free_pair(&p);
}

/* The top-k' selection's work as the emulator counts it (PEER_K_COUNT):
 * per row at the reference config's n = 1024, k' = 16, the scores written
 * to its candidate buffer and the keys through its warp sort.  On random
 * rows a threshold that followed the running k'-th best exactly would pass
 * about k' (1 + ln(n / k')) = 83 scores; the kernel's lags (it moves when
 * the buffer is sorted), so the bound is twice that.  Rising rows are the
 * worst case: every score is a candidate. */
static void topk_work(int kind, int64_t rows, double *candidates, double *sorted) {
  const int64_t n = 1024, kp = 16;
  ref_rng rng = {ref_test_seed()};
  float *S = malloc((size_t)(rows * n) * 4);
  for (int64_t r = 0; r < rows; r++) fill_row(S + r * n, n, kp, kind, &rng);
  float *dS = dev_copy_of(S, (size_t)(rows * n) * 4), *ds = dev_alloc((size_t)(rows * kp) * 4);
  int64_t *did = dev_alloc((size_t)(rows * kp) * 8);
  unsigned long long *dbad = dev_alloc(8);
  peer_emu_counts before, after;
  peer_emu_get_counts(&before);
  cr_assert_eq(peer_k_subkey_topk(dS, rows, n, kp, ds, did, dbad, 0), PEER_OK, "%s",
               peer_last_error());
  cr_assert_eq(cudaDeviceSynchronize(), cudaSuccess);
  peer_emu_get_counts(&after);
  *candidates = (double)(after.topk_candidates - before.topk_candidates) / (double)rows;
  *sorted = (double)(after.topk_sorted - before.topk_sorted) / (double)rows;
  cudaFree(dS), cudaFree(ds), cudaFree(did), cudaFree(dbad);
  free(S);
}

Test(emu, topk_selection_work) {
  double rand_c, rand_s, rise_c, rise_s;
  topk_work(ROW_RANDOM, 256, &rand_c, &rand_s);
  topk_work(ROW_RISING, 8, &rise_c, &rise_s);
  fprintf(stderr,
          "emu/topk_selection_work: n=1024 k'=16, per row: random rows %.1f candidates, %.1f "
          "keys sorted; rising rows %.1f candidates, %.1f keys sorted\n",
          rand_c, rand_s, rise_c, rise_s);
  cr_assert(rand_c <= 2 * 16 * (1 + log(1024.0 / 16)), "%.1f candidates per random row", rand_c);
  cr_assert_eq(rise_c, 1024.0, "%.1f candidates per rising row", rise_c);
}

/* The bf16 path's re-scoring as the emulator counts it: exact scores per
 * row (topk_rescored) at the reference config's n = 1024, k' = 16,
 * d_key = 256 (keys and queries as peer_layer_init and random x make
 * them), through the emulated GemmEx's truncating sums.  The model
 * (bench/cuda_model.py) takes its survivors per row from this line. */
Test(emu, bf16_rescore_work) {
  ref_rng rng = {ref_test_seed()};
  peer_layer *C = identity_layer("n_heads=1,d_key=256,n_subkeys=1024,top_k=16", &rng);
  cr_assert_eq(peer_layer_init(C, ref_test_seed()), PEER_OK);
  peer_tensor w;
  cr_assert_eq(peer_layer_param_by_name(C, "query.weight", &w), PEER_OK);
  float *W = w.data;
  memset(W, 0, w.nbytes);
  for (int64_t i = 0; i < 256; i++) W[i * 256 + i] = 1.0f;
  peer_layer *G = cuda_reloaded(C);
  const int64_t T = 32, rows = T * 2;
  float *x = ref_random_x(&rng, T, 256);
  int64_t *ids = malloc((size_t)(T * 16) * 8);
  peer_emu_counts before, after;
  peer_retrieval_stats s0, s1;
  cr_assert_eq(peer_cb_retrieval_stats(G, &s0), PEER_OK);
  peer_emu_get_counts(&before);
  cr_assert_eq(peer_retrieve(G, T, x, ids, NULL, NULL), PEER_OK, "%s", peer_last_error());
  peer_emu_get_counts(&after);
  cr_assert_eq(peer_cb_retrieval_stats(G, &s1), PEER_OK);
  const double per_row = (double)(after.topk_rescored - before.topk_rescored) / (double)rows;
  fprintf(stderr,
          "emu/bf16_rescore_work: n=1024 k'=16 d_key=256, per row: %.1f scores re-scored, "
          "%lld of %lld rows fell back\n",
          per_row, (long long)(s1.fallback - s0.fallback), (long long)rows);
  cr_assert(per_row >= 16 && per_row <= 2 * 16 + 64, "%.1f re-scored per row", per_row);
  cr_assert_eq(s1.fallback - s0.fallback, 0);
  free(ids), free(x);
  peer_layer_free(C);
  peer_layer_free(G);
}

Test(emu, steady_loop_never_syncs_or_allocates) {
  pair p = make_pair(SMALL ",query_norm=batchnorm,query_bias=1");
  cr_assert_eq(peer_layer_init(p.gpu, 17), PEER_OK, "%s", peer_last_error());
  const int64_t T = 32, d = p.cfg.d_model;
  ref_rng rng = {18};
  float *x = ref_random_x(&rng, T, d), *dy = ref_random_x(&rng, T, d);
  dev_step s = dev_step_new(p.gpu, T, x, dy);
  peer_optim_config c = optim_cfg(PEER_OPTIM_ADAM, PEER_OPTIM_ADAM, 0.0f, 0.01f);
  peer_optimizer *og;
  cr_assert_eq(peer_optimizer_create(&og, p.gpu, &c), PEER_OK, "%s", peer_last_error());
  peer_context *ctx;
  cr_assert_eq(peer_context_create(&ctx, p.gpu, T), PEER_OK, "%s", peer_last_error());
  cudaStream_t st;
  cr_assert_eq(cudaStreamCreateWithFlags(&st, cudaStreamNonBlocking), cudaSuccess);
  cr_assert_eq(peer_cuda_set_chunks(p.gpu, 3), PEER_OK); /* the forward's pipeline too */
  cr_assert_eq(cudaDeviceSynchronize(), cudaSuccess); /* dev_step_new's copies */
  peer_emu_counts before, after;
  for (int pass = 0; pass < 2; pass++) {
    if (pass == 1) peer_emu_get_counts(&before);
    for (int i = 0; i < (pass ? 3 : 1); i++)
      for (int64_t tb = T; tb >= T / 2; tb -= T / 2) {
        cr_assert_eq(peer_cuda_forward(p.gpu, tb, s.x, s.y, NULL, NULL, st), PEER_OK, "%s",
                     peer_last_error());
        cr_assert_eq(peer_cuda_forward_train(p.gpu, ctx, tb, s.x, s.y, st), PEER_OK, "%s",
                     peer_last_error());
        cr_assert_eq(peer_cuda_backward(p.gpu, ctx, s.dy, s.dx, &s.g, s.n_rows, st), PEER_OK,
                     "%s", peer_last_error());
        cr_assert_eq(peer_cuda_optimizer_step(og, &s.g, s.n_rows, st), PEER_OK, "%s",
                     peer_last_error());
      }
  }
  peer_emu_get_counts(&after);
  cr_assert_eq(after.device_syncs - before.device_syncs, 0, "cudaDeviceSynchronize calls");
  cr_assert_eq(after.stream_syncs - before.stream_syncs, 0, "stream synchronisations");
  cr_assert_eq(after.mallocs - before.mallocs, 0, "cudaMalloc calls");
  cr_assert_eq(after.frees - before.frees, 0, "cudaFree calls");
  cr_assert_eq(after.blas_default_workspace - before.blas_default_workspace, 0,
               "cuBLAS products on cuBLAS's own workspace");
  cr_assert_gt(after.launches - before.launches, 6 * 10, "the loop launched kernels");
  cr_assert_eq(peer_cuda_check(p.gpu, st), PEER_OK, "%s", peer_last_error());
  cr_assert_eq(peer_optimizer_step_count(og), 8);
  peer_context_free(ctx);
  peer_optimizer_free(og);
  cudaStreamDestroy(st);
  dev_step_free(&s);
  free(x), free(dy);
  free_pair(&p);
}

/* Scratch that would have to grow while the caller's stream is being
 * captured into a CUDA graph is refused (PEER_ERR_STATE, naming the
 * capture and the way out) before any wait or allocation, which would
 * invalidate the caller's capture; calls that fit run; after the capture
 * the same call grows the scratch and works. */
Test(emu, scratch_does_not_grow_under_capture) {
  pair p = make_pair(SMALL);
  cr_assert_eq(peer_layer_init(p.gpu, 41), PEER_OK, "%s", peer_last_error());
  const int64_t small = 8, big = 40, d = p.cfg.d_model;
  ref_rng rng = {42};
  float *x = ref_random_x(&rng, big, d);
  float *d_x = dev_copy_of(x, (size_t)(big * d) * 4), *d_y = dev_alloc((size_t)(big * d) * 4);
  cudaStream_t st;
  cr_assert_eq(cudaStreamCreateWithFlags(&st, cudaStreamNonBlocking), cudaSuccess);
  peer_context *ctx;
  cr_assert_eq(peer_context_create(&ctx, p.gpu, big), PEER_OK, "%s", peer_last_error());
  cr_assert_eq(peer_cuda_forward(p.gpu, small, d_x, d_y, NULL, NULL, st), PEER_OK, "%s",
               peer_last_error());
  cr_assert_eq(cudaStreamSynchronize(st), cudaSuccess);
  cr_assert_eq(peer_emu_set_capturing(st, 1), 0);
  peer_emu_counts before, after;
  peer_emu_get_counts(&before);
  cr_assert_eq(peer_cuda_forward(p.gpu, big, d_x, d_y, NULL, NULL, st), PEER_ERR_STATE, "%s",
               peer_last_error());
  cr_assert(strstr(peer_last_error(), "cuda workspace: 40 tokens need") &&
                strstr(peer_last_error(), "captured into a CUDA graph") &&
                strstr(peer_last_error(), "peer_cuda_set_workspace"),
            "%s", peer_last_error());
  cr_assert_eq(peer_cuda_forward_train(p.gpu, ctx, big, d_x, d_y, st), PEER_ERR_STATE, "%s",
               peer_last_error());
  cr_assert_eq(peer_cuda_forward(p.gpu, small, d_x, d_y, NULL, NULL, st), PEER_OK, "%s",
               peer_last_error()); /* fits: runs under the capture */
  peer_emu_get_counts(&after);
  cr_assert_eq(after.mallocs - before.mallocs, 0, "cudaMalloc calls under capture");
  cr_assert_eq(after.frees - before.frees, 0, "cudaFree calls under capture");
  cr_assert_eq(after.device_syncs - before.device_syncs, 0, "device waits under capture");
  cr_assert_eq(peer_emu_set_capturing(st, 0), 0);
  cr_assert_eq(peer_cuda_forward(p.gpu, big, d_x, d_y, NULL, NULL, st), PEER_OK, "%s",
               peer_last_error());
  peer_emu_get_counts(&after);
  cr_assert_gt(after.mallocs - before.mallocs, 0, "the scratch grew after the capture");
  cr_assert_eq(peer_cuda_forward_train(p.gpu, ctx, big, d_x, d_y, st), PEER_OK, "%s",
               peer_last_error());
  cr_assert_eq(peer_cuda_check(p.gpu, st), PEER_OK, "%s", peer_last_error());
  peer_context_free(ctx);
  cudaStreamDestroy(st);
  cudaFree(d_x), cudaFree(d_y);
  free(x);
  free_pair(&p);
}

/* The bf16 copy of the keys (keys16) is made once per forward, not once
 * per chunk, while the keys are exposed (remade for every call), and not at
 * all while they are unchanged and not exposed.  Counted in key rows. */
Test(emu, keys16_once_per_forward) {
  pair p = make_pair(SMALL);
  cr_assert_eq(peer_layer_init(p.gpu, 5), PEER_OK, "%s", peer_last_error());
  cr_assert(peer_cb_bf16_scores(p.gpu));
  const int64_t T = 37, d = p.cfg.d_model, rows = p.cfg.n_heads * 2 * p.cfg.n_subkeys;
  ref_rng rng = {6};
  float *x = ref_random_x(&rng, T, d), *y = malloc((size_t)(T * d) * 4);
  const int chunks[] = {1, 3, 5};
  for (int exposed = 0; exposed < 2; exposed++) {
    if (exposed) {
      peer_tensor k;
      cr_assert_eq(peer_layer_param_by_name(p.gpu, "keys", &k), PEER_OK);
    }
    for (size_t c = 0; c < sizeof chunks / sizeof chunks[0]; c++) {
      /* set_chunks may write the keys, as far as the layer knows */
      cr_assert_eq(peer_cuda_set_chunks(p.gpu, chunks[c]), PEER_OK);
      cr_assert_eq(peer_forward(p.gpu, T, x, y, NULL, NULL), PEER_OK, "%s", peer_last_error());
      peer_emu_counts before, after;
      peer_emu_get_counts(&before);
      cr_assert_eq(peer_forward(p.gpu, T, x, y, NULL, NULL), PEER_OK, "%s", peer_last_error());
      peer_emu_get_counts(&after);
      cr_assert_eq((int64_t)(after.keys16_rows - before.keys16_rows), (int64_t)(exposed ? rows : 0),
                   "keys exposed %d, %d chunks: %llu key rows converted", exposed, chunks[c],
                   after.keys16_rows - before.keys16_rows);
    }
  }
  free(x), free(y);
  free_pair(&p);
}

/* On a stream being captured into a CUDA graph the bf16 copy of the keys
 * is queued for every forward (once, whatever the chunks), even where it
 * is current: a launch of the graph may follow an optimizer step or a load.
 * The emulator reports the capture (peer_emu_set_capturing); work still
 * runs as queued. */
Test(emu, capture_always_refreshes_keys16) {
  pair p = make_pair(SMALL);
  cr_assert_eq(peer_layer_init(p.gpu, 8), PEER_OK, "%s", peer_last_error());
  const int64_t T = 21, d = p.cfg.d_model, rows = p.cfg.n_heads * 2 * p.cfg.n_subkeys;
  ref_rng rng = {9};
  float *x = ref_random_x(&rng, T, d);
  float *d_x = dev_copy_of(x, (size_t)(T * d) * 4), *d_y = dev_alloc((size_t)(T * d) * 4);
  cudaStream_t st;
  cr_assert_eq(cudaStreamCreateWithFlags(&st, cudaStreamNonBlocking), cudaSuccess);
  enum cudaStreamCaptureStatus cs;
  const int chunks[] = {1, 3};
  for (size_t c = 0; c < 2; c++) {
    cr_assert_eq(peer_cuda_set_chunks(p.gpu, chunks[c]), PEER_OK);
    cr_assert_eq(peer_cuda_forward(p.gpu, T, d_x, d_y, NULL, NULL, st), PEER_OK, "%s",
                 peer_last_error()); /* the copy current, the scratch sized */
    for (int capture = 0; capture < 2; capture++) {
      cr_assert_eq(peer_emu_set_capturing(st, capture), 0);
      cr_assert_eq(cudaStreamIsCapturing(st, &cs), cudaSuccess);
      cr_assert_eq(cs, capture ? cudaStreamCaptureStatusActive : cudaStreamCaptureStatusNone);
      peer_emu_counts before, after;
      peer_emu_get_counts(&before);
      cr_assert_eq(peer_cuda_forward(p.gpu, T, d_x, d_y, NULL, NULL, st), PEER_OK, "%s",
                   peer_last_error());
      cr_assert_eq(cudaStreamSynchronize(st), cudaSuccess);
      peer_emu_get_counts(&after);
      cr_assert_eq((int64_t)(after.keys16_rows - before.keys16_rows), (int64_t)(capture ? rows : 0),
                   "capturing %d, %d chunks: %llu key rows converted", capture, chunks[c],
                   after.keys16_rows - before.keys16_rows);
    }
    cr_assert_eq(peer_emu_set_capturing(st, 0), 0);
  }
  cr_assert_eq(peer_emu_set_capturing(NULL, 1), -1);
  cr_assert_eq(cudaStreamIsCapturing(NULL, &cs), cudaSuccess);
  cr_assert_eq(cs, cudaStreamCaptureStatusNone);
  cr_assert_eq(peer_cuda_check(p.gpu, st), PEER_OK, "%s", peer_last_error());
  cudaStreamDestroy(st);
  cudaFree(d_x), cudaFree(d_y);
  free(x);
  free_pair(&p);
}

/* The emulated build (PEER_CUDA=EMU, kernels/emu/): an injected cudaMalloc
 * failure reaches the caller as PEER_ERR_OUT_OF_MEMORY and the next call
 * works; the emulator counts the allocations. */
Test(emu, injected_allocation_failure) {
  pair p = make_pair(SMALL);
  cr_assert_eq(peer_layer_init(p.gpu, 14), PEER_OK, "%s", peer_last_error());
  const int64_t T = 8, d = p.cfg.d_model;
  ref_rng rng = {15};
  float *x = ref_random_x(&rng, T, d);
  float *d_x = dev_copy_of(x, (size_t)(T * d) * 4), *d_y = dev_alloc((size_t)(T * d) * 4);
  peer_emu_counts before, after;
  peer_emu_get_counts(&before);
  peer_emu_fail_malloc(1); /* the layer's first scratch */
  cr_assert_eq(peer_cuda_forward(p.gpu, T, d_x, d_y, NULL, NULL, 0), PEER_ERR_OUT_OF_MEMORY,
               "%s", peer_last_error());
  cr_assert(strstr(peer_last_error(), "cuda workspace") != NULL, "%s", peer_last_error());
  cr_assert_eq(cudaGetLastError(), cudaSuccess);
  cr_assert_eq(peer_cuda_forward(p.gpu, T, d_x, d_y, NULL, NULL, 0), PEER_OK, "%s",
               peer_last_error());
  cr_assert_eq(peer_cuda_check(p.gpu, 0), PEER_OK, "%s", peer_last_error());
  peer_emu_get_counts(&after);
  cr_assert_eq(after.mallocs - before.mallocs, 2, "%llu cudaMalloc calls",
               after.mallocs - before.mallocs);
  cr_assert(after.launches > before.launches);
  cudaFree(d_x), cudaFree(d_y);
  free(x);
  free_pair(&p);
}

/* Freeing an unknown or already freed pointer fails as the runtime's does,
 * and leaves the error for cudaGetLastError. */
Test(emu, bad_frees_and_pointer_attributes) {
  void *a = dev_alloc(1000);
  struct cudaPointerAttributes at;
  cr_assert_eq(cudaPointerGetAttributes(&at, (char *)a + 999), cudaSuccess);
  cr_assert_eq(at.type, cudaMemoryTypeDevice);
  int host = 0;
  cr_assert_eq(cudaPointerGetAttributes(&at, &host), cudaSuccess);
  cr_assert_eq(at.type, cudaMemoryTypeUnregistered);
  cr_assert_eq(cudaFree((char *)a + 8), cudaErrorInvalidValue);
  cr_assert_eq(cudaGetLastError(), cudaErrorInvalidValue);
  cr_assert_eq(cudaGetLastError(), cudaSuccess);
  cr_assert_eq(cudaFree(a), cudaSuccess);
  cr_assert_eq(cudaFree(a), cudaErrorInvalidValue);
  (void)cudaGetLastError();
  cr_assert_eq(cudaMemcpy(&host, a, 4, cudaMemcpyDeviceToHost), cudaErrorInvalidValue);
  (void)cudaGetLastError();
}

/* cuBLAS's argument rules and its column-major product: C [m, n] =
 * op(A) op(B) against plain double loops. */
Test(emu, cublas_rules_and_column_major_product) {
  const int m = 5, n = 3, k = 4;
  float a[4 * 5], b[4 * 3], c[5 * 3];
  for (int i = 0; i < 20; i++) a[i] = (float)(i % 7) - 3.0f;
  for (int i = 0; i < 12; i++) b[i] = (float)(i % 5) * 0.5f - 1.0f;
  float *da = dev_copy_of(a, sizeof a), *db = dev_copy_of(b, sizeof b), *dc = dev_alloc(sizeof c);
  cublasHandle_t h;
  cr_assert_eq(cublasCreate(&h), CUBLAS_STATUS_SUCCESS);
  const float one = 1.0f, zero = 0.0f;
  /* A stored k x m (op T), B stored k x n (op N) */
  cr_assert_eq(cublasSgemm(h, CUBLAS_OP_T, CUBLAS_OP_N, m, n, k, &one, da, k - 1, db, k, &zero,
                           dc, m),
               CUBLAS_STATUS_INVALID_VALUE); /* lda < k */
  cr_assert_eq(cublasSgemm(h, CUBLAS_OP_T, CUBLAS_OP_N, m, n, k, &one, da, k, db, k, &zero, dc,
                           m - 1),
               CUBLAS_STATUS_INVALID_VALUE); /* ldc < m */
  cr_assert_eq(cublasSgemm(h, CUBLAS_OP_T, CUBLAS_OP_N, -1, n, k, &one, da, k, db, k, &zero, dc,
                           m),
               CUBLAS_STATUS_INVALID_VALUE);
  cr_assert_eq(cublasSgemm(h, CUBLAS_OP_T, CUBLAS_OP_N, m, n, k, &one, da, k, db, k, &zero, dc, m),
               CUBLAS_STATUS_SUCCESS);
  to_host(c, dc, sizeof c);
  for (int j = 0; j < n; j++)
    for (int i = 0; i < m; i++) {
      double want = 0.0;
      for (int l = 0; l < k; l++) want += (double)a[i * k + l] * (double)b[j * k + l];
      cr_assert(fabs(c[i + j * m] - want) <= 1e-5, "C[%d,%d] = %g, want %g", i, j,
                (double)c[i + j * m], want);
    }
  cr_assert_eq(cublasDestroy(h), CUBLAS_STATUS_SUCCESS);
  cr_assert_eq(cublasSgemm(h, CUBLAS_OP_N, CUBLAS_OP_N, 1, 1, 1, &one, da, 1, db, 1, &zero, dc, 1),
               CUBLAS_STATUS_NOT_INITIALIZED);
  cudaFree(da), cudaFree(db), cudaFree(dc);
}
#endif

int main(int argc, char *argv[]) {
  const int device = device_usable();
  struct criterion_test_set *tests = criterion_initialize();
  int result = 0;
  if (criterion_handle_args(argc, argv, true)) {
    if (!device) criterion_options.pattern = "cuda_limits/*";
    result = !criterion_run_all_tests(tests);
  }
  criterion_finalize(tests);
  if (!device && result == 0) {
    fprintf(stderr, "test_cuda: skipped: no CUDA device (the cuda_limits checks, which need "
                    "none, passed)\n");
    return 77;
  }
  return result;
}
#endif
