/* cpu.c: the CPU backend.  A batch goes through three phases, each threaded
 * with OpenMP over independent pieces of work:
 *   1. queries:  Q = X Wq^T (+ b, batch norm), a blocked matrix product;
 *   2. retrieval: per (token block, head), the sub-key scores S = Q_half C^T
 *      (blocked matrix product), top-k' per half, exact Cartesian merge, gates;
 *   3. experts:  per token, gather the H*k rows u_i, v_i and accumulate.
 * Every output element is computed by the same sequence of operations
 * whatever the blocking or thread count, so results are bitwise identical
 * for any number of threads. */
#include "internal.h"
#include "rowops.h"

#include <omp.h>
#include <string.h>

/* Vector width follows the target: 16 lanes with AVX-512, else 8 (AVX2). */
#ifdef __AVX512F__
#define VW 16
#define NR 4
#else
#define VW 8
#define NR 3
#endif
/* Register tile of the matrix product: MR rows of A by NR rows of B. */
#define MR 4

typedef float vf __attribute__((vector_size(VW * 4)));
typedef float vfu __attribute__((vector_size(VW * 4), aligned(4)));
typedef uint16_t vh __attribute__((vector_size(VW * 2), aligned(2)));
typedef uint32_t vu __attribute__((vector_size(VW * 4)));

/* Tokens per retrieval block: S for one block is TB x 2n floats per thread. */
#define TB 32
/* Query columns per projection task. */
#define QCOLS 256

static inline vf loadv(const float *p) { return *(const vfu *)p; }

static inline vf loadv_bf16(const uint16_t *p) {
  vh h = *(const vh *)p;
  vu w = __builtin_convertvector(h, vu) << 16;
  vf f;
  memcpy(&f, &w, sizeof f);
  return f;
}

/* Sum of the lanes in one fixed order (pairwise halving). */
static inline float hsum(vf acc) {
  float s[VW];
  for (int i = 0; i < VW; i++) s[i] = acc[i];
  for (int w = VW / 2; w > 0; w /= 2)
    for (int i = 0; i < w; i++) s[i] += s[i + w];
  return s[0];
}

/* Lane sum, then the scalar tail: the single definition of a dot product's
 * rounding that every path uses. */
static inline float finish_dot(vf acc, const float *a, const float *b, int64_t k0, int64_t K) {
  float s = hsum(acc);
  for (int64_t k = k0; k < K; k++) s += a[k] * b[k];
  return s;
}

/* C[i, j] = A[i, :] . B[j, :] for i < M, j < N (K-long rows).  Full MR x NR
 * tiles keep their accumulators in registers; edges use the same per-element
 * arithmetic, so blocking never changes a result's bits. */
static void gemm_nt(int64_t M, int64_t N, int64_t K, const float *A, int64_t lda,
                    const float *B, int64_t ldb, float *C, int64_t ldc) {
  const int64_t KV = K - K % VW;
  for (int64_t j0 = 0; j0 < N; j0 += NR) {
    int64_t nj = N - j0 < NR ? N - j0 : NR;
    for (int64_t i0 = 0; i0 < M; i0 += MR) {
      int64_t ni = M - i0 < MR ? M - i0 : MR;
      if (ni == MR && nj == NR) {
        const float *a[MR], *b[NR];
        for (int r = 0; r < MR; r++) a[r] = A + (i0 + r) * lda;
        for (int c = 0; c < NR; c++) b[c] = B + (j0 + c) * ldb;
        vf acc[MR][NR];
        for (int r = 0; r < MR; r++)
          for (int c = 0; c < NR; c++) acc[r][c] = (vf){0};
        for (int64_t k = 0; k < KV; k += VW) {
          vf xa[MR];
          for (int r = 0; r < MR; r++) xa[r] = loadv(a[r] + k);
          for (int c = 0; c < NR; c++) {
            vf w = loadv(b[c] + k);
            for (int r = 0; r < MR; r++) acc[r][c] += xa[r] * w;
          }
        }
        for (int r = 0; r < MR; r++)
          for (int c = 0; c < NR; c++)
            C[(i0 + r) * ldc + j0 + c] = finish_dot(acc[r][c], a[r], b[c], KV, K);
        continue;
      }
      for (int64_t i = i0; i < i0 + ni; i++) {
        for (int64_t j = j0; j < j0 + nj; j++) {
          const float *a = A + i * lda, *b = B + j * ldb;
          vf acc = {0};
          for (int64_t k = 0; k < KV; k += VW) acc += loadv(a + k) * loadv(b + k);
          C[i * ldc + j] = finish_dot(acc, a, b, KV, K);
        }
      }
    }
  }
}

/* ------------------------------------------------------------- workspace */

static int n_threads_of(const peer_layer *L) {
  return L->opt.n_threads > 0 ? L->opt.n_threads : omp_get_max_threads();
}

static size_t round64(size_t b) { return (b + 63) & ~(size_t)63; }

/* Per-thread scratch: S for one token block (both halves) and the two
 * halves' top-k' lists. */
static size_t thread_scratch_bytes(const peer_dims *D) {
  return round64((size_t)TB * 2 * (size_t)D->n * sizeof(float)) +
         2 * round64((size_t)D->kp * (sizeof(float) + sizeof(int64_t)));
}

typedef struct cpu_ws {
  float *q;        /* [T, dq] */
  int64_t *ids;    /* [T, H, k] */
  float *scores;   /* [T, H, k] */
  float *gates;    /* [T, H, k] */
  char *per_thread;
  size_t per_thread_bytes;
} cpu_ws;

static size_t cpu_layout(const peer_layer *L, int64_t T, char *base, cpu_ws *w) {
  const peer_dims *D = &L->dims;
  size_t thk = (size_t)T * (size_t)(D->H * D->k);
  size_t off = 0;
  size_t q_off = off;
  off += round64((size_t)T * (size_t)D->dq * sizeof(float));
  size_t ids_off = off;
  off += round64(thk * sizeof(int64_t));
  size_t sc_off = off;
  off += round64(thk * sizeof(float));
  size_t g_off = off;
  off += round64(thk * sizeof(float));
  size_t pt_off = off;
  size_t pt = thread_scratch_bytes(D);
  off += pt * (size_t)n_threads_of(L);
  if (w) {
    w->q = (float *)(base + q_off);
    w->ids = (int64_t *)(base + ids_off);
    w->scores = (float *)(base + sc_off);
    w->gates = (float *)(base + g_off);
    w->per_thread = base + pt_off;
    w->per_thread_bytes = pt;
  }
  return off;
}

static size_t cpu_workspace_size(const peer_layer *L, int64_t T) {
  return cpu_layout(L, T, NULL, NULL);
}

/* ------------------------------------------------------------ phase 1 */

static void project_queries(const peer_layer *L, int64_t T, const float *x, float *q, int P) {
  const peer_dims *D = &L->dims;
  const float *W = L->slot[PEER_P_QUERY_WEIGHT].data;
  const float *bias = L->slot[PEER_P_QUERY_BIAS].data;
  const float *nw = L->slot[PEER_P_NORM_WEIGHT].data, *nb = L->slot[PEER_P_NORM_BIAS].data;
  const float *mean = L->slot[PEER_P_NORM_MEAN].data, *var = L->slot[PEER_P_NORM_VAR].data;
  int64_t n_tb = (T + TB - 1) / TB, n_cb = (D->dq + QCOLS - 1) / QCOLS;
#pragma omp parallel for collapse(2) schedule(static) num_threads(P)
  for (int64_t tb = 0; tb < n_tb; tb++) {
    for (int64_t cb = 0; cb < n_cb; cb++) {
      int64_t t0 = tb * TB, c0 = cb * QCOLS;
      int64_t nt = T - t0 < TB ? T - t0 : TB;
      int64_t nc = D->dq - c0 < QCOLS ? D->dq - c0 : QCOLS;
      float *out = q + t0 * D->dq + c0;
      gemm_nt(nt, nc, D->d, x + t0 * D->d, D->d, W + c0 * D->d, D->d, out, D->dq);
      for (int64_t t = 0; t < nt; t++) {
        float *row = out + t * D->dq;
        if (bias)
          for (int64_t c = 0; c < nc; c++) row[c] += bias[c0 + c];
        if (nw)
          for (int64_t c = 0; c < nc; c++) {
            int64_t f = c0 + c;
            row[c] = (row[c] - mean[f]) / sqrtf(var[f] + 1e-5f) * nw[f] + nb[f];
          }
      }
    }
  }
}

/* ------------------------------------------------------------ phase 2 */

typedef struct retrieve_out {
  int64_t *ids;
  float *scores, *gates;
} retrieve_out;

/* Smallest failing token, for a deterministic message. */
static void note_bad(int64_t *bad_token, int *bad_head, int64_t t, int h) {
#pragma omp critical(peer_bad)
  if (t < *bad_token || (t == *bad_token && h < *bad_head)) {
    *bad_token = t;
    *bad_head = h;
  }
}

/* Exhaustive scan of all n*n sums, in id order (so ties keep the smaller id). */
static int brute_head(const float *s1, const float *s2, int64_t n, int k, float *out_s,
                      int64_t *out_id) {
  int count = 0, bad = 0;
  for (int64_t a = 0; a < n; a++) {
    for (int64_t b = 0; b < n; b++) {
      float c = s1[a] + s2[b];
      bad |= !isfinite(c);
      if (count < k || c > out_s[k - 1]) peer_list_insert(out_s, out_id, k, &count, c, a * n + b);
    }
  }
  return bad;
}

static peer_status retrieve_all(const peer_layer *L, int64_t T, const float *q, bool brute,
                                retrieve_out out, const cpu_ws *w, int P) {
  const peer_dims *D = &L->dims;
  const float *keys = L->slot[PEER_P_KEYS].data;
  const int64_t n = D->n, half = D->half, H = D->H;
  const int k = (int)D->k, kp = (int)D->kp;
  int64_t n_tb = (T + TB - 1) / TB;
  int64_t bad_token = T;
  int bad_head = 0;
#pragma omp parallel for collapse(2) schedule(static) num_threads(P)
  for (int64_t tb = 0; tb < n_tb; tb++) {
    for (int64_t h = 0; h < H; h++) {
      char *scratch = w->per_thread + (size_t)omp_get_thread_num() * w->per_thread_bytes;
      float *S = (float *)scratch; /* [nt, 2, n] */
      char *lists = scratch + round64((size_t)TB * 2 * (size_t)n * sizeof(float));
      size_t list_bytes = round64((size_t)kp * (sizeof(float) + sizeof(int64_t)));
      int64_t *a1 = (int64_t *)lists, *a2 = (int64_t *)(lists + list_bytes);
      float *s1 = (float *)(a1 + kp), *s2 = (float *)(a2 + kp);

      int64_t t0 = tb * TB, nt = T - t0 < TB ? T - t0 : TB;
      int64_t g = L->cfg.shared_keys ? 0 : h;
      for (int p = 0; p < 2; p++) {
        const float *C = keys + ((g * 2 + p) * n) * half;
        const float *A = q + t0 * D->dq + h * D->dk + p * half;
        gemm_nt(nt, n, half, A, D->dq, C, half, S + p * n, 2 * n);
      }
      for (int64_t t = 0; t < nt; t++) {
        const float *row1 = S + t * 2 * n, *row2 = row1 + n;
        size_t o = (size_t)((t0 + t) * H + h) * (size_t)k;
        int bad;
        if (brute) {
          bad = brute_head(row1, row2, n, k, out.scores + o, out.ids + o);
        } else {
          bad = peer_topk_scan(row1, (int)n, kp, s1, a1);
          bad |= peer_topk_scan(row2, (int)n, kp, s2, a2);
          bad |= peer_merge_candidates(s1, a1, s2, a2, kp, k, n, out.scores + o, out.ids + o);
        }
        if (bad) note_bad(&bad_token, &bad_head, t0 + t, (int)h);
        if (out.gates) peer_gates((int)L->cfg.gate, out.scores + o, k, out.gates + o);
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

/* Smallest token whose x row holds NaN or infinity, or T. */
static int64_t first_nonfinite_row(const float *x, int64_t T, int64_t d, int P) {
  int64_t first = T;
#pragma omp parallel for reduction(min : first) schedule(static) num_threads(P)
  for (int64_t t = 0; t < T; t++) {
    int ok = 1;
    for (int64_t i = 0; i < d; i++) ok &= isfinite(x[t * d + i]) != 0;
    if (!ok && t < first) first = t;
  }
  return first;
}

static peer_status queries_and_retrieval(const peer_layer *L, int64_t T, const float *x,
                                         bool brute, retrieve_out out, const cpu_ws *w,
                                         int P) {
  int64_t bad = first_nonfinite_row(x, T, L->dims.d, P);
  if (bad < T)
    return peer_fail(PEER_ERR_NONFINITE, "token %lld: x holds NaN or infinity", (long long)bad);
  project_queries(L, T, x, w->q, P);
  return retrieve_all(L, T, w->q, brute, out, w, P);
}

/* ------------------------------------------------------------ phase 3 */

/* Lines of the next expert's rows are fetched while this one is computed. */
static inline void prefetch_row(const char *p, size_t bytes) {
  for (size_t o = 0; o < bytes; o += 64) __builtin_prefetch(p + o, 0, 0);
}

static inline float dot_row_f32(const float *u, const float *x, int64_t d) {
  const int64_t dv = d - d % VW;
  vf acc = {0};
  for (int64_t i = 0; i < dv; i += VW) acc += loadv(u + i) * loadv(x + i);
  return finish_dot(acc, u, x, dv, d);
}

static inline void axpy_row_f32(float a, const float *v, float *y, int64_t d) {
  const int64_t dv = d - d % VW;
  for (int64_t i = 0; i < dv; i += VW) *(vfu *)(y + i) = loadv(y + i) + a * loadv(v + i);
  for (int64_t i = dv; i < d; i++) y[i] += a * v[i];
}

static inline float dot_row_bf16(const uint16_t *u, const float *x, int64_t d) {
  const int64_t dv = d - d % VW;
  vf acc = {0};
  for (int64_t i = 0; i < dv; i += VW) acc += loadv_bf16(u + i) * loadv(x + i);
  float s = hsum(acc);
  for (int64_t i = dv; i < d; i++) s += peer_bf16_to_f32(u[i]) * x[i];
  return s;
}

static inline void axpy_row_bf16(float a, const uint16_t *v, float *y, int64_t d) {
  const int64_t dv = d - d % VW;
  for (int64_t i = 0; i < dv; i += VW) *(vfu *)(y + i) = loadv(y + i) + a * loadv_bf16(v + i);
  for (int64_t i = dv; i < d; i++) y[i] += a * peer_bf16_to_f32(v[i]);
}

static void apply_experts(const peer_layer *L, int64_t T, const float *x, float *y,
                          const int64_t *ids, const float *gates, int P) {
  const peer_dims *D = &L->dims;
  const int64_t d = D->d, hk = D->H * D->k;
  const int act = (int)L->cfg.activation;
  const bool bf16 = L->cfg.weight_dtype == PEER_BF16;
  const size_t row_bytes = (size_t)d * (bf16 ? 2 : 4);
  const char *down = L->slot[PEER_P_EXPERTS_DOWN].data, *up = L->slot[PEER_P_EXPERTS_UP].data;
#pragma omp parallel for schedule(static) num_threads(P)
  for (int64_t t = 0; t < T; t++) {
    const float *xt = x + t * d;
    float *yt = y + t * d;
    const int64_t *id = ids + t * hk;
    const float *g = gates + t * hk;
    memset(yt, 0, (size_t)d * sizeof(float));
    prefetch_row(down + (size_t)id[0] * row_bytes, row_bytes);
    prefetch_row(up + (size_t)id[0] * row_bytes, row_bytes);
    for (int64_t e = 0; e < hk; e++) {
      if (e + 1 < hk) {
        prefetch_row(down + (size_t)id[e + 1] * row_bytes, row_bytes);
        prefetch_row(up + (size_t)id[e + 1] * row_bytes, row_bytes);
      }
      const char *u = down + (size_t)id[e] * row_bytes, *v = up + (size_t)id[e] * row_bytes;
      if (bf16) {
        float a = g[e] * peer_activate(act, dot_row_bf16((const uint16_t *)u, xt, d));
        axpy_row_bf16(a, (const uint16_t *)v, yt, d);
      } else {
        float a = g[e] * peer_activate(act, dot_row_f32((const float *)u, xt, d));
        axpy_row_f32(a, (const float *)v, yt, d);
      }
    }
  }
}

/* ------------------------------------------------------------ entry points */

static peer_status cpu_retrieve(peer_layer *L, int64_t T, const float *x, int64_t *indices,
                                float *scores, float *gates, bool brute, void *ws) {
  cpu_ws w;
  cpu_layout(L, T, ws, &w);
  retrieve_out out = {indices, scores ? scores : w.scores, gates};
  return queries_and_retrieval(L, T, x, brute, out, &w, n_threads_of(L));
}

static peer_status cpu_forward(peer_layer *L, int64_t T, const float *x, float *y,
                               int64_t *indices, float *gates, void *ws) {
  cpu_ws w;
  cpu_layout(L, T, ws, &w);
  int P = n_threads_of(L);
  retrieve_out out = {indices ? indices : w.ids, w.scores, gates ? gates : w.gates};
  peer_status st = queries_and_retrieval(L, T, x, false, out, &w, P);
  if (st) return st;
  apply_experts(L, T, x, y, out.ids, out.gates, P);
  return PEER_OK;
}

const peer_backend_i peer_backend_cpu = {
    .name = "cpu",
    .alloc = peer_alloc,
    .free = peer_free,
    .workspace_size = cpu_workspace_size,
    .forward = cpu_forward,
    .retrieve = cpu_retrieve,
};
