/* fuzz_checkpoint.c: libFuzzer harness for the checkpoint loader
 * (peer_checkpoint_load) into a fixed small layer, with its Adam optimizer
 * (first input byte even) or without one (odd).  Every input loads or fails
 * with a message; the layer stays usable either way. */
#include "fuzz_input.h"

/* The corpus's checkpoints were saved from this layer (tools/fuzz --seed). */
#define FUZZ_CHECKPOINT_CONFIG                                                                     \
  "d_model=8,n_heads=2,d_key=4,n_subkeys=4,top_k=2,query_norm=batchnorm"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  static peer_layer *L;
  static peer_optimizer *o;
  if (!L) {
    peer_config c;
    peer_config_default(&c);
    peer_options opt;
    peer_options_default(&opt);
    opt.n_threads = 1;
    peer_optim_config oc = peer_optim_config_default();
    if (peer_config_parse(&c, FUZZ_CHECKPOINT_CONFIG) || peer_layer_create(&L, &c, &opt) ||
        peer_optimizer_create(&o, L, &oc))
      abort();
  }
  peer_optimizer *which = size > 0 && data[0] % 2 ? NULL : o;
  fuzz_check_failure(peer_checkpoint_load(L, which, fuzz_file(data, size)));
  float x[16] = {1, -2, 3, -4, 5, -6, 7, -8, 1, 2, 3, 4, 5, 6, 7, 8}, y[16];
  fuzz_check_failure(peer_forward(L, 2, x, y, NULL, NULL));
  return 0;
}
