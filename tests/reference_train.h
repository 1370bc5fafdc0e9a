/* reference_train.h: a plain float64 reference of the PEER layer in training
 * mode, for gradient checks.  Batch norm uses the batch's statistics (biased
 * variance, eps 1e-5); the top-k choice is an input (the ids the layer kept),
 * so perturbing a parameter never changes the selection, as PEER.md's
 * "Backward" treats top-k as constant.  Gradients come from central
 * differences of loss = sum(y * R) on this reference.  Parameters are double
 * copies of the layer's (bf16 expert tables read as their float values), so a
 * perturbation touches only the reference.  Written for obviousness, not
 * speed. */
#ifndef PEER_TEST_REFERENCE_TRAIN_H
#define PEER_TEST_REFERENCE_TRAIN_H

#include "reference.h"

/* Double copies of every trainable parameter; bq / nw / nb are NULL when the
 * layer has no bias / no batch norm. */
typedef struct rt_params {
  int64_t d, H, dk, half, n, N, k, G, dq;
  int act, gate;
  double *wq, *bq, *nw, *nb, *keys, *down, *up;
} rt_params;

static inline double *rt_copy(peer_layer *L, const char *name, int64_t *count) {
  peer_tensor t;
  int64_t c = ref_param_count(L, name, &t);
  if (count) *count = c;
  if (c == 0) return NULL;
  double *v = malloc((size_t)c * sizeof(double));
  for (int64_t i = 0; i < c; i++)
    v[i] = t.dtype == PEER_BF16 ? (double)ref_bf16_to_float(((const uint16_t *)t.data)[i])
                                : (double)((const float *)t.data)[i];
  return v;
}

static inline void rt_params_load(rt_params *P, peer_layer *L) {
  const peer_config *c = peer_layer_config(L);
  P->d = c->d_model;
  P->H = c->n_heads;
  P->dk = c->d_key;
  P->half = c->d_key / 2;
  P->n = c->n_subkeys;
  P->N = P->n * P->n;
  P->k = c->top_k;
  P->G = c->shared_keys ? 1 : c->n_heads;
  P->dq = P->H * P->dk;
  P->act = (int)c->activation;
  P->gate = (int)c->gate;
  P->wq = rt_copy(L, "query.weight", NULL);
  P->bq = c->query_bias ? rt_copy(L, "query.bias", NULL) : NULL;
  P->nw = P->nb = NULL;
  if (c->query_norm == PEER_NORM_BATCHNORM) {
    P->nw = rt_copy(L, "query.norm.weight", NULL);
    P->nb = rt_copy(L, "query.norm.bias", NULL);
  }
  P->keys = rt_copy(L, "keys", NULL);
  P->down = rt_copy(L, "experts.down", NULL);
  P->up = rt_copy(L, "experts.up", NULL);
}

static inline void rt_params_free(rt_params *P) {
  free(P->wq);
  free(P->bq);
  free(P->nw);
  free(P->nb);
  free(P->keys);
  free(P->down);
  free(P->up);
}

/* Pre-norm queries Wq x (+ bq), [T, dq]. */
static inline void rt_project(const rt_params *P, int64_t T, const double *x, double *q) {
  for (int64_t t = 0; t < T; t++)
    for (int64_t f = 0; f < P->dq; f++) {
      double s = P->bq ? P->bq[f] : 0.0;
      for (int64_t i = 0; i < P->d; i++)
        s += P->wq[f * P->d + i] * x[t * P->d + i];
      q[t * P->dq + f] = s;
    }
}

/* Batch mean and biased variance of feature f of pre-norm queries q. */
static inline void rt_batch_stats(const rt_params *P, int64_t T, const double *q, int64_t f,
                                  double *mean, double *var) {
  double s = 0.0, ss = 0.0;
  for (int64_t t = 0; t < T; t++)
    s += q[t * P->dq + f];
  *mean = s / (double)T;
  for (int64_t t = 0; t < T; t++) {
    double c = q[t * P->dq + f] - *mean;
    ss += c * c;
  }
  *var = ss / (double)T;
}

/* Queries as used for retrieval: projection, then (training) batch norm. */
static inline void rt_query(const rt_params *P, int64_t T, const double *x, double *q) {
  rt_project(P, T, x, q);
  if (!P->nw) return;
  for (int64_t f = 0; f < P->dq; f++) {
    double mean, var;
    rt_batch_stats(P, T, q, f, &mean, &var);
    double inv = 1.0 / sqrt(var + 1e-5);
    for (int64_t t = 0; t < T; t++)
      q[t * P->dq + f] = (q[t * P->dq + f] - mean) * inv * P->nw[f] + P->nb[f];
  }
}

static inline double rt_dot(const double *a, const double *b, int64_t n) {
  double s = 0.0;
  for (int64_t i = 0; i < n; i++)
    s += a[i] * b[i];
  return s;
}

/* Kept score s1[a] + s2[b] of expert id for head h of query row q. */
static inline double rt_score(const rt_params *P, const double *q, int64_t h, int64_t id) {
  int64_t g = P->G == 1 ? 0 : h, a = id / P->n, b = id % P->n;
  const double *q1 = q + h * P->dk, *q2 = q1 + P->half;
  return rt_dot(q1, P->keys + ((g * 2 + 0) * P->n + a) * P->half, P->half) +
         rt_dot(q2, P->keys + ((g * 2 + 1) * P->n + b) * P->half, P->half);
}

/* y [T, d] of the training forward with the kept ids [T, H, k] fixed.
 * q is scratch [T, dq]. */
static inline void rt_forward(const rt_params *P, int64_t T, const double *x, const int64_t *ids,
                              double *q, double *y) {
  double z[64], g[64];
  rt_query(P, T, x, q);
  for (int64_t i = 0; i < T * P->d; i++)
    y[i] = 0.0;
  for (int64_t t = 0; t < T; t++)
    for (int64_t h = 0; h < P->H; h++) {
      const int64_t *id = ids + (t * P->H + h) * P->k;
      for (int64_t j = 0; j < P->k; j++)
        z[j] = rt_score(P, q + t * P->dq, h, id[j]);
      ref_gates(P->gate, z, P->k, g);
      for (int64_t j = 0; j < P->k; j++) {
        double a = g[j] * ref_act(P->act, rt_dot(P->down + id[j] * P->d, x + t * P->d, P->d));
        for (int64_t i = 0; i < P->d; i++)
          y[t * P->d + i] += a * P->up[id[j] * P->d + i];
      }
    }
}

/* The training-mode selection by brute force over all N experts: ids
 * [T, H, k].  Returns 1 when it is safe to compare with f32 results: no
 * near-tie between the k-th and (k+1)-th score (gap >= near * scale, scale =
 * max|s1| + max|s2| of the head), and no kink of a relu gate (|kept score|
 * >= near * scale) or a relu activation (|u . x| >= near) within reach of
 * rounding.  q is scratch [T, dq]. */
static inline int rt_select(const rt_params *P, int64_t T, const double *x, double near,
                            int64_t *ids, double *q) {
  const int64_t n = P->n, k = P->k, m = P->N > k ? k + 1 : k;
  double *s1 = malloc((size_t)n * sizeof(double)), *s2 = malloc((size_t)n * sizeof(double));
  double sc[65];
  int64_t top[65];
  int ok = 1;
  rt_query(P, T, x, q);
  for (int64_t t = 0; t < T && ok; t++)
    for (int64_t h = 0; h < P->H && ok; h++) {
      const double *qt = q + t * P->dq;
      double m1 = 0.0, m2 = 0.0;
      for (int64_t a = 0; a < n; a++) {
        s1[a] = rt_dot(qt + h * P->dk, P->keys + (((P->G == 1 ? 0 : h) * 2 + 0) * n + a) * P->half,
                       P->half);
        s2[a] = rt_dot(qt + h * P->dk + P->half,
                       P->keys + (((P->G == 1 ? 0 : h) * 2 + 1) * n + a) * P->half, P->half);
        m1 = fmax(m1, fabs(s1[a]));
        m2 = fmax(m2, fabs(s2[a]));
      }
      double scale = m1 + m2 > 0.0 ? m1 + m2 : 1.0;
      ref_topk_all(s1, s2, n, m, top, sc);
      if (m > k && sc[k - 1] - sc[k] < near * scale) ok = 0;
      for (int64_t j = 0; j < k; j++) {
        ids[(t * P->H + h) * k + j] = top[j];
        if (P->gate == PEER_GATE_RELU && fabs(sc[j]) < near * scale) ok = 0;
        if (P->act == PEER_ACT_RELU &&
            fabs(rt_dot(P->down + top[j] * P->d, x + t * P->d, P->d)) < near)
          ok = 0;
      }
    }
  free(s1);
  free(s2);
  return ok;
}

/* Everything a loss evaluation needs besides the parameters. */
typedef struct rt_loss_in {
  int64_t T;
  double *x;          /* [T, d] */
  const int64_t *ids; /* [T, H, k] */
  const double *R;    /* [T, d]: loss = sum(y * R) */
  double *q, *y;      /* scratch */
} rt_loss_in;

static inline double rt_loss(const rt_params *P, const rt_loss_in *in) {
  rt_forward(P, in->T, in->x, in->ids, in->q, in->y);
  double s = 0.0;
  for (int64_t i = 0; i < in->T * P->d; i++)
    s += in->y[i] * in->R[i];
  return s;
}

/* d loss / d *p by central differences, step 1e-6 relative. */
static inline double rt_fd(const rt_params *P, const rt_loss_in *in, double *p) {
  const double old = *p, h = 1e-6 * fmax(1.0, fabs(old));
  const double hi = old + h, lo = old - h;
  *p = hi;
  double lp = rt_loss(P, in);
  *p = lo;
  double lm = rt_loss(P, in);
  *p = old;
  return (lp - lm) / (hi - lo);
}

#endif
