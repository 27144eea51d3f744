"""Shared fixtures: the seed's dataset (skipped with a reason when absent) and device selection: the CPU, a GPU when
one is visible, and the emulated CUDA device EMU (tests/emulated_cuda.py) when charmlp_fast._C_emu is built."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from emulated_cuda import EMU, UNAVAILABLE_REASON, EmulatedDevice, emulated_cuda

NAMES_TXT = Path(os.environ.get("CHARMLP_NAMES_TXT", Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "names.txt"))

CUDA_AVAILABLE = torch.cuda.is_available()
requires_cuda = pytest.mark.skipif(not CUDA_AVAILABLE, reason="no CUDA device visible")

requires_emu = pytest.mark.skipif(UNAVAILABLE_REASON is not None, reason=str(UNAVAILABLE_REASON))

# Parametrise a test over devices: CPU always, CUDA when a GPU is visible, the CUDA kernels on the emulator when
# built (each skipped with a reason otherwise).
DEVICES = ["cpu", pytest.param("cuda", marks=requires_cuda), pytest.param(EMU, id="emu", marks=requires_emu)]
# The devices that run the CUDA kernels.
CUDA_KERNEL_DEVICES = [pytest.param("cuda", marks=requires_cuda), pytest.param(EMU, id="emu", marks=requires_emu)]


def runs_cuda_kernels(device) -> bool:
    return device == "cuda" or isinstance(device, EmulatedDevice)


def skip_if_emulated(device, why: str) -> None:
    if isinstance(device, EmulatedDevice):
        pytest.skip(f"not on the emulated device: {why}")


NO_COMPILE = "torch.compile does not trace under the dispatch mode that routes to the emulator (opcheck checks the fakes)"


@pytest.fixture(autouse=True)
def _route_emulated_device(request):
    """A test parametrised with device=EMU runs inside emulated_cuda()."""
    callspec = getattr(request.node, "callspec", None)
    if callspec is not None and isinstance(callspec.params.get("device"), EmulatedDevice):
        with emulated_cuda():
            yield
    else:
        yield


@pytest.fixture
def names_txt() -> Path:
    if not NAMES_TXT.is_file():
        pytest.skip(f"the seed's dataset is not at {NAMES_TXT} (set CHARMLP_NAMES_TXT)")
    return NAMES_TXT
