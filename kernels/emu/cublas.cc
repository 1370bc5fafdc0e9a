/* cublas.cc: the emulated cuBLAS.  SGEMM computes the column-major product
 * plainly: each C element one float sum over k in order (the FMA
 * contraction is the compiler's, not cuBLAS's blocking), then alpha and
 * beta; beta = 0 does not read C (as cuBLAS).  Arguments are checked as
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

/* The element (i, j) of op(X) for X column-major with leading dimension ld. */
inline float at(const float *x, cublasOperation_t op, int ld, long long i, long long j) {
  return op == CUBLAS_OP_N ? x[i + j * (long long)ld] : x[j + i * (long long)ld];
}

/* Does the rows x cols matrix at p (leading dimension ld) lie in device
 * memory? */
bool in_device(const float *p, long long rows, long long cols, int ld) {
  if (rows == 0 || cols == 0) return true;
  const long long last = (cols - 1) * (long long)ld + rows;
  return peer_emu::device_range(p, (size_t)last * sizeof(float));
}

cublasStatus_t outside(const char *what, const char *which) {
  char msg[256];
  snprintf(msg, sizeof msg, "cuBLAS %s: matrix %s is not (all) in device memory", what, which);
  peer_emu::kernel_error(msg);
  return CUBLAS_STATUS_EXECUTION_FAILED;
}

cublasStatus_t gemm(cublasHandle_t h, cublasOperation_t ta, cublasOperation_t tb, int m, int n,
                    int k, const float *alpha, const float *A, int lda, long long sa,
                    const float *B, int ldb, long long sb, const float *beta, float *C, int ldc,
                    long long sc, int batch, const char *what) {
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
      const float *a = A + b * sa, *bb = B + b * sb;
      float *c = C + b * sc;
      for (long long j = 0; j < n; j++)
        for (long long i = 0; i < m; i++) {
          float acc = 0.0f;
          if (product)
            for (long long l = 0; l < k; l++)
              acc += at(a, ta, lda, i, l) * at(bb, tb, ldb, l, j);
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
              "cublasSgemm");
}

cublasStatus_t cublasSgemmStridedBatched(cublasHandle_t handle, cublasOperation_t transa,
                                         cublasOperation_t transb, int m, int n, int k,
                                         const float *alpha, const float *A, int lda,
                                         long long strideA, const float *B, int ldb,
                                         long long strideB, const float *beta, float *C, int ldc,
                                         long long strideC, int batchCount) {
  return gemm(handle, transa, transb, m, n, k, alpha, A, lda, strideA, B, ldb, strideB, beta, C,
              ldc, strideC, batchCount, "cublasSgemmStridedBatched");
}

} // extern "C"
