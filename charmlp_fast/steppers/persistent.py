"""PersistentStepper: all steps of a run() in one charmlp::sgd_train call (csrc/sgd_train/): sampling, forward,
backward and update in C++ on the CPU, or in one persistent kernel launch on CUDA with the parameters in shared
memory. Sizes that do not fit the kernel: steppers.unsupported_reason("persistent", ...)."""
from __future__ import annotations

import torch

from charmlp_fast import ops
from charmlp_fast.model import CharMLP
from charmlp_fast.steppers.common import StatelessStepper, check_supported, lrs_to_device


class PersistentStepper(StatelessStepper):
    """All steps of a run() in one charmlp::sgd_train call: C++ on the CPU, one persistent kernel on CUDA."""

    def __init__(self, model: CharMLP, X: torch.Tensor, Y: torch.Tensor, batch_size: int, seed: int,
                 cluster_size: int = 0):
        device = model.C.device
        check_supported("PersistentStepper", "persistent", device, model.sizes(batch_size), X, Y, cluster_size)
        self.device, self.X, self.Y = device, X, Y
        self.batch_size, self.cluster_size = batch_size, cluster_size
        # (1, ...) views of the model's own parameters: the op updates them in place (and bumps their versions).
        self.params = [p.detach().unsqueeze(0) for p in model.params()]
        self.seeds = torch.tensor([seed], dtype=torch.int64, device=device)

    def run(self, start_step: int, lrs: torch.Tensor) -> torch.Tensor:
        lrs = lrs_to_device(lrs, self.device)
        with torch.no_grad():
            losses = ops.sgd_train(self.params, self.X, self.Y, lrs, seeds=self.seeds, start_step=start_step,
                                   batch_size=self.batch_size, cluster_size=self.cluster_size)
        return losses[0]
