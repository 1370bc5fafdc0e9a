/* convert.c: lucidrains' PEER-pytorch (0.2.x) layout of one PEER layer
 * (PEER.md "Related layouts"): loading its state dict into a layer and saving
 * a layer as one.  The query rows and the key axes are reordered; the expert
 * tables are copied as they are.  A PEER-pytorch file records only shapes,
 * so what is not a shape (top_k, gate, activation) comes from the caller. */
#include "internal.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

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

/* "[4, 2, 8, 4]" into buf. */
static const char *dims_of(const peer_tensor *t, char *buf, size_t size) {
  size_t used = (size_t)snprintf(buf, size, "[");
  for (int i = 0; i < t->ndim && used < size; i++)
    used +=
        (size_t)snprintf(buf + used, size - used, "%s%lld", i ? ", " : "", (long long)t->shape[i]);
  if (used < size) snprintf(buf + used, size - used, "]");
  return buf;
}

/* Find a PEER-pytorch tensor and check its rank and dtype. */
static peer_status pt_tensor(const peer_safetensors *f, const char *path, const char *name,
                             int ndim, peer_tensor *t) {
  if (peer_safetensors_find(f, name, t))
    return peer_fail(PEER_ERR_FORMAT, "%s: no tensor '%s' (a PEER-pytorch PEER layer has it)", path,
                     name);
  char dims[128];
  if (t->ndim != ndim)
    return peer_fail(PEER_ERR_SHAPE,
                     "%s: tensor '%s' has shape %s; PEER-pytorch's has %d dimensions", path, name,
                     dims_of(t, dims, sizeof dims), ndim);
  bool embed = name == pt_down || name == pt_up;
  if (t->dtype != PEER_F32 && !(embed && t->dtype == PEER_BF16))
    return peer_fail(PEER_ERR_SHAPE, "%s: tensor '%s' is %s; it must be F32%s", path, name,
                     peer_dtype_name(t->dtype), embed ? " or BF16" : "");
  return PEER_OK;
}

/* What PEER-pytorch cannot express, refused with `status` and a message that
 * starts with `where`. */
static peer_status pt_expressible(const peer_config *s, peer_status status, const char *where) {
  if (s->shared_keys)
    return peer_fail(status, "%s: shared_keys=1: PEER-pytorch has its own sub-keys per head",
                     where);
  if (s->query_norm != PEER_NORM_NONE)
    return peer_fail(status, "%s: query_norm=%s: PEER-pytorch has no query batch norm", where,
                     peer_query_norm_name(s->query_norm));
  if (s->query_bias)
    return peer_fail(status, "%s: query_bias=1: PEER-pytorch's query projection has no bias",
                     where);
  if (s->gate == PEER_GATE_SIGMOID)
    return peer_fail(status, "%s: gate=sigmoid: PEER-pytorch has no sigmoid gates", where);
  if (s->gate == PEER_GATE_RELU && s->top_k != 1)
    return peer_fail(status,
                     "%s: gate=relu with top_k=%lld: PEER-pytorch's non-competing scores keep "
                     "one expert per head (top_k=1)",
                     where, (long long)s->top_k);
  return PEER_OK;
}

/* Check the PEER-pytorch tensor set of f and derive the config from its
 * shapes and the settings. */
static peer_status pt_config(const peer_safetensors *f, const char *path,
                             const peer_config *settings, peer_config *cfg) {
  static const char *const expected =
      "to_queries.0.weight, keys, weight_down_embed.weight, weight_up_embed.weight";
  if (peer_safetensors_metadata(f, PEER_META_FORMAT))
    return peer_fail(PEER_ERR_FORMAT,
                     "%s: already a peer weight file (it has peer.format metadata)", path);
  for (int i = 0; i < peer_safetensors_count(f); i++) {
    peer_tensor t;
    peer_status st = peer_safetensors_info(f, i, &t);
    if (st) return st;
    if (strcmp(t.name, pt_queries) && strcmp(t.name, pt_keys) && strcmp(t.name, pt_down) &&
        strcmp(t.name, pt_up))
      return peer_fail(
          PEER_ERR_FORMAT, "%s: unknown tensor '%s'%s (a PEER-pytorch PEER layer has exactly %s)",
          path, t.name,
          strcmp(t.name, "norm.gamma") ? "" : " from pre_rmsnorm=True, which peer lacks", expected);
  }
  peer_tensor q, keys, down, up;
  peer_status st;
  if ((st = pt_tensor(f, path, pt_queries, 2, &q)) ||
      (st = pt_tensor(f, path, pt_keys, 4, &keys)) ||
      (st = pt_tensor(f, path, pt_down, 2, &down)) || (st = pt_tensor(f, path, pt_up, 2, &up)))
    return st;
  char s1[128], s2[128];
  dims_of(&keys, s1, sizeof s1);
  const int64_t H = keys.shape[0], n = keys.shape[1], dk = keys.shape[3], d = q.shape[1];
  int64_t N, HN;
  if (keys.shape[2] != 2)
    return peer_fail(PEER_ERR_SHAPE,
                     "%s: keys has shape %s; PEER-pytorch's is [heads, n, 2, dim_key]", path, s1);
  if (q.shape[0] != 2 * H * dk) {
    dims_of(&q, s2, sizeof s2);
    return peer_fail(PEER_ERR_SHAPE,
                     "%s: %s has shape %s but keys %s needs [%lld, d] (2 * heads * dim_key rows)",
                     path, pt_queries, s2, s1, (long long)(2 * H * dk));
  }
  if (__builtin_mul_overflow(n, n, &N))
    return peer_fail(PEER_ERR_SHAPE, "%s: keys: n = %lld is too large", path, (long long)n);
  for (int i = 0; i < 2; i++) {
    const peer_tensor *e = i ? &up : &down;
    if (H > 1 && !__builtin_mul_overflow(H, N, &HN) && e->shape[0] == HN)
      return peer_fail(PEER_ERR_UNSUPPORTED,
                       "%s: %s has %lld = heads * n^2 rows: separate_embed_per_head=True is not "
                       "supported",
                       path, e->name, (long long)e->shape[0]);
    if (e->shape[0] != N || e->shape[1] != d) {
      dims_of(e, s2, sizeof s2);
      return peer_fail(
          PEER_ERR_SHAPE,
          "%s: %s has shape %s; keys and %s need [%lld, %lld] (n^2 experts of width d)", path,
          e->name, s2, pt_queries, (long long)N, (long long)d);
    }
  }
  if (down.dtype != up.dtype)
    return peer_fail(PEER_ERR_SHAPE, "%s: the expert tables differ in dtype (%s and %s)", path,
                     peer_dtype_name(down.dtype), peer_dtype_name(up.dtype));
  if ((st = pt_expressible(settings, PEER_ERR_CONFIG, path))) return st;
  *cfg = *settings;
  cfg->d_model = d;
  cfg->n_heads = H;
  cfg->d_key = 2 * dk;
  cfg->n_subkeys = n;
  cfg->weight_dtype = down.dtype;
  if ((st = peer_config_validate(cfg))) {
    char why[256];
    snprintf(why, sizeof why, "%s", peer_last_error());
    return peer_fail(st, "%s: the config from its shapes and the settings: %s", path, why);
  }
  return PEER_OK;
}

/* Read PEER-pytorch tensor `name` (checked by pt_config), reordered into dst. */
static peer_status pt_read_reordered(const peer_safetensors *f, const char *name,
                                     const peer_config *c, float *dst) {
  peer_tensor t;
  peer_status st = peer_safetensors_find(f, name, &t);
  if (st) return st;
  float *buf = malloc(t.nbytes ? t.nbytes : 1);
  if (!buf)
    return peer_fail(PEER_ERR_OUT_OF_MEMORY, "cannot allocate %zu bytes for %s", t.nbytes, name);
  if (!(st = peer_safetensors_read(f, name, buf, t.nbytes))) {
    if (name == pt_queries)
      reorder_query_rows(buf, dst, c->n_heads, c->d_key / 2, c->d_model, false);
    else
      reorder_keys(buf, dst, c->n_heads, c->n_subkeys, c->d_key / 2, false);
  }
  free(buf);
  return st;
}

peer_status peer_layer_load_pytorch(peer_layer **out, const char *path, const peer_config *settings,
                                    const peer_options *opt) {
  if (!out || !path)
    return peer_fail(PEER_ERR_INVALID_ARGUMENT, "layer_load_pytorch: NULL argument");
  *out = NULL;
  if (opt && opt->backend != PEER_BACKEND_CPU)
    return peer_fail(PEER_ERR_UNSUPPORTED,
                     "%s: only CPU-backend layers (host parameters) can be loaded", path);
  peer_config defaults;
  if (!settings) {
    peer_config_default(&defaults);
    settings = &defaults;
  }
  peer_safetensors *f = NULL;
  peer_layer *L = NULL;
  peer_status st = peer_safetensors_open(&f, path);
  if (st) return st;
  peer_config cfg;
  if ((st = pt_config(f, path, settings, &cfg)) || (st = peer_layer_create(&L, &cfg, opt)))
    goto done;
  if ((st = pt_read_reordered(f, pt_queries, &cfg, L->slot[PEER_P_QUERY_WEIGHT].data)) ||
      (st = pt_read_reordered(f, pt_keys, &cfg, L->slot[PEER_P_KEYS].data)))
    goto done;
  const peer_tensor *down = &L->slot[PEER_P_EXPERTS_DOWN], *up = &L->slot[PEER_P_EXPERTS_UP];
  if ((st = peer_safetensors_read(f, pt_down, down->data, down->nbytes)) ||
      (st = peer_safetensors_read(f, pt_up, up->data, up->nbytes)))
    goto done;
  *out = L;
  L = NULL;
done:
  peer_layer_free(L);
  peer_safetensors_close(f);
  return st;
}

peer_status peer_config_pytorch_args(const peer_config *c, char *buf, size_t size) {
  static const char *const acts[] = {"nn.ReLU", "nn.GELU", "partial(nn.GELU, approximate='tanh')",
                                     "nn.SiLU", "nn.Identity"};
  if (!c || (!buf && size))
    return peer_fail(PEER_ERR_INVALID_ARGUMENT, "config_pytorch_args: NULL argument");
  peer_status st = peer_config_validate(c);
  if (st) return st;
  if ((st = pt_expressible(c, PEER_ERR_UNSUPPORTED, "PEER-pytorch cannot express the config")))
    return st;
  int64_t kp = peer_config_subkey_top_k(c);
  int64_t per_head = c->gate == PEER_GATE_RELU ? kp : c->top_k;
  int len =
      snprintf(buf, size,
               "PEER(dim=%lld, heads=%lld, num_experts=%lld, num_experts_per_head=%lld, "
               "dim_key=%lld, product_key_topk=%lld, non_competing_scores=%s, "
               "activation=%s)",
               (long long)c->d_model, (long long)c->n_heads, (long long)peer_config_n_experts(c),
               (long long)per_head, (long long)(c->d_key / 2), (long long)kp,
               c->gate == PEER_GATE_RELU ? "True" : "False", acts[c->activation]);
  if (len < 0 || (size_t)len >= size)
    return peer_fail(PEER_ERR_INVALID_ARGUMENT,
                     "config_pytorch_args: the text needs %d bytes, the buffer has %zu", len + 1,
                     size);
  return PEER_OK;
}

peer_status peer_layer_save_pytorch(const peer_layer *L, const char *path) {
  if (!L || !path) return peer_fail(PEER_ERR_INVALID_ARGUMENT, "layer_save_pytorch: NULL argument");
  if (L->opt.backend != PEER_BACKEND_CPU)
    return peer_fail(PEER_ERR_UNSUPPORTED,
                     "%s: only CPU-backend layers (host parameters) can be saved", path);
  const peer_config *c = &L->cfg;
  peer_status st = pt_expressible(c, PEER_ERR_UNSUPPORTED, path);
  if (st) return st;
  const int64_t H = c->n_heads, dk = c->d_key / 2, d = c->d_model, n = c->n_subkeys;
  const peer_tensor *pq = &L->slot[PEER_P_QUERY_WEIGHT], *pk = &L->slot[PEER_P_KEYS];
  const peer_tensor *pd = &L->slot[PEER_P_EXPERTS_DOWN], *pu = &L->slot[PEER_P_EXPERTS_UP];
  float *q = malloc(pq->nbytes), *keys = malloc(pk->nbytes);
  if (!q || !keys) {
    st = peer_fail(PEER_ERR_OUT_OF_MEMORY,
                   "%s: cannot allocate %zu bytes for the reordered query and keys", path,
                   pq->nbytes + pk->nbytes);
    goto done;
  }
  reorder_query_rows(pq->data, q, H, dk, d, true);
  reorder_keys(pk->data, keys, H, n, dk, true);
  /* The expert tables are written straight from the layer's memory. */
  peer_tensor t[4] = {{pt_queries, PEER_F32, 2, {2 * H * dk, d, 0, 0}, q, pq->nbytes},
                      {pt_keys, PEER_F32, 4, {H, n, 2, dk}, keys, pk->nbytes},
                      {pt_down, pd->dtype, 2, {pd->shape[0], d, 0, 0}, pd->data, pd->nbytes},
                      {pt_up, pu->dtype, 2, {pu->shape[0], d, 0, 0}, pu->data, pu->nbytes}};
  static const char *const meta[] = {"format", "pt"};
  st = peer_safetensors_write(path, t, 4, meta, 1);
done:
  free(q);
  free(keys);
  return st;
}

peer_status peer_convert_from_pytorch(const char *in_path, const char *out_path,
                                      const peer_config *settings) {
  if (!in_path || !out_path)
    return peer_fail(PEER_ERR_INVALID_ARGUMENT, "convert_from_pytorch: NULL argument");
  peer_layer *L = NULL;
  peer_status st = peer_layer_load_pytorch(&L, in_path, settings, NULL);
  if (!st) st = peer_layer_save(L, out_path);
  peer_layer_free(L);
  return st;
}

peer_status peer_convert_to_pytorch(const char *in_path, const char *out_path) {
  if (!in_path || !out_path)
    return peer_fail(PEER_ERR_INVALID_ARGUMENT, "convert_to_pytorch: NULL argument");
  peer_layer *L = NULL;
  peer_status st = peer_layer_load(&L, in_path, NULL);
  if (!st) st = peer_layer_save_pytorch(L, out_path);
  peer_layer_free(L);
  return st;
}
