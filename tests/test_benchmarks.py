"""Smoke tests of the benchmark scripts: a few repeats at the seed's size, so that a script that no longer runs,
or that times an implementation disagreeing with eager PyTorch, fails here and not on the GPU box."""
from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch

from charmlp_fast import ops, reference
from charmlp_fast.data import load_corpus

ROOT = Path(__file__).resolve().parents[1]
needs_cpu_kernels = pytest.mark.skipif(not ops.kernels_built("cpu"), reason="the CPU kernels are not built")


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _only(out: Path, pattern: str) -> dict:
    (path,) = out.glob(pattern)
    assert path.with_suffix(".md").is_file()
    return json.loads(path.read_text())


@needs_cpu_kernels
def test_bench_ops_times_every_pass_of_every_implementation(tmp_path):
    bench = _load("bench_ops")
    assert bench.main(["--device", "cpu", "--ops", "ce,lce,model", "--sizes", "seed", "--repeats", "3",
                       "--warmup", "1", "--no-compile", "--out", str(tmp_path)]) == 0
    result = _only(tmp_path, "bench_ops_cpu_*.json")
    assert result["notes"] == []  # nothing skipped, nothing disagreed with eager
    rows = {(r["op"], r["pass"]): r for r in result["results"]}
    assert set(rows) == {(op, p) for op in ("ce", "lce", "model") for p in bench.PASSES}
    for row in rows.values():
        assert {"fused", "eager"} <= set(row["impls"])
        assert all(r["us"] > 0 and r["repeats"] >= 3 for r in row["impls"].values())
        assert all(err <= 1e-4 for err in row["max_rel_error_vs_eager"].values())
    assert result["meta"]["torch"] == torch.__version__


@needs_cpu_kernels
def test_bench_train_reports_losses_and_speedups(tmp_path, names_txt):
    bench = _load("bench_train")
    assert bench.main(["--device", "cpu", "--steps", "300", "--chunk", "100", "--impls", "eager,fused,persistent",
                       "--data", str(names_txt), "--out", str(tmp_path)]) == 0
    result = _only(tmp_path, "bench_train_cpu_*.json")
    rows = {r["impl"]: r for r in result["results"]}
    assert set(rows) == {"eager", "fused", "persistent"}
    corpus = load_corpus(names_txt, block_size=3)
    _, init_loss = reference.forward(reference.init_params(len(corpus.vocab)), *corpus.splits["dev"])
    for r in rows.values():
        # The seed's init starts far above uniform (dev loss 26.0 on names.txt); 300 steps of lr 0.1 take every
        # implementation a good part of the way down.
        assert r["dev_loss"] < init_loss.item() / 2 and r["us_per_step"] > 0 and r["speedup_vs_eager"] > 0


@needs_cpu_kernels
def test_bench_sweep_reports_every_variant_and_trains(tmp_path, names_txt):
    bench = _load("bench_sweep")
    assert bench.main(["--device", "cpu", "--models", "1,2", "--steps", "200", "--baseline-steps", "20", "--chunk",
                       "100", "--data", str(names_txt), "--out", str(tmp_path)]) == 0
    result = _only(tmp_path, "bench_sweep_cpu_*.json")
    rows = {r["models"]: r for r in result["results"]}
    assert set(rows) == {1, 2}
    one = result["one_model"]
    dev = load_corpus(names_txt, block_size=3).splits["dev"]
    for M, r in rows.items():
        rates = {v: r[v]["model_steps_per_s"] for v in ("sweep", "one_at_a_time", "torch_func")}
        assert all(math.isfinite(x) and x > 0 for x in rates.values()), rates
        assert rates["one_at_a_time"] == one["model_steps_per_s"] and r["one_at_a_time"]["wall_s"] == M * one["wall_s"]
        assert r["speedup_vs_one_at_a_time"] == pytest.approx(rates["sweep"] / rates["one_at_a_time"])
        assert r["speedup_vs_torch_func"] == pytest.approx(rates["sweep"] / rates["torch_func"])
        assert (r["sweep"]["steps"], r["sweep"]["extrapolated"]) == (200, False)
        assert (r["torch_func"]["steps"], r["torch_func"]["extrapolated"]) == (20, True)
        # The models start from the seed's init with seeds 1..M (not zeros), and 200 steps of lr 0.1 train them.
        init = sum(reference.forward(reference.init_params(27, seed=s), *dev)[1].item() for s in range(1, M + 1)) / M
        sweep = r["sweep"]
        assert sweep["init_dev_loss"] == pytest.approx(init, rel=1e-5)
        assert math.isfinite(sweep["dev_loss"]) and sweep["dev_loss"] < init / 2
        assert sweep["last_chunk_train_loss"] < init / 2
