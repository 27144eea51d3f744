"""Python API of the charmlp ops, and their fake kernels for torch.compile: the one place Python calls them from.

The kernels (CPU and CUDA) and their autograd are registered in C++ (csrc/): autograd registered from
Python costs ~3x more per call than from C++, which is the whole budget at the seed's size. This module
only loads the extension, maps Python-friendly arguments onto the schemas, and registers `register_fake`
for every op so that torch.compile(fullgraph=True) can trace them. What the autograd supports beyond the first-order
backward, and what it refuses with an error naming the op: README.md, "Autograd of the ops".

The whole-loop ops (sgd_train, philox_minibatch, sgd_train_cuda_plan) are csrc/sgd_train/'s; the steppers that use
them are in charmlp_fast/steppers/.

Dimension names: M models, B batch, T context, E embedding, H hidden, V vocabulary, S steps.
"""
from __future__ import annotations

from typing import Iterable, Sequence

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


_DISPATCH_KEYS = {"cpu": "CPU", "cuda": "CUDA"}
# The kernels the fused forward/backward of CharMLP(kernels="fused") reaches (the public ops dispatch through their
# autograd kernels, so it is these that must exist for a device).
FUSED_MODEL_OPS = ("embed_linear_tanh", "embed_linear_tanh_backward",
                   "linear_cross_entropy_forward", "linear_cross_entropy_backward")


def has_kernel(op: str, device_type: str) -> bool:
    """True when the op ("name" in charmlp, or "namespace::name") has a kernel for device_type ("cpu" or "cuda");
    False for an op that is not registered (the extension not built) or another device type."""
    key = _DISPATCH_KEYS.get(device_type)
    if key is None:
        return False
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(op if "::" in op else f"charmlp::{op}", key)
    except RuntimeError:  # "operator ... does not exist"
        return False


def kernels_built(device_type: str, op_names: Iterable[str] = FUSED_MODEL_OPS) -> bool:
    """True when every op of op_names (default: the fused model's) has a kernel for device_type."""
    return HAS_EXTENSION and all(has_kernel(op, device_type) for op in op_names)


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


# ---- whole-loop ops ---------------------------------------------------------------------------------------------
# Shared memory per block that sizes are planned against when the device's own figure is unknown (H100).
_H100_SMEM_OPTIN = 227 * 1024


def sgd_train(params: Sequence[torch.Tensor], X: torch.Tensor, Y: torch.Tensor, lrs: torch.Tensor, *,
              seeds: torch.Tensor | None = None, batch_idx: torch.Tensor | None = None, start_step: int = 0,
              batch_size: int = 32, loss_every: int = 1, cluster_size: int = 0,
              weight_decay: float = 0.0) -> torch.Tensor:
    """S = lrs.shape[-1] SGD steps of M models side by side, in one call; params = [C (M, V, E), W1 (M, T*E, H),
    b1 (M, H), W2 (M, H, V), b2 (M, V)] float32 contiguous, updated in place. W2 may be (M, H + T*E, V): its last
    T*E rows are the direct connections from the context to the logits (the CPU kernel only). Each step is
    p -= lr * (grad + weight_decay * p), the weight decay on C, W1 and W2 alone (not the biases).

    Minibatch rows come from Philox with seeds (M,) int64 — step s of model m uses rows
    minibatch_row(seeds[m], start_step + i, b) — or from batch_idx (S, B) / (M, S, B) int64. lrs is (S,) for all
    models or (M, S). Returns (M, ceil(S / loss_every)) float32: the mean loss of each window of loss_every steps
    (a chunked run equals an unchunked one when the chunks are multiples of loss_every). cluster_size 0 lets the
    CUDA kernel choose its thread-block cluster.
    """
    C, W1, b1, W2, b2 = params
    return torch.ops.charmlp.sgd_train(C, W1, b1, W2, b2, X, Y, lrs, seeds=seeds, batch_idx=batch_idx,
                                       start_step=start_step, batch_size=batch_size, loss_every=loss_every,
                                       cluster_size=cluster_size, weight_decay=weight_decay)


def philox_minibatch(seeds: torch.Tensor, start_step: torch.Tensor | int, num_steps: int, batch_size: int,
                     num_rows: int) -> torch.Tensor:
    """(M, num_steps, batch_size) int64 rows in [0, num_rows): the minibatches sgd_train draws from seeds (M,),
    for steps start_step .. start_step + num_steps - 1; start_step may be a 0-d int64 tensor on seeds' device
    (what a CUDA graph reads)."""
    if not isinstance(start_step, torch.Tensor):
        start_step = torch.tensor(start_step, dtype=torch.int64, device=seeds.device)
    return torch.ops.charmlp.philox_minibatch(seeds, start_step, num_steps, batch_size, num_rows)


def cuda_plan(vocab_size: int, block_size: int, n_embd: int, n_hidden: int, batch_size: int,
              device: torch.device | str | int | None = None, cluster_size: int = 0
              ) -> tuple[str, list[int]]:
    """The persistent kernel's plan for a model on a CUDA device: ("" or why it does not fit,
    [cluster_size, ks_logits, ks_dx, shared-memory bytes per block]). Without a visible device, plans for an H100
    (compute capability 9.0, 227 KiB of shared memory per block)."""
    require_extension()
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(device if device is not None else torch.cuda.current_device())
        smem = getattr(props, "shared_memory_per_block_optin", props.shared_memory_per_block)
        major = props.major
    else:
        smem, major = _H100_SMEM_OPTIN, 9
    reason, plan = torch.ops.charmlp.sgd_train_cuda_plan(vocab_size, block_size, n_embd, n_hidden, batch_size,
                                                         smem, major, cluster_size)
    return reason, list(plan)


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

    @torch.library.register_fake("charmlp::sgd_train")
    def _(C, W1, b1, W2, b2, X, Y, lrs, seeds, batch_idx, start_step, batch_size, loss_every=1, cluster_size=0,
          weight_decay=0.0):
        S = lrs.shape[-1]
        return C.new_empty((C.shape[0], (S + loss_every - 1) // loss_every))

    @torch.library.register_fake("charmlp::philox_minibatch")
    def _(seeds, start_step, num_steps, batch_size, num_rows):
        return seeds.new_empty((seeds.shape[0], num_steps, batch_size))
