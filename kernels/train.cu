/* train.cu: the training kernels besides the expert backward (experts.cu):
 *   per-feature reductions over tokens (batch statistics, batch-norm
 *   backward, column sums) in two levels: blocks of 32 features x a fixed
 *   chunk of tokens write partial sums, then a thread per feature adds the
 *   chunks' partials in order, so each sum is one fixed sequence;
 *   query_grad: one thread per dq element, the head's k entries in order;
 *   sorted gradients: (row, entry) pairs sorted by cub::DeviceRadixSort
 *   (stable: entries stay in entry order within a row), run starts from
 *   per-tile counts of "new key" flags, a scan of the counts and per-tile
 *   cub::BlockScans, then one block (experts) or warp (sub-keys) per
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

/* Reductions over the T tokens of a [T, cols] in two levels.  The tokens
 * split into P chunks of `chunk` tokens (reduce_shape: functions of T and
 * cols only); block (feature block, chunk c) sums its chunk for 32
 * features (lane y: tokens y, y+8, ... of the chunk in order, then the 8
 * lanes' partials in order) into part[s][c][f]; a second kernel, thread
 * per feature, adds the P partials of each sum in chunk order.  Each result
 * is one fixed sequence of operations whatever the launch's scheduling. */

#define FC 32 /* features per block (threadIdx.x) */
#define FR 8  /* token lanes (threadIdx.y) */
#define RED_MIN_TOKENS 16   /* tokens per chunk at least (2 per lane) */
#define RED_BLOCKS 2048     /* feature blocks x chunks aimed at: 15 per SM on 132 SMs */
#define RED_SUMS 2          /* the most sums one pass makes (norm backward's) */

typedef struct reduce_shape {
  int64_t chunk, P, fblocks; /* tokens per chunk, chunks, feature blocks */
} reduce_shape;

static int64_t red_most_chunks(int64_t cols) {
  const int64_t fb = (cols + FC - 1) / FC;
  return RED_BLOCKS / fb > 1 ? RED_BLOCKS / fb : 1;
}

static reduce_shape reduce_shape_of(int64_t T, int64_t cols) {
  reduce_shape r;
  const int64_t most = red_most_chunks(cols), even = (T + most - 1) / most;
  r.chunk = even > RED_MIN_TOKENS ? even : RED_MIN_TOKENS;
  r.P = (T + r.chunk - 1) / r.chunk;
  r.fblocks = (cols + FC - 1) / FC;
  return r;
}

/* P <= min(most chunks, ceil(T / RED_MIN_TOKENS)), which grows with T, so
 * a buffer sized for max_tokens serves every smaller batch. */
extern "C" size_t peer_k_reduce_scratch_bytes(int64_t T, int64_t cols) {
  const int64_t most = red_most_chunks(cols), by_t = (T + RED_MIN_TOKENS - 1) / RED_MIN_TOKENS;
  const int64_t P = by_t < most ? by_t : most;
  return (size_t)(RED_SUMS * P * cols + RED_SUMS * cols) * sizeof(float);
}

static peer_status reduce_scratch_check(size_t have, int64_t T, int64_t cols, const char *what) {
  const size_t need = peer_k_reduce_scratch_bytes(T, cols);
  if (have < need)
    return peer_fail(PEER_ERR_INVALID_ARGUMENT, "%s: %zu bytes of scratch, %zu needed", what,
                     have, need);
  return PEER_OK;
}

static dim3 reduce_grid(const reduce_shape &r) {
  return dim3(peer_k_blocks(r.fblocks, 1), (unsigned)r.P);
}

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

/* What the first level sums per (token t, feature f), Op::N sums; `at` is
 * the feature's value Op::feature gave (read once per feature). */
struct column_op { /* a[t, f] */
  static const int N = 1;
  const float *a;
  __device__ float feature(int64_t) const { return 0.0f; }
  __device__ void add(int64_t i, float, float *acc) const { acc[0] += a[i]; }
};
struct centred_squares_op { /* (q[t, f] - mean[f])^2 */
  static const int N = 1;
  const float *q, *mean;
  __device__ float feature(int64_t f) const { return mean[f]; }
  __device__ void add(int64_t i, float mu, float *acc) const {
    const float c = q[i] - mu;
    acc[0] += c * c;
  }
};
struct norm_grad_op { /* g qhat, g: g = d loss / d (normalised, affine) q */
  static const int N = 2;
  const float *g, *qhat;
  __device__ float feature(int64_t) const { return 0.0f; }
  __device__ void add(int64_t i, float, float *acc) const {
    const float gi = g[i];
    acc[0] += gi * qhat[i];
    acc[1] += gi;
  }
};

/* First level: block (x, c) writes part[(s*P + c)*cols + f].  The feature
 * loop is block-uniform (f0 from blockIdx only), so every thread reaches
 * combine's barriers; threads past the last feature add zeros. */
template <class Op>
__global__ void __launch_bounds__(FC *FR)
    partial_sums_kernel(const Op op, int64_t T, int64_t cols, int64_t chunk,
                        float *__restrict__ part) {
  __shared__ float lanes[FR][FC + 1];
  const int64_t c = blockIdx.y, P = gridDim.y, t0 = c * chunk;
  const int64_t t1 = t0 + chunk < T ? t0 + chunk : T;
  for (int64_t f0 = (int64_t)blockIdx.x * FC; f0 < cols; f0 += (int64_t)gridDim.x * FC) {
    const int64_t f = f0 + threadIdx.x;
    float acc[Op::N];
#pragma unroll
    for (int s = 0; s < Op::N; s++) acc[s] = 0.0f;
    if (f < cols) {
      const float at = op.feature(f);
      for (int64_t t = t0 + threadIdx.y; t < t1; t += FR) op.add(t * cols + f, at, acc);
    }
#pragma unroll
    for (int s = 0; s < Op::N; s++) acc[s] = combine(acc[s], lanes);
    if (f < cols && threadIdx.y == 0)
#pragma unroll
      for (int s = 0; s < Op::N; s++) part[(s * P + c) * cols + f] = acc[s];
  }
}

/* What the second level does with a feature's N totals. */
struct column_fin {
  static const int N = 1;
  float *out;
  __device__ void store(int64_t f, const float *s) const { out[f] = s[0]; }
};
struct mean_fin {
  static const int N = 1;
  float *mean;
  float T;
  __device__ void store(int64_t f, const float *s) const { mean[f] = s[0] / T; }
};
struct invstd_fin { /* from the centred sum of squares: biased variance, eps 1e-5 */
  static const int N = 1;
  float *invstd;
  float T;
  __device__ void store(int64_t f, const float *s) const {
    invstd[f] = 1.0f / sqrtf(s[0] / T + 1e-5f);
  }
};
struct norm_grad_fin { /* gw, gb (either NULL), and w sum(g), w sum(g qhat) into wsums */
  static const int N = 2;
  float *gw, *gb, *wsums;
  const float *w;
  int64_t cols;
  __device__ void store(int64_t f, const float *s) const {
    if (gw) gw[f] = s[0];
    if (gb) gb[f] = s[1];
    wsums[f] = w[f] * s[1];
    wsums[cols + f] = w[f] * s[0];
  }
};

/* Second level: thread per feature, the P partials in chunk order. */
template <class Fin>
__global__ void total_sums_kernel(const Fin fin, const float *__restrict__ part, int64_t P,
                                  int64_t cols) {
  for (int64_t f = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; f < cols;
       f += (int64_t)gridDim.x * blockDim.x) {
    float s[Fin::N];
#pragma unroll
    for (int j = 0; j < Fin::N; j++) {
      float acc = 0.0f;
      for (int64_t c = 0; c < P; c++) acc += part[(j * P + c) * cols + f];
      s[j] = acc;
    }
    fin.store(f, s);
  }
}

template <class Op, class Fin>
static peer_status reduce_tokens(const Op &op, const Fin &fin, const reduce_shape &r, int64_t T,
                                 int64_t cols, float *part, cudaStream_t stream,
                                 const char *what) {
  PEER_LAUNCH(reduce_grid(r), dim3(FC, FR), 0, stream, partial_sums_kernel<Op>)
  (op, T, cols, r.chunk, part);
  peer_status s = peer_k_launched(what);
  if (s) return s;
  PEER_LAUNCH(peer_k_blocks(cols, 256), 256, 0, stream, total_sums_kernel<Fin>)
  (fin, part, r.P, cols);
  return peer_k_launched(what);
}

/* qhat = (q - mean) invstd, q = qhat w + b; block (x, c) as the partial
 * sums: each thread its feature's values once, the chunk's tokens. */
__global__ void __launch_bounds__(FC *FR)
    batch_norm_apply_kernel(float *__restrict__ q, float *__restrict__ qhat,
                            const float *__restrict__ mean, const float *__restrict__ invstd,
                            const float *__restrict__ w, const float *__restrict__ b, int64_t T,
                            int64_t dq, int64_t chunk) {
  const int64_t t0 = blockIdx.y * chunk, t1 = t0 + chunk < T ? t0 + chunk : T;
  for (int64_t f = (int64_t)blockIdx.x * FC + threadIdx.x; f < dq; f += (int64_t)gridDim.x * FC) {
    const float mu = mean[f], is = invstd[f], wf = w[f], bf = b[f];
    for (int64_t t = t0 + threadIdx.y; t < t1; t += FR) {
      const float h = (q[t * dq + f] - mu) * is;
      qhat[t * dq + f] = h;
      q[t * dq + f] = h * wf + bf;
    }
  }
}

extern "C" peer_status peer_k_batch_norm_train(float *q, float *qhat, float *mean,
                                               float *invstd, int64_t T, int64_t dq,
                                               const float *weight, const float *bias,
                                               void *scratch, size_t scratch_bytes,
                                               cudaStream_t stream) {
  if (T == 0 || dq == 0) return PEER_OK;
  peer_status s = reduce_scratch_check(scratch_bytes, T, dq, "batch_norm_train");
  const reduce_shape r = reduce_shape_of(T, dq);
  float *part = (float *)scratch;
  if (s ||
      (s = reduce_tokens(column_op{q}, mean_fin{mean, (float)T}, r, T, dq, part, stream,
                         "batch_norm_train: mean")) ||
      (s = reduce_tokens(centred_squares_op{q, mean}, invstd_fin{invstd, (float)T}, r, T, dq,
                         part, stream, "batch_norm_train: variance")))
    return s;
  PEER_LAUNCH(reduce_grid(r), dim3(FC, FR), 0, stream, batch_norm_apply_kernel)
  (q, qhat, mean, invstd, weight, bias, T, dq, r.chunk);
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

/* dq = invstd / T (T g w - w sum(g) - qhat w sum(g qhat)) with the sums
 * norm_grad_fin left in wsums; blocks as batch_norm_apply. */
__global__ void __launch_bounds__(FC *FR)
    norm_backward_apply_kernel(float *__restrict__ dq, const float *__restrict__ qhat,
                               const float *__restrict__ invstd, const float *__restrict__ w,
                               const float *__restrict__ wsums, int64_t T, int64_t D,
                               int64_t chunk) {
  const int64_t t0 = blockIdx.y * chunk, t1 = t0 + chunk < T ? t0 + chunk : T;
  for (int64_t f = (int64_t)blockIdx.x * FC + threadIdx.x; f < D; f += (int64_t)gridDim.x * FC) {
    const float wf = w[f], s1 = wsums[f], s2 = wsums[D + f], scale = invstd[f] / (float)T;
    for (int64_t t = t0 + threadIdx.y; t < t1; t += FR) {
      const float g = dq[t * D + f] * wf;
      dq[t * D + f] = scale * ((float)T * g - s1 - qhat[t * D + f] * s2);
    }
  }
}

extern "C" peer_status peer_k_norm_backward(float *dq, const float *qhat, const float *invstd,
                                            const float *weight, int64_t T, int64_t dqdim,
                                            float *gweight, float *gbias, void *scratch,
                                            size_t scratch_bytes, cudaStream_t stream) {
  if (T == 0 || dqdim == 0) return PEER_OK;
  peer_status s = reduce_scratch_check(scratch_bytes, T, dqdim, "norm_backward");
  const reduce_shape r = reduce_shape_of(T, dqdim);
  float *part = (float *)scratch, *wsums = part + RED_SUMS * r.P * dqdim;
  if (s || (s = reduce_tokens(norm_grad_op{dq, qhat},
                              norm_grad_fin{gweight, gbias, wsums, weight, dqdim}, r, T, dqdim,
                              part, stream, "norm_backward")))
    return s;
  PEER_LAUNCH(reduce_grid(r), dim3(FC, FR), 0, stream, norm_backward_apply_kernel)
  (dq, qhat, invstd, weight, wsums, T, dqdim, r.chunk);
  return peer_k_launched("norm_backward");
}

extern "C" peer_status peer_k_column_sums(const float *a, int64_t T, int64_t cols, float *out,
                                          void *scratch, size_t scratch_bytes,
                                          cudaStream_t stream) {
  if (cols == 0) return PEER_OK;
  if (T == 0) {
    cudaError_t e = cudaMemsetAsync(out, 0, (size_t)cols * sizeof(float), stream);
    return e == cudaSuccess ? PEER_OK : peer_k_cuda_fail(e, "column_sums: cudaMemsetAsync");
  }
  peer_status s = reduce_scratch_check(scratch_bytes, T, cols, "column_sums");
  if (s) return s;
  return reduce_tokens(column_op{a}, column_fin{out}, reduce_shape_of(T, cols), T, cols,
                       (float *)scratch, stream, "column_sums");
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

/* Run starts of the sorted keys, over the whole device: tiles of RUN_TILE
 * keys (RUN_THREADS threads, RUN_ITEMS consecutive keys each).  Three
 * launches: run_counts, block per tile, counts the tile's "key differs from
 * the previous one" flags; run_offsets, one block, turns the tile counts
 * into exclusive prefix sums in place (ceil(tiles / 1024) steps) and writes
 * the run count and the closing start; run_starts, block per tile, ranks
 * its flags with a cub::BlockScan over the threads' counts and writes the
 * starts from the tile's offset.  (cub::DeviceScan's sm_90 kernel spills
 * under CUDA 13.0, which this build refuses.)  Integer sums: the same
 * results whatever the order blocks run in. */
#define RUN_THREADS 256
#define RUN_ITEMS 4
#define RUN_TILE (RUN_THREADS * RUN_ITEMS)
#define OFFSET_THREADS 1024

static int64_t run_tiles(int64_t items) { return (items + RUN_TILE - 1) / RUN_TILE; }

/* The flags of a thread's RUN_ITEMS keys from i0 (0 past the end). */
static __device__ inline uint32_t run_flags(const uint32_t *__restrict__ key, int64_t i0,
                                            int64_t items, bool *flag) {
  uint32_t n = 0, prev = i0 > 0 && i0 <= items ? key[i0 - 1] : 0;
#pragma unroll
  for (int j = 0; j < RUN_ITEMS; j++) {
    const int64_t i = i0 + j;
    const uint32_t k = i < items ? key[i] : 0;
    flag[j] = i < items && (i == 0 || k != prev);
    n += flag[j];
    prev = k;
  }
  return n;
}

typedef cub::BlockScan<uint32_t, RUN_THREADS> RunScan;

/* Tile loops are block-uniform (from blockIdx only), as the scan needs. */
__global__ void __launch_bounds__(RUN_THREADS)
    run_counts_kernel(const uint32_t *__restrict__ key, int64_t items, int64_t tiles,
                      uint32_t *__restrict__ counts) {
  __shared__ typename RunScan::TempStorage tmp;
  for (int64_t b = blockIdx.x; b < tiles; b += gridDim.x) {
    bool flag[RUN_ITEMS];
    const uint32_t n = run_flags(key, b * RUN_TILE + threadIdx.x * RUN_ITEMS, items, flag);
    uint32_t rank, total;
    RunScan(tmp).ExclusiveSum(n, rank, total);
    if (threadIdx.x == 0) counts[b] = total;
    __syncthreads(); /* every thread is done with tmp before the next tile */
  }
}

typedef cub::BlockScan<uint32_t, OFFSET_THREADS> OffsetScan;

__global__ void __launch_bounds__(OFFSET_THREADS)
    run_offsets_kernel(uint32_t *__restrict__ counts, int64_t tiles, int64_t items,
                       uint32_t *__restrict__ starts, uint32_t *__restrict__ runs) {
  __shared__ typename OffsetScan::TempStorage tmp;
  __shared__ uint32_t base;
  if (threadIdx.x == 0) base = 0;
  __syncthreads();
  for (int64_t b0 = 0; b0 < tiles; b0 += OFFSET_THREADS) {
    const int64_t b = b0 + threadIdx.x;
    const uint32_t n = b < tiles ? counts[b] : 0;
    uint32_t rank, total;
    OffsetScan(tmp).ExclusiveSum(n, rank, total);
    if (b < tiles) counts[b] = base + rank;
    __syncthreads(); /* every thread has read base, and is done with tmp */
    if (threadIdx.x == 0) base += total;
    __syncthreads(); /* the new base is visible */
  }
  if (threadIdx.x == 0) {
    starts[base] = (uint32_t)items;
    *runs = base;
  }
}

__global__ void __launch_bounds__(RUN_THREADS)
    run_starts_kernel(const uint32_t *__restrict__ key, int64_t items, int64_t tiles,
                      const uint32_t *__restrict__ offsets, uint32_t *__restrict__ starts) {
  __shared__ typename RunScan::TempStorage tmp;
  for (int64_t b = blockIdx.x; b < tiles; b += gridDim.x) {
    bool flag[RUN_ITEMS];
    const int64_t i0 = b * RUN_TILE + threadIdx.x * RUN_ITEMS;
    const uint32_t n = run_flags(key, i0, items, flag);
    uint32_t rank, total;
    RunScan(tmp).ExclusiveSum(n, rank, total);
    uint32_t at = offsets[b] + rank;
#pragma unroll
    for (int j = 0; j < RUN_ITEMS; j++)
      if (flag[j]) starts[at++] = (uint32_t)(i0 + j);
    __syncthreads(); /* every thread is done with tmp before the next tile */
  }
}

/* The scratch of peer_k_sorted_runs: the tile counts first (256-byte
 * rounded), then CUB's sort scratch. */
static size_t run_counts_bytes(int64_t items) {
  return ((size_t)run_tiles(items) * sizeof(uint32_t) + 255) & ~(size_t)255;
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
  *bytes = run_counts_bytes(items) + a;
  return PEER_OK;
}

extern "C" peer_status peer_k_sorted_runs(const uint32_t *key_in, const uint32_t *val_in,
                                          uint32_t *key_out, uint32_t *val_out,
                                          uint32_t *starts, uint32_t *runs, int64_t items,
                                          uint32_t max_key, void *temp, size_t temp_bytes,
                                          cudaStream_t stream) {
  if (items == 0) { /* no runs: the count and the closing start all the same */
    cudaError_t e = cudaMemsetAsync(runs, 0, sizeof *runs, stream);
    if (e == cudaSuccess) e = cudaMemsetAsync(starts, 0, sizeof *starts, stream);
    return e == cudaSuccess ? PEER_OK : peer_k_cuda_fail(e, "sorted runs: no items");
  }
  const size_t counts_bytes = run_counts_bytes(items);
  if (temp_bytes < counts_bytes)
    return peer_fail(PEER_ERR_INVALID_ARGUMENT, "sorted runs: %zu bytes of scratch for %lld items",
                     temp_bytes, (long long)items);
  uint32_t *counts = (uint32_t *)temp;
  int bits = 1;
  while (bits < 32 && (max_key >> bits) != 0) bits++;
  size_t tb = temp_bytes - counts_bytes;
  cudaError_t e = cub::DeviceRadixSort::SortPairs((char *)temp + counts_bytes, tb, key_in, key_out,
                                                  val_in, val_out, (int)items, 0, bits, stream);
  if (e != cudaSuccess) return peer_k_cuda_fail(e, "sorted runs: radix sort");
  const int64_t tiles = run_tiles(items);
  const unsigned grid = peer_k_blocks(tiles, 1);
  PEER_LAUNCH(grid, RUN_THREADS, 0, stream, run_counts_kernel)(key_out, items, tiles, counts);
  peer_status s = peer_k_launched("run_counts");
  if (s) return s;
  PEER_LAUNCH(1, OFFSET_THREADS, 0, stream, run_offsets_kernel)(counts, tiles, items, starts, runs);
  if ((s = peer_k_launched("run_offsets"))) return s;
  PEER_LAUNCH(grid, RUN_THREADS, 0, stream, run_starts_kernel)
  (key_out, items, tiles, counts, starts);
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
                        const float *__restrict__ dy, int64_t ld, int64_t w, int64_t hk,
                        float *__restrict__ gdown, float *__restrict__ gup,
                        int64_t *__restrict__ rows, int64_t *__restrict__ n_rows) {
  const int64_t nr = (int64_t)*runs < max_runs ? (int64_t)*runs : max_runs;
  if (n_rows && blockIdx.x == 0 && threadIdx.x == 0) *n_rows = nr;
  for (int64_t r = blockIdx.x; r < nr; r += gridDim.x) {
    const uint32_t s = starts[r], end = starts[r + 1];
    const int64_t id = key[s], out = DENSE ? id : r;
    const uint32_t hk32 = (uint32_t)hk;
    if (threadIdx.x == 0) rows[r] = id;
    float *od = gdown + out * w, *ou = gup + out * w;
    for (int64_t c = threadIdx.x; c < w; c += ROW_THREADS) {
      const float *xc = x + c, *dyc = dy + c;
      float sd = 0.0f, su = 0.0f;
      for (uint32_t i = s; i < end; i++) {
        /* 32-bit division: entries < 2^31 (the backend checks) */
        const uint32_t e = val[i];
        const size_t off = (size_t)(e / hk32) * (size_t)ld;
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
                                           int64_t ld, int64_t w, int64_t hk, int dense,
                                           float *gdown,
                                           float *gup, int64_t *rows, int64_t *n_rows,
                                           cudaStream_t stream) {
  if (max_runs == 0) return PEER_OK;
  if (dense)
    PEER_LAUNCH(peer_k_blocks(max_runs, 1), ROW_THREADS, 0, stream, expert_grads_kernel<true>)
    (key, val, starts, runs, max_runs, cdown, cup, x, dy, ld, w, hk, gdown, gup, rows, n_rows);
  else
    PEER_LAUNCH(peer_k_blocks(max_runs, 1), ROW_THREADS, 0, stream, expert_grads_kernel<false>)
    (key, val, starts, runs, max_runs, cdown, cup, x, dy, ld, w, hk, gdown, gup, rows, n_rows);
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
