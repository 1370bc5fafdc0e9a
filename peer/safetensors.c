/* safetensors.c: reading and writing safetensors files (8-byte little-endian
 * header length, a JSON header, raw data), for weight files and activation
 * files alike.  The reader distrusts every number in the file: lengths,
 * offsets and shapes are checked against the file size and each other before
 * anything is read, and tensors are read on request with pread so that a
 * large file is never mapped or buffered whole; what is not a regular file
 * (a FIFO, a device) is refused at open without blocking.  The writer is
 * atomic: a temporary file of a unique name beside the target, synced, then
 * renamed over it, and the directory synced; see write_atomic. */
#include "internal.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <jansson.h>
#include <limits.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/random.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

/* A header larger than this is an attack or corruption, not a real file:
 * even a million tensors fit in far less. */
#define HEADER_MAX ((uint64_t)100 << 20)
/* peer_tensor holds this many dimensions. */
#define NDIM_MAX 4
/* The metadata entry of the header, not a tensor. */
#define METADATA_KEY "__metadata__"

typedef struct st_entry {
  const char *name; /* owned by the JSON root */
  peer_dtype dtype;
  int ndim;
  int64_t shape[NDIM_MAX];
  uint64_t begin, end; /* relative to the data section */
} st_entry;

struct peer_safetensors {
  int fd;
  char *path;
  json_t *root; /* owns every name and metadata string handed out */
  uint64_t data_start, data_size;
  int n;
  st_entry *entries; /* in header order */
  json_t *metadata;  /* borrowed from root; NULL when the file has none */
};

/* The data is raw little-endian; this code reads and writes it as-is. */
static bool host_is_little_endian(void) {
  const uint16_t one = 1;
  uint8_t first;
  memcpy(&first, &one, 1);
  return first == 1;
}

/* Read exactly n bytes at off.  0 on success, an errno value on failure, -1
 * when the file ends first. */
static int pread_full(int fd, void *dst, size_t n, uint64_t off) {
  char *p = dst;
  while (n > 0) {
    ssize_t got = pread(fd, p, n, (off_t)off);
    if (got < 0) {
      if (errno == EINTR) continue;
      return errno;
    }
    if (got == 0) return -1;
    p += got;
    n -= (size_t)got;
    off += (uint64_t)got;
  }
  return 0;
}

static peer_status read_error(const char *path, const char *what, int err) {
  if (err < 0)
    return peer_fail(PEER_ERR_IO, "%s: file ended while reading %s (changed since it was opened?)",
                     path, what);
  return peer_fail(PEER_ERR_IO, "%s: cannot read %s: %s", path, what, strerror(err));
}

/* "[4, 2, 8, 4]" into buf. */
static void format_shape(char *buf, size_t size, int ndim, const int64_t *shape) {
  size_t used = (size_t)snprintf(buf, size, "[");
  for (int i = 0; i < ndim && used < size; i++)
    used += (size_t)snprintf(buf + used, size - used, i ? ", %lld" : "%lld", (long long)shape[i]);
  if (used < size) snprintf(buf + used, size - used, "]");
}

void peer_tensor_format_layout(char *buf, size_t size, const peer_tensor *t) {
  int used = snprintf(buf, size, "%s ", peer_dtype_name(t->dtype));
  if (used > 0 && (size_t)used < size)
    format_shape(buf + used, size - (size_t)used, t->ndim, t->shape);
}

bool peer_tensor_same_layout(const peer_tensor *a, const peer_tensor *b) {
  if (a->dtype != b->dtype || a->ndim != b->ndim) return false;
  for (int i = 0; i < a->ndim; i++)
    if (a->shape[i] != b->shape[i]) return false;
  return true;
}

static bool parse_dtype(const char *s, peer_dtype *out) {
  const peer_dtype all[] = {PEER_F32, PEER_BF16, PEER_I64};
  for (size_t i = 0; i < sizeof all / sizeof all[0]; i++)
    if (strcmp(s, peer_dtype_name(all[i])) == 0) {
      *out = all[i];
      return true;
    }
  return false;
}

static bool is_count(const json_t *v) { return json_is_integer(v) && json_integer_value(v) >= 0; }

/* Bytes a tensor of this shape and dtype occupies; false on overflow. */
static bool tensor_bytes(peer_dtype dtype, int ndim, const int64_t *shape, size_t *out) {
  size_t bytes = peer_dtype_size(dtype);
  for (int i = 0; i < ndim; i++)
    if (shape[i] < 0 || !peer_mul_size(bytes, (size_t)shape[i], &bytes)) return false;
  *out = bytes;
  return true;
}

/* One tensor description: {"dtype": .., "shape": [..], "data_offsets": [b, e]}. */
static peer_status parse_entry(const peer_safetensors *f, const char *name, json_t *desc,
                               st_entry *e) {
  const char *path = f->path;
  e->name = name;
  if (!json_is_object(desc))
    return peer_fail(PEER_ERR_FORMAT, "%s: tensor '%s': description is not a JSON object", path,
                     name);
  json_t *dtype = json_object_get(desc, "dtype");
  if (!json_is_string(dtype))
    return peer_fail(PEER_ERR_FORMAT, "%s: tensor '%s': dtype is missing or not a string", path,
                     name);
  if (!parse_dtype(json_string_value(dtype), &e->dtype))
    return peer_fail(PEER_ERR_FORMAT,
                     "%s: tensor '%s': dtype '%s' is not supported (F32, BF16 or I64)", path, name,
                     json_string_value(dtype));

  json_t *shape = json_object_get(desc, "shape");
  if (!json_is_array(shape))
    return peer_fail(PEER_ERR_FORMAT, "%s: tensor '%s': shape is missing or not an array", path,
                     name);
  if (json_array_size(shape) > NDIM_MAX)
    return peer_fail(PEER_ERR_FORMAT,
                     "%s: tensor '%s': shape has %zu dimensions; peer handles at most %d", path,
                     name, json_array_size(shape), NDIM_MAX);
  e->ndim = (int)json_array_size(shape);
  for (int i = 0; i < e->ndim; i++) {
    json_t *dim = json_array_get(shape, (size_t)i);
    if (!is_count(dim))
      return peer_fail(PEER_ERR_FORMAT,
                       "%s: tensor '%s': shape entry %d is not a non-negative integer", path, name,
                       i);
    e->shape[i] = json_integer_value(dim);
  }

  json_t *offsets = json_object_get(desc, "data_offsets");
  if (!json_is_array(offsets) || json_array_size(offsets) != 2 ||
      !is_count(json_array_get(offsets, 0)) || !is_count(json_array_get(offsets, 1)))
    return peer_fail(PEER_ERR_FORMAT,
                     "%s: tensor '%s': data_offsets is not [begin, end] of non-negative integers",
                     path, name);
  e->begin = (uint64_t)json_integer_value(json_array_get(offsets, 0));
  e->end = (uint64_t)json_integer_value(json_array_get(offsets, 1));
  if (e->begin > e->end)
    return peer_fail(PEER_ERR_FORMAT,
                     "%s: tensor '%s': data_offsets [%llu, %llu]: begin is after end", path, name,
                     (unsigned long long)e->begin, (unsigned long long)e->end);
  if (e->end > f->data_size)
    return peer_fail(
        PEER_ERR_FORMAT,
        "%s: truncated: tensor '%s': data_offsets [%llu, %llu] run past the end of the "
        "data (%llu bytes)",
        path, name, (unsigned long long)e->begin, (unsigned long long)e->end,
        (unsigned long long)f->data_size);

  char dims[128];
  format_shape(dims, sizeof dims, e->ndim, e->shape);
  size_t bytes;
  if (!tensor_bytes(e->dtype, e->ndim, e->shape, &bytes))
    return peer_fail(PEER_ERR_FORMAT, "%s: tensor '%s': shape %s overflows the size arithmetic",
                     path, name, dims);
  if (bytes != e->end - e->begin)
    return peer_fail(PEER_ERR_FORMAT,
                     "%s: tensor '%s': shape %s of %s needs %zu bytes but data_offsets [%llu, "
                     "%llu] hold %llu (size mismatch)",
                     path, name, dims, peer_dtype_name(e->dtype), bytes,
                     (unsigned long long)e->begin, (unsigned long long)e->end,
                     (unsigned long long)(e->end - e->begin));
  return PEER_OK;
}

static peer_status parse_metadata(const peer_safetensors *f, json_t *meta) {
  if (!json_is_object(meta))
    return peer_fail(PEER_ERR_FORMAT, "%s: %s is not a JSON object", f->path, METADATA_KEY);
  const char *key;
  json_t *value;
  json_object_foreach(meta, key, value) {
    if (!json_is_string(value))
      return peer_fail(PEER_ERR_FORMAT, "%s: metadata '%s' is not a string", f->path, key);
  }
  return PEER_OK;
}

static int by_offset(const void *pa, const void *pb) {
  const st_entry *a = *(const st_entry *const *)pa, *b = *(const st_entry *const *)pb;
  if (a->begin != b->begin) return a->begin < b->begin ? -1 : 1;
  return (a->end > b->end) - (a->end < b->end);
}

/* Tensors may leave gaps but never share a byte; empty tensors own no bytes. */
static peer_status check_overlaps(const peer_safetensors *f) {
  if (f->n < 2) return PEER_OK;
  const st_entry **order = malloc((size_t)f->n * sizeof *order);
  if (!order) return peer_fail(PEER_ERR_OUT_OF_MEMORY, "%s: out of memory", f->path);
  for (int i = 0; i < f->n; i++)
    order[i] = &f->entries[i];
  qsort(order, (size_t)f->n, sizeof *order, by_offset);
  peer_status st = PEER_OK;
  const st_entry *prev = NULL;
  for (int i = 0; i < f->n && !st; i++) {
    const st_entry *e = order[i];
    if (e->begin == e->end) continue;
    if (prev && e->begin < prev->end)
      st = peer_fail(PEER_ERR_FORMAT, "%s: tensors '%s' [%llu, %llu] and '%s' [%llu, %llu] overlap",
                     f->path, prev->name, (unsigned long long)prev->begin,
                     (unsigned long long)prev->end, e->name, (unsigned long long)e->begin,
                     (unsigned long long)e->end);
    prev = e;
  }
  free(order);
  return st;
}

static peer_status parse_header(peer_safetensors *f, uint64_t file_size) {
  const char *path = f->path;
  if (file_size < 8)
    return peer_fail(PEER_ERR_FORMAT,
                     "%s: file is %llu bytes, too short for the 8-byte header length", path,
                     (unsigned long long)file_size);
  unsigned char raw[8];
  int err = pread_full(f->fd, raw, 8, 0);
  if (err) return read_error(path, "the header length", err);
  uint64_t hlen = 0;
  for (int i = 7; i >= 0; i--)
    hlen = (hlen << 8) | raw[i];
  if (hlen > file_size - 8)
    return peer_fail(PEER_ERR_FORMAT,
                     "%s: truncated: header length %llu runs past the end of the file (%llu bytes)",
                     path, (unsigned long long)hlen, (unsigned long long)file_size);
  if (hlen > HEADER_MAX)
    return peer_fail(PEER_ERR_FORMAT, "%s: header length %llu is absurd (limit %llu bytes)", path,
                     (unsigned long long)hlen, (unsigned long long)HEADER_MAX);
  f->data_start = 8 + hlen;
  f->data_size = file_size - f->data_start;

  char *text = malloc(hlen ? (size_t)hlen : 1);
  if (!text) return peer_fail(PEER_ERR_OUT_OF_MEMORY, "%s: cannot allocate the header", path);
  err = pread_full(f->fd, text, (size_t)hlen, 8);
  if (err) {
    free(text);
    return read_error(path, "the header", err);
  }
  json_error_t jerr;
  f->root = json_loadb(text, (size_t)hlen, JSON_REJECT_DUPLICATES, &jerr);
  free(text);
  if (!f->root)
    return peer_fail(PEER_ERR_FORMAT, "%s: header is not valid JSON: %s (at byte %d)", path,
                     jerr.text, jerr.position);
  if (!json_is_object(f->root))
    return peer_fail(PEER_ERR_FORMAT, "%s: header is not a JSON object", path);

  f->metadata = json_object_get(f->root, METADATA_KEY);
  size_t n = json_object_size(f->root) - (f->metadata ? 1 : 0);
  f->entries = calloc(n ? n : 1, sizeof *f->entries);
  if (!f->entries) return peer_fail(PEER_ERR_OUT_OF_MEMORY, "%s: out of memory", path);
  const char *key;
  json_t *value;
  json_object_foreach(f->root, key, value) {
    peer_status st = strcmp(key, METADATA_KEY) == 0
                         ? parse_metadata(f, value)
                         : parse_entry(f, key, value, &f->entries[f->n++]);
    if (st) return st;
  }
  return check_overlaps(f);
}

peer_status peer_safetensors_open(peer_safetensors **out, const char *path) {
  if (!out || !path) return peer_fail(PEER_ERR_INVALID_ARGUMENT, "safetensors_open: NULL argument");
  *out = NULL;
  if (!host_is_little_endian())
    return peer_fail(PEER_ERR_UNSUPPORTED, "%s: safetensors needs a little-endian host", path);
  peer_safetensors *f = calloc(1, sizeof *f);
  if (!f || !(f->path = strdup(path))) {
    free(f);
    return peer_fail(PEER_ERR_OUT_OF_MEMORY, "%s: out of memory", path);
  }
  /* O_NONBLOCK: opening a FIFO must not wait for a writer; what is not a
   * regular file is refused below, before any read. */
  f->fd = open(path, O_RDONLY | O_CLOEXEC | O_NONBLOCK);
  peer_status st = PEER_OK;
  struct stat sb;
  if (f->fd < 0)
    st = peer_fail(PEER_ERR_IO, "%s: cannot open: %s", path, strerror(errno));
  else if (fstat(f->fd, &sb) != 0)
    st = peer_fail(PEER_ERR_IO, "%s: cannot stat: %s", path, strerror(errno));
  else if (!S_ISREG(sb.st_mode))
    st = peer_fail(PEER_ERR_IO, "%s: not a regular file (%s)", path,
                   S_ISDIR(sb.st_mode)                          ? "a directory"
                   : S_ISFIFO(sb.st_mode)                       ? "a FIFO"
                   : S_ISCHR(sb.st_mode) || S_ISBLK(sb.st_mode) ? "a device"
                                                                : "a socket");
  else
    st = parse_header(f, (uint64_t)sb.st_size);
  if (st) {
    peer_safetensors_close(f);
    return st;
  }
  *out = f;
  return PEER_OK;
}

void peer_safetensors_close(peer_safetensors *f) {
  if (!f) return;
  if (f->fd >= 0) close(f->fd);
  json_decref(f->root);
  free(f->entries);
  free(f->path);
  free(f);
}

int peer_safetensors_count(const peer_safetensors *f) { return f ? f->n : 0; }

uint64_t peer_safetensors_data_bytes(const peer_safetensors *f) { return f ? f->data_size : 0; }

static void describe(const st_entry *e, peer_tensor *out) {
  memset(out, 0, sizeof *out);
  out->name = e->name;
  out->dtype = e->dtype;
  out->ndim = e->ndim;
  memcpy(out->shape, e->shape, sizeof e->shape);
  out->nbytes = (size_t)(e->end - e->begin);
}

peer_status peer_safetensors_info(const peer_safetensors *f, int i, peer_tensor *out) {
  if (!f || !out) return peer_fail(PEER_ERR_INVALID_ARGUMENT, "safetensors_info: NULL argument");
  if (i < 0 || i >= f->n)
    return peer_fail(PEER_ERR_INVALID_ARGUMENT, "%s: tensor index %d not in [0, %d)", f->path, i,
                     f->n);
  describe(&f->entries[i], out);
  return PEER_OK;
}

static const st_entry *lookup(const peer_safetensors *f, const char *name) {
  for (int i = 0; i < f->n; i++)
    if (strcmp(f->entries[i].name, name) == 0) return &f->entries[i];
  return NULL;
}

peer_status peer_safetensors_find(const peer_safetensors *f, const char *name, peer_tensor *out) {
  if (!f || !name || !out)
    return peer_fail(PEER_ERR_INVALID_ARGUMENT, "safetensors_find: NULL argument");
  const st_entry *e = lookup(f, name);
  if (!e) return peer_fail(PEER_ERR_FORMAT, "%s: no tensor named '%s' (missing)", f->path, name);
  describe(e, out);
  return PEER_OK;
}

peer_status peer_safetensors_read(const peer_safetensors *f, const char *name, void *dst,
                                  size_t dst_bytes) {
  if (!f || !name) return peer_fail(PEER_ERR_INVALID_ARGUMENT, "safetensors_read: NULL argument");
  const st_entry *e = lookup(f, name);
  if (!e) return peer_fail(PEER_ERR_FORMAT, "%s: no tensor named '%s' (missing)", f->path, name);
  size_t bytes = (size_t)(e->end - e->begin);
  if (dst_bytes != bytes)
    return peer_fail(PEER_ERR_INVALID_ARGUMENT,
                     "%s: tensor '%s' has %zu bytes, the destination %zu", f->path, name, bytes,
                     dst_bytes);
  if (bytes == 0) return PEER_OK;
  if (!dst) return peer_fail(PEER_ERR_INVALID_ARGUMENT, "safetensors_read: dst is NULL");
  int err = pread_full(f->fd, dst, bytes, f->data_start + e->begin);
  if (err) {
    char what[300];
    snprintf(what, sizeof what, "tensor '%s'", name);
    return read_error(f->path, what, err);
  }
  return PEER_OK;
}

const char *peer_safetensors_metadata(const peer_safetensors *f, const char *key) {
  if (!f || !key || !f->metadata) return NULL;
  return json_string_value(json_object_get(f->metadata, key));
}

/* ------------------------------------------------------------------ write */

static peer_status check_tensor_arg(const peer_tensor *t, int i) {
  if (!t->name)
    return peer_fail(PEER_ERR_INVALID_ARGUMENT, "safetensors_write: tensor %d has no name", i);
  if (strcmp(t->name, METADATA_KEY) == 0)
    return peer_fail(PEER_ERR_INVALID_ARGUMENT, "safetensors_write: '%s' is reserved", t->name);
  if (t->dtype != PEER_F32 && t->dtype != PEER_BF16 && t->dtype != PEER_I64)
    return peer_fail(PEER_ERR_INVALID_ARGUMENT, "safetensors_write: tensor '%s': unknown dtype %d",
                     t->name, (int)t->dtype);
  if (t->ndim < 0 || t->ndim > NDIM_MAX)
    return peer_fail(PEER_ERR_INVALID_ARGUMENT,
                     "safetensors_write: tensor '%s': ndim %d not in [0, %d]", t->name, t->ndim,
                     NDIM_MAX);
  size_t bytes;
  if (!tensor_bytes(t->dtype, t->ndim, t->shape, &bytes) || bytes > (size_t)INT64_MAX)
    return peer_fail(PEER_ERR_INVALID_ARGUMENT,
                     "safetensors_write: tensor '%s': negative or overflowing shape", t->name);
  if (bytes != t->nbytes) {
    char dims[128];
    format_shape(dims, sizeof dims, t->ndim, t->shape);
    return peer_fail(
        PEER_ERR_SHAPE,
        "safetensors_write: tensor '%s': shape %s of %s needs %zu bytes, nbytes is %zu", t->name,
        dims, peer_dtype_name(t->dtype), bytes, t->nbytes);
  }
  if (bytes > 0 && !t->data)
    return peer_fail(PEER_ERR_INVALID_ARGUMENT, "safetensors_write: tensor '%s': data is NULL",
                     t->name);
  return PEER_OK;
}

/* The header object: metadata first, then the tensors in the order given,
 * laid out back to back.  *bad_arg is set when the failure is the caller's
 * (duplicate name, invalid UTF-8) rather than memory. */
static json_t *build_header(const peer_tensor *tensors, int n_tensors, const char *const *meta,
                            int n_meta_pairs, bool *bad_arg) {
  json_t *root = json_object();
  if (!root) return NULL;
  if (n_meta_pairs > 0) {
    json_t *m = json_object();
    if (json_object_set_new(root, METADATA_KEY, m)) goto fail;
    for (int i = 0; i < n_meta_pairs; i++) {
      if (json_object_get(m, meta[2 * i])) {
        *bad_arg = true;
        goto fail;
      }
      /* set_new takes the value even when it fails */
      json_t *v = json_string(meta[2 * i + 1]);
      if (!v || json_object_set_new(m, meta[2 * i], v)) {
        *bad_arg = true;
        goto fail;
      }
    }
  }
  uint64_t offset = 0;
  for (int i = 0; i < n_tensors; i++) {
    const peer_tensor *t = &tensors[i];
    if (json_object_get(root, t->name)) {
      *bad_arg = true;
      goto fail;
    }
    json_t *shape = json_array();
    for (int d = 0; shape && d < t->ndim; d++)
      if (json_array_append_new(shape, json_integer(t->shape[d]))) {
        json_decref(shape);
        goto fail;
      }
    /* "o" steals the shape even when packing fails. */
    json_t *desc =
        json_pack("{s:s, s:o, s:[I, I]}", "dtype", peer_dtype_name(t->dtype), "shape", shape,
                  "data_offsets", (json_int_t)offset, (json_int_t)(offset + t->nbytes));
    if (!desc) goto fail;
    if (json_object_set_new(root, t->name, desc)) {
      *bad_arg = true;
      goto fail;
    }
    offset += t->nbytes;
  }
  return root;
fail:
  json_decref(root);
  return NULL;
}

/* ----------------------------------------------------------- atomic writer
 *
 * A save writes `<path>.peer-tmp.<pid>.<random>` beside the destination:
 * created with O_CREAT | O_EXCL | O_NOFOLLOW (a planted file or symlink of
 * that name is never written through), locked with flock while in use,
 * written, fsync'ed, renamed over the destination, and the directory
 * fsync'ed.  Every failure removes it.  Concurrent saves to one path each
 * have their own temporary; the last rename wins and the file is always one
 * whole save.  A temporary a killed process left (its pid gone and its lock
 * free) is removed by the next save to the same destination.
 *
 * The destination: absent, or a regular file that is writable (mode bits
 * and access()); a symbolic link, a directory, a device, a FIFO or a socket
 * is refused, and so is a read-only file, even for root.  A replaced file
 * keeps its permission bits. */

#define TMP_TAG ".peer-tmp."

/* Saves in progress in this process, for peer_remove_temporaries (called
 * from a signal handler: the path is complete before its slot is marked). */
#define ACTIVE_MAX 16
static atomic_int active_used[ACTIVE_MAX];
static char active_path[ACTIVE_MAX][PATH_MAX];

static int active_claim(const char *tmp) {
  if (strlen(tmp) >= PATH_MAX) return -1;
  for (int i = 0; i < ACTIVE_MAX; i++) {
    int expected = 0;
    if (atomic_compare_exchange_strong(&active_used[i], &expected, 2)) {
      strcpy(active_path[i], tmp);
      atomic_store(&active_used[i], 1);
      return i;
    }
  }
  return -1; /* more saves at once than slots: only stale cleanup covers the rest */
}

static void active_release(int i) {
  if (i >= 0) atomic_store(&active_used[i], 0);
}

int peer_remove_temporaries(void) {
  int removed = 0;
  for (int i = 0; i < ACTIVE_MAX; i++)
    if (atomic_load(&active_used[i]) == 1 && unlink(active_path[i]) == 0) removed++;
  return removed;
}

static peer_status check_destination(const char *path, mode_t *mode, bool *exists) {
  struct stat sb;
  *exists = false;
  if (lstat(path, &sb) != 0) {
    if (errno == ENOENT) return PEER_OK;
    return peer_fail(PEER_ERR_IO, "%s: cannot stat the destination: %s", path, strerror(errno));
  }
  if (S_ISLNK(sb.st_mode))
    return peer_fail(PEER_ERR_IO,
                     "%s: the destination is a symbolic link; refusing to replace it (save to "
                     "the path it points to)",
                     path);
  if (!S_ISREG(sb.st_mode))
    return peer_fail(PEER_ERR_IO,
                     "%s: the destination is not a regular file (%s); refusing to replace it", path,
                     S_ISDIR(sb.st_mode)                          ? "a directory"
                     : S_ISCHR(sb.st_mode) || S_ISBLK(sb.st_mode) ? "a device"
                     : S_ISFIFO(sb.st_mode)                       ? "a FIFO"
                                                                  : "a socket");
  if (!(sb.st_mode & 0222) || access(path, W_OK) != 0)
    return peer_fail(PEER_ERR_IO,
                     "%s: the destination is read-only; refusing to replace it (make it "
                     "writable or remove it first)",
                     path);
  *mode = sb.st_mode & 07777;
  *exists = true;
  return PEER_OK;
}

/* Split path into its directory ("." when none) and base name. */
static bool split_path(const char *path, char *dir, char *base) {
  const char *slash = strrchr(path, '/');
  const char *b = slash ? slash + 1 : path;
  size_t dlen = slash ? (size_t)(slash - path) : 0;
  if (dlen + 2 > PATH_MAX || strlen(b) + 1 > NAME_MAX + 1 || !*b) return false;
  if (!slash)
    strcpy(dir, ".");
  else if (dlen == 0)
    strcpy(dir, "/");
  else {
    memcpy(dir, path, dlen);
    dir[dlen] = '\0';
  }
  strcpy(base, b);
  return true;
}

/* Remove temporaries of this destination whose writer is gone: another
 * process's (never this one's: its saves are alive or cleaned up), whose
 * pid no longer exists, and whose lock nobody holds.  Best effort: a
 * failure here never fails the save. */
static void remove_stale(const char *dir, const char *base) {
  DIR *d = opendir(dir);
  if (!d) return;
  const size_t blen = strlen(base), tlen = strlen(TMP_TAG);
  struct dirent *e;
  while ((e = readdir(d))) {
    const char *name = e->d_name;
    if (strncmp(name, base, blen) != 0 || strncmp(name + blen, TMP_TAG, tlen) != 0) continue;
    char *end = NULL;
    long pid = strtol(name + blen + tlen, &end, 10);
    if (pid <= 0 || !end || *end != '.' || pid == (long)getpid()) continue;
    if (kill((pid_t)pid, 0) == 0 || errno != ESRCH) continue; /* alive, or not ours to tell */
    int fd = openat(dirfd(d), name, O_RDONLY | O_NOFOLLOW | O_NONBLOCK | O_CLOEXEC);
    if (fd < 0) continue;
    struct stat sb;
    if (fstat(fd, &sb) == 0 && S_ISREG(sb.st_mode) && flock(fd, LOCK_EX | LOCK_NB) == 0)
      unlinkat(dirfd(d), name, 0);
    close(fd);
  }
  closedir(d);
}

/* Create a new temporary beside path; its name into tmp. */
static int create_temporary(const char *path, char *tmp, size_t size) {
  static atomic_uint_fast64_t counter;
  for (int attempt = 0; attempt < 100; attempt++) {
    uint64_t r = 0;
    if (getrandom(&r, sizeof r, GRND_NONBLOCK) != (ssize_t)sizeof r) {
      struct timespec ts;
      clock_gettime(CLOCK_MONOTONIC, &ts);
      r = ((uint64_t)ts.tv_nsec << 20) ^ (uint64_t)ts.tv_sec ^
          (atomic_fetch_add(&counter, 1) << 44);
    }
    int len = snprintf(tmp, size, "%s" TMP_TAG "%ld.%016llx", path, (long)getpid(),
                       (unsigned long long)r);
    if (len < 0 || (size_t)len >= size) {
      errno = ENAMETOOLONG;
      return -1;
    }
    int fd = open(tmp, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0666);
    if (fd >= 0) {
      flock(fd, LOCK_EX | LOCK_NB); /* a fresh name: nobody else holds it */
      return fd;
    }
    if (errno != EEXIST) return -1;
  }
  errno = EEXIST;
  return -1;
}

/* Write all n bytes; false with errno set otherwise. */
static bool write_full(int fd, const void *src, size_t n) {
  const char *p = src;
  while (n > 0) {
    ssize_t put = write(fd, p, n > ((size_t)1 << 30) ? ((size_t)1 << 30) : n);
    if (put < 0) {
      if (errno == EINTR) continue;
      return false;
    }
    p += put;
    n -= (size_t)put;
  }
  return true;
}

/* Header length, padded header, then the data. */
static bool write_contents(int fd, const char *header, size_t padded, const peer_tensor *tensors,
                           int n_tensors) {
  size_t len = strlen(header);
  char *head = malloc(8 + padded);
  if (!head) {
    errno = ENOMEM;
    return false;
  }
  for (int i = 0; i < 8; i++)
    head[i] = (char)(unsigned char)((uint64_t)padded >> (8 * i));
  memcpy(head + 8, header, len);
  memset(head + 8 + len, ' ', padded - len);
  bool ok = write_full(fd, head, 8 + padded);
  free(head);
  for (int i = 0; ok && i < n_tensors; i++)
    ok = write_full(fd, tensors[i].data, tensors[i].nbytes);
  return ok;
}

static peer_status write_atomic(const char *path, const char *header, size_t padded,
                                const peer_tensor *tensors, int n_tensors) {
  mode_t mode = 0;
  bool exists;
  peer_status st = check_destination(path, &mode, &exists);
  if (st) return st;
  char *dir = malloc(PATH_MAX), *base = malloc(NAME_MAX + 1), *tmp = malloc(PATH_MAX);
  if (!dir || !base || !tmp) {
    st = peer_fail(PEER_ERR_OUT_OF_MEMORY, "%s: out of memory", path);
    goto done;
  }
  if (!split_path(path, dir, base)) {
    st = peer_fail(PEER_ERR_IO, "%s: not a file path (or too long)", path);
    goto done;
  }
  remove_stale(dir, base);
  int fd = create_temporary(path, tmp, PATH_MAX);
  if (fd < 0) {
    st = peer_fail(PEER_ERR_IO, "%s: cannot create a temporary file beside it: %s", path,
                   strerror(errno));
    goto done;
  }
  int slot = active_claim(tmp);
  const char *step = "write";
  bool ok = (!exists || fchmod(fd, mode) == 0 || (step = "set the mode of", false)) &&
            (write_contents(fd, header, padded, tensors, n_tensors) || (step = "write", false)) &&
            (fsync(fd) == 0 || (step = "sync", false));
  int err = errno;
  if (close(fd) != 0 && ok) {
    ok = false;
    step = "close";
    err = errno;
  }
  if (ok && rename(tmp, path) != 0) {
    ok = false;
    step = "rename over it";
    err = errno;
  }
  if (!ok) {
    unlink(tmp);
    active_release(slot);
    st = peer_fail(PEER_ERR_IO, "%s: cannot %s the temporary %s: %s", path, step, tmp,
                   strerror(err));
    goto done;
  }
  active_release(slot);
  /* The rename is durable once the directory is synced. */
  int dfd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (dfd >= 0) {
    if (fsync(dfd) != 0 && errno != EINVAL)
      st = peer_fail(PEER_ERR_IO, "%s: written, but syncing its directory failed: %s", path,
                     strerror(errno));
    close(dfd);
  }
done:
  free(dir);
  free(base);
  free(tmp);
  return st;
}

peer_status peer_safetensors_write(const char *path, const peer_tensor *tensors, int n_tensors,
                                   const char *const *meta, int n_meta_pairs) {
  if (!path || n_tensors < 0 || (n_tensors > 0 && !tensors) || n_meta_pairs < 0 ||
      (n_meta_pairs > 0 && !meta))
    return peer_fail(PEER_ERR_INVALID_ARGUMENT, "safetensors_write: bad arguments");
  if (!host_is_little_endian())
    return peer_fail(PEER_ERR_UNSUPPORTED, "%s: safetensors needs a little-endian host", path);
  uint64_t total = 0;
  for (int i = 0; i < n_tensors; i++) {
    peer_status st = check_tensor_arg(&tensors[i], i);
    if (st) return st;
    total += tensors[i].nbytes;
    if (total > (uint64_t)INT64_MAX)
      return peer_fail(PEER_ERR_INVALID_ARGUMENT, "safetensors_write: tensors too large in total");
  }
  for (int i = 0; i < 2 * n_meta_pairs; i++)
    if (!meta[i])
      return peer_fail(PEER_ERR_INVALID_ARGUMENT, "safetensors_write: metadata entry %d is NULL",
                       i);

  bool bad_arg = false;
  json_t *root = build_header(tensors, n_tensors, meta, n_meta_pairs, &bad_arg);
  if (!root)
    return bad_arg ? peer_fail(PEER_ERR_INVALID_ARGUMENT,
                               "safetensors_write: duplicate name or invalid UTF-8 in a tensor "
                               "name or metadata entry")
                   : peer_fail(PEER_ERR_OUT_OF_MEMORY, "%s: cannot build the header", path);
  char *header = json_dumps(root, JSON_COMPACT);
  json_decref(root);
  if (!header) return peer_fail(PEER_ERR_OUT_OF_MEMORY, "%s: cannot build the header", path);
  /* Padding to 8 bytes keeps the data aligned in memory-mapping readers, as
   * the reference implementation does. */
  size_t padded = (strlen(header) + 7) & ~(size_t)7;
  peer_status st = write_atomic(path, header, padded, tensors, n_tensors);
  free(header);
  return st;
}
