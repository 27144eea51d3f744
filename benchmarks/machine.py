"""What the benchmarks need to know about the CPU they run on: its name, clock and peak FP32 rate, and a measured
memory bandwidth, so that CPU results can be set against a floor as the GPU ones are; the git revision that ran, and
where a report is written."""
from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
import time
from pathlib import Path

import torch


def _cpuinfo(key: str) -> str | None:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(key):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def cpu_name() -> str:
    """Model name and core count, e.g. 'Intel(R) Xeon(R) Processor (2 cores)'."""
    return f"{_cpuinfo('model name') or platform.processor() or platform.machine()} ({os.cpu_count()} cores)"


def cpu_ghz() -> float:
    """The clock /proc/cpuinfo reports (nominal on most VMs); 2.5 GHz where it reports none."""
    mhz = _cpuinfo("cpu MHz")
    return float(mhz) / 1000 if mhz else 2.5


def cpu_isa() -> str:
    """The widest vector ISA torch's own CPU kernels use on the running machine: 'AVX512', 'AVX2' or 'DEFAULT'
    (SSE / NEON)."""
    return torch.backends.cpu.get_cpu_capability()


def peak_fp32_flops(threads: int = 1) -> float:
    """Peak FP32 FLOP/s of `threads` cores: two FMA units of the ISA's width per core (one multiply and one add
    per lane-cycle without FMA), at cpu_ghz()."""
    isa = cpu_isa()
    lanes = {"AVX512": 16, "AVX2": 8}.get(isa, 4)
    per_cycle = 2 * lanes * 2 if isa in ("AVX512", "AVX2") else 2 * lanes
    return threads * per_cycle * cpu_ghz() * 1e9


def measured_bandwidth(nbytes: int = 1 << 28, repeats: int = 5) -> float:
    """Bytes/s of a large tensor copy (read + write, best of `repeats`) with torch's current thread count: what
    memory-bound kernels can reach on the running machine, not the DRAM datasheet figure."""
    src = torch.rand(nbytes // 4)
    dst = torch.empty_like(src)
    dst.copy_(src)  # first touch of dst's pages
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - t0)
    return 2 * nbytes / best


def git_rev() -> str:
    """The short git revision of the checkout the benchmark runs from ("unknown" outside one)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], cwd=root, text=True).strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def write_report(out_dir: str | os.PathLike, prefix: str, report: dict, markdown: str) -> Path:
    """The benchmark's report as <prefix>_<date>.json (report) and .md (markdown) in out_dir, printing where."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"{prefix}_{datetime.datetime.now().strftime('%Y%m%d_%H%M%S')}"
    stem.with_suffix(".json").write_text(json.dumps(report, indent=2))
    stem.with_suffix(".md").write_text(markdown)
    print(f"wrote {stem}.json and .md")
    return stem
