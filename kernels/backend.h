/* backend.h: what the CUDA backend's two host files share (backend.c: state,
 * scratch, forward, retrieval and the device-pointer API; backend_train.c:
 * training contexts, forward_train and backward): the layer's device state,
 * the non-finite records, carving of device buffers and the small wrappers
 * around failed runtime and cuBLAS calls. */
#ifndef PEER_KERNELS_BACKEND_H
#define PEER_KERNELS_BACKEND_H

#include "internal.h"
#include "peer_cuda.h"

#include "experts.h"
#include "retrieval.h"
#include "status.h"
#include "train.h"

#include <cublas_v2.h>
#include <stdbool.h>
#include <stddef.h>

/* The layer's non-finite records: device words lowered by integer atomicMin
 * (PEER_K_CLEAR when empty), read and cleared by check_stream.  A training
 * context keeps its batch's own REC_SCORE and REC_X (they decide the running
 * statistics' update) and folds them into the layer's. */
enum {
  REC_SCORE = 0, /* smallest t*H + h with a non-finite sub-key or candidate score */
  REC_X = 1,     /* smallest row of a training forward's x holding NaN or infinity */
  REC_DY = 2,    /* smallest row of a backward's dy holding NaN or infinity */
  REC_GRAD = 3,  /* a device optimizer step refused: its first non-finite gradient (optim.h) */
  REC_STEP = 4,  /* scratch of the device optimizer step being queued */
  REC_COUNT = 5,
  REC_BATCH = 2 /* the records a training context keeps: REC_SCORE, REC_X */
};

typedef struct cuda_state {
  int device;
  cublasHandle_t blas;
  cudaStream_t own;          /* the host-pointer path's stream */
  unsigned long long *d_bad; /* [REC_COUNT] the non-finite records */
  void *ws;                  /* device scratch (registered or owned) */
  size_t ws_bytes;
  bool ws_owned;
  void *io; /* device copies of the host-pointer path's inputs and outputs */
  size_t io_bytes;
  void *blas_ws; /* cuBLAS's workspace, the layer's own (BLAS_WORKSPACE bytes) */
  /* The bf16 first pass of the sub-key scores (kernels/README.md "bf16
   * sub-key scores"), NULL where the layer is not eligible: the keys in
   * bf16 [G, 2, n, d_key/2] and their norms [3][G*2*n], made from the keys
   * at keys_gen == keys16_gen (remade for every call while the keys are
   * exposed; keys16_held: made for the chunked forward in progress, once
   * for all its chunks); fallbacks: device count of rows the first pass
   * could not bound (peer_cb_retrieval_stats); bf16_rows: rows sent
   * through it. */
  uint16_t *keys16;
  float *norms16;
  uint64_t keys16_gen;
  bool keys16_made, keys16_held, f32_scores;
  unsigned long long *fallbacks;
  int64_t bf16_rows;
  /* The chunked forward (backend.c, run_forward): retrieval on `side`,
   * forked from the caller's stream at ev_fork, each chunk's end recorded
   * in ev_chunk[c] for the caller's stream; chunks 0: automatic. */
  cudaStream_t side;
  cudaEvent_t ev_fork, ev_chunk[PEER_CUDA_MAX_CHUNKS];
  int chunks;
} cuda_state;

/* cuBLAS's recommended workspace on Hopper (4 MiB before it); set with
 * cublasSetWorkspace after every cublasSetStream, which resets it to
 * cuBLAS's pool: NVIDIA's condition for the same bits on any stream, and no
 * allocation by cuBLAS on the hot path. */
#define BLAS_WORKSPACE ((size_t)32 << 20)
/* As peer_k_cuda_fail (status.h), for cuBLAS: its allocation failure is
 * PEER_ERR_OUT_OF_MEMORY, and a runtime error it met is not left behind. */
static inline peer_status blas_fail(cublasStatus_t s, const char *what) {
  (void)cudaGetLastError();
  return peer_fail(s == CUBLAS_STATUS_ALLOC_FAILED ? PEER_ERR_OUT_OF_MEMORY : PEER_ERR_CUDA,
                   "%s: cuBLAS: %s", what, cublasGetStatusString(s));
}

/* The layer's cuBLAS handle on `stream`, with the layer's workspace. */
static inline peer_status blas_on(const cuda_state *st, cudaStream_t stream, const char *what) {
  cublasStatus_t bs = cublasSetStream(st->blas, stream);
  if (bs == CUBLAS_STATUS_SUCCESS) bs = cublasSetWorkspace(st->blas, st->blas_ws, BLAS_WORKSPACE);
  return bs == CUBLAS_STATUS_SUCCESS ? PEER_OK : blas_fail(bs, what);
}

/* Wait for `stream`; a failure is reported as `what`. */
static inline peer_status wait_for(cudaStream_t stream, const char *what) {
  cudaError_t e = cudaStreamSynchronize(stream);
  return e == cudaSuccess ? PEER_OK : peer_k_cuda_fail(e, what);
}

/* After a failure on the host path: let the queued work finish (it may use
 * buffers the next call reuses) and report only the first failure. */
static inline void drain(cudaStream_t stream) {
  if (cudaStreamSynchronize(stream) != cudaSuccess) (void)cudaGetLastError();
}

/* Wait for the whole device, every stream (the caller's non-blocking ones
 * included).  Parameter set-up writes through the legacy stream (cudaMemset,
 * cudaMemcpy from pageable memory), which is not ordered with non-blocking
 * streams, so it waits before and after; the host-pointer calls wait before
 * they start (host_enter); memory that queued work may still use is given
 * back only after a wait (cudaFree is not documented to wait for it). */
static inline peer_status device_idle(const char *what) {
  cudaError_t e = cudaDeviceSynchronize();
  return e == cudaSuccess ? PEER_OK : peer_k_cuda_fail(e, what);
}

/* Teardown of memory on `device`: make it current (cudaFree acts on the
 * current device), wait for it (work queued earlier, on any stream, may
 * still use the memory), free.  A teardown reports nothing and leaves no
 * error behind. */
static inline void free_on(int device, void *ptr) {
  if (!ptr) return;
  if (cudaSetDevice(device) == cudaSuccess) {
    (void)cudaDeviceSynchronize();
    cudaFree(ptr);
  }
  (void)cudaGetLastError();
}

static inline cuda_state *state_of(const peer_layer *L) { return (cuda_state *)L->backend_data; }
/* ------------------------------------------------------------ scratch */

static inline size_t round256(size_t b) { return (b + 255) & ~(size_t)255; }

/* One buffer of a carved allocation: where its address goes, its size. */
typedef struct part {
  void **ptr;
  size_t bytes;
} part;

/* Lay `count` parts out one after another from base, each 256-byte
 * aligned, and return the bytes they take; base NULL only counts. */
static inline size_t carve(const part *parts, size_t count, char *base) {
  size_t off = 0;
  for (size_t i = 0; i < count; i++) {
    if (base) *parts[i].ptr = base + off;
    off += round256(parts[i].bytes);
  }
  return off;
}

/* Device scratch of one forward or retrieval, carved from one buffer. */
typedef struct dev_ws {
  float *q;      /* [T, dq] */
  float *S;      /* [T, H, 2, n] sub-key scores */
  uint16_t *q16; /* [T, dq] the queries in bf16 (the bf16 first pass) */
  float *coef;   /* [T, H, 2, 4] its bounds' coefficients */
  float *list_s; /* [T, H, 2, k'] */
  int64_t *list_id;
  int64_t *ids;  /* [T, H, k] when the caller gives none */
  float *scores; /* [T, H, k] */
  float *gates;  /* [T, H, k] */
} dev_ws;

static inline peer_status copy(void *dst, const void *src, size_t bytes, enum cudaMemcpyKind kind,
                               cudaStream_t stream) {
  if (!dst || bytes == 0) return PEER_OK;
  cudaError_t e = cudaMemcpyAsync(dst, src, bytes, kind, stream);
  return e == cudaSuccess ? PEER_OK : peer_k_cuda_fail(e, "cuda host path: cudaMemcpyAsync");
}

/* The device-pointer calls of peer_cuda.h take the layer's one-call-at-a-time
 * flag (peer_layer_enter) as peer.h's calls do; the backend table's entries
 * run inside the core's.  A NULL layer is left to the call's own checks. */
static inline peer_status peer_cb_busy(const peer_layer *L, const char *what) {
  return L ? peer_layer_enter(L, what) : PEER_OK;
}
static inline void peer_cb_idle(const peer_layer *L) {
  if (L) peer_layer_leave(L);
}

/* backend.c */
peer_status peer_cb_check_stream(peer_layer *L, cudaStream_t stream);
peer_status peer_cb_enter(const peer_layer *L, int64_t T, const void *d_x, const char *what);
peer_status peer_cb_host_enter(const peer_layer *L, int64_t T, const void *x, const char *what);
/* The layer's device scratch for T tokens into *w, grown when needed (a
 * wait for the device and cudaMalloc); refused with PEER_ERR_STATE, nothing
 * touched, when it must grow while *stream (NULL: no stream to check) is
 * being captured into a CUDA graph. */
peer_status peer_cb_device_scratch(peer_layer *L, int64_t T, dev_ws *w, const cudaStream_t *stream);
/* PEER_OK unless *stream (NULL: none) is being captured into a CUDA graph,
 * where scratch of `have` bytes cannot grow to `need`: PEER_ERR_STATE,
 * naming `what`. */
peer_status peer_cb_growth_allowed(const cudaStream_t *stream, const char *what, int64_t T,
                                   size_t need, size_t have);
peer_status peer_cb_project_query(peer_layer *L, int64_t T, const float *d_x, float *q,
                                  bool running, cudaStream_t stream);
peer_status peer_cb_search(peer_layer *L, int64_t T, const float *q, int64_t *ids, float *scores,
                           float *gates, bool brute, unsigned long long *bad, cudaStream_t stream,
                           const dev_ws *w);
/* How the sub-key scores are computed: by f32 cuBLAS products, or by the
 * bf16 first pass with exact re-scoring, the default where the layer is
 * eligible (d_key/2 a multiple of 8).  peer_cb_set_f32_scores forces the
 * f32 products (tests, comparisons); peer_cb_retrieval_stats waits for the
 * device and gives the rows the bf16 pass selected and those it left to
 * its fallback. */
bool peer_cb_bf16_scores(const peer_layer *L);
peer_status peer_cb_set_f32_scores(peer_layer *L, bool f32);
peer_status peer_cb_retrieval_stats(const peer_layer *L, peer_retrieval_stats *out);

/* A training context's device buffer (backend_train.c), carved for its
 * max_tokens T; E = T*H*k entries. */
typedef struct train_mem {
  float *q, *qhat, *dq;      /* [T, dq]: final queries, normalised (batch norm), grad */
  float *mean, *invstd;      /* [dq] batch statistics */
  int64_t *ids;              /* [E] */
  float *scores, *gates, *z; /* [E]; z = u_i . x */
  float *ds, *cup, *cdown;   /* [E] per-entry coefficients */
  uint32_t *key, *val, *key2, *val2, *starts; /* sorts: 2E (+1) each */
  uint32_t *runs;                             /* distinct rows of the last sort */
  unsigned long long *rec; /* [REC_BATCH] this batch's REC_SCORE, REC_X records */
  void *temp;              /* the sorts' scratch (run counts, CUB) */
  size_t temp_bytes;
  void *red;               /* the reductions over tokens' partial sums */
  size_t red_bytes;
} train_mem;

/* backend_train.c: the training entries of the backend table */
size_t peer_cb_cuda_host_workspace(const peer_layer *L, int64_t T);
size_t peer_cb_cuda_context_bytes(const peer_layer *L, int64_t T);
peer_status peer_cb_cuda_context_check(const peer_layer *L, int64_t T, const char *what);
void *peer_cb_cuda_context_alloc(const peer_layer *L, size_t bytes);
void peer_cb_cuda_context_free(void *mem, size_t bytes);
peer_status peer_cb_cuda_forward_train(peer_layer *L, peer_context *ctx, int64_t T, const float *x,
                                       float *y, void *host_ws);
peer_status peer_cb_cuda_backward(peer_layer *L, peer_context *ctx, const float *dy, float *dx,
                                  peer_grads *g);
/* The passes of a device training step that a sharded layer
 * (backend_shard.c) shares with the unsharded one: ctx's buffers; the
 * forward's queries and retrieval, and its end (running statistics,
 * records, x kept); the backward's expert gradient rows (w columns of x and
 * dy from the given addresses, rows ld apart) and its replicated part
 * (query, sub-key, norm, bias and projection gradients, dx += dq Wq). */
peer_status peer_cb_context_mem(const peer_layer *L, const peer_context *c, train_mem *m);
peer_status peer_cb_train_queries(peer_layer *L, int64_t T, const float *d_x, const train_mem *m,
                                  cudaStream_t stream);
peer_status peer_cb_train_finish(peer_layer *L, peer_context *ctx, int64_t T, const float *d_x,
                                 const train_mem *m, cudaStream_t stream);
peer_status peer_cb_expert_rows(const peer_layer *L, int64_t T, const train_mem *m, const float *x,
                                const float *dy, int64_t ld, int64_t w, const peer_grads *g,
                                int64_t *n_rows, cudaStream_t stream);
peer_status peer_cb_query_backward(peer_layer *L, int64_t T, const train_mem *m, const float *x,
                                   float *d_dx, const peer_grads *g, cudaStream_t stream);
/* An empty batch's backward: dense gradients zeroed, no expert rows. */
peer_status peer_cb_backward_empty(const peer_layer *L, const peer_grads *g, int64_t *n_rows,
                                   cudaStream_t stream);

/* backend_optim.c: the optimizer step and download entries */
peer_status peer_cb_cuda_optimizer_step(peer_layer *L, const peer_optim_plan *p, void **stage,
                                        size_t *stage_bytes);
peer_status peer_cb_cuda_download(const peer_layer *L, void *dst, const void *src, size_t bytes);

#endif
