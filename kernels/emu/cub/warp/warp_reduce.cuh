/* cub/warp/warp_reduce.cuh (emulated): cub::WarpReduce as the kernels use
 * it, for the PEER_CUDA=EMU build.  Sum is CUB's shuffle reduction for a
 * full warp: five __shfl_down_sync steps with offsets 1, 2, 4, 8, 16; the
 * total is valid in lane 0 only (other lanes hold partial sums, as in CUB).
 * The shuffle variant of CUB keeps nothing in TempStorage. */
#ifndef PEER_EMU_CUB_WARP_REDUCE_CUH
#define PEER_EMU_CUB_WARP_REDUCE_CUH

#include "../../cuda_runtime.h"

namespace cub {

template <class T, int LOGICAL_WARP_THREADS = 32> class WarpReduce {
public:
  struct TempStorage {
    T unused;
  };
  explicit WarpReduce(TempStorage &storage) { (void)storage; }
  T Sum(T input) {
    static_assert(LOGICAL_WARP_THREADS == 32, "emulated WarpReduce: full warps only");
    T v = input;
    for (int offset = 1; offset < 32; offset <<= 1) {
      const T other = __shfl_down_sync(0xffffffffu, v, (unsigned)offset);
      if ((int)(threadIdx.x & 31) + offset < 32) v = v + other;
    }
    return v;
  }
};

} // namespace cub

#endif
