/* test_regression.c: the layer learns.  A small regression task (targets from
 * a fixed random teacher network) trained for a few hundred steps with the
 * library's forward_train, backward and Adam with sparse expert rows: the
 * held-out loss must fall by a stated factor, and training must be
 * deterministic (two runs give the same bits). */
#include <criterion/criterion.h>

#include "peer.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

enum { D = 16, BATCH = 64, STEPS = 300, HIDDEN = 32, EVAL = 256 };

/* Loss after training must be at most this fraction of the loss before. */
#define LOSS_FACTOR 0.25

static uint64_t rng_next(uint64_t *s) {
  uint64_t z = (*s += 0x9e3779b97f4a7c15ull);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

static float uniform(uint64_t *s) { return (float)(rng_next(s) >> 40) / 16777216.0f * 2.0f - 1.0f; }

/* The teacher: t(x) = W2 tanh(W1 x), fixed random weights. */
typedef struct teacher {
  float w1[HIDDEN][D], w2[D][HIDDEN];
} teacher;

static void teach(const teacher *t, const float *x, float *y) {
  float h[HIDDEN];
  for (int j = 0; j < HIDDEN; j++) {
    float s = 0.0f;
    for (int i = 0; i < D; i++) s += t->w1[j][i] * x[i];
    h[j] = tanhf(s);
  }
  for (int i = 0; i < D; i++) {
    float s = 0.0f;
    for (int j = 0; j < HIDDEN; j++) s += t->w2[i][j] * h[j];
    y[i] = s;
  }
}

static void make_batch(uint64_t *s, const teacher *t, int n, float *x, float *y) {
  for (int r = 0; r < n; r++) {
    for (int i = 0; i < D; i++) x[r * D + i] = uniform(s) * 1.5f;
    teach(t, x + r * D, y + r * D);
  }
}

/* Mean squared error of the layer's inference forward on (x, y). */
static double eval_loss(peer_layer *L, const float *x, const float *y, int n, float *out) {
  cr_assert_eq(peer_forward(L, n, x, out, NULL, NULL), PEER_OK, "%s", peer_last_error());
  double s = 0.0;
  for (int i = 0; i < n * D; i++) s += ((double)out[i] - y[i]) * ((double)out[i] - y[i]);
  return s / (n * D);
}

typedef struct run_result {
  double before, after;
  float final_y[EVAL * D];
} run_result;

static void train(run_result *res, int threads, const char *cfg_text) {
  uint64_t s = 42;
  teacher t;
  for (int j = 0; j < HIDDEN; j++)
    for (int i = 0; i < D; i++) t.w1[j][i] = uniform(&s) * 0.6f;
  for (int i = 0; i < D; i++)
    for (int j = 0; j < HIDDEN; j++) t.w2[i][j] = uniform(&s) * 0.4f;

  peer_config cfg;
  peer_config_default(&cfg);
  cr_assert_eq(peer_config_parse(&cfg, "d_model=16,n_heads=4,d_key=16,n_subkeys=16,top_k=4"),
               PEER_OK);
  cr_assert_eq(peer_config_parse(&cfg, cfg_text), PEER_OK, "%s", peer_last_error());
  peer_options opt;
  peer_options_default(&opt);
  opt.n_threads = threads;
  peer_layer *L = NULL;
  cr_assert_eq(peer_layer_create(&L, &cfg, &opt), PEER_OK, "%s", peer_last_error());
  cr_assert_eq(peer_layer_init(L, 7), PEER_OK);
  peer_optim_config oc = peer_optim_config_default();
  oc.lr = 3e-3f;
  oc.expert_lr = 1e-2f;
  peer_optimizer *O = NULL;
  cr_assert_eq(peer_optimizer_create(&O, L, &oc), PEER_OK, "%s", peer_last_error());
  peer_context *ctx = NULL;
  cr_assert_eq(peer_context_create(&ctx, L, BATCH), PEER_OK);

  const int64_t hk = cfg.n_heads * cfg.top_k, dq = cfg.n_heads * cfg.d_key;
  const int64_t key_count = cfg.n_heads * 2 * cfg.n_subkeys * (cfg.d_key / 2);
  float *ex = malloc(sizeof(float) * EVAL * D), *ey = malloc(sizeof(float) * EVAL * D);
  float *x = malloc(sizeof(float) * BATCH * D), *y = malloc(sizeof(float) * BATCH * D);
  float *out = malloc(sizeof(float) * BATCH * D), *dy = malloc(sizeof(float) * BATCH * D);
  float *gw = malloc(sizeof(float) * (size_t)(dq * D)), *gk = malloc(sizeof(float) * (size_t)key_count);
  float *gnw = malloc(sizeof(float) * (size_t)dq), *gnb = malloc(sizeof(float) * (size_t)dq);
  float *gd = malloc(sizeof(float) * (size_t)(BATCH * hk * D));
  float *gu = malloc(sizeof(float) * (size_t)(BATCH * hk * D));
  int64_t *rows = malloc(sizeof(int64_t) * (size_t)(BATCH * hk));
  uint64_t es = 1234;
  make_batch(&es, &t, EVAL, ex, ey);
  res->before = eval_loss(L, ex, ey, EVAL, res->final_y);

  bool bn = cfg.query_norm == PEER_NORM_BATCHNORM;
  peer_grads g = {.query_weight = gw, .keys = gk, .norm_weight = bn ? gnw : NULL,
                  .norm_bias = bn ? gnb : NULL, .expert_capacity = BATCH * hk,
                  .expert_rows = rows, .experts_down = gd, .experts_up = gu};
  for (int step = 0; step < STEPS; step++) {
    make_batch(&s, &t, BATCH, x, y);
    cr_assert_eq(peer_forward_train(L, ctx, BATCH, x, out), PEER_OK, "%s", peer_last_error());
    for (int i = 0; i < BATCH * D; i++) dy[i] = 2.0f * (out[i] - y[i]) / (BATCH * D);
    cr_assert_eq(peer_backward(L, ctx, dy, NULL, &g), PEER_OK, "%s", peer_last_error());
    cr_assert_eq(peer_optimizer_step(O, &g), PEER_OK, "%s", peer_last_error());
  }
  res->after = eval_loss(L, ex, ey, EVAL, res->final_y);

  free(ex), free(ey), free(x), free(y), free(out), free(dy), free(gw), free(gk);
  free(gnw), free(gnb), free(gd), free(gu), free(rows);
  peer_context_free(ctx);
  peer_optimizer_free(O);
  peer_layer_free(L);
}

Test(regression, loss_falls_by_the_stated_factor) {
  const char *configs[] = {"", "query_norm=batchnorm", "weight_dtype=bf16,activation=relu"};
  for (int c = 0; c < 3; c++) {
    run_result *r = malloc(sizeof *r);
    train(r, 0, configs[c]);
    cr_log_info("config '%s': loss %.5f -> %.5f (x%.3f)", configs[c], r->before, r->after,
                r->after / r->before);
    cr_expect(r->after <= LOSS_FACTOR * r->before,
              "config '%s': held-out loss %.5f -> %.5f after %d steps, wanted at most x%.2f",
              configs[c], r->before, r->after, STEPS, LOSS_FACTOR);
    free(r);
  }
}

Test(regression, training_is_deterministic_across_thread_counts) {
  run_result *a = malloc(sizeof *a), *b = malloc(sizeof *b);
  train(a, 1, "query_norm=batchnorm");
  train(b, 2, "query_norm=batchnorm");
  cr_expect(memcmp(a->final_y, b->final_y, sizeof a->final_y) == 0,
            "300 steps with 1 and 2 threads end with different outputs");
  free(a), free(b);
}
