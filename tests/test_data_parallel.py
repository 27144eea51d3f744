"""Data-parallel train under torchrun: two gloo processes on the CPU (one thread each) train one model whose loss
curve and parameters are the single-process run's with the same global batch, up to float32 summation order; what
cannot run data-parallel is a one-line error; resume crosses between torchrun and one process; a Ctrl-C stops both
ranks with rank 0's checkpoint.

TOLERANCE: the ranks average the gradients of their halves of the batch where one process takes the gradient of the
whole batch's mean, so the two runs differ by float32 summation order alone: after 200 steps of this tiny model the
per-step losses and the final parameters agree within atol 1e-5 (seen: under 1e-6), and the minibatch sampler's
state is identical."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from utils import assert_close, write_syllable_words

from charmlp_fast import ops
from charmlp_fast.checkpoint import load_checkpoint
from charmlp_fast.config import resolve_config
from charmlp_fast.train import TrainConfig, parse_args, train

ROOT = Path(__file__).resolve().parents[1]
ATOL = 1e-5  # float32 summation order only (see the module's docstring)
LAUNCH_TIMEOUT = 120  # s per torchrun launch: CI cannot hang on a stuck rendezvous or collective


@pytest.fixture
def words_file(tmp_path) -> Path:
    return write_syllable_words(tmp_path / "words.txt", seed=5, draws=2000)


def tiny(words_file: Path, out: Path, **fields) -> dict:
    """A tiny model trained 200 steps with a per-step loss record (log_every 1), the lr decayed at step 100."""
    return {"data": str(words_file), "n_embd": 4, "n_hidden": 16, "batch_size": 8, "steps": 200,
            "lr_decay_step": 100, "log_every": 1, "device": "cpu", "num_samples": 0, "plots": False,
            "out": str(out), **fields}


def flags(config: dict) -> list[str]:
    """train's command line for a config of tiny()'s fields."""
    args = []
    for name, value in config.items():
        if name == "plots":
            args += [] if value else ["--no-plots"]
        else:
            args += [f"--{name.replace('_', '-')}", str(value)]
    return args


def single(config: dict) -> Path:
    """The run in this process (no torchrun), -> its output directory."""
    train(TrainConfig(**config), progress=False)
    return Path(config["out"])


def start_torchrun(args: list[str]) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    # In a session of its own, so that a hung run is killed with its worker processes, not only the launcher.
    return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             "-m", "charmlp_fast.train", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, cwd=ROOT, env=env, start_new_session=True)


def finish(proc: subprocess.Popen, timeout: int = LAUNCH_TIMEOUT) -> tuple[str, str]:
    try:
        return proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def torchrun(args: list[str]) -> subprocess.CompletedProcess:
    proc = start_torchrun(args)
    stdout, stderr = finish(proc)
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


def our_lines(text: str) -> list[str]:
    """The trainer's own error lines (torchrun adds its report of the failed workers)."""
    return [line for line in text.splitlines() if line.startswith("charmlp_fast.train: ")]


def losses(out: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())}


def assert_same_run(actual: Path, expected: Path, steps: range) -> None:
    """The per-step losses of `steps` and the final parameters within ATOL; the sampler's state identical."""
    a, e = losses(actual), losses(expected)
    assert_close(torch.tensor([a[s] for s in steps]), torch.tensor([e[s] for s in steps]), rtol=0, atol=ATOL,
                 name="losses")
    ck_a, ck_e = load_file(actual / "model.safetensors"), load_file(expected / "model.safetensors")
    assert sorted(ck_a) == sorted(ck_e)
    for name in ck_e:
        if name.startswith("state."):
            assert torch.equal(ck_a[name], ck_e[name]), name
        else:
            assert_close(ck_a[name], ck_e[name], rtol=0, atol=ATOL, name=name)


@pytest.mark.parametrize("impl", ["reference", "fused"])
def test_two_ranks_train_the_single_process_model(tmp_path, words_file, impl):
    if impl == "fused" and not ops.kernels_built("cpu"):
        pytest.skip("the charmlp extension has no CPU kernels in this build")
    one = single(tiny(words_file, tmp_path / "one", impl=impl))
    two = torchrun(flags(tiny(words_file, tmp_path / "two", impl=impl)))
    assert two.returncode == 0, two.stderr[-3000:]
    assert_same_run(tmp_path / "two", one, range(1, 201))
    # rank 0 alone prints and writes; the other rank prints nothing
    assert two.stdout.count("config: TrainConfig(") == 1 and "data-parallel over 2 processes" in two.stdout
    assert our_lines(two.stderr) == []
    metrics = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert metrics["impl"] == impl and metrics["steps"] == 200


REFUSED = {  # flags -> the trainer's error line
    ("--impl", "persistent"): "--impl persistent: not under torchrun: it runs many SGD steps in one C++ call, with "
                              "no per-step gradient to all-reduce; use --impl fused or reference (auto's choice "
                              "there)",
    ("--batch-size", "7"): "--batch-size 7 does not split over 2 processes: under torchrun the global batch must be "
                           "a multiple of the process count",
}


@pytest.mark.parametrize("args", list(REFUSED))
def test_what_cannot_run_data_parallel_is_a_one_line_error(tmp_path, words_file, args):
    result = torchrun([*flags(tiny(words_file, tmp_path / "out")), *args])
    assert result.returncode != 0
    assert set(our_lines(result.stderr)) == {f"charmlp_fast.train: error: {REFUSED[args]}"}, result.stderr[-3000:]
    assert not (tmp_path / "out" / "model.safetensors").exists()


def test_resume_crosses_between_one_process_and_torchrun(tmp_path, words_file):
    """One process to step 100, torchrun on to 200: the uninterrupted single run's losses and parameters; that
    checkpoint resumed by one process to 300: the uninterrupted 300-step run's."""
    base = tiny(words_file, tmp_path / "a", impl="reference")
    single({**base, "steps": 100})
    two = torchrun(["--resume", str(tmp_path / "a" / "model.safetensors"), "--steps", "200", "--out",
                    str(tmp_path / "b")])
    assert two.returncode == 0, two.stderr[-3000:]
    assert "resuming at step 100" in two.stdout
    assert_same_run(tmp_path / "b", single({**base, "out": str(tmp_path / "whole200")}), range(1, 201))

    cfg, checkpoint = resolve_config(*parse_args(["--resume", str(tmp_path / "b" / "model.safetensors"),
                                                  "--steps", "300", "--out", str(tmp_path / "c")]))
    train(cfg, progress=False, checkpoint=checkpoint)
    assert_same_run(tmp_path / "c", single({**base, "steps": 300, "out": str(tmp_path / "whole300")}),
                    range(1, 301))


def test_ctrl_c_stops_both_ranks_at_one_chunk_with_rank_0s_checkpoint(tmp_path, words_file):
    """SIGINT to torchrun (which forwards it to the ranks) in a long run: both ranks stop at the same chunk
    boundary, rank 0 writes the checkpoint of that step and says so once, and no rank had to be killed."""
    out = tmp_path / "out"
    proc = start_torchrun(flags(tiny(words_file, out, steps=2_000_000, log_every=50)))
    try:
        for line in proc.stdout:  # rank 0's device line: the ranks are setting up or training
            if line.startswith("device "):
                break
        proc.send_signal(signal.SIGINT)
    finally:
        _, stderr = finish(proc, timeout=60)
    step = load_checkpoint(out / "model.safetensors").extra["step"]
    assert step % 50 == 0 and max(losses(out), default=0) == step
    assert our_lines(stderr) == [] and stderr.count(f"interrupted at step {step:,} (SIGINT): wrote") == 1, stderr
    assert "forcefully exiting" not in stderr  # torchrun did not need SIGKILL: both ranks stopped on their own
