/* rowops.h: the per-row logic every backend shares: the order of results (the
 * tie rule), top-k' selection over one half's sub-key scores, the exact merge
 * of two top-k' lists into a head's top-k, gate and activation math.  These
 * compile as C and as CUDA (__host__ __device__), so the CPU tests exercise
 * the code the GPU runs. */
#ifndef PEER_ROWOPS_H
#define PEER_ROWOPS_H

#include <math.h>
#include <stdint.h>

#ifdef __CUDACC__
#define PEER_HD __host__ __device__ __forceinline__ static
#else
#define PEER_HD static inline
#endif

/* PEER.md's order: higher score first; equal scores go to the smaller id. */
PEER_HD int peer_beats(float sa, int64_t ia, float sb, int64_t ib) {
  return sa > sb || (sa == sb && ia < ib);
}

/* peer_beats as one integer, for selections that compare and sort plain
 * keys (the CUDA top-k'): for scores that are not NaN and ids in [0, 2^31),
 * (sa, ia) beats (sb, ib) exactly when peer_order_key(sa, ia) >
 * peer_order_key(sb, ib) as unsigned numbers.  The score's bits made
 * monotone (positives with the sign bit set, negatives complemented; -0
 * read as +0, which peer_beats ties with it) above ~id; a NaN, which beats
 * nothing, sorts below every number.  Distinct ids give distinct keys, and
 * every key is above 0. */
PEER_HD uint64_t peer_order_key(float s, int64_t id) {
  union {
    float f;
    uint32_t u;
  } v;
  v.f = s == 0.0f ? 0.0f : s;
  const uint32_t u = s != s ? 0u : (v.u & 0x80000000u) ? ~v.u : v.u | 0x80000000u;
  return (uint64_t)u << 32 | (uint32_t) ~(uint32_t)id;
}

/* The id a peer_order_key carries. */
PEER_HD int64_t peer_order_key_id(uint64_t key) { return (int64_t)(uint32_t) ~(uint32_t)key; }

/* Insert (s, id) into the sorted list (sc, ids) of *count entries and room
 * for cap; the worst entry falls off when full.  The caller has checked that
 * the newcomer beats the current worst when the list is full. */
PEER_HD void peer_list_insert(float *sc, int64_t *ids, int cap, int *count, float s,
                              int64_t id) {
  int pos = *count < cap ? *count : cap - 1;
  while (pos > 0 && peer_beats(s, id, sc[pos - 1], ids[pos - 1])) {
    sc[pos] = sc[pos - 1];
    ids[pos] = ids[pos - 1];
    pos--;
  }
  sc[pos] = s;
  ids[pos] = id;
  if (*count < cap) (*count)++;
}

/* Top-kp of n scores (indices 0..n-1), sorted by the tie rule, without
 * sorting all n: a sorted list of kp that only a better score enters.
 * Returns 0 if every score is finite, 1 otherwise (the list still holds valid
 * indices in [0, n)). */
PEER_HD int peer_topk_scan(const float *s, int n, int kp, float *out_s, int64_t *out_id) {
  int count = 0, bad = 0;
  for (int i = 0; i < n; i++) {
    float v = s[i];
    bad |= !isfinite(v);
    /* Indices rise, so a tie with the worst entry never enters. */
    if (count < kp || v > out_s[kp - 1]) peer_list_insert(out_s, out_id, kp, &count, v, i);
  }
  return bad;
}

/* The exact sum of two floats as hi + lo (Knuth's TwoSum): hi = fl(a + b),
 * lo the rounding error, so (hi, lo) compared in order is the exact sum
 * compared.  No multiplications, so FMA contraction cannot change it. */
PEER_HD void peer_two_sum(float a, float b, float *hi, float *lo) {
  float s = a + b;
  float bb = s - a;
  *hi = s;
  *lo = (a - (s - bb)) + (b - bb);
}

/* The candidate order: the exact sum s1[a] + s2[b] (hi, then lo), higher
 * first; exactly equal sums go to the smaller id. */
PEER_HD int peer_pair_beats(float ha, float la, int64_t ia, float hb, float lb, int64_t ib) {
  return ha > hb || (ha == hb && (la > lb || (la == lb && ia < ib)));
}

/* peer_list_insert for candidates carrying the rounding error lo. */
PEER_HD void peer_pair_insert(float *sc, float *lo, int64_t *ids, int cap, int *count, float s,
                              float l, int64_t id) {
  int pos = *count < cap ? *count : cap - 1;
  while (pos > 0 && peer_pair_beats(s, l, id, sc[pos - 1], lo[pos - 1], ids[pos - 1])) {
    sc[pos] = sc[pos - 1];
    lo[pos] = lo[pos - 1];
    ids[pos] = ids[pos - 1];
    pos--;
  }
  sc[pos] = s;
  lo[pos] = l;
  ids[pos] = id;
  if (*count < cap) (*count)++;
}

/* A head's top-k from the Cartesian product of the two halves' top-kp lists
 * (each sorted by the tie rule).  Candidates are ordered by their exact sums
 * (see peer_pair_beats), which makes the product exact: rounding s1 + s2 to
 * a float can tie two sums whose exact values differ, and a float tie would
 * let an expert outside A1 x A2 win on its id.  In a sorted row i the
 * candidates (i, j) come in order as j grows, and (i, 0) beats every (i', j)
 * for i' > i, so scans stop early.  Expert id = a*n + b; out_s gets the
 * float sums, lo (k floats) their rounding errors.  Returns 1 if a candidate
 * sum is non-finite (overflow), else 0. */
PEER_HD int peer_merge_candidates(const float *s1, const int64_t *a1, const float *s2,
                                  const int64_t *a2, int kp, int k, int64_t n, float *out_s,
                                  float *lo, int64_t *out_id) {
  int count = 0, bad = 0;
  for (int i = 0; i < kp; i++) {
    for (int j = 0; j < kp; j++) {
      float c, l;
      peer_two_sum(s1[i], s2[j], &c, &l);
      int64_t id = a1[i] * n + a2[j];
      if (count == k && !peer_pair_beats(c, l, id, out_s[k - 1], lo[k - 1], out_id[k - 1])) {
        if (j == 0) return bad; /* nothing in rows i.. can enter */
        break;
      }
      bad |= !isfinite(c) || !isfinite(l);
      peer_pair_insert(out_s, lo, out_id, k, &count, c, l, id);
    }
  }
  return bad;
}

/* Gate values for one head's k kept scores z (sorted, z[0] the largest).
 * gate: 0 softmax, 1 sigmoid, 2 relu (peer_gate's values). */
PEER_HD void peer_gates(int gate, const float *z, int k, float *g) {
  if (gate == 0) {
    float sum = 0.0f;
    for (int j = 0; j < k; j++) {
      g[j] = expf(z[j] - z[0]);
      sum += g[j];
    }
    float inv = 1.0f / sum;
    for (int j = 0; j < k; j++) g[j] *= inv;
  } else if (gate == 1) {
    for (int j = 0; j < k; j++) g[j] = 1.0f / (1.0f + expf(-z[j]));
  } else {
    for (int j = 0; j < k; j++) g[j] = z[j] > 0.0f ? z[j] : 0.0f;
  }
}

/* Expert activation (peer_activation's values). */
PEER_HD float peer_activate(int act, float x) {
  switch (act) {
  case 0: return x < 0.0f ? 0.0f : x; /* NaN passes through */
  case 1: return 0.5f * x * (1.0f + erff(x * 0.70710678118654752f));
  case 2: {
    float inner = 0.7978845608028654f * (x + 0.044715f * x * x * x);
    return 0.5f * x * (1.0f + tanhf(inner));
  }
  case 3: return x / (1.0f + expf(-x));
  default: return x;
  }
}

/* d act(x) / dx for peer_activate. */
PEER_HD float peer_activate_grad(int act, float x) {
  switch (act) {
  case 0: return x > 0.0f ? 1.0f : 0.0f;
  case 1:
    return 0.5f * (1.0f + erff(x * 0.70710678118654752f)) +
           x * 0.3989422804014327f * expf(-0.5f * x * x);
  case 2: {
    const float c = 0.7978845608028654f;
    float t = tanhf(c * (x + 0.044715f * x * x * x));
    return 0.5f * (1.0f + t) + 0.5f * x * (1.0f - t * t) * c * (1.0f + 3.0f * 0.044715f * x * x);
  }
  case 3: {
    float s = 1.0f / (1.0f + expf(-x));
    return s * (1.0f + x * (1.0f - s));
  }
  default: return 1.0f;
  }
}

/* Backward of peer_gates: dz from the gates g (as computed from z) and dg. */
PEER_HD void peer_gates_grad(int gate, const float *z, const float *g, const float *dg, int k,
                             float *dz) {
  if (gate == 0) {
    float dot = 0.0f;
    for (int j = 0; j < k; j++) dot += g[j] * dg[j];
    for (int j = 0; j < k; j++) dz[j] = g[j] * (dg[j] - dot);
  } else if (gate == 1) {
    for (int j = 0; j < k; j++) dz[j] = dg[j] * g[j] * (1.0f - g[j]);
  } else {
    for (int j = 0; j < k; j++) dz[j] = z[j] > 0.0f ? dg[j] : 0.0f;
  }
}

/* bf16 storage to f32: the upper half of an f32. */
PEER_HD float peer_bf16_to_f32(uint16_t h) {
  union {
    uint32_t u;
    float f;
  } v;
  v.u = (uint32_t)h << 16;
  return v.f;
}

/* f32 to bf16 storage, rounding to nearest even; NaN stays a (quiet) NaN. */
PEER_HD uint16_t peer_f32_to_bf16(float f) {
  union {
    float f;
    uint32_t u;
  } v;
  v.f = f;
  uint32_t u = v.u;
  if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40u);
  u += 0x7fffu + ((u >> 16) & 1u);
  return (uint16_t)(u >> 16);
}

/* ------------------------------------------------- bf16 first pass, bound */

/* The bf16 first pass of the sub-key scores (peer/cpu_bf16.c on the CPU,
 * kernels/retrieval.cu's subkey_topk_bf16 on the GPU) rounds query halves and
 * sub-keys with peer_bf16_ftz: to nearest even, |x| < 2^-126 flushed to 0
 * (so a hardware's flush of subnormal inputs changes nothing). */
PEER_HD uint16_t peer_bf16_ftz(float x) {
  return fabsf(x) < 0x1p-126f ? (uint16_t)0 : peer_f32_to_bf16(x);
}

/* An f32 no smaller than r. */
PEER_HD float peer_round_up(double r) {
  float f = (float)r;
  if ((double)f < r) f = nextafterf(f, INFINITY);
  return f;
}

/* An f32 no smaller than sqrt(ss), ss a sum of at most 2^20 squares of floats
 * in double (relative error < 2^-33, which the 2^-30 margin covers). */
PEER_HD float peer_norm_up(double ss) { return peer_round_up(sqrt(ss) * (1.0 + 0x1p-30)); }

/* The coefficients of the first pass's per-key error bound (derived in
 * peer/cpu_bf16.c's opening comment; kernels/README.md "bf16 sub-key
 * scores" for the GPU's accumulation): for a query half of m components
 * with norms nq = |q|, nq1 = |q'|, ndq = |q - q'| (rounded up) and g a bound
 * on the relative error of both sums (the first pass's and the f32 path's),
 * every key c satisfies |s16 - s32| <= e = coef[0] |c'| + coef[1] |dc| +
 * coef[2] |c| + coef[3].  Inflated by 2^-16 for their own roundings and
 * those of e (all terms are positive). */
PEER_HD void peer_bf16_bound_coefs(float nq, float nq1, float ndq, int64_t m, float g,
                                   float coef[4]) {
  const float mf = (float)m, infl = 1.0f + 0x1p-16f;
  coef[0] = (ndq + g * nq1) * infl;
  coef[1] = (nq1 + ndq) * infl;
  coef[2] = (g * nq + mf * 0x1p-126f) * infl;
  coef[3] = (mf * 0x1p-124f + mf * 0x1p-126f * nq) * infl;
}

/* The f32 path's FMA chain over a query half of norm nq (rounded up) and a
 * key of norm nc cannot overflow where fl(peer_bf16_chain_coef(nq, g) * nc)
 * is finite: every partial sum is at most (1 + g) sum |q_i c_i| <=
 * (1 + g) nq nc in magnitude (g as above), and the product is inflated by
 * 2^-16 for its roundings.  A key whose chain may overflow can have a finite
 * exact score and a finite, low bf16 bracket while the chain, which the
 * f32 path reports, is not finite: such a row is re-scored in full. */
PEER_HD float peer_bf16_chain_coef(float nq, float g) {
  return nq * (1.0f + g) * (1.0f + 0x1p-16f);
}

#endif
