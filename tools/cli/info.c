/* info.c: `peer info`, describe a weight file (config, parameters, tensors,
 * cost per token) from its header alone. */
#include "cli.h"

#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static const char usage_info[] =
    "usage: peer info W.safetensors\n"
    "\n"
    "Print a weight file's config, expert count, total and active parameters,\n"
    "its tensors (name, dtype, shape, bytes) and the forward cost per token.\n"
    "Only the header is read; tensors are checked against the config.\n";

/* Config names as stored under "peer.<name>" in a weight file's metadata. */
static const char *const config_keys[] = {"d_model", "n_heads",      "d_key",       "n_subkeys",
                                          "top_k",   "subkey_top_k", "shared_keys", "activation",
                                          "gate",    "query_norm",   "query_bias",  "weight_dtype"};
enum { N_CONFIG_KEYS = sizeof config_keys / sizeof config_keys[0] };

/* Rebuild the config from a file's metadata. */
static int config_from_metadata(const peer_safetensors *f, peer_config *cfg) {
  const char *format = peer_safetensors_metadata(f, "peer.format");
  if (!format) return fail("not a peer weight file: metadata has no peer.format");
  if (strcmp(format, "1") != 0)
    return fail("peer.format '%s' is not supported (this build reads %d)", format,
                PEER_FORMAT_VERSION);
  peer_config_default(cfg);
  for (int i = 0; i < N_CONFIG_KEYS; i++) {
    char key[64], item[256];
    snprintf(key, sizeof key, "peer.%s", config_keys[i]);
    const char *value = peer_safetensors_metadata(f, key);
    if (!value) return fail("metadata has no %s", key);
    if (strchr(value, ',') || strlen(value) > 200)
      return fail("metadata %s: '%.40s' is not a valid value", key, value);
    snprintf(item, sizeof item, "%s=%s", config_keys[i], value);
    if (peer_config_parse(cfg, item)) return fail("metadata: %s", peer_last_error());
  }
  if (peer_config_validate(cfg)) return fail("metadata: %s", peer_last_error());
  return 0;
}

/* Every parameter the config implies must be in the file with its shape and
 * dtype. */
static int check_tensors(peer_layer *layer, const peer_safetensors *f) {
  for (int i = 0; i < peer_layer_n_params(layer); i++) {
    peer_tensor want, have;
    if (peer_layer_param(layer, i, &want)) return fail("%s", peer_last_error());
    if (peer_safetensors_find(f, want.name, &have))
      return fail("file lacks tensor '%s' that the config needs", want.name);
    bool same = have.dtype == want.dtype && have.ndim == want.ndim;
    for (int j = 0; same && j < want.ndim; j++)
      same = have.shape[j] == want.shape[j];
    if (!same) {
      char a[96], b[96];
      return fail("tensor '%s' is %s %s, the config needs %s %s", want.name,
                  peer_dtype_name(have.dtype), format_shape(&have, a, sizeof a),
                  peer_dtype_name(want.dtype), format_shape(&want, b, sizeof b));
    }
  }
  return 0;
}

static void print_config(const peer_config *c) {
  printf("config:\n");
  printf("  d_model       %lld\n", (long long)c->d_model);
  printf("  n_heads       %lld\n", (long long)c->n_heads);
  printf("  d_key         %lld\n", (long long)c->d_key);
  printf("  n_subkeys     %lld\n", (long long)c->n_subkeys);
  printf("  top_k         %lld\n", (long long)c->top_k);
  printf("  subkey_top_k  %lld\n", (long long)peer_config_subkey_top_k(c));
  printf("  shared_keys   %d\n", c->shared_keys);
  printf("  activation    %s\n", peer_activation_name(c->activation));
  printf("  gate          %s\n", peer_gate_name(c->gate));
  printf("  query_norm    %s\n", peer_query_norm_name(c->query_norm));
  printf("  query_bias    %d\n", c->query_bias);
  printf("  weight_dtype  %s\n", c->weight_dtype == PEER_BF16 ? "bf16" : "f32");
}

int cmd_info(int argc, char **argv) {
  const char *pos[1] = {NULL};
  int n_pos, rc = parse_options(argc, argv, NULL, 0, pos, 1, &n_pos);
  if (rc == PARSE_HELP) return fputs(usage_info, stdout), 0;
  if (rc) return rc;
  if (n_pos != 1) return usage_error("expected one weight file (see 'peer info --help')");
  const char *path = pos[0];

  peer_safetensors *f = NULL;
  peer_layer *layer = NULL;
  peer_status st = peer_safetensors_open(&f, path);
  if (st) return lib_fail(st, NULL);
  peer_config cfg;
  if ((rc = config_from_metadata(f, &cfg))) goto done;
  /* The layer is only described, never touched: its large tables are mapped
   * lazily, so this costs no physical memory. */
  if ((rc = create_layer(&cfg, 0, &layer))) goto done;
  if ((rc = check_tensors(layer, f))) goto done;

  char b[32];
  printf("file: %s\n", path);
  print_config(&cfg);
  printf("experts N:               %lld (n_subkeys^2)\n", (long long)peer_config_n_experts(&cfg));
  printf("parameters:              %lld\n", (long long)peer_layer_n_parameters(layer));
  printf("active parameters/token: %lld\n", (long long)peer_layer_n_active_parameters(layer));
  printf("tensors:\n");
  double total = 0;
  for (int i = 0; i < peer_safetensors_count(f); i++) {
    peer_tensor t;
    if ((st = peer_safetensors_info(f, i, &t))) {
      rc = lib_fail(st, "cannot describe tensor");
      goto done;
    }
    char shape[96];
    printf("  %-24s %-4s %-18s %14zu bytes\n", t.name, peer_dtype_name(t.dtype),
           format_shape(&t, shape, sizeof shape), t.nbytes);
    total += (double)t.nbytes;
  }
  printf("  total: %.0f bytes (%s)\n", total, format_bytes(total, b, sizeof b));
  printf("forward cost per token:\n");
  print_cost(&cfg, "  ");
done:
  peer_layer_free(layer);
  peer_safetensors_close(f);
  return rc;
}
