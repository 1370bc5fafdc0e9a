/* bf16_cases.h: adversarial keys and queries for the bf16 first pass of the
 * sub-key scores (test_bf16_retrieval.c on the CPU, test_cuda.c on the GPU),
 * for a layer whose queries are its input (query.weight the identity,
 * d_model = H * d_key): `sets` key sets [sets, n, m] (sets = 2 * the key
 * groups) and T tokens of x, sets * m wide (per-head keys: each half of
 * each head against its own set). */
#ifndef PEER_TEST_BF16_CASES_H
#define PEER_TEST_BF16_CASES_H

#include "reference.h"

#include <math.h>
#include <stdint.h>
#include <string.h>

/* Traps: the query's components round to bf16 by nearly half an ulp, down
 * on the set P (even components) and up on Q (odd ones); the trap key is 1 on
 * P, the decoys 1 on Q plus extra mass on some of Q.  In f32 the trap beats
 * a decoy unless the extra is large; in bf16 the decoy wins by the extra, up
 * to about the bound's size (each decoy's extra is drawn across that range).
 * Random filler keys score far below.  With k' = 1 the f32 path keeps the
 * trap where the first pass ranks it below decoys by nearly twice the bound:
 * a bound half as large loses it.  Returns the number of traps. */
static inline int bf16_traps(float *keys, float *x, int64_t sets, int64_t n, int64_t m, int64_t T,
                             ref_rng *rng) {
  const int64_t w = sets * m;
  for (int64_t t = 0; t < T; t++)
    for (int64_t i = 0; i < w; i++) {
      double frac = ref_uniform(rng, 0.90, 0.999);
      x[t * w + i] = (float)(i % 2 == 0 ? 1.0 + frac * 0x1p-8 : 1.0 - frac * 0x1p-9);
    }
  int traps = 0;
  for (int64_t p = 0; p < sets; p++) {
    float *C = keys + p * n * m;
    for (int64_t j = 0; j < n; j++) {
      float *c = C + j * m;
      int kind = (int)(j % 32); /* 0: trap, 1..3: decoys, else filler */
      for (int64_t i = 0; i < m; i++) {
        if (kind == 0)
          c[i] = i % 2 == 0 ? 1.0f : 0.0f;
        else if (kind <= 3)
          c[i] = i % 2 == 1 ? 1.0f : 0.0f;
        else
          c[i] = (float)ref_uniform(rng, -0.5, 0.5);
      }
      if (kind >= 1 && kind <= 3) { /* extra mass 2^-7 on r odd components */
        int64_t r = ref_int(rng, 19, 22);
        for (int64_t i = 0; i < r; i++)
          c[2 * i + 1] += 0x1p-7f;
      }
      if (kind == 0) {
        /* one trap per 32 keys, each a little different so they do not tie */
        c[2 * ref_int(rng, 0, m / 2 - 1)] += (float)(j / 32) * 0x1p-20f;
        traps++;
      }
    }
  }
  return traps;
}

/* Traps for the int8 first pass (the CPU's, peer/cpu_bf16.c): component 0
 * of every query half is 127, so its scale is 1; the others are 1.5 less a
 * little on the even components P (they quantise to 1) and 1.5 plus a
 * little on the odd ones Q (to 2).  The trap key is 1 on P (m/2 - 1 of
 * them), the decoys 1 on m/2 - 1 - r of Q (r in 1..3), and component 0 of
 * every key is 0.  In f32 the trap beats each decoy by about 1.5 r; in int8
 * the decoy wins by m/2 - 1 - 2r, about two thirds of the sum of the two
 * keys' error bounds
 * (|dq| (|c_trap| + |c_decoy|), dq nearly parallel to both), so with k' = 1
 * a bound two thirds as large loses the trap.  Random filler (0 at
 * component 0) scores far below.  Returns the number of traps. */
static inline int int8_traps(float *keys, float *x, int64_t sets, int64_t n, int64_t m, int64_t T,
                             ref_rng *rng) {
  const int64_t w = sets * m;
  for (int64_t t = 0; t < T; t++)
    for (int64_t i = 0; i < w; i++) {
      const double small = ref_uniform(rng, 0.001, 0.01);
      x[t * w + i] = i % m == 0 ? 127.0f : (float)(i % 2 == 0 ? 1.5 - small : 1.5 + small);
    }
  int traps = 0;
  for (int64_t p = 0; p < sets; p++) {
    float *C = keys + p * n * m;
    for (int64_t j = 0; j < n; j++) {
      float *c = C + j * m;
      const int kind = (int)(j % 32); /* 0: trap, 1..3: decoys, else filler */
      const int64_t r = ref_int(rng, 1, 3);
      for (int64_t i = 0; i < m; i++) {
        if (kind == 0)
          c[i] = i % 2 == 0 && i > 0 ? 1.0f : 0.0f;
        else if (kind <= 3)
          c[i] = i % 2 == 1 && i > 2 * r + 2 ? 1.0f : 0.0f;
        else
          c[i] = i == 0 ? 0.0f : (float)ref_uniform(rng, -0.5, 0.5);
      }
      if (kind == 0) { /* one trap per 32 keys, a little different: no ties */
        c[2 + 2 * ref_int(rng, 0, m / 2 - 2)] += (float)(j / 32) * 0x1p-20f;
        traps++;
      }
    }
  }
  return traps;
}

/* Keys all within the error bound of each other: exact ties (duplicated
 * rows), rows differing in their last bits, and a cluster just above random
 * filler, scaled by key_scale; queries along the keys' common direction with
 * a little noise, scaled by x_scale (large and tiny norms; at 2^-70 both,
 * the products underflow).  m <= 256. */
static inline void bf16_near_ties(float *keys, float *x, int64_t sets, int64_t n, int64_t m,
                                  int64_t T, double key_scale, double x_scale, ref_rng *rng) {
  float base[256];
  for (int64_t i = 0; i < m; i++)
    base[i] = (float)ref_uniform(rng, -1.0, 1.0);
  for (int64_t r = 0; r < sets; r++) {
    float *C = keys + r * n * m;
    for (int64_t j = 0; j < n; j++) {
      float *c = C + j * m;
      int kind = (int)(j % 4);
      for (int64_t i = 0; i < m; i++) {
        float v = base[i];
        if (kind == 1) v = nextafterf(v, j % 8 == 1 ? INFINITY : -INFINITY); /* last bits */
        if (kind == 2) v = base[i] + (float)(j % 16) * 0x1p-12f * base[i];   /* near */
        if (kind == 3) v = (float)ref_uniform(rng, -1.0, 1.0) * 0.5f;       /* filler */
        c[i] = (float)(v * key_scale);
      }
      if (kind == 0 && j % 8 == 4) memcpy(c, C + (j - 4) * m, (size_t)m * sizeof *c); /* tie */
    }
  }
  const int64_t w = sets * m;
  for (int64_t t = 0; t < T; t++)
    for (int64_t i = 0; i < w; i++) {
      /* the base direction plus a little noise: all keys score alike */
      double v = base[i % m] + ref_uniform(rng, -0.01, 0.01) * (t % 3);
      x[t * w + i] = (float)(v * x_scale);
    }
}

#endif
