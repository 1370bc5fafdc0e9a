/* test_pool.c: the CPU backend's parallel loops (peer/pool.h): every item
 * runs exactly once, slots are below P and never shared by two running
 * items, workers do join, a call never waits for a worker that has not
 * arrived (one held back, as a descheduled one), late workers of an old call
 * claim nothing of a newer one, nested and concurrent calls run on their own
 * thread, and the pool works again after fork(); and layers called from
 * inside an application's own OpenMP region give the serial results. */
#define _GNU_SOURCE
#include <criterion/criterion.h>

#include <dirent.h>
#include <stdio.h>

#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "peer.h"
#include "pool.h"

#include <omp.h>

#define MAXN 4096
#define MAXP 8

typedef struct {
  _Atomic int count[MAXN];
  _Atomic int in_use[MAXP];
  _Atomic int bad_slot, shared_slot;
  int P;
  int sleep_us;
} tally;

static void sleep_us(int us) {
  struct timespec ts = {us / 1000000, (long)(us % 1000000) * 1000};
  nanosleep(&ts, NULL);
}

static void count_item(void *ctx, int64_t i, int slot) {
  tally *t = ctx;
  if (slot < 0 || slot >= t->P || slot != peer_parallel_slot()) {
    atomic_store(&t->bad_slot, 1);
    return;
  }
  if (atomic_exchange(&t->in_use[slot], 1)) atomic_store(&t->shared_slot, 1);
  if (t->sleep_us) sleep_us(t->sleep_us);
  atomic_fetch_add(&t->count[i], 1);
  atomic_store(&t->in_use[slot], 0);
}

static void run_and_check(tally *t, int P, int64_t n) {
  memset(t, 0, sizeof *t);
  t->P = P;
  peer_parallel(P, n, count_item, t);
  cr_assert_eq(atomic_load(&t->bad_slot), 0, "a slot out of [0, %d) (n=%lld)", P, (long long)n);
  cr_assert_eq(atomic_load(&t->shared_slot), 0, "two running items shared a slot");
  for (int64_t i = 0; i < n; i++)
    cr_assert_eq(atomic_load(&t->count[i]), 1, "item %lld ran %d times (P=%d, n=%lld)",
                 (long long)i, atomic_load(&t->count[i]), P, (long long)n);
}

Test(pool, every_item_once_for_many_shapes) {
  static tally t;
  const int64_t ns[] = {0, 1, 2, 3, 7, 64, 1000, MAXN};
  for (int P = 1; P <= MAXP; P++)
    for (size_t j = 0; j < sizeof ns / sizeof *ns; j++) run_and_check(&t, P, ns[j]);
}

/* Many short calls in a row: a worker late for one call (the tag check)
 * must never run an item of the next one twice or with the old ctx. */
Test(pool, many_short_calls) {
  static tally t;
  srand(7);
  for (int r = 0; r < 20000; r++) run_and_check(&t, 2 + rand() % 3, 1 + rand() % 9);
}

Test(pool, workers_join) {
  static tally t;
  peer_pool_stats before = peer_pool_counters();
  /* sleeping items: a worker joins even on a loaded machine (15 calls of
   * 200 ms at most, all of them correct) */
  for (int r = 0; r < 15 && peer_pool_counters().worker_items == before.worker_items; r++) {
    memset(&t, 0, sizeof t);
    t.P = 2;
    t.sleep_us = 1000;
    peer_parallel(2, 200, count_item, &t);
    for (int i = 0; i < 200; i++) cr_assert_eq(atomic_load(&t.count[i]), 1);
  }
  cr_assert_gt(peer_pool_counters().worker_items, before.worker_items,
               "no item ran on a worker in 15 calls of 200 ms");
}

/* A worker that cannot run (held, as one whose core another process has)
 * costs the call nothing: the caller runs every item and returns. */
Test(pool, call_does_not_wait_for_absent_worker) {
  static tally t;
  peer_parallel(2, 64, count_item, &(tally){.P = 2}); /* the worker exists */
  peer_pool_hold_workers(true);
  peer_pool_stats before = peer_pool_counters();
  for (int r = 0; r < 50; r++) run_and_check(&t, 2, 100);
  peer_pool_stats after = peer_pool_counters();
  cr_assert_eq(after.worker_items, before.worker_items, "a held worker ran items");
  peer_pool_hold_workers(false); /* it wakes into a finished call: nothing to take */
  sleep_us(20000);
  cr_assert_eq(peer_pool_counters().worker_items, before.worker_items,
               "a late worker took an item of a finished call");
  run_and_check(&t, 2, 100); /* and serves the next call */
}

static void nested_item(void *ctx, int64_t i, int slot) {
  tally *inner = (tally *)ctx + 1 + slot; /* one inner tally per outer slot */
  (void)i;
  peer_parallel(2, 5, count_item, inner);
}

Test(pool, nested_calls_run_inline) {
  static tally t[1 + MAXP];
  memset(t, 0, sizeof t);
  for (int s = 0; s <= MAXP; s++) t[s].P = MAXP;
  peer_parallel(2, 40, nested_item, t);
  int total = 0;
  for (int s = 1; s <= 2; s++)
    for (int i = 0; i < 5; i++) total += atomic_load(&t[s].count[i]);
  cr_assert_eq(total, 40 * 5);
  cr_assert_eq(atomic_load(&t[1].bad_slot) + atomic_load(&t[2].bad_slot), 0,
               "a nested call's slot was not its thread's");
}

static void *concurrent_caller(void *arg) {
  tally *t = arg;
  for (int r = 0; r < 300; r++) {
    for (int i = 0; i < 50; i++) atomic_store(&t->count[i], 0);
    peer_parallel(3, 50, count_item, t);
    for (int i = 0; i < 50; i++)
      if (atomic_load(&t->count[i]) != 1) atomic_store(&t->bad_slot, 2);
  }
  return NULL;
}

/* Calls from several application threads at once (distinct ctx, as distinct
 * layers): whoever does not get the workers runs alone; all items once. */
Test(pool, concurrent_callers) {
  static tally t[3];
  memset(t, 0, sizeof t);
  pthread_t th[3];
  for (int i = 0; i < 3; i++) {
    t[i].P = 3;
    cr_assert_eq(pthread_create(&th[i], NULL, concurrent_caller, &t[i]), 0);
  }
  for (int i = 0; i < 3; i++) pthread_join(th[i], NULL);
  for (int i = 0; i < 3; i++) {
    cr_assert_eq(atomic_load(&t[i].bad_slot), 0, "caller %d: an item missed or ran twice", i);
    cr_assert_eq(atomic_load(&t[i].shared_slot), 0);
  }
}

Test(pool, works_after_fork) {
#if defined(__SANITIZE_ADDRESS__)
  /* The forked child's new worker can block for good inside ASan's
   * allocator, on a lock one of the parent's other threads (Criterion's)
   * held at fork() (seen under ctest: gdb shows the worker in
   * SizeClassAllocator64::GetFromAllocator).  glibc's allocator is
   * fork-safe; this test runs in the release build. */
  cr_skip_test("ASan's allocator is not fork-safe for threads started in the child");
#endif
  static tally t;
  run_and_check(&t, 2, 100); /* workers exist in the parent */
  pid_t pid = fork();
  cr_assert_geq(pid, 0);
  if (pid == 0) { /* calls of sleeping items until a new worker took part (3 s at most) */
    const int64_t before = peer_pool_counters().worker_items;
    for (int r = 0; r < 60; r++) {
      memset(&t, 0, sizeof t);
      t.P = 2;
      t.sleep_us = 500;
      peer_parallel(2, 100, count_item, &t);
      int ok = !atomic_load(&t.bad_slot);
      for (int i = 0; i < 100; i++) ok &= atomic_load(&t.count[i]) == 1;
      if (!ok) _exit(2);
      if (peer_pool_counters().worker_items > before) _exit(0);
    }
    _exit(3);
  }
  int status = 0;
  cr_assert_eq(waitpid(pid, &status, 0), pid);
  cr_assert(WIFEXITED(status) && WEXITSTATUS(status) == 0,
            "the child's calls failed: %s",
            !WIFEXITED(status)            ? "it crashed"
            : WEXITSTATUS(status) == 2 ? "an item ran twice, never, or on a bad slot"
            : WEXITSTATUS(status) == 3 ? "no worker joined in 60 calls (3 s)"
                                        : "unexpected exit status");
  run_and_check(&t, 2, 100);
}

/* The pool's threads (named peer-pool): how many, and how many are not
 * asleep (state other than S in /proc/self/task/N/stat). */
static void pool_threads(int *count, int *awake) {
  *count = *awake = 0;
  DIR *dir = opendir("/proc/self/task");
  cr_assert_not_null(dir);
  struct dirent *e;
  while ((e = readdir(dir))) {
    if (e->d_name[0] == '.') continue;
    char path[300], comm[64] = "", stat[512] = "";
    snprintf(path, sizeof path, "/proc/self/task/%s/comm", e->d_name);
    FILE *f = fopen(path, "r");
    if (!f) continue;
    if (!fgets(comm, sizeof comm, f)) comm[0] = 0;
    fclose(f);
    if (strncmp(comm, "peer-pool", 9) != 0) continue;
    ++*count;
    snprintf(path, sizeof path, "/proc/self/task/%s/stat", e->d_name);
    f = fopen(path, "r");
    if (!f) continue;
    if (fgets(stat, sizeof stat, f)) {
      const char *close = strrchr(stat, ')'); /* "pid (comm) S ..." */
      if (close && close[1] == ' ' && close[2] != 'S') ++*awake;
    }
    fclose(f);
  }
  closedir(dir);
}

/* Workers exist only as many as calls asked for, and between calls they
 * sleep: they never spin on a core another process (or PyTorch) needs. */
Test(pool, idle_workers_sleep) {
  static tally t;
  run_and_check(&t, 3, 500);
  int count, awake = 1;
  pool_threads(&count, &awake);
  cr_assert_leq(count, 2, "%d workers for calls of at most 3 threads", count);
  for (int i = 0; i < 100 && awake; i++) { /* one just finishing may still be on its way */
    sleep_us(10000);
    pool_threads(&count, &awake);
  }
  cr_assert_eq(awake, 0, "%d idle worker(s) still running 1 s after the call", awake);
}

/* An application that runs its own OpenMP region and calls its own layer on
 * each thread (2 library threads each): every forward gives the serial bits.
 * Per-thread scratch once took OpenMP's thread number there, which is the
 * application's and not the pool's slot (wrong results, writes past the
 * workspace with 8 application threads). */
Test(pool, layers_inside_an_application_openmp_region) {
  enum { T = 64, D = 64, APP = 6 };
  peer_config cfg;
  peer_config_default(&cfg);
  cr_assert_eq(peer_config_parse(&cfg, "d_model=64,n_heads=2,d_key=32,n_subkeys=64,top_k=8"), PEER_OK);
  peer_options opt;
  peer_options_default(&opt);
  opt.n_threads = 2;
  static float x[T * D], ref[T * D];
  for (int i = 0; i < T * D; i++) x[i] = (float)((i * 7919) % 1000) / 500.0f - 1.0f;
  peer_layer *L0;
  cr_assert_eq(peer_layer_create(&L0, &cfg, &opt), PEER_OK);
  cr_assert_eq(peer_layer_init(L0, 1), PEER_OK);
  cr_assert_eq(peer_forward(L0, T, x, ref, NULL, NULL), PEER_OK);
  peer_layer_free(L0);
  int diff = 0, failed = 0;
#pragma omp parallel num_threads(APP) reduction(+ : diff, failed)
  {
    peer_layer *L = NULL;
    static _Thread_local float y[T * D];
    if (peer_layer_create(&L, &cfg, &opt) || peer_layer_init(L, 1)) {
      failed++;
    } else {
      for (int r = 0; r < 60; r++) {
        failed += peer_forward(L, T, x, y, NULL, NULL) != PEER_OK;
        diff += memcmp(y, ref, sizeof y) != 0;
      }
    }
    peer_layer_free(L);
  }
  cr_assert_eq(failed, 0);
  cr_assert_eq(diff, 0, "%d of %d forwards differ from the serial result", diff, APP * 60);
}
