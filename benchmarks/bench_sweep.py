"""Sweep benchmark: M models in one ops.sgd_train call, against one model at a time and against torch.func.

M same-sized models trained side by side in one call, against training them one at a time and against the usual
PyTorch way of batching models (torch.func), at the seed's size (names.txt, V 27, T 3, E 10, H 200, batch 32, lr 0.1
then 0.01 from half the steps).

Variants, for each M of --models:
  sweep          one ops.sgd_train call per chunk of --chunk steps over M models (seeds 1..M, initialised as
                 CharMLP(seed=s)), with torch's default intra-op threads (--threads overrides): what a sweep of M
                 configs of one shape costs.
  one at a time  what running the trainer once per config costs in its training loop: one model (M = 1) with the
                 thread count the trainer picks for it (cli.threads_for("auto", ...): one at the seed's size), timed
                 once and multiplied by M.
  torch.func     torch.func.stack_module_state + vmap(grad(functional_call)) over M CharMLP(kernels="reference"),
                 plain SGD, per-model torch.randint minibatches; eager on the CPU, on CUDA the step captured in one
                 CUDA graph and replayed; same threads as the sweep. Timed on --baseline-steps steps, extrapolated.

Each variant is warmed up by a short call with learning rate 0 (parameters unchanged) before it is timed. A
measurement stops after the first chunk that takes it past --max-seconds: its time is then extrapolated to --steps,
and labelled so. Speed-ups are ratios of model-steps per second (sweep over the other).

Writes bench_sweep_<device>_<date>.{json,md} into --out with the device name, torch version, date and command.

    python benchmarks/bench_sweep.py --device cpu
    python benchmarks/bench_sweep.py --device cuda --models 1,8,32,128,512
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import machine  # noqa: E402
from benchmarks.graphs import capture  # noqa: E402
from charmlp_fast import reference  # noqa: E402
from charmlp_fast.cli import intra_op_threads, step_work, threads_for  # noqa: E402
from charmlp_fast.config import TrainConfig  # noqa: E402
from charmlp_fast.data import load_corpus_for  # noqa: E402
from charmlp_fast.model import CharMLP  # noqa: E402
from charmlp_fast.steppers import PersistentGroupStepper, StepperUnavailable, lr_schedule, select_stepper  # noqa: E402

V_SEED, T_SEED, E_SEED, H_SEED, B_SEED = 27, 3, 10, 200, 32
LR, LR_AFTER = 0.1, 0.01
WARMUP_STEPS = 10
DEFAULT_DATA = os.environ.get("CHARMLP_NAMES_TXT", str(ROOT.parent / "shared" / "data" / "names.txt"))


class Clock:
    """Seconds since start(): CUDA events on CUDA (read after a synchronize), time.perf_counter on the CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def start(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()
            self.t0 = torch.cuda.Event(enable_timing=True)
            self.t0.record()
        else:
            self.t0 = time.perf_counter()

    def elapsed(self) -> float:
        if not self.cuda:
            return time.perf_counter() - self.t0
        t1 = torch.cuda.Event(enable_timing=True)
        t1.record()
        torch.cuda.synchronize()
        return self.t0.elapsed_time(t1) / 1e3


def measure(run, steps: int, decay_step: int, args, device: torch.device) -> dict:
    """Warm `run(start, lrs)` up with lr 0, then time it on the seed's schedule (lr decays at decay_step) in chunks
    of args.chunk steps, as the trainer calls its stepper; stops after the chunk that passes args.max_seconds.
    -> {steps timed, seconds}."""
    run(0, torch.zeros(min(WARMUP_STEPS, steps)))
    clock = Clock(device)
    clock.start()
    done = 0
    while done < steps:
        n = min(args.chunk, steps - done)
        run(done, lr_schedule(LR, decay_step, LR_AFTER, done, n))
        done += n
        if clock.elapsed() >= args.max_seconds:  # a host sync on CUDA, as the trainer's per-chunk loss read-back
            break
    return {"steps": done, "seconds": clock.elapsed()}


def seed_models(V: int, M: int, device: torch.device) -> list[CharMLP]:
    """M plain-PyTorch models of the seed's size, initialised with seeds 1..M: never all-zero parameters."""
    return [CharMLP(V, T_SEED, E_SEED, H_SEED, seed=s).to(device) for s in range(1, M + 1)]


class Sweep:
    """The sweep's own stepper (steppers.PersistentGroupStepper: M models stacked, one sgd_train call per run, minibatch
    seeds 1..M); calling it runs one call over all of them. Keeps the last call's (M, n) losses only (all of them
    would grow with M x steps)."""

    def __init__(self, models: list[CharMLP], X: torch.Tensor, Y: torch.Tensor):
        self.stepper = PersistentGroupStepper(models, X, Y, B_SEED, list(range(1, len(models) + 1)))
        self.params, self.last_losses = self.stepper.params, None

    def __call__(self, start: int, lrs: torch.Tensor) -> None:
        self.last_losses = self.stepper.run(start, lrs)


def torch_func_runner(models: list[CharMLP], X, Y, device: torch.device):
    """run(start, lrs) of the torch.func baseline: each step draws (M, B) rows with torch.randint, takes every
    model's gradient with vmap(grad(functional_call)) and applies p -= lr * grad. On CUDA the step is one CUDA
    graph, replayed per step; lr lives in a device tensor that the graph reads."""
    params = {k: v.detach() for k, v in torch.func.stack_module_state(models)[0].items()}
    base, M = models[0], len(models)

    def loss(p, Xb, Yb):
        return torch.func.functional_call(base, p, (Xb, Yb))[1]

    grads_of = torch.func.vmap(torch.func.grad(loss))
    lr = torch.zeros((), device=device)

    def step() -> None:
        ix = torch.randint(0, X.shape[0], (M, B_SEED), device=device)
        grads = grads_of(params, X[ix], Y[ix])
        with torch.no_grad():
            for name, p in params.items():
                p.sub_(lr * grads[name])

    if device.type == "cuda":
        step = capture(step, device)  # lr is 0 here: the capture's warm-up steps leave the parameters unchanged

    last_lr = 0.0

    def run(start: int, lrs: torch.Tensor) -> None:
        nonlocal last_lr
        for value in lrs.tolist():
            if value != last_lr:  # a device write only where the schedule changes
                lr.fill_(value)
                last_lr = value
            step()

    return run


@torch.no_grad()
def mean_loss(params: list[torch.Tensor], X, Y) -> float:
    """The seed's forward over the whole split, per model, averaged over the models."""
    M = params[0].shape[0]
    return sum(reference.forward([p[m] for p in params], X, Y)[1].item() for m in range(M)) / M


def with_rates(row: dict, M: int, steps: int) -> dict:
    """Adds model-steps/s and the wall time at `steps` (extrapolated when fewer were timed) to a measurement."""
    rate = M * row["steps"] / row["seconds"]
    return {**row, "model_steps_per_s": rate, "wall_s": M * steps / rate, "extrapolated": row["steps"] < steps}


def bench_sweep(M: int, data: dict, args, device: torch.device, threads: int) -> dict:
    """The sweep of M models at `threads`: timed, with the mean dev loss of the models before and after training
    (proof that the timed calls trained real models)."""
    sweep = Sweep(seed_models(data["V"], M, device), *data["train"])
    init_dev = mean_loss(sweep.params, *data["dev"])
    with intra_op_threads(threads):
        row = measure(sweep, args.steps, args.steps // 2, args, device)
    last = sweep.last_losses
    assert last.isfinite().all(), f"sweep of {M} models: non-finite training loss"
    return {**with_rates(row, M, args.steps), "init_dev_loss": init_dev,
            "dev_loss": mean_loss(sweep.params, *data["dev"]), "last_chunk_train_loss": last.mean().item()}


def bench_one_model(data: dict, args, device: torch.device, threads: int) -> dict:
    """One model alone (M = 1 sgd_train calls) at `threads`: the one-at-a-time baseline, measured once."""
    sweep = Sweep(seed_models(data["V"], 1, device), *data["train"])
    with intra_op_threads(threads):
        row = measure(sweep, args.steps, args.steps // 2, args, device)
    return {**with_rates(row, 1, args.steps), "threads": threads}


def bench_torch_func(M: int, data: dict, args, device: torch.device, threads: int) -> dict:
    """The torch.func baseline over M models at `threads`, timed on args.baseline_steps steps (torch's default
    generator seeded for repeatable minibatches)."""
    torch.manual_seed(0)
    with intra_op_threads(threads):
        run = torch_func_runner(seed_models(data["V"], M, device), *data["train"], device)
        row = measure(run, args.baseline_steps, args.steps // 2, args, device)
    return with_rates(row, M, args.steps)


def check_device(device: torch.device) -> None:
    """SystemExit with one line when sgd_train cannot run the seed's size on `device`."""
    try:
        select_stepper("persistent", device, (V_SEED, T_SEED, E_SEED, H_SEED, B_SEED))
    except StepperUnavailable as e:
        raise SystemExit(f"bench_sweep: ops.sgd_train cannot run on {device}: {e.reason}") from None


def load_data(path: str, device: torch.device) -> dict:
    """{V, train: (X, Y), dev: (X, Y)} of names.txt on `device`; SystemExit with one line when it is missing."""
    if not Path(path).is_file():
        raise SystemExit(f"bench_sweep: no data file at {path} (the seed's names.txt: pass --data)")
    corpus = load_corpus_for(TrainConfig(data=path, block_size=T_SEED))
    V = len(corpus.vocab)
    if V != V_SEED:
        raise SystemExit(f"bench_sweep: the seed's size expects a vocabulary of {V_SEED}, {path} gives {V}")
    return {"V": V, **{name: tuple(t.to(device) for t in corpus.splits[name]) for name in ("train", "dev")}}


def parse_args(argv):
    default_device = "cuda" if torch.cuda.is_available() else "cpu"
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", choices=["cpu", "cuda"], default=default_device,
                    help=f"default {default_device} (cuda when available)")
    ap.add_argument("--models", default="1,8,32,128", help="comma-separated numbers of models M (default 1,8,32,128)")
    ap.add_argument("--steps", type=int, default=200_000, help="steps per model (default 200,000); lr decays at half")
    ap.add_argument("--baseline-steps", type=int, default=None,
                    help="steps the torch.func baseline is timed on, extrapolated to --steps (default 500 on the "
                         "CPU, 5,000 on CUDA)")
    ap.add_argument("--chunk", type=int, default=1000, help="steps per call, as the trainer's chunks (default 1000)")
    ap.add_argument("--max-seconds", type=float, default=60.0,
                    help="time one measurement for at most about this long, then extrapolate (default 60)")
    ap.add_argument("--threads", type=int, default=None,
                    help="intra-op threads of the sweep and torch.func variants (default torch's: all cores)")
    ap.add_argument("--data", default=DEFAULT_DATA,
                    help="the seed's names.txt (default $CHARMLP_NAMES_TXT, else ../shared/data/names.txt from the "
                         "repository root)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"), help="directory for the .json and .md")
    args = ap.parse_args(argv)
    args.models = [int(m) for m in args.models.split(",") if m.strip()]
    if args.baseline_steps is None:
        args.baseline_steps = 5000 if args.device == "cuda" else 500
    args.baseline_steps = min(args.baseline_steps, args.steps)
    if min(args.models + [args.steps, args.chunk, args.baseline_steps]) < 1:
        ap.error("--models, --steps, --chunk and --baseline-steps must be positive")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    check_device(device)
    data = load_data(args.data, device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)  # now, not after minutes of timing
    threads = args.threads or torch.get_num_threads()
    one_threads = threads_for("auto", step_work(V_SEED, T_SEED, E_SEED, H_SEED, B_SEED))

    one = bench_one_model(data, args, device, one_threads)
    print(f"one model alone: {one['model_steps_per_s']:,.0f} model-steps/s at {one_threads} thread(s)", flush=True)
    rows = []
    for M in args.models:
        sweep = bench_sweep(M, data, args, device, threads)
        func = bench_torch_func(M, data, args, device, threads)
        rows.append({"models": M, "sweep": sweep, "torch_func": func,
                     "one_at_a_time": {"wall_s": M * one["wall_s"], "model_steps_per_s": one["model_steps_per_s"]},
                     "speedup_vs_one_at_a_time": sweep["model_steps_per_s"] / one["model_steps_per_s"],
                     "speedup_vs_torch_func": sweep["model_steps_per_s"] / func["model_steps_per_s"]})
        print(f"M={M}: sweep {sweep['model_steps_per_s']:,.0f}, torch.func {func['model_steps_per_s']:,.0f} "
              f"model-steps/s; dev loss {sweep['init_dev_loss']:.3f} -> {sweep['dev_loss']:.3f}", flush=True)

    meta = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else machine.cpu_name(),
        "device_type": device.type, "torch": torch.__version__, "date": dt.datetime.now().isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name] + sys.argv), "git": machine.git_rev(),
        "threads": threads, "one_model_threads": one_threads,
        "recipe": {"steps": args.steps, "batch": B_SEED, "lr": [LR, args.steps // 2, LR_AFTER],
                   "sizes": [data["V"], T_SEED, E_SEED, H_SEED], "chunk": args.chunk,
                   "baseline_steps": args.baseline_steps, "max_seconds": args.max_seconds},
    }
    md = render_markdown(meta, rows, one)
    print("\n" + md)
    stem = f"bench_sweep_{device.type}_{dt.datetime.now().strftime('%Y%m%d_%H%M%S')}"
    (out / f"{stem}.json").write_text(json.dumps({"meta": meta, "one_model": one, "results": rows}, indent=2))
    (out / f"{stem}.md").write_text(md)
    print(f"wrote {out / stem}.json and .md")
    return 0


def _timed(r: dict, unit: str = "") -> str:
    """'12.34' or '12.34 (timed on 1,000 steps)' for a measurement's wall time at --steps."""
    return f"{r['wall_s']:.2f}{unit}" + (f" (timed on {r['steps']:,} steps)" if r["extrapolated"] else "")


def render_markdown(meta: dict, rows: list[dict], one: dict) -> str:
    steps = meta["recipe"]["steps"]
    cpu = meta["device_type"] == "cpu"
    one_threads = f" with {meta['one_model_threads']} thread(s) (the trainer's choice)" if cpu else ""
    lines = [
        f"# Sweep of M seed-sized models, {steps:,} steps each — {meta['device']}",
        "",
        f"- date {meta['date']}, torch {meta['torch']}, git {meta['git']}",
        f"- command: `{meta['command']}`",
        f"- sweep and torch.func: {meta['threads']} intra-op thread(s); one at a time: one model per sgd_train call"
        f"{one_threads}, timed once and multiplied by M",
        f"- wall s is at {steps:,} steps per model; \"timed on N steps\": measured on N steps and extrapolated",
        "- speed-up: the sweep's model-steps/s over the other variant's (sweep / one at a time: over one model "
        "alone's)",
        "- dev loss: the whole dev split's, averaged over the models, at init -> after the sweep's timed steps",
        "",
        "| M | sweep wall s | sweep model-steps/s | one at a time wall s (M x one) | torch.func wall s "
        "| torch.func model-steps/s | sweep / one at a time | sweep / torch.func | dev loss (sweep) |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        s, f = r["sweep"], r["torch_func"]
        lines.append(f"| {r['models']} | {_timed(s)} | {s['model_steps_per_s']:,.0f} | "
                     f"{r['one_at_a_time']['wall_s']:.2f} | {_timed(f)} | {f['model_steps_per_s']:,.0f} | "
                     f"{r['speedup_vs_one_at_a_time']:.2f}x | {r['speedup_vs_torch_func']:.1f}x | "
                     f"{s['init_dev_loss']:.2f} -> {s['dev_loss']:.3f} |")
    lines += ["", f"One model alone{one_threads}: {one['model_steps_per_s']:,.0f} model-steps/s, {_timed(one, ' s')} "
                  f"for {steps:,} steps" + _m1_line(rows) + "."]
    return "\n".join(lines) + "\n"


def _m1_line(rows: list[dict]) -> str:
    m1 = next((r for r in rows if r["models"] == 1), None)
    if m1 is None:
        return "; M = 1 was not swept"
    rate = m1["sweep"]["model_steps_per_s"]
    return f"; the M = 1 sweep (the sweep's threads): {rate:,.0f} model-steps/s ({m1['speedup_vs_one_at_a_time']:.2f}x)"


if __name__ == "__main__":
    sys.exit(main())
