// sgd_train_cpu_kernels.h: the CPU training loop of charmlp::sgd_train, written once on the CPU vector layer
// (cpu/vec.h) and compiled once per instruction set (cpu/isa.h); sgd_train.cpp calls train_models.
//
// One model's loop is a step loop over named phases, the same names as the CUDA kernel's (sgd_train_cuda.cu):
//   load_parameters, then per step draw_minibatch (one step ahead), gather, hidden_layer, softmax_rows,
//   backward_products, embedding_update, loss_window; store_parameters at the end.
// The matrix products of hidden_layer and backward_products come from a policy chosen once per call:
// SimdProducts (register-tiled, below ~2 M multiply-adds per step) or BlasProducts (MKL on views of the same
// buffers, above: it packs panels and blocks for the cache, the register tiles do not).
//
// Why it is fast (seed size: B=32, T=3, E=10, H=200, V=27, ~2.2 MFLOP per step, several times faster than the
// eager reference):
//  * every buffer lives in one Workspace allocated once per call, not per step; parameters live in layouts chosen
//    for the loop: W1 as (T*E, Hp) and W2 transposed as (Vp, Hp), H and V padded to Hp, Vp (multiples of the
//    vector width) with zeros that stay zero, so that all six products of a step run along the contiguous hidden
//    dimension;
//  * four of them are "broadcast" products (out row += a scalar times a W-wide row of B; 8 (AVX-512) or 4 rows x
//    2W register tile), two are dot products (4 x 4 or 4 x 2 tile, the horizontal sums reduced 8 at a time);
//  * the SGD update is fused into the gradient products (W -= lr * (A @ B) in the epilogue, no gradient buffer),
//    each after the last read of the old weights (dh before the W2 update, dx before the W1 update);
//  * tanh and exp are vectorised (cpu/vec.h): 6,400 scalar tanhf per step would cost more than all the products;
//  * the next step's minibatch rows are drawn one step ahead and prefetched.
// The softmax cross-entropy of each row is the per-op kernel's row function (cpu/softmax_rows.h), so the loop's
// loss has the per-op numerics (float64 lse, log1p when the target dominates).
// Results are deterministic and do not depend on the thread count or on how many models share the call: every sum
// of the SIMD path has a fixed order, and the BLAS path computes fixed tiles of each product with one
// single-threaded BLAS call each (see blas_gemm).
#pragma once

#include "cpu/isa.h"
#include "cpu/softmax_rows.h"
#include "cpu/vec.h"
#include "sgd_train/sgd_train.h"

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/zeros.h>

#include <algorithm>
#include <cstdint>
#include <vector>

namespace charmlp {
namespace cpu_train {

// How the CPU loop computes its matrix products: register-tiled SIMD code, BLAS (at::mm), or by size.
enum class CpuGemm { kAuto, kSimd, kBlas };

// SgdTrainArgs (sgd_train.h) with the index dtype decided at run time, the sizes the loop's layouts need, and
// how it computes its products.
struct CpuTrainArgs : SgdTrainArgs<void> {
  bool idx64;  // X and Y are int64 (else int32)
  int64_t M, V, E, T, H, B;
  bool direct;  // W2 (H + TE, V): its last TE rows are the direct connections x -> logits
  CpuGemm gemm;
};

// out (R, N) = beta * out + alpha * (a (R, K) @ b (K, N)) in fixed single-threaded tiles (sgd_train.cpp).
void blas_gemm(const at::Tensor& out, const at::Tensor& a, const at::Tensor& b, float beta = 0.f, float alpha = 1.f);

// Per-step multiply-adds (of B * Hp * (2 TE + 2 Vp)) from which the BLAS products are used.
constexpr int64_t kBlasWork = int64_t(2) << 20;

// ---- one model's operands and working set ---------------------------------------------------------------------

// Model m's slices of the call's operands.
template <typename index_t>
struct Model {
  float *C, *W1, *b1, *W2, *b2;  // (V, E), (TE, H), (H), (H [+ TE], V), (V)
  const index_t* X;              // (N, T)
  const index_t* Y;              // (N)
  const float* lrs;              // (S)
  const int64_t* batch_idx;      // (S, B) or null
  uint64_t seed;
  int64_t m;

  Model(const CpuTrainArgs& a, int64_t m)
      : C(a.C + m * a.V * a.E),
        W1(a.W1 + m * a.T * a.E * a.H),
        b1(a.b1 + m * a.H),
        W2(a.W2 + m * (a.direct ? a.H + a.T * a.E : a.H) * a.V),
        b2(a.b2 + m * a.V),
        X(static_cast<const index_t*>(a.X)),
        Y(static_cast<const index_t*>(a.Y)),
        lrs(a.lrs + m * a.lr_stride),
        batch_idx(a.batch_idx ? a.batch_idx + m * a.idx_stride : nullptr),
        seed(a.seeds ? static_cast<uint64_t>(a.seeds[m]) : 0),
        m(m) {}
};

// Every buffer of one model's loop (seed size: ~90 KB, L2-resident), allocated once per call. Padding rows and
// columns are zero and stay zero. The float buffers come from ATen's allocator (64-byte aligned) so that the BLAS
// products' operands are aligned the same way in every call, whichever model of a call they belong to.
struct Workspace {
  int64_t B, T, E, TE, H, V, Hp, Vp;
  bool direct;
  at::Tensor t_WdT;        // the direct connections transposed (Vp, TE), when direct (else empty)
  at::Tensor t_W1p, t_b1p, t_W2T, t_h, t_g, t_x, t_xT, t_logit, t_dlT, t_dx, t_dC, t_rowloss;
  float *W1p, *b1p, *W2T;  // W1 (TE, Hp), b1 (Hp), W2 transposed (Vp, Hp): the parameters during the call
  float *h, *g;            // tanh activations (B, Hp); dpre = dL/d(pre-activation) (B, Hp)
  float *x, *xT;           // gathered embeddings (B, TE), and transposed (TE, B)
  float* logit;            // logits -> dL/dlogits (B, Vp)
  float* dlT;              // dL/dlogits transposed (V, B) for the SIMD W2 update, then its column sums (V)
  float *dx, *dC;          // dL/dx (B, TE); dL/dC (V, E)
  float* rowloss;          // (B)
  std::vector<int64_t> tok, tgt;  // the step's tokens (B * T) and targets (B)
  std::vector<int64_t> rows;      // minibatch rows of step i in rows[(i % 2) * B ...]

  // w: floats per vector of the ISA (the padding unit)
  Workspace(const CpuTrainArgs& a, int64_t w)
      : B(a.B), T(a.T), E(a.E), TE(a.T * a.E), H(a.H), V(a.V), Hp((a.H + w - 1) / w * w), Vp((a.V + w - 1) / w * w),
        direct(a.direct), tok(a.B * a.T), tgt(a.B), rows(2 * a.B) {
    const auto zeros = [](int64_t n) { return at::zeros({n}, at::TensorOptions().dtype(at::kFloat)); };
    t_WdT = zeros(direct ? Vp * TE : 0).view({direct ? Vp : 0, TE});
    W1p = (t_W1p = zeros(TE * Hp)).data_ptr<float>();
    b1p = (t_b1p = zeros(Hp)).data_ptr<float>();
    W2T = (t_W2T = zeros(Vp * Hp)).data_ptr<float>();
    h = (t_h = zeros(B * Hp)).data_ptr<float>();
    g = (t_g = zeros(B * Hp)).data_ptr<float>();
    x = (t_x = zeros(B * TE)).data_ptr<float>();
    xT = (t_xT = zeros(TE * B)).data_ptr<float>();
    logit = (t_logit = zeros(B * Vp)).data_ptr<float>();
    dlT = (t_dlT = zeros(V * B)).data_ptr<float>();
    dx = (t_dx = zeros(B * TE)).data_ptr<float>();
    dC = (t_dC = zeros(V * E)).data_ptr<float>();
    rowloss = (t_rowloss = zeros(B)).data_ptr<float>();
  }
  const int64_t* step_rows(int64_t i) const { return rows.data() + (i % 2) * B; }
};

// ---- the vector kernels of one instruction set ----------------------------------------------------------------

template <cpu::Isa I>
struct Kernels {
  using S = cpu::Vec<float, cpu::IsaTag<I>::kBytes>;
  using vf = typename S::V;
  static constexpr int W = S::N;  // floats per vector
  typedef float v8f __attribute__((vector_size(8 * sizeof(float))));
  typedef float v4f __attribute__((vector_size(4 * sizeof(float))));

  // Register tiles: AVX-512 has 32 vector registers, so its tiles hold 16 accumulators (two FMA ports x 4 cycles
  // of latency x 2 to also cover the loads); AVX2 and SSE have 16 and use 8.
  static constexpr int kBcastRows = W == 16 ? 8 : 4;  // rows of a broadcast-product tile (x 2 vectors of columns)
  static constexpr int kDotCols = W == 16 ? 4 : 2;    // columns of a dot-product tile (x 4 rows)

  // Runs fn(begin, end) over [0, n) on the intra-op threads when the total work (in FMAs) repays the fork/join
  // (~5 us), serially otherwise: always at the seed's size, and always inside the per-model parallel loop. Each
  // task re-enters this ISA's clone (cpu/isa.h: at::parallel_for's body is not inlined).
  template <class Fn>
  static CHARMLP_CPU_INLINE void maybe_parallel(int64_t n, int64_t work, Fn&& fn) {
    constexpr int64_t kParallelWork = int64_t(1) << 20;
    if (work >= kParallelWork && n > 1 && !at::in_parallel_region() && at::get_num_threads() > 1) {
      const int64_t grain = std::max<int64_t>(1, n * kParallelWork / (4 * work));
      auto task = [&](auto, int64_t lo, int64_t hi) CHARMLP_CPU_INLINE_LAMBDA { fn(lo, hi); };
      at::parallel_for(0, n, grain, [&](int64_t lo, int64_t hi) { cpu::run_in<I>(task, lo, hi); });
    } else {
      fn(0, n);
    }
  }

  // Horizontal sums of 8 accumulators at once: out[i] = sum of the lanes of acc[i]. Pairs of vectors are folded
  // into one ("lanes of x then lanes of y"), halving the lanes per accumulator at each level, so 8 sums cost
  // 7 folds instead of 8 * log2(W) shuffles.
  static CHARMLP_CPU_INLINE void reduce8_v8(const v8f* a, float* out) {
    const auto fold_a = [](v8f x, v8f y) CHARMLP_CPU_INLINE_LAMBDA {  // groups of 8 -> 4
      return __builtin_shufflevector(x, y, 0, 1, 2, 3, 8, 9, 10, 11) +
             __builtin_shufflevector(x, y, 4, 5, 6, 7, 12, 13, 14, 15);
    };
    const auto fold_b = [](v8f x, v8f y) CHARMLP_CPU_INLINE_LAMBDA {  // groups of 4 -> 2
      return __builtin_shufflevector(x, y, 0, 1, 8, 9, 4, 5, 12, 13) +
             __builtin_shufflevector(x, y, 2, 3, 10, 11, 6, 7, 14, 15);
    };
    const auto fold_c = [](v8f x, v8f y) CHARMLP_CPU_INLINE_LAMBDA {  // groups of 2 -> 1
      return __builtin_shufflevector(x, y, 0, 8, 2, 10, 4, 12, 6, 14) +
             __builtin_shufflevector(x, y, 1, 9, 3, 11, 5, 13, 7, 15);
    };
    const v8f z = fold_c(fold_b(fold_a(a[0], a[1]), fold_a(a[2], a[3])), fold_b(fold_a(a[4], a[5]), fold_a(a[6], a[7])));
    constexpr int perm[8] = {0, 4, 2, 6, 1, 5, 3, 7};  // the folds leave accumulator perm[l] in lane l
    for (int l = 0; l < 8; ++l) out[perm[l]] = z[l];
  }
  static CHARMLP_CPU_INLINE void reduce8(const vf* acc, float* out) {
    if constexpr (W == 16) {
      v8f h[8];
      for (int i = 0; i < 8; ++i) {
        h[i] = __builtin_shufflevector(acc[i], acc[i], 0, 1, 2, 3, 4, 5, 6, 7) +
               __builtin_shufflevector(acc[i], acc[i], 8, 9, 10, 11, 12, 13, 14, 15);
      }
      reduce8_v8(h, out);
    } else if constexpr (W == 8) {
      reduce8_v8(acc, out);
    } else {
      static_assert(W == 4, "vectors of 4, 8 or 16 floats");
      const auto fold_a = [](v4f x, v4f y) CHARMLP_CPU_INLINE_LAMBDA {
        return __builtin_shufflevector(x, y, 0, 1, 4, 5) + __builtin_shufflevector(x, y, 2, 3, 6, 7);
      };
      const auto fold_b = [](v4f x, v4f y) CHARMLP_CPU_INLINE_LAMBDA {
        return __builtin_shufflevector(x, y, 0, 4, 2, 6) + __builtin_shufflevector(x, y, 1, 5, 3, 7);
      };
      const v4f z0 = fold_b(fold_a(acc[0], acc[1]), fold_a(acc[2], acc[3]));  // lanes: acc 0, 2, 1, 3
      const v4f z1 = fold_b(fold_a(acc[4], acc[5]), fold_a(acc[6], acc[7]));  // lanes: acc 4, 6, 5, 7
      out[0] = z0[0], out[2] = z0[1], out[1] = z0[2], out[3] = z0[3];
      out[4] = z1[0], out[6] = z1[1], out[5] = z1[2], out[7] = z1[3];
    }
  }

  // Broadcast product, rows [r_begin, r_end) of P = A (R, K) @ Bm (K, Np), Np a multiple of W:
  // epi(r, c, acc) receives the W-wide slice P[r, c:c+W]. Column panels of 2W outer (the panel of Bm stays in
  // L1/L2 across row blocks), blocks of kBcastRows rows inner; the edge rows are computed on a clamped duplicate
  // and not emitted.
  template <class Epi>
  static CHARMLP_CPU_INLINE void gemm_bcast(int64_t r_begin, int64_t r_end, int64_t K, const float* A, int64_t lda,
                                            const float* Bm, int64_t ldb, int64_t Np, Epi&& epi) {
    constexpr int MR = kBcastRows;
    for (int64_t c0 = 0; c0 < Np; c0 += 2 * W) {
      const bool two = c0 + W < Np;
      for (int64_t r0 = r_begin; r0 < r_end; r0 += MR) {
        const float* a[MR];
        for (int i = 0; i < MR; ++i) a[i] = A + std::min(r0 + i, r_end - 1) * lda;
        vf acc[MR][2] = {};
        const float* bp = Bm + c0;
        if (two) {
          for (int64_t k = 0; k < K; ++k, bp += ldb) {
            const vf b0 = S::load(bp), b1 = S::load(bp + W);
#pragma GCC unroll 8
            for (int i = 0; i < MR; ++i) {
              const float ai = a[i][k];
              acc[i][0] = S::fma(b0, ai, acc[i][0]);
              acc[i][1] = S::fma(b1, ai, acc[i][1]);
            }
          }
        } else {
          for (int64_t k = 0; k < K; ++k, bp += ldb) {
            const vf b0 = S::load(bp);
#pragma GCC unroll 8
            for (int i = 0; i < MR; ++i) acc[i][0] = S::fma(b0, a[i][k], acc[i][0]);
          }
        }
        for (int i = 0; i < MR && r0 + i < r_end; ++i) {
          epi(r0 + i, c0, acc[i][0]);
          if (two) epi(r0 + i, c0 + W, acc[i][1]);
        }
      }
    }
  }

  // Dot product, rows [r_begin, r_end) of P = A (R, Kp) @ Bm (Cn, Kp)^T, Kp a multiple of W, both operands
  // row-major along k: epi(r, c, sum). 4 rows x kDotCols columns per tile, the horizontal sums reduced 8 at a
  // time; columns in blocks that keep their rows of Bm in L2 while all rows stream past.
  template <class Epi>
  static CHARMLP_CPU_INLINE void gemm_dot(int64_t r_begin, int64_t r_end, int64_t Cn, int64_t Kp, const float* A,
                                          int64_t lda, const float* Bm, int64_t ldb, Epi&& epi) {
    constexpr int NC = kDotCols;
    const int64_t col_block = std::max<int64_t>(NC, ((int64_t(1) << 18) / std::max<int64_t>(Kp, 1)) / NC * NC);
    for (int64_t cb = 0; cb < Cn; cb += col_block) {
      const int64_t cb_end = std::min(Cn, cb + col_block);
      for (int64_t r0 = r_begin; r0 < r_end; r0 += 4) {
        const float* a[4];
        for (int i = 0; i < 4; ++i) a[i] = A + std::min(r0 + i, r_end - 1) * lda;
        for (int64_t c0 = cb; c0 < cb_end; c0 += NC) {
          const float* bp[NC];
          for (int j = 0; j < NC; ++j) bp[j] = Bm + std::min(c0 + j, cb_end - 1) * ldb;
          vf acc[4 * NC] = {};  // acc[i * NC + j]: row r0 + i, column c0 + j
          for (int64_t k = 0; k < Kp; k += W) {
            vf b[NC];
#pragma GCC unroll 4
            for (int j = 0; j < NC; ++j) b[j] = S::load(bp[j] + k);
#pragma GCC unroll 4
            for (int i = 0; i < 4; ++i) {
              const vf ai = S::load(a[i] + k);
#pragma GCC unroll 4
              for (int j = 0; j < NC; ++j) acc[i * NC + j] = S::fma(ai, b[j], acc[i * NC + j]);
            }
          }
          float s[4 * NC];
          for (int q = 0; q < 4 * NC; q += 8) reduce8(acc + q, s + q);
          for (int i = 0; i < 4 && r0 + i < r_end; ++i)
            for (int j = 0; j < NC && c0 + j < cb_end; ++j) epi(r0 + i, c0 + j, s[i * NC + j]);
        }
      }
    }
  }

  // Wt (rows, Hp) = decay * Wt - lr * (At @ G), At (rows, B) and G (B, Hp): the SGD update of a weight matrix
  // (with weight decay: decay = 1 - lr * weight_decay) fused into its gradient product, so that the gradient never
  // exists.
  static CHARMLP_CPU_INLINE void sgd_update(float* Wt, int64_t rows, const float* At, const float* G, int64_t B,
                                            int64_t Hp, float lr, float decay) {
    const vf neg_lr = S::set1(-lr), keep = S::set1(decay);
    maybe_parallel((rows + kBcastRows - 1) / kBcastRows, rows * B * Hp, [&](int64_t lo, int64_t hi)
                                                                           CHARMLP_CPU_INLINE_LAMBDA {
      gemm_bcast(lo * kBcastRows, std::min(hi * kBcastRows, rows), B, At, B, G, Hp, Hp,
                 [&](int64_t r, int64_t c, const vf& s) CHARMLP_CPU_INLINE_LAMBDA {
                   float* p = Wt + r * Hp + c;
                   S::store(p, S::fma(neg_lr, s, S::load(p) * keep));
                 });
    });
  }
};

// ---- the products policies: the same six products, register-tiled or through BLAS -----------------------------
// Each writes exactly what its BLAS twin writes: hidden (h = tanh(x @ W1p + b1p), (B, Hp), padding columns
// tanh(0) = 0), logits (h @ W2T^T + b2 into the first V columns of logit), dpre (g = (dl @ W2T) * (1 - h^2)),
// update_W2 (W2T = decay W2T - lr dl^T @ h), dx (dx = g @ W1p^T), update_W1 (W1p = decay W1p - lr x^T @ g).
// The direct connections, when a model has them, are three more products outside the policies (direct_logits,
// direct_backward): always BLAS, as the sizes that want them (word vocabularies) are BLAS sizes.

template <cpu::Isa I>
struct SimdProducts {
  using K = Kernels<I>;
  using S = typename K::S;
  using vf = typename K::vf;
  static constexpr int W = K::W, MR = K::kBcastRows;

  static CHARMLP_CPU_INLINE void hidden(Workspace& ws) {
    const int64_t B = ws.B, TE = ws.TE, Hp = ws.Hp;
    for (int64_t b = 0; b < B; ++b)
      for (int64_t k = 0; k < TE; ++k) ws.xT[k * B + b] = ws.x[b * TE + k];  // for update_W1
    K::maybe_parallel((B + MR - 1) / MR, B * TE * Hp, [&](int64_t lo, int64_t hi) CHARMLP_CPU_INLINE_LAMBDA {
      K::gemm_bcast(lo * MR, std::min(hi * MR, B), TE, ws.x, TE, ws.W1p, Hp, Hp,
                    [&](int64_t r, int64_t c, const vf& s) CHARMLP_CPU_INLINE_LAMBDA {
                      S::store(ws.h + r * Hp + c, S::tanh(s + S::load(ws.b1p + c)));
                    });
    });
  }
  static CHARMLP_CPU_INLINE void logits(Workspace& ws, const float* b2) {
    const int64_t B = ws.B, Hp = ws.Hp, Vp = ws.Vp;
    K::maybe_parallel((B + 3) / 4, B * ws.V * Hp, [&](int64_t lo, int64_t hi) CHARMLP_CPU_INLINE_LAMBDA {
      K::gemm_dot(lo * 4, std::min(hi * 4, B), ws.V, Hp, ws.h, Hp, ws.W2T, Hp,
                  [&](int64_t r, int64_t c, float s) CHARMLP_CPU_INLINE_LAMBDA { ws.logit[r * Vp + c] = s + b2[c]; });
    });
  }
  static CHARMLP_CPU_INLINE void dpre(Workspace& ws) {
    const int64_t B = ws.B, Hp = ws.Hp;
    K::maybe_parallel((B + MR - 1) / MR, B * ws.V * Hp, [&](int64_t lo, int64_t hi) CHARMLP_CPU_INLINE_LAMBDA {
      K::gemm_bcast(lo * MR, std::min(hi * MR, B), ws.V, ws.logit, ws.Vp, ws.W2T, Hp, Hp,
                    [&](int64_t r, int64_t c, const vf& s) CHARMLP_CPU_INLINE_LAMBDA {
                      const vf hv = S::load(ws.h + r * Hp + c);
                      S::store(ws.g + r * Hp + c, s * (1.0f - hv * hv));
                    });
    });
  }
  static CHARMLP_CPU_INLINE void update_W2(Workspace& ws, float lr, float decay) {
    const int64_t B = ws.B, V = ws.V;
    for (int64_t b = 0; b < B; ++b)  // the broadcast product wants dl^T (V, B)
      for (int64_t v = 0; v < V; ++v) ws.dlT[v * B + b] = ws.logit[b * ws.Vp + v];
    K::sgd_update(ws.W2T, V, ws.dlT, ws.h, B, ws.Hp, lr, decay);
  }
  static CHARMLP_CPU_INLINE void dx(Workspace& ws) {
    const int64_t B = ws.B, TE = ws.TE, Hp = ws.Hp;
    K::maybe_parallel((B + 3) / 4, B * TE * Hp, [&](int64_t lo, int64_t hi) CHARMLP_CPU_INLINE_LAMBDA {
      K::gemm_dot(lo * 4, std::min(hi * 4, B), TE, Hp, ws.g, Hp, ws.W1p, Hp,
                  [&](int64_t r, int64_t c, float s) CHARMLP_CPU_INLINE_LAMBDA { ws.dx[r * TE + c] = s; });
    });
  }
  static CHARMLP_CPU_INLINE void update_W1(Workspace& ws, float lr, float decay) {
    K::sgd_update(ws.W1p, ws.TE, ws.xT, ws.g, ws.B, ws.Hp, lr, decay);
  }
};

template <cpu::Isa I>
struct BlasProducts {
  using K = Kernels<I>;
  using S = typename K::S;
  using vf = typename K::vf;
  static constexpr int W = K::W;

  static CHARMLP_CPU_INLINE void hidden(Workspace& ws) {
    const int64_t B = ws.B, Hp = ws.Hp;
    blas_gemm(ws.t_h.view({B, Hp}), ws.t_x.view({B, ws.TE}), ws.t_W1p.view({ws.TE, Hp}));
    K::maybe_parallel(B, B * Hp * 16, [&](int64_t lo, int64_t hi) CHARMLP_CPU_INLINE_LAMBDA {
      for (int64_t r = lo; r < hi; ++r)
        for (int64_t c = 0; c < Hp; c += W)
          S::store(ws.h + r * Hp + c, S::tanh(S::load(ws.h + r * Hp + c) + S::load(ws.b1p + c)));
    });
  }
  static CHARMLP_CPU_INLINE void logits(Workspace& ws, const float* b2) {
    blas_gemm(ws.t_logit.view({ws.B, ws.Vp}), ws.t_h.view({ws.B, ws.Hp}), ws.t_W2T.view({ws.Vp, ws.Hp}).t());
    K::maybe_parallel(ws.B, ws.B * ws.V * 16, [&](int64_t lo, int64_t hi) CHARMLP_CPU_INLINE_LAMBDA {
      for (int64_t r = lo; r < hi; ++r)
        for (int64_t v = 0; v < ws.V; ++v) ws.logit[r * ws.Vp + v] += b2[v];
    });
  }
  static CHARMLP_CPU_INLINE void dpre(Workspace& ws) {
    const int64_t B = ws.B, Hp = ws.Hp;
    blas_gemm(ws.t_g.view({B, Hp}), ws.t_logit.view({B, ws.Vp}), ws.t_W2T.view({ws.Vp, Hp}));
    K::maybe_parallel(B, B * Hp * 4, [&](int64_t lo, int64_t hi) CHARMLP_CPU_INLINE_LAMBDA {
      for (int64_t r = lo; r < hi; ++r)
        for (int64_t c = 0; c < Hp; c += W) {
          const vf hv = S::load(ws.h + r * Hp + c);
          S::store(ws.g + r * Hp + c, S::load(ws.g + r * Hp + c) * (1.0f - hv * hv));
        }
    });
  }
  static CHARMLP_CPU_INLINE void update_W2(Workspace& ws, float lr, float decay) {
    blas_gemm(ws.t_W2T.view({ws.Vp, ws.Hp}), ws.t_logit.view({ws.B, ws.Vp}).t(), ws.t_h.view({ws.B, ws.Hp}), decay,
              -lr);
  }
  static CHARMLP_CPU_INLINE void dx(Workspace& ws) {
    blas_gemm(ws.t_dx.view({ws.B, ws.TE}), ws.t_g.view({ws.B, ws.Hp}), ws.t_W1p.view({ws.TE, ws.Hp}).t());
  }
  static CHARMLP_CPU_INLINE void update_W1(Workspace& ws, float lr, float decay) {
    blas_gemm(ws.t_W1p.view({ws.TE, ws.Hp}), ws.t_x.view({ws.B, ws.TE}).t(), ws.t_g.view({ws.B, ws.Hp}), decay,
              -lr);
  }
};

// ---- the phases of one step ------------------------------------------------------------------------------------

// W1 -> W1p, b1 -> b1p, W2 -> W2T (the loop's layouts, see Workspace).
template <typename index_t>
void load_parameters(const Model<index_t>& md, Workspace& ws) {
  for (int64_t k = 0; k < ws.TE; ++k) std::copy(md.W1 + k * ws.H, md.W1 + (k + 1) * ws.H, ws.W1p + k * ws.Hp);
  std::copy(md.b1, md.b1 + ws.H, ws.b1p);
  for (int64_t j = 0; j < ws.H; ++j)
    for (int64_t v = 0; v < ws.V; ++v) ws.W2T[v * ws.Hp + j] = md.W2[j * ws.V + v];
  float* WdT = ws.t_WdT.data_ptr<float>();
  const float* Wd = md.W2 + ws.H * ws.V;  // the direct rows (TE, V), when there are any
  for (int64_t k = 0; k < (ws.direct ? ws.TE : 0); ++k)
    for (int64_t v = 0; v < ws.V; ++v) WdT[v * ws.TE + k] = Wd[k * ws.V + v];
}

template <typename index_t>
void store_parameters(const Model<index_t>& md, const Workspace& ws) {
  for (int64_t k = 0; k < ws.TE; ++k) std::copy(ws.W1p + k * ws.Hp, ws.W1p + k * ws.Hp + ws.H, md.W1 + k * ws.H);
  std::copy(ws.b1p, ws.b1p + ws.H, md.b1);
  for (int64_t j = 0; j < ws.H; ++j)
    for (int64_t v = 0; v < ws.V; ++v) md.W2[j * ws.V + v] = ws.W2T[v * ws.Hp + j];
  const float* WdT = ws.t_WdT.data_ptr<float>();
  float* Wd = md.W2 + ws.H * ws.V;
  for (int64_t k = 0; k < (ws.direct ? ws.TE : 0); ++k)
    for (int64_t v = 0; v < ws.V; ++v) Wd[k * ws.V + v] = WdT[v * ws.TE + k];
}

// The minibatch rows of step i into ws.rows; drawn one step ahead, so that their rows of X and Y are prefetched
// while step i - 1 computes (a random row of a 180k-example dataset is a cache miss, ~10 % of a step otherwise).
template <typename index_t>
void draw_minibatch(const CpuTrainArgs& a, const Model<index_t>& md, Workspace& ws, int64_t i) {
  int64_t* r = ws.rows.data() + (i % 2) * ws.B;
  for (int64_t b = 0; b < ws.B; ++b) {
    if (md.batch_idx) {
      r[b] = md.batch_idx[i * ws.B + b];
      TORCH_CHECK(r[b] >= 0 && r[b] < a.N, "batch_idx[", md.m, ", ", i, ", ", b, "] = ", r[b],
                  " is out of range for X with ", a.N, " rows");
    } else {
      r[b] = philox::minibatch_row(md.seed, static_cast<uint64_t>(a.start_step + i), static_cast<uint64_t>(b),
                                   static_cast<uint64_t>(a.N));
    }
    __builtin_prefetch(md.X + r[b] * ws.T);
    __builtin_prefetch(md.Y + r[b]);
  }
}

// The context embeddings x (B, TE) of step i's rows, their tokens and targets.
template <typename index_t>
void gather(const Model<index_t>& md, Workspace& ws, int64_t i) {
  const int64_t* rows = ws.step_rows(i);
  const int64_t T = ws.T, E = ws.E, V = ws.V;
  for (int64_t b = 0; b < ws.B; ++b) {
    const int64_t row = rows[b];
    for (int64_t t = 0; t < T; ++t) {
      const int64_t tk = static_cast<int64_t>(md.X[row * T + t]);
      TORCH_CHECK(tk >= 0 && tk < V, "X[", row, ", ", t, "] = ", tk, " is out of range for a vocabulary of ", V);
      ws.tok[b * T + t] = tk;
      std::copy(md.C + tk * E, md.C + (tk + 1) * E, ws.x + b * ws.TE + t * E);
    }
    const int64_t y = static_cast<int64_t>(md.Y[row]);
    TORCH_CHECK(y >= 0 && y < V, "Y[", row, "] = ", y, " is out of range for a vocabulary of ", V);
    ws.tgt[b] = y;
  }
}

// The paper's direct connections (Bengio et al. 2003, y = b + W x + U tanh(d + H x)), when the model has them:
// logits += x @ Wd (B, Vp; Wd's padding rows are zero, so the padding columns stay zero) ...
CHARMLP_CPU_INLINE void direct_logits(Workspace& ws) {
  blas_gemm(ws.t_logit.view({ws.B, ws.Vp}), ws.t_x.view({ws.B, ws.TE}), ws.t_WdT.t(), 1.0f);
}
// ... and, given dL/dlogits in logit, dx += dl @ Wd^T (before Wd changes), then Wd = decay Wd - lr x^T @ dl.
CHARMLP_CPU_INLINE void direct_backward(Workspace& ws, float lr, float decay) {
  const at::Tensor dl = ws.t_logit.view({ws.B, ws.Vp});
  blas_gemm(ws.t_dx.view({ws.B, ws.TE}), dl, ws.t_WdT, 1.0f);
  blas_gemm(ws.t_WdT, dl.t(), ws.t_x.view({ws.B, ws.TE}), decay, -lr);
}

// h = tanh(x @ W1p + b1p) (B, Hp) and the logits h @ W2T^T + b2 [+ x @ Wd] (B, V of Vp).
template <class P>
CHARMLP_CPU_INLINE void hidden_layer(Workspace& ws, const float* b2) {
  P::hidden(ws);
  P::logits(ws, b2);
  if (ws.direct) direct_logits(ws);
}

// Softmax cross-entropy of every row, the per-op row function (cpu/softmax_rows.h): the row's loss, and
// dL/dlogits = (softmax - onehot) / B in place of its logits. Only the V columns of a row enter it: the padding
// columns of logit stay zero. -> the step's mean loss.
template <cpu::Isa I>
CHARMLP_CPU_INLINE float softmax_rows(Workspace& ws) {
  const float inv_B = 1.0f / static_cast<float>(ws.B);
  Kernels<I>::maybe_parallel(ws.B, ws.B * ws.V * 16, [&](int64_t lo, int64_t hi) CHARMLP_CPU_INLINE_LAMBDA {
    for (int64_t b = lo; b < hi; ++b) {
      ws.rowloss[b] =
          cpu_simd::row_forward_grad<float, cpu::IsaTag<I>::kBytes>(ws.logit + b * ws.Vp, ws.V, ws.tgt[b], inv_B)
              .loss;
    }
  });
  float step_loss = 0.f;
  for (int64_t b = 0; b < ws.B; ++b) step_loss += ws.rowloss[b];
  return step_loss * inv_B;
}

// The mean loss of each window of loss_every steps (and of the last, shorter one) into a.losses.
struct LossWindow {
  float sum = 0.f;
  int64_t count = 0, pos = 0;
};
inline void loss_window(const CpuTrainArgs& a, int64_t m, int64_t i, float step_loss, LossWindow& w) {
  w.sum += step_loss;
  if (++w.count == a.loss_every || i == a.S - 1) {
    a.losses[m * a.num_losses + w.pos++] = w.sum / static_cast<float>(w.count);
    w.sum = 0.f;
    w.count = 0;
  }
}

// The backward and the SGD update of W1, b1, W2, b2 (and the direct connections), in the order that reads every
// weight before it changes: dpre (needs the old W2T), W2T and b2, dx (needs the old W1p and Wd), Wd, W1p and b1p.
// decay = 1 - lr * weight_decay scales the weights (not the biases) in their updates.
template <cpu::Isa I, class P>
CHARMLP_CPU_INLINE void backward_products(Workspace& ws, float* b2, float lr, float decay) {
  using S = typename Kernels<I>::S;
  using vf = typename S::V;
  const int64_t B = ws.B, V = ws.V, Hp = ws.Hp;
  P::dpre(ws);
  P::update_W2(ws, lr, decay);
  // b2 -= lr * (the column sums of dl), each summed over b in order (whatever the columns' split over the threads),
  // row by row along the contiguous logits.
  float* colsum = ws.dlT;  // free again after update_W2: V floats of it
  Kernels<I>::maybe_parallel(V, B * V * 16, [&](int64_t lo, int64_t hi) CHARMLP_CPU_INLINE_LAMBDA {
    std::fill(colsum + lo, colsum + hi, 0.f);
    for (int64_t b = 0; b < B; ++b) {
      const float* row = ws.logit + b * ws.Vp;
      for (int64_t v = lo; v < hi; ++v) colsum[v] += row[v];
    }
    for (int64_t v = lo; v < hi; ++v) b2[v] -= lr * colsum[v];
  });
  P::dx(ws);
  if (ws.direct) direct_backward(ws, lr, decay);
  P::update_W1(ws, lr, decay);
  const vf neg_lr = S::set1(-lr);
  for (int64_t c = 0; c < Hp; c += S::N) {
    vf s = {};
    for (int64_t b = 0; b < B; ++b) s += S::load(ws.g + b * Hp + c);
    S::store(ws.b1p + c, S::fma(neg_lr, s, S::load(ws.b1p + c)));
  }
}

// C = decay * C - lr * dC, dC = the rows of dx scattered onto their tokens (in (b, t) order: deterministic).
// Without weight decay (decay 1) only the rows of the step's B * T tokens change, so only they are visited: a word
// vocabulary's whole table would be read and written every step. A token that occurs twice finds its dC row
// already cleared the second time, and C * 1 - lr * 0 is C exactly: the same result as the pass over every row.
template <typename index_t>
void embedding_update(const Model<index_t>& md, Workspace& ws, float lr, float decay) {
  const int64_t E = ws.E, BT = ws.B * ws.T;
  for (int64_t p = 0; p < BT; ++p) {
    float* dst = ws.dC + ws.tok[p] * E;
    const float* src = ws.dx + p * E;  // dx (B, TE) is (B*T, E) row by row
    for (int64_t e = 0; e < E; ++e) dst[e] += src[e];
  }
  const auto update_row = [&](int64_t v) {
    float *c = md.C + v * E, *d = ws.dC + v * E;
    for (int64_t e = 0; e < E; ++e) {
      c[e] = c[e] * decay - lr * d[e];
      d[e] = 0.f;
    }
  };
  if (decay == 1.0f) {
    for (int64_t p = 0; p < BT; ++p) update_row(ws.tok[p]);
  } else {
    for (int64_t v = 0; v < ws.V; ++v) update_row(v);
  }
}

// ---- the loop -----------------------------------------------------------------------------------------------------

// a.S steps of model m, compiled for I with the products of P (SimdProducts<I> or BlasProducts<I>).
template <cpu::Isa I, class P, typename index_t>
CHARMLP_CPU_INLINE void train_one_model(const CpuTrainArgs& a, int64_t m) {
  const Model<index_t> md(a, m);
  Workspace ws(a, Kernels<I>::W);
  load_parameters(md, ws);
  LossWindow window;
  if (a.S > 0) draw_minibatch(a, md, ws, 0);
  for (int64_t i = 0; i < a.S; ++i) {
    const float lr = md.lrs[i], decay = 1.0f - lr * a.weight_decay;
    gather(md, ws, i);
    if (i + 1 < a.S) draw_minibatch(a, md, ws, i + 1);
    hidden_layer<P>(ws, md.b2);
    const float step_loss = softmax_rows<I>(ws);
    backward_products<I, P>(ws, md.b2, lr, decay);
    embedding_update(md, ws, lr, decay);
    loss_window(a, m, i, step_loss, window);
  }
  store_parameters(md, ws);
}

// One model in the clone of isa, with the products of Products.
template <template <cpu::Isa> class Products, typename index_t>
void train_model(const CpuTrainArgs& a, int64_t m, cpu::Isa isa) {
  cpu::with_isa(isa, [&](auto tag) CHARMLP_CPU_INLINE_LAMBDA {
    constexpr cpu::Isa I = decltype(tag)::isa;
    train_one_model<I, Products<I>, index_t>(a, m);
  });
}

// All models of the call: independent, so they run on the intra-op threads side by side (each model serial).
// The products policy is chosen here, once: BLAS from kBlasWork multiply-adds per step (the register-tiled
// products win below, where the ~5 us of each of the six BLAS calls is not amortised), or as CHARMLP_CPU_GEMM says.
inline void train_models(const CpuTrainArgs& a, cpu::Isa isa) {
  const int64_t w = isa == cpu::Isa::kAvx512 ? 16 : isa == cpu::Isa::kAvx2 ? 8 : 4;  // floats per vector
  const int64_t Hp = (a.H + w - 1) / w * w, Vp = (a.V + w - 1) / w * w;
  const bool blas =
      a.gemm == CpuGemm::kBlas || (a.gemm == CpuGemm::kAuto && a.B * Hp * (2 * a.T * a.E + 2 * Vp) >= kBlasWork);
  using TrainFn = void (*)(const CpuTrainArgs&, int64_t, cpu::Isa);
  const TrainFn train = blas ? (a.idx64 ? &train_model<BlasProducts, int64_t> : &train_model<BlasProducts, int32_t>)
                             : (a.idx64 ? &train_model<SimdProducts, int64_t> : &train_model<SimdProducts, int32_t>);
  auto run = [&](int64_t lo, int64_t hi) {
    for (int64_t m = lo; m < hi; ++m) train(a, m, isa);
  };
  if (a.M > 1) {
    at::parallel_for(0, a.M, 1, run);
  } else {
    run(0, a.M);
  }
}

}  // namespace cpu_train
}  // namespace charmlp
