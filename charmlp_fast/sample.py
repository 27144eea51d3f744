"""Sample names from a trained model: the seed's loop, one character at a time from a seeded generator.

    python -m charmlp_fast.sample --checkpoint out/model.safetensors -n 20 --seed 2147483657 --temperature 1.0
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from charmlp_fast.cli import ArgumentParser, positive_float, positive_int, run_main
from charmlp_fast.data import Vocab
from charmlp_fast.model import CharMLP

SAMPLE_SEED = 2147483647 + 10  # the seed notebook's sampling generator


@torch.no_grad()
def sample_names(model: CharMLP, vocab: Vocab, n: int = 20, seed: int = SAMPLE_SEED, temperature: float = 1.0,
                 max_len: int = 100) -> list[str]:
    """The seed's sampling loop: start from block_size boundary tokens, draw from softmax(logits / temperature)
    until the boundary token comes out (or max_len characters)."""
    g = torch.Generator().manual_seed(seed)
    model_cpu = model if next(model.parameters()).device.type == "cpu" else _cpu_copy(model)
    names = []
    for _ in range(n):
        out, context = [], [0] * model.block_size
        while len(out) < max_len:
            logits, _ = model_cpu(torch.tensor([context]))
            probs = F.softmax(logits / temperature, dim=1)
            ix = torch.multinomial(probs, num_samples=1, generator=g).item()
            context = context[1:] + [ix]
            if ix == 0:
                break
            out.append(ix)
        names.append(vocab.decode(out))
    return names


def _cpu_copy(model: CharMLP) -> CharMLP:
    # Sampling is a sequential chain of tiny steps: the CPU beats a GPU round trip per character.
    copy = CharMLP(model.vocab_size, model.block_size, model.n_embd, model.n_hidden)
    copy.load_state_dict({k: v.cpu() for k, v in model.state_dict().items()})
    return copy


def main(argv: list[str] | None = None) -> int:
    from charmlp_fast.checkpoint import load_checkpoint

    p = ArgumentParser(prog="python -m charmlp_fast.sample", description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True, help="model.safetensors written by charmlp_fast.train")
    p.add_argument("-n", "--num-samples", type=positive_int, default=20, help="how many names to sample")
    p.add_argument("--seed", type=int, default=SAMPLE_SEED, help="sampling generator seed (the seed's + 10)")
    p.add_argument("--temperature", type=positive_float, default=1.0, help="softmax temperature (<1 sharper)")
    args = p.parse_args(argv)
    model, vocab, _, _ = load_checkpoint(args.checkpoint)
    for name in sample_names(model, vocab, args.num_samples, args.seed, args.temperature):
        print(name)
    return 0


if __name__ == "__main__":
    run_main("charmlp_fast.sample", main)
