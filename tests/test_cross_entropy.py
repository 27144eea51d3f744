"""charmlp::cross_entropy against F.cross_entropy in float64: forward, gradient, extremes, errors, opcheck, compile.

Tolerances: float64 <= 1e-10; float32 <= 1e-5 relative, or, where float32 cannot do better, no worse
than twice plain PyTorch's own float32 error against the float64 truth. Errors are norm-wise: max |a - e| / max |e|.
"""
from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import charmlp_fast.ops as ops
from conftest import DEVICES, requires_cuda, skip_if_emulated, NO_COMPILE
from emulated_cuda import opcheck
from utils import assert_close, check_against_truth, extreme_logits, rel_error

pytestmark = pytest.mark.skipif(not ops.HAS_EXTENSION, reason="charmlp_fast._C is not built")

REDUCTIONS = ["mean", "sum", "none"]
FLOAT_DTYPES = [torch.float32, torch.float64]
# (B, V): odd sizes on both sides of the row kernels' thread-group switches (V <= 64, <= 2048, larger) and of the
# 16-byte vector width; B = 4096 for many rows, V = 50,000 for long ones.
SHAPES = [(1, 2), (2, 3), (7, 5), (32, 27), (33, 64), (17, 65), (64, 1000), (5, 2049), (3, 4099), (300, 131),
          (4096, 27), (2, 50000)]


def _seed(*parts) -> torch.Generator:
    seed = 0
    for p in parts:
        seed = (seed * 1000003 + (p if isinstance(p, int) else sum(map(ord, str(p))))) % 2**31
    return torch.Generator().manual_seed(seed)


def _targets(B: int, V: int, g: torch.Generator, ignore_frac: float = 0.1, ignore_index: int = -100) -> torch.Tensor:
    t = torch.randint(0, V, (B,), generator=g)
    ignored = torch.rand(B, generator=g) < ignore_frac
    ignored[0] = False  # at least one counted row: all-ignored batches have their own test
    t[ignored] = ignore_index
    return t


def _reference(logits: torch.Tensor, targets: torch.Tensor, reduction: str, ignore_index: int,
               grad_out: torch.Tensor):
    """Plain PyTorch on the given dtype and device: (loss, grad_logits)."""
    x = logits.detach().clone().requires_grad_(True)
    loss = F.cross_entropy(x, targets.long(), reduction=reduction, ignore_index=ignore_index)
    (grad,) = torch.autograd.grad(loss, x, grad_out.to(loss.dtype))
    return loss.detach(), grad


def _ours(logits: torch.Tensor, targets: torch.Tensor, reduction: str, ignore_index: int, grad_out: torch.Tensor):
    x = logits.detach().clone().requires_grad_(True)
    loss = ops.cross_entropy(x, targets, reduction, ignore_index)
    (grad,) = torch.autograd.grad(loss, x, grad_out.to(device=loss.device, dtype=loss.dtype))
    return loss.detach(), grad


_check = check_against_truth


def _compare_all(logits, targets, reduction, ignore_index=-100, grad_out=None, g=None):
    """ours vs float64 truth (and vs PyTorch's own error in the input dtype) for the loss and the gradient."""
    dtype = logits.dtype
    B = logits.shape[0]
    if grad_out is None:
        grad_out = torch.randn((B,) if reduction == "none" else (), generator=g, dtype=torch.float64)
    loss, grad = _ours(logits, targets, reduction, ignore_index, grad_out)
    loss64, grad64 = _reference(logits.double().cpu(), targets.cpu(), reduction, ignore_index, grad_out)
    torch_loss = torch_grad = None
    if dtype != torch.float64:
        torch_loss, torch_grad = _reference(logits, targets, reduction, ignore_index, grad_out.to(logits.device))
    _check("loss", loss, loss64, torch_loss, dtype)
    _check("grad_logits", grad, grad64, torch_grad, dtype)
    return loss, grad


# ---- forward and gradient against the reference -------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("B,V", SHAPES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_matches_reference(device, dtype, B, V, reduction):
    g = _seed(B, V, reduction, dtype)
    logits = (torch.randn(B, V, generator=g, dtype=torch.float64) * 4).to(device=device, dtype=dtype)
    targets = _targets(B, V, g).to(device)
    _compare_all(logits, targets, reduction, g=g)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("target_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("B,V", [(32, 27), (9, 3000)])
def test_int32_and_int64_targets(device, target_dtype, B, V):
    g = _seed(B, V, target_dtype)
    logits = torch.randn(B, V, generator=g).to(device)
    targets = _targets(B, V, g).to(device=device, dtype=target_dtype)
    _compare_all(logits, targets, "mean", g=g)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_ignore_index_inside_the_vocabulary(device, reduction):
    """ignore_index may be a real class id: those rows are skipped, not range-checked."""
    g = _seed("ignore3", reduction)
    logits = torch.randn(40, 7, generator=g, dtype=torch.float64).to(device)
    targets = torch.randint(0, 7, (40,), generator=g).to(device)
    assert (targets == 3).any()
    _compare_all(logits, targets, reduction, ignore_index=3, g=g)


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("B,V", [(32, 27), (64, 1000), (7, 4099)])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_half_inputs_cuda(dtype, B, V, reduction):
    """bf16/fp16 logits, float32 accumulation: the result's error is its own rounding, like PyTorch's."""
    g = _seed(B, V, reduction, dtype)
    logits = (torch.randn(B, V, generator=g) * 4).to(device="cuda", dtype=dtype)
    targets = _targets(B, V, g).cuda()
    _compare_all(logits, targets, reduction, g=g)


# ---- extremes -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_extreme_logits(device, dtype, reduction):
    """extreme_logits (tests/utils.py): rows at +-1e4, an all-equal row, a dominating target, and V = 2."""
    g = _seed("extreme", dtype, reduction)
    x, targets, x2, targets2 = extreme_logits(12, 300, g)
    _compare_all(x.to(dtype).to(device), targets.to(device), reduction, g=g)
    _compare_all(x2.to(dtype).to(device), targets2.to(device), reduction, g=g)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_dominating_target_is_accurate_per_row(device, dtype):
    """target = max + 20: loss ~ V e^-20 per row. lse - x_t cancels (PyTorch's float32 loss is 0 there, its float64
    one keeps ~8 digits); ours keeps every row's loss and target gradient to the dtype's tolerance, element by
    element, against the cancellation-free truth loss = log1p(r), dloss/dx_t = -r / (1 + r),
    r = sum_{j != t} exp(x_j - x_t)."""
    g = _seed("dominate", dtype)
    B, V = 16, 50
    x = torch.randn(B, V, generator=g, dtype=torch.float64)
    t = torch.randint(0, V, (B,), generator=g)
    rows = torch.arange(B)
    x[rows, t] = x.max(dim=1).values + 20
    x = x.to(dtype)
    grad_out = torch.rand(B, generator=g, dtype=torch.float64) + 0.5
    loss, grad = _ours(x.to(device), t.to(device), "none", -100, grad_out)
    x64 = x.double()
    others = torch.ones_like(x64, dtype=torch.bool)
    others[rows, t] = False
    r = torch.where(others, (x64 - x64[rows, t][:, None]).exp(), 0.0).sum(dim=1)
    rtol = 1e-5 if dtype == torch.float32 else 1e-10
    assert_close(loss, torch.log1p(r), rtol=rtol, name="per-row loss")
    assert_close(grad[rows, t.to(device)], -grad_out * r / (1 + r), rtol=rtol, name="gradient of the target logits")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_all_rows_ignored(device, reduction):
    """Like torch: mean is nan, sum is 0, none is zeros; the gradient is zero."""
    x = torch.randn(5, 7, device=device, requires_grad=True)
    t = torch.full((5,), -100, device=device)
    loss = ops.cross_entropy(x, t, reduction)
    expected = F.cross_entropy(x.detach(), t, reduction=reduction)
    torch.testing.assert_close(loss.detach(), expected, equal_nan=True)
    (grad,) = torch.autograd.grad(loss.sum(), x)
    assert torch.equal(grad, torch.zeros_like(x))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_empty_batch(device, reduction):
    x = torch.randn(0, 7, device=device, requires_grad=True)
    t = torch.zeros(0, dtype=torch.long, device=device)
    loss = ops.cross_entropy(x, t, reduction)
    expected = F.cross_entropy(x.detach(), t, reduction=reduction)
    assert loss.shape == expected.shape
    torch.testing.assert_close(loss.detach(), expected, equal_nan=True)
    (grad,) = torch.autograd.grad(loss.sum(), x)
    assert grad.shape == (0, 7)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_non_contiguous_inputs(device, reduction):
    g = _seed("strided", reduction)
    B, V = 24, 37
    logits = torch.randn(V, B, generator=g, dtype=torch.float64).to(device).t()  # (B, V), column-major
    targets = torch.randint(0, V, (2 * B,), generator=g).to(device)[::2]
    grad_out = torch.randn(2 * B, generator=g, dtype=torch.float64)[::2] if reduction == "none" else None
    assert not logits.is_contiguous() and not targets.is_contiguous()
    _compare_all(logits, targets, reduction, grad_out=grad_out, g=g)


@pytest.mark.parametrize("device", DEVICES)
def test_without_autograd(device):
    """The public op has a kernel below autograd: inference_mode and no_grad give the forward's loss."""
    g = _seed("nograd")
    x = torch.randn(9, 11, generator=g, dtype=torch.float64).to(device)
    t = torch.randint(0, 11, (9,), generator=g).to(device)
    expected = F.cross_entropy(x, t)
    with torch.inference_mode():
        assert_close(ops.cross_entropy(x, t), expected, rtol=1e-12, name="inference_mode")
    with torch.no_grad():
        out = ops.cross_entropy(x.clone().requires_grad_(), t)
        assert not out.requires_grad
        assert_close(out, expected, rtol=1e-12, name="no_grad")


_VARIANT_SCRIPT = r"""
import torch, torch.nn.functional as F
import charmlp_fast.ops as ops
g = torch.Generator().manual_seed(0)
worst = {}
for dtype, tol in [(torch.float32, 1e-5), (torch.float64, 1e-10)]:
    for B, H, V in [(5, 3, 2), (33, 20, 27), (9, 16, 200), (4, 8, 4099)]:
        for reduction in ["mean", "sum", "none"]:
            h = torch.randn(B, H, generator=g, dtype=torch.float64)
            W2 = torch.randn(H, V, generator=g, dtype=torch.float64)
            b2 = torch.randn(V, generator=g, dtype=torch.float64)
            t = torch.randint(0, V, (B,), generator=g)
            t[1] = -100
            go = torch.randn((B,) if reduction == "none" else (), generator=g, dtype=torch.float64)
            for op in ("ce", "lce"):
                ours_in = [x.to(dtype).requires_grad_() for x in (h, W2, b2)]
                ref_in = [x.to(dtype).double().requires_grad_() for x in (h, W2, b2)]
                if op == "ce":
                    ours = ops.cross_entropy(ours_in[0] @ ours_in[1] + ours_in[2], t, reduction)
                    ref = F.cross_entropy(ref_in[0] @ ref_in[1] + ref_in[2], t, reduction=reduction)
                else:
                    ours = ops.linear_cross_entropy(*ours_in, t, reduction)
                    ref = F.cross_entropy(ref_in[0] @ ref_in[1] + ref_in[2], t, reduction=reduction)
                outs = [ours, *torch.autograd.grad(ours, ours_in, go.to(dtype))]
                refs = [ref, *torch.autograd.grad(ref, ref_in, go)]
                for a, e in zip(outs, refs):
                    if e.abs().max() == 0:
                        continue
                    err = ((a.double() - e).abs().max() / e.abs().max()).item()
                    assert err <= tol, (op, dtype, B, H, V, reduction, err)
print("ok")
"""


@pytest.mark.parametrize("isa", ["baseline", "avx2"])
def test_cpu_isa_variants(isa):
    """The CPU row kernels are compiled per ISA (16-byte vectors, AVX2 + FMA, AVX-512) and picked at run time; run
    the ones this machine would not pick, through the CHARMLP_CPU_ISA cap (csrc/cpu/isa.h), against float64 (fresh
    process: the choice is made once)."""
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "CHARMLP_CPU_ISA": isa, "PYTHONPATH": str(root)}
    done = subprocess.run([sys.executable, "-c", _VARIANT_SCRIPT], cwd=root, env=env, capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]


# ---- registration: gradcheck, opcheck, torch.compile --------------------------------------------------------

@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_gradcheck(reduction):
    g = _seed("gradcheck", reduction)
    x = torch.randn(6, 5, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.randint(0, 5, (6,), generator=g)
    t[2] = -100
    assert torch.autograd.gradcheck(lambda x: ops.cross_entropy(x, t, reduction), (x,))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("reduction", [0, 1, 2])
def test_opcheck(device, reduction):
    g = _seed("opcheck", reduction)
    x = torch.randn(8, 13, generator=g).to(device)
    t = torch.randint(0, 13, (8,), generator=g).to(device)
    t[3] = -100
    opcheck(torch.ops.charmlp.cross_entropy.default,
                          (x.clone().requires_grad_(), t, reduction, -100))
    opcheck(torch.ops.charmlp.cross_entropy_forward.default, (x, t, reduction, -100))
    _, lse = torch.ops.charmlp.cross_entropy_forward(x, t, reduction, -100)
    grad_loss = torch.randn((8,) if reduction == 0 else (), generator=g).to(device)
    opcheck(torch.ops.charmlp.cross_entropy_backward.default,
                          (grad_loss, x, t, lse, reduction, -100))


@pytest.mark.parametrize("device", DEVICES)
def test_compile_fullgraph_matches_eager(device):
    skip_if_emulated(device, NO_COMPILE)
    g = _seed("compile")
    x = torch.randn(16, 27, generator=g).to(device)
    t = torch.randint(0, 27, (16,), generator=g).to(device)

    def f(x, t):
        return ops.cross_entropy(x * 2, t, "mean")

    compiled = torch.compile(f, fullgraph=True)
    xe, xc = x.clone().requires_grad_(), x.clone().requires_grad_()
    loss_e, loss_c = f(xe, t), compiled(xc, t)
    (ge,) = torch.autograd.grad(loss_e, xe)
    (gc,) = torch.autograd.grad(loss_c, xc)
    assert_close(loss_c, loss_e, rtol=1e-6, name="compiled loss")
    assert_close(gc, ge, rtol=1e-6, atol=1e-9, name="compiled grad")


# ---- errors name the argument ------------------------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
def test_errors(device):
    x = torch.randn(4, 5, device=device)
    t = torch.randint(0, 5, (4,), device=device)
    ce = torch.ops.charmlp.cross_entropy
    with pytest.raises(RuntimeError, match="logits must be float32 or float64"):
        ce(x.to(torch.int32), t)
    with pytest.raises(RuntimeError, match="logits must be a 2-D tensor"):
        ce(x[0], t)
    with pytest.raises(RuntimeError, match="targets must be a 1-D tensor"):
        ce(x, t[None])
    with pytest.raises(RuntimeError, match="targets must be int64 or int32"):
        ce(x, t.float())
    with pytest.raises(RuntimeError, match=r"targets.size\(0\) must equal logits.size\(0\) \(B\) = 4"):
        ce(x, t[:3])
    with pytest.raises(RuntimeError, match=r"logits.size\(1\) \(V\) must be positive"):
        ce(x[:, :0], t)
    with pytest.raises(RuntimeError, match="reduction must be 0 \\(none\\), 1 \\(mean\\) or 2 \\(sum\\)"):
        ce(x, t, 3)
    with pytest.raises(ValueError, match="reduction must be one of"):
        ops.cross_entropy(x, t, "avg")
    _, lse = torch.ops.charmlp.cross_entropy_forward(x, t, 1, -100)
    bwd = torch.ops.charmlp.cross_entropy_backward
    with pytest.raises(RuntimeError, match="lse must be float64"):
        bwd(torch.ones((), device=device), x, t, lse.float(), 1, -100)
    with pytest.raises(RuntimeError, match=r"lse.size\(0\) must equal B"):
        bwd(torch.ones((), device=device), x, t, lse[:2], 1, -100)
    with pytest.raises(RuntimeError, match="grad_loss must be a 1-D tensor"):
        bwd(torch.ones((), device=device), x, t, lse, 0, -100)
    with pytest.raises(RuntimeError, match="grad_loss must have the dtype of logits"):
        bwd(torch.ones((), device=device, dtype=torch.float64), x, t, lse, 1, -100)


def test_errors_cpu_only():
    """On CPU: half logits are refused, and a target out of range is reported with its row (CUDA asserts in the
    kernel instead: no host sync)."""
    x = torch.randn(4, 5)
    with pytest.raises(RuntimeError, match="logits must be float32 or float64, got Half"):
        torch.ops.charmlp.cross_entropy(x.half(), torch.zeros(4, dtype=torch.long))
    with pytest.raises(RuntimeError, match=r"targets\[1\] = 5 is out of range"):
        ops.cross_entropy(x, torch.tensor([0, 5, 1, 2]))
    with pytest.raises(RuntimeError, match=r"targets\[2\] = -1 is out of range"):
        ops.cross_entropy(x, torch.tensor([0, 1, -1, 2]))
    with pytest.raises(RuntimeError, match=r"targets\[0\] = 7 is out of range"):
        torch.ops.charmlp.cross_entropy_backward(torch.ones(()), x, torch.tensor([7, 0, 0, 0]),
                                                 torch.zeros(4, dtype=torch.float64), 1, -100)


@requires_cuda
def test_errors_device_mismatch():
    x = torch.randn(4, 5, device="cuda")
    with pytest.raises(RuntimeError, match="targets must be on the device of logits"):
        torch.ops.charmlp.cross_entropy(x, torch.zeros(4, dtype=torch.long))


def test_mean_of_ignored_rows_is_nan_like_torch():
    """A direct check of the 0/0 convention, independent of the comparisons above."""
    loss = ops.cross_entropy(torch.randn(3, 4), torch.full((3,), -100))
    assert math.isnan(loss.item())
