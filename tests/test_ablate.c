/* test_ablate.c: peer-ablate.  Usage and unevenness (PEER.md "Metrics") against
 * values worked out by hand; the synthetic source's entropy rate against its
 * definition (stationary distribution found by power iteration, entropies
 * summed here in float64) and against the empirical code length of a long
 * sample; a tiny sweep run end to end (CSV, JSON, plot); and a sweep stopped
 * twice and resumed, which must end with the same numbers as one run
 * straight through. */
#include <criterion/criterion.h>

#include "ablate_source.h"
#include "peer.h"

#include <jansson.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#ifndef PEER_ABLATE
#error "PEER_ABLATE (path of the built peer-ablate) must be defined by the build"
#endif

/* ------------------------------------------------------------------ metrics */

static void metrics_of(const int64_t *ids, const float *gates, int n, int64_t N, double *usage,
                       double *unev) {
  double *z = calloc((size_t)N, sizeof *z);
  cr_assert_eq(peer_usage_accumulate(z, N, ids, gates, n), PEER_OK, "%s", peer_last_error());
  cr_assert_eq(peer_usage_metrics(z, N, usage, unev), PEER_OK, "%s", peer_last_error());
  free(z);
}

Test(ablate_metrics, hand_computed_small_cases) {
  double u, e;
  /* Two of four experts get mass 1 each: usage 1/2, unevenness log 4 - log 2. */
  int64_t a_ids[] = {0, 0, 1, 1};
  float a_g[] = {0.5f, 0.5f, 0.25f, 0.75f};
  metrics_of(a_ids, a_g, 4, 4, &u, &e);
  cr_expect_float_eq(u, 0.5, 1e-12);
  cr_expect_float_eq(e, log(2.0), 1e-12);
  /* Equal mass everywhere: usage 1, unevenness 0. */
  int64_t b_ids[] = {2, 0, 1};
  float b_g[] = {0.5f, 0.5f, 0.5f};
  metrics_of(b_ids, b_g, 3, 3, &u, &e);
  cr_expect_float_eq(u, 1.0, 1e-12);
  cr_expect_float_eq(e, 0.0, 1e-12);
  /* All mass on one of eight experts (two heads picking it): usage 1/8, log 8. */
  int64_t c_ids[] = {5, 5};
  float c_g[] = {1.0f, 1.0f};
  metrics_of(c_ids, c_g, 2, 8, &u, &e);
  cr_expect_float_eq(u, 0.125, 1e-12);
  cr_expect_float_eq(e, log(8.0), 1e-12);
  /* p = (1/4, 3/4) over N = 2: log 2 + 1/4 log 1/4 + 3/4 log 3/4 = 0.130812... */
  int64_t d_ids[] = {0, 1, 1, 1};
  float d_g[] = {1.0f, 1.0f, 1.0f, 1.0f};
  metrics_of(d_ids, d_g, 4, 2, &u, &e);
  cr_expect_float_eq(u, 1.0, 1e-12);
  cr_expect_float_eq(e, log(2.0) + 0.25 * log(0.25) + 0.75 * log(0.75), 1e-12);
  /* A zero gate is no use: expert 3 of 4 is kept with gate 0. */
  int64_t e_ids[] = {0, 3};
  float e_g[] = {1.0f, 0.0f};
  metrics_of(e_ids, e_g, 2, 4, &u, &e);
  cr_expect_float_eq(u, 0.25, 1e-12);
  cr_expect_float_eq(e, log(4.0), 1e-12);
}

/* ------------------------------------------------------------------- source */

/* Every context reachable from context 0.  The context chain's matrix is
 * doubly stochastic, so it has no transient states: reaching everything from
 * one context means the chain is irreducible and uniform is its only
 * stationary distribution. */
static bool irreducible(const ablate_source *src) {
  const int64_t n = src->n_contexts;
  char *seen = calloc((size_t)n, 1);
  int64_t *stack = malloc(sizeof(int64_t) * (size_t)n), top = 0, count = 1;
  seen[0] = 1, stack[top++] = 0;
  while (top) {
    int64_t c = stack[--top];
    for (int x = 0; x < src->alphabet; x++) {
      int64_t d = (c * src->alphabet + x) % n;
      if (ablate_source_prob(src, c, x) > 0.0 && !seen[d]) seen[d] = 1, stack[top++] = d, count++;
    }
  }
  free(seen), free(stack);
  return count == n;
}

/* Entropy rate from the definition: stationary distribution of the chain on
 * contexts by power iteration of the lazy chain (same fixed point, aperiodic),
 * then sum over contexts of pi(ctx) H(next | ctx). */
static void check_rate_by_definition(int A, int order, int K, uint64_t seed) {
  ablate_source src;
  cr_assert_eq(ablate_source_init(&src, A, order, K, seed), 0);
  cr_assert(irreducible(&src), "A=%d order=%d K=%d seed=%llu: chain not irreducible", A, order, K,
            (unsigned long long)seed);
  const int64_t n = src.n_contexts;
  double *pi = calloc((size_t)n, sizeof *pi), *next = calloc((size_t)n, sizeof *next);
  pi[0] = 1.0; /* far from uniform */
  for (int it = 0; it < 20000; it++) {
    for (int64_t c = 0; c < n; c++)
      next[c] = 0.5 * pi[c];
    for (int64_t c = 0; c < n; c++)
      for (int x = 0; x < A; x++) {
        double p = ablate_source_prob(&src, c, x);
        next[(c * A + x) % n] += 0.5 * pi[c] * p;
      }
    memcpy(pi, next, sizeof(double) * (size_t)n);
  }
  double rate = 0.0;
  for (int64_t c = 0; c < n; c++) {
    cr_expect(fabs(pi[c] - 1.0 / (double)n) < 1e-9, "A=%d c=%d: pi[%lld] = %.12f, not 1/%lld", A,
              order, (long long)c, pi[c], (long long)n);
    double h = 0.0, total = 0.0;
    for (int x = 0; x < A; x++) {
      double p = ablate_source_prob(&src, c, x);
      total += p;
      if (p > 0.0) h -= p * log(p);
    }
    cr_expect(fabs(total - 1.0) < 1e-12, "context %lld: probabilities sum to %.15f", (long long)c,
              total);
    rate += pi[c] * h;
  }
  double got = ablate_source_entropy_rate(&src);
  cr_expect(fabs(got - rate) < 1e-9, "A=%d order=%d K=%d: entropy rate %.12f, definition %.12f", A,
            order, K, got, rate);
  free(pi), free(next);
  ablate_source_free(&src);
}

Test(ablate_source, entropy_rate_matches_its_definition) {
  check_rate_by_definition(4, 2, 3, 5);
  check_rate_by_definition(3, 2, 3, 9); /* K = A: repeated next symbols are merged */
  check_rate_by_definition(5, 1, 3, 1);
  check_rate_by_definition(3, 3, 2, 2);
}

Test(ablate_source, sample_code_length_matches_the_rate) {
  ablate_source src;
  cr_assert_eq(ablate_source_init(&src, 16, 3, 4, 1), 0);
  cr_assert(irreducible(&src), "peer-ablate's default source is not irreducible");
  const int64_t n = getenv("PEER_TEST_QUICK") ? 200000 : 1000000;
  uint8_t *s = malloc((size_t)n);
  ablate_source_generate(&src, 77, n, s);
  double sum = 0.0;
  for (int64_t t = 3; t < n; t++)
    sum -= log(ablate_source_prob(&src, ablate_source_context(&src, s + t - 3), s[t]));
  double mean = sum / (double)(n - 3), rate = ablate_source_entropy_rate(&src);
  /* Per-symbol code lengths have variance below 2: the standard error is < 0.004. */
  cr_expect(fabs(mean - rate) < 0.015, "sample: %.5f nats/symbol, entropy rate %.5f", mean, rate);
  free(s);
  ablate_source_free(&src);
}

/* ----------------------------------------------------------------- the tool */

static const char tiny[] =
    "--tokens 3072 --batch 64 --d-model 16 --d-key 8 --context 4 --heads 2 --top-k 2 "
    "--corpus 20000 --val-tokens 512 --alphabet 8 --order 2 --branch 2 --threads 2";

/* Run peer-ablate with args; return its exit status. */
static int run_tool(const char *dir, const char *args) {
  char cmd[2048];
  snprintf(cmd, sizeof cmd, "'%s' --out '%s' %s %s >'%s.log' 2>&1", PEER_ABLATE, dir, tiny, args,
           dir);
  int st = system(cmd);
  cr_assert(WIFEXITED(st), "peer-ablate did not exit normally: %s", cmd);
  return WEXITSTATUS(st);
}

static void make_tmp(char *buf, size_t size) {
  snprintf(buf, size, "/tmp/peer-ablate-test-XXXXXX");
  cr_assert_not_null(mkdtemp(buf));
}

static void remove_tmp(const char *dir) {
  char cmd[512];
  snprintf(cmd, sizeof cmd, "rm -rf '%s' '%s.log'", dir, dir);
  cr_expect_eq(system(cmd), 0);
}

static char *read_text(const char *path) {
  FILE *f = fopen(path, "rb");
  if (!f) return NULL;
  static char buf[1 << 16];
  size_t n = fread(buf, 1, sizeof buf - 1, f);
  buf[n] = '\0';
  fclose(f);
  return strdup(buf);
}

/* The first `fields` comma-separated fields of every line (the numbers that
 * must not depend on timing: everything before tokens_per_s). */
static char *leading_fields(const char *csv, int fields) {
  char *out = calloc(strlen(csv) + 1, 1), *o = out;
  int field = 0;
  for (const char *p = csv; *p; p++) {
    if (*p == '\n')
      field = 0, *o++ = '\n';
    else if (*p == ',' && ++field >= fields)
      continue;
    else if (field < fields)
      *o++ = *p;
  }
  return out;
}

static bool on_path(const char *name) {
  char cmd[256];
  snprintf(cmd, sizeof cmd, "command -v %s >/dev/null 2>&1", name);
  return system(cmd) == 0;
}

Test(ablate_tool, tiny_sweep_writes_csv_json_and_plot, .timeout = 300) {
  char dir[64], path[256];
  make_tmp(dir, sizeof dir);
  cr_assert_eq(run_tool(dir, "--experts 8^2,n=16 --models peer,pkm,dense"), 0,
               "peer-ablate failed; see %s.log", dir);
  snprintf(path, sizeof path, "%s/results.csv", dir);
  char *csv = read_text(path);
  cr_assert_not_null(csv, "no %s", path);
  int lines = 0;
  for (char *p = csv; *p; p++)
    lines += *p == '\n';
  cr_expect_eq(lines, 1 + 5, "results.csv: %d lines, wanted a header and 5 settings:\n%s", lines,
               csv);
  cr_expect(strncmp(csv, "model,label,n_experts,", 22) == 0);
  free(csv);

  snprintf(path, sizeof path, "%s/results.json", dir);
  json_t *j = json_load_file(path, 0, NULL);
  cr_assert_not_null(j, "results.json does not parse");
  json_t *res = json_object_get(j, "results");
  cr_assert_eq(json_array_size(res), 5);
  for (size_t i = 0; i < 5; i++) {
    json_t *r = json_array_get(res, i);
    const char *model = json_string_value(json_object_get(r, "model"));
    double loss = json_number_value(json_object_get(r, "val_loss"));
    cr_expect(isfinite(loss) && loss > 0.0 && loss < log(256.0) + 0.5, "%s: val_loss %g", model,
              loss);
    cr_expect(json_is_number(json_object_get(r, "tokens_per_s")));
    if (strcmp(model, "dense") != 0) {
      double usage = json_number_value(json_object_get(r, "usage"));
      double unev = json_number_value(json_object_get(r, "unevenness"));
      double N = json_number_value(json_object_get(r, "n_experts"));
      cr_expect(usage > 0.0 && usage <= 1.0, "%s: usage %g", model, usage);
      cr_expect(unev >= -1e-12 && unev <= log(N) + 1e-9, "%s: unevenness %g", model, unev);
    }
  }
  json_decref(j);
  snprintf(path, sizeof path, "%s/ablate.gp", dir);
  cr_expect_eq(access(path, R_OK), 0, "no %s", path);
  char *gp = read_text(path);
  cr_expect(gp && strstr(gp, "set key below"), "%s does not put the keys below the plots", path);
  free(gp);
  if (on_path("gnuplot")) {
    snprintf(path, sizeof path, "%s/ablate.svg", dir);
    char *svg = read_text(path);
    cr_expect(svg && strstr(svg, "<svg"), "no plot at %s", path);
    /* An opaque white page, the keys below the plots (not on the curves). */
    cr_expect(svg && strstr(svg, "fill=\"#ffffff\""), "%s has no white background", path);
    free(svg);
  } else {
    cr_log_warn("gnuplot is not installed: the plot was not checked");
  }
  remove_tmp(dir);
}

Test(ablate_tool, resumed_sweep_matches_an_uninterrupted_one, .timeout = 300) {
  char a[64], b[64], path[256];
  const char *sweep = "--experts 8^2,n=16 --query-norm batchnorm --models peer,dense "
                      "--checkpoint-every 7 --no-plot";
  make_tmp(a, sizeof a);
  make_tmp(b, sizeof b);
  cr_assert_eq(run_tool(a, sweep), 0, "uninterrupted run failed; see %s.log", a);
  /* 48 steps per setting: stop mid-way through the first, then in the second. */
  char stopped[512];
  snprintf(stopped, sizeof stopped, "%s --stop-after 30", sweep);
  cr_assert_eq(run_tool(b, stopped), 3, "first stop: see %s.log", b);
  cr_assert_eq(run_tool(b, stopped), 3, "second stop: see %s.log", b);
  cr_assert_eq(run_tool(b, sweep), 0, "resume failed; see %s.log", b);

  snprintf(path, sizeof path, "%s/results.csv", a);
  char *ca = read_text(path);
  snprintf(path, sizeof path, "%s/results.csv", b);
  char *cb = read_text(path);
  cr_assert(ca && cb);
  char *fa = leading_fields(ca, 14), *fb = leading_fields(cb, 14);
  cr_expect_str_eq(fa, fb, "resumed results differ:\n%s\nuninterrupted:\n%s", fb, fa);

  /* Done settings are not run again; a changed setting gets its own run. */
  cr_assert_eq(run_tool(b, sweep), 0);
  snprintf(path, sizeof path, "%s.log", b);
  char *log = read_text(path);
  cr_expect(log && strstr(log, "done before"), "a finished setting ran again:\n%s", log);
  free(log);
  char changed[512];
  snprintf(changed, sizeof changed, "%s --lr 0.001", sweep);
  cr_assert_eq(run_tool(b, changed), 0);
  snprintf(path, sizeof path, "%s/results.csv", b);
  char *cc = read_text(path);
  char *fc = leading_fields(cc, 14);
  cr_expect(strcmp(fc, fb) != 0, "a changed learning rate reused the old results");
  free(ca), free(cb), free(cc), free(fa), free(fb), free(fc);
  remove_tmp(a);
  remove_tmp(b);
}
