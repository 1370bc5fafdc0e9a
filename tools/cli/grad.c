/* grad.c: `peer grad`, a training forward and backward over x and dy from
 * files, writing dx and every parameter's gradient. */
#include "cli.h"

#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* Every parameter of the richest config, plus dx and y. */
enum { MAX_GRAD_OUT = 12 };

static const char usage_grad[] =
    "usage: peer grad --weights W.safetensors --input X.safetensors\n"
    "                 --dy DY.safetensors --output G.safetensors [--threads N]\n"
    "\n"
    "Forward and backward in training mode (batch norm on the batch's\n"
    "statistics) for x [T, d_model] (tensor 'x') and dy [T, d_model] (tensor\n"
    "'dy'); write dx [T, d_model] and the gradient of every parameter under its\n"
    "PEER.md name, dense (expert tables as [N, d_model] F32, zero where unused),\n"
    "plus y [T, d_model].  Make the inputs with 'peer random --shape T,d_model\n"
    "--out x.safetensors' and 'peer random ... --name dy --out dy.safetensors'.\n"
    "\n"
    "example: peer grad --weights w.safetensors --input x.safetensors --dy dy.safetensors \\\n"
    "           --output g.safetensors\n";

int cmd_grad(int argc, char **argv) {
  cli_opt opts[] = {{"weights", true, NULL},
                    {"input", true, NULL},
                    {"dy", true, NULL},
                    {"output", true, NULL},
                    {"threads", true, NULL}};
  int n_pos, rc = parse_options(argc, argv, opts, 5, NULL, 0, &n_pos);
  if (rc == PARSE_HELP) return fputs(usage_grad, stdout), 0;
  if (rc) return rc;
  const char *w_path = opts[0].value, *x_path = opts[1].value, *dy_path = opts[2].value;
  const char *g_path = opts[3].value;
  int n_threads;
  if (!w_path) return usage_error("--weights is required");
  if (!x_path) return usage_error("--input is required");
  if (!dy_path) return usage_error("--dy is required");
  if (!g_path) return usage_error("--output is required");
  if ((rc = parse_threads(opts[4].value, &n_threads))) return rc;

  peer_layer *layer = NULL;
  peer_context *ctx = NULL;
  float *x = NULL, *dy = NULL, *y = NULL, *dx = NULL;
  int64_t T = 0, T_dy = 0, *rows = NULL;
  peer_tensor out[MAX_GRAD_OUT];
  void *grad_data[MAX_GRAD_OUT] = {0};
  int n_out = 0;
  if ((rc = load_layer(w_path, n_threads, &layer))) return rc;
  const peer_config *cfg = peer_layer_config(layer);
  const int64_t d = cfg->d_model, hk = cfg->n_heads * cfg->top_k;
  if ((rc = read_rows(x_path, "x", d, &x, &T))) goto done;
  if ((rc = read_rows(dy_path, "dy", d, &dy, &T_dy))) goto done;
  if (T_dy != T) {
    rc = fail("dy has %lld rows but x has %lld", (long long)T_dy, (long long)T);
    goto done;
  }
  peer_status st;
  if ((st = peer_context_create(&ctx, layer, T > 0 ? T : 1))) {
    rc = lib_fail(st, "cannot create a training context");
    goto done;
  }
  y = alloc_array((size_t)(T * d) + 1, sizeof *y);
  dx = alloc_array((size_t)(T * d) + 1, sizeof *dx);
  rows = alloc_array((size_t)(T * hk) + 1, sizeof *rows);
  peer_grads g = {0};
  /* One dense gradient per parameter, named as the parameter; f32 always. */
  for (int i = 0; i < peer_layer_n_params(layer); i++) {
    peer_tensor p;
    peer_layer_param(layer, i, &p);
    if (strstr(p.name, "running_")) continue; /* statistics, not parameters */
    size_t count = p.nbytes / peer_dtype_size(p.dtype);
    float *buf = alloc_array(count + 1, sizeof(float));
    if (!buf) {
      rc = fail("cannot allocate the gradient of %s (%zu floats)", p.name, count);
      goto done;
    }
    grad_data[n_out] = buf;
    out[n_out] = p;
    out[n_out].dtype = PEER_F32;
    out[n_out].data = buf;
    out[n_out].nbytes = count * sizeof(float);
    n_out++;
    if (!strcmp(p.name, "query.weight"))
      g.query_weight = buf;
    else if (!strcmp(p.name, "query.bias"))
      g.query_bias = buf;
    else if (!strcmp(p.name, "query.norm.weight"))
      g.norm_weight = buf;
    else if (!strcmp(p.name, "query.norm.bias"))
      g.norm_bias = buf;
    else if (!strcmp(p.name, "keys"))
      g.keys = buf;
    else if (!strcmp(p.name, "experts.down"))
      g.experts_down = buf;
    else if (!strcmp(p.name, "experts.up"))
      g.experts_up = buf;
  }
  if (!y || !dx || !rows) {
    rc = fail("cannot allocate outputs for %lld tokens", (long long)T);
    goto done;
  }
  g.experts_dense = 1;
  g.expert_rows = rows;
  g.expert_capacity = T * hk;
  double t0 = now_seconds();
  if ((st = peer_forward_train(layer, ctx, T, x, y))) {
    rc = lib_fail(st, "training forward failed");
    goto done;
  }
  if ((st = peer_backward(layer, ctx, dy, dx, &g))) {
    rc = lib_fail(st, "backward failed");
    goto done;
  }
  double t1 = now_seconds();
  out[n_out++] = (peer_tensor){"dx", PEER_F32, 2, {T, d, 0, 0}, dx, (size_t)(T * d) * sizeof *dx};
  out[n_out++] = (peer_tensor){"y", PEER_F32, 2, {T, d, 0, 0}, y, (size_t)(T * d) * sizeof *y};
  if ((st = peer_safetensors_write(g_path, out, n_out, NULL, 0))) {
    rc = lib_fail(st, "cannot write gradients");
    goto done;
  }
  printf("wrote %s: dx and %d parameter gradients; %lld tokens, %lld expert rows touched, "
         "forward+backward %.3f ms, threads: %d\n",
         g_path, n_out - 2, (long long)T, (long long)g.n_expert_rows, 1e3 * (t1 - t0),
         threads_used(n_threads));
done:
  for (int i = 0; i < MAX_GRAD_OUT; i++)
    free(grad_data[i]);
  free(x), free(dy), free(y), free(dx), free(rows);
  peer_context_free(ctx);
  peer_layer_free(layer);
  return rc;
}
