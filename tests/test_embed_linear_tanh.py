"""charmlp::embed_linear_tanh and charmlp::embed_linear_tanh_backward against plain PyTorch.

The truth is the plain-PyTorch formula h = tanh(C[idx].view(B, T*E) @ W1 + b1) evaluated in float64 with
autograd. float64 results must match it to 1e-10; float32 (and bf16/fp16 on CUDA) results to 1e-5, or,
where the dtype cannot do better, to twice plain PyTorch's own error in that dtype against the same truth.
Errors are norm-wise: max |a - e| / max |e| (tests.utils.rel_error). Every test runs on the CPU and on CUDA,
the latter skipped with a reason when no GPU is visible.
"""
from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from charmlp_fast import ops
from tests.conftest import DEVICES, requires_cuda, skip_if_emulated, NO_COMPILE
from emulated_cuda import opcheck
from tests.utils import rel_error

if not ops.HAS_EXTENSION:  # pragma: no cover
    pytest.skip("charmlp_fast._C is not built", allow_module_level=True)

elt = torch.ops.charmlp.embed_linear_tanh.default
elt_backward = torch.ops.charmlp.embed_linear_tanh_backward.default

# (B, T, E, H, V): the seed's size, sizes at each end of every supported range (B 1..4096, T 1..8,
# E 1..64, H 1..512, V 2..50,000), and odd sizes that are no multiple of a tile (CUDA 16/32/64), a vector
# (CPU 16 floats / 8 doubles), a 6-row register block or a 64-row block. B > 2048 splits the CPU backward
# into several reduction chunks.
SHAPES = [
    (32, 3, 10, 200, 27),
    (1, 1, 1, 1, 2),
    (7, 2, 5, 17, 3),
    (33, 8, 1, 15, 2),
    (129, 1, 64, 1, 5),
    (77, 5, 7, 33, 50_000),
    (100, 8, 64, 512, 300),
    (65, 4, 13, 129, 1000),
    (4096, 3, 10, 200, 27),
    (2049, 2, 3, 100, 9),
]
FLOAT_DTYPES = [torch.float32, torch.float64]


def make_inputs(B, T, E, H, V, device, dtype=torch.float32, idx_dtype=torch.int64, seed=0, scale=1.0):
    """Fresh seeded inputs at a realistic scale: pre-activations of order one (times `scale`)."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, V, (B, T), generator=g).to(device=device, dtype=idx_dtype)
    K = T * E
    C = (torch.randn(V, E, generator=g) * scale).to(device=device, dtype=dtype)
    W1 = (torch.randn(K, H, generator=g) / math.sqrt(K)).to(device=device, dtype=dtype)
    b1 = (torch.randn(H, generator=g) * 0.5).to(device=device, dtype=dtype)
    grad_h = torch.randn(B, H, generator=g).to(device=device, dtype=dtype)
    return idx, C, W1, b1, grad_h


def reference(idx, C, W1, b1):
    """The plain PyTorch formula (the seed's first layer)."""
    B = idx.shape[0]
    return torch.tanh(C[idx.long()].reshape(B, W1.shape[0]) @ W1 + b1)


def forward_and_grads(fn, idx, C, W1, b1, grad_h):
    """h and (grad_C, grad_W1, grad_b1) of fn through autograd, for the incoming gradient grad_h."""
    params = [p.detach().requires_grad_() for p in (C, W1, b1)]
    h = fn(idx, *params)
    grads = torch.autograd.grad(h, params, grad_h.to(h.dtype))
    return (h.detach(), *grads)


NAMES = ("h", "grad_C", "grad_W1", "grad_b1")


def check_against_truth(ours, idx, C, W1, b1, grad_h):
    """Compare (h, grads) of the op with the float64 truth, at the tolerance for the op's dtype."""
    dtype = C.dtype
    truth = forward_and_grads(reference, idx, C.double(), W1.double(), b1.double(), grad_h.double())
    if dtype == torch.float64:
        for name, a, e in zip(NAMES, ours, truth):
            assert a.dtype == dtype, name
            err = rel_error(a, e)
            assert err <= 1e-10, f"{name}: relative error {err:.3g} > 1e-10"
        return
    # Plain PyTorch in the same dtype sets what the dtype can achieve.
    same_dtype = forward_and_grads(reference, idx, C, W1, b1, grad_h)
    for name, a, e, t in zip(NAMES, ours, truth, same_dtype):
        assert a.dtype == dtype, name
        bound = max(1e-5 if dtype == torch.float32 else 0.0, 2 * rel_error(t, e))
        err = rel_error(a, e)
        assert err <= bound, f"{name}: relative error {err:.3g} > {bound:.3g} (plain PyTorch: {rel_error(t, e):.3g})"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}-T{}-E{}-H{}-V{}".format(*s))
def test_matches_reference(shape, dtype, device):
    idx, C, W1, b1, grad_h = make_inputs(*shape, device, dtype, seed=sum(shape))
    ours = forward_and_grads(ops.embed_linear_tanh, idx, C, W1, b1, grad_h)
    assert ours[0].shape == (shape[0], shape[3])
    check_against_truth(ours, idx, C, W1, b1, grad_h)


_VARIANT_SCRIPT = r"""
import torch
from charmlp_fast import ops
from tests.test_embed_linear_tanh import FLOAT_DTYPES, SHAPES, check_against_truth, forward_and_grads, make_inputs
for shape in SHAPES:
    for dtype in FLOAT_DTYPES:
        idx, C, W1, b1, grad_h = make_inputs(*shape, "cpu", dtype, seed=sum(shape))
        check_against_truth(forward_and_grads(ops.embed_linear_tanh, idx, C, W1, b1, grad_h), idx, C, W1, b1, grad_h)
print("ok")
"""


@pytest.mark.parametrize("isa", ["baseline", "avx2"])
def test_cpu_isa_variants(isa):
    """The CPU kernels are compiled per ISA (csrc/cpu/isa.h) and picked at run time; run the ones this machine
    would not pick, through the CHARMLP_CPU_ISA cap, against float64 (fresh process: the choice is made once)."""
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "CHARMLP_CPU_ISA": isa, "PYTHONPATH": os.pathsep.join([str(root), str(root / "tests")])}
    done = subprocess.run([sys.executable, "-c", _VARIANT_SCRIPT], cwd=root, env=env, capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape", [SHAPES[0], SHAPES[5], SHAPES[8]], ids=lambda s: "B{}-T{}-E{}-H{}-V{}".format(*s))
def test_half_precision_cuda(shape, dtype):
    """bf16/fp16 inputs, fp32 accumulation: no worse than twice plain PyTorch's own error in that dtype."""
    idx, C, W1, b1, grad_h = make_inputs(*shape, "cuda", dtype)
    ours = forward_and_grads(ops.embed_linear_tanh, idx, C, W1, b1, grad_h)
    check_against_truth(ours, idx, C, W1, b1, grad_h)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_int32_idx_matches_int64(dtype, device):
    idx, C, W1, b1, grad_h = make_inputs(65, 4, 13, 129, 1000, device, dtype, seed=1)
    ours64 = forward_and_grads(ops.embed_linear_tanh, idx, C, W1, b1, grad_h)
    ours32 = forward_and_grads(ops.embed_linear_tanh, idx.int(), C, W1, b1, grad_h)
    check_against_truth(ours32, idx, C, W1, b1, grad_h)
    torch.testing.assert_close(ours32[0], ours64[0], rtol=0, atol=0)  # the forward is deterministic


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_noncontiguous_inputs(dtype, device):
    B, T, E, H, V = 45, 3, 10, 37, 27
    idx, C, W1, b1, grad_h = make_inputs(B, T, E, H, V, device, dtype, seed=2)
    # Same values, strided layouts: idx and W1 transposed, C and b1 every other element, grad_h transposed.
    idx_nc = idx.t().contiguous().t()
    C_nc = torch.stack([C, torch.full_like(C, float("nan"))], dim=-1)[..., 0]
    W1_nc = W1.t().contiguous().t()
    b1_nc = torch.stack([b1, torch.full_like(b1, float("nan"))], dim=-1)[..., 0]
    grad_h_nc = grad_h.t().contiguous().t()
    for t in (idx_nc, C_nc, W1_nc, b1_nc, grad_h_nc):
        assert not t.is_contiguous()
    ours = forward_and_grads(ops.embed_linear_tanh, idx_nc, C_nc, W1_nc, b1_nc, grad_h_nc)
    check_against_truth(ours, idx, C, W1, b1, grad_h)


@pytest.mark.parametrize("device", DEVICES)
def test_expanded_grad_h(device):
    """h.sum() hands the backward an expanded (stride 0) grad_h."""
    idx, C, W1, b1, _ = make_inputs(32, 3, 10, 200, 27, device, torch.float64, seed=3)
    params = [p.clone().requires_grad_() for p in (C, W1, b1)]
    grads = torch.autograd.grad(ops.embed_linear_tanh(idx, *params).sum(), params)
    ref_params = [p.clone().requires_grad_() for p in (C, W1, b1)]
    ref_grads = torch.autograd.grad(reference(idx, *ref_params).sum(), ref_params)
    for name, a, e in zip(NAMES[1:], grads, ref_grads):
        assert rel_error(a, e) <= 1e-10, name


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_saturated_tanh(dtype, device):
    """Pre-activations of +-30: float32 cannot reach 1e-5 on the gradients, but must stay within 2x torch."""
    idx, C, W1, b1, grad_h = make_inputs(200, 3, 10, 64, 27, device, dtype, seed=4, scale=30.0)
    ours = forward_and_grads(ops.embed_linear_tanh, idx, C, W1, b1, grad_h)
    assert (ours[0].abs() == 1).any(), "the test must reach saturation"
    check_against_truth(ours, idx, C, W1, b1, grad_h)


@pytest.mark.parametrize("device", DEVICES)
def test_tanh_accuracy_and_special_values(device):
    """With K = 1, W1 = 1, b1 = 0 the op is elementwise tanh: per-element accuracy over the whole float range
    (the CPU kernel computes tanh with its own vectorised polynomial), and inf / nan behave as torch.tanh."""
    x = torch.cat([
        torch.linspace(-12, 12, 200_001),
        torch.logspace(-30, 1.2, 20_001),
        -torch.logspace(-30, 1.2, 20_001),
        torch.tensor([0.0, -0.0, 0.625, -0.625, 9.0, -9.0, 9.02, -9.02, 10.0, 11.0, 1e30, -1e30, 3e-39]),
    ]).to(device)
    idx = torch.arange(x.numel(), device=device)[:, None]
    h = ops.embed_linear_tanh(idx, x[:, None], torch.ones(1, 1, device=device), torch.zeros(1, device=device))[:, 0]
    truth = torch.tanh(x.double())
    rel = (h.double() - truth).abs() / truth.abs().clamp_min(1e-300)
    rel = torch.where(x == 0, (h.double() - truth).abs(), rel)
    # 4 ulp: the vectorised polynomial is ~2 ulp (glibc's tanhf ~1 ulp).
    assert rel.max().item() <= 4 * torch.finfo(torch.float32).eps, f"max rel error {rel.max().item():.3g}"
    # Saturation is exact, as in torch: tanh rounds to +-1 in float32 from |x| = 9.01 on.
    big = x.abs() >= 9.02
    assert torch.equal(h[big], torch.tanh(x[big]))
    special = torch.tensor([float("inf"), -float("inf"), float("nan")], device=device)
    h_special = ops.embed_linear_tanh(torch.arange(3, device=device)[:, None], special[:, None],
                                      torch.ones(1, 1, device=device), torch.zeros(1, device=device))[:, 0]
    torch.testing.assert_close(h_special, torch.tanh(special), equal_nan=True, rtol=0, atol=0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_empty_batch(dtype, device):
    """B = 0 behaves like plain PyTorch: h of shape (0, H), all-zero gradients."""
    idx, C, W1, b1, _ = make_inputs(0, 3, 10, 200, 27, device, dtype)
    ours = forward_and_grads(ops.embed_linear_tanh, idx, C, W1, b1, torch.empty(0, 200, device=device))
    ref = forward_and_grads(reference, idx, C, W1, b1, torch.empty(0, 200, device=device))
    for name, a, e in zip(NAMES, ours, ref):
        assert a.shape == e.shape and a.dtype == e.dtype, name
        assert torch.equal(a, e), name


@pytest.mark.parametrize("device", DEVICES)
def test_zero_width_context(device):
    """T*E = 0: h = tanh(b1) for every row, grad_W1 is (0, H)."""
    idx, C, W1, b1, grad_h = make_inputs(5, 0, 10, 20, 27, device, torch.float64)
    ours = forward_and_grads(ops.embed_linear_tanh, idx, C, W1, b1, grad_h)
    check_against_truth(ours, idx, C, W1, b1, grad_h)


def test_gradcheck():
    idx, C, W1, b1, _ = make_inputs(6, 3, 4, 9, 5, "cpu", torch.float64, seed=5)
    params = tuple(p.requires_grad_() for p in (C, W1, b1))
    assert torch.autograd.gradcheck(lambda *p: ops.embed_linear_tanh(idx, *p), params)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("requires_grad", [False, True])
def test_opcheck_forward(device, requires_grad):
    idx, C, W1, b1, _ = make_inputs(19, 3, 5, 23, 11, device, torch.float32, seed=6)
    for p in (C, W1, b1):
        p.requires_grad_(requires_grad)
    opcheck(elt, (idx, C, W1, b1))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", ["contiguous", "transposed"])
def test_opcheck_backward(device, layout):
    idx, C, W1, b1, grad_h = make_inputs(19, 3, 5, 23, 11, device, torch.float32, seed=7)
    h = elt(idx, C, W1, b1)
    if layout == "transposed":  # the fake must report the kernels' contiguous gradients, not C's layout
        C, W1 = C.t().contiguous().t(), W1.t().contiguous().t()
    # Deterministic so that the "same result twice" sub-checks also hold on CUDA.
    with DeterministicAlgorithms(True):
        opcheck(elt_backward, (grad_h, h, idx, C, W1))


@pytest.mark.parametrize("device", DEVICES)
def test_torch_compile_fullgraph(device):
    """A function using the op, compiled with fullgraph=True, matches eager in the forward and every gradient."""
    skip_if_emulated(device, NO_COMPILE)
    idx, C, W1, b1, _ = make_inputs(32, 3, 10, 200, 27, device, torch.float32, seed=8)
    W2 = torch.randn(200, 27, generator=torch.Generator().manual_seed(9)).to(device)

    def loss_fn(idx, C, W1, b1):
        h = ops.embed_linear_tanh(idx, C, W1, b1)
        return torch.logsumexp(h @ W2, dim=1).mean()

    compiled = torch.compile(loss_fn, fullgraph=True)
    results = []
    for fn in (loss_fn, compiled):
        params = [p.clone().requires_grad_() for p in (C, W1, b1)]
        loss = fn(idx, *params)
        results.append((loss.detach(), *torch.autograd.grad(loss, params)))
    for name, a, e in zip(("loss", "grad_C", "grad_W1", "grad_b1"), results[1], results[0]):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-6, msg=name)


class DeterministicAlgorithms:
    """torch.use_deterministic_algorithms as a context manager that restores the previous setting."""

    def __init__(self, mode: bool):
        self.mode = mode

    def __enter__(self):
        self.previous = torch.are_deterministic_algorithms_enabled()
        torch.use_deterministic_algorithms(self.mode)

    def __exit__(self, *exc):
        torch.use_deterministic_algorithms(self.previous)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_deterministic_mode_is_bitwise_reproducible(dtype, device):
    """Many rows hitting few rows of C (where atomics would reorder sums): two runs agree bit for bit."""
    idx, C, W1, b1, grad_h = make_inputs(8192, 3, 10, 200, 27, device, dtype, seed=10)
    with DeterministicAlgorithms(True):
        first = forward_and_grads(ops.embed_linear_tanh, idx, C, W1, b1, grad_h)
        second = forward_and_grads(ops.embed_linear_tanh, idx, C, W1, b1, grad_h)
    for name, a, b in zip(NAMES, first, second):
        assert torch.equal(a, b), f"{name} differs between two deterministic runs"
    check_against_truth(first, idx, C, W1, b1, grad_h)


# ---- errors: every message names the offending argument --------------------------------------------------
def _good(device):
    return make_inputs(4, 3, 2, 5, 7, device, torch.float32, seed=11)


FORWARD_ERRORS = [
    # (name, mutate (idx, C, W1, b1) -> (idx, C, W1, b1), message regex)
    ("idx float", lambda i, C, W, b: (i.float(), C, W, b), r"idx must be int64 or int32, got Float"),
    ("idx 1-D", lambda i, C, W, b: (i.flatten(), C, W, b), r"idx must be a 2-D tensor"),
    ("C 1-D", lambda i, C, W, b: (i, C.flatten(), W, b), r"C must be a 2-D tensor"),
    ("C int", lambda i, C, W, b: (i, C.long(), W, b), r"C must be float32 or float64"),
    ("W1 3-D", lambda i, C, W, b: (i, C, W[None], b), r"W1 must be a 2-D tensor"),
    ("W1 dtype", lambda i, C, W, b: (i, C, W.double(), b), r"W1 must have the dtype of C"),
    ("b1 dtype", lambda i, C, W, b: (i, C, W, b.double()), r"b1 must have the dtype of C"),
    ("b1 2-D", lambda i, C, W, b: (i, C, W, b[None]), r"b1 must be a 1-D tensor"),
    ("W1 rows", lambda i, C, W, b: (i, C, W[:-1], b), r"W1.size\(0\) must equal idx.size\(1\) \* C.size\(1\)"),
    ("b1 size", lambda i, C, W, b: (i, C, W, b[:-1]), r"b1.size\(0\) must equal W1.size\(1\)"),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name,mutate,match", FORWARD_ERRORS, ids=[e[0] for e in FORWARD_ERRORS])
def test_forward_errors(name, mutate, match, device):
    with pytest.raises(RuntimeError, match=match):
        elt(*mutate(*_good(device)[:4]))


def test_half_rejected_on_cpu():
    idx, C, W1, b1, _ = _good("cpu")
    with pytest.raises(RuntimeError, match=r"C must be float32 or float64, got Half"):
        elt(idx, C.half(), W1.half(), b1.half())


@pytest.mark.parametrize("bad", [7, -1, 1000])
def test_index_out_of_range_cpu(bad):
    idx, C, W1, b1, grad_h = _good("cpu")
    idx[2, 1] = bad
    with pytest.raises(RuntimeError, match=rf"idx\[2, 1\] = {bad} is out of range \[0, V\) with V = C.size\(0\) = 7"):
        elt(idx, C, W1, b1)
    with pytest.raises(RuntimeError, match=rf"idx\[2, 1\] = {bad} is out of range"):
        elt_backward(grad_h, torch.zeros_like(grad_h), idx, C, W1)


@requires_cuda
@pytest.mark.parametrize("moved", ["idx", "W1", "b1"])
def test_device_mismatch(moved):
    args = dict(zip(("idx", "C", "W1", "b1"), _good("cuda")[:4]))
    args[moved] = args[moved].cpu()
    with pytest.raises(RuntimeError, match=rf"{moved} must be on the device of C"):
        elt(*args.values())


BACKWARD_ERRORS = [
    # (name, mutate (grad_h, h, idx, C, W1), message regex)
    ("grad_h cols", lambda g, h, i, C, W: (g[:, :-1], h, i, C, W), r"grad_h.size\(1\) must equal W1.size\(1\)"),
    ("grad_h rows", lambda g, h, i, C, W: (g[:-1], h, i, C, W), r"grad_h.size\(0\) must equal idx.size\(0\)"),
    ("h rows", lambda g, h, i, C, W: (g, h[:-1], i, C, W), r"h.size\(0\) must equal idx.size\(0\)"),
    ("h 1-D", lambda g, h, i, C, W: (g, h.flatten(), i, C, W), r"h must be a 2-D tensor"),
    ("h dtype", lambda g, h, i, C, W: (g, h.double(), i, C, W), r"h must have the dtype of C"),
    ("grad_h dtype", lambda g, h, i, C, W: (g.double(), h, i, C, W), r"grad_h must have the dtype of C"),
    ("W1 rows", lambda g, h, i, C, W: (g, h, i, C, W[:-1]), r"W1.size\(0\) must equal idx.size\(1\) \* C.size\(1\)"),
    ("idx dtype", lambda g, h, i, C, W: (g, h, i.short(), C, W), r"idx must be int64 or int32, got Short"),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name,mutate,match", BACKWARD_ERRORS, ids=[e[0] for e in BACKWARD_ERRORS])
def test_backward_errors(name, mutate, match, device):
    idx, C, W1, b1, grad_h = _good(device)
    h = elt(idx, C, W1, b1)
    with pytest.raises(RuntimeError, match=match):
        elt_backward(*mutate(grad_h, h, idx, C, W1))
