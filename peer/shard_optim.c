/* shard_optim.c: the optimizer of a sharded layer.  A peer_optimizer on the
 * shard's layer holds all the state (the expert tables' state shaped like
 * this rank's [N, d/P] columns) and steps the replicated parameters; the
 * expert rows are stepped here, because peer_optimizer_step reads d_model
 * columns per row.  The lazy sparse rules are elementwise, so stepping a
 * rank's columns gives that slice of the unsharded step (optim_rule.h's
 * update, as optim.c's). */
#include "optim_rule.h"
#include "shard.h"

#include <math.h>
#include <stdlib.h>

struct peer_shard_optimizer {
  peer_shard *S;
  peer_optimizer *o;
  float *m[2], *v[2]; /* the expert tables' state in o (NULL when none) */
};

peer_status peer_shard_optimizer_create(peer_shard_optimizer **out, peer_shard *S,
                                        const peer_optim_config *cfg) {
  if (!out || !S || !cfg)
    return peer_fail(PEER_ERR_INVALID_ARGUMENT, "shard_optimizer_create: NULL argument");
  *out = NULL;
  peer_shard_optimizer *so = calloc(1, sizeof *so);
  if (!so) return peer_fail(PEER_ERR_OUT_OF_MEMORY, "shard_optimizer_create: out of memory");
  so->S = S;
  peer_status st = peer_optimizer_create(&so->o, S->L, cfg);
  if (st) {
    free(so);
    return st;
  }
  const char *names[2][2] = {{"optim.experts.down.m", "optim.experts.down.v"},
                             {"optim.experts.up.m", "optim.experts.up.v"}};
  for (int s = 0; s < 2; s++) {
    peer_tensor t;
    if (peer_optimizer_state_by_name(so->o, names[s][0], &t) == PEER_OK) so->m[s] = t.data;
    if (peer_optimizer_state_by_name(so->o, names[s][1], &t) == PEER_OK) so->v[s] = t.data;
  }
  peer_clear_error();
  *out = so;
  return PEER_OK;
}

void peer_shard_optimizer_free(peer_shard_optimizer *so) {
  if (!so) return;
  peer_optimizer_free(so->o);
  free(so);
}

int64_t peer_shard_optimizer_step_count(const peer_shard_optimizer *so) {
  return so ? peer_optimizer_step_count(so->o) : 0;
}

peer_status peer_shard_optimizer_state_by_name(peer_shard_optimizer *so, const char *name,
                                               peer_tensor *out) {
  if (!so) return peer_fail(PEER_ERR_INVALID_ARGUMENT, "shard_optimizer_state: NULL optimizer");
  return peer_optimizer_state_by_name(so->o, name, out);
}

/* The inner optimizer (shard_file.c saves and loads through it). */
peer_optimizer *peer_shard_optimizer_inner(const peer_shard_optimizer *so) { return so->o; }

/* ------------------------------------------------------------ the rule */

/* optim.c's coefficients for the expert rows (no decay: keep = 1, no
 * momentum); the update itself is optim_rule.h's, as optim.c's. */
static peer_optim_rule make_rule(const peer_optim_config *c, int64_t t) {
  float lr = c->expert_lr > 0.0f ? c->expert_lr : c->lr;
  peer_optim_rule r = {.kind = c->expert_kind,
                       .lr = lr,
                       .keep = 1.0f,
                       .b1 = c->beta1,
                       .b2 = c->beta2,
                       .eps = c->eps};
  if (r.kind == PEER_OPTIM_ADAM) {
    double bc1 = 1.0 - pow((double)c->beta1, (double)t);
    double bc2 = 1.0 - pow((double)c->beta2, (double)t);
    r.step_size = (float)((double)lr / bc1);
    r.rsqrt_bc2 = (float)(1.0 / sqrt(bc2));
  }
  return r;
}

static void step_rows(peer_shard_optimizer *so, int s, const peer_grads *gr, const float *g,
                      const peer_optim_rule *r, int P) {
  const peer_tensor *t = &so->S->L->slot[s == 0 ? PEER_P_EXPERTS_DOWN : PEER_P_EXPERTS_UP];
  const size_t c = (size_t)so->S->cols;
  float *m = so->m[s], *v = so->v[s];
  const int64_t R = gr->n_expert_rows;
#pragma omp parallel for schedule(static) num_threads(P) if (R * (int64_t)c > 32768)
  for (int64_t j = 0; j < R; j++) {
    size_t row = (size_t)gr->expert_rows[j], at = row * c;
    const float *grow = g + (gr->experts_dense ? row : (size_t)j) * c;
    float *mm = m ? m + at : NULL, *vv = v ? v + at : NULL;
    if (t->dtype == PEER_BF16) {
      uint16_t *p = (uint16_t *)t->data + at;
      for (size_t i = 0; i < c; i++)
        p[i] = peer_f32_to_bf16(peer_optim_update(r, peer_bf16_to_f32(p[i]), grow[i],
                                                  mm ? mm + i : NULL, vv ? vv + i : NULL));
    } else {
      float *p = (float *)t->data + at;
      for (size_t i = 0; i < c; i++)
        p[i] = peer_optim_update(r, p[i], grow[i], mm ? mm + i : NULL, vv ? vv + i : NULL);
    }
  }
}

/* optim.c's checks of the expert triple, for [*, d/P] gradient rows. */
static peer_status check_rows(const peer_shard_optimizer *so, const peer_grads *g) {
  const peer_dims *D = &so->S->L->dims;
  const int64_t c = so->S->cols;
  if (!g->experts_down || !g->experts_up || !g->expert_rows)
    return peer_fail(PEER_ERR_INVALID_ARGUMENT,
                     "shard_optimizer_step: expert_rows, experts_down and experts_up go together");
  const int64_t R = g->n_expert_rows;
  const int64_t most = g->experts_dense ? D->N : g->expert_capacity;
  if (R < 0 || R > most || R > D->N)
    return peer_fail(PEER_ERR_INVALID_ARGUMENT,
                     "shard_optimizer_step: n_expert_rows %lld not in [0, %lld]", (long long)R,
                     (long long)(most < D->N ? most : D->N));
  for (int64_t j = 0; j < R; j++) {
    int64_t r = g->expert_rows[j];
    if (r < 0 || r >= D->N || (j > 0 && r <= g->expert_rows[j - 1]))
      return peer_fail(PEER_ERR_INVALID_ARGUMENT,
                       "shard_optimizer_step: expert_rows[%lld] = %lld: rows must be strictly "
                       "ascending in [0, %lld)",
                       (long long)j, (long long)r, (long long)D->N);
  }
  const float *tables[2] = {g->experts_down, g->experts_up};
  const char *names[2] = {"experts_down", "experts_up"};
  for (int s = 0; s < 2; s++)
    for (int64_t j = 0; j < R; j++) {
      const float *row = tables[s] + (g->experts_dense ? g->expert_rows[j] : j) * c;
      for (int64_t i = 0; i < c; i++)
        if (!isfinite(row[i]))
          return peer_fail(PEER_ERR_NONFINITE,
                           "shard_optimizer_step: grads.%s of expert %lld, column %lld, is not "
                           "finite; nothing was updated",
                           names[s], (long long)g->expert_rows[j], (long long)(so->S->col0 + i));
    }
  return PEER_OK;
}

peer_status peer_shard_optimizer_step(peer_shard_optimizer *so, const peer_grads *g) {
  if (!so || !g) return peer_fail(PEER_ERR_INVALID_ARGUMENT, "shard_optimizer_step: NULL argument");
  const bool experts = g->experts_down || g->experts_up || g->expert_rows;
  peer_status st;
  if (experts && (st = check_rows(so, g))) return st;
  /* The replicated parameters (checked before any change; counts the step). */
  peer_grads dense = *g;
  dense.experts_down = dense.experts_up = NULL;
  dense.expert_rows = NULL;
  dense.n_expert_rows = 0;
  if ((st = peer_optimizer_step(so->o, &dense))) return st;
  if (experts) {
    const int P = peer_layer_threads(so->S->L);
    peer_optim_rule r = make_rule(peer_optimizer_config(so->o), peer_optimizer_step_count(so->o));
    step_rows(so, 0, g, g->experts_down, &r, P);
    step_rows(so, 1, g, g->experts_up, &r, P);
  }
  return PEER_OK;
}
