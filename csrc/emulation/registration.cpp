// charmlp_fast._C_emu, a test-only module: the CUDA kernels of csrc/**/*.cu compiled with the host compiler on the
// emulator (cuda_emu.h), registered for CPU tensors in the library `charmlp_emu`, which has charmlp's schemas.
// tests/emulated_cuda.py routes charmlp's ops to it, so that the CUDA tests run, unchanged, on the CPU.
// The module is built -fvisibility=hidden, so that its copies of the kernels and helpers never bind to _C's.
#include <Python.h>
#include <c10/macros/Macros.h>
#include <torch/library.h>

#include "schemas.h"

#define CHARMLP_CAT_(a, b) a##b
#define CHARMLP_CAT(a, b) CHARMLP_CAT_(a, b)

// TORCH_EXTENSION_NAME is _C_emu, or _C_emu_<sanitizers> for an instrumented build (setup.py).
PyMODINIT_FUNC CHARMLP_CAT(PyInit_, TORCH_EXTENSION_NAME)(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, C10_STRINGIZE(TORCH_EXTENSION_NAME), nullptr, -1,
                                          nullptr};
  return PyModule_Create(&module_def);
}

TORCH_LIBRARY(charmlp_emu, m) { charmlp::define_schemas(m); }
