// bench_retrieval.cc: product-key retrieval (peer_retrieve, O(sqrt N) per
// token and head) against brute force (peer_retrieve_brute, O(N)) over
// N = 128^2 ... 2048^2 experts, k = 16 (and 8, 32 at n = 1024), H = 1 and 8,
// d_key = 128 and 256.  bench/tables.py turns the JSON output into a table of
// product-key over brute-force speed-ups.
//
// Retrieval reads the query projection and the sub-keys, never the expert
// tables.  peer_layer_create still allocates those tables (zero pages that
// stay unmapped until touched), so the layers here use d_model = 64 to keep
// even that allocation small, and they fill only query.weight and keys
// (peer_layer_init would write every expert row).
#include <benchmark/benchmark.h>

#include <peer.h>

#include <cmath>
#include <cstdint>
#include <random>
#include <string>
#include <vector>

namespace {

constexpr int64_t kDModel = 64;
// Brute force scores all N experts per token and head: few tokens per call.
constexpr int64_t kBatchProductKey = 256;
constexpr int64_t kBatchBrute = 16;
// Distinct input batches rotated through.
constexpr int64_t kBatchesInPool = 8;

struct Case {
  int64_t n_subkeys, n_heads, d_key, top_k;
  int threads;
  bool operator==(const Case &o) const {
    return n_subkeys == o.n_subkeys && n_heads == o.n_heads && d_key == o.d_key && top_k == o.top_k;
  }
};

void fill_uniform(float *p, size_t count, float a, uint32_t seed) {
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> u(-a, a);
  for (size_t i = 0; i < count; i++)
    p[i] = u(rng);
}

// Layer with random query weights and sub-keys; expert tables untouched.
peer_status make_layer(const Case &c, peer_layer **out) {
  peer_config cfg;
  peer_config_default(&cfg);
  cfg.d_model = kDModel;
  cfg.n_heads = c.n_heads;
  cfg.d_key = c.d_key;
  cfg.n_subkeys = c.n_subkeys;
  cfg.top_k = c.top_k;
  peer_layer *layer = nullptr;
  peer_status st = peer_layer_create(&layer, &cfg, nullptr);
  if (st != PEER_OK) return st;
  peer_tensor t;
  st = peer_layer_param_by_name(layer, "query.weight", &t);
  if (st == PEER_OK)
    fill_uniform(static_cast<float *>(t.data), t.nbytes / sizeof(float),
                 1.0f / std::sqrt(float(kDModel)), 1);
  if (st == PEER_OK) st = peer_layer_param_by_name(layer, "keys", &t);
  if (st == PEER_OK)
    fill_uniform(static_cast<float *>(t.data), t.nbytes / sizeof(float),
                 1.0f / std::sqrt(float(c.d_key / 2)), 2);
  if (st != PEER_OK) {
    peer_layer_free(layer);
    return st;
  }
  *out = layer;
  return PEER_OK;
}

// One layer at a time: the product-key and brute-force runs of a case are
// registered next to each other and share it.
class CurrentLayer {
public:
  ~CurrentLayer() { peer_layer_free(layer_); }
  peer_layer *get(const Case &c) {
    if (layer_ && c == case_) return layer_;
    peer_layer_free(layer_);
    layer_ = nullptr;
    if (make_layer(c, &layer_) != PEER_OK) return nullptr;
    case_ = c;
    return layer_;
  }

private:
  peer_layer *layer_ = nullptr;
  Case case_{};
};

CurrentLayer &current_layer() {
  static CurrentLayer current;
  return current;
}

void retrieve(benchmark::State &state, Case c, bool brute) {
  peer_layer *layer = current_layer().get(c);
  if (!layer || peer_layer_set_threads(layer, c.threads) != PEER_OK) {
    state.SkipWithError(peer_last_error());
    return;
  }
  const int64_t batch = brute ? kBatchBrute : kBatchProductKey;
  std::vector<float> pool(size_t(kBatchesInPool * batch * kDModel));
  std::mt19937 rng(77);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  for (float &v : pool)
    v = normal(rng);
  std::vector<int64_t> indices(size_t(batch * c.n_heads * c.top_k));
  auto call = brute ? peer_retrieve_brute : peer_retrieve;

  if (call(layer, batch, pool.data(), indices.data(), nullptr, nullptr) != PEER_OK) {
    state.SkipWithError(peer_last_error());
    return;
  }
  int64_t next = 1;
  for (auto _ : state) {
    const float *x = pool.data() + size_t((next % kBatchesInPool) * batch * kDModel);
    if (call(layer, batch, x, indices.data(), nullptr, nullptr) != PEER_OK) {
      state.SkipWithError(peer_last_error());
      break;
    }
    benchmark::DoNotOptimize(indices.data());
    benchmark::ClobberMemory();
    ++next;
  }
  const double tokens = double(state.iterations()) * double(batch);
  state.counters["tokens/s"] = benchmark::Counter(tokens, benchmark::Counter::kIsRate);
  state.SetLabel("N=" + std::to_string(c.n_subkeys * c.n_subkeys));
}

void register_case(const Case &c) {
  for (bool brute : {false, true}) {
    std::string name = std::string("retrieve/") + (brute ? "brute" : "pk") +
                       "/n:" + std::to_string(c.n_subkeys) + "/H:" + std::to_string(c.n_heads) +
                       "/d_key:" + std::to_string(c.d_key) + "/k:" + std::to_string(c.top_k) +
                       "/batch:" + std::to_string(brute ? kBatchBrute : kBatchProductKey) +
                       "/threads:" + std::to_string(c.threads);
    benchmark::RegisterBenchmark(name.c_str(), retrieve, c, brute)
        ->UseRealTime()
        ->Unit(benchmark::kMillisecond)
        ->MinTime(0.3);
  }
}

void register_all() {
  for (int64_t n : {128, 256, 512, 1024, 2048})
    for (int64_t H : {1, 8})
      for (int64_t dk : {128, 256})
        register_case({n, H, dk, 16, 1});
  for (int64_t k : {8, 32})
    for (int64_t H : {1, 8})
      for (int64_t dk : {128, 256})
        register_case({1024, H, dk, k, 1});
  // Both cores on the reference retrieval shape.
  register_case({1024, 8, 256, 16, 2});
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
