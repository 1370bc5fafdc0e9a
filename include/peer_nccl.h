/* peer_nccl.h: a peer_cuda_comm (peer_cuda.h "sharding") over an NCCL
 * communicator, for CUDA sharded layers.  Part of libpeer_nccl, built when
 * CMake finds NCCL in a CUDA build (PEER_NCCL=AUTO|ON|OFF); libpeer itself
 * links no NCCL. */
#ifndef PEER_NCCL_H
#define PEER_NCCL_H

#include <nccl.h>

#include "peer_cuda.h"

#ifdef __cplusplus
extern "C" {
#endif

/* Fill *out with a device communicator over `comm` (not copied: it must
 * outlive every shard that uses it, and the caller destroys it), with its
 * rank and size: the all-reduce is ncclAllReduce(ncclFloat, ncclSum) in
 * place, the all-gather ncclAllGather of bytes, both on the call's stream.
 * NCCL's all-reduce leaves the same bits on every rank.  *device (when
 * device is not NULL) gets the communicator's CUDA device
 * (ncclCommCuDevice), which the shard's options.device must be.
 * PEER_ERR_INVALID_ARGUMENT for a NULL out or comm, PEER_ERR_IO when NCCL
 * cannot say the rank, size or device.  Nothing to free. */
PEER_API peer_status peer_nccl_comm_init(peer_cuda_comm *out, ncclComm_t comm, int *device);

#ifdef __cplusplus
}
#endif
#endif /* PEER_NCCL_H */
