/* decode_latency.c: the latency of peer_forward on small batches (decoding),
 * at the reference layer (d=512, H=8, d_key=256, n=1024, k=16), per call:
 * the calling thread's CPU time, the process's CPU time and wall time,
 * medians and ranges over many calls, each call on new tokens (the inputs
 * rotate over 64 batches, so expert rows come from memory, as when
 * decoding).  It also prints a hash of the outputs (y bits, ids, gates) of
 * fixed tokens, so that two builds can be compared for bit-identical
 * results.  Plain C on the public API, so that it builds against an old
 * library too (bench/README.md "Decode latency"):
 *   decode_latency [--tokens 1,4,16] [--threads 1,2] [--calls 200] [--bf16]
 * One line per case: T, threads, the three medians (ms) with min-max, and
 * the hash. */
#define _POSIX_C_SOURCE 200809L
#include <peer.h>

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static double now(clockid_t c) {
  struct timespec ts;
  clock_gettime(c, &ts);
  return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static int cmp_double(const void *a, const void *b) {
  double x = *(const double *)a, y = *(const double *)b;
  return (x > y) - (x < y);
}

/* xorshift normals enough for inputs: the sum of 4 uniforms, centred */
static float rnd(uint64_t *s) {
  float acc = 0;
  for (int i = 0; i < 4; i++) {
    *s ^= *s << 13, *s ^= *s >> 7, *s ^= *s << 17;
    acc += (float)(*s >> 40) * 0x1p-24f;
  }
  return (acc - 2.0f) * 1.7320508f;
}

static uint64_t fnv(uint64_t h, const void *p, size_t n) {
  const unsigned char *b = p;
  for (size_t i = 0; i < n; i++)
    h = (h ^ b[i]) * 1099511628211ull;
  return h;
}

static int parse_list(const char *s, int *out, int max) {
  int n = 0;
  while (*s && n < max) {
    out[n++] = atoi(s);
    s = strchr(s, ',');
    if (!s) break;
    s++;
  }
  return n;
}

int main(int argc, char **argv) {
  int Ts[8] = {1, 4, 16}, nT = 3, Ps[4] = {1, 2}, nP = 2, calls = 200;
  peer_dtype dtype = PEER_F32;
  for (int i = 1; i < argc; i++) {
    if (!strcmp(argv[i], "--tokens") && i + 1 < argc)
      nT = parse_list(argv[++i], Ts, 8);
    else if (!strcmp(argv[i], "--threads") && i + 1 < argc)
      nP = parse_list(argv[++i], Ps, 4);
    else if (!strcmp(argv[i], "--calls") && i + 1 < argc)
      calls = atoi(argv[++i]);
    else if (!strcmp(argv[i], "--bf16"))
      dtype = PEER_BF16;
    else {
      fprintf(stderr, "usage: %s [--tokens 1,4,16] [--threads 1,2] [--calls N] [--bf16]\n",
              argv[0]);
      return 2;
    }
  }
  peer_config cfg;
  peer_config_default(&cfg);
  cfg.d_model = 512, cfg.n_heads = 8, cfg.d_key = 256, cfg.n_subkeys = 1024, cfg.top_k = 16;
  cfg.weight_dtype = dtype;
  peer_layer *L = NULL;
  if (peer_layer_create(&L, &cfg, NULL) || peer_layer_init(L, 1)) {
    fprintf(stderr, "layer: %s\n", peer_last_error());
    return 1;
  }
  const int64_t d = cfg.d_model, hk = cfg.n_heads * cfg.top_k, rot = 64, Tmax = 64;
  float *x = malloc(sizeof(float) * (size_t)(rot * Tmax * d));
  float *y = malloc(sizeof(float) * (size_t)(Tmax * d));
  float *g = malloc(sizeof(float) * (size_t)(Tmax * hk));
  int64_t *ids = malloc(sizeof(int64_t) * (size_t)(Tmax * hk));
  double *tc = malloc(sizeof(double) * (size_t)calls * 3);
  uint64_t s = 88172645463325252ull;
  for (int64_t i = 0; i < rot * Tmax * d; i++)
    x[i] = rnd(&s);
  printf("# reference layer, %s tables; ms per call: thread CPU, process CPU, wall "
         "(median [min-max] of %d calls)\n",
         dtype == PEER_F32 ? "f32" : "bf16", calls);
  for (int a = 0; a < nT; a++)
    for (int b = 0; b < nP; b++) {
      const int64_t T = Ts[a];
      if (T < 1 || T > Tmax || peer_layer_set_threads(L, Ps[b])) return 2;
      /* the hash: fixed tokens, before any timing */
      if (peer_forward(L, T, x, y, ids, g)) {
        fprintf(stderr, "forward: %s\n", peer_last_error());
        return 1;
      }
      uint64_t h = 1469598103934665603ull;
      h = fnv(h, y, sizeof(float) * (size_t)(T * d));
      h = fnv(h, ids, sizeof(int64_t) * (size_t)(T * hk));
      h = fnv(h, g, sizeof(float) * (size_t)(T * hk));
      for (int c = 0; c < 10; c++)
        peer_forward(L, T, x + (c % rot) * Tmax * d, y, ids, g);
      for (int c = 0; c < calls; c++) {
        const float *xc = x + (c % rot) * Tmax * d;
        double t0 = now(CLOCK_THREAD_CPUTIME_ID), p0 = now(CLOCK_PROCESS_CPUTIME_ID),
               w0 = now(CLOCK_MONOTONIC);
        peer_forward(L, T, xc, y, ids, g);
        tc[c] = now(CLOCK_THREAD_CPUTIME_ID) - t0;
        tc[calls + c] = now(CLOCK_PROCESS_CPUTIME_ID) - p0;
        tc[2 * calls + c] = now(CLOCK_MONOTONIC) - w0;
      }
      printf("T=%lld threads=%d", (long long)T, Ps[b]);
      for (int m = 0; m < 3; m++) {
        double *v = tc + m * calls;
        qsort(v, (size_t)calls, sizeof *v, cmp_double);
        printf(" %s %.3f [%.3f-%.3f]",
               m == 0   ? "thread"
               : m == 1 ? "process"
                        : "wall",
               1e3 * v[calls / 2], 1e3 * v[0], 1e3 * v[calls - 1]);
      }
      printf(" hash %016llx\n", (unsigned long long)h);
      fflush(stdout);
    }
  free(x), free(y), free(g), free(ids), free(tc);
  peer_layer_free(L);
  return 0;
}
