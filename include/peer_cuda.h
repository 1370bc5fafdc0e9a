/* peer_cuda.h: the device-pointer API of peer's CUDA backend.  A layer created
 * with peer_options.backend = PEER_BACKEND_CUDA keeps its parameters in device
 * memory (peer_layer_param's `data` is then a device pointer) and runs the
 * calls below on a stream the caller owns, without host-device copies.
 *
 * The host-pointer calls of peer.h (peer_forward, peer_retrieve,
 * peer_retrieve_brute, peer_forward_train, peer_backward) also work on a CUDA
 * layer: they are a convenience path that first waits for the whole device
 * (cudaDeviceSynchronize: the work queued on every stream, the caller's
 * included, has finished before they start), copies x (dy) to the device,
 * runs the same device code as the calls here on a stream of the layer's
 * own, copies the results (y, dx, every gradient) back to the caller's host
 * buffers and synchronises, so they report PEER_ERR_NONFINITE on return.
 * The two paths may therefore be mixed on one layer and one context in
 * either order without further synchronisation: a host-pointer call sees
 * everything device-pointer calls queued before it, and has finished when
 * it returns.  A CUDA error left by earlier work on the device (the
 * caller's included) is reported by the wait, as PEER_ERR_CUDA.  (An empty
 * batch touches no device memory and does not wait.)  The host-pointer
 * calls' non-finite check reads and clears the layer's records (see
 * peer_cuda_check), so it also reports a record that an earlier, unchecked
 * device-pointer call left.  Use the calls here on the hot path.
 *
 * Parameters: peer_layer_create (zeroed parameters) and peer_layer_init
 * write them through the legacy default stream, waiting for the whole device
 * (cudaDeviceSynchronize) before an init writes and before either returns:
 * when they return, the parameters are in place on the device for work on
 * any stream, non-blocking ones included, and work queued earlier that
 * reads the old values has finished.  Writes a caller makes itself through
 * peer_layer_param's device pointers are the caller's to order.
 *
 * Training: peer_context_create on a CUDA layer puts the context in device
 * memory; one context serves both paths (a forward on one may be followed by
 * a backward on the other).  Its size, which peer_context_size reports, is
 * what the device-pointer calls need: per token 3*H*d_key floats (queries,
 * normalised queries, their gradient) and 72*H*k bytes (ids, scores, gates,
 * pre-activations and coefficients: 32; the backward's sort keys, values
 * and run starts: 40), plus CUB's sort scratch and 2*H*d_key floats of
 * batch statistics.  The host-pointer calls stage their inputs, outputs and
 * gradients on the device too, in a second buffer that the first
 * host-pointer peer_forward_train or peer_backward on the context allocates
 * (a cudaMalloc only then, after that call's wait for the device) and
 * peer_context_free frees:
 *   4*T*d + H*d_key*(d + 3) + G*n*d_key + T*H*k*(2*d + 2) floats
 * for max_tokens T (G = n_heads, or 1 with shared keys), mostly the expert
 * gradient rows (T*H*k*d floats twice: 2 GiB at T = 4096, d = 512, H = 8,
 * k = 16).  The CUDA backward sorts 2*T*H*k pairs with 32-bit counts, so a
 * context takes at most (2^31 - 1) / (2*H*k) tokens (8,388,607 at
 * H*k = 128); beyond that peer_context_size and peer_context_create return
 * PEER_ERR_UNSUPPORTED naming max_tokens and the limit.
 *
 * Files: peer_layer_save, peer_layer_load, peer_checkpoint_save and
 * peer_checkpoint_load work on CUDA layers (and their optimizers, whose
 * state is device memory) through host staging: a save waits for the whole
 * device, copies every tensor it writes into host memory (a full host copy
 * of the layer and state for the duration of the call) and hands them to the
 * CPU path's writer (same file, byte for byte, same atomic write); a load
 * runs the CPU path's checks first, then reads each tensor into one host
 * buffer (the largest tensor's size) and uploads it as peer_layer_init does.
 *
 * Available only in builds configured with PEER_CUDA (they define
 * PEER_USE_CUDA).
 *
 * Each call makes the layer's device current on the calling thread
 * (cudaSetDevice), as do the host-pointer calls, peer_context_size,
 * peer_context_create and peer_context_free on a CUDA layer (or its
 * context) and peer_layer_free.  Device memory the layer or a context gives
 * back (peer_layer_free, peer_context_free, scratch replaced by growth or by
 * peer_cuda_set_workspace) is freed only after a wait for the whole device,
 * so work still queued on it finishes first.  Like every peer_layer call,
 * a call that meets another on the same layer returns PEER_ERR_BUSY (the
 * device work a call queued may still run after it returns: order it with
 * the stream, not with the flag). */
#ifndef PEER_CUDA_H
#define PEER_CUDA_H

#include "peer.h"

#include <cuda_runtime_api.h>

#ifdef __cplusplus
extern "C" {
#endif

/* Number of CUDA devices the runtime can use; 0 when there is none or no
 * driver (never an error). */
PEER_API int peer_cuda_device_count(void);

/* Device scratch.  The calls below need workspace for T tokens; by default a
 * layer allocates and keeps device scratch for the largest T it has seen:
 * only when T grows, it waits for the whole device (work queued earlier may
 * still use the smaller scratch), frees it and allocates more.  A caller
 * that owns its memory queries the size for its largest batch and registers a
 * device buffer (256-byte aligned, as cudaMalloc gives); the layer then never
 * allocates in peer_cuda_forward, peer_cuda_retrieve(_brute) or
 * peer_cuda_forward_train for T up to that size, and a larger T fails with
 * PEER_ERR_INVALID_ARGUMENT.  (Training keeps the rest of its state in the
 * context, sized by peer_context_create.)  The buffer must stay
 * valid until replaced (NULL, 0 returns to internal scratch) or the layer is
 * freed; the layer does not free it.  Registering waits for the whole
 * device when it gives back internal scratch; a buffer being replaced must
 * not be in use by queued work (the caller orders that, as for any buffer
 * it passes).  Growing internal scratch is illegal while the stream is
 * being captured into a CUDA graph: such a call fails with PEER_ERR_STATE
 * before any wait or allocation (the capture stays valid); size it first (a
 * warm-up call at the largest T, or a registered buffer).
 * peer_layer_workspace_size (peer.h) reports host scratch, which a CUDA
 * layer does not use. */
PEER_API peer_status peer_cuda_workspace_size(const peer_layer *layer, int64_t n_tokens,
                                              size_t *bytes);
PEER_API peer_status peer_cuda_set_workspace(peer_layer *layer, void *d_buffer, size_t bytes);

/* y = PEER(x) for T tokens, as peer_forward, on device pointers: d_x [T, d]
 * f32 in, d_y [T, d] f32 out, optional d_indices [T, H, k] and d_gates
 * [T, H, k] (NULL to skip).  The work is queued on `stream` (0 is the legacy
 * default stream); the call returns without waiting for it.  We do not own
 * `stream`: the caller creates, synchronises and destroys it.  The layer's
 * scratch is reused by the next call, so two calls on one layer must run on
 * one stream (or be ordered by the caller).
 *
 * Non-finite scores cannot be reported when the call returns (the work has
 * not run yet): the kernels record the first (token, head) whose sub-key or
 * candidate score is NaN or infinite, ids stay in range, and
 * peer_cuda_check reports it. */
PEER_API peer_status peer_cuda_forward(peer_layer *layer, int64_t n_tokens, const float *d_x,
                                       float *d_y, int64_t *d_indices, float *d_gates,
                                       cudaStream_t stream);

/* The forward's pipeline (peer_cuda_forward, and peer_forward on a CUDA
 * layer): the batch splits into `chunks` runs of consecutive tokens; the
 * retrieval of a chunk (query projection, sub-key scores, selection) runs
 * on a stream of the layer's own, beside the expert kernel of the chunk
 * before it on the caller's stream.  Events order them: the layer's stream
 * starts after the work queued on the caller's stream before the call, and
 * the caller's stream waits for each chunk's retrieval before its experts,
 * so the call stays ordered on `stream` as one stream would be; nothing
 * waits on the host, nothing is allocated.  Every token goes through the
 * same kernels as without chunks (the emulated build gives the same bits;
 * on a GPU, cuBLAS may pick another algorithm for a chunk's size).
 * chunks: 0 automatic (one per 1024 tokens, at most 8; the default), 1 no
 * pipeline, at most PEER_CUDA_MAX_CHUNKS (PEER_ERR_INVALID_ARGUMENT
 * otherwise); a batch of T tokens takes at most T chunks. */
#define PEER_CUDA_MAX_CHUNKS 16
PEER_API peer_status peer_cuda_set_chunks(peer_layer *layer, int chunks);

/* Retrieval only, as peer_retrieve, on device pointers: d_indices [T, H, k]
 * (required), d_scores and d_gates [T, H, k] (optional).  Stream and error
 * reporting as peer_cuda_forward. */
PEER_API peer_status peer_cuda_retrieve(peer_layer *layer, int64_t n_tokens, const float *d_x,
                                        int64_t *d_indices, float *d_scores, float *d_gates,
                                        cudaStream_t stream);

/* The same result by brute force, as peer_retrieve_brute: every one of the
 * N = n*n sums s1[a] + s2[b] of each (token, head) is scored and the best k
 * kept, in PEER.md's order (exact sums, ties to the smaller id), so ids and
 * scores equal peer_cuda_retrieve's bit for bit.  O(N) per token and head:
 * for checks and benchmarks.  Arguments, stream and error reporting as
 * peer_cuda_retrieve.  PEER_ERR_UNSUPPORTED (before anything is queued; for
 * T = 0 too) when top_k > 95 and n_subkeys * ceil(n_subkeys / 32) > 95
 * (n_subkeys >= 48), which, as a config has top_k <= subkey_top_k <=
 * n_subkeys, is every top_k > 95: each thread of a warp keeps a sorted list of
 * min(top_k, n_subkeys * ceil(n_subkeys / 32)) entries (the most of the sums
 * it scans that can be among the top_k) in 48 KiB of shared memory, room for
 * 95 per thread. */
PEER_API peer_status peer_cuda_retrieve_brute(peer_layer *layer, int64_t n_tokens, const float *d_x,
                                              int64_t *d_indices, float *d_scores, float *d_gates,
                                              cudaStream_t stream);

/* Training forward, as peer_forward_train, on device pointers: d_x [T, d]
 * f32 in, d_y [T, d] f32 out; batch norm uses the batch's statistics and
 * updates the running ones; ctx (from peer_context_create on this layer,
 * device memory) records what peer_cuda_backward needs.  x itself is not
 * copied: d_x must stay valid and unchanged until the backward has run.
 * The work is queued on `stream`, not waited for, with no host-device copy
 * (we do not own `stream`); ctx and the layer's device scratch (see
 * peer_cuda_set_workspace) are reused by the next call, so a forward, its
 * backward and the next forward on one layer run on one stream (or are
 * ordered by the caller).  Argument errors (ctx
 * of another layer, n_tokens beyond the context, batch norm with T = 1,
 * NULL pointers) are returned at once.  Whatever the call returns other than
 * PEER_OK, ctx (when it is this layer's) no longer holds a forward (a
 * backward then returns PEER_ERR_STATE), as with peer_forward_train.
 *
 * A NaN or infinity in x, or a non-finite sub-key or candidate score, is
 * recorded on the device and reported by peer_cuda_check; such a batch
 * leaves the batch-norm running statistics untouched (the device skips the
 * update), as the CPU does.  The context is ready for a backward when the
 * call returns PEER_OK, even if the check later reports a bad batch (whose
 * gradients are then meaningless). */
PEER_API peer_status peer_cuda_forward_train(peer_layer *layer, peer_context *ctx, int64_t n_tokens,
                                             const float *d_x, float *d_y, cudaStream_t stream);

/* Backward of the last forward_train on ctx, as peer_backward, on device
 * pointers: d_dy [T, d] in, d_dx [T, d] out (NULL skips dx).  d_grads is a
 * host struct whose buffers are all device pointers, with peer_grads'
 * meaning: dense gradients (query_weight, query_bias, norm_weight,
 * norm_bias, keys; NULL skips one) are overwritten; expert gradients are
 * sparse (the distinct expert ids, ascending, in expert_rows and their f32
 * gradient rows in experts_down / experts_up, [expert_capacity, d]) or, with
 * experts_dense = 1, added (+=) into [N, d] f32 device buffers (expert_rows
 * still lists the rows); all three NULL skips them.  expert_capacity is
 * checked on the host: it must be at least T*H*k.  The number of expert rows
 * is written to d_n_expert_rows (a device int64; NULL skips it; 0 when
 * expert gradients are skipped); d_grads->n_expert_rows is not written
 * (the count exists only on the device when the call returns).
 *
 * Queued on `stream` as peer_cuda_forward_train, with no host-device copy
 * and no float atomics: the same inputs give the same bits.  A NaN or
 * infinity in dy is recorded on the device (peer_cuda_check reports
 * PEER_ERR_NONFINITE naming the token); the outputs are then meaningless.
 * A backward that returns PEER_OK uses up the forward, bad dy or not (the
 * call cannot know: dy is looked at on the device, later): a second one
 * returns PEER_ERR_STATE, and a retry needs a new forward_train.  This
 * differs from the host path, where peer_backward sees the bad dy before it
 * returns: it returns PEER_ERR_NONFINITE, leaves the caller's buffers
 * untouched and the forward in place, and may be retried.
 * Argument errors (no forward_train on ctx since the last backward, a
 * bias or norm gradient the layer lacks, an incomplete expert triple, too
 * small a capacity) are returned at once, and leave the forward in place. */
PEER_API peer_status peer_cuda_backward(peer_layer *layer, peer_context *ctx, const float *d_dy,
                                        float *d_dx, peer_grads *d_grads, int64_t *d_n_expert_rows,
                                        cudaStream_t stream);

/* Wait for `stream`, then report and clear the layer's non-finite records.
 * PEER_ERR_CUDA if the stream holds a CUDA error; PEER_ERR_NONFINITE if a
 * call on this layer that has not been checked yet met a non-finite value:
 * a NaN or infinity in a training forward's x or a backward's dy (naming
 * the token; reported first), a device optimizer step refused for a
 * non-finite gradient (naming it), or a non-finite score (naming the token
 * and head), tokens counted within the call that saw it; then clears those
 * records.  The records belong to the layer, not to a stream: they hold
 * what any call not checked yet left, whatever stream it ran on (and the
 * host-pointer calls on the layer read and clear them too).  They are read
 * and cleared on `stream`, which waits for nothing else: the work of a call
 * queued on another stream is covered only if it has finished by then
 * (order the streams, or check on each); otherwise its record stays for the
 * next check.  The clear is done when the call returns, so a record made by
 * a later call, on any stream, is never lost. */
PEER_API peer_status peer_cuda_check(peer_layer *layer, cudaStream_t stream);

/* One step of `opt` (peer_optimizer_create on a CUDA layer; its state is
 * device memory) with gradients in device memory, as peer_optimizer_step:
 * d_grads is a host struct of device pointers laid out as
 * peer_cuda_backward's (NULL fields are not stepped; the expert triple
 * sparse, [expert_capacity, d] rows, or with experts_dense [N, d]).  The
 * expert row count is read on the device from d_n_expert_rows (as
 * peer_cuda_backward writes it), or, when NULL, is d_grads->n_expert_rows.
 * Queued on `stream` (we do not own it), no host-device copy, no
 * allocation, no synchronisation; parameters and state must not be used by
 * work on another stream until it has run.  The update is peer/optim_rule.h's,
 * the CPU optimizer's, explicitly rounded (no FMA contraction): the same bits
 * as the CPU optimizer built without FMA contraction.  The gradients are
 * checked on the device first: if one holds NaN or infinity, the step
 * writes no parameter and no state, and the next peer_cuda_check reports
 * PEER_ERR_NONFINITE naming the gradient and element (the call itself
 * cannot know: it does not wait).  The step count advances when the call
 * returns PEER_OK, a step refused on the device included (only SGD's update
 * does not depend on it).  Captured into a CUDA graph, a step replays the
 * rule of its capture: its learning rates and, for Adam and AdamW, the bias
 * corrections of the step it was captured at (they are kernel arguments),
 * and the count advances once, at the capture.  So SGD (with or without
 * momentum) at a fixed learning rate replays exactly as direct calls would;
 * with Adam, capture forward_train and backward and call this outside the
 * graph.  peer_optimizer_step on a
 * CUDA layer takes host gradients (checked as on the CPU), waits for the
 * whole device, copies them into staging the optimizer keeps (grown when
 * they grow), steps on the layer's stream and waits for it. */
PEER_API peer_status peer_cuda_optimizer_step(peer_optimizer *opt, const peer_grads *d_grads,
                                              const int64_t *d_n_expert_rows, cudaStream_t stream);

/* ------------------------------------------------------------- sharding */

/* A CUDA layer's expert tables split by columns over the P ranks of a group,
 * as peer.h's peer_shard (README "Sharding"): rank r holds columns
 * [r*d/P, (r+1)*d/P) of experts.down and experts.up in its device's memory;
 * the query projection, batch norm and sub-keys are replicated, and every
 * rank retrieves the same ids (the same kernels on the same inputs).  The
 * transport is the caller's, on device pointers: include/peer_nccl.h builds
 * one from an ncclComm_t.  Forward, retrieval, training (forward_train,
 * backward, the CUDA layer's device optimizer on the rank's columns) and
 * shard files (peer.h's format: `peer shard --merge` joins them).
 *
 * Every call marked "collective" must be made by every rank, in the same
 * order, with the same n_tokens, replicated x (dy) and the same NULL-ness of
 * optional outputs, as peer.h's peer_shard_* calls; a rank refused before a
 * collective step (an argument error only it makes) leaves the others
 * waiting in the communicator.  So does a rank whose call fails to grow its
 * device scratch (PEER_ERR_OUT_OF_MEMORY, or a device error in the wait
 * before it) for a batch larger than it has seen: size the scratch first,
 * with peer_cuda_shard_context_create(max_tokens) or one warm-up call at
 * the largest batch, so that no collective call allocates. */
typedef struct peer_cuda_comm {
  void *handle; /* the transport's own state, passed back to every call */
  int rank;     /* this process (or device), 0 <= rank < world */
  int world;    /* ranks in the group */
  /* d_data[0 .. count), device memory, becomes its sum over the ranks, in
   * place, queued on `stream` (ordered after the work queued on it before,
   * and before the work queued after).  Every rank must get the same bits
   * (ncclAllReduce does).  0 on success; anything else is reported as
   * PEER_ERR_IO. */
  int (*allreduce_sum)(void *handle, float *d_data, int64_t count, cudaStream_t stream);
  /* d_recv[r*bytes .. (r+1)*bytes) = rank r's d_send[0 .. bytes) for every
   * r, device memory, queued on `stream`; 0 on success. */
  int (*allgather)(void *handle, const void *d_send, void *d_recv, size_t bytes,
                   cudaStream_t stream);
} peer_cuda_comm;

typedef struct peer_cuda_shard peer_cuda_shard;

/* Collective.  Create this rank's shard of a CUDA layer (options->backend
 * must be PEER_BACKEND_CUDA; options->device is this rank's device, the
 * communicator's) with zeroed parameters.  The communicator is copied (its
 * handle must outlive the shard).  Refused on every rank alike, as
 * peer_shard_create: d_model not divisible by world (PEER_ERR_CONFIG), a
 * config or world size that differs between ranks, or duplicate ranks
 * (PEER_ERR_CONFIG naming the rank and both configs), a failure of the local
 * checks on any rank (the status of the lowest failing rank).  The
 * agreement is an all-gather on the legacy default stream, waited for; a
 * rank refused before it (NULL arguments, a communicator without its calls
 * or with a rank out of range, options.device not a device:
 * PEER_ERR_NO_DEVICE) returns at once and leaves the others waiting. */
PEER_API peer_status peer_cuda_shard_create(peer_cuda_shard **out, const peer_config *cfg,
                                            const peer_options *opt, const peer_cuda_comm *comm);
/* Free the shard (NULL is accepted); waits for the device as
 * peer_layer_free. */
PEER_API void peer_cuda_shard_free(peer_cuda_shard *shard);
PEER_API const peer_config *peer_cuda_shard_config(const peer_cuda_shard *shard);
/* This rank's columns of the expert tables: [*col0, *col0 + *cols). */
PEER_API void peer_cuda_shard_columns(const peer_cuda_shard *shard, int64_t *col0, int64_t *cols);
/* Parameters as peer_layer_param (device pointers): the replicated ones in
 * full, experts.down and experts.up as this rank's [N, d/P] columns. */
PEER_API int peer_cuda_shard_n_params(const peer_cuda_shard *shard);
PEER_API peer_status peer_cuda_shard_param(peer_cuda_shard *shard, int i, peer_tensor *out);
PEER_API peer_status peer_cuda_shard_param_by_name(peer_cuda_shard *shard, const char *name,
                                                   peer_tensor *out);
/* Local: the values peer_layer_init(seed) gives the unsharded layer (the
 * expert tables' columns of this rank); ordered as peer_layer_init. */
PEER_API peer_status peer_cuda_shard_init(peer_cuda_shard *shard, uint64_t seed);

/* Collective.  As peer_cuda_forward: d_x [T, d] (the same on every rank),
 * d_y [T, d] (gathered: the same on every rank), optional d_indices and
 * d_gates [T, H, k]; device pointers, queued on `stream` (we do not own
 * it), which the communicator's calls are queued on too.  The shard keeps
 * device scratch for the largest T seen (grown as the layer's: a wait for
 * the device, then cudaMalloc; no allocation otherwise).  Non-finite
 * scores are recorded for peer_cuda_shard_check. */
PEER_API peer_status peer_cuda_shard_forward(peer_cuda_shard *shard, int64_t n_tokens,
                                             const float *d_x, float *d_y, int64_t *d_indices,
                                             float *d_gates, cudaStream_t stream);
/* Local (no communication): as peer_cuda_retrieve. */
PEER_API peer_status peer_cuda_shard_retrieve(peer_cuda_shard *shard, int64_t n_tokens,
                                              const float *d_x, int64_t *d_indices,
                                              float *d_scores, float *d_gates,
                                              cudaStream_t stream);
/* As peer_cuda_check, for the shard's layer. */
PEER_API peer_status peer_cuda_shard_check(peer_cuda_shard *shard, cudaStream_t stream);

/* Training.  Local: a context for this shard's training calls, as
 * peer_context_create on a CUDA layer (device memory; peer_context_size's
 * size for the unsharded layer of this config), freed with
 * peer_context_free.  It also grows the layer's and the shard's device
 * scratch to max_tokens (a wait for the device, then cudaMalloc), so that
 * the training calls allocate nothing for batches up to max_tokens. */
PEER_API peer_status peer_cuda_shard_context_create(peer_context **out, peer_cuda_shard *shard,
                                                    int64_t max_tokens);

/* Collective.  As peer_cuda_forward_train: d_x [T, d] (the same on every
 * rank; kept by reference for the backward), d_y [T, d] (gathered: the same
 * on every rank); queued on `stream` with the communicator's calls, no
 * host-device copy, no allocation for T up to the context's max_tokens.
 * Non-finite x or scores are recorded for peer_cuda_shard_check (and leave
 * the running statistics alone).  Argument errors as
 * peer_cuda_forward_train. */
PEER_API peer_status peer_cuda_shard_forward_train(peer_cuda_shard *shard, peer_context *ctx,
                                                   int64_t n_tokens, const float *d_x, float *d_y,
                                                   cudaStream_t stream);

/* Collective.  As peer_cuda_backward, on this rank's columns: d_dy [T, d]
 * (the same on every rank), d_dx [T, d] (gathered: the same on every rank;
 * NULL on every rank or on none), dense gradients replicated (the same on
 * every rank), expert gradient rows of this rank's columns: sparse
 * [expert_capacity, d/P] (rows listed in expert_rows, count in
 * *d_n_expert_rows, the same on every rank) or, with experts_dense, added
 * into [N, d/P] buffers.  One all-reduce of T*H*k floats (and with dx one
 * all-gather of T*d floats), queued on `stream`.  A non-finite dy is
 * recorded for peer_cuda_shard_check.  State rules as peer_cuda_backward;
 * d_dx overlapping d_dy or the forward's d_x is refused
 * (PEER_ERR_INVALID_ARGUMENT), as peer_shard_backward refuses it. */
PEER_API peer_status peer_cuda_shard_backward(peer_cuda_shard *shard, peer_context *ctx,
                                              const float *d_dy, float *d_dx,
                                              peer_grads *d_grads, int64_t *d_n_expert_rows,
                                              cudaStream_t stream);

/* Local.  An optimizer of the shard's parameters: a peer_optimizer (state
 * in device memory, the expert tables' [N, d/P]), stepped with
 * peer_cuda_optimizer_step on peer_cuda_shard_backward's gradients (or
 * peer_optimizer_step on host ones), read with peer_optimizer_state*,
 * freed with peer_optimizer_free.  Each rank steps its own parameters; the
 * rules are elementwise, so a rank's columns step as the unsharded layer's
 * would, and the replicated parameters stay the same bits on every rank. */
PEER_API peer_status peer_cuda_shard_optimizer_create(peer_optimizer **out,
                                                      peer_cuda_shard *shard,
                                                      const peer_optim_config *cfg);

/* Files, local, as peer_shard_save / peer_shard_load / peer_shard_load_full
 * (peer.h): this rank's shard file (metadata "peer.shard.*"; written
 * atomically), opt (from peer_cuda_shard_optimizer_create on this shard, or
 * NULL) saved or loaded with it.  Through host staging as peer_layer_save
 * on a CUDA layer (waits for the whole device; a host copy of each tensor).
 * load refuses a file of another world size, rank or column range, or an
 * unsharded file; load_full takes an unsharded weight file or checkpoint
 * (each expert table read whole into host memory, then this rank's columns
 * uploaded). */
PEER_API peer_status peer_cuda_shard_save(const peer_cuda_shard *shard, const peer_optimizer *opt,
                                          const char *path);
PEER_API peer_status peer_cuda_shard_load(peer_cuda_shard *shard, peer_optimizer *opt,
                                          const char *path);
PEER_API peer_status peer_cuda_shard_load_full(peer_cuda_shard *shard, peer_optimizer *opt,
                                               const char *path);

#ifdef __cplusplus
}
#endif
#endif /* PEER_CUDA_H */
