/* safetensors.c: reading and writing safetensors files (8-byte little-endian
 * header length, a JSON header, raw data), for weight files and activation
 * files alike.  The reader distrusts every number in the file: lengths,
 * offsets and shapes are checked against the file size and each other before
 * anything is read, and tensors are read on request with pread so that a
 * large file is never mapped or buffered whole.  The writer is atomic: a
 * temporary file beside the target, synced, then renamed over it. */
#include "internal.h"

#include <errno.h>
#include <fcntl.h>
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
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
  if (used > 0 && (size_t)used < size) format_shape(buf + used, size - (size_t)used, t->ndim, t->shape);
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
    return peer_fail(PEER_ERR_FORMAT,
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
                     path,
                     (unsigned long long)hlen, (unsigned long long)file_size);
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
  f->fd = open(path, O_RDONLY | O_CLOEXEC);
  peer_status st = PEER_OK;
  struct stat sb;
  if (f->fd < 0)
    st = peer_fail(PEER_ERR_IO, "%s: cannot open: %s", path, strerror(errno));
  else if (fstat(f->fd, &sb) != 0)
    st = peer_fail(PEER_ERR_IO, "%s: cannot stat: %s", path, strerror(errno));
  else if (!S_ISREG(sb.st_mode))
    st = peer_fail(PEER_ERR_IO, "%s: not a regular file", path);
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

/* Write header length, padded header and data to an open stream. */
static bool write_stream(FILE *fp, const char *header, size_t padded, const peer_tensor *tensors,
                         int n_tensors) {
  unsigned char raw[8];
  for (int i = 0; i < 8; i++)
    raw[i] = (unsigned char)((uint64_t)padded >> (8 * i));
  if (fwrite(raw, 1, 8, fp) != 8) return false;
  size_t len = strlen(header);
  if (fwrite(header, 1, len, fp) != len) return false;
  for (size_t i = len; i < padded; i++)
    if (fputc(' ', fp) == EOF) return false;
  for (int i = 0; i < n_tensors; i++)
    if (tensors[i].nbytes && fwrite(tensors[i].data, 1, tensors[i].nbytes, fp) != tensors[i].nbytes)
      return false;
  return fflush(fp) == 0 && fsync(fileno(fp)) == 0;
}

/* Write to a temporary name beside path, then rename: a reader (or a crash)
 * sees either the old file or the complete new one. */
static peer_status write_atomic(const char *path, const char *header, size_t padded,
                                const peer_tensor *tensors, int n_tensors) {
  size_t tmp_size = strlen(path) + 32;
  char *tmp = malloc(tmp_size);
  if (!tmp) return peer_fail(PEER_ERR_OUT_OF_MEMORY, "%s: out of memory", path);
  snprintf(tmp, tmp_size, "%s.tmp.%ld", path, (long)getpid());
  peer_status st = PEER_OK;
  FILE *fp = fopen(tmp, "wb");
  if (!fp) {
    st = peer_fail(PEER_ERR_IO, "%s: cannot create temporary file %s: %s", path, tmp,
                   strerror(errno));
    free(tmp);
    return st;
  }
  bool ok = write_stream(fp, header, padded, tensors, n_tensors);
  int err = errno;
  if (fclose(fp) != 0 && ok) {
    ok = false;
    err = errno;
  }
  if (ok && rename(tmp, path) != 0) {
    st = peer_fail(PEER_ERR_IO, "%s: cannot rename %s over it: %s", path, tmp, strerror(errno));
  } else if (!ok) {
    st = peer_fail(PEER_ERR_IO, "%s: cannot write %s: %s", path, tmp, strerror(err));
  }
  if (st) remove(tmp);
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
