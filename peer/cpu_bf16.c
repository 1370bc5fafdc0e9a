/* cpu_bf16.c: exact top-k' of sub-key scores from a reduced-precision first
 * pass, in the CPU variants built with AVX512-BF16 and AVX512-VNNI: int8
 * (vpdpbusd, every token block; the int8 section below derives its bound
 * from this one) or bf16 (PEER_CPU_FIRST_PASS=bf16; token blocks of at most
 * PEER_CPU_BF16_MAX_NT tokens, cpu.h says why).  The layer keeps a copy of
 * the sub-keys in that format with their norms (peer_keys16, re-made when
 * keys_gen moves); each (token, head, half) scores all n sub-keys in it
 * (bf16 below: vdpbf16ps), brackets every f32 score the f32 path would
 * compute between s16 - e and s16 + e, keeps the keys whose bracket can
 * reach the k'-th largest lower end,
 * re-scores exactly those with the f32 path's own arithmetic, and selects
 * from the re-scored values by the tie rule.  The result is the f32 path's,
 * ids and score bits; when too many keys survive, the f32 scores are computed
 * for that half as before (counted in peer_retrieval_stats).
 *
 * The bound (bench/README.md "bf16 scoring with exact re-ranking" repeats
 * it).  For a query half q and a sub-key c of m = d_key/2 floats:
 *   s   = sum q_i c_i, exact (real);
 *   s32 = the f32 path: acc = fma(q_i, c_i, acc) for i = 0..m-1 from 0;
 *   q', c' = q, c rounded to bf16 (nearest even; |x| < 2^-126 flushed to 0
 *         here, so the hardware's DAZ changes nothing), dq = q - q',
 *         dc = c - c' (both exact in f32);
 *   s'  = sum q'_i c'_i (exact), s16 = what vdpbf16ps accumulates.
 * Then |s16 - s32| <= |s16 - s'| + |s' - s| + |s - s32|, and
 *   |s' - s| = |q'.dc + dq.c' + dq.dc| <= |q'||dc| + |dq||c'| + |dq||dc|
 *     (Cauchy-Schwarz on the exact residuals, |.| the 2-norm);
 *   |s16 - s'| <= g |q'||c'| + 3m 2^-126: a bf16 product is exact in f32 (8
 *     by 8 significant bits) unless it underflows (flushed: < 2^-126 each),
 *     and the m additions, in whatever order and grouping the hardware
 *     uses, each round (relative u = 2^-24) or flush (< 2^-126);
 *     g = gamma_2m = 2mu / (1 - 2mu) covers twice as many roundings;
 *   |s - s32| <= g |q||c| + m 2^-126 + 2^-126 m (|q| + |c|): m FMAs each
 *     round once (relative u, or < 2^-126 under FTZ), and under DAZ each
 *     subnormal operand dropped costs at most 2^-126 |other operand|.
 * So e = |c'| (|dq| + g|q'|) + |dc| (|q'| + |dq|) + |c| (g|q| + m 2^-126)
 *        + m 2^-124 + m 2^-126 |q|,
 * with every norm rounded up (sums of squares in double, then a margin)
 * and the coefficients and e inflated by 2^-16 for their own roundings (all
 * terms are positive).  If L_j = fl(s16_j - e_j) and tau is at most the k'-th
 * largest L (the k'-th largest of maxima over disjoint groups of 16 keys
 * is, and kth_largest's value is at most that),
 * k' keys have f32 scores >= tau, so every key of the f32 top-k' has
 * s32 >= tau, hence U_j = fl(s16_j + e_j) >= tau: keeping all keys with
 * U_j >= tau keeps the f32 top-k' (rounding to nearest is monotone, and the
 * f32 scores are floats).  A non-finite q', c', norm or bound sends the half
 * to the f32 path, which reports non-finite scores as it always has, and so
 * does a query half whose f32 chain may overflow against the set's largest
 * key (peer_bf16_chain_coef, rowops.h): an overflowing chain need not show
 * in s16 (the dot-product instruction adds in another order). */
#include "cpu.h"

#ifdef __AVX512BF16__
#include "pool.h"

#include <stdlib.h>

/* Keys per tile of the first pass (4 vectors) and tokens per register tile:
 * 6 x 4 accumulators, 4 key vectors and a broadcast fit 32 registers. */
#define KT 64
#define TT 6
/* Lower ends are kept as maxima over groups of 16 keys: lane l of the w-th
 * vector of maxima covers keys w*256 + 16i + l (i < 16), which 4 tiles
 * fill.  Fewer maxima make the k'-th largest cheaper to find, at the price of
 * a slightly lower threshold (a few more survivors). */
#define GROUP_SPAN 256
static int64_t n_maxima(int64_t n) { return (n + GROUP_SPAN - 1) / GROUP_SPAN * 16; }
/* Survivors re-scored per half; more take the f32 path. */
static int cand_cap(int64_t kp) { return (int)(2 * kp + 64); }

/* Components per 32-bit word of the first pass: two bf16 or four int8. */
static int per_word(int fmt) { return fmt == PEER_KEYS16_INT8 ? 4 : 2; }

static bool eligible(const peer_dims *D, int fmt) {
  return D->half % per_word(fmt) == 0 && D->n % KT == 0 && D->kp * 8 <= D->n &&
         D->kp <= n_maxima(D->n) && D->half < (1 << 20);
}

/* One key set (g, p): words [n/16][m/w][16] of 32 bits, each w components
 * of a key (the lowest first, as vdpbf16ps and vpdpbusd pair them): two
 * bf16, or four int8 c8 = round(c / s_c) stored as c8 + 128 (vpdpbusd's
 * unsigned operand); then |c'|, |dc|, |c| [n] and, for int8, s_c [n]. */
static size_t words_bytes(const peer_dims *D, int fmt) {
  return round64((size_t)(D->n * D->half) * (size_t)(4 / per_word(fmt)));
}
static size_t set_bytes(const peer_dims *D, int fmt) {
  return words_bytes(D, fmt) +
         (fmt == PEER_KEYS16_INT8 ? 4 : 3) * round64((size_t)D->n * sizeof(float));
}

typedef struct key_set {
  const uint32_t *words;
  const float *nc1, *ndc, *nc; /* |c'|, |dc|, |c| */
  const float *sc;             /* int8: the scales s_c */
  const float *c;              /* the f32 keys */
} key_set;

static key_set set_of(const peer_layer *L, int64_t g, int p) {
  const peer_dims *D = &L->dims;
  const int fmt = L->keys16.format;
  const char *base = (const char *)L->keys16.mem + (size_t)(g * 2 + p) * set_bytes(D, fmt);
  const float *norms = (const float *)(base + words_bytes(D, fmt));
  const int64_t stride = (int64_t)(round64((size_t)D->n * sizeof(float)) / sizeof(float));
  key_set k = {(const uint32_t *)base, norms, norms + stride, norms + 2 * stride,
               fmt == PEER_KEYS16_INT8 ? norms + 3 * stride : NULL,
               (const float *)L->slot[PEER_P_KEYS].data + (g * 2 + p) * D->n * D->half};
  return k;
}

/* Keys jb*16 .. jb*16+15 of a set: bf16 pairs and norms.  0 if non-finite. */
static int fill_block(const float *C, int64_t half, int64_t jb, uint16_t *pairs, float *nc1,
                      float *ndc, float *nc) {
  int ok = 1;
  for (int64_t j = jb * 16; j < jb * 16 + 16; j++) {
    double s0 = 0, s1 = 0, s2 = 0;
    for (int64_t i = 0; i < half; i++) {
      float c = C[j * half + i];
      uint16_t b = peer_bf16_ftz(c);
      float cb = peer_bf16_to_f32(b), dc = c - cb;
      ok &= isfinite(cb) != 0;
      s0 += (double)c * c;
      s1 += (double)cb * cb;
      s2 += (double)dc * dc;
      pairs[((jb * (half / 2) + i / 2) * 16 + j % 16) * 2 + i % 2] = b;
    }
    nc[j] = peer_norm_up(s0), nc1[j] = peer_norm_up(s1), ndc[j] = peer_norm_up(s2);
    ok &= isfinite(nc[j]) && isfinite(nc1[j]) && isfinite(ndc[j]);
  }
  return ok;
}

/* The int8 form of keys jb*16 .. jb*16+15: c8 = round(c / s_c) with
 * s_c = max |c_i| / 127 (0 for a key below 2^-100 in every component, whose
 * c8 are 0: c' = 0, dc = c, no subnormal scale), stored as c8 + 128; the
 * norms |c'| = s_c |c8|, |dc| = |c - s_c c8| and |c| in double (s_c c8 and
 * the difference are exact there).  0 if non-finite. */
static int fill_block8(const float *C, int64_t half, int64_t jb, uint8_t *words, float *nc1,
                       float *ndc, float *nc, float *sc) {
  int ok = 1;
  for (int64_t j = jb * 16; j < jb * 16 + 16; j++) {
    const float *c = C + j * half;
    float mx = 0;
    for (int64_t i = 0; i < half; i++)
      mx = fabsf(c[i]) > mx || isnan(c[i]) ? fabsf(c[i]) : mx;
    ok &= isfinite(mx) != 0;
    const float s = isfinite(mx) && mx >= 0x1p-100f ? mx / 127.0f : 0.0f;
    double s0 = 0, s1 = 0, s2 = 0;
    for (int64_t i = 0; i < half; i++) {
      float r = s > 0 ? rintf(c[i] / s) : 0.0f;
      r = r > 127.0f ? 127.0f : r < -127.0f ? -127.0f : r == r ? r : 0.0f;
      const int c8 = (int)r;
      const double dc = (double)c[i] - (double)s * c8;
      s0 += (double)c[i] * c[i];
      s1 += (double)c8 * c8;
      s2 += dc * dc;
      words[((jb * (half / 4) + i / 4) * 16 + j % 16) * 4 + i % 4] = (uint8_t)(c8 + 128);
    }
    nc[j] = peer_norm_up(s0), nc1[j] = peer_norm_up(s1 * (double)s * s), ndc[j] = peer_norm_up(s2);
    sc[j] = s;
    ok &= isfinite(nc[j]) && isfinite(nc1[j]) && isfinite(ndc[j]);
  }
  return ok;
}

typedef struct {
  peer_layer *L;
  int64_t blocks;
  _Atomic int ok;
} keys16_job;

/* Item s * blocks + jb: block jb of 16 sub-keys of set s. */
static void keys16_item(void *job, int64_t item, int slot) {
  keys16_job *j = job;
  const peer_layer *L = j->L;
  const peer_dims *D = &L->dims;
  const int64_t s = item / j->blocks, jb = item % j->blocks;
  const int fmt = L->keys16.format;
  char *base = (char *)L->keys16.mem + (size_t)s * set_bytes(D, fmt);
  float *nc1 = (float *)(base + words_bytes(D, fmt));
  const int64_t stride = (int64_t)(round64((size_t)D->n * sizeof(float)) / sizeof(float));
  const float *C = (const float *)L->slot[PEER_P_KEYS].data + s * D->n * D->half;
  (void)slot;
  const int ok = fmt == PEER_KEYS16_INT8
                     ? fill_block8(C, D->half, jb, (uint8_t *)base, nc1, nc1 + stride,
                                   nc1 + 2 * stride, nc1 + 3 * stride)
                     : fill_block(C, D->half, jb, (uint16_t *)base, nc1, nc1 + stride,
                                  nc1 + 2 * stride);
  if (!ok) atomic_store_explicit(&j->ok, 0, memory_order_relaxed);
}

/* Keys the caller may have written in place since any call (keys_exposed)
 * would need the copy re-made per call, which costs more than the small
 * batches this path serves save: such layers take the f32 path. */
/* The first pass's format: int8 where the variant has AVX512-VNNI (vpdpbusd
 * retires 64 products per instruction, four times vdpbf16ps's 32 at twice
 * its rate on the host measured, and the copy is half the bytes), unless the
 * environment's PEER_CPU_FIRST_PASS says "bf16" (or "f32": no first pass);
 * bf16 where the sub-key half is not a multiple of 4.  -1: none. */
static int wanted_format(const peer_dims *D) {
  const char *e = getenv("PEER_CPU_FIRST_PASS");
  if (e && !strcmp(e, "f32")) return -1;
#ifdef __AVX512VNNI__
  if (!(e && !strcmp(e, "bf16")) && eligible(D, PEER_KEYS16_INT8)) return PEER_KEYS16_INT8;
#endif
  return eligible(D, PEER_KEYS16_BF16) ? PEER_KEYS16_BF16 : -1;
}

bool peer_cpu_keys16_ready(peer_layer *L, int P) {
  const peer_dims *D = &L->dims;
  peer_keys16 *K = &L->keys16;
  if (L->keys_exposed) return false;
  if (K->mem && K->gen == L->keys_gen) return K->valid;
  const int fmt = wanted_format(D);
  if (fmt < 0) return false;
  const size_t bytes = (size_t)(D->G * 2) * set_bytes(D, fmt);
  if (K->mem && K->bytes != bytes) {
    peer_free(K->mem, K->bytes);
    K->mem = NULL;
  }
  if (!K->mem) {
    K->mem = peer_alloc(bytes);
    if (!K->mem) return false; /* the f32 path needs no copy */
    K->bytes = bytes;
  }
  K->format = fmt;
  keys16_job j = {L, D->n / 16, 1};
  peer_parallel(P, D->G * 2 * j.blocks, keys16_item, &j);
  K->gen = L->keys_gen;
  K->valid = atomic_load(&j.ok) != 0;
  return K->valid;
}

/* ------------------------------------------------------------ scratch */

typedef struct bscratch {
  float *lmax;   /* [TB][2][n_maxima(n)] group maxima of lower ends */
  uint32_t *qp;  /* [TB][2][m/2] query halves as bf16 pairs (int8: m/4 quads) */
  float *coef;   /* [TB][2][4] A, B, C, D of the bound */
  int *fall;     /* [TB][2] this half takes the f32 path */
  int32_t *cand; /* [cap] survivors */
  float *cs;     /* [cap] their f32 scores */
  float *ls;     /* [TB][2][kp] lists */
  int64_t *lid;  /* [TB][2][kp] */
  float *sq;     /* int8: [TB][2] the query halves' scales s_q */
  int32_t *corr; /* int8: [TB][2] 128 sum q8, what the keys' offset adds */
} bscratch;

static size_t carve(const peer_dims *D, char *base, bscratch *b) {
  const size_t th = (size_t)TB * 2, cap = (size_t)cand_cap(D->kp);
  size_t sz[10] = {th * (size_t)n_maxima(D->n) * 4,
                   th * (size_t)(D->half / 2) * 4,
                   th * 16,
                   th * sizeof(int),
                   cap * 4,
                   cap * 4,
                   th * (size_t)D->kp * 4,
                   th * (size_t)D->kp * 8,
                   th * 4,
                   th * 4};
  size_t off = 0, at[10];
  for (int i = 0; i < 10; i++)
    at[i] = off, off += round64(sz[i]);
  if (b) {
    b->lmax = (float *)(base + at[0]);
    b->qp = (uint32_t *)(base + at[1]);
    b->coef = (float *)(base + at[2]);
    b->fall = (int *)(base + at[3]);
    b->cand = (int32_t *)(base + at[4]);
    b->cs = (float *)(base + at[5]);
    b->ls = (float *)(base + at[6]);
    b->lid = (int64_t *)(base + at[7]);
    b->sq = (float *)(base + at[8]);
    b->corr = (int32_t *)(base + at[9]);
  }
  return off;
}

size_t peer_cpu_bf16_scratch_bytes(const peer_dims *D) {
  return eligible(D, PEER_KEYS16_BF16) ? carve(D, NULL, NULL) : 0;
}

/* ------------------------------------------------------------ first pass */

/* The query half as bf16 pairs and the bound's coefficients (see the top):
 * e_j = A |c'_j| + B |dc_j| + C |c_j| + D.  0 if something is not finite,
 * or if the f32 chain against a key of norm c_max (the set's largest) may
 * overflow (peer_bf16_chain_coef: its result, which the f32 path reports
 * as non-finite, can be so for a key whose bracket is far below the
 * others'). */
static int prep_query(const float *qh, int64_t m, uint32_t *qp, float coef[4], float c_max) {
  /* 16 components at a time: flush, round to nearest even (integer
   * arithmetic, as peer_f32_to_bf16 for finite values; a non-finite one
   * fails the check below whatever its rounding), and the three sums of
   * squares in double */
  const int64_t m16 = m - m % 16;
  __m512d a0 = _mm512_setzero_pd(), a1 = a0, a2 = a0;
  __mmask16 bad = 0;
  const __m512 tiny = _mm512_set1_ps(0x1p-126f);
  const __m512i ones = _mm512_set1_epi32(1), half = _mm512_set1_epi32(0x7fff),
                top = _mm512_set1_epi32((int)0xffff0000u);
  for (int64_t i = 0; i < m16; i += 16) {
    __m512 v = _mm512_loadu_ps(qh + i);
    v = _mm512_mask_mov_ps(v, _mm512_cmp_ps_mask(_mm512_abs_ps(v), tiny, _CMP_LT_OQ),
                           _mm512_setzero_ps());
    __m512i u = _mm512_castps_si512(v);
    u = _mm512_add_epi32(u,
                         _mm512_add_epi32(half, _mm512_and_si512(_mm512_srli_epi32(u, 16), ones)));
    __m512 f = _mm512_castsi512_ps(_mm512_and_si512(u, top)), d = _mm512_sub_ps(v, f);
    bad |= _mm512_cmp_ps_mask(_mm512_sub_ps(f, f), _mm512_setzero_ps(), _CMP_NEQ_UQ);
    _mm256_storeu_si256((__m256i *)(qp + i / 2), _mm512_cvtepi32_epi16(_mm512_srli_epi32(u, 16)));
    const __m512 x[3] = {_mm512_loadu_ps(qh + i), f, d};
    __m512d *acc[3] = {&a0, &a1, &a2};
    for (int j = 0; j < 3; j++) {
      __m512d lo = _mm512_cvtps_pd(_mm512_castps512_ps256(x[j]));
      __m512d hi =
          _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(x[j]), 1)));
      *acc[j] = _mm512_fmadd_pd(lo, lo, _mm512_fmadd_pd(hi, hi, *acc[j]));
    }
  }
  double s0 = _mm512_reduce_add_pd(a0), s1 = _mm512_reduce_add_pd(a1),
         s2 = _mm512_reduce_add_pd(a2);
  int ok = bad == 0;
  for (int64_t i = m16; i < m; i += 2) {
    uint16_t b0 = peer_bf16_ftz(qh[i]), b1 = peer_bf16_ftz(qh[i + 1]);
    float f0 = peer_bf16_to_f32(b0), f1 = peer_bf16_to_f32(b1);
    float d0 = qh[i] - f0, d1 = qh[i + 1] - f1;
    ok &= isfinite(f0) && isfinite(f1);
    s0 += (double)qh[i] * qh[i] + (double)qh[i + 1] * qh[i + 1];
    s1 += (double)f0 * f0 + (double)f1 * f1;
    s2 += (double)d0 * d0 + (double)d1 * d1;
    qp[i / 2] = (uint32_t)b0 | (uint32_t)b1 << 16;
  }
  const double u2m = 2.0 * (double)m * 0x1p-24;
  const float g = peer_round_up(u2m / (1.0 - u2m) * (1.0 + 0x1p-30)); /* gamma_2m */
  const float nq = peer_norm_up(s0);
  peer_bf16_bound_coefs(nq, peer_norm_up(s1), peer_norm_up(s2), m, g, coef);
  for (int i = 0; i < 4; i++)
    ok &= isfinite(coef[i]) != 0;
  return ok && isfinite(peer_bf16_chain_coef(nq, g) * c_max);
}

/* From the first pass's scores s of tokens 0..nt_-1 against the KT keys of
 * one tile: each key's upper end U = s + e (stored at U + t*ldU) and the
 * lower ends' group maxima (the vector at lm + t*ldL: stored by the first
 * tile of a GROUP_SPAN, raised by the others).  fall[t*2] is set where a
 * value is not finite. */
static inline __attribute__((always_inline)) void
brackets(int nt_, __m512 s[TT][4], const float *nc1, const float *ndc, const float *nc,
         const float *coef, float *U, int64_t ldU, float *lm, int64_t ldL, bool first, int *fall) {
  __m512 n1[4], nd[4], n0[4];
  for (int v = 0; v < 4; v++) {
    n1[v] = _mm512_loadu_ps(nc1 + 16 * v);
    nd[v] = _mm512_loadu_ps(ndc + 16 * v);
    n0[v] = _mm512_loadu_ps(nc + 16 * v);
  }
  const __m512 zero = _mm512_setzero_ps();
  for (int t = 0; t < nt_; t++) {
    const float *c = coef + t * 8; /* [t][p][4] with p fixed by the caller */
    const __m512 A = _mm512_set1_ps(c[0]), B = _mm512_set1_ps(c[1]), C = _mm512_set1_ps(c[2]),
                 Dv = _mm512_set1_ps(c[3]);
    __m512 lmax = _mm512_set1_ps(-INFINITY);
    __mmask16 bad = 0;
    for (int v = 0; v < 4; v++) {
      __m512 e =
          _mm512_fmadd_ps(A, n1[v], _mm512_fmadd_ps(B, nd[v], _mm512_fmadd_ps(C, n0[v], Dv)));
      __m512 up = _mm512_add_ps(s[t][v], e), lo = _mm512_sub_ps(s[t][v], e);
      _mm512_storeu_ps(U + t * ldU + 16 * v, up);
      lmax = _mm512_max_ps(lmax, lo);
      bad |= _mm512_cmp_ps_mask(_mm512_sub_ps(up, up), zero, _CMP_NEQ_UQ) |
             _mm512_cmp_ps_mask(_mm512_sub_ps(lo, lo), zero, _CMP_NEQ_UQ);
    }
    if (!first) lmax = _mm512_max_ps(lmax, _mm512_loadu_ps(lm + t * ldL));
    _mm512_storeu_ps(lm + t * ldL, lmax);
    fall[t * 2] |= bad != 0;
  }
}

/* bf16 scores of tokens 0..nt_-1 against the KT keys of one tile, and their
 * brackets. */
static inline __attribute__((always_inline)) void
tile(int nt_, int64_t hp, const uint32_t *qp, int64_t ldqp, const uint32_t *kb, const float *nc1,
     const float *ndc, const float *nc, const float *coef, float *U, int64_t ldU, float *lm,
     int64_t ldL, bool first, int *fall) {
  __m512 acc[TT][4];
  for (int t = 0; t < nt_; t++)
    for (int v = 0; v < 4; v++)
      acc[t][v] = _mm512_setzero_ps();
  for (int64_t i = 0; i < hp; i++) {
    __m512i k[4];
    for (int v = 0; v < 4; v++)
      k[v] = _mm512_loadu_si512(kb + (v * hp + i) * 16);
    for (int t = 0; t < nt_; t++) {
      __m512i qb = _mm512_set1_epi32((int)qp[t * ldqp + i]);
      for (int v = 0; v < 4; v++)
        acc[t][v] = _mm512_dpbf16_ps(acc[t][v], (__m512bh)qb, (__m512bh)k[v]);
    }
  }
  brackets(nt_, acc, nc1, ndc, nc, coef, U, ldU, lm, ldL, first, fall);
}

#ifdef __AVX512VNNI__
/* The int8 first pass.  The query half is quantised as the keys are:
 * q8 = round(q / s_q), s_q = max |q_i| / 127 (0 below 2^-100: q8 = 0), and
 * the exact integer I = q8 . c8 (vpdpbusd: the keys' unsigned c8 + 128
 * against the signed q8, less 128 sum q8) gives s8 = fl(fl(s_c I) s_q).
 * With q' = s_q q8, dq = q - q', c' = s_c c8, dc = c - c' (reals):
 *   |s8 - s32| <= |s8 - s_q s_c I| + |q'.c' - s| + |s - s32|;
 *   |q'.c' - s| <= |q'||dc| + |dq||c'| + |dq||dc| (as for bf16);
 *   |s8 - s_q s_c I| <= 2u(1 + u) |q'||c'| + 2^-126 (1 + 2 |q|): two
 *     roundings (I < 2^24 converts exactly), each flushing at most 2^-126
 *     (s_q <= |q|), and DAZ of a subnormal fl(s_c I) costs at most s_q 2^-126;
 *   |s - s32| as for bf16.
 * So the bf16 coefficients with nq1 = |q'|, ndq = |dq| (gamma_2m >= 2u(1+u))
 * hold, with D raised by 2^-124 (1 + |q|) for the second term's absolute
 * part. */

/* The query half as int8 quads, its scale and correction, and the bound's
 * coefficients; 0 as prep_query. */
static int prep_query8(const float *qh, int64_t m, uint32_t *qw, float *sq, int32_t *corr,
                       float coef[4], float c_max) {
  /* 16 components at a time, the last group masked (m is a multiple of 4) */
#define LANES(i) (m - (i) >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (m - (i))) - 1))
  __m512 mx = _mm512_setzero_ps();
  for (int64_t i = 0; i < m; i += 16)
    mx = _mm512_max_ps(mx, _mm512_abs_ps(_mm512_maskz_loadu_ps(LANES(i), qh + i)));
  const float amax = _mm512_reduce_max_ps(mx);
  const float s = isfinite(amax) && amax >= 0x1p-100f ? amax / 127.0f : 0.0f;
  const __m512 inv = _mm512_set1_ps(s > 0 ? 1.0f / s : 0.0f);
  const __m512d sd = _mm512_set1_pd((double)s);
  __m512d a0 = _mm512_setzero_pd(), a1 = a0, a2 = a0;
  __m512i sum = _mm512_setzero_si512();
  for (int64_t i = 0; i < m; i += 16) {
    const __m512 v = _mm512_maskz_loadu_ps(LANES(i), qh + i);
    /* nearest; NaN and out-of-range values give INT_MIN, which saturates,
     * and fail through the norms below */
    const __m512i q8 = _mm512_max_epi32(
        _mm512_min_epi32(_mm512_cvtps_epi32(_mm512_mul_ps(v, inv)), _mm512_set1_epi32(127)),
        _mm512_set1_epi32(-127));
    sum = _mm512_add_epi32(sum, q8);
    _mm_mask_storeu_epi8((int8_t *)qw + i, LANES(i), _mm512_cvtepi32_epi8(q8));
    const __m512d q[2] = {_mm512_cvtps_pd(_mm512_castps512_ps256(v)),
                          _mm512_cvtps_pd(_mm256_castpd_ps(
                              _mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)))};
    const __m512d p[2] = {_mm512_mul_pd(sd, _mm512_cvtepi32_pd(_mm512_castsi512_si256(q8))),
                          _mm512_mul_pd(sd, _mm512_cvtepi32_pd(_mm512_extracti64x4_epi64(q8, 1)))};
    for (int h = 0; h < 2; h++) {
      const __m512d dq = _mm512_sub_pd(q[h], p[h]);
      a0 = _mm512_fmadd_pd(q[h], q[h], a0);
      a1 = _mm512_fmadd_pd(p[h], p[h], a1);
      a2 = _mm512_fmadd_pd(dq, dq, a2);
    }
  }
#undef LANES
  *sq = s;
  *corr = 128 * _mm512_reduce_add_epi32(sum);
  const double u2m = 2.0 * (double)m * 0x1p-24;
  const float g = peer_round_up(u2m / (1.0 - u2m) * (1.0 + 0x1p-30)); /* gamma_2m */
  const float nq = peer_norm_up(_mm512_reduce_add_pd(a0));
  peer_bf16_bound_coefs(nq, peer_norm_up(_mm512_reduce_add_pd(a1)),
                        peer_norm_up(_mm512_reduce_add_pd(a2)), m, g, coef);
  coef[3] = peer_round_up((double)coef[3] + 0x1p-124 * (1.0 + nq) * (1.0 + 0x1p-16));
  int ok = 1;
  for (int i = 0; i < 4; i++)
    ok &= isfinite(coef[i]) != 0;
  return ok && isfinite(peer_bf16_chain_coef(nq, g) * c_max);
}

/* tile's int8 form: qw holds each token's quads, sq and corr its scale and
 * correction (2 apart, as coef is 8 apart), sc the keys' scales. */
static inline __attribute__((always_inline)) void
tile8(int nt_, int64_t hq, const uint32_t *qw, int64_t ldqw, const float *sq, const int32_t *corr,
      const uint32_t *kb, const float *sc, const float *nc1, const float *ndc, const float *nc,
      const float *coef, float *U, int64_t ldU, float *lm, int64_t ldL, bool first, int *fall) {
  __m512i acc[TT][4];
  for (int t = 0; t < nt_; t++)
    for (int v = 0; v < 4; v++)
      acc[t][v] = _mm512_setzero_si512();
  for (int64_t i = 0; i < hq; i++) {
    __m512i k[4];
    for (int v = 0; v < 4; v++)
      k[v] = _mm512_loadu_si512(kb + (v * hq + i) * 16);
    for (int t = 0; t < nt_; t++) {
      const __m512i qb = _mm512_set1_epi32((int)qw[t * ldqw + i]);
      for (int v = 0; v < 4; v++)
        acc[t][v] = _mm512_dpbusd_epi32(acc[t][v], k[v], qb);
    }
  }
  __m512 s8[TT][4];
  for (int v = 0; v < 4; v++) {
    const __m512 s_c = _mm512_loadu_ps(sc + 16 * v);
    for (int t = 0; t < nt_; t++)
      s8[t][v] = _mm512_mul_ps(
          _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(acc[t][v], _mm512_set1_epi32(corr[t * 2]))),
                        s_c),
          _mm512_set1_ps(sq[t * 2]));
  }
  brackets(nt_, s8, nc1, ndc, nc, coef, U, ldU, lm, ldL, first, fall);
}
#endif

/* A lower bound on the kp-th largest of the nv*16 finite values v (which it
 * overwrites), exact to
 * 2^-15 relative: floats mapped to unsigned integers in the same order, the
 * largest key with at least kp values >= it is found bit by bit from the
 * top (vector compares and counts; no data-dependent branches), and its
 * untried low bits are left 0, which only lowers it. */
static float kth_largest(float *v, int64_t nv, int kp) {
  uint32_t *key = (uint32_t *)v; /* in place */
  for (int64_t w = 0; w < nv; w++) {
    __m512i i = _mm512_loadu_si512(v + 16 * w);
    __m512i flip = _mm512_srli_epi32(_mm512_srai_epi32(i, 31), 1); /* 0x7fffffff if negative */
    i = _mm512_xor_si512(_mm512_xor_si512(i, flip), _mm512_set1_epi32((int)0x80000000u));
    _mm512_storeu_si512(key + 16 * w, i);
  }
  uint32_t res = 0;
  for (int b = 31; b >= 8; b--) {
    const uint32_t cand = res | 1u << b;
    const __m512i c = _mm512_set1_epi32((int)cand);
    int count = 0;
    for (int64_t w = 0; w < nv; w++)
      count += __builtin_popcount(_mm512_cmpge_epu32_mask(_mm512_loadu_si512(key + 16 * w), c));
    if (count >= kp) res = cand;
  }
  uint32_t i = res ^ 0x80000000u;
  i ^= (uint32_t)((int32_t)i >> 31) >> 1;
  float f;
  memcpy(&f, &i, sizeof f);
  return f;
}

/* Survivors: the keys whose U >= tau, ascending; -1 if more than cap. */
static int survivors(const float *U, int64_t n, float tau, int32_t *cand, int cap) {
  const __m512 tv = _mm512_set1_ps(tau);
  __m512i idx = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const __m512i step = _mm512_set1_epi32(16);
  int cnt = 0;
  for (int64_t j = 0; j < n; j += 16, idx = _mm512_add_epi32(idx, step)) {
    __mmask16 m = _mm512_cmp_ps_mask(_mm512_loadu_ps(U + j), tv, _CMP_GE_OQ);
    int c = __builtin_popcount(m);
    if (cnt + c > cap) return -1;
    _mm512_mask_compressstoreu_epi32(cand + cnt, m, idx);
    cnt += c;
  }
  return cnt;
}

/* 16 rows of 16 floats to 16 columns, in registers (4 rounds of 16
 * shuffles). */
static inline __attribute__((always_inline)) void transpose16(__m512 r[16]) {
  __m512 t[16];
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int i = 0; i < 16; i += 4)
    for (int j = 0; j < 2; j++) {
      const __m512d a = _mm512_castps_pd(t[i + j]), b = _mm512_castps_pd(t[i + j + 2]);
      r[i + 2 * j] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, b));
      r[i + 2 * j + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, b));
    }
  for (int i = 0; i < 16; i += 8)
    for (int j = 0; j < 4; j++) {
      t[i + j] = _mm512_shuffle_f32x4(r[i + j], r[i + j + 4], 0x88);
      t[i + j + 4] = _mm512_shuffle_f32x4(r[i + j], r[i + j + 4], 0xdd);
    }
  for (int j = 0; j < 8; j++) {
    r[j] = _mm512_shuffle_f32x4(t[j], t[j + 8], 0x88);
    r[j + 8] = _mm512_shuffle_f32x4(t[j], t[j + 8], 0xdd);
  }
}

/* The f32 path's scores of the candidates: one chain of FMAs per score in
 * component order from 0, as peer_cpu_gemm_nt computes every element (the
 * product is commutative, so fma(q, c, acc) is its fma(a, b, acc)).  The
 * chains of 16 candidates run in the lanes of one vector, their rows
 * transposed 16 components at a time; two such groups interleaved hide the
 * FMA latency.  A last group of fewer repeats its last candidate. */
static void rescore(const float *qh, const float *C, int64_t m, const int32_t *cand, int cnt,
                    float *out) {
  const int64_t m16 = m - m % 16;
  for (int i = 0; i < cnt; i += 32) {
    const int ng = cnt - i > 16 ? 2 : 1;
    const float *c[32];
    for (int r = 0; r < 16 * ng; r++)
      c[r] = C + (int64_t)cand[i + r < cnt ? i + r : cnt - 1] * m;
    __m512 acc[2] = {_mm512_setzero_ps(), _mm512_setzero_ps()};
    for (int64_t k = 0; k < m16; k += 16) {
      for (int g = 0; g < ng; g++) { /* 16 registers a group: no spills */
        __m512 col[16];
        for (int r = 0; r < 16; r++)
          col[r] = _mm512_loadu_ps(c[g * 16 + r] + k);
        transpose16(col);
        for (int j = 0; j < 16; j++)
          acc[g] = _mm512_fmadd_ps(_mm512_set1_ps(qh[k + j]), col[j], acc[g]);
      }
    }
    for (int64_t k = m16; k < m; k++) {
      const __m512 qk = _mm512_set1_ps(qh[k]);
      for (int g = 0; g < ng; g++) {
        float v[16];
        for (int r = 0; r < 16; r++)
          v[r] = c[g * 16 + r][k];
        acc[g] = _mm512_fmadd_ps(qk, _mm512_loadu_ps(v), acc[g]);
      }
    }
    for (int g = 0; g < ng; g++) {
      const int left = cnt - i - 16 * g;
      _mm512_mask_storeu_ps(out + i + 16 * g,
                            left >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << left) - 1),
                            acc[g]);
    }
  }
}

/* The top kp of the cnt >= kp re-scored candidates (ids ascending, scores
 * finite) into ls and lid by the tie rule: each candidate's rank is the
 * number of candidates that beat it (peer_beats: a higher score, or an equal
 * one at a smaller index, since the ids ascend), counted with vector
 * compares; ranks are distinct, so ranks 0..kp-1 fill the list. */
static void select_ranked(const float *cs, const int32_t *cand, int cnt, int kp, float *ls,
                          int64_t *lid) {
  for (int i = 0; i < cnt; i++) {
    const __m512 v = _mm512_set1_ps(cs[i]);
    int rank = 0;
    for (int j0 = 0; j0 < cnt && rank < kp; j0 += 16) {
      const __mmask16 valid =
          cnt - j0 >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (cnt - j0)) - 1);
      const __mmask16 below =
          i - j0 >= 16 ? (__mmask16)0xffff : i <= j0 ? 0 : (__mmask16)((1u << (i - j0)) - 1);
      const __m512 c = _mm512_maskz_loadu_ps(valid, cs + j0);
      rank += __builtin_popcount(_mm512_mask_cmp_ps_mask(valid, c, v, _CMP_GT_OQ)) +
              __builtin_popcount(_mm512_mask_cmp_ps_mask(valid & below, c, v, _CMP_EQ_OQ));
    }
    if (rank < kp) ls[rank] = cs[i], lid[rank] = cand[i];
  }
}

void peer_cpu_bf16_lists(const peer_layer *L, int64_t h, int64_t nt, const float *q, int64_t ldq,
                         float *S, int64_t ldS, char *scratch, float **ls_out, int64_t **lid_out,
                         int *bad, float *pack, int64_t *n_first, int64_t *n_fallback) {
  const peer_dims *D = &L->dims;
  const int64_t n = D->n, m = D->half, nl = n_maxima(n);
  const int kp = (int)D->kp, cap = cand_cap(kp);
  const int64_t g = L->cfg.shared_keys ? 0 : h;
  bscratch b;
  carve(D, scratch, &b);
  float c_max[2] = {0, 0}; /* each half's largest key norm |c| */
  for (int p = 0; p < 2; p++) {
    const float *nc = set_of(L, g, p).nc;
    for (int64_t j = 0; j < n; j++)
      c_max[p] = nc[j] > c_max[p] ? nc[j] : c_max[p];
  }
#ifdef __AVX512VNNI__
  const bool int8 = L->keys16.format == PEER_KEYS16_INT8;
#else
  const bool int8 = false;
#endif
  const int64_t hw = m / per_word(L->keys16.format); /* words per query half */
  for (int64_t t = 0; t < nt; t++) {
    bad[t] = 0;
    if (t + 4 < nt) /* the queries of a block are 4 KiB or more apart: no stream to detect */
      for (int64_t o = 0; o < D->dk; o += 16)
        _mm_prefetch((const char *)(q + (t + 4) * ldq + h * D->dk + o), _MM_HINT_T0);
    for (int p = 0; p < 2; p++) {
      const float *qh = q + t * ldq + h * D->dk + p * m;
      const int64_t r = t * 2 + p;
#ifdef __AVX512VNNI__
      if (int8) {
        b.fall[r] = !prep_query8(qh, m, b.qp + r * hw, b.sq + r, b.corr + r, b.coef + r * 4,
                                 c_max[p]);
        continue;
      }
#endif
      b.fall[r] = !prep_query(qh, m, b.qp + r * hw, b.coef + r * 4, c_max[p]);
    }
  }
  for (int p = 0; p < 2; p++) {
    const key_set K = set_of(L, g, p);
    for (int64_t j0 = 0; j0 < n; j0 += KT) {
      const uint32_t *kb = K.words + (j0 / 16) * hw * 16;
      for (int64_t t0 = 0; t0 < nt; t0 += TT) {
        const int64_t r = t0 * 2 + p;
        const uint32_t *qp = b.qp + r * hw;
        const float *coef = b.coef + r * 4;
        float *U = S + t0 * ldS + p * n + j0, *lm = b.lmax + r * nl + j0 / GROUP_SPAN * 16;
        int *fall = b.fall + r;
#ifdef __AVX512VNNI__
        if (int8) {
          switch (nt - t0 < TT ? nt - t0 : TT) {
#define TILE8(c)                                                                                   \
  case c:                                                                                          \
    tile8(c, hw, qp, 2 * hw, b.sq + r, b.corr + r, kb, K.sc + j0, K.nc1 + j0, K.ndc + j0,          \
          K.nc + j0, coef, U, ldS, lm, 2 * nl, j0 % GROUP_SPAN == 0, fall);                        \
    break;
            TILE8(1) TILE8(2) TILE8(3) TILE8(4) TILE8(5) TILE8(6)
#undef TILE8
          }
          continue;
        }
#endif
        switch (nt - t0 < TT ? nt - t0 : TT) {
#define TILE(c)                                                                                    \
  case c:                                                                                          \
    tile(c, hw, qp, 2 * hw, kb, K.nc1 + j0, K.ndc + j0, K.nc + j0, coef, U, ldS, lm, 2 * nl,       \
         j0 % GROUP_SPAN == 0, fall);                                                              \
    break;
          TILE(1) TILE(2) TILE(3) TILE(4) TILE(5) TILE(6)
#undef TILE
        }
      }
    }
  }
  for (int64_t t = 0; t < nt; t++) {
    for (int p = 0; p < 2; p++) {
      const int64_t r = t * 2 + p;
      const key_set K = set_of(L, g, p);
      const float *qh = q + t * ldq + h * D->dk + p * m;
      float *U = S + t * ldS + p * n, *ls = b.ls + r * kp;
      int64_t *lid = b.lid + r * kp;
      int cnt = -1;
      if (!b.fall[r]) cnt = survivors(U, n, kth_largest(b.lmax + r * nl, nl / 16, kp), b.cand, cap);
      if (cnt < 0) { /* the f32 path, as peer_cpu_retrieve_all takes it */
        peer_cpu_gemm_nt(1, n, m, qh, m, K.c, m, U, n, pack);
        bad[t] |= peer_cpu_topk_scan(U, (int)n, kp, ls, lid);
        ++*n_fallback;
        continue;
      }
      rescore(qh, K.c, m, b.cand, cnt, b.cs);
      select_ranked(b.cs, b.cand, cnt, kp, ls, lid);
      ++*n_first;
    }
  }
  *ls_out = b.ls;
  *lid_out = b.lid;
}

#endif
