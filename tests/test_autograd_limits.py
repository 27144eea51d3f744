"""Autograd beyond first-order backward, for every differentiable op: correct, or an error naming the op.

Double backward (create_graph=True) of cross_entropy and embed_linear_tanh is checked against torch's own
F.cross_entropy / the plain formula and with gradgradcheck; linear_cross_entropy's double backward, forward-mode AD
(forward_ad.make_dual, torch.func.jvp) and torch.func's differentiating transforms raise a RuntimeError whose exact
message names the op, the limit and what to use instead. torch.func.vmap runs (per-sample fallback) and is checked
against a loop. The internal *_forward / *_backward ops refuse to be differentiated instead of warning and
returning zeros. Never a silent zero or a missing tangent.
"""
from __future__ import annotations

import re

import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from charmlp_fast import ops
from conftest import DEVICES
from utils import assert_close

REDUCTIONS = ["none", "mean", "sum"]
DTYPES = [torch.float32, torch.float64]
REFERENCE = ' (or CharMLP(kernels="reference"))'
INSTEAD = {
    "cross_entropy": "torch.nn.functional.cross_entropy" + REFERENCE,
    "linear_cross_entropy": "charmlp_fast.ops.cross_entropy or torch.nn.functional.cross_entropy on "
                            "torch.addmm(b2, h, W2)" + REFERENCE,
    "embed_linear_tanh": "torch.tanh(C[idx].flatten(1) @ W1 + b1)" + REFERENCE,
}
OPS = list(INSTEAD)
# (op, reduction) pairs: embed_linear_tanh has no reduction and runs once, as "none".
OP_REDUCTIONS = [(op, r) for op in OPS[:2] for r in REDUCTIONS] + [("embed_linear_tanh", "none")]
TWICE_DIFFERENTIABLE = [(op, r) for op, r in OP_REDUCTIONS if op != "linear_cross_entropy"]


def forward_ad_error(op: str) -> str:
    return (f"charmlp::{op}: forward-mode AD (torch.autograd.forward_ad, torch.func.jvp/jacfwd) is not supported, "
            f"the op has no forward derivative; use {INSTEAD[op]} for it")


def functorch_error(op: str) -> str:
    return (f"charmlp::{op}: torch.func transforms that differentiate (grad, vjp, jacrev, jacfwd, hessian) are not "
            f"supported by its C++ autograd kernel; use torch.autograd.grad, or {INSTEAD[op]} under torch.func")


def double_backward_error(op: str) -> str:
    return (f"charmlp::{op}: double backward (a backward with create_graph=True, gradgradcheck, hessians) is not "
            f"supported; use {INSTEAD[op]} for it")


def raises(message: str):
    return pytest.raises(RuntimeError, match="^" + re.escape(message))


def _seed(*parts) -> torch.Generator:
    """A generator seeded from the test's parameters, the same in every process (unlike hash() of a str)."""
    seed = 0
    for p in parts:
        seed = (seed * 1000003 + (p if isinstance(p, int) else sum(map(ord, str(p))))) % 2**31
    return torch.Generator().manual_seed(seed)


def case(op: str, reduction: str, dtype: torch.dtype, device: str, B: int = 6):
    """(fn(*params) -> scalar loss through the charmlp op, the same in plain PyTorch, params) with params fresh
    leaves that require grad. The loss is a weighted sum of the op's output, so that reduction="none" has a
    non-uniform incoming gradient; targets include an ignored row."""
    g = _seed(op, reduction, str(dtype), B)
    V, H, T, E = 7, 5, 3, 4
    rand = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64).to(device, dtype)  # noqa: E731
    t = torch.randint(0, V, (B,), generator=g).to(device)
    t[1] = -100
    u = rand(B) if reduction == "none" else rand(())
    if op == "cross_entropy":
        params = [rand(B, V)]
        fn = lambda x: (ops.cross_entropy(x, t, reduction) * u).sum()  # noqa: E731
        ref = lambda x: (F.cross_entropy(x, t, reduction=reduction) * u).sum()  # noqa: E731
    elif op == "linear_cross_entropy":
        params = [rand(B, H), rand(H, V), rand(V)]
        fn = lambda h, W2, b2: (ops.linear_cross_entropy(h, W2, b2, t, reduction) * u).sum()  # noqa: E731
        ref = lambda h, W2, b2: (F.cross_entropy(h @ W2 + b2, t, reduction=reduction) * u).sum()  # noqa: E731
    else:
        idx = torch.randint(0, V, (B, T), generator=g).to(device)
        params = [rand(V, E), rand(T * E, H), rand(H)]
        w = rand(B, H)
        fn = lambda C, W1, b1: (ops.embed_linear_tanh(idx, C, W1, b1) * w).sum()  # noqa: E731
        ref = lambda C, W1, b1: (torch.tanh(C[idx].flatten(1) @ W1 + b1) * w).sum()  # noqa: E731
    return fn, ref, [p.requires_grad_() for p in params]


def second_order(fn, params, g: torch.Generator):
    """Gradients and the Hessian-vector products d/dp <grad fn(p), v> for a random v, through create_graph=True."""
    grads = torch.autograd.grad(fn(*params), params, create_graph=True)
    vs = [torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.device, p.dtype) for p in params]
    hvp = torch.autograd.grad(sum((gr * v).sum() for gr, v in zip(grads, vs)), params)
    return grads, hvp


# ---- double backward ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("op,reduction", TWICE_DIFFERENTIABLE)
def test_double_backward_matches_torch(op, reduction, dtype, device):
    """Hessian-vector products equal torch's own (F.cross_entropy / the plain formula), and are not zero."""
    fn, ref, params = case(op, reduction, dtype, device)
    ref_params = [p.detach().clone().requires_grad_() for p in params]
    grads, hvp = second_order(fn, params, _seed("v", op, reduction))
    ref_grads, ref_hvp = second_order(ref, ref_params, _seed("v", op, reduction))
    rtol, atol = (1e-10, 1e-12) if dtype == torch.float64 else (1e-5, 1e-6)
    names = [f"{kind} {i}" for kind in ("grad", "hvp") for i in range(len(params))]
    for name, a, e in zip(names, (*grads, *hvp), (*ref_grads, *ref_hvp), strict=True):
        assert a.dtype == dtype
        assert_close(a, e, rtol=rtol, atol=atol, name=f"{op} {name}")
    assert any(h.abs().max() > 1e-3 for h in ref_hvp)  # the check can fail on a silent zero


@pytest.mark.parametrize("op,reduction", TWICE_DIFFERENTIABLE)
def test_gradgradcheck(op, reduction):
    fn, _, params = case(op, reduction, torch.float64, "cpu")
    assert torch.autograd.gradgradcheck(fn, tuple(params))


@pytest.mark.parametrize("device", DEVICES)
def test_hessian_of_cross_entropy_matches_torch(device):
    """torch.autograd.functional.hessian (create_graph inside) through the op equals torch's, mean reduction."""
    fn, ref, (x,) = case("cross_entropy", "mean", torch.float64, device, B=3)
    hess = torch.autograd.functional.hessian(fn, x.detach())
    assert_close(hess, torch.autograd.functional.hessian(ref, x.detach()), rtol=1e-10, atol=1e-12, name="hessian")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_double_backward_int32_targets_and_ignore_index_inside_the_vocabulary(reduction, device):
    g = _seed("int32", reduction)
    x = torch.randn(8, 5, generator=g, dtype=torch.float64).to(device).requires_grad_()
    t = torch.tensor([0, 3, 1, 3, 4, 2, 3, 0], dtype=torch.int32, device=device)
    u = torch.randn(8 if reduction == "none" else (), generator=g, dtype=torch.float64).to(device)
    fn = lambda x: (ops.cross_entropy(x, t, reduction, ignore_index=3) * u).sum()  # noqa: E731
    ref = lambda x: (F.cross_entropy(x, t.long(), reduction=reduction, ignore_index=3) * u).sum()  # noqa: E731
    ours = second_order(fn, [x], _seed("v int32", reduction))
    theirs = second_order(ref, [x.detach().clone().requires_grad_()], _seed("v int32", reduction))
    for a, e in zip((*ours[0], *ours[1]), (*theirs[0], *theirs[1]), strict=True):
        assert_close(a, e, rtol=1e-10, atol=1e-12, name="int32 / ignore_index=3")


@pytest.mark.parametrize("device", DEVICES)
def test_double_backward_int32_idx(device):
    _, _, params = case("embed_linear_tanh", "none", torch.float64, device)
    g = _seed("int32 idx")
    idx = torch.randint(0, 7, (6, 3), generator=g, dtype=torch.int32).to(device)
    fn = lambda C, W1, b1: ops.embed_linear_tanh(idx, C, W1, b1).pow(2).sum()  # noqa: E731
    ref = lambda C, W1, b1: torch.tanh(C[idx.long()].flatten(1) @ W1 + b1).pow(2).sum()  # noqa: E731
    ours = second_order(fn, params, _seed("v int32"))
    theirs = second_order(ref, [p.detach().clone().requires_grad_() for p in params], _seed("v int32"))
    for a, e in zip((*ours[0], *ours[1]), (*theirs[0], *theirs[1]), strict=True):
        assert_close(a, e, rtol=1e-10, atol=1e-12, name="int32 idx")


@pytest.mark.parametrize("device", DEVICES)
def test_double_backward_of_all_ignored_mean_is_zero_like_torch(device):
    x = torch.randn(4, 5, dtype=torch.float64, device=device, requires_grad=True)
    t = torch.full((4,), -100, device=device)
    for f in (lambda x: ops.cross_entropy(x, t, "mean"), lambda x: F.cross_entropy(x, t)):
        (gx,) = torch.autograd.grad(f(x), x, create_graph=True)
        (ggx,) = torch.autograd.grad(gx.sum(), x)
        assert torch.equal(gx, torch.zeros_like(x)) and torch.equal(ggx, torch.zeros_like(x))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("B,H,V", [(6, 5, 7), (8200, 128, 27)])  # routes: precomputed / recompute; kept logits
def test_linear_cross_entropy_double_backward_raises(B, H, V, reduction, dtype, device):
    g = _seed("lce double", B, reduction)
    h, W2, b2 = (torch.randn(*s, generator=g, dtype=dtype).to(device).requires_grad_() for s in ((B, H), (H, V), (V,)))
    t = torch.randint(0, V, (B,), generator=g).to(device)
    loss = ops.linear_cross_entropy(h, W2, b2, t, reduction).sum()
    with raises(double_backward_error("linear_cross_entropy")):
        torch.autograd.grad(loss, (h, W2, b2), create_graph=True)
    # the first-order backward of the same graph still works
    grads = torch.autograd.grad(loss, (h, W2, b2))
    assert all(gr.abs().max() > 0 for gr in grads)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_linear_cross_entropy_suggested_replacement_has_double_backward(reduction, device):
    """What the error suggests, ops.cross_entropy on torch.addmm(b2, h, W2), gives torch's Hessian-vector products."""
    _, _, params = case("linear_cross_entropy", reduction, torch.float64, device)
    g = _seed("lce replacement", reduction)
    t = torch.randint(0, 7, (6,), generator=g).to(device)
    u = torch.randn(6 if reduction == "none" else (), generator=g, dtype=torch.float64).to(device)
    fn = lambda h, W2, b2: (ops.cross_entropy(torch.addmm(b2, h, W2), t, reduction) * u).sum()  # noqa: E731
    ref = lambda h, W2, b2: (F.cross_entropy(h @ W2 + b2, t, reduction=reduction) * u).sum()  # noqa: E731
    ours = second_order(fn, params, _seed("v", reduction))
    ref_params = [p.detach().clone().requires_grad_() for p in params]
    theirs = second_order(ref, ref_params, _seed("v", reduction))
    for a, e in zip((*ours[0], *ours[1]), (*theirs[0], *theirs[1]), strict=True):
        assert_close(a, e, rtol=1e-10, atol=1e-12, name="replacement")


class OpRecorder(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.add(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("op", ["cross_entropy", "embed_linear_tanh"])
def test_first_order_backward_still_runs_the_fused_op(op):
    """The ATen formula is for create_graph=True only: a plain backward runs the fused backward op."""
    fn, _, params = case(op, "mean", torch.float32, "cpu")
    loss = fn(*params)
    with OpRecorder() as rec:
        torch.autograd.grad(loss, params, retain_graph=True)
    assert f"charmlp.{op}_backward" in rec.ops, rec.ops
    with OpRecorder() as rec:
        torch.autograd.grad(loss, params, create_graph=True)
    assert f"charmlp.{op}_backward" not in rec.ops, rec.ops


# ---- forward-mode AD --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("op,reduction", OP_REDUCTIONS)
@pytest.mark.parametrize("requires_grad", [False, True])
def test_forward_ad_raises(op, reduction, dtype, device, requires_grad):
    """A tangent on any one differentiable input raises, whether or not the primal also requires grad."""
    fn, _, params = case(op, reduction, dtype, device)
    for i in range(len(params)):
        with fwAD.dual_level():
            args = [p.detach().requires_grad_(requires_grad) for p in params]
            args[i] = fwAD.make_dual(args[i], torch.randn_like(args[i]))
            with raises(forward_ad_error(op)):
                fn(*args)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("op", OPS)
def test_func_jvp_raises(op, dtype, device):
    fn, _, params = case(op, "mean", dtype, device)
    primals = tuple(p.detach() for p in params)
    with raises(forward_ad_error(op)):
        torch.func.jvp(fn, primals, tuple(torch.randn_like(p) for p in primals))


# ---- torch.func ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("op,reduction", OP_REDUCTIONS)
@pytest.mark.parametrize("transform", ["grad", "vjp", "jacrev", "vmap_grad"])
def test_func_transforms_raise(transform, op, reduction, dtype, device):
    fn, _, params = case(op, reduction, dtype, device)
    primals = tuple(p.detach() for p in params)
    run = {
        "grad": lambda: torch.func.grad(fn)(*primals),
        "vjp": lambda: torch.func.vjp(fn, *primals),
        "jacrev": lambda: torch.func.jacrev(fn)(*primals),
        "vmap_grad": lambda: torch.func.vmap(torch.func.grad(fn), in_dims=(0, *[None] * (len(primals) - 1)))(
            primals[0].unsqueeze(0).expand(2, *primals[0].shape), *primals[1:]),
    }[transform]
    with raises(functorch_error(op)):
        run()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("op,reduction", OP_REDUCTIONS)
def test_func_grad_of_a_constant_call_is_fine(op, reduction, dtype, device):
    """torch.func.grad of a function in which the op's inputs do not depend on the differentiated argument records no
    node of the op, so nothing is wrong and nothing is raised."""
    fn, _, params = case(op, reduction, dtype, device)
    primals = [p.detach() for p in params]
    s = torch.tensor(1.5, dtype=dtype, device=device)
    assert_close(torch.func.grad(lambda s: s * fn(*primals))(s), fn(*primals), rtol=1e-12, name="d/ds s*f")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("op,reduction", OP_REDUCTIONS)
def test_vmap_matches_loop_and_backpropagates(op, reduction, dtype, device):
    """torch.func.vmap over the first argument (per-sample fallback): values and their ordinary backward equal a
    loop over the samples."""
    fn, _, params = case(op, reduction, dtype, device)
    g = _seed("vmap", op, reduction)
    first = (torch.randn(3, *params[0].shape, generator=g, dtype=torch.float64).to(device, dtype)).requires_grad_()
    rest = params[1:]
    batched = torch.func.vmap(lambda p0: fn(p0, *rest))(first)
    first_loop = first.detach().clone().requires_grad_()
    rest_loop = [p.detach().clone().requires_grad_() for p in rest]
    looped = torch.stack([fn(p0, *rest_loop) for p0 in first_loop])
    assert_close(batched, looped, rtol=1e-12 if dtype == torch.float64 else 1e-6, name="vmap values")
    grads = torch.autograd.grad(batched.sum(), [first, *rest])
    grads_loop = torch.autograd.grad(looped.sum(), [first_loop, *rest_loop])
    for a, e in zip(grads, grads_loop, strict=True):
        assert_close(a, e, rtol=1e-10 if dtype == torch.float64 else 1e-5, atol=1e-12, name="vmap grads")


# ---- the internal ops ----------------------------------------------------------------------------------------------

def _internal_calls(device, dtype):
    """(op name, public op, call(x) with x the one differentiable tensor argument) for each internal op."""
    g = _seed("internal", str(dtype))
    B, V, H, T, E = 4, 7, 5, 3, 2
    rand = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).to(device, dtype)  # noqa: E731
    t = torch.randint(0, V, (B,), generator=g).to(device)
    x, h, W2, b2 = rand(B, V), rand(B, H), rand(H, V), rand(V)
    idx = torch.randint(0, V, (B, T), generator=g).to(device)
    C, W1, b1 = rand(V, E), rand(T * E, H), rand(H)
    _, lse = torch.ops.charmlp.cross_entropy_forward(x, t, 1, -100)
    _, lse2, *_ = torch.ops.charmlp.linear_cross_entropy_forward(h, W2, b2, t, 1, -100, False)
    hid = torch.ops.charmlp.embed_linear_tanh(idx, C, W1, b1)
    one = torch.ones((), dtype=dtype, device=device)
    cm = torch.ops.charmlp
    return [
        ("cross_entropy_forward", "logits", x, lambda a: cm.cross_entropy_forward(a, t, 1, -100)),
        ("cross_entropy_backward", "logits", x, lambda a: cm.cross_entropy_backward(one, a, t, lse, 1, -100)),
        ("linear_cross_entropy_forward", "W2", W2,
         lambda a: cm.linear_cross_entropy_forward(h, a, b2, t, 1, -100, True)),
        ("linear_cross_entropy_backward", "W2", W2,
         lambda a: cm.linear_cross_entropy_backward(one, h, a, b2, t, lse2, 1, -100)),
        ("embed_linear_tanh_backward", "W1", W1,
         lambda a: cm.embed_linear_tanh_backward(torch.ones_like(hid), hid, idx, C, a)),
    ]


@pytest.fixture
def deterministic():
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(previous)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_internal_ops_refuse_differentiation(dtype, device, deterministic):
    """Deterministic algorithms: the CUDA embed_linear_tanh_backward otherwise sums grad_C with atomics, whose order
    (and rounding) changes from call to call, and the reruns below are compared bitwise."""
    for name, arg, x, call in _internal_calls(device, dtype):
        public = name.rsplit("_", 1)[0]
        message = (f"charmlp::{name} is an internal op with no derivative (its argument {arg} requires grad or has a "
                   f"forward-AD tangent); differentiate charmlp::{public} instead")
        expected = call(x)
        with raises(message):
            call(x.clone().requires_grad_())
        with fwAD.dual_level(), raises(message):
            call(fwAD.make_dual(x, torch.randn_like(x)))
        # without grad mode, or without an input that needs a derivative, the kernel runs as before
        with torch.no_grad():
            got = call(x.clone().requires_grad_())
        as_tuple = lambda r: r if isinstance(r, tuple) else (r,)  # noqa: E731
        for a, e in zip(as_tuple(got), as_tuple(expected), strict=True):
            assert torch.equal(a, e), name
