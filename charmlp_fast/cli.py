"""Shared command-line plumbing: an argparse parser whose errors are one line, a main() wrapper that turns expected
failures (bad data, bad checkpoint, bad sizes, a full disk, Ctrl-C) into one line on stderr and a non-zero exit, the
checks of an output directory, and the thread count of the CPU loops."""
from __future__ import annotations

import argparse
import math
import os
import signal
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, NoReturn

EXIT_ERROR = 2  # a CLIError, DataError or CheckpointError: something the user can fix in the command or its files
EXIT_OS_ERROR = 1  # the machine refused: a full disk, an unwritable path
EXIT_INTERRUPTED = 130  # the shell's code for a Ctrl-C'd program (128 + SIGINT)

# --threads auto: one intra-op thread when a training step does fewer multiply-adds than this. Tiny parallel regions
# gain nothing from a second thread, and when another process holds the other core they wait for a descheduled
# thread at every step (25-100x slower loops on a busy 2-core machine).
ONE_THREAD_WORK = 2 ** 21


class CLIError(Exception):
    """An error the user can fix; printed as one line, never as a traceback."""


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # argparse prints usage + message; we print one line
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


class _StartupInterrupt:
    """The SIGINT handler while a program imports its modules: it notes a Ctrl-C instead of raising
    KeyboardInterrupt inside an import, where a library may turn it into an ImportError and carry on without the
    module (torch does so for numpy), so that the Ctrl-C would be lost and training would start anyway."""

    def __init__(self) -> None:
        self.pending = False

    def __call__(self, signum, frame) -> None:
        self.pending = True


def quiet_interrupts() -> None:
    """Defer a Ctrl-C that comes while the program is still importing (torch takes seconds): run_main then ends
    the program with one line and exit status 130, before any work. Call it from a program's
    `if __name__ == "__main__"` guard placed above its heavy imports."""
    signal.signal(signal.SIGINT, _StartupInterrupt())


def say(line: str) -> None:
    """One line on stderr in one write: under torchrun several processes share the stream, and print's separate
    write of the newline (stderr is unbuffered with PYTHONUNBUFFERED) could let another process's line in between."""
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


def run_main(prog: str, main: Callable[[list[str] | None], int | None], argv: list[str] | None = None) -> NoReturn:
    from charmlp_fast.checkpoint import CheckpointError
    from charmlp_fast.data import DataError

    startup = signal.getsignal(signal.SIGINT)
    if isinstance(startup, _StartupInterrupt):
        signal.signal(signal.SIGINT, signal.default_int_handler)  # Ctrl-C raises KeyboardInterrupt from here on
        if startup.pending:
            say(f"{prog}: interrupted during start-up")
            sys.exit(EXIT_INTERRUPTED)
    try:
        code = main(argv)
    except (CLIError, DataError, CheckpointError) as e:
        say(f"{prog}: error: {e}")
        sys.exit(EXIT_ERROR)
    except OSError as e:  # e.g. the disk filled up while writing an output; what was written before stays valid
        where = f"{e.filename}: " if e.filename else ""
        say(f"{prog}: error: {where}{e.strerror or e}")
        sys.exit(EXIT_OS_ERROR)
    except KeyboardInterrupt:  # during start-up, or a second Ctrl-C: the last checkpoint on disk stays intact
        say(f"{prog}: interrupted")
        sys.exit(EXIT_INTERRUPTED)
    sys.exit(code or 0)


def flag_of(parser: argparse.ArgumentParser, dest: str) -> argparse.Action | None:
    """The flag of parser that sets `dest` (e.g. n_hidden -> --n-hidden), None when it has none."""
    return next((a for a in parser._actions if a.dest == dest and a.option_strings), None)


def check_flag_value(action: argparse.Action, text: str, where: str):
    """text through the flag's type and choices, as parsing the flag would: the value, or a CLIError that starts
    with `where`."""
    try:
        value = action.type(text) if action.type else text
    except argparse.ArgumentTypeError as e:
        raise CLIError(f"{where}: {e}") from None
    if action.choices is not None and value not in action.choices:
        raise CLIError(f"{where}: expected one of {', '.join(map(str, action.choices))}, got {text!r}")
    return value


def _int_in_range(low: int, what: str, high: int | None = None):
    """An argparse type: an integer in [low, high)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a {what} integer, got {text!r}") from None
        if value < low or (high is not None and value >= high):
            raise argparse.ArgumentTypeError(f"expected a {what} integer, got {value}")
        return value

    return parse


positive_int = _int_in_range(1, "positive")
non_negative_int = _int_in_range(0, "non-negative")
# torch's generators and the int64 seeds of the persistent path take 0 <= seed < 2**63.
seed_int = _int_in_range(0, "seed (0 <= seed < 2**63)", 2 ** 63)


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive finite number, got {text}")
    return value


def non_negative_float(text: str) -> float:
    value = finite_float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a non-negative number, got {text}")
    return value


def finite_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text}")
    return value


def thread_setting(text: str) -> int | str:
    """--threads: 'auto' or a positive number of intra-op threads."""
    return text if text == "auto" else _int_in_range(1, "positive")(text)


def step_work(V: int, T: int, E: int, H: int, B: int) -> int:
    """Multiply-adds of one SGD step's forward, B*H*(T*E + V): the measure of a step's size that the thread count,
    the persistent calls' length and the sweep's shards go by."""
    return B * H * (T * E + V)


def threads_for(setting: int | str, work_per_step: int, default: int | None = None) -> int:
    """The intra-op threads to run with: a number as given; 'auto': one when a step does fewer than ONE_THREAD_WORK
    multiply-adds (work_per_step = B*H*(T*E + V)), else `default` (torch's current count when None)."""
    import torch

    if setting != "auto":
        return int(setting)
    if work_per_step < ONE_THREAD_WORK:
        return 1
    return torch.get_num_threads() if default is None else default


@contextmanager
def intra_op_threads(n: int):
    """torch's intra-op thread count set to n inside the block, put back after it."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield n
    finally:
        torch.set_num_threads(previous)


def check_out_dir(path: str | os.PathLike, flag: str = "--out") -> Path:
    """Create the output directory and prove it writable (a temporary file), before any work is done: a path that
    names a file, lies below one or cannot be created or written is a CLIError now, not an OSError after training."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise CLIError(f"{flag} {path} is an existing file, not a directory")
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as e:
        raise CLIError(f"{flag} {path}: cannot create or write the directory: {e.strerror or e}") from None
    return path


def lock_out_dir(path: Path):
    """An exclusive lock on path/.lock (fcntl.flock), held while the returned file stays open: a second trainer
    on the same directory is refused instead of interleaving its metrics with the first's."""
    import fcntl

    lock = open(path / ".lock", "w")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.close()
        raise CLIError(f"another trainer is writing to {path} (it holds {path / '.lock'}); "
                       "wait for it or choose another --out") from None
    return lock


def resolve_device(name: str):
    """'auto' -> cuda when a GPU is visible, else cpu; 'cuda' without a GPU is an error, not a silent CPU run."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise CLIError(f"--device {name}: no CUDA device is visible (torch {torch.__version__}, "
                       f"CUDA build {torch.version.cuda or 'no'}); use --device cpu")
    try:
        return torch.device(name)
    except RuntimeError:
        raise CLIError(f"--device {name!r} is not a device (use auto, cpu or cuda)") from None
