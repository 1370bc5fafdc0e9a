/* cpu_train.c: training on the CPU: the training forward (batch-norm batch
 * statistics, recording what backward needs) and the backward pass.  The
 * sharded layer (shard_train.c) runs the same passes on its own arrays
 * through this variant's peer_cpu_train_impl (cpu.h), with the expert phase
 * on its columns (expert_dots, expert_combine) in place of the fused one.
 *
 * Determinism: every sum over tokens or entries runs in a fixed order.  Sums
 * that scatter into shared rows (sub-key and expert gradients) first sort the
 * contributions by row with a stable radix sort, then each row adds its
 * contributions in entry order; rows are independent, so threads never share
 * an accumulator and the bits do not depend on the thread count. */
#include "cpu.h"
#include "pool.h"

/* What a pass's items need (pool.h: each parallel loop's body is a function
 * of an index range and the caller's slot); each pass fills what it uses. */
typedef struct {
  const peer_layer *L;
  int64_t T;
  peer_cpu_train_mem *m;
  const float *x, *dy, *coef, *z_in;
  float *dx, *z, *out, *gk;
  peer_grads *gr;
  const int64_t *ids;
  int table;              /* a parameter slot */
  int64_t col0, cols;     /* expert columns */
  char *scratch;          /* per-slot scratch, `stride` bytes apart */
  size_t stride;
  const uint32_t *starts; /* run starts of m->key */
  size_t runs;
  bool shared_only;
  const float *src; /* transpose: src [rows, cols2] into dst */
  float *dst;
  int64_t rows, cols2;
} pass;

static size_t ctx_layout(const peer_layer *L, int64_t T, int P, char *base, peer_cpu_train_mem *m) {
  const peer_dims *D = &L->dims;
  const size_t t = (size_t)T, dq = (size_t)D->dq, d = (size_t)D->d;
  const size_t hk = t * (size_t)(D->H * D->k);
  size_t kmax = t > dq ? t : dq;
  if (d > kmax) kmax = d;
  struct {
    void **ptr;
    size_t bytes;
  } parts[] = {
      {(void **)&m->q, t * dq * 4},      {(void **)&m->qhat, t * dq * 4},
      {(void **)&m->mean, dq * 4},       {(void **)&m->invstd, dq * 4},
      {(void **)&m->ids, hk * 8},        {(void **)&m->scores, hk * 4},
      {(void **)&m->gates, hk * 4},      {(void **)&m->z, hk * 4},
      {(void **)&m->dq, t * dq * 4},     {(void **)&m->cdown, hk * 4},
      {(void **)&m->cup, hk * 4},        {(void **)&m->ds, hk * 4},
      {(void **)&m->dqT, dq * t * 4},    {(void **)&m->xT, d * t * 4},
      {(void **)&m->WqT, d * dq * 4},    {(void **)&m->tmp, t * d * 4},
      {(void **)&m->key, (2 * hk + 1) * 4},  {(void **)&m->val, (2 * hk + 1) * 4},
      {(void **)&m->key2, (2 * hk + 1) * 4}, {(void **)&m->val2, (2 * hk + 1) * 4},
  };
  size_t off = 0;
  for (size_t i = 0; i < sizeof parts / sizeof parts[0]; i++) {
    if (base) *parts[i].ptr = base + off;
    off += round64(parts[i].bytes);
  }
  m->per_thread_bytes = round64(kmax * TB * sizeof(float));
  if (base) m->per_thread = base + off;
  off += m->per_thread_bytes * (size_t)P;
  return off;
}

size_t peer_cpu_context_bytes(const peer_layer *L, int64_t T) {
  peer_cpu_train_mem m;
  return ctx_layout(L, T, peer_context_threads(L), NULL, &m);
}

static int threads_for(const peer_layer *L, const peer_context *c) {
  int P = peer_cpu_threads(L);
  return P < c->n_threads ? P : c->n_threads;
}

static float *pack_of(const peer_cpu_train_mem *m) {
  return (float *)(m->per_thread + (size_t)peer_parallel_slot() * m->per_thread_bytes);
}

/* ------------------------------------------------------------ forward */

/* Batch norm works on blocks of BN_BLOCK adjacent features, walking the
 * tokens in memory order (a feature-at-a-time walk strides dq floats per token
 * and touches a new cache line for every element).  Each feature's sums still
 * run over the tokens in order, so the bits are those of a per-feature loop. */
#define BN_BLOCK 32

/* Batch statistics (two passes, token order), q normalised in place. */
static void batch_norm_blocks(void *job, int64_t b0, int64_t b1, int slot) {
  const pass *ps = job;
  const peer_layer *L = ps->L;
  const int64_t T = ps->T, dq = L->dims.dq;
  peer_cpu_train_mem *m = ps->m;
  const float *nw = L->slot[PEER_P_NORM_WEIGHT].data, *nb = L->slot[PEER_P_NORM_BIAS].data;
  (void)slot;
  for (int64_t b = b0; b < b1; b++) {
    const int64_t f0 = b * BN_BLOCK, nf = dq - f0 < BN_BLOCK ? dq - f0 : BN_BLOCK;
    float sum[BN_BLOCK] = {0}, ss[BN_BLOCK] = {0}, mean[BN_BLOCK], invstd[BN_BLOCK];
    for (int64_t t = 0; t < T; t++) {
      const float *q = m->q + t * dq + f0;
      for (int64_t j = 0; j < nf; j++) sum[j] += q[j];
    }
    for (int64_t j = 0; j < nf; j++) mean[j] = sum[j] / (float)T;
    for (int64_t t = 0; t < T; t++) {
      const float *q = m->q + t * dq + f0;
      for (int64_t j = 0; j < nf; j++) {
        float c = q[j] - mean[j];
        ss[j] += c * c;
      }
    }
    for (int64_t j = 0; j < nf; j++) {
      invstd[j] = 1.0f / sqrtf(ss[j] / (float)T + 1e-5f);
      m->mean[f0 + j] = mean[j];
      m->invstd[f0 + j] = invstd[j];
    }
    for (int64_t t = 0; t < T; t++) {
      float *q = m->q + t * dq + f0, *qhat = m->qhat + t * dq + f0;
      for (int64_t j = 0; j < nf; j++) {
        float h = (q[j] - mean[j]) * invstd[j];
        qhat[j] = h;
        q[j] = h * nw[f0 + j] + nb[f0 + j];
      }
    }
  }
}

static void batch_norm_train(const peer_layer *L, int64_t T, peer_cpu_train_mem *m, int P) {
  const int64_t nblk = (L->dims.dq + BN_BLOCK - 1) / BN_BLOCK;
  peer_parallel_ranges(P, nblk, 1, batch_norm_blocks, &(pass){.L = L, .T = T, .m = m});
}

/* After a successful batch: running = (1 - m) running + m batch, with the
 * unbiased variance recovered from invstd. */
static void update_running(peer_layer *L, int64_t T, const peer_cpu_train_mem *m) {
  float *rm = L->slot[PEER_P_NORM_MEAN].data, *rv = L->slot[PEER_P_NORM_VAR].data;
  const float mo = L->norm_momentum;
  for (int64_t f = 0; f < L->dims.dq; f++) {
    float var = 1.0f / (m->invstd[f] * m->invstd[f]) - 1e-5f;
    float unbiased = var * (float)T / (float)(T - 1);
    rm[f] = (1.0f - mo) * rm[f] + mo * m->mean[f];
    rv[f] = (1.0f - mo) * rv[f] + mo * unbiased;
  }
}

/* The training forward up to the expert phase: x checked, the queries
 * projected and batch-normalised with batch statistics (m->q, m->qhat, the
 * statistics), retrieval into m->ids, m->scores and m->gates. */
static peer_status train_queries(peer_layer *L, int64_t T, const float *x, const cpu_ws *w,
                                 peer_cpu_train_mem *m, int P) {
  int64_t bad = peer_cpu_first_nonfinite_row(x, T, L->dims.d, P);
  if (bad < T)
    return peer_fail(PEER_ERR_NONFINITE, "token %lld: x holds NaN or infinity", (long long)bad);
  peer_cpu_project(L, T, x, m->q, L->dims.dq, w, P);
  if (L->cfg.query_norm == PEER_NORM_BATCHNORM) batch_norm_train(L, T, m, P);
  retrieve_out out = {m->ids, m->scores, m->gates};
  return peer_cpu_retrieve_all(L, T, m->q, L->dims.dq, false, out, w, P);
}

peer_status peer_cpu_forward_train(peer_layer *L, peer_context *c, int64_t T, const float *x,
                                   float *y, void *ws) {
  int P = threads_for(L, c);
  cpu_ws w;
  peer_cpu_layout(L, T, ws, &w);
  peer_cpu_train_mem m;
  ctx_layout(L, c->max_tokens, c->n_threads, c->mem, &m);
  peer_status st = train_queries(L, T, x, &w, &m, P);
  if (st) return st;
  if (L->cfg.query_norm == PEER_NORM_BATCHNORM) update_running(L, T, &m);
  peer_cpu_apply_experts(L, T, x, y, m.ids, m.gates, m.z, &w, P);
  return PEER_OK;
}

/* ---------------------------------------- the expert phase on columns */

/* z[e] = u[ids[e]] . x[t, col0 .. col0 + cols) for the T*H*k entries, u the
 * table in `slot` with rows of cols values: the unsharded apply_experts'
 * dots, restricted to columns.  Per-thread scratch (bf16: x split) at
 * scratch + thread * stride, at least cols floats. */
static void expert_dots_tokens(void *job, int64_t t0, int64_t t1, int slot) {
  const pass *j = job;
  const peer_layer *L = j->L;
  const int64_t d = L->dims.d, hk = L->dims.H * L->dims.k, col0 = j->col0, cols = j->cols;
  const bool bf16 = L->cfg.weight_dtype == PEER_BF16;
  const size_t row_bytes = (size_t)cols * (bf16 ? 2 : 4);
  const char *table = L->slot[j->table].data;
  const int64_t *ids = j->ids;
  float *z = j->z;
  for (int64_t t = t0; t < t1; t++) {
    const float *xt = j->x + t * d + col0;
    if (bf16) {
      float *xs = (float *)(j->scratch + (size_t)slot * j->stride);
      split_pairs(xt, cols, xs);
      xt = xs;
    }
    for (int64_t e = t * hk; e < (t + 1) * hk; e++) {
      const char *u = table + (size_t)ids[e] * row_bytes;
      z[e] = bf16 ? dot_row_bf16((const uint16_t *)u, xt, cols)
                  : dot_row_f32((const float *)u, xt, cols);
    }
  }
}

static void expert_dots(const peer_layer *L, int slot, int64_t col0, int64_t cols, int64_t T,
                        const float *x, const int64_t *ids, float *z, char *scratch, size_t stride,
                        int P) {
  pass j = {.L = L, .table = slot, .col0 = col0, .cols = cols, .x = x, .ids = ids, .z = z,
            .scratch = scratch, .stride = stride};
  peer_parallel_ranges(P, T, 4, expert_dots_tokens, &j);
}

/* out[t, 0..cols) = sum over token t's entries e of c_e * v[ids[e]], v the
 * table in `slot` with rows of cols values, c_e = coef[e] * act(z[e]) (as
 * apply_experts weighs them) or, z NULL, coef[e].  Scratch as expert_dots. */
static void expert_combine_tokens(void *job, int64_t t0, int64_t t1, int slot) {
  const pass *j = job;
  const peer_layer *L = j->L;
  const int64_t hk = L->dims.H * L->dims.k, cols = j->cols;
  const int act = (int)L->cfg.activation;
  const bool bf16 = L->cfg.weight_dtype == PEER_BF16;
  const size_t row_bytes = (size_t)cols * (bf16 ? 2 : 4);
  const char *table = L->slot[j->table].data;
  const int64_t *ids = j->ids;
  const float *coef = j->coef, *z = j->z_in;
  float *out = j->out;
  for (int64_t t = t0; t < t1; t++) {
    float *ot = bf16 ? (float *)(j->scratch + (size_t)slot * j->stride) : out + t * cols;
    memset(ot, 0, (size_t)cols * sizeof(float));
    for (int64_t e = t * hk; e < (t + 1) * hk; e++) {
      const char *v = table + (size_t)ids[e] * row_bytes;
      float a = z ? coef[e] * peer_activate(act, z[e]) : coef[e];
      if (bf16) axpy_row_bf16(a, (const uint16_t *)v, ot, cols);
      else axpy_row_f32(a, (const float *)v, ot, cols);
    }
    if (bf16) {
      unsplit_pairs(ot, cols);
      memcpy(out + t * cols, ot, (size_t)cols * sizeof(float));
    }
  }
}

static void expert_combine(const peer_layer *L, int slot, int64_t cols, int64_t T,
                           const int64_t *ids, const float *coef, const float *z, float *out,
                           char *scratch, size_t stride, int P) {
  pass j = {.L = L, .table = slot, .cols = cols, .ids = ids, .coef = coef, .z_in = z,
            .out = out, .scratch = scratch, .stride = stride};
  peer_parallel_ranges(P, T, 4, expert_combine_tokens, &j);
}

/* ------------------------------------------ streamed gradient rows */

/* The sparse expert gradient rows (512 KiB a token at the reference config,
 * as many bytes as the forward's gather) are written once and not read again
 * by the backward, so they go out with non-temporal stores: no read for
 * ownership of the lines they overwrite whole, and they do not evict x, dy
 * and the context from the caches.  The stores are weakly ordered, so every
 * item that streamed ends with stream_fence(), before it counts as done
 * (pool.h: the caller reads what the items wrote once they are done). */
#if defined(__SSE2__) && !defined(__AVX__)
#include <emmintrin.h>
#endif

static inline void stream_vec(float *p, vf v) {
#if defined(__AVX512F__)
  _mm512_stream_ps(p, (__m512)v);
#elif defined(__AVX__)
  _mm256_stream_ps(p, (__m256)v);
#elif defined(__SSE2__)
  __m128 q[VW / 4];
  memcpy(q, &v, sizeof q);
  for (int i = 0; i < VW / 4; i++) _mm_stream_ps(p + 4 * i, q[i]);
#else
  memcpy(p, &v, sizeof v);
#endif
}

static inline void stream_fence(void) {
#if defined(__SSE2__)
  _mm_sfence();
#endif
}

/* out[0 .. d) = 0 + a v: axpy_row_f32 into a zeroed row, the same operations
 * and so the same bits, streamed where out is aligned to a vector. */
static inline void stream_scaled_row(float a, const float *v, float *out, int64_t d) {
  const vf zero = {0};
  int64_t i = 0;
  for (; i < d && (uintptr_t)(out + i) % sizeof(vf) != 0; i++) out[i] = 0.0f + a * v[i];
  for (; i + VW <= d; i += VW) stream_vec(out + i, zero + a * loadv(v + i));
  for (; i < d; i++) out[i] = 0.0f + a * v[i];
}

/* out[0 .. d) = src[0 .. d), streamed as stream_scaled_row. */
static inline void stream_row(const float *src, float *out, int64_t d) {
  int64_t i = 0;
  for (; i < d && (uintptr_t)(out + i) % sizeof(vf) != 0; i++) out[i] = src[i];
  for (; i + VW <= d; i += VW) stream_vec(out + i, loadv(src + i));
  for (; i < d; i++) out[i] = src[i];
}

/* ------------------------------------------------------------ backward */

/* Stable LSD radix sort of (key, val) pairs by key, 8 bits a pass, only as
 * many passes as max_key needs.  Result in (key, val); (key2, val2) scratch. */
static void radix_sort(uint32_t *key, uint32_t *val, uint32_t *key2, uint32_t *val2, size_t n,
                       uint32_t max_key) {
  for (int shift = 0; shift < 32 && (max_key >> shift) != 0; shift += 8) {
    size_t count[257] = {0};
    for (size_t i = 0; i < n; i++) count[((key[i] >> shift) & 255u) + 1]++;
    for (int b = 0; b < 256; b++) count[b + 1] += count[b];
    for (size_t i = 0; i < n; i++) {
      size_t dst = count[(key[i] >> shift) & 255u]++;
      key2[dst] = key[i];
      val2[dst] = val[i];
    }
    uint32_t *t = key;
    key = key2, key2 = t;
    t = val, val = val2, val2 = t;
    /* copy back after an odd pass so the caller's arrays hold the result */
    if (((shift / 8) & 1) == 0 && (max_key >> (shift + 8)) == 0) {
      memcpy(key2, key, n * sizeof *key);
      memcpy(val2, val, n * sizeof *val);
    }
  }
}

/* Starts of the runs of equal keys in a sorted array; returns their count.
 * starts[count] = n. */
static size_t run_starts(const uint32_t *key, size_t n, uint32_t *starts) {
  size_t r = 0;
  for (size_t i = 0; i < n; i++)
    if (i == 0 || key[i] != key[i - 1]) starts[r++] = (uint32_t)i;
  starts[r] = (uint32_t)n;
  return r;
}

/* dst [cols, rows] = src [rows, cols] transposed, in tiles of TR x TR: a
 * column at a time reads a new cache line per element (a 1024-row column
 * spans 64 KiB), a tile reads and writes TR lines of TR floats each. */
#define TR 16
static void transpose_tiles(void *job, int64_t b0, int64_t b1, int slot) {
  const pass *j = job;
  const float *src = j->src;
  float *dst = j->dst;
  const int64_t rows = j->rows, cols = j->cols2;
  (void)slot;
  for (int64_t c0 = b0 * TR; c0 < b1 * TR && c0 < cols; c0 += TR) {
    const int64_t c1 = cols - c0 < TR ? cols : c0 + TR;
    for (int64_t r0 = 0; r0 < rows; r0 += TR) {
      const int64_t r1 = rows - r0 < TR ? rows : r0 + TR;
      for (int64_t c = c0; c < c1; c++)
        for (int64_t r = r0; r < r1; r++) dst[c * rows + r] = src[r * cols + c];
    }
  }
}

static void transpose(const float *src, int64_t rows, int64_t cols, float *dst, int P) {
  pass j = {.src = src, .dst = dst, .rows = rows, .cols2 = cols};
  peer_parallel_ranges(P, (cols + TR - 1) / TR, 1, transpose_tiles, &j);
}

/* Entry e's backward from vd = v_i . dy: d loss / d gate (into m->ds, turned
 * into d score by gates_backward) and the coefficients of its expert
 * gradient rows and of dx. */
static inline void entry_backward(int act, peer_cpu_train_mem *m, int64_t e, float vd) {
  float z = m->z[e], g = m->gates[e], a = peer_activate(act, z);
  m->ds[e] = a * vd;
  m->cup[e] = g * a;
  m->cdown[e] = g * vd * peer_activate_grad(act, z);
}

/* Token t's gate backward, head by head: m->ds from d gate to d score. */
static void gates_backward(const peer_layer *L, int64_t t, peer_cpu_train_mem *m) {
  const int64_t k = L->dims.k, hk = L->dims.H * k;
  for (int64_t h = 0; h < L->dims.H; h++) {
    int64_t o = t * hk + h * k;
    peer_gates_grad((int)L->cfg.gate, m->scores + o, m->gates + o, m->ds + o, (int)k, m->ds + o);
  }
}

/* Per entry: the expert's share of dx and the coefficients of its gradient
 * rows; per head: the gate backward into the kept scores (m->ds).  With
 * `rows` (sparse expert gradients, sorted by sort_expert_entries), an entry
 * whose expert no other entry of the batch used also writes that expert's
 * gradient rows, streamed, while its token's x and dy are at hand: row
 * m->val2[e] of the list, or none (NO_ROW). */
#define NO_ROW UINT32_MAX
static void experts_backward_tokens(void *job, int64_t t0, int64_t t1, int slot) {
  const pass *j = job;
  const peer_layer *L = j->L;
  const int64_t T = j->T;
  const float *x = j->x, *dy = j->dy;
  float *dx = j->dx;
  peer_cpu_train_mem *m = j->m;
  peer_grads *rows = j->gr;
  const peer_dims *D = &L->dims;
  const int64_t d = D->d, hk = D->H * D->k;
  const int act = (int)L->cfg.activation;
  const bool bf16 = L->cfg.weight_dtype == PEER_BF16;
  const void *down = L->slot[PEER_P_EXPERTS_DOWN].data, *up = L->slot[PEER_P_EXPERTS_UP].data;
  const size_t row_bytes = (size_t)d * (bf16 ? 2 : 4), ne = (size_t)(T * hk);
  (void)slot;
  {
    for (int64_t t = t0; t < t1; t++) {
      const float *dyt = dy + t * d;
      float *dxt = dx ? dx + t * d : NULL;
      if (dxt) memset(dxt, 0, (size_t)d * sizeof(float));
      if (bf16) { /* bf16 rows meet dy and dx split (split_pairs) */
        float *dys = pack_of(m);
        split_pairs(dyt, d, dys);
        dyt = dys;
      }
      for (int64_t e = t * hk; e < t * hk + PREFETCH_AHEAD && e < (t + 1) * hk; e++)
        prefetch_expert(down, up, m->ids[e], row_bytes);
      for (int64_t e = t * hk; e < (t + 1) * hk; e++) {
        if ((size_t)(e + PREFETCH_AHEAD) < ne && e + PREFETCH_AHEAD < (t + 1) * hk)
          prefetch_expert(down, up, m->ids[e + PREFETCH_AHEAD], row_bytes);
        int64_t id = m->ids[e];
        entry_backward(act, m, e,
                       bf16 ? dot_row_bf16((const uint16_t *)up + id * d, dyt, d)
                            : dot_row_f32((const float *)up + id * d, dyt, d));
        if (dxt) {
          if (bf16) axpy_row_bf16(m->cdown[e], (const uint16_t *)down + id * d, dxt, d);
          else axpy_row_f32(m->cdown[e], (const float *)down + id * d, dxt, d);
        }
        if (rows && m->val2[e] != NO_ROW) {
          size_t r = m->val2[e];
          stream_scaled_row(m->cdown[e], x + t * d, rows->experts_down + r * (size_t)d, d);
          stream_scaled_row(m->cup[e], dy + t * d, rows->experts_up + r * (size_t)d, d);
        }
      }
      if (bf16 && dxt) unsplit_pairs(dxt, d);
      gates_backward(L, t, m);
    }
    if (rows) stream_fence(); /* before the item counts as done (pool.h) */
  }
}

static void experts_backward(const peer_layer *L, int64_t T, const float *x, const float *dy,
                             float *dx, peer_cpu_train_mem *m, peer_grads *rows, int P) {
  pass j = {.L = L, .T = T, .x = x, .dy = dy, .dx = dx, .m = m, .gr = rows};
  peer_parallel_ranges(T > 1 ? P : 1, T, 4, experts_backward_tokens, &j);
}

/* experts_backward's coefficients and gate backward from given vd (the
 * sharded layer's all-reduced partial dots), without the dx part. */
static void entry_coefficients_tokens(void *job, int64_t t0, int64_t t1, int slot) {
  const pass *j = job;
  const int64_t hk = j->L->dims.H * j->L->dims.k;
  const int act = (int)j->L->cfg.activation;
  (void)slot;
  for (int64_t t = t0; t < t1; t++) {
    for (int64_t e = t * hk; e < (t + 1) * hk; e++) entry_backward(act, j->m, e, j->coef[e]);
    gates_backward(j->L, t, j->m);
  }
}

static void entry_coefficients(const peer_layer *L, int64_t T, const float *vd,
                               peer_cpu_train_mem *m, int P) {
  pass j = {.L = L, .m = m, .coef = vd};
  peer_parallel_ranges(P, T, 16, entry_coefficients_tokens, &j);
}

/* d loss / d q: each kept score s1[a] + s2[b] sends ds * C1[a] and ds * C2[b]. */
static void query_grad_tokens(void *job, int64_t t0, int64_t t1, int slot) {
  const pass *ps = job;
  const peer_layer *L = ps->L;
  peer_cpu_train_mem *m = ps->m;
  const peer_dims *D = &L->dims;
  const float *keys = L->slot[PEER_P_KEYS].data;
  const int64_t k = D->k, half = D->half, n = D->n;
  (void)slot;
  for (int64_t t = t0; t < t1; t++) {
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

static void query_grad(const peer_layer *L, int64_t T, peer_cpu_train_mem *m, int P) {
  peer_parallel_ranges(T > 1 ? P : 1, T, 8, query_grad_tokens, &(pass){.L = L, .m = m});
}

/* Runs r0..r1 of the sorted sub-key contributions, each into its row. */
static void keys_grad_runs(void *job, int64_t r0, int64_t r1, int slot) {
  const pass *j = job;
  const peer_dims *D = &j->L->dims;
  const peer_cpu_train_mem *m = j->m;
  const int64_t half = D->half, H = D->H, k = D->k;
  const uint32_t *starts = j->starts;
  (void)slot;
  for (int64_t r = r0; r < r1; r++) {
    float *row = j->gk + (size_t)m->key[starts[r]] * (size_t)half;
    for (uint32_t i = starts[r]; i < starts[r + 1]; i++) {
      size_t e = m->val[i] / 2, p = m->val[i] % 2;
      size_t t = e / (size_t)(H * k), h = (e / (size_t)k) % (size_t)H;
      axpy_row_f32(m->ds[e], m->q + t * (size_t)D->dq + h * (size_t)D->dk + p * (size_t)half, row,
                   half);
    }
  }
}

/* Sub-key gradients: row (g, p, a) gets ds * q_half of every entry that kept it. */
static void keys_grad(const peer_layer *L, int64_t T, peer_cpu_train_mem *m, float *gk, int P) {
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
  uint32_t *starts = m->key2; /* free again after the sort */
  size_t runs = run_starts(m->key, 2 * ne, starts);
  pass j = {.L = L, .m = m, .gk = gk, .starts = starts};
  peer_parallel_ranges(P, (int64_t)runs, 64, keys_grad_runs, &j);
}

/* Through batch norm (batch statistics): dq becomes d loss / d (Wq x + b).
 * Blocks of features, tokens in memory order, as batch_norm_train. */
static void norm_backward_blocks(void *job, int64_t b0, int64_t b1, int slot) {
  const pass *ps = job;
  const peer_layer *L = ps->L;
  peer_cpu_train_mem *m = ps->m;
  peer_grads *gr = ps->gr;
  const int64_t T = ps->T, dq = L->dims.dq;
  const float *nw = L->slot[PEER_P_NORM_WEIGHT].data;
  (void)slot;
  for (int64_t b = b0; b < b1; b++) {
    const int64_t f0 = b * BN_BLOCK, nf = dq - f0 < BN_BLOCK ? dq - f0 : BN_BLOCK;
    float dw[BN_BLOCK] = {0}, db[BN_BLOCK] = {0}, s1[BN_BLOCK] = {0}, s2[BN_BLOCK] = {0};
    for (int64_t t = 0; t < T; t++) {
      const float *dq_t = m->dq + t * dq + f0, *qhat = m->qhat + t * dq + f0;
      for (int64_t j = 0; j < nf; j++) {
        float g = dq_t[j], h = qhat[j];
        dw[j] += g * h;
        db[j] += g;
        s1[j] += g * nw[f0 + j];
        s2[j] += g * nw[f0 + j] * h;
      }
    }
    for (int64_t j = 0; j < nf; j++) {
      if (gr->norm_weight) gr->norm_weight[f0 + j] = dw[j];
      if (gr->norm_bias) gr->norm_bias[f0 + j] = db[j];
    }
    for (int64_t t = 0; t < T; t++) {
      float *dq_t = m->dq + t * dq + f0;
      const float *qhat = m->qhat + t * dq + f0;
      for (int64_t j = 0; j < nf; j++) {
        float scale = m->invstd[f0 + j] / (float)T;
        float g = dq_t[j] * nw[f0 + j];
        dq_t[j] = scale * ((float)T * g - s1[j] - qhat[j] * s2[j]);
      }
    }
  }
}

static void norm_backward(const peer_layer *L, int64_t T, peer_cpu_train_mem *m, peer_grads *gr,
                          int P) {
  const int64_t nblk = (L->dims.dq + BN_BLOCK - 1) / BN_BLOCK;
  peer_parallel_ranges(P, nblk, 1, norm_backward_blocks,
                       &(pass){.L = L, .T = T, .m = m, .gr = gr});
}

/* The query bias gradient: column sums of dq, features f0..f1. */
static void query_bias_features(void *job, int64_t f0, int64_t f1, int slot) {
  const pass *j = job;
  const int64_t dq = j->L->dims.dq, T = j->T;
  (void)slot;
  for (int64_t f = f0; f < f1; f++) {
    float s = 0.0f;
    for (int64_t t = 0; t < T; t++) s += j->m->dq[t * dq + f];
    j->gr->query_bias[f] = s;
  }
}

/* dWq's rows of blocks b0..b1 of TB query features. */
static void query_weight_blocks(void *job, int64_t b0, int64_t b1, int slot) {
  const pass *j = job;
  const int64_t dq = j->L->dims.dq, d = j->L->dims.d, T = j->T;
  const peer_cpu_train_mem *m = j->m;
  (void)slot;
  for (int64_t j0 = b0 * TB; j0 < b1 * TB && j0 < dq; j0 += TB) {
    int64_t nj = dq - j0 < TB ? dq - j0 : TB;
    peer_cpu_gemm_nt(nj, d, T, m->dqT + j0 * T, T, m->xT, T, j->gr->query_weight + j0 * d, d,
                     pack_of(m));
  }
}

/* dx += dq Wq for blocks b0..b1 of TB tokens. */
static void dx_query_blocks(void *job, int64_t b0, int64_t b1, int slot) {
  const pass *j = job;
  const int64_t dq = j->L->dims.dq, d = j->L->dims.d, T = j->T;
  const peer_cpu_train_mem *m = j->m;
  (void)slot;
  for (int64_t t0 = b0 * TB; t0 < b1 * TB && t0 < T; t0 += TB) {
    int64_t nt = T - t0 < TB ? T - t0 : TB;
    peer_cpu_gemm_nt(nt, d, dq, m->dq + t0 * dq, dq, m->WqT, dq, m->tmp + t0 * d, d, pack_of(m));
    for (int64_t t = t0; t < t0 + nt; t++)
      for (int64_t i = 0; i < d; i++) j->dx[t * d + i] += m->tmp[t * d + i];
  }
}

/* Query projection: dWq = dq^T X, db = column sums, dx += dq Wq. */
static void projection_backward(const peer_layer *L, int64_t T, const float *x, float *dx,
                                peer_cpu_train_mem *m, peer_grads *gr, int P) {
  const peer_dims *D = &L->dims;
  const int64_t dq = D->dq, d = D->d;
  pass j = {.L = L, .T = T, .m = m, .x = x, .dx = dx, .gr = gr};
  if (gr->query_bias) peer_parallel_ranges(P, dq, 64, query_bias_features, &j);
  if (gr->query_weight) {
    transpose(m->dq, T, dq, m->dqT, P);
    transpose(x, T, d, m->xT, P);
    peer_parallel_ranges(P, (dq + TB - 1) / TB, 1, query_weight_blocks, &j);
  }
  if (dx) {
    transpose(L->slot[PEER_P_QUERY_WEIGHT].data, dq, d, m->WqT, P);
    peer_parallel_ranges(T > TB ? P : 1, (T + TB - 1) / TB, 1, dx_query_blocks, &j);
  }
}

/* The entries sorted by expert id (stable: entry order within an id), into
 * m->key (ids) and m->val (entries), the starts of the runs of one id in
 * m->key2; the list of distinct ids into gr->expert_rows.  With `mark`,
 * m->val2[e] = the row of entry e's id if no other entry has it, else NO_ROW
 * (experts_backward's rows).  Returns the number of runs. */
static size_t sort_expert_entries(const peer_layer *L, int64_t T, peer_cpu_train_mem *m,
                                  peer_grads *gr, bool mark) {
  const size_t ne = (size_t)(T * L->dims.H * L->dims.k);
  for (size_t e = 0; e < ne; e++) {
    m->key[e] = (uint32_t)m->ids[e];
    m->val[e] = (uint32_t)e;
  }
  radix_sort(m->key, m->val, m->key2, m->val2, ne, (uint32_t)(L->dims.N - 1));
  uint32_t *starts = m->key2;
  size_t runs = run_starts(m->key, ne, starts);
  gr->n_expert_rows = (int64_t)runs;
  for (size_t r = 0; r < runs; r++) {
    gr->expert_rows[r] = m->key[starts[r]];
    if (mark)
      for (uint32_t i = starts[r]; i < starts[r + 1]; i++)
        m->val2[m->val[i]] = starts[r + 1] - starts[r] == 1 ? (uint32_t)r : NO_ROW;
  }
  return runs;
}

/* Expert gradient rows over columns [col0, col0 + cols) (all d of them
 * unsharded) from the sorted entries: each distinct id sums its entries'
 * c_down x and c_up dy in entry order, in a buffer that then goes to the
 * list (streamed) or is added to the dense row.  shared_only: only the ids
 * that several entries used (experts_backward wrote the others). */
static void expert_row_runs(void *job, int64_t r0, int64_t r1, int slot) {
  const pass *j = job;
  const peer_layer *L = j->L;
  const int64_t d = L->dims.d, c = j->cols, hk = L->dims.H * L->dims.k, col0 = j->col0;
  peer_cpu_train_mem *m = j->m;
  peer_grads *gr = j->gr;
  const float *x = j->x, *dy = j->dy;
  const bool shared_only = j->shared_only;
  const uint32_t *starts = m->key2;
  (void)slot;
  {
    for (size_t r = (size_t)r0; r < (size_t)r1; r++) {
      if (shared_only && starts[r + 1] - starts[r] == 1) continue;
      int64_t id = m->key[starts[r]];
      float *acc_d = pack_of(m), *acc_u = acc_d + c; /* kmax * TB >= 2d floats */
      memset(acc_d, 0, (size_t)c * sizeof(float));
      memset(acc_u, 0, (size_t)c * sizeof(float));
      for (uint32_t i = starts[r]; i < starts[r + 1]; i++) {
        size_t e = m->val[i], t = e / (size_t)hk;
        axpy_row_f32(m->cdown[e], x + t * (size_t)d + col0, acc_d, c);
        axpy_row_f32(m->cup[e], dy + t * (size_t)d + col0, acc_u, c);
      }
      if (gr->experts_dense) {
        float *gd = gr->experts_down + (size_t)id * (size_t)c;
        float *gu = gr->experts_up + (size_t)id * (size_t)c;
        for (int64_t i = 0; i < c; i++) gd[i] += acc_d[i], gu[i] += acc_u[i];
      } else {
        stream_row(acc_d, gr->experts_down + r * (size_t)c, c);
        stream_row(acc_u, gr->experts_up + r * (size_t)c, c);
      }
    }
    if (!gr->experts_dense) stream_fence(); /* before the item counts as done (pool.h) */
  }
}

static void sum_expert_rows(const peer_layer *L, size_t runs, const float *x, const float *dy,
                            int64_t col0, int64_t cols, peer_cpu_train_mem *m, peer_grads *gr,
                            bool shared_only, int P) {
  pass j = {.L = L, .m = m, .x = x, .dy = dy, .col0 = col0, .cols = cols, .gr = gr,
            .shared_only = shared_only};
  peer_parallel_ranges(P, (int64_t)runs, 16, expert_row_runs, &j);
}

/* Expert gradient rows over columns [col0, col0 + cols) (the sharded
 * layer's, after entry_coefficients). */
static void expert_grads(const peer_layer *L, int64_t T, const float *x, const float *dy,
                         int64_t col0, int64_t cols, peer_cpu_train_mem *m, peer_grads *gr, int P) {
  size_t runs = sort_expert_entries(L, T, m, gr, false);
  sum_expert_rows(L, runs, x, dy, col0, cols, m, gr, false, P);
}

/* The replicated parameters' gradients and dx's query part, from m->ds. */
static void dense_grads(const peer_layer *L, int64_t T, const float *x, float *dx,
                        peer_cpu_train_mem *m, peer_grads *gr, int P) {
  query_grad(L, T, m, P);
  if (gr->keys) keys_grad(L, T, m, gr->keys, P);
  if (L->cfg.query_norm == PEER_NORM_BATCHNORM) norm_backward(L, T, m, gr, P);
  projection_backward(L, T, x, dx, m, gr, P);
}

peer_status peer_cpu_backward(peer_layer *L, peer_context *c, const float *dy, float *dx,
                              peer_grads *gr) {
  const int64_t T = c->n_tokens;
  const float *x = c->x;
  int P = threads_for(L, c);
  peer_cpu_train_mem m;
  ctx_layout(L, c->max_tokens, c->n_threads, c->mem, &m);
  int64_t bad = peer_cpu_first_nonfinite_row(dy, T, L->dims.d, P);
  if (bad < T)
    return peer_fail(PEER_ERR_NONFINITE, "token %lld: dy holds NaN or infinity", (long long)bad);
  /* Sparse rows: those of ids one entry used are written by experts_backward,
   * the others summed after it. */
  const bool stream = gr->experts_down && !gr->experts_dense;
  size_t runs = gr->experts_down ? sort_expert_entries(L, T, &m, gr, stream) : 0;
  experts_backward(L, T, x, dy, dx, &m, stream ? gr : NULL, P);
  if (gr->experts_down) sum_expert_rows(L, runs, x, dy, 0, L->dims.d, &m, gr, stream, P);
  dense_grads(L, T, x, dx, &m, gr, P);
  return PEER_OK;
}

/* ------------------------------------------------------------ the table */

const peer_cpu_train_impl peer_cpu_train_variant = {
    .layout = ctx_layout,
    .first_nonfinite_row = peer_cpu_first_nonfinite_row,
    .queries = train_queries,
    .update_running = update_running,
    .expert_dots = expert_dots,
    .expert_combine = expert_combine,
    .entry_coefficients = entry_coefficients,
    .expert_grads = expert_grads,
    .dense_grads = dense_grads,
};
