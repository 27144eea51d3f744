"""charmlp::linear_cross_entropy against F.cross_entropy(h @ W2 + b2) in float64: loss and every gradient, both
backward routes (gradients precomputed by the forward for mean/sum, logits recomputed for none), extremes, errors,
opcheck, torch.compile, and (CUDA) peak memory far below the (B, V) logits.

Tolerances: float64 <= 1e-10; float32 <= 1e-5 relative, or no worse than twice plain PyTorch's own
float32 error against the float64 truth. Errors are norm-wise: max |a - e| / max |e|.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import charmlp_fast.ops as ops
from conftest import DEVICES, requires_cuda, skip_if_emulated, NO_COMPILE
from emulated_cuda import opcheck
from utils import check_against_truth, extreme_logits, rel_error

pytestmark = pytest.mark.skipif(not ops.HAS_EXTENSION, reason="charmlp_fast._C is not built")

REDUCTIONS = ["mean", "sum", "none"]
FLOAT_DTYPES = [torch.float32, torch.float64]
# (B, H, V): odd sizes; the seed (32, 200, 27); V on both sides of the CUDA small kernel's limits (V <= 128,
# B <= 4096); several chunks of rows on CPU (V = 4099: 511 rows per chunk; V = 50,000: 256) and on CUDA
# (V = 50,000: 256 rows per chunk); (8200, 128, 27): V <= H / 4 and B * H >= 2^20, where autograd keeps the
# small (B, V) logits instead of precomputing the gradients.
SHAPES = [(1, 1, 2), (2, 3, 5), (7, 16, 27), (32, 200, 27), (33, 17, 129), (64, 65, 1000), (5, 512, 300),
          (300, 31, 4099), (1100, 9, 4099), (600, 8, 50000), (4096, 64, 40), (8200, 128, 27)]


def _seed(*parts) -> torch.Generator:
    seed = 0
    for p in parts:
        seed = (seed * 1000003 + (p if isinstance(p, int) else sum(map(ord, str(p))))) % 2**31
    return torch.Generator().manual_seed(seed)


def _inputs(B, H, V, g, dtype=torch.float64, ignore_frac=0.1):
    h = torch.randn(B, H, generator=g, dtype=torch.float64)
    W2 = torch.randn(H, V, generator=g, dtype=torch.float64) * (3 / max(H, 1) ** 0.5)
    b2 = torch.randn(V, generator=g, dtype=torch.float64)
    t = torch.randint(0, V, (B,), generator=g)
    ignored = torch.rand(B, generator=g) < ignore_frac
    ignored[:1] = False  # at least one counted row: all-ignored batches have their own test
    t[ignored] = -100
    return h.to(dtype), W2.to(dtype), b2.to(dtype), t


def _grads(fn, h, W2, b2, targets, reduction, ignore_index, grad_out):
    params = [p.detach().clone().requires_grad_(True) for p in (h, W2, b2)]
    loss = fn(*params, targets, reduction, ignore_index)
    grads = torch.autograd.grad(loss, params, grad_out.to(device=loss.device, dtype=loss.dtype))
    return (loss.detach(), *grads)


def _ours(h, W2, b2, targets, reduction="mean", ignore_index=-100, grad_out=None):
    return _grads(ops.linear_cross_entropy, h, W2, b2, targets, reduction, ignore_index, grad_out)


def _eager(h, W2, b2, targets, reduction="mean", ignore_index=-100, grad_out=None):
    def fn(h, W2, b2, t, reduction, ignore_index):
        return F.cross_entropy(h @ W2 + b2, t.long(), reduction=reduction, ignore_index=ignore_index)

    return _grads(fn, h, W2, b2, targets, reduction, ignore_index, grad_out)


_check = check_against_truth


def _compare_all(h, W2, b2, targets, reduction, ignore_index=-100, grad_out=None, g=None):
    """ours (on the inputs' device and dtype) vs the float64 CPU truth and PyTorch's own error in that dtype."""
    dtype, B = h.dtype, h.shape[0]
    if grad_out is None:
        grad_out = torch.randn((B,) if reduction == "none" else (), generator=g, dtype=torch.float64)
    ours = _ours(h, W2, b2, targets, reduction, ignore_index, grad_out)
    truth = _eager(*(x.double().cpu() for x in (h, W2, b2)), targets.cpu(), reduction, ignore_index, grad_out)
    same = [None] * 4
    if dtype != torch.float64:
        same = _eager(h, W2, b2, targets, reduction, ignore_index, grad_out.to(h.device))
    for name, a, e, s in zip(["loss", "grad_h", "grad_W2", "grad_b2"], ours, truth, same):
        _check(name, a, e, s, dtype)
    return ours


# ---- loss and gradients against the reference --------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("B,H,V", SHAPES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_matches_reference(device, dtype, B, H, V, reduction):
    g = _seed(B, H, V, reduction, dtype)
    h, W2, b2, t = _inputs(B, H, V, g, dtype)
    _compare_all(h.to(device), W2.to(device), b2.to(device), t.to(device), reduction, g=g)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("target_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("B,H,V", [(32, 200, 27), (300, 31, 4099)])
def test_int32_and_int64_targets(device, target_dtype, B, H, V):
    g = _seed(B, H, V, target_dtype)
    h, W2, b2, t = _inputs(B, H, V, g, torch.float32)
    _compare_all(h.to(device), W2.to(device), b2.to(device), t.to(device=device, dtype=target_dtype), "mean", g=g)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("B,H,V", [(32, 200, 27), (300, 31, 4099)])
def test_backward_op_agrees_with_precomputed_gradients(device, reduction, B, H, V):
    """For mean/sum the forward hands autograd the gradients for grad_loss = 1; the backward op (used for "none")
    recomputes the logits from lse. Both routes must give the same gradients."""
    g = _seed("routes", B, H, V, reduction)
    h, W2, b2, t = (x.to(device) for x in _inputs(B, H, V, g))
    red = ops._REDUCTIONS[reduction]
    loss, lse, gh, gW, gb = torch.ops.charmlp.linear_cross_entropy_forward(h, W2, b2, t, red, -100, True)
    loss_only, lse_only, *empty = torch.ops.charmlp.linear_cross_entropy_forward(h, W2, b2, t, red, -100, False)
    assert all(e.shape == (0,) for e in empty)
    assert torch.equal(loss, loss_only) and torch.equal(lse, lse_only)
    grad_loss = torch.tensor(1.7, dtype=h.dtype, device=device)
    rh, rW, rb = torch.ops.charmlp.linear_cross_entropy_backward(grad_loss, h, W2, b2, t, lse, red, -100)
    for name, a, e in [("grad_h", rh, gh * 1.7), ("grad_W2", rW, gW * 1.7), ("grad_b2", rb, gb * 1.7)]:
        assert rel_error(a, e) <= 1e-12, f"{name}: the two backward routes differ by {rel_error(a, e):.3g}"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("B,H,V,reduction,expected", [
    (32, 200, 27, "mean", ["charmlp::linear_cross_entropy_forward"]),
    (32, 200, 27, "none", ["charmlp::linear_cross_entropy_forward", "charmlp::linear_cross_entropy_backward"]),
    (8200, 128, 27, "sum", ["charmlp::cross_entropy_forward", "charmlp::cross_entropy_backward"]),
])
def test_autograd_routes(device, B, H, V, reduction, expected):
    """Which ops forward + backward run: gradients from the forward's pass (mean/sum), logits recomputed by the
    backward op (none), or cross_entropy on kept logits (V <= H / 4 at large B)."""
    g = _seed("routes", B, H, V, reduction)
    params = [x.to(device).requires_grad_() for x in _inputs(B, H, V, g, torch.float32)[:3]]
    t = _inputs(B, H, V, g)[3].to(device)
    with torch.profiler.profile() as prof:
        loss = ops.linear_cross_entropy(*params, t, reduction)
        torch.autograd.grad(loss.sum(), params)
    ran = {e.key for e in prof.key_averages() if e.key.startswith("charmlp::")}
    assert ran == {"charmlp::linear_cross_entropy", *expected}, ran


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("B,H,V", [(32, 200, 27), (300, 31, 4099)])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_half_inputs_cuda(dtype, B, H, V, reduction):
    g = _seed(B, H, V, reduction, dtype)
    h, W2, b2, t = _inputs(B, H, V, g, dtype)
    _compare_all(h.cuda(), W2.cuda(), b2.cuda(), t.cuda(), reduction, g=g)


@requires_cuda
@pytest.mark.parametrize("B,H,V", [(8192, 30, 27), (4100, 1, 3), (3, 700, 100)])
def test_cuda_path_boundaries(B, H, V):
    """Sizes just past the small kernel's limits (B > 4096; W2 too big for shared memory) take the chunked path."""
    g = _seed("paths", B, H, V)
    h, W2, b2, t = _inputs(B, H, V, g, torch.float32)
    _compare_all(h.cuda(), W2.cuda(), b2.cuda(), t.cuda(), "mean", g=g)


# ---- extremes -----------------------------------------------------------------------------------------------

def _logits_through_identity(x: torch.Tensor):
    """h = I, W2 = x, b2 = 0: the layer reproduces the given logits exactly (each is 1 * x + 0 * ...)."""
    B = x.shape[0]
    return torch.eye(B, dtype=x.dtype), x.clone(), torch.zeros(x.shape[1], dtype=x.dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_extreme_logits(device, dtype, reduction):
    """extreme_logits (tests/utils.py) as h @ I + 0: rows at +-1e4, an all-equal row, a dominating target, V = 2."""
    g = _seed("extreme", dtype, reduction)
    x, t, x2, t2 = extreme_logits(10, 61, g)
    for logits, targets in ((x, t), (x2, t2)):
        h, W2, b2 = (p.to(device) for p in _logits_through_identity(logits.to(dtype)))
        _compare_all(h, W2, b2, targets.to(device), reduction, g=g)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_all_rows_ignored(device, reduction):
    g = _seed("ignored", reduction)
    h, W2, b2, _ = (x.to(device) for x in _inputs(5, 4, 7, g, torch.float32))
    t = torch.full((5,), -100, device=device)
    loss, gh, gW, gb = _ours(h, W2, b2, t, reduction, grad_out=torch.ones((5,) if reduction == "none" else ()))
    expected = F.cross_entropy(h @ W2 + b2, t, reduction=reduction)
    torch.testing.assert_close(loss, expected, equal_nan=True)
    for grad in (gh, gW, gb):
        assert torch.equal(grad, torch.zeros_like(grad))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_empty_batch(device, reduction):
    g = _seed("empty", reduction)
    _, W2, b2, _ = (x.to(device) for x in _inputs(1, 4, 7, g, torch.float32))
    h = torch.zeros(0, 4, device=device)
    t = torch.zeros(0, dtype=torch.long, device=device)
    loss, gh, gW, gb = _ours(h, W2, b2, t, reduction, grad_out=torch.ones((0,) if reduction == "none" else ()))
    expected = F.cross_entropy(h @ W2 + b2, t, reduction=reduction)
    assert loss.shape == expected.shape
    torch.testing.assert_close(loss, expected, equal_nan=True)
    assert gh.shape == (0, 4)
    assert torch.equal(gW, torch.zeros_like(W2)) and torch.equal(gb, torch.zeros_like(b2))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_non_contiguous_inputs(device, reduction):
    g = _seed("strided", reduction)
    B, H, V = 40, 12, 33
    h, W2, b2, t = _inputs(B, H, V, g)
    h = h.t().contiguous().t()  # (B, H) column-major
    W2 = W2.t().contiguous().t()
    b2 = torch.stack([b2, b2], dim=1)[:, 0]  # stride 2
    t = torch.stack([t, t], dim=1)[:, 0]
    assert not (h.is_contiguous() or W2.is_contiguous() or b2.is_contiguous() or t.is_contiguous())
    grad_out = torch.randn(2 * B, generator=g, dtype=torch.float64)[::2] if reduction == "none" else None
    _compare_all(h.to(device), W2.to(device), b2.to(device), t.to(device), reduction, grad_out=grad_out, g=g)


@pytest.mark.parametrize("device", DEVICES)
def test_without_autograd(device):
    g = _seed("nograd")
    h, W2, b2, t = (x.to(device) for x in _inputs(9, 5, 11, g))
    expected = F.cross_entropy(h @ W2 + b2, t)
    with torch.inference_mode():
        torch.testing.assert_close(ops.linear_cross_entropy(h, W2, b2, t), expected, rtol=1e-12, atol=0)
    with torch.no_grad():
        out = ops.linear_cross_entropy(h.clone().requires_grad_(), W2, b2, t)
        assert not out.requires_grad
        torch.testing.assert_close(out, expected, rtol=1e-12, atol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_gradient_for_some_inputs_only(device):
    """Only W2 requires grad (h, b2 frozen): autograd returns its gradient alone, matching the reference."""
    g = _seed("partial")
    h, W2, b2, t = (x.to(device) for x in _inputs(20, 6, 9, g))
    W2o, W2e = W2.clone().requires_grad_(), W2.clone().requires_grad_()
    (go,) = torch.autograd.grad(ops.linear_cross_entropy(h, W2o, b2, t, "sum"), W2o)
    (ge,) = torch.autograd.grad(F.cross_entropy(h @ W2e + b2, t, reduction="sum"), W2e)
    assert rel_error(go, ge) <= 1e-10


# ---- registration: gradcheck, opcheck, torch.compile --------------------------------------------------------

@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_gradcheck(reduction):
    g = _seed("gradcheck", reduction)
    h, W2, b2, t = _inputs(6, 4, 5, g)
    t[2] = -100
    params = tuple(p.requires_grad_() for p in (h, W2, b2))
    assert torch.autograd.gradcheck(lambda h, W2, b2: ops.linear_cross_entropy(h, W2, b2, t, reduction), params)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("reduction", [0, 1, 2])
def test_opcheck(device, reduction):
    g = _seed("opcheck", reduction)
    h, W2, b2, t = (x.to(device) for x in _inputs(8, 6, 13, g, torch.float32))
    t[3] = -100
    grads = tuple(p.clone().requires_grad_() for p in (h, W2, b2))
    opcheck(torch.ops.charmlp.linear_cross_entropy.default, (*grads, t, reduction, -100))
    for compute_grad in (False, True):
        opcheck(torch.ops.charmlp.linear_cross_entropy_forward.default,
                              (h, W2, b2, t, reduction, -100, compute_grad))
    _, lse, *_ = torch.ops.charmlp.linear_cross_entropy_forward(h, W2, b2, t, reduction, -100, False)
    grad_loss = torch.randn((8,) if reduction == 0 else (), generator=g).to(device)
    opcheck(torch.ops.charmlp.linear_cross_entropy_backward.default,
                          (grad_loss, h, W2, b2, t, lse, reduction, -100))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("B,H,V", [(16, 10, 27), (8200, 128, 27)])
def test_compile_fullgraph_matches_eager(device, reduction, B, H, V):
    """Every autograd route (gradients precomputed, logits recomputed, logits kept) traces and matches eager."""
    skip_if_emulated(device, NO_COMPILE)
    g = _seed("compile", reduction, B)
    h, W2, b2, t = (x.to(device) for x in _inputs(B, H, V, g, torch.float32))

    def f(h, W2, b2, t):
        return ops.linear_cross_entropy(torch.tanh(h), W2, b2, t, reduction).sum()

    compiled = torch.compile(f, fullgraph=True)
    pe = [p.clone().requires_grad_() for p in (h, W2, b2)]
    pc = [p.clone().requires_grad_() for p in (h, W2, b2)]
    loss_e, loss_c = f(*pe, t), compiled(*pc, t)
    grads_e = torch.autograd.grad(loss_e, pe)
    grads_c = torch.autograd.grad(loss_c, pc)
    # float32 throughout; Inductor may order the sums of the tanh and of the kept-logits route differently
    assert rel_error(loss_c, loss_e) <= 1e-5
    for a, e in zip(grads_c, grads_e):
        assert rel_error(a, e) <= 1e-5


# ---- memory (CUDA) ------------------------------------------------------------------------------------------

@requires_cuda
def test_peak_memory_far_below_the_logits():
    """Large vocabulary (B = 4096, H = 256, V = 131072): forward + backward must never hold the (B, V) logits
    (2.1 GB in float32): the extra peak is the chunk, the gradients and O(B)."""
    B, H, V = 4096, 256, 131072
    g = torch.Generator(device="cuda").manual_seed(0)
    h = torch.randn(B, H, device="cuda", generator=g, requires_grad=True)
    W2 = (torch.randn(H, V, device="cuda", generator=g) / 16).requires_grad_()
    b2 = torch.randn(V, device="cuda", generator=g, requires_grad=True)
    t = torch.randint(0, V, (B,), device="cuda", generator=g)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    loss = ops.linear_cross_entropy(h, W2, b2, t)
    grads = torch.autograd.grad(loss, (h, W2, b2))
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    logits_bytes = B * V * 4
    grads_bytes = sum(x.numel() * 4 for x in grads)
    assert extra < 0.25 * logits_bytes, f"peak {extra / 2**20:.0f} MiB vs logits {logits_bytes / 2**20:.0f} MiB"
    assert extra < 3 * grads_bytes + 64 * 2**20


# ---- errors name the argument ------------------------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
def test_errors(device):
    g = _seed("errors")
    h, W2, b2, t = (x.to(device) for x in _inputs(4, 3, 5, g, torch.float32))
    lce = torch.ops.charmlp.linear_cross_entropy
    cases = [
        ((h.int(), W2, b2, t), "h must be float32 or float64"),
        ((h, W2.double(), b2, t), "W2 must have the dtype of h"),
        ((h, W2, b2.double(), t), "b2 must have the dtype of h"),
        ((h[0], W2, b2, t), "h must be a 2-D tensor"),
        ((h, W2[0], b2, t), "W2 must be a 2-D tensor"),
        ((h, W2, b2[None], t), "b2 must be a 1-D tensor"),
        ((h, W2, b2, t[None]), "targets must be a 1-D tensor"),
        ((h, W2, b2, t.float()), "targets must be int64 or int32"),
        ((h, W2[:2], b2, t), r"W2.size\(0\) must equal h.size\(1\) \(H\) = 3"),
        ((h, W2, b2[:4], t), r"b2.size\(0\) must equal W2.size\(1\) \(V\) = 5"),
        ((h, W2, b2, t[:3]), r"targets.size\(0\) must equal h.size\(0\) \(B\) = 4"),
        ((h, W2[:, :0], b2[:0], t), r"W2.size\(1\) \(V\) must be positive"),
    ]
    for args, message in cases:
        with pytest.raises(RuntimeError, match=message):
            lce(*args)
    with pytest.raises(RuntimeError, match="reduction must be 0 \\(none\\), 1 \\(mean\\) or 2 \\(sum\\)"):
        lce(h, W2, b2, t, -1)
    with pytest.raises(ValueError, match="reduction must be one of"):
        ops.linear_cross_entropy(h, W2, b2, t, "avg")
    _, lse, *_ = torch.ops.charmlp.linear_cross_entropy_forward(h, W2, b2, t, 1, -100, False)
    bwd = torch.ops.charmlp.linear_cross_entropy_backward
    with pytest.raises(RuntimeError, match="lse must be float64"):
        bwd(torch.ones((), device=device), h, W2, b2, t, lse.float(), 1, -100)
    with pytest.raises(RuntimeError, match="grad_loss must be a 0-D tensor"):
        bwd(torch.ones(4, device=device), h, W2, b2, t, lse, 1, -100)
    with pytest.raises(RuntimeError, match="grad_loss must have the dtype of h"):
        bwd(torch.ones((), device=device, dtype=torch.float64), h, W2, b2, t, lse, 1, -100)


def test_errors_cpu_only():
    g = _seed("errors_cpu")
    h, W2, b2, _ = _inputs(4, 3, 5, g, torch.float32)
    with pytest.raises(RuntimeError, match="h must be float32 or float64, got Half"):
        torch.ops.charmlp.linear_cross_entropy(h.half(), W2.half(), b2.half(), torch.zeros(4, dtype=torch.long))
    with pytest.raises(RuntimeError, match=r"targets\[3\] = 5 is out of range"):
        ops.linear_cross_entropy(h, W2, b2, torch.tensor([0, 1, 2, 5]))
    with pytest.raises(RuntimeError, match=r"targets\[0\] = -3 is out of range"):
        ops.linear_cross_entropy(h, W2, b2, torch.tensor([-3, 1, 2, 4]))


@requires_cuda
def test_errors_device_mismatch():
    g = _seed("errors_device")
    h, W2, b2, t = _inputs(4, 3, 5, g, torch.float32)
    lce = torch.ops.charmlp.linear_cross_entropy
    with pytest.raises(RuntimeError, match="W2 must be on the device of h"):
        lce(h.cuda(), W2, b2.cuda(), t.cuda())
    with pytest.raises(RuntimeError, match="b2 must be on the device of h"):
        lce(h.cuda(), W2.cuda(), b2, t.cuda())
    with pytest.raises(RuntimeError, match="targets must be on the device of h"):
        lce(h.cuda(), W2.cuda(), b2.cuda(), t)
