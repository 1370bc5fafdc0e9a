/* check.c: `peer check`, product-key retrieval against brute force over
 * random tokens for a weight file. */
#include "cli.h"

#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>

static const char usage_check[] =
    "usage: peer check W.safetensors [--tokens T] [--seed S] [--threads N]\n"
    "\n"
    "Retrieve experts for T random Gaussian tokens (seeded) with product keys\n"
    "and with brute force over all N experts, and compare: the fraction of\n"
    "(token, head) lists with identical ids, the largest score difference and\n"
    "both times.  Exits 1 unless every list is identical.\n"
    "\n"
    "  --tokens T   tokens to check (default 64)\n"
    "  --seed S     seed of the random tokens (default 1)\n"
    "  --threads N  CPU threads (default: OpenMP's choice)\n";

int cmd_check(int argc, char **argv) {
  cli_opt opts[] = {{"tokens", true, NULL}, {"seed", true, NULL}, {"threads", true, NULL}};
  const char *pos[1] = {NULL};
  int n_pos, rc = parse_options(argc, argv, opts, 3, pos, 1, &n_pos);
  if (rc == PARSE_HELP) return fputs(usage_check, stdout), 0;
  if (rc) return rc;
  if (n_pos != 1) return usage_error("expected one weight file (see 'peer check --help')");
  int64_t T = 64;
  uint64_t seed = 1;
  int n_threads;
  if (opts[0].value && (rc = parse_int("tokens", opts[0].value, 1, 1 << 20, &T))) return rc;
  if (opts[1].value && (rc = parse_seed("seed", opts[1].value, &seed))) return rc;
  if ((rc = parse_threads(opts[2].value, &n_threads))) return rc;

  peer_layer *layer = NULL;
  if ((rc = load_layer(pos[0], n_threads, &layer))) return rc;
  const peer_config *cfg = peer_layer_config(layer);
  const int64_t d = cfg->d_model, H = cfg->n_heads, k = cfg->top_k;
  float *x = alloc_array((size_t)(T * d), sizeof *x);
  retrieval_buf pk = {0}, bf = {0};
  if (!x || !retrieval_alloc(&pk, T * H * k) || !retrieval_alloc(&bf, T * H * k)) {
    rc = fail("cannot allocate buffers for %lld tokens", (long long)T);
    goto done;
  }
  fill_gaussian(x, (size_t)(T * d), seed);

  peer_status st;
  double times[3];
  for (int r = 0; r < 4; r++) { /* a warm-up, then three timed runs */
    double t0 = now_seconds();
    if ((st = peer_retrieve(layer, T, x, pk.ids, pk.scores, NULL))) {
      rc = lib_fail(st, "product-key retrieval failed");
      goto done;
    }
    if (r) times[r - 1] = now_seconds() - t0;
  }
  double t_pk = median(times, 3);
  double t0 = now_seconds();
  if ((st = peer_retrieve_brute(layer, T, x, bf.ids, bf.scores, NULL))) {
    rc = lib_fail(st, "brute-force retrieval failed");
    goto done;
  }
  double t_bf = now_seconds() - t0;

  agreement a = compare_retrievals(T * H, k, pk.ids, pk.scores, bf.ids, bf.scores);
  printf("check: %lld tokens x %lld heads, k = %lld, N = %lld experts, threads: %d, seed %llu\n",
         (long long)T, (long long)H, (long long)k, (long long)peer_config_n_experts(cfg),
         threads_used(n_threads), (unsigned long long)seed);
  printf("identical id lists:      %lld / %lld (%.2f%%)\n", (long long)a.identical,
         (long long)a.lists, 100.0 * (double)a.identical / (double)a.lists);
  printf("max |score difference|:  %.3g\n", a.max_score_diff);
  printf("product-key retrieval:   %.3f ms (%.2f us/token, median of 3)\n", 1e3 * t_pk,
         1e6 * t_pk / (double)T);
  printf("brute-force retrieval:   %.3f ms (%.2f us/token)\n", 1e3 * t_bf, 1e6 * t_bf / (double)T);
  printf("product-key speed-up:    %.1fx\n", t_bf / t_pk);
  if (a.identical != a.lists)
    rc = fail("%lld of %lld (token, head) lists differ from brute force",
              (long long)(a.lists - a.identical), (long long)a.lists);
done:
  free(x);
  retrieval_free(&pk);
  retrieval_free(&bf);
  peer_layer_free(layer);
  return rc;
}
