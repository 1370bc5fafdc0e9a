/* peer.c: the `peer` command-line tool.  It creates and inspects PEER weight
 * files, runs a layer over activation files, checks product-key retrieval
 * against brute force, and runs the demo that tools/run shows (a
 * million-expert layer timed on this machine).  It uses only the public API
 * in peer.h; every error is one line on stderr, "peer: <cmd>: <problem>",
 * with exit status 2 for a usage error and 1 for any other failure. */
#include "peer.h"

#include <errno.h>
#include <math.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#ifdef _OPENMP
#include <omp.h>
#endif

enum { EXIT_USAGE = 2 };

/* Name of the command being run, for error messages. */
static const char *g_cmd = "peer";

static void print_error(const char *fmt, va_list ap) {
  fprintf(stderr, "peer: %s: ", g_cmd);
  vfprintf(stderr, fmt, ap);
  fputc('\n', stderr);
}

/* Report a failure (exit status 1) and return that status. */
static int fail(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static int fail(const char *fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  print_error(fmt, ap);
  va_end(ap);
  return EXIT_FAILURE;
}

/* Report a usage error (exit status 2) and return that status. */
static int usage_error(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static int usage_error(const char *fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  print_error(fmt, ap);
  va_end(ap);
  return EXIT_USAGE;
}

/* Report a library failure: what the tool was doing, then the library's own
 * message (or the status name when it left none). */
static int lib_fail(peer_status st, const char *what) {
  const char *msg = peer_last_error();
  if (!msg || !*msg) msg = peer_status_string(st);
  return fail("%s: %s", what, msg);
}

/* ----------------------------------------------------------- option parsing */

typedef struct cli_opt {
  const char *name;  /* long name without "--" */
  bool takes_value;  /* "--name VALUE" or "--name=VALUE" */
  const char *value; /* last value given; "" for a flag that was given */
} cli_opt;

enum { PARSE_OK = 0, PARSE_HELP = -1 };

/* Parse argv (the words after the command) against opts.  Words that are not
 * options are positional; "--" ends the options.  Returns PARSE_OK, PARSE_HELP
 * for -h/--help, or EXIT_USAGE after reporting the problem. */
static int parse_options(int argc, char **argv, cli_opt *opts, int n_opts, const char **pos,
                         int max_pos, int *n_pos) {
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

/* Parse a whole-string decimal integer in [lo, hi] given for option `name`. */
static int parse_int(const char *name, const char *s, int64_t lo, int64_t hi, int64_t *out) {
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

/* Parse a seed: a decimal integer in [0, 2^64). */
static int parse_seed(const char *s, uint64_t *out) {
  char *end = NULL;
  errno = 0;
  if (!*s || s[0] < '0' || s[0] > '9')
    return usage_error("--seed: '%s' is not a non-negative integer", s);
  unsigned long long v = strtoull(s, &end, 10);
  if (*end != '\0') return usage_error("--seed: '%s' is not a non-negative integer", s);
  if (errno == ERANGE) return usage_error("--seed: %s does not fit in 64 bits", s);
  *out = (uint64_t)v;
  return 0;
}

/* --threads N: 0 (the default) lets OpenMP choose. */
static int parse_threads(const char *s, int *out) {
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
static int threads_used(int n_threads) {
  if (n_threads > 0) return n_threads;
#ifdef _OPENMP
  return omp_get_max_threads();
#else
  return 1;
#endif
}

/* ----------------------------------------------------------------- helpers */

static double now_seconds(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static int compare_double(const void *a, const void *b) {
  double x = *(const double *)a, y = *(const double *)b;
  return (x > y) - (x < y);
}

static double median(double *v, int n) {
  qsort(v, (size_t)n, sizeof *v, compare_double);
  return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

/* "4.00 GiB" and friends. */
static const char *format_bytes(double bytes, char *buf, size_t size) {
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
static const char *format_shape(const peer_tensor *t, char *buf, size_t size) {
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

static void fill_gaussian(float *x, size_t count, uint64_t seed) {
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
static void *alloc_array(size_t count, size_t size) {
  size_t bytes;
  if (__builtin_mul_overflow(count, size, &bytes)) return NULL;
  return calloc(bytes ? bytes : 1, 1); /* zeroed: 'grad' adds expert rows into it */
}

static int create_layer(const peer_config *cfg, int n_threads, peer_layer **out) {
  peer_options opt;
  peer_options_default(&opt);
  opt.n_threads = n_threads;
  peer_status st = peer_layer_create(out, cfg, &opt);
  return st ? lib_fail(st, "cannot create layer") : 0;
}

static int load_layer(const char *path, int n_threads, peer_layer **out) {
  peer_options opt;
  peer_options_default(&opt);
  opt.n_threads = n_threads;
  peer_status st = peer_layer_load(out, path, &opt);
  if (!st) return 0;
  return lib_fail(st, "cannot load weights");
}

/* Multiply-adds and expert bytes of one token's forward (PEER.md "Cost per
 * token"). */
typedef struct token_cost {
  int64_t query, subkeys, experts, total;
  int64_t rows;         /* rows of u and of v read */
  int64_t expert_bytes; /* bytes of those rows */
} token_cost;

static token_cost cost_per_token(const peer_config *c) {
  token_cost t;
  t.query = c->d_model * c->n_heads * c->d_key;
  t.subkeys = c->n_heads * c->n_subkeys * c->d_key;
  t.experts = 2 * c->n_heads * c->top_k * c->d_model;
  t.total = t.query + t.subkeys + t.experts;
  t.rows = c->n_heads * c->top_k;
  t.expert_bytes = t.experts * (int64_t)peer_dtype_size(c->weight_dtype);
  return t;
}

static void print_cost(const peer_config *c, const char *indent) {
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

/* -------------------------------------------------------------------- init */

static const char usage_init[] =
    "usage: peer init [--config K=V,...] [--seed S] --out W.safetensors [--threads N]\n"
    "\n"
    "Create a layer from the default config with the given changes, initialise\n"
    "it from the seed (same bits for every thread count) and save it.\n"
    "\n"
    "  --config K=V,...  config changes, PEER.md names (d_model, n_heads, d_key,\n"
    "                    n_subkeys, top_k, subkey_top_k, shared_keys, activation,\n"
    "                    gate, query_norm, query_bias, weight_dtype)\n"
    "  --seed S          initialisation seed (default 0)\n"
    "  --out PATH        weight file to write (safetensors)\n"
    "  --threads N       CPU threads (default: OpenMP's choice)\n"
    "\n"
    "example: peer init --config n_subkeys=256,d_model=256 --seed 1 --out w.safetensors\n";

static int cmd_init(int argc, char **argv) {
  cli_opt opts[] = {
      {"config", true, NULL}, {"seed", true, NULL}, {"out", true, NULL}, {"threads", true, NULL}};
  int n_pos, rc = parse_options(argc, argv, opts, 4, NULL, 0, &n_pos);
  if (rc == PARSE_HELP) return fputs(usage_init, stdout), 0;
  if (rc) return rc;
  const char *config_text = opts[0].value, *out_path = opts[2].value;
  uint64_t seed = 0;
  int n_threads;
  if (!out_path) return usage_error("--out is required");
  if (opts[1].value && (rc = parse_seed(opts[1].value, &seed))) return rc;
  if ((rc = parse_threads(opts[3].value, &n_threads))) return rc;

  peer_config cfg;
  peer_config_default(&cfg);
  peer_status st;
  if (config_text && (st = peer_config_parse(&cfg, config_text)))
    return usage_error("--config: %s", peer_last_error());
  if ((st = peer_config_validate(&cfg))) return usage_error("--config: %s", peer_last_error());

  peer_layer *layer = NULL;
  if ((rc = create_layer(&cfg, n_threads, &layer))) return rc;
  double t0 = now_seconds();
  if ((st = peer_layer_init(layer, seed))) {
    rc = lib_fail(st, "cannot initialise layer");
    goto done;
  }
  double t1 = now_seconds();
  if ((st = peer_layer_save(layer, out_path))) {
    rc = lib_fail(st, "cannot save");
    goto done;
  }
  double t2 = now_seconds();
  char text[512];
  peer_config_format(&cfg, text, sizeof text);
  printf("config: %s\n", text);
  printf("wrote %s: %lld experts, %lld parameters (init %.2f s, save %.2f s)\n", out_path,
         (long long)peer_config_n_experts(&cfg), (long long)peer_layer_n_parameters(layer), t1 - t0,
         t2 - t1);
done:
  peer_layer_free(layer);
  return rc;
}

/* -------------------------------------------------------------------- info */

static const char usage_info[] =
    "usage: peer info W.safetensors\n"
    "\n"
    "Print a weight file's config, expert count, total and active parameters,\n"
    "its tensors (name, dtype, shape, bytes) and the forward cost per token.\n"
    "Only the header is read; tensors are checked against the config.\n";

/* Config names as stored under "peer.<name>" in a weight file's metadata. */
static const char *const config_keys[] = {"d_model", "n_heads",      "d_key",       "n_subkeys",
                                          "top_k",   "subkey_top_k", "shared_keys", "activation",
                                          "gate",    "query_norm",   "query_bias",  "weight_dtype"};
enum { N_CONFIG_KEYS = sizeof config_keys / sizeof config_keys[0] };

/* Rebuild the config from a file's metadata. */
static int config_from_metadata(const peer_safetensors *f, peer_config *cfg) {
  const char *format = peer_safetensors_metadata(f, "peer.format");
  if (!format) return fail("not a peer weight file: metadata has no peer.format");
  if (strcmp(format, "1") != 0)
    return fail("peer.format '%s' is not supported (this build reads %d)", format,
                PEER_FORMAT_VERSION);
  peer_config_default(cfg);
  for (int i = 0; i < N_CONFIG_KEYS; i++) {
    char key[64], item[256];
    snprintf(key, sizeof key, "peer.%s", config_keys[i]);
    const char *value = peer_safetensors_metadata(f, key);
    if (!value) return fail("metadata has no %s", key);
    if (strchr(value, ',') || strlen(value) > 200)
      return fail("metadata %s: '%.40s' is not a valid value", key, value);
    snprintf(item, sizeof item, "%s=%s", config_keys[i], value);
    if (peer_config_parse(cfg, item)) return fail("metadata: %s", peer_last_error());
  }
  if (peer_config_validate(cfg)) return fail("metadata: %s", peer_last_error());
  return 0;
}

/* Every parameter the config implies must be in the file with its shape and
 * dtype. */
static int check_tensors(peer_layer *layer, const peer_safetensors *f) {
  for (int i = 0; i < peer_layer_n_params(layer); i++) {
    peer_tensor want, have;
    if (peer_layer_param(layer, i, &want)) return fail("%s", peer_last_error());
    if (peer_safetensors_find(f, want.name, &have))
      return fail("file lacks tensor '%s' that the config needs", want.name);
    bool same = have.dtype == want.dtype && have.ndim == want.ndim;
    for (int j = 0; same && j < want.ndim; j++)
      same = have.shape[j] == want.shape[j];
    if (!same) {
      char a[96], b[96];
      return fail("tensor '%s' is %s %s, the config needs %s %s", want.name,
                  peer_dtype_name(have.dtype), format_shape(&have, a, sizeof a),
                  peer_dtype_name(want.dtype), format_shape(&want, b, sizeof b));
    }
  }
  return 0;
}

static void print_config(const peer_config *c) {
  printf("config:\n");
  printf("  d_model       %lld\n", (long long)c->d_model);
  printf("  n_heads       %lld\n", (long long)c->n_heads);
  printf("  d_key         %lld\n", (long long)c->d_key);
  printf("  n_subkeys     %lld\n", (long long)c->n_subkeys);
  printf("  top_k         %lld\n", (long long)c->top_k);
  printf("  subkey_top_k  %lld\n", (long long)peer_config_subkey_top_k(c));
  printf("  shared_keys   %d\n", c->shared_keys);
  printf("  activation    %s\n", peer_activation_name(c->activation));
  printf("  gate          %s\n", peer_gate_name(c->gate));
  printf("  query_norm    %s\n", peer_query_norm_name(c->query_norm));
  printf("  query_bias    %d\n", c->query_bias);
  printf("  weight_dtype  %s\n", c->weight_dtype == PEER_BF16 ? "bf16" : "f32");
}

static int cmd_info(int argc, char **argv) {
  const char *pos[1] = {NULL};
  int n_pos, rc = parse_options(argc, argv, NULL, 0, pos, 1, &n_pos);
  if (rc == PARSE_HELP) return fputs(usage_info, stdout), 0;
  if (rc) return rc;
  if (n_pos != 1) return usage_error("expected one weight file (see 'peer info --help')");
  const char *path = pos[0];

  peer_safetensors *f = NULL;
  peer_layer *layer = NULL;
  peer_status st = peer_safetensors_open(&f, path);
  if (st) return lib_fail(st, "cannot open");
  peer_config cfg;
  if ((rc = config_from_metadata(f, &cfg))) goto done;
  /* The layer is only described, never touched: its large tables are mapped
   * lazily, so this costs no physical memory. */
  if ((rc = create_layer(&cfg, 0, &layer))) goto done;
  if ((rc = check_tensors(layer, f))) goto done;

  char b[32];
  printf("file: %s\n", path);
  print_config(&cfg);
  printf("experts N:               %lld (n_subkeys^2)\n", (long long)peer_config_n_experts(&cfg));
  printf("parameters:              %lld\n", (long long)peer_layer_n_parameters(layer));
  printf("active parameters/token: %lld\n", (long long)peer_layer_n_active_parameters(layer));
  printf("tensors:\n");
  double total = 0;
  for (int i = 0; i < peer_safetensors_count(f); i++) {
    peer_tensor t;
    if ((st = peer_safetensors_info(f, i, &t))) {
      rc = lib_fail(st, "cannot describe tensor");
      goto done;
    }
    char shape[96];
    printf("  %-24s %-4s %-18s %14zu bytes\n", t.name, peer_dtype_name(t.dtype),
           format_shape(&t, shape, sizeof shape), t.nbytes);
    total += (double)t.nbytes;
  }
  printf("  total: %.0f bytes (%s)\n", total, format_bytes(total, b, sizeof b));
  printf("forward cost per token:\n");
  print_cost(&cfg, "  ");
done:
  peer_layer_free(layer);
  peer_safetensors_close(f);
  return rc;
}

/* ----------------------------------------------------------------- forward */

static const char usage_forward[] =
    "usage: peer forward --weights W.safetensors --input X.safetensors\n"
    "                    --output Y.safetensors [--indices] [--threads N]\n"
    "\n"
    "Run the layer on tensor x [T, d_model] F32 of the input file and write\n"
    "y [T, d_model] F32; with --indices also indices [T, H, k] I64 and\n"
    "gates [T, H, k] F32 (each head's experts by descending score).\n"
    "\n"
    "example: peer forward --weights w.safetensors --input x.safetensors --output y.safetensors\n";

/* Read tensor `name` [T, d] F32 from path into a new buffer. */
static int read_rows(const char *path, const char *name, int64_t d, float **x_out,
                     int64_t *t_out) {
  peer_safetensors *f = NULL;
  peer_status st = peer_safetensors_open(&f, path);
  if (st) return lib_fail(st, "cannot open input");
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

static int cmd_forward(int argc, char **argv) {
  cli_opt opts[] = {{"weights", true, NULL},
                    {"input", true, NULL},
                    {"output", true, NULL},
                    {"indices", false, NULL},
                    {"threads", true, NULL}};
  int n_pos, rc = parse_options(argc, argv, opts, 5, NULL, 0, &n_pos);
  if (rc == PARSE_HELP) return fputs(usage_forward, stdout), 0;
  if (rc) return rc;
  const char *w_path = opts[0].value, *x_path = opts[1].value, *y_path = opts[2].value;
  bool want_indices = opts[3].value != NULL;
  int n_threads;
  if (!w_path) return usage_error("--weights is required");
  if (!x_path) return usage_error("--input is required");
  if (!y_path) return usage_error("--output is required");
  if ((rc = parse_threads(opts[4].value, &n_threads))) return rc;

  peer_layer *layer = NULL;
  float *x = NULL, *y = NULL, *gates = NULL;
  int64_t *indices = NULL;
  int64_t T = 0;
  if ((rc = load_layer(w_path, n_threads, &layer))) return rc;
  const peer_config *cfg = peer_layer_config(layer);
  const int64_t d = cfg->d_model, H = cfg->n_heads, k = cfg->top_k;
  if ((rc = read_rows(x_path, "x", d, &x, &T))) goto done;

  y = alloc_array((size_t)(T * d), sizeof *y);
  if (want_indices) {
    indices = alloc_array((size_t)(T * H * k), sizeof *indices);
    gates = alloc_array((size_t)(T * H * k), sizeof *gates);
  }
  if (!y || (want_indices && (!indices || !gates))) {
    rc = fail("cannot allocate outputs for %lld tokens", (long long)T);
    goto done;
  }
  double t0 = now_seconds();
  peer_status st = peer_forward(layer, T, x, y, indices, gates);
  double t1 = now_seconds();
  if (st) {
    rc = lib_fail(st, "forward failed");
    goto done;
  }
  peer_tensor out[3] = {
      {"y", PEER_F32, 2, {T, d, 0, 0}, y, (size_t)(T * d) * sizeof *y},
      {"indices", PEER_I64, 3, {T, H, k, 0}, indices, (size_t)(T * H * k) * sizeof *indices},
      {"gates", PEER_F32, 3, {T, H, k, 0}, gates, (size_t)(T * H * k) * sizeof *gates}};
  if ((st = peer_safetensors_write(y_path, out, want_indices ? 3 : 1, NULL, 0))) {
    rc = lib_fail(st, "cannot write output");
    goto done;
  }
  printf("wrote %s: y [%lld, %lld]%s; %lld tokens in %.3f ms, threads: %d\n", y_path, (long long)T,
         (long long)d, want_indices ? ", indices and gates" : "", (long long)T, 1e3 * (t1 - t0),
         threads_used(n_threads));
done:
  free(x);
  free(y);
  free(indices);
  free(gates);
  peer_layer_free(layer);
  return rc;
}

/* -------------------------------------------------------------------- grad */

/* Every parameter of the richest config, plus dx and y. */
enum { MAX_GRAD_OUT = 12 };

static const char usage_grad[] =
    "usage: peer grad --weights W.safetensors --input X.safetensors\n"
    "                 --dy DY.safetensors --output G.safetensors [--threads N]\n"
    "\n"
    "Forward and backward in training mode (batch norm on the batch's\n"
    "statistics) for x [T, d_model] (tensor 'x') and dy [T, d_model] (tensor\n"
    "'dy'); write dx [T, d_model] and the gradient of every parameter under its\n"
    "PEER.md name, dense (expert tables as [N, d_model] F32, zero where unused),\n"
    "plus y [T, d_model].\n"
    "\n"
    "example: peer grad --weights w.safetensors --input x.safetensors --dy dy.safetensors \\\n"
    "           --output g.safetensors\n";

static int cmd_grad(int argc, char **argv) {
  cli_opt opts[] = {{"weights", true, NULL},
                    {"input", true, NULL},
                    {"dy", true, NULL},
                    {"output", true, NULL},
                    {"threads", true, NULL}};
  int n_pos, rc = parse_options(argc, argv, opts, 5, NULL, 0, &n_pos);
  if (rc == PARSE_HELP) return fputs(usage_grad, stdout), 0;
  if (rc) return rc;
  const char *w_path = opts[0].value, *x_path = opts[1].value, *dy_path = opts[2].value;
  const char *g_path = opts[3].value;
  int n_threads;
  if (!w_path) return usage_error("--weights is required");
  if (!x_path) return usage_error("--input is required");
  if (!dy_path) return usage_error("--dy is required");
  if (!g_path) return usage_error("--output is required");
  if ((rc = parse_threads(opts[4].value, &n_threads))) return rc;

  peer_layer *layer = NULL;
  peer_context *ctx = NULL;
  float *x = NULL, *dy = NULL, *y = NULL, *dx = NULL;
  int64_t T = 0, T_dy = 0, *rows = NULL;
  peer_tensor out[MAX_GRAD_OUT];
  void *grad_data[MAX_GRAD_OUT] = {0};
  int n_out = 0;
  if ((rc = load_layer(w_path, n_threads, &layer))) return rc;
  const peer_config *cfg = peer_layer_config(layer);
  const int64_t d = cfg->d_model, hk = cfg->n_heads * cfg->top_k;
  if ((rc = read_rows(x_path, "x", d, &x, &T))) goto done;
  if ((rc = read_rows(dy_path, "dy", d, &dy, &T_dy))) goto done;
  if (T_dy != T) {
    rc = fail("dy has %lld rows but x has %lld", (long long)T_dy, (long long)T);
    goto done;
  }
  peer_status st;
  if ((st = peer_context_create(&ctx, layer, T > 0 ? T : 1))) {
    rc = lib_fail(st, "cannot create a training context");
    goto done;
  }
  y = alloc_array((size_t)(T * d) + 1, sizeof *y);
  dx = alloc_array((size_t)(T * d) + 1, sizeof *dx);
  rows = alloc_array((size_t)(T * hk) + 1, sizeof *rows);
  peer_grads g = {0};
  /* One dense gradient per parameter, named as the parameter; f32 always. */
  for (int i = 0; i < peer_layer_n_params(layer); i++) {
    peer_tensor p;
    peer_layer_param(layer, i, &p);
    if (strstr(p.name, "running_")) continue; /* statistics, not parameters */
    size_t count = p.nbytes / peer_dtype_size(p.dtype);
    float *buf = alloc_array(count + 1, sizeof(float));
    if (!buf) {
      rc = fail("cannot allocate the gradient of %s (%zu floats)", p.name, count);
      goto done;
    }
    grad_data[n_out] = buf;
    out[n_out] = p;
    out[n_out].dtype = PEER_F32;
    out[n_out].data = buf;
    out[n_out].nbytes = count * sizeof(float);
    n_out++;
    if (!strcmp(p.name, "query.weight")) g.query_weight = buf;
    else if (!strcmp(p.name, "query.bias")) g.query_bias = buf;
    else if (!strcmp(p.name, "query.norm.weight")) g.norm_weight = buf;
    else if (!strcmp(p.name, "query.norm.bias")) g.norm_bias = buf;
    else if (!strcmp(p.name, "keys")) g.keys = buf;
    else if (!strcmp(p.name, "experts.down")) g.experts_down = buf;
    else if (!strcmp(p.name, "experts.up")) g.experts_up = buf;
  }
  if (!y || !dx || !rows) {
    rc = fail("cannot allocate outputs for %lld tokens", (long long)T);
    goto done;
  }
  g.experts_dense = 1;
  g.expert_rows = rows;
  g.expert_capacity = T * hk;
  double t0 = now_seconds();
  if ((st = peer_forward_train(layer, ctx, T, x, y))) {
    rc = lib_fail(st, "training forward failed");
    goto done;
  }
  if ((st = peer_backward(layer, ctx, dy, dx, &g))) {
    rc = lib_fail(st, "backward failed");
    goto done;
  }
  double t1 = now_seconds();
  out[n_out++] = (peer_tensor){"dx", PEER_F32, 2, {T, d, 0, 0}, dx, (size_t)(T * d) * sizeof *dx};
  out[n_out++] = (peer_tensor){"y", PEER_F32, 2, {T, d, 0, 0}, y, (size_t)(T * d) * sizeof *y};
  if ((st = peer_safetensors_write(g_path, out, n_out, NULL, 0))) {
    rc = lib_fail(st, "cannot write gradients");
    goto done;
  }
  printf("wrote %s: dx and %d parameter gradients; %lld tokens, %lld expert rows touched, "
         "forward+backward %.3f ms, threads: %d\n",
         g_path, n_out - 2, (long long)T, (long long)g.n_expert_rows, 1e3 * (t1 - t0),
         threads_used(n_threads));
done:
  for (int i = 0; i < MAX_GRAD_OUT; i++) free(grad_data[i]);
  free(x), free(dy), free(y), free(dx), free(rows);
  peer_context_free(ctx);
  peer_layer_free(layer);
  return rc;
}

/* ------------------------------------------------- product key vs brute force */

/* Agreement of two retrievals over T tokens of one layer. */
typedef struct agreement {
  int64_t lists;     /* (token, head) lists compared */
  int64_t identical; /* lists with the same ids in the same order */
  double max_score_diff;
} agreement;

static agreement compare_retrievals(int64_t lists, int64_t k, const int64_t *ia, const float *sa,
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

/* Buffers for retrieval of T tokens: ids and scores [T, H, k]. */
typedef struct retrieval_buf {
  int64_t *ids;
  float *scores;
} retrieval_buf;

static bool retrieval_alloc(retrieval_buf *r, int64_t entries) {
  r->ids = alloc_array((size_t)entries, sizeof *r->ids);
  r->scores = alloc_array((size_t)entries, sizeof *r->scores);
  return r->ids && r->scores;
}

static void retrieval_free(retrieval_buf *r) {
  free(r->ids);
  free(r->scores);
}

static const char usage_check[] =
    "usage: peer check W.safetensors [--tokens T] [--seed S] [--threads N]\n"
    "\n"
    "Retrieve experts for T random Gaussian tokens (seeded) with product keys\n"
    "and with brute force over all N experts, and compare: the fraction of\n"
    "(token, head) lists with identical ids, the largest score difference and\n"
    "both times.  Exits 1 unless every list is identical.\n"
    "\n"
    "  --tokens T   tokens to check (default 64)\n"
    "  --seed S     seed of the random tokens (default 1)\n"
    "  --threads N  CPU threads (default: OpenMP's choice)\n";

static int cmd_check(int argc, char **argv) {
  cli_opt opts[] = {{"tokens", true, NULL}, {"seed", true, NULL}, {"threads", true, NULL}};
  const char *pos[1] = {NULL};
  int n_pos, rc = parse_options(argc, argv, opts, 3, pos, 1, &n_pos);
  if (rc == PARSE_HELP) return fputs(usage_check, stdout), 0;
  if (rc) return rc;
  if (n_pos != 1) return usage_error("expected one weight file (see 'peer check --help')");
  int64_t T = 64;
  uint64_t seed = 1;
  int n_threads;
  if (opts[0].value && (rc = parse_int("tokens", opts[0].value, 1, 1 << 20, &T))) return rc;
  if (opts[1].value && (rc = parse_seed(opts[1].value, &seed))) return rc;
  if ((rc = parse_threads(opts[2].value, &n_threads))) return rc;

  peer_layer *layer = NULL;
  if ((rc = load_layer(pos[0], n_threads, &layer))) return rc;
  const peer_config *cfg = peer_layer_config(layer);
  const int64_t d = cfg->d_model, H = cfg->n_heads, k = cfg->top_k;
  float *x = alloc_array((size_t)(T * d), sizeof *x);
  retrieval_buf pk = {0}, bf = {0};
  if (!x || !retrieval_alloc(&pk, T * H * k) || !retrieval_alloc(&bf, T * H * k)) {
    rc = fail("cannot allocate buffers for %lld tokens", (long long)T);
    goto done;
  }
  fill_gaussian(x, (size_t)(T * d), seed);

  peer_status st;
  double times[3];
  for (int r = 0; r < 4; r++) { /* a warm-up, then three timed runs */
    double t0 = now_seconds();
    if ((st = peer_retrieve(layer, T, x, pk.ids, pk.scores, NULL))) {
      rc = lib_fail(st, "product-key retrieval failed");
      goto done;
    }
    if (r) times[r - 1] = now_seconds() - t0;
  }
  double t_pk = median(times, 3);
  double t0 = now_seconds();
  if ((st = peer_retrieve_brute(layer, T, x, bf.ids, bf.scores, NULL))) {
    rc = lib_fail(st, "brute-force retrieval failed");
    goto done;
  }
  double t_bf = now_seconds() - t0;

  agreement a = compare_retrievals(T * H, k, pk.ids, pk.scores, bf.ids, bf.scores);
  printf("check: %lld tokens x %lld heads, k = %lld, N = %lld experts, threads: %d, seed %llu\n",
         (long long)T, (long long)H, (long long)k, (long long)peer_config_n_experts(cfg),
         threads_used(n_threads), (unsigned long long)seed);
  printf("identical id lists:      %lld / %lld (%.2f%%)\n", (long long)a.identical,
         (long long)a.lists, 100.0 * (double)a.identical / (double)a.lists);
  printf("max |score difference|:  %.3g\n", a.max_score_diff);
  printf("product-key retrieval:   %.3f ms (%.2f us/token, median of 3)\n", 1e3 * t_pk,
         1e6 * t_pk / (double)T);
  printf("brute-force retrieval:   %.3f ms (%.2f us/token)\n", 1e3 * t_bf, 1e6 * t_bf / (double)T);
  printf("product-key speed-up:    %.1fx\n", t_bf / t_pk);
  if (a.identical != a.lists)
    rc = fail("%lld of %lld (token, head) lists differ from brute force",
              (long long)(a.lists - a.identical), (long long)a.lists);
done:
  free(x);
  retrieval_free(&pk);
  retrieval_free(&bf);
  peer_layer_free(layer);
  return rc;
}

/* -------------------------------------------------------------------- demo */

static const char usage_demo[] =
    "usage: peer demo [--n-subkeys n] [--tokens T] [--threads N] [--dtype f32|bf16]\n"
    "                 [--check-tokens C] [--repeats R] [--seed S]\n"
    "\n"
    "Build a layer in memory (default: d_model 512, 8 heads, d_key 256,\n"
    "n_subkeys 1024 = 1,048,576 experts, top_k 16), run a random batch through\n"
    "it and time the forward and the retrieval; then retrieve C tokens by brute\n"
    "force and check that product keys find the same experts (exit 1 if not).\n"
    "\n"
    "  --n-subkeys n     sub-keys per half, N = n^2 experts (default 1024)\n"
    "  --tokens T        batch size (default 512)\n"
    "  --dtype f32|bf16  storage of the expert tables (default f32)\n"
    "  --check-tokens C  tokens checked against brute force (default 32)\n"
    "  --repeats R       timed runs; the median is reported (default 10)\n"
    "  --seed S          seed of the weights and tokens (default 1)\n"
    "  --threads N       CPU threads (default: OpenMP's choice)\n";

/* Median seconds of `repeats` calls after one warm-up; -1 after a failure
 * (reported). */
typedef enum { RUN_FORWARD, RUN_RETRIEVE } run_kind;

static double time_runs(peer_layer *layer, run_kind kind, int64_t T, const float *x, float *y,
                        int64_t *ids, float *scores, int repeats) {
  double times[64];
  for (int r = 0; r <= repeats; r++) {
    double t0 = now_seconds();
    peer_status st = kind == RUN_FORWARD ? peer_forward(layer, T, x, y, NULL, NULL)
                                         : peer_retrieve(layer, T, x, ids, scores, NULL);
    double t = now_seconds() - t0;
    if (st) {
      lib_fail(st, kind == RUN_FORWARD ? "forward failed" : "retrieval failed");
      return -1.0;
    }
    if (r) times[r - 1] = t;
  }
  return median(times, repeats);
}

static int cmd_demo(int argc, char **argv) {
  cli_opt opts[] = {{"n-subkeys", true, NULL},    {"tokens", true, NULL},
                    {"threads", true, NULL},      {"dtype", true, NULL},
                    {"check-tokens", true, NULL}, {"repeats", true, NULL},
                    {"seed", true, NULL}};
  int n_pos, rc = parse_options(argc, argv, opts, 7, NULL, 0, &n_pos);
  if (rc == PARSE_HELP) return fputs(usage_demo, stdout), 0;
  if (rc) return rc;
  int64_t n = 1024, T = 512, C = 32, repeats = 10;
  uint64_t seed = 1;
  int n_threads;
  peer_config cfg;
  peer_config_default(&cfg);
  if (opts[0].value && (rc = parse_int("n-subkeys", opts[0].value, 1, 65536, &n))) return rc;
  if (opts[1].value && (rc = parse_int("tokens", opts[1].value, 1, 1 << 20, &T))) return rc;
  if ((rc = parse_threads(opts[2].value, &n_threads))) return rc;
  if (opts[3].value) {
    if (strcmp(opts[3].value, "f32") == 0)
      cfg.weight_dtype = PEER_F32;
    else if (strcmp(opts[3].value, "bf16") == 0)
      cfg.weight_dtype = PEER_BF16;
    else
      return usage_error("--dtype: '%s' is not f32 or bf16", opts[3].value);
  }
  if (opts[4].value && (rc = parse_int("check-tokens", opts[4].value, 1, 1 << 20, &C))) return rc;
  if (opts[5].value && (rc = parse_int("repeats", opts[5].value, 1, 64, &repeats))) return rc;
  if (opts[6].value && (rc = parse_seed(opts[6].value, &seed))) return rc;
  if (C > T)
    return usage_error("--check-tokens %lld exceeds --tokens %lld", (long long)C, (long long)T);
  cfg.n_subkeys = n;
  if (peer_config_validate(&cfg))
    return usage_error("--n-subkeys %lld: %s", (long long)n, peer_last_error());

  const int64_t d = cfg.d_model, H = cfg.n_heads, k = cfg.top_k;
  const int64_t N = peer_config_n_experts(&cfg);
  const int threads = threads_used(n_threads);
  char text[512], b1[32], b2[32];
  peer_config_format(&cfg, text, sizeof text);
  printf("== peer %s demo: PEER layer with %lld experts\n", peer_version_string(), (long long)N);
  printf("config: %s\n", text);

  peer_layer *layer = NULL;
  float *x = NULL, *y = NULL;
  retrieval_buf pk = {0}, pkc = {0}, bf = {0};
  double t0 = now_seconds();
  if ((rc = create_layer(&cfg, n_threads, &layer))) return rc;
  peer_status st = peer_layer_init(layer, seed);
  double t_init = now_seconds() - t0;
  if (st) {
    rc = lib_fail(st, "cannot initialise layer");
    goto done;
  }
  double table_bytes = 2.0 * (double)N * (double)d * (double)peer_dtype_size(cfg.weight_dtype);
  printf("parameters: %lld total, %lld active per token\n",
         (long long)peer_layer_n_parameters(layer),
         (long long)peer_layer_n_active_parameters(layer));
  printf("init: %.2f s (expert tables %s, threads: %d)\n", t_init,
         format_bytes(table_bytes, b1, sizeof b1), threads);

  x = alloc_array((size_t)(T * d), sizeof *x);
  y = alloc_array((size_t)(T * d), sizeof *y);
  if (!x || !y || !retrieval_alloc(&pk, T * H * k) || !retrieval_alloc(&pkc, C * H * k) ||
      !retrieval_alloc(&bf, C * H * k)) {
    rc = fail("cannot allocate buffers for %lld tokens", (long long)T);
    goto done;
  }
  fill_gaussian(x, (size_t)(T * d), seed ^ 0x5eedull);

  token_cost cost = cost_per_token(&cfg);
  printf("cost per token: %.2f M multiply-adds, %s of random expert-row reads\n",
         1e-6 * (double)cost.total, format_bytes((double)cost.expert_bytes, b1, sizeof b1));

  double t_fwd = time_runs(layer, RUN_FORWARD, T, x, y, NULL, NULL, (int)repeats);
  if (t_fwd < 0) {
    rc = EXIT_FAILURE;
    goto done;
  }
  printf("forward:   batch of %lld tokens: %.3f ms/batch, %.0f tokens/s "
         "(median of %lld, threads: %d; %.2f GB/s of expert rows over the whole forward)\n",
         (long long)T, 1e3 * t_fwd, (double)T / t_fwd, (long long)repeats, threads,
         1e-9 * (double)T * (double)cost.expert_bytes / t_fwd);

  double t_ret = time_runs(layer, RUN_RETRIEVE, T, x, NULL, pk.ids, pk.scores, (int)repeats);
  if (t_ret < 0) {
    rc = EXIT_FAILURE;
    goto done;
  }
  printf("retrieval: batch of %lld tokens: %.3f ms/batch, %.0f tokens/s (median of %lld)\n",
         (long long)T, 1e3 * t_ret, (double)T / t_ret, (long long)repeats);

  /* Brute force on the first C tokens, against product keys on the same ones. */
  double t_pkc = time_runs(layer, RUN_RETRIEVE, C, x, NULL, pkc.ids, pkc.scores, (int)repeats);
  if (t_pkc < 0) {
    rc = EXIT_FAILURE;
    goto done;
  }
  t0 = now_seconds();
  if ((st = peer_retrieve_brute(layer, C, x, bf.ids, bf.scores, NULL))) {
    rc = lib_fail(st, "brute-force retrieval failed");
    goto done;
  }
  double t_bf = now_seconds() - t0;
  printf("brute force: %lld tokens: %.3f ms/token (all %lld experts scored per head); "
         "product keys: %.3f ms/token; speed-up %.0fx\n",
         (long long)C, 1e3 * t_bf / (double)C, (long long)N, 1e3 * t_pkc / (double)C, t_bf / t_pkc);

  agreement a = compare_retrievals(C * H, k, pkc.ids, pkc.scores, bf.ids, bf.scores);
  /* The C-token retrieval must also agree with the same tokens in the batch. */
  int64_t batch_mismatch = 0;
  for (int64_t e = 0; e < C * H * k; e++)
    batch_mismatch += pk.ids[e] != pkc.ids[e];
  printf("agreement: %lld / %lld (token, head) id lists identical to brute force (%.2f%%), "
         "max |score difference| %.3g\n",
         (long long)a.identical, (long long)a.lists, 100.0 * (double)a.identical / (double)a.lists,
         a.max_score_diff);

  printf("summary: %lld experts (%s of expert tables), %lld of them used per token; "
         "%.0f tokens/s forward, %.0f tokens/s retrieval, threads: %d; product keys "
         "%.0fx faster than brute force and %s\n",
         (long long)N, format_bytes(table_bytes, b2, sizeof b2), (long long)(H * k),
         (double)T / t_fwd, (double)T / t_ret, threads, t_bf / t_pkc,
         a.identical == a.lists ? "exact on every checked token" : "NOT EXACT");
  if (a.identical != a.lists)
    rc = fail("%lld of %lld (token, head) lists differ from brute force",
              (long long)(a.lists - a.identical), (long long)a.lists);
  else if (batch_mismatch)
    rc = fail("retrieval of %lld tokens alone differs from the same tokens in a batch of %lld",
              (long long)C, (long long)T);
done:
  free(x);
  free(y);
  retrieval_free(&pk);
  retrieval_free(&pkc);
  retrieval_free(&bf);
  peer_layer_free(layer);
  return rc;
}

/* ----------------------------------------------------------------- convert */

static const char usage_convert[] =
    "usage: peer convert --from peer-pytorch IN.safetensors --out W.safetensors\n"
    "                    [--gate softmax|relu] [--top-k K] [--subkey-top-k K2]\n"
    "                    [--activation A]\n"
    "       peer convert --to peer-pytorch W.safetensors --out OUT.safetensors\n"
    "\n"
    "Convert between a peer weight file and the state dict of one PEER layer of\n"
    "lucidrains' PEER-pytorch (0.2.x) saved as safetensors: to_queries.0.weight\n"
    "[2*H*dk, d] F32, keys [H, n, 2, dk] F32, weight_down_embed.weight and\n"
    "weight_up_embed.weight [n*n, d] (F32 or BF16).  Query rows and key axes are\n"
    "reordered (docs/PEER.md, \"Related layouts\"); expert tables are copied as\n"
    "they are.  H, n, dk and d come from the shapes (d_key = 2*dk).\n"
    "\n"
    "A PEER-pytorch file does not record the settings that are not shapes:\n"
    "  --gate softmax|relu  softmax: non_competing_scores=False (default);\n"
    "                       relu: non_competing_scores=True, PEER-pytorch's own\n"
    "                       default, which keeps one expert per head\n"
    "  --top-k K            experts kept per head: num_experts_per_head with\n"
    "                       softmax (default 16); must be 1 with relu\n"
    "  --subkey-top-k K2    candidates per half: product_key_topk (default\n"
    "                       num_experts_per_head: K with softmax, 16 with relu)\n"
    "  --activation A       gelu (nn.GELU, default), gelu_tanh, relu, silu, identity\n"
    "\n"
    "--to peer-pytorch refuses layers PEER-pytorch cannot express (query bias,\n"
    "batch norm, shared keys, sigmoid gates, relu gates with top_k > 1) and\n"
    "prints the PEER(...) arguments that load the file.\n";

static const char *const pt_queries = "to_queries.0.weight", *const pt_keys = "keys",
                         *const pt_down = "weight_down_embed.weight",
                         *const pt_up = "weight_up_embed.weight";

/* Query rows: peer's row h*2dk + p*dk + j is PEER-pytorch's p*H*dk + h*dk + j
 * (half index outermost there); rows of width d. */
static void reorder_query_rows(const float *src, float *dst, int64_t H, int64_t dk, int64_t d,
                               bool to_pytorch) {
  for (int64_t h = 0; h < H; h++)
    for (int64_t p = 0; p < 2; p++)
      for (int64_t j = 0; j < dk; j++) {
        int64_t ours = h * 2 * dk + p * dk + j, theirs = p * H * dk + h * dk + j;
        int64_t from = to_pytorch ? ours : theirs, to = to_pytorch ? theirs : ours;
        memcpy(dst + to * d, src + from * d, (size_t)d * sizeof *dst);
      }
}

/* Keys: peer's [H, 2, n, dk] against PEER-pytorch's [H, n, 2, dk]. */
static void reorder_keys(const float *src, float *dst, int64_t H, int64_t n, int64_t dk,
                         bool to_pytorch) {
  for (int64_t h = 0; h < H; h++)
    for (int64_t p = 0; p < 2; p++)
      for (int64_t a = 0; a < n; a++) {
        int64_t ours = (h * 2 + p) * n + a, theirs = (h * n + a) * 2 + p;
        int64_t from = to_pytorch ? ours : theirs, to = to_pytorch ? theirs : ours;
        memcpy(dst + to * dk, src + from * dk, (size_t)dk * sizeof *dst);
      }
}

/* Find a PEER-pytorch tensor and check its rank and dtype. */
static int pt_tensor(const peer_safetensors *f, const char *name, int ndim, peer_tensor *t) {
  if (peer_safetensors_find(f, name, t)) return fail("input has no tensor '%s'", name);
  char shape[96];
  if (t->ndim != ndim)
    return fail("tensor '%s' has shape %s; PEER-pytorch's has %d dimensions", name,
                format_shape(t, shape, sizeof shape), ndim);
  bool embed = name == pt_down || name == pt_up;
  if (t->dtype != PEER_F32 && !(embed && t->dtype == PEER_BF16))
    return fail("tensor '%s' is %s; it must be F32%s", name, peer_dtype_name(t->dtype),
                embed ? " or BF16" : "");
  return 0;
}

/* Check the PEER-pytorch tensor set of f and derive the config from its
 * shapes and the options. */
static int pt_config(const peer_safetensors *f, peer_config *cfg) {
  static const char *const expected =
      "to_queries.0.weight, keys, weight_down_embed.weight, weight_up_embed.weight";
  if (peer_safetensors_metadata(f, "peer.format"))
    return fail("input is already a peer weight file (it has peer.format metadata)");
  for (int i = 0; i < peer_safetensors_count(f); i++) {
    peer_tensor t;
    peer_safetensors_info(f, i, &t);
    if (strcmp(t.name, pt_queries) && strcmp(t.name, pt_keys) && strcmp(t.name, pt_down) &&
        strcmp(t.name, pt_up))
      return fail("unknown tensor '%s'%s (a PEER-pytorch PEER layer has exactly %s)", t.name,
                  strcmp(t.name, "norm.gamma") ? "" : " from pre_rmsnorm=True, which peer lacks",
                  expected);
  }
  peer_tensor q, keys, down, up;
  int rc;
  if ((rc = pt_tensor(f, pt_queries, 2, &q)) || (rc = pt_tensor(f, pt_keys, 4, &keys)) ||
      (rc = pt_tensor(f, pt_down, 2, &down)) || (rc = pt_tensor(f, pt_up, 2, &up)))
    return rc;
  char s1[96], s2[96];
  const int64_t H = keys.shape[0], n = keys.shape[1], dk = keys.shape[3], d = q.shape[1];
  int64_t N;
  if (keys.shape[2] != 2)
    return fail("keys has shape %s; PEER-pytorch's is [heads, n, 2, dim_key]",
                format_shape(&keys, s1, sizeof s1));
  if (q.shape[0] != 2 * H * dk)
    return fail("%s has shape %s but keys %s needs [%lld, d] (2 * heads * dim_key rows)",
                pt_queries, format_shape(&q, s1, sizeof s1), format_shape(&keys, s2, sizeof s2),
                (long long)(2 * H * dk));
  if (__builtin_mul_overflow(n, n, &N)) return fail("keys: n = %lld is too large", (long long)n);
  for (int i = 0; i < 2; i++) {
    const peer_tensor *e = i ? &up : &down;
    int64_t HN;
    if (H > 1 && !__builtin_mul_overflow(H, N, &HN) && e->shape[0] == HN)
      return fail("%s has %lld = heads * n^2 rows: separate_embed_per_head=True is not supported",
                  e->name, (long long)e->shape[0]);
    if (e->shape[0] != N || e->shape[1] != d)
      return fail("%s has shape %s; keys and %s need [%lld, %lld] (n^2 experts of width d)",
                  e->name, format_shape(e, s1, sizeof s1), pt_queries, (long long)N, (long long)d);
  }
  if (down.dtype != up.dtype)
    return fail("the expert tables differ in dtype (%s and %s)", peer_dtype_name(down.dtype),
                peer_dtype_name(up.dtype));
  cfg->d_model = d;
  cfg->n_heads = H;
  cfg->d_key = 2 * dk;
  cfg->n_subkeys = n;
  cfg->shared_keys = 0;
  cfg->query_norm = PEER_NORM_NONE;
  cfg->query_bias = 0;
  cfg->weight_dtype = down.dtype;
  if (peer_config_validate(cfg)) return fail("resulting config: %s", peer_last_error());
  return 0;
}

/* Read PEER-pytorch tensor `name` (checked by pt_config) into a new buffer. */
static int pt_read(const peer_safetensors *f, const char *name, float **out) {
  peer_tensor t;
  peer_safetensors_find(f, name, &t);
  *out = alloc_array(t.nbytes, 1);
  if (!*out) return fail("cannot allocate %zu bytes for %s", t.nbytes, name);
  peer_status st = peer_safetensors_read(f, name, *out, t.nbytes);
  return st ? lib_fail(st, "cannot read input") : 0;
}

static int convert_from_pytorch(const char *in, const char *out, peer_config *cfg) {
  peer_safetensors *f = NULL;
  peer_layer *layer = NULL;
  float *q = NULL, *keys = NULL;
  peer_status st = peer_safetensors_open(&f, in);
  if (st) return lib_fail(st, "cannot open input");
  int rc = pt_config(f, cfg);
  if (rc || (rc = create_layer(cfg, 0, &layer))) goto done;
  if ((rc = pt_read(f, pt_queries, &q)) || (rc = pt_read(f, pt_keys, &keys))) goto done;
  peer_tensor pq, pk, pd, pu;
  peer_layer_param_by_name(layer, "query.weight", &pq);
  peer_layer_param_by_name(layer, "keys", &pk);
  peer_layer_param_by_name(layer, "experts.down", &pd);
  peer_layer_param_by_name(layer, "experts.up", &pu);
  reorder_query_rows(q, pq.data, cfg->n_heads, cfg->d_key / 2, cfg->d_model, false);
  reorder_keys(keys, pk.data, cfg->n_heads, cfg->n_subkeys, cfg->d_key / 2, false);
  if ((st = peer_safetensors_read(f, pt_down, pd.data, pd.nbytes)) ||
      (st = peer_safetensors_read(f, pt_up, pu.data, pu.nbytes))) {
    rc = lib_fail(st, "cannot read input");
    goto done;
  }
  if ((st = peer_layer_save(layer, out))) {
    rc = lib_fail(st, "cannot save");
    goto done;
  }
  char text[512];
  peer_config_format(cfg, text, sizeof text);
  printf("wrote %s from PEER-pytorch %s\nconfig: %s\n", out, in, text);
done:
  free(q), free(keys);
  peer_layer_free(layer);
  peer_safetensors_close(f);
  return rc;
}

/* The PEER(...) arguments of PEER-pytorch that compute c, or fail naming what
 * it cannot express. */
static int pt_arguments(const peer_config *c, char *buf, size_t size) {
  static const char *const acts[] = {"nn.ReLU", "nn.GELU", "partial(nn.GELU, approximate='tanh')",
                                     "nn.SiLU", "nn.Identity"};
  if (c->query_bias) return fail("query_bias=1: PEER-pytorch's query projection has no bias");
  if (c->query_norm != PEER_NORM_NONE)
    return fail("query_norm=%s: PEER-pytorch has no query batch norm",
                peer_query_norm_name(c->query_norm));
  if (c->shared_keys) return fail("shared_keys=1: PEER-pytorch has its own sub-keys per head");
  if (c->gate == PEER_GATE_SIGMOID) return fail("gate=sigmoid: PEER-pytorch has no sigmoid gates");
  if (c->gate == PEER_GATE_RELU && c->top_k != 1)
    return fail("gate=relu with top_k=%lld: PEER-pytorch's non-competing scores keep one expert "
                "per head (top_k=1)",
                (long long)c->top_k);
  int64_t kp = peer_config_subkey_top_k(c);
  int64_t per_head = c->gate == PEER_GATE_RELU ? kp : c->top_k;
  snprintf(buf, size,
           "PEER(dim=%lld, heads=%lld, num_experts=%lld, num_experts_per_head=%lld, dim_key=%lld, "
           "product_key_topk=%lld, non_competing_scores=%s, activation=%s)",
           (long long)c->d_model, (long long)c->n_heads, (long long)peer_config_n_experts(c),
           (long long)per_head, (long long)(c->d_key / 2), (long long)kp,
           c->gate == PEER_GATE_RELU ? "True" : "False", acts[c->activation]);
  return 0;
}

static int convert_to_pytorch(const char *in, const char *out) {
  peer_layer *layer = NULL;
  float *q = NULL, *keys = NULL;
  int rc = load_layer(in, 0, &layer);
  if (rc) return rc;
  const peer_config *c = peer_layer_config(layer);
  const int64_t H = c->n_heads, dk = c->d_key / 2, d = c->d_model, n = c->n_subkeys;
  char args[512];
  if ((rc = pt_arguments(c, args, sizeof args))) goto done;
  peer_tensor pq, pk, pd, pu;
  peer_layer_param_by_name(layer, "query.weight", &pq);
  peer_layer_param_by_name(layer, "keys", &pk);
  peer_layer_param_by_name(layer, "experts.down", &pd);
  peer_layer_param_by_name(layer, "experts.up", &pu);
  q = alloc_array(pq.nbytes, 1);
  keys = alloc_array(pk.nbytes, 1);
  if (!q || !keys) {
    rc = fail("cannot allocate %zu bytes for the reordered query and keys", pq.nbytes + pk.nbytes);
    goto done;
  }
  reorder_query_rows(pq.data, q, H, dk, d, true);
  reorder_keys(pk.data, keys, H, n, dk, true);
  /* The expert tables are written straight from the layer's memory. */
  peer_tensor t[4] = {
      {pt_queries, PEER_F32, 2, {2 * H * dk, d, 0, 0}, q, pq.nbytes},
      {pt_keys, PEER_F32, 4, {H, n, 2, dk}, keys, pk.nbytes},
      {pt_down, pd.dtype, 2, {pd.shape[0], d, 0, 0}, pd.data, pd.nbytes},
      {pt_up, pu.dtype, 2, {pu.shape[0], d, 0, 0}, pu.data, pu.nbytes}};
  static const char *const meta[] = {"format", "pt"};
  peer_status st = peer_safetensors_write(out, t, 4, meta, 1);
  if (st) {
    rc = lib_fail(st, "cannot write output");
    goto done;
  }
  printf("wrote %s (PEER-pytorch state dict)\nload it into: %s\n", out, args);
done:
  free(q), free(keys);
  peer_layer_free(layer);
  return rc;
}

static int cmd_convert(int argc, char **argv) {
  cli_opt opts[] = {{"from", true, NULL},         {"to", true, NULL},   {"out", true, NULL},
                    {"gate", true, NULL},         {"top-k", true, NULL},
                    {"subkey-top-k", true, NULL}, {"activation", true, NULL}};
  const char *pos[1] = {NULL};
  int n_pos, rc = parse_options(argc, argv, opts, 7, pos, 1, &n_pos);
  if (rc == PARSE_HELP) return fputs(usage_convert, stdout), 0;
  if (rc) return rc;
  const char *from = opts[0].value, *to = opts[1].value, *out = opts[2].value;
  const char *layout = from ? from : to;
  if (!from == !to) return usage_error("give one of --from peer-pytorch and --to peer-pytorch");
  if (strcmp(layout, "peer-pytorch") != 0)
    return usage_error("--%s: unknown layout '%s' (known: peer-pytorch)", from ? "from" : "to",
                       layout);
  if (n_pos != 1) return usage_error("expected one input file (see 'peer convert --help')");
  if (!out) return usage_error("--out is required");
  if (to) {
    for (int i = 3; i < 7; i++)
      if (opts[i].value)
        return usage_error("--%s applies to --from only (the weight file has the config)",
                           opts[i].name);
    return convert_to_pytorch(pos[0], out);
  }

  peer_config cfg;
  peer_config_default(&cfg);
  cfg.gate = PEER_GATE_SOFTMAX;
  if (opts[3].value) {
    if (!strcmp(opts[3].value, "relu"))
      cfg.gate = PEER_GATE_RELU;
    else if (strcmp(opts[3].value, "softmax"))
      return usage_error("--gate: '%s' is not softmax or relu", opts[3].value);
  }
  bool relu = cfg.gate == PEER_GATE_RELU;
  int64_t k = relu ? 1 : 16, kp = 16;
  if (opts[4].value && (rc = parse_int("top-k", opts[4].value, 1, 1 << 20, &k))) return rc;
  if (relu && k != 1)
    return usage_error("--top-k %lld: with --gate relu PEER-pytorch keeps one expert per head",
                       (long long)k);
  if (!relu) kp = k;
  if (opts[5].value && (rc = parse_int("subkey-top-k", opts[5].value, 1, 1 << 20, &kp)))
    return rc;
  cfg.top_k = k;
  cfg.subkey_top_k = kp == k ? 0 : kp;
  if (opts[6].value) {
    char item[96];
    snprintf(item, sizeof item, "activation=%.60s", opts[6].value);
    if (strchr(opts[6].value, ',') || peer_config_parse(&cfg, item))
      return usage_error("--activation: '%s' is not relu, gelu, gelu_tanh, silu or identity",
                         opts[6].value);
  }
  return convert_from_pytorch(pos[0], out, &cfg);
}

/* -------------------------------------------------------------------- main */

typedef struct command {
  const char *name;
  int (*run)(int argc, char **argv);
  const char *summary;
} command;

static const command commands[] = {
    {"init", cmd_init, "create a layer, initialise it from a seed, save it"},
    {"info", cmd_info, "show a weight file's config, parameters, tensors, cost per token"},
    {"forward", cmd_forward, "run a layer on x from a file, write y (and indices, gates)"},
    {"grad", cmd_grad, "training forward + backward on x and dy, write dx and every gradient"},
    {"check", cmd_check, "compare product-key retrieval with brute force"},
    {"demo", cmd_demo, "time a million-expert layer and check it against brute force"},
    {"convert", cmd_convert, "convert weights from or to lucidrains' PEER-pytorch layout"},
};
enum { N_COMMANDS = sizeof commands / sizeof commands[0] };

static void print_usage(void) {
  printf("peer %s: PEER layer (product-key retrieval over a million experts)\n\n",
         peer_version_string());
  printf("usage: peer COMMAND [options]    (peer COMMAND --help for its options)\n\n");
  printf("commands:\n");
  for (int i = 0; i < N_COMMANDS; i++)
    printf("  %-8s %s\n", commands[i].name, commands[i].summary);
  printf("\noptions:\n  -h, --help     this text\n  --version      the library version\n");
}

int main(int argc, char **argv) {
  if (argc < 2) {
    fprintf(stderr, "peer: missing command (try 'peer --help')\n");
    return EXIT_USAGE;
  }
  const char *name = argv[1];
  if (strcmp(name, "-h") == 0 || strcmp(name, "--help") == 0 || strcmp(name, "help") == 0) {
    print_usage();
    return 0;
  }
  if (strcmp(name, "--version") == 0 || strcmp(name, "version") == 0) {
    printf("peer %s\n", peer_version_string());
    return 0;
  }
  for (int i = 0; i < N_COMMANDS; i++) {
    if (strcmp(name, commands[i].name) == 0) {
      g_cmd = name;
      return commands[i].run(argc - 2, argv + 2);
    }
  }
  fprintf(stderr, "peer: %s: unknown command (try 'peer --help')\n", name);
  return EXIT_USAGE;
}
