/* train.cu: the training kernels besides the expert backward (experts.cu):
 *   per-feature reductions over tokens (batch statistics, batch-norm
 *   backward, column sums): one block of 32 features x 8 token lanes; lane y
 *   sums tokens y, y+8, ... in order, then every thread adds the 8 partials
 *   in order from shared memory, so each sum is one fixed sequence;
 *   query_grad: one thread per dq element, the head's k entries in order;
 *   sorted gradients: (row, entry) pairs sorted by cub::DeviceRadixSort
 *   (stable: entries stay in entry order within a row), run starts from a
 *   one-block cub::BlockScan of "new key" flags, then one block (experts) or warp (sub-keys) per
 *   distinct row adds its entries in order.  No float atomics anywhere, so
 *   reruns give the same bits. */
#include "common.cuh"
#include "train.h"

#include <cub/device/device_radix_sort.cuh>
#include <cub/block/block_scan.cuh>

/* ------------------------------------------------------------ checks */

__global__ void nonfinite_row_kernel(const float *__restrict__ a, int64_t total, int64_t d,
                                     unsigned long long *row) {
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < total;
       i += (int64_t)gridDim.x * blockDim.x)
    if (!isfinite(a[i])) atomicMin(row, (unsigned long long)(i / d));
}

extern "C" peer_status peer_k_first_nonfinite_row(const float *a, int64_t T, int64_t d,
                                                  unsigned long long *row,
                                                  cudaStream_t stream) {
  int64_t total = T * d;
  if (total == 0) return PEER_OK;
  PEER_LAUNCH(peer_k_blocks(total, 256), 256, 0, stream, nonfinite_row_kernel)(a, total, d, row);
  return peer_k_launched("first_nonfinite_row");
}

/* ------------------------------------------------------------ per feature */

#define FC 32 /* features per block (threadIdx.x) */
#define FR 8  /* token lanes (threadIdx.y) */

/* The column's total of every lane's v: lanes 0..FR-1 in order.  Every
 * thread of the block must call it (two barriers); all of a column's
 * threads get the same bits. */
static __device__ inline float combine(float v, float (*part)[FC + 1]) {
  part[threadIdx.y][threadIdx.x] = v;
  __syncthreads();
  float s = 0.0f;
#pragma unroll
  for (int r = 0; r < FR; r++) s += part[r][threadIdx.x];
  __syncthreads(); /* before the next call overwrites part */
  return s;
}

static unsigned feature_blocks(int64_t cols) { return peer_k_blocks(cols, FC); }

/* The feature loops below are block-uniform (f0 depends on blockIdx only),
 * so every thread reaches combine's barriers; threads past the last feature
 * add zeros and store nothing. */
__global__ void __launch_bounds__(FC *FR)
    batch_norm_train_kernel(float *__restrict__ q, float *__restrict__ qhat,
                            float *__restrict__ mean, float *__restrict__ invstd, int64_t T,
                            int64_t dq, const float *__restrict__ w,
                            const float *__restrict__ b) {
  __shared__ float part[FR][FC + 1];
  for (int64_t f0 = (int64_t)blockIdx.x * FC; f0 < dq; f0 += (int64_t)gridDim.x * FC) {
    const int64_t f = f0 + threadIdx.x;
    const bool on = f < dq;
    float s = 0.0f;
    if (on)
      for (int64_t t = threadIdx.y; t < T; t += FR) s += q[t * dq + f];
    const float mu = combine(s, part) / (float)T;
    float ss = 0.0f;
    if (on)
      for (int64_t t = threadIdx.y; t < T; t += FR) {
        float c = q[t * dq + f] - mu;
        ss += c * c;
      }
    const float is = 1.0f / sqrtf(combine(ss, part) / (float)T + 1e-5f);
    if (!on) continue;
    if (threadIdx.y == 0) mean[f] = mu, invstd[f] = is;
    const float wf = w[f], bf = b[f];
    for (int64_t t = threadIdx.y; t < T; t += FR) {
      float h = (q[t * dq + f] - mu) * is;
      qhat[t * dq + f] = h;
      q[t * dq + f] = h * wf + bf;
    }
  }
}

extern "C" peer_status peer_k_batch_norm_train(float *q, float *qhat, float *mean,
                                               float *invstd, int64_t T, int64_t dq,
                                               const float *weight, const float *bias,
                                               cudaStream_t stream) {
  if (T == 0 || dq == 0) return PEER_OK;
  PEER_LAUNCH(feature_blocks(dq), dim3(FC, FR), 0, stream, batch_norm_train_kernel)
  (q, qhat, mean, invstd, T, dq, weight, bias);
  return peer_k_launched("batch_norm_train");
}

__global__ void running_update_kernel(float *__restrict__ rm, float *__restrict__ rv,
                                      const float *__restrict__ mean,
                                      const float *__restrict__ invstd, int64_t T, int64_t dq,
                                      float mo, const unsigned long long *__restrict__ records,
                                      int n_records) {
  for (int i = 0; i < n_records; i++)
    if (records[i] != PEER_K_CLEAR) return; /* the same answer for every thread */
  for (int64_t f = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; f < dq;
       f += (int64_t)gridDim.x * blockDim.x) {
    float var = 1.0f / (invstd[f] * invstd[f]) - 1e-5f;
    float unbiased = var * (float)T / (float)(T - 1);
    rm[f] = (1.0f - mo) * rm[f] + mo * mean[f];
    rv[f] = (1.0f - mo) * rv[f] + mo * unbiased;
  }
}

extern "C" peer_status peer_k_running_update(float *run_mean, float *run_var, const float *mean,
                                             const float *invstd, int64_t T, int64_t dq,
                                             float momentum,
                                             const unsigned long long *records, int n_records,
                                             cudaStream_t stream) {
  if (dq == 0 || T < 2) return PEER_OK;
  PEER_LAUNCH(peer_k_blocks(dq, 256), 256, 0, stream, running_update_kernel)
  (run_mean, run_var, mean, invstd, T, dq, momentum, records, n_records);
  return peer_k_launched("running_update");
}

__global__ void record_fold_kernel(unsigned long long *dst, const unsigned long long *src,
                                   int n) {
  if ((int)threadIdx.x < n) atomicMin(dst + threadIdx.x, src[threadIdx.x]);
}

extern "C" peer_status peer_k_record_fold(unsigned long long *dst, const unsigned long long *src,
                                          int n, cudaStream_t stream) {
  if (n <= 0) return PEER_OK;
  if (n > 32) return peer_fail(PEER_ERR_INVALID_ARGUMENT, "record_fold: %d records", n);
  PEER_LAUNCH(1, 32, 0, stream, record_fold_kernel)(dst, src, n);
  return peer_k_launched("record_fold");
}

__global__ void __launch_bounds__(FC *FR)
    norm_backward_kernel(float *__restrict__ dq, const float *__restrict__ qhat,
                         const float *__restrict__ invstd, const float *__restrict__ w,
                         int64_t T, int64_t D, float *__restrict__ gw, float *__restrict__ gb) {
  __shared__ float part[FR][FC + 1];
  for (int64_t f0 = (int64_t)blockIdx.x * FC; f0 < D; f0 += (int64_t)gridDim.x * FC) {
    const int64_t f = f0 + threadIdx.x;
    const bool on = f < D;
    const float wf = on ? w[f] : 0.0f;
    float dw = 0.0f, db = 0.0f, s1 = 0.0f, s2 = 0.0f;
    if (on)
      for (int64_t t = threadIdx.y; t < T; t += FR) {
        float g = dq[t * D + f], h = qhat[t * D + f];
        dw += g * h;
        db += g;
        s1 += g * wf;
        s2 += g * wf * h;
      }
    dw = combine(dw, part);
    db = combine(db, part);
    s1 = combine(s1, part);
    s2 = combine(s2, part);
    if (!on) continue;
    if (threadIdx.y == 0) {
      if (gw) gw[f] = dw;
      if (gb) gb[f] = db;
    }
    const float scale = invstd[f] / (float)T;
    for (int64_t t = threadIdx.y; t < T; t += FR) {
      float g = dq[t * D + f] * wf;
      dq[t * D + f] = scale * ((float)T * g - s1 - qhat[t * D + f] * s2);
    }
  }
}

extern "C" peer_status peer_k_norm_backward(float *dq, const float *qhat, const float *invstd,
                                            const float *weight, int64_t T, int64_t dqdim,
                                            float *gweight, float *gbias, cudaStream_t stream) {
  if (T == 0 || dqdim == 0) return PEER_OK;
  PEER_LAUNCH(feature_blocks(dqdim), dim3(FC, FR), 0, stream, norm_backward_kernel)
  (dq, qhat, invstd, weight, T, dqdim, gweight, gbias);
  return peer_k_launched("norm_backward");
}

__global__ void __launch_bounds__(FC *FR)
    column_sums_kernel(const float *__restrict__ a, int64_t T, int64_t cols,
                       float *__restrict__ out) {
  __shared__ float part[FR][FC + 1];
  for (int64_t f0 = (int64_t)blockIdx.x * FC; f0 < cols; f0 += (int64_t)gridDim.x * FC) {
    const int64_t f = f0 + threadIdx.x;
    float s = 0.0f;
    if (f < cols)
      for (int64_t t = threadIdx.y; t < T; t += FR) s += a[t * cols + f];
    s = combine(s, part);
    if (f < cols && threadIdx.y == 0) out[f] = s;
  }
}

extern "C" peer_status peer_k_column_sums(const float *a, int64_t T, int64_t cols, float *out,
                                          cudaStream_t stream) {
  if (cols == 0) return PEER_OK;
  PEER_LAUNCH(feature_blocks(cols), dim3(FC, FR), 0, stream, column_sums_kernel)(a, T, cols, out);
  return peer_k_launched("column_sums");
}

/* ------------------------------------------------------------ query grad */

__global__ void query_grad_kernel(const int64_t *__restrict__ ids, const float *__restrict__ ds,
                                  const float *__restrict__ keys, int64_t total, int64_t H,
                                  int64_t k, int64_t n, int64_t dk, int shared,
                                  float *__restrict__ dq) {
  const int64_t D = H * dk, half = dk / 2;
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < total;
       i += (int64_t)gridDim.x * blockDim.x) {
    const int64_t t = i / D, f = i % D, h = f / dk, r = f % dk;
    const int64_t p = r >= half ? 1 : 0, j = r - p * half, g = shared ? 0 : h;
    const float *C = keys + (g * 2 + p) * n * half + j;
    const int64_t e0 = (t * H + h) * k;
    float acc = 0.0f;
    for (int64_t jj = 0; jj < k; jj++) {
      const int64_t id = ids[e0 + jj], row = p ? id % n : id / n;
      acc += ds[e0 + jj] * C[row * half];
    }
    dq[i] = acc;
  }
}

extern "C" peer_status peer_k_query_grad(const int64_t *ids, const float *ds, const float *keys,
                                         int64_t T, int64_t H, int64_t k, int64_t n, int64_t dk,
                                         int shared_keys, float *dq, cudaStream_t stream) {
  int64_t total = T * H * dk;
  if (total == 0) return PEER_OK;
  PEER_LAUNCH(peer_k_blocks(total, 256), 256, 0, stream, query_grad_kernel)
  (ids, ds, keys, total, H, k, n, dk, shared_keys, dq);
  return peer_k_launched("query_grad");
}

/* ------------------------------------------------------------ sorting */

__global__ void expert_keys_kernel(const int64_t *__restrict__ ids, int64_t ne,
                                   uint32_t *__restrict__ key, uint32_t *__restrict__ val) {
  for (int64_t e = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; e < ne;
       e += (int64_t)gridDim.x * blockDim.x) {
    key[e] = (uint32_t)ids[e];
    val[e] = (uint32_t)e;
  }
}

extern "C" peer_status peer_k_expert_sort_keys(const int64_t *ids, int64_t ne, uint32_t *key,
                                               uint32_t *val, cudaStream_t stream) {
  if (ne == 0) return PEER_OK;
  PEER_LAUNCH(peer_k_blocks(ne, 256), 256, 0, stream, expert_keys_kernel)(ids, ne, key, val);
  return peer_k_launched("expert_sort_keys");
}

__global__ void subkey_keys_kernel(const int64_t *__restrict__ ids, int64_t ne, int64_t H,
                                   int64_t k, int64_t n, int shared, uint32_t *__restrict__ key,
                                   uint32_t *__restrict__ val) {
  for (int64_t e = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; e < ne;
       e += (int64_t)gridDim.x * blockDim.x) {
    const int64_t h = (e / k) % H, g = shared ? 0 : h, id = ids[e];
    key[2 * e] = (uint32_t)((g * 2 + 0) * n + id / n);
    key[2 * e + 1] = (uint32_t)((g * 2 + 1) * n + id % n);
    val[2 * e] = (uint32_t)(2 * e);
    val[2 * e + 1] = (uint32_t)(2 * e + 1);
  }
}

extern "C" peer_status peer_k_subkey_sort_keys(const int64_t *ids, int64_t T, int64_t H,
                                               int64_t k, int64_t n, int shared_keys,
                                               uint32_t *key, uint32_t *val,
                                               cudaStream_t stream) {
  int64_t ne = T * H * k;
  if (ne == 0) return PEER_OK;
  PEER_LAUNCH(peer_k_blocks(ne, 256), 256, 0, stream, subkey_keys_kernel)
  (ids, ne, H, k, n, shared_keys, key, val);
  return peer_k_launched("subkey_sort_keys");
}

/* CUB's int item count; the backend keeps 2*T*H*k below 2^31. */
extern "C" peer_status peer_k_sort_temp_bytes(int64_t items, size_t *bytes) {
  if (items > 0x7fffffff)
    return peer_fail(PEER_ERR_UNSUPPORTED, "sort: %lld items beyond 2^31", (long long)items);
  size_t a = 0;
  cudaError_t e = cub::DeviceRadixSort::SortPairs(
      nullptr, a, (const uint32_t *)nullptr, (uint32_t *)nullptr, (const uint32_t *)nullptr,
      (uint32_t *)nullptr, (int)items, 0, 32);
  if (e != cudaSuccess) return peer_k_cuda_fail(e, "sort scratch size");
  *bytes = a;
  return PEER_OK;
}

#define SCAN_THREADS 1024

/* Run starts of the sorted keys in one block: tiles of 1024 in order, a
 * cub::BlockScan of the "key differs from the previous" flags per tile,
 * the running count in shared memory.  (cub::DeviceScan's sm_90 kernel
 * spills under CUDA 13.0, which this build refuses; one block is O(items /
 * 1024) steps, small next to the sort.) */
__global__ void __launch_bounds__(SCAN_THREADS)
    run_starts_kernel(const uint32_t *__restrict__ key, int64_t items,
                      uint32_t *__restrict__ starts, uint32_t *__restrict__ runs) {
  typedef cub::BlockScan<uint32_t, SCAN_THREADS> Scan;
  __shared__ typename Scan::TempStorage tmp;
  __shared__ uint32_t base;
  if (threadIdx.x == 0) base = 0;
  __syncthreads();
  for (int64_t i0 = 0; i0 < items; i0 += SCAN_THREADS) {
    const int64_t i = i0 + threadIdx.x;
    const uint32_t flag = i < items && (i == 0 || key[i] != key[i - 1]);
    uint32_t rank, total;
    Scan(tmp).ExclusiveSum(flag, rank, total);
    if (flag) starts[base + rank] = (uint32_t)i;
    __syncthreads(); /* every thread has read base, and is done with tmp */
    if (threadIdx.x == 0) base += total;
    __syncthreads(); /* the new base is visible */
  }
  if (threadIdx.x == 0) {
    starts[base] = (uint32_t)items;
    *runs = base;
  }
}

extern "C" peer_status peer_k_sorted_runs(const uint32_t *key_in, const uint32_t *val_in,
                                          uint32_t *key_out, uint32_t *val_out,
                                          uint32_t *starts, uint32_t *runs, int64_t items,
                                          uint32_t max_key, void *temp, size_t temp_bytes,
                                          cudaStream_t stream) {
  if (items == 0) return PEER_OK;
  int bits = 1;
  while (bits < 32 && (max_key >> bits) != 0) bits++;
  size_t tb = temp_bytes;
  cudaError_t e = cub::DeviceRadixSort::SortPairs(temp, tb, key_in, key_out, val_in, val_out,
                                                  (int)items, 0, bits, stream);
  if (e != cudaSuccess) return peer_k_cuda_fail(e, "sorted runs: radix sort");
  PEER_LAUNCH(1, SCAN_THREADS, 0, stream, run_starts_kernel)(key_out, items, starts, runs);
  return peer_k_launched("run_starts");
}

/* ------------------------------------------------------------ sorted sums */

#define ROW_THREADS 128

/* Runs are block-uniform (r from blockIdx; *runs read by all), columns per
 * thread: each output element is written by exactly one thread. */
template <bool DENSE>
__global__ void __launch_bounds__(ROW_THREADS)
    expert_grads_kernel(const uint32_t *__restrict__ key, const uint32_t *__restrict__ val,
                        const uint32_t *__restrict__ starts, const uint32_t *__restrict__ runs,
                        int64_t max_runs, const float *__restrict__ cdown,
                        const float *__restrict__ cup, const float *__restrict__ x,
                        const float *__restrict__ dy, int64_t d, int64_t hk,
                        float *__restrict__ gdown, float *__restrict__ gup,
                        int64_t *__restrict__ rows, int64_t *__restrict__ n_rows) {
  const int64_t nr = (int64_t)*runs < max_runs ? (int64_t)*runs : max_runs;
  if (n_rows && blockIdx.x == 0 && threadIdx.x == 0) *n_rows = nr;
  for (int64_t r = blockIdx.x; r < nr; r += gridDim.x) {
    const uint32_t s = starts[r], end = starts[r + 1];
    const int64_t id = key[s], out = DENSE ? id : r;
    const uint32_t hk32 = (uint32_t)hk;
    if (threadIdx.x == 0) rows[r] = id;
    float *od = gdown + out * d, *ou = gup + out * d;
    for (int64_t c = threadIdx.x; c < d; c += ROW_THREADS) {
      const float *xc = x + c, *dyc = dy + c;
      float sd = 0.0f, su = 0.0f;
      for (uint32_t i = s; i < end; i++) {
        /* 32-bit division: entries < 2^31 (the backend checks) */
        const uint32_t e = val[i];
        const size_t off = (size_t)(e / hk32) * (size_t)d;
        sd += cdown[e] * xc[off];
        su += cup[e] * dyc[off];
      }
      if (DENSE) sd += od[c], su += ou[c];
      od[c] = sd;
      ou[c] = su;
    }
  }
}

extern "C" peer_status peer_k_expert_grads(const uint32_t *key, const uint32_t *val,
                                           const uint32_t *starts, const uint32_t *runs,
                                           int64_t max_runs, const float *cdown,
                                           const float *cup, const float *x, const float *dy,
                                           int64_t d, int64_t hk, int dense, float *gdown,
                                           float *gup, int64_t *rows, int64_t *n_rows,
                                           cudaStream_t stream) {
  if (max_runs == 0) return PEER_OK;
  if (dense)
    PEER_LAUNCH(peer_k_blocks(max_runs, 1), ROW_THREADS, 0, stream, expert_grads_kernel<true>)
    (key, val, starts, runs, max_runs, cdown, cup, x, dy, d, hk, gdown, gup, rows, n_rows);
  else
    PEER_LAUNCH(peer_k_blocks(max_runs, 1), ROW_THREADS, 0, stream, expert_grads_kernel<false>)
    (key, val, starts, runs, max_runs, cdown, cup, x, dy, d, hk, gdown, gup, rows, n_rows);
  return peer_k_launched("expert_grads");
}

#define KEY_WARPS 4

/* One warp per run (warp-uniform), lanes over the half's columns. */
__global__ void __launch_bounds__(KEY_WARPS * 32)
    keys_grad_kernel(const uint32_t *__restrict__ key, const uint32_t *__restrict__ val,
                     const uint32_t *__restrict__ starts, const uint32_t *__restrict__ runs,
                     int64_t max_runs, const float *__restrict__ ds,
                     const float *__restrict__ q, int64_t H, int64_t k, int64_t dk,
                     float *__restrict__ gk) {
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int64_t half = dk / 2, D = H * dk;
  const uint32_t k32 = (uint32_t)k, H32 = (uint32_t)H;
  const int64_t nr = (int64_t)*runs < max_runs ? (int64_t)*runs : max_runs;
  for (int64_t r = (int64_t)blockIdx.x * KEY_WARPS + warp; r < nr;
       r += (int64_t)gridDim.x * KEY_WARPS) {
    const uint32_t s = starts[r], end = starts[r + 1];
    float *row = gk + (int64_t)key[s] * half;
    for (int64_t c = lane; c < half; c += 32) {
      float acc = 0.0f;
      for (uint32_t i = s; i < end; i++) {
        /* 32-bit division: 2 * entries < 2^31 (the backend checks) */
        const uint32_t v = val[i], e = v >> 1, p = v & 1u, te = e / k32;
        const int64_t t = te / H32, h = te % H32;
        acc += ds[e] * q[t * D + h * dk + p * half + c];
      }
      row[c] = acc;
    }
  }
}

extern "C" peer_status peer_k_keys_grad(const uint32_t *key, const uint32_t *val,
                                        const uint32_t *starts, const uint32_t *runs,
                                        int64_t max_runs, const float *ds, const float *q,
                                        int64_t H, int64_t k, int64_t dk, float *gk,
                                        cudaStream_t stream) {
  if (max_runs == 0) return PEER_OK;
  PEER_LAUNCH(peer_k_blocks(max_runs, KEY_WARPS), KEY_WARPS * 32, 0, stream, keys_grad_kernel)
  (key, val, starts, runs, max_runs, ds, q, H, k, dk, gk);
  return peer_k_launched("keys_grad");
}
