/* forward.c: `peer forward`, run a layer over x from a file and write y
 * (and the kept experts and their gates). */
#include "cli.h"

#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>

static const char usage_forward[] =
    "usage: peer forward --weights W.safetensors --input X.safetensors\n"
    "                    --output Y.safetensors [--indices] [--threads N]\n"
    "\n"
    "Run the layer on tensor x [T, d_model] F32 of the input file and write\n"
    "y [T, d_model] F32; with --indices also indices [T, H, k] I64 and\n"
    "gates [T, H, k] F32 (each head's experts by descending score).\n"
    "Make an input file with 'peer random --shape T,d_model --out x.safetensors'.\n"
    "\n"
    "example: peer forward --weights w.safetensors --input x.safetensors --output y.safetensors\n";

int cmd_forward(int argc, char **argv) {
  cli_opt opts[] = {{"weights", true, NULL},
                    {"input", true, NULL},
                    {"output", true, NULL},
                    {"indices", false, NULL},
                    {"threads", true, NULL}};
  int n_pos, rc = parse_options(argc, argv, opts, 5, NULL, 0, &n_pos);
  if (rc == PARSE_HELP) return fputs(usage_forward, stdout), 0;
  if (rc) return rc;
  const char *w_path = opts[0].value, *x_path = opts[1].value, *y_path = opts[2].value;
  bool want_indices = opts[3].value != NULL;
  int n_threads;
  if (!w_path) return usage_error("--weights is required");
  if (!x_path) return usage_error("--input is required");
  if (!y_path) return usage_error("--output is required");
  if ((rc = parse_threads(opts[4].value, &n_threads))) return rc;

  peer_layer *layer = NULL;
  float *x = NULL, *y = NULL, *gates = NULL;
  int64_t *indices = NULL;
  int64_t T = 0;
  if ((rc = load_layer(w_path, n_threads, &layer))) return rc;
  const peer_config *cfg = peer_layer_config(layer);
  const int64_t d = cfg->d_model, H = cfg->n_heads, k = cfg->top_k;
  if ((rc = read_rows(x_path, "x", d, &x, &T))) goto done;

  y = alloc_array((size_t)(T * d), sizeof *y);
  if (want_indices) {
    indices = alloc_array((size_t)(T * H * k), sizeof *indices);
    gates = alloc_array((size_t)(T * H * k), sizeof *gates);
  }
  if (!y || (want_indices && (!indices || !gates))) {
    rc = fail("cannot allocate outputs for %lld tokens", (long long)T);
    goto done;
  }
  double t0 = now_seconds();
  peer_status st = peer_forward(layer, T, x, y, indices, gates);
  double t1 = now_seconds();
  if (st) {
    rc = lib_fail(st, "forward failed");
    goto done;
  }
  peer_tensor out[3] = {
      {"y", PEER_F32, 2, {T, d, 0, 0}, y, (size_t)(T * d) * sizeof *y},
      {"indices", PEER_I64, 3, {T, H, k, 0}, indices, (size_t)(T * H * k) * sizeof *indices},
      {"gates", PEER_F32, 3, {T, H, k, 0}, gates, (size_t)(T * H * k) * sizeof *gates}};
  if ((st = peer_safetensors_write(y_path, out, want_indices ? 3 : 1, NULL, 0))) {
    rc = lib_fail(st, "cannot write output");
    goto done;
  }
  printf("wrote %s: y [%lld, %lld]%s; %lld tokens in %.3f ms, threads: %d\n", y_path, (long long)T,
         (long long)d, want_indices ? ", indices and gates" : "", (long long)T, 1e3 * (t1 - t0),
         threads_used(n_threads));
done:
  free(x);
  free(y);
  free(indices);
  free(gates);
  peer_layer_free(layer);
  return rc;
}
