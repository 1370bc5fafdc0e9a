/* peer_cuda.h: the device-pointer API of peer's CUDA backend.  A layer created
 * with peer_options.backend = PEER_BACKEND_CUDA keeps its parameters in device
 * memory (peer_layer_param's `data` is then a device pointer) and runs the
 * calls below on a stream the caller owns, without host-device copies.
 *
 * The host-pointer calls of peer.h (peer_forward, peer_retrieve) also work on
 * a CUDA layer: they are a convenience path that copies x to the device and
 * the results back, on a stream of the layer's own, and synchronise.  Use the
 * calls here on the hot path.
 *
 * Available only in builds configured with PEER_CUDA (they define
 * PEER_USE_CUDA).  Training works through peer.h's host-pointer calls
 * (peer_context_create puts the context in device memory; peer_forward_train
 * and peer_backward copy x, dy in and y, dx and every gradient back to the
 * caller's host buffers, then synchronise); device-pointer training calls
 * are not provided yet.  peer_retrieve_brute returns PEER_ERR_UNSUPPORTED on
 * the CUDA backend.
 *
 * Each call makes the layer's device current on the calling thread
 * (cudaSetDevice).  Like every peer_layer call, calls on one layer must not
 * overlap in time from two threads. */
#ifndef PEER_CUDA_H
#define PEER_CUDA_H

#include "peer.h"

#include <cuda_runtime_api.h>

#ifdef __cplusplus
extern "C" {
#endif

/* Number of CUDA devices the runtime can use; 0 when there is none or no
 * driver (never an error). */
int peer_cuda_device_count(void);

/* Device scratch.  The calls below need workspace for T tokens; by default a
 * layer allocates and keeps device scratch for the largest T it has seen (an
 * allocation, which synchronises the device, only when T grows).  A caller
 * that owns its memory queries the size for its largest batch and registers a
 * device buffer (256-byte aligned, as cudaMalloc gives); the layer then never
 * allocates in peer_cuda_forward / peer_cuda_retrieve for T up to that size,
 * and a larger T fails with PEER_ERR_INVALID_ARGUMENT.  The buffer must stay
 * valid until replaced (NULL, 0 returns to internal scratch) or the layer is
 * freed; the layer does not free it.  peer_layer_workspace_size (peer.h)
 * reports host scratch, which a CUDA layer does not use. */
peer_status peer_cuda_workspace_size(const peer_layer *layer, int64_t n_tokens,
                                     size_t *bytes);
peer_status peer_cuda_set_workspace(peer_layer *layer, void *d_buffer, size_t bytes);

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
peer_status peer_cuda_forward(peer_layer *layer, int64_t n_tokens, const float *d_x,
                              float *d_y, int64_t *d_indices, float *d_gates,
                              cudaStream_t stream);

/* Retrieval only, as peer_retrieve, on device pointers: d_indices [T, H, k]
 * (required), d_scores and d_gates [T, H, k] (optional).  Stream and error
 * reporting as peer_cuda_forward. */
peer_status peer_cuda_retrieve(peer_layer *layer, int64_t n_tokens, const float *d_x,
                               int64_t *d_indices, float *d_scores, float *d_gates,
                               cudaStream_t stream);

/* Wait for `stream` and report what the calls queued on it found:
 * PEER_ERR_CUDA if the stream holds a CUDA error, PEER_ERR_NONFINITE (naming
 * the token and head, counted within the call that saw it) if a call since
 * the last check met a non-finite score; then clears that record. */
peer_status peer_cuda_check(peer_layer *layer, cudaStream_t stream);

#ifdef __cplusplus
}
#endif
#endif /* PEER_CUDA_H */
