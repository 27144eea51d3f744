// Shared by the cross_entropy and linear_cross_entropy op families, CPU and CUDA alike:
//   1. argument checks (one place, so that both backends reject bad input with the same message);
//   2. the scalar math of a numerically stable softmax cross-entropy row, marked CHARMLP_HOST_DEVICE;
//   3. the CPU row kernels (SIMD loops over rows of logits, used by both families' CPU kernels);
//   4. the CUDA row launchers that linear_cross_entropy_cuda.cu borrows from cross_entropy_cuda.cu.
//
// Notation: logits x (B, V), targets t (B,), row i counted unless t[i] == ignore_index.
//   m        = max_j x_j                       (the target included, so that no exp below can overflow)
//   s_excl   = sum_{j != t} exp(x_j - m)       (the target excluded: see row_result)
//   loss     = lse - x_t,  lse = m + log(s_excl + exp(x_t - m))
//   dloss/dx = softmax(x) - onehot(t)
#pragma once

#include "common.h"

#include <ATen/Parallel.h>

#include <math.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <tuple>
#include <type_traits>

namespace charmlp {

// ==== 1. argument checks =============================================================================

// logits (B, V) float, targets (B,) int64/int32 on the logits' device; returns {B, V}.
inline std::tuple<int64_t, int64_t> check_cross_entropy_args(const at::Tensor& logits, const at::Tensor& targets,
                                                             int64_t reduction, bool allow_half) {
  check_dim(logits, 2, "logits");
  check_floating(logits, "logits", allow_half);
  check_dim(targets, 1, "targets");
  check_index(targets, "targets");
  check_same_device(logits, "logits", targets, "targets");
  check_size(targets, 0, logits.size(0), "targets", "logits.size(0) (B)");
  TORCH_CHECK(logits.size(1) > 0, "logits.size(1) (V) must be positive, got shape ", logits.sizes());
  check_reduction(reduction);
  return {logits.size(0), logits.size(1)};
}

// check_size for sizes that may be symbolic (the autograd kernel also runs under torch.compile's tracing).
inline void check_sym_size(const at::Tensor& t, int64_t dim, const c10::SymInt& expected, const char* name,
                           const char* what) {
  TORCH_CHECK(t.sym_size(dim) == expected, name, ".size(", dim, ") must equal ", what, " = ", expected, ", got ",
              t.sym_size(dim), " (shape ", t.sym_sizes(), ")");
}

// h (B, H), W2 (H, V), b2 (V), targets (B,).
inline void check_linear_cross_entropy_args(const at::Tensor& h, const at::Tensor& W2, const at::Tensor& b2,
                                            const at::Tensor& targets, int64_t reduction, bool allow_half) {
  check_dim(h, 2, "h");
  check_floating(h, "h", allow_half);
  check_dim(W2, 2, "W2");
  check_same_dtype(h, "h", W2, "W2");
  check_dim(b2, 1, "b2");
  check_same_dtype(h, "h", b2, "b2");
  check_dim(targets, 1, "targets");
  check_index(targets, "targets");
  check_same_device(h, "h", W2, "W2");
  check_same_device(h, "h", b2, "b2");
  check_same_device(h, "h", targets, "targets");
  check_sym_size(W2, 0, h.sym_size(1), "W2", "h.size(1) (H)");
  TORCH_CHECK(W2.sym_size(1) > 0, "W2.size(1) (V) must be positive, got shape ", W2.sym_sizes());
  check_sym_size(b2, 0, W2.sym_size(1), "b2", "W2.size(1) (V)");
  check_sym_size(targets, 0, h.sym_size(0), "targets", "h.size(0) (B)");
  check_reduction(reduction);
}

// Rows [r0, r0 + n) of t; t itself when that is all of it (a narrow is a dispatcher call, a few hundred ns that
// count at the seed's size, where one chunk holds every row).
inline at::Tensor row_slice(const at::Tensor& t, int64_t r0, int64_t n) {
  return r0 == 0 && n == t.size(0) ? t : t.narrow(0, r0, n);
}

// The backward ops take what the forward saved: grad_loss shaped like the loss, lse (B,) float64.
inline void check_backward_args(const at::Tensor& grad_loss, const at::Tensor& lse, const at::Tensor& ref,
                                const char* ref_name, int64_t B, int64_t reduction) {
  check_same_dtype(ref, ref_name, grad_loss, "grad_loss");
  check_same_device(ref, ref_name, grad_loss, "grad_loss");
  if (reduction == kNone) {
    check_dim(grad_loss, 1, "grad_loss");
    check_size(grad_loss, 0, B, "grad_loss", "B (reduction='none')");
  } else {
    check_dim(grad_loss, 0, "grad_loss");
  }
  check_dim(lse, 1, "lse");
  TORCH_CHECK(lse.scalar_type() == at::kDouble, "lse must be float64 (as cross_entropy_forward returns it), got ",
              lse.scalar_type());
  check_same_device(ref, ref_name, lse, "lse");
  check_size(lse, 0, B, "lse", "B");
}

// CPU only (CUDA asserts in the kernel instead, to avoid a host sync): every counted target lies in [0, V).
// Returns the number of counted rows, the divisor of reduction="mean".
template <typename index_t>
int64_t check_targets_cpu(const index_t* t, int64_t B, int64_t V, int64_t ignore_index) {
  int64_t n_valid = 0;
  for (int64_t i = 0; i < B; ++i) {
    const int64_t ti = t[i];
    if (ti == ignore_index) continue;
    TORCH_CHECK(ti >= 0 && ti < V, "targets[", i, "] = ", ti, " is out of range: targets must lie in [0, V = ", V,
                ") or equal ignore_index = ", ignore_index);
    ++n_valid;
  }
  return n_valid;
}

// ==== 2. scalar math, shared by the CPU and CUDA kernels =============================================
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

// The factor on (softmax - onehot) of a counted row: d(reduced loss)/d(row loss) times the incoming gradient g
// (grad_loss[i] for reduction="none", the scalar grad_loss otherwise).
template <typename acc_t>
CHARMLP_HOST_DEVICE acc_t row_grad_scale(int64_t reduction, acc_t g, int64_t n_valid) {
  return reduction == kMean ? g / static_cast<acc_t>(n_valid) : g;
}

// ==== 3. CPU row kernels =============================================================================
// Ranges of rows of logits; the callers parallelise over rows.
//
// The loops use GCC/Clang vector extensions and a vectorisable exp, because the extension is built without
// -march flags: scalar libm expf calls and a loop-carried max cost ~4 ns per logit, more than all of eager
// PyTorch's (AVX-512) cross-entropy at the seed's size. Every row function is compiled for 16-byte vectors (SSE2,
// any x86-64; NEON on arm64) and, on x86-64, for AVX2 + FMA (32 bytes) and AVX-512 (64 bytes), picked at run
// time. The exps are Cephes' (range reduction to [-ln2/2, ln2/2], polynomial / Pade approximation, 2^n put into
// the exponent bits): ~1-2 ulp, flushed to 0 below the smallest normal number.
#if !defined(__CUDACC__)

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define CHARMLP_CPU_AVX2 1
#else
#define CHARMLP_CPU_AVX2 0
#endif

// Vectors are passed by reference only: GCC notes (-Wpsabi) that passing a 32-byte vector by value to a function
// compiled without AVX "changes the ABI", even for the force-inlined helpers below.
#define CHARMLP_CPU_INLINE __attribute__((always_inline)) inline

// a * b + c may become one FMA here (the AVX2 versions are compiled for AVX2 + FMA): ~30% fewer instructions per
// exp, and no less accurate. ISO C++ mode otherwise keeps every product and sum rounded separately.
#if defined(__clang__)
#pragma clang fp contract(fast)
#elif defined(__GNUC__)
#pragma GCC push_options
#pragma GCC optimize("fp-contract=fast")
#endif

namespace cpu_simd {

template <typename T>
struct IntOfSize;
template <>
struct IntOfSize<float> {
  using type = int32_t;
};
template <>
struct IntOfSize<double> {
  using type = int64_t;
};

// W-byte vectors of T and the matching integer vectors, with the few operations the row kernels need.
template <typename T, int W>
struct Simd {
  typedef T V __attribute__((vector_size(W)));
  typedef typename IntOfSize<T>::type I __attribute__((vector_size(W)));
  static constexpr int N = W / sizeof(T);

  static CHARMLP_CPU_INLINE void load(V& v, const T* p) { std::memcpy(&v, p, sizeof(v)); }
  static CHARMLP_CPU_INLINE void store(T* p, const V& v) { std::memcpy(p, &v, sizeof(v)); }
  static CHARMLP_CPU_INLINE void iota(I& v) {  // lane indices 0, 1, ..., N - 1
    for (int k = 0; k < N; ++k) v[k] = k;
  }
  // dst = mask ? src : dst, lane by lane (comparisons return all-ones / all-zeros lanes)
  static CHARMLP_CPU_INLINE void blend(V& dst, const I& mask, const V& src) {
    dst = reinterpret_cast<V>((mask & reinterpret_cast<I>(src)) | (~mask & reinterpret_cast<I>(dst)));
  }
  static CHARMLP_CPU_INLINE void max_into(V& m, const V& x) { blend(m, x > m, x); }
  static CHARMLP_CPU_INLINE T hmax(const V& v) {
    T m = v[0];
    for (int k = 1; k < N; ++k) m = v[k] > m ? v[k] : m;
    return m;
  }
  static CHARMLP_CPU_INLINE T hsum(const V& v) {
    T s = v[0];
    for (int k = 1; k < N; ++k) s += v[k];
    return s;
  }
  // x = exp(x), for x <= 88 (float) / 709 (double): every argument here is x - max <= 0 (or x - lse, which
  // exceeds 0 by rounding at most), so there is no overflow clamp.
  static CHARMLP_CPU_INLINE void exp(V& x) {
    if constexpr (std::is_same_v<T, float>) {
      const I underflow = x < -87.3365447505531f;  // exp(x) < FLT_MIN: 0
      blend(x, underflow, V{});
      const float kMagic = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer, in the low mantissa bits
      const V t = x * 1.44269504088896341f + kMagic;
      const I n = reinterpret_cast<I>(t) - 0x4B400000;  // round(x / ln2)
      const V nf = t - kMagic;
      V r = x - nf * 0.693359375f;  // x - n ln2 in two steps (Cody-Waite), the first one exact
      r = r + nf * 2.12194440e-4f;
      V p = V{} + 1.9875691500E-4f;
      p = p * r + 1.3981999507E-3f;
      p = p * r + 8.3334519073E-3f;
      p = p * r + 4.1665795894E-2f;
      p = p * r + 1.6666665459E-1f;
      p = p * r + 5.0000001201E-1f;
      p = p * r * r + r + 1.0f;
      x = p * reinterpret_cast<V>((n + 127) << 23);  // times 2^n
      blend(x, underflow, V{});
    } else {
      const I underflow = x < -708.3964185322641;  // exp(x) < DBL_MIN: 0
      blend(x, underflow, V{});
      const double kMagic = 6755399441055744.0;  // 1.5 * 2^52
      const V t = x * 1.4426950408889634073599 + kMagic;
      const I n = reinterpret_cast<I>(t) - int64_t(0x4338000000000000);
      const V nf = t - kMagic;
      V r = x - nf * 6.93145751953125E-1;
      r = r - nf * 1.42860682030941723212E-6;
      const V rr = r * r;
      const V px =
          r * ((1.26177193074810590878E-4 * rr + 3.02994407707441961300E-2) * rr + 9.99999999999999999910E-1);
      const V qx =
          ((3.00198505138664455042E-6 * rr + 2.52448340349684104192E-3) * rr + 2.27265548208155028766E-1) * rr +
          2.00000000000000000009E0;
      x = (1.0 + 2.0 * px / (qx - px)) * reinterpret_cast<V>((n + 1023) << 52);  // Pade form of exp(r), times 2^n
      blend(x, underflow, V{});
    }
  }
};

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
  using S = Simd<T, W>;
  using V = typename S::V;
  constexpr int N = S::N;
  if (n < N) {
    T m = std::numeric_limits<T>::lowest();
    for (int64_t j = 0; j < n; ++j) m = x[j] > m ? x[j] : m;
    return m;
  }
  // four independent maxima: a single one would make every vector wait for the previous compare-and-blend
  V m0, m1, m2, m3, v0, v1, v2, v3;
  S::load(m0, x + n - N);  // the last vector; overlapping elements do not change a max
  m1 = m2 = m3 = m0;
  int64_t j = 0;
  for (; j + 4 * N <= n; j += 4 * N) {
    S::load(v0, x + j);
    S::load(v1, x + j + N);
    S::load(v2, x + j + 2 * N);
    S::load(v3, x + j + 3 * N);
    S::max_into(m0, v0);
    S::max_into(m1, v1);
    S::max_into(m2, v2);
    S::max_into(m3, v3);
  }
  for (; j + N <= n; j += N) {
    S::load(v0, x + j);
    S::max_into(m0, v0);
  }
  S::max_into(m0, m1);
  S::max_into(m2, m3);
  S::max_into(m0, m2);
  return S::hmax(m0);
}

// The streaming pass shared by the forward and the backward: for every j, e_j = exp((x_j - a) - b), optionally
// stored as y_j = c * e_j (y may alias x); returns sum_{j != t} e_j, and e_t in *e_t.
template <typename T, int W, bool kStore>
CHARMLP_CPU_INLINE T exp_pass(const T* x, T* y, int64_t n, T a, T b, T c, int64_t t, T* e_t) {
  using S = Simd<T, W>;
  using V = typename S::V;
  using I = typename S::I;
  using Int = typename IntOfSize<T>::type;
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
  I lane;
  S::iota(lane);
  const int64_t n_whole = n / N * N;  // the loop covers [0, n_whole); the last vector [n - N, n) covers the rest
  V last;
  if (n_whole < n) {
    S::load(last, x + n - N);
    last = (last - a) - b;
    S::exp(last);
  }
  V sum{}, e;
  int64_t j = 0;
  while (j < n_whole) {
    V block{};
    for (const int64_t stop = std::min(j + kSumBlock * N, n_whole); j < stop; j += N) {
      S::load(e, x + j);
      e = (e - a) - b;
      S::exp(e);
      if constexpr (kStore) S::store(y + j, c * e);
      if (t - j >= 0 && t - j < N) {
        *e_t = e[t - j];
        S::blend(e, lane == static_cast<Int>(t - j), V{});
      }
      block += e;
    }
    sum += block;
  }
  if (n_whole < n) {
    if constexpr (kStore) S::store(y + n - N, c * last);
    if (t >= n_whole) *e_t = last[t - (n - N)];
    S::blend(last, lane < static_cast<Int>(n_whole - (n - N)), V{});  // counted by the loop already
    if (t >= n - N) S::blend(last, lane == static_cast<Int>(t - (n - N)), V{});
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

// The compiled ISA variants: 16-byte vectors (any x86-64 / arm64), AVX2 + FMA, and AVX-512 (1.4-1.6x faster than
// AVX2 for V >= 200, no faster for short rows), picked at run time.
enum class Isa { kBase, kAvx2, kAvx512 };
constexpr int64_t kAvx512MinV = 128;

#if CHARMLP_CPU_AVX2
// What the CPU supports, capped like PyTorch's own kernels by ATEN_CPU_CAPABILITY=default|avx2 (the tests use it
// to run every variant on one machine).
inline Isa cpu_isa() {
  static const Isa isa = [] {
    __builtin_cpu_init();
    Isa best = Isa::kBase;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) best = Isa::kAvx2;
    if (best == Isa::kAvx2 && __builtin_cpu_supports("avx512f")) best = Isa::kAvx512;
    const char* cap = std::getenv("ATEN_CPU_CAPABILITY");
    const Isa limit = cap == nullptr                      ? Isa::kAvx512
                      : std::strcmp(cap, "default") == 0 ? Isa::kBase
                      : std::strcmp(cap, "avx2") == 0    ? Isa::kAvx2
                                                         : Isa::kAvx512;
    return std::min(best, limit);
  }();
  return isa;
}

template <typename T, typename index_t>
__attribute__((target("avx2,fma"))) void forward_rows_avx2(const T* x, int64_t V, const index_t* t, int64_t ignore,
                                                           int64_t begin, int64_t end, T* loss, double* lse) {
  forward_rows<T, 32>(x, V, t, ignore, begin, end, loss, lse);
}
template <typename T, typename index_t>
__attribute__((target("avx512f,fma"))) void forward_rows_avx512(const T* x, int64_t V, const index_t* t,
                                                                int64_t ignore, int64_t begin, int64_t end, T* loss,
                                                                double* lse) {
  forward_rows<T, 64>(x, V, t, ignore, begin, end, loss, lse);
}
template <typename T, typename index_t>
__attribute__((target("avx2,fma"))) void forward_grad_rows_avx2(T* x, int64_t V, const index_t* t, int64_t ignore,
                                                                int64_t begin, int64_t end, T g, T* loss,
                                                                double* lse) {
  forward_grad_rows<T, 32>(x, V, t, ignore, begin, end, g, loss, lse);
}
template <typename T, typename index_t>
__attribute__((target("avx512f,fma"))) void forward_grad_rows_avx512(T* x, int64_t V, const index_t* t,
                                                                     int64_t ignore, int64_t begin, int64_t end, T g,
                                                                     T* loss, double* lse) {
  forward_grad_rows<T, 64>(x, V, t, ignore, begin, end, g, loss, lse);
}
template <typename T, typename index_t>
__attribute__((target("avx2,fma"))) void backward_rows_avx2(const T* x, T* y, int64_t V, const index_t* t,
                                                            int64_t ignore, int64_t begin, int64_t end,
                                                            const double* lse, const T* grad_loss, int64_t g_stride,
                                                            int64_t reduction, int64_t n_valid) {
  backward_rows<T, 32>(x, y, V, t, ignore, begin, end, lse, grad_loss, g_stride, reduction, n_valid);
}
template <typename T, typename index_t>
__attribute__((target("avx512f,fma"))) void backward_rows_avx512(const T* x, T* y, int64_t V, const index_t* t,
                                                                 int64_t ignore, int64_t begin, int64_t end,
                                                                 const double* lse, const T* grad_loss,
                                                                 int64_t g_stride, int64_t reduction,
                                                                 int64_t n_valid) {
  backward_rows<T, 64>(x, y, V, t, ignore, begin, end, lse, grad_loss, g_stride, reduction, n_valid);
}
#endif

}  // namespace cpu_simd

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC pop_options
#endif

constexpr int64_t kCpuGrainElems = 32768;  // logits per parallel task: below this, threading costs more than it saves

inline int64_t cpu_row_grain(int64_t V) { return std::max<int64_t>(1, kCpuGrainElems / V); }

// ---- the CPU row API: rows [begin, end) of x (B, V) contiguous, targets t (B,) ----

// loss[i], lse[i] per row (0, 0 for an ignored row).
template <typename scalar_t, typename index_t>
void cpu_forward_rows(const scalar_t* x, int64_t V, const index_t* t, int64_t ignore_index, int64_t begin,
                      int64_t end, scalar_t* loss, double* lse) {
  using namespace cpu_simd;
#if CHARMLP_CPU_AVX2
  const Isa isa = cpu_isa();
  if (isa == Isa::kAvx512 && V >= kAvx512MinV) {
    return forward_rows_avx512(x, V, t, ignore_index, begin, end, loss, lse);
  }
  if (isa != Isa::kBase) return forward_rows_avx2(x, V, t, ignore_index, begin, end, loss, lse);
#endif
  forward_rows<scalar_t, 16>(x, V, t, ignore_index, begin, end, loss, lse);
}

// The same, and every row overwritten with its gradient g * (softmax - onehot) (zeros for an ignored row).
template <typename scalar_t, typename index_t>
void cpu_forward_grad_rows(scalar_t* x, int64_t V, const index_t* t, int64_t ignore_index, int64_t begin,
                           int64_t end, scalar_t g, scalar_t* loss, double* lse) {
  using namespace cpu_simd;
#if CHARMLP_CPU_AVX2
  const Isa isa = cpu_isa();
  if (isa == Isa::kAvx512 && V >= kAvx512MinV) {
    return forward_grad_rows_avx512(x, V, t, ignore_index, begin, end, g, loss, lse);
  }
  if (isa != Isa::kBase) return forward_grad_rows_avx2(x, V, t, ignore_index, begin, end, g, loss, lse);
#endif
  forward_grad_rows<scalar_t, 16>(x, V, t, ignore_index, begin, end, g, loss, lse);
}

// y rows = g_i * (softmax - onehot) from the saved lse, g_i = row_grad_scale(reduction, grad_loss[i * g_stride],
// n_valid) (zeros for an ignored row); y may be x.
template <typename scalar_t, typename index_t>
void cpu_backward_rows(const scalar_t* x, scalar_t* y, int64_t V, const index_t* t, int64_t ignore_index,
                       int64_t begin, int64_t end, const double* lse, const scalar_t* grad_loss, int64_t g_stride,
                       int64_t reduction, int64_t n_valid) {
  using namespace cpu_simd;
#if CHARMLP_CPU_AVX2
  const Isa isa = cpu_isa();
  if (isa == Isa::kAvx512 && V >= kAvx512MinV) {
    return backward_rows_avx512(x, y, V, t, ignore_index, begin, end, lse, grad_loss, g_stride, reduction, n_valid);
  }
  if (isa != Isa::kBase) {
    return backward_rows_avx2(x, y, V, t, ignore_index, begin, end, lse, grad_loss, g_stride, reduction, n_valid);
  }
#endif
  backward_rows<scalar_t, 16>(x, y, V, t, ignore_index, begin, end, lse, grad_loss, g_stride, reduction, n_valid);
}
#endif  // !defined(__CUDACC__)

// ==== 4. CUDA row launchers (defined in cross_entropy_cuda.cu) =======================================
// cross_entropy's CUDA kernels on contiguous (n, V) logits; linear_cross_entropy_cuda.cu runs them on its chunks.
#ifdef WITH_CUDA
// Per row: row_losses[i] (accumulation dtype, 0 for an ignored row) and lse[i] (float64). With write_grad the
// logits are overwritten with their gradient for grad_loss = 1: (softmax - onehot), divided by n_valid[0] (a
// device scalar) for reduction="mean".
void cross_entropy_rows_forward_cuda(const at::Tensor& logits, const at::Tensor& targets, int64_t ignore_index,
                                     const at::Tensor& row_losses, const at::Tensor& lse, bool write_grad,
                                     const at::Tensor& n_valid, int64_t reduction);
// grad = g_i * (softmax - onehot) from the saved lse, g_i from grad_loss (and n_valid[0] for "mean");
// grad may be logits itself (in place).
void cross_entropy_rows_backward_cuda(const at::Tensor& logits, const at::Tensor& targets, const at::Tensor& lse,
                                      const at::Tensor& grad_loss, const at::Tensor& n_valid, int64_t reduction,
                                      int64_t ignore_index, const at::Tensor& grad);
// One block over B: n_valid[0] = the number of counted targets, and/or loss = the mean/sum of row_losses
// (an undefined tensor skips that output).
void cross_entropy_reduce_cuda(const at::Tensor& targets, int64_t ignore_index, int64_t reduction,
                               const at::Tensor& row_losses, const at::Tensor& loss, const at::Tensor& n_valid);
#endif

#if defined(__CUDACC__) || defined(CHARMLP_EMULATE_CUDA)
// The target of row i of the kernels above, ignore_index for a row past the end (!active). A counted target is
// checked on the device, as torch's own embedding does: the CPU kernels check on the host, which here would cost
// a sync.
template <typename index_t>
__device__ __forceinline__ int64_t row_target(const index_t* targets, int64_t i, bool active, int64_t V,
                                              int64_t ignore_index) {
  const int64_t t = active ? static_cast<int64_t>(targets[i]) : ignore_index;
  if (t != ignore_index) CUDA_KERNEL_ASSERT(t >= 0 && t < V);
  return t;
}
#endif

}  // namespace charmlp
