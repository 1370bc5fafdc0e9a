/* convert.c: `peer convert`, weights from and to lucidrains' PEER-pytorch
 * layout through the library's peer_layer_load_pytorch and
 * peer_layer_save_pytorch; this file turns the flags into settings. */
#include "cli.h"

#include <stdbool.h>
#include <stdio.h>
#include <string.h>

static const char usage_convert[] =
    "usage: peer convert --from peer-pytorch IN.safetensors --out W.safetensors\n"
    "                    [--gate softmax|relu] [--top-k K] [--subkey-top-k K2]\n"
    "                    [--activation A]\n"
    "       peer convert --to peer-pytorch W.safetensors --out OUT.safetensors\n"
    "\n"
    "Convert between a peer weight file and the state dict of one PEER layer of\n"
    "lucidrains' PEER-pytorch (0.2.x) saved as safetensors: to_queries.0.weight\n"
    "[2*H*dk, d] F32, keys [H, n, 2, dk] F32, weight_down_embed.weight and\n"
    "weight_up_embed.weight [n*n, d] (F32 or BF16).  Query rows and key axes are\n"
    "reordered (docs/PEER.md, \"Related layouts\"); expert tables are copied as\n"
    "they are.  H, n, dk and d come from the shapes (d_key = 2*dk).\n"
    "\n"
    "A PEER-pytorch file does not record the settings that are not shapes:\n"
    "  --gate softmax|relu  softmax: non_competing_scores=False (default);\n"
    "                       relu: non_competing_scores=True, PEER-pytorch's own\n"
    "                       default, which keeps one expert per head\n"
    "  --top-k K            experts kept per head: num_experts_per_head with\n"
    "                       softmax (default 16); must be 1 with relu\n"
    "  --subkey-top-k K2    candidates per half: product_key_topk (default\n"
    "                       num_experts_per_head: K with softmax, 16 with relu)\n"
    "  --activation A       gelu (nn.GELU, default), gelu_tanh, relu, silu, identity\n"
    "\n"
    "--to peer-pytorch refuses layers PEER-pytorch cannot express (query bias,\n"
    "batch norm, shared keys, sigmoid gates, relu gates with top_k > 1) and\n"
    "prints the PEER(...) arguments that load the file.\n";

/* The conversion itself is the library's (peer.h, "PEER-pytorch layout"). */
static int from_pytorch(const char *in, const char *out, const peer_config *settings) {
  peer_layer *layer = NULL;
  peer_status st = peer_layer_load_pytorch(&layer, in, settings, NULL);
  if (st) return lib_fail(st, NULL);
  if ((st = peer_layer_save(layer, out))) {
    peer_layer_free(layer);
    return lib_fail(st, "cannot save");
  }
  char text[512];
  peer_config_format(peer_layer_config(layer), text, sizeof text);
  printf("wrote %s from PEER-pytorch %s\nconfig: %s\n", out, in, text);
  peer_layer_free(layer);
  return 0;
}

static int to_pytorch(const char *in, const char *out) {
  peer_layer *layer = NULL;
  int rc = load_layer(in, 0, &layer);
  if (rc) return rc;
  char args[512];
  peer_status st = peer_config_pytorch_args(peer_layer_config(layer), args, sizeof args);
  if (!st) st = peer_layer_save_pytorch(layer, out);
  peer_layer_free(layer);
  if (st) return lib_fail(st, NULL);
  printf("wrote %s (PEER-pytorch state dict)\nload it into: %s\n", out, args);
  return 0;
}

int cmd_convert(int argc, char **argv) {
  cli_opt opts[] = {{"from", true, NULL},      {"to", true, NULL},    {"out", true, NULL},
                    {"gate", true, NULL},      {"top-k", true, NULL}, {"subkey-top-k", true, NULL},
                    {"activation", true, NULL}};
  const char *pos[1] = {NULL};
  int n_pos, rc = parse_options(argc, argv, opts, 7, pos, 1, &n_pos);
  if (rc == PARSE_HELP) return fputs(usage_convert, stdout), 0;
  if (rc) return rc;
  const char *from = opts[0].value, *to = opts[1].value, *out = opts[2].value;
  const char *layout = from ? from : to;
  if (!from == !to) return usage_error("give one of --from peer-pytorch and --to peer-pytorch");
  if (strcmp(layout, "peer-pytorch") != 0)
    return usage_error("--%s: unknown layout '%s' (known: peer-pytorch)", from ? "from" : "to",
                       layout);
  if (n_pos != 1) return usage_error("expected one input file (see 'peer convert --help')");
  if (!out) return usage_error("--out is required");
  if (to) {
    for (int i = 3; i < 7; i++)
      if (opts[i].value)
        return usage_error("--%s applies to --from only (the weight file has the config)",
                           opts[i].name);
    return to_pytorch(pos[0], out);
  }

  peer_config cfg;
  peer_config_default(&cfg);
  cfg.gate = PEER_GATE_SOFTMAX;
  if (opts[3].value) {
    if (!strcmp(opts[3].value, "relu"))
      cfg.gate = PEER_GATE_RELU;
    else if (strcmp(opts[3].value, "softmax"))
      return usage_error("--gate: '%s' is not softmax or relu", opts[3].value);
  }
  bool relu = cfg.gate == PEER_GATE_RELU;
  int64_t k = relu ? 1 : 16, kp = 16;
  if (opts[4].value && (rc = parse_int("top-k", opts[4].value, 1, 1 << 20, &k))) return rc;
  if (relu && k != 1)
    return usage_error("--top-k %lld: with --gate relu PEER-pytorch keeps one expert per head",
                       (long long)k);
  if (!relu) kp = k;
  if (opts[5].value && (rc = parse_int("subkey-top-k", opts[5].value, 1, 1 << 20, &kp))) return rc;
  cfg.top_k = k;
  cfg.subkey_top_k = kp == k ? 0 : kp;
  if (opts[6].value) {
    char item[96];
    snprintf(item, sizeof item, "activation=%.60s", opts[6].value);
    if (strchr(opts[6].value, ',') || peer_config_parse(&cfg, item))
      return usage_error("--activation: '%s' is not relu, gelu, gelu_tanh, silu or identity",
                         opts[6].value);
  }
  return from_pytorch(pos[0], out, &cfg);
}
