// bench_forward.cc: throughput of peer_forward, and of a training step
// (peer_forward_train + peer_backward), on the CPU backend, with the
// per-token counts its floor needs (docs/PEER.md "Cost per token": MACs,
// random expert-row bytes and their row size, streamed bytes); the floor is
// bench/roofline.py's, from this host's ceilings measured by bench/ceilings.
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
#include <cstdlib>
#include <string>
#include <vector>

namespace {

using namespace bench;

// Distinct tokens the inputs rotate over: at least this many, and at least
// kMinBatchesInPool batches, so the rows a token selects are not cached from
// the previous time the same token was run.
constexpr int64_t kMinPoolTokens = 4096;
constexpr int64_t kMinBatchesInPool = 8;

constexpr Shape kSmall = {"small", 256, 256};
// The sweep over N (kMidN: n = 512 at the reference width) and d (d = 256
// at the reference N).
constexpr Shape kNarrow = {"d256", 256, 1024};

// Bytes per token streamed in order: the query weight and the keys once per
// call (`passes` times: forward and backward), spread over the batch, plus
// `vectors` rows of d floats (x, y, dy, dx) and the training context
// (written by forward_train, read by backward).
double streamed_bytes(const peer_config &c, int64_t batch, double passes, double vectors,
                      double ctx_bytes = 0) {
  double G = c.shared_keys ? 1.0 : double(c.n_heads);
  double params = double(c.n_heads * c.d_key * c.d_model) + G * double(c.n_subkeys * c.d_key);
  return (passes * params * 4.0 + 2.0 * ctx_bytes) / double(batch) +
         vectors * double(c.d_model) * 4.0;
}

// The counters bench/roofline.py turns into a floor: MAC/s, expert_B/s (random
// rows), stream_B/s, and row_B (bytes of one expert row).
void count(benchmark::State &state, const peer_config &cfg, const Work &w, double stream,
           int64_t batch) {
  const double tokens = double(state.iterations()) * double(batch);
  using benchmark::Counter;
  state.counters["tokens/s"] = Counter(tokens, Counter::kIsRate);
  state.counters["MAC/s"] = Counter(tokens * w.macs, Counter::kIsRate);
  state.counters["expert_B/s"] = Counter(tokens * w.expert_bytes, Counter::kIsRate);
  state.counters["stream_B/s"] = Counter(tokens * stream, Counter::kIsRate);
  state.counters["row_B"] = double(cfg.d_model * int64_t(peer_dtype_size(cfg.weight_dtype)));
}

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

  count(state, cfg, forward_work(cfg), streamed_bytes(cfg, batch, 1, 2), batch);
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

  // Streamed: the parameters read in both passes and their gradients written
  // once, and one f32 gradient row pair per distinct expert the batch used,
  // written as a list (counted as H*k per token: every row distinct).
  const double grad_rows = 2.0 * double(hk * d) * 4.0;
  count(state, cfg, train_work(cfg),
        streamed_bytes(cfg, batch, 3, 4, double(ctx_bytes)) + grad_rows, batch);
  // Training context per token (what forward_train keeps for backward, plus
  // the backward's scratch), not counting the sparse gradient rows.
  state.counters["ctx_KiB/token"] = double(ctx_bytes) / 1024.0 / double(batch);
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
