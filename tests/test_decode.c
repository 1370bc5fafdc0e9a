/* test_decode.c: the small-batch forward (peer/cpu_decode.c: T <= 8 tokens,
 * one parallel region, on the avx512bf16 variant) gives the batch path's
 * bits: y, ids and gates of a layer whose parameters were never handed out
 * (loaded from a weight file, so the path may run), called on 1 to 13
 * tokens at a time and on 1, 2 and 3 threads, against the same layer with
 * its parameters handed out (the batch path, f32 scores) called on the whole
 * batch; over every option (bias, batch norm, gates, activations, shared
 * keys, bf16 tables) and widths whose y columns do not split evenly.  Also:
 * a Wq written after the copy was made is never used stale, and non-finite
 * values give the batch path's error.  On the avx512bf16 variant the test
 * also checks that the path ran (the layer's Wq copy exists). */
#include <criterion/criterion.h>

#include "cases.h"
#include "cpu.h"
#include "reference.h"

#include <stdlib.h>
#include <string.h>

static bool decode_variant(void) {
  const peer_cpu_impl *impl = peer_cpu_select();
  return impl && !strcmp(impl->name, "avx512bf16");
}

typedef struct outputs {
  float *y, *g;
  int64_t *ids;
} outputs;

static outputs outputs_of(const layer_case *c) {
  const int64_t hk = c->H * c->k;
  outputs o = {malloc((size_t)(c->T * c->d) * sizeof(float)),
               malloc((size_t)(c->T * hk) * sizeof(float)),
               malloc((size_t)(c->T * hk) * sizeof(int64_t))};
  return o;
}

static void outputs_free(outputs o) { free(o.y), free(o.g), free(o.ids); }

/* L's forward of c->T tokens in calls of `step` tokens. */
static void forward_in(peer_layer *L, const layer_case *c, const float *x, int64_t step,
                       outputs o) {
  const int64_t hk = c->H * c->k;
  for (int64_t t0 = 0; t0 < c->T; t0 += step) {
    const int64_t nt = c->T - t0 < step ? c->T - t0 : step;
    cr_assert_eq(
        peer_forward(L, nt, x + t0 * c->d, o.y + t0 * c->d, o.ids + t0 * hk, o.g + t0 * hk),
        PEER_OK, "%s: %s", case_text(c), peer_last_error());
  }
}

static void check_same(const layer_case *c, outputs want, outputs got, const char *what) {
  const int64_t hk = c->H * c->k;
  for (int64_t i = 0; i < c->T * hk; i++)
    cr_assert(want.ids[i] == got.ids[i] && !memcmp(&want.g[i], &got.g[i], sizeof(float)),
              "%s %s: entry %lld (token %lld): id %lld gate %a, the batch path's id %lld gate %a",
              case_text(c), what, (long long)i, (long long)(i / hk), (long long)got.ids[i],
              (double)got.g[i], (long long)want.ids[i], (double)want.g[i]);
  for (int64_t i = 0; i < c->T * c->d; i++)
    cr_assert(!memcmp(&want.y[i], &got.y[i], sizeof(float)),
              "%s %s: y[%lld][%lld] = %a, the batch path's %a", case_text(c), what,
              (long long)(i / c->d), (long long)(i % c->d), (double)got.y[i], (double)want.y[i]);
}

/* A's batch forward (parameters handed out) against B's small calls. */
static void check_decode(peer_layer *A, peer_layer *B, const layer_case *c, const float *x) {
  static const int64_t steps[] = {1, 2, 4, 8, 13};
  static const int threads[] = {1, 2, 3};
  outputs want = outputs_of(c), got = outputs_of(c);
  forward_in(A, c, x, c->T, want);
  for (size_t s = 0; s < sizeof steps / sizeof steps[0]; s++)
    for (size_t p = 0; p < sizeof threads / sizeof threads[0]; p++) {
      if (s % 2 != p % 2 && p != 0) continue; /* a subset of the pairs */
      cr_assert_eq(peer_layer_set_threads(B, threads[p]), PEER_OK);
      memset(got.y, 0xff, (size_t)(c->T * c->d) * sizeof(float));
      forward_in(B, c, x, steps[s], got);
      char what[64];
      snprintf(what, sizeof what, "(calls of %lld tokens, %d threads)", (long long)steps[s],
               threads[p]);
      check_same(c, want, got, what);
    }
  if (decode_variant())
    cr_assert(B->wq_blocks.valid, "%s: the small-batch path never ran", case_text(c));
  outputs_free(want), outputs_free(got);
}

/* A random layer of case c, checked by check_decode. */
static void check_case(const layer_case *c, ref_rng *rng) {
  peer_layer *A = case_layer(c);
  ref_fill_layer(A, rng);
  peer_layer *B = case_reloaded(A);
  float *x = ref_random_x(rng, c->T, c->d);
  check_decode(A, B, c, x);
  free(x);
  peer_layer_free(A);
  peer_layer_free(B);
}

Test(decode, every_option_gives_the_batch_path_bits) {
  static const char *const base = "d_model=64,n_heads=2,d_key=64,n_subkeys=256,top_k=4";
  static const char *const extras[] = {
      "",
      "query_bias=1",
      "query_norm=batchnorm",
      "gate=sigmoid,activation=relu",
      "gate=relu,activation=gelu_tanh",
      "activation=silu,shared_keys=1",
      "activation=identity,weight_dtype=bf16",
      "weight_dtype=bf16,d_model=200,query_bias=1",
      "d_model=77,n_heads=5,d_key=128,n_subkeys=512,top_k=16,subkey_top_k=32",
      "d_model=136,n_heads=3,d_key=192,n_subkeys=512,top_k=8,query_norm=batchnorm,"
      "weight_dtype=bf16",
  };
  uint64_t seed = ref_test_seed();
  cr_log_info("seed %llu", (unsigned long long)seed);
  ref_rng rng = {seed};
  for (size_t e = 0; e < sizeof extras / sizeof extras[0]; e++) {
    layer_case c = case_make(base, 37);
    if (extras[e][0]) case_set(&c, extras[e]);
    check_case(&c, &rng);
  }
}

/* The reference widths, as decoding runs them (fewer experts: the layer goes
 * through a weight file). */
Test(decode, reference_widths) {
  layer_case c = case_make("d_model=512,n_heads=8,d_key=256,n_subkeys=128,top_k=16", 20);
  ref_rng rng = {ref_test_seed()};
  check_case(&c, &rng);
}

/* The Wq copy follows the weights: re-made after peer_layer_init, and not
 * used once query.weight has been handed out (and written in place). */
Test(decode, a_stale_wq_copy_is_never_used) {
  layer_case c = case_make("d_model=64,n_heads=2,d_key=64,n_subkeys=256,top_k=4", 9);
  ref_rng rng = {ref_test_seed()};
  peer_layer *A = case_layer(&c);
  ref_fill_layer(A, &rng);
  peer_layer *B = case_reloaded(A);
  float *x = ref_random_x(&rng, c.T, c.d);
  check_decode(A, B, &c, x);
  cr_assert_eq(peer_layer_init(A, 77), PEER_OK);
  cr_assert_eq(peer_layer_init(B, 77), PEER_OK);
  check_decode(A, B, &c, x);
  peer_tensor wa, wb;
  cr_assert_eq(peer_layer_param_by_name(A, "query.weight", &wa), PEER_OK);
  cr_assert_eq(peer_layer_param_by_name(B, "query.weight", &wb), PEER_OK);
  for (int64_t i = 0; i < c.H * c.dk * c.d; i++) {
    float v = ((float *)wa.data)[i] * -1.25f + 0.01f;
    ((float *)wa.data)[i] = v, ((float *)wb.data)[i] = v;
  }
  outputs want = outputs_of(&c), got = outputs_of(&c);
  forward_in(A, &c, x, c.T, want);
  forward_in(B, &c, x, 1, got);
  check_same(&c, want, got, "(query.weight written in place)");
  outputs_free(want), outputs_free(got);
  free(x);
  peer_layer_free(A);
  peer_layer_free(B);
}

/* Non-finite values: the batch path's status and message, whatever the
 * thread count. */
Test(decode, nonfinite_values_give_the_batch_path_error) {
  layer_case c = case_make("d_model=64,n_heads=4,d_key=64,n_subkeys=256,top_k=4,query_bias=1", 6);
  ref_rng rng = {ref_test_seed()};
  for (int which = 0; which < 3; which++) {
    peer_layer *A = case_layer(&c);
    ref_fill_layer(A, &rng);
    float *x = ref_random_x(&rng, c.T, c.d);
    if (which == 0) x[3 * c.d + 5] = NAN; /* token 3 */
    peer_tensor t;
    if (which == 1) { /* head 2's queries, every token */
      cr_assert_eq(peer_layer_param_by_name(A, "query.weight", &t), PEER_OK);
      ((float *)t.data)[(2 * c.dk + 7) * c.d + 3] = INFINITY;
    }
    if (which == 2) { /* head 1's bias; token 4's x overflows head 3 */
      cr_assert_eq(peer_layer_param_by_name(A, "query.bias", &t), PEER_OK);
      ((float *)t.data)[c.dk + 1] = NAN;
      for (int64_t i = 0; i < c.d; i++)
        x[4 * c.d + i] = 3e38f;
    }
    peer_layer *B = case_reloaded(A);
    outputs o = outputs_of(&c);
    cr_assert_eq(peer_forward(A, c.T, x, o.y, o.ids, o.g), PEER_ERR_NONFINITE);
    char want[512];
    snprintf(want, sizeof want, "%s", peer_last_error());
    for (int p = 1; p <= 2; p++) {
      cr_assert_eq(peer_layer_set_threads(B, p), PEER_OK);
      cr_assert_eq(peer_forward(B, c.T, x, o.y, o.ids, o.g), PEER_ERR_NONFINITE, "case %d", which);
      cr_assert_str_eq(peer_last_error(), want, "case %d, %d threads", which, p);
    }
    outputs_free(o);
    free(x);
    peer_layer_free(A);
    peer_layer_free(B);
  }
}
