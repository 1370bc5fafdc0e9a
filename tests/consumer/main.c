/* main.c: a program outside the project that uses an installed peer
 * (tests/install_test.sh builds it against the CMake package and against
 * both pkg-config files).  It runs a small layer and checks that the
 * library it runs with is the version its header names. */
#include <peer.h>
#ifdef PEER_USE_CUDA
#include <peer_cuda.h>
#endif

#include <math.h>
#include <stdio.h>

static int check(peer_status st, const char *what) {
  if (st)
    fprintf(stderr, "consumer: %s: %s: %s\n", what, peer_status_string(st), peer_last_error());
  return st != PEER_OK;
}

int main(void) {
  if (peer_version_number() != PEER_VERSION_NUMBER) {
    fprintf(stderr, "consumer: header version %d, library %d\n", PEER_VERSION_NUMBER,
            peer_version_number());
    return 1;
  }
  peer_config cfg;
  peer_config_default(&cfg);
  if (check(peer_config_parse(&cfg, "d_model=16,n_heads=2,d_key=8,n_subkeys=8,top_k=4"), "config"))
    return 1;
  peer_layer *layer = NULL;
  if (check(peer_layer_create(&layer, &cfg, NULL), "layer_create")) return 1;
  enum { T = 3, D = 16 };
  float x[T * D], y[T * D];
  for (int i = 0; i < T * D; i++)
    x[i] = (float)((i * 37) % 11) / 11.0f - 0.5f;
  int bad = check(peer_layer_init(layer, 1), "init") ||
            check(peer_forward(layer, T, x, y, NULL, NULL), "forward");
  double sum = 0;
  for (int i = 0; i < T * D && !bad; i++)
    sum += fabs(y[i]);
  peer_layer_free(layer);
  if (bad) return 1;
  if (!(sum > 0) || !isfinite(sum)) {
    fprintf(stderr, "consumer: forward gave sum |y| = %g\n", sum);
    return 1;
  }
  printf("consumer: peer %s, sum |y| = %.6f", peer_version_string(), sum);
#ifdef PEER_USE_CUDA
  printf(", CUDA devices %d", peer_cuda_device_count());
#endif
  printf("\n");
  return 0;
}
