/* test_convert.c: `peer convert` to and from lucidrains' PEER-pytorch layout.
 * Round trips (peer -> PEER-pytorch -> peer) must give the same config and
 * the same parameter bits; a PEER-pytorch file built here by hand, with every
 * element a distinct value, checks the reordering of query rows and key axes
 * element by element against docs/PEER.md ("Related layouts"); malformed or
 * unexpressible inputs must be refused with a non-zero exit and one line on
 * stderr.  Runs the built CLI (PEER_CLI), and calls the library's own
 * peer_layer_load_pytorch / peer_layer_save_pytorch / peer_convert_* directly. */
#define _GNU_SOURCE /* nftw, mkdtemp (tempdir.h) */
#include <criterion/criterion.h>

#include "peer.h"
#include "tempdir.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#ifndef PEER_CLI
#error "PEER_CLI (path of the built peer tool) must be defined by the build"
#endif

static void make_dir(void) { test_dir_make("convert"); }

TestSuite(convert, .init = make_dir, .fini = test_dir_remove);

static const char *path_in_dir(const char *name, char *buf, size_t size) {
  snprintf(buf, size, "%s/%s", test_dir, name);
  return buf;
}

/* Run `peer convert ARGS` (stdout discarded); returns the exit status and
 * puts stderr in err. */
static int run_convert(const char *args, char *err, size_t err_size) {
  char cmd[1024], log[128];
  path_in_dir("stderr.txt", log, sizeof log);
  snprintf(cmd, sizeof cmd, "cd '%s' && '%s' convert %s >/dev/null 2>'%s'", test_dir, PEER_CLI,
           args, log);
  int st = system(cmd);
  cr_assert(WIFEXITED(st), "'%s' did not exit normally", cmd);
  FILE *f = fopen(log, "r");
  cr_assert(f);
  size_t n = fread(err, 1, err_size - 1, f);
  err[n] = '\0';
  fclose(f);
  return WEXITSTATUS(st);
}

static int count_lines(const char *s) {
  int n = 0;
  for (; *s; s++)
    n += *s == '\n';
  return n;
}

/* The command must fail with `status` and one stderr line naming `needle`. */
static void expect_refused(const char *args, int status, const char *needle) {
  char err[4096];
  int rc = run_convert(args, err, sizeof err);
  cr_expect_eq(rc, status, "convert %s: exit %d, wanted %d (stderr: %s)", args, rc, status, err);
  cr_expect_eq(count_lines(err), 1, "convert %s: stderr is not one line: %s", args, err);
  cr_expect(strncmp(err, "peer: convert: ", 15) == 0, "convert %s: stderr: %s", args, err);
  cr_expect(strstr(err, needle) != NULL, "convert %s: stderr lacks '%s': %s", args, needle, err);
}

static peer_layer *make_layer(const char *config, uint64_t seed) {
  peer_config cfg;
  peer_config_default(&cfg);
  cr_assert_eq(peer_config_parse(&cfg, config), PEER_OK, "%s", peer_last_error());
  peer_layer *layer = NULL;
  cr_assert_eq(peer_layer_create(&layer, &cfg, NULL), PEER_OK, "%s", peer_last_error());
  cr_assert_eq(peer_layer_init(layer, seed), PEER_OK, "%s", peer_last_error());
  return layer;
}

static void save_layer(const char *config, const char *name) {
  char path[128];
  peer_layer *layer = make_layer(config, 5);
  cr_assert_eq(peer_layer_save(layer, path_in_dir(name, path, sizeof path)), PEER_OK, "%s",
               peer_last_error());
  peer_layer_free(layer);
}

static peer_layer *load(const char *name) {
  char path[128];
  peer_layer *layer = NULL;
  cr_assert_eq(peer_layer_load(&layer, path_in_dir(name, path, sizeof path), NULL), PEER_OK, "%s",
               peer_last_error());
  return layer;
}

/* peer -> PEER-pytorch -> peer: the same config and parameter bits. */
static void round_trip(const char *config, const char *from_options) {
  char args[512], err[4096];
  peer_layer *a = make_layer(config, 9);
  char path[128];
  cr_assert_eq(peer_layer_save(a, path_in_dir("a.safetensors", path, sizeof path)), PEER_OK);
  cr_assert_eq(run_convert("--to peer-pytorch a.safetensors --out pt.safetensors", err, sizeof err),
               0, "%s", err);
  snprintf(args, sizeof args, "--from peer-pytorch pt.safetensors --out b.safetensors %s",
           from_options);
  cr_assert_eq(run_convert(args, err, sizeof err), 0, "%s", err);
  peer_layer *b = load("b.safetensors");
  cr_expect_eq(memcmp(peer_layer_config(a), peer_layer_config(b), sizeof(peer_config)), 0,
               "config changed in the round trip (%s)", config);
  cr_assert_eq(peer_layer_n_params(a), peer_layer_n_params(b));
  for (int i = 0; i < peer_layer_n_params(a); i++) {
    peer_tensor ta, tb;
    peer_layer_param(a, i, &ta);
    cr_assert_eq(peer_layer_param_by_name(b, ta.name, &tb), PEER_OK);
    cr_assert_eq(ta.nbytes, tb.nbytes);
    cr_expect_eq(memcmp(ta.data, tb.data, ta.nbytes), 0, "%s differs after the round trip",
                 ta.name);
  }
  peer_layer_free(a);
  peer_layer_free(b);
}

Test(convert, round_trip_softmax_f32) {
  round_trip("d_model=12,n_heads=3,d_key=8,n_subkeys=6,top_k=4", "--top-k 4");
}

Test(convert, round_trip_relu_bf16_silu) {
  /* Non-competing scores keep one expert per head from k' = 5 candidates. */
  round_trip("d_model=10,n_heads=2,d_key=6,n_subkeys=7,top_k=1,subkey_top_k=5,gate=relu,"
             "activation=silu,weight_dtype=bf16",
             "--gate relu --subkey-top-k 5 --activation silu");
}

/* Hand-built PEER-pytorch tensors with distinct values. */
enum { H = 2, N_SUB = 3, DK = 2, D = 3, N_EXP = N_SUB * N_SUB };

static float pt_query(int row, int col) { return (float)(row * 100 + col); }
static float pt_key(int h, int a, int p, int j) { return (float)(1000 * h + 100 * a + 10 * p + j); }
static float pt_expert(int which, int i, int c) { return (float)(10000 * which + 10 * i + c); }

typedef struct pt_file {
  float q[2 * H * DK][D];
  float keys[H][N_SUB][2][DK];
  float down[N_EXP][D], up[N_EXP][D];
} pt_file;

static void fill_pt(pt_file *f) {
  for (int r = 0; r < 2 * H * DK; r++)
    for (int c = 0; c < D; c++)
      f->q[r][c] = pt_query(r, c);
  for (int h = 0; h < H; h++)
    for (int a = 0; a < N_SUB; a++)
      for (int p = 0; p < 2; p++)
        for (int j = 0; j < DK; j++)
          f->keys[h][a][p][j] = pt_key(h, a, p, j);
  for (int i = 0; i < N_EXP; i++)
    for (int c = 0; c < D; c++)
      f->down[i][c] = pt_expert(0, i, c), f->up[i][c] = pt_expert(1, i, c);
}

/* Write the hand-built file with tensor `skip` left out and, when extra_name
 * is set, one more tensor; shapes or dtype of one tensor may be overridden. */
typedef struct pt_variant {
  const char *skip, *extra_name;
  const char *reshape; /* tensor whose first dimension is changed */
  int64_t reshape_to;
  const char *retype; /* tensor stored as I64 (same bytes) */
} pt_variant;

static void write_pt(const char *name, pt_variant v) {
  static pt_file f;
  fill_pt(&f);
  peer_tensor t[5] = {{"to_queries.0.weight", PEER_F32, 2, {2 * H * DK, D}, f.q, sizeof f.q},
                      {"keys", PEER_F32, 4, {H, N_SUB, 2, DK}, f.keys, sizeof f.keys},
                      {"weight_down_embed.weight", PEER_F32, 2, {N_EXP, D}, f.down, sizeof f.down},
                      {"weight_up_embed.weight", PEER_F32, 2, {N_EXP, D}, f.up, sizeof f.up},
                      {v.extra_name, PEER_F32, 1, {D}, f.q, D * sizeof(float)}};
  peer_tensor out[5];
  int n = 0;
  for (int i = 0; i < 4; i++) {
    if (v.skip && !strcmp(t[i].name, v.skip)) continue;
    if (v.reshape && !strcmp(t[i].name, v.reshape)) {
      int64_t rest = (int64_t)t[i].nbytes / 4 / t[i].shape[0];
      t[i].shape[0] = v.reshape_to;
      t[i].nbytes = (size_t)(v.reshape_to * rest) * 4;
    }
    if (v.retype && !strcmp(t[i].name, v.retype)) {
      t[i].dtype = PEER_I64; /* same bytes, half the rows */
      t[i].shape[0] /= 2;
    }
    out[n++] = t[i];
  }
  if (v.extra_name) out[n++] = t[4];
  char path[128];
  cr_assert_eq(peer_safetensors_write(path_in_dir(name, path, sizeof path), out, n, NULL, 0),
               PEER_OK, "%s", peer_last_error());
}

Test(convert, from_pytorch_reorders_as_peer_md_says) {
  char err[4096];
  write_pt("pt.safetensors", (pt_variant){0});
  cr_assert_eq(run_convert("--from peer-pytorch pt.safetensors --out w.safetensors --top-k 2", err,
                           sizeof err),
               0, "%s", err);
  peer_layer *layer = load("w.safetensors");
  const peer_config *c = peer_layer_config(layer);
  cr_expect_eq(c->d_model, D);
  cr_expect_eq(c->n_heads, H);
  cr_expect_eq(c->d_key, 2 * DK);
  cr_expect_eq(c->n_subkeys, N_SUB);
  cr_expect_eq(c->top_k, 2);
  cr_expect_eq(c->gate, PEER_GATE_SOFTMAX);
  cr_expect_eq(c->activation, PEER_ACT_GELU);
  peer_tensor q, keys, down, up;
  peer_layer_param_by_name(layer, "query.weight", &q);
  peer_layer_param_by_name(layer, "keys", &keys);
  peer_layer_param_by_name(layer, "experts.down", &down);
  peer_layer_param_by_name(layer, "experts.up", &up);
  const float *qv = q.data, *kv = keys.data, *dv = down.data, *uv = up.data;
  /* PEER.md: our query row h*d_key + p*(d_key/2) + j is PEER-pytorch's row
   * p*H*dk + h*dk + j (half index outermost there). */
  for (int h = 0; h < H; h++)
    for (int p = 0; p < 2; p++)
      for (int j = 0; j < DK; j++)
        for (int col = 0; col < D; col++)
          cr_expect_eq(qv[(h * 2 * DK + p * DK + j) * D + col],
                       pt_query(p * H * DK + h * DK + j, col), "query h%d p%d j%d c%d", h, p, j,
                       col);
  /* keys: ours [H, 2, n, dk], theirs [H, n, 2, dk]. */
  for (int h = 0; h < H; h++)
    for (int p = 0; p < 2; p++)
      for (int a = 0; a < N_SUB; a++)
        for (int j = 0; j < DK; j++)
          cr_expect_eq(kv[((h * 2 + p) * N_SUB + a) * DK + j], pt_key(h, a, p, j),
                       "keys h%d p%d a%d j%d", h, p, a, j);
  for (int i = 0; i < N_EXP; i++)
    for (int col = 0; col < D; col++) {
      cr_expect_eq(dv[i * D + col], pt_expert(0, i, col));
      cr_expect_eq(uv[i * D + col], pt_expert(1, i, col));
    }
  peer_layer_free(layer);
}

Test(convert, refuses_malformed_pytorch_files) {
  const char *conv = "--from peer-pytorch bad.safetensors --out w.safetensors --top-k 2";
  write_pt("bad.safetensors", (pt_variant){.extra_name = "norm.gamma"});
  expect_refused(conv, 1, "pre_rmsnorm");
  write_pt("bad.safetensors", (pt_variant){.extra_name = "something.else"});
  expect_refused(conv, 1, "unknown tensor 'something.else'");
  write_pt("bad.safetensors", (pt_variant){.skip = "keys"});
  expect_refused(conv, 1, "no tensor 'keys'");
  write_pt("bad.safetensors", (pt_variant){.reshape = "to_queries.0.weight", .reshape_to = 6});
  expect_refused(conv, 1, "to_queries.0.weight has shape [6, 3]");
  write_pt("bad.safetensors", (pt_variant){.reshape = "weight_up_embed.weight", .reshape_to = 8});
  expect_refused(conv, 1, "weight_up_embed.weight has shape [8, 3]");
  write_pt("bad.safetensors",
           (pt_variant){.reshape = "weight_down_embed.weight", .reshape_to = H * N_EXP});
  expect_refused(conv, 1, "separate_embed_per_head");
  write_pt("bad.safetensors", (pt_variant){.retype = "to_queries.0.weight"});
  expect_refused(conv, 1, "is I64; it must be F32");
  /* Not safetensors at all. */
  char path[128];
  FILE *f = fopen(path_in_dir("bad.safetensors", path, sizeof path), "w");
  fputs("this is not a safetensors file", f);
  fclose(f);
  expect_refused(conv, 1, "bad.safetensors: truncated: header length");
  /* A peer weight file given as PEER-pytorch's. */
  save_layer("d_model=8,n_heads=2,d_key=4,n_subkeys=4,top_k=2", "peer.safetensors");
  expect_refused("--from peer-pytorch peer.safetensors --out w.safetensors", 1,
                 "already a peer weight file");
  /* Settings PEER-pytorch cannot have. */
  write_pt("pt.safetensors", (pt_variant){0});
  expect_refused("--from peer-pytorch pt.safetensors --out w.safetensors --gate relu --top-k 2", 2,
                 "one expert per head");
  expect_refused("--from peer-pytorch pt.safetensors --out w.safetensors --gate sigmoid", 2,
                 "--gate");
  expect_refused("--from tensorflow pt.safetensors --out w.safetensors", 2, "unknown layout");
  expect_refused("pt.safetensors --out w.safetensors", 2, "--from");
}

Test(convert, refuses_layers_pytorch_cannot_express) {
  static const struct {
    const char *config, *needle;
  } cases[] = {
      {"query_bias=1", "query_bias"},   {"query_norm=batchnorm", "batch norm"},
      {"shared_keys=1", "shared_keys"}, {"gate=sigmoid", "sigmoid"},
      {"gate=relu", "top_k=2"},
  };
  for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
    char config[160];
    snprintf(config, sizeof config, "d_model=8,n_heads=2,d_key=4,n_subkeys=4,top_k=2,%s",
             cases[i].config);
    save_layer(config, "w.safetensors");
    expect_refused("--to peer-pytorch w.safetensors --out pt.safetensors", 1, cases[i].needle);
  }
}

/* ----------------------------------------- the library's calls (peer.h) */

/* The library loads the hand-built file straight into a layer, reordered as
 * PEER.md says; the settings give what the file does not record. */
Test(convert, library_load_pytorch_reorders_and_takes_settings) {
  char path[128];
  write_pt("pt.safetensors", (pt_variant){0});
  peer_config settings;
  peer_config_default(&settings);
  settings.top_k = 1, settings.subkey_top_k = 3, settings.gate = PEER_GATE_RELU;
  settings.activation = PEER_ACT_SILU;
  settings.d_model = 999; /* shape fields of the settings are ignored */
  peer_layer *layer = NULL;
  cr_assert_eq(peer_layer_load_pytorch(&layer, path_in_dir("pt.safetensors", path, sizeof path),
                                       &settings, NULL),
               PEER_OK, "%s", peer_last_error());
  const peer_config *c = peer_layer_config(layer);
  cr_expect_eq(c->d_model, D);
  cr_expect_eq(c->n_heads, H);
  cr_expect_eq(c->d_key, 2 * DK);
  cr_expect_eq(c->n_subkeys, N_SUB);
  cr_expect_eq(c->top_k, 1);
  cr_expect_eq(c->subkey_top_k, 3);
  cr_expect_eq(c->gate, PEER_GATE_RELU);
  cr_expect_eq(c->activation, PEER_ACT_SILU);
  cr_expect_eq(c->weight_dtype, PEER_F32);
  peer_tensor q, keys, down;
  peer_layer_param_by_name(layer, "query.weight", &q);
  peer_layer_param_by_name(layer, "keys", &keys);
  peer_layer_param_by_name(layer, "experts.down", &down);
  const float *qv = q.data, *kv = keys.data, *dv = down.data;
  for (int h = 0; h < H; h++)
    for (int p = 0; p < 2; p++)
      for (int j = 0; j < DK; j++) {
        for (int col = 0; col < D; col++)
          cr_expect_eq(qv[(h * 2 * DK + p * DK + j) * D + col],
                       pt_query(p * H * DK + h * DK + j, col));
        for (int a = 0; a < N_SUB; a++)
          cr_expect_eq(kv[((h * 2 + p) * N_SUB + a) * DK + j], pt_key(h, a, p, j));
      }
  for (int i = 0; i < N_EXP; i++)
    cr_expect_eq(dv[i * D + 2], pt_expert(0, i, 2));

  /* NULL settings: peer_config_default's top_k 16 does not fit n = 3. */
  peer_layer *other = (peer_layer *)&other;
  cr_expect_eq(peer_layer_load_pytorch(&other, path, NULL, NULL), PEER_ERR_CONFIG);
  cr_expect_null(other, "a failed load left *out set");
  cr_expect(strstr(peer_last_error(), "top_k") != NULL, "%s", peer_last_error());
  peer_layer_free(layer);
}

/* Save through the library, read back through the library: the same bits,
 * and the file is PEER-pytorch's tensor set. */
Test(convert, library_round_trip_and_file_to_file) {
  char a_path[128], pt_path[128], b_path[128];
  path_in_dir("pt.safetensors", pt_path, sizeof pt_path);
  path_in_dir("b.safetensors", b_path, sizeof b_path);
  peer_layer *a =
      make_layer("d_model=12,n_heads=3,d_key=8,n_subkeys=6,top_k=4,weight_dtype=bf16", 3);
  cr_assert_eq(peer_layer_save_pytorch(a, pt_path), PEER_OK, "%s", peer_last_error());
  peer_safetensors *f = NULL;
  cr_assert_eq(peer_safetensors_open(&f, pt_path), PEER_OK, "%s", peer_last_error());
  cr_expect_eq(peer_safetensors_count(f), 4);
  peer_tensor t;
  cr_expect_eq(peer_safetensors_find(f, "keys", &t), PEER_OK);
  cr_expect(t.ndim == 4 && t.shape[0] == 3 && t.shape[1] == 6 && t.shape[2] == 2 &&
            t.shape[3] == 4);
  cr_expect_eq(peer_safetensors_find(f, "weight_up_embed.weight", &t), PEER_OK);
  cr_expect_eq(t.dtype, PEER_BF16);
  cr_expect_str_eq(peer_safetensors_metadata(f, "format"), "pt");
  peer_safetensors_close(f);

  peer_config settings;
  peer_config_default(&settings);
  settings.top_k = 4;
  cr_assert_eq(peer_convert_from_pytorch(pt_path, b_path, &settings), PEER_OK, "%s",
               peer_last_error());
  peer_layer *b = load("b.safetensors");
  cr_expect_eq(memcmp(peer_layer_config(a), peer_layer_config(b), sizeof(peer_config)), 0);
  for (int i = 0; i < peer_layer_n_params(a); i++) {
    peer_tensor ta, tb;
    peer_layer_param(a, i, &ta);
    cr_assert_eq(peer_layer_param_by_name(b, ta.name, &tb), PEER_OK);
    cr_expect_eq(memcmp(ta.data, tb.data, ta.nbytes), 0, "%s differs", ta.name);
  }
  /* And back again, file to file: the same PEER-pytorch bytes. */
  path_in_dir("pt2.safetensors", a_path, sizeof a_path);
  cr_assert_eq(peer_convert_to_pytorch(b_path, a_path), PEER_OK, "%s", peer_last_error());
  char cmd[512];
  snprintf(cmd, sizeof cmd, "cmp -s '%s' '%s'", pt_path, a_path);
  cr_expect_eq(system(cmd), 0, "PEER-pytorch files differ after a round trip");
  peer_layer_free(a);
  peer_layer_free(b);
}

Test(convert, library_refusals_name_the_problem) {
  char path[128], out[128];
  path_in_dir("w.safetensors", path, sizeof path);
  path_in_dir("pt.safetensors", out, sizeof out);
  static const struct {
    const char *config, *needle;
  } cases[] = {{"query_bias=1", "query_bias"},
               {"query_norm=batchnorm", "query_norm"},
               {"shared_keys=1", "shared_keys"},
               {"gate=sigmoid", "sigmoid"},
               {"gate=relu", "top_k=2"}};
  for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
    char config[160], args[600];
    snprintf(config, sizeof config, "d_model=8,n_heads=2,d_key=4,n_subkeys=4,top_k=2,%s",
             cases[i].config);
    peer_layer *layer = make_layer(config, 1);
    cr_expect_eq(peer_layer_save_pytorch(layer, out), PEER_ERR_UNSUPPORTED, "%s", config);
    cr_expect(strstr(peer_last_error(), cases[i].needle) != NULL, "%s: %s", config,
              peer_last_error());
    cr_expect_eq(peer_config_pytorch_args(peer_layer_config(layer), args, sizeof args),
                 PEER_ERR_UNSUPPORTED, "%s", config);
    /* The same settings are refused when loading. */
    write_pt("pt_in.safetensors", (pt_variant){0});
    char in[128];
    peer_layer *none = NULL;
    cr_expect_eq(peer_layer_load_pytorch(&none, path_in_dir("pt_in.safetensors", in, sizeof in),
                                         peer_layer_config(layer), NULL),
                 PEER_ERR_CONFIG, "%s", config);
    cr_expect(strstr(peer_last_error(), cases[i].needle) != NULL, "%s: %s", config,
              peer_last_error());
    peer_layer_free(layer);
  }
  /* What PEER-pytorch can express gives its constructor call. */
  peer_layer *layer = make_layer("d_model=8,n_heads=2,d_key=4,n_subkeys=4,top_k=2", 1);
  char args[512];
  cr_assert_eq(peer_config_pytorch_args(peer_layer_config(layer), args, sizeof args), PEER_OK, "%s",
               peer_last_error());
  cr_expect_str_eq(args, "PEER(dim=8, heads=2, num_experts=16, num_experts_per_head=2, "
                         "dim_key=2, product_key_topk=2, non_competing_scores=False, "
                         "activation=nn.GELU)");
  cr_expect_eq(peer_config_pytorch_args(peer_layer_config(layer), args, 20),
               PEER_ERR_INVALID_ARGUMENT);
  /* A peer weight file is not a PEER-pytorch one; missing files and NULLs. */
  cr_assert_eq(peer_layer_save(layer, path), PEER_OK);
  peer_layer *none = NULL;
  cr_expect_eq(peer_layer_load_pytorch(&none, path, NULL, NULL), PEER_ERR_FORMAT);
  cr_expect(strstr(peer_last_error(), "already a peer weight file"), "%s", peer_last_error());
  cr_expect_eq(peer_layer_load_pytorch(&none, "/nonexistent/pt.safetensors", NULL, NULL),
               PEER_ERR_IO);
  cr_expect_eq(peer_layer_load_pytorch(NULL, path, NULL, NULL), PEER_ERR_INVALID_ARGUMENT);
  cr_expect_eq(peer_layer_save_pytorch(NULL, out), PEER_ERR_INVALID_ARGUMENT);
  cr_expect_eq(peer_convert_to_pytorch(NULL, out), PEER_ERR_INVALID_ARGUMENT);
  cr_expect_eq(peer_convert_from_pytorch(path, NULL, NULL), PEER_ERR_INVALID_ARGUMENT);
  peer_options opt;
  peer_options_default(&opt);
  opt.backend = PEER_BACKEND_CUDA;
  write_pt("pt_in.safetensors", (pt_variant){0});
  char in[128];
  cr_expect_eq(
      peer_layer_load_pytorch(&none, path_in_dir("pt_in.safetensors", in, sizeof in), NULL, &opt),
      PEER_ERR_UNSUPPORTED);
  peer_layer_free(layer);
}
