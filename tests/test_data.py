"""Data pipeline against the seed's literal Python loops."""
from __future__ import annotations

import random

import pytest
import torch

from charmlp_fast.data import (DataError, Vocab, build_dataset, default_words, load_corpus, read_words,
                               split_words)


def seed_build_dataset(words, block_size):
    """The seed's loop, verbatim apart from taking stoi from the vocabulary."""
    chars = sorted(list(set("".join(words))))
    stoi = {s: i + 1 for i, s in enumerate(chars)}
    stoi["."] = 0
    X, Y = [], []
    for w in words:
        context = [0] * block_size
        for ch in w + ".":
            ix = stoi[ch]
            X.append(context)
            Y.append(ix)
            context = context[1:] + [ix]
    return torch.tensor(X, dtype=torch.long).view(-1, block_size), torch.tensor(Y, dtype=torch.long)


def random_words(rng: random.Random, n: int, alphabet: str = "abcdefghijklmnopqrstuvwxyz") -> list[str]:
    # Lengths from 1 (the shortest word the seed handles) to well past the largest block size.
    return ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 12))) for _ in range(n)]


@pytest.mark.parametrize("block_size", range(1, 9))
@pytest.mark.parametrize("case", range(3))
def test_build_dataset_equals_seed_loop(block_size, case):
    rng = random.Random(1000 * block_size + case)
    words = random_words(rng, 200, alphabet="abcxyzéü" if case == 2 else "abcdefghijklmnopqrstuvwxyz")
    words += ["a", "q"]  # 1-letter words: the context is all boundary tokens, then the word's letter
    X, Y = build_dataset(words, Vocab.from_words(words), block_size)
    Xs, Ys = seed_build_dataset(words, block_size)
    assert X.dtype == torch.long and Y.dtype == torch.long
    assert torch.equal(X, Xs)
    assert torch.equal(Y, Ys)


def test_vocab_matches_seed():
    words = ["emma", "olivia", "ava"]
    vocab = Vocab.from_words(words)
    chars = sorted(list(set("".join(words))))
    assert vocab.stoi == {".": 0, **{s: i + 1 for i, s in enumerate(chars)}}
    assert vocab.decode(vocab.encode("olivia")) == "olivia"


def test_boundary_token_in_corpus_is_an_error():
    with pytest.raises(DataError, match=r"boundary token '\.'.*'j\.r\.'"):
        Vocab.from_words(["ann", "j.r."])


def test_split_equals_seed_procedure():
    words = random_words(random.Random(7), 1001)
    expected = list(words)
    state = random.getstate()
    try:
        random.seed(42)
        random.shuffle(expected)
    finally:
        random.setstate(state)
    n1, n2 = int(0.8 * len(expected)), int(0.9 * len(expected))
    random.seed(0)
    before = random.getstate()
    tr, dev, te = split_words(words)
    assert (tr, dev, te) == (expected[:n1], expected[n1:n2], expected[n2:])
    assert random.getstate() == before  # the global RNG is neither reseeded nor advanced


def test_names_txt_matches_seed_sizes(names_txt):
    corpus = load_corpus(names_txt, 3)
    assert len(read_words(names_txt)) == 32033 and len(corpus.vocab) == 27
    assert len(corpus.train_sequences) == int(0.8 * 32033)
    # The seed's printed shapes: train 182625, dev 22655, test 22866.
    assert [corpus.splits[s][0].shape[0] for s in ("train", "dev", "test")] == [182625, 22655, 22866]


def test_build_is_fast(names_txt):
    import time

    words = read_words(names_txt)
    vocab = Vocab.from_words(words)
    t = time.perf_counter()
    build_dataset(words, vocab, 8)
    assert time.perf_counter() - t < 1.0


@pytest.mark.parametrize("content, message", [
    (b"", "holds no words"),
    (b"\n  \n\t\n", "holds no words"),
    (b"anna\n\xff\xfebob\n", "not valid UTF-8"),
])
def test_read_words_errors(tmp_path, content, message):
    path = tmp_path / "words.txt"
    path.write_bytes(content)
    with pytest.raises(DataError, match=message):
        read_words(path)


def test_read_words_missing_file(tmp_path):
    with pytest.raises(DataError, match="not found"):
        read_words(tmp_path / "nope.txt")


def test_read_words_strips_and_skips_blank(tmp_path):
    path = tmp_path / "w.txt"
    path.write_text("  anna \n\n\tbob\r\n\ncy\n", encoding="utf-8")
    assert read_words(path) == ["anna", "bob", "cy"]


def test_default_corpus():
    pytest.importorskip("pyarrow")
    try:
        words = default_words()
    except DataError as e:
        pytest.skip(str(e))
    assert len(words) >= 29_000
    assert len(set(words)) == len(words)
    assert all(w.isascii() and w.isalpha() and w.islower() for w in words)
    assert {"emma", "olivia", "liam"} <= set(words[:50])


def test_byte_order_mark_is_dropped(tmp_path):
    path = tmp_path / "bom.txt"
    path.write_bytes(b"\xef\xbb\xbfanna\nbob\n")
    assert read_words(path) == ["anna", "bob"]


def test_corpus_too_small_for_the_split(tmp_path):
    path = tmp_path / "few.txt"
    path.write_text("anna\nbob\ncy\ndora\neve\n")
    with pytest.raises(DataError, match="holds 5 words: the 80/10/10 train/dev/test split needs at least 6"):
        load_corpus(path, 3)
    path.write_text("anna\nbob\ncy\ndora\neve\nfay\n")
    corpus = load_corpus(path, 3)
    assert all(X.shape[0] > 0 for X, _ in corpus.splits.values())
