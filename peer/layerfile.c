/* layerfile.c: the one reader of weight files and checkpoints.  A layer's
 * config is written as "peer.<name>" metadata strings and read back here;
 * a file's tensors are checked against what a layer (and an optimizer)
 * needs, their total against the file's own size first, so that nothing
 * the file says makes anyone allocate or write before it has been checked.
 * weights.c (peer_layer_load) and optim.c (peer_checkpoint_load) both go
 * through it. */
#include "internal.h"

#include <stdio.h>
#include <string.h>

/* peer_config_format's "k=v,k=v" split into its fields. */
typedef struct config_fields {
  char text[PEER_CONFIG_TEXT_MAX]; /* "key\0value\0key\0value..." after splitting */
  int n;
  const char *key[PEER_CONFIG_FIELDS_MAX];
  const char *value[PEER_CONFIG_FIELDS_MAX];
} config_fields;

/* peer_config_format lists every field; the metadata keys follow it, so a
 * new field needs no change here. */
static peer_status config_fields_of(const peer_config *cfg, config_fields *out) {
  int len = peer_config_format(cfg, out->text, sizeof out->text);
  if (len < 0 || (size_t)len >= sizeof out->text)
    return peer_fail(PEER_ERR_CONFIG, "config text does not fit in %d bytes", PEER_CONFIG_TEXT_MAX);
  out->n = 0;
  for (char *item = out->text; item && *item && out->n < PEER_CONFIG_FIELDS_MAX;) {
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
  out->pair[0] = PEER_META_FORMAT;
  out->pair[1] = out->format;
  for (int i = 0; i < fields.n; i++) {
    snprintf(out->key[i], sizeof out->key[i], PEER_META_PREFIX "%.58s", fields.key[i]);
    out->pair[2 * i + 2] = out->key[i];
    out->pair[2 * i + 3] = out->text + (fields.value[i] - fields.text);
  }
  out->n_pairs = fields.n + 1;
  return PEER_OK;
}

/* A metadata value is machine-written: letters, digits, '_' and '-' only.
 * Blanks, '+', '=' and ',' (which would smuggle in other keys through the
 * config parser) are refused before it sees the value. */
static bool plain_value(const char *v) {
  if (!*v) return false;
  for (const char *p = v; *p; p++)
    if (!((*p >= 'a' && *p <= 'z') || (*p >= 'A' && *p <= 'Z') || (*p >= '0' && *p <= '9') ||
          *p == '_' || *p == '-'))
      return false;
  return true;
}

/* Apply "<field>=<value>" to *cfg; false if the value is not plain or does
 * not parse. */
static bool apply_value(peer_config *cfg, const char *field, const char *value) {
  char item[256];
  int len = snprintf(item, sizeof item, "%s=%s", field, value);
  return plain_value(value) && len > 0 && (size_t)len < sizeof item &&
         peer_config_parse(cfg, item) == PEER_OK;
}

peer_status peer_file_config(const peer_safetensors *f, const char *path, peer_config *cfg) {
  const char *format = peer_safetensors_metadata(f, PEER_META_FORMAT);
  if (!format)
    return peer_fail(PEER_ERR_FORMAT, "%s: metadata '%s' is missing (not a peer weight file?)",
                     path, PEER_META_FORMAT);
  char want[16];
  snprintf(want, sizeof want, "%d", PEER_FORMAT_VERSION);
  if (strcmp(format, want) != 0)
    return peer_fail(PEER_ERR_FORMAT, "%s: metadata '%s' is '%.32s'; this library reads format %s",
                     path, PEER_META_FORMAT, format, want);

  peer_config_default(cfg);
  config_fields fields;
  peer_status st = config_fields_of(cfg, &fields);
  if (st) return st;
  for (int i = 0; i < fields.n; i++) {
    char key[64];
    snprintf(key, sizeof key, PEER_META_PREFIX "%s", fields.key[i]);
    const char *value = peer_safetensors_metadata(f, key);
    if (!value) return peer_fail(PEER_ERR_FORMAT, "%s: metadata '%s' is missing", path, key);
    if (!plain_value(value))
      return peer_fail(PEER_ERR_FORMAT,
                       "%s: metadata '%s' = '%.40s' is not a valid value (letters, digits, '_' "
                       "and '-' only; no blanks or signs)",
                       path, key, value);
    char item[256];
    int len = snprintf(item, sizeof item, "%s=%s", fields.key[i], value);
    if (len < 0 || (size_t)len >= sizeof item)
      return peer_fail(PEER_ERR_FORMAT, "%s: metadata '%s' = '%.40s' is too long", path, key,
                       value);
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

peer_status peer_file_same_config(const peer_safetensors *f, const char *path,
                                  const peer_config *cfg) {
  peer_layer_meta lm;
  peer_status st = peer_layer_meta_of(cfg, &lm);
  if (st) return st;
  char want_text[PEER_CONFIG_TEXT_MAX], have_text[PEER_CONFIG_TEXT_MAX];
  peer_config_format(cfg, want_text, sizeof want_text);
  for (int i = 0; i < lm.n_pairs; i++) {
    const char *key = lm.pair[2 * i], *want = lm.pair[2 * i + 1];
    const char *have = peer_safetensors_metadata(f, key);
    if (!have)
      return peer_fail(PEER_ERR_FORMAT, "%s: metadata '%s' is missing (not a peer checkpoint?)",
                       path, key);
    if (strcmp(have, want) == 0) continue;
    if (i > 0) {
      peer_config c = *cfg;
      if (apply_value(&c, key + strlen(PEER_META_PREFIX), have)) {
        peer_config_format(&c, have_text, sizeof have_text);
        if (strcmp(have_text, want_text) == 0) continue;
      }
    }
    return peer_fail(PEER_ERR_FORMAT,
                     "%s: the checkpoint was saved with %s = '%.40s', this layer has '%s'", path,
                     key, have, want);
  }
  return PEER_OK;
}

static const peer_tensor *wanted(const peer_file_want *w, const char *name) {
  for (int i = 0; i < w->n; i++)
    if (strcmp(w->t[i].name, name) == 0) return &w->t[i];
  return NULL;
}

static bool has_prefix(const char *s, const char *prefix) {
  return prefix && strncmp(s, prefix, strlen(prefix)) == 0;
}

#define STATE_PREFIX "optim."

/* Order: extra tensors, missing ones, the size bound, then each one's dtype
 * and shape. */
peer_status peer_file_check(const peer_safetensors *f, const char *path, const peer_file_want *w) {
  for (int i = 0; i < peer_safetensors_count(f); i++) {
    peer_tensor t;
    peer_status st = peer_safetensors_info(f, i, &t);
    if (st) return st;
    if (wanted(w, t.name) || has_prefix(t.name, w->skip_prefix)) continue;
    if (w->state_desc && has_prefix(t.name, STATE_PREFIX))
      return peer_fail(PEER_ERR_FORMAT, "%s: tensor '%s' is state %s does not keep", path, t.name,
                       w->state_desc);
    return peer_fail(PEER_ERR_FORMAT, "%s: tensor '%s' is extra: %s has no such parameter%s", path,
                     t.name, w->layer_desc, w->state_desc ? " and it is not optimizer state" : "");
  }
  peer_tensor got[PEER_FILE_WANT_MAX];
  if (w->n > PEER_FILE_WANT_MAX)
    return peer_fail(PEER_ERR_INVALID_ARGUMENT, "%s: %d tensors wanted, at most %d", path, w->n,
                     PEER_FILE_WANT_MAX);
  for (int i = 0; i < w->n; i++)
    if (peer_safetensors_find(f, w->t[i].name, &got[i]))
      return peer_fail(PEER_ERR_FORMAT, "%s: tensor '%s' is missing", path, w->t[i].name);

  /* The bound: what the metadata makes a caller allocate must fit in the
   * file's data, so a file of kilobytes never costs gigabytes, whatever its
   * metadata says. */
  uint64_t need = 0, have = peer_safetensors_data_bytes(f);
  int largest = 0;
  for (int i = 0; i < w->n; i++) {
    need += w->t[i].nbytes; /* each < 2^62 (peer_config_validate) */
    if (w->t[i].nbytes > w->t[largest].nbytes) largest = i;
  }
  if (need > have)
    return peer_fail(PEER_ERR_FORMAT,
                     "%s: the metadata describes %llu bytes of tensors (%s alone: %zu) but the "
                     "file holds %llu bytes of data; refused before allocating anything",
                     path, (unsigned long long)need, w->t[largest].name, w->t[largest].nbytes,
                     (unsigned long long)have);

  for (int i = 0; i < w->n; i++) {
    const peer_tensor *want = &w->t[i];
    if (!peer_tensor_same_layout(want, &got[i])) {
      char ws[96], hs[96];
      peer_tensor_format_layout(ws, sizeof ws, want);
      peer_tensor_format_layout(hs, sizeof hs, &got[i]);
      return peer_fail(PEER_ERR_SHAPE, "%s: tensor '%s' is %s, %s needs %s", path, want->name, hs,
                       has_prefix(want->name, STATE_PREFIX) ? "the optimizer" : "the config", ws);
    }
  }
  return PEER_OK;
}

peer_status peer_file_read(const peer_safetensors *f, const peer_file_want *w) {
  for (int i = 0; i < w->n; i++) {
    peer_status st = peer_safetensors_read(f, w->t[i].name, w->t[i].data, w->t[i].nbytes);
    if (st) return st;
  }
  return PEER_OK;
}

/* ---- storage that is not host memory (a CUDA layer): host staging ---- */

peer_status peer_file_read_into(peer_layer *L, const peer_safetensors *f,
                                const peer_file_want *w) {
  if (!L->backend->upload) return peer_file_read(f, w);
  size_t most = 0;
  for (int i = 0; i < w->n; i++)
    if (w->t[i].nbytes > most) most = w->t[i].nbytes;
  void *host = peer_alloc(most ? most : 1);
  if (!host)
    return peer_fail(PEER_ERR_OUT_OF_MEMORY, "loading: cannot allocate %zu bytes of host staging",
                     most);
  peer_status st = PEER_OK;
  for (int i = 0; i < w->n && !st; i++) {
    st = peer_safetensors_read(f, w->t[i].name, host, w->t[i].nbytes);
    if (!st) st = L->backend->upload(L, w->t[i].data, host, w->t[i].nbytes);
  }
  peer_free(host, most ? most : 1);
  return st;
}

peer_status peer_tensors_to_host(const peer_layer *L, peer_tensor *t, int n, const char *what) {
  if (!L->backend->download) return PEER_OK;
  void *host[PEER_FILE_WANT_MAX];
  if (n > PEER_FILE_WANT_MAX)
    return peer_fail(PEER_ERR_INVALID_ARGUMENT, "%s: %d tensors to stage", what, n);
  for (int i = 0; i < n; i++) {
    peer_status st = PEER_OK;
    host[i] = peer_alloc(t[i].nbytes ? t[i].nbytes : 1);
    if (!host[i])
      st = peer_fail(PEER_ERR_OUT_OF_MEMORY, "%s: cannot stage '%s' (%zu bytes) in host memory",
                     what, t[i].name, t[i].nbytes);
    else
      st = L->backend->download(L, host[i], t[i].data, t[i].nbytes);
    if (st) {
      for (int j = 0; j <= i; j++)
        if (host[j]) peer_free(host[j], t[j].nbytes ? t[j].nbytes : 1);
      return st;
    }
  }
  for (int i = 0; i < n; i++)
    t[i].data = host[i];
  return PEER_OK;
}

void peer_tensors_host_free(const peer_layer *L, peer_tensor *t, int n) {
  if (!L->backend->download) return;
  for (int i = 0; i < n; i++)
    peer_free(t[i].data, t[i].nbytes ? t[i].nbytes : 1);
}
