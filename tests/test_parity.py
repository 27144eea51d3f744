"""Parity with the seed: its full recipe on names.txt reaches its dev loss (seed: train 2.1260 / dev 2.1701),
through the trainer, with every implementation that runs on the CPU (graph is CUDA-only: tests/test_persistent.py)."""
from __future__ import annotations

import pytest

from charmlp_fast import ops
from charmlp_fast.data import load_corpus
from charmlp_fast.train import TrainConfig, train


@pytest.mark.slow
@pytest.mark.parametrize("impl", [
    "reference",
    pytest.param("fused", marks=pytest.mark.skipif(not ops.kernels_built("cpu"), reason="fused CPU kernels not built")),
    pytest.param("persistent", marks=pytest.mark.skipif(not ops.HAS_EXTENSION, reason="extension not built")),
])
def test_seed_recipe_reaches_seed_dev_loss(names_txt, tmp_path, impl):
    cfg = TrainConfig(data=str(names_txt), device="cpu", impl=impl, out=str(tmp_path), num_samples=0,
                      log_every=20_000)
    assert (cfg.steps, cfg.batch_size, cfg.lr, cfg.lr_decay_step, cfg.lr_after) == (200_000, 32, 0.1, 100_000, 0.01)
    metrics = train(cfg, corpus=load_corpus(names_txt, cfg.block_size), progress=False).metrics
    print(impl, metrics["losses"], f"{metrics['wall_time_s']:.1f} s")
    assert metrics["losses"]["dev"] <= 2.18
    assert metrics["losses"]["train"] <= 2.16
