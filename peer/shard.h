/* shard.h: what the sharded layer's files (shard.c, shard_train.c,
 * shard_optim.c, shard_file.c) share: the object, its transport calls and
 * scratch. */
#ifndef PEER_SHARD_H
#define PEER_SHARD_H

#include "cpu.h"

struct peer_shard {
  peer_layer *L;                  /* full config; expert tables hold columns [col0, col0 + cols) */
  const peer_cpu_train_impl *cpu; /* the CPU variant's passes, as the unsharded layer's */
  peer_comm comm;
  int rank, world;
  int64_t col0, cols;
  void *buf; /* inference scratch, grown on demand */
  size_t buf_bytes;
};

/* Metadata keys of a shard file. */
#define PEER_SHARD_META_RANK PEER_META_PREFIX "shard.rank"
#define PEER_SHARD_META_WORLD PEER_META_PREFIX "shard.world"
#define PEER_SHARD_META_COL0 PEER_META_PREFIX "shard.col0"
#define PEER_SHARD_META_COLS PEER_META_PREFIX "shard.cols"

/* Transport calls with the failure turned into PEER_ERR_IO naming `what`. */
peer_status peer_shard_allreduce(const peer_shard *S, float *data, int64_t count, const char *what);
peer_status peer_shard_allgather(const peer_shard *S, const void *send, void *recv, size_t bytes,
                                 const char *what);
/* Gather every rank's [T, cols] rows `mine` (through `all`, [world, T, cols])
 * into out [T, d]. */
peer_status peer_shard_gather_rows(const peer_shard *S, int64_t T, const float *mine, float *all,
                                   float *out, const char *what);
void peer_shard_interleave(const peer_shard *S, int64_t T, const float *parts, float *y);

/* Grow the shard's scratch to `bytes`. */
peer_status peer_shard_scratch(peer_shard *S, size_t bytes, void **out);

/* Per-thread scratch bytes the expert phase (cpu->expert_dots,
 * cpu->expert_combine) needs: a row of cols floats, rounded up. */
size_t peer_shard_split_bytes(const peer_shard *S);

#endif
