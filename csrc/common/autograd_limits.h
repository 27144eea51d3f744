// What the C++ autograd kernels of the public ops (embed_linear_tanh, cross_entropy, linear_cross_entropy) cannot
// do, turned into errors that name the op, the limit and what to use instead. Without them PyTorch answers quietly:
// forward-mode AD drops the tangent of a call that records no graph node (or raises from inside
// torch::autograd::Function without naming the op), torch.func's transforms reject C++ autograd functions without
// naming them, and a backward with create_graph=True through an op that has no Autograd kernel only warns and
// yields zeros. Every check reads flags on the tensors or thread-local state: O(1) per call, no data scans.
//
// Host code for the .cpp files only (the CUDA files never include it).
#pragma once

#include <ATen/FuncTorchTLS.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/grad_mode.h>
#include <c10/util/Exception.h>

#include <functional>
#include <initializer_list>
#include <string>

namespace charmlp {

// The public op and the plain PyTorch code that computes the same thing with every autograd feature.
struct AutogradLimits {
  const char* op;       // "charmlp::cross_entropy"
  const char* instead;  // e.g. "torch.nn.functional.cross_entropy"
};

// Forward-mode AD (torch.autograd.forward_ad.make_dual, torch.func.jvp / jacfwd): a C++ torch::autograd::Function
// has no jvp formula. Level 0 is the only forward-AD level PyTorch allows (nested levels are refused), as in the
// generated autograd kernels' isFwGradDefined.
inline void check_no_forward_ad(const AutogradLimits& limits,
                                std::initializer_list<std::reference_wrapper<const at::Tensor>> inputs) {
  for (const at::Tensor& t : inputs) {
    TORCH_CHECK(!(t.defined() && t._fw_grad(/*level=*/0).defined()), limits.op,
                ": forward-mode AD (torch.autograd.forward_ad, torch.func.jvp/jacfwd) is not supported, the op has "
                "no forward derivative; use ", limits.instead, " for it");
  }
}

// torch.func.grad/vjp/jacrev/hessian (and jvp) run autograd per transform level, which a C++ Function cannot join:
// torch::autograd::Function::apply raises then, without naming the op. The same test (a transform is active),
// reworded. Only checked where a graph node is recorded: under torch.func.vmap alone the Autograd key is excluded
// and the op runs (through the per-sample fallback), which is correct.
inline void check_no_functorch_transform(const AutogradLimits& limits) {
  const auto& functorch_tls = at::functorch::functorchTLSAccessor();
  if (!functorch_tls) return;  // no transform ever entered on this thread
  try {
    functorch_tls->checkSupportsCppAutogradFunction();
  } catch (const c10::Error&) {
    TORCH_CHECK(false, limits.op,
                ": torch.func transforms that differentiate (grad, vjp, jacrev, jacfwd, hessian) are not supported "
                "by its C++ autograd kernel; use torch.autograd.grad, or ", limits.instead, " under torch.func");
  }
}

// A backward with create_graph=True (double backward, gradgradcheck, torch.autograd.functional.hessian) must
// return gradients that are themselves differentiable. True only there: the engine runs a backward with grad mode
// set to create_graph.
inline bool differentiable_backward_wanted() {
  return at::GradMode::is_enabled();
}

inline void check_no_double_backward(const AutogradLimits& limits) {
  TORCH_CHECK(!differentiable_backward_wanted(), limits.op,
              ": double backward (a backward with create_graph=True, gradgradcheck, hessians) is not supported; use ",
              limits.instead, " for it");
}

// The Autograd kernel of the internal ops (*_forward, *_backward): they have no derivative of their own, so a call
// that would need one (grad mode and an input that requires grad, or an input with a forward-AD tangent) is an
// error naming the public op to differentiate instead; any other call goes straight to the backend kernel. Boxed,
// like PyTorch's autograd fallback that it replaces for these ops (and like it, reached only by calls from outside
// the public ops' autograd kernels, which call these ops below autograd).
inline void internal_op_autograd(const c10::OperatorHandle& op, c10::DispatchKeySet keys, torch::jit::Stack* stack) {
  const auto& args = op.schema().arguments();
  const size_t first = stack->size() - args.size();
  const bool grad_mode = at::GradMode::is_enabled();
  for (size_t i = 0; i < args.size(); ++i) {
    const c10::IValue& v = (*stack)[first + i];
    if (!v.isTensor()) continue;
    const at::Tensor& t = v.toTensor();
    const bool has_tangent = t.defined() && t._fw_grad(/*level=*/0).defined();
    if (!((grad_mode && t.requires_grad()) || has_tangent)) continue;
    const std::string& name = op.schema().name();
    // charmlp::cross_entropy_backward -> charmlp::cross_entropy
    TORCH_CHECK(false, name, " is an internal op with no derivative (its argument ", args[i].name(),
                " requires grad or has a forward-AD tangent); differentiate ", name.substr(0, name.rfind('_')),
                " instead");
  }
  at::AutoDispatchBelowADInplaceOrView guard;
  op.redispatchBoxed(keys & c10::after_ADInplaceOrView_keyset, stack);
}

}  // namespace charmlp
