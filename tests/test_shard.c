/* test_shard.c: the sharded layer (peer.h "sharding") without MPI: P threads
 * of one process play the ranks, over tests/thread_comm.h's communicator
 * (sums and gathers through shared memory, in rank order, so every rank gets
 * the same bits).  Each rank checks its shard against an unsharded layer of its own
 * on the same data: ids identical; y, dx and every gradient within 1e-6
 * relative; the parameters and optimizer state after Adam or SGD steps
 * identical bit for bit (the shard stepping with the unsharded gradients'
 * columns, as tests/mpi/test_shard_mpi.c explains).  Also the refusals at
 * creation (configs that differ between ranks, d_model not divisible), and
 * PEER_ERR_BUSY for a call on a shard another thread is in.  This is where
 * the ASan build checks the sharded code for leaks: the MPI tests cannot
 * (Open MPI's own allocations at exit). */
#define _GNU_SOURCE
#include <criterion/criterion.h>

#include <math.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "peer.h"
#include "tempdir.h"
#include "thread_comm.h"

/* Within 1e-6 relative; exact with one rank, where the shard runs the very
 * passes of the unsharded layer (the CPU variant the process chose). */
#define TOL 1e-6
#define MAXW THREAD_COMM_MAXW

/* ------------------------------------------------------- the communicator */

static int sum(void *h, float *data, int64_t count) {
  group_sum(h, data, count);
  return 0;
}

static int gather(void *h, const void *send, void *recv, size_t bytes) {
  group_gather(h, send, recv, bytes);
  return 0;
}

/* ------------------------------------------------------------ one rank */

typedef struct job {
  member m;
  const char *config;
  int mixed;      /* 1: the last rank uses another top_k */
  int pretrained; /* steps the unsharded layer takes alone before the shard
                     loads its checkpoint (peer_shard_load_full) */
  int sgd;        /* SGD with momentum (dense) and lazy SGD (experts), not Adam */
  atomic_int *failures;
  char first[512];
} job;

static uint64_t next(uint64_t *s) {
  *s ^= *s << 13, *s ^= *s >> 7, *s ^= *s << 17;
  return *s;
}
static void fill(float *p, int64_t n, float scale, uint64_t *s) {
  for (int64_t i = 0; i < n; i++)
    p[i] = scale * (float)((double)(next(s) >> 11) / 9007199254740992.0 * 2.0 - 1.0);
}

/* max |a - b| / max |b| over rows of cols values (a's rows sa apart, b's sb
 * apart from column c0). */
static double rel(const float *a, int64_t sa, const float *b, int64_t sb, int64_t c0, int64_t rows,
                  int64_t cols) {
  double diff = 0, scale = 0;
  for (int64_t r = 0; r < rows; r++)
    for (int64_t j = 0; j < cols; j++) {
      double x = a[r * sa + j], y = b[r * sb + c0 + j];
      diff = fmax(diff, isnan(x - y) ? INFINITY : fabs(x - y));
      scale = fmax(scale, fabs(y));
    }
  return scale > 0 ? diff / scale : diff;
}

/* A parameter as f32 (bf16 widened), malloc'd. */
static float *as_f32(const peer_tensor *t) {
  size_t n = t->nbytes / peer_dtype_size(t->dtype);
  float *out = malloc(n * sizeof *out);
  for (size_t i = 0; i < n; i++) {
    if (t->dtype == PEER_BF16) {
      uint32_t u = (uint32_t)((const uint16_t *)t->data)[i] << 16;
      memcpy(&out[i], &u, 4);
    } else {
      out[i] = ((const float *)t->data)[i];
    }
  }
  return out;
}

/* Every parameter of S against F's (the expert tables as S's columns):
 * differences within tol, or the name of the first that is not. */
static const char *params_differ(peer_shard *S, peer_layer *F, double tol, double *err) {
  int64_t c0, cols;
  peer_shard_columns(S, &c0, &cols);
  for (int i = 0; i < peer_shard_n_params(S); i++) {
    peer_tensor ta, tb;
    peer_shard_param(S, i, &ta);
    peer_layer_param_by_name(F, ta.name, &tb);
    bool sliced = strncmp(ta.name, "experts.", 8) == 0;
    int64_t n = (int64_t)(tb.nbytes / peer_dtype_size(tb.dtype)), d = tb.shape[1];
    float *pa = as_f32(&ta), *pb = as_f32(&tb);
    *err = sliced ? rel(pa, cols, pb, d, c0, tb.shape[0], cols) : rel(pa, n, pb, n, 0, 1, n);
    free(pa), free(pb);
    if (*err > tol) return ta.name;
  }
  return NULL;
}

/* As params_differ, for the optimizer states (as S's columns where sliced). */
static const char *states_differ(peer_shard *S, peer_shard_optimizer *oa, peer_optimizer *ob,
                                 double tol, double *err) {
  int64_t c0, cols;
  peer_shard_columns(S, &c0, &cols);
  for (int i = 0; i < peer_optimizer_n_states(ob); i++) {
    peer_tensor ta, tb;
    peer_optimizer_state(ob, i, &tb);
    if (peer_shard_optimizer_state_by_name(oa, tb.name, &ta)) return tb.name;
    bool sliced = strncmp(tb.name, "optim.experts.", 14) == 0;
    int64_t n = (int64_t)(tb.nbytes / 4), d = tb.shape[1];
    *err = sliced ? rel(ta.data, cols, tb.data, d, c0, tb.shape[0], cols)
                  : rel(ta.data, n, tb.data, n, 0, 1, n);
    if (*err > tol) return tb.name;
  }
  return NULL;
}

static void *rank_main(void *arg) {
  job *j = arg;
  peer_comm comm = {&j->m, j->m.rank, j->m.g->world, sum, gather};
  peer_config c;
  peer_config_default(&c);
  peer_config_parse(&c, j->config);
  if (j->mixed && j->m.rank == comm.world - 1) c.top_k -= 1;
  peer_options o;
  peer_options_default(&o);
  o.n_threads = 1;
  peer_shard *S = NULL;
  peer_status st = peer_shard_create(&S, &c, &o, &comm);
  if (j->mixed || c.d_model % comm.world) {
    if (st != PEER_ERR_CONFIG || S)
      FAILED(j, "rank %d: creation with %s was not refused: %s", j->m.rank,
             j->mixed ? "mixed configs" : "d not divisible", peer_status_string(st));
    peer_shard_free(S);
    return NULL;
  }
  peer_layer *F = NULL;
  if (st || peer_layer_create(&F, &c, &o)) {
    FAILED(j, "rank %d: create: %s", j->m.rank, peer_last_error());
    peer_shard_free(S);
    return NULL;
  }
  peer_layer_init(F, 11);
  peer_shard_init(S, 11);
  int64_t c0, cols;
  peer_shard_columns(S, &c0, &cols);
  const int64_t T = 19, d = c.d_model, hk = c.n_heads * c.top_k;
  const int64_t dq = c.n_heads * c.d_key, G = c.shared_keys ? 1 : c.n_heads;
  const int64_t nk = G * c.n_subkeys * c.d_key;
  float *x = malloc((size_t)(T * d) * 4), *dy = malloc((size_t)(T * d) * 4);
  float *ya = malloc((size_t)(T * d) * 4), *yb = malloc((size_t)(T * d) * 4);
  float *dxa = malloc((size_t)(T * d) * 4), *dxb = malloc((size_t)(T * d) * 4);
  int64_t *ia = malloc((size_t)(T * hk) * 8), *ib = malloc((size_t)(T * hk) * 8);
  uint64_t seed = 0x9e3779b97f4a7c15ull;
  fill(x, T * d, 1.0f, &seed);
  peer_shard_forward(S, T, x, ya, ia, NULL);
  peer_forward(F, T, x, yb, ib, NULL);
  if (memcmp(ia, ib, (size_t)(T * hk) * 8)) FAILED(j, "rank %d: forward ids differ", j->m.rank);
  const double tol = comm.world == 1 ? 0.0 : TOL;
  if (rel(ya, d, yb, d, 0, T, d) > tol) FAILED(j, "rank %d: forward y differs", j->m.rank);

  peer_context *ca = NULL, *cb = NULL;
  peer_shard_context_create(&ca, S, T);
  peer_context_create(&cb, F, T);
  peer_optim_config oc = peer_optim_config_default();
  if (j->sgd) oc.kind = oc.expert_kind = PEER_OPTIM_SGD, oc.momentum = 0.9f, oc.lr = 0.05f;
  peer_shard_optimizer *oa = NULL;
  peer_optimizer *ob = NULL;
  peer_shard_optimizer_create(&oa, S, &oc);
  peer_optimizer_create(&ob, F, &oc);
  float *qa = calloc((size_t)(dq * d), 4), *qb = calloc((size_t)(dq * d), 4);
  float *ka = calloc((size_t)nk, 4), *kb = calloc((size_t)nk, 4);
  int64_t *ra = calloc((size_t)(T * hk), 8), *rb = calloc((size_t)(T * hk), 8);
  float *eda = calloc((size_t)(T * hk * cols), 4), *eua = calloc((size_t)(T * hk * cols), 4);
  float *edb = calloc((size_t)(T * hk * d), 4), *eub = calloc((size_t)(T * hk * d), 4);
  /* steps before 0: F trains alone; its checkpoint (weights, state, step)
   * then loads into S */
  for (int step = -j->pretrained; step < 3; step++) {
    if (step == 0 && j->pretrained) {
      char path[128];
      snprintf(path, sizeof path, "%s/full-%d-of-%d.safetensors", test_dir, j->m.rank, comm.world);
      double err = 0;
      const char *name;
      if (peer_checkpoint_save(F, ob, path) || peer_shard_load_full(S, oa, path))
        FAILED(j, "rank %d: checkpoint into the shard: %s", j->m.rank, peer_last_error());
      else if ((name = params_differ(S, F, 0.0, &err)) ||
               (name = states_differ(S, oa, ob, 0.0, &err)))
        FAILED(j, "rank %d: %s of the loaded checkpoint differs by %.3g", j->m.rank, name, err);
      else if (peer_shard_optimizer_step_count(oa) != j->pretrained)
        FAILED(j, "rank %d: loaded step count %lld", j->m.rank,
               (long long)peer_shard_optimizer_step_count(oa));
    }
    fill(x, T * d, 1.0f, &seed);
    fill(dy, T * d, 0.1f, &seed);
    peer_grads ga = {.query_weight = qa,
                     .keys = ka,
                     .expert_capacity = T * hk,
                     .expert_rows = ra,
                     .experts_down = eda,
                     .experts_up = eua};
    peer_grads gb = {.query_weight = qb,
                     .keys = kb,
                     .expert_capacity = T * hk,
                     .expert_rows = rb,
                     .experts_down = edb,
                     .experts_up = eub};
    if (step < 0) {
      if (peer_forward_train(F, cb, T, x, yb) || peer_backward(F, cb, dy, dxb, &gb) ||
          peer_optimizer_step(ob, &gb))
        FAILED(j, "rank %d: unsharded training failed: %s", j->m.rank, peer_last_error());
      continue;
    }
    if (peer_shard_forward_train(S, ca, T, x, ya) || peer_forward_train(F, cb, T, x, yb)) {
      FAILED(j, "rank %d: training call failed: %s", j->m.rank, peer_last_error());
      break;
    }
    /* dx over dy (or x) is refused on every rank before any collective */
    if (peer_shard_backward(S, ca, dy, dy, &ga) != PEER_ERR_INVALID_ARGUMENT ||
        peer_shard_backward(S, ca, dy, (float *)x, &ga) != PEER_ERR_INVALID_ARGUMENT)
      FAILED(j, "rank %d: dx over dy or x was not refused", j->m.rank);
    if (peer_shard_backward(S, ca, dy, dxa, &ga) || peer_backward(F, cb, dy, dxb, &gb)) {
      FAILED(j, "rank %d: training call failed: %s", j->m.rank, peer_last_error());
      break;
    }
    double e[6] = {rel(ya, d, yb, d, 0, T, d),
                   rel(dxa, d, dxb, d, 0, T, d),
                   rel(qa, dq * d, qb, dq * d, 0, 1, dq * d),
                   rel(ka, nk, kb, nk, 0, 1, nk),
                   rel(eda, cols, edb, d, c0, gb.n_expert_rows, cols),
                   rel(eua, cols, eub, d, c0, gb.n_expert_rows, cols)};
    for (int i = 0; i < 6; i++)
      if (e[i] > tol)
        FAILED(j, "rank %d, step %d: quantity %d (y, dx, dWq, dkeys, dU, dV) differs by %.3g",
               j->m.rank, step, i, e[i]);
    if (ga.n_expert_rows != gb.n_expert_rows || memcmp(ra, rb, (size_t)gb.n_expert_rows * 8) != 0)
      FAILED(j, "rank %d, step %d: expert rows differ", j->m.rank, step);
    /* step both with the unsharded gradients (the shard with its columns):
     * the same rules on the same values, so the same bits on any world */
    for (int64_t r = 0; r < gb.n_expert_rows; r++) {
      memcpy(eda + r * cols, edb + r * d + c0, (size_t)cols * 4);
      memcpy(eua + r * cols, eub + r * d + c0, (size_t)cols * 4);
    }
    ga.query_weight = qb, ga.keys = kb;
    peer_shard_optimizer_step(oa, &ga);
    peer_optimizer_step(ob, &gb);
    double er = 0;
    const char *name = params_differ(S, F, 0.0, &er);
    if (!name) name = states_differ(S, oa, ob, 0.0, &er);
    if (name) FAILED(j, "rank %d, step %d: %s differs by %.3g", j->m.rank, step, name, er);
  }
  if (peer_shard_optimizer_step_count(oa) != j->pretrained + 3)
    FAILED(j, "rank %d: step count %lld", j->m.rank,
           (long long)peer_shard_optimizer_step_count(oa));
  free(qa), free(qb), free(ka), free(kb), free(ra), free(rb), free(eda), free(eua), free(edb),
      free(eub);
  peer_shard_optimizer_free(oa);
  peer_optimizer_free(ob);
  peer_context_free(ca);
  peer_context_free(cb);
  free(x), free(dy), free(ya), free(yb), free(dxa), free(dxb), free(ia), free(ib);
  peer_layer_free(F);
  peer_shard_free(S);
  return NULL;
}

/* Run `config` on `world` threads; the number of failed checks. */
static int run_group(int world, const char *config, int mixed, int pretrained, int sgd, char *first,
                     size_t n) {
  group g = {.world = world};
  pthread_barrier_init(&g.bar, NULL, (unsigned)world);
  atomic_int failures = 0;
  job jobs[MAXW];
  pthread_t th[MAXW];
  for (int r = 0; r < world; r++) {
    jobs[r] = (job){.m = {&g, r, 0},
                    .config = config,
                    .mixed = mixed,
                    .pretrained = pretrained,
                    .sgd = sgd,
                    .failures = &failures};
    pthread_create(&th[r], NULL, rank_main, &jobs[r]);
  }
  first[0] = '\0';
  for (int r = 0; r < world; r++) {
    pthread_join(th[r], NULL);
    if (!first[0] && jobs[r].first[0]) snprintf(first, n, "%s", jobs[r].first);
  }
  pthread_barrier_destroy(&g.bar);
  return atomic_load(&failures);
}

static void make_dir(void) { test_dir_make("shard"); }

static const char *const configs[] = {
    "d_model=48,n_heads=2,d_key=16,n_subkeys=16,top_k=4,query_bias=0",
    "d_model=48,n_heads=3,d_key=8,n_subkeys=12,top_k=5,query_norm=batchnorm,gate=sigmoid,"
    "activation=silu",
    "d_model=48,n_heads=2,d_key=16,n_subkeys=16,top_k=3,weight_dtype=bf16,shared_keys=1,"
    "gate=relu,activation=relu",
};

Test(shard, matches_unsharded_on_1_to_4_ranks) {
  char first[512];
  for (int w = 1; w <= 4; w++)
    for (size_t i = 0; i < sizeof configs / sizeof configs[0]; i++)
      for (int sgd = 0; sgd < 2; sgd++) {
        int f = run_group(w, configs[i], 0, 0, sgd, first, sizeof first);
        cr_expect_eq(f, 0, "%d ranks, %s, %s: %d failed checks, first: %s", w, configs[i],
                     sgd ? "SGD" : "Adam", f, first);
      }
}

/* Train unsharded 2 steps, checkpoint, load the checkpoint with its
 * optimizer state into the shards, and go on 3 steps next to the unsharded
 * layer: the shards' weights and state follow its. */
Test(shard, continues_an_unsharded_checkpoint, .init = make_dir, .fini = test_dir_remove) {
  char first[512];
  for (int w = 1; w <= 4; w++)
    for (size_t i = 0; i < sizeof configs / sizeof configs[0]; i++) {
      int f = run_group(w, configs[i], 0, 2, 0, first, sizeof first);
      cr_expect_eq(f, 0, "%d ranks, %s: %d failed checks, first: %s", w, configs[i], f, first);
    }
}

Test(shard, creation_refusals) {
  char first[512];
  int f = run_group(3, "d_model=48,n_heads=2,d_key=16,n_subkeys=16,top_k=4", 1, 0, 0, first,
                    sizeof first);
  cr_expect_eq(f, 0, "mixed configs: %s", first);
  f = run_group(4, "d_model=50,n_heads=2,d_key=16,n_subkeys=16,top_k=4", 0, 0, 0, first,
                sizeof first);
  cr_expect_eq(f, 0, "d not divisible: %s", first);
}

/* ------------------------------------------------------------ one shard, two threads */

/* A one-rank communicator whose first all-reduce after `armed` waits until
 * the test releases it: the call making it is then inside the shard. */
typedef struct gate {
  pthread_mutex_t mu;
  pthread_cond_t cv;
  bool armed, inside, released;
} gate;

static int gate_sum(void *h, float *data, int64_t count) {
  (void)data, (void)count; /* one rank: the sum is the data */
  gate *g = h;
  pthread_mutex_lock(&g->mu);
  if (g->armed && !g->inside) {
    g->inside = true;
    pthread_cond_broadcast(&g->cv);
    while (!g->released)
      pthread_cond_wait(&g->cv, &g->mu);
  }
  pthread_mutex_unlock(&g->mu);
  return 0;
}

static int gate_gather(void *h, const void *send, void *recv, size_t bytes) {
  (void)h;
  memcpy(recv, send, bytes);
  return 0;
}

/* A one-rank shard of configs[0] over g, initialised; its config in *c. */
static peer_shard *one_rank_shard(gate *g, peer_config *c) {
  peer_comm comm = {g, 0, 1, gate_sum, gate_gather};
  peer_config_default(c);
  cr_assert_eq(peer_config_parse(c, configs[0]), PEER_OK);
  peer_shard *S = NULL;
  cr_assert_eq(peer_shard_create(&S, c, NULL, &comm), PEER_OK, "%s", peer_last_error());
  cr_assert_eq(peer_shard_init(S, 3), PEER_OK);
  return S;
}

typedef struct held_call {
  peer_shard *S;
  peer_context *ctx;
  const float *x;
  float *y;
  peer_status st;
} held_call;

static void *forward_train_thread(void *arg) {
  held_call *c = arg;
  c->st = peer_shard_forward_train(c->S, c->ctx, 4, c->x, c->y);
  return NULL;
}

static void expect_busy(peer_status st, const char *call) {
  cr_expect_eq(st, PEER_ERR_BUSY, "%s while another thread is in shard_forward_train: %s (%s)",
               call, peer_status_string(st), st ? peer_last_error() : "no error");
  if (st == PEER_ERR_BUSY)
    cr_expect(strstr(peer_last_error(), "another thread is in shard_forward_train"), "%s",
              peer_last_error());
}

/* While one thread is inside peer_shard_forward_train (held in its
 * all-reduce), every other call on the shard from another thread is refused
 * with PEER_ERR_BUSY and writes nothing; the held call then completes and
 * the shard takes calls again. */
Test(shard, a_busy_shard_refuses_other_calls, .init = make_dir, .fini = test_dir_remove) {
  gate g = {.mu = PTHREAD_MUTEX_INITIALIZER, .cv = PTHREAD_COND_INITIALIZER};
  peer_config c;
  peer_shard *S = one_rank_shard(&g, &c);
  const int64_t T = 4, d = c.d_model, thk = T * c.n_heads * c.top_k;
  float *x = malloc((size_t)(T * d) * 4), *y = calloc((size_t)(T * d), 4);
  float *y2 = calloc((size_t)(T * d), 4), *dy = malloc((size_t)(T * d) * 4);
  float *dx = calloc((size_t)(T * d), 4), *eg = calloc((size_t)(thk * d), 4);
  float *eg2 = calloc((size_t)(thk * d), 4);
  int64_t *rows = calloc((size_t)thk, 8), *ids = calloc((size_t)thk, 8);
  uint64_t seed = 7;
  fill(x, T * d, 1.0f, &seed);
  fill(dy, T * d, 0.1f, &seed);
  peer_context *ctx = NULL, *ctx2 = NULL;
  cr_assert_eq(peer_shard_context_create(&ctx, S, T), PEER_OK);
  cr_assert_eq(peer_shard_context_create(&ctx2, S, T), PEER_OK);
  peer_optim_config oc = peer_optim_config_default();
  peer_shard_optimizer *o = NULL;
  cr_assert_eq(peer_shard_optimizer_create(&o, S, &oc), PEER_OK);
  peer_grads gr = {
      .expert_capacity = thk, .expert_rows = rows, .experts_down = eg, .experts_up = eg2};
  const char *path = test_path("s.safetensors");
  cr_assert_eq(peer_shard_save(S, o, path), PEER_OK, "%s", peer_last_error());

  g.armed = true;
  held_call hc = {S, ctx, x, y, PEER_OK};
  pthread_t th;
  pthread_create(&th, NULL, forward_train_thread, &hc);
  pthread_mutex_lock(&g.mu);
  while (!g.inside)
    pthread_cond_wait(&g.cv, &g.mu);
  pthread_mutex_unlock(&g.mu);

  expect_busy(peer_shard_forward(S, T, x, y2, ids, NULL), "shard_forward");
  expect_busy(peer_shard_forward_train(S, ctx2, T, x, y2), "shard_forward_train");
  expect_busy(peer_shard_backward(S, ctx, dy, dx, &gr), "shard_backward");
  expect_busy(peer_shard_retrieve(S, T, x, ids, NULL, NULL), "shard_retrieve");
  expect_busy(peer_shard_optimizer_step(o, &gr), "shard_optimizer_step");
  expect_busy(peer_shard_init(S, 4), "shard_init");
  expect_busy(peer_shard_save(S, o, path), "shard_save");
  expect_busy(peer_shard_load(S, o, path), "shard_load");
  expect_busy(peer_shard_load_full(S, o, path), "shard_load_full");
  for (int64_t i = 0; i < T * d; i++)
    cr_assert(y2[i] == 0.0f && dx[i] == 0.0f, "a refused call wrote its output");
  for (int64_t i = 0; i < thk; i++)
    cr_assert_eq(ids[i], 0, "a refused call wrote indices");

  pthread_mutex_lock(&g.mu);
  g.released = true;
  pthread_cond_broadcast(&g.cv);
  pthread_mutex_unlock(&g.mu);
  pthread_join(th, NULL);
  cr_assert_eq(hc.st, PEER_OK, "the held call failed: %s", peer_status_string(hc.st));
  cr_assert_eq(peer_shard_backward(S, ctx, dy, dx, &gr), PEER_OK, "%s", peer_last_error());
  cr_assert_eq(peer_shard_optimizer_step(o, &gr), PEER_OK, "%s", peer_last_error());
  cr_assert_eq(peer_shard_forward(S, T, x, y2, ids, NULL), PEER_OK, "%s", peer_last_error());

  peer_shard_optimizer_free(o);
  peer_context_free(ctx);
  peer_context_free(ctx2);
  peer_shard_free(S);
  free(x), free(y), free(y2), free(dy), free(dx), free(eg), free(eg2), free(rows), free(ids);
}

/* ------------------------------------------------------------ argument checks */

static void expect_refused(peer_status st, const char *want, const char *what) {
  cr_expect_eq(st, PEER_ERR_INVALID_ARGUMENT, "%s: %s (%s)", what, peer_status_string(st),
               st ? peer_last_error() : "no error");
  if (st)
    cr_expect(strncmp(peer_last_error(), "shard_forward: ", 15) == 0 &&
                  strstr(peer_last_error(), want),
              "%s: the message should start with shard_forward: and say \"%s\": %s", what, want,
              peer_last_error());
}

/* peer_shard_forward checks its arguments as peer_forward does, before it
 * sizes scratch or communicates: a batch too large to address is an invalid
 * argument (not out of memory), and y, indices or gates over x or each
 * other are refused; a refused call writes nothing. */
Test(shard, forward_checks_arguments_first) {
  gate g = {.mu = PTHREAD_MUTEX_INITIALIZER, .cv = PTHREAD_COND_INITIALIZER};
  peer_config c;
  peer_shard *S = one_rank_shard(&g, &c);
  const int64_t T = 4, d = c.d_model, thk = T * c.n_heads * c.top_k;
  float *x = malloc((size_t)(T * d) * 4), *y = calloc((size_t)(T * d), 4);
  float *gates = calloc((size_t)thk, 4);
  int64_t *ids = calloc((size_t)thk, 8);
  uint64_t seed = 11;
  fill(x, T * d, 1.0f, &seed);

  expect_refused(peer_shard_forward(S, ((int64_t)1 << 40) / d + 1, x, y, NULL, NULL), "too large",
                 "a batch too large to address");
  expect_refused(peer_shard_forward(S, -1, x, y, NULL, NULL), "negative", "a negative batch");
  expect_refused(peer_shard_forward(S, T, x, x, NULL, NULL), "overlap", "y = x");
  expect_refused(peer_shard_forward(S, T, x, y, (int64_t *)(void *)x, NULL), "overlap",
                 "indices over x");
  expect_refused(peer_shard_forward(S, T, x, y, ids, y + 1), "overlap", "gates over y");
  for (int64_t i = 0; i < T * d; i++)
    cr_assert(y[i] == 0.0f, "a refused call wrote y");
  for (int64_t i = 0; i < thk; i++)
    cr_assert(ids[i] == 0 && gates[i] == 0.0f, "a refused call wrote indices or gates");
  cr_assert_eq(peer_shard_forward(S, T, x, y, ids, gates), PEER_OK, "%s", peer_last_error());
  cr_assert_eq(peer_shard_forward(S, 0, NULL, NULL, NULL, NULL), PEER_OK, "%s", peer_last_error());

  peer_shard_free(S);
  free(x), free(y), free(gates), free(ids);
}
