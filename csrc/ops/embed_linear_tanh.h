// embed_linear_tanh: h = tanh(C[idx].view(B, T*E) @ W1 + b1), the first layer of the MLP language model.
// What the CPU (embed_linear_tanh.cpp) and CUDA (embed_linear_tanh_cuda.cu) kernels share: the argument
// checks (so both backends reject bad input with the same message) and the scalar math of the backward.
//
// Shapes: idx (B, T) int64/int32, C (V, E), W1 (K = T*E, H), b1 (H), h (B, H).
#pragma once

#include "common/checks.h"

#include <utility>

namespace charmlp {

struct EmbedLinearTanhSizes {
  int64_t B, T, E, K, H, V;
};

// Checks of the inputs forward and backward share (idx, C, W1); returns the named sizes.
// allow_half: bf16/fp16 parameters are accepted by the CUDA kernels only.
inline EmbedLinearTanhSizes check_embedding_and_weight(const at::Tensor& idx, const at::Tensor& C,
                                                       const at::Tensor& W1, bool allow_half) {
  check_dim(idx, 2, "idx");
  check_dim(C, 2, "C");
  check_dim(W1, 2, "W1");
  check_index(idx, "idx");
  check_floating(C, "C", allow_half);
  check_same_dtype(C, "C", W1, "W1");
  check_same_device(C, "C", idx, "idx");
  check_same_device(C, "C", W1, "W1");
  EmbedLinearTanhSizes s;
  s.B = idx.size(0);
  s.T = idx.size(1);
  s.V = C.size(0);
  s.E = C.size(1);
  s.K = s.T * s.E;
  s.H = W1.size(1);
  check_size(W1, 0, s.K, "W1", "idx.size(1) * C.size(1) (T*E)");
  return s;
}

inline EmbedLinearTanhSizes check_embed_linear_tanh_args(const at::Tensor& idx, const at::Tensor& C,
                                                         const at::Tensor& W1, const at::Tensor& b1,
                                                         bool allow_half) {
  const EmbedLinearTanhSizes s = check_embedding_and_weight(idx, C, W1, allow_half);
  check_dim(b1, 1, "b1");
  check_same_dtype(C, "C", b1, "b1");
  check_same_device(C, "C", b1, "b1");
  check_size(b1, 0, s.H, "b1", "W1.size(1) (H)");
  return s;
}

inline EmbedLinearTanhSizes check_embed_linear_tanh_backward_args(const at::Tensor& grad_h, const at::Tensor& h,
                                                                  const at::Tensor& idx, const at::Tensor& C,
                                                                  const at::Tensor& W1, bool allow_half) {
  const EmbedLinearTanhSizes s = check_embedding_and_weight(idx, C, W1, allow_half);
  for (const auto& [t, name] : {std::pair<const at::Tensor&, const char*>{h, "h"}, {grad_h, "grad_h"}}) {
    check_dim(t, 2, name);
    check_same_dtype(C, "C", t, name);
    check_same_device(C, "C", t, name);
    check_size(t, 0, s.B, name, "idx.size(0) (B)");
    check_size(t, 1, s.H, name, "W1.size(1) (H)");
  }
  return s;
}

// d tanh(x)/dx expressed through the saved output h = tanh(x): the pre-activation is never stored.
template <typename acc_t>
CHARMLP_HOST_DEVICE acc_t tanh_backward(acc_t grad_h, acc_t h) {
  return grad_h * (acc_t(1) - h * h);
}

// Column k of the concatenated embedding row lives at C[idx[b, k / E], k % E].
struct ConcatColumn {
  int64_t t, e;
};
CHARMLP_HOST_DEVICE ConcatColumn concat_column(int64_t k, int64_t E) {
  return {k / E, k - (k / E) * E};
}

}  // namespace charmlp
