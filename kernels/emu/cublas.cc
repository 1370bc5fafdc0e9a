/* cublas.cc: the emulated cuBLAS.  SGEMM computes the column-major product
 * plainly: each C element one float sum over k in order (the FMA
 * contraction is the compiler's, not cuBLAS's blocking), then alpha and
 * beta; beta = 0 does not read C (as cuBLAS).  The bf16 GemmEx sums as a
 * tensor core at its worst (cublas_v2.h).  Arguments are checked as
 * cuBLAS checks them (a negative size, an unknown operation, a leading
 * dimension below the rows it must hold, a negative batch count:
 * CUBLAS_STATUS_INVALID_VALUE; no handle: NOT_INITIALIZED), and what a
 * product reads and writes must lie in device memory (else the call fails
 * with EXECUTION_FAILED and a kernel error, as a GPU's illegal address).
 * The product runs in the order of the handle's stream (runtime.cc). */
#include "cublas_v2.h"

#include "emu_internal.h"

#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include <cmath>

#include <mutex>
#include <set>

struct cublasContext {
  cudaStream_t stream;
  cublasMath_t math;
  void *workspace; /* the caller's (cublasSetWorkspace), nullptr: cuBLAS's pool */
};

namespace {

std::mutex handles_lock;
std::set<cublasContext *> handles;

bool live(cublasHandle_t h) {
  std::lock_guard<std::mutex> hold(handles_lock);
  return h && handles.count(h);
}

bool op_ok(cublasOperation_t op) {
  return op == CUBLAS_OP_N || op == CUBLAS_OP_T || op == CUBLAS_OP_C;
}

/* bf16 storage (cuda_bf16.h's __nv_bfloat16) as the products read it. */
struct bf16 {
  uint16_t bits;
};

inline float value(float x) { return x; }
inline float value(bf16 x) {
  const uint32_t u = (uint32_t)x.bits << 16;
  float f;
  memcpy(&f, &u, 4);
  return f;
}

/* The element (i, j) of op(X) for X column-major with leading dimension ld. */
template <class E>
inline float at(const E *x, cublasOperation_t op, int ld, long long i, long long j) {
  return value(op == CUBLAS_OP_N ? x[i + j * (long long)ld] : x[j + i * (long long)ld]);
}

/* Does the rows x cols matrix at p (leading dimension ld) lie in device
 * memory? */
template <class E> bool in_device(const E *p, long long rows, long long cols, int ld) {
  if (rows == 0 || cols == 0) return true;
  const long long last = (cols - 1) * (long long)ld + rows;
  return peer_emu::device_range(p, (size_t)last * sizeof(E));
}

/* SGEMM's sum: one float sum over l in order. */
struct plain_sum {
  template <class E>
  float operator()(const E *a, cublasOperation_t ta, int lda, const E *b, cublasOperation_t tb,
                   int ldb, long long i, long long j, int k) const {
    float acc = 0.0f;
    for (long long l = 0; l < k; l++) acc += at(a, ta, lda, i, l) * at(b, tb, ldb, l, j);
    return acc;
  }
};

/* x cut toward zero to a multiple of ulp (a power of two). */
inline double cut(double x, double ulp) { return std::trunc(x / ulp) * ulp; }

/* The double r cut toward zero to f32, and flushed to 0 below 2^-126. */
inline float cut_to_float(double r) {
  float f = (float)r;
  if (std::fabs((double)f) > std::fabs(r)) f = std::nextafter(f, 0.0f);
  return std::fabs(f) < 0x1p-126f ? 0.0f : f;
}

/* A tensor core's sum at its worst within the model (cublas_v2.h says
 * which): 8 exact products (double holds them) per step, from the last
 * down, with the accumulator, aligned to the largest term with 24
 * significant bits and no guard bits, then the step's exact sum cut to f32. */
struct truncating_sum {
  template <class E>
  float operator()(const E *a, cublasOperation_t ta, int lda, const E *b, cublasOperation_t tb,
                   int ldb, long long i, long long j, int k) const {
    const int group = 8;
    float acc = 0.0f;
    for (long long hi = k; hi > 0; hi -= group) {
      const long long lo = hi > group ? hi - group : 0;
      double terms[group + 1];
      int nt = 0;
      terms[nt++] = acc;
      for (long long l = hi - 1; l >= lo; l--)
        terms[nt++] = (double)at(a, ta, lda, i, l) * (double)at(b, tb, ldb, l, j);
      double big = 0.0, plain = 0.0;
      for (int t = 0; t < nt; t++) big = std::fmax(big, std::fabs(terms[t])), plain += terms[t];
      if (!std::isfinite(plain) || big == 0.0) { /* infinities and NaN as IEEE sums give them */
        acc = (float)plain;
        continue;
      }
      const double ulp = std::ldexp(1.0, std::ilogb(big) - 23);
      double sum = 0.0; /* exact: multiples of ulp below 2^28 ulp */
      for (int t = 0; t < nt; t++) sum += cut(terms[t], ulp);
      acc = cut_to_float(sum);
    }
    return acc;
  }
};

cublasStatus_t outside(const char *what, const char *which) {
  char msg[256];
  snprintf(msg, sizeof msg, "cuBLAS %s: matrix %s is not (all) in device memory", what, which);
  peer_emu::kernel_error(msg);
  return CUBLAS_STATUS_EXECUTION_FAILED;
}

template <class E, class Sum>
cublasStatus_t gemm(cublasHandle_t h, cublasOperation_t ta, cublasOperation_t tb, int m, int n,
                    int k, const float *alpha, const E *A, int lda, long long sa, const E *B,
                    int ldb, long long sb, const float *beta, float *C, int ldc, long long sc,
                    int batch, const char *what, Sum sum) {
  if (!live(h)) return CUBLAS_STATUS_NOT_INITIALIZED;
  if (!op_ok(ta) || !op_ok(tb) || m < 0 || n < 0 || k < 0 || batch < 0)
    return CUBLAS_STATUS_INVALID_VALUE;
  const int rows_a = ta == CUBLAS_OP_N ? m : k, rows_b = tb == CUBLAS_OP_N ? k : n;
  if (lda < (rows_a > 1 ? rows_a : 1) || ldb < (rows_b > 1 ? rows_b : 1) || ldc < (m > 1 ? m : 1))
    return CUBLAS_STATUS_INVALID_VALUE;
  if (!alpha || !beta) return CUBLAS_STATUS_INVALID_VALUE;
  if (m == 0 || n == 0 || batch == 0) return CUBLAS_STATUS_SUCCESS;
  if (!h->workspace) peer_emu::count_blas_default_workspace();
  const bool product = *alpha != 0.0f && k > 0;
  const int cols_a = ta == CUBLAS_OP_N ? k : m, cols_b = tb == CUBLAS_OP_N ? n : k;
  for (int b = 0; b < batch; b++) {
    if (product && !in_device(A + b * sa, rows_a, cols_a, lda)) return outside(what, "A");
    if (product && !in_device(B + b * sb, rows_b, cols_b, ldb)) return outside(what, "B");
    if (!in_device(C + b * sc, m, n, ldc)) return outside(what, "C");
  }
  /* alpha and beta are host values, read at the call; the product runs in
   * the stream's order */
  const float al = *alpha, be = *beta;
  peer_emu::enqueue(h->stream, [=] {
    for (int b = 0; b < batch; b++) {
      const E *a = A + b * sa, *bb = B + b * sb;
      float *c = C + b * sc;
      for (long long j = 0; j < n; j++)
        for (long long i = 0; i < m; i++) {
          const float acc = product ? sum(a, ta, lda, bb, tb, ldb, i, j, k) : 0.0f;
          float &out = c[i + j * (long long)ldc];
          const float ab = product ? al * acc : 0.0f;
          out = be == 0.0f ? ab : ab + be * out;
        }
    }
  });
  return CUBLAS_STATUS_SUCCESS;
}

} // namespace

extern "C" {

cublasStatus_t cublasCreate(cublasHandle_t *handle) {
  if (!handle) return CUBLAS_STATUS_INVALID_VALUE;
  cublasContext *c = new cublasContext{nullptr, CUBLAS_DEFAULT_MATH, nullptr};
  std::lock_guard<std::mutex> hold(handles_lock);
  handles.insert(c);
  *handle = c;
  return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasDestroy(cublasHandle_t handle) {
  std::lock_guard<std::mutex> hold(handles_lock);
  if (!handle || !handles.erase(handle)) return CUBLAS_STATUS_NOT_INITIALIZED;
  delete handle;
  return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasSetStream(cublasHandle_t handle, cudaStream_t stream) {
  if (!live(handle)) return CUBLAS_STATUS_NOT_INITIALIZED;
  if (!peer_emu::stream_ok(stream)) return CUBLAS_STATUS_INVALID_VALUE;
  handle->stream = stream;
  handle->workspace = nullptr; /* cuBLAS: back to its default workspace pool */
  return CUBLAS_STATUS_SUCCESS;
}

/* As cuBLAS: the workspace must be 256-byte aligned device memory of the
 * given size (a size of 0 turns the workspace off, which also counts as
 * the caller's choice here). */
cublasStatus_t cublasSetWorkspace(cublasHandle_t handle, void *workspace, size_t bytes) {
  if (!live(handle)) return CUBLAS_STATUS_NOT_INITIALIZED;
  if (bytes > 0 && (!workspace || (uintptr_t)workspace % 256 ||
                    !peer_emu::device_range(workspace, bytes)))
    return CUBLAS_STATUS_INVALID_VALUE;
  static char none;
  handle->workspace = bytes > 0 ? workspace : &none;
  return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasGetStream(cublasHandle_t handle, cudaStream_t *stream) {
  if (!live(handle)) return CUBLAS_STATUS_NOT_INITIALIZED;
  if (!stream) return CUBLAS_STATUS_INVALID_VALUE;
  *stream = handle->stream;
  return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasSetMathMode(cublasHandle_t handle, cublasMath_t mode) {
  if (!live(handle)) return CUBLAS_STATUS_NOT_INITIALIZED;
  const int base = mode & ~CUBLAS_MATH_DISALLOW_REDUCED_PRECISION_REDUCTION;
  if (base < CUBLAS_DEFAULT_MATH || base > CUBLAS_TF32_TENSOR_OP_MATH)
    return CUBLAS_STATUS_INVALID_VALUE;
  handle->math = mode;
  return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasGetMathMode(cublasHandle_t handle, cublasMath_t *mode) {
  if (!live(handle)) return CUBLAS_STATUS_NOT_INITIALIZED;
  if (!mode) return CUBLAS_STATUS_INVALID_VALUE;
  *mode = handle->math;
  return CUBLAS_STATUS_SUCCESS;
}

const char *cublasGetStatusName(cublasStatus_t s) {
  switch (s) {
  case CUBLAS_STATUS_SUCCESS:
    return "CUBLAS_STATUS_SUCCESS";
  case CUBLAS_STATUS_NOT_INITIALIZED:
    return "CUBLAS_STATUS_NOT_INITIALIZED";
  case CUBLAS_STATUS_ALLOC_FAILED:
    return "CUBLAS_STATUS_ALLOC_FAILED";
  case CUBLAS_STATUS_INVALID_VALUE:
    return "CUBLAS_STATUS_INVALID_VALUE";
  case CUBLAS_STATUS_ARCH_MISMATCH:
    return "CUBLAS_STATUS_ARCH_MISMATCH";
  case CUBLAS_STATUS_MAPPING_ERROR:
    return "CUBLAS_STATUS_MAPPING_ERROR";
  case CUBLAS_STATUS_EXECUTION_FAILED:
    return "CUBLAS_STATUS_EXECUTION_FAILED";
  case CUBLAS_STATUS_INTERNAL_ERROR:
    return "CUBLAS_STATUS_INTERNAL_ERROR";
  case CUBLAS_STATUS_NOT_SUPPORTED:
    return "CUBLAS_STATUS_NOT_SUPPORTED";
  }
  return "CUBLAS_STATUS_UNKNOWN";
}

const char *cublasGetStatusString(cublasStatus_t s) {
  switch (s) {
  case CUBLAS_STATUS_SUCCESS:
    return "success";
  case CUBLAS_STATUS_NOT_INITIALIZED:
    return "the library was not initialized";
  case CUBLAS_STATUS_ALLOC_FAILED:
    return "the resource allocation failed";
  case CUBLAS_STATUS_INVALID_VALUE:
    return "an invalid numeric value was used as an argument";
  case CUBLAS_STATUS_ARCH_MISMATCH:
    return "an absent device architectural feature is required";
  case CUBLAS_STATUS_MAPPING_ERROR:
    return "an access to GPU memory space failed";
  case CUBLAS_STATUS_EXECUTION_FAILED:
    return "the GPU program failed to execute";
  case CUBLAS_STATUS_INTERNAL_ERROR:
    return "an internal operation failed";
  case CUBLAS_STATUS_NOT_SUPPORTED:
    return "the functionality requested is not supported";
  }
  return "unknown error";
}

cublasStatus_t cublasSgemm(cublasHandle_t handle, cublasOperation_t transa,
                           cublasOperation_t transb, int m, int n, int k, const float *alpha,
                           const float *A, int lda, const float *B, int ldb, const float *beta,
                           float *C, int ldc) {
  return gemm(handle, transa, transb, m, n, k, alpha, A, lda, 0, B, ldb, 0, beta, C, ldc, 0, 1,
              "cublasSgemm", plain_sum());
}

cublasStatus_t cublasSgemmStridedBatched(cublasHandle_t handle, cublasOperation_t transa,
                                         cublasOperation_t transb, int m, int n, int k,
                                         const float *alpha, const float *A, int lda,
                                         long long strideA, const float *B, int ldb,
                                         long long strideB, const float *beta, float *C, int ldc,
                                         long long strideC, int batchCount) {
  return gemm(handle, transa, transb, m, n, k, alpha, A, lda, strideA, B, ldb, strideB, beta, C,
              ldc, strideC, batchCount, "cublasSgemmStridedBatched", plain_sum());
}

cublasStatus_t cublasGemmStridedBatchedEx(cublasHandle_t handle, cublasOperation_t transa,
                                          cublasOperation_t transb, int m, int n, int k,
                                          const void *alpha, const void *A, cudaDataType_t Atype,
                                          int lda, long long strideA, const void *B,
                                          cudaDataType_t Btype, int ldb, long long strideB,
                                          const void *beta, void *C, cudaDataType_t Ctype, int ldc,
                                          long long strideC, int batchCount,
                                          cublasComputeType_t computeType, cublasGemmAlgo_t algo) {
  if (!live(handle)) return CUBLAS_STATUS_NOT_INITIALIZED;
  if (Atype != CUDA_R_16BF || Btype != CUDA_R_16BF || Ctype != CUDA_R_32F ||
      computeType != CUBLAS_COMPUTE_32F || algo != CUBLAS_GEMM_DEFAULT)
    return CUBLAS_STATUS_NOT_SUPPORTED;
  return gemm(handle, transa, transb, m, n, k, (const float *)alpha, (const bf16 *)A, lda, strideA,
              (const bf16 *)B, ldb, strideB, (const float *)beta, (float *)C, ldc, strideC,
              batchCount, "cublasGemmStridedBatchedEx", truncating_sum());
}

} // extern "C"
