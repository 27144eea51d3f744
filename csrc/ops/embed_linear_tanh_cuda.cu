// embed_linear_tanh on CUDA: h = tanh(C[idx].view(B, K) @ W1 + b1), K = T*E, and its backward.
//
// Forward, one kernel. Each CTA owns a (64 rows of B) x (64 columns of H) tile of h. Per step of 16 along
// K it stages in shared memory the W1 tile and the embedding tile gathered straight from C through idx
// (the concatenated (B, K) tensor never exists in memory), and every thread accumulates a 4x4 register
// tile in fp32 (fp64 for double); the epilogue adds b1, applies tanh and stores. One launch: at the seed's
// size (B=32) it is a handful of CTAs and the cost is launch latency; at big batch (B=65,536, K=30,
// H=200) it is bound by writing h.
//
// Backward, four kernels, none of them cuBLAS (so deterministic mode needs no CUBLAS_WORKSPACE_CONFIG):
//   1. grad_pre (B, H) = grad_h * (1 - h^2), once, in the accumulation type.
//   2. grad_W1 and grad_b1 as one split-B GEMM: partial[s] (K+1, H) = emb_aug^T @ grad_pre over the rows
//      of split s, where emb_aug is the gathered embedding with an extra column of ones (its row of the
//      product is grad_b1). 3. sums the splits in a fixed order: deterministic without atomics.
//   4. grad_emb = grad_pre @ W1^T as a tiled GEMM whose epilogue scatter-adds into grad_C with atomics;
//      under torch.use_deterministic_algorithms(True) it writes grad_emb (B, K) instead, and grad_C comes
//      from ATen's embedding_dense_backward (sorted indices, fixed-order segment sums).
// bf16/fp16 inputs are accumulated in fp32 throughout; the results are cast back at the end.
// Tested on the CPU emulator (csrc/cuda/cuda_utils.cuh): every tile shape, the split-B reduction, the atomic and the
// deterministic grad_C; only a GPU shows the atomics' real interleaving and the timing.
#include "cuda/cuda_utils.cuh"  // first: see its header
#include "ops/embed_linear_tanh.h"

#include <ATen/Context.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/ops/embedding_dense_backward.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <type_traits>

namespace charmlp {
namespace {

// ---- tiling ----------------------------------------------------------------------------------------------
// 256 threads as 16 x 16; each thread owns TM x TN outputs at (ty + 16 i, tx + 16 j) of a (16 TM) x (16 TN)
// tile, so that the shared-memory reads of one warp hit at most two addresses of the A tile (broadcast)
// and 16 consecutive words of the B tile.
constexpr int kThreads = 256;
constexpr int kSide = 16;  // threads per tile side
constexpr int kStep = 16;  // reduction elements staged per __syncthreads pair
constexpr int kWide = 64;  // the wide tile side: 16 threads x 4 outputs

using cuda::ceil_div;

__device__ __forceinline__ float tanh_acc(float x) {
  return tanhf(x);
}
__device__ __forceinline__ double tanh_acc(double x) {
  return tanh(x);
}

// acc[i][j] += sum_s a[s][ty + 16 i] * b[s][tx + 16 j] over one staged step.
template <typename acc_t, int TM, int TN, int LDA, int LDB>
__device__ __forceinline__ void tile_fma(acc_t (&acc)[TM][TN], const acc_t (*a)[LDA], const acc_t (*b)[LDB],
                                         int tx, int ty) {
#pragma unroll
  for (int s = 0; s < kStep; ++s) {
    acc_t av[TM], bv[TN];
#pragma unroll
    for (int i = 0; i < TM; ++i) av[i] = a[s][ty + kSide * i];
#pragma unroll
    for (int j = 0; j < TN; ++j) bv[j] = b[s][tx + kSide * j];
#pragma unroll
    for (int i = 0; i < TM; ++i)
#pragma unroll
      for (int j = 0; j < TN; ++j) acc[i][j] += av[i] * bv[j];
  }
}

// emb[b, k] = C[idx[b, k / E], k % E], asserting the index on the device (no host sync), as torch's
// embedding does.
template <typename acc_t, typename scalar_t, typename index_t>
__device__ __forceinline__ acc_t gather_emb(const index_t* __restrict__ idx, const scalar_t* __restrict__ C,
                                            int64_t b, int64_t k, int64_t T, int64_t E, int64_t V) {
  const ConcatColumn col = concat_column(k, E);
  const int64_t v = idx[b * T + col.t];
  CUDA_KERNEL_ASSERT(v >= 0 && v < V && "embed_linear_tanh: idx out of range [0, C.size(0))");
  return static_cast<acc_t>(C[v * E + col.e]);
}

// ---- forward -------------------------------------------------------------------------------------------------
// h (B, H): grid (ceil(B / 64), ceil(H / 64)).
template <typename scalar_t, typename index_t>
__global__ void __launch_bounds__(kThreads)
    embed_linear_tanh_forward_kernel(const index_t* __restrict__ idx, const scalar_t* __restrict__ C,
                                     const scalar_t* __restrict__ W1, const scalar_t* __restrict__ b1,
                                     scalar_t* __restrict__ h, int64_t B, int64_t T, int64_t E, int64_t K,
                                     int64_t H, int64_t V) {
  using acc_t = at::opmath_type<scalar_t>;
  __shared__ acc_t xs[kStep][kWide];  // xs[k][r] = emb[b0 + r, k0 + k]: the gathered rows, transposed
  __shared__ acc_t ws[kStep][kWide];  // ws[k][n] = W1[k0 + k, n0 + n]
  const int tx = threadIdx.x % kSide, ty = threadIdx.x / kSide;
  const int64_t b0 = int64_t(blockIdx.x) * kWide;
  const int64_t n0 = int64_t(blockIdx.y) * kWide;
  acc_t acc[4][4] = {};
  for (int64_t k0 = 0; k0 < K; k0 += kStep) {
    for (int l = threadIdx.x; l < kStep * kWide; l += kThreads) {
      const int kk = l / kWide, c = l % kWide;  // consecutive threads: consecutive rows / columns
      const int64_t k = k0 + kk, b = b0 + c, n = n0 + c;
      xs[kk][c] = (k < K && b < B) ? gather_emb<acc_t>(idx, C, b, k, T, E, V) : acc_t(0);
      ws[kk][c] = (k < K && n < H) ? static_cast<acc_t>(W1[k * H + n]) : acc_t(0);
    }
    __syncthreads();
    tile_fma<acc_t, 4, 4, kWide, kWide>(acc, xs, ws, tx, ty);
    __syncthreads();
  }
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int64_t b = b0 + ty + kSide * i;
    if (b >= B) continue;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int64_t n = n0 + tx + kSide * j;
      if (n < H) h[b * H + n] = static_cast<scalar_t>(tanh_acc(acc[i][j] + static_cast<acc_t>(b1[n])));
    }
  }
}

// ---- backward ------------------------------------------------------------------------------------------------
// 1. grad_pre (B, H) = grad_h * (1 - h^2). grad_h may be strided (an expanded scalar from h.sum(), say).
template <typename scalar_t, typename acc_t>
__global__ void grad_pre_kernel(const scalar_t* __restrict__ grad_h, int64_t gh_s0, int64_t gh_s1,
                                const scalar_t* __restrict__ h, acc_t* __restrict__ grad_pre, int64_t B, int64_t H) {
  const int64_t n_el = B * H;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n_el; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t b = i / H, n = i - (i / H) * H;
    grad_pre[i] = tanh_backward(static_cast<acc_t>(grad_h[b * gh_s0 + n * gh_s1]), static_cast<acc_t>(h[i]));
  }
}

// 2. partial[s] (K+1, H) = emb_aug^T @ grad_pre over rows [s * rows_per_split, ...): row k < K is grad_W1's,
// row K (emb_aug's column of ones) is grad_b1's. grid (ceil(H / 64), ceil((K+1) / (16 TM)), splits).
template <typename scalar_t, typename index_t, int TM>
__global__ void __launch_bounds__(kThreads)
    grad_w1_partial_kernel(const index_t* __restrict__ idx, const scalar_t* __restrict__ C,
                           const at::opmath_type<scalar_t>* __restrict__ grad_pre,
                           at::opmath_type<scalar_t>* __restrict__ partial, int64_t B, int64_t T, int64_t E,
                           int64_t K, int64_t H, int64_t V, int64_t rows_per_split) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int kTileK = kSide * TM;
  __shared__ acc_t as[kStep][kTileK];  // as[r][k] = emb_aug[b + r, k0 + k]
  __shared__ acc_t gs[kStep][kWide];   // gs[r][n] = grad_pre[b + r, n0 + n]
  const int tx = threadIdx.x % kSide, ty = threadIdx.x / kSide;
  const int64_t n0 = int64_t(blockIdx.x) * kWide;
  const int64_t k0 = int64_t(blockIdx.y) * kTileK;
  const int64_t row_begin = int64_t(blockIdx.z) * rows_per_split;
  const int64_t row_end = std::min(B, row_begin + rows_per_split);
  acc_t acc[TM][4] = {};
  for (int64_t r0 = row_begin; r0 < row_end; r0 += kStep) {
    for (int l = threadIdx.x; l < kStep * kTileK; l += kThreads) {
      const int r = l / kTileK, kk = l % kTileK;
      const int64_t b = r0 + r, k = k0 + kk;
      acc_t a = 0;
      if (b < row_end) a = k < K ? gather_emb<acc_t>(idx, C, b, k, T, E, V) : acc_t(k == K ? 1 : 0);
      as[r][kk] = a;
    }
    for (int l = threadIdx.x; l < kStep * kWide; l += kThreads) {
      const int r = l / kWide, c = l % kWide;
      const int64_t b = r0 + r, n = n0 + c;
      gs[r][c] = (b < row_end && n < H) ? grad_pre[b * H + n] : acc_t(0);
    }
    __syncthreads();
    tile_fma<acc_t, TM, 4, kTileK, kWide>(acc, as, gs, tx, ty);
    __syncthreads();
  }
  acc_t* out = partial + int64_t(blockIdx.z) * (K + 1) * H;
#pragma unroll
  for (int i = 0; i < TM; ++i) {
    const int64_t k = k0 + ty + kSide * i;
    if (k > K) continue;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int64_t n = n0 + tx + kSide * j;
      if (n < H) out[k * H + n] = acc[i][j];
    }
  }
}

// 3. grad_W1 (K, H) and grad_b1 (H) = sum over splits of partial, in split order.
template <typename scalar_t, typename acc_t>
__global__ void reduce_splits_kernel(const acc_t* __restrict__ partial, scalar_t* __restrict__ grad_W1,
                                     scalar_t* __restrict__ grad_b1, int64_t splits, int64_t K, int64_t H) {
  const int64_t n_el = (K + 1) * H;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n_el; i += int64_t(gridDim.x) * blockDim.x) {
    acc_t sum = 0;
    for (int64_t s = 0; s < splits; ++s) sum += partial[s * n_el + i];
    if (i < K * H) {
      grad_W1[i] = static_cast<scalar_t>(sum);
    } else {
      grad_b1[i - K * H] = static_cast<scalar_t>(sum);
    }
  }
}

// 4. grad_emb (B, K) = grad_pre @ W1^T; grid (ceil(B / 64), ceil(K / (16 TN))).
// kAtomic: grad_C[idx[b, k / E], k % E] += grad_emb[b, k] right from the registers; otherwise grad_emb is
// written out for the deterministic reduction.
template <typename scalar_t, typename index_t, int TN, bool kAtomic>
__global__ void __launch_bounds__(kThreads)
    grad_emb_kernel(const index_t* __restrict__ idx, const scalar_t* __restrict__ W1,
                    const at::opmath_type<scalar_t>* __restrict__ grad_pre, at::opmath_type<scalar_t>* __restrict__ out,
                    int64_t B, int64_t T, int64_t E, int64_t K, int64_t H) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int kTileK = kSide * TN;
  // +1 column: the staging writes go down columns, which would otherwise all hit one bank.
  __shared__ acc_t gs[kStep][kWide + 1];   // gs[n][r] = grad_pre[b0 + r, n0 + n]
  __shared__ acc_t ws[kStep][kTileK + 1];  // ws[n][k] = W1[k0 + k, n0 + n]
  const int tx = threadIdx.x % kSide, ty = threadIdx.x / kSide;
  const int64_t b0 = int64_t(blockIdx.x) * kWide;
  const int64_t k0 = int64_t(blockIdx.y) * kTileK;
  acc_t acc[4][TN] = {};
  for (int64_t n0 = 0; n0 < H; n0 += kStep) {
    for (int l = threadIdx.x; l < kStep * kWide; l += kThreads) {
      const int r = l / kStep, nn = l % kStep;  // 16 consecutive threads read 16 consecutive columns
      const int64_t b = b0 + r, n = n0 + nn;
      gs[nn][r] = (b < B && n < H) ? grad_pre[b * H + n] : acc_t(0);
    }
    for (int l = threadIdx.x; l < kStep * kTileK; l += kThreads) {
      const int kk = l / kStep, nn = l % kStep;
      const int64_t k = k0 + kk, n = n0 + nn;
      ws[nn][kk] = (k < K && n < H) ? static_cast<acc_t>(W1[k * H + n]) : acc_t(0);
    }
    __syncthreads();
    tile_fma<acc_t, 4, TN, kWide + 1, kTileK + 1>(acc, gs, ws, tx, ty);
    __syncthreads();
  }
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int64_t b = b0 + ty + kSide * i;
    if (b >= B) continue;
#pragma unroll
    for (int j = 0; j < TN; ++j) {
      const int64_t k = k0 + tx + kSide * j;
      if (k >= K) continue;
      if constexpr (kAtomic) {
        const ConcatColumn col = concat_column(k, E);
        const int64_t v = idx[b * T + col.t];  // range-checked by the gathers of the forward and kernel 2
        atomicAdd(out + v * E + col.e, acc[i][j]);
      } else {
        out[b * K + k] = acc[i][j];
      }
    }
  }
}

// ---- host launchers -----------------------------------------------------------------------------------------
// Grid y and z are limited to 65,535 blocks.
void check_grid_dim(int64_t blocks, const char* what, int64_t size, int64_t per_block) {
  TORCH_CHECK(blocks <= 65535, "embed_linear_tanh (CUDA): ", what, " = ", size, " is larger than the kernels support (",
              65535 * per_block, ")");
}

int grid_stride_blocks(int64_t n_el) {
  const int64_t max_blocks = int64_t(cuda::device_properties()->multiProcessorCount) * 8;
  return int(std::max<int64_t>(1, std::min(ceil_div(n_el, kThreads), max_blocks)));
}

at::Tensor embed_linear_tanh_cuda(const at::Tensor& idx, const at::Tensor& C, const at::Tensor& W1,
                                  const at::Tensor& b1) {
  const auto s = check_embed_linear_tanh_args(idx, C, W1, b1, /*allow_half=*/true);
  const cuda::DeviceGuard device_guard(C.device());
  at::Tensor h = at::empty({s.B, s.H}, C.options());  // h is (B, H)
  if (s.B == 0 || s.H == 0) return h;
  check_grid_dim(ceil_div(s.H, kWide), "W1.size(1) (H)", s.H, kWide);
  const auto idx_c = idx.expect_contiguous();
  const auto C_c = C.expect_contiguous();
  const auto W1_c = W1.expect_contiguous();
  const auto b1_c = b1.expect_contiguous();
  const dim3 grid(unsigned(ceil_div(s.B, kWide)), unsigned(ceil_div(s.H, kWide)));
  const cudaStream_t stream = cuda::current_stream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, C.scalar_type(), "embed_linear_tanh_cuda", [&] {
    AT_DISPATCH_INDEX_TYPES(idx.scalar_type(), "embed_linear_tanh_cuda", [&] {
      cuda::launch(embed_linear_tanh_forward_kernel<scalar_t, index_t>, grid, kThreads, 0, stream,
          idx_c->const_data_ptr<index_t>(), C_c->const_data_ptr<scalar_t>(), W1_c->const_data_ptr<scalar_t>(),
          b1_c->const_data_ptr<scalar_t>(), h.mutable_data_ptr<scalar_t>(), s.B, s.T, s.E, s.K, s.H, s.V);
    });
  });
  return h;
}

// The backward's four launches in order (numbered as at the top of the file). Over 80 lines, as one function: the
// split of B computed first sizes both the partial buffer and kernels 2 and 3, and the dtype dispatch holds every
// launch so that each kernel is instantiated for the dtypes once.
std::tuple<at::Tensor, at::Tensor, at::Tensor> embed_linear_tanh_backward_cuda(const at::Tensor& grad_h,
                                                                               const at::Tensor& h,
                                                                               const at::Tensor& idx,
                                                                               const at::Tensor& C,
                                                                               const at::Tensor& W1) {
  const auto s = check_embed_linear_tanh_backward_args(grad_h, h, idx, C, W1, /*allow_half=*/true);
  const cuda::DeviceGuard device_guard(C.device());
  if (s.B == 0 || s.H == 0) {
    return {at::zeros({s.V, s.E}, C.options()), at::zeros({s.K, s.H}, C.options()), at::zeros({s.H}, C.options())};
  }
  const auto acc_type = C.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const auto acc_options = C.options().dtype(acc_type);
  const auto idx_c = idx.expect_contiguous();
  const auto C_c = C.expect_contiguous();
  const auto W1_c = W1.expect_contiguous();
  const auto h_c = h.expect_contiguous();
  const int64_t B = s.B, T = s.T, E = s.E, K = s.K, H = s.H, V = s.V;
  const cudaStream_t stream = cuda::current_stream();
  const int n_sm = cuda::device_properties()->multiProcessorCount;

  // Split B so that kernel 2 fills the GPU about four CTAs per SM, with at least 256 rows per split; the
  // split depends only on the shapes and the device, so the fixed-order sum is reproducible.
  const int tm = K + 1 <= 2 * kSide ? 2 : 4;  // kernel 2's k tile: 32 rows when K+1 fits, else 64
  const int64_t tiles_w = ceil_div(H, kWide) * ceil_div(K + 1, kSide * tm);
  check_grid_dim(ceil_div(K + 1, kSide * tm), "K + 1 = T*E + 1", K + 1, kSide * tm);
  int64_t splits = std::clamp<int64_t>(ceil_div(4 * n_sm, tiles_w), 1, std::max<int64_t>(1, B / 256));
  const int64_t rows_per_split = ceil_div(ceil_div(B, splits), kStep) * kStep;
  splits = ceil_div(B, rows_per_split);
  const int tn = K <= 2 * kSide ? 2 : 4;  // kernel 4's k tile
  check_grid_dim(ceil_div(K, kSide * tn), "K = T*E", K, kSide * tn);
  const bool deterministic = at::globalContext().deterministicAlgorithms();

  at::Tensor grad_W1 = at::empty({K, H}, C.options());
  at::Tensor grad_b1 = at::empty({H}, C.options());
  at::Tensor grad_C;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, C.scalar_type(), "embed_linear_tanh_backward_cuda", [&] {
    AT_DISPATCH_INDEX_TYPES(idx.scalar_type(), "embed_linear_tanh_backward_cuda", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      const index_t* idx_p = idx_c->const_data_ptr<index_t>();
      const scalar_t* C_p = C_c->const_data_ptr<scalar_t>();
      const scalar_t* W1_p = W1_c->const_data_ptr<scalar_t>();

      // 1. grad_pre, once.
      at::Tensor grad_pre = at::empty({B, H}, acc_options);  // (B, H)
      acc_t* gp = grad_pre.mutable_data_ptr<acc_t>();
      cuda::launch(grad_pre_kernel<scalar_t, acc_t>, grid_stride_blocks(B * H), kThreads, 0, stream,
          grad_h.const_data_ptr<scalar_t>(), grad_h.stride(0), grad_h.stride(1), h_c->const_data_ptr<scalar_t>(), gp,
          B, H);

      // 2 + 3. grad_W1 and grad_b1.
      at::Tensor partial = at::empty({splits, K + 1, H}, acc_options);
      const dim3 grid_w(unsigned(ceil_div(H, kWide)), unsigned(ceil_div(K + 1, kSide * tm)), unsigned(splits));
      if (tm == 2) {
        cuda::launch(grad_w1_partial_kernel<scalar_t, index_t, 2>, grid_w, kThreads, 0, stream,
            idx_p, C_p, gp, partial.mutable_data_ptr<acc_t>(), B, T, E, K, H, V, rows_per_split);
      } else {
        cuda::launch(grad_w1_partial_kernel<scalar_t, index_t, 4>, grid_w, kThreads, 0, stream,
            idx_p, C_p, gp, partial.mutable_data_ptr<acc_t>(), B, T, E, K, H, V, rows_per_split);
      }
      cuda::launch(reduce_splits_kernel<scalar_t, acc_t>, grid_stride_blocks((K + 1) * H), kThreads, 0, stream,
          partial.const_data_ptr<acc_t>(), grad_W1.mutable_data_ptr<scalar_t>(), grad_b1.mutable_data_ptr<scalar_t>(),
          splits, K, H);

      // 4. grad_C.
      if (K == 0) {
        grad_C = at::zeros({V, E}, C.options());
        return;
      }
      const dim3 grid_e(unsigned(ceil_div(B, kWide)), unsigned(ceil_div(K, kSide * tn)));
      // grad_emb = grad_pre @ W1^T into `out`: (B, K) rows, or atomically added straight into grad_C (kAtomic).
      auto launch_grad_emb = [&](acc_t* out, auto atomic) {
        constexpr bool kAtomic = decltype(atomic)::value;
        if (tn == 2) {
          cuda::launch(grad_emb_kernel<scalar_t, index_t, 2, kAtomic>, grid_e, kThreads, 0, stream, idx_p, W1_p, gp,
                       out, B, T, E, K, H);
        } else {
          cuda::launch(grad_emb_kernel<scalar_t, index_t, 4, kAtomic>, grid_e, kThreads, 0, stream, idx_p, W1_p, gp,
                       out, B, T, E, K, H);
        }
      };
      if (deterministic) {
        at::Tensor grad_emb = at::empty({B, K}, acc_options);  // (B, K)
        launch_grad_emb(grad_emb.mutable_data_ptr<acc_t>(), std::false_type{});
        // Sorted-index segment sums in a fixed order (ATen's embedding backward): bitwise reproducible.
        grad_C = at::embedding_dense_backward(grad_emb.view({B * T, E}), idx_c->view({B * T}), V,
                                              /*padding_idx=*/-1, /*scale_grad_by_freq=*/false);
      } else {
        grad_C = at::zeros({V, E}, acc_options);
        launch_grad_emb(grad_C.mutable_data_ptr<acc_t>(), std::true_type{});
      }
      if (grad_C.scalar_type() != C.scalar_type()) grad_C = grad_C.to(C.scalar_type());
    });
  });
  return {grad_C, grad_W1, grad_b1};
}

}  // namespace

CHARMLP_REGISTER_CUDA_KERNELS(m) {
  m.impl("embed_linear_tanh", &embed_linear_tanh_cuda);
  m.impl("embed_linear_tanh_backward", &embed_linear_tanh_backward_cuda);
}

}  // namespace charmlp
