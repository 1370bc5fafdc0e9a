/* cuda_test_util.h: what the CUDA test programs (test_cuda.c,
 * test_cuda_shard.c) share: whether a device is usable, asked in a child
 * process so that the test process never initialises CUDA before Criterion
 * forks its workers. */
#ifndef PEER_TEST_CUDA_TEST_UTIL_H
#define PEER_TEST_CUDA_TEST_UTIL_H

#include "peer_cuda.h"

#include <sys/wait.h>
#include <unistd.h>

/* 1 if a device is usable. */
static inline int device_usable(void) {
  pid_t pid = fork();
  if (pid < 0) return 0;
  if (pid == 0) _exit(peer_cuda_device_count() > 0 ? 0 : 1);
  int status = 0;
  if (waitpid(pid, &status, 0) != pid) return 0;
  return WIFEXITED(status) && WEXITSTATUS(status) == 0;
}

#endif
