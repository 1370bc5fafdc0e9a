/* fuzz_weights.c: libFuzzer harness for the weight loader (peer_layer_load):
 * every input either loads into a layer whose parameters fit in the input,
 * or fails with a message; a layer that loads runs a forward pass. */
#include "fuzz_input.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  peer_layer *L = NULL;
  peer_options opt;
  peer_options_default(&opt);
  opt.n_threads = 1;
  peer_status st = peer_layer_load(&L, fuzz_file(data, size), &opt);
  fuzz_check_failure(st);
  if (st) {
    if (L) abort();
    return 0;
  }
  /* the size bound: what loading allocated came from the file */
  size_t bytes = 0;
  for (int i = 0; i < peer_layer_n_params(L); i++) {
    peer_tensor t;
    if (peer_layer_param(L, i, &t)) abort();
    bytes += t.nbytes;
  }
  if (bytes > size) abort();
  const peer_config *c = peer_layer_config(L);
  float *x = calloc((size_t)c->d_model * 2, sizeof *x),
        *y = malloc((size_t)c->d_model * 2 * sizeof *y);
  for (int64_t i = 0; i < c->d_model * 2; i++)
    x[i] = (float)(i % 7) - 3.0f;
  fuzz_check_failure(peer_forward(L, 2, x, y, NULL, NULL));
  free(x);
  free(y);
  peer_layer_free(L);
  return 0;
}
