/* cli_util.c: the helpers of cli_util.h, shared by `peer` and `peer-ablate`. */
#include "cli_util.h"

#include <errno.h>
#include <math.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static const char *g_prefix = "peer";

void cli_set_prefix(const char *prefix) { g_prefix = prefix; }

/* Async-signal-safe: unlink, then the default action (the signal stays
 * blocked until the handler returns, so the process dies of it then). */
static void remove_temporaries_and_die(int sig) {
  peer_remove_temporaries();
  signal(sig, SIG_DFL);
  raise(sig);
}

void cli_remove_temporaries_on_signals(void) {
  struct sigaction sa;
  memset(&sa, 0, sizeof sa);
  sa.sa_handler = remove_temporaries_and_die;
  sigemptyset(&sa.sa_mask);
  const int sigs[] = {SIGINT, SIGTERM, SIGHUP};
  for (size_t i = 0; i < sizeof sigs / sizeof sigs[0]; i++)
    sigaction(sigs[i], &sa, NULL);
}

static void report(const char *fmt, va_list ap) {
  fprintf(stderr, "%s: ", g_prefix);
  vfprintf(stderr, fmt, ap);
  fputc('\n', stderr);
}

int fail(const char *fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  report(fmt, ap);
  va_end(ap);
  return CLI_EXIT_FAILURE;
}

int usage_error(const char *fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  report(fmt, ap);
  va_end(ap);
  return CLI_EXIT_USAGE;
}

int lib_fail(peer_status st, const char *what) {
  const char *msg = peer_last_error();
  if (!msg || !*msg) msg = peer_status_string(st);
  return what ? fail("%s: %s", what, msg) : fail("%s", msg);
}

int parse_int(const char *name, const char *s, int64_t lo, int64_t hi, int64_t *out) {
  char *end = NULL;
  errno = 0;
  long long v = strtoll(s, &end, 10);
  if (!*s || *end != '\0' || s[0] == ' ' || s[0] == '\t')
    return usage_error("--%s: '%s' is not an integer", name, s);
  if (errno == ERANGE || v < lo || v > hi)
    return usage_error("--%s: %s is not in [%lld, %lld]", name, s, (long long)lo, (long long)hi);
  *out = (int64_t)v;
  return 0;
}

int parse_float(const char *name, const char *s, double lo, double hi, double *out) {
  char *end = NULL;
  double v = strtod(s, &end);
  if (!*s || *end != '\0' || s[0] == ' ' || s[0] == '\t' || !isfinite(v))
    return usage_error("--%s: '%s' is not a number", name, s);
  if (v < lo || v > hi) return usage_error("--%s: %s is not in [%g, %g]", name, s, lo, hi);
  *out = v;
  return 0;
}

int parse_seed(const char *name, const char *s, uint64_t *out) {
  char *end = NULL;
  errno = 0;
  if (!*s || s[0] < '0' || s[0] > '9')
    return usage_error("--%s: '%s' is not a non-negative integer", name, s);
  unsigned long long v = strtoull(s, &end, 10);
  if (*end != '\0') return usage_error("--%s: '%s' is not a non-negative integer", name, s);
  if (errno == ERANGE) return usage_error("--%s: %s does not fit in 64 bits", name, s);
  *out = (uint64_t)v;
  return 0;
}

double now_seconds(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static int compare_double(const void *a, const void *b) {
  double x = *(const double *)a, y = *(const double *)b;
  return (x > y) - (x < y);
}

double median(double *v, int n) {
  qsort(v, (size_t)n, sizeof *v, compare_double);
  return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}
