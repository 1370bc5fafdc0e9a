/* test_faults.c: what threads, processes and full disks can do to a layer
 * and its files (issue 14): one layer used from two threads gets a clear
 * PEER_ERR_BUSY and never a wrong result, two layers on two threads run
 * freely, contexts and optimizers of another (or a freed) layer are refused,
 * in-place outputs are refused, concurrent saves to one path leave one whole
 * file, a save killed with SIGKILL leaves the old or the new file and its
 * temporary is removed by the next save, SIGINT with
 * peer_remove_temporaries leaves no temporary, and a full disk (a small
 * tmpfs, when the test may mount one) fails cleanly. */
#define _GNU_SOURCE /* unshare, nftw */
#include <criterion/criterion.h>

#include <dirent.h>
#include <errno.h>
#include <ftw.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "internal.h"
#include "tempdir.h"

static void setup(void) { test_dir_make("faults"); }

static void teardown(void) { test_dir_remove(); }

TestSuite(faults, .init = setup, .fini = teardown);

static void expect_fail(peer_status got, peer_status want, const char *word) {
  cr_assert_eq(got, want, "status %d (%s), want %d (%s); message: %s", (int)got,
               peer_status_string(got), (int)want, peer_status_string(want), peer_last_error());
  if (word)
    cr_assert(strstr(peer_last_error(), word), "message \"%s\" lacks \"%s\"", peer_last_error(),
              word);
}

static peer_layer *make_layer(const char *text, uint64_t seed) {
  peer_config cfg;
  peer_config_default(&cfg);
  cr_assert_eq(peer_config_parse(&cfg, text), PEER_OK, "%s", peer_last_error());
  peer_layer *L = NULL;
  cr_assert_eq(peer_layer_create(&L, &cfg, NULL), PEER_OK, "%s", peer_last_error());
  cr_assert_eq(peer_layer_init(L, seed), PEER_OK, "%s", peer_last_error());
  return L;
}

#define SMALL "d_model=32,n_heads=2,d_key=16,n_subkeys=16,top_k=4"

static float *random_x(int64_t T, int64_t d, unsigned seed) {
  float *x = malloc((size_t)(T * d) * sizeof *x);
  srand(seed);
  for (int64_t i = 0; i < T * d; i++)
    x[i] = (float)rand() / (float)RAND_MAX * 2.0f - 1.0f;
  return x;
}

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

/* The file at path holds exactly the parameters of one of the layers. */
static int which_layer(const char *path, peer_layer *const *layers, int n) {
  peer_layer *got = NULL;
  peer_status st = peer_layer_load(&got, path, NULL);
  cr_assert_eq(st, PEER_OK, "the file does not load: %s", peer_last_error());
  int found = -1;
  for (int k = 0; k < n && found < 0; k++) {
    if (peer_layer_n_params(got) != peer_layer_n_params(layers[k])) continue;
    bool same = true;
    for (int i = 0; same && i < peer_layer_n_params(got); i++) {
      peer_tensor a, b;
      peer_layer_param(got, i, &a);
      peer_layer_param(layers[k], i, &b);
      same = a.nbytes == b.nbytes && memcmp(a.data, b.data, a.nbytes) == 0;
    }
    if (same) found = k;
  }
  peer_layer_free(got);
  return found;
}

/* ---------------------------------------------------------------- threads */

Test(faults, busy_status_has_a_name) {
  const char *s = peer_status_string(PEER_ERR_BUSY);
  for (int t = 0; t < PEER_ERR_BUSY; t++)
    cr_assert_str_neq(s, peer_status_string((peer_status)t));
  cr_assert_eq((int)PEER_ERR_BUSY, 12, "status values are pinned");
}

/* While a call holds the layer, every other call on it is refused with
 * PEER_ERR_BUSY naming both calls, and nothing is written. */
Test(faults, a_busy_layer_refuses_other_calls) {
  peer_layer *L = make_layer(SMALL, 1);
  const int64_t T = 8, d = 32, thk = T * 2 * 4;
  float *x = random_x(T, d, 1), *y = calloc((size_t)(T * d), sizeof *y);
  int64_t *ids = calloc((size_t)thk, sizeof *ids);
  peer_context *ctx = NULL;
  cr_assert_eq(peer_context_create(&ctx, L, T), PEER_OK);
  peer_optim_config oc = peer_optim_config_default();
  peer_optimizer *o = NULL;
  cr_assert_eq(peer_optimizer_create(&o, L, &oc), PEER_OK);
  peer_grads g = {0};

  cr_assert_eq(peer_layer_enter(L, "forward"), PEER_OK); /* as another thread's call would */
  expect_fail(peer_forward(L, T, x, y, NULL, NULL), PEER_ERR_BUSY, "forward");
  cr_assert(strstr(peer_last_error(), "another thread is in forward"), "%s", peer_last_error());
  for (int64_t i = 0; i < T * d; i++)
    cr_assert_eq(y[i], 0.0f, "y was written by a refused call");
  expect_fail(peer_retrieve(L, T, x, ids, NULL, NULL), PEER_ERR_BUSY, "retrieve");
  expect_fail(peer_forward_train(L, ctx, T, x, y), PEER_ERR_BUSY, "forward_train");
  expect_fail(peer_backward(L, ctx, y, NULL, &g), PEER_ERR_BUSY, "backward");
  expect_fail(peer_optimizer_step(o, &g), PEER_ERR_BUSY, "optimizer_step");
  expect_fail(peer_layer_init(L, 2), PEER_ERR_BUSY, "layer_init");
  expect_fail(peer_layer_save(L, test_path("w.safetensors")), PEER_ERR_BUSY, "layer_save");
  expect_fail(peer_checkpoint_save(L, o, test_path("c.safetensors")), PEER_ERR_BUSY,
              "checkpoint_save");
  peer_layer_leave(L);

  cr_assert_eq(peer_forward(L, T, x, y, NULL, NULL), PEER_OK, "%s", peer_last_error());
  cr_assert_eq(peer_checkpoint_save(L, o, test_path("c.safetensors")), PEER_OK);
  cr_assert_eq(peer_layer_enter(L, "optimizer_step"), PEER_OK);
  expect_fail(peer_checkpoint_load(L, o, test_path("c.safetensors")), PEER_ERR_BUSY,
              "checkpoint_load");
  peer_layer_leave(L);
  cr_assert_eq(peer_checkpoint_load(L, o, test_path("c.safetensors")), PEER_OK, "%s",
               peer_last_error());
  peer_optimizer_free(o);
  peer_context_free(ctx);
  free(ids);
  free(y);
  free(x);
  peer_layer_free(L);
}

typedef struct hammer {
  peer_layer *L;
  const float *x, *want;
  int64_t T, d;
  int iters;
  atomic_int *go;
  int ok, busy, wrong, other;
} hammer;

static void *hammer_forward(void *arg) {
  hammer *h = arg;
  float *y = malloc((size_t)(h->T * h->d) * sizeof *y);
  while (!atomic_load(h->go))
    ;
  for (int it = 0; it < h->iters; it++) {
    peer_status st = peer_forward(h->L, h->T, h->x, y, NULL, NULL);
    if (st == PEER_OK) {
      h->ok++;
      if (memcmp(y, h->want, (size_t)(h->T * h->d) * sizeof *y) != 0) h->wrong++;
    } else if (st == PEER_ERR_BUSY)
      h->busy++;
    else
      h->other++;
  }
  free(y);
  return NULL;
}

static void run_hammers(hammer *h, int n) {
  pthread_t th[4];
  atomic_int go = 0;
  for (int i = 0; i < n; i++) {
    h[i].go = &go;
    cr_assert_eq(pthread_create(&th[i], NULL, hammer_forward, &h[i]), 0);
  }
  atomic_store(&go, 1);
  for (int i = 0; i < n; i++)
    pthread_join(th[i], NULL);
}

/* Two threads on one layer: every call either computes the right result or
 * is refused with PEER_ERR_BUSY; nothing else, no crash. */
Test(faults, one_layer_two_threads_busy_or_right, .timeout = 120) {
  peer_layer *L = make_layer(SMALL, 3);
  peer_layer_set_threads(L, 1);
  const int64_t d = 32;
  hammer h[2];
  float *want[2];
  for (int i = 0; i < 2; i++) {
    const int64_t T = 64 + 32 * i; /* different batches: shared scratch would mix them */
    float *x = random_x(T, d, 10u + (unsigned)i);
    want[i] = malloc((size_t)(T * d) * sizeof(float));
    cr_assert_eq(peer_forward(L, T, x, want[i], NULL, NULL), PEER_OK);
    h[i] = (hammer){.L = L, .x = x, .want = want[i], .T = T, .d = d, .iters = 400};
  }
  run_hammers(h, 2);
  for (int i = 0; i < 2; i++) {
    cr_log_info("thread %d: %d ok, %d busy", i, h[i].ok, h[i].busy);
    cr_assert_eq(h[i].wrong, 0, "thread %d: %d wrong results", i, h[i].wrong);
    cr_assert_eq(h[i].other, 0, "thread %d: %d calls failed otherwise", i, h[i].other);
    cr_assert_eq(h[i].ok + h[i].busy, 400);
    free((void *)h[i].x);
    free(want[i]);
  }
  peer_layer_free(L);
}

/* Two layers on two threads never see PEER_ERR_BUSY. */
Test(faults, two_layers_two_threads_run_freely, .timeout = 120) {
  peer_layer *L[2] = {make_layer(SMALL, 4), make_layer(SMALL, 5)};
  const int64_t T = 64, d = 32;
  hammer h[2];
  for (int i = 0; i < 2; i++) {
    peer_layer_set_threads(L[i], 1);
    float *x = random_x(T, d, 20u + (unsigned)i), *want = malloc((size_t)(T * d) * sizeof *want);
    cr_assert_eq(peer_forward(L[i], T, x, want, NULL, NULL), PEER_OK);
    h[i] = (hammer){.L = L[i], .x = x, .want = want, .T = T, .d = d, .iters = 300};
  }
  run_hammers(h, 2);
  for (int i = 0; i < 2; i++) {
    cr_assert_eq(h[i].ok, 300, "thread %d: %d ok, %d busy, %d other, %d wrong", i, h[i].ok,
                 h[i].busy, h[i].other, h[i].wrong);
    cr_assert_eq(h[i].wrong, 0);
    free((void *)h[i].x);
    free((void *)h[i].want);
    peer_layer_free(L[i]);
  }
}

/* ------------------------------------------------------ identity, aliasing */

/* A context or optimizer of a freed layer is refused by the next layer,
 * even when that layer took over the freed one's address. */
Test(faults, objects_of_a_freed_layer_are_refused) {
  peer_layer *A = make_layer(SMALL, 6);
  peer_context *ctx = NULL;
  cr_assert_eq(peer_context_create(&ctx, A, 8), PEER_OK);
  peer_optim_config oc = peer_optim_config_default();
  peer_optimizer *o = NULL;
  cr_assert_eq(peer_optimizer_create(&o, A, &oc), PEER_OK);
  uintptr_t old = (uintptr_t)A;
  peer_layer_free(A);
  peer_layer *B = make_layer(SMALL, 7);
  cr_log_info("the new layer %s the freed one's address",
              (uintptr_t)B == old ? "took" : "did not take");
  float *x = random_x(8, 32, 2), *y = calloc(8 * 32, sizeof *y);
  expect_fail(peer_forward_train(B, ctx, 8, x, y), PEER_ERR_INVALID_ARGUMENT, "another layer");
  expect_fail(peer_checkpoint_save(B, o, test_path("c.safetensors")), PEER_ERR_INVALID_ARGUMENT,
              "another layer");
  peer_context_free(ctx);
  peer_optimizer_free(o);
  free(x);
  free(y);
  peer_layer_free(B);
}

/* Outputs over inputs (y = x, in place, or shifted by a row) are refused
 * naming both buffers; separate buffers work. */
Test(faults, in_place_outputs_are_refused) {
  peer_layer *L = make_layer(SMALL, 8);
  const int64_t T = 8, d = 32, thk = T * 2 * 4;
  float *buf = random_x(T + 1, d, 3);
  int64_t *ids = malloc((size_t)thk * sizeof *ids);
  expect_fail(peer_forward(L, T, buf, buf, NULL, NULL), PEER_ERR_INVALID_ARGUMENT, "overlap");
  cr_assert(strstr(peer_last_error(), "x") && strstr(peer_last_error(), "y"));
  expect_fail(peer_forward(L, T, buf, buf + d, NULL, NULL), PEER_ERR_INVALID_ARGUMENT, "overlap");
  expect_fail(peer_forward(L, T, buf + d, buf, NULL, NULL), PEER_ERR_INVALID_ARGUMENT, "overlap");
  expect_fail(peer_forward(L, T, buf, ids == NULL ? NULL : (float *)(void *)ids, ids, NULL),
              PEER_ERR_INVALID_ARGUMENT, "indices");
  expect_fail(peer_retrieve(L, T, buf, (int64_t *)(void *)buf, NULL, NULL),
              PEER_ERR_INVALID_ARGUMENT, "overlap");
  float *y = malloc((size_t)(T * d) * sizeof *y);
  cr_assert_eq(peer_forward(L, T, buf, y, ids, NULL), PEER_OK, "%s", peer_last_error());

  peer_context *ctx = NULL;
  cr_assert_eq(peer_context_create(&ctx, L, T), PEER_OK);
  expect_fail(peer_forward_train(L, ctx, T, buf, buf), PEER_ERR_INVALID_ARGUMENT, "overlap");
  cr_assert_eq(peer_forward_train(L, ctx, T, buf, y), PEER_OK, "%s", peer_last_error());
  peer_grads g = {0};
  expect_fail(peer_backward(L, ctx, y, y, &g), PEER_ERR_INVALID_ARGUMENT, "dy");
  expect_fail(peer_backward(L, ctx, y, buf, &g), PEER_ERR_INVALID_ARGUMENT, "x of the training");
  float *dx = malloc((size_t)(T * d) * sizeof *dx);
  cr_assert_eq(peer_backward(L, ctx, y, dx, &g), PEER_OK, "%s", peer_last_error());
  peer_context_free(ctx);
  free(dx);
  free(y);
  free(ids);
  free(buf);
  peer_layer_free(L);
}

/* ------------------------------------------------------------------- saves */

typedef struct saver {
  peer_layer *L;
  const char *path;
  int iters, failed;
  char why[256];
} saver;

static void *save_loop(void *arg) {
  saver *s = arg;
  for (int i = 0; i < s->iters; i++)
    if (peer_layer_save(s->L, s->path) != PEER_OK && !s->failed++)
      snprintf(s->why, sizeof s->why, "%s", peer_last_error());
  return NULL;
}

/* Four threads saving four layers to one path: every save succeeds, the
 * file is always one of them whole, and no temporary is left. */
Test(faults, concurrent_saves_to_one_path_leave_one_whole_file, .timeout = 120) {
  enum { N = 4 };
  peer_layer *L[N];
  saver s[N];
  pthread_t th[N];
  const char *path = test_path("shared.safetensors");
  for (int i = 0; i < N; i++) {
    L[i] = make_layer(SMALL, 100u + (uint64_t)i);
    s[i] = (saver){.L = L[i], .path = path, .iters = 25};
  }
  for (int i = 0; i < N; i++)
    cr_assert_eq(pthread_create(&th[i], NULL, save_loop, &s[i]), 0);
  int loads = 0;
  for (int i = 0; i < 20; i++) /* read while they write */
    if (access(path, F_OK) == 0) {
      cr_assert_geq(which_layer(path, L, N), 0, "a load saw a file of no single save");
      loads++;
    }
  for (int i = 0; i < N; i++)
    pthread_join(th[i], NULL);
  for (int i = 0; i < N; i++)
    cr_assert_eq(s[i].failed, 0, "thread %d: %d saves failed: %s", i, s[i].failed, s[i].why);
  cr_assert_geq(which_layer(path, L, N), 0, "the file is no single save");
  cr_assert_eq(count_temporaries(), 0, "temporaries left behind");
  cr_log_info("%d loads during the saves", loads);
  for (int i = 0; i < N; i++)
    peer_layer_free(L[i]);
}

#define BIG "d_model=256,n_heads=2,d_key=16,n_subkeys=128,top_k=4" /* 32 MiB of experts */

/* A process killed with SIGKILL in the middle of saves: the destination is
 * the old file or a new one, whole; the next save removes the temporary. */
Test(faults, a_killed_save_leaves_old_or_new_and_no_litter, .timeout = 240) {
  peer_layer *L[2] = {make_layer(BIG, 200), make_layer(BIG, 201)};
  const char *path = test_path("killed.safetensors");
  cr_assert_eq(peer_layer_save(L[0], path), PEER_OK, "%s", peer_last_error());
  int left_behind = 0;
  for (int round = 0; round < 6; round++) {
    pid_t child = fork();
    cr_assert_geq(child, 0);
    if (child == 0) {
      for (;;)
        peer_layer_save(L[1], path);
    }
    struct timespec nap = {0, 20000000L + 37000000L * round}; /* 20 .. 205 ms */
    nanosleep(&nap, NULL);
    kill(child, SIGKILL);
    waitpid(child, NULL, 0);
    cr_assert_geq(which_layer(path, L, 2), 0, "round %d: the file is partial", round);
    left_behind += count_temporaries();
  }
  cr_log_info("%d temporaries left by killed saves", left_behind);
  cr_assert_eq(peer_layer_save(L[0], path), PEER_OK, "%s", peer_last_error());
  cr_assert_eq(count_temporaries(), 0, "the next save did not remove the killed saves' litter");
  cr_assert_eq(which_layer(path, L, 2), 0);
  peer_layer_free(L[0]);
  peer_layer_free(L[1]);
}

static void on_sigint(int sig) {
  peer_remove_temporaries();
  signal(sig, SIG_DFL);
  raise(sig);
}

/* SIGINT during saves, with a handler that calls peer_remove_temporaries
 * (as the peer CLI does): no temporary is left, the file is old or new. */
Test(faults, sigint_removes_the_temporary, .timeout = 240) {
  peer_layer *L[2] = {make_layer(BIG, 300), make_layer(BIG, 301)};
  const char *path = test_path("interrupted.safetensors");
  cr_assert_eq(peer_layer_save(L[0], path), PEER_OK, "%s", peer_last_error());
  for (int round = 0; round < 4; round++) {
    pid_t child = fork();
    cr_assert_geq(child, 0);
    if (child == 0) {
      signal(SIGINT, on_sigint);
      for (;;)
        peer_layer_save(L[1], path);
    }
    struct timespec nap = {0, 30000000L + 41000000L * round};
    nanosleep(&nap, NULL);
    kill(child, SIGINT);
    int status;
    waitpid(child, &status, 0);
    cr_assert(WIFSIGNALED(status) && WTERMSIG(status) == SIGINT);
    cr_assert_eq(count_temporaries(), 0, "round %d: a temporary survived SIGINT", round);
    cr_assert_geq(which_layer(path, L, 2), 0, "round %d: the file is partial", round);
  }
  peer_layer_free(L[0]);
  peer_layer_free(L[1]);
}

/* A full disk: a 1 MiB tmpfs mounted over the test's directory in a private
 * mount namespace (root only).  The save that does not fit fails with a
 * message naming the reason, leaves the old file and no temporary. */
Test(faults, a_full_disk_fails_cleanly) {
  if (geteuid() != 0) cr_skip_test("full disk: needs root to mount a small tmpfs");
  if (unshare(CLONE_NEWNS) != 0 || mount(NULL, "/", NULL, MS_REC | MS_PRIVATE, NULL) != 0 ||
      mount("tmpfs", test_dir, "tmpfs", 0, "size=1m") != 0)
    cr_skip_test("full disk: cannot mount a tmpfs here (%s)", strerror(errno));
  peer_layer *small = make_layer(SMALL, 400), *big = make_layer(BIG, 401);
  const char *path = test_path("full.safetensors");
  cr_assert_eq(peer_layer_save(small, path), PEER_OK, "%s", peer_last_error());
  expect_fail(peer_layer_save(big, path), PEER_ERR_IO, "No space left");
  peer_layer *L[1] = {small};
  cr_assert_eq(which_layer(path, L, 1), 0, "the old file changed");
  cr_assert_eq(count_temporaries(), 0, "the failed save left its temporary");
  cr_assert_eq(peer_layer_save(small, path), PEER_OK, "%s", peer_last_error());
  umount(test_dir);
  peer_layer_free(small);
  peer_layer_free(big);
}

/* -------------------------------------------------------------- the CLI */

#ifdef PEER_CLI
/* Run the built `peer` with args in the test's directory; its exit status
 * (128 + signal when killed), stderr into err. */
static int run_cli(const char *args, char *err, size_t size) {
  char cmd[1024], err_path[300];
  snprintf(err_path, sizeof err_path, "%s/stderr.txt", test_dir);
  snprintf(cmd, sizeof cmd, "cd '%s' && timeout 20 '%s' %s >/dev/null 2>'%s'", test_dir, PEER_CLI,
           args, err_path);
  int st = system(cmd);
  FILE *f = fopen(err_path, "r");
  cr_assert(f);
  size_t n = fread(err, 1, size - 1, f);
  err[n] = '\0';
  fclose(f);
  return WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
}

/* `peer info` fails (exit 1, the library's reason) on every file that
 * loading refuses, and returns at once on a FIFO or a 2 KB file whose
 * metadata describes gigabytes. */
Test(faults, peer_info_fails_where_loading_fails, .timeout = 60) {
  char err[2048];
  peer_layer *L = make_layer(SMALL, 500);
  cr_assert_eq(peer_layer_save(L, test_path("good.safetensors")), PEER_OK);
  cr_assert_eq(run_cli("info good.safetensors", err, sizeof err), 0, "%s", err);

  /* the same tensors and metadata plus one extra tensor (exit 0 before) */
  peer_safetensors *f = NULL;
  cr_assert_eq(peer_safetensors_open(&f, test_path("good.safetensors")), PEER_OK);
  int n = peer_safetensors_count(f);
  peer_tensor t[16];
  for (int i = 0; i < n; i++) {
    peer_safetensors_info(f, i, &t[i]);
    t[i].data = malloc(t[i].nbytes);
    cr_assert_eq(peer_safetensors_read(f, t[i].name, t[i].data, t[i].nbytes), PEER_OK);
  }
  float extra[2] = {1, 2};
  t[n] = (peer_tensor){.name = "head.weight",
                       .dtype = PEER_F32,
                       .ndim = 1,
                       .shape = {2},
                       .data = extra,
                       .nbytes = sizeof extra};
  peer_layer_meta lm;
  cr_assert_eq(peer_layer_meta_of(peer_layer_config(L), &lm), PEER_OK);
  cr_assert_eq(
      peer_safetensors_write(test_path("extra.safetensors"), t, n + 1, lm.pair, lm.n_pairs),
      PEER_OK, "%s", peer_last_error());
  peer_layer *back = NULL;
  expect_fail(peer_layer_load(&back, test_path("extra.safetensors"), NULL), PEER_ERR_FORMAT,
              "head.weight");
  cr_assert_eq(run_cli("info extra.safetensors", err, sizeof err), 1, "stderr: %s", err);
  cr_assert(strstr(err, "head.weight") && strstr(err, "extra"), "stderr: %s", err);
  for (int i = 0; i < n; i++)
    free(t[i].data);
  peer_safetensors_close(f);

  /* issue 14's 2 KB file: refused by the size bound, not after 8.5 GB */
  static float small[16];
  const char *names[] = {"query.weight",           "query.norm.weight",
                         "query.norm.bias",        "query.norm.running_mean",
                         "query.norm.running_var", "keys",
                         "experts.down",           "experts.up"};
  peer_tensor tiny[8];
  for (int i = 0; i < 8; i++)
    tiny[i] = (peer_tensor){.name = names[i],
                            .dtype = PEER_F32,
                            .ndim = 1,
                            .shape = {16},
                            .data = small,
                            .nbytes = sizeof small};
  peer_config huge;
  peer_config_default(&huge);
  cr_assert_eq(peer_config_parse(&huge, "d_model=1,n_heads=1024,d_key=1048576,n_subkeys=1,"
                                        "top_k=1,query_norm=batchnorm"),
               PEER_OK);
  cr_assert_eq(peer_layer_meta_of(&huge, &lm), PEER_OK);
  cr_assert_eq(peer_safetensors_write(test_path("tiny.safetensors"), tiny, 8, lm.pair, lm.n_pairs),
               PEER_OK, "%s", peer_last_error());
  struct timespec t0, t1;
  clock_gettime(CLOCK_MONOTONIC, &t0);
  cr_assert_eq(run_cli("info tiny.safetensors", err, sizeof err), 1, "stderr: %s", err);
  clock_gettime(CLOCK_MONOTONIC, &t1);
  cr_assert(strstr(err, "refused before allocating"), "stderr: %s", err);
  double secs = (double)(t1.tv_sec - t0.tv_sec) + 1e-9 * (double)(t1.tv_nsec - t0.tv_nsec);
  cr_assert_lt(secs, 5.0, "peer info took %.1f s on a 2 KB file", secs);

  /* a FIFO: refused at once (it waited for a writer forever before) */
  cr_assert_eq(mkfifo(test_path("fifo.safetensors"), 0600), 0);
  cr_assert_eq(run_cli("info fifo.safetensors", err, sizeof err), 1, "stderr: %s", err);
  cr_assert(strstr(err, "FIFO"), "stderr: %s", err);
  peer_layer_free(L);
}

/* SIGINT to `peer init` while its temporary exists (polled for): it dies
 * of the signal, leaves no temporary, and the old file is still there. */
Test(faults, peer_cli_sigint_leaves_no_temporary, .timeout = 240) {
  peer_layer *old = make_layer(SMALL, 600);
  cr_assert_eq(peer_layer_save(old, test_path("w.safetensors")), PEER_OK);
  for (int round = 0; round < 2; round++) {
    char cmd[1024];
    snprintf(cmd, sizeof cmd,
             "cd '%s' && '%s' init --config d_model=256,n_subkeys=256 --seed 1 "
             "--out w.safetensors >/dev/null 2>&1 & pid=$!; i=0; "
             "until ls '%s' | grep -q peer-tmp || [ $i -ge 4000 ]; do sleep 0.005; i=$((i+1)); "
             "done; kill -INT $pid; wait $pid",
             test_dir, PEER_CLI, test_dir);
    int st = system(cmd);
    cr_assert(WIFEXITED(st) && WEXITSTATUS(st) == 128 + SIGINT,
              "round %d: `peer init` did not die of SIGINT during its save (status %d)", round,
              WIFEXITED(st) ? WEXITSTATUS(st) : -1);
    cr_assert_eq(count_temporaries(), 0, "round %d: `peer init` left a temporary", round);
    peer_layer *L[1] = {old};
    cr_assert_eq(which_layer(test_path("w.safetensors"), L, 1), 0, "the old file changed");
  }
  peer_layer_free(old);
}
#endif
