/* cuda_runtime.h (emulated): what the kernel sources (kernels/, .cu) use on
 * the device side, compiled as host C++ for the PEER_CUDA=EMU build.  Each CUDA thread is a
 * fiber (simt.cc); blocks of a grid run one after another on the launching
 * host thread.  __syncthreads is a block barrier and the warp collectives
 * wait for every lane their mask names, so nothing assumes warps run in
 * lockstep; a collective or barrier that not every named thread reaches is
 * a kernel error (the launch fails), never a hang.  Static __shared__
 * variables are thread_local (one copy per host thread; blocks take turns);
 * dynamic shared memory (extern __shared__) is one thread_local array per
 * name, defined by the build (smem.h), refilled with 0xff (NaN) for every
 * block, and ASan-poisoned past the launch's size. */
#ifndef PEER_EMU_CUDA_RUNTIME_H
#define PEER_EMU_CUDA_RUNTIME_H

#include "cuda_runtime_api.h"
#include "peer_emu.h"

#ifdef __cplusplus
#include <math.h>
#include <stdint.h>
#include <string.h>

#include <memory>
#include <tuple>
#include <type_traits>
#include <utility>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__ __attribute__((noinline))
#define __launch_bounds__(...)
#define __shared__ thread_local
#define __constant__

struct uint3 {
  unsigned int x, y, z;
};
struct dim3 {
  unsigned int x, y, z;
  constexpr dim3(unsigned int vx = 1, unsigned int vy = 1, unsigned int vz = 1)
      : x(vx), y(vy), z(vz) {}
  constexpr dim3(uint3 v) : x(v.x), y(v.y), z(v.z) {}
};
struct alignas(8) float2 {
  float x, y;
};
struct alignas(16) float4 {
  float x, y, z, w;
};
struct alignas(8) uint2 {
  unsigned int x, y;
};
struct alignas(16) uint4 {
  unsigned int x, y, z, w;
};
struct alignas(16) int4 {
  int x, y, z, w;
};
static inline float2 make_float2(float x, float y) { return float2{x, y}; }
static inline float4 make_float4(float x, float y, float z, float w) { return float4{x, y, z, w}; }
static inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) {
  return uint4{x, y, z, w};
}

#define warpSize 32

namespace peer_emu {

/* The running CUDA thread's coordinates. */
struct thread_ctx {
  uint3 idx, bidx;
  dim3 bdim, gdim;
};
thread_ctx *self();

/* Collectives (simt.cc).  op: the warp operation; param: source lane,
 * delta or lane mask; width: the shuffle's segment. */
enum warp_op { W_SHFL, W_SHFL_UP, W_SHFL_DOWN, W_SHFL_XOR, W_BALLOT, W_ANY, W_ALL, W_SYNC };
uint64_t warp_collective(warp_op op, unsigned mask, uint64_t value, int param, int width);
enum bar_op { B_SYNC, B_OR, B_AND, B_COUNT };
int block_barrier(bar_op op, int pred);
unsigned active_mask();

/* Adds n to a work counter of peer_emu_counts (PEER_K_COUNT in
 * kernels/common.cuh; read with peer_emu_get_counts). */
void count_work(unsigned long long peer_emu_counts::*counter, unsigned long long n);

template <class T> static inline uint64_t bits_of(T v) {
  static_assert(sizeof(T) <= 8 && std::is_trivially_copyable<T>::value, "shuffle of a large type");
  uint64_t b = 0;
  memcpy(&b, &v, sizeof v);
  return b;
}
template <class T> static inline T from_bits(uint64_t b) {
  T v;
  memcpy(&v, &b, sizeof v);
  return v;
}

/* Launching (simt.cc): checks the configuration, queues the grid on the
 * stream (every block runs, in the stream's order: runtime.cc), and turns
 * a kernel error into an error of the next synchronisation (and of
 * cudaGetLastError when the grid ran at once).  ctx (the parameters) lives
 * as long as the queued grid. */
struct launch_config {
  const char *name;
  dim3 grid, block;
  size_t smem;
  cudaStream_t stream;
  const void *kernel; /* the instance (PEER_EMU_KERNELS) */
};
void launch(const launch_config &cfg, void (*body)(void *), std::shared_ptr<void> ctx);
/* A non-NULL pointer argument outside device memory fails the launch. */
bool pointer_arg_ok(const launch_config &cfg, int index, const void *p);

template <class... P> struct kernel_launch {
  void (*kernel)(P...);
  launch_config cfg;
  template <class T> static bool arg_ok(const launch_config &c, int i, const T &v) {
    if constexpr (std::is_pointer<T>::value) return pointer_arg_ok(c, i, (const void *)v);
    (void)c, (void)i, (void)v;
    return true;
  }
  template <class... A> void operator()(A &&...args) const {
    static_assert(sizeof...(A) == sizeof...(P), "kernel launch: wrong number of arguments");
    /* one copy of the arguments, as the launch's parameter buffer; every
     * thread gets its own copies of it */
    typedef std::tuple<typename std::decay<P>::type...> params;
    struct frame {
      void (*k)(P...);
      params p;
    };
    auto f = std::make_shared<frame>(frame{kernel, params(std::forward<A>(args)...)});
    bool ok = std::apply(
        [&](const auto &...v) {
          int i = 0;
          return (arg_ok(cfg, i++, v) && ...);
        },
        f->p);
    if (!ok) return;
    launch(
        cfg,
        [](void *c) {
          frame *fr = (frame *)c;
          std::apply(fr->k, fr->p);
        },
        f);
  }
};

template <class... P>
kernel_launch<P...> make_launch(const char *name, dim3 grid, dim3 block, size_t smem,
                                cudaStream_t stream, void (*kernel)(P...)) {
  return kernel_launch<P...>{kernel, {name, grid, block, smem, stream, (const void *)kernel}};
}

} // namespace peer_emu

/* The launch as the emulator spells it; kernels/common.cuh's PEER_LAUNCH
 * picks this or <<<>>>. */
#define PEER_EMU_LAUNCH(grid, block, smem, stream, ...)                                            \
  ::peer_emu::make_launch(#__VA_ARGS__, grid, block, smem, stream, __VA_ARGS__)

#define threadIdx (::peer_emu::self()->idx)
#define blockIdx (::peer_emu::self()->bidx)
#define blockDim (::peer_emu::self()->bdim)
#define gridDim (::peer_emu::self()->gdim)

static inline void __syncthreads() { ::peer_emu::block_barrier(::peer_emu::B_SYNC, 0); }
static inline int __syncthreads_or(int p) { return ::peer_emu::block_barrier(::peer_emu::B_OR, p); }
static inline int __syncthreads_and(int p) {
  return ::peer_emu::block_barrier(::peer_emu::B_AND, p);
}
static inline int __syncthreads_count(int p) {
  return ::peer_emu::block_barrier(::peer_emu::B_COUNT, p);
}
static inline void __syncwarp(unsigned mask = 0xffffffffu) {
  ::peer_emu::warp_collective(::peer_emu::W_SYNC, mask, 0, 0, 32);
}
static inline unsigned __activemask() { return ::peer_emu::active_mask(); }
static inline unsigned __ballot_sync(unsigned mask, int p) {
  return (unsigned)::peer_emu::warp_collective(::peer_emu::W_BALLOT, mask, p != 0, 0, 32);
}
static inline int __any_sync(unsigned mask, int p) {
  return (int)::peer_emu::warp_collective(::peer_emu::W_ANY, mask, p != 0, 0, 32);
}
static inline int __all_sync(unsigned mask, int p) {
  return (int)::peer_emu::warp_collective(::peer_emu::W_ALL, mask, p != 0, 0, 32);
}
template <class T> static inline T __shfl_sync(unsigned mask, T v, int src, int width = 32) {
  return ::peer_emu::from_bits<T>(
      ::peer_emu::warp_collective(::peer_emu::W_SHFL, mask, ::peer_emu::bits_of(v), src, width));
}
template <class T> static inline T __shfl_up_sync(unsigned mask, T v, unsigned d, int width = 32) {
  return ::peer_emu::from_bits<T>(::peer_emu::warp_collective(
      ::peer_emu::W_SHFL_UP, mask, ::peer_emu::bits_of(v), (int)d, width));
}
template <class T>
static inline T __shfl_down_sync(unsigned mask, T v, unsigned d, int width = 32) {
  return ::peer_emu::from_bits<T>(::peer_emu::warp_collective(
      ::peer_emu::W_SHFL_DOWN, mask, ::peer_emu::bits_of(v), (int)d, width));
}
template <class T> static inline T __shfl_xor_sync(unsigned mask, T v, int lm, int width = 32) {
  return ::peer_emu::from_bits<T>(
      ::peer_emu::warp_collective(::peer_emu::W_SHFL_XOR, mask, ::peer_emu::bits_of(v), lm, width));
}

static inline void __threadfence() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
static inline void __threadfence_block() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }

template <class T> static inline T __ldg(const T *p) { return *p; }

static inline int __popc(unsigned int x) { return __builtin_popcount(x); }

static inline float __uint_as_float(unsigned int u) { return ::peer_emu::from_bits<float>(u); }
static inline unsigned int __float_as_uint(float f) { return (unsigned int)::peer_emu::bits_of(f); }
static inline float __int_as_float(int i) { return ::peer_emu::from_bits<float>((uint32_t)i); }
static inline int __float_as_int(float f) { return (int)(uint32_t)::peer_emu::bits_of(f); }

/* Atomics: relaxed, as CUDA's. */
template <class T> static inline T peer_emu_atomic_min(T *p, T v) {
  T old = __atomic_load_n(p, __ATOMIC_RELAXED);
  while (v < old &&
         !__atomic_compare_exchange_n(p, &old, v, true, __ATOMIC_RELAXED, __ATOMIC_RELAXED)) {
  }
  return old;
}
template <class T> static inline T peer_emu_atomic_max(T *p, T v) {
  T old = __atomic_load_n(p, __ATOMIC_RELAXED);
  while (v > old &&
         !__atomic_compare_exchange_n(p, &old, v, true, __ATOMIC_RELAXED, __ATOMIC_RELAXED)) {
  }
  return old;
}
static inline unsigned long long atomicMin(unsigned long long *p, unsigned long long v) {
  return peer_emu_atomic_min(p, v);
}
static inline int atomicMin(int *p, int v) { return peer_emu_atomic_min(p, v); }
static inline unsigned atomicMin(unsigned *p, unsigned v) { return peer_emu_atomic_min(p, v); }
static inline unsigned long long atomicMax(unsigned long long *p, unsigned long long v) {
  return peer_emu_atomic_max(p, v);
}
static inline int atomicMax(int *p, int v) { return peer_emu_atomic_max(p, v); }
static inline unsigned atomicMax(unsigned *p, unsigned v) { return peer_emu_atomic_max(p, v); }
static inline int atomicAdd(int *p, int v) { return __atomic_fetch_add(p, v, __ATOMIC_RELAXED); }
static inline unsigned atomicAdd(unsigned *p, unsigned v) {
  return __atomic_fetch_add(p, v, __ATOMIC_RELAXED);
}
static inline unsigned long long atomicAdd(unsigned long long *p, unsigned long long v) {
  return __atomic_fetch_add(p, v, __ATOMIC_RELAXED);
}
static inline float atomicAdd(float *p, float v) {
  uint32_t *w = (uint32_t *)p, old = __atomic_load_n(w, __ATOMIC_RELAXED), sum;
  do
    sum = __float_as_uint(__uint_as_float(old) + v);
  while (!__atomic_compare_exchange_n(w, &old, sum, true, __ATOMIC_RELAXED, __ATOMIC_RELAXED));
  return __uint_as_float(old);
}
template <class T> static inline T atomicCAS(T *p, T expected, T desired) {
  __atomic_compare_exchange_n(p, &expected, desired, false, __ATOMIC_RELAXED, __ATOMIC_RELAXED);
  return expected;
}
template <class T> static inline T atomicExch(T *p, T v) {
  return __atomic_exchange_n(p, v, __ATOMIC_RELAXED);
}

#endif /* __cplusplus */
#endif
