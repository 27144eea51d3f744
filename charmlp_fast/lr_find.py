"""Learning-rate finder: the seed's sweep. One minibatch step at each of 1,000 learning rates 10**linspace(-3, 0),
starting from the initial parameters, then the loss against the exponent.

    python -m charmlp_fast.lr_find --data names.txt --out runs/lr

The suggestion: smooth the per-step loss (exponential moving average, bias-corrected), take the exponent where the
smoothed loss is lowest, and back off by a factor of SUGGESTION_BACKOFF: the loss is lowest just before training
turns unstable (and the moving average lags a little to the right), so the minimum itself is too aggressive for a
long run. On the seed's names.txt (seeds 1-3) the minimum sits near 10**-0.65 and the suggestion at 0.10-0.12,
where the seed settled by eye.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

from charmlp_fast.cli import (ArgumentParser, check_out_dir, finite_float, intra_op_threads, positive_int,
                              quiet_interrupts, resolve_device, run_main, step_work, threads_for)

if __name__ == "__main__":  # before torch loads (seconds): a Ctrl-C meanwhile ends without a traceback
    quiet_interrupts()

import torch  # noqa: E402

from charmlp_fast.checkpoint import atomic_write  # noqa: E402
from charmlp_fast.config import TrainConfig, add_model_data_arguments, init_of, with_token_defaults  # noqa: E402
from charmlp_fast.data import load_corpus_for  # noqa: E402
from charmlp_fast.model import CharMLP  # noqa: E402
from charmlp_fast.steppers import Stepper, select_stepper  # noqa: E402

# The sweep is the seed's: one eager step per learning rate, minibatches from torch.randint, through the fused
# kernels where they are built.
SWEEP_IMPLS = ("fused", "reference")
SUGGESTION_BACKOFF = 2.0  # suggested lr = lr at the smoothed-loss minimum / this
SMOOTHING = 0.98  # EMA factor for the loss curve
FLOAT32_EXPONENT = 37  # |log10 lr| within float32's normal range (1.2e-38 .. 3.4e38)


def smooth(losses: torch.Tensor, beta: float = SMOOTHING) -> torch.Tensor:
    """Bias-corrected exponential moving average (the first values are not pulled towards zero)."""
    out, avg = torch.empty_like(losses, dtype=torch.float64), 0.0
    for i, x in enumerate(losses.double().tolist()):
        avg = beta * avg + (1 - beta) * x
        out[i] = avg / (1 - beta ** (i + 1))
    return out


def suggest(exponents: torch.Tensor, losses: torch.Tensor) -> float:
    """Learning rate suggested from a sweep; non-finite losses (divergence) count as +inf."""
    finite = torch.where(torch.isfinite(losses), losses, torch.full_like(losses, float("inf")))
    # Once the loss diverges, the EMA is inf from there on, so the minimum is found before divergence.
    sm = smooth(finite)
    best = int(torch.argmin(sm))
    return 10 ** exponents[best].item() / SUGGESTION_BACKOFF


def lr_sweep(stepper: Stepper, lo: float = -3.0, hi: float = 0.0, steps: int = 1000
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (exponents (steps,), per-step losses (steps,) on the CPU): the seed's `lre = linspace(-3, 0, 1000)`, one
    step of `stepper` at each learning rate."""
    exponents = torch.linspace(lo, hi, steps)
    losses = stepper.run(0, (10 ** exponents).float())
    return exponents, losses.cpu()


def plot_sweep(path: str | Path, exponents: torch.Tensor, losses: torch.Tensor, suggested: float) -> None:
    from charmlp_fast.plots import _pyplot, save_png

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.5))
    ax.plot(exponents, losses, lw=0.6, alpha=0.6, label="loss (one step each)")
    ax.plot(exponents, smooth(losses), color="C1", label="smoothed")
    ax.axvline(torch.log10(torch.tensor(suggested)).item(), color="C3", ls="--", label=f"suggested lr {suggested:.3g}")
    ax.set_xlabel("log10 learning rate")
    ax.set_ylabel("loss")
    finite = losses[torch.isfinite(losses)]
    if finite.numel():
        ax.set_ylim(top=min(finite.max().item(), 3 * finite.min().item() + 5))
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    save_png(fig, path)


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog="python -m charmlp_fast.lr_find", description=__doc__.split("\n\n")[0],
                       argument_default=argparse.SUPPRESS)  # the model and data flags default to TrainConfig's
    add_model_data_arguments(p)
    p.add_argument("--steps", type=positive_int, default=1000, help="learning rates in the sweep (default 1000)")
    p.add_argument("--lo", type=finite_float, default=-3.0, help="log10 of the smallest learning rate (default -3)")
    p.add_argument("--hi", type=finite_float, default=0.0, help="log10 of the largest learning rate (default 0)")
    p.add_argument("--out", default="out", help="directory for lr_find.png and lr_find.json (default out)")
    return p


def main(argv: list[str] | None = None) -> int:
    p = build_parser()
    args = vars(p.parse_args(argv))
    steps, lo, hi, out = args.pop("steps"), args.pop("lo"), args.pop("hi"), args.pop("out")
    cfg = with_token_defaults(dataclasses.replace(TrainConfig(), **args), args, lengths=False)  # model, data flags
    if not lo < hi:
        p.error(f"--lo {lo:g} must be below --hi {hi:g}")
    if not -FLOAT32_EXPONENT <= lo < hi <= FLOAT32_EXPONENT:
        p.error(f"--lo and --hi must lie in [-{FLOAT32_EXPONENT}, {FLOAT32_EXPONENT}]: the learning rates are "
                "float32 numbers")
    device = resolve_device(cfg.device)
    corpus = load_corpus_for(cfg)
    out = check_out_dir(out)
    V = len(corpus.vocab)
    choice = select_stepper("auto", device, (V, cfg.block_size, cfg.n_embd, cfg.n_hidden, cfg.batch_size),
                            direct=cfg.direct,
                            auto=SWEEP_IMPLS)
    X, Y = (t.to(device) for t in corpus.splits["train"])
    model = CharMLP(V, cfg.block_size, cfg.n_embd, cfg.n_hidden, seed=cfg.seed, init=init_of(cfg), direct=cfg.direct,
                    kernels=choice.model_kernels).to(device)
    work = step_work(V, cfg.block_size, cfg.n_embd, cfg.n_hidden, cfg.batch_size)
    with intra_op_threads(threads_for(cfg.threads, work)) as threads:
        print(f"device {device}, {threads} thread{'s' if threads > 1 else ''}", flush=True)
        exponents, losses = lr_sweep(choice.build(model, X, Y, cfg.batch_size, cfg.seed), lo, hi, steps)
    suggested = suggest(exponents, losses)
    sweep = {"exponents": exponents.tolist(), "losses": losses.tolist(), "suggested_lr": suggested,
             "threads": threads}
    atomic_write(out / "lr_find.json", lambda tmp: Path(tmp).write_text(json.dumps(sweep) + "\n"))
    plot_sweep(out / "lr_find.png", exponents, losses, suggested)
    print(f"suggested learning rate: {suggested:.3g} (smoothed-loss minimum / {SUGGESTION_BACKOFF:g}); "
          f"wrote {out / 'lr_find.png'} and {out / 'lr_find.json'}")
    return 0


if __name__ == "__main__":
    run_main("charmlp_fast.lr_find", main)
