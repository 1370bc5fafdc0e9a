/* smem.h: definitions of the kernels' dynamic shared memory for the
 * emulated build.  A kernel declares `extern __shared__ T name[];`, which
 * the emulator's __shared__ makes `extern thread_local T name[];`; the build
 * scans the kernel sources for these declarations and writes a source that
 * includes this header and expands PEER_EMU_SMEM(T, name) once per name
 * (CMakeLists.txt, PEER_CUDA=EMU), then PEER_EMU_SMEM_REGIONS(nullptr, the
 * names' addresses), so that simt.cc can refill and poison each array per block. */
#ifndef PEER_EMU_SMEM_H
#define PEER_EMU_SMEM_H

#include "emu_internal.h"

#include <stdint.h>

/* The initialiser is dynamic (a call into another file) on purpose: the
 * kernels' `extern thread_local` uses then call the array's TLS init
 * function, which GCC, at -O2 in a PIE, calls without checking it exists. */
#define PEER_EMU_SMEM(T, name)                                                                     \
  alignas(                                                                                         \
      256) thread_local T name[(::peer_emu::smem_max + ::peer_emu::smem_canary) / sizeof(T)] = {   \
      (T)::peer_emu::smem_first_word()};

#define PEER_EMU_SMEM_REGIONS(...)                                                                 \
  int peer_emu::dynamic_smem_regions(unsigned char **out, int max) {                               \
    unsigned char *all[] = {__VA_ARGS__};                                                          \
    int n = 0;                                                                                     \
    for (unsigned i = 0; i < sizeof all / sizeof all[0] && n < max; i++)                           \
      if (all[i]) out[n++] = all[i];                                                               \
    return n;                                                                                      \
  }
#define PEER_EMU_SMEM_ADDR(name) (unsigned char *)name

#endif
