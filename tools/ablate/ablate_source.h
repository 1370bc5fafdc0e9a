/* ablate_source.h: the synthetic corpus of peer-ablate, an order-c Markov
 * source over a small alphabet whose entropy rate is known exactly.
 *
 * A context is the last c symbols (s1 oldest .. sc newest).  For each suffix
 * (s2..sc) the source draws K random permutations pi_1..pi_K of the alphabet
 * and weights w_1..w_K (Dirichlet(1)); the next symbol after (s1, suffix) is
 * pi_j(s1) with probability w_j (equal symbols merged).  For a fixed suffix
 * the matrix M[s1][x] = sum_j w_j [pi_j(s1) = x] is doubly stochastic, so the
 * chain on contexts keeps the uniform distribution over all A^c contexts:
 * the stationary distribution is uniform, and the entropy rate is exactly the
 * mean over contexts of H(next | context).  Lower-order statistics carry no
 * information (averaged over s1 the next symbol is uniform), so a model gains
 * only by memorising whole contexts: the task rewards capacity.
 * With a small K the chain can split into closed classes; uniform is then
 * still stationary (a stream started uniformly has the same expected code
 * length) but one stream stays in one class.  The default (A 16, c 3, K 4)
 * is irreducible; tests/test_ablate.c checks it. */
#ifndef ABLATE_SOURCE_H
#define ABLATE_SOURCE_H

#include <stdint.h>

typedef struct ablate_source {
  int alphabet;       /* A, 2..256 */
  int order;          /* c, 1..8 */
  int branch;         /* K, 1..A: permutations mixed per suffix */
  int64_t n_contexts; /* A^c */
  uint8_t *next;      /* [n_contexts, K]: candidate next symbols */
  double *prob;       /* [n_contexts, K]: their probabilities (sum 1) */
} ablate_source;

/* Build the source for (A, c, K) from a seed.  Returns 0, or -1 with *src
 * zeroed when the arguments are out of range or memory runs out. */
int ablate_source_init(ablate_source *src, int alphabet, int order, int branch, uint64_t seed);
void ablate_source_free(ablate_source *src);

/* Index of the context prev[0..c-1] (oldest first): sum prev[j] A^(c-1-j). */
int64_t ablate_source_context(const ablate_source *src, const uint8_t *prev);
/* P(next = sym | context index ctx). */
double ablate_source_prob(const ablate_source *src, int64_t ctx, int sym);
/* Entropy rate in nats per symbol: mean over contexts of H(next | context)
 * (the stationary distribution is uniform, see above). */
double ablate_source_entropy_rate(const ablate_source *src);
/* Write len symbols (0..A-1): the first c uniform at random (the stationary
 * start), the rest drawn from the chain.  Deterministic in seed. */
void ablate_source_generate(const ablate_source *src, uint64_t seed, int64_t len, uint8_t *out);

/* splitmix64, the generator every seeded choice of peer-ablate uses. */
uint64_t ablate_rng_next(uint64_t *state);
/* Uniform double in [0, 1). */
double ablate_rng_uniform(uint64_t *state);

#endif /* ABLATE_SOURCE_H */
