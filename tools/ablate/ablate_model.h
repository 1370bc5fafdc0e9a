/* ablate_model.h: the small language model of peer-ablate and its training.
 *
 * Byte-level tokens (vocabulary 256).  The previous c tokens are embedded
 * (one shared table of width d_model/c) and concatenated into x [d_model];
 * a residual block h = x + F(norm(x)) follows, where F is a PEER layer (the
 * model's only learned non-linearity), the same layer with identity experts
 * ("pkm": PKM-style values without an expert non-linearity), or a dense
 * feed-forward block d -> H*k -> d with the same activation ("dense", equal
 * active compute); norm is an optional LayerNorm (pre-norm).  Then
 * logits = W_out h + b_out and softmax cross-entropy.  No attention.
 *
 * The PEER layer trains with the library's peer_forward_train, peer_backward
 * and optimizer (Adam, lazy sparse Adam for the expert rows); the model's own
 * parameters (embedding, norm, output, dense block) train with a plain Adam
 * written here.  Everything is deterministic for a seed and independent of
 * the thread count. */
#ifndef ABLATE_MODEL_H
#define ABLATE_MODEL_H

#include "peer.h"

#include <stdint.h>

enum { ABLATE_VOCAB = 256 };

typedef enum ablate_kind { ABLATE_PEER = 0, ABLATE_PKM = 1, ABLATE_DENSE = 2 } ablate_kind;

/* One model to train: the block and everything the training run depends on. */
typedef struct ablate_spec {
  ablate_kind kind;
  peer_config layer; /* PEER/pkm layer; for dense, d_model, n_heads*top_k and activation */
  int context;       /* c */
  int prenorm;       /* 1: LayerNorm before the block */
  int batch;         /* tokens per step */
  int64_t steps;     /* training steps */
  float lr, expert_lr;
  uint64_t seed;
  int threads;
} ablate_spec;

typedef struct ablate_model ablate_model;

/* Create and seed a model; NULL with a message in err on failure. */
ablate_model *ablate_model_create(const ablate_spec *spec, char *err, size_t err_size);
void ablate_model_free(ablate_model *m);

/* One training step on tokens ctx [batch, c] / target [batch] (the learning
 * rate follows warmup + cosine from the step count).  Returns 0 and the
 * batch's mean loss, or -1 with a message. */
int ablate_model_step(ablate_model *m, const uint8_t *ctx, const uint8_t *target, double *loss,
                      char *err, size_t err_size);
int64_t ablate_model_steps_done(const ablate_model *m);

/* Validation over text[0 .. n): every position p >= c predicts text[p] from
 * text[p-c .. p).  Sets the mean loss (nats) and, for PEER/pkm, usage and
 * unevenness of the gate mass over the set (PEER.md "Metrics"; NAN for
 * dense).  Returns 0 or -1 with a message. */
int ablate_model_evaluate(ablate_model *m, const uint8_t *text, int64_t n, double *loss,
                          double *usage, double *unevenness, char *err, size_t err_size);

/* Total parameters, and parameters a token touches. */
int64_t ablate_model_params(const ablate_model *m);
int64_t ablate_model_active_params(const ablate_model *m);

/* Checkpoints in directory dir: layer-<step>.safetensors (the PEER layer and
 * its optimizer, peer_checkpoint_save) then model.safetensors (the model's own
 * parameters, their Adam moments, the step, `tag` and `extra`), which commits
 * the pair; the previous layer file is removed afterwards.  An interrupted
 * save leaves the previous pair usable.  load returns 1 when a checkpoint was
 * restored, 0 when there is none, -1 on error (including a tag mismatch). */
int ablate_model_save(ablate_model *m, const char *dir, const char *tag, double extra, char *err,
                      size_t err_size);
int ablate_model_load(ablate_model *m, const char *dir, const char *tag, double *extra, char *err,
                      size_t err_size);
/* Remove a checkpoint written by save (after the run has its result). */
void ablate_model_remove_checkpoint(const char *dir);

#endif /* ABLATE_MODEL_H */
