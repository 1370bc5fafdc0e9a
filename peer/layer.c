/* layer.c: the layer object: creation from a config, parameter storage and
 * access by name, seeded initialisation, scratch memory, and the public entry
 * points that check arguments and hand the work to the layer's backend. */
#include "internal.h"
#include "pool.h"
#include "rowops.h"

#include <math.h>
#include <omp.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

bool peer_mul_size(size_t a, size_t b, size_t *out) {
  return !__builtin_mul_overflow(a, b, out);
}
bool peer_add_size(size_t a, size_t b, size_t *out) {
  return !__builtin_add_overflow(a, b, out);
}

/* Blocks at least this large come from mmap so they can use huge pages. */
#define MMAP_MIN ((size_t)1 << 21)

void *peer_alloc(size_t bytes) {
  if (bytes == 0) bytes = 64;
  if (bytes >= MMAP_MIN) {
    void *p = mmap(NULL, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) return NULL;
#ifdef MADV_HUGEPAGE
    madvise(p, bytes, MADV_HUGEPAGE);
#endif
    return p;
  }
  size_t rounded = (bytes + 63) & ~(size_t)63;
  void *p = aligned_alloc(64, rounded);
  if (p) memset(p, 0, rounded);
  return p;
}

void peer_free(void *ptr, size_t bytes) {
  if (!ptr) return;
  if (bytes == 0) bytes = 64;
  if (bytes >= MMAP_MIN) munmap(ptr, bytes);
  else free(ptr);
}

static peer_dims dims_of(const peer_config *c) {
  peer_dims d;
  d.d = c->d_model;
  d.H = c->n_heads;
  d.dk = c->d_key;
  d.half = c->d_key / 2;
  d.n = c->n_subkeys;
  d.N = c->n_subkeys * c->n_subkeys;
  d.k = c->top_k;
  d.kp = peer_config_subkey_top_k(c);
  d.G = c->shared_keys ? 1 : c->n_heads;
  d.dq = c->n_heads * c->d_key;
  return d;
}

static int set_slot(peer_tensor *slot, int *order, int n, int which, const char *name,
                    peer_dtype dt, int ndim, const int64_t *shape) {
  peer_tensor *t = &slot[which];
  t->name = name;
  t->dtype = dt;
  t->ndim = ndim;
  size_t count = 1;
  for (int i = 0; i < ndim; i++) {
    t->shape[i] = shape[i];
    count *= (size_t)shape[i]; /* bounded by peer_config_validate */
  }
  t->nbytes = count * peer_dtype_size(dt);
  order[n] = which;
  return n + 1;
}

int peer_params_describe(const peer_config *cfg, peer_tensor slot[PEER_P_COUNT],
                         int order[PEER_P_COUNT]) {
  const peer_dims D = dims_of(cfg);
  memset(slot, 0, PEER_P_COUNT * sizeof *slot);
  int n = 0;
  int64_t s[4];
  s[0] = D.dq, s[1] = D.d;
  n = set_slot(slot, order, n, PEER_P_QUERY_WEIGHT, "query.weight", PEER_F32, 2, s);
  s[0] = D.dq;
  if (cfg->query_bias)
    n = set_slot(slot, order, n, PEER_P_QUERY_BIAS, "query.bias", PEER_F32, 1, s);
  if (cfg->query_norm == PEER_NORM_BATCHNORM) {
    n = set_slot(slot, order, n, PEER_P_NORM_WEIGHT, "query.norm.weight", PEER_F32, 1, s);
    n = set_slot(slot, order, n, PEER_P_NORM_BIAS, "query.norm.bias", PEER_F32, 1, s);
    n = set_slot(slot, order, n, PEER_P_NORM_MEAN, "query.norm.running_mean", PEER_F32, 1, s);
    n = set_slot(slot, order, n, PEER_P_NORM_VAR, "query.norm.running_var", PEER_F32, 1, s);
  }
  s[0] = D.G, s[1] = 2, s[2] = D.n, s[3] = D.half;
  n = set_slot(slot, order, n, PEER_P_KEYS, "keys", PEER_F32, 4, s);
  s[0] = D.N, s[1] = D.d;
  n = set_slot(slot, order, n, PEER_P_EXPERTS_DOWN, "experts.down", cfg->weight_dtype, 2, s);
  n = set_slot(slot, order, n, PEER_P_EXPERTS_UP, "experts.up", cfg->weight_dtype, 2, s);
  return n;
}

/* Identity stamps start at 1; 0 is never a layer's. */
static atomic_uint_fast64_t next_layer_id = 1;

/* Calls that never write the keys; any other call entering the layer may,
 * and makes derived copies of them (peer_keys16) stale. */
__attribute__((noinline)) static bool keeps_keys(const char *what) {
  static const char *const readers[] = {
      "forward",       "retrieve",   "retrieve_brute",      "forward_train",
      "backward",      "layer_save", "checkpoint_save",     "set_workspace",
      "shard_forward", "shard_save", "shard_forward_train", "shard_backward",
      "cuda_forward",  "cuda_retrieve", "cuda_retrieve_brute", "cuda_forward_train",
      "cuda_backward", "cuda_check",    "cuda_set_workspace",  "cuda_shard_forward",
      "cuda_shard_forward_train", "cuda_shard_backward"};
  for (size_t i = 0; i < sizeof readers / sizeof readers[0]; i++)
    if (!strcmp(what, readers[i])) return true;
  return false;
}

peer_status peer_layer_enter(const peer_layer *L, const char *what) {
  peer_layer *l = (peer_layer *)L; /* the flag is not part of the layer's value */
  const char *none = NULL;
  if (atomic_compare_exchange_strong_explicit(&l->busy, &none, what, memory_order_acquire,
                                              memory_order_relaxed)) {
    if (!keeps_keys(what)) l->keys_gen++;
    return PEER_OK;
  }
  return peer_fail(PEER_ERR_BUSY,
                   "%s: the layer is busy: another thread is in %s on it (a layer takes one call "
                   "at a time; use one layer per thread or serialise the calls)",
                   what, none ? none : "a call");
}

void peer_layer_leave(const peer_layer *L) {
  atomic_store_explicit(&((peer_layer *)L)->busy, NULL, memory_order_release);
}

peer_status peer_check_disjoint(const char *what, const void *a, size_t a_bytes,
                                const char *a_name, const void *b, size_t b_bytes,
                                const char *b_name) {
  if (!a || !b || !a_bytes || !b_bytes) return PEER_OK;
  uintptr_t a0 = (uintptr_t)a, b0 = (uintptr_t)b;
  if (a0 < b0 + b_bytes && b0 < a0 + a_bytes)
    return peer_fail(PEER_ERR_INVALID_ARGUMENT,
                     "%s: %s and %s overlap in memory (in-place use is not supported: pass "
                     "separate buffers)",
                     what, a_name, b_name);
  return PEER_OK;
}

static peer_status init_const(peer_layer *L, int slot, float v);

peer_status peer_layer_create(peer_layer **out, const peer_config *cfg,
                              const peer_options *opt) {
  return peer_layer_create_cols(out, cfg, opt, 0, cfg ? cfg->d_model : 0);
}

peer_status peer_layer_create_cols(peer_layer **out, const peer_config *cfg,
                                   const peer_options *opt, int64_t col0, int64_t cols) {
  if (!out || !cfg) return peer_fail(PEER_ERR_INVALID_ARGUMENT, "layer_create: NULL argument");
  *out = NULL;
  peer_status st = peer_config_validate(cfg);
  if (st) return st;
  if (col0 < 0 || cols < 0 || col0 > cfg->d_model - cols)
    return peer_fail(PEER_ERR_INVALID_ARGUMENT,
                     "layer_create: expert columns [%lld, %lld) not within d_model %lld",
                     (long long)col0, (long long)(col0 + cols), (long long)cfg->d_model);
  peer_options o;
  peer_options_default(&o);
  if (opt) o = *opt;
  if (o.n_threads < 0)
    return peer_fail(PEER_ERR_INVALID_ARGUMENT, "n_threads: %d is negative", o.n_threads);
  const peer_backend_i *be = NULL;
  if (o.backend == PEER_BACKEND_CPU) be = &peer_backend_cpu;
  else if (o.backend == PEER_BACKEND_CUDA) {
#ifdef PEER_USE_CUDA
    be = &peer_backend_cuda;
#else
    return peer_fail(PEER_ERR_UNSUPPORTED, "backend: this build has no CUDA backend");
#endif
  } else return peer_fail(PEER_ERR_INVALID_ARGUMENT, "backend: unknown value %d", (int)o.backend);

  peer_layer *L = calloc(1, sizeof *L);
  if (!L) return peer_fail(PEER_ERR_OUT_OF_MEMORY, "layer_create: out of memory");
  L->cfg = *cfg;
  L->cfg.subkey_top_k = peer_config_subkey_top_k(cfg);
  L->opt = o;
  L->dims = dims_of(cfg);
  L->expert_col0 = col0;
  L->expert_cols = cols;
  L->backend = be;
  L->norm_momentum = 0.1f;
  L->id = atomic_fetch_add(&next_layer_id, 1);
  L->n_params = peer_params_describe(&L->cfg, L->slot, L->param_slot);
  if (cols != L->dims.d) /* a shard's columns of the expert tables */
    for (int s = PEER_P_EXPERTS_DOWN; s <= PEER_P_EXPERTS_UP; s++) {
      L->slot[s].shape[1] = cols;
      L->slot[s].nbytes = (size_t)(L->dims.N * cols) * peer_dtype_size(L->slot[s].dtype);
    }
  if (be->open && (st = be->open(L))) {
    free(L);
    return st;
  }
  for (int i = 0; i < L->n_params; i++) {
    peer_tensor *t = &L->slot[L->param_slot[i]];
    t->data = be->alloc(t->nbytes);
    if (!t->data) {
      peer_fail(PEER_ERR_OUT_OF_MEMORY, "layer_create: cannot allocate %s (%zu bytes)", t->name,
                t->nbytes);
      peer_layer_free(L);
      return PEER_ERR_OUT_OF_MEMORY;
    }
  }
  if (L->slot[PEER_P_NORM_VAR].data && ((st = init_const(L, PEER_P_NORM_VAR, 1.0f)) ||
                                         (st = init_const(L, PEER_P_NORM_WEIGHT, 1.0f)))) {
    peer_layer_free(L);
    return st;
  }
  *out = L;
  return PEER_OK;
}

void peer_layer_free(peer_layer *L) {
  if (!L) return;
  for (int i = 0; i < PEER_P_COUNT; i++)
    if (L->slot[i].data) L->backend->free(L->slot[i].data, L->slot[i].nbytes);
  if (L->backend->close) L->backend->close(L);
  if (L->ws_owned) peer_free(L->ws, L->ws_bytes);
  peer_free(L->keys16.mem, L->keys16.bytes);
  peer_free(L->wq_blocks.mem, L->wq_blocks.bytes);
  free(L);
}

const peer_config *peer_layer_config(const peer_layer *L) { return L ? &L->cfg : NULL; }

peer_status peer_layer_set_threads(peer_layer *L, int n_threads) {
  if (!L) return peer_fail(PEER_ERR_INVALID_ARGUMENT, "set_threads: NULL layer");
  if (n_threads < 0)
    return peer_fail(PEER_ERR_INVALID_ARGUMENT, "n_threads: %d is negative", n_threads);
  L->opt.n_threads = n_threads;
  return PEER_OK;
}

int peer_layer_threads(const peer_layer *L) {
  if (!L) return 0;
  return L->opt.n_threads > 0 ? L->opt.n_threads : omp_get_max_threads();
}

int peer_layer_n_params(const peer_layer *L) { return L ? L->n_params : 0; }

/* A parameter handed out may be written in place at any time: derived copies
 * of it (keys16, wq_blocks) can no longer be trusted. */
static void note_exposed(peer_layer *L, int slot) {
  if (slot == PEER_P_KEYS) L->keys_exposed = true;
  if (slot == PEER_P_QUERY_WEIGHT) L->query_exposed = true;
}

peer_status peer_layer_param(peer_layer *L, int i, peer_tensor *out) {
  if (!L || !out) return peer_fail(PEER_ERR_INVALID_ARGUMENT, "layer_param: NULL argument");
  if (i < 0 || i >= L->n_params)
    return peer_fail(PEER_ERR_INVALID_ARGUMENT, "layer_param: index %d not in [0, %d)", i,
                     L->n_params);
  *out = L->slot[L->param_slot[i]];
  note_exposed(L, L->param_slot[i]);
  return PEER_OK;
}

peer_status peer_layer_param_by_name(peer_layer *L, const char *name, peer_tensor *out) {
  if (!L || !name || !out)
    return peer_fail(PEER_ERR_INVALID_ARGUMENT, "layer_param_by_name: NULL argument");
  for (int i = 0; i < L->n_params; i++) {
    const peer_tensor *t = &L->slot[L->param_slot[i]];
    if (strcmp(t->name, name) == 0) {
      *out = *t;
      note_exposed(L, L->param_slot[i]);
      return PEER_OK;
    }
  }
  return peer_fail(PEER_ERR_INVALID_ARGUMENT, "layer has no parameter named '%s'", name);
}

int64_t peer_layer_n_parameters(const peer_layer *L) {
  int64_t total = 0;
  for (int i = 0; L && i < L->n_params; i++) {
    const peer_tensor *t = &L->slot[L->param_slot[i]];
    total += (int64_t)(t->nbytes / peer_dtype_size(t->dtype));
  }
  return total;
}

int64_t peer_layer_n_active_parameters(const peer_layer *L) {
  if (!L) return 0;
  const peer_dims *D = &L->dims;
  int64_t dense = peer_layer_n_parameters(L) - 2 * D->N * D->d;
  return dense + 2 * D->H * D->k * D->d;
}

/* ------------------------------------------------------------------ init */

/* Counter-based generator: element i of parameter p is a pure function of
 * (seed, p, i), so initialisation is parallel and thread-count independent. */
static inline uint64_t mix64(uint64_t z) {
  z += 0x9e3779b97f4a7c15ull;
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

static inline float uniform_pm(uint64_t seed, uint64_t stream, uint64_t i, float a) {
  uint64_t r = mix64(mix64(seed ^ (stream << 56)) + i);
  float u = (float)(r >> 40) * (1.0f / 16777216.0f); /* [0, 1) in 24 bits */
  return (2.0f * u - 1.0f) * a;
}


/* Element i of a tensor that holds columns [col0, col0 + cols) of a full one
 * with `width` columns gets the full tensor's value there (a shard's expert
 * tables, peer_layer_create_cols); cols == width is the whole tensor. */
static inline uint64_t full_index(int64_t i, int64_t col0, int64_t cols, int64_t width) {
  return cols == width ? (uint64_t)i : (uint64_t)((i / cols) * width + col0 + i % cols);
}

typedef struct {
  void *dst;
  bool bf16;
  uint64_t seed, stream;
  float a;
  int64_t col0, cols, width;
} fill_job;

static void fill_range(void *job, int64_t i0, int64_t i1, int slot) {
  const fill_job *j = job;
  (void)slot;
  if (j->bf16) {
    uint16_t *p = j->dst;
    for (int64_t i = i0; i < i1; i++)
      p[i] = peer_f32_to_bf16(
          uniform_pm(j->seed, j->stream, full_index(i, j->col0, j->cols, j->width), j->a));
  } else {
    float *p = j->dst;
    for (int64_t i = i0; i < i1; i++)
      p[i] = uniform_pm(j->seed, j->stream, full_index(i, j->col0, j->cols, j->width), j->a);
  }
}

static void fill_uniform(const peer_tensor *t, void *dst, uint64_t seed, uint64_t stream,
                         float a, int P, int64_t col0, int64_t cols, int64_t width) {
  int64_t count = (int64_t)(t->nbytes / peer_dtype_size(t->dtype));
  fill_job j = {dst, t->dtype == PEER_BF16, seed, stream, a, col0, cols, width};
  peer_parallel_ranges(P, count, 1 << 16, fill_range, &j);
}

static void fill_const(const peer_tensor *t, void *dst, float v) {
  float *p = dst;
  for (int64_t i = 0; i < t->shape[0]; i++) p[i] = v;
}

/* A backend whose parameters are not host memory (upload != NULL) is filled
 * through a host staging copy, one tensor at a time. */
static void *param_begin(const peer_layer *L, const peer_tensor *t) {
  return L->backend->upload ? peer_alloc(t->nbytes) : t->data;
}

static peer_status param_end(peer_layer *L, const peer_tensor *t, void *host) {
  if (!L->backend->upload) return PEER_OK;
  peer_status st = L->backend->upload(L, t->data, host, t->nbytes);
  peer_free(host, t->nbytes);
  return st;
}

static peer_status init_uniform(peer_layer *L, int slot, uint64_t seed, uint64_t stream, float a,
                                int P) {
  const peer_tensor *t = &L->slot[slot];
  void *host = param_begin(L, t);
  if (!host)
    return peer_fail(PEER_ERR_OUT_OF_MEMORY, "layer_init: cannot stage %s (%zu bytes)", t->name,
                     t->nbytes);
  bool expert = slot == PEER_P_EXPERTS_DOWN || slot == PEER_P_EXPERTS_UP;
  if (expert) fill_uniform(t, host, seed, stream, a, P, L->expert_col0, L->expert_cols, L->dims.d);
  else fill_uniform(t, host, seed, stream, a, P, 0, 1, 1);
  return param_end(L, t, host);
}

static peer_status init_const(peer_layer *L, int slot, float v) {
  const peer_tensor *t = &L->slot[slot];
  void *host = param_begin(L, t);
  if (!host)
    return peer_fail(PEER_ERR_OUT_OF_MEMORY, "layer_init: cannot stage %s (%zu bytes)", t->name,
                     t->nbytes);
  fill_const(t, host, v);
  return param_end(L, t, host);
}

static peer_status layer_init(peer_layer *L, uint64_t seed);

peer_status peer_layer_init(peer_layer *L, uint64_t seed) {
  if (!L) return peer_fail(PEER_ERR_INVALID_ARGUMENT, "layer_init: NULL layer");
  peer_status st = peer_layer_enter(L, "layer_init");
  if (st) return st;
  st = layer_init(L, seed);
  peer_layer_leave(L);
  return st;
}

static peer_status layer_init(peer_layer *L, uint64_t seed) {
  const peer_dims *D = &L->dims;
  int P = peer_layer_threads(L);
  peer_status st;
  if ((st = init_uniform(L, PEER_P_QUERY_WEIGHT, seed, 1, 1.0f / sqrtf((float)D->d), P)) ||
      (st = init_uniform(L, PEER_P_KEYS, seed, 2, 1.0f / sqrtf((float)D->half), P)) ||
      (st = init_uniform(L, PEER_P_EXPERTS_DOWN, seed, 3, 1.0f / sqrtf((float)D->d), P)) ||
      (st = init_uniform(L, PEER_P_EXPERTS_UP, seed, 4, 1.0f / sqrtf((float)(D->H * D->k)), P)))
    return st;
  if (L->slot[PEER_P_QUERY_BIAS].data && (st = init_const(L, PEER_P_QUERY_BIAS, 0.0f))) return st;
  if (L->slot[PEER_P_NORM_WEIGHT].data &&
      ((st = init_const(L, PEER_P_NORM_WEIGHT, 1.0f)) ||
       (st = init_const(L, PEER_P_NORM_BIAS, 0.0f)) ||
       (st = init_const(L, PEER_P_NORM_MEAN, 0.0f)) || (st = init_const(L, PEER_P_NORM_VAR, 1.0f))))
    return st;
  return PEER_OK;
}

/* ------------------------------------------------------------- workspace */

peer_status peer_layer_workspace_size(const peer_layer *L, int64_t n_tokens, size_t *bytes) {
  if (!L || !bytes) return peer_fail(PEER_ERR_INVALID_ARGUMENT, "workspace_size: NULL argument");
  if (n_tokens < 0)
    return peer_fail(PEER_ERR_INVALID_ARGUMENT, "n_tokens: %lld is negative", (long long)n_tokens);
  *bytes = L->backend->workspace_size(L, n_tokens);
  return PEER_OK;
}

peer_status peer_layer_set_workspace(peer_layer *L, void *buffer, size_t bytes) {
  if (!L) return peer_fail(PEER_ERR_INVALID_ARGUMENT, "set_workspace: NULL layer");
  if (buffer && ((uintptr_t)buffer % 64))
    return peer_fail(PEER_ERR_INVALID_ARGUMENT, "set_workspace: buffer is not 64-byte aligned");
  peer_status st = peer_layer_enter(L, "set_workspace");
  if (st) return st;
  if (L->ws_owned) peer_free(L->ws, L->ws_bytes);
  L->ws = buffer;
  L->ws_bytes = buffer ? bytes : 0;
  L->ws_owned = false;
  peer_layer_leave(L);
  return PEER_OK;
}

peer_status peer_layer_scratch(peer_layer *L, int64_t n_tokens, void **ws) {
  size_t need = L->backend->workspace_size(L, n_tokens);
  if (need <= L->ws_bytes && L->ws) {
    *ws = L->ws;
    return PEER_OK;
  }
  if (L->ws && !L->ws_owned)
    return peer_fail(PEER_ERR_INVALID_ARGUMENT,
                     "workspace: %lld tokens need %zu bytes, the registered buffer has %zu",
                     (long long)n_tokens, need, L->ws_bytes);
  peer_free(L->ws, L->ws_bytes);
  L->ws = peer_alloc(need);
  L->ws_bytes = L->ws ? need : 0;
  L->ws_owned = true;
  if (!L->ws)
    return peer_fail(PEER_ERR_OUT_OF_MEMORY, "workspace: cannot allocate %zu bytes", need);
  *ws = L->ws;
  return PEER_OK;
}

/* -------------------------------------------------------------- forward */

static peer_status check_batch(const peer_layer *L, int64_t n_tokens, const void *x,
                               const char *what) {
  if (!L) return peer_fail(PEER_ERR_INVALID_ARGUMENT, "%s: NULL layer", what);
  if (n_tokens < 0)
    return peer_fail(PEER_ERR_INVALID_ARGUMENT, "%s: n_tokens %lld is negative", what,
                     (long long)n_tokens);
  if (n_tokens > 0 && !x) return peer_fail(PEER_ERR_INVALID_ARGUMENT, "%s: x is NULL", what);
  if (n_tokens > ((int64_t)1 << 40) / L->dims.d)
    return peer_fail(PEER_ERR_INVALID_ARGUMENT, "%s: n_tokens %lld too large", what,
                     (long long)n_tokens);
  return PEER_OK;
}

/* The caller's buffers of one call must not overlap: an output over an input
 * (y = x, in place) or over another output would be read after it is
 * written.  bufs[i] has bytes[i] bytes; NULL ones are skipped. */
static peer_status check_buffers(const char *what, int n, const void *const *bufs,
                                 const size_t *bytes, const char *const *names) {
  for (int i = 0; i < n; i++)
    for (int j = i + 1; j < n; j++) {
      peer_status st = peer_check_disjoint(what, bufs[i], bytes[i], names[i], bufs[j], bytes[j],
                                           names[j]);
      if (st) return st;
    }
  return PEER_OK;
}

peer_status peer_forward_check(const peer_layer *L, int64_t n_tokens, const float *x,
                               const float *y, const int64_t *indices, const float *gates,
                               const char *what) {
  peer_status st = check_batch(L, n_tokens, x, what);
  if (st) return st;
  if (n_tokens > 0 && !y) return peer_fail(PEER_ERR_INVALID_ARGUMENT, "%s: y is NULL", what);
  const size_t rows = (size_t)n_tokens * (size_t)L->dims.d * sizeof(float),
               thk = (size_t)n_tokens * (size_t)(L->dims.H * L->dims.k);
  const void *bufs[] = {x, y, indices, gates};
  const size_t bytes[] = {rows, rows, thk * sizeof *indices, thk * sizeof *gates};
  const char *names[] = {"x", "y", "indices", "gates"};
  return check_buffers(what, 4, bufs, bytes, names);
}

peer_status peer_forward(peer_layer *L, int64_t n_tokens, const float *x, float *y,
                         int64_t *indices, float *gates) {
  peer_status st = peer_forward_check(L, n_tokens, x, y, indices, gates, "forward");
  if (st || n_tokens == 0) return st;
  if ((st = peer_layer_enter(L, "forward"))) return st;
  void *ws;
  if (!(st = peer_layer_scratch(L, n_tokens, &ws)))
    st = L->backend->forward(L, n_tokens, x, y, indices, gates, ws);
  peer_layer_leave(L);
  return st;
}

static peer_status retrieve_args(const peer_layer *L, int64_t n_tokens, const float *x,
                                 const int64_t *indices, const float *scores, const float *gates,
                                 const char *what) {
  peer_status st = check_batch(L, n_tokens, x, what);
  if (st) return st;
  if (n_tokens > 0 && !indices)
    return peer_fail(PEER_ERR_INVALID_ARGUMENT, "%s: indices is NULL", what);
  const size_t thk = (size_t)n_tokens * (size_t)(L->dims.H * L->dims.k);
  const void *bufs[] = {x, indices, scores, gates};
  const size_t bytes[] = {(size_t)n_tokens * (size_t)L->dims.d * sizeof *x, thk * sizeof *indices,
                          thk * sizeof *scores, thk * sizeof *gates};
  const char *names[] = {"x", "indices", "scores", "gates"};
  return check_buffers(what, 4, bufs, bytes, names);
}

static peer_status retrieve_run(peer_layer *L, int64_t n_tokens, const float *x, int64_t *indices,
                                float *scores, float *gates, bool brute) {
  void *ws;
  peer_status st = peer_layer_scratch(L, n_tokens, &ws);
  return st ? st : L->backend->retrieve(L, n_tokens, x, indices, scores, gates, brute, ws);
}

static peer_status retrieve(peer_layer *L, int64_t n_tokens, const float *x, int64_t *indices,
                            float *scores, float *gates, bool brute) {
  const char *what = brute ? "retrieve_brute" : "retrieve";
  peer_status st = retrieve_args(L, n_tokens, x, indices, scores, gates, what);
  if (st || n_tokens == 0) return st;
  if ((st = peer_layer_enter(L, what))) return st;
  st = retrieve_run(L, n_tokens, x, indices, scores, gates, brute);
  peer_layer_leave(L);
  return st;
}

peer_status peer_retrieve_held(peer_layer *L, int64_t n_tokens, const float *x, int64_t *indices,
                               float *scores, float *gates) {
  peer_status st = retrieve_args(L, n_tokens, x, indices, scores, gates, "retrieve");
  if (st || n_tokens == 0) return st;
  return retrieve_run(L, n_tokens, x, indices, scores, gates, false);
}

peer_status peer_retrieve(peer_layer *L, int64_t n_tokens, const float *x, int64_t *indices,
                          float *scores, float *gates) {
  return retrieve(L, n_tokens, x, indices, scores, gates, false);
}

peer_status peer_retrieve_brute(peer_layer *L, int64_t n_tokens, const float *x, int64_t *indices,
                                float *scores, float *gates) {
  return retrieve(L, n_tokens, x, indices, scores, gates, true);
}
