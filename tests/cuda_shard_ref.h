/* tests/cuda_shard_ref.h: what the CUDA shard tests share
 * (tests/test_cuda_shard.c, in-process ranks on one device;
 * tests/nccl/test_cuda_shard_nccl.c, NCCL ranks on several GPUs): the
 * unsharded references of one batch (a CPU and a CUDA layer initialised
 * with the shards' seed, their y, ids and gates), and the comparison of a
 * rank's results with them.  No test framework: failures are returned as
 * text. */
#ifndef PEER_TESTS_CUDA_SHARD_REF_H
#define PEER_TESTS_CUDA_SHARD_REF_H

#include "peer_cuda.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define REF_Y_TOL 2e-4     /* test_cuda's, against the CPU backend */
#define REF_SHARD_TOL 1e-5 /* against the unsharded CUDA layer: the same terms, other sums */

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
  for (int64_t i = 0; i < T * d; i++) {
    s ^= s << 13, s ^= s >> 7, s ^= s << 17;
    R->x[i] = (float)((double)(s >> 11) / 9007199254740992.0 * 2.0 - 1.0);
  }
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

/* max |a - b| / max |b| over the tokens in `use` (all when NULL). */
static inline double ref_rel_rows(const float *a, const float *b, int64_t T, int64_t d,
                                  const char *use) {
  double diff = 0, scale = 0;
  for (int64_t t = 0; t < T; t++) {
    if (use && !use[t]) continue;
    for (int64_t j = 0; j < d; j++) {
      double u = a[t * d + j], v = b[t * d + j];
      diff = fmax(diff, isnan(u - v) ? INFINITY : fabs(u - v));
      scale = fmax(scale, fabs(v));
    }
  }
  return scale > 0 ? diff / scale : diff;
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
  double e = ref_rel_rows(y, R->y_cuda, T, d, NULL);
  if (!(e <= REF_SHARD_TOL)) {
    snprintf(err, n, "y differs from the unsharded CUDA layer's by %.3g", e);
    return 1;
  }
  char *same = calloc((size_t)T + 1, 1);
  int64_t n_same = 0;
  for (int64_t t = 0; t < T; t++)
    n_same += same[t] = !memcmp(ids + t * hk, R->i_cpu + t * hk, (size_t)hk * 8);
  e = ref_rel_rows(y, R->y_cpu, T, d, same);
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

#endif
