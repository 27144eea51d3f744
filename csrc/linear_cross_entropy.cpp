// linear_cross_entropy: the output layer fused with the loss, cross_entropy(h @ W2 + b2, targets), without ever
// holding the (B, V) logits.
//
// Rows of B are processed in chunks (as Liger Kernel's fused linear cross-entropy does): per chunk, one GEMM
// writes the chunk's logits into a reusable (rows, V) buffer, a row loop turns them into loss, lse and (when a
// gradient is wanted) the gradient g * (softmax - onehot) in place, and two GEMMs consume that gradient:
// grad_h[chunk] = D @ W2^T and grad_W2 += h[chunk]^T @ D. Extra memory is one chunk, O(rows * V), not O(B * V).
//
// Computing the gradient during the forward (compute_grad, for reduction mean/sum, whose incoming gradient is a
// scalar that only scales the result) costs 3 GEMMs for forward + backward instead of the 4 of recomputing the
// logits in the backward (Cut Cross-Entropy); reduction="none" needs the per-row incoming gradient, so its
// backward recomputes the logits chunk by chunk from the saved lse (linear_cross_entropy_backward).
//
// This file: the CPU kernels (GEMMs through at::addmm_out / at::mm_out, i.e. MKL, plus the shared row kernels of
// cross_entropy.h), the autograd kernel, the CompositeExplicitAutograd kernel and their registration. The CUDA
// kernels are in linear_cross_entropy_cuda.cu.
#include "cross_entropy.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <vector>

namespace charmlp {
namespace {

// ---- CPU kernels -----------------------------------------------------------------------------------

// Rows per chunk: at least 256, so that the chunk's GEMMs run near BLAS speed and the read-modify-write of
// grad_W2 (H, V) per chunk is amortised over many rows; otherwise ~8 MiB of float32 logits, which stays in cache.
constexpr int64_t kCpuChunkElems = int64_t(1) << 21;
constexpr int64_t kCpuMinChunkRows = 256;

int64_t cpu_chunk_rows(int64_t B, int64_t V) {
  return std::min(B, std::max(kCpuMinChunkRows, kCpuChunkElems / V));
}

// The chunk loop shared by the forward and the backward. For each chunk of rows: logits = h[chunk] @ W2 + b2 into
// the buffer, then row_fn(i, row) on each of its rows (i global; row_fn may overwrite the row with its gradient
// D), then with_grad: grad_h[chunk] = D @ W2^T, grad_W2 += h[chunk]^T @ D, grad_b2 += colsum(D).
template <typename scalar_t, typename RowFn>
void linear_cross_entropy_chunks_cpu(const at::Tensor& h, const at::Tensor& W2, const at::Tensor& b2,
                                     const RowFn& row_fn, bool with_grad, at::Tensor& grad_h, at::Tensor& grad_W2,
                                     at::Tensor& grad_b2) {
  const int64_t B = h.size(0), V = W2.size(1);
  // grad_b2's column sums over all B rows, in float64: summed row after row in float32 they would lose
  // ~sqrt(B) ulp (1e-5 at B = 65,536), where PyTorch's cascaded sum loses almost nothing.
  std::vector<double> colsum(with_grad ? V : 0, 0.0);
  if (with_grad && B == 0) grad_W2.zero_();
  const int64_t R = cpu_chunk_rows(B, V);
  at::Tensor buf = at::empty({R, V}, h.options());  // buf is (R, V): a chunk of logits, then of their gradient
  for (int64_t r0 = 0; r0 < B; r0 += R) {
    const int64_t n = std::min(R, B - r0);
    at::Tensor logits = buf.narrow(0, 0, n);  // logits is (n, V)
    const at::Tensor h_c = h.narrow(0, r0, n);  // h_c is (n, H)
    at::addmm_out(logits, b2, h_c, W2);
    scalar_t* x = logits.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, n, cpu_row_grain(V), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) row_fn(r0 + r, x + r * V);
    });
    if (!with_grad) continue;
    at::Tensor grad_h_c = grad_h.narrow(0, r0, n);
    at::mm_out(grad_h_c, logits, W2.t());
    if (r0 == 0) {
      at::mm_out(grad_W2, h_c.t(), logits);
    } else {
      grad_W2.addmm_(h_c.t(), logits);
    }
    // Parallel over columns: each thread adds its own slice in row order (deterministic).
    at::parallel_for(0, V, std::max<int64_t>(1, kCpuGrainElems / n), [&](int64_t j0, int64_t j1) {
      for (int64_t r = 0; r < n; ++r) {
        const scalar_t* d = x + r * V;
        for (int64_t j = j0; j < j1; ++j) colsum[j] += d[j];
      }
    });
  }
  if (with_grad) {
    scalar_t* gb = grad_b2.mutable_data_ptr<scalar_t>();
    for (int64_t j = 0; j < V; ++j) gb[j] = static_cast<scalar_t>(colsum[j]);
  }
}

// The loss from per-row losses: kept as is for "none" (row_loss is then the output), else summed in float64.
template <typename scalar_t>
void reduce_loss_cpu(const scalar_t* row_loss, int64_t B, int64_t n_valid, int64_t reduction, at::Tensor& loss) {
  if (reduction == kNone) return;
  double sum = 0;
  for (int64_t i = 0; i < B; ++i) sum += row_loss[i];
  // mean over zero counted rows is 0/0 = nan, as in torch
  *loss.mutable_data_ptr<scalar_t>() =
      static_cast<scalar_t>(reduction == kMean ? sum / static_cast<double>(n_valid) : sum);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> linear_cross_entropy_forward_cpu(
    const at::Tensor& h, const at::Tensor& W2, const at::Tensor& b2, const at::Tensor& targets_, int64_t reduction,
    int64_t ignore_index, bool compute_grad) {
  int64_t B, H, V;
  std::tie(B, H, V) = check_linear_cross_entropy_args(h, W2, b2, targets_, reduction, /*allow_half=*/false);
  const at::Tensor targets = targets_.contiguous();
  at::Tensor loss = reduction == kNone ? at::empty({B}, h.options()) : at::empty({}, h.options());
  at::Tensor lse = at::empty({B}, h.options().dtype(at::kDouble));
  // grad_h is (B, H), grad_W2 (H, V), grad_b2 (V) with compute_grad; (0,) placeholders otherwise.
  at::Tensor grad_h = compute_grad ? at::empty({B, H}, h.options()) : at::empty({0}, h.options());
  at::Tensor grad_W2 = compute_grad ? at::empty({H, V}, h.options()) : at::empty({0}, h.options());
  at::Tensor grad_b2 = compute_grad ? at::empty({V}, h.options()) : at::empty({0}, h.options());

  AT_DISPATCH_FLOATING_TYPES(h.scalar_type(), "linear_cross_entropy_forward_cpu", [&] {
    AT_DISPATCH_INDEX_TYPES(targets.scalar_type(), "linear_cross_entropy_forward_cpu", [&] {
      const index_t* t = targets.const_data_ptr<index_t>();
      const int64_t n_valid = check_targets_cpu(t, B, V, ignore_index);
      std::vector<scalar_t> scratch(reduction == kNone ? 0 : B);
      scalar_t* row_loss = reduction == kNone ? loss.mutable_data_ptr<scalar_t>() : scratch.data();
      double* lse_p = lse.mutable_data_ptr<double>();
      // the gradient for grad_loss = 1 (only read for counted rows, so n_valid > 0 there)
      const scalar_t scale = reduction == kMean ? scalar_t(1) / static_cast<scalar_t>(n_valid) : scalar_t(1);
      auto row_fn = [&](int64_t i, scalar_t* x) {
        if (t[i] == ignore_index) {
          row_loss[i] = 0;
          lse_p[i] = 0;
          if (compute_grad) std::fill(x, x + V, scalar_t(0));
          return;
        }
        const int64_t ti = t[i];
        std::tie(row_loss[i], lse_p[i]) =
            compute_grad ? cpu_row_forward_grad(x, V, ti, scale) : cpu_row_forward(x, V, ti);
      };
      linear_cross_entropy_chunks_cpu<scalar_t>(h, W2, b2, row_fn, compute_grad, grad_h, grad_W2, grad_b2);
      reduce_loss_cpu(row_loss, B, n_valid, reduction, loss);
    });
  });
  return {loss, lse, grad_h, grad_W2, grad_b2};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_cross_entropy_backward_cpu(
    const at::Tensor& grad_loss, const at::Tensor& h, const at::Tensor& W2, const at::Tensor& b2,
    const at::Tensor& targets_, const at::Tensor& lse_, int64_t reduction, int64_t ignore_index) {
  int64_t B, H, V;
  std::tie(B, H, V) = check_linear_cross_entropy_args(h, W2, b2, targets_, reduction, /*allow_half=*/false);
  check_backward_args(grad_loss, lse_, h, "h", B, reduction);
  const at::Tensor targets = targets_.contiguous();
  const at::Tensor lse = lse_.contiguous();
  at::Tensor grad_h = at::empty({B, H}, h.options());
  at::Tensor grad_W2 = at::empty({H, V}, h.options());
  at::Tensor grad_b2 = at::empty({V}, h.options());

  AT_DISPATCH_FLOATING_TYPES(h.scalar_type(), "linear_cross_entropy_backward_cpu", [&] {
    AT_DISPATCH_INDEX_TYPES(targets.scalar_type(), "linear_cross_entropy_backward_cpu", [&] {
      const index_t* t = targets.const_data_ptr<index_t>();
      const int64_t n_valid = check_targets_cpu(t, B, V, ignore_index);
      const double* lse_p = lse.const_data_ptr<double>();
      const scalar_t* g = grad_loss.const_data_ptr<scalar_t>();
      const int64_t g_stride = reduction == kNone ? grad_loss.stride(0) : 0;
      auto row_fn = [&](int64_t i, scalar_t* x) {
        if (t[i] == ignore_index) {
          std::fill(x, x + V, scalar_t(0));
          return;
        }
        const scalar_t scale = row_grad_scale(reduction, g[i * g_stride], n_valid);
        cpu_row_backward(x, x, V, static_cast<int64_t>(t[i]), lse_p[i], scale);
      };
      linear_cross_entropy_chunks_cpu<scalar_t>(h, W2, b2, row_fn, /*with_grad=*/true, grad_h, grad_W2, grad_b2);
    });
  });
  return {grad_h, grad_W2, grad_b2};
}

// ---- autograd --------------------------------------------------------------------------------------

using ForwardFn = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t, int64_t, bool);
using BackwardFn = std::tuple<at::Tensor, at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                                  const at::Tensor&, const at::Tensor&,
                                                                  const at::Tensor&, const at::Tensor&, int64_t,
                                                                  int64_t);

const c10::TypedOperatorHandle<ForwardFn>& forward_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("charmlp::linear_cross_entropy_forward", "")
                             .typed<ForwardFn>();
  return op;
}

const c10::TypedOperatorHandle<BackwardFn>& backward_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("charmlp::linear_cross_entropy_backward", "")
                             .typed<BackwardFn>();
  return op;
}

class LinearCrossEntropyFunction : public torch::autograd::Function<LinearCrossEntropyFunction> {
 public:
  // Only called when autograd records the call (see linear_cross_entropy_autograd).
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& h, const at::Tensor& W2,
                            const at::Tensor& b2, const at::Tensor& targets, int64_t reduction,
                            int64_t ignore_index) {
    at::AutoDispatchBelowADInplaceOrView guard;
    // mean/sum: take the gradient for grad_loss = 1 from the forward's pass, the backward only scales it.
    const bool precompute = reduction != kNone;
    auto [loss, lse, grad_h, grad_W2, grad_b2] =
        forward_op().call(h, W2, b2, targets, reduction, ignore_index, precompute);
    if (precompute) {
      ctx->save_for_backward({grad_h, grad_W2, grad_b2});
    } else {
      ctx->save_for_backward({h, W2, b2, targets, lse});
    }
    ctx->saved_data["reduction"] = reduction;
    ctx->saved_data["ignore_index"] = ignore_index;
    return loss;
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grad_outputs) {
    const auto saved = ctx->get_saved_variables();
    const int64_t reduction = ctx->saved_data["reduction"].toInt();
    const at::Tensor& g = grad_outputs[0];
    if (reduction != kNone) {  // g is a scalar: scale the precomputed gradients
      auto scaled = [&](int idx) { return ctx->needs_input_grad(idx) ? saved[idx] * g : at::Tensor(); };
      return {scaled(0), scaled(1), scaled(2), at::Tensor(), at::Tensor(), at::Tensor()};
    }
    auto [grad_h, grad_W2, grad_b2] = backward_op().call(g, saved[0], saved[1], saved[2], saved[3], saved[4],
                                                         reduction, ctx->saved_data["ignore_index"].toInt());
    return {grad_h, grad_W2, grad_b2, at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

at::Tensor linear_cross_entropy_autograd(const at::Tensor& h, const at::Tensor& W2, const at::Tensor& b2,
                                         const at::Tensor& targets, int64_t reduction, int64_t ignore_index) {
  const bool needs_grad =
      at::GradMode::is_enabled() && (h.requires_grad() || W2.requires_grad() || b2.requires_grad());
  if (!needs_grad) {  // nothing to record: skip the graph node
    at::AutoDispatchBelowADInplaceOrView guard;
    return std::get<0>(forward_op().call(h, W2, b2, targets, reduction, ignore_index, /*compute_grad=*/false));
  }
  return LinearCrossEntropyFunction::apply(h, W2, b2, targets, reduction, ignore_index);
}

at::Tensor linear_cross_entropy_composite(const at::Tensor& h, const at::Tensor& W2, const at::Tensor& b2,
                                          const at::Tensor& targets, int64_t reduction, int64_t ignore_index) {
  return std::get<0>(forward_op().call(h, W2, b2, targets, reduction, ignore_index, /*compute_grad=*/false));
}

}  // namespace
}  // namespace charmlp

TORCH_LIBRARY_IMPL(charmlp, CPU, m) {
  m.impl("linear_cross_entropy_forward", &charmlp::linear_cross_entropy_forward_cpu);
  m.impl("linear_cross_entropy_backward", &charmlp::linear_cross_entropy_backward_cpu);
}

TORCH_LIBRARY_IMPL(charmlp, Autograd, m) {
  m.impl("linear_cross_entropy", &charmlp::linear_cross_entropy_autograd);
}

TORCH_LIBRARY_IMPL(charmlp, CompositeExplicitAutograd, m) {
  m.impl("linear_cross_entropy", &charmlp::linear_cross_entropy_composite);
}
