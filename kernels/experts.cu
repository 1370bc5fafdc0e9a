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
 * written to memory.
 * The backward is the same kernel with the tables swapped (BWD): phase 1
 * dots v_i with dy and writes the entry's coefficients (ds, cup, cdown), one
 * thread per head then runs the gate backward, and phase 2 sums
 * cdown[e] * u_i into dx in entry order. */
#include "common.cuh"
#include "experts.h"
#include "retrieval.h"

#include <cub/warp/warp_reduce.cuh>

#define EXPERT_THREADS 128
#define EXPERT_WARPS (EXPERT_THREADS / 32)

#define EXPERT_ENTRY (sizeof(int64_t) + sizeof(float)) /* id, coefficient */

extern "C" size_t peer_k_experts_smem(int64_t hk) { return (size_t)hk * EXPERT_ENTRY; }

extern "C" int64_t peer_k_experts_hk_max(void) { return (int64_t)(PEER_K_SMEM_MAX / EXPERT_ENTRY); }

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
/* Two bf16 packed in a word, the lower one first (little-endian). */
static __device__ inline void bf16_pair(uint32_t w, float *out) {
  out[0] = __uint_as_float(w << 16);
  out[1] = __uint_as_float(w & 0xffff0000u);
}
template <> struct row_chunk<true, 4> {
  static __device__ inline void load(const void *row, int64_t c, float *out) {
    uint2 v = __ldg((const uint2 *)row + c);
    bf16_pair(v.x, out), bf16_pair(v.y, out + 2);
  }
};
template <> struct row_chunk<true, 8> {
  static __device__ inline void load(const void *row, int64_t c, float *out) {
    uint4 v = __ldg((const uint4 *)row + c);
    bf16_pair(v.x, out), bf16_pair(v.y, out + 2), bf16_pair(v.z, out + 4), bf16_pair(v.w, out + 6);
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

template <bool BF16, int VEC, bool BWD>
__global__ void __launch_bounds__(EXPERT_THREADS) experts_kernel(const peer_k_expert_args a) {
  typedef cub::WarpReduce<float> WarpReduce;
  __shared__ typename WarpReduce::TempStorage reduce_tmp[EXPERT_WARPS];
  extern __shared__ int64_t expert_smem[]; /* row ids [hk], then coef [hk] */
  const int hk = a.hk;
  int64_t *row_id = expert_smem;
  float *coef = (float *)(expert_smem + hk);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int64_t d = a.d, chunks = d / VEC;
  const size_t row_bytes = (size_t)d * (BF16 ? 2 : 4);

  for (int64_t t = blockIdx.x; t < a.T; t += gridDim.x) {
    const float *xt = a.in + t * d;
    /* phase 1: coefficients (the loop bound is warp-uniform, as WarpReduce
     * needs every lane) */
    for (int e = warp; e < hk; e += EXPERT_WARPS) {
      const int64_t te = t * hk + e, id = a.ids[te];
      const char *u = (const char *)a.first + (size_t)id * row_bytes;
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
        if (BWD) {
          /* dot = v_i . dy; z = u_i . x from the training forward */
          const float z = a.z[te], g = a.gates[te], act = peer_activate(a.act, z);
          a.ds[te] = act * dot; /* d loss / d gate; the gate backward follows */
          a.cup[te] = g * act;
          coef[e] = a.cdown[te] = g * dot * peer_activate_grad(a.act, z);
        } else {
          if (a.z) a.z[te] = dot;
          coef[e] = a.gates[te] * peer_activate(a.act, dot);
        }
      }
    }
    __syncthreads(); /* coef, row_id (and in backward the token's ds) complete */
    if (BWD) {
      /* d gate -> d score, one thread per head, in place (peer_gates_grad
       * reads each dg before writing that dz) */
      for (int h = threadIdx.x; h < hk / a.k; h += EXPERT_THREADS) {
        const int64_t o = t * hk + (int64_t)h * a.k;
        peer_gates_grad(a.gate, a.scores + o, a.gates + o, a.ds + o, a.k, a.ds + o);
      }
    }
    /* phase 2: output columns, each thread its own (block-uniform skip when
     * the backward has no dx) */
    if (a.out)
      for (int64_t c = threadIdx.x; c < chunks; c += EXPERT_THREADS) {
        float acc[VEC];
#pragma unroll
        for (int i = 0; i < VEC; i++) acc[i] = 0.0f;
        /* several rows in flight; 4 at VEC 8 makes ptxas spill, and so does
         * 4 in the f32 backward on sm_90 */
#pragma unroll(VEC >= 8 || BWD ? 2 : 4)
        for (int e = 0; e < hk; e++) {
          float vv[VEC];
          row_chunk<BF16, VEC>::load((const char *)a.second + (size_t)row_id[e] * row_bytes, c,
                                     vv);
          const float w = coef[e];
#pragma unroll
          for (int i = 0; i < VEC; i++) acc[i] += w * vv[i];
        }
        store_y<VEC>(a.out + t * d, c, acc);
      }
    __syncthreads(); /* the next token's phase 1 overwrites coef and row_id */
  }
}

template <bool BWD>
static peer_status launch_all(peer_k_expert_args a, int bf16, cudaStream_t stream,
                              const char *what) {
  if (a.T == 0) return PEER_OK;
  if (peer_k_experts_smem(a.hk) > PEER_K_SMEM_MAX)
    return peer_fail(PEER_ERR_UNSUPPORTED, "%s: H*k = %d entries per token is too many", what,
                     a.hk);
  const unsigned grid = peer_k_blocks(a.T, 1);
  const size_t smem = peer_k_experts_smem(a.hk);
  /* Vector loads need rows (d) and the caller's in, out on 16-byte
   * boundaries, and the tables too (they come from cudaMalloc, 256-byte
   * aligned: checked all the same, the scalar kernels cover the rest). */
  const bool aligned = ((uintptr_t)a.in % 16 == 0) && ((uintptr_t)a.out % 16 == 0) &&
                       ((uintptr_t)a.first % 16 == 0) && ((uintptr_t)a.second % 16 == 0);
  if (bf16) {
    /* The backward at bf16 VEC 8 spills 16-24 bytes whatever the unroll
     * (ptxas, CUDA 13.0): it takes 8-byte loads (4 bf16) instead. */
    if constexpr (!BWD) {
      if (aligned && a.d % 8 == 0) {
        PEER_LAUNCH(grid, EXPERT_THREADS, smem, stream, experts_kernel<true, 8, false>)(a);
        return peer_k_launched(what);
      }
    } else {
      if (aligned && a.d % 4 == 0) {
        PEER_LAUNCH(grid, EXPERT_THREADS, smem, stream, experts_kernel<true, 4, true>)(a);
        return peer_k_launched(what);
      }
    }
    PEER_LAUNCH(grid, EXPERT_THREADS, smem, stream, experts_kernel<true, 1, BWD>)(a);
  } else {
    if (aligned && a.d % 4 == 0)
      PEER_LAUNCH(grid, EXPERT_THREADS, smem, stream, experts_kernel<false, 4, BWD>)(a);
    else
      PEER_LAUNCH(grid, EXPERT_THREADS, smem, stream, experts_kernel<false, 1, BWD>)(a);
  }
  return peer_k_launched(what);
}

extern "C" peer_status peer_k_experts(const float *x, float *y, const void *down,
                                      const void *up, int bf16, const int64_t *ids,
                                      const float *gates, float *z, int64_t T, int64_t d,
                                      int64_t hk, int act, cudaStream_t stream) {
  peer_k_expert_args a = {};
  a.in = x, a.out = y, a.first = down, a.second = up, a.ids = ids, a.gates = gates, a.z = z;
  a.T = T, a.d = d, a.hk = (int)hk, a.k = 1, a.act = act;
  return launch_all<false>(a, bf16, stream, "experts");
}

extern "C" peer_status peer_k_experts_backward(const peer_k_expert_args *args, int bf16,
                                               cudaStream_t stream) {
  return launch_all<true>(*args, bf16, stream, "experts_backward");
}
