/* shard_file.c: a sharded layer's files, the CPU shard's (peer_shard_*) and
 * the CUDA shard's (peer_cuda_shard_*, through host staging).  A shard file
 * is a checkpoint of the shard's layer (the expert tables and their
 * optimizer state as this rank's [N, d/P] columns) with "peer.shard.*"
 * metadata saying which columns of which world size it holds.  Loading goes
 * through peer_checkpoint_load, after the shard metadata is checked; split
 * and merge convert between one unsharded file and world shard files. */
#include "shard.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

peer_optimizer *peer_shard_optimizer_inner(const peer_shard_optimizer *so);

static const char *const shard_keys[] = {PEER_SHARD_META_RANK, PEER_SHARD_META_WORLD,
                                         PEER_SHARD_META_COL0, PEER_SHARD_META_COLS};
/* Metadata pairs a file of ours can have. */
#define MAX_META (PEER_CONFIG_FIELDS_MAX + 1 + PEER_OPTIM_META_N + 4)

/* Tensors split by columns: the expert tables and their optimizer state. */
static bool is_sliced(const char *name) {
  return strcmp(name, "experts.down") == 0 || strcmp(name, "experts.up") == 0 ||
         strncmp(name, "optim.experts.", 14) == 0;
}

/* ------------------------------------------------------------ save, load */

static peer_status shard_save(const peer_layer *L, const peer_optimizer *o, int rank, int world,
                              const char *path) {
  peer_layer_meta lm;
  peer_status st = peer_layer_meta_of(&L->cfg, &lm);
  if (st) return st;
  const char *meta[2 * MAX_META];
  memcpy(meta, lm.pair, sizeof(char *) * 2 * (size_t)lm.n_pairs);
  int n_meta = lm.n_pairs;
  peer_optim_meta om;
  if (o) {
    peer_optimizer_meta_of(o, &om);
    memcpy(meta + 2 * n_meta, om.pair, sizeof om.pair);
    n_meta += PEER_OPTIM_META_N;
  }
  char values[4][32];
  const long long shard_values[4] = {rank, world, (long long)L->expert_col0,
                                     (long long)L->expert_cols};
  for (int i = 0; i < 4; i++) {
    snprintf(values[i], sizeof values[i], "%lld", shard_values[i]);
    meta[2 * n_meta] = shard_keys[i];
    meta[2 * n_meta++ + 1] = values[i];
  }
  peer_tensor tensors[PEER_P_COUNT + 2 * PEER_P_COUNT];
  int n = 0;
  for (int i = 0; i < L->n_params; i++)
    tensors[n++] = L->slot[L->param_slot[i]];
  for (int i = 0; o && i < peer_optimizer_n_states(o); i++)
    if ((st = peer_optimizer_state((peer_optimizer *)o, i, &tensors[n++]))) return st;
  if ((st = peer_tensors_to_host(L, tensors, n, "shard_save"))) return st;
  st = peer_safetensors_write(path, tensors, n, meta, n_meta);
  peer_tensors_host_free(L, tensors, n);
  return st;
}

/* Held as peer_checkpoint_save holds the layer: a step on another thread
 * would tear the saved values. */
peer_status peer_shard_file_save(const peer_layer *L, const peer_optimizer *o, int rank, int world,
                                 const char *path, const char *what) {
  if (!path) return peer_fail(PEER_ERR_INVALID_ARGUMENT, "%s: NULL path", what);
  peer_status st = peer_optimizer_check_layer(o, L, what);
  if (st || (st = peer_layer_enter(L, what))) return st;
  st = shard_save(L, o, rank, world, path);
  peer_layer_leave(L);
  return st;
}

peer_status peer_shard_save(const peer_shard *S, const peer_shard_optimizer *so, const char *path) {
  if (!S) return peer_fail(PEER_ERR_INVALID_ARGUMENT, "shard_save: NULL argument");
  return peer_shard_file_save(S->L, so ? peer_shard_optimizer_inner(so) : NULL, S->rank, S->world,
                              path, "shard_save");
}

/* A shard key's value as an integer in [lo, hi]. */
static peer_status shard_meta(const peer_safetensors *f, const char *path, const char *key,
                              int64_t lo, int64_t hi, int64_t *out) {
  const char *v = peer_safetensors_metadata(f, key);
  if (!v)
    return peer_fail(PEER_ERR_FORMAT,
                     "%s: metadata '%s' is missing: not a shard file (an unsharded file loads "
                     "with peer_shard_load_full, or splits with `peer shard --split`)",
                     path, key);
  if (!peer_parse_i64(v, lo, hi, out))
    return peer_fail(PEER_ERR_FORMAT, "%s: metadata '%s' = '%.40s' is not in [%lld, %lld]", path,
                     key, v, (long long)lo, (long long)hi);
  return PEER_OK;
}

typedef struct shard_info {
  int64_t rank, world, col0, cols;
} shard_info;

static peer_status read_shard_info(const peer_safetensors *f, const char *path, shard_info *s) {
  peer_status st;
  if ((st = shard_meta(f, path, PEER_SHARD_META_WORLD, 1, 1 << 20, &s->world)) ||
      (st = shard_meta(f, path, PEER_SHARD_META_RANK, 0, s->world - 1, &s->rank)) ||
      (st = shard_meta(f, path, PEER_SHARD_META_COLS, 1, (int64_t)1 << 20, &s->cols)) ||
      (st = shard_meta(f, path, PEER_SHARD_META_COL0, 0, (int64_t)1 << 40, &s->col0)))
    return st;
  if (s->col0 != s->rank * s->cols)
    return peer_fail(PEER_ERR_FORMAT, "%s: rank %lld of %lld holds columns from %lld, not %lld",
                     path, (long long)s->rank, (long long)s->world, (long long)s->col0,
                     (long long)(s->rank * s->cols));
  return PEER_OK;
}

peer_status peer_shard_file_load(peer_layer *L, peer_optimizer *o, int rank, int world,
                                 const char *path, const char *what) {
  if (!path) return peer_fail(PEER_ERR_INVALID_ARGUMENT, "%s: NULL path", what);
  peer_safetensors *f = NULL;
  peer_status st = peer_safetensors_open(&f, path);
  if (st) return st;
  shard_info s;
  st = read_shard_info(f, path, &s);
  peer_safetensors_close(f);
  if (st) return st;
  const int64_t col0 = L->expert_col0, cols = L->expert_cols;
  if (s.world != world)
    return peer_fail(PEER_ERR_FORMAT,
                     "%s: a shard file of world size %lld; this group has %d ranks (re-shard "
                     "with `peer shard --merge` then `--split %d`)",
                     path, (long long)s.world, world, world);
  if (s.rank != rank || s.col0 != col0 || s.cols != cols)
    return peer_fail(PEER_ERR_FORMAT,
                     "%s: the shard of rank %lld (columns %lld..%lld); this is rank %d (columns "
                     "%lld..%lld)",
                     path, (long long)s.rank, (long long)s.col0, (long long)(s.col0 + s.cols),
                     rank, (long long)col0, (long long)(col0 + cols));
  return peer_checkpoint_load(L, o, path);
}

peer_status peer_shard_load(peer_shard *S, peer_shard_optimizer *so, const char *path) {
  if (!S) return peer_fail(PEER_ERR_INVALID_ARGUMENT, "shard_load: NULL argument");
  return peer_shard_file_load(S->L, so ? peer_shard_optimizer_inner(so) : NULL, S->rank, S->world,
                              path, "shard_load");
}

/* Columns [col0, col0 + cols) of full [rows, width] into out [rows, cols]. */
static void take_columns(const char *full, int64_t rows, int64_t width, int64_t col0, int64_t cols,
                         size_t esize, char *out) {
  for (int64_t r = 0; r < rows; r++)
    memcpy(out + (size_t)(r * cols) * esize, full + (size_t)(r * width + col0) * esize,
           (size_t)cols * esize);
}

static void put_columns(const char *part, int64_t rows, int64_t width, int64_t col0, int64_t cols,
                        size_t esize, char *full) {
  for (int64_t r = 0; r < rows; r++)
    memcpy(full + (size_t)(r * width + col0) * esize, part + (size_t)(r * cols) * esize,
           (size_t)cols * esize);
}

/* An unsharded checkpoint into the shard: every tensor the shard's layer and
 * optimizer o (or NULL) hold, checked as the file holds it (the expert
 * tables and their state with d_model columns) before anything is read;
 * the sliced ones read through a staging buffer, this rank's columns kept. */
static peer_status load_full(peer_layer *L, peer_optimizer *o, const peer_safetensors *f,
                             const char *path) {
  const int64_t col0 = L->expert_col0, cols = L->expert_cols;
  if (peer_safetensors_metadata(f, PEER_SHARD_META_WORLD))
    return peer_fail(PEER_ERR_FORMAT, "%s: a shard file; load it with peer_shard_load", path);
  int64_t step = 0;
  peer_status st = peer_file_same_config(f, path, &L->cfg);
  if (st || (o && (st = peer_optimizer_file_meta(f, path, o, &step)))) return st;
  peer_tensor mine[PEER_FILE_WANT_MAX], full[PEER_FILE_WANT_MAX];
  int n = 0;
  for (int i = 0; i < L->n_params; i++)
    mine[n++] = L->slot[L->param_slot[i]];
  for (int i = 0; o && i < peer_optimizer_n_states(o); i++)
    if ((st = peer_optimizer_state(o, i, &mine[n++]))) return st;
  for (int i = 0; i < n; i++) {
    full[i] = mine[i];
    if (is_sliced(mine[i].name)) {
      full[i].shape[1] = L->dims.d;
      full[i].nbytes = mine[i].nbytes / (size_t)cols * (size_t)L->dims.d;
    }
  }
  const peer_file_want w = {.t = full,
                            .n = n,
                            .skip_prefix = o ? NULL : "optim.",
                            .layer_desc = "the sharded layer",
                            .state_desc = o ? "this optimizer" : NULL};
  if ((st = peer_file_check(f, path, &w))) return st;
  /* Storage that is not host memory (a CUDA shard) takes the columns
   * through a host buffer and the backend's upload. */
  const bool staged = L->backend->upload != NULL;
  for (int i = 0; i < n && !st; i++) {
    if (!is_sliced(mine[i].name)) {
      const peer_file_want one = {.t = &mine[i], .n = 1};
      st = peer_file_read_into(L, f, &one);
      continue;
    }
    const size_t extra = staged ? mine[i].nbytes : 0;
    char *tmp = peer_alloc(full[i].nbytes + extra);
    if (!tmp)
      return peer_fail(PEER_ERR_OUT_OF_MEMORY, "shard_load_full: cannot stage %s (%zu bytes)",
                       mine[i].name, full[i].nbytes + extra);
    char *part = staged ? tmp + full[i].nbytes : mine[i].data;
    if (!(st = peer_safetensors_read(f, mine[i].name, tmp, full[i].nbytes))) {
      take_columns(tmp, full[i].shape[0], L->dims.d, col0, cols, peer_dtype_size(mine[i].dtype),
                   part);
      if (staged) st = L->backend->upload(L, mine[i].data, part, mine[i].nbytes);
    }
    peer_free(tmp, full[i].nbytes + extra);
  }
  if (!st && o) peer_optimizer_set_step(o, step);
  return st;
}

peer_status peer_shard_file_load_full(peer_layer *L, peer_optimizer *o, const char *path,
                                      const char *what) {
  if (!path) return peer_fail(PEER_ERR_INVALID_ARGUMENT, "%s: NULL path", what);
  peer_status st = peer_optimizer_check_layer(o, L, what);
  if (st) return st;
  peer_safetensors *f = NULL;
  if ((st = peer_safetensors_open(&f, path))) return st;
  if (!(st = peer_layer_enter(L, what))) {
    st = load_full(L, o, f, path);
    peer_layer_leave(L);
  }
  peer_safetensors_close(f);
  return st;
}

peer_status peer_shard_load_full(peer_shard *S, peer_shard_optimizer *so, const char *path) {
  if (!S) return peer_fail(PEER_ERR_INVALID_ARGUMENT, "shard_load_full: NULL argument");
  return peer_shard_file_load_full(S->L, so ? peer_shard_optimizer_inner(so) : NULL, path,
                                   "shard_load_full");
}

/* ------------------------------------------------------------ split, merge */

/* The metadata pairs of f worth keeping (config, optimizer): values point
 * into f, config keys into *lm. */
static int copy_meta(const peer_safetensors *f, peer_layer_meta *lm, const char **meta) {
  peer_config dc;
  peer_config_default(&dc);
  int n = 0;
  if (peer_layer_meta_of(&dc, lm) == PEER_OK)
    for (int i = 0; i < lm->n_pairs; i++) {
      const char *v = peer_safetensors_metadata(f, lm->pair[2 * i]);
      if (!v) continue;
      meta[2 * n] = lm->pair[2 * i];
      meta[2 * n++ + 1] = v;
    }
  for (int i = 0; i < PEER_OPTIM_META_N; i++) {
    const char *v = peer_safetensors_metadata(f, peer_optim_meta_keys[i]);
    if (!v) continue;
    meta[2 * n] = peer_optim_meta_keys[i];
    meta[2 * n++ + 1] = v;
  }
  return n;
}

/* Every tensor of a file, read into memory (t[i].data owned by the caller). */
typedef struct file_tensors {
  int n;
  peer_tensor t[PEER_P_COUNT + 2 * PEER_P_COUNT];
} file_tensors;

static void free_tensors(file_tensors *ft) {
  for (int i = 0; i < ft->n; i++)
    peer_free(ft->t[i].data, ft->t[i].nbytes);
  ft->n = 0;
}

static peer_status list_tensors(const peer_safetensors *f, const char *path, file_tensors *ft) {
  ft->n = 0;
  int n = peer_safetensors_count(f);
  if (n > (int)(sizeof ft->t / sizeof ft->t[0]))
    return peer_fail(PEER_ERR_FORMAT, "%s: %d tensors; a peer checkpoint has at most %d", path, n,
                     (int)(sizeof ft->t / sizeof ft->t[0]));
  for (int i = 0; i < n; i++) {
    peer_status st = peer_safetensors_info(f, i, &ft->t[i]);
    if (st) return st;
    ft->t[i].data = NULL;
    if (is_sliced(ft->t[i].name) && ft->t[i].ndim != 2)
      return peer_fail(PEER_ERR_FORMAT, "%s: tensor '%s' has %d dimensions, not 2", path,
                       ft->t[i].name, ft->t[i].ndim);
  }
  ft->n = n;
  return PEER_OK;
}

static peer_status read_tensor(const peer_safetensors *f, peer_tensor *t) {
  t->data = peer_alloc(t->nbytes);
  if (!t->data)
    return peer_fail(PEER_ERR_OUT_OF_MEMORY, "shard: cannot allocate %s (%zu bytes)", t->name,
                     t->nbytes);
  return peer_safetensors_read(f, t->name, t->data, t->nbytes);
}

static peer_status split_file(const peer_safetensors *f, const char *in_path, int world,
                              const char *const *out_paths) {
  if (peer_safetensors_metadata(f, PEER_SHARD_META_WORLD))
    return peer_fail(PEER_ERR_FORMAT, "%s: already a shard file (merge it first)", in_path);
  const char *dv = peer_safetensors_metadata(f, PEER_META_PREFIX "d_model");
  int64_t d;
  if (!dv || !peer_parse_i64(dv, 1, (int64_t)1 << 20, &d))
    return peer_fail(PEER_ERR_FORMAT, "%s: metadata 'peer.d_model' is missing or invalid", in_path);
  if (d % world)
    return peer_fail(PEER_ERR_CONFIG, "shard_split: d_model %lld is not divisible by %d",
                     (long long)d, world);
  const int64_t cols = d / world;
  file_tensors full, part;
  peer_status st = list_tensors(f, in_path, &full);
  for (int i = 0; !st && i < full.n; i++) {
    if (is_sliced(full.t[i].name) && full.t[i].shape[1] != d)
      st = peer_fail(PEER_ERR_SHAPE, "%s: tensor '%s' has %lld columns, d_model is %lld", in_path,
                     full.t[i].name, (long long)full.t[i].shape[1], (long long)d);
    else
      st = read_tensor(f, &full.t[i]);
  }
  peer_layer_meta lm;
  const char *meta[2 * MAX_META];
  int n_meta = copy_meta(f, &lm, meta);
  for (int r = 0; !st && r < world; r++) {
    part = full;
    for (int i = 0; i < part.n; i++)
      if (is_sliced(part.t[i].name)) part.t[i].data = NULL;
    for (int i = 0; i < part.n; i++) {
      if (!is_sliced(part.t[i].name)) continue;
      peer_tensor *t = &part.t[i];
      size_t es = peer_dtype_size(t->dtype);
      t->shape[1] = cols;
      t->nbytes = (size_t)(t->shape[0] * cols) * es;
      t->data = peer_alloc(t->nbytes);
      if (!t->data) {
        st = peer_fail(PEER_ERR_OUT_OF_MEMORY, "shard_split: cannot allocate %zu bytes", t->nbytes);
        break;
      }
      take_columns(full.t[i].data, t->shape[0], d, r * cols, cols, es, t->data);
    }
    char values[4][32];
    const long long v[4] = {r, world, (long long)(r * cols), (long long)cols};
    int nm = n_meta;
    for (int k = 0; k < 4; k++) {
      snprintf(values[k], sizeof values[k], "%lld", v[k]);
      meta[2 * nm] = shard_keys[k];
      meta[2 * nm++ + 1] = values[k];
    }
    if (!st) st = peer_safetensors_write(out_paths[r], part.t, part.n, meta, nm);
    for (int i = 0; i < part.n; i++)
      if (is_sliced(part.t[i].name)) peer_free(part.t[i].data, part.t[i].nbytes);
  }
  free_tensors(&full);
  return st;
}

peer_status peer_shard_split(const char *in_path, int world, const char *const *out_paths) {
  if (!in_path || !out_paths)
    return peer_fail(PEER_ERR_INVALID_ARGUMENT, "shard_split: NULL argument");
  if (world < 1 || world > (1 << 20))
    return peer_fail(PEER_ERR_INVALID_ARGUMENT, "shard_split: world %d is not in [1, 2^20]", world);
  for (int r = 0; r < world; r++)
    if (!out_paths[r])
      return peer_fail(PEER_ERR_INVALID_ARGUMENT, "shard_split: out_paths[%d] is NULL", r);
  peer_safetensors *f = NULL;
  peer_status st = peer_safetensors_open(&f, in_path);
  if (st) return st;
  st = split_file(f, in_path, world, out_paths);
  peer_safetensors_close(f);
  return st;
}

/* files[r] is rank r's, each checked against rank 0's config and tensors. */
static peer_status merge_files(peer_safetensors **files, const char *const *paths, int *path_of,
                               int world, const char *out_path) {
  const char *p0 = paths[path_of[0]];
  file_tensors out;
  peer_status st = list_tensors(files[0], p0, &out);
  if (st) return st;
  peer_layer_meta lm;
  const char *meta[2 * MAX_META];
  int n_meta = copy_meta(files[0], &lm, meta);
  for (int r = 1; r < world; r++) {
    for (int i = 0; i < n_meta; i++) {
      const char *v = peer_safetensors_metadata(files[r], meta[2 * i]);
      if (!v || strcmp(v, meta[2 * i + 1]) != 0)
        return peer_fail(PEER_ERR_FORMAT, "%s: metadata '%s' is '%.40s', rank 0's file has '%s'",
                         paths[path_of[r]], meta[2 * i], v ? v : "(missing)", meta[2 * i + 1]);
    }
    if (peer_safetensors_count(files[r]) != out.n)
      return peer_fail(PEER_ERR_FORMAT, "%s: %d tensors, rank 0's file has %d", paths[path_of[r]],
                       peer_safetensors_count(files[r]), out.n);
  }
  int64_t cols = 0;
  for (int i = 0; i < out.n; i++)
    if (is_sliced(out.t[i].name)) cols = out.t[i].shape[1];
  for (int i = 0; !st && i < out.n; i++) {
    peer_tensor *t = &out.t[i];
    const peer_tensor part = *t;
    bool sliced = is_sliced(t->name);
    size_t es = peer_dtype_size(t->dtype);
    if (sliced) {
      if (t->shape[1] != cols) {
        st = peer_fail(PEER_ERR_SHAPE, "%s: tensor '%s' has %lld columns, others %lld", p0, t->name,
                       (long long)t->shape[1], (long long)cols);
        break;
      }
      t->shape[1] = cols * world;
      t->nbytes = (size_t)(t->shape[0] * cols * world) * es;
    }
    t->data = peer_alloc(t->nbytes);
    char *tmp = peer_alloc(part.nbytes);
    if (!t->data || !tmp) {
      peer_free(tmp, part.nbytes);
      st = peer_fail(PEER_ERR_OUT_OF_MEMORY, "shard_merge: cannot allocate %s", t->name);
      break;
    }
    for (int r = 0; !st && r < world; r++) {
      peer_tensor have;
      if (peer_safetensors_find(files[r], t->name, &have) ||
          !peer_tensor_same_layout(&have, &part)) {
        st = peer_fail(PEER_ERR_FORMAT, "%s: tensor '%s' is missing or shaped unlike rank 0's",
                       paths[path_of[r]], t->name);
        break;
      }
      if ((st = peer_safetensors_read(files[r], t->name, tmp, part.nbytes))) break;
      if (sliced)
        put_columns(tmp, t->shape[0], cols * world, r * cols, cols, es, t->data);
      else if (r == 0)
        memcpy(t->data, tmp, part.nbytes);
      else if (memcmp(t->data, tmp, part.nbytes) != 0)
        st = peer_fail(PEER_ERR_FORMAT,
                       "%s: replicated tensor '%s' differs from rank 0's (the replicas diverged)",
                       paths[path_of[r]], t->name);
    }
    peer_free(tmp, part.nbytes);
  }
  if (!st) st = peer_safetensors_write(out_path, out.t, out.n, meta, n_meta);
  free_tensors(&out);
  return st;
}

peer_status peer_shard_merge(const char *const *in_paths, int n, const char *out_path) {
  if (!in_paths || !out_path || n < 1)
    return peer_fail(PEER_ERR_INVALID_ARGUMENT, "shard_merge: NULL argument or no files");
  peer_safetensors **files = calloc((size_t)n, sizeof *files);
  int *path_of = calloc((size_t)n, sizeof *path_of);
  peer_safetensors **opened = calloc((size_t)n, sizeof *opened);
  peer_status st = PEER_OK;
  if (!files || !path_of || !opened)
    st = peer_fail(PEER_ERR_OUT_OF_MEMORY, "shard_merge: out of memory");
  for (int i = 0; !st && i < n; i++) {
    if (!in_paths[i]) {
      st = peer_fail(PEER_ERR_INVALID_ARGUMENT, "shard_merge: in_paths[%d] is NULL", i);
      break;
    }
    if ((st = peer_safetensors_open(&opened[i], in_paths[i]))) break;
    shard_info s;
    if ((st = read_shard_info(opened[i], in_paths[i], &s))) break;
    if (s.world != n)
      st = peer_fail(PEER_ERR_FORMAT, "%s: a shard of world size %lld, but %d files were given",
                     in_paths[i], (long long)s.world, n);
    else if (files[s.rank])
      st = peer_fail(PEER_ERR_FORMAT, "%s and %s both hold rank %lld", in_paths[path_of[s.rank]],
                     in_paths[i], (long long)s.rank);
    else {
      files[s.rank] = opened[i];
      path_of[s.rank] = i;
    }
  }
  if (!st) st = merge_files(files, in_paths, path_of, n, out_path);
  for (int i = 0; opened && i < n; i++)
    peer_safetensors_close(opened[i]);
  free(files);
  free(path_of);
  free(opened);
  return st;
}
