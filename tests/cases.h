/* cases.h: the layer cases of the tests that build layers (test_forward,
 * test_retrieval, test_train, test_optim).  A case is a config written as a
 * PEER.md config string on top of peer_config_default ("d_model=16,n_heads=2,
 * top_k=3"), parsed and validated by the library, plus a batch size; the
 * dimensions the tests index with (d, H, dk, n, k, kp) are kept beside the
 * config as read-only shorthands.  Change a case with case_set (more config
 * items) or, after writing c.cfg directly, case_sync; case_layer refuses a
 * case whose shorthands no longer match its config. */
#ifndef PEER_TEST_CASES_H
#define PEER_TEST_CASES_H

#include <criterion/criterion.h>

#include "peer.h"

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

typedef struct layer_case {
  peer_config cfg;
  int64_t T; /* tokens per batch */
  /* A test's own variation of its inputs (test_train: identical queries in
   * every head and repeated tokens); 0 elsewhere. */
  int dup;
  /* Shorthands of cfg (case_sync): d_model, n_heads, d_key, n_subkeys, top_k
   * and the subkey_top_k in effect. */
  int64_t d, H, dk, n, k, kp;
} layer_case;

static inline void case_sync(layer_case *c) {
  c->d = c->cfg.d_model;
  c->H = c->cfg.n_heads;
  c->dk = c->cfg.d_key;
  c->n = c->cfg.n_subkeys;
  c->k = c->cfg.top_k;
  c->kp = peer_config_subkey_top_k(&c->cfg);
}

/* Apply config items on top of c's config; they must parse and the result
 * must validate. */
static inline void case_set(layer_case *c, const char *config) {
  cr_assert_eq(peer_config_parse(&c->cfg, config), PEER_OK, "case '%s': %s", config,
               peer_last_error());
  cr_assert_eq(peer_config_validate(&c->cfg), PEER_OK, "case '%s': %s", config,
               peer_last_error());
  case_sync(c);
}

/* A case from a config string (PEER.md names over peer_config_default) and a
 * batch size. */
static inline layer_case case_make(const char *config, int64_t T) {
  layer_case c = {.T = T};
  peer_config_default(&c.cfg);
  case_set(&c, config);
  return c;
}

/* A case written down in a table: a config string and a batch size. */
typedef struct case_spec {
  const char *config;
  int64_t T;
} case_spec;

static inline layer_case case_of(const case_spec *s) { return case_make(s->config, s->T); }

/* The case as text for messages: its whole config and T (one of four
 * rotating buffers, so a message may hold a few). */
static inline const char *case_text(const layer_case *c) {
  static _Thread_local char buf[4][640];
  static _Thread_local int next;
  char *b = buf[next++ % 4], cfg[512];
  peer_config_format(&c->cfg, cfg, sizeof cfg);
  snprintf(b, sizeof buf[0], "[%s T=%lld%s]", cfg, (long long)c->T, c->dup ? " dup" : "");
  return b;
}

/* A layer of the case's config (zeroed parameters), freed by the caller. */
static inline peer_layer *case_layer(const layer_case *c) {
  layer_case synced = *c;
  case_sync(&synced);
  cr_assert(synced.d == c->d && synced.H == c->H && synced.dk == c->dk && synced.n == c->n &&
                synced.k == c->k && synced.kp == c->kp,
            "case %s: shorthands changed without case_sync", case_text(c));
  peer_layer *L = NULL;
  peer_status st = peer_layer_create(&L, &c->cfg, NULL);
  cr_assert_eq(st, PEER_OK, "create %s: %s", case_text(c), peer_last_error());
  return L;
}

/* A copy of L made through a weight file: none of its parameters was ever
 * handed out (peer_layer_param), so the CPU backend may keep derived copies
 * of them (bf16 keys, the small-batch Wq layout).  Freed by the caller. */
static inline peer_layer *case_reloaded(peer_layer *L) {
  char path[] = "/tmp/peer_case_XXXXXX";
  int fd = mkstemp(path);
  cr_assert(fd >= 0);
  close(fd);
  cr_assert_eq(peer_layer_save(L, path), PEER_OK, "%s", peer_last_error());
  peer_layer *B = NULL;
  cr_assert_eq(peer_layer_load(&B, path, NULL), PEER_OK, "%s", peer_last_error());
  unlink(path);
  return B;
}

#endif
