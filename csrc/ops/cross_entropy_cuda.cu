// cross_entropy, CUDA: one group of threads per row of logits, streaming the row once in each direction.
//   forward : an online (max, sum of exp) per thread in registers, combined over the group -> loss, lse (B,);
//             one read of the logits and nothing of size (B, V) written.
//   backward: grad = g_i * (softmax - onehot), softmax = exp(x - lse) from the saved float64 lse;
//             one read of the logits and one write of the gradient.
// Without a host sync the forward cannot know the incoming gradient, so these three passes over (B, V) are the
// minimum for forward + backward; the memory floor of two passes (one read and one write of the logits) is not
// reachable by an op pair that must not sync.
//
// A group is 8 threads (V <= 64, e.g. the seed's V = 27: four rows per warp), a warp (V <= 2048) or a 512-thread
// block, so that every thread has several 16-byte loads of its row in flight. Loads and stores go through 16-byte
// vectors wherever the row's alignment allows. The reductions over B (the loss for mean/sum, the number of
// counted rows for mean) are one-block kernels: a fixed order, so deterministic, and B values are cheap.
// Targets are range-checked with CUDA_KERNEL_ASSERT, as torch's own kernels do: no host sync.
// The row math (online log-sum-exp, row_result, the gradient's target entry) is common/softmax_ce.h's and the lane
// reductions cuda/reduce.cuh's, shared with linear_cross_entropy's small kernel and the persistent sgd_train kernel.
// Tested on the CPU emulator (csrc/cuda/cuda_utils.cuh) with the CPU kernels' float64 truths and tolerances, all three
// row-group widths and the 16-byte vector paths; only a GPU shows the bandwidth and the device-assert's sticky error.
#include "cuda/cuda_utils.cuh"  // first: see its header
#include "common/ceil_div.h"
#include "cuda/reduce.cuh"
#include "ops/cross_entropy.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/macros/Macros.h>
#include <torch/library.h>

#include <climits>
#include <cstdint>
#include <type_traits>

namespace charmlp {
namespace {

// ---- launch shapes ---------------------------------------------------------------------------------

template <int kTPR>  // threads per row
struct RowLaunch {
  static constexpr int kThreads = kTPR >= 256 ? kTPR : 256;  // threads per block
  static constexpr int kRows = kThreads / kTPR;              // rows per block
  static constexpr int kWarps = kTPR > 32 ? kTPR / 32 : 1;   // warps per row (shared-memory slots of a reduction)
};

template <typename F>
void dispatch_threads_per_row(int64_t V, F&& f) {
  if (V <= 64) {
    f(std::integral_constant<int, 8>{});
  } else if (V <= 2048) {
    f(std::integral_constant<int, 32>{});
  } else {
    f(std::integral_constant<int, 512>{});
  }
}

unsigned int row_blocks(int64_t B, int rows_per_block) {
  const int64_t blocks = ceil_div(B, rows_per_block);
  TORCH_CHECK(blocks <= INT_MAX, "cross_entropy: B = ", B, " rows is more than one launch supports");
  return static_cast<unsigned int>(blocks);
}

constexpr int kReduceThreads = 1024;

// ---- device helpers --------------------------------------------------------------------------------

template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

// Calls f(j, x_j) for the elements of row (V,) owned by lane (of kTPR): the 16-byte-aligned body as whole vectors
// (vectors lane, lane + kTPR, ...), the unaligned head and the tail one element at a time.
template <int kTPR, typename T, typename F>
__device__ __forceinline__ void row_for_each(const T* row, int64_t V, int lane, F&& f) {
  constexpr int N = 16 / sizeof(T);
  const int64_t head = min(V, static_cast<int64_t>(((16 - (reinterpret_cast<uintptr_t>(row) & 15)) & 15) / sizeof(T)));
  for (int64_t j = lane; j < head; j += kTPR) f(j, row[j]);
  const int64_t n_vec = (V - head) / N;
  const Pack<T, N>* vec = reinterpret_cast<const Pack<T, N>*>(row + head);
  for (int64_t k = lane; k < n_vec; k += kTPR) {
    const Pack<T, N> p = vec[k];
#pragma unroll
    for (int e = 0; e < N; ++e) f(head + k * N + e, p.v[e]);
  }
  for (int64_t j = head + n_vec * N + lane; j < V; j += kTPR) f(j, row[j]);
}

// out_j = f(j, in_j) over the lane's elements of the row; in and out may be the same row. Vectorised when both rows
// have the same alignment within 16 bytes (always for in place or for two contiguous tensors with aligned bases).
template <int kTPR, typename T, typename F>
__device__ __forceinline__ void row_map(const T* in, T* out, int64_t V, int lane, F&& f) {
  constexpr int N = 16 / sizeof(T);
  const bool same_phase = ((reinterpret_cast<uintptr_t>(in) ^ reinterpret_cast<uintptr_t>(out)) & 15) == 0;
  const int64_t head =
      same_phase ? min(V, static_cast<int64_t>(((16 - (reinterpret_cast<uintptr_t>(in) & 15)) & 15) / sizeof(T))) : V;
  for (int64_t j = lane; j < head; j += kTPR) out[j] = f(j, in[j]);
  const int64_t n_vec = (V - head) / N;
  const Pack<T, N>* vin = reinterpret_cast<const Pack<T, N>*>(in + head);
  Pack<T, N>* vout = reinterpret_cast<Pack<T, N>*>(out + head);
  for (int64_t k = lane; k < n_vec; k += kTPR) {
    const Pack<T, N> p = vin[k];
    Pack<T, N> q;
#pragma unroll
    for (int e = 0; e < N; ++e) q.v[e] = f(head + k * N + e, p.v[e]);
    vout[k] = q;
  }
  for (int64_t j = head + n_vec * N + lane; j < V; j += kTPR) out[j] = f(j, in[j]);
}

// Orders the memory accesses of a row's threads (a sub-warp group syncs its whole warp: all lanes get here).
template <int kTPR>
__device__ __forceinline__ void group_sync() {
  if constexpr (kTPR <= 32) {
    __syncwarp();
  } else {
    __syncthreads();
  }
}

// The two reductions of a row, a sum and the combination of online log-sum-exp states, as one pair of overloads
// so that group_reduce is written once: combine two values, and combine over the lanes of a warp.
template <typename acc_t>
__device__ __forceinline__ acc_t combine(acc_t a, acc_t b) {
  return a + b;
}
template <typename acc_t>
__device__ __forceinline__ OnlineLse<acc_t> combine(OnlineLse<acc_t> a, OnlineLse<acc_t> b) {
  return lse_combine(a, b);
}
template <int kWidth, typename acc_t>
__device__ __forceinline__ acc_t warp_combine(acc_t v) {
  return cuda::warp_sum<kWidth>(v);
}
template <int kWidth, typename acc_t>
__device__ __forceinline__ OnlineLse<acc_t> warp_combine(OnlineLse<acc_t> v) {
  return cuda::warp_lse<kWidth>(v);
}

// Combines the per-thread values of a row (a sum or lse states); every thread of the group gets the result.
// smem: kWarps slots.
template <int kTPR, typename T>
__device__ __forceinline__ T group_reduce(T v, T* smem) {
  v = warp_combine<kTPR < 32 ? kTPR : 32>(v);
  if constexpr (kTPR > 32) {
    if (threadIdx.x % 32 == 0) smem[threadIdx.x / 32] = v;
    __syncthreads();
    v = smem[0];
#pragma unroll
    for (int w = 1; w < RowLaunch<kTPR>::kWarps; ++w) v = combine(v, smem[w]);
    __syncthreads();  // the slots are free again
  }
  return v;
}

// out = g * (softmax(in) - onehot(t)) for one row, softmax from the float64 lse. The target's entry is
// target_grad: -g * sum_{j != t} softmax_j, written after the group's sum (common/softmax_ce.h). An ignored
// row (not counted) gets zeros. Called by every thread of the block (it synchronises): the same steps as
// cuda::warp_row_grad, with the sum over a group that may be a whole block.
template <int kTPR, typename scalar_t, typename acc_t>
__device__ __forceinline__ void row_grad(const scalar_t* in, scalar_t* out, int64_t V, int64_t t, double lse,
                                         acc_t g, bool counted, bool active, int lane, acc_t* smem) {
  acc_t sum = 0;
  if (counted) {
    const SplitLse<acc_t> l = split_lse<acc_t>(lse);
    row_map<kTPR>(in, out, V, lane, [&](int64_t j, scalar_t x) {
      const acc_t p = softmax_prob_excl(static_cast<acc_t>(x), j == t, l);
      sum += p;
      return static_cast<scalar_t>(p * g);
    });
  } else if (active) {
    for (int64_t j = lane; j < V; j += kTPR) out[j] = scalar_t(0);
  }
  sum = group_reduce<kTPR>(sum, smem);
  group_sync<kTPR>();  // the lane that wrote out[t] above is ordered before the final write
  if (counted && lane == 0) out[t] = static_cast<scalar_t>(target_grad(sum, g));
}

// ---- kernels ---------------------------------------------------------------------------------------

// logits (B, V) -> row_losses (B,), lse (B,); with write_grad also logits := their gradient for grad_loss = 1
// (linear_cross_entropy's chunks; n_valid[0] divides it for mean).
template <typename scalar_t, typename index_t, int kTPR>
__global__ void __launch_bounds__(RowLaunch<kTPR>::kThreads)
    cross_entropy_forward_kernel(scalar_t* logits, const index_t* targets, int64_t B, int64_t V,
                                 int64_t ignore_index, at::opmath_type<scalar_t>* row_losses, double* lse,
                                 bool write_grad, const int64_t* n_valid, int64_t reduction) {
  using acc_t = at::opmath_type<scalar_t>;
  __shared__ OnlineLse<acc_t> smem_lse[RowLaunch<kTPR>::kWarps];
  __shared__ acc_t smem_sum[RowLaunch<kTPR>::kWarps];
  const int lane = threadIdx.x % kTPR;
  const int64_t i = static_cast<int64_t>(blockIdx.x) * RowLaunch<kTPR>::kRows + threadIdx.x / kTPR;
  const bool active = i < B;
  const int64_t t = row_target(targets, i, active, V, ignore_index);
  const bool counted = t != ignore_index;
  scalar_t* row = logits + (active ? i : 0) * V;  // row is (V,)

  OnlineLse<acc_t> st = lse_init<acc_t>();
  if (counted) {
    row_for_each<kTPR>(row, V, lane,
                       [&](int64_t j, scalar_t x) { st = lse_add(st, static_cast<acc_t>(x), j == t); });
  }
  st = group_reduce<kTPR>(st, smem_lse);
  acc_t loss = 0;
  double row_lse_value = 0;
  if (counted) {
    const RowResult<acc_t> r = row_result(st.m, st.s, static_cast<acc_t>(row[t]));
    loss = r.loss;
    row_lse_value = r.lse;
  }
  if (active && lane == 0) {
    row_losses[i] = loss;
    lse[i] = row_lse_value;
  }
  if (!write_grad) return;  // uniform over the grid
  group_sync<kTPR>();       // every lane has read row[t] before the row is overwritten
  acc_t g = 0;
  if (counted) g = reduction == kMean ? acc_t(1) / static_cast<acc_t>(*n_valid) : acc_t(1);
  row_grad<kTPR>(row, row, V, t, row_lse_value, g, counted, active, lane, smem_sum);
}

// grad (B, V) = g_i * (softmax - onehot), g_i = grad_loss[i] (none) or grad_loss[0] (/ n_valid[0] for mean).
template <typename scalar_t, typename index_t, int kTPR>
__global__ void __launch_bounds__(RowLaunch<kTPR>::kThreads)
    cross_entropy_backward_kernel(const scalar_t* logits, const index_t* targets, const double* lse,
                                  const scalar_t* grad_loss, int64_t grad_stride, const int64_t* n_valid,
                                  int64_t reduction, int64_t B, int64_t V, int64_t ignore_index, scalar_t* grad) {
  using acc_t = at::opmath_type<scalar_t>;
  __shared__ acc_t smem_sum[RowLaunch<kTPR>::kWarps];
  const int lane = threadIdx.x % kTPR;
  const int64_t i = static_cast<int64_t>(blockIdx.x) * RowLaunch<kTPR>::kRows + threadIdx.x / kTPR;
  const bool active = i < B;
  const int64_t t = row_target(targets, i, active, V, ignore_index);
  const bool counted = t != ignore_index;
  acc_t g = 0;
  double row_lse_value = 0;
  if (counted) {
    g = row_grad_scale(reduction, static_cast<acc_t>(grad_loss[reduction == kNone ? i * grad_stride : 0]),
                       reduction == kMean ? *n_valid : int64_t(1));
    row_lse_value = lse[i];
  }
  const int64_t offset = (active ? i : 0) * V;
  row_grad<kTPR>(logits + offset, grad + offset, V, t, row_lse_value, g, counted, active, lane, smem_sum);
}

// One block: n_valid[0] = #counted targets (kCount) and/or loss[0] = sum (or mean) of row_losses, summed in float64
// (kLoss).
template <typename scalar_t, typename index_t, bool kLoss, bool kCount>
__global__ void __launch_bounds__(kReduceThreads)
    reduce_rows_kernel(const index_t* targets, int64_t B, int64_t ignore_index, int64_t reduction,
                       const at::opmath_type<scalar_t>* row_losses, scalar_t* loss, int64_t* n_valid) {
  __shared__ double smem_sum[kReduceThreads / 32];
  __shared__ long long smem_count[kReduceThreads / 32];
  double sum = 0;
  long long count = 0;
  for (int64_t i = threadIdx.x; i < B; i += kReduceThreads) {
    count += targets[i] != ignore_index;
    if constexpr (kLoss) sum += static_cast<double>(row_losses[i]);
  }
  sum = cuda::warp_sum(sum);
  count = cuda::warp_sum(count);
  if (threadIdx.x % 32 == 0) {
    smem_sum[threadIdx.x / 32] = sum;
    smem_count[threadIdx.x / 32] = count;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    sum = 0;
    count = 0;
    for (int w = 0; w < kReduceThreads / 32; ++w) {
      sum += smem_sum[w];
      count += smem_count[w];
    }
    if constexpr (kCount) *n_valid = count;
    // mean over zero counted rows is 0/0 = nan, as in torch
    if constexpr (kLoss) *loss = static_cast<scalar_t>(reduction == kMean ? sum / static_cast<double>(count) : sum);
  }
}

// ---- host launchers --------------------------------------------------------------------------------

void launch_rows_forward(const at::Tensor& logits, const at::Tensor& targets, int64_t ignore_index,
                         const at::Tensor& row_losses, const at::Tensor& lse, bool write_grad,
                         const at::Tensor& n_valid, int64_t reduction) {
  const int64_t B = logits.size(0), V = logits.size(1);
  if (B == 0) return;
  const cudaStream_t stream = cuda::current_stream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "cross_entropy_forward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    AT_DISPATCH_INDEX_TYPES(targets.scalar_type(), "cross_entropy_forward_cuda", [&] {
      dispatch_threads_per_row(V, [&](auto tpr) {
        constexpr int kTPR = decltype(tpr)::value;
        // The kernel writes the logits only with write_grad (linear_cross_entropy's own chunk buffer).
        scalar_t* x = write_grad ? logits.mutable_data_ptr<scalar_t>()
                                 : const_cast<scalar_t*>(logits.const_data_ptr<scalar_t>());
        constexpr auto kernel = cross_entropy_forward_kernel<scalar_t, index_t, kTPR>;
        cuda::launch(kernel, row_blocks(B, RowLaunch<kTPR>::kRows), RowLaunch<kTPR>::kThreads, 0, stream,
                x, targets.const_data_ptr<index_t>(), B, V, ignore_index, row_losses.mutable_data_ptr<acc_t>(),
                lse.mutable_data_ptr<double>(), write_grad,
                n_valid.defined() ? n_valid.const_data_ptr<int64_t>() : nullptr, reduction);
      });
    });
  });
}

}  // namespace

void cross_entropy_rows_forward_cuda(const at::Tensor& logits, const at::Tensor& targets, int64_t ignore_index,
                                     const at::Tensor& row_losses, const at::Tensor& lse, bool write_grad,
                                     const at::Tensor& n_valid, int64_t reduction) {
  TORCH_CHECK(!write_grad || reduction != kMean || n_valid.defined(), "cross_entropy: mean needs n_valid");
  launch_rows_forward(logits, targets, ignore_index, row_losses, lse, write_grad, n_valid, reduction);
}

void cross_entropy_rows_backward_cuda(const at::Tensor& logits, const at::Tensor& targets, const at::Tensor& lse,
                                      const at::Tensor& grad_loss, const at::Tensor& n_valid, int64_t reduction,
                                      int64_t ignore_index, const at::Tensor& grad) {
  const int64_t B = logits.size(0), V = logits.size(1);
  if (B == 0) return;
  TORCH_CHECK(reduction != kMean || n_valid.defined(), "cross_entropy: mean needs n_valid");
  const cudaStream_t stream = cuda::current_stream();
  const int64_t grad_stride = reduction == kNone ? grad_loss.stride(0) : 0;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "cross_entropy_backward_cuda", [&] {
    AT_DISPATCH_INDEX_TYPES(targets.scalar_type(), "cross_entropy_backward_cuda", [&] {
      dispatch_threads_per_row(V, [&](auto tpr) {
        constexpr int kTPR = decltype(tpr)::value;
        constexpr auto kernel = cross_entropy_backward_kernel<scalar_t, index_t, kTPR>;
        cuda::launch(kernel, row_blocks(B, RowLaunch<kTPR>::kRows), RowLaunch<kTPR>::kThreads, 0, stream,
                logits.const_data_ptr<scalar_t>(), targets.const_data_ptr<index_t>(), lse.const_data_ptr<double>(),
                grad_loss.const_data_ptr<scalar_t>(), grad_stride,
                n_valid.defined() ? n_valid.const_data_ptr<int64_t>() : nullptr, reduction, B, V, ignore_index,
                grad.mutable_data_ptr<scalar_t>());
      });
    });
  });
}

void cross_entropy_reduce_cuda(const at::Tensor& targets, int64_t ignore_index, int64_t reduction,
                               const at::Tensor& row_losses, const at::Tensor& loss, const at::Tensor& n_valid) {
  const int64_t B = targets.size(0);
  TORCH_CHECK(loss.defined() || n_valid.defined(), "cross_entropy_reduce_cuda: nothing to compute");
  TORCH_CHECK(!loss.defined() || row_losses.defined(), "cross_entropy_reduce_cuda: the loss needs row_losses");
  const cudaStream_t stream = cuda::current_stream();
  // The loss dtype picks the kernel; a count-only call (no loss) uses the float one.
  const at::ScalarType dtype = loss.defined() ? loss.scalar_type() : at::kFloat;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "cross_entropy_reduce_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    AT_DISPATCH_INDEX_TYPES(targets.scalar_type(), "cross_entropy_reduce_cuda", [&] {
      auto run = [&](auto with_loss, auto with_count) {
        constexpr bool kLoss = decltype(with_loss)::value, kCount = decltype(with_count)::value;
        cuda::launch(reduce_rows_kernel<scalar_t, index_t, kLoss, kCount>, 1, kReduceThreads, 0, stream,
            targets.const_data_ptr<index_t>(), B, ignore_index, reduction,
            kLoss ? row_losses.const_data_ptr<acc_t>() : nullptr, kLoss ? loss.mutable_data_ptr<scalar_t>() : nullptr,
            kCount ? n_valid.mutable_data_ptr<int64_t>() : nullptr);
      };
      if (!loss.defined()) {
        run(std::false_type{}, std::true_type{});
      } else if (n_valid.defined()) {
        run(std::true_type{}, std::true_type{});
      } else {
        run(std::true_type{}, std::false_type{});
      }
    });
  });
}

namespace {

// ---- the registered CUDA kernels -------------------------------------------------------------------

std::tuple<at::Tensor, at::Tensor> cross_entropy_forward_cuda(const at::Tensor& logits_, const at::Tensor& targets_,
                                                              int64_t reduction, int64_t ignore_index) {
  int64_t B, V;
  std::tie(B, V) = check_cross_entropy_args(logits_, targets_, reduction, /*allow_half=*/true);
  const cuda::DeviceGuard guard(logits_.device());
  const at::Tensor logits = logits_.contiguous();  // logits is (B, V)
  const at::Tensor targets = targets_.contiguous();
  const at::ScalarType acc_type = at::toOpMathType(logits.scalar_type());
  at::Tensor loss = reduction == kNone ? at::empty({B}, logits.options()) : at::empty({}, logits.options());
  at::Tensor lse = at::empty({B}, logits.options().dtype(at::kDouble));
  // Per-row losses go straight to the output for "none" when it has the accumulation dtype.
  const bool direct = reduction == kNone && acc_type == logits.scalar_type();
  at::Tensor row_losses = direct ? loss : at::empty({B}, logits.options().dtype(acc_type));
  launch_rows_forward(logits, targets, ignore_index, row_losses, lse, /*write_grad=*/false, at::Tensor(), reduction);
  if (reduction != kNone) {
    cross_entropy_reduce_cuda(targets, ignore_index, reduction, row_losses, loss, at::Tensor());
  } else if (!direct) {
    loss.copy_(row_losses);
  }
  return {loss, lse};
}

at::Tensor cross_entropy_backward_cuda(const at::Tensor& grad_loss, const at::Tensor& logits_,
                                       const at::Tensor& targets_, const at::Tensor& lse_, int64_t reduction,
                                       int64_t ignore_index) {
  int64_t B, V;
  std::tie(B, V) = check_cross_entropy_args(logits_, targets_, reduction, /*allow_half=*/true);
  check_backward_args(grad_loss, lse_, logits_, "logits", B, reduction);
  const cuda::DeviceGuard guard(logits_.device());
  const at::Tensor logits = logits_.contiguous();
  const at::Tensor targets = targets_.contiguous();
  const at::Tensor lse = lse_.contiguous();
  at::Tensor grad = at::empty({B, V}, logits.options());  // grad is (B, V)
  if (B == 0) return grad;
  at::Tensor n_valid;
  if (reduction == kMean) {
    n_valid = at::empty({1}, targets.options().dtype(at::kLong));
    cross_entropy_reduce_cuda(targets, ignore_index, reduction, at::Tensor(), at::Tensor(), n_valid);
  }
  cross_entropy_rows_backward_cuda(logits, targets, lse, grad_loss, n_valid, reduction, ignore_index, grad);
  return grad;
}

}  // namespace
}  // namespace charmlp

CHARMLP_REGISTER_CUDA_KERNELS(m) {
  m.impl("cross_entropy_forward", &charmlp::cross_entropy_forward_cuda);
  m.impl("cross_entropy_backward", &charmlp::cross_entropy_backward_cuda);
}
