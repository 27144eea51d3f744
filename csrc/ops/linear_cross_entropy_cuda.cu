// linear_cross_entropy, CUDA: cross_entropy(h @ W2 + b2, targets) without holding the (B, V) logits.
//
// Two paths, chosen by size:
//  * small (V <= 128, B <= 4096, W2 fits in shared memory; the seed: B = 32, H = 200, V = 27): one kernel. W2 and
//    b2 sit in shared memory; a warp per row computes the row's logits, online log-sum-exp, loss and gradient
//    d = g (softmax - onehot), then grad_h[row] = d @ W2^T; each block accumulates h^T d and the column sums of d
//    over its rows in shared memory and writes them as one partial grad_W2 | grad_b2, which a second kernel sums
//    over blocks in a fixed order (deterministic, no atomics). No cuBLAS, no buffer of logits.
//  * otherwise (word level: B = 8192, H = 100, V = 17000): chunks of rows. Per chunk, cuBLAS writes the logits
//    into one reusable (rows, V) buffer (at::addmm_out), cross_entropy's row kernel turns them in place into loss,
//    lse and gradient D, and two more GEMMs consume D: grad_h[chunk] = D @ W2^T and [grad_W2; grad_b2] +=
//    [h | 1][chunk]^T @ D (the column of ones folds grad_b2's column sums into the GEMM instead of another pass
//    over D). Extra memory: the chunk (<= 32 MiB of float32, sized to stay in an H100's 50 MB L2 between the
//    GEMM that writes it and the kernels that read it), plus O(B + H V).
//    Floor: the three GEMMs, 3 x 2 B H V FLOP (3 x 27.9 GFLOP at word level); on an H100 (67 TFLOP/s FP32, or
//    TF32 tensor cores when torch.backends.cuda.matmul.allow_tf32 is set, which at::mm honours) that is
//    ~1.25 ms in FP32, plus one read and one write of each chunk by the row kernel.
//
// Forward with compute_grad (mean/sum under autograd) produces the gradients for grad_loss = 1 in the same pass
// (3 GEMMs for forward + backward); the backward op recomputes the logits from the saved lse (4 GEMMs), for
// reduction="none" whose per-row incoming gradient only the backward knows.
// bf16/fp16 inputs are upcast to float32 (h, W2, b2 are small next to the (B, V) work) and the results cast back.
// The softmax row of the small path is cuda/softmax_row.cuh's (the numerics of cross_entropy's row kernels, which the
// chunked path runs as they are).
// Tested on the CPU emulator (csrc/cuda/cuda_utils.cuh): both paths (the chunked one's GEMMs run as CPU ops there) and
// the opt-in shared memory of the small one; only a GPU shows cuBLAS's own numerics and the timing.
#include "cuda/cuda_utils.cuh"  // first: see its header
#include "common/ceil_div.h"
#include "cuda/reduce.cuh"
#include "cuda/softmax_row.cuh"
#include "ops/cross_entropy.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/macros/Macros.h>
#include <torch/library.h>

#include <algorithm>
#include <climits>
#include <cstdint>
#include <type_traits>

namespace charmlp {
namespace {

// ---- sizes -----------------------------------------------------------------------------------------

constexpr int kSmallThreads = 256;
constexpr int kSmallWarps = kSmallThreads / 32;      // rows per tile: a warp per row
constexpr int64_t kSmallMaxV = 128;                  // <= 4 columns per lane
constexpr int64_t kSmallMaxB = 4096;                 // beyond, cuBLAS's GEMMs beat the shared-memory loops
constexpr size_t kSmallMaxSmem = 96 * 1024;          // opt-in shared memory available on sm_80 and later
constexpr int64_t kChunkElems = int64_t(1) << 23;    // logits per chunk: 32 MiB of float32
constexpr int64_t kMinChunkRows = 256;               // keeps each chunk's GEMMs large, whatever V

int64_t chunk_rows(int64_t B, int64_t V) {
  const int64_t rows = std::max(kMinChunkRows, kChunkElems / V) / 8 * 8;  // multiples of 8 keep h's rows aligned
  return std::min(B, rows);
}

// Shared-memory layout of the small kernel, in elements: W2 padded to kC * 32 columns with an odd row stride
// (conflict-free both when a warp reads a row of W2 and when it reads a column), b2, this block's grad_W2 | grad_b2
// accumulator (with gradients), the tile's rows of h and of the gradient d.
struct SmallLayout {
  int64_t ldw, b2, gw, h, d, total;
};

SmallLayout small_layout(int64_t H, int64_t V, int kC, bool with_grad) {
  SmallLayout l;
  const int64_t vp = 32 * kC;
  l.ldw = vp + 1;
  l.b2 = H * l.ldw;
  l.gw = l.b2 + vp;
  l.h = l.gw + (with_grad ? H * V + V : 0);
  l.d = l.h + kSmallWarps * H;
  l.total = l.d + kSmallWarps * vp;
  return l;
}

template <typename F>
void dispatch_columns_per_lane(int64_t V, F&& f) {
  if (V <= 32) {
    f(std::integral_constant<int, 1>{});
  } else if (V <= 64) {
    f(std::integral_constant<int, 2>{});
  } else if (V <= 96) {
    f(std::integral_constant<int, 3>{});
  } else {
    f(std::integral_constant<int, 4>{});
  }
}

int columns_per_lane(int64_t V) { return static_cast<int>(ceil_div(V, 32)); }

// Sized for the layout with gradients whether or not this call computes them: the two paths round differently, and
// the loss must not depend on compute_grad (a forward-only call would otherwise fit sizes the other does not).
bool use_small_path(int64_t B, int64_t H, int64_t V, size_t elem_size) {
  if (V > kSmallMaxV || B > kSmallMaxB) return false;
  const size_t bytes = small_layout(H, V, columns_per_lane(V), /*with_grad=*/true).total * elem_size;
  return bytes <= std::min(kSmallMaxSmem, cuda::device_properties()->sharedMemPerBlockOptin);
}

// ---- kernels ---------------------------------------------------------------------------------------

// The small path. Forward mode (!kBackward): row_losses, lse and, with_grad, the gradients for grad_loss = 1.
// Backward mode: the gradients for grad_loss (the logits and their lse are recomputed here; with_grad is true).
// h (B, H), W2 (H, V), b2 (V) contiguous; grad_h (B, H); partial (gridDim.x, H * V + V).
// Over 80 lines, kept as one body whose stages are marked by comments: the stages of a tile (h rows, logits, softmax
// row, d, grad_h, the block's h^T d) share the warp's registers (the row's z[kC], t, g) and the block's tiles in
// shared memory, and ptxas's allocation of this kernel is tight: its float64 instantiations spill at 64 registers,
// by amounts that move with small rewrites of this body (benchmarks/kernel_resources.py). The softmax row is written
// out rather than through cuda::warp_row_grad's callback, which put the float32 kC = 3 instantiation into spills.
template <typename scalar_t, typename index_t, int kC, bool kBackward>
__global__ void __launch_bounds__(kSmallThreads) linear_cross_entropy_small_kernel(
    const scalar_t* __restrict__ h, const scalar_t* __restrict__ W2, const scalar_t* __restrict__ b2,
    const index_t* __restrict__ targets, int64_t B, int64_t H, int64_t V, int64_t rows_per_block, int64_t reduction,
    int64_t ignore_index, const scalar_t* __restrict__ grad_loss, int64_t grad_stride, bool with_grad,
    scalar_t* __restrict__ row_losses, double* __restrict__ lse, scalar_t* __restrict__ grad_h,
    scalar_t* __restrict__ partial) {
  constexpr int kVP = 32 * kC;  // V padded to whole warps
  const int64_t ldw = kVP + 1;
  const int64_t HV = H * V;
  CHARMLP_DYNAMIC_SHARED(unsigned char, smem_raw, 16);
  scalar_t* smem = reinterpret_cast<scalar_t*>(smem_raw);
  scalar_t* W2s = smem;                                                  // (H, ldw), 0 beyond column V
  scalar_t* b2s = W2s + H * ldw;                                         // (kVP), 0 beyond V
  scalar_t* gWs = b2s + kVP;                                             // (H * V + V) with_grad
  scalar_t* hs = gWs + (with_grad ? HV + V : 0);                         // (kSmallWarps, H)
  scalar_t* ds = hs + kSmallWarps * H;                                   // (kSmallWarps, kVP)
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;

  for (int64_t e = threadIdx.x; e < H * ldw; e += kSmallThreads) {
    const int64_t k = e / ldw, j = e - k * ldw;
    W2s[e] = j < V ? W2[k * V + j] : scalar_t(0);
  }
  for (int64_t j = threadIdx.x; j < kVP; j += kSmallThreads) b2s[j] = j < V ? b2[j] : scalar_t(0);
  if (with_grad) {
    for (int64_t e = threadIdx.x; e < HV + V; e += kSmallThreads) gWs[e] = 0;
  }
  // The divisor of mean: every block counts all targets itself (B <= kSmallMaxB), saving a launch.
  int64_t n_valid = 0;
  if (reduction == kMean) {
    for (int64_t base = 0; base < B; base += kSmallThreads) {
      const int64_t i = base + threadIdx.x;
      n_valid += __syncthreads_count(i < B && static_cast<int64_t>(targets[i]) != ignore_index);
    }
  }
  __syncthreads();

  const int64_t row_begin = static_cast<int64_t>(blockIdx.x) * rows_per_block;
  const int64_t row_end = min(B, row_begin + rows_per_block);
  for (int64_t tile = row_begin; tile < row_end; tile += kSmallWarps) {
    const int64_t i = tile + warp;  // this warp's row
    const bool active = i < row_end;
    const int64_t t = row_target(targets, i, active, V, ignore_index);
    const bool counted = t != ignore_index;
    scalar_t* h_row = hs + warp * H;
    for (int64_t k = lane; k < H; k += 32) h_row[k] = active ? h[i * H + k] : scalar_t(0);
    __syncwarp();

    // logits z of the lane's columns j = lane + 32 c
    scalar_t z[kC];
#pragma unroll
    for (int c = 0; c < kC; ++c) z[c] = b2s[lane + 32 * c];
    for (int64_t k = 0; k < H; ++k) {
      const scalar_t hk = h_row[k];
      const scalar_t* w = W2s + k * ldw + lane;
#pragma unroll
      for (int c = 0; c < kC; ++c) z[c] += hk * w[32 * c];
    }
    OnlineLse<scalar_t> st = lse_init<scalar_t>();
#pragma unroll
    for (int c = 0; c < kC; ++c) {
      if (lane + 32 * c < V) st = lse_add(st, z[c], lane + 32 * c == t);
    }
    scalar_t loss = 0;
    double lse_i = 0;
    if (counted) {  // uniform over the warp
      scalar_t z_t = z[0];
#pragma unroll
      for (int c = 1; c < kC; ++c) z_t = t / 32 == c ? z[c] : z_t;
      const scalar_t x_t = __shfl_sync(cuda::kFullMask, z_t, static_cast<int>(t % 32));
      const RowResult<scalar_t> r = cuda::warp_row_result<32>(st, x_t);
      loss = r.loss;
      lse_i = r.lse;
    }
    if (!kBackward && active && lane == 0) {
      row_losses[i] = loss;
      lse[i] = lse_i;
    }
    if (!with_grad) continue;  // uniform over the grid

    // d = g (softmax - onehot); the target's entry -g sum_{j != t} softmax_j (exact where softmax_t - 1 cancels)
    scalar_t g = 0;
    if (counted) {
      g = !kBackward
              ? (reduction == kMean ? scalar_t(1) / static_cast<scalar_t>(n_valid) : scalar_t(1))
              : row_grad_scale(reduction, grad_loss[reduction == kNone ? i * grad_stride : 0], n_valid);
    }
    // The steps of cuda::warp_row_grad, written out: through its callback the kC registers of z and p end up in
    // local memory (ptxas: spills in every double instantiation). A lane's columns beyond V, and every column of a
    // row that is not counted (its lse is 0: exp(z) could overflow), get 0 rather than the softmax.
    const SplitLse<scalar_t> l = split_lse<scalar_t>(lse_i);
    scalar_t p[kC];
    scalar_t sum = 0;
#pragma unroll
    for (int c = 0; c < kC; ++c) {
      const int64_t j = lane + 32 * c;
      p[c] = counted && j < V ? softmax_prob_excl(z[c], j == t, l) : scalar_t(0);
      sum += p[c];
    }
    sum = cuda::warp_sum(sum);
    scalar_t* d_row = ds + warp * kVP;
#pragma unroll
    for (int c = 0; c < kC; ++c) {
      const int64_t j = lane + 32 * c;
      d_row[j] = counted && j == t ? target_grad(sum, g) : p[c] * g;
    }
    __syncwarp();
    // grad_h[i, k] = sum_j d_j W2[k, j]
    if (active) {
      for (int64_t k = lane; k < H; k += 32) {
        const scalar_t* w = W2s + k * ldw;
        scalar_t acc = 0;
        for (int64_t j = 0; j < V; ++j) acc += d_row[j] * w[j];
        grad_h[i * H + k] = acc;
      }
    }
    __syncthreads();  // the tile's rows of h and d are complete
    // this block's grad_W2 += h_tile^T d_tile and grad_b2 += column sums of d_tile; each thread owns its entries
    for (int64_t e = threadIdx.x; e < HV + V; e += kSmallThreads) {
      scalar_t acc = 0;
      if (e < HV) {
        const int64_t k = e / V, j = e - k * V;
#pragma unroll
        for (int w = 0; w < kSmallWarps; ++w) acc += hs[w * H + k] * ds[w * kVP + j];
      } else {
#pragma unroll
        for (int w = 0; w < kSmallWarps; ++w) acc += ds[w * kVP + (e - HV)];
      }
      gWs[e] += acc;
    }
    __syncthreads();  // before the next tile overwrites hs and ds
  }
  if (with_grad) {
    scalar_t* out = partial + static_cast<int64_t>(blockIdx.x) * (HV + V);
    for (int64_t e = threadIdx.x; e < HV + V; e += kSmallThreads) out[e] = gWs[e];
  }
}

// grad_W2 | grad_b2 = sum over blocks of the partials, in block order (deterministic).
template <typename scalar_t>
__global__ void sum_partials_kernel(const scalar_t* __restrict__ partial, int64_t n_parts, int64_t HV, int64_t V,
                                    scalar_t* __restrict__ grad_W2, scalar_t* __restrict__ grad_b2) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < HV + V; e += stride) {
    scalar_t s = 0;
    for (int64_t b = 0; b < n_parts; ++b) s += partial[b * (HV + V) + e];
    if (e < HV) {
      grad_W2[e] = s;
    } else {
      grad_b2[e - HV] = s;
    }
  }
}

// ---- host: the two paths (float32 / float64; half types are upcast by the callers) -----------------

struct Grads {
  at::Tensor h, W2, b2;
};

// The small path. Forward mode (grad_loss undefined): fills row_losses, lse and, with_grad, grads. Backward mode:
// fills grads for grad_loss.
void small_path(const at::Tensor& h_, const at::Tensor& W2_, const at::Tensor& b2_, const at::Tensor& targets,
                int64_t reduction, int64_t ignore_index, const at::Tensor& grad_loss, bool with_grad,
                const at::Tensor& row_losses, const at::Tensor& lse, Grads& grads) {
  const int64_t B = h_.size(0), H = h_.size(1), V = W2_.size(1);
  const at::Tensor h = h_.contiguous(), W2 = W2_.contiguous(), b2 = b2_.contiguous();
  const int num_sms = cuda::device_properties()->multiProcessorCount;
  // enough rows per block to give every SM about one block, in whole tiles (B > 0)
  const int64_t rows_per_block = ceil_div(ceil_div(B, num_sms), kSmallWarps) * kSmallWarps;
  const int64_t blocks = std::max<int64_t>(1, ceil_div(B, rows_per_block));
  const cudaStream_t stream = cuda::current_stream();
  at::Tensor partial = with_grad ? at::empty({blocks, H * V + V}, h.options()) : at::Tensor();

  AT_DISPATCH_FLOATING_TYPES(h.scalar_type(), "linear_cross_entropy_small_cuda", [&] {
    AT_DISPATCH_INDEX_TYPES(targets.scalar_type(), "linear_cross_entropy_small_cuda", [&] {
      const bool forward = !grad_loss.defined();
      dispatch_columns_per_lane(V, [&](auto cpl) {
        constexpr int kC = decltype(cpl)::value;
        auto kernel = forward ? linear_cross_entropy_small_kernel<scalar_t, index_t, kC, false>
                              : linear_cross_entropy_small_kernel<scalar_t, index_t, kC, true>;
        const size_t smem = small_layout(H, V, kC, with_grad).total * sizeof(scalar_t);
        if (smem > 48 * 1024) {  // above the default limit, shared memory must be opted into per kernel
          CHARMLP_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                              static_cast<int>(smem)));
        }
        cuda::launch(kernel, static_cast<unsigned int>(blocks), kSmallThreads, smem, stream,
            h.const_data_ptr<scalar_t>(), W2.const_data_ptr<scalar_t>(), b2.const_data_ptr<scalar_t>(),
            targets.const_data_ptr<index_t>(), B, H, V, rows_per_block, reduction, ignore_index,
            forward ? nullptr : grad_loss.const_data_ptr<scalar_t>(),
            forward || reduction != kNone ? 0 : grad_loss.stride(0), with_grad,
            forward ? row_losses.mutable_data_ptr<scalar_t>() : nullptr,
            forward ? lse.mutable_data_ptr<double>() : nullptr,
            with_grad ? grads.h.mutable_data_ptr<scalar_t>() : nullptr,
            with_grad ? partial.mutable_data_ptr<scalar_t>() : nullptr);
      });
      if (with_grad) {
        const int threads = 256;
        const int64_t n = H * V + V;
        const unsigned int sum_blocks = static_cast<unsigned int>(std::min<int64_t>(ceil_div(n, threads), 1024));
        cuda::launch(sum_partials_kernel<scalar_t>, sum_blocks, threads, 0, stream,
            partial.const_data_ptr<scalar_t>(), blocks, H * V, V, grads.W2.mutable_data_ptr<scalar_t>(),
            grads.b2.mutable_data_ptr<scalar_t>());
      }
    });
  });
}

// The chunked cuBLAS path. Forward mode (grad_loss undefined): row_losses, lse and, with_grad, the gradients for
// grad_loss = 1. Backward mode: the gradients for grad_loss, from the saved lse.
void chunked_path(const at::Tensor& h, const at::Tensor& W2, const at::Tensor& b2, const at::Tensor& targets,
                  int64_t reduction, int64_t ignore_index, const at::Tensor& grad_loss, const at::Tensor& saved_lse,
                  bool with_grad, const at::Tensor& row_losses, const at::Tensor& lse, Grads& grads) {
  const int64_t B = h.size(0), H = h.size(1), V = W2.size(1);
  const bool forward = !grad_loss.defined();
  at::Tensor n_valid;
  if (reduction == kMean && with_grad) {
    n_valid = at::empty({1}, targets.options().dtype(at::kLong));
    cross_entropy_reduce_cuda(targets, ignore_index, reduction, at::Tensor(), at::Tensor(), n_valid);
  }
  at::Tensor h_aug, grad_Wb;  // h_aug is (B, Hp) = [h | 1 | 0...], grad_Wb (Hp, V) = [grad_W2; grad_b2; 0...]
  if (with_grad) {
    const int64_t Hp = ceil_div(H + 1, 4) * 4;  // rows of 16 bytes (float32) for cuBLAS
    h_aug = at::constant_pad_nd(h, {0, Hp - H}, 0);
    h_aug.select(1, H).fill_(1);
    grad_Wb = at::empty({Hp, V}, h.options());
    if (B == 0) grad_Wb.zero_();
  }
  const int64_t R = chunk_rows(B, V);
  at::Tensor buf = at::empty({R, V}, h.options());  // buf is (R, V): a chunk of logits, then of their gradient
  for (int64_t r0 = 0; r0 < B; r0 += R) {
    const int64_t n = std::min(R, B - r0);
    at::Tensor logits = row_slice(buf, 0, n);  // logits is (n, V)
    at::addmm_out(logits, b2, row_slice(h, r0, n), W2);
    const at::Tensor targets_c = row_slice(targets, r0, n);
    if (forward) {
      cross_entropy_rows_forward_cuda(logits, targets_c, ignore_index, row_slice(row_losses, r0, n),
                                      row_slice(lse, r0, n), with_grad, n_valid, reduction);
    } else {
      const at::Tensor g = reduction == kNone ? row_slice(grad_loss, r0, n) : grad_loss;
      cross_entropy_rows_backward_cuda(logits, targets_c, row_slice(saved_lse, r0, n), g, n_valid, reduction,
                                       ignore_index, logits);
    }
    if (!with_grad) continue;
    at::Tensor grad_h_c = row_slice(grads.h, r0, n);
    at::mm_out(grad_h_c, logits, W2.t());
    const at::Tensor h_aug_c = row_slice(h_aug, r0, n);
    if (r0 == 0) {
      at::mm_out(grad_Wb, h_aug_c.t(), logits);
    } else {
      grad_Wb.addmm_(h_aug_c.t(), logits);
    }
  }
  if (with_grad) {
    grads.W2 = grad_Wb.narrow(0, 0, H);  // contiguous rows of grad_Wb
    grads.b2 = grad_Wb.select(0, H).clone();
  }
}

// ---- the registered CUDA kernels -------------------------------------------------------------------

bool is_half(const at::Tensor& t) { return t.scalar_type() == at::kHalf || t.scalar_type() == at::kBFloat16; }

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> linear_cross_entropy_forward_cuda(
    const at::Tensor& h, const at::Tensor& W2, const at::Tensor& b2, const at::Tensor& targets_, int64_t reduction,
    int64_t ignore_index, bool compute_grad) {
  check_linear_cross_entropy_args(h, W2, b2, targets_, reduction, /*allow_half=*/true);
  const int64_t B = h.size(0), H = h.size(1), V = W2.size(1);
  const cuda::DeviceGuard guard(h.device());
  if (is_half(h)) {
    const auto dtype = h.scalar_type();
    auto [loss, lse, gh, gW, gb] = linear_cross_entropy_forward_cuda(
        h.to(at::kFloat), W2.to(at::kFloat), b2.to(at::kFloat), targets_, reduction, ignore_index, compute_grad);
    return {loss.to(dtype), lse, gh.to(dtype), gW.to(dtype), gb.to(dtype)};
  }
  const at::Tensor targets = targets_.contiguous();
  at::Tensor loss = reduction == kNone ? at::empty({B}, h.options()) : at::empty({}, h.options());
  at::Tensor lse = at::empty({B}, h.options().dtype(at::kDouble));
  at::Tensor row_losses = reduction == kNone ? loss : at::empty({B}, h.options());
  Grads grads;  // grad_W2 and grad_b2 are allocated by the path (the chunked one slices them from one GEMM output)
  if (compute_grad) grads.h = at::empty({B, H}, h.options());
  if (use_small_path(B, H, V, h.element_size())) {
    if (compute_grad) {  // written whole by the kernels, unless the batch is empty
      grads.W2 = B > 0 ? at::empty({H, V}, h.options()) : at::zeros({H, V}, h.options());
      grads.b2 = B > 0 ? at::empty({V}, h.options()) : at::zeros({V}, h.options());
    }
    if (B > 0) {
      small_path(h, W2, b2, targets, reduction, ignore_index, at::Tensor(), compute_grad, row_losses, lse, grads);
    }
  } else {
    chunked_path(h, W2, b2, targets, reduction, ignore_index, at::Tensor(), at::Tensor(), compute_grad, row_losses,
                 lse, grads);
  }
  if (reduction != kNone) cross_entropy_reduce_cuda(targets, ignore_index, reduction, row_losses, loss, at::Tensor());
  if (!compute_grad) {
    grads.h = at::empty({0}, h.options());
    grads.W2 = at::empty({0}, h.options());
    grads.b2 = at::empty({0}, h.options());
  }
  return {loss, lse, grads.h, grads.W2, grads.b2};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_cross_entropy_backward_cuda(
    const at::Tensor& grad_loss, const at::Tensor& h, const at::Tensor& W2, const at::Tensor& b2,
    const at::Tensor& targets_, const at::Tensor& lse_, int64_t reduction, int64_t ignore_index) {
  check_linear_cross_entropy_args(h, W2, b2, targets_, reduction, /*allow_half=*/true);
  const int64_t B = h.size(0), H = h.size(1), V = W2.size(1);
  check_backward_args(grad_loss, lse_, h, "h", B, reduction);
  const cuda::DeviceGuard guard(h.device());
  if (is_half(h)) {
    const auto dtype = h.scalar_type();
    auto [gh, gW, gb] = linear_cross_entropy_backward_cuda(grad_loss.to(at::kFloat), h.to(at::kFloat),
                                                           W2.to(at::kFloat), b2.to(at::kFloat), targets_, lse_,
                                                           reduction, ignore_index);
    return {gh.to(dtype), gW.to(dtype), gb.to(dtype)};
  }
  const at::Tensor targets = targets_.contiguous();
  const at::Tensor lse = lse_.contiguous();
  Grads grads;  // grad_W2 and grad_b2 are allocated by the path (the chunked one slices them from one GEMM output)
  grads.h = at::empty({B, H}, h.options());
  if (use_small_path(B, H, V, h.element_size())) {
    grads.W2 = B > 0 ? at::empty({H, V}, h.options()) : at::zeros({H, V}, h.options());
    grads.b2 = B > 0 ? at::empty({V}, h.options()) : at::zeros({V}, h.options());
    if (B > 0) {
      small_path(h, W2, b2, targets, reduction, ignore_index, grad_loss, /*with_grad=*/true, at::Tensor(),
                 at::Tensor(), grads);
    }
  } else {
    chunked_path(h, W2, b2, targets, reduction, ignore_index, grad_loss, lse, /*with_grad=*/true, at::Tensor(),
                 at::Tensor(), grads);
  }
  return {grads.h, grads.W2, grads.b2};
}

}  // namespace
}  // namespace charmlp

CHARMLP_REGISTER_CUDA_KERNELS(m) {
  m.impl("linear_cross_entropy_forward", &charmlp::linear_cross_entropy_forward_cuda);
  m.impl("linear_cross_entropy_backward", &charmlp::linear_cross_entropy_backward_cuda);
}
