/* mpi_main.c: an MPI program outside the project that uses an installed
 * libpeer_mpi (tests/install_test.sh builds it against the CMake package's
 * component mpi and against peer_mpi.pc, and runs it on 2 ranks).  Each rank
 * holds its columns of a small layer sharded over MPI_COMM_WORLD and checks
 * the sharded forward against the unsharded layer's. */
#include <peer_mpi.h>

#include <math.h>
#include <stdio.h>
#include <string.h>

static int check(peer_status st, const char *what, int rank) {
  if (st)
    fprintf(stderr, "consumer_mpi: rank %d: %s: %s: %s\n", rank, what, peer_status_string(st),
            peer_last_error());
  return st != PEER_OK;
}

int main(int argc, char **argv) {
  MPI_Init(&argc, &argv);
  int rank = 0, world = 1;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  MPI_Comm_size(MPI_COMM_WORLD, &world);
  enum { T = 5, MAXD = 8 * 64 };
  peer_config cfg;
  peer_config_default(&cfg);
  int bad = check(peer_config_parse(&cfg, "n_heads=2,d_key=8,n_subkeys=8,top_k=4"), "config", rank);
  cfg.d_model = 8 * world; /* divisible by the world size */
  peer_comm comm = {0};
  peer_shard *shard = NULL;
  peer_layer *layer = NULL;
  static float x[T * MAXD], ys[T * MAXD], yf[T * MAXD];
  int64_t is[T * 8], iff[T * 8];
  const int64_t d = cfg.d_model;
  bad = bad || world > 64 || check(peer_mpi_comm_create(&comm, MPI_COMM_WORLD), "comm", rank);
  if (!bad) {
    for (int64_t i = 0; i < T * d; i++)
      x[i] = (float)((i * 37) % 11) / 11.0f - 0.5f;
    bad = check(peer_shard_create(&shard, &cfg, NULL, &comm), "shard_create", rank) ||
          check(peer_layer_create(&layer, &cfg, NULL), "layer_create", rank) ||
          check(peer_shard_init(shard, 1), "shard_init", rank) ||
          check(peer_layer_init(layer, 1), "layer_init", rank) ||
          check(peer_shard_forward(shard, T, x, ys, is, NULL), "shard_forward", rank) ||
          check(peer_forward(layer, T, x, yf, iff, NULL), "forward", rank);
  }
  double diff = 0, scale = 0;
  for (int64_t i = 0; i < T * d && !bad; i++) {
    diff = fmax(diff, fabs((double)ys[i] - yf[i]));
    scale = fmax(scale, fabs((double)yf[i]));
  }
  if (!bad && (memcmp(is, iff, sizeof is) != 0 || !(diff <= 1e-6 * scale) || !(scale > 0))) {
    fprintf(stderr, "consumer_mpi: rank %d: sharded forward differs (ids %s, |dy| %g of %g)\n",
            rank, memcmp(is, iff, sizeof is) ? "differ" : "agree", diff, scale);
    bad = 1;
  }
  peer_shard_free(shard);
  peer_layer_free(layer);
  if (comm.handle) peer_mpi_comm_free(&comm);
  int any = 0;
  MPI_Allreduce(&bad, &any, 1, MPI_INT, MPI_MAX, MPI_COMM_WORLD);
  if (rank == 0 && !any)
    printf("consumer_mpi: peer %s, %d ranks, sharded forward matches the unsharded one\n",
           peer_version_string(), world);
  MPI_Finalize();
  return any;
}
