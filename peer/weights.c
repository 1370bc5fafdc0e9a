/* weights.c: a layer's weight file (PEER.md "Weight file"): every parameter
 * as a safetensors tensor, the config as "peer.<name>" metadata strings.
 * Loading trusts nothing in the file: the config is rebuilt from metadata and
 * validated, every tensor must match the shape and dtype that config implies,
 * and tensors are read straight into the new layer's memory. */
#include "internal.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define META_PREFIX PEER_META_PREFIX
#define FORMAT_KEY PEER_META_FORMAT
/* peer_config_format lists every field; the metadata keys follow it, so a
 * new field needs no change here. */
#define CONFIG_TEXT_MAX PEER_CONFIG_TEXT_MAX
#define MAX_FIELDS PEER_CONFIG_FIELDS_MAX

typedef struct config_fields {
  char text[CONFIG_TEXT_MAX]; /* "key\0value\0key\0value..." after splitting */
  int n;
  const char *key[MAX_FIELDS];
  const char *value[MAX_FIELDS];
} config_fields;

/* Split peer_config_format's "k=v,k=v" into its fields. */
static peer_status config_fields_of(const peer_config *cfg, config_fields *out) {
  int len = peer_config_format(cfg, out->text, sizeof out->text);
  if (len < 0 || (size_t)len >= sizeof out->text)
    return peer_fail(PEER_ERR_CONFIG, "config text does not fit in %d bytes", CONFIG_TEXT_MAX);
  out->n = 0;
  for (char *item = out->text; item && *item && out->n < MAX_FIELDS;) {
    char *next = strchr(item, ',');
    if (next) *next++ = '\0';
    char *eq = strchr(item, '=');
    if (!eq) return peer_fail(PEER_ERR_CONFIG, "config text item '%s' has no '='", item);
    *eq = '\0';
    out->key[out->n] = item;
    out->value[out->n++] = eq + 1;
    item = next;
  }
  return PEER_OK;
}

peer_status peer_layer_meta_of(const peer_config *cfg, peer_layer_meta *out) {
  config_fields fields;
  peer_status st = config_fields_of(cfg, &fields);
  if (st) return st;
  memcpy(out->text, fields.text, sizeof out->text);
  snprintf(out->format, sizeof out->format, "%d", PEER_FORMAT_VERSION);
  out->pair[0] = FORMAT_KEY;
  out->pair[1] = out->format;
  for (int i = 0; i < fields.n; i++) {
    snprintf(out->key[i], sizeof out->key[i], META_PREFIX "%.58s", fields.key[i]);
    out->pair[2 * i + 2] = out->key[i];
    out->pair[2 * i + 3] = out->text + (fields.value[i] - fields.text);
  }
  out->n_pairs = fields.n + 1;
  return PEER_OK;
}

static peer_status check_host_backend(const peer_options *opt, const char *what) {
  if (opt && opt->backend != PEER_BACKEND_CPU)
    return peer_fail(PEER_ERR_UNSUPPORTED,
                     "%s: only CPU-backend layers (host parameters) can be saved or loaded", what);
  return PEER_OK;
}

peer_status peer_layer_save(const peer_layer *L, const char *path) {
  if (!L || !path) return peer_fail(PEER_ERR_INVALID_ARGUMENT, "layer_save: NULL argument");
  peer_status st = check_host_backend(&L->opt, path);
  if (st) return st;
  peer_layer_meta lm;
  if ((st = peer_layer_meta_of(&L->cfg, &lm))) return st;
  peer_tensor tensors[PEER_P_COUNT];
  for (int i = 0; i < L->n_params; i++)
    tensors[i] = L->slot[L->param_slot[i]];
  return peer_safetensors_write(path, tensors, L->n_params, lm.pair, lm.n_pairs);
}

/* Rebuild the config from "peer.<name>" metadata: every field is required
 * and must parse; the whole must validate. */
static peer_status config_from_metadata(const peer_safetensors *f, const char *path,
                                        peer_config *cfg) {
  const char *format = peer_safetensors_metadata(f, FORMAT_KEY);
  if (!format)
    return peer_fail(PEER_ERR_FORMAT, "%s: metadata '%s' is missing (not a peer weight file?)",
                     path, FORMAT_KEY);
  char want[16];
  snprintf(want, sizeof want, "%d", PEER_FORMAT_VERSION);
  if (strcmp(format, want) != 0)
    return peer_fail(PEER_ERR_FORMAT, "%s: metadata '%s' is '%.32s'; this library reads format %s",
                     path, FORMAT_KEY, format, want);

  peer_config_default(cfg);
  config_fields fields;
  peer_status st = config_fields_of(cfg, &fields);
  if (st) return st;
  for (int i = 0; i < fields.n; i++) {
    char key[64], item[256];
    snprintf(key, sizeof key, META_PREFIX "%s", fields.key[i]);
    const char *value = peer_safetensors_metadata(f, key);
    if (!value) return peer_fail(PEER_ERR_FORMAT, "%s: metadata '%s' is missing", path, key);
    /* The parser splits on ','; a comma in a value would smuggle in other
     * keys. */
    int len = snprintf(item, sizeof item, "%s=%s", fields.key[i], value);
    if (strchr(value, ',') || len < 0 || (size_t)len >= sizeof item)
      return peer_fail(PEER_ERR_FORMAT, "%s: metadata '%s' = '%.40s' is not a valid value", path,
                       key, value);
    if (peer_config_parse(cfg, item)) {
      char why[256];
      snprintf(why, sizeof why, "%s", peer_last_error());
      return peer_fail(PEER_ERR_FORMAT, "%s: metadata '%s': %s", path, key, why);
    }
  }
  if (peer_config_validate(cfg)) {
    char why[256];
    snprintf(why, sizeof why, "%s", peer_last_error());
    return peer_fail(PEER_ERR_FORMAT, "%s: metadata describes an invalid layer: %s", path, why);
  }
  return PEER_OK;
}

static bool is_param(const peer_layer *L, const char *name) {
  for (int i = 0; i < L->n_params; i++)
    if (strcmp(L->slot[L->param_slot[i]].name, name) == 0) return true;
  return false;
}

/* Every tensor of the file is a parameter of L, and every parameter of L is
 * read from the file with its exact shape and dtype. */
static peer_status fill_params(peer_layer *L, const peer_safetensors *f, const char *path) {
  for (int i = 0; i < peer_safetensors_count(f); i++) {
    peer_tensor t;
    peer_status st = peer_safetensors_info(f, i, &t);
    if (st) return st;
    if (strncmp(t.name, "optim.", 6) == 0) continue; /* a checkpoint's optimizer state */
    if (!is_param(L, t.name))
      return peer_fail(PEER_ERR_FORMAT,
                       "%s: tensor '%s' is extra: a layer with this config (query_bias=%d, "
                       "query_norm=%s) has no such parameter",
                       path, t.name, L->cfg.query_bias, peer_query_norm_name(L->cfg.query_norm));
  }
  for (int i = 0; i < L->n_params; i++) {
    const peer_tensor *want = &L->slot[L->param_slot[i]];
    peer_tensor have;
    if (peer_safetensors_find(f, want->name, &have))
      return peer_fail(PEER_ERR_FORMAT, "%s: tensor '%s' is missing", path, want->name);
    if (!peer_tensor_same_layout(want, &have)) {
      char ws[96], hs[96];
      peer_tensor_format_layout(ws, sizeof ws, want);
      peer_tensor_format_layout(hs, sizeof hs, &have);
      return peer_fail(PEER_ERR_SHAPE, "%s: tensor '%s' is %s, the config needs %s", path,
                       want->name, hs, ws);
    }
    peer_status st = peer_safetensors_read(f, want->name, want->data, want->nbytes);
    if (st) return st;
  }
  return PEER_OK;
}

peer_status peer_layer_load(peer_layer **out, const char *path, const peer_options *opt) {
  if (!out || !path) return peer_fail(PEER_ERR_INVALID_ARGUMENT, "layer_load: NULL argument");
  *out = NULL;
  peer_status st = check_host_backend(opt, path);
  if (st) return st;
  peer_safetensors *f = NULL;
  if ((st = peer_safetensors_open(&f, path))) return st;
  peer_config cfg;
  peer_layer *L = NULL;
  if (!(st = config_from_metadata(f, path, &cfg)) && !(st = peer_layer_create(&L, &cfg, opt)))
    st = fill_params(L, f, path);
  peer_safetensors_close(f);
  if (st) {
    peer_layer_free(L);
    return st;
  }
  *out = L;
  return PEER_OK;
}
