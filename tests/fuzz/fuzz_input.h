/* fuzz_input.h: what the libFuzzer harnesses share: the input as a file the
 * library can open by path (a memfd, named /proc/self/fd/N: a regular file
 * that never touches the disk), and a check that a failing call left a
 * message. */
#ifndef PEER_FUZZ_INPUT_H
#define PEER_FUZZ_INPUT_H

#define _GNU_SOURCE
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <unistd.h>

#include "peer.h"

/* The input's bytes as the file at the returned path (valid until the next
 * call). */
static inline const char *fuzz_file(const uint8_t *data, size_t size) {
  static int fd = -1;
  static char path[64];
  if (fd < 0) {
    fd = memfd_create("peer-fuzz", MFD_CLOEXEC);
    if (fd < 0) abort();
    snprintf(path, sizeof path, "/proc/self/fd/%d", fd);
  }
  if (ftruncate(fd, 0) != 0) abort();
  size_t done = 0;
  while (done < size) {
    ssize_t put = pwrite(fd, data + done, size - done, (off_t)done);
    if (put <= 0) abort();
    done += (size_t)put;
  }
  return path;
}

/* Every failure names its problem: an empty message is a bug. */
static inline void fuzz_check_failure(peer_status st) {
  if (st != PEER_OK && peer_last_error()[0] == '\0') abort();
}

#endif
