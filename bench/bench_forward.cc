// bench_forward.cc: throughput of peer_forward, and of a training step
// (peer_forward_train + peer_backward), on the CPU backend, measured
// against the floor this machine allows (docs/PEER.md "Cost per token" divided
// by the ceilings in DESIGN.md "Performance method").
//
// Configs: the reference layer (d=512, H=8, d_key=256, n=1024 -> 1M experts,
// k=16), a small one (d=256, n=256 -> 64K experts), and the two steps between
// them (n512: d=512, N=256K; d256: d=256, N=1M), so N and d vary apart;
// f32 and bf16 expert tables; batch 512 and 1; 1 and 2 threads; for both the
// forward and the training step.  Each layer is
// created and initialised once (a 1M-expert f32 layer is 4 GiB and takes
// seconds to fill) and kept for the whole run; inputs rotate over a pool of
// distinct random tokens so that neither x nor the expert rows it selects stay
// in cache between iterations.
#include <benchmark/benchmark.h>

#include <peer.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <random>
#include <string>
#include <utility>
#include <vector>

namespace {

// Ceilings of the development machine (2 cores AMD Zen 4), from
// /work/shared/DESIGN.md "Performance method": f32 FMA about 116 GFLOP/s per
// core; random row gather 4 to 7 GB/s per thread (6 taken here).  Both scale
// with the thread count.
constexpr double kFlopsPerCore = 116e9;
constexpr double kGatherBytesPerThread = 6e9;

// Distinct tokens the inputs rotate over: at least this many, and at least
// kMinBatchesInPool batches, so the rows a token selects are not cached from
// the previous time the same token was run.
constexpr int64_t kMinPoolTokens = 4096;
constexpr int64_t kMinBatchesInPool = 8;

struct Shape {
  const char *name;
  int64_t d_model, n_subkeys;
};

constexpr Shape kReference = {"ref", 512, 1024};
constexpr Shape kSmall = {"small", 256, 256};
// The sweep over N (n = 512 at the reference width) and d (d = 256 at the
// reference N).
constexpr Shape kMidN = {"n512", 512, 512};
constexpr Shape kNarrow = {"d256", 256, 1024};

peer_config make_config(const Shape &shape, peer_dtype dtype) {
  peer_config cfg;
  peer_config_default(&cfg);
  cfg.d_model = shape.d_model;
  cfg.n_heads = 8;
  cfg.d_key = 256;
  cfg.n_subkeys = shape.n_subkeys;
  cfg.top_k = 16;
  cfg.weight_dtype = dtype;
  return cfg;
}

// Per-token work of the forward (PEER.md "Cost per token").
struct Cost {
  double macs;         // query + sub-key scores + experts
  double expert_bytes; // H*k rows of u and of v
  double floor_seconds(int threads) const {
    double compute = 2.0 * macs / (kFlopsPerCore * threads);
    double gather = expert_bytes / (kGatherBytesPerThread * threads);
    return std::max(compute, gather);
  }
};

Cost cost_of(const peer_config &c) {
  double d = double(c.d_model), H = double(c.n_heads), k = double(c.top_k);
  double dk = double(c.d_key), n = double(c.n_subkeys);
  Cost cost;
  cost.macs = d * H * dk + H * n * dk + 2.0 * H * k * d;
  cost.expert_bytes = 2.0 * H * k * d * double(peer_dtype_size(c.weight_dtype));
  return cost;
}

// Layers live for the whole program: created on first use, freed at exit.
class LayerCache {
public:
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
    peer_status st = peer_layer_create(&layer, &cfg, nullptr);
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
  std::map<std::pair<std::string, int>, peer_layer *> layers_;
};

LayerCache &layer_cache() {
  static LayerCache cache;
  return cache;
}

std::vector<float> random_tokens(int64_t n_tokens, int64_t d, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<float> x(size_t(n_tokens * d));
  for (float &v : x)
    v = normal(rng);
  return x;
}

void forward(benchmark::State &state, Shape shape, peer_dtype dtype, int64_t batch, int threads) {
  std::string error;
  peer_layer *layer = layer_cache().get(shape, dtype, &error);
  if (!layer) {
    state.SkipWithError(error.c_str());
    return;
  }
  if (peer_layer_set_threads(layer, threads) != PEER_OK) {
    state.SkipWithError(peer_last_error());
    return;
  }
  const peer_config &cfg = *peer_layer_config(layer);
  const int64_t d = cfg.d_model;
  const int64_t n_batches = std::max(kMinBatchesInPool, kMinPoolTokens / batch);
  const std::vector<float> pool = random_tokens(n_batches * batch, d, 1234);
  std::vector<float> y(size_t(batch * d));

  // Untimed first call: grows the layer's scratch to this batch size.
  if (peer_forward(layer, batch, pool.data(), y.data(), nullptr, nullptr) != PEER_OK) {
    state.SkipWithError(peer_last_error());
    return;
  }
  int64_t next = 1;
  for (auto _ : state) {
    const float *x = pool.data() + size_t((next % n_batches) * batch * d);
    if (peer_forward(layer, batch, x, y.data(), nullptr, nullptr) != PEER_OK) {
      state.SkipWithError(peer_last_error());
      break;
    }
    benchmark::DoNotOptimize(y.data());
    benchmark::ClobberMemory();
    ++next;
  }

  const Cost cost = cost_of(cfg);
  const double tokens = double(state.iterations()) * double(batch);
  using benchmark::Counter;
  state.counters["tokens/s"] = Counter(tokens, Counter::kIsRate);
  state.counters["expert_B/s"] = Counter(tokens * cost.expert_bytes, Counter::kIsRate);
  state.counters["MAC/s"] = Counter(tokens * cost.macs, Counter::kIsRate);
  // tokens * floor_seconds / elapsed = achieved tokens/s over floor tokens/s.
  state.counters["floor_frac"] = Counter(tokens * cost.floor_seconds(threads), Counter::kIsRate);
  char label[96];
  std::snprintf(
      label, sizeof label, "floor %.1f us/token (%s bound)", 1e6 * cost.floor_seconds(threads),
      2.0 * cost.macs / kFlopsPerCore > cost.expert_bytes / kGatherBytesPerThread ? "compute"
                                                                                  : "gather");
  state.SetLabel(label);
}

// Per-token work of a training step: the forward, then the backward's
// products (dWq and dx through Wq: 2*d*H*d_key), the expert rows (v.dy,
// dx += c u, du, dv: 4*H*k*d) and the sub-key terms (about 4*H*k*d_key/2);
// bytes: the expert rows read twice and the sparse gradient rows written once.
Cost train_cost_of(const peer_config &c) {
  double d = double(c.d_model), H = double(c.n_heads), k = double(c.top_k);
  double dk = double(c.d_key);
  Cost cost = cost_of(c);
  cost.macs += 2.0 * d * H * dk + 4.0 * H * k * d + 2.0 * H * k * dk;
  cost.expert_bytes = 2.0 * cost.expert_bytes + 2.0 * H * k * d * 4.0;
  return cost;
}

void train_step(benchmark::State &state, Shape shape, peer_dtype dtype, int64_t batch,
                int threads) {
  std::string error;
  peer_layer *layer = layer_cache().get(shape, dtype, &error);
  if (!layer) {
    state.SkipWithError(error.c_str());
    return;
  }
  if (peer_layer_set_threads(layer, threads) != PEER_OK) {
    state.SkipWithError(peer_last_error());
    return;
  }
  const peer_config &cfg = *peer_layer_config(layer);
  const int64_t d = cfg.d_model, hk = cfg.n_heads * cfg.top_k;
  const int64_t dq = cfg.n_heads * cfg.d_key, G = cfg.shared_keys ? 1 : cfg.n_heads;
  const int64_t n_batches = std::max(kMinBatchesInPool, kMinPoolTokens / batch);
  const std::vector<float> pool = random_tokens(n_batches * batch, d, 1234);
  const std::vector<float> dy = random_tokens(batch, d, 99);
  std::vector<float> y(size_t(batch * d)), dx(size_t(batch * d));
  std::vector<float> g_wq(size_t(dq * d)), g_keys(size_t(G * cfg.n_subkeys * cfg.d_key));
  std::vector<float> g_down(size_t(batch * hk * d)), g_up(size_t(batch * hk * d));
  std::vector<int64_t> rows(size_t(batch * hk));
  peer_grads g = {};
  g.query_weight = g_wq.data();
  g.keys = g_keys.data();
  g.expert_capacity = batch * hk;
  g.expert_rows = rows.data();
  g.experts_down = g_down.data();
  g.experts_up = g_up.data();
  peer_context *ctx = nullptr;
  size_t ctx_bytes = 0;
  if (peer_context_create(&ctx, layer, batch) != PEER_OK ||
      peer_context_size(layer, batch, &ctx_bytes) != PEER_OK) {
    state.SkipWithError(peer_last_error());
    return;
  }
  int64_t next = 0;
  for (auto _ : state) {
    const float *x = pool.data() + size_t((next % n_batches) * batch * d);
    if (peer_forward_train(layer, ctx, batch, x, y.data()) != PEER_OK ||
        peer_backward(layer, ctx, dy.data(), dx.data(), &g) != PEER_OK) {
      state.SkipWithError(peer_last_error());
      break;
    }
    benchmark::DoNotOptimize(dx.data());
    benchmark::ClobberMemory();
    ++next;
  }
  peer_context_free(ctx);

  const Cost cost = train_cost_of(cfg);
  const double tokens = double(state.iterations()) * double(batch);
  using benchmark::Counter;
  state.counters["tokens/s"] = Counter(tokens, Counter::kIsRate);
  state.counters["MAC/s"] = Counter(tokens * cost.macs, Counter::kIsRate);
  state.counters["floor_frac"] = Counter(tokens * cost.floor_seconds(threads), Counter::kIsRate);
  // Training context per token (what forward_train keeps for backward, plus
  // the backward's scratch), not counting the sparse gradient rows.
  state.counters["ctx_KiB/token"] = double(ctx_bytes) / 1024.0 / double(batch);
  char label[96];
  std::snprintf(label, sizeof label, "floor %.1f us/token", 1e6 * cost.floor_seconds(threads));
  state.SetLabel(label);
}

using Runner = void (*)(benchmark::State &, Shape, peer_dtype, int64_t, int);

void register_all() {
  const Shape shapes[] = {kReference, kSmall, kMidN, kNarrow};
  const peer_dtype dtypes[] = {PEER_F32, PEER_BF16};
  const int64_t batches[] = {512, 1};
  const int thread_counts[] = {1, 2};
  const struct {
    const char *name;
    Runner run;
  } kinds[] = {{"forward", forward}, {"train_step", train_step}};
  for (const auto &kind : kinds)
    for (const Shape &shape : shapes)
      for (peer_dtype dtype : dtypes)
        for (int64_t batch : batches)
          for (int threads : thread_counts) {
            std::string name = std::string(kind.name) + "/" + shape.name + "/" +
                               (dtype == PEER_F32 ? "f32" : "bf16") +
                               "/batch:" + std::to_string(batch) +
                               "/threads:" + std::to_string(threads);
            benchmark::RegisterBenchmark(name.c_str(), kind.run, shape, dtype, batch, threads)
                ->UseRealTime()
                ->Unit(benchmark::kMillisecond)
                ->MinTime(shape.n_subkeys >= 1024 && shape.d_model >= 512 ? 1.0 : 0.5);
          }
}

} // namespace

int main(int argc, char **argv) {
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  register_all();
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
