"""DataParallelStepper: the eager loop (reference or fused kernels) training one model over the ranks of a torchrun
launch, and the choice of it (select_data_parallel).

Every rank draws the same global minibatch of B rows (the same seeded generator, so the sampler's state is the
same on every rank and a checkpoint resumes on any number of ranks), computes the mean loss of its contiguous B/K
rows and its gradients, and one all-reduce of a flat buffer (the loss and every gradient) averages them: every rank
applies the same update, the single-process step of batch B up to float summation order, and reports the global
batch's loss.

graph and persistent do not run here: the persistent stepper runs many SGD steps in one C++ call (there is no
per-step gradient to all-reduce), and the graph stepper's captured steps hold no collective.
"""
from __future__ import annotations

import dataclasses

import torch

from charmlp_fast.cli import CLIError
from charmlp_fast.model import CharMLP
from charmlp_fast.steppers.common import Sizes
from charmlp_fast.steppers.eager import EagerStepper

# The implementations that train data-parallel, in the order "auto" tries them.
DATA_PARALLEL_IMPLS = ("fused", "reference")
WHY_NOT = {
    "persistent": "it runs many SGD steps in one C++ call, with no per-step gradient to all-reduce",
    "graph": "its captured CUDA graphs hold no all-reduce",
}


def check_batch_split(batch_size: int, world: int) -> None:
    """The global batch must split evenly over the ranks (equal shares keep the mean of their means the mean)."""
    if batch_size % world:
        raise CLIError(f"--batch-size {batch_size} does not split over {world} processes: under torchrun the global "
                       f"batch must be a multiple of the process count")


def select_data_parallel(impl: str, device: torch.device | str, sizes: Sizes, world: int, direct: bool = False):
    """select_stepper for a torchrun launch of `world` ranks: auto picks fused where its kernels are built, else
    reference; persistent and graph are refused with the reason (StepperUnavailable); a batch that does not split
    over the ranks is a CLIError."""
    from charmlp_fast.steppers import StepperUnavailable, select_stepper  # the package imports this module

    if impl in WHY_NOT:
        raise StepperUnavailable(impl, f"not under torchrun: {WHY_NOT[impl]}; use --impl fused or reference "
                                       "(auto's choice there)")
    check_batch_split(sizes[-1], world)
    return dataclasses.replace(select_stepper(impl, device, sizes, auto=DATA_PARALLEL_IMPLS, direct=direct),
                               data_parallel=True)


class DataParallelStepper(EagerStepper):
    """EagerStepper over the ranks of torch.distributed's default group (set up before it is built): each rank's
    share of every minibatch, the gradients averaged by one all-reduce per step."""

    def __init__(self, model: CharMLP, X: torch.Tensor, Y: torch.Tensor, batch_size: int, seed: int,
                 weight_decay: float = 0.0):
        import torch.distributed as dist

        super().__init__(model, X, Y, batch_size, seed, weight_decay)
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        if batch_size % self.world:
            raise ValueError(f"DataParallelStepper: batch size {batch_size} does not split over {self.world} ranks")
        self.share = batch_size // self.world
        self.numels = [1] + [p.numel() for p in self.params]  # the flat buffer: the loss, then every gradient

    def gradients(self, ix: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        import torch.distributed as dist

        loss, grads = super().gradients(ix[self.rank * self.share:(self.rank + 1) * self.share])
        flat = torch.cat([loss.detach().reshape(1), *(g.reshape(-1) for g in grads)])
        dist.all_reduce(flat)  # a sum: gloo has no average
        flat /= self.world
        loss, *grads = flat.split(self.numels)
        return loss[0], [g.view_as(p) for g, p in zip(grads, self.params)]
