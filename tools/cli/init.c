/* init.c: `peer init`, create a layer from a config, initialise it from a
 * seed and save it. */
#include "cli.h"

#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>

static const char usage_init[] =
    "usage: peer init [--config K=V,...] [--seed S] --out W.safetensors [--threads N]\n"
    "\n"
    "Create a layer from the default config with the given changes, initialise\n"
    "it from the seed (same bits for every thread count) and save it.\n"
    "\n"
    "  --config K=V,...  config changes, PEER.md names (d_model, n_heads, d_key,\n"
    "                    n_subkeys, top_k, subkey_top_k, shared_keys, activation,\n"
    "                    gate, query_norm, query_bias, weight_dtype)\n"
    "  --seed S          initialisation seed (default 0)\n"
    "  --out PATH        weight file to write (safetensors)\n"
    "  --threads N       CPU threads (default: OpenMP's choice)\n"
    "\n"
    "example: peer init --config n_subkeys=256,d_model=256 --seed 1 --out w.safetensors\n";

int cmd_init(int argc, char **argv) {
  cli_opt opts[] = {
      {"config", true, NULL}, {"seed", true, NULL}, {"out", true, NULL}, {"threads", true, NULL}};
  int n_pos, rc = parse_options(argc, argv, opts, 4, NULL, 0, &n_pos);
  if (rc == PARSE_HELP) return fputs(usage_init, stdout), 0;
  if (rc) return rc;
  const char *config_text = opts[0].value, *out_path = opts[2].value;
  uint64_t seed = 0;
  int n_threads;
  if (!out_path) return usage_error("--out is required");
  if (opts[1].value && (rc = parse_seed("seed", opts[1].value, &seed))) return rc;
  if ((rc = parse_threads(opts[3].value, &n_threads))) return rc;

  peer_config cfg;
  peer_config_default(&cfg);
  peer_status st;
  if (config_text && (st = peer_config_parse(&cfg, config_text)))
    return usage_error("--config: %s", peer_last_error());
  if ((st = peer_config_validate(&cfg))) return usage_error("--config: %s", peer_last_error());

  peer_layer *layer = NULL;
  if ((rc = create_layer(&cfg, n_threads, &layer))) return rc;
  double t0 = now_seconds();
  if ((st = peer_layer_init(layer, seed))) {
    rc = lib_fail(st, "cannot initialise layer");
    goto done;
  }
  double t1 = now_seconds();
  if ((st = peer_layer_save(layer, out_path))) {
    rc = lib_fail(st, "cannot save");
    goto done;
  }
  double t2 = now_seconds();
  char text[512];
  peer_config_format(&cfg, text, sizeof text);
  printf("config: %s\n", text);
  printf("wrote %s: %lld experts, %lld parameters (init %.2f s, save %.2f s)\n", out_path,
         (long long)peer_config_n_experts(&cfg), (long long)peer_layer_n_parameters(layer), t1 - t0,
         t2 - t1);
done:
  peer_layer_free(layer);
  return rc;
}
