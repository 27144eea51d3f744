"""The Kneser-Ney baseline: against a plain-Python transcription of its formula, normalisation, and the CLI."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

from charmlp_fast.ngram import KneserNey
from utils import write_syllable_words

ROOT = Path(__file__).resolve().parents[1]


def kneser_ney_reference(events: list[tuple[int, ...]], V: int):
    """Interpolated Kneser-Ney written out literally (ngram.py's docstring): -> prob(gram) for n-gram tuples."""
    n = len(events[0])
    counts = {n: Counter(events)}
    for k in range(n - 1, 0, -1):  # continuation counts: distinct tokens before each k-gram
        counts[k] = Counter(g[1:] for g in counts[k + 1])

    def discount(k):
        n1 = sum(v == 1 for v in counts[k].values())
        n2 = sum(v == 2 for v in counts[k].values())
        return n1 / (n1 + 2 * n2) if n1 else 0.5

    def prob(gram, k=n):
        if k == 0:
            return 1.0 / V
        h, lower = gram[:-1], prob(gram[1:], k - 1)
        following = [v for g, v in counts[k].items() if g[:-1] == h]
        if not following:
            return lower
        d = discount(k)
        return (max(counts[k].get(gram, 0) - d, 0) + d * len(following) * lower) / sum(following)

    return prob


def events(V: int, N: int, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(contexts (N, n - 1), targets (N,)) whose target depends on the context, with noise."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randint(0, V, (N, n - 1), generator=g)
    Y = (X.sum(1) * 3 + torch.randint(0, 3, (N,), generator=g)) % V
    return X, Y


@pytest.mark.parametrize("n", [2, 3, 4])
def test_probabilities_equal_the_formula_written_out(n):
    V = 6
    X, Y = events(V, 300, n, seed=n)
    model = KneserNey(X, Y, V)
    reference = kneser_ney_reference([tuple(r) for r in torch.cat([X, Y[:, None]], 1).tolist()], V)
    Xq, Yq = events(V, 200, n, seed=100 + n)  # seen and unseen contexts and words
    Yq[:20] = torch.arange(20) % V
    expected = torch.tensor([reference(tuple(r)) for r in torch.cat([Xq, Yq[:, None]], 1).tolist()],
                            dtype=torch.float64)
    torch.testing.assert_close(model.prob(Xq, Yq), expected, rtol=1e-12, atol=0)


@pytest.mark.parametrize("n", [2, 3, 5])
def test_every_context_gives_a_distribution(n):
    V = 9
    X, Y = events(V, 2000, n, seed=7)
    model = KneserNey(X, Y, V)
    contexts = torch.cat([X[:10], torch.randint(0, V, (10, n - 1), generator=torch.Generator().manual_seed(1))])
    p = model.prob(contexts.repeat_interleave(V, 0), torch.arange(V).repeat(len(contexts))).view(-1, V)
    assert (p > 0).all()
    torch.testing.assert_close(p.sum(1), torch.ones(len(contexts), dtype=torch.float64), rtol=1e-12, atol=0)


def test_a_longer_context_predicts_better_where_the_data_depends_on_it():
    V = 8
    X, Y = events(V, 20_000, 3, seed=3)
    Xd, Yd = events(V, 4000, 3, seed=4)
    tri = KneserNey(X, Y, V).loss(Xd, Yd)
    bi = KneserNey(X[:, 1:], Y, V).loss(Xd[:, 1:], Yd)
    # The target is 3 (a + b) + noise (mod 8): given b alone it is uniform, given (a, b) one of 3.
    assert bi == pytest.approx(math.log(V), abs=0.01)
    assert tri < math.log(3) + 0.05


def test_cli_prints_loss_and_perplexity_per_split_and_writes_json(tmp_path):
    data = write_syllable_words(tmp_path / "words.txt", seed=2, draws=2000)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, "-m", "charmlp_fast.ngram", "--data", str(data), "--order", "3",
                             "--out", str(tmp_path / "o")], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    rows = {line.split()[0]: line.split()[1:] for line in result.stdout.splitlines()[2:]}
    saved = json.loads((tmp_path / "o" / "ngram.json").read_text())
    for split in ("train", "dev", "test"):
        loss, ppl = map(float, rows[split])
        assert loss == pytest.approx(saved["losses"][split], abs=1e-4)
        assert ppl == pytest.approx(math.exp(saved["losses"][split]), abs=0.006)
    assert saved["losses"]["train"] < saved["losses"]["dev"] < math.log(saved["vocab_size"])
    bad = subprocess.run([sys.executable, "-m", "charmlp_fast.ngram", "--data", str(data), "--order", "1"],
                         capture_output=True, text=True, env=env, timeout=120)
    assert bad.returncode == 2 and bad.stderr.strip() == (
        "charmlp_fast.ngram: error: --order must be at least 2 (a context of one token)")


# ---- the mixture with the MLP (--mix) -------------------------------------------------------------------------

def test_the_fitted_mixture_weight_is_the_likelihood_maximum():
    from charmlp_fast.ngram import fit_mix_weight, mix_loss

    g = torch.Generator().manual_seed(5)
    p_mlp = torch.rand(5000, generator=g, dtype=torch.float64) * 0.5 + 1e-3
    p_kn = torch.rand(5000, generator=g, dtype=torch.float64) ** 3 + 1e-3
    lam = fit_mix_weight(p_mlp, p_kn)
    grid = torch.linspace(0, 1, 1001, dtype=torch.float64)
    best = grid[torch.tensor([mix_loss(p_mlp, p_kn, float(w)) for w in grid]).argmin()].item()
    assert 0 < lam < 1 and abs(lam - best) <= 2e-3
    assert mix_loss(p_mlp, p_kn, lam) <= min(mix_loss(p_mlp, p_kn, w) for w in (best, 0.0, 0.5, 1.0)) + 1e-12
    assert mix_loss(p_mlp, p_kn, 1.0) == pytest.approx(-p_mlp.log().mean().item(), abs=1e-12)
    assert mix_loss(p_mlp, p_kn, 0.0) == pytest.approx(-p_kn.log().mean().item(), abs=1e-12)


@pytest.fixture
def trained_words(tmp_path):
    """A small word model trained on a generated train/valid/test.txt layout: (data dir, its run's metrics)."""
    from charmlp_fast.config import TrainConfig
    from charmlp_fast.train import train

    g = torch.Generator().manual_seed(11)
    words = [f"w{i}" for i in range(40)]

    def lines(n):  # each word tends to be followed by the next one: an order-2 dependency and noise
        out = []
        for _ in range(n):
            start = int(torch.randint(0, 40, (1,), generator=g))
            out.append(" ".join(words[(start + int(k) + int(torch.randint(0, 2, (1,), generator=g))) % 40]
                                for k in range(6)))
        return "\n".join(out) + "\n"

    data = tmp_path / "corpus"
    data.mkdir()
    for name, n in (("train.txt", 600), ("valid.txt", 80), ("test.txt", 80)):
        (data / name).write_text(lines(n), encoding="utf-8")
    cfg = TrainConfig(data=str(data), tokens="words", block_size=3, n_embd=8, n_hidden=32, steps=3000, log_every=1000,
                      device="cpu", impl="reference", out=str(tmp_path / "run"), num_samples=0, plots=False)
    return data, train(cfg, progress=False).metrics


def test_mix_scores_the_checkpoint_as_train_did_and_the_fitted_mixture_is_best_on_dev(tmp_path, trained_words,
                                                                                        capsys):
    from charmlp_fast.ngram import main

    data, metrics = trained_words
    assert main(["--order", "3", "--mix", str(tmp_path / "run" / "model.safetensors"), "--mix-weight", "0.3",
                 "--out", str(tmp_path / "ng")]) == 0
    saved = json.loads((tmp_path / "ng" / "ngram.json").read_text())
    mix = saved["mix"]
    assert saved["data"]["data"] == str(data) and mix["weight"] == 0.3
    for split in ("dev", "test"):  # the MLP's loss on the n-gram's events is the one train reported
        assert mix["mlp"][split] == pytest.approx(metrics["losses"][split], abs=1e-5)
    dev = {k: mix[k]["dev"] for k in ("mlp", "mix", "mix_fitted")} | {"kn": saved["losses"]["dev"]}
    assert dev["mix_fitted"] <= min(dev.values()) + 1e-12
    rows = {line.split()[0]: line.split()[1:] for line in capsys.readouterr().out.splitlines()[-2:]}
    for split in ("dev", "test"):
        printed = [float(v) for v in rows[split]]
        expected = [math.exp(v) for v in (saved["losses"][split], mix["mlp"][split], mix["mix"][split],
                                          mix["mix_fitted"][split])]
        assert printed == pytest.approx(expected, abs=0.006)


def test_mix_refuses_other_data_flags_and_a_changed_corpus(tmp_path, trained_words):
    from charmlp_fast.cli import CLIError
    from charmlp_fast.ngram import main

    from charmlp_fast.checkpoint import CheckpointError

    data, _ = trained_words
    ckpt = str(tmp_path / "run" / "model.safetensors")
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        main(["--mix", str(tmp_path / "missing.safetensors")])
    with pytest.raises(CLIError, match=r"^--min-count 2 differs from the checkpoint's 1: --mix scores the data its "
                                       r"model was trained on$"):
        main(["--mix", ckpt, "--min-count", "2"])
    main(["--mix", ckpt, "--tokens", "words", "--data", str(data), "--order", "2"])  # the same values are fine
    (data / "train.txt").write_text("w1 w2 w3\n" * 50, encoding="utf-8")
    with pytest.raises(CLIError, match=r"the data no longer gives the vocabulary the model was trained with"):
        main(["--mix", ckpt])


def test_words_take_trains_vocabulary_defaults(tmp_path, trained_words):
    from charmlp_fast.ngram import main

    data, _ = trained_words
    main(["--tokens", "words", "--data", str(data), "--out", str(tmp_path / "a")])
    main(["--tokens", "words", "--data", str(data), "--min-count", "2", "--out", str(tmp_path / "b")])
    assert json.loads((tmp_path / "a" / "ngram.json").read_text())["data"]["min_count"] == 4  # as train's
    assert json.loads((tmp_path / "b" / "ngram.json").read_text())["data"]["min_count"] == 2
