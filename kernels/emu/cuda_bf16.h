/* cuda_bf16.h (emulated): bfloat16 storage and its conversions, for the
 * PEER_CUDA=EMU build: float to bf16 rounds to nearest even (NaN stays a
 * quiet NaN), bf16 to float is exact. */
#ifndef PEER_EMU_CUDA_BF16_H
#define PEER_EMU_CUDA_BF16_H

#include "cuda_runtime.h"

#ifdef __cplusplus
struct __nv_bfloat16 {
  unsigned short x;
};

static inline __nv_bfloat16 __float2bfloat16(float f) {
  uint32_t u;
  memcpy(&u, &f, 4);
  __nv_bfloat16 r;
  if ((u & 0x7fffffffu) > 0x7f800000u)
    r.x = (unsigned short)((u >> 16) | 0x40);
  else
    r.x = (unsigned short)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
  return r;
}

static inline float __bfloat162float(__nv_bfloat16 b) {
  uint32_t u = (uint32_t)b.x << 16;
  float f;
  memcpy(&f, &u, 4);
  return f;
}
#endif

#endif
