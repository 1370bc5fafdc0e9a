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

/* Shared memory of one block: the H*k entries' ids and coefficients; the
 * backend refuses configs where it exceeds PEER_K_SMEM_MAX, i.e. H*k beyond
 * peer_k_experts_hk_max() (4096). */
size_t peer_k_experts_smem(int64_t hk);
int64_t peer_k_experts_hk_max(void);

/* y [T, d] = sum over e < hk of gates[t, e] * act(u_ids[t,e] . x_t) * v_ids[t,e].
 * down / up: [N, d] tables, f32 or (bf16 != 0) bf16; act: peer_activation.
 * z [T, hk]: if not NULL, the pre-activations u . x (training keeps them). */
peer_status peer_k_experts(const float *x, float *y, const void *down, const void *up,
                           int bf16, const int64_t *ids, const float *gates, float *z,
                           int64_t T, int64_t d, int64_t hk, int act, cudaStream_t stream);

/* The expert kernel's arguments; the backward fills them all. */
typedef struct peer_k_expert_args {
  const float *in;            /* forward x, backward dy [T, d] */
  float *out;                 /* forward y, backward dx [T, d] (NULL: skip dx) */
  const void *first, *second; /* forward down, up; backward up, down */
  const int64_t *ids;         /* [T, hk] */
  const float *gates;         /* [T, hk] */
  float *z;                   /* [T, hk] forward out (may be NULL), backward in */
  const float *scores;        /* backward: [T, hk] kept scores */
  float *ds, *cup, *cdown;    /* backward out: [T, hk] */
  int64_t T, d;
  int hk, k, act, gate;       /* k: entries per head (hk / k heads) */
} peer_k_expert_args;

/* Backward of the expert sum, one block per token: per entry vd = v . dy,
 * cup = g act(z), cdown = g vd act'(z), ds = act(z) vd turned into d score
 * by peer_gates_grad per head; dx_t = sum_e cdown[e] u_e in entry order. */
peer_status peer_k_experts_backward(const peer_k_expert_args *args, int bf16,
                                    cudaStream_t stream);

#ifdef __cplusplus
}
#endif
#endif
