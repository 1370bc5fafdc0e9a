/* cpu_dispatch.c: the CPU backend's choice of instruction-set variant.  The
 * variants of cpu.c and cpu_train.c (cpu.h) are all linked in; the first
 * layer created picks one for the whole process: the best this CPU runs, or
 * the one the environment variable PEER_CPU names (for tests and
 * comparisons).  The backend table the core sees (peer_backend_cpu) only opens
 * a layer: it hands the layer the chosen variant's table, so later calls cost
 * nothing extra.  Built without PEER_CPU_VARIANT: the plain names of cpu.h
 * are defined here, forwarding to the chosen variant. */
#include "cpu.h"

#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* Each variant built (CMakeLists.txt defines PEER_CPU_HAVE_<variant>) and
 * whether this CPU has what its compiler flags (PEER_CPU_FLAGS_<variant>)
 * assume, asked as __builtin_cpu_supports names.  generic assumes nothing;
 * native was built for this machine. */
#ifdef PEER_CPU_HAVE_AVX512
extern const peer_cpu_impl peer_cpu_variant_avx512;
static bool runs_avx512(void) {
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
         __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
         __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
}
#endif
#ifdef PEER_CPU_HAVE_AVX512BF16
extern const peer_cpu_impl peer_cpu_variant_avx512bf16;
static bool runs_avx512bf16(void) {
  return runs_avx512() && __builtin_cpu_supports("avx512bf16") &&
         __builtin_cpu_supports("avx512vnni");
}
#endif
#ifdef PEER_CPU_HAVE_AVX2
extern const peer_cpu_impl peer_cpu_variant_avx2;
static bool runs_avx2(void) {
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
}
#endif
#ifdef PEER_CPU_HAVE_GENERIC
extern const peer_cpu_impl peer_cpu_variant_generic;
#endif
#ifdef PEER_CPU_HAVE_NATIVE
extern const peer_cpu_impl peer_cpu_variant_native;
#endif
#if defined(PEER_CPU_HAVE_GENERIC) || defined(PEER_CPU_HAVE_NATIVE)
static bool runs_always(void) { return true; }
#endif

typedef struct variant {
  const peer_cpu_impl *impl;
  const char *needs;
  bool (*runs)(void);
} variant;

/* Best first. */
static const variant variants[] = {
#ifdef PEER_CPU_HAVE_NATIVE
    {&peer_cpu_variant_native, "", runs_always},
#endif
#ifdef PEER_CPU_HAVE_AVX512BF16
    {&peer_cpu_variant_avx512bf16, "avx512f, avx512dq, avx512bw, avx512vl, avx2, fma, avx512bf16, avx512vnni",
     runs_avx512bf16},
#endif
#ifdef PEER_CPU_HAVE_AVX512
    {&peer_cpu_variant_avx512, "avx512f, avx512dq, avx512bw, avx512vl, avx2, fma", runs_avx512},
#endif
#ifdef PEER_CPU_HAVE_AVX2
    {&peer_cpu_variant_avx2, "avx2, fma", runs_avx2},
#endif
#ifdef PEER_CPU_HAVE_GENERIC
    {&peer_cpu_variant_generic, "", runs_always},
#endif
};
enum { N_VARIANTS = sizeof variants / sizeof variants[0] };

static pthread_once_t chosen_once = PTHREAD_ONCE_INIT;
static const peer_cpu_impl *chosen;
static char refusal[256];

static void choose(void) {
  const char *want = getenv("PEER_CPU");
  bool any = !want || !*want || !strcmp(want, "auto");
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
#endif
  for (int i = 0; i < N_VARIANTS; i++) {
    const variant *v = &variants[i];
    if (!any && strcmp(want, v->impl->name)) continue;
    if (v->runs()) {
      chosen = v->impl;
      return;
    }
    if (!any) {
      snprintf(refusal, sizeof refusal, "PEER_CPU=%s: this CPU lacks some of %s", want, v->needs);
      return;
    }
  }
  if (any) {
    snprintf(refusal, sizeof refusal, "CPU backend: this CPU runs none of its variants");
    return;
  }
  size_t len = (size_t)snprintf(refusal, sizeof refusal,
                                "PEER_CPU=%.40s: not a variant of this build (auto", want);
  for (int i = 0; i < N_VARIANTS && len < sizeof refusal; i++)
    len += (size_t)snprintf(refusal + len, sizeof refusal - len, ", %s", variants[i].impl->name);
  if (len < sizeof refusal) snprintf(refusal + len, sizeof refusal - len, ")");
}

const peer_cpu_impl *peer_cpu_select(void) {
  pthread_once(&chosen_once, choose);
  if (!chosen) peer_fail(PEER_ERR_UNSUPPORTED, "%s", refusal);
  return chosen;
}

static peer_status cpu_open(peer_layer *layer) {
  const peer_cpu_impl *impl = peer_cpu_select();
  if (!impl) return PEER_ERR_UNSUPPORTED;
  layer->backend = impl->backend;
  return PEER_OK;
}

/* Only open is ever called through this table: it replaces itself. */
const peer_backend_i peer_backend_cpu = {
    .name = "cpu",
    .alloc = peer_alloc,
    .free = peer_free,
    .open = cpu_open,
};

/* ------------------------------------------- plain names, for bench_pieces */

/* Callers reach these only with a layer, so a variant has been chosen. */
static const peer_cpu_impl *chosen_impl(void) { return peer_cpu_select(); }

void peer_cpu_gemm_nt(int64_t M, int64_t N, int64_t K, const float *A, int64_t lda, const float *B,
                      int64_t ldb, float *C, int64_t ldc, float *pack) {
  chosen_impl()->gemm_nt(M, N, K, A, lda, B, ldb, C, ldc, pack);
}

void peer_cpu_layout(const peer_layer *layer, int64_t T, void *base, cpu_ws *w) {
  chosen_impl()->layout(layer, T, base, w);
}

float *peer_cpu_thread_pack(const cpu_ws *w, const peer_dims *D) {
  return chosen_impl()->thread_pack(w, D);
}

int peer_cpu_topk_scan(const float *s, int n, int kp, float *out_s, int64_t *out_id) {
  return chosen_impl()->topk_scan(s, n, kp, out_s, out_id);
}

void peer_cpu_project(const peer_layer *layer, int64_t T, const float *x, float *q, int64_t ldq,
                      const cpu_ws *w, int P) {
  chosen_impl()->project(layer, T, x, q, ldq, w, P);
}

void peer_cpu_apply_experts(const peer_layer *layer, int64_t T, const float *x, float *y,
                            const int64_t *ids, const float *gates, float *z, const cpu_ws *w,
                            int P) {
  chosen_impl()->apply_experts(layer, T, x, y, ids, gates, z, w, P);
}
