/* thread_comm.h: threads of one test process playing the ranks of a group
 * (test_shard.c, test_cuda_shard.c): a sum and a gather through shared host
 * memory, in rank order, so that every rank gets the same bits; and FAILED,
 * which counts a rank's failed check and keeps the first message. */
#ifndef PEER_TEST_THREAD_COMM_H
#define PEER_TEST_THREAD_COMM_H

#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define THREAD_COMM_MAXW 8

typedef struct group {
  int world;
  pthread_barrier_t bar;
  const void *part[THREAD_COMM_MAXW];
} group;

typedef struct member {
  group *g;
  int rank;
  int fail; /* 1: this rank's communicator reports a failure */
} member;

/* data [count] becomes the sum over the ranks' data, added in rank order. */
static inline void group_sum(member *m, float *data, int64_t count) {
  group *g = m->g;
  g->part[m->rank] = data;
  pthread_barrier_wait(&g->bar);
  float *acc = calloc((size_t)count + 1, sizeof *acc);
  for (int r = 0; r < g->world; r++)
    for (int64_t i = 0; i < count; i++)
      acc[i] += ((const float *)g->part[r])[i];
  pthread_barrier_wait(&g->bar); /* everyone has read every part */
  memcpy(data, acc, (size_t)count * sizeof *acc);
  free(acc);
}

/* recv [world * bytes] gets every rank's send [bytes], in rank order. */
static inline void group_gather(member *m, const void *send, void *recv, size_t bytes) {
  group *g = m->g;
  g->part[m->rank] = send;
  pthread_barrier_wait(&g->bar);
  for (int r = 0; r < g->world; r++)
    memcpy((char *)recv + (size_t)r * bytes, g->part[r], bytes);
  pthread_barrier_wait(&g->bar); /* everyone has copied every part */
}

/* For a job struct with `atomic_int *failures` and `char first[]`. */
#define FAILED(j, ...)                                                                             \
  do {                                                                                             \
    if (atomic_fetch_add((j)->failures, 1) == 0 || !(j)->first[0])                                 \
      snprintf((j)->first, sizeof(j)->first, __VA_ARGS__);                                         \
  } while (0)

#endif
