"""The paper's model and training (Bengio et al. 2003) beyond the seed's: the direct connections from the context to
the output (--direct, y = b + W x + U tanh(d + H x)) and weight decay on the weights (--weight-decay), in the
model, every stepper the CPU runs, the trainer, its checkpoints and the sweep. The kernel-level checks of both are
in test_persistent.py (test_direct_connections_and_weight_decay_match_reference)."""
from __future__ import annotations

import dataclasses
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from charmlp_fast import ops
from charmlp_fast.checkpoint import load_checkpoint
from charmlp_fast.model import CharMLP, param_shapes
from charmlp_fast.steppers import EagerStepper, PersistentStepper, select_stepper
from charmlp_fast.train import config_from, train
from tests.utils import assert_close, rel_error

ROOT = Path(__file__).resolve().parents[1]
V, T, E, H, B = 23, 3, 4, 16, 8
requires_fused = pytest.mark.skipif(not ops.kernels_built("cpu"), reason="the fused CPU kernels are not built")


def papers_logits(model: CharMLP, idx: torch.Tensor) -> torch.Tensor:
    """b + W x + U tanh(d + H x), written out from the model's parameters (W2 = [U; W])."""
    x = model.C[idx].view(idx.shape[0], -1)
    U, W = model.W2[:model.n_hidden], model.W2[model.n_hidden:]
    return model.b2 + x @ W + torch.tanh(model.b1 + x @ model.W1) @ U


@pytest.fixture
def sentences_dir(tmp_path) -> Path:
    """train/valid/test.txt of a tiny grammar whose next word depends on the previous one: what the direct
    connections (a linear map of the context) learn directly."""
    rng = random.Random(7)
    words = [f"w{i}" for i in range(12)]

    def lines(n):
        out = []
        for _ in range(n):
            w = rng.randrange(12)
            sentence = []
            for _ in range(rng.randint(3, 8)):
                sentence.append(words[w])
                w = (w * 5 + rng.choice((1, 2))) % 12
            out.append(" ".join(sentence))
        return "\n".join(out) + "\n"

    d = tmp_path / "corpus"
    d.mkdir()
    for name, n in (("train.txt", 600), ("valid.txt", 80), ("test.txt", 80)):
        (d / name).write_text(lines(n), encoding="utf-8")
    return d


# ---- the model ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("init", ["seed", "scaled"])
def test_direct_rows_are_drawn_after_the_others(init):
    """direct=True appends T*E rows to W2 and leaves every other draw as it was (the seed's parity holds)."""
    plain, direct = CharMLP(V, T, E, H, init=init), CharMLP(V, T, E, H, init=init, direct=True)
    assert tuple(direct.W2.shape) == (H + T * E, V) == param_shapes(V, T, E, H, direct=True)[3]
    for name in ("C", "W1", "b1", "b2"):
        assert torch.equal(getattr(plain, name), getattr(direct, name)), name
    assert torch.equal(plain.W2, direct.W2[:H])
    assert direct.W2[H:].abs().max() > 0  # drawn, not zeros


@pytest.mark.parametrize("kernels", ["reference", pytest.param("fused", marks=requires_fused)])
def test_direct_forward_and_gradients_are_the_papers(kernels):
    model = CharMLP(V, T, E, H, kernels=kernels, init="scaled", direct=True, seed=3)
    with torch.no_grad():
        model.W2[H:].normal_(0, 0.3)  # direct connections that matter
    idx = torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(1))
    y = torch.randint(0, V, (B,), generator=torch.Generator().manual_seed(2))
    expected = F.cross_entropy(papers_logits(model, idx), y)
    want = torch.autograd.grad(expected, model.params())
    _, loss = model(idx, y)
    got = torch.autograd.grad(loss, model.params())
    assert_close(loss, expected, rtol=1e-6, name="loss")
    for name, g, w in zip(("C", "W1", "b1", "W2", "b2"), got, want):
        assert rel_error(g, w) <= 1e-5, f"{name}: {rel_error(g, w):.2e}"
    logits, _ = model(idx)
    assert_close(logits, papers_logits(model, idx), rtol=1e-5, atol=1e-6, name="logits")


@pytest.mark.parametrize("kernels", ["reference", pytest.param("fused", marks=requires_fused)])
def test_eager_weight_decay_is_on_the_weights_only(kernels):
    """One eager step with weight decay wd: p - lr * (g + wd * p) for C, W1, W2; p - lr * g for the biases."""
    X = torch.randint(0, V, (200, T), generator=torch.Generator().manual_seed(4))
    Y = torch.randint(0, V, (200,), generator=torch.Generator().manual_seed(5))
    lr, wd = 0.1, 0.3
    model = CharMLP(V, T, E, H, kernels=kernels, init="scaled", direct=True)
    before = [p.detach().clone() for p in model.params()]
    stepper = EagerStepper(model, X, Y, B, seed=9, weight_decay=wd)
    rows = torch.randint(0, 200, (B,), generator=torch.Generator().manual_seed(9))  # the stepper's first draw
    probe = CharMLP(V, T, E, H, kernels=kernels, init="scaled", direct=True)
    _, loss = probe(X[rows], Y[rows])
    grads = torch.autograd.grad(loss, probe.params())
    stepper.run(0, torch.tensor([lr]))
    for name, p, p0, g in zip(("C", "W1", "b1", "W2", "b2"), model.params(), before, grads):
        decayed = p0 * (1 - lr * wd) if name in ("C", "W1", "W2") else p0
        assert_close(p.detach(), decayed - lr * g, rtol=1e-5, atol=1e-7, name=name)
    with pytest.raises(ValueError, match="EagerStepper: weight_decay must be finite and >= 0, got -1"):
        EagerStepper(model, X, Y, B, seed=9, weight_decay=-1.0)


def test_the_persistent_cpu_loop_trains_direct_models_with_weight_decay():
    """PersistentStepper hands W2 (H + T*E, V) and the weight decay to sgd_train: its run equals the op's on the
    stacked parameters."""
    X = torch.randint(0, V, (300, T), generator=torch.Generator().manual_seed(6))
    Y = (X.sum(1) % V)
    a, b = CharMLP(V, T, E, H, init="scaled", direct=True), CharMLP(V, T, E, H, init="scaled", direct=True)
    lrs = torch.full((50,), 0.2)
    losses = PersistentStepper(a, X, Y, B, seed=1, weight_decay=1e-2).run(0, lrs)
    params = [p.detach().clone().unsqueeze(0) for p in b.params()]
    expected = ops.sgd_train(params, X, Y, lrs, seeds=torch.tensor([1]), batch_size=B, weight_decay=1e-2)[0]
    assert torch.equal(losses, expected)
    for p, q in zip(a.params(), params):
        assert torch.equal(p.detach(), q[0])
    assert losses[-10:].mean() < losses[:10].mean()


def test_auto_picks_the_persistent_loop_for_direct_models_on_the_cpu():
    assert select_stepper("auto", "cpu", (V, T, E, H, B), direct=True).impl == "persistent"


# ---- the trainer ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("impl", ["reference", pytest.param("fused", marks=requires_fused), "persistent"])
def test_training_with_direct_connections_and_weight_decay(tmp_path, sentences_dir, impl):
    """--direct --weight-decay trains every CPU implementation well below the uniform loss; the checkpoint holds
    W2 (H + T*E, V), its config both settings, and --resume continues it."""
    cfg = config_from(data=str(sentences_dir), tokens="words", block_size=2, n_embd=6, n_hidden=16, batch_size=16,
                      steps=600, lr=0.3, lr_schedule="inverse", lr_decay_rate=1e-3, direct=True,
                      weight_decay=1e-4, impl=impl, device="cpu", log_every=200, out=str(tmp_path / "run"),
                      num_samples=3, plots=False)
    metrics = train(cfg, progress=False).metrics
    vocab_size = len(load_checkpoint(tmp_path / "run" / "model.safetensors").vocab)
    assert metrics["losses"]["dev"] < 0.6 * torch.log(torch.tensor(float(vocab_size))).item()
    ckpt = load_checkpoint(tmp_path / "run" / "model.safetensors")
    assert ckpt.params[3].shape == (16 + 2 * 6, vocab_size) and ckpt.sizes["direct"] is True
    assert ckpt.config["direct"] is True and ckpt.config["weight_decay"] == 1e-4
    resumed = train(dataclasses.replace(cfg, resume=str(tmp_path / "run" / "model.safetensors"), steps=700,
                                        out=str(tmp_path / "more"), num_samples=0), progress=False).metrics
    assert resumed["steps"] == 700 and resumed["config"]["direct"] is True


def test_weight_decay_shrinks_the_weights(tmp_path, sentences_dir):
    """The same run with and without weight decay: the decayed one ends with smaller weights, same biases'
    scale."""
    norms = {}
    for wd in (0.0, 0.05):
        out = tmp_path / f"wd{wd}"
        train(config_from(data=str(sentences_dir), tokens="words", block_size=2, n_embd=6, n_hidden=16, steps=400,
                          lr=0.3, weight_decay=wd, device="cpu", out=str(out), num_samples=0, plots=False),
              progress=False)
        C, W1, _, W2, _ = load_checkpoint(out / "model.safetensors").params
        norms[wd] = [C.norm().item(), W1.norm().item(), W2.norm().item()]
    assert all(d < 0.9 * n for d, n in zip(norms[0.05], norms[0.0])), norms


def test_sampling_a_direct_checkpoint(tmp_path, sentences_dir):
    train(config_from(data=str(sentences_dir), tokens="words", block_size=2, n_embd=6, n_hidden=16, steps=200,
                      direct=True, device="cpu", out=str(tmp_path), num_samples=0, plots=False), progress=False)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, "-m", "charmlp_fast.sample", "--checkpoint",
                             str(tmp_path / "model.safetensors"), "--num-samples", "3"], capture_output=True, text=True,
                            env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    assert len(result.stdout.strip().splitlines()) >= 3


@pytest.mark.parametrize("value", ["-1e-4", "nan", "x"])
def test_a_bad_weight_decay_is_one_line(value):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, "-m", "charmlp_fast.train", "--weight-decay", value], capture_output=True,
                            text=True, env=env, timeout=120)
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) <= 2 and "--weight-decay" in result.stderr  # usage + the error
    assert "Traceback" not in result.stderr
