#!/usr/bin/env python
"""Benchmark the fused charmlp ops against eager PyTorch and torch.compile, in one run.

For every op and size: inference forward (under torch.no_grad), forward with the graph recorded, backward and
forward+backward of the fused op, of the same computation in eager PyTorch, of that eager code under
torch.compile, and of F.linear_cross_entropy where the installed torch has it. Also the whole model's forward+backward at the seed's size: the seed's plain-PyTorch model
(charmlp_fast.reference) against embed_linear_tanh + linear_cross_entropy through autograd.

Timing: CUDA events on the GPU (the device is idle when the start event is recorded, so host-side launch
overhead counts, as it does in training), time.perf_counter on the CPU; the median over many repeats after a
warm-up. Inputs are seeded random values, never zeros, and each implementation's outputs and gradients are
checked against eager PyTorch before it is timed. The two forward passes differ for the fused output-layer op:
when a backward will follow (mean/sum), linear_cross_entropy computes the gradient in the same pass as the loss,
so its recorded forward carries most of the backward's work and its backward only scales; "infer" is the
forward alone. Peak memory (CUDA): torch.cuda.max_memory_allocated during
one forward+backward, above what was allocated before it.

    python benchmarks/bench_ops.py --device cuda
    python benchmarks/bench_ops.py --device cpu --ops elt --sizes seed,big --repeats 50

Writes <out>/bench_ops_<device>_<date>.json and .md (device name, torch version, date, command line).
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import re
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import machine  # noqa: E402
from charmlp_fast import ops, reference  # noqa: E402
from charmlp_fast.cli import thread_setting, threads_for  # noqa: E402

# Dimension names: B batch, T context, E embedding, H hidden, V vocabulary.
SIZES = {
    "seed": dict(B=32, V=27, E=10, T=3, H=200),  # the seed's training step
    "big": dict(B=65_536, V=27, E=10, T=3, H=200),  # big batch
    "word": dict(B=8_192, V=17_000, E=30, T=3, H=100),  # word level, as in Bengio et al. 2003
    "vocab": dict(B=4_096, V=131_072, E=10, T=3, H=256),  # large vocabulary
}
# On a CPU the (B, V) logits of the eager baselines of the output-layer ops would take minutes per case and
# GiBs at these sizes: shrink B (embed_linear_tanh runs at full size).
CPU_SHRINK = {("ce", "word"): dict(B=2_048), ("ce", "vocab"): dict(B=256),
              ("lce", "word"): dict(B=2_048), ("lce", "vocab"): dict(B=256)}

# (name substring, memory bandwidth B/s, FP32 FLOP/s) of the GPUs we know; first match wins.
GPU_PEAKS = [
    ("H200", 4.8e12, 67e12),
    ("H100 PCIe", 2.0e12, 51e12),
    ("H100 NVL", 3.9e12, 60e12),
    ("H100", 3.35e12, 67e12),  # SXM
    ("A100", 2.0e12, 19.5e12),
]

OPS = ("elt", "ce", "lce", "model")
PASSES = ("infer", "fwd", "bwd", "fwd+bwd")  # infer: forward under torch.no_grad()
FLOAT_BYTES = 4
INDEX_BYTES = 8


# ---- timing ------------------------------------------------------------------------------------------------
def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def measure(fn: Callable, setup: Callable | None, device: str, repeats: int, warmup: int, budget_s: float) -> dict:
    """Median time (us) of fn(setup()) over up to `repeats` calls (fewer once budget_s is spent); setup untimed."""
    for _ in range(warmup):
        fn(setup() if setup else None)
    sync(device)
    times = []
    t_begin = time.perf_counter()
    if device == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    for _ in range(repeats):
        state = setup() if setup else None
        if device == "cuda":
            torch.cuda.synchronize()
            start.record()
            out = fn(state)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) * 1e3)
        else:
            t0 = time.perf_counter()
            out = fn(state)
            times.append((time.perf_counter() - t0) * 1e6)
        del out, state
        if len(times) >= 5 and time.perf_counter() - t_begin > budget_s:
            break
    return {"us": statistics.median(times), "repeats": len(times)}


def peak_memory_mib(fn: Callable, device: str) -> float | None:
    """Extra CUDA memory at the peak of one call of fn, in MiB."""
    if device != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = fn(None)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    del out
    return peak / 2**20


def rel_error(a: torch.Tensor, e: torch.Tensor) -> float:
    a, e = a.detach().double(), e.detach().double()
    return ((a - e).abs().max() / e.abs().max().clamp_min(1e-30)).item() if e.numel() else 0.0


# ---- the cases ---------------------------------------------------------------------------------------------
class Case:
    """One op at one size: inputs, the implementations to compare, and the work it has to do."""

    def __init__(self, op: str, size: str, dims: dict, params: list, impls: dict, grad_out, work: dict):
        self.op, self.size, self.dims = op, size, dims
        self.params = params  # tensors that get gradients
        self.impls = impls  # name -> zero-argument function returning the output
        self.grad_out = grad_out  # incoming gradient for non-scalar outputs, else None
        self.work = work  # pass -> (bytes, flops) of the minimal data movement / arithmetic

    def infer(self, name):
        fn = self.impls[name]

        def run(_):
            with torch.no_grad():
                return fn()
        return run

    def fwd(self, name):
        return lambda _: self.impls[name]()

    def bwd(self, name):
        return lambda out: torch.autograd.grad(out, self.params, self.grad_out)

    def fwd_bwd(self, name):
        return lambda _: torch.autograd.grad(self.impls[name](), self.params, self.grad_out)


def compiled(fn: Callable) -> Callable:
    return torch.compile(fn, fullgraph=True, dynamic=False)


def elt_case(size: str, d: dict, device: str, use_compile: bool) -> Case:
    B, V, E, T, H = d["B"], d["V"], d["E"], d["T"], d["H"]
    K = T * E
    g = torch.Generator().manual_seed(0)
    idx = torch.randint(0, V, (B, T), generator=g).to(device)
    C = torch.randn(V, E, generator=g).to(device).requires_grad_()
    W1 = (torch.randn(K, H, generator=g) / math.sqrt(K)).to(device).requires_grad_()
    b1 = (torch.randn(H, generator=g) * 0.5).to(device).requires_grad_()
    grad_h = torch.randn(B, H, generator=g).to(device)

    def eager(idx, C, W1, b1):
        return torch.tanh(C[idx].view(B, K) @ W1 + b1)

    impls = {"fused": lambda: ops.embed_linear_tanh(idx, C, W1, b1), "eager": lambda: eager(idx, C, W1, b1)}
    if use_compile:
        eager_c = compiled(eager)
        impls["compile"] = lambda: eager_c(idx, C, W1, b1)
    params_bytes = (V * E + K * H + H) * FLOAT_BYTES
    fwd = (B * T * INDEX_BYTES + params_bytes + B * H * FLOAT_BYTES, 2 * B * K * H)
    bwd = (2 * B * H * FLOAT_BYTES + B * T * INDEX_BYTES + 2 * params_bytes, 4 * B * K * H)
    work = {"fwd": fwd, "bwd": bwd, "fwd+bwd": (fwd[0] + bwd[0], fwd[1] + bwd[1])}
    return Case("elt", size, d, [C, W1, b1], impls, grad_h, work)


def ce_case(size: str, d: dict, device: str, use_compile: bool) -> Case:
    B, V = d["B"], d["V"]
    g = torch.Generator().manual_seed(1)
    logits = (torch.randn(B, V, generator=g) * 2).to(device).requires_grad_()
    targets = torch.randint(0, V, (B,), generator=g).to(device)

    def eager(logits, targets):
        return F.cross_entropy(logits, targets)

    impls = {"fused": lambda: ops.cross_entropy(logits, targets), "eager": lambda: eager(logits, targets)}
    if use_compile:
        eager_c = compiled(eager)
        impls["compile"] = lambda: eager_c(logits, targets)
    # Memory floor: read the logits once (fwd), read them and write their gradient (bwd); a fused
    # forward+backward needs one read and one write.
    BV = B * V * FLOAT_BYTES
    work = {"fwd": (BV + B * INDEX_BYTES, 0), "bwd": (2 * BV + B * INDEX_BYTES, 0),
            "fwd+bwd": (2 * BV + B * INDEX_BYTES, 0)}
    return Case("ce", size, d, [logits], impls, None, work)


def lce_case(size: str, d: dict, device: str, use_compile: bool) -> Case:
    B, V, H = d["B"], d["V"], d["H"]
    g = torch.Generator().manual_seed(2)
    h = torch.randn(B, H, generator=g).tanh().to(device).requires_grad_()
    W2 = (torch.randn(H, V, generator=g) / math.sqrt(H)).to(device).requires_grad_()
    b2 = (torch.randn(V, generator=g) * 0.1).to(device).requires_grad_()
    targets = torch.randint(0, V, (B,), generator=g).to(device)

    def eager(h, W2, b2, targets):
        return F.cross_entropy(h @ W2 + b2, targets)

    impls = {"fused": lambda: ops.linear_cross_entropy(h, W2, b2, targets), "eager": lambda: eager(h, W2, b2, targets)}
    if use_compile:
        eager_c = compiled(eager)
        impls["compile"] = lambda: eager_c(h, W2, b2, targets)
    if hasattr(F, "linear_cross_entropy"):
        options = torch.nn.LinearCrossEntropyOptions() if hasattr(torch.nn, "LinearCrossEntropyOptions") else None
        kwargs = {"options": options} if options is not None else {}
        impls["torch_lce"] = lambda: F.linear_cross_entropy(h, W2.t(), targets, linear_bias=b2, **kwargs)
    params_bytes = (B * H + H * V + V) * FLOAT_BYTES
    work = {"fwd": (params_bytes + B * INDEX_BYTES, 2 * B * H * V),
            "bwd": (2 * params_bytes + B * INDEX_BYTES, 4 * B * H * V),
            "fwd+bwd": (2 * params_bytes + B * INDEX_BYTES, 6 * B * H * V)}
    return Case("lce", size, d, [h, W2, b2], impls, None, work)


def model_case(size: str, d: dict, device: str, use_compile: bool) -> Case:
    B, V, E, T, H = d["B"], d["V"], d["E"], d["T"], d["H"]
    params = [p.to(device).requires_grad_() for p in reference.init_params(V, T, E, H)]
    g = torch.Generator().manual_seed(3)
    X = torch.randint(0, V, (B, T), generator=g).to(device)
    Y = torch.randint(0, V, (B,), generator=g).to(device)
    C, W1, b1, W2, b2 = params

    def eager(params, X, Y):
        return reference.forward(params, X, Y)[1]

    def fused():
        return ops.linear_cross_entropy(ops.embed_linear_tanh(X, C, W1, b1), W2, b2, Y)

    impls = {"fused": fused, "eager": lambda: eager(params, X, Y)}
    if use_compile:
        eager_c = compiled(eager)
        impls["compile"] = lambda: eager_c(params, X, Y)
    # Both layers' products: forward x @ W1 and h @ W2; backward two products per layer.
    K = T * E
    params_bytes = (V * E + K * H + H + H * V + V) * FLOAT_BYTES
    macs = B * (K * H + H * V)
    fwd = (params_bytes + B * (T + 1) * INDEX_BYTES, 2 * macs)
    bwd = (2 * params_bytes + B * (T + 1) * INDEX_BYTES, 4 * macs)
    work = {"fwd": fwd, "bwd": bwd, "fwd+bwd": (fwd[0] + params_bytes, 6 * macs)}
    return Case("model", size, d, params, impls, None, work)


CASE_BUILDERS = {"elt": elt_case, "ce": ce_case, "lce": lce_case, "model": model_case}
# The registered kernels each op needs; an op whose kernels are not in this build is skipped with a reason.
REQUIRED_KERNELS = {
    "elt": ["embed_linear_tanh", "embed_linear_tanh_backward"],
    "ce": ["cross_entropy_forward", "cross_entropy_backward"],
    "lce": ["linear_cross_entropy_forward", "linear_cross_entropy_backward"],
    "model": ["embed_linear_tanh", "linear_cross_entropy_forward"],
}


def verify(case: Case) -> dict:
    """Worst relative error of each implementation's output and gradients against eager PyTorch
    (an exception's text where the implementation fails, e.g. an older torch's signature)."""
    ref_out = case.impls["eager"]()
    ref_grads = torch.autograd.grad(ref_out, case.params, case.grad_out)
    errors = {}
    for name, impl in case.impls.items():
        if name == "eager":
            continue
        try:
            out = impl()
            grads = torch.autograd.grad(out, case.params, case.grad_out)
        except Exception as e:  # noqa: BLE001 - reported, and the implementation is left out
            errors[name] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            continue
        errors[name] = max([rel_error(out, ref_out)] + [rel_error(a, e) for a, e in zip(grads, ref_grads)])
    return errors


# ---- reporting -----------------------------------------------------------------------------------------------
def device_peaks(device: str) -> tuple[str, float | None, float | None]:
    """Device name and its (bandwidth, FP32 rate) peaks. On a CPU: the peak FP32 rate of one core (a row's floor
    multiplies it by the row's threads) and the bandwidth of a large copy measured now (benchmarks/machine.py)."""
    if device != "cuda":
        return machine.cpu_name(), machine.measured_bandwidth(), machine.peak_fp32_flops(1)
    name = torch.cuda.get_device_name()
    for key, bw, flops in GPU_PEAKS:
        if key in name:
            return name, bw, flops
    return name, None, None


def peaks_line(device: str, bw: float | None, flops_rate: float | None) -> str:
    if bw is None or flops_rate is None:
        return "No floors: unknown device."
    if device != "cuda":
        return (f"Peaks used for the floors: {bw / 1e9:,.0f} GB/s (a copy measured at the start of this run), "
                f"{flops_rate / 1e9:,.0f} GFLOP/s FP32 per thread (FMA units x vector lanes x clock) x the row's "
                "threads.")
    return (f"Peaks used for the floors: {bw / 1e9:,.0f} GB/s, {flops_rate / 1e9:,.0f} GFLOP/s FP32 "
            "(the datasheet).")


def floor_and_rate(work: tuple[int, int] | None, us: float, bw: float | None, flops_rate: float | None):
    """(floor in us, achieved rate as text) for the bound that dominates: memory or arithmetic."""
    if not work or bw is None or flops_rate is None:
        return None, "-"
    nbytes, flops = work
    t_mem, t_flops = nbytes / bw, flops / flops_rate
    if t_flops > t_mem:
        rate = flops / (us * 1e-6)
        return t_flops * 1e6, f"{rate / 1e12:.2f} TFLOP/s" if rate >= 1e12 else f"{rate / 1e9:.1f} GFLOP/s"
    return t_mem * 1e6, f"{nbytes / (us * 1e-6) / 1e9:.0f} GB/s"


def fmt_us(x: float | None) -> str:
    return "-" if x is None else (f"{x:,.1f}" if x < 100 else f"{x:,.0f}")


def markdown_table(rows: list[dict]) -> str:
    impl_names = []
    for r in rows:
        for name in r["impls"]:
            if name not in impl_names:
                impl_names.append(name)
    head = (["op", "size", "pass", "threads"] + [f"{n} µs" for n in impl_names]
            + ["fused vs eager", "fused vs compile", "fused achieved", "floor µs", "peak MiB (" + "/".join(impl_names) + ")"])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        t = {n: r["impls"].get(n, {}).get("us") for n in impl_names}
        fused, eager, comp = t.get("fused"), t.get("eager"), t.get("compile")
        cells = [r["op"], r["size"], r["pass"], str(r.get("threads", "-"))] + [fmt_us(t[n]) for n in impl_names]
        cells.append(f"{eager / fused:.2f}x" if fused and eager else "-")
        cells.append(f"{comp / fused:.2f}x" if fused and comp else "-")
        cells.append(r.get("fused_rate", "-"))
        cells.append(fmt_us(r.get("floor_us")))
        mems = [r["impls"].get(n, {}).get("peak_mib") for n in impl_names]
        cells.append("/".join("-" if m is None else f"{m:,.1f}" for m in mems) if any(m is not None for m in mems) else "-")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ---- main ------------------------------------------------------------------------------------------------------
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--ops", default=",".join(OPS), help=f"comma-separated subset of {','.join(OPS)}")
    p.add_argument("--sizes", default=",".join(SIZES), help=f"comma-separated subset of {','.join(SIZES)}")
    p.add_argument("--repeats", type=int, default=None, help="timed calls per measurement (default 200 CUDA, 50 CPU)")
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--budget", type=float, default=3.0, help="seconds at most per measurement (>= 5 repeats)")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile baselines")
    p.add_argument("--threads", type=thread_setting, default="auto",
                   help="CPU intra-op threads: a number, or auto (default): per size, one when a training step of "
                        "that size is tiny, else torch's default (charmlp_fast.cli.threads_for)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = p.parse_args(argv)
    args.ops = [o for o in args.ops.split(",") if o]
    args.sizes = [s for s in args.sizes.split(",") if s]
    for o in args.ops:
        if o not in OPS:
            p.error(f"unknown op {o!r}; choose from {OPS}")
    for s in args.sizes:
        if s not in SIZES:
            p.error(f"unknown size {s!r}; choose from {list(SIZES)}")
    if args.repeats is None:
        args.repeats = 200 if args.device == "cuda" else 50
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda but no CUDA device is visible")
    return args


def drop_disagreeing(case, label: str, notes: list[str], tol: float = 1e-4) -> dict:
    """Check every implementation of a case against eager (verify) and remove those that fail or disagree beyond
    tol, with a note each: only agreeing implementations are timed. -> the errors of all."""
    errors = verify(case)
    for name, err in errors.items():
        if isinstance(err, str):
            note = f"{label}: {name} failed ({err}); not timed"
        elif err > tol:
            note = f"{label}: {name} disagrees with eager (max relative error {err:.2e}); not timed"
        else:
            print(f"{label}: {name} vs eager, max relative error {err:.2e} ok")
            continue
        print(note)
        notes.append(note)
        del case.impls[name]
    return errors


def time_passes(case, op: str, size: str, dims: dict, threads: int, errors: dict, args, bw: float,
                flops_rate: float) -> list[dict]:
    """One result row per pass of PASSES: every implementation of the case timed, the fused one against the floor."""
    device, rows = args.device, []
    for pass_name in PASSES:
        row = {"op": op, "size": size, "dims": dims, "pass": pass_name, "impls": {}, "threads": threads,
               "max_rel_error_vs_eager": errors}
        for name in case.impls:
            if pass_name == "infer":
                fn, setup = case.infer(name), None
            elif pass_name == "fwd":
                fn, setup = case.fwd(name), None
            elif pass_name == "bwd":
                fn, setup = case.bwd(name), case.fwd(name)
            else:
                fn, setup = case.fwd_bwd(name), None
            setup_call = (lambda s=setup: s(None)) if setup else None
            res = measure(fn, setup_call, device, args.repeats, args.warmup, args.budget)
            if pass_name == "fwd+bwd":
                res["peak_mib"] = peak_memory_mib(fn, device)
            row["impls"][name] = res
        fused_us = row["impls"]["fused"]["us"]
        work = case.work.get("fwd" if pass_name == "infer" else pass_name)
        floor, rate = floor_and_rate(work, fused_us, bw, flops_rate)
        row["floor_us"], row["fused_rate"] = floor, rate
        rows.append(row)
        summary = ", ".join(f"{n} {r['us']:.1f} us" for n, r in row["impls"].items())
        print(f"  {op:5s} {size:5s} {pass_name:7s} ({threads} thr): {summary}", flush=True)
    return rows


def write_results(out: Path, meta: dict, rows: list[dict], notes: list[str], table: str, peaks: str) -> Path:
    """<out>/bench_ops_<device>_<date>.json and .md; -> their common stem."""
    device, dev_name = meta["device"], meta["device_name"]
    out.mkdir(parents=True, exist_ok=True)
    tag = re.sub(r"[^A-Za-z0-9]+", "-", dev_name if device == "cuda" else "cpu").strip("-")
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    stem = out / f"bench_ops_{tag}_{stamp}"
    stem.with_suffix(".json").write_text(json.dumps({"meta": meta, "notes": notes, "results": rows}, indent=1))
    md = [f"# bench_ops: {dev_name} ({device})", "",
          f"torch {meta['torch']} (CUDA {meta['cuda']}), {meta['date']}, CPU threads {meta['cpu_threads']}, "
          f"load average {meta['load_average']}", "",
          f"`{meta['command']}`", "",
          "Median µs over up to %d repeats after %d warm-up calls; speed-ups are eager / fused and compile / fused; "
          "floor = max(bytes / bandwidth, FLOPs / FP32 rate) of the minimal work." % (meta["repeats"], meta["warmup"]),
          "", peaks, "",
          table, ""]
    if notes:
        md += ["Notes:", ""] + [f"- {n}" for n in notes] + [""]
    stem.with_suffix(".md").write_text("\n".join(md))
    return stem


def main(argv=None) -> int:
    args = parse_args(argv)
    device = args.device
    default_threads = torch.get_num_threads()
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    dev_name, bw, flops_rate = device_peaks(device)
    meta = {
        "device": device,
        "device_name": dev_name,
        "peak_bandwidth_Bps": bw,
        "peak_fp32_flops": flops_rate,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cpu_threads": args.threads,  # "auto": per size, in each result row
        # Other work on the machine skews CPU timings, multi-threaded eager ops most.
        "load_average": [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None,
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name] + sys.argv),
        "repeats": args.repeats,
        "warmup": args.warmup,
    }
    print(f"# bench_ops on {dev_name} ({device}), torch {torch.__version__}, {meta['date']}")
    print("  " + peaks_line(device, bw, flops_rate))
    rows, notes = [], []

    for op in args.ops:
        missing = [k for k in REQUIRED_KERNELS[op] if not ops.has_kernel(k, device)]
        if missing:
            note = f"{op}: skipped, no {device.upper()} kernel registered for " + ", ".join(f"charmlp::{k}" for k in missing)
            print(note)
            notes.append(note)
            continue
        sizes = ["seed"] if op == "model" else args.sizes
        if op == "model" and "seed" not in args.sizes:
            notes.append("model: run at the seed's size only")
        for size in sizes:
            dims = dict(SIZES[size])
            if device == "cpu" and (op, size) in CPU_SHRINK:
                dims.update(CPU_SHRINK[op, size])
                note = f"{op}/{size}: B shrunk to {dims['B']} on the CPU (the size's B = {SIZES[size]['B']})"
                print(note)
                notes.append(note)
            threads = threads_for(args.threads, dims["B"] * dims["H"] * (dims["T"] * dims["E"] + dims["V"]),
                                  default_threads)
            torch.set_num_threads(threads)
            size_flops = flops_rate * threads if device != "cuda" and flops_rate else flops_rate
            case = CASE_BUILDERS[op](size, dims, device, not args.no_compile)
            errors = drop_disagreeing(case, f"{op}/{size}", notes)
            if "fused" not in case.impls:
                continue
            rows += time_passes(case, op, size, dims, threads, errors, args, bw, size_flops)
            del case

    table = markdown_table(rows) if rows else "(nothing measured)"
    print()
    print(table)
    stem = write_results(Path(args.out), meta, rows, notes, table, peaks_line(device, bw, flops_rate))
    print(f"\nwrote {stem}.json and {stem}.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
