// cross_entropy: F.cross_entropy for logits (B, V) and targets (B,), as one pass per row in each direction.
//
// Forward: one read of the logits, writing only the loss and a float64 lse (B,) for the backward (eager
// PyTorch writes the whole (B, V) log_softmax). Backward: one read of the logits and one write of the gradient,
// grad = g_i * (softmax - onehot) with softmax = exp(x - lse). That is the minimum for a forward that does not
// know whether a backward will follow, nor (without a host sync) the incoming gradient.
//
// This file: the CPU kernels, the autograd kernel of the public op (a C++ torch::autograd::Function, ~3x cheaper
// per call than one registered from Python; double backward through ATen ops, no forward-mode AD), a
// CompositeExplicitAutograd kernel for calls below autograd (inference_mode / no_grad), and their registration.
// The CUDA kernels are in cross_entropy_cuda.cu.
#include "ops/cross_entropy.h"

#include "common/autograd.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <vector>

namespace charmlp {
namespace {

// ---- CPU kernels -----------------------------------------------------------------------------------

std::tuple<at::Tensor, at::Tensor> cross_entropy_forward_cpu(const at::Tensor& logits_, const at::Tensor& targets_,
                                                             int64_t reduction, int64_t ignore_index) {
  int64_t B, V;
  std::tie(B, V) = check_cross_entropy_args(logits_, targets_, reduction, /*allow_half=*/false);
  const at::Tensor logits = logits_.contiguous();  // logits is (B, V)
  const at::Tensor targets = targets_.contiguous();
  at::Tensor loss = reduction == kNone ? at::empty({B}, logits.options()) : at::empty({}, logits.options());
  at::Tensor lse = at::empty({B}, logits.options().dtype(at::kDouble));

  AT_DISPATCH_FLOATING_TYPES(logits.scalar_type(), "cross_entropy_forward_cpu", [&] {
    AT_DISPATCH_INDEX_TYPES(targets.scalar_type(), "cross_entropy_forward_cpu", [&] {
      const scalar_t* x = logits.const_data_ptr<scalar_t>();
      const index_t* t = targets.const_data_ptr<index_t>();
      const int64_t n_valid = check_targets_cpu(t, B, V, ignore_index);
      // Per-row losses go straight to the output for "none", else to a scratch row summed below in float64.
      std::vector<scalar_t> scratch(reduction == kNone ? 0 : B);
      scalar_t* row_loss = reduction == kNone ? loss.mutable_data_ptr<scalar_t>() : scratch.data();
      double* lse_p = lse.mutable_data_ptr<double>();
      at::parallel_for(0, B, cpu_row_grain(V), [&](int64_t begin, int64_t end) {
        cpu_forward_rows(x, V, t, ignore_index, begin, end, row_loss, lse_p);
      });
      if (reduction != kNone) {
        double sum = 0;
        for (int64_t i = 0; i < B; ++i) sum += row_loss[i];
        // mean over zero counted rows is 0/0 = nan, as in torch
        *loss.mutable_data_ptr<scalar_t>() =
            static_cast<scalar_t>(reduction == kMean ? sum / static_cast<double>(n_valid) : sum);
      }
    });
  });
  return {loss, lse};
}

at::Tensor cross_entropy_backward_cpu(const at::Tensor& grad_loss, const at::Tensor& logits_,
                                      const at::Tensor& targets_, const at::Tensor& lse_, int64_t reduction,
                                      int64_t ignore_index) {
  int64_t B, V;
  std::tie(B, V) = check_cross_entropy_args(logits_, targets_, reduction, /*allow_half=*/false);
  check_backward_args(grad_loss, lse_, logits_, "logits", B, reduction);
  const at::Tensor logits = logits_.contiguous();
  const at::Tensor targets = targets_.contiguous();
  const at::Tensor lse = lse_.contiguous();
  at::Tensor grad = at::empty({B, V}, logits.options());  // grad is (B, V)

  AT_DISPATCH_FLOATING_TYPES(logits.scalar_type(), "cross_entropy_backward_cpu", [&] {
    AT_DISPATCH_INDEX_TYPES(targets.scalar_type(), "cross_entropy_backward_cpu", [&] {
      const scalar_t* x = logits.const_data_ptr<scalar_t>();
      const index_t* t = targets.const_data_ptr<index_t>();
      const double* lse_p = lse.const_data_ptr<double>();
      const scalar_t* g = grad_loss.const_data_ptr<scalar_t>();
      const int64_t g_stride = reduction == kNone ? grad_loss.stride(0) : 0;
      scalar_t* y = grad.mutable_data_ptr<scalar_t>();
      const int64_t n_valid = check_targets_cpu(t, B, V, ignore_index);
      at::parallel_for(0, B, cpu_row_grain(V), [&](int64_t begin, int64_t end) {
        cpu_backward_rows(x, y, V, t, ignore_index, begin, end, lse_p, g, g_stride, reduction, n_valid);
      });
    });
  });
  return grad;
}

// ---- autograd --------------------------------------------------------------------------------------

using ForwardFn = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, int64_t, int64_t);
using BackwardFn = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t,
                              int64_t);

const c10::TypedOperatorHandle<ForwardFn>& forward_op() {
  static const auto op = op_handle<ForwardFn>("charmlp::cross_entropy_forward");
  return op;
}

const c10::TypedOperatorHandle<BackwardFn>& backward_op() {
  static const auto op = op_handle<BackwardFn>("charmlp::cross_entropy_backward");
  return op;
}

constexpr AutogradLimits kLimits{"charmlp::cross_entropy",
                                 "torch.nn.functional.cross_entropy (or CharMLP(kernels=\"reference\"))"};

// grad_logits = g_i * w_i * (softmax(logits) - onehot(targets)) from differentiable ATen ops, for a backward with
// create_graph=True: the fused backward op has no derivative. w_i = 0 for ignored rows, else 1 (sum) or 1 / the
// number of counted rows (mean). Never on the first-order path.
at::Tensor cross_entropy_backward_differentiable(const at::Tensor& grad_loss, const at::Tensor& logits,
                                                 const at::Tensor& targets, int64_t reduction, int64_t ignore_index) {
  const at::Tensor counted = targets.ne(ignore_index);  // (B,)
  const at::Tensor onehot =
      at::zeros_like(logits).scatter_(1, targets.masked_fill(~counted, 0).to(at::kLong).unsqueeze(1), 1.0);
  at::Tensor w = counted.to(logits.scalar_type());
  // clamp: with no counted row every w_i is 0 anyway (the loss is nan, its gradient 0, as in torch)
  if (reduction == kMean) w = w / counted.sum().clamp_min(1);
  return (at::softmax(logits, 1) - onehot) * (grad_loss * w).unsqueeze(1);
}

class CrossEntropyFunction : public torch::autograd::Function<CrossEntropyFunction> {
 public:
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& logits,
                            const at::Tensor& targets, int64_t reduction, int64_t ignore_index) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [loss, lse] = forward_op().call(logits, targets, reduction, ignore_index);
    ctx->save_for_backward({logits, targets, lse});
    ctx->saved_data["reduction"] = reduction;
    ctx->saved_data["ignore_index"] = ignore_index;
    return loss;
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grad_outputs) {
    const auto saved = ctx->get_saved_variables();
    const int64_t reduction = ctx->saved_data["reduction"].toInt();
    const int64_t ignore_index = ctx->saved_data["ignore_index"].toInt();
    const at::Tensor none;
    if (differentiable_backward_wanted()) {
      return {cross_entropy_backward_differentiable(grad_outputs[0], saved[0], saved[1], reduction, ignore_index),
              none, none, none};
    }
    // Through the dispatcher, so that torch.compile traces the backward op (with its fake) like any other. Grad
    // mode is off here: below autograd, past the internal op's Autograd kernel that would only re-check it.
    at::AutoDispatchBelowADInplaceOrView guard;
    at::Tensor grad_logits = backward_op().call(grad_outputs[0], saved[0], saved[1], saved[2], reduction, ignore_index);
    return {grad_logits, none, none, none};
  }
};

at::Tensor cross_entropy_autograd(const at::Tensor& logits, const at::Tensor& targets, int64_t reduction,
                                  int64_t ignore_index) {
  return autograd_kernel(
      kLimits, {logits}, [&] { return std::get<0>(forward_op().call(logits, targets, reduction, ignore_index)); },
      [&] { return CrossEntropyFunction::apply(logits, targets, reduction, ignore_index); });
}

// Below autograd (inference_mode, or a caller that already stripped autograd): the forward op's loss.
at::Tensor cross_entropy_composite(const at::Tensor& logits, const at::Tensor& targets, int64_t reduction,
                                   int64_t ignore_index) {
  return std::get<0>(forward_op().call(logits, targets, reduction, ignore_index));
}

}  // namespace
}  // namespace charmlp

TORCH_LIBRARY_IMPL(charmlp, CPU, m) {
  m.impl("cross_entropy_forward", &charmlp::cross_entropy_forward_cpu);
  m.impl("cross_entropy_backward", &charmlp::cross_entropy_backward_cpu);
}

TORCH_LIBRARY_IMPL(charmlp, Autograd, m) {
  m.impl("cross_entropy", &charmlp::cross_entropy_autograd);
  charmlp::register_internal_ops(m, {"cross_entropy_forward", "cross_entropy_backward"});
}

TORCH_LIBRARY_IMPL(charmlp, CompositeExplicitAutograd, m) {
  m.impl("cross_entropy", &charmlp::cross_entropy_composite);
}
