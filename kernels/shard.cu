/* shard.cu: the expert phase of a d-sharded layer (kernels/shard.h), the
 * unsharded experts kernel (experts.cu) split at its one barrier so that
 * the communicator's all-reduce of the dots can come between the halves:
 *   shard_dots:       one block per token, warp per entry e = warp, warp+4,
 *                     ...: lanes stride the rank's columns of u_i against
 *                     x's, cub::WarpReduce sums (fixed shuffle order), lane
 *                     0 writes z;
 *   shard_combine:    one block per token: coefficients gate * act(z) into
 *                     shared memory (or given ones: the backward's cdown),
 *                     one barrier, then each thread owns columns of the
 *                     rank's part of y (dx) and sums coef[e] * v_i (u_i)
 *                     over e in order, in a register;
 *   shard_interleave: every rank's gathered [T, cols] part into its columns
 *                     of y [T, d], thread per element;
 *   shard_coefficients: the backward's per-entry coefficients from the
 *                     all-reduced v_i . dy, thread per (token, head), the
 *                     same expressions as the unsharded backward's phase 1
 *                     (experts.cu) and the same peer_gates_grad.
 * Every output element is one fixed sequence of operations: reruns give the
 * same bits; no atomics.  Loads are scalar (lanes read consecutive
 * columns, so a warp's reads are coalesced); a rank's row is cols = d/P
 * elements, which need not be a multiple of 4. */
#include "common.cuh"
#include "retrieval.h"
#include "shard.h"

#include <cub/warp/warp_reduce.cuh>

#define SHARD_THREADS 128
#define SHARD_WARPS (SHARD_THREADS / 32)
#define SHARD_ENTRY (sizeof(int64_t) + sizeof(float)) /* id, coefficient */

extern "C" size_t peer_k_shard_combine_smem(int64_t hk) { return (size_t)hk * SHARD_ENTRY; }

template <bool BF16> static __device__ inline float table_at(const void *row, int64_t c) {
  if (BF16) return peer_bf16_to_f32(__ldg((const unsigned short *)row + c));
  return __ldg((const float *)row + c);
}

template <bool BF16>
__global__ void __launch_bounds__(SHARD_THREADS)
    shard_dots(const float *x, int64_t d, int64_t col0, const void *down, int64_t cols,
               const int64_t *ids, int64_t T, int hk, float *z) {
  typedef cub::WarpReduce<float> WarpReduce;
  __shared__ typename WarpReduce::TempStorage reduce_tmp[SHARD_WARPS];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const size_t row_bytes = (size_t)cols * (BF16 ? 2 : 4);
  for (int64_t t = blockIdx.x; t < T; t += gridDim.x) {
    const float *xt = x + t * d + col0;
    /* the loop bound is warp-uniform, as WarpReduce needs every lane */
    for (int e = warp; e < hk; e += SHARD_WARPS) {
      const int64_t te = t * hk + e;
      const char *u = (const char *)down + (size_t)ids[te] * row_bytes;
      float part = 0.0f;
      for (int64_t c = lane; c < cols; c += 32) part += table_at<BF16>(u, c) * xt[c];
      const float dot = WarpReduce(reduce_tmp[warp]).Sum(part);
      __syncwarp(); /* CUB: before the warp's temp storage is reused */
      if (lane == 0) z[te] = dot;
    }
  }
}

template <bool BF16>
__global__ void __launch_bounds__(SHARD_THREADS)
    shard_combine(const float *z, const float *gates, const int64_t *ids, const void *up,
                  int64_t cols, int64_t T, int hk, int act, float *out) {
  extern __shared__ int64_t shard_smem[]; /* row ids [hk], then coef [hk] */
  int64_t *row_id = shard_smem;
  float *coef = (float *)(shard_smem + hk);
  const size_t row_bytes = (size_t)cols * (BF16 ? 2 : 4);
  for (int64_t t = blockIdx.x; t < T; t += gridDim.x) {
    for (int e = threadIdx.x; e < hk; e += SHARD_THREADS) {
      const int64_t te = t * hk + e;
      row_id[e] = ids[te];
      coef[e] = z ? gates[te] * peer_activate(act, z[te]) : gates[te];
    }
    __syncthreads(); /* coef, row_id complete */
    for (int64_t c = threadIdx.x; c < cols; c += SHARD_THREADS) {
      float acc = 0.0f;
#pragma unroll 4
      for (int e = 0; e < hk; e++)
        acc += coef[e] * table_at<BF16>((const char *)up + (size_t)row_id[e] * row_bytes, c);
      out[t * cols + c] = acc;
    }
    __syncthreads(); /* the next token overwrites coef and row_id */
  }
}

__global__ void __launch_bounds__(256)
    shard_interleave(const float *parts, int64_t T, int64_t cols, int64_t total, float *y) {
  const int64_t d = total / T;
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < total;
       i += (int64_t)gridDim.x * blockDim.x) {
    const int64_t t = i / d, c = i % d, r = c / cols;
    y[i] = parts[(r * T + t) * cols + c % cols];
  }
}

__global__ void __launch_bounds__(256)
    shard_coefficients(const float *z, const float *gates, const float *scores, float *ds,
                       float *cup, float *cdown, int64_t heads, int k, int act, int gate) {
  for (int64_t th = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; th < heads;
       th += (int64_t)gridDim.x * blockDim.x) {
    const int64_t o = th * k;
    for (int j = 0; j < k; j++) {
      const int64_t te = o + j;
      /* ds holds v_i . dy here; z = u_i . x from the training forward */
      const float vd = ds[te], zz = z[te], g = gates[te], a = peer_activate(act, zz);
      ds[te] = a * vd; /* d loss / d gate; the gate backward follows */
      cup[te] = g * a;
      cdown[te] = g * vd * peer_activate_grad(act, zz);
    }
    peer_gates_grad(gate, scores + o, gates + o, ds + o, k, ds + o);
  }
}

extern "C" peer_status peer_k_shard_dots(const float *x, int64_t d, int64_t col0,
                                         const void *down, int bf16, int64_t cols,
                                         const int64_t *ids, int64_t T, int64_t hk, float *z,
                                         cudaStream_t stream) {
  if (T == 0 || hk == 0) return PEER_OK;
  const unsigned grid = peer_k_blocks(T, 1);
  if (bf16)
    PEER_LAUNCH(grid, SHARD_THREADS, 0, stream, shard_dots<true>)(x, d, col0, down, cols, ids, T,
                                                                  (int)hk, z);
  else
    PEER_LAUNCH(grid, SHARD_THREADS, 0, stream, shard_dots<false>)(x, d, col0, down, cols, ids, T,
                                                                   (int)hk, z);
  return peer_k_launched("shard_dots");
}

extern "C" peer_status peer_k_shard_combine(const float *z, const float *gates,
                                            const int64_t *ids, const void *up, int bf16,
                                            int64_t cols, int64_t T, int64_t hk, int act,
                                            float *out, cudaStream_t stream) {
  if (T == 0) return PEER_OK;
  const size_t smem = peer_k_shard_combine_smem(hk);
  if (smem > PEER_K_SMEM_MAX)
    return peer_fail(PEER_ERR_UNSUPPORTED, "shard_combine: H*k = %lld entries per token is too many",
                     (long long)hk);
  const unsigned grid = peer_k_blocks(T, 1);
  if (bf16)
    PEER_LAUNCH(grid, SHARD_THREADS, smem, stream, shard_combine<true>)(z, gates, ids, up, cols, T,
                                                                        (int)hk, act, out);
  else
    PEER_LAUNCH(grid, SHARD_THREADS, smem, stream, shard_combine<false>)(z, gates, ids, up, cols,
                                                                         T, (int)hk, act, out);
  return peer_k_launched("shard_combine");
}

extern "C" peer_status peer_k_shard_interleave(const float *parts, int world, int64_t T,
                                               int64_t cols, float *y, cudaStream_t stream) {
  const int64_t total = T * cols * world;
  if (total == 0) return PEER_OK;
  PEER_LAUNCH(peer_k_blocks(total, 256), 256, 0, stream, shard_interleave)(parts, T, cols, total,
                                                                           y);
  return peer_k_launched("shard_interleave");
}

extern "C" peer_status peer_k_shard_coefficients(const float *z, const float *gates,
                                                 const float *scores, float *ds, float *cup,
                                                 float *cdown, int64_t T, int64_t H, int64_t k,
                                                 int act, int gate, cudaStream_t stream) {
  const int64_t heads = T * H;
  if (heads == 0) return PEER_OK;
  PEER_LAUNCH(peer_k_blocks(heads, 256), 256, 0, stream, shard_coefficients)(
      z, gates, scores, ds, cup, cdown, heads, (int)k, act, gate);
  return peer_k_launched("shard_coefficients");
}
