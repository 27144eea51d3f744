"""Build charmlp_fast._C from csrc/.

C++ sources are always built. CUDA sources (csrc/**/*.cu) are built when CHARMLP_CUDA=1 asks for them (CI does, so
that a .cu that does not compile never lands, GPU or not), or, by default (CHARMLP_CUDA=auto), when a GPU is
visible and the installed torch is a CUDA build with nvcc found (CUDA_HOME): compiling kernels that cannot run
costs a CPU-only machine most of its set-up time. CHARMLP_CUDA=0 never builds them.

`python setup.py --plan` prints one line saying what a build would compile (the Makefile shows it before
building, since pip hides the build's output).

charmlp_fast._C_emu, for the tests only: the same CUDA sources compiled with the host compiler on the CPU emulator
(csrc/emulation/, csrc/cuda/cuda_utils.cuh). CHARMLP_EMULATOR=1 builds it beside _C, CHARMLP_EMULATOR=only builds it
alone (`make test` does, in its own step); CHARMLP_EMULATOR_SANITIZE=address,undefined (or thread) builds it
instrumented, as charmlp_fast._C_emu_<sanitizers> (CI's sanitizer job).
"""
import glob
import os
import sys
from pathlib import Path

from setuptools import setup
import torch
from torch.utils import cpp_extension

ROOT = Path(__file__).parent
CSRC = ROOT / "csrc"
DEFAULT_CUDA_ARCHS = "8.0;9.0+PTX"


def want_cuda() -> bool:
    env = os.environ.get("CHARMLP_CUDA", "auto").lower()
    if env not in ("0", "1", "auto"):
        sys.exit(f"CHARMLP_CUDA must be 0, 1 or auto, got {env!r}")
    if env == "0":
        return False
    can_compile = torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None
    if env == "1" and not can_compile:
        sys.exit(
            f"CHARMLP_CUDA=1 but torch.version.cuda={torch.version.cuda!r} and "
            f"CUDA_HOME={cpp_extension.CUDA_HOME!r}: install a CUDA build of torch and set CUDA_HOME"
        )
    return env == "1" or (can_compile and torch.cuda.is_available())


def plan() -> str:
    """What a build compiles, and roughly how long it takes on a 2-core machine (see benchmarks/RESULTS.md)."""
    if not want_cuda():
        why = "CHARMLP_CUDA=0" if os.environ.get("CHARMLP_CUDA") == "0" else "no GPU visible; CHARMLP_CUDA=1 adds them"
        return f"charmlp_fast._C: C++ kernels only ({why}), about 3 minutes on 2 cores"
    archs = os.environ.get("TORCH_CUDA_ARCH_LIST", DEFAULT_CUDA_ARCHS)
    return (f"charmlp_fast._C: C++ and CUDA kernels (sm {archs}), about 8 minutes on 2 cores, "
            "less with fewer architectures (TORCH_CUDA_ARCH_LIST) or more cores (MAX_JOBS)")


def cuda_include_dirs() -> list[str]:
    """Headers torch's CUDA build includes (cuBLAS, cuSPARSE, ...) live in the pip 'nvidia' packages,
    not in a toolkit that may be older or newer than torch's; put them on the include path."""
    dirs = []
    try:
        import nvidia  # namespace package shipped with the CUDA build of torch

        for base in nvidia.__path__:
            dirs += sorted(glob.glob(os.path.join(base, "cu*", "include")))
            dirs += sorted(glob.glob(os.path.join(base, "*", "include")))
    except ImportError:
        pass
    return [d for d in dict.fromkeys(dirs) if os.path.isdir(d)]


def emulator_setting() -> str:
    env = os.environ.get("CHARMLP_EMULATOR", "0").lower()
    if env not in ("0", "1", "only"):
        sys.exit(f"CHARMLP_EMULATOR must be 0, 1 or only, got {env!r}")
    return env


def emulated_extension():
    """The CUDA kernels built for the CPU emulator: a test-only module (see the top of this file)."""
    sanitize = os.environ.get("CHARMLP_EMULATOR_SANITIZE", "")
    name = "charmlp_fast._C_emu" + ("_" + sanitize.replace(",", "_") if sanitize else "")
    flags = ["-O1" if sanitize else "-O2", "-pthread", "-fvisibility=hidden", "-Wno-unknown-pragmas"]
    link = ["-pthread"]
    if sanitize:
        flags += ["-g", "-fno-omit-frame-pointer", f"-fsanitize={sanitize}"]
        link += [f"-fsanitize={sanitize}"]
    return cpp_extension.CppExtension(
        name,
        sorted(str(p.relative_to(ROOT)) for p in (CSRC / "emulation").rglob("*.cpp")),
        include_dirs=[str(CSRC), str(CSRC / "emulation" / "include")],
        define_macros=[("CHARMLP_EMULATE_CUDA", None), ("WITH_CUDA", None)],
        extra_compile_args={"cxx": flags},
        extra_link_args=link,
    )


def extensions():
    emulator = emulator_setting()
    if emulator == "only":
        return [emulated_extension()]
    return product_extensions() + ([emulated_extension()] if emulator == "1" else [])


def product_sources(suffix: str) -> list[str]:
    """Every csrc/**/*<suffix> of the product: all but the emulator's own sources."""
    return sorted(str(p.relative_to(ROOT)) for p in CSRC.rglob(f"*{suffix}") if "emulation" not in p.parts)


def product_extensions():
    sources = product_sources(".cpp")
    # No -std flag: torch.utils.cpp_extension picks the standard the installed torch needs (C++20 from 2.13 on).
    # -fopenmp: at::parallel_for is a header template; with torch's OpenMP backend it only runs in parallel when the
    # extension itself is compiled and linked with OpenMP.
    openmp = [] if sys.platform == "darwin" else ["-fopenmp"]
    cxx_flags = ["-O3", *openmp]
    if want_cuda():
        # sm_80 (A100) and sm_90 (H100/H200) unless the user chose otherwise, plus sm_90 PTX so that newer GPUs
        # (Blackwell) JIT-compile the kernels instead of failing with "no kernel image".
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_CUDA_ARCHS)
        sources += product_sources(".cu")
        return [
            cpp_extension.CUDAExtension(
                "charmlp_fast._C",
                sources,
                include_dirs=[str(CSRC)] + cuda_include_dirs(),
                define_macros=[("WITH_CUDA", None)],
                extra_link_args=openmp,
                extra_compile_args={
                    "cxx": cxx_flags,
                    # No --use_fast_math: tanh/exp must stay within 1e-5 of the float64 reference.
                    "nvcc": ["-O3", "-lineinfo", "--expt-relaxed-constexpr"],
                },
            )
        ]
    return [
        cpp_extension.CppExtension(
            "charmlp_fast._C",
            sources,
            include_dirs=[str(CSRC)],
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=openmp,
        )
    ]


if sys.argv[1:] == ["--plan"]:
    print(plan())
    sys.exit(0)

setup(
    ext_modules=extensions(),
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
)
