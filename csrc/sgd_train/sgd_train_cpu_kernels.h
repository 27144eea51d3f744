// The CPU training loop of charmlp::sgd_train, written once with GCC vector extensions and compiled once per
// instruction set: sgd_train.cpp includes this file inside a namespace under `#pragma GCC target(...)` for
// AVX-512 (W = 16 floats), AVX2+FMA (W = 8) and the baseline ISA (W = 4), and picks one at run time. That is how
// an extension built with plain -O3 (no -march) still runs at the speed of the machine it is on.
//
// No include guard and no #include on purpose (see above). Before inclusion define:
//   CHARMLP_VW            vector width in floats
//   CHARMLP_VFMA(a, b, c) a * b + c on vectors, fused where the ISA has FMA (ISO C++ forbids the compiler to
//                         contract a * b + c itself)
//
// Why it is fast (seed size: B=32, T=3, E=10, H=200, V=27, ~2.2 MFLOP per step; ~30 us/step on one core here
// against ~180-240 us for the eager reference):
//  * every buffer is allocated once per call, not per step; parameters live in layouts chosen for the loop:
//    W1 as (T*E, Hp) and W2 transposed as (Vp, Hp), H and V padded to Hp, Vp (multiples of W) with zeros that stay
//    zero, so that all six products of a step run along the contiguous hidden dimension;
//  * four of them are "broadcast" products (out row += a scalar times a W-wide row of B; 8 (AVX-512) or 4 rows x
//    2W register tile), two are dot products (4 x 4 or 4 x 2 tile, the horizontal sums reduced 8 at a time);
//  * the SGD update is fused into the gradient products (W -= lr * (A @ B) in the epilogue, no gradient buffer),
//    each after the last read of the old weights (dh before the W2 update, dx before the W1 update);
//  * tanh and exp are vectorised (Cephes polynomials, ~2 ulp), which matters: 6,400 scalar tanhf per step would
//    cost more than all the products together;
//  * the next step's minibatch rows are drawn one step ahead and prefetched.
// Above ~2 M multiply-adds per step the register tiles run out of cache (no panel packing) and the same loop runs
// its six products through BLAS (blas_gemm in sgd_train.cpp, on views of the same buffers; MKL packs and blocks)
// and keeps its own gather, tanh, softmax, scatter and updates.
// Results are deterministic and do not depend on the thread count or on how many models share the call: every sum
// of the SIMD path has a fixed order, and the BLAS path computes fixed tiles of each product with one
// single-threaded BLAS call each (see blas_gemm).

constexpr int W = CHARMLP_VW;
typedef float vf __attribute__((vector_size(W * sizeof(float))));
typedef int32_t vi __attribute__((vector_size(W * sizeof(int32_t))));
typedef float v8f __attribute__((vector_size(8 * sizeof(float))));
typedef float v4f __attribute__((vector_size(4 * sizeof(float))));

static inline vf vload(const float* p) {
  vf v;
  __builtin_memcpy(&v, p, sizeof(v));
  return v;
}
static inline void vstore(float* p, vf v) { __builtin_memcpy(p, &v, sizeof(v)); }
// s in every lane. Written s - 0, not 0 + s: the compiler may drop "- 0" (exact for every s) but not "+ 0" (it
// turns -0 into +0), and the leftover scalar add before each broadcast cost the broadcast products a third of
// their speed (no FMA with an embedded broadcast, and a shuffle uop on an FMA port).
static inline vf vset1(float s) { return s - vf{}; }
static inline vf vfma(vf a, vf b, vf c) { return CHARMLP_VFMA(a, b, c); }
static inline vf vmin(vf a, vf b) { return a < b ? a : b; }
static inline vf vmax(vf a, vf b) { return a > b ? a : b; }

// exp(x) for x <= 88.37 (Cephes expf: 2^n * P(r), r = x - n ln2 in two parts; ~1 ulp). Below -87.3 it returns
// ~2^-126 instead of a denormal or 0, which is exact enough wherever it is added to something of order 1.
static inline vf vexp(vf x) {
  x = vmin(vmax(x, vset1(-87.3365447504f)), vset1(88.3762626647949f));
  vf n = x * 1.44269504088896341f;
  n = (n + 12582912.0f) - 12582912.0f;  // round to nearest integer (1.5 * 2^23 trick, |n| <= 128)
  x = vfma(n, vset1(-0.693359375f), x);
  x = vfma(n, vset1(2.12194440e-4f), x);
  const vf z = x * x;
  vf y = vset1(1.9875691500e-4f);
  y = vfma(y, x, vset1(1.3981999507e-3f));
  y = vfma(y, x, vset1(8.3334519073e-3f));
  y = vfma(y, x, vset1(4.1665795894e-2f));
  y = vfma(y, x, vset1(1.6666665459e-1f));
  y = vfma(y, x, vset1(5.0000001201e-1f));
  y = vfma(y, z, x) + 1.0f;
  const vi e = (__builtin_convertvector(n, vi) + 127) << 23;  // 2^n as float bits
  return y * (vf)e;
}

// tanh(x) (Cephes tanhf, ~2 ulp): an odd polynomial below |x| = 0.625, 1 - 2 / (exp(2|x|) + 1) above.
static inline vf vtanh(vf x) {
  const vi sign_mask = vi{} + static_cast<int32_t>(0x80000000u);
  const vi sign = (vi)x & sign_mask;
  const vf ax = (vf)((vi)x & ~sign_mask);
  const vf z = x * x;
  vf p = vset1(-5.70498872745e-3f);
  p = vfma(p, z, vset1(2.06390887954e-2f));
  p = vfma(p, z, vset1(-5.37397155531e-2f));
  p = vfma(p, z, vset1(1.33314422036e-1f));
  p = vfma(p, z, vset1(-3.33332819422e-1f));
  const vf small = vfma(x * z, p, x);
  const vf large_abs = 1.0f - 2.0f / (vexp(ax + ax) + 1.0f);
  const vf large = (vf)((vi)large_abs | sign);
  return ax < 0.625f ? small : large;
}

// Horizontal sums of 8 accumulators at once: out[i] = sum of the lanes of acc[i]. Pairs of vectors are folded
// into one ("lanes of x then lanes of y"), halving the lanes per accumulator at each level, so 8 sums cost
// 7 folds instead of 8 * log2(W) shuffles.
#if CHARMLP_VW >= 8
static inline v8f fold8_a(v8f x, v8f y) {  // groups of 8 -> 4
  return __builtin_shufflevector(x, y, 0, 1, 2, 3, 8, 9, 10, 11) +
         __builtin_shufflevector(x, y, 4, 5, 6, 7, 12, 13, 14, 15);
}
static inline v8f fold8_b(v8f x, v8f y) {  // groups of 4 -> 2
  return __builtin_shufflevector(x, y, 0, 1, 8, 9, 4, 5, 12, 13) +
         __builtin_shufflevector(x, y, 2, 3, 10, 11, 6, 7, 14, 15);
}
static inline v8f fold8_c(v8f x, v8f y) {  // groups of 2 -> 1
  return __builtin_shufflevector(x, y, 0, 8, 2, 10, 4, 12, 6, 14) +
         __builtin_shufflevector(x, y, 1, 9, 3, 11, 5, 13, 7, 15);
}
static inline void reduce8_v8(const v8f* a, float* out) {
  const v8f z = fold8_c(fold8_b(fold8_a(a[0], a[1]), fold8_a(a[2], a[3])),
                        fold8_b(fold8_a(a[4], a[5]), fold8_a(a[6], a[7])));
  // The folds leave accumulator perm[l] in lane l.
  constexpr int perm[8] = {0, 4, 2, 6, 1, 5, 3, 7};
  for (int l = 0; l < 8; ++l) out[perm[l]] = z[l];
}
#endif
static inline void reduce8(const vf* acc, float* out) {
#if CHARMLP_VW == 16
  v8f h[8];
  for (int i = 0; i < 8; ++i) {
    h[i] = __builtin_shufflevector(acc[i], acc[i], 0, 1, 2, 3, 4, 5, 6, 7) +
           __builtin_shufflevector(acc[i], acc[i], 8, 9, 10, 11, 12, 13, 14, 15);
  }
  reduce8_v8(h, out);
#elif CHARMLP_VW == 8
  reduce8_v8(acc, out);
#elif CHARMLP_VW == 4
  auto fold_a = [](v4f x, v4f y) {
    return __builtin_shufflevector(x, y, 0, 1, 4, 5) + __builtin_shufflevector(x, y, 2, 3, 6, 7);
  };
  auto fold_b = [](v4f x, v4f y) {
    return __builtin_shufflevector(x, y, 0, 4, 2, 6) + __builtin_shufflevector(x, y, 1, 5, 3, 7);
  };
  const v4f z0 = fold_b(fold_a(acc[0], acc[1]), fold_a(acc[2], acc[3]));  // lanes: acc 0, 2, 1, 3
  const v4f z1 = fold_b(fold_a(acc[4], acc[5]), fold_a(acc[6], acc[7]));  // lanes: acc 4, 6, 5, 7
  out[0] = z0[0], out[2] = z0[1], out[1] = z0[2], out[3] = z0[3];
  out[4] = z1[0], out[6] = z1[1], out[5] = z1[2], out[7] = z1[3];
#else
#error "CHARMLP_VW must be 4, 8 or 16"
#endif
}

// ---- the two product shapes -----------------------------------------------------------------------------------

// Register tiles: AVX-512 has 32 vector registers, so its tiles hold 16 accumulators (two FMA ports x 4 cycles of
// latency x 2 to also cover the loads); AVX2 and SSE have 16 and use 8.
constexpr int kBcastRows = W == 16 ? 8 : 4;  // rows of a broadcast-product tile (x 2 vectors of columns)
constexpr int kDotCols = W == 16 ? 4 : 2;    // columns of a dot-product tile (x 4 rows)

// Broadcast product, rows [r_begin, r_end) of P = A (R, K) @ Bm (K, Np), Np a multiple of W:
// epi(r, c, acc) receives the W-wide slice P[r, c:c+W]. Column panels of 2W outer (the panel of Bm stays in L1/L2
// across row blocks), blocks of kBcastRows rows inner; the edge rows are computed on a clamped duplicate and not
// emitted.
template <class Epi>
static inline void gemm_bcast(int64_t r_begin, int64_t r_end, int64_t K, const float* A, int64_t lda,
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
          const vf b0 = vload(bp), b1 = vload(bp + W);
#pragma GCC unroll 8
          for (int i = 0; i < MR; ++i) {
            const vf ai = vset1(a[i][k]);
            acc[i][0] = vfma(ai, b0, acc[i][0]);
            acc[i][1] = vfma(ai, b1, acc[i][1]);
          }
        }
      } else {
        for (int64_t k = 0; k < K; ++k, bp += ldb) {
          const vf b0 = vload(bp);
#pragma GCC unroll 8
          for (int i = 0; i < MR; ++i) acc[i][0] = vfma(vset1(a[i][k]), b0, acc[i][0]);
        }
      }
      for (int i = 0; i < MR && r0 + i < r_end; ++i) {
        epi(r0 + i, c0, acc[i][0]);
        if (two) epi(r0 + i, c0 + W, acc[i][1]);
      }
    }
  }
}

// Dot product, rows [r_begin, r_end) of P = A (R, Kp) @ Bm (Cn, Kp)^T, Kp a multiple of W, both operands row-major
// along k: epi(r, c, sum). 4 rows x kDotCols columns per tile, the horizontal sums reduced 8 at a time; columns in
// blocks that keep their rows of Bm in L2 while all rows stream past.
template <class Epi>
static inline void gemm_dot(int64_t r_begin, int64_t r_end, int64_t Cn, int64_t Kp, const float* A, int64_t lda,
                            const float* Bm, int64_t ldb, Epi&& epi) {
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
          for (int j = 0; j < NC; ++j) b[j] = vload(bp[j] + k);
#pragma GCC unroll 4
          for (int i = 0; i < 4; ++i) {
            const vf ai = vload(a[i] + k);
#pragma GCC unroll 4
            for (int j = 0; j < NC; ++j) acc[i * NC + j] = vfma(ai, b[j], acc[i * NC + j]);
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

// Per-step multiply-adds (of B * Hp * (2 TE + 2 Vp)) from which the BLAS path is used (see train_one_model).
constexpr int64_t kBlasWork = int64_t(2) << 20;

// Runs fn(begin, end) over [0, n) on the intra-op threads when the total work (in FMAs) repays the fork/join
// (~5 us), serially otherwise — always at the seed's size, and always inside the per-model parallel loop.
template <class Fn>
static inline void maybe_parallel(int64_t n, int64_t work, Fn&& fn) {
  constexpr int64_t kParallelWork = int64_t(1) << 20;
  if (work >= kParallelWork && n > 1 && !at::in_parallel_region() && at::get_num_threads() > 1) {
    const int64_t grain = std::max<int64_t>(1, n * kParallelWork / (4 * work));
    at::parallel_for(0, n, grain, fn);
  } else {
    fn(0, n);
  }
}

// ---- the training loop of one model ---------------------------------------------------------------------------

template <typename index_t>
static void train_one_model(const CpuTrainArgs& a, int64_t m) {
  const int64_t B = a.B, T = a.T, E = a.E, TE = T * E, H = a.H, V = a.V, N = a.N;
  const int64_t Hp = (H + W - 1) / W * W;  // hidden, padded with zeros to whole vectors
  const int64_t Vp = (V + W - 1) / W * W;  // vocabulary, padded likewise (the logits' row stride)
  float* C = a.C + m * V * E;     // (V, E), updated in place
  float* W1 = a.W1 + m * TE * H;  // (TE, H), copied into W1p for the call
  float* b1 = a.b1 + m * H;
  float* W2 = a.W2 + m * H * V;   // (H, V), copied transposed into W2T for the call
  float* b2 = a.b2 + m * V;       // (V,), updated in place
  const index_t* X = static_cast<const index_t*>(a.X);
  const index_t* Y = static_cast<const index_t*>(a.Y);
  const float* lrs = a.lrs + m * a.lr_stride;
  const int64_t* batch_idx = a.batch_idx ? a.batch_idx + m * a.idx_stride : nullptr;
  const uint64_t seed = a.seeds ? static_cast<uint64_t>(a.seeds[m]) : 0;

  // Working set of the call (seed size: ~90 KB, L2-resident). Padding rows/columns are zero and stay zero. The
  // float buffers come from ATen's allocator (64-byte aligned) so that the BLAS path's operands are aligned the same
  // way in every call, whichever model of a call they belong to.
  const auto zeros = [](int64_t n) { return at::zeros({n}, at::TensorOptions().dtype(at::kFloat)); };
  const at::Tensor buf_W1p = zeros(TE * Hp), buf_b1p = zeros(Hp), buf_W2T = zeros(Vp * Hp);
  const at::Tensor buf_h = zeros(B * Hp), buf_g = zeros(B * Hp), buf_x = zeros(B * TE), buf_xT = zeros(TE * B);
  const at::Tensor buf_logit = zeros(B * Vp), buf_dlT = zeros(V * B), buf_dx = zeros(B * TE), buf_dC = zeros(V * E);
  const at::Tensor buf_rowloss = zeros(B);
  float* const W1p = buf_W1p.data_ptr<float>();    // W1 (TE, Hp)
  float* const b1p = buf_b1p.data_ptr<float>();    // b1 (Hp)
  float* const W2T = buf_W2T.data_ptr<float>();    // W2 transposed (Vp, Hp)
  float* const h = buf_h.data_ptr<float>();        // tanh activations (B, Hp)
  float* const g = buf_g.data_ptr<float>();        // dpre = dL/d(pre-activation) (B, Hp)
  float* const x = buf_x.data_ptr<float>();        // gathered embeddings (B, TE)
  float* const xT = buf_xT.data_ptr<float>();      // and transposed (TE, B)
  float* const logit = buf_logit.data_ptr<float>();  // logits -> dL/dlogits (B, Vp)
  float* const dlT = buf_dlT.data_ptr<float>();    // dL/dlogits transposed (V, B)
  float* const dx = buf_dx.data_ptr<float>();      // dL/dx (B, TE)
  float* const dC = buf_dC.data_ptr<float>();      // dL/dC (V, E)
  float* const rowloss = buf_rowloss.data_ptr<float>();  // (B)
  std::vector<int64_t> tok(B * T), tgt(B);

  for (int64_t k = 0; k < TE; ++k) std::copy(W1 + k * H, W1 + (k + 1) * H, W1p + k * Hp);
  std::copy(b1, b1 + H, b1p);
  for (int64_t j = 0; j < H; ++j)
    for (int64_t v = 0; v < V; ++v) W2T[v * Hp + j] = W2[j * V + v];

  // Large products go through BLAS (MKL: packed panels, cache blocking) on views of the same buffers; the
  // register-tiled products win below ~2 M multiply-adds per step (the seed: 0.7 M), where the ~5 us of each of
  // the six BLAS calls is not amortised.
  const bool blas = a.gemm == CpuGemm::kBlas || (a.gemm == CpuGemm::kAuto && B * Hp * (2 * TE + 2 * Vp) >= kBlasWork);
  const at::Tensor tx = buf_x.view({B, TE}), tW1p = buf_W1p.view({TE, Hp}), th = buf_h.view({B, Hp}),
                   tg = buf_g.view({B, Hp}), tlogit = buf_logit.view({B, Vp}), tW2T = buf_W2T.view({Vp, Hp}),
                   tdx = buf_dx.view({B, TE});

  // Minibatch rows of step i into rows[i % 2]; one step ahead, so that their rows of X and Y are prefetched
  // while step i computes (a random row of a 180k-example dataset is a cache miss, ~10 % of a step otherwise).
  std::vector<int64_t> rows(2 * B);
  auto draw_rows = [&](int64_t i) {
    int64_t* r = rows.data() + (i % 2) * B;
    for (int64_t b = 0; b < B; ++b) {
      if (batch_idx) {
        r[b] = batch_idx[i * B + b];
        TORCH_CHECK(r[b] >= 0 && r[b] < N, "batch_idx[", m, ", ", i, ", ", b, "] = ", r[b],
                    " is out of range for X with ", N, " rows");
      } else {
        r[b] = philox::minibatch_row(seed, static_cast<uint64_t>(a.start_step + i), static_cast<uint64_t>(b),
                                     static_cast<uint64_t>(N));
      }
      __builtin_prefetch(X + r[b] * T);
      __builtin_prefetch(Y + r[b]);
    }
  };

  // Wt (rows, Hp) -= lr * (At @ G), At (rows, B) and G (B, Hp): the SGD update of a weight matrix fused into its
  // gradient product, so that the gradient never exists.
  auto sgd_update = [&](float* Wt, int64_t rows, const float* At, const float* G, const vf& neg_lr) {
    maybe_parallel((rows + kBcastRows - 1) / kBcastRows, rows * B * Hp, [&](int64_t lo, int64_t hi) {
      gemm_bcast(lo * kBcastRows, std::min(hi * kBcastRows, rows), B, At, B, G, Hp, Hp,
                 [&](int64_t r, int64_t c, vf s) {
                   float* p = Wt + r * Hp + c;
                   vstore(p, vfma(neg_lr, s, vload(p)));
                 });
    });
  };

  float window_sum = 0.f;
  int64_t window_count = 0, loss_pos = 0;
  const float inv_B = 1.0f / static_cast<float>(B);
  if (a.S > 0) draw_rows(0);
  for (int64_t i = 0; i < a.S; ++i) {
    const float lr = lrs[i];
    const vf neg_lr = vset1(-lr);

    // 1. Minibatch: gather the context embeddings x (B, TE) of this step's rows, then draw the next step's.
    const int64_t* step_rows = rows.data() + (i % 2) * B;
    for (int64_t b = 0; b < B; ++b) {
      const int64_t row = step_rows[b];
      for (int64_t t = 0; t < T; ++t) {
        const int64_t tk = static_cast<int64_t>(X[row * T + t]);
        TORCH_CHECK(tk >= 0 && tk < V, "X[", row, ", ", t, "] = ", tk, " is out of range for a vocabulary of ", V);
        tok[b * T + t] = tk;
        std::copy(C + tk * E, C + (tk + 1) * E, x + b * TE + t * E);
      }
      const int64_t y = static_cast<int64_t>(Y[row]);
      TORCH_CHECK(y >= 0 && y < V, "Y[", row, "] = ", y, " is out of range for a vocabulary of ", V);
      tgt[b] = y;
    }
    if (i + 1 < a.S) draw_rows(i + 1);

    // 2. h = tanh(x @ W1p + b1p)   (B, Hp); the padding columns come out as tanh(0) = 0.
    if (blas) {
      blas_gemm(th, tx, tW1p);
      maybe_parallel(B, B * Hp * 16, [&](int64_t lo, int64_t hi) {
        for (int64_t r = lo; r < hi; ++r)
          for (int64_t c = 0; c < Hp; c += W)
            vstore(h + r * Hp + c, vtanh(vload(h + r * Hp + c) + vload(b1p + c)));
      });
    } else {
      for (int64_t b = 0; b < B; ++b)
        for (int64_t k = 0; k < TE; ++k) xT[k * B + b] = x[b * TE + k];
      maybe_parallel((B + kBcastRows - 1) / kBcastRows, B * TE * Hp, [&](int64_t lo, int64_t hi) {
        gemm_bcast(lo * kBcastRows, std::min(hi * kBcastRows, B), TE, x, TE, W1p, Hp, Hp,
                   [&](int64_t r, int64_t c, vf s) { vstore(h + r * Hp + c, vtanh(s + vload(b1p + c))); });
      });
    }

    // 3. logits = h @ W2T^T + b2   (B, V)
    if (blas) {
      blas_gemm(tlogit, th, tW2T.t());
      for (int64_t r = 0; r < B; ++r)
        for (int64_t v = 0; v < V; ++v) logit[r * Vp + v] += b2[v];
    } else {
      maybe_parallel((B + 3) / 4, B * V * Hp, [&](int64_t lo, int64_t hi) {
        gemm_dot(lo * 4, std::min(hi * 4, B), V, Hp, h, Hp, W2T, Hp,
                 [&](int64_t r, int64_t c, float s) { logit[r * Vp + c] = s + b2[c]; });
      });
    }

    // 4. Softmax cross-entropy: loss per row, and dL/dlogits = (softmax - onehot) / B in place of the logits
    //    (zero in the padding columns).
    maybe_parallel(B, B * V * 16, [&](int64_t lo, int64_t hi) {
      for (int64_t b = lo; b < hi; ++b) {
        float* l = logit + b * Vp;
        float mx = l[0];
        for (int64_t v = 1; v < V; ++v) mx = std::max(mx, l[v]);
        const float l_target = l[tgt[b]];
        vf vsum = {};
        for (int64_t v = 0; v < Vp; v += W) {
          vf e = vexp(vload(l + v) - mx);
          if (v + W > V) {
            vi lane;
            for (int q = 0; q < W; ++q) lane[q] = static_cast<int32_t>(v + q);
            e = lane < static_cast<int32_t>(V) ? e : vf{};
          }
          vstore(l + v, e);
          vsum += e;
        }
        float sum = 0.f;
        for (int q = 0; q < W; ++q) sum += vsum[q];
        rowloss[b] = mx + std::log(sum) - l_target;
        const vf scale = vset1(1.0f / sum * inv_B);
        for (int64_t v = 0; v < Vp; v += W) vstore(l + v, vload(l + v) * scale);
        l[tgt[b]] -= inv_B;
      }
    });
    float step_loss = 0.f;
    for (int64_t b = 0; b < B; ++b) step_loss += rowloss[b];
    window_sum += step_loss * inv_B;

    // 5. dpre = (dl @ W2T) * (1 - h^2)   (B, Hp) — before W2 changes.
    if (blas) {
      blas_gemm(tg, tlogit, tW2T);
      maybe_parallel(B, B * Hp * 4, [&](int64_t lo, int64_t hi) {
        for (int64_t r = lo; r < hi; ++r)
          for (int64_t c = 0; c < Hp; c += W) {
            const vf hv = vload(h + r * Hp + c);
            vstore(g + r * Hp + c, vload(g + r * Hp + c) * (1.0f - hv * hv));
          }
      });
    } else {
      maybe_parallel((B + kBcastRows - 1) / kBcastRows, B * V * Hp, [&](int64_t lo, int64_t hi) {
        gemm_bcast(lo * kBcastRows, std::min(hi * kBcastRows, B), V, logit, Vp, W2T, Hp, Hp,
                   [&](int64_t r, int64_t c, vf s) {
                     const vf hv = vload(h + r * Hp + c);
                     vstore(g + r * Hp + c, s * (1.0f - hv * hv));
                   });
      });
    }

    // 6. W2T -= lr * (dl^T @ h), b2 -= lr * sum_b dl — the gradient never materialises.
    for (int64_t b = 0; b < B; ++b)
      for (int64_t v = 0; v < V; ++v) dlT[v * B + b] = logit[b * Vp + v];
    if (blas) {
      blas_gemm(tW2T, tlogit.t(), th, 1.0f, -lr);
    } else {
      sgd_update(W2T, V, dlT, h, neg_lr);
    }
    for (int64_t v = 0; v < V; ++v) {
      float s = 0.f;
      for (int64_t b = 0; b < B; ++b) s += dlT[v * B + b];
      b2[v] -= lr * s;
    }

    // 7. dx = dpre @ W1p^T   (B, TE) — before W1 changes.
    if (blas) {
      blas_gemm(tdx, tg, tW1p.t());
    } else {
      maybe_parallel((B + 3) / 4, B * TE * Hp, [&](int64_t lo, int64_t hi) {
        gemm_dot(lo * 4, std::min(hi * 4, B), TE, Hp, g, Hp, W1p, Hp,
                 [&](int64_t r, int64_t c, float s) { dx[r * TE + c] = s; });
      });
    }

    // 8. W1p -= lr * (x^T @ dpre), b1p -= lr * sum_b dpre.
    if (blas) {
      blas_gemm(tW1p, tx.t(), tg, 1.0f, -lr);
    } else {
      sgd_update(W1p, TE, xT, g, neg_lr);
    }
    for (int64_t c = 0; c < Hp; c += W) {
      vf s = {};
      for (int64_t b = 0; b < B; ++b) s += vload(g + b * Hp + c);
      vstore(b1p + c, vfma(neg_lr, s, vload(b1p + c)));
    }

    // 9. C -= lr * dC, dC = the rows of dx scattered onto their tokens (in (b, t) order: deterministic).
    for (int64_t p = 0; p < B * T; ++p) {
      float* dst = dC + tok[p] * E;
      const float* src = dx + p * E;  // dx (B, TE) is (B*T, E) row by row
      for (int64_t e = 0; e < E; ++e) dst[e] += src[e];
    }
    for (int64_t q = 0; q < V * E; ++q) {
      C[q] -= lr * dC[q];
      dC[q] = 0.f;
    }

    if (++window_count == a.loss_every || i == a.S - 1) {
      a.losses[m * a.num_losses + loss_pos++] = window_sum / static_cast<float>(window_count);
      window_sum = 0.f;
      window_count = 0;
    }
  }

  for (int64_t k = 0; k < TE; ++k) std::copy(W1p + k * Hp, W1p + k * Hp + H, W1 + k * H);
  std::copy(b1p, b1p + H, b1);
  for (int64_t j = 0; j < H; ++j)
    for (int64_t v = 0; v < V; ++v) W2[j * V + v] = W2T[v * Hp + j];
}

// All models of the call: independent, so they run on the intra-op threads side by side (each model serial).
static void train_models(const CpuTrainArgs& a) {
  auto run = [&](int64_t lo, int64_t hi) {
    for (int64_t m = lo; m < hi; ++m) {
      if (a.idx64) {
        train_one_model<int64_t>(a, m);
      } else {
        train_one_model<int32_t>(a, m);
      }
    }
  };
  if (a.M > 1) {
    at::parallel_for(0, a.M, 1, run);
  } else {
    run(0, a.M);
  }
}
