/* status.h: a failed CUDA runtime call as a peer_status, one rule for the
 * backend (kernels/backend.c) and the kernels' launchers (C and C++). */
#ifndef PEER_KERNELS_STATUS_H
#define PEER_KERNELS_STATUS_H

#ifdef __cplusplus
extern "C" {
#endif
#include "internal.h"
#ifdef __cplusplus
}
#endif

#include <cuda_runtime_api.h>

/* PEER_ERR_OUT_OF_MEMORY for an allocation the device cannot give, else
 * PEER_ERR_CUDA, with "what: the runtime's message".  The runtime keeps the
 * error of a failed call as its last error; it is cleared here, or the next
 * launch check (peer_k_launched) would report it against a launch that
 * worked.  A sticky error (the context is unusable) stays, as it must. */
static inline peer_status peer_k_cuda_fail(cudaError_t e, const char *what) {
  (void)cudaGetLastError();
  return peer_fail(e == cudaErrorMemoryAllocation ? PEER_ERR_OUT_OF_MEMORY : PEER_ERR_CUDA,
                   "%s: %s", what, cudaGetErrorString(e));
}

#endif
