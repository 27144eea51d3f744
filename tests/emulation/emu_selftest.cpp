// Self-test of csrc/emulation/cuda_emu.h: small kernels with known answers, and kernels with known bugs that the
// emulator must expose. Prints one "PASS <name>" or "FAIL <name>: <why>" line per test, then "DONE <failures>";
// exits 0 iff every selected test passed. Arguments select tests by name (default: all). The racy ones (race_block,
// race_warp, race_order, cluster_misuse) are data races on purpose: a ThreadSanitizer build runs them apart from the
// others.
#include <algorithm>
#include <cassert>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <functional>
#include <numeric>
#include <string>
#include <vector>

#define CHARMLP_EMULATE_CUDA
#include "../../csrc/emulation/cuda_emu.h"

namespace cg = cooperative_groups;

namespace {

int g_failures = 0;

struct Failure {
  std::string why;
};

void check(bool ok, const std::string& why) {
  if (!ok) throw Failure{why};
}

void expect_ok(cudaError_t e) { check(e == cudaSuccess, std::string("launch failed: ") + cudaGetErrorString(e)); }

// ---- kernels with known answers -----------------------------------------------------------------------------------

constexpr int kReduceThreads = 256;

// Block sum: a warp butterfly (xor), one partial per warp in shared memory, the partials folded with shfl_down.
__global__ void __launch_bounds__(kReduceThreads) block_sum_kernel(const float* in, float* out, int64_t n) {
  __shared__ float partial[kReduceThreads / 32];
  const int64_t i = int64_t{blockIdx.x} * blockDim.x + threadIdx.x;
  float v = i < n ? in[i] : 0.f;
  for (int off = 16; off > 0; off /= 2) v += __shfl_xor_sync(0xffffffffu, v, off);
  if (threadIdx.x % 32 == 0) partial[threadIdx.x / 32] = v;
  __syncthreads();
  if (threadIdx.x < 32) {
    float p = threadIdx.x < kReduceThreads / 32 ? partial[threadIdx.x] : 0.f;
    for (int off = 16; off > 0; off /= 2) p += __shfl_down_sync(0xffffffffu, p, off);
    if (threadIdx.x == 0) out[blockIdx.x] = p;
  }
}

// Sub-warp segments (width 8), a broadcast and an inclusive scan with shfl_up.
__global__ void shuffle_forms_kernel(int* seg_sum, int* bcast, int* scan) {
  const int lane = static_cast<int>(threadIdx.x);
  int v = lane;
  for (int off = 4; off > 0; off /= 2) v += __shfl_xor_sync(0xffffffffu, v, off, 8);
  seg_sum[lane] = v;
  bcast[lane] = __shfl_sync(0xffffffffu, lane * 10, 37);  // 37 wraps to lane 5
  int s = lane;
  for (unsigned d = 1; d < 32; d *= 2) {
    const int up = __shfl_up_sync(0xffffffffu, s, d);
    if (static_cast<unsigned>(lane) >= d) s += up;
  }
  scan[lane] = s;
}

// A block of 48 threads: a full warp whose upper half leaves after one shuffle, and a 16-lane partial warp. Lanes
// that left (or never existed) are in the full mask and ignored; the later blocks check the warp state's reset.
__global__ void partial_warp_kernel(int* out) {
  const int64_t lane = threadIdx.x % 32;
  int v = static_cast<int>(threadIdx.x + 1000 * blockIdx.x);
  if (int64_t{blockDim.x} - int64_t{threadIdx.x} / 32 * 32 >= 32) {
    v += __shfl_xor_sync(0xffffffffu, v, 16);
    if (lane >= 16) return;
  }
  for (int off = 8; off > 0; off /= 2) v += __shfl_xor_sync(0xffffffffu, v, off);
  __syncwarp();  // so that the lanes that stay pass an even number of warp barriers, those that left an odd one
  out[int64_t{blockIdx.x} * blockDim.x + threadIdx.x] = v;
}

__global__ void vote_kernel(unsigned* ballot, int* any_all, int* count) {
  const int lane = static_cast<int>(threadIdx.x % 32);
  const unsigned b = __ballot_sync(0xffffffffu, lane % 3 == 0);
  const int any = __any_sync(0xffffffffu, lane == 7);
  const int all = __all_sync(0xffffffffu, lane < 32);
  const int none = __any_sync(0xffffffffu, 0);
  const int n = __syncthreads_count(threadIdx.x % 5 == 0);
  if (threadIdx.x == 0) {
    *ballot = b;
    any_all[0] = any;
    any_all[1] = all;
    any_all[2] = none;
    *count = n;
  }
}

__global__ void atomics_kernel(float* fsum, int* isum, double* dsum, unsigned* umax) {
  atomicAdd(fsum, 1.0f);
  atomicAdd(isum, 2);
  atomicAdd(dsum, 0.5);
  atomicMax(umax, blockIdx.x * blockDim.x + threadIdx.x);
  __threadfence();
}

// Each block of a cluster of 4 fills its dynamic shared memory, then reads its right neighbour's through DSMEM.
__global__ void cluster_exchange_kernel(int* out) {
  CHARMLP_DYNAMIC_SHARED(int, smem, 16);
  cg::cluster_group cluster = cg::this_cluster();
  const unsigned rank = cluster.block_rank();
  smem[threadIdx.x] = static_cast<int>(rank * 1000 + threadIdx.x);
  cluster.sync();
  const int* peer = cluster.map_shared_rank(smem, (rank + 1) % cluster.num_blocks());
  out[int64_t{blockIdx.x} * blockDim.x + threadIdx.x] = peer[blockDim.x - 1 - threadIdx.x];
  cluster.sync();  // no block exits while a peer still reads its shared memory
}

// The same without the final cluster.sync: block 0 may leave while block 1 still reads it.
__global__ void cluster_early_exit_kernel(int* out) {
  CHARMLP_DYNAMIC_SHARED(int, smem, 16);
  cg::cluster_group cluster = cg::this_cluster();
  const unsigned rank = cluster.block_rank();
  smem[threadIdx.x] = static_cast<int>(threadIdx.x);
  cluster.sync();
  if (rank == 1) {
    for (int spin = 0; spin < 2000; ++spin) __syncthreads();  // block 0 is long gone
    out[threadIdx.x] = cluster.map_shared_rank(smem, 0)[threadIdx.x];
  }
}

__global__ void static_shared_dsmem_kernel(int* out) {
  __shared__ int s[32];
  s[threadIdx.x] = 1;
  cg::this_cluster().sync();
  out[threadIdx.x] = *cg::this_cluster().map_shared_rank(s + threadIdx.x, 0);
}

// 16-byte async copies into shared memory. `early` reads the thread's own slot before __pipeline_wait_prior (a
// bug: the copy need not have landed; in the emulator it never has).
__global__ void async_copy_kernel(const float4* in, float4* out, float4* early) {
  CHARMLP_DYNAMIC_SHARED(float4, tile, 16);
  __pipeline_memcpy_async(tile + threadIdx.x, in + threadIdx.x, sizeof(float4));
  __pipeline_commit();
  early[threadIdx.x] = tile[threadIdx.x];
  __pipeline_wait_prior(0);
  __syncthreads();
  out[threadIdx.x] = tile[blockDim.x - 1 - threadIdx.x];
}

__global__ void async_copy_bad_size_kernel(const char* in) {
  CHARMLP_DYNAMIC_SHARED(char, buf, 16);
  __pipeline_memcpy_async(buf, in, 3);
}

// One thread trips the assertion while the rest of the block waits at a barrier.
__global__ void assert_kernel(const int* idx, int n, int* out) {
  const int v = idx[threadIdx.x];
  CUDA_KERNEL_ASSERT(v >= 0 && v < n && "idx out of range");
  __syncthreads();
  out[threadIdx.x] = v;
}

__global__ void std_assert_kernel(int bad_thread) { assert(static_cast<int>(threadIdx.x) != bad_thread); }

__global__ void trap_kernel() {
  if (threadIdx.x == 3) __trap();
  __syncwarp();
}

__global__ void smem_kernel(unsigned char* out, size_t bytes) {
  CHARMLP_DYNAMIC_SHARED(unsigned char, smem, 16);
  if (threadIdx.x == 0) {
    std::memset(smem, 7, bytes);
    out[0] = smem[bytes - 1];
  }
}

__global__ void divergent_warp_kernel(int* out) {
  if (threadIdx.x == 0) {
    __syncwarp();
  } else {
    out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, static_cast<int>(threadIdx.x), 1);
  }
}

__global__ void exited_lane_kernel(int* out) {
  if (threadIdx.x == 31) return;
  out[threadIdx.x] = __shfl_down_sync(0xffffffffu, static_cast<int>(threadIdx.x), 1);
}

__global__ void partial_mask_kernel() { __syncwarp(0x0000ffffu); }

// Reverses a block's values through shared memory; `barrier` false drops the __syncthreads between the writes and
// the reads (the bug).
template <int N>
__global__ void reverse_kernel(const int* in, int* out, bool barrier) {
  CHARMLP_DYNAMIC_SHARED(int, s, 16);
  s[threadIdx.x] = in[threadIdx.x];
  if (barrier) __syncthreads();
  out[threadIdx.x] = s[N - 1 - threadIdx.x];
}

// Warp-synchronous code: lane i reads lane i ^ 1's slot; `syncwarp` false relies on lockstep (the bug).
__global__ void warp_neighbour_kernel(const int* in, int* out, bool syncwarp) {
  CHARMLP_DYNAMIC_SHARED(int, s, 16);
  s[threadIdx.x] = in[threadIdx.x];
  if (syncwarp) __syncwarp();
  out[threadIdx.x] = s[threadIdx.x ^ 1];
}

// Neighbour reads through shared memory without the barrier they need. `step` +1 reads the next thread's slot, -1
// the previous one's; `phases` 2 first passes a __syncthreads after an earlier write of the slots, so that the
// missing barrier is the second one (the fibers then run in the order that barrier released them).
__global__ void neighbour_kernel(int* out, int step, int phases, bool barrier) {
  CHARMLP_DYNAMIC_SHARED(int, s, 16);
  const int t = static_cast<int>(threadIdx.x), n = static_cast<int>(blockDim.x);
  if (phases == 2) {
    s[t] = -2;
    __syncthreads();
  }
  s[t] = 10 * t;
  if (barrier) __syncthreads();
  const int src = t + step;
  out[t] = src >= 0 && src < n ? s[src] : 10 * src;
}

// Deadlocks: warp 0 waits at __syncthreads, warp 1 at cluster.sync(), and each barrier needs the other warp; the
// lanes of one warp split between __syncwarp and __syncthreads.
__global__ void deadlock_kernel(int* out) {
  if (threadIdx.x < 32) {
    __syncthreads();
  } else {
    cg::this_cluster().sync();
  }
  out[threadIdx.x] = 1;
}

__global__ void deadlock_warp_kernel() {
  if (threadIdx.x < 16) {
    __syncwarp();
  } else {
    __syncthreads();
  }
}

// Every thread of a cluster of 16 blocks of 1024 threads (16384 fibers): DSMEM exchange, a block vote, cluster.sync.
__global__ void big_cluster_kernel(int* out) {
  CHARMLP_DYNAMIC_SHARED(int, smem, 16);
  cg::cluster_group cluster = cg::this_cluster();
  const unsigned rank = cluster.block_rank();
  smem[threadIdx.x] = static_cast<int>(rank * 1024 + threadIdx.x);
  cluster.sync();
  const int peer = cluster.map_shared_rank(smem, (rank + 1) % cluster.num_blocks())[blockDim.x - 1 - threadIdx.x];
  const int n = __syncthreads_count(peer % 2 == 0);
  const int lane_sum = __shfl_xor_sync(0xffffffffu, peer, 1);
  out[int64_t{blockIdx.x} * blockDim.x + threadIdx.x] = peer + lane_sum + n;
  cluster.sync();
}

// ---- tests --------------------------------------------------------------------------------------------------------

void test_block_reduce() {
  const int64_t n = 5 * kReduceThreads - 17;  // a ragged last block
  std::vector<float> in(n), out(5, -1.f);
  for (int64_t i = 0; i < n; ++i) in[i] = static_cast<float>(i % 97);
  expect_ok(charmlp_emu::launch(block_sum_kernel, dim3(5), dim3(kReduceThreads), 0, nullptr, in.data(), out.data(), n));
  for (int b = 0; b < 5; ++b) {
    float want = 0.f;
    for (int64_t i = int64_t{b} * kReduceThreads; i < std::min<int64_t>(n, (b + 1) * int64_t{kReduceThreads}); ++i) {
      want += in[i];
    }
    check(out[b] == want, "block " + std::to_string(b) + ": " + std::to_string(out[b]) + " != " + std::to_string(want));
  }
}

void test_shuffle_forms() {
  std::vector<int> seg(32), bc(32), scan(32);
  expect_ok(
      charmlp_emu::launch(shuffle_forms_kernel, dim3(1), dim3(32), 0, nullptr, seg.data(), bc.data(), scan.data()));
  for (int l = 0; l < 32; ++l) {
    const int base = l / 8 * 8;
    check(seg[l] == 8 * base + 28, "segment sum at lane " + std::to_string(l));
    check(bc[l] == 50, "broadcast at lane " + std::to_string(l));
    check(scan[l] == l * (l + 1) / 2, "scan at lane " + std::to_string(l));
  }
}

void test_partial_warps() {
  constexpr int kBlocks = 3, kThreads = 48;
  std::vector<int> out(kBlocks * kThreads, -1);
  expect_ok(charmlp_emu::launch(partial_warp_kernel, dim3(kBlocks), dim3(kThreads), 0, nullptr, out.data()));
  for (int b = 0; b < kBlocks; ++b) {
    for (int t = 0; t < kThreads; ++t) {
      const int want = t < 16 ? 496 + 32000 * b : (t < 32 ? -1 : 632 + 16000 * b);
      check(out[b * kThreads + t] == want, "block " + std::to_string(b) + " thread " + std::to_string(t) + ": " +
                                               std::to_string(out[b * kThreads + t]));
    }
  }
}

void test_ballot() {
  unsigned ballot = 0;
  int any_all[3] = {-1, -1, -1}, count = -1;
  expect_ok(charmlp_emu::launch(vote_kernel, dim3(1), dim3(64), 0, nullptr, &ballot, any_all, &count));
  unsigned want = 0;
  for (int l = 0; l < 32; l += 3) want |= 1u << l;
  check(ballot == want, "ballot " + std::to_string(ballot) + " != " + std::to_string(want));
  check(any_all[0] == 1 && any_all[1] == 1 && any_all[2] == 0, "any/all");
  check(count == 13, "__syncthreads_count " + std::to_string(count));
}

void test_atomics() {
  float f = 0.f;
  int i = 0;
  double d = 0.0;
  unsigned m = 0;
  expect_ok(charmlp_emu::launch(atomics_kernel, dim3(6), dim3(128), 0, nullptr, &f, &i, &d, &m));
  check(f == 768.f && i == 1536 && d == 384.0 && m == 767, "atomic results");
}

void test_cluster_dsmem() {
  constexpr int kBlockThreads = 64, kCluster = 4, kBlocks = 8;
  std::vector<int> out(kBlocks * kBlockThreads, -7);
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3(kBlocks);
  cfg.blockDim = dim3(kBlockThreads);
  cfg.dynamicSmemBytes = kBlockThreads * sizeof(int);
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeClusterDimension;
  attr[0].val.clusterDim.x = kCluster;
  attr[0].val.clusterDim.y = 1;
  attr[0].val.clusterDim.z = 1;
  cfg.attrs = attr;
  cfg.numAttrs = 1;
  int clusters = 0;
  expect_ok(cudaOccupancyMaxActiveClusters(&clusters, cluster_exchange_kernel, &cfg));
  check(clusters > 0, "cudaOccupancyMaxActiveClusters says 0");
  expect_ok(cudaLaunchKernelEx(&cfg, cluster_exchange_kernel, out.data()));
  for (int b = 0; b < kBlocks; ++b) {
    for (int t = 0; t < kBlockThreads; ++t) {
      const int want = ((b % kCluster + 1) % kCluster) * 1000 + (kBlockThreads - 1 - t);
      check(out[b * kBlockThreads + t] == want, "block " + std::to_string(b) + " thread " + std::to_string(t));
    }
  }
  // Clusters beyond the portable 8 need the non-portable opt-in.
  const cudaError_t big = charmlp_emu::launch_cluster(cluster_exchange_kernel, dim3(16), dim3(32), dim3(16),
                                                      32 * sizeof(int), nullptr, out.data());
  check(big == cudaErrorInvalidConfiguration, "a cluster of 16 without the opt-in launched");
  expect_ok(cudaFuncSetAttribute(cluster_exchange_kernel, cudaFuncAttributeNonPortableClusterSizeAllowed, 1));
  expect_ok(charmlp_emu::launch_cluster(cluster_exchange_kernel, dim3(16), dim3(32), dim3(16), 32 * sizeof(int),
                                        nullptr, out.data()));
}

void test_cluster_misuse() {
  std::vector<int> out(64, 0);
  charmlp_emu::launch_cluster(cluster_early_exit_kernel, dim3(2), dim3(32), dim3(2), 32 * sizeof(int), nullptr,
                              out.data());
  check(out[5] == -1, "a peer's shared memory read after the peer exited was not poisoned (got " +
                          std::to_string(out[5]) + ")");
  const cudaError_t e = charmlp_emu::launch_cluster(static_shared_dsmem_kernel, dim3(2), dim3(32), dim3(2), 0,
                                                    nullptr, out.data());
  check(e == cudaErrorLaunchFailure && std::strstr(cudaGetErrorString(e), "map_shared_rank"),
        "map_shared_rank of static __shared__ was not reported");
}

void test_async_copy() {
  constexpr int kN = 48;
  std::vector<float4> in(kN), out(kN), early(kN);
  for (int i = 0; i < kN; ++i) in[i] = float4{float(i), float(i) + 0.25f, float(i) + 0.5f, float(i) + 0.75f};
  expect_ok(charmlp_emu::launch(async_copy_kernel, dim3(1), dim3(kN), kN * sizeof(float4), nullptr, in.data(),
                                out.data(), early.data()));
  for (int i = 0; i < kN; ++i) check(out[i].x == float(kN - 1 - i) && out[i].w == float(kN - 1 - i) + 0.75f, "copy");
  for (int i = 0; i < kN; ++i) check(std::isnan(early[i].x), "a read before __pipeline_wait_prior saw the copy");
  const char bytes[16] = {};
  const cudaError_t e = charmlp_emu::launch(async_copy_bad_size_kernel, dim3(1), dim3(1), 16, nullptr, bytes);
  check(e == cudaErrorLaunchFailure, "a 3-byte async copy was accepted");
}

void test_device_assert() {
  std::vector<int> idx(128), out(128, 0);
  std::iota(idx.begin(), idx.end(), 0);
  idx[77] = 1000;
  const cudaError_t e = charmlp_emu::launch(assert_kernel, dim3(1), dim3(128), 0, nullptr, idx.data(), 128, out.data());
  check(e == cudaErrorAssert, std::string("assert launch returned ") + cudaGetErrorName(e));
  const std::string msg = cudaGetErrorString(e);
  check(msg.find("idx out of range") != std::string::npos && msg.find("thread (77,0,0)") != std::string::npos,
        "assert message: " + msg);
  check(cudaGetLastError() == cudaErrorAssert && cudaGetLastError() == cudaSuccess, "cudaGetLastError");
  check(charmlp_emu::launch(std_assert_kernel, dim3(2), dim3(64), 0, nullptr, 40) == cudaErrorAssert, "assert()");
  check(charmlp_emu::launch(trap_kernel, dim3(1), dim3(32), 0, nullptr) == cudaErrorAssert, "__trap()");
  idx[77] = 5;  // the emulator's errors are not sticky: the next launch works
  expect_ok(charmlp_emu::launch(assert_kernel, dim3(1), dim3(128), 0, nullptr, idx.data(), 128, out.data()));
  check(out[77] == 5, "launch after an assert");
}

void test_smem_limits() {
  unsigned char out[1] = {0};
  const size_t over = 64 * 1024;
  check(charmlp_emu::launch(smem_kernel, dim3(1), dim3(32), over, nullptr, out, over) == cudaErrorInvalidValue,
        "64 KiB of dynamic shared memory without the opt-in launched");
  expect_ok(charmlp_emu::launch(smem_kernel, dim3(1), dim3(32), 48 * 1024, nullptr, out, size_t{48 * 1024}));
  check(cudaFuncSetAttribute(smem_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, 228 * 1024) ==
            cudaErrorInvalidValue,
        "an opt-in beyond 227 KiB was accepted");
  expect_ok(cudaFuncSetAttribute(smem_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, 227 * 1024));
  expect_ok(charmlp_emu::launch(smem_kernel, dim3(1), dim3(32), over, nullptr, out, over));
  check(out[0] == 7, "64 KiB dynamic shared memory contents");
  check(charmlp_emu::launch(smem_kernel, dim3(1), dim3(32), 230 * 1024, nullptr, out, size_t{1}) ==
            cudaErrorInvalidValue,
        "230 KiB launched");
  check(charmlp_emu::launch(smem_kernel, dim3(1), dim3(1025), 0, nullptr, out, size_t{1}) ==
            cudaErrorInvalidConfiguration,
        "1025 threads per block launched");
  cudaDeviceProp prop;
  expect_ok(cudaGetDeviceProperties(&prop, 0));
  int optin = 0;
  expect_ok(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, 0));
  check(prop.multiProcessorCount == 132 && prop.major == 9 && prop.sharedMemPerBlockOptin == 227 * 1024 &&
            optin == 227 * 1024 && prop.warpSize == 32,
        "device properties");
}

void test_warp_misuse() {
  std::vector<int> out(32, 0);
  cudaError_t e = charmlp_emu::launch(divergent_warp_kernel, dim3(1), dim3(32), 0, nullptr, out.data());
  check(e == cudaErrorLaunchFailure && std::strstr(cudaGetErrorString(e), "different warp intrinsics"),
        "divergent warp intrinsics not reported");
  e = charmlp_emu::launch(exited_lane_kernel, dim3(1), dim3(32), 0, nullptr, out.data());
  check(e == cudaErrorLaunchFailure && std::strstr(cudaGetErrorString(e), "did not take part"),
        "a shuffle from an exited lane not reported");
  e = charmlp_emu::launch(partial_mask_kernel, dim3(1), dim3(32), 0, nullptr);
  check(e == cudaErrorLaunchFailure, "a partial mask not reported");
}

// The buggy kernel must give a wrong answer in some of `tries` launches; the fixed one must always be right.
void test_race_block() {
  constexpr int kN = 512, kTries = 3;
  std::vector<int> in(kN), out(kN);
  int wrong = 0;
  for (int k = 0; k < kTries; ++k) {
    for (int i = 0; i < kN; ++i) in[i] = i * 7 + k;
    expect_ok(charmlp_emu::launch(reverse_kernel<kN>, dim3(1), dim3(kN), kN * sizeof(int), nullptr, in.data(),
                                  out.data(), true));
    for (int i = 0; i < kN; ++i) check(out[i] == in[kN - 1 - i], "the kernel with __syncthreads is wrong");
    expect_ok(charmlp_emu::launch(reverse_kernel<kN>, dim3(1), dim3(kN), kN * sizeof(int), nullptr, in.data(),
                                  out.data(), false));
    for (int i = 0; i < kN; ++i) {
      if (out[i] != in[kN - 1 - i]) {
        ++wrong;
        break;
      }
    }
  }
  std::printf("INFO race_block: wrong answer in %d of %d launches without __syncthreads\n", wrong, kTries);
  check(wrong > 0, "the missing __syncthreads never showed");
}

void test_race_warp() {
  constexpr int kN = 256, kTries = 3;
  std::vector<int> in(kN), out(kN);
  int wrong = 0;
  for (int k = 0; k < kTries; ++k) {
    for (int i = 0; i < kN; ++i) in[i] = i * 3 + k;
    expect_ok(charmlp_emu::launch(warp_neighbour_kernel, dim3(1), dim3(kN), kN * sizeof(int), nullptr, in.data(),
                                  out.data(), true));
    for (int i = 0; i < kN; ++i) check(out[i] == in[i ^ 1], "the __syncwarp kernel is wrong");
    expect_ok(charmlp_emu::launch(warp_neighbour_kernel, dim3(1), dim3(kN), kN * sizeof(int), nullptr, in.data(),
                                  out.data(), false));
    for (int i = 0; i < kN; ++i) {
      if (out[i] != in[i ^ 1]) {
        ++wrong;
        break;
      }
    }
  }
  std::printf("INFO race_warp: wrong answer in %d of %d launches without __syncwarp\n", wrong, kTries);
  check(wrong > 0, "warp-synchronous code without __syncwarp always worked");
}

// Both a read of the next thread's slot and one of the previous thread's slot without a barrier give a wrong answer
// in at least one of two launches (the thread order alternates), before and after a first barrier.
void test_race_order() {
  constexpr int kN = 128;
  std::vector<int> out(kN);
  for (int phases = 1; phases <= 2; ++phases) {
    for (int step : {1, -1}) {
      int wrong = 0;
      for (int k = 0; k < 2; ++k) {
        for (bool barrier : {true, false}) {
          std::fill(out.begin(), out.end(), 0);
          expect_ok(charmlp_emu::launch(neighbour_kernel, dim3(1), dim3(kN), kN * sizeof(int), nullptr, out.data(),
                                        step, phases, barrier));
          bool ok = true;
          for (int t = 0; t < kN; ++t) ok = ok && out[t] == 10 * (t + step);
          if (barrier) check(ok, "the kernel with the barrier is wrong");
          if (!barrier && !ok) ++wrong;
        }
      }
      std::printf("INFO race_order: step %+d, %d phase(s): wrong answer in %d of 2 launches\n", step, phases, wrong);
      check(wrong > 0, "a read of the " + std::string(step > 0 ? "next" : "previous") +
                           " thread's slot without a barrier always worked (" + std::to_string(phases) + " phases)");
    }
  }
}

void test_deadlock() {
  std::vector<int> out(64, 0);
  cudaError_t e = charmlp_emu::launch(deadlock_kernel, dim3(2), dim3(64), 0, nullptr, out.data());
  std::string msg = cudaGetErrorString(e);
  check(e == cudaErrorLaunchFailure && msg.find("charmlp_emu: deadlock") != std::string::npos &&
            msg.find("__syncthreads") != std::string::npos && msg.find("cluster.sync()") != std::string::npos,
        "__syncthreads against cluster.sync(): " + msg);
  e = charmlp_emu::launch(deadlock_warp_kernel, dim3(1), dim3(32), 0, nullptr);
  msg = cudaGetErrorString(e);
  check(e == cudaErrorLaunchFailure && msg.find("charmlp_emu: deadlock") != std::string::npos &&
            msg.find("__syncwarp") != std::string::npos,
        "__syncwarp against __syncthreads: " + msg);
  check(cudaGetLastError() == cudaErrorLaunchFailure, "cudaGetLastError after a deadlock");
  unsigned ballot = 0;
  int any_all[3] = {-1, -1, -1}, count = -1;
  expect_ok(charmlp_emu::launch(vote_kernel, dim3(1), dim3(64), 0, nullptr, &ballot, any_all, &count));
  check(count == 13, "a launch after a deadlock");
}

// The launching thread's own built-in variables come back unchanged (every fiber switch swaps them).
void test_host_state() {
  threadIdx = uint3{7, 8, 9};
  blockIdx = uint3{4, 5, 6};
  std::vector<float> in(300, 1.f), out(2, 0.f);
  expect_ok(charmlp_emu::launch(block_sum_kernel, dim3(2), dim3(kReduceThreads), 0, nullptr, in.data(), out.data(),
                                int64_t{300}));
  check(out[0] == 256.f && out[1] == 44.f, "block sums");
  check(threadIdx.x == 7 && threadIdx.y == 8 && threadIdx.z == 9 && blockIdx.x == 4 && blockIdx.z == 6 &&
            blockDim.x == 1 && gridDim.x == 1,
        "the host's threadIdx/blockIdx/blockDim/gridDim were not restored");
}

void test_big_cluster() {
  constexpr int kBlocks = 16, kThreads = 1024;
  std::vector<int> out(kBlocks * kThreads, -1);
  expect_ok(cudaFuncSetAttribute(big_cluster_kernel, cudaFuncAttributeNonPortableClusterSizeAllowed, 1));
  expect_ok(charmlp_emu::launch_cluster(big_cluster_kernel, dim3(kBlocks), dim3(kThreads), dim3(kBlocks),
                                        kThreads * sizeof(int), nullptr, out.data()));
  for (int b = 0; b < kBlocks; ++b) {
    for (int t = 0; t < kThreads; ++t) {
      const auto peer = [&](int tt) { return ((b + 1) % kBlocks) * 1024 + (kThreads - 1 - tt); };
      const int want = peer(t) + peer(t ^ 1) + 512;
      check(out[b * kThreads + t] == want, "block " + std::to_string(b) + " thread " + std::to_string(t));
    }
  }
}

struct Test {
  const char* name;
  void (*fn)();
};

const Test kTests[] = {
    {"block_reduce", test_block_reduce}, {"shuffle_forms", test_shuffle_forms}, {"partial_warps", test_partial_warps},
    {"ballot", test_ballot},             {"atomics", test_atomics},             {"cluster_dsmem", test_cluster_dsmem},
    {"cluster_misuse", test_cluster_misuse}, {"async_copy", test_async_copy},   {"device_assert", test_device_assert},
    {"smem_limits", test_smem_limits},   {"warp_misuse", test_warp_misuse},     {"race_block", test_race_block},
    {"race_warp", test_race_warp},       {"race_order", test_race_order},       {"deadlock", test_deadlock},
    {"host_state", test_host_state},     {"big_cluster", test_big_cluster},
};

}  // namespace

int main(int argc, char** argv) {
  std::vector<std::string> wanted(argv + 1, argv + argc);
  for (const Test& t : kTests) {
    if (!wanted.empty() && std::find(wanted.begin(), wanted.end(), t.name) == wanted.end()) continue;
    try {
      t.fn();
      std::printf("PASS %s\n", t.name);
    } catch (const Failure& f) {
      ++g_failures;
      std::printf("FAIL %s: %s\n", t.name, f.why.c_str());
    }
    std::fflush(stdout);
  }
  std::printf("DONE %d\n", g_failures);
  return g_failures == 0 ? 0 : 1;
}
