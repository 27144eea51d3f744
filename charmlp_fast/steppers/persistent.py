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
                 cluster_size: int = 0, weight_decay: float = 0.0):
        device = model.C.device
        check_supported("PersistentStepper", "persistent", device, model.sizes(batch_size), X, Y, cluster_size,
                        model.direct, weight_decay)
        self.device, self.X, self.Y = device, X, Y
        self.batch_size, self.cluster_size, self.weight_decay = batch_size, cluster_size, weight_decay
        # (1, ...) views of the model's own parameters: the op updates them in place (and bumps their versions).
        self.params = [p.detach().unsqueeze(0) for p in model.params()]
        self.seeds = torch.tensor([seed], dtype=torch.int64, device=device)

    def run(self, start_step: int, lrs: torch.Tensor) -> torch.Tensor:
        lrs = lrs_to_device(lrs, self.device)
        with torch.no_grad():
            losses = ops.sgd_train(self.params, self.X, self.Y, lrs, seeds=self.seeds, start_step=start_step,
                                   batch_size=self.batch_size, cluster_size=self.cluster_size,
                                   weight_decay=self.weight_decay)
        return losses[0]


class PersistentGroupStepper:
    """M models of one shape in one charmlp::sgd_train call per run(), with per-model learning rates and seeds:
    the parameters stacked (M, ...) for the call, each model's steps bit for bit a PersistentStepper's for it
    alone (the models of a call are independent: csrc/sgd_train/). store() copies them back into the models."""

    def __init__(self, models: list[CharMLP], X: torch.Tensor, Y: torch.Tensor, batch_size: int, seeds: list[int],
                 cluster_size: int = 0, weight_decay: float = 0.0):
        device = models[0].C.device
        check_supported("PersistentGroupStepper", "persistent", device, models[0].sizes(batch_size), X, Y,
                        cluster_size, models[0].direct, weight_decay)
        if any(m.sizes(batch_size) != models[0].sizes(batch_size) or m.direct != models[0].direct
               or m.C.device != device for m in models):
            raise ValueError("PersistentGroupStepper: the models must share their sizes and device")
        self.models, self.device, self.X, self.Y = models, device, X, Y
        self.batch_size, self.cluster_size, self.weight_decay = batch_size, cluster_size, weight_decay
        self.params = [torch.stack([p.detach() for p in ps]) for ps in zip(*(m.params() for m in models))]
        self.seeds = torch.tensor(seeds, dtype=torch.int64, device=device)

    def run(self, start_step: int, lrs: torch.Tensor) -> torch.Tensor:
        """Steps start_step .. start_step + n - 1 of every model with lrs (M, n) -> (M, n) float32 losses on the
        device, not synchronised with the host."""
        lrs = lrs_to_device(lrs, self.device)
        with torch.no_grad():
            return ops.sgd_train(self.params, self.X, self.Y, lrs, seeds=self.seeds, start_step=start_step,
                                 batch_size=self.batch_size, cluster_size=self.cluster_size,
                                 weight_decay=self.weight_decay)

    def store(self) -> None:
        for m, model in enumerate(self.models):
            model.load_params([p[m] for p in self.params])
