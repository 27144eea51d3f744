"""Sweep: train every combination of a grid of configs, same-shaped models side by side in one charmlp::sgd_train
call, and rank them by dev loss.

    python -m charmlp_fast.sweep --data names.txt --grid n_hidden=100,200,300 --grid n_embd=2,10 \\
        --grid lr=0.05,0.1,0.2 --grid seed=1:3 --out runs/sweep
    python -m charmlp_fast.sweep --preset seed --out runs/seed        # the seed's exploration in one command
    python -m charmlp_fast.sweep --grid lr=0.05,0.1 --dry-run         # the configs, groups and estimated time
    torchrun --nproc_per_node=2 -m charmlp_fast.sweep --grid seed=1:8 --out runs/seeds   # groups over 2 processes

Every train flag sets its value for all configs; --grid NAME=V1,V2,... (NAME a train field, n_hidden or n-hidden)
sweeps it; integers also as inclusive ranges A:B or A:B:STEP. Configs of one shape (block size, embedding, hidden,
batch and steps) form a group, trained in one call with per-model learning rates and seeds when the persistent
implementation runs, and model by model otherwise. A model in a sweep is bit for bit the model `train` gives for
its config.

Outputs in --out: results.jsonl (one line per config: config, train_loss, dev_loss, steps, wall_s, device, impl,
status), results.csv, sweep.png (dev loss against each swept field), and best/model.safetensors, the best config's
checkpoint (`train --resume` continues it; --save all also keeps runs/NNN/model.safetensors for every config).
The test loss is computed for the best config only.
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import itertools
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from charmlp_fast.cli import ArgumentParser, CLIError, quiet_interrupts, run_main

if __name__ == "__main__":  # before torch loads (seconds): a Ctrl-C meanwhile ends without a traceback
    quiet_interrupts()

import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

from charmlp_fast import train as trainer  # noqa: E402
from charmlp_fast.checkpoint import atomic_write, save_checkpoint  # noqa: E402
from charmlp_fast.cli import (check_flag_value, check_out_dir, flag_of, intra_op_threads, lock_out_dir,  # noqa: E402
                              resolve_device, step_work, threads_for)
from charmlp_fast.config import (TrainConfig, add_model_data_arguments, init_of, lrs_of,  # noqa: E402
                                 with_token_defaults)
from charmlp_fast.data import Corpus, load_corpus_for  # noqa: E402
from charmlp_fast.launch import Ranks, core_share, process_group, rank_device  # noqa: E402
from charmlp_fast.model import CharMLP  # noqa: E402
from charmlp_fast.steppers import StepperChoice, model_kernels, select_stepper  # noqa: E402
from charmlp_fast.steppers.persistent import PersistentGroupStepper  # noqa: E402

# The fields a grid may sweep: the model's sizes, the batch, the schedule and the seed. The data and where and how
# the models run are the sweep's, one value for all.
SWEEPABLE = ("block_size", "n_embd", "n_hidden", "batch_size", "steps", "lr", "lr_schedule", "lr_decay_step",
             "lr_after", "lr_decay_rate", "weight_decay", "seed", "init")
# Configs equal in these fields are one group: one sgd_train call (the learning rates and seeds may differ).
SHAPE = ("block_size", "n_embd", "n_hidden", "direct", "batch_size", "steps", "weight_decay")
# The seed's exploration: hidden 100 -> 300 at embedding 2, then embedding 10 with hidden 200, each with the
# neighbourhood of the learning rate its sweep found (0.1).
PRESETS = {"seed": {"n_hidden": [100, 200, 300], "n_embd": [2, 10], "lr": [0.05, 0.1, 0.2]}}
SEED_PATH = [(2, 100), (2, 300), (10, 200)]  # (n_embd, n_hidden) in the order the seed tried them
SEED_DEV_LOSS = 2.17  # the seed's final model (n_embd 10, n_hidden 200, lr 0.1 then 0.01) on names.txt


# ---- the grid -----------------------------------------------------------------------------------------------------

def parse_grid(parser: argparse.ArgumentParser, specs: list[str]) -> dict[str, list]:
    """--grid NAME=V1,V2 / NAME=A:B[:STEP] (integers, inclusive) -> {field: values}, each value checked as its
    train flag checks it."""
    grid: dict[str, list] = {}
    for spec in specs:
        name, eq, text = spec.partition("=")
        name = name.strip().replace("-", "_")
        if not eq or not text:
            raise CLIError(f"--grid {spec!r}: expected NAME=V1,V2,... or NAME=A:B")
        if name not in SWEEPABLE:
            raise CLIError(f"--grid {name}: not a sweepable field (one of {', '.join(SWEEPABLE)})")
        if name in grid:
            raise CLIError(f"--grid {name} is given twice")
        action = flag_of(parser, name)
        grid[name] = [check_flag_value(action, v, f"--grid {name}={v}") for v in expand_ranges(name, text)]
    return grid


def expand_ranges(name: str, text: str) -> list[str]:
    """'1,3:5,9' -> ['1', '3', '4', '5', '9']: A:B and A:B:STEP are inclusive integer ranges."""
    values = []
    for item in text.split(","):
        if ":" not in item:
            values.append(item.strip())
            continue
        try:
            a, b, *step = (int(x) for x in item.split(":"))
        except ValueError:
            raise CLIError(f"--grid {name}={item}: a range is A:B or A:B:STEP of integers") from None
        s = step[0] if step else 1
        if len(step) > 1 or s < 1 or b < a:
            raise CLIError(f"--grid {name}={item}: a range A:B[:STEP] needs A <= B and STEP >= 1")
        values += [str(v) for v in range(a, b + 1, s)]
    if len(set(values)) != len(values):
        raise CLIError(f"--grid {name}={text}: a value is given twice")
    return values


def grid_configs(base: TrainConfig, grid: dict[str, list]) -> list[TrainConfig]:
    """Every combination of the grid's values over base, in the grid's order (the last field fastest)."""
    names = list(grid)
    combos = itertools.product(*(grid[n] for n in names)) if names else [()]
    return [dataclasses.replace(base, **dict(zip(names, values))) for values in combos]


@dataclass
class Group:
    """Configs of one shape, trained together; `members` index the sweep's configs."""

    shape: tuple
    members: list[int] = field(default_factory=list)


def group_configs(configs: list[TrainConfig]) -> list[Group]:
    """The groups in the order of their first config."""
    groups: dict[tuple, Group] = {}
    for i, cfg in enumerate(configs):
        shape = tuple(getattr(cfg, f) for f in SHAPE)
        groups.setdefault(shape, Group(shape)).members.append(i)
    return list(groups.values())


def shard(groups: list, cost, world: int) -> list[list]:
    """Groups over `world` ranks, deterministically: the costliest first, each to the least-loaded rank (the
    lowest on ties); each rank's groups in their given order."""
    parts: list[list[int]] = [[] for _ in range(world)]
    load = [0.0] * world
    for i in sorted(range(len(groups)), key=lambda i: -cost(groups[i])):
        r = min(range(world), key=lambda r: (load[r], r))
        parts[r].append(i)
        load[r] += cost(groups[i])
    return [[groups[i] for i in sorted(part)] for part in parts]



# ---- training a group -------------------------------------------------------------------------------------------

class ModelByModel:
    """A group whose implementation is not the persistent one: each model's own stepper, as train builds it, one
    after another within each chunk, in train's calls (so every model's steps are its train run's)."""

    def __init__(self, choice: StepperChoice, models: list[CharMLP], X: torch.Tensor, Y: torch.Tensor,
                 batch_size: int, seeds: list[int], per_call: int, weight_decay: float = 0.0):
        self.steppers = [choice.build(m, X, Y, batch_size, s, weight_decay) for m, s in zip(models, seeds)]
        self.per_call = per_call

    def run(self, start: int, lrs: torch.Tensor) -> torch.Tensor:  # lrs (M, n) -> (M, n)
        return torch.stack([trainer.run_chunk(s, start, lr, self.per_call) for s, lr in zip(self.steppers, lrs)])

    def store(self) -> None:
        pass  # the steppers train the models' own parameters

    def states(self) -> list[dict[str, torch.Tensor]]:
        """Each model's stepper state (the eager loop's sampler), for its checkpoint: train --resume continues it."""
        return [s.state() for s in self.steppers]


@dataclass
class GroupRun:
    """A group ready to train: its configs, their corpus (the group's block size) and implementation."""

    group: Group
    configs: list[TrainConfig]
    corpus: Corpus
    choice: StepperChoice

    @property
    def work(self) -> int:
        """Multiply-adds of one model's step, B*H*(T*E+V)."""
        c = self.configs[0]
        return step_work(len(self.corpus.vocab), c.block_size, c.n_embd, c.n_hidden, c.batch_size)

    def cost(self) -> float:
        return self.work * len(self.configs) * self.configs[0].steps

    def describe(self) -> str:
        c = self.configs[0]
        return (f"T {c.block_size}, E {c.n_embd}, H {c.n_hidden}, B {c.batch_size}, {c.steps:,} steps: "
                f"{len(self.configs)} model{'s' if len(self.configs) > 1 else ''}, {self.choice.impl}")


@dataclass
class Trained:
    """A trained config: its record (results.jsonl) and, while it may still be saved, its model."""

    record: dict
    model: CharMLP | None = None
    first_loss: float | None = None
    state: dict = field(default_factory=dict)  # its stepper's state() (what train's checkpoint holds besides)


def build_models(run: GroupRun, device: torch.device) -> list[CharMLP]:
    V = len(run.corpus.vocab)
    return [CharMLP(V, c.block_size, c.n_embd, c.n_hidden, kernels=run.choice.model_kernels, seed=c.seed,
                    init=init_of(c), direct=c.direct).to(device) for c in run.configs]


def build_stepper(run: GroupRun, models: list[CharMLP], X: torch.Tensor, Y: torch.Tensor, threads: int):
    """-> (stepper, steps per call): one sgd_train call for the whole group where the persistent implementation
    runs, its calls as long as train's for one model (a second Ctrl-C stays prompt) -- on the CPU times the models
    per thread, which share the cores; on CUDA each model has its own blocks, so M models take one model's time;
    else ModelByModel."""
    c, seeds = run.configs[0], [c.seed for c in run.configs]
    if run.choice.impl == "persistent":
        stepper = PersistentGroupStepper(models, X, Y, c.batch_size, seeds, run.choice.cluster_size,
                                         c.weight_decay)
        per_thread = 1 if X.device.type == "cuda" else -(-len(models) // threads)
        return stepper, trainer.steps_per_call("persistent", run.work * per_thread)
    per_call = trainer.steps_per_call(run.choice.impl, run.work)
    return ModelByModel(run.choice, models, X, Y, c.batch_size, seeds, per_call, c.weight_decay), sys.maxsize


def check_divergence(losses: torch.Tensor, lrs: torch.Tensor, start: int, first: list, errors: list,
                     vocab_size: int) -> None:
    """train's divergence check for every model of a chunk's losses (M, n), with one host sync: a model that
    diverges gets train's message in errors[m] (its row keeps training, harmlessly: the models are independent);
    first[m] is the loss of its first step."""
    stats = torch.stack([losses.mean(1), torch.isfinite(losses).all(1).float(), losses[:, 0]]).tolist()
    for m, (mean, finite, first_now) in enumerate(zip(*stats)):
        first[m] = first_now if first[m] is None else first[m]
        bound = trainer.DIVERGENCE_FACTOR * max(math.log(vocab_size), first[m])
        if errors[m] is None and (not finite or mean > bound):
            try:
                trainer.chunk_stats(losses[m], lrs[m], start, first[m], vocab_size)
            except trainer.TrainingDiverged as e:
                errors[m] = str(e)


def train_group(run: GroupRun, device: torch.device, threads: int, bar, sigint: dict) -> list[Trained] | None:
    """Train a group's models for their steps, in train's chunks; -> one Trained per config, or None when a signal
    stopped it between chunks."""
    cfg0, M, V = run.configs[0], len(run.configs), len(run.corpus.vocab)
    splits = {name: (X.to(device), Y.to(device)) for name, (X, Y) in run.corpus.splits.items()}
    models = build_models(run, device)
    stepper, per_call = build_stepper(run, models, *splits["train"], threads)
    first, errors, step = [None] * M, [None] * M, 0
    t0 = time.perf_counter()
    for n in trainer.chunk_sizes(cfg0, 0):
        if sigint["interrupted"]:
            return None
        lrs = torch.stack([lrs_of(c, step, n) for c in run.configs])
        losses = trainer.run_chunk(stepper, step, lrs, per_call)
        check_divergence(losses, lrs, step, first, errors, V)
        step += n
        bar.update(M * n)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    wall = time.perf_counter() - t0
    stepper.store()
    states = stepper.states() if isinstance(stepper, ModelByModel) else [{}] * M  # Philox: stateless
    out = []
    for i, cfg, model, err, first_loss, state in zip(run.group.members, run.configs, models, errors, first, states):
        record = new_record(run, i, cfg, device, "ok" if err is None else "diverged", steps=step, wall_s=wall)
        if err is None:
            record["train_loss"] = trainer.evaluate(model, *trainer.train_eval_split(*splits["train"])).item()
            record["dev_loss"] = trainer.evaluate(model, *splits["dev"]).item()
        else:
            record["error"] = err
        out.append(Trained(record, model, first_loss, state))
    return out


def new_record(run: GroupRun, i: int, cfg: TrainConfig, device: torch.device, status: str, steps: int = 0,
               wall_s: float = 0.0) -> dict:
    """Config i's line of results.jsonl, its losses still to come."""
    return {"id": i, "config": dataclasses.asdict(cfg), "status": status, "train_loss": None, "dev_loss": None,
            "steps": steps, "wall_s": wall_s, "models_in_call": len(run.configs),
            "device": trainer.device_name(device), "impl": run.choice.impl}


def failed(run: GroupRun, error: Exception, device: torch.device) -> list[Trained]:
    """The records of a group whose training raised: every config of it failed, with the error's first line."""
    lines = str(error).strip().splitlines()
    message = f"{type(error).__name__}: {lines[0] if lines else ''}"
    return [Trained({**new_record(run, i, c, device, "failed"), "error": message})
            for i, c in zip(run.group.members, run.configs)]


# ---- the sweep ----------------------------------------------------------------------------------------------------

# Fields that are the sweep's, one value for all its configs (the data, where and how it runs).
COMMON = ("data", "tokens", "max_vocab", "min_count", "lower", "context", "vocab_from", "device", "impl", "threads",
          "log_every")


def common(configs: list[TrainConfig], name: str):
    values = {getattr(c, name) for c in configs}
    if len(values) > 1:
        raise CLIError(f"the configs of a sweep share their {name}, got {sorted(map(str, values))}")
    return values.pop()


def sweep_device(configs: list[TrainConfig], ranks: Ranks) -> torch.device:
    """The sweep's device; under torchrun each process takes the GPU of its LOCAL_RANK."""
    return rank_device(resolve_device(common(configs, "device")), ranks)


def prepare(configs: list[TrainConfig], device: torch.device) -> list[GroupRun]:
    """The groups with their corpora (one per block size) and implementations, all checked before any training:
    an --impl that cannot run a group is an error now."""
    for name in COMMON:
        common(configs, name)
    for c in configs:
        if c.resume or c.eval_every:
            raise CLIError("a sweep trains each config from the start and evaluates it at the end: resume and "
                           "eval_every are train's (train the best config on with train --resume)")
        if c.epochs or c.patience:
            raise CLIError(f"{'epochs' if c.epochs else 'patience'}: a sweep trains each config for its steps and "
                           "evaluates it at the end; epochs and early stopping are train's")
    corpora: dict[int, Corpus] = {}
    runs = []
    for group in group_configs(configs):
        cfgs = [configs[i] for i in group.members]
        c = cfgs[0]
        if c.block_size not in corpora:
            corpora[c.block_size] = load_corpus_for(c)
        corpus = corpora[c.block_size]
        choice = select_stepper(c.impl, device, (len(corpus.vocab), c.block_size, c.n_embd, c.n_hidden, c.batch_size),
                                direct=c.direct)
        runs.append(GroupRun(group, cfgs, corpus, choice))
    return runs


def group_threads(setting: int | str, run: GroupRun, share: int) -> int:
    """Intra-op threads for a group: as --threads says; auto: this process's share of the cores for several
    models (they run side by side on the threads), train's choice for one."""
    if setting != "auto":
        return int(setting)
    return share if len(run.configs) > 1 else threads_for("auto", run.work, default=share)


def train_groups(runs: list[GroupRun], device: torch.device, ranks: Ranks, save: str, progress: bool,
                 on_group=None) -> tuple[list[Trained], bool]:
    """Train this rank's groups one after another; -> (their Trained, whether a signal stopped the sweep). Only
    the rank's best model is kept in memory (the sweep's best is one of the ranks' bests); with save "all" every
    model's checkpoint is written as its group ends. on_group(trained so far) runs after each group."""
    done: list[Trained] = []
    total = sum(len(r.configs) * r.configs[0].steps for r in runs)
    with trainer.deferred_sigint() as sigint, tqdm(total=total, unit="model-step", unit_scale=True,
                                                   disable=not progress, dynamic_ncols=True) as bar:
        for run in runs:
            with intra_op_threads(group_threads(run.configs[0].threads, run, core_share(ranks))) as threads:
                try:
                    trained = train_group(run, device, threads, bar, sigint)
                except Exception as e:  # the sweep goes on; the records say which configs failed and why
                    trained = failed(run, e, device)
            if trained is None:
                return done, True
            if save == "all":
                for t in trained:
                    if t.record["status"] == "ok":
                        save_model(t, run.corpus, Path(t.record["config"]["out"]))
            done += trained
            keep_best_model(done)
            where = f"process {ranks.rank}: " if ranks.world > 1 else ""
            bar.write(f"{where}group {run.describe()}: {trained[0].record['wall_s']:.1f} s")
            if on_group is not None:
                on_group(done)
    return done, False


def dev_key(record: dict) -> tuple:
    """Sort key: ok configs by dev loss, then the rest in config order."""
    ok = record["status"] == "ok" and record["dev_loss"] is not None and math.isfinite(record["dev_loss"])
    return (0, record["dev_loss"], record["id"]) if ok else (1, 0.0, record["id"])


def keep_best_model(done: list[Trained]) -> None:
    best = min(done, key=lambda t: dev_key(t.record))
    for t in done:
        if t is not best:
            t.model = None


def save_model(t: Trained, corpus: Corpus, out: Path) -> None:
    """t's checkpoint in out/model.safetensors, as train writes it (train --resume continues it)."""
    config = {**t.record["config"], "out": str(out)}
    save_checkpoint(out / "model.safetensors", t.model, corpus.vocab, config,
                    {"step": t.record["steps"], "impl": t.record["impl"], "first_loss": t.first_loss}, t.state)


def gather(trained: list[Trained], ranks: Ranks, device: torch.device) -> list[Trained]:
    """Every rank's Trained on rank 0 (in config order), through torch.distributed; [] on the other ranks. Models
    travel as CPU tensors."""
    if ranks.world == 1:
        return sorted(trained, key=lambda t: t.record["id"])
    import torch.distributed as dist

    payload = [(t.record, None if t.model is None else [p.detach().cpu() for p in t.model.params()], t.first_loss,
                {k: v.cpu() for k, v in t.state.items()}) for t in trained]
    parts = [None] * ranks.world if ranks.rank == 0 else None
    dist.gather_object(payload, parts, dst=0)
    if ranks.rank != 0:
        return []
    out = []
    for record, params, first_loss, state in itertools.chain.from_iterable(parts):
        model = None
        if params is not None:
            c = record["config"]
            model = CharMLP(params[0].shape[0], c["block_size"], c["n_embd"], c["n_hidden"],
                            kernels=model_kernels(record["impl"], device), seed=0, direct=c["direct"])
            model.load_params(params)
            model.to(device)
        out.append(Trained(record, model, first_loss, state))
    return sorted(out, key=lambda t: t.record["id"])


# ---- the outputs --------------------------------------------------------------------------------------------------

CSV_FIELDS = ("id", "status", "train_loss", "dev_loss", "test_loss", "steps", "wall_s", "models_in_call", "device",
              "impl")


def swept_fields(configs: list[TrainConfig]) -> list[str]:
    """The fields whose values differ between the configs, in TrainConfig's order (out excepted)."""
    return [f.name for f in dataclasses.fields(TrainConfig)
            if f.name != "out" and len({str(getattr(c, f.name)) for c in configs}) > 1]


def finish_best(results: list[Trained], runs: list[GroupRun], device: torch.device, out: Path | None) -> None:
    """The test loss of the best config (and of it alone), and its checkpoint in out/best."""
    if not results:
        return
    best = min(results, key=lambda t: dev_key(t.record))
    if best.record["status"] != "ok" or best.model is None:
        return
    c = best.record["config"]
    corpus = next((r.corpus for r in runs if r.configs[0].block_size == c["block_size"]), None)
    if corpus is None:
        corpus = load_corpus_for(TrainConfig(**c))
    X, Y = corpus.splits["test"]
    best.record["test_loss"] = trainer.evaluate(best.model, X.to(device), Y.to(device)).item()
    if out is not None:
        save_model(best, corpus, out / "best")


def write_results(out: Path, records: list[dict], swept: list[str]) -> None:
    """results.jsonl (every field) and results.csv (the outcome, then every config field), both atomically."""
    text = "".join(json.dumps(r) + "\n" for r in records)
    atomic_write(out / "results.jsonl", lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
    # config fields named like an outcome's (steps, device, impl) as config_NAME: the outcome's is what ran
    column = {n: f"config_{n}" if n in CSV_FIELDS else n for n in (f.name for f in dataclasses.fields(TrainConfig))}
    columns = [*CSV_FIELDS, *(column[n] for n in swept), *(c for n, c in column.items() if n not in swept), "error"]

    def write(tmp):
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            w = csv.DictWriter(f, fieldnames=columns)
            w.writeheader()
            for r in records:
                config = {column[n]: v for n, v in r["config"].items()}
                w.writerow({**{k: r.get(k) for k in CSV_FIELDS}, **config, "error": r.get("error")})

    atomic_write(out / "results.csv", write)


def fmt(value) -> str:
    return f"{value:.4f}" if isinstance(value, float) else "-" if value is None else str(value)


def print_table(records: list[dict], swept: list[str], limit: int = 20) -> None:
    """The configs by dev loss, best first (the first `limit`)."""
    rows = sorted(records, key=dev_key)
    head = ["rank", "id", *swept, "train", "dev", "test", "status"]
    body = [[str(k + 1), str(r["id"]), *(fmt(r["config"][s]) for s in swept), fmt(r["train_loss"]),
             fmt(r["dev_loss"]), fmt(r.get("test_loss")), r["status"]] for k, r in enumerate(rows[:limit])]
    widths = [max(len(x) for x in col) for col in zip(head, *body)]
    for line in [head, *body]:
        print("  ".join(x.rjust(w) for x, w in zip(line, widths)))
    if len(rows) > limit:
        print(f"({len(rows) - limit} more in results.csv)")
    for r in rows:
        if r["status"] != "ok":
            print(f"config {r['id']} {r['status']}: {r['error']}")


def print_seed_path(records: list[dict]) -> None:
    """--preset seed: the steps the seed took (embedding 2 with hidden 100, then 300; embedding 10 with hidden
    200), each with its best learning rate of the sweep."""
    print("\nthe seed's path (best learning rate of each):")
    print(f"{'n_embd':>6} {'n_hidden':>8} {'lr':>6} {'train':>7} {'dev':>7}")
    for E, H in SEED_PATH:
        rows = [r for r in records if (r["config"]["n_embd"], r["config"]["n_hidden"]) == (E, H)]
        if rows:
            r = min(rows, key=dev_key)
            print(f"{E:>6} {H:>8} {r['config']['lr']:>6g} {fmt(r['train_loss']):>7} {fmt(r['dev_loss']):>7}")
    print(f"(the seed's final model, n_embd 10 and n_hidden 200 at lr 0.1, reached dev {SEED_DEV_LOSS} on "
          "names.txt)")


# ---- the Python API and the command line ----------------------------------------------------------------------

def sweep(configs: list, *, out: str | os.PathLike | None = None, save: str = "best", plots: bool = True,
          progress: bool = True) -> list[dict]:
    """Train configs (TrainConfigs, or dicts of their fields over the defaults) as one sweep: -> one record per
    config, in their order (results.jsonl's lines), the best one with its test loss. With out, also the files
    described at the top (save "best", "all" or "none" for the checkpoints). Under torchrun every process calls it
    with the same configs; rank 0 returns the records, the others []. Ctrl-C: KeyboardInterrupt once the finished
    groups are written."""
    configs = [trainer.config_from(c, lengths=False) for c in configs]
    if not configs:
        raise CLIError("a sweep needs at least one config")
    if out is not None:  # config i's outputs are the sweep's: out/runs/iii (its checkpoint with save "all")
        configs = [dataclasses.replace(c, out=str(Path(out) / "runs" / f"{i:03d}")) for i, c in enumerate(configs)]
    if save not in ("best", "all", "none") or (save == "all" and out is None):
        raise CLIError(f"save={save!r}: one of best, all (with an output directory) or none")
    ranks = Ranks.from_env()
    device = sweep_device(configs, ranks)
    runs = prepare(configs, device)
    out = check_out_dir(out) if out is not None and ranks.rank == 0 else None
    lock = lock_out_dir(out) if out is not None else None
    try:
        with process_group(ranks, device):
            mine = shard(runs, GroupRun.cost, ranks.world)[ranks.rank]
            swept = swept_fields(configs)
            write = (lambda done: write_results(out, [t.record for t in sorted(done, key=lambda t: t.record["id"])],
                                                swept)) if out is not None and ranks.world == 1 else None
            trained, interrupted = train_groups(mine, device, ranks, save, progress and ranks.rank == 0, write)
            results = gather(trained, ranks, device)
        if ranks.rank != 0:
            return []
        finish_best(results, runs, device, out if save != "none" else None)
        records = [t.record for t in results]
        if out is not None:
            write_results(out, records, swept)
            if plots and swept:
                from charmlp_fast.plots import plot_sweep

                plot_sweep(out / "sweep.png", records, swept)
    finally:
        if lock is not None:
            lock.close()
    if interrupted:
        print(f"interrupted: {len(records)} of {len(configs)} configs trained"
              + (f", their results in {out}" if out is not None else ""), file=sys.stderr)
        raise KeyboardInterrupt
    return records


def estimate_seconds(run: GroupRun, device: torch.device, threads: int) -> float:
    """A group's training time, from a few timed steps of its models (after a warm-up call)."""
    splits = run.corpus.splits["train"]
    X, Y = splits[0].to(device), splits[1].to(device)
    models = build_models(run, device)
    stepper, per_call = build_stepper(run, models, X, Y, threads)
    k = max(3, min(200, 2 ** 25 // (run.work * len(models))))
    lrs = torch.stack([lrs_of(c, 0, k + 2) for c in run.configs])
    trainer.run_chunk(stepper, 0, lrs[:, :2], per_call)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    trainer.run_chunk(stepper, 2, lrs[:, 2:], per_call)
    sync()
    return (time.perf_counter() - t0) / k * run.configs[0].steps


def dry_run(configs: list[TrainConfig]) -> None:
    """Print the configs, their groups and the estimated time (per process under torchrun), training nothing."""
    ranks = Ranks.from_env()
    device = sweep_device(configs, ranks)
    runs = prepare(configs, device)
    if ranks.rank != 0:
        return
    swept = swept_fields(configs)
    print(f"{len(configs)} configs" + (": id " + ", ".join(swept) if swept else ""))
    for i, c in enumerate(configs):
        print(f"  {i:3d} " + ", ".join(f"{s}={getattr(c, s)}" for s in swept))
    print(f"{len(runs)} groups on {device}:")
    seconds = {}
    for run in runs:
        with intra_op_threads(group_threads(run.configs[0].threads, run, core_share(ranks))) as threads:
            seconds[id(run)] = estimate_seconds(run, device, threads)
        print(f"  {run.describe()}: ~{seconds[id(run)]:,.1f} s")
    for rank, part in enumerate(shard(runs, GroupRun.cost, ranks.world)):
        where = f"process {rank}: " if ranks.world > 1 else ""
        print(f"{where}estimated {sum(seconds[id(r)] for r in part):,.1f} s of training")


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog="python -m charmlp_fast.sweep", description=__doc__.split("\n\n")[0],
                       argument_default=argparse.SUPPRESS)
    add_model_data_arguments(p)
    trainer.add_training_arguments(p)
    p.add_argument("--grid", action="append", metavar="NAME=VALUES",
                   help="sweep a train field: NAME=V1,V2,... or, for integers, A:B[:STEP] (inclusive); repeat for "
                        f"more fields (every combination is a config). Fields: {', '.join(SWEEPABLE)}")
    p.add_argument("--preset", choices=sorted(PRESETS),
                   help="seed: the seed's exploration (n_hidden 100,200,300 x n_embd 2,10 x lr 0.05,0.1,0.2)")
    p.add_argument("--out", help="output directory (default sweep)")
    p.add_argument("--save", choices=("best", "all", "none"),
                   help="checkpoints to keep: the best config's (default), every config's, or none")
    p.add_argument("--dry-run", action="store_true", help="print the configs, groups and estimated time; train nothing")
    p.add_argument("--no-plots", dest="plots", action="store_false", help="do not write sweep.png")
    return p


def parse_args(argv: list[str] | None = None) -> tuple[list[TrainConfig], dict]:
    """-> (the configs, the sweep's own options: out, save, plots, dry_run, preset)."""
    p = build_parser()
    given = vars(p.parse_args(argv))
    options = {"out": Path(given.pop("out", "sweep")), "save": given.pop("save", "best"),
               "plots": given.pop("plots", True), "dry_run": given.pop("dry_run", False),
               "preset": given.pop("preset", None)}
    grid = parse_grid(p, given.pop("grid", []))
    both = sorted(set(grid) & set(given))
    if both:
        raise CLIError(f"--{both[0].replace('_', '-')} is given both as a fixed value and in --grid")
    if options["preset"]:
        grid = {**{k: v for k, v in PRESETS[options["preset"]].items() if k not in given}, **grid}
    base = with_token_defaults(dataclasses.replace(TrainConfig(), **given), {*given, *grid}, lengths=False)
    return grid_configs(base, grid), options


def main(argv: list[str] | None = None) -> int:
    configs, options = parse_args(argv)
    if options["dry_run"]:
        dry_run(configs)
        return 0
    records = sweep(configs, out=options["out"], save=options["save"], plots=options["plots"])
    if records:
        print_table(records, swept_fields(configs))
        if options["preset"] == "seed":
            print_seed_path(records)
        best = min(records, key=dev_key)
        if best["status"] == "ok":
            saved = options["out"] / "best" / "model.safetensors"
            print(f"best: config {best['id']}, dev {best['dev_loss']:.4f}, test {best['test_loss']:.4f}"
                  + (f"; its checkpoint {saved}" if options["save"] != "none" else ""))
        print(f"wrote results.jsonl, results.csv{', sweep.png' if options['plots'] else ''} in {options['out']}")
    return 0


if __name__ == "__main__":
    run_main("charmlp_fast.sweep", main)
else:
    import charmlp_fast

    charmlp_fast.callable_module(__name__, sweep)
