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

/* Each rank trains its shard next to an unsharded CUDA layer of its own (the
 * same seed, batches and optimizer) and compares after every backward: y,
 * dx and the dense gradients (replicated) and the expert gradient rows (the
 * rank's columns; the same row list) within TRAIN_TOL relative.  Both are
 * then stepped with the unsharded layer's gradients (the shard with its
 * columns), as tests/test_shard.c does: the same rules on the same values,
 * so parameters and optimizer state stay the same bits on any world (the
 * optimizer on a slice is elementwise), which the test checks after every
 * step, and the next step's forward starts from equal weights.  At the end
 * every rank saves its shard file and the unsharded layer's checkpoint;
 * peer_shard_merge of the shard files must give the checkpoint's tensors bit
 * for bit.  A fresh shard then loads the checkpoint (load_full) and its own
 * shard file (load): equal bits again. */
#define TRAIN_TOL 1e-6
#define TRAIN_STEPS 3

typedef struct train_case {
  const char *config;
  peer_optim_kind kind, expert_kind;
  int dense_experts; /* expert gradients added into [N, d/P] buffers */
} train_case;

typedef struct tjob {
  member m;
  const train_case *tc;
  atomic_int *failures;
  char first[512];
} tjob;

static uint64_t next_rand(uint64_t *s) {
  *s ^= *s << 13, *s ^= *s >> 7, *s ^= *s << 17;
  return *s;
}

static void fill(float *p, int64_t n, float scale, uint64_t *s) {
  for (int64_t i = 0; i < n; i++)
    p[i] = scale * (float)((double)(next_rand(s) >> 11) / 9007199254740992.0 * 2.0 - 1.0);
}

/* max |a - b| / max |b| over rows of cols values (a's rows sa apart, b's sb
 * apart from column c0). */
static double rel(const float *a, int64_t sa, const float *b, int64_t sb, int64_t c0, int64_t rows,
                  int64_t cols) {
  double diff = 0, scale = 0;
  for (int64_t r = 0; r < rows; r++)
    for (int64_t j = 0; j < cols; j++) {
      double u = a[r * sa + j], v = b[r * sb + c0 + j];
      diff = fmax(diff, isnan(u - v) ? INFINITY : fabs(u - v));
      scale = fmax(scale, fabs(v));
    }
  return scale > 0 ? diff / scale : diff;
}

static void *dzalloc(size_t bytes) {
  void *p = NULL;
  if (cudaMalloc(&p, bytes + 4) != cudaSuccess) return NULL;
  cudaMemset(p, 0, bytes + 4);
  return p;
}

static float *host_f32(const void *d, size_t n) {
  float *h = malloc(n * 4 + 4);
  cudaMemcpy(h, d, n * 4, cudaMemcpyDeviceToHost);
  return h;
}

/* Gradient buffers on the device: dense ones in full, expert rows `width`
 * wide (sparse [T*hk, width] or dense [N, width]). */
typedef struct dgrads {
  peer_grads g;
  int64_t *n_rows;
} dgrads;

static dgrads dgrads_new(const peer_config *c, int64_t T, int64_t width, int dense) {
  const int64_t d = c->d_model, dq = c->n_heads * c->d_key, hk = c->n_heads * c->top_k;
  const int64_t nk = (c->shared_keys ? 1 : c->n_heads) * c->n_subkeys * c->d_key;
  const int64_t N = c->n_subkeys * c->n_subkeys, rows = dense ? N : T * hk;
  dgrads r = {0};
  r.g.query_weight = dzalloc((size_t)(dq * d) * 4);
  r.g.keys = dzalloc((size_t)nk * 4);
  if (c->query_bias) r.g.query_bias = dzalloc((size_t)dq * 4);
  if (c->query_norm == PEER_NORM_BATCHNORM)
    r.g.norm_weight = dzalloc((size_t)dq * 4), r.g.norm_bias = dzalloc((size_t)dq * 4);
  r.g.expert_capacity = T * hk;
  r.g.experts_dense = dense;
  r.g.expert_rows = dzalloc((size_t)(T * hk) * 8);
  r.g.experts_down = dzalloc((size_t)(rows * width) * 4);
  r.g.experts_up = dzalloc((size_t)(rows * width) * 4);
  r.n_rows = dzalloc(8);
  return r;
}

static void dgrads_free(dgrads *r) {
  cudaFree(r->g.query_weight), cudaFree(r->g.keys), cudaFree(r->g.query_bias);
  cudaFree(r->g.norm_weight), cudaFree(r->g.norm_bias), cudaFree(r->g.expert_rows);
  cudaFree(r->g.experts_down), cudaFree(r->g.experts_up), cudaFree(r->n_rows);
}

/* The shard's gradients (a) against the unsharded ones (b); the first
 * quantity that differs by more than TRAIN_TOL, or NULL. */
static const char *grads_differ(const peer_config *c, const dgrads *a, const dgrads *b, int64_t c0,
                                int64_t cols, double *err) {
  const int64_t d = c->d_model, dq = c->n_heads * c->d_key;
  const int64_t nk = (c->shared_keys ? 1 : c->n_heads) * c->n_subkeys * c->d_key;
  const int64_t N = c->n_subkeys * c->n_subkeys;
  struct {
    const char *name;
    const float *pa, *pb;
    int64_t n;
  } dense[] = {{"query_weight", a->g.query_weight, b->g.query_weight, dq * d},
               {"keys", a->g.keys, b->g.keys, nk},
               {"query_bias", a->g.query_bias, b->g.query_bias, dq},
               {"norm_weight", a->g.norm_weight, b->g.norm_weight, dq},
               {"norm_bias", a->g.norm_bias, b->g.norm_bias, dq}};
  /* With batch norm the query bias's gradient is zero but for rounding (the
   * batch mean takes the bias out): it is measured against the scale of the
   * query weight's, which the same dq makes. */
  double wq_scale = 0;
  for (size_t i = 0; i < sizeof dense / sizeof dense[0]; i++) {
    if (!dense[i].pa) continue;
    const size_t n = (size_t)dense[i].n;
    float *ha = host_f32(dense[i].pa, n), *hb = host_f32(dense[i].pb, n);
    double diff = 0, scale = i == 2 && c->query_norm == PEER_NORM_BATCHNORM ? wq_scale : 0;
    for (size_t k = 0; k < n; k++) {
      diff = fmax(diff, isnan(ha[k] - hb[k]) ? INFINITY : fabs((double)ha[k] - hb[k]));
      scale = fmax(scale, fabs(hb[k]));
    }
    if (i == 0) wq_scale = scale;
    *err = scale > 0 ? diff / scale : diff;
    free(ha), free(hb);
    if (!(*err <= TRAIN_TOL)) return dense[i].name;
  }
  int64_t na = -1, nb = -2;
  cudaMemcpy(&na, a->n_rows, 8, cudaMemcpyDeviceToHost);
  cudaMemcpy(&nb, b->n_rows, 8, cudaMemcpyDeviceToHost);
  *err = (double)(na - nb);
  if (na != nb || na <= 0) return "the expert row count";
  int64_t *ra = malloc((size_t)na * 8), *rb = malloc((size_t)na * 8);
  cudaMemcpy(ra, a->g.expert_rows, (size_t)na * 8, cudaMemcpyDeviceToHost);
  cudaMemcpy(rb, b->g.expert_rows, (size_t)na * 8, cudaMemcpyDeviceToHost);
  const char *bad = memcmp(ra, rb, (size_t)na * 8) ? "the expert rows" : NULL;
  const bool dn = a->g.experts_dense;
  const int64_t rows = dn ? N : na;
  const float *ta[2] = {a->g.experts_down, a->g.experts_up}, *tb[2] = {b->g.experts_down, b->g.experts_up};
  for (int i = 0; i < 2 && !bad; i++) {
    float *ha = host_f32(ta[i], (size_t)(rows * cols)), *hb = host_f32(tb[i], (size_t)(rows * d));
    *err = rel(ha, cols, hb, d, c0, rows, cols);
    free(ha), free(hb);
    if (!(*err <= TRAIN_TOL)) bad = i ? "experts_up" : "experts_down";
  }
  free(ra), free(rb);
  return bad;
}

/* Step the shard with the unsharded gradients b: dense ones as they are,
 * expert rows as this rank's columns (into a's buffers). */
static peer_status step_with(peer_optimizer *o, const peer_config *c, dgrads *a, const dgrads *b,
                             int64_t c0, int64_t cols, cudaStream_t s) {
  const int64_t d = c->d_model, N = c->n_subkeys * c->n_subkeys;
  int64_t n = 0;
  cudaMemcpy(&n, b->n_rows, 8, cudaMemcpyDeviceToHost);
  const int64_t rows = a->g.experts_dense ? N : n;
  cudaMemcpy(a->g.expert_rows, b->g.expert_rows, (size_t)n * 8, cudaMemcpyDeviceToDevice);
  cudaMemcpy(a->n_rows, b->n_rows, 8, cudaMemcpyDeviceToDevice);
  for (int64_t r = 0; r < rows; r++) {
    cudaMemcpy(a->g.experts_down + r * cols, b->g.experts_down + r * d + c0, (size_t)cols * 4,
               cudaMemcpyDeviceToDevice);
    cudaMemcpy(a->g.experts_up + r * cols, b->g.experts_up + r * d + c0, (size_t)cols * 4,
               cudaMemcpyDeviceToDevice);
  }
  peer_grads g = a->g;
  g.query_weight = b->g.query_weight, g.keys = b->g.keys, g.query_bias = b->g.query_bias;
  g.norm_weight = b->g.norm_weight, g.norm_bias = b->g.norm_bias;
  return peer_cuda_optimizer_step(o, &g, a->n_rows, s);
}

/* Every parameter (and, with oa, optimizer state) of the shard against the
 * unsharded layer's, bit for bit (the expert tables as the rank's columns);
 * the first that differs, or NULL. */
static const char *state_differs(peer_cuda_shard *S, peer_optimizer *oa, peer_layer *F,
                                 peer_optimizer *ob) {
  int64_t c0, cols;
  peer_cuda_shard_columns(S, &c0, &cols);
  for (int i = 0; i < peer_cuda_shard_n_params(S) + (oa ? peer_optimizer_n_states(ob) : 0); i++) {
    peer_tensor ta, tb;
    const bool param = i < peer_cuda_shard_n_params(S);
    if (param) {
      if (peer_cuda_shard_param(S, i, &ta) || peer_layer_param_by_name(F, ta.name, &tb))
        return "a parameter";
    } else if (peer_optimizer_state(ob, i - peer_cuda_shard_n_params(S), &tb) ||
               peer_optimizer_state_by_name(oa, tb.name, &ta)) {
      return "an optimizer state";
    }
    const bool sliced = strstr(ta.name, "experts.") != NULL;
    float *ha = ref_download_f32(&ta), *hb = ref_download_f32(&tb);
    const int64_t n = (int64_t)(tb.nbytes / peer_dtype_size(tb.dtype));
    bool same = ha && hb;
    for (int64_t r = 0; same && r < (sliced ? tb.shape[0] : 1); r++)
      same = sliced ? !memcmp(ha + r * cols, hb + r * tb.shape[1] + c0, (size_t)cols * 4)
                    : !memcmp(ha, hb, (size_t)n * 4);
    free(ha), free(hb);
    if (!same) return param ? ta.name : tb.name;
  }
  return NULL;
}

static peer_optim_config train_optim(const train_case *tc) {
  peer_optim_config oc = peer_optim_config_default();
  oc.kind = tc->kind, oc.expert_kind = tc->expert_kind;
  oc.lr = 0.05f, oc.expert_lr = 0.2f;
  if (tc->kind == PEER_OPTIM_SGD) oc.momentum = 0.9f;
  return oc;
}

static void *train_main(void *arg) {
  tjob *j = arg;
  const int rank = j->m.rank, world = j->m.g->world;
  peer_cuda_comm comm = {&j->m, rank, world, sum, gather};
  peer_config c;
  peer_config_default(&c);
  peer_config_parse(&c, j->tc->config);
  peer_options o;
  peer_options_default(&o);
  o.backend = PEER_BACKEND_CUDA;
  peer_cuda_shard *S = NULL;
  peer_layer *F = NULL;
  if (peer_cuda_shard_create(&S, &c, &o, &comm) || peer_layer_create(&F, &c, &o) ||
      peer_cuda_shard_init(S, 11) || peer_layer_init(F, 11)) {
    FAILED(j, "rank %d: create: %s", rank, peer_last_error());
    peer_cuda_shard_free(S), peer_layer_free(F);
    return NULL;
  }
  int64_t c0, cols;
  peer_cuda_shard_columns(S, &c0, &cols);
  const int64_t T = 17, d = c.d_model;
  const size_t xb = (size_t)(T * d) * 4;
  cudaStream_t s;
  cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking);
  float *x = malloc(xb), *dy = malloc(xb);
  float *d_x = dzalloc(xb), *d_dy = dzalloc(xb), *d_ya = dzalloc(xb), *d_yb = dzalloc(xb);
  float *d_dxa = dzalloc(xb), *d_dxb = dzalloc(xb);
  dgrads ga = dgrads_new(&c, T, cols, j->tc->dense_experts);
  dgrads gb = dgrads_new(&c, T, d, j->tc->dense_experts);
  peer_context *ca = NULL, *cb = NULL;
  peer_optimizer *oa = NULL, *ob = NULL;
  const peer_optim_config oc = train_optim(j->tc);
  if (peer_cuda_shard_context_create(&ca, S, T) || peer_context_create(&cb, F, T) ||
      peer_cuda_shard_optimizer_create(&oa, S, &oc) || peer_optimizer_create(&ob, F, &oc))
    FAILED(j, "rank %d: context or optimizer: %s", rank, peer_last_error());
  uint64_t seed = 0x9e3779b97f4a7c15ull;
  /* A failed check never leaves the loop early: the ranks' collectives
   * must stay in step (a rank that went on alone would wait forever). */
  for (int step = 0; step < TRAIN_STEPS; step++) {
    fill(x, T * d, 1.0f, &seed);
    fill(dy, T * d, 0.1f, &seed);
    cudaMemcpy(d_x, x, xb, cudaMemcpyHostToDevice);
    cudaMemcpy(d_dy, dy, xb, cudaMemcpyHostToDevice);
    if (peer_cuda_shard_forward_train(S, ca, T, d_x, d_ya, s) ||
        peer_cuda_forward_train(F, cb, T, d_x, d_yb, s) ||
        peer_cuda_shard_backward(S, ca, d_dy, d_dxa, &ga.g, ga.n_rows, s) ||
        peer_cuda_backward(F, cb, d_dy, d_dxb, &gb.g, gb.n_rows, s) ||
        peer_cuda_shard_check(S, s) || peer_cuda_check(F, s))
      FAILED(j, "rank %d, step %d: training call: %s", rank, step, peer_last_error());
    float *ya = host_f32(d_ya, (size_t)(T * d)), *yb = host_f32(d_yb, (size_t)(T * d));
    float *dxa = host_f32(d_dxa, (size_t)(T * d)), *dxb = host_f32(d_dxb, (size_t)(T * d));
    double ey = rel(ya, d, yb, d, 0, T, d), edx = rel(dxa, d, dxb, d, 0, T, d), eg = 0;
    free(ya), free(yb), free(dxa), free(dxb);
    const char *bad = grads_differ(&c, &ga, &gb, c0, cols, &eg);
    if (!(ey <= TRAIN_TOL) || !(edx <= TRAIN_TOL) || bad)
      FAILED(j, "rank %d of %d, step %d: y differs by %.3g, dx by %.3g; %s by %.3g", rank, world,
             step, ey, edx, bad ? bad : "gradients agree", eg);
    if (step_with(oa, &c, &ga, &gb, c0, cols, s) || peer_cuda_optimizer_step(ob, &gb.g, gb.n_rows, s) ||
        peer_cuda_shard_check(S, s) || peer_cuda_check(F, s))
      FAILED(j, "rank %d, step %d: optimizer: %s", rank, step, peer_last_error());
    else if ((bad = state_differs(S, oa, F, ob)))
      FAILED(j, "rank %d, step %d: after the optimizer step %s differs", rank, step, bad);
  }
  /* files: this rank's shard file and its unsharded twin's checkpoint */
  char mine[64], full[64];
  snprintf(mine, sizeof mine, "shard-%d-of-%d.safetensors", rank, world);
  snprintf(full, sizeof full, "full-%d-of-%d.safetensors", rank, world);
  char shard_path[512], full_path[512];
  snprintf(shard_path, sizeof shard_path, "%s", test_path(mine));
  snprintf(full_path, sizeof full_path, "%s", test_path(full));
  if (peer_cuda_shard_save(S, oa, shard_path) || peer_checkpoint_save(F, ob, full_path))
    FAILED(j, "rank %d: save: %s", rank, peer_last_error());
  /* a fresh shard of the same group: the unsharded checkpoint, then its own file */
  peer_cuda_shard *S2 = NULL;
  peer_optimizer *o2 = NULL;
  const char *bad = NULL;
  if (peer_cuda_shard_create(&S2, &c, &o, &comm) || peer_cuda_shard_optimizer_create(&o2, S2, &oc))
    FAILED(j, "rank %d: second shard: %s", rank, peer_last_error());
  else if (peer_cuda_shard_load_full(S2, o2, full_path))
    FAILED(j, "rank %d: load_full: %s", rank, peer_last_error());
  else if ((bad = state_differs(S2, o2, F, ob)) ||
           peer_optimizer_step_count(o2) != TRAIN_STEPS)
    FAILED(j, "rank %d: after load_full %s differs", rank, bad ? bad : "the step count");
  else if (peer_cuda_shard_init(S2, 99) || peer_cuda_shard_load(S2, o2, shard_path))
    FAILED(j, "rank %d: load: %s", rank, peer_last_error());
  else if ((bad = state_differs(S2, o2, F, ob)) || peer_optimizer_step_count(o2) != TRAIN_STEPS)
    FAILED(j, "rank %d: after load %s differs", rank, bad ? bad : "the step count");
  else if (peer_cuda_shard_load(S2, o2, full_path) != PEER_ERR_FORMAT ||
           !strstr(peer_last_error(), "not a shard file"))
    FAILED(j, "rank %d: loading an unsharded file as a shard file: %s", rank, peer_last_error());
  else if (peer_cuda_shard_load_full(S2, o2, shard_path) != PEER_ERR_FORMAT)
    FAILED(j, "rank %d: load_full of a shard file was not refused", rank);
  else if (peer_cuda_shard_save(S2, ob, shard_path) != PEER_ERR_INVALID_ARGUMENT)
    FAILED(j, "rank %d: another layer's optimizer was not refused", rank);
  peer_optimizer_free(o2);
  peer_cuda_shard_free(S2);
  cudaStreamSynchronize(s);
  cudaStreamDestroy(s);
  dgrads_free(&ga), dgrads_free(&gb);
  cudaFree(d_x), cudaFree(d_dy), cudaFree(d_ya), cudaFree(d_yb), cudaFree(d_dxa), cudaFree(d_dxb);
  free(x), free(dy);
  peer_context_free(ca), peer_context_free(cb);
  peer_optimizer_free(oa), peer_optimizer_free(ob);
  peer_layer_free(F);
  peer_cuda_shard_free(S);
  return NULL;
}

/* peer_shard_merge of the world shard files against rank 0's unsharded
 * checkpoint: the same tensors, bit for bit, and the same step. */
static void check_merged(int world) {
  const char *paths[MAXW];
  char names[MAXW][64], bufs[MAXW][512];
  for (int r = 0; r < world; r++) {
    snprintf(names[r], sizeof names[r], "shard-%d-of-%d.safetensors", r, world);
    snprintf(bufs[r], sizeof bufs[r], "%s", test_path(names[r]));
    paths[r] = bufs[r];
  }
  char merged[512], full[512];
  snprintf(merged, sizeof merged, "%s", test_path("merged.safetensors"));
  char fname[64];
  snprintf(fname, sizeof fname, "full-0-of-%d.safetensors", world);
  snprintf(full, sizeof full, "%s", test_path(fname));
  cr_assert_eq(peer_shard_merge(paths, world, merged), PEER_OK, "%s", peer_last_error());
  peer_safetensors *a = NULL, *b = NULL;
  cr_assert_eq(peer_safetensors_open(&a, merged), PEER_OK, "%s", peer_last_error());
  cr_assert_eq(peer_safetensors_open(&b, full), PEER_OK, "%s", peer_last_error());
  cr_assert_eq(peer_safetensors_count(a), peer_safetensors_count(b));
  int states = 0;
  for (int i = 0; i < peer_safetensors_count(b); i++) {
    peer_tensor tb, ta;
    cr_assert_eq(peer_safetensors_info(b, i, &tb), PEER_OK);
    states += !strncmp(tb.name, "optim.", 6);
    cr_assert_eq(peer_safetensors_find(a, tb.name, &ta), PEER_OK, "%s is not merged", tb.name);
    cr_assert(ta.nbytes == tb.nbytes && ta.dtype == tb.dtype && ta.shape[1] == tb.shape[1],
              "%s: layouts differ", tb.name);
    void *da = malloc(ta.nbytes + 1), *db = malloc(tb.nbytes + 1);
    cr_assert_eq(peer_safetensors_read(a, ta.name, da, ta.nbytes), PEER_OK);
    cr_assert_eq(peer_safetensors_read(b, tb.name, db, tb.nbytes), PEER_OK);
    cr_assert(!memcmp(da, db, ta.nbytes), "world %d: merged %s differs from the checkpoint's",
              world, tb.name);
    free(da), free(db);
  }
  cr_assert_gt(states, 0, "the checkpoint holds no optimizer state");
  const char *keys[] = {"peer.step", "peer.optim.lr", "peer.d_model", "peer.weight_dtype"};
  for (int i = 0; i < 4; i++) {
    const char *sa = peer_safetensors_metadata(a, keys[i]);
    const char *sb = peer_safetensors_metadata(b, keys[i]);
    cr_assert(sa && sb && !strcmp(sa, sb), "%s: %s vs %s", keys[i], sa ? sa : "-", sb ? sb : "-");
  }
  peer_safetensors_close(a), peer_safetensors_close(b);
}

static void check_training(int world, const train_case *tc) {
  group g = {.world = world};
  pthread_barrier_init(&g.bar, NULL, (unsigned)world);
  atomic_int failures = 0;
  tjob jobs[MAXW];
  pthread_t th[MAXW];
  for (int r = 0; r < world; r++) {
    jobs[r] = (tjob){.m = {&g, r, 0}, .tc = tc, .failures = &failures};
    pthread_create(&th[r], NULL, train_main, &jobs[r]);
  }
  char first[512] = "";
  for (int r = 0; r < world; r++) {
    pthread_join(th[r], NULL);
    if (!first[0] && jobs[r].first[0]) snprintf(first, sizeof first, "%s", jobs[r].first);
  }
  pthread_barrier_destroy(&g.bar);
  cr_assert_eq(atomic_load(&failures), 0, "%s, world %d: %s", tc->config, world, first);
  check_merged(world);
}

static const train_case train_cases[] = {
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
  fill(x, T * d, 1.0f, &seed);
  float *d_x = dzalloc((size_t)(T * d) * 4), *d_y = dzalloc((size_t)(T * d) * 4);
  float *d_dx = dzalloc((size_t)(T * d) * 4);
  cudaMemcpy(d_x, x, (size_t)(T * d) * 4, cudaMemcpyHostToDevice);
  dgrads gr = dgrads_new(&c, T, d, 0);
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
  /* too small an expert capacity: refused, and the forward stays */
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
  float *d_bad = dzalloc((size_t)(T * d) * 4);
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
  cr_assert_eq(state_differs(S, NULL, F, NULL), NULL);
  peer_layer_free(F);
  dgrads_free(&gr);
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
  const peer_optim_config oc = train_optim(&train_cases[0]);
  const int64_t T = 16, d = c.d_model;
  if (peer_cuda_shard_create(&S, &c, &o, &comm) || peer_cuda_shard_init(S, 2) ||
      peer_cuda_shard_context_create(&ctx, S, T) || peer_cuda_shard_optimizer_create(&opt, S, &oc))
    FAILED(j, "rank %d: set-up: %s", rank, peer_last_error());
  int64_t c0, cols;
  peer_cuda_shard_columns(S, &c0, &cols);
  float *x = malloc((size_t)(T * d) * 4);
  uint64_t seed = 9;
  fill(x, T * d, 1.0f, &seed);
  float *d_x = dzalloc((size_t)(T * d) * 4), *d_y = dzalloc((size_t)(T * d) * 4);
  float *d_dy = dzalloc((size_t)(T * d) * 4), *d_dx = dzalloc((size_t)(T * d) * 4);
  cudaMemcpy(d_x, x, (size_t)(T * d) * 4, cudaMemcpyHostToDevice);
  fill(x, T * d, 0.1f, &seed);
  cudaMemcpy(d_dy, x, (size_t)(T * d) * 4, cudaMemcpyHostToDevice);
  dgrads gr = dgrads_new(&c, T, cols, 0);
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
  dgrads_free(&gr);
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
