/* random.c: `peer random`, a seeded standard-normal F32 tensor in a
 * safetensors file: the x and dy inputs of `peer forward` and `peer grad`
 * without any other tool. */
#include "cli.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static const char usage_random[] =
    "usage: peer random --shape D0[,D1,...] --out FILE.safetensors [--seed S] [--name NAME]\n"
    "                   [--scale X]\n"
    "\n"
    "Write one F32 tensor of the given shape (1 to 4 dimensions) filled with\n"
    "seeded standard-normal samples times X: the same values for a seed on\n"
    "every machine.\n"
    "\n"
    "  --shape D0,D1,...  dimensions, e.g. T,d_model for peer forward's x\n"
    "  --out PATH         file to write (safetensors)\n"
    "  --seed S           seed (default 0)\n"
    "  --name NAME        tensor name (default x; peer grad also reads dy)\n"
    "  --scale X          standard deviation (default 1)\n"
    "\n"
    "example: peer random --shape 64,512 --out x.safetensors\n"
    "         peer random --shape 64,512 --seed 1 --name dy --out dy.safetensors\n";

/* "64,512" -> shape; at most 4 dimensions, each >= 0. */
static int parse_shape(const char *text, int64_t shape[4], int *ndim) {
  char buf[256];
  if (strlen(text) >= sizeof buf) return usage_error("--shape: '%.40s...' is too long", text);
  strcpy(buf, text);
  *ndim = 0;
  char *save = NULL;
  for (char *tok = strtok_r(buf, ",", &save); tok; tok = strtok_r(NULL, ",", &save)) {
    if (*ndim == 4) return usage_error("--shape: '%s' has more than 4 dimensions", text);
    while (*tok == ' ')
      tok++;
    int rc = parse_int("shape", tok, 0, (int64_t)1 << 40, &shape[(*ndim)++]);
    if (rc) return rc;
  }
  if (*ndim == 0) return usage_error("--shape: '%s' has no dimensions", text);
  return 0;
}

int cmd_random(int argc, char **argv) {
  cli_opt opts[] = {{"shape", true, NULL},
                    {"out", true, NULL},
                    {"seed", true, NULL},
                    {"name", true, NULL},
                    {"scale", true, NULL}};
  int n_pos, rc = parse_options(argc, argv, opts, 5, NULL, 0, &n_pos);
  if (rc == PARSE_HELP) return fputs(usage_random, stdout), 0;
  if (rc) return rc;
  const char *out_path = opts[1].value, *name = opts[3].value ? opts[3].value : "x";
  if (!opts[0].value) return usage_error("--shape is required (e.g. --shape 64,512)");
  if (!out_path) return usage_error("--out is required");
  if (!*name) return usage_error("--name: the tensor name is empty");
  peer_tensor t = {name, PEER_F32, 0, {0, 0, 0, 0}, NULL, 0};
  uint64_t seed = 0;
  double scale = 1.0;
  if ((rc = parse_shape(opts[0].value, t.shape, &t.ndim))) return rc;
  if (opts[2].value && (rc = parse_seed("seed", opts[2].value, &seed))) return rc;
  if (opts[4].value && (rc = parse_float("scale", opts[4].value, 0.0, 1e30, &scale))) return rc;

  size_t count = 1;
  for (int i = 0; i < t.ndim; i++)
    if (__builtin_mul_overflow(count, (size_t)t.shape[i], &count) ||
        __builtin_mul_overflow(count, sizeof(float), &t.nbytes))
      return usage_error("--shape: %s is too large", opts[0].value);
  float *x = alloc_array(count, sizeof *x);
  if (!x) return fail("cannot allocate %zu bytes", t.nbytes);
  fill_gaussian(x, count, seed);
  for (size_t i = 0; i < count; i++)
    x[i] = (float)(scale * (double)x[i]);
  t.data = x;
  peer_status st = peer_safetensors_write(out_path, &t, 1, NULL, 0);
  free(x);
  if (st) return lib_fail(st, "cannot write output");
  char shape[96];
  printf("wrote %s: %s %s F32, standard normal x %g, seed %llu\n", out_path, name,
         format_shape(&t, shape, sizeof shape), scale, (unsigned long long)seed);
  return 0;
}
