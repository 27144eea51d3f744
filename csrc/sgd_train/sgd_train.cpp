// Whole-training ops, CPU side (the CUDA kernels of the same ops are in sgd_train_cuda.cu):
//   charmlp::sgd_train         S SGD steps of M independent models in one call: minibatch sampling (Philox, or
//                              rows from batch_idx), forward, backward, update with a per-step lr, loss history
//                              every loss_every steps. Parameters (M, ...) are updated in place.
//   charmlp::philox_minibatch  the minibatch rows that sgd_train draws, as a tensor (M, S, B); the CUDA-graph
//                              stepper samples with it, so graph and persistent runs see the same minibatches.
//   charmlp::sgd_train_cuda_plan  whether (and how) a model size fits the persistent CUDA kernel on a device with
//                              the given properties — plain host code, callable on any machine.
//
// The plain reference of the loop is the seed's notebook loop (charmlp_fast/reference.py + steppers.EagerStepper);
// tests/test_persistent.py checks this kernel against it step by step.
#include "sgd_train/sgd_train.h"
#include "common/autograd.h"

#include "cpu/isa.h"
#include "sgd_train/sgd_train_cpu_kernels.h"

#include <ATen/Parallel.h>
#include <ATen/core/grad_mode.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/csrc/autograd/variable.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <string>
#include <tuple>
#include <vector>

namespace charmlp {
namespace cpu_train {

// MKL's per-thread thread count, C interface (mkl_service.h's mkl_set_num_threads_local; the lower-case symbol is
// the Fortran one, which takes a pointer). Exported by the libtorch that bundles MKL; null where torch uses another
// BLAS.
extern "C" int MKL_Set_Num_Threads_Local(int nthreads) __attribute__((weak));

// Makes the BLAS calls of the current thread single-threaded while it lives.
class SequentialBlas {
 public:
  SequentialBlas() : previous_(MKL_Set_Num_Threads_Local ? MKL_Set_Num_Threads_Local(1) : 0) {}
  ~SequentialBlas() {
    if (MKL_Set_Num_Threads_Local) MKL_Set_Num_Threads_Local(previous_);
  }
  SequentialBlas(const SequentialBlas&) = delete;
  SequentialBlas& operator=(const SequentialBlas&) = delete;

 private:
  int previous_;
};

constexpr int64_t kBlasTile = 256;  // at most this many rows (or columns) of out per BLAS call
// A product of at least kSplitWork multiply-adds is cut into at least kMinTiles tiles (of >= kMinTileWidth rows or
// columns), so that all cores share it even when out is small and the sum long: dL/dh = dl (B, V) @ W2 (V, H) of a
// word vocabulary is one (32, 104) tile summed over 16,000 terms otherwise, on one core.
constexpr int64_t kSplitWork = int64_t(1) << 22;
constexpr int64_t kMinTiles = 4;
constexpr int64_t kMinTileWidth = 16;

// Fortran BLAS sgemm (column-major), exported by the libtorch that bundles MKL; null where torch uses another
// BLAS, and at::addmm_ computes the tiles instead. Called directly because a tile is a few microseconds of
// arithmetic, and at::addmm_ on views (dispatch, two narrows, checks) adds a fixed cost to each of the ~130 tiles
// of a step at V 16,383.
extern "C" void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
                       const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
                       const float* beta, float* c, const int* ldc) __attribute__((weak));

// A row-major operand X (rows, cols), contiguous along one of its dimensions, as column-major BLAS takes it: the
// memory of X is X^T column-major (op 'N' gives X^T), that of a transposed view is X column-major ('T' gives X^T).
struct BlasOperand {
  const float* data;
  int64_t row_stride, col_stride;
  char op;
  int ld;
  explicit BlasOperand(const at::Tensor& x)
      : data(x.data_ptr<float>()),
        row_stride(x.stride(0)),
        col_stride(x.stride(1)),
        op(x.stride(1) == 1 ? 'N' : 'T'),
        ld(static_cast<int>(std::max<int64_t>(1, x.stride(1) == 1 ? x.stride(0) : x.stride(1)))) {
    TORCH_INTERNAL_ASSERT(x.stride(1) == 1 || x.stride(0) == 1, "blas_gemm: an operand without a unit stride");
  }
};

// out (R, N) = beta * out + alpha * (a (R, K) @ b (K, N)), the products of the CPU loop's BLAS path (beta 0: out =
// alpha * a @ b). Why not one BLAS call: the summation order of a call may depend on how many threads the library
// gives it (MKL's does, on some CPUs), so a model trained alone with two threads would differ from the same model
// trained beside others, where each model's calls run on one thread. Instead, out is cut into equal tiles of at
// most kBlasTile rows, or columns when it is wider than tall, and each tile is one single-threaded call; the tiles
// run on the intra-op threads. The tiles and each tile's arithmetic depend on the sizes alone, so the result is the same for
// any thread count and any number of models side by side (on a BLAS other than MKL, as far as that BLAS is
// single-threaded inside a parallel region).
void blas_gemm(const at::Tensor& out, const at::Tensor& a, const at::Tensor& b, float beta, float alpha) {
  const int64_t R = out.size(0), N = out.size(1), K = a.size(1);
  const bool by_rows = R >= N;
  const int64_t D = by_rows ? R : N;  // the dimension that is cut
  int64_t tiles = (D + kBlasTile - 1) / kBlasTile;
  if (R * N * K >= kSplitWork) tiles = std::max(tiles, std::min(kMinTiles, D / kMinTileWidth));
  tiles = std::max<int64_t>(tiles, 1);
  const int64_t tile = (D + tiles - 1) / tiles;  // tiles of (nearly) equal size: no sliver of a few rows at the end
  TORCH_INTERNAL_ASSERT(out.stride(1) == 1 && std::max({R, N, K}) < (int64_t(1) << 31));
  const BlasOperand A(a), Bm(b);
  float* const C = out.data_ptr<float>();
  const int ldc = static_cast<int>(std::max<int64_t>(1, out.stride(0)));
  // Rows [begin, begin + len) of out (and of a), or its columns (and b's): out^T = b^T @ a^T, column-major.
  const auto one_tile = [&](int64_t begin, int64_t len) {
    if (sgemm_ == nullptr) {
      out.narrow(by_rows ? 0 : 1, begin, len)
          .addmm_(by_rows ? a.narrow(0, begin, len) : a, by_rows ? b : b.narrow(1, begin, len), beta, alpha);
      return;
    }
    const int m = static_cast<int>(by_rows ? N : len), n = static_cast<int>(by_rows ? len : R);
    const int k = static_cast<int>(K);
    const float* a_tile = A.data + (by_rows ? begin * A.row_stride : 0);
    const float* b_tile = Bm.data + (by_rows ? 0 : begin * Bm.col_stride);
    float* c_tile = C + (by_rows ? begin * out.stride(0) : begin);
    sgemm_(&Bm.op, &A.op, &m, &n, &k, &alpha, b_tile, &Bm.ld, a_tile, &A.ld, &beta, c_tile, &ldc);
  };
  auto run = [&](int64_t lo, int64_t hi) {
    const SequentialBlas sequential;
    for (int64_t t = lo; t < hi; ++t) {
      const int64_t begin = t * tile;
      one_tile(begin, std::min(tile, D - begin));
    }
  };
  // Fork only when the product repays it (as Kernels::maybe_parallel in sgd_train_cpu_kernels.h decides).
  if (tiles > 1 && R * N * K >= (int64_t(1) << 20)) {
    at::parallel_for(0, tiles, 1, run);
  } else {
    run(0, tiles);
  }
}

}  // namespace cpu_train
}  // namespace charmlp

namespace charmlp {
namespace {

// CHARMLP_CPU_GEMM=simd|blas forces one way of computing the products (tests cover both); default: by size.
cpu_train::CpuGemm gemm_choice() {
  const char* env = std::getenv("CHARMLP_CPU_GEMM");
  const std::string want = env ? env : "";
  if (want == "simd") return cpu_train::CpuGemm::kSimd;
  if (want == "blas") return cpu_train::CpuGemm::kBlas;
  TORCH_CHECK(want.empty() || want == "auto", "CHARMLP_CPU_GEMM must be auto, simd or blas, got ", want);
  return cpu_train::CpuGemm::kAuto;
}

at::Tensor sgd_train_cpu(const at::Tensor& C, const at::Tensor& W1, const at::Tensor& b1, const at::Tensor& W2,
                         const at::Tensor& b2, const at::Tensor& X, const at::Tensor& Y, const at::Tensor& lrs,
                         const std::optional<at::Tensor>& seeds, const std::optional<at::Tensor>& batch_idx,
                         int64_t start_step, int64_t batch_size, int64_t loss_every, int64_t cluster_size,
                         double weight_decay) {
  const SgdTrainShape s =
      check_sgd_train_args(C, W1, b1, W2, b2, X, Y, lrs, seeds, batch_idx, start_step, batch_size, loss_every,
                           cluster_size, weight_decay);
  TORCH_CHECK(C.device().is_cpu(), "sgd_train (CPU kernel) got C on ", C.device());
  auto losses = at::empty({s.M, s.num_losses}, C.options());
  if (s.S == 0) return losses;
  const SgdTrainInputs inputs(X, Y, lrs, seeds, batch_idx);
  const cpu_train::CpuTrainArgs a{inputs.args<void>(C, W1, b1, W2, b2, losses, s, start_step, weight_decay),
                                  /*idx64=*/X.scalar_type() == at::kLong, s.M, s.V, s.E, s.T, s.H, s.B, s.direct,
                                  gemm_choice()};
  cpu_train::train_models(a, cpu::cpu_isa());
  return losses;
}

at::Tensor philox_minibatch_cpu(const at::Tensor& seeds, const at::Tensor& start_step, int64_t num_steps,
                                int64_t batch_size, int64_t num_rows) {
  check_philox_minibatch_args(seeds, start_step, num_steps, batch_size, num_rows);
  const int64_t M = seeds.size(0);
  auto out = at::empty({M, num_steps, batch_size}, seeds.options());
  const auto sc = seeds.expect_contiguous();
  const int64_t* sd = sc->data_ptr<int64_t>();
  const int64_t first = *start_step.data_ptr<int64_t>();  // CPU tensor: reading it is not a device sync
  TORCH_CHECK(first >= 0, "start_step must be >= 0, got ", first);
  int64_t* o = out.data_ptr<int64_t>();
  for (int64_t m = 0; m < M; ++m)
    for (int64_t i = 0; i < num_steps; ++i)
      for (int64_t b = 0; b < batch_size; ++b)
        o[(m * num_steps + i) * batch_size + b] =
            philox::minibatch_row(static_cast<uint64_t>(sd[m]), static_cast<uint64_t>(first + i),
                                  static_cast<uint64_t>(b), static_cast<uint64_t>(num_rows));
  return out;
}

// -> (reason it does not fit ("" when it does), [cluster_size, ks_logits, ks_dx, shared-memory bytes per block])
std::tuple<std::string, std::vector<int64_t>> sgd_train_cuda_plan(int64_t vocab_size, int64_t block_size,
                                                                  int64_t n_embd, int64_t n_hidden,
                                                                  int64_t batch_size, int64_t smem_per_block,
                                                                  int64_t cc_major, int64_t cluster_size) {
  const PersistentPlan p =
      plan_persistent(vocab_size, block_size, n_embd, n_hidden, batch_size, smem_per_block, cc_major, cluster_size);
  if (!p.ok) return {p.reason, {}};
  const PersistentLayout& L = p.layout;
  return {std::string(), {L.cluster, L.ks_logits, L.ks_dx, L.bytes}};
}

// The instruction set of the CPU loop's clone (cpu/isa.h), for benchmarks and tests to report.
std::string sgd_train_cpu_isa() { return cpu::isa_name(cpu::cpu_isa()); }

// The op's handle, looked up once: the Autograd and ADInplaceOrView kernels below redispatch through it.
const c10::TypedOperatorHandle<decltype(sgd_train_cpu)>& sgd_train_op() {
  static const auto op = op_handle<decltype(sgd_train_cpu)>("charmlp::sgd_train");
  return op;
}

// sgd_train mutates its parameters: bump their version counters (as every in-place op does) so that autograd
// refuses to backpropagate through values saved before the update.
at::Tensor sgd_train_ad_inplace(const at::Tensor& C, const at::Tensor& W1, const at::Tensor& b1, const at::Tensor& W2,
                                const at::Tensor& b2, const at::Tensor& X, const at::Tensor& Y, const at::Tensor& lrs,
                                const std::optional<at::Tensor>& seeds, const std::optional<at::Tensor>& batch_idx,
                                int64_t start_step, int64_t batch_size, int64_t loss_every, int64_t cluster_size,
                                double weight_decay) {
  at::Tensor losses;
  {
    at::AutoDispatchBelowADInplaceOrView guard;
    losses = sgd_train_op().call(C, W1, b1, W2, b2, X, Y, lrs, seeds, batch_idx, start_step, batch_size, loss_every,
                                 cluster_size, weight_decay);
  }
  for (const at::Tensor* p : {&C, &W1, &b1, &W2, &b2}) torch::autograd::impl::bump_version(*p);
  return losses;
}

// sgd_train is not differentiable, and it writes its parameters in place: refuse (as torch refuses an in-place op
// on a leaf that requires grad) rather than let autograd attach a gradient function that cannot exist.
at::Tensor sgd_train_autograd(const at::Tensor& C, const at::Tensor& W1, const at::Tensor& b1, const at::Tensor& W2,
                              const at::Tensor& b2, const at::Tensor& X, const at::Tensor& Y, const at::Tensor& lrs,
                              const std::optional<at::Tensor>& seeds, const std::optional<at::Tensor>& batch_idx,
                              int64_t start_step, int64_t batch_size, int64_t loss_every, int64_t cluster_size,
                              double weight_decay) {
  if (at::GradMode::is_enabled()) {
    const char* names[5] = {"C", "W1", "b1", "W2", "b2"};
    const at::Tensor* params[5] = {&C, &W1, &b1, &W2, &b2};
    for (int i = 0; i < 5; ++i) {
      TORCH_CHECK(!params[i]->requires_grad(), "sgd_train updates ", names[i],
                  " in place and is not differentiable, but ", names[i],
                  " requires grad: call it under torch.no_grad() (the steppers do)");
    }
  }
  at::AutoDispatchBelowAutograd guard;
  return sgd_train_op().call(C, W1, b1, W2, b2, X, Y, lrs, seeds, batch_idx, start_step, batch_size, loss_every,
                             cluster_size, weight_decay);
}

}  // namespace

TORCH_LIBRARY_IMPL(charmlp, Autograd, m) { m.impl("sgd_train", &sgd_train_autograd); }

TORCH_LIBRARY_IMPL(charmlp, CPU, m) {
  m.impl("sgd_train", &sgd_train_cpu);
  m.impl("philox_minibatch", &philox_minibatch_cpu);
}

TORCH_LIBRARY_IMPL(charmlp, ADInplaceOrView, m) { m.impl("sgd_train", &sgd_train_ad_inplace); }

TORCH_LIBRARY_IMPL(charmlp, CompositeExplicitAutograd, m) {
  m.impl("sgd_train_cuda_plan", &sgd_train_cuda_plan);
  m.impl("sgd_train_cpu_isa", &sgd_train_cpu_isa);
}

}  // namespace charmlp
