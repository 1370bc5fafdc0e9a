/* backend_optim.c: the CUDA backend's optimizer step (peer_backend_i's
 * optimizer_step: optimizer state in device memory, the update kernels of
 * optim.cu), peer_cuda_optimizer_step on device gradients, and download
 * (parameter or state bytes back to the host, upload's mirror) for saving.
 * The argument checks and the rules at step t are optim.c's
 * (peer_optimizer_step_device, peer_optim_plan). */
#include "backend.h"
#include "optim.h"

#include <string.h>

static const int dense_slots[] = {PEER_P_QUERY_WEIGHT, PEER_P_QUERY_BIAS, PEER_P_NORM_WEIGHT,
                                  PEER_P_NORM_BIAS, PEER_P_KEYS};
#define N_DENSE ((int)(sizeof dense_slots / sizeof dense_slots[0]))

static const int expert_slots[2] = {PEER_P_EXPERTS_DOWN, PEER_P_EXPERTS_UP};

/* Gradients the host has not seen (the device path): clear the step's
 * record, lower it to the first non-finite element, if any. */
static peer_status queue_check(peer_layer *L, const peer_optim_plan *p, unsigned long long *rec,
                               cudaStream_t stream) {
  cudaError_t e = cudaMemsetAsync(rec, 0xff, sizeof *rec, stream);
  if (e != cudaSuccess) return peer_k_cuda_fail(e, "cuda_optimizer_step: clearing its record");
  peer_status s;
  for (int i = 0; i < N_DENSE; i++) {
    const int slot = dense_slots[i];
    if (p->grad[slot] &&
        (s = peer_k_optim_check_dense(p->grad[slot], (int64_t)(L->slot[slot].nbytes / 4), slot, rec,
                                      stream)))
      return s;
  }
  for (int i = 0; i < 2 && p->grad[PEER_P_EXPERTS_DOWN]; i++)
    if ((s = peer_k_optim_check_rows(p->grad[expert_slots[i]], p->experts_dense, p->expert_rows,
                                     p->d_n_expert_rows, p->n_expert_rows, p->expert_capacity,
                                     L->slot[expert_slots[i]].shape[1], expert_slots[i], rec,
                                     stream)))
      return s;
  return PEER_OK;
}

/* Queue the whole step described by p (device gradients) on `stream`; with
 * `refused` (a record queue_check filled), the updates write nothing when it
 * holds a non-finite gradient. */
static peer_status queue_step(peer_layer *L, const peer_optim_plan *p,
                              const unsigned long long *refused, cudaStream_t stream) {
  peer_status s;
  for (int i = 0; i < N_DENSE; i++) {
    const int slot = dense_slots[i];
    if (!p->grad[slot]) continue;
    const peer_tensor *t = &L->slot[slot];
    if ((s = peer_k_optim_dense(&p->dense, t->data, p->grad[slot], p->m[slot], p->v[slot],
                                (int64_t)(t->nbytes / sizeof(float)), refused, stream)))
      return s;
  }
  if (!p->grad[PEER_P_EXPERTS_DOWN]) return PEER_OK;
  const bool bf16 = L->cfg.weight_dtype == PEER_BF16;
  for (int i = 0; i < 2; i++) {
    const int slot = expert_slots[i];
    if ((s = peer_k_optim_rows(&p->rows, L->slot[slot].data, bf16, p->grad[slot], p->experts_dense,
                               p->m[slot], p->v[slot], p->expert_rows, p->d_n_expert_rows,
                               p->n_expert_rows, p->expert_capacity, L->slot[slot].shape[1],
                               refused, stream)))
      return s;
  }
  return PEER_OK;
}

/* The device-gradient step: checked on the device, the updates skipped when
 * a gradient is not finite, the refusal folded into the layer's records for
 * peer_cuda_check; nothing waits. */
static peer_status device_step(peer_layer *L, const peer_optim_plan *p, cudaStream_t stream) {
  unsigned long long *rec = state_of(L)->d_bad;
  peer_status s = queue_check(L, p, rec + REC_STEP, stream);
  if (!s) s = queue_step(L, p, rec + REC_STEP, stream);
  if (!s) s = peer_k_record_fold(rec + REC_GRAD, rec + REC_STEP, 1, stream);
  return s;
}

/* The host-gradient step (peer_optimizer_step on a CUDA layer): wait for
 * the device, as every host-pointer call does; copy the gradients into the
 * optimizer's staging (the listed expert rows only, packed as sparse rows),
 * step on the layer's own stream, and wait for it. */
static peer_status host_step(peer_layer *L, const peer_optim_plan *p, void **stage,
                             size_t *stage_bytes) {
  const char *what = "optimizer_step";
  cuda_state *st = state_of(L);
  const bool experts = p->grad[PEER_P_EXPERTS_DOWN] != NULL;
  const size_t d = (size_t)L->slot[PEER_P_EXPERTS_DOWN].shape[1];
  const size_t R = experts ? (size_t)p->n_expert_rows : 0;
  peer_optim_plan dp = *p;
  float *dg[PEER_P_COUNT] = {0};
  int64_t *rows = NULL;
  part parts[PEER_P_COUNT + 1];
  size_t n_parts = 0;
  for (int i = 0; i < N_DENSE; i++)
    if (p->grad[dense_slots[i]])
      parts[n_parts++] = (part){(void **)&dg[dense_slots[i]], L->slot[dense_slots[i]].nbytes};
  if (experts) {
    parts[n_parts++] = (part){(void **)&rows, R * 8};
    parts[n_parts++] = (part){(void **)&dg[PEER_P_EXPERTS_DOWN], R * d * 4};
    parts[n_parts++] = (part){(void **)&dg[PEER_P_EXPERTS_UP], R * d * 4};
  }
  const size_t need = carve(parts, n_parts, NULL);
  peer_status s = device_idle(what);
  if (s) return s;
  if (need > *stage_bytes) {
    if (*stage) cudaFree(*stage);
    *stage = NULL;
    *stage_bytes = 0;
    cudaError_t e = cudaMalloc(stage, need);
    if (e != cudaSuccess) {
      *stage = NULL;
      return peer_k_cuda_fail(e, "optimizer_step: staging the gradients: cudaMalloc");
    }
    *stage_bytes = need;
  }
  carve(parts, n_parts, *stage);
  cudaStream_t stream = st->own;
  for (int i = 0; i < N_DENSE && !s; i++) {
    const int slot = dense_slots[i];
    if (p->grad[slot])
      s = copy(dg[slot], p->grad[slot], L->slot[slot].nbytes, cudaMemcpyHostToDevice, stream);
  }
  if (experts && !s) {
    s = copy(rows, p->expert_rows, R * 8, cudaMemcpyHostToDevice, stream);
    for (int i = 0; i < 2 && !s; i++) {
      const int slot = expert_slots[i];
      const float *g = p->grad[slot];
      if (!p->experts_dense)
        s = copy(dg[slot], g, R * d * 4, cudaMemcpyHostToDevice, stream);
      else
        for (size_t j = 0; j < R && !s; j++)
          s = copy(dg[slot] + j * d, g + (size_t)p->expert_rows[j] * d, d * 4,
                   cudaMemcpyHostToDevice, stream);
    }
  }
  if (!s) {
    for (int slot = 0; slot < PEER_P_COUNT; slot++)
      dp.grad[slot] = p->grad[slot] ? dg[slot] : NULL;
    dp.expert_rows = rows;
    dp.experts_dense = false;
    dp.d_n_expert_rows = NULL;
    dp.expert_capacity = (int64_t)R;
    s = queue_step(L, &dp, NULL, stream); /* host gradients: optim.c checked them */
  }
  if (s) {
    drain(stream);
    return s;
  }
  return wait_for(stream, what);
}

peer_status peer_cb_cuda_optimizer_step(peer_layer *L, const peer_optim_plan *p, void **stage,
                                        size_t *stage_bytes) {
  cudaError_t e = cudaSetDevice(state_of(L)->device);
  if (e != cudaSuccess) return peer_k_cuda_fail(e, "optimizer_step");
  if (p->host_grads) return host_step(L, p, stage, stage_bytes);
  return device_step(L, p, (cudaStream_t)p->stream);
}

/* Parameter (or optimizer state) bytes to the host, after a wait for the
 * whole device: work queued on any stream may still be writing them. */
peer_status peer_cb_cuda_download(const peer_layer *L, void *dst, const void *src, size_t bytes) {
  const char *what = "download of parameters";
  cudaError_t e = cudaSetDevice(state_of(L)->device);
  if (e != cudaSuccess) return peer_k_cuda_fail(e, what);
  peer_status s = device_idle(what);
  if (s) return s;
  if ((e = cudaMemcpy(dst, src, bytes, cudaMemcpyDeviceToHost)) != cudaSuccess)
    return peer_k_cuda_fail(e, what);
  return PEER_OK;
}

peer_status peer_cuda_optimizer_step(peer_optimizer *opt, const peer_grads *d_grads,
                                     const int64_t *d_n_expert_rows, cudaStream_t stream) {
  return peer_optimizer_step_device(opt, d_grads, d_n_expert_rows, (void *)stream,
                                    "cuda_optimizer_step");
}
