/* pool.h: the CPU backend's parallel loops (issue 15 item 7: robust when
 * cores are shared).
 *
 * peer_parallel(P, n, fn, ctx) runs fn(ctx, i, slot) once for every item i in
 * [0, n), on the calling thread and up to P - 1 of the library's own worker
 * threads.  Items are claimed one at a time from a shared counter, so a thread
 * that loses its core holds back only the item it is in; and the call returns
 * as soon as every item is DONE, without waiting for workers that never woke
 * up: a descheduled worker costs the call nothing (an OpenMP region's end
 * waits until every thread of the team has arrived, which on a shared core
 * can be a whole scheduler time slice, again at every region).  Idle workers
 * sleep on a condition variable (they never spin on a core someone else
 * needs).
 *
 * slot identifies the participant for per-thread scratch: 0 is the caller,
 * workers take 1 .. P - 1; two items of one call running at once never share
 * a slot.  (Items of different calls may: an inline call, below, uses its
 * thread's slot, so scratch must belong to the call's ctx, as the CPU
 * backend's per-layer workspaces do.)
 * Which thread runs which item is not fixed, so fn must give results that do
 * not depend on it (the CPU backend's loops write disjoint outputs and sum
 * integer counts).  A call made while the pool runs another (from inside an
 * item, or from another application thread) runs all its items on the calling
 * thread, with that thread's own slot (peer_parallel_slot).  The pool never
 * fails: when a worker cannot be started the caller runs the items itself.
 * It survives fork() (the child starts new workers when it needs them), but
 * not a fork() from inside an item (the child would wait for items the
 * parent's workers hold).  Workers block all signals. */
#ifndef PEER_POOL_H
#define PEER_POOL_H

#include <stdbool.h>
#include <stdint.h>

typedef void (*peer_item_fn)(void *ctx, int64_t item, int slot);

void peer_parallel(int P, int64_t n, peer_item_fn fn, void *ctx);

/* [0, n) in items of `grain` consecutive indices (the last may be shorter):
 * fn(ctx, begin, end, slot), as peer_parallel's items. */
typedef void (*peer_range_fn)(void *ctx, int64_t begin, int64_t end, int slot);
void peer_parallel_ranges(int P, int64_t n, int64_t grain, peer_range_fn fn, void *ctx);

/* The slot of the calling thread inside an item of peer_parallel, else 0. */
int peer_parallel_slot(void);

/* Counters for tests and benchmarks, since the process started: calls that
 * used workers, and items run by workers. */
typedef struct {
  int64_t calls, shared_calls, worker_items;
} peer_pool_stats;
peer_pool_stats peer_pool_counters(void);

/* Tests only: while held, workers that wake for a call stop before joining
 * it, as a worker whose core was taken would (the call must not wait). */
void peer_pool_hold_workers(bool hold);

#endif
