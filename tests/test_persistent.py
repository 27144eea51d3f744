"""Whole-training ops (charmlp::sgd_train, charmlp::philox_minibatch) and the whole-loop steppers.

The reference is the seed's training loop in plain float32 PyTorch (reference.forward + autograd + p -= lr * g),
fed the same minibatch indices. CPU always; CUDA parametrised and skipped with a reason when no GPU is visible.
"""
from __future__ import annotations

import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from charmlp_fast import ops, reference
from tests.conftest import CUDA_KERNEL_DEVICES, DEVICES, EMU, requires_cuda, requires_emu, runs_cuda_kernels
from emulated_cuda import cpu_kernels
from tests.utils import assert_close, rel_error

if not ops.HAS_EXTENSION:  # pragma: no cover
    pytest.skip("charmlp_fast._C is not built", allow_module_level=True)

from charmlp_fast.model import CharMLP  # noqa: E402
from charmlp_fast.steppers import GraphStepper, PersistentStepper, lr_schedule, unsupported_reason  # noqa: E402
from charmlp_fast.steppers.graph import fused_sgd_steps  # noqa: E402

SEED_SIZE = dict(V=27, T=3, E=10, H=200, B=32)
# (V, T, E, H, B): the seed's size, odd sizes that are no multiple of any tile or vector width, T = 1, a wider
# context, a larger vocabulary and batch.
SHAPES = [
    (27, 3, 10, 200, 32),
    (7, 1, 3, 17, 5),
    (13, 5, 7, 33, 11),
    (61, 8, 16, 64, 64),
    (150, 4, 24, 130, 96),
]
MASK64 = (1 << 64) - 1
MASK32 = (1 << 32) - 1


# ---- helpers --------------------------------------------------------------------------------------------------

def make_data(V: int, T: int, N: int, seed: int, dtype=torch.int64) -> tuple[torch.Tensor, torch.Tensor]:
    """A learnable synthetic corpus: the target is a fixed function of the context, with 20 % noise."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randint(0, V, (N, T), generator=g)
    Y = (X * torch.arange(1, T + 1)).sum(1) % V
    noise = torch.rand(N, generator=g) < 0.2
    Y = torch.where(noise, torch.randint(0, V, (N,), generator=g), Y)
    return X.to(dtype), Y.to(dtype)


def init_params(V, T, E, H, seed, M=1):
    """[C, W1, b1, W2, b2] with a leading model dimension M, the seed's init scaled like the seed's later
    notebooks (so that a few hundred steps at lr 0.1 stay well conditioned)."""
    models = []
    for m in range(M):
        C, W1, b1, W2, b2 = reference.init_params(V, T, E, H, seed + m)
        models.append([C, W1 * (5 / 3) / math.sqrt(T * E), b1 * 0.01, W2 * 0.1, b2 * 0])
    return [torch.stack([p[i] for p in models]).contiguous() for i in range(5)]


def direct_forward(params, X, Y):
    """The paper's model with direct connections, written out: logits = b2 + x @ W + tanh(x @ W1 + b1) @ U, where
    W2 = [U; W] (H + T*E, V) -> (logits, mean cross-entropy)."""
    C, W1, b1, W2, b2 = params
    x = C[X].view(X.shape[0], -1)
    H = W1.shape[1]
    logits = torch.tanh(x @ W1 + b1) @ W2[:H] + x @ W2[H:] + b2
    return logits, torch.nn.functional.cross_entropy(logits, Y)


def reference_train(params, X, Y, batch_idx, lrs, weight_decay=0.0):
    """The seed's loop in plain float32 PyTorch on given minibatches: -> (losses (S,), final params). W2 with T*E
    more rows than W1 has columns: the direct connections (direct_forward). weight_decay: C, W1 and W2 first scaled
    by 1 - lr * weight_decay. One intra-op thread: at these sizes a second one only adds fork/join overhead (10x on
    a busy 2-core box)."""
    params = [p.detach().clone().requires_grad_() for p in params]
    forward = direct_forward if params[3].shape[0] > params[1].shape[1] else reference.forward
    X, Y = X.long(), Y.long()
    losses = []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for i in range(batch_idx.shape[0]):
            ix = batch_idx[i]
            _, loss = forward(params, X[ix], Y[ix])
            grads = torch.autograd.grad(loss, params)
            with torch.no_grad():
                lr = float(lrs[i])
                for k, (p, g) in enumerate(zip(params, grads)):
                    if weight_decay and k in (0, 1, 3):  # C, W1, W2: the weights, not the biases
                        p.mul_(1.0 - lr * weight_decay)
                    p.add_(g, alpha=-lr)
            losses.append(loss.detach())
    finally:
        torch.set_num_threads(threads)
    return torch.stack(losses), [p.detach() for p in params]


def philox4x32_10(ctr, key):
    """Philox4x32-10 in plain Python integers (Salmon et al. 2011), independent of the C++ one."""
    M0, M1, W0, W1 = 0xD2511F53, 0xCD9E8D57, 0x9E3779B9, 0xBB67AE85
    c0, c1, c2, c3 = ctr
    k0, k1 = key
    for r in range(10):
        if r:
            k0, k1 = (k0 + W0) & MASK32, (k1 + W1) & MASK32
        p0, p1 = M0 * c0, M1 * c2
        c0, c1, c2, c3 = ((p1 >> 32) ^ c1 ^ k0) & MASK32, p1 & MASK32, ((p0 >> 32) ^ c3 ^ k1) & MASK32, p0 & MASK32
    return c0, c1, c2, c3


def minibatch_row(seed, step, row, n):
    """The documented mapping of csrc/sgd_train/sgd_train.h, in Python."""
    seed &= MASK64
    r = philox4x32_10((row & MASK32, row >> 32, step & MASK32, step >> 32), (seed & MASK32, seed >> 32))
    u = (r[1] << 32) | r[0]
    return (u * n) >> 64


def use_products(monkeypatch, device, gemm: str, sizes) -> None:
    """The CPU loop's products as `gemm` says (CHARMLP_CPU_GEMM); on the CUDA kernel, skip sizes it does not plan."""
    monkeypatch.setenv("CHARMLP_CPU_GEMM", gemm)
    if runs_cuda_kernels(device):
        reason, _ = ops.cuda_plan(*sizes)
        if reason:
            pytest.skip(reason)


def run_op(params, X, Y, lrs, **kw):
    """sgd_train on copies of params -> (losses, params)."""
    params = [p.clone() for p in params]
    losses = ops.sgd_train(params, X, Y, lrs, **kw)
    return losses, params


# ---- Philox ---------------------------------------------------------------------------------------------------

# Random123's tests/kat_vectors, the three philox4x32 10 lines: counter, key, expected output.
KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((MASK32,) * 4, (MASK32,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]


@pytest.mark.parametrize("ctr,key,expected", KAT)
def test_python_philox_matches_random123_kat(ctr, key, expected):
    assert philox4x32_10(ctr, key) == expected


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("seed", [0, 2147483647, (1 << 63) - 25, -7])
@pytest.mark.parametrize("n", [1, 7, 182625, 1 << 62, (1 << 63) - 1])
def test_philox_minibatch_bits(device, seed, n):
    """The op's rows equal the Python Philox's; with n = 2^62 the row is the top 62 bits of the 64-bit word."""
    start = (1 << 32) + 5 if n > 1000 else 3  # a step above 2^32 exercises the counter's high word
    seeds = torch.tensor([seed, seed ^ 0x5DEECE66D], device=device)
    rows = ops.philox_minibatch(seeds, start, 4, 6, n).cpu()
    assert rows.shape == (2, 4, 6) and rows.dtype == torch.int64
    for m in range(2):
        for i in range(4):
            for b in range(6):
                assert rows[m, i, b].item() == minibatch_row(int(seeds[m]), start + i, b, n), (m, i, b)


@pytest.mark.parametrize("device", CUDA_KERNEL_DEVICES)
def test_philox_minibatch_cpu_equals_cuda(device):
    seeds = torch.tensor([1, 2147483647, 99])
    with cpu_kernels():
        cpu = ops.philox_minibatch(seeds, 10, 50, 33, 182625)
    cuda = ops.philox_minibatch(seeds.to(device), 10, 50, 33, 182625)
    assert torch.equal(cpu, cuda.cpu())


def test_philox_rows_look_uniform():
    """A chi-square over 10 bins of 64,000 draws: a broken mapping (e.g. always the low bits) fails it."""
    rows = ops.philox_minibatch(torch.tensor([123]), 0, 2000, 32, 10).flatten()
    counts = torch.bincount(rows, minlength=10).double()
    chi2 = ((counts - counts.mean()) ** 2 / counts.mean()).sum().item()
    assert chi2 < 33.7, chi2  # p = 1e-4 for 9 degrees of freedom


# ---- against the reference ------------------------------------------------------------------------------------

# The CPU loop has two ways of computing its products (register-tiled SIMD below ~2 M multiply-adds per step,
# BLAS above; CHARMLP_CPU_GEMM forces one): test both on CPU, the kernel on CUDA.
IMPLS = [pytest.param("cpu", "simd", id="cpu-simd"), pytest.param("cpu", "blas", id="cpu-blas"),
         pytest.param("cuda", "auto", id="cuda", marks=requires_cuda),
         pytest.param(EMU, "auto", id="emu", marks=requires_emu)]


@pytest.mark.parametrize("device,gemm", IMPLS)
@pytest.mark.parametrize("V,T,E,H,B", SHAPES)
@pytest.mark.parametrize("index_dtype", [torch.int64, torch.int32])
def test_matches_reference_first_100_steps(device, gemm, V, T, E, H, B, index_dtype, monkeypatch):
    """Same minibatch indices: per-step losses and the parameters after 1, 10, 50 and 100 steps match the plain
    PyTorch loop to <= 1e-4 relative (also checks a run cut into chunks at those steps)."""
    use_products(monkeypatch, device, gemm, (V, T, E, H, B))
    X, Y = make_data(V, T, 3000, seed=V * 100 + H, dtype=index_dtype)
    params = init_params(V, T, E, H, seed=H)
    g = torch.Generator().manual_seed(B)
    S = 100
    batch_idx = torch.randint(0, X.shape[0], (S, B), generator=g)
    lrs = torch.linspace(0.2, 0.05, S)  # a per-step schedule, not a constant
    ref_losses, _ = reference_train([p[0] for p in params], X, Y, batch_idx, lrs)

    dev_params = [p.to(device, copy=True) for p in params]  # the op updates them in place
    Xd, Yd = X.to(device), Y.to(device)
    done, losses = 0, []
    for stop in (1, 10, 50, 100):
        losses.append(ops.sgd_train(dev_params, Xd, Yd, lrs[done:stop].to(device),
                                             batch_idx=batch_idx[done:stop].to(device), start_step=done,
                                             batch_size=B)[0])
        _, ref_params = reference_train([p[0] for p in params], X, Y, batch_idx[:stop], lrs[:stop])
        for name, mine, ref in zip(("C", "W1", "b1", "W2", "b2"), dev_params, ref_params):
            err = rel_error(mine[0], ref)
            assert err <= 1e-4, f"{name} after {stop} steps: relative error {err:.3g}"
        done = stop
    assert_close(torch.cat(losses), ref_losses, rtol=1e-4, name="per-step losses")


def with_direct_rows(params, T, E, seed):
    """params with T*E direct-connection rows appended to W2 (small random values: they must matter)."""
    C, W1, b1, W2, b2 = params
    g = torch.Generator().manual_seed(seed)
    Wd = 0.1 * torch.randn((W2.shape[0], T * E, W2.shape[2]), generator=g)
    return [C, W1, b1, torch.cat([W2, Wd], dim=1).contiguous(), b2]


# The paper's additions: weight decay on C, W1 and W2 (a large one, so that it moves the weights visibly in 60
# steps), the direct connections, both.
PAPER_CASES = [pytest.param(False, 0.05, id="decay"), pytest.param(True, 0.0, id="direct"),
               pytest.param(True, 0.05, id="direct-decay")]


@pytest.mark.parametrize("device,gemm", IMPLS)
@pytest.mark.parametrize("V,T,E,H,B", [SHAPES[1], SHAPES[3], SHAPES[4]])
@pytest.mark.parametrize("direct,weight_decay", PAPER_CASES)
def test_direct_connections_and_weight_decay_match_reference(device, gemm, V, T, E, H, B, direct, weight_decay,
                                                             monkeypatch):
    """sgd_train with W2 (M, H + T*E, V) and weight_decay: per-step losses and the final parameters match the plain
    PyTorch loop of the paper's model (direct_forward, decay on the weights only) to <= 1e-4 relative. The CUDA
    kernel has no direct connections: it says so."""
    use_products(monkeypatch, device, gemm, (V, T, E, H, B))
    X, Y = make_data(V, T, 2000, seed=V + H)
    params = init_params(V, T, E, H, seed=H)
    if direct:
        params = with_direct_rows(params, T, E, seed=V)
    S = 60
    batch_idx = torch.randint(0, X.shape[0], (S, B), generator=torch.Generator().manual_seed(B))
    lrs = torch.linspace(0.2, 0.05, S)
    dev_params = [p.to(device, copy=True) for p in params]
    run = lambda: ops.sgd_train(dev_params, X.to(device), Y.to(device), lrs.to(device),  # noqa: E731
                                batch_idx=batch_idx.to(device), batch_size=B, weight_decay=weight_decay)[0]
    if direct and runs_cuda_kernels(device):
        with pytest.raises(RuntimeError, match="the persistent CUDA kernel has no direct connections"):
            run()
        return
    losses = run()
    ref_losses, ref_params = reference_train([p[0] for p in params], X, Y, batch_idx, lrs, weight_decay)
    assert_close(losses, ref_losses, rtol=1e-4, atol=1e-5, name="losses")
    for name, p, q in zip(("C", "W1", "b1", "W2", "b2"), dev_params, ref_params):
        assert rel_error(p[0], q) <= 1e-4, f"{name}: {rel_error(p[0], q):.2e}"
    # Each addition changes the training: the run is not the plain model's.
    _, plain = reference_train([p[0] for p in init_params(V, T, E, H, seed=H)], X, Y, batch_idx, lrs)
    assert rel_error(dev_params[1][0], plain[1]) > 1e-3


def test_weight_decay_and_direct_rows_are_checked():
    V, T, E, H, B = 7, 2, 3, 5, 4
    X, Y = make_data(V, T, 20, seed=0)
    params = init_params(V, T, E, H, seed=0)
    lrs = torch.full((3,), 0.1)
    for wd in (-1e-3, float("nan"), float("inf")):
        with pytest.raises(RuntimeError, match="weight_decay must be finite and >= 0"):
            ops.sgd_train([p.clone() for p in params], X, Y, lrs, seeds=torch.tensor([1]), batch_size=B,
                          weight_decay=wd)
    C, W1, b1, W2, b2 = params
    bad = torch.zeros((1, H + 1, V))  # neither H rows nor H + T*E
    with pytest.raises(RuntimeError, match=r"W2 must have W1.size\(2\) \(hidden\) = 5 rows, or hidden \+ "
                                           r"X.size\(1\) \* C.size\(2\) = 11"):
        ops.sgd_train([C, W1, b1, bad, b2], X, Y, lrs, seeds=torch.tensor([1]), batch_size=B)


def per_op_loss(params, X, Y, rows):
    """The loss of one minibatch on model 0's parameters -> (charmlp_fast's per-op path in float32, the float64
    truth in plain PyTorch)."""
    C, W1, b1, W2, b2 = [p[0] for p in params]
    x, y = X[rows].long(), Y[rows].long()
    per_op = ops.cross_entropy(ops.embed_linear_tanh(x, C, W1, b1) @ W2 + b2, y)
    C, W1, b1, W2, b2 = [p[0].double() for p in params]
    truth = torch.nn.functional.cross_entropy(torch.tanh(C[x].flatten(1) @ W1 + b1) @ W2 + b2, y)
    return per_op, truth


@pytest.mark.parametrize("device,gemm", IMPLS)
@pytest.mark.parametrize("V,T,E,H,B", [SHAPES[0], SHAPES[2]])
@pytest.mark.parametrize("case", ["typical", "target_dominates"])
def test_first_step_loss_equals_the_per_op_loss(device, gemm, V, T, E, H, B, case, monkeypatch):
    """The loss sgd_train reports for its first step (loss_every=1) is the loss of the per-op path (ops.cross_entropy
    on the same parameters and minibatch) and of float64 PyTorch, to the op tests' float32 tolerance (1e-5, see
    test_cross_entropy.py), also where the target's logit dominates every row (loss ~5e-8): only a loss computed
    as log1p(sum_{j != t} exp(x_j - x_t)) keeps its digits there, max + log(sum) - x_t rounds it to 0 or ~2e-6."""
    use_products(monkeypatch, device, gemm, (V, T, E, H, B))
    X, Y = make_data(V, T, 500, seed=V + H)
    params = init_params(V, T, E, H, seed=H)
    if case == "target_dominates":
        Y = torch.full_like(Y, V // 2)
        params[4][0, V // 2] = 20.0  # b2: the target's logit ~20 above every other one
    rows = torch.randint(0, X.shape[0], (1, B), generator=torch.Generator().manual_seed(B))
    per_op, truth = per_op_loss(params, X, Y, rows[0])
    if case == "target_dominates":
        assert 1e-9 < truth < 1e-6, truth
    dev_params = [p.to(device, copy=True) for p in params]
    losses = ops.sgd_train(dev_params, X.to(device), Y.to(device), torch.tensor([0.1]).to(device),
                           batch_idx=rows.to(device), batch_size=B, loss_every=1)
    loss = losses[0, 0].cpu()
    assert_close(loss.double(), truth, rtol=1e-5, name="first-step loss against float64")
    assert_close(loss, per_op, rtol=1e-5, name="first-step loss against the per-op path")


def test_cpu_isa_override():
    """CHARMLP_CPU_ISA caps the instruction set of every CPU kernel (csrc/cpu/isa.h), and sgd_train_cpu_isa
    reports the one in use; an unknown value is an error (fresh processes: the choice is made once)."""
    root = Path(__file__).resolve().parents[1]
    script = "import charmlp_fast.ops, torch; print(torch.ops.charmlp.sgd_train_cpu_isa())"

    def run(isa):
        env = {k: v for k, v in os.environ.items() if k != "CHARMLP_CPU_ISA"}
        env.update({"PYTHONPATH": str(root), **({"CHARMLP_CPU_ISA": isa} if isa else {})})
        return subprocess.run([sys.executable, "-c", script], cwd=root, env=env, capture_output=True, text=True)

    order = ["baseline", "avx2", "avx512"]
    native = run(None).stdout.strip()  # what this CPU has, uncapped
    assert native in order
    for isa in order + ["avx1"]:
        done = run(isa)
        if isa == "avx1":
            assert done.returncode != 0 and "CHARMLP_CPU_ISA must be avx512, avx2 or baseline" in done.stderr
        else:
            assert done.returncode == 0, done.stderr[-2000:]
            assert done.stdout.strip() == order[min(order.index(isa), order.index(native))]


@pytest.mark.parametrize("device", DEVICES)
def test_loss_curve_within_1_percent_over_5000_steps(device):
    """At the seed's size, 5,000 steps on the same minibatches: the loss averaged over windows of 250 steps stays
    within 1 % of the reference's."""
    V, T, E, H, B = SEED_SIZE.values()
    X, Y = make_data(V, T, 20000, seed=5)
    params = init_params(V, T, E, H, seed=11)
    S = 5000
    batch_idx = torch.randint(0, X.shape[0], (S, B), generator=torch.Generator().manual_seed(3))
    lrs = lr_schedule(0.1, 2500, 0.01, 0, S)
    ref_losses, ref_params = reference_train([p[0] for p in params], X, Y, batch_idx, lrs)
    losses, mine = run_op([p.to(device) for p in params], X.to(device), Y.to(device), lrs.to(device),
                          batch_idx=batch_idx.to(device), batch_size=B)
    mine_curve = losses[0].cpu().view(-1, 250).mean(1)
    ref_curve = ref_losses.view(-1, 250).mean(1)
    worst = ((mine_curve - ref_curve).abs() / ref_curve).max().item()
    assert worst <= 0.01, f"windowed loss differs by {worst:.2%}"
    assert ref_curve[-1] < 0.8 * ref_curve[0], "the synthetic task should be learnable"


# ---- Philox mode: reproducibility --------------------------------------------------------------------------------

@pytest.mark.parametrize("device,gemm", IMPLS)
@pytest.mark.parametrize("loss_every", [1, 10])
def test_chunked_run_equals_one_call_bitwise(device, gemm, loss_every, monkeypatch):
    monkeypatch.setenv("CHARMLP_CPU_GEMM", gemm)
    V, T, E, H, B = 13, 5, 7, 33, 11
    X, Y = make_data(V, T, 500, seed=1)
    X, Y = X.to(device), Y.to(device)
    params = [p.to(device) for p in init_params(V, T, E, H, seed=2)]
    lrs = torch.linspace(0.3, 0.01, 300, device=device)
    seeds = torch.tensor([2147483647], device=device)
    one_losses, one = run_op(params, X, Y, lrs, seeds=seeds, batch_size=B, loss_every=loss_every)
    chunked = [p.clone() for p in params]
    parts, done = [], 0
    for n in (10, 90, 150, 50):
        parts.append(ops.sgd_train(chunked, X, Y, lrs[done:done + n], seeds=seeds, start_step=done,
                                            batch_size=B, loss_every=loss_every))
        done += n
    assert torch.equal(torch.cat(parts, dim=1), one_losses)
    for a, b in zip(chunked, one):
        assert torch.equal(a, b)


@pytest.mark.parametrize("device", DEVICES)
def test_seeds_mode_equals_batch_idx_mode(device):
    """Drawing rows with Philox inside the op == passing philox_minibatch's rows as batch_idx (bitwise)."""
    V, T, E, H, B = 27, 3, 10, 64, 16
    X, Y = make_data(V, T, 1000, seed=4)
    X, Y = X.to(device), Y.to(device)
    params = [p.to(device) for p in init_params(V, T, E, H, seed=6, M=2)]
    lrs = torch.full((2, 40), 0.1, device=device)
    seeds = torch.tensor([5, 77], device=device)
    a_losses, a = run_op(params, X, Y, lrs, seeds=seeds, start_step=17, batch_size=B)
    rows = ops.philox_minibatch(seeds, 17, 40, B, X.shape[0])
    b_losses, b = run_op(params, X, Y, lrs, batch_idx=rows, start_step=17, batch_size=B)
    assert torch.equal(a_losses, b_losses)
    for p, q in zip(a, b):
        assert torch.equal(p, q)


@pytest.mark.parametrize("device,gemm", IMPLS)
@pytest.mark.parametrize("mode", ["seeds", "batch_idx"])
def test_models_side_by_side_equal_separate_runs(device, gemm, mode, monkeypatch):
    """M = 3 models with their own seeds / minibatches and lr schedules in one call == 3 calls of one model."""
    monkeypatch.setenv("CHARMLP_CPU_GEMM", gemm)
    V, T, E, H, B, S, M = 17, 4, 6, 40, 9, 60, 3
    X, Y = make_data(V, T, 800, seed=8)
    X, Y = X.to(device), Y.to(device)
    params = [p.to(device) for p in init_params(V, T, E, H, seed=20, M=M)]
    lrs = torch.stack([torch.full((S,), 0.05), torch.linspace(0.2, 0.1, S), torch.full((S,), 0.3)]).to(device)
    seeds = torch.tensor([1, 2, 3], device=device)
    batch_idx = torch.randint(0, X.shape[0], (M, S, B), generator=torch.Generator().manual_seed(0)).to(device)
    kw = dict(seeds=seeds) if mode == "seeds" else dict(batch_idx=batch_idx)
    all_losses, together = run_op(params, X, Y, lrs, batch_size=B, loss_every=4, **kw)
    assert all_losses.shape == (M, S // 4)
    for m in range(M):
        kw_m = dict(seeds=seeds[m:m + 1]) if mode == "seeds" else dict(batch_idx=batch_idx[m])
        losses_m, alone = run_op([p[m:m + 1] for p in params], X, Y, lrs[m], batch_size=B, loss_every=4, **kw_m)
        assert torch.equal(losses_m[0], all_losses[m]), m
        for p, q in zip(alone, together):
            assert torch.equal(p[0], q[m]), m


@pytest.mark.parametrize("gemm", ["simd", "blas"])
@pytest.mark.parametrize("V,T,E,H,B,S", [(17, 4, 6, 40, 9, 60), (300, 8, 32, 512, 256, 12)])
def test_cpu_result_does_not_depend_on_the_thread_count(gemm, V, T, E, H, B, S, monkeypatch):
    """1, 2 and 3 intra-op threads give bitwise the same losses and parameters, for one model and for three side by
    side. The second size is large enough for the products to be split across threads."""
    monkeypatch.setenv("CHARMLP_CPU_GEMM", gemm)
    X, Y = make_data(V, T, 2000, seed=12)
    lrs = torch.linspace(0.2, 0.05, S)
    results = {}
    before = torch.get_num_threads()
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            for M in (1, 3):
                params = init_params(V, T, E, H, seed=7, M=M)
                results[threads, M] = run_op(params, X, Y, lrs, seeds=torch.arange(1, M + 1), batch_size=B)
    finally:
        torch.set_num_threads(before)
    for (threads, M), (losses, params) in results.items():
        ref_losses, ref_params = results[1, M]
        assert torch.equal(losses, ref_losses), (threads, M)
        for name, p, q in zip(("C", "W1", "b1", "W2", "b2"), params, ref_params):
            assert torch.equal(p, q), f"{name} with {threads} threads, M = {M}"
        assert torch.equal(losses[0], results[1, 1][0][0]), "model 0 of three differs from model 0 alone"


@pytest.mark.parametrize("device", DEVICES)
def test_shared_batch_idx_and_lrs_broadcast_over_models(device):
    """(S, B) batch_idx and (S,) lrs apply to every model: two identical models stay identical."""
    V, T, E, H, B = 11, 2, 5, 20, 8
    X, Y = make_data(V, T, 300, seed=9)
    one = init_params(V, T, E, H, seed=1)
    params = [torch.cat([p, p]).to(device) for p in one]
    batch_idx = torch.randint(0, 300, (30, B), generator=torch.Generator().manual_seed(1)).to(device)
    losses, out = run_op(params, X.to(device), Y.to(device), torch.full((30,), 0.2, device=device),
                         batch_idx=batch_idx, batch_size=B)
    assert torch.equal(losses[0], losses[1])
    for p in out:
        assert torch.equal(p[0], p[1])
    assert not torch.equal(out[1], params[1]), "the parameters must have been updated"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("loss_every", [1, 3, 7, 100])
def test_loss_every_reports_window_means(device, loss_every):
    V, T, E, H, B, S = 9, 3, 4, 16, 6, 20
    X, Y = make_data(V, T, 200, seed=10)
    X, Y = X.to(device), Y.to(device)
    params = [p.to(device) for p in init_params(V, T, E, H, seed=3)]
    lrs = torch.full((S,), 0.1, device=device)
    seeds = torch.tensor([4], device=device)
    per_step, _ = run_op(params, X, Y, lrs, seeds=seeds, batch_size=B, loss_every=1)
    windows, _ = run_op(params, X, Y, lrs, seeds=seeds, batch_size=B, loss_every=loss_every)
    expected = torch.stack([w.mean() for w in per_step[0].split(loss_every)])
    assert windows.shape == (1, math.ceil(S / loss_every))
    assert_close(windows[0], expected, rtol=1e-6, name="window means")


@pytest.mark.parametrize("device", DEVICES)
def test_zero_steps_is_a_no_op(device):
    params = [p.to(device) for p in init_params(5, 2, 3, 4, seed=0)]
    X, Y = make_data(5, 2, 10, seed=0)
    losses, out = run_op(params, X.to(device), Y.to(device), torch.empty(0, device=device),
                         seeds=torch.tensor([1], device=device), batch_size=4)
    assert losses.shape == (1, 0)
    for p, q in zip(params, out):
        assert torch.equal(p, q)


# ---- steppers -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
def test_persistent_stepper_interface(device):
    """run(start, lrs (n,) CPU) -> (n,) losses on the device, the model's own parameters updated in place, and
    consecutive runs equal one longer run."""
    V, T, E, H, B = 27, 3, 10, 200, 32
    X, Y = make_data(V, T, 2000, seed=12)
    X, Y = X.to(device), Y.to(device)
    a, b = CharMLP(V, T, E, H).to(device), CharMLP(V, T, E, H).to(device)
    ids = [id(p) for p in a.params()]
    sa = PersistentStepper(a, X, Y, B, seed=7)
    sb = PersistentStepper(b, X, Y, B, seed=7)
    lrs = lr_schedule(0.1, 30, 0.01, 0, 60)
    la = torch.cat([sa.run(0, lrs[:25]), sa.run(25, lrs[25:])])
    lb = sb.run(0, lrs)
    assert la.shape == (60,) and la.dtype == torch.float32 and la.device.type == torch.device(device).type
    assert torch.equal(la, lb)
    assert [id(p) for p in a.params()] == ids
    for p, q in zip(a.params(), b.params()):
        assert torch.equal(p, q)
    assert not torch.equal(a.C, CharMLP(V, T, E, H).to(device).C), "the model's parameters must be updated"
    assert la[-10:].mean() < la[:10].mean(), "training should lower the loss"


def test_not_differentiable_outside_no_grad():
    """Parameters that require grad are updated in place only under torch.no_grad(), as torch's in-place ops on
    leaves; the losses never carry a gradient function."""
    model = CharMLP(5, 2, 3, 8)
    X, Y = make_data(5, 2, 50, seed=1)
    params = [p.unsqueeze(0) for p in model.params()]
    kw = dict(seeds=torch.tensor([1]), batch_size=4)
    with pytest.raises(RuntimeError, match=re.escape("sgd_train updates C in place and is not differentiable")):
        ops.sgd_train(params, X, Y, torch.full((3,), 0.1), **kw)
    with torch.no_grad():
        losses = ops.sgd_train(params, X, Y, torch.full((3,), 0.1), **kw)
    assert losses.grad_fn is None and not losses.requires_grad


def test_persistent_stepper_bumps_parameter_versions():
    model = CharMLP(5, 2, 3, 8)
    X, Y = make_data(5, 2, 50, seed=1)
    stepper = PersistentStepper(model, X, Y, 4, seed=1)
    before = model.W1._version
    stepper.run(0, torch.full((3,), 0.1))
    assert model.W1._version > before


@pytest.mark.parametrize("device", DEVICES)
def test_graph_stepper_body_matches_persistent(device):
    """The body GraphStepper captures (fused_sgd_steps), run eagerly: same Philox minibatches, same update as the
    persistent op, step by step — so the graph and persistent implementations train alike."""
    if not ops.kernels_built(torch.device(device).type):
        pytest.skip(f"the fused model's kernels are not in this build for {device}")
    V, T, E, H, B = 27, 3, 10, 200, 32
    X, Y = make_data(V, T, 4000, seed=16)
    X, Y = X.to(device), Y.to(device)
    a, b = CharMLP(V, T, E, H, kernels="fused").to(device), CharMLP(V, T, E, H).to(device)
    lrs = lr_schedule(0.1, 40, 0.01, 0, 60).to(device)
    seeds = torch.tensor([9], device=device)
    step = torch.tensor(5, device=device)
    losses = torch.empty(60, device=device)
    fused_sgd_steps(a, X, Y, seeds, step, lrs[:25], losses[:25], B)
    fused_sgd_steps(a, X, Y, seeds, step, lrs[25:], losses[25:], B)
    assert step.item() == 65
    expected = PersistentStepper(b, X, Y, B, seed=9).run(5, lrs.cpu())
    assert_close(losses, expected, rtol=1e-4, name="losses")
    for name, p, q in zip(("C", "W1", "b1", "W2", "b2"), a.params(), b.params()):
        assert rel_error(p, q) <= 1e-4, name


@requires_cuda
def test_graph_and_persistent_steppers_sample_the_same_minibatches():
    """CUDA: the CUDA-graph stepper (fused ops) and the persistent kernel, same seed: same losses to float
    rounding, step by step."""
    if unsupported_reason("graph", "cuda") is not None:
        pytest.skip(unsupported_reason("graph", "cuda"))
    V, T, E, H, B = 27, 3, 10, 200, 32
    X, Y = make_data(V, T, 5000, seed=13)
    X, Y = X.cuda(), Y.cuda()
    a, b = CharMLP(V, T, E, H, kernels="fused").cuda(), CharMLP(V, T, E, H).cuda()
    lrs = lr_schedule(0.1, 150, 0.01, 0, 250)
    lg = torch.cat([GraphStepper(a, X, Y, B, seed=3, steps_per_graph=40).run(0, lrs[:130]),
                    GraphStepper(a, X, Y, B, seed=3, steps_per_graph=40).run(130, lrs[130:])])
    lp = PersistentStepper(b, X, Y, B, seed=3).run(0, lrs)
    assert_close(lg, lp, rtol=1e-3, name="graph vs persistent losses")
    for name, p, q in zip(("C", "W1", "b1", "W2", "b2"), a.params(), b.params()):
        assert rel_error(p, q) <= 1e-3, name


@pytest.mark.parametrize("device", CUDA_KERNEL_DEVICES)
@pytest.mark.parametrize("cluster_size", [1, 2, 4, 8])
def test_cuda_cluster_sizes_agree_with_cpu(device, cluster_size):
    """CUDA, every cluster size the device allows: 200 Philox steps at the seed's size agree with the CPU op."""
    reason, _ = ops.cuda_plan(27, 3, 10, 200, 32, cluster_size=cluster_size)
    if reason:
        pytest.skip(reason)
    V, T, E, H, B = SEED_SIZE.values()
    X, Y = make_data(V, T, 5000, seed=14)
    params = init_params(V, T, E, H, seed=15, M=2)
    lrs = torch.full((200,), 0.1)
    seeds = torch.tensor([1, 2])
    with cpu_kernels():
        cpu_losses, cpu = run_op(params, X, Y, lrs, seeds=seeds, batch_size=B)
    cuda_losses, cuda = run_op([p.to(device) for p in params], X.to(device), Y.to(device), lrs.to(device),
                               seeds=seeds.to(device), batch_size=B, cluster_size=cluster_size)
    assert_close(cuda_losses, cpu_losses, rtol=1e-3, name="losses")
    for name, p, q in zip(("C", "W1", "b1", "W2", "b2"), cuda, cpu):
        assert rel_error(p, q) <= 1e-3, name


# ---- plan and errors ------------------------------------------------------------------------------------------

H100 = dict(smem_per_block=227 * 1024, cc_major=9)
A100 = dict(smem_per_block=163 * 1024, cc_major=8)


def plan(V, T, E, H, B, smem_per_block, cc_major, cluster_size=0):
    return torch.ops.charmlp.sgd_train_cuda_plan(V, T, E, H, B, smem_per_block, cc_major, cluster_size)


def test_plan_seed_size():
    reason, (cluster, ks_logits, ks_dx, smem) = plan(27, 3, 10, 200, 32, **H100)
    assert reason == "" and cluster == 4 and smem <= 227 * 1024 and ks_logits >= 1 and ks_dx >= 1
    reason, (cluster, _, _, smem) = plan(27, 3, 10, 200, 32, **A100)
    assert reason == "" and cluster == 1 and smem <= 163 * 1024  # no clusters before Hopper
    reason, (cluster, *_) = plan(27, 3, 10, 200, 32, **H100, cluster_size=1)
    assert reason == "" and cluster == 1


@pytest.mark.parametrize("V,T,E,H,B,cluster", [
    (27, 3, 10, 200, 256, 8), (27, 8, 32, 512, 32, 8), (300, 3, 10, 200, 32, 4), (27, 3, 10, 1024, 32, 8),
    (27, 16, 16, 256, 32, 4), (5, 1, 2, 16, 4, 1),
])
def test_plan_splits_larger_models_over_a_cluster(V, T, E, H, B, cluster):
    reason, (got, _, _, smem) = plan(V, T, E, H, B, **H100)
    assert reason == "" and got == cluster and smem <= 227 * 1024


@pytest.mark.parametrize("sizes,device_kw,cluster,expect", [
    ((300, 16, 64, 1024, 4096), H100, 0, "KiB per block even split over 8 blocks, the device allows 227 KiB"),
    ((27, 16, 64, 1024, 32), H100, 0, "KiB per block even split over 8 blocks"),
    ((27, 3, 10, 200, 4096), A100, 0, "(and has no thread-block clusters)"),
    ((27, 3, 10, 200, 32), A100, 4, "needs thread-block clusters (compute capability 9.0+)"),
    ((27, 3, 10, 200, 32), dict(smem_per_block=48 * 1024, cc_major=7), 0, "compute capability 8.0 or newer"),
    ((27, 3, 10, 200, 32), H100, 16, "cluster_size must be 0 (auto), 1, 2, 4 or 8, got 16"),
    ((27, 3, 10, 200, 32), H100, 3, "cluster_size must be 0 (auto), 1, 2, 4 or 8, got 3"),
])
def test_plan_explains_unsupported_sizes(sizes, device_kw, cluster, expect):
    reason, plan_ = plan(*sizes, **device_kw, cluster_size=cluster)
    assert expect in reason and plan_ == [], reason


def test_unsupported_reason_of_the_steppers():
    assert unsupported_reason("persistent", "cpu", (27, 3, 10, 200, 32)) is None
    assert unsupported_reason("persistent", "cpu", (300, 16, 64, 1024, 4096)) is None  # the CPU loop takes all
    assert "device type 'meta'" in unsupported_reason("persistent", "meta", (27, 3, 10, 200, 32))
    assert unsupported_reason("graph", "cpu") == "CUDA graphs need a CUDA device"
    assert unsupported_reason("persistent", "cpu", (27, 3, 10, 200, 32), cluster_size=2) == \
        "cluster sizes are a CUDA setting"
    if not torch.cuda.is_available():
        assert unsupported_reason("persistent", "cuda", (27, 3, 10, 200, 32)) is not None
        with pytest.raises(ValueError, match="GraphStepper: CUDA graphs need a CUDA device"):
            GraphStepper(CharMLP(5, 2, 3, 4), *make_data(5, 2, 10, 0), 4, 0)


def _good_args(M=1, V=7, T=2, E=3, H=5, B=4, S=6, N=20):
    X, Y = make_data(V, T, N, seed=0)
    params = init_params(V, T, E, H, seed=0, M=M)
    return dict(C=params[0], W1=params[1], b1=params[2], W2=params[3], b2=params[4], X=X, Y=Y,
                lrs=torch.full((S,), 0.1), seeds=torch.arange(M), batch_idx=None, start_step=0, batch_size=B,
                loss_every=1, cluster_size=0)


def _call(**kw):
    return torch.ops.charmlp.sgd_train(*kw.values())


ERRORS = [
    (dict(C=lambda a: a["C"].double()), "C must be float32"),
    (dict(W1=lambda a: a["W1"].transpose(1, 2).contiguous().transpose(1, 2)), "W1 must be contiguous"),
    (dict(W1=lambda a: a["W1"][:, :-1].contiguous()), "W1.size(1) must equal X.size(1) * C.size(2)"),
    (dict(b1=lambda a: a["b1"][:, :-1].contiguous()), "b1.size(1) must equal W1.size(2)"),
    (dict(W2=lambda a: a["W2"][:, :, :-1].contiguous()), "W2.size(2) must equal C.size(1)"),
    (dict(b2=lambda a: a["b2"][0]), "b2 must be a 2-D tensor"),
    (dict(b2=lambda a: torch.cat([a["b2"], a["b2"]])), "b2.size(0) must equal C.size(0)"),
    (dict(X=lambda a: a["X"].float()), "X must be int64 or int32"),
    (dict(Y=lambda a: a["Y"].int()), "Y must have the dtype of X"),
    (dict(Y=lambda a: a["Y"][:-1]), "Y.size(0) must equal X.size(0)"),
    (dict(X=lambda a: a["X"][:0], Y=lambda a: a["Y"][:0]), "X must hold at least one training example"),
    (dict(lrs=lambda a: a["lrs"].double()), "lrs must be float32"),
    (dict(lrs=lambda a: a["lrs"].view(2, 3)), "lrs.size(0) must equal C.size(0)"),
    (dict(seeds=lambda a: None), "pass exactly one of seeds"),
    (dict(batch_idx=lambda a: torch.zeros(6, 4, dtype=torch.long)), "pass exactly one of seeds"),
    (dict(seeds=lambda a: a["seeds"].int()), "seeds must be int64"),
    (dict(seeds=lambda a: torch.arange(3)), "seeds.size(0) must equal C.size(0)"),
    (dict(seeds=lambda a: None, batch_idx=lambda a: torch.zeros(6, 5, dtype=torch.long)),
     "batch_idx.size(1) must equal batch_size"),
    (dict(seeds=lambda a: None, batch_idx=lambda a: torch.zeros(5, 4, dtype=torch.long)),
     "batch_idx.size(0) must equal lrs.size(-1)"),
    (dict(seeds=lambda a: None, batch_idx=lambda a: torch.full((6, 4), 20)), "is out of range for X with 20 rows"),
    (dict(batch_size=lambda a: 0), "batch_size must be >= 1"),
    (dict(loss_every=lambda a: 0), "loss_every must be >= 1"),
    (dict(start_step=lambda a: -1), "start_step must be >= 0"),
    (dict(cluster_size=lambda a: 9), "cluster_size must be 0 (auto), 1, 2, 4 or 8, got 9"),
    (dict(cluster_size=lambda a: 6), "cluster_size must be 0 (auto), 1, 2, 4 or 8, got 6"),
    (dict(X=lambda a: torch.full_like(a["X"], 7)), "is out of range for a vocabulary of 7"),
    (dict(Y=lambda a: torch.full_like(a["Y"], -1)), "is out of range for a vocabulary of 7"),
]


@pytest.mark.parametrize("change,message", ERRORS, ids=[m for _, m in ERRORS])
def test_argument_errors_name_the_argument(change, message):
    """Every bad argument gets a TORCH_CHECK that names it (and the size it should have)."""
    args = _good_args()
    _call(**{k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in args.items()})  # valid as is
    for k, f in change.items():
        args[k] = f(args)
    with pytest.raises(RuntimeError, match=re.escape(message)):
        _call(**args)


@pytest.mark.parametrize("args,message", [
    ((torch.tensor([1]).int(), torch.tensor(0), 2, 3, 10), "seeds must be int64"),
    ((torch.tensor([1]), torch.tensor([0, 1]), 2, 3, 10), "start_step must hold one element"),
    ((torch.tensor([1]), torch.tensor(0), 2, 3, 0), "num_rows"),
    ((torch.tensor([1]), torch.tensor(0), -1, 3, 10), "num_steps must be >= 0"),
])
def test_philox_minibatch_errors(args, message):
    with pytest.raises(RuntimeError, match=message):
        torch.ops.charmlp.philox_minibatch(*args)


def test_opcheck_cpu():
    args = _good_args(M=2)
    torch.library.opcheck(torch.ops.charmlp.sgd_train.default, tuple(args.values()))
    torch.library.opcheck(torch.ops.charmlp.philox_minibatch.default, (torch.tensor([3, 4]), torch.tensor(5), 7, 3, 100))


# ---- the seed's recipe ------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_seed_recipe_reaches_dev_loss_2_18(names_txt):
    """names.txt, 200,000 steps of batch 32, lr 0.1 then 0.01 from step 100,000, seed 2147483647: the persistent
    CPU implementation (one call per 10,000 steps, as the trainer's chunks) reaches dev loss <= 2.18."""
    from charmlp_fast.data import load_corpus

    corpus = load_corpus(names_txt, block_size=3)
    X, Y = corpus.splits["train"]
    model = CharMLP(len(corpus.vocab), 3, 10, 200)
    stepper = PersistentStepper(model, X, Y, batch_size=32, seed=reference.SEED)
    t0 = time.perf_counter()
    losses = [stepper.run(s, lr_schedule(0.1, 100_000, 0.01, s, 10_000)) for s in range(0, 200_000, 10_000)]
    elapsed = time.perf_counter() - t0
    with torch.no_grad():
        Xd, Yd = corpus.splits["dev"]
        _, dev = reference.forward(model.params(), Xd, Yd)
        Xt, Yt = corpus.splits["train"]
        _, train = reference.forward(model.params(), Xt, Yt)
    print(f"seed recipe, persistent CPU: {elapsed:.1f} s ({elapsed / 200_000 * 1e6:.1f} us/step), "
          f"train {train.item():.4f}, dev {dev.item():.4f}")
    assert torch.cat(losses).isfinite().all()
    assert dev.item() <= 2.18, dev.item()
    assert elapsed < 60, f"{elapsed:.1f} s"
