// bench_pieces.cc: the pieces of retrieval timed apart, so a user sees where
// the time goes: the query projection (X Wq^T), the sub-key scores
// (Q_half C^T for every head and half), the half top-k' selections and the
// candidate top-k merges, and the expert phase after them (gather the H*k
// experts' rows, dot, activation, gate, accumulate; f32 and bf16 tables).
// Each piece runs the CPU backend's own kernels (peer/cpu.h) on one thread
// over a batch of 512 tokens; the selections run on scores the real product
// computed, the expert phase on ids drawn uniformly from the N experts (fresh
// ones each iteration, so rows come from memory as in a forward).
// Counter: us/token of the piece.
//
// N = 256^2, 512^2, 1024^2 and 2048^2 at H = 8, d_key = 256, k = k' = 16,
// d_model = 512 (the reference config at n = 1024); the expert phase up to
// n = 1024 (at n = 2048 the f32 tables alone take 16 GiB).
#include <benchmark/benchmark.h>

#include <cstdint>
#include <cstdlib>
#include <random>
#include <string>
#include <vector>

extern "C" {
#include "cpu.h"
}

namespace {

constexpr int64_t kTokens = 512;

struct Setup {
  peer_layer *layer = nullptr;
  std::vector<float> x;
  void *ws = nullptr;
  size_t ws_bytes = 0;
  cpu_ws w{};
  std::vector<float> q, scores; // q [T, dq]; scores [T, H, 2, n]
};

// Layer (query weight and keys filled; expert tables untouched), input,
// workspace, and the queries and sub-key scores the later pieces start from.
bool make_setup(int64_t n, Setup *s, std::string *error, peer_dtype dtype = PEER_F32) {
  peer_config cfg;
  peer_config_default(&cfg);
  cfg.n_subkeys = n;
  cfg.weight_dtype = dtype;
  peer_options opt;
  peer_options_default(&opt);
  opt.n_threads = 1;
  if (peer_layer_create(&s->layer, &cfg, &opt) != PEER_OK) {
    *error = peer_last_error();
    return false;
  }
  std::mt19937 rng(7);
  std::uniform_real_distribution<float> u(-0.06f, 0.06f);
  for (const char *name : {"query.weight", "keys"}) {
    peer_tensor t;
    peer_layer_param_by_name(s->layer, name, &t);
    float *p = static_cast<float *>(t.data);
    for (size_t i = 0; i < t.nbytes / sizeof(float); i++)
      p[i] = u(rng);
  }
  std::normal_distribution<float> normal(0.0f, 1.0f);
  s->x.resize(size_t(kTokens * cfg.d_model));
  for (float &v : s->x)
    v = normal(rng);
  peer_layer_workspace_size(s->layer, kTokens, &s->ws_bytes);
  s->ws = std::aligned_alloc(64, (s->ws_bytes + 63) / 64 * 64);
  peer_cpu_layout(s->layer, kTokens, s->ws, &s->w);
  const peer_dims &D = s->layer->dims;
  const int64_t ldq = peer_cpu_q_stride(&D);
  s->q.resize(size_t(kTokens * ldq));
  peer_cpu_project(s->layer, kTokens, s->x.data(), s->q.data(), ldq, &s->w, 1);
  s->scores.resize(size_t(kTokens * D.H * 2 * D.n));
  const float *keys = static_cast<const float *>(s->layer->slot[PEER_P_KEYS].data);
  for (int64_t t0 = 0; t0 < kTokens; t0 += TB)
    for (int64_t h = 0; h < D.H; h++)
      for (int p = 0; p < 2; p++)
        peer_cpu_gemm_nt(TB, D.n, D.half, s->q.data() + t0 * ldq + h * D.dk + p * D.half, ldq,
                         keys + ((h * 2 + p) * D.n) * D.half, D.half,
                         s->scores.data() + ((t0 * D.H + h) * 2 + p) * D.n, D.H * 2 * D.n,
                         peer_cpu_thread_pack(&s->w, &D));
  return true;
}

void free_setup(Setup *s) {
  std::free(s->ws);
  peer_layer_free(s->layer);
}

enum Piece { kProjection, kScores, kHalfTopk, kMerge };

// The expert phase on its own: peer_cpu_apply_experts over random ids.
void experts_piece(benchmark::State &state, int64_t n, peer_dtype dtype) {
  Setup s;
  std::string error;
  if (!make_setup(n, &s, &error, dtype) || peer_layer_init(s.layer, 3) != PEER_OK) {
    if (error.empty()) error = peer_last_error();
    state.SkipWithError(error.c_str());
    free_setup(&s);
    return;
  }
  const peer_dims &D = s.layer->dims;
  const int64_t hk = D.H * D.k;
  std::vector<int64_t> ids(size_t(kTokens * hk));
  std::vector<float> gates(ids.size(), 1.0f / float(D.k)), y(s.x.size());
  std::mt19937_64 rng(11);
  std::uniform_int_distribution<int64_t> pick(0, D.N - 1);
  for (int64_t &id : ids) // one untimed pass: the first touch of the tables
    id = pick(rng);
  peer_cpu_apply_experts(s.layer, kTokens, s.x.data(), y.data(), ids.data(), gates.data(),
                         nullptr, &s.w, 1);
  for (auto _ : state) {
    state.PauseTiming();
    for (int64_t &id : ids)
      id = pick(rng);
    state.ResumeTiming();
    peer_cpu_apply_experts(s.layer, kTokens, s.x.data(), y.data(), ids.data(), gates.data(),
                           nullptr, &s.w, 1);
    benchmark::DoNotOptimize(y.data());
    benchmark::ClobberMemory();
  }
  state.counters["us/token"] = benchmark::Counter(
      double(state.iterations()) * double(kTokens) * 1e-6,
      benchmark::Counter::kIsRate | benchmark::Counter::kInvert);
  free_setup(&s);
}

void piece(benchmark::State &state, int64_t n, Piece which) {
  Setup s;
  std::string error;
  if (!make_setup(n, &s, &error)) {
    state.SkipWithError(error.c_str());
    return;
  }
  const peer_dims &D = s.layer->dims;
  const float *keys = static_cast<const float *>(s.layer->slot[PEER_P_KEYS].data);
  const int kp = int(D.kp), k = int(D.k);
  std::vector<float> s1(kp), s2(kp), out_s(k), lo(k);
  std::vector<int64_t> a1(kp), a2(kp), out_id(k);
  // Lists for the merge: each (token, head)'s two halves, selected once.
  const int64_t ldq = peer_cpu_q_stride(&D), ls = peer_cpu_s_stride(D.n);
  std::vector<float> blk(size_t(TB * ls)); // one block's S, laid out as retrieval's
  std::vector<float> lsc(size_t(kTokens * D.H * 2 * kp));
  std::vector<int64_t> li(lsc.size());
  for (int64_t r = 0; r < kTokens * D.H * 2; r++)
    peer_cpu_topk_scan(s.scores.data() + r * D.n, int(D.n), kp, lsc.data() + r * kp,
                       li.data() + r * kp);
  for (auto _ : state) {
    switch (which) {
    case kProjection:
      peer_cpu_project(s.layer, kTokens, s.x.data(), s.q.data(), ldq, &s.w, 1);
      break;
    case kScores:
      for (int64_t h = 0; h < D.H; h++)
        for (int64_t t0 = 0; t0 < kTokens; t0 += TB)
          for (int p = 0; p < 2; p++)
            peer_cpu_gemm_nt(TB, D.n, D.half, s.q.data() + t0 * ldq + h * D.dk + p * D.half, ldq,
                             keys + ((h * 2 + p) * D.n) * D.half, D.half, blk.data() + p * D.n, ls,
                             peer_cpu_thread_pack(&s.w, &D));
      break;
    case kHalfTopk:
      for (int64_t r = 0; r < kTokens * D.H; r++) {
        peer_cpu_topk_scan(s.scores.data() + (2 * r) * D.n, int(D.n), kp, s1.data(), a1.data());
        peer_cpu_topk_scan(s.scores.data() + (2 * r + 1) * D.n, int(D.n), kp, s2.data(),
                           a2.data());
      }
      break;
    case kMerge:
      for (int64_t r = 0; r < kTokens * D.H; r++)
        peer_merge_candidates(lsc.data() + 2 * r * kp, li.data() + 2 * r * kp,
                              lsc.data() + (2 * r + 1) * kp, li.data() + (2 * r + 1) * kp, kp, k,
                              D.n, out_s.data(), lo.data(), out_id.data());
      break;
    }
    benchmark::DoNotOptimize(blk.data());
    benchmark::DoNotOptimize(out_id.data());
    benchmark::ClobberMemory();
  }
  state.counters["us/token"] = benchmark::Counter(
      double(state.iterations()) * double(kTokens) * 1e-6,
      benchmark::Counter::kIsRate | benchmark::Counter::kInvert);
  free_setup(&s);
}

void register_all() {
  const char *names[] = {"query_projection", "subkey_scores", "half_topk", "candidate_topk"};
  for (int64_t n : {256, 512, 1024, 2048})
    for (int p = 0; p < 4; p++) {
      std::string name = std::string("pieces/") + names[p] + "/n:" + std::to_string(n) +
                         "/H:8/d_key:256/k:16/batch:512/threads:1";
      benchmark::RegisterBenchmark(name.c_str(), piece, n, Piece(p))
          ->UseRealTime()
          ->Unit(benchmark::kMillisecond)
          ->MinTime(0.3);
    }
  for (int64_t n : {256, 512, 1024})
    for (peer_dtype dt : {PEER_F32, PEER_BF16}) {
      std::string name = std::string("pieces/experts_") + (dt == PEER_F32 ? "f32" : "bf16") +
                         "/n:" + std::to_string(n) + "/H:8/d_key:256/k:16/batch:512/threads:1";
      benchmark::RegisterBenchmark(name.c_str(), experts_piece, n, dt)
          ->UseRealTime()
          ->Unit(benchmark::kMillisecond)
          ->MinTime(1.0);
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
