/* make_seeds.c: writes the fuzzers' seed corpora (tests/fuzz/corpus/<fuzzer>/)
 * with the library itself: small weight files of several configs, checkpoints
 * of fuzz_checkpoint's layer with and without optimizer state, an activation
 * file and config strings.  Run by `tools/fuzz --seeds`; the output is
 * committed. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "peer.h"

#define FUZZ_CHECKPOINT_CONFIG                                                                     \
  "d_model=8,n_heads=2,d_key=4,n_subkeys=4,top_k=2,query_norm=batchnorm"

static void ok(peer_status st, const char *what) {
  if (st) {
    fprintf(stderr, "make_seeds: %s: %s\n", what, peer_last_error());
    exit(1);
  }
}

static peer_layer *layer(const char *text, uint64_t seed) {
  peer_config c;
  peer_config_default(&c);
  ok(peer_config_parse(&c, text), text);
  peer_layer *L = NULL;
  ok(peer_layer_create(&L, &c, NULL), text);
  ok(peer_layer_init(L, seed), text);
  return L;
}

static void put_text(const char *dir, const char *name, const char *text) {
  char path[512];
  snprintf(path, sizeof path, "%s/%s", dir, name);
  FILE *fp = fopen(path, "wb");
  if (!fp || fputs(text, fp) < 0 || fclose(fp) != 0) {
    perror(path);
    exit(1);
  }
}

int main(int argc, char **argv) {
  if (argc != 2) {
    fprintf(stderr,
            "usage: make_seeds CORPUS_DIR (with weights/, checkpoint/, safetensors/, config/)\n");
    return 2;
  }
  const char *root = argv[1];
  char path[512];
  static const char *const weights[] = {
      "d_model=4,n_heads=1,d_key=2,n_subkeys=2,top_k=1",
      "d_model=8,n_heads=2,d_key=4,n_subkeys=4,top_k=2,weight_dtype=bf16,query_bias=1",
      "d_model=4,n_heads=2,d_key=4,n_subkeys=3,top_k=2,subkey_top_k=3,shared_keys=1,"
      "query_norm=batchnorm,gate=relu,activation=silu"};
  for (int i = 0; i < 3; i++) {
    peer_layer *L = layer(weights[i], 1 + (uint64_t)i);
    snprintf(path, sizeof path, "%s/weights/layer%d.safetensors", root, i);
    ok(peer_layer_save(L, path), path);
    snprintf(path, sizeof path, "%s/safetensors/layer%d.safetensors", root, i);
    ok(peer_layer_save(L, path), path);
    peer_layer_free(L);
  }
  peer_layer *L = layer(FUZZ_CHECKPOINT_CONFIG, 7);
  peer_optim_config oc = peer_optim_config_default();
  peer_optimizer *o = NULL;
  ok(peer_optimizer_create(&o, L, &oc), "optimizer");
  snprintf(path, sizeof path, "%s/checkpoint/adam.safetensors", root);
  ok(peer_checkpoint_save(L, o, path), path);
  snprintf(path, sizeof path, "%s/checkpoint/weights_only.safetensors", root);
  ok(peer_checkpoint_save(L, NULL, path), path);
  peer_optimizer_free(o);
  peer_layer_free(L);

  /* issue 14's 2 KB file: tensors of a few bytes, metadata of gigabytes */
  static float small[16];
  const char *names[] = {"query.weight",           "query.norm.weight",
                         "query.norm.bias",        "query.norm.running_mean",
                         "query.norm.running_var", "keys",
                         "experts.down",           "experts.up"};
  peer_tensor tiny[8];
  for (int i = 0; i < 8; i++)
    tiny[i] = (peer_tensor){.name = names[i],
                            .dtype = PEER_F32,
                            .ndim = 1,
                            .shape = {16},
                            .data = small,
                            .nbytes = sizeof small};
  const char *huge[] = {
      "peer.format",       "1",       "peer.d_model",     "1",         "peer.n_heads",    "1024",
      "peer.d_key",        "1048576", "peer.n_subkeys",   "1",         "peer.top_k",      "1",
      "peer.subkey_top_k", "1",       "peer.shared_keys", "0",         "peer.activation", "gelu",
      "peer.gate",         "softmax", "peer.query_norm",  "batchnorm", "peer.query_bias", "0",
      "peer.weight_dtype", "f32"};
  snprintf(path, sizeof path, "%s/weights/huge_metadata.safetensors", root);
  ok(peer_safetensors_write(path, tiny, 8, huge, 13), path);

  float x[6] = {1, 2, 3, 4, 5, 6};
  int64_t ids[4] = {0, 1, 2, 3};
  peer_tensor t[2] = {
      {.name = "x", .dtype = PEER_F32, .ndim = 2, .shape = {2, 3}, .data = x, .nbytes = sizeof x},
      {.name = "indices",
       .dtype = PEER_I64,
       .ndim = 3,
       .shape = {1, 2, 2},
       .data = ids,
       .nbytes = sizeof ids}};
  const char *meta[] = {"note", "activations"};
  snprintf(path, sizeof path, "%s/safetensors/activations.safetensors", root);
  ok(peer_safetensors_write(path, t, 2, meta, 1), path);

  snprintf(path, sizeof path, "%s/config", root);
  put_text(path, "default", "d_model=512,n_heads=8,d_key=256,n_subkeys=1024,top_k=16");
  put_text(path, "every_key",
           "d_model=8,n_heads=2,d_key=4,n_subkeys=4,top_k=2,subkey_top_k=3,shared_keys=1,"
           "activation=gelu_tanh,gate=sigmoid,query_norm=batchnorm,query_bias=true,"
           "weight_dtype=BF16");
  put_text(path, "blanks", " top_k = 8 , gate=relu,activation=identity");
  put_text(path, "bad", "d_model=+16,top_k=,=3,,");
  return 0;
}
