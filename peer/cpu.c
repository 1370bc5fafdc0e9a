/* cpu.c: the CPU backend.  A batch goes through three phases, each threaded
 * over independent pieces of work (peer/pool.h):
 *   1. queries:  Q = X Wq^T (+ b, batch norm), a blocked matrix product;
 *   2. retrieval: per (token block, head), the sub-key scores S = Q_half C^T
 *      (blocked matrix product), top-k' per half (for k' <= 64 selected from
 *      the product's registers, S never stored), exact Cartesian merge, gates;
 *   3. experts:  per token, gather the H*k rows u_i, v_i and accumulate.
 * Every output element is computed by the same sequence of operations
 * whatever the blocking or thread count, so results are bitwise identical
 * for any number of threads. */
#include "cpu.h"
#include "pool.h"
#include "rowops.h"

#ifndef PEER_CPU_VARIANT
#error "cpu.c is compiled once per instruction-set variant, with PEER_CPU_VARIANT set (cpu.h)"
#endif

/* One register tile of the products: rows j0..j0+mr of B against nv vectors
 * of packed tokens, into acc.  Inlined with constant mr, nv so that the
 * accumulators live in registers.  The one home of the scores' FMA chain:
 * the matrix product and the fused selection below both call it. */
static inline __attribute__((always_inline)) void tile_products(int mr, int nv, int64_t K,
                                                                const float *pack,
                                                                const float *B, int64_t ldb,
                                                                vf acc[MRK][NVT]) {
  for (int r = 0; r < mr; r++)
    for (int v = 0; v < nv; v++) acc[r][v] = (vf){0};
  for (int64_t k = 0; k < K; k++) {
    vf a[NVT];
    for (int v = 0; v < nv; v++) a[v] = loadv(pack + k * TB + v * VW);
    for (int r = 0; r < mr; r++) {
      vf b = B[r * ldb + k] - (vf){0};
      for (int v = 0; v < nv; v++) acc[r][v] = vfma(a[v], b, acc[r][v]);
    }
  }
}

static inline __attribute__((always_inline)) void gemm_tile(int mr, int nv, int64_t M,
                                                            int64_t K, const float *pack,
                                                            const float *B, int64_t ldb,
                                                            float *C, int64_t ldc) {
  vf acc[MRK][NVT];
  tile_products(mr, nv, K, pack, B, ldb, acc);
  /* Scatter to C[token][row]; full vectors without per-lane bound checks. */
  for (int v = 0; v < nv; v++) {
    float *Cv = C + (int64_t)v * VW * ldc;
    if (M - (int64_t)v * VW >= VW) {
      for (int l = 0; l < VW; l++)
        for (int r = 0; r < mr; r++) Cv[l * ldc + r] = acc[r][v][l];
    } else {
      for (int l = 0; l < M - v * VW; l++)
        for (int r = 0; r < mr; r++) Cv[l * ldc + r] = acc[r][v][l];
    }
  }
}

/* C[i, j] = sum over k of A[i, k] * B[j, k], for i < M <= TB and j < N.
 * Every element is one chain of multiply-adds in k order from 0 (contracted
 * to FMA like all of the library's code), whatever the tile that computes it,
 * so blocking and batch position never change a result's bits.  The block's
 * rows of A are first packed transposed into `pack` (K x TB floats) so the
 * tile vectorises over tokens and broadcasts B. */
static void pack_tokens(int64_t M, int64_t K, const float *A, int64_t lda, float *pack) {
  int nv = (int)((M + VW - 1) / VW);
  for (int64_t k = 0; k < K; k++)
    for (int64_t i = 0; i < nv * VW; i++) pack[k * TB + i] = i < M ? A[i * lda + k] : 0.0f;
}

void peer_cpu_gemm_nt(int64_t M, int64_t N, int64_t K, const float *A, int64_t lda,
                    const float *B, int64_t ldb, float *C, int64_t ldc, float *pack) {
  int nv = (int)((M + VW - 1) / VW);
  pack_tokens(M, K, A, lda, pack);
  for (int64_t j = 0; j < N; j += MRK) {
    int mr = N - j < MRK ? (int)(N - j) : MRK;
    const float *Bj = B + j * ldb;
    /* the tile's rows of B stay in L1 while every token group passes */
    for (int v0 = 0; v0 < nv; v0 += NVT) {
      const float *P = pack + v0 * VW;
      float *Cv = C + (int64_t)v0 * VW * ldc + j;
      int64_t Mv = M - (int64_t)v0 * VW;
      if (mr == MRK && nv - v0 >= NVT) gemm_tile(MRK, NVT, Mv, K, P, Bj, ldb, Cv, ldc);
      else if (nv - v0 >= NVT) gemm_tile(mr, NVT, Mv, K, P, Bj, ldb, Cv, ldc);
      else gemm_tile(mr, 1, Mv, K, P, Bj, ldb, Cv, ldc);
    }
  }
}

/* ------------------------------------------------------------- workspace */

/* The f32 path fuses top-k' selection into the sub-key scoring for k' up to
 * FUSED_KP_MAX (score_select below); a block's lists then take S's place. */
#define FUSED_KP_MAX 64

/* Entries between two lists: k' rounded up to whole vectors. */
static inline int64_t fused_list_stride(int64_t kp) { return (kp + VW - 1) / VW * VW; }

/* Bytes of one block's lists: TB tokens x 2 halves, scores and ids. */
static size_t fused_lists_bytes(const peer_dims *D) {
  if (D->kp > FUSED_KP_MAX) return 0;
  return round64((size_t)(TB * 2 * fused_list_stride(D->kp)) * (sizeof(float) + sizeof(int64_t)));
}

int peer_cpu_threads(const peer_layer *L) { return peer_layer_threads(L); }



/* Per-thread scratch: S for one token block (both halves), the two halves'
 * top-k' lists (the third list's floats hold candidates' rounding errors),
 * and the packing buffer. */
static size_t pack_bytes(const peer_dims *D) {
  int64_t K = D->d > D->half ? D->d : D->half;
  return round64((size_t)K * TB * sizeof(float));
}

/* S (or, in its place, the fused path's lists), then the lists, then
 * cpu_bf16.c's scratch where this variant has it. */
static size_t s_bytes(const peer_dims *D) {
  size_t s = round64((size_t)TB * (size_t)peer_cpu_s_stride(D->n) * sizeof(float));
  return s > fused_lists_bytes(D) ? s : fused_lists_bytes(D);
}

static size_t s_and_lists_bytes(const peer_dims *D) {
  return s_bytes(D) + 3 * round64((size_t)D->kp * (sizeof(float) + sizeof(int64_t)));
}

static size_t thread_scratch_bytes(const peer_dims *D) {
#ifdef __AVX512BF16__
  return s_and_lists_bytes(D) + peer_cpu_bf16_scratch_bytes(D) + pack_bytes(D);
#else
  return s_and_lists_bytes(D) + pack_bytes(D);
#endif
}


static size_t cpu_layout(const peer_layer *L, int64_t T, char *base, cpu_ws *w) {
  const peer_dims *D = &L->dims;
  size_t thk = (size_t)T * (size_t)(D->H * D->k);
  size_t off = 0;
  size_t q_off = off;
  off += round64((size_t)T * (size_t)peer_cpu_q_stride(D) * sizeof(float));
  size_t ids_off = off;
  off += round64(thk * sizeof(int64_t));
  size_t sc_off = off;
  off += round64(thk * sizeof(float));
  size_t g_off = off;
  off += round64(thk * sizeof(float));
  size_t pt_off = off;
  size_t pt = thread_scratch_bytes(D);
  off += pt * (size_t)peer_cpu_threads(L);
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

/* The calling thread's packing buffer: the tail of its scratch. */
void peer_cpu_layout(const peer_layer *L, int64_t T, void *base, cpu_ws *w) {
  cpu_layout(L, T, base, w);
}

float *peer_cpu_thread_pack(const cpu_ws *w, const peer_dims *D) {
  char *mine = w->per_thread + (size_t)peer_parallel_slot() * w->per_thread_bytes;
  return (float *)(mine + w->per_thread_bytes - pack_bytes(D));
}

/* ------------------------------------------------------------ phase 1 */

typedef struct {
  const peer_dims *D;
  int64_t T, n_tb, ldq;
  const float *x, *W, *bias;
  float *q;
  const cpu_ws *w;
} project_job;

static void project_item(void *job, int64_t item, int slot) {
  const project_job *j = job;
  const peer_dims *D = j->D;
  (void)slot;
  int64_t cb = item / j->n_tb, tb = item % j->n_tb;
  int64_t t0 = tb * TB, c0 = cb * QCOLS;
  int64_t nt = j->T - t0 < TB ? j->T - t0 : TB;
  int64_t nc = D->dq - c0 < QCOLS ? D->dq - c0 : QCOLS;
  float *out = j->q + t0 * j->ldq + c0;
  peer_cpu_gemm_nt(nt, nc, D->d, j->x + t0 * D->d, D->d, j->W + c0 * D->d, D->d, out, j->ldq,
                   peer_cpu_thread_pack(j->w, D));
  if (j->bias)
    for (int64_t t = 0; t < nt; t++)
      for (int64_t c = 0; c < nc; c++) out[t * j->ldq + c] += j->bias[c0 + c];
}

void peer_cpu_project(const peer_layer *L, int64_t T, const float *x, float *q, int64_t ldq,
                      const cpu_ws *w, int P) {
  const peer_dims *D = &L->dims;
  int64_t n_tb = (T + TB - 1) / TB, n_cb = (D->dq + QCOLS - 1) / QCOLS;
  /* Column blocks outermost: a thread's consecutive tasks share a block of
   * Wq, which stays in cache across token blocks.  A thread that loses its
   * core holds back only the task it is in (pool.h). */
  project_job j = {D, T, n_tb, ldq, x, L->slot[PEER_P_QUERY_WEIGHT].data,
                   L->slot[PEER_P_QUERY_BIAS].data, q, w};
  peer_parallel(P, n_cb * n_tb, project_item, &j);
}

typedef struct {
  const peer_layer *L;
  float *q;
  int64_t ldq;
} normalize_job;

static void normalize_tokens(void *job, int64_t t0, int64_t t1, int slot) {
  const normalize_job *j = job;
  (void)slot;
  for (int64_t t = t0; t < t1; t++) peer_cpu_norm_running(j->L, j->q + t * j->ldq, 0, j->L->dims.dq);
}

/* Inference batch norm: the running statistics. */
static void normalize_running(const peer_layer *L, int64_t T, float *q, int64_t ldq, int P) {
  normalize_job j = {L, q, ldq};
  peer_parallel_ranges(P, T, 16, normalize_tokens, &j);
}

/* ------------------------------------------------------------ phase 2 */


static inline vf vmax(vf a, vf b) {
  vi gt = a > b;
  return (vf)((gt & (vi)a) | (~gt & (vi)b));
}

/* Bit l set when lane l of m is set. */
static inline unsigned lane_mask(vi m) {
#if defined(__AVX512F__)
  return (unsigned)_mm512_movepi32_mask((__m512i)m);
#elif defined(__AVX__)
  return (unsigned)_mm256_movemask_ps((__m256)m);
#else
  unsigned bits = 0;
  for (int l = 0; l < VW; l++) bits |= (m[l] != 0) << l;
  return bits;
#endif
}

static inline bool any_lane(vi m) {
  uint64_t w[VW / 2], acc = 0;
  memcpy(w, &m, sizeof w);
  for (int i = 0; i < VW / 2; i++) acc |= w[i];
  return acc != 0;
}

/* Vectors per group in the threshold pass of topk_scan_fast, and the largest
 * k' it handles (beyond, the plain scan). */
#define SCAN_GROUP 16
#define SCAN_KP_MAX 256

/* peer_topk_scan's result, faster (declared in cpu.h).  A first pass takes lane-wise maxima over
 * groups of SCAN_GROUP vectors: each lane of a group is the maximum of its
 * own SCAN_GROUP scores, so these maxima summarise disjoint sets.  If tau is
 * the kp-th largest of them, kp disjoint sets hold a score >= tau, so every
 * member of the top-kp is >= tau.  The second pass inserts, in index order
 * and by the tie rule, only the scores >= tau: usually little more than kp.
 * Returns 1 if a score is non-finite, as peer_topk_scan. */
int peer_cpu_topk_scan(const float *s, int n, int kp, float *out_s, int64_t *out_id) {
  const int group = VW * SCAN_GROUP, n_groups = n / group;
  if (n_groups < 1 || n_groups * VW < kp || kp > SCAN_KP_MAX)
    return peer_topk_scan(s, n, kp, out_s, out_id);
  vi badv = {0};
  /* kp largest group maxima, descending (values only; ties are harmless) */
  float best[SCAN_KP_MAX];
  for (int i = 0; i < kp; i++) best[i] = -INFINITY;
  for (int gi = 0; gi < n_groups; gi++) {
    const float *p = s + gi * group;
    vf m = loadv(p);
    for (int r = 0; r < SCAN_GROUP; r++) {
      vf v = loadv(p + r * VW);
      badv |= (v - v) != 0; /* NaN and infinity give NaN */
      m = vmax(v, m);
    }
    for (int l = 0; l < VW; l++) {
      float v = m[l];
      if (!(v > best[kp - 1])) continue;
      int pos = kp - 1;
      while (pos > 0 && v > best[pos - 1]) best[pos] = best[pos - 1], pos--;
      best[pos] = v;
    }
  }
  const float tau = best[kp - 1];
  const vf tauv = tau - (vf){0};
  int count = 0, bad = 0;
  for (int i = 0; i < n_groups * group; i += VW) {
    /* visit only the lanes >= tau, in index order */
    for (unsigned m = lane_mask(loadv(s + i) >= tauv); m; m &= m - 1) {
      int l = __builtin_ctz(m);
      float v = s[i + l];
      if (count < kp || v > out_s[kp - 1]) peer_list_insert(out_s, out_id, kp, &count, v, i + l);
    }
  }
  for (int i = n_groups * group; i < n; i++) {
    bad |= !isfinite(s[i]);
    if (s[i] >= tau && (count < kp || s[i] > out_s[kp - 1]))
      peer_list_insert(out_s, out_id, kp, &count, s[i], i);
  }
  return bad | any_lane(badv);
}

/* ------------------------------------------- scores fused with top-k' */

/* For k' up to FUSED_KP_MAX the f32 path selects each half's top-k' while the
 * sub-key scores are still in the product's registers (issue 15 item 3),
 * instead of storing S and scanning it.  Every token (a vector lane of the
 * tile) keeps a running top-k' list sorted by the tie rule and its last score
 * as a threshold; a tile compares its scores against the thresholds of its
 * lanes, and only the lanes above enter their token's list.  Sub-keys arrive
 * in index order (tiles by rising j, rows within a tile in order), so a
 * newcomer's id is larger than every listed id and it beats an entry exactly
 * when its score is larger: peer_topk_scan's rule, hence its ids and scores.
 * The lists start full of -infinity (ids 0..k'-1, in range whatever comes),
 * which every finite score beats. */
/* Sub-key j with score x enters the list (sc, id) of kp entries if it beats
 * the last one (see above); returns the list's new last score. */
static inline float fused_insert(float *sc, int64_t *id, int kp, float x, int64_t j) {
#if defined(__AVX512F__)
  if (kp <= VW) { /* the list is one vector: shift its tail by one lane */
    __m512 L = _mm512_loadu_ps(sc), xv = _mm512_set1_ps(x);
    __mmask16 gt = _mm512_cmp_ps_mask(xv, L, _CMP_GT_OQ) & (__mmask16)((1u << kp) - 1u);
    if (!gt) return sc[kp - 1];
    unsigned at = 1u << __builtin_ctz(gt);
    __m512i Li = _mm512_castps_si512(L);
    L = _mm512_mask_mov_ps(L, gt, _mm512_castsi512_ps(_mm512_alignr_epi32(Li, Li, 15)));
    _mm512_storeu_ps(sc, _mm512_mask_mov_ps(L, (__mmask16)at, xv));
    __m512i I0 = _mm512_loadu_si512(id), I1 = _mm512_loadu_si512(id + 8);
    __m512i S1 = _mm512_alignr_epi64(I1, I0, 7), S0 = _mm512_alignr_epi64(I0, I0, 7);
    I0 = _mm512_mask_mov_epi64(I0, (__mmask8)gt, S0);
    I1 = _mm512_mask_mov_epi64(I1, (__mmask8)(gt >> 8), S1);
    I0 = _mm512_mask_set1_epi64(I0, (__mmask8)at, j);
    I1 = _mm512_mask_set1_epi64(I1, (__mmask8)(at >> 8), j);
    _mm512_storeu_si512(id, I0);
    _mm512_storeu_si512(id + 8, I1);
    return sc[kp - 1];
  }
#endif
  if (x > sc[kp - 1]) {
    int count = kp;
    peer_list_insert(sc, id, kp, &count, x, j);
  }
  return sc[kp - 1];
}

/* One tile of the fused product: the products of rows j0..j0+mr against
 * token vectors v0..v0+nv (tile_products), then each score above its token's
 * threshold tau enters that token's list (token t's at ls + t*ldl, lid +
 * t*ldl).  nan_bits collects x - x per lane: 0 for finite scores. */
static inline __attribute__((always_inline)) void select_tile(
    int mr, int nv, int64_t K, const float *pack, const float *B, int64_t ldb, int64_t j0,
    int v0, const unsigned *valid, float *tau, float *ls, int64_t *lid, int64_t ldl, int kp,
    vi *nan_bits) {
  vf acc[MRK][NVT];
  tile_products(mr, nv, K, pack, B, ldb, acc);
  for (int v = 0; v < nv; v++) {
    const int tv0 = (v0 + v) * VW;
    const vf tv = loadv(tau + tv0);
    for (int r = 0; r < mr; r++) {
      nan_bits[v0 + v] |= (vi)(acc[r][v] - acc[r][v]);
      for (unsigned m = lane_mask(acc[r][v] > tv) & valid[v0 + v]; m; m &= m - 1) {
        const int t = tv0 + __builtin_ctz(m);
        tau[t] = fused_insert(ls + t * ldl, lid + t * ldl, kp, acc[r][v][__builtin_ctz(m)],
                              j0 + r);
      }
    }
  }
}

/* The top-k' lists of one half for M <= TB tokens whose query halves are the
 * rows of A (lda apart), against the n sub-keys B (K floats each): token t's
 * list at ls + t*ldl and lid + t*ldl, exactly peer_cpu_topk_scan's result on
 * the scores peer_cpu_gemm_nt computes.  Returns a bit per token whose
 * scores hold a non-finite value. */
static uint32_t score_select(int64_t M, int64_t n, int64_t K, const float *A, int64_t lda,
                             const float *B, int kp, float *ls, int64_t *lid, int64_t ldl,
                             float *pack) {
  _Static_assert(TB <= 32, "one bit per token of a block");
  const int nv = (int)((M + VW - 1) / VW);
  pack_tokens(M, K, A, lda, pack);
  float tau[TB] __attribute__((aligned(64)));
  unsigned valid[NVMAX] = {0};
  vi nan_bits[NVMAX] = {{0}};
  for (int t = 0; t < TB; t++) tau[t] = -INFINITY;
  for (int v = 0; v < nv; v++) {
    int64_t lanes = M - v * VW < VW ? M - v * VW : VW;
    valid[v] = (1u << lanes) - 1u;
  }
  for (int64_t t = 0; t < M; t++)
    for (int i = 0; i < kp; i++) ls[t * ldl + i] = -INFINITY, lid[t * ldl + i] = i;
  for (int64_t j = 0; j < n; j += MRK) {
    int mr = n - j < MRK ? (int)(n - j) : MRK;
    const float *Bj = B + j * K;
    for (int v0 = 0; v0 < nv; v0 += NVT) {
      const float *P = pack + v0 * VW;
      if (mr == MRK && nv - v0 >= NVT)
        select_tile(MRK, NVT, K, P, Bj, K, j, v0, valid, tau, ls, lid, ldl, kp, nan_bits);
      else if (nv - v0 >= NVT)
        select_tile(mr, NVT, K, P, Bj, K, j, v0, valid, tau, ls, lid, ldl, kp, nan_bits);
      else select_tile(mr, 1, K, P, Bj, K, j, v0, valid, tau, ls, lid, ldl, kp, nan_bits);
    }
  }
  uint32_t bad = 0;
  for (int v = 0; v < nv; v++)
    bad |= (uint32_t)(lane_mask(nan_bits[v] != 0) & valid[v]) << (v * VW);
  return bad;
}

/* The smallest failing (token, head) as token * H + head: a deterministic
 * message whichever thread meets which failure first. */
static void note_bad(_Atomic int64_t *bad, int64_t th) {
  int64_t cur = atomic_load_explicit(bad, memory_order_relaxed);
  while (th < cur && !atomic_compare_exchange_weak(bad, &cur, th)) {
  }
}

/* Exhaustive scan of all n*n sums in id order, in the candidate order of
 * peer_pair_beats (exact sums; ties keep the smaller, earlier id). */
static int brute_head(const float *s1, const float *s2, int64_t n, int k, float *out_s,
                      float *lo, int64_t *out_id) {
  int count = 0, bad = 0;
  for (int64_t a = 0; a < n; a++) {
    for (int64_t b = 0; b < n; b++) {
      float c, l;
      peer_two_sum(s1[a], s2[b], &c, &l);
      bad |= !isfinite(c) || !isfinite(l);
      if (count < k || c > out_s[k - 1] || (c == out_s[k - 1] && l > lo[k - 1]))
        peer_pair_insert(out_s, lo, out_id, k, &count, c, l, a * n + b);
    }
  }
  return bad;
}

typedef struct {
  peer_layer *L;
  int64_t T, n_tb, ldq;
  const float *q;
  bool brute, bf16_ok;
  retrieve_out out;
  const cpu_ws *w;
  _Atomic int64_t bad, n_bf16, n_fallback;
} retrieve_job;

/* Item h * n_tb + tb: head h of token block tb.  Heads outermost: a
 * thread's consecutive items share one head's sub-keys, which stay in cache
 * across token blocks. */
static void retrieve_item(void *job, int64_t item, int slot) {
  retrieve_job *j = job;
  peer_layer *L = j->L;
  const peer_dims *D = &L->dims;
  const float *keys = L->slot[PEER_P_KEYS].data, *q = j->q;
  const int64_t n = D->n, half = D->half, H = D->H, T = j->T, ldq = j->ldq;
  const int k = (int)D->k, kp = (int)D->kp;
  const bool brute = j->brute, bf16_ok = j->bf16_ok;
  const retrieve_out out = j->out;
  const cpu_ws *w = j->w;
  const int64_t h = item / j->n_tb, tb = item % j->n_tb;
  int64_t n_bf16 = 0, n_fallback = 0;
  char *scratch = w->per_thread + (size_t)slot * w->per_thread_bytes;
  float *S = (float *)scratch; /* [nt, 2, n], rows ls apart */
  const int64_t ls = peer_cpu_s_stride(n);
  char *lists = scratch + s_bytes(D);
  size_t list_bytes = round64((size_t)kp * (sizeof(float) + sizeof(int64_t)));
  int64_t *a1 = (int64_t *)lists, *a2 = (int64_t *)(lists + list_bytes);
  float *s1 = (float *)(a1 + kp), *s2 = (float *)(a2 + kp);
  float *lo = (float *)(lists + 2 * list_bytes);

  int64_t t0 = tb * TB, nt = T - t0 < TB ? T - t0 : TB;
  int64_t g = L->cfg.shared_keys ? 0 : h;
  const bool bf16 = bf16_ok && nt <= peer_cpu_first_pass_max_nt(L);
  const bool fused = !brute && !bf16 && kp <= FUSED_KP_MAX;
  float *lists_s = NULL;
  int64_t *lists_id = NULL;
  int64_t lists_ld = kp; /* entries between the lists of (token, half) */
  int list_bad[TB] = {0};
  if (fused) {
    lists_ld = fused_list_stride(kp);
    lists_s = S;
    lists_id = (int64_t *)(S + TB * 2 * lists_ld);
    for (int p = 0; p < 2; p++) {
      const float *C = keys + ((g * 2 + p) * n) * half;
      const float *A = q + t0 * ldq + h * D->dk + p * half;
      uint32_t bad = score_select(nt, n, half, A, ldq, C, kp, lists_s + p * lists_ld,
                                  lists_id + p * lists_ld, 2 * lists_ld,
                                  peer_cpu_thread_pack(w, D));
      for (int64_t t = 0; t < nt; t++) list_bad[t] |= (int)((bad >> t) & 1u);
    }
  } else if (bf16) {
#ifdef __AVX512BF16__
    peer_cpu_bf16_lists(L, h, nt, q + t0 * ldq, ldq, S, ls, scratch + s_and_lists_bytes(D),
                        &lists_s, &lists_id, list_bad, peer_cpu_thread_pack(w, D), &n_bf16,
                        &n_fallback);
#endif
  } else {
    for (int p = 0; p < 2; p++) {
      const float *C = keys + ((g * 2 + p) * n) * half;
      const float *A = q + t0 * ldq + h * D->dk + p * half;
      peer_cpu_gemm_nt(nt, n, half, A, ldq, C, half, S + p * n, ls,
                       peer_cpu_thread_pack(w, D));
    }
  }
  for (int64_t t = 0; t < nt; t++) {
    const float *row1 = S + t * ls, *row2 = row1 + n;
    size_t o = (size_t)((t0 + t) * H + h) * (size_t)k;
    int bad;
    if (brute) {
      bad = brute_head(row1, row2, n, k, out.scores + o, lo, out.ids + o);
    } else if (bf16 || fused) {
      const int64_t r = 2 * t * lists_ld;
      bad = list_bad[t];
      bad |= peer_merge_candidates(lists_s + r, lists_id + r, lists_s + r + lists_ld,
                                   lists_id + r + lists_ld, kp, k, n, out.scores + o, lo,
                                   out.ids + o);
    } else {
      bad = peer_cpu_topk_scan(row1, (int)n, kp, s1, a1);
      bad |= peer_cpu_topk_scan(row2, (int)n, kp, s2, a2);
      bad |= peer_merge_candidates(s1, a1, s2, a2, kp, k, n, out.scores + o, lo,
                                   out.ids + o);
    }
    if (bad) note_bad(&j->bad, (t0 + t) * H + h);
    if (out.gates) peer_gates((int)L->cfg.gate, out.scores + o, k, out.gates + o);
  }
  if (n_bf16) atomic_fetch_add_explicit(&j->n_bf16, n_bf16, memory_order_relaxed);
  if (n_fallback) atomic_fetch_add_explicit(&j->n_fallback, n_fallback, memory_order_relaxed);
}

peer_status peer_cpu_retrieve_all(peer_layer *L, int64_t T, const float *q, int64_t ldq,
                                  bool brute,
                                  retrieve_out out, const cpu_ws *w, int P) {
  const int64_t n_tb = (T + TB - 1) / TB, H = L->dims.H;
#ifdef __AVX512BF16__
  const int64_t last_nt = T - (n_tb - 1) * TB; /* only the last block can be short */
  const bool bf16_ok =
      !brute && peer_cpu_keys16_ready(L, P) && last_nt <= peer_cpu_first_pass_max_nt(L);
#else
  const bool bf16_ok = false;
#endif
  retrieve_job j = {L, T, n_tb, ldq, q, brute, bf16_ok, out, w, T * H, 0, 0};
  peer_parallel(P, H * n_tb, retrieve_item, &j);
  int64_t n_bf16 = atomic_load(&j.n_bf16), n_fallback = atomic_load(&j.n_fallback);
  int64_t bad_token = atomic_load(&j.bad) / H;
  int bad_head = (int)(atomic_load(&j.bad) % H);
  peer_cpu_count_first_pass(L, n_bf16, n_fallback);
  if (bad_token < T) return peer_cpu_fail_nonfinite_score(bad_token, bad_head);
  return PEER_OK;
}

/* Smallest token whose x row holds NaN or infinity, or T. */
typedef struct {
  const float *x;
  int64_t T, d, rows;
  _Atomic int64_t first;
} nonfinite_job;

static void nonfinite_item(void *job, int64_t item, int slot) {
  nonfinite_job *j = job;
  (void)slot;
  int64_t t1 = (item + 1) * j->rows < j->T ? (item + 1) * j->rows : j->T;
  for (int64_t t = item * j->rows; t < t1; t++) {
    int ok = 1;
    for (int64_t i = 0; i < j->d; i++) ok &= isfinite(j->x[t * j->d + i]) != 0;
    if (!ok) {
      note_bad(&j->first, t);
      return;
    }
  }
}

int64_t peer_cpu_first_nonfinite_row(const float *x, int64_t T, int64_t d, int P) {
  nonfinite_job j = {x, T, d, 64, T};
  peer_parallel(T * d >= 65536 ? P : 1, (T + j.rows - 1) / j.rows, nonfinite_item, &j);
  return atomic_load(&j.first);
}

static peer_status queries_and_retrieval(peer_layer *L, int64_t T, const float *x,
                                         bool brute, retrieve_out out, const cpu_ws *w,
                                         int P) {
  int64_t bad = peer_cpu_first_nonfinite_row(x, T, L->dims.d, P);
  if (bad < T)
    return peer_fail(PEER_ERR_NONFINITE, "token %lld: x holds NaN or infinity", (long long)bad);
  const int64_t ldq = peer_cpu_q_stride(&L->dims);
  peer_cpu_project(L, T, x, w->q, ldq, w, P);
  if (L->cfg.query_norm == PEER_NORM_BATCHNORM) normalize_running(L, T, w->q, ldq, P);
  return peer_cpu_retrieve_all(L, T, w->q, ldq, brute, out, w, P);
}

/* ------------------------------------------------------------ phase 3 */

typedef struct {
  const peer_layer *L;
  int64_t T;
  const float *x;
  float *y;
  const int64_t *ids;
  const float *gates;
  float *z;
  const cpu_ws *w;
} experts_job;

#define EXPERT_TOKENS 4 /* tokens per item */

static void experts_item(void *job, int64_t item, int slot) {
  const experts_job *j = job;
  const peer_layer *L = j->L;
  const peer_dims *D = &L->dims;
  const int64_t d = D->d, hk = D->H * D->k;
  const int act = (int)L->cfg.activation;
  const bool bf16 = L->cfg.weight_dtype == PEER_BF16;
  const size_t row_bytes = (size_t)d * (bf16 ? 2 : 4);
  const char *down = L->slot[PEER_P_EXPERTS_DOWN].data, *up = L->slot[PEER_P_EXPERTS_UP].data;
  const int64_t t1 = (item + 1) * EXPERT_TOKENS < j->T ? (item + 1) * EXPERT_TOKENS : j->T;
  (void)slot;
  for (int64_t t = item * EXPERT_TOKENS; t < t1; t++) {
    const float *xt = j->x + t * d;
    float *yt = j->y + t * d;
    if (bf16) { /* bf16 rows meet x and y split (split_pairs) */
      float *xs = peer_cpu_thread_pack(j->w, D);
      split_pairs(xt, d, xs);
      xt = xs;
    }
    const int64_t *id = j->ids + t * hk;
    const float *g = j->gates + t * hk;
    memset(yt, 0, (size_t)d * sizeof(float));
    for (int64_t e = 0; e < PREFETCH_AHEAD && e < hk; e++)
      prefetch_expert(down, up, id[e], row_bytes);
    for (int64_t e = 0; e < hk; e++) {
      if (e + PREFETCH_AHEAD < hk) prefetch_expert(down, up, id[e + PREFETCH_AHEAD], row_bytes);
      const char *u = down + (size_t)id[e] * row_bytes, *v = up + (size_t)id[e] * row_bytes;
      float dot = bf16 ? dot_row_bf16((const uint16_t *)u, xt, d)
                       : dot_row_f32((const float *)u, xt, d);
      if (j->z) j->z[t * hk + e] = dot;
      float a = g[e] * peer_activate(act, dot);
      if (bf16) axpy_row_bf16(a, (const uint16_t *)v, yt, d);
      else axpy_row_f32(a, (const float *)v, yt, d);
    }
    if (bf16) unsplit_pairs(yt, d);
  }
}

void peer_cpu_apply_experts(const peer_layer *L, int64_t T, const float *x, float *y,
                            const int64_t *ids, const float *gates, float *z, const cpu_ws *w,
                            int P) {
  experts_job j = {L, T, x, y, ids, gates, z, w};
  peer_parallel(T > 1 ? P : 1, (T + EXPERT_TOKENS - 1) / EXPERT_TOKENS, experts_item, &j);
}

/* ------------------------------------------------------------ entry points */

static peer_status cpu_retrieve(peer_layer *L, int64_t T, const float *x, int64_t *indices,
                                float *scores, float *gates, bool brute, void *ws) {
  cpu_ws w;
  cpu_layout(L, T, ws, &w);
  retrieve_out out = {indices, scores ? scores : w.scores, gates};
  return queries_and_retrieval(L, T, x, brute, out, &w, peer_cpu_threads(L));
}

static peer_status cpu_forward(peer_layer *L, int64_t T, const float *x, float *y,
                               int64_t *indices, float *gates, void *ws) {
  cpu_ws w;
  cpu_layout(L, T, ws, &w);
  int P = peer_cpu_threads(L);
  retrieve_out out = {indices ? indices : w.ids, w.scores, gates ? gates : w.gates};
#ifdef __AVX512BF16__
  if (peer_cpu_decode_ready(L, T, P)) return peer_cpu_decode_forward(L, T, x, y, out, &w, P);
#endif
  peer_status st = queries_and_retrieval(L, T, x, false, out, &w, P);
  if (st) return st;
  peer_cpu_apply_experts(L, T, x, y, out.ids, out.gates, NULL, &w, P);
  return PEER_OK;
}

static const peer_backend_i cpu_backend = {
    .name = "cpu",
    .alloc = peer_alloc,
    .free = peer_free,
    .workspace_size = cpu_workspace_size,
    .forward = cpu_forward,
    .retrieve = cpu_retrieve,
    .context_bytes = peer_cpu_context_bytes,
    .forward_train = peer_cpu_forward_train,
    .backward = peer_cpu_backward,
};

#define PEER_CPU_STR_(x) #x
#define PEER_CPU_STR(x) PEER_CPU_STR_(x)

const peer_cpu_impl peer_cpu_variant = {
    .name = PEER_CPU_STR(PEER_CPU_VARIANT),
    .backend = &cpu_backend,
    .train = &peer_cpu_train_variant,
    .gemm_nt = peer_cpu_gemm_nt,
    .layout = peer_cpu_layout,
    .thread_pack = peer_cpu_thread_pack,
    .topk_scan = peer_cpu_topk_scan,
    .project = peer_cpu_project,
    .apply_experts = peer_cpu_apply_experts,
};
