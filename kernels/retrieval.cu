/* retrieval.cu: the retrieval kernels between the two cuBLAS products and
 * the expert kernel:
 *   bias_norm    q += bias; running batch norm (one thread per element);
 *   subkey_topk  one warp per (token, head, half) row of n sub-key scores:
 *                each lane keeps a sorted list of its strided slice
 *                (peer_list_insert, in shared memory), then kp rounds of a
 *                warp arg-max by the tie rule pop the row's top-k';
 *   merge        one thread per (token, head): peer_merge_candidates over the
 *                two halves' lists, then peer_gates;
 *   brute_topk   one block per (token, head): each thread scans its columns
 *                b = tid, tid + threads, ... of every row a of the n x n
 *                sums, keeping a sorted list (peer_pair_insert, in shared
 *                memory), then k rounds of a block arg-max by
 *                peer_pair_beats pop the head's top-k; then peer_gates.
 * The per-row logic is rowops.h's, shared with the CPU backend. */
#include "common.cuh"
#include "retrieval.h"

/* Lane lists are padded to an odd stride so that lanes reading the same
 * position hit different banks. */
static __host__ __device__ inline int64_t lane_cap(int64_t n, int64_t kp) {
  int64_t slice = (n + 31) / 32; /* a lane sees at most this many scores */
  return kp < slice ? kp : slice;
}
static __host__ __device__ inline int64_t odd_stride(int64_t c) { return c | 1; }

/* Bytes of one list entry: (score, id) in the top-k' lists; (hi, lo, id)
 * in the merge's and brute force's. */
#define TOPK_ENTRY (sizeof(int64_t) + sizeof(float))
#define PAIR_ENTRY (sizeof(int64_t) + 2 * sizeof(float))

/* The longest list for which `fixed` bytes plus `lists` lists of entries of
 * `entry` bytes, each padded to odd_stride, fit PEER_K_SMEM_MAX: the largest
 * c with fixed + lists * (c|1) * entry <= PEER_K_SMEM_MAX. */
static int64_t odd_list_max(size_t fixed, size_t lists, size_t entry) {
  const size_t stride = (PEER_K_SMEM_MAX - fixed) / (lists * entry); /* the longest odd_stride */
  return stride ? (int64_t)((stride - 1) | 1) : 0;
}

extern "C" size_t peer_k_topk_warp_smem(int64_t n, int64_t kp) {
  return (size_t)32 * (size_t)odd_stride(lane_cap(n, kp)) * TOPK_ENTRY;
}

extern "C" int64_t peer_k_topk_cap_max(void) { return odd_list_max(0, 32, TOPK_ENTRY); }

extern "C" size_t peer_k_merge_thread_smem(int64_t k) { return (size_t)odd_stride(k) * PAIR_ENTRY; }

extern "C" int64_t peer_k_merge_k_max(void) { return odd_list_max(0, 1, PAIR_ENTRY); }

/* ------------------------------------------------------------ bias, norm */

__global__ void bias_norm_kernel(float *__restrict__ q, int64_t total, int64_t dq,
                                 const float *__restrict__ bias, const float *__restrict__ nw,
                                 const float *__restrict__ nb, const float *__restrict__ mean,
                                 const float *__restrict__ var) {
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < total;
       i += (int64_t)gridDim.x * blockDim.x) {
    int64_t f = i % dq;
    float v = q[i];
    if (bias) v += bias[f];
    if (mean) v = (v - mean[f]) / sqrtf(var[f] + 1e-5f) * nw[f] + nb[f];
    q[i] = v;
  }
}

extern "C" peer_status peer_k_bias_norm(float *q, int64_t T, int64_t dq, const float *bias,
                                        const float *norm_weight, const float *norm_bias,
                                        const float *mean, const float *var,
                                        cudaStream_t stream) {
  int64_t total = T * dq;
  if (total == 0 || (!bias && !mean)) return PEER_OK;
  PEER_LAUNCH(peer_k_blocks(total, 256), 256, 0, stream, bias_norm_kernel)
  (q, total, dq, bias, norm_weight, norm_bias, mean, var);
  return peer_k_launched("bias_norm");
}

/* ------------------------------------------------------------ top-k' */

/* Does candidate (sb, ib, vb) beat (sa, ia, va)?  A valid entry beats an
 * empty one; two valid ones follow the tie rule. */
static __device__ inline bool takes_over(float sa, int64_t ia, int va, float sb, int64_t ib,
                                         int vb) {
  return vb && (!va || peer_beats(sb, ib, sa, ia));
}

__global__ void subkey_topk_kernel(const float *__restrict__ S, int64_t rows, int64_t n,
                                   int kp, int cap, int stride, float *__restrict__ out_s,
                                   int64_t *__restrict__ out_id, unsigned long long *bad) {
  extern __shared__ int64_t topk_smem[]; /* ids [warps][32][stride], then scores */
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, wpb = blockDim.x >> 5;
  int64_t *my_id = topk_smem + ((int64_t)warp * 32 + lane) * stride;
  float *my_s = (float *)(topk_smem + (int64_t)wpb * 32 * stride) +
                ((int64_t)warp * 32 + lane) * stride;
  /* Rows are warp-uniform, so whole warps loop and exit together (the
   * shuffles below need every lane). */
  for (int64_t row = (int64_t)blockIdx.x * wpb + warp; row < rows;
       row += (int64_t)gridDim.x * wpb) {
    const float *s = S + row * n;
    int count = 0, nonfinite = 0;
    /* Indices rise within a lane, so a tie with the list's worst never
     * enters (the entry already there has the smaller index). */
    for (int64_t i = lane; i < n; i += 32) {
      float v = s[i];
      nonfinite |= !isfinite(v);
      if (count < cap || v > my_s[cap - 1]) peer_list_insert(my_s, my_id, cap, &count, v, i);
    }
    /* Pop the best head of the 32 lane lists kp times.  The lanes hold at
     * least min(n, kp) entries in all, so a valid winner always exists; lane
     * 0's result is broadcast so that every lane agrees even when NaN makes
     * the order partial, and the winner's owner is its index mod 32. */
    int ptr = 0;
    for (int r = 0; r < kp; r++) {
      int valid = ptr < count;
      float cs = valid ? my_s[ptr] : 0.0f;
      int64_t cid = valid ? my_id[ptr] : 0;
#pragma unroll
      for (int off = 16; off > 0; off >>= 1) {
        float os = __shfl_xor_sync(PEER_FULL_MASK, cs, off);
        int64_t oid = __shfl_xor_sync(PEER_FULL_MASK, cid, off);
        int ov = __shfl_xor_sync(PEER_FULL_MASK, valid, off);
        if (takes_over(cs, cid, valid, os, oid, ov)) {
          cs = os;
          cid = oid;
          valid = 1;
        }
      }
      cs = __shfl_sync(PEER_FULL_MASK, cs, 0);
      cid = __shfl_sync(PEER_FULL_MASK, cid, 0);
      if (lane == (int)(cid & 31)) ptr++;
      if (lane == 0) {
        out_s[row * kp + r] = cs;
        out_id[row * kp + r] = cid;
      }
    }
    if (__any_sync(PEER_FULL_MASK, nonfinite) && lane == 0)
      atomicMin(bad, (unsigned long long)(row / 2));
    /* The next row's inserts reuse this lane's own list only: no other lane
     * reads it, so no barrier is needed. */
  }
}

extern "C" peer_status peer_k_subkey_topk(const float *S, int64_t rows, int64_t n, int64_t kp,
                                          float *out_s, int64_t *out_id,
                                          unsigned long long *bad, cudaStream_t stream) {
  if (rows == 0) return PEER_OK;
  size_t per_warp = peer_k_topk_warp_smem(n, kp);
  if (per_warp > PEER_K_SMEM_MAX)
    return peer_fail(PEER_ERR_UNSUPPORTED,
                     "subkey_topk: n=%lld, k'=%lld need %zu bytes of shared memory per warp",
                     (long long)n, (long long)kp, per_warp);
  int wpb = (int)(PEER_K_SMEM_MAX / per_warp);
  if (wpb > 4) wpb = 4;
  int cap = (int)lane_cap(n, kp);
  PEER_LAUNCH(peer_k_blocks(rows, wpb), 32 * wpb, per_warp * (size_t)wpb, stream,
              subkey_topk_kernel)
  (S, rows, n, (int)kp, cap, (int)odd_stride(cap), out_s, out_id, bad);
  return peer_k_launched("subkey_topk");
}

/* ------------------------------------------------------------ merge */

__global__ void merge_kernel(const float *__restrict__ list_s, const int64_t *__restrict__ list_id,
                             int64_t TH, int kp, int k, int stride, int64_t n, int gate,
                             float *__restrict__ scores, int64_t *__restrict__ ids,
                             float *__restrict__ gates, unsigned long long *bad) {
  /* ids [threads][stride], then scores, then their rounding errors */
  extern __shared__ int64_t merge_smem[];
  int64_t *my_id = merge_smem + (int64_t)threadIdx.x * stride;
  float *my_s = (float *)(merge_smem + (int64_t)blockDim.x * stride) +
                (int64_t)threadIdx.x * stride;
  float *my_lo = my_s + (int64_t)blockDim.x * stride;
  for (int64_t r = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; r < TH;
       r += (int64_t)gridDim.x * blockDim.x) {
    const float *s1 = list_s + r * 2 * kp, *s2 = s1 + kp;
    const int64_t *a1 = list_id + r * 2 * kp, *a2 = a1 + kp;
    int nonfinite = peer_merge_candidates(s1, a1, s2, a2, kp, k, n, my_s, my_lo, my_id);
    for (int j = 0; j < k; j++) {
      scores[r * k + j] = my_s[j];
      ids[r * k + j] = my_id[j];
    }
    peer_gates(gate, my_s, k, gates + r * k);
    if (nonfinite) atomicMin(bad, (unsigned long long)r);
  }
}

#define MERGE_THREADS 64

extern "C" peer_status peer_k_merge(const float *list_s, const int64_t *list_id, int64_t TH,
                                    int64_t kp, int64_t k, int64_t n, int gate, float *scores,
                                    int64_t *ids, float *gates, unsigned long long *bad,
                                    cudaStream_t stream) {
  if (TH == 0) return PEER_OK;
  size_t per_thread = peer_k_merge_thread_smem(k);
  if (per_thread > PEER_K_SMEM_MAX)
    return peer_fail(PEER_ERR_UNSUPPORTED, "merge: top_k %lld needs %zu bytes of shared memory",
                     (long long)k, per_thread);
  int threads = (int)(PEER_K_SMEM_MAX / per_thread);
  if (threads > MERGE_THREADS) threads = MERGE_THREADS;
  PEER_LAUNCH(peer_k_blocks(TH, threads), threads, per_thread * (size_t)threads, stream,
              merge_kernel)
  (list_s, list_id, TH, (int)kp, (int)k, (int)odd_stride(k), n, gate, scores, ids, gates, bad);
  return peer_k_launched("merge");
}

/* ------------------------------------------------------------ brute force */

#define BRUTE_MAX_WARPS 4

/* One list head in the block merge: a candidate (hi, lo, id), or none. */
typedef struct brute_head {
  float hi, lo;
  int64_t id;
  int valid;
} brute_head;

/* The block merge's shared state: each warp's best head, and the round's
 * winning id.  It heads the dynamic shared memory, so the launcher counts
 * every byte the kernel uses. */
typedef struct brute_merge {
  brute_head warp_best[BRUTE_MAX_WARPS];
  int64_t winner;
} brute_merge;

/* A thread of `threads` sees at most n * ceil(n / threads) of the n*n sums,
 * so its list never needs more entries than that. */
static int64_t brute_cap(int64_t n, int64_t k, int64_t threads) {
  int64_t seen = n * ((n + threads - 1) / threads);
  return k < seen ? k : seen;
}

static size_t brute_smem(int64_t n, int64_t k, int64_t threads) {
  return sizeof(brute_merge) +
         (size_t)threads * (size_t)odd_stride(brute_cap(n, k, threads)) * PAIR_ENTRY;
}

/* The most warps (up to BRUTE_MAX_WARPS) whose shared memory fits
 * PEER_K_SMEM_MAX, times 32; 0 if one warp's does not. */
static int brute_threads(int64_t n, int64_t k) {
  for (int warps = BRUTE_MAX_WARPS; warps > 0; warps--)
    if (brute_smem(n, k, 32 * warps) <= PEER_K_SMEM_MAX) return 32 * warps;
  return 0;
}

/* Refused exactly when one warp's lists do not fit: brute_cap(n, k, 32) =
 * min(k, n * ceil(n / 32)) beyond the longest list one warp may keep (95).
 * A config has k <= k' <= n, so for every config that is k > 95. */
extern "C" peer_status peer_k_brute_supported(int64_t n, int64_t k) {
  if (brute_threads(n, k) > 0) return PEER_OK;
  return peer_fail(PEER_ERR_UNSUPPORTED,
                   "retrieve_brute: top_k %lld with n_subkeys %lld needs %zu bytes of shared "
                   "memory per warp, beyond %zu (the CUDA brute force takes top_k <= %lld)",
                   (long long)k, (long long)n, brute_smem(n, k, 32), PEER_K_SMEM_MAX,
                   (long long)odd_list_max(sizeof(brute_merge), 32, PAIR_ENTRY));
}

/* Does b beat a?  A valid head beats an empty one; two valid ones follow
 * the candidate order (exact sums, ties to the smaller id). */
static __device__ inline bool head_takes_over(const brute_head &a, const brute_head &b) {
  return b.valid && (!a.valid || peer_pair_beats(b.hi, b.lo, b.id, a.hi, a.lo, a.id));
}

__global__ void __launch_bounds__(BRUTE_MAX_WARPS * 32)
    brute_topk_kernel(const float *__restrict__ S, int64_t rows, int n, int k, int cap,
                      int stride, int gate, float *__restrict__ scores,
                      int64_t *__restrict__ ids, float *__restrict__ gates,
                      unsigned long long *bad) {
  /* brute_merge, then the lists: ids [threads][stride], hi, lo */
  extern __shared__ int64_t brute_smem_base[];
  brute_merge &mg = *(brute_merge *)brute_smem_base;
  int64_t *const list_ids = (int64_t *)(&mg + 1);
  const int tid = threadIdx.x, threads = blockDim.x, lane = tid & 31, warp = tid >> 5;
  const int warps = threads >> 5;
  int64_t *my_id = list_ids + (int64_t)tid * stride;
  float *my_hi = (float *)(list_ids + (int64_t)threads * stride) + (int64_t)tid * stride;
  float *my_lo = my_hi + (int64_t)threads * stride;
  /* Rows are block-uniform (blockIdx only), so every thread reaches every
   * barrier below, and whole warps run the shuffles. */
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    const float *s1 = S + row * 2 * n, *s2 = s1 + n;
    int count = 0, nonfinite = 0;
    /* This thread's sums (a, b), b = tid mod threads: only it writes and
     * reads its own list, so the scan needs no barrier. */
    for (int a = 0; a < n; a++) {
      const float sa = s1[a];
      for (int b = tid; b < n; b += threads) {
        float c, l;
        peer_two_sum(sa, s2[b], &c, &l);
        const int64_t id = (int64_t)a * n + b;
        nonfinite |= !isfinite(c) || !isfinite(l);
        if (count < cap ||
            peer_pair_beats(c, l, id, my_hi[cap - 1], my_lo[cap - 1], my_id[cap - 1]))
          peer_pair_insert(my_hi, my_lo, my_id, cap, &count, c, l, id);
      }
    }
    /* k rounds: the best head of all lists.  The lists hold min(k, n*n) = k
     * entries or more in all, so each round has a valid winner; thread 0
     * alone decides it (an order made partial by NaN cannot split the
     * block), and its owner, the thread that scanned column id mod n, pops
     * it. */
    int ptr = 0;
    for (int r = 0; r < k; r++) {
      brute_head h;
      h.valid = ptr < count;
      h.hi = h.valid ? my_hi[ptr] : 0.0f;
      h.lo = h.valid ? my_lo[ptr] : 0.0f;
      h.id = h.valid ? my_id[ptr] : 0;
#pragma unroll
      for (int off = 16; off > 0; off >>= 1) {
        brute_head o;
        o.hi = __shfl_xor_sync(PEER_FULL_MASK, h.hi, off);
        o.lo = __shfl_xor_sync(PEER_FULL_MASK, h.lo, off);
        o.id = __shfl_xor_sync(PEER_FULL_MASK, h.id, off);
        o.valid = __shfl_xor_sync(PEER_FULL_MASK, h.valid, off);
        if (head_takes_over(h, o)) h = o;
      }
      if (lane == 0) mg.warp_best[warp] = h;
      __syncthreads(); /* warp_best complete */
      if (tid == 0) {
        brute_head best = mg.warp_best[0];
        for (int w = 1; w < warps; w++)
          if (head_takes_over(best, mg.warp_best[w])) best = mg.warp_best[w];
        scores[row * k + r] = best.hi;
        ids[row * k + r] = best.id;
        mg.winner = best.id;
      }
      __syncthreads(); /* winner visible; warp_best free for the next round */
      if ((int)((mg.winner % n) % threads) == tid) ptr++;
    }
    if (__syncthreads_or(nonfinite) && tid == 0) atomicMin(bad, (unsigned long long)row);
    /* thread 0 wrote this row's scores itself */
    if (tid == 0) peer_gates(gate, scores + row * k, k, gates + row * k);
  }
}

extern "C" peer_status peer_k_brute_topk(const float *S, int64_t TH, int64_t n, int64_t k,
                                         int gate, float *scores, int64_t *ids, float *gates,
                                         unsigned long long *bad, cudaStream_t stream) {
  if (TH == 0) return PEER_OK;
  peer_status s = peer_k_brute_supported(n, k);
  if (s) return s;
  const int threads = brute_threads(n, k);
  const int64_t cap = brute_cap(n, k, threads);
  PEER_LAUNCH(peer_k_blocks(TH, 1), threads, brute_smem(n, k, threads), stream, brute_topk_kernel)
  (S, TH, (int)n, (int)k, (int)cap, (int)odd_stride(cap), gate, scores, ids, gates, bad);
  return peer_k_launched("brute_topk");
}
