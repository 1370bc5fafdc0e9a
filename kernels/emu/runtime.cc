/* runtime.cc: the emulated CUDA runtime.  One device (device 0, 16 GiB);
 * cudaMalloc hands out host memory (256-byte aligned, exactly the size
 * asked for, so that ASan sees overruns) and tracks it, so that
 * cudaPointerGetAttributes, cudaMemGetInfo and a free of an unknown or
 * already freed pointer behave as the real runtime's; copies and memsets
 * check that their device side is device memory.  Work queued on a stream
 * (kernels, cuBLAS products, CUB sorts, asynchronous copies and memsets)
 * goes through enqueue(): by default it runs at once, in order, so
 * synchronising only reports errors.  With lazy streams
 * (peer_emu_lazy_streams, PEER_EMU_LAZY_STREAMS=1) work queued on a stream
 * the program created waits in the stream's queue and runs only when
 * something needs it: a synchronisation of the stream, the device or an
 * event recorded behind it, a cudaStreamWaitEvent on the legacy stream, a
 * stream that waits for that event and is itself run, any work on the
 * legacy stream (which waits for the blocking streams), a cudaFree (which
 * waits for the device, as the real one does in practice), a copy into
 * pageable host memory.  That is later than any GPU would run it, so a
 * missing cudaStreamWaitEvent (work that reads another stream's results
 * without waiting for them) reads stale memory and a test sees it.
 * Errors follow the runtime's rules: a failed call sets the last error
 * (cudaGetLastError returns and clears it); a kernel error (simt.cc) is
 * also returned by the next synchronisation.  Counters and an injected
 * allocation failure serve the tests (peer_emu.h). */
#include "emu_internal.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <atomic>
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <set>
#include <string>
#include <vector>

/* One entry of a lazy stream's queue: work, or a wait for another stream's
 * first `until` entries (cudaStreamWaitEvent). */
struct queued_op {
  std::function<void()> run;
  CUstream_st *wait_on;
  unsigned long long until;
};
struct CUstream_st {
  unsigned flags;
  std::deque<queued_op> ops; /* not yet run (lazy streams only) */
  unsigned long long queued, done;
  bool capturing; /* what cudaStreamIsCapturing reports (peer_emu_set_capturing) */
};
struct CUevent_st {
  double ms; /* when it was recorded */
  bool recorded;
  CUstream_st *stream; /* complete once stream->done >= at; null: complete */
  unsigned long long at;
};

namespace peer_emu {
namespace {

constexpr size_t device_bytes = (size_t)16 << 30;

std::mutex mem_lock; /* guards everything below but the atomics */
std::map<uintptr_t, size_t> allocations;
std::set<uintptr_t> host_allocations;
size_t in_use = 0;
std::set<CUstream_st *> streams;
std::set<CUevent_st *> events;
std::string kernel_msg; /* the text of the last kernel error */
std::string launch_failure_text = "unspecified launch failure";

std::atomic<unsigned long long> n_device_syncs{0}, n_stream_syncs{0}, n_mallocs{0}, n_frees{0},
    n_launches{0}, n_kernel_errors{0}, n_blas_default_workspace{0};
peer_emu_counts work_counts; /* the kernels' (count_work), added to atomically */
std::atomic<long> fail_countdown{-1};
/* Lazy streams: the queues, their runs and the events' positions in them
 * (recursive: running a queue may run the queues it waits for). */
std::recursive_mutex stream_lock;
std::atomic<int> lazy{0}; /* peer_emu_lazy_streams' mode */

thread_local cudaError_t last_error = cudaSuccess;
std::atomic<int> pending_sync_error{cudaSuccess}; /* a kernel error, for the next sync */
thread_local int current_device = 0;

void init_lazy() {
  static std::once_flag once;
  std::call_once(once, [] {
    const char *e = getenv("PEER_EMU_LAZY_STREAMS");
    if (e && atoi(e) > 0) lazy = atoi(e) == 2 ? 2 : 1;
  });
}

bool default_stream(cudaStream_t s) {
  return s == nullptr || s == cudaStreamLegacy || s == cudaStreamPerThread;
}

/* Run s's queue until `target` entries of it have run (under stream_lock).
 * No cycle: a wait names entries queued before it. */
void run_until(CUstream_st *s, unsigned long long target) {
  while (s->done < target && !s->ops.empty()) {
    queued_op op = std::move(s->ops.front());
    s->ops.pop_front();
    if (op.wait_on) run_until(op.wait_on, op.until);
    if (op.run) op.run();
    s->done++;
  }
}

/* Run o's queue up to its first wait for work not yet run; whether it ran
 * anything. */
bool advance(CUstream_st *o) {
  bool moved = false;
  while (!o->ops.empty()) {
    queued_op &front = o->ops.front();
    if (front.wait_on && front.wait_on->done < front.until) break;
    queued_op op = std::move(front);
    o->ops.pop_front();
    if (op.run) op.run();
    o->done++;
    moved = true;
  }
  return moved;
}

std::vector<CUstream_st *> all_streams() {
  std::lock_guard<std::mutex> hold(mem_lock);
  return std::vector<CUstream_st *>(streams.begin(), streams.end());
}

/* The host waits for s's first `target` entries.  Mode 1: only those and
 * what they wait for run; mode 2: before each of them, every other stream
 * runs as far as its waits allow (so a stream that should have waited for
 * s's earlier work runs before it). */
void force(CUstream_st *s, unsigned long long target) {
  if (lazy != 2) return run_until(s, target);
  while (s->done < target && !s->ops.empty()) {
    const std::vector<CUstream_st *> all = all_streams();
    for (bool moved = true; moved;) {
      moved = false;
      for (CUstream_st *o : all)
        if (o != s && advance(o)) moved = true;
    }
    run_until(s, s->done + 1);
  }
}

/* Run every created stream's queue (blocking ones only: what the legacy
 * stream waits for), under stream_lock. */
void run_streams(bool blocking_only) {
  for (CUstream_st *s : all_streams())
    if (!blocking_only || !(s->flags & cudaStreamNonBlocking)) force(s, s->queued);
}

/* Run what a stream's work must follow before work on `stream` that runs at
 * once: the legacy stream waits for the blocking streams. */
void before_immediate(cudaStream_t stream) {
  if (stream == nullptr || stream == cudaStreamLegacy) run_streams(true);
}

/* Everything queued before work that the host waits for (a stream, an
 * event, a copy into pageable memory) has run. */
void run_stream(cudaStream_t stream) {
  std::lock_guard<std::recursive_mutex> hold(stream_lock);
  if (default_stream(stream))
    before_immediate(stream);
  else
    force(stream, stream->queued);
}

void init_fail_countdown() {
  static std::once_flag once;
  std::call_once(once, [] {
    const char *e = getenv("PEER_EMU_FAIL_MALLOC");
    if (e && atol(e) > 0) fail_countdown = atol(e);
  });
}

/* The allocation holding p (inclusive of its end when `end_ok`). */
bool find(const void *p, bool end_ok, uintptr_t *base, size_t *size) {
  const uintptr_t a = (uintptr_t)p;
  auto it = allocations.upper_bound(a);
  if (it == allocations.begin()) return false;
  --it;
  if (a < it->first + it->second || (end_ok && a == it->first + it->second)) {
    *base = it->first, *size = it->second;
    return true;
  }
  return false;
}

double now_ms() {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec * 1e3 + (double)ts.tv_nsec * 1e-6;
}

cudaError_t sync_result() {
  int e = pending_sync_error.exchange(cudaSuccess);
  return e == cudaSuccess ? cudaSuccess : set_error((cudaError_t)e);
}

/* The device side of a copy: kind says which ends are device memory. */
cudaError_t copy_check(void *dst, const void *src, size_t n, cudaMemcpyKind kind) {
  if (n == 0) return cudaSuccess;
  if (!dst || !src) return cudaErrorInvalidValue;
  std::lock_guard<std::mutex> hold(mem_lock);
  bool dst_dev = kind == cudaMemcpyHostToDevice || kind == cudaMemcpyDeviceToDevice;
  bool src_dev = kind == cudaMemcpyDeviceToHost || kind == cudaMemcpyDeviceToDevice;
  if (kind == cudaMemcpyDefault) {
    uintptr_t b;
    size_t s;
    dst_dev = find(dst, false, &b, &s);
    src_dev = find(src, false, &b, &s);
  } else if (kind != cudaMemcpyHostToHost && !dst_dev && !src_dev) {
    return cudaErrorInvalidMemcpyDirection;
  }
  if (kind > cudaMemcpyDefault) return cudaErrorInvalidMemcpyDirection;
  uintptr_t b;
  size_t s;
  if (dst_dev && !(find(dst, false, &b, &s) && (uintptr_t)dst + n <= b + s))
    return cudaErrorInvalidValue;
  if (src_dev && !(find(src, false, &b, &s) && (uintptr_t)src + n <= b + s))
    return cudaErrorInvalidValue;
  return cudaSuccess;
}

} // namespace

bool device_range(const void *p, size_t bytes) {
  std::lock_guard<std::mutex> hold(mem_lock);
  uintptr_t b;
  size_t s;
  return find(p, bytes == 0, &b, &s) && (uintptr_t)p + bytes <= b + s;
}

bool device_pointer(const void *p) {
  std::lock_guard<std::mutex> hold(mem_lock);
  uintptr_t b;
  size_t s;
  return find(p, true, &b, &s) || host_allocations.count((uintptr_t)p);
}

bool stream_ok(cudaStream_t s) {
  if (s == nullptr || s == cudaStreamLegacy || s == cudaStreamPerThread) return true;
  std::lock_guard<std::mutex> hold(mem_lock);
  return streams.count(s) != 0;
}

cudaError_t set_error(cudaError_t e) {
  if (e != cudaSuccess) last_error = e;
  return e;
}

void kernel_error(const char *msg) {
  n_kernel_errors++;
  {
    std::lock_guard<std::mutex> hold(mem_lock);
    kernel_msg = msg;
    launch_failure_text = std::string("unspecified launch failure (emulated: ") + msg + ")";
  }
  if (getenv("PEER_EMU_REPORT") || getenv("PEER_EMU_ABORT"))
    fprintf(stderr, "peer emulated CUDA: %s\n", msg);
  if (getenv("PEER_EMU_ABORT")) abort();
  set_error(cudaErrorLaunchFailure);
  pending_sync_error = cudaErrorLaunchFailure;
}

void count_launch() { n_launches++; }
void count_blas_default_workspace() { n_blas_default_workspace++; }
void count_work(unsigned long long peer_emu_counts::*counter, unsigned long long n) {
  __atomic_fetch_add(&(work_counts.*counter), n, __ATOMIC_RELAXED);
}

void enqueue(cudaStream_t stream, std::function<void()> op) {
  init_lazy();
  std::lock_guard<std::recursive_mutex> hold(stream_lock);
  if (default_stream(stream)) {
    before_immediate(stream);
    op();
  } else if (!lazy && stream->ops.empty()) {
    op();
    stream->queued++, stream->done++;
  } else {
    stream->ops.push_back({std::move(op), nullptr, 0});
    stream->queued++;
  }
}

} // namespace peer_emu

using namespace peer_emu;

extern "C" {

void peer_emu_get_counts(peer_emu_counts *out) {
  out->device_syncs = n_device_syncs;
  out->stream_syncs = n_stream_syncs;
  out->mallocs = n_mallocs;
  out->frees = n_frees;
  out->launches = n_launches;
  out->kernel_errors = n_kernel_errors;
  out->blas_default_workspace = n_blas_default_workspace;
  out->topk_candidates = __atomic_load_n(&work_counts.topk_candidates, __ATOMIC_RELAXED);
  out->topk_sorted = __atomic_load_n(&work_counts.topk_sorted, __ATOMIC_RELAXED);
  out->topk_rescored = __atomic_load_n(&work_counts.topk_rescored, __ATOMIC_RELAXED);
  out->keys16_rows = __atomic_load_n(&work_counts.keys16_rows, __ATOMIC_RELAXED);
}

int peer_emu_set_capturing(void *stream, int on) {
  CUstream_st *s = static_cast<CUstream_st *>(stream);
  if (!stream_ok(s) || default_stream(s)) return -1;
  s->capturing = on != 0;
  return 0;
}

void peer_emu_lazy_streams(int on) {
  init_lazy();
  std::lock_guard<std::recursive_mutex> hold(stream_lock);
  run_streams(false);
  lazy = on == 2 ? 2 : on != 0;
}

void peer_emu_fail_malloc(long n) {
  init_fail_countdown();
  fail_countdown = n > 0 ? n : -1;
}

const char *peer_emu_last_kernel_error(void) {
  std::lock_guard<std::mutex> hold(mem_lock);
  static thread_local std::string copy;
  copy = kernel_msg;
  return copy.c_str();
}

unsigned long long peer_emu_bytes_in_use(void) {
  std::lock_guard<std::mutex> hold(mem_lock);
  return in_use;
}

cudaError_t cudaGetLastError(void) {
  cudaError_t e = last_error;
  last_error = cudaSuccess;
  return e;
}

cudaError_t cudaPeekAtLastError(void) { return last_error; }

const char *cudaGetErrorName(cudaError_t e) {
  switch (e) {
#define NAME(x)                                                                                    \
  case x:                                                                                          \
    return #x;
    NAME(cudaSuccess)
    NAME(cudaErrorInvalidValue)
    NAME(cudaErrorMemoryAllocation)
    NAME(cudaErrorInitializationError)
    NAME(cudaErrorInvalidConfiguration)
    NAME(cudaErrorInvalidDevicePointer)
    NAME(cudaErrorInvalidMemcpyDirection)
    NAME(cudaErrorNoDevice)
    NAME(cudaErrorInvalidDevice)
    NAME(cudaErrorInvalidResourceHandle)
    NAME(cudaErrorNotReady)
    NAME(cudaErrorIllegalAddress)
    NAME(cudaErrorLaunchOutOfResources)
    NAME(cudaErrorLaunchFailure)
    NAME(cudaErrorUnknown)
#undef NAME
  }
  return "cudaErrorUnknown";
}

const char *cudaGetErrorString(cudaError_t e) {
  switch (e) {
  case cudaSuccess:
    return "no error";
  case cudaErrorInvalidValue:
    return "invalid argument";
  case cudaErrorMemoryAllocation:
    return "out of memory";
  case cudaErrorInitializationError:
    return "initialization error";
  case cudaErrorInvalidConfiguration:
    return "invalid configuration argument";
  case cudaErrorInvalidDevicePointer:
    return "invalid device pointer";
  case cudaErrorInvalidMemcpyDirection:
    return "invalid copy direction for memcpy";
  case cudaErrorNoDevice:
    return "no CUDA-capable device is detected";
  case cudaErrorInvalidDevice:
    return "invalid device ordinal";
  case cudaErrorInvalidResourceHandle:
    return "invalid resource handle";
  case cudaErrorNotReady:
    return "device not ready";
  case cudaErrorIllegalAddress:
    return "an illegal memory access was encountered";
  case cudaErrorLaunchOutOfResources:
    return "too many resources requested for launch";
  case cudaErrorLaunchFailure: {
    /* the emulator knows what failed: the text says it (kept until the
     * next kernel error) */
    std::lock_guard<std::mutex> hold(mem_lock);
    return launch_failure_text.c_str();
  }
  default:
    return "unknown error";
  }
}

cudaError_t cudaGetDeviceCount(int *count) {
  if (!count) return set_error(cudaErrorInvalidValue);
  *count = 1;
  return cudaSuccess;
}

cudaError_t cudaSetDevice(int device) {
  if (device != 0) return set_error(cudaErrorInvalidDevice);
  current_device = device;
  return cudaSuccess;
}

cudaError_t cudaGetDevice(int *device) {
  if (!device) return set_error(cudaErrorInvalidValue);
  *device = current_device;
  return cudaSuccess;
}

cudaError_t cudaGetDeviceProperties(struct cudaDeviceProp *p, int device) {
  if (!p) return set_error(cudaErrorInvalidValue);
  if (device != 0) return set_error(cudaErrorInvalidDevice);
  memset(p, 0, sizeof *p);
  snprintf(p->name, sizeof p->name, "emulated CUDA device (peer, PEER_CUDA=EMU)");
  p->totalGlobalMem = device_bytes;
  p->sharedMemPerBlock = smem_max;
  p->sharedMemPerBlockOptin = smem_max;
  p->regsPerBlock = 65536;
  p->warpSize = 32;
  p->maxThreadsPerBlock = 1024;
  p->maxThreadsDim[0] = 1024, p->maxThreadsDim[1] = 1024, p->maxThreadsDim[2] = 64;
  p->maxGridSize[0] = 0x7fffffff, p->maxGridSize[1] = 65535, p->maxGridSize[2] = 65535;
  p->multiProcessorCount = 1;
  p->l2CacheSize = 1 << 20;
  p->major = 9, p->minor = 0;
  return cudaSuccess;
}

cudaError_t cudaDeviceGetAttribute(int *value, enum cudaDeviceAttr attr, int device) {
  if (!value) return set_error(cudaErrorInvalidValue);
  if (device != 0) return set_error(cudaErrorInvalidDevice);
  switch (attr) {
  case cudaDevAttrMaxThreadsPerBlock:
    *value = 1024;
    break;
  case cudaDevAttrMaxSharedMemoryPerBlock:
    *value = (int)smem_max;
    break;
  case cudaDevAttrWarpSize:
    *value = 32;
    break;
  case cudaDevAttrMultiProcessorCount:
    *value = 1;
    break;
  case cudaDevAttrMemoryClockRate:
    *value = 1000000;
    break;
  case cudaDevAttrGlobalMemoryBusWidth:
    *value = 64;
    break;
  case cudaDevAttrL2CacheSize:
    *value = 1 << 20;
    break;
  case cudaDevAttrComputeCapabilityMajor:
    *value = 9;
    break;
  case cudaDevAttrComputeCapabilityMinor:
    *value = 0;
    break;
  default:
    return set_error(cudaErrorInvalidValue);
  }
  return cudaSuccess;
}

cudaError_t cudaDeviceSynchronize(void) {
  n_device_syncs++;
  {
    std::lock_guard<std::recursive_mutex> hold(stream_lock);
    run_streams(false);
  }
  return sync_result();
}

cudaError_t cudaMemGetInfo(size_t *free_bytes, size_t *total_bytes) {
  if (!free_bytes || !total_bytes) return set_error(cudaErrorInvalidValue);
  std::lock_guard<std::mutex> hold(mem_lock);
  *free_bytes = device_bytes - in_use;
  *total_bytes = device_bytes;
  return cudaSuccess;
}

cudaError_t cudaMalloc(void **ptr, size_t size) {
  n_mallocs++;
  init_fail_countdown();
  if (!ptr) return set_error(cudaErrorInvalidValue);
  *ptr = nullptr;
  if (fail_countdown > 0 && --fail_countdown == 0) {
    fail_countdown = -1;
    return set_error(cudaErrorMemoryAllocation);
  }
  if (size == 0) return cudaSuccess;
  {
    std::lock_guard<std::mutex> hold(mem_lock);
    if (size > device_bytes - in_use) return set_error(cudaErrorMemoryAllocation);
  }
  void *p = nullptr;
  if (posix_memalign(&p, 256, size) != 0) return set_error(cudaErrorMemoryAllocation);
  std::lock_guard<std::mutex> hold(mem_lock);
  allocations[(uintptr_t)p] = size;
  in_use += size;
  *ptr = p;
  return cudaSuccess;
}

cudaError_t cudaFree(void *ptr) {
  if (!ptr) return cudaSuccess;
  n_frees++;
  {
    std::lock_guard<std::recursive_mutex> hold(stream_lock);
    run_streams(false); /* in practice cudaFree waits for the device */
  }
  {
    std::lock_guard<std::mutex> hold(mem_lock);
    auto it = allocations.find((uintptr_t)ptr);
    if (it == allocations.end()) return set_error(cudaErrorInvalidValue);
    in_use -= it->second;
    allocations.erase(it);
  }
  free(ptr);
  return cudaSuccess;
}

cudaError_t cudaMallocHost(void **ptr, size_t size) {
  if (!ptr) return set_error(cudaErrorInvalidValue);
  void *p = nullptr;
  if (posix_memalign(&p, 256, size ? size : 1) != 0) return set_error(cudaErrorMemoryAllocation);
  std::lock_guard<std::mutex> hold(mem_lock);
  host_allocations.insert((uintptr_t)p);
  *ptr = p;
  return cudaSuccess;
}

cudaError_t cudaFreeHost(void *ptr) {
  if (!ptr) return cudaSuccess;
  {
    std::lock_guard<std::mutex> hold(mem_lock);
    if (!host_allocations.erase((uintptr_t)ptr)) return set_error(cudaErrorInvalidValue);
  }
  free(ptr);
  return cudaSuccess;
}

cudaError_t cudaPointerGetAttributes(struct cudaPointerAttributes *a, const void *ptr) {
  if (!a || !ptr) return set_error(cudaErrorInvalidValue);
  std::lock_guard<std::mutex> hold(mem_lock);
  uintptr_t b;
  size_t s;
  if (find(ptr, false, &b, &s)) {
    a->type = cudaMemoryTypeDevice;
    a->device = 0;
    a->devicePointer = (void *)ptr;
    a->hostPointer = nullptr;
  } else if (host_allocations.count((uintptr_t)ptr)) {
    a->type = cudaMemoryTypeHost;
    a->device = 0;
    a->devicePointer = a->hostPointer = (void *)ptr;
  } else {
    a->type = cudaMemoryTypeUnregistered; /* as CUDA 11+: success, unregistered */
    a->device = -2;
    a->devicePointer = nullptr;
    a->hostPointer = (void *)ptr;
  }
  return cudaSuccess;
}

cudaError_t cudaMemcpy(void *dst, const void *src, size_t n, enum cudaMemcpyKind kind) {
  cudaError_t e = copy_check(dst, src, n, kind);
  if (e != cudaSuccess) return set_error(e);
  run_stream(nullptr); /* a copy on the legacy stream */
  if (n) memmove(dst, src, n);
  return sync_result(); /* a blocking copy waits for earlier work */
}

cudaError_t cudaMemcpyAsync(void *dst, const void *src, size_t n, enum cudaMemcpyKind kind,
                            cudaStream_t stream) {
  if (!stream_ok(stream)) return set_error(cudaErrorInvalidResourceHandle);
  cudaError_t e = copy_check(dst, src, n, kind);
  if (e != cudaSuccess) return set_error(e);
  if (n == 0) return cudaSuccess;
  bool to_pageable = false, from_pageable = false;
  {
    std::lock_guard<std::mutex> hold(mem_lock);
    uintptr_t b;
    size_t sz;
    const bool dst_host = !find(dst, false, &b, &sz), src_host = !find(src, false, &b, &sz);
    to_pageable = dst_host && !host_allocations.count((uintptr_t)dst);
    from_pageable = src_host && !host_allocations.count((uintptr_t)src);
  }
  if (to_pageable) { /* returns once the copy is done: after the stream's work */
    run_stream(stream);
    memmove(dst, src, n);
  } else if (from_pageable && lazy && !default_stream(stream)) { /* staged at the call */
    auto staged = std::make_shared<std::vector<unsigned char>>((const unsigned char *)src,
                                                               (const unsigned char *)src + n);
    enqueue(stream, [dst, staged] { memmove(dst, staged->data(), staged->size()); });
  } else {
    enqueue(stream, [dst, src, n] { memmove(dst, src, n); });
  }
  return cudaSuccess;
}

cudaError_t cudaMemsetAsync(void *ptr, int value, size_t n, cudaStream_t stream) {
  if (!stream_ok(stream)) return set_error(cudaErrorInvalidResourceHandle);
  if (n == 0) return cudaSuccess;
  if (!device_range(ptr, n)) return set_error(cudaErrorInvalidValue);
  enqueue(stream, [ptr, value, n] { memset(ptr, value, n); });
  return cudaSuccess;
}

cudaError_t cudaMemset(void *ptr, int value, size_t n) {
  return cudaMemsetAsync(ptr, value, n, nullptr);
}

cudaError_t cudaStreamCreateWithFlags(cudaStream_t *stream, unsigned int flags) {
  if (!stream || flags > cudaStreamNonBlocking) return set_error(cudaErrorInvalidValue);
  CUstream_st *s = new CUstream_st{flags, {}, 0, 0, false};
  std::lock_guard<std::mutex> hold(mem_lock);
  streams.insert(s);
  *stream = s;
  return cudaSuccess;
}

cudaError_t cudaStreamCreate(cudaStream_t *stream) {
  return cudaStreamCreateWithFlags(stream, cudaStreamDefault);
}

/* The stream's queued work still runs (as on a GPU): here, before it goes;
 * nothing may point at it afterwards. */
cudaError_t cudaStreamDestroy(cudaStream_t stream) {
  std::lock_guard<std::recursive_mutex> run_hold(stream_lock);
  if (!stream_ok(stream) || default_stream(stream))
    return set_error(cudaErrorInvalidResourceHandle);
  run_until(stream, stream->queued);
  std::lock_guard<std::mutex> hold(mem_lock);
  streams.erase(stream);
  for (CUstream_st *s : streams)
    for (queued_op &op : s->ops)
      if (op.wait_on == stream) op.wait_on = nullptr;
  for (CUevent_st *ev : events)
    if (ev->stream == stream) ev->stream = nullptr;
  delete stream;
  return cudaSuccess;
}

cudaError_t cudaStreamSynchronize(cudaStream_t stream) {
  n_stream_syncs++;
  if (!stream_ok(stream)) return set_error(cudaErrorInvalidResourceHandle);
  run_stream(stream);
  return sync_result();
}

cudaError_t cudaStreamQuery(cudaStream_t stream) {
  if (!stream_ok(stream)) return set_error(cudaErrorInvalidResourceHandle);
  std::lock_guard<std::recursive_mutex> hold(stream_lock);
  return default_stream(stream) || stream->ops.empty() ? cudaSuccess : cudaErrorNotReady;
}

cudaError_t cudaStreamIsCapturing(cudaStream_t stream, enum cudaStreamCaptureStatus *status) {
  if (!status) return set_error(cudaErrorInvalidValue);
  if (!stream_ok(stream)) return set_error(cudaErrorInvalidResourceHandle);
  *status = !default_stream(stream) && stream->capturing ? cudaStreamCaptureStatusActive
                                                         : cudaStreamCaptureStatusNone;
  return cudaSuccess;
}

/* The wait covers the event's last record before this call (later records
 * do not move it). */
cudaError_t cudaStreamWaitEvent(cudaStream_t stream, cudaEvent_t event, unsigned int flags) {
  (void)flags;
  if (!stream_ok(stream)) return set_error(cudaErrorInvalidResourceHandle);
  std::lock_guard<std::recursive_mutex> run_hold(stream_lock);
  {
    std::lock_guard<std::mutex> hold(mem_lock);
    if (!events.count(event)) return set_error(cudaErrorInvalidResourceHandle);
  }
  CUstream_st *on = event->stream;
  if (!on || on->done >= event->at) return cudaSuccess;
  if (default_stream(stream)) {
    run_until(on, event->at);
  } else {
    stream->ops.push_back({nullptr, on, event->at});
    stream->queued++;
  }
  return cudaSuccess;
}

cudaError_t cudaEventCreateWithFlags(cudaEvent_t *event, unsigned int flags) {
  (void)flags;
  if (!event) return set_error(cudaErrorInvalidValue);
  CUevent_st *ev = new CUevent_st{0.0, false, nullptr, 0};
  std::lock_guard<std::mutex> hold(mem_lock);
  events.insert(ev);
  *event = ev;
  return cudaSuccess;
}

cudaError_t cudaEventCreate(cudaEvent_t *event) {
  return cudaEventCreateWithFlags(event, cudaEventDefault);
}

cudaError_t cudaEventDestroy(cudaEvent_t event) {
  std::lock_guard<std::recursive_mutex> run_hold(stream_lock);
  std::lock_guard<std::mutex> hold(mem_lock);
  if (!events.erase(event)) return set_error(cudaErrorInvalidResourceHandle);
  delete event;
  return cudaSuccess;
}

/* The event completes when the work queued on the stream before it has
 * run; its time is taken then. */
cudaError_t cudaEventRecord(cudaEvent_t event, cudaStream_t stream) {
  if (!stream_ok(stream)) return set_error(cudaErrorInvalidResourceHandle);
  std::lock_guard<std::recursive_mutex> run_hold(stream_lock);
  {
    std::lock_guard<std::mutex> hold(mem_lock);
    if (!events.count(event)) return set_error(cudaErrorInvalidResourceHandle);
  }
  event->recorded = true;
  enqueue(stream, [event] { event->ms = now_ms(); });
  event->stream = default_stream(stream) ? nullptr : stream;
  event->at = event->stream ? stream->queued : 0;
  return cudaSuccess;
}

cudaError_t cudaEventSynchronize(cudaEvent_t event) {
  n_stream_syncs++;
  {
    std::lock_guard<std::recursive_mutex> run_hold(stream_lock);
    {
      std::lock_guard<std::mutex> hold(mem_lock);
      if (!events.count(event)) return set_error(cudaErrorInvalidResourceHandle);
    }
    if (event->stream) force(event->stream, event->at);
  }
  return sync_result();
}

cudaError_t cudaEventQuery(cudaEvent_t event) {
  std::lock_guard<std::recursive_mutex> run_hold(stream_lock);
  std::lock_guard<std::mutex> hold(mem_lock);
  if (!events.count(event)) return set_error(cudaErrorInvalidResourceHandle);
  return !event->stream || event->stream->done >= event->at ? cudaSuccess : cudaErrorNotReady;
}

cudaError_t cudaEventElapsedTime(float *ms, cudaEvent_t start, cudaEvent_t end) {
  if (!ms) return set_error(cudaErrorInvalidValue);
  std::lock_guard<std::recursive_mutex> run_hold(stream_lock);
  std::lock_guard<std::mutex> hold(mem_lock);
  if (!events.count(start) || !events.count(end)) return set_error(cudaErrorInvalidResourceHandle);
  if (!start->recorded || !end->recorded) return set_error(cudaErrorInvalidResourceHandle);
  for (const CUevent_st *ev : {start, end})
    if (ev->stream && ev->stream->done < ev->at) return set_error(cudaErrorNotReady);
  *ms = (float)(end->ms - start->ms);
  return cudaSuccess;
}

} // extern "C"
