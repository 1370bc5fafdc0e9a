/* weights.c: a layer's weight file (PEER.md "Weight file"): every parameter
 * as a safetensors tensor, the config as "peer.<name>" metadata strings.
 * Loading trusts nothing in the file: the config is rebuilt from metadata and
 * validated, and every tensor is checked against the shape and dtype that
 * config implies (layerfile.c) before the layer is created; tensors are then
 * read straight into the new layer's memory. */
#include "internal.h"

#include <stdio.h>
#include <string.h>

/* Parameters the file code can reach: host memory, or a backend that copies
 * them out (download) and in (upload) through host staging. */
static peer_status check_reachable(const peer_layer *L, const char *what) {
  if (L->backend->upload && !L->backend->download)
    return peer_fail(PEER_ERR_UNSUPPORTED,
                     "%s: backend %s cannot copy parameters to the host for saving", what,
                     L->backend->name);
  return PEER_OK;
}

peer_status peer_layer_save(const peer_layer *L, const char *path) {
  if (!L || !path) return peer_fail(PEER_ERR_INVALID_ARGUMENT, "layer_save: NULL argument");
  peer_status st = check_reachable(L, path);
  if (st) return st;
  peer_layer_meta lm;
  if ((st = peer_layer_meta_of(&L->cfg, &lm))) return st;
  peer_tensor tensors[PEER_P_COUNT];
  for (int i = 0; i < L->n_params; i++)
    tensors[i] = L->slot[L->param_slot[i]];
  /* busy: an optimizer step on another thread would tear the saved values */
  if ((st = peer_layer_enter(L, "layer_save"))) return st;
  if (!(st = peer_tensors_to_host(L, tensors, L->n_params, "layer_save"))) {
    st = peer_safetensors_write(path, tensors, L->n_params, lm.pair, lm.n_pairs);
    peer_tensors_host_free(L, tensors, L->n_params);
  }
  peer_layer_leave(L);
  return st;
}

/* Open path and check it against the config its metadata describes:
 * *f open and cfg, want (parameters by slot order) filled on success. */
static peer_status open_checked(const char *path, peer_safetensors **f, peer_config *cfg,
                                peer_tensor want[PEER_P_COUNT], int *n_want) {
  peer_status st = peer_safetensors_open(f, path);
  if (st) return st;
  peer_tensor slot[PEER_P_COUNT];
  int order[PEER_P_COUNT];
  char desc[128];
  if (!(st = peer_file_config(*f, path, cfg))) {
    *n_want = peer_params_describe(cfg, slot, order);
    for (int i = 0; i < *n_want; i++)
      want[i] = slot[order[i]];
    snprintf(desc, sizeof desc, "a layer with this config (query_bias=%d, query_norm=%s)",
             cfg->query_bias, peer_query_norm_name(cfg->query_norm));
    const peer_file_want w = {.t = want,
                              .n = *n_want,
                              .skip_prefix = "optim." /* a checkpoint's optimizer state */,
                              .layer_desc = desc};
    st = peer_file_check(*f, path, &w);
  }
  if (st) {
    peer_safetensors_close(*f);
    *f = NULL;
  }
  return st;
}

peer_status peer_layer_check_file(const char *path, peer_config *cfg) {
  if (!path) return peer_fail(PEER_ERR_INVALID_ARGUMENT, "layer_check_file: NULL path");
  peer_safetensors *f = NULL;
  peer_config c;
  peer_tensor want[PEER_P_COUNT];
  int n;
  peer_status st = open_checked(path, &f, &c, want, &n);
  peer_safetensors_close(f);
  if (!st && cfg) *cfg = c;
  return st;
}

peer_status peer_layer_load(peer_layer **out, const char *path, const peer_options *opt) {
  if (!out || !path) return peer_fail(PEER_ERR_INVALID_ARGUMENT, "layer_load: NULL argument");
  *out = NULL;
  peer_status st;
  peer_safetensors *f = NULL;
  peer_config cfg;
  peer_tensor want[PEER_P_COUNT];
  int n = 0;
  if ((st = open_checked(path, &f, &cfg, want, &n))) return st;
  /* every check passed before the layer's memory exists */
  peer_layer *L = NULL;
  if (!(st = peer_layer_create(&L, &cfg, opt))) {
    for (int i = 0; i < n; i++)
      want[i] = L->slot[L->param_slot[i]];
    const peer_file_want w = {.t = want, .n = n};
    st = peer_file_read_into(L, f, &w);
  }
  peer_safetensors_close(f);
  if (st) {
    peer_layer_free(L);
    return st;
  }
  *out = L;
  return PEER_OK;
}
