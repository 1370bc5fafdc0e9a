/* common.cuh: what the .cu files share: the library's internal header seen
 * from C++ (through status.h, with its rule for failed runtime calls), the
 * launch spelling, and turning a failed launch into a peer status. */
#ifndef PEER_KERNELS_COMMON_CUH
#define PEER_KERNELS_COMMON_CUH

#include "rowops.h"
#include "status.h"

#include <cuda_runtime.h>

#define PEER_FULL_MASK 0xffffffffu

/* PEER_LAUNCH(grid, block, smem, stream, kernel)(args...) is
 * kernel<<<grid, block, smem, stream>>>(args...) under nvcc, and the
 * emulator's launch in the PEER_CUDA=EMU build (kernels/emu/), whose
 * cuda_runtime.h defines PEER_EMU_LAUNCH.  The kernel comes last so that a
 * template's commas need no parentheses. */
#ifdef __CUDACC__
#define PEER_LAUNCH(grid, block, smem, stream, ...) __VA_ARGS__<<<grid, block, smem, stream>>>
#else
#define PEER_LAUNCH(grid, block, smem, stream, ...)                                                \
  PEER_EMU_LAUNCH(grid, block, smem, stream, __VA_ARGS__)
#endif

/* PEER_K_COUNT(counter, n) adds n to one of the emulated build's work
 * counters (peer_emu.h: peer_emu_counts.counter), so that tests and
 * benchmarks can count a kernel's work; under nvcc it is nothing (its
 * arguments are not evaluated). */
#ifdef __CUDACC__
#define PEER_K_COUNT(counter, n) ((void)0)
#else
#define PEER_K_COUNT(counter, n) ::peer_emu::count_work(&peer_emu_counts::counter, (n))
#endif

/* Grids stride over their work, so a launch never asks for more blocks than
 * this (the work per block then loops). */
#define PEER_K_MAX_BLOCKS ((int64_t)1 << 20)

static inline unsigned peer_k_blocks(int64_t work, int64_t per_block) {
  int64_t b = (work + per_block - 1) / per_block;
  return (unsigned)(b < PEER_K_MAX_BLOCKS ? b : PEER_K_MAX_BLOCKS);
}

static inline peer_status peer_k_launched(const char *what) {
  cudaError_t e = cudaGetLastError();
  if (e == cudaSuccess) return PEER_OK;
  return peer_fail(PEER_ERR_CUDA, "%s: kernel launch failed: %s", what, cudaGetErrorString(e));
}

#endif
