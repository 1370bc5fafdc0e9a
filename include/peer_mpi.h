/* peer_mpi.h: a peer_comm (peer.h "sharding") over an MPI communicator, for
 * sharded layers in MPI programs.  Part of libpeer_mpi, built when CMake finds
 * MPI (PEER_MPI=AUTO|ON|OFF); libpeer itself links no MPI. */
#ifndef PEER_MPI_H
#define PEER_MPI_H

#include <mpi.h>

#include "peer.h"

#ifdef __cplusplus
extern "C" {
#endif

/* Fill *out with a communicator over a duplicate of `comm` (MPI_Comm_dup:
 * the layer's traffic never meets the caller's), with its rank and size.
 * Collective over comm.  MPI must be initialised.  Free with
 * peer_mpi_comm_free after every shard that uses it. */
PEER_API peer_status peer_mpi_comm_create(peer_comm *out, MPI_Comm comm);
/* Free the duplicate (collective, as MPI_Comm_free); a zeroed or already
 * freed peer_comm is accepted. */
PEER_API void peer_mpi_comm_free(peer_comm *comm);

#ifdef __cplusplus
}
#endif
#endif /* PEER_MPI_H */
