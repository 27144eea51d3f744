"""EagerStepper: the seed's training loop, one Python iteration per step, over either kernels of CharMLP."""
from __future__ import annotations

import torch

from charmlp_fast.model import CharMLP
from charmlp_fast.steppers.common import check_weight_decay


class EagerStepper:
    """The seed's training loop: sample a minibatch, forward, backward, SGD update — one step per iteration.
    Minibatches come from torch.randint, so they differ from the Philox ones of the whole-loop steppers."""

    def __init__(self, model: CharMLP, X: torch.Tensor, Y: torch.Tensor, batch_size: int, seed: int,
                 weight_decay: float = 0.0):
        check_weight_decay("EagerStepper", weight_decay)
        self.model, self.X, self.Y, self.batch_size = model, X, Y, batch_size
        self.params, self.weight_decay = model.params(), weight_decay
        self.weights = [model.C, model.W1, model.W2]  # what the weight decay shrinks (not the biases)
        # Minibatch indices come from a generator on the data's device: sampling never syncs with the host.
        self.generator = torch.Generator(device=X.device).manual_seed(seed)

    def state(self) -> dict[str, torch.Tensor]:
        """The minibatch sampler's position (SGD itself keeps no state)."""
        return {"generator": self.generator.get_state()}

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        self.generator.set_state(state["generator"])

    def run(self, start_step: int, lrs: torch.Tensor) -> torch.Tensor:
        X, N = self.X, self.X.shape[0]
        losses = []
        for lr in lrs.tolist():
            ix = torch.randint(0, N, (self.batch_size,), device=X.device, generator=self.generator)
            loss, grads = self.gradients(ix)
            with torch.no_grad():
                if self.weight_decay:  # p -= lr * (g + wd * p), as decay * p - lr * g (the whole-loop kernels' form)
                    torch._foreach_mul_(self.weights, 1.0 - lr * self.weight_decay)
                torch._foreach_add_(self.params, grads, alpha=-lr)
            losses.append(loss.detach())
        return torch.stack(losses) if losses else torch.empty(0, device=X.device)

    def gradients(self, ix: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The minibatch rows ix -> (their mean loss, its gradients with respect to the parameters); the hook of
        the data-parallel stepper (steppers/distributed.py), which takes its share of ix and all-reduces."""
        _, loss = self.model(self.X[ix], self.Y[ix])
        return loss, torch.autograd.grad(loss, self.params)
