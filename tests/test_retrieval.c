/* test_retrieval.c: product-key retrieval (peer_retrieve) checked bit for bit
 * against brute force (peer_retrieve_brute) and against the float64
 * reference of reference.h, from N = 1 to N = 1024^2, with per-head and
 * shared keys, k = 1, k = n and k' > k; ties built on purpose (duplicated
 * sub-key rows, coarsely quantised values, sums that round to one f32) must
 * follow PEER.md's order (exact sums descending, exactly equal sums to the
 * smaller id); gates must be the gate function of the scores; rowops.h's
 * peer_order_key must order pairs as the tie rule does. */
#include <criterion/criterion.h>
#include <criterion/logging.h>

#include "cases.h"
#include "reference.h"
#include "rowops.h"

#include <float.h>

/* The case's layer with the given gate and expert dtype (zeroed parameters). */
static peer_layer *make_layer(const layer_case *c, peer_gate gate, peer_dtype dtype) {
  layer_case g = *c;
  g.cfg.gate = gate;
  g.cfg.weight_dtype = dtype;
  return case_layer(&g);
}

#define CASE_FMT "%s seed=%llu"
#define CASE_ARGS(c, seed) case_text(c), (unsigned long long)(seed)

typedef struct result {
  int64_t *ids;
  float *sc, *g;
} result;

static result result_new(int64_t n) {
  result r = {malloc((size_t)n * sizeof(int64_t)), malloc((size_t)n * sizeof(float)),
              malloc((size_t)n * sizeof(float))};
  return r;
}

static void result_free(result *r) {
  free(r->ids);
  free(r->sc);
  free(r->g);
}

/* Within each head: reported scores non-increasing.  (Equal reported
 * scores may list a larger id first: PEER.md orders candidates by the exact
 * sum s1[a] + s2[b], and two different exact sums can round to one f32; the
 * tie rule for exactly equal sums is checked against the reference.)
 * Returns how many adjacent pairs reported equal scores. */
static int64_t check_order(const result *r, const layer_case *c, const char *what, uint64_t seed) {
  const int64_t H = c->H, k = c->k;
  int64_t ties = 0;
  for (int64_t e = 0; e < c->T * H; e++) {
    for (int64_t j = 0; j + 1 < k; j++) {
      float a = r->sc[e * k + j], b = r->sc[e * k + j + 1];
      int64_t ia = r->ids[e * k + j], ib = r->ids[e * k + j + 1];
      cr_assert(a >= b,
                "%s " CASE_FMT ": token %lld head %lld pos %lld: (%a, id %lld) then (%a, id "
                "%lld): scores rise",
                what, CASE_ARGS(c, seed), (long long)(e / H), (long long)(e % H), (long long)j,
                (double)a, (long long)ia, (double)b, (long long)ib);
      ties += a == b;
    }
  }
  return ties;
}

/* The tie rule on exactly equal sums: where the reference's exact scores of
 * two adjacent kept experts are equal, the smaller id comes first. */
static void check_exact_ties(const ref_layer *R, const ref_token *o, int64_t h, const int64_t *ids,
                             const layer_case *c, uint64_t seed, int64_t t) {
  for (int64_t j = 0; j + 1 < c->k; j++) {
    double a = ref_score_of(R, o, h, ids[j]), b = ref_score_of(R, o, h, ids[j + 1]);
    cr_assert(a != b || ids[j] < ids[j + 1],
              CASE_FMT " token %lld head %lld pos %lld: ids %lld then %lld with exactly equal "
                       "sums %.17g: the smaller id must come first",
              CASE_ARGS(c, seed), (long long)t, (long long)h, (long long)j, (long long)ids[j],
              (long long)ids[j + 1], a);
  }
}

/* Gates must be the layer's gate function of the returned scores. */
static void check_gates(const result *r, int64_t T, int64_t H, int64_t k, int gate, uint64_t seed) {
  double *z = malloc((size_t)k * sizeof(double)), *g = malloc((size_t)k * sizeof(double));
  for (int64_t e = 0; e < T * H; e++) {
    for (int64_t j = 0; j < k; j++)
      z[j] = (double)r->sc[e * k + j];
    ref_gates(gate, z, k, g);
    for (int64_t j = 0; j < k; j++) {
      double got = (double)r->g[e * k + j];
      if (gate == PEER_GATE_RELU)
        cr_assert(got == g[j], "seed=%llu relu gate %.9g of score %.9g", (unsigned long long)seed,
                  got, z[j]);
      else
        cr_assert(fabs(got - g[j]) <= 1e-6 * fmax(1.0, fabs(g[j])),
                  "seed=%llu gate %s: %.9g, expected %.9g (score %.9g, entry %lld)",
                  (unsigned long long)seed, peer_gate_name((peer_gate)gate), got, g[j], z[j],
                  (long long)(e * k + j));
    }
  }
  free(z);
  free(g);
}

/* peer_retrieve against peer_retrieve_brute: same ids, same score bits, same
 * gate bits.  Fills *fast with peer_retrieve's result. */
static void check_against_brute(peer_layer *L, const layer_case *c, const float *x, result *fast,
                                uint64_t seed) {
  int64_t m = c->T * c->H * c->k;
  result brute = result_new(m);
  peer_status st = peer_retrieve(L, c->T, x, fast->ids, fast->sc, fast->g);
  cr_assert_eq(st, PEER_OK, "retrieve " CASE_FMT ": %s", CASE_ARGS(c, seed), peer_last_error());
  st = peer_retrieve_brute(L, c->T, x, brute.ids, brute.sc, brute.g);
  cr_assert_eq(st, PEER_OK, "brute " CASE_FMT ": %s", CASE_ARGS(c, seed), peer_last_error());
  for (int64_t i = 0; i < m; i++) {
    cr_assert(fast->ids[i] == brute.ids[i] &&
                  memcmp(&fast->sc[i], &brute.sc[i], sizeof(float)) == 0,
              CASE_FMT ": entry %lld (token %lld head %lld pos %lld): product keys give id %lld "
                       "score %.9g, brute force id %lld score %.9g",
              CASE_ARGS(c, seed), (long long)i, (long long)(i / (c->H * c->k)),
              (long long)(i / c->k % c->H), (long long)(i % c->k), (long long)fast->ids[i],
              (double)fast->sc[i], (long long)brute.ids[i], (double)brute.sc[i]);
    cr_assert(memcmp(&fast->g[i], &brute.g[i], sizeof(float)) == 0,
              CASE_FMT ": entry %lld gates %.9g vs brute %.9g", CASE_ARGS(c, seed), (long long)i,
              (double)fast->g[i], (double)brute.g[i]);
  }
  result_free(&brute);
}

/* Every head against the float64 reference (and the tie rule on exactly
 * equal sums); returns how many heads had their ids compared (the others
 * have a near-tie at the k-th place). */
static int64_t check_against_reference(peer_layer *L, const layer_case *c, const float *x,
                                       const result *r, uint64_t seed) {
  ref_layer R;
  ref_bind(&R, L);
  ref_token o;
  ref_token_alloc(&o, &R);
  int64_t checked = 0;
  char msg[512];
  for (int64_t t = 0; t < c->T; t++) {
    ref_forward_token(&R, x + t * c->d, &o, 0);
    for (int64_t h = 0; h < c->H; h++) {
      int64_t e = (t * c->H + h) * c->k;
      int ok_ids = 0;
      int bad = ref_check_head(&R, &o, h, r->ids + e, r->sc + e, 1e-5, &ok_ids, msg, sizeof msg);
      cr_assert(!bad, CASE_FMT " token %lld: %s", CASE_ARGS(c, seed), (long long)t, msg);
      check_exact_ties(&R, &o, h, r->ids + e, c, seed, t);
      checked += ok_ids;
    }
  }
  ref_token_free(&o);
  return checked;
}

/* One random case: random parameters and x, then every check. */
static void run_case(const layer_case *c, peer_gate gate, ref_rng *rng, uint64_t seed,
                     int64_t *heads_checked, int64_t *heads_total) {
  peer_layer *L = make_layer(c, gate, PEER_F32);
  ref_fill_layer(L, rng);
  float *x = ref_random_x(rng, c->T, c->d);
  result r = result_new(c->T * c->H * c->k);
  check_against_brute(L, c, x, &r, seed);
  check_order(&r, c, "random", seed);
  check_gates(&r, c->T, c->H, c->k, gate, seed);
  *heads_checked += check_against_reference(L, c, x, &r, seed);
  *heads_total += c->T * c->H;
  result_free(&r);
  free(x);
  peer_layer_free(L);
}

Test(retrieval, small_sizes_match_brute_force_and_reference) {
  uint64_t seed = ref_test_seed();
  cr_log_info("seed %llu", (unsigned long long)seed);
  ref_rng rng = {seed};
  const case_spec cases[] = {
      {"d_model=5,n_heads=1,d_key=2,n_subkeys=1,top_k=1,subkey_top_k=1", 3},
      {"d_model=4,n_heads=3,d_key=4,n_subkeys=1,top_k=1,subkey_top_k=1,shared_keys=1",
       2}, /* N = 1 */
      {"d_model=6,n_heads=2,d_key=2,n_subkeys=2,top_k=1,subkey_top_k=1", 9},
      {"d_model=6,n_heads=2,d_key=2,n_subkeys=2,top_k=1,subkey_top_k=2,shared_keys=1",
       9}, /* N = 4 */
      {"d_model=6,n_heads=3,d_key=6,n_subkeys=2,top_k=2,subkey_top_k=2", 5},
      {"d_model=3,n_heads=1,d_key=4,n_subkeys=2,top_k=2,subkey_top_k=2,shared_keys=1",
       4}, /* k = n = 2 */
      {"d_model=8,n_heads=1,d_key=2,n_subkeys=7,top_k=1,subkey_top_k=1", 17},
      {"d_model=8,n_heads=4,d_key=8,n_subkeys=7,top_k=3,subkey_top_k=5", 11}, /* N = 49 */
      {"d_model=9,n_heads=5,d_key=10,n_subkeys=7,top_k=7,subkey_top_k=7,shared_keys=1", 7},
      {"d_model=16,n_heads=2,d_key=16,n_subkeys=7,top_k=5,subkey_top_k=7", 13}, /* k = n = 7 */
      {"d_model=16,n_heads=8,d_key=32,n_subkeys=32,top_k=16,subkey_top_k=16", 19},
      {"d_model=16,n_heads=8,d_key=32,n_subkeys=32,top_k=16,subkey_top_k=16,shared_keys=1",
       19}, /* N = 1024 */
      {"d_model=20,n_heads=3,d_key=64,n_subkeys=32,top_k=8,subkey_top_k=20", 33},
      {"d_model=12,n_heads=6,d_key=2,n_subkeys=32,top_k=1,subkey_top_k=1,shared_keys=1", 40},
      {"d_model=33,n_heads=2,d_key=256,n_subkeys=32,top_k=4,subkey_top_k=32", 9},
      {"d_model=7,n_heads=7,d_key=12,n_subkeys=32,top_k=32,subkey_top_k=32", 6}, /* k = n = 32 */
      {"d_model=40,n_heads=1,d_key=128,n_subkeys=32,top_k=1,subkey_top_k=3,shared_keys=1", 65},
      {"d_model=17,n_heads=4,d_key=256,n_subkeys=32,top_k=2,subkey_top_k=2,shared_keys=1", 31},
  };
  const int64_t rounds = ref_quick() ? 1 : 3;
  int64_t checked = 0, total = 0;
  for (int64_t round = 0; round < rounds; round++)
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
      layer_case c = case_of(&cases[i]);
      run_case(&c, (peer_gate)((i + (size_t)round) % 3), &rng, seed, &checked, &total);
    }
  cr_log_info("ids compared with the reference on %lld of %lld heads", (long long)checked,
              (long long)total);
  cr_assert(checked * 10 >= total * 8, "seed=%llu: only %lld of %lld heads free of near-ties",
            (unsigned long long)seed, (long long)checked, (long long)total);
}

Test(retrieval, random_shapes_match_brute_force_and_reference) {
  uint64_t seed = ref_test_seed();
  cr_log_info("seed %llu", (unsigned long long)seed);
  ref_rng rng = {seed};
  int64_t checked = 0, total = 0;
  const int rounds = ref_quick() ? 8 : 40;
  for (int i = 0; i < rounds; i++) {
    int64_t d = ref_int(&rng, 1, 40), H = ref_int(&rng, 1, 8), dk = 2 * ref_int(&rng, 1, 128);
    int64_t n = ref_int(&rng, 1, 48), kp = ref_int(&rng, 1, n), k = ref_int(&rng, 1, kp);
    int64_t shared = ref_int(&rng, 0, 1), T = ref_int(&rng, 1, 45);
    char config[256];
    snprintf(config, sizeof config,
             "d_model=%lld,n_heads=%lld,d_key=%lld,n_subkeys=%lld,top_k=%lld,subkey_top_k=%lld,"
             "shared_keys=%lld",
             (long long)d, (long long)H, (long long)dk, (long long)n, (long long)k, (long long)kp,
             (long long)shared);
    layer_case c = case_make(config, T);
    run_case(&c, (peer_gate)ref_int(&rng, 0, 2), &rng, seed, &checked, &total);
  }
  cr_assert(checked * 10 >= total * 8, "seed=%llu: only %lld of %lld heads free of near-ties",
            (unsigned long long)seed, (long long)checked, (long long)total);
}

/* N = 1024^2: the paper's size.  d is small so the (untouched) expert tables
 * stay cheap. */
Test(retrieval, million_experts_match_brute_force_and_reference, .timeout = 240) {
  uint64_t seed = ref_test_seed();
  cr_log_info("seed %llu", (unsigned long long)seed);
  ref_rng rng = {seed};
  const int quick = ref_quick();
  const case_spec cases[] = {
      {"d_model=16,n_heads=4,d_key=256,n_subkeys=1024,top_k=16,subkey_top_k=16", quick ? 2 : 8},
      {"d_model=16,n_heads=8,d_key=64,n_subkeys=1024,top_k=16,subkey_top_k=32,shared_keys=1",
       quick ? 1 : 6},
      {"d_model=12,n_heads=2,d_key=32,n_subkeys=1024,top_k=1,subkey_top_k=1", quick ? 1 : 8},
  };
  int64_t checked = 0, total = 0;
  size_t n_cases = quick ? 2 : sizeof cases / sizeof cases[0];
  for (size_t i = 0; i < n_cases; i++) {
    const layer_case c = case_of(&cases[i]);
    peer_layer *L = make_layer(&c, (peer_gate)i, PEER_BF16);
    peer_tensor t;
    cr_assert_eq(peer_layer_param_by_name(L, "experts.down", &t), PEER_OK);
    cr_assert_eq(t.shape[0], (int64_t)1 << 20);
    ref_fill_layer(L, &rng);
    float *x = ref_random_x(&rng, c.T, c.d);
    result r = result_new(c.T * c.H * c.k);
    check_against_brute(L, &c, x, &r, seed);
    check_order(&r, &c, "N=1M", seed);
    check_gates(&r, c.T, c.H, c.k, (int)i, seed);
    checked += check_against_reference(L, &c, x, &r, seed);
    total += c.T * c.H;
    result_free(&r);
    free(x);
    peer_layer_free(L);
  }
  cr_log_info("ids compared with the reference on %lld of %lld heads", (long long)checked,
              (long long)total);
  cr_assert(checked * 2 >= total, "seed=%llu: only %lld of %lld heads free of near-ties",
            (unsigned long long)seed, (long long)checked, (long long)total);
}

/* Copy sub-key row `from` over row `to` of half p of key group g. */
static void copy_key_row(peer_layer *L, int64_t g, int p, int64_t from, int64_t to) {
  peer_tensor t;
  cr_assert_eq(peer_layer_param_by_name(L, "keys", &t), PEER_OK);
  int64_t n = t.shape[2], half = t.shape[3];
  float *base = (float *)t.data + (g * 2 + p) * n * half;
  memcpy(base + to * half, base + from * half, (size_t)half * sizeof(float));
}

/* Duplicated sub-key rows make exact ties between different experts: the
 * order must be the tie rule's (checked where the reference's exact sums are
 * equal), equal to brute force and to the reference. */
Test(retrieval, duplicated_subkey_rows_follow_the_tie_rule) {
  uint64_t seed = ref_test_seed();
  cr_log_info("seed %llu", (unsigned long long)seed);
  ref_rng rng = {seed};
  const case_spec cases[] = {
      {"d_model=8,n_heads=2,d_key=4,n_subkeys=8,top_k=3,subkey_top_k=3", 25},
      {"d_model=8,n_heads=3,d_key=6,n_subkeys=8,top_k=5,subkey_top_k=8,shared_keys=1", 25},
      {"d_model=12,n_heads=4,d_key=16,n_subkeys=16,top_k=7,subkey_top_k=9", 30},
      {"d_model=10,n_heads=1,d_key=8,n_subkeys=16,top_k=16,subkey_top_k=16", 20},
      {"d_model=6,n_heads=2,d_key=2,n_subkeys=5,top_k=1,subkey_top_k=1,shared_keys=1", 30},
      {"d_model=16,n_heads=5,d_key=32,n_subkeys=32,top_k=13,subkey_top_k=13", 20},
  };
  int64_t ties = 0, checked = 0, total = 0;
  for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
    const layer_case cc = case_of(&cases[i]), *c = &cc;
    peer_layer *L = make_layer(c, (peer_gate)(i % 3), PEER_F32);
    ref_fill_layer(L, &rng);
    int64_t G = c->cfg.shared_keys ? 1 : c->H;
    /* every odd row copies the even row below it (in both halves, with the
     * copy placed at the larger index in one half and the smaller in the
     * other), plus a few random copies */
    for (int64_t g = 0; g < G; g++) {
      for (int64_t a = 0; a + 1 < c->n; a += 2) {
        copy_key_row(L, g, 0, a, a + 1);
        copy_key_row(L, g, 1, a + 1, a);
      }
      for (int j = 0; j < 3; j++)
        copy_key_row(L, g, (int)ref_int(&rng, 0, 1), ref_int(&rng, 0, c->n - 1),
                     ref_int(&rng, 0, c->n - 1));
    }
    float *x = ref_random_x(&rng, c->T, c->d);
    result r = result_new(c->T * c->H * c->k);
    check_against_brute(L, c, x, &r, seed);
    ties += check_order(&r, c, "duplicated rows", seed);
    check_gates(&r, c->T, c->H, c->k, (int)(i % 3), seed);
    checked += check_against_reference(L, c, x, &r, seed);
    total += c->T * c->H;
    result_free(&r);
    free(x);
    peer_layer_free(L);
  }
  cr_log_info("%lld equal adjacent scores among kept experts", (long long)ties);
  cr_assert_gt(ties, 50, "seed=%llu: duplicated rows produced only %lld ties",
               (unsigned long long)seed, (long long)ties);
  cr_assert(checked * 10 >= total * 8, "seed=%llu: only %lld of %lld heads free of near-ties",
            (unsigned long long)seed, (long long)checked, (long long)total);
}

/* Keys, query weights and x on coarse grids: every score is exact in f32 and
 * in f64, so scores tie massively and the result must equal the reference
 * exactly, id for id, with no head skipped. */
Test(retrieval, quantised_values_tie_exactly) {
  uint64_t seed = ref_test_seed();
  cr_log_info("seed %llu", (unsigned long long)seed);
  ref_rng rng = {seed};
  const case_spec cases[] = {
      {"d_model=4,n_heads=2,d_key=2,n_subkeys=8,top_k=4,subkey_top_k=4", 40},
      {"d_model=6,n_heads=3,d_key=4,n_subkeys=16,top_k=8,subkey_top_k=12", 40},
      {"d_model=8,n_heads=4,d_key=8,n_subkeys=32,top_k=16,subkey_top_k=16,shared_keys=1", 40},
      {"d_model=5,n_heads=1,d_key=2,n_subkeys=7,top_k=7,subkey_top_k=7", 40},
      {"d_model=3,n_heads=2,d_key=6,n_subkeys=32,top_k=1,subkey_top_k=1", 40},
      {"d_model=8,n_heads=8,d_key=16,n_subkeys=32,top_k=9,subkey_top_k=20,shared_keys=1", 40},
      {"d_model=4,n_heads=1,d_key=2,n_subkeys=3,top_k=2,subkey_top_k=3", 40},
      {"d_model=6,n_heads=6,d_key=4,n_subkeys=12,top_k=12,subkey_top_k=12,shared_keys=1", 40},
  };
  int64_t ties = 0;
  for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
    const layer_case cc = case_of(&cases[i]), *c = &cc;
    peer_layer *L = make_layer(c, (peer_gate)(i % 3), PEER_F32);
    ref_fill_quantised(L, "query.weight", &rng, -1, 1, 1.0);
    ref_fill_quantised(L, "keys", &rng, -2, 2, 0.5);
    float *x = malloc((size_t)(c->T * c->d) * sizeof(float));
    for (int64_t j = 0; j < c->T * c->d; j++)
      x[j] = (float)ref_int(&rng, -2, 2);
    result r = result_new(c->T * c->H * c->k);
    check_against_brute(L, c, x, &r, seed);
    ties += check_order(&r, c, "quantised", seed);
    check_gates(&r, c->T, c->H, c->k, (int)(i % 3), seed);
    /* exact: ids and scores equal the reference's, every head */
    ref_layer R;
    ref_bind(&R, L);
    ref_token o;
    ref_token_alloc(&o, &R);
    for (int64_t t = 0; t < c->T; t++) {
      ref_forward_token(&R, x + t * c->d, &o, 0);
      for (int64_t h = 0; h < c->H; h++)
        for (int64_t j = 0; j < c->k; j++) {
          int64_t e = (t * c->H + h) * c->k + j;
          cr_assert(
              r.ids[e] == o.ids[h * (c->k + 1) + j] && (double)r.sc[e] == o.sc[h * (c->k + 1) + j],
              CASE_FMT " token %lld head %lld pos %lld: id %lld score %.9g, reference id "
                       "%lld score %.9g",
              CASE_ARGS(c, seed), (long long)t, (long long)h, (long long)j, (long long)r.ids[e],
              (double)r.sc[e], (long long)o.ids[h * (c->k + 1) + j], o.sc[h * (c->k + 1) + j]);
        }
    }
    ref_token_free(&o);
    result_free(&r);
    free(x);
    peer_layer_free(L);
  }
  cr_log_info("%lld equal adjacent scores among kept experts", (long long)ties);
  cr_assert_gt(ties, 500, "seed=%llu: quantised values produced only %lld ties",
               (unsigned long long)seed, (long long)ties);
}

/* Distinct sub-key scores whose sums round to the same f32.  Here s1 =
 * {1, 1 + 2^-23} and s2 = {4, 0} (d_key = 2, n = 2, k = k' = 1): the sums
 * 4 + 1 and 4 + (1 + 2^-23) both round to 5.0f, but their exact values
 * differ, and PEER.md orders by the exact sum: id 2 = (a 1, b 0) wins over
 * id 0 although both report 5.0f.  (Ordering the rounded floats by id would
 * pick id 0, which half 1's top-1 never holds: product keys and brute force
 * would disagree.) */
Test(retrieval, sums_rounding_to_one_float_are_ordered_exactly) {
  const layer_case c =
      case_make("d_model=2,n_heads=1,d_key=2,n_subkeys=2,top_k=1,subkey_top_k=1", 1);
  peer_layer *L = make_layer(&c, PEER_GATE_SOFTMAX, PEER_F32);
  peer_tensor wq, keys;
  cr_assert_eq(peer_layer_param_by_name(L, "query.weight", &wq), PEER_OK);
  cr_assert_eq(peer_layer_param_by_name(L, "keys", &keys), PEER_OK);
  float *W = wq.data, *C = keys.data; /* W [2, 2], keys [1, 2, 2, 1] */
  W[0] = 1.0f, W[1] = 0.0f, W[2] = 0.0f, W[3] = 1.0f;
  C[0] = 1.0f, C[1] = 1.0f + 0x1p-23f; /* C1: s1 = {1, 1 + 2^-23} */
  C[2] = 4.0f, C[3] = 0.0f;            /* C2: s2 = {4, 0} */
  const float x[2] = {1.0f, 1.0f};
  int64_t id_fast = -1, id_brute = -1;
  float s_fast = 0.0f, s_brute = 0.0f;
  cr_assert_eq(peer_retrieve_brute(L, 1, x, &id_brute, &s_brute, NULL), PEER_OK, "%s",
               peer_last_error());
  cr_assert_eq(id_brute, 2, "brute force: id %lld score %.9g", (long long)id_brute,
               (double)s_brute);
  cr_assert_eq(s_brute, 5.0f);
  cr_assert_eq(peer_retrieve(L, 1, x, &id_fast, &s_fast, NULL), PEER_OK, "%s", peer_last_error());
  cr_assert_eq(id_fast, 2, "product keys: id %lld score %.9g", (long long)id_fast, (double)s_fast);
  cr_assert_eq(s_fast, 5.0f);
  /* the mirror image: the larger exact sum at the smaller id */
  C[0] = 1.0f + 0x1p-23f, C[1] = 1.0f;
  cr_assert_eq(peer_retrieve_brute(L, 1, x, &id_brute, NULL, NULL), PEER_OK);
  cr_assert_eq(peer_retrieve(L, 1, x, &id_fast, NULL, NULL), PEER_OK);
  cr_assert(id_brute == 0 && id_fast == 0, "brute %lld, product keys %lld, want 0",
            (long long)id_brute, (long long)id_fast);
  /* an exact tie: the smaller id */
  C[0] = C[1] = 1.0f;
  cr_assert_eq(peer_retrieve_brute(L, 1, x, &id_brute, NULL, NULL), PEER_OK);
  cr_assert_eq(peer_retrieve(L, 1, x, &id_fast, NULL, NULL), PEER_OK);
  cr_assert(id_brute == 0 && id_fast == 0, "brute %lld, product keys %lld, want 0",
            (long long)id_brute, (long long)id_fast);
  peer_layer_free(L);
}

/* The same situation at random: half 1's scores are 1 or 1 + 2^-23 (a
 * quarter of the sums' ulp), half 2's are 4 + i * 2^-21, so many sums round
 * to one f32 while their exact values differ (or tie exactly).  Tokens scale
 * x by powers of 2, which keeps every sum exact in f64.  Product keys must
 * equal brute force and the exact order of the reference, id for id. */
Test(retrieval, sums_rounding_together_at_random_are_ordered_exactly) {
  uint64_t seed = ref_test_seed();
  cr_log_info("seed %llu", (unsigned long long)seed);
  ref_rng rng = {seed};
  const layer_case c =
      case_make("d_model=2,n_heads=8,d_key=2,n_subkeys=16,top_k=3,subkey_top_k=3", 3);
  peer_layer *L = make_layer(&c, PEER_GATE_SIGMOID, PEER_F32);
  peer_tensor wq, keys;
  cr_assert_eq(peer_layer_param_by_name(L, "query.weight", &wq), PEER_OK);
  cr_assert_eq(peer_layer_param_by_name(L, "keys", &keys), PEER_OK);
  float *W = wq.data, *C = keys.data;
  for (int64_t h = 0; h < c.H; h++) { /* q1 = x0, q2 = x1 for every head */
    W[(2 * h) * 2 + 0] = 1.0f, W[(2 * h) * 2 + 1] = 0.0f;
    W[(2 * h + 1) * 2 + 0] = 0.0f, W[(2 * h + 1) * 2 + 1] = 1.0f;
  }
  for (int64_t g = 0; g < c.H; g++)
    for (int64_t a = 0; a < c.n; a++) {
      C[(g * 2 + 0) * c.n + a] = 1.0f + (float)ref_int(&rng, 0, 1) * 0x1p-23f;
      C[(g * 2 + 1) * c.n + a] = 4.0f + (float)ref_int(&rng, 0, 3) * 0x1p-21f;
    }
  const float x[6] = {1.0f, 1.0f, 2.0f, 2.0f, 0.5f, 0.5f};
  result r = result_new(c.T * c.H * c.k);
  check_against_brute(L, &c, x, &r, seed);
  int64_t ties = check_order(&r, &c, "rounded ties", seed);
  cr_assert_gt(ties, 0, "seed=%llu: no sums rounded together", (unsigned long long)seed);
  /* every sum here is exact in f64: the ids must be the reference's, id for id */
  ref_layer R;
  ref_bind(&R, L);
  ref_token o;
  ref_token_alloc(&o, &R);
  for (int64_t t = 0; t < c.T; t++) {
    ref_forward_token(&R, x + t * c.d, &o, 0);
    for (int64_t h = 0; h < c.H; h++)
      for (int64_t j = 0; j < c.k; j++) {
        int64_t e = (t * c.H + h) * c.k + j, want = o.ids[h * (c.k + 1) + j];
        cr_assert_eq(r.ids[e], want,
                     "seed=%llu token %lld head %lld pos %lld: id %lld (exact %.17g), exact "
                     "order wants %lld (%.17g)",
                     (unsigned long long)seed, (long long)t, (long long)h, (long long)j,
                     (long long)r.ids[e], ref_score_of(&R, &o, h, r.ids[e]), (long long)want,
                     o.sc[h * (c.k + 1) + j]);
      }
  }
  ref_token_free(&o);
  result_free(&r);
  peer_layer_free(L);
}

/* Every gate kind on one random layer: gates are the gate of the scores. */
Test(retrieval, gates_are_the_gate_of_the_scores) {
  uint64_t seed = ref_test_seed();
  cr_log_info("seed %llu", (unsigned long long)seed);
  for (int gate = 0; gate < 3; gate++) {
    ref_rng rng = {seed};
    layer_case c =
        case_make("d_model=24,n_heads=3,d_key=16,n_subkeys=20,top_k=6,subkey_top_k=9", 37);
    if (gate == 1) case_set(&c, "shared_keys=1");
    peer_layer *L = make_layer(&c, (peer_gate)gate, PEER_F32);
    ref_fill_layer(L, &rng);
    float *x = ref_random_x(&rng, c.T, c.d);
    result r = result_new(c.T * c.H * c.k);
    cr_assert_eq(peer_retrieve(L, c.T, x, r.ids, r.sc, r.g), PEER_OK, "%s", peer_last_error());
    check_gates(&r, c.T, c.H, c.k, gate, seed);
    int64_t positive = 0;
    for (int64_t i = 0; i < c.T * c.H * c.k; i++)
      positive += r.g[i] > 0.0f;
    cr_assert_gt(positive, 0, "gate %d: every gate is 0", gate);
    if (gate == PEER_GATE_SOFTMAX) /* each head's gates sum to 1 */
      for (int64_t e = 0; e < c.T * c.H; e++) {
        double s = 0.0;
        for (int64_t j = 0; j < c.k; j++)
          s += r.g[e * c.k + j];
        cr_assert(fabs(s - 1.0) < 1e-5, "softmax gates of head %lld sum to %.9g", (long long)e, s);
      }
    result_free(&r);
    free(x);
    peer_layer_free(L);
  }
}

/* scores and gates are optional; the ids do not depend on asking for them. */
Test(retrieval, optional_outputs) {
  uint64_t seed = ref_test_seed();
  ref_rng rng = {seed};
  const layer_case c =
      case_make("d_model=10,n_heads=2,d_key=8,n_subkeys=9,top_k=3,subkey_top_k=4", 21);
  peer_layer *L = make_layer(&c, PEER_GATE_SOFTMAX, PEER_F32);
  ref_fill_layer(L, &rng);
  float *x = ref_random_x(&rng, c.T, c.d);
  int64_t m = c.T * c.H * c.k;
  result full = result_new(m), part = result_new(m);
  cr_assert_eq(peer_retrieve(L, c.T, x, full.ids, full.sc, full.g), PEER_OK);
  cr_assert_eq(peer_retrieve(L, c.T, x, part.ids, NULL, NULL), PEER_OK);
  cr_assert(memcmp(full.ids, part.ids, (size_t)m * sizeof(int64_t)) == 0, "seed=%llu",
            (unsigned long long)seed);
  cr_assert_eq(peer_retrieve(L, c.T, x, part.ids, NULL, part.g), PEER_OK);
  cr_assert(memcmp(full.g, part.g, (size_t)m * sizeof(float)) == 0);
  cr_assert_eq(peer_retrieve_brute(L, c.T, x, part.ids, NULL, NULL), PEER_OK);
  cr_assert(memcmp(full.ids, part.ids, (size_t)m * sizeof(int64_t)) == 0);
  /* retrieval alone never needs y or expert tables; indices is required */
  cr_assert_eq(peer_retrieve(L, c.T, x, NULL, full.sc, full.g), PEER_ERR_INVALID_ARGUMENT);
  cr_assert_eq(peer_retrieve_brute(L, c.T, x, NULL, NULL, NULL), PEER_ERR_INVALID_ARGUMENT);
  cr_assert_eq(peer_retrieve(NULL, c.T, x, full.ids, NULL, NULL), PEER_ERR_INVALID_ARGUMENT);
  cr_assert_eq(peer_retrieve(L, c.T, NULL, full.ids, NULL, NULL), PEER_ERR_INVALID_ARGUMENT);
  cr_assert_eq(peer_retrieve(L, -1, x, full.ids, NULL, NULL), PEER_ERR_INVALID_ARGUMENT);
  /* T = 0 writes nothing */
  int64_t sentinel = -77;
  cr_assert_eq(peer_retrieve(L, 0, x, &sentinel, NULL, NULL), PEER_OK);
  cr_assert_eq(peer_retrieve_brute(L, 0, x, &sentinel, NULL, NULL), PEER_OK);
  cr_assert_eq(sentinel, -77);
  result_free(&full);
  result_free(&part);
  free(x);
  peer_layer_free(L);
}

/* Bitwise the same result whatever the thread count. */
Test(retrieval, thread_count_does_not_change_bits) {
  uint64_t seed = ref_test_seed();
  cr_log_info("seed %llu", (unsigned long long)seed);
  ref_rng rng = {seed};
  const layer_case c =
      case_make("d_model=30,n_heads=5,d_key=24,n_subkeys=40,top_k=8,subkey_top_k=11", 97);
  peer_layer *L = make_layer(&c, PEER_GATE_SOFTMAX, PEER_F32);
  ref_fill_layer(L, &rng);
  float *x = ref_random_x(&rng, c.T, c.d);
  int64_t m = c.T * c.H * c.k;
  result r1 = result_new(m), rn = result_new(m);
  cr_assert_eq(peer_layer_set_threads(L, 1), PEER_OK);
  cr_assert_eq(peer_retrieve(L, c.T, x, r1.ids, r1.sc, r1.g), PEER_OK);
  for (int th = 2; th <= 4; th++) {
    cr_assert_eq(peer_layer_set_threads(L, th), PEER_OK);
    for (int brute = 0; brute < 2; brute++) {
      peer_status st = brute ? peer_retrieve_brute(L, c.T, x, rn.ids, rn.sc, rn.g)
                             : peer_retrieve(L, c.T, x, rn.ids, rn.sc, rn.g);
      cr_assert_eq(st, PEER_OK);
      cr_assert(memcmp(r1.ids, rn.ids, (size_t)m * sizeof(int64_t)) == 0 &&
                    memcmp(r1.sc, rn.sc, (size_t)m * sizeof(float)) == 0 &&
                    memcmp(r1.g, rn.g, (size_t)m * sizeof(float)) == 0,
                "seed=%llu threads=%d brute=%d: result differs from 1 thread",
                (unsigned long long)seed, th, brute);
    }
  }
  result_free(&r1);
  result_free(&rn);
  free(x);
  peer_layer_free(L);
}

/* rowops.h's peer_order_key, which the CUDA top-k' compares and sorts,
 * orders pairs as peer_beats does: scores from a set with signed zeros,
 * infinities, the largest and smallest floats (so that ties are common),
 * ids to 2^31 - 1; a NaN below every number; every key above 0 (the
 * kernel's empty place); the id comes back. */
Test(retrieval, order_key_is_the_tie_rule) {
  static const float v[] = {-INFINITY, -FLT_MAX, -1.5f, -1.0f,   -0x1p-149f, -0.0f,
                            0.0f,      0x1p-149f, 1.0f,  1.5f,   FLT_MAX,    INFINITY};
  static const int64_t ids[] = {0, 1, 2, 1000, 4095, 0x7fffffff};
  const int nv = (int)(sizeof v / sizeof v[0]), ni = (int)(sizeof ids / sizeof ids[0]);
  for (int a = 0; a < nv; a++)
    for (int ia = 0; ia < ni; ia++) {
      const uint64_t ka = peer_order_key(v[a], ids[ia]);
      cr_assert_eq(peer_order_key_id(ka), ids[ia]);
      cr_assert(ka > peer_order_key(NAN, ids[ia]) && peer_order_key(NAN, ids[ia]) > 0);
      for (int b = 0; b < nv; b++)
        for (int ib = 0; ib < ni; ib++) {
          if (ib == ia) continue;
          const uint64_t kb = peer_order_key(v[b], ids[ib]);
          cr_assert_eq(ka > kb, peer_beats(v[a], ids[ia], v[b], ids[ib]) != 0,
                       "(%g, %lld) against (%g, %lld)", (double)v[a], (long long)ids[ia],
                       (double)v[b], (long long)ids[ib]);
        }
    }
}
