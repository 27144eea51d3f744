"""Python API of the fused charmlp ops, and their fake kernels for torch.compile.

The kernels (CPU and CUDA) and their autograd are registered in C++ (csrc/): autograd registered from
Python costs ~3x more per call than from C++, which is the whole budget at the seed's size. This module
only loads the extension, maps Python-friendly arguments onto the schemas, and registers `register_fake`
for every op so that torch.compile(fullgraph=True) can trace them. What the autograd supports beyond the first-order
backward, and what it refuses with an error naming the op: README.md, "Autograd of the ops".

Dimension names: B batch, T context, E embedding, H hidden, V vocabulary.
"""
from __future__ import annotations

import torch

try:
    from charmlp_fast import _C  # noqa: F401  (loading the library registers torch.ops.charmlp.*)

    HAS_EXTENSION = True
    _IMPORT_ERROR: Exception | None = None
except ImportError as e:  # pragma: no cover - exercised only on a machine without the build
    HAS_EXTENSION = False
    _IMPORT_ERROR = e

_REDUCTIONS = {"none": 0, "mean": 1, "sum": 2}


def require_extension() -> None:
    """Raise one clear error when the compiled extension is missing."""
    if not HAS_EXTENSION:
        raise RuntimeError(
            "charmlp_fast._C is not built (run `pip install --no-build-isolation -e .` or `make build`): "
            f"{_IMPORT_ERROR}"
        )


def kernels_built(device_type: str) -> bool:
    """True when the extension has the fused model's kernels for device_type ("cpu" or "cuda")."""
    key = {"cpu": "CPU", "cuda": "CUDA"}.get(device_type)
    return (
        HAS_EXTENSION
        and key is not None
        and all(
            torch._C._dispatch_has_kernel_for_dispatch_key(f"charmlp::{op}", key)
            for op in ("embed_linear_tanh", "embed_linear_tanh_backward",
                       "linear_cross_entropy_forward", "linear_cross_entropy_backward")
        )
    )


def _reduction(reduction: str) -> int:
    try:
        return _REDUCTIONS[reduction]
    except KeyError:
        raise ValueError(f"reduction must be one of {sorted(_REDUCTIONS)}, got {reduction!r}") from None


def embed_linear_tanh(idx: torch.Tensor, C: torch.Tensor, W1: torch.Tensor, b1: torch.Tensor) -> torch.Tensor:
    """h = tanh(C[idx].view(B, T*E) @ W1 + b1) in one pass; idx (B, T), C (V, E), W1 (T*E, H), b1 (H)."""
    return torch.ops.charmlp.embed_linear_tanh(idx, C, W1, b1)


def cross_entropy(
    logits: torch.Tensor, targets: torch.Tensor, reduction: str = "mean", ignore_index: int = -100
) -> torch.Tensor:
    """F.cross_entropy for 2-D logits (B, V) and targets (B,), numerically stable, fused fwd/bwd."""
    return torch.ops.charmlp.cross_entropy(logits, targets, _reduction(reduction), ignore_index)


def linear_cross_entropy(
    h: torch.Tensor,
    W2: torch.Tensor,
    b2: torch.Tensor,
    targets: torch.Tensor,
    reduction: str = "mean",
    ignore_index: int = -100,
) -> torch.Tensor:
    """cross_entropy(h @ W2 + b2, targets) without materialising the (B, V) logits."""
    return torch.ops.charmlp.linear_cross_entropy(h, W2, b2, targets, _reduction(reduction), ignore_index)


# ---- fake kernels: shapes and dtypes only, for torch.compile / FakeTensor tracing --------------------
if HAS_EXTENSION:

    def _loss_like(x: torch.Tensor, B: int, reduction: int) -> torch.Tensor:
        return x.new_empty((B,) if reduction == 0 else ())

    @torch.library.register_fake("charmlp::embed_linear_tanh")
    def _(idx, C, W1, b1):
        return C.new_empty((idx.shape[0], W1.shape[1]))

    @torch.library.register_fake("charmlp::embed_linear_tanh_backward")
    def _(grad_h, h, idx, C, W1):
        # The kernels return contiguous gradients whatever the layout of C and W1.
        return (
            torch.empty_like(C, memory_format=torch.contiguous_format),
            torch.empty_like(W1, memory_format=torch.contiguous_format),
            W1.new_empty((W1.shape[1],)),
        )

    @torch.library.register_fake("charmlp::cross_entropy")
    def _(logits, targets, reduction, ignore_index):
        return _loss_like(logits, logits.shape[0], reduction)

    @torch.library.register_fake("charmlp::cross_entropy_forward")
    def _(logits, targets, reduction, ignore_index):
        B = logits.shape[0]
        return _loss_like(logits, B, reduction), logits.new_empty((B,), dtype=torch.float64)

    @torch.library.register_fake("charmlp::cross_entropy_backward")
    def _(grad_loss, logits, targets, lse, reduction, ignore_index):
        return torch.empty_like(logits, memory_format=torch.contiguous_format)

    @torch.library.register_fake("charmlp::linear_cross_entropy")
    def _(h, W2, b2, targets, reduction, ignore_index):
        return _loss_like(h, h.shape[0], reduction)

    @torch.library.register_fake("charmlp::linear_cross_entropy_forward")
    def _(h, W2, b2, targets, reduction, ignore_index, compute_grad):
        B = h.shape[0]
        loss, lse = _loss_like(h, B, reduction), h.new_empty((B,), dtype=torch.float64)
        if not compute_grad:
            return loss, lse, h.new_empty((0,)), W2.new_empty((0,)), b2.new_empty((0,))
        return (
            loss,
            lse,
            torch.empty_like(h, memory_format=torch.contiguous_format),
            torch.empty_like(W2, memory_format=torch.contiguous_format),
            torch.empty_like(b2, memory_format=torch.contiguous_format),
        )

    @torch.library.register_fake("charmlp::linear_cross_entropy_backward")
    def _(grad_loss, h, W2, b2, targets, lse, reduction, ignore_index):
        return (
            torch.empty_like(h, memory_format=torch.contiguous_format),
            torch.empty_like(W2, memory_format=torch.contiguous_format),
            torch.empty_like(b2, memory_format=torch.contiguous_format),
        )
