/* peer_mpi.c: the MPI adapter (include/peer_mpi.h): a peer_comm whose
 * all-reduce is MPI_Allreduce(MPI_SUM) and whose all-gather is
 * MPI_Allgather, on a duplicate of the caller's communicator.  Counts beyond
 * INT_MAX go in pieces. */
#include "peer_mpi.h"

#include "internal.h"

#include <limits.h>
#include <stdlib.h>
#include <string.h>

static MPI_Comm comm_of(void *handle) { return *(MPI_Comm *)handle; }

static int allreduce_sum(void *handle, float *data, int64_t count) {
  for (int64_t done = 0; done < count;) {
    int n = count - done > INT_MAX ? INT_MAX : (int)(count - done);
    int rc = MPI_Allreduce(MPI_IN_PLACE, data + done, n, MPI_FLOAT, MPI_SUM, comm_of(handle));
    if (rc != MPI_SUCCESS) return rc;
    done += n;
  }
  return 0;
}

static int allgather(void *handle, const void *send, void *recv, size_t bytes) {
  if (bytes > INT_MAX) return -1; /* one rank's part; the core sends less */
  return MPI_Allgather(send, (int)bytes, MPI_BYTE, recv, (int)bytes, MPI_BYTE, comm_of(handle));
}

peer_status peer_mpi_comm_create(peer_comm *out, MPI_Comm comm) {
  if (!out) return peer_fail(PEER_ERR_INVALID_ARGUMENT, "mpi_comm_create: NULL argument");
  memset(out, 0, sizeof *out);
  int initialised = 0;
  MPI_Initialized(&initialised);
  if (!initialised)
    return peer_fail(PEER_ERR_STATE, "mpi_comm_create: MPI is not initialised (call MPI_Init)");
  MPI_Comm *dup = malloc(sizeof *dup);
  if (!dup) return peer_fail(PEER_ERR_OUT_OF_MEMORY, "mpi_comm_create: out of memory");
  int rc = MPI_Comm_dup(comm, dup);
  if (rc != MPI_SUCCESS) {
    free(dup);
    return peer_fail(PEER_ERR_IO, "mpi_comm_create: MPI_Comm_dup failed (%d)", rc);
  }
  MPI_Comm_rank(*dup, &out->rank);
  MPI_Comm_size(*dup, &out->world);
  out->handle = dup;
  out->allreduce_sum = allreduce_sum;
  out->allgather = allgather;
  return PEER_OK;
}

void peer_mpi_comm_free(peer_comm *comm) {
  if (!comm || !comm->handle) return;
  MPI_Comm *dup = comm->handle;
  MPI_Comm_free(dup);
  free(dup);
  comm->handle = NULL;
}
