"""Checkpoints: the five parameters as safetensors, with the config and vocabulary in its metadata.

Writes are atomic (temporary file in the same directory, fsync, rename), so an interrupted run never leaves a
truncated checkpoint behind: the old file stays until the new one is complete.
"""
from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from charmlp_fast.data import Vocab
from charmlp_fast.model import CharMLP, param_shapes

PARAM_NAMES = ("C", "W1", "b1", "W2", "b2")
FORMAT = "charmlp_fast/1"


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit; the message is one line meant for the user."""


def atomic_write(path: str | os.PathLike, write) -> None:
    """Call write(tmp_path) on a temporary file beside `path`, then rename it over `path`. On any failure (a full
    disk, Ctrl-C) the temporary file is removed and `path` keeps its previous content."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError):  # e.g. a full disk: name the user's file, not the temporary one
            e.filename = str(path)
        raise


@dataclass
class Checkpoint:
    params: list[torch.Tensor]  # [C, W1, b1, W2, b2] in the seed's layouts, on the CPU, shapes checked
    sizes: dict  # {"vocab_size", "block_size", "n_embd", "n_hidden"[, "direct"]}: CharMLP's arguments
    vocab: Vocab
    config: dict  # the training config that wrote it (TrainConfig as a dict)
    extra: dict = field(default_factory=dict)  # JSON-able training state, e.g. {"step": 1000}
    tensors: dict = field(default_factory=dict)  # tensor-valued training state, e.g. the sampler's RNG state

    def model(self, kernels: str = "reference") -> CharMLP:
        """A CharMLP on the CPU holding the checkpoint's parameters."""
        model = CharMLP(**self.sizes, kernels=kernels)
        model.load_params(self.params)
        return model


def save_checkpoint(path: str | os.PathLike, model: CharMLP, vocab: Vocab, config: dict,
                    extra: dict | None = None, tensors: dict[str, torch.Tensor] | None = None) -> None:
    """Parameters in the seed's layouts, plus `tensors` (training state) under "state." names; metadata: format,
    model sizes, vocabulary, training config and `extra`."""
    out = {name: p.detach().cpu().contiguous() for name, p in zip(PARAM_NAMES, model.params())}
    out.update({f"state.{k}": v.detach().cpu().contiguous() for k, v in (tensors or {}).items()})
    metadata = {
        "format": FORMAT,
        "model": json.dumps({"vocab_size": model.vocab_size, "block_size": model.block_size,
                             "n_embd": model.n_embd, "n_hidden": model.n_hidden, "direct": model.direct}),
        "vocab": json.dumps({"itos": list(vocab.itos), "sep": vocab.sep}),
        "config": json.dumps(config),
        "extra": json.dumps(extra or {}),
    }
    atomic_write(path, lambda tmp: save_file(out, tmp, metadata=metadata))


def load_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Read a checkpoint written by save_checkpoint; any problem is a CheckpointError with one clear line."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path} is not a readable safetensors checkpoint: {e}") from None
    if metadata.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a charmlp_fast checkpoint (format {metadata.get('format')!r})")
    try:
        sizes = json.loads(metadata["model"])
        v = json.loads(metadata["vocab"])
        vocab = Vocab(tuple(v["itos"]), v["sep"])
        config = json.loads(metadata["config"])
        extra = json.loads(metadata.get("extra", "{}"))
        expected = dict(zip(PARAM_NAMES, param_shapes(**sizes)))
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path} has damaged metadata: {e}") from None
    found = {name: tuple(tensors[name].shape) for name in PARAM_NAMES if name in tensors}
    if found != expected:
        raise CheckpointError(f"{path}: parameter shapes {found} do not match the model sizes {sizes}")
    if len(vocab) != sizes["vocab_size"]:
        raise CheckpointError(f"{path}: vocabulary of {len(vocab)} tokens but vocab_size {sizes['vocab_size']}")
    bad = {name: int((~torch.isfinite(tensors[name])).sum()) for name in PARAM_NAMES}
    if any(bad.values()):
        raise CheckpointError(f"{path} holds non-finite weights ("
                              + ", ".join(f"{name}: {n:,} of {tensors[name].numel():,}" for name, n in bad.items() if n)
                              + "): it cannot be sampled from or trained on")
    state = {k[len("state."):]: t for k, t in tensors.items() if k.startswith("state.")}
    return Checkpoint([tensors[name] for name in PARAM_NAMES], sizes, vocab, config, extra, state)
