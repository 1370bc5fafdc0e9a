/* shard_train.c: training a sharded layer.  The forward is the CPU backend's
 * (queries, batch norm with batch statistics, retrieval) with the expert
 * phase on this rank's columns; the backward all-reduces the partial dots
 * v_i[cols] . dy[cols] (T*H*k floats), from which every rank computes the
 * same score gradients and so the same query, norm and sub-key gradients;
 * the expert gradient rows are this rank's columns, and dx's expert part is
 * all-gathered.
 *
 * The replicated passes follow peer/cpu_train.c step for step (same order of
 * every sum), which keeps the sharded gradients within rounding of the
 * unsharded ones: the CPU backend's versions are static there, and that file
 * is compiled once per instruction set. */
#include "shard.h"

#include <omp.h>
#include <stdlib.h>

typedef struct sctx {
  float *q, *qhat, *mean, *invstd;   /* [T, dq], [T, dq], [dq], [dq] */
  int64_t *ids;                      /* [T, H, k] */
  float *scores, *gates, *z, *vd;    /* [T, H, k]; z = u_i . x, vd = v_i . dy */
  float *dq;                         /* [T, dq] */
  float *cdown, *cup, *ds;           /* [T, H, k] */
  float *dqT, *xT, *WqT, *tmp;       /* transposes and a [T, d] temporary */
  float *mine, *all;                 /* [T, cols], [world, T, cols] */
  uint32_t *key, *val, *key2, *val2; /* radix sort, 2*T*H*k + 1 each */
  char *per_thread;                  /* per thread: sub-key scores S, top-k' lists, packing */
  size_t per_thread_bytes, s_bytes, list_bytes;
} sctx;

static size_t sctx_layout(const peer_shard *S, int64_t T, int P, char *base, sctx *m) {
  const peer_dims *D = &S->L->dims;
  const size_t t = (size_t)T, dq = (size_t)D->dq, d = (size_t)D->d;
  const size_t hk = t * (size_t)(D->H * D->k), tc = t * (size_t)S->cols;
  size_t kmax = t > dq ? t : dq;
  if (d > kmax) kmax = d;
  struct {
    void **ptr;
    size_t bytes;
  } parts[] = {
      {(void **)&m->q, t * dq * 4},
      {(void **)&m->qhat, t * dq * 4},
      {(void **)&m->mean, dq * 4},
      {(void **)&m->invstd, dq * 4},
      {(void **)&m->ids, hk * 8},
      {(void **)&m->scores, hk * 4},
      {(void **)&m->gates, hk * 4},
      {(void **)&m->z, hk * 4},
      {(void **)&m->vd, hk * 4},
      {(void **)&m->dq, t * dq * 4},
      {(void **)&m->cdown, hk * 4},
      {(void **)&m->cup, hk * 4},
      {(void **)&m->ds, hk * 4},
      {(void **)&m->dqT, dq * t * 4},
      {(void **)&m->xT, d * t * 4},
      {(void **)&m->WqT, d * dq * 4},
      {(void **)&m->tmp, t * d * 4},
      {(void **)&m->mine, tc * 4},
      {(void **)&m->all, tc * 4 * (size_t)S->world},
      {(void **)&m->key, (2 * hk + 1) * 4},
      {(void **)&m->val, (2 * hk + 1) * 4},
      {(void **)&m->key2, (2 * hk + 1) * 4},
      {(void **)&m->val2, (2 * hk + 1) * 4},
  };
  size_t off = 0;
  for (size_t i = 0; i < sizeof parts / sizeof parts[0]; i++) {
    if (base) *parts[i].ptr = base + off;
    off += round64(parts[i].bytes);
  }
  m->s_bytes = round64((size_t)TB * (size_t)peer_cpu_s_stride(D->n) * sizeof(float));
  m->list_bytes = round64((size_t)D->kp * (sizeof(float) + sizeof(int64_t)));
  m->per_thread_bytes = m->s_bytes + 3 * m->list_bytes + round64(kmax * TB * sizeof(float));
  if (base) m->per_thread = base + off;
  off += m->per_thread_bytes * (size_t)P;
  return off;
}

peer_status peer_shard_context_create(peer_context **out, const peer_shard *S, int64_t T) {
  if (!out || !S)
    return peer_fail(PEER_ERR_INVALID_ARGUMENT, "shard_context_create: NULL argument");
  /* The generic context (its checks and bookkeeping), with this file's memory
   * in place of the CPU backend's. */
  peer_status st = peer_context_create(out, S->L, T);
  if (st) return st;
  peer_context *c = *out;
  sctx m;
  size_t bytes = sctx_layout(S, T, c->n_threads, NULL, &m);
  c->mem_free(c->mem, c->bytes);
  c->mem = peer_alloc(bytes);
  c->bytes = bytes;
  c->mem_free = peer_free;
  if (!c->mem) {
    free(c);
    *out = NULL;
    return peer_fail(PEER_ERR_OUT_OF_MEMORY, "shard_context_create: cannot allocate %zu bytes",
                     bytes);
  }
  return PEER_OK;
}

static int threads_for(const peer_layer *L, const peer_context *c) {
  int P = peer_layer_threads(L);
  return P < c->n_threads ? P : c->n_threads;
}

static char *thread_scratch(const sctx *m) {
  return m->per_thread + (size_t)omp_get_thread_num() * m->per_thread_bytes;
}

static float *pack_of(const sctx *m) {
  return (float *)(thread_scratch(m) + m->s_bytes + 3 * m->list_bytes);
}

/* Smallest token whose row holds NaN or infinity, or T. */
static int64_t first_nonfinite_row(const float *x, int64_t T, int64_t d, int P) {
  int64_t first = T;
#pragma omp parallel for reduction(min : first) schedule(static) num_threads(P)
  for (int64_t t = 0; t < T; t++) {
    int ok = 1;
    for (int64_t i = 0; i < d; i++)
      ok &= isfinite(x[t * d + i]) != 0;
    if (!ok && t < first) first = t;
  }
  return first;
}

/* ------------------------------------------------------------ forward */

/* As cpu_train.c: batch statistics in token order, q normalised in place. */
static void batch_norm_train(const peer_layer *L, int64_t T, sctx *m, int P) {
  const int64_t dq = L->dims.dq;
  const float *nw = L->slot[PEER_P_NORM_WEIGHT].data, *nb = L->slot[PEER_P_NORM_BIAS].data;
#pragma omp parallel for schedule(static) num_threads(P)
  for (int64_t f = 0; f < dq; f++) {
    float sum = 0.0f;
    for (int64_t t = 0; t < T; t++)
      sum += m->q[t * dq + f];
    float mean = sum / (float)T, ss = 0.0f;
    for (int64_t t = 0; t < T; t++) {
      float c = m->q[t * dq + f] - mean;
      ss += c * c;
    }
    float invstd = 1.0f / sqrtf(ss / (float)T + 1e-5f);
    m->mean[f] = mean;
    m->invstd[f] = invstd;
    for (int64_t t = 0; t < T; t++) {
      float h = (m->q[t * dq + f] - mean) * invstd;
      m->qhat[t * dq + f] = h;
      m->q[t * dq + f] = h * nw[f] + nb[f];
    }
  }
}

static void update_running(peer_layer *L, int64_t T, const sctx *m) {
  float *rm = L->slot[PEER_P_NORM_MEAN].data, *rv = L->slot[PEER_P_NORM_VAR].data;
  const float mo = L->norm_momentum;
  for (int64_t f = 0; f < L->dims.dq; f++) {
    float var = 1.0f / (m->invstd[f] * m->invstd[f]) - 1e-5f;
    float unbiased = var * (float)T / (float)(T - 1);
    rm[f] = (1.0f - mo) * rm[f] + mo * m->mean[f];
    rv[f] = (1.0f - mo) * rv[f] + mo * unbiased;
  }
}

/* Retrieval on the training queries, as the CPU backend's: per (head, token
 * block) the sub-key scores by the same matrix product (so the same bits),
 * top-k' of each half, the exact merge and the gates (rowops.h). */
static peer_status retrieve_all(const peer_layer *L, int64_t T, sctx *m, int P) {
  const peer_dims *D = &L->dims;
  const float *keys = L->slot[PEER_P_KEYS].data;
  const int64_t n = D->n, half = D->half, H = D->H, ldq = D->dq;
  const int k = (int)D->k, kp = (int)D->kp;
  const int64_t n_tb = (T + TB - 1) / TB, ls = peer_cpu_s_stride(n);
  int64_t bad_token = T;
  int bad_head = 0;
#pragma omp parallel for collapse(2) schedule(static) num_threads(P)
  for (int64_t h = 0; h < H; h++) {
    for (int64_t tb = 0; tb < n_tb; tb++) {
      char *scratch = thread_scratch(m);
      float *S = (float *)scratch;
      char *lists = scratch + m->s_bytes;
      int64_t *a1 = (int64_t *)lists, *a2 = (int64_t *)(lists + m->list_bytes);
      float *s1 = (float *)(a1 + kp), *s2 = (float *)(a2 + kp);
      float *lo = (float *)(lists + 2 * m->list_bytes);
      int64_t t0 = tb * TB, nt = T - t0 < TB ? T - t0 : TB;
      int64_t g = L->cfg.shared_keys ? 0 : h;
      for (int p = 0; p < 2; p++)
        peer_cpu_gemm_nt(nt, n, half, m->q + t0 * ldq + h * D->dk + p * half, ldq,
                         keys + ((g * 2 + p) * n) * half, half, S + p * n, ls, pack_of(m));
      for (int64_t t = 0; t < nt; t++) {
        const float *row1 = S + t * ls, *row2 = row1 + n;
        size_t o = (size_t)((t0 + t) * H + h) * (size_t)k;
        int bad = peer_topk_scan(row1, (int)n, kp, s1, a1);
        bad |= peer_topk_scan(row2, (int)n, kp, s2, a2);
        bad |= peer_merge_candidates(s1, a1, s2, a2, kp, k, n, m->scores + o, lo, m->ids + o);
        if (bad) {
#pragma omp critical(peer_shard_bad)
          if (t0 + t < bad_token || (t0 + t == bad_token && h < bad_head)) {
            bad_token = t0 + t;
            bad_head = (int)h;
          }
        }
        peer_gates((int)L->cfg.gate, m->scores + o, k, m->gates + o);
      }
    }
  }
  if (bad_token < T)
    return peer_fail(PEER_ERR_NONFINITE,
                     "token %lld, head %d: non-finite sub-key score (NaN or infinity in x, "
                     "query weights, norm or keys)",
                     (long long)bad_token, bad_head);
  return PEER_OK;
}

static peer_status forward_train(peer_shard *S, peer_context *c, int64_t T, const float *x,
                                 float *y) {
  peer_layer *L = S->L;
  int P = threads_for(L, c);
  void *ws;
  peer_status st = peer_layer_scratch(L, T, &ws);
  if (st) return st;
  cpu_ws w;
  peer_cpu_layout(L, T, ws, &w);
  sctx m;
  sctx_layout(S, c->max_tokens, c->n_threads, c->mem, &m);
  int64_t bad = first_nonfinite_row(x, T, L->dims.d, P);
  if (bad < T)
    return peer_fail(PEER_ERR_NONFINITE, "token %lld: x holds NaN or infinity", (long long)bad);
  peer_cpu_project(L, T, x, m.q, L->dims.dq, &w, P);
  bool bn = L->cfg.query_norm == PEER_NORM_BATCHNORM;
  if (bn) batch_norm_train(L, T, &m, P);
  if ((st = retrieve_all(L, T, &m, P))) return st;
  const size_t hk = (size_t)T * (size_t)(L->dims.H * L->dims.k);
  peer_shard_partial_dots(S, PEER_P_EXPERTS_DOWN, T, x, m.ids, m.z, m.per_thread,
                          m.per_thread_bytes, P);
  if ((st = peer_shard_allreduce(S, m.z, (int64_t)hk, "shard_forward_train"))) return st;
  if (bn) update_running(L, T, &m);
  const int act = (int)L->cfg.activation;
  for (size_t e = 0; e < hk; e++)
    m.cup[e] = m.gates[e] * peer_activate(act, m.z[e]);
  peer_shard_combine(S, PEER_P_EXPERTS_UP, T, m.ids, m.cup, m.mine, m.per_thread,
                     m.per_thread_bytes, P);
  return peer_shard_gather_rows(S, T, m.mine, m.all, y, "shard_forward_train");
}

peer_status peer_shard_forward_train(peer_shard *S, peer_context *c, int64_t T, const float *x,
                                     float *y) {
  if (!S) return peer_fail(PEER_ERR_INVALID_ARGUMENT, "shard_forward_train: NULL shard");
  peer_status st = peer_train_begin(S->L, c, T, x, y, "shard_forward_train");
  if (st) return st;
  if (T > 0 && (st = forward_train(S, c, T, x, y))) return st;
  peer_train_end(c, T, x);
  return PEER_OK;
}

/* ------------------------------------------------------------ backward */

/* Stable LSD radix sort of (key, val) pairs by key (cpu_train.c's). */
static void radix_sort(uint32_t *key, uint32_t *val, uint32_t *key2, uint32_t *val2, size_t n,
                       uint32_t max_key) {
  for (int shift = 0; shift < 32 && (max_key >> shift) != 0; shift += 8) {
    size_t count[257] = {0};
    for (size_t i = 0; i < n; i++)
      count[((key[i] >> shift) & 255u) + 1]++;
    for (int b = 0; b < 256; b++)
      count[b + 1] += count[b];
    for (size_t i = 0; i < n; i++) {
      size_t dst = count[(key[i] >> shift) & 255u]++;
      key2[dst] = key[i];
      val2[dst] = val[i];
    }
    uint32_t *t = key;
    key = key2, key2 = t;
    t = val, val = val2, val2 = t;
    if (((shift / 8) & 1) == 0 && (max_key >> (shift + 8)) == 0) {
      memcpy(key2, key, n * sizeof *key);
      memcpy(val2, val, n * sizeof *val);
    }
  }
}

static size_t run_starts(const uint32_t *key, size_t n, uint32_t *starts) {
  size_t r = 0;
  for (size_t i = 0; i < n; i++)
    if (i == 0 || key[i] != key[i - 1]) starts[r++] = (uint32_t)i;
  starts[r] = (uint32_t)n;
  return r;
}

static void transpose(const float *src, int64_t rows, int64_t cols, float *dst, int P) {
#pragma omp parallel for schedule(static) num_threads(P)
  for (int64_t c = 0; c < cols; c++)
    for (int64_t r = 0; r < rows; r++)
      dst[c * rows + r] = src[r * cols + c];
}

/* Per entry, from the all-reduced vd: the coefficients of the expert
 * gradient rows and of dx, and the gate backward into the scores. */
static void entry_coefficients(const peer_layer *L, int64_t T, sctx *m, int P) {
  const peer_dims *D = &L->dims;
  const int64_t hk = D->H * D->k, k = D->k;
  const int act = (int)L->cfg.activation, gate = (int)L->cfg.gate;
#pragma omp parallel for schedule(static) num_threads(P)
  for (int64_t t = 0; t < T; t++) {
    for (int64_t e = t * hk; e < (t + 1) * hk; e++) {
      float z = m->z[e], g = m->gates[e], a = peer_activate(act, z), vd = m->vd[e];
      m->ds[e] = a * vd;
      m->cup[e] = g * a;
      m->cdown[e] = g * vd * peer_activate_grad(act, z);
    }
    for (int64_t h = 0; h < D->H; h++) {
      int64_t o = t * hk + h * k;
      peer_gates_grad(gate, m->scores + o, m->gates + o, m->ds + o, (int)k, m->ds + o);
    }
  }
}

static void query_grad(const peer_layer *L, int64_t T, sctx *m, int P) {
  const peer_dims *D = &L->dims;
  const float *keys = L->slot[PEER_P_KEYS].data;
  const int64_t k = D->k, half = D->half, n = D->n;
#pragma omp parallel for schedule(static) num_threads(P)
  for (int64_t t = 0; t < T; t++) {
    for (int64_t h = 0; h < D->H; h++) {
      int64_t g = L->cfg.shared_keys ? 0 : h;
      float *dq1 = m->dq + t * D->dq + h * D->dk, *dq2 = dq1 + half;
      memset(dq1, 0, (size_t)D->dk * sizeof(float));
      for (int64_t j = 0; j < k; j++) {
        int64_t e = (t * D->H + h) * k + j, a = m->ids[e] / n, b = m->ids[e] % n;
        axpy_row_f32(m->ds[e], keys + ((g * 2 + 0) * n + a) * half, dq1, half);
        axpy_row_f32(m->ds[e], keys + ((g * 2 + 1) * n + b) * half, dq2, half);
      }
    }
  }
}

static void keys_grad(const peer_layer *L, int64_t T, sctx *m, float *gk, int P) {
  const peer_dims *D = &L->dims;
  const int64_t n = D->n, half = D->half, H = D->H, k = D->k;
  const size_t ne = (size_t)(T * H * k);
  memset(gk, 0, (size_t)(D->G * 2 * n * half) * sizeof(float));
  for (size_t e = 0; e < ne; e++) {
    int64_t h = (int64_t)(e / (size_t)k) % H, g = L->cfg.shared_keys ? 0 : h;
    int64_t a = m->ids[e] / n, b = m->ids[e] % n;
    m->key[2 * e] = (uint32_t)((g * 2 + 0) * n + a);
    m->key[2 * e + 1] = (uint32_t)((g * 2 + 1) * n + b);
    m->val[2 * e] = (uint32_t)(2 * e);
    m->val[2 * e + 1] = (uint32_t)(2 * e + 1);
  }
  radix_sort(m->key, m->val, m->key2, m->val2, 2 * ne, (uint32_t)(D->G * 2 * n - 1));
  uint32_t *starts = m->key2;
  size_t runs = run_starts(m->key, 2 * ne, starts);
#pragma omp parallel for schedule(dynamic, 64) num_threads(P)
  for (size_t r = 0; r < runs; r++) {
    float *row = gk + (size_t)m->key[starts[r]] * (size_t)half;
    for (uint32_t i = starts[r]; i < starts[r + 1]; i++) {
      size_t e = m->val[i] / 2, p = m->val[i] % 2;
      size_t t = e / (size_t)(H * k), h = (e / (size_t)k) % (size_t)H;
      axpy_row_f32(m->ds[e], m->q + t * (size_t)D->dq + h * (size_t)D->dk + p * (size_t)half, row,
                   half);
    }
  }
}

static void norm_backward(const peer_layer *L, int64_t T, sctx *m, peer_grads *gr, int P) {
  const int64_t dq = L->dims.dq;
  const float *nw = L->slot[PEER_P_NORM_WEIGHT].data;
#pragma omp parallel for schedule(static) num_threads(P)
  for (int64_t f = 0; f < dq; f++) {
    float dw = 0.0f, db = 0.0f, s1 = 0.0f, s2 = 0.0f;
    for (int64_t t = 0; t < T; t++) {
      float g = m->dq[t * dq + f], h = m->qhat[t * dq + f];
      dw += g * h;
      db += g;
      s1 += g * nw[f];
      s2 += g * nw[f] * h;
    }
    if (gr->norm_weight) gr->norm_weight[f] = dw;
    if (gr->norm_bias) gr->norm_bias[f] = db;
    float scale = m->invstd[f] / (float)T;
    for (int64_t t = 0; t < T; t++) {
      float g = m->dq[t * dq + f] * nw[f];
      m->dq[t * dq + f] = scale * ((float)T * g - s1 - m->qhat[t * dq + f] * s2);
    }
  }
}

static void projection_backward(const peer_layer *L, int64_t T, const float *x, float *dx, sctx *m,
                                peer_grads *gr, int P) {
  const peer_dims *D = &L->dims;
  const int64_t dq = D->dq, d = D->d;
  if (gr->query_bias) {
#pragma omp parallel for schedule(static) num_threads(P)
    for (int64_t f = 0; f < dq; f++) {
      float s = 0.0f;
      for (int64_t t = 0; t < T; t++)
        s += m->dq[t * dq + f];
      gr->query_bias[f] = s;
    }
  }
  if (gr->query_weight) {
    transpose(m->dq, T, dq, m->dqT, P);
    transpose(x, T, d, m->xT, P);
#pragma omp parallel for schedule(static) num_threads(P)
    for (int64_t j0 = 0; j0 < dq; j0 += TB) {
      int64_t nj = dq - j0 < TB ? dq - j0 : TB;
      peer_cpu_gemm_nt(nj, d, T, m->dqT + j0 * T, T, m->xT, T, gr->query_weight + j0 * d, d,
                       pack_of(m));
    }
  }
  if (dx) {
    transpose(L->slot[PEER_P_QUERY_WEIGHT].data, dq, d, m->WqT, P);
#pragma omp parallel for schedule(static) num_threads(P)
    for (int64_t t0 = 0; t0 < T; t0 += TB) {
      int64_t nt = T - t0 < TB ? T - t0 : TB;
      peer_cpu_gemm_nt(nt, d, dq, m->dq + t0 * dq, dq, m->WqT, dq, m->tmp + t0 * d, d, pack_of(m));
      for (int64_t t = t0; t < t0 + nt; t++)
        for (int64_t i = 0; i < d; i++)
          dx[t * d + i] += m->tmp[t * d + i];
    }
  }
}

/* This rank's columns of the expert gradient rows: each distinct id sums its
 * entries' c_down x[cols] and c_up dy[cols]. */
static void expert_grads(const peer_shard *S, int64_t T, const float *x, const float *dy, sctx *m,
                         peer_grads *gr, int P) {
  const peer_dims *D = &S->L->dims;
  const int64_t d = D->d, c = S->cols, c0 = S->col0, hk = D->H * D->k;
  const size_t ne = (size_t)(T * hk);
  for (size_t e = 0; e < ne; e++) {
    m->key[e] = (uint32_t)m->ids[e];
    m->val[e] = (uint32_t)e;
  }
  radix_sort(m->key, m->val, m->key2, m->val2, ne, (uint32_t)(D->N - 1));
  uint32_t *starts = m->key2;
  size_t runs = run_starts(m->key, ne, starts);
  gr->n_expert_rows = (int64_t)runs;
#pragma omp parallel for schedule(dynamic, 16) num_threads(P)
  for (size_t r = 0; r < runs; r++) {
    int64_t id = m->key[starts[r]];
    gr->expert_rows[r] = id;
    float *gd = gr->experts_down + (gr->experts_dense ? (size_t)id : r) * (size_t)c;
    float *gu = gr->experts_up + (gr->experts_dense ? (size_t)id : r) * (size_t)c;
    float *acc_d = pack_of(m), *acc_u = acc_d + c;
    float *sd = gr->experts_dense ? acc_d : gd, *su = gr->experts_dense ? acc_u : gu;
    memset(sd, 0, (size_t)c * sizeof(float));
    memset(su, 0, (size_t)c * sizeof(float));
    for (uint32_t i = starts[r]; i < starts[r + 1]; i++) {
      size_t e = m->val[i], t = e / (size_t)hk;
      axpy_row_f32(m->cdown[e], x + t * (size_t)d + c0, sd, c);
      axpy_row_f32(m->cup[e], dy + t * (size_t)d + c0, su, c);
    }
    if (gr->experts_dense)
      for (int64_t i = 0; i < c; i++)
        gd[i] += sd[i], gu[i] += su[i];
  }
}

static peer_status backward(peer_shard *S, peer_context *c, const float *dy, float *dx,
                            peer_grads *gr) {
  peer_layer *L = S->L;
  const int64_t T = c->n_tokens;
  const float *x = c->x;
  int P = threads_for(L, c);
  sctx m;
  sctx_layout(S, c->max_tokens, c->n_threads, c->mem, &m);
  int64_t bad = first_nonfinite_row(dy, T, L->dims.d, P);
  if (bad < T)
    return peer_fail(PEER_ERR_NONFINITE, "token %lld: dy holds NaN or infinity", (long long)bad);
  const size_t hk = (size_t)T * (size_t)(L->dims.H * L->dims.k);
  peer_shard_partial_dots(S, PEER_P_EXPERTS_UP, T, dy, m.ids, m.vd, m.per_thread,
                          m.per_thread_bytes, P);
  peer_status st = peer_shard_allreduce(S, m.vd, (int64_t)hk, "shard_backward");
  if (st) return st;
  entry_coefficients(L, T, &m, P);
  if (dx) {
    peer_shard_combine(S, PEER_P_EXPERTS_DOWN, T, m.ids, m.cdown, m.mine, m.per_thread,
                       m.per_thread_bytes, P);
    if ((st = peer_shard_gather_rows(S, T, m.mine, m.all, dx, "shard_backward"))) return st;
  }
  if (gr->experts_down) expert_grads(S, T, x, dy, &m, gr, P);
  query_grad(L, T, &m, P);
  if (gr->keys) keys_grad(L, T, &m, gr->keys, P);
  if (L->cfg.query_norm == PEER_NORM_BATCHNORM) norm_backward(L, T, &m, gr, P);
  projection_backward(L, T, x, dx, &m, gr, P);
  return PEER_OK;
}

peer_status peer_shard_backward(peer_shard *S, peer_context *c, const float *dy, float *dx,
                                peer_grads *g) {
  if (!S) return peer_fail(PEER_ERR_INVALID_ARGUMENT, "shard_backward: NULL shard");
  peer_status st = peer_backward_check(S->L, c, dy, g, "shard_backward");
  if (st) return st;
  g->n_expert_rows = 0;
  if (c->n_tokens == 0) {
    float *bufs[] = {g->query_weight, g->query_bias, g->norm_weight, g->norm_bias, g->keys};
    int slots[] = {PEER_P_QUERY_WEIGHT, PEER_P_QUERY_BIAS, PEER_P_NORM_WEIGHT, PEER_P_NORM_BIAS,
                   PEER_P_KEYS};
    for (int i = 0; i < 5; i++)
      if (bufs[i]) memset(bufs[i], 0, S->L->slot[slots[i]].nbytes);
  } else if ((st = backward(S, c, dy, dx, g))) {
    return st;
  }
  c->ready = false;
  return PEER_OK;
}
