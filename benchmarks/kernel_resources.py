#!/usr/bin/env python
"""Static check of the CUDA kernels' resources on Hopper (sm_90), from ptxas, with no GPU.

Compiles every csrc/**/*.cu the way the real build does (setup.py's include dirs and nvcc flags, the flags and
include paths torch.utils.cpp_extension adds, -DWITH_CUDA, C++20), but for sm_90 only and only as far as a cubin,
with ptxas's resource report on. What that shows, and nothing short of ptxas can show without a GPU:

  * registers per thread: the occupancy of each kernel, and whether __launch_bounds__ squeezed it;
  * spill stores and loads: register spills to local memory. The persistent training kernel
    (sgd_train_persistent_kernel) does a whole run in one launch, so a spill there costs on every step of every
    model: any spill in any of its instantiations fails the check;
  * static shared memory (__shared__ arrays): more than 48 KiB per block can never launch; fails the check
    (ptxas rejects it too; the line here names the kernel and its size).
    Dynamic shared memory (extern __shared__, sized at launch) is not in the cubin and not counted;
  * the stack frame (local arrays, spills, calls that were not inlined).

Fails (exit 1) with one line per violation: a spilling sgd_train_persistent_kernel, a kernel over the static
shared-memory limit, a .cu that does not compile (with the tail of nvcc's errors) or a compile that timed out.
Writes the table to --out and prints it.

    CUDA_HOME=/usr/local/cuda python benchmarks/kernel_resources.py
    python benchmarks/kernel_resources.py --out /tmp/kr.txt --jobs 4
    python benchmarks/kernel_resources.py --sources /tmp/my_copy.cu   # check other files than csrc/**/*.cu

Compiles run in parallel (--jobs, default $MAX_JOBS or 2), each under --timeout seconds.
"""
from __future__ import annotations

import argparse
import ast
import glob
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

# Without a GPU, cpp_extension warns on import that it found no CUDA runtime: expected here, ptxas needs none.
logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
from torch.utils import cpp_extension  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CSRC = ROOT / "csrc"
ARCH = "sm_90"
STATIC_SMEM_LIMIT = 48 * 1024  # bytes of static __shared__ per block, on every architecture
NO_SPILL_KERNEL = "sgd_train_persistent_kernel"
NEAR = 0.75  # a note when a kernel uses more than this fraction of the static shared-memory limit
ERROR_TAIL_LINES = 15

# ptxas -v (on stderr), per entry function:
#   ptxas info    : Compiling entry function '_Z...' for 'sm_90'
#   ptxas info    : Function properties for _Z...
#       0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
#   ptxas info    : Used 40 registers, used 1 barriers, 32 bytes smem, 380 bytes cmem[0]
# "Function properties" also comes for device functions that were not inlined; those are not kernels.
ENTRY_RE = re.compile(r"Compiling entry function '([^']+)' for '(sm_\w+)'")
PROPS_RE = re.compile(r"Function properties for (\S+)")
FRAME_RE = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
USED_RE = re.compile(r"Used (\d+) registers")
SMEM_RE = re.compile(r"(\d+) bytes smem")
PTXAS_INFO_RE = re.compile(r"^(ptxas info|\s+\d+ bytes stack frame)")


@dataclass
class Kernel:
    file: str
    mangled: str
    name: str = ""
    regs: int = 0
    smem: int = 0
    spill_stores: int = 0
    spill_loads: int = 0
    stack: int = 0


@dataclass
class Compile:
    file: str
    rc: int | None  # None: timed out
    stderr: str
    seconds: float


# ---- the flags of the real build ----------------------------------------------------------------------------
def setup_py_settings() -> tuple[list[str], list[str]]:
    """setup.py's nvcc flags and cuda_include_dirs(), read from its source (importing it would run setup())."""
    tree = ast.parse((ROOT / "setup.py").read_text())
    nvcc = [v for node in ast.walk(tree) if isinstance(node, ast.Dict)
            for k, v in zip(node.keys, node.values) if isinstance(k, ast.Constant) and k.value == "nvcc"]
    funcs = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "cuda_include_dirs"]
    if len(nvcc) != 1 or len(funcs) != 1:
        sys.exit("kernel_resources: setup.py no longer has one 'nvcc' flag list and a cuda_include_dirs(); "
                 "update benchmarks/kernel_resources.py to match the build")
    namespace = {"glob": glob, "os": os}
    exec(compile(ast.Module(body=funcs, type_ignores=[]), str(ROOT / "setup.py"), "exec"), namespace)
    return list(ast.literal_eval(nvcc[0])), namespace["cuda_include_dirs"]()


def torch_cuda_include_paths() -> list[str]:
    try:
        return cpp_extension.include_paths(device_type="cuda")
    except TypeError:  # torch before 2.6
        return cpp_extension.include_paths(cuda=True)


def include_dirs(extra: list[str]) -> list[str]:
    """In the order of the real build: the extension's, torch's, then Python's (added by setuptools)."""
    python = [sysconfig.get_path("include"), os.path.join(sys.exec_prefix, "include")]
    dirs = [str(CSRC), *extra, *torch_cuda_include_paths(), *python]
    return [d for d in dict.fromkeys(dirs) if os.path.isdir(d)]


def nvcc_command(nvcc: str) -> list[str]:
    """What torch.utils.cpp_extension runs for a .cu of charmlp_fast._C (ninja build), but -cubin for ARCH only;
    the source and output follow."""
    setup_flags, setup_includes = setup_py_settings()
    cmd = [nvcc, "-cubin", f"-arch={ARCH}", "-Xptxas", "-v", "-DWITH_CUDA"]
    cmd += [f"-I{d}" for d in include_dirs(setup_includes)]
    cmd += [*cpp_extension.COMMON_NVCC_FLAGS, "--compiler-options", "-fPIC", *setup_flags]
    # Torch 2.14 no longer passes the ABI macro; it matches what torch was built with either way.
    cmd += ["-DTORCH_API_INCLUDE_EXTENSION_H", "-DTORCH_EXTENSION_NAME=_C",
            f"-D_GLIBCXX_USE_CXX11_ABI={int(torch.compiled_with_cxx11_abi())}", "-std=c++20"]
    if os.environ.get("CC"):
        cmd += ["-ccbin", os.environ["CC"]]
    return cmd


def find_nvcc() -> str:
    home = cpp_extension.CUDA_HOME
    nvcc = os.path.join(home, "bin", "nvcc") if home else shutil.which("nvcc")
    if not nvcc or not os.path.exists(nvcc):
        sys.exit(f"kernel_resources: nvcc not found (CUDA_HOME={home!r}); set CUDA_HOME to a CUDA toolkit")
    return nvcc


# ---- compiling and parsing ----------------------------------------------------------------------------------
def run_with_timeout(cmd: list[str], timeout: float) -> tuple[int | None, str]:
    """(exit status, stderr); None when killed after `timeout` seconds (with cicc/ptxas, its process group)."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
        return proc.returncode, out + err
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        return None, out + err


def compile_one(cmd: list[str], source: Path, tmp: Path, timeout: float) -> Compile:
    t0 = time.perf_counter()
    rc, stderr = run_with_timeout([*cmd, str(source), "-o", str(tmp / f"{source.stem}.cubin")], timeout)
    return Compile(display_name(source), rc, stderr, time.perf_counter() - t0)


def parse_ptxas(text: str, file: str) -> list[Kernel]:
    kernels: dict[str, Kernel] = {}
    cur = None
    for line in text.splitlines():
        if m := ENTRY_RE.search(line):
            cur = kernels.setdefault(m[1], Kernel(file, m[1]))
        elif m := PROPS_RE.search(line):
            cur = kernels.get(m[1])  # None for a device function
        elif cur and (m := FRAME_RE.search(line)):
            cur.stack, cur.spill_stores, cur.spill_loads = map(int, m.groups())
        elif cur and (m := USED_RE.search(line)):
            cur.regs = int(m[1])
            cur.smem = int(s[1]) if (s := SMEM_RE.search(line)) else 0
    return list(kernels.values())


def demangle(names: list[str]) -> list[str]:
    cxxfilt = shutil.which("c++filt")
    if not cxxfilt or not names:
        return names
    res = subprocess.run([cxxfilt], input="\n".join(names), capture_output=True, text=True)
    out = res.stdout.splitlines()
    return out if res.returncode == 0 and len(out) == len(names) else names


def short_name(demangled: str) -> str:
    """'void charmlp::(anonymous namespace)::k<4, long>(charmlp::L, ...)' -> 'k<4, long>'."""
    name = demangled.removeprefix("void ")
    if name.endswith(")"):  # drop the argument list: back to the '(' that matches the last ')'
        depth = 0
        for i in range(len(name) - 1, -1, -1):
            depth += {")": 1, "(": -1}.get(name[i], 0)
            if depth == 0:
                name = name[:i]
                break
    name = name.replace("(anonymous namespace)::", "")
    return re.sub(r"\b[A-Za-z_]\w*::", "", name)  # namespaces and enclosing classes


def display_name(source: Path) -> str:
    try:
        return str(source.resolve().relative_to(ROOT))
    except ValueError:
        return str(source)


# ---- checks and the table -----------------------------------------------------------------------------------
def violations(kernels: list[Kernel], compiles: list[Compile], timeout: float, default_sources: bool) -> list[str]:
    errors = []
    for k in kernels:
        if NO_SPILL_KERNEL in k.name and (k.spill_stores or k.spill_loads):
            errors.append(f"{k.file}: {k.name} spills ({k.spill_stores} bytes stores, {k.spill_loads} bytes "
                          f"loads); {NO_SPILL_KERNEL} must keep its state in registers")
        if k.smem > STATIC_SMEM_LIMIT:
            errors.append(f"{k.file}: {k.name} uses {k.smem} bytes of static shared memory, over the "
                          f"{STATIC_SMEM_LIMIT} bytes (48 KiB) limit; use extern __shared__ and opt in")
    for c in compiles:
        if c.rc is None:
            errors.append(f"{c.file}: nvcc timed out after {timeout:.0f} s (--timeout)")
        elif c.rc != 0:
            tail = [ln for ln in c.stderr.splitlines() if ln.strip() and not PTXAS_INFO_RE.match(ln)]
            errors.append(f"{c.file}: nvcc failed (exit {c.rc}):\n    " + "\n    ".join(tail[-ERROR_TAIL_LINES:]))
    if default_sources and all(c.rc == 0 for c in compiles) and not any(NO_SPILL_KERNEL in k.name for k in kernels):
        errors.append(f"no instantiation of {NO_SPILL_KERNEL} found in csrc/**/*.cu: nothing to check for spills")
    return errors


def notes(kernels: list[Kernel]) -> list[str]:
    out = []
    for k in kernels:
        if NEAR * STATIC_SMEM_LIMIT < k.smem <= STATIC_SMEM_LIMIT:
            out.append(f"{k.file}: {k.name}: {k.smem} bytes static shared memory, "
                       f"{100 * k.smem / STATIC_SMEM_LIMIT:.0f} % of the 48 KiB limit")
        if (k.spill_stores or k.spill_loads) and NO_SPILL_KERNEL not in k.name:  # that one is an error
            out.append(f"{k.file}: {k.name} spills {k.spill_stores} / {k.spill_loads} bytes (stores / loads)")
    return out


def table(kernels: list[Kernel]) -> str:
    header = ("file", "kernel", "regs", "smem", "spill_st", "spill_ld", "stack")
    rows = [(k.file, k.name, k.regs, k.smem, k.spill_stores, k.spill_loads, k.stack) for k in kernels]
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]

    def fmt(r):
        cells = [str(v).ljust(w) if i < 2 else str(v).rjust(w) for i, (v, w) in enumerate(zip(r, widths))]
        return "  ".join(cells).rstrip()
    return "\n".join([fmt(header), *map(fmt, rows)])


def nvcc_version(nvcc: str) -> str:
    out = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout
    m = re.search(r"release (\S+),", out)
    return m[1] if m else "?"


def main() -> int:
    summary, details = __doc__.split("\n\n", 1)
    p = argparse.ArgumentParser(description=summary, epilog=details,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(ROOT / "build" / f"kernel_resources_{ARCH.replace('_', '')}.txt"),
                   help="where the table goes (default: build/kernel_resources_sm90.txt)")
    p.add_argument("--sources", nargs="+", type=Path, help="the .cu files to check (default: csrc/**/*.cu)")
    p.add_argument("--jobs", type=int, default=int(os.environ.get("MAX_JOBS") or 2),
                   help="compiles at a time (default: $MAX_JOBS or 2)")
    p.add_argument("--timeout", type=float, default=900, help="seconds per compile (default: 900)")
    args = p.parse_args()

    sources = args.sources or sorted(p for p in CSRC.rglob("*.cu") if "emulation" not in p.parts)
    nvcc = find_nvcc()
    cmd = nvcc_command(nvcc)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="kernel_resources_") as tmp, \
            ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        compiles = list(pool.map(lambda s: compile_one(cmd, s, Path(tmp), args.timeout), sources))
    wall = time.perf_counter() - t0

    kernels = [k for c in compiles for k in parse_ptxas(c.stderr, c.file)]
    for k, full in zip(kernels, demangle([k.mangled for k in kernels])):
        k.name = short_name(full)
    kernels.sort(key=lambda k: (k.file, k.name))
    per_file = ", ".join(f"{Path(c.file).name} {c.seconds:.0f} s" for c in compiles)
    lines = [f"# ptxas resource usage, {ARCH}, nvcc {nvcc_version(nvcc)}, torch {torch.__version__}: "
             f"{len(kernels)} kernels from {len(sources)} file(s) in {wall:.0f} s ({per_file})",
             "# regs per thread; smem = static shared memory, spill_st / spill_ld / stack in bytes",
             table(kernels)]
    lines += [f"note: {n}" for n in notes(kernels)]
    errors = [f"error: {e}" for e in violations(kernels, compiles, args.timeout, args.sources is None)]

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines + errors) + "\n")
    print("\n".join(lines), flush=True)
    if errors:
        print("\n".join(errors), file=sys.stderr, flush=True)
    print(f"wrote {out}" + (f"; {len(errors)} violation(s)" if errors else "; no violations"))
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
