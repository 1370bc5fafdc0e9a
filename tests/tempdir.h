/* tests/tempdir.h: a fresh directory per test for the tests that write files
 * (Criterion runs each test in its own process: the suite's .init makes the
 * directory, its .fini removes it with everything in it), and paths in it.
 * Include after Criterion and with _GNU_SOURCE (nftw, mkdtemp) defined. */
#ifndef PEER_TESTS_TEMPDIR_H
#define PEER_TESTS_TEMPDIR_H

#include <criterion/criterion.h>
#include <errno.h>
#include <ftw.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static char test_dir[64];

/* /tmp/peer_test_<tag>.XXXXXX, created (mkdtemp fills the XXXXXX). */
static inline void test_dir_make(const char *tag) {
  snprintf(test_dir, sizeof test_dir, "/tmp/peer_test_%s.XXXXXX", tag);
  cr_assert(mkdtemp(test_dir), "mkdtemp %s: %s", test_dir, strerror(errno));
}

static int test_dir_remove_entry(const char *p, const struct stat *sb, int type, struct FTW *ftw) {
  (void)sb, (void)type, (void)ftw;
  return remove(p);
}

static inline void test_dir_remove(void) {
  nftw(test_dir, test_dir_remove_entry, 16, FTW_DEPTH | FTW_PHYS);
}

/* test_dir/name, in one of four rotating buffers so a test can hold several. */
static inline const char *test_path(const char *name) {
  static char bufs[4][512];
  static int next;
  char *b = bufs[next++ % 4];
  snprintf(b, sizeof bufs[0], "%s/%s", test_dir, name);
  return b;
}

#endif
