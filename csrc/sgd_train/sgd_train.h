// Whole-training ops (persistent SGD), shared by the CPU (sgd_train.cpp) and CUDA (sgd_train_cuda.cu) kernels:
//   1. Philox4x32-10, the counter-based RNG that draws the minibatches: row b of step s of a model with seed k is
//      minibatch_row(k, s, b, N), a pure function, so CPU and CUDA (and a chunked and an unchunked run) draw the
//      same rows bit for bit, and nothing has to be carried from one launch to the next.
//   2. The argument checks of charmlp::sgd_train and charmlp::philox_minibatch (readable TORCH_CHECKs that name
//      the argument), identical for both backends, and the raw operands (SgdTrainArgs) both loops read.
//   3. The shared-memory plan of the persistent CUDA kernel: which sizes it supports, on how many blocks per model
//      (a thread-block cluster splits the hidden layer), and why not otherwise. It is plain host code so that the
//      trainer can ask `sgd_train_unsupported_reason` (and the tests can exercise the plan) on any machine.
//
// Dimension names: M models trained side by side, B batch, T context, E embedding, H hidden, V vocabulary,
// N training examples, S steps in one call.
#pragma once

#include "common/ceil_div.h"
#include "common/checks.h"

#include <ATen/core/Tensor.h>
#include <c10/util/MaybeOwned.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <optional>
#include <string>

namespace charmlp {

// ---- Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC'11; Random123) --------
namespace philox {

constexpr uint32_t kM0 = 0xD2511F53u;  // round multipliers
constexpr uint32_t kM1 = 0xCD9E8D57u;
constexpr uint32_t kW0 = 0x9E3779B9u;  // Weyl key increments (golden ratio, sqrt(3) - 1)
constexpr uint32_t kW1 = 0xBB67AE85u;

struct U32x4 {
  uint32_t v[4];
};

CHARMLP_HOST_DEVICE void mulhilo32(uint32_t a, uint32_t b, uint32_t& hi, uint32_t& lo) {
#if defined(__CUDA_ARCH__)
  lo = a * b;
  hi = __umulhi(a, b);
#else
  const uint64_t p = static_cast<uint64_t>(a) * b;
  hi = static_cast<uint32_t>(p >> 32);
  lo = static_cast<uint32_t>(p);
#endif
}

// The 10-round Philox4x32 bijection of a 128-bit counter under a 64-bit key.
CHARMLP_HOST_DEVICE U32x4 philox4x32_10(U32x4 c, uint32_t k0, uint32_t k1) {
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int round = 0; round < 10; ++round) {
    if (round > 0) {  // the key schedule bumps the key before every round but the first
      k0 += kW0;
      k1 += kW1;
    }
    uint32_t hi0, lo0, hi1, lo1;
    mulhilo32(kM0, c.v[0], hi0, lo0);
    mulhilo32(kM1, c.v[2], hi1, lo1);
    c = U32x4{{hi1 ^ c.v[1] ^ k0, lo1, hi0 ^ c.v[3] ^ k1, lo0}};
  }
  return c;
}

// High 64 bits of a 64x64-bit product: maps a uniform 64-bit word onto [0, n) with a bias below n / 2^64.
CHARMLP_HOST_DEVICE uint64_t mulhi64(uint64_t a, uint64_t b) {
#if defined(__CUDA_ARCH__)
  return __umul64hi(a, b);
#else
  return static_cast<uint64_t>((static_cast<unsigned __int128>(a) * b) >> 64);
#endif
}

// Row index in [0, n) of minibatch row `row` at training step `step` of the model whose seed is `seed`.
// Key = the seed's two 32-bit halves; counter = (row lo, row hi, step lo, step hi); the first two output words
// form the 64-bit uniform. Keyed by the step (not by a running state) so any step can be drawn on its own.
CHARMLP_HOST_DEVICE int64_t minibatch_row(uint64_t seed, uint64_t step, uint64_t row, uint64_t n) {
  const U32x4 ctr{{static_cast<uint32_t>(row), static_cast<uint32_t>(row >> 32), static_cast<uint32_t>(step),
                   static_cast<uint32_t>(step >> 32)}};
  const U32x4 r = philox4x32_10(ctr, static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
  const uint64_t u = (static_cast<uint64_t>(r.v[1]) << 32) | r.v[0];
  return static_cast<int64_t>(mulhi64(u, n));
}

}  // namespace philox

// ---- argument checks, shared by the CPU and CUDA kernels -----------------------------------------------------

constexpr int kMaxCluster = 8;  // the portable thread-block cluster size limit
// cluster_size as sgd_train takes it: 0 (auto) or a power of two up to kMaxCluster (the CUDA launcher instantiates
// the kernel for 1, 2, 4 and 8 blocks). Checked with the other arguments, so a CPU run rejects what a CUDA run would.
inline bool valid_cluster_size(int64_t cs) {
  return cs == 0 || (cs >= 1 && cs <= kMaxCluster && (cs & (cs - 1)) == 0);
}
constexpr const char* kClusterSizeRule = "cluster_size must be 0 (auto), 1, 2, 4 or 8";

// Sizes of one sgd_train call, derived from (and checked against) its arguments.
struct SgdTrainShape {
  int64_t M, V, E, T, H, B, N, S;
  int64_t loss_every, num_losses;
  int64_t lr_model_stride;   // 0 when one lr schedule (S,) is shared by all models, S for (M, S)
  int64_t idx_model_stride;  // same for batch_idx: 0 for (S, B), S * B for (M, S, B)
  bool use_seeds;            // rows drawn by Philox from seeds (M,), else read from batch_idx
  bool direct;               // W2 holds the direct connections (T*E rows after its H hidden rows)
  int64_t TE() const { return T * E; }
  int64_t W2_rows() const { return direct ? H + T * E : H; }
};

// Checks every argument of charmlp::sgd_train (see csrc/schemas.h for the schema) and returns the sizes.
// Parameters are updated in place, so they must be float32 and contiguous; the read-only tensors may be strided
// (the caller takes expect_contiguous() views, which copy only when needed). Over 80 lines: one flat list of
// independent checks, in the order of the schema's arguments, each naming its argument.
inline SgdTrainShape check_sgd_train_args(const at::Tensor& C, const at::Tensor& W1, const at::Tensor& b1,
                                          const at::Tensor& W2, const at::Tensor& b2, const at::Tensor& X,
                                          const at::Tensor& Y, const at::Tensor& lrs,
                                          const std::optional<at::Tensor>& seeds,
                                          const std::optional<at::Tensor>& batch_idx, int64_t start_step,
                                          int64_t batch_size, int64_t loss_every, int64_t cluster_size,
                                          double weight_decay) {
  TORCH_CHECK(valid_cluster_size(cluster_size), kClusterSizeRule, ", got ", cluster_size);
  TORCH_CHECK(std::isfinite(weight_decay) && weight_decay >= 0, "weight_decay must be finite and >= 0, got ",
              weight_decay);
  check_dim(C, 3, "C");
  check_dim(W1, 3, "W1");
  check_dim(b1, 2, "b1");
  check_dim(W2, 3, "W2");
  check_dim(b2, 2, "b2");
  check_dim(X, 2, "X");
  check_dim(Y, 1, "Y");
  const char* names[5] = {"C", "W1", "b1", "W2", "b2"};
  const at::Tensor* params[5] = {&C, &W1, &b1, &W2, &b2};
  for (int i = 0; i < 5; ++i) {
    TORCH_CHECK(params[i]->scalar_type() == at::kFloat, names[i],
                " must be float32 (the whole-training op keeps float32 parameters), got ", params[i]->scalar_type());
    TORCH_CHECK(params[i]->is_contiguous(), names[i], " must be contiguous: it is updated in place, got strides ",
                params[i]->strides());
    check_same_device(C, "C", *params[i], names[i]);
  }
  SgdTrainShape s{};
  s.M = C.size(0);
  s.V = C.size(1);
  s.E = C.size(2);
  s.T = X.size(1);
  s.H = W1.size(2);
  s.N = X.size(0);
  s.B = batch_size;
  TORCH_CHECK(s.M >= 1, "C must hold at least one model (C.size(0) >= 1), got shape ", C.sizes());
  TORCH_CHECK(s.V >= 1 && s.E >= 1 && s.H >= 1 && s.T >= 1,
              "sizes must be >= 1: vocab C.size(1), embedding C.size(2), hidden W1.size(2), context X.size(1); got "
              "C ", C.sizes(), ", W1 ", W1.sizes(), ", X ", X.sizes());
  check_size(W1, 0, s.M, "W1", "C.size(0) (models)");
  check_size(W1, 1, s.T * s.E, "W1", "X.size(1) * C.size(2) (block_size * n_embd)");
  check_size(b1, 0, s.M, "b1", "C.size(0) (models)");
  check_size(b1, 1, s.H, "b1", "W1.size(2) (hidden)");
  check_size(W2, 0, s.M, "W2", "C.size(0) (models)");
  // W2 (M, H, V), or (M, H + T*E, V) with the direct connections x -> logits in its last T*E rows.
  s.direct = W2.size(1) == s.H + s.T * s.E;
  TORCH_CHECK(W2.size(1) == s.H || s.direct, "W2 must have W1.size(2) (hidden) = ", s.H,
              " rows, or hidden + X.size(1) * C.size(2) = ", s.H + s.T * s.E,
              " with the direct connections, at dim 1; got shape ", W2.sizes());
  check_size(W2, 2, s.V, "W2", "C.size(1) (vocab)");
  check_size(b2, 0, s.M, "b2", "C.size(0) (models)");
  check_size(b2, 1, s.V, "b2", "C.size(1) (vocab)");

  check_index(X, "X");
  TORCH_CHECK(Y.scalar_type() == X.scalar_type(), "Y must have the dtype of X (", X.scalar_type(), "), got ",
              Y.scalar_type());
  check_same_device(C, "C", X, "X");
  check_same_device(C, "C", Y, "Y");
  TORCH_CHECK(s.N >= 1, "X must hold at least one training example, got shape ", X.sizes());
  check_size(Y, 0, s.N, "Y", "X.size(0) (examples)");

  TORCH_CHECK(batch_size >= 1, "batch_size must be >= 1, got ", batch_size);
  TORCH_CHECK(loss_every >= 1, "loss_every must be >= 1, got ", loss_every);
  TORCH_CHECK(start_step >= 0, "start_step must be >= 0, got ", start_step);

  TORCH_CHECK(lrs.scalar_type() == at::kFloat, "lrs must be float32, got ", lrs.scalar_type());
  check_same_device(C, "C", lrs, "lrs");
  TORCH_CHECK(lrs.dim() == 1 || lrs.dim() == 2,
              "lrs must be (steps,) for all models or (models, steps) per model, got shape ", lrs.sizes());
  s.S = lrs.size(-1);
  if (lrs.dim() == 2) {
    check_size(lrs, 0, s.M, "lrs", "C.size(0) (models)");
    s.lr_model_stride = s.S;
  }

  TORCH_CHECK(seeds.has_value() != batch_idx.has_value(),
              "pass exactly one of seeds (draw the minibatches with Philox) and batch_idx (read them), got ",
              seeds.has_value() ? "both" : "neither");
  s.use_seeds = seeds.has_value();
  if (s.use_seeds) {
    const at::Tensor& sd = *seeds;
    TORCH_CHECK(sd.scalar_type() == at::kLong, "seeds must be int64, got ", sd.scalar_type());
    check_dim(sd, 1, "seeds");
    check_size(sd, 0, s.M, "seeds", "C.size(0) (models)");
    check_same_device(C, "C", sd, "seeds");
  } else {
    const at::Tensor& bi = *batch_idx;
    TORCH_CHECK(bi.scalar_type() == at::kLong, "batch_idx must be int64, got ", bi.scalar_type());
    TORCH_CHECK(bi.dim() == 2 || bi.dim() == 3,
                "batch_idx must be (steps, batch) for all models or (models, steps, batch), got shape ", bi.sizes());
    check_same_device(C, "C", bi, "batch_idx");
    check_size(bi, bi.dim() - 2, s.S, "batch_idx", "lrs.size(-1) (steps)");
    check_size(bi, bi.dim() - 1, s.B, "batch_idx", "batch_size");
    if (bi.dim() == 3) {
      check_size(bi, 0, s.M, "batch_idx", "C.size(0) (models)");
      s.idx_model_stride = s.S * s.B;
    }
  }
  s.loss_every = loss_every;
  s.num_losses = ceil_div(s.S, loss_every);
  return s;
}

inline void check_philox_minibatch_args(const at::Tensor& seeds, const at::Tensor& start_step, int64_t num_steps,
                                        int64_t batch_size, int64_t num_rows) {
  TORCH_CHECK(seeds.scalar_type() == at::kLong, "seeds must be int64, got ", seeds.scalar_type());
  check_dim(seeds, 1, "seeds");
  TORCH_CHECK(start_step.scalar_type() == at::kLong, "start_step must be int64, got ", start_step.scalar_type());
  TORCH_CHECK(start_step.numel() == 1, "start_step must hold one element (the first step), got shape ",
              start_step.sizes());
  check_same_device(seeds, "seeds", start_step, "start_step");
  TORCH_CHECK(num_steps >= 0, "num_steps must be >= 0, got ", num_steps);
  TORCH_CHECK(batch_size >= 0, "batch_size must be >= 0, got ", batch_size);
  TORCH_CHECK(num_rows >= 1, "num_rows (the number of training examples to draw from) must be >= 1, got ", num_rows);
}

// ---- the operands both backends' loops read ---------------------------------------------------------------

// Raw pointers and sizes of one checked sgd_train call. The CPU loop takes index_t = void (it dispatches on the
// index dtype inside each instruction-set clone); the CUDA kernel takes the index type as a template argument.
template <typename index_t>
struct SgdTrainArgs {
  float *C, *W1, *b1, *W2, *b2;  // (M, V, E), (M, TE, H), (M, H), (M, H [+ TE], V), (M, V): updated in place
  const index_t* X;              // (N, T)
  const index_t* Y;              // (N,)
  const float* lrs;              // (S,) or (M, S)
  int64_t lr_stride;             // 0 or S
  const int64_t* seeds;          // (M,) or null
  const int64_t* batch_idx;      // (S, B) or (M, S, B) or null
  int64_t idx_stride;            // 0 or S * B
  float* losses;                 // (M, num_losses)
  int64_t N, S, start_step, loss_every, num_losses;
  float weight_decay;  // per step, C, W1 and W2 -= lr * weight_decay * themselves (not the biases)
};

// The read-only inputs as contiguous tensors (borrowed when they already are, copied otherwise), kept alive for
// as long as the pointers of args() are in use.
struct SgdTrainInputs {
  c10::MaybeOwned<at::Tensor> X, Y, lrs, seeds, batch_idx;

  SgdTrainInputs(const at::Tensor& X_, const at::Tensor& Y_, const at::Tensor& lrs_,
                 const std::optional<at::Tensor>& seeds_, const std::optional<at::Tensor>& batch_idx_)
      : X(X_.expect_contiguous()), Y(Y_.expect_contiguous()), lrs(lrs_.expect_contiguous()) {
    if (seeds_) seeds = seeds_->expect_contiguous();
    if (batch_idx_) batch_idx = batch_idx_->expect_contiguous();
  }

  template <typename index_t>
  SgdTrainArgs<index_t> args(const at::Tensor& C, const at::Tensor& W1, const at::Tensor& b1, const at::Tensor& W2,
                             const at::Tensor& b2, const at::Tensor& losses, const SgdTrainShape& s,
                             int64_t start_step, double weight_decay) const {
    SgdTrainArgs<index_t> a{};
    a.C = C.data_ptr<float>();
    a.W1 = W1.data_ptr<float>();
    a.b1 = b1.data_ptr<float>();
    a.W2 = W2.data_ptr<float>();
    a.b2 = b2.data_ptr<float>();
    a.X = static_cast<const index_t*>(X->const_data_ptr());
    a.Y = static_cast<const index_t*>(Y->const_data_ptr());
    a.lrs = lrs->const_data_ptr<float>();
    a.lr_stride = s.lr_model_stride;
    a.seeds = s.use_seeds ? seeds->const_data_ptr<int64_t>() : nullptr;
    a.batch_idx = s.use_seeds ? nullptr : batch_idx->const_data_ptr<int64_t>();
    a.idx_stride = s.idx_model_stride;
    a.losses = losses.data_ptr<float>();
    a.N = s.N;
    a.S = s.S;
    a.start_step = start_step;
    a.loss_every = s.loss_every;
    a.num_losses = s.num_losses;
    a.weight_decay = static_cast<float>(weight_decay);
    return a;
  }
};

// ---- the persistent CUDA kernel's plan: shared-memory layout and size limits ----------------------------------
//
// One thread block (or a cluster of `cluster` blocks) trains one model for all S steps. Everything a step touches
// lives in shared memory; the cluster splits the hidden layer: block r owns hidden units [r*hc, r*hc + nh) —
// its slices of W1, b1, W2 and of the activations — and keeps a replica of C and b2, which every block updates
// identically. The two products that sum over the hidden layer (the logits and the embedding gradient dx) are
// computed as split-K partial sums (split over the cluster and over `ks_*` thread groups) and reduced in a fixed
// order, so the replicas stay bit-identical and a run is deterministic.
constexpr int kPersistentThreads = 512;  // 16 warps: 4 per SM sub-partition, 128 registers per thread
constexpr int kTileM = 4;                // register tile of one thread: kTileM rows x kTileN columns of a product
constexpr int kTileN = 4;
constexpr int kPreferredSlice = 64;      // hidden units per block the auto plan aims for (see sgd_train_cuda.cu)

// Byte offsets into the dynamic shared memory of one block. Filled on the host, passed by value to the kernel.
struct PersistentLayout {
  int V, T, E, TE, H, B;
  int cluster;   // blocks per model
  int hc;        // hidden units per block (the last block may own fewer)
  int ldw1;      // row stride of the W1 slice (TE, hc): odd, so column walks (dx = G @ W1^T) avoid bank conflicts
  int ldw2;      // row stride of the W2 slice (hc, V): odd, for the same reason in dh = dl @ W2^T
  int ldh;       // row stride of the activations Hs, G (B, hc)
  int ks_logits; // split-K groups of the partial logits
  int ks_dx;     // split-K groups of the partial embedding gradient
  // float arrays
  int off_C, off_W1, off_b1, off_W2, off_b2, off_H, off_G, off_X, off_Lp, off_L, off_DXp, off_DX, off_rowloss;
  // index arrays (int64 so that int32 and int64 datasets share one layout): tokens (2, B, T), targets (2, B)
  int off_tok, off_tgt;
  int64_t bytes;  // total
};

inline PersistentLayout make_persistent_layout(int64_t V, int64_t T, int64_t E, int64_t H, int64_t B, int cluster,
                                               int ks_logits, int ks_dx) {
  PersistentLayout L{};
  L.V = static_cast<int>(V);
  L.T = static_cast<int>(T);
  L.E = static_cast<int>(E);
  L.TE = static_cast<int>(T * E);
  L.H = static_cast<int>(H);
  L.B = static_cast<int>(B);
  L.cluster = cluster;
  L.hc = static_cast<int>(ceil_div(H, cluster));
  L.ldw1 = L.hc | 1;
  L.ldw2 = static_cast<int>(V) | 1;
  L.ldh = L.hc;
  L.ks_logits = ks_logits;
  L.ks_dx = ks_dx;
  int64_t off = 0;
  // Every array starts on a 16-byte boundary (cp.async and vector loads want it).
  auto take = [&](int64_t bytes) {
    const int64_t at = off;
    off = ceil_div(off + bytes, 16) * 16;
    return at;
  };
  const int64_t f = sizeof(float);
  L.off_C = static_cast<int>(take(V * E * f));
  L.off_W1 = static_cast<int>(take(T * E * L.ldw1 * f));
  L.off_b1 = static_cast<int>(take(L.hc * f));
  L.off_W2 = static_cast<int>(take(int64_t(L.hc) * L.ldw2 * f));
  L.off_b2 = static_cast<int>(take(V * f));
  L.off_H = static_cast<int>(take(B * L.ldh * f));
  L.off_G = static_cast<int>(take(B * L.ldh * f));
  L.off_X = static_cast<int>(take(B * T * E * f));
  L.off_Lp = static_cast<int>(take(int64_t(ks_logits) * B * V * f));
  L.off_L = static_cast<int>(take(B * V * f));
  L.off_DXp = static_cast<int>(take(int64_t(ks_dx) * B * T * E * f));
  L.off_DX = static_cast<int>(take(B * T * E * f));
  L.off_rowloss = static_cast<int>(take(B * f));
  L.off_tok = static_cast<int>(take(2 * B * T * int64_t(sizeof(int64_t))));
  L.off_tgt = static_cast<int>(take(2 * B * int64_t(sizeof(int64_t))));
  L.bytes = off;
  return L;
}

struct PersistentPlan {
  bool ok = false;
  PersistentLayout layout{};
  std::string reason;  // why not, when !ok
};

// Split-K factor that gives ~one register tile per thread for an (m x n) product summed over k, with >= 8 terms
// per group.
inline int split_k_groups(int64_t m, int64_t n, int64_t k) {
  const int64_t tiles = ceil_div(m, kTileM) * ceil_div(n, kTileN);
  const int64_t want = std::max<int64_t>(1, kPersistentThreads / std::max<int64_t>(tiles, 1));
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(want, ceil_div(k, 8))));
}

// Chooses the cluster size and split-K groups for a model of the given sizes on a device with `smem_optin` bytes of
// shared memory per block (cudaDevAttrMaxSharedMemoryPerBlockOptin) and compute capability `cc_major`.
// requested_cluster = 0 picks automatically; 1..8 forces a cluster size (for benchmarks and tests).
inline PersistentPlan plan_persistent(int64_t V, int64_t T, int64_t E, int64_t H, int64_t B, int64_t smem_optin,
                                      int64_t cc_major, int64_t requested_cluster) {
  PersistentPlan plan;
  const std::string sizes = "(vocab " + std::to_string(V) + ", block " + std::to_string(T) + ", embedding " +
                            std::to_string(E) + ", hidden " + std::to_string(H) + ", batch " + std::to_string(B) +
                            ")";
  if (V < 1 || T < 1 || E < 1 || H < 1 || B < 1) {
    plan.reason = "all sizes must be >= 1, got " + sizes;
    return plan;
  }
  if (cc_major < 8) {
    plan.reason = "the persistent kernel needs compute capability 8.0 or newer (cp.async), this device has " +
                  std::to_string(cc_major) + ".x";
    return plan;
  }
  const int max_cluster = cc_major >= 9 ? kMaxCluster : 1;  // thread-block clusters arrived with Hopper (sm_90)
  if (!valid_cluster_size(requested_cluster)) {
    plan.reason = std::string(kClusterSizeRule) + ", got " + std::to_string(requested_cluster);
    return plan;
  }
  if (requested_cluster > max_cluster) {
    plan.reason = "cluster_size " + std::to_string(requested_cluster) +
                  " needs thread-block clusters (compute capability 9.0+), this device has " +
                  std::to_string(cc_major) + ".x";
    return plan;
  }
  // Auto: the smallest power of two that brings the slice down to ~kPreferredSlice hidden units (enough work per
  // block to hide the two cluster barriers of a step), then larger clusters while shared memory does not fit.
  int first = 1;
  if (requested_cluster == 0) {
    while (first < max_cluster && ceil_div(H, first) > kPreferredSlice) first *= 2;
  } else {
    first = static_cast<int>(requested_cluster);
  }
  const int last = requested_cluster == 0 ? max_cluster : first;
  int64_t smallest = -1;
  for (int cs = first; cs <= last; cs *= 2) {
    const int64_t hc = ceil_div(H, cs);
    int ksl = split_k_groups(B, V, hc);
    int ksd = split_k_groups(B, T * E, hc);
    while (true) {
      const PersistentLayout L = make_persistent_layout(V, T, E, H, B, cs, ksl, ksd);
      if (L.bytes <= smem_optin) {
        plan.ok = true;
        plan.layout = L;
        return plan;
      }
      if (ksl == 1 && ksd == 1) {
        if (smallest < 0 || L.bytes < smallest) smallest = L.bytes;
        break;
      }
      // Give up split-K parallelism before giving up the size: halve the larger partial buffer.
      if (int64_t(ksl) * V >= int64_t(ksd) * T * E && ksl > 1) {
        ksl = ceil_div(ksl, 2);
      } else if (ksd > 1) {
        ksd = ceil_div(ksd, 2);
      } else {
        ksl = ceil_div(ksl, 2);
      }
    }
  }
  plan.reason = "the persistent CUDA kernel keeps the parameters and one step's activations in shared memory; " +
                sizes + " needs " + std::to_string(ceil_div(smallest, 1024)) + " KiB per block even split over " +
                std::to_string(last) + " block" + (last > 1 ? "s" : "") + ", the device allows " +
                std::to_string(smem_optin / 1024) + " KiB" +
                (max_cluster == 1 ? " (and has no thread-block clusters)" : "") +
                " (the activations grow with batch * hidden)";
  return plan;
}

}  // namespace charmlp
