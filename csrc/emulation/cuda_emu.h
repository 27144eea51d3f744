// cuda_emu.h: a CPU emulation of the slice of CUDA that charmlp_fast's kernels use, so that the SAME .cu sources
// compile with the host compiler (g++ 12, -std=c++20 -pthread) and run on the CPU when CHARMLP_EMULATE_CUDA is
// defined. Without CHARMLP_EMULATE_CUDA (nvcc) this header only defines charmlp_emu::launch / launch_cluster and
// CHARMLP_DYNAMIC_SHARED on top of the real runtime, so launchers can call one helper on both builds.
//
// What it emulates, and how
//   * Execution. A launch runs its grid cluster by cluster (block by block without a cluster). Every thread of the
//     cluster being run is a FIBER on the launching OS thread: its own stack (256 KiB, 1 MiB under a sanitizer,
//     mmap'd with a PROT_NONE guard page below it so that an overflow faults; pooled across launches), its own
//     ThreadState and its own values of threadIdx/blockIdx/blockDim/gridDim (thread_locals the scheduler swaps at
//     every switch, and restores for the launching thread afterwards). The threads of a block, and all blocks of a
//     cluster, are alive together, but exactly one runs at a time: a fiber runs until it reaches a barrier (any of
//     those below) or returns, then the next runnable one runs (cooperative scheduling, no preemption). The switch
//     is a few instructions of assembly on x86-64 (ucontext elsewhere, or with -DCHARMLP_EMU_UCONTEXT).
//   * Races. Between two barriers a thread's code runs without interruption, so a read of another thread's write
//     without the barrier in between sees either the written value or the old one, by the order the threads run in;
//     dynamic shared memory is poisoned with 0xFF bytes at every block start, so a read of a slot nobody wrote yet
//     is a NaN or -1. The order varies so that both directions of a neighbour bug show: a cluster starts its threads
//     in ascending (block rank, linear id) order or in descending order, by the parity of popcount(n) + cluster
//     index for the kernel's n-th launch (the Thue-Morse sequence: no run of every k-th launch keeps one order), and
//     every barrier releases its waiters in the order opposite to its previous release (its first release is
//     opposite to the cluster's start order). So a thread reading the next thread's slot without a barrier is wrong
//     in ascending order, one reading the previous slot in descending order, and any permutation (s[N-1-t], s[t^1])
//     in both. In a -fsanitize=thread build every race is also a ThreadSanitizer data-race report (below).
//   * Barriers. __syncthreads (and _count/_and/_or), __syncwarp, the warp intrinsics and cluster.sync() are real
//     barriers: an arrival records itself (the value it contributes, its lane, which intrinsic) and suspends its
//     fiber; the arrival that completes the phase makes all the waiters runnable. A thread that returns from the
//     kernel leaves every barrier (it no longer counts), as exited threads do on sm_70+. When every live fiber of the
//     cluster waits and none can run (threads waiting at barriers that need each other: __syncthreads against
//     cluster.sync(), half a warp at __syncwarp and half at __syncthreads), the launch fails with
//     cudaErrorLaunchFailure, "charmlp_emu: deadlock: ..." naming the barriers and their arrivals, instead of hanging.
//   * ThreadSanitizer (-fsanitize=thread) knows every emulated thread as a TSan fiber (__tsan_create_fiber), switched
//     to with __tsan_switch_to_fiber_no_sync so that a switch is NOT a happens-before edge. The only edges are the
//     CUDA program's: each barrier arrival releases and each departure acquires (__tsan_release/__tsan_acquire on a
//     per-barrier word, double-buffered by phase parity), atomics, and the launch's start and end. The emulator's own
//     bookkeeping, which all fibers of the OS thread share without such edges, is hidden from it
//     (__tsan_ignore_thread_begin/end). So a missing barrier is a data-race report, and a correct kernel gives none.
//     TSan needs about 4 MiB per fiber: clusters of more than a few thousand threads fail under it (ENOMEM).
//   * AddressSanitizer: switches are announced (__sanitizer_start/finish_switch_fiber) so that it knows the running
//     stack, and an exited fiber's leftover stack poison is cleared before its stack is reused. Exceptions (device
//     asserts, LaunchAborted) are always caught in the fiber that threw them: none unwinds across a switch.
//   * Warps are 32 consecutive linear thread ids of a block. Lanes do NOT run in lockstep: each lane runs alone up to
//     its next warp intrinsic, so code that relies on implicit warp-synchronous execution without __syncwarp reads
//     stale or poisoned data, as under independent thread scheduling. A warp intrinsic is one phase of a per-warp
//     barrier around a double-buffered per-warp exchange buffer.
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
//     the whole launch: every fiber blocked at a barrier is resumed, its wait throws and it unwinds its own stack,
//     threads that had not started yet never start, and the launch returns
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
//   * Launches are synchronous, serialised (one at a time in the process) and not re-entrant, and use one core. A
//     barrier costs about 60 ns per thread (a switch and the bookkeeping): measured on two busy cores, 100 blocks of
//     256 threads with 5 shuffles and 4 __syncthreads take 15 ms per launch (0.45 s with the former OS thread per
//     CUDA thread), 50 blocks of 512 threads with 20 __syncthreads 29 ms (0.9-1.1 s), and a one-block launch of 128
//     threads 0.05 ms (8 ms). Still emulate test-sized problems, never benchmarks. A cluster of 16 blocks of 1024
//     threads is 16384 fibers (virtual memory for their stacks: 4 GiB, 16 GiB under a sanitizer).
//
// What only a real GPU shows: timing and occupancy (cudaOccupancyMaxActiveClusters is an estimate from the per-SM
// limits), the real (weaker) memory ordering and warp-synchronous timing of the hardware (the emulator's barriers
// and atomics are sequentially consistent, so a missing fence shows up only as a race report, never as a reordering),
// interleavings inside a barrier interval (threads never interleave between two barriers here, so a non-atomic
// read-modify-write of one shared word by many threads, s[0] += x, gives the right sum; only ThreadSanitizer reports
// it),
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
// different places of the code (detected for warps, not for __syncthreads), spin-waiting on a value another thread
// of the launch writes (no preemption: the spinning fiber never lets the writer run, and the launch hangs), grid-wide
// cooperative launches, textures, half-precision intrinsics, more than one device.
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

#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <bit>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <deque>
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

// Sanitizers the fibers must be announced to (see "Execution" at the top).
#if defined(__SANITIZE_THREAD__)
#define CHARMLP_EMU_TSAN 1
#elif defined(__has_feature)
#if __has_feature(thread_sanitizer)
#define CHARMLP_EMU_TSAN 1
#endif
#endif
#if defined(__SANITIZE_ADDRESS__)
#define CHARMLP_EMU_ASAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define CHARMLP_EMU_ASAN 1
#endif
#endif
#ifdef CHARMLP_EMU_TSAN
#include <sanitizer/tsan_interface.h>
extern "C" void __tsan_ignore_thread_begin(void);  // exported by the runtime, absent from some interface headers
extern "C" void __tsan_ignore_thread_end(void);
#endif
#ifdef CHARMLP_EMU_ASAN
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#endif
// The context switch: a few instructions of assembly on x86-64, ucontext elsewhere (or with CHARMLP_EMU_UCONTEXT).
#if defined(__x86_64__) && !defined(CHARMLP_EMU_UCONTEXT)
#define CHARMLP_EMU_ASM_SWITCH 1
#else
#include <ucontext.h>
#endif

// ---- qualifiers ---------------------------------------------------------------------------------------------------
// Every function is an ordinary host function; kernels are called by the launcher's fibers.

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

// The built-in variables: every emulated thread has its own (thread_locals the scheduler sets at each fiber switch).
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

// ---- sanitizer hooks ----------------------------------------------------------------------------------------------
// ThreadSanitizer: every emulated thread is a TSan fiber, switched to WITHOUT synchronisation, so that the only
// happens-before edges between emulated threads are the CUDA program's own: barrier phases (a release on arrival, an
// acquire on departure), atomics, and the launch's start and end. The emulator's bookkeeping (barrier counters, the
// run queue, the built-in variables it swaps at every switch) is shared by all fibers of the launching OS thread with
// no such edges, by design, so it is hidden from TSan (IgnoreAccesses).

#ifdef CHARMLP_EMU_TSAN
inline void tsan_acquire(void* a) { __tsan_acquire(a); }
inline void tsan_release(void* a) { __tsan_release(a); }
struct IgnoreAccesses {
  IgnoreAccesses() { __tsan_ignore_thread_begin(); }
  ~IgnoreAccesses() { __tsan_ignore_thread_end(); }
  IgnoreAccesses(const IgnoreAccesses&) = delete;
  IgnoreAccesses& operator=(const IgnoreAccesses&) = delete;
};
#else
inline void tsan_acquire(void*) {}
inline void tsan_release(void*) {}
struct IgnoreAccesses {
  IgnoreAccesses() {}  // not `= default`: a guard that is never "used" would warn
  IgnoreAccesses(const IgnoreAccesses&) = delete;
  IgnoreAccesses& operator=(const IgnoreAccesses&) = delete;
};
#endif

// ---- per-launch state ---------------------------------------------------------------------------------------------

// Thrown by a device-side failure in the failing thread, and into every other thread of an aborted launch.
struct KernelTrap {
  cudaError_t code;
  std::string message;
};
struct LaunchAborted {};

struct Fiber;
class Scheduler;

// A reusable barrier among the fibers of one cluster that combines one value per arriving thread (the sum, for
// __syncthreads_count and __ballot_sync) and a tag (which intrinsic each thread arrived at, to catch divergence).
// An arrival records itself and suspends its fiber; the arrival that completes the phase makes every waiter runnable
// again, in ascending or descending thread order, alternately from one phase to the next (the first phase in the
// order opposite to the one its cluster started in). For ThreadSanitizer each arrival is a release and each departure
// an acquire on the phase's sync word: two words, by the phase's parity, so that an arrival at the next phase cannot
// hand its newer writes to a thread that has not left this one yet.
class Barrier {
 public:
  struct Phase {
    uint64_t sum = 0;
    int64_t arrived = 0;
    uint32_t lanes = 0;  // bit i: lane i arrived (warp barriers)
    bool diverged = false;
  };

  // Only while no thread is inside the barrier. `kind` and `index` name it in a deadlock report.
  void reset(int64_t expected, Scheduler* sched, bool reverse_first, const char* kind, int64_t index = -1) {
    sched_ = sched;
    kind_ = kind;
    index_ = index;
    expected_ = expected;
    count_ = 0;
    tag_ = 0;
    reverse_next_ = reverse_first;
    phase_ = 0;
    cur_ = last_ = Phase{};
    waiters_.clear();
    waiters_.reserve(static_cast<size_t>(expected));
  }

  Phase arrive_and_wait(uint64_t value = 0, uint32_t lane_bit = 0, int tag = 0);
  // The calling thread leaves for good (it returned from the kernel).
  void drop();

  const char* kind() const { return kind_; }
  int64_t index() const { return index_; }
  int64_t arrived() const { return count_; }
  int64_t expected() const { return expected_; }

 private:
  void complete();

  Scheduler* sched_ = nullptr;
  const char* kind_ = "";
  int64_t index_ = -1;
  int64_t expected_ = 0;
  int64_t count_ = 0;
  int tag_ = 0;
  bool reverse_next_ = false;
  uint64_t phase_ = 0;
  Phase cur_, last_;
  std::vector<Fiber*> waiters_;
  char sync_[2] = {};  // ThreadSanitizer's sync objects, by phase parity (only their addresses matter)
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
  std::atomic<int64_t> live{0};  // threads that have not returned yet (its acq_rel chain orders the exit poisoning)
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

  // The scheduler resumes every blocked thread of an aborted launch, whose wait then throws LaunchAborted.
  void fail(cudaError_t c, std::string msg) {
    {
      std::lock_guard<std::mutex> lk(error_m);
      if (code != cudaSuccess) return;  // the first failure is the one reported, as on the GPU
      code = c;
      message = std::move(msg);
    }
    aborted.store(true);
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
  Fiber* fiber = nullptr;
  int64_t linear = 0;  // thread id in the block
  int64_t lane = 0;
  int64_t warp = 0;
  uint64_t warp_phases = 0;  // warp barriers this thread has passed in the current block
  std::vector<AsyncCopy> uncommitted;
  std::vector<std::vector<AsyncCopy>> committed;  // oldest first
};

// The running emulated thread's state: swapped by the scheduler at every fiber switch, with the built-in variables.
inline thread_local ThreadState* tl_state = nullptr;

// ---- fibers ---------------------------------------------------------------------------------------------------------

// A fiber's stack: [lo, lo + bytes), with an inaccessible guard page below it so that an overflow faults.
struct FiberStack {
  unsigned char* map = nullptr;
  size_t map_bytes = 0;
  unsigned char* lo = nullptr;
  size_t bytes = 0;
};

#if defined(CHARMLP_EMU_ASAN) || defined(CHARMLP_EMU_TSAN)
constexpr size_t kFiberStackBytes = size_t(1) << 20;  // instrumented frames are larger
#else
constexpr size_t kFiberStackBytes = size_t(256) << 10;  // kernels keep small frames
#endif

struct FiberContext {
#ifdef CHARMLP_EMU_ASM_SWITCH
  void* sp = nullptr;  // where the switch saved the registers
#else
  ucontext_t uc;
  void (*entry)(void*) = nullptr;
  void* arg = nullptr;
#endif
};

#ifdef CHARMLP_EMU_ASM_SWITCH
// Pushes the callee-saved registers, MXCSR and the x87 control word, stores the stack pointer in *save, switches to
// the stack `to` and pops the same from there (System V x86-64: every other register is caller-saved).
[[gnu::naked, gnu::noinline]] inline void context_switch_asm(void** /*save*/, void* /*to*/) {
  asm volatile(
      "pushq %rbp\n\t"
      "pushq %rbx\n\t"
      "pushq %r12\n\t"
      "pushq %r13\n\t"
      "pushq %r14\n\t"
      "pushq %r15\n\t"
      "subq $8, %rsp\n\t"
      "stmxcsr (%rsp)\n\t"
      "fnstcw 4(%rsp)\n\t"
      "movq %rsp, (%rdi)\n\t"
      "movq %rsi, %rsp\n\t"
      "ldmxcsr (%rsp)\n\t"
      "fldcw 4(%rsp)\n\t"
      "addq $8, %rsp\n\t"
      "popq %r15\n\t"
      "popq %r14\n\t"
      "popq %r13\n\t"
      "popq %r12\n\t"
      "popq %rbx\n\t"
      "popq %rbp\n\t"
      "ret\n\t");
}
// A new context's first switch returns here: r13 holds the entry function, r12 its argument. The entry never returns.
[[gnu::naked, gnu::noinline]] inline void context_start_asm() {
  asm volatile(
      "movq %r12, %rdi\n\t"
      "callq *%r13\n\t"
      "ud2\n\t");
}
inline void context_make(FiberContext& c, const FiberStack& s, void (*entry)(void*), void* arg) {
  const uintptr_t top = reinterpret_cast<uintptr_t>(s.lo + s.bytes) & ~uintptr_t{15};
  auto* sp = reinterpret_cast<uint64_t*>(top - 80);  // 16 bytes of headroom, then the frame the switch pops
  uint32_t mxcsr = 0;
  uint16_t fpcw = 0;
  asm volatile("stmxcsr %0" : "=m"(mxcsr));
  asm volatile("fnstcw %0" : "=m"(fpcw));
  sp[0] = mxcsr | (uint64_t{fpcw} << 32);
  sp[1] = 0;                                       // r15
  sp[2] = 0;                                       // r14
  sp[3] = reinterpret_cast<uintptr_t>(entry);      // r13
  sp[4] = reinterpret_cast<uintptr_t>(arg);        // r12
  sp[5] = 0;                                       // rbx
  sp[6] = 0;                                       // rbp: ends frame-pointer stack walks (sanitizer reports)
  sp[7] = reinterpret_cast<uintptr_t>(&context_start_asm);  // the return address; then rsp is 16-byte aligned
  c.sp = sp;
}
inline void context_switch(FiberContext& from, FiberContext& to) { context_switch_asm(&from.sp, to.sp); }
inline const unsigned char* context_sp(const FiberContext& c) { return static_cast<const unsigned char*>(c.sp); }
#else
inline void context_entry_uc(unsigned hi, unsigned lo) {
  auto* c = reinterpret_cast<FiberContext*>(static_cast<uintptr_t>((uint64_t{hi} << 32) | lo));
  c->entry(c->arg);
}
inline void context_make(FiberContext& c, const FiberStack& s, void (*entry)(void*), void* arg) {
  getcontext(&c.uc);
  c.uc.uc_stack.ss_sp = s.lo;
  c.uc.uc_stack.ss_size = s.bytes;
  c.uc.uc_link = nullptr;
  c.entry = entry;
  c.arg = arg;
  const uint64_t p = reinterpret_cast<uintptr_t>(&c);
  makecontext(&c.uc, reinterpret_cast<void (*)()>(&context_entry_uc), 2, static_cast<unsigned>(p >> 32),
              static_cast<unsigned>(p));
}
inline void context_switch(FiberContext& from, FiberContext& to) { swapcontext(&from.uc, &to.uc); }
inline const unsigned char* context_sp(const FiberContext&) { return nullptr; }  // unknown
#endif

struct Fiber {
  enum Run : unsigned char { kNew, kRunnable, kBlocked, kDone };
  FiberContext ctx;
  FiberStack stack;
  ThreadState state;
  uint3 thread_index{};
  int64_t id = 0;  // the thread's rank in its cluster (block rank * threads per block + linear id)
  Run run = kNew;
  Barrier* waiting_at = nullptr;
  Scheduler* sched = nullptr;
  void* tsan = nullptr;             // its ThreadSanitizer fiber
  void* asan_fake_stack = nullptr;  // AddressSanitizer's fake stack while it is switched out
};

// Runs the fibers of one cluster on the launching thread, one at a time, each until it waits at a barrier or exits.
class Scheduler {
 public:
  Launch* launch = nullptr;
  std::unique_ptr<Fiber[]> fibers;
  int64_t n = 0;  // fibers per cluster
  std::deque<Fiber*> runq;
  FiberContext ctx;  // the launching thread's
  const void* asan_bottom = nullptr;
  size_t asan_size = 0;
  void* tsan_self = nullptr;
  char start_sync = 0, exit_sync = 0;  // ThreadSanitizer: launcher -> threads at their start, threads -> launcher

  bool aborted() const { return launch->aborted.load(std::memory_order_relaxed); }

  void make_runnable(Fiber& f) {
    f.run = Fiber::kRunnable;
    f.waiting_at = nullptr;
    runq.push_back(&f);
  }

  // Launching thread: runs f until it suspends; sets the built-in variables for it.
  void resume(Fiber& f) {
    tl_state = &f.state;
    ::threadIdx = f.thread_index;
    ::blockIdx = f.state.block->index;
#ifdef CHARMLP_EMU_TSAN
    __tsan_switch_to_fiber(f.tsan, __tsan_switch_to_fiber_no_sync);
#endif
#ifdef CHARMLP_EMU_ASAN
    void* fake = nullptr;
    __sanitizer_start_switch_fiber(&fake, f.stack.lo, f.stack.bytes);
#endif
    context_switch(ctx, f.ctx);
#ifdef CHARMLP_EMU_ASAN
    __sanitizer_finish_switch_fiber(fake, nullptr, nullptr);
#endif
  }

  // In fiber f: back to the launching thread, until f is resumed (never, when it is exiting).
  void suspend(Fiber& f, [[maybe_unused]] bool exiting) {
#ifdef CHARMLP_EMU_TSAN
    void* to;
    {
      IgnoreAccesses ig;  // an exiting fiber has released its last accesses already
      to = tsan_self;
    }
    __tsan_switch_to_fiber(to, __tsan_switch_to_fiber_no_sync);
#endif
#ifdef CHARMLP_EMU_ASAN
    __sanitizer_start_switch_fiber(exiting ? nullptr : &f.asan_fake_stack, asan_bottom, asan_size);
#endif
    context_switch(f.ctx, ctx);
#ifdef CHARMLP_EMU_ASAN
    __sanitizer_finish_switch_fiber(f.asan_fake_stack, &asan_bottom, &asan_size);
#endif
  }

  // Until every fiber of the cluster has exited. A failure resumes every blocked fiber (its wait throws
  // LaunchAborted, so it unwinds its own stack) and drops the ones that never started; an empty run queue while
  // fibers are blocked is a deadlock, which fails the launch the same way.
  void run() {
    int64_t done = 0;
    bool woken = false;
    while (done < n) {
      if (!woken && aborted()) {
        woken = true;
        for (int64_t i = 0; i < n; ++i) {
          if (fibers[i].run == Fiber::kBlocked) make_runnable(fibers[i]);
        }
      }
      if (runq.empty()) {
        if (!aborted()) {
          launch->fail(cudaErrorLaunchFailure, deadlock_message());
          continue;
        }
        launch->fail(cudaErrorLaunchFailure, "charmlp_emu: internal error: blocked threads in an aborted launch");
        break;
      }
      Fiber& f = *runq.front();
      runq.pop_front();
      if (f.run == Fiber::kNew && aborted()) {
        f.run = Fiber::kDone;
        ++done;
        continue;
      }
      resume(f);
      if (f.run == Fiber::kDone) {
        ++done;
        unpoison_stack(f);
      }
    }
    runq.clear();
  }

 private:
  // AddressSanitizer: the frames still on an exited fiber's stack (it left by a switch, not by returning) keep their
  // redzones' poison; the next fiber on that stack must not inherit it.
  static void unpoison_stack([[maybe_unused]] const Fiber& f) {
#ifdef CHARMLP_EMU_ASAN
    const unsigned char* sp = context_sp(f.ctx);
    const unsigned char* lo = sp == nullptr ? f.stack.lo : std::max<const unsigned char*>(f.stack.lo, sp - 256);
    __asan_unpoison_memory_region(lo, static_cast<size_t>(f.stack.lo + f.stack.bytes - lo));
#endif
  }

  static std::string thread_name(const Fiber& f) {
    char buf[96];
    const uint3 b = f.state.block->index;
    std::snprintf(buf, sizeof buf, "block (%u,%u,%u) thread (%u,%u,%u)", b.x, b.y, b.z, f.thread_index.x,
                  f.thread_index.y, f.thread_index.z);
    return buf;
  }

  std::string deadlock_message() const {
    struct Group {
      const Barrier* barrier;
      const Fiber* first;
      int64_t threads;
    };
    std::vector<Group> groups;
    int64_t blocked = 0;
    for (int64_t i = 0; i < n; ++i) {
      const Fiber& f = fibers[i];
      if (f.run != Fiber::kBlocked) continue;
      ++blocked;
      auto g = std::find_if(groups.begin(), groups.end(), [&](const Group& x) { return x.barrier == f.waiting_at; });
      if (g == groups.end()) {
        groups.push_back({f.waiting_at, &f, 1});
      } else {
        ++g->threads;
      }
    }
    std::string m = "charmlp_emu: deadlock: " + std::to_string(blocked) +
                    " threads wait at barriers that can never complete (threads that wait at different barriers "
                    "never release each other; exited threads leave every barrier):";
    for (size_t k = 0; k < groups.size() && k < 4; ++k) {
      const Group& g = groups[k];
      m += (k == 0 ? " " : "; ") + std::to_string(g.threads) + " at " + g.barrier->kind();
      if (g.barrier->index() >= 0) m += " " + std::to_string(g.barrier->index());
      m += " (" + std::to_string(g.barrier->arrived()) + " of " + std::to_string(g.barrier->expected()) +
           " arrived; first " + thread_name(*g.first) + ")";
    }
    if (groups.size() > 4) m += "; ...";
    return m;
  }
};

inline Barrier::Phase Barrier::arrive_and_wait(uint64_t value, uint32_t lane_bit, int tag) {
  if (sched_->aborted()) throw LaunchAborted{};
  Fiber& me = *tl_state->fiber;
  uint64_t phase;
  {
    IgnoreAccesses ig;
    if (count_ == 0) {
      tag_ = tag;
    } else if (tag != tag_) {
      cur_.diverged = true;
    }
    cur_.sum += value;
    cur_.lanes |= lane_bit;
    ++cur_.arrived;
    phase = phase_;
    me.run = Fiber::kBlocked;
    me.waiting_at = this;
    waiters_.push_back(&me);
    tsan_release(&sync_[phase & 1]);
    if (++count_ == expected_) complete();
  }
  sched_->suspend(me, false);
  if (sched_->aborted()) throw LaunchAborted{};
  tsan_acquire(&sync_[phase & 1]);
  IgnoreAccesses ig;
  return last_;  // stable: the next phase cannot complete before this thread arrives again
}

inline void Barrier::drop() {
  IgnoreAccesses ig;
  tsan_release(&sync_[phase_ & 1]);
  --expected_;
  if (count_ > 0 && count_ == expected_) complete();
}

// Under IgnoreAccesses. In an aborted launch the waiters stay blocked: the scheduler resumes them all to unwind.
inline void Barrier::complete() {
  last_ = cur_;
  cur_ = Phase{};
  count_ = 0;
  ++phase_;
  if (!sched_->aborted()) {
    const auto asc = [](const Fiber* a, const Fiber* b) { return a->id < b->id; };
    const auto desc = [](const Fiber* a, const Fiber* b) { return a->id > b->id; };
    if (reverse_next_) {
      if (std::is_sorted(waiters_.begin(), waiters_.end(), asc)) {
        std::reverse(waiters_.begin(), waiters_.end());
      } else if (!std::is_sorted(waiters_.begin(), waiters_.end(), desc)) {
        std::sort(waiters_.begin(), waiters_.end(), desc);
      }
    } else {
      if (std::is_sorted(waiters_.begin(), waiters_.end(), desc)) {
        std::reverse(waiters_.begin(), waiters_.end());
      } else if (!std::is_sorted(waiters_.begin(), waiters_.end(), asc)) {
        std::sort(waiters_.begin(), waiters_.end(), asc);
      }
    }
    for (Fiber* f : waiters_) sched_->make_runnable(*f);
  }
  reverse_next_ = !reverse_next_;
  waiters_.clear();
}

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
  uint64_t launches = 0;  // so far: its parity picks the thread order a launch starts in
};

struct Runtime {
  std::mutex m;
  std::unordered_map<const void*, FuncAttributes> funcs;  // keyed by the kernel's address
  std::mutex launch_m;  // one launch at a time: the device's work is serial, and static __shared__ is global
  std::vector<FiberStack> stacks;  // pooled fiber stacks, under launch_m
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

inline uint64_t next_launch_number(const void* f) {
  std::lock_guard<std::mutex> lk(runtime().m);
  return runtime().funcs[f].launches++;
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

inline void poison(unsigned char* p, size_t n) { std::memset(p, kPoison, n); }

// The body of one emulated thread, in its fiber: the kernel, then it leaves every barrier. Nothing escapes it: an
// exception never unwinds across a context switch.
inline void run_thread(Fiber& f) noexcept {
  ThreadState& t = f.state;
  Launch& L = *t.launch;
  BlockState& b = *t.block;
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

inline void fiber_main(void* arg) noexcept {
  Fiber& f = *static_cast<Fiber*>(arg);
  Scheduler& S = *f.sched;
#ifdef CHARMLP_EMU_ASAN
  __sanitizer_finish_switch_fiber(nullptr, &S.asan_bottom, &S.asan_size);
#endif
  tsan_acquire(&S.start_sync);
  run_thread(f);
  tsan_release(&S.exit_sync);
  {
    IgnoreAccesses ig;
    f.run = Fiber::kDone;
  }
  S.suspend(f, true);
  std::abort();  // an exited fiber is never resumed
}

// Sets up cluster c: block indices, poisoned shared memory, barriers, and a fresh fiber per thread, queued in
// ascending thread order, or descending when `reverse`.
inline void setup_cluster(Launch& L, Scheduler& S, int64_t c, bool reverse) {
  const int64_t ncx = L.grid.x / L.cluster.x, ncy = L.grid.y / L.cluster.y;
  const int64_t cx = c % ncx, cy = (c / ncx) % ncy, cz = c / (ncx * ncy);
  for (int64_t r = 0; r < L.blocks_per_cluster; ++r) {
    BlockState& b = *L.blocks[r];
    const int64_t lx = r % L.cluster.x, ly = (r / L.cluster.x) % L.cluster.y;
    const int64_t lz = r / (int64_t{L.cluster.x} * L.cluster.y);
    b.index = uint3{static_cast<unsigned>(cx * L.cluster.x + lx), static_cast<unsigned>(cy * L.cluster.y + ly),
                    static_cast<unsigned>(cz * L.cluster.z + lz)};
    poison(b.smem, L.smem_bytes);
    b.barrier.reset(L.threads_per_block, &S, !reverse, "__syncthreads");
    for (int64_t w = 0; w < static_cast<int64_t>(b.warps.size()); ++w) {
      b.warps[w]->barrier.reset(std::min<int64_t>(32, L.threads_per_block - 32 * w), &S, !reverse,
                                "__syncwarp/shuffle/vote of warp", w);
    }
    b.live.store(L.threads_per_block);
  }
  L.cluster_barrier.reset(S.n, &S, !reverse, "cluster.sync()");
  for (int64_t i = 0; i < S.n; ++i) {
    Fiber& f = S.fibers[i];
    f.state = ThreadState{};
    ThreadState& t = f.state;
    t.launch = &L;
    t.block = L.blocks[i / L.threads_per_block].get();
    t.fiber = &f;
    t.linear = i % L.threads_per_block;
    t.lane = t.linear % 32;
    t.warp = t.linear / 32;
    f.thread_index = uint3{static_cast<unsigned>(t.linear % L.block.x),
                           static_cast<unsigned>((t.linear / L.block.x) % L.block.y),
                           static_cast<unsigned>(t.linear / (int64_t{L.block.x} * L.block.y))};
    f.id = i;
    f.run = Fiber::kNew;
    f.waiting_at = nullptr;
    f.sched = &S;
    f.asan_fake_stack = nullptr;
    context_make(f.ctx, f.stack, &fiber_main, &f);
#ifdef CHARMLP_EMU_TSAN
    f.tsan = __tsan_create_fiber(0);
    char name[96];
    std::snprintf(name, sizeof name, "block (%u,%u,%u) thread (%u,%u,%u)", t.block->index.x, t.block->index.y,
                  t.block->index.z, f.thread_index.x, f.thread_index.y, f.thread_index.z);
    __tsan_set_fiber_name(f.tsan, name);
#endif
  }
  for (int64_t i = 0; i < S.n; ++i) S.runq.push_back(&S.fibers[reverse ? S.n - 1 - i : i]);
}

// Fiber stacks: mapped once, pooled across launches (under the launch mutex).
inline bool map_stack(FiberStack& s) {
  const size_t guard = static_cast<size_t>(sysconf(_SC_PAGESIZE));
  int flags = MAP_PRIVATE | MAP_ANONYMOUS;
#ifdef MAP_NORESERVE
  flags |= MAP_NORESERVE;
#endif
#ifdef MAP_STACK
  flags |= MAP_STACK;
#endif
  void* p = mmap(nullptr, guard + kFiberStackBytes, PROT_READ | PROT_WRITE, flags, -1, 0);
  if (p == MAP_FAILED) return false;
  if (mprotect(p, guard, PROT_NONE) != 0) {
    munmap(p, guard + kFiberStackBytes);
    return false;
  }
  s.map = static_cast<unsigned char*>(p);
  s.map_bytes = guard + kFiberStackBytes;
  s.lo = s.map + guard;
  s.bytes = kFiberStackBytes;
  return true;
}

constexpr size_t kPooledStacks = 4096;  // kept mapped between launches (a 16-block cluster of 1024 needs 16384)

inline bool take_stacks(std::vector<FiberStack>& pool, Scheduler& S) {
  for (int64_t i = 0; i < S.n; ++i) {
    if (!pool.empty()) {
      S.fibers[i].stack = pool.back();
      pool.pop_back();
    } else if (!map_stack(S.fibers[i].stack)) {
      for (int64_t j = 0; j < i; ++j) pool.push_back(S.fibers[j].stack);
      return false;
    }
  }
  return true;
}

inline void give_stacks(std::vector<FiberStack>& pool, Scheduler& S) {
  for (int64_t i = 0; i < S.n; ++i) {
    if (pool.size() < kPooledStacks) {
      pool.push_back(S.fibers[i].stack);
    } else {
      munmap(S.fibers[i].stack.map, S.fibers[i].stack.map_bytes);
    }
  }
}

// Runs the clusters one after another on this (the launching) thread, whose built-in variables and tl_state are
// restored afterwards. Cluster c of the kernel's launch number `seq` starts in reverse thread order when
// popcount(seq) + c is odd: the Thue-Morse sequence, which no arithmetic progression of launches (every launch, every
// other one, ...) keeps constant, so a test that alternates a right and a wrong launch still sees both orders.
inline void run_clusters(Launch& L, Scheduler& S, uint64_t seq) {
  IgnoreAccesses ig;  // the scheduler's own bookkeeping (see "sanitizer hooks")
  ThreadState* const saved_state = tl_state;
  const uint3 saved_thread = ::threadIdx, saved_block = ::blockIdx;
  const dim3 saved_block_dim = ::blockDim, saved_grid_dim = ::gridDim;
#ifdef CHARMLP_EMU_TSAN
  S.tsan_self = __tsan_get_current_fiber();
#endif
  ::blockDim = L.block;
  ::gridDim = L.grid;
  for (int64_t c = 0; c < L.clusters && !L.aborted.load(); ++c) {
    setup_cluster(L, S, c, ((std::popcount(seq) + static_cast<uint64_t>(c)) & 1) != 0);
    tsan_release(&S.start_sync);
    S.run();
    tsan_acquire(&S.exit_sync);
#ifdef CHARMLP_EMU_TSAN
    for (int64_t i = 0; i < S.n; ++i) __tsan_destroy_fiber(S.fibers[i].tsan);
#endif
  }
  tl_state = saved_state;
  ::threadIdx = saved_thread;
  ::blockIdx = saved_block;
  ::blockDim = saved_block_dim;
  ::gridDim = saved_grid_dim;
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
  const uint64_t seq = next_launch_number(kernel);
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
  Scheduler S;
  S.launch = &L;
  S.n = per_cluster * threads;
  S.fibers.reset(new Fiber[static_cast<size_t>(S.n)]);
  if (!take_stacks(runtime().stacks, S)) {
    return record(cudaErrorLaunchOutOfResources,
                  "charmlp_emu: could not map stacks for the " + std::to_string(S.n) + " threads of a cluster");
  }
  run_clusters(L, S, seq);
  give_stacks(runtime().stacks, S);
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
