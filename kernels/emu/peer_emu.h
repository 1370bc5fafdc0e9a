/* peer_emu.h: what the emulated CUDA build (PEER_CUDA=EMU) offers beyond the
 * CUDA API, for tests: counts of the runtime calls a steady loop should not
 * make, an injected cudaMalloc failure, and the last kernel error (a
 * barrier or warp collective that not every named thread reached, a write
 * past the dynamic shared memory, a kernel argument that is not device
 * memory).  PEER_EMU_ABORT=1 in the environment makes a kernel error abort
 * the process with its message (for a debugger); PEER_EMU_REPORT=1 prints
 * each kernel error on stderr. */
#ifndef PEER_EMU_H
#define PEER_EMU_H

#ifdef __cplusplus
extern "C" {
#endif

typedef struct peer_emu_counts {
  unsigned long long device_syncs; /* cudaDeviceSynchronize */
  unsigned long long stream_syncs; /* cudaStreamSynchronize, cudaEventSynchronize */
  unsigned long long mallocs;      /* cudaMalloc calls, failed ones included */
  unsigned long long frees;        /* cudaFree calls with a non-NULL pointer */
  unsigned long long launches;     /* kernel launches */
  unsigned long long kernel_errors;
  /* cuBLAS products run on a handle without a workspace of the caller's
   * (cublasSetWorkspace since its last cublasSetStream, which resets it to
   * cuBLAS's own pool, as the real library does) */
  unsigned long long blas_default_workspace;
  /* Work the kernels count (PEER_K_COUNT, kernels/common.cuh): sub-key
   * scores the top-k' selection wrote into its candidate buffer (past its
   * threshold), and keys it passed through its warp sort (the sort's size,
   * a power of two, per sort); sub-key scores the bf16 path re-scored
   * exactly (subkey_topk_bf16); key rows the bf16 copy of the keys
   * converted (keys16). */
  unsigned long long topk_candidates;
  unsigned long long topk_sorted;
  unsigned long long topk_rescored;
  unsigned long long keys16_rows;
} peer_emu_counts;

/* The counts since the process started. */
void peer_emu_get_counts(peer_emu_counts *out);

/* The n-th cudaMalloc from now (1: the next) fails with
 * cudaErrorMemoryAllocation; 0 turns it off.  The environment variable
 * PEER_EMU_FAIL_MALLOC=n does the same from the first call. */
void peer_emu_fail_malloc(long n);

/* Lazy streams.  on = 1: work queued on the streams the program created
 * runs only when something needs it (a synchronisation of the stream, the
 * device or an event behind it; a wait for such an event on the legacy
 * stream, or on a stream that runs; work on the legacy stream, which waits
 * for the blocking streams; a cudaFree; a copy into pageable memory; see
 * runtime.cc), later than a GPU would run it, so that work which reads
 * another stream's results without a cudaStreamWaitEvent for them reads
 * stale memory.  on = 2: the same, and before each entry of a stream the
 * host waits for, every other stream runs as far as its waits allow, so
 * that a stream which should have waited for that stream's earlier work
 * (a fork without its wait) runs too early.  0: work runs when it is
 * queued (the default).  What is queued runs before the mode changes.
 * PEER_EMU_LAZY_STREAMS=1 or 2 in the environment sets it from the start. */
void peer_emu_lazy_streams(int on);

/* Makes cudaStreamIsCapturing report the stream (a cudaStream_t the program
 * created) as capturing (on = 1) or not (0), as between
 * cudaStreamBeginCapture and cudaStreamEndCapture; its work still runs as
 * queued (the emulator records no graphs).  -1 for another stream. */
int peer_emu_set_capturing(void *stream, int on);

/* The message of the last kernel error, "" if none yet. */
const char *peer_emu_last_kernel_error(void);

/* Device memory in use (bytes cudaMalloc handed out and not yet freed). */
unsigned long long peer_emu_bytes_in_use(void);

#ifdef __cplusplus
}
#endif
#endif
