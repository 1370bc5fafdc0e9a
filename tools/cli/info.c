/* info.c: `peer info`, describe a weight file (config, parameters, tensors,
 * cost per token) from its header alone. */
#include "cli.h"

#include <stdio.h>
#include <stdlib.h>

static const char usage_info[] =
    "usage: peer info W.safetensors\n"
    "\n"
    "Print a weight file's config, expert count, total and active parameters,\n"
    "its tensors (name, dtype, shape, bytes) and the forward cost per token.\n"
    "Only the header is read; the file is checked as loading checks it (config,\n"
    "every tensor's dtype, shape and bytes, nothing extra): exit status 1 if\n"
    "loading would refuse it.\n";

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

  /* The library's own checks, those of peer_layer_load: a file that loading
   * would refuse (a bad config, a tensor missing, extra or of another shape)
   * fails here too, before anything is allocated. */
  peer_config cfg;
  peer_status st = peer_layer_check_file(path, &cfg);
  if (st) return lib_fail(st, NULL);
  peer_safetensors *f = NULL;
  peer_layer *layer = NULL;
  if ((st = peer_safetensors_open(&f, path))) return lib_fail(st, NULL);
  /* The layer is only described, never touched: its large tables are mapped
   * lazily, and the check above bounded them by the file's size. */
  if ((rc = create_layer(&cfg, 0, &layer))) goto done;

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
