/* cli.h: the `peer` command-line tool's shared parts: option parsing, the
 * helpers several commands use (cli.c), and one entry point per command
 * (init.c, info.c, ...; main.c dispatches).  Every error is one line on
 * stderr, "peer: <cmd>: <problem>" (tools/common/cli_util.h), with exit
 * status 2 for a usage error and 1 for any other failure.  Commands use only
 * the public API in peer.h. */
#ifndef PEER_CLI_H
#define PEER_CLI_H

#include "cli_util.h"
#include "peer.h"

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

/* ----------------------------------------------------------- option parsing */

typedef struct cli_opt {
  const char *name;  /* long name without "--" */
  bool takes_value;  /* "--name VALUE" or "--name=VALUE" */
  const char *value; /* last value given; "" for a flag that was given */
} cli_opt;

enum { PARSE_OK = 0, PARSE_HELP = -1 };

/* Parse argv (the words after the command) against opts.  Words that are not
 * options are positional; "--" ends the options.  Returns PARSE_OK, PARSE_HELP
 * for -h/--help, or CLI_EXIT_USAGE after reporting the problem. */
int parse_options(int argc, char **argv, cli_opt *opts, int n_opts, const char **pos, int max_pos,
                  int *n_pos);
/* --threads N: 0 (the default, s NULL) lets OpenMP choose. */
int parse_threads(const char *s, int *out);
/* Threads a layer created with n_threads uses, for reports. */
int threads_used(int n_threads);

/* ----------------------------------------------------------------- helpers */

/* "4.00 GiB" and friends. */
const char *format_bytes(double bytes, char *buf, size_t size);
/* "[1048576, 512]" */
const char *format_shape(const peer_tensor *t, char *buf, size_t size);
/* Seeded standard-normal samples: the same values for a seed on every
 * machine and thread count. */
void fill_gaussian(float *x, size_t count, uint64_t seed);
/* Zeroed calloc of count*size bytes with an overflow check; never NULL for
 * count 0 (NULL means out of memory). */
void *alloc_array(size_t count, size_t size);
/* A CPU layer from a config or a weight file, reporting failures. */
int create_layer(const peer_config *cfg, int n_threads, peer_layer **out);
int load_layer(const char *path, int n_threads, peer_layer **out);
/* Read tensor `name` [T, d] F32 from path into a new buffer (freed by the
 * caller). */
int read_rows(const char *path, const char *name, int64_t d, float **x_out, int64_t *t_out);

/* Multiply-adds and expert bytes of one token's forward (PEER.md "Cost per
 * token"). */
typedef struct token_cost {
  int64_t query, subkeys, experts, total;
  int64_t rows;         /* rows of u and of v read */
  int64_t expert_bytes; /* bytes of those rows */
} token_cost;

token_cost cost_per_token(const peer_config *c);
void print_cost(const peer_config *c, const char *indent);

/* Agreement of two retrievals over T tokens of one layer. */
typedef struct agreement {
  int64_t lists;     /* (token, head) lists compared */
  int64_t identical; /* lists with the same ids in the same order */
  double max_score_diff;
} agreement;

agreement compare_retrievals(int64_t lists, int64_t k, const int64_t *ia, const float *sa,
                             const int64_t *ib, const float *sb);

/* Buffers for retrieval of T tokens: ids and scores [T, H, k]. */
typedef struct retrieval_buf {
  int64_t *ids;
  float *scores;
} retrieval_buf;

bool retrieval_alloc(retrieval_buf *r, int64_t entries);
void retrieval_free(retrieval_buf *r);

/* ---------------------------------------------------------------- commands */

/* Each takes the words after the command name and returns the exit status. */
int cmd_init(int argc, char **argv);
int cmd_info(int argc, char **argv);
int cmd_random(int argc, char **argv);
int cmd_forward(int argc, char **argv);
int cmd_grad(int argc, char **argv);
int cmd_check(int argc, char **argv);
int cmd_demo(int argc, char **argv);
int cmd_convert(int argc, char **argv);
int cmd_shard(int argc, char **argv);

#endif
