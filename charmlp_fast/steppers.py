"""Steppers run n SGD steps of a model on its device and hand back the per-step losses, with no host sync.

Every stepper has the same interface, so the trainer does not care how a step is executed:

    stepper.run(start_step: int, lrs: Tensor (n,) float32 on the CPU) -> Tensor (n,) float32 losses on the device
    stepper.state() -> dict[str, Tensor]; stepper.load_state(state)   # what a checkpoint needs to resume exactly

The parameters are updated in place. EagerStepper is the seed's loop (one Python iteration per step) over
either model implementation; whole-loop steppers (CUDA graph, persistent kernel) live in device_train.py.
"""
from __future__ import annotations

import torch

from charmlp_fast.model import CharMLP


def lr_schedule(lr: float, lr_decay_step: int, lr_after: float, start: int, n: int) -> torch.Tensor:
    """The seed's step decay: lr for steps < lr_decay_step, lr_after from then on. (n,) float32 on the CPU."""
    steps = torch.arange(start, start + n)
    return torch.where(steps < lr_decay_step, lr, lr_after).to(torch.float32)


class EagerStepper:
    """The seed's training loop: sample a minibatch, forward, backward, SGD update — one step per iteration."""

    def __init__(self, model: CharMLP, X: torch.Tensor, Y: torch.Tensor, batch_size: int, seed: int):
        self.model, self.X, self.Y, self.batch_size = model, X, Y, batch_size
        self.params = model.params()
        # Minibatch indices come from a generator on the data's device: sampling never syncs with the host.
        self.generator = torch.Generator(device=X.device).manual_seed(seed)

    def state(self) -> dict[str, torch.Tensor]:
        """The minibatch sampler's position (SGD itself keeps no state)."""
        return {"generator": self.generator.get_state()}

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        self.generator.set_state(state["generator"])

    def run(self, start_step: int, lrs: torch.Tensor) -> torch.Tensor:
        X, Y, N = self.X, self.Y, self.X.shape[0]
        losses = []
        for lr in lrs.tolist():
            ix = torch.randint(0, N, (self.batch_size,), device=X.device, generator=self.generator)
            _, loss = self.model(X[ix], Y[ix])
            grads = torch.autograd.grad(loss, self.params)
            with torch.no_grad():
                torch._foreach_add_(self.params, grads, alpha=-lr)
            losses.append(loss.detach())
        return torch.stack(losses) if losses else torch.empty(0, device=X.device)
