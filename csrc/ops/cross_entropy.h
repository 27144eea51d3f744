// Shared by the cross_entropy and linear_cross_entropy op families, CPU and CUDA alike: their argument checks (one
// place, so that both backends reject bad input with the same message) and the CUDA row launchers that
// linear_cross_entropy_cuda.cu borrows from cross_entropy_cuda.cu. The row math is common/softmax_ce.h, the CPU
// row kernels cpu/softmax_rows.h.
#pragma once

#include "common/checks.h"
#include "common/softmax_ce.h"
#if !defined(__CUDACC__)
#include "cpu/softmax_rows.h"
#endif

#include <ATen/Parallel.h>

#include <cstdint>
#include <tuple>

namespace charmlp {

// ==== argument checks =============================================================================

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

// ==== CUDA row launchers (defined in cross_entropy_cuda.cu) =======================================
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
