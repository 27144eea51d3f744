"""Whole-loop steppers: many SGD steps per launch, no return to the host between steps.

Both follow the stepper interface of steppers.py:

    stepper.run(start_step: int, lrs: Tensor (n,) float32 on the CPU) -> Tensor (n,) float32 losses on the device

and update the model's parameters in place.

* PersistentStepper — charmlp::sgd_train (csrc/sgd_train/): one call runs all n steps (sampling,
  forward, backward, update) in C++ on the CPU, or in one persistent kernel launch on CUDA with the parameters in
  shared memory. Sizes that do not fit the kernel are reported by `PersistentStepper.unsupported_reason(...)`.
* GraphStepper (CUDA) — the fused per-op step (ops.embed_linear_tanh + ops.linear_cross_entropy through autograd,
  then the SGD update) captured K steps per CUDA graph, with the lr and the step counter in device buffers; any
  size, the fallback where the persistent kernel does not fit.

Both draw minibatch rows with charmlp's Philox keyed by (seed, step, row) (csrc/sgd_train/sgd_train.h): a seed gives the
same minibatches on CPU and CUDA, in the persistent kernel and in the graph, and a run cut into chunks equals one
uncut run. (EagerStepper samples with torch.randint, so its minibatches differ.)

Choosing one (the trainer's "fastest that fits"):

    if PersistentStepper.unsupported_reason(V, T, E, H, batch_size, device) is None:
        stepper = PersistentStepper(model, Xtr, Ytr, batch_size, seed)      # CPU: always
    elif GraphStepper.unsupported_reason(device) is None:
        stepper = GraphStepper(model, Xtr, Ytr, batch_size, seed)           # CUDA, sizes beyond the kernel
    else:
        stepper = EagerStepper(model, Xtr, Ytr, batch_size, seed)
    losses = stepper.run(start, lr_schedule(lr, decay_step, lr_after, start, n))  # per chunk of n steps

Xtr and Ytr must be on the model's device.

Dimension names: M models, B batch, T context, E embedding, H hidden, V vocabulary, S steps.
"""
from __future__ import annotations

from typing import Sequence

import torch

from charmlp_fast import ops
from charmlp_fast.model import CharMLP

# Shared memory per block that sizes are planned against when the device's own figure is unknown (H100).
_H100_SMEM_OPTIN = 227 * 1024


# ---- the ops --------------------------------------------------------------------------------------------------

def sgd_train(params: Sequence[torch.Tensor], X: torch.Tensor, Y: torch.Tensor, lrs: torch.Tensor, *,
              seeds: torch.Tensor | None = None, batch_idx: torch.Tensor | None = None, start_step: int = 0,
              batch_size: int = 32, loss_every: int = 1, cluster_size: int = 0) -> torch.Tensor:
    """S = lrs.shape[-1] SGD steps of M models side by side, in one call; params = [C (M, V, E), W1 (M, T*E, H),
    b1 (M, H), W2 (M, H, V), b2 (M, V)] float32 contiguous, updated in place.

    Minibatch rows come from Philox with seeds (M,) int64 — step s of model m uses rows
    minibatch_row(seeds[m], start_step + i, b) — or from batch_idx (S, B) / (M, S, B) int64. lrs is (S,) for all
    models or (M, S). Returns (M, ceil(S / loss_every)) float32: the mean loss of each window of loss_every steps
    (a chunked run equals an unchunked one when the chunks are multiples of loss_every).
    """
    return torch.ops.charmlp.sgd_train(*params, X, Y, lrs, seeds, batch_idx, start_step, batch_size, loss_every,
                                       cluster_size)


def philox_minibatch(seeds: torch.Tensor, start_step: torch.Tensor | int, num_steps: int, batch_size: int,
                     num_rows: int) -> torch.Tensor:
    """(M, num_steps, batch_size) int64 rows in [0, num_rows): the minibatches sgd_train draws from seeds (M,)."""
    if not isinstance(start_step, torch.Tensor):
        start_step = torch.tensor(start_step, dtype=torch.int64, device=seeds.device)
    return torch.ops.charmlp.philox_minibatch(seeds, start_step, num_steps, batch_size, num_rows)


def stack_params(models: Sequence[CharMLP]) -> list[torch.Tensor]:
    """[C, W1, b1, W2, b2] of several same-sized models stacked along a new leading model dimension M (copies)."""
    return [torch.stack([m.params()[i].detach() for m in models]) for i in range(5)]


def cuda_plan(vocab_size: int, block_size: int, n_embd: int, n_hidden: int, batch_size: int,
              device: torch.device | str | int | None = None, cluster_size: int = 0
              ) -> tuple[str, list[int]]:
    """The persistent kernel's plan for a model on a CUDA device: ("" or why it does not fit,
    [cluster_size, ks_logits, ks_dx, shared-memory bytes per block]). Without a visible device, plans for an H100
    (compute capability 9.0, 227 KiB of shared memory per block)."""
    ops.require_extension()
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(device if device is not None else torch.cuda.current_device())
        smem = getattr(props, "shared_memory_per_block_optin", props.shared_memory_per_block)
        major = props.major
    else:
        smem, major = _H100_SMEM_OPTIN, 9
    reason, plan = torch.ops.charmlp.sgd_train_cuda_plan(vocab_size, block_size, n_embd, n_hidden, batch_size,
                                                         smem, major, cluster_size)
    return reason, list(plan)


def _to_device(lrs: torch.Tensor, device: torch.device) -> torch.Tensor:
    """The learning rates as float32 on `device`; from the CPU through pinned memory, so that the copy is
    asynchronous and never waits for the device."""
    lrs = lrs.to(torch.float32)
    if device.type == "cuda" and lrs.device.type == "cpu":
        lrs = lrs.pin_memory()
    return lrs.to(device, non_blocking=True)


def _has_kernel(op: str, key: str) -> bool:
    return ops.HAS_EXTENSION and torch._C._dispatch_has_kernel_for_dispatch_key(op, key)


def fused_sgd_steps(params: Sequence[torch.Tensor], X: torch.Tensor, Y: torch.Tensor, seeds: torch.Tensor,
                    step: torch.Tensor, lrs: torch.Tensor, losses: torch.Tensor, batch_size: int) -> None:
    """k = len(lrs) SGD steps of one model with the fused per-op kernels, touching only tensors (no host values),
    so that it can be captured in a CUDA graph: the rows of steps step[0] .. step[0] + k - 1 from Philox
    (seeds (1,)), then per step h = embed_linear_tanh, loss = linear_cross_entropy, gradients by autograd,
    p -= lrs[j] * g, losses[j] = loss; finally step += k. params [C, W1, b1, W2, b2] require grad."""
    k = lrs.shape[0]
    C, W1, b1, W2, b2 = params
    rows = torch.ops.charmlp.philox_minibatch(seeds, step, k, batch_size, X.shape[0])[0]  # (k, B)
    Xb, Yb = X[rows], Y[rows]  # (k, B, T), (k, B)
    for j in range(k):
        h = ops.embed_linear_tanh(Xb[j], C, W1, b1)
        loss = ops.linear_cross_entropy(h, W2, b2, Yb[j])
        grads = list(torch.autograd.grad(loss, params))
        with torch.no_grad():
            torch._foreach_mul_(grads, lrs[j])
            torch._foreach_sub_(list(params), grads)
            losses[j].copy_(loss)
    with torch.no_grad():
        step.add_(k)


# ---- fake kernels: shapes and dtypes only, for torch.compile / FakeTensor tracing ----------------------------
if ops.HAS_EXTENSION:

    @torch.library.register_fake("charmlp::sgd_train")
    def _(C, W1, b1, W2, b2, X, Y, lrs, seeds, batch_idx, start_step, batch_size, loss_every=1, cluster_size=0):
        S = lrs.shape[-1]
        return C.new_empty((C.shape[0], (S + loss_every - 1) // loss_every))

    @torch.library.register_fake("charmlp::philox_minibatch")
    def _(seeds, start_step, num_steps, batch_size, num_rows):
        return seeds.new_empty((seeds.shape[0], num_steps, batch_size))


# ---- steppers -------------------------------------------------------------------------------------------------

class PersistentStepper:
    """All steps of a run() in one charmlp::sgd_train call: C++ on the CPU, one persistent kernel on CUDA."""

    def __init__(self, model: CharMLP, X: torch.Tensor, Y: torch.Tensor, batch_size: int, seed: int,
                 cluster_size: int = 0):
        device = model.C.device
        reason = self.unsupported_reason(model.vocab_size, model.block_size, model.n_embd, model.n_hidden,
                                         batch_size, device, cluster_size)
        if reason is not None:
            raise ValueError(f"PersistentStepper: {reason}")
        if X.device != device or Y.device != device:
            raise ValueError(f"PersistentStepper: X and Y must be on the model's device {device}, "
                             f"got {X.device} and {Y.device}")
        self.device, self.X, self.Y = device, X, Y
        self.batch_size, self.cluster_size = batch_size, cluster_size
        # (1, ...) views of the model's own parameters: the op updates them in place (and bumps their versions).
        self.params = [p.detach().unsqueeze(0) for p in model.params()]
        self.seeds = torch.tensor([seed], dtype=torch.int64, device=device)

    @staticmethod
    def unsupported_reason(vocab_size: int, block_size: int, n_embd: int, n_hidden: int, batch_size: int,
                           device: torch.device | str, cluster_size: int = 0) -> str | None:
        """None when the persistent implementation can train this size on `device`, else a one-line reason."""
        device = torch.device(device)
        if not ops.HAS_EXTENSION:
            return "the charmlp_fast._C extension is not built"
        if device.type == "cpu":
            return None  # the CPU loop handles every size
        if device.type != "cuda":
            return f"no persistent kernel for device type {device.type!r}"
        if not _has_kernel("charmlp::sgd_train", "CUDA"):
            return "charmlp_fast._C was built without its CUDA kernels"
        if not torch.cuda.is_available():
            return "no CUDA device is visible"
        reason, _ = cuda_plan(vocab_size, block_size, n_embd, n_hidden, batch_size, device, cluster_size)
        return reason or None

    def state(self) -> dict[str, torch.Tensor]:
        """Nothing to save: minibatches are a function of (seed, step), and the step is the trainer's."""
        return {}

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        pass

    def run(self, start_step: int, lrs: torch.Tensor) -> torch.Tensor:
        lrs = _to_device(lrs, self.device)
        with torch.no_grad():
            losses = torch.ops.charmlp.sgd_train(*self.params, self.X, self.Y, lrs, self.seeds, None, start_step,
                                                 self.batch_size, 1, self.cluster_size)
        return losses[0]


class GraphStepper:
    """The fused per-op SGD step, K steps per captured CUDA graph, replayed (CUDA only, any size).

    Inside one graph: rows = philox_minibatch(seed, step_counter) (K, B); for each of the K steps
    h = embed_linear_tanh(X[rows], C, W1, b1), loss = linear_cross_entropy(h, W2, b2, Y[rows]), the gradients by
    autograd, p -= lr_buf[k] * g; then step_counter += K. Between replays the host only copies the next K learning
    rates (device to device) and the K losses out. A graph is captured per distinct K on first use (a run of n
    steps uses K = steps_per_graph and one graph for the remainder).
    """

    def __init__(self, model: CharMLP, X: torch.Tensor, Y: torch.Tensor, batch_size: int, seed: int,
                 steps_per_graph: int = 100):
        device = model.C.device
        reason = self.unsupported_reason(device)
        if reason is not None:
            raise ValueError(f"GraphStepper: {reason}")
        if X.device != device or Y.device != device:
            raise ValueError(f"GraphStepper: X and Y must be on the model's device {device}, "
                             f"got {X.device} and {Y.device}")
        if steps_per_graph < 1:
            raise ValueError(f"steps_per_graph must be >= 1, got {steps_per_graph}")
        self.device, self.X, self.Y, self.N = device, X, Y, X.shape[0]
        self.batch_size, self.steps_per_graph = batch_size, steps_per_graph
        self.params = model.params()
        # Static buffers the graphs read and write: seeds (1,), the next step (a one-element counter the graph
        # advances), the learning rates and the losses of up to K steps.
        self.seeds = torch.tensor([seed], dtype=torch.int64, device=device)
        self.step = torch.zeros((), dtype=torch.int64, device=device)
        self.lr_buf = torch.zeros(steps_per_graph, dtype=torch.float32, device=device)
        self.loss_buf = torch.zeros(steps_per_graph, dtype=torch.float32, device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}

    @staticmethod
    def unsupported_reason(device: torch.device | str) -> str | None:
        """None when the CUDA-graph stepper can run on `device` (every size can), else a one-line reason."""
        device = torch.device(device)
        if device.type != "cuda":
            return "CUDA graphs need a CUDA device"
        if not ops.HAS_EXTENSION:
            return "the charmlp_fast._C extension is not built"
        # The public fused ops dispatch through their autograd kernels; what must exist are the CUDA kernels below.
        if not (_has_kernel("charmlp::philox_minibatch", "CUDA") and ops.kernels_built("cuda")):
            return "charmlp_fast._C was built without its CUDA kernels"
        if not torch.cuda.is_available():
            return "no CUDA device is visible"
        return None

    def _steps(self, k: int) -> None:
        """k fused SGD steps reading only static buffers: the body that is captured."""
        fused_sgd_steps(self.params, self.X, self.Y, self.seeds, self.step, self.lr_buf[:k], self.loss_buf[:k],
                        self.batch_size)

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

    state = PersistentStepper.state  # stateless too: the step counter is reset from start_step on every run
    load_state = PersistentStepper.load_state

    def run(self, start_step: int, lrs: torch.Tensor) -> torch.Tensor:
        n = lrs.numel()
        losses = torch.empty(n, dtype=torch.float32, device=self.device)
        if n == 0:
            return losses
        lrs = _to_device(lrs, self.device)
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
