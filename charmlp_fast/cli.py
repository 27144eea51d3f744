"""Shared command-line plumbing: an argparse parser whose errors are one line, and a main() wrapper that
turns expected failures (bad data, bad checkpoint, bad sizes) into one line on stderr and exit status 2."""
from __future__ import annotations

import argparse
import sys
from typing import Callable, NoReturn


class CLIError(Exception):
    """An error the user can fix; printed as one line, never as a traceback."""


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # argparse prints usage + message; we print one line
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def run_main(prog: str, main: Callable[[list[str] | None], int | None], argv: list[str] | None = None) -> NoReturn:
    from charmlp_fast.checkpoint import CheckpointError
    from charmlp_fast.data import DataError

    try:
        code = main(argv)
    except (CLIError, DataError, CheckpointError) as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        sys.exit(2)
    sys.exit(code or 0)


def _int_at_least(low: int, what: str):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a {what} integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"expected a {what} integer, got {value}")
        return value

    return parse


positive_int = _int_at_least(1, "positive")
non_negative_int = _int_at_least(0, "non-negative")


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive finite number, got {text}")
    return value


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
