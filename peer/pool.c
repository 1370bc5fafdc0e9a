/* pool.c: the CPU backend's parallel loops (pool.h says what and why).
 *
 * One process-wide set of workers serves one call at a time.  A call is a
 * generation: the caller publishes (fn, ctx, n, P) under the mutex, bumps the
 * generation and wakes the workers; everyone, the caller included, then claims
 * items from `next`, whose high bits hold the generation's tag, so a worker
 * that read an old call's job and lost its core before claiming can never
 * claim an item of a newer call (compare-and-swap on tag and index together;
 * the tag wraps after 2^32 calls: a worker would have to sleep through four
 * billion calls between reading a job and claiming from it).  The caller returns when `done` reaches n: every claimed item has
 * finished, and no other thread will touch the call's ctx again. */
#define _GNU_SOURCE
#include "pool.h"

#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>

#define MAX_WORKERS 255
#define ITEM_BITS 32
#define ITEM_MASK ((UINT64_C(1) << ITEM_BITS) - 1)
#define TAG_MASK ((UINT64_C(1) << (64 - ITEM_BITS)) - 1)
#define SPINS 200 /* the caller's polls of `done` before it sleeps (3-30 us) */

#if defined(__x86_64__) || defined(__i386__)
#define CPU_RELAX() __builtin_ia32_pause()
#elif defined(__aarch64__)
#define CPU_RELAX() __asm__ volatile("yield")
#else
#define CPU_RELAX() ((void)0)
#endif

static _Thread_local int my_slot; /* inside an item: its slot; else 0 */

/* tests/test_pool.c's stand-in for a descheduled worker: while held, a worker
 * that wakes for a call waits here before it tries to join. */
static pthread_mutex_t hold_mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t hold_cv = PTHREAD_COND_INITIALIZER;
static _Atomic bool held;
void peer_pool_hold_workers(bool hold) {
  pthread_mutex_lock(&hold_mu);
  atomic_store(&held, hold);
  pthread_cond_broadcast(&hold_cv);
  pthread_mutex_unlock(&hold_mu);
}
/* Unheld (always, outside that test), no lock is taken: a fork() while a
 * worker held hold_mu would leave the child's copy locked for good. */
static void wait_if_held(void) {
  if (!atomic_load(&held)) return;
  pthread_mutex_lock(&hold_mu);
  while (atomic_load(&held)) pthread_cond_wait(&hold_cv, &hold_mu);
  pthread_mutex_unlock(&hold_mu);
}

static struct {
  pthread_mutex_t mu;     /* guards the fields up to `waiting` */
  pthread_cond_t wake;    /* workers: a new generation, or stop */
  pthread_cond_t all_done; /* the caller: the last item finished */
  pthread_mutex_t busy;   /* held by the call that uses the workers */
  int n_workers;
  bool stop;
  uint64_t gen;
  peer_item_fn fn;
  void *ctx;
  int64_t n;
  int P;
  bool waiting;
  pthread_t thread[MAX_WORKERS];
  uint64_t start_gen[MAX_WORKERS]; /* the generation a new worker has seen */
  _Atomic uint64_t next;   /* tag << ITEM_BITS | the next unclaimed item */
  _Atomic uint64_t joined; /* tag << ITEM_BITS | slots taken */
  _Atomic int64_t done;    /* items of this call finished */
  _Atomic int64_t calls, shared_calls, worker_items;
} pool = {.mu = PTHREAD_MUTEX_INITIALIZER,
          .wake = PTHREAD_COND_INITIALIZER,
          .all_done = PTHREAD_COND_INITIALIZER,
          .busy = PTHREAD_MUTEX_INITIALIZER};

int peer_parallel_slot(void) { return my_slot; }

peer_pool_stats peer_pool_counters(void) {
  peer_pool_stats s = {atomic_load(&pool.calls), atomic_load(&pool.shared_calls),
                       atomic_load(&pool.worker_items)};
  return s;
}

/* Take the next unit (item or slot) of the generation tagged `tag` from
 * counter *c if one is left below `limit`; -1 when none is, or when *c belongs
 * to another generation. */
static int64_t take(_Atomic uint64_t *c, uint64_t tag, int64_t limit) {
  uint64_t cur = atomic_load_explicit(c, memory_order_relaxed);
  for (;;) {
    if (cur >> ITEM_BITS != tag || (int64_t)(cur & ITEM_MASK) >= limit) return -1;
    if (atomic_compare_exchange_weak_explicit(c, &cur, cur + 1, memory_order_acquire,
                                              memory_order_relaxed))
      return (int64_t)(cur & ITEM_MASK);
  }
}

/* Run the generation's items until none is left.  A worker's items are
 * counted before they count as done, so the caller sees them on return. */
static void run_items(uint64_t tag, peer_item_fn fn, void *ctx, int64_t n, int slot) {
  int saved = my_slot;
  my_slot = slot;
  int64_t i;
  while ((i = take(&pool.next, tag, n)) >= 0) {
    fn(ctx, i, slot);
    if (slot != 0) atomic_fetch_add_explicit(&pool.worker_items, 1, memory_order_relaxed);
    if (atomic_fetch_add_explicit(&pool.done, 1, memory_order_acq_rel) + 1 == n && slot != 0) {
      pthread_mutex_lock(&pool.mu); /* the caller may be asleep: wake it */
      if (pool.waiting) pthread_cond_signal(&pool.all_done);
      pthread_mutex_unlock(&pool.mu);
    }
  }
  my_slot = saved;
}

static void *worker(void *arg) {
  const int index = (int)(intptr_t)arg; /* 1 .. MAX_WORKERS */
  pthread_mutex_lock(&pool.mu);
  uint64_t seen = pool.start_gen[index - 1];
  for (;;) {
    while (!pool.stop && pool.gen == seen) pthread_cond_wait(&pool.wake, &pool.mu);
    if (pool.stop) break;
    seen = pool.gen;
    if (index >= pool.P) continue; /* this call wants fewer threads */
    const uint64_t tag = seen & TAG_MASK;
    peer_item_fn fn = pool.fn;
    void *ctx = pool.ctx;
    const int64_t n = pool.n;
    const int P = pool.P;
    pthread_mutex_unlock(&pool.mu);
    wait_if_held();
    int64_t slot = take(&pool.joined, tag, P);
    if (slot > 0) run_items(tag, fn, ctx, n, (int)slot);
    pthread_mutex_lock(&pool.mu);
  }
  pthread_mutex_unlock(&pool.mu);
  return NULL;
}

/* fork(): the child has only the forking thread, so it forgets the workers
 * and starts its own when a call needs them. */
static void before_fork(void) { pthread_mutex_lock(&pool.mu); }
static void after_fork_parent(void) { pthread_mutex_unlock(&pool.mu); }
static void after_fork_child(void) {
  pthread_mutex_init(&hold_mu, NULL);
  pthread_cond_init(&hold_cv, NULL);
  pthread_mutex_init(&pool.mu, NULL);
  pthread_mutex_init(&pool.busy, NULL);
  pthread_cond_init(&pool.wake, NULL);
  pthread_cond_init(&pool.all_done, NULL);
  pool.n_workers = 0;
  pool.waiting = false;
}
static pthread_once_t atfork_once = PTHREAD_ONCE_INIT;
static void register_atfork(void) {
  pthread_atfork(before_fork, after_fork_parent, after_fork_child);
}

/* Stop and join the workers when the library is unloaded (or at exit), so
 * that no thread is left running code that is about to be unmapped. */
__attribute__((destructor)) static void stop_workers(void) {
  pthread_mutex_lock(&pool.mu);
  pool.stop = true;
  pthread_cond_broadcast(&pool.wake);
  int n = pool.n_workers;
  pool.n_workers = 0;
  pthread_mutex_unlock(&pool.mu);
  for (int i = 0; i < n; i++) pthread_join(pool.thread[i], NULL);
}

/* Under pool.mu: start workers until `want` exist (fewer if the system
 * refuses threads: the call then runs with those it has). */
static void start_workers(int want) {
  if (pool.stop) return; /* after the destructor: callers run their items alone */
  pthread_once(&atfork_once, register_atfork);
  /* Workers take no signals (the application's handlers stay on its own
   * threads); they inherit the first caller's CPU affinity. */
  sigset_t all, saved;
  sigfillset(&all);
  pthread_sigmask(SIG_SETMASK, &all, &saved);
  while (pool.n_workers < want) {
    int i = pool.n_workers;
    pool.start_gen[i] = pool.gen;
    pthread_attr_t attr;
    if (pthread_attr_init(&attr)) break;
    pthread_attr_setstacksize(&attr, (size_t)8 << 20);
    int err = pthread_create(&pool.thread[i], &attr, worker, (void *)(intptr_t)(i + 1));
    pthread_attr_destroy(&attr);
    if (err) break;
    pthread_setname_np(pool.thread[i], "peer-pool"); /* for top, perf and the tests */
    pool.n_workers++;
  }
  pthread_sigmask(SIG_SETMASK, &saved, NULL);
}

void peer_parallel(int P, int64_t n, peer_item_fn fn, void *ctx) {
  if (n <= 0) return;
  if ((uint64_t)n > ITEM_MASK) P = 1; /* never in this library; stay correct */
  if (P > MAX_WORKERS + 1) P = MAX_WORKERS + 1;
  if (P > n) P = (int)n;
  if (P <= 1 || pthread_mutex_trylock(&pool.busy) != 0) {
    int slot = my_slot; /* nested, concurrent or serial: this thread alone */
    for (int64_t i = 0; i < n; i++) fn(ctx, i, slot);
    return;
  }
  pthread_mutex_lock(&pool.mu);
  start_workers(P - 1);
  const uint64_t tag = ++pool.gen & TAG_MASK;
  pool.fn = fn;
  pool.ctx = ctx;
  pool.n = n;
  pool.P = P;
  atomic_store(&pool.done, 0);
  atomic_store(&pool.joined, tag << ITEM_BITS | 1); /* slot 0 is the caller's */
  atomic_store(&pool.next, tag << ITEM_BITS);
  pthread_cond_broadcast(&pool.wake);
  pthread_mutex_unlock(&pool.mu);
  atomic_fetch_add_explicit(&pool.calls, 1, memory_order_relaxed);

  run_items(tag, fn, ctx, n, 0);
  /* Every item is claimed; wait only for those still running elsewhere. */
  for (int s = 0; s < SPINS && atomic_load_explicit(&pool.done, memory_order_acquire) < n; s++)
    CPU_RELAX();
  if (atomic_load_explicit(&pool.done, memory_order_acquire) < n) {
    pthread_mutex_lock(&pool.mu);
    pool.waiting = true;
    while (atomic_load_explicit(&pool.done, memory_order_acquire) < n)
      pthread_cond_wait(&pool.all_done, &pool.mu);
    pool.waiting = false;
    pthread_mutex_unlock(&pool.mu);
  }
  if ((atomic_load_explicit(&pool.joined, memory_order_relaxed) & ITEM_MASK) > 1)
    atomic_fetch_add_explicit(&pool.shared_calls, 1, memory_order_relaxed);
  pthread_mutex_unlock(&pool.busy);
}

typedef struct {
  peer_range_fn fn;
  void *ctx;
  int64_t n, grain;
} ranges_job;

static void range_item(void *job, int64_t item, int slot) {
  const ranges_job *j = job;
  const int64_t begin = item * j->grain;
  j->fn(j->ctx, begin, j->n - begin < j->grain ? j->n : begin + j->grain, slot);
}

void peer_parallel_ranges(int P, int64_t n, int64_t grain, peer_range_fn fn, void *ctx) {
  if (n <= 0) return;
  if (grain < 1) grain = 1;
  ranges_job j = {fn, ctx, n, grain};
  peer_parallel(P, (n + grain - 1) / grain, range_item, &j);
}
