"""The CUDA emulator (csrc/emulation/cuda_emu.h): builds tests/emulation/emu_selftest.cpp with the host compiler,
plainly, under AddressSanitizer + UndefinedBehaviorSanitizer and under ThreadSanitizer, and runs it.

The self-test's kernels have known answers, or known bugs the emulator must expose (a missing __syncthreads or
__syncwarp in either thread order, a read before __pipeline_wait_prior, a device assert, a deadlock, shared-memory
limits, DSMEM misuse). A sanitizer
the toolchain cannot build or run is skipped with the reason. Needs g++ (CXX overrides) with C++20; no GPU.
"""
from __future__ import annotations

import functools
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SELFTEST = ROOT / "tests" / "emulation" / "emu_selftest.cpp"
HEADER = ROOT / "csrc" / "emulation" / "cuda_emu.h"
CXX = os.environ.get("CXX", "g++")
BASE_FLAGS = ["-std=c++20", "-O1", "-pthread", "-Wall", "-Wextra"]
SANITIZERS = {
    "plain": [],
    "asan_ubsan": ["-g", "-fsanitize=address,undefined", "-fno-sanitize-recover=undefined", "-fno-omit-frame-pointer"],
    "tsan": ["-g", "-fsanitize=thread"],
}
# The self-test's deliberate data races; everything else must be race-free under ThreadSanitizer.
RACY = ["race_block", "race_warp", "race_order", "cluster_misuse"]
RACE_FREE = [
    "block_reduce", "shuffle_forms", "partial_warps", "ballot", "atomics", "cluster_dsmem",
    "async_copy", "device_assert", "smem_limits", "warp_misuse", "deadlock", "host_state",
]
# Race-free, but too many threads for ThreadSanitizer (16384 fibers: it runs out of memory for their contexts).
NOT_UNDER_TSAN = ["big_cluster"]
# Sanitizer runtimes: fail loudly, and let ThreadSanitizer keep going after the first report.
RUN_ENV = {
    "ASAN_OPTIONS": "abort_on_error=0:detect_leaks=1",
    "UBSAN_OPTIONS": "print_stacktrace=1:halt_on_error=1",
    "TSAN_OPTIONS": "halt_on_error=0:report_signal_unsafe=0",
}
RUN_TIMEOUT_S = 120

pytestmark = pytest.mark.skipif(shutil.which(CXX) is None, reason=f"no host compiler {CXX!r} on PATH")


@functools.lru_cache(maxsize=None)
def _toolchain_supports(kind: str, tmp: str) -> str | None:
    """None when `kind` builds and runs a threaded program here, else why not."""
    probe = Path(tmp) / f"probe_{kind}.cpp"
    probe.write_text("#include <thread>\n"
                     "int main() { int x = 0; std::thread t([&] { x = 1; }); t.join(); return x - 1; }\n")
    exe = probe.with_suffix("")
    build = subprocess.run([CXX, *BASE_FLAGS, *SANITIZERS[kind], str(probe), "-o", str(exe)],
                           capture_output=True, text=True)
    if build.returncode != 0:
        return f"{CXX} cannot build with {' '.join(SANITIZERS[kind])}: {build.stderr.strip()[-300:]}"
    run = subprocess.run([str(exe)], capture_output=True, text=True, env={**os.environ, **RUN_ENV})
    if run.returncode != 0:
        return f"a {kind} program does not run here: {run.stderr.strip()[-300:]}"
    return None


@pytest.fixture(scope="module")
def build(tmp_path_factory):
    """build(kind) -> path of the self-test compiled with that sanitizer set (once per module)."""
    out = tmp_path_factory.mktemp("cuda_emu")
    built: dict[str, Path] = {}

    def get(kind: str) -> Path:
        if kind not in built:
            why = _toolchain_supports(kind, str(out))
            if why is not None:
                pytest.skip(why)
            exe = out / f"emu_selftest_{kind}"
            r = subprocess.run([CXX, *BASE_FLAGS, *SANITIZERS[kind], str(SELFTEST), "-o", str(exe)],
                               capture_output=True, text=True)
            assert r.returncode == 0, f"building the self-test ({kind}) failed:\n{r.stderr[-4000:]}"
            built[kind] = exe
        return built[kind]

    return get


def _run(exe: Path, *tests: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(exe), *tests], capture_output=True, text=True, timeout=RUN_TIMEOUT_S,
                          env={**os.environ, **RUN_ENV})


def _assert_all_pass(r: subprocess.CompletedProcess, tests: list[str]) -> None:
    report = f"stdout:\n{r.stdout}\nstderr:\n{r.stderr[-4000:]}"
    passed = set(re.findall(r"^PASS (\S+)$", r.stdout, re.M))
    assert passed == set(tests), f"not passed: {sorted(set(tests) - passed)}\n{report}"
    assert "DONE 0" in r.stdout and r.returncode == 0, report


def test_selftest_plain(build):
    r = _run(build("plain"))
    _assert_all_pass(r, RACE_FREE + NOT_UNDER_TSAN + RACY)
    # The self-test already fails when a missing barrier never shows; the counts are kept in the report.
    for name in ("race_block", "race_warp"):
        m = re.search(rf"^INFO {name}: wrong answer in (\d+) of (\d+)", r.stdout, re.M)
        assert m and int(m.group(1)) >= 1, r.stdout


def test_selftest_asan_ubsan(build):
    r = _run(build("asan_ubsan"))
    _assert_all_pass(r, RACE_FREE + NOT_UNDER_TSAN + RACY)
    assert "Sanitizer" not in r.stderr, r.stderr[-4000:]


def test_selftest_tsan_race_free(build):
    """The emulator's own synchronisation (barriers, warp exchange, abort, cluster setup) gives no race report."""
    r = _run(build("tsan"), *RACE_FREE)
    _assert_all_pass(r, RACE_FREE)
    assert "ThreadSanitizer" not in r.stderr, r.stderr[-4000:]


def test_selftest_tsan_reports_missing_syncthreads(build):
    """ThreadSanitizer, as the detector of last resort, names the kernel whose __syncthreads is missing."""
    r = _run(build("tsan"), "race_block")
    assert "WARNING: ThreadSanitizer: data race" in r.stderr, f"no race reported:\n{r.stderr[-4000:]}"
    assert "reverse_kernel" in r.stderr, r.stderr[-4000:]
    assert r.returncode != 0, "ThreadSanitizer reported a race but the process succeeded"


def test_forwarding_headers_and_warning_free(tmp_path):
    """A .cu-style file that includes the CUDA headers by their own names builds warning-free against
    csrc/emulation/include and runs; an nvcc-style build (no CHARMLP_EMULATE_CUDA) of those headers is refused."""
    src = tmp_path / "kernel.cpp"
    src.write_text(
        "#include <cassert>\n"
        "#include <cooperative_groups.h>\n"
        "#include <cuda_pipeline.h>\n"
        "#include <cuda_runtime.h>\n"
        "namespace cg = cooperative_groups;\n"
        "__global__ void __launch_bounds__(32) k(const float* __restrict__ in, float* out) {\n"
        "  CHARMLP_DYNAMIC_SHARED(float, s, 16);\n"
        "  __pipeline_memcpy_async(s + threadIdx.x, in + threadIdx.x, sizeof(float));\n"
        "  __pipeline_commit();\n"
        "  __pipeline_wait_prior(0);\n"
        "  cg::this_cluster().sync();\n"
        "  out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, s[threadIdx.x], 1);\n"
        "}\n"
        "int main() {\n"
        "  float in[32], out[32];\n"
        "  for (int i = 0; i < 32; ++i) in[i] = float(i);\n"
        "  if (charmlp_emu::launch(k, dim3(1), dim3(32), sizeof in, nullptr, in, out) != cudaSuccess) return 1;\n"
        "  for (int i = 0; i < 32; ++i) if (out[i] != float(i ^ 1)) return 2;\n"
        "  return 0;\n"
        "}\n")
    include = HEADER.parent / "include"
    exe = tmp_path / "kernel"
    flags = [*BASE_FLAGS, "-Werror", "-DCHARMLP_EMULATE_CUDA", f"-I{include}"]
    r = subprocess.run([CXX, *flags, str(src), "-o", str(exe)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-4000:]
    assert subprocess.run([str(exe)], timeout=RUN_TIMEOUT_S).returncode == 0
    r = subprocess.run([CXX, *BASE_FLAGS, f"-I{include}", "-fsyntax-only", str(src)], capture_output=True, text=True)
    assert r.returncode != 0 and "CHARMLP_EMULATE_CUDA builds only" in r.stderr, r.stderr[-4000:]
