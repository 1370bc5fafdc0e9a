/* tests/cuda_shard_ref.h: what the CUDA shard tests share
 * (tests/test_cuda_shard.c, in-process ranks on one device;
 * tests/nccl/test_cuda_shard_nccl.c, NCCL ranks on several GPUs): the
 * unsharded references of one batch (a CPU and a CUDA layer initialised
 * with the shards' seed, their y, ids and gates), and the comparison of a
 * rank's results with them; one rank's training next to an unsharded twin
 * (ref_train_rank) and the check of the merged shard files
 * (ref_check_merged).  No test framework: failures are returned as text. */
#ifndef PEER_TESTS_CUDA_SHARD_REF_H
#define PEER_TESTS_CUDA_SHARD_REF_H

#include "peer_cuda.h"

#include <math.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define REF_Y_TOL 2e-4     /* test_cuda's, against the CPU backend */
#define REF_SHARD_TOL 1e-5 /* against the unsharded CUDA layer: the same terms, other sums */

static inline uint64_t ref_next(uint64_t *s) {
  *s ^= *s << 13, *s ^= *s >> 7, *s ^= *s << 17;
  return *s;
}

static inline void ref_fill(float *p, int64_t n, float scale, uint64_t *s) {
  for (int64_t i = 0; i < n; i++)
    p[i] = scale * (float)((double)(ref_next(s) >> 11) / 9007199254740992.0 * 2.0 - 1.0);
}

/* max |a - b| / max |b| over rows of cols values (a's rows sa apart, b's sb
 * apart from column c0), rows r with use[r] (all when use is NULL). */
static inline double ref_rel(const float *a, int64_t sa, const float *b, int64_t sb, int64_t c0,
                             int64_t rows, int64_t cols, const char *use) {
  double diff = 0, scale = 0;
  for (int64_t r = 0; r < rows; r++) {
    if (use && !use[r]) continue;
    for (int64_t j = 0; j < cols; j++) {
      double u = a[r * sa + j], v = b[r * sb + c0 + j];
      diff = fmax(diff, isnan(u - v) ? INFINITY : fabs(u - v));
      scale = fmax(scale, fabs(v));
    }
  }
  return scale > 0 ? diff / scale : diff;
}

typedef struct shard_ref {
  peer_config cfg;
  int64_t T;
  float *x, *y_cuda, *y_cpu, *g_cuda;
  int64_t *i_cuda, *i_cpu;
  float *down, *up; /* the unsharded CUDA layer's tables as f32, [N, d] */
} shard_ref;

/* A device tensor as host f32 (bf16 widened), malloc'd; NULL if the copy
 * fails. */
static inline float *ref_download_f32(const peer_tensor *t) {
  size_t n = t->nbytes / peer_dtype_size(t->dtype);
  void *raw = malloc(t->nbytes);
  float *out = malloc(n * sizeof *out);
  if (cudaMemcpy(raw, t->data, t->nbytes, cudaMemcpyDeviceToHost) != cudaSuccess) {
    free(raw), free(out);
    return NULL;
  }
  for (size_t i = 0; i < n; i++) {
    if (t->dtype == PEER_BF16) {
      uint32_t u = (uint32_t)((const uint16_t *)raw)[i] << 16;
      memcpy(&out[i], &u, 4);
    } else {
      out[i] = ((const float *)raw)[i];
    }
  }
  free(raw);
  return out;
}

static inline void ref_free(shard_ref *R) {
  free(R->x), free(R->y_cuda), free(R->y_cpu), free(R->g_cuda), free(R->i_cuda), free(R->i_cpu);
  free(R->down), free(R->up);
  memset(R, 0, sizeof *R);
}

/* Both layers of `config` with peer_layer_init(seed), T tokens of x drawn
 * from `seed`, and their forwards (the CUDA one on device 0).  0 on
 * success, else 1 with the reason in err. */
static inline int ref_make(shard_ref *R, const char *config, int64_t T, uint64_t seed, char *err,
                           size_t n) {
  memset(R, 0, sizeof *R);
  peer_config_default(&R->cfg);
  if (peer_config_parse(&R->cfg, config)) {
    snprintf(err, n, "%s: %s", config, peer_last_error());
    return 1;
  }
  const int64_t d = R->cfg.d_model, hk = R->cfg.n_heads * R->cfg.top_k;
  R->T = T;
  R->x = malloc((size_t)(T * d) * 4), R->y_cuda = malloc((size_t)(T * d) * 4);
  R->y_cpu = malloc((size_t)(T * d) * 4), R->g_cuda = malloc((size_t)(T * hk) * 4);
  R->i_cuda = malloc((size_t)(T * hk) * 8), R->i_cpu = malloc((size_t)(T * hk) * 8);
  uint64_t s = seed | 1;
  ref_fill(R->x, T * d, 1.0f, &s);
  peer_options o;
  peer_options_default(&o);
  peer_layer *cpu = NULL, *gpu = NULL;
  peer_tensor down, up;
  int bad = peer_layer_create(&cpu, &R->cfg, &o) != PEER_OK;
  o.backend = PEER_BACKEND_CUDA;
  bad = bad || peer_layer_create(&gpu, &R->cfg, &o) || peer_layer_init(cpu, seed) ||
        peer_layer_init(gpu, seed) || peer_forward(cpu, T, R->x, R->y_cpu, R->i_cpu, NULL) ||
        peer_forward(gpu, T, R->x, R->y_cuda, R->i_cuda, R->g_cuda) ||
        peer_layer_param_by_name(gpu, "experts.down", &down) ||
        peer_layer_param_by_name(gpu, "experts.up", &up);
  if (bad) snprintf(err, n, "%s: unsharded layers: %s", config, peer_last_error());
  if (!bad && (!(R->down = ref_download_f32(&down)) || !(R->up = ref_download_f32(&up)))) {
    snprintf(err, n, "%s: copying the expert tables failed", config);
    bad = 1;
  }
  peer_layer_free(cpu);
  peer_layer_free(gpu);
  return bad;
}

/* A rank's forward (host copies of y, ids, gates) against the references:
 * ids and gates the unsharded CUDA layer's bits, y within REF_SHARD_TOL of
 * its y, and within REF_Y_TOL of the CPU's on the tokens where the CPU
 * chose the same ids (at least half of them).  0 if all hold, else 1 with
 * the first that does not in err. */
static inline int ref_check_forward(const shard_ref *R, const float *y, const int64_t *ids,
                                    const float *gates, char *err, size_t n) {
  const int64_t T = R->T, d = R->cfg.d_model, hk = R->cfg.n_heads * R->cfg.top_k;
  if (memcmp(ids, R->i_cuda, (size_t)(T * hk) * 8) || memcmp(gates, R->g_cuda, (size_t)(T * hk) * 4)) {
    snprintf(err, n, "ids or gates differ from the unsharded CUDA layer's");
    return 1;
  }
  double e = ref_rel(y, d, R->y_cuda, d, 0, T, d, NULL);
  if (!(e <= REF_SHARD_TOL)) {
    snprintf(err, n, "y differs from the unsharded CUDA layer's by %.3g", e);
    return 1;
  }
  char *same = calloc((size_t)T + 1, 1);
  int64_t n_same = 0;
  for (int64_t t = 0; t < T; t++)
    n_same += same[t] = !memcmp(ids + t * hk, R->i_cpu + t * hk, (size_t)hk * 8);
  e = ref_rel(y, d, R->y_cpu, d, 0, T, d, same);
  free(same);
  if (n_same < T / 2 || !(e <= REF_Y_TOL)) {
    snprintf(err, n, "against the CPU: %lld of %lld tokens with its ids, y differs by %.3g",
             (long long)n_same, (long long)T, e);
    return 1;
  }
  return 0;
}

/* The shard's columns of a sliced expert table against the full one's
 * (R->down or R->up); 1 if they differ. */
static inline int ref_columns_differ(peer_cuda_shard *S, const char *name, const float *full,
                                     const shard_ref *R) {
  const int64_t N = R->cfg.n_subkeys * R->cfg.n_subkeys, d = R->cfg.d_model;
  int64_t c0, cols;
  peer_cuda_shard_columns(S, &c0, &cols);
  peer_tensor t;
  if (peer_cuda_shard_param_by_name(S, name, &t) || t.shape[0] != N || t.shape[1] != cols) return 1;
  float *mine = ref_download_f32(&t);
  int differ = !mine;
  for (int64_t i = 0; i < N && !differ; i++)
    differ = memcmp(mine + i * cols, full + i * d + c0, (size_t)cols * 4) != 0;
  free(mine);
  return differ;
}

/* ---- training ----
 * ref_train_rank: each rank trains its shard next to an unsharded CUDA layer
 * of its own (the
 * same seed, batches and optimizer) and compares after every backward: y,
 * dx and the dense gradients (replicated) and the expert gradient rows (the
 * rank's columns; the same row list) within REF_TRAIN_TOL relative.  Both are
 * then stepped with the unsharded layer's gradients (the shard with its
 * columns), as tests/test_shard.c does: the same rules on the same values,
 * so parameters and optimizer state stay the same bits on any world (the
 * optimizer on a slice is elementwise), which the test checks after every
 * step, and the next step's forward starts from equal weights.  At the end
 * every rank saves its shard file and the unsharded layer's checkpoint;
 * peer_shard_merge of the shard files must give the checkpoint's tensors bit
 * for bit.  A fresh shard then loads the checkpoint (load_full) and its own
 * shard file (load): equal bits again. */
#define REF_TRAIN_TOL 1e-6
#define REF_TRAIN_STEPS 3
#define REF_MAXW 8

typedef struct ref_train_case {
  const char *config;
  peer_optim_kind kind, expert_kind;
  int dense_experts; /* expert gradients added into [N, d/P] buffers */
} ref_train_case;

/* A rank's failed checks: counted, the first one's text kept. */
typedef struct ref_failures {
  int count;
  char *err;
  size_t n;
} ref_failures;

#define REF_FAILED(f, ...)                                                                         \
  do {                                                                                             \
    if ((f)->count++ == 0) snprintf((f)->err, (f)->n, __VA_ARGS__);                                \
  } while (0)

static inline void *ref_dzalloc(size_t bytes) {
  void *p = NULL;
  if (cudaMalloc(&p, bytes + 4) != cudaSuccess) return NULL;
  cudaMemset(p, 0, bytes + 4);
  return p;
}

static inline float *ref_host_f32(const void *d, size_t n) {
  float *h = malloc(n * 4 + 4);
  cudaMemcpy(h, d, n * 4, cudaMemcpyDeviceToHost);
  return h;
}

/* Gradient buffers on the device: dense ones in full, expert rows `width`
 * wide (sparse [T*hk, width] or dense [N, width]). */
typedef struct ref_grads {
  peer_grads g;
  int64_t *n_rows;
} ref_grads;

static inline ref_grads ref_grads_new(const peer_config *c, int64_t T, int64_t width, int dense) {
  const int64_t d = c->d_model, dq = c->n_heads * c->d_key, hk = c->n_heads * c->top_k;
  const int64_t nk = (c->shared_keys ? 1 : c->n_heads) * c->n_subkeys * c->d_key;
  const int64_t N = c->n_subkeys * c->n_subkeys, rows = dense ? N : T * hk;
  ref_grads r = {0};
  r.g.query_weight = ref_dzalloc((size_t)(dq * d) * 4);
  r.g.keys = ref_dzalloc((size_t)nk * 4);
  if (c->query_bias) r.g.query_bias = ref_dzalloc((size_t)dq * 4);
  if (c->query_norm == PEER_NORM_BATCHNORM)
    r.g.norm_weight = ref_dzalloc((size_t)dq * 4), r.g.norm_bias = ref_dzalloc((size_t)dq * 4);
  r.g.expert_capacity = T * hk;
  r.g.experts_dense = dense;
  r.g.expert_rows = ref_dzalloc((size_t)(T * hk) * 8);
  r.g.experts_down = ref_dzalloc((size_t)(rows * width) * 4);
  r.g.experts_up = ref_dzalloc((size_t)(rows * width) * 4);
  r.n_rows = ref_dzalloc(8);
  return r;
}

static inline void ref_grads_free(ref_grads *r) {
  cudaFree(r->g.query_weight), cudaFree(r->g.keys), cudaFree(r->g.query_bias);
  cudaFree(r->g.norm_weight), cudaFree(r->g.norm_bias), cudaFree(r->g.expert_rows);
  cudaFree(r->g.experts_down), cudaFree(r->g.experts_up), cudaFree(r->n_rows);
}

/* The shard's gradients (a) against the unsharded ones (b); the first
 * quantity that differs by more than REF_TRAIN_TOL, or NULL. */
static inline const char *ref_grads_differ(const peer_config *c, const ref_grads *a, const ref_grads *b, int64_t c0,
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
    float *ha = ref_host_f32(dense[i].pa, n), *hb = ref_host_f32(dense[i].pb, n);
    double diff = 0, scale = i == 2 && c->query_norm == PEER_NORM_BATCHNORM ? wq_scale : 0;
    for (size_t k = 0; k < n; k++) {
      diff = fmax(diff, isnan(ha[k] - hb[k]) ? INFINITY : fabs((double)ha[k] - hb[k]));
      scale = fmax(scale, fabs(hb[k]));
    }
    if (i == 0) wq_scale = scale;
    *err = scale > 0 ? diff / scale : diff;
    free(ha), free(hb);
    if (!(*err <= REF_TRAIN_TOL)) return dense[i].name;
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
    float *ha = ref_host_f32(ta[i], (size_t)(rows * cols)), *hb = ref_host_f32(tb[i], (size_t)(rows * d));
    *err = ref_rel(ha, cols, hb, d, c0, rows, cols, NULL);
    free(ha), free(hb);
    if (!(*err <= REF_TRAIN_TOL)) bad = i ? "experts_up" : "experts_down";
  }
  free(ra), free(rb);
  return bad;
}

/* Step the shard with the unsharded gradients b: dense ones as they are,
 * expert rows as this rank's columns (into a's buffers). */
static inline peer_status ref_step_with(peer_optimizer *o, const peer_config *c, ref_grads *a, const ref_grads *b,
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
static inline const char *ref_state_differs(peer_cuda_shard *S, peer_optimizer *oa, peer_layer *F,
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

static inline peer_optim_config ref_train_optim(const ref_train_case *tc) {
  peer_optim_config oc = peer_optim_config_default();
  oc.kind = tc->kind, oc.expert_kind = tc->expert_kind;
  oc.lr = 0.05f, oc.expert_lr = 0.2f;
  if (tc->kind == PEER_OPTIM_SGD) oc.momentum = 0.9f;
  return oc;
}

static inline int ref_train_rank(const peer_cuda_comm *comm_in, int device,
                                 const ref_train_case *tc, const char *dir, char *err, size_t n) {
  ref_failures fl = {0, err, n};
  err[0] = '\0';
  peer_cuda_comm comm = *comm_in;
  const int rank = comm.rank, world = comm.world;
  peer_config c;
  peer_config_default(&c);
  peer_config_parse(&c, tc->config);
  peer_options o;
  peer_options_default(&o);
  o.backend = PEER_BACKEND_CUDA, o.device = device;
  peer_cuda_shard *S = NULL;
  peer_layer *F = NULL;
  if (peer_cuda_shard_create(&S, &c, &o, &comm) || peer_layer_create(&F, &c, &o) ||
      peer_cuda_shard_init(S, 11) || peer_layer_init(F, 11)) {
    REF_FAILED(&fl, "rank %d: create: %s", rank, peer_last_error());
    peer_cuda_shard_free(S), peer_layer_free(F);
    return fl.count;
  }
  int64_t c0, cols;
  peer_cuda_shard_columns(S, &c0, &cols);
  const int64_t T = 17, d = c.d_model;
  const size_t xb = (size_t)(T * d) * 4;
  cudaStream_t s;
  cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking);
  float *x = malloc(xb), *dy = malloc(xb);
  float *d_x = ref_dzalloc(xb), *d_dy = ref_dzalloc(xb), *d_ya = ref_dzalloc(xb), *d_yb = ref_dzalloc(xb);
  float *d_dxa = ref_dzalloc(xb), *d_dxb = ref_dzalloc(xb);
  ref_grads ga = ref_grads_new(&c, T, cols, tc->dense_experts);
  ref_grads gb = ref_grads_new(&c, T, d, tc->dense_experts);
  peer_context *ca = NULL, *cb = NULL;
  peer_optimizer *oa = NULL, *ob = NULL;
  const peer_optim_config oc = ref_train_optim(tc);
  if (peer_cuda_shard_context_create(&ca, S, T) || peer_context_create(&cb, F, T) ||
      peer_cuda_shard_optimizer_create(&oa, S, &oc) || peer_optimizer_create(&ob, F, &oc))
    REF_FAILED(&fl, "rank %d: context or optimizer: %s", rank, peer_last_error());
  uint64_t seed = 0x9e3779b97f4a7c15ull;
  /* A failed check never leaves the loop early: the ranks' collectives
   * must stay in step (a rank that went on alone would wait forever). */
  for (int step = 0; step < REF_TRAIN_STEPS; step++) {
    ref_fill(x, T * d, 1.0f, &seed);
    ref_fill(dy, T * d, 0.1f, &seed);
    cudaMemcpy(d_x, x, xb, cudaMemcpyHostToDevice);
    cudaMemcpy(d_dy, dy, xb, cudaMemcpyHostToDevice);
    if (peer_cuda_shard_forward_train(S, ca, T, d_x, d_ya, s) ||
        peer_cuda_forward_train(F, cb, T, d_x, d_yb, s) ||
        peer_cuda_shard_backward(S, ca, d_dy, d_dxa, &ga.g, ga.n_rows, s) ||
        peer_cuda_backward(F, cb, d_dy, d_dxb, &gb.g, gb.n_rows, s) ||
        peer_cuda_shard_check(S, s) || peer_cuda_check(F, s))
      REF_FAILED(&fl, "rank %d, step %d: training call: %s", rank, step, peer_last_error());
    float *ya = ref_host_f32(d_ya, (size_t)(T * d)), *yb = ref_host_f32(d_yb, (size_t)(T * d));
    float *dxa = ref_host_f32(d_dxa, (size_t)(T * d)), *dxb = ref_host_f32(d_dxb, (size_t)(T * d));
    double ey = ref_rel(ya, d, yb, d, 0, T, d, NULL), edx = ref_rel(dxa, d, dxb, d, 0, T, d, NULL);
    double eg = 0;
    free(ya), free(yb), free(dxa), free(dxb);
    const char *bad = ref_grads_differ(&c, &ga, &gb, c0, cols, &eg);
    if (!(ey <= REF_TRAIN_TOL) || !(edx <= REF_TRAIN_TOL) || bad)
      REF_FAILED(&fl, "rank %d of %d, step %d: y differs by %.3g, dx by %.3g; %s by %.3g", rank, world,
             step, ey, edx, bad ? bad : "gradients agree", eg);
    if (ref_step_with(oa, &c, &ga, &gb, c0, cols, s) || peer_cuda_optimizer_step(ob, &gb.g, gb.n_rows, s) ||
        peer_cuda_shard_check(S, s) || peer_cuda_check(F, s))
      REF_FAILED(&fl, "rank %d, step %d: optimizer: %s", rank, step, peer_last_error());
    else if ((bad = ref_state_differs(S, oa, F, ob)))
      REF_FAILED(&fl, "rank %d, step %d: after the optimizer step %s differs", rank, step, bad);
  }
  /* files: this rank's shard file and its unsharded twin's checkpoint */
  char mine[64], full[64];
  snprintf(mine, sizeof mine, "shard-%d-of-%d.safetensors", rank, world);
  snprintf(full, sizeof full, "full-%d-of-%d.safetensors", rank, world);
  char shard_path[512], full_path[512];
  snprintf(shard_path, sizeof shard_path, "%s/%s", dir, mine);
  snprintf(full_path, sizeof full_path, "%s/%s", dir, full);
  if (peer_cuda_shard_save(S, oa, shard_path) || peer_checkpoint_save(F, ob, full_path))
    REF_FAILED(&fl, "rank %d: save: %s", rank, peer_last_error());
  /* a fresh shard of the same group: the unsharded checkpoint, then its own file */
  peer_cuda_shard *S2 = NULL;
  peer_optimizer *o2 = NULL;
  const char *bad = NULL;
  if (peer_cuda_shard_create(&S2, &c, &o, &comm) || peer_cuda_shard_optimizer_create(&o2, S2, &oc))
    REF_FAILED(&fl, "rank %d: second shard: %s", rank, peer_last_error());
  else if (peer_cuda_shard_load_full(S2, o2, full_path))
    REF_FAILED(&fl, "rank %d: load_full: %s", rank, peer_last_error());
  else if ((bad = ref_state_differs(S2, o2, F, ob)) ||
           peer_optimizer_step_count(o2) != REF_TRAIN_STEPS)
    REF_FAILED(&fl, "rank %d: after load_full %s differs", rank, bad ? bad : "the step count");
  else if (peer_cuda_shard_init(S2, 99) || peer_cuda_shard_load(S2, o2, shard_path))
    REF_FAILED(&fl, "rank %d: load: %s", rank, peer_last_error());
  else if ((bad = ref_state_differs(S2, o2, F, ob)) || peer_optimizer_step_count(o2) != REF_TRAIN_STEPS)
    REF_FAILED(&fl, "rank %d: after load %s differs", rank, bad ? bad : "the step count");
  else if (peer_cuda_shard_load(S2, o2, full_path) != PEER_ERR_FORMAT ||
           !strstr(peer_last_error(), "not a shard file"))
    REF_FAILED(&fl, "rank %d: loading an unsharded file as a shard file: %s", rank, peer_last_error());
  else if (peer_cuda_shard_load_full(S2, o2, shard_path) != PEER_ERR_FORMAT)
    REF_FAILED(&fl, "rank %d: load_full of a shard file was not refused", rank);
  else if (peer_cuda_shard_save(S2, ob, shard_path) != PEER_ERR_INVALID_ARGUMENT)
    REF_FAILED(&fl, "rank %d: another layer's optimizer was not refused", rank);
  peer_optimizer_free(o2);
  peer_cuda_shard_free(S2);
  cudaStreamSynchronize(s);
  cudaStreamDestroy(s);
  ref_grads_free(&ga), ref_grads_free(&gb);
  cudaFree(d_x), cudaFree(d_dy), cudaFree(d_ya), cudaFree(d_yb), cudaFree(d_dxa), cudaFree(d_dxb);
  free(x), free(dy);
  peer_context_free(ca), peer_context_free(cb);
  peer_optimizer_free(oa), peer_optimizer_free(ob);
  peer_layer_free(F);
  peer_cuda_shard_free(S);
  return fl.count;
}


/* peer_shard_merge of the world shard files ref_train_rank wrote in dir
 * against rank 0's unsharded checkpoint there: the same tensors, bit for
 * bit (optimizer state among them), and the same config and step.  0 if so,
 * else 1 with the reason in err. */
static inline int ref_check_merged(const char *dir, int world, char *err, size_t n) {
  char bufs[REF_MAXW][512], merged[512], full[512];
  const char *paths[REF_MAXW];
  for (int r = 0; r < world; r++) {
    snprintf(bufs[r], sizeof bufs[r], "%s/shard-%d-of-%d.safetensors", dir, r, world);
    paths[r] = bufs[r];
  }
  snprintf(merged, sizeof merged, "%s/merged-of-%d.safetensors", dir, world);
  snprintf(full, sizeof full, "%s/full-0-of-%d.safetensors", dir, world);
  if (peer_shard_merge(paths, world, merged)) {
    snprintf(err, n, "merge: %s", peer_last_error());
    return 1;
  }
  peer_safetensors *a = NULL, *b = NULL;
  int bad = peer_safetensors_open(&a, merged) || peer_safetensors_open(&b, full);
  if (bad) snprintf(err, n, "open: %s", peer_last_error());
  if (!bad && peer_safetensors_count(a) != peer_safetensors_count(b)) {
    snprintf(err, n, "%d merged tensors, %d in the checkpoint", peer_safetensors_count(a),
             peer_safetensors_count(b));
    bad = 1;
  }
  int states = 0;
  for (int i = 0; !bad && i < peer_safetensors_count(b); i++) {
    peer_tensor tb, ta;
    if (peer_safetensors_info(b, i, &tb) || peer_safetensors_find(a, tb.name, &ta) ||
        ta.nbytes != tb.nbytes || ta.dtype != tb.dtype || ta.shape[1] != tb.shape[1]) {
      snprintf(err, n, "%s is missing from the merged file or shaped otherwise", tb.name);
      bad = 1;
      break;
    }
    states += !strncmp(tb.name, "optim.", 6);
    void *da = malloc(ta.nbytes + 1), *db = malloc(tb.nbytes + 1);
    if (peer_safetensors_read(a, ta.name, da, ta.nbytes) ||
        peer_safetensors_read(b, tb.name, db, tb.nbytes) || memcmp(da, db, ta.nbytes)) {
      snprintf(err, n, "world %d: merged %s differs from the checkpoint's", world, tb.name);
      bad = 1;
    }
    free(da), free(db);
  }
  if (!bad && states == 0) snprintf(err, n, "the checkpoint holds no optimizer state"), bad = 1;
  const char *keys[] = {"peer.step", "peer.optim.lr", "peer.d_model", "peer.weight_dtype"};
  for (int i = 0; !bad && i < 4; i++) {
    const char *sa = peer_safetensors_metadata(a, keys[i]);
    const char *sb = peer_safetensors_metadata(b, keys[i]);
    if (!sa || !sb || strcmp(sa, sb)) {
      snprintf(err, n, "%s: %s vs %s", keys[i], sa ? sa : "-", sb ? sb : "-");
      bad = 1;
    }
  }
  peer_safetensors_close(a), peer_safetensors_close(b);
  return bad;
}

#endif
