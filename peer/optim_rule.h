/* optim_rule.h: one optimizer update of one weight, shared by the CPU
 * optimizer (optim.c) and the CUDA one (kernels/optim.cu), so both round the
 * same way.  Compiles as C and as CUDA (rowops.h's PEER_HD).  On the device
 * every multiply, add, divide and square root is an explicitly rounded
 * intrinsic (__fmul_rn, ...) that nvcc never contracts into FMAs, and the
 * host files that include it are compiled with -ffp-contract=off
 * (CMakeLists.txt), so a step has the same bits on the GPU and on every CPU
 * build (portable or -march=native). */
#ifndef PEER_OPTIM_RULE_H
#define PEER_OPTIM_RULE_H

#include "peer.h"
#include "rowops.h"

#if defined(__CUDA_ARCH__)
#define PEER_OR_MUL(a, b) __fmul_rn(a, b)
#define PEER_OR_ADD(a, b) __fadd_rn(a, b)
#define PEER_OR_SUB(a, b) __fsub_rn(a, b)
#define PEER_OR_DIV(a, b) __fdiv_rn(a, b)
#define PEER_OR_SQRT(a) __fsqrt_rn(a)
#else
#define PEER_OR_MUL(a, b) ((a) * (b))
#define PEER_OR_ADD(a, b) ((a) + (b))
#define PEER_OR_SUB(a, b) ((a) - (b))
#define PEER_OR_DIV(a, b) ((a) / (b))
#define PEER_OR_SQRT(a) sqrtf(a)
#endif

/* Per-step coefficients of one rule. */
typedef struct peer_optim_rule {
  peer_optim_kind kind;
  float lr, keep;             /* keep = 1 - lr*weight_decay */
  float momentum;             /* SGD */
  float b1, b2, eps;          /* Adam */
  float step_size, rsqrt_bc2; /* lr / (1 - b1^t), 1 / sqrt(1 - b2^t) */
} peer_optim_rule;

/* The new value of one weight p with gradient g; m and v are its state
 * (Adam: both; SGD: m is the momentum buffer or NULL). */
PEER_HD float peer_optim_update(const peer_optim_rule *r, float p, float g, float *m, float *v) {
  if (r->kind == PEER_OPTIM_ADAM) {
    float mi = PEER_OR_ADD(PEER_OR_MUL(r->b1, *m), PEER_OR_MUL(1.0f - r->b1, g));
    float vi = PEER_OR_ADD(PEER_OR_MUL(r->b2, *v), PEER_OR_MUL(1.0f - r->b2, PEER_OR_MUL(g, g)));
    *m = mi;
    *v = vi;
    float den = PEER_OR_ADD(PEER_OR_MUL(PEER_OR_SQRT(vi), r->rsqrt_bc2), r->eps);
    return PEER_OR_SUB(PEER_OR_MUL(p, r->keep), PEER_OR_DIV(PEER_OR_MUL(r->step_size, mi), den));
  }
  if (m) {
    *m = PEER_OR_ADD(PEER_OR_MUL(r->momentum, *m), g);
    g = *m;
  }
  return PEER_OR_SUB(PEER_OR_MUL(p, r->keep), PEER_OR_MUL(r->lr, g));
}

#endif
