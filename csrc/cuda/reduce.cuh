// reduce.cuh: the reductions over the lanes of a warp that the CUDA kernels share -- a sum and the combination
// of online log-sum-exp states (common/softmax_ce.h) -- over groups of kWidth consecutive lanes
// (a power of two <= 32: several rows per warp when rows are short).
//
// Both are xor butterflies: every lane of the group ends with the result, and with the same bits in every lane
// (each step combines the same two operands in both lanes of a pair, and + and lse_combine commute), which the
// kernels rely on when each lane goes on to use its own copy. Lane 0's result also equals a shfl_down tree's bit for bit (the same
// pairs are added in the same order), so the one-block reductions over B keep their summation order.
#pragma once

#include "common/softmax_ce.h"

namespace charmlp::cuda {

constexpr unsigned kFullMask = 0xffffffffu;

template <int kWidth = 32, typename T>
__device__ __forceinline__ T warp_sum(T v) {
  static_assert(kWidth >= 1 && kWidth <= 32 && (kWidth & (kWidth - 1)) == 0, "kWidth: a power of two <= 32");
#pragma unroll
  for (int off = kWidth / 2; off > 0; off /= 2) v += __shfl_xor_sync(kFullMask, v, off, kWidth);
  return v;
}

// The (max, sum of exp) of a row from the states of the lanes that streamed its parts.
template <int kWidth = 32, typename acc_t>
__device__ __forceinline__ OnlineLse<acc_t> warp_lse(OnlineLse<acc_t> v) {
  static_assert(kWidth >= 1 && kWidth <= 32 && (kWidth & (kWidth - 1)) == 0, "kWidth: a power of two <= 32");
#pragma unroll
  for (int off = kWidth / 2; off > 0; off /= 2) {
    const acc_t m = __shfl_xor_sync(kFullMask, v.m, off, kWidth), s = __shfl_xor_sync(kFullMask, v.s, off, kWidth);
    v = lse_combine(v, OnlineLse<acc_t>{m, s});
  }
  return v;
}

}  // namespace charmlp::cuda
