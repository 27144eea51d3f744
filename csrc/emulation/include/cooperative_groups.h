// The CPU emulation's <cooperative_groups.h>: with -Icsrc/emulation/include, a .cu file's
// #include <cooperative_groups.h> gets cuda_emu.h, which provides what the kernels use of it.
#pragma once
#ifndef CHARMLP_EMULATE_CUDA
#error "csrc/emulation/include is for CHARMLP_EMULATE_CUDA builds only: nvcc has the CUDA toolkit's headers"
#endif
#include "../cuda_emu.h"
