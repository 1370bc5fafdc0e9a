/* cli.c: helpers shared by the `peer` commands (cli.h). */
#include "cli.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

/* ----------------------------------------------------------- option parsing */

/* Parse argv (the words after the command) against opts.  Words that are not
 * options are positional; "--" ends the options.  Returns PARSE_OK, PARSE_HELP
 * for -h/--help, or CLI_EXIT_USAGE after reporting the problem. */
int parse_options(int argc, char **argv, cli_opt *opts, int n_opts, const char **pos, int max_pos,
                  int *n_pos) {
  *n_pos = 0;
  bool options_done = false;
  for (int i = 0; i < argc; i++) {
    const char *arg = argv[i];
    bool is_option = !options_done && arg[0] == '-' && arg[1] != '\0';
    if (!is_option) {
      if (*n_pos >= max_pos)
        return max_pos == 0 ? usage_error("unexpected argument '%s'", arg)
                            : usage_error("unexpected extra argument '%s'", arg);
      pos[(*n_pos)++] = arg;
      continue;
    }
    if (strcmp(arg, "--") == 0) {
      options_done = true;
      continue;
    }
    if (strcmp(arg, "-h") == 0 || strcmp(arg, "--help") == 0) return PARSE_HELP;
    if (arg[1] != '-') return usage_error("unknown option '%s'", arg);
    const char *name = arg + 2;
    const char *eq = strchr(name, '=');
    size_t len = eq ? (size_t)(eq - name) : strlen(name);
    cli_opt *o = NULL;
    for (int j = 0; j < n_opts; j++)
      if (strlen(opts[j].name) == len && strncmp(opts[j].name, name, len) == 0) o = &opts[j];
    if (!o) return usage_error("unknown option '--%.*s'", (int)len, name);
    if (!o->takes_value) {
      if (eq) return usage_error("option '--%s' takes no value", o->name);
      o->value = "";
    } else if (eq) {
      o->value = eq + 1;
    } else {
      if (i + 1 >= argc) return usage_error("option '--%s' needs a value", o->name);
      o->value = argv[++i];
    }
  }
  return PARSE_OK;
}

/* --threads N: 0 (the default) lets OpenMP choose. */
int parse_threads(const char *s, int *out) {
  if (!s) {
    *out = 0;
    return 0;
  }
  int64_t v;
  int rc = parse_int("threads", s, 0, 4096, &v);
  if (rc) return rc;
  *out = (int)v;
  return 0;
}

/* Threads a layer created with n_threads uses, for reports. */
int threads_used(int n_threads) {
  if (n_threads > 0) return n_threads;
#ifdef _OPENMP
  return omp_get_max_threads();
#else
  return 1;
#endif
}

/* "4.00 GiB" and friends. */
const char *format_bytes(double bytes, char *buf, size_t size) {
  static const char *const units[] = {"B", "KiB", "MiB", "GiB", "TiB"};
  int u = 0;
  while (bytes >= 1024.0 && u < 4)
    bytes /= 1024.0, u++;
  if (u == 0)
    snprintf(buf, size, "%.0f B", bytes);
  else
    snprintf(buf, size, "%.2f %s", bytes, units[u]);
  return buf;
}

/* "[1048576, 512]" */
const char *format_shape(const peer_tensor *t, char *buf, size_t size) {
  size_t used = (size_t)snprintf(buf, size, "[");
  for (int i = 0; i < t->ndim && used < size; i++)
    used +=
        (size_t)snprintf(buf + used, size - used, "%s%lld", i ? ", " : "", (long long)t->shape[i]);
  if (used < size) snprintf(buf + used, size - used, "]");
  return buf;
}

/* Seeded standard-normal samples (splitmix64 + Box-Muller): the same x for a
 * seed on every machine and thread count. */
static uint64_t splitmix64(uint64_t *state) {
  uint64_t z = (*state += 0x9e3779b97f4a7c15ull);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

void fill_gaussian(float *x, size_t count, uint64_t seed) {
  uint64_t state = seed;
  const double two_pi = 6.283185307179586;
  for (size_t i = 0; i < count; i += 2) {
    double u1 = ((double)(splitmix64(&state) >> 11) + 1.0) * 0x1.0p-53; /* (0, 1] */
    double u2 = (double)(splitmix64(&state) >> 11) * 0x1.0p-53;         /* [0, 1) */
    double r = sqrt(-2.0 * log(u1));
    x[i] = (float)(r * cos(two_pi * u2));
    if (i + 1 < count) x[i + 1] = (float)(r * sin(two_pi * u2));
  }
}

/* calloc of count*size bytes with an overflow check; never NULL for count 0. */
void *alloc_array(size_t count, size_t size) {
  size_t bytes;
  if (__builtin_mul_overflow(count, size, &bytes)) return NULL;
  return calloc(bytes ? bytes : 1, 1); /* zeroed: 'grad' adds expert rows into it */
}

int create_layer(const peer_config *cfg, int n_threads, peer_layer **out) {
  peer_options opt;
  peer_options_default(&opt);
  opt.n_threads = n_threads;
  peer_status st = peer_layer_create(out, cfg, &opt);
  return st ? lib_fail(st, "cannot create layer") : 0;
}

int load_layer(const char *path, int n_threads, peer_layer **out) {
  peer_options opt;
  peer_options_default(&opt);
  opt.n_threads = n_threads;
  peer_status st = peer_layer_load(out, path, &opt);
  if (!st) return 0;
  return lib_fail(st, "cannot load weights");
}

token_cost cost_per_token(const peer_config *c) {
  token_cost t;
  t.query = c->d_model * c->n_heads * c->d_key;
  t.subkeys = c->n_heads * c->n_subkeys * c->d_key;
  t.experts = 2 * c->n_heads * c->top_k * c->d_model;
  t.total = t.query + t.subkeys + t.experts;
  t.rows = c->n_heads * c->top_k;
  t.expert_bytes = t.experts * (int64_t)peer_dtype_size(c->weight_dtype);
  return t;
}

void print_cost(const peer_config *c, const char *indent) {
  token_cost t = cost_per_token(c);
  int64_t kp = peer_config_subkey_top_k(c);
  char b[32];
  printf("%squery:          %lld multiply-adds (d*H*d_key)\n", indent, (long long)t.query);
  printf("%ssub-key scores: %lld multiply-adds (H*n*d_key)\n", indent, (long long)t.subkeys);
  printf("%sselection:      %lld selections of %lld out of %lld, %lld of %lld out of %lld\n",
         indent, (long long)(2 * c->n_heads), (long long)kp, (long long)c->n_subkeys,
         (long long)c->n_heads, (long long)c->top_k, (long long)(kp * kp));
  printf("%sexperts:        %lld multiply-adds (2*H*k*d), %lld rows of u and of v = %s\n", indent,
         (long long)t.experts, (long long)t.rows,
         format_bytes((double)t.expert_bytes, b, sizeof b));
  printf("%stotal:          %lld multiply-adds, %s of random expert-row reads\n", indent,
         (long long)t.total, format_bytes((double)t.expert_bytes, b, sizeof b));
}

/* Read tensor `name` [T, d] F32 from path into a new buffer. */
int read_rows(const char *path, const char *name, int64_t d, float **x_out, int64_t *t_out) {
  peer_safetensors *f = NULL;
  peer_status st = peer_safetensors_open(&f, path);
  if (st) return lib_fail(st, NULL);
  int rc = 0;
  peer_tensor t;
  char shape[96];
  if (peer_safetensors_find(f, name, &t)) {
    rc = fail("input '%s' has no tensor '%s'", path, name);
  } else if (t.dtype != PEER_F32) {
    rc = fail("input %s is %s; it must be F32", name, peer_dtype_name(t.dtype));
  } else if (t.ndim != 2) {
    rc = fail("input %s has shape %s; it must be [T, d_model] (2 dimensions)", name,
              format_shape(&t, shape, sizeof shape));
  } else if (t.shape[1] != d) {
    rc = fail("input %s has shape %s; its width %lld is not the layer's d_model %lld", name,
              format_shape(&t, shape, sizeof shape), (long long)t.shape[1], (long long)d);
  } else {
    float *x = alloc_array(t.nbytes, 1);
    if (!x) {
      rc = fail("cannot allocate %zu bytes for %s", t.nbytes, name);
    } else if ((st = peer_safetensors_read(f, name, x, t.nbytes))) {
      free(x);
      rc = lib_fail(st, "cannot read input");
    } else {
      *x_out = x;
      *t_out = t.shape[0];
    }
  }
  peer_safetensors_close(f);
  return rc;
}

/* ------------------------------------------------- product key vs brute force */

agreement compare_retrievals(int64_t lists, int64_t k, const int64_t *ia, const float *sa,
                             const int64_t *ib, const float *sb) {
  agreement a = {lists, 0, 0.0};
  for (int64_t l = 0; l < lists; l++) {
    bool same = true;
    for (int64_t j = 0; j < k; j++) {
      int64_t e = l * k + j;
      if (ia[e] != ib[e]) same = false;
      double diff = fabs((double)sa[e] - (double)sb[e]);
      if (!(diff <= a.max_score_diff)) a.max_score_diff = diff; /* NaN sticks */
    }
    a.identical += same;
  }
  return a;
}

bool retrieval_alloc(retrieval_buf *r, int64_t entries) {
  r->ids = alloc_array((size_t)entries, sizeof *r->ids);
  r->scores = alloc_array((size_t)entries, sizeof *r->scores);
  return r->ids && r->scores;
}

void retrieval_free(retrieval_buf *r) {
  free(r->ids);
  free(r->scores);
}
