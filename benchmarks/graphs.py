"""The CUDA-graph baselines' capture: a plain-PyTorch step recorded once in a CUDA graph and replayed per step, the
fastest loop a PyTorch user writes without custom kernels."""
from __future__ import annotations

from typing import Callable

import torch


def capture(step: Callable[[], None], device: torch.device) -> Callable[[], None]:
    """step() captured in one CUDA graph -> the graph's replay. Three warm-up calls run first on a side stream (as
    capture requires), so step must leave its state unchanged then (learning rate 0). The default CUDA generator
    is graph-safe: its Philox offset advances on every replay, so each replay draws new minibatch rows."""
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(3):
            step()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return graph.replay
