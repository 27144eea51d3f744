"""CharMLP: the seed's model as an nn.Module, with a choice of kernels for its forward over the same parameters."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from charmlp_fast import reference

# The kernels of the forward/backward. (How a training step is run, the trainer's --impl, is the stepper's:
# charmlp_fast/steppers/.)
KERNELS = ("reference", "fused")
# Initialisations: the seed's (every parameter standard normal: a first loss of 20-30 nats on names, ~30 at
# V = 10,000), or scaled so that the first loss is about ln V (see init_params).
INITS = ("seed", "scaled")


def param_shapes(vocab_size: int, block_size: int, n_embd: int, n_hidden: int, direct: bool = False
                 ) -> list[tuple[int, ...]]:
    """The shapes of [C, W1, b1, W2, b2]: (V, E), (T*E, H), (H,), (H, V), (V,) — W2 (H + T*E, V) with direct
    connections (CharMLP); ValueError for a size below 1."""
    for name, value in (("vocab_size", vocab_size), ("block_size", block_size), ("n_embd", n_embd),
                        ("n_hidden", n_hidden)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    out_rows = n_hidden + block_size * n_embd if direct else n_hidden
    return [(vocab_size, n_embd), (block_size * n_embd, n_hidden), (n_hidden,), (out_rows, vocab_size),
            (vocab_size,)]


def init_params(vocab_size: int, block_size: int, n_embd: int, n_hidden: int, seed: int = reference.SEED,
                init: str = "seed", direct: bool = False) -> list[torch.Tensor]:
    """[C, W1, b1, W2, b2] from one seeded generator in the seed's order. "seed": reference.init_params, bit for
    bit. "scaled": the same draws, with W1 times 5/3 / sqrt(T*E) (tanh's gain over the fan-in: pre-activations
    of unit scale, no saturated units), b1 and W2 times 0.01 and b2 zero, so that the first logits are nearly
    equal and the first loss is about ln V (a uniform guess) instead of tens of nats. direct: the direct
    connections (T*E, V), appended to W2's rows, are the next draws of the same generator (so the other parameters
    do not change), standard normal or times 0.01 like W2."""
    if init not in INITS:
        raise ValueError(f"init must be one of {INITS}, got {init!r}")
    C, W1, b1, W2, b2 = reference.init_params(vocab_size, block_size, n_embd, n_hidden, seed)
    if direct:
        g = torch.Generator().manual_seed(seed)
        for shape in param_shapes(vocab_size, block_size, n_embd, n_hidden):  # skip the draws made above
            torch.randn(shape, generator=g)
        W2 = torch.cat([W2, torch.randn((block_size * n_embd, vocab_size), generator=g)])
    if init == "scaled":
        W1 = W1 * ((5 / 3) / (block_size * n_embd) ** 0.5)
        b1, W2, b2 = b1 * 0.01, W2 * 0.01, torch.zeros_like(b2)
    return [C, W1, b1, W2, b2]


class CharMLP(nn.Module):
    """Embedding C (V, E) -> concatenated context x (B, T*E) -> tanh(x @ W1 + b1) (B, H) -> h @ W2 + b2 (B, V).

    direct=True adds the paper's direct connections from the context to the logits (Bengio et al. 2003:
    y = b + W x + U tanh(d + H x)): logits = [h, x] @ W2 + b2 with W2 (H + T*E, V), its first H rows the
    hidden-to-output weights and the last T*E rows W. One matrix, so that the fused output layer takes both in one
    linear_cross_entropy and no (B, V) tensor appears.

    Parameters are stored in the seed's layouts (x @ W, not nn.Linear's transpose) and initialised exactly as
    the seed does, so a CharMLP and reference.init_params(...) start bit-for-bit equal (init="scaled": see
    init_params).
    kernels="reference" runs the seed's plain-PyTorch forward; kernels="fused" runs the charmlp C++/CUDA ops
    (embed_linear_tanh, then linear_cross_entropy when only the loss is needed).
    """

    def __init__(self, vocab_size: int, block_size: int = 3, n_embd: int = 10, n_hidden: int = 200,
                 kernels: str = "reference", seed: int = reference.SEED, init: str = "seed", direct: bool = False):
        super().__init__()
        param_shapes(vocab_size, block_size, n_embd, n_hidden)  # checks the sizes
        if kernels not in KERNELS:
            raise ValueError(f"kernels must be one of {KERNELS}, got {kernels!r}")
        if kernels == "fused":
            from charmlp_fast import ops

            ops.require_extension()
        self.vocab_size, self.block_size, self.n_embd, self.n_hidden = vocab_size, block_size, n_embd, n_hidden
        self.kernels, self.direct = kernels, direct
        C, W1, b1, W2, b2 = init_params(vocab_size, block_size, n_embd, n_hidden, seed, init, direct)
        self.C, self.W1, self.b1 = nn.Parameter(C), nn.Parameter(W1), nn.Parameter(b1)
        self.W2, self.b2 = nn.Parameter(W2), nn.Parameter(b2)

    def params(self) -> list[nn.Parameter]:
        """The five parameters in the seed's order [C, W1, b1, W2, b2]."""
        return [self.C, self.W1, self.b1, self.W2, self.b2]

    @torch.no_grad()
    def load_params(self, params: list[torch.Tensor]) -> None:
        """Copy [C, W1, b1, W2, b2] (any device, the seed's layouts) into the parameters."""
        for p, value in zip(self.params(), params, strict=True):
            p.copy_(value)

    def sizes(self, batch_size: int) -> tuple[int, int, int, int, int]:
        """(V, T, E, H, B): what decides whether a stepper fits (steppers.unsupported_reason)."""
        return self.vocab_size, self.block_size, self.n_embd, self.n_hidden, batch_size

    def hidden(self, idx: torch.Tensor) -> torch.Tensor:
        """h (B, H) for contexts idx (B, T)."""
        if self.kernels == "fused":
            from charmlp_fast import ops

            return ops.embed_linear_tanh(idx, self.C, self.W1, self.b1)
        emb = self.C[idx]  # (B, T, E)
        return torch.tanh(emb.view(-1, self.block_size * self.n_embd) @ self.W1 + self.b1)

    def output_input(self, idx: torch.Tensor) -> torch.Tensor:
        """What the output layer multiplies by W2: h (B, H), or [h, x] (B, H + T*E) with direct connections."""
        h = self.hidden(idx)
        if not self.direct:
            return h
        return torch.cat([h, self.C[idx].view(-1, self.block_size * self.n_embd)], dim=1)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None
                ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(logits (B, V), loss) — with kernels="fused" and targets given, logits is None: the fused output
        layer computes the loss without ever materialising them."""
        z = self.output_input(idx)
        if self.kernels == "fused" and targets is not None:
            from charmlp_fast import ops

            return None, ops.linear_cross_entropy(z, self.W2, self.b2, targets)
        logits = torch.addmm(self.b2, z, self.W2) if self.kernels == "fused" else z @ self.W2 + self.b2
        loss = None if targets is None else F.cross_entropy(logits, targets)
        return logits, loss
