/* test_shard_mpi.c: the sharded layer (peer.h "sharding") over MPI against
 * the unsharded layer on the same data, run with several ranks:
 *   mpirun --oversubscribe -np 4 build/bin/test_shard_mpi
 * Every rank builds the unsharded layer too and checks its own columns:
 * retrieval ids identical; y, dx and every gradient (dense in full, expert
 * rows as this rank's columns) within 1e-6 relative (max |a - b| over
 * max |b| of the tensor); parameters after several optimizer steps; shard
 * files merged against the unsharded checkpoint, split files and unsharded
 * files loaded into shards; and the refusals (d not divisible by the world
 * size, configs that differ between ranks, shard files of another world size
 * or rank, unsharded files given as shard files).  Exit status 0 only when
 * every check passed on every rank. */
#include "peer_mpi.h"

#include <math.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

/* Within 1e-6 relative; exact on one rank, where the shard runs the very
 * passes of the unsharded layer (the CPU variant the process chose). */
#define TOL 1e-6
static double tolerance = TOL;

static int rank, world, failures;
static char dir[256];

#define CHECK(cond, ...)                                                                           \
  do {                                                                                             \
    if (!(cond)) {                                                                                 \
      failures++;                                                                                  \
      fprintf(stderr, "rank %d: FAIL %s:%d: ", rank, __FILE__, __LINE__);                          \
      fprintf(stderr, __VA_ARGS__);                                                                \
      fputc('\n', stderr);                                                                         \
    }                                                                                              \
  } while (0)

#define OK(call)                                                                                   \
  do {                                                                                             \
    peer_status st_ = (call);                                                                      \
    CHECK(st_ == PEER_OK, "%s -> %s: %s", #call, peer_status_string(st_), peer_last_error());      \
  } while (0)

/* The same stream on every rank: inputs are replicated. */
static uint64_t rng = 88172645463325252ull;
static float frand(void) {
  rng ^= rng << 13, rng ^= rng >> 7, rng ^= rng << 17;
  return (float)((double)(rng >> 11) / 9007199254740992.0 * 2.0 - 1.0);
}
static void fill(float *p, int64_t n, float scale) {
  for (int64_t i = 0; i < n; i++)
    p[i] = scale * frand();
}

static double worst = 0.0; /* largest relative difference seen */

/* max |a - b| / max |b| over n values read as a[i*sa + o], b[i*sb + o]: rows
 * of `cols` values, a's rows sa apart, b's sb apart starting at column c0. */
static double rel_cols(const float *a, int64_t sa, const float *b, int64_t sb, int64_t c0,
                       int64_t rows, int64_t cols) {
  double diff = 0.0, scale = 0.0;
  for (int64_t r = 0; r < rows; r++)
    for (int64_t j = 0; j < cols; j++) {
      double x = a[r * sa + j], y = b[r * sb + c0 + j];
      if (fabs(x - y) > diff || isnan(x - y)) diff = isnan(x - y) ? INFINITY : fabs(x - y);
      if (fabs(y) > scale) scale = fabs(y);
    }
  double rel = scale > 0 ? diff / scale : diff;
  if (rel > worst) worst = rel;
  return rel;
}

static double rel(const float *a, const float *b, int64_t n) {
  return rel_cols(a, n, b, n, 0, 1, n);
}

static float bf16_to_f32(uint16_t h) {
  uint32_t u = (uint32_t)h << 16;
  float f;
  memcpy(&f, &u, 4);
  return f;
}

/* A tensor as f32 (bf16 widened), malloc'd. */
static float *as_f32(const peer_tensor *t) {
  size_t n = t->nbytes / peer_dtype_size(t->dtype);
  float *out = malloc(n * sizeof *out);
  for (size_t i = 0; i < n; i++)
    out[i] = t->dtype == PEER_BF16 ? bf16_to_f32(((const uint16_t *)t->data)[i])
                                   : ((const float *)t->data)[i];
  return out;
}

/* Every parameter of the shard against the full layer's (the expert tables
 * as this rank's columns); exact: bitwise, else within tol. */
static void compare_params(peer_shard *S, peer_layer *F, bool exact, double tol, const char *when) {
  int64_t c0, cols;
  peer_shard_columns(S, &c0, &cols);
  for (int i = 0; i < peer_shard_n_params(S); i++) {
    peer_tensor s, f;
    OK(peer_shard_param(S, i, &s));
    OK(peer_layer_param_by_name(F, s.name, &f));
    bool sliced = strncmp(s.name, "experts.", 8) == 0;
    int64_t rows = sliced ? f.shape[0] : 1,
            width = sliced ? f.shape[1] : (int64_t)(f.nbytes / peer_dtype_size(f.dtype));
    int64_t sc = sliced ? cols : width;
    float *a = as_f32(&s), *b = as_f32(&f);
    if (exact) {
      bool same = true;
      for (int64_t r = 0; r < rows && same; r++)
        same = memcmp(a + r * sc, b + r * width + (sliced ? c0 : 0), (size_t)sc * 4) == 0;
      CHECK(same, "%s: %s differs from the unsharded layer's", when, s.name);
    } else {
      double e = rel_cols(a, sc, b, width, sliced ? c0 : 0, rows, sc);
      CHECK(e <= tol, "%s: %s differs by %.3g relative", when, s.name, e);
    }
    free(a);
    free(b);
  }
}

static void barrier(void) { MPI_Barrier(MPI_COMM_WORLD); }

/* Dense gradient buffers and expert rows of one layer. */
typedef struct grads_buf {
  peer_grads g;
  float *bufs[5];
} grads_buf;

static void grads_alloc(grads_buf *gb, const peer_config *c, int64_t T, int64_t cols) {
  memset(gb, 0, sizeof *gb);
  int64_t dq = c->n_heads * c->d_key, G = c->shared_keys ? 1 : c->n_heads;
  int64_t cap = T * c->n_heads * c->top_k;
  gb->g.query_weight = gb->bufs[0] = calloc((size_t)(dq * c->d_model), 4);
  if (c->query_bias) gb->g.query_bias = gb->bufs[1] = calloc((size_t)dq, 4);
  if (c->query_norm) {
    gb->g.norm_weight = gb->bufs[2] = calloc((size_t)dq, 4);
    gb->g.norm_bias = gb->bufs[3] = calloc((size_t)dq, 4);
  }
  gb->g.keys = gb->bufs[4] = calloc((size_t)(G * 2 * c->n_subkeys * c->d_key / 2), 4);
  gb->g.expert_capacity = cap;
  gb->g.expert_rows = calloc((size_t)cap, 8);
  gb->g.experts_down = calloc((size_t)(cap * cols), 4);
  gb->g.experts_up = calloc((size_t)(cap * cols), 4);
}

static void grads_free(grads_buf *gb) {
  for (int i = 0; i < 5; i++)
    free(gb->bufs[i]);
  free(gb->g.expert_rows);
  free(gb->g.experts_down);
  free(gb->g.experts_up);
}

static void compare_grads(const grads_buf *s, const grads_buf *f, const peer_config *c, int64_t c0,
                          int64_t cols, int step) {
  int64_t dq = c->n_heads * c->d_key, G = c->shared_keys ? 1 : c->n_heads;
  int64_t sizes[5] = {dq * c->d_model, dq, dq, dq, G * c->n_subkeys * c->d_key};
  const char *names[5] = {"query_weight", "query_bias", "norm_weight", "norm_bias", "keys"};
  for (int i = 0; i < 5; i++) {
    if (!f->bufs[i]) continue;
    double e = rel(s->bufs[i], f->bufs[i], sizes[i]);
    CHECK(e <= tolerance, "step %d: grads.%s differ by %.3g relative", step, names[i], e);
  }
  CHECK(s->g.n_expert_rows == f->g.n_expert_rows, "step %d: %lld expert rows, unsharded %lld", step,
        (long long)s->g.n_expert_rows, (long long)f->g.n_expert_rows);
  int64_t R = f->g.n_expert_rows;
  CHECK(memcmp(s->g.expert_rows, f->g.expert_rows, (size_t)R * 8) == 0,
        "step %d: expert row lists differ", step);
  double ed = rel_cols(s->g.experts_down, cols, f->g.experts_down, c->d_model, c0, R, cols);
  double eu = rel_cols(s->g.experts_up, cols, f->g.experts_up, c->d_model, c0, R, cols);
  CHECK(ed <= tolerance && eu <= tolerance,
        "step %d: expert gradient columns differ by %.3g / %.3g", step, ed, eu);
}

static void path_of(char *buf, size_t n, const char *name, int r, int w) {
  snprintf(buf, n, "%s/%s-%d-of-%d.safetensors", dir, name, r, w);
}

/* A shard and the unsharded layer side by side, with the buffers of their
 * training steps. */
typedef struct pair {
  peer_config c;
  peer_shard *S;
  peer_layer *F;
  peer_shard_optimizer *os;
  peer_optimizer *of;
  peer_context *cs, *cf;
  int64_t T, c0, cols;
  float *x, *dy, *ys, *yf, *dxs, *dxf;
  grads_buf gbs, gbf;
  bool lockstep;
} pair;

/* Training steps on fresh data, both layers, compared after each.
 * lockstep: the shard's optimizer steps with the unsharded gradients (its
 * own were checked against them first), so that both layers stay on one
 * trajectory.  Adam needs it: an update is lr * m / (sqrt(v) + eps), so a
 * gradient near eps moves by up to lr/eps times its rounding difference
 * (1e6 at lr 1e-2), and two summation orders, sharded or not, part ways
 * after one step.  SGD runs free: each rank steps with its own gradients. */
static void train_steps(pair *p, int steps, const char *what) {
  const int64_t T = p->T, d = p->c.d_model, c0 = p->c0, cols = p->cols;
  for (int step = 0; step < steps; step++) {
    fill(p->x, T * d, 1.0f);
    fill(p->dy, T * d, 0.1f);
    OK(peer_forward_train(p->F, p->cf, T, p->x, p->yf));
    OK(peer_shard_forward_train(p->S, p->cs, T, p->x, p->ys));
    double e = rel(p->ys, p->yf, T * d);
    CHECK(e <= tolerance, "%s, step %d: training y differs by %.3g relative", what, step, e);
    OK(peer_backward(p->F, p->cf, p->dy, p->dxf, &p->gbf.g));
    OK(peer_shard_backward(p->S, p->cs, p->dy, p->dxs, &p->gbs.g));
    e = rel(p->dxs, p->dxf, T * d);
    CHECK(e <= tolerance, "%s, step %d: dx differs by %.3g relative", what, step, e);
    compare_grads(&p->gbs, &p->gbf, &p->c, c0, cols, step);
    OK(peer_optimizer_step(p->of, &p->gbf.g));
    if (p->lockstep) {
      /* the unsharded gradients, as this rank's columns */
      peer_grads t = p->gbf.g;
      t.experts_down = p->gbs.g.experts_down;
      t.experts_up = p->gbs.g.experts_up;
      for (int64_t r = 0; r < t.n_expert_rows; r++) {
        memcpy(t.experts_down + r * cols, p->gbf.g.experts_down + r * d + c0, (size_t)cols * 4);
        memcpy(t.experts_up + r * cols, p->gbf.g.experts_up + r * d + c0, (size_t)cols * 4);
      }
      OK(peer_shard_optimizer_step(p->os, &t));
    } else {
      OK(peer_shard_optimizer_step(p->os, &p->gbs.g));
    }
    compare_params(p->S, p->F, false, tolerance, what);
  }
}

/* Every rank saves its shard as `name` files, rank 0 merges them and
 * compares the result with the unsharded checkpoint `full` (which it writes
 * from p->F first) and loads it as an ordinary checkpoint. */
static void merge_matches(pair *p, const char *name, const char *full) {
  char mine[512], merged[512];
  path_of(mine, sizeof mine, name, rank, world);
  snprintf(merged, sizeof merged, "%s/%s-merged.safetensors", dir, name);
  OK(peer_shard_save(p->S, p->os, mine));
  if (rank == 0) OK(peer_checkpoint_save(p->F, p->of, full));
  barrier();
  if (rank != 0) return;
  char paths[64][512];
  const char *pp[64];
  for (int r = 0; r < world; r++) {
    path_of(paths[r], sizeof paths[r], name, world - 1 - r, world); /* any order */
    pp[r] = paths[r];
  }
  OK(peer_shard_merge(pp, world, merged));
  CHECK(peer_shard_merge(pp, world - 1 > 0 ? world - 1 : 1, merged) != PEER_OK || world == 1,
        "merge of too few shard files succeeded");
  peer_safetensors *a = NULL, *b = NULL;
  OK(peer_safetensors_open(&a, merged));
  OK(peer_safetensors_open(&b, full));
  if (a && b) {
    CHECK(peer_safetensors_count(a) == peer_safetensors_count(b), "merged has %d tensors, full %d",
          peer_safetensors_count(a), peer_safetensors_count(b));
    const char *sa = peer_safetensors_metadata(a, "peer.step"),
               *sb = peer_safetensors_metadata(b, "peer.step");
    CHECK(sa && sb && strcmp(sa, sb) == 0, "merged step %s, full %s", sa ? sa : "-", sb ? sb : "-");
    for (int i = 0; i < peer_safetensors_count(b); i++) {
      peer_tensor tb, ta;
      OK(peer_safetensors_info(b, i, &tb));
      if (peer_safetensors_find(a, tb.name, &ta)) {
        CHECK(0, "merged lacks %s", tb.name);
        continue;
      }
      CHECK(ta.nbytes == tb.nbytes && ta.dtype == tb.dtype, "merged %s has another layout",
            tb.name);
      ta.data = malloc(ta.nbytes);
      tb.data = malloc(tb.nbytes);
      OK(peer_safetensors_read(a, ta.name, ta.data, ta.nbytes));
      OK(peer_safetensors_read(b, tb.name, tb.data, tb.nbytes));
      float *fa = as_f32(&ta), *fb = as_f32(&tb);
      size_t n = tb.nbytes / peer_dtype_size(tb.dtype);
      double er = rel(fa, fb, (int64_t)n);
      CHECK(er <= tolerance, "merged %s differs from the unsharded checkpoint by %.3g", tb.name,
            er);
      free(fa), free(fb), free(ta.data), free(tb.data);
    }
  }
  peer_safetensors_close(a);
  peer_safetensors_close(b);
  /* the merged file is an ordinary checkpoint */
  peer_layer *M = NULL;
  peer_optimizer *om = NULL;
  peer_options o;
  peer_options_default(&o);
  OK(peer_layer_create(&M, &p->c, &o));
  OK(peer_optimizer_create(&om, M, peer_optimizer_config(p->of)));
  OK(peer_checkpoint_load(M, om, merged));
  CHECK(peer_optimizer_step_count(om) == peer_optimizer_step_count(p->of),
        "merged step count %lld, unsharded %lld", (long long)peer_optimizer_step_count(om),
        (long long)peer_optimizer_step_count(p->of));
  peer_optimizer_free(om);
  peer_layer_free(M);
}

/* Forward, training steps, files: the shard against the unsharded layer. */
static void run_config(const char *text, peer_optim_config oc, bool lockstep) {
  pair p = {.lockstep = lockstep, .T = 37};
  peer_config_default(&p.c);
  OK(peer_config_parse(&p.c, text));
  const peer_config c = p.c;
  peer_options o;
  peer_options_default(&o);
  o.n_threads = 1;
  peer_comm comm;
  OK(peer_mpi_comm_create(&comm, MPI_COMM_WORLD));
  OK(peer_layer_create(&p.F, &c, &o));
  OK(peer_shard_create(&p.S, &c, &o, &comm));
  if (!p.F || !p.S) return;
  peer_layer *F = p.F;
  peer_shard *S = p.S;
  OK(peer_layer_init(F, 7));
  OK(peer_shard_init(S, 7));
  compare_params(S, F, true, 0, "init");
  peer_shard_columns(S, &p.c0, &p.cols);
  const int64_t c0 = p.c0, cols = p.cols;
  CHECK(cols * world == c.d_model && c0 == cols * rank, "columns %lld + %lld", (long long)c0,
        (long long)cols);

  const int64_t T = p.T, d = c.d_model, hk = c.n_heads * c.top_k;
  p.x = malloc((size_t)(T * d) * 4), p.dy = malloc((size_t)(T * d) * 4);
  p.ys = malloc((size_t)(T * d) * 4), p.yf = malloc((size_t)(T * d) * 4);
  p.dxs = malloc((size_t)(T * d) * 4), p.dxf = malloc((size_t)(T * d) * 4);
  float *x = p.x, *ys = p.ys, *yf = p.yf;
  int64_t *is = malloc((size_t)(T * hk) * 8), *iff = malloc((size_t)(T * hk) * 8);
  float *gs = malloc((size_t)(T * hk) * 4), *gf = malloc((size_t)(T * hk) * 4);

  /* inference */
  fill(x, T * d, 1.0f);
  OK(peer_forward(F, T, x, yf, iff, gf));
  OK(peer_shard_forward(S, T, x, ys, is, gs));
  CHECK(memcmp(is, iff, (size_t)(T * hk) * 8) == 0, "forward: expert ids differ");
  double e = rel(gs, gf, T * hk);
  CHECK(e <= tolerance, "forward: gates differ by %.3g", e);
  e = rel(ys, yf, T * d);
  CHECK(e <= tolerance, "forward: y differs by %.3g relative", e);
  OK(peer_shard_retrieve(S, T, x, is, NULL, gs));
  CHECK(memcmp(is, iff, (size_t)(T * hk) * 8) == 0, "retrieve: expert ids differ");

  /* training */
  OK(peer_context_create(&p.cf, F, T));
  OK(peer_shard_context_create(&p.cs, S, T));
  OK(peer_optimizer_create(&p.of, F, &oc));
  OK(peer_shard_optimizer_create(&p.os, S, &oc));
  CHECK(peer_backward(F, p.cs, p.dy, p.dxs, &(peer_grads){0}) != PEER_OK,
        "peer_backward accepted a shard's context");
  grads_alloc(&p.gbf, &c, T, d);
  grads_alloc(&p.gbs, &c, T, cols);
  const int steps = 4;
  train_steps(&p, steps, "training");
  /* the ids of the trained layers still agree */
  fill(x, T * d, 1.0f);
  OK(peer_forward(F, T, x, yf, iff, gf));
  OK(peer_shard_forward(S, T, x, ys, is, gs));
  CHECK(memcmp(is, iff, (size_t)(T * hk) * 8) == 0, "forward after training: ids differ");
  e = rel(ys, yf, T * d);
  CHECK(e <= tolerance, "forward after training: y differs by %.3g relative", e);

  /* shard files: save, merge on rank 0, compare with the unsharded checkpoint */
  char full[512], mine[512];
  snprintf(full, sizeof full, "%s/full.safetensors", dir);
  path_of(mine, sizeof mine, "saved", rank, world);
  merge_matches(&p, "saved", full);
  if (rank == 0) {
    /* split the unsharded checkpoint for this world and for twice it */
    char sp[64][512], sp2[128][512];
    const char *spp[64], *sp2p[128];
    for (int r = 0; r < world; r++)
      path_of(sp[r], sizeof sp[r], "split", r, world), spp[r] = sp[r];
    for (int r = 0; r < 2 * world; r++)
      path_of(sp2[r], sizeof sp2[r], "split", r, 2 * world), sp2p[r] = sp2[r];
    OK(peer_shard_split(full, world, spp));
    if (c.d_model % (2 * world) == 0) OK(peer_shard_split(full, 2 * world, sp2p));
  }
  barrier();

  /* split files and the unsharded file load into fresh shards */
  peer_shard *S2 = NULL;
  peer_shard_optimizer *os2 = NULL;
  OK(peer_shard_create(&S2, &c, &o, &comm));
  OK(peer_shard_optimizer_create(&os2, S2, &oc));
  char split[512], other[512];
  path_of(split, sizeof split, "split", rank, world);
  OK(peer_shard_load(S2, os2, split));
  compare_params(S2, F, true, 0, "split file loaded");
  CHECK(peer_shard_optimizer_step_count(os2) == steps, "loaded step count %lld",
        (long long)peer_shard_optimizer_step_count(os2));
  OK(peer_shard_load(S2, os2, mine));
  compare_params(S2, F, false, tolerance, "own shard file loaded");
  OK(peer_shard_load_full(S2, NULL, full));
  compare_params(S2, F, true, 0, "unsharded file loaded");
  /* refusals */
  peer_status st;
  if (c.d_model % (2 * world) == 0) {
    path_of(other, sizeof other, "split", rank, 2 * world);
    st = peer_shard_load(S2, os2, other);
    CHECK(st == PEER_ERR_FORMAT && strstr(peer_last_error(), "world size"),
          "a shard file of world size %d: %s (%s)", 2 * world, peer_status_string(st),
          peer_last_error());
  }
  if (world > 1) {
    path_of(other, sizeof other, "split", (rank + 1) % world, world);
    st = peer_shard_load(S2, os2, other);
    CHECK(st == PEER_ERR_FORMAT, "another rank's shard file: %s", peer_status_string(st));
  }
  st = peer_shard_load(S2, os2, full);
  CHECK(st == PEER_ERR_FORMAT, "an unsharded file as a shard file: %s", peer_status_string(st));
  st = peer_shard_load_full(S2, NULL, split);
  CHECK(st == PEER_ERR_FORMAT, "a shard file as an unsharded one: %s", peer_status_string(st));
  peer_optim_config other_kind = oc;
  other_kind.kind = oc.kind == PEER_OPTIM_ADAM ? PEER_OPTIM_SGD : PEER_OPTIM_ADAM;
  peer_shard_optimizer *os3 = NULL;
  OK(peer_shard_optimizer_create(&os3, S2, &other_kind));
  st = peer_shard_load_full(S2, os3, full);
  CHECK(st == PEER_ERR_FORMAT && strstr(peer_last_error(), "optim.kind"),
        "an unsharded checkpoint of another optimizer kind: %s (%s)", peer_status_string(st),
        peer_last_error());
  peer_shard_optimizer_free(os3);

  /* the unsharded checkpoint with its optimizer state loads straight into
   * fresh shards, and training goes on from it next to the unsharded layer */
  pair q = p;
  OK(peer_shard_create(&q.S, &c, &o, &comm));
  OK(peer_shard_optimizer_create(&q.os, q.S, &oc));
  OK(peer_shard_context_create(&q.cs, q.S, T));
  OK(peer_shard_load_full(q.S, q.os, full));
  compare_params(q.S, F, true, 0, "unsharded checkpoint loaded");
  CHECK(peer_shard_optimizer_step_count(q.os) == steps, "step count %lld after loading",
        (long long)peer_shard_optimizer_step_count(q.os));
  train_steps(&q, 3, "after loading the unsharded checkpoint");
  char full2[512];
  snprintf(full2, sizeof full2, "%s/full2.safetensors", dir);
  merge_matches(&q, "continued", full2);
  barrier();

  peer_context_free(q.cs);
  peer_shard_optimizer_free(q.os);
  peer_shard_free(q.S);
  peer_shard_optimizer_free(os2);
  peer_shard_free(S2);
  grads_free(&p.gbf);
  grads_free(&p.gbs);
  peer_context_free(p.cf);
  peer_context_free(p.cs);
  peer_optimizer_free(p.of);
  peer_shard_optimizer_free(p.os);
  peer_layer_free(F);
  peer_shard_free(S);
  peer_mpi_comm_free(&comm);
  free(p.x), free(p.dy), free(ys), free(yf), free(p.dxs), free(p.dxf), free(is), free(iff),
      free(gs), free(gf);
}

/* Creation refuses, on every rank alike. */
static void refusals(void) {
  peer_comm comm;
  OK(peer_mpi_comm_create(&comm, MPI_COMM_WORLD));
  peer_config c;
  peer_config_default(&c);
  OK(peer_config_parse(&c, "d_model=64,n_heads=2,d_key=16,n_subkeys=16,top_k=4"));
  c.d_model = 16 * world;
  peer_shard *S = NULL;
  if (world > 1) {
    peer_config odd = c;
    odd.d_model = 16 * world + 1;
    peer_status st = peer_shard_create(&S, &odd, NULL, &comm);
    CHECK(st == PEER_ERR_CONFIG && !S && strstr(peer_last_error(), "divisible"),
          "d_model %lld on %d ranks: %s (%s)", (long long)odd.d_model, world,
          peer_status_string(st), peer_last_error());
    peer_config mixed = c;
    if (rank == world - 1) mixed.top_k = 3;
    st = peer_shard_create(&S, &mixed, NULL, &comm);
    CHECK(st == PEER_ERR_CONFIG && !S && strstr(peer_last_error(), "differs"),
          "configs differing between ranks: %s (%s)", peer_status_string(st), peer_last_error());
    peer_config bad = c;
    if (rank == 0) bad.top_k = 0; /* invalid on one rank only */
    st = peer_shard_create(&S, &bad, NULL, &comm);
    CHECK(st == PEER_ERR_CONFIG && !S && strstr(peer_last_error(), "on rank 0"),
          "a config invalid on rank 0 only: %s (%s)", peer_status_string(st), peer_last_error());
  }
  peer_comm wrong = comm;
  wrong.rank = world; /* out of range: refused before any communication */
  CHECK(peer_shard_create(&S, &c, NULL, &wrong) == PEER_ERR_INVALID_ARGUMENT,
        "rank out of range accepted");
  peer_mpi_comm_free(&comm);
}

int main(int argc, char **argv) {
  MPI_Init(&argc, &argv);
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  MPI_Comm_size(MPI_COMM_WORLD, &world);
  if (world == 1) tolerance = 0.0;
  if (rank == 0) {
    const char *tmp = getenv("TMPDIR");
    snprintf(dir, sizeof dir, "%s/peer-shard-XXXXXX", tmp && *tmp ? tmp : "/tmp");
    if (!mkdtemp(dir)) {
      perror("mkdtemp");
      MPI_Abort(MPI_COMM_WORLD, 1);
    }
  }
  MPI_Bcast(dir, sizeof dir, MPI_CHAR, 0, MPI_COMM_WORLD);

  peer_optim_config adam = peer_optim_config_default();
  adam.lr = 1e-3f;
  adam.expert_lr = 1e-2f;
  peer_optim_config sgd = peer_optim_config_default();
  sgd.kind = PEER_OPTIM_SGD;
  sgd.expert_kind = PEER_OPTIM_SGD;
  sgd.momentum = 0.9f;
  sgd.lr = 0.05f;
  sgd.weight_decay = 0.01f;
  const struct {
    const char *config;
    peer_optim_config opt;
  } cases[] = {
      {"d_model=64,n_heads=2,d_key=16,n_subkeys=16,top_k=4,query_bias=1", adam},
      /* No query bias with batch norm: the norm removes it, so its gradient
       * is rounding noise, which Adam turns into steps of +-lr that differ
       * with any change of summation order, sharded or not. */
      {"d_model=64,n_heads=3,d_key=8,n_subkeys=12,top_k=5,query_norm=batchnorm,"
       "activation=silu,gate=sigmoid",
       adam},
      {"d_model=128,n_heads=2,d_key=16,n_subkeys=16,top_k=4,subkey_top_k=6,weight_dtype=bf16,"
       "shared_keys=1,activation=relu,gate=relu",
       sgd},
      {"d_model=96,n_heads=4,d_key=32,n_subkeys=32,top_k=1,activation=gelu_tanh", sgd},
  };
  for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
    peer_config c;
    peer_config_default(&c);
    peer_config_parse(&c, cases[i].config);
    if (c.d_model % world) continue;
    int before = failures;
    run_config(cases[i].config, cases[i].opt, cases[i].opt.kind == PEER_OPTIM_ADAM);
    if (rank == 0)
      printf("[%s] %d ranks, %s\n", failures == before ? "PASS" : "FAIL", world, cases[i].config);
  }
  refusals();

  int total = 0;
  MPI_Allreduce(&failures, &total, 1, MPI_INT, MPI_SUM, MPI_COMM_WORLD);
  double worst_all = 0.0;
  MPI_Reduce(&worst, &worst_all, 1, MPI_DOUBLE, MPI_MAX, 0, MPI_COMM_WORLD);
  if (rank == 0) {
    char cmd[300];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", dir);
    if (system(cmd) != 0) fprintf(stderr, "could not remove %s\n", dir);
    printf("test_shard_mpi: %d ranks, %d failed checks, largest relative difference %.3g "
           "(tolerance %g)\n",
           world, total, worst_all, tolerance);
  }
  MPI_Finalize();
  return total ? 1 : 0;
}
