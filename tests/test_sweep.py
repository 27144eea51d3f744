"""Sweeps: the grid, the groups, bit-for-bit parity with train, the outputs, failures, the Python API and torchrun."""
from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import DEVICES
from safetensors.torch import load_file

import charmlp_fast
from charmlp_fast import sweep as sweep_module
from charmlp_fast.cli import CLIError
from charmlp_fast.config import TrainConfig
from charmlp_fast.train import train
from utils import write_syllable_words

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def words_file(tmp_path) -> Path:
    return write_syllable_words(tmp_path / "words.txt", seed=5, draws=2000)


def run_cli(*args: str, module: str = "charmlp_fast.sweep", timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, cwd=ROOT, env=env,
                          timeout=timeout)


def small(words_file, **fields) -> dict:
    """A tiny config: 120 steps of a model with 16 hidden units, the lr decayed at step 60."""
    return {"data": str(words_file), "n_embd": 4, "n_hidden": 16, "batch_size": 8, "steps": 120,
            "lr_decay_step": 60, "log_every": 50, "num_samples": 0, "plots": False, **fields}


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# ---- the grid -----------------------------------------------------------------------------------------------------

def test_every_combination_is_a_config_in_grid_order(tmp_path):
    configs, options = sweep_module.parse_args(["--grid", "n_hidden=100,200", "--grid", "seed=1:3",
                                                "--grid", "lr=0.05", "--steps", "500", "--out", str(tmp_path)])
    assert [(c.n_hidden, c.seed) for c in configs] == [(h, s) for h in (100, 200) for s in (1, 2, 3)]
    assert {c.steps for c in configs} == {500} and {c.lr for c in configs} == {0.05}
    assert options["out"] == tmp_path
    groups = sweep_module.group_configs(configs)
    assert [g.members for g in groups] == [[0, 1, 2], [3, 4, 5]]  # the seeds share a shape, the sizes do not


def test_ranges_and_flag_spellings():
    configs, _ = sweep_module.parse_args(["--grid", "n-embd=2,5:9:2", "--grid", "lr_after=0.001,0.01"])
    assert sorted({c.n_embd for c in configs}) == [2, 5, 7, 9] and len(configs) == 8
    schedules, _ = sweep_module.parse_args(["--grid", "lr_schedule=step,inverse", "--grid", "init=seed,scaled"])
    assert [(c.lr_schedule, c.init) for c in schedules] == [(s, i) for s in ("step", "inverse")
                                                             for i in ("seed", "scaled")]
    with pytest.raises(CLIError, match="--grid lr_schedule=cosine: expected one of step, inverse"):
        sweep_module.parse_args(["--grid", "lr_schedule=cosine"])


def test_preset_seed_is_the_seeds_exploration_and_flags_fix_its_fields():
    configs, _ = sweep_module.parse_args(["--preset", "seed"])
    assert {(c.n_embd, c.n_hidden, c.lr) for c in configs} == {
        (e, h, lr) for e in (2, 10) for h in (100, 200, 300) for lr in (0.05, 0.1, 0.2)}
    fixed, _ = sweep_module.parse_args(["--preset", "seed", "--lr", "0.1"])
    assert len(fixed) == 6 and {c.lr for c in fixed} == {0.1}


@pytest.mark.parametrize("args,message", [
    (["--grid", "n_hidden=0,10"], "--grid n_hidden=0: expected a positive integer, got 0"),
    (["--grid", "lr=fast"], "--grid lr=fast: expected a positive number, got 'fast'"),
    (["--grid", "out=a,b"], "--grid out: not a sweepable field"),
    (["--grid", "n_hidden=10", "--grid", "n_hidden=20"], "--grid n_hidden is given twice"),
    (["--grid", "n_hidden=10", "--n-hidden", "20"], "--n-hidden is given both as a fixed value and in --grid"),
    (["--grid", "seed=5:2"], "needs A <= B"),
    (["--grid", "seed=1,1"], "a value is given twice"),
    (["--grid", "n_hidden"], "expected NAME=V1,V2,... or NAME=A:B"),
])
def test_bad_grids_are_one_line_errors(args, message):
    with pytest.raises(CLIError) as e:
        sweep_module.parse_args(args)
    assert message in str(e.value)


def test_cli_errors_are_one_line_with_status_2(tmp_path):
    result = run_cli("--grid", "n_hidden=-3", "--out", str(tmp_path / "o"))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "charmlp_fast.sweep: error: --grid n_hidden=-3: expected a positive integer, got -3"]


def test_shards_are_deterministic_and_balanced():
    costs = [9, 1, 5, 5, 3, 8]
    # the costliest first, each to the least-loaded rank: 0 (9), 5 (8), 2 (5), 3 (5 -> rank 2 at 5), 4 (3 -> rank 1
    # at 8), 1 (1 -> rank 0 at 9); each rank's in their given order
    assert sweep_module.shard(list(range(6)), lambda g: costs[g], 3) == [[0, 1], [4, 5], [2, 3]]
    assert sweep_module.shard(list(range(3)), lambda g: 1, 1) == [[0, 1, 2]]


# ---- training -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
def test_a_model_in_a_sweep_is_bit_for_bit_its_train_run(tmp_path, words_file, device):
    """Two groups (hidden 16 and 24) of three models (two learning rates, two seeds): every model's checkpoint,
    train and dev loss equal a train run of its config, on the CPU loop and on the emulated CUDA kernel."""
    grid = [small(words_file, device=str(device), n_hidden=h, lr=lr, seed=s)
            for h in (16, 24) for lr, s in ((0.1, 1), (0.3, 1), (0.1, 2))]
    records = charmlp_fast.sweep(grid, out=tmp_path / "sw", save="all", progress=False)
    assert [r["models_in_call"] for r in records] == [3] * 6
    assert all(r["status"] == "ok" and r["impl"] == "persistent" for r in records), records
    for k in (0, 4):  # one config of each group
        cfg = TrainConfig(**{**records[k]["config"], "out": str(tmp_path / f"train{k}")})
        metrics = train(cfg, progress=False).metrics
        assert (records[k]["train_loss"], records[k]["dev_loss"]) == (metrics["losses"]["train"],
                                                                       metrics["losses"]["dev"])
        mine = load_file(tmp_path / "sw" / "runs" / f"{k:03d}" / "model.safetensors")
        theirs = load_file(tmp_path / f"train{k}" / "model.safetensors")
        assert all(torch.equal(mine[n], theirs[n]) for n in theirs), k


@pytest.mark.parametrize("impl", ["fused", "reference"])
def test_a_group_the_persistent_loop_does_not_run_trains_model_by_model_as_train_does(tmp_path, words_file, impl):
    """An explicit eager implementation: each model with train's own stepper and calls, so the same checkpoints."""
    grid = [small(words_file, device="cpu", impl=impl, seed=s) for s in (1, 2)]
    records = charmlp_fast.sweep(grid, out=tmp_path / "sw", save="all", progress=False)
    assert [(r["status"], r["impl"], r["models_in_call"]) for r in records] == [("ok", impl, 2)] * 2
    cfg = TrainConfig(**{**records[1]["config"], "out": str(tmp_path / "train")})
    metrics = train(cfg, progress=False).metrics
    assert records[1]["dev_loss"] == metrics["losses"]["dev"]
    mine = load_file(tmp_path / "sw" / "runs" / "001" / "model.safetensors")
    theirs = load_file(tmp_path / "train" / "model.safetensors")
    assert set(mine) == set(theirs) and all(torch.equal(mine[n], theirs[n]) for n in theirs)  # the sampler too


def test_outputs_best_checkpoint_and_test_loss_of_the_best_only(tmp_path, words_file):
    out = tmp_path / "sw"
    result = run_cli("--data", str(words_file), "--grid", "n_hidden=12,20", "--grid", "lr=0.05,0.2",
                     "--n-embd", "4", "--batch-size", "8", "--steps", "150", "--lr-decay-step", "100",
                     "--log-every", "50", "--device", "cpu", "--out", str(out))
    assert result.returncode == 0, result.stderr
    records = read_jsonl(out / "results.jsonl")
    assert [r["id"] for r in records] == [0, 1, 2, 3]
    for r in records:
        assert r["status"] == "ok" and r["steps"] == 150 and r["device"] == "cpu" and r["wall_s"] > 0
        assert set(r["config"]) == {f for f in TrainConfig.__dataclass_fields__}
        assert 0 < r["dev_loss"] < 4 and 0 < r["train_loss"] < 4
    best = min(records, key=lambda r: r["dev_loss"])
    assert [r["id"] for r in records if "test_loss" in r] == [best["id"]]
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert [float(row["dev_loss"]) for row in rows] == [r["dev_loss"] for r in records]
    assert rows[0]["n_hidden"] == "12" and rows[0]["device"] == "cpu" and rows[0]["config_device"] == "cpu"
    assert (out / "sweep.png").stat().st_size > 10_000
    assert not (out / "runs").exists()  # --save best: the best's checkpoint only
    table = result.stdout.splitlines()
    header = next(i for i, line in enumerate(table) if line.split()[:2] == ["rank", "id"])
    assert table[header + 1].split()[1] == str(best["id"])  # sorted by dev loss, best first
    # The best checkpoint is train's: train --resume continues it.
    resumed = run_cli("--resume", str(out / "best" / "model.safetensors"), "--steps", "200", "--no-plots",
                      "--num-samples", "0", module="charmlp_fast.train")
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming at step 150" in resumed.stdout


def test_a_diverging_config_is_reported_and_the_others_are_kept(tmp_path, words_file):
    records = charmlp_fast.sweep([small(words_file, lr=lr) for lr in (0.1, 1e4, 0.2)], out=tmp_path / "sw",
                                 progress=False)
    assert [r["status"] for r in records] == ["ok", "diverged", "ok"]
    assert "lower --lr or --lr-after" in records[1]["error"] and records[1]["dev_loss"] is None
    assert records[0]["dev_loss"] < 4 and records[2]["dev_loss"] < 4
    assert "test_loss" in min((records[0], records[2]), key=lambda r: r["dev_loss"])


def test_a_group_that_raises_fails_alone(tmp_path, words_file, monkeypatch):
    """The configs of a group whose training raises are reported failed, with the error; the other groups' results
    are written."""
    train_group = sweep_module.train_group

    def failing(run, *args):
        if run.configs[0].n_hidden == 20:
            raise RuntimeError("out of memory on the device\nsecond line")
        return train_group(run, *args)

    monkeypatch.setattr(sweep_module, "train_group", failing)
    records = charmlp_fast.sweep([small(words_file, n_hidden=h) for h in (12, 20)], out=tmp_path / "sw",
                                 progress=False)
    assert records[1]["status"] == "failed"
    assert records[1]["error"] == "RuntimeError: out of memory on the device"
    assert records[0]["status"] == "ok" and "test_loss" in records[0]
    assert [r["status"] for r in read_jsonl(tmp_path / "sw" / "results.jsonl")] == ["ok", "failed"]


def test_ctrl_c_keeps_the_groups_that_finished(tmp_path, words_file):
    """SIGINT while the second group trains: exit 130, and results.jsonl holds the first group's configs."""
    out = tmp_path / "sw"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "charmlp_fast.sweep", "--data", str(words_file), "--grid",
                             "steps=200,2000000", "--grid", "seed=1:2", "--n-embd", "4", "--n-hidden", "16",
                             "--batch-size", "8", "--device", "cpu", "--no-plots", "--out", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env)
    try:
        for line in proc.stdout:  # the first group's line: it has finished and its results are written
            if line.startswith("group "):
                break
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130, stderr
    assert "interrupted: 2 of 4 configs trained" in stderr
    records = read_jsonl(out / "results.jsonl")
    assert [(r["id"], r["status"], r["steps"]) for r in records] == [(0, "ok", 200), (1, "ok", 200)]
    assert (out / "best" / "model.safetensors").is_file()


def test_dry_run_prints_configs_groups_and_estimate_and_trains_nothing(tmp_path, words_file):
    out = tmp_path / "sw"
    result = run_cli("--data", str(words_file), "--grid", "n_hidden=12,20", "--grid", "seed=1:2", "--device", "cpu",
                     "--steps", "1000", "--out", str(out), "--dry-run")
    assert result.returncode == 0, result.stderr
    assert "4 configs" in result.stdout and "2 groups on cpu" in result.stdout
    assert "2 models, persistent" in result.stdout and "estimated" in result.stdout
    assert not out.exists()


# ---- the Python API ---------------------------------------------------------------------------------------------

def test_python_api_train_returns_the_metrics_and_the_module_still_runs(tmp_path, words_file):
    metrics = charmlp_fast.train(small(words_file, out=str(tmp_path / "run")), progress=False)
    assert metrics["steps"] == 120 and metrics["losses"]["dev"] < 4
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["losses"] == metrics["losses"]
    import charmlp_fast.train as train_module  # importing the module again keeps it callable

    assert train_module is charmlp_fast.train and callable(charmlp_fast.train)
    with pytest.raises(CLIError, match="n_hidden: expected a positive integer, got 0"):
        charmlp_fast.train(small(words_file, n_hidden=0))
    with pytest.raises(CLIError, match="'hidden' is not a train setting"):
        charmlp_fast.train({"hidden": 3})


def test_python_api_sweep_refuses_what_only_train_does(words_file):
    with pytest.raises(CLIError, match="resume and eval_every are train's"):
        charmlp_fast.sweep([small(words_file, eval_every=50)], progress=False)
    with pytest.raises(CLIError, match="share their device"):
        charmlp_fast.sweep([small(words_file, device="cpu"), small(words_file, device="auto")], progress=False)


def test_python_api_sweep_without_an_output_directory_writes_nothing(tmp_path, words_file, monkeypatch):
    monkeypatch.chdir(tmp_path)
    records = charmlp_fast.sweep([small(words_file, seed=s) for s in (1, 2)], progress=False)
    assert len(records) == 2 and all(r["status"] == "ok" for r in records)
    assert list(tmp_path.iterdir()) == [words_file]


# ---- torchrun ---------------------------------------------------------------------------------------------------

def test_torchrun_two_processes_give_one_process_results_bit_for_bit(tmp_path, words_file):
    """Three groups over two gloo processes on the CPU: the same records (losses to the last bit) and the same
    best checkpoint as one process."""
    args = ["--data", str(words_file), "--grid", "n_hidden=12,16,20", "--grid", "seed=1:2", "--n-embd", "4",
            "--batch-size", "8", "--steps", "120", "--lr-decay-step", "60", "--log-every", "50", "--device", "cpu",
            "--no-plots"]
    one = run_cli(*args, "--out", str(tmp_path / "one"))
    assert one.returncode == 0, one.stderr
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    # In a session of its own, so that a hung run is killed with its worker processes, not only the launcher.
    two = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                            "-m", "charmlp_fast.sweep", *args, "--out", str(tmp_path / "two")], stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env, start_new_session=True)
    try:
        _, stderr = two.communicate(timeout=240)
    finally:
        if two.poll() is None:
            os.killpg(two.pid, signal.SIGKILL)
            two.wait()
    assert two.returncode == 0, stderr[-3000:]
    def comparable(d):  # all but the wall time and the output directory
        return [{**r, "wall_s": None, "config": {**r["config"], "out": None}}
                for r in read_jsonl(tmp_path / d / "results.jsonl")]

    assert comparable("one") == comparable("two")
    best_one, best_two = (load_file(tmp_path / d / "best" / "model.safetensors") for d in ("one", "two"))
    assert all(torch.equal(best_one[n], best_two[n]) for n in best_one)
