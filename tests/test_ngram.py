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
