/* internal.h: what the library's own files share and users never see: the
 * layer object, the backend table, error reporting and aligned allocation. */
#ifndef PEER_INTERNAL_H
#define PEER_INTERNAL_H

#include "optim_rule.h"
#include "peer.h"

#include <stdbool.h>

/* C++ includers (the kernels, bench_pieces) see the layer's atomics as
 * std::atomic<T>, of the same size and alignment; none of them touches them.
 * extern "C++" lets this header sit inside their extern "C" blocks. */
#ifdef __cplusplus
extern "C++" {
#include <atomic>
}
#define PEER_ATOMIC(T) std::atomic<T>
#else
#include <stdatomic.h>
#define PEER_ATOMIC(T) _Atomic(T)
#endif

#if defined(__GNUC__)
#define PEER_PRINTF(a, b) __attribute__((format(printf, a, b)))
#else
#define PEER_PRINTF(a, b)
#endif

/* Record the message for peer_last_error() and return status. */
peer_status peer_fail(peer_status status, const char *fmt, ...) PEER_PRINTF(2, 3);
/* Clear the calling thread's last error. */
void peer_clear_error(void);

/* 64-byte aligned allocation; large blocks come from mmap with transparent
 * huge pages asked for (random expert-row gathers miss the TLB otherwise).
 * Memory is zeroed.  Returns NULL on failure. */
void *peer_alloc(size_t bytes);
void peer_free(void *ptr, size_t bytes);

/* Overflow-checked size arithmetic: false if a*b (or a+b) overflows. */
bool peer_mul_size(size_t a, size_t b, size_t *out);
bool peer_add_size(size_t a, size_t b, size_t *out);

/* Indices of the parameter slots; a layer fills only those it has. */
enum peer_param_slot {
  PEER_P_QUERY_WEIGHT = 0,
  PEER_P_QUERY_BIAS,
  PEER_P_NORM_WEIGHT,
  PEER_P_NORM_BIAS,
  PEER_P_NORM_MEAN,
  PEER_P_NORM_VAR,
  PEER_P_KEYS,
  PEER_P_EXPERTS_DOWN,
  PEER_P_EXPERTS_UP,
  PEER_P_COUNT
};

/* Sizes derived from the config, computed once at creation. */
typedef struct peer_dims {
  int64_t d, H, dk, half, n, N, k, kp, G, dq; /* dq = H*d_key, G = key groups */
} peer_dims;

struct peer_backend_i;
struct peer_optim_plan;

/* The CPU backend's reduced-precision copy of the sub-keys and their norms
 * (peer/cpu_bf16.c: bf16, or int8 with a scale per key), made from the keys
 * as they were at keys_gen == gen. */
enum { PEER_KEYS16_BF16 = 0, PEER_KEYS16_INT8 = 1 };
typedef struct peer_keys16 {
  void *mem;
  size_t bytes;
  uint64_t gen;
  bool valid; /* mem holds a copy made at gen from finite keys */
  int format; /* PEER_KEYS16_*: what mem holds */
} peer_keys16;

/* How the CPU retrieval selected each (token, head, half)'s top-k': by the
 * bf16 (or, on the CPU, int8) first pass and exact re-rank, or by the f32
 * scores after the first pass left too many candidates or met a non-finite
 * value (fallback).  Halves the f32 path took from the start are in none.
 * The CUDA backend counts bf16 and fallback only. */
typedef struct peer_retrieval_stats {
  int64_t bf16, fallback, int8;
} peer_retrieval_stats;

struct peer_layer {
  peer_config cfg;
  peer_options opt;
  peer_dims dims;
  /* slot -> tensor; data == NULL for slots this config lacks */
  peer_tensor slot[PEER_P_COUNT];
  int n_params;
  int param_slot[PEER_P_COUNT]; /* i-th present parameter -> slot */
  /* The expert tables hold columns [expert_col0, expert_col0 + expert_cols)
   * of the full [N, d] tables: all of them (0, d) except in a shard
   * (peer_shard, shard.c), whose layer no backend call may run. */
  int64_t expert_col0, expert_cols;
  const struct peer_backend_i *backend;
  void *backend_data; /* the backend's own per-layer state (NULL for CPU) */
  float norm_momentum;
  /* scratch (see peer_layer_set_workspace) */
  void *ws;
  size_t ws_bytes;
  bool ws_owned;
  /* Identity stamp: unique in the process (never reused, unlike the
   * address), recorded by the layer's contexts and optimizers. */
  uint64_t id;
  /* Name of the call running on the layer, NULL when none
   * (peer_layer_enter). */
  PEER_ATOMIC(const char *) busy;
  /* Derived copies of the keys are valid while keys_gen is what they were
   * made at: every call that may write the keys bumps it (peer_layer_enter:
   * all but the read-only calls).  keys_exposed: peer_layer_param has handed
   * out the keys' memory, which the caller may write at any time since. */
  uint64_t keys_gen;
  bool keys_exposed;
  peer_keys16 keys16;
  /* The CPU backend's copy of query.weight laid out for small batches
   * (peer/cpu_decode.c), kept by the same rule as keys16 (gen, keys_gen);
   * query_exposed: peer_layer_param has handed out query.weight. */
  peer_keys16 wq_blocks;
  bool query_exposed;
  peer_retrieval_stats retrieval_stats;
};

/* One call at a time per layer: peer_layer_enter marks the layer busy with
 * `what` (the call's name) or, if another call holds it, fails with
 * PEER_ERR_BUSY naming both; peer_layer_leave ends the call.  One atomic
 * compare-and-swap: two layers on two threads never wait for each other. */
peer_status peer_layer_enter(const peer_layer *layer, const char *what);
void peer_layer_leave(const peer_layer *layer);
/* peer_retrieve (its checks, then the retrieval) for a caller that holds the
 * layer: a call that retrieves and then goes on (peer_shard_forward). */
peer_status peer_retrieve_held(peer_layer *layer, int64_t n_tokens, const float *x,
                               int64_t *indices, float *scores, float *gates);

/* peer_forward's argument checks (`what` names the call): the batch, y, and
 * no two of x, y, indices, gates overlapping (for peer_shard_forward too). */
peer_status peer_forward_check(const peer_layer *layer, int64_t n_tokens, const float *x,
                               const float *y, const int64_t *indices, const float *gates,
                               const char *what);

/* PEER_ERR_INVALID_ARGUMENT naming `what`, `a_name` and `b_name` when the byte
 * ranges [a, a + a_bytes) and [b, b + b_bytes) overlap (aliasing checks). */
peer_status peer_check_disjoint(const char *what, const void *a, size_t a_bytes,
                                const char *a_name, const void *b, size_t b_bytes,
                                const char *b_name);

/* The parameters a config implies, as a layer lays them out: names, dtypes,
 * shapes and nbytes (data NULL) by slot in slot[], the present slots in
 * order[0 .. returned count).  cfg must have passed peer_config_validate. */
int peer_params_describe(const peer_config *cfg, peer_tensor slot[PEER_P_COUNT],
                         int order[PEER_P_COUNT]);

/* What a backend provides; the core reaches it only through this table. */
typedef struct peer_backend_i {
  const char *name;
  /* allocate / free one parameter's storage (zeroed) */
  void *(*alloc)(size_t bytes);
  void (*free)(void *ptr, size_t bytes);
  /* scratch bytes needed for T tokens */
  size_t (*workspace_size)(const peer_layer *layer, int64_t n_tokens);
  /* ws has at least workspace_size(T) bytes */
  peer_status (*forward)(peer_layer *layer, int64_t n_tokens, const float *x,
                         float *y, int64_t *indices, float *gates, void *ws);
  peer_status (*retrieve)(peer_layer *layer, int64_t n_tokens, const float *x,
                          int64_t *indices, float *scores, float *gates,
                          bool brute, void *ws);
  /* training: context memory for T tokens, and the two passes */
  size_t (*context_bytes)(const peer_layer *layer, int64_t n_tokens);
  peer_status (*forward_train)(peer_layer *layer, peer_context *ctx, int64_t n_tokens,
                               const float *x, float *y, void *ws);
  peer_status (*backward)(peer_layer *layer, peer_context *ctx, const float *dy, float *dx,
                          peer_grads *grads);
  /* Optional (NULL for CPU): set up backend_data before the parameters are
   * allocated (failing with a status, e.g. no device), and tear it down after
   * they are freed. */
  peer_status (*open)(peer_layer *layer);
  void (*close)(peer_layer *layer);
  /* Optional: copy host bytes into parameter storage that is not host memory.
   * NULL means parameters are host memory, written in place. */
  peer_status (*upload)(peer_layer *layer, void *dst, const void *src, size_t bytes);
  /* Optional (NULL: every size the core allows): refuse a training context
   * of max_tokens this backend cannot train, with a status and a message
   * that starts with `what`; peer_context_size and peer_context_create ask
   * it before context_bytes. */
  peer_status (*context_check)(const peer_layer *layer, int64_t max_tokens, const char *what);
  /* Optional (NULL: host memory from peer_alloc / peer_free): a training
   * context's memory, context_bytes of it or a backend's handle to that
   * much (the CUDA backend's holds device memory and, once its host path
   * has been used, that path's staging).  context_free must not need the
   * layer: a context may be freed after its layer. */
  void *(*context_alloc)(const peer_layer *layer, size_t bytes);
  void (*context_free)(void *mem, size_t bytes);
  /* Optional (NULL: host parameters, stepped by optim.c's own loops): one
   * optimizer step on parameters and state in the backend's memory (state
   * comes from `alloc`).  `stage` is the optimizer's staging for host
   * gradients, grown here (alloc / free) and freed by the core with `free`. */
  peer_status (*optimizer_step)(peer_layer *layer, const struct peer_optim_plan *plan,
                                void **stage, size_t *stage_bytes);
  /* Optional (NULL: parameters are host memory, read in place): copy
   * parameter or state storage out into host bytes (upload's mirror). */
  peer_status (*download)(const peer_layer *layer, void *dst, const void *src, size_t bytes);
} peer_backend_i;

/* One optimizer step as optim.c hands it to a backend's optimizer_step. */
typedef struct peer_optim_plan {
  peer_optim_rule dense, rows; /* dense parameters' rule, expert rows' rule */
  const float *grad[PEER_P_COUNT]; /* by slot; NULL: not stepped (experts: see rows) */
  float *m[PEER_P_COUNT], *v[PEER_P_COUNT]; /* state by slot; NULL: none */
  /* Expert rows, when grad[PEER_P_EXPERTS_DOWN] is set: ascending ids, and
   * their gradient rows ([capacity, d] sparse, or [N, d] with experts_dense) */
  const int64_t *expert_rows;
  int64_t n_expert_rows;          /* the count, unless d_n_expert_rows */
  const int64_t *d_n_expert_rows; /* device path: the count on the device, or NULL */
  int64_t expert_capacity;        /* device path: the most rows there can be */
  bool experts_dense;
  bool host_grads; /* gradients (and expert_rows) are host memory, already checked */
  void *stream;    /* device path: the caller's stream; the host path uses the backend's */
} peer_optim_plan;

/* The name of a parameter slot's gradient in peer_grads ("query_weight", ...). */
const char *peer_grad_name(int slot);

/* An optimizer step on gradients in the device memory of the optimizer's
 * layer's backend (peer_cuda_optimizer_step): argument checks, the plan,
 * the backend's optimizer_step on `stream`; the expert row count is
 * *d_n_rows on the device, or g->n_expert_rows when d_n_rows is NULL. */
peer_status peer_optimizer_step_device(peer_optimizer *o, const peer_grads *g,
                                       const int64_t *d_n_rows, void *stream, const char *what);

/* o (NULL passes) is an optimizer of L: PEER_ERR_INVALID_ARGUMENT naming
 * `what` otherwise. */
peer_status peer_optimizer_check_layer(const peer_optimizer *o, const peer_layer *L,
                                       const char *what);

/* A checkpoint's optimizer metadata: its kinds must be o's; *step its step
 * count (the sharded layer's loads, shard_file.c, as checkpoint_load's). */
peer_status peer_optimizer_file_meta(const peer_safetensors *f, const char *path,
                                     const peer_optimizer *o, int64_t *step);
void peer_optimizer_set_step(peer_optimizer *o, int64_t step);

/* A checkpoint's optimizer metadata, as checkpoint_save and a shard file
 * write it: the keys (the seven hyperparameters, the two kinds, the step)
 * and o's values for them, as key, value pairs. */
#define PEER_OPTIM_META_N 10
extern const char *const peer_optim_meta_keys[PEER_OPTIM_META_N];
typedef struct peer_optim_meta {
  const char *pair[2 * PEER_OPTIM_META_N];
  char value[PEER_OPTIM_META_N][32];
} peer_optim_meta;
void peer_optimizer_meta_of(const peer_optimizer *o, peer_optim_meta *m);

/* A training context: the generic part; `mem` is laid out by the backend. */
struct peer_context {
  const peer_layer *layer;
  int64_t max_tokens;
  int64_t n_tokens;   /* of the last forward_train */
  const float *x;     /* the caller's input of the last forward_train */
  const float *x_dev; /* CUDA: x on the device for backward (the host path's staged copy,
                         or the caller's d_x on the device-pointer path) */
  bool ready;         /* a forward_train succeeded since the last backward */
  int n_threads;      /* per-thread scratch was sized for this many */
  uint64_t layer_id;   /* the layer's identity stamp at creation */
  void *mem;          /* the backend's (context_alloc) */
  size_t bytes;       /* context_bytes(max_tokens) */
  void (*mem_free)(void *mem, size_t bytes); /* how mem goes back */
};

/* peer_layer_create for a layer whose expert tables are [N, cols], columns
 * [col0, col0 + cols) of the full ones; peer_layer_init fills them with the
 * full layer's values there.  For shard.c only: the backends' forward and
 * training read d columns, so such a layer goes to no backend call but
 * retrieval. */
peer_status peer_layer_create_cols(peer_layer **out, const peer_config *cfg,
                                   const peer_options *opt, int64_t col0, int64_t cols);

/* A sharded layer's communicator at creation: both collectives present
 * (`collectives`) and rank in [0, world); PEER_ERR_INVALID_ARGUMENT naming
 * `what` otherwise. */
peer_status peer_shard_check_comm(const char *what, bool collectives, int rank, int world);
/* The config agreement at a sharded layer's creation (peer_shard_create,
 * peer_cuda_shard_create): every rank's outcome of its local checks
 * (`local`, its message the calling thread's last error) or, when they
 * passed, its config goes to every rank through `gather` (each rank's
 * `bytes` from `mine` into all[rank]; a failure returns its own status), so
 * that all return the same: the lowest failing rank's status, then ranks out
 * of order, then a config that differs from rank 0's.  `what` names the call. */
typedef peer_status (*peer_agree_gather)(const void *comm, const void *mine, void *all,
                                         size_t bytes);
peer_status peer_shard_agree(const char *what, int rank, int world, peer_status local,
                             const peer_config *cfg, peer_agree_gather gather, const void *comm);
/* A sharded layer's files (shard_file.c), for both sharded layers: L is the
 * shard's layer (its expert columns expert_col0, expert_cols) on rank `rank`
 * of `world`, o its optimizer or NULL; `what` names the call.  Saving and
 * load_full hold L (peer_layer_enter) and stage storage that is not host
 * memory through the host; load goes through peer_checkpoint_load. */
peer_status peer_shard_file_save(const peer_layer *L, const peer_optimizer *o, int rank, int world,
                                 const char *path, const char *what);
peer_status peer_shard_file_load(peer_layer *L, peer_optimizer *o, int rank, int world,
                                 const char *path, const char *what);
peer_status peer_shard_file_load_full(peer_layer *L, peer_optimizer *o, const char *path,
                                      const char *what);

extern const peer_backend_i peer_backend_cpu;
#ifdef PEER_USE_CUDA
extern const peer_backend_i peer_backend_cuda;
#endif

/* The argument checks and context bookkeeping of a training forward and
 * backward, shared by peer.h's calls and peer_cuda.h's (`what` names the
 * call in messages).  peer_train_begin checks the context and batch and marks
 * the context not ready; peer_train_end records a queued or finished forward
 * of T tokens of x.  peer_backward_check checks a backward's arguments
 * against the context (ready, dy, the expert triple and its capacity, bias
 * and norm gradients only where the layer has them). */
peer_status peer_train_begin(const peer_layer *layer, peer_context *ctx, int64_t n_tokens,
                             const void *x, const void *y, const char *what);
void peer_train_end(peer_context *ctx, int64_t n_tokens, const float *x);
peer_status peer_backward_check(const peer_layer *layer, const peer_context *ctx, const void *dy,
                                const peer_grads *grads, const char *what);
/* A host backward's start (peer.h's, the sharded layer's): peer_backward_check,
 * dx refused where it overlaps dy or the forward's x (read after dx is
 * written), then no expert rows yet and, for an empty batch, the dense
 * gradients zeroed: the backend runs only when ctx->n_tokens > 0. */
peer_status peer_backward_begin(const peer_layer *layer, const peer_context *ctx, const float *dy,
                                const float *dx, peer_grads *grads, const char *what);

/* Threads a new context is sized for (per-thread scratch). */
int peer_context_threads(const peer_layer *layer);

/* Scratch for T tokens: the registered buffer or the grown internal one. */
peer_status peer_layer_scratch(peer_layer *layer, int64_t n_tokens, void **ws);

/* Weight-file metadata keys (PEER.md "Weight file"). */
#define PEER_META_PREFIX "peer."
#define PEER_META_FORMAT PEER_META_PREFIX "format"
/* Most config fields peer_config_format lists, and its longest text. */
#define PEER_CONFIG_FIELDS_MAX 32
#define PEER_CONFIG_TEXT_MAX 1024

/* A config as metadata pairs: pair[0..1] = "peer.format", version, then
 * "peer.<field>", value for every field of peer_config_format, in its order. */
typedef struct peer_layer_meta {
  int n_pairs;
  const char *pair[2 * (PEER_CONFIG_FIELDS_MAX + 1)];
  char text[PEER_CONFIG_TEXT_MAX];
  char key[PEER_CONFIG_FIELDS_MAX][64];
  char format[16];
} peer_layer_meta;

peer_status peer_layer_meta_of(const peer_config *cfg, peer_layer_meta *out);

/* ---- weight files and checkpoints: one reader (layerfile.c) ----
 * Opening checks the container (peer_safetensors_open); these check a file
 * against what a layer (and an optimizer) needs, before anything is
 * allocated or written. */

/* The layer config a file's "peer.*" metadata describes: "peer.format" this
 * library's, every field present, spelt exactly (no blanks, signs or other
 * keys in a value) and valid as a whole.  PEER_ERR_FORMAT naming the key. */
peer_status peer_file_config(const peer_safetensors *f, const char *path, peer_config *cfg);
/* The file's metadata config is cfg, field by field (a value spelt
 * differently but meaning the same, "BF16" for "bf16", passes). */
peer_status peer_file_same_config(const peer_safetensors *f, const char *path,
                                  const peer_config *cfg);

/* What a file must hold (at most PEER_FILE_WANT_MAX tensors: a layer's
 * parameters and two state tensors for each). */
#define PEER_FILE_WANT_MAX (3 * PEER_P_COUNT)
typedef struct peer_file_want {
  const peer_tensor *t; /* every tensor wanted, with its exact dtype and shape */
  int n;
  const char *skip_prefix; /* file tensors starting with this are ignored (NULL: none) */
  const char *layer_desc;  /* "a layer with this config (...)": who lacks an extra tensor */
  const char *state_desc;  /* "this optimizer (...)": who lacks extra "optim." state, or NULL */
} peer_file_want;

/* Check a file against `want`: no tensor is extra, none is missing, the
 * wanted bytes fit in the file's data at all (a file of kilobytes never
 * makes anyone allocate gigabytes, whatever its metadata says), and each
 * has its dtype and shape.  Only then may the caller allocate and read. */
peer_status peer_file_check(const peer_safetensors *f, const char *path,
                            const peer_file_want *want);
/* Read every wanted tensor into its data (after peer_file_check). */
peer_status peer_file_read(const peer_safetensors *f, const peer_file_want *want);
/* peer_file_read for tensors in L's parameter (or optimizer state) storage:
 * through one host buffer and the backend's upload when it has one. */
peer_status peer_file_read_into(peer_layer *L, const peer_safetensors *f,
                                const peer_file_want *want);
/* Saving a layer whose storage is not host memory (its backend has
 * download): replace each of the n tensors' data by a host copy (peer_alloc),
 * or leave them all as they were on failure; peer_tensors_host_free gives the
 * copies back.  Both do nothing for host storage. */
peer_status peer_tensors_to_host(const peer_layer *L, peer_tensor *t, int n, const char *what);
void peer_tensors_host_free(const peer_layer *L, peer_tensor *t, int n);

/* Bytes of the data section (after the header) of an open file. */
uint64_t peer_safetensors_data_bytes(const peer_safetensors *f);

/* "F32 [4, 2, 8, 4]" into buf; equal dtype and shape. */
void peer_tensor_format_layout(char *buf, size_t size, const peer_tensor *t);
bool peer_tensor_same_layout(const peer_tensor *a, const peer_tensor *b);

/* Parse a decimal int64 in [lo, hi] (whole string); false otherwise. */
bool peer_parse_i64(const char *s, int64_t lo, int64_t hi, int64_t *out);

#endif
