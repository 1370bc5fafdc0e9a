/* peer_ablate.c: `peer-ablate`, ablations of the PEER layer over expert counts
 * (and top-k, heads, query norm), with baselines at equal active compute: a
 * dense feed-forward block with H*k hidden units and a PKM-style layer (PEER
 * with identity experts).  Each setting trains the small model of
 * ablate_model.h on the same data, seed and token budget, then reports
 * validation loss and perplexity, expert usage and unevenness (PEER.md
 * "Metrics"), tokens/s, parameters and wall time as a table, CSV, JSON and a
 * gnuplot SVG.  A sweep is resumable: each setting lives in a directory named
 * by a hash of everything its result depends on, holds its last checkpoint
 * while it runs and its result when done.  Errors are one line on stderr,
 * "peer-ablate: <problem>"; exit status 2 for usage errors, 1 for failures,
 * 3 when stopped by --stop-after and 130 on SIGINT/SIGTERM (both after saving
 * a checkpoint). */
#include "ablate_model.h"
#include "ablate_source.h"
#include "cli_util.h"
#include "peer.h"

#include <errno.h>
#include <jansson.h>
#include <math.h>
#include <signal.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

enum { EXIT_STOPPED = 3, EXIT_SIGNAL = 130, MAX_LIST = 32 };

static volatile sig_atomic_t g_signal = 0;
static void on_signal(int sig) { g_signal = sig; }

/* ----------------------------------------------------------------- options */

typedef struct options {
  const char *out, *data;
  int64_t experts[MAX_LIST]; /* n_subkeys */
  int n_experts;
  int64_t heads[MAX_LIST], topk[MAX_LIST];
  int n_heads, n_topk;
  int64_t hold_hk;
  peer_query_norm qnorm[2];
  int n_qnorm;
  ablate_kind models[3];
  int n_models;
  int64_t d_model, d_key, context, batch, tokens, val_tokens, corpus;
  int64_t alphabet, order, branch;
  double val_fraction;
  float lr, expert_lr;
  peer_activation activation;
  int prenorm, threads, plot, keep_checkpoints;
  uint64_t seed;
  int64_t checkpoint_every, stop_after;
} options;

static const char *const kind_names[] = {"peer", "pkm", "dense"};

static const char usage_text[] =
    "usage: peer-ablate [options]\n"
    "Train a small byte-level model whose only learned non-linearity is a PEER layer,\n"
    "once per setting of a sweep, and report validation loss, perplexity, expert usage,\n"
    "unevenness, tokens/s and parameters (table, CSV, JSON, gnuplot SVG).\n"
    "Sweeps (comma lists; every combination runs):\n"
    "  --experts LIST      expert counts: 1024^2, 1048576 or n=1024 (default "
    "32^2,64^2,128^2,256^2)\n"
    "  --heads LIST        retrieval heads H (default 4)\n"
    "  --top-k LIST        experts per head k (default 8)\n"
    "  --hold-hk N         hold H*k = N fixed: k = N/H for each H (instead of --top-k)\n"
    "  --query-norm LIST   none,batchnorm (default none)\n"
    "  --models LIST       peer, pkm (PEER with identity experts), dense (H*k hidden units)\n"
    "                      (default peer,dense)\n"
    "Model and training (the same for every setting):\n"
    "  --d-model N (64)  --d-key N (32)  --context C (4)  --activation NAME (gelu)\n"
    "  --prenorm on|off (on)  --batch N (256)  --tokens N (training budget, 384000)\n"
    "  --lr X (0.003)  --expert-lr X (0.03)  --seed N (1)  --threads N (2)\n"
    "Data: the default is a synthetic order-3 Markov source with a known entropy rate\n"
    "  --alphabet A (16)  --order C (3)  --branch K (4)  --corpus N (training symbols, 1000000)\n"
    "  --data FILE         any file, as bytes; the last --val-fraction (0.1) is held out\n"
    "  --val-tokens N      validation positions at most (32768)\n"
    "Output and resuming:\n"
    "  --out DIR           (default out/ablate): results.csv, results.json, ablate.svg, runs/\n"
    "  --checkpoint-every N  steps between checkpoints (default: every 30 s of training)\n"
    "  --keep-checkpoints  keep each finished setting's last checkpoint\n"
    "  --no-plot           skip gnuplot\n"
    "  --stop-after N      stop (checkpoint saved, exit 3) after N steps of this run: for tests\n";

/* Split a comma list into items (at most MAX_LIST), calling each(). */
typedef int (*item_fn)(const char *name, const char *item, void *ctx, int i);
static int parse_list(const char *name, const char *list, item_fn each, void *ctx, int *count) {
  char buf[1024];
  if (strlen(list) >= sizeof buf) return usage_error("--%s: list too long", name);
  strcpy(buf, list);
  *count = 0;
  for (char *save = NULL, *tok = strtok_r(buf, ",", &save); tok; tok = strtok_r(NULL, ",", &save)) {
    if (*count >= MAX_LIST) return usage_error("--%s: more than %d items", name, MAX_LIST);
    int rc = each(name, tok, ctx, *count);
    if (rc) return rc;
    (*count)++;
  }
  if (*count == 0) return usage_error("--%s: empty list", name);
  return 0;
}

/* "1024^2", "n=1024" or "1048576" (a perfect square) -> n_subkeys. */
static int expert_item(const char *name, const char *item, void *ctx, int i) {
  int64_t *out = ctx, v;
  const char *hat = strstr(item, "^2");
  if (strncmp(item, "n=", 2) == 0) return parse_int(name, item + 2, 1, 1 << 20, &out[i]);
  if (hat && hat[2] == '\0') {
    char base[64];
    snprintf(base, sizeof base, "%.*s", (int)(hat - item), item);
    return parse_int(name, base, 1, 1 << 20, &out[i]);
  }
  int rc = parse_int(name, item, 1, (int64_t)1 << 40, &v);
  if (rc) return rc;
  int64_t n = (int64_t)llround(sqrt((double)v));
  while (n * n > v)
    n--;
  while ((n + 1) * (n + 1) <= v)
    n++;
  if (n * n != v)
    return usage_error("--%s: %lld is not a square (N = n^2 experts; write n=%lld or %lld^2)", name,
                       (long long)v, (long long)n, (long long)n);
  out[i] = n;
  return 0;
}

static int int_item(const char *name, const char *item, void *ctx, int i) {
  return parse_int(name, item, 1, 4096, &((int64_t *)ctx)[i]);
}

static int qnorm_item(const char *name, const char *item, void *ctx, int i) {
  peer_query_norm *out = ctx;
  if (i >= 2) return usage_error("--%s: at most two items", name);
  if (strcmp(item, "none") == 0)
    out[i] = PEER_NORM_NONE;
  else if (strcmp(item, "batchnorm") == 0)
    out[i] = PEER_NORM_BATCHNORM;
  else
    return usage_error("--%s: '%s' is not none or batchnorm", name, item);
  return 0;
}

static int model_item(const char *name, const char *item, void *ctx, int i) {
  ablate_kind *out = ctx;
  if (i >= 3) return usage_error("--%s: at most three items", name);
  for (int k = 0; k < 3; k++)
    if (strcmp(item, kind_names[k]) == 0) {
      out[i] = (ablate_kind)k;
      return 0;
    }
  return usage_error("--%s: '%s' is not peer, pkm or dense", name, item);
}

static void options_default(options *o) {
  memset(o, 0, sizeof *o);
  o->out = "out/ablate";
  const int64_t ns[] = {32, 64, 128, 256};
  memcpy(o->experts, ns, sizeof ns), o->n_experts = 4;
  o->heads[0] = 4, o->n_heads = 1;
  o->topk[0] = 8, o->n_topk = 1;
  o->qnorm[0] = PEER_NORM_NONE, o->n_qnorm = 1;
  o->models[0] = ABLATE_PEER, o->models[1] = ABLATE_DENSE, o->n_models = 2;
  o->d_model = 64, o->d_key = 32, o->context = 4, o->batch = 256, o->tokens = 384000;
  o->val_tokens = 32768, o->corpus = 1000000;
  o->alphabet = 16, o->order = 3, o->branch = 4;
  o->val_fraction = 0.1;
  o->lr = 3e-3f, o->expert_lr = 3e-2f;
  o->activation = PEER_ACT_GELU;
  o->prenorm = 1, o->threads = 2, o->plot = 1, o->seed = 1;
}

/* Parse argv into o.  Returns 0, -1 for --help, or an exit status. */
static int parse_args(int argc, char **argv, options *o) {
  options_default(o);
  bool topk_given = false;
  for (int i = 1; i < argc; i++) {
    const char *arg = argv[i], *val = NULL;
    if (strcmp(arg, "-h") == 0 || strcmp(arg, "--help") == 0) return -1;
    if (strncmp(arg, "--", 2) != 0) return usage_error("unexpected argument '%s'", arg);
    const char *name = arg + 2;
    char key[64];
    const char *eq = strchr(name, '=');
    snprintf(key, sizeof key, "%.*s", eq ? (int)(eq - name) : (int)strlen(name), name);
    bool flag = !strcmp(key, "no-plot") || !strcmp(key, "keep-checkpoints");
    if (flag) {
      if (eq) return usage_error("option '--%s' takes no value", key);
      if (!strcmp(key, "no-plot"))
        o->plot = 0;
      else
        o->keep_checkpoints = 1;
      continue;
    }
    static const char *const with_value[] = {
        "out",          "data",       "experts",   "heads",    "top-k",   "hold-hk",
        "query-norm",   "models",     "d-model",   "d-key",    "context", "batch",
        "tokens",       "val-tokens", "corpus",    "alphabet", "order",   "branch",
        "val-fraction", "lr",         "expert-lr", "seed",     "threads", "checkpoint-every",
        "stop-after",   "prenorm",    "activation"};
    bool known = false;
    for (size_t k = 0; k < sizeof with_value / sizeof *with_value; k++)
      known |= strcmp(key, with_value[k]) == 0;
    if (!known) return usage_error("unknown option '--%s'", key);
    if (eq)
      val = eq + 1;
    else if (i + 1 < argc)
      val = argv[++i];
    else
      return usage_error("option '--%s' needs a value", key);
    int rc = 0;
    int64_t v = 0;
    double f = 0;
    if (!strcmp(key, "out"))
      o->out = val;
    else if (!strcmp(key, "data"))
      o->data = val;
    else if (!strcmp(key, "experts"))
      rc = parse_list(key, val, expert_item, o->experts, &o->n_experts);
    else if (!strcmp(key, "heads"))
      rc = parse_list(key, val, int_item, o->heads, &o->n_heads);
    else if (!strcmp(key, "top-k"))
      rc = parse_list(key, val, int_item, o->topk, &o->n_topk), topk_given = true;
    else if (!strcmp(key, "hold-hk"))
      rc = parse_int(key, val, 1, 1 << 16, &o->hold_hk);
    else if (!strcmp(key, "query-norm"))
      rc = parse_list(key, val, qnorm_item, o->qnorm, &o->n_qnorm);
    else if (!strcmp(key, "models"))
      rc = parse_list(key, val, model_item, o->models, &o->n_models);
    else if (!strcmp(key, "d-model"))
      rc = parse_int(key, val, 2, 4096, &o->d_model);
    else if (!strcmp(key, "d-key"))
      rc = parse_int(key, val, 2, 4096, &o->d_key);
    else if (!strcmp(key, "context"))
      rc = parse_int(key, val, 1, 64, &o->context);
    else if (!strcmp(key, "batch"))
      rc = parse_int(key, val, 2, 1 << 16, &o->batch);
    else if (!strcmp(key, "tokens"))
      rc = parse_int(key, val, 1, (int64_t)1 << 40, &o->tokens);
    else if (!strcmp(key, "val-tokens"))
      rc = parse_int(key, val, 1, (int64_t)1 << 32, &o->val_tokens);
    else if (!strcmp(key, "corpus"))
      rc = parse_int(key, val, 16, (int64_t)1 << 32, &o->corpus);
    else if (!strcmp(key, "alphabet"))
      rc = parse_int(key, val, 2, 256, &o->alphabet);
    else if (!strcmp(key, "order"))
      rc = parse_int(key, val, 1, 8, &o->order);
    else if (!strcmp(key, "branch"))
      rc = parse_int(key, val, 1, 256, &o->branch);
    else if (!strcmp(key, "val-fraction"))
      rc = parse_float(key, val, 0.001, 0.9, &o->val_fraction);
    else if (!strcmp(key, "lr"))
      rc = parse_float(key, val, 0, 10, &f), o->lr = (float)f;
    else if (!strcmp(key, "expert-lr"))
      rc = parse_float(key, val, 0, 10, &f), o->expert_lr = (float)f;
    else if (!strcmp(key, "seed"))
      rc = parse_seed(key, val, &o->seed);
    else if (!strcmp(key, "threads"))
      rc = parse_int(key, val, 1, 4096, &v), o->threads = (int)v;
    else if (!strcmp(key, "checkpoint-every"))
      rc = parse_int(key, val, 1, INT64_MAX, &o->checkpoint_every);
    else if (!strcmp(key, "stop-after"))
      rc = parse_int(key, val, 1, INT64_MAX, &o->stop_after);
    else if (!strcmp(key, "prenorm")) {
      if (!strcmp(val, "on"))
        o->prenorm = 1;
      else if (!strcmp(val, "off"))
        o->prenorm = 0;
      else
        rc = usage_error("--prenorm: '%s' is not on or off", val);
    } else if (!strcmp(key, "activation")) {
      peer_config c;
      peer_config_default(&c);
      char text[96];
      snprintf(text, sizeof text, "activation=%s", val);
      if (peer_config_parse(&c, text))
        rc = usage_error("--activation: '%s' is not an activation", val);
      o->activation = c.activation;
    } else {
      rc = usage_error("unknown option '--%s'", key);
    }
    if (rc) return rc;
  }
  if (o->hold_hk) {
    if (topk_given) return usage_error("--hold-hk and --top-k exclude each other");
    for (int i = 0; i < o->n_heads; i++)
      if (o->hold_hk % o->heads[i])
        return usage_error("--hold-hk %lld: not a multiple of H = %lld", (long long)o->hold_hk,
                           (long long)o->heads[i]);
  }
  if (o->d_model % o->context)
    return usage_error("--d-model %lld must be a multiple of --context %lld", (long long)o->d_model,
                       (long long)o->context);
  if (!o->data && o->branch > o->alphabet)
    return usage_error("--branch %lld exceeds --alphabet %lld", (long long)o->branch,
                       (long long)o->alphabet);
  if (o->tokens < o->batch) return usage_error("--tokens must be at least --batch");
  return 0;
}

/* ------------------------------------------------------------------- data */

typedef struct corpus {
  uint8_t *train, *val;
  int64_t n_train, n_val;
  double entropy_rate; /* nats/token; NAN when unknown (a file) */
  uint64_t hash;
  char desc[512];
} corpus;

static uint64_t fnv1a(uint64_t h, const void *data, size_t n) {
  const uint8_t *p = data;
  for (size_t i = 0; i < n; i++)
    h = (h ^ p[i]) * 0x100000001b3ull;
  return h;
}

static int load_corpus(const options *o, corpus *cp) {
  memset(cp, 0, sizeof *cp);
  if (o->data) {
    FILE *f = fopen(o->data, "rb");
    if (!f) return fail("cannot open --data %s: %s", o->data, strerror(errno));
    fseek(f, 0, SEEK_END);
    long size = ftell(f);
    fseek(f, 0, SEEK_SET);
    int64_t n_val = (int64_t)((double)size * o->val_fraction);
    if (size < 0 || size - n_val < 4 * o->context || n_val <= o->context) {
      fclose(f);
      return fail("--data %s: %ld bytes is too short for a training and a held-out split", o->data,
                  size);
    }
    uint8_t *all = malloc((size_t)size);
    if (!all || fread(all, 1, (size_t)size, f) != (size_t)size) {
      free(all), fclose(f);
      return fail("cannot read --data %s", o->data);
    }
    fclose(f);
    cp->n_train = size - n_val;
    cp->train = all;
    cp->val = all + cp->n_train;
    cp->n_val = n_val < o->val_tokens + o->context ? n_val : o->val_tokens + o->context;
    cp->entropy_rate = NAN;
    snprintf(cp->desc, sizeof cp->desc, "file %s: %lld training bytes, %lld held out (%lld used)",
             o->data, (long long)cp->n_train, (long long)n_val, (long long)cp->n_val);
  } else {
    ablate_source src;
    if (ablate_source_init(&src, (int)o->alphabet, (int)o->order, (int)o->branch, o->seed))
      return fail("synthetic source: alphabet %lld, order %lld, branch %lld is out of range",
                  (long long)o->alphabet, (long long)o->order, (long long)o->branch);
    cp->n_train = o->corpus;
    cp->n_val = o->val_tokens + o->context;
    cp->train = malloc((size_t)(cp->n_train + cp->n_val));
    if (!cp->train) {
      ablate_source_free(&src);
      return fail("out of memory for the corpus");
    }
    cp->val = cp->train + cp->n_train;
    ablate_source_generate(&src, o->seed * 2 + 1, cp->n_train, cp->train);
    ablate_source_generate(&src, o->seed * 2 + 2, cp->n_val, cp->val);
    /* Letters for small alphabets, so the corpus reads as text. */
    if (src.alphabet <= 26)
      for (int64_t i = 0; i < cp->n_train + cp->n_val; i++)
        cp->train[i] += 'a';
    cp->entropy_rate = ablate_source_entropy_rate(&src);
    snprintf(cp->desc, sizeof cp->desc,
             "synthetic Markov source: alphabet %d, order %d, branch %d, seed %llu, "
             "%lld training symbols, %lld held out; entropy rate %.4f nats",
             src.alphabet, src.order, src.branch, (unsigned long long)o->seed,
             (long long)cp->n_train, (long long)cp->n_val, cp->entropy_rate);
    ablate_source_free(&src);
  }
  uint64_t h = 0xcbf29ce484222325ull;
  h = fnv1a(h, &cp->n_train, sizeof cp->n_train);
  h = fnv1a(h, cp->train, (size_t)cp->n_train);
  h = fnv1a(h, &cp->n_val, sizeof cp->n_val);
  cp->hash = fnv1a(h, cp->val, (size_t)cp->n_val);
  return 0;
}

/* --------------------------------------------------------------- settings */

typedef struct result {
  double val_loss, ppl, usage, unevenness, tokens_per_s, wall_s, train_s;
  int64_t params, active;
} result;

typedef struct setting {
  ablate_spec spec;
  char label[128]; /* for people: "peer N=4096 H=4 k=8 none" */
  char id[160];    /* directory name: label words and the hash */
  char key[1024];  /* everything the result depends on */
  uint64_t hash;
  result res;
} setting;

static int make_setting(const options *o, const corpus *cp, ablate_kind kind, int64_t n, int64_t H,
                        int64_t k, peer_query_norm qn, setting *s) {
  memset(s, 0, sizeof *s);
  ablate_spec *sp = &s->spec;
  sp->kind = kind;
  peer_config_default(&sp->layer);
  sp->layer.d_model = o->d_model, sp->layer.n_heads = H, sp->layer.top_k = k;
  sp->layer.d_key = o->d_key, sp->layer.n_subkeys = n, sp->layer.query_norm = qn;
  sp->layer.activation = kind == ABLATE_PKM ? PEER_ACT_IDENTITY : o->activation;
  if (kind == ABLATE_DENSE) {
    /* No retrieval: only d_model, H*k and the activation matter. */
    sp->layer.n_heads = 1, sp->layer.top_k = H * k, sp->layer.n_subkeys = H * k;
    sp->layer.query_norm = PEER_NORM_NONE;
  } else if (peer_config_validate(&sp->layer)) {
    return usage_error("setting %s n=%lld H=%lld k=%lld: %s", kind_names[kind], (long long)n,
                       (long long)H, (long long)k, peer_last_error());
  }
  sp->context = (int)o->context, sp->prenorm = o->prenorm, sp->batch = (int)o->batch;
  sp->steps = o->tokens / o->batch;
  sp->lr = o->lr, sp->expert_lr = o->expert_lr, sp->seed = o->seed, sp->threads = o->threads;
  char layer[512];
  if (kind == ABLATE_DENSE) {
    snprintf(s->label, sizeof s->label, "dense hidden=%lld", (long long)(H * k));
    snprintf(layer, sizeof layer, "d_model=%lld,hidden=%lld,activation=%s", (long long)o->d_model,
             (long long)(H * k), peer_activation_name(o->activation));
  } else {
    snprintf(s->label, sizeof s->label, "%s N=%lld H=%lld k=%lld %s", kind_names[kind],
             (long long)(n * n), (long long)H, (long long)k, peer_query_norm_name(qn));
    peer_config_format(&sp->layer, layer, sizeof layer);
  }
  snprintf(s->key, sizeof s->key,
           "peer-ablate/1 model=%s layer={%s} context=%d prenorm=%d batch=%d steps=%lld "
           "tokens=%lld lr=%.9g expert_lr=%.9g seed=%llu data=%016llx val=%lld",
           kind_names[kind], layer, sp->context, sp->prenorm, sp->batch, (long long)sp->steps,
           (long long)o->tokens, (double)sp->lr, (double)sp->expert_lr,
           (unsigned long long)sp->seed, (unsigned long long)cp->hash, (long long)cp->n_val);
  s->hash = fnv1a(0xcbf29ce484222325ull, s->key, strlen(s->key));
  if (kind == ABLATE_DENSE)
    snprintf(s->id, sizeof s->id, "dense-h%lld-%016llx", (long long)(H * k),
             (unsigned long long)s->hash);
  else
    snprintf(s->id, sizeof s->id, "%s-N%lld-H%lld-k%lld-%s-%016llx", kind_names[kind],
             (long long)(n * n), (long long)H, (long long)k, peer_query_norm_name(qn),
             (unsigned long long)s->hash);
  return 0;
}

/* Every combination the options ask for, dense once per distinct H*k. */
static int make_settings(const options *o, const corpus *cp, setting **out, int *count) {
  int64_t hs[MAX_LIST * MAX_LIST], ks[MAX_LIST * MAX_LIST];
  int n_pairs = 0;
  for (int i = 0; i < o->n_heads; i++) {
    if (o->hold_hk) {
      hs[n_pairs] = o->heads[i], ks[n_pairs++] = o->hold_hk / o->heads[i];
      continue;
    }
    for (int j = 0; j < o->n_topk; j++)
      hs[n_pairs] = o->heads[i], ks[n_pairs++] = o->topk[j];
  }
  int max = o->n_models * o->n_qnorm * n_pairs * o->n_experts;
  setting *s = calloc((size_t)max, sizeof *s);
  if (!s) return fail("out of memory");
  int n = 0;
  for (int mi = 0; mi < o->n_models; mi++) {
    ablate_kind kind = o->models[mi];
    if (kind == ABLATE_DENSE) {
      for (int p = 0; p < n_pairs; p++) {
        bool seen = false;
        for (int q = 0; q < p; q++)
          seen |= hs[q] * ks[q] == hs[p] * ks[p];
        if (seen) continue;
        int rc = make_setting(o, cp, kind, 0, hs[p], ks[p], PEER_NORM_NONE, &s[n++]);
        if (rc) return free(s), rc;
      }
      continue;
    }
    for (int qi = 0; qi < o->n_qnorm; qi++)
      for (int p = 0; p < n_pairs; p++)
        for (int e = 0; e < o->n_experts; e++) {
          int rc = make_setting(o, cp, kind, o->experts[e], hs[p], ks[p], o->qnorm[qi], &s[n++]);
          if (rc) return free(s), rc;
        }
  }
  *out = s, *count = n;
  return 0;
}

/* --------------------------------------------------------------- progress */

typedef struct progress {
  bool tty;
  int last_decile;
  double last_draw;
} progress;

static void progress_show(progress *p, const setting *s, int index, int total, int64_t step,
                          int64_t steps, double loss, double tok_s) {
  double frac = (double)step / (double)steps;
  if (p->tty) {
    double t = now_seconds();
    if (step < steps && t - p->last_draw < 0.1) return;
    p->last_draw = t;
    char bar[31];
    int fill = (int)(frac * 30.0);
    for (int i = 0; i < 30; i++)
      bar[i] = i < fill ? '#' : '.';
    bar[30] = '\0';
    fprintf(stderr, "\r[%d/%d] %-32.32s [%s] %3.0f%% loss %.3f %6.0f tok/s ", index + 1, total,
            s->label, bar, 100.0 * frac, loss, tok_s);
    if (step == steps) fputc('\n', stderr);
    fflush(stderr);
    return;
  }
  int decile = (int)(frac * 10.0);
  if (decile == p->last_decile) return;
  p->last_decile = decile;
  fprintf(stderr, "[%d/%d] %s: step %lld/%lld (%d%%), train loss %.4f, %.0f tok/s\n", index + 1,
          total, s->label, (long long)step, (long long)steps, decile * 10, loss, tok_s);
}

/* ----------------------------------------------------------------- results */

static json_t *num_or_null(double v) { return isfinite(v) ? json_real(v) : json_null(); }

static json_t *result_json(const setting *s, const corpus *cp) {
  const ablate_spec *sp = &s->spec;
  bool dense = sp->kind == ABLATE_DENSE;
  int64_t n = sp->layer.n_subkeys, hk = sp->layer.n_heads * sp->layer.top_k;
  json_t *j = json_object();
  json_object_set_new(j, "model", json_string(kind_names[sp->kind]));
  json_object_set_new(j, "label", json_string(s->label));
  json_object_set_new(j, "id", json_string(s->id));
  json_object_set_new(j, "hash", json_string(s->id + strlen(s->id) - 16));
  json_object_set_new(j, "setting", json_string(s->key));
  json_object_set_new(j, "n_experts", dense ? json_null() : json_integer(n * n));
  json_object_set_new(j, "n_subkeys", dense ? json_null() : json_integer(n));
  json_object_set_new(j, "heads", dense ? json_null() : json_integer(sp->layer.n_heads));
  json_object_set_new(j, "top_k", dense ? json_null() : json_integer(sp->layer.top_k));
  json_object_set_new(j, "hk", json_integer(hk));
  json_object_set_new(j, "query_norm",
                      dense ? json_null()
                            : json_string(peer_query_norm_name(sp->layer.query_norm)));
  json_object_set_new(j, "val_loss", num_or_null(s->res.val_loss));
  json_object_set_new(j, "val_ppl", num_or_null(s->res.ppl));
  json_object_set_new(j, "entropy_rate", num_or_null(cp->entropy_rate));
  json_object_set_new(j, "gap", num_or_null(s->res.val_loss - cp->entropy_rate));
  json_object_set_new(j, "usage", num_or_null(s->res.usage));
  json_object_set_new(j, "unevenness", num_or_null(s->res.unevenness));
  json_object_set_new(j, "tokens_per_s", num_or_null(s->res.tokens_per_s));
  json_object_set_new(j, "train_tokens", json_integer(sp->steps * sp->batch));
  json_object_set_new(j, "params_total", json_integer(s->res.params));
  json_object_set_new(j, "params_active", json_integer(s->res.active));
  json_object_set_new(j, "train_s", num_or_null(s->res.train_s));
  json_object_set_new(j, "wall_s", num_or_null(s->res.wall_s));
  return j;
}

static double json_num(json_t *o, const char *key) {
  json_t *v = json_object_get(o, key);
  return json_is_number(v) ? json_number_value(v) : NAN;
}

/* A finished setting's result, if its directory has one for this exact key. */
static bool load_result(setting *s, const char *path) {
  json_t *j = json_load_file(path, 0, NULL);
  if (!j) return false;
  json_t *key = json_object_get(j, "setting");
  bool ok = json_is_string(key) && strcmp(json_string_value(key), s->key) == 0;
  if (ok) {
    s->res.val_loss = json_num(j, "val_loss");
    s->res.ppl = json_num(j, "val_ppl");
    s->res.usage = json_num(j, "usage");
    s->res.unevenness = json_num(j, "unevenness");
    s->res.tokens_per_s = json_num(j, "tokens_per_s");
    s->res.train_s = json_num(j, "train_s");
    s->res.wall_s = json_num(j, "wall_s");
    s->res.params = (int64_t)json_num(j, "params_total");
    s->res.active = (int64_t)json_num(j, "params_active");
  }
  json_decref(j);
  return ok;
}

/* Write JSON to path atomically (temporary file, rename). */
static int write_json(json_t *j, const char *path) {
  char tmp[4400];
  snprintf(tmp, sizeof tmp, "%s.tmp", path);
  if (json_dump_file(j, tmp, JSON_INDENT(2) | JSON_REAL_PRECISION(10)) != 0 ||
      rename(tmp, path) != 0)
    return fail("cannot write %s: %s", path, strerror(errno));
  return 0;
}

static int make_dir(const char *path) {
  char buf[4096];
  snprintf(buf, sizeof buf, "%s", path);
  for (char *p = buf + 1; *p; p++) {
    if (*p != '/') continue;
    *p = '\0';
    if (mkdir(buf, 0777) != 0 && errno != EEXIST)
      return fail("cannot create %s: %s", buf, strerror(errno));
    *p = '/';
  }
  if (mkdir(buf, 0777) != 0 && errno != EEXIST)
    return fail("cannot create %s: %s", buf, strerror(errno));
  return 0;
}

/* ---------------------------------------------------------------- training */

typedef struct run_state {
  int64_t steps_this_run; /* for --stop-after */
  progress prog;
} run_state;

/* Positions of training batch `step`: a pure function of (seed, step), so a
 * resumed run sees the same batches. */
static void sample_batch(const setting *s, const corpus *cp, int64_t step, uint8_t *ctx,
                         uint8_t *target) {
  const int c = s->spec.context;
  uint64_t rng = s->spec.seed * 0x9e3779b97f4a7c15ull ^ (uint64_t)step * 0xd1b54a32d192ed03ull;
  for (int t = 0; t < s->spec.batch; t++) {
    int64_t p = c + (int64_t)(ablate_rng_next(&rng) % (uint64_t)(cp->n_train - c));
    memcpy(ctx + (int64_t)t * c, cp->train + p - c, (size_t)c);
    target[t] = cp->train[p];
  }
}

/* Train (or resume) and evaluate one setting.  Returns 0, or an exit status. */
static int run_setting(const options *o, const corpus *cp, setting *s, int index, int total,
                       run_state *rs) {
  char dir[4096], path[4200], err[512];
  snprintf(dir, sizeof dir, "%s/runs/%s", o->out, s->id);
  snprintf(path, sizeof path, "%s/result.json", dir);
  if (load_result(s, path)) {
    fprintf(stderr, "[%d/%d] %s: done before (%s)\n", index + 1, total, s->label, path);
    return 0;
  }
  int rc = make_dir(dir);
  if (rc) return rc;
  double t_start = now_seconds();
  ablate_model *m = ablate_model_create(&s->spec, err, sizeof err);
  if (!m) return fail("%s: %s", s->label, err);
  double train_s = 0.0;
  int loaded = ablate_model_load(m, dir, s->key, &train_s, err, sizeof err);
  if (loaded < 0) {
    ablate_model_free(m);
    return fail("%s: cannot resume: %s", s->label, err);
  }
  const int64_t steps = s->spec.steps;
  int64_t step0 = ablate_model_steps_done(m);
  if (loaded)
    fprintf(stderr, "[%d/%d] %s: resuming at step %lld of %lld\n", index + 1, total, s->label,
            (long long)step0, (long long)steps);
  uint8_t *ctx = malloc((size_t)(s->spec.batch * s->spec.context));
  uint8_t *target = malloc((size_t)s->spec.batch);
  if (!ctx || !target) {
    free(ctx), free(target), ablate_model_free(m);
    return fail("out of memory");
  }
  rs->prog.last_decile = -1;
  double loss_ema = NAN, t_last_ckpt = now_seconds(), t_seg = now_seconds();
  int64_t seg_steps = 0;
  rc = 0;
  for (int64_t step = step0; step < steps; step++) {
    sample_batch(s, cp, step, ctx, target);
    double loss;
    if (ablate_model_step(m, ctx, target, &loss, err, sizeof err)) {
      rc = fail("%s: step %lld: %s", s->label, (long long)step, err);
      break;
    }
    seg_steps++;
    rs->steps_this_run++;
    loss_ema = isnan(loss_ema) ? loss : 0.98 * loss_ema + 0.02 * loss;
    double t = now_seconds();
    double tok_s = (double)(seg_steps * s->spec.batch) / (t - t_seg + 1e-9);
    progress_show(&rs->prog, s, index, total, step + 1, steps, loss_ema, tok_s);
    bool stop = o->stop_after && rs->steps_this_run >= o->stop_after && step + 1 < steps;
    bool due =
        o->checkpoint_every ? (step + 1) % o->checkpoint_every == 0 : t - t_last_ckpt >= 30.0;
    if (g_signal || stop || (due && step + 1 < steps)) {
      double elapsed = train_s + (t - t_seg);
      if (ablate_model_save(m, dir, s->key, elapsed, err, sizeof err)) {
        rc = fail("%s: %s", s->label, err);
        break;
      }
      t_last_ckpt = now_seconds();
      if (g_signal || stop) {
        if (rs->prog.tty) fputc('\n', stderr);
        fprintf(stderr,
                "peer-ablate: %s: checkpoint saved at step %lld of %lld (%s); run again to "
                "resume\n",
                stop ? "stopped as asked (--stop-after)" : "interrupted", (long long)(step + 1),
                (long long)steps, s->label);
        rc = stop ? EXIT_STOPPED : EXIT_SIGNAL;
        break;
      }
    }
  }
  double t_train_end = now_seconds();
  train_s += t_train_end - t_seg;
  if (!rc) {
    double loss, usage, unev;
    if (ablate_model_evaluate(m, cp->val, cp->n_val, &loss, &usage, &unev, err, sizeof err)) {
      rc = fail("%s: %s", s->label, err);
    } else {
      s->res.val_loss = loss;
      s->res.ppl = exp(loss);
      s->res.usage = usage, s->res.unevenness = unev;
      s->res.train_s = train_s;
      s->res.tokens_per_s = (double)(steps * s->spec.batch) / train_s;
      s->res.params = ablate_model_params(m);
      s->res.active = ablate_model_active_params(m);
      /* Wall time of the setting: training over all resumed runs, plus this
       * run's set-up and evaluation. */
      s->res.wall_s = train_s + (now_seconds() - t_start) - (t_train_end - t_seg);
      json_t *j = result_json(s, cp);
      rc = write_json(j, path);
      json_decref(j);
      if (!rc && !o->keep_checkpoints) ablate_model_remove_checkpoint(dir);
    }
  }
  free(ctx), free(target);
  ablate_model_free(m);
  return rc;
}

/* ----------------------------------------------------------------- outputs */

static void fmt_num(char *buf, size_t size, const char *fmt, double v) {
  if (isfinite(v))
    snprintf(buf, size, fmt, v);
  else
    snprintf(buf, size, "NA");
}

static void print_table(const setting *s, int n, const corpus *cp) {
  printf("\n%-34s %9s %9s %8s %7s %8s %9s %10s %10s %8s\n", "setting", "val_loss", "val_ppl", "gap",
         "usage", "uneven", "tok/s", "params", "active", "wall_s");
  for (int i = 0; i < n; i++) {
    const result *r = &s[i].res;
    char gap[32], usage[32], unev[32];
    fmt_num(gap, sizeof gap, "%.4f", r->val_loss - cp->entropy_rate);
    fmt_num(usage, sizeof usage, "%.1f%%", 100.0 * r->usage);
    fmt_num(unev, sizeof unev, "%.3f", r->unevenness);
    printf("%-34s %9.4f %9.3f %8s %7s %8s %9.0f %10lld %10lld %8.1f\n", s[i].label, r->val_loss,
           r->ppl, gap, usage, unev, r->tokens_per_s, (long long)r->params, (long long)r->active,
           r->wall_s);
  }
  if (isfinite(cp->entropy_rate))
    printf("best possible loss (the source's entropy rate): %.4f nats (perplexity %.3f); gap = "
           "val_loss - entropy rate\n",
           cp->entropy_rate, exp(cp->entropy_rate));
}

static int write_csv(const setting *s, int n, const corpus *cp, const char *path) {
  char tmp[4400];
  snprintf(tmp, sizeof tmp, "%s.tmp", path);
  FILE *f = fopen(tmp, "w");
  if (!f) return fail("cannot write %s: %s", path, strerror(errno));
  fprintf(f, "model,label,n_experts,n_subkeys,heads,top_k,hk,query_norm,val_loss,val_ppl,"
             "entropy_rate,gap,usage,unevenness,tokens_per_s,params_total,params_active,"
             "train_s,wall_s,hash\n");
  for (int i = 0; i < n; i++) {
    const ablate_spec *sp = &s[i].spec;
    const result *r = &s[i].res;
    bool dense = sp->kind == ABLATE_DENSE;
    int64_t nn = sp->layer.n_subkeys, hk = sp->layer.n_heads * sp->layer.top_k;
    char ne[32] = "NA", ns[32] = "NA", h[32] = "NA", k[32] = "NA", er[32], gap[32], us[32], un[32];
    if (!dense) {
      snprintf(ne, sizeof ne, "%lld", (long long)(nn * nn));
      snprintf(ns, sizeof ns, "%lld", (long long)nn);
      snprintf(h, sizeof h, "%lld", (long long)sp->layer.n_heads);
      snprintf(k, sizeof k, "%lld", (long long)sp->layer.top_k);
    }
    fmt_num(er, sizeof er, "%.6f", cp->entropy_rate);
    fmt_num(gap, sizeof gap, "%.6f", r->val_loss - cp->entropy_rate);
    fmt_num(us, sizeof us, "%.6f", r->usage);
    fmt_num(un, sizeof un, "%.6f", r->unevenness);
    fprintf(f, "%s,%s,%s,%s,%s,%s,%lld,%s,%.6f,%.6f,%s,%s,%s,%s,%.1f,%lld,%lld,%.2f,%.2f,%s\n",
            kind_names[sp->kind], s[i].label, ne, ns, h, k, (long long)hk,
            dense ? "NA" : peer_query_norm_name(sp->layer.query_norm), r->val_loss, r->ppl, er, gap,
            us, un, r->tokens_per_s, (long long)r->params, (long long)r->active, r->train_s,
            r->wall_s, s[i].id + strlen(s[i].id) - 16);
  }
  if (fclose(f) != 0 || rename(tmp, path) != 0)
    return fail("cannot write %s: %s", path, strerror(errno));
  return 0;
}

static int write_results_json(const options *o, const setting *s, int n, const corpus *cp,
                              const char *path) {
  json_t *root = json_object(), *arr = json_array();
  json_object_set_new(root, "tool", json_string("peer-ablate"));
  json_object_set_new(root, "peer_version", json_string(peer_version_string()));
  json_t *data = json_object();
  json_object_set_new(data, "description", json_string(cp->desc));
  json_object_set_new(data, "file", o->data ? json_string(o->data) : json_null());
  json_object_set_new(data, "entropy_rate", num_or_null(cp->entropy_rate));
  json_object_set_new(data, "train_tokens", json_integer(cp->n_train));
  json_object_set_new(data, "val_positions", json_integer(cp->n_val - o->context));
  json_object_set_new(root, "data", data);
  json_t *model = json_object();
  json_object_set_new(model, "d_model", json_integer(o->d_model));
  json_object_set_new(model, "d_key", json_integer(o->d_key));
  json_object_set_new(model, "context", json_integer(o->context));
  json_object_set_new(model, "prenorm", json_boolean(o->prenorm));
  json_object_set_new(model, "activation", json_string(peer_activation_name(o->activation)));
  json_object_set_new(model, "batch", json_integer(o->batch));
  json_object_set_new(model, "tokens", json_integer(o->tokens));
  json_object_set_new(model, "lr", json_real(o->lr));
  json_object_set_new(model, "expert_lr", json_real(o->expert_lr));
  json_object_set_new(model, "seed", json_integer((json_int_t)o->seed));
  json_object_set_new(model, "threads", json_integer(o->threads));
  json_object_set_new(root, "training", model);
  for (int i = 0; i < n; i++)
    json_array_append_new(arr, result_json(&s[i], cp));
  json_object_set_new(root, "results", arr);
  int rc = write_json(root, path);
  json_decref(root);
  return rc;
}

/* Is `name` an executable on PATH? */
static bool on_path(const char *name) {
  const char *path = getenv("PATH");
  if (!path) return false;
  char buf[4096];
  for (const char *p = path; *p;) {
    const char *colon = strchr(p, ':');
    size_t len = colon ? (size_t)(colon - p) : strlen(p);
    snprintf(buf, sizeof buf, "%.*s/%s", (int)len, len ? p : ".", name);
    if (access(buf, X_OK) == 0) return true;
    if (!colon) break;
    p = colon + 1;
  }
  return false;
}

/* Write ablate.gp (data inline) and run gnuplot on it: validation loss and
 * usage against N, one line per (model, H, k, query norm); dense baselines
 * and the entropy rate as horizontal lines. */
static int write_plot(const options *o, const setting *s, int n, const corpus *cp) {
  char gp[4200], svg[4200];
  snprintf(gp, sizeof gp, "%s/ablate.gp", o->out);
  snprintf(svg, sizeof svg, "%s/ablate.svg", o->out);
  FILE *f = fopen(gp, "w");
  if (!f) return fail("cannot write %s: %s", gp, strerror(errno));
  fprintf(f, "# ablate.gp: written by peer-ablate; `gnuplot ablate.gp` draws ablate.svg\n");
  /* Groups of retrieval settings that differ only in N. */
  int group[256], n_groups = 0, first[256];
  for (int i = 0; i < n && i < 256; i++) {
    group[i] = -1;
    if (s[i].spec.kind == ABLATE_DENSE) continue;
    for (int g = 0; g < n_groups; g++) {
      const peer_config *a = &s[first[g]].spec.layer, *b = &s[i].spec.layer;
      if (s[first[g]].spec.kind == s[i].spec.kind && a->n_heads == b->n_heads &&
          a->top_k == b->top_k && a->query_norm == b->query_norm)
        group[i] = g;
    }
    if (group[i] < 0) first[n_groups] = i, group[i] = n_groups++;
  }
  for (int g = 0; g < n_groups; g++) {
    fprintf(f, "$g%d << EOD\n", g);
    for (int i = 0; i < n && i < 256; i++)
      if (group[i] == g) {
        int64_t nn = s[i].spec.layer.n_subkeys;
        fprintf(f, "%lld %.6f %.6f\n", (long long)(nn * nn), s[i].res.val_loss,
                100.0 * s[i].res.usage);
      }
    fprintf(f, "EOD\n");
  }
  /* An opaque white page (a transparent SVG is unreadable on dark viewers),
   * and the keys below each plot, where no curve runs. */
  fprintf(f,
          "set terminal svg size 1100,560 dynamic background rgb 'white' font 'sans,12'\n"
          "set output '%s'\n",
          "ablate.svg");
  fprintf(f, "set multiplot layout 1,2 title '%s'\n",
          isfinite(cp->entropy_rate) ? "peer-ablate: synthetic Markov source"
                                     : "peer-ablate: held-out text");
  fprintf(f, "set logscale x 2\nset format x '2^{%%L}'\nset grid\n"
             "set key below center horizontal maxrows 3 spacing 1.2\n"
             "set xlabel 'experts N'\nset offsets graph 0.05, graph 0.05, 0, 0\n");
  fprintf(f, "set ylabel 'validation loss (nats/token)'\nplot ");
  const char *sep = "";
  for (int g = 0; g < n_groups; g++) {
    const setting *a = &s[first[g]];
    fprintf(f, "%s$g%d using 1:2 with linespoints lw 2 pt 7 title '%s H=%lld k=%lld %s'", sep, g,
            kind_names[a->spec.kind], (long long)a->spec.layer.n_heads,
            (long long)a->spec.layer.top_k, peer_query_norm_name(a->spec.layer.query_norm));
    sep = ", \\\n  ";
  }
  for (int i = 0; i < n; i++)
    if (s[i].spec.kind == ABLATE_DENSE) {
      fprintf(f, "%s%.6f with lines dt 2 lw 2 title 'dense, %lld hidden'", sep, s[i].res.val_loss,
              (long long)(s[i].spec.layer.top_k));
      sep = ", \\\n  ";
    }
  if (isfinite(cp->entropy_rate))
    fprintf(f, "%s%.6f with lines dt 3 lw 2 lc rgb 'black' title 'entropy rate (best possible)'",
            sep, cp->entropy_rate);
  fprintf(f, "\nset ylabel 'expert usage (%%)'\nset yrange [0:105]\nplot ");
  sep = "";
  for (int g = 0; g < n_groups; g++) {
    const setting *a = &s[first[g]];
    fprintf(f, "%s$g%d using 1:3 with linespoints lw 2 pt 7 title '%s H=%lld k=%lld %s'", sep, g,
            kind_names[a->spec.kind], (long long)a->spec.layer.n_heads,
            (long long)a->spec.layer.top_k, peer_query_norm_name(a->spec.layer.query_norm));
    sep = ", \\\n  ";
  }
  fprintf(f, "\nunset multiplot\n");
  if (fclose(f) != 0) return fail("cannot write %s", gp);
  if (n_groups == 0) {
    fprintf(stderr, "peer-ablate: no PEER or pkm settings: nothing to plot against N\n");
    return 0;
  }
  if (!on_path("gnuplot")) {
    fprintf(stderr,
            "peer-ablate: gnuplot not found on PATH (install gnuplot-nox): no plot drawn; "
            "results.csv, results.json and %s are written\n",
            gp);
    return 0;
  }
  pid_t pid = fork();
  if (pid < 0) return fail("cannot start gnuplot: %s", strerror(errno));
  if (pid == 0) {
    if (chdir(o->out) != 0) _exit(127);
    execlp("gnuplot", "gnuplot", "ablate.gp", (char *)NULL);
    _exit(127);
  }
  int status = 0;
  while (waitpid(pid, &status, 0) < 0 && errno == EINTR)
    continue;
  if (!WIFEXITED(status) || WEXITSTATUS(status) != 0)
    return fail("gnuplot failed on %s (status %d)", gp,
                WIFEXITED(status) ? WEXITSTATUS(status) : -1);
  fprintf(stderr, "peer-ablate: plot %s\n", svg);
  return 0;
}

/* -------------------------------------------------------------------- main */

int main(int argc, char **argv) {
  cli_set_prefix("peer-ablate");
  cli_remove_temporaries_on_signals();
  options o;
  int rc = parse_args(argc, argv, &o);
  if (rc == -1) {
    fputs(usage_text, stdout);
    return 0;
  }
  if (rc) return rc;
  corpus cp;
  if ((rc = load_corpus(&o, &cp))) return rc;
  setting *s = NULL;
  int n = 0;
  if ((rc = make_settings(&o, &cp, &s, &n))) {
    free(cp.train);
    return rc;
  }
  if ((rc = make_dir(o.out))) goto done;
  signal(SIGINT, on_signal);
  signal(SIGTERM, on_signal);
  fprintf(stderr, "peer-ablate: %d settings, %lld training tokens each, %d threads; data: %s\n", n,
          (long long)(o.tokens / o.batch * o.batch), o.threads, cp.desc);
  run_state rs = {.prog = {.tty = isatty(STDERR_FILENO) != 0}};
  for (int i = 0; i < n && !rc; i++)
    rc = run_setting(&o, &cp, &s[i], i, n, &rs);
  if (rc) goto done;
  char path[4200];
  snprintf(path, sizeof path, "%s/results.csv", o.out);
  if ((rc = write_csv(s, n, &cp, path))) goto done;
  snprintf(path, sizeof path, "%s/results.json", o.out);
  if ((rc = write_results_json(&o, s, n, &cp, path))) goto done;
  print_table(s, n, &cp);
  printf("results: %s/results.csv, %s/results.json\n", o.out, o.out);
  fflush(stdout);
  if (o.plot) rc = write_plot(&o, s, n, &cp);
done:
  free(s);
  free(cp.train);
  return rc;
}
