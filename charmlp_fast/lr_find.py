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

from charmlp_fast.cli import (ArgumentParser, check_out_dir, finite_float, intra_op_threads, positive_int,
                              quiet_interrupts, resolve_device, run_main, seed_int, thread_setting, threads_for)

if __name__ == "__main__":  # before torch loads (seconds): a Ctrl-C meanwhile ends without a traceback
    quiet_interrupts()

import torch  # noqa: E402

from charmlp_fast import reference  # noqa: E402
from charmlp_fast.checkpoint import atomic_write  # noqa: E402
from charmlp_fast.data import load_corpus  # noqa: E402
from charmlp_fast.model import CharMLP, fastest_impl  # noqa: E402
from charmlp_fast.steppers import EagerStepper  # noqa: E402

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


def lr_sweep(model: CharMLP, X: torch.Tensor, Y: torch.Tensor, batch_size: int, seed: int,
             lo: float = -3.0, hi: float = 0.0, steps: int = 1000) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (exponents (steps,), per-step losses (steps,) on the CPU): the seed's `lre = linspace(-3, 0, 1000)`."""
    exponents = torch.linspace(lo, hi, steps)
    losses = EagerStepper(model, X, Y, batch_size, seed).run(0, (10 ** exponents).float())
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


def main(argv: list[str] | None = None) -> int:
    p = ArgumentParser(prog="python -m charmlp_fast.lr_find", description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=None, help="text file, one word per line (default: US baby names)")
    p.add_argument("--block-size", type=positive_int, default=3, help="T: context length")
    p.add_argument("--n-embd", type=positive_int, default=10, help="E: embedding size")
    p.add_argument("--n-hidden", type=positive_int, default=200, help="H: hidden units")
    p.add_argument("--batch-size", type=positive_int, default=32, help="B: minibatch size")
    p.add_argument("--steps", type=positive_int, default=1000, help="learning rates in the sweep")
    p.add_argument("--lo", type=finite_float, default=-3.0, help="log10 of the smallest learning rate")
    p.add_argument("--hi", type=finite_float, default=0.0, help="log10 of the largest learning rate")
    p.add_argument("--seed", type=seed_int, default=reference.SEED, help="initialisation and minibatch seed")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--threads", type=thread_setting, default="auto",
                   help="CPU intra-op threads (default auto: one when a step is tiny, B*H*(T*E+V) below 2**21 "
                        "multiply-adds, else torch's default)")
    p.add_argument("--out", default="out", help="directory for lr_find.png and lr_find.json")
    args = p.parse_args(argv)
    if not args.lo < args.hi:
        p.error(f"--lo {args.lo:g} must be below --hi {args.hi:g}")
    if not -FLOAT32_EXPONENT <= args.lo < args.hi <= FLOAT32_EXPONENT:
        p.error(f"--lo and --hi must lie in [-{FLOAT32_EXPONENT}, {FLOAT32_EXPONENT}]: the learning rates are "
                "float32 numbers")
    device = resolve_device(args.device)
    corpus = load_corpus(args.data, args.block_size)
    out = check_out_dir(args.out)
    work = args.batch_size * args.n_hidden * (args.block_size * args.n_embd + len(corpus.vocab))
    X, Y = (t.to(device) for t in corpus.splits["train"])
    model = CharMLP(len(corpus.vocab), args.block_size, args.n_embd, args.n_hidden, seed=args.seed,
                    impl=fastest_impl(device.type)).to(device)
    with intra_op_threads(threads_for(args.threads, work)) as threads:
        print(f"device {device}, {threads} thread{'s' if threads > 1 else ''}", flush=True)
        exponents, losses = lr_sweep(model, X, Y, args.batch_size, args.seed, args.lo, args.hi, args.steps)
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
