/* retrieval.cu: the retrieval kernels between the two cuBLAS products and
 * the expert kernel:
 *   bias_norm    q += bias; running batch norm (one thread per element);
 *   subkey_topk  one warp per (token, head, half) row of n sub-key scores:
 *                scores beating the row's running k'-th best (a warp-wide
 *                threshold) are ballot-compacted into a shared-memory
 *                buffer; a full buffer is sorted (warp bitonic network),
 *                keeps its k' best and raises the threshold;
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

/* Lists are padded to an odd stride so that threads reading the same
 * position hit different banks. */
static __host__ __device__ inline int64_t odd_stride(int64_t c) { return c | 1; }

/* Bytes of one list entry of the merge and brute force: (hi, lo, id). */
#define PAIR_ENTRY (sizeof(int64_t) + 2 * sizeof(float))

/* The longest list for which `fixed` bytes plus `lists` lists of entries of
 * `entry` bytes, each padded to odd_stride, fit PEER_K_SMEM_MAX: the largest
 * c with fixed + lists * (c|1) * entry <= PEER_K_SMEM_MAX. */
static int64_t odd_list_max(size_t fixed, size_t lists, size_t entry) {
  const size_t stride = (PEER_K_SMEM_MAX - fixed) / (lists * entry); /* the longest odd_stride */
  return stride ? (int64_t)((stride - 1) | 1) : 0;
}

/* The top-k' buffer of one warp, in keys (a power of two, for the sort):
 * room for the k' best so far and a chunk of 32 candidates, and where
 * PEER_K_SMEM_MAX allows for 2k', so that a sort frees k' places or more
 * (at most about n / k' sorts per row however the scores come). */
static int64_t topk_buffer(int64_t kp) {
  int64_t b = 64;
  while (b < kp + 32) b <<= 1;
  while (b < 2 * kp && 2 * b * sizeof(uint64_t) <= PEER_K_SMEM_MAX) b <<= 1;
  return b;
}

extern "C" size_t peer_k_topk_warp_smem(int64_t kp) {
  return (size_t)topk_buffer(kp) * sizeof(uint64_t);
}

extern "C" int64_t peer_k_topk_kp_max(void) {
  int64_t b = 64;
  while (2 * b * sizeof(uint64_t) <= PEER_K_SMEM_MAX) b <<= 1;
  return b - 32;
}

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

/* The selection compares and sorts rowops.h's peer_order_key: one integer
 * per (score, index) whose unsigned order is the tie rule.  Indices differ,
 * so keys differ and the order is total; 0, below every key, marks an
 * empty place. */

/* keys[0, p) in descending order, p a power of two: a bitonic network.
 * Stages whose partners are 32 or more apart go through shared memory,
 * compare-exchanges spread over the lanes, a __syncwarp after each; the
 * stages under 32 apart that follow them run in registers, 32 keys at a
 * time (lane l holds key base + l, its partner is lane l ^ j's), then one
 * __syncwarp.  So every shared-memory access of the sort reads or writes
 * 32 keys at consecutive or 32-aligned places: two wavefronts, no bank
 * conflict (pairs under 16 apart through shared memory hit 8 of the 16
 * eight-byte bank pairs, four wavefronts).  The first __syncwarp publishes
 * the callers' writes. */
static __device__ void warp_sort_desc(uint64_t *keys, int p, int lane) {
  __syncwarp();
  for (int k = 2; k <= p; k <<= 1) {
    int j = k >> 1;
    for (; j >= 32; j >>= 1) {
      for (int t = lane; t < p >> 1; t += 32) {
        const int i = (t & ~(j - 1)) << 1 | (t & (j - 1)), l = i + j;
        const uint64_t a = keys[i], b = keys[l];
        if ((a < b) == !(i & k)) { /* descending where bit k of i is clear */
          keys[i] = b;
          keys[l] = a;
        }
      }
      __syncwarp();
    }
    for (int base = 0; base < p; base += 32) { /* p < 32: lanes from p pair among themselves */
      const int x = base + lane;
      uint64_t v = x < p ? keys[x] : 0;
      for (int h = j; h > 0; h >>= 1) {
        const uint64_t o = __shfl_xor_sync(PEER_FULL_MASK, v, h);
        const bool desc = !(x & k), lower = !(x & h); /* bit k of x is bit k of the pair's i */
        if (lower ? (v < o) == desc : (o < v) == desc) v = o;
      }
      if (x < p) keys[x] = v;
    }
    __syncwarp();
  }
  PEER_K_COUNT(topk_sorted, lane == 0 ? p : 0);
}

/* Sorts the count keys in keys[0, p) (p a power of two >= count, the rest
 * emptied first) so that keys[0, kp) are the best kp, in order.  The
 * caller's writes below count and the sort's reads are ordered by the
 * sort's first __syncwarp. */
static __device__ void warp_keep_best(uint64_t *keys, int count, int p, int lane) {
  for (int i = count + lane; i < p; i += 32) keys[i] = 0;
  warp_sort_desc(keys, p, lane);
}

/* One chunk step of the warp's selection: each lane offers one key (0 for
 * none).  Keys above the threshold, the k'-th best kept so far once a sort
 * has run (0 before: every key passes), are ballot-compacted into the
 * buffer; when they would overflow it, the buffer is sorted first, keeps its
 * kp best (count > buffer - 32 >= kp) and raises the threshold, and the
 * chunk is filtered again.  count and threshold come from ballots and the
 * sorted buffer, so they stay warp-uniform.  Exact: a key at or below the
 * threshold is beaten by kp kept keys. */
static __device__ __forceinline__ void topk_offer(uint64_t key, uint64_t *keys, int &count,
                                                  uint64_t &threshold, int kp, int buffer,
                                                  int lane) {
  const unsigned lanes_below = (1u << lane) - 1u;
  unsigned pass = __ballot_sync(PEER_FULL_MASK, key > threshold);
  if (!pass) return;
  if (count + __popc(pass) > buffer) {
    warp_keep_best(keys, count, buffer, lane);
    threshold = keys[kp - 1];
    count = kp;
    pass = __ballot_sync(PEER_FULL_MASK, key > threshold);
  }
  if (key > threshold) keys[count + __popc(pass & lanes_below)] = key;
  count += __popc(pass);
  if (lane == 0) PEER_K_COUNT(topk_candidates, __popc(pass));
}

/* After the last offer, count >= kp keys in the buffer (no sort ran and
 * count = every key offered, at least kp, or one did and left kp): one sort
 * of the next power of two leaves the best kp in keys[0, kp), in order. */
static __device__ __forceinline__ void topk_finish(uint64_t *keys, int count, int lane) {
  int p = 1;
  while (p < count) p <<= 1;
  warp_keep_best(keys, count, p, lane);
}

__global__ void subkey_topk_kernel(const float *__restrict__ S, int64_t rows, int64_t n,
                                   int kp, int buffer, float *__restrict__ out_s,
                                   int64_t *__restrict__ out_id, unsigned long long *bad) {
  extern __shared__ uint64_t topk_smem[]; /* [warps][buffer] keys */
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, wpb = blockDim.x >> 5;
  uint64_t *keys = topk_smem + (int64_t)warp * buffer;
  /* Rows are warp-uniform, so whole warps loop and exit together. */
  for (int64_t row = (int64_t)blockIdx.x * wpb + warp; row < rows;
       row += (int64_t)gridDim.x * wpb) {
    const float *s = S + row * n;
    int count = 0, nonfinite = 0;
    uint64_t threshold = 0;
    for (int64_t base = 0; base < n; base += 32) {
      const int64_t i = base + lane;
      uint64_t key = 0;
      if (i < n) {
        const float v = s[i];
        nonfinite |= !isfinite(v);
        key = peer_order_key(v, i);
      }
      topk_offer(key, keys, count, threshold, kp, buffer, lane);
    }
    topk_finish(keys, count, lane);
    for (int r = lane; r < kp; r += 32) {
      const int64_t id = peer_order_key_id(keys[r]);
      out_id[row * kp + r] = id;
      out_s[row * kp + r] = s[id]; /* the score's own bits (-0, NaN) */
    }
    if (__any_sync(PEER_FULL_MASK, nonfinite) && lane == 0)
      atomicMin(bad, (unsigned long long)(row / 2));
    __syncwarp(); /* every lane has read the buffer before the next row writes it */
  }
}

/* About two waves of 4-warp blocks on an H100 (132 SMs x 16 resident);
 * beyond 16,384 rows each warp takes several, so tests of a few thousand
 * tokens run the row loop as large batches do. */
#define TOPK_MAX_BLOCKS 4096u

extern "C" peer_status peer_k_subkey_topk(const float *S, int64_t rows, int64_t n, int64_t kp,
                                          float *out_s, int64_t *out_id,
                                          unsigned long long *bad, cudaStream_t stream) {
  if (kp < 1 || kp > n) /* the final sort would read past the row (layer configs never do) */
    return peer_fail(PEER_ERR_INVALID_ARGUMENT, "subkey_topk: subkey_top_k %lld not in [1, %lld]",
                     (long long)kp, (long long)n);
  if (kp > peer_k_topk_kp_max())
    return peer_fail(PEER_ERR_UNSUPPORTED,
                     "subkey_topk: subkey_top_k %lld is beyond the kernel's shared memory (at "
                     "most %lld)",
                     (long long)kp, (long long)peer_k_topk_kp_max());
  if (rows == 0) return PEER_OK;
  const size_t per_warp = peer_k_topk_warp_smem(kp);
  int wpb = (int)(PEER_K_SMEM_MAX / per_warp);
  if (wpb > 4) wpb = 4;
  unsigned blocks = peer_k_blocks(rows, wpb);
  if (blocks > TOPK_MAX_BLOCKS) blocks = TOPK_MAX_BLOCKS;
  PEER_LAUNCH(blocks, 32 * wpb, per_warp * (size_t)wpb, stream, subkey_topk_kernel)
  (S, rows, n, (int)kp, (int)topk_buffer(kp), out_s, out_id, bad);
  return peer_k_launched("subkey_topk");
}

/* ------------------------------------------------------------ bf16 first pass */

/* The bf16 first pass with exact re-scoring (kernels/README.md "bf16 sub-key
 * scores"): bf16 copies of the keys and queries (keys16, query16), their
 * scores S16 by cuBLAS on tensor cores (the backend), then subkey_topk_bf16
 * brackets each exact score (the f32 FMA chain below) by S16 -+ e, keeps the
 * keys whose bracket can reach the k'-th largest lower end, re-scores those
 * with the chain and selects from the re-scored values. */

/* The exact score of one sub-key: one FMA chain in component order from 0,
 * as the CPU's f32 path (peer_cpu_gemm_nt) computes every element, so the
 * two give the same bits for the same query.  m % 4 == 0 and c 16-byte
 * aligned (the bf16 path's eligibility). */
static __device__ __forceinline__ float exact_score(const float *qs, const float *c, int64_t m) {
  float acc = 0.0f;
  for (int64_t k = 0; k < m; k += 4) {
    const float4 v = *(const float4 *)(c + k);
    acc = fmaf(qs[k], v.x, acc);
    acc = fmaf(qs[k + 1], v.y, acc);
    acc = fmaf(qs[k + 2], v.z, acc);
    acc = fmaf(qs[k + 3], v.w, acc);
  }
  return acc;
}

/* The sum of v over the warp, the same bits on every lane and every run (a
 * fixed butterfly; a + b == b + a). */
static __device__ __forceinline__ double warp_sum(double v) {
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(PEER_FULL_MASK, v, off);
  return v;
}

/* Row r of x (m floats) to bf16 (peer_bf16_ftz) at x16, and the rounded-up
 * norms |x|, |x'|, |x - x'| (sums of squares in double). */
static __device__ __forceinline__ void to_bf16_row(const float *x, uint16_t *x16, int64_t m,
                                                   int lane, float norms[3]) {
  double s0 = 0, s1 = 0, s2 = 0;
  for (int64_t i = lane; i < m; i += 32) {
    const float v = x[i];
    const uint16_t b = peer_bf16_ftz(v);
    const float vb = peer_bf16_to_f32(b), dv = v - vb;
    x16[i] = b;
    s0 += (double)v * v;
    s1 += (double)vb * vb;
    s2 += (double)dv * dv;
  }
  norms[0] = peer_norm_up(warp_sum(s0));
  norms[1] = peer_norm_up(warp_sum(s1));
  norms[2] = peer_norm_up(warp_sum(s2));
}

__global__ void keys16_kernel(const float *__restrict__ keys, int64_t rows, int64_t m,
                              uint16_t *__restrict__ k16, float *__restrict__ norms) {
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, wpb = blockDim.x >> 5;
  for (int64_t r = (int64_t)blockIdx.x * wpb + warp; r < rows; r += (int64_t)gridDim.x * wpb) {
    float nr[3];
    to_bf16_row(keys + r * m, k16 + r * m, m, lane, nr);
    if (lane == 0) {
      PEER_K_COUNT(keys16_rows, 1);
      norms[r] = nr[1];            /* |c'| */
      norms[rows + r] = nr[2];     /* |dc| */
      norms[2 * rows + r] = nr[0]; /* |c| */
    }
  }
}

extern "C" peer_status peer_k_keys16(const float *keys, int64_t rows, int64_t m, uint16_t *k16,
                                     float *norms, cudaStream_t stream) {
  if (rows == 0) return PEER_OK;
  PEER_LAUNCH(peer_k_blocks(rows, 4), 128, 0, stream, keys16_kernel)(keys, rows, m, k16, norms);
  return peer_k_launched("keys16");
}

__global__ void query16_kernel(const float *__restrict__ q, int64_t rows, int64_t H, int64_t dk,
                               int64_t dq, int64_t m, float g, uint16_t *__restrict__ q16,
                               float *__restrict__ coef) {
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, wpb = blockDim.x >> 5;
  for (int64_t r = (int64_t)blockIdx.x * wpb + warp; r < rows; r += (int64_t)gridDim.x * wpb) {
    const int64_t t = r / (2 * H), h = (r >> 1) % H, p = r & 1;
    const int64_t at = t * dq + h * dk + p * m;
    float nr[3];
    to_bf16_row(q + at, q16 + at, m, lane, nr);
    if (lane == 0) {
      float *c = coef + r * PEER_K_BF16_COEFS;
      peer_bf16_bound_coefs(nr[0], nr[1], nr[2], m, g, c);
      c[4] = peer_bf16_chain_coef(nr[0], g);
    }
  }
}

extern "C" peer_status peer_k_query16(const float *q, int64_t T, int64_t H, int64_t dk, int64_t m,
                                      float g, uint16_t *q16, float *coef, cudaStream_t stream) {
  const int64_t rows = T * H * 2;
  if (rows == 0) return PEER_OK;
  PEER_LAUNCH(peer_k_blocks(rows, 4), 128, 0, stream, query16_kernel)
  (q, rows, H, dk, H * dk, m, g, q16, coef);
  return peer_k_launched("query16");
}

extern "C" float peer_k_bf16_gamma(int64_t m) {
  /* 3m 2^-23 / (1 - 3m 2^-23): the model of kernels/README.md ("bf16
   * sub-key scores"), which covers gamma_m of the f32 chain too */
  const double u = 3.0 * (double)m * 0x1p-23;
  return peer_round_up(u / (1.0 - u) * (1.0 + 0x1p-30));
}

/* The survivors re-scored per row at most; more re-score the whole row
 * (the fallback, counted). */
static __host__ __device__ inline int bf16_cap(int64_t kp) { return (int)(2 * kp + 64); }

/* Shared memory of one warp of subkey_topk_bf16: the key buffer, the query
 * half and 32 pending survivors. */
static size_t bf16_warp_smem(int64_t kp, int64_t m) {
  return (size_t)topk_buffer(kp) * sizeof(uint64_t) + (size_t)m * sizeof(float) +
         32 * sizeof(int32_t);
}

extern "C" size_t peer_k_topk_bf16_warp_smem(int64_t kp, int64_t m) { return bf16_warp_smem(kp, m); }

/* The bracket's half-width e_j = A |c'_j| + B |dc_j| + C |c_j| + D, one fixed
 * expression (so every pass computes the same bits for a key). */
struct bf16_bound {
  float A, B, C, D;
  const float *nc1, *ndc, *nc;
  __device__ __forceinline__ float at(int64_t j) const {
    return fmaf(A, nc1[j], fmaf(B, ndc[j], fmaf(C, nc[j], D)));
  }
};

/* Pending survivors (ids in pend[0, pending)): each lane re-scores one, and
 * the warp offers the exact scores to its selection. */
static __device__ __forceinline__ void rescore_pending(const int32_t *pend, int &pending,
                                                       const float *qs, const float *C, int64_t m,
                                                       uint64_t *keys, int &count,
                                                       uint64_t &threshold, int kp, int buffer,
                                                       int lane, int &nonfinite) {
  __syncwarp(); /* pend and qs written by other lanes */
  uint64_t key = 0;
  if (lane < pending) {
    const int32_t j = pend[lane];
    const float v = exact_score(qs, C + (int64_t)j * m, m);
    nonfinite |= !isfinite(v);
    key = peer_order_key(v, j);
  }
  if (lane == 0) PEER_K_COUNT(topk_rescored, pending);
  __syncwarp(); /* pend read before it is refilled */
  pending = 0;
  topk_offer(key, keys, count, threshold, kp, buffer, lane);
}

/* The score a peer_order_key carries, but for the sign of a zero (read as
 * +0) and a NaN's payload (its row is recorded). */
static __device__ __forceinline__ float order_key_score(uint64_t key) {
  const uint32_t u = (uint32_t)(key >> 32);
  return __uint_as_float((u & 0x80000000u) ? u & 0x7fffffffu : ~u);
}

__global__ void subkey_topk_bf16_kernel(const float *__restrict__ S16, const float *__restrict__ q,
                                        const float *__restrict__ keys_f32,
                                        const float *__restrict__ norms,
                                        const float *__restrict__ coef, int64_t rows, int64_t n,
                                        int64_t m, int64_t H, int64_t dk, int shared_keys, int kp,
                                        int buffer, float *__restrict__ out_s,
                                        int64_t *__restrict__ out_id, unsigned long long *bad,
                                        unsigned long long *fallbacks) {
  extern __shared__ uint64_t topk16_smem[]; /* per warp: keys [buffer], q [m], pend [32] */
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, wpb = blockDim.x >> 5;
  const size_t per_warp = ((size_t)buffer * 8 + (size_t)m * 4 + 128) / 8;
  uint64_t *keys = topk16_smem + (int64_t)warp * per_warp;
  float *qs = (float *)(keys + buffer);
  int32_t *pend = (int32_t *)(qs + m);
  const int64_t sets = (shared_keys ? 1 : H) * 2, dq = H * dk;
  const int cap = bf16_cap(kp);
  for (int64_t row = (int64_t)blockIdx.x * wpb + warp; row < rows;
       row += (int64_t)gridDim.x * wpb) {
    const int64_t t = row / (2 * H), h = (row >> 1) % H, p = row & 1;
    const int64_t set = (shared_keys ? 0 : h) * 2 + p;
    const float *s = S16 + row * n, *C = keys_f32 + set * n * m;
    const float *cr = coef + row * PEER_K_BF16_COEFS;
    const bf16_bound e = {cr[0], cr[1], cr[2], cr[3], norms + set * n, norms + (sets + set) * n,
                          norms + (2 * sets + set) * n};
    const float chain = cr[4];
    for (int64_t i = lane; i < m; i += 32) qs[i] = q[t * dq + h * dk + p * m + i];
    /* pass 1: tau, the exact k'-th largest lower end (a non-finite bracket
     * or a chain that may overflow anywhere sends the row to the fallback) */
    int count = 0, odd = 0;
    uint64_t threshold = 0;
    for (int64_t base = 0; base < n; base += 32) {
      const int64_t i = base + lane;
      uint64_t key = 0;
      if (i < n) {
        const float w = e.at(i), lo = s[i] - w, hi = s[i] + w;
        odd |= !isfinite(lo) || !isfinite(hi) || !isfinite(chain * e.nc[i]);
        key = peer_order_key(lo, i);
      }
      topk_offer(key, keys, count, threshold, kp, buffer, lane);
    }
    bool fall = __any_sync(PEER_FULL_MASK, odd);
    float tau = -INFINITY;
    if (!fall) {
      topk_finish(keys, count, lane);
      const int64_t id = peer_order_key_id(keys[kp - 1]);
      tau = s[id] - e.at(id);
      int survivors = 0;
      for (int64_t base = 0; base < n; base += 32) {
        const int64_t i = base + lane;
        survivors += __popc(__ballot_sync(PEER_FULL_MASK, i < n && s[i] + e.at(i) >= tau));
      }
      fall = survivors > cap;
    }
    if (fall && lane == 0) atomicAdd(fallbacks, 1ull);
    __syncwarp(); /* every lane has read the buffer */
    /* pass 2: the survivors (every key in the fallback), re-scored exactly,
     * 32 at a time, into a fresh selection */
    count = 0;
    threshold = 0;
    int pending = 0, nonfinite = 0;
    for (int64_t base = 0; base < n; base += 32) {
      const int64_t i = base + lane;
      const bool keep = i < n && (fall || s[i] + e.at(i) >= tau);
      const unsigned pass = __ballot_sync(PEER_FULL_MASK, keep);
      if (pending + __popc(pass) > 32)
        rescore_pending(pend, pending, qs, C, m, keys, count, threshold, kp, buffer, lane,
                        nonfinite);
      if (keep) pend[pending + __popc(pass & ((1u << lane) - 1u))] = (int32_t)i;
      pending += __popc(pass);
    }
    if (pending > 0)
      rescore_pending(pend, pending, qs, C, m, keys, count, threshold, kp, buffer, lane,
                      nonfinite);
    topk_finish(keys, count, lane);
    for (int r = lane; r < kp; r += 32) {
      const int64_t id = peer_order_key_id(keys[r]);
      const float v = order_key_score(keys[r]);
      out_id[row * kp + r] = id;
      /* a chain can end at -0 (products that underflow); its own bits */
      out_s[row * kp + r] = v == 0.0f ? exact_score(qs, C + id * m, m) : v;
    }
    if (__any_sync(PEER_FULL_MASK, nonfinite) && lane == 0)
      atomicMin(bad, (unsigned long long)(row / 2));
    __syncwarp(); /* every lane has read the buffer and qs before the next row writes them */
  }
}

extern "C" peer_status peer_k_subkey_topk_bf16(const float *S16, const float *q,
                                               const float *keys, const float *norms,
                                               const float *coef, int64_t T, int64_t H, int64_t dk,
                                               int64_t n, int64_t kp, int shared_keys,
                                               float *out_s, int64_t *out_id,
                                               unsigned long long *bad,
                                               unsigned long long *fallbacks, cudaStream_t stream) {
  const int64_t rows = T * H * 2, m = dk / 2;
  if (kp < 1 || kp > n || m % 4)
    return peer_fail(PEER_ERR_INVALID_ARGUMENT,
                     "subkey_topk_bf16: subkey_top_k %lld not in [1, %lld] or d_key/2 = %lld not "
                     "a multiple of 4",
                     (long long)kp, (long long)n, (long long)m);
  const size_t per_warp = bf16_warp_smem(kp, m);
  if (per_warp > PEER_K_SMEM_MAX)
    return peer_fail(PEER_ERR_UNSUPPORTED,
                     "subkey_topk_bf16: subkey_top_k %lld and d_key %lld need %zu bytes of shared "
                     "memory per warp",
                     (long long)kp, (long long)dk, per_warp);
  if (rows == 0) return PEER_OK;
  int wpb = (int)(PEER_K_SMEM_MAX / per_warp);
  if (wpb > 4) wpb = 4;
  unsigned blocks = peer_k_blocks(rows, wpb);
  if (blocks > TOPK_MAX_BLOCKS) blocks = TOPK_MAX_BLOCKS;
  PEER_LAUNCH(blocks, 32 * wpb, per_warp * (size_t)wpb, stream, subkey_topk_bf16_kernel)
  (S16, q, keys, norms, coef, rows, n, m, H, dk, shared_keys, (int)kp, (int)topk_buffer(kp), out_s,
   out_id, bad, fallbacks);
  return peer_k_launched("subkey_topk_bf16");
}

/* Every sub-key score by exact_score (thread per score), for brute force on
 * layers whose product-key search takes the bf16 path: the same bits. */
__global__ void exact_scores_kernel(const float *__restrict__ q, const float *__restrict__ keys,
                                    int64_t total, int64_t n, int64_t m, int64_t H, int64_t dk,
                                    int shared_keys, float *__restrict__ S) {
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < total;
       i += (int64_t)gridDim.x * blockDim.x) {
    const int64_t row = i / n, j = i % n;
    const int64_t t = row / (2 * H), h = (row >> 1) % H, p = row & 1;
    const int64_t set = (shared_keys ? 0 : h) * 2 + p;
    S[i] = exact_score(q + t * H * dk + h * dk + p * m, keys + (set * n + j) * m, m);
  }
}

extern "C" peer_status peer_k_exact_scores(const float *q, const float *keys, int64_t T, int64_t H,
                                           int64_t dk, int64_t n, int shared_keys, float *S,
                                           cudaStream_t stream) {
  const int64_t total = T * H * 2 * n;
  if (total == 0) return PEER_OK;
  PEER_LAUNCH(peer_k_blocks(total, 256), 256, 0, stream, exact_scores_kernel)
  (q, keys, total, n, dk / 2, H, dk, shared_keys, S);
  return peer_k_launched("exact_scores");
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
