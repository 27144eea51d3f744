// cuda_utils.cuh: what every CUDA file of charmlp_fast shares on the host side -- the runtime headers, the current
// stream and device properties, the one launch helper with its error check, and the registration of the kernels --
// so that the same .cu sources build two ways:
//   * with nvcc (the product, charmlp_fast._C): ATen's CUDA context; the kernels take CUDA tensors and register for
//     the CUDA dispatch key of the `charmlp` library.
//   * with the host compiler and CHARMLP_EMULATE_CUDA (tests only, charmlp_fast._C_emu, csrc/emulation/): the
//     kernels run on the CPU on csrc/emulation/cuda_emu.h, take CPU tensors and register for the CPU key of the
//     test-only library `charmlp_emu`, whose schemas are charmlp's (csrc/schemas.h). Everything host-side -- grid
//     sizes, dtype dispatch, path choice, workspaces, fall-backs -- is the code the GPU runs; ATen ops inside the
//     launchers (cuBLAS GEMMs on the GPU) run as CPU ops.
// Include it first in every .cu file: the emulator must come after torch's headers that define CUDA_KERNEL_ASSERT,
// and before the op headers whose device helpers use __device__.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/Device.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <cassert>
#include <cstdint>
#include <utility>

#ifndef CHARMLP_EMULATE_CUDA
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#endif
#include "emulation/cuda_emu.h"  // the emulator, or (nvcc) charmlp_emu::launch and CHARMLP_DYNAMIC_SHARED only

#include "common/ceil_div.h"

namespace charmlp::cuda {

#ifdef CHARMLP_EMULATE_CUDA
// One emulated device (H100/H200 figures), one implicit stream: every emulated launch is synchronous.
inline cudaStream_t current_stream() { return nullptr; }

inline const cudaDeviceProp* device_properties() {
  static const cudaDeviceProp prop = [] {
    cudaDeviceProp p;
    cudaGetDeviceProperties(&p, 0);
    return p;
  }();
  return &prop;
}

// The tensors the kernels of this build read and write: CPU memory.
inline bool on_kernel_device(const at::Tensor& t) { return t.is_cpu(); }

struct DeviceGuard {
  explicit DeviceGuard(c10::Device) {}
};

#define CHARMLP_CUDA_CHECK(expr)                                                                       \
  do {                                                                                                 \
    const cudaError_t charmlp_err_ = (expr);                                                           \
    TORCH_CHECK(charmlp_err_ == cudaSuccess, "CUDA error (emulated): ", cudaGetErrorName(charmlp_err_), \
                ": ", cudaGetErrorString(charmlp_err_));                                               \
  } while (0)

// Registers a .cu file's kernels: for CPU tensors in the test-only library.
#define CHARMLP_REGISTER_CUDA_KERNELS(m) TORCH_LIBRARY_IMPL(charmlp_emu, CPU, m)
#else
inline cudaStream_t current_stream() { return at::cuda::getCurrentCUDAStream(); }
inline const cudaDeviceProp* device_properties() { return at::cuda::getCurrentDeviceProperties(); }
inline bool on_kernel_device(const at::Tensor& t) { return t.is_cuda(); }
using DeviceGuard = c10::cuda::CUDAGuard;

#define CHARMLP_CUDA_CHECK(expr) C10_CUDA_CHECK(expr)
#define CHARMLP_REGISTER_CUDA_KERNELS(m) TORCH_LIBRARY_IMPL(charmlp, CUDA, m)
#endif

// Every launch of the project: kernel<<<grid, block, smem_bytes, stream>>>(args...) and the launch check on the GPU,
// the emulator's launch (which fails as the GPU would: block and shared-memory limits, device asserts) on the CPU.
template <typename... Params, typename... Args>
void launch(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem_bytes, cudaStream_t stream,
            Args&&... args) {
  CHARMLP_CUDA_CHECK(charmlp_emu::launch(kernel, grid, block, smem_bytes, stream, std::forward<Args>(args)...));
}

using charmlp::ceil_div;  // common/ceil_div.h: host and device

}  // namespace charmlp::cuda
