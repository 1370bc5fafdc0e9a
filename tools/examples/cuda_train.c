/* cuda_train.c: peer training on the device, the way a C/CUDA codebase
 * (llm.c style) would use it.  One PEER layer in a residual block
 * h = x + PEER(x) regresses a fixed random target; every activation and
 * gradient is a device buffer the program allocates once (cudaMalloc)
 * before the loop, and each step queues peer_cuda_forward_train,
 * peer_cuda_backward and peer_cuda_optimizer_step on one stream of its own
 * (the expert row count goes from the backward to the step on the device).
 * The loss, which in a real model is its own kernels' business, is computed
 * on the host here for brevity: y comes back once per step, dy goes out.
 * Exits non-zero if the loss does not fall (tools/test runs it under the
 * emulated CUDA build). */
#include <peer.h>
#include <peer_cuda.h>

#include <cuda_runtime_api.h>
#include <stdio.h>
#include <stdlib.h>

#define T 64 /* tokens per batch */
#define STEPS 40

#define CHECK(call)                                                                                \
  do {                                                                                             \
    peer_status st_ = (call);                                                                      \
    if (st_) {                                                                                     \
      fprintf(stderr, "cuda_train: %s: %s\n", #call, peer_last_error());                           \
      exit(1);                                                                                     \
    }                                                                                              \
  } while (0)

#define CUDA(call)                                                                                 \
  do {                                                                                             \
    cudaError_t e_ = (call);                                                                       \
    if (e_ != cudaSuccess) {                                                                       \
      fprintf(stderr, "cuda_train: %s: %s\n", #call, cudaGetErrorString(e_));                      \
      exit(1);                                                                                     \
    }                                                                                              \
  } while (0)

static void *device(size_t bytes) {
  void *p = NULL;
  CUDA(cudaMalloc(&p, bytes));
  CUDA(cudaMemset(p, 0, bytes));
  return p;
}

static size_t param_bytes(peer_layer *layer, const char *name) {
  peer_tensor t;
  CHECK(peer_layer_param_by_name(layer, name, &t));
  return t.nbytes;
}

int main(void) {
  if (peer_cuda_device_count() == 0) {
    fprintf(stderr, "cuda_train: skipped: no CUDA device\n");
    return 77;
  }
  peer_config cfg;
  peer_config_default(&cfg);
  CHECK(peer_config_parse(&cfg, "d_model=32,n_heads=2,d_key=16,n_subkeys=16,top_k=4"));
  const int64_t d = cfg.d_model, cap = T * cfg.n_heads * cfg.top_k;
  const size_t td = (size_t)(T * d) * sizeof(float);

  peer_options opt;
  peer_options_default(&opt);
  opt.backend = PEER_BACKEND_CUDA;
  peer_layer *layer;
  peer_context *ctx;
  peer_optimizer *adam;
  CHECK(peer_layer_create(&layer, &cfg, &opt));
  CHECK(peer_layer_init(layer, 1));
  CHECK(peer_context_create(&ctx, layer, T));
  peer_optim_config oc = peer_optim_config_default(); /* Adam; lazy expert rows */
  oc.lr = 3e-3f;
  oc.expert_lr = 1e-2f;
  CHECK(peer_optimizer_create(&adam, layer, &oc));

  /* the caller's device buffers: input, output, dy, and the gradients */
  size_t ws_bytes;
  CHECK(peer_cuda_workspace_size(layer, T, &ws_bytes));
  void *d_ws = device(ws_bytes);
  CHECK(peer_cuda_set_workspace(layer, d_ws, ws_bytes));
  float *d_x = device(td), *d_y = device(td), *d_dy = device(td);
  int64_t *d_n_rows = device(sizeof(int64_t));
  peer_grads g = {0};
  g.query_weight = device(param_bytes(layer, "query.weight"));
  g.keys = device(param_bytes(layer, "keys"));
  g.expert_capacity = cap;
  g.expert_rows = device((size_t)cap * sizeof(int64_t));
  g.experts_down = device((size_t)(cap * d) * sizeof(float));
  g.experts_up = device((size_t)(cap * d) * sizeof(float));

  float *x = malloc(td), *y = malloc(td), *dy = malloc(td), *target = malloc(td);
  if (!x || !y || !dy || !target) {
    fprintf(stderr, "cuda_train: out of memory\n");
    return 1;
  }
  srand(7);
  for (int64_t i = 0; i < T * d; i++) {
    x[i] = (float)rand() / (float)RAND_MAX - 0.5f;
    target[i] = 0.3f * ((float)rand() / (float)RAND_MAX - 0.5f); /* what PEER(x) should give */
  }
  cudaStream_t stream;
  CUDA(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  CUDA(cudaMemcpyAsync(d_x, x, td, cudaMemcpyHostToDevice, stream));

  double first = 0, last = 0;
  for (int step = 0; step < STEPS; step++) {
    CHECK(peer_cuda_forward_train(layer, ctx, T, d_x, d_y, stream));
    CUDA(cudaMemcpyAsync(y, d_y, td, cudaMemcpyDeviceToHost, stream));
    CUDA(cudaStreamSynchronize(stream));
    double loss = 0; /* mean squared error of the residual block's output */
    for (int64_t i = 0; i < T * d; i++) {
      float e = y[i] - target[i];
      loss += (double)e * e;
      dy[i] = 2.0f * e / (float)(T * d);
    }
    loss /= (double)(T * d);
    CUDA(cudaMemcpyAsync(d_dy, dy, td, cudaMemcpyHostToDevice, stream));
    CHECK(peer_cuda_backward(layer, ctx, d_dy, NULL, &g, d_n_rows, stream));
    CHECK(peer_cuda_optimizer_step(adam, &g, d_n_rows, stream));
    if (step % 10 == 0 || step == STEPS - 1) {
      CHECK(peer_cuda_check(layer, stream)); /* non-finite x, dy or scores */
      printf("step %2d  loss %.6f\n", step, loss);
    }
    if (step == 0) first = loss;
    last = loss;
  }
  CUDA(cudaStreamSynchronize(stream));

  CUDA(cudaStreamDestroy(stream));
  peer_optimizer_free(adam);
  peer_context_free(ctx);
  peer_layer_free(layer); /* before d_ws, which it uses */
  cudaFree(d_ws), cudaFree(d_x), cudaFree(d_y), cudaFree(d_dy), cudaFree(d_n_rows);
  cudaFree(g.query_weight), cudaFree(g.keys), cudaFree(g.expert_rows);
  cudaFree(g.experts_down), cudaFree(g.experts_up);
  free(x), free(y), free(dy), free(target);
  if (!(last < 0.5 * first)) {
    fprintf(stderr, "cuda_train: loss did not fall (%.6f -> %.6f)\n", first, last);
    return 1;
  }
  return 0;
}
