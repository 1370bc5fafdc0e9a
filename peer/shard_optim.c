/* shard_optim.c: the optimizer of a sharded layer: a peer_optimizer on the
 * shard's layer, which holds all the state (the expert tables' state shaped
 * like this rank's [N, d/P] columns) and steps everything, the expert rows
 * as wide as the tables (optim.c).  The lazy sparse rules are elementwise,
 * so stepping a rank's columns gives that slice of the unsharded step. */
#include "shard.h"

#include <stdlib.h>

struct peer_shard_optimizer {
  peer_optimizer *o;
};

peer_status peer_shard_optimizer_create(peer_shard_optimizer **out, peer_shard *S,
                                        const peer_optim_config *cfg) {
  if (!out || !S || !cfg)
    return peer_fail(PEER_ERR_INVALID_ARGUMENT, "shard_optimizer_create: NULL argument");
  *out = NULL;
  peer_shard_optimizer *so = calloc(1, sizeof *so);
  if (!so) return peer_fail(PEER_ERR_OUT_OF_MEMORY, "shard_optimizer_create: out of memory");
  peer_status st = peer_optimizer_create(&so->o, S->L, cfg);
  if (st) {
    free(so);
    return st;
  }
  *out = so;
  return PEER_OK;
}

void peer_shard_optimizer_free(peer_shard_optimizer *so) {
  if (!so) return;
  peer_optimizer_free(so->o);
  free(so);
}

int64_t peer_shard_optimizer_step_count(const peer_shard_optimizer *so) {
  return so ? peer_optimizer_step_count(so->o) : 0;
}

peer_status peer_shard_optimizer_state_by_name(peer_shard_optimizer *so, const char *name,
                                               peer_tensor *out) {
  if (!so) return peer_fail(PEER_ERR_INVALID_ARGUMENT, "shard_optimizer_state: NULL optimizer");
  return peer_optimizer_state_by_name(so->o, name, out);
}

/* The inner optimizer (shard_file.c saves and loads through it). */
peer_optimizer *peer_shard_optimizer_inner(const peer_shard_optimizer *so) { return so->o; }

peer_status peer_shard_optimizer_step(peer_shard_optimizer *so, const peer_grads *g) {
  if (!so || !g) return peer_fail(PEER_ERR_INVALID_ARGUMENT, "shard_optimizer_step: NULL argument");
  return peer_optimizer_step(so->o, g);
}
