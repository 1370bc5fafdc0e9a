/* shard.h: launchers of the sharded expert phase (shard.cu), for a rank that
 * holds columns [col0, col0 + cols) of both expert tables ([N, cols], f32
 * or bf16): the partial dots, the combine into the rank's columns of y, and
 * the interleave of every rank's columns into y.  The all-reduce between
 * the first two and the all-gather before the third are the caller's
 * communicator's (kernels/backend_shard.c).  Every launcher queues work on
 * `stream`, returns PEER_ERR_CUDA if the launch fails, never synchronises. */
#ifndef PEER_KERNELS_SHARD_H
#define PEER_KERNELS_SHARD_H

#include "peer.h"

#include <cuda_runtime_api.h>
#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* Shared memory of one combine block (the token's hk ids and coefficients);
 * the same bound as the unsharded expert kernel's (experts.h). */
size_t peer_k_shard_combine_smem(int64_t hk);

/* z [T, hk] = u_ids[t,e][0 .. cols) . x[t, col0 .. col0 + cols), x [T, d]. */
peer_status peer_k_shard_dots(const float *x, int64_t d, int64_t col0, const void *down,
                              int bf16, int64_t cols, const int64_t *ids, int64_t T, int64_t hk,
                              float *z, cudaStream_t stream);

/* out [T, cols] = sum over e < hk, in order, of gates[t,e] * act(z[t,e]) *
 * v_ids[t,e][0 .. cols); act: peer_activation.  z NULL: the coefficients are
 * gates[t,e] themselves (the backward's dx: cdown, with `up` the down
 * table). */
peer_status peer_k_shard_combine(const float *z, const float *gates, const int64_t *ids,
                                 const void *up, int bf16, int64_t cols, int64_t T, int64_t hk,
                                 int act, float *out, cudaStream_t stream);

/* y [T, world * cols]: y[t, r*cols + j] = parts[(r*T + t)*cols + j]. */
peer_status peer_k_shard_interleave(const float *parts, int world, int64_t T, int64_t cols,
                                    float *y, cudaStream_t stream);

/* The backward's entry coefficients for T tokens of H heads of k entries,
 * from ds [T, H*k] holding the all-reduced v_i . dy (overwritten): as the
 * unsharded backward (experts.h), cup = g act(z), cdown = g vd act'(z),
 * ds = act(z) vd turned into d score by peer_gates_grad per head. */
peer_status peer_k_shard_coefficients(const float *z, const float *gates, const float *scores,
                                      float *ds, float *cup, float *cdown, int64_t T, int64_t H,
                                      int64_t k, int act, int gate, cudaStream_t stream);

#ifdef __cplusplus
}
#endif
#endif
