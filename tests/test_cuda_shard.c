/* test_cuda_shard.c: the CUDA sharded layer (peer_cuda.h "sharding") without
 * NCCL: P threads of one process play the ranks, all on device 0, each with
 * its own stream, over a device communicator written here on
 * tests/thread_comm.h's (each rank's device data copied to the host on its
 * stream, summed in rank order so every rank gets the same bits, or
 * gathered, and copied back).  For world
 * sizes 1, 2 and 4 every rank's forward is checked against the unsharded
 * CUDA layer and the unsharded CPU layer on the same weights
 * (peer_layer_init with one seed everywhere): ids identical to the CUDA
 * layer's (the same retrieval), y within 1e-5 relative of it (the dots are
 * summed in another order) and, on tokens where the CPU chose the same ids,
 * within 2e-4 (test_cuda's) of the CPU's; y and ids the same bits on every
 * rank; the expert tables' columns equal to the unsharded layer's.  f32 and
 * bf16 tables.  Also the refusals at creation (d_model not divisible,
 * configs that differ between ranks, a CPU backend) on every rank alike,
 * argument errors, and a non-finite x reported by peer_cuda_shard_check.
 *
 * Runs on a GPU and in the emulated build (PEER_CUDA=EMU), where it is part
 * of tools/test.  Without a CUDA build, or without a device, it exits 77
 * (ctest: skipped). */
#include "peer.h"

#include <stdio.h>

#ifndef PEER_USE_CUDA
int main(void) {
  fprintf(stderr, "test_cuda_shard: skipped: this build has no CUDA backend (PEER_CUDA=OFF)\n");
  return 77;
}
#else

#include "cuda_shard_ref.h"
#include "cuda_test_util.h"
#include "peer_cuda.h"
#include "thread_comm.h"

#include <criterion/criterion.h>
#include <cuda_runtime_api.h>
#include <stdlib.h>
#include <string.h>

#define MAXW 4

/* ------------------------------------------------------- the communicator */

static int to_host(void *dst, const void *d_src, size_t bytes, cudaStream_t s) {
  return cudaMemcpyAsync(dst, d_src, bytes, cudaMemcpyDeviceToHost, s) != cudaSuccess ||
         cudaStreamSynchronize(s) != cudaSuccess;
}

static int to_device(void *d_dst, const void *src, size_t bytes, cudaStream_t s) {
  return cudaMemcpyAsync(d_dst, src, bytes, cudaMemcpyHostToDevice, s) != cudaSuccess ||
         cudaStreamSynchronize(s) != cudaSuccess;
}

/* The device data through a host copy and the threads' group. */
static int sum(void *h, float *d_data, int64_t count, cudaStream_t s) {
  member *m = h;
  float *mine = malloc((size_t)count * sizeof *mine + 1);
  int rc = to_host(mine, d_data, (size_t)count * sizeof *mine, s);
  group_sum(m, mine, count);
  rc |= to_device(d_data, mine, (size_t)count * sizeof *mine, s);
  free(mine);
  return rc || m->fail;
}

static int gather(void *h, const void *d_send, void *d_recv, size_t bytes, cudaStream_t s) {
  member *m = h;
  const size_t all = bytes * (size_t)m->g->world;
  void *mine = malloc(bytes + 1), *every = malloc(all + 1);
  int rc = to_host(mine, d_send, bytes, s);
  group_gather(m, mine, every, bytes);
  rc |= to_device(d_recv, every, all, s);
  free(mine), free(every);
  return rc || m->fail;
}

/* ------------------------------------------------------------ one rank */

typedef struct job {
  member m;
  const shard_ref *R;
  const char *config; /* this rank's config (refusal cases: differs) */
  int backend;
  const char *want_text; /* what a refusal's message must say */
  peer_status created; /* what peer_cuda_shard_create returned */
  float *y;             /* this rank's gathered y, for the cross-rank check */
  int64_t *ids;
  atomic_int *failures;
  char first[512];
} job;

static void forward_checks(job *j, peer_cuda_shard *S, cudaStream_t s) {
  const shard_ref *R = j->R;
  const int64_t T = R->T, d = R->cfg.d_model, hk = R->cfg.n_heads * R->cfg.top_k;
  const int r = j->m.rank;
  if (ref_columns_differ(S, "experts.down", R->down, R) ||
      ref_columns_differ(S, "experts.up", R->up, R))
    FAILED(j, "rank %d: the expert tables are not the unsharded layer's columns", r);
  float *dx = NULL, *dy = NULL, *dg = NULL;
  int64_t *di = NULL;
  cudaMalloc((void **)&dx, (size_t)(T * d) * 4), cudaMalloc((void **)&dy, (size_t)(T * d) * 4);
  cudaMalloc((void **)&dg, (size_t)(T * hk) * 4), cudaMalloc((void **)&di, (size_t)(T * hk) * 8);
  float *g = malloc((size_t)(T * hk) * 4);
  cudaMemcpy(dx, R->x, (size_t)(T * d) * 4, cudaMemcpyHostToDevice);
  /* twice: the second call reuses the scratch the first grew */
  for (int rep = 0; rep < 2; rep++) {
    cudaMemsetAsync(dy, 0xff, (size_t)(T * d) * 4, s);
    if (peer_cuda_shard_forward(S, T, dx, dy, di, dg, s) || peer_cuda_shard_check(S, s)) {
      FAILED(j, "rank %d: forward: %s", r, peer_last_error());
      break;
    }
  }
  cudaMemcpy(j->y, dy, (size_t)(T * d) * 4, cudaMemcpyDeviceToHost);
  cudaMemcpy(j->ids, di, (size_t)(T * hk) * 8, cudaMemcpyDeviceToHost);
  cudaMemcpy(g, dg, (size_t)(T * hk) * 4, cudaMemcpyDeviceToHost);
  char err[256];
  if (ref_check_forward(R, j->y, j->ids, g, err, sizeof err)) FAILED(j, "rank %d: %s", r, err);
  free(g);
  cudaFree(dx), cudaFree(dy), cudaFree(dg), cudaFree(di);
}

static void *rank_main(void *arg) {
  job *j = arg;
  peer_cuda_comm comm = {&j->m, j->m.rank, j->m.g->world, sum, gather};
  peer_config c;
  peer_config_default(&c);
  peer_config_parse(&c, j->config);
  peer_options o;
  peer_options_default(&o);
  o.backend = j->backend;
  peer_cuda_shard *S = NULL;
  j->created = peer_cuda_shard_create(&S, &c, &o, &comm);
  if (j->created || !S) {
    if (S) FAILED(j, "rank %d: a failed creation returned a shard", j->m.rank);
    if (j->created && j->want_text && !strstr(peer_last_error(), j->want_text))
      FAILED(j, "rank %d: the refusal does not say \"%s\": %s", j->m.rank, j->want_text,
             peer_last_error());
    return NULL;
  }
  cudaStream_t s;
  cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking);
  if (peer_cuda_shard_init(S, 7)) FAILED(j, "rank %d: init: %s", j->m.rank, peer_last_error());
  else if (j->R) forward_checks(j, S, s);
  cudaStreamSynchronize(s);
  cudaStreamDestroy(s);
  peer_cuda_shard_free(S);
  return NULL;
}

/* Run every rank of `world` on its thread; the number of failed checks.
 * configs[r] is rank r's config. */
static int run_group(int world, const shard_ref *R, const char *const *configs, int backend,
                     const char *want_text, peer_status *created, char *first, size_t n) {
  group g = {.world = world};
  pthread_barrier_init(&g.bar, NULL, (unsigned)world);
  atomic_int failures = 0;
  job jobs[MAXW];
  pthread_t th[MAXW];
  const size_t yb = R ? (size_t)(R->T * R->cfg.d_model) * 4 : 0;
  const size_t ib = R ? (size_t)(R->T * R->cfg.n_heads * R->cfg.top_k) * 8 : 0;
  for (int r = 0; r < world; r++) {
    jobs[r] = (job){.m = {&g, r, 0},
                    .R = R,
                    .config = configs[r],
                    .backend = backend,
                    .want_text = want_text,
                    .y = malloc(yb + 1),
                    .ids = malloc(ib + 1),
                    .failures = &failures};
    pthread_create(&th[r], NULL, rank_main, &jobs[r]);
  }
  first[0] = '\0';
  for (int r = 0; r < world; r++) {
    pthread_join(th[r], NULL);
    if (!first[0] && jobs[r].first[0]) snprintf(first, n, "%.500s", jobs[r].first);
    created[r] = jobs[r].created;
  }
  int bad = atomic_load(&failures);
  for (int r = 1; R && r < world && !jobs[0].created; r++)
    if (memcmp(jobs[r].y, jobs[0].y, yb) || memcmp(jobs[r].ids, jobs[0].ids, ib)) {
      if (!first[0]) snprintf(first, n, "rank %d's y or ids are not rank 0's bits", r);
      bad++;
    }
  for (int r = 0; r < world; r++) free(jobs[r].y), free(jobs[r].ids);
  pthread_barrier_destroy(&g.bar);
  return bad;
}

static const char *const configs[] = {
    "d_model=48,n_heads=2,d_key=16,n_subkeys=16,top_k=4",
    "d_model=48,n_heads=3,d_key=8,n_subkeys=12,top_k=5,query_norm=batchnorm,gate=sigmoid,"
    "activation=silu,query_bias=1",
    "d_model=48,n_heads=2,d_key=16,n_subkeys=16,top_k=4,weight_dtype=bf16,gate=relu,"
    "activation=relu,shared_keys=1",
    "d_model=36,n_heads=2,d_key=8,n_subkeys=10,top_k=3,subkey_top_k=6,weight_dtype=bf16,"
    "activation=gelu_tanh",
};

static void check_forward(int world) {
  for (size_t i = 0; i < sizeof configs / sizeof configs[0]; i++) {
    shard_ref R;
    char err[512];
    cr_assert_eq(ref_make(&R, configs[i], 13, 7, err, sizeof err), 0, "%s", err);
    const char *per_rank[MAXW] = {configs[i], configs[i], configs[i], configs[i]};
    peer_status created[MAXW];
    char first[512];
    int bad = run_group(world, &R, per_rank, PEER_BACKEND_CUDA, NULL, created, first, sizeof first);
    for (int r = 0; r < world; r++)
      cr_assert_eq(created[r], PEER_OK, "%s, world %d, rank %d: create: %s", configs[i], world, r,
                   first);
    cr_assert_eq(bad, 0, "%s, world %d: %s", configs[i], world, first);
    ref_free(&R);
  }
}

Test(cuda_shard, forward_one_rank) { check_forward(1); }
Test(cuda_shard, forward_two_ranks) { check_forward(2); }
Test(cuda_shard, forward_four_ranks) { check_forward(4); }

/* Every rank refuses alike, with `want`. */
static void check_refused(int world, const char *const *per_rank, int backend, peer_status want,
                          const char *text, const char *what) {
  peer_status created[MAXW];
  char first[512];
  int bad = run_group(world, NULL, per_rank, backend, text, created, first, sizeof first);
  cr_assert_eq(bad, 0, "%s: %s", what, first);
  for (int r = 0; r < world; r++)
    cr_assert_eq(created[r], want, "%s: rank %d got %s", what, r, peer_status_string(created[r]));
}

Test(cuda_shard, refusals) {
  const char *ok = configs[0];
  const char *odd = "d_model=50,n_heads=2,d_key=16,n_subkeys=16,top_k=4";
  const char *other = "d_model=48,n_heads=2,d_key=16,n_subkeys=16,top_k=3";
  const char *div4[MAXW] = {odd, odd, odd, odd};
  check_refused(4, div4, PEER_BACKEND_CUDA, PEER_ERR_CONFIG, "not divisible by the world size 4",
                "d_model 50 over 4 ranks");
  const char *mixed[MAXW] = {ok, other};
  check_refused(2, mixed, PEER_BACKEND_CUDA, PEER_ERR_CONFIG, "rank 1's config differs",
                "configs differ");
  const char *mixed_last[MAXW] = {ok, ok, ok, other};
  check_refused(4, mixed_last, PEER_BACKEND_CUDA, PEER_ERR_CONFIG, "rank 3's config differs",
                "the last rank's config");
  const char *same[MAXW] = {ok, ok};
  check_refused(2, same, PEER_BACKEND_CPU, PEER_ERR_INVALID_ARGUMENT, "PEER_BACKEND_CUDA",
                "a CPU backend");
}

Test(cuda_shard, argument_errors_and_nonfinite_x) {
  group g = {.world = 1};
  pthread_barrier_init(&g.bar, NULL, 1);
  member m = {&g, 0, 0};
  peer_cuda_comm comm = {&m, 0, 1, sum, gather}, bad_rank = comm, no_fn = comm;
  bad_rank.rank = 1;
  no_fn.allgather = NULL;
  peer_config c;
  peer_config_default(&c);
  cr_assert_eq(peer_config_parse(&c, configs[0]), PEER_OK);
  peer_options o;
  peer_options_default(&o);
  o.backend = PEER_BACKEND_CUDA;
  peer_cuda_shard *S = NULL;
  cr_assert_eq(peer_cuda_shard_create(&S, &c, &o, &bad_rank), PEER_ERR_INVALID_ARGUMENT);
  cr_assert_eq(peer_cuda_shard_create(&S, &c, &o, &no_fn), PEER_ERR_INVALID_ARGUMENT);
  cr_assert(S == NULL);
  o.device = 99;
  cr_assert_eq(peer_cuda_shard_create(&S, &c, &o, &comm), PEER_ERR_NO_DEVICE);
  o.device = 0;
  cr_assert_eq(peer_cuda_shard_create(&S, &c, &o, &comm), PEER_OK, "%s", peer_last_error());
  cr_assert_eq(peer_cuda_shard_init(S, 3), PEER_OK);
  const int64_t T = 4, d = c.d_model;
  float *dx = NULL, *dy = NULL, *x = calloc((size_t)(T * d), 4);
  cudaMalloc((void **)&dx, (size_t)(T * d) * 4), cudaMalloc((void **)&dy, (size_t)(T * d) * 4);
  cr_assert_eq(peer_cuda_shard_forward(S, T, dx, NULL, NULL, NULL, 0), PEER_ERR_INVALID_ARGUMENT);
  cr_assert_eq(peer_cuda_shard_forward(S, T, NULL, dy, NULL, NULL, 0), PEER_ERR_INVALID_ARGUMENT);
  cr_assert_eq(peer_cuda_shard_forward(S, -1, dx, dy, NULL, NULL, 0), PEER_ERR_INVALID_ARGUMENT);
  cr_assert_eq(peer_cuda_shard_forward(S, 0, NULL, NULL, NULL, NULL, 0), PEER_OK);
  cr_assert_eq(peer_cuda_shard_forward(NULL, T, dx, dy, NULL, NULL, 0), PEER_ERR_INVALID_ARGUMENT);
  /* a communicator that fails: PEER_ERR_IO naming the all-reduce */
  m.fail = 1;
  cr_assert_eq(peer_cuda_shard_forward(S, T, dx, dy, NULL, NULL, 0), PEER_ERR_IO);
  cr_assert(strstr(peer_last_error(), "all-reduce"), "%s", peer_last_error());
  m.fail = 0;
  x[2 * d + 5] = NAN;
  cudaMemcpy(dx, x, (size_t)(T * d) * 4, cudaMemcpyHostToDevice);
  cr_assert_eq(peer_cuda_shard_forward(S, T, dx, dy, NULL, NULL, 0), PEER_OK);
  cr_assert_eq(peer_cuda_shard_check(S, 0), PEER_ERR_NONFINITE);
  cr_assert(strstr(peer_last_error(), "token 2"), "%s", peer_last_error());
  cr_assert_eq(peer_cuda_shard_check(S, 0), PEER_OK); /* the record was cleared */
  cudaFree(dx), cudaFree(dy), free(x);
  peer_cuda_shard_free(S);
  peer_cuda_shard_free(NULL);
  pthread_barrier_destroy(&g.bar);
}

int main(int argc, char *argv[]) {
  if (!device_usable()) {
    fprintf(stderr, "test_cuda_shard: skipped: no CUDA device\n");
    return 77;
  }
  struct criterion_test_set *tests = criterion_initialize();
  int result = 0;
  if (criterion_handle_args(argc, argv, true)) result = !criterion_run_all_tests(tests);
  criterion_finalize(tests);
  return result;
}
#endif
