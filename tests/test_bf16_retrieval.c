/* test_bf16_retrieval.c: the bf16 first pass with exact re-ranking
 * (peer/cpu_bf16.c) gives exactly the f32 path's ids and score bits.  Every
 * case compares peer_retrieve with peer_retrieve_brute (whose sub-key scores
 * are the f32 path's, peer_cpu_gemm_nt) bit for bit, on random layers and on
 * adversarial ones: traps whose f32 and bf16 orders disagree by nearly the
 * error bound, near-ties within the bound, exact ties, keys differing in
 * their last bits, large and tiny norms, k' = 1 and k' = n.  On the
 * avx512bf16 variant the cases must also have taken the bf16 path (the
 * layer's counters), so a pass is not the fallback's.  Layers go through a
 * weight file so the keys are not exposed (peer_layer_param): exposed keys
 * take the f32 path, tested on their own with stale copies. */
#include <criterion/criterion.h>

#include "bf16_cases.h"
#include "cases.h"
#include "cpu.h"
#include "reference.h"

#include <stdlib.h>
#include <string.h>

static bool bf16_variant(void) {
  const peer_cpu_impl *impl = peer_cpu_select();
  return impl && !strcmp(impl->name, "avx512bf16");
}

/* peer_retrieve against peer_retrieve_brute on L: ids and score bits, for
 * the whole batch at once (full token blocks take the f32 path, a short last
 * one the bf16 path) and in calls of `chunk` tokens (every block short). */
static void check_exact_in(peer_layer *L, int64_t T, const float *x, int64_t chunk,
                           const char *what) {
  const peer_config *c = peer_layer_config(L);
  const int64_t hk = c->n_heads * c->top_k, m = T * hk;
  int64_t *ia = malloc((size_t)m * sizeof *ia), *ib = malloc((size_t)m * sizeof *ib);
  float *sa = malloc((size_t)m * sizeof *sa), *sb = malloc((size_t)m * sizeof *sb);
  cr_assert_eq(peer_retrieve_brute(L, T, x, ib, sb, NULL), PEER_OK, "%s: %s", what,
               peer_last_error());
  for (int pass = 0; pass < 2; pass++) {
    const int64_t step = pass ? chunk : T;
    for (int64_t t0 = 0; t0 < T; t0 += step) {
      const int64_t nt = T - t0 < step ? T - t0 : step;
      cr_assert_eq(peer_retrieve(L, nt, x + t0 * c->d_model, ia + t0 * hk, sa + t0 * hk, NULL),
                   PEER_OK, "%s: %s", what, peer_last_error());
    }
    for (int64_t i = 0; i < m; i++)
      cr_assert(ia[i] == ib[i] && !memcmp(&sa[i], &sb[i], sizeof(float)),
                "%s (calls of %lld tokens): entry %lld (token %lld): id %lld score %a, the f32 "
                "path's id %lld score %a",
                what, (long long)step, (long long)i, (long long)(i / hk), (long long)ia[i],
                (double)sa[i], (long long)ib[i], (double)sb[i]);
  }
  free(ia), free(ib), free(sa), free(sb);
}

static void check_exact(peer_layer *L, int64_t T, const float *x, const char *what) {
  check_exact_in(L, T, x, 13, what);
}

static float *param(peer_layer *L, const char *name) {
  peer_tensor t;
  cr_assert_eq(peer_layer_param_by_name(L, name, &t), PEER_OK);
  return t.data;
}

/* The first pass ran for some halves (on the variant that has it), in the
 * format PEER_CPU_FIRST_PASS asks for (int8 by default). */
static void check_took_bf16(const peer_layer *L, const char *what) {
  const char *e = getenv("PEER_CPU_FIRST_PASS");
  const bool want_bf16 = e && !strcmp(e, "bf16");
  const peer_retrieval_stats *s = &L->retrieval_stats;
  if (bf16_variant())
    cr_assert((want_bf16 ? s->bf16 : s->int8) > 0 && (want_bf16 ? s->int8 : s->bf16) == 0,
              "%s: the %s first pass never ran (bf16 %lld, int8 %lld, %lld fallbacks)", what,
              want_bf16 ? "bf16" : "int8", (long long)s->bf16, (long long)s->int8,
              (long long)s->fallback);
  else
    cr_assert_eq(s->bf16 + s->int8 + s->fallback, 0);
}

Test(bf16_retrieval, random_layers_match_the_f32_path) {
  static const case_spec specs[] = {
      {"d_model=32,n_heads=2,d_key=16,n_subkeys=64,top_k=4", 37},
      {"d_model=48,n_heads=3,d_key=32,n_subkeys=128,top_k=8,shared_keys=1", 40},
      {"d_model=32,n_heads=1,d_key=64,n_subkeys=256,top_k=1,subkey_top_k=1", 64},
      {"d_model=32,n_heads=2,d_key=128,n_subkeys=512,top_k=16,subkey_top_k=32", 33},
      {"d_model=64,n_heads=2,d_key=256,n_subkeys=512,top_k=16,query_bias=1", 20},
      {"d_model=32,n_heads=2,d_key=32,n_subkeys=128,top_k=4,query_norm=batchnorm", 9},
      {"d_model=16,n_heads=2,d_key=16,n_subkeys=64,top_k=8,subkey_top_k=64", 10},
      {"d_model=16,n_heads=1,d_key=20,n_subkeys=64,top_k=2", 1},
  };
  ref_rng rng = {ref_test_seed()};
  for (size_t s = 0; s < sizeof specs / sizeof specs[0]; s++) {
    layer_case c = case_of(&specs[s]);
    peer_layer *A = case_layer(&c);
    ref_fill_layer(A, &rng);
    peer_layer *L = case_reloaded(A);
    float *x = ref_random_x(&rng, c.T, c.d);
    check_exact(L, c.T, x, case_text(&c));
    check_exact(L, 1, x, case_text(&c)); /* batch 1 */
    if (s < 5) check_took_bf16(L, case_text(&c));
    free(x);
    peer_layer_free(A);
    peer_layer_free(L);
  }
}

/* A layer with q = x (query.weight the identity, d_model = H * d_key) whose
 * keys and queries the test writes, then reloaded. */
typedef struct direct {
  peer_layer *A;
  float *keys;
  int64_t H, m, n;
} direct;

static direct direct_layer(const char *extra) {
  layer_case c = case_make("n_heads=1,d_key=64,d_model=64,n_subkeys=128,top_k=2", 1);
  if (extra) case_set(&c, extra);
  direct D = {case_layer(&c), NULL, c.H, c.dk / 2, c.n};
  float *W = param(D.A, "query.weight");
  for (int64_t i = 0; i < c.H * c.dk; i++)
    W[i * c.d + i] = 1.0f;
  D.keys = param(D.A, "keys");
  return D;
}

typedef int (*trap_maker)(float *keys, float *x, int64_t sets, int64_t n, int64_t m, int64_t T,
                          ref_rng *rng);

/* A layer whose f32 top-1 sub-key per half is a trap that `make` sets, one
 * call of 64 tokens and calls of 13: exact, and through the first pass. */
static void check_traps(trap_maker make, const char *what) {
  ref_rng rng = {ref_test_seed()};
  direct D = direct_layer("n_subkeys=256,subkey_top_k=1,top_k=1,d_key=128,d_model=128");
  const int64_t m = D.m, n = D.n, T = 64;
  float *x = malloc((size_t)(T * 2 * m) * sizeof(float));
  cr_assert(make(D.keys, x, 2, n, m, T, &rng) > 0);
  peer_layer *L = case_reloaded(D.A);
  check_exact(L, T, x, what);
  check_took_bf16(L, what);
  free(x);
  peer_layer_free(D.A);
  peer_layer_free(L);
}

/* bf16_cases.h's traps: the f32 top-1 ranks below decoys in bf16 by nearly
 * twice the bound (with the int8 first pass: an ordinary hard case). */
Test(bf16_retrieval, traps_within_the_error_bound) { check_traps(bf16_traps, "traps"); }

/* bf16_cases.h's int8 traps: the f32 top-1 ranks below decoys in int8 by
 * about two thirds of the two keys' bounds together. */
Test(bf16_retrieval, int8_traps_within_the_error_bound) {
  check_traps(int8_traps, "int8 traps");
}

/* Key 0 of half 0: signs [+ + + - - - + -] at 1.375 * 2^63 against a query
 * half of 2^63: the f32 chain overflows at its 3rd term though the exact
 * score is 0, and the dot-product instruction's pairwise sums stay finite,
 * its bracket far below the other keys' (2^118).  The f32 path and brute
 * force report PEER_ERR_NONFINITE, and so must the bf16 path (test_cuda's
 * cuda_bf16 suite has the same input). */
Test(bf16_retrieval, an_overflowing_chain_is_nonfinite) {
  static const float sign[8] = {1, 1, 1, -1, -1, -1, 1, -1};
  direct D = direct_layer("n_subkeys=64,subkey_top_k=2,top_k=2,d_key=16,d_model=16");
  for (int i = 0; i < 8; i++)
    D.keys[i] = sign[i] * 0x1.6p63f;
  for (int64_t a = 1; a < D.n; a++)
    for (int i = 0; i < 8; i++)
      D.keys[a * 8 + i] = 0x1p52f * (1.0f + (float)a / 64.0f);
  peer_layer *L = case_reloaded(D.A);
  enum { T = 12 };
  float x[T * 16];
  for (int t = 0; t < T; t++)
    for (int i = 0; i < 8; i++)
      x[t * 16 + i] = 0x1p63f, x[t * 16 + 8 + i] = 1.0f;
  int64_t ids[T * 2];
  float sc[T * 2];
  for (int brute = 0; brute < 2; brute++) {
    const peer_status st = brute ? peer_retrieve_brute(L, T, x, ids, sc, NULL)
                                 : peer_retrieve(L, T, x, ids, sc, NULL);
    cr_assert_eq(st, PEER_ERR_NONFINITE, "brute %d: status %d, ids %lld %lld", brute, st,
                 (long long)ids[0], (long long)ids[1]);
    for (int i = 0; i < T * 2; i++)
      cr_assert(ids[i] >= 0 && ids[i] < D.n * D.n);
  }
  if (bf16_variant())
    cr_assert_eq(L->retrieval_stats.fallback, T, "half 0 of each token took the f32 path");
  peer_layer_free(D.A);
  peer_layer_free(L);
}

/* bf16_cases.h's near-ties, exact ties and extreme norms. */
Test(bf16_retrieval, near_ties_exact_ties_and_extreme_norms) {
  ref_rng rng = {ref_test_seed()};
  static const struct {
    const char *config;
    double key_scale, x_scale;
  } cases[] = {
      {"n_subkeys=128,subkey_top_k=4,top_k=4", 1.0, 1.0},
      {"n_subkeys=128,subkey_top_k=16,top_k=8", 0x1p60, 0x1p40},
      {"n_subkeys=128,subkey_top_k=2,top_k=2", 0x1p-60, 0x1p-50},
      {"n_subkeys=128,subkey_top_k=1,top_k=1", 0x1p-70, 0x1p-70}, /* products underflow */
      {"n_subkeys=128,subkey_top_k=8,top_k=3,n_heads=2,d_model=128", 1.0, 1.0},
  };
  for (size_t s = 0; s < sizeof cases / sizeof cases[0]; s++) {
    direct D = direct_layer(cases[s].config);
    const int64_t m = D.m, n = D.n, T = 48;
    float *x = malloc((size_t)(T * D.H * 2 * m) * sizeof(float));
    bf16_near_ties(D.keys, x, D.H * 2, n, m, T, cases[s].key_scale, cases[s].x_scale, &rng);
    peer_layer *L = case_reloaded(D.A);
    check_exact(L, T, x, cases[s].config);
    free(x);
    peer_layer_free(D.A);
    peer_layer_free(L);
  }
}

/* Keys written after the copy was made are never scored from a stale copy:
 * keys exposed through peer_layer_param (which the caller may write in place
 * at any time) take the f32 path, and peer_layer_init (like every call that
 * may write keys: keys_gen) makes the copy be re-made. */
Test(bf16_retrieval, a_stale_copy_is_never_used) {
  ref_rng rng = {ref_test_seed()};
  layer_case c = case_make("d_model=32,n_heads=2,d_key=32,n_subkeys=128,top_k=4", 40);
  peer_layer *A = case_layer(&c);
  ref_fill_layer(A, &rng);
  float *x = ref_random_x(&rng, c.T, c.d);
  check_exact(A, c.T, x, "exposed");
  cr_assert_eq(A->retrieval_stats.bf16 + A->retrieval_stats.fallback, 0,
               "keys exposed to in-place writes take the f32 path");
  float *keys = param(A, "keys");
  for (int64_t i = 0; i < c.H * 2 * c.n * (c.dk / 2); i++)
    keys[i] = -keys[i] * 1.5f;
  check_exact(A, c.T, x, "exposed, keys written in place");
  check_exact(A, 3, x, "exposed, a small batch");

  peer_layer *L = case_reloaded(A);
  check_exact(L, 5, x, "reloaded");
  cr_assert_eq(peer_layer_init(L, 12345), PEER_OK);
  check_exact(L, 5, x, "reloaded, then layer_init");
  check_took_bf16(L, "reloaded");
  free(x);
  peer_layer_free(A);
  peer_layer_free(L);
}
