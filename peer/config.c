/* config.c: the layer's options: defaults, "key=value" parsing, validation
 * (messages name the field) and formatting back to text. */
#include "internal.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

void peer_config_default(peer_config *cfg) {
  cfg->d_model = 512;
  cfg->n_heads = 8;
  cfg->d_key = 256;
  cfg->n_subkeys = 1024;
  cfg->top_k = 16;
  cfg->subkey_top_k = 0;
  cfg->shared_keys = 0;
  cfg->activation = PEER_ACT_GELU;
  cfg->gate = PEER_GATE_SOFTMAX;
  cfg->query_norm = PEER_NORM_NONE;
  cfg->query_bias = 0;
  cfg->weight_dtype = PEER_F32;
}

void peer_options_default(peer_options *opt) {
  opt->backend = PEER_BACKEND_CPU;
  opt->n_threads = 0;
  opt->device = 0;
}

static const char *const activation_names[] = {"relu", "gelu", "gelu_tanh", "silu",
                                               "identity"};
static const char *const gate_names[] = {"softmax", "sigmoid", "relu"};
static const char *const norm_names[] = {"none", "batchnorm"};
static const char *const dtype_names[] = {"F32", "BF16", "I64"};

#define N_OF(a) ((int)(sizeof(a) / sizeof((a)[0])))

const char *peer_activation_name(peer_activation a) {
  return (unsigned)a < (unsigned)N_OF(activation_names) ? activation_names[a] : "?";
}
const char *peer_gate_name(peer_gate g) {
  return (unsigned)g < (unsigned)N_OF(gate_names) ? gate_names[g] : "?";
}
const char *peer_query_norm_name(peer_query_norm q) {
  return (unsigned)q < (unsigned)N_OF(norm_names) ? norm_names[q] : "?";
}
const char *peer_dtype_name(peer_dtype t) {
  return (unsigned)t < (unsigned)N_OF(dtype_names) ? dtype_names[t] : "?";
}
size_t peer_dtype_size(peer_dtype t) {
  switch (t) {
  case PEER_F32: return 4;
  case PEER_BF16: return 2;
  case PEER_I64: return 8;
  }
  return 0;
}

int64_t peer_config_subkey_top_k(const peer_config *cfg) {
  return cfg->subkey_top_k ? cfg->subkey_top_k : cfg->top_k;
}

int64_t peer_config_n_experts(const peer_config *cfg) {
  return cfg->n_subkeys * cfg->n_subkeys;
}

bool peer_parse_i64(const char *s, int64_t lo, int64_t hi, int64_t *out) {
  /* digits with an optional '-': strtoll alone would take blanks and '+' */
  if (!s || !(s[0] == '-' ? s[1] >= '0' && s[1] <= '9' : s[0] >= '0' && s[0] <= '9'))
    return false;
  char *end = NULL;
  errno = 0;
  long long v = strtoll(s, &end, 10);
  if (errno || *end != '\0' || v < lo || v > hi) return false;
  *out = (int64_t)v;
  return true;
}

static int find_name(const char *const *names, int count, const char *s) {
  for (int i = 0; i < count; i++)
    if (strcmp(names[i], s) == 0) return i;
  return -1;
}

/* Set one field of *cfg from its text value. */
static peer_status set_field(peer_config *cfg, const char *key, const char *val) {
  struct {
    const char *name;
    int64_t *field;
  } ints[] = {{"d_model", &cfg->d_model},     {"n_heads", &cfg->n_heads},
              {"d_key", &cfg->d_key},         {"n_subkeys", &cfg->n_subkeys},
              {"top_k", &cfg->top_k},         {"subkey_top_k", &cfg->subkey_top_k}};
  for (int i = 0; i < N_OF(ints); i++) {
    if (strcmp(key, ints[i].name) == 0) {
      if (!peer_parse_i64(val, 0, INT64_MAX, ints[i].field))
        return peer_fail(PEER_ERR_CONFIG, "%s: '%s' is not a non-negative integer", key, val);
      return PEER_OK;
    }
  }
  int *flag = strcmp(key, "shared_keys") == 0  ? &cfg->shared_keys
              : strcmp(key, "query_bias") == 0 ? &cfg->query_bias
                                               : NULL;
  if (flag) {
    if (strcmp(val, "0") == 0 || strcmp(val, "false") == 0) *flag = 0;
    else if (strcmp(val, "1") == 0 || strcmp(val, "true") == 0) *flag = 1;
    else return peer_fail(PEER_ERR_CONFIG, "%s: '%s' is not 0 or 1", key, val);
    return PEER_OK;
  }
  int idx;
  if (strcmp(key, "activation") == 0) {
    if ((idx = find_name(activation_names, N_OF(activation_names), val)) < 0)
      return peer_fail(PEER_ERR_CONFIG,
                       "activation: '%s' is not one of relu, gelu, gelu_tanh, silu, identity",
                       val);
    cfg->activation = (peer_activation)idx;
  } else if (strcmp(key, "gate") == 0) {
    if ((idx = find_name(gate_names, N_OF(gate_names), val)) < 0)
      return peer_fail(PEER_ERR_CONFIG, "gate: '%s' is not one of softmax, sigmoid, relu",
                       val);
    cfg->gate = (peer_gate)idx;
  } else if (strcmp(key, "query_norm") == 0) {
    if ((idx = find_name(norm_names, N_OF(norm_names), val)) < 0)
      return peer_fail(PEER_ERR_CONFIG, "query_norm: '%s' is not one of none, batchnorm",
                       val);
    cfg->query_norm = (peer_query_norm)idx;
  } else if (strcmp(key, "weight_dtype") == 0) {
    if (strcmp(val, "f32") == 0 || strcmp(val, "F32") == 0) cfg->weight_dtype = PEER_F32;
    else if (strcmp(val, "bf16") == 0 || strcmp(val, "BF16") == 0)
      cfg->weight_dtype = PEER_BF16;
    else return peer_fail(PEER_ERR_CONFIG, "weight_dtype: '%s' is not f32 or bf16", val);
  } else {
    return peer_fail(PEER_ERR_CONFIG, "unknown config key '%s'", key);
  }
  return PEER_OK;
}

/* Strip blanks around s in place ("top_k = 8, gate=relu" reads as written). */
static char *trim(char *s) {
  while (*s == ' ' || *s == '\t')
    s++;
  size_t len = strlen(s);
  while (len > 0 && (s[len - 1] == ' ' || s[len - 1] == '\t'))
    s[--len] = '\0';
  return s;
}

peer_status peer_config_parse(peer_config *cfg, const char *text) {
  if (!cfg || !text) return peer_fail(PEER_ERR_INVALID_ARGUMENT, "config: NULL argument");
  peer_config work = *cfg;
  const char *p = text;
  while (*p) {
    const char *end = strchr(p, ',');
    size_t len = end ? (size_t)(end - p) : strlen(p);
    char item[256];
    if (len >= sizeof item) return peer_fail(PEER_ERR_CONFIG, "config: item too long");
    memcpy(item, p, len);
    item[len] = '\0';
    char *key = trim(item);
    if (*key) {
      char *eq = strchr(key, '=');
      if (!eq) return peer_fail(PEER_ERR_CONFIG, "config: '%s' is not key=value", key);
      *eq = '\0';
      peer_status st = set_field(&work, trim(key), trim(eq + 1));
      if (st) return st;
    }
    p += len;
    if (*p == ',') p++;
  }
  *cfg = work;
  return PEER_OK;
}

/* Upper bound on any one dimension: keeps every product below 2^62. */
#define DIM_MAX ((int64_t)1 << 20)

peer_status peer_config_validate(const peer_config *c) {
  if (!c) return peer_fail(PEER_ERR_INVALID_ARGUMENT, "config: NULL");
  if (c->d_model < 1 || c->d_model > DIM_MAX)
    return peer_fail(PEER_ERR_CONFIG, "d_model: %lld is not in [1, %lld]",
                     (long long)c->d_model, (long long)DIM_MAX);
  if (c->n_heads < 1 || c->n_heads > 1024)
    return peer_fail(PEER_ERR_CONFIG, "n_heads: %lld is not in [1, 1024]",
                     (long long)c->n_heads);
  if (c->d_key < 2 || c->d_key > DIM_MAX)
    return peer_fail(PEER_ERR_CONFIG, "d_key: %lld is not in [2, %lld]",
                     (long long)c->d_key, (long long)DIM_MAX);
  if (c->d_key % 2)
    return peer_fail(PEER_ERR_CONFIG, "d_key: %lld is odd; each half needs d_key/2",
                     (long long)c->d_key);
  if (c->n_subkeys < 1)
    return peer_fail(PEER_ERR_CONFIG, "n_subkeys: %lld must be at least 1",
                     (long long)c->n_subkeys);
  if (c->n_subkeys > ((int64_t)1 << 16))
    return peer_fail(PEER_ERR_CONFIG,
                     "n_subkeys: %lld gives N = n^2 beyond 2^32 experts (max n 65536)",
                     (long long)c->n_subkeys);
  if (c->top_k < 1)
    return peer_fail(PEER_ERR_CONFIG, "top_k: %lld must be at least 1", (long long)c->top_k);
  int64_t kp = peer_config_subkey_top_k(c);
  if (c->top_k > kp)
    return peer_fail(PEER_ERR_CONFIG, "top_k: %lld exceeds subkey_top_k %lld",
                     (long long)c->top_k, (long long)kp);
  if (kp > c->n_subkeys && c->subkey_top_k == 0)
    return peer_fail(PEER_ERR_CONFIG,
                     "top_k: %lld exceeds n_subkeys %lld (each half keeps top_k candidates "
                     "unless subkey_top_k is set)",
                     (long long)c->top_k, (long long)c->n_subkeys);
  if (kp > c->n_subkeys)
    return peer_fail(PEER_ERR_CONFIG, "subkey_top_k: %lld exceeds n_subkeys %lld",
                     (long long)kp, (long long)c->n_subkeys);
  if (c->top_k > kp * kp)
    return peer_fail(PEER_ERR_CONFIG, "top_k: %lld exceeds subkey_top_k^2", (long long)c->top_k);
  if (c->shared_keys != 0 && c->shared_keys != 1)
    return peer_fail(PEER_ERR_CONFIG, "shared_keys: must be 0 or 1");
  if (c->query_bias != 0 && c->query_bias != 1)
    return peer_fail(PEER_ERR_CONFIG, "query_bias: must be 0 or 1");
  if ((unsigned)c->activation >= (unsigned)N_OF(activation_names))
    return peer_fail(PEER_ERR_CONFIG, "activation: value %d out of range", (int)c->activation);
  if ((unsigned)c->gate >= (unsigned)N_OF(gate_names))
    return peer_fail(PEER_ERR_CONFIG, "gate: value %d out of range", (int)c->gate);
  if ((unsigned)c->query_norm >= (unsigned)N_OF(norm_names))
    return peer_fail(PEER_ERR_CONFIG, "query_norm: value %d out of range", (int)c->query_norm);
  if (c->weight_dtype != PEER_F32 && c->weight_dtype != PEER_BF16)
    return peer_fail(PEER_ERR_CONFIG, "weight_dtype: must be f32 or bf16");
  /* Expert tables: 2 * N * d elements must fit comfortably in size_t bytes. */
  int64_t N = peer_config_n_experts(c);
  if (N > (((int64_t)1 << 62) / 8) / c->d_model)
    return peer_fail(PEER_ERR_CONFIG, "n_subkeys/d_model: expert tables of %lld x %lld overflow",
                     (long long)N, (long long)c->d_model);
  return PEER_OK;
}

int peer_config_format(const peer_config *c, char *buf, size_t size) {
  return snprintf(buf, size,
                  "d_model=%lld,n_heads=%lld,d_key=%lld,n_subkeys=%lld,top_k=%lld,"
                  "subkey_top_k=%lld,shared_keys=%d,activation=%s,gate=%s,query_norm=%s,"
                  "query_bias=%d,weight_dtype=%s",
                  (long long)c->d_model, (long long)c->n_heads, (long long)c->d_key,
                  (long long)c->n_subkeys, (long long)c->top_k,
                  (long long)peer_config_subkey_top_k(c), c->shared_keys,
                  peer_activation_name(c->activation), peer_gate_name(c->gate),
                  peer_query_norm_name(c->query_norm), c->query_bias,
                  c->weight_dtype == PEER_BF16 ? "bf16" : "f32");
}
