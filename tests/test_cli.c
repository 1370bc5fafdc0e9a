/* test_cli.c: the `peer` tool's user-facing behaviour that no other test
 * covers: `peer random` (the input files of forward and grad), and the
 * one-line errors a user meets first (a missing file named once as "cannot
 * open", a truncated file called truncated, a top_k too large for n_subkeys
 * reported as a top_k problem, blanks in --config accepted).  Runs the built
 * tool (PEER_CLI) in a fresh directory. */
#define _GNU_SOURCE /* nftw, mkdtemp (tempdir.h) */
#include <criterion/criterion.h>

#include "peer.h"
#include "tempdir.h"

#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#ifndef PEER_CLI
#error "PEER_CLI (path of the built peer tool) must be defined by the build"
#endif

static void make_dir(void) { test_dir_make("cli"); }

TestSuite(cli, .init = make_dir, .fini = test_dir_remove);

static const char *in_dir(const char *name, char *buf, size_t size) {
  snprintf(buf, size, "%s/%s", test_dir, name);
  return buf;
}

/* Run `peer ARGS` in the test directory; returns the exit status, stdout in
 * out and stderr in err. */
static int run(const char *args, char *out, char *err, size_t size) {
  char cmd[1024], out_path[128], err_path[128];
  in_dir("stdout.txt", out_path, sizeof out_path);
  in_dir("stderr.txt", err_path, sizeof err_path);
  snprintf(cmd, sizeof cmd, "cd '%s' && '%s' %s >'%s' 2>'%s'", test_dir, PEER_CLI, args, out_path,
           err_path);
  int st = system(cmd);
  cr_assert(WIFEXITED(st), "'%s' did not exit normally", cmd);
  const char *paths[2] = {out_path, err_path};
  char *bufs[2] = {out, err};
  for (int i = 0; i < 2; i++) {
    FILE *f = fopen(paths[i], "r");
    cr_assert(f);
    size_t n = fread(bufs[i], 1, size - 1, f);
    bufs[i][n] = '\0';
    fclose(f);
  }
  return WEXITSTATUS(st);
}

static int count(const char *s, const char *needle) {
  int n = 0;
  for (const char *p = s; (p = strstr(p, needle)); p += strlen(needle))
    n++;
  return n;
}

/* The command must fail with `status`, one stderr line "peer: <cmd>: ..."
 * naming `needle`. */
static void expect_error(const char *args, int status, const char *prefix, const char *needle) {
  char out[4096], err[4096];
  int rc = run(args, out, err, sizeof err);
  cr_expect_eq(rc, status, "peer %s: exit %d, wanted %d (stderr: %s)", args, rc, status, err);
  cr_expect_eq(count(err, "\n"), 1, "peer %s: stderr is not one line: %s", args, err);
  cr_expect(strncmp(err, prefix, strlen(prefix)) == 0, "peer %s: stderr: %s", args, err);
  cr_expect(strstr(err, needle) != NULL, "peer %s: stderr lacks '%s': %s", args, needle, err);
}

static float *read_tensor(const char *name, const char *tensor, peer_tensor *t) {
  char path[128];
  peer_safetensors *f = NULL;
  cr_assert_eq(peer_safetensors_open(&f, in_dir(name, path, sizeof path)), PEER_OK, "%s",
               peer_last_error());
  cr_assert_eq(peer_safetensors_find(f, tensor, t), PEER_OK, "%s", peer_last_error());
  float *data = malloc(t->nbytes);
  cr_assert_eq(peer_safetensors_read(f, tensor, data, t->nbytes), PEER_OK);
  peer_safetensors_close(f);
  return data;
}

Test(cli, random_writes_seeded_normal_inputs_for_forward_and_grad) {
  char out[4096], err[4096];
  cr_assert_eq(run("random --shape 300,16 --seed 7 --out x.safetensors", out, err, sizeof err), 0,
               "%s", err);
  cr_assert_eq(run("random --shape=300,16 --seed 7 --name dy --scale 2 --out dy.safetensors", out,
                   err, sizeof err),
               0, "%s", err);
  cr_assert_eq(run("random --shape 300,16 --seed 8 --out x8.safetensors", out, err, sizeof err), 0,
               "%s", err);
  peer_tensor t, u, v;
  float *x = read_tensor("x.safetensors", "x", &t);
  float *dy = read_tensor("dy.safetensors", "dy", &u);
  float *x8 = read_tensor("x8.safetensors", "x", &v);
  cr_expect(t.dtype == PEER_F32 && t.ndim == 2 && t.shape[0] == 300 && t.shape[1] == 16);
  double sum = 0, sq = 0;
  int same_seed = 1, other_seed_differs = 0;
  for (int i = 0; i < 300 * 16; i++) {
    sum += x[i], sq += (double)x[i] * x[i];
    same_seed &= dy[i] == 2.0f * x[i]; /* same seed, scaled */
    other_seed_differs |= x8[i] != x[i];
  }
  double mean = sum / 4800, var = sq / 4800 - mean * mean;
  cr_expect(fabs(mean) < 0.06 && fabs(var - 1.0) < 0.08, "mean %g, variance %g", mean, var);
  cr_expect(same_seed, "a seed does not give the same values");
  cr_expect(other_seed_differs, "another seed gives the same values");
  free(x), free(dy), free(x8);

  /* The files feed forward and grad as they are. */
  cr_assert_eq(run("init --config 'd_model=16, n_heads=2, d_key=8, n_subkeys=8, top_k=4' --out "
                   "w.safetensors",
                   out, err, sizeof err),
               0, "%s", err);
  cr_expect_eq(run("forward --weights w.safetensors --input x.safetensors --output y.safetensors",
                   out, err, sizeof err),
               0, "%s", err);
  cr_expect_eq(run("grad --weights w.safetensors --input x.safetensors --dy dy.safetensors "
                   "--output g.safetensors",
                   out, err, sizeof err),
               0, "%s", err);
  /* 3-D shapes, and the errors. */
  cr_expect_eq(run("random --shape 2,3,4 --out t.safetensors", out, err, sizeof err), 0, "%s", err);
  expect_error("random --out t.safetensors", 2, "peer: random: ", "--shape is required");
  expect_error("random --shape 2,x --out t.safetensors", 2, "peer: random: ", "--shape");
  expect_error("random --shape 1,2,3,4,5 --out t.safetensors", 2, "peer: random: ", "more than 4");
  expect_error("random --shape 4 --seed -1 --out t.safetensors", 2, "peer: random: ", "--seed");
  expect_error("random --shape 4", 2, "peer: random: ", "--out is required");
}

Test(cli, errors_users_meet_first) {
  char out[4096], err[4096];
  /* A missing file: "cannot open" once. */
  int rc = run("info missing.safetensors", out, err, sizeof err);
  cr_expect_eq(rc, 1);
  cr_expect_eq(count(err, "cannot open"), 1, "'cannot open' not exactly once: %s", err);
  cr_expect(strstr(err, "missing.safetensors"), "%s", err);
  rc = run("forward --weights missing.safetensors --input x.safetensors --output y.safetensors",
           out, err, sizeof err);
  cr_expect_eq(count(err, "cannot open"), 1, "'cannot open' not exactly once: %s", err);

  /* A truncated weight file says so, whichever part the cut lands in. */
  cr_assert_eq(run("init --config d_model=16,n_heads=2,d_key=8,n_subkeys=8,top_k=4 --out "
                   "w.safetensors",
                   out, err, sizeof err),
               0, "%s", err);
  char path[128], cmd[512];
  in_dir("w.safetensors", path, sizeof path);
  snprintf(cmd, sizeof cmd,
           "head -c 100 '%s' > '%s/head.safetensors' && head -c 2000 '%s' > "
           "'%s/data.safetensors'",
           path, test_dir, path, test_dir);
  cr_assert_eq(system(cmd), 0);
  expect_error("info head.safetensors", 1, "peer: info: ", "truncated");
  expect_error("info data.safetensors", 1, "peer: info: ", "truncated");
  expect_error("check data.safetensors", 1, "peer: check: ", "truncated");

  /* top_k beyond n_subkeys (subkey_top_k left to default to it) is a top_k
   * problem. */
  expect_error("init --config top_k=300,n_subkeys=256 --out z.safetensors", 2,
               "peer: init: ", "--config: top_k: 300 exceeds n_subkeys 256");
  /* Blanks after commas are accepted; unknown keys still named. */
  cr_expect_eq(run("init --config 'n_subkeys=16, d_model=32, top_k=4' --out z.safetensors", out,
                   err, sizeof err),
               0, "%s", err);
  expect_error("init --config 'n_subkeys=16, colour=blue' --out z.safetensors", 2,
               "peer: init: ", "unknown config key 'colour'");
}
