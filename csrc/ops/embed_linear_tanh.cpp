// embed_linear_tanh on the CPU, and the op's autograd (shared by every backend).
//
// Forward, h (B, H) = tanh(C[idx].view(B, K) @ W1 + b1) with K = T*E. Eager PyTorch runs it as four ops
// (index, mm, add, tanh) with (B, K) and (B, H) temporaries; at the seed's size (B=32, K=30, H=200) those
// ops' overheads, not the 192k multiply-adds, are the cost, and at big batch the extra passes over (B, H)
// are. Here: one pass over blocks of kRowBlock rows; each block's embedding rows are gathered into a small
// buffer (the concatenated (B, K) tensor never exists), multiplied by W1 in a register-blocked microkernel,
// and b1 + tanh are applied while the accumulators are still in registers.
//
// Backward, per block of rows: grad_pre = grad_h * (1 - h^2) once into a block buffer, then
// grad_b1 += column sums, grad_W1 += emb^T @ grad_pre, grad_emb = grad_pre @ W1^T; grad_emb (B, T*E) is
// scatter-added into the rows of grad_C at the end. The reductions over B use a partition of the rows that
// depends only on B (not on the thread count), so CPU results are bitwise reproducible in every mode.
//
// The hot loops use the CPU vector layer (cpu/vec.h, 64-byte vectors whatever the ISA: narrower ISAs run them
// as two or four native vectors) and are compiled once per instruction set (cpu/isa.h). Why: extensions are
// built without -march flags, so the baseline (SSE2) alone would run the GEMM-shaped loops and tanh 4-8x slower
// than eager PyTorch's MKL/Sleef kernels at big batch.
#include "ops/embed_linear_tanh.h"

#include "common/autograd.h"
#include "cpu/isa.h"
#include "cpu/vec.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <memory>
#include <type_traits>
#include <vector>

#if !defined(__GNUC__)
#error "embed_linear_tanh.cpp needs GCC or Clang (vector extensions)"
#endif
// Note: at::parallel_for is a header template. With torch's OpenMP backend it runs in parallel only when
// this file is compiled with -fopenmp (extra_compile_args and extra_link_args in setup.py); without it the
// large-size paths below run on one thread.

namespace charmlp {
namespace {

// ---- plain reference (what the kernels compute; the tests compare them with this in PyTorch) ---------
//   emb = C[idx].view(B, K); pre = emb @ W1 + b1; h = tanh(pre)
//   grad_pre = grad_h * (1 - h^2); grad_b1 = grad_pre.sum(0); grad_W1 = emb^T @ grad_pre
//   grad_C.index_add_(0, idx.flatten(), (grad_pre @ W1^T).view(B*T, E))

// ---- tuning -------------------------------------------------------------------------------------------
constexpr int64_t kRowBlock = 64;         // rows per block: the (rows, K) and (rows, H) buffers stay in L1/L2
constexpr int kMicroRows = 6;             // register block rows (times 1 or 2 vectors, see the ISA clones)
constexpr int64_t kRowsPerChunk = 2048;   // backward: rows per reduction chunk (fixed, for reproducibility)
constexpr int64_t kMaxChunks = 64;        // ... and at most this many (K+1, H) partials
constexpr int64_t kMinTaskWork = 1 << 17;  // multiply-adds below which a parallel task is not worth waking

// ---- 64-byte vectors ------------------------------------------------------------------------------------
template <typename T>
using Vec = cpu::Vec<T, 64>;

// Scratch whose every element is written before it is read: no zero fill.
template <typename T>
std::unique_ptr<T[]> scratch(int64_t n) {
  return std::unique_ptr<T[]>(new T[std::max<int64_t>(n, 1)]);
}

// ---- gather -----------------------------------------------------------------------------------------------
// x (nrows, K) = C[idx[r0:r0+nrows]].view(nrows, K): the concatenated embedding rows of one block. A plain
// loop, not memcpy: E is small, and a libc call per (row, t) would spill the vector registers around it.
template <typename scalar_t, typename index_t>
CHARMLP_CPU_INLINE void gather_rows(const index_t* idx, const scalar_t* C, int64_t T, int64_t E, int64_t V,
                                       int64_t r0, int64_t nrows, scalar_t* x) {
  for (int64_t r = 0; r < nrows; ++r) {
    for (int64_t t = 0; t < T; ++t) {
      const int64_t v = idx[(r0 + r) * T + t];
      TORCH_CHECK(v >= 0 && v < V, "embed_linear_tanh: idx[", r0 + r, ", ", t, "] = ", v,
                  " is out of range [0, V) with V = C.size(0) = ", V);
      const scalar_t* src = C + v * E;
      scalar_t* dst = x + (r * T + t) * E;
      for (int64_t e = 0; e < E; ++e) dst[e] = src[e];
    }
  }
}

// ---- microkernels ----------------------------------------------------------------------------------------
// acc[i][c] += sum_j a[i * a_i + j * a_j] * b[j * ldb + c * NV + 0:NV): an (MR rows) x (NC vectors) register
// block, j running over the reduction. The one shape behind h = x @ W1 (i = row, j = k),
// grad_W1 += x^T @ grad_pre (i = k, j = row) and grad_emb = grad_pre @ W1^T (i = row, j = n): each b vector
// is loaded once and used MR times, each a scalar broadcast once and used NC times.
template <typename T, int MR, int NC>
CHARMLP_CPU_INLINE void rank_update(typename Vec<T>::V (&acc)[MR][NC], const T* a, int64_t a_i, int64_t a_j,
                                       const T* b, int64_t ldb, int64_t J) {
  using V = typename Vec<T>::V;
  constexpr int NV = Vec<T>::N;
  for (int64_t j = 0; j < J; ++j) {
    V bj[NC];
    for (int c = 0; c < NC; ++c) bj[c] = Vec<T>::load(b + j * ldb + c * NV);
#pragma GCC unroll 8
    for (int i = 0; i < MR; ++i) {
      const T aij = a[i * a_i + j * a_j];
      for (int c = 0; c < NC; ++c) acc[i][c] += aij * bj[c];
    }
  }
}

// h[r, 0:NC*NV) = tanh(b1[0:] + x[r] @ W[:, 0:]) for MR rows r; W is (K, ldw), h rows are H apart.
// kPartial (NC = 1): only `width` < NV columns exist (H < NV; W and b1 then come zero-padded to NV).
template <typename T, int MR, int NC, bool kPartial>
CHARMLP_CPU_INLINE void forward_micro(const T* x, const T* W, int64_t ldw, const T* b1, T* h, int64_t K,
                                         int64_t H, int width) {
  using V = typename Vec<T>::V;
  constexpr int NV = Vec<T>::N;
  V acc[MR][NC];
  for (int c = 0; c < NC; ++c) {
    const V bias = Vec<T>::load(b1 + c * NV);
    for (int i = 0; i < MR; ++i) acc[i][c] = bias;
  }
  rank_update<T, MR, NC>(acc, x, K, 1, W, ldw, K);
  for (int i = 0; i < MR; ++i) {
    for (int c = 0; c < NC; ++c) {
      const V y = Vec<T>::tanh(acc[i][c]);
      if constexpr (kPartial) {
        for (int j = 0; j < width; ++j) h[i * H + j] = y[j];
      } else {
        std::memcpy(h + i * H + c * NV, &y, sizeof(V));
      }
    }
  }
}

// gW[i, 0:NC*NV) += sum_r x[r, i] * p[r, 0:NC*NV) for MR columns i of x (rows of grad_W1); gW and p rows
// are ld apart.
template <typename T, int MR, int NC>
CHARMLP_CPU_INLINE void grad_w_micro(const T* x, const T* p, T* gW, int64_t rows, int64_t K, int64_t ld) {
  using V = typename Vec<T>::V;
  constexpr int NV = Vec<T>::N;
  V acc[MR][NC];
  for (int i = 0; i < MR; ++i)
    for (int c = 0; c < NC; ++c) acc[i][c] = Vec<T>::load(gW + i * ld + c * NV);
  rank_update<T, MR, NC>(acc, x, 1, K, p, ld, rows);
  for (int i = 0; i < MR; ++i)
    for (int c = 0; c < NC; ++c) std::memcpy(gW + i * ld + c * NV, &acc[i][c], sizeof(V));
}

// gE[r, 0:NC*NV) = p[r, :H] @ WT[:H, 0:NC*NV) for MR rows r: grad_emb = grad_pre @ W1^T with W1
// pre-transposed to WT (H, Kp) so that vectors run along k.
template <typename T, int MR, int NC>
CHARMLP_CPU_INLINE void grad_emb_micro(const T* p, int64_t Hp, const T* WT, int64_t Kp, int64_t H, T* gE) {
  using V = typename Vec<T>::V;
  constexpr int NV = Vec<T>::N;
  V acc[MR][NC] = {};
  rank_update<T, MR, NC>(acc, p, Hp, 1, WT, Kp, H);
  for (int i = 0; i < MR; ++i)
    for (int c = 0; c < NC; ++c) std::memcpy(gE + i * Kp + c * NV, &acc[i][c], sizeof(V));
}

// Run `Micro` (one of the three above, as a functor template) over `count` register-block rows: blocks of
// kMicroRows, then one block of exactly the remaining count % kMicroRows.
template <template <int, int> class Micro, int NC, int R = kMicroRows - 1, typename... Args>
CHARMLP_CPU_INLINE void micro_rest(int rest, Args... args) {
  if constexpr (R > 0) {
    if (rest == R) return Micro<R, NC>::run(args...);
    micro_rest<Micro, NC, R - 1>(rest, args...);
  }
}

// ---- per-block kernels -------------------------------------------------------------------------------------
template <typename scalar_t, typename index_t>
struct Problem {
  const index_t* idx;   // (B, T)
  const scalar_t* C;    // (V, E)
  const scalar_t* W;    // (K, ldw): W1, or W1 zero-padded to ldw columns
  int64_t ldw;
  int64_t B, T, E, K, H, V;
};

// The column chunks of a row of `cols` columns (a multiple of NV, or overlapping at the end, see below):
// chunks of NC vectors first, then single vectors. NC > 1 only where there are registers for it (AVX-512).
template <int NC, typename F>
CHARMLP_CPU_INLINE void for_column_chunks(int64_t cols, int64_t NV, bool overlap_last, F&& chunk) {
  int64_t n0 = 0;
  if constexpr (NC > 1) {
    for (; n0 + NC * NV <= cols; n0 += NC * NV) chunk(n0, std::integral_constant<int, NC>{});
  }
  for (; n0 < cols; n0 += NV) chunk(overlap_last ? std::min(n0, cols - NV) : n0, std::integral_constant<int, 1>{});
}

template <typename T, bool kPartial>
struct ForwardMicro {
  template <int MR, int NC>
  struct At {
    CHARMLP_CPU_INLINE static void run(const T* x, const T* W, int64_t ldw, const T* b1, T* h, int64_t K, int64_t H,
                                          int width) {
      forward_micro<T, MR, NC, kPartial>(x, W, ldw, b1, h, K, H, width);
    }
  };
};

// h rows [block_begin, block_end) * kRowBlock. Column chunks of NV: when H is not a multiple of NV the last
// chunk starts at H - NV and recomputes a few columns (same values) instead of taking a masked tail;
// when H < NV, W and b1 arrive zero-padded to NV columns and only the stores are partial.
template <typename scalar_t, typename index_t, int NC>
CHARMLP_CPU_INLINE void forward_blocks_impl(const Problem<scalar_t, index_t>& pb, const scalar_t* b1,
                                               scalar_t* h, int64_t block_begin, int64_t block_end) {
  constexpr int NV = Vec<scalar_t>::N;
  constexpr int MR = kMicroRows;
  const int64_t K = pb.K, H = pb.H;
  const auto xbuf = scratch<scalar_t>(std::min(kRowBlock, pb.B) * K);  // x is (rows, K)
  scalar_t* x = xbuf.get();
  for (int64_t blk = block_begin; blk < block_end; ++blk) {
    const int64_t r0 = blk * kRowBlock;
    const int64_t rows = std::min(kRowBlock, pb.B - r0);
    gather_rows(pb.idx, pb.C, pb.T, pb.E, pb.V, r0, rows, x);
    scalar_t* hb = h + r0 * H;  // h is (B, H)
    if (H < NV) {
      using M = ForwardMicro<scalar_t, true>;
      int64_t r = 0;
      for (; r + MR <= rows; r += MR) M::template At<MR, 1>::run(x + r * K, pb.W, pb.ldw, b1, hb + r * H, K, H, int(H));
      micro_rest<M::template At, 1>(int(rows - r), x + r * K, pb.W, pb.ldw, b1, hb + r * H, K, H, int(H));
      continue;
    }
    // Column chunks outside, rows inside: a (K, NC * NV) slab of W stays in L1 for the whole block.
    for_column_chunks<NC>(H, NV, /*overlap_last=*/true, [&](int64_t n0, auto nc) CHARMLP_CPU_INLINE_LAMBDA {
      constexpr int C = decltype(nc)::value;
      using M = ForwardMicro<scalar_t, false>;
      int64_t r = 0;
      for (; r + MR <= rows; r += MR)
        M::template At<MR, C>::run(x + r * K, pb.W + n0, pb.ldw, b1 + n0, hb + r * H + n0, K, H, NV);
      micro_rest<M::template At, C>(int(rows - r), x + r * K, pb.W + n0, pb.ldw, b1 + n0, hb + r * H + n0, K, H,
                                    int(NV));
    });
  }
}

template <typename T>
struct GradWMicro {
  template <int MR, int NC>
  struct At {
    CHARMLP_CPU_INLINE static void run(const T* x, const T* p, T* gW, int64_t rows, int64_t K, int64_t ld) {
      grad_w_micro<T, MR, NC>(x, p, gW, rows, K, ld);
    }
  };
};

template <typename T>
struct GradEmbMicro {
  template <int MR, int NC>
  struct At {
    CHARMLP_CPU_INLINE static void run(const T* p, int64_t Hp, const T* WT, int64_t Kp, int64_t H, T* gE) {
      grad_emb_micro<T, MR, NC>(p, Hp, WT, Kp, H, gE);
    }
  };
};

// Operands of the backward beyond Problem: the layouts below make every vector access a full one.
template <typename scalar_t>
struct BackwardOperands {
  const scalar_t* grad_h;  // (B, H)
  const scalar_t* h;       // (B, H)
  const scalar_t* WT;      // (H, Kp): W1^T, zero columns K..Kp
  scalar_t* grad_emb;      // (B, Kp): grad_pre @ W1^T, scattered into grad_C afterwards
  int64_t Hp, Kp;          // H and K rounded up to multiples of NV
};

// For rows [row_begin, row_end), in blocks of kRowBlock rows: gW (K, Hp) += emb^T @ grad_pre,
// gb (Hp) += colsum(grad_pre), grad_emb rows = grad_pre @ W1^T. grad_pre is kept in a (rows, Hp) buffer
// whose pad columns are zero, so the column chunks of gW and gb need no tail handling.
template <typename scalar_t, typename index_t, int NC>
CHARMLP_CPU_INLINE void backward_rows_impl(const Problem<scalar_t, index_t>& pb,
                                              const BackwardOperands<scalar_t>& op, scalar_t* gW, scalar_t* gb,
                                              int64_t row_begin, int64_t row_end) {
  using V = typename Vec<scalar_t>::V;
  constexpr int NV = Vec<scalar_t>::N;
  constexpr int MR = kMicroRows;
  const int64_t K = pb.K, H = pb.H, Hp = op.Hp, Kp = op.Kp;
  const int64_t block_rows = std::min(kRowBlock, row_end - row_begin);
  const auto xbuf = scratch<scalar_t>(block_rows * K);   // emb rows of the block, (rows, K)
  const auto pbuf = scratch<scalar_t>(block_rows * Hp);  // grad_pre of the block, (rows, Hp)
  scalar_t* x = xbuf.get();
  scalar_t* p = pbuf.get();
  for (int64_t r0 = row_begin; r0 < row_end; r0 += kRowBlock) {
    const int64_t rows = std::min(kRowBlock, row_end - r0);
    gather_rows(pb.idx, pb.C, pb.T, pb.E, pb.V, r0, rows, x);

    // grad_pre = grad_h * (1 - h^2), once.
    for (int64_t r = 0; r < rows; ++r) {
      const scalar_t* gh = op.grad_h + (r0 + r) * H;
      const scalar_t* hh = op.h + (r0 + r) * H;
      scalar_t* pr = p + r * Hp;
      int64_t n = 0;
      for (; n + NV <= H; n += NV) {
        const V y = Vec<scalar_t>::load(hh + n);
        const V g = Vec<scalar_t>::load(gh + n) * (scalar_t(1) - y * y);  // tanh_backward, NV lanes at a time
        std::memcpy(pr + n, &g, sizeof(V));
      }
      for (; n < H; ++n) pr[n] = tanh_backward(gh[n], hh[n]);
      for (; n < Hp; ++n) pr[n] = scalar_t(0);
    }

    // grad_b1 = column sums of grad_pre.
    for (int64_t n0 = 0; n0 < Hp; n0 += NV) {
      V acc = Vec<scalar_t>::load(gb + n0);
      for (int64_t r = 0; r < rows; ++r) acc += Vec<scalar_t>::load(p + r * Hp + n0);
      std::memcpy(gb + n0, &acc, sizeof(V));
    }

    // grad_W1 += emb^T @ grad_pre: register blocks of MR rows of grad_W1 (= columns k of emb).
    for_column_chunks<NC>(Hp, NV, /*overlap_last=*/false, [&](int64_t n0, auto nc) CHARMLP_CPU_INLINE_LAMBDA {
      constexpr int C = decltype(nc)::value;
      int64_t k = 0;
      for (; k + MR <= K; k += MR) GradWMicro<scalar_t>::template At<MR, C>::run(x + k, p + n0, gW + k * Hp + n0, rows, K, Hp);
      micro_rest<GradWMicro<scalar_t>::template At, C>(int(K - k), x + k, p + n0, gW + k * Hp + n0, rows, K, Hp);
    });

    // grad_emb = grad_pre @ W1^T.
    scalar_t* gE = op.grad_emb + r0 * Kp;
    for_column_chunks<NC>(Kp, NV, /*overlap_last=*/false, [&](int64_t k0, auto nc) CHARMLP_CPU_INLINE_LAMBDA {
      constexpr int C = decltype(nc)::value;
      int64_t r = 0;
      for (; r + MR <= rows; r += MR)
        GradEmbMicro<scalar_t>::template At<MR, C>::run(p + r * Hp, Hp, op.WT + k0, Kp, H, gE + r * Kp + k0);
      micro_rest<GradEmbMicro<scalar_t>::template At, C>(int(rows - r), p + r * Hp, Hp, op.WT + k0, Kp, H,
                                                         gE + r * Kp + k0);
    });
  }
}

// ---- ISA clones --------------------------------------------------------------------------------------------
// The *_impl kernels compiled for the CPU's instruction set (cpu/isa.h). The register block is 6 rows x 2 vectors
// with AVX-512 (12 of 32 zmm accumulators), 6 x 1 otherwise (12 of 16 ymm on AVX2).
template <cpu::Isa I>
constexpr int kColVectors = I == cpu::Isa::kAvx512 ? 2 : 1;

template <typename scalar_t, typename index_t>
void forward_blocks(const Problem<scalar_t, index_t>& pb, const scalar_t* b1, scalar_t* h, int64_t block_begin,
                    int64_t block_end) {
  cpu::with_isa(cpu::cpu_isa(), [&](auto isa) CHARMLP_CPU_INLINE_LAMBDA {
    forward_blocks_impl<scalar_t, index_t, kColVectors<decltype(isa)::isa>>(pb, b1, h, block_begin, block_end);
  });
}

template <typename scalar_t, typename index_t>
void backward_rows(const Problem<scalar_t, index_t>& pb, const BackwardOperands<scalar_t>& op, scalar_t* gW,
                   scalar_t* gb, int64_t row_begin, int64_t row_end) {
  cpu::with_isa(cpu::cpu_isa(), [&](auto isa) CHARMLP_CPU_INLINE_LAMBDA {
    backward_rows_impl<scalar_t, index_t, kColVectors<decltype(isa)::isa>>(pb, op, gW, gb, row_begin, row_end);
  });
}

// ---- host functions ----------------------------------------------------------------------------------------
template <typename scalar_t, typename index_t>
Problem<scalar_t, index_t> make_problem(const at::Tensor& idx, const at::Tensor& C, const scalar_t* W, int64_t ldw,
                                        const EmbedLinearTanhSizes& s) {
  return {idx.const_data_ptr<index_t>(), C.const_data_ptr<scalar_t>(), W, ldw, s.B, s.T, s.E, s.K, s.H, s.V};
}

// (rows, cols) row-major -> (rows, ld) with zero columns cols..ld.
template <typename scalar_t>
std::vector<scalar_t> pad_columns(const scalar_t* src, int64_t rows, int64_t cols, int64_t ld) {
  std::vector<scalar_t> out(rows * ld, scalar_t(0));
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t j = 0; j < cols; ++j) out[i * ld + j] = src[i * cols + j];
  return out;
}

at::Tensor embed_linear_tanh_cpu(const at::Tensor& idx, const at::Tensor& C, const at::Tensor& W1,
                                 const at::Tensor& b1) {
  const auto s = check_embed_linear_tanh_args(idx, C, W1, b1, /*allow_half=*/false);
  at::Tensor h = at::empty({s.B, s.H}, C.options());  // h is (B, H)
  if (s.B == 0 || s.H == 0) return h;
  // expect_contiguous borrows already-contiguous tensors and copies only strided ones.
  const auto idx_c = idx.expect_contiguous();
  const auto C_c = C.expect_contiguous();
  const auto W1_c = W1.expect_contiguous();
  const auto b1_c = b1.expect_contiguous();
  const int64_t n_blocks = (s.B + kRowBlock - 1) / kRowBlock;
  const int64_t grain = std::max<int64_t>(1, kMinTaskWork / std::max<int64_t>(1, kRowBlock * s.K * s.H));
  AT_DISPATCH_FLOATING_TYPES(C.scalar_type(), "embed_linear_tanh_cpu", [&] {
    AT_DISPATCH_INDEX_TYPES(idx.scalar_type(), "embed_linear_tanh_cpu", [&] {
      constexpr int NV = Vec<scalar_t>::N;
      const scalar_t* W = W1_c->const_data_ptr<scalar_t>();
      const scalar_t* bias = b1_c->const_data_ptr<scalar_t>();
      int64_t ldw = s.H;
      std::vector<scalar_t> W_pad, b_pad;
      if (s.H < NV) {  // narrower than one vector: zero-pad W1 and b1 to NV columns
        W_pad = pad_columns(W, s.K, s.H, NV);
        b_pad = pad_columns(bias, 1, s.H, NV);
        W = W_pad.data();
        bias = b_pad.data();
        ldw = NV;
      }
      const auto pb = make_problem<scalar_t, index_t>(*idx_c, *C_c, W, ldw, s);
      scalar_t* h_p = h.mutable_data_ptr<scalar_t>();
      // At the seed's size this is one block, run inline: no thread is woken.
      at::parallel_for(0, n_blocks, grain, [&](int64_t begin, int64_t end) {
        forward_blocks<scalar_t, index_t>(pb, bias, h_p, begin, end);
      });
    });
  });
  return h;
}

// grad_W1 (K, H) and grad_b1 (H) = the sums, in chunk order, of the n_chunks partials (K + 1, Hp) (grad_W1's rows,
// then grad_b1's), without the column padding.
template <typename scalar_t>
void sum_partials(const scalar_t* partials, int64_t n_chunks, int64_t K, int64_t H, int64_t Hp, scalar_t* grad_W1,
                  scalar_t* grad_b1) {
  const int64_t part_size = (K + 1) * Hp;
  for (int64_t k = 0; k <= K; ++k) {
    scalar_t* out = k < K ? grad_W1 + k * H : grad_b1;
    std::memcpy(out, partials + k * Hp, H * sizeof(scalar_t));
    for (int64_t c = 1; c < n_chunks; ++c) {
      const scalar_t* part = partials + c * part_size + k * Hp;
      for (int64_t n = 0; n < H; ++n) out[n] += part[n];
    }
  }
}

// grad_C[idx[b, t], e] += grad_emb[b, t*E + e] (grad_emb (B, Kp)). Threads own disjoint columns e and walk (b, t)
// in order: no two threads touch one element, and each element sums in a fixed order.
template <typename scalar_t, typename index_t>
void scatter_grad_emb(const index_t* idx, const scalar_t* grad_emb, int64_t B, int64_t T, int64_t E, int64_t Kp,
                      scalar_t* grad_C) {
  const int64_t grain_e = B * T * E < kMinTaskWork ? E : 1;
  at::parallel_for(0, E, grain_e, [&](int64_t e0, int64_t e1) {
    for (int64_t b = 0; b < B; ++b) {
      for (int64_t t = 0; t < T; ++t) {
        const scalar_t* g = grad_emb + b * Kp + t * E;
        scalar_t* dst = grad_C + int64_t(idx[b * T + t]) * E;  // in range: checked by the gather of the kernel
        for (int64_t e = e0; e < e1; ++e) dst[e] += g[e];
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> embed_linear_tanh_backward_cpu(const at::Tensor& grad_h,
                                                                              const at::Tensor& h,
                                                                              const at::Tensor& idx,
                                                                              const at::Tensor& C,
                                                                              const at::Tensor& W1) {
  const auto s = check_embed_linear_tanh_backward_args(grad_h, h, idx, C, W1, /*allow_half=*/false);
  at::Tensor grad_C = at::zeros({s.V, s.E}, C.options());  // (V, E)
  at::Tensor grad_W1 = at::empty({s.K, s.H}, C.options());  // (K, H)
  at::Tensor grad_b1 = at::empty({s.H}, C.options());       // (H)
  if (s.B == 0 || s.H == 0) {
    grad_W1.zero_();
    grad_b1.zero_();
    return {grad_C, grad_W1, grad_b1};
  }
  const auto idx_c = idx.expect_contiguous();
  const auto C_c = C.expect_contiguous();
  const auto W1_c = W1.expect_contiguous();
  const auto h_c = h.expect_contiguous();
  // grad_h is often an expanded scalar (e.g. from h.sum()); this is the one copy the kernel then needs.
  const auto grad_h_c = grad_h.expect_contiguous();

  // Fixed partition of the rows into chunks; each chunk owns a (K*Hp + Hp) partial of grad_W1 and grad_b1,
  // summed in chunk order afterwards, so the result does not depend on how threads pick up chunks.
  const int64_t blocks = (s.B + kRowBlock - 1) / kRowBlock;
  int64_t n_chunks = std::min<int64_t>(kMaxChunks, (s.B + kRowsPerChunk - 1) / kRowsPerChunk);
  n_chunks = std::max<int64_t>(1, std::min<int64_t>(n_chunks, (int64_t(1) << 24) / ((s.K + 1) * s.H)));
  const int64_t rows_per_chunk = (blocks + n_chunks - 1) / n_chunks * kRowBlock;
  n_chunks = (s.B + rows_per_chunk - 1) / rows_per_chunk;

  AT_DISPATCH_FLOATING_TYPES(C.scalar_type(), "embed_linear_tanh_backward_cpu", [&] {
    AT_DISPATCH_INDEX_TYPES(idx.scalar_type(), "embed_linear_tanh_backward_cpu", [&] {
      constexpr int NV = Vec<scalar_t>::N;
      const int64_t Hp = (s.H + NV - 1) / NV * NV;
      const int64_t Kp = std::max<int64_t>(NV, (s.K + NV - 1) / NV * NV);
      const int64_t K = s.K, H = s.H, T = s.T, E = s.E;
      // WT (H, Kp) = W1^T with zero columns K..Kp: O(K*H) once per call, against O(B*K*H) of work.
      const scalar_t* W1_p = W1_c->const_data_ptr<scalar_t>();
      const auto WT = scratch<scalar_t>(H * Kp);
      for (int64_t k = 0; k < K; ++k)
        for (int64_t n = 0; n < H; ++n) WT[n * Kp + k] = W1_p[k * H + n];
      for (int64_t n = 0; n < H; ++n)
        for (int64_t k = K; k < Kp; ++k) WT[n * Kp + k] = scalar_t(0);
      const auto grad_emb = scratch<scalar_t>(s.B * Kp);  // (B, Kp)
      const auto pb = make_problem<scalar_t, index_t>(*idx_c, *C_c, W1_p, H, s);
      const BackwardOperands<scalar_t> op{grad_h_c->const_data_ptr<scalar_t>(), h_c->const_data_ptr<scalar_t>(),
                                          WT.get(), grad_emb.get(), Hp, Kp};
      const int64_t part_size = (K + 1) * Hp;  // grad_W1 (K, Hp), then grad_b1 (Hp)
      std::vector<scalar_t> partials(n_chunks * part_size, scalar_t(0));
      scalar_t* part_p = partials.data();
      at::parallel_for(0, n_chunks, 1, [&](int64_t begin, int64_t end) {
        for (int64_t c = begin; c < end; ++c) {
          scalar_t* part = part_p + c * part_size;
          backward_rows<scalar_t, index_t>(pb, op, part, part + K * Hp, c * rows_per_chunk,
                                           std::min(s.B, (c + 1) * rows_per_chunk));
        }
      });
      sum_partials(part_p, n_chunks, K, H, Hp, grad_W1.mutable_data_ptr<scalar_t>(),
                   grad_b1.mutable_data_ptr<scalar_t>());
      scatter_grad_emb(pb.idx, grad_emb.get(), s.B, T, E, Kp, grad_C.mutable_data_ptr<scalar_t>());
    });
  });
  return {grad_C, grad_W1, grad_b1};
}

// ---- autograd (every backend) -----------------------------------------------------------------------------
// Registered in C++ rather than from Python: at the seed's size one autograd.grad through a Python-registered
// autograd formula costs ~3x more host time than this. The backward calls the registered backward op through the
// dispatcher, so torch.compile/AOTAutograd trace it with the fake kernel from ops.py. Double backward runs through
// ATen ops; forward-mode AD and torch.func's differentiating transforms are errors (autograd_limits.h).
using ForwardSig = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&);
using BackwardSig = std::tuple<at::Tensor, at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                                   const at::Tensor&, const at::Tensor&,
                                                                   const at::Tensor&);

const c10::TypedOperatorHandle<ForwardSig>& forward_op() {
  static const auto op = op_handle<ForwardSig>("charmlp::embed_linear_tanh");
  return op;
}

const c10::TypedOperatorHandle<BackwardSig>& backward_op() {
  static const auto op = op_handle<BackwardSig>("charmlp::embed_linear_tanh_backward");
  return op;
}

constexpr AutogradLimits kLimits{"charmlp::embed_linear_tanh",
                                 "torch.tanh(C[idx].flatten(1) @ W1 + b1) (or CharMLP(kernels=\"reference\"))"};

// The plain reference above from differentiable ATen ops, for a backward with create_graph=True: the fused
// backward op has no derivative. h is the saved output, so its own derivative runs through this op's node again
// (first order there, the fast path). Never on the first-order path.
std::tuple<at::Tensor, at::Tensor, at::Tensor> embed_linear_tanh_backward_differentiable(
    const at::Tensor& grad_h, const at::Tensor& h, const at::Tensor& idx, const at::Tensor& C, const at::Tensor& W1) {
  const int64_t B = idx.size(0), T = idx.size(1), E = C.size(1);
  const at::Tensor flat_idx = idx.reshape({B * T});
  const at::Tensor emb = C.index_select(0, flat_idx).view({B, T * E});  // (B, K)
  const at::Tensor grad_pre = grad_h * (1 - h * h);                     // (B, H)
  at::Tensor grad_C = at::zeros_like(C, at::MemoryFormat::Contiguous)
                          .index_add(0, flat_idx, at::mm(grad_pre, W1.t()).view({B * T, E}));
  return {grad_C, at::mm(emb.t(), grad_pre), grad_pre.sum(0)};
}

class EmbedLinearTanhFunction : public torch::autograd::Function<EmbedLinearTanhFunction> {
 public:
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& idx, const at::Tensor& C,
                            const at::Tensor& W1, const at::Tensor& b1) {
    at::AutoDispatchBelowADInplaceOrView guard;
    at::Tensor h = forward_op().call(idx, C, W1, b1);
    // h, not the pre-activation, is saved: tanh' = 1 - h^2.
    ctx->save_for_backward({h, idx, C, W1});
    return h;
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grad_outputs) {
    const auto saved = ctx->get_saved_variables();
    if (differentiable_backward_wanted()) {
      auto [grad_C, grad_W1, grad_b1] =
          embed_linear_tanh_backward_differentiable(grad_outputs[0], saved[0], saved[1], saved[2], saved[3]);
      return {at::Tensor(), grad_C, grad_W1, grad_b1};
    }
    // Grad mode is off here: below autograd, past the internal op's Autograd kernel that would only re-check it.
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [grad_C, grad_W1, grad_b1] = backward_op().call(grad_outputs[0], saved[0], saved[1], saved[2], saved[3]);
    return {at::Tensor(), grad_C, grad_W1, grad_b1};  // idx has no gradient
  }
};

at::Tensor embed_linear_tanh_autograd(const at::Tensor& idx, const at::Tensor& C, const at::Tensor& W1,
                                      const at::Tensor& b1) {
  return autograd_kernel(
      kLimits, {C, W1, b1}, [&] { return forward_op().call(idx, C, W1, b1); },
      [&] { return EmbedLinearTanhFunction::apply(idx, C, W1, b1); });
}

}  // namespace

TORCH_LIBRARY_IMPL(charmlp, CPU, m) {
  m.impl("embed_linear_tanh", &embed_linear_tanh_cpu);
  m.impl("embed_linear_tanh_backward", &embed_linear_tanh_backward_cpu);
}

TORCH_LIBRARY_IMPL(charmlp, Autograd, m) {
  m.impl("embed_linear_tanh", &embed_linear_tanh_autograd);
  register_internal_ops(m, {"embed_linear_tanh_backward"});
}

}  // namespace charmlp
