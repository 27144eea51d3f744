"""--epochs, the dev loss at every epoch's end, early stopping (--patience) and best.safetensors: the steps an epoch
makes, where the run stops and which model it reports, across a resume, and the CLI's refusals. Tiny models on a
tiny corpus, CPU only."""
from __future__ import annotations

import dataclasses
import json
import math
import os
import signal

import pytest
import torch
from test_cli_failures import error_line, run_many
from utils import SYLLABLES, write_syllable_words

import charmlp_fast
import charmlp_fast.train as train_module
from charmlp_fast.checkpoint import load_checkpoint, save_checkpoint
from charmlp_fast.cli import CLIError
from charmlp_fast.config import resolve_config
from charmlp_fast.data import load_corpus_for
from charmlp_fast.train import TrainConfig, parse_args, train

# lr 0.5 at batch 64 on this corpus: the dev loss stops improving after a few epochs (both samplers), so that
# --patience 2 stops it for real, well before 20 epochs.
EARLY = dict(epochs=20, patience=2, lr=0.5)


@pytest.fixture
def words_file(tmp_path):
    return write_syllable_words(tmp_path / "words.txt", seed=7, draws=400, max_syllables=3, syllables=SYLLABLES[:9])


def small(words_file, out, **kw) -> TrainConfig:
    base = dict(data=str(words_file), device="cpu", impl="reference", n_hidden=32, batch_size=64, log_every=5,
                num_samples=2, plots=False, out=str(out))
    return TrainConfig(**{**base, **kw})


def epoch_steps(cfg: TrainConfig) -> int:
    return math.ceil(load_corpus_for(cfg).splits["train"][0].shape[0] / cfg.batch_size)


def jsonl(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def params(path) -> list[torch.Tensor]:
    return load_checkpoint(path).params


def same_params(a, b) -> bool:
    return all(torch.equal(p, q) for p, q in zip(params(a), params(b), strict=True))


def scripted_dev(monkeypatch, cfg: TrainConfig, losses: list[float]):
    """The corpus for train(cfg, corpus=...), with train's evaluate giving `losses`, in order, for the dev split's
    first len(losses) evaluations; every other evaluation is real."""
    corpus = load_corpus_for(cfg)
    dev_X = corpus.splits["dev"][0]  # on the CPU, the run evaluates this very tensor
    script, real = list(losses), train_module.evaluate

    def evaluate(model, X, Y, *args, **kwargs):
        if script and X.data_ptr() == dev_X.data_ptr():
            return torch.tensor(script.pop(0), dtype=torch.float64)
        return real(model, X, Y, *args, **kwargs)

    monkeypatch.setattr(train_module, "evaluate", evaluate)
    return corpus


# ---- epochs ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("epochs, batch_size, eval_every", [(3, 64, 0), (2, 100, 0), (2, 64, 10)])
def test_epochs_set_the_steps_and_the_dev_loss_is_evaluated_at_every_epoch_end(tmp_path, words_file, epochs,
                                                                                batch_size, eval_every):
    cfg = small(words_file, tmp_path, epochs=epochs, batch_size=batch_size, eval_every=eval_every)
    spe = epoch_steps(cfg)
    steps = epochs * spe
    metrics = train(cfg, progress=False).metrics
    assert metrics["steps"] == steps and metrics["steps_per_epoch"] == spe and metrics["epochs_done"] == epochs
    assert metrics["config"]["steps"] == steps and metrics["config"]["epochs"] == epochs
    # the end of every epoch, or every --eval-every steps when given (it wins), and the end
    every = eval_every or spe
    evaluated = [s for s in range(every, steps, every)] + [steps]
    assert [d["step"] for d in metrics["dev_curve"]] == evaluated
    log = jsonl(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in log if "dev_loss" in r] == evaluated[:-1]  # the end's is metrics.json's
    assert all(r["epoch"] == r["step"] / spe for r in log) and log[-1]["step"] == steps
    best = min(metrics["dev_curve"], key=lambda d: d["dev_loss"])
    assert (metrics["best_step"], metrics["best_dev_loss"]) == (best["step"], best["dev_loss"])
    assert not metrics["stopped_early"]
    assert load_checkpoint(tmp_path / "model.safetensors").extra["step"] == steps


# ---- early stopping -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dev_losses, patience, epochs, stop_at, best_at", [
    ([3.0, 2.5, 2.6, 2.7], 2, 10, 4, 2),
    ([3.0, 2.9, 2.95, 2.8, 2.85, 2.86, 2.87], 3, 10, 7, 4),  # a new best restarts the count
    ([3.0, 3.0], 1, 10, 2, 1),  # an equal loss is no improvement
    ([3.0, 2.9, 2.95, 2.8], 2, 4, 4, 4),  # never patience evaluations without improvement: to the end
])
def test_early_stopping_stops_at_the_right_evaluation(tmp_path, words_file, monkeypatch, capsys, dev_losses,
                                                      patience, epochs, stop_at, best_at):
    cfg = small(words_file, tmp_path, epochs=epochs, patience=patience)
    spe = epoch_steps(cfg)
    metrics = train(cfg, corpus=scripted_dev(monkeypatch, cfg, dev_losses), progress=False).metrics
    stopped = stop_at < epochs
    assert metrics["steps"] == stop_at * spe and metrics["stopped_early"] == stopped
    assert (metrics["best_step"], metrics["best_dev_loss"]) == (best_at * spe, dev_losses[best_at - 1])
    assert [d["dev_loss"] for d in metrics["dev_curve"]] == dev_losses
    log = jsonl(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in log if "dev_loss" in r] == [k * spe for k in range(1, stop_at + stopped)]
    out = capsys.readouterr().out
    assert (f"stopped early at step {stop_at * spe:,} (epoch {stop_at:.2f})" in out) == stopped
    if stopped:
        assert f"best dev loss {dev_losses[best_at - 1]:.4f} at step {best_at * spe:,}" in out
    best = load_checkpoint(tmp_path / "best.safetensors")
    assert (best.extra["step"], best.extra["dev_loss"]) == (best_at * spe, dev_losses[best_at - 1])
    latest = load_checkpoint(tmp_path / "model.safetensors").extra
    assert (latest["step"], latest["best_step"], latest["evals_since_best"]) == (stop_at * spe, best_at * spe,
                                                                                 stop_at - best_at)


def test_the_final_metrics_are_those_of_the_best_checkpoint(tmp_path, words_file, monkeypatch):
    cfg = small(words_file, tmp_path / "early", epochs=10, patience=2)
    spe = epoch_steps(cfg)
    corpus = scripted_dev(monkeypatch, cfg, [3.0, 2.5, 2.6, 2.7])  # best at the end of epoch 2, stop after 4
    metrics = train(cfg, corpus=corpus, progress=False).metrics
    monkeypatch.undo()
    two = train(small(words_file, tmp_path / "two", steps=2 * spe), progress=False).metrics  # epoch 2's end
    early = tmp_path / "early"
    assert same_params(early / "best.safetensors", tmp_path / "two" / "model.safetensors")
    assert not same_params(early / "best.safetensors", early / "model.safetensors")  # the latest, 2 epochs on
    assert load_checkpoint(early / "model.safetensors").extra["step"] == 4 * spe
    model = load_checkpoint(early / "best.safetensors").model()
    losses = {name: train_module.evaluate(model, X, Y).item() for name, (X, Y) in corpus.splits.items()}
    assert metrics["losses"] == losses == two["losses"]
    assert metrics["ppl"] == {k: math.exp(v) for k, v in losses.items()}
    assert (metrics["valid_ppl"], metrics["test_ppl"]) == (math.exp(losses["dev"]), math.exp(losses["test"]))
    assert metrics["samples"] == two["samples"]
    saved = json.loads((early / "metrics.json").read_text())
    assert saved["losses"] == losses and saved["best_step"] == 2 * spe and saved["stopped_early"] is True


def interrupt_at(monkeypatch, step: int) -> None:
    """A Ctrl-C once the chunk that reaches `step` is trained: the run stops there, as a user's would."""
    real = train_module.train_chunk

    def train_chunk(run, n, per_call):
        out = real(run, n, per_call)
        if run.step >= step and run.step - n < step:
            os.kill(os.getpid(), signal.SIGINT)
        return out

    monkeypatch.setattr(train_module, "train_chunk", train_chunk)


@pytest.mark.parametrize("impl", ["reference", "persistent"])
def test_a_resumed_early_stopping_run_ends_as_an_uninterrupted_one(tmp_path, words_file, monkeypatch, impl):
    full = train(small(words_file, tmp_path / "full", impl=impl, **EARLY), progress=False).metrics
    spe = full["steps_per_epoch"]
    assert full["stopped_early"] and full["best_step"] < full["steps"] - spe  # the case: it stops for real
    # Cut mid-epoch before the best (it is found after the resume), and after it (the checkpoint carries it).
    for cut in (2 * spe + 3, full["best_step"] + 3):
        part = tmp_path / f"part{cut}"
        with monkeypatch.context() as m:
            interrupt_at(m, cut)
            result = train(small(words_file, part, impl=impl, **EARLY), progress=False)
        assert result.interrupted and cut <= result.step < cut + 5
        resumed_out = tmp_path / f"resumed{cut}"  # a new --out: best.safetensors comes from the checkpoint
        cfg, ckpt = resolve_config(*parse_args(["--resume", str(part / "model.safetensors"), "--log-every", "7",
                                                "--out", str(resumed_out)]))
        metrics = train(cfg, progress=False, checkpoint=ckpt).metrics
        for key in ("steps", "best_step", "best_dev_loss", "stopped_early", "losses", "samples"):
            assert metrics[key] == full[key], key
        for name in ("model.safetensors", "best.safetensors"):
            assert same_params(resumed_out / name, tmp_path / "full" / name), name
        assert load_checkpoint(resumed_out / "best.safetensors").extra["step"] == full["best_step"]
        dev = [(r["step"], r["dev_loss"]) for r in jsonl(resumed_out / "metrics.jsonl") if "dev_loss" in r]
        assert dev == [(d["step"], d["dev_loss"]) for d in full["dev_curve"]]


def test_a_run_extended_by_epochs_equals_the_longer_run(tmp_path, words_file):
    longer = train(small(words_file, tmp_path / "three", epochs=3, patience=5), progress=False).metrics
    train(small(words_file, tmp_path / "two", epochs=2, patience=5), progress=False)
    cfg, ckpt = resolve_config(*parse_args(["--resume", str(tmp_path / "two" / "model.safetensors"),
                                            "--epochs", "3"]))
    metrics = train(cfg, progress=False, checkpoint=ckpt).metrics
    for key in ("steps", "best_step", "best_dev_loss", "losses", "dev_curve"):
        assert metrics[key] == (longer[key] if key != "dev_curve" else longer[key][-1:]), key
    # --steps instead sets the total in steps: the epochs no longer count
    cfg, _ = resolve_config(*parse_args(["--resume", str(tmp_path / "two" / "model.safetensors"), "--steps", "999"]))
    assert (cfg.epochs, cfg.steps) == (None, 999)


def test_resuming_a_run_that_stopped_early(tmp_path, words_file):
    out = tmp_path / "run"
    first = train(small(words_file, out, **EARLY), progress=False).metrics
    assert first["stopped_early"]
    (code, stderr), = run_many("train", [["--resume", str(out / "model.safetensors")]])
    assert code == 2 and "early stopping ended the run of" in error_line((code, stderr))
    assert "pass a larger --patience" in stderr
    cfg, ckpt = resolve_config(*parse_args(["--resume", str(out / "model.safetensors"), "--patience", "4",
                                            "--out", str(tmp_path / "more")]))
    more = train(cfg, progress=False, checkpoint=ckpt).metrics  # a larger patience trains on
    assert more["steps"] > first["steps"] and more["dev_curve"][0]["step"] == first["steps"] + first["steps_per_epoch"]


# ---- the refusals, the Python API and old checkpoints ----------------------------------------------------------

def test_cli_errors_are_one_line(tmp_path, words_file):
    new = ["--data", str(words_file), "--device", "cpu", "--n-hidden", "16", "--num-samples", "0", "--no-plots",
           "--out", str(tmp_path / "x")]
    done = tmp_path / "done"
    train(small(words_file, done, epochs=1), progress=False)
    cases = [
        ([*new, "--epochs", "2", "--steps", "100"], "--epochs and --steps both set the length of the run"),
        ([*new, "--patience", "2", "--steps", "100"], "--patience counts dev evaluations: give --epochs or"),
        ([*new, "--epochs", "0"], "--epochs: expected a positive integer, got 0"),
        ([*new, "--epochs", "2", "--patience", "0"], "--patience: expected a positive integer, got 0"),
        (["--resume", str(done / "model.safetensors"), "--epochs", "1"], "pass --epochs above that to continue"),
    ]
    results = run_many("train", [args for args, _ in cases])
    for (args, message), (code, stderr) in zip(cases, results):
        assert code == 2 and message in error_line((code, stderr)), (args, stderr)
    assert not (tmp_path / "x" / "model.safetensors").exists()


def test_python_api_takes_epochs_and_sweep_refuses_them(tmp_path, words_file):
    cfg = small(words_file, tmp_path / "api", epochs=2, patience=3)
    metrics = charmlp_fast.train(dataclasses.asdict(cfg), progress=False)
    assert metrics["steps"] == 2 * epoch_steps(cfg) and metrics["config"]["patience"] == 3
    with pytest.raises(CLIError, match="patience: expected a positive integer"):
        charmlp_fast.train(dataclasses.asdict(cfg), patience=0)
    with pytest.raises(CLIError, match="--patience counts dev evaluations"):
        charmlp_fast.train(dataclasses.asdict(cfg), epochs=None, steps=20, progress=False)
    for field in ("epochs", "patience"):
        with pytest.raises(CLIError, match=f"^{field}: a sweep trains each config for its steps"):
            charmlp_fast.sweep([{**dataclasses.asdict(small(words_file, tmp_path, steps=20)), field: 2}],
                               progress=False)


def test_an_old_checkpoint_without_the_early_stopping_state_resumes(tmp_path, words_file):
    out = tmp_path / "old"
    train(small(words_file, out, steps=30, eval_every=10), progress=False)
    ck = load_checkpoint(out / "model.safetensors")
    config = {k: v for k, v in ck.config.items() if k not in ("epochs", "patience")}
    extra = {k: ck.extra[k] for k in ("step", "impl", "first_loss")}
    state = {k: v for k, v in ck.tensors.items() if not k.startswith("best.")}
    save_checkpoint(out / "model.safetensors", ck.model(), ck.vocab, config, extra, state)
    (out / "best.safetensors").unlink()
    cfg, ckpt = resolve_config(*parse_args(["--resume", str(out / "model.safetensors"), "--steps", "60",
                                            "--patience", "5"]))
    assert (cfg.epochs, cfg.patience, cfg.eval_every) == (None, 5, 10)
    metrics = train(cfg, progress=False, checkpoint=ckpt).metrics
    # the best is counted from the resume on: the evaluations before it left no parameters
    assert metrics["steps"] == 60 and metrics["best_step"] in (40, 50, 60)
    assert load_checkpoint(out / "best.safetensors").extra["step"] == metrics["best_step"]
