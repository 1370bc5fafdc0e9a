/* reference.h: a plain float64 reference of the PEER forward pass, written
 * from docs/PEER.md alone (no library internals: parameters are reached only
 * through the public peer_layer_param_by_name), plus the few helpers the
 * tests share: a seeded generator, the test seed, and filling a layer's
 * parameters with random or coarsely quantised values.  Everything here is
 * written for obviousness, not speed: brute force over all N experts. */
#ifndef PEER_TEST_REFERENCE_H
#define PEER_TEST_REFERENCE_H

#include "peer.h"

#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

/* ------------------------------------------------------------ randomness */

typedef struct ref_rng {
  uint64_t s;
} ref_rng;

static inline uint64_t ref_next(ref_rng *r) { /* splitmix64 */
  uint64_t z = (r->s += 0x9e3779b97f4a7c15ull);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

/* Uniform in [lo, hi). */
static inline double ref_uniform(ref_rng *r, double lo, double hi) {
  return lo + (hi - lo) * ((double)(ref_next(r) >> 11) * 0x1p-53);
}

/* Uniform integer in [lo, hi]. */
static inline int64_t ref_int(ref_rng *r, int64_t lo, int64_t hi) {
  return lo + (int64_t)(ref_next(r) % (uint64_t)(hi - lo + 1));
}

/* Fresh per run (time and pid); PEER_TEST_SEED=<n> replays a run. */
static inline uint64_t ref_test_seed(void) {
  const char *e = getenv("PEER_TEST_SEED");
  if (e && *e) return strtoull(e, NULL, 0);
  return (uint64_t)time(NULL) ^ ((uint64_t)getpid() << 20);
}

/* Set in the sanitizer build, which is several times slower. */
static inline int ref_quick(void) {
  const char *e = getenv("PEER_TEST_QUICK");
  return e && *e && strcmp(e, "0") != 0;
}

/* ------------------------------------------------------------------ bf16 */

/* bf16 is the upper half of an f32. */
static inline float ref_bf16_to_float(uint16_t h) {
  uint32_t u = (uint32_t)h << 16;
  float f;
  memcpy(&f, &u, 4);
  return f;
}

/* Round to nearest even (finite inputs); used only to produce test values. */
static inline uint16_t ref_float_to_bf16(float f) {
  uint32_t u;
  memcpy(&u, &f, 4);
  u += 0x7fffu + ((u >> 16) & 1u);
  return (uint16_t)(u >> 16);
}

/* ------------------------------------------------- parameters by name */

/* Element count of a parameter, or 0 if the layer has no such parameter. */
static inline int64_t ref_param_count(peer_layer *L, const char *name, peer_tensor *t) {
  if (peer_layer_param_by_name(L, name, t) != PEER_OK) return 0;
  int64_t c = 1;
  for (int i = 0; i < t->ndim; i++) c *= t->shape[i];
  return c;
}

/* Store v at element i of a F32 or BF16 tensor. */
static inline void ref_store(peer_tensor *t, int64_t i, double v) {
  if (t->dtype == PEER_BF16) ((uint16_t *)t->data)[i] = ref_float_to_bf16((float)v);
  else ((float *)t->data)[i] = (float)v;
}

/* Fill a parameter (if the layer has it) with U(lo, hi). */
static inline void ref_fill_uniform(peer_layer *L, const char *name, ref_rng *r, double lo,
                                    double hi) {
  peer_tensor t;
  int64_t c = ref_param_count(L, name, &t);
  for (int64_t i = 0; i < c; i++) ref_store(&t, i, ref_uniform(r, lo, hi));
}

/* Fill a parameter with step * (integer in [lo, hi]): coarse values whose
 * dot products are exact in f32, so many scores tie exactly. */
static inline void ref_fill_quantised(peer_layer *L, const char *name, ref_rng *r, int lo, int hi,
                                      double step) {
  peer_tensor t;
  int64_t c = ref_param_count(L, name, &t);
  for (int64_t i = 0; i < c; i++) ref_store(&t, i, step * (double)ref_int(r, lo, hi));
}

/* Random values for every parameter the layer has, scaled so that scores
 * and outputs are O(1) whatever the sizes. */
static inline void ref_fill_layer(peer_layer *L, ref_rng *r) {
  const peer_config *c = peer_layer_config(L);
  double aq = 1.0 / sqrt((double)c->d_model), ak = 1.0 / sqrt((double)(c->d_key / 2));
  ref_fill_uniform(L, "query.weight", r, -aq, aq);
  ref_fill_uniform(L, "query.bias", r, -0.5, 0.5);
  ref_fill_uniform(L, "query.norm.weight", r, 0.5, 1.5);
  ref_fill_uniform(L, "query.norm.bias", r, -0.5, 0.5);
  ref_fill_uniform(L, "query.norm.running_mean", r, -0.3, 0.3);
  ref_fill_uniform(L, "query.norm.running_var", r, 0.2, 2.0);
  ref_fill_uniform(L, "keys", r, -ak, ak);
  ref_fill_uniform(L, "experts.down", r, -2.0 * aq, 2.0 * aq);
  ref_fill_uniform(L, "experts.up", r, -1.0, 1.0);
}

static inline float *ref_random_x(ref_rng *r, int64_t T, int64_t d) {
  float *x = malloc((size_t)(T * d + 1) * sizeof(float));
  for (int64_t i = 0; i < T * d; i++) x[i] = (float)ref_uniform(r, -1.0, 1.0);
  return x;
}

/* ------------------------------------------------------ the reference */

/* A layer's sizes and parameter pointers, as PEER.md names them. */
typedef struct ref_layer {
  int64_t d, H, dk, half, n, N, k, G;
  int act, gate, bf16;
  const float *wq, *bq, *norm_w, *norm_b, *norm_mean, *norm_var, *keys;
  const void *down, *up;
} ref_layer;

static inline const void *ref_data(peer_layer *L, const char *name) {
  peer_tensor t;
  return peer_layer_param_by_name(L, name, &t) == PEER_OK ? t.data : NULL;
}

static inline void ref_bind(ref_layer *R, peer_layer *L) {
  const peer_config *c = peer_layer_config(L);
  R->d = c->d_model;
  R->H = c->n_heads;
  R->dk = c->d_key;
  R->half = c->d_key / 2;
  R->n = c->n_subkeys;
  R->N = c->n_subkeys * c->n_subkeys;
  R->k = c->top_k;
  R->G = c->shared_keys ? 1 : c->n_heads;
  R->act = (int)c->activation;
  R->gate = (int)c->gate;
  R->bf16 = c->weight_dtype == PEER_BF16;
  R->wq = ref_data(L, "query.weight");
  R->bq = c->query_bias ? ref_data(L, "query.bias") : NULL;
  R->norm_w = R->norm_b = R->norm_mean = R->norm_var = NULL;
  if (c->query_norm == PEER_NORM_BATCHNORM) {
    R->norm_w = ref_data(L, "query.norm.weight");
    R->norm_b = ref_data(L, "query.norm.bias");
    R->norm_mean = ref_data(L, "query.norm.running_mean");
    R->norm_var = ref_data(L, "query.norm.running_var");
  }
  R->keys = ref_data(L, "keys");
  R->down = ref_data(L, "experts.down");
  R->up = ref_data(L, "experts.up");
}

/* Element (row, col) of an expert table, whatever its storage type. */
static inline double ref_expert(const ref_layer *R, const void *table, int64_t row, int64_t col) {
  int64_t i = row * R->d + col;
  if (R->bf16) return (double)ref_bf16_to_float(((const uint16_t *)table)[i]);
  return (double)((const float *)table)[i];
}

/* Step 1: q = Wq x (+ bq), then batch norm with running statistics.  qm
 * gets each feature's magnitude before cancellation (the same sums over
 * |terms|), the scale of the rounding an f32 computation of it carries. */
static inline void ref_query(const ref_layer *R, const float *x, double *q, double *qm) {
  int64_t dq = R->H * R->dk;
  for (int64_t j = 0; j < dq; j++) {
    double s = 0.0, m = 0.0;
    for (int64_t i = 0; i < R->d; i++) {
      s += (double)R->wq[j * R->d + i] * (double)x[i];
      m += fabs((double)R->wq[j * R->d + i] * (double)x[i]);
    }
    if (R->bq) s += (double)R->bq[j], m += fabs((double)R->bq[j]);
    if (R->norm_w) {
      double f = (double)R->norm_w[j] / sqrt((double)R->norm_var[j] + 1e-5);
      s = (s - (double)R->norm_mean[j]) * f + (double)R->norm_b[j];
      m = (m + fabs((double)R->norm_mean[j])) * fabs(f) + fabs((double)R->norm_b[j]);
    }
    q[j] = s;
    qm[j] = m;
  }
}

/* Steps 2-3: head h's sub-key scores s1[n], s2[n]; *scale gets the largest
 * magnitude before cancellation of a candidate score s1[a] + s2[b] (from
 * qm, see ref_query), the scale of the rounding in f32 scores. */
static inline void ref_subkey_scores(const ref_layer *R, const double *q, const double *qm,
                                     int64_t h, double *s1, double *s2, double *scale) {
  int64_t g = R->G == 1 ? 0 : h;
  const double *q1 = q + h * R->dk, *q2 = q1 + R->half;
  const double *m1 = qm + h * R->dk, *m2 = m1 + R->half;
  const float *C1 = R->keys + (g * 2 + 0) * R->n * R->half;
  const float *C2 = R->keys + (g * 2 + 1) * R->n * R->half;
  double big1 = 0.0, big2 = 0.0;
  for (int64_t a = 0; a < R->n; a++) {
    double u = 0.0, v = 0.0, mu = 0.0, mv = 0.0;
    for (int64_t i = 0; i < R->half; i++) {
      u += q1[i] * (double)C1[a * R->half + i];
      v += q2[i] * (double)C2[a * R->half + i];
      mu += m1[i] * fabs((double)C1[a * R->half + i]);
      mv += m2[i] * fabs((double)C2[a * R->half + i]);
    }
    s1[a] = u;
    s2[a] = v;
    big1 = fmax(big1, mu);
    big2 = fmax(big2, mv);
  }
  *scale = big1 + big2;
}

/* The tie rule: higher score first, equal scores to the smaller id. */
static inline int ref_better(double sa, int64_t ia, double sb, int64_t ib) {
  return sa > sb || (sa == sb && ia < ib);
}

/* Steps 4-6 by brute force: the best m of all n*n sums s1[a] + s2[b], in the
 * tie rule's order (m <= n*n). */
static inline void ref_topk_all(const double *s1, const double *s2, int64_t n, int64_t m,
                                int64_t *ids, double *sc) {
  int64_t count = 0;
  for (int64_t a = 0; a < n; a++) {
    for (int64_t b = 0; b < n; b++) {
      double c = s1[a] + s2[b];
      int64_t id = a * n + b;
      if (count == m && !ref_better(c, id, sc[m - 1], ids[m - 1])) continue;
      int64_t pos = count < m ? count++ : m - 1;
      while (pos > 0 && ref_better(c, id, sc[pos - 1], ids[pos - 1])) {
        sc[pos] = sc[pos - 1];
        ids[pos] = ids[pos - 1];
        pos--;
      }
      sc[pos] = c;
      ids[pos] = id;
    }
  }
}

/* Step 7. gate: peer_gate's values. */
static inline void ref_gates(int gate, const double *z, int64_t k, double *g) {
  if (gate == PEER_GATE_SOFTMAX) {
    double mx = z[0], sum = 0.0;
    for (int64_t j = 1; j < k; j++) mx = z[j] > mx ? z[j] : mx;
    for (int64_t j = 0; j < k; j++) sum += (g[j] = exp(z[j] - mx));
    for (int64_t j = 0; j < k; j++) g[j] /= sum;
  } else if (gate == PEER_GATE_SIGMOID) {
    for (int64_t j = 0; j < k; j++) g[j] = 1.0 / (1.0 + exp(-z[j]));
  } else {
    for (int64_t j = 0; j < k; j++) g[j] = z[j] > 0.0 ? z[j] : 0.0;
  }
}

/* Step 8's activation.  act: peer_activation's values. */
static inline double ref_act(int act, double v) {
  switch (act) {
  case PEER_ACT_RELU:
    return v > 0.0 ? v : (v != v ? v : 0.0);
  case PEER_ACT_GELU:
    return 0.5 * v * (1.0 + erf(v / sqrt(2.0)));
  case PEER_ACT_GELU_TANH:
    return 0.5 * v * (1.0 + tanh(sqrt(2.0 / M_PI) * (v + 0.044715 * v * v * v)));
  case PEER_ACT_SILU:
    return v / (1.0 + exp(-v));
  default:
    return v;
  }
}

/* One token's result.  Lists hold k+1 entries per head (the best k+1 of N,
 * the last only when N > k, else score -inf and id -1) so callers can see
 * the gap between the k-th and (k+1)-th score. */
typedef struct ref_token {
  int64_t *ids;  /* [H, k+1] */
  double *sc;    /* [H, k+1] */
  double *gates; /* [H, k] */
  double *y;     /* [d] */
  /* [d]: sum over used experts of (|gate * act(u.x)| + gate * sum|u_i x_i|
   * + |act(u.x)| * what the gate moves with a score rounding) * |v|: the
   * size of what f32 rounding can move in y (u.x and the scores may cancel) */
  double *mass;
  double *s1, *s2; /* [H, n]: every sub-key score */
  double *scale;   /* [H]: the scale of a head's score rounding (ref_subkey_scores) */
} ref_token;

static inline void ref_token_alloc(ref_token *o, const ref_layer *R) {
  o->ids = malloc((size_t)(R->H * (R->k + 1)) * sizeof(int64_t));
  o->sc = malloc((size_t)(R->H * (R->k + 1)) * sizeof(double));
  o->gates = malloc((size_t)(R->H * R->k) * sizeof(double));
  o->y = malloc((size_t)R->d * sizeof(double));
  o->mass = malloc((size_t)R->d * sizeof(double));
  o->s1 = malloc((size_t)(R->H * R->n) * sizeof(double));
  o->s2 = malloc((size_t)(R->H * R->n) * sizeof(double));
  o->scale = malloc((size_t)R->H * sizeof(double));
}

static inline void ref_token_free(ref_token *o) {
  free(o->ids);
  free(o->sc);
  free(o->gates);
  free(o->y);
  free(o->mass);
  free(o->s1);
  free(o->s2);
  free(o->scale);
}

/* The exact score s1[a] + s2[b] of expert id for head h, from a token
 * computed by ref_forward_token. */
static inline double ref_score_of(const ref_layer *R, const ref_token *o, int64_t h, int64_t id) {
  return o->s1[h * R->n + id / R->n] + o->s2[h * R->n + id % R->n];
}

/* Steps 7-9 for given kept ids (head h's at ids + h * stride, k of them, best
 * first): gates of their exact scores, then o->y and o->mass. */
static inline void ref_experts(const ref_layer *R, ref_token *o, const float *x, const int64_t *ids,
                               int64_t stride) {
  double *z = malloc((size_t)R->k * sizeof(double)), *g = malloc((size_t)R->k * sizeof(double));
  for (int64_t i = 0; i < R->d; i++) o->y[i] = o->mass[i] = 0.0;
  for (int64_t h = 0; h < R->H; h++) {
    for (int64_t j = 0; j < R->k; j++) z[j] = ref_score_of(R, o, h, ids[h * stride + j]);
    ref_gates(R->gate, z, R->k, g);
    for (int64_t j = 0; j < R->k; j++) {
      int64_t id = ids[h * stride + j];
      double u = 0.0, dot_mass = 0.0;
      for (int64_t i = 0; i < R->d; i++) {
        u += ref_expert(R, R->down, id, i) * (double)x[i];
        dot_mass += fabs(ref_expert(R, R->down, id, i) * (double)x[i]);
      }
      double a = g[j] * ref_act(R->act, u);
      /* how far the gate moves when the scores move by the head's scale */
      double gate_moves = R->gate == PEER_GATE_RELU      ? o->scale[h]
                          : R->gate == PEER_GATE_SIGMOID ? 0.25 * o->scale[h]
                                                         : 2.0 * g[j] * o->scale[h];
      for (int64_t i = 0; i < R->d; i++) {
        double v = ref_expert(R, R->up, id, i);
        o->y[i] += a * v;
        o->mass[i] += (fabs(a) + g[j] * dot_mass + gate_moves * fabs(ref_act(R->act, u))) * fabs(v);
      }
    }
  }
  free(z);
  free(g);
}

/* Query and retrieval of one token (steps 1-7); with_experts adds y (8-9). */
static inline void ref_forward_token(const ref_layer *R, const float *x, ref_token *o,
                                     int with_experts) {
  int64_t K1 = R->k + 1, m = R->N > R->k ? K1 : R->k;
  double *q = malloc((size_t)(R->H * R->dk) * sizeof(double));
  double *qm = malloc((size_t)(R->H * R->dk) * sizeof(double));
  ref_query(R, x, q, qm);
  for (int64_t h = 0; h < R->H; h++) {
    double *s1 = o->s1 + h * R->n, *s2 = o->s2 + h * R->n;
    ref_subkey_scores(R, q, qm, h, s1, s2, &o->scale[h]);
    ref_topk_all(s1, s2, R->n, m, o->ids + h * K1, o->sc + h * K1);
    if (m == R->k) {
      o->ids[h * K1 + R->k] = -1;
      o->sc[h * K1 + R->k] = -INFINITY;
    }
    ref_gates(R->gate, o->sc + h * K1, R->k, o->gates + h * R->k);
  }
  if (with_experts) ref_experts(R, o, x, o->ids, K1);
  free(q);
  free(qm);
}

/* Check one head of a library result (ids[k], and scores[k] unless NULL)
 * against the reference token o.  `scale` is the head's magnitude before
 * cancellation (ref_subkey_scores): f32 rounding moves a score by a small
 * multiple of 1e-7 of it (5.9e-8 seen over 15,000 random heads with d up to
 * 600).  Always: ids in [0, N) and distinct, each
 * returned score within 2e-6 * scale of the exact score of its id, and no
 * kept id scoring worse than the reference's k-th by more than
 * near * scale.  Where the reference's k-th and (k+1)-th scores are not a
 * near-tie (0 < gap < near * scale; f32 rounding may order those either
 * way), the kept set must equal the reference's, and so must every
 * position not next to a near-tie; *ids_checked says whether that ran.
 * Returns 0, or 1 with a message in msg. */
static inline int ref_check_head(const ref_layer *R, const ref_token *o, int64_t h,
                                 const int64_t *ids, const float *scores, double near,
                                 int *ids_checked, char *msg, size_t msg_size) {
  const int64_t k = R->k, K1 = k + 1;
  const int64_t *rid = o->ids + h * K1;
  const double *rsc = o->sc + h * K1;
  const double scale = o->scale[h] > 0.0 ? o->scale[h] : 1e-30, thr = near * scale;
  *ids_checked = 0;
  for (int64_t j = 0; j < k; j++) {
    if (ids[j] < 0 || ids[j] >= R->N) {
      snprintf(msg, msg_size, "head %lld pos %lld: id %lld not in [0, %lld)", (long long)h,
               (long long)j, (long long)ids[j], (long long)R->N);
      return 1;
    }
    for (int64_t i = 0; i < j; i++)
      if (ids[i] == ids[j]) {
        snprintf(msg, msg_size, "head %lld: id %lld kept twice", (long long)h, (long long)ids[j]);
        return 1;
      }
    double exact = ref_score_of(R, o, h, ids[j]);
    if (scores && !(fabs((double)scores[j] - exact) <= 2e-6 * scale)) {
      snprintf(msg, msg_size, "head %lld pos %lld id %lld: score %.9g, exact %.9g (scale %.3g)",
               (long long)h, (long long)j, (long long)ids[j], (double)scores[j], exact, scale);
      return 1;
    }
    if (exact < rsc[k - 1] - thr) {
      snprintf(msg, msg_size,
               "head %lld pos %lld: kept id %lld scores %.9g, below the k-th best %.9g (id %lld)",
               (long long)h, (long long)j, (long long)ids[j], exact, rsc[k - 1],
               (long long)rid[k - 1]);
      return 1;
    }
  }
#define REF_NEAR(j) (rsc[j] - rsc[(j) + 1] > 0.0 && rsc[j] - rsc[(j) + 1] < thr)
  if (R->N > k && REF_NEAR(k - 1)) return 0;
  *ids_checked = 1;
  for (int64_t j = 0; j < k; j++) {
    int found = 0;
    for (int64_t i = 0; i < k; i++) found |= ids[i] == rid[j];
    if (!found) {
      snprintf(msg, msg_size, "head %lld: reference keeps id %lld (score %.9g), library does not",
               (long long)h, (long long)rid[j], rsc[j]);
      return 1;
    }
    int near_tie = (j > 0 && REF_NEAR(j - 1)) || (j + 1 < k && REF_NEAR(j));
    if (!near_tie && ids[j] != rid[j]) {
      snprintf(msg, msg_size,
               "head %lld pos %lld: id %lld (score %.9g, exact %.17g), reference id %lld "
               "(exact %.17g)",
               (long long)h, (long long)j, (long long)ids[j], scores ? (double)scores[j] : NAN,
               ref_score_of(R, o, h, ids[j]), (long long)rid[j], rsc[j]);
      return 1;
    }
  }
#undef REF_NEAR
  return 0;
}

/* The error allowed in y[i] of a token computed in f32: 1e-5 of the row's
 * largest |y|, plus 1e-6 of what rounding can move in that element (a dot
 * product u.x that cancels is only as exact as the sum of its |terms|). */
static inline double ref_y_tolerance(const ref_token *o, int64_t i, double row_max) {
  return 1e-5 * row_max + 1e-6 * o->mass[i];
}

/* Largest |v| of a row. */
static inline double ref_row_max(const double *v, int64_t d) {
  double m = 0.0;
  for (int64_t i = 0; i < d; i++) m = fmax(m, fabs(v[i]));
  return m;
}

#endif
