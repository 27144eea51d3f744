"""Every way the command-line programs can fail: one line on stderr, a non-zero exit, never a traceback, nothing
lost and no half-written file. Subprocesses on tiny corpora made here, CPU only."""
from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from utils import SYLLABLES, write_syllable_words

from charmlp_fast.checkpoint import load_checkpoint, save_checkpoint
from charmlp_fast.cli import ONE_THREAD_WORK, threads_for
from charmlp_fast.data import MIN_SEQUENCES, Vocab, split_sizes
from charmlp_fast.model import CharMLP
from charmlp_fast.train import DIVERGENCE_FACTOR, TrainConfig, TrainingDiverged, chunk_stats, train

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
TINY = ["--device", "cpu", "--n-hidden", "16", "--num-samples", "2", "--no-plots"]


@pytest.fixture
def words_file(tmp_path) -> Path:
    return write_syllable_words(tmp_path / "words.txt", seed=7, draws=400, max_syllables=3,
                                syllables=SYLLABLES[:9])


def run_cli(module: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, env=ENV,
                          timeout=120)


def start_trainer(words_file: Path, out: Path, *args: str, steps: int = 10_000_000) -> subprocess.Popen:
    """A training run in the background, long enough to be stopped by a signal."""
    return subprocess.Popen([sys.executable, "-m", "charmlp_fast.train", "--data", str(words_file), "--steps",
                             str(steps), "--out", str(out), *args, *TINY],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)


def run_patched(patch: str, *args: str, module: str = "train") -> subprocess.CompletedProcess:
    """`python -m charmlp_fast.<module> args` with `patch` (Python source) run first; `full(path)` in it raises the
    OSError of a full disk."""
    script = textwrap.dedent("""
        import errno, os, signal, sys
        from pathlib import Path
        import charmlp_fast.{module} as program
        from charmlp_fast.cli import run_main

        def full(path):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
    """).format(module=module) + textwrap.dedent(patch)
    script += f"\nrun_main('charmlp_fast.{module}', program.main, sys.argv[1:])\n"
    return subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, env=ENV,
                          timeout=120)


def run_many(module: str, argvs: list[list[str]]) -> list[tuple[int, str]]:
    """(exit status, stderr) of main(argv) for each argv, through run_main, all in one subprocess (start-up is
    the slow part of these checks)."""
    script = textwrap.dedent(f"""
        import contextlib, io, json, sys
        import charmlp_fast.{module} as program
        from charmlp_fast.cli import run_main

        results = []
        for argv in json.loads(sys.argv[1]):
            err = io.StringIO()
            with contextlib.redirect_stderr(err):
                try:
                    run_main("charmlp_fast.{module}", program.main, argv)
                except SystemExit as e:
                    results.append([e.code, err.getvalue()])
        print(json.dumps(results))
    """)
    result = subprocess.run([sys.executable, "-c", script, json.dumps(argvs)], capture_output=True, text=True,
                            env=ENV, timeout=120)
    assert result.returncode == 0, result.stderr
    return [tuple(r) for r in json.loads(result.stdout.splitlines()[-1])]


def error_line(result) -> str:
    """The one error line of a failed run (a progress bar may stand before it), after checking the basics."""
    code, stderr = (result.returncode, result.stderr) if hasattr(result, "stderr") else result
    assert code not in (0, None), stderr
    assert "Traceback" not in stderr, stderr
    lines = [line for line in stderr.splitlines() if "error:" in line or "interrupted" in line]
    assert len(lines) == 1, stderr
    return lines[0]


def no_temporaries(directory: Path) -> None:
    assert not [p.name for p in directory.iterdir() if p.name.endswith(".tmp")]


def jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]  # every line whole


# ---- output paths ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("module", ["train", "lr_find"])
def test_bad_output_directories_fail_before_any_work(tmp_path, words_file, module):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    cases = [(str(a_file), "is an existing file"), (str(a_file / "below"), "cannot create or write"),
             ("/proc/charmlp_no_such_dir/out", "cannot create or write")]
    extra = ["--steps", "100000"] if module == "train" else ["--steps", "100000", "--n-hidden", "16"]
    results = run_many(module, [["--data", str(words_file), "--device", "cpu", "--out", out, *extra]
                                for out, _ in cases])
    for (out, message), result in zip(cases, results):
        assert result[0] == 2
        line = error_line(result)
        assert message in line and out in line
    assert a_file.read_text() == "x"


def test_a_second_trainer_on_the_same_out_is_refused(tmp_path, words_file):
    out = tmp_path / "run"
    first = start_trainer(words_file, out, "--impl", "reference", "--log-every", "50")
    try:
        wait_for_records(first, out / "metrics.jsonl")
        second = run_cli("charmlp_fast.train", "--data", str(words_file), "--steps", "100", "--out", str(out), *TINY)
        assert "another trainer is writing to" in error_line(second)
        first.send_signal(signal.SIGINT)
        first.communicate(timeout=60)
    finally:
        first.kill()
    assert first.returncode == 130
    # The lock went with the first trainer: the directory can be resumed from now.
    step = load_checkpoint(out / "model.safetensors").extra["step"]
    again = run_cli("charmlp_fast.train", "--resume", str(out / "model.safetensors"), "--steps", str(step + 50),
                    "--no-plots", "--num-samples", "0")
    assert again.returncode == 0, again.stderr


# ---- a full disk -------------------------------------------------------------------------------------------

FULL_DISK = {
    # The second model.safetensors write (at step 200) fails half-way: the one of step 100 must stay.
    "checkpoint": """
        import charmlp_fast.checkpoint as c
        real, calls = c.save_file, []
        def save_file(tensors, filename, metadata=None):
            if Path(filename).name.startswith(".model.safetensors."):  # not best.safetensors
                calls.append(filename)
            if len(calls) == 2 and calls[-1] == filename:
                Path(filename).write_bytes(b"partial")
                full(filename)
            real(tensors, filename, metadata=metadata)
        c.save_file = save_file
    """,
    # The third record of metrics.jsonl is cut off after half its bytes.
    "metrics.jsonl": """
        real, calls = program.MetricsLog._write, []
        def _write(self, data):
            calls.append(data)
            if len(calls) == 3:
                real(self, data[:len(data) // 2])
                full(self.path)
            real(self, data)
        program.MetricsLog._write = _write
    """,
    "metrics.json": """
        real = program.atomic_write
        def atomic_write(path, write):
            if Path(path).name == "metrics.json":
                write = lambda tmp: (Path(tmp).write_text('{"half'), full(tmp))
            real(path, write)
        program.atomic_write = atomic_write
    """,
    "loss.png": """
        import matplotlib.figure
        def savefig(self, fname, **kwargs):
            Path(fname).write_bytes(b"\\x89PNG half")
            full(fname)
        matplotlib.figure.Figure.savefig = savefig
    """,
}


@pytest.mark.parametrize("target", list(FULL_DISK))
def test_a_full_disk_is_one_line_and_loses_nothing_written(tmp_path, words_file, target):
    out = tmp_path / "run"
    args = ["--data", str(words_file), "--steps", "300", "--eval-every", "100", "--log-every", "50",
            "--out", str(out), "--device", "cpu", "--n-hidden", "16", "--num-samples", "0"]
    result = run_patched(FULL_DISK[target], *args)
    assert result.returncode == 1
    assert "No space left on device" in error_line(result)
    no_temporaries(out)
    ck = load_checkpoint(out / "model.safetensors")  # the checkpoint on disk is whole
    log = jsonl(out / "metrics.jsonl")
    assert [r["step"] for r in log] == list(range(50, 50 * len(log) + 1, 50))
    if target == "checkpoint":
        assert ck.extra["step"] == 100 and log[-1]["step"] == 150  # the failed chunk was not logged
    elif target == "metrics.jsonl":
        assert len(log) == 2
    else:  # the training itself is saved before metrics.json and the plots
        assert ck.extra["step"] == 300 and log[-1]["step"] == 300
    assert not (out / "loss.png").exists()
    assert (out / "metrics.json").exists() == (target == "loss.png")


# ---- divergence ---------------------------------------------------------------------------------------------

def test_a_normal_start_is_not_divergence():
    start = torch.tensor([27.0, 25.0, 22.0, 20.0])  # the seed's initialisation on names: ~20-27, far above ln 27
    stats = chunk_stats(start, torch.full((4,), 0.1), 0, None, 27)
    assert stats["first"] == 27.0 and stats["loss_mean"] == pytest.approx(23.5)
    assert stats["loss_p10"] <= stats["loss_p50"] <= stats["loss_p90"]
    with pytest.raises(TrainingDiverged, match=r"at step 12 \(learning rate 5\)"):
        chunk_stats(torch.tensor([3.0, 9e6, 1e7]), torch.full((3,), 5.0), 11, 27.0, 27)
    bound = DIVERGENCE_FACTOR * math.log(27)
    with pytest.raises(TrainingDiverged, match=f"= {bound:.4g}"):  # after a resume: ln V bounds a trained start
        chunk_stats(torch.tensor([2.0 * bound] * 3), torch.full((3,), 0.1), 0, 2.0, 27)


def test_finite_divergence_stops_and_keeps_the_last_good_checkpoint(tmp_path, words_file):
    out = tmp_path / "run"
    result = run_cli("charmlp_fast.train", "--data", str(words_file), "--steps", "400", "--lr-decay-step", "200",
                     "--lr-after", "1e6", "--eval-every", "100", "--log-every", "50", "--out", str(out), *TINY)
    line = error_line(result)
    assert result.returncode == 2 and "diverged" in line and "(learning rate 1e+06)" in line
    assert int(line.split(" at step ")[1].split()[0]) >= 200
    assert load_checkpoint(out / "model.safetensors").extra["step"] == 200
    assert jsonl(out / "metrics.jsonl")[-1]["step"] == 200
    no_temporaries(out)


# ---- corpora -------------------------------------------------------------------------------------------------

def test_minimum_corpus_size():
    assert MIN_SEQUENCES == 6
    assert min(split_sizes(MIN_SEQUENCES - 1)) == 0
    assert all(min(split_sizes(n)) >= 1 for n in range(MIN_SEQUENCES, 1000))


def test_a_corpus_too_small_for_the_split_is_refused(tmp_path):
    argvs = []
    for n in (2, 3, 5, 6):
        path = tmp_path / f"{n}.txt"
        path.write_text("\n".join(["anna", "bob", "cy", "dora", "eve", "fay"][:n]) + "\n")
        argvs.append(["--data", str(path), "--steps", "5", "--out", str(tmp_path / f"out{n}"), *TINY])
    sentences = tmp_path / "sentences.txt"
    sentences.write_text("The cat sat. A dog ran.\n")
    argvs.append(["--data", str(sentences), "--tokens", "words", "--steps", "5", "--out", str(tmp_path / "w"), *TINY])
    *small, six, words = run_many("train", argvs)
    for result, n in zip(small, (2, 3, 5)):
        line = error_line(result)
        assert f"holds {n} words" in line and "needs at least 6" in line
    assert "holds 2 sentences" in error_line(words)
    assert six[0] == 0, six[1]
    assert not (tmp_path / "out2").exists()


def test_word_corpus_and_vocabulary_errors_are_one_line(tmp_path, words_file):
    corpus, partial = tmp_path / "corpus", tmp_path / "partial"
    for directory, names in ((corpus, ("train", "valid", "test")), (partial, ("train", "test"))):
        directory.mkdir()
        for name in names:
            (directory / f"{name}.txt").write_text("a b a\n")
    words = ["--tokens", "words", "--out", str(tmp_path / "out"), *TINY]
    chars = ["--data", str(words_file), "--out", str(tmp_path / "out"), *TINY]
    cases = [(["--data", str(partial), *words], f"{partial / 'valid.txt'} not found"),
             (["--data", str(corpus), "--min-count", "3", *words], "--min-count 3 leaves no word"),
             (["--min-count", "4", *chars], "--min-count applies to --tokens words only"),
             (["--context", "stream", *chars], "--context applies to --tokens words only"),
             (["--lower", *chars], "--lower applies to --tokens words only"),
             (["--data", "sotu", *chars[2:]], "--data sotu is a word corpus: add --tokens words"),
             (["--min-count", "0", *chars], "--min-count: expected a positive integer, got 0"),
             (["--context", "line", *chars], "--context: invalid choice")]
    for (args, message), result in zip(cases, run_many("train", [a for a, _ in cases])):
        assert result[0] == 2 and message in error_line(result), (args, result)
    assert not (tmp_path / "out").exists()


def test_a_byte_order_mark_is_not_a_token(tmp_path):
    path = tmp_path / "bom.txt"
    path.write_bytes("\ufeffanna\nbob\ncy\ndora\neve\nfay\ngus\n".encode())
    result = run_cli("charmlp_fast.train", "--data", str(path), "--steps", "5", "--out", str(tmp_path / "out"), *TINY)
    assert result.returncode == 0, result.stderr
    vocab = load_checkpoint(tmp_path / "out" / "model.safetensors").vocab
    assert vocab.itos == (".", *sorted(set("annabobcydoraevefaygus")))


# ---- flags ---------------------------------------------------------------------------------------------------

def test_out_of_range_numbers_are_one_line_errors(tmp_path, words_file):
    data = ["--data", str(words_file), "--out", str(tmp_path / "out")]
    train_cases = [(["--seed", str(2 ** 70)], "--seed: expected a seed (0 <= seed < 2**63) integer"),
                   (["--seed", str(2 ** 63)], "--seed"), (["--seed", "-1"], "--seed"),
                   (["--threads", "0"], "--threads: expected a positive integer, got 0"),
                   (["--threads", "many"], "--threads: expected a positive integer, got 'many'"),
                   (["--lr", "nan"], "--lr: expected a positive finite number"),
                   (["--lr-after", "inf"], "--lr-after: expected a positive finite number")]
    lr_cases = [(["--lo", "nan"], "--lo: expected a finite number, got nan"),
                (["--hi", "inf"], "--hi: expected a finite number, got inf"),
                (["--lo", "-1", "--hi", "-1"], "--lo -1 must be below --hi -1"),
                (["--lo", "0", "--hi", "-2"], "must be below"),
                (["--hi", "50"], "float32"), (["--seed", str(2 ** 70)], "--seed")]
    for module, cases in (("train", train_cases), ("lr_find", lr_cases)):
        for (args, message), result in zip(cases, run_many(module, [a + data for a, _ in cases])):
            assert result[0] == 2 and message in error_line(result), (args, result)
    assert not (tmp_path / "out").exists()
    result = run_cli("charmlp_fast.sample", "--checkpoint", "none", "--seed", str(2 ** 70))
    assert "--seed: expected a seed" in error_line(result)


# ---- checkpoints and sampling ---------------------------------------------------------------------------------

def small_checkpoint(path: Path, config: dict | None = None, poison: bool = False) -> Vocab:
    vocab = Vocab.from_words(["anna", "bob"])
    model = CharMLP(len(vocab), n_hidden=8)
    if poison:
        with torch.no_grad():
            model.W1[0, 0] = float("nan")
            model.b2[1] = float("inf")
    cfg = config or dataclasses.asdict(TrainConfig(n_hidden=8, steps=100, device="cpu", out=str(path.parent)))
    save_checkpoint(path, model, vocab, cfg, {"step": 10, "impl": "reference"})
    return vocab


def test_sampling_at_a_vanishing_temperature_is_greedy(tmp_path, words_file):
    out = tmp_path / "run"
    train(TrainConfig(data=str(words_file), steps=200, n_hidden=16, device="cpu", out=str(out), num_samples=0,
                      plots=False), progress=False)
    ckpt = str(out / "model.safetensors")
    cold = run_cli("charmlp_fast.sample", "--checkpoint", ckpt, "-n", "4", "--temperature", "1e-40",
                   "--novelty", "off")
    assert cold.returncode == 0 and "Traceback" not in cold.stderr, cold.stderr
    greedy = run_cli("charmlp_fast.sample", "--checkpoint", ckpt, "-n", "4", "--top-k", "1", "--novelty", "off")
    assert cold.stdout == greedy.stdout and len(set(cold.stdout.split())) == 1


def test_non_finite_weights_are_refused_at_load(tmp_path):
    path = tmp_path / "model.safetensors"
    small_checkpoint(path, poison=True)
    for result in (run_cli("charmlp_fast.sample", "--checkpoint", str(path)),
                   run_cli("charmlp_fast.train", "--resume", str(path), "--steps", "20")):
        line = error_line(result)
        assert "non-finite weights (W1: 1 of" in line and "b2: 1 of" in line


def test_a_newer_checkpoint_names_the_unknown_setting(tmp_path):
    path = tmp_path / "model.safetensors"
    config = {**dataclasses.asdict(TrainConfig(n_hidden=8, device="cpu", out=str(tmp_path))), "momentum": 0.9}
    small_checkpoint(path, config)
    line = error_line(run_cli("charmlp_fast.train", "--resume", str(path), "--steps", "20"))
    assert "'momentum'" in line and "newer" in line


# ---- signals -------------------------------------------------------------------------------------------------

def wait_for_records(proc: subprocess.Popen, path: Path, n: int = 1) -> None:
    deadline = time.time() + 60
    while not path.exists() or len(path.read_text().splitlines()) < n:
        assert proc.poll() is None, proc.communicate()[1]
        assert time.time() < deadline, "no metrics written"
        time.sleep(0.05)


def test_sigterm_checkpoints_like_ctrl_c(tmp_path, words_file):
    out = tmp_path / "run"
    proc = start_trainer(words_file, out, "--impl", "reference", "--log-every", "50")
    try:
        wait_for_records(proc, out / "metrics.jsonl")
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 143, stderr
    assert "interrupted at step" in error_line((proc.returncode, stderr)) and "SIGTERM" in stderr
    step = load_checkpoint(out / "model.safetensors").extra["step"]
    assert step % 50 == 0 and jsonl(out / "metrics.jsonl")[-1]["step"] == step


def test_a_second_ctrl_c_during_the_checkpoint_write(tmp_path, words_file):
    # The first Ctrl-C comes after the first chunk, the second while the checkpoint of the interruption is written.
    patch = """
        import charmlp_fast.checkpoint as c, time
        real_stats = program.chunk_stats
        def chunk_stats(*args):
            os.kill(os.getpid(), signal.SIGINT)
            return real_stats(*args)
        program.chunk_stats = chunk_stats
        real = c.save_file
        def save_file(tensors, filename, metadata=None):
            Path(filename).write_bytes(b"partial")
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(5)
            real(tensors, filename, metadata=metadata)
        c.save_file = save_file
    """
    out = tmp_path / "run"
    result = run_patched(patch, "--data", str(words_file), "--steps", "1000", "--impl", "reference",
                         "--log-every", "50", "--out", str(out), *TINY)
    assert result.returncode == 130 and "interrupted" in error_line(result)
    assert not (out / "model.safetensors").exists()
    no_temporaries(out)
    assert len(jsonl(out / "metrics.jsonl")) == 1


def native_call(seconds: float):
    """A function that runs about `seconds` in one native call, during which Python runs no signal handler."""
    import hashlib

    t0 = time.perf_counter()
    hashlib.pbkdf2_hmac("sha256", b"x", b"y", 20_000)
    rounds = max(20_000, int(20_000 * seconds / max(time.perf_counter() - t0, 1e-6)))
    return lambda: hashlib.pbkdf2_hmac("sha256", b"x", b"y", rounds)


@pytest.mark.parametrize("second", [signal.SIGINT, signal.SIGTERM])
def test_two_signals_inside_one_native_call_abort(second):
    # Python calls a handler once for signals that arrived during one native call (a long persistent call): the
    # second must still abort, not merge into the first.
    import threading

    from charmlp_fast.train import deferred_sigint

    call = native_call(1.0)
    sent, before = [], signal.getsignal(signal.SIGINT)

    def send():
        time.sleep(0.2)
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.2)
        os.kill(os.getpid(), second)
        sent.append(time.perf_counter())

    with pytest.raises(KeyboardInterrupt):
        with deferred_sigint() as state:
            sender = threading.Thread(target=send)
            sender.start()
            call()
            assert sent and time.perf_counter() > sent[0], "the call ended before both signals were sent"
            for _ in range(100):  # the handler runs between these bytecodes
                pass
    sender.join()
    assert state["interrupted"] and signal.getsignal(signal.SIGINT) is before  # restored
    with deferred_sigint() as state:  # one signal in a call only asks to stop
        threading.Timer(0.2, os.kill, (os.getpid(), signal.SIGINT)).start()
        call()
        for _ in range(100):
            pass
        assert state["interrupted"] and state["signal"] == signal.SIGINT


def test_ctrl_c_during_start_up_has_no_traceback(tmp_path, words_file):
    for delay in (0.5, 1.5):  # while torch is imported, then while the data is read or training starts
        proc = start_trainer(words_file, tmp_path / f"out{delay}")
        try:
            time.sleep(delay)
            proc.send_signal(signal.SIGINT)
            _, stderr = proc.communicate(timeout=30)
        finally:
            proc.kill()
        # Never lost (torch turns a KeyboardInterrupt inside its numpy import into a missing numpy and carries on):
        # the run ends at once, before training or after its first chunk.
        assert proc.returncode == 130, stderr
        assert "Traceback" not in stderr, stderr
        assert "interrupted" in stderr.strip().splitlines()[-1], stderr


def test_a_second_ctrl_c_aborts_a_long_persistent_chunk_at_once(tmp_path, words_file):
    out = tmp_path / "run"
    proc = start_trainer(words_file, out, "--impl", "persistent", "--log-every", "100000000", steps=100_000_000)
    try:
        while "device cpu" not in proc.stdout.readline():
            assert proc.poll() is None, proc.communicate()[1]
        time.sleep(1.0)  # inside the chunk
        proc.send_signal(signal.SIGINT)
        time.sleep(0.5)
        t0 = time.time()
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=30)
        took = time.time() - t0
    finally:
        proc.kill()
    assert proc.returncode == 130 and "interrupted" in error_line((proc.returncode, stderr))
    assert took < 5, took
    no_temporaries(out)


# ---- metrics.jsonl across a kill and a resume --------------------------------------------------------------

def test_resume_after_a_kill_logs_every_step_once(tmp_path, words_file):
    out = tmp_path / "run"
    train(TrainConfig(data=str(words_file), steps=200, eval_every=100, log_every=50, n_hidden=16, device="cpu",
                      out=str(out), num_samples=0), progress=False)
    # What a run killed after its checkpoint at step 200 leaves: records past it, the last one torn.
    with open(out / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": 250, "loss": 1.0}) + "\n" + '{"step": 300, "lo')
    resumed = run_cli("charmlp_fast.train", "--resume", str(out / "model.safetensors"), "--steps", "300",
                      "--eval-every", "100", "--log-every", "50", "--num-samples", "0")
    assert resumed.returncode == 0, resumed.stderr
    assert [r["step"] for r in jsonl(out / "metrics.jsonl")] == [50, 100, 150, 200, 250, 300]
    assert (out / "loss.png").stat().st_size > 10_000  # drawn from the whole history


# ---- threads -------------------------------------------------------------------------------------------------

def test_threads_auto_and_explicit(tmp_path, words_file):
    assert threads_for("auto", ONE_THREAD_WORK - 1) == 1
    assert threads_for("auto", ONE_THREAD_WORK) == torch.get_num_threads()
    assert threads_for(3, 1) == 3
    out = tmp_path / "run"
    auto = run_cli("charmlp_fast.train", "--data", str(words_file), "--steps", "100", "--out", str(out), *TINY)
    assert auto.returncode == 0 and ", 1 thread, " in auto.stdout, auto.stderr
    assert json.loads((out / "metrics.json").read_text())["threads"] == 1
    resumed = run_cli("charmlp_fast.train", "--resume", str(out / "model.safetensors"), "--steps", "150",
                      "--threads", "2", "--no-plots")
    assert resumed.returncode == 0 and ", 2 threads, " in resumed.stdout, resumed.stderr  # a resumable override
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["threads"] == 2 and metrics["config"]["threads"] == 2
    sweep = run_cli("charmlp_fast.lr_find", "--data", str(words_file), "--steps", "50", "--n-hidden", "16",
                    "--device", "cpu", "--threads", "1", "--out", str(tmp_path / "lr"))
    assert sweep.returncode == 0 and "1 thread" in sweep.stdout, sweep.stderr
    assert json.loads((tmp_path / "lr" / "lr_find.json").read_text())["threads"] == 1
