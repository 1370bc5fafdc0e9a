// ceilings.c: the ceilings of the host the benchmark numbers come from, measured
// here (DESIGN.md "Performance method"): the f32 FMA peak and the bf16
// dot-product peak (AVX512_BF16) per core and for all cores, streaming read
// bandwidth, and the random-row rate of the expert gather (rows of 1 KiB and
// 2 KiB from a table far larger than the caches, with a stated number of
// independent rows in flight, and the latency of a dependent chain).
// bench/floors.py divides the per-token counts of PEER.md by these to get the
// floors; bench/README.md "The machine and its floor" says how.
//
// Prints "key=value" lines (lines starting with '#' are for people); --json
// FILE writes the same keys as one JSON object.  Each number is the best of
// --reps timed runs of --seconds each (the machine is shared: the best run
// is the one least disturbed); the human lines give the median too.  A run
// counts only if every thread was on a core for at least 90% of it (its CPU
// time against the wall time); when no run of a measurement was, the number
// is work over CPU time instead, and `contended_measurements` counts those
// (for several threads that overstates what they share, such as bandwidth:
// measure again on a quieter machine).
#define _GNU_SOURCE
#include <immintrin.h>
#include <omp.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "internal.h" // peer_alloc: large buffers as the layer's tables get them

// ---------------------------------------------------------------- results

typedef struct {
  char key[64];
  double value;
} entry;

static entry entries[256];
static int n_entries;

static void put(double value, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void put(double value, const char *fmt, ...) {
  if (n_entries == (int)(sizeof entries / sizeof entries[0])) return;
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(entries[n_entries].key, sizeof entries[0].key, fmt, ap);
  va_end(ap);
  entries[n_entries].value = value;
  printf("%s=%.6g\n", entries[n_entries].key, value);
  fflush(stdout);
  n_entries++;
}

static double now(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

// ---------------------------------------------------------------- timing

// A measured body: runs on thread `tid` of `nt` until `deadline` and returns
// the work it did (FLOPs, bytes, rows, steps).
typedef double (*body_fn)(void *ctx, int tid, int nt, double deadline);

typedef struct {
  double best, median; // work per second, over the reps
  double share;        // least CPU time / wall time of a thread in the best run
} rate;

static double thread_cpu_seconds(void) {
  struct timespec ts;
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
  return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static int contended_measurements;

static int cmp_double(const void *a, const void *b) {
  double x = *(const double *)a, y = *(const double *)b;
  return (x > y) - (x < y);
}

static double opt_seconds = 0.25;
static int opt_reps = 5;

// All `nt` threads start together after a barrier and stop at one deadline;
// the rate is their summed work over the time until the last one stopped,
// from the runs in which every thread held a core (else over CPU time).
static rate measure(body_fn body, void *ctx, int nt) {
  double r[64], by_cpu[64], share[64];
  int reps = opt_reps < 64 ? opt_reps : 64, clean = 0;
  for (int rep = 0; rep < reps; rep++) {
    double work = 0, t0 = 0, t1 = 0, cpu_min = 1e30, cpu_max = 0;
#pragma omp parallel num_threads(nt) reduction(+ : work) reduction(min : cpu_min) \
    reduction(max : cpu_max)
    {
#pragma omp barrier
#pragma omp single
      t0 = now();
      const double c0 = thread_cpu_seconds();
      work = body(ctx, omp_get_thread_num(), nt, t0 + opt_seconds);
      cpu_min = cpu_max = thread_cpu_seconds() - c0;
#pragma omp barrier
#pragma omp single
      t1 = now();
    }
    share[rep] = cpu_min / (t1 - t0);
    by_cpu[rep] = work / cpu_max;
    if (share[rep] >= 0.9) r[clean++] = work / (t1 - t0);
  }
  if (!clean) { // every run lost its core part of the time
    contended_measurements++;
    for (int rep = 0; rep < reps; rep++)
      r[clean++] = by_cpu[rep];
  }
  qsort(r, (size_t)clean, sizeof r[0], cmp_double);
  qsort(share, (size_t)reps, sizeof share[0], cmp_double);
  return (rate){r[clean - 1], r[(clean - 1) / 2], share[reps - 1]};
}

// ---------------------------------------------------------------- arithmetic

static volatile float sink_f = 0, in_a = 0.9999999f, in_b = 1e-7f;
static volatile uint64_t sink_u;

// Twelve independent accumulators: FMA latency (4 cycles) times two FMA ports
// needs eight in flight; twelve leave a margin.  RUN_CHAINS(VEC, SET1, ADD,
// STEP) runs c = STEP(c) on each until the deadline and leaves their sum in
// `s` and the iterations in `iters`; the caller's STEP names its operands.
#define CHUNK 4096L // iterations between clock reads
#define RUN_CHAINS(VEC, SET1, ADD, STEP)                                                         \
  VEC c0 = SET1(0.f), c1 = SET1(1.f), c2 = SET1(2.f), c3 = SET1(3.f), c4 = SET1(4.f),          \
      c5 = SET1(5.f), c6 = SET1(6.f), c7 = SET1(7.f), c8 = SET1(8.f), c9 = SET1(9.f),          \
      c10 = SET1(10.f), c11 = SET1(11.f);                                                      \
  double iters = 0;                                                                            \
  do {                                                                                         \
    for (long i = 0; i < CHUNK; i++) {                                                         \
      c0 = STEP(c0), c1 = STEP(c1), c2 = STEP(c2), c3 = STEP(c3), c4 = STEP(c4);              \
      c5 = STEP(c5), c6 = STEP(c6), c7 = STEP(c7), c8 = STEP(c8), c9 = STEP(c9);              \
      c10 = STEP(c10), c11 = STEP(c11);                                                        \
    }                                                                                          \
    iters += CHUNK;                                                                            \
  } while (now() < deadline);                                                                  \
  VEC s = ADD(ADD(ADD(ADD(c0, c1), ADD(c2, c3)), ADD(ADD(c4, c5), ADD(c6, c7))),               \
              ADD(ADD(c8, c9), ADD(c10, c11)))

__attribute__((target("avx512f"))) static double fma_avx512(void *ctx, int tid, int nt,
                                                              double deadline) {
  (void)ctx, (void)tid, (void)nt;
  const __m512 a = _mm512_set1_ps(in_a), b = _mm512_set1_ps(in_b);
#define STEP(c) _mm512_fmadd_ps(c, a, b)
  RUN_CHAINS(__m512, _mm512_set1_ps, _mm512_add_ps, STEP);
#undef STEP
  sink_f = _mm512_reduce_add_ps(s);
  return iters * 12 * 16 * 2; // FLOPs: an FMA is two
}

__attribute__((target("avx512f,avx512bf16"))) static double dot_bf16(void *ctx, int tid, int nt,
                                                                       double deadline) {
  (void)ctx, (void)tid, (void)nt;
  const __m512bh a = _mm512_cvtne2ps_pbh(_mm512_set1_ps(in_a), _mm512_set1_ps(in_a));
  const __m512bh b = _mm512_cvtne2ps_pbh(_mm512_set1_ps(in_b), _mm512_set1_ps(in_b));
#define STEP(c) _mm512_dpbf16_ps(c, a, b)
  RUN_CHAINS(__m512, _mm512_set1_ps, _mm512_add_ps, STEP);
#undef STEP
  sink_f = _mm512_reduce_add_ps(s);
  return iters * 12 * 32 * 2; // 32 bf16 pairs multiplied and added per instruction
}

#define SET1_I32(v) _mm512_set1_epi32((int)(v))
__attribute__((target("avx512f,avx512vnni"))) static double dot_int8(void *ctx, int tid, int nt,
                                                                        double deadline) {
  (void)ctx, (void)tid, (void)nt;
  const __m512i a = _mm512_set1_epi32((int)(in_a * 3.0f)), b = _mm512_set1_epi32(0x01ff01ff);
#define STEP(c) _mm512_dpbusd_epi32(c, a, b)
  RUN_CHAINS(__m512i, SET1_I32, _mm512_add_epi32, STEP);
#undef STEP
  sink_u = (uint64_t)_mm512_reduce_add_epi32(s);
  return iters * 12 * 64 * 2; // 64 u8 x s8 products added per instruction
}
#undef SET1_I32

__attribute__((target("avx2,fma"))) static double fma_avx2(void *ctx, int tid, int nt,
                                                           double deadline) {
  (void)ctx, (void)tid, (void)nt;
  const __m256 a = _mm256_set1_ps(in_a), b = _mm256_set1_ps(in_b);
#define STEP(c) _mm256_fmadd_ps(c, a, b)
  RUN_CHAINS(__m256, _mm256_set1_ps, _mm256_add_ps, STEP);
#undef STEP
  float out[8];
  _mm256_storeu_ps(out, s);
  sink_f = out[0] + out[7];
  return iters * 12 * 8 * 2;
}

// x86-64 baseline: SSE2 multiply then add (two instructions for two FLOPs).
static double mul_add_sse2(void *ctx, int tid, int nt, double deadline) {
  (void)ctx, (void)tid, (void)nt;
  const __m128 a = _mm_set1_ps(in_a), b = _mm_set1_ps(in_b);
#define STEP(c) _mm_add_ps(_mm_mul_ps(c, a), b)
  RUN_CHAINS(__m128, _mm_set1_ps, _mm_add_ps, STEP);
#undef STEP
  sink_f = _mm_cvtss_f32(s);
  return iters * 12 * 4 * 2;
}

// ---------------------------------------------------------------- memory


// Reads [p, p + bytes) (bytes a multiple of 64, p 64-byte aligned) and folds
// it into a word so the loads cannot be dropped.
__attribute__((target("avx512f"))) static uint64_t read_avx512(const char *p, size_t bytes) {
  __m512i x0 = _mm512_setzero_si512(), x1 = x0;
  size_t i = 0;
  for (; i + 128 <= bytes; i += 128) {
    x0 = _mm512_xor_si512(x0, _mm512_load_si512((const void *)(p + i)));
    x1 = _mm512_xor_si512(x1, _mm512_load_si512((const void *)(p + i + 64)));
  }
  if (i < bytes) x0 = _mm512_xor_si512(x0, _mm512_load_si512((const void *)(p + i)));
  return (uint64_t)_mm512_reduce_or_epi64(_mm512_xor_si512(x0, x1));
}

__attribute__((target("avx2"))) static uint64_t read_avx2(const char *p, size_t bytes) {
  __m256i x0 = _mm256_setzero_si256(), x1 = x0;
  for (size_t i = 0; i < bytes; i += 64) {
    x0 = _mm256_xor_si256(x0, _mm256_load_si256((const __m256i *)(p + i)));
    x1 = _mm256_xor_si256(x1, _mm256_load_si256((const __m256i *)(p + i + 32)));
  }
  return (uint64_t)_mm256_extract_epi64(_mm256_xor_si256(x0, x1), 0);
}

static uint64_t read_sse2(const char *p, size_t bytes) {
  __m128i x0 = _mm_setzero_si128(), x1 = x0;
  for (size_t i = 0; i < bytes; i += 64) {
    x0 = _mm_xor_si128(x0, _mm_load_si128((const __m128i *)(p + i)));
    x1 = _mm_xor_si128(x1, _mm_load_si128((const __m128i *)(p + i + 16)));
    x0 = _mm_xor_si128(x0, _mm_load_si128((const __m128i *)(p + i + 32)));
    x1 = _mm_xor_si128(x1, _mm_load_si128((const __m128i *)(p + i + 48)));
  }
  return (uint64_t)_mm_cvtsi128_si64(_mm_xor_si128(x0, x1));
}

static uint64_t (*read_block)(const char *, size_t) = read_sse2;

typedef struct {
  const char *buf;
  size_t bytes;
} stream_ctx;

// Each thread reads its own contiguous share of the buffer, over and over.
static double stream_read(void *ctx, int tid, int nt, double deadline) {
  const stream_ctx *s = ctx;
  size_t share = s->bytes / (size_t)nt / 64 * 64;
  const char *p = s->buf + (size_t)tid * share;
  const size_t piece = (size_t)1 << 20;
  double bytes = 0;
  uint64_t acc = 0;
  size_t off = 0;
  do {
    acc ^= read_block(p + off, piece);
    bytes += (double)piece;
    off += piece;
    if (off + piece > share) off = 0;
  } while (now() < deadline);
  sink_u = acc;
  return bytes;
}

static uint64_t rng_state = 0x9e3779b97f4a7c15ull;
static uint64_t rng(void) { // xorshift64*
  rng_state ^= rng_state >> 12;
  rng_state ^= rng_state << 25;
  rng_state ^= rng_state >> 27;
  return rng_state * 0x2545f4914f6cdd1dull;
}

// Writes one random cycle through `count` slots of `stride` bytes (slot i at
// base + offset[i]) into their first words: each holds the byte offset of
// the next (Sattolo's algorithm gives a single cycle).
static int link_cycle(char *base, const uint64_t *offset, size_t count) {
  uint32_t *order = malloc(count * sizeof *order);
  if (!order) return -1;
  for (size_t i = 0; i < count; i++)
    order[i] = (uint32_t)i;
  for (size_t i = count - 1; i > 0; i--) {
    size_t j = (size_t)(rng() % i);
    uint32_t t = order[i];
    order[i] = order[j];
    order[j] = t;
  }
  for (size_t i = 0; i < count; i++)
    *(uint64_t *)(base + offset[order[i]]) = offset[order[(i + 1) % count]];
  free(order);
  return 0;
}

typedef struct {
  const char *table;
  size_t row_bytes; // 64 for the line latency
  int chains;       // independent rows in flight per thread
  uint64_t start[64][64];
  // Independent gather: a random list of row offsets.
  const uint64_t *list;
  size_t list_len;
  int prefetch; // rows ahead whose first two lines are prefetched (0: none)
} chase_ctx;

// `chains` dependent chains per thread, interleaved: each step reads the
// whole row of every chain; the next row's offset is in the row just read,
// so at most `chains` rows per thread are in flight.  Returns rows read.
static double chase(void *ctx, int tid, int nt, double deadline) {
  (void)nt;
  const chase_ctx *c = ctx;
  uint64_t cur[64];
  const int G = c->chains;
  for (int g = 0; g < G; g++)
    cur[g] = c->start[tid][g];
  uint64_t acc = 0;
  double rows = 0;
  do {
    for (int s = 0; s < 256; s++)
      for (int g = 0; g < G; g++) {
        const char *row = c->table + cur[g];
        if (c->row_bytes > 64) acc ^= read_block(row + 64, c->row_bytes - 64);
        cur[g] = *(const uint64_t *)row;
      }
    rows += 256.0 * G;
  } while (now() < deadline);
  sink_u = acc ^ cur[0];
  return rows;
}

// Rows at offsets from a list (no dependence between them), each thread from
// its own part of the list; optionally prefetching the first two lines of the
// row `prefetch` rows ahead into L2, as the library's expert phase does.
static double gather(void *ctx, int tid, int nt, double deadline) {
  const chase_ctx *c = ctx;
  const size_t share = c->list_len / (size_t)nt;
  const uint64_t *list = c->list + (size_t)tid * share;
  const int ahead = c->prefetch;
  uint64_t acc = 0;
  double rows = 0;
  size_t i = 0;
  do {
    for (int s = 0; s < 256; s++) {
      if (ahead) {
        const char *next = c->table + list[(i + (size_t)ahead) % share];
        _mm_prefetch(next, _MM_HINT_T1);
        _mm_prefetch(next + 64, _MM_HINT_T1);
      }
      acc ^= read_block(c->table + list[i], c->row_bytes);
      if (++i == share) i = 0;
    }
    rows += 256;
  } while (now() < deadline);
  sink_u = acc;
  return rows;
}

// ---------------------------------------------------------------- main

static void usage(FILE *f) {
  fprintf(f, "usage: ceilings [--seconds S] [--reps R] [--table-mib M] [--stream-mib M]\n"
             "                [--threads P] [--quick] [--json FILE]\n"
             "  --seconds S     length of one timed run (default 0.25)\n"
             "  --reps R        timed runs per number; the best is reported (default 5)\n"
             "  --table-mib M   random-row table (default 4096: the reference layer's\n"
             "                  two f32 expert tables)\n"
             "  --stream-mib M  streaming-read buffer (default 1024)\n"
             "  --threads P     the all-cores thread count (default: the cores online)\n"
             "  --quick         --seconds 0.05 --reps 2 --table-mib 1024 --stream-mib 256\n"
             "  --json FILE     also write the key=value results as a JSON object\n"
             "PEER_CPU=avx512|avx2|generic picks the vector width as the library does.\n");
}

static int parse_args(int argc, char **argv, size_t *table_mib, size_t *stream_mib, int *threads,
                      const char **json) {
  for (int i = 1; i < argc; i++) {
    const char *a = argv[i];
    const char *v = i + 1 < argc ? argv[i + 1] : NULL;
    if (!strcmp(a, "--quick")) {
      opt_seconds = 0.05, opt_reps = 2, *table_mib = 1024, *stream_mib = 256;
      continue;
    }
    if (!strcmp(a, "--help") || !strcmp(a, "-h")) {
      usage(stdout);
      exit(0);
    }
    if (!v) {
      usage(stderr);
      return -1;
    }
    char *end = NULL;
    if (!strcmp(a, "--json")) *json = v;
    else if (!strcmp(a, "--seconds")) opt_seconds = strtod(v, &end);
    else if (!strcmp(a, "--reps")) opt_reps = (int)strtol(v, &end, 10);
    else if (!strcmp(a, "--table-mib")) *table_mib = (size_t)strtoull(v, &end, 10);
    else if (!strcmp(a, "--stream-mib")) *stream_mib = (size_t)strtoull(v, &end, 10);
    else if (!strcmp(a, "--threads")) *threads = (int)strtol(v, &end, 10);
    else {
      usage(stderr);
      return -1;
    }
    if (end && *end) {
      fprintf(stderr, "ceilings: bad value '%s' for %s\n", v, a);
      return -1;
    }
    i++;
  }
  if (opt_seconds <= 0 || opt_reps < 1 || opt_reps > 64 || *table_mib < 64 || *stream_mib < 16 ||
      *threads < 1 || *threads > 64) {
    fprintf(stderr, "ceilings: out of range (seconds > 0, reps 1..64, table-mib >= 64, "
                    "stream-mib >= 16, threads 1..64)\n");
    return -1;
  }
  return 0;
}

static void cpu_name(char *out, size_t size) {
  snprintf(out, size, "unknown");
  FILE *f = fopen("/proc/cpuinfo", "r");
  if (!f) return;
  char line[256];
  while (fgets(line, sizeof line, f))
    if (!strncmp(line, "model name", 10)) {
      char *p = strchr(line, ':');
      if (p) {
        p += 1 + (p[1] == ' ');
        p[strcspn(p, "\n")] = 0;
        snprintf(out, size, "%s", p);
      }
      break;
    }
  fclose(f);
}

// The widest variant the CPU runs, or the one PEER_CPU names (as
// peer/cpu_dispatch.c chooses).
static const char *pick_isa(int have512, int have2) {
  const char *want = getenv("PEER_CPU");
  if (want && !strcmp(want, "generic")) return "generic";
  if (want && !strcmp(want, "avx2") && have2) return "avx2";
  if (have512 && (!want || !strcmp(want, "avx512"))) return "avx512";
  return have2 ? "avx2" : "generic";
}

static void write_json(const char *path, const char *cpu, const char *isa) {
  FILE *f = fopen(path, "w");
  if (!f) {
    perror(path);
    return;
  }
  fprintf(f, "{\n  \"cpu\": \"");
  for (const char *p = cpu; *p; p++)
    if (*p != '"' && *p != '\\') fputc(*p, f);
  fprintf(f, "\",\n  \"isa\": \"%s\"", isa);
  for (int i = 0; i < n_entries; i++)
    fprintf(f, ",\n  \"%s\": %.6g", entries[i].key, entries[i].value);
  fprintf(f, "\n}\n");
  fclose(f);
}

int main(int argc, char **argv) {
  size_t table_mib = 4096, stream_mib = 1024;
  int P = omp_get_num_procs();
  const char *json = NULL;
  if (parse_args(argc, argv, &table_mib, &stream_mib, &P, &json)) return 2;
  __builtin_cpu_init();
  const int have512 = __builtin_cpu_supports("avx512f");
  const int have2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  const int have_bf16 = have512 && __builtin_cpu_supports("avx512bf16");
  const char *isa = pick_isa(have512, have2);
  char cpu[128];
  cpu_name(cpu, sizeof cpu);
  if (!strcmp(isa, "avx512")) read_block = read_avx512;
  else if (!strcmp(isa, "avx2")) read_block = read_avx2;

  printf("# cpu: %s; vectors: %s; threads: 1 and %d; best of %d runs of %.2f s each\n", cpu, isa,
         P, opt_reps, opt_seconds);
  put(P, "threads_all");
  int counts[2] = {1, P};
  int n_counts = P > 1 ? 2 : 1;

  // f32 FMA peak: the chosen width, and every width the CPU has.
  struct {
    const char *name;
    body_fn fn;
    int ok;
  } fmas[] = {{"avx512", fma_avx512, have512}, {"avx2", fma_avx2, have2},
              {"generic", mul_add_sse2, 1}};
  for (int v = 0; v < 3; v++) {
    if (!fmas[v].ok) continue;
    for (int c = 0; c < n_counts; c++) {
      rate r = measure(fmas[v].fn, NULL, counts[c]);
      printf("# f32 %s, %d thread(s): best %.1f, median %.1f GFLOP/s\n", fmas[v].name, counts[c],
             r.best / 1e9, r.median / 1e9);
      put(r.best / 1e9, "fma_f32_%s_gflops_t%d", fmas[v].name, counts[c]);
      if (!strcmp(fmas[v].name, isa)) put(r.best / 1e9, "fma_f32_gflops_t%d", counts[c]);
    }
  }
  // bf16 dot products (vdpbf16ps: f32 accumulate of bf16 pairs).  AMX tiles
  // are not measured (a product there needs tile set-up and the OS's leave).
  put(have_bf16, "has_avx512_bf16");
  if (have_bf16 && strcmp(isa, "avx512") == 0)
    for (int c = 0; c < n_counts; c++) {
      rate r = measure(dot_bf16, NULL, counts[c]);
      printf("# bf16 dot product (AVX512_BF16), %d thread(s): best %.1f, median %.1f GFLOP/s\n",
             counts[c], r.best / 1e9, r.median / 1e9);
      put(r.best / 1e9, "dot_bf16_gflops_t%d", counts[c]);
    }

  // int8 dot products (vpdpbusd: u8 x s8 quads into int32), the first pass
  // over the sub-keys in the avx512bf16 variant (peer/cpu_bf16.c).
  const int have_vnni = have512 && __builtin_cpu_supports("avx512vnni");
  put(have_vnni, "has_avx512_vnni");
  if (have_vnni && strcmp(isa, "avx512") == 0)
    for (int c = 0; c < n_counts; c++) {
      rate r = measure(dot_int8, NULL, counts[c]);
      printf("# int8 dot product (AVX512_VNNI), %d thread(s): best %.1f, median %.1f GOP/s\n",
             counts[c], r.best / 1e9, r.median / 1e9);
      put(r.best / 1e9, "dot_int8_gops_t%d", counts[c]);
    }

  // Streaming read bandwidth.
  size_t sbytes = stream_mib << 20;
  char *sbuf = peer_alloc(sbytes);
  if (!sbuf) {
    fprintf(stderr, "ceilings: cannot map %zu MiB\n", stream_mib);
    return 1;
  }
  memset(sbuf, 1, sbytes);
  stream_ctx sc = {sbuf, sbytes};
  for (int c = 0; c < n_counts; c++) {
    rate r = measure(stream_read, &sc, counts[c]);
    printf("# streaming read, %zu MiB, %d thread(s): best %.2f, median %.2f GB/s\n", stream_mib,
           counts[c], r.best / 1e9, r.median / 1e9);
    put(r.best / 1e9, "stream_read_gbs_t%d", counts[c]);
  }
  peer_free(sbuf, sbytes);

  // Random rows.
  size_t tbytes = table_mib << 20;
  char *table = peer_alloc(tbytes);
  chase_ctx *cc = calloc(1, sizeof *cc);
  const size_t n_lines = (size_t)1 << 20; // latency chain: one random line per slot
  uint64_t *offs = malloc((tbytes / 1024 > n_lines ? tbytes / 1024 : n_lines) * sizeof *offs);
  if (!table || !cc || !offs) {
    fprintf(stderr, "ceilings: cannot map a %zu MiB table\n", table_mib);
    return 1;
  }
  memset(table, 0, tbytes);
  cc->table = table;

  // Latency: a dependent chain through 1M lines, one at a random place in
  // each 1/1M of the table.
  const size_t slot = tbytes / n_lines;
  for (size_t i = 0; i < n_lines; i++)
    offs[i] = i * slot + (rng() % (slot / 64)) * 64;
  if (link_cycle(table, offs, n_lines)) return 1;
  cc->row_bytes = 64, cc->chains = 1;
  cc->start[0][0] = offs[0];
  rate lat = measure(chase, cc, 1);
  const double line_ns = 1e9 / lat.best;
  printf("# dependent random line reads in %zu MiB: %.0f ns each (median %.0f)\n", table_mib,
         line_ns, 1e9 / lat.median);
  put(line_ns, "line_latency_ns");

  const int chain_counts[] = {1, 2, 4, 8, 16};
  for (int rb = 1024; rb <= 2048; rb *= 2) {
    const size_t rows = tbytes / (size_t)rb;
    for (size_t i = 0; i < rows; i++)
      offs[i] = i * (size_t)rb;
    if (link_cycle(table, offs, rows)) return 1;
    cc->row_bytes = (size_t)rb;
    for (int c = 0; c < n_counts; c++) {
      const int nt = counts[c];
      double best = 0;
      for (int gi = 0; gi < 5; gi++) {
        const int G = chain_counts[gi];
        for (int t = 0; t < nt; t++)
          for (int g = 0; g < G; g++)
            cc->start[t][g] = offs[rng() % rows];
        cc->chains = G;
        rate r = measure(chase, cc, nt);
        printf("# %d B rows, %d thread(s), %d dependent chain(s) each: %.3g rows/s, %.2f GB/s\n",
               rb, nt, G, r.best, r.best * rb / 1e9);
        put(r.best * rb / 1e9, "row%d_chains%d_gbs_t%d", rb, G, nt);
        if (G == 1 && nt == 1) put(1e9 / r.best, "row%d_latency_ns", rb);
        if (r.best > best) best = r.best;
      }
      // Independent rows from a random list, with and without the
      // library's prefetch (first two lines, two rows ahead, into L2).
      for (size_t i = 0; i < rows; i++)
        offs[i] = (rng() % rows) * (size_t)rb;
      cc->list = offs, cc->list_len = rows;
      for (int pf = 0; pf <= 2; pf += 2) {
        cc->prefetch = pf;
        rate r = measure(gather, cc, nt);
        printf("# %d B rows, %d thread(s), independent rows%s: %.3g rows/s, %.2f GB/s\n", rb, nt,
               pf ? ", prefetch 2 lines 2 rows ahead" : "", r.best, r.best * rb / 1e9);
        put(r.best * rb / 1e9, "row%d_independent%s_gbs_t%d", rb, pf ? "_prefetch" : "", nt);
        if (r.best > best) best = r.best;
      }
      for (size_t i = 0; i < rows; i++) // restore the cycle's offsets for the next count
        offs[i] = i * (size_t)rb;
      if (c + 1 < n_counts && link_cycle(table, offs, rows)) return 1;
      put(best, "random_row%d_rows_per_s_t%d", rb, nt);
      put(best * rb / 1e9, "random_row%d_gbs_t%d", rb, nt);
      // Little's law: lines in flight = line rate x latency.
      put(best * rb / 64 * line_ns * 1e-9, "random_row%d_lines_in_flight_t%d", rb, nt);
    }
  }
  peer_free(table, tbytes);
  free(offs);
  free(cc);
  const double *load = NULL;
  double la[3];
  FILE *lf = fopen("/proc/loadavg", "r");
  if (lf && fscanf(lf, "%lf %lf %lf", &la[0], &la[1], &la[2]) == 3) load = la;
  if (lf) fclose(lf);
  if (load) put(load[0], "load_average_1min_at_end");
  put(contended_measurements, "contended_measurements");
  if (contended_measurements)
    printf("# %d measurement(s) had no run with every thread on a core 90%% of the time: "
           "those are work over CPU time (see the file's head)\n",
           contended_measurements);
  if (json) write_json(json, cpu, isa);
  return 0;
}
