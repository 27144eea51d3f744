"""The seed's pictures, written as PNG files: the loss curve and the learned character embeddings."""
from __future__ import annotations

from pathlib import Path

import torch

from charmlp_fast.data import Vocab


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed, and no GUI backend picked up from the environment
    import matplotlib.pyplot as plt

    return plt


def plot_loss_curve(path: str | Path, losses: torch.Tensor, first_step: int = 0,
                    dev_curve: list[dict] | None = None) -> None:
    """log10 of the per-step training loss, as the seed plots `lossi`, with the dev loss at each evaluation."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(9, 4.5))
    steps = torch.arange(first_step, first_step + losses.numel())
    ax.plot(steps, losses.float().clamp_min(1e-12).log10(), lw=0.4, alpha=0.6, label="train (per step)")
    if dev_curve:
        ax.plot([d["step"] for d in dev_curve], [torch.tensor(d["dev_loss"]).log10() for d in dev_curve],
                "o-", color="C3", label="dev (full split)")
    ax.set_xlabel("step")
    ax.set_ylabel("log10 loss")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def embedding_2d(C: torch.Tensor) -> tuple[torch.Tensor, str]:
    """The embedding table as 2-D points: itself when E == 2, else its first two principal components."""
    C = C.detach().float().cpu()
    if C.shape[1] == 2:
        return C, "embedding dimension"
    centred = C - C.mean(0)
    _, _, V = torch.linalg.svd(centred, full_matrices=False)
    return centred @ V[:2].T, "principal component"


def plot_embedding(path: str | Path, C: torch.Tensor, vocab: Vocab, max_labels: int = 200) -> None:
    """The seed's scatter of the characters in embedding space (vowels cluster once trained)."""
    plt = _pyplot()
    points, axis_name = embedding_2d(C)
    n = min(len(vocab), max_labels)  # word vocabularies: the most frequent tokens only
    fig, ax = plt.subplots(figsize=(8, 8))
    ax.scatter(points[:n, 0], points[:n, 1], s=200)
    for i in range(n):
        ax.text(points[i, 0].item(), points[i, 1].item(), vocab.itos[i], ha="center", va="center", color="white")
    ax.set_xlabel(f"{axis_name} 1")
    ax.set_ylabel(f"{axis_name} 2")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
