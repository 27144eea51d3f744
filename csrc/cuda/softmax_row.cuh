// softmax_row.cuh: one softmax cross-entropy row spread over a group of kWidth lanes of a warp, the device side of
// common/softmax_ce.h shared by cross_entropy's row kernels, linear_cross_entropy's small kernel and the persistent
// sgd_train kernel. Lane l of the group owns some of the row's elements (how they are laid out -- registers, shared
// memory, 16-byte vectors in global memory -- is the caller's); the functions below are called by every lane of the
// group and give every lane the same result (cuda/reduce.cuh).
//   warp_row_result: the loss and float64 lse from the lanes' online log-sum-exp states (row_result's numerics:
//                    log1p when the target is the max, lse = m + log(s) in float64).
//   warp_row_grad:   d = g (softmax - onehot) from the lse; the target's entry from the row's sum (target_grad).
#pragma once

#include "common/softmax_ce.h"
#include "cuda/reduce.cuh"

#include <cstdint>

namespace charmlp::cuda {

// lane_state: lse_add of this lane's elements (the target excluded from the sum, as lse_add does with is_target);
// x_t: the target logit, known to every lane.
template <int kWidth, typename acc_t>
__device__ __forceinline__ RowResult<acc_t> warp_row_result(OnlineLse<acc_t> lane_state, acc_t x_t) {
  const OnlineLse<acc_t> st = warp_lse<kWidth>(lane_state);
  return row_result(st.m, st.s, x_t);
}

// for_each_element(f) must replace each of this lane's elements x_j by f(j, x_j) (f returns d_j, 0 at the target).
// Returns d_t, which the caller writes over the target's element once that element's own write is ordered before
// (the lane that owns it, or after a group sync).
template <int kWidth, typename acc_t, typename ForEach>
__device__ __forceinline__ acc_t warp_row_grad(ForEach&& for_each_element, int64_t t, double lse, acc_t g) {
  const SplitLse<acc_t> l = split_lse<acc_t>(lse);
  acc_t sum = 0;
  for_each_element([&](int64_t j, acc_t x) {
    const acc_t p = softmax_prob_excl(x, j == t, l);
    sum += p;
    return p * g;
  });
  return target_grad(warp_sum<kWidth>(sum), g);
}

}  // namespace charmlp::cuda
