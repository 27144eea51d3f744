"""Shared fixtures: the seed's dataset (skipped with a reason when absent) and device selection."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

NAMES_TXT = Path(os.environ.get("CHARMLP_NAMES_TXT", Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "names.txt"))

CUDA_AVAILABLE = torch.cuda.is_available()
requires_cuda = pytest.mark.skipif(not CUDA_AVAILABLE, reason="no CUDA device visible")

# Parametrise a test over devices: CPU always, CUDA when a GPU is visible (skipped with a reason otherwise).
DEVICES = ["cpu", pytest.param("cuda", marks=requires_cuda)]


@pytest.fixture
def names_txt() -> Path:
    if not NAMES_TXT.is_file():
        pytest.skip(f"the seed's dataset is not at {NAMES_TXT} (set CHARMLP_NAMES_TXT)")
    return NAMES_TXT
