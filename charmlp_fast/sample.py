"""Sample names (or sentences) from a trained model: the seed's loop, one token at a time from a seeded generator.

    python -m charmlp_fast.sample --checkpoint out/model.safetensors -n 20 --temperature 0.8 --top-k 5 --prefix ma
"""
from __future__ import annotations

import dataclasses

from charmlp_fast.cli import (ArgumentParser, CLIError, positive_float, positive_int, quiet_interrupts, run_main,
                              seed_int)

if __name__ == "__main__":  # before torch loads (seconds): a Ctrl-C meanwhile ends without a traceback
    quiet_interrupts()

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from charmlp_fast.data import Vocab  # noqa: E402
from charmlp_fast.model import CharMLP  # noqa: E402

SAMPLE_SEED = 2147483647 + 10  # the seed notebook's sampling generator


@torch.no_grad()
def sample_names(model: CharMLP, vocab: Vocab, n: int = 20, seed: int = SAMPLE_SEED, temperature: float = 1.0,
                 top_k: int | None = None, prefix: str = "", max_len: int = 100) -> list[str]:
    """The seed's sampling loop: the context starts as block_size boundary tokens (then the prefix's tokens),
    each token is drawn from softmax(logits / temperature) — over the top_k most likely ones if given — until
    the boundary token comes out (or max_len tokens). As the temperature goes to 0 this is greedy decoding."""
    g = torch.Generator().manual_seed(seed)
    model = model if next(model.parameters()).device.type == "cpu" else _cpu_copy(model)
    start = vocab.encode(vocab.split_text(prefix))
    if 0 in start:
        raise CLIError(f"--prefix {prefix!r} contains the boundary token {vocab.itos[0]!r}")
    names = []
    for _ in range(n):
        out = list(start)
        context = ([0] * model.block_size + out)[-model.block_size:]
        while len(out) < max_len:
            logits, _ = model(torch.tensor([context]))
            if top_k is not None and top_k < logits.shape[1]:
                kth = logits.topk(top_k, dim=1).values[:, -1:]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            # Shifted so that the largest logit is 0 before the division: at a temperature so low that
            # logits / temperature overflows, the others become -inf and the probabilities the greedy limit
            # (one-hot at the argmax, ties shared) instead of inf - inf = nan.
            probs = F.softmax((logits - logits.max(dim=1, keepdim=True).values) / temperature, dim=1)
            ix = torch.multinomial(probs, num_samples=1, generator=g).item()
            context = context[1:] + [ix]
            if ix == 0:
                break
            out.append(ix)
        names.append(vocab.decode(out))
    return names


def novelty(samples: list[str], training: set[str]) -> float:
    """Fraction of samples that are not in the training set."""
    return sum(s not in training for s in samples) / max(len(samples), 1)


def _cpu_copy(model: CharMLP) -> CharMLP:
    # Sampling is a sequential chain of tiny steps: the CPU beats a GPU round trip per token.
    copy = CharMLP(model.vocab_size, model.block_size, model.n_embd, model.n_hidden, direct=model.direct)
    copy.load_state_dict({k: v.cpu() for k, v in model.state_dict().items()})
    return copy


def main(argv: list[str] | None = None) -> int:
    from charmlp_fast.checkpoint import load_checkpoint
    from charmlp_fast.config import checkpoint_config
    from charmlp_fast.data import DataError, load_corpus_for

    p = ArgumentParser(prog="python -m charmlp_fast.sample", description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True, help="model.safetensors written by charmlp_fast.train")
    p.add_argument("-n", "--num-samples", type=positive_int, default=20, help="how many samples to draw")
    p.add_argument("--seed", type=seed_int, default=SAMPLE_SEED, help="sampling generator seed (the seed's + 10)")
    p.add_argument("--temperature", type=positive_float, default=1.0, help="softmax temperature (<1 sharper)")
    p.add_argument("--top-k", type=positive_int, default=None, help="sample only among the k most likely tokens")
    p.add_argument("--prefix", default="", help="start every sample with these letters (or words)")
    p.add_argument("--novelty", choices=("auto", "on", "off"), default="auto",
                   help="report the fraction of samples not in the training split (auto: when the data is found)")
    args = p.parse_args(argv)
    ckpt = load_checkpoint(args.checkpoint)
    samples = sample_names(ckpt.model(), ckpt.vocab, args.num_samples, args.seed, args.temperature, args.top_k,
                           args.prefix)
    for s in samples:
        print(s)
    if args.novelty != "off":
        try:
            cfg = checkpoint_config(ckpt.config, args.checkpoint)
            corpus = load_corpus_for(dataclasses.replace(cfg, block_size=ckpt.sizes["block_size"]))
        except (CLIError, DataError) as e:
            if args.novelty == "on":
                raise
            print(f"(no novelty report: {e})")
            return 0
        training = {ckpt.vocab.sep.join(seq) for seq in corpus.train_sequences}
        print(f"novelty: {novelty(samples, training):.0%} of {len(samples)} samples are not in the training split")
    return 0


if __name__ == "__main__":
    run_main("charmlp_fast.sample", main)
