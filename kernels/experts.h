/* experts.h: launcher of the fused expert kernel (experts.cu): for each
 * token, gather u_i and v_i of its H*k experts straight from the tables,
 * dot, activation, gate and accumulate into y, without writing gathered rows
 * anywhere.  Queues work on `stream`; PEER_ERR_CUDA if the launch fails. */
#ifndef PEER_KERNELS_EXPERTS_H
#define PEER_KERNELS_EXPERTS_H

#include "peer.h"

#include <cuda_runtime_api.h>
#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* Shared memory of one block: the H*k entries' ids and coefficients. */
size_t peer_k_experts_smem(int64_t hk);

/* y [T, d] = sum over e < hk of gates[t, e] * act(u_ids[t,e] . x_t) * v_ids[t,e].
 * down / up: [N, d] tables, f32 or (bf16 != 0) bf16; act: peer_activation. */
peer_status peer_k_experts(const float *x, float *y, const void *down, const void *up,
                           int bf16, const int64_t *ids, const float *gates, int64_t T,
                           int64_t d, int64_t hk, int act, cudaStream_t stream);

#ifdef __cplusplus
}
#endif
#endif
