/* cli_util.h: what the project's programs (`peer`, `peer-ablate`) share:
 * one-line error reports with the program's prefix and their exit statuses,
 * whole-string number parsing for options, and a monotonic clock.  Programs
 * print and exit; the library never does. */
#ifndef PEER_CLI_UTIL_H
#define PEER_CLI_UTIL_H

#include "peer.h"

#include <stdint.h>

enum { CLI_EXIT_FAILURE = 1, CLI_EXIT_USAGE = 2 };

/* Prefix of every report, e.g. "peer: init" or "peer-ablate" (not copied). */
void cli_set_prefix(const char *prefix);

/* "<prefix>: <message>" on stderr; return CLI_EXIT_FAILURE. */
int fail(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
/* The same for a usage error; return CLI_EXIT_USAGE. */
int usage_error(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
/* A library failure: what the program was doing, then the library's own
 * message (or the status name when it left none); return CLI_EXIT_FAILURE.
 * `what` NULL prints the library's message alone. */
int lib_fail(peer_status st, const char *what);

/* Option values, parsed whole ("12x" and " 12" are refused); each reports a
 * usage error naming --name and returns CLI_EXIT_USAGE, or returns 0. */
int parse_int(const char *name, const char *s, int64_t lo, int64_t hi, int64_t *out);
int parse_float(const char *name, const char *s, double lo, double hi, double *out);
/* A seed: a decimal integer in [0, 2^64). */
int parse_seed(const char *name, const char *s, uint64_t *out);

/* On SIGINT, SIGTERM and SIGHUP, remove the temporary files of the saves in
 * progress (peer_remove_temporaries), then die of the signal as before.  The
 * destination keeps its old contents. */
void cli_remove_temporaries_on_signals(void);

/* Seconds on the monotonic clock. */
double now_seconds(void);
/* Median of v[0 .. n), n >= 1 (sorts v). */
double median(double *v, int n);

#endif
