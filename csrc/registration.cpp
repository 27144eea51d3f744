// The charmlp operator library: its schemas (csrc/schemas.h) and the Python module that loads it. Kernels register
// themselves per backend (TORCH_LIBRARY_IMPL for CPU, CUDA and Autograd) in the op-family files beside this one;
// fake (meta) kernels for torch.compile live in charmlp_fast/ops.py.
#include <Python.h>
#include <torch/library.h>

#include "schemas.h"

extern "C" {
// `import charmlp_fast._C` loads this shared library, which runs the static registrations below.
// The module itself is empty: the ops are reached through torch.ops.charmlp.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(charmlp, m) { charmlp::define_schemas(m); }
