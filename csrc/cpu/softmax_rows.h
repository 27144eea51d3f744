// softmax_rows.h: the CPU kernels of softmax cross-entropy over ranges of rows of logits (forward, forward with the
// gradient in place, backward from a saved lse), vectorised, used by the cross_entropy and linear_cross_entropy
// CPU kernels. The per-row scalar math is common/softmax_ce.h.
#pragma once

#include "common/softmax_ce.h"

#include <math.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <type_traits>

namespace charmlp {

// ==== CPU row kernels =============================================================================
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

}  // namespace charmlp
