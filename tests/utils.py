"""Comparison helpers that say where and how much two tensors differ, and the generated word lists of the trainer
tests."""
from __future__ import annotations

import random
from pathlib import Path

import torch

SYLLABLES = ("an", "na", "el", "la", "ri", "mo", "ka", "ly", "jo", "se", "th", "ia")


def write_syllable_words(path: Path, seed: int, draws: int, max_syllables: int = 4,
                         syllables: tuple[str, ...] = SYLLABLES) -> Path:
    """A words file for the trainer: the distinct words of `draws` random strings of 1..max_syllables syllables,
    sorted, one per line."""
    rng = random.Random(seed)
    words = {"".join(rng.choice(syllables) for _ in range(rng.randint(1, max_syllables))) for _ in range(draws)}
    path.write_text("\n".join(sorted(words)) + "\n", encoding="utf-8")
    return path


def assert_close(actual: torch.Tensor, expected: torch.Tensor, rtol: float, atol: float = 0.0,
                 name: str = "tensor", worst: int = 5) -> None:
    """Elementwise |actual - expected| <= atol + rtol * |expected|; on failure list the worst elements."""
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    a = actual.detach().double().cpu()
    e = expected.detach().double().cpu()
    if a.numel() == 0:
        return
    assert torch.isfinite(a).all() or not torch.isfinite(e).all(), f"{name}: non-finite values in result"
    err = (a - e).abs()
    excess = err - (atol + rtol * e.abs())
    if (excess <= 0).all():
        return
    flat = excess.flatten()
    k = min(worst, flat.numel())
    idx = flat.topk(k).indices
    lines = [f"{name}: {int((excess > 0).sum())} of {a.numel()} elements exceed atol={atol:g} + rtol={rtol:g}*|expected|"]
    for i in idx.tolist():
        pos = tuple(int(c) for c in torch.unravel_index(torch.tensor(i), a.shape))
        ai, ei = a.flatten()[i].item(), e.flatten()[i].item()
        rel = abs(ai - ei) / max(abs(ei), 1e-300)
        lines.append(f"  at {pos}: actual {ai:.10g} expected {ei:.10g} abs err {abs(ai - ei):.3g} rel err {rel:.3g}")
    raise AssertionError("\n".join(lines))


def rel_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |a - e| / max |e| — a norm-wise relative error, robust to elements that are near zero."""
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    if e.numel() == 0:
        return 0.0
    return ((a - e).abs().max() / e.abs().max().clamp_min(1e-300)).item()


def check_against_truth(name: str, actual: torch.Tensor, truth: torch.Tensor, torch_same_dtype: torch.Tensor | None,
                        dtype: torch.dtype) -> None:
    """The tolerance against a float64 truth: float64 <= 1e-10; float32 <= max(1e-5, 2 x PyTorch's own
    float32 error); half types: 2 x PyTorch's own error or 2 ulp of the dtype, whichever is larger. NaNs must sit
    exactly where the truth has them."""
    assert actual.shape == truth.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(truth.shape)}"
    assert actual.dtype == dtype, f"{name}: dtype {actual.dtype} != {dtype}"
    if truth.numel() == 0:
        return
    nan = truth.isnan().cpu()
    assert torch.equal(actual.isnan().cpu(), nan), f"{name}: nan where the reference has none, or vice versa"
    actual, truth = actual.cpu()[~nan], truth.cpu()[~nan]
    err = rel_error(actual, truth)
    if dtype == torch.float64:
        bound = 1e-10
    elif dtype == torch.float32:
        bound = 1e-5
    else:
        bound = 2 * torch.finfo(dtype).eps
    if torch_same_dtype is not None and dtype != torch.float64:
        bound = max(bound, 2 * rel_error(torch_same_dtype.cpu()[~nan], truth))
    assert err <= bound, f"{name}: relative error {err:.3g} > {bound:.3g}"


def extreme_logits(B: int, V: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The extreme cross-entropy inputs of the tests, float64 on the CPU, B >= 5: (x (B, V), targets, x2 (B, 2),
    targets2). x spreads over [-1e4, 1e4]; row 1 sits near +1e4 and row 2 near -1e4 (where a float32 lse would lose
    1e-3), row 3 is all equal, and in row 4 the target dominates by 20. x2 is a V = 2 problem over [-1e4, 1e4]."""
    x = (torch.rand(B, V, generator=g, dtype=torch.float64) * 2 - 1) * 1e4
    x[1] = 1e4 + torch.randn(V, generator=g, dtype=torch.float64) * 3
    x[2] = -1e4 + torch.randn(V, generator=g, dtype=torch.float64) * 3
    x[3] = 5.0
    t = torch.randint(0, V, (B,), generator=g)
    x[4, t[4]] = x[4].max() + 20
    x2 = (torch.rand(B, 2, generator=g, dtype=torch.float64) * 2 - 1) * 1e4
    return x, t, x2, torch.randint(0, 2, (B,), generator=g)
