"""Word-level training speed and memory: the paper's two models (Bengio et al. 2003, Table 1) at its vocabulary size,
every implementation in one run, on one device.

Models (T = 4, a batch of --batch-size contexts, the sotu corpus cut to --max-vocab tokens, the paper's 16,383):
  mlp1   E 60, H 50, direct connections (the paper's best, test perplexity 268 on Brown)
  mlp9   E 30, H 100, no direct connections (276)
Implementations (--impls):
  eager       the model written out in plain PyTorch (b + x W + tanh(d + x H) U, F.cross_entropy over the (B, V)
              logits), torch.randint minibatches, autograd, p -= lr * g: what a user writes
  compile     the same loss under torch.compile(fullgraph=True), eager backward and update
  fused       steppers.EagerStepper over CharMLP(kernels="fused"): linear_cross_entropy, no (B, V) logits
  persistent  steppers.PersistentStepper: charmlp::sgd_train, all steps of a chunk in one C++ call (CPU)

Each implementation runs in its own process (so that its peak memory is its own): warm-up steps, then --repeats
timed runs of --steps steps; reported are the best and the median training tokens/s (B x steps / s), the ratio to
eager's best, the FLOP rate against the machine's peak, and the peak resident memory the training added above the
data and parameters (ru_maxrss; the (B, V) logits of one step are B x V x 4 bytes).

    python benchmarks/bench_words.py                       # both models, all implementations, the CPU
    python benchmarks/bench_words.py --models mlp9 --impls eager,persistent --steps 50
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import machine  # noqa: E402
from charmlp_fast.config import TrainConfig  # noqa: E402
from charmlp_fast.data import load_corpus_for  # noqa: E402
from charmlp_fast.model import CharMLP  # noqa: E402
from charmlp_fast.steppers import select_stepper  # noqa: E402

MODELS = {"mlp1": dict(n_embd=60, n_hidden=50, direct=True), "mlp9": dict(n_embd=30, n_hidden=100, direct=False)}
IMPLS = ("eager", "compile", "fused", "persistent")
T = 4
LR = 0.05


def flops_per_step(V: int, E: int, H: int, B: int, direct: bool) -> int:
    """2 x multiply-adds of a step: hidden layer, output layer (H or H + T*E inputs), their three backward products
    each (dW1, dx; dW2, dz)."""
    K = H + (T * E if direct else 0)
    return 2 * B * (3 * T * E * H + 3 * K * V)


# ---- the implementations: each returns step(n) -> None, which trains n steps ------------------------------------

def eager_loss(C, W1, b1, U, W, b2, Xb, Yb):
    x = C[Xb].view(Xb.shape[0], -1)  # (B, T*E)
    logits = torch.tanh(x @ W1 + b1) @ U + b2  # (B, V)
    if W is not None:
        logits = logits + x @ W
    return F.cross_entropy(logits, Yb)


def plain_steps(model: CharMLP, X, Y, B, compiled: bool):
    """eager / compile: the paper's model in plain PyTorch over the model's initial parameters."""
    H = model.n_hidden
    C, W1, b1, W2, b2 = (p.detach().clone() for p in model.params())
    params = [C, W1, b1, W2[:H].clone(), b2] + ([W2[H:].clone()] if model.direct else [])
    for p in params:
        p.requires_grad_()
    loss_fn = torch.compile(eager_loss, fullgraph=True) if compiled else eager_loss
    g = torch.Generator().manual_seed(1)

    def steps(n: int) -> None:
        for _ in range(n):
            ix = torch.randint(0, X.shape[0], (B,), generator=g)
            C, W1, b1, U, b2 = params[:5]
            loss = loss_fn(C, W1, b1, U, params[5] if model.direct else None, b2, X[ix], Y[ix])
            for p in params:
                p.grad = None
            loss.backward()
            with torch.no_grad():
                torch._foreach_add_(params, [p.grad for p in params], alpha=-LR)

    return steps


def stepper_steps(impl: str, model: CharMLP, X, Y, B):
    choice = select_stepper(impl, "cpu", (model.vocab_size, T, model.n_embd, model.n_hidden, B), direct=model.direct)
    stepper = choice.build(model, X, Y, B, seed=1)
    done = [0]

    def steps(n: int) -> None:
        losses = stepper.run(done[0], torch.full((n,), LR))
        done[0] += n
        assert losses.isfinite().all()

    return steps


def measure_one(args) -> dict:
    """One implementation on one model, in this process."""
    corpus = load_corpus_for(TrainConfig(tokens="words", data=args.data, max_vocab=args.max_vocab, block_size=T))
    X, Y = corpus.splits["train"]
    V = len(corpus.vocab)
    sizes = MODELS[args.model]
    model = CharMLP(V, T, sizes["n_embd"], sizes["n_hidden"], kernels="fused" if args.impl != "eager" else "reference",
                    init="scaled", direct=sizes["direct"])
    steps = (plain_steps(model, X, Y, args.batch_size, args.impl == "compile") if args.impl in ("eager", "compile")
             else stepper_steps(args.impl, model, X, Y, args.batch_size))
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    steps(args.warmup)
    warm_s = time.perf_counter() - t0
    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        steps(args.steps)
        times.append((time.perf_counter() - t0) / args.steps)
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    f = flops_per_step(V, sizes["n_embd"], sizes["n_hidden"], args.batch_size, sizes["direct"])
    best, median = min(times), statistics.median(times)
    return {"model": args.model, "impl": args.impl, "V": V, "B": args.batch_size, **sizes,
            "ms_per_step_best": best * 1e3, "ms_per_step_median": median * 1e3,
            "tokens_per_s_best": args.batch_size / best, "tokens_per_s_median": args.batch_size / median,
            "gflops_best": f / best / 1e9, "warmup_s": warm_s, "extra_peak_rss_mib": (peak_rss - base_rss) / 1024,
            "logits_mib": args.batch_size * V * 4 / 2 ** 20, "threads": torch.get_num_threads()}


def run_all(args) -> list[dict]:
    rows = []
    for model in args.models.split(","):
        for impl in args.impls.split(","):
            cmd = [sys.executable, __file__, "--one", "--model", model, "--impl", impl, "--steps", str(args.steps),
                   "--repeats", str(args.repeats), "--warmup", str(args.warmup), "--batch-size", str(args.batch_size),
                   "--max-vocab", str(args.max_vocab)] + (["--data", args.data] if args.data else [])
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode != 0:
                why = (done.stderr.strip().splitlines() or ["failed"])[-1]
                rows.append({"model": model, "impl": impl, "skipped": why})
                print(f"{model} {impl:>10}: failed: {why}", flush=True)
                continue
            row = json.loads(done.stdout.strip().splitlines()[-1])
            rows.append(row)
            print(f"{model} {impl:>10}: {row['tokens_per_s_best']:9,.0f} tokens/s best, "
                  f"{row['tokens_per_s_median']:9,.0f} median, {row['gflops_best']:5.1f} GFLOP/s, "
                  f"+{row['extra_peak_rss_mib']:.0f} MiB peak", flush=True)
    for r in rows:
        eager = next((e for e in rows if e["model"] == r["model"] and e["impl"] == "eager" and "skipped" not in e),
                     None)
        if eager and "skipped" not in r:
            r["speedup_vs_eager"] = r["tokens_per_s_best"] / eager["tokens_per_s_best"]
    return rows


def render_markdown(meta: dict, rows: list[dict]) -> str:
    lines = [f"# Word-level training, T {T}, B {meta['batch_size']}, V {meta['V']:,} — {meta['device']}", "",
             f"- date {meta['date']}, torch {meta['torch']}, {meta['threads']} intra-op threads, git {meta['git']}",
             f"- command: `{meta['command']}`",
             f"- peak FP32 of all cores: {meta['peak_gflops']:.0f} GFLOP/s; tokens/s = B / (s per step), best and "
             f"median of {meta['repeats']} runs of {meta['steps']} steps after {meta['warmup']} warm-up steps", "",
             "| model | implementation | tokens/s best | median | vs eager | GFLOP/s (of peak) | extra peak RSS MiB "
             "| (B, V) logits MiB |", "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        if "skipped" in r:
            lines.append(f"| {r['model']} | {r['impl']} | failed: {r['skipped']} | | | | | |")
            continue
        lines.append(f"| {r['model']} | {r['impl']} | {r['tokens_per_s_best']:,.0f} | {r['tokens_per_s_median']:,.0f} "
                     f"| {r.get('speedup_vs_eager', float('nan')):.2f}x | {r['gflops_best']:.1f} "
                     f"({r['gflops_best'] / meta['peak_gflops']:.0%}) | {r['extra_peak_rss_mib']:.1f} | "
                     f"{r['logits_mib']:.1f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="mlp1,mlp9", help="comma-separated: mlp1, mlp9")
    ap.add_argument("--impls", default=",".join(IMPLS), help="comma-separated, see the module docstring")
    ap.add_argument("--steps", type=int, default=100, help="steps per timed run (default 100)")
    ap.add_argument("--repeats", type=int, default=5, help="timed runs per implementation (default 5)")
    ap.add_argument("--warmup", type=int, default=20, help="steps before timing (compilation, caches; default 20)")
    ap.add_argument("--batch-size", type=int, default=32, help="B (default 32)")
    ap.add_argument("--max-vocab", type=int, default=16_383, help="vocabulary size (default the paper's 16,383)")
    ap.add_argument("--data", default=None, help="word corpus (default sotu)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    ap.add_argument("--one", action="store_true", help=argparse.SUPPRESS)  # internal: one (model, impl) per process
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--impl", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.one:
        print(json.dumps(measure_one(args)))
        return 0
    rows = run_all(args)
    done = [r for r in rows if "skipped" not in r]
    meta = {"device": machine.cpu_name(), "torch": torch.__version__, "git": machine.git_rev(),
            "date": dt.datetime.now().isoformat(timespec="seconds"), "threads": torch.get_num_threads(),
            "command": " ".join([Path(sys.executable).name] + sys.argv), "batch_size": args.batch_size,
            "V": done[0]["V"] if done else args.max_vocab, "steps": args.steps, "repeats": args.repeats,
            "warmup": args.warmup, "peak_gflops": machine.peak_fp32_flops(torch.get_num_threads()) / 1e9}
    md = render_markdown(meta, rows)
    print("\n" + md)
    machine.write_report(args.out, "bench_words_cpu", {"meta": meta, "results": rows}, md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
