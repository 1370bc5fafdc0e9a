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
 * Training (cuda_shard_ref.h's ref_train_rank, on 1, 2 and 4 ranks, three
 * configs): y, dx and every gradient against an unsharded CUDA layer within
 * 1e-6 relative, parameters and optimizer state bit for bit after SGD,
 * Adam and sparse Adam steps, merged shard files equal to the unsharded
 * checkpoint, load and load_full; the training refusals and the busy flag;
 * and (emulated build) a steady training loop without device
 * synchronisation or allocation.
 *
 * Runs on a GPU and in the emulated build (PEER_CUDA=EMU), where it is part
 * of tools/test.  Without a CUDA build, or without a device, it exits 77
 * (ctest: skipped). */
#define _GNU_SOURCE
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
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>

#include "tempdir.h"

#ifdef PEER_CUDA_EMULATED
#include <peer_emu.h>
#endif

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

/* ------------------------------------------------------------ training */

/* Every rank of `world` runs cuda_shard_ref.h's ref_train_rank (training
 * next to an unsharded CUDA layer, files), then the merged files are
 * checked. */
typedef struct tjob {
  member m;
  const ref_train_case *tc;
  int failures;
  char first[512];
} tjob;

static void *train_main(void *arg) {
  tjob *j = arg;
  peer_cuda_comm comm = {&j->m, j->m.rank, j->m.g->world, sum, gather};
  j->failures = ref_train_rank(&comm, 0, j->tc, test_dir, j->first, sizeof j->first);
  return NULL;
}

static void check_training(int world, const ref_train_case *tc) {
  group g = {.world = world};
  pthread_barrier_init(&g.bar, NULL, (unsigned)world);
  tjob jobs[MAXW];
  pthread_t th[MAXW];
  for (int r = 0; r < world; r++) {
    jobs[r] = (tjob){.m = {&g, r, 0}, .tc = tc};
    pthread_create(&th[r], NULL, train_main, &jobs[r]);
  }
  int failures = 0;
  char first[512] = "";
  for (int r = 0; r < world; r++) {
    pthread_join(th[r], NULL);
    failures += jobs[r].failures;
    if (!first[0] && jobs[r].first[0]) snprintf(first, sizeof first, "%s", jobs[r].first);
  }
  pthread_barrier_destroy(&g.bar);
  cr_assert_eq(failures, 0, "%s, world %d: %s", tc->config, world, first);
  char err[512];
  cr_assert_eq(ref_check_merged(test_dir, world, err, sizeof err), 0, "%s", err);
}

static const ref_train_case train_cases[] = {
    {"d_model=48,n_heads=3,d_key=8,n_subkeys=12,top_k=5,query_norm=batchnorm,gate=sigmoid,"
     "activation=silu,query_bias=1",
     PEER_OPTIM_ADAM, PEER_OPTIM_ADAM, 0},
    {"d_model=48,n_heads=2,d_key=16,n_subkeys=16,top_k=4", PEER_OPTIM_SGD, PEER_OPTIM_SGD, 1},
    {"d_model=36,n_heads=2,d_key=8,n_subkeys=10,top_k=3,subkey_top_k=6,weight_dtype=bf16,"
     "gate=relu,activation=gelu_tanh,shared_keys=1",
     PEER_OPTIM_SGD, PEER_OPTIM_ADAM, 0},
};

static void make_dir(void) { test_dir_make("cuda_shard"); }

static void train_all(int world) {
  for (size_t i = 0; i < sizeof train_cases / sizeof train_cases[0]; i++)
    if (train_cases[i].config && (36 % world == 0 || !strstr(train_cases[i].config, "d_model=36")))
      check_training(world, &train_cases[i]);
}

/* The timeout turns ranks left waiting in the communicator (a defect that
 * skips a collective on one rank) into a failure. */
#define TRAIN_TEST(name, world)                                                                    \
  Test(cuda_shard, name, .init = make_dir, .fini = test_dir_remove, .timeout = 600.0) {            \
    train_all(world);                                                                              \
  }
TRAIN_TEST(training_one_rank, 1)
TRAIN_TEST(training_two_ranks, 2)
TRAIN_TEST(training_four_ranks, 4)

/* A one-rank shard whose all-reduce can be held (gate): while another
 * thread is inside a collective call, every call on the shard is refused
 * with PEER_ERR_BUSY. */
typedef struct gate {
  member m;
  int hold;                   /* 1: the next all-reduce waits at `bar` twice */
  pthread_barrier_t bar;      /* the caller and the held thread */
} gate;

static int gate_sum(void *h, float *d_data, int64_t count, cudaStream_t s) {
  gate *g = h;
  if (g->hold) {
    g->hold = 0;
    pthread_barrier_wait(&g->bar); /* inside the call */
    pthread_barrier_wait(&g->bar); /* the other thread has tried */
  }
  return sum(&g->m, d_data, count, s);
}

static int gate_gather(void *h, const void *d_send, void *d_recv, size_t bytes, cudaStream_t s) {
  return gather(&((gate *)h)->m, d_send, d_recv, bytes, s);
}

typedef struct held_call {
  peer_cuda_shard *S;
  peer_context *ctx;
  const float *x;
  float *y;
  peer_status st;
} held_call;

static void *forward_train_thread(void *arg) {
  held_call *c = arg;
  c->st = peer_cuda_shard_forward_train(c->S, c->ctx, 8, c->x, c->y, 0);
  return NULL;
}

Test(cuda_shard, training_refusals_and_busy, .init = make_dir, .fini = test_dir_remove) {
  group grp = {.world = 1};
  pthread_barrier_init(&grp.bar, NULL, 1);
  gate g = {.m = {&grp, 0, 0}};
  pthread_barrier_init(&g.bar, NULL, 2);
  peer_cuda_comm comm = {&g, 0, 1, gate_sum, gate_gather};
  peer_config c;
  peer_config_default(&c);
  cr_assert_eq(peer_config_parse(&c, train_cases[0].config), PEER_OK);
  peer_options o;
  peer_options_default(&o);
  o.backend = PEER_BACKEND_CUDA;
  peer_cuda_shard *S = NULL;
  cr_assert_eq(peer_cuda_shard_create(&S, &c, &o, &comm), PEER_OK, "%s", peer_last_error());
  cr_assert_eq(peer_cuda_shard_init(S, 5), PEER_OK, "%s", peer_last_error());
  const int64_t T = 8, d = c.d_model;
  peer_context *ctx = NULL;
  cr_assert_eq(peer_cuda_shard_context_create(NULL, S, T), PEER_ERR_INVALID_ARGUMENT);
  cr_assert_eq(peer_cuda_shard_context_create(&ctx, NULL, T), PEER_ERR_INVALID_ARGUMENT);
  cr_assert_eq(peer_cuda_shard_context_create(&ctx, S, T), PEER_OK, "%s", peer_last_error());
  float *x = calloc((size_t)(T * d), 4);
  uint64_t seed = 3;
  ref_fill(x, T * d, 1.0f, &seed);
  float *d_x = ref_dzalloc((size_t)(T * d) * 4), *d_y = ref_dzalloc((size_t)(T * d) * 4);
  float *d_dx = ref_dzalloc((size_t)(T * d) * 4);
  cudaMemcpy(d_x, x, (size_t)(T * d) * 4, cudaMemcpyHostToDevice);
  ref_grads gr = ref_grads_new(&c, T, d, 0);
  /* no forward yet; batches beyond the context; batch norm with one token */
  cr_assert_eq(peer_cuda_shard_backward(S, ctx, d_y, d_dx, &gr.g, gr.n_rows, 0), PEER_ERR_STATE,
               "%s", peer_last_error());
  cr_assert_eq(peer_cuda_shard_forward_train(S, ctx, T + 1, d_x, d_y, 0),
               PEER_ERR_INVALID_ARGUMENT);
  cr_assert_eq(peer_cuda_shard_forward_train(S, ctx, 1, d_x, d_y, 0), PEER_ERR_INVALID_ARGUMENT);
  cr_assert(strstr(peer_last_error(), "batch norm"), "%s", peer_last_error());
  cr_assert_eq(peer_cuda_shard_forward_train(NULL, ctx, T, d_x, d_y, 0), PEER_ERR_INVALID_ARGUMENT);
  /* the busy flag: a forward_train held inside its all-reduce */
  held_call hc = {S, ctx, d_x, d_y, PEER_ERR_STATE};
  g.hold = 1;
  pthread_t th;
  pthread_create(&th, NULL, forward_train_thread, &hc);
  pthread_barrier_wait(&g.bar);
  peer_status busy[4] = {
      peer_cuda_shard_backward(S, ctx, d_y, d_dx, &gr.g, gr.n_rows, 0),
      peer_cuda_shard_forward_train(S, ctx, T, d_x, d_y, 0),
      peer_cuda_shard_save(S, NULL, test_path("busy.safetensors")),
      peer_cuda_shard_context_create(&(peer_context *){NULL}, S, T),
  };
  pthread_barrier_wait(&g.bar);
  pthread_join(th, NULL);
  for (int i = 0; i < 4; i++) cr_assert_eq(busy[i], PEER_ERR_BUSY, "call %d: %s", i, peer_status_string(busy[i]));
  cr_assert_eq(hc.st, PEER_OK, "%s", peer_last_error());
  /* dx over dy or over the forward's x; too small an expert capacity:
   * refused, and the forward stays */
  cr_assert_eq(peer_cuda_shard_backward(S, ctx, d_y, d_y, &gr.g, gr.n_rows, 0),
               PEER_ERR_INVALID_ARGUMENT);
  cr_assert_eq(peer_cuda_shard_backward(S, ctx, d_y, d_x, &gr.g, gr.n_rows, 0),
               PEER_ERR_INVALID_ARGUMENT);
  gr.g.expert_capacity = T * c.n_heads * c.top_k - 1;
  cr_assert_eq(peer_cuda_shard_backward(S, ctx, d_y, d_dx, &gr.g, gr.n_rows, 0),
               PEER_ERR_INVALID_ARGUMENT);
  gr.g.expert_capacity += 1;
  cr_assert_eq(peer_cuda_shard_backward(S, ctx, d_y, d_dx, &gr.g, gr.n_rows, 0), PEER_OK, "%s",
               peer_last_error());
  cr_assert_eq(peer_cuda_shard_check(S, 0), PEER_OK, "%s", peer_last_error());
  cr_assert_eq(peer_cuda_shard_backward(S, ctx, d_y, d_dx, &gr.g, gr.n_rows, 0), PEER_ERR_STATE);
  /* a non-finite dy is recorded and reported by the check */
  x[3 * d + 1] = INFINITY;
  float *d_bad = ref_dzalloc((size_t)(T * d) * 4);
  cudaMemcpy(d_bad, x, (size_t)(T * d) * 4, cudaMemcpyHostToDevice);
  cr_assert_eq(peer_cuda_shard_forward_train(S, ctx, T, d_x, d_y, 0), PEER_OK, "%s", peer_last_error());
  cr_assert_eq(peer_cuda_shard_backward(S, ctx, d_bad, d_dx, &gr.g, gr.n_rows, 0), PEER_OK);
  cr_assert_eq(peer_cuda_shard_check(S, 0), PEER_ERR_NONFINITE);
  cr_assert(strstr(peer_last_error(), "token 3: dy"), "%s", peer_last_error());
  /* a shard file of another world size */
  peer_layer *F = NULL;
  cr_assert_eq(peer_layer_create(&F, &c, &o), PEER_OK, "%s", peer_last_error());
  cr_assert_eq(peer_layer_init(F, 5), PEER_OK);
  char full[512], parts[2][512];
  snprintf(full, sizeof full, "%s", test_path("full.safetensors"));
  snprintf(parts[0], sizeof parts[0], "%s", test_path("w-0-of-2.safetensors"));
  snprintf(parts[1], sizeof parts[1], "%s", test_path("w-1-of-2.safetensors"));
  const char *outs[2] = {parts[0], parts[1]};
  cr_assert_eq(peer_layer_save(F, full), PEER_OK, "%s", peer_last_error());
  cr_assert_eq(peer_shard_split(full, 2, outs), PEER_OK, "%s", peer_last_error());
  cr_assert_eq(peer_cuda_shard_load(S, NULL, parts[0]), PEER_ERR_FORMAT);
  cr_assert(strstr(peer_last_error(), "world size 2"), "%s", peer_last_error());
  cr_assert_eq(peer_cuda_shard_load_full(S, NULL, full), PEER_OK, "%s", peer_last_error());
  cr_assert_eq(ref_state_differs(S, NULL, F, NULL), NULL);
  peer_layer_free(F);
  ref_grads_free(&gr);
  cudaFree(d_x), cudaFree(d_y), cudaFree(d_dx), cudaFree(d_bad);
  free(x);
  peer_context_free(ctx);
  peer_cuda_shard_free(S);
  pthread_barrier_destroy(&g.bar);
  pthread_barrier_destroy(&grp.bar);
}

#ifdef PEER_CUDA_EMULATED
/* The hot loop of a sharded training step (forward_train, backward, a
 * device optimizer step) on 2 ranks: after one warm-up step, no
 * cudaDeviceSynchronize, cudaMalloc or cudaFree, and no stream
 * synchronisation but the test communicator's own (it stages through the
 * host, 2 per collective). */
static atomic_ullong comm_syncs;

static int counted_sum(void *h, float *d_data, int64_t count, cudaStream_t s) {
  atomic_fetch_add(&comm_syncs, 2);
  return sum(h, d_data, count, s);
}

static int counted_gather(void *h, const void *d_send, void *d_recv, size_t bytes,
                          cudaStream_t s) {
  atomic_fetch_add(&comm_syncs, 2);
  return gather(h, d_send, d_recv, bytes, s);
}

typedef struct steady_job {
  member m;
  pthread_barrier_t *start; /* all ranks warmed up: counting begins */
  peer_emu_counts *before;
  atomic_int *failures;
  char first[512];
} steady_job;

static void *steady_main(void *arg) {
  steady_job *j = arg;
  const int rank = j->m.rank;
  peer_cuda_comm comm = {&j->m, rank, j->m.g->world, counted_sum, counted_gather};
  peer_config c;
  peer_config_default(&c);
  peer_config_parse(&c, train_cases[0].config);
  peer_options o;
  peer_options_default(&o);
  o.backend = PEER_BACKEND_CUDA;
  peer_cuda_shard *S = NULL;
  peer_context *ctx = NULL;
  peer_optimizer *opt = NULL;
  const peer_optim_config oc = ref_train_optim(&train_cases[0]);
  const int64_t T = 16, d = c.d_model;
  if (peer_cuda_shard_create(&S, &c, &o, &comm) || peer_cuda_shard_init(S, 2) ||
      peer_cuda_shard_context_create(&ctx, S, T) || peer_cuda_shard_optimizer_create(&opt, S, &oc))
    FAILED(j, "rank %d: set-up: %s", rank, peer_last_error());
  int64_t c0, cols;
  peer_cuda_shard_columns(S, &c0, &cols);
  float *x = malloc((size_t)(T * d) * 4);
  uint64_t seed = 9;
  ref_fill(x, T * d, 1.0f, &seed);
  float *d_x = ref_dzalloc((size_t)(T * d) * 4), *d_y = ref_dzalloc((size_t)(T * d) * 4);
  float *d_dy = ref_dzalloc((size_t)(T * d) * 4), *d_dx = ref_dzalloc((size_t)(T * d) * 4);
  cudaMemcpy(d_x, x, (size_t)(T * d) * 4, cudaMemcpyHostToDevice);
  ref_fill(x, T * d, 0.1f, &seed);
  cudaMemcpy(d_dy, x, (size_t)(T * d) * 4, cudaMemcpyHostToDevice);
  ref_grads gr = ref_grads_new(&c, T, cols, 0);
  cudaStream_t s;
  cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking);
  cudaDeviceSynchronize();
  for (int pass = 0; pass < 2; pass++) {
    if (pass == 1) {
      pthread_barrier_wait(j->start);
      if (rank == 0) peer_emu_get_counts(j->before), atomic_store(&comm_syncs, 0);
      pthread_barrier_wait(j->start);
    }
    for (int i = 0; i < (pass ? 2 : 1); i++)
      for (int64_t tb = T; tb >= T / 2; tb -= T / 2)
        if (peer_cuda_shard_forward_train(S, ctx, tb, d_x, d_y, s) ||
            peer_cuda_shard_backward(S, ctx, d_dy, d_dx, &gr.g, gr.n_rows, s) ||
            peer_cuda_optimizer_step(opt, &gr.g, gr.n_rows, s))
          FAILED(j, "rank %d: step: %s", rank, peer_last_error());
  }
  pthread_barrier_wait(j->start); /* every rank's loop is done: the caller counts */
  pthread_barrier_wait(j->start);
  if (peer_cuda_shard_check(S, s)) FAILED(j, "rank %d: check: %s", rank, peer_last_error());
  cudaStreamSynchronize(s);
  cudaStreamDestroy(s);
  ref_grads_free(&gr);
  cudaFree(d_x), cudaFree(d_y), cudaFree(d_dy), cudaFree(d_dx);
  free(x);
  peer_optimizer_free(opt);
  peer_context_free(ctx);
  peer_cuda_shard_free(S);
  return NULL;
}

Test(cuda_shard, steady_training_loop_never_syncs_or_allocates) {
  const int world = 2;
  group g = {.world = world};
  pthread_barrier_init(&g.bar, NULL, (unsigned)world);
  pthread_barrier_t start;
  pthread_barrier_init(&start, NULL, (unsigned)world + 1);
  atomic_int failures = 0;
  peer_emu_counts before, after;
  steady_job jobs[2];
  pthread_t th[2];
  for (int r = 0; r < world; r++) {
    jobs[r] = (steady_job){.m = {&g, r, 0}, .start = &start, .before = &before, .failures = &failures};
    pthread_create(&th[r], NULL, steady_main, &jobs[r]);
  }
  pthread_barrier_wait(&start); /* warmed up */
  pthread_barrier_wait(&start); /* counting */
  pthread_barrier_wait(&start); /* loops done */
  peer_emu_get_counts(&after);
  const unsigned long long comm = atomic_load(&comm_syncs);
  pthread_barrier_wait(&start);
  for (int r = 0; r < world; r++) pthread_join(th[r], NULL);
  pthread_barrier_destroy(&start);
  pthread_barrier_destroy(&g.bar);
  cr_assert_eq(atomic_load(&failures), 0, "%s", jobs[0].first[0] ? jobs[0].first : jobs[1].first);
  cr_assert_eq(after.device_syncs - before.device_syncs, 0, "cudaDeviceSynchronize calls");
  cr_assert_eq(after.mallocs - before.mallocs, 0, "cudaMalloc calls");
  cr_assert_eq(after.frees - before.frees, 0, "cudaFree calls");
  cr_assert_eq(after.stream_syncs - before.stream_syncs, comm,
               "stream synchronisations besides the test communicator's %llu", comm);
  cr_assert_eq(after.blas_default_workspace - before.blas_default_workspace, 0,
               "cuBLAS products on cuBLAS's own workspace");
  cr_assert_gt(comm, 0, "the loop communicated");
  cr_assert_gt(after.launches - before.launches, 2 * 4 * 10, "the loop launched kernels");
}

/* A sharded forward whose scratch would have to grow while its stream is
 * being captured into a CUDA graph is refused with PEER_ERR_STATE before any
 * wait or allocation (the capture stays valid); after the capture it runs. */
Test(cuda_shard, scratch_does_not_grow_under_capture) {
  group g = {.world = 1};
  pthread_barrier_init(&g.bar, NULL, 1);
  member m = {&g, 0, 0};
  peer_cuda_comm comm = {&m, 0, 1, sum, gather};
  peer_config c;
  peer_config_default(&c);
  cr_assert_eq(peer_config_parse(&c, configs[0]), PEER_OK);
  peer_options o;
  peer_options_default(&o);
  o.backend = PEER_BACKEND_CUDA;
  peer_cuda_shard *S = NULL;
  cr_assert_eq(peer_cuda_shard_create(&S, &c, &o, &comm), PEER_OK, "%s", peer_last_error());
  cr_assert_eq(peer_cuda_shard_init(S, 5), PEER_OK);
  const int64_t small = 4, big = 12, d = c.d_model;
  float *x = malloc((size_t)(big * d) * 4);
  uint64_t seed = 6;
  ref_fill(x, big * d, 1.0f, &seed);
  float *d_x = ref_dzalloc((size_t)(big * d) * 4), *d_y = ref_dzalloc((size_t)(big * d) * 4);
  cudaMemcpy(d_x, x, (size_t)(big * d) * 4, cudaMemcpyHostToDevice);
  cudaStream_t s;
  cr_assert_eq(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking), cudaSuccess);
  cr_assert_eq(peer_cuda_shard_forward(S, small, d_x, d_y, NULL, NULL, s), PEER_OK, "%s",
               peer_last_error());
  cr_assert_eq(cudaStreamSynchronize(s), cudaSuccess);
  cr_assert_eq(peer_emu_set_capturing(s, 1), 0);
  peer_emu_counts before, after;
  peer_emu_get_counts(&before);
  cr_assert_eq(peer_cuda_shard_forward(S, big, d_x, d_y, NULL, NULL, s), PEER_ERR_STATE, "%s",
               peer_last_error());
  cr_assert(strstr(peer_last_error(), "captured into a CUDA graph"), "%s", peer_last_error());
  cr_assert_eq(peer_cuda_shard_forward(S, small, d_x, d_y, NULL, NULL, s), PEER_OK, "%s",
               peer_last_error());
  peer_emu_get_counts(&after);
  cr_assert_eq(after.mallocs - before.mallocs, 0, "cudaMalloc calls under capture");
  cr_assert_eq(after.device_syncs - before.device_syncs, 0, "device waits under capture");
  cr_assert_eq(peer_emu_set_capturing(s, 0), 0);
  cr_assert_eq(peer_cuda_shard_forward(S, big, d_x, d_y, NULL, NULL, s), PEER_OK, "%s",
               peer_last_error());
  cr_assert_eq(peer_cuda_shard_check(S, s), PEER_OK, "%s", peer_last_error());
  cudaStreamDestroy(s);
  cudaFree(d_x), cudaFree(d_y), free(x);
  peer_cuda_shard_free(S);
  pthread_barrier_destroy(&g.bar);
}
#endif

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
