"""This process's place in a torchrun launch, shared by train (one model, data-parallel) and sweep (groups dealt to
the ranks): the ranks from torchrun's environment, the device and cores of a rank, the process group (gloo on the
CPU, NCCL on GPUs) and the ranks' agreement to stop on a signal. One process alone is rank 0 of 1 and never touches
torch.distributed."""
from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from charmlp_fast.cli import resolve_device


@dataclass(frozen=True)
class Ranks:
    """This process's place in a torchrun launch; one process alone is rank 0 of 1."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    local_world: int = 1

    @classmethod
    def from_env(cls) -> "Ranks":
        env = os.environ
        return cls(int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1)), int(env.get("LOCAL_RANK", 0)),
                   int(env.get("LOCAL_WORLD_SIZE", 1)))

    @property
    def main(self) -> bool:
        """Rank 0: the one that prints and writes the outputs."""
        return self.rank == 0


def core_share(ranks: Ranks) -> int:
    """This process's share of the machine's cores (the ranks of one machine split them)."""
    return max(1, (os.cpu_count() or 1) // ranks.local_world)


def default_threads(ranks: Ranks) -> int | None:
    """The thread count cli.threads_for falls back on: torch's own (None) for one process, the core share under
    torchrun (which would otherwise leave torch's per-process default of every core to each rank)."""
    return None if ranks.world == 1 else core_share(ranks)


def rank_device(device: torch.device, ranks: Ranks) -> torch.device:
    """The device of this rank: under torchrun a CUDA run takes the GPU of its LOCAL_RANK (and makes it current,
    which NCCL needs); the CPU is every rank's."""
    if device.type == "cuda" and ranks.world > 1:
        device = torch.device("cuda", ranks.local_rank)
        torch.cuda.set_device(device)
    return device


@contextmanager
def process_group(ranks: Ranks, device: torch.device | str):
    """torch.distributed set up for a torchrun launch, unless it already is, and torn down after: NCCL when the
    run is on GPUs, gloo on the CPU. Nothing for one process (a device name is resolved only when there is a
    group to set up, so one process fails, if at all, where it always did)."""
    if ranks.world == 1:
        yield
        return
    import torch.distributed as dist

    owned = not dist.is_initialized()
    if owned:
        device = resolve_device(device) if isinstance(device, str) else device
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:
        yield
    finally:
        if owned:
            dist.destroy_process_group()


def agree_to_stop(sigint: dict, ranks: Ranks, device: torch.device) -> bool:
    """Whether the run stops here, on every rank alike: one process stops when it got a signal; under torchrun the
    ranks stop together when any of them got one (a rank that stopped alone would leave the others waiting in
    their next all-reduce), and all take the same signal (the highest number: SIGTERM over SIGINT), written into
    sigint as deferred_sigint would. Every rank must call it at the same points of the run: it is a collective."""
    if ranks.world == 1:
        return sigint["interrupted"]
    import torch.distributed as dist

    flag = torch.tensor([sigint["signal"] or 0], dtype=torch.int64, device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    signum = int(flag.item())
    if signum:
        sigint["interrupted"], sigint["signal"] = True, signum
    return bool(signum)


class LocalRecords:
    """The metrics log of a rank other than 0: the records of the run in memory, no file (rank 0 writes it)."""

    def __init__(self):
        self.records: list[dict] = []

    def write(self, record: dict) -> None:
        self.records.append(record)

    def close(self) -> None:
        pass
