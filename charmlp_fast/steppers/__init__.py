"""Steppers run n SGD steps of a model on its device and hand back the per-step losses, with no host sync.

One interface (Stepper below), so the trainer does not care how a step is executed, and one choice of stepper,
select_stepper(impl, device, sizes), for the trainer, the learning-rate finder and the benchmark:

    reference   EagerStepper over CharMLP(kernels="reference"): the seed's loop in plain PyTorch   (eager.py)
    fused       EagerStepper over CharMLP(kernels="fused"): the same loop through the charmlp ops  (eager.py)
    graph       GraphStepper: the fused step, K steps per captured CUDA graph (CUDA, any size)      (graph.py)
    persistent  PersistentStepper: charmlp::sgd_train, all steps of a call in C++ on the CPU or in one
                persistent kernel on CUDA (the sizes it fits)                                        (persistent.py)
                PersistentGroupStepper: M models of one shape in each call (the sweep's groups)

Under torchrun (train's data-parallel run), select_data_parallel(impl, device, sizes, world) chooses instead:
fused or reference as a DataParallelStepper, the eager loop with the gradients all-reduced (distributed.py);
graph and persistent are refused.

    choice = select_stepper("auto", device, (V, T, E, H, B))     # or an explicit impl; StepperUnavailable if not
    model = CharMLP(V, T, E, H, kernels=choice.model_kernels).to(device)
    stepper = choice.build(model, Xtr, Ytr, B, seed)              # Xtr, Ytr on the model's device
    losses = stepper.run(start, lr_schedule(lr, decay_step, lr_after, start, n))  # per chunk of n steps

graph and persistent draw minibatch rows with charmlp's Philox keyed by (seed, step, row)
(csrc/sgd_train/sgd_train.h): a seed gives the same minibatches on CPU and CUDA, in the persistent kernel and in the
graph, and a run cut into chunks equals one uncut run. The eager loop samples with torch.randint.

Dimension names: B batch, T context, E embedding, H hidden, V vocabulary.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from charmlp_fast.cli import CLIError
from charmlp_fast.model import CharMLP
from charmlp_fast.steppers.common import STEPPER_IMPLS, Sizes, unsupported_reason
from charmlp_fast.steppers.distributed import DataParallelStepper, select_data_parallel
from charmlp_fast.steppers.eager import EagerStepper
from charmlp_fast.steppers.graph import GraphStepper
from charmlp_fast.steppers.persistent import PersistentGroupStepper, PersistentStepper

__all__ = ["STEPPER_IMPLS", "DataParallelStepper", "EagerStepper", "GraphStepper", "PersistentGroupStepper",
           "PersistentStepper", "Stepper", "StepperChoice", "StepperUnavailable", "inverse_lr_schedule", "lr_schedule",
           "model_kernels", "select_data_parallel", "select_stepper", "unsupported_reason"]


class Stepper(Protocol):
    """n SGD steps of a model, its parameters updated in place."""

    def run(self, start_step: int, lrs: torch.Tensor) -> torch.Tensor:
        """Steps start_step .. start_step + n - 1 with lrs (n,) float32 on the CPU -> (n,) float32 losses on the
        device, not synchronised with the host."""

    def state(self) -> dict[str, torch.Tensor]:
        """What a checkpoint needs besides the parameters and the step to resume exactly (the sampler's position)."""

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        """Continue from a state() of a stepper of the same implementation."""


def lr_schedule(lr: float, lr_decay_step: int, lr_after: float, start: int, n: int) -> torch.Tensor:
    """The seed's step decay: lr for steps < lr_decay_step, lr_after from then on. (n,) float32 on the CPU."""
    steps = torch.arange(start, start + n)
    return torch.where(steps < lr_decay_step, lr, lr_after).to(torch.float32)


def inverse_lr_schedule(lr: float, decay_rate: float, start: int, n: int) -> torch.Tensor:
    """The paper's schedule, eps_t = eps_0 / (1 + r t) for steps t = start .. start + n - 1 (computed in float64,
    then rounded). (n,) float32 on the CPU."""
    steps = torch.arange(start, start + n, dtype=torch.float64)
    return (lr / (1.0 + decay_rate * steps)).to(torch.float32)


class StepperUnavailable(CLIError):
    """An explicitly chosen implementation that cannot run here: the message is the CLI's one line
    ("--impl NAME: why"), `reason` the why alone."""

    def __init__(self, impl: str, reason: str):
        super().__init__(f"--impl {impl}: {reason}")
        self.impl, self.reason = impl, reason


@dataclass(frozen=True)
class StepperChoice:
    """The stepper an implementation runs on a device; model_kernels are the kernels of the model's own forward
    (the eager loop's steps, evaluation, sampling): the fused ops wherever they are built, unless the plain-PyTorch
    reference was asked for. data_parallel: the eager loop over the ranks of torch.distributed (a torchrun run)."""

    impl: str
    model_kernels: str
    cluster_size: int = 0
    data_parallel: bool = False

    def build(self, model: CharMLP, X: torch.Tensor, Y: torch.Tensor, batch_size: int, seed: int,
              weight_decay: float = 0.0) -> Stepper:
        """The stepper of model; weight_decay: every step p -= lr * weight_decay * p for the weights (C, W1, W2),
        not the biases."""
        if self.impl == "persistent":
            return PersistentStepper(model, X, Y, batch_size, seed, self.cluster_size, weight_decay)
        if self.impl == "graph":
            return GraphStepper(model, X, Y, batch_size, seed, weight_decay=weight_decay)
        if self.data_parallel:
            return DataParallelStepper(model, X, Y, batch_size, seed, weight_decay)
        return EagerStepper(model, X, Y, batch_size, seed, weight_decay)


def select_stepper(impl: str, device: torch.device | str, sizes: Sizes | None = None, cluster_size: int = 0,
                   auto: tuple[str, ...] = STEPPER_IMPLS, direct: bool = False) -> StepperChoice:
    """The stepper of `impl` on `device` for sizes = (V, T, E, H, B) (direct: a model with direct connections),
    or for impl "auto" the first of `auto` that can run (the fastest first). An explicit choice that cannot run
    raises StepperUnavailable saying why, never a silent substitute."""
    device = torch.device(device)
    if impl == "auto":
        impl = next(c for c in auto if unsupported_reason(c, device, sizes, direct=direct) is None)
    else:
        reason = unsupported_reason(impl, device, sizes, cluster_size, direct)
        if reason is not None:
            raise StepperUnavailable(impl, reason)
    return StepperChoice(impl, model_kernels(impl, device), cluster_size)


def model_kernels(impl: str, device: torch.device | str) -> str:
    """The kernels of the model's own forward under stepper `impl` (see StepperChoice)."""
    fused = impl != "reference" and unsupported_reason("fused", torch.device(device)) is None
    return "fused" if fused else "reference"
