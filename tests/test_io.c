/* test_io.c: weight files and generic safetensors access: bit-exact round
 * trips, the atomic save, and a malformed file for every check the reader
 * makes (each must fail with the right status and a message that says why).
 * Malformed files are written byte by byte here, not through the library's
 * writer, so the reader is tested against the format, not against itself. */
#define _GNU_SOURCE /* nftw, truncate */
#include <criterion/criterion.h>

#include <dirent.h>
#include <errno.h>
#include <ftw.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "internal.h"
#include "tempdir.h"

/* ---------------------------------------------------------------- fixture */

static unsigned seed;

static void setup(void) {
  test_dir_make("io");
  seed = (unsigned)time(NULL) ^ (unsigned)getpid();
  srand(seed);
  cr_log_info("seed %u", seed);
}

static void teardown(void) { test_dir_remove(); }

TestSuite(io, .init = setup, .fini = teardown);

static float frand(void) { return (float)rand() / (float)RAND_MAX * 2.0f - 1.0f; }

/* Files in the test's directory whose names hold the writer's temporary tag. */
static int count_temporaries(void) {
  DIR *d = opendir(test_dir);
  cr_assert(d);
  int n = 0;
  struct dirent *e;
  while ((e = readdir(d)))
    n += strstr(e->d_name, ".peer-tmp.") != NULL;
  closedir(d);
  return n;
}

static void *read_all(const char *path, size_t *len) {
  FILE *fp = fopen(path, "rb");
  cr_assert(fp, "cannot open %s", path);
  fseek(fp, 0, SEEK_END);
  long n = ftell(fp);
  fseek(fp, 0, SEEK_SET);
  void *buf = malloc((size_t)n + 1);
  cr_assert_eq(fread(buf, 1, (size_t)n, fp), (size_t)n);
  fclose(fp);
  *len = (size_t)n;
  return buf;
}

/* A file with header length `hlen` (whatever the header's real length),
 * then `header`, then `data`. */
static void write_raw_len(const char *path, uint64_t hlen, const char *header, const void *data,
                          size_t data_len) {
  FILE *fp = fopen(path, "wb");
  cr_assert(fp);
  unsigned char raw[8];
  for (int i = 0; i < 8; i++)
    raw[i] = (unsigned char)(hlen >> (8 * i));
  fwrite(raw, 1, 8, fp);
  fwrite(header, 1, strlen(header), fp);
  if (data_len) fwrite(data, 1, data_len, fp);
  fclose(fp);
}

static void write_raw(const char *path, const char *header, const void *data, size_t data_len) {
  write_raw_len(path, strlen(header), header, data, data_len);
}

static void expect_fail(peer_status got, peer_status want, const char *word) {
  cr_assert_eq(got, want, "status %d (%s), want %d (%s); message: %s", (int)got,
               peer_status_string(got), (int)want, peer_status_string(want), peer_last_error());
  cr_assert(strstr(peer_last_error(), word), "message \"%s\" lacks \"%s\"", peer_last_error(),
            word);
}

/* Opening `path` (written raw) fails with FORMAT, a message naming the file
 * and containing `word`. */
static void expect_bad_file(const char *path, const char *word) {
  peer_safetensors *f = (peer_safetensors *)&f;
  expect_fail(peer_safetensors_open(&f, path), PEER_ERR_FORMAT, word);
  cr_assert_null(f);
  cr_assert(strstr(peer_last_error(), path), "message \"%s\" does not name the file",
            peer_last_error());
}

/* ----------------------------------------------------------------- layers */

static peer_layer *make_layer(const char *text) {
  peer_config cfg;
  peer_config_default(&cfg);
  cr_assert_eq(peer_config_parse(&cfg, text), PEER_OK, "%s", peer_last_error());
  peer_layer *L = NULL;
  cr_assert_eq(peer_layer_create(&L, &cfg, NULL), PEER_OK, "%s", peer_last_error());
  cr_assert_eq(peer_layer_init(L, (uint64_t)rand()), PEER_OK);
  /* init leaves bias and norm parameters constant: make every value count */
  for (int i = 0; i < peer_layer_n_params(L); i++) {
    peer_tensor t;
    cr_assert_eq(peer_layer_param(L, i, &t), PEER_OK);
    if (t.ndim == 1) {
      float *p = t.data;
      for (int64_t j = 0; j < t.shape[0]; j++)
        p[j] = frand() + 1.5f;
    }
  }
  return L;
}

static void assert_same_layer(peer_layer *a, peer_layer *b) {
  char ca[1024], cb[1024];
  peer_config_format(peer_layer_config(a), ca, sizeof ca);
  peer_config_format(peer_layer_config(b), cb, sizeof cb);
  cr_assert_str_eq(ca, cb);
  cr_assert_eq(peer_layer_n_params(a), peer_layer_n_params(b));
  for (int i = 0; i < peer_layer_n_params(a); i++) {
    peer_tensor ta, tb;
    cr_assert_eq(peer_layer_param(a, i, &ta), PEER_OK);
    cr_assert_eq(peer_layer_param(b, i, &tb), PEER_OK);
    cr_assert_str_eq(ta.name, tb.name);
    cr_assert_eq(ta.dtype, tb.dtype);
    cr_assert_eq(ta.ndim, tb.ndim);
    for (int d = 0; d < ta.ndim; d++)
      cr_assert_eq(ta.shape[d], tb.shape[d]);
    cr_assert_eq(ta.nbytes, tb.nbytes);
    cr_assert(memcmp(ta.data, tb.data, ta.nbytes) == 0, "%s differs after the round trip", ta.name);
  }
}

static const char *const configs[] = {
    "d_model=16,n_heads=2,d_key=8,n_subkeys=8,top_k=2",
    "d_model=24,n_heads=3,d_key=6,n_subkeys=5,top_k=3,subkey_top_k=4,weight_dtype=bf16,"
    "query_bias=1,activation=relu,gate=sigmoid",
    "d_model=8,n_heads=4,d_key=4,n_subkeys=4,top_k=1,shared_keys=1,query_norm=batchnorm,"
    "activation=silu,gate=relu",
    "d_model=64,n_heads=8,d_key=32,n_subkeys=32,top_k=8,query_bias=1,query_norm=batchnorm,"
    "weight_dtype=bf16,shared_keys=1,activation=gelu_tanh",
    "d_model=32,n_heads=1,d_key=2,n_subkeys=16,top_k=16,subkey_top_k=16,activation=identity",
};

Test(io, layer_round_trip_is_bit_exact) {
  for (size_t c = 0; c < sizeof configs / sizeof configs[0]; c++) {
    peer_layer *a = make_layer(configs[c]);
    const char *path = test_path("w.safetensors");
    cr_assert_eq(peer_layer_save(a, path), PEER_OK, "%s: %s", configs[c], peer_last_error());
    peer_layer *b = (peer_layer *)&b;
    cr_assert_eq(peer_layer_load(&b, path, NULL), PEER_OK, "%s: %s", configs[c], peer_last_error());
    assert_same_layer(a, b);
    peer_layer_free(a);
    peer_layer_free(b);
  }
}

Test(io, loaded_layer_computes_the_same_output) {
  peer_layer *a = make_layer(configs[1]);
  const char *path = test_path("w.safetensors");
  cr_assert_eq(peer_layer_save(a, path), PEER_OK, "%s", peer_last_error());
  peer_layer *b = NULL;
  cr_assert_eq(peer_layer_load(&b, path, NULL), PEER_OK, "%s", peer_last_error());
  enum { T = 7, D = 24 };
  float x[T * D], ya[T * D], yb[T * D];
  for (int i = 0; i < T * D; i++)
    x[i] = frand();
  cr_assert_eq(peer_forward(a, T, x, ya, NULL, NULL), PEER_OK, "%s", peer_last_error());
  cr_assert_eq(peer_forward(b, T, x, yb, NULL, NULL), PEER_OK, "%s", peer_last_error());
  cr_assert(memcmp(ya, yb, sizeof ya) == 0);
  peer_layer_free(a);
  peer_layer_free(b);
}

Test(io, saved_metadata_names_every_field) {
  peer_layer *L = make_layer("d_model=16,n_heads=2,d_key=8,n_subkeys=8,top_k=3,"
                             "weight_dtype=bf16,activation=gelu,query_bias=1");
  const char *path = test_path("w.safetensors");
  cr_assert_eq(peer_layer_save(L, path), PEER_OK, "%s", peer_last_error());
  peer_safetensors *f = NULL;
  cr_assert_eq(peer_safetensors_open(&f, path), PEER_OK, "%s", peer_last_error());
  const char *want[][2] = {
      {"peer.format", "1"},          {"peer.d_model", "16"},      {"peer.n_heads", "2"},
      {"peer.d_key", "8"},           {"peer.n_subkeys", "8"},     {"peer.top_k", "3"},
      {"peer.subkey_top_k", "3"},    {"peer.shared_keys", "0"},   {"peer.activation", "gelu"},
      {"peer.gate", "softmax"},      {"peer.query_norm", "none"}, {"peer.query_bias", "1"},
      {"peer.weight_dtype", "bf16"},
  };
  for (size_t i = 0; i < sizeof want / sizeof want[0]; i++) {
    const char *v = peer_safetensors_metadata(f, want[i][0]);
    cr_assert(v, "metadata %s is missing", want[i][0]);
    cr_assert_str_eq(v, want[i][1], "%s", want[i][0]);
  }
  const char *names[] = {"query.weight", "query.bias", "keys", "experts.down", "experts.up"};
  cr_assert_eq(peer_safetensors_count(f), 5);
  for (int i = 0; i < 5; i++) {
    peer_tensor t;
    cr_assert_eq(peer_safetensors_info(f, i, &t), PEER_OK);
    cr_assert_str_eq(t.name, names[i]);
  }
  peer_tensor t;
  cr_assert_eq(peer_safetensors_find(f, "experts.up", &t), PEER_OK);
  cr_assert_eq(t.dtype, PEER_BF16);
  cr_assert_eq(t.ndim, 2);
  cr_assert_eq(t.shape[0], 64);
  cr_assert_eq(t.shape[1], 16);
  cr_assert_eq(t.nbytes, 64 * 16 * 2);
  peer_safetensors_close(f);

  /* the header is padded with spaces so the data starts 8-byte aligned */
  size_t len;
  unsigned char *raw = read_all(path, &len);
  uint64_t hlen = 0;
  for (int i = 7; i >= 0; i--)
    hlen = hlen << 8 | raw[i];
  cr_assert_eq(hlen % 8, 0);
  cr_assert_eq(raw[8], '{');
  free(raw);
  peer_layer_free(L);
}

/* --------------------------------------------------------- generic files */

Test(io, generic_write_and_read) {
  enum { T = 5, D = 12, H = 3, K = 4 };
  float x[T * D], y[T * D];
  int64_t idx[T * H * K];
  for (int i = 0; i < T * D; i++)
    x[i] = frand(), y[i] = frand();
  for (int i = 0; i < T * H * K; i++)
    idx[i] = ((int64_t)rand() << 31) ^ rand();
  peer_tensor in[4] = {
      {.name = "x", .dtype = PEER_F32, .ndim = 2, .shape = {T, D}, .data = x, .nbytes = sizeof x},
      {.name = "y", .dtype = PEER_F32, .ndim = 2, .shape = {T, D}, .data = y, .nbytes = sizeof y},
      {.name = "indices",
       .dtype = PEER_I64,
       .ndim = 3,
       .shape = {T, H, K},
       .data = idx,
       .nbytes = sizeof idx},
      {.name = "empty", .dtype = PEER_F32, .ndim = 2, .shape = {0, D}, .data = NULL, .nbytes = 0},
  };
  const char *meta[] = {"source", "test_io", "tokens", "5"};
  const char *path = test_path("act.safetensors");
  cr_assert_eq(peer_safetensors_write(path, in, 4, meta, 2), PEER_OK, "%s", peer_last_error());

  peer_safetensors *f = NULL;
  cr_assert_eq(peer_safetensors_open(&f, path), PEER_OK, "%s", peer_last_error());
  cr_assert_eq(peer_safetensors_count(f), 4);
  cr_assert_str_eq(peer_safetensors_metadata(f, "source"), "test_io");
  cr_assert_str_eq(peer_safetensors_metadata(f, "tokens"), "5");
  cr_assert_null(peer_safetensors_metadata(f, "absent"));
  for (int i = 0; i < 4; i++) {
    peer_tensor t;
    cr_assert_eq(peer_safetensors_info(f, i, &t), PEER_OK);
    cr_assert_str_eq(t.name, in[i].name);
    cr_assert_eq(t.dtype, in[i].dtype);
    cr_assert_eq(t.ndim, in[i].ndim);
    for (int d = 0; d < t.ndim; d++)
      cr_assert_eq(t.shape[d], in[i].shape[d]);
    cr_assert_eq(t.nbytes, in[i].nbytes);
    cr_assert_null(t.data);
  }
  float xr[T * D], yr[T * D];
  int64_t ir[T * H * K];
  cr_assert_eq(peer_safetensors_read(f, "y", yr, sizeof yr), PEER_OK, "%s", peer_last_error());
  cr_assert_eq(peer_safetensors_read(f, "x", xr, sizeof xr), PEER_OK, "%s", peer_last_error());
  cr_assert_eq(peer_safetensors_read(f, "indices", ir, sizeof ir), PEER_OK);
  cr_assert_eq(peer_safetensors_read(f, "empty", NULL, 0), PEER_OK);
  cr_assert(memcmp(xr, x, sizeof x) == 0);
  cr_assert(memcmp(yr, y, sizeof y) == 0);
  cr_assert(memcmp(ir, idx, sizeof idx) == 0);

  expect_fail(peer_safetensors_read(f, "x", xr, sizeof xr - 4), PEER_ERR_INVALID_ARGUMENT, "bytes");
  peer_tensor t;
  expect_fail(peer_safetensors_find(f, "gates", &t), PEER_ERR_FORMAT, "gates");
  expect_fail(peer_safetensors_read(f, "gates", xr, sizeof xr), PEER_ERR_FORMAT, "gates");
  expect_fail(peer_safetensors_info(f, 4, &t), PEER_ERR_INVALID_ARGUMENT, "4");
  peer_safetensors_close(f);
  peer_safetensors_close(NULL);
}

Test(io, writer_checks_its_arguments) {
  float x[6] = {0};
  const char *path = test_path("bad.safetensors");
  peer_tensor t = {.name = "x",
                   .dtype = PEER_F32,
                   .ndim = 2,
                   .shape = {2, 3},
                   .data = x,
                   .nbytes = sizeof x - 4};
  expect_fail(peer_safetensors_write(path, &t, 1, NULL, 0), PEER_ERR_SHAPE, "x");
  t.nbytes = sizeof x;
  peer_tensor two[2] = {t, t};
  expect_fail(peer_safetensors_write(path, two, 2, NULL, 0), PEER_ERR_INVALID_ARGUMENT,
              "duplicate");
  const char *meta[] = {"k", "v", "k", "w"};
  expect_fail(peer_safetensors_write(path, &t, 1, meta, 2), PEER_ERR_INVALID_ARGUMENT, "duplicate");
  const char *bad_utf8[] = {"k", "\xff\xfe"};
  expect_fail(peer_safetensors_write(path, &t, 1, bad_utf8, 1), PEER_ERR_INVALID_ARGUMENT, "UTF-8");
  t.ndim = 5;
  expect_fail(peer_safetensors_write(path, &t, 1, NULL, 0), PEER_ERR_INVALID_ARGUMENT, "ndim");
  t.ndim = 2;
  t.shape[0] = -2;
  expect_fail(peer_safetensors_write(path, &t, 1, NULL, 0), PEER_ERR_INVALID_ARGUMENT, "shape");
  t.shape[0] = 2;
  t.name = "__metadata__";
  expect_fail(peer_safetensors_write(path, &t, 1, NULL, 0), PEER_ERR_INVALID_ARGUMENT, "reserved");
  cr_assert_neq(access(path, F_OK), 0, "a failed write left a file behind");
}

/* Files as other writers make them: no padding, metadata after the tensors,
 * whitespace, a gap between tensors. */
Test(io, reads_foreign_but_valid_files) {
  float a[4], b[2];
  for (int i = 0; i < 4; i++)
    a[i] = frand();
  for (int i = 0; i < 2; i++)
    b[i] = frand();
  unsigned char data[16 + 4 + 8];
  memcpy(data, a, 16);
  memset(data + 16, 0xee, 4);
  memcpy(data + 20, b, 8);
  const char *path = test_path("foreign.safetensors");
  write_raw(path,
            "{ \"b\": {\"shape\": [2], \"dtype\": \"F32\", \"data_offsets\": [20, 28]},\n"
            "  \"a\": {\"dtype\": \"F32\", \"shape\": [2, 2], \"data_offsets\": [0, 16]},\n"
            "  \"__metadata__\": {\"format\": \"pt\"} }   ",
            data, sizeof data);
  peer_safetensors *f = NULL;
  cr_assert_eq(peer_safetensors_open(&f, path), PEER_OK, "%s", peer_last_error());
  cr_assert_eq(peer_safetensors_count(f), 2);
  cr_assert_str_eq(peer_safetensors_metadata(f, "format"), "pt");
  float ar[4], br[2];
  cr_assert_eq(peer_safetensors_read(f, "a", ar, sizeof ar), PEER_OK);
  cr_assert_eq(peer_safetensors_read(f, "b", br, sizeof br), PEER_OK);
  cr_assert(memcmp(ar, a, sizeof a) == 0 && memcmp(br, b, sizeof b) == 0);
  peer_safetensors_close(f);
}

/* ------------------------------------------------------------ atomic save */

Test(io, save_replaces_an_existing_file) {
  peer_layer *a = make_layer(configs[0]), *b = make_layer(configs[2]);
  const char *path = test_path("w.safetensors");
  cr_assert_eq(peer_layer_save(a, path), PEER_OK, "%s", peer_last_error());
  cr_assert_eq(peer_layer_save(b, path), PEER_OK, "%s", peer_last_error());
  peer_layer *c = NULL;
  cr_assert_eq(peer_layer_load(&c, path, NULL), PEER_OK, "%s", peer_last_error());
  assert_same_layer(b, c);
  peer_layer_free(a);
  peer_layer_free(b);
  peer_layer_free(c);
}

Test(io, failed_save_leaves_the_old_file_intact) {
  peer_layer *a = make_layer(configs[0]), *b = make_layer(configs[1]);
  const char *path = test_path("w.safetensors");
  cr_assert_eq(peer_layer_save(a, path), PEER_OK, "%s", peer_last_error());
  size_t len0, len1;
  void *before = read_all(path, &len0);

  /* a name so long that no temporary fits beside it: the write cannot start */
  char longname[240];
  memset(longname, 'w', sizeof longname - 1);
  longname[sizeof longname - 1] = '\0';
  const char *lpath = test_path(longname);
  FILE *fp = fopen(lpath, "wb"); /* the old file, copied by hand */
  cr_assert(fp);
  cr_assert_eq(fwrite(before, 1, len0, fp), len0);
  fclose(fp);
  expect_fail(peer_layer_save(b, lpath), PEER_ERR_IO, "temporary");
  void *after = read_all(lpath, &len1);
  cr_assert(len0 == len1 && memcmp(before, after, len0) == 0, "the old file changed");
  free(after);
  cr_assert_eq(count_temporaries(), 0, "a temporary file was left behind");

  /* the target is a directory: refused before anything is written */
  const char *dpath = test_path("d.safetensors");
  cr_assert_eq(mkdir(dpath, 0700), 0);
  expect_fail(peer_layer_save(b, dpath), PEER_ERR_IO, "directory");
  cr_assert_eq(count_temporaries(), 0, "a temporary file was left behind");

  /* no such directory */
  const char *nowhere = test_path("no/such/dir/w.safetensors");
  expect_fail(peer_layer_save(b, nowhere), PEER_ERR_IO, nowhere);

  peer_layer *c = NULL;
  cr_assert_eq(peer_layer_load(&c, path, NULL), PEER_OK, "%s", peer_last_error());
  assert_same_layer(a, c);
  free(before);
  peer_layer_free(a);
  peer_layer_free(b);
  peer_layer_free(c);
}

/* --------------------------------------------------------- malformed files */

#define GOOD_TENSOR "\"a\":{\"dtype\":\"F32\",\"shape\":[2,2],\"data_offsets\":[0,16]}"

Test(io, rejects_short_files) {
  const char *path = test_path("short.safetensors");
  write_raw_len(path, 0, "", NULL, 0);
  expect_bad_file(path, "JSON"); /* an empty header is not JSON */
  FILE *fp = fopen(path, "wb");
  fclose(fp);
  expect_bad_file(path, "too short"); /* empty file */
  fp = fopen(path, "wb");
  fwrite("\x08\0\0\0\0\0\0", 1, 7, fp);
  fclose(fp);
  expect_bad_file(path, "too short"); /* 7 bytes */
}

Test(io, rejects_bad_header_lengths) {
  unsigned char data[16] = {0};
  const char *path = test_path("hlen.safetensors");
  write_raw_len(path, 1000, "{" GOOD_TENSOR "}", data, sizeof data);
  expect_bad_file(path, "header length");
  write_raw_len(path, (uint64_t)1 << 63, "{" GOOD_TENSOR "}", data, sizeof data);
  expect_bad_file(path, "header length");
  write_raw_len(path, UINT64_MAX, "{}", NULL, 0);
  expect_bad_file(path, "header length");
  /* within a (sparse) 200 MiB file, but absurd for a header */
  write_raw_len(path, (uint64_t)150 << 20, "{}", NULL, 0);
  cr_assert_eq(truncate(path, (off_t)200 << 20), 0);
  expect_bad_file(path, "absurd");
}

Test(io, rejects_bad_headers) {
  unsigned char data[32] = {0};
  const char *path = test_path("bad.safetensors");
  static const struct {
    const char *header;
    size_t data_len;
    const char *word;
  } cases[] = {
      {"{\"a\": ", 16, "JSON"},
      {"{\"a\":{\"dtype\":\"F32\",\"shape\":[2,2],\"data_offsets\":[0,16]}", 16, "JSON"},
      {"{" GOOD_TENSOR "} trailing", 16, "JSON"},
      {"[1, 2]", 16, "not a JSON object"},
      {"\"text\"", 16, "JSON"},
      {"{\"a\": [1, 2]}", 16, "not a JSON object"},
      /* overlapping */
      {"{" GOOD_TENSOR ",\"b\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[8,16]}}", 16,
       "overlap"},
      {"{\"b\":{\"dtype\":\"F32\",\"shape\":[4],\"data_offsets\":[12,28]}," GOOD_TENSOR "}", 32,
       "overlap"},
      /* out of range */
      {"{" GOOD_TENSOR "}", 8, "past the end"},
      {"{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[16,24]}}", 16, "past the end"},
      {"{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[-8,0]}}", 16, "data_offsets"},
      {"{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0]}}", 16, "data_offsets"},
      {"{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8.0]}}", 16, "data_offsets"},
      {"{\"a\":{\"dtype\":\"F32\",\"shape\":[2]}}", 16, "data_offsets"},
      /* begin after end */
      {"{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[16,8]}}", 16, "begin"},
      /* dtype */
      {"{\"a\":{\"dtype\":\"F64\",\"shape\":[2],\"data_offsets\":[0,16]}}", 16, "F64"},
      {"{\"a\":{\"dtype\":\"f32\",\"shape\":[4],\"data_offsets\":[0,16]}}", 16, "dtype"},
      {"{\"a\":{\"dtype\":4,\"shape\":[4],\"data_offsets\":[0,16]}}", 16, "dtype"},
      {"{\"a\":{\"shape\":[4],\"data_offsets\":[0,16]}}", 16, "dtype"},
      /* shape */
      {"{\"a\":{\"dtype\":\"F32\",\"shape\":[3,2],\"data_offsets\":[0,16]}}", 16, "mismatch"},
      {"{\"a\":{\"dtype\":\"BF16\",\"shape\":[4],\"data_offsets\":[0,16]}}", 16, "mismatch"},
      {"{\"a\":{\"dtype\":\"F32\",\"shape\":[-2,-2],\"data_offsets\":[0,16]}}", 16, "shape"},
      {"{\"a\":{\"dtype\":\"F32\",\"shape\":[2.0,2],\"data_offsets\":[0,16]}}", 16, "shape"},
      {"{\"a\":{\"dtype\":\"F32\",\"shape\":[\"2\",2],\"data_offsets\":[0,16]}}", 16, "shape"},
      {"{\"a\":{\"dtype\":\"F32\",\"shape\":4,\"data_offsets\":[0,16]}}", 16, "shape"},
      {"{\"a\":{\"dtype\":\"F32\",\"shape\":[1,1,1,2,2],\"data_offsets\":[0,16]}}", 16,
       "at most 4"},
      {"{\"a\":{\"dtype\":\"F32\",\"shape\":[4611686018427387904,4611686018427387904],"
       "\"data_offsets\":[0,16]}}",
       16, "overflow"},
      {"{\"a\":{\"dtype\":\"F32\",\"shape\":[99999999999999999999],\"data_offsets\":[0,16]}}", 16,
       "JSON"},
      /* names and metadata */
      {"{" GOOD_TENSOR "," GOOD_TENSOR "}", 16, "duplicate"},
      {"{" GOOD_TENSOR ",\"__metadata__\":{\"k\":1}}", 16, "not a string"},
      {"{" GOOD_TENSOR ",\"__metadata__\":[\"k\"]}", 16, "__metadata__"},
  };
  for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
    write_raw(path, cases[i].header, data, cases[i].data_len);
    cr_log_info("case %zu: %s", i, cases[i].header);
    expect_bad_file(path, cases[i].word);
  }
}

Test(io, rejects_what_is_not_a_file) {
  peer_safetensors *f = NULL;
  expect_fail(peer_safetensors_open(&f, test_path("absent.safetensors")), PEER_ERR_IO, "absent");
  expect_fail(peer_safetensors_open(&f, test_dir), PEER_ERR_IO, "regular");
  peer_layer *L = NULL;
  expect_fail(peer_layer_load(&L, test_path("absent.safetensors"), NULL), PEER_ERR_IO, "absent");
  expect_fail(peer_safetensors_open(NULL, test_dir), PEER_ERR_INVALID_ARGUMENT, "NULL");
}

Test(io, truncated_weight_file) {
  peer_layer *a = make_layer(configs[1]);
  const char *path = test_path("w.safetensors");
  cr_assert_eq(peer_layer_save(a, path), PEER_OK, "%s", peer_last_error());
  struct stat sb;
  cr_assert_eq(stat(path, &sb), 0);
  cr_assert_eq(truncate(path, sb.st_size - 5), 0);
  peer_layer *b = (peer_layer *)&b;
  expect_fail(peer_layer_load(&b, path, NULL), PEER_ERR_FORMAT, "past the end");
  cr_assert_null(b);
  /* cut inside the header */
  cr_assert_eq(truncate(path, 40), 0);
  expect_fail(peer_layer_load(&b, path, NULL), PEER_ERR_FORMAT, "header length");
  peer_layer_free(a);
}

/* ----------------------------------------- weight files that disagree */

/* A layer's tensors and metadata, editable before writing. */
typedef struct variant {
  peer_tensor t[PEER_P_COUNT + 1];
  int n_t;
  char key[16][64], value[16][64];
  int n_meta;
} variant;

static void variant_of(peer_layer *L, variant *v) {
  memset(v, 0, sizeof *v);
  v->n_t = peer_layer_n_params(L);
  for (int i = 0; i < v->n_t; i++)
    cr_assert_eq(peer_layer_param(L, i, &v->t[i]), PEER_OK);
  const peer_config *c = peer_layer_config(L);
  static const char *keys[] = {"format",      "d_model", "n_heads",      "d_key",
                               "n_subkeys",   "top_k",   "subkey_top_k", "shared_keys",
                               "activation",  "gate",    "query_norm",   "query_bias",
                               "weight_dtype"};
  snprintf(v->value[0], 64, "1");
  snprintf(v->value[1], 64, "%lld", (long long)c->d_model);
  snprintf(v->value[2], 64, "%lld", (long long)c->n_heads);
  snprintf(v->value[3], 64, "%lld", (long long)c->d_key);
  snprintf(v->value[4], 64, "%lld", (long long)c->n_subkeys);
  snprintf(v->value[5], 64, "%lld", (long long)c->top_k);
  snprintf(v->value[6], 64, "%lld", (long long)peer_config_subkey_top_k(c));
  snprintf(v->value[7], 64, "%d", c->shared_keys);
  snprintf(v->value[8], 64, "%s", peer_activation_name(c->activation));
  snprintf(v->value[9], 64, "%s", peer_gate_name(c->gate));
  snprintf(v->value[10], 64, "%s", peer_query_norm_name(c->query_norm));
  snprintf(v->value[11], 64, "%d", c->query_bias);
  snprintf(v->value[12], 64, "%s", c->weight_dtype == PEER_BF16 ? "bf16" : "f32");
  for (int i = 0; i < 13; i++) {
    snprintf(v->key[i], 64, "peer.%s", keys[i]);
  }
  v->n_meta = 13;
}

static int meta_index(variant *v, const char *key) {
  for (int i = 0; i < v->n_meta; i++)
    if (strcmp(v->key[i], key) == 0) return i;
  cr_assert_fail("no metadata key %s", key);
  return -1;
}

static void set_meta(variant *v, const char *key, const char *value) {
  size_t n = strlen(value);
  cr_assert(n < sizeof v->value[0]);
  memcpy(v->value[meta_index(v, key)], value, n + 1);
}

static void drop_meta(variant *v, const char *key) {
  int i = meta_index(v, key);
  v->n_meta--;
  memcpy(v->key[i], v->key[v->n_meta], 64);
  memcpy(v->value[i], v->value[v->n_meta], 64);
}

static peer_tensor *tensor_of(variant *v, const char *name) {
  for (int i = 0; i < v->n_t; i++)
    if (strcmp(v->t[i].name, name) == 0) return &v->t[i];
  cr_assert_fail("no tensor %s", name);
  return NULL;
}

static void drop_tensor(variant *v, const char *name) {
  peer_tensor *t = tensor_of(v, name);
  *t = v->t[--v->n_t];
}

/* Write the variant and expect loading it to fail with want and word. */
static void expect_load_fails(variant *v, peer_status want, const char *word) {
  const char *meta[32];
  for (int i = 0; i < v->n_meta; i++)
    meta[2 * i] = v->key[i], meta[2 * i + 1] = v->value[i];
  const char *path = test_path("variant.safetensors");
  cr_assert_eq(peer_safetensors_write(path, v->t, v->n_t, meta, v->n_meta), PEER_OK, "%s",
               peer_last_error());
  peer_layer *L = (peer_layer *)&L;
  expect_fail(peer_layer_load(&L, path, NULL), want, word);
  cr_assert_null(L, "*out is not NULL after a failed load");
}

Test(io, the_variant_helper_writes_a_loadable_file) {
  peer_layer *L = make_layer(configs[2]);
  variant v;
  variant_of(L, &v);
  const char *meta[32];
  for (int i = 0; i < v.n_meta; i++)
    meta[2 * i] = v.key[i], meta[2 * i + 1] = v.value[i];
  const char *path = test_path("variant.safetensors");
  cr_assert_eq(peer_safetensors_write(path, v.t, v.n_t, meta, v.n_meta), PEER_OK);
  peer_layer *b = NULL;
  cr_assert_eq(peer_layer_load(&b, path, NULL), PEER_OK, "%s", peer_last_error());
  assert_same_layer(L, b);
  peer_layer_free(b);
  peer_layer_free(L);
}

Test(io, rejects_bad_metadata) {
  peer_layer *L = make_layer(configs[0]);
  variant v;
  static const struct {
    const char *key, *value, *word;
  } cases[] = {
      {"peer.format", "2", "peer.format"},
      {"peer.format", "", "peer.format"},
      {"peer.d_key", "7", "d_key"},
      {"peer.top_k", "9", "top_k"},               /* > subkey_top_k */
      {"peer.subkey_top_k", "1", "top_k"},        /* < top_k */
      {"peer.subkey_top_k", "9", "subkey_top_k"}, /* > n_subkeys */
      {"peer.d_model", "abc", "d_model"},
      {"peer.d_model", "-16", "d_model"},
      {"peer.d_model", "0", "d_model"},
      {"peer.d_model", "16,n_heads=4", "d_model"},
      {"peer.n_subkeys", "99999999999999999999", "n_subkeys"},
      {"peer.activation", "tanh", "activation"},
      {"peer.weight_dtype", "f16", "weight_dtype"},
      {"peer.shared_keys", "2", "shared_keys"},
  };
  for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
    variant_of(L, &v);
    set_meta(&v, cases[i].key, cases[i].value);
    cr_log_info("case %s=%s", cases[i].key, cases[i].value);
    expect_load_fails(&v, PEER_ERR_FORMAT, cases[i].word);
  }
  static const char *required[] = {"peer.format",       "peer.d_model",     "peer.n_heads",
                                   "peer.d_key",        "peer.n_subkeys",   "peer.top_k",
                                   "peer.subkey_top_k", "peer.shared_keys", "peer.activation",
                                   "peer.gate",         "peer.query_norm",  "peer.query_bias",
                                   "peer.weight_dtype"};
  for (size_t i = 0; i < sizeof required / sizeof required[0]; i++) {
    variant_of(L, &v);
    drop_meta(&v, required[i]);
    expect_load_fails(&v, PEER_ERR_FORMAT, required[i]);
  }
  peer_layer_free(L);
}

Test(io, rejects_tensors_that_disagree_with_the_config) {
  peer_layer *L = make_layer("d_model=16,n_heads=2,d_key=8,n_subkeys=8,top_k=2,"
                             "weight_dtype=bf16,query_norm=batchnorm");
  variant v;

  variant_of(L, &v); /* keys [2, 2, 8, 4] stored as [2, 2, 4, 8]: same bytes */
  tensor_of(&v, "keys")->shape[2] = 4;
  tensor_of(&v, "keys")->shape[3] = 8;
  expect_load_fails(&v, PEER_ERR_SHAPE, "keys");
  cr_assert(strstr(peer_last_error(), "[2, 2, 4, 8]") && strstr(peer_last_error(), "[2, 2, 8, 4]"),
            "%s", peer_last_error());

  variant_of(L, &v); /* metadata says n_subkeys 4: keys and experts are too big */
  set_meta(&v, "peer.n_subkeys", "4");
  expect_load_fails(&v, PEER_ERR_SHAPE, "[");

  variant_of(L, &v); /* experts stored as F32 while the metadata says bf16 */
  peer_tensor *down = tensor_of(&v, "experts.down");
  float *wide = calloc((size_t)(down->shape[0] * down->shape[1]), sizeof *wide);
  down->dtype = PEER_F32;
  down->data = wide;
  down->nbytes *= 2;
  expect_load_fails(&v, PEER_ERR_SHAPE, "experts.down");
  cr_assert(strstr(peer_last_error(), "F32") && strstr(peer_last_error(), "BF16"), "%s",
            peer_last_error());
  free(wide);

  variant_of(L, &v);
  drop_tensor(&v, "query.norm.running_var");
  expect_load_fails(&v, PEER_ERR_FORMAT, "query.norm.running_var");

  variant_of(L, &v);
  drop_tensor(&v, "experts.up");
  expect_load_fails(&v, PEER_ERR_FORMAT, "experts.up");

  variant_of(L, &v); /* query.bias without query_bias=1 */
  float bias[16] = {0};
  v.t[v.n_t++] = (peer_tensor){.name = "query.bias",
                               .dtype = PEER_F32,
                               .ndim = 1,
                               .shape = {16},
                               .data = bias,
                               .nbytes = sizeof bias};
  expect_load_fails(&v, PEER_ERR_FORMAT, "query.bias");

  variant_of(L, &v); /* batchnorm tensors when the metadata says none */
  set_meta(&v, "peer.query_norm", "none");
  expect_load_fails(&v, PEER_ERR_FORMAT, "query.norm");
  peer_layer_free(L);
}

/* A CUDA layer loads (through host staging; test_cuda checks it) only in a
 * build with the CUDA backend; elsewhere the load is refused. */
Test(io, cuda_layers_load_only_with_the_cuda_backend) {
  peer_layer *L = make_layer(configs[0]);
  const char *path = test_path("w.safetensors");
  cr_assert_eq(peer_layer_save(L, path), PEER_OK);
#ifndef PEER_USE_CUDA
  peer_options opt;
  peer_options_default(&opt);
  opt.backend = PEER_BACKEND_CUDA;
  peer_layer *b = (peer_layer *)&b;
  expect_fail(peer_layer_load(&b, path, &opt), PEER_ERR_UNSUPPORTED, "CUDA");
  cr_assert_null(b);
#endif
  expect_fail(peer_layer_save(NULL, path), PEER_ERR_INVALID_ARGUMENT, "NULL");
  peer_layer_free(L);
}

/* Random damage to a valid file never crashes the loader, and it either
 * loads or fails with a file-format status. */
Test(io, random_damage_is_caught_or_harmless) {
  peer_layer *L = make_layer(configs[2]);
  const char *path = test_path("w.safetensors");
  cr_assert_eq(peer_layer_save(L, path), PEER_OK);
  size_t len;
  unsigned char *good = read_all(path, &len);
  uint64_t hlen = 0;
  for (int i = 7; i >= 0; i--)
    hlen = hlen << 8 | good[i];
  unsigned char *bad = malloc(len);
  int iters = getenv("PEER_TEST_QUICK") ? 100 : 400;
  for (int it = 0; it < iters; it++) {
    memcpy(bad, good, len);
    int n_flips = 1 + rand() % 3;
    for (int j = 0; j < n_flips; j++) {
      size_t at = (size_t)rand() % (8 + hlen); /* the length or the header */
      bad[at] = (unsigned char)(rand() % 2 ? rand() : bad[at] ^ (1 << (rand() % 8)));
    }
    size_t cut = rand() % 8 ? len : (size_t)rand() % len;
    FILE *fp = fopen(path, "wb");
    fwrite(bad, 1, cut, fp);
    fclose(fp);
    peer_layer *b = NULL;
    peer_status st = peer_layer_load(&b, path, NULL);
    cr_assert(st == PEER_OK || st == PEER_ERR_FORMAT || st == PEER_ERR_SHAPE ||
                  st == PEER_ERR_OUT_OF_MEMORY,
              "status %d: %s", (int)st, peer_last_error());
    cr_assert_eq(st == PEER_OK, b != NULL);
    if (st) cr_assert(strlen(peer_last_error()) > 0);
    peer_layer_free(b);
  }
  free(good);
  free(bad);
  peer_layer_free(L);
}

/* ------------------------------------------------------- hostile inputs */

/* A 2 KB file whose metadata describes a layer of gigabytes (issue 14: it
 * used to allocate and fill 8.5 GB before comparing tensors with the file) is
 * refused by the size bound, in milliseconds and without touching memory. */
Test(io, tiny_file_with_huge_metadata_costs_kilobytes, .timeout = 20) {
  static float small[16];
  const char *names[] = {"query.weight",           "query.norm.weight",
                         "query.norm.bias",        "query.norm.running_mean",
                         "query.norm.running_var", "keys",
                         "experts.down",           "experts.up"};
  peer_tensor t[8];
  for (int i = 0; i < 8; i++)
    t[i] = (peer_tensor){.name = names[i],
                         .dtype = PEER_F32,
                         .ndim = 1,
                         .shape = {16},
                         .data = small,
                         .nbytes = sizeof small};
  const char *meta[] = {
      "peer.format",       "1",       "peer.d_model",     "1",         "peer.n_heads",    "1024",
      "peer.d_key",        "1048576", "peer.n_subkeys",   "1",         "peer.top_k",      "1",
      "peer.subkey_top_k", "1",       "peer.shared_keys", "0",         "peer.activation", "gelu",
      "peer.gate",         "softmax", "peer.query_norm",  "batchnorm", "peer.query_bias", "0",
      "peer.weight_dtype", "f32"};
  const char *path = test_path("tiny.safetensors");
  cr_assert_eq(peer_safetensors_write(path, t, 8, meta, 13), PEER_OK, "%s", peer_last_error());
  struct stat sb;
  cr_assert_eq(stat(path, &sb), 0);
  cr_assert_lt(sb.st_size, 4096, "the file is %lld bytes", (long long)sb.st_size);

  struct rusage r0, r1;
  struct timespec t0, t1;
  getrusage(RUSAGE_SELF, &r0);
  clock_gettime(CLOCK_MONOTONIC, &t0);
  peer_layer *L = NULL;
  expect_fail(peer_layer_load(&L, path, NULL), PEER_ERR_FORMAT, "refused before allocating");
  clock_gettime(CLOCK_MONOTONIC, &t1);
  getrusage(RUSAGE_SELF, &r1);
  cr_assert_null(L);
  double secs = (double)(t1.tv_sec - t0.tv_sec) + 1e-9 * (double)(t1.tv_nsec - t0.tv_nsec);
  long grew_kb = r1.ru_maxrss - r0.ru_maxrss;
  cr_log_info("refused in %.4f s, peak RSS grew %ld KiB", secs, grew_kb);
  cr_assert_lt(secs, 1.0, "the refusal took %.2f s", secs);
  cr_assert_lt(grew_kb, 16 * 1024, "peak RSS grew %ld KiB for a 2 KB file", grew_kb);
}

/* Numbers are digits only: no blanks, no '+', in metadata and in configs
 * (blanks around a config item's key and value are the config syntax's). */
Test(io, numbers_with_signs_or_blanks_are_refused) {
  peer_layer *L = make_layer(configs[0]);
  const char *bad[] = {"+16", " 16", "16 ", "\n16", "1 6"};
  variant v;
  for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
    variant_of(L, &v);
    set_meta(&v, "peer.d_model", bad[i]);
    expect_load_fails(&v, PEER_ERR_FORMAT, "peer.d_model");
  }
  variant_of(L, &v);
  set_meta(&v, "peer.activation", " gelu");
  expect_load_fails(&v, PEER_ERR_FORMAT, "peer.activation");
  peer_layer_free(L);

  peer_config c;
  peer_config_default(&c);
  const char *texts[] = {"d_model=+16", "top_k=\n8", "top_k=\v8", "n_heads=+2"};
  for (size_t i = 0; i < sizeof texts / sizeof texts[0]; i++)
    expect_fail(peer_config_parse(&c, texts[i]), PEER_ERR_CONFIG, "not a non-negative integer");
  cr_assert_eq(peer_config_parse(&c, " top_k = 8 "), PEER_OK, "%s", peer_last_error());
  cr_assert_eq(c.top_k, 8);
}

/* A FIFO (or any non-regular file) is refused at open, without waiting for
 * a writer that never comes. */
Test(io, a_fifo_is_refused_without_blocking, .timeout = 10) {
  const char *path = test_path("fifo.safetensors");
  cr_assert_eq(mkfifo(path, 0600), 0, "mkfifo: %s", strerror(errno));
  peer_safetensors *f = NULL;
  expect_fail(peer_safetensors_open(&f, path), PEER_ERR_IO, "FIFO");
  peer_layer *L = NULL;
  expect_fail(peer_layer_load(&L, path, NULL), PEER_ERR_IO, "not a regular file");
}

static void write_text(const char *path, const char *text) {
  FILE *fp = fopen(path, "wb");
  cr_assert(fp, "%s: %s", path, strerror(errno));
  fputs(text, fp);
  fclose(fp);
}

static bool file_is(const char *path, const char *text) {
  size_t len;
  char *got = read_all(path, &len);
  bool same = len == strlen(text) && memcmp(got, text, len) == 0;
  free(got);
  return same;
}

/* Symlinks, devices and read-only files are refused as destinations, and
 * what they point at is untouched; a replaced file keeps its mode. */
Test(io, non_regular_and_read_only_destinations_are_refused) {
  peer_layer *L = make_layer(configs[0]);
  const char *target = test_path("target.txt");
  write_text(target, "precious");
  const char *link = test_path("link.safetensors");
  cr_assert_eq(symlink(target, link), 0);
  expect_fail(peer_layer_save(L, link), PEER_ERR_IO, "symbolic link");
  cr_assert(file_is(target, "precious"), "the link's target changed");
  struct stat sb;
  cr_assert_eq(lstat(link, &sb), 0);
  cr_assert(S_ISLNK(sb.st_mode), "the link was replaced");

  const char *ro = test_path("ro.safetensors");
  write_text(ro, "read-only");
  cr_assert_eq(chmod(ro, 0444), 0);
  expect_fail(peer_layer_save(L, ro), PEER_ERR_IO, "read-only");
  cr_assert(file_is(ro, "read-only"), "the read-only file changed");

  const char *node = test_path("node.safetensors");
  if (mknod(node, S_IFCHR | 0666, makedev(1, 3)) == 0) /* /dev/null's numbers, root only */
    expect_fail(peer_layer_save(L, node), PEER_ERR_IO, "device");
  else
    cr_log_info("mknod: %s; the device case is covered by the FIFO below", strerror(errno));
  const char *fifo = test_path("fifo.safetensors");
  cr_assert_eq(mkfifo(fifo, 0600), 0);
  expect_fail(peer_layer_save(L, fifo), PEER_ERR_IO, "FIFO");
  cr_assert_eq(lstat(fifo, &sb), 0);
  cr_assert(S_ISFIFO(sb.st_mode), "the FIFO was replaced");

  const char *kept = test_path("mode.safetensors");
  write_text(kept, "old");
  cr_assert_eq(chmod(kept, 0640), 0);
  cr_assert_eq(peer_layer_save(L, kept), PEER_OK, "%s", peer_last_error());
  cr_assert_eq(stat(kept, &sb), 0);
  cr_assert_eq(sb.st_mode & 07777, 0640, "mode %o after the save", sb.st_mode & 07777);
  cr_assert_eq(count_temporaries(), 0);
  peer_layer_free(L);
}

/* A temporary that a dead process left is removed by the next save to the
 * same destination; a live process's is not, nor another destination's. */
Test(io, stale_temporaries_are_cleaned_by_the_next_save) {
  peer_layer *L = make_layer(configs[0]);
  const char *path = test_path("w.safetensors");
  pid_t child = fork();
  if (child == 0) _exit(0);
  cr_assert_gt(child, 0);
  waitpid(child, NULL, 0); /* its pid is now free */
  char dead[512], live[512], other[512];
  snprintf(dead, sizeof dead, "%s.peer-tmp.%ld.0123456789abcdef", path, (long)child);
  snprintf(live, sizeof live, "%s.peer-tmp.%ld.0123456789abcdef", path, (long)getppid());
  snprintf(other, sizeof other, "%s.peer-tmp.%ld.0123456789abcdef", test_path("x.safetensors"),
           (long)child);
  write_text(dead, "partial");
  write_text(live, "in progress");
  write_text(other, "someone else's");
  cr_assert_eq(peer_layer_save(L, path), PEER_OK, "%s", peer_last_error());
  cr_assert_neq(access(dead, F_OK), 0, "the dead writer's temporary is still there");
  cr_assert_eq(access(live, F_OK), 0, "a live writer's temporary was removed");
  cr_assert_eq(access(other, F_OK), 0, "another destination's temporary was removed");
  peer_layer_free(L);
}
