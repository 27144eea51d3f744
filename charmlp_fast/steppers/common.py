"""What the steppers share: the one answer to "can this stepper run here?", the base of the stateless steppers, and
the transfer of a chunk's learning rates to the device."""
from __future__ import annotations

import math

import torch

from charmlp_fast import ops

# The trainer's step implementations (its --impl), fastest first: the order in which "auto" tries them.
STEPPER_IMPLS = ("persistent", "graph", "fused", "reference")

Sizes = tuple[int, int, int, int, int]  # (V, T, E, H, B)


def _not_built() -> str:
    return "the charmlp_fast._C extension is not built"


def unsupported_reason(impl: str, device: torch.device | str, sizes: Sizes | None = None,
                       cluster_size: int = 0, direct: bool = False) -> str | None:
    """None when the step implementation `impl` can train a model of sizes = (V, T, E, H, B) (direct: with direct
    connections) on `device`, else a one-line reason. sizes None checks only the build (the sizes matter to the
    persistent CUDA kernel alone)."""
    device = torch.device(device)
    if impl not in STEPPER_IMPLS:
        return f"unknown implementation {impl!r} (one of {', '.join(STEPPER_IMPLS)})"
    if cluster_size and not (impl == "persistent" and device.type == "cuda"):
        return "cluster sizes are a CUDA setting"
    if impl == "reference":
        return None
    if impl == "fused":
        if ops.kernels_built(device.type):
            return None
        return (f"the charmlp extension has no {device.type} kernels in this build"
                + ("" if ops.HAS_EXTENSION else f" (not built: {ops._IMPORT_ERROR})"))
    if impl == "graph":
        if device.type != "cuda":
            return "CUDA graphs need a CUDA device"
        if not ops.HAS_EXTENSION:
            return _not_built()
        if not (ops.has_kernel("philox_minibatch", "cuda") and ops.kernels_built("cuda")):
            return "charmlp_fast._C was built without its CUDA kernels"
        if not torch.cuda.is_available():
            return "no CUDA device is visible"
        return None
    # persistent
    if not ops.HAS_EXTENSION:
        return _not_built()
    if device.type == "cpu":
        return None  # the CPU loop handles every size
    if device.type != "cuda":
        return f"no persistent kernel for device type {device.type!r}"
    if not ops.has_kernel("sgd_train", "cuda"):
        return "charmlp_fast._C was built without its CUDA kernels"
    if not torch.cuda.is_available():
        return "no CUDA device is visible"
    if direct:
        # W2's T*E direct rows would double the shared memory of a word-sized output layer, and such sizes do not
        # fit the kernel anyway; the graph stepper trains them.
        return "the persistent CUDA kernel has no direct connections (--direct): use --impl graph"
    if sizes is None:
        return None
    reason, _ = ops.cuda_plan(*sizes, device, cluster_size)
    return reason or None


def check_supported(name: str, impl: str, device: torch.device, sizes: Sizes, X: torch.Tensor, Y: torch.Tensor,
                    cluster_size: int = 0, direct: bool = False, weight_decay: float = 0.0) -> None:
    """A stepper's constructor check: ValueError naming the stepper when impl cannot run here, when the data is
    not on the model's device, or for a weight decay that is negative or not finite."""
    check_weight_decay(name, weight_decay)
    reason = unsupported_reason(impl, device, sizes, cluster_size, direct)
    if reason is not None:
        raise ValueError(f"{name}: {reason}")
    if X.device != device or Y.device != device:
        raise ValueError(f"{name}: X and Y must be on the model's device {device}, got {X.device} and {Y.device}")


def check_weight_decay(name: str, weight_decay: float) -> None:
    """ValueError naming the stepper for a weight decay that is negative or not finite."""
    if not (math.isfinite(weight_decay) and weight_decay >= 0):
        raise ValueError(f"{name}: weight_decay must be finite and >= 0, got {weight_decay}")


class StatelessStepper:
    """A stepper whose minibatches are a function of (seed, step) — Philox, csrc/sgd_train/sgd_train.h — and the
    step is the trainer's: a checkpoint needs nothing of it to resume exactly."""

    def state(self) -> dict[str, torch.Tensor]:
        return {}

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        pass


def lrs_to_device(lrs: torch.Tensor, device: torch.device) -> torch.Tensor:
    """The learning rates as float32 on `device`; from the CPU through pinned memory, so that the copy is
    asynchronous and never waits for the device."""
    lrs = lrs.to(torch.float32)
    if device.type == "cuda" and lrs.device.type == "cpu":
        lrs = lrs.pin_memory()
    return lrs.to(device, non_blocking=True)
