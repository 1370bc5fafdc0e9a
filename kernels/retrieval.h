/* retrieval.h: launchers of the retrieval kernels (retrieval.cu): query bias
 * and running batch norm, per-half top-k' of the sub-key scores, the exact
 * candidate merge with gates, and brute force over all n*n candidates.  The
 * matrix products around them are cuBLAS calls made by the backend
 * (kernels/backend.c).  Every launcher queues work on `stream`, returns
 * PEER_ERR_CUDA with the runtime's message if the launch fails, and never
 * synchronises. */
#ifndef PEER_KERNELS_RETRIEVAL_H
#define PEER_KERNELS_RETRIEVAL_H

#include "peer.h"

#include <cuda_runtime_api.h>
#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* Dynamic shared memory one kernel may ask for without opting in. */
#define PEER_K_SMEM_MAX ((size_t)48 * 1024)

/* Shared memory of one warp of the top-k' kernel, and of one thread of the
 * merge kernel; the backend refuses configs where these exceed
 * PEER_K_SMEM_MAX.  The same limits as sizes of the config: the top-k'
 * kernel takes k' up to peer_k_topk_kp_max() (4064: its buffer of 8-byte
 * keys, a power of two >= k' + 32, within 32 KiB), any n; the merge takes
 * top_k up to peer_k_merge_k_max() (3071). */
size_t peer_k_topk_warp_smem(int64_t kp);
size_t peer_k_merge_thread_smem(int64_t k);
int64_t peer_k_topk_kp_max(void);
int64_t peer_k_merge_k_max(void);

/* q [T, dq] in place: q += bias (if bias), then, if mean, the running batch
 * norm (q - mean) / sqrt(var + 1e-5) * weight + norm_bias. */
peer_status peer_k_bias_norm(float *q, int64_t T, int64_t dq, const float *bias,
                             const float *norm_weight, const float *norm_bias,
                             const float *mean, const float *var, cudaStream_t stream);

/* Rows r in [0, rows) of S [rows, n] (row r = (t*H + h)*2 + half): the kp
 * best (score, index) by the tie rule, sorted, into out_s / out_id
 * [rows, kp] (a NaN ranks below every number).  A row holding a non-finite
 * score lowers *bad to (t*H + h).  n < 2^31; PEER_ERR_INVALID_ARGUMENT for
 * kp outside [1, n], PEER_ERR_UNSUPPORTED for kp beyond peer_k_topk_kp_max(). */
peer_status peer_k_subkey_topk(const float *S, int64_t rows, int64_t n, int64_t kp,
                               float *out_s, int64_t *out_id, unsigned long long *bad,
                               cudaStream_t stream);

/* The bf16 first pass (kernels/README.md "bf16 sub-key scores").
 * peer_k_keys16: each of `rows` key rows of m floats to bf16 (nearest even,
 * |x| < 2^-126 flushed) into k16 [rows, m], and norms [3][rows]: |c'|,
 * |c - c'|, |c| rounded up.  peer_k_query16: the same for every query half
 * of q [T, H*dk] (m = dk/2) into q16 (q's layout), and per row
 * (t*H + h)*2 + half the bound's coefficients coef [rows][PEER_K_BF16_COEFS]
 * (peer_bf16_bound_coefs, g = peer_k_bf16_gamma(m), then
 * peer_bf16_chain_coef). */
#define PEER_K_BF16_COEFS 5
peer_status peer_k_keys16(const float *keys, int64_t rows, int64_t m, uint16_t *k16, float *norms,
                          cudaStream_t stream);
peer_status peer_k_query16(const float *q, int64_t T, int64_t H, int64_t dk, int64_t m, float g,
                           uint16_t *q16, float *coef, cudaStream_t stream);
/* The relative error bound g of both sums of m products (the tensor cores'
 * and the exact FMA chain's), rounded up. */
float peer_k_bf16_gamma(int64_t m);
size_t peer_k_topk_bf16_warp_smem(int64_t kp, int64_t m);

/* As peer_k_subkey_topk, from the first pass's scores S16 [T, H, 2, n]: per
 * row the kp best exact scores (one FMA chain in component order per key,
 * the CPU f32 path's bits) of q [T, H*dk] against keys [G, 2, n, dk/2],
 * re-scoring only the keys whose bracket S16 -+ e (norms, coef as above)
 * can reach the kp-th largest lower end; a row whose bracket is not finite,
 * whose chain may overflow for some key (peer_bf16_chain_coef) or which
 * keeps more than 2kp + 64 keys re-scores all n and adds 1 to
 * *fallbacks.  dk/2 % 4 == 0. */
peer_status peer_k_subkey_topk_bf16(const float *S16, const float *q, const float *keys,
                                    const float *norms, const float *coef, int64_t T, int64_t H,
                                    int64_t dk, int64_t n, int64_t kp, int shared_keys,
                                    float *out_s, int64_t *out_id, unsigned long long *bad,
                                    unsigned long long *fallbacks, cudaStream_t stream);

/* Every sub-key score S [T, H, 2, n] as subkey_topk_bf16 computes the
 * exact ones (for brute force on such layers). */
peer_status peer_k_exact_scores(const float *q, const float *keys, int64_t T, int64_t H,
                                int64_t dk, int64_t n, int shared_keys, float *S,
                                cudaStream_t stream);

/* Per (t, h) in [0, TH): the k best of the kp x kp candidates from the two
 * halves' lists (lists [TH, 2, kp]), expert id a*n + b, sorted by the tie
 * rule, into scores / ids [TH, k]; gates [TH, k] by peer_gates.  A non-finite
 * candidate lowers *bad to (t*H + h). */
peer_status peer_k_merge(const float *list_s, const int64_t *list_id, int64_t TH, int64_t kp,
                         int64_t k, int64_t n, int gate, float *scores, int64_t *ids,
                         float *gates, unsigned long long *bad, cudaStream_t stream);

/* PEER_OK if the brute-force kernel takes n sub-keys and top_k k (its
 * per-thread lists of one warp fit PEER_K_SMEM_MAX: min(k, n * ceil(n / 32))
 * <= 95, i.e. k <= 95 or n < 48; with a config's k <= n, k <= 95), else
 * PEER_ERR_UNSUPPORTED with a message. */
peer_status peer_k_brute_supported(int64_t n, int64_t k);

/* Brute force per (t, h) in [0, TH): the exact top-k of all n*n sums
 * s1[a] + s2[b] (rows of S [TH, 2, n] as the product path computes them)
 * in the order of peer_pair_beats (exact sums, ties to the smaller id),
 * expert id a*n + b, into scores / ids [TH, k]; gates [TH, k] by
 * peer_gates.  A non-finite sum lowers *bad to (t*H + h).
 * PEER_ERR_UNSUPPORTED where peer_k_brute_supported says so. */
peer_status peer_k_brute_topk(const float *S, int64_t TH, int64_t n, int64_t k, int gate,
                              float *scores, int64_t *ids, float *gates, unsigned long long *bad,
                              cudaStream_t stream);

#ifdef __cplusplus
}
#endif
#endif
