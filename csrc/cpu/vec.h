// vec.h: the one vector type of the CPU kernels, with the few operations they need, and the vectorised exp and
// tanh. GCC/Clang vector extensions, W bytes wide (16, 32 or 64: see cpu/isa.h for how a kernel is compiled once
// per width); every function is force-inlined into the ISA clone that uses it.
//
// Why a vectorised exp and tanh: the extension is built without -march flags, so libm's expf/tanhf are scalar
// calls; at the seed's size 6,400 tanhf per SGD step would cost more than all the step's products together, and a
// scalar exp per logit more than all of eager PyTorch's (vectorised) cross-entropy. Both are Cephes' (range
// reduction, polynomial or Pade approximation, 2^n put into the exponent bits): ~1-2 ulp.
#pragma once

#include "cpu/isa.h"

#include <math.h>

#include <cmath>

#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <utility>

// a * b + c becomes one FMA where the clone's instruction set has FMA (AVX2, AVX-512): ~30% fewer instructions
// per exp and no less accurate. fma() below is written so, and the exp and tanh rely on it.
#if defined(__clang__)
#pragma clang fp contract(fast)
#elif defined(__GNUC__)
#pragma GCC push_options
#pragma GCC optimize("fp-contract=fast")
#endif

namespace charmlp {
namespace cpu {

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

// W-byte vectors of T (V) and the matching integer vectors (I: comparisons return all-ones / all-zeros lanes).
// Arguments are taken by reference: GCC notes that passing a 64-byte vector by value "changes the ABI" even for a
// function that is always inlined.
template <typename T, int W>
struct Vec {
  typedef T V __attribute__((vector_size(W)));
  typedef typename IntOfSize<T>::type I __attribute__((vector_size(W)));
  using Int = typename IntOfSize<T>::type;
  static constexpr int N = W / sizeof(T);  // lanes

  static CHARMLP_CPU_INLINE V load(const T* p) {
    V v;
    std::memcpy(&v, p, sizeof(v));
    return v;
  }
  static CHARMLP_CPU_INLINE void store(T* p, const V& v) { std::memcpy(p, &v, sizeof(v)); }
  // s in every lane: one broadcast instruction, through a shuffle. `s - V{}` or a loop over the lanes, inlined
  // into an ISA clone, GCC builds lane by lane (N inserts where one broadcast does), which made the broadcast
  // products of the sgd_train loop ~1.6x slower.
  static CHARMLP_CPU_INLINE V set1(T s) {
    V v{};
    v[0] = s;
    return splat(v, std::make_index_sequence<N>{});
  }
  template <size_t... k>
  static CHARMLP_CPU_INLINE V splat(const V& v, std::index_sequence<k...>) {  // lane 0 in every lane
    return __builtin_shufflevector(v, v, (k * 0)...);
  }
  static CHARMLP_CPU_INLINE I iota() {  // lane indices 0, 1, ..., N - 1
    I v;
    for (int k = 0; k < N; ++k) v[k] = k;
    return v;
  }
  // a * b + c, fused where the ISA has FMA (see top)
  static CHARMLP_CPU_INLINE V fma(const V& a, const V& b, const V& c) { return a * b + c; }
  // b * s + c, s in every lane: the broadcast products' inner step. Written with the scalar, not set1(s): GCC then
  // loads s with one broadcast straight from memory into the FMA, where a vector built first costs 2-3 more
  // instructions in the loop that dominates the sgd_train step.
  static CHARMLP_CPU_INLINE V fma(const V& b, T s, const V& c) { return b * s + c; }
  // mask ? a : b, lane by lane
  static CHARMLP_CPU_INLINE V select(const I& mask, const V& a, const V& b) {
    return reinterpret_cast<V>((mask & reinterpret_cast<I>(a)) | (~mask & reinterpret_cast<I>(b)));
  }
  // b where it is below (above) a, else a: a NaN in a stays, a NaN in b is ignored
  static CHARMLP_CPU_INLINE V min(const V& a, const V& b) { return select(b < a, b, a); }
  static CHARMLP_CPU_INLINE V max(const V& a, const V& b) { return select(b > a, b, a); }
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

  // exp(x), for x <= 88 (float) / 709 (double); 0 below the smallest normal number. There is no overflow clamp:
  // the callers' arguments are x - max <= 0, x - lse (above 0 by rounding at most), or tanh's 2|x| <= 20.
  static CHARMLP_CPU_INLINE V exp(const V& arg) {
    V x = arg;
    if constexpr (std::is_same_v<T, float>) {
      const I underflow = x < -87.3365447505531f;  // exp(x) < FLT_MIN: 0
      x = select(underflow, V{}, x);
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
      return select(underflow, V{}, x);
    } else {
      const I underflow = x < -708.3964185322641;  // exp(x) < DBL_MIN: 0
      x = select(underflow, V{}, x);
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
      return select(underflow, V{}, x);
    }
  }

  // tanh(x). float: Cephes' tanhf, an odd polynomial below |x| = 0.625 (relative error ~1.3e-7 on [-2, 2]),
  // 1 - 2 / (exp(2|x|) + 1) above, with |x| clamped to 10 (tanh rounds to exactly 1 in float from |x| = 9.01 on);
  // NaN stays NaN. double: accuracy first (float64 exists for gradcheck and references), libm per lane.
  static CHARMLP_CPU_INLINE V tanh(const V& x) {
    if constexpr (std::is_same_v<T, float>) {
      const V ax = select(x < 0.0f, -x, x);
      const V z = x * x;
      V p = set1(-5.70498872745e-3f);
      p = fma(p, z, set1(2.06390887954e-2f));
      p = fma(p, z, set1(-5.37397155531e-2f));
      p = fma(p, z, set1(1.33314422036e-1f));
      p = fma(p, z, set1(-3.33332819422e-1f));
      const V small = fma(x * z, p, x);
      const V c = min(ax, set1(10.0f));
      const V big_abs = 1.0f - 2.0f / (exp(c + c) + 1.0f);
      const V big = select(x < 0.0f, -big_abs, big_abs);
      return select(x != x, x, select(ax < 0.625f, small, big));
    } else {
      V y;
      for (int k = 0; k < N; ++k) y[k] = std::tanh(x[k]);
      return y;
    }
  }
};

}  // namespace cpu
}  // namespace charmlp

#if defined(__clang__)
#pragma clang fp contract(on)
#elif defined(__GNUC__)
#pragma GCC pop_options
#endif
