"""What users expect of the trainer beyond the seed: lr finder, plots, resume, metrics log, sampling options,
word-level models, Ctrl-C and divergence handling. CPU only, small corpora made here."""
from __future__ import annotations

import dataclasses
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from utils import write_syllable_words

from charmlp_fast import lr_find
from charmlp_fast.checkpoint import load_checkpoint
from charmlp_fast.config import resolve_config
from charmlp_fast.data import UNK, WORD_BOUNDARY, Vocab, build_dataset, load_corpus, tokenize_sentences
from charmlp_fast.model import CharMLP
from charmlp_fast.plots import embedding_2d
from charmlp_fast.sample import novelty, sample_names
from charmlp_fast.steppers import EagerStepper
from charmlp_fast.train import TrainConfig, TrainingDiverged, parse_args, train

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def words_file(tmp_path) -> Path:
    return write_syllable_words(tmp_path / "words.txt", seed=5, draws=3000)


@pytest.fixture
def text_file(tmp_path) -> Path:
    """Running text from a tiny grammar: sentences with a structure a word-level model can learn."""
    rng = random.Random(11)
    subjects = ["the cat", "a dog", "my friend", "the old man", "she", "he", "the children"]
    verbs = ["sees", "likes", "finds", "follows", "paints", "reads"]
    objects = ["the river", "a red ball", "the small house", "an apple", "the moon", "her book"]
    sentences = [f"{rng.choice(subjects)} {rng.choice(verbs)} {rng.choice(objects)}"
                 + rng.choice([".", "!", "?", ". then it rains."]) for _ in range(1500)]
    paragraphs = [" ".join(sentences[i:i + 5]) for i in range(0, len(sentences), 5)]
    path = tmp_path / "text.txt"
    path.write_text("\n\n".join(p.capitalize() for p in paragraphs) + "\n", encoding="utf-8")
    return path


def small_cfg(data: Path, out: Path, **kw) -> TrainConfig:
    base = dict(data=str(data), device="cpu", impl="reference", out=str(out), num_samples=3, n_hidden=48,
                steps=400, lr_decay_step=300, log_every=50, plots=False)
    return TrainConfig(**{**base, **kw})


def run_cli(module: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, env=env, timeout=300)


# ---- learning-rate finder -----------------------------------------------------------------------------

def test_lr_suggestion_from_a_known_curve():
    exponents = torch.linspace(-3, 0, 1000)
    # A valley at 10**-1 with divergence (inf) past 10**-0.3: the suggestion is the valley / backoff.
    losses = (exponents + 1) ** 2 + 2
    losses[exponents > -0.3] = float("inf")
    suggested = lr_find.suggest(exponents, losses)
    lr_at_min = suggested * lr_find.SUGGESTION_BACKOFF
    assert 10 ** -1.15 < lr_at_min < 10 ** -0.85  # the EMA lags a little; the valley is found, not the divergence


def test_lr_find_cli_writes_plot_and_suggestion(tmp_path, words_file):
    result = run_cli("charmlp_fast.lr_find", "--data", str(words_file), "--steps", "300", "--n-hidden", "32",
                     "--device", "cpu", "--out", str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "lr_find.png").stat().st_size > 10_000
    sweep = json.loads((tmp_path / "lr_find.json").read_text())
    assert len(sweep["exponents"]) == len(sweep["losses"]) == 300
    assert f"suggested learning rate: {sweep['suggested_lr']:.3g}" in result.stdout
    assert 1e-3 <= sweep["suggested_lr"] <= 1.0


def test_lr_find_on_names_suggests_the_seeds_rate(names_txt):
    corpus = load_corpus(names_txt, 3)
    X, Y = corpus.splits["train"]
    exponents, losses = lr_find.lr_sweep(EagerStepper(CharMLP(len(corpus.vocab)), X, Y, 32, seed=1))
    assert 0.05 <= lr_find.suggest(exponents, losses) <= 0.2  # the seed settled on 0.1


# ---- plots ----------------------------------------------------------------------------------------------

def test_plots_are_written(tmp_path, words_file):
    cfg = small_cfg(words_file, tmp_path, plots=True, eval_every=200)
    train(cfg, progress=False)
    for name in ("loss.png", "embedding.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_word_embedding_labels_only_the_most_frequent(tmp_path, monkeypatch):
    import matplotlib.axes

    from charmlp_fast.plots import WORD_LABELS, plot_embedding

    labels = []
    real = matplotlib.axes.Axes.annotate
    monkeypatch.setattr(matplotlib.axes.Axes, "annotate", lambda self, text, *a, **kw: labels.append(text)
                        or real(self, text, *a, **kw))
    vocab = Vocab.from_sentences([[f"w{i}" for i in range(200)]])
    plot_embedding(tmp_path / "embedding.png", torch.randn(len(vocab), 5), vocab)
    assert labels == list(vocab.itos[:WORD_LABELS])  # <s>, <unk>, then the most frequent words
    assert (tmp_path / "embedding.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_loss_plot_after_resume_draws_the_whole_history(tmp_path, words_file, monkeypatch):
    from charmlp_fast import plots

    train(small_cfg(words_file, tmp_path, steps=200), progress=False)
    seen = []
    monkeypatch.setattr(plots, "plot_loss_curve", lambda path, records, dev: seen.append((records, dev)))
    resumed, ckpt = resolve_config(*parse_args(["--resume", str(tmp_path / "model.safetensors"), "--steps", "300"]))
    train(dataclasses.replace(resumed, plots=True), progress=False, checkpoint=ckpt)
    records, dev = seen[0]
    assert [r["step"] for r in records] == list(range(50, 301, 50))
    assert all(r["loss_p10"] <= r["loss_p50"] <= r["loss_p90"] and r["chunk_steps"] == 50 for r in records)
    assert dev[-1]["step"] == 300


def test_embedding_projection():
    C = torch.randn(20, 2)
    assert torch.equal(embedding_2d(C)[0], C)  # E == 2: the embedding itself, as in the seed
    C = torch.randn(30, 10, generator=torch.Generator().manual_seed(0)) * torch.tensor([5.0, 3.0] + [0.1] * 8)
    points, name = embedding_2d(C)
    assert name == "principal component" and points.shape == (30, 2)
    # The first two principal components carry the two dominant directions' variance.
    assert points.var(0).sum() > 0.95 * (C - C.mean(0)).var(0).sum()


# ---- resume, metrics log ---------------------------------------------------------------------------------

@pytest.mark.parametrize("impl", ["reference", "persistent"])
def test_resume_ends_with_the_parameters_of_an_uninterrupted_run(tmp_path, words_file, impl):
    full = small_cfg(words_file, tmp_path / "full", eval_every=100, impl=impl)
    train(full, progress=False)
    part = small_cfg(words_file, tmp_path / "part", steps=250, eval_every=100, impl=impl)
    train(part, progress=False)
    # Resume with a different chunking: the result must not depend on where the run was cut or read back.
    resumed, ckpt = resolve_config(*parse_args(["--resume", str(tmp_path / "part" / "model.safetensors"),
                                                "--steps", "400", "--log-every", "70", "--out", str(tmp_path / "part"),
                                                "--no-plots"]))
    metrics = train(resumed, progress=False, checkpoint=ckpt).metrics
    assert metrics["steps"] == 400 and metrics["steps_this_run"] == 150
    a = load_checkpoint(tmp_path / "full" / "model.safetensors")
    b = load_checkpoint(tmp_path / "part" / "model.safetensors")
    for p, q in zip(a.params, b.params):
        assert torch.equal(p, q)
    assert a.extra["step"] == b.extra["step"] == 400
    log = [json.loads(line) for line in (tmp_path / "part" / "metrics.jsonl").read_text().splitlines()]
    assert log[0]["step"] == 50 and log[-1]["step"] == 400  # appended across the resume
    assert all(set(r) >= {"step", "loss", "loss_mean", "lr", "steps_per_s"} for r in log)
    assert [r["step"] for r in log if "dev_loss" in r] == [100, 200, 300]
    assert log[-1]["lr"] == pytest.approx(0.01) and log[0]["lr"] == pytest.approx(0.1)


def test_a_chunk_cut_into_calls_equals_one_call(words_file):
    from charmlp_fast.steppers import PersistentStepper, lr_schedule
    from charmlp_fast.train import CALL_WORK, run_chunk, steps_per_call

    corpus = load_corpus(words_file, 3)
    X, Y = corpus.splits["train"]
    models = [CharMLP(len(corpus.vocab), n_hidden=16) for _ in range(2)]
    lrs = lr_schedule(0.1, 30, 0.01, 5, 50)
    whole = run_chunk(PersistentStepper(models[0], X, Y, 32, 1), 5, lrs, 50)
    cut = run_chunk(PersistentStepper(models[1], X, Y, 32, 1), 5, lrs, 7)  # the second Ctrl-C is seen between calls
    assert torch.equal(whole, cut)
    assert all(torch.equal(p, q) for p, q in zip(models[0].params(), models[1].params()))
    assert steps_per_call("persistent", 2 ** 20) == CALL_WORK // 2 ** 20
    assert steps_per_call("graph", 2 ** 20) == -(-(CALL_WORK // 2 ** 20) // 100) * 100  # whole graphs of 100 steps
    assert steps_per_call("reference", 1) >= 10 ** 9  # the eager loops are never cut: Python runs between steps


def test_resume_rejects_a_conflicting_flag(tmp_path, words_file):
    train(small_cfg(words_file, tmp_path, steps=100), progress=False)
    ckpt = str(tmp_path / "model.safetensors")
    result = run_cli("charmlp_fast.train", "--resume", ckpt, "--n-hidden", "64", "--steps", "200")
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "--n-hidden 64 differs from the checkpoint's 48" in result.stderr
    result = run_cli("charmlp_fast.train", "--resume", ckpt, "--steps", "100")
    assert "pass --steps above it" in result.stderr and result.returncode != 0


def test_resume_from_a_corrupt_checkpoint(tmp_path):
    bad = tmp_path / "model.safetensors"
    bad.write_bytes(b"garbage" * 10)
    result = run_cli("charmlp_fast.train", "--resume", str(bad))
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "not a readable safetensors checkpoint" in result.stderr


# ---- sampling ----------------------------------------------------------------------------------------------

def test_sampling_options(tmp_path, words_file):
    train(small_cfg(words_file, tmp_path), progress=False)
    ck = load_checkpoint(tmp_path / "model.safetensors")
    model, vocab = ck.model(), ck.vocab
    prefixed = sample_names(model, vocab, 10, seed=3, prefix="ka")
    assert all(s.startswith("ka") for s in prefixed)
    # top_k=1 is greedy decoding: every sample is the same, whatever the seed.
    greedy = {s for seed in range(4) for s in sample_names(model, vocab, 2, seed=seed, top_k=1)}
    assert len(greedy) == 1
    # A low temperature concentrates the samples on fewer distinct names than a high one.
    cold = sample_names(model, vocab, 40, seed=0, temperature=0.2)
    hot = sample_names(model, vocab, 40, seed=0, temperature=2.0)
    assert len(set(cold)) < len(set(hot))
    assert novelty(["a", "b", "c", "d"], {"a", "c"}) == 0.5


def test_sample_cli_prefix_top_k_and_novelty(tmp_path, words_file):
    train(small_cfg(words_file, tmp_path), progress=False)
    result = run_cli("charmlp_fast.sample", "--checkpoint", str(tmp_path / "model.safetensors"), "-n", "6",
                     "--prefix", "mo", "--top-k", "3")
    assert result.returncode == 0, result.stderr
    *names, report = result.stdout.splitlines()
    assert len(names) == 6 and all(n.startswith("mo") for n in names)
    training = set(load_corpus(words_file, 3).train_sequences)
    assert report == f"novelty: {novelty(names, training):.0%} of 6 samples are not in the training split"
    bad = run_cli("charmlp_fast.sample", "--checkpoint", str(tmp_path / "model.safetensors"), "--prefix", "m.")
    assert bad.returncode != 0 and "contains the boundary token" in bad.stderr and "Traceback" not in bad.stderr


# ---- word-level models -------------------------------------------------------------------------------------

def test_sentence_tokenizer():
    text = "The cat sat. The dog ran!\nIt was\nlate?\n\nNo end here"
    assert tokenize_sentences(text) == [["The", "cat", "sat"], ["The", "dog", "ran"], ["It", "was", "late"],
                                        ["No", "end", "here"]]  # the case is kept: --lower lower-cases


def test_word_vocabulary_and_dataset():
    sentences = [["a", "b", "a"], ["c", "a"], ["b"]]
    vocab = Vocab.from_sentences(sentences, max_vocab=4)
    assert vocab.itos == (WORD_BOUNDARY, UNK, "a", "b")  # "c" is cut: it becomes <unk>
    X, Y = build_dataset(sentences, vocab, 2)
    # Sentence boundaries: every sentence starts from boundary context and ends by predicting the boundary.
    assert X.tolist() == [[0, 0], [0, 2], [2, 3], [3, 2], [0, 0], [0, 1], [1, 2], [0, 0], [0, 3]]
    assert Y.tolist() == [2, 3, 2, 0, 1, 2, 0, 3, 0]
    assert vocab.decode([2, 1, 3]) == "a <unk> b"


def test_word_level_training(tmp_path, text_file, capsys):
    cfg = small_cfg(text_file, tmp_path, tokens="words", max_vocab=20, n_embd=8, block_size=3, steps=600,
                    lr_decay_step=500, eval_every=300)
    metrics = train(cfg, progress=False).metrics
    vocab = load_checkpoint(tmp_path / "model.safetensors").vocab
    assert len(vocab) == 20 and vocab.sep == " "
    # Far below the uniform log(20) = 3.0: the grammar is learned.
    assert metrics["losses"]["dev"] < 1.6
    assert all(set(s.split()) <= set(vocab.itos) for s in metrics["samples"])
    printed = capsys.readouterr().out.split("samples:\n", 1)[1].splitlines()
    assert printed[:len(metrics["samples"])] == [f"  {s}" for s in metrics["samples"]]  # a sentence a line


def test_a_prefix_in_another_case_matches_a_lower_cased_vocabulary():
    vocab = Vocab.from_sentences([["the", "cat"], ["The", "end"]])
    assert vocab.split_text("The cat, Cat") == ["The", "cat", ",", "cat"]  # "The" is a word of its own here
    assert Vocab.from_sentences([["the", "cat"]]).split_text("The Cat") == ["the", "cat"]


# ---- robustness ----------------------------------------------------------------------------------------------

def test_divergence_names_the_step_and_learning_rate(tmp_path, words_file):
    cfg = small_cfg(words_file, tmp_path, lr=1e38, steps=200)
    with pytest.raises(TrainingDiverged, match=r"at step \d+ \(learning rate 1e\+38\)"):
        train(cfg, progress=False)
    result = run_cli("charmlp_fast.train", "--data", str(words_file), "--lr", "1e38", "--steps", "200",
                     "--device", "cpu", "--out", str(tmp_path / "cli"))
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) >= 1
    assert "the training loss became" in result.stderr.strip().splitlines()[-1]


def test_ctrl_c_writes_a_checkpoint_and_exits_cleanly(tmp_path, words_file):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "charmlp_fast.train", "--data", str(words_file), "--steps",
                             "10000000", "--log-every", "50", "--device", "cpu", "--impl", "reference",
                             "--out", str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        deadline = time.time() + 120
        while not (out / "metrics.jsonl").exists() or not (out / "metrics.jsonl").read_text():
            assert proc.poll() is None and time.time() < deadline, proc.stderr.read() if proc.poll() else "timeout"
            time.sleep(0.1)
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr and "interrupted at step" in stderr
    ck = load_checkpoint(out / "model.safetensors")
    step = ck.extra["step"]
    assert step > 0 and step % 50 == 0  # stopped on a chunk boundary, so the checkpoint is consistent
    log = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert log[-1]["step"] == step


def test_the_inverse_schedule_is_the_papers(tmp_path, words_file):
    """--lr-schedule inverse: lr / (1 + r t) at every step (metrics.jsonl's lr is each chunk's last), and the
    persistent path trains with it as the eager one does."""
    cfg = small_cfg(words_file, tmp_path, lr=0.2, lr_schedule="inverse", lr_decay_rate=0.01, impl="auto")
    metrics = train(cfg, progress=False).metrics
    lrs = [r["lr"] for r in map(json.loads, (tmp_path / "metrics.jsonl").read_text().splitlines())]
    assert lrs == [torch.tensor(0.2 / (1 + 0.01 * (s - 1)), dtype=torch.float32).item() for s in range(50, 401, 50)]
    assert metrics["config"]["lr_schedule"] == "inverse" and metrics["losses"]["dev"] < 3.0
    from charmlp_fast.config import lrs_of

    step = lrs_of(TrainConfig(lr=0.1, lr_decay_step=3, lr_after=0.01), 1, 4)
    assert step.tolist() == [torch.tensor(v, dtype=torch.float32).item() for v in (0.1, 0.1, 0.01, 0.01)]
