"""The seed's pictures, written as PNG files: the loss curve and the learned character (or word) embeddings.
Each is written atomically (see checkpoint.atomic_write): a full disk leaves the previous picture, never half a
file."""
from __future__ import annotations

from pathlib import Path

import torch

from charmlp_fast.checkpoint import atomic_write
from charmlp_fast.data import Vocab

SMOOTHING_WINDOW = 1_000  # steps per point of the smoothed training curve (fewer on short runs: see plot_loss_curve)
WORD_LABELS = 40  # word vocabularies: the most frequent words that get a label; the others are unlabelled dots


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed, and no GUI backend picked up from the environment
    import matplotlib.pyplot as plt

    return plt


def save_png(fig, path: str | Path) -> None:
    """fig as a PNG at path, atomically; the figure is closed either way."""
    plt = _pyplot()
    try:
        atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))
    finally:
        plt.close(fig)


def smoothed(records: list[dict], window: int) -> tuple[list[int], list[float]]:
    """(window end steps, mean per-step loss in each window of `window` steps) from metrics.jsonl records; a chunk
    counts, weighted by its steps, in the window its last step falls in."""
    sums: dict[int, list[float]] = {}
    for r in records:
        n = r.get("chunk_steps", 1)
        acc = sums.setdefault((r["step"] - 1) // window, [0.0, 0])
        acc[0] += r["loss_mean"] * n
        acc[1] += n
    bins = sorted(sums)
    return [min((b + 1) * window, records[-1]["step"]) for b in bins], [sums[b][0] / sums[b][1] for b in bins]


def plot_loss_curve(path: str | Path, records: list[dict], dev_curve: list[dict] | None = None) -> None:
    """The training loss of a whole run from its metrics.jsonl records (so a resumed run shows its history): the
    band of the per-step losses within each chunk (10-90 % quantiles), their mean per SMOOTHING_WINDOW steps, and
    the dev loss at each evaluation; log-scale loss axis, as the seed plots log10 of the loss."""
    plt = _pyplot()
    from matplotlib.ticker import FormatStrFormatter, LogLocator, NullFormatter

    fig, ax = plt.subplots(figsize=(9, 4.5))
    if records:
        # Each record covers the steps (step - chunk_steps, step]: a step-wise band from the first chunk's start.
        steps = [records[0]["step"] - records[0].get("chunk_steps", 1)] + [r["step"] for r in records]
        # Records of older versions carry no quantiles: the band shrinks to the chunk's mean there.
        low = [r.get("loss_p10", r["loss_mean"]) for r in records]
        high = [r.get("loss_p90", r["loss_mean"]) for r in records]
        ax.fill_between(steps, low[:1] + low, high[:1] + high, step="pre", color="C0", alpha=0.25, lw=0,
                        label="train, 10-90 % of the steps in each chunk")
        # At least ~20 points on a short run, but never finer than the chunks the records hold.
        window = max(1, min(SMOOTHING_WINDOW, steps[-1] // 20), max(r.get("chunk_steps", 1) for r in records))
        ax.plot(*smoothed(records, window), color="C0", lw=1.5, label=f"train, mean per {window:,} steps")
    if dev_curve:
        ax.plot([d["step"] for d in dev_curve], [d["dev_loss"] for d in dev_curve], "o-", color="C3", ms=4,
                label="dev (full split)")
    ax.set_yscale("log")
    ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 1.5, 2.0, 3.0, 5.0, 7.0)))
    ax.yaxis.set_major_formatter(FormatStrFormatter("%g"))  # 2, 3, 5 rather than 2 x 10^0
    ax.yaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("step")
    ax.set_ylabel("loss (log scale)")
    ax.legend()
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    save_png(fig, path)


def embedding_2d(C: torch.Tensor) -> tuple[torch.Tensor, str]:
    """The embedding table as 2-D points: itself when E == 2, else its first two principal components."""
    C = C.detach().float().cpu()
    if C.shape[1] == 2:
        return C, "embedding dimension"
    centred = C - C.mean(0)
    _, _, V = torch.linalg.svd(centred, full_matrices=False)
    return centred @ V[:2].T, "principal component"


def plot_embedding(path: str | Path, C: torch.Tensor, vocab: Vocab, word_labels: int = WORD_LABELS) -> None:
    """The seed's scatter of the characters in embedding space (vowels cluster once trained). A word vocabulary
    (most frequent first) labels only its first word_labels tokens and draws the rest as small dots: hundreds of
    overlapping labels are unreadable."""
    plt = _pyplot()
    points, axis_name = embedding_2d(C)
    fig, ax = plt.subplots(figsize=(8, 8))
    if vocab.sep and len(vocab) > word_labels:
        n = word_labels
        ax.scatter(points[n:, 0], points[n:, 1], s=6, color="0.6", lw=0,
                   label=f"the other {len(vocab) - n:,} words")
        ax.scatter(points[:n, 0], points[:n, 1], s=14, color="C0", label=f"the {n} most frequent tokens")
        for i in range(n):
            ax.annotate(vocab.itos[i], (points[i, 0].item(), points[i, 1].item()), xytext=(3, 3),
                        textcoords="offset points", fontsize=8)
        ax.legend(loc="best")
    else:
        ax.scatter(points[:, 0], points[:, 1], s=200)
        for i in range(len(vocab)):
            ax.text(points[i, 0].item(), points[i, 1].item(), vocab.itos[i], ha="center", va="center",
                    color="white")
    ax.set_xlabel(f"{axis_name} 1")
    ax.set_ylabel(f"{axis_name} 2")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    save_png(fig, path)


def plot_sweep(path: str | Path, records: list[dict], swept: list[str]) -> None:
    """A sweep's dev loss against each swept field, one panel per field: every config as a dot over its value,
    the best config of each value joined by a line (what the field buys when the others are at their best)."""
    plt = _pyplot()
    ok = [r for r in records if r["status"] == "ok" and r["dev_loss"] is not None]
    fig, axes = plt.subplots(1, len(swept), figsize=(3.2 * len(swept) + 0.8, 3.4), squeeze=False, sharey=True)
    for ax, name in zip(axes[0], swept):
        values = sorted({r["config"][name] for r in records}, key=lambda v: (isinstance(v, str), v))
        position = {v: i for i, v in enumerate(values)}
        ax.scatter([position[r["config"][name]] for r in ok], [r["dev_loss"] for r in ok], s=14, alpha=0.6)
        best = [min((r["dev_loss"] for r in ok if r["config"][name] == v), default=None) for v in values]
        ax.plot([i for i, b in enumerate(best) if b is not None], [b for b in best if b is not None], "k-",
                lw=1, label="best")
        ax.set_xticks(range(len(values)), [f"{v:g}" if isinstance(v, float) else str(v) for v in values])
        ax.set_xlabel(name)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("dev loss")
    axes[0][0].legend(fontsize=8)
    fig.suptitle(f"{len(ok)} of {len(records)} configs trained", fontsize=10)
    fig.tight_layout()
    save_png(fig, path)
