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

#include "common.h"

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

namespace {

using namespace bench;

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

constexpr Shape kSmall = {"small", 256, 256};
// The sweep over N (kMidN: n = 512 at the reference width) and d (d = 256
// at the reference N).
constexpr Shape kNarrow = {"d256", 256, 1024};

// Per-token work (common.h) and its floor on this machine.
struct Cost : Work {
  Cost(const Work &w) : Work(w) {}
  double floor_seconds(int threads) const {
    double compute = 2.0 * macs / (kFlopsPerCore * threads);
    double gather = expert_bytes / (kGatherBytesPerThread * threads);
    return std::max(compute, gather);
  }
};

peer_options cpu_options() {
  peer_options opt;
  peer_options_default(&opt);
  return opt;
}

LayerCache &layer_cache() {
  static LayerCache cache(cpu_options());
  return cache;
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

  const Cost cost = forward_work(cfg);
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

// A training step also writes one f32 gradient row pair per distinct expert
// the batch used: counted as H*k per token (every row distinct).
Work train_cost_of(const peer_config &c) {
  Work w = train_work(c);
  w.expert_bytes += 2.0 * double(c.n_heads * c.top_k * c.d_model) * 4.0;
  return w;
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
  std::vector<float> g_nw(static_cast<size_t>(dq)), g_nb(static_cast<size_t>(dq));
  if (cfg.query_norm == PEER_NORM_BATCHNORM) g.norm_weight = g_nw.data(), g.norm_bias = g_nb.data();
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
  const Shape shapes[] = {kReference, kReferenceBN, kSmall, kMidN, kNarrow};
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
