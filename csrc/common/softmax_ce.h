// softmax_ce.h: the scalar math of one numerically stable softmax cross-entropy row, written once for the CPU
// and CUDA kernels (CHARMLP_HOST_DEVICE): an online log-sum-exp, the row's loss and float64 lse, the softmax from a
// saved lse, the gradient of a row, and the gradient scale of a reduction.
//
// Notation: logits x (B, V), targets t (B,), row i counted unless t[i] == ignore_index.
//   m        = max_j x_j                       (the target included, so that no exp below can overflow)
//   s_excl   = sum_{j != t} exp(x_j - m)       (the target excluded: see row_result)
//   loss     = lse - x_t,  lse = m + log(s_excl + exp(x_t - m))
//   dloss/dx = softmax(x) - onehot(t)
#pragma once

#include "common/checks.h"

#include <math.h>

#include <cstdint>
#include <limits>

namespace charmlp {

// Overloads rather than std:: so that the float path stays in float on the device as on the host.
CHARMLP_HOST_DEVICE float exp_(float x) { return expf(x); }
CHARMLP_HOST_DEVICE double exp_(double x) { return exp(x); }
CHARMLP_HOST_DEVICE float log_(float x) { return logf(x); }
CHARMLP_HOST_DEVICE double log_(double x) { return log(x); }
CHARMLP_HOST_DEVICE float log1p_(float x) { return log1pf(x); }
CHARMLP_HOST_DEVICE double log1p_(double x) { return log1p(x); }

// Online log-sum-exp state of a part of a row: a streaming pass keeps one per thread and the threads of a
// row combine theirs. m starts at the lowest finite value rather than -inf so that -inf logits give exp(-inf)
// = 0 instead of exp(-inf - -inf) = nan.
template <typename acc_t>
struct OnlineLse {
  acc_t m;  // max of the elements seen, the target included
  acc_t s;  // sum of exp(x - m) over the elements seen, the target excluded
};

template <typename acc_t>
CHARMLP_HOST_DEVICE OnlineLse<acc_t> lse_init() {
  return {std::numeric_limits<acc_t>::lowest(), acc_t(0)};
}

template <typename acc_t>
CHARMLP_HOST_DEVICE OnlineLse<acc_t> lse_add(OnlineLse<acc_t> a, acc_t x, bool is_target) {
  if (x > a.m) {  // rescale the sum to the new max; rare after the first few elements of a row
    a.s *= exp_(a.m - x);
    a.m = x;
  }
  if (!is_target) a.s += exp_(x - a.m);
  return a;
}

template <typename acc_t>
CHARMLP_HOST_DEVICE OnlineLse<acc_t> lse_combine(OnlineLse<acc_t> a, OnlineLse<acc_t> b) {
  const acc_t m = a.m > b.m ? a.m : b.m;
  return {m, a.s * exp_(a.m - m) + b.s * exp_(b.m - m)};
}

// The loss and the float64 lse of a counted row from its (m, s_excl) and target logit:
//   lse = m + log(s), s = s_excl + exp(x_t - m);  loss = lse - x_t = log(s) - (x_t - m).
// When the target is the max (x_t = m) the loss is log1p(s_excl): it can be as small as e^-20, where log(s) rounds
// to 0 (that is what keeping the target out of s_excl buys). Otherwise s_excl >= 1 (it holds the max) and the two
// terms add without cancellation. lse keeps m exact and log(s) <= log(V) small, so it stays accurate to ~1e-7 even
// at |logits| ~ 1e4, where a float32 lse (or x_t + loss) would be off by ~1e-3.
template <typename acc_t>
struct RowResult {
  acc_t loss;
  double lse;
};

// e_t = exp(x_t - m), when the caller has it already.
template <typename acc_t>
CHARMLP_HOST_DEVICE RowResult<acc_t> row_result(acc_t m, acc_t s_excl, acc_t x_t, acc_t e_t) {
  const acc_t d = x_t - m;  // <= 0 since m includes x_t
  const acc_t log_s = log_(s_excl + e_t);
  return {d == acc_t(0) ? log1p_(s_excl) : log_s - d, static_cast<double>(m) + static_cast<double>(log_s)};
}

template <typename acc_t>
CHARMLP_HOST_DEVICE RowResult<acc_t> row_result(acc_t m, acc_t s_excl, acc_t x_t) {
  return row_result(m, s_excl, x_t, exp_(x_t - m));
}

// A float64 lse as hi + lo in the accumulation type: x - hi is exact for the logits that matter (those within
// a factor 2 of lse, Sterbenz), so exp((x - hi) - lo) keeps full float accuracy even at |logits| ~ 1e4.
template <typename acc_t>
struct SplitLse {
  acc_t hi, lo;
};

template <typename acc_t>
CHARMLP_HOST_DEVICE SplitLse<acc_t> split_lse(double lse) {
  const acc_t hi = static_cast<acc_t>(lse);
  return {hi, static_cast<acc_t>(lse - static_cast<double>(hi))};
}

template <typename acc_t>
CHARMLP_HOST_DEVICE acc_t softmax_prob(acc_t x, SplitLse<acc_t> l) {
  return exp_((x - l.hi) - l.lo);
}

// The gradient d = g (softmax - onehot) of a counted row, element by element from its float64 lse: d_j = g p_j for
// j != t, and the target's d_t = g (p_t - 1) = -g sum_{j != t} p_j, once the row's sum of the other p_j is known.
// Written so rather than p_t - 1, which cancels to nothing useful when the target dominates (p_t -> 1).
// softmax_prob_excl is the p_j of that sum: 0 at the target.
template <typename acc_t>
CHARMLP_HOST_DEVICE acc_t softmax_prob_excl(acc_t x, bool is_target, SplitLse<acc_t> l) {
  return is_target ? acc_t(0) : softmax_prob(x, l);
}

template <typename acc_t>
CHARMLP_HOST_DEVICE acc_t target_grad(acc_t sum_excl, acc_t g) {
  return -sum_excl * g;
}

// The factor on (softmax - onehot) of a counted row: d(reduced loss)/d(row loss) times the incoming gradient g
// (grad_loss[i] for reduction="none", the scalar grad_loss otherwise).
template <typename acc_t>
CHARMLP_HOST_DEVICE acc_t row_grad_scale(int64_t reduction, acc_t g, int64_t n_valid) {
  return reduction == kMean ? g / static_cast<acc_t>(n_valid) : g;
}

}  // namespace charmlp
