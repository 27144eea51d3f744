// softmax_rows.h: the CPU kernels of softmax cross-entropy over ranges of rows of logits (forward, forward with the
// gradient in place, backward from a saved lse), vectorised, used by the cross_entropy and linear_cross_entropy
// CPU kernels and, row by row, by the CPU loop of sgd_train. The per-row scalar math is common/softmax_ce.h, the
// vector type and its exp cpu/vec.h, the per-ISA clones cpu/isa.h.
#pragma once

#include "common/softmax_ce.h"

#include <algorithm>
#include <cstdint>
#include <limits>

// Host code only: ops/cross_entropy.h, which the .cu files include too, includes this header.
#if !defined(__CUDACC__)
#include "cpu/isa.h"
#include "cpu/vec.h"

namespace charmlp {
namespace cpu_simd {

// ---- the row functions, for one vector width ----
// A row of n >= N elements is covered by whole vectors at 0, N, 2N, ... and, if N does not divide n, one last
// vector at n - N that overlaps the previous one: its overlapping lanes are masked out of sums, and it is computed
// before the loop so that the loop's stores (y may alias x) cannot feed it. Rows shorter than a vector go scalar.

// Vectors per partial sum: a long row's sum of exps is accumulated block by block, so that its rounding error
// grows like sqrt(kSumBlock) + sqrt(V / (N kSumBlock)) rather than sqrt(V / N) (a 5e-6 relative error in the
// sum at V = 50,000 otherwise, which shifts every probability of the row by as much).
constexpr int64_t kSumBlock = 64;

template <typename T, int W>
CHARMLP_CPU_INLINE T row_max(const T* x, int64_t n) {
  using S = cpu::Vec<T, W>;
  using V = typename S::V;
  constexpr int N = S::N;
  if (n < N) {
    T m = std::numeric_limits<T>::lowest();
    for (int64_t j = 0; j < n; ++j) m = x[j] > m ? x[j] : m;
    return m;
  }
  // four independent maxima: a single one would make every vector wait for the previous compare-and-blend
  V m0, m1, m2, m3, v0, v1, v2, v3;
  m0 = S::load(x + n - N);  // the last vector; overlapping elements do not change a max
  m1 = m2 = m3 = m0;
  int64_t j = 0;
  for (; j + 4 * N <= n; j += 4 * N) {
    v0 = S::load(x + j);
    v1 = S::load(x + j + N);
    v2 = S::load(x + j + 2 * N);
    v3 = S::load(x + j + 3 * N);
    m0 = S::max(m0, v0);
    m1 = S::max(m1, v1);
    m2 = S::max(m2, v2);
    m3 = S::max(m3, v3);
  }
  for (; j + N <= n; j += N) {
    v0 = S::load(x + j);
    m0 = S::max(m0, v0);
  }
  m0 = S::max(m0, m1);
  m2 = S::max(m2, m3);
  m0 = S::max(m0, m2);
  return S::hmax(m0);
}

// The streaming pass shared by the forward and the backward: for every j, e_j = exp((x_j - a) - b), optionally
// stored as y_j = c * e_j (y may alias x); returns sum_{j != t} e_j, and e_t in *e_t.
template <typename T, int W, bool kStore>
CHARMLP_CPU_INLINE T exp_pass(const T* x, T* y, int64_t n, T a, T b, T c, int64_t t, T* e_t) {
  using S = cpu::Vec<T, W>;
  using V = typename S::V;
  using I = typename S::I;
  using Int = typename S::Int;
  constexpr int N = S::N;
  T s = 0;
  if (n < N) {
    for (int64_t j = 0; j < n; ++j) {
      const T e = exp_((x[j] - a) - b);
      if constexpr (kStore) y[j] = c * e;
      if (j == t) {
        *e_t = e;
      } else {
        s += e;
      }
    }
    return s;
  }
  const I lane = S::iota();
  const int64_t n_whole = n / N * N;  // the loop covers [0, n_whole); the last vector [n - N, n) covers the rest
  V last;
  if (n_whole < n) {
    last = S::load(x + n - N);
    last = (last - a) - b;
    last = S::exp(last);
  }
  V sum{}, e;
  int64_t j = 0;
  while (j < n_whole) {
    V block{};
    for (const int64_t stop = std::min(j + kSumBlock * N, n_whole); j < stop; j += N) {
      e = S::load(x + j);
      e = (e - a) - b;
      e = S::exp(e);
      if constexpr (kStore) S::store(y + j, c * e);
      if (t - j >= 0 && t - j < N) {
        *e_t = e[t - j];
        e = S::select(lane == static_cast<Int>(t - j), V{}, e);
      }
      block += e;
    }
    sum += block;
  }
  if (n_whole < n) {
    if constexpr (kStore) S::store(y + n - N, c * last);
    if (t >= n_whole) *e_t = last[t - (n - N)];
    last = S::select(lane < static_cast<Int>(n_whole - (n - N)), V{}, last);  // counted by the loop already
    if (t >= n - N) last = S::select(lane == static_cast<Int>(t - (n - N)), V{}, last);
    sum += last;
  }
  return S::hsum(sum);
}

// Forward of one counted row: {loss, lse}.
template <typename T, int W>
CHARMLP_CPU_INLINE RowResult<T> row_forward(const T* x, int64_t V, int64_t t) {
  const T m = row_max<T, W>(x, V);
  T e_t = 0;
  const T s_excl = exp_pass<T, W, false>(x, nullptr, V, m, T(0), T(1), t, &e_t);
  return row_result(m, s_excl, x[t], e_t);
}

// Forward of one counted row that also overwrites the row with its gradient g * (softmax - onehot), with one exp
// per element: the exps are stored on the way and rescaled by g / sum.
template <typename T, int W>
CHARMLP_CPU_INLINE RowResult<T> row_forward_grad(T* x, int64_t V, int64_t t, T g) {
  const T m = row_max<T, W>(x, V);
  const T x_t = x[t];
  T e_t = 0;
  const T s_excl = exp_pass<T, W, true>(x, x, V, m, T(0), T(1), t, &e_t);
  const T s = s_excl + e_t;
  const T c = g / s;
  for (int64_t j = 0; j < V; ++j) x[j] *= c;
  x[t] = -g * (s_excl / s);  // softmax_t - 1 = -s_excl / s, exact where 1 - softmax_t would cancel
  return row_result(m, s_excl, x_t, e_t);
}

// Backward of one counted row from its saved lse: y = g * (softmax - onehot) (y may alias x).
template <typename T, int W>
CHARMLP_CPU_INLINE void row_backward(const T* x, T* y, int64_t V, int64_t t, double lse, T g) {
  const SplitLse<T> l = split_lse<T>(lse);
  T p_t = 0;
  const T s_excl = exp_pass<T, W, true>(x, y, V, l.hi, l.lo, g, t, &p_t);  // y = g softmax
  y[t] = -g * s_excl;  // softmax_t - 1 = -sum_{j != t} softmax_j: no cancellation when the target dominates
}

// ---- ranges of rows [begin, end) of x (rows contiguous, V apart), for one vector width ----
// The loop over rows sits inside the ISA-specific function: a call per row cost ~20% at V = 27.

// Forward: loss[i], lse[i] for every row; 0, 0 for an ignored one.
template <typename T, int W, typename index_t>
CHARMLP_CPU_INLINE void forward_rows(const T* x, int64_t V, const index_t* t, int64_t ignore_index, int64_t begin,
                                     int64_t end, T* loss, double* lse) {
  for (int64_t i = begin; i < end; ++i) {
    const int64_t ti = t[i];
    if (ti == ignore_index) {
      loss[i] = 0;
      lse[i] = 0;
      continue;
    }
    const RowResult<T> r = row_forward<T, W>(x + i * V, V, ti);
    loss[i] = r.loss;
    lse[i] = r.lse;
  }
}

// The same, and every row overwritten with its gradient g * (softmax - onehot) (zeros for an ignored row).
template <typename T, int W, typename index_t>
CHARMLP_CPU_INLINE void forward_grad_rows(T* x, int64_t V, const index_t* t, int64_t ignore_index, int64_t begin,
                                          int64_t end, T g, T* loss, double* lse) {
  for (int64_t i = begin; i < end; ++i) {
    T* row = x + i * V;
    const int64_t ti = t[i];
    if (ti == ignore_index) {
      loss[i] = 0;
      lse[i] = 0;
      std::fill(row, row + V, T(0));
      continue;
    }
    const RowResult<T> r = row_forward_grad<T, W>(row, V, ti, g);
    loss[i] = r.loss;
    lse[i] = r.lse;
  }
}

// Backward: y rows = g_i * (softmax - onehot) from the saved lse, g_i = row_grad_scale(reduction,
// grad_loss[i * g_stride], n_valid); zeros for an ignored row. y may be x.
template <typename T, int W, typename index_t>
CHARMLP_CPU_INLINE void backward_rows(const T* x, T* y, int64_t V, const index_t* t, int64_t ignore_index,
                                      int64_t begin, int64_t end, const double* lse, const T* grad_loss,
                                      int64_t g_stride, int64_t reduction, int64_t n_valid) {
  for (int64_t i = begin; i < end; ++i) {
    T* y_row = y + i * V;
    const int64_t ti = t[i];
    if (ti == ignore_index) {
      std::fill(y_row, y_row + V, T(0));
      continue;
    }
    row_backward<T, W>(x + i * V, y_row, V, ti, lse[i], row_grad_scale(reduction, grad_loss[i * g_stride], n_valid));
  }
}

// Where AVX-512 does not pay (1.4-1.6x faster than AVX2 for V >= 200, no faster for short rows).
constexpr int64_t kAvx512MinV = 128;

inline cpu::Isa row_isa(int64_t V) {
  const cpu::Isa isa = cpu::cpu_isa();
  return isa == cpu::Isa::kAvx512 && V < kAvx512MinV ? cpu::Isa::kAvx2 : isa;
}

}  // namespace cpu_simd

constexpr int64_t kCpuGrainElems = 32768;  // logits per parallel task: below this, threading costs more than it saves

inline int64_t cpu_row_grain(int64_t V) { return std::max<int64_t>(1, kCpuGrainElems / V); }

// ---- the CPU row API: rows [begin, end) of x (B, V) contiguous, targets t (B,) ----

// loss[i], lse[i] per row (0, 0 for an ignored row).
template <typename scalar_t, typename index_t>
void cpu_forward_rows(const scalar_t* x, int64_t V, const index_t* t, int64_t ignore_index, int64_t begin,
                      int64_t end, scalar_t* loss, double* lse) {
  cpu::with_isa(cpu_simd::row_isa(V), [&](auto isa) CHARMLP_CPU_INLINE_LAMBDA {
    cpu_simd::forward_rows<scalar_t, decltype(isa)::kBytes>(x, V, t, ignore_index, begin, end, loss, lse);
  });
}

// The same, and every row overwritten with its gradient g * (softmax - onehot) (zeros for an ignored row).
template <typename scalar_t, typename index_t>
void cpu_forward_grad_rows(scalar_t* x, int64_t V, const index_t* t, int64_t ignore_index, int64_t begin,
                           int64_t end, scalar_t g, scalar_t* loss, double* lse) {
  cpu::with_isa(cpu_simd::row_isa(V), [&](auto isa) CHARMLP_CPU_INLINE_LAMBDA {
    cpu_simd::forward_grad_rows<scalar_t, decltype(isa)::kBytes>(x, V, t, ignore_index, begin, end, g, loss, lse);
  });
}

// y rows = g_i * (softmax - onehot) from the saved lse, g_i = row_grad_scale(reduction, grad_loss[i * g_stride],
// n_valid) (zeros for an ignored row); y may be x.
template <typename scalar_t, typename index_t>
void cpu_backward_rows(const scalar_t* x, scalar_t* y, int64_t V, const index_t* t, int64_t ignore_index,
                       int64_t begin, int64_t end, const double* lse, const scalar_t* grad_loss, int64_t g_stride,
                       int64_t reduction, int64_t n_valid) {
  cpu::with_isa(cpu_simd::row_isa(V), [&](auto isa) CHARMLP_CPU_INLINE_LAMBDA {
    cpu_simd::backward_rows<scalar_t, decltype(isa)::kBytes>(x, y, V, t, ignore_index, begin, end, lse, grad_loss,
                                                             g_stride, reduction, n_valid);
  });
}
}  // namespace charmlp
#endif  // !defined(__CUDACC__)
