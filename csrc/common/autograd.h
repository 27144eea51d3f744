// How the ops of the library meet the dispatcher and autograd, written once for every op family (host code, the
// .cpp files only):
//   * op_handle: the typed handle of a registered op, looked up once per call site (the dispatcher's schema search
//     costs more than a seed-size kernel);
//   * autograd_kernel: the Autograd kernel of a differentiable public op (embed_linear_tanh, cross_entropy,
//     linear_cross_entropy): refuse what its C++ torch::autograd::Function cannot do (autograd_limits.h), skip the
//     graph node when nothing requires grad, record it otherwise;
//   * register_internal_ops: the Autograd kernel of the internal ops (*_forward, *_backward), which the public
//     ops' Functions call below autograd and which have no derivative of their own.
// The public op that is not differentiable (sgd_train, which updates its parameters in place) keeps its own
// Autograd and ADInplaceOrView kernels in sgd_train.cpp: it refuses to record, where these record.
#pragma once

#include "common/autograd_limits.h"

#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/grad_mode.h>
#include <torch/library.h>

#include <functional>
#include <initializer_list>

namespace charmlp {

// The handle of "charmlp::<name>" with signature Fn. Call it from a function-local static:
//   static const auto op = op_handle<Fn>("charmlp::cross_entropy_forward");
template <typename Fn>
c10::TypedOperatorHandle<Fn> op_handle(const char* qualified_name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(qualified_name, "").typed<Fn>();
}

// The Autograd kernel of a differentiable public op, given its differentiable inputs, `plain` (the forward op
// without a graph node, called below autograd) and `record` (Function::apply with the op's arguments).
template <typename Plain, typename Record>
at::Tensor autograd_kernel(const AutogradLimits& limits,
                           std::initializer_list<std::reference_wrapper<const at::Tensor>> differentiable,
                           Plain&& plain, Record&& record) {
  check_no_forward_ad(limits, differentiable);
  bool needs_grad = false;
  if (at::GradMode::is_enabled()) {
    for (const at::Tensor& t : differentiable) needs_grad = needs_grad || t.requires_grad();
  }
  if (!needs_grad) {  // nothing to record: skip the graph node
    at::AutoDispatchBelowADInplaceOrView guard;
    return plain();
  }
  check_no_functorch_transform(limits);
  return record();
}

// Every internal op named: internal_op_autograd as its Autograd kernel (an error naming the public op when a call
// would need a derivative; the backend kernel otherwise).
inline void register_internal_ops(torch::Library& m, std::initializer_list<const char*> names) {
  for (const char* name : names) {
    m.impl(name, torch::CppFunction::makeFromBoxedFunction<&internal_op_autograd>());
  }
}

}  // namespace charmlp
