/* train_ab.c: two builds of the library side by side on the training step
 * (peer_forward_train + peer_backward) of the reference layer (d=512, H=8,
 * d_key=256, n=1024, k=16, batch 512): both libpeer.so are dlopen'ed into one
 * process, each makes the same layer (same seed) and the calls alternate
 * A B, B A, ... on the same inputs, so both meet the same machine load.  Per
 * call: CPU time of the calling thread (with OMP_WAIT_POLICY=passive the
 * time it worked), of the process, and wall time; medians and quartiles, the
 * per-iteration ratio A/B, and a hash of every output (y, dx, the query and
 * key gradients, the expert rows and their gradient rows) of the first three
 * steps: exit status 1 when the two builds' bits differ.  Plain C on the
 * public API, so it loads an old library too (bench/README.md, "Training
 * step: streamed expert gradients").  Needs about 2 x 4.5 GiB with f32
 * tables.
 *   cc -O2 -Iinclude bench/train_ab.c -ldl -o train_ab
 *   OMP_WAIT_POLICY=passive ./train_ab OLD/libpeer.so NEW/libpeer.so THREADS f32|bf16 ITERS [BN [fwd]]
 * With `fwd`, the calls are peer_forward alone (hash of y and the ids). */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <peer.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <time.h>

typedef struct api {
  void (*config_default)(peer_config *);
  void (*options_default)(peer_options *);
  peer_status (*create)(peer_layer **, const peer_config *, const peer_options *);
  peer_status (*init)(peer_layer *, uint64_t);
  peer_status (*set_threads)(peer_layer *, int);
  peer_status (*ctx_create)(peer_context **, const peer_layer *, int64_t);
  peer_status (*fwd_train)(peer_layer *, peer_context *, int64_t, const float *, float *);
  peer_status (*bwd)(peer_layer *, peer_context *, const float *, float *, peer_grads *);
  peer_status (*fwd)(peer_layer *, int64_t, const float *, float *, int64_t *, float *);
  const char *(*last_error)(void);
} api;

static void load(const char *path, api *a) {
  void *h = dlopen(path, RTLD_NOW | RTLD_LOCAL);
  if (!h) { fprintf(stderr, "%s\n", dlerror()); exit(1); }
#define S(f, n) *(void **)&a->f = dlsym(h, n); if (!a->f) { fprintf(stderr, "no %s\n", n); exit(1); }
  S(config_default, "peer_config_default");
  S(options_default, "peer_options_default");
  S(create, "peer_layer_create");
  S(init, "peer_layer_init");
  S(set_threads, "peer_layer_set_threads");
  S(ctx_create, "peer_context_create");
  S(fwd_train, "peer_forward_train");
  S(bwd, "peer_backward");
  S(fwd, "peer_forward");
  S(last_error, "peer_last_error");
}

static double tcpu(int who) {
  struct rusage r;
  getrusage(who, &r);
  return r.ru_utime.tv_sec + r.ru_utime.tv_usec * 1e-6 + r.ru_stime.tv_sec + r.ru_stime.tv_usec * 1e-6;
}
static double wall(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return ts.tv_sec + ts.tv_nsec * 1e-9;
}
static uint64_t h64(uint64_t h, const void *p, size_t n) {
  const uint64_t *c = p;
  for (size_t i = 0; i < n / 8; i++) h = (h ^ c[i]) * 1099511628211ull;
  return h;
}
static uint64_t rng = 88172645463325252ull;
static double urand(void) {
  rng ^= rng << 13; rng ^= rng >> 7; rng ^= rng << 17;
  return (double)(rng >> 11) / 9007199254740992.0;
}
static int cmpd(const void *a, const void *b) {
  double x = *(const double *)a, y = *(const double *)b;
  return x < y ? -1 : x > y;
}

typedef struct side {
  api a;
  peer_layer *L;
  peer_context *ctx;
  peer_grads g;
  float *y, *dx, *gwq, *gk, *gd, *gu, *gnw, *gnb;
  int64_t *rows, *ids;
  double *tc, *pc, *wc;
  uint64_t h;
} side;

int main(int argc, char **argv) {
  if (argc < 6 || atoi(argv[5]) < 1 || atoi(argv[5]) > 4096) {
    fprintf(stderr, "usage: train_ab LIB_A LIB_B THREADS f32|bf16 ITERS(1..4096) [BN 0|1 [fwd]]\n");
    return 2;
  }
  int P = atoi(argv[3]);
  int bf16 = strcmp(argv[4], "bf16") == 0;
  int iters = atoi(argv[5]);
  int bn = argc > 6 && atoi(argv[6]);
  int fwd_only = argc > 7 && strcmp(argv[7], "fwd") == 0;
  const int64_t T = 512, nb = 8;
  side s[2];
  memset(s, 0, sizeof s);
  load(argv[1], &s[0].a);
  load(argv[2], &s[1].a);
  int64_t d = 0, hk = 0, dq = 0, nk = 0;
  for (int i = 0; i < 2; i++) {
    side *z = &s[i];
    peer_config cfg;
    z->a.config_default(&cfg);
    cfg.weight_dtype = bf16 ? PEER_BF16 : PEER_F32;
    if (bn) cfg.query_norm = PEER_NORM_BATCHNORM;
    peer_options opt;
    z->a.options_default(&opt);
    if (z->a.create(&z->L, &cfg, &opt) || z->a.init(z->L, 5) || z->a.set_threads(z->L, P)) {
      fprintf(stderr, "%s\n", z->a.last_error());
      return 1;
    }
    d = cfg.d_model, hk = cfg.n_heads * cfg.top_k, dq = cfg.n_heads * cfg.d_key;
    nk = cfg.n_heads * cfg.n_subkeys * cfg.d_key;
    z->y = malloc(4 * T * d), z->dx = malloc(4 * T * d);
    z->gwq = calloc(dq * d, 4), z->gk = calloc(nk, 4);
    z->gd = calloc(T * hk * d, 4), z->gu = calloc(T * hk * d, 4);
    z->gnw = calloc(dq, 4), z->gnb = calloc(dq, 4);
    z->rows = calloc(T * hk, 8), z->ids = calloc(T * hk, 8);
    z->g.query_weight = z->gwq, z->g.keys = z->gk, z->g.expert_capacity = T * hk;
    z->g.expert_rows = z->rows, z->g.experts_down = z->gd, z->g.experts_up = z->gu;
    if (bn) z->g.norm_weight = z->gnw, z->g.norm_bias = z->gnb;
    if (z->a.ctx_create(&z->ctx, z->L, T)) return 1;
    z->tc = malloc(8 * iters), z->pc = malloc(8 * iters), z->wc = malloc(8 * iters);
    z->h = 1469598103934665603ull;
  }
  float *pool = malloc(sizeof(float) * nb * T * d), *dy = malloc(sizeof(float) * T * d);
  for (int64_t i = 0; i < nb * T * d; i++) pool[i] = (float)(urand() * 2 - 1);
  for (int64_t i = 0; i < T * d; i++) dy[i] = (float)(urand() * 2 - 1) * 0.01f;
  for (int it = -1; it < iters; it++) {
    const float *x = pool + ((it + 1) % nb) * T * d;
    for (int j = 0; j < 2; j++) {
      int i = (it & 1) ? 1 - j : j; /* A B, B A, ... */
      side *z = &s[i];
      double t0 = tcpu(RUSAGE_THREAD), p0 = tcpu(RUSAGE_SELF), w0 = wall();
      if (fwd_only ? z->a.fwd(z->L, T, x, z->y, z->ids, NULL) != PEER_OK
                   : z->a.fwd_train(z->L, z->ctx, T, x, z->y) ||
                         z->a.bwd(z->L, z->ctx, dy, z->dx, &z->g)) {
        fprintf(stderr, "%s\n", z->a.last_error());
        return 1;
      }
      double t1 = tcpu(RUSAGE_THREAD), p1 = tcpu(RUSAGE_SELF), w1 = wall();
      if (it >= 0) z->tc[it] = t1 - t0, z->pc[it] = p1 - p0, z->wc[it] = w1 - w0;
      if (it < 3) {
        uint64_t h = z->h;
        h = h64(h, z->y, 4 * T * d);
        if (fwd_only) {
          z->h = h64(h, z->ids, 8 * T * hk);
          continue;
        }
        h = h64(h, z->dx, 4 * T * d);
        h = h64(h, z->gwq, 4 * dq * d);
        h = h64(h, z->gk, 4 * nk);
        h = h64(h, &z->g.n_expert_rows, 8);
        h = h64(h, z->rows, 8 * z->g.n_expert_rows);
        h = h64(h, z->gd, 4 * z->g.n_expert_rows * d);
        h = h64(h, z->gu, 4 * z->g.n_expert_rows * d);
        if (bn) h = h64(h, z->gnw, 4 * dq), h = h64(h, z->gnb, 4 * dq);
        z->h = h;
      }
    }
  }
  double ratio_t[4096], ratio_w[4096];
  for (int it = 0; it < iters; it++)
    ratio_t[it] = s[0].tc[it] / s[1].tc[it], ratio_w[it] = s[0].wc[it] / s[1].wc[it];
  qsort(ratio_t, iters, 8, cmpd);
  qsort(ratio_w, iters, 8, cmpd);
  for (int i = 0; i < 2; i++) {
    side *z = &s[i];
    qsort(z->tc, iters, 8, cmpd), qsort(z->pc, iters, 8, cmpd), qsort(z->wc, iters, 8, cmpd);
    printf("%s %s threads=%d %s bn=%d n=%d hash=%016llx thread_cpu_ms med %.1f [%.1f-%.1f] "
           "proc_cpu_ms med %.1f wall_ms med %.1f\n",
           i ? "B" : "A", fwd_only ? "forward" : "train_step", P, argv[4], bn, iters, (unsigned long long)z->h, z->tc[iters / 2] * 1e3,
           z->tc[iters / 4] * 1e3, z->tc[3 * iters / 4] * 1e3, z->pc[iters / 2] * 1e3,
           z->wc[iters / 2] * 1e3);
  }
  printf("A/B thread cpu, per iteration: median %.3f [q1 %.3f, q3 %.3f]\n", ratio_t[iters / 2],
         ratio_t[iters / 4], ratio_t[3 * iters / 4]);
  printf("A/B wall, per iteration: median %.3f [q1 %.3f, q3 %.3f]\n", ratio_w[iters / 2],
         ratio_w[iters / 4], ratio_w[3 * iters / 4]);
  return s[0].h != s[1].h;
}
