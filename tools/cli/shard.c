/* shard.c: `peer shard`, between one weight file or checkpoint and the P
 * shard files of a sharded layer (peer.h "sharding": each rank holds d/P
 * columns of the expert tables) through peer_shard_split and
 * peer_shard_merge. */
#include "cli.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static const char usage_shard[] =
    "usage: peer shard --split P W.safetensors --out PREFIX\n"
    "       peer shard --merge SHARD.safetensors... --out W.safetensors\n"
    "\n"
    "--split P writes PREFIX-rank<r>-of-<P>.safetensors for r = 0..P-1: each\n"
    "holds the replicated tensors (query, norm, keys and their optimizer state)\n"
    "and columns [r*d/P, (r+1)*d/P) of experts.down and experts.up (and of their\n"
    "optimizer state), with metadata peer.shard.rank, .world, .col0, .cols.\n"
    "Rank r of a P-rank group loads its file with peer_shard_load.  d_model must\n"
    "be divisible by P.\n"
    "\n"
    "--merge joins the P shard files of one layer (in any order, every rank\n"
    "once) into one unsharded file; the replicated tensors must agree bit for\n"
    "bit across the files.  The result loads with peer_layer_load or, with its\n"
    "optimizer state, peer_checkpoint_load.\n"
    "\n"
    "Both read the input whole into memory (the full expert tables).\n";

enum { MAX_SHARDS = 4096 };

static int split(const char *in, const char *world_text, const char *prefix) {
  int64_t world;
  int rc = parse_int("split", world_text, 1, MAX_SHARDS, &world);
  if (rc) return rc;
  char **paths = calloc((size_t)world, sizeof *paths);
  if (!paths) return fail("out of memory");
  for (int64_t r = 0; r < world && !rc; r++) {
    size_t n = strlen(prefix) + 64;
    paths[r] = malloc(n);
    if (!paths[r])
      rc = fail("out of memory");
    else
      snprintf(paths[r], n, "%s-rank%lld-of-%lld.safetensors", prefix, (long long)r,
               (long long)world);
  }
  if (!rc) {
    peer_status st = peer_shard_split(in, (int)world, (const char *const *)paths);
    if (st) rc = lib_fail(st, NULL);
  }
  if (!rc) {
    printf("split %s into %lld shard files:\n", in, (long long)world);
    for (int64_t r = 0; r < world; r++)
      printf("  %s\n", paths[r]);
  }
  for (int64_t r = 0; r < world; r++)
    free(paths[r]);
  free(paths);
  return rc;
}

int cmd_shard(int argc, char **argv) {
  cli_opt opts[] = {{"split", true, NULL}, {"merge", false, NULL}, {"out", true, NULL}};
  static const char *pos[MAX_SHARDS];
  int n_pos, rc = parse_options(argc, argv, opts, 3, pos, MAX_SHARDS, &n_pos);
  if (rc == PARSE_HELP) return fputs(usage_shard, stdout), 0;
  if (rc) return rc;
  const char *world = opts[0].value, *out = opts[2].value;
  bool merge = opts[1].value != NULL;
  if (!world == !merge) return usage_error("give one of --split P and --merge");
  if (!out) return usage_error("--out is required (see 'peer shard --help')");
  if (world) {
    if (n_pos != 1) return usage_error("--split takes one input file");
    return split(pos[0], world, out);
  }
  if (n_pos < 1) return usage_error("--merge takes the shard files");
  peer_status st = peer_shard_merge(pos, n_pos, out);
  if (st) return lib_fail(st, NULL);
  printf("merged %d shard files into %s\n", n_pos, out);
  return 0;
}
