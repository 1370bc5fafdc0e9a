/* cub/device/device_radix_sort.cuh (emulated): cub::DeviceRadixSort::
 * SortPairs (unsigned keys), for the PEER_CUDA=EMU build.  CUB's two-phase
 * API: with d_temp_storage NULL it only sets temp_storage_bytes; with a
 * buffer smaller than that it returns cudaErrorInvalidValue.  The sort is
 * stable and orders by key bits [begin_bit, end_bit) only (other bits are
 * ignored, as CUB's), LSD passes of up to 8 bits through the temp buffer,
 * which must be device memory, as keys and values must be.  The sort runs
 * in the stream's order (runtime.cc). */
#ifndef PEER_EMU_CUB_DEVICE_RADIX_SORT_CUH
#define PEER_EMU_CUB_DEVICE_RADIX_SORT_CUH

#include "../../emu_internal.h"

#include <stdint.h>
#include <string.h>

#include <type_traits>

namespace cub {

struct DeviceRadixSort {
  template <class K, class V>
  static cudaError_t SortPairs(void *d_temp_storage, size_t &temp_storage_bytes, const K *d_keys_in,
                               K *d_keys_out, const V *d_values_in, V *d_values_out, int num_items,
                               int begin_bit = 0, int end_bit = (int)sizeof(K) * 8,
                               cudaStream_t stream = 0) {
    static_assert(std::is_unsigned<K>::value, "emulated SortPairs: unsigned keys only");
    const size_t n = num_items > 0 ? (size_t)num_items : 0;
    /* the alternate key and value buffers, and the 256 counts of a pass */
    const size_t keys_alt = round256(n * sizeof(K)), vals_alt = round256(n * sizeof(V));
    const size_t need = keys_alt + vals_alt + 256 * sizeof(size_t) + 256;
    if (!d_temp_storage) {
      temp_storage_bytes = need;
      return cudaSuccess;
    }
    if (num_items < 0 || begin_bit < 0 || end_bit > (int)sizeof(K) * 8 ||
        temp_storage_bytes < need || !peer_emu::stream_ok(stream))
      return peer_emu::set_error(cudaErrorInvalidValue);
    if (n == 0) return cudaSuccess;
    if (!peer_emu::device_range(d_temp_storage, need) ||
        !peer_emu::device_range(d_keys_in, n * sizeof(K)) ||
        !peer_emu::device_range(d_keys_out, n * sizeof(K)) ||
        !peer_emu::device_range(d_values_in, n * sizeof(V)) ||
        !peer_emu::device_range(d_values_out, n * sizeof(V)))
      return peer_emu::set_error(cudaErrorInvalidValue);
    char *t = (char *)d_temp_storage;
    peer_emu::enqueue(stream, [=] {
      K *ka = d_keys_out, *kb = (K *)t;
      V *va = d_values_out, *vb = (V *)(t + keys_alt);
      size_t *count = (size_t *)(t + keys_alt + vals_alt);
      memmove(ka, d_keys_in, n * sizeof(K));
      memmove(va, d_values_in, n * sizeof(V));
      for (int bit = begin_bit; bit < end_bit; bit += 8) {
        const int w = end_bit - bit < 8 ? end_bit - bit : 8;
        const K mask = (K)((1u << w) - 1);
        memset(count, 0, 256 * sizeof(size_t));
        for (size_t i = 0; i < n; i++)
          count[(ka[i] >> bit) & mask]++;
        size_t run = 0;
        for (int d = 0; d < 256; d++) {
          const size_t c = count[d];
          count[d] = run;
          run += c;
        }
        for (size_t i = 0; i < n; i++) {
          const size_t at = count[(ka[i] >> bit) & mask]++;
          kb[at] = ka[i];
          vb[at] = va[i];
        }
        memcpy(ka, kb, n * sizeof(K));
        memcpy(va, vb, n * sizeof(V));
      }
    });
    return cudaSuccess;
  }

private:
  static size_t round256(size_t b) { return (b + 255) & ~(size_t)255; }
};

} // namespace cub

#endif
