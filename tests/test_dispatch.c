/* test_dispatch.c: the CPU backend's choice of instruction-set variant
 * (peer/cpu_dispatch.c): the best one the CPU runs, or the one PEER_CPU
 * names; a name the build lacks is refused with a message.  tools/test runs
 * the suite once per variant the host runs, with PEER_CPU set, and this test
 * checks each time that the variant named is the one that runs.  Criterion
 * runs every test in a new process, so each makes its own first choice. */
#include <criterion/criterion.h>

#include "cpu.h"
#include "peer.h"

#include <stdlib.h>
#include <string.h>

/* The variant the CPU's features call for, worked out here from the flags
 * the variants are built with (CMakeLists.txt, PEER_CPU_FLAGS_*). */
static const char *best_variant(void) {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
      __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
      __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"))
    return __builtin_cpu_supports("avx512bf16") && __builtin_cpu_supports("avx512vnni")
               ? "avx512bf16"
               : "avx512";
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return "avx2";
#endif
  return "generic";
}

static peer_status create_small_layer(peer_layer **out) {
  peer_config cfg;
  peer_config_default(&cfg);
  cr_assert_eq(peer_config_parse(&cfg, "d_model=16,n_heads=2,d_key=8,n_subkeys=8,top_k=2"), 0);
  return peer_layer_create(out, &cfg, NULL);
}

Test(dispatch, runs_the_variant_named_or_the_best) {
  const char *want = getenv("PEER_CPU");
  peer_layer *layer = NULL;
  peer_status st = create_small_layer(&layer);
  cr_assert_eq(st, PEER_OK, "layer_create with PEER_CPU=%s: %s", want ? want : "(unset)",
               peer_last_error());
  const peer_cpu_impl *impl = peer_cpu_select();
  cr_assert_not_null(impl);
  if (want && *want && strcmp(want, "auto"))
    cr_assert_str_eq(impl->name, want);
  else if (strcmp(impl->name, "native")) /* a PEER_NATIVE build has only native */
    cr_assert_str_eq(impl->name, best_variant());
  float x[16] = {0.5f, -1.0f, 0.25f}, y[16];
  cr_assert_eq(peer_forward(layer, 1, x, y, NULL, NULL), PEER_OK, "%s", peer_last_error());
  peer_layer_free(layer);
}

Test(dispatch, unknown_variant_is_refused_with_the_choices) {
  cr_assert_eq(setenv("PEER_CPU", "sse9", 1), 0);
  peer_layer *layer = NULL;
  cr_assert_eq(create_small_layer(&layer), PEER_ERR_UNSUPPORTED);
  cr_assert_null(layer);
  const char *msg = peer_last_error();
  cr_assert(strstr(msg, "PEER_CPU=sse9") && (strstr(msg, "generic") || strstr(msg, "native")),
            "message: %s", msg);
  /* the choice is made once: a second layer gets the same answer */
  cr_assert_eq(create_small_layer(&layer), PEER_ERR_UNSUPPORTED);
  cr_assert_null(peer_cpu_select());
}
