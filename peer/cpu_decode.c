/* cpu_decode.c: the forward of small batches (T <= PEER_CPU_DECODE_MAX_T = 8
 * tokens: decoding), in the CPU variants built with AVX512-BF16.  A token
 * costs streaming the query weight (H*d_key x d f32) and the bf16 sub-keys
 * once, plus H*k random expert rows; the phases of the batch path (cpu.c)
 * each end in a barrier and vectorise over tokens, which leaves 15 of 16
 * lanes idle at T = 1.  Here two pool calls (pool.h) do it all, with one
 * synchronisation point between them:
 *   A. the threads take heads (dynamic): the head's queries from a copy of
 *      Wq laid out for streaming with the tokens broadcast (columns in
 *      vector lanes), the bf16 first pass and exact re-rank
 *      (peer_cpu_bf16_lists), the merge and gates, and the dot products
 *      u_i . x of the head's experts, whose rows are prefetched as soon as
 *      the ids are known; the coefficients gate * act(u_i . x) go to scratch.
 *   B. once every head is done, the threads take column chunks of y (dynamic)
 *      and add every token's H*k experts' rows v_i in the batch path's order.
 * Same bits as the batch path: every query element is the same chain of FMAs
 * in input order from 0 (peer_cpu_gemm_nt's), the lists and merge are the
 * bf16 path's, the dots are dot_row_*, and each element of y receives the
 * same axpy sequence (chunks start at multiples of 2*VW, so the bf16 rows'
 * split layout and the f32 tail match). */
#include "cpu.h"

#ifdef __AVX512BF16__
#include "pool.h"

/* Columns per block of the Wq copy: [dq / WB][d][WB] floats, so that a
 * block streams in order while its 4 vectors of columns take broadcast
 * tokens. */
#define WB 64
/* Columns of y per task of phase B: a multiple of 2*VW. */
#define YCOLS 128

static bool eligible(const peer_layer *L) {
  const peer_dims *D = &L->dims;
  return D->dk % WB == 0 && !L->query_exposed && L->expert_cols == D->d;
}

/* Makes the layer's Wq copy current (remade when keys_gen moved, as the bf16
 * keys are); false if it cannot be had (memory). */
/* Blocks b0..b1 of WB columns of the Wq copy. */
static void wq_block_range(void *layer, int64_t b0, int64_t b1, int slot) {
  const peer_layer *L = layer;
  const float *W = L->slot[PEER_P_QUERY_WEIGHT].data;
  float *out = L->wq_blocks.mem;
  const int64_t d = L->dims.d;
  (void)slot;
  for (int64_t b = b0; b < b1; b++)
    for (int64_t j = 0; j < WB; j++)
      for (int64_t i = 0; i < d; i++)
        out[(b * d + i) * WB + j] = W[(b * WB + j) * d + i];
}

static bool wq_blocks_ready(peer_layer *L, int P) {
  const peer_dims *D = &L->dims;
  peer_keys16 *C = &L->wq_blocks;
  if (C->mem && C->gen == L->keys_gen) return true;
  const size_t bytes = (size_t)(D->dq * D->d) * sizeof(float);
  if (!C->mem) {
    C->mem = peer_alloc(bytes);
    if (!C->mem) return false;
    C->bytes = bytes;
  }
  peer_parallel_ranges(P, D->dq / WB, 1, wq_block_range, L);
  C->gen = L->keys_gen;
  C->valid = true;
  return true;
}

bool peer_cpu_decode_ready(peer_layer *L, int64_t T, int P) {
  return T >= 1 && T <= PEER_CPU_DECODE_MAX_T && eligible(L) && peer_cpu_keys16_ready(L, P) &&
         wq_blocks_ready(L, P);
}

/* q[t][c0 + c] for tt tokens and nb blocks of WB columns starting at block
 * Wb: acc = fma(w, x, acc) over the inputs in order from 0, peer_cpu_gemm_nt's
 * chain (fma(a, b, c) is fma(b, a, c)). */
static inline __attribute__((always_inline)) void
project_tile(int tt, int nb, int64_t d, const float *Wb, const float *x, float *q, int64_t ldq) {
  __m512 acc[4][16];
  for (int t = 0; t < tt; t++)
    for (int v = 0; v < nb * 4; v++)
      acc[t][v] = _mm512_setzero_ps();
  for (int64_t i = 0; i < d; i++) {
    for (int v = 0; v < nb * 4; v++) {
      const __m512 w = _mm512_loadu_ps(Wb + ((v / 4) * d + i) * WB + (v % 4) * 16);
      for (int t = 0; t < tt; t++)
        acc[t][v] = _mm512_fmadd_ps(w, _mm512_set1_ps(x[t * d + i]), acc[t][v]);
    }
  }
  for (int t = 0; t < tt; t++)
    for (int v = 0; v < nb * 4; v++)
      _mm512_storeu_ps(q + t * ldq + (v / 4) * WB + (v % 4) * 16, acc[t][v]);
}

/* Head h's queries of the T tokens (bias, inference batch norm). */
static void project_head(const peer_layer *L, int64_t h, int64_t T, const float *x, float *q,
                         int64_t ldq) {
  const peer_dims *D = &L->dims;
  const int64_t d = D->d, c0 = h * D->dk;
  const float *W = (const float *)L->wq_blocks.mem + c0 * d;
  /* 16 accumulators: one token and 4 blocks, 2 and 2, or up to 4 tokens and
   * one block */
  if (T == 1) {
    for (int64_t b = 0; b < D->dk / WB;) {
      const float *Wb = W + b * d * WB;
      if (D->dk / WB - b >= 4)
        project_tile(1, 4, d, Wb, x, q + c0 + b * WB, ldq), b += 4;
      else
        project_tile(1, 1, d, Wb, x, q + c0 + b * WB, ldq), b++;
    }
  } else {
    for (int64_t b = 0; b < D->dk / WB; b++)
      for (int64_t t0 = 0; t0 < T; t0 += 4) {
        const float *Wb = W + b * d * WB, *xt = x + t0 * d;
        float *qt = q + t0 * ldq + c0 + b * WB;
        switch (T - t0 < 4 ? T - t0 : 4) {
        case 1:
          project_tile(1, 1, d, Wb, xt, qt, ldq);
          break;
        case 2:
          project_tile(2, 1, d, Wb, xt, qt, ldq);
          break;
        case 3:
          project_tile(3, 1, d, Wb, xt, qt, ldq);
          break;
        default:
          project_tile(4, 1, d, Wb, xt, qt, ldq);
          break;
        }
      }
  }
  const float *bias = L->slot[PEER_P_QUERY_BIAS].data;
  if (bias)
    for (int64_t t = 0; t < T; t++)
      for (int64_t c = c0; c < c0 + D->dk; c++)
        q[t * ldq + c] += bias[c];
  if (L->cfg.query_norm == PEER_NORM_BATCHNORM)
    for (int64_t t = 0; t < T; t++)
      peer_cpu_norm_running(L, q + t * ldq, c0, c0 + D->dk);
}

/* The head's experts for token t: rows prefetched, then coefficient
 * gate * act(u_i . x) in place of the scores.  xt is x, or x split
 * (split_pairs) for bf16 tables. */
static void head_dots(const peer_layer *L, const float *xt, const int64_t *ids, float *coef_out,
                      const float *gates) {
  const peer_dims *D = &L->dims;
  const int64_t d = D->d, k = D->k;
  const bool bf16 = L->cfg.weight_dtype == PEER_BF16;
  const size_t row_bytes = (size_t)d * (bf16 ? 2 : 4);
  const char *down = L->slot[PEER_P_EXPERTS_DOWN].data, *up = L->slot[PEER_P_EXPERTS_UP].data;
  const int act = (int)L->cfg.activation;
  for (int64_t e = 0; e < k; e++)
    prefetch_expert(down, up, ids[e], row_bytes);
  for (int64_t e = 0; e < k; e++) {
    const char *u = down + (size_t)ids[e] * row_bytes;
    float dot =
        bf16 ? dot_row_bf16((const uint16_t *)u, xt, d) : dot_row_f32((const float *)u, xt, d);
    coef_out[e] = gates[e] * peer_activate(act, dot);
  }
}

/* Phase A for head h: queries, lists, merge, gates, dots.  Returns the first
 * token whose scores were not finite, or T. */
static int64_t head_forward(peer_layer *L, int64_t h, int64_t T, const float *x, retrieve_out out,
                            const cpu_ws *w, int64_t *n_bf16, int64_t *n_fallback) {
  const peer_dims *D = &L->dims;
  const int64_t ldq = peer_cpu_q_stride(D), ls = peer_cpu_s_stride(D->n), H = D->H;
  const int k = (int)D->k, kp = (int)D->kp;
  /* The thread's scratch (cpu.c): S first, the lists' room after it (the
   * merge's rounding errors go there), cpu_bf16.c's scratch, then pack. */
  char *scratch = w->per_thread + (size_t)peer_parallel_slot() * w->per_thread_bytes;
  float *S = (float *)scratch;
  float *lo = (float *)(scratch + round64((size_t)TB * (size_t)ls * sizeof(float)));
  float *pack = peer_cpu_thread_pack(w, D);
  char *scratch16 = (char *)pack - peer_cpu_bf16_scratch_bytes(D);
  project_head(L, h, T, x, w->q, ldq);
  float *lists_s;
  int64_t *lists_id;
  int bad[PEER_CPU_DECODE_MAX_T];
  peer_cpu_bf16_lists(L, h, T, w->q, ldq, S, ls, scratch16, &lists_s, &lists_id, bad, pack, n_bf16,
                      n_fallback);
  int64_t first_bad = T;
  for (int64_t t = 0; t < T; t++) {
    const size_t o = (size_t)(t * H + h) * (size_t)k;
    const int64_t r = 2 * t * kp;
    bad[t] |= peer_merge_candidates(lists_s + r, lists_id + r, lists_s + r + kp, lists_id + r + kp,
                                    kp, k, D->n, out.scores + o, lo, out.ids + o);
    if (bad[t]) {
      if (first_bad == T) first_bad = t;
      continue;
    }
    peer_gates((int)L->cfg.gate, out.scores + o, k, out.gates + o);
  }
  if (first_bad < T) return first_bad;
  const bool bf16 = L->cfg.weight_dtype == PEER_BF16;
  for (int64_t t = 0; t < T; t++) {
    const float *xt = x + t * D->d;
    if (bf16) { /* pack is free again: the lists are made */
      split_pairs(xt, D->d, pack);
      xt = pack;
    }
    const size_t o = (size_t)(t * H + h) * (size_t)k;
    head_dots(L, xt, out.ids + o, out.scores + o, out.gates + o);
  }
  return T;
}

/* Phase B: columns [c0, c1) of y for every token, the entries in the batch
 * path's order; v rows prefetched PREFETCH_AHEAD entries ahead, the chunk's
 * lines only. */
static void y_chunk(const peer_layer *L, int64_t T, const int64_t *ids, const float *coef, float *y,
                    int64_t c0, int64_t c1) {
  const peer_dims *D = &L->dims;
  const int64_t d = D->d, hk = D->H * D->k, len = c1 - c0;
  const bool bf16 = L->cfg.weight_dtype == PEER_BF16;
  const size_t row_bytes = (size_t)d * (bf16 ? 2 : 4), esz = bf16 ? 2 : 4;
  const char *up = (const char *)L->slot[PEER_P_EXPERTS_UP].data + (size_t)c0 * esz;
  for (int64_t t = 0; t < T; t++) {
    const int64_t *id = ids + t * hk;
    const float *a = coef + t * hk;
    float *yt = y + t * d + c0;
    memset(yt, 0, (size_t)len * sizeof(float));
    for (int64_t e = 0; e < hk; e++) {
      if (e + PREFETCH_AHEAD < hk) {
        const char *p = up + (size_t)id[e + PREFETCH_AHEAD] * row_bytes;
        for (size_t b = 0; b < (size_t)len * esz; b += 64)
          __builtin_prefetch(p + b, 0, 2);
      }
      const char *v = up + (size_t)id[e] * row_bytes;
      if (bf16)
        axpy_row_bf16(a[e], (const uint16_t *)v, yt, len);
      else
        axpy_row_f32(a[e], (const float *)v, yt, len);
    }
    if (bf16) unsplit_pairs(yt, len);
  }
}

typedef struct {
  peer_layer *L;
  int64_t T;
  const float *x;
  float *y;
  retrieve_out out;
  const cpu_ws *w;
  _Atomic int64_t bad; /* the first failing (token, head) as token * H + head */
  _Atomic int64_t n_bf16, n_fallback;
} decode_job;

/* Phase A, item h: head h end to end. */
static void head_item(void *job, int64_t h, int slot) {
  decode_job *j = job;
  int64_t n_bf16 = 0, n_fallback = 0;
  (void)slot;
  int64_t fb = head_forward(j->L, h, j->T, j->x, j->out, j->w, &n_bf16, &n_fallback);
  if (fb < j->T) {
    const int64_t th = fb * j->L->dims.H + h;
    int64_t cur = atomic_load_explicit(&j->bad, memory_order_relaxed);
    while (th < cur && !atomic_compare_exchange_weak(&j->bad, &cur, th)) {
    }
  }
  atomic_fetch_add_explicit(&j->n_bf16, n_bf16, memory_order_relaxed);
  atomic_fetch_add_explicit(&j->n_fallback, n_fallback, memory_order_relaxed);
}

/* Phase B, item c: columns [c YCOLS, (c + 1) YCOLS) of y. */
static void y_item(void *job, int64_t c, int slot) {
  decode_job *j = job;
  const int64_t d = j->L->dims.d, c1 = (c + 1) * YCOLS < d ? (c + 1) * YCOLS : d;
  (void)slot;
  y_chunk(j->L, j->T, j->out.ids, j->out.scores, j->y, c * YCOLS, c1);
}

peer_status peer_cpu_decode_forward(peer_layer *L, int64_t T, const float *x, float *y,
                                    retrieve_out out, const cpu_ws *w, int P) {
  const peer_dims *D = &L->dims;
  int64_t bad = peer_cpu_first_nonfinite_row(x, T, D->d, 1);
  if (bad < T)
    return peer_fail(PEER_ERR_NONFINITE, "token %lld: x holds NaN or infinity", (long long)bad);
  const int64_t H = D->H, none = T * H;
  /* Two pool calls (pool.h): phase B starts when every head is done, and
   * neither waits for a thread that lost its core before taking an item. */
  decode_job j = {L, T, x, y, out, w, none, 0, 0};
  peer_parallel(P, H, head_item, &j);
  peer_cpu_count_first_pass(L, atomic_load(&j.n_bf16), atomic_load(&j.n_fallback));
  const int64_t first = atomic_load(&j.bad);
  if (first < none) return peer_cpu_fail_nonfinite_score(first / H, (int)(first % H));
  peer_parallel(P, (D->d + YCOLS - 1) / YCOLS, y_item, &j);
  return PEER_OK;
}

#endif
