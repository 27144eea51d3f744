// Shared by every op family, CPU and CUDA alike: argument checks that name the offending argument,
// the reduction enum, and a HOST_DEVICE marker so that scalar math is written once for both backends.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <string>

#if defined(__CUDACC__)
#define CHARMLP_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define CHARMLP_HOST_DEVICE inline
#endif

namespace charmlp {

// Same numbering as at::Reduction so the Python API can pass F.cross_entropy's reduction straight through.
enum Reduction : int64_t { kNone = 0, kMean = 1, kSum = 2 };

inline void check_reduction(int64_t reduction) {
  TORCH_CHECK(reduction == kNone || reduction == kMean || reduction == kSum,
              "reduction must be 0 (none), 1 (mean) or 2 (sum), got ", reduction);
}

inline void check_dim(const at::Tensor& t, int64_t dim, const char* name) {
  TORCH_CHECK(t.dim() == dim, name, " must be a ", dim, "-D tensor, got shape ", t.sizes());
}

// Float parameters/activations: float32 and float64 everywhere, bf16/fp16 too where allow_half (CUDA).
inline void check_floating(const at::Tensor& t, const char* name, bool allow_half) {
  const auto s = t.scalar_type();
  const bool ok = s == at::kFloat || s == at::kDouble ||
                  (allow_half && (s == at::kBFloat16 || s == at::kHalf));
  TORCH_CHECK(ok, name, " must be float32 or float64", allow_half ? " (or bfloat16/float16 on CUDA)" : "",
              ", got ", s);
}

inline void check_same_dtype(const at::Tensor& a, const char* a_name, const at::Tensor& b, const char* b_name) {
  TORCH_CHECK(a.scalar_type() == b.scalar_type(), b_name, " must have the dtype of ", a_name, " (",
              a.scalar_type(), "), got ", b.scalar_type());
}

// Indices and targets: int64 or int32, like torch's own embedding and cross-entropy accept.
inline void check_index(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kLong || t.scalar_type() == at::kInt, name,
              " must be int64 or int32, got ", t.scalar_type());
}

inline void check_same_device(const at::Tensor& a, const char* a_name, const at::Tensor& b, const char* b_name) {
  TORCH_CHECK(a.device() == b.device(), b_name, " must be on the device of ", a_name, " (", a.device(),
              "), got ", b.device());
}

inline void check_size(const at::Tensor& t, int64_t dim, int64_t expected, const char* name, const char* what) {
  TORCH_CHECK(t.size(dim) == expected, name, ".size(", dim, ") must equal ", what, " = ", expected, ", got ",
              t.size(dim), " (shape ", t.sizes(), ")");
}

}  // namespace charmlp
