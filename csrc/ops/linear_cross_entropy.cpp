// linear_cross_entropy: the output layer fused with the loss, cross_entropy(h @ W2 + b2, targets), without ever
// holding the (B, V) logits.
//
// Rows of B are processed in chunks (as Liger Kernel's fused linear cross-entropy does): per chunk, one GEMM
// writes the chunk's logits into a reusable (rows, V) buffer, a row loop adds b2 and turns them into loss, lse and
// (when a gradient is wanted) the gradient g * (softmax - onehot) in place, and two GEMMs consume that gradient:
// grad_h[chunk] = D @ W2^T and grad_W2 += h[chunk]^T @ D. Extra memory is one chunk, O(rows * V), not O(B * V).
//
// The autograd kernel picks one of three routes from the shapes (see Route below): the gradients for
// grad_loss = 1 computed by the forward's pass (mean/sum: 3 GEMMs for forward + backward instead of the 4 of
// recomputing the logits in the backward, as Cut Cross-Entropy does); the logits recomputed chunk by chunk from
// the saved lse by linear_cross_entropy_backward (reduction="none", whose per-row incoming gradient only the
// backward knows); or, for V <= H / 4 at large B, the (B, V) logits kept (smaller than h there) and
// cross_entropy's own ops applied to them.
//
// This file: the CPU kernels (GEMMs through at::mm_out, i.e. MKL, plus the shared row kernels of
// cross_entropy.h), the autograd kernel (first order only: no double backward, no forward-mode AD), the
// CompositeExplicitAutograd kernel and their registration. The CUDA kernels are in linear_cross_entropy_cuda.cu.
#include "ops/cross_entropy.h"

#include "common/autograd.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <memory>
#include <vector>

namespace charmlp {
namespace {

// ---- CPU kernels -----------------------------------------------------------------------------------

// Rows per chunk: at least 256, so that the chunk's GEMMs run near BLAS speed and the read-modify-write of
// grad_W2 (H, V) per chunk is amortised over many rows; otherwise ~8 MiB of float32 logits, which stays in cache.
constexpr int64_t kCpuChunkElems = int64_t(1) << 21;
constexpr int64_t kCpuMinChunkRows = 256;
constexpr int64_t kMaxPartialElems = int64_t(1) << 20;  // float64 partial column sums of grad_b2: 8 MiB at most

int64_t cpu_chunk_rows(int64_t B, int64_t V) {
  return std::min(B, std::max(kCpuMinChunkRows, kCpuChunkElems / V));
}

// The chunk loop shared by the forward and the backward. For each chunk of rows: logits = h[chunk] @ W2 into the
// buffer, + b2 on each row, then rows_fn(r0, begin, end, x) on the chunk's rows [begin, end) (stored at
// x + r * V; batch rows r0 + r), which may overwrite them with their gradient D; then with_grad:
// grad_h[chunk] = D @ W2^T, grad_W2 += h[chunk]^T @ D, grad_b2 += colsum(D).
// The bias is added row by row, in cache, rather than by at::addmm_out, whose broadcast copy of b2 costs ~1 us
// at the seed's size.
template <typename scalar_t, typename RowsFn>
void linear_cross_entropy_chunks_cpu(const at::Tensor& h, const at::Tensor& W2, const at::Tensor& b2,
                                     const RowsFn& rows_fn, bool with_grad, at::Tensor& grad_h, at::Tensor& grad_W2,
                                     at::Tensor& grad_b2) {
  const int64_t B = h.size(0), V = W2.size(1);
  const int64_t R = cpu_chunk_rows(B, V), grain = cpu_row_grain(V);
  // grad_b2's column sums in float64: summed row after row in float32 they would lose ~sqrt(B) ulp (1e-5 at
  // B = 65,536), where PyTorch's cascaded sum loses almost nothing. A chunk's rows are split into a fixed number of
  // groups (from the sizes alone, not the thread count); each group adds its rows, while they are in cache, into
  // its own partial sums, and the partials are added in group order. The groups are capped so that the partials
  // stay within kMaxPartialElems (one partial per row would be 256 MiB at V = 131,072).
  const int64_t max_groups = with_grad ? std::max<int64_t>(1, kMaxPartialElems / V) : B;
  auto groups_of = [&](int64_t rows) { return std::min(max_groups, (rows + grain - 1) / grain); };
  std::vector<double> colsum(with_grad ? V : 0, 0.0);
  // Not zero-filled here: each group zeroes its own partial, on the thread that then adds into it.
  const std::unique_ptr<double[]> partial(new double[with_grad ? groups_of(std::min(R, B)) * V : 0]);
  if (with_grad && B == 0) grad_W2.zero_();
  const at::Tensor bias = b2.contiguous();
  const scalar_t* b = bias.const_data_ptr<scalar_t>();
  at::Tensor buf = at::empty({R, V}, h.options());  // buf is (R, V): a chunk of logits, then of their gradient
  for (int64_t r0 = 0; r0 < B; r0 += R) {
    const int64_t n = std::min(R, B - r0);
    at::Tensor logits = row_slice(buf, 0, n);  // logits is (n, V)
    const at::Tensor h_c = row_slice(h, r0, n);  // h_c is (n, H)
    at::mm_out(logits, h_c, W2);
    scalar_t* x = logits.mutable_data_ptr<scalar_t>();
    const int64_t n_groups = groups_of(n);
    const int64_t group_rows = (n + n_groups - 1) / n_groups;
    at::parallel_for(0, n_groups, 1, [&](int64_t g0, int64_t g1) {
      for (int64_t g = g0; g < g1; ++g) {
        const int64_t begin = g * group_rows, end = std::min(n, begin + group_rows);
        for (int64_t r = begin; r < end; ++r) {
          scalar_t* row = x + r * V;
          for (int64_t j = 0; j < V; ++j) row[j] += b[j];
        }
        rows_fn(r0, begin, end, x);
        if (!with_grad) continue;
        double* part = partial.get() + g * V;
        std::fill(part, part + V, 0.0);
        for (int64_t r = begin; r < end; ++r) {
          const scalar_t* d = x + r * V;
          for (int64_t j = 0; j < V; ++j) part[j] += d[j];
        }
      }
    });
    if (!with_grad) continue;
    for (int64_t p = 0; p < n_groups; ++p) {
      for (int64_t j = 0; j < V; ++j) colsum[j] += partial[p * V + j];
    }
    at::Tensor grad_h_c = row_slice(grad_h, r0, n);
    at::mm_out(grad_h_c, logits, W2.t());
    if (r0 == 0) {
      at::mm_out(grad_W2, h_c.t(), logits);
    } else {
      grad_W2.addmm_(h_c.t(), logits);
    }
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
  check_linear_cross_entropy_args(h, W2, b2, targets_, reduction, /*allow_half=*/false);
  const int64_t B = h.size(0), H = h.size(1), V = W2.size(1);
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
      // the chunk's rows [begin, end), batch rows r0 + [begin, end)
      auto rows_fn = [&](int64_t r0, int64_t begin, int64_t end, scalar_t* x) {
        if (compute_grad) {
          cpu_forward_grad_rows(x, V, t + r0, ignore_index, begin, end, scale, row_loss + r0, lse_p + r0);
        } else {
          cpu_forward_rows(x, V, t + r0, ignore_index, begin, end, row_loss + r0, lse_p + r0);
        }
      };
      linear_cross_entropy_chunks_cpu<scalar_t>(h, W2, b2, rows_fn, compute_grad, grad_h, grad_W2, grad_b2);
      reduce_loss_cpu(row_loss, B, n_valid, reduction, loss);
    });
  });
  return {loss, lse, grad_h, grad_W2, grad_b2};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_cross_entropy_backward_cpu(
    const at::Tensor& grad_loss, const at::Tensor& h, const at::Tensor& W2, const at::Tensor& b2,
    const at::Tensor& targets_, const at::Tensor& lse_, int64_t reduction, int64_t ignore_index) {
  check_linear_cross_entropy_args(h, W2, b2, targets_, reduction, /*allow_half=*/false);
  const int64_t B = h.size(0), H = h.size(1), V = W2.size(1);
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
      auto rows_fn = [&](int64_t r0, int64_t begin, int64_t end, scalar_t* x) {  // in place
        cpu_backward_rows(x, x, V, t + r0, ignore_index, begin, end, lse_p + r0, g + r0 * g_stride, g_stride,
                          reduction, n_valid);
      };
      linear_cross_entropy_chunks_cpu<scalar_t>(h, W2, b2, rows_fn, /*with_grad=*/true, grad_h, grad_W2, grad_b2);
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
using CeForwardFn = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, int64_t, int64_t);
using CeBackwardFn = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t,
                                int64_t);

const c10::TypedOperatorHandle<ForwardFn>& forward_op() {
  static const auto op = op_handle<ForwardFn>("charmlp::linear_cross_entropy_forward");
  return op;
}
const c10::TypedOperatorHandle<BackwardFn>& backward_op() {
  static const auto op = op_handle<BackwardFn>("charmlp::linear_cross_entropy_backward");
  return op;
}
const c10::TypedOperatorHandle<CeForwardFn>& ce_forward_op() {
  static const auto op = op_handle<CeForwardFn>("charmlp::cross_entropy_forward");
  return op;
}
const c10::TypedOperatorHandle<CeBackwardFn>& ce_backward_op() {
  static const auto op = op_handle<CeBackwardFn>("charmlp::cross_entropy_backward");
  return op;
}

// How forward and backward share the work, chosen per call from the shapes (guards under torch.compile).
enum Route : int64_t {
  // mean/sum: the forward's pass also yields the gradients for grad_loss = 1 and the backward scales them:
  // 3 GEMMs in all, plus one pass over grad_h (B, H) and grad_W2 (H, V).
  kPrecomputed = 0,
  // none (grad_loss per row): the backward op recomputes the logits chunk by chunk from lse: 4 GEMMs, O(B) kept.
  kRecompute = 1,
  // V <= H / 4 at large B (the big-batch case, V = 27, H = 200): the (B, V) logits are smaller than h, so keep them
  // and differentiate cross_entropy on them: 3 GEMMs and no pass over (B, H) to scale, which would cost more
  // than the GEMM it saves (e.g. 13 ms against 7 ms for B = 65,536 on this 2-core CPU).
  kViaLogits = 2,
};

constexpr int64_t kViaLogitsMinBH = int64_t(1) << 20;

Route choose_route(const at::Tensor& h, const at::Tensor& W2, int64_t reduction) {
  const c10::SymInt B = h.sym_size(0), H = h.sym_size(1), V = W2.sym_size(1);
  if (V * 4 <= H && B * H >= kViaLogitsMinBH) return kViaLogits;
  return reduction == kNone ? kRecompute : kPrecomputed;
}

// Double backward would need h, W2 and b2 in every route (kPrecomputed saves only the gradients), so it is an error,
// which points at the unfused pair whose cross_entropy does support it.
constexpr AutogradLimits kLimits{
    "charmlp::linear_cross_entropy",
    "charmlp_fast.ops.cross_entropy or torch.nn.functional.cross_entropy on torch.addmm(b2, h, W2) "
    "(or CharMLP(kernels=\"reference\"))"};

class LinearCrossEntropyFunction : public torch::autograd::Function<LinearCrossEntropyFunction> {
 public:
  // Only called when autograd records the call (see linear_cross_entropy_autograd).
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& h, const at::Tensor& W2,
                            const at::Tensor& b2, const at::Tensor& targets, int64_t reduction,
                            int64_t ignore_index, int64_t route) {
    at::AutoDispatchBelowADInplaceOrView guard;
    ctx->saved_data["reduction"] = reduction;
    ctx->saved_data["ignore_index"] = ignore_index;
    ctx->saved_data["route"] = route;
    if (route == kViaLogits) {
      at::Tensor logits = at::addmm(b2, h, W2);  // logits is (B, V)
      auto [loss, lse] = ce_forward_op().call(logits, targets, reduction, ignore_index);
      ctx->save_for_backward({h, W2, logits, targets, lse});
      return loss;
    }
    auto [loss, lse, grad_h, grad_W2, grad_b2] =
        forward_op().call(h, W2, b2, targets, reduction, ignore_index, /*compute_grad=*/route == kPrecomputed);
    if (route == kPrecomputed) {
      ctx->save_for_backward({grad_h, grad_W2, grad_b2});
    } else {
      ctx->save_for_backward({h, W2, b2, targets, lse});
    }
    return loss;
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grad_outputs) {
    const auto saved = ctx->get_saved_variables();
    const int64_t reduction = ctx->saved_data["reduction"].toInt();
    const int64_t ignore_index = ctx->saved_data["ignore_index"].toInt();
    const int64_t route = ctx->saved_data["route"].toInt();
    const at::Tensor& g = grad_outputs[0];
    const at::Tensor none;
    // Else kPrecomputed would return gradients that miss the loss's Hessian term, the others no gradient at all.
    check_no_double_backward(kLimits);
    // Grad mode is off from here on: below autograd, past the internal ops' Autograd kernel that would re-check it.
    at::AutoDispatchBelowADInplaceOrView guard;
    if (route == kPrecomputed) {  // g is a scalar
      auto scaled = [&](int idx) { return ctx->needs_input_grad(idx) ? saved[idx] * g : at::Tensor(); };
      return {scaled(0), scaled(1), scaled(2), none, none, none, none};
    }
    if (route == kViaLogits) {
      const at::Tensor &h = saved[0], &W2 = saved[1];
      const at::Tensor grad_logits = ce_backward_op().call(g, saved[2], saved[3], saved[4], reduction, ignore_index);
      return {ctx->needs_input_grad(0) ? at::mm(grad_logits, W2.t()) : none,
              ctx->needs_input_grad(1) ? at::mm(h.t(), grad_logits) : none,
              ctx->needs_input_grad(2) ? grad_logits.sum(0) : none, none, none, none, none};
    }
    auto [grad_h, grad_W2, grad_b2] =
        backward_op().call(g, saved[0], saved[1], saved[2], saved[3], saved[4], reduction, ignore_index);
    return {grad_h, grad_W2, grad_b2, none, none, none, none};
  }
};

at::Tensor linear_cross_entropy_autograd(const at::Tensor& h, const at::Tensor& W2, const at::Tensor& b2,
                                         const at::Tensor& targets, int64_t reduction, int64_t ignore_index) {
  return autograd_kernel(
      kLimits, {h, W2, b2},
      [&] { return std::get<0>(forward_op().call(h, W2, b2, targets, reduction, ignore_index, /*compute_grad=*/false)); },
      [&] {
        // The route reads the shapes, so the arguments are checked here first (with the forward op's messages).
        check_linear_cross_entropy_args(h, W2, b2, targets, reduction, /*allow_half=*/!h.is_cpu());
        return LinearCrossEntropyFunction::apply(h, W2, b2, targets, reduction, ignore_index,
                                                 static_cast<int64_t>(choose_route(h, W2, reduction)));
      });
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
  charmlp::register_internal_ops(m, {"linear_cross_entropy_forward", "linear_cross_entropy_backward"});
}

TORCH_LIBRARY_IMPL(charmlp, CompositeExplicitAutograd, m) {
  m.impl("linear_cross_entropy", &charmlp::linear_cross_entropy_composite);
}
