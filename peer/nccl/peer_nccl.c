/* peer_nccl.c: the NCCL adapter (include/peer_nccl.h): a peer_cuda_comm
 * whose all-reduce is ncclAllReduce(ncclSum) in place and whose all-gather
 * is ncclAllGather of bytes, on the caller's communicator and the shard
 * call's stream. */
#include "peer_nccl.h"

#include "internal.h"

#include <string.h>

static int allreduce_sum(void *handle, float *d_data, int64_t count, cudaStream_t stream) {
  return (int)ncclAllReduce(d_data, d_data, (size_t)count, ncclFloat, ncclSum, (ncclComm_t)handle,
                            stream);
}

static int allgather(void *handle, const void *d_send, void *d_recv, size_t bytes,
                     cudaStream_t stream) {
  return (int)ncclAllGather(d_send, d_recv, bytes, ncclUint8, (ncclComm_t)handle, stream);
}

peer_status peer_nccl_comm_init(peer_cuda_comm *out, ncclComm_t comm, int *device) {
  if (!out || !comm) return peer_fail(PEER_ERR_INVALID_ARGUMENT, "nccl_comm_init: NULL argument");
  memset(out, 0, sizeof *out);
  int dev = -1;
  ncclResult_t rc;
  if ((rc = ncclCommUserRank(comm, &out->rank)) != ncclSuccess ||
      (rc = ncclCommCount(comm, &out->world)) != ncclSuccess ||
      (rc = ncclCommCuDevice(comm, &dev)) != ncclSuccess)
    return peer_fail(PEER_ERR_IO, "nccl_comm_init: %s", ncclGetErrorString(rc));
  if (device) *device = dev;
  out->handle = comm;
  out->allreduce_sum = allreduce_sum;
  out->allgather = allgather;
  return PEER_OK;
}
