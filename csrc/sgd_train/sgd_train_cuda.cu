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
// launch latency (~87 us/step in one CUDA graph on an H100). Here nothing is launched per step; what is left:
//   * FP32 issue: one SM does 128 FMA/clk = 507 GFLOP/s at 1.98 GHz -> 4.3 us/step at 100 % (0.86 s for the
//     seed's 200,000 steps). Hence the cluster: CS blocks split the hidden layer (block r owns hidden units
//     [r*hc, r*hc + hc)), which divides every product but the replicated softmax and C update by CS.
//   * shared-memory loads: a 4x4 register tile issues 8 LDS per 16 FMA, i.e. ~1.5 instructions per FMA, so the
//     practical bound is ~1.5x the FMA bound: ~6.5 us/step on one SM, ~1.6 us on a cluster of 4.
//   * barriers: 5 __syncthreads and 2 cluster barriers per step (the cluster ones only for CS > 1: after the
//     partial logits and after the partial dx, the two products summed over the hidden layer). A block barrier
//     is tens of cycles when the phases are balanced, a cluster barrier a few hundred.
// Estimated at the seed's size with CS = 4: ~2.5-3 us/step, i.e. ~0.5-0.6 s for 200,000 steps (target <= 1 s).
// UNVERIFIED: written and compiled without a GPU; the tile shapes and the auto cluster size are untuned.
//
// Determinism: every sum has a fixed order (split-K partials are reduced in (rank, group) order, the C gradient
// is gathered per token in minibatch order with warp ballots instead of atomics), so a run is bitwise
// reproducible, a chunked run equals an unchunked one, and the replicas of C and b2 in the blocks of a cluster
// stay identical.
//
// Sizes: whatever fits the plan of csrc/sgd_train/sgd_train.h (plan_persistent): parameters + activations of one block in
// the device's opt-in shared memory (227 KB on H100). Larger models (batch * hidden grows fastest) get a
// readable error; the trainer then uses the CUDA-graph stepper (charmlp_fast/device_train.py).
// Tested on the CPU emulator (csrc/cuda/cuda_utils.cuh): every cluster size, distributed shared memory and the
// cp.async prefetch, against the CPU loop; only a GPU shows the timing, whether clusters are scheduled on a busy
// or partitioned device, and the register budget at run time (ptxas's view: benchmarks/kernel_resources.py).
#include "cuda/cuda_utils.cuh"  // first: see its header
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
constexpr unsigned kFullMask = 0xffffffffu;

// ---- helpers -------------------------------------------------------------------------------------------------

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(kFullMask, v, o);
  return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(kFullMask, v, o));
  return v;
}

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
  const int nt_count = (N + kTileN - 1) / kTileN;
  const int tiles = ((M + kTileM - 1) / kTileM) * nt_count;
  const int kc = (K + ks - 1) / ks;
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

// Issues the cp.async copies of step i's minibatch (B rows of X and Y) into token buffer i % 2.
template <typename index_t>
__device__ __forceinline__ void prefetch_minibatch(const PersistentLayout& L, const SgdTrainArgs<index_t>& a,
                                                   int64_t model, int64_t i, index_t* tok, index_t* tgt) {
  const int B = L.B, T = L.T;
  index_t* dtok = tok + (i & 1) * B * T;
  index_t* dtgt = tgt + (i & 1) * B;
  for (int b = threadIdx.x; b < B; b += kThreads) {
    int64_t row;
    if (a.seeds != nullptr) {
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

// S SGD steps of model blockIdx.x / CS; this block is rank blockIdx.x % CS of its cluster (see the top of the file).
template <int CS, typename index_t>
__global__ void __launch_bounds__(kThreads, 1)
    sgd_train_persistent_kernel(const PersistentLayout L, const SgdTrainArgs<index_t> a) {
  CHARMLP_DYNAMIC_SHARED(unsigned char, smem, 16);
  float* sC = reinterpret_cast<float*>(smem + L.off_C);    // (V, E), replicated in every block of the cluster
  float* sW1 = reinterpret_cast<float*>(smem + L.off_W1);  // (TE, ldw1): this block's columns of W1
  float* sb1 = reinterpret_cast<float*>(smem + L.off_b1);  // (hc,)
  float* sW2 = reinterpret_cast<float*>(smem + L.off_W2);  // (hc, ldw2): this block's rows of W2
  float* sb2 = reinterpret_cast<float*>(smem + L.off_b2);  // (V,), replicated
  float* sH = reinterpret_cast<float*>(smem + L.off_H);    // (B, ldh) tanh activations of this block's slice
  float* sG = reinterpret_cast<float*>(smem + L.off_G);    // (B, ldh) dL/dpre of the slice
  float* sX = reinterpret_cast<float*>(smem + L.off_X);    // (B, TE) gathered embeddings
  float* sLp = reinterpret_cast<float*>(smem + L.off_Lp);  // (ks_logits, B, V) partial logits of the slice
  float* sL = reinterpret_cast<float*>(smem + L.off_L);    // (B, V) logits -> dL/dlogits
  float* sDXp = reinterpret_cast<float*>(smem + L.off_DXp);  // (ks_dx, B, TE) partial dL/dx of the slice
  float* sDX = reinterpret_cast<float*>(smem + L.off_DX);    // (B, TE) dL/dx = (B*T, E) rows per position
  float* sRowLoss = reinterpret_cast<float*>(smem + L.off_rowloss);  // (B,)
  index_t* sTok = reinterpret_cast<index_t*>(smem + L.off_tok);      // (2, B, T) double-buffered minibatch
  index_t* sTgt = reinterpret_cast<index_t*>(smem + L.off_tgt);      // (2, B)

  const int B = L.B, T = L.T, E = L.E, TE = L.TE, H = L.H, V = L.V;
  const int ldw1 = L.ldw1, ldw2 = L.ldw2, ldh = L.ldh;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int rank = cluster_rank<CS>();
  const int64_t model = blockIdx.x / CS;
  const int h0 = rank * L.hc;                      // first hidden unit of this block
  const int nh = max(0, min(L.hc, H - h0));        // hidden units of this block
  const float inv_B = 1.0f / static_cast<float>(B);

  // Parameters -> shared memory (global layouts: C (V, E), W1 (TE, H), b1 (H), W2 (H, V), b2 (V)).
  float* gC = a.C + model * V * E;
  float* gW1 = a.W1 + model * TE * H;
  float* gb1 = a.b1 + model * H;
  float* gW2 = a.W2 + model * H * V;
  float* gb2 = a.b2 + model * V;
  for (int q = tid; q < V * E; q += kThreads) sC[q] = gC[q];
  for (int q = tid; q < TE * nh; q += kThreads) sW1[(q / nh) * ldw1 + q % nh] = gW1[int64_t(q / nh) * H + h0 + q % nh];
  for (int q = tid; q < nh; q += kThreads) sb1[q] = gb1[h0 + q];
  for (int q = tid; q < nh * V; q += kThreads) sW2[(q / V) * ldw2 + q % V] = gW2[int64_t(h0) * V + q];
  for (int q = tid; q < V; q += kThreads) sb2[q] = gb2[q];
  if (a.S > 0) prefetch_minibatch(L, a, model, 0, sTok, sTgt);
  __pipeline_wait_prior(0);
  __syncthreads();

  const float* lrs = a.lrs + model * a.lr_stride;
  float window_sum = 0.f;  // warp 0 keeps the loss window
  int64_t window_count = 0, loss_pos = 0;

  for (int64_t i = 0; i < a.S; ++i) {
    const index_t* tok = sTok + (i & 1) * B * T;  // (B, T) this step's contexts
    const index_t* tgt = sTgt + (i & 1) * B;      // (B,) targets
    const float lr = lrs[i];
    if (i + 1 < a.S) prefetch_minibatch(L, a, model, i + 1, sTok, sTgt);  // lands while this step computes

    // P1. h = tanh(x @ W1[:, slice] + b1[slice])  (B, nh), x = C[tok] gathered on the fly; the threads of column
    //     group 0 also store x (B, TE) for the W1 update.
    {
      const int nt_count = (nh + kTileN - 1) / kTileN;
      const int items = ((B + kTileM - 1) / kTileM) * nt_count;
      for (int w = tid; w < items; w += kThreads) {
        const int m0 = (w / nt_count) * kTileM, n0 = w % nt_count;
        int nj[kTileN];
#pragma unroll
        for (int j = 0; j < kTileN; ++j) nj[j] = min(n0 + j * nt_count, nh - 1);
        float acc[kTileM][kTileN] = {};
        for (int t = 0; t < T; ++t) {
          const float* crow[kTileM];
#pragma unroll
          for (int r = 0; r < kTileM; ++r) {
            const int tk = static_cast<int>(tok[min(m0 + r, B - 1) * T + t]);
            CUDA_KERNEL_ASSERT(tk >= 0 && tk < V && "X holds a token outside the vocabulary");
            crow[r] = sC + tk * E;
          }
          for (int e = 0; e < E; ++e) {
            const int k = t * E + e;
            float av[kTileM], bv[kTileN];
#pragma unroll
            for (int r = 0; r < kTileM; ++r) av[r] = crow[r][e];
#pragma unroll
            for (int j = 0; j < kTileN; ++j) bv[j] = sW1[k * ldw1 + nj[j]];
#pragma unroll
            for (int r = 0; r < kTileM; ++r)
#pragma unroll
              for (int j = 0; j < kTileN; ++j) acc[r][j] = fmaf(av[r], bv[j], acc[r][j]);
            if (n0 == 0) {
#pragma unroll
              for (int r = 0; r < kTileM; ++r)
                if (m0 + r < B) sX[(m0 + r) * TE + k] = av[r];
            }
          }
        }
#pragma unroll
        for (int r = 0; r < kTileM; ++r)
#pragma unroll
          for (int j = 0; j < kTileN; ++j) {
            const int n = n0 + j * nt_count;
            if (m0 + r < B && n < nh) sH[(m0 + r) * ldh + n] = tanhf(acc[r][j] + sb1[n]);
          }
      }
    }
    __syncthreads();

    // P2. Partial logits of the slice: Lp[g] = h[:, kg] @ W2[kg, :]  (B, V) per split-K group g.
    phase_product(
        0, B, V, nh, L.ks_logits, [&](int m, int k) { return sH[m * ldh + k]; },
        [&](int k, int n) { return sW2[k * ldw2 + n]; },
        [&](int g, int m, int n, float v) { sLp[(g * B + m) * V + n] = v; });
    cluster_or_block_sync<CS>();

    // P3. logits = b2 + sum over (block, group) of the partials, in that order; softmax cross-entropy per row
    //     (one warp per row); dL/dlogits = (softmax - onehot) / B replaces the logits.
    for (int b = warp; b < B; b += kWarps) {
      float* lrow = sL + b * V;
      float mx = -INFINITY;
      for (int v = lane; v < V; v += 32) {
        float s = sb2[v];
        for (int r = 0; r < CS; ++r) {
          const float* lp = cluster_peer<CS>(sLp, r);
          for (int g = 0; g < L.ks_logits; ++g) s += lp[(g * B + b) * V + v];
        }
        lrow[v] = s;
        mx = fmaxf(mx, s);
      }
      mx = warp_max(mx);
      float se = 0.f;
      for (int v = lane; v < V; v += 32) se += expf(lrow[v] - mx);
      se = warp_sum(se);
      const int y = static_cast<int>(tgt[b]);
      CUDA_KERNEL_ASSERT(y >= 0 && y < V && "Y holds a target outside the vocabulary");
      __syncwarp();
      const float logit_y = lrow[y];
      __syncwarp();  // every lane has read logit_y before lane y % 32 overwrites it
      const float inv_se = 1.0f / se;
      for (int v = lane; v < V; v += 32) lrow[v] = (expf(lrow[v] - mx) * inv_se - (v == y ? 1.f : 0.f)) * inv_B;
      if (lane == 0) sRowLoss[b] = mx + logf(se) - logit_y;
    }
    __syncthreads();

    // P4. dpre = (dl @ W2[slice, :]^T) * (1 - h^2)  (B, nh); warp 0 also sums the step's loss.
    phase_product(
        0, B, nh, V, 1, [&](int m, int k) { return sL[m * V + k]; }, [&](int k, int n) { return sW2[n * ldw2 + k]; },
        [&](int, int m, int n, float v) {
          const float hv = sH[m * ldh + n];
          sG[m * ldh + n] = v * (1.f - hv * hv);
        });
    if (warp == 0) {
      float s = 0.f;
      for (int b = lane; b < B; b += 32) s += sRowLoss[b];
      s = warp_sum(s);
      if (lane == 0) {
        window_sum += s * inv_B;
        if (++window_count == a.loss_every || i == a.S - 1) {
          if (rank == 0) a.losses[model * a.num_losses + loss_pos] = window_sum / static_cast<float>(window_count);
          ++loss_pos;
          window_sum = 0.f;
          window_count = 0;
        }
      }
    }
    __syncthreads();

    // P5. Partial dx = dpre @ W1[:, slice]^T (B, TE) per split-K group — before W1 changes; and the updates that
    //     need nothing more: W2[slice] -= lr * h^T @ dl, b2 -= lr * sum_b dl (every block, identically),
    //     b1[slice] -= lr * sum_b dpre.
    {
      int base = phase_product(
          0, B, TE, nh, L.ks_dx, [&](int m, int k) { return sG[m * ldh + k]; },
          [&](int k, int n) { return sW1[n * ldw1 + k]; },
          [&](int g, int m, int n, float v) { sDXp[(g * B + m) * TE + n] = v; });
      base += phase_product(
          base, nh, V, B, 1, [&](int m, int k) { return sH[k * ldh + m]; }, [&](int k, int n) { return sL[k * V + n]; },
          [&](int, int m, int n, float v) { sW2[m * ldw2 + n] -= lr * v; });
      for (int v = first_item(base); v < V; v += kThreads) {
        float s = 0.f;
        for (int b = 0; b < B; ++b) s += sL[b * V + v];
        sb2[v] -= lr * s;
      }
      base += V;
      for (int j = first_item(base); j < nh; j += kThreads) {
        float s = 0.f;
        for (int b = 0; b < B; ++b) s += sG[b * ldh + j];
        sb1[j] -= lr * s;
      }
    }
    cluster_or_block_sync<CS>();

    // P6. W1[:, slice] -= lr * x^T @ dpre; dx = sum over (block, group) of the partials, in that order.
    {
      const int base = phase_product(
          0, TE, nh, B, 1, [&](int m, int k) { return sX[k * TE + m]; }, [&](int k, int n) { return sG[k * ldh + n]; },
          [&](int, int m, int n, float v) { sW1[m * ldw1 + n] -= lr * v; });
      for (int q = first_item(base); q < B * TE; q += kThreads) {
        float s = 0.f;
        for (int r = 0; r < CS; ++r) {
          const float* dxp = cluster_peer<CS>(sDXp, r);
          for (int g = 0; g < L.ks_dx; ++g) s += dxp[g * B * TE + q];
        }
        sDX[q] = s;
      }
    }
    __syncthreads();

    // P7. C -= lr * dC: one warp per token v gathers the dx rows of the positions holding v (warp ballot over the
    //     B*T positions, in position order — deterministic, no atomics), lanes over the embedding.
    for (int v = warp; v < V; v += kWarps) {
      for (int e0 = 0; e0 < E; e0 += 64) {
        float acc0 = 0.f, acc1 = 0.f;
        for (int p0 = 0; p0 < B * T; p0 += 32) {
          const int p = p0 + lane;
          unsigned hits = __ballot_sync(kFullMask, p < B * T && static_cast<int>(tok[p]) == v);
          while (hits) {
            const int q = p0 + __ffs(hits) - 1;
            hits &= hits - 1;
            if (e0 + lane < E) acc0 += sDX[q * E + e0 + lane];
            if (e0 + 32 + lane < E) acc1 += sDX[q * E + e0 + 32 + lane];
          }
        }
        if (e0 + lane < E) sC[v * E + e0 + lane] -= lr * acc0;
        if (e0 + 32 + lane < E) sC[v * E + e0 + 32 + lane] -= lr * acc1;
      }
    }
    __pipeline_wait_prior(0);  // the next step's minibatch has landed
    __syncthreads();
  }

  // Shared memory -> parameters: each block its slice; C and b2 (identical in every block) from rank 0.
  for (int q = tid; q < TE * nh; q += kThreads) gW1[int64_t(q / nh) * H + h0 + q % nh] = sW1[(q / nh) * ldw1 + q % nh];
  for (int q = tid; q < nh; q += kThreads) gb1[h0 + q] = sb1[q];
  for (int q = tid; q < nh * V; q += kThreads) gW2[int64_t(h0) * V + q] = sW2[(q / V) * ldw2 + q % V];
  if (rank == 0) {
    for (int q = tid; q < V * E; q += kThreads) gC[q] = sC[q];
    for (int q = tid; q < V; q += kThreads) gb2[q] = sb2[q];
  }
  // No block may exit (and release its shared memory) while a peer might still read its partial buffers.
  if constexpr (CS > 1) cluster_or_block_sync<CS>();
}

// ---- host launchers ----------------------------------------------------------------------------------------------

// Launches one block (CS = 1) or one cluster of CS blocks per model; false, without launching, when the device
// cannot schedule such a cluster at all (the plan only knows the per-block limits).
template <int CS, typename index_t>
bool launch_persistent(const PersistentLayout& L, const SgdTrainArgs<index_t>& args, int64_t M,
                       cudaStream_t stream) {
  auto kernel = sgd_train_persistent_kernel<CS, index_t>;
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

template <typename index_t>
bool launch_persistent_cs(const PersistentLayout& L, const SgdTrainArgs<index_t>& args, int64_t M,
                          cudaStream_t stream) {
  switch (L.cluster) {
    case 1: return launch_persistent<1>(L, args, M, stream);
    case 2: return launch_persistent<2>(L, args, M, stream);
    case 4: return launch_persistent<4>(L, args, M, stream);
    case 8: return launch_persistent<8>(L, args, M, stream);
    default: TORCH_CHECK(false, "sgd_train: unsupported cluster size ", L.cluster, " (1, 2, 4 or 8)");
  }
}

at::Tensor sgd_train_cuda(const at::Tensor& C, const at::Tensor& W1, const at::Tensor& b1, const at::Tensor& W2,
                          const at::Tensor& b2, const at::Tensor& X, const at::Tensor& Y, const at::Tensor& lrs,
                          const std::optional<at::Tensor>& seeds, const std::optional<at::Tensor>& batch_idx,
                          int64_t start_step, int64_t batch_size, int64_t loss_every, int64_t cluster_size) {
  const SgdTrainShape s =
      check_sgd_train_args(C, W1, b1, W2, b2, X, Y, lrs, seeds, batch_idx, start_step, batch_size, loss_every,
                           cluster_size);
  TORCH_CHECK(cuda::on_kernel_device(C), "sgd_train (CUDA kernel) got C on ", C.device());
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
              ". Train this size with the CUDA-graph stepper (charmlp_fast.device_train.GraphStepper) instead.");
  TORCH_CHECK(s.M * plan.layout.cluster <= std::numeric_limits<int32_t>::max(), "sgd_train: too many models (", s.M,
              ") for one launch");

  const SgdTrainInputs inputs(X, Y, lrs, seeds, batch_idx);
  const cudaStream_t stream = cuda::current_stream();

  auto run = [&](auto index_tag) {
    using index_t = decltype(index_tag);
    const SgdTrainArgs<index_t> a = inputs.args<index_t>(C, W1, b1, W2, b2, losses, s, start_step);
    // A cluster that fits the per-block limits may still not be schedulable where the GPU is partitioned or shared
    // (MIG, MPS). With cluster_size = 0 (auto) fall back to smaller clusters (more shared memory per block), as the
    // caller asked for any that works; a cluster size the caller chose is an error instead.
    for (PersistentPlan p = plan;;) {
      if (launch_persistent_cs<index_t>(p.layout, a, s.M, stream)) return;
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
  const int blocks = static_cast<int>(std::min<int64_t>((total + threads - 1) / threads, 4096));
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
