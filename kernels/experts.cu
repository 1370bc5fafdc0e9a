/* experts.cu: the fused expert kernel.  One block per token (grid-strided):
 *   phase 1: each warp takes entries e = warp, warp + 4, ... of the token's
 *            H*k; the lanes read u_i (coalesced, 16-byte loads) against x,
 *            cub::WarpReduce sums the partial dots in a fixed shuffle order,
 *            and lane 0 stores coef[e] = gate * act(u_i . x) in shared memory;
 *   phase 2: after one barrier, each thread owns VEC-wide columns of y and
 *            sums coef[e] * v_i over e = 0 .. H*k-1 in that order, in
 *            registers, then writes y once.
 * Every y element is one fixed sequence of operations, so results are the
 * same bits on every run; nothing is atomic and no gathered row is ever
 * written to memory. */
#include "common.cuh"
#include "experts.h"
#include "retrieval.h"

#include <cub/warp/warp_reduce.cuh>

#define EXPERT_THREADS 128
#define EXPERT_WARPS (EXPERT_THREADS / 32)

extern "C" size_t peer_k_experts_smem(int64_t hk) {
  return (size_t)hk * (sizeof(int64_t) + sizeof(float));
}

/* VEC consecutive elements of a table row as f32. */
template <bool BF16, int VEC> struct row_chunk;

template <> struct row_chunk<false, 1> {
  static __device__ inline void load(const void *row, int64_t c, float *out) {
    out[0] = __ldg((const float *)row + c);
  }
};
template <> struct row_chunk<false, 4> {
  static __device__ inline void load(const void *row, int64_t c, float *out) {
    float4 v = __ldg((const float4 *)row + c);
    out[0] = v.x, out[1] = v.y, out[2] = v.z, out[3] = v.w;
  }
};
template <> struct row_chunk<true, 1> {
  static __device__ inline void load(const void *row, int64_t c, float *out) {
    out[0] = peer_bf16_to_f32(__ldg((const unsigned short *)row + c));
  }
};
template <> struct row_chunk<true, 8> {
  static __device__ inline void load(const void *row, int64_t c, float *out) {
    uint4 v = __ldg((const uint4 *)row + c);
    pair(v.x, out), pair(v.y, out + 2), pair(v.z, out + 4), pair(v.w, out + 6);
  }
  /* Two bf16 packed in a word, the lower one first (little-endian). */
  static __device__ inline void pair(uint32_t w, float *out) {
    out[0] = __uint_as_float(w << 16);
    out[1] = __uint_as_float(w & 0xffff0000u);
  }
};

/* VEC consecutive f32 of x (VEC 1, 4 or 8; 16-byte aligned when VEC > 1). */
template <int VEC> static __device__ inline void load_x(const float *x, int64_t c, float *out) {
  if (VEC == 1) {
    out[0] = x[c];
  } else {
#pragma unroll
    for (int i = 0; i < VEC / 4; i++) {
      float4 v = ((const float4 *)x)[c * (VEC / 4) + i];
      out[4 * i] = v.x, out[4 * i + 1] = v.y, out[4 * i + 2] = v.z, out[4 * i + 3] = v.w;
    }
  }
}

template <int VEC> static __device__ inline void store_y(float *y, int64_t c, const float *in) {
  if (VEC == 1) {
    y[c] = in[0];
  } else {
#pragma unroll
    for (int i = 0; i < VEC / 4; i++)
      ((float4 *)y)[c * (VEC / 4) + i] =
          make_float4(in[4 * i], in[4 * i + 1], in[4 * i + 2], in[4 * i + 3]);
  }
}

template <bool BF16, int VEC>
__global__ void __launch_bounds__(EXPERT_THREADS)
    experts_kernel(const float *__restrict__ x, float *__restrict__ y,
                   const void *__restrict__ down, const void *__restrict__ up,
                   const int64_t *__restrict__ ids, const float *__restrict__ gates, int64_t T,
                   int64_t d, int hk, int act) {
  typedef cub::WarpReduce<float> WarpReduce;
  __shared__ typename WarpReduce::TempStorage reduce_tmp[EXPERT_WARPS];
  extern __shared__ int64_t expert_smem[]; /* row ids [hk], then coef [hk] */
  int64_t *row_id = expert_smem;
  float *coef = (float *)(expert_smem + hk);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int64_t chunks = d / VEC;
  const size_t row_bytes = (size_t)d * (BF16 ? 2 : 4);

  for (int64_t t = blockIdx.x; t < T; t += gridDim.x) {
    const float *xt = x + t * d;
    /* phase 1: coefficients (the loop bound is warp-uniform, as WarpReduce
     * needs every lane) */
    for (int e = warp; e < hk; e += EXPERT_WARPS) {
      int64_t id = ids[t * hk + e];
      const char *u = (const char *)down + (size_t)id * row_bytes;
      float part = 0.0f;
      for (int64_t c = lane; c < chunks; c += 32) {
        float uv[VEC], xv[VEC];
        row_chunk<BF16, VEC>::load(u, c, uv);
        load_x<VEC>(xt, c, xv);
#pragma unroll
        for (int i = 0; i < VEC; i++) part += uv[i] * xv[i];
      }
      float dot = WarpReduce(reduce_tmp[warp]).Sum(part);
      __syncwarp(); /* CUB: before the warp's temp storage is reused */
      if (lane == 0) {
        row_id[e] = id;
        coef[e] = gates[t * hk + e] * peer_activate(act, dot);
      }
    }
    __syncthreads(); /* coef and row_id complete */
    /* phase 2: y columns, each thread its own */
    for (int64_t c = threadIdx.x; c < chunks; c += EXPERT_THREADS) {
      float acc[VEC];
#pragma unroll
      for (int i = 0; i < VEC; i++) acc[i] = 0.0f;
      /* several rows in flight; 4 at VEC 8 makes ptxas spill */
#pragma unroll(VEC >= 8 ? 2 : 4)
      for (int e = 0; e < hk; e++) {
        float vv[VEC];
        row_chunk<BF16, VEC>::load((const char *)up + (size_t)row_id[e] * row_bytes, c, vv);
        const float a = coef[e];
#pragma unroll
        for (int i = 0; i < VEC; i++) acc[i] += a * vv[i];
      }
      store_y<VEC>(y + t * d, c, acc);
    }
    __syncthreads(); /* the next token's phase 1 overwrites coef and row_id */
  }
}

template <bool BF16, int VEC>
static void launch(const float *x, float *y, const void *down, const void *up,
                   const int64_t *ids, const float *gates, int64_t T, int64_t d, int64_t hk,
                   int act, cudaStream_t stream) {
  experts_kernel<BF16, VEC><<<peer_k_blocks(T, 1), EXPERT_THREADS, peer_k_experts_smem(hk),
                              stream>>>(x, y, down, up, ids, gates, T, d, (int)hk, act);
}

extern "C" peer_status peer_k_experts(const float *x, float *y, const void *down,
                                      const void *up, int bf16, const int64_t *ids,
                                      const float *gates, int64_t T, int64_t d, int64_t hk,
                                      int act, cudaStream_t stream) {
  if (T == 0) return PEER_OK;
  if (peer_k_experts_smem(hk) > PEER_K_SMEM_MAX)
    return peer_fail(PEER_ERR_UNSUPPORTED, "experts: H*k = %lld entries per token is too many",
                     (long long)hk);
  /* 16-byte loads need rows (d) and the caller's x, y on 16-byte boundaries;
   * the tables come from cudaMalloc (256-byte aligned). */
  bool aligned = ((uintptr_t)x % 16 == 0) && ((uintptr_t)y % 16 == 0);
  if (bf16) {
    if (aligned && d % 8 == 0) launch<true, 8>(x, y, down, up, ids, gates, T, d, hk, act, stream);
    else launch<true, 1>(x, y, down, up, ids, gates, T, d, hk, act, stream);
  } else {
    if (aligned && d % 4 == 0) launch<false, 4>(x, y, down, up, ids, gates, T, d, hk, act, stream);
    else launch<false, 1>(x, y, down, up, ids, gates, T, d, hk, act, stream);
  }
  return peer_k_launched("experts");
}
