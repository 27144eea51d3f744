"""Whole-training benchmark: the seed's recipe (names.txt, 200,000 steps of batch 32, lr 0.1 then 0.01 from step
100,000, seed 2147483647) with every implementation, in one run, on one device.

Implementations (--impls, comma-separated; default all that apply to the device):
  eager          the notebook loop, literally (torch.randint minibatches, p.grad = None, backward, p.data += -lr*grad)
  graph_pytorch  the same plain-PyTorch step captured in one CUDA graph and replayed per step (CUDA only)
  compile        torch.compile of the forward + loss, eager backward and update (the usual torch.compile recipe)
  fused          steppers.EagerStepper over CharMLP(kernels="fused") (skipped when the fused kernels are missing)
  graph          steppers.GraphStepper: the fused step, 100 steps per captured CUDA graph (CUDA only)
  persistent     steppers.PersistentStepper: charmlp::sgd_train, one call per chunk of steps;
                 persistent@N forces a thread-block cluster of N blocks per model (CUDA, for tuning)
The last three are the trainer's steppers, chosen and checked as the trainer does (steppers.select_stepper).

For each: wall time (warm-up included: compilation, graph capture), µs/step, final train and dev loss of the full
splits (plain float32 forward). The whole-loop steppers run in chunks of --chunk steps, as the trainer does. Slow
baselines may be timed on fewer steps (--baseline-steps): their µs/step is then extrapolated and their losses are
those after that many steps, both labelled in the table.

Writes bench_train_<device>_<date>.{json,md} into --out with the device name, torch version, date and command.

    python benchmarks/bench_train.py --device cpu
    python benchmarks/bench_train.py --device cuda --impls eager,graph_pytorch,compile,graph,persistent,persistent@1
"""
from __future__ import annotations

import argparse
import datetime as dt
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import machine  # noqa: E402
from benchmarks.graphs import capture  # noqa: E402
from charmlp_fast import reference  # noqa: E402
from charmlp_fast.cli import step_work, thread_setting, threads_for  # noqa: E402
from charmlp_fast.config import TrainConfig  # noqa: E402
from charmlp_fast.data import load_corpus_for  # noqa: E402
from charmlp_fast.model import CharMLP  # noqa: E402
from charmlp_fast.steppers import StepperChoice, StepperUnavailable, lr_schedule, select_stepper  # noqa: E402

ALL_IMPLS = ["eager", "graph_pytorch", "compile", "fused", "graph", "persistent"]
STEPPERS = {"fused", "graph", "persistent"}  # the trainer's; the others are baselines written out below
V_SEED, T_SEED, E_SEED, H_SEED, B_SEED = 27, 3, 10, 200, 32
LR, LR_DECAY_STEP, LR_AFTER = 0.1, 100_000, 0.01


def flops_per_step(V=V_SEED, T=T_SEED, E=E_SEED, H=H_SEED, B=B_SEED) -> int:
    """Multiply-adds x 2 of one SGD step: forward hidden, logits, dh, dW2, dx, dW1 (elementwise work ignored)."""
    return 2 * B * (T * E * H + H * V + V * H + H * V + H * T * E + T * E * H)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def seed_params(V: int, device: torch.device) -> list[torch.Tensor]:
    return [p.to(device).requires_grad_() for p in reference.init_params(V, T_SEED, E_SEED, H_SEED)]


def lr_at(i: int) -> float:
    return LR if i < LR_DECAY_STEP else LR_AFTER


class Timer:
    """Wall time of a whole run, and the time after warm-up (compilation, capture, first chunk): runners call
    `warm(steps_done)` once, after their first steps; the steady-state µs/step excludes everything before."""

    def __init__(self, device: torch.device, n: int):
        self.device, self.n = device, n
        self.warm_steps = 0
        sync(device)
        self.t0 = self.t_warm = time.perf_counter()

    def warm(self, steps_done: int) -> None:
        sync(self.device)
        self.t_warm, self.warm_steps = time.perf_counter(), steps_done

    def warm_at(self, i: int) -> bool:
        """True at the step index where loop runners should call warm(i): after ~10 % of the steps (<= 1,000)."""
        return i == max(1, min(1000, self.n // 10))

    def stop(self) -> tuple[float, float]:
        sync(self.device)
        t1 = time.perf_counter()
        steady = (t1 - self.t_warm) / max(1, self.n - self.warm_steps) * 1e6
        return t1 - self.t0, steady


# ---- implementations: each trains for n steps and returns the final [C, W1, b1, W2, b2] ----------------------

def train_eager(Xtr, Ytr, V, n, device, timer):
    """The notebook's loop, literally (on `device`)."""
    g = torch.Generator(device=device).manual_seed(reference.SEED)
    C, W1, b1, W2, b2 = parameters = seed_params(V, device)
    for i in range(n):
        if timer.warm_at(i):
            timer.warm(i)
        ix = torch.randint(0, Xtr.shape[0], (B_SEED,), device=device, generator=g)
        emb = C[Xtr[ix]]
        h = torch.tanh(emb.view(-1, T_SEED * E_SEED) @ W1 + b1)
        logits = h @ W2 + b2
        loss = F.cross_entropy(logits, Ytr[ix])
        for p in parameters:
            p.grad = None
        loss.backward()
        lr = lr_at(i)
        for p in parameters:
            p.data += -lr * p.grad
    return parameters


def train_graph_pytorch(Xtr, Ytr, V, n, device, timer):
    """The plain-PyTorch step (sampling, forward, backward, update) captured in one CUDA graph, replayed per step."""
    parameters = seed_params(V, device)
    C, W1, b1, W2, b2 = parameters
    lr = torch.full((), LR, device=device)
    # The default CUDA generator is graph-safe (its Philox offset advances on every replay); a private
    # torch.Generator would have to be registered with the graph.
    torch.cuda.manual_seed(reference.SEED)

    def step():
        ix = torch.randint(0, Xtr.shape[0], (B_SEED,), device=device)
        h = torch.tanh(C[Xtr[ix]].view(-1, T_SEED * E_SEED) @ W1 + b1)
        loss = F.cross_entropy(h @ W2 + b2, Ytr[ix])
        grads = torch.autograd.grad(loss, parameters)
        with torch.no_grad():
            for p, gr in zip(parameters, grads):
                p.sub_(lr * gr)

    lr.zero_()  # the capture's warm-up steps leave the parameters unchanged
    replay = capture(step, device)
    timer.warm(0)  # capture done
    for i in range(n):
        if i == 0 or i == LR_DECAY_STEP:
            lr.fill_(lr_at(i))
        replay()
    return parameters


def train_compile(Xtr, Ytr, V, n, device, timer):
    parameters = seed_params(V, device)
    g = torch.Generator(device=device).manual_seed(reference.SEED)

    @torch.compile(fullgraph=True)
    def loss_fn(C, W1, b1, W2, b2, Xb, Yb):
        h = torch.tanh(C[Xb].view(-1, T_SEED * E_SEED) @ W1 + b1)
        return F.cross_entropy(h @ W2 + b2, Yb)

    for i in range(n):
        if timer.warm_at(i):
            timer.warm(i)
        ix = torch.randint(0, Xtr.shape[0], (B_SEED,), device=device, generator=g)
        loss = loss_fn(*parameters, Xtr[ix], Ytr[ix])
        grads = torch.autograd.grad(loss, parameters)
        with torch.no_grad():
            torch._foreach_add_(parameters, grads, alpha=-lr_at(i))
    return parameters


def train_stepper(choice: StepperChoice, Xtr, Ytr, V, n, device, timer, chunk):
    """The trainer's stepper of `choice`, run in chunks of `chunk` steps; losses stay on the device."""
    model = CharMLP(V, T_SEED, E_SEED, H_SEED, kernels=choice.model_kernels)
    stepper = choice.build(model.to(device), Xtr, Ytr, B_SEED, reference.SEED)
    losses = []
    for start in range(0, n, chunk):
        losses.append(stepper.run(start, lr_schedule(LR, LR_DECAY_STEP, LR_AFTER, start, min(chunk, n - start))))
        if start == 0 and n > chunk:
            timer.warm(chunk)  # the first chunk carries the warm-up (graph capture, first launch)
    assert torch.cat(losses).isfinite().all(), "non-finite training loss"
    return [p.detach() for p in model.params()]


def select(impl: str, device: torch.device):
    """-> (the runner of impl: (Xtr, Ytr, V, n, device, timer, chunk) -> final params, None), or (None, why it is
    skipped). impl is a name of ALL_IMPLS, persistent@N for a cluster of N blocks."""
    base, _, cluster = impl.partition("@")
    if base not in ALL_IMPLS or (cluster and not cluster.isdigit()):
        return None, f"unknown implementation {impl!r}"
    if base in STEPPERS:
        try:
            choice = select_stepper(base, device, (V_SEED, T_SEED, E_SEED, H_SEED, B_SEED), int(cluster or 0))
        except StepperUnavailable as e:
            return None, e.reason
        return (lambda *args: train_stepper(choice, *args)), None
    if base == "graph_pytorch" and device.type != "cuda":
        return None, "CUDA only"
    runner = {"eager": train_eager, "graph_pytorch": train_graph_pytorch, "compile": train_compile}[base]
    return (lambda *args: runner(*args[:-1])), None


@torch.no_grad()
def split_loss(params, X, Y) -> float:
    losses = [reference.forward(params, X[i:i + 65536], Y[i:i + 65536])[1] * min(65536, X.shape[0] - i)
              for i in range(0, X.shape[0], 65536)]
    return (torch.stack(losses).sum() / X.shape[0]).item()


def floor_estimate(device: torch.device) -> dict:
    """Arithmetic floor of the seed's recipe: FLOPs at one SM's (one core's) peak FP32 rate."""
    f = flops_per_step()
    out = {"flops_per_step": f}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        ghz = props.clock_rate / 1e6 if getattr(props, "clock_rate", 0) else 1.98
        per_sm = 128 * 2 * ghz * 1e9  # 128 FP32 FMA lanes per SM (sm_80 has 64: the floor is then 2x)
        out.update(clock_ghz=ghz, peak_one_sm_gflops=per_sm / 1e9,
                   floor_us_one_sm=f / per_sm * 1e6, floor_us_cluster_of_4=f / (4 * per_sm) * 1e6)
    else:
        ghz, isa = machine.cpu_ghz(), machine.cpu_isa()
        per_core = machine.peak_fp32_flops(1)
        out.update(clock_ghz=ghz, isa=isa, peak_one_core_gflops=per_core / 1e9, floor_us_one_core=f / per_core * 1e6)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--steps", type=int, default=200_000, help="steps of the recipe (default 200,000)")
    ap.add_argument("--baseline-steps", type=int, default=None,
                    help="time eager/compile/graph_pytorch on this many steps only and extrapolate µs/step")
    ap.add_argument("--impls", default=",".join(ALL_IMPLS), help="comma-separated, see the module docstring")
    ap.add_argument("--chunk", type=int, default=10_000, help="steps per stepper.run call (trainer chunks)")
    ap.add_argument("--threads", type=thread_setting, default="auto",
                    help="CPU intra-op threads: a number, or auto (default; one at the seed's size, as the trainer "
                         "picks: charmlp_fast.cli.threads_for)")
    ap.add_argument("--data", default=os.environ.get("CHARMLP_NAMES_TXT", str(ROOT.parent / "shared" / "data" / "names.txt")))
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = ap.parse_args(argv)

    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(threads_for(args.threads, step_work(V_SEED, T_SEED, E_SEED, H_SEED, B_SEED)))
        print(f"{torch.get_num_threads()} intra-op thread(s)", flush=True)
    corpus = load_corpus_for(TrainConfig(data=args.data, block_size=T_SEED))
    V = len(corpus.vocab)
    assert V == V_SEED, f"the seed's recipe expects a vocabulary of {V_SEED}, got {V}"
    Xtr, Ytr = (t.to(device) for t in corpus.splits["train"])
    Xdev, Ydev = (t.to(device) for t in corpus.splits["dev"])

    rows = []
    for impl in [s.strip() for s in args.impls.split(",") if s.strip()]:
        run, reason = select(impl, device)
        if reason:
            print(f"{impl:>16}: skipped ({reason})", flush=True)
            rows.append({"impl": impl, "skipped": reason})
            continue
        base = impl.partition("@")[0]
        n = args.steps
        if args.baseline_steps and base in ("eager", "compile", "graph_pytorch"):
            n = min(n, args.baseline_steps)
        torch.manual_seed(0)
        timer = Timer(device, n)
        params = run(Xtr, Ytr, V, n, device, timer, args.chunk)
        wall, steady = timer.stop()
        row = {"impl": impl, "steps": n, "wall_s": wall, "us_per_step": steady, "us_per_step_overall": wall / n * 1e6,
               "warmup_steps": timer.warm_steps, "extrapolated": n < args.steps,
               "train_loss": split_loss(params, Xtr, Ytr), "dev_loss": split_loss(params, Xdev, Ydev)}
        rows.append(row)
        print(f"{impl:>16}: {wall:8.2f} s  {steady:9.1f} us/step (steady)  train {row['train_loss']:.4f}  "
              f"dev {row['dev_loss']:.4f}{'  (timed on %d steps)' % n if row['extrapolated'] else ''}", flush=True)

    eager = next((r for r in rows if r["impl"] == "eager" and "skipped" not in r), None)
    for r in rows:
        if eager and "skipped" not in r:
            r["speedup_vs_eager"] = eager["us_per_step"] / r["us_per_step"]
    floor = floor_estimate(device)
    meta = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else machine.cpu_name(),
        "device_type": device.type, "torch": torch.__version__, "date": dt.datetime.now().isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name] + sys.argv), "threads": torch.get_num_threads(),
        "git": machine.git_rev(), "recipe": {"steps": args.steps, "batch": B_SEED, "lr": [LR, LR_DECAY_STEP, LR_AFTER],
                                      "seed": reference.SEED, "sizes": [V, T_SEED, E_SEED, H_SEED]},
        "floor": floor,
    }
    md = render_markdown(meta, rows, args.steps)
    print("\n" + md)
    machine.write_report(args.out, f"bench_train_{device.type}", {"meta": meta, "results": rows}, md)
    return 0


def render_markdown(meta: dict, rows: list[dict], steps: int) -> str:
    f = meta["floor"]
    lines = [
        f"# Seed recipe, {steps:,} steps — {meta['device']}",
        "",
        f"- date {meta['date']}, torch {meta['torch']}, {meta['threads']} intra-op thread(s), git {meta['git']}",
        f"- command: `{meta['command']}`",
        f"- floor: {f['flops_per_step'] / 1e6:.2f} MFLOP/step; " + (
            f"one SM at {f['clock_ghz']:.2f} GHz = {f['floor_us_one_sm']:.2f} µs/step "
            f"({f['floor_us_one_sm'] * steps / 1e6:.2f} s), a cluster of 4 SMs {f['floor_us_cluster_of_4']:.2f} µs/step"
            if meta["device_type"] == "cuda" else
            f"one core ({f['isa']}, {f['peak_one_core_gflops']:.0f} GFLOP/s at {f['clock_ghz']:.2f} GHz) = "
            f"{f['floor_us_one_core']:.1f} µs/step ({f['floor_us_one_core'] * steps / 1e6:.1f} s)"),
        "",
        "µs/step is the steady state (after warm-up: compilation, graph capture, the first chunk); wall s is the whole"
        " run including warm-up.",
        "",
        "| implementation | wall s | µs/step | speed-up vs eager | train loss | dev loss |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        if "skipped" in r:
            lines.append(f"| {r['impl']} | skipped: {r['skipped']} | | | | |")
            continue
        note = f" (timed on {r['steps']:,} steps, wall extrapolated)" if r["extrapolated"] else ""
        wall = r["wall_s"] if not r["extrapolated"] else r["us_per_step"] * steps / 1e6
        loss_note = f" (after {r['steps']:,} steps)" if r["extrapolated"] else ""
        lines.append(f"| {r['impl']}{note} | {wall:.2f} | {r['us_per_step']:.1f} | "
                     f"{r.get('speedup_vs_eager', float('nan')):.1f}x | {r['train_loss']:.4f}{loss_note} | "
                     f"{r['dev_loss']:.4f}{loss_note} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
