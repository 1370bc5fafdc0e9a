/* ablate_source.c: the synthetic Markov source of peer-ablate (see
 * ablate_source.h for its construction and why its entropy rate is exact). */
#include "ablate_source.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

uint64_t ablate_rng_next(uint64_t *state) {
  uint64_t z = (*state += 0x9e3779b97f4a7c15ull);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

double ablate_rng_uniform(uint64_t *state) {
  return (double)(ablate_rng_next(state) >> 11) * (1.0 / 9007199254740992.0);
}

static void shuffle(uint8_t *perm, int n, uint64_t *rng) {
  for (int i = 0; i < n; i++)
    perm[i] = (uint8_t)i;
  for (int i = n - 1; i > 0; i--) {
    int j = (int)(ablate_rng_next(rng) % (uint64_t)(i + 1));
    uint8_t t = perm[i];
    perm[i] = perm[j];
    perm[j] = t;
  }
}

int ablate_source_init(ablate_source *src, int alphabet, int order, int branch, uint64_t seed) {
  memset(src, 0, sizeof *src);
  if (alphabet < 2 || alphabet > 256 || order < 1 || order > 8 || branch < 1 || branch > alphabet)
    return -1;
  int64_t n_suffix = 1;
  for (int i = 1; i < order; i++) {
    n_suffix *= alphabet;
    if (n_suffix > ((int64_t)1 << 24)) return -1;
  }
  const int64_t n_ctx = n_suffix * alphabet;
  src->next = malloc((size_t)(n_ctx * branch));
  src->prob = malloc(sizeof(double) * (size_t)(n_ctx * branch));
  uint8_t *perms = malloc((size_t)(alphabet * branch));
  double *w = malloc(sizeof(double) * (size_t)branch);
  if (!src->next || !src->prob || !perms || !w) {
    free(perms), free(w);
    ablate_source_free(src);
    return -1;
  }
  src->alphabet = alphabet, src->order = order, src->branch = branch;
  src->n_contexts = n_ctx;
  uint64_t rng = seed ^ 0x5eed5eed5eed5eedull;
  for (int64_t suffix = 0; suffix < n_suffix; suffix++) {
    double total = 0.0;
    for (int j = 0; j < branch; j++) {
      shuffle(perms + j * alphabet, alphabet, &rng);
      w[j] = -log(1.0 - ablate_rng_uniform(&rng)) + 1e-12; /* Exp(1): Dirichlet(1) after norm */
      total += w[j];
    }
    for (int s1 = 0; s1 < alphabet; s1++) {
      int64_t ctx = (int64_t)s1 * n_suffix + suffix;
      for (int j = 0; j < branch; j++) {
        src->next[ctx * branch + j] = perms[j * alphabet + s1];
        src->prob[ctx * branch + j] = w[j] / total;
      }
    }
  }
  free(perms), free(w);
  return 0;
}

void ablate_source_free(ablate_source *src) {
  free(src->next);
  free(src->prob);
  memset(src, 0, sizeof *src);
}

int64_t ablate_source_context(const ablate_source *src, const uint8_t *prev) {
  int64_t ctx = 0;
  for (int j = 0; j < src->order; j++)
    ctx = ctx * src->alphabet + prev[j];
  return ctx;
}

double ablate_source_prob(const ablate_source *src, int64_t ctx, int sym) {
  double p = 0.0;
  for (int j = 0; j < src->branch; j++)
    if (src->next[ctx * src->branch + j] == sym) p += src->prob[ctx * src->branch + j];
  return p;
}

double ablate_source_entropy_rate(const ablate_source *src) {
  double sum = 0.0;
  for (int64_t ctx = 0; ctx < src->n_contexts; ctx++) {
    double h = 0.0;
    /* Merge repeated symbols: entropy is over distinct next symbols. */
    for (int j = 0; j < src->branch; j++) {
      int sym = src->next[ctx * src->branch + j];
      int first = 1;
      for (int i = 0; i < j; i++)
        first &= src->next[ctx * src->branch + i] != sym;
      if (!first) continue;
      double p = ablate_source_prob(src, ctx, sym);
      if (p > 0.0) h -= p * log(p);
    }
    sum += h;
  }
  return sum / (double)src->n_contexts;
}

void ablate_source_generate(const ablate_source *src, uint64_t seed, int64_t len, uint8_t *out) {
  uint64_t rng = seed ^ 0x9e9e9e9e12345678ull;
  const int c = src->order;
  for (int64_t t = 0; t < len && t < c; t++)
    out[t] = (uint8_t)(ablate_rng_next(&rng) % (uint64_t)src->alphabet);
  for (int64_t t = c; t < len; t++) {
    int64_t ctx = ablate_source_context(src, out + t - c);
    double u = ablate_rng_uniform(&rng), acc = 0.0;
    int sym = src->next[ctx * src->branch + src->branch - 1];
    for (int j = 0; j < src->branch; j++) {
      acc += src->prob[ctx * src->branch + j];
      if (u < acc) {
        sym = src->next[ctx * src->branch + j];
        break;
      }
    }
    out[t] = (uint8_t)sym;
  }
}
