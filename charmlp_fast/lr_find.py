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

import json
from pathlib import Path

import torch

from charmlp_fast import reference
from charmlp_fast.cli import ArgumentParser, positive_int, resolve_device, run_main
from charmlp_fast.data import load_corpus
from charmlp_fast.model import CharMLP, fastest_impl
from charmlp_fast.steppers import EagerStepper

SUGGESTION_BACKOFF = 2.0  # suggested lr = lr at the smoothed-loss minimum / this
SMOOTHING = 0.98  # EMA factor for the loss curve


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


def lr_sweep(model: CharMLP, X: torch.Tensor, Y: torch.Tensor, batch_size: int, seed: int,
             lo: float = -3.0, hi: float = 0.0, steps: int = 1000) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (exponents (steps,), per-step losses (steps,) on the CPU): the seed's `lre = linspace(-3, 0, 1000)`."""
    exponents = torch.linspace(lo, hi, steps)
    losses = EagerStepper(model, X, Y, batch_size, seed).run(0, (10 ** exponents).float())
    return exponents, losses.cpu()


def plot_sweep(path: str | Path, exponents: torch.Tensor, losses: torch.Tensor, suggested: float) -> None:
    from charmlp_fast.plots import _pyplot

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
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = ArgumentParser(prog="python -m charmlp_fast.lr_find", description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=None, help="text file, one word per line (default: US baby names)")
    p.add_argument("--block-size", type=positive_int, default=3, help="T: context length")
    p.add_argument("--n-embd", type=positive_int, default=10, help="E: embedding size")
    p.add_argument("--n-hidden", type=positive_int, default=200, help="H: hidden units")
    p.add_argument("--batch-size", type=positive_int, default=32, help="B: minibatch size")
    p.add_argument("--steps", type=positive_int, default=1000, help="learning rates in the sweep")
    p.add_argument("--lo", type=float, default=-3.0, help="log10 of the smallest learning rate")
    p.add_argument("--hi", type=float, default=0.0, help="log10 of the largest learning rate")
    p.add_argument("--seed", type=int, default=reference.SEED, help="initialisation and minibatch seed")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--out", default="out", help="directory for lr_find.png and lr_find.json")
    args = p.parse_args(argv)
    device = resolve_device(args.device)
    corpus = load_corpus(args.data, args.block_size)
    X, Y = (t.to(device) for t in corpus.splits["train"])
    model = CharMLP(len(corpus.vocab), args.block_size, args.n_embd, args.n_hidden, seed=args.seed,
                    impl=fastest_impl(device.type)).to(device)
    exponents, losses = lr_sweep(model, X, Y, args.batch_size, args.seed, args.lo, args.hi, args.steps)
    suggested = suggest(exponents, losses)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    plot_sweep(out / "lr_find.png", exponents, losses, suggested)
    (out / "lr_find.json").write_text(json.dumps(
        {"exponents": exponents.tolist(), "losses": losses.tolist(), "suggested_lr": suggested}) + "\n")
    print(f"suggested learning rate: {suggested:.3g} (smoothed-loss minimum / {SUGGESTION_BACKOFF:g}); "
          f"wrote {out / 'lr_find.png'} and {out / 'lr_find.json'}")
    return 0


if __name__ == "__main__":
    run_main("charmlp_fast.lr_find", main)
