/* criterion/criterion.h (in-process stand-in): the part of Criterion's API
 * that tests/test_cuda.c uses, running every test in the test process, one
 * after another, for the ThreadSanitizer build of the emulated backend
 * (PEER_EMU_INPROC_TESTS=ON; kernels/README.md): Criterion's worker
 * processes cannot start under TSan (its arena mapping fails).  A failed
 * assertion prints its message and ends its test (longjmp), a failed
 * expectation marks the test failed and lets it run on; each test's line
 * gives its wall and CPU time; the summary line is Criterion's.  --filter PATTERN (extended glob on "suite/name") is
 * honoured; other options are accepted and ignored. */
#ifndef PEER_EMU_INPROC_CRITERION_H
#define PEER_EMU_INPROC_CRITERION_H

#include <fnmatch.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#ifndef FNM_EXTMATCH
#define FNM_EXTMATCH (1 << 5) /* glibc's, declared only with _GNU_SOURCE */
#endif

struct criterion_test_set {
  int unused;
};

typedef struct inproc_test {
  const char *suite, *name;
  void (*fn)(void);
} inproc_test;

static struct { const char *pattern; } criterion_options;

static inproc_test inproc_tests[256];
static int inproc_count;
static jmp_buf inproc_jump;

static void inproc_register(const char *suite, const char *name, void (*fn)(void)) {
  if (inproc_count < 256) inproc_tests[inproc_count++] = (inproc_test){suite, name, fn};
}

static int inproc_expect_failed; /* a cr_expect failed in the running test */

/* A failed check: its message; an assertion (fatal) ends the test, an
 * expectation marks it failed and lets it run on. */
__attribute__((format(printf, 5, 6))) static void
inproc_fail(int fatal, const char *file, int line, const char *expr, const char *fmt, ...) {
  fprintf(stderr, "[----] %s:%d: %s Failed\n[----]   %s\n", file, line,
          fatal ? "Assertion" : "Expectation", expr);
  if (strcmp(fmt, " ") != 0) {
    va_list ap;
    va_start(ap, fmt);
    fprintf(stderr, "[----]   ");
    vfprintf(stderr, fmt, ap);
    fprintf(stderr, "\n");
    va_end(ap);
  }
  if (fatal) longjmp(inproc_jump, 1);
  inproc_expect_failed = 1;
}

#define Test(suite, name, ...)                                                                     \
  static void suite##_##name(void);                                                                \
  __attribute__((constructor)) static void inproc_reg_##suite##_##name(void) {                     \
    inproc_register(#suite, #name, suite##_##name);                                                \
  }                                                                                                \
  static void suite##_##name(void)

#define inproc_check(fatal, cond, ...)                                                             \
  do {                                                                                             \
    if (!(cond)) inproc_fail(fatal, __FILE__, __LINE__, #cond, " " __VA_ARGS__);                   \
  } while (0)
#define cr_assert(cond, ...) inproc_check(1, cond, __VA_ARGS__)
#define cr_assert_eq(a, b, ...) cr_assert((a) == (b), __VA_ARGS__)
#define cr_assert_neq(a, b, ...) cr_assert((a) != (b), __VA_ARGS__)
#define cr_assert_gt(a, b, ...) cr_assert((a) > (b), __VA_ARGS__)
#define cr_assert_str_eq(a, b, ...) cr_assert(strcmp((a), (b)) == 0, __VA_ARGS__)
#define cr_expect_eq(a, b, ...) inproc_check(0, (a) == (b), __VA_ARGS__)

static struct criterion_test_set *criterion_initialize(void) {
  static struct criterion_test_set set;
  return &set;
}

static int criterion_handle_args(int argc, char *argv[], bool handle_unknown) {
  (void)handle_unknown;
  for (int i = 1; i < argc; i++)
    if (!strcmp(argv[i], "--filter") && i + 1 < argc)
      criterion_options.pattern = argv[++i];
    else if (!strncmp(argv[i], "--filter=", 9))
      criterion_options.pattern = argv[i] + 9;
  return 1;
}

static double inproc_seconds(struct timespec a, struct timespec b) {
  return (double)(b.tv_sec - a.tv_sec) + 1e-9 * (double)(b.tv_nsec - a.tv_nsec);
}

static int criterion_run_all_tests(struct criterion_test_set *set) {
  (void)set;
  static int tested, failed, i; /* kept across the longjmp */
  tested = failed = 0;
  for (i = 0; i < inproc_count; i++) {
    char full[256];
    snprintf(full, sizeof full, "%s/%s", inproc_tests[i].suite, inproc_tests[i].name);
    if (criterion_options.pattern && fnmatch(criterion_options.pattern, full, FNM_EXTMATCH))
      continue;
    tested++;
    fprintf(stderr, "[RUN ] %s::%s\n", inproc_tests[i].suite, inproc_tests[i].name);
    inproc_expect_failed = 0;
    static struct timespec t0, t1, c0, c1;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &c0);
    static const char *verdict;
    if (setjmp(inproc_jump) == 0) {
      inproc_tests[i].fn();
      if (inproc_expect_failed) longjmp(inproc_jump, 1);
      verdict = "PASS";
    } else {
      failed++;
      verdict = "FAIL";
    }
    clock_gettime(CLOCK_MONOTONIC, &t1);
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &c1);
    fprintf(stderr, "[%s] %s::%s: %.2fs (cpu %.2fs)\n", verdict, inproc_tests[i].suite,
            inproc_tests[i].name, inproc_seconds(t0, t1), inproc_seconds(c0, c1));
  }
  fprintf(stderr, "[====] Synthesis: Tested: %d | Passing: %d | Failing: %d | Crashing: 0 \n",
          tested, tested - failed, failed);
  return failed == 0;
}

static void criterion_finalize(struct criterion_test_set *set) { (void)set; }

#endif
