/* simt.cc: the emulator's execution of kernels.  Every CUDA thread of a
 * block is a fiber with its own stack, run by a scheduler on the launching
 * host thread; blocks of a grid run one after another.  A fiber runs until
 * it waits (a barrier, a warp collective) or ends; the last thread to reach
 * a barrier or collective computes its result and wakes the others.  When
 * no fiber can run and some have not ended, the block is deadlocked: that
 * is reported (kernel, block, thread, what each waits for) as a kernel
 * error and the launch fails.  Nothing assumes lockstep: lanes of a warp
 * meet only at the collectives their masks name.
 *
 * Sanitizers: under ASan each switch is announced
 * (__sanitizer_start/finish_switch_fiber) and the dynamic shared memory past
 * the launch's size is poisoned; under TSan every fiber is a TSan fiber,
 * switches do not synchronise (__tsan_switch_to_fiber_no_sync), and only
 * what orders memory on a GPU does here: __syncthreads (every thread's
 * arrival before every thread's departure), __syncwarp among its lanes, the
 * start and end of a block (shuffles and votes order nothing).  So a missing
 * barrier is a data race TSan reports.  This file is never instrumented by
 * TSan (CMakeLists.txt: -fno-sanitize=thread): the scheduler's bookkeeping
 * passes between fibers that TSan must see as unordered, and is not the
 * kernels' memory.  (Hiding it access by access with TSan's ignore
 * annotations cost a stack-depot insertion per threadIdx read: 70% of a TSan
 * run.)  So TSan is detected at run time: its runtime's entry points are
 * weak references here, null unless it is linked. */
#include "emu_internal.h"

#include "cuda_runtime.h"

#include <dlfcn.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

#include <mutex>
#include <set>
#include <vector>

#if defined(__has_feature)
#if __has_feature(address_sanitizer)
#define EMU_ASAN 1
#endif
#endif
#if defined(__SANITIZE_ADDRESS__)
#define EMU_ASAN 1
#endif

#ifdef EMU_ASAN
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#endif
/* ThreadSanitizer's fiber and synchronisation calls
 * (sanitizer/tsan_interface.h), null without its runtime. */
extern "C" {
__attribute__((weak)) void *__tsan_get_current_fiber(void);
__attribute__((weak)) void *__tsan_create_fiber(unsigned flags);
__attribute__((weak)) void __tsan_destroy_fiber(void *fiber);
__attribute__((weak)) void __tsan_switch_to_fiber(void *fiber, unsigned flags);
__attribute__((weak)) void __tsan_acquire(void *addr);
__attribute__((weak)) void __tsan_release(void *addr);
}
static const unsigned tsan_no_sync = 1; /* __tsan_switch_to_fiber_no_sync */
static const bool emu_tsan = __tsan_create_fiber != nullptr;
static inline void tsan_acquire(void *addr) {
  if (emu_tsan) __tsan_acquire(addr);
}
static inline void tsan_release(void *addr) {
  if (emu_tsan) __tsan_release(addr);
}

#if !defined(__x86_64__)
#include <ucontext.h>
#endif

namespace peer_emu {
namespace {

/* ------------------------------------------------------------ context switch */

#if defined(__x86_64__)
/* Saves the callee-saved registers, MXCSR and the x87 control word on the
 * current stack, stores the stack pointer in *save, and resumes the context
 * whose stack pointer is `to` (glibc's swapcontext makes a system call per
 * switch; this is a few nanoseconds). */
extern "C" void peer_emu_switch(void **save, void *to);
asm(R"(
  .text
  .globl peer_emu_switch
  .hidden peer_emu_switch
  .type peer_emu_switch,@function
peer_emu_switch:
  .cfi_startproc
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $8, %rsp
  stmxcsr (%rsp)
  fnstcw 4(%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  ldmxcsr (%rsp)
  fldcw 4(%rsp)
  addq $8, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .cfi_endproc
  .size peer_emu_switch,.-peer_emu_switch
  .section .note.GNU-stack,"",@progbits
  .text
)");
#endif

constexpr size_t stack_bytes = 256 * 1024;
constexpr size_t guard_bytes = 4096;

enum fiber_state { READY, AT_BARRIER, AT_WARP, DONE, FAILED };

struct block_run;

struct fiber {
  thread_ctx ctx;
  int linear, lane, warp;
  fiber_state state;
  char *stack; /* usable stack [stack, stack + stack_bytes) */
#if defined(__x86_64__)
  void *sp;
#else
  ucontext_t uc;
#endif
  bool dirty; /* abandoned mid-kernel: its stack needs a clean start */
  /* the collective it waits in */
  warp_op op;
  unsigned mask;
  uint64_t value, result;
  int param, width, sync_slot;
  /* the barrier it waits at */
  int pred;
  void *tsan;
  void *asan_fake;
};

/* A warp collective some lanes have reached. */
struct pending {
  warp_op op;
  unsigned mask, arrived;
  int sync_slot;
};

struct warp_run {
  std::vector<pending> open;
  unsigned next_slot;
  char sync[64]; /* TSan sync addresses of __syncwarp instances */
};

struct block_run {
  const launch_config *cfg;
  uint3 bidx;
  int n;
  fiber *f;
  std::vector<warp_run> warps;
  int bar_arrived, bar_gen;
  bar_op bar_kind;
  int bar_result[2];
  char bar_sync[2];
  char start_sync, end_sync;
  bool failed;
  char msg[1100];
};

const char *op_name(warp_op op) {
  static const char *const names[] = {"__shfl_sync",     "__shfl_up_sync", "__shfl_down_sync",
                                      "__shfl_xor_sync", "__ballot_sync",  "__any_sync",
                                      "__all_sync",      "__syncwarp"};
  return names[op];
}
const char *bar_name(bar_op op) {
  static const char *const names[] = {"__syncthreads", "__syncthreads_or", "__syncthreads_and",
                                      "__syncthreads_count"};
  return names[op];
}

/* ------------------------------------------------------------ per host thread */

struct host_thread {
  std::vector<fiber *> pool;
  fiber *cur = nullptr;
  block_run *blk = nullptr;
  void (*body)(void *) = nullptr;
  void *body_ctx = nullptr;
#if defined(__x86_64__)
  void *sched_sp = nullptr;
#else
  ucontext_t sched_uc;
#endif
  void *sched_tsan = nullptr;
  void *sched_fake = nullptr;
  const void *sched_bottom = nullptr;
  size_t sched_size = 0;
  ~host_thread() {
    for (fiber *f : pool) {
      if (f->tsan) __tsan_destroy_fiber(f->tsan);
      munmap(f->stack - guard_bytes, stack_bytes + guard_bytes);
      delete f;
    }
  }
};
thread_local host_thread ht;

std::mutex launch_lock; /* one launch at a time: kernels share no state, but it keeps TSan calm */

/* ------------------------------------------------------------ switching */

void fiber_main();

#if !defined(__x86_64__)
void fiber_entry_uc() { fiber_main(); }
#endif

void switch_to(fiber *f) {
  ht.cur = f;
#ifdef EMU_ASAN
  __sanitizer_start_switch_fiber(&ht.sched_fake, f->stack, stack_bytes);
#endif
  if (emu_tsan) __tsan_switch_to_fiber(f->tsan, tsan_no_sync);
#if defined(__x86_64__)
  peer_emu_switch(&ht.sched_sp, f->sp);
#else
  swapcontext(&ht.sched_uc, &f->uc);
#endif
#ifdef EMU_ASAN
  __sanitizer_finish_switch_fiber(ht.sched_fake, nullptr, nullptr);
#endif
  ht.cur = nullptr;
}

/* Back to the scheduler; `final`: this fiber's run is over (its fake stack,
 * if any, is dropped). */
void to_scheduler(bool final) {
  fiber *f = ht.cur;
#ifdef EMU_ASAN
  __sanitizer_start_switch_fiber(final ? nullptr : &f->asan_fake, ht.sched_bottom, ht.sched_size);
#else
  (void) final;
#endif
  if (emu_tsan) __tsan_switch_to_fiber(ht.sched_tsan, tsan_no_sync);
#if defined(__x86_64__)
  peer_emu_switch(&f->sp, ht.sched_sp);
#else
  swapcontext(&f->uc, &ht.sched_uc);
#endif
#ifdef EMU_ASAN
  __sanitizer_finish_switch_fiber(f->asan_fake, nullptr, nullptr);
#endif
}

void fiber_main() {
#ifdef EMU_ASAN
  __sanitizer_finish_switch_fiber(nullptr, &ht.sched_bottom, &ht.sched_size);
#endif
  fiber *f = ht.cur;
  tsan_acquire(&ht.blk->start_sync);
  ht.body(ht.body_ctx);
  tsan_release(&ht.blk->end_sync);
  f->state = DONE;
  to_scheduler(true);
  abort(); /* a finished fiber is never resumed */
}

fiber *new_fiber() {
  fiber *f = new fiber();
  char *m = (char *)mmap(nullptr, stack_bytes + guard_bytes, PROT_READ | PROT_WRITE,
                         MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (m == MAP_FAILED) {
    delete f;
    return nullptr;
  }
  mprotect(m, guard_bytes, PROT_NONE); /* a stack overflow faults */
  f->stack = m + guard_bytes;
  if (emu_tsan) f->tsan = __tsan_create_fiber(0);
  return f;
}

/* A fresh start of fiber f at fiber_main. */
void prepare(fiber *f) {
#ifdef EMU_ASAN
  /* an abandoned run leaves its frames' redzones poisoned; a finished one
   * only fiber_main's, near the top */
  if (f->dirty)
    __asan_unpoison_memory_region(f->stack, stack_bytes);
  else
    __asan_unpoison_memory_region(f->stack + stack_bytes - 8192, 8192);
#endif
  if (emu_tsan && f->dirty) {
    __tsan_destroy_fiber(f->tsan);
    f->tsan = __tsan_create_fiber(0);
  }
  f->dirty = false;
  f->asan_fake = nullptr;
#if defined(__x86_64__)
  uint64_t *top = (uint64_t *)(f->stack + stack_bytes);
  top[-1] = 0;                     /* fiber_main's return address: never used */
  top[-2] = (uint64_t)&fiber_main; /* where peer_emu_switch returns to */
  for (int i = 3; i <= 8; i++)
    top[-i] = 0;                      /* rbp rbx r12 r13 r14 r15 */
  uint32_t csr[2] = {0x1f80, 0x037f}; /* MXCSR, x87 control word: the defaults */
  memcpy(&top[-9], csr, 8);
  f->sp = &top[-9];
#else
  getcontext(&f->uc);
  f->uc.uc_stack.ss_sp = f->stack;
  f->uc.uc_stack.ss_size = stack_bytes;
  f->uc.uc_link = nullptr;
  makecontext(&f->uc, fiber_entry_uc, 0);
#endif
}

/* ------------------------------------------------------------ errors */

void where(char *out, size_t n, const block_run *b, const fiber *f) {
  snprintf(out, n, "kernel %s block (%u,%u,%u) thread (%u,%u,%u)", b->cfg->name, b->bidx.x,
           b->bidx.y, b->bidx.z, f->ctx.idx.x, f->ctx.idx.y, f->ctx.idx.z);
}

__attribute__((format(printf, 3, 4))) void block_fail(block_run *b, const fiber *f, const char *fmt,
                                                      ...) {
  if (b->failed) return;
  b->failed = true;
  char head[512];
  where(head, sizeof head, b, f);
  char tail[512];
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(tail, sizeof tail, fmt, ap);
  va_end(ap);
  snprintf(b->msg, sizeof b->msg, "%s: %s", head, tail);
}

/* The calling fiber broke a rule: report, and never run it again. */
[[noreturn]] void fiber_fail_here() {
  ht.cur->state = FAILED;
  /* its report (block_fail's snprintf, which TSan sees) before the launcher
   * reads it */
  tsan_release(&ht.blk->end_sync);
  to_scheduler(false);
  abort();
}

const char *state_text(const block_run *b, const fiber *f, char *buf, size_t n) {
  switch (f->state) {
  case DONE:
    return "has exited";
  case AT_BARRIER:
    snprintf(buf, n, "waits in %s", bar_name(b->bar_kind));
    return buf;
  case AT_WARP:
    snprintf(buf, n, "waits in %s(mask 0x%08x)", op_name(f->op), f->mask);
    return buf;
  default:
    return "runs";
  }
}

/* No fiber can run: name the first waiting thread and one thread it waits
 * for. */
void deadlock(block_run *b) {
  for (int i = 0; i < b->n; i++) {
    fiber *f = &b->f[i];
    char buf[128];
    if (f->state == AT_WARP) {
      unsigned missing = f->mask;
      for (const pending &p : b->warps[f->warp].open)
        if (p.mask & (1u << f->lane)) missing = p.mask & ~p.arrived;
      int lane = __builtin_ctz(missing);
      int other = f->warp * 32 + lane;
      if (other >= b->n) {
        block_fail(b, f, "%s(mask 0x%08x) names lane %d, which this block does not have",
                   op_name(f->op), f->mask, lane);
      } else {
        const fiber *o = &b->f[other];
        block_fail(b, f, "%s(mask 0x%08x) never completes: lane %d, thread (%u,%u,%u), %s",
                   op_name(f->op), f->mask, lane, o->ctx.idx.x, o->ctx.idx.y, o->ctx.idx.z,
                   state_text(b, o, buf, sizeof buf));
      }
      return;
    }
  }
  for (int i = 0; i < b->n; i++) {
    fiber *f = &b->f[i];
    if (f->state != AT_BARRIER) continue;
    for (int j = 0; j < b->n; j++) {
      const fiber *o = &b->f[j];
      if (o->state == AT_BARRIER) continue;
      char buf[128];
      block_fail(b, f, "%s never completes: thread (%u,%u,%u) %s", bar_name(b->bar_kind),
                 o->ctx.idx.x, o->ctx.idx.y, o->ctx.idx.z, state_text(b, o, buf, sizeof buf));
      return;
    }
  }
  block_fail(b, &b->f[0], "deadlock");
}

/* ------------------------------------------------------------ collectives */

uint64_t lane_result(const block_run *b, const warp_run &w, const pending &p, int warp, int lane,
                     bool *bad_src, int *src_out) {
  (void)w;
  const fiber *me = &b->f[warp * 32 + lane];
  const int width = me->width, base = lane & ~(width - 1), off = lane & (width - 1);
  int src = lane;
  switch (p.op) {
  case W_SHFL:
    src = base + (me->param & (width - 1));
    break;
  case W_SHFL_UP:
    src = off >= me->param ? lane - me->param : lane;
    break;
  case W_SHFL_DOWN:
    src = off + me->param < width ? lane + me->param : lane;
    break;
  case W_SHFL_XOR: {
    int s = lane ^ me->param;
    src = (s & ~(width - 1)) == base && s < 32 ? s : lane;
    break;
  }
  case W_BALLOT:
  case W_ANY:
  case W_ALL: {
    unsigned ballot = 0;
    for (int l = 0; l < 32; l++)
      if ((p.mask >> l & 1u) && b->f[warp * 32 + l].value) ballot |= 1u << l;
    if (p.op == W_BALLOT) return ballot;
    if (p.op == W_ANY) return ballot != 0;
    return ballot == p.mask;
  }
  case W_SYNC:
    return 0;
  }
  /* reading a lane outside the mask is undefined on a GPU: an error here */
  if (!(p.mask >> src & 1u)) {
    *bad_src = true;
    *src_out = src;
    return 0;
  }
  return b->f[warp * 32 + src].value;
}

} // namespace

thread_ctx *self() {
  return &ht.cur->ctx;
}

unsigned active_mask() {
  fiber *f = ht.cur;
  block_run *b = ht.blk;
  unsigned m = 0;
  for (int l = 0; l < 32; l++) {
    int i = f->warp * 32 + l;
    if (i < b->n && b->f[i].state != DONE && b->f[i].state != FAILED) m |= 1u << l;
  }
  return m;
}

uint64_t warp_collective(warp_op op, unsigned mask, uint64_t value, int param, int width) {
  fiber *f = ht.cur;
  block_run *b = ht.blk;
  warp_run &w = b->warps[f->warp];
  const unsigned me = 1u << f->lane;
  if (width <= 0 || width > 32 || (width & (width - 1))) {
    block_fail(b, f, "%s: width %d is not a power of two up to 32", op_name(op), width);
    fiber_fail_here();
  }
  if (!(mask & me)) {
    block_fail(b, f, "%s(mask 0x%08x): the calling lane %d is not in the mask", op_name(op), mask,
               f->lane);
    fiber_fail_here();
  }
  pending *p = nullptr;
  for (pending &q : w.open) {
    if (q.mask & me) {
      if (q.op != op || q.mask != mask) {
        block_fail(b, f,
                   "%s(mask 0x%08x) while lanes 0x%08x of its warp wait in %s(mask 0x%08x): "
                   "divergent collectives",
                   op_name(op), mask, q.arrived, op_name(q.op), q.mask);
        fiber_fail_here();
      }
      p = &q;
    } else if (q.mask & mask) {
      block_fail(b, f, "%s(mask 0x%08x) overlaps %s(mask 0x%08x) that lanes 0x%08x already wait in",
                 op_name(op), mask, op_name(q.op), q.mask, q.arrived);
      fiber_fail_here();
    }
  }
  if (!p) {
    w.open.push_back(pending{op, mask, 0, (int)(w.next_slot++ % sizeof w.sync)});
    p = &w.open.back();
  }
  f->op = op, f->mask = mask, f->value = value, f->param = param, f->width = width;
  f->sync_slot = p->sync_slot;
  f->state = AT_WARP;
  p->arrived |= me;
  if (op == W_SYNC) tsan_release(&w.sync[f->sync_slot]);
  if (p->arrived == p->mask) {
    /* the last lane in: every lane's result, then all run on */
    pending done = *p;
    w.open.erase(w.open.begin() + (p - w.open.data()));
    uint64_t results[32];
    for (int l = 0; l < 32; l++) {
      if (!(done.mask >> l & 1u)) continue;
      bool bad = false;
      int src = 0;
      results[l] = lane_result(b, w, done, f->warp, l, &bad, &src);
      if (bad) {
        block_fail(b, &b->f[f->warp * 32 + l],
                   "%s(mask 0x%08x) reads lane %d, which is not in the mask", op_name(done.op),
                   done.mask, src);
        fiber_fail_here();
      }
    }
    for (int l = 0; l < 32; l++)
      if (done.mask >> l & 1u) {
        fiber *o = &b->f[f->warp * 32 + l];
        o->result = results[l];
        o->state = READY;
      }
  } else {
    to_scheduler(false);
  }
  if (op == W_SYNC) tsan_acquire(&w.sync[f->sync_slot]);
  return f->result;
}

int block_barrier(bar_op op, int pred) {
  fiber *f = ht.cur;
  block_run *b = ht.blk;
  /* Which __syncthreads in the source is not checked: the compiler may
   * duplicate one call into several places (as bar.sync 0 on a GPU matches
   * any other); the kind must agree. */
  if (b->bar_arrived == 0) {
    b->bar_kind = op;
  } else if (b->bar_kind != op) {
    block_fail(b, f, "%s while other threads wait in %s: divergent barriers", bar_name(op),
               bar_name(b->bar_kind));
    fiber_fail_here();
  }
  const int gen = b->bar_gen & 1;
  f->pred = pred;
  f->state = AT_BARRIER;
  tsan_release(&b->bar_sync[gen]);
  if (++b->bar_arrived == b->n) {
    int r = op == B_AND ? 1 : 0;
    for (int i = 0; i < b->n; i++) {
      const int p = b->f[i].pred != 0;
      if (op == B_OR)
        r |= p;
      else if (op == B_AND)
        r &= p;
      else if (op == B_COUNT)
        r += p;
      b->f[i].state = READY;
    }
    b->bar_result[gen] = r;
    b->bar_arrived = 0;
    b->bar_gen++;
  } else {
    to_scheduler(false);
  }
  tsan_acquire(&b->bar_sync[gen]);
  return b->bar_result[gen];
}

/* ------------------------------------------------------------ launching */

namespace {

/* The launching thread's own dynamic shared memory arrays (thread_local, as
 * the arrays are: launches from several host threads each refill and poison
 * their own). */
thread_local unsigned char *smem_regions[64];
thread_local int n_regions = -1;

/* The dynamic shared memory of a new block: [0, size) and the canary past
 * it filled with 0xff (NaN as float), poisoned past size under ASan. */
void fresh_smem(size_t size) {
  for (int i = 0; i < n_regions; i++) {
    unsigned char *r = smem_regions[i];
#ifdef EMU_ASAN
    __asan_unpoison_memory_region(r, smem_max + smem_canary);
#endif
    memset(r, 0xff, size + smem_canary);
#ifdef EMU_ASAN
    __asan_poison_memory_region(r + size, smem_max + smem_canary - size);
#endif
  }
}

/* A write past the launch's dynamic shared memory (without ASan, which
 * reports it when it happens). */
bool smem_overrun(size_t size, size_t *at) {
#ifdef EMU_ASAN
  (void)size, (void)at;
  return false;
#else
  for (int i = 0; i < n_regions; i++)
    for (size_t j = size; j < size + smem_canary; j++)
      if (smem_regions[i][j] != 0xff) {
        *at = j;
        return true;
      }
  return false;
#endif
}

bool run_block(block_run &b, size_t smem) {
  fresh_smem(smem);
  tsan_release(&b.start_sync);
  for (;;) {
    bool ran = false;
    for (int i = 0; i < b.n && !b.failed; i++)
      if (b.f[i].state == READY) {
        switch_to(&b.f[i]);
        ran = true;
      }
    if (b.failed) break;
    bool all_done = true, any_ready = false;
    for (int i = 0; i < b.n; i++) {
      all_done &= b.f[i].state == DONE;
      any_ready |= b.f[i].state == READY;
    }
    if (all_done) break;
    if (!any_ready || !ran) {
      deadlock(&b);
      break;
    }
  }
  tsan_acquire(&b.end_sync);
  size_t at = 0;
  if (!b.failed && smem_overrun(smem, &at)) {
    b.failed = true;
    snprintf(b.msg, sizeof b.msg,
             "kernel %s block (%u,%u,%u): wrote past its %zu bytes of dynamic shared memory "
             "(byte %zu)",
             b.cfg->name, b.bidx.x, b.bidx.y, b.bidx.z, smem, at);
  }
  return !b.failed;
}

/* PEER_EMU_KERNELS=file: the first launch of each kernel instance appends
 * "<offset in its object> <object> <launch spelling>" to the file, so that
 * a run can be checked to have launched every kernel of the binary
 * (tools/emu-tsan).  Called under launch_lock. */
void note_kernel(const launch_config &cfg) {
  static const char *const path = getenv("PEER_EMU_KERNELS");
  static std::set<const void *> seen;
  Dl_info info;
  if (!path || !cfg.kernel || !seen.insert(cfg.kernel).second || !dladdr(cfg.kernel, &info))
    return;
  FILE *f = fopen(path, "a");
  if (!f) return;
  fprintf(f, "%zx %s %s\n", (size_t)((const char *)cfg.kernel - (const char *)info.dli_fbase),
          info.dli_fname, cfg.name);
  fclose(f);
}

} // namespace

int smem_first_word() { return 0; }

bool pointer_arg_ok(const launch_config &cfg, int index, const void *p) {
  if (!p || device_pointer(p)) return true;
  char msg[512];
  snprintf(msg, sizeof msg, "kernel %s: argument %d (%p) is not device memory", cfg.name, index, p);
  count_launch();
  kernel_error(msg);
  return false;
}

namespace {

void run_grid(const launch_config &cfg, void (*body)(void *), void *ctx) {
  const dim3 g = cfg.grid, bl = cfg.block;
  const unsigned long long threads = (unsigned long long)bl.x * bl.y * bl.z;
  std::lock_guard<std::mutex> hold(launch_lock);
  note_kernel(cfg);
  if (n_regions < 0) n_regions = dynamic_smem_regions(smem_regions, 64);
  const int n = (int)threads;
  while ((int)ht.pool.size() < n) {
    fiber *f = new_fiber();
    if (!f) {
      set_error(cudaErrorLaunchOutOfResources);
      return;
    }
    ht.pool.push_back(f);
  }
  if (emu_tsan) ht.sched_tsan = __tsan_get_current_fiber();
  std::vector<fiber> fibers(n);
  block_run b;
  b.cfg = &cfg;
  b.n = n;
  b.f = fibers.data();
  b.warps.resize((size_t)(n + 31) / 32);
  ht.body = body;
  ht.body_ctx = ctx;
  ht.blk = &b;
  bool ok = true;
  for (unsigned bz = 0; bz < g.z && ok; bz++)
    for (unsigned by = 0; by < g.y && ok; by++)
      for (unsigned bx = 0; bx < g.x && ok; bx++) {
        b.bidx = uint3{bx, by, bz};
        b.bar_arrived = 0;
        b.bar_gen = 0;
        b.failed = false;
        for (warp_run &w : b.warps)
          w.open.clear();
        for (int i = 0; i < n; i++) {
          fiber *pf = ht.pool[(size_t)i];
          fiber &f = fibers[(size_t)i];
          /* the pool keeps stacks and TSan fibers; the run state is fresh */
          f.stack = pf->stack;
          f.tsan = pf->tsan;
          f.dirty = pf->dirty;
#if defined(__x86_64__)
          f.sp = nullptr;
#endif
          prepare(&f);
          pf->tsan = f.tsan;
          pf->dirty = false;
          f.linear = i, f.lane = i % 32, f.warp = i / 32;
          f.state = READY;
          f.ctx.idx =
              uint3{(unsigned)i % bl.x, (unsigned)(i / bl.x) % bl.y, (unsigned)(i / (bl.x * bl.y))};
          f.ctx.bidx = b.bidx;
          f.ctx.bdim = bl;
          f.ctx.gdim = g;
        }
        ok = run_block(b, cfg.smem);
        if (!ok)
          for (int i = 0; i < n; i++)
            if (fibers[(size_t)i].state != DONE) ht.pool[(size_t)i]->dirty = true;
      }
  ht.blk = nullptr;
  if (!ok) kernel_error(b.msg);
}

} // namespace

/* The configuration is checked at the launch (its error is the launch's);
 * the grid runs in the stream's order (runtime.cc's enqueue). */
void launch(const launch_config &cfg, void (*body)(void *), std::shared_ptr<void> ctx) {
  count_launch();
  const dim3 g = cfg.grid, bl = cfg.block;
  const unsigned long long threads = (unsigned long long)bl.x * bl.y * bl.z;
  if (!g.x || !g.y || !g.z || !threads || threads > 1024 || bl.x > 1024 || bl.y > 1024 ||
      bl.z > 64 || g.x > 0x7fffffffu || g.y > 65535 || g.z > 65535) {
    set_error(cudaErrorInvalidConfiguration);
    return;
  }
  if (cfg.smem > smem_max) {
    set_error(cudaErrorInvalidValue);
    return;
  }
  if (!stream_ok(cfg.stream)) {
    set_error(cudaErrorInvalidResourceHandle);
    return;
  }
  enqueue(cfg.stream, [cfg, body, ctx] { run_grid(cfg, body, ctx.get()); });
}

} // namespace peer_emu
