/* optim.h: launchers of the optimizer kernels (optim.cu): one step of
 * optim_rule.h's update over a dense parameter, and over the listed rows of
 * an expert table (lazy: only those rows and their state).  Every launcher
 * queues work on `stream` and never synchronises. */
#ifndef PEER_KERNELS_OPTIM_H
#define PEER_KERNELS_OPTIM_H

#include "optim_rule.h"
#include "peer.h"

#include <cuda_runtime_api.h>
#include <stdbool.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* A gradient check record: (slot << PEER_K_GRAD_SLOT_SHIFT) | element, the
 * element of a dense parameter its flat index, of an expert table id*d + c;
 * PEER_K_CLEAR (train.h) when every checked element was finite. */
#define PEER_K_GRAD_SLOT_SHIFT 48

/* *rec lowered to the record of g's first non-finite element, if any:
 * g[0, n) of parameter `slot`, or the listed expert rows of the table
 * `slot` (rows, dense, ids as peer_k_optim_rows). */
peer_status peer_k_optim_check_dense(const float *g, int64_t n, int slot, unsigned long long *rec,
                                     cudaStream_t stream);
peer_status peer_k_optim_check_rows(const float *g, bool dense, const int64_t *ids,
                                    const int64_t *d_rows, int64_t n_rows, int64_t max_rows,
                                    int64_t d, int slot, unsigned long long *rec,
                                    cudaStream_t stream);

/* p[i] = update(p[i], g[i]) for i < n (f32 p); m, v the state (NULL: none).
 * Nothing is written when *refused (device memory; NULL: never) holds a
 * record. */
peer_status peer_k_optim_dense(const peer_optim_rule *r, float *p, const float *g, float *m,
                               float *v, int64_t n, const unsigned long long *refused,
                               cudaStream_t stream);

/* For j < rows (the count *d_rows when d_rows is given, read on the device,
 * else n_rows; at most max_rows, the grid): row = ids[j] of the [N, d]
 * table p (bf16 storage when bf16) and of its state m, v, updated with the
 * gradient row j of g ([max_rows, d]) or, with dense, row `row` of g
 * ([N, d]); nothing is written when *refused holds a record. */
peer_status peer_k_optim_rows(const peer_optim_rule *r, void *p, bool bf16, const float *g,
                              bool dense, float *m, float *v, const int64_t *ids,
                              const int64_t *d_rows, int64_t n_rows, int64_t max_rows, int64_t d,
                              const unsigned long long *refused, cudaStream_t stream);

#ifdef __cplusplus
}
#endif
#endif
