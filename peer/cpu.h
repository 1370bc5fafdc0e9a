/* cpu.h: what the CPU backend's files share: the vector types and row
 * helpers (GCC vector extensions, 8 lanes on AVX2, 16 on AVX-512), the
 * blocked matrix product, and the forward phases that training reuses. */
#ifndef PEER_CPU_H
#define PEER_CPU_H

#include "internal.h"
#include "rowops.h"

/* Variants.  cpu.c and cpu_train.c are compiled once per instruction set
 * (CMakeLists.txt: avx512bf16, avx512, avx2 and generic, or native alone with
 * PEER_NATIVE), each time with PEER_CPU_VARIANT set to that name, which
 * suffixes their external names (peer_cpu_gemm_nt_avx512, ...) so that the
 * variants link side by side.  Outside the variants the plain names of the
 * entry points in peer_cpu_impl (below) exist too: cpu_dispatch.c defines
 * them, forwarding to the variant chosen for the process. */
#ifdef PEER_CPU_VARIANT
#define PEER_CPU_CAT_(a, b) a##_##b
#define PEER_CPU_CAT(a, b) PEER_CPU_CAT_(a, b)
#define PEER_CPU_V(name) PEER_CPU_CAT(name, PEER_CPU_VARIANT)
#define peer_cpu_gemm_nt PEER_CPU_V(peer_cpu_gemm_nt)
#define peer_cpu_threads PEER_CPU_V(peer_cpu_threads)
#define peer_cpu_layout PEER_CPU_V(peer_cpu_layout)
#define peer_cpu_thread_pack PEER_CPU_V(peer_cpu_thread_pack)
#define peer_cpu_topk_scan PEER_CPU_V(peer_cpu_topk_scan)
#define peer_cpu_first_nonfinite_row PEER_CPU_V(peer_cpu_first_nonfinite_row)
#define peer_cpu_project PEER_CPU_V(peer_cpu_project)
#define peer_cpu_retrieve_all PEER_CPU_V(peer_cpu_retrieve_all)
#define peer_cpu_apply_experts PEER_CPU_V(peer_cpu_apply_experts)
#define peer_cpu_context_bytes PEER_CPU_V(peer_cpu_context_bytes)
#define peer_cpu_forward_train PEER_CPU_V(peer_cpu_forward_train)
#define peer_cpu_backward PEER_CPU_V(peer_cpu_backward)
#define peer_cpu_variant PEER_CPU_V(peer_cpu_variant)
#define peer_cpu_train_variant PEER_CPU_V(peer_cpu_train_variant)
#define peer_cpu_keys16_ready PEER_CPU_V(peer_cpu_keys16_ready)
#define peer_cpu_bf16_scratch_bytes PEER_CPU_V(peer_cpu_bf16_scratch_bytes)
#define peer_cpu_bf16_lists PEER_CPU_V(peer_cpu_bf16_lists)
#define peer_cpu_decode_ready PEER_CPU_V(peer_cpu_decode_ready)
#define peer_cpu_decode_forward PEER_CPU_V(peer_cpu_decode_forward)
#endif

#include <string.h>
#if defined(__AVX512F__) || defined(__FMA__) || defined(__AVX__)
#include <immintrin.h>
#endif

/* Vector width follows the target: 16 lanes with AVX-512, else 8 (AVX2). */
#ifdef __AVX512F__
#define VW 16
#else
#define VW 8
#endif

/* Register tile: MRK rows of B (broadcast) by NVT vectors of tokens; 12
 * accumulators plus NVT + 1 operands fit the 16 AVX2 registers. */
#define MRK 6
#define NVT 2

/* Tokens per block: the matrix products vectorise over a block's tokens, and
 * S for one block is TB x 2n floats per thread. */
#define TB 32
#define NVMAX (TB / VW)
/* Query columns per projection task. */
#define QCOLS 256

typedef float vf __attribute__((vector_size(VW * 4)));
typedef float vfu __attribute__((vector_size(VW * 4), aligned(4)));
typedef uint32_t vu __attribute__((vector_size(VW * 4)));
typedef int32_t vi __attribute__((vector_size(VW * 4)));

static inline vf loadv(const float *p) { return *(const vfu *)p; }

/* a * b + c, fused wherever the target has FMA.  Spelled out because the
 * compiler's contraction of `c += a * b` differs between inlined variants of
 * one loop, and the matrix product's bits must not depend on the variant. */
static inline vf vfma(vf a, vf b, vf c) {
#if defined(__AVX512F__)
  return (vf)_mm512_fmadd_ps((__m512)a, (__m512)b, (__m512)c);
#elif defined(__FMA__)
  return (vf)_mm256_fmadd_ps((__m256)a, (__m256)b, (__m256)c);
#else
  return a * b + c;
#endif
}

/* Sum of the lanes in one fixed order (pairwise halving). */
static inline float hsum(vf acc) {
  float s[VW];
  for (int i = 0; i < VW; i++) s[i] = acc[i];
  for (int w = VW / 2; w > 0; w /= 2)
    for (int i = 0; i < w; i++) s[i] += s[i + w];
  return s[0];
}

static inline float dot_row_f32(const float *u, const float *x, int64_t d) {
  const int64_t dv = d - d % VW;
  vf acc = {0};
  for (int64_t i = 0; i < dv; i += VW) acc += loadv(u + i) * loadv(x + i);
  float s = hsum(acc);
  for (int64_t i = dv; i < d; i++) s += u[i] * x[i];
  return s;
}

static inline void axpy_row_f32(float a, const float *v, float *y, int64_t d) {
  const int64_t dv = d - d % VW;
  for (int64_t i = 0; i < dv; i += VW) *(vfu *)(y + i) = loadv(y + i) + a * loadv(v + i);
  for (int64_t i = dv; i < d; i++) y[i] += a * v[i];
}

/* bf16 rows meet their f32 operand 2*VW values at a time: the 2*VW bf16 load
 * as VW 32-bit words, whose low halves (the even values) widen to f32 by a
 * shift and whose high halves (the odd values) by a mask: two integer
 * operations per 2*VW values, where widening VW values takes a shuffle.  The
 * f32 side is therefore kept "split": in each whole block of 2*VW values the
 * VW even ones come first, then the VW odd ones; values past the last whole
 * block stay in place.  split_pairs makes that layout from a row, and
 * unsplit_pairs turns an accumulated split row back, in place. */
static inline void split_pairs(const float *x, int64_t d, float *xs) {
  const int64_t db = d - d % (2 * VW);
  for (int64_t b = 0; b < db; b += 2 * VW)
    for (int j = 0; j < VW; j++) xs[b + j] = x[b + 2 * j], xs[b + VW + j] = x[b + 2 * j + 1];
  for (int64_t i = db; i < d; i++) xs[i] = x[i];
}

static inline void unsplit_pairs(float *y, int64_t d) {
  const int64_t db = d - d % (2 * VW);
  float tmp[2 * VW];
  for (int64_t b = 0; b < db; b += 2 * VW) {
    memcpy(tmp, y + b, sizeof tmp);
    for (int j = 0; j < VW; j++) y[b + 2 * j] = tmp[j], y[b + 2 * j + 1] = tmp[VW + j];
  }
}

static inline void load_pairs_bf16(const uint16_t *p, vf *even, vf *odd) {
  vu w;
  memcpy(&w, p, sizeof w);
  vu lo = w << 16, hi = w & 0xffff0000u;
  memcpy(even, &lo, sizeof lo);
  memcpy(odd, &hi, sizeof hi);
}

/* u . x for a bf16 row u and x split (split_pairs). */
static inline float dot_row_bf16(const uint16_t *u, const float *xs, int64_t d) {
  const int64_t db = d - d % (2 * VW);
  vf acc = {0}, acc2 = {0};
  for (int64_t b = 0; b < db; b += 2 * VW) {
    vf e, o;
    load_pairs_bf16(u + b, &e, &o);
    acc += e * loadv(xs + b);
    acc2 += o * loadv(xs + b + VW);
  }
  float s = hsum(acc + acc2);
  for (int64_t i = db; i < d; i++) s += peer_bf16_to_f32(u[i]) * xs[i];
  return s;
}

/* ys += a * v for a bf16 row v and ys split (split_pairs). */
static inline void axpy_row_bf16(float a, const uint16_t *v, float *ys, int64_t d) {
  const int64_t db = d - d % (2 * VW);
  for (int64_t b = 0; b < db; b += 2 * VW) {
    vf e, o;
    load_pairs_bf16(v + b, &e, &o);
    *(vfu *)(ys + b) = loadv(ys + b) + a * e;
    *(vfu *)(ys + b + VW) = loadv(ys + b + VW) + a * o;
  }
  for (int64_t i = db; i < d; i++) ys[i] += a * peer_bf16_to_f32(v[i]);
}

/* Expert rows are prefetched PREFETCH_AHEAD experts before their use, and
 * only their first PREFETCH_LINES cache lines: that starts each row's DRAM
 * access early, and the hardware's stream prefetcher fetches the rest of the
 * row once the first lines are read.  Prefetching every line of 8 rows ahead
 * (our first version) floods the line fill buffers: on an AVX-512 Xeon host it
 * made the expert phase 2.4x slower (bench/README.md, "What changed the
 * numbers"). */
#define PREFETCH_AHEAD 2
#define PREFETCH_LINES 2

static inline void prefetch_expert(const void *down, const void *up, int64_t id,
                                   size_t row_bytes) {
  const char *u = (const char *)down + (size_t)id * row_bytes;
  const char *v = (const char *)up + (size_t)id * row_bytes;
  for (size_t o = 0; o < row_bytes && o < 64 * PREFETCH_LINES; o += 64) {
    __builtin_prefetch(u + o, 0, 2);
    __builtin_prefetch(v + o, 0, 2);
  }
}

static inline size_t round64(size_t b) { return (b + 63) & ~(size_t)63; }

/* Floats between two tokens' queries in the forward's scratch: one cache line
 * more than H*d_key, for the same reason as peer_cpu_s_stride. */
static inline int64_t peer_cpu_q_stride(const peer_dims *D) { return D->dq + 16; }

/* Floats between two tokens' rows of sub-key scores: 2n plus one cache line,
 * so that the product's column of stores for a block's tokens does not fall
 * into one L1 set (2n floats is a multiple of 4 KiB when n >= 512). */
static inline int64_t peer_cpu_s_stride(int64_t n) { return 2 * n + 16; }

/* Inference batch norm (running statistics) of features [f0, f1) of one
 * token's query q. */
static inline void peer_cpu_norm_running(const peer_layer *L, float *q, int64_t f0, int64_t f1) {
  /* casts: bench_pieces includes this header from C++ */
  const float *nw = (const float *)L->slot[PEER_P_NORM_WEIGHT].data;
  const float *nb = (const float *)L->slot[PEER_P_NORM_BIAS].data;
  const float *mean = (const float *)L->slot[PEER_P_NORM_MEAN].data;
  const float *var = (const float *)L->slot[PEER_P_NORM_VAR].data;
  for (int64_t f = f0; f < f1; f++)
    q[f] = (q[f] - mean[f]) / sqrtf(var[f] + 1e-5f) * nw[f] + nb[f];
}

/* The retrieval's error for the first (token, head) whose scores were not finite. */
static inline peer_status peer_cpu_fail_nonfinite_score(int64_t token, int head) {
  return peer_fail(PEER_ERR_NONFINITE,
                   "token %lld, head %d: non-finite sub-key score (NaN or infinity in x, "
                   "query weights, norm or keys)",
                   (long long)token, head);
}

/* C[i, j] = sum over k of A[i, k] * B[j, k] for i < M <= TB, j < N; see cpu.c. */
void peer_cpu_gemm_nt(int64_t M, int64_t N, int64_t K, const float *A, int64_t lda,
                      const float *B, int64_t ldb, float *C, int64_t ldc, float *pack);

/* Threads a call uses. */
int peer_cpu_threads(const peer_layer *layer);

/* The forward's scratch (layer workspace), carved up. */
typedef struct cpu_ws {
  float *q;      /* [T, dq] */
  int64_t *ids;  /* [T, H, k] */
  float *scores; /* [T, H, k] */
  float *gates;  /* [T, H, k] */
  char *per_thread;
  size_t per_thread_bytes;
} cpu_ws;

void peer_cpu_layout(const peer_layer *layer, int64_t T, void *base, cpu_ws *w);
/* The calling thread's packing buffer (K x TB floats, K up to max(d, d_key)). */
float *peer_cpu_thread_pack(const cpu_ws *w, const peer_dims *D);

/* Top-k' of n scores: peer_topk_scan's result with a vectorised threshold
 * pass (cpu.c); 1 if a score is non-finite. */
int peer_cpu_topk_scan(const float *s, int n, int kp, float *out_s, int64_t *out_id);

/* Phases of the forward (cpu.c). */
int64_t peer_cpu_first_nonfinite_row(const float *x, int64_t T, int64_t d, int P);
/* q = X Wq^T (+ bias), no norm; token t's query at q + t*ldq. */
void peer_cpu_project(const peer_layer *layer, int64_t T, const float *x, float *q, int64_t ldq,
                      const cpu_ws *w, int P);
typedef struct retrieve_out {
  int64_t *ids;
  float *scores, *gates;
} retrieve_out;
peer_status peer_cpu_retrieve_all(peer_layer *layer, int64_t T, const float *q, int64_t ldq,
                                  bool brute,
                                  retrieve_out out, const cpu_ws *w, int P);
/* y = sum of gated experts; z (optional, [T, H, k]) receives u_i . x.  Uses
 * w's per-thread packing buffers as scratch. */
void peer_cpu_apply_experts(const peer_layer *layer, int64_t T, const float *x, float *y,
                            const int64_t *ids, const float *gates, float *z, const cpu_ws *w,
                            int P);

/* Sub-key scoring with a reduced-precision first pass and exact re-ranking
 * (cpu_bf16.c), in variants built with AVX512-BF16 and AVX512-VNNI
 * (__AVX512BF16__): the layer's copy of the keys is int8 (vpdpbusd) or bf16
 * (vdpbf16ps; PEER_CPU_FIRST_PASS=bf16, or a sub-key half not a multiple of
 * 4).  peer_cpu_keys16_ready makes that copy current and says whether the
 * path may run (config, keys finite and not exposed to in-place writes,
 * memory).  It takes token blocks of at most peer_cpu_first_pass_max_nt
 * tokens: with bf16 only small ones (PEER_CPU_BF16_MAX_NT), since for full
 * blocks the f32 product (tokens in vector lanes) is as fast as vdpbf16ps on
 * the host measured (bench/README.md, "bf16 scoring with exact
 * re-ranking"); with int8 every block. */
#define PEER_CPU_BF16_MAX_NT 16
bool peer_cpu_keys16_ready(peer_layer *layer, int P);
static inline int64_t peer_cpu_first_pass_max_nt(const peer_layer *L) {
  return L->keys16.format == PEER_KEYS16_INT8 ? TB : PEER_CPU_BF16_MAX_NT;
}
/* Adds a call's count of halves the first pass resolved to the layer's
 * statistics, under the copy's format. */
static inline void peer_cpu_count_first_pass(peer_layer *L, int64_t halves, int64_t fallback) {
  if (L->keys16.format == PEER_KEYS16_INT8) L->retrieval_stats.int8 += halves;
  else L->retrieval_stats.bf16 += halves;
  L->retrieval_stats.fallback += fallback;
}
/* Per-thread scratch that peer_cpu_bf16_lists needs besides S. */
size_t peer_cpu_bf16_scratch_bytes(const peer_dims *D);
/* Both halves' top-k' lists of head h for the nt <= TB tokens whose queries
 * start at q (ldq apart), exactly those of the f32 path (peer_cpu_gemm_nt
 * scores, peer_cpu_topk_scan): half p of token t at (*ls)[(2t + p) * kp] and
 * (*lid)[...], both in scratch; bad[t] set if that token's f32 scores hold a
 * non-finite value.  S (TB rows of 2n floats, ldS apart), scratch and pack
 * are the calling thread's.  Adds to *n_first the halves the first pass
 * resolved and to *n_fallback the others (peer_retrieval_stats). */
void peer_cpu_bf16_lists(const peer_layer *layer, int64_t h, int64_t nt, const float *q,
                         int64_t ldq, float *S, int64_t ldS, char *scratch, float **ls,
                         int64_t **lid, int *bad, float *pack, int64_t *n_first,
                         int64_t *n_fallback);

/* The forward of T <= PEER_CPU_DECODE_MAX_T tokens with one synchronisation
 * point (cpu_decode.c, AVX512-BF16 variants): same results as the
 * batch path.  peer_cpu_decode_ready says whether it may run (batch size,
 * config, the bf16 keys, the layer's Wq copy, which it makes current). */
#define PEER_CPU_DECODE_MAX_T 8 /* at 16 the batch path was as fast (bench/README.md) */
bool peer_cpu_decode_ready(peer_layer *layer, int64_t T, int P);
/* out.scores is overwritten with the experts' coefficients. */
peer_status peer_cpu_decode_forward(peer_layer *layer, int64_t T, const float *x, float *y,
                                    retrieve_out out, const cpu_ws *w, int P);

/* Training (cpu_train.c). */
size_t peer_cpu_context_bytes(const peer_layer *layer, int64_t T);
peer_status peer_cpu_forward_train(peer_layer *layer, peer_context *ctx, int64_t T,
                                   const float *x, float *y, void *ws);
peer_status peer_cpu_backward(peer_layer *layer, peer_context *ctx, const float *dy, float *dx,
                              peer_grads *grads);

/* Training's arrays, carved out of a context's memory (cpu_train.c; the
 * sharded layer's contexts hold them too). */
typedef struct peer_cpu_train_mem {
  float *q;      /* [T, dq] queries as used for retrieval (after norm) */
  float *qhat;   /* [T, dq] normalised, before the affine (batch norm only) */
  float *mean;   /* [dq] batch mean */
  float *invstd; /* [dq] 1 / sqrt(batch var + eps) */
  int64_t *ids;  /* [T, H, k] */
  float *scores, *gates, *z;         /* [T, H, k]; z = u_i . x */
  float *dq;                         /* [T, dq] */
  float *cdown, *cup, *ds;           /* [T, H, k] per-entry coefficients */
  float *dqT, *xT, *WqT, *tmp;       /* transposes and a [T, d] temporary */
  uint32_t *key, *val, *key2, *val2; /* radix sort, 2*T*H*k + 1 each */
  char *per_thread;                  /* packing and row scratch, >= 2d floats a thread */
  size_t per_thread_bytes;
} peer_cpu_train_mem;

/* The passes of one variant's training (cpu_train.c) that the sharded layer
 * (shard.c, shard_train.c) runs between its collectives, as the unsharded
 * layer runs them: those of the variant the process chose (its
 * peer_cpu_impl's train). */
typedef struct peer_cpu_train_impl {
  /* Lays out m for T tokens and P threads from base (NULL: only counts);
   * returns the bytes. */
  size_t (*layout)(const peer_layer *L, int64_t T, int P, char *base, peer_cpu_train_mem *m);
  /* Smallest token whose row of d values holds NaN or infinity, or T. */
  int64_t (*first_nonfinite_row)(const float *x, int64_t T, int64_t d, int P);
  /* The training forward before the expert phase: x checked, m->q (batch
   * norm: batch statistics), retrieval into m->ids, scores, gates. */
  peer_status (*queries)(peer_layer *L, int64_t T, const float *x, const cpu_ws *w,
                         peer_cpu_train_mem *m, int P);
  /* Batch norm's running statistics from the batch's (after success). */
  void (*update_running)(peer_layer *L, int64_t T, const peer_cpu_train_mem *m);
  /* z[e] = table[ids[e]] . x[t, col0 .. col0 + cols) for T*H*k entries, the
   * table (`slot`, experts.down or .up) holding rows of cols values; x rows
   * of d.  Per-thread scratch of >= cols floats at scratch + thread * stride. */
  void (*expert_dots)(const peer_layer *L, int slot, int64_t col0, int64_t cols, int64_t T,
                      const float *x, const int64_t *ids, float *z, char *scratch, size_t stride,
                      int P);
  /* out[t, 0..cols) = sum over token t's entries of c_e * table[ids[e]], with
   * c_e = coef[e] * act(z[e]) (the forward: coef the gates) or, z NULL,
   * coef[e]. */
  void (*expert_combine)(const peer_layer *L, int slot, int64_t cols, int64_t T,
                         const int64_t *ids, const float *coef, const float *z, float *out,
                         char *scratch, size_t stride, int P);
  /* From vd[e] = v_i . dy: m->cdown, m->cup, and m->ds (d loss / d score). */
  void (*entry_coefficients)(const peer_layer *L, int64_t T, const float *vd,
                             peer_cpu_train_mem *m, int P);
  /* Expert gradient rows over columns [col0, col0 + cols) of x and dy. */
  void (*expert_grads)(const peer_layer *L, int64_t T, const float *x, const float *dy,
                       int64_t col0, int64_t cols, peer_cpu_train_mem *m, peer_grads *gr, int P);
  /* Query, norm and sub-key gradients and dx's query part (added), from m->ds. */
  void (*dense_grads)(const peer_layer *L, int64_t T, const float *x, float *dx,
                      peer_cpu_train_mem *m, peer_grads *gr, int P);
} peer_cpu_train_impl;

/* One variant: its name, its backend table, its training passes (for the
 * sharded layer) and the entry points that programs outside the backend
 * (bench_pieces) reach through the plain names.  Each variant defines one
 * (peer_cpu_variant, suffixed). */
typedef struct peer_cpu_impl {
  const char *name;
  const peer_backend_i *backend;
  const peer_cpu_train_impl *train;
  void (*gemm_nt)(int64_t M, int64_t N, int64_t K, const float *A, int64_t lda, const float *B,
                  int64_t ldb, float *C, int64_t ldc, float *pack);
  void (*layout)(const peer_layer *layer, int64_t T, void *base, cpu_ws *w);
  float *(*thread_pack)(const cpu_ws *w, const peer_dims *D);
  int (*topk_scan)(const float *s, int n, int kp, float *out_s, int64_t *out_id);
  void (*project)(const peer_layer *layer, int64_t T, const float *x, float *q, int64_t ldq,
                  const cpu_ws *w, int P);
  void (*apply_experts)(const peer_layer *layer, int64_t T, const float *x, float *y,
                        const int64_t *ids, const float *gates, float *z, const cpu_ws *w,
                        int P);
} peer_cpu_impl;

#ifdef PEER_CPU_VARIANT
extern const peer_cpu_impl peer_cpu_variant;
extern const peer_cpu_train_impl peer_cpu_train_variant;
#endif

/* The variant this process uses (cpu_dispatch.c): chosen at first use from
 * the CPU's features, or named by the environment variable PEER_CPU (auto,
 * avx512, avx2, generic; native in a PEER_NATIVE build).  NULL, with the
 * reason recorded by peer_fail, when PEER_CPU names a variant this build
 * lacks or this CPU cannot run; every later call gives the same answer. */
const peer_cpu_impl *peer_cpu_select(void);

#endif
