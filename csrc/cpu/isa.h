// isa.h: the instruction sets the CPU kernels are compiled for, which one this CPU runs, and how a kernel is
// compiled once per instruction set.
//
// The extension is built without -march flags (one binary for every x86-64 CPU), so each vectorised kernel is
// compiled three times and the widest variant the CPU supports is picked at run time:
//   baseline  16-byte vectors: SSE2 (any x86-64), NEON on arm64, or whatever the compiler lowers them to
//   avx2      AVX2 + FMA (32-byte vectors)
//   avx512    AVX-512 F + VL + BW + DQ (64-byte vectors), as on every AVX-512 server CPU since Skylake-SP
// CHARMLP_CPU_ISA=avx512|avx2|baseline caps the choice (never above what the CPU has): to run the other variants
// on one machine (the tests do), or to reproduce the rounding of another machine. Results of one variant do not
// depend on the CPU vendor: the kernels use no instruction whose result is implementation-defined (no rcp/rsqrt
// approximations).
//
// How a clone is compiled: with_isa(isa, f) calls f(IsaTag<isa>{}) from a function carrying
// __attribute__((target(...))) for that instruction set. f, and everything it calls that works on vectors, is
// force-inlined (CHARMLP_CPU_INLINE; lambdas CHARMLP_CPU_INLINE_LAMBDA, since a lambda is a function of its own),
// so it is compiled inside the clone with that instruction set. Why this way rather than `#pragma GCC target`
// around a header included once per instruction set: it is one ordinary header, one definition of each kernel,
// and it compiles the same with GCC and Clang (the pragma is GCC's; Clang's `#pragma clang attribute` differs);
// the price is that a kernel's helpers must be inlinable, which they are anyway for speed. A kernel that forks
// (at::parallel_for calls its body through a std::function, which cannot be inlined) re-enters the clone in each
// task with run_in<isa>.
#pragma once

#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <string>

// Vectors are passed by value only between force-inlined functions: GCC's note (-Wpsabi) that passing a 32-byte
// vector to a function compiled without AVX "changes the ABI" never applies.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wpsabi"
#endif

#define CHARMLP_CPU_INLINE __attribute__((always_inline)) inline
#define CHARMLP_CPU_INLINE_LAMBDA __attribute__((always_inline))

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define CHARMLP_CPU_X86_CLONES 1
#define CHARMLP_CPU_TARGET_AVX2 __attribute__((target("avx2,fma")))
#define CHARMLP_CPU_TARGET_AVX512 __attribute__((target("avx512f,avx512vl,avx512bw,avx512dq,avx2,fma")))
#else
#define CHARMLP_CPU_X86_CLONES 0
#endif

namespace charmlp {
namespace cpu {

enum class Isa { kBaseline, kAvx2, kAvx512 };

inline const char* isa_name(Isa isa) {
  return isa == Isa::kAvx512 ? "avx512" : isa == Isa::kAvx2 ? "avx2" : "baseline";
}

// The widest instruction set of this CPU, capped by CHARMLP_CPU_ISA; decided once per process.
inline Isa cpu_isa() {
  static const Isa isa = [] {
    Isa best = Isa::kBaseline;
#if CHARMLP_CPU_X86_CLONES
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) best = Isa::kAvx2;
    if (best == Isa::kAvx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
        __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq")) {
      best = Isa::kAvx512;
    }
#endif
    const char* env = std::getenv("CHARMLP_CPU_ISA");
    const std::string want = env ? env : "";
    TORCH_CHECK(want.empty() || want == "avx512" || want == "avx2" || want == "baseline",
                "CHARMLP_CPU_ISA must be avx512, avx2 or baseline, got ", want);
    const Isa cap = want == "baseline" ? Isa::kBaseline : want == "avx2" ? Isa::kAvx2 : Isa::kAvx512;
    return std::min(best, cap);
  }();
  return isa;
}

// The instruction set of a clone, as a type: a kernel's templates take it to pick their vector width.
template <Isa I>
struct IsaTag {
  static constexpr Isa isa = I;
  static constexpr int kBytes = I == Isa::kAvx512 ? 64 : I == Isa::kAvx2 ? 32 : 16;  // native vector size
};

// f(IsaTag<I>{}, args...) compiled for I (see the top of this file).
template <class F, class... Args>
void run_baseline(F& f, Args... args) {
  f(IsaTag<Isa::kBaseline>{}, args...);
}
#if CHARMLP_CPU_X86_CLONES
template <class F, class... Args>
CHARMLP_CPU_TARGET_AVX2 void run_avx2(F& f, Args... args) {
  f(IsaTag<Isa::kAvx2>{}, args...);
}
template <class F, class... Args>
CHARMLP_CPU_TARGET_AVX512 void run_avx512(F& f, Args... args) {
  f(IsaTag<Isa::kAvx512>{}, args...);
}
#endif

template <Isa I, class F, class... Args>
void run_in(F& f, Args... args) {
#if CHARMLP_CPU_X86_CLONES
  if constexpr (I == Isa::kAvx512) return run_avx512(f, args...);
  if constexpr (I == Isa::kAvx2) return run_avx2(f, args...);
#endif
  if constexpr (I == Isa::kBaseline) return run_baseline(f, args...);
}

template <class F>
void with_isa(Isa isa, F&& f) {
#if CHARMLP_CPU_X86_CLONES
  if (isa == Isa::kAvx512) return run_avx512(f);
  if (isa == Isa::kAvx2) return run_avx2(f);
#endif
  run_baseline(f);
}

}  // namespace cpu
}  // namespace charmlp
