/* emu_internal.h: what the emulator's own sources (runtime.cc, simt.cc,
 * cublas.cc, the CUB shims) share: device-memory lookups, the last-error
 * state, and the record of a kernel error. */
#ifndef PEER_EMU_INTERNAL_H
#define PEER_EMU_INTERNAL_H

#include "cuda_runtime_api.h"
#include "peer_emu.h"

#include <stddef.h>

#include <functional>

namespace peer_emu {

/* Is [p, p + bytes) inside one live cudaMalloc allocation? */
bool device_range(const void *p, size_t bytes);
/* Is p inside a live allocation or at its end? */
bool device_pointer(const void *p);
/* Is the stream a live handle (or a default stream)? */
bool stream_ok(cudaStream_t s);

/* Sets the last error (and, for a kernel error, the error the next
 * synchronisation returns); returns e. */
cudaError_t set_error(cudaError_t e);
/* A kernel error: counted, kept as the text of cudaErrorLaunchFailure,
 * printed with PEER_EMU_REPORT=1, fatal with PEER_EMU_ABORT=1. */
void kernel_error(const char *msg);
void count_launch();
/* Work on a stream, in its order (runtime.cc: at once, or with lazy
 * streams when something needs it).  Checks of arguments belong before
 * this, in the call; what the work finds (a kernel error) is reported by
 * the next synchronisation. */
void enqueue(cudaStream_t stream, std::function<void()> op);
/* A cuBLAS product on cuBLAS's default workspace (peer_emu_counts). */
void count_blas_default_workspace();

/* Largest dynamic shared memory of one launch (no opt-in above 48 KiB). */
constexpr size_t smem_max = 48 * 1024;
/* Bytes past the launch's size that are filled and checked after a block. */
constexpr size_t smem_canary = 256;
/* This host thread's dynamic shared memory arrays (smem.h, generated):
 * at most `max` addresses into out, returns how many. */
int dynamic_smem_regions(unsigned char **out, int max);
/* 0; out of line, for smem.h */
int smem_first_word();

} // namespace peer_emu

#endif
