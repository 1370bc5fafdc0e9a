/* c_example.c: peer inside a training step, the way a C transformer codebase
 * would use it.  A toy residual network of N_BLOCKS blocks, each
 * h <- h + PEER_l(h), with one peer layer, one context and one optimizer per
 * block; every activation, gradient and scratch buffer is the caller's own,
 * allocated once before the loop.  It regresses a fixed random target and
 * exits non-zero if the loss does not fall (tests run it as a smoke test). */
#include <peer.h>
#include <stdio.h>
#include <stdlib.h>

#define N_BLOCKS 2
#define T 64 /* tokens per batch (batch * sequence, flattened) */
#define STEPS 60

#define CHECK(call)                                                          \
  do {                                                                       \
    peer_status st_ = (call);                                                \
    if (st_) {                                                               \
      fprintf(stderr, "c_example: %s: %s\n", #call, peer_last_error());      \
      exit(1);                                                               \
    }                                                                        \
  } while (0)

typedef struct block {
  peer_layer *layer;
  peer_context *ctx;
  peer_optimizer *opt;
  float *gwq, *gkeys, *gdown, *gup, *dx; /* caller-owned gradient buffers */
  int64_t *rows;
} block;

static float *floats(int64_t n) {
  float *p = calloc((size_t)n, sizeof *p);
  if (!p) {
    fprintf(stderr, "c_example: out of memory\n");
    exit(1);
  }
  return p;
}

static size_t numel(peer_layer *layer, const char *name) {
  peer_tensor t;
  CHECK(peer_layer_param_by_name(layer, name, &t));
  return t.nbytes / peer_dtype_size(t.dtype);
}

int main(void) {
  peer_config cfg;
  peer_config_default(&cfg);
  CHECK(peer_config_parse(&cfg, "d_model=32,n_heads=2,d_key=16,n_subkeys=16,top_k=4"));
  CHECK(peer_config_validate(&cfg));
  const int64_t d = cfg.d_model, cap = T * cfg.n_heads * cfg.top_k;

  peer_optim_config oc = peer_optim_config_default(); /* Adam; lazy expert rows */
  oc.lr = 3e-3f;
  oc.expert_lr = 1e-2f;
  block b[N_BLOCKS];
  for (int l = 0; l < N_BLOCKS; l++) {
    CHECK(peer_layer_create(&b[l].layer, &cfg, NULL));
    CHECK(peer_layer_init(b[l].layer, (uint64_t)l + 1));
    CHECK(peer_context_create(&b[l].ctx, b[l].layer, T));
    CHECK(peer_optimizer_create(&b[l].opt, b[l].layer, &oc));
    b[l].gwq = floats((int64_t)numel(b[l].layer, "query.weight"));
    b[l].gkeys = floats((int64_t)numel(b[l].layer, "keys"));
    b[l].gdown = floats(cap * d), b[l].gup = floats(cap * d), b[l].dx = floats(T * d);
    b[l].rows = calloc((size_t)cap, sizeof *b[l].rows);
  }
  /* h[l] is block l's input: kept until backward, as peer_forward_train asks. */
  float *h[N_BLOCKS + 1], *y = floats(T * d), *dh = floats(T * d), *target = floats(T * d);
  for (int l = 0; l <= N_BLOCKS; l++) h[l] = floats(T * d);
  srand(7);
  for (int64_t i = 0; i < T * d; i++) {
    h[0][i] = (float)rand() / RAND_MAX - 0.5f;
    target[i] = h[0][i] + 0.3f * ((float)rand() / RAND_MAX - 0.5f);
  }

  double first = 0, last = 0;
  for (int step = 0; step < STEPS; step++) {
    for (int l = 0; l < N_BLOCKS; l++) { /* forward: residual stream */
      CHECK(peer_forward_train(b[l].layer, b[l].ctx, T, h[l], y));
      for (int64_t i = 0; i < T * d; i++) h[l + 1][i] = h[l][i] + y[i];
    }
    double loss = 0; /* mean squared error and its gradient */
    for (int64_t i = 0; i < T * d; i++) {
      float e = h[N_BLOCKS][i] - target[i];
      loss += (double)e * e;
      dh[i] = 2.0f * e / (float)(T * d);
    }
    loss /= (double)(T * d);
    for (int l = N_BLOCKS - 1; l >= 0; l--) { /* backward, then a sparse step */
      peer_grads g = {.query_weight = b[l].gwq, .keys = b[l].gkeys, .expert_capacity = cap,
                      .expert_rows = b[l].rows, .experts_down = b[l].gdown,
                      .experts_up = b[l].gup};
      CHECK(peer_backward(b[l].layer, b[l].ctx, dh, b[l].dx, &g));
      CHECK(peer_optimizer_step(b[l].opt, &g));
      for (int64_t i = 0; i < T * d; i++) dh[i] += b[l].dx[i]; /* residual */
    }
    if (step == 0) first = loss;
    last = loss;
    if (step % 20 == 0 || step == STEPS - 1) printf("step %2d  loss %.6f\n", step, loss);
  }

  for (int l = 0; l < N_BLOCKS; l++) {
    peer_optimizer_free(b[l].opt);
    peer_context_free(b[l].ctx);
    peer_layer_free(b[l].layer);
    free(b[l].gwq), free(b[l].gkeys), free(b[l].gdown), free(b[l].gup), free(b[l].dx);
    free(b[l].rows);
  }
  for (int l = 0; l <= N_BLOCKS; l++) free(h[l]);
  free(y), free(dh), free(target);
  if (!(last < 0.5 * first)) {
    fprintf(stderr, "c_example: loss did not fall (%.6f -> %.6f)\n", first, last);
    return 1;
  }
  return 0;
}
