/* train.h: launchers of the training kernels (train.cu): batch-norm batch
 * statistics and their backward, the running-statistics update, the query
 * gradient, and the sorted (deterministic) sub-key and expert gradients.
 * The expert part of the backward is experts.h's peer_k_experts_backward;
 * the projection's products are cuBLAS calls made by the backend.  Every
 * launcher queues work on `stream` and never synchronises. */
#ifndef PEER_KERNELS_TRAIN_H
#define PEER_KERNELS_TRAIN_H

#include "peer.h"

#include <cuda_runtime_api.h>
#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* An error record (a device word lowered by integer atomicMin to the first
 * bad row or (token, head)) that holds nothing. */
#define PEER_K_CLEAR (~0ull)

/* *row (a record: PEER_K_CLEAR, or a row already seen) is lowered to the
 * first of the T rows of a [T, d] that holds a NaN or infinity (an integer
 * atomicMin: the result does not depend on the order). */
peer_status peer_k_first_nonfinite_row(const float *a, int64_t T, int64_t d,
                                       unsigned long long *row, cudaStream_t stream);

/* Device scratch of the reductions over T tokens of a [T, cols] below
 * (batch_norm_train, norm_backward, column_sums): enough for every batch of
 * at most T tokens.  They sum a fixed chunk of tokens per block, then the
 * chunks' partials in order: the same bits however the blocks are
 * scheduled.  A smaller scratch is PEER_ERR_INVALID_ARGUMENT. */
size_t peer_k_reduce_scratch_bytes(int64_t T, int64_t cols);

/* Batch norm with batch statistics over the T rows of q [T, dq], in place:
 * mean, invstd = 1 / sqrt(biased var + 1e-5) per feature (summed in a fixed
 * order), qhat = (q - mean) invstd, q = qhat * weight + bias. */
peer_status peer_k_batch_norm_train(float *q, float *qhat, float *mean, float *invstd,
                                    int64_t T, int64_t dq, const float *weight,
                                    const float *bias, void *scratch, size_t scratch_bytes,
                                    cudaStream_t stream);

/* running = (1 - m) running + m batch, the variance unbiased (T / (T - 1)),
 * unless one of the n_records error records of this batch (read on the
 * device when the kernel runs) holds something: a bad batch leaves the
 * running statistics untouched. */
peer_status peer_k_running_update(float *run_mean, float *run_var, const float *mean,
                                  const float *invstd, int64_t T, int64_t dq, float momentum,
                                  const unsigned long long *records, int n_records,
                                  cudaStream_t stream);

/* dst[i] = min(dst[i], src[i]) for i < n error records (integer atomicMin). */
peer_status peer_k_record_fold(unsigned long long *dst, const unsigned long long *src, int n,
                               cudaStream_t stream);

/* Batch-norm backward (batch statistics), dq [T, dq] in place: from d loss /
 * d (normalised, affine) q to d loss / d (Wq x + b); gweight, gbias [dq]
 * (either may be NULL). */
peer_status peer_k_norm_backward(float *dq, const float *qhat, const float *invstd,
                                 const float *weight, int64_t T, int64_t dqdim, float *gweight,
                                 float *gbias, void *scratch, size_t scratch_bytes,
                                 cudaStream_t stream);

/* out [cols] = the sums of a [T, cols]'s columns over rows, in a fixed order. */
peer_status peer_k_column_sums(const float *a, int64_t T, int64_t cols, float *out,
                               void *scratch, size_t scratch_bytes, cudaStream_t stream);

/* dq [T, H*dk]: each kept score s1[a] + s2[b] of head h sends ds * C1[a]
 * into the first half and ds * C2[b] into the second, entries in order. */
peer_status peer_k_query_grad(const int64_t *ids, const float *ds, const float *keys,
                              int64_t T, int64_t H, int64_t k, int64_t n, int64_t dk,
                              int shared_keys, float *dq, cudaStream_t stream);

/* Sort keys: expert (key = id, val = entry) for ne entries; sub-key
 * (key = (g*2 + p)*n + a or b, val = 2*entry + p) for 2*ne. */
peer_status peer_k_expert_sort_keys(const int64_t *ids, int64_t ne, uint32_t *key,
                                    uint32_t *val, cudaStream_t stream);
peer_status peer_k_subkey_sort_keys(const int64_t *ids, int64_t T, int64_t H, int64_t k,
                                    int64_t n, int shared_keys, uint32_t *key, uint32_t *val,
                                    cudaStream_t stream);

/* Scratch of peer_k_sorted_runs for up to `items` (< 2^31) pairs: the run
 * starts' tile counts and CUB's sort scratch. */
peer_status peer_k_sort_temp_bytes(int64_t items, size_t *bytes);

/* Stable radix sort of `items` (key, val) pairs from (key_in, val_in) into
 * (key_out, val_out) over the bits max_key needs, then the runs of equal
 * keys (a device-wide scan of "new key" flags): starts[0 .. *runs]
 * (starts[*runs] = items); temp of peer_k_sort_temp_bytes. */
peer_status peer_k_sorted_runs(const uint32_t *key_in, const uint32_t *val_in, uint32_t *key_out,
                               uint32_t *val_out, uint32_t *starts, uint32_t *runs,
                               int64_t items, uint32_t max_key, void *temp, size_t temp_bytes,
                               cudaStream_t stream);

/* Expert gradient rows, one block per run r (at most max_runs): the run's
 * entries e in order add cdown[e] x_t into the down row and cup[e] dy_t into
 * the up row, w elements of each: x_t = x + t*ld, dy_t = dy + t*ld (a
 * shard passes its first column's address, ld = d, w = its columns).
 * dense: rows id of [N, w] buffers get += ; else row r of [max_runs, w] is
 * written.  rows[r] = the expert id; *n_rows (if not NULL) = the number of
 * rows. */
peer_status peer_k_expert_grads(const uint32_t *key, const uint32_t *val, const uint32_t *starts,
                                const uint32_t *runs, int64_t max_runs, const float *cdown,
                                const float *cup, const float *x, const float *dy, int64_t ld,
                                int64_t w, int64_t hk, int dense, float *gdown, float *gup,
                                int64_t *rows, int64_t *n_rows, cudaStream_t stream);

/* Sub-key gradient rows (gk pre-zeroed [G*2*n, half]), one warp per run:
 * row key += ds[e] * q_t's half p of head h, entries in order. */
peer_status peer_k_keys_grad(const uint32_t *key, const uint32_t *val, const uint32_t *starts,
                             const uint32_t *runs, int64_t max_runs, const float *ds,
                             const float *q, int64_t H, int64_t k, int64_t dk, float *gk,
                             cudaStream_t stream);

#ifdef __cplusplus
}
#endif
#endif
