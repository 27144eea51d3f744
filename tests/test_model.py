"""CharMLP(kernels="reference") is the seed's code, bit for bit."""
from __future__ import annotations

import math

import pytest
import torch

from charmlp_fast import reference
from charmlp_fast.model import CharMLP


@pytest.mark.parametrize("V, T, E, H", [(27, 3, 10, 200), (5, 1, 2, 7), (40, 8, 3, 33)])
def test_reference_model_is_bitwise_the_seed(V, T, E, H):
    model = CharMLP(V, T, E, H, kernels="reference")
    params = reference.init_params(V, T, E, H)
    for p, q in zip(model.params(), params):
        assert torch.equal(p.detach(), q)
    g = torch.Generator().manual_seed(0)
    X = torch.randint(0, V, (64, T), generator=g)
    Y = torch.randint(0, V, (64,), generator=g)
    for q in params:
        q.requires_grad_(True)
    logits_ref, loss_ref = reference.forward(params, X, Y)
    loss_ref.backward()
    logits, loss = model(X, Y)
    loss.backward()
    assert torch.equal(logits, logits_ref) and torch.equal(loss, loss_ref)
    for p, q in zip(model.params(), params):
        assert torch.equal(p.grad, q.grad)


def test_seed_initial_draws():
    # A known value of the seed's first draw: init follows the seed's generator, not nn.Linear's own init.
    model = CharMLP(27)
    assert model.C[0, 0].item() == pytest.approx(1.5674, abs=1e-4)  # the seed's C[0] starts [1.5674, -0.2373, ...]


def test_logits_without_targets():
    model = CharMLP(10, 2, 4, 8)
    logits, loss = model(torch.zeros(3, 2, dtype=torch.long))
    assert logits.shape == (3, 10) and loss is None


@pytest.mark.parametrize("kwargs, message", [
    (dict(vocab_size=0), "vocab_size must be >= 1"),
    (dict(vocab_size=5, n_hidden=-1), "n_hidden must be >= 1"),
    (dict(vocab_size=5, kernels="nope"), "kernels must be one of"),
])
def test_bad_sizes(kwargs, message):
    with pytest.raises(ValueError, match=message):
        CharMLP(**kwargs)


@pytest.mark.parametrize("V, T, E, H", [(27, 3, 10, 200), (10_000, 4, 30, 100), (16_000, 4, 60, 50)])
def test_scaled_init_starts_at_a_uniform_guess(V, T, E, H):
    """init="scaled": the seed's draws rescaled, a first loss within 0.02 nats of ln V (the seed's: tens)."""
    g = torch.Generator().manual_seed(1)
    X, Y = torch.randint(0, V, (2048, T), generator=g), torch.randint(0, V, (2048,), generator=g)
    scaled, seed = CharMLP(V, T, E, H, init="scaled"), CharMLP(V, T, E, H)
    assert abs(scaled(X, Y)[1].item() - math.log(V)) < 0.02
    assert seed(X, Y)[1].item() > math.log(V) + 5
    assert torch.equal(scaled.C, seed.C) and not scaled.b2.any()
    assert torch.equal(scaled.W1, seed.W1 * ((5 / 3) / (T * E) ** 0.5))
    with pytest.raises(ValueError, match="init must be one of"):
        CharMLP(V, T, E, H, init="xavier")
