/* demo.c: `peer demo`, the run tools/run shows: a million-expert layer built
 * in memory, timed, and checked against brute force. */
#include "cli.h"

#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static const char usage_demo[] =
    "usage: peer demo [--n-subkeys n] [--tokens T] [--threads N] [--dtype f32|bf16]\n"
    "                 [--check-tokens C] [--repeats R] [--seed S]\n"
    "\n"
    "Build a layer in memory (default: d_model 512, 8 heads, d_key 256,\n"
    "n_subkeys 1024 = 1,048,576 experts, top_k 16), run a random batch through\n"
    "it and time the forward and the retrieval; then retrieve C tokens by brute\n"
    "force and check that product keys find the same experts (exit 1 if not).\n"
    "\n"
    "  --n-subkeys n     sub-keys per half, N = n^2 experts (default 1024)\n"
    "  --tokens T        batch size (default 512)\n"
    "  --dtype f32|bf16  storage of the expert tables (default f32)\n"
    "  --check-tokens C  tokens checked against brute force (default 32)\n"
    "  --repeats R       timed runs; the median is reported (default 10)\n"
    "  --seed S          seed of the weights and tokens (default 1)\n"
    "  --threads N       CPU threads (default: OpenMP's choice)\n";

/* Median seconds of `repeats` calls after one warm-up; -1 after a failure
 * (reported). */
typedef enum { RUN_FORWARD, RUN_RETRIEVE } run_kind;

static double time_runs(peer_layer *layer, run_kind kind, int64_t T, const float *x, float *y,
                        int64_t *ids, float *scores, int repeats) {
  double times[64];
  for (int r = 0; r <= repeats; r++) {
    double t0 = now_seconds();
    peer_status st = kind == RUN_FORWARD ? peer_forward(layer, T, x, y, NULL, NULL)
                                         : peer_retrieve(layer, T, x, ids, scores, NULL);
    double t = now_seconds() - t0;
    if (st) {
      lib_fail(st, kind == RUN_FORWARD ? "forward failed" : "retrieval failed");
      return -1.0;
    }
    if (r) times[r - 1] = t;
  }
  return median(times, repeats);
}

int cmd_demo(int argc, char **argv) {
  cli_opt opts[] = {{"n-subkeys", true, NULL},    {"tokens", true, NULL},
                    {"threads", true, NULL},      {"dtype", true, NULL},
                    {"check-tokens", true, NULL}, {"repeats", true, NULL},
                    {"seed", true, NULL}};
  int n_pos, rc = parse_options(argc, argv, opts, 7, NULL, 0, &n_pos);
  if (rc == PARSE_HELP) return fputs(usage_demo, stdout), 0;
  if (rc) return rc;
  int64_t n = 1024, T = 512, C = 32, repeats = 10;
  uint64_t seed = 1;
  int n_threads;
  peer_config cfg;
  peer_config_default(&cfg);
  if (opts[0].value && (rc = parse_int("n-subkeys", opts[0].value, 1, 65536, &n))) return rc;
  if (opts[1].value && (rc = parse_int("tokens", opts[1].value, 1, 1 << 20, &T))) return rc;
  if ((rc = parse_threads(opts[2].value, &n_threads))) return rc;
  if (opts[3].value) {
    if (strcmp(opts[3].value, "f32") == 0)
      cfg.weight_dtype = PEER_F32;
    else if (strcmp(opts[3].value, "bf16") == 0)
      cfg.weight_dtype = PEER_BF16;
    else
      return usage_error("--dtype: '%s' is not f32 or bf16", opts[3].value);
  }
  if (opts[4].value && (rc = parse_int("check-tokens", opts[4].value, 1, 1 << 20, &C))) return rc;
  if (opts[5].value && (rc = parse_int("repeats", opts[5].value, 1, 64, &repeats))) return rc;
  if (opts[6].value && (rc = parse_seed("seed", opts[6].value, &seed))) return rc;
  if (C > T)
    return usage_error("--check-tokens %lld exceeds --tokens %lld", (long long)C, (long long)T);
  cfg.n_subkeys = n;
  if (peer_config_validate(&cfg))
    return usage_error("--n-subkeys %lld: %s", (long long)n, peer_last_error());

  const int64_t d = cfg.d_model, H = cfg.n_heads, k = cfg.top_k;
  const int64_t N = peer_config_n_experts(&cfg);
  const int threads = threads_used(n_threads);
  char text[512], b1[32], b2[32];
  peer_config_format(&cfg, text, sizeof text);
  printf("== peer %s demo: PEER layer with %lld experts\n", peer_version_string(), (long long)N);
  printf("config: %s\n", text);

  peer_layer *layer = NULL;
  float *x = NULL, *y = NULL;
  retrieval_buf pk = {0}, pkc = {0}, bf = {0};
  double t0 = now_seconds();
  if ((rc = create_layer(&cfg, n_threads, &layer))) return rc;
  peer_status st = peer_layer_init(layer, seed);
  double t_init = now_seconds() - t0;
  if (st) {
    rc = lib_fail(st, "cannot initialise layer");
    goto done;
  }
  double table_bytes = 2.0 * (double)N * (double)d * (double)peer_dtype_size(cfg.weight_dtype);
  printf("parameters: %lld total, %lld active per token\n",
         (long long)peer_layer_n_parameters(layer),
         (long long)peer_layer_n_active_parameters(layer));
  printf("init: %.2f s (expert tables %s, threads: %d)\n", t_init,
         format_bytes(table_bytes, b1, sizeof b1), threads);

  x = alloc_array((size_t)(T * d), sizeof *x);
  y = alloc_array((size_t)(T * d), sizeof *y);
  if (!x || !y || !retrieval_alloc(&pk, T * H * k) || !retrieval_alloc(&pkc, C * H * k) ||
      !retrieval_alloc(&bf, C * H * k)) {
    rc = fail("cannot allocate buffers for %lld tokens", (long long)T);
    goto done;
  }
  fill_gaussian(x, (size_t)(T * d), seed ^ 0x5eedull);

  token_cost cost = cost_per_token(&cfg);
  printf("cost per token: %.2f M multiply-adds, %s of random expert-row reads\n",
         1e-6 * (double)cost.total, format_bytes((double)cost.expert_bytes, b1, sizeof b1));

  double t_fwd = time_runs(layer, RUN_FORWARD, T, x, y, NULL, NULL, (int)repeats);
  if (t_fwd < 0) {
    rc = EXIT_FAILURE;
    goto done;
  }
  printf("forward:   batch of %lld tokens: %.3f ms/batch, %.0f tokens/s "
         "(median of %lld, threads: %d; %.2f GB/s of expert rows over the whole forward)\n",
         (long long)T, 1e3 * t_fwd, (double)T / t_fwd, (long long)repeats, threads,
         1e-9 * (double)T * (double)cost.expert_bytes / t_fwd);

  double t_ret = time_runs(layer, RUN_RETRIEVE, T, x, NULL, pk.ids, pk.scores, (int)repeats);
  if (t_ret < 0) {
    rc = EXIT_FAILURE;
    goto done;
  }
  printf("retrieval: batch of %lld tokens: %.3f ms/batch, %.0f tokens/s (median of %lld)\n",
         (long long)T, 1e3 * t_ret, (double)T / t_ret, (long long)repeats);

  /* Brute force on the first C tokens, against product keys on the same ones. */
  double t_pkc = time_runs(layer, RUN_RETRIEVE, C, x, NULL, pkc.ids, pkc.scores, (int)repeats);
  if (t_pkc < 0) {
    rc = EXIT_FAILURE;
    goto done;
  }
  t0 = now_seconds();
  if ((st = peer_retrieve_brute(layer, C, x, bf.ids, bf.scores, NULL))) {
    rc = lib_fail(st, "brute-force retrieval failed");
    goto done;
  }
  double t_bf = now_seconds() - t0;
  printf("brute force: %lld tokens: %.3f ms/token (all %lld experts scored per head); "
         "product keys: %.3f ms/token; speed-up %.0fx\n",
         (long long)C, 1e3 * t_bf / (double)C, (long long)N, 1e3 * t_pkc / (double)C, t_bf / t_pkc);

  agreement a = compare_retrievals(C * H, k, pkc.ids, pkc.scores, bf.ids, bf.scores);
  /* The C-token retrieval must also agree with the same tokens in the batch. */
  int64_t batch_mismatch = 0;
  for (int64_t e = 0; e < C * H * k; e++)
    batch_mismatch += pk.ids[e] != pkc.ids[e];
  printf("agreement: %lld / %lld (token, head) id lists identical to brute force (%.2f%%), "
         "max |score difference| %.3g\n",
         (long long)a.identical, (long long)a.lists, 100.0 * (double)a.identical / (double)a.lists,
         a.max_score_diff);

  printf("summary: %lld experts (%s of expert tables), %lld of them used per token; "
         "%.0f tokens/s forward, %.0f tokens/s retrieval, threads: %d; product keys "
         "%.0fx faster than brute force and %s\n",
         (long long)N, format_bytes(table_bytes, b2, sizeof b2), (long long)(H * k),
         (double)T / t_fwd, (double)T / t_ret, threads, t_bf / t_pkc,
         a.identical == a.lists ? "exact on every checked token" : "NOT EXACT");
  if (a.identical != a.lists)
    rc = fail("%lld of %lld (token, head) lists differ from brute force",
              (long long)(a.lists - a.identical), (long long)a.lists);
  else if (batch_mismatch)
    rc = fail("retrieval of %lld tokens alone differs from the same tokens in a batch of %lld",
              (long long)C, (long long)T);
done:
  free(x);
  free(y);
  retrieval_free(&pk);
  retrieval_free(&pkc);
  retrieval_free(&bf);
  peer_layer_free(layer);
  return rc;
}
