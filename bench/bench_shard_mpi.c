/* bench_shard_mpi.c: the sharded layer (peer.h "sharding") over MPI at the
 * reference config: per-rank peak memory, tokens/s of the forward and of a
 * training step (forward_train + backward + optimizer step), and the bytes
 * each rank hands to the communicator per token.  A plain MPI program, not
 * Google Benchmark: every rank must run the same number of iterations.
 *
 *   mpirun --oversubscribe -np 2 build/bin/bench_shard_mpi --threads 1
 *   mpirun -np 1 build/bin/bench_shard_mpi --threads 2 [--unsharded]
 *
 * Options: --config K=V,... (default the reference: d=512, H=8, k=16,
 * d_key=256, n=1024), --tokens T (256), --reps R (15), --threads N (1),
 * --unsharded (world 1 only: time peer_forward and the unsharded training
 * step instead, for comparison).  The optimizer is sparse SGD on the expert
 * rows (no state), so peak memory shows the tables and the replicated part;
 * Adam adds 2 moments per table, lazily mapped (peer.h). */
#include "peer_mpi.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static int rank, world;

/* The communicator, wrapped to count what each rank hands it. */
typedef struct counted {
  peer_comm inner;
  double reduce_bytes, gather_bytes;
} counted;

static int count_reduce(void *h, float *data, int64_t count) {
  counted *c = h;
  c->reduce_bytes += (double)count * sizeof(float);
  return c->inner.allreduce_sum(c->inner.handle, data, count);
}

static int count_gather(void *h, const void *send, void *recv, size_t bytes) {
  counted *c = h;
  c->gather_bytes += (double)bytes;
  return c->inner.allgather(c->inner.handle, send, recv, bytes);
}

static double now(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static int cmp_double(const void *a, const void *b) {
  double x = *(const double *)a, y = *(const double *)b;
  return (x > y) - (x < y);
}

/* Peak resident memory of this process (VmHWM), bytes. */
static double peak_rss(void) {
  FILE *f = fopen("/proc/self/status", "r");
  char line[256];
  double kb = 0;
  while (f && fgets(line, sizeof line, f))
    if (strncmp(line, "VmHWM:", 6) == 0) kb = atof(line + 6);
  if (f) fclose(f);
  return kb * 1024.0;
}

static void check(peer_status st, const char *what) {
  if (st == PEER_OK) return;
  fprintf(stderr, "rank %d: %s: %s: %s\n", rank, what, peer_status_string(st), peer_last_error());
  MPI_Abort(MPI_COMM_WORLD, 1);
}

/* Median over ranks' slowest: each rep is timed between barriers. */
static double median_seconds(double *t, int n) {
  qsort(t, (size_t)n, sizeof *t, cmp_double);
  return t[n / 2];
}

int main(int argc, char **argv) {
  MPI_Init(&argc, &argv);
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  MPI_Comm_size(MPI_COMM_WORLD, &world);
  const char *config = "";
  int64_t T = 256;
  int reps = 15, threads = 1, unsharded = 0;
  for (int i = 1; i < argc; i++) {
    if (!strcmp(argv[i], "--config") && i + 1 < argc)
      config = argv[++i];
    else if (!strcmp(argv[i], "--tokens") && i + 1 < argc)
      T = atoll(argv[++i]);
    else if (!strcmp(argv[i], "--reps") && i + 1 < argc)
      reps = atoi(argv[++i]);
    else if (!strcmp(argv[i], "--threads") && i + 1 < argc)
      threads = atoi(argv[++i]);
    else if (!strcmp(argv[i], "--unsharded"))
      unsharded = 1;
    else {
      if (rank == 0) fprintf(stderr, "bench_shard_mpi: unknown option %s\n", argv[i]);
      MPI_Finalize();
      return 2;
    }
  }
  if (unsharded && world != 1) {
    if (rank == 0) fprintf(stderr, "bench_shard_mpi: --unsharded needs one rank\n");
    MPI_Finalize();
    return 2;
  }
  if (reps < 1) reps = 1;
  peer_config c;
  peer_config_default(&c);
  check(peer_config_parse(&c, config), "config");
  peer_options o;
  peer_options_default(&o);
  o.n_threads = threads;

  counted cc = {0};
  check(peer_mpi_comm_create(&cc.inner, MPI_COMM_WORLD), "mpi_comm_create");
  peer_comm comm = {&cc, cc.inner.rank, cc.inner.world, count_reduce, count_gather};
  peer_shard *S = NULL;
  peer_layer *L = NULL;
  double t0 = now();
  if (unsharded) {
    check(peer_layer_create(&L, &c, &o), "layer_create");
    check(peer_layer_init(L, 1), "layer_init");
  } else {
    check(peer_shard_create(&S, &c, &o, &comm), "shard_create");
    check(peer_shard_init(S, 1), "shard_init");
  }
  double t_init = now() - t0;

  const int64_t d = c.d_model, hk = c.n_heads * c.top_k;
  float *x = malloc((size_t)(T * d) * 4), *y = malloc((size_t)(T * d) * 4);
  float *dy = malloc((size_t)(T * d) * 4), *dx = malloc((size_t)(T * d) * 4);
  uint64_t s = 12345;
  for (int64_t i = 0; i < T * d; i++) {
    s ^= s << 13, s ^= s >> 7, s ^= s << 17;
    x[i] = (float)((double)(s >> 11) / 9007199254740992.0 * 2.0 - 1.0);
    dy[i] = 0.01f * x[i];
  }
  double *tf = malloc((size_t)reps * sizeof *tf), *tt = malloc((size_t)reps * sizeof *tt);

  /* forward (the counters start here: creation's agreement is not traffic) */
  cc.reduce_bytes = cc.gather_bytes = 0;
  for (int r = -2; r < reps; r++) {
    MPI_Barrier(MPI_COMM_WORLD);
    double a = now();
    check(unsharded ? peer_forward(L, T, x, y, NULL, NULL)
                    : peer_shard_forward(S, T, x, y, NULL, NULL),
          "forward");
    double e = now() - a, m;
    MPI_Allreduce(&e, &m, 1, MPI_DOUBLE, MPI_MAX, MPI_COMM_WORLD);
    if (r >= 0) tf[r] = m;
  }
  double fwd_reduce = cc.reduce_bytes, fwd_gather = cc.gather_bytes;
  int fwd_calls = reps + 2;

  /* training step: sparse SGD on the expert rows, SGD on the dense ones */
  peer_optim_config oc = peer_optim_config_default();
  oc.kind = PEER_OPTIM_SGD;
  oc.expert_kind = PEER_OPTIM_SGD;
  oc.lr = 1e-3f;
  peer_context *ctx = NULL;
  peer_optimizer *opt = NULL;
  peer_shard_optimizer *sopt = NULL;
  int64_t dq = c.n_heads * c.d_key, G = c.shared_keys ? 1 : c.n_heads, cols = d / world;
  peer_grads g = {0};
  g.query_weight = calloc((size_t)(dq * d), 4);
  g.keys = calloc((size_t)(G * c.n_subkeys * c.d_key), 4);
  g.expert_capacity = T * hk;
  g.expert_rows = calloc((size_t)(T * hk), 8);
  g.experts_down = calloc((size_t)(T * hk * cols), 4);
  g.experts_up = calloc((size_t)(T * hk * cols), 4);
  if (unsharded) {
    check(peer_context_create(&ctx, L, T), "context");
    check(peer_optimizer_create(&opt, L, &oc), "optimizer");
  } else {
    check(peer_shard_context_create(&ctx, S, T), "context");
    check(peer_shard_optimizer_create(&sopt, S, &oc), "optimizer");
  }
  double r0 = cc.reduce_bytes, g0 = cc.gather_bytes;
  for (int r = -2; r < reps; r++) {
    MPI_Barrier(MPI_COMM_WORLD);
    double a = now();
    if (unsharded) {
      check(peer_forward_train(L, ctx, T, x, y), "forward_train");
      check(peer_backward(L, ctx, dy, dx, &g), "backward");
      check(peer_optimizer_step(opt, &g), "step");
    } else {
      check(peer_shard_forward_train(S, ctx, T, x, y), "forward_train");
      check(peer_shard_backward(S, ctx, dy, dx, &g), "backward");
      check(peer_shard_optimizer_step(sopt, &g), "step");
    }
    double e = now() - a, m;
    MPI_Allreduce(&e, &m, 1, MPI_DOUBLE, MPI_MAX, MPI_COMM_WORLD);
    if (r >= 0) tt[r] = m;
  }
  double train_reduce = cc.reduce_bytes - r0, train_gather = cc.gather_bytes - g0;

  double rss = peak_rss(), rss_all[256];
  MPI_Gather(&rss, 1, MPI_DOUBLE, rss_all, 1, MPI_DOUBLE, 0, MPI_COMM_WORLD);
  double tfm = median_seconds(tf, reps), ttm = median_seconds(tt, reps);
  if (rank == 0) {
    char text[1024];
    peer_config_format(&c, text, sizeof text);
    double maxrss = 0;
    for (int r = 0; r < world && r < 256; r++)
      maxrss = rss_all[r] > maxrss ? rss_all[r] : maxrss;
    double tok_calls = (double)T * fwd_calls, tok_train = (double)T * (reps + 2);
    printf("config: %s\n", text);
    printf("%s, P=%d ranks x %d threads, T=%lld tokens, %d reps (median of the slowest rank)\n",
           unsharded ? "unsharded layer" : "sharded", world, threads, (long long)T, reps);
    printf("  init %.2f s\n", t_init);
    printf("  forward:       %9.0f tokens/s  (%.3f ms per batch)\n", (double)T / tfm, 1e3 * tfm);
    printf("  training step: %9.0f tokens/s  (%.3f ms per batch)\n", (double)T / ttm, 1e3 * ttm);
    printf("  peak RSS per rank: max %.0f MiB (", maxrss / 1048576.0);
    for (int r = 0; r < world && r < 256; r++)
      printf("%s%.0f", r ? ", " : "", rss_all[r] / 1048576.0);
    printf(" MiB)\n");
    printf("  handed to the communicator per token and rank: forward %.0f B all-reduced + %.0f B "
           "all-gathered; training step %.0f B + %.0f B\n",
           fwd_reduce / tok_calls, fwd_gather / tok_calls, train_reduce / tok_train,
           train_gather / tok_train);
  }
  free(tf), free(tt), free(x), free(y), free(dy), free(dx);
  free(g.query_weight), free(g.keys), free(g.expert_rows), free(g.experts_down), free(g.experts_up);
  peer_context_free(ctx);
  peer_optimizer_free(opt);
  peer_shard_optimizer_free(sopt);
  peer_layer_free(L);
  peer_shard_free(S);
  peer_mpi_comm_free(&cc.inner);
  MPI_Finalize();
  return 0;
}
