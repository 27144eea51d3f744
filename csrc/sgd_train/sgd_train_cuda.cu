// Whole-training ops, CUDA side (the CPU kernels of the same ops, with the same signatures, are in sgd_train.cpp).
//
// charmlp::sgd_train runs S SGD steps of M models in ONE launch: one thread block — or a thread-block cluster of
// CS blocks on Hopper — per model keeps the parameters and one step's activations in shared memory for the whole
// run. Per step it draws the minibatch (Philox, csrc/sgd_train/sgd_train.h), gathers the embeddings, runs forward,
// backward and the SGD update, and writes the mean loss of every loss_every steps. The only global-memory traffic
// of a step is the minibatch's B rows of X and Y (prefetched one step ahead with cp.async) and the loss.
//
// Why (and the floor). At the seed's size (B=32, T=3, E=10, H=200, V=27; 11,897 parameters = 47.6 KB) a step is
//   2 * B * (TE*H + H*V + V*H + H*V + H*TE + TE*H) = 2 * 32 * 34,200 = 2.19 MFLOP
// (forward hidden, logits, dh, dW2, dx, dW1). The per-op path launches ~15-30 kernels per step, so it is bound by
// launch latency, even in one CUDA graph. Here nothing is launched per step; what is left:
//   * FP32 issue: one SM does 128 FMA/clk = 507 GFLOP/s at 1.98 GHz -> 4.3 us/step at 100 % (0.86 s for the
//     seed's 200,000 steps). Hence the cluster: CS blocks split the hidden layer (block r owns hidden units
//     [r*hc, r*hc + hc)), which divides every product but the replicated softmax and C update by CS.
//   * shared-memory loads: a 4x4 register tile issues 8 LDS per 16 FMA, i.e. ~1.5 instructions per FMA, so the
//     practical bound is ~1.5x the FMA bound: ~6.5 us/step on one SM, ~1.6 us on a cluster of 4.
//   * barriers: 5 __syncthreads and 2 cluster barriers per step (the cluster ones only for CS > 1: after the
//     partial logits and after the partial dx, the two products summed over the hidden layer). A block barrier
//     is tens of cycles when the phases are balanced, a cluster barrier a few hundred.
// Estimated at the seed's size with CS = 4: ~2.5-3 us/step, i.e. ~0.5-0.6 s for 200,000 steps. The tile shapes and
// the auto cluster size are untuned.
//
// A step is the loop of sgd_train_persistent_kernel, in named phases with the names of the CPU loop
// (sgd_train.cpp): draw_minibatch (prefetch of the next step), hidden_layer (with gather), softmax_rows,
// loss_window, backward_products, embedding_update; load_parameters and store_parameters around the run. The
// softmax row is cuda/softmax_row.cuh's, as in the cross_entropy ops, so the reported loss is the per-op loss.
//
// Determinism: every sum has a fixed order (split-K partials are reduced in (rank, group) order, the C gradient
// is gathered per token in minibatch order with warp ballots instead of atomics), so a run is bitwise
// reproducible, a chunked run equals an unchunked one, and the replicas of C and b2 in the blocks of a cluster
// stay identical.
//
// Sizes: whatever fits the plan of csrc/sgd_train/sgd_train.h (plan_persistent): parameters + activations of one block in
// the device's opt-in shared memory (227 KB on H100). Larger models (batch * hidden grows fastest) get a
// readable error; the trainer then uses the CUDA-graph stepper (charmlp_fast/steppers/graph.py).
// Tested on the CPU emulator (csrc/cuda/cuda_utils.cuh): every cluster size, distributed shared memory and the
// cp.async prefetch, against the CPU loop; only a GPU shows the timing, whether clusters are scheduled on a busy
// or partitioned device, and the register budget at run time (ptxas's view: benchmarks/kernel_resources.py).
#include "cuda/cuda_utils.cuh"  // first: see its header
#include "common/ceil_div.h"
#include "common/softmax_ce.h"
#include "cuda/reduce.cuh"
#include "cuda/softmax_row.cuh"
#include "sgd_train/sgd_train.h"

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/macros/Macros.h>

#include <limits>
#include <torch/library.h>

#include <cooperative_groups.h>
#include <cuda_pipeline.h>

namespace charmlp {
namespace {

namespace cg = cooperative_groups;

constexpr int kThreads = kPersistentThreads;
constexpr int kWarps = kThreads / 32;

// ---- helpers -------------------------------------------------------------------------------------------------

// The first work item of this thread when a phase's items are numbered from `base` on and dealt round-robin:
// consecutive products of one phase continue where the previous one stopped, so no thread gets two tiles while
// another idles.
__device__ __forceinline__ int first_item(int base) {
  const int r = (static_cast<int>(threadIdx.x) - base % kThreads) % kThreads;
  return r < 0 ? r + kThreads : r;
}

// One register tile of P[m, n] = sum_{k0 <= k < k1} a(m, k) * b(k, n), handed to epi(m, n, value):
// rows m0 .. m0+TM-1 (a warp's lanes mostly share m0, so loads of a are broadcasts) and columns n0 + j*nstride
// (consecutive lanes have consecutive n0, so loads of b hit consecutive banks). Out-of-range rows/columns are
// computed on a clamped duplicate and not emitted — no divergence inside the k loop.
template <int TM, int TN, class FA, class FB, class Epi>
__device__ __forceinline__ void tile_product(int m0, int n0, int nstride, int M, int N, int k0, int k1, FA a, FB b,
                                             Epi epi) {
  int mi[TM], nj[TN];
#pragma unroll
  for (int i = 0; i < TM; ++i) mi[i] = min(m0 + i, M - 1);
#pragma unroll
  for (int j = 0; j < TN; ++j) nj[j] = min(n0 + j * nstride, N - 1);
  float acc[TM][TN];
#pragma unroll
  for (int i = 0; i < TM; ++i)
#pragma unroll
    for (int j = 0; j < TN; ++j) acc[i][j] = 0.f;
  for (int k = k0; k < k1; ++k) {
    float av[TM], bv[TN];
#pragma unroll
    for (int i = 0; i < TM; ++i) av[i] = a(mi[i], k);
#pragma unroll
    for (int j = 0; j < TN; ++j) bv[j] = b(k, nj[j]);
#pragma unroll
    for (int i = 0; i < TM; ++i)
#pragma unroll
      for (int j = 0; j < TN; ++j) acc[i][j] = fmaf(av[i], bv[j], acc[i][j]);
  }
#pragma unroll
  for (int i = 0; i < TM; ++i)
#pragma unroll
    for (int j = 0; j < TN; ++j)
      if (m0 + i < M && n0 + j * nstride < N) epi(m0 + i, n0 + j * nstride, acc[i][j]);
}

// A product P (M, N) summed over [0, K) in `ks` split-K groups, as items [0, items) of a phase starting at `base`.
// epi(group, m, n, partial). Returns the number of items (to continue the phase's numbering).
template <class FA, class FB, class Epi>
__device__ __forceinline__ int phase_product(int base, int M, int N, int K, int ks, FA a, FB b, Epi epi) {
  if (M <= 0 || N <= 0) return 0;
  const int nt_count = ceil_div(N, kTileN);
  const int tiles = ceil_div(M, kTileM) * nt_count;
  const int kc = ceil_div(K, ks);
  const int items = tiles * ks;
  for (int w = first_item(base); w < items; w += kThreads) {
    const int g = w / tiles, r = w % tiles;
    const int k0 = min(K, g * kc), k1 = min(K, k0 + kc);
    tile_product<kTileM, kTileN>((r / nt_count) * kTileM, r % nt_count, nt_count, M, N, k0, k1, a, b,
                                 [&](int m, int n, float v) { epi(g, m, n, v); });
  }
  return items;
}

// Block barrier, or cluster barrier (release/acquire: shared-memory writes become visible to the whole cluster).
template <int CS>
__device__ __forceinline__ void cluster_or_block_sync() {
  if constexpr (CS == 1) {
    __syncthreads();
  } else {
#if (defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900) || defined(CHARMLP_EMULATE_CUDA)
    cg::this_cluster().sync();
#else
    __trap();  // never launched: the host plan allows CS > 1 only on compute capability 9.0+
#endif
  }
}

// The address of `p` (in this block's shared memory) in block `rank` of the cluster.
template <int CS>
__device__ __forceinline__ const float* cluster_peer(const float* p, int rank) {
  if constexpr (CS == 1) {
    return p;
  } else {
#if (defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900) || defined(CHARMLP_EMULATE_CUDA)
    return cg::this_cluster().map_shared_rank(const_cast<float*>(p), rank);
#else
    __trap();
    return p;
#endif
  }
}

template <int CS>
__device__ __forceinline__ int cluster_rank() {
  if constexpr (CS == 1) {
    return 0;
  } else {
#if (defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900) || defined(CHARMLP_EMULATE_CUDA)
    return static_cast<int>(cg::this_cluster().block_rank());
#else
    __trap();
    return 0;
#endif
  }
}

// ---- kernels ---------------------------------------------------------------------------------------------------

__global__ void philox_minibatch_kernel(const int64_t* __restrict__ seeds, const int64_t* __restrict__ start_step,
                                        int64_t num_steps, int64_t batch_size, int64_t num_rows, int64_t total,
                                        int64_t* __restrict__ out) {
  const int64_t first = *start_step;
  // The CPU kernel checks this on the host; here it would cost a sync, so the device asserts instead.
  CUDA_KERNEL_ASSERT(first >= 0 && "philox_minibatch: start_step must be >= 0");
  for (int64_t q = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; q < total; q += int64_t(gridDim.x) * blockDim.x) {
    const int64_t b = q % batch_size;
    const int64_t i = (q / batch_size) % num_steps;
    const int64_t m = q / (batch_size * num_steps);
    out[q] = philox::minibatch_row(static_cast<uint64_t>(seeds[m]), static_cast<uint64_t>(first + i),
                                   static_cast<uint64_t>(b), static_cast<uint64_t>(num_rows));
  }
}

// ---- the persistent kernel: one block's state and the phases of a step -------------------------------------------
//
// Each phase is a named function run by every thread of the block; none ends with a barrier (the step loop shows
// them), and a phase that needs one inside says so. Shapes: the model's B, T, E, TE = T*E, H, V; nh = this block's
// hidden units (its slice).

// This block's view of its model: the shared-memory arrays of the plan (sgd_train.h) and its slice of the hidden
// layer, hidden units [h0, h0 + nh).
template <typename index_t>
struct BlockState {
  float* C;        // (V, E), replicated in every block of the cluster
  float* W1;       // (TE, ldw1): this block's columns of W1
  float* b1;       // (nh,)
  float* W2;       // (nh, ldw2): this block's rows of W2
  float* b2;       // (V,), replicated
  float* H;        // (B, ldh) tanh activations of the slice
  float* G;        // (B, ldh) dL/dpre of the slice
  float* X;        // (B, TE) gathered embeddings
  float* Lp;       // (ks_logits, B, V) partial logits of the slice
  float* L;        // (B, V) logits -> dL/dlogits
  float* DXp;      // (ks_dx, B, TE) partial dL/dx of the slice
  float* DX;       // (B, TE) dL/dx = (B*T, E) rows per position
  float* rowloss;  // (B,)
  index_t* tok;    // (2, B, T) double-buffered minibatch: step i's contexts in buffer i % 2
  index_t* tgt;    // (2, B) its targets
  int rank, h0, nh;
};

template <int CS, typename index_t>
__device__ __forceinline__ BlockState<index_t> block_state(const PersistentLayout& L, unsigned char* smem) {
  BlockState<index_t> s;
  s.C = reinterpret_cast<float*>(smem + L.off_C);
  s.W1 = reinterpret_cast<float*>(smem + L.off_W1);
  s.b1 = reinterpret_cast<float*>(smem + L.off_b1);
  s.W2 = reinterpret_cast<float*>(smem + L.off_W2);
  s.b2 = reinterpret_cast<float*>(smem + L.off_b2);
  s.H = reinterpret_cast<float*>(smem + L.off_H);
  s.G = reinterpret_cast<float*>(smem + L.off_G);
  s.X = reinterpret_cast<float*>(smem + L.off_X);
  s.Lp = reinterpret_cast<float*>(smem + L.off_Lp);
  s.L = reinterpret_cast<float*>(smem + L.off_L);
  s.DXp = reinterpret_cast<float*>(smem + L.off_DXp);
  s.DX = reinterpret_cast<float*>(smem + L.off_DX);
  s.rowloss = reinterpret_cast<float*>(smem + L.off_rowloss);
  s.tok = reinterpret_cast<index_t*>(smem + L.off_tok);
  s.tgt = reinterpret_cast<index_t*>(smem + L.off_tgt);
  s.rank = cluster_rank<CS>();
  s.h0 = s.rank * L.hc;
  s.nh = max(0, min(L.hc, L.H - s.h0));
  return s;
}

// The model's parameters in global memory: C (V, E), W1 (TE, H), b1 (H,), W2 (H, V), b2 (V,).
struct ModelParams {
  float *C, *W1, *b1, *W2, *b2;
};

template <typename index_t>
__device__ __forceinline__ ModelParams model_params(const PersistentLayout& L, const SgdTrainArgs<index_t>& a,
                                                    int64_t model) {
  return {a.C + model * L.V * L.E, a.W1 + model * L.TE * L.H, a.b1 + model * L.H, a.W2 + model * L.H * L.V,
          a.b2 + model * L.V};
}

// load_parameters: global -> shared, C and b2 whole, this block's slices of W1 (TE, nh), b1 (nh,), W2 (nh, V).
template <typename index_t>
__device__ __forceinline__ void load_parameters(const PersistentLayout& L, const ModelParams& g,
                                                const BlockState<index_t>& s) {
  const int V = L.V, E = L.E, TE = L.TE, H = L.H, nh = s.nh, h0 = s.h0;
  for (int q = threadIdx.x; q < V * E; q += kThreads) s.C[q] = g.C[q];
  for (int q = threadIdx.x; q < TE * nh; q += kThreads)
    s.W1[(q / nh) * L.ldw1 + q % nh] = g.W1[int64_t(q / nh) * H + h0 + q % nh];
  for (int q = threadIdx.x; q < nh; q += kThreads) s.b1[q] = g.b1[h0 + q];
  for (int q = threadIdx.x; q < nh * V; q += kThreads) s.W2[(q / V) * L.ldw2 + q % V] = g.W2[int64_t(h0) * V + q];
  for (int q = threadIdx.x; q < V; q += kThreads) s.b2[q] = g.b2[q];
}

// store_parameters: shared -> global, each block its slices; C and b2 (identical in every block) from rank 0.
// Ends with a cluster barrier: no block may exit (and release its shared memory) while a peer might still read its
// partial buffers.
template <int CS, typename index_t>
__device__ __forceinline__ void store_parameters(const PersistentLayout& L, const ModelParams& g,
                                                 const BlockState<index_t>& s) {
  const int V = L.V, E = L.E, TE = L.TE, H = L.H, nh = s.nh, h0 = s.h0;
  for (int q = threadIdx.x; q < TE * nh; q += kThreads)
    g.W1[int64_t(q / nh) * H + h0 + q % nh] = s.W1[(q / nh) * L.ldw1 + q % nh];
  for (int q = threadIdx.x; q < nh; q += kThreads) g.b1[h0 + q] = s.b1[q];
  for (int q = threadIdx.x; q < nh * V; q += kThreads) g.W2[int64_t(h0) * V + q] = s.W2[(q / V) * L.ldw2 + q % V];
  if (s.rank == 0) {
    for (int q = threadIdx.x; q < V * E; q += kThreads) g.C[q] = s.C[q];
    for (int q = threadIdx.x; q < V; q += kThreads) g.b2[q] = s.b2[q];
  }
  if constexpr (CS > 1) cluster_or_block_sync<CS>();
}

// draw_minibatch: issues the cp.async copies of step i's minibatch -- B rows of X (T tokens) and Y -- into token
// buffer i % 2, the rows drawn by Philox from the model's seed (Seeded) or read from batch_idx. The caller waits
// (__pipeline_wait_prior) before the step that reads them; they land while the previous step computes.
template <bool Seeded, typename index_t>
__device__ __forceinline__ void draw_minibatch(const PersistentLayout& L, const SgdTrainArgs<index_t>& a,
                                               int64_t model, int64_t i, const BlockState<index_t>& s) {
  const int B = L.B, T = L.T;
  index_t* dtok = s.tok + (i & 1) * B * T;
  index_t* dtgt = s.tgt + (i & 1) * B;
  for (int b = threadIdx.x; b < B; b += kThreads) {
    int64_t row;
    if constexpr (Seeded) {
      row = philox::minibatch_row(static_cast<uint64_t>(a.seeds[model]), static_cast<uint64_t>(a.start_step + i),
                                  static_cast<uint64_t>(b), static_cast<uint64_t>(a.N));
    } else {
      row = a.batch_idx[model * a.idx_stride + i * B + b];
      CUDA_KERNEL_ASSERT(row >= 0 && row < a.N && "batch_idx out of range");
    }
    for (int t = 0; t < T; ++t) __pipeline_memcpy_async(dtok + b * T + t, a.X + row * T + t, sizeof(index_t));
    __pipeline_memcpy_async(dtgt + b, a.Y + row, sizeof(index_t));
  }
  __pipeline_commit();
}

// gather: the rows of C (each (E,)) of context position t of minibatch rows m0 .. m0 + kTileM - 1 (clamped to B - 1,
// as tile_product clamps). Called inside hidden_layer's k loop rather than as a pass of its own: x = C[tok] is read
// straight from the replicated C, and only the threads of column group 0 store it (for the W1 update).
template <typename index_t>
__device__ __forceinline__ void gather(const PersistentLayout& L, const float* C, const index_t* tok, int m0, int t,
                                       const float* (&crow)[kTileM]) {
#pragma unroll
  for (int r = 0; r < kTileM; ++r) {
    const int tk = static_cast<int>(tok[min(m0 + r, L.B - 1) * L.T + t]);
    CUDA_KERNEL_ASSERT(tk >= 0 && tk < L.V && "X holds a token outside the vocabulary");
    crow[r] = C + tk * L.E;
  }
}

// hidden_layer: h = tanh(x @ W1[:, slice] + b1[slice])  (B, nh), x = C[tok] (B, TE) gathered on the fly; the threads
// of column group 0 also store x. Written out rather than with tile_product because the a operand comes through the
// gather (a pointer per row and position) and the tile stores x on the way.
template <typename index_t>
__device__ __forceinline__ void hidden_layer(const PersistentLayout& L, const BlockState<index_t>& s,
                                             const index_t* tok) {
  const int B = L.B, T = L.T, E = L.E, TE = L.TE, ldw1 = L.ldw1, ldh = L.ldh, nh = s.nh;
  const int nt_count = ceil_div(nh, kTileN);
  const int items = ceil_div(B, kTileM) * nt_count;
  for (int w = threadIdx.x; w < items; w += kThreads) {
    const int m0 = (w / nt_count) * kTileM, n0 = w % nt_count;
    int nj[kTileN];
#pragma unroll
    for (int j = 0; j < kTileN; ++j) nj[j] = min(n0 + j * nt_count, nh - 1);
    float acc[kTileM][kTileN] = {};
    for (int t = 0; t < T; ++t) {
      const float* crow[kTileM];
      gather(L, s.C, tok, m0, t, crow);
      for (int e = 0; e < E; ++e) {
        const int k = t * E + e;
        float av[kTileM], bv[kTileN];
#pragma unroll
        for (int r = 0; r < kTileM; ++r) av[r] = crow[r][e];
#pragma unroll
        for (int j = 0; j < kTileN; ++j) bv[j] = s.W1[k * ldw1 + nj[j]];
#pragma unroll
        for (int r = 0; r < kTileM; ++r)
#pragma unroll
          for (int j = 0; j < kTileN; ++j) acc[r][j] = fmaf(av[r], bv[j], acc[r][j]);
        if (n0 == 0) {
#pragma unroll
          for (int r = 0; r < kTileM; ++r)
            if (m0 + r < B) s.X[(m0 + r) * TE + k] = av[r];
        }
      }
    }
#pragma unroll
    for (int r = 0; r < kTileM; ++r)
#pragma unroll
      for (int j = 0; j < kTileN; ++j) {
        const int n = n0 + j * nt_count;
        if (m0 + r < B && n < nh) s.H[(m0 + r) * ldh + n] = tanhf(acc[r][j] + s.b1[n]);
      }
  }
}

// softmax_rows: logits = b2 + h @ W2  (B, V), then per row (one warp each) the loss and dL/dlogits = (softmax -
// onehot) / B in place of the logits. The product is split: each block's slice (and each split-K group g) writes
// its partial Lp[g] = h[:, kg] @ W2[kg, :]; after the cluster barrier inside, every block sums all partials in
// (rank, group) order, so the replicated logits are identical in every block.
// The row is cuda/softmax_row.cuh's, with the per-op numerics (float32: the loop trains in float32 only).
template <int CS, typename index_t>
__device__ __forceinline__ void softmax_rows(const PersistentLayout& L, const BlockState<index_t>& s,
                                             const index_t* tgt) {
  const int B = L.B, V = L.V, ldh = L.ldh, ldw2 = L.ldw2, ks = L.ks_logits;
  const float *sH = s.H, *sW2 = s.W2;
  float* sLp = s.Lp;
  phase_product(
      0, B, V, s.nh, ks, [&](int m, int k) { return sH[m * ldh + k]; }, [&](int k, int n) { return sW2[k * ldw2 + n]; },
      [&](int g, int m, int n, float v) { sLp[(g * B + m) * V + n] = v; });
  cluster_or_block_sync<CS>();

  const int lane = threadIdx.x & 31;
  const float inv_B = 1.0f / static_cast<float>(B);
  for (int b = threadIdx.x >> 5; b < B; b += kWarps) {
    float* lrow = s.L + b * V;
    const int y = static_cast<int>(tgt[b]);
    CUDA_KERNEL_ASSERT(y >= 0 && y < V && "Y holds a target outside the vocabulary");
    OnlineLse<float> st = lse_init<float>();
    for (int v = lane; v < V; v += 32) {
      float z = s.b2[v];
      for (int r = 0; r < CS; ++r) {
        const float* lp = cluster_peer<CS>(sLp, r);
        for (int g = 0; g < ks; ++g) z += lp[(g * B + b) * V + v];
      }
      lrow[v] = z;
      st = lse_add(st, z, v == y);
    }
    __syncwarp();
    const RowResult<float> r = cuda::warp_row_result<32>(st, lrow[y]);
    __syncwarp();  // every lane has read the target logit before its lane overwrites it
    const float d_y = cuda::warp_row_grad<32>(
        [&](auto f) {
          for (int v = lane; v < V; v += 32) lrow[v] = f(v, lrow[v]);
        },
        y, r.lse, inv_B);
    if (lane == y % 32) lrow[y] = d_y;  // the lane that wrote 0 there above
    if (lane == 0) s.rowloss[b] = r.loss;
  }
}

// The running mean of the step losses over a window of loss_every steps, kept by lane 0 of warp 0.
struct LossWindow {
  float sum = 0.f;
  int64_t count = 0, pos = 0;
};

// loss_window: warp 0 adds the step's mean loss (over the B rows of rowloss) to the window; at the window's end (or
// the run's) rank 0 writes the window's mean to losses[model, pos].
template <typename index_t>
__device__ __forceinline__ void loss_window(const PersistentLayout& L, const SgdTrainArgs<index_t>& a, int64_t model,
                                            int64_t i, const BlockState<index_t>& s, LossWindow& w) {
  if (threadIdx.x >= 32) return;
  const int lane = threadIdx.x;
  float sum = 0.f;
  for (int b = lane; b < L.B; b += 32) sum += s.rowloss[b];
  sum = cuda::warp_sum(sum);
  if (lane != 0) return;
  w.sum += sum * (1.0f / static_cast<float>(L.B));
  if (++w.count == a.loss_every || i == a.S - 1) {
    if (s.rank == 0) a.losses[model * a.num_losses + w.pos] = w.sum / static_cast<float>(w.count);
    ++w.pos;
    w.sum = 0.f;
    w.count = 0;
  }
}

// backward_products: the gradient products of a step and the SGD updates of W1, b1, W2, b2 (C's is
// embedding_update). Three stages, two barriers inside (the second a cluster barrier: dx sums over the slices):
//   1. dpre = (dl @ W2[slice, :]^T) * (1 - h^2)  (B, nh)
//   2. partial dx = dpre @ W1[:, slice]^T (B, TE) per split-K group, before W1 changes; and the updates that need
//      nothing more: W2[slice] = decay * W2[slice] - lr * h^T @ dl, b2 -= lr * sum_b dl (every block, identically),
//      b1[slice] -= lr * sum_b dpre
//   3. W1[:, slice] = decay * W1[:, slice] - lr * x^T @ dpre; dx = sum over (block, group) of the partials, in that
//      order.
// decay = 1 - lr * weight_decay: the weight decay of the weights (not of the biases).
// The items of stages 2 and 3 continue one numbering (first_item), so no thread gets two tiles while another idles.
template <int CS, typename index_t>
__device__ __forceinline__ void backward_products(const PersistentLayout& L, const BlockState<index_t>& s, float lr,
                                                  float decay) {
  const int B = L.B, TE = L.TE, V = L.V, ldw1 = L.ldw1, ldw2 = L.ldw2, ldh = L.ldh, nh = s.nh;
  const float *sH = s.H, *sL = s.L, *sX = s.X;
  float *sG = s.G, *sW1 = s.W1, *sW2 = s.W2, *sDXp = s.DXp;
  phase_product(
      0, B, nh, V, 1, [&](int m, int k) { return sL[m * V + k]; }, [&](int k, int n) { return sW2[n * ldw2 + k]; },
      [&](int, int m, int n, float v) {
        const float hv = sH[m * ldh + n];
        sG[m * ldh + n] = v * (1.f - hv * hv);
      });
  __syncthreads();

  int base = phase_product(
      0, B, TE, nh, L.ks_dx, [&](int m, int k) { return sG[m * ldh + k]; },
      [&](int k, int n) { return sW1[n * ldw1 + k]; },
      [&](int g, int m, int n, float v) { sDXp[(g * B + m) * TE + n] = v; });
  base += phase_product(
      base, nh, V, B, 1, [&](int m, int k) { return sH[k * ldh + m]; }, [&](int k, int n) { return sL[k * V + n]; },
      [&](int, int m, int n, float v) { sW2[m * ldw2 + n] = sW2[m * ldw2 + n] * decay - lr * v; });
  for (int v = first_item(base); v < V; v += kThreads) {
    float sum = 0.f;
    for (int b = 0; b < B; ++b) sum += sL[b * V + v];
    s.b2[v] -= lr * sum;
  }
  base += V;
  for (int j = first_item(base); j < nh; j += kThreads) {
    float sum = 0.f;
    for (int b = 0; b < B; ++b) sum += sG[b * ldh + j];
    s.b1[j] -= lr * sum;
  }
  cluster_or_block_sync<CS>();

  base = phase_product(
      0, TE, nh, B, 1, [&](int m, int k) { return sX[k * TE + m]; }, [&](int k, int n) { return sG[k * ldh + n]; },
      [&](int, int m, int n, float v) { sW1[m * ldw1 + n] = sW1[m * ldw1 + n] * decay - lr * v; });
  for (int q = first_item(base); q < B * TE; q += kThreads) {
    float sum = 0.f;
    for (int r = 0; r < CS; ++r) {
      const float* dxp = cluster_peer<CS>(sDXp, r);
      for (int g = 0; g < L.ks_dx; ++g) sum += dxp[g * B * TE + q];
    }
    s.DX[q] = sum;
  }
}

// embedding_update: C = decay * C - lr * dC. One warp per token v gathers the dx rows (E,) of the positions holding v (a warp
// ballot over the B*T positions, in position order: deterministic, no atomics), lanes over the embedding.
template <typename index_t>
__device__ __forceinline__ void embedding_update(const PersistentLayout& L, const BlockState<index_t>& s,
                                                 const index_t* tok, float lr, float decay) {
  const int V = L.V, E = L.E, BT = L.B * L.T;
  const int lane = threadIdx.x & 31;
  for (int v = threadIdx.x >> 5; v < V; v += kWarps) {
    for (int e0 = 0; e0 < E; e0 += 64) {
      float acc0 = 0.f, acc1 = 0.f;
      for (int p0 = 0; p0 < BT; p0 += 32) {
        const int p = p0 + lane;
        unsigned hits = __ballot_sync(cuda::kFullMask, p < BT && static_cast<int>(tok[p]) == v);
        while (hits) {
          const int q = p0 + __ffs(hits) - 1;
          hits &= hits - 1;
          if (e0 + lane < E) acc0 += s.DX[q * E + e0 + lane];
          if (e0 + 32 + lane < E) acc1 += s.DX[q * E + e0 + 32 + lane];
        }
      }
      float* c = s.C + v * E + e0 + lane;
      if (e0 + lane < E) c[0] = c[0] * decay - lr * acc0;
      if (e0 + 32 + lane < E) c[32] = c[32] * decay - lr * acc1;
    }
  }
}

// S SGD steps of model blockIdx.x / CS; this block is rank blockIdx.x % CS of its cluster (see the top of the file).
// Seeded: the minibatch rows come from Philox (a.seeds), otherwise from a.batch_idx.
template <int CS, bool Seeded, typename index_t>
__global__ void __launch_bounds__(kThreads, 1)
    sgd_train_persistent_kernel(const PersistentLayout L, const SgdTrainArgs<index_t> a) {
  CHARMLP_DYNAMIC_SHARED(unsigned char, smem, 16);
  const BlockState<index_t> s = block_state<CS, index_t>(L, smem);
  const int64_t model = blockIdx.x / CS;
  const ModelParams params = model_params(L, a, model);
  load_parameters(L, params, s);
  if (a.S > 0) draw_minibatch<Seeded>(L, a, model, 0, s);
  __pipeline_wait_prior(0);
  __syncthreads();

  const float* lrs = a.lrs + model * a.lr_stride;
  LossWindow window;
  for (int64_t i = 0; i < a.S; ++i) {
    const index_t* tok = s.tok + (i & 1) * L.B * L.T;  // (B, T) this step's contexts
    const index_t* tgt = s.tgt + (i & 1) * L.B;        // (B,) their targets
    const float lr = lrs[i], decay = 1.f - lr * a.weight_decay;
    if (i + 1 < a.S) draw_minibatch<Seeded>(L, a, model, i + 1, s);
    hidden_layer(L, s, tok);
    __syncthreads();
    softmax_rows<CS>(L, s, tgt);
    __syncthreads();
    loss_window(L, a, model, i, s, window);  // warp 0, before its share of backward_products
    backward_products<CS>(L, s, lr, decay);
    __syncthreads();
    embedding_update(L, s, tok, lr, decay);
    __pipeline_wait_prior(0);  // the next step's minibatch has landed
    __syncthreads();
  }
  store_parameters<CS>(L, params, s);
}

// ---- host launchers ----------------------------------------------------------------------------------------------

// Launches one block (CS = 1) or one cluster of CS blocks per model; false, without launching, when the device
// cannot schedule such a cluster at all (the plan only knows the per-block limits).
template <int CS, bool Seeded, typename index_t>
bool launch_persistent(const PersistentLayout& L, const SgdTrainArgs<index_t>& args, int64_t M,
                       cudaStream_t stream) {
  auto kernel = sgd_train_persistent_kernel<CS, Seeded, index_t>;
  CHARMLP_CUDA_CHECK(
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(L.bytes)));
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3(static_cast<unsigned>(M * CS));
  cfg.blockDim = dim3(kThreads);
  cfg.dynamicSmemBytes = static_cast<size_t>(L.bytes);
  cfg.stream = stream;
  cudaLaunchAttribute attr[1];
  if constexpr (CS > 1) {
    attr[0].id = cudaLaunchAttributeClusterDimension;
    attr[0].val.clusterDim.x = CS;
    attr[0].val.clusterDim.y = 1;
    attr[0].val.clusterDim.z = 1;
    cfg.attrs = attr;
    cfg.numAttrs = 1;
    int clusters = 0;
    CHARMLP_CUDA_CHECK(cudaOccupancyMaxActiveClusters(&clusters, kernel, &cfg));
    if (clusters == 0) return false;
  }
  CHARMLP_CUDA_CHECK(cudaLaunchKernelEx(&cfg, kernel, L, args));
  return true;
}

template <bool Seeded, typename index_t>
bool launch_persistent_cs(const PersistentLayout& L, const SgdTrainArgs<index_t>& args, int64_t M,
                          cudaStream_t stream) {
  switch (L.cluster) {
    case 1: return launch_persistent<1, Seeded>(L, args, M, stream);
    case 2: return launch_persistent<2, Seeded>(L, args, M, stream);
    case 4: return launch_persistent<4, Seeded>(L, args, M, stream);
    case 8: return launch_persistent<8, Seeded>(L, args, M, stream);
    default: TORCH_CHECK(false, "sgd_train: unsupported cluster size ", L.cluster, " (1, 2, 4 or 8)");
  }
}

at::Tensor sgd_train_cuda(const at::Tensor& C, const at::Tensor& W1, const at::Tensor& b1, const at::Tensor& W2,
                          const at::Tensor& b2, const at::Tensor& X, const at::Tensor& Y, const at::Tensor& lrs,
                          const std::optional<at::Tensor>& seeds, const std::optional<at::Tensor>& batch_idx,
                          int64_t start_step, int64_t batch_size, int64_t loss_every, int64_t cluster_size,
                         double weight_decay) {
  const SgdTrainShape s =
      check_sgd_train_args(C, W1, b1, W2, b2, X, Y, lrs, seeds, batch_idx, start_step, batch_size, loss_every,
                           cluster_size, weight_decay);
  TORCH_CHECK(cuda::on_kernel_device(C), "sgd_train (CUDA kernel) got C on ", C.device());
  TORCH_CHECK(!s.direct, "sgd_train: the persistent CUDA kernel has no direct connections (W2 of shape ", W2.sizes(),
              " holds them after its ", s.H, " hidden rows); train such a model with the CUDA-graph stepper "
              "(charmlp_fast.steppers.GraphStepper, --impl graph)");
  const cuda::DeviceGuard guard(C.device());
  auto losses = at::empty({s.M, s.num_losses}, C.options());
  if (s.S == 0) return losses;

  const cudaDeviceProp* prop = cuda::device_properties();
  auto plan_for = [&](int64_t cluster) {
    return plan_persistent(s.V, s.T, s.E, s.H, s.B, static_cast<int64_t>(prop->sharedMemPerBlockOptin), prop->major,
                           cluster);
  };
  const PersistentPlan plan = plan_for(cluster_size);
  TORCH_CHECK(plan.ok, "sgd_train: ", plan.reason,
              ". Train this size with the CUDA-graph stepper (charmlp_fast.steppers.GraphStepper, --impl graph) "
              "instead.");
  TORCH_CHECK(s.M * plan.layout.cluster <= std::numeric_limits<int32_t>::max(), "sgd_train: too many models (", s.M,
              ") for one launch");

  const SgdTrainInputs inputs(X, Y, lrs, seeds, batch_idx);
  const cudaStream_t stream = cuda::current_stream();

  auto run = [&](auto index_tag) {
    using index_t = decltype(index_tag);
    const SgdTrainArgs<index_t> a = inputs.args<index_t>(C, W1, b1, W2, b2, losses, s, start_step, weight_decay);
    // A cluster that fits the per-block limits may still not be schedulable where the GPU is partitioned or shared
    // (MIG, MPS). With cluster_size = 0 (auto) fall back to smaller clusters (more shared memory per block), as the
    // caller asked for any that works; a cluster size the caller chose is an error instead.
    for (PersistentPlan p = plan;;) {
      const bool launched = s.use_seeds ? launch_persistent_cs<true>(p.layout, a, s.M, stream)
                                        : launch_persistent_cs<false>(p.layout, a, s.M, stream);
      if (launched) return;
      TORCH_CHECK(cluster_size == 0 && p.layout.cluster > 1, "sgd_train: a cluster of ", p.layout.cluster,
                  " blocks with ", p.layout.bytes, " bytes of shared memory each cannot be scheduled on this device; ",
                  "pass a smaller cluster_size");
      const int64_t smaller = p.layout.cluster / 2;
      p = plan_for(smaller);
      TORCH_CHECK(p.ok, "sgd_train: no thread-block cluster of this size can be scheduled on this device, and ",
                  "with ", smaller, " block(s) per model: ", p.reason);
    }
  };
  if (X.scalar_type() == at::kLong) {
    run(int64_t{});
  } else {
    run(int32_t{});
  }
  return losses;
}

at::Tensor philox_minibatch_cuda(const at::Tensor& seeds, const at::Tensor& start_step, int64_t num_steps,
                                 int64_t batch_size, int64_t num_rows) {
  check_philox_minibatch_args(seeds, start_step, num_steps, batch_size, num_rows);
  TORCH_CHECK(cuda::on_kernel_device(seeds), "philox_minibatch (CUDA kernel) got seeds on ", seeds.device());
  const cuda::DeviceGuard guard(seeds.device());
  const int64_t M = seeds.size(0);
  auto out = at::empty({M, num_steps, batch_size}, seeds.options());
  const int64_t total = out.numel();
  if (total == 0) return out;
  const auto sc = seeds.expect_contiguous();
  constexpr int threads = 256;
  const int blocks = static_cast<int>(std::min<int64_t>(ceil_div(total, threads), 4096));
  cuda::launch(philox_minibatch_kernel, blocks, threads, 0, cuda::current_stream(),
      sc->data_ptr<int64_t>(), start_step.data_ptr<int64_t>(), num_steps, batch_size, num_rows, total,
      out.data_ptr<int64_t>());
  return out;
}

}  // namespace

CHARMLP_REGISTER_CUDA_KERNELS(m) {
  m.impl("sgd_train", &sgd_train_cuda);
  m.impl("philox_minibatch", &philox_minibatch_cuda);
}

}  // namespace charmlp
