/* peer.h: the public C API of peer, an exact implementation of the PEER layer
 * (Parameter Efficient Expert Retrieval, He 2024): product-key retrieval over
 * N = n*n single-neuron experts.  The layer's contract (math, names, tie rule,
 * file format) is docs/PEER.md; this header follows it.
 *
 * Conventions:
 *  - every fallible call returns peer_status (0 = success); the message of the
 *    last failure on the calling thread is peer_last_error();
 *  - the library never exits, aborts or prints;
 *  - arrays are row-major; the caller owns every pointer it passes in and every
 *    buffer it passes out, unless a comment says otherwise;
 *  - a layer takes one call at a time (it reuses internal scratch memory): a
 *    call that finds another running on the same layer, or on its contexts or
 *    optimizers, returns PEER_ERR_BUSY naming both calls and changes nothing.
 *    Use one layer per thread (layers never wait for each other) or
 *    serialise calls.  (peer_cuda.h's device-pointer calls are not checked.)
 *  - outputs must not overlap inputs or each other (no in-place y = x):
 *    PEER_ERR_INVALID_ARGUMENT naming both buffers.
 * This header has no CUDA types; see peer_cuda.h for device pointers. */
#ifndef PEER_H
#define PEER_H

#include <stddef.h>
#include <stdint.h>

/* PEER_API marks the functions the library exports.  The shared library is
 * built with hidden visibility, so nothing else leaves it; for users (and the
 * static library) the mark changes nothing.  Defined before this header is
 * included, it wins. */
#ifndef PEER_API
#if defined(__GNUC__) || defined(__clang__)
#define PEER_API __attribute__((visibility("default")))
#else
#define PEER_API
#endif
#endif

#ifdef __cplusplus
extern "C" {
#endif

#define PEER_VERSION_MAJOR 0
#define PEER_VERSION_MINOR 1
#define PEER_VERSION_PATCH 0
#define PEER_VERSION_NUMBER \
  (PEER_VERSION_MAJOR * 10000 + PEER_VERSION_MINOR * 100 + PEER_VERSION_PATCH)
/* Version of the weight-file layout written in "peer.format". */
#define PEER_FORMAT_VERSION 1

/* Run-time version: PEER_VERSION_NUMBER of the library actually linked. */
PEER_API int peer_version_number(void);
PEER_API const char *peer_version_string(void);
/* sizeof, in the library actually linked, of a public struct named as in
 * this header ("peer_config", "peer_options", "peer_tensor", "peer_grads",
 * "peer_optim_config"); 0 for any other name.  Bindings that re-declare the
 * structs (ctypes, cffi) compare their sizes with these at load time. */
PEER_API size_t peer_struct_size(const char *name);

/* ------------------------------------------------------------------ status */

/* Values are pinned; new ones are appended only. */
typedef enum peer_status {
  PEER_OK = 0,
  PEER_ERR_INVALID_ARGUMENT = 1, /* NULL pointer, negative count, bad name */
  PEER_ERR_CONFIG = 2,           /* impossible or unknown configuration */
  PEER_ERR_OUT_OF_MEMORY = 3,
  PEER_ERR_IO = 4,               /* open/read/write/rename failed */
  PEER_ERR_FORMAT = 5,           /* malformed or inconsistent file */
  PEER_ERR_NONFINITE = 6,        /* NaN or infinity where a score needs a number */
  PEER_ERR_SHAPE = 7,            /* tensor shape or dtype disagrees */
  PEER_ERR_UNSUPPORTED = 8,      /* valid request this build cannot do */
  PEER_ERR_NO_DEVICE = 9,        /* CUDA backend asked for, no usable device */
  PEER_ERR_CUDA = 10,            /* a CUDA runtime or library call failed */
  PEER_ERR_STATE = 11,           /* call out of order (e.g. backward before forward) */
  PEER_ERR_BUSY = 12             /* the layer is in a call on another thread */
} peer_status;

/* Short constant name of a status ("invalid argument", ...). */
PEER_API const char *peer_status_string(peer_status status);
/* Message of the last failure on the calling thread ("" if none).  Valid until
 * the next failing call on this thread. */
PEER_API const char *peer_last_error(void);

/* ------------------------------------------------------------------ config */

typedef enum peer_activation {
  PEER_ACT_RELU = 0,
  PEER_ACT_GELU = 1,      /* exact, 0.5 x (1 + erf(x / sqrt 2)) */
  PEER_ACT_GELU_TANH = 2, /* tanh approximation */
  PEER_ACT_SILU = 3,
  PEER_ACT_IDENTITY = 4
} peer_activation;

typedef enum peer_gate {
  PEER_GATE_SOFTMAX = 0, /* softmax over the k kept scores of one head */
  PEER_GATE_SIGMOID = 1, /* each score alone */
  PEER_GATE_RELU = 2     /* each score alone ("non-competing") */
} peer_gate;

typedef enum peer_query_norm {
  PEER_NORM_NONE = 0,
  PEER_NORM_BATCHNORM = 1
} peer_query_norm;

typedef enum peer_dtype {
  PEER_F32 = 0,
  PEER_BF16 = 1,
  PEER_I64 = 2
} peer_dtype;

/* Every option of the layer, named as in PEER.md. */
typedef struct peer_config {
  int64_t d_model;      /* d */
  int64_t n_heads;      /* H */
  int64_t d_key;        /* query width per head, even */
  int64_t n_subkeys;    /* n; N = n*n experts */
  int64_t top_k;        /* k */
  int64_t subkey_top_k; /* k', k <= k' <= n; 0 means "same as top_k" */
  int shared_keys;      /* 1: one set of sub-keys for all heads */
  peer_activation activation;
  peer_gate gate;
  peer_query_norm query_norm;
  int query_bias;
  peer_dtype weight_dtype; /* PEER_F32 or PEER_BF16 (expert tables only) */
} peer_config;

/* Defaults: d_model 512, n_heads 8, d_key 256, n_subkeys 1024, top_k 16,
 * subkey_top_k 0 (= top_k), shared_keys 0, gelu, softmax, no norm, no bias,
 * f32. */
PEER_API void peer_config_default(peer_config *cfg);
/* Apply "key=value,key=value" (PEER.md names) on top of *cfg.  Unknown keys,
 * malformed numbers and bad enum values fail naming the key; *cfg is left
 * unchanged on failure.  Values are not cross-checked: call
 * peer_config_validate. */
PEER_API peer_status peer_config_parse(peer_config *cfg, const char *text);
/* Check ranges and relations; the error message names the offending field. */
PEER_API peer_status peer_config_validate(const peer_config *cfg);
/* k' actually used (subkey_top_k, or top_k when 0). */
PEER_API int64_t peer_config_subkey_top_k(const peer_config *cfg);
/* N = n_subkeys^2. */
PEER_API int64_t peer_config_n_experts(const peer_config *cfg);
/* Write "d_model=512,n_heads=8,..." (every field) into buf; returns the
 * length it needs (without the NUL), like snprintf. */
PEER_API int peer_config_format(const peer_config *cfg, char *buf, size_t size);
/* Names of the enums as used in config strings and files. */
PEER_API const char *peer_activation_name(peer_activation a);
PEER_API const char *peer_gate_name(peer_gate g);
PEER_API const char *peer_query_norm_name(peer_query_norm q);
PEER_API const char *peer_dtype_name(peer_dtype t); /* "F32", "BF16", "I64" */
PEER_API size_t peer_dtype_size(peer_dtype t);

/* ------------------------------------------------------------------- layer */

typedef enum peer_backend {
  PEER_BACKEND_CPU = 0,
  PEER_BACKEND_CUDA = 1
} peer_backend;

typedef struct peer_options {
  peer_backend backend; /* default CPU */
  int n_threads;        /* CPU threads; 0 = OpenMP's default */
  int device;           /* CUDA device ordinal */
} peer_options;

PEER_API void peer_options_default(peer_options *opt);

typedef struct peer_layer peer_layer;

/* Create a layer with zeroed parameters (call peer_layer_init or fill them
 * through peer_layer_param).  opt may be NULL (defaults).  On success *out is
 * a new layer the caller frees with peer_layer_free. */
PEER_API peer_status peer_layer_create(peer_layer **out, const peer_config *cfg,
                                       const peer_options *opt);
/* Free a layer and everything it owns; NULL is accepted. */
PEER_API void peer_layer_free(peer_layer *layer);
/* The layer's configuration (owned by the layer). */
PEER_API const peer_config *peer_layer_config(const peer_layer *layer);
/* Change the CPU thread count (0 = OpenMP default).  Results are bitwise
 * identical for every thread count. */
PEER_API peer_status peer_layer_set_threads(peer_layer *layer, int n_threads);
/* Threads the layer's CPU calls use (n_threads, or OpenMP's default for 0). */
PEER_API int peer_layer_threads(const peer_layer *layer);

/* Seeded, deterministic initialisation (the same bits for a seed whatever the
 * thread count).  Distributions, all uniform U(-a, a):
 *   query.weight   a = 1/sqrt(d_model)        query.bias  0
 *   keys           a = 1/sqrt(d_key/2)
 *   experts.down   a = 1/sqrt(d_model)
 *   experts.up     a = 1/sqrt(n_heads*top_k)
 *   query.norm.*   weight 1, bias 0, running_mean 0, running_var 1 */
PEER_API peer_status peer_layer_init(peer_layer *layer, uint64_t seed);

/* A view of one tensor.  For parameters `data` points into the layer's own
 * memory (host memory on the CPU backend, device memory on CUDA); a host
 * framework may read and write it in place for the layer's lifetime. */
typedef struct peer_tensor {
  const char *name; /* PEER.md name, e.g. "experts.down" */
  peer_dtype dtype;
  int ndim;
  int64_t shape[4];
  void *data;
  size_t nbytes;
} peer_tensor;

/* Number of parameter tensors this layer has (depends on bias/norm). */
PEER_API int peer_layer_n_params(const peer_layer *layer);
/* i-th parameter, 0 <= i < peer_layer_n_params. */
PEER_API peer_status peer_layer_param(peer_layer *layer, int i, peer_tensor *out);
/* Parameter by PEER.md name; PEER_ERR_INVALID_ARGUMENT if the layer has none
 * of that name. */
PEER_API peer_status peer_layer_param_by_name(peer_layer *layer, const char *name,
                                              peer_tensor *out);
/* Total parameter count and parameters touched per token (query, keys and the
 * H*k expert rows). */
PEER_API int64_t peer_layer_n_parameters(const peer_layer *layer);
PEER_API int64_t peer_layer_n_active_parameters(const peer_layer *layer);

/* ------------------------------------------------------------- workspace */

/* Scratch memory.  By default a layer allocates and keeps scratch for the
 * largest batch it has seen (allocation only when T grows, so a steady loop
 * allocates nothing).  A caller that wants to own it queries the size for its
 * largest batch and registers a buffer; the layer then never allocates in
 * forward or retrieval for T up to that size.  The buffer must stay valid
 * until it is replaced (NULL, 0 returns to internal scratch) or the layer is
 * freed.  It must be 64-byte aligned. */
PEER_API peer_status peer_layer_workspace_size(const peer_layer *layer, int64_t n_tokens,
                                               size_t *bytes);
PEER_API peer_status peer_layer_set_workspace(peer_layer *layer, void *buffer,
                                              size_t bytes);

/* ----------------------------------------------------------------- forward */

/* y = PEER(x) for T tokens.  x [T, d_model] f32 in; y [T, d_model] f32 out.
 * Optional outputs (NULL to skip): indices [T, H, k] expert ids, gates
 * [T, H, k], each head's experts by descending score, ties to the smaller id.
 * T = 0 is a no-op.  Batch norm uses running statistics (inference).
 * Non-finite values: NaN/inf in x, or in a weight that makes a sub-key or
 * candidate score non-finite, returns PEER_ERR_NONFINITE (naming the token),
 * and no id is ever out of range.  NaN/inf in the expert tables themselves
 * reaches no score: it propagates into y as NaN/inf. */
PEER_API peer_status peer_forward(peer_layer *layer, int64_t n_tokens, const float *x,
                                  float *y, int64_t *indices, float *gates);

/* Retrieval only: indices [T, H, k], and optionally scores [T, H, k] (the
 * kept s1[a] + s2[b]) and gates [T, H, k].  No expert table is read. */
PEER_API peer_status peer_retrieve(peer_layer *layer, int64_t n_tokens, const float *x,
                                   int64_t *indices, float *scores, float *gates);

/* The same result by brute force: every one of the N sums s1[a] + s2[b] is
 * scored and the best k kept (O(N) per token and head; for checks and
 * benchmarks).  Same outputs as peer_retrieve.  On a CUDA layer, top_k > 95
 * is refused with PEER_ERR_UNSUPPORTED before anything runs (the kernel's
 * per-thread lists in shared memory; peer_cuda.h); T = 0 stays a no-op. */
PEER_API peer_status peer_retrieve_brute(peer_layer *layer, int64_t n_tokens,
                                         const float *x, int64_t *indices, float *scores,
                                         float *gates);

/* ---------------------------------------------------------------- training */

/* What a training forward keeps for backward: per token the kept ids, scores,
 * gates and expert pre-activations (H*k each), the normalised query (H*d_key)
 * and the batch-norm statistics; never anything of size N.  x itself is not
 * copied: the caller keeps x alive and unchanged until backward. */
typedef struct peer_context peer_context;

/* Bytes a context for up to max_tokens tokens holds (for planning memory):
 * host memory on the CPU backend; on CUDA, the device memory both APIs use,
 * to which the first host-pointer training call adds a staging buffer
 * (peer_cuda.h gives its size).  A backend may take fewer tokens than the
 * core allows (CUDA: (2^31 - 1) / (2*n_heads*top_k)): PEER_ERR_UNSUPPORTED
 * then, here and from peer_context_create. */
PEER_API peer_status peer_context_size(const peer_layer *layer, int64_t max_tokens, size_t *bytes);
/* Create a context for batches of up to max_tokens tokens of this layer's
 * shape; freed with peer_context_free (NULL accepted), which frees all the
 * memory the context took. */
PEER_API peer_status peer_context_create(peer_context **out, const peer_layer *layer,
                                         int64_t max_tokens);
PEER_API void peer_context_free(peer_context *ctx);

/* Running statistics update: running = (1 - m) * running + m * batch, with the
 * unbiased batch variance (PyTorch's convention).  Default m = 0.1. */
PEER_API peer_status peer_layer_set_norm_momentum(peer_layer *layer, float momentum);

/* Forward in training mode: as peer_forward, but batch norm uses the batch's
 * statistics (biased variance, eps 1e-5) and updates the running statistics,
 * and ctx records what peer_backward needs.  Batch norm needs T >= 2.  A call
 * that fails (any status but PEER_OK) leaves ctx, when it is this layer's,
 * without a forward: a backward then returns PEER_ERR_STATE. */
PEER_API peer_status peer_forward_train(peer_layer *layer, peer_context *ctx, int64_t n_tokens,
                                        const float *x, float *y);

/* Gradients.  Dense ones are caller-owned buffers shaped like their
 * parameters (NULL skips one), and are overwritten.  Expert gradients are
 * sparse: backward lists the distinct expert ids the batch used, ascending,
 * in expert_rows[0 .. n_expert_rows) and their f32 gradient rows in
 * experts_down / experts_up ([expert_capacity, d_model]); expert_capacity
 * (the room in expert_rows) must be at least T*H*k, the most a batch can
 * touch.  With experts_dense = 1 instead, experts_down / experts_up are
 * [N, d_model] f32 buffers that the gradient rows are added into (+=), and
 * expert_rows still lists the rows.  All three NULL skips expert gradients. */
typedef struct peer_grads {
  float *query_weight; /* [H*d_key, d] */
  float *query_bias;   /* [H*d_key] */
  float *norm_weight;  /* [H*d_key] */
  float *norm_bias;    /* [H*d_key] */
  float *keys;         /* [G, 2, n, d_key/2] */
  int experts_dense;
  int64_t expert_capacity;
  int64_t *expert_rows;
  float *experts_down;
  float *experts_up;
  int64_t n_expert_rows; /* set by backward */
} peer_grads;

/* Backward of the last peer_forward_train on ctx: dy [T, d] in, dx [T, d]
 * out (NULL skips it), and grads.  The top-k choice is constant (as
 * torch.topk).  Deterministic: the same bits whatever the thread count.
 * One backward per forward: a successful one uses the forward up (a second
 * returns PEER_ERR_STATE); a failed one, PEER_ERR_NONFINITE for a NaN or
 * infinity in dy included, leaves it in place and may be retried.  (The
 * device-pointer peer_cuda_backward differs: it sees dy only on the device,
 * after it has returned PEER_OK and used the forward up; peer_cuda.h.) */
PEER_API peer_status peer_backward(peer_layer *layer, peer_context *ctx, const float *dy, float *dx,
                                   peer_grads *grads);

/* ---------------------------------------------- optimizers and checkpoints */

/* An optimizer updates one layer's parameters in place from the gradients of
 * peer_backward, and a checkpoint saves and restores the layer together with
 * the optimizer's state and step.
 *
 * Dense parameters (query.weight, query.bias, query.norm.weight/bias, keys)
 * take plain SGD (with optional momentum) or Adam; the batch-norm running
 * statistics are not parameters and are left alone.  Expert rows are sparse
 * and "lazy": a step touches only the rows listed in the gradients, at their
 * own learning rate (PKM and Memory Layers train the value tables with a
 * separate, fixed rate):
 *  - sparse SGD: row -= expert_lr * grad_row (no momentum, no state);
 *  - sparse Adam (torch.optim.SparseAdam's rule): the moments m and v of a
 *    listed row are updated and the row moved; rows not listed keep their
 *    values and moments bit for bit.  Bias correction uses the optimizer's
 *    global step, as SparseAdam does, not a per-row count.
 * bf16 expert tables are updated in f32 and rounded back to bf16 (to nearest
 * even): an update smaller than half a bf16 ulp of the weight is lost.  There
 * is no f32 master copy.  Optimizer state is always f32.
 *
 * Memory: Adam keeps m and v for every dense parameter and, with expert_kind
 * Adam, for both expert tables: 4 * N * d_model floats (2 tables x 2
 * moments; 8 GiB at N = 2^20, d_model = 512), twice the f32 tables.  It is
 * allocated zeroed and mapped lazily, so memory is taken as steps touch rows
 * (in pages, huge pages where the system gives them); a long run touches all
 * of it.  Sparse SGD keeps no state.
 *
 * Only CPU-backend layers (host parameters) are supported here. */

typedef enum peer_optim_kind {
  PEER_OPTIM_SGD = 0,
  PEER_OPTIM_ADAM = 1
} peer_optim_kind;

typedef struct peer_optim_config {
  peer_optim_kind kind; /* rule for the dense parameters */
  float lr;             /* learning rate of the dense parameters, >= 0 */
  float momentum;       /* SGD, dense only: buf = momentum*buf + g; p -= lr*buf; in [0, 1) */
  float beta1, beta2;   /* Adam, in [0, 1) */
  float eps;            /* Adam, > 0 */
  /* Decoupled weight decay (AdamW; SGDW for SGD): p -= lr*weight_decay*p
   * before the update, on the dense parameters only (never on expert rows,
   * whose lazy updates would decay only the rows a batch happens to use).
   * >= 0. */
  float weight_decay;
  float expert_lr;             /* learning rate of the expert rows; 0 = same as lr */
  peer_optim_kind expert_kind; /* rule for the expert rows (sparse SGD or Adam) */
} peer_optim_config;

/* Adam for both, lr 1e-3, momentum 0, betas 0.9 / 0.999, eps 1e-8, weight
 * decay 0, expert_lr 0 (= lr). */
PEER_API peer_optim_config peer_optim_config_default(void);
/* Check ranges; the error message names the offending field.  Fields a kind
 * does not use (momentum for Adam; betas and eps when nothing is Adam) are
 * not checked. */
PEER_API peer_status peer_optim_config_validate(const peer_optim_config *cfg);

typedef struct peer_optimizer peer_optimizer;

/* Create an optimizer for `layer` (which must outlive it) with zeroed state
 * and step 0.  On success *out is freed with peer_optimizer_free. */
PEER_API peer_status peer_optimizer_create(peer_optimizer **out, peer_layer *layer,
                                           const peer_optim_config *cfg);
/* Free an optimizer and its state; NULL is accepted. */
PEER_API void peer_optimizer_free(peer_optimizer *opt);
/* The optimizer's configuration (owned by the optimizer). */
PEER_API const peer_optim_config *peer_optimizer_config(const peer_optimizer *opt);
/* Change the learning rates (for schedules); expert_lr 0 = same as lr. */
PEER_API peer_status peer_optimizer_set_lr(peer_optimizer *opt, float lr, float expert_lr);

/* One update of the layer's parameters from grads (as filled by
 * peer_backward; not modified).  A NULL dense gradient leaves its parameter
 * and state alone.  Expert rows: the rows expert_rows[0 .. n_expert_rows)
 * (strictly ascending, in [0, N), as backward lists them) are updated, their
 * gradient rows read from experts_down / experts_up at the row's position in
 * the list (experts_dense = 0) or at the row's id (experts_dense = 1; the
 * buffers are not cleared).  Nothing is changed, and PEER_ERR_NONFINITE names
 * the tensor, if a gradient that would be used holds a NaN or infinity.  The
 * step count grows by one on success.  Results are the same bits for every
 * thread count. */
PEER_API peer_status peer_optimizer_step(peer_optimizer *opt, const peer_grads *grads);
/* Steps taken (restored by peer_checkpoint_load). */
PEER_API int64_t peer_optimizer_step_count(const peer_optimizer *opt);

/* State tensors, named as in a checkpoint: "optim.<parameter>.m" and ".v"
 * (Adam), "optim.<parameter>.momentum" (SGD with momentum), e.g.
 * "optim.experts.down.m" [N, d_model] F32.  `data` points into the
 * optimizer's own memory for its lifetime. */
PEER_API int peer_optimizer_n_states(const peer_optimizer *opt);
PEER_API peer_status peer_optimizer_state(peer_optimizer *opt, int i, peer_tensor *out);
/* PEER_ERR_INVALID_ARGUMENT if the optimizer keeps no state of that name. */
PEER_API peer_status peer_optimizer_state_by_name(peer_optimizer *opt, const char *name,
                                                  peer_tensor *out);

/* Save a checkpoint: one safetensors file with every parameter under its
 * PEER.md name, the weight-file metadata (config, "peer.format"), and, when
 * opt is not NULL (it must belong to layer), its state tensors (written
 * straight from memory, no copy), "peer.step" and its hyperparameters
 * ("peer.optim.kind", "peer.optim.lr", ...).  Atomic as peer_layer_save: a
 * failure or crash midway leaves any previous file at path intact.  Without
 * an optimizer the file is a plain weight file. */
PEER_API peer_status peer_checkpoint_save(const peer_layer *layer, const peer_optimizer *opt,
                                          const char *path);
/* Load a checkpoint into an existing layer and, when opt is not NULL (it
 * must belong to layer), its optimizer, restoring the step.  Refused with
 * PEER_ERR_FORMAT, naming the key and both values, when the file's layer
 * config differs from the layer's ("peer.n_subkeys: checkpoint 8, layer 16")
 * or its optimizer kinds differ from opt's; a state tensor opt needs that the
 * file lacks (or has with another shape) is refused too.  The optimizer keeps
 * its own learning rates and other hyperparameters (a resumed run may change
 * them).  With opt NULL, state tensors in the file are ignored.  Everything
 * is checked before anything is read: only an I/O error midway can leave the
 * layer partly loaded. */
PEER_API peer_status peer_checkpoint_load(peer_layer *layer, peer_optimizer *opt, const char *path);

/* ------------------------------------------------------------ weight files */

/* Save every parameter and the config as safetensors (PEER.md).  Atomic: the
 * file is written beside `path` under a temporary name, synced, then renamed,
 * so an interrupted save leaves any previous file intact. */
PEER_API peer_status peer_layer_save(const peer_layer *layer, const char *path);
/* Load a layer saved by peer_layer_save (or any file following PEER.md).
 * Every length is checked against the file size before use, and every
 * tensor's name, dtype and shape against the metadata's config before any
 * parameter memory is allocated: what a load allocates never exceeds the
 * file's size.  Tensors are read straight into the layer's memory (the file
 * is never held twice).  opt may be NULL.  On success *out is a new layer. */
PEER_API peer_status peer_layer_load(peer_layer **out, const char *path,
                                     const peer_options *opt);
/* Every check of peer_layer_load (header, metadata config, each tensor's
 * name, dtype, shape and byte range, nothing extra) without reading tensor
 * data or allocating parameters; *cfg (NULL to skip) gets the file's config.
 * PEER_OK means peer_layer_load accepts the file, barring I/O errors. */
PEER_API peer_status peer_layer_check_file(const char *path, peer_config *cfg);

/* Generic safetensors access, used for activation files (x, y, indices, ...).
 * A reader maps nothing: it validates the header and reads tensors on request. */
typedef struct peer_safetensors peer_safetensors;

/* Open and validate a file (header, offsets, sizes).  *out is freed with
 * peer_safetensors_close. */
PEER_API peer_status peer_safetensors_open(peer_safetensors **out, const char *path);
PEER_API void peer_safetensors_close(peer_safetensors *file);
/* Number of tensors and their descriptions (data = NULL).  Strings are owned
 * by the file object. */
PEER_API int peer_safetensors_count(const peer_safetensors *file);
PEER_API peer_status peer_safetensors_info(const peer_safetensors *file, int i,
                                           peer_tensor *out);
/* Look up a tensor by name: PEER_ERR_FORMAT naming it when absent. */
PEER_API peer_status peer_safetensors_find(const peer_safetensors *file,
                                           const char *name, peer_tensor *out);
/* Read a tensor's bytes into dst (dst_bytes must equal its size). */
PEER_API peer_status peer_safetensors_read(const peer_safetensors *file,
                                           const char *name, void *dst,
                                           size_t dst_bytes);
/* Metadata value for key, or NULL.  Owned by the file object. */
PEER_API const char *peer_safetensors_metadata(const peer_safetensors *file,
                                               const char *key);
/* Write tensors (name, dtype, shape, data) and optional metadata pairs
 * (meta[2i] = key, meta[2i+1] = value) atomically to path.  Every save
 * (this, peer_layer_save, peer_checkpoint_save, ...) writes a temporary
 * "<path>.peer-tmp.<pid>.<random>" beside path (created exclusively, never
 * through a symlink), syncs it, renames it over path and syncs the
 * directory; any failure removes it, and a save removes the temporaries of
 * the same path that a killed process left.  Concurrent saves to one path
 * leave one of them, whole.  path must be absent or a writable regular
 * file: a symlink, directory, device, FIFO or a read-only file is refused
 * with PEER_ERR_IO.  A replaced file keeps its permission bits. */
PEER_API peer_status peer_safetensors_write(const char *path, const peer_tensor *tensors,
                                            int n_tensors, const char *const *meta,
                                            int n_meta_pairs);
/* Remove the temporary files of the saves in progress in this process and
 * return how many; async-signal-safe, for a SIGINT/SIGTERM handler that then
 * ends the process (the interrupted saves leave the old files as they were). */
PEER_API int peer_remove_temporaries(void);

/* ---------------------------------------------------- PEER-pytorch layout */

/* lucidrains' PEER-pytorch (0.2.x) holds one PEER layer in four tensors:
 * to_queries.0.weight [2*H*dk, d] F32, keys [H, n, 2, dk] F32, and
 * weight_down_embed.weight, weight_up_embed.weight [n*n, d] (F32 or BF16),
 * dk = d_key/2, with the query rows and key axes ordered differently
 * (PEER.md "Related layouts").  These calls read and write that state dict
 * as safetensors, reordering the query and keys and copying the expert
 * tables as they are.  CPU-backend layers only. */

/* Load a PEER-pytorch state dict into a new layer (*out, freed with
 * peer_layer_free).  The file gives d_model, n_heads, d_key, n_subkeys and
 * weight_dtype; settings (NULL: peer_config_default) give what it does not
 * record: top_k (num_experts_per_head), subkey_top_k (product_key_topk),
 * activation, and gate (softmax for non_competing_scores=False; relu for
 * True, PEER-pytorch's default, with top_k 1).  Settings PEER-pytorch cannot
 * express (shared_keys, query_norm, query_bias, sigmoid gates, relu with
 * top_k > 1) are refused with PEER_ERR_CONFIG; their shape fields are
 * ignored.  A file with other tensors, or already a peer weight file, is
 * refused with PEER_ERR_FORMAT naming the tensor.  opt may be NULL. */
PEER_API peer_status peer_layer_load_pytorch(peer_layer **out, const char *path,
                                             const peer_config *settings,
                                             const peer_options *opt);
/* Save a layer as a PEER-pytorch state dict (metadata "format": "pt"),
 * atomically as peer_layer_save.  A layer PEER-pytorch cannot express is
 * refused with PEER_ERR_UNSUPPORTED naming the field. */
PEER_API peer_status peer_layer_save_pytorch(const peer_layer *layer, const char *path);
/* The PEER-pytorch constructor call that computes cfg, e.g. "PEER(dim=512,
 * heads=8, num_experts=1048576, ...)", into buf (NUL-terminated);
 * PEER_ERR_UNSUPPORTED naming the field if there is none, and
 * PEER_ERR_INVALID_ARGUMENT if buf is too small (512 bytes always do). */
PEER_API peer_status peer_config_pytorch_args(const peer_config *cfg, char *buf, size_t size);
/* File to file: peer_layer_load_pytorch then peer_layer_save, and
 * peer_layer_load then peer_layer_save_pytorch. */
PEER_API peer_status peer_convert_from_pytorch(const char *in_path, const char *out_path,
                                               const peer_config *settings);
PEER_API peer_status peer_convert_to_pytorch(const char *in_path, const char *out_path);

/* ----------------------------------------------------------------- metrics */

/* Expert usage and unevenness (PEER.md "Metrics") from accumulated gate mass
 * z [n_experts] (z_i >= 0): usage = fraction with z_i > 0; unevenness =
 * log N + sum p_i log p_i.  Returns PEER_ERR_INVALID_ARGUMENT if z has a
 * negative or non-finite entry or sums to 0. */
PEER_API peer_status peer_usage_metrics(const double *z, int64_t n_experts,
                                        double *usage, double *unevenness);
/* Add the gates of a retrieval (indices/gates [T, H, k]) into z [N]. */
PEER_API peer_status peer_usage_accumulate(double *z, int64_t n_experts,
                                           const int64_t *indices, const float *gates,
                                           int64_t n_entries);

/* ---------------------------------------------------------------- sharding */

#ifndef PEER_API /* until the export macro above lands */
#define PEER_API
#endif

/* A layer's expert tables split by columns over the P ranks of a group
 * ("d-sharded"): rank r holds columns [r*d/P, (r+1)*d/P) of experts.down and
 * experts.up for all N experts; the query projection, batch norm and sub-keys
 * are replicated and every rank retrieves the same expert ids.  x, dy and
 * the dense gradients are the same on every rank; y and dx are all-gathered.
 * docs: README "Sharding".
 *
 * The transport is the caller's: a peer_comm holds three things it provides.
 * The library links none (include/peer_mpi.h builds one from an MPI_Comm).
 * Every peer_shard_* call marked "collective" must be made by every rank of
 * the group, in the same order, with the same sizes and replicated inputs,
 * as with MPI; a rank that fails before a collective step leaves the others
 * waiting, so arguments that could differ between ranks are the caller's to
 * keep equal.  A shard takes one call at a time, as a layer does
 * (PEER_ERR_BUSY). */
typedef struct peer_comm {
  void *handle; /* the transport's own state, passed back to every call */
  int rank;     /* this process, 0 <= rank < world */
  int world;    /* ranks in the group */
  /* data[0 .. count) becomes its sum over the ranks, in place.  Every rank
   * must get the same bits (MPI_Allreduce, NCCL and gloo all-reduce do).
   * 0 on success; anything else is reported as PEER_ERR_IO. */
  int (*allreduce_sum)(void *handle, float *data, int64_t count);
  /* recv[r*bytes .. (r+1)*bytes) = rank r's send[0 .. bytes) for every r;
   * 0 on success. */
  int (*allgather)(void *handle, const void *send, void *recv, size_t bytes);
} peer_comm;

typedef struct peer_shard peer_shard;

/* Collective.  Create this rank's shard of a layer with zeroed parameters.
 * The communicator is copied (its handle must outlive the shard).  Refused
 * on every rank alike: d_model not divisible by world (PEER_ERR_CONFIG), a
 * config or world size that differs between ranks, or duplicate ranks
 * (PEER_ERR_CONFIG naming the rank and both configs), a failure on any rank
 * (the status of the lowest failing rank).  CPU backend only. */
PEER_API peer_status peer_shard_create(peer_shard **out, const peer_config *cfg,
                                       const peer_options *opt, const peer_comm *comm);
PEER_API void peer_shard_free(peer_shard *shard);
PEER_API const peer_config *peer_shard_config(const peer_shard *shard);
PEER_API int peer_shard_rank(const peer_shard *shard);
PEER_API int peer_shard_world(const peer_shard *shard);
/* This rank's columns of the expert tables: [*col0, *col0 + *cols). */
PEER_API void peer_shard_columns(const peer_shard *shard, int64_t *col0, int64_t *cols);
PEER_API peer_status peer_shard_set_threads(peer_shard *shard, int n_threads);
/* Parameters as peer_layer_param: the replicated ones in full, experts.down
 * and experts.up as this rank's [N, d/P] columns. */
PEER_API int peer_shard_n_params(const peer_shard *shard);
PEER_API peer_status peer_shard_param(peer_shard *shard, int i, peer_tensor *out);
PEER_API peer_status peer_shard_param_by_name(peer_shard *shard, const char *name,
                                              peer_tensor *out);
/* Local: the values peer_layer_init(seed) gives the unsharded layer (the
 * expert tables' columns of this rank). */
PEER_API peer_status peer_shard_init(peer_shard *shard, uint64_t seed);

/* Collective.  As peer_forward: x [T, d] (the same on every rank), y [T, d]
 * (gathered: the same on every rank), optional indices and gates. */
PEER_API peer_status peer_shard_forward(peer_shard *shard, int64_t n_tokens, const float *x,
                                        float *y, int64_t *indices, float *gates);
/* Local (no communication): as peer_retrieve. */
PEER_API peer_status peer_shard_retrieve(peer_shard *shard, int64_t n_tokens, const float *x,
                                         int64_t *indices, float *scores, float *gates);

/* A training context for this shard (freed with peer_context_free); peer.h's
 * peer_forward_train and peer_backward refuse it. */
PEER_API peer_status peer_shard_context_create(peer_context **out, const peer_shard *shard,
                                               int64_t max_tokens);
/* Collective.  As peer_forward_train (x kept alive until backward). */
PEER_API peer_status peer_shard_forward_train(peer_shard *shard, peer_context *ctx,
                                              int64_t n_tokens, const float *x, float *y);
/* Collective.  As peer_backward, dy [T, d] the same on every rank; dx [T, d]
 * gathered.  Dense gradients are full (the same on every rank); the expert
 * gradient rows are this rank's columns: experts_down / experts_up are
 * [expert_capacity, d/P] (or [N, d/P] with experts_dense). */
PEER_API peer_status peer_shard_backward(peer_shard *shard, peer_context *ctx, const float *dy,
                                         float *dx, peer_grads *grads);

/* An optimizer for a shard: each rank updates the replicated parameters (the
 * same bits everywhere) and its own columns of the expert rows, with the
 * rules and state of peer_optimizer (the state of the expert tables is
 * [N, d/P] per rank).  Local: no communication. */
typedef struct peer_shard_optimizer peer_shard_optimizer;
PEER_API peer_status peer_shard_optimizer_create(peer_shard_optimizer **out, peer_shard *shard,
                                                 const peer_optim_config *cfg);
PEER_API void peer_shard_optimizer_free(peer_shard_optimizer *opt);
/* As peer_optimizer_step, with grads as peer_shard_backward fills them. */
PEER_API peer_status peer_shard_optimizer_step(peer_shard_optimizer *opt, const peer_grads *grads);
PEER_API int64_t peer_shard_optimizer_step_count(const peer_shard_optimizer *opt);
/* State tensor by checkpoint name, as peer_optimizer_state_by_name. */
PEER_API peer_status peer_shard_optimizer_state_by_name(peer_shard_optimizer *opt,
                                                        const char *name, peer_tensor *out);

/* Shard files: a checkpoint (peer_checkpoint_save's tensors, with the expert
 * tables and their state as this rank's columns) plus metadata
 * "peer.shard.rank", "peer.shard.world", "peer.shard.col0",
 * "peer.shard.cols".  Local; each rank writes its own path, atomically.
 * opt may be NULL (weights only). */
PEER_API peer_status peer_shard_save(const peer_shard *shard, const peer_shard_optimizer *opt,
                                     const char *path);
/* Load this rank's shard file (opt NULL: weights only).  Refused with
 * PEER_ERR_FORMAT naming the key: a file from another world size, rank or
 * column range, or an unsharded file; a config or optimizer that differs as
 * peer_checkpoint_load refuses it. */
PEER_API peer_status peer_shard_load(peer_shard *shard, peer_shard_optimizer *opt,
                                     const char *path);
/* Load an unsharded weight file or checkpoint (peer_layer_save,
 * peer_checkpoint_save) into a shard: the replicated tensors and this rank's
 * columns, and with opt the optimizer's state (its expert tables' columns
 * too) and step, refused as peer_checkpoint_load refuses.  Reads each expert
 * tensor whole into a temporary buffer. */
PEER_API peer_status peer_shard_load_full(peer_shard *shard, peer_shard_optimizer *opt,
                                          const char *path);
/* File to files: split an unsharded weight file or checkpoint into `world`
 * shard files out_paths[0 .. world), and merge world shard files (in any
 * order; all ranks exactly once) back into one unsharded file.  Merging
 * checks that the replicated tensors agree bit for bit. */
PEER_API peer_status peer_shard_split(const char *in_path, int world,
                                      const char *const *out_paths);
PEER_API peer_status peer_shard_merge(const char *const *in_paths, int n_paths,
                                      const char *out_path);

#ifdef __cplusplus
}
#endif
#endif /* PEER_H */
