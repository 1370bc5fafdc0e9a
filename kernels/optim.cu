/* optim.cu: the CUDA optimizer step: optim_rule.h's update (the CPU
 * optimizer's, explicitly rounded on the device) over dense parameters, one
 * thread per weight, and over the expert rows a backward listed, one block
 * per row.  Before it, the gradients are scanned for NaN and infinity into a
 * record (integer atomicMin, so the result does not depend on order); the
 * update kernels read it and leave everything untouched when it is set.
 * The updates are elementwise: no reductions, no float atomics. */
#include "common.cuh"
#include "optim.h"
#include "train.h"

/* NaN compares false: not finite. */
__device__ __forceinline__ bool finite_f32(float x) { return fabsf(x) <= 3.40282347e38f; }

__global__ void optim_check_dense_kernel(const float *__restrict__ g, int64_t n,
                                         unsigned long long tag, unsigned long long *rec) {
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n;
       i += (int64_t)gridDim.x * blockDim.x)
    if (!finite_f32(g[i])) atomicMin(rec, tag | (unsigned long long)i);
}

extern "C" peer_status peer_k_optim_check_dense(const float *g, int64_t n, int slot,
                                                unsigned long long *rec, cudaStream_t stream) {
  if (n <= 0) return PEER_OK;
  PEER_LAUNCH(peer_k_blocks(n, 256), 256, 0, stream, optim_check_dense_kernel)
  (g, n, (unsigned long long)slot << PEER_K_GRAD_SLOT_SHIFT, rec);
  return peer_k_launched("optimizer step (gradient check)");
}

__global__ void optim_check_rows_kernel(const float *__restrict__ g, bool dense,
                                        const int64_t *__restrict__ ids,
                                        const int64_t *__restrict__ d_rows, int64_t n_rows,
                                        int64_t d, unsigned long long tag,
                                        unsigned long long *rec) {
  const int64_t rows = d_rows ? *d_rows : n_rows;
  for (int64_t j = blockIdx.x; j < rows; j += gridDim.x) {
    const int64_t row = ids[j];
    const float *grow = g + (dense ? row : j) * d;
    for (int64_t c = threadIdx.x; c < d; c += blockDim.x)
      if (!finite_f32(grow[c])) atomicMin(rec, tag | (unsigned long long)(row * d + c));
  }
}

static int row_threads(int64_t d) { return d >= 256 ? 256 : (int)((d + 31) / 32 * 32); }

extern "C" peer_status peer_k_optim_check_rows(const float *g, bool dense, const int64_t *ids,
                                               const int64_t *d_rows, int64_t n_rows,
                                               int64_t max_rows, int64_t d, int slot,
                                               unsigned long long *rec, cudaStream_t stream) {
  if (max_rows <= 0 || d <= 0) return PEER_OK;
  PEER_LAUNCH(peer_k_blocks(max_rows, 1), row_threads(d), 0, stream, optim_check_rows_kernel)
  (g, dense, ids, d_rows, n_rows, d, (unsigned long long)slot << PEER_K_GRAD_SLOT_SHIFT, rec);
  return peer_k_launched("optimizer step (gradient check)");
}

__global__ void optim_dense_kernel(peer_optim_rule r, float *__restrict__ p,
                                   const float *__restrict__ g, float *__restrict__ m,
                                   float *__restrict__ v, int64_t n,
                                   const unsigned long long *__restrict__ refused) {
  if (refused && *refused != PEER_K_CLEAR) return; /* the same answer for every thread */
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n;
       i += (int64_t)gridDim.x * blockDim.x)
    p[i] = peer_optim_update(&r, p[i], g[i], m ? m + i : NULL, v ? v + i : NULL);
}

extern "C" peer_status peer_k_optim_dense(const peer_optim_rule *r, float *p, const float *g,
                                          float *m, float *v, int64_t n,
                                          const unsigned long long *refused, cudaStream_t stream) {
  if (n <= 0) return PEER_OK;
  PEER_LAUNCH(peer_k_blocks(n, 256), 256, 0, stream, optim_dense_kernel)
  (*r, p, g, m, v, n, refused);
  return peer_k_launched("optimizer step (dense)");
}

__global__ void optim_rows_kernel(peer_optim_rule r, void *__restrict__ table, bool bf16,
                                  const float *__restrict__ g, bool dense, float *__restrict__ m,
                                  float *__restrict__ v, const int64_t *__restrict__ ids,
                                  const int64_t *__restrict__ d_rows, int64_t n_rows, int64_t d,
                                  const unsigned long long *__restrict__ refused) {
  if (refused && *refused != PEER_K_CLEAR) return;
  const int64_t rows = d_rows ? *d_rows : n_rows;
  for (int64_t j = blockIdx.x; j < rows; j += gridDim.x) {
    const int64_t row = ids[j], at = row * d;
    const float *grow = g + (dense ? row : j) * d;
    for (int64_t c = threadIdx.x; c < d; c += blockDim.x) {
      float *mc = m ? m + at + c : NULL, *vc = v ? v + at + c : NULL;
      if (bf16) {
        uint16_t *p = (uint16_t *)table + at + c;
        *p = peer_f32_to_bf16(peer_optim_update(&r, peer_bf16_to_f32(*p), grow[c], mc, vc));
      } else {
        float *p = (float *)table + at + c;
        *p = peer_optim_update(&r, *p, grow[c], mc, vc);
      }
    }
  }
}

extern "C" peer_status peer_k_optim_rows(const peer_optim_rule *r, void *p, bool bf16,
                                         const float *g, bool dense, float *m, float *v,
                                         const int64_t *ids, const int64_t *d_rows, int64_t n_rows,
                                         int64_t max_rows, int64_t d,
                                         const unsigned long long *refused, cudaStream_t stream) {
  if (max_rows <= 0 || d <= 0) return PEER_OK;
  PEER_LAUNCH(peer_k_blocks(max_rows, 1), row_threads(d), 0, stream, optim_rows_kernel)
  (*r, p, bf16, g, dense, m, v, ids, d_rows, n_rows, d, refused);
  return peer_k_launched("optimizer step (expert rows)");
}
