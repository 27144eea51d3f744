"""The seed's model in plain PyTorch: the ground truth every fused implementation is tested against.

This is the final code of "makemore part 2" (Bengio et al. 2003 style MLP), kept deliberately literal:
parameters in the seed's layouts (x @ W, not nn.Linear's transpose), initialised by one seeded generator
with `randn` in the seed's order, and the seed's forward.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

SEED = 2147483647  # the seed's generator seed, for both initialisation and the default training run


def init_params(
    vocab_size: int,
    block_size: int = 3,
    n_embd: int = 10,
    n_hidden: int = 200,
    seed: int = SEED,
    dtype: torch.dtype = torch.float32,
) -> list[torch.Tensor]:
    """[C (V, E), W1 (T*E, H), b1 (H), W2 (H, V), b2 (V)], drawn exactly as the seed draws them."""
    g = torch.Generator().manual_seed(seed)
    C = torch.randn((vocab_size, n_embd), generator=g)
    W1 = torch.randn((block_size * n_embd, n_hidden), generator=g)
    b1 = torch.randn(n_hidden, generator=g)
    W2 = torch.randn((n_hidden, vocab_size), generator=g)
    b2 = torch.randn(vocab_size, generator=g)
    return [p.to(dtype) for p in (C, W1, b1, W2, b2)]


def forward(
    params: list[torch.Tensor], X: torch.Tensor, Y: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The seed's forward: X (B, T) int64 contexts -> (logits (B, V), mean cross-entropy or None)."""
    C, W1, b1, W2, b2 = params
    emb = C[X]  # (B, T, E)
    h = torch.tanh(emb.view(-1, W1.shape[0]) @ W1 + b1)  # (B, H)
    logits = h @ W2 + b2  # (B, V)
    loss = None if Y is None else F.cross_entropy(logits, Y)
    return logits, loss
