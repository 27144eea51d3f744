"""The emulated CUDA device of the tests: charmlp's CUDA kernels (csrc/**/*.cu) built for the CPU on the emulator
(charmlp_fast._C_emu, csrc/emulation/), reached through charmlp's own ops.

Inside `emulated_cuda()`, every call of a `charmlp::` op that reaches a kernel runs the emulated CUDA kernel on the
CPU tensors instead of the CPU kernel: a TorchDispatchMode sits below autograd, so the public ops' C++ autograd,
their argument checks and the Python API are the ones a GPU run goes through, and only the kernel is swapped (to
`charmlp_emu::`, which has charmlp's schemas). The tests parametrised over devices run a third time on the device
EMU, a str equal to "cpu" (tensors live in CPU memory) that the conftest recognises.

What this proves and what it cannot: csrc/emulation/cuda_emu.h, "What only a real GPU shows".
"""
from __future__ import annotations

import contextlib
import importlib
import os

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from charmlp_fast.ops import has_kernel  # loads charmlp's library and fake kernels first

# The module to load: charmlp_fast._C_emu, or an instrumented build of it (CI's sanitizer job sets this).
MODULE = os.environ.get("CHARMLP_EMU_MODULE", "charmlp_fast._C_emu")


def _load() -> str | None:
    """None when the emulated kernels are loaded, else why not."""
    try:
        importlib.import_module(MODULE)
    except ImportError as e:
        return f"{MODULE} is not built (make emulator): {e}"
    return None


UNAVAILABLE_REASON = _load()


class EmulatedDevice(str):
    """The device id of the emulated runs: "cpu" to torch, "emu" in test ids and messages."""

    def __repr__(self) -> str:
        return "EMU"


EMU = EmulatedDevice("cpu")


def emulated_op(func: torch._ops.OpOverload) -> torch._ops.OpOverload:
    """charmlp::name.overload -> charmlp_emu::name.overload."""
    name = func._schema.name.split("::", 1)[1]
    return getattr(getattr(torch.ops.charmlp_emu, name), func._overloadname)


_COMPOSITE = torch._C.DispatchKeySet(torch._C.DispatchKey.CompositeExplicitAutograd)


class _RouteToEmulator(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace != "charmlp":
            return func(*args, **kwargs)
        emulated = emulated_op(func)
        if has_kernel(emulated.name(), "cpu"):
            return emulated(*args, **kwargs)
        # A public op below autograd (inference_mode, no_grad): its composite kernel calls the internal ops, which
        # must come back here, so it runs with this mode pushed again.
        with self:
            return func.redispatch(_COMPOSITE, *args, **kwargs)


@contextlib.contextmanager
def emulated_cuda():
    """Run charmlp's kernels as the emulated CUDA kernels within the block."""
    if UNAVAILABLE_REASON is not None:
        raise RuntimeError(UNAVAILABLE_REASON)
    with _RouteToEmulator():
        yield


def _register_fakes() -> None:
    """charmlp_emu's ops get charmlp's fake kernels (charmlp_fast/ops.py), so that opcheck can run on them."""
    from torch._library.simple_registry import singleton

    for name in torch._C._dispatch_get_all_op_names():
        if not name.startswith("charmlp::"):
            continue
        holder = singleton.find(name).fake_impl
        if holder.kernel is not None:
            torch.library.register_fake("charmlp_emu::" + name.split("::", 1)[1])(holder.kernel.func)


if UNAVAILABLE_REASON is None:
    _register_fakes()


def emulating() -> bool:
    from torch.utils._python_dispatch import _get_current_dispatch_mode_stack

    return any(isinstance(m, _RouteToEmulator) for m in _get_current_dispatch_mode_stack())


def opcheck(op: torch._ops.OpOverload, args: tuple, **kwargs) -> None:
    """torch.library.opcheck, which under emulated_cuda() checks the emulated kernel itself: its schema (no
    undeclared mutation or aliasing) and its outputs against the fake kernel. A public op has no emulated kernel
    (its autograd and composite kernels are charmlp's, checked on the CPU), so there is nothing of the emulator's
    to check for it."""
    if not emulating():
        torch.library.opcheck(op, args, **kwargs)
        return
    emulated = emulated_op(op)
    if not has_kernel(emulated.name(), "cpu"):
        return
    from torch.utils._python_dispatch import _disable_current_modes

    with _disable_current_modes():
        torch.library.opcheck(emulated, args, test_utils=("test_schema", "test_faketensor"), **kwargs)


@contextlib.contextmanager
def cpu_kernels():
    """Within emulated_cuda(), charmlp's own CPU kernels for the block: the CPU side of a CPU-versus-CUDA test."""
    from torch.utils._python_dispatch import _disable_current_modes

    with _disable_current_modes():
        yield
