// cuda_emu.h: a CPU emulation of the slice of CUDA that charmlp_fast's kernels use, so that the SAME .cu sources
// compile with the host compiler (g++ 12, -std=c++20 -pthread) and run on the CPU when CHARMLP_EMULATE_CUDA is
// defined. Without CHARMLP_EMULATE_CUDA (nvcc) this header only defines charmlp_emu::launch / launch_cluster and
// CHARMLP_DYNAMIC_SHARED on top of the real runtime, so launchers can call one helper on both builds.
//
// What it emulates, and how
//   * Execution. A launch runs its grid cluster by cluster (block by block without a cluster). Every thread of the
//     blocks being run is its own OS thread (pthreads, created once per launch and reused from one cluster to the
//     next), so the threads of a block, and all blocks of a cluster, are alive and run CONCURRENTLY: a missing
//     __syncthreads or __syncwarp gives a genuinely racy program, which shows up as a wrong answer (dynamic shared
//     memory is poisoned with 0xFF bytes at every block start, so a read of a slot nobody wrote yet is a NaN or -1)
//     and, in a -fsanitize=thread build, as a ThreadSanitizer data-race report.
//   * Barriers. __syncthreads (and _count/_and/_or), __syncwarp, the warp intrinsics and cluster.sync() are real
//     barriers: arrivals counted under a mutex, waiters asleep on a generation word (a futex) whose release/acquire
//     is ThreadSanitizer's happens-before edge. A thread that returns from the kernel leaves every barrier (it no
//     longer counts), as exited threads do on sm_70+.
//   * Warps are 32 consecutive linear thread ids of a block. Lanes do NOT run in lockstep: code that relies on
//     implicit warp-synchronous execution without __syncwarp races, exactly as under independent thread scheduling.
//     A warp intrinsic is one phase of a per-warp barrier around a double-buffered per-warp exchange buffer.
//   * Shared memory. Dynamic shared memory (extern __shared__) is a per-block allocation of exactly the launch's
//     smem bytes (AddressSanitizer sees an overrun), reached through CHARMLP_DYNAMIC_SHARED (see below). Static
//     __shared__ variables are function-local statics: one object per kernel instantiation, which is right because
//     only one block (or one cluster) runs at a time -- see the trade-off below.
//   * Clusters: cooperative_groups::this_cluster() with sync(), block_rank(), num_blocks(), block_index(),
//     dim_blocks(), map_shared_rank() (a pointer into the peer block's dynamic shared memory). When a block of a
//     cluster exits, its shared memory is poisoned: a peer that still reads it (no final cluster.sync) sees NaN.
//   * Async copies: __pipeline_memcpy_async is deferred until the __pipeline_wait_prior that covers its commit
//     batch, or the thread's exit (the latest moments the hardware may land it), so reading the destination too
//     early sees stale data.
//     Sizes other than 4, 8, 16 bytes or misaligned addresses are launch errors, as they are invalid on the GPU.
//   * Device errors: CUDA_KERNEL_ASSERT, assert (when included after <cassert>) and __trap() inside a kernel stop
//     the whole launch: the other threads are woken from their barriers and unwound, and the launch returns
//     cudaErrorAssert with the condition, file, line, block and thread in the message (cudaGetErrorString of that
//     code returns it). Never abort(). Misuse of the intrinsics (a shuffle that reads an exited or absent lane, a
//     warp whose lanes meet at different intrinsics, a partial-warp mask, map_shared_rank of a non-shared pointer)
//     is reported the same way, as cudaErrorLaunchFailure.
//   * Runtime API: cudaFuncSetAttribute (per-kernel opt-in dynamic smem, non-portable cluster size), launches
//     checked against H100/H200 limits (1024 threads per block, 48 KiB dynamic smem without opt-in, 227 KiB with,
//     clusters of <= 8 blocks, 16 with the non-portable opt-in), cudaLaunchKernelEx with a cluster-dimension
//     attribute, cudaOccupancyMaxActiveClusters, cudaGetDeviceProperties / cudaDeviceGetAttribute with H100/H200
//     figures, streams and events (no-ops: everything is synchronous), cudaGetLastError / cudaPeekAtLastError.
//   * atomics through std::atomic_ref (seq_cst), __threadfence as a seq_cst fence, math intrinsics onto <cmath>.
//   * Launches are synchronous, serialised (one at a time in the process) and not re-entrant. They are slow: every
//     barrier wakes its threads through the OS scheduler, about 5 ms per 256-thread block with a few shuffles on two
//     cores. Emulate test-sized problems, never benchmarks. A cluster of 16 blocks of 1024 threads is 16384 OS
//     threads (ThreadSanitizer allows about 8000 live threads).
//
// What only a real GPU shows: timing and occupancy (cudaOccupancyMaxActiveClusters is an estimate from the per-SM
// limits), the real (weaker) memory ordering and warp-synchronous timing of the hardware (the emulator's barriers
// and atomics are sequentially consistent, so a missing fence shows up only as a race report, never as a reordering),
// cluster scheduling
// on a partitioned or shared GPU (MIG, MPS), register and __launch_bounds__ limits (no-ops here), the static + dynamic
// shared memory total (the emulator cannot size static __shared__), sticky errors (a device assert here does not
// poison later calls) and asynchronous error reporting (errors come back from the launch itself).
//
// Trade-off: static __shared__. In a header, `__shared__` can only be a prefix macro, so `__shared__ float s[32];`
// becomes `static float s[32];`: one object for all blocks. That is exact while blocks run one at a time (grids
// without clusters), but the blocks of a cluster run together and would share it. Kernels launched with clusters
// must therefore keep their shared memory in dynamic shared memory (sgd_train's persistent kernel already does);
// map_shared_rank of a static __shared__ address is a launch error, and blocks of a cluster writing one static object
// are a ThreadSanitizer race report. Static __shared__ is not poisoned at block start (its address is not known to
// the launcher): it holds what the previous block left there.
//
// What a kernel must change to be emulatable:
//   * `extern __shared__ __align__(16) unsigned char smem[];` -> `CHARMLP_DYNAMIC_SHARED(unsigned char, smem, 16);`
//     (`extern __shared__` itself is a compile error here: `extern static`).
//   * `#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900` guards around cluster code need
//     `|| defined(CHARMLP_EMULATE_CUDA)`: the emulator does not define __CUDA_ARCH__ (host headers such as torch's
//     change meaning under it), so host-side fallbacks of __host__ __device__ code are what gets compiled.
//   * Launches `kernel<<<grid, block, smem, stream>>>(args...)` -> `charmlp_emu::launch(kernel, grid, block, smem,
//     stream, args...)` (no header can parse <<< >>>); cudaLaunchKernelEx calls work unchanged. Inline PTX (asm
//     volatile, e.g. a hand-written cp.async) is not emulated: use __pipeline_memcpy_async.
//   * Include this header after <cassert> (and after any torch header that defines CUDA_KERNEL_ASSERT). With
//     -Icsrc/emulation/include, the kernels' own #include <cuda_runtime.h>, <cooperative_groups.h> and
//     <cuda_pipeline.h> resolve to forwarding headers that include this one.
//
// Not supported: warp masks that leave out live lanes of the warp (e.g. 0x0000ffff), barriers reached by lanes in
// different places of the code (detected for warps, not for __syncthreads), grid-wide cooperative launches, textures,
// half-precision intrinsics, more than one device.
#pragma once

#ifndef CHARMLP_EMULATE_CUDA

#include <cuda_runtime.h>

#define CHARMLP_DYNAMIC_SHARED(type, name, align) extern __shared__ __align__(align) type name[]

namespace charmlp_emu {

template <typename... Params, typename... Args>
cudaError_t launch(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem_bytes, cudaStream_t stream,
                   Args&&... args) {
  kernel<<<grid, block, smem_bytes, stream>>>(static_cast<Params>(args)...);
  return cudaGetLastError();
}

template <typename... Params, typename... Args>
cudaError_t launch_cluster(void (*kernel)(Params...), dim3 grid, dim3 block, dim3 cluster, size_t smem_bytes,
                           cudaStream_t stream, Args&&... args) {
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = grid;
  cfg.blockDim = block;
  cfg.dynamicSmemBytes = smem_bytes;
  cfg.stream = stream;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeClusterDimension;
  attr[0].val.clusterDim.x = cluster.x;
  attr[0].val.clusterDim.y = cluster.y;
  attr[0].val.clusterDim.z = cluster.z;
  cfg.attrs = attr;
  cfg.numAttrs = 1;
  return cudaLaunchKernelEx(&cfg, kernel, static_cast<Params>(args)...);
}

}  // namespace charmlp_emu

#else  // CHARMLP_EMULATE_CUDA

#include <pthread.h>

#include <algorithm>
#include <atomic>
#include <bit>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <functional>
#include <memory>
#include <mutex>
#include <new>
#include <stdexcept>
#include <string>
#include <tuple>
#include <type_traits>
#include <unordered_map>
#include <utility>
#include <vector>

// ---- qualifiers ---------------------------------------------------------------------------------------------------
// Every function is an ordinary host function; kernels are called by the launcher's threads.

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline __attribute__((always_inline))
#define __noinline__ __attribute__((noinline))
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))
#define __shared__ static  // one object per kernel instantiation: see "Trade-off" at the top
#define CHARMLP_DYNAMIC_SHARED(type, name, align) \
  type* const name = static_cast<type*>(::charmlp_emu::detail::dynamic_shared_memory(alignof(type), (align)))

// ---- runtime types --------------------------------------------------------------------------------------------------

struct uint3 {
  unsigned int x, y, z;
};

struct dim3 {
  unsigned int x, y, z;
  constexpr dim3(unsigned int vx = 1, unsigned int vy = 1, unsigned int vz = 1) : x(vx), y(vy), z(vz) {}
  constexpr dim3(uint3 v) : x(v.x), y(v.y), z(v.z) {}
};

// The built-in variables: every emulated thread has its own (thread_local), set by the launcher.
inline thread_local uint3 threadIdx{};
inline thread_local uint3 blockIdx{};
inline thread_local dim3 blockDim{};
inline thread_local dim3 gridDim{};
constexpr int warpSize = 32;

enum cudaError_t {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorInvalidDeviceFunction = 98,
  cudaErrorLaunchOutOfResources = 701,
  cudaErrorAssert = 710,
  cudaErrorLaunchFailure = 719,
  cudaErrorNotSupported = 801,
};

enum cudaFuncAttribute {
  cudaFuncAttributeMaxDynamicSharedMemorySize = 8,
  cudaFuncAttributePreferredSharedMemoryCarveout = 9,
  cudaFuncAttributeNonPortableClusterSizeAllowed = 11,
};

enum cudaDeviceAttr {
  cudaDevAttrMaxThreadsPerBlock = 1,
  cudaDevAttrMaxSharedMemoryPerBlock = 8,
  cudaDevAttrWarpSize = 10,
  cudaDevAttrMultiProcessorCount = 16,
  cudaDevAttrMaxThreadsPerMultiProcessor = 39,
  cudaDevAttrComputeCapabilityMajor = 75,
  cudaDevAttrComputeCapabilityMinor = 76,
  cudaDevAttrMaxSharedMemoryPerMultiprocessor = 81,
  cudaDevAttrMaxSharedMemoryPerBlockOptin = 97,
  cudaDevAttrClusterLaunch = 120,
};

// The vector types the kernels load and store, with the GPU's alignment (what makes a 16-byte access one access).
struct alignas(8) float2 {
  float x, y;
};
struct alignas(16) float4 {
  float x, y, z, w;
};
struct alignas(8) int2 {
  int x, y;
};
struct alignas(16) int4 {
  int x, y, z, w;
};
struct alignas(16) double2 {
  double x, y;
};

struct CUstream_st;
struct CUevent_st {
  std::chrono::steady_clock::time_point when;
};
using cudaStream_t = CUstream_st*;
using cudaEvent_t = CUevent_st*;

struct cudaDeviceProp {
  char name[256];
  size_t totalGlobalMem;
  size_t sharedMemPerBlock;
  int regsPerBlock;
  int warpSize;
  int maxThreadsPerBlock;
  int maxThreadsDim[3];
  int maxGridSize[3];
  int major;
  int minor;
  int multiProcessorCount;
  int l2CacheSize;
  int maxThreadsPerMultiProcessor;
  size_t sharedMemPerMultiprocessor;
  size_t sharedMemPerBlockOptin;
  size_t reservedSharedMemPerBlock;
  int maxBlocksPerMultiProcessor;
};

enum cudaLaunchAttributeID { cudaLaunchAttributeClusterDimension = 4 };

struct cudaLaunchAttributeValue {
  struct {
    unsigned int x, y, z;
  } clusterDim;
};

struct cudaLaunchAttribute {
  cudaLaunchAttributeID id;
  cudaLaunchAttributeValue val;
};

struct cudaLaunchConfig_t {
  dim3 gridDim;
  dim3 blockDim;
  size_t dynamicSmemBytes;
  cudaStream_t stream;
  cudaLaunchAttribute* attrs;
  unsigned int numAttrs;
};

namespace charmlp_emu {

// The emulated device: an H100/H200 (SXM), compute capability 9.0.
struct DeviceLimits {
  static constexpr int kSMs = 132;
  static constexpr int kWarpSize = 32;
  static constexpr int64_t kMaxThreadsPerBlock = 1024;
  static constexpr int64_t kMaxThreadsPerSM = 2048;
  static constexpr int64_t kMaxBlocksPerSM = 32;
  static constexpr size_t kDefaultSmemPerBlock = 48 * 1024;   // without cudaFuncAttributeMaxDynamicSharedMemorySize
  static constexpr size_t kMaxSmemPerBlockOptin = 227 * 1024;  // the most a block can opt in to
  static constexpr size_t kSmemPerSM = 228 * 1024;
  static constexpr size_t kReservedSmemPerBlock = 1024;  // the runtime's per-block reservation
  static constexpr int64_t kMaxClusterPortable = 8;
  static constexpr int64_t kMaxClusterNonPortable = 16;
  static constexpr size_t kGlobalMem = size_t(80) << 30;
};

namespace detail {

// ---- per-launch state ---------------------------------------------------------------------------------------------

// Thrown by a device-side failure in the failing thread, and into every other thread of an aborted launch.
struct KernelTrap {
  cudaError_t code;
  std::string message;
};
struct LaunchAborted {};

// A reusable barrier that can be aborted, and that combines one value per arriving thread (the sum, for
// __syncthreads_count and __ballot_sync) and a tag (which intrinsic each thread arrived at, to catch divergence).
// Arrivals are counted under a mutex; waiters sleep on the generation word (std::atomic::wait: a futex), so that a
// release wakes them without a convoy on the mutex. The release/acquire on that word is the happens-before edge
// ThreadSanitizer sees from every write before the barrier to every read after it.
class Barrier {
 public:
  struct Phase {
    uint64_t sum = 0;
    int64_t arrived = 0;
    uint32_t lanes = 0;  // bit i: lane i arrived (warp barriers)
    bool diverged = false;
  };

  // Only while no thread is inside the barrier.
  void reset(int64_t expected, const std::atomic<bool>* aborted) {
    expected_ = expected;
    count_ = 0;
    cur_ = Phase{};
    aborted_ = aborted;
  }
  void set_completion(std::function<void()> f) { on_complete_ = std::move(f); }

  Phase arrive_and_wait(uint64_t value = 0, uint32_t lane_bit = 0, int tag = 0) {
    uint32_t gen;
    {
      std::lock_guard<std::mutex> lk(m_);
      if (aborted_ != nullptr && aborted_->load()) throw LaunchAborted{};
      if (count_ == 0) {
        tag_ = tag;
      } else if (tag != tag_) {
        cur_.diverged = true;
      }
      cur_.sum += value;
      cur_.lanes |= lane_bit;
      ++cur_.arrived;
      if (++count_ == expected_) {
        complete();
        return last_;
      }
      gen = gen_.load(std::memory_order_relaxed);
    }
    uint32_t now;
    while ((now = gen_.load(std::memory_order_acquire)) == gen) gen_.wait(gen, std::memory_order_acquire);
    if (now & kAbortBit) throw LaunchAborted{};
    return last_;  // stable: the next phase cannot complete before this thread arrives again
  }

  // The calling thread leaves for good (it returned from the kernel).
  void drop() {
    std::lock_guard<std::mutex> lk(m_);
    --expected_;
    if (count_ > 0 && count_ == expected_) complete();
  }

  void wake_for_abort() {
    gen_.fetch_or(kAbortBit);
    gen_.notify_all();
  }

 private:
  static constexpr uint32_t kAbortBit = 0x80000000u;

  // Under m_. The new generation keeps an abort bit that a concurrent wake_for_abort may have set.
  void complete() {
    last_ = cur_;
    cur_ = Phase{};
    count_ = 0;
    if (on_complete_) on_complete_();
    uint32_t g = gen_.load(std::memory_order_relaxed);
    while (!gen_.compare_exchange_weak(g, (g & kAbortBit) | ((g + 1) & ~kAbortBit), std::memory_order_release)) {
    }
    gen_.notify_all();
  }

  std::mutex m_;
  std::atomic<uint32_t> gen_{0};
  int64_t expected_ = 0;
  int64_t count_ = 0;
  int tag_ = 0;
  Phase cur_, last_;
  const std::atomic<bool>* aborted_ = nullptr;
  std::function<void()> on_complete_;
};

struct WarpState {
  Barrier barrier;
  // The exchange buffer, one value of <= 16 bytes per lane, double-buffered by the parity of the warp's phase: a
  // lane can write buffer p again only after the next phase, which every lane reaches after reading buffer p.
  alignas(16) unsigned char slots[2][32][16];
};

struct BlockState {
  uint3 index{};
  int64_t rank = 0;  // in the cluster
  unsigned char* smem = nullptr;
  Barrier barrier;
  std::vector<std::unique_ptr<WarpState>> warps;
  std::atomic<int64_t> live{0};  // threads that have not returned yet
};

struct Launch {
  dim3 grid, block, cluster;
  int64_t threads_per_block = 0;
  int64_t blocks_per_cluster = 0;
  int64_t clusters = 0;
  size_t smem_bytes = 0;
  std::function<void()> body;  // calls the kernel with the launch's arguments

  std::atomic<bool> aborted{false};
  std::mutex error_m;
  cudaError_t code = cudaSuccess;
  std::string message;

  std::vector<std::unique_ptr<BlockState>> blocks;  // one per block of the running cluster
  Barrier cluster_barrier;
  Barrier control;           // all workers, between clusters; its completion sets up the next cluster
  int64_t next_cluster = 0;  // guarded by control
  bool finished = false;     // guarded by control

  void fail(cudaError_t c, std::string msg) {
    {
      std::lock_guard<std::mutex> lk(error_m);
      if (code != cudaSuccess) return;  // the first failure is the one reported, as on the GPU
      code = c;
      message = std::move(msg);
    }
    aborted.store(true);
    cluster_barrier.wake_for_abort();
    for (auto& b : blocks) {
      b->barrier.wake_for_abort();
      for (auto& w : b->warps) w->barrier.wake_for_abort();
    }
  }
};

struct AsyncCopy {
  void* dst;
  const void* src;
  size_t bytes;
  size_t zfill;
};

struct ThreadState {
  Launch* launch = nullptr;
  BlockState* block = nullptr;
  int64_t linear = 0;  // thread id in the block
  int64_t lane = 0;
  int64_t warp = 0;
  uint64_t warp_phases = 0;  // warp barriers this thread has passed in the current block
  std::vector<AsyncCopy> uncommitted;
  std::vector<std::vector<AsyncCopy>> committed;  // oldest first
};

inline thread_local ThreadState* tl_state = nullptr;

inline ThreadState& self() {
  if (tl_state == nullptr) throw std::logic_error("charmlp_emu: a device intrinsic was called outside a kernel");
  return *tl_state;
}

inline std::string where() {
  char buf[160];
  std::snprintf(buf, sizeof buf, " [block (%u,%u,%u), thread (%u,%u,%u)]", ::blockIdx.x, ::blockIdx.y,
                ::blockIdx.z, ::threadIdx.x, ::threadIdx.y, ::threadIdx.z);
  return buf;
}

// A misuse of an intrinsic that the GPU leaves undefined: the launch fails with this message.
[[noreturn]] inline void misuse(const std::string& what) {
  throw KernelTrap{cudaErrorLaunchFailure, "charmlp_emu: " + what + where()};
}

[[noreturn]] inline void device_assert_fail(const char* cond, const char* file, int line, const char* func) {
  if (tl_state == nullptr) {  // host code: behave like the standard assert
    std::fprintf(stderr, "%s:%d: %s: Assertion `%s' failed.\n", file, line, func, cond);
    std::abort();
  }
  throw KernelTrap{cudaErrorAssert, std::string(file) + ":" + std::to_string(line) + ": " + func +
                                        ": device-side assertion `" + cond + "' failed." + where()};
}

}  // namespace detail
}  // namespace charmlp_emu

#undef CUDA_KERNEL_ASSERT
#define CUDA_KERNEL_ASSERT(cond) \
  ((cond) ? void(0) : ::charmlp_emu::detail::device_assert_fail(#cond, __FILE__, __LINE__, __func__))
#ifndef NDEBUG
#undef assert
#define assert(cond) CUDA_KERNEL_ASSERT(cond)
#endif

[[noreturn]] inline void __trap() {
  throw ::charmlp_emu::detail::KernelTrap{cudaErrorAssert, "__trap()" + ::charmlp_emu::detail::where()};
}

// ---- block barriers -------------------------------------------------------------------------------------------------

namespace charmlp_emu::detail {
enum BarrierTag : int { kTagSyncwarp = 1, kTagShfl, kTagVote };

// Threads that have returned take no part: they count neither as true nor as false.
inline Barrier::Phase block_barrier(int pred) { return self().block->barrier.arrive_and_wait(pred != 0 ? 1 : 0); }
}  // namespace charmlp_emu::detail

inline void __syncthreads() { ::charmlp_emu::detail::block_barrier(0); }
inline int __syncthreads_count(int pred) { return static_cast<int>(::charmlp_emu::detail::block_barrier(pred).sum); }
inline int __syncthreads_or(int pred) { return ::charmlp_emu::detail::block_barrier(pred).sum != 0; }
inline int __syncthreads_and(int pred) {
  const auto p = ::charmlp_emu::detail::block_barrier(pred);
  return static_cast<int64_t>(p.sum) == p.arrived;
}

// ---- warp intrinsics ------------------------------------------------------------------------------------------------

namespace charmlp_emu::detail {

// Lanes of the calling thread's warp that exist in the block (the last warp may be partial).
inline uint32_t warp_lanes(const ThreadState& t) {
  const int64_t n = std::min<int64_t>(32, t.launch->threads_per_block - t.warp * 32);
  return n == 32 ? 0xffffffffu : ((1u << n) - 1u);
}

// The mask must name the calling lane and every lane of the warp still running (bits of absent lanes are ignored);
// the emulator does not split a warp into independently synchronising groups.
inline WarpState& warp_enter(unsigned mask) {
  ThreadState& t = self();
  if ((mask >> t.lane & 1u) == 0) misuse("warp intrinsic called by a lane missing from its mask");
  if ((mask & warp_lanes(t)) != warp_lanes(t)) {
    misuse("partial-warp mask " + std::to_string(mask) + " is not emulated (only masks covering the whole warp)");
  }
  return *t.block->warps[t.warp];
}

inline Barrier::Phase warp_phase(WarpState& w, int tag, uint64_t value) {
  ThreadState& t = self();
  ++t.warp_phases;
  const Barrier::Phase p = w.barrier.arrive_and_wait(value, 1u << t.lane, tag);
  if (p.diverged) misuse("the lanes of a warp met at different warp intrinsics (divergent __syncwarp/shuffle/vote)");
  return p;
}

// One exchange: every lane publishes v, the warp meets, every lane reads the value of lane src_of(lane) (or keeps
// its own where src_of says so with a negative lane).
template <typename T, typename SrcOf>
T shuffle(unsigned mask, T v, int width, SrcOf src_of) {
  static_assert(std::is_trivially_copyable_v<T> && sizeof(T) <= 16, "shuffle of a type the emulator cannot carry");
  if (width <= 0 || width > 32 || (width & (width - 1)) != 0) misuse("shuffle width must be a power of 2 <= 32");
  WarpState& w = warp_enter(mask);
  ThreadState& t = self();
  auto& slots = w.slots[t.warp_phases & 1];
  std::memcpy(slots[t.lane], &v, sizeof(T));
  const Barrier::Phase p = warp_phase(w, kTagShfl, 0);
  const int64_t src = src_of(t.lane, static_cast<int64_t>(width));
  T out = v;
  if (src >= 0) {
    if ((p.lanes >> src & 1u) == 0) {
      misuse("shuffle reads lane " + std::to_string(src) + ", which did not take part (exited or absent)");
    }
    std::memcpy(&out, slots[src], sizeof(T));
  }
  return out;
}

}  // namespace charmlp_emu::detail

inline void __syncwarp(unsigned mask = 0xffffffffu) {
  auto& w = ::charmlp_emu::detail::warp_enter(mask);
  ::charmlp_emu::detail::warp_phase(w, ::charmlp_emu::detail::kTagSyncwarp, 0);
}

// Lane arithmetic as PTX shfl.sync defines it: segments of `width` lanes; idx wraps within the segment, up/down keep
// their own value past the segment's edge, xor may reach earlier segments but not later ones.
template <typename T>
T __shfl_sync(unsigned mask, T v, int src_lane, int width = 32) {
  return ::charmlp_emu::detail::shuffle(mask, v, width, [src_lane](int64_t lane, int64_t w) {
    return (lane & ~(w - 1)) + (static_cast<int64_t>(src_lane) & (w - 1));
  });
}
template <typename T>
T __shfl_up_sync(unsigned mask, T v, unsigned delta, int width = 32) {
  return ::charmlp_emu::detail::shuffle(mask, v, width, [delta](int64_t lane, int64_t w) {
    return (lane & (w - 1)) >= static_cast<int64_t>(delta) ? lane - static_cast<int64_t>(delta) : int64_t{-1};
  });
}
template <typename T>
T __shfl_down_sync(unsigned mask, T v, unsigned delta, int width = 32) {
  return ::charmlp_emu::detail::shuffle(mask, v, width, [delta](int64_t lane, int64_t w) {
    return (lane & (w - 1)) + static_cast<int64_t>(delta) < w ? lane + static_cast<int64_t>(delta) : int64_t{-1};
  });
}
template <typename T>
T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32) {
  return ::charmlp_emu::detail::shuffle(mask, v, width, [lane_mask](int64_t lane, int64_t w) {
    const int64_t src = lane ^ (static_cast<int64_t>(lane_mask) & 31);
    return src <= (lane | (w - 1)) ? src : int64_t{-1};
  });
}

namespace charmlp_emu::detail {
// One vote phase: sum = the ballot (distinct bits: their sum is their OR), lanes = the lanes that voted.
inline Barrier::Phase vote(unsigned mask, int pred) {
  WarpState& w = warp_enter(mask);
  return warp_phase(w, kTagVote, pred != 0 ? (uint64_t{1} << self().lane) : 0);
}
}  // namespace charmlp_emu::detail

inline unsigned __ballot_sync(unsigned mask, int pred) {
  return static_cast<unsigned>(::charmlp_emu::detail::vote(mask, pred).sum);
}
inline int __any_sync(unsigned mask, int pred) { return ::charmlp_emu::detail::vote(mask, pred).sum != 0; }
inline int __all_sync(unsigned mask, int pred) {
  const auto p = ::charmlp_emu::detail::vote(mask, pred);
  return p.sum == p.lanes;
}

// ---- atomics and fences ---------------------------------------------------------------------------------------------

template <typename T>
T atomicAdd(T* p, std::type_identity_t<T> v) {
  return std::atomic_ref<T>(*p).fetch_add(v);
}
template <typename T>
T atomicSub(T* p, std::type_identity_t<T> v) {
  return std::atomic_ref<T>(*p).fetch_sub(v);
}
template <typename T>
T atomicExch(T* p, std::type_identity_t<T> v) {
  return std::atomic_ref<T>(*p).exchange(v);
}
template <typename T>
T atomicCAS(T* p, std::type_identity_t<T> expected, std::type_identity_t<T> desired) {
  std::atomic_ref<T>(*p).compare_exchange_strong(expected, desired);
  return expected;  // the old value either way
}
// *p = v where better(v, *p), atomically (a compare-exchange loop); returns the old value, as CUDA's atomicMax/Min.
template <typename T, typename Better>
T atomic_replace_if(T* p, T v, Better better) {
  std::atomic_ref<T> a(*p);
  T old = a.load();
  while (better(v, old) && !a.compare_exchange_weak(old, v)) {
  }
  return old;
}
template <typename T>
T atomicMax(T* p, std::type_identity_t<T> v) {
  return atomic_replace_if(p, T(v), [](T x, T y) { return y < x; });
}
template <typename T>
T atomicMin(T* p, std::type_identity_t<T> v) {
  return atomic_replace_if(p, T(v), [](T x, T y) { return x < y; });
}
// ThreadSanitizer does not model fences (and warns about them); it does see the atomics above, which are seq_cst.
inline void __threadfence() {
#ifndef __SANITIZE_THREAD__
  std::atomic_thread_fence(std::memory_order_seq_cst);
#endif
}
inline void __threadfence_block() { __threadfence(); }

// ---- math and bit intrinsics ----------------------------------------------------------------------------------------

// CUDA's global min/max overloads (device code calls them unqualified), one per argument type as in CUDA's headers.
#define CHARMLP_EMU_MIN_MAX(T)                    \
  inline T min(T a, T b) { return b < a ? b : a; } \
  inline T max(T a, T b) { return a < b ? b : a; }
CHARMLP_EMU_MIN_MAX(int)
CHARMLP_EMU_MIN_MAX(unsigned)
CHARMLP_EMU_MIN_MAX(long)
CHARMLP_EMU_MIN_MAX(unsigned long)
CHARMLP_EMU_MIN_MAX(long long)
CHARMLP_EMU_MIN_MAX(unsigned long long)
#undef CHARMLP_EMU_MIN_MAX
inline float min(float a, float b) { return std::fmin(a, b); }
inline float max(float a, float b) { return std::fmax(a, b); }
inline double min(double a, double b) { return std::fmin(a, b); }
inline double max(double a, double b) { return std::fmax(a, b); }

inline float __expf(float x) { return std::exp(x); }
inline float __logf(float x) { return std::log(x); }
inline float __powf(float x, float y) { return std::pow(x, y); }
inline float __sinf(float x) { return std::sin(x); }
inline float __cosf(float x) { return std::cos(x); }
inline float __fdividef(float x, float y) { return x / y; }
inline float __frcp_rn(float x) { return 1.0f / x; }
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
inline double rsqrt(double x) { return 1.0 / std::sqrt(x); }
inline float __fmaf_rn(float a, float b, float c) { return std::fma(a, b, c); }
inline float __saturatef(float x) { return x < 0.0f ? 0.0f : (x > 1.0f ? 1.0f : x); }
inline unsigned __umulhi(unsigned a, unsigned b) { return static_cast<unsigned>((uint64_t{a} * b) >> 32); }
inline unsigned long long __umul64hi(unsigned long long a, unsigned long long b) {
  return static_cast<unsigned long long>((static_cast<unsigned __int128>(a) * b) >> 64);
}
inline int __ffs(int x) { return __builtin_ffs(x); }
inline int __ffsll(long long x) { return __builtin_ffsll(x); }
inline int __popc(unsigned x) { return std::popcount(x); }
inline int __popcll(unsigned long long x) { return std::popcount(x); }
inline int __clz(int x) { return std::countl_zero(static_cast<unsigned>(x)); }
inline int __clzll(long long x) { return std::countl_zero(static_cast<unsigned long long>(x)); }
inline unsigned __brev(unsigned x) {
  unsigned r = 0;
  for (int i = 0; i < 32; ++i) r |= ((x >> i) & 1u) << (31 - i);
  return r;
}
template <typename T>
T __ldg(const T* p) {
  return *p;
}

// ---- shared memory --------------------------------------------------------------------------------------------------

namespace charmlp_emu::detail {

constexpr unsigned char kPoison = 0xFF;  // float/double NaN, integer -1

// The block's dynamic shared memory, allocated 128-byte aligned by the launcher.
inline void* dynamic_shared_memory(size_t type_align, size_t declared_align) {
  if (std::max(type_align, declared_align) > 128) misuse("dynamic shared memory aligned beyond 128 bytes");
  return self().block->smem;
}

}  // namespace charmlp_emu::detail

// ---- thread-block clusters and cooperative groups -------------------------------------------------------------------

namespace cooperative_groups {

class thread_block {
 public:
  void sync() const { __syncthreads(); }
  unsigned long long thread_rank() const {
    return static_cast<unsigned long long>(::charmlp_emu::detail::self().linear);
  }
  unsigned long long num_threads() const {
    return static_cast<unsigned long long>(::charmlp_emu::detail::self().launch->threads_per_block);
  }
  unsigned long long size() const { return num_threads(); }
  dim3 group_index() const { return blockIdx; }
  dim3 thread_index() const { return threadIdx; }
};

inline thread_block this_thread_block() { return {}; }

class cluster_group {
 public:
  // Every thread of every block of the cluster arrives; shared-memory writes before it are visible after it.
  void sync() const { ::charmlp_emu::detail::self().launch->cluster_barrier.arrive_and_wait(); }
  unsigned block_rank() const { return static_cast<unsigned>(::charmlp_emu::detail::self().block->rank); }
  unsigned num_blocks() const {
    return static_cast<unsigned>(::charmlp_emu::detail::self().launch->blocks_per_cluster);
  }
  dim3 dim_blocks() const { return ::charmlp_emu::detail::self().launch->cluster; }
  dim3 block_index() const {
    const dim3 c = dim_blocks();
    return dim3(blockIdx.x % c.x, blockIdx.y % c.y, blockIdx.z % c.z);
  }
  unsigned long long thread_rank() const {
    const auto& t = ::charmlp_emu::detail::self();
    return static_cast<unsigned long long>(t.block->rank * t.launch->threads_per_block + t.linear);
  }
  unsigned long long num_threads() const {
    const auto& t = ::charmlp_emu::detail::self();
    return static_cast<unsigned long long>(t.launch->blocks_per_cluster * t.launch->threads_per_block);
  }

  // The same offset in block `rank`'s dynamic shared memory. Static __shared__ is one object for all blocks here,
  // so it cannot be mapped: that is a launch error rather than a silently shared pointer.
  template <typename T>
  T* map_shared_rank(T* addr, unsigned int rank) const {
    const auto& t = ::charmlp_emu::detail::self();
    if (static_cast<int64_t>(rank) >= t.launch->blocks_per_cluster) {
      ::charmlp_emu::detail::misuse("map_shared_rank: rank " + std::to_string(rank) + " is outside the cluster");
    }
    const auto* p = reinterpret_cast<const unsigned char*>(addr);
    const unsigned char* base = t.block->smem;
    if (p < base || p >= base + t.launch->smem_bytes) {
      ::charmlp_emu::detail::misuse(
          "map_shared_rank: not an address in this block's dynamic shared memory (static __shared__ cannot be "
          "mapped in the emulator)");
    }
    return reinterpret_cast<T*>(t.launch->blocks[rank]->smem + (p - base));
  }
};

inline cluster_group this_cluster() { return {}; }

}  // namespace cooperative_groups

// ---- async copies (cuda_pipeline.h) ---------------------------------------------------------------------------------

inline void __pipeline_memcpy_async(void* dst, const void* src, size_t bytes, size_t zfill = 0) {
  if (bytes != 4 && bytes != 8 && bytes != 16) {
    ::charmlp_emu::detail::misuse("__pipeline_memcpy_async of " + std::to_string(bytes) + " bytes (4, 8 or 16)");
  }
  if (zfill > bytes || reinterpret_cast<uintptr_t>(dst) % bytes != 0 || reinterpret_cast<uintptr_t>(src) % bytes != 0) {
    ::charmlp_emu::detail::misuse("__pipeline_memcpy_async: misaligned address or zfill > size");
  }
  ::charmlp_emu::detail::self().uncommitted.push_back({dst, src, bytes, zfill});
}

inline void __pipeline_commit() {
  auto& t = ::charmlp_emu::detail::self();
  t.committed.push_back(std::move(t.uncommitted));
  t.uncommitted.clear();
}

// Lands every committed batch but the newest n; uncommitted copies stay pending, as on the GPU.
inline void __pipeline_wait_prior(size_t n) {
  auto& t = ::charmlp_emu::detail::self();
  while (t.committed.size() > n) {
    for (const auto& c : t.committed.front()) {
      std::memcpy(c.dst, c.src, c.bytes - c.zfill);
      std::memset(static_cast<unsigned char*>(c.dst) + (c.bytes - c.zfill), 0, c.zfill);
    }
    t.committed.erase(t.committed.begin());
  }
}

// ---- runtime API ----------------------------------------------------------------------------------------------------

namespace charmlp_emu::detail {

struct FuncAttributes {
  size_t max_dynamic_smem = DeviceLimits::kDefaultSmemPerBlock;
  bool non_portable_cluster = false;
};

struct Runtime {
  std::mutex m;
  std::unordered_map<const void*, FuncAttributes> funcs;  // keyed by the kernel's address
  std::mutex launch_m;  // one launch at a time: the device's work is serial, and static __shared__ is global
};

inline Runtime& runtime() {
  static Runtime r;
  return r;
}

inline thread_local cudaError_t tl_last_error = cudaSuccess;
inline thread_local std::string tl_last_message;

inline cudaError_t record(cudaError_t e, std::string message) {
  if (e != cudaSuccess) {
    tl_last_error = e;
    tl_last_message = std::move(message);
  }
  return e;
}

inline FuncAttributes attributes_of(const void* f) {
  std::lock_guard<std::mutex> lk(runtime().m);
  const auto it = runtime().funcs.find(f);
  return it == runtime().funcs.end() ? FuncAttributes{} : it->second;
}

}  // namespace charmlp_emu::detail

inline const char* cudaGetErrorName(cudaError_t e) {
  switch (e) {
    case cudaSuccess: return "cudaSuccess";
    case cudaErrorInvalidValue: return "cudaErrorInvalidValue";
    case cudaErrorInvalidConfiguration: return "cudaErrorInvalidConfiguration";
    case cudaErrorInvalidDeviceFunction: return "cudaErrorInvalidDeviceFunction";
    case cudaErrorLaunchOutOfResources: return "cudaErrorLaunchOutOfResources";
    case cudaErrorAssert: return "cudaErrorAssert";
    case cudaErrorLaunchFailure: return "cudaErrorLaunchFailure";
    case cudaErrorNotSupported: return "cudaErrorNotSupported";
  }
  return "cudaErrorUnknown";
}

// The detailed message of this host thread's latest error when it has that code (so C10_CUDA_CHECK reports the
// failing assertion), else the code's name.
inline const char* cudaGetErrorString(cudaError_t e) {
  using namespace charmlp_emu::detail;
  return (e != cudaSuccess && e == tl_last_error && !tl_last_message.empty()) ? tl_last_message.c_str()
                                                                             : cudaGetErrorName(e);
}

inline cudaError_t cudaGetLastError() {
  const cudaError_t e = charmlp_emu::detail::tl_last_error;
  charmlp_emu::detail::tl_last_error = cudaSuccess;
  return e;
}
inline cudaError_t cudaPeekAtLastError() { return charmlp_emu::detail::tl_last_error; }

template <typename... Params>
cudaError_t cudaFuncSetAttribute(void (*kernel)(Params...), cudaFuncAttribute attr, int value) {
  namespace emu = charmlp_emu;  // not `using namespace`: torch has a global `detail` too
  std::lock_guard<std::mutex> lk(emu::detail::runtime().m);
  auto& a = emu::detail::runtime().funcs[reinterpret_cast<const void*>(kernel)];
  switch (attr) {
    case cudaFuncAttributeMaxDynamicSharedMemorySize:
      if (value < 0 || static_cast<size_t>(value) > emu::DeviceLimits::kMaxSmemPerBlockOptin) {
        return emu::detail::record(cudaErrorInvalidValue, "cudaFuncSetAttribute: MaxDynamicSharedMemorySize " +
                                                         std::to_string(value) + " exceeds the device's 232448");
      }
      a.max_dynamic_smem = static_cast<size_t>(value);
      return cudaSuccess;
    case cudaFuncAttributeNonPortableClusterSizeAllowed:
      a.non_portable_cluster = value != 0;
      return cudaSuccess;
    case cudaFuncAttributePreferredSharedMemoryCarveout:
      return cudaSuccess;
  }
  return emu::detail::record(cudaErrorInvalidValue, "cudaFuncSetAttribute: unknown attribute");
}

inline cudaError_t cudaGetDeviceProperties(cudaDeviceProp* prop, int device) {
  using L = charmlp_emu::DeviceLimits;
  if (device != 0) return charmlp_emu::detail::record(cudaErrorInvalidValue, "one emulated device (0)");
  *prop = cudaDeviceProp{};
  std::snprintf(prop->name, sizeof prop->name, "charmlp_emu H100/H200 (CPU emulation)");
  prop->totalGlobalMem = L::kGlobalMem;
  prop->sharedMemPerBlock = L::kDefaultSmemPerBlock;
  prop->regsPerBlock = 65536;
  prop->warpSize = L::kWarpSize;
  prop->maxThreadsPerBlock = static_cast<int>(L::kMaxThreadsPerBlock);
  prop->maxThreadsDim[0] = 1024;
  prop->maxThreadsDim[1] = 1024;
  prop->maxThreadsDim[2] = 64;
  prop->maxGridSize[0] = 2147483647;
  prop->maxGridSize[1] = 65535;
  prop->maxGridSize[2] = 65535;
  prop->major = 9;
  prop->minor = 0;
  prop->multiProcessorCount = L::kSMs;
  prop->l2CacheSize = 50 * 1024 * 1024;
  prop->maxThreadsPerMultiProcessor = static_cast<int>(L::kMaxThreadsPerSM);
  prop->sharedMemPerMultiprocessor = L::kSmemPerSM;
  prop->sharedMemPerBlockOptin = L::kMaxSmemPerBlockOptin;
  prop->reservedSharedMemPerBlock = L::kReservedSmemPerBlock;
  prop->maxBlocksPerMultiProcessor = static_cast<int>(L::kMaxBlocksPerSM);
  return cudaSuccess;
}

inline cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int device) {
  cudaDeviceProp p;
  if (const cudaError_t e = cudaGetDeviceProperties(&p, device); e != cudaSuccess) return e;
  switch (attr) {
    case cudaDevAttrMaxThreadsPerBlock: *value = p.maxThreadsPerBlock; return cudaSuccess;
    case cudaDevAttrMaxSharedMemoryPerBlock: *value = static_cast<int>(p.sharedMemPerBlock); return cudaSuccess;
    case cudaDevAttrWarpSize: *value = p.warpSize; return cudaSuccess;
    case cudaDevAttrMultiProcessorCount: *value = p.multiProcessorCount; return cudaSuccess;
    case cudaDevAttrMaxThreadsPerMultiProcessor: *value = p.maxThreadsPerMultiProcessor; return cudaSuccess;
    case cudaDevAttrComputeCapabilityMajor: *value = p.major; return cudaSuccess;
    case cudaDevAttrComputeCapabilityMinor: *value = p.minor; return cudaSuccess;
    case cudaDevAttrMaxSharedMemoryPerMultiprocessor:
      *value = static_cast<int>(p.sharedMemPerMultiprocessor);
      return cudaSuccess;
    case cudaDevAttrMaxSharedMemoryPerBlockOptin:
      *value = static_cast<int>(p.sharedMemPerBlockOptin);
      return cudaSuccess;
    case cudaDevAttrClusterLaunch: *value = 1; return cudaSuccess;
  }
  return charmlp_emu::detail::record(cudaErrorInvalidValue, "cudaDeviceGetAttribute: unknown attribute");
}

inline cudaError_t cudaGetDeviceCount(int* n) {
  *n = 1;
  return cudaSuccess;
}
inline cudaError_t cudaGetDevice(int* d) {
  *d = 0;
  return cudaSuccess;
}
inline cudaError_t cudaSetDevice(int d) {
  return d == 0 ? cudaSuccess : charmlp_emu::detail::record(cudaErrorInvalidValue, "one emulated device (0)");
}
// Every launch has finished when it returns: synchronisation has nothing to wait for.
inline cudaError_t cudaDeviceSynchronize() { return cudaSuccess; }
inline cudaError_t cudaStreamCreate(cudaStream_t* s) {
  *s = nullptr;
  return cudaSuccess;
}
inline cudaError_t cudaStreamDestroy(cudaStream_t) { return cudaSuccess; }
inline cudaError_t cudaStreamSynchronize(cudaStream_t) { return cudaSuccess; }
inline cudaError_t cudaEventCreate(cudaEvent_t* e) {
  *e = new CUevent_st{};
  return cudaSuccess;
}
inline cudaError_t cudaEventDestroy(cudaEvent_t e) {
  delete e;
  return cudaSuccess;
}
// Host wall-clock time: the emulator's timings say nothing about the GPU's.
inline cudaError_t cudaEventRecord(cudaEvent_t e, cudaStream_t = nullptr) {
  e->when = std::chrono::steady_clock::now();
  return cudaSuccess;
}
inline cudaError_t cudaEventSynchronize(cudaEvent_t) { return cudaSuccess; }
inline cudaError_t cudaEventElapsedTime(float* ms, cudaEvent_t start, cudaEvent_t end) {
  *ms = std::chrono::duration<float, std::milli>(end->when - start->when).count();
  return cudaSuccess;
}

// ---- launcher -------------------------------------------------------------------------------------------------------

namespace charmlp_emu::detail {

constexpr size_t kWorkerStack = size_t(1) << 20;  // kernels keep small frames; sanitizers need some headroom

inline void poison(unsigned char* p, size_t n) { std::memset(p, kPoison, n); }

// Runs in the last worker to reach the control barrier: checks the finished cluster, sets up the next one.
inline void setup_next_cluster(Launch& L) {
  if (L.aborted.load() || L.next_cluster == L.clusters) {
    L.finished = true;
    return;
  }
  const int64_t c = L.next_cluster++;
  const int64_t ncx = L.grid.x / L.cluster.x, ncy = L.grid.y / L.cluster.y;
  const int64_t cx = c % ncx, cy = (c / ncx) % ncy, cz = c / (ncx * ncy);
  for (int64_t r = 0; r < L.blocks_per_cluster; ++r) {
    BlockState& b = *L.blocks[r];
    const int64_t lx = r % L.cluster.x, ly = (r / L.cluster.x) % L.cluster.y;
    const int64_t lz = r / (int64_t{L.cluster.x} * L.cluster.y);
    b.index = uint3{static_cast<unsigned>(cx * L.cluster.x + lx), static_cast<unsigned>(cy * L.cluster.y + ly),
                    static_cast<unsigned>(cz * L.cluster.z + lz)};
    poison(b.smem, L.smem_bytes);
    b.barrier.reset(L.threads_per_block, &L.aborted);
    for (int64_t w = 0; w < static_cast<int64_t>(b.warps.size()); ++w) {
      b.warps[w]->barrier.reset(std::min<int64_t>(32, L.threads_per_block - 32 * w), &L.aborted);
    }
    b.live.store(L.threads_per_block);
  }
  L.cluster_barrier.reset(L.blocks_per_cluster * L.threads_per_block, &L.aborted);
}

inline void run_worker(Launch& L, int64_t worker) {
  ThreadState t;
  t.launch = &L;
  t.linear = worker % L.threads_per_block;
  t.lane = t.linear % 32;
  t.warp = t.linear / 32;
  BlockState& b = *L.blocks[worker / L.threads_per_block];
  t.block = &b;
  tl_state = &t;
  ::blockDim = L.block;
  ::gridDim = L.grid;
  ::threadIdx = uint3{static_cast<unsigned>(t.linear % L.block.x),
                      static_cast<unsigned>((t.linear / L.block.x) % L.block.y),
                      static_cast<unsigned>(t.linear / (int64_t{L.block.x} * L.block.y))};
  for (;;) {
    L.control.arrive_and_wait();
    if (L.finished) break;
    ::blockIdx = b.index;
    t.warp_phases = 0;  // the warp's barrier starts afresh with the block, so does the buffer parity
    try {
      L.body();
      __pipeline_commit();  // copies still in flight at exit, committed or not, land anyway
      __pipeline_wait_prior(0);
    } catch (const KernelTrap& e) {
      L.fail(e.code, e.message);
    } catch (const LaunchAborted&) {
    } catch (const std::exception& e) {
      L.fail(cudaErrorLaunchFailure, std::string("charmlp_emu: exception in a kernel: ") + e.what() + where());
    } catch (...) {
      L.fail(cudaErrorLaunchFailure, "charmlp_emu: exception in a kernel" + where());
    }
    t.uncommitted.clear();
    t.committed.clear();
    b.warps[t.warp]->barrier.drop();
    b.barrier.drop();
    L.cluster_barrier.drop();
    // The last thread of a cluster's block: its shared memory is gone, so a peer still reading it sees poison.
    if (b.live.fetch_sub(1) == 1 && L.blocks_per_cluster > 1) poison(b.smem, L.smem_bytes);
  }
  tl_state = nullptr;
}

struct WorkerArg {
  Launch* launch;
  int64_t worker;
};

inline void* worker_entry(void* p) {
  const WorkerArg a = *static_cast<WorkerArg*>(p);
  run_worker(*a.launch, a.worker);
  return nullptr;
}

struct SmemDeleter {
  void operator()(unsigned char* p) const { ::operator delete[](p, std::align_val_t{128}); }
};

// Validates the configuration as the GPU does, then runs the grid. `kernel` keys the per-kernel attributes.
inline cudaError_t run_launch(const void* kernel, dim3 grid, dim3 block, dim3 cluster, size_t smem_bytes,
                              std::function<void()> body) {
  using Lim = DeviceLimits;
  if (tl_state != nullptr) return record(cudaErrorNotSupported, "charmlp_emu: kernel launch from a kernel");
  const int64_t threads = int64_t{block.x} * block.y * block.z;
  if (threads == 0 || threads > Lim::kMaxThreadsPerBlock || block.x > 1024 || block.y > 1024 || block.z > 64) {
    return record(cudaErrorInvalidConfiguration, "charmlp_emu: invalid block dimensions (" +
                                                     std::to_string(block.x) + "," + std::to_string(block.y) + "," +
                                                     std::to_string(block.z) + ")");
  }
  if (grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.x > 2147483647u || grid.y > 65535 || grid.z > 65535) {
    return record(cudaErrorInvalidConfiguration, "charmlp_emu: invalid grid dimensions");
  }
  const FuncAttributes attrs = attributes_of(kernel);
  if (smem_bytes > attrs.max_dynamic_smem) {
    return record(cudaErrorInvalidValue,
                  "charmlp_emu: " + std::to_string(smem_bytes) + " bytes of dynamic shared memory requested, " +
                      std::to_string(attrs.max_dynamic_smem) +
                      " allowed (cudaFuncAttributeMaxDynamicSharedMemorySize raises the 49152 default up to 232448)");
  }
  const int64_t per_cluster = int64_t{cluster.x} * cluster.y * cluster.z;
  const int64_t max_cluster = attrs.non_portable_cluster ? Lim::kMaxClusterNonPortable : Lim::kMaxClusterPortable;
  if (per_cluster == 0 || per_cluster > max_cluster || grid.x % cluster.x != 0 || grid.y % cluster.y != 0 ||
      grid.z % cluster.z != 0) {
    return record(cudaErrorInvalidConfiguration,
                  "charmlp_emu: invalid cluster of " + std::to_string(per_cluster) + " blocks (at most " +
                      std::to_string(max_cluster) + ", and the grid must be a whole number of clusters)");
  }

  std::lock_guard<std::mutex> serial(runtime().launch_m);
  Launch L;
  L.grid = grid;
  L.block = block;
  L.cluster = cluster;
  L.threads_per_block = threads;
  L.blocks_per_cluster = per_cluster;
  L.clusters = (int64_t{grid.x} * grid.y * grid.z) / per_cluster;
  L.smem_bytes = smem_bytes;
  L.body = std::move(body);
  std::vector<std::unique_ptr<unsigned char, SmemDeleter>> smem;
  for (int64_t r = 0; r < per_cluster; ++r) {
    auto b = std::make_unique<BlockState>();
    b->rank = r;
    // Exactly smem_bytes, so that AddressSanitizer reports an access past the launch's dynamic shared memory.
    smem.emplace_back(static_cast<unsigned char*>(::operator new[](smem_bytes, std::align_val_t{128})));
    b->smem = smem.back().get();
    for (int64_t w = 0; w < (threads + 31) / 32; ++w) b->warps.push_back(std::make_unique<WarpState>());
    L.blocks.push_back(std::move(b));
  }
  const int64_t workers = per_cluster * threads;
  L.control.reset(workers, nullptr);  // never aborted: it is how workers leave an aborted launch
  L.control.set_completion([&L] { setup_next_cluster(L); });

  pthread_attr_t pa;
  pthread_attr_init(&pa);
  pthread_attr_setstacksize(&pa, kWorkerStack);
  std::vector<pthread_t> ids;
  std::vector<WorkerArg> args(static_cast<size_t>(workers));
  ids.reserve(static_cast<size_t>(workers));
  for (int64_t w = 0; w < workers; ++w) {
    args[w] = WorkerArg{&L, w};
    pthread_t id;
    if (pthread_create(&id, &pa, worker_entry, &args[w]) != 0) {
      L.fail(cudaErrorLaunchOutOfResources,
             "charmlp_emu: could not start " + std::to_string(workers) + " threads for a cluster");
      for (int64_t rest = w; rest < workers; ++rest) L.control.drop();
      break;
    }
    ids.push_back(id);
  }
  pthread_attr_destroy(&pa);
  for (pthread_t id : ids) pthread_join(id, nullptr);
  return record(L.code, L.message);
}

template <typename... Params, typename... Args>
std::function<void()> bind_kernel(void (*kernel)(Params...), Args&&... args) {
  // Converted once to the kernel's parameter types; every thread gets its own by-value copies, as on the GPU.
  return [kernel, params = std::tuple<std::decay_t<Params>...>(std::forward<Args>(args)...)] {
    std::apply(kernel, params);
  };
}

}  // namespace charmlp_emu::detail

template <typename... Params, typename... Args>
cudaError_t cudaLaunchKernelEx(const cudaLaunchConfig_t* cfg, void (*kernel)(Params...), Args&&... args) {
  dim3 cluster(1, 1, 1);
  for (unsigned i = 0; i < cfg->numAttrs; ++i) {
    if (cfg->attrs[i].id == cudaLaunchAttributeClusterDimension) {
      cluster = dim3(cfg->attrs[i].val.clusterDim.x, cfg->attrs[i].val.clusterDim.y, cfg->attrs[i].val.clusterDim.z);
    }
  }
  return charmlp_emu::detail::run_launch(reinterpret_cast<const void*>(kernel), cfg->gridDim, cfg->blockDim, cluster,
                                         cfg->dynamicSmemBytes,
                                         charmlp_emu::detail::bind_kernel(kernel, std::forward<Args>(args)...));
}

// An estimate from the per-SM limits (threads, blocks, shared memory with the runtime's 1 KiB per block): clusters of
// the configuration that 132 SMs hold at once. The GPU also needs a cluster's blocks in one GPC, so its answer can
// be lower (MIG/MPS partitions: much lower, even 0).
template <typename... Params>
cudaError_t cudaOccupancyMaxActiveClusters(int* n, void (*kernel)(Params...), const cudaLaunchConfig_t* cfg) {
  using Lim = charmlp_emu::DeviceLimits;
  dim3 cluster(1, 1, 1);
  for (unsigned i = 0; i < cfg->numAttrs; ++i) {
    if (cfg->attrs[i].id == cudaLaunchAttributeClusterDimension) {
      cluster = dim3(cfg->attrs[i].val.clusterDim.x, cfg->attrs[i].val.clusterDim.y, cfg->attrs[i].val.clusterDim.z);
    }
  }
  const auto attrs = charmlp_emu::detail::attributes_of(reinterpret_cast<const void*>(kernel));
  const int64_t per_cluster = int64_t{cluster.x} * cluster.y * cluster.z;
  const int64_t threads = int64_t{cfg->blockDim.x} * cfg->blockDim.y * cfg->blockDim.z;
  const int64_t max_cluster = attrs.non_portable_cluster ? Lim::kMaxClusterNonPortable : Lim::kMaxClusterPortable;
  if (per_cluster > max_cluster || threads == 0 || threads > Lim::kMaxThreadsPerBlock ||
      cfg->dynamicSmemBytes > attrs.max_dynamic_smem) {
    return charmlp_emu::detail::record(cudaErrorInvalidValue, "cudaOccupancyMaxActiveClusters: invalid configuration");
  }
  const int64_t by_smem = static_cast<int64_t>(Lim::kSmemPerSM / (cfg->dynamicSmemBytes + Lim::kReservedSmemPerBlock));
  const int64_t by_threads = Lim::kMaxThreadsPerSM / (((threads + 31) / 32) * 32);
  const int64_t per_sm = std::min({by_smem, by_threads, Lim::kMaxBlocksPerSM});
  *n = static_cast<int>(int64_t{Lim::kSMs} * per_sm / per_cluster);
  return cudaSuccess;
}

namespace charmlp_emu {

// kernel<<<grid, block, smem_bytes, stream>>>(args...) on both builds. The emulated launch is synchronous: when it
// returns, the kernel has run, and a device-side failure is its return value (and cudaGetLastError's).
template <typename... Params, typename... Args>
cudaError_t launch(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem_bytes, cudaStream_t /*stream*/,
                   Args&&... args) {
  return detail::run_launch(reinterpret_cast<const void*>(kernel), grid, block, dim3(1, 1, 1), smem_bytes,
                            detail::bind_kernel(kernel, std::forward<Args>(args)...));
}

// The same with thread-block clusters of `cluster` blocks (cudaLaunchKernelEx with a cluster-dimension attribute).
template <typename... Params, typename... Args>
cudaError_t launch_cluster(void (*kernel)(Params...), dim3 grid, dim3 block, dim3 cluster, size_t smem_bytes,
                           cudaStream_t /*stream*/, Args&&... args) {
  return detail::run_launch(reinterpret_cast<const void*>(kernel), grid, block, cluster, smem_bytes,
                            detail::bind_kernel(kernel, std::forward<Args>(args)...));
}

}  // namespace charmlp_emu

#endif  // CHARMLP_EMULATE_CUDA
