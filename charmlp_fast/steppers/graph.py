"""GraphStepper (CUDA): the fused per-op step (ops.embed_linear_tanh + ops.linear_cross_entropy through autograd,
then the SGD update) captured K steps per CUDA graph, with the lr and the step counter in device buffers; any size,
the fallback where the persistent kernel does not fit."""
from __future__ import annotations

from typing import Sequence

import torch

from charmlp_fast import ops
from charmlp_fast.model import CharMLP
from charmlp_fast.steppers.common import StatelessStepper, check_supported, lrs_to_device


def fused_sgd_steps(model: CharMLP, X: torch.Tensor, Y: torch.Tensor, seeds: torch.Tensor, step: torch.Tensor,
                    lrs: torch.Tensor, losses: torch.Tensor, batch_size: int, weight_decay: float = 0.0) -> None:
    """k = len(lrs) SGD steps of one model with the fused per-op kernels, touching only tensors (no host values),
    so that it can be captured in a CUDA graph: the rows of steps step[0] .. step[0] + k - 1 from Philox
    (seeds (1,)), then per step loss = model(X, Y) (embed_linear_tanh, linear_cross_entropy), gradients by
    autograd, p -= lrs[j] * (g + weight_decay * p) (the decay on C, W1, W2 only), losses[j] = loss; finally
    step += k. The model's kernels are the fused ones and its parameters require grad."""
    k = lrs.shape[0]
    params, weights = model.params(), [model.C, model.W1, model.W2]
    rows = ops.philox_minibatch(seeds, step, k, batch_size, X.shape[0])[0]  # (k, B)
    Xb, Yb = X[rows], Y[rows]  # (k, B, T), (k, B)
    for j in range(k):
        _, loss = model(Xb[j], Yb[j])
        grads = list(torch.autograd.grad(loss, params))
        with torch.no_grad():
            if weight_decay:
                torch._foreach_mul_(weights, 1.0 - lrs[j] * weight_decay)
            torch._foreach_mul_(grads, lrs[j])
            torch._foreach_sub_(params, grads)
            losses[j].copy_(loss)
    with torch.no_grad():
        step.add_(k)


class GraphStepper(StatelessStepper):
    """The fused per-op SGD step, K steps per captured CUDA graph, replayed (CUDA only, any size).

    Inside one graph: rows = philox_minibatch(seed, step_counter) (K, B); for each of the K steps
    h = embed_linear_tanh(X[rows], C, W1, b1), loss = linear_cross_entropy(h, W2, b2, Y[rows]), the gradients by
    autograd, p -= lr_buf[k] * g; then step_counter += K. Between replays the host only copies the next K learning
    rates (device to device) and the K losses out. A graph is captured per distinct K on first use (a run of n
    steps uses K = steps_per_graph and one graph for the remainder). Stateless: the step counter is reset from
    start_step on every run.
    """

    def __init__(self, model: CharMLP, X: torch.Tensor, Y: torch.Tensor, batch_size: int, seed: int,
                 steps_per_graph: int = 100, weight_decay: float = 0.0):
        device = model.C.device
        check_supported("GraphStepper", "graph", device, model.sizes(batch_size), X, Y, direct=model.direct,
                        weight_decay=weight_decay)
        if model.kernels != "fused":
            raise ValueError("GraphStepper: the model's kernels must be the fused ones (CharMLP(kernels='fused'))")
        if steps_per_graph < 1:
            raise ValueError(f"steps_per_graph must be >= 1, got {steps_per_graph}")
        self.device, self.X, self.Y, self.N = device, X, Y, X.shape[0]
        self.batch_size, self.steps_per_graph, self.weight_decay = batch_size, steps_per_graph, weight_decay
        self.model = model
        # Static buffers the graphs read and write: seeds (1,), the next step (a one-element counter the graph
        # advances), the learning rates and the losses of up to K steps.
        self.seeds = torch.tensor([seed], dtype=torch.int64, device=device)
        self.step = torch.zeros((), dtype=torch.int64, device=device)
        self.lr_buf = torch.zeros(steps_per_graph, dtype=torch.float32, device=device)
        self.loss_buf = torch.zeros(steps_per_graph, dtype=torch.float32, device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}

    def _steps(self, k: int) -> None:
        """k fused SGD steps reading only static buffers: the body that is captured."""
        fused_sgd_steps(self.model, self.X, self.Y, self.seeds, self.step, self.lr_buf[:k], self.loss_buf[:k],
                        self.batch_size, self.weight_decay)

    def _graph(self, k: int) -> torch.cuda.CUDAGraph:
        graph = self.graphs.get(k)
        if graph is not None:
            return graph
        # torch.cuda.graphs wants a few eager iterations on a side stream first (lazy initialisation, allocator
        # warm-up). Run them with lr = 0, which leaves the parameters exactly as they are, and put the step counter
        # back afterwards.
        step = self.step.clone()
        self.lr_buf.zero_()
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(2):
                self._steps(k)
        torch.cuda.current_stream(self.device).wait_stream(side)
        self.step.copy_(step)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self._steps(k)
        self.graphs[k] = graph
        return graph

    def run(self, start_step: int, lrs: torch.Tensor) -> torch.Tensor:
        n = lrs.numel()
        losses = torch.empty(n, dtype=torch.float32, device=self.device)
        if n == 0:
            return losses
        lrs = lrs_to_device(lrs, self.device)
        self.step.fill_(start_step)
        i = 0
        while i < n:
            k = min(self.steps_per_graph, n - i)
            graph = self._graph(k)
            self.lr_buf[:k].copy_(lrs[i:i + k])
            graph.replay()
            losses[i:i + k].copy_(self.loss_buf[:k])
            i += k
        return losses
