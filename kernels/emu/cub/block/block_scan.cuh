/* cub/block/block_scan.cuh (emulated): cub::BlockScan<T, BLOCK>::ExclusiveSum
 * for a one-dimensional block of BLOCK threads, for the PEER_CUDA=EMU build.
 * Every thread writes its input to the TempStorage, a barrier, thread 0
 * scans in order, a barrier, every thread reads its prefix and the total.
 * Like CUB's, it must be called by every thread of the block, and the
 * TempStorage may be reused only after a __syncthreads (a missing one is a
 * race TSan reports). */
#ifndef PEER_EMU_CUB_BLOCK_SCAN_CUH
#define PEER_EMU_CUB_BLOCK_SCAN_CUH

#include "../../cuda_runtime.h"

namespace cub {

template <class T, int BLOCK_DIM_X> class BlockScan {
public:
  struct TempStorage {
    T item[BLOCK_DIM_X];
    T total;
  };
  explicit BlockScan(TempStorage &storage) : s(storage) {}
  void ExclusiveSum(T input, T &output, T &block_aggregate) {
    const unsigned t = threadIdx.x;
    s.item[t] = input;
    __syncthreads();
    if (t == 0) {
      T run = T();
      for (int i = 0; i < BLOCK_DIM_X; i++) {
        const T v = s.item[i];
        s.item[i] = run;
        run = run + v;
      }
      s.total = run;
    }
    __syncthreads();
    output = s.item[t];
    block_aggregate = s.total;
  }
  void ExclusiveSum(T input, T &output) {
    T total;
    ExclusiveSum(input, output, total);
  }

private:
  TempStorage &s;
};

} // namespace cub

#endif
