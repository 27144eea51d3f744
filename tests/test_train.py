"""The trainer end to end on CPU: smoke run, checkpoint round trip, sampling, and one-line CLI errors."""
from __future__ import annotations

import json
import math
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from utils import write_syllable_words

from charmlp_fast import checkpoint as ckpt
from charmlp_fast.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from charmlp_fast.data import Vocab
from charmlp_fast.model import CharMLP
from charmlp_fast.sample import sample_names
from charmlp_fast.train import TrainConfig, train

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def words_file(tmp_path) -> Path:
    return write_syllable_words(tmp_path / "words.txt", seed=3, draws=3000)


def run_cli(module: str, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, cwd=cwd or ROOT,
                          env=env, timeout=300)


@pytest.mark.parametrize("impl", ["reference", "auto"])
def test_smoke_training_checkpoint_and_sampling(tmp_path, words_file, impl):
    cfg = TrainConfig(data=str(words_file), steps=600, lr_decay_step=400, eval_every=200, log_every=100,
                      device="cpu", impl=impl, out=str(tmp_path / "run"), num_samples=5, n_hidden=64)
    metrics = train(cfg, progress=False).metrics
    curve = [d["dev_loss"] for d in metrics["dev_curve"]]
    assert len(curve) == 3 and curve[-1] < curve[0] < 4.0  # the loss decreases from the first evaluation on
    assert metrics["losses"]["train"] < 2.6
    assert metrics["valid_ppl"] == math.exp(metrics["losses"]["dev"]) == metrics["ppl"]["dev"]
    assert metrics["test_ppl"] == math.exp(metrics["losses"]["test"])
    assert [r["dev_ppl"] for r in map(json.loads, (tmp_path / "run" / "metrics.jsonl").read_text().splitlines())
            if "dev_ppl" in r] == [math.exp(d["dev_loss"]) for d in metrics["dev_curve"][:-1]]
    assert len(metrics["samples"]) == 5

    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert saved["losses"] == metrics["losses"] and saved["config"]["steps"] == 600

    ck = load_checkpoint(tmp_path / "run" / "model.safetensors")
    model, vocab = ck.model(), ck.vocab
    assert ck.config["n_hidden"] == 64 and ck.extra["step"] == 600
    assert model.n_hidden == 64 and len(vocab) == model.vocab_size
    # The checkpoint holds the trained parameters: its samples equal those printed at the end of training.
    assert sample_names(model, vocab, 5) == metrics["samples"]

    result = run_cli("charmlp_fast.sample", "--checkpoint", str(tmp_path / "run" / "model.safetensors"),
                     "-n", "4", "--seed", "1", "--temperature", "0.7")
    assert result.returncode == 0, result.stderr
    *names, report = result.stdout.splitlines()
    assert len(names) == 4 and all(set(n) <= set(vocab.itos[1:]) for n in names)
    assert report.startswith("novelty: ") and report.endswith("of 4 samples are not in the training split")


def test_cli_trains_and_writes_outputs(tmp_path, words_file):
    result = run_cli("charmlp_fast.train", "--data", str(words_file), "--steps", "300", "--device", "cpu",
                     "--out", str(tmp_path / "out"), "--num-samples", "3", "--n-hidden", "32")
    assert result.returncode == 0, result.stderr
    assert "config: TrainConfig(" in result.stdout
    assert "dev" in result.stdout and "samples:" in result.stdout
    assert (tmp_path / "out" / "model.safetensors").is_file()
    assert (tmp_path / "out" / "metrics.json").is_file()


@pytest.mark.parametrize("args, message", [
    (["--data", "{missing}"], "data file not found"),
    (["--data", "{empty}"], "holds no words"),
    (["--data", "{blank}"], "holds no words"),
    (["--data", "{binary}"], "not valid UTF-8"),
    (["--steps", "0"], "--steps: expected a positive integer, got 0"),
    (["--n-hidden", "-3"], "--n-hidden: expected a positive integer, got -3"),
    (["--block-size", "x"], "--block-size: expected a positive integer, got 'x'"),
    (["--lr", "-1"], "--lr: expected a positive finite number, got -1"),
    (["--device", "tpu"], "--device 'tpu' is not a device"),
    (["--impl", "magic"], "argument --impl: invalid choice"),
])
def test_cli_errors_are_one_line(tmp_path, args, message):
    files = {"missing": tmp_path / "missing.txt", "empty": tmp_path / "empty.txt", "blank": tmp_path / "blank.txt",
             "binary": tmp_path / "binary.txt"}
    files["empty"].write_bytes(b"")
    files["blank"].write_bytes(b"\n \n\n")
    files["binary"].write_bytes(b"ab\n\xc3\x28\n")
    args = [a.format(**files) for a in args]
    if "--data" not in args:
        args += ["--data", str(ROOT / "tests" / "conftest.py")]  # any readable file: errors come first
    result = run_cli("charmlp_fast.train", *args, "--out", str(tmp_path / "out"))
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert message in lines[0]
    assert not (tmp_path / "out").exists()  # nothing half-written


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error for a machine without a GPU")
def test_cli_cuda_without_gpu(tmp_path, words_file):
    result = run_cli("charmlp_fast.train", "--data", str(words_file), "--device", "cuda", "--out", str(tmp_path))
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "no CUDA device is visible" in result.stderr.strip()


def test_sample_cli_bad_checkpoint(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    for path, message in ((bad, "not a readable safetensors checkpoint"), (tmp_path / "none", "not found")):
        result = run_cli("charmlp_fast.sample", "--checkpoint", str(path))
        assert result.returncode != 0 and "Traceback" not in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1 and message in result.stderr


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    vocab = Vocab.from_words(["ab", "ba"])
    path = tmp_path / "model.safetensors"
    save_checkpoint(path, CharMLP(len(vocab), n_hidden=8), vocab, {"steps": 1})
    before = path.read_bytes()

    def interrupted(tensors, filename, metadata=None):  # dies half-way through writing the new checkpoint
        Path(filename).write_bytes(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(ckpt, "save_file", interrupted)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, CharMLP(len(vocab), n_hidden=8, seed=1), vocab, {"steps": 2})
    assert path.read_bytes() == before  # the old checkpoint is intact
    assert [p.name for p in tmp_path.iterdir()] == ["model.safetensors"]  # no temporary file left behind
    load_checkpoint(path)


def test_checkpoint_mismatch_is_a_clear_error(tmp_path):
    vocab = Vocab.from_words(["ab", "ba"])
    path = tmp_path / "model.safetensors"
    save_checkpoint(path, CharMLP(len(vocab), n_hidden=8), vocab, {})
    from safetensors.torch import load_file, save_file
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
    tensors = load_file(str(path))
    tensors["W1"] = torch.randn(5, 5)
    save_file(tensors, str(path), metadata=metadata)
    with pytest.raises(CheckpointError, match="do not match the model sizes"):
        load_checkpoint(path)


def test_a_checkpoint_in_the_format_of_earlier_versions_loads_and_resumes(tmp_path, words_file):
    """The file layout charmlp_fast/1 has had from the start, written here without save_checkpoint: the five
    parameters, the sampler's state under "state.", and the JSON metadata (model sizes, vocabulary, config, extra).
    A change of save_checkpoint that older files would not survive fails here."""
    from safetensors.torch import save_file

    from charmlp_fast.data import load_corpus

    vocab = load_corpus(words_file, 3).vocab
    model = CharMLP(len(vocab), n_hidden=16, seed=5)
    config = {"data": str(words_file), "tokens": "chars", "max_vocab": None, "block_size": 3, "n_embd": 10,
              "n_hidden": 16, "batch_size": 32, "steps": 100, "lr": 0.1, "lr_decay_step": 100_000, "lr_after": 0.01,
              "seed": 7, "device": "cpu", "impl": "reference", "eval_every": 0, "log_every": 50,
              "out": str(tmp_path / "old"), "num_samples": 0, "plots": False, "resume": None, "threads": "auto"}
    tensors = {name: p.detach().clone() for name, p in zip(("C", "W1", "b1", "W2", "b2"), model.params())}
    tensors["state.generator"] = torch.Generator().manual_seed(11).get_state()
    metadata = {"format": "charmlp_fast/1",
                "model": json.dumps({"vocab_size": len(vocab), "block_size": 3, "n_embd": 10, "n_hidden": 16}),
                "vocab": json.dumps({"itos": list(vocab.itos), "sep": vocab.sep}), "config": json.dumps(config),
                "extra": json.dumps({"step": 100, "impl": "reference", "first_loss": 3.5})}
    path = tmp_path / "old.safetensors"
    save_file(tensors, str(path), metadata=metadata)

    ck = load_checkpoint(path)
    assert ck.extra["step"] == 100 and ck.config == config and ck.vocab == vocab
    assert all(torch.equal(p, q) for p, q in zip(ck.params, model.params()))
    assert torch.equal(ck.tensors["generator"], tensors["state.generator"])
    assert all(torch.equal(p, q) for p, q in zip(ck.model().params(), model.params()))
    result = run_cli("charmlp_fast.train", "--resume", str(path), "--steps", "150", "--out", str(tmp_path / "new"))
    assert result.returncode == 0, result.stderr
    assert "resuming at step 100" in result.stdout
    assert load_checkpoint(tmp_path / "new" / "model.safetensors").extra["step"] == 150


def test_a_words_checkpoint_of_earlier_versions_resumes_on_the_data_it_was_trained_on(tmp_path):
    """Words mode once lower-cased the text, counted the vocabulary over every sentence and built contexts within
    sentences. A checkpoint of then has no min_count, lower, context or vocab_from in its config: resolve_config
    gives it the values that rebuild that data (not today's defaults, whose vocabulary would differ), and it
    resumes."""
    from collections import Counter

    from charmlp_fast.config import checkpoint_config, resolve_config
    from charmlp_fast.data import load_corpus_for, split_words
    from charmlp_fast.train import parse_args

    rng = random.Random(2)
    sentences = [f"{rng.choice(['The', 'A', 'the'])} Name{i} {rng.choice(['runs', 'Sleeps', 'reads'])}"
                 for i in range(60)]
    path = tmp_path / "text.txt"
    path.write_text(". ".join(sentences) + ".\n", encoding="utf-8")
    # What that version did, literally: lower-case, sentences at '.', a vocabulary of all of them, the seed's split
    # and the seed's loop over each sentence.
    old = [s.lower().split() for s in sentences]
    counts = Counter(w for s in old for w in s)
    vocab = Vocab(("<s>", "<unk>", *sorted(counts, key=lambda w: (-counts[w], w))), sep=" ")
    examples = {}
    for name, split in zip(("train", "dev", "test"), split_words(old)):
        X, Y = [], []
        for s in split:
            context = [0, 0, 0]
            for ix in [vocab.stoi[w] for w in s] + [0]:
                X.append(context)
                Y.append(ix)
                context = context[1:] + [ix]
        examples[name] = (X, Y)

    config = {"data": str(path), "tokens": "words", "max_vocab": None, "block_size": 3, "n_embd": 10, "n_hidden": 16,
              "batch_size": 32, "steps": 100, "lr": 0.1, "lr_decay_step": 100_000, "lr_after": 0.01, "seed": 7,
              "device": "cpu", "impl": "reference", "eval_every": 0, "log_every": 50, "out": str(tmp_path / "old"),
              "num_samples": 0, "plots": False, "resume": None, "threads": "auto"}
    old_ckpt = tmp_path / "old.safetensors"
    save_checkpoint(old_ckpt, CharMLP(len(vocab), n_hidden=16, seed=5), vocab, config,
                    {"step": 100, "impl": "reference", "first_loss": 3.5},
                    {"generator": torch.Generator().manual_seed(11).get_state()})

    corpus = load_corpus_for(checkpoint_config(config, old_ckpt))
    assert corpus.vocab == vocab
    assert {name: (X.tolist(), Y.tolist()) for name, (X, Y) in corpus.splits.items()} == examples
    assert load_corpus_for(TrainConfig(**config)).vocab != vocab  # today's defaults would not resume it

    cfg, checkpoint = resolve_config(*parse_args(["--resume", str(old_ckpt), "--steps", "150",
                                                  "--out", str(tmp_path / "new")]))
    assert (cfg.min_count, cfg.lower, cfg.context, cfg.vocab_from) == (1, True, "sentence", "all")
    assert train(cfg, progress=False, checkpoint=checkpoint).step == 150
    new = load_checkpoint(tmp_path / "new" / "model.safetensors")
    assert new.vocab == vocab and new.config["context"] == "sentence" and new.config["lower"] is True
