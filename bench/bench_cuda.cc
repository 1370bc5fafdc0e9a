// bench_cuda.cc: throughput of the CUDA backend's device-pointer calls
// (include/peer_cuda.h), measured against the floor an H100 allows (docs/PEER.md
// "Cost per token" divided by the ceilings in DESIGN.md "Performance method").
//
//   cuda_forward/ref/{f32,bf16}/batch:{512,4096,32768}     peer_cuda_forward
//   cuda_retrieve/pk/n:{256,512,1024}/.../batch:4096       peer_cuda_retrieve
//   cuda_retrieve/brute/n:{256,512,1024}/.../batch:1024    peer_cuda_retrieve_brute
//   cuda_train_step/ref/{f32,bf16}/batch:4096              peer_cuda_forward_train
//                                                          + peer_cuda_backward
// The reference layer is d=512, H=8, k=16, d_key=256, n=1024 (N = 1M experts);
// retrieval keeps d=512 and varies n.
//
// Timing: CUDA events around each call on the benchmark's stream, reported
// with SetIterationTime (UseManualTime), so host launch overhead counts only
// where it leaves the device idle.  Before each timed call, and outside the
// timed interval, a cudaMemsetAsync over twice the device's L2 evicts
// everything the previous call left there.  One untimed call per run grows
// the layer's device scratch and pays first-use costs; after the loop
// peer_cuda_check waits for the stream and reports any CUDA error or
// non-finite score.
//
// Without a device the program prints one line and exits 0, registering
// nothing, so bench/run.sh and CI run it everywhere.
#include <benchmark/benchmark.h>

#include <peer_cuda.h>

#include "common.h"

#include <cuda_runtime_api.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <memory>
#include <string>
#include <utility>
#include <vector>

namespace {

using namespace bench;

// Ceilings of the GPU the kernels are written for (H100 SXM), from
// /work/shared/DESIGN.md "Performance method": 3.35 TB/s HBM (spec; about
// 3.0 TB/s measured copy).  DESIGN.md names no fp32 rate; 60 TFLOP/s is the
// H100's non-tensor fp32 rate in round numbers (67 spec).  The products run in
// fp32 (cuBLAS SGEMM, pedantic math: no TF32), so that is their ceiling.
// Fixed constants, not the device's own peaks, so that runs on different
// GPUs compare; the device and its HBM peak are in the JSON context.
constexpr double kHbmBytesPerSecond = 3.35e12;
constexpr double kFp32FlopsPerSecond = 60e12;

constexpr int64_t kForwardBatches[] = {512, 4096, 32768};
constexpr int64_t kRetrievalBatch = 4096;
// Brute force scores all N sums per token and head: fewer tokens per call.
constexpr int64_t kBruteBatch = 1024;
constexpr int64_t kTrainBatch = 4096;
constexpr int64_t kMaxBatch = 32768;

constexpr Shape kSmallN = {"n256", 512, 256};

// ------------------------------------------------------------ device memory

class DeviceBuffer {
public:
  DeviceBuffer() = default;
  explicit DeviceBuffer(size_t bytes) {
    if (cudaMalloc(&ptr_, bytes) != cudaSuccess) {
      ptr_ = nullptr;
      cudaGetLastError(); // an allocation failure is reported by get() == NULL
    }
  }
  ~DeviceBuffer() {
    if (ptr_) cudaFree(ptr_);
  }
  DeviceBuffer(DeviceBuffer &&o) noexcept : ptr_(std::exchange(o.ptr_, nullptr)) {}
  DeviceBuffer &operator=(DeviceBuffer &&o) noexcept {
    std::swap(ptr_, o.ptr_);
    return *this;
  }
  DeviceBuffer(const DeviceBuffer &) = delete;
  DeviceBuffer &operator=(const DeviceBuffer &) = delete;
  template <class T> T *get() const { return static_cast<T *>(ptr_); }

private:
  void *ptr_ = nullptr;
};

std::string cuda_message(const char *what, cudaError_t e) {
  return std::string(what) + ": " + cudaGetErrorString(e);
}

peer_options cuda_options() {
  peer_options opt;
  peer_options_default(&opt);
  opt.backend = PEER_BACKEND_CUDA;
  opt.device = 0;
  return opt;
}

// What every benchmark shares: the stream, the timing events, the L2 flush
// buffer, random input tokens, an output buffer and the layers.  Created in
// main once a device is known to exist; freed before main returns (not at
// static destruction, when the CUDA runtime may be gone).
class Env {
public:
  // Empty string on success, else what failed.
  std::string open() {
    cudaError_t e;
    if ((e = cudaSetDevice(0)) != cudaSuccess) return cuda_message("cudaSetDevice", e);
    if ((e = cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking)) != cudaSuccess)
      return cuda_message("cudaStreamCreate", e);
    if ((e = cudaEventCreate(&start)) != cudaSuccess || (e = cudaEventCreate(&stop)) != cudaSuccess)
      return cuda_message("cudaEventCreate", e);
    int l2 = 0;
    if ((e = cudaDeviceGetAttribute(&l2, cudaDevAttrL2CacheSize, 0)) != cudaSuccess)
      return cuda_message("cudaDeviceGetAttribute(L2 size)", e);
    flush_bytes_ = 2 * size_t(std::max(l2, 1 << 20));
    flush_ = DeviceBuffer(flush_bytes_);
    // x for the largest batch, then dy for the training step.
    const size_t pool_floats = size_t((kMaxBatch + kTrainBatch) * kReference.d_model);
    tokens_ = DeviceBuffer(pool_floats * sizeof(float));
    out_ = DeviceBuffer(size_t(kMaxBatch * kReference.d_model) * sizeof(float));
    if (!flush_.get<void>() || !tokens_.get<void>() || !out_.get<void>())
      return "cudaMalloc of the flush buffer and token pool failed";
    std::vector<float> host = random_tokens(kMaxBatch + kTrainBatch, kReference.d_model, 1234);
    if ((e = cudaMemcpy(tokens_.get<void>(), host.data(), pool_floats * sizeof(float),
                        cudaMemcpyHostToDevice)) != cudaSuccess)
      return cuda_message("cudaMemcpy of the token pool", e);
    return "";
  }

  ~Env() {
    layers_.reset();
    if (start) cudaEventDestroy(start);
    if (stop) cudaEventDestroy(stop);
    if (stream) cudaStreamDestroy(stream);
  }

  // Evict L2: queued on the stream ahead of the start event.
  cudaError_t flush_l2() {
    return cudaMemsetAsync(flush_.get<void>(), ++flush_value_ & 0xff, flush_bytes_, stream);
  }

  // Random normal tokens [kMaxBatch, d] and, after them, [kTrainBatch, d].
  const float *x() const { return tokens_.get<float>(); }
  const float *dy() const { return tokens_.get<float>() + kMaxBatch * kReference.d_model; }
  float *out() const { return out_.get<float>(); }

  // Layers live for the whole run: created and initialised on first use
  // (peer_layer_init fills a host copy of each tensor and uploads it: seconds
  // for the 4 GiB reference f32 tables).  NULL, with the library's message in
  // *error, if that fails.
  // NULL after SkipWithError (with the library's message) if that fails.
  peer_layer *layer(benchmark::State &state, const Shape &shape, peer_dtype dtype) {
    std::string error;
    peer_layer *l = layers_->get(shape, dtype, &error);
    if (!l) state.SkipWithError(error.c_str());
    return l;
  }

  cudaStream_t stream = nullptr;
  cudaEvent_t start = nullptr, stop = nullptr;

private:
  DeviceBuffer flush_, tokens_, out_;
  size_t flush_bytes_ = 0;
  unsigned flush_value_ = 0;
  std::unique_ptr<LayerCache> layers_{new LayerCache(cuda_options())};
};

Env *g_env = nullptr;

// Times `call` (which queues its work on g_env->stream and returns the
// status of queuing it): one untimed call, then per iteration an L2 flush and
// the call between two events.  False (the benchmark skipped with the error)
// if anything failed, including what peer_cuda_check finds after the loop.
template <class Call> bool time_on_stream(benchmark::State &state, peer_layer *layer, Call call) {
  Env &env = *g_env;
  if (call() != PEER_OK || peer_cuda_check(layer, env.stream) != PEER_OK) {
    state.SkipWithError(peer_last_error());
    return false;
  }
  for (auto _ : state) {
    cudaError_t e = env.flush_l2();
    if (e == cudaSuccess) e = cudaEventRecord(env.start, env.stream);
    if (e != cudaSuccess) {
      state.SkipWithError(cuda_message("L2 flush / start event", e).c_str());
      return false;
    }
    const peer_status st = call();
    float ms = 0.0f;
    e = cudaEventRecord(env.stop, env.stream);
    if (e == cudaSuccess) e = cudaEventSynchronize(env.stop);
    if (e == cudaSuccess) e = cudaEventElapsedTime(&ms, env.start, env.stop);
    if (st != PEER_OK) {
      state.SkipWithError(peer_last_error());
      return false;
    }
    if (e != cudaSuccess) {
      state.SkipWithError(cuda_message("stop event", e).c_str());
      return false;
    }
    state.SetIterationTime(double(ms) * 1e-3);
  }
  if (peer_cuda_check(layer, env.stream) != PEER_OK) {
    state.SkipWithError(peer_last_error());
    return false;
  }
  return true;
}

// ------------------------------------------------------------ cost per token

// Per-token work (PEER.md "Cost per token") and the bytes that must cross HBM:
// per-token bytes plus, amortised over the batch, what a call reads once
// (query weight and sub-keys).  Intermediates (the [T, H, 2, n] sub-key
// scores, the top-k' lists) are the implementation's choice, not in the floor.
struct Cost {
  double macs = 0;
  double expert_bytes = 0; // the H*k gathered rows of u and of v
  double bytes = 0;        // everything, per token
  double floor_seconds() const {
    return std::max(bytes / kHbmBytesPerSecond, 2.0 * macs / kFp32FlopsPerSecond);
  }
  bool memory_bound() const {
    return bytes / kHbmBytesPerSecond >= 2.0 * macs / kFp32FlopsPerSecond;
  }
};

double fixed_bytes(const peer_config &c) { // Wq [H*d_key, d] and keys [G, 2, n, d_key/2], f32
  double G = c.shared_keys ? 1.0 : double(c.n_heads);
  return 4.0 * (double(c.n_heads * c.d_key * c.d_model) + G * double(c.n_subkeys * c.d_key));
}

Cost retrieval_cost(const peer_config &c, int64_t batch) {
  double d = double(c.d_model), H = double(c.n_heads), k = double(c.top_k);
  double dk = double(c.d_key), n = double(c.n_subkeys);
  Cost cost;
  cost.macs = d * H * dk + H * n * dk;
  // x in; ids, scores and gates out
  cost.bytes = 4.0 * d + H * k * (8 + 4 + 4) + fixed_bytes(c) / double(batch);
  return cost;
}

Cost forward_cost(const peer_config &c, int64_t batch) {
  const Work w = forward_work(c);
  Cost cost;
  cost.macs = w.macs;
  cost.expert_bytes = w.expert_bytes;
  cost.bytes =
      cost.expert_bytes + 2.0 * 4.0 * double(c.d_model) + fixed_bytes(c) / double(batch); // + x, y
  return cost;
}

// A training step (common.h train_work); bytes: the expert rows read in both
// passes, one f32 gradient row pair (and its id) written per distinct expert
// the batch used, x, y, dy, dx, and Wq and the keys read twice with their
// gradients written once.
Cost train_cost(const peer_config &c, int64_t batch, double distinct_rows_per_token) {
  const Work w = train_work(c);
  const double d = double(c.d_model);
  Cost cost;
  cost.macs = w.macs;
  cost.expert_bytes = w.expert_bytes;
  cost.bytes = cost.expert_bytes + distinct_rows_per_token * (2.0 * 4.0 * d + 8.0) + 4.0 * 4.0 * d +
               3.0 * fixed_bytes(c) / double(batch);
  return cost;
}

void set_counters(benchmark::State &state, const Cost &cost, int64_t batch,
                  const std::string &label_prefix = "") {
  using benchmark::Counter;
  const double tokens = double(state.iterations()) * double(batch);
  state.counters["tokens/s"] = Counter(tokens, Counter::kIsRate);
  if (cost.expert_bytes > 0)
    state.counters["expert_B/s"] = Counter(tokens * cost.expert_bytes, Counter::kIsRate);
  state.counters["MAC/s"] = Counter(tokens * cost.macs, Counter::kIsRate);
  // Achieved over floor tokens/s (as bench_forward), and the floor bytes
  // moved per second as a fraction of the HBM ceiling.
  state.counters["floor_frac"] = Counter(tokens * cost.floor_seconds(), Counter::kIsRate);
  state.counters["HBM_frac"] = Counter(tokens * cost.bytes / kHbmBytesPerSecond, Counter::kIsRate);
  char label[96];
  std::snprintf(label, sizeof label, "H100 floor %.3f us/token (%s bound)",
                1e6 * cost.floor_seconds(), cost.memory_bound() ? "HBM" : "fp32");
  state.SetLabel(label_prefix + label);
}

// ------------------------------------------------------------ benchmarks

void forward(benchmark::State &state, Shape shape, peer_dtype dtype, int64_t batch) {
  Env &env = *g_env;
  peer_layer *layer = env.layer(state, shape, dtype);
  if (!layer) return;
  const float *x = env.x();
  float *y = env.out();
  if (!time_on_stream(state, layer, [&] {
        return peer_cuda_forward(layer, batch, x, y, nullptr, nullptr, env.stream);
      }))
    return;
  set_counters(state, forward_cost(*peer_layer_config(layer), batch), batch);
}

void retrieve(benchmark::State &state, Shape shape, bool brute, int64_t batch) {
  Env &env = *g_env;
  // Retrieval never reads the expert tables: bf16 layers (half the memory
  // and set-up time), the same ones the bf16 forward uses at n = 1024.
  peer_layer *layer = env.layer(state, shape, PEER_BF16);
  if (!layer) return;
  const peer_config &cfg = *peer_layer_config(layer);
  const size_t thk = size_t(batch * cfg.n_heads * cfg.top_k);
  DeviceBuffer ids(thk * sizeof(int64_t)), scores(thk * sizeof(float)), gates(thk * sizeof(float));
  if (!ids.get<void>() || !scores.get<void>() || !gates.get<void>()) {
    state.SkipWithError("cudaMalloc of the retrieval outputs failed");
    return;
  }
  const float *x = env.x();
  auto call = brute ? peer_cuda_retrieve_brute : peer_cuda_retrieve;
  if (!time_on_stream(state, layer, [&] {
        return call(layer, batch, x, ids.get<int64_t>(), scores.get<float>(), gates.get<float>(),
                    env.stream);
      }))
    return;
  const std::string n_experts = "N=" + std::to_string(peer_config_n_experts(&cfg));
  if (!brute) {
    set_counters(state, retrieval_cost(cfg, batch), batch, n_experts + ", ");
    return;
  }
  // Brute force has no product-key floor; count the sums it scores.
  using benchmark::Counter;
  const double tokens = double(state.iterations()) * double(batch);
  state.counters["tokens/s"] = Counter(tokens, Counter::kIsRate);
  state.counters["sums/s"] =
      Counter(tokens * double(cfg.n_heads) * double(peer_config_n_experts(&cfg)), Counter::kIsRate);
  state.SetLabel(n_experts);
}

void train_step(benchmark::State &state, Shape shape, peer_dtype dtype, int64_t batch) {
  Env &env = *g_env;
  peer_layer *layer = env.layer(state, shape, dtype);
  if (!layer) return;
  const peer_config &cfg = *peer_layer_config(layer);
  const int64_t d = cfg.d_model, entries = batch * cfg.n_heads * cfg.top_k;
  peer_tensor keys;
  peer_context *raw_ctx = nullptr;
  size_t ctx_bytes = 0;
  if (peer_layer_param_by_name(layer, "keys", &keys) != PEER_OK ||
      peer_context_size(layer, batch, &ctx_bytes) != PEER_OK ||
      peer_context_create(&raw_ctx, layer, batch) != PEER_OK) {
    state.SkipWithError(peer_last_error());
    return;
  }
  std::unique_ptr<peer_context, void (*)(peer_context *)> ctx(raw_ctx, peer_context_free);
  // Dense gradients of Wq and the keys (the reference layer has no bias or
  // norm), sparse expert rows, dx: all device memory.
  DeviceBuffer g_wq(size_t(cfg.n_heads * cfg.d_key * d) * sizeof(float)), g_keys(keys.nbytes);
  DeviceBuffer rows(size_t(entries) * sizeof(int64_t)), n_rows(sizeof(int64_t));
  DeviceBuffer g_down(size_t(entries * d) * sizeof(float)),
      g_up(size_t(entries * d) * sizeof(float));
  DeviceBuffer dx(size_t(batch * d) * sizeof(float));
  if (!g_wq.get<void>() || !g_keys.get<void>() || !rows.get<void>() || !n_rows.get<void>() ||
      !g_down.get<void>() || !g_up.get<void>() || !dx.get<void>()) {
    state.SkipWithError("cudaMalloc of the gradient buffers failed");
    return;
  }
  peer_grads g = {};
  g.query_weight = g_wq.get<float>();
  g.keys = g_keys.get<float>();
  g.expert_capacity = entries;
  g.expert_rows = rows.get<int64_t>();
  g.experts_down = g_down.get<float>();
  g.experts_up = g_up.get<float>();
  const float *x = env.x(), *dy = env.dy();
  float *y = env.out();
  if (!time_on_stream(state, layer, [&] {
        peer_status st = peer_cuda_forward_train(layer, ctx.get(), batch, x, y, env.stream);
        return st != PEER_OK ? st
                             : peer_cuda_backward(layer, ctx.get(), dy, dx.get<float>(), &g,
                                                  n_rows.get<int64_t>(), env.stream);
      }))
    return;
  // Every iteration runs on the same tokens: the last count is every count.
  int64_t distinct = 0;
  cudaError_t e =
      cudaMemcpy(&distinct, n_rows.get<void>(), sizeof distinct, cudaMemcpyDeviceToHost);
  if (e != cudaSuccess) {
    state.SkipWithError(cuda_message("reading n_expert_rows", e).c_str());
    return;
  }
  const double rows_per_token = double(distinct) / double(batch);
  set_counters(state, train_cost(cfg, batch, rows_per_token), batch);
  // Distinct experts per token (at most H*k = 128) and the training context
  // (device memory) per token.
  state.counters["expert_rows/token"] = rows_per_token;
  state.counters["ctx_KiB/token"] = double(ctx_bytes) / 1024.0 / double(batch);
}

const char *dtype_name(peer_dtype t) { return t == PEER_F32 ? "f32" : "bf16"; }

void register_all() {
  const peer_dtype dtypes[] = {PEER_F32, PEER_BF16};
  for (peer_dtype dtype : dtypes)
    for (int64_t batch : kForwardBatches) {
      std::string name = std::string("cuda_forward/") + kReference.name + "/" + dtype_name(dtype) +
                         "/batch:" + std::to_string(batch);
      benchmark::RegisterBenchmark(name.c_str(), forward, kReference, dtype, batch)
          ->UseManualTime()
          ->Unit(benchmark::kMicrosecond)
          ->MinTime(0.5);
    }
  for (const Shape &shape : {kSmallN, kMidN, kReference})
    for (bool brute : {false, true}) {
      const int64_t batch = brute ? kBruteBatch : kRetrievalBatch;
      std::string name = std::string("cuda_retrieve/") + (brute ? "brute" : "pk") +
                         "/n:" + std::to_string(shape.n_subkeys) + "/H:8/d_key:256/k:16" +
                         "/batch:" + std::to_string(batch);
      benchmark::RegisterBenchmark(name.c_str(), retrieve, shape, brute, batch)
          ->UseManualTime()
          ->Unit(benchmark::kMicrosecond)
          ->MinTime(0.5);
    }
  for (peer_dtype dtype : dtypes) {
    std::string name = std::string("cuda_train_step/") + kReference.name + "/" + dtype_name(dtype) +
                       "/batch:" + std::to_string(kTrainBatch);
    benchmark::RegisterBenchmark(name.c_str(), train_step, kReference, dtype, kTrainBatch)
        ->UseManualTime()
        ->Unit(benchmark::kMicrosecond)
        ->MinTime(0.5);
  }
}

// "NVIDIA H100 80GB HBM3, sm_90, 132 SMs, 50 MiB L2, 3.35 TB/s HBM peak".
std::string describe_device() {
  cudaDeviceProp prop;
  if (cudaGetDeviceProperties(&prop, 0) != cudaSuccess) return "device 0";
  int mem_khz = 0, bus_bits = 0, l2 = 0;
  cudaDeviceGetAttribute(&mem_khz, cudaDevAttrMemoryClockRate, 0);
  cudaDeviceGetAttribute(&bus_bits, cudaDevAttrGlobalMemoryBusWidth, 0);
  cudaDeviceGetAttribute(&l2, cudaDevAttrL2CacheSize, 0);
  const double peak = 2.0 * double(mem_khz) * 1e3 * double(bus_bits) / 8.0; // DDR
  char numbers[128];
  std::snprintf(numbers, sizeof numbers, ", sm_%d%d, %d SMs, %.0f MiB L2, %.2f TB/s HBM peak",
                prop.major, prop.minor, prop.multiProcessorCount, double(l2) / (1 << 20),
                peak / 1e12);
  return std::string(prop.name) + numbers;
}

} // namespace

int main(int argc, char **argv) {
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  if (peer_cuda_device_count() == 0) {
    std::fprintf(stderr, "bench_cuda: no CUDA device; CUDA benchmarks skipped\n");
    return 0;
  }
  int status = 0;
  {
    Env env;
    const std::string error = env.open();
    if (!error.empty()) {
      std::fprintf(stderr, "bench_cuda: %s\n", error.c_str());
      status = 1;
    } else {
      g_env = &env;
      benchmark::AddCustomContext("cuda_device", describe_device());
      register_all();
      benchmark::RunSpecifiedBenchmarks();
      g_env = nullptr;
    }
  }
  benchmark::Shutdown();
  return status;
}
