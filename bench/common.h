// common.h: what the benchmark programs share: the layer shapes they run, the
// per-token work of a forward and of a training step (docs/PEER.md "Cost per
// token"), random tokens, and a cache of initialised layers (a 1M-expert f32
// layer is 4 GiB and takes seconds to fill, so each is made once per program).
#ifndef PEER_BENCH_COMMON_H
#define PEER_BENCH_COMMON_H

#include <peer.h>

#include <cstdint>
#include <map>
#include <random>
#include <string>
#include <utility>
#include <vector>

namespace bench {

struct Shape {
  const char *name;
  int64_t d_model, n_subkeys;
  bool batch_norm = false; // query_norm=batchnorm
};

// The reference layer: d=512, H=8, d_key=256, n=1024 (N = 1M experts), k=16.
constexpr Shape kReference = {"ref", 512, 1024};
// The reference width at n = 512 (N = 256K experts).
constexpr Shape kMidN = {"n512", 512, 512};
// The reference layer with query batch norm (the paper's default): its
// training step against ref's is the cost of the norm.
constexpr Shape kReferenceBN = {"ref_bn", 512, 1024, true};

inline peer_config make_config(const Shape &shape, peer_dtype dtype) {
  peer_config cfg;
  peer_config_default(&cfg);
  cfg.d_model = shape.d_model;
  cfg.n_heads = 8;
  cfg.d_key = 256;
  cfg.n_subkeys = shape.n_subkeys;
  cfg.top_k = 16;
  cfg.weight_dtype = dtype;
  if (shape.batch_norm) cfg.query_norm = PEER_NORM_BATCHNORM;
  return cfg;
}

// Multiply-adds and expert-row bytes per token.
struct Work {
  double macs = 0;
  double expert_bytes = 0;
};

// Forward: query d*H*d_key + sub-key scores H*n*d_key + experts 2*H*k*d
// MACs; the H*k gathered rows of u and of v.
inline Work forward_work(const peer_config &c) {
  double d = double(c.d_model), H = double(c.n_heads), k = double(c.top_k);
  double dk = double(c.d_key), n = double(c.n_subkeys);
  Work w;
  w.macs = d * H * dk + H * n * dk + 2.0 * H * k * d;
  w.expert_bytes = 2.0 * H * k * d * double(peer_dtype_size(c.weight_dtype));
  return w;
}

// Training step: the forward, then the backward's products (dWq and dx
// through Wq: 2*d*H*d_key), the expert rows (v.dy, dx += c u, du, dv:
// 4*H*k*d) and the sub-key terms (2*H*k*d_key); the expert rows are read in
// both passes (the gradient rows written are counted by each program).
inline Work train_work(const peer_config &c) {
  double d = double(c.d_model), H = double(c.n_heads), k = double(c.top_k);
  double dk = double(c.d_key);
  Work w = forward_work(c);
  w.macs += 2.0 * d * H * dk + 4.0 * H * k * d + 2.0 * H * k * dk;
  w.expert_bytes *= 2.0;
  return w;
}

inline std::vector<float> random_tokens(int64_t n_tokens, int64_t d, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<float> x(size_t(n_tokens * d));
  for (float &v : x)
    v = normal(rng);
  return x;
}

// Layers on one backend, created and initialised (seed 0x5eed) on first use,
// freed with the cache.
class LayerCache {
public:
  explicit LayerCache(peer_options options) : options_(options) {}
  LayerCache(const LayerCache &) = delete;
  LayerCache &operator=(const LayerCache &) = delete;
  ~LayerCache() {
    for (auto &entry : layers_)
      peer_layer_free(entry.second);
  }
  // NULL (with the library's message in *error) if creation fails.
  peer_layer *get(const Shape &shape, peer_dtype dtype, std::string *error) {
    auto key = std::make_pair(std::string(shape.name), int(dtype));
    auto it = layers_.find(key);
    if (it != layers_.end()) return it->second;
    peer_config cfg = make_config(shape, dtype);
    peer_layer *layer = nullptr;
    peer_status st = peer_layer_create(&layer, &cfg, &options_);
    if (st == PEER_OK) st = peer_layer_init(layer, 0x5eed);
    if (st != PEER_OK) {
      *error = std::string("layer setup: ") + peer_last_error();
      peer_layer_free(layer);
      return nullptr;
    }
    layers_[key] = layer;
    return layer;
  }

private:
  peer_options options_;
  std::map<std::pair<std::string, int>, peer_layer *> layers_;
};

} // namespace bench

#endif
