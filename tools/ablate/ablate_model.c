/* ablate_model.c: the model peer-ablate trains (see ablate_model.h): embedding,
 * optional LayerNorm, a PEER / pkm / dense residual block, output projection
 * and softmax cross-entropy, with their backward and a plain Adam for the
 * model's own parameters.  Loops that sum over tokens run in a fixed order
 * (threads split other axes), so results do not depend on the thread count. */
#include "ablate_model.h"

#include "ablate_source.h"

#include <dirent.h>
#include <errno.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

struct ablate_model {
  ablate_spec s;
  int64_t d, e, c, B, hidden;
  /* The model's own parameters, flat, with gradient and Adam moments. */
  int64_t n_p;
  float *p, *g, *am, *av;
  int64_t o_emb, o_wout, o_bout, o_lng, o_lnb, o_w1, o_b1, o_w2, o_b2;
  peer_layer *L;
  peer_optimizer *O;
  peer_context *ctx;
  peer_grads pg;
  int64_t step;
  /* Batch buffers, [B, ...]. */
  float *x, *u, *y, *h, *logits, *dh, *du, *dx, *mu, *rstd, *a, *z, *dz;
  double *tok_loss;
  int64_t *idx;
  float *gates;
};

static void set_err(char *err, size_t size, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
static void set_err(char *err, size_t size, const char *fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(err, size, fmt, ap);
  va_end(ap);
}

static int lib_err(char *err, size_t size, peer_status st, const char *what) {
  const char *msg = peer_last_error();
  set_err(err, size, "%s: %s", what, msg && *msg ? msg : peer_status_string(st));
  return -1;
}

static int64_t hk_of(const ablate_model *m) { return m->s.layer.n_heads * m->s.layer.top_k; }

/* ------------------------------------------------------------- arithmetic */

/* Dot product with eight fixed partial sums: vectorises, same order always. */
static float dot(const float *a, const float *b, int64_t n) {
  float acc[8] = {0};
  const int64_t n8 = n - n % 8;
  int64_t i = 0;
  for (; i < n8; i += 8)
    for (int j = 0; j < 8; j++)
      acc[j] += a[i + j] * b[i + j];
  float s = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
  for (; i < n; i++)
    s += a[i] * b[i];
  return s;
}

static void axpy(float *y, float a, const float *x, int64_t n) {
  for (int64_t i = 0; i < n; i++)
    y[i] += a * x[i];
}

static float act(peer_activation f, float v) {
  switch (f) {
  case PEER_ACT_RELU:
    return v > 0.0f ? v : 0.0f;
  case PEER_ACT_GELU:
    return 0.5f * v * (1.0f + erff(v * 0.70710678f));
  case PEER_ACT_GELU_TANH:
    return 0.5f * v * (1.0f + tanhf(0.7978845608f * (v + 0.044715f * v * v * v)));
  case PEER_ACT_SILU:
    return v / (1.0f + expf(-v));
  case PEER_ACT_IDENTITY:
    break;
  }
  return v;
}

static float act_grad(peer_activation f, float v) {
  switch (f) {
  case PEER_ACT_RELU:
    return v > 0.0f ? 1.0f : 0.0f;
  case PEER_ACT_GELU:
    return 0.5f * (1.0f + erff(v * 0.70710678f)) + v * 0.39894228f * expf(-0.5f * v * v);
  case PEER_ACT_GELU_TANH: {
    float t = tanhf(0.7978845608f * (v + 0.044715f * v * v * v));
    return 0.5f * (1.0f + t) +
           0.5f * v * (1.0f - t * t) * 0.7978845608f * (1.0f + 3.0f * 0.044715f * v * v);
  }
  case PEER_ACT_SILU: {
    float sg = 1.0f / (1.0f + expf(-v));
    return sg * (1.0f + v * (1.0f - sg));
  }
  case PEER_ACT_IDENTITY:
    break;
  }
  return 1.0f;
}

static float uniform_pm(uint64_t *rng, float a) {
  return (float)(ablate_rng_uniform(rng) * 2.0 - 1.0) * a;
}

/* ------------------------------------------------------------ create/free */

void ablate_model_free(ablate_model *m) {
  if (!m) return;
  peer_context_free(m->ctx);
  peer_optimizer_free(m->O);
  peer_layer_free(m->L);
  free(m->p), free(m->g), free(m->am), free(m->av);
  free(m->pg.query_weight), free(m->pg.query_bias), free(m->pg.norm_weight);
  free(m->pg.norm_bias), free(m->pg.keys), free(m->pg.expert_rows);
  free(m->pg.experts_down), free(m->pg.experts_up);
  free(m->x), free(m->u), free(m->y), free(m->h), free(m->logits), free(m->dh), free(m->du);
  free(m->dx), free(m->mu), free(m->rstd), free(m->a), free(m->z), free(m->dz);
  free(m->tok_loss), free(m->idx), free(m->gates);
  free(m);
}

static float *falloc(int64_t n) { return calloc((size_t)(n > 0 ? n : 1), sizeof(float)); }

static int create_layer(ablate_model *m, char *err, size_t err_size) {
  peer_options opt;
  peer_options_default(&opt);
  opt.n_threads = m->s.threads;
  peer_status st = peer_layer_create(&m->L, &m->s.layer, &opt);
  if (!st) st = peer_layer_init(m->L, m->s.seed + 1);
  if (st) return lib_err(err, err_size, st, "PEER layer");
  peer_optim_config oc = peer_optim_config_default();
  oc.lr = m->s.lr;
  oc.expert_lr = m->s.expert_lr;
  oc.kind = PEER_OPTIM_ADAM;
  oc.expert_kind = PEER_OPTIM_ADAM;
  if ((st = peer_optimizer_create(&m->O, m->L, &oc)) ||
      (st = peer_context_create(&m->ctx, m->L, m->B)))
    return lib_err(err, err_size, st, "PEER optimizer");
  const peer_config *c = &m->s.layer;
  int64_t dq = c->n_heads * c->d_key, G = c->shared_keys ? 1 : c->n_heads;
  int64_t rows = m->B * hk_of(m);
  m->pg.query_weight = falloc(dq * m->d);
  if (c->query_bias) m->pg.query_bias = falloc(dq);
  if (c->query_norm == PEER_NORM_BATCHNORM) {
    m->pg.norm_weight = falloc(dq);
    m->pg.norm_bias = falloc(dq);
  }
  m->pg.keys = falloc(G * c->n_subkeys * c->d_key);
  m->pg.expert_capacity = rows;
  m->pg.expert_rows = calloc((size_t)rows, sizeof(int64_t));
  m->pg.experts_down = falloc(rows * m->d);
  m->pg.experts_up = falloc(rows * m->d);
  m->idx = calloc((size_t)rows, sizeof(int64_t));
  m->gates = falloc(rows);
  if (!m->pg.query_weight || !m->pg.keys || !m->pg.expert_rows || !m->pg.experts_down ||
      !m->pg.experts_up || !m->idx || !m->gates) {
    set_err(err, err_size, "out of memory");
    return -1;
  }
  return 0;
}

ablate_model *ablate_model_create(const ablate_spec *spec, char *err, size_t err_size) {
  ablate_model *m = calloc(1, sizeof *m);
  if (!m) {
    set_err(err, err_size, "out of memory");
    return NULL;
  }
  m->s = *spec;
  m->d = spec->layer.d_model;
  m->c = spec->context;
  m->e = m->d / m->c;
  m->B = spec->batch;
  m->hidden = spec->kind == ABLATE_DENSE ? hk_of(m) : 0;
  if (m->c < 1 || m->e * m->c != m->d || m->B < 2) {
    set_err(err, err_size, "d_model %lld must be a multiple of the context %lld; batch >= 2",
            (long long)m->d, (long long)m->c);
    ablate_model_free(m);
    return NULL;
  }
  const int64_t V = ABLATE_VOCAB, d = m->d, H = m->hidden;
  int64_t off = 0;
  m->o_emb = off, off += V * m->e;
  m->o_wout = off, off += d * V;
  m->o_bout = off, off += V;
  m->o_lng = off, off += spec->prenorm ? d : 0;
  m->o_lnb = off, off += spec->prenorm ? d : 0;
  m->o_w1 = off, off += d * H;
  m->o_b1 = off, off += H;
  m->o_w2 = off, off += H * d;
  m->o_b2 = off, off += H ? d : 0;
  m->n_p = off;
  m->p = falloc(off), m->g = falloc(off), m->am = falloc(off), m->av = falloc(off);
  const int64_t B = m->B;
  m->x = falloc(B * d), m->u = falloc(B * d), m->y = falloc(B * d), m->h = falloc(B * d);
  m->logits = falloc(B * V), m->dh = falloc(B * d), m->du = falloc(B * d);
  m->dx = falloc(B * d), m->mu = falloc(B), m->rstd = falloc(B);
  m->a = falloc(B * H), m->z = falloc(B * H), m->dz = falloc(B * H);
  m->tok_loss = calloc((size_t)B, sizeof(double));
  if (!m->p || !m->g || !m->am || !m->av || !m->x || !m->u || !m->y || !m->h || !m->logits ||
      !m->dh || !m->du || !m->dx || !m->mu || !m->rstd || !m->a || !m->z || !m->dz ||
      !m->tok_loss) {
    set_err(err, err_size, "out of memory");
    ablate_model_free(m);
    return NULL;
  }
  uint64_t rng = spec->seed * 0x100000001b3ull + 0xab1a7eull;
  for (int64_t i = 0; i < V * m->e; i++)
    m->p[m->o_emb + i] = uniform_pm(&rng, 1.0f);
  float aw = 1.0f / sqrtf((float)d);
  for (int64_t i = 0; i < d * V; i++)
    m->p[m->o_wout + i] = uniform_pm(&rng, aw);
  for (int64_t i = 0; i < (spec->prenorm ? d : 0); i++)
    m->p[m->o_lng + i] = 1.0f;
  for (int64_t i = 0; i < d * H; i++)
    m->p[m->o_w1 + i] = uniform_pm(&rng, aw);
  for (int64_t i = 0; i < H * d; i++)
    m->p[m->o_w2 + i] = uniform_pm(&rng, 1.0f / sqrtf((float)(H ? H : 1)));
  if (spec->kind != ABLATE_DENSE && create_layer(m, err, err_size)) {
    ablate_model_free(m);
    return NULL;
  }
  return m;
}

int64_t ablate_model_steps_done(const ablate_model *m) { return m->step; }

int64_t ablate_model_params(const ablate_model *m) {
  return m->n_p + (m->L ? peer_layer_n_parameters(m->L) : 0);
}

int64_t ablate_model_active_params(const ablate_model *m) {
  /* A token reads c embedding rows (d values), not the whole table. */
  int64_t own = m->n_p - ABLATE_VOCAB * m->e + m->d;
  return own + (m->L ? peer_layer_n_active_parameters(m->L) : 0);
}

/* ---------------------------------------------------------------- forward */

static void embed(ablate_model *m, int64_t T, const uint8_t *tok) {
  const float *emb = m->p + m->o_emb;
  for (int64_t t = 0; t < T; t++)
    for (int64_t j = 0; j < m->c; j++)
      memcpy(m->x + t * m->d + j * m->e, emb + (int64_t)tok[t * m->c + j] * m->e,
             sizeof(float) * (size_t)m->e);
}

static void norm_forward(ablate_model *m, int64_t T) {
  const int64_t d = m->d;
  const float *gam = m->p + m->o_lng, *bet = m->p + m->o_lnb;
  for (int64_t t = 0; t < T; t++) {
    const float *x = m->x + t * d;
    double mean = 0.0, var = 0.0;
    for (int64_t i = 0; i < d; i++)
      mean += x[i];
    mean /= (double)d;
    for (int64_t i = 0; i < d; i++)
      var += (x[i] - mean) * (x[i] - mean);
    var /= (double)d;
    float rs = (float)(1.0 / sqrt(var + 1e-5));
    m->mu[t] = (float)mean, m->rstd[t] = rs;
    for (int64_t i = 0; i < d; i++)
      m->u[t * d + i] = (x[i] - m->mu[t]) * rs * gam[i] + bet[i];
  }
}

static void dense_forward(ablate_model *m, int64_t T, const float *in) {
  const int64_t d = m->d, H = m->hidden;
  const float *w1 = m->p + m->o_w1, *b1 = m->p + m->o_b1;
  const float *w2 = m->p + m->o_w2, *b2 = m->p + m->o_b2;
  const peer_activation f = m->s.layer.activation;
#pragma omp parallel for num_threads(m->s.threads) schedule(static)
  for (int64_t t = 0; t < T; t++) {
    float *a = m->a + t * H, *z = m->z + t * H, *y = m->y + t * d;
    memcpy(a, b1, sizeof(float) * (size_t)H);
    for (int64_t i = 0; i < d; i++)
      axpy(a, in[t * d + i], w1 + i * H, H);
    for (int64_t j = 0; j < H; j++)
      z[j] = act(f, a[j]);
    memcpy(y, b2, sizeof(float) * (size_t)d);
    for (int64_t j = 0; j < H; j++)
      axpy(y, z[j], w2 + j * d, d);
  }
}

/* h = x + y and logits; the per-token loss lands in tok_loss and, when
 * train, the gradient of the mean loss w.r.t. the logits replaces them. */
static void head_forward(ablate_model *m, int64_t T, const uint8_t *target, int train) {
  const int64_t d = m->d, V = ABLATE_VOCAB;
  const float *w = m->p + m->o_wout, *b = m->p + m->o_bout;
#pragma omp parallel for num_threads(m->s.threads) schedule(static)
  for (int64_t t = 0; t < T; t++) {
    float *h = m->h + t * d, *lg = m->logits + t * V;
    for (int64_t i = 0; i < d; i++)
      h[i] = m->x[t * d + i] + m->y[t * d + i];
    memcpy(lg, b, sizeof(float) * V);
    for (int64_t i = 0; i < d; i++)
      axpy(lg, h[i], w + i * V, V);
    float mx = lg[0];
    for (int64_t v = 1; v < V; v++)
      mx = lg[v] > mx ? lg[v] : mx;
    double sum = 0.0;
    for (int64_t v = 0; v < V; v++)
      sum += exp((double)(lg[v] - mx));
    double lse = (double)mx + log(sum);
    m->tok_loss[t] = lse - (double)lg[target[t]];
    if (train) {
      for (int64_t v = 0; v < V; v++)
        lg[v] = (float)(exp((double)lg[v] - lse) / (double)T);
      lg[target[t]] -= 1.0f / (float)T;
    }
  }
}

/* ---------------------------------------------------------------- backward */

static void head_backward(ablate_model *m, int64_t T) {
  const int64_t d = m->d, V = ABLATE_VOCAB;
  const float *w = m->p + m->o_wout;
  float *gw = m->g + m->o_wout, *gb = m->g + m->o_bout;
#pragma omp parallel num_threads(m->s.threads)
  {
#pragma omp for schedule(static)
    for (int64_t t = 0; t < T; t++)
      for (int64_t i = 0; i < d; i++)
        m->dh[t * d + i] = dot(m->logits + t * V, w + i * V, V);
#pragma omp for schedule(static)
    for (int64_t i = 0; i < d; i++)
      for (int64_t t = 0; t < T; t++)
        axpy(gw + i * V, m->h[t * d + i], m->logits + t * V, V);
  }
  for (int64_t t = 0; t < T; t++)
    axpy(gb, 1.0f, m->logits + t * V, V);
}

/* du (gradient at the block's input) from dy = dh. */
static void dense_backward(ablate_model *m, int64_t T, const float *in) {
  const int64_t d = m->d, H = m->hidden;
  const float *w1 = m->p + m->o_w1, *w2 = m->p + m->o_w2;
  float *g1 = m->g + m->o_w1, *gb1 = m->g + m->o_b1, *g2 = m->g + m->o_w2;
  float *gb2 = m->g + m->o_b2;
  const peer_activation f = m->s.layer.activation;
#pragma omp parallel num_threads(m->s.threads)
  {
#pragma omp for schedule(static)
    for (int64_t t = 0; t < T; t++) {
      float *dz = m->dz + t * H;
      for (int64_t j = 0; j < H; j++)
        dz[j] = dot(m->dh + t * d, w2 + j * d, d) * act_grad(f, m->a[t * H + j]);
      for (int64_t i = 0; i < d; i++)
        m->du[t * d + i] = dot(dz, w1 + i * H, H);
    }
#pragma omp for schedule(static)
    for (int64_t j = 0; j < H; j++)
      for (int64_t t = 0; t < T; t++)
        axpy(g2 + j * d, m->z[t * H + j], m->dh + t * d, d);
#pragma omp for schedule(static)
    for (int64_t i = 0; i < d; i++)
      for (int64_t t = 0; t < T; t++)
        axpy(g1 + i * H, in[t * d + i], m->dz + t * H, H);
  }
  for (int64_t t = 0; t < T; t++) {
    axpy(gb1, 1.0f, m->dz + t * H, H);
    axpy(gb2, 1.0f, m->dh + t * d, d);
  }
}

/* dx += LayerNorm backward of du. */
static void norm_backward(ablate_model *m, int64_t T) {
  const int64_t d = m->d;
  const float *gam = m->p + m->o_lng;
  float *gg = m->g + m->o_lng, *gbeta = m->g + m->o_lnb;
  for (int64_t t = 0; t < T; t++) {
    const float *x = m->x + t * d, *du = m->du + t * d;
    float mu = m->mu[t], rs = m->rstd[t];
    double mean_dxh = 0.0, mean_dxh_xh = 0.0;
    for (int64_t i = 0; i < d; i++) {
      float xh = (x[i] - mu) * rs, dxh = du[i] * gam[i];
      gg[i] += du[i] * xh;
      gbeta[i] += du[i];
      mean_dxh += dxh;
      mean_dxh_xh += (double)dxh * xh;
    }
    mean_dxh /= (double)d, mean_dxh_xh /= (double)d;
    for (int64_t i = 0; i < d; i++) {
      float xh = (x[i] - mu) * rs;
      m->dx[t * d + i] += rs * (du[i] * gam[i] - (float)mean_dxh - xh * (float)mean_dxh_xh);
    }
  }
}

static float lr_scale(int64_t step, int64_t steps) {
  int64_t warm = steps / 20 > 0 ? steps / 20 : 1;
  if (step < warm) return (float)(step + 1) / (float)warm;
  double t = (double)(step - warm) / (double)(steps - warm > 0 ? steps - warm : 1);
  if (t > 1.0) t = 1.0;
  return (float)(0.1 + 0.45 * (1.0 + cos(3.14159265358979 * t)));
}

static void adam_own(ablate_model *m, float lr) {
  const float b1 = 0.9f, b2 = 0.999f, eps = 1e-8f;
  const double t = (double)(m->step + 1);
  const float bc1 = (float)(1.0 - pow(b1, t)), bc2 = (float)(1.0 - pow(b2, t));
  for (int64_t i = 0; i < m->n_p; i++) {
    float g = m->g[i];
    m->am[i] = b1 * m->am[i] + (1.0f - b1) * g;
    m->av[i] = b2 * m->av[i] + (1.0f - b2) * g * g;
    m->p[i] -= lr * (m->am[i] / bc1) / (sqrtf(m->av[i] / bc2) + eps);
  }
}

int ablate_model_step(ablate_model *m, const uint8_t *ctx, const uint8_t *target, double *loss,
                      char *err, size_t err_size) {
  const int64_t T = m->B, d = m->d;
  const float *in = m->s.prenorm ? m->u : m->x;
  embed(m, T, ctx);
  if (m->s.prenorm) norm_forward(m, T);
  peer_status st;
  if (m->L) {
    if ((st = peer_forward_train(m->L, m->ctx, T, in, m->y)))
      return lib_err(err, err_size, st, "forward");
  } else {
    dense_forward(m, T, in);
  }
  head_forward(m, T, target, 1);
  double sum = 0.0;
  for (int64_t t = 0; t < T; t++)
    sum += m->tok_loss[t];
  *loss = sum / (double)T;
  memset(m->g, 0, sizeof(float) * (size_t)m->n_p);
  head_backward(m, T);
  if (m->L) {
    if ((st = peer_backward(m->L, m->ctx, m->dh, m->du, &m->pg)))
      return lib_err(err, err_size, st, "backward");
  } else {
    dense_backward(m, T, in);
  }
  memcpy(m->dx, m->dh, sizeof(float) * (size_t)(T * d));
  if (m->s.prenorm)
    norm_backward(m, T);
  else
    for (int64_t i = 0; i < T * d; i++)
      m->dx[i] += m->du[i];
  float *gemb = m->g + m->o_emb;
  for (int64_t t = 0; t < T; t++)
    for (int64_t j = 0; j < m->c; j++)
      axpy(gemb + (int64_t)ctx[t * m->c + j] * m->e, 1.0f, m->dx + t * d + j * m->e, m->e);
  float scale = lr_scale(m->step, m->s.steps);
  adam_own(m, m->s.lr * scale);
  if (m->L) {
    if ((st = peer_optimizer_set_lr(m->O, m->s.lr * scale, m->s.expert_lr * scale)) ||
        (st = peer_optimizer_step(m->O, &m->pg)))
      return lib_err(err, err_size, st, "optimizer");
  }
  m->step++;
  return 0;
}

int ablate_model_evaluate(ablate_model *m, const uint8_t *text, int64_t n, double *loss,
                          double *usage, double *unevenness, char *err, size_t err_size) {
  const int64_t c = m->c;
  const float *in = m->s.prenorm ? m->u : m->x;
  int64_t N = m->L ? peer_config_n_experts(&m->s.layer) : 0;
  double *mass = N ? calloc((size_t)N, sizeof(double)) : NULL;
  uint8_t *ctx = malloc((size_t)(m->B * c)), *target = malloc((size_t)m->B);
  if ((N && !mass) || !ctx || !target) {
    free(mass), free(ctx), free(target);
    set_err(err, err_size, "out of memory");
    return -1;
  }
  double sum = 0.0;
  int64_t count = 0;
  int rc = 0;
  for (int64_t p0 = c; p0 < n && !rc; p0 += m->B) {
    int64_t T = n - p0 < m->B ? n - p0 : m->B;
    for (int64_t t = 0; t < T; t++) {
      memcpy(ctx + t * c, text + p0 + t - c, (size_t)c);
      target[t] = text[p0 + t];
    }
    embed(m, T, ctx);
    if (m->s.prenorm) norm_forward(m, T);
    if (m->L) {
      peer_status st = peer_forward(m->L, T, in, m->y, m->idx, m->gates);
      if (!st) st = peer_usage_accumulate(mass, N, m->idx, m->gates, T * hk_of(m));
      if (st) rc = lib_err(err, err_size, st, "validation forward");
    } else {
      dense_forward(m, T, in);
    }
    if (rc) break;
    head_forward(m, T, target, 0);
    for (int64_t t = 0; t < T; t++)
      sum += m->tok_loss[t];
    count += T;
  }
  *loss = count ? sum / (double)count : NAN;
  *usage = *unevenness = NAN;
  if (!rc && mass) {
    peer_status st = peer_usage_metrics(mass, N, usage, unevenness);
    if (st) rc = lib_err(err, err_size, st, "usage");
  }
  free(mass), free(ctx), free(target);
  return rc;
}

/* ------------------------------------------------------------- checkpoints */

static void layer_path(char *buf, size_t size, const char *dir, int64_t step) {
  snprintf(buf, size, "%s/layer-%lld.safetensors", dir, (long long)step);
}

/* Remove layer-*.safetensors in dir except the one of step keep (-1: all). */
static void remove_layer_files(const char *dir, int64_t keep) {
  DIR *dp = opendir(dir);
  if (!dp) return;
  struct dirent *ent;
  char keep_name[64];
  snprintf(keep_name, sizeof keep_name, "layer-%lld.safetensors", (long long)keep);
  while ((ent = readdir(dp))) {
    if (strncmp(ent->d_name, "layer-", 6) != 0 || strcmp(ent->d_name, keep_name) == 0) continue;
    char path[4096];
    snprintf(path, sizeof path, "%s/%s", dir, ent->d_name);
    unlink(path);
  }
  closedir(dp);
}

int ablate_model_save(ablate_model *m, const char *dir, const char *tag, double extra, char *err,
                      size_t err_size) {
  char path[4096], step_s[32], extra_s[40];
  peer_status st;
  if (m->L) {
    layer_path(path, sizeof path, dir, m->step);
    if ((st = peer_checkpoint_save(m->L, m->O, path)))
      return lib_err(err, err_size, st, "checkpoint");
  }
  snprintf(step_s, sizeof step_s, "%lld", (long long)m->step);
  snprintf(extra_s, sizeof extra_s, "%.17g", extra);
  const char *meta[] = {"ablate.tag", tag, "ablate.step", step_s, "ablate.extra", extra_s};
  peer_tensor t[3];
  const char *names[3] = {"model.params", "model.adam_m", "model.adam_v"};
  float *data[3] = {m->p, m->am, m->av};
  for (int i = 0; i < 3; i++)
    t[i] = (peer_tensor){.name = names[i],
                         .dtype = PEER_F32,
                         .ndim = 1,
                         .shape = {m->n_p},
                         .data = data[i],
                         .nbytes = sizeof(float) * (size_t)m->n_p};
  snprintf(path, sizeof path, "%s/model.safetensors", dir);
  if ((st = peer_safetensors_write(path, t, 3, meta, 3)))
    return lib_err(err, err_size, st, "checkpoint");
  remove_layer_files(dir, m->L ? m->step : -1);
  return 0;
}

int ablate_model_load(ablate_model *m, const char *dir, const char *tag, double *extra, char *err,
                      size_t err_size) {
  char path[4096];
  snprintf(path, sizeof path, "%s/model.safetensors", dir);
  if (access(path, F_OK) != 0) return 0;
  peer_safetensors *f = NULL;
  peer_status st = peer_safetensors_open(&f, path);
  if (st) return lib_err(err, err_size, st, path);
  const char *ftag = peer_safetensors_metadata(f, "ablate.tag");
  const char *fstep = peer_safetensors_metadata(f, "ablate.step");
  const char *fextra = peer_safetensors_metadata(f, "ablate.extra");
  int rc = 0;
  if (!ftag || strcmp(ftag, tag) != 0 || !fstep || !fextra) {
    set_err(err, err_size, "%s: belongs to another setting (tag %s, wanted %s)", path,
            ftag ? ftag : "missing", tag);
    rc = -1;
  }
  const char *names[3] = {"model.params", "model.adam_m", "model.adam_v"};
  float *data[3] = {m->p, m->am, m->av};
  for (int i = 0; i < 3 && !rc; i++)
    if ((st = peer_safetensors_read(f, names[i], data[i], sizeof(float) * (size_t)m->n_p)))
      rc = lib_err(err, err_size, st, path);
  int64_t step = rc ? 0 : strtoll(fstep, NULL, 10);
  if (!rc) *extra = strtod(fextra, NULL);
  peer_safetensors_close(f);
  if (!rc && m->L) {
    layer_path(path, sizeof path, dir, step);
    if ((st = peer_checkpoint_load(m->L, m->O, path))) {
      rc = lib_err(err, err_size, st, path);
    } else if (peer_optimizer_step_count(m->O) != step) {
      set_err(err, err_size, "%s: optimizer step %lld, model step %lld", path,
              (long long)peer_optimizer_step_count(m->O), (long long)step);
      rc = -1;
    }
  }
  if (rc) return -1;
  m->step = step;
  return 1;
}

void ablate_model_remove_checkpoint(const char *dir) {
  char path[4096];
  remove_layer_files(dir, -1);
  snprintf(path, sizeof path, "%s/model.safetensors", dir);
  unlink(path);
}
