"""Inputs and the float64 comparison shared by the fused_code_ce tests of every backend."""
import itertools
import math

import torch

import gif_kernels
from gif_kernels import reference
from gif_kernels.constants import NORM_EPS

# Largest error allowed, relative to the largest magnitude of the float64 reference. Gradients
# cancel terms of size `scale` (64) down to O(1), so float32 rounding alone reaches ~1e-5 at large V.
TOLERANCE = {torch.float64: 1e-10, torch.float32: 2e-5, torch.bfloat16: 1e-2, torch.float16: 1e-2}

# The shape grid every backend is checked on.
SIZES = list(itertools.product([1, 5, 64], [1, 3, 6], [2, 16, 37, 300, 5000], [1, 8, 130]))

# The CUDA kernels' boundaries: V = 64 / 65 and L * V = 1024 / 1088 (small-V kernel or GEMM path),
# D past one 256-element chunk, aligned (16-byte loads) or not, B not a multiple of 4.
CUDA_BOUNDARIES = [(7, 1, 64, 520), (7, 1, 65, 520), (9, 16, 64, 24), (9, 17, 64, 24), (130, 2, 5, 1024),
                   (3, 8, 20, 1001), (33, 4, 33, 256)]

MARGINS = {
    "none": dict(),
    "cosface": dict(m3=0.4),
    "arcface": dict(m2=0.5),
    "both": dict(m2=0.3, m3=0.2),
}


def make_inputs(B, L, V, D, shared, dtype, device="cpu", seed=0, ignore=True, codes_dtype=torch.int64,
                arcface_fallback=True):
    """Random inputs of the given sizes; a few targets sit where theta + m2 > pi (ArcFace fallback)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn((B, D) if shared else (B, L, D), generator=gen, dtype=torch.float64)
    weight = torch.randn(L, V, D, generator=gen, dtype=torch.float64)
    codes = torch.randint(0, V, (B, L), generator=gen)
    if arcface_fallback and D > 1:
        # Sample 0's target row points away from its feature: cos ~ -1 < -cos(m2).
        for j in range(L):
            feat = x[0] if shared else x[0, j]
            weight[j, codes[0, j]] = -feat + 0.05 * torch.randn(D, generator=gen, dtype=torch.float64)
    if ignore and B * L > 1:
        codes.view(-1)[torch.randperm(B * L, generator=gen)[: max(1, B * L // 7)]] = -100
    position_weight = 0.5 + torch.rand(L, generator=gen, dtype=torch.float64)
    grad_rows = torch.randn(B, L, generator=gen, dtype=torch.float64)
    return dict(x=x.to(device, dtype), weight=weight.to(device, dtype),
                codes=codes.to(device, codes_dtype), position_weight=position_weight.to(device),
                grad_rows=grad_rows.to(device))


def assert_close(actual, expected, dtype, what, floor=1.0):
    expected = expected.double().cpu()
    actual = actual.double().cpu()
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert torch.isfinite(actual).all(), f"{what}: non-finite values"
    err = (actual - expected).abs().max().item() if expected.numel() else 0.0
    size = max(expected.abs().max().item() if expected.numel() else 0.0, floor)
    assert err <= TOLERANCE[dtype] * size, f"{what}: max error {err:.3g} vs max magnitude {size:.3g}"


LEARNABLE = ("x", "weight", "position_weight")


def check_against_reference(backend, inputs, reduction="none", deterministic=None, rowwise=False, learn=None,
                            **kwargs):
    """Loss and the gradients of the inputs named in `learn` (of LEARNABLE; default: all three for a
    backend name, x and weight for a function) of `backend` against autograd of reference.py in float64.
    backend: a backend name of gif_kernels.fused_code_ce, or a function with its arguments (x, weight,
    codes, position_weight, reduction=..., **kwargs). rowwise: each row against its own magnitude (rows
    below the norm eps have gradients ~1/eps times the others')."""
    def compare(actual, expected, dtype, what, floor=1.0):
        if not rowwise:
            return assert_close(actual, expected, dtype, what, floor)
        for row, (a, b) in enumerate(zip(actual.reshape(-1, actual.shape[-1]),
                                         expected.reshape(-1, expected.shape[-1]))):
            assert_close(a, b, dtype, f"{what} row {row}", floor)
    if learn is None:
        learn = ("x", "weight") if callable(backend) else LEARNABLE
    assert set(learn) <= set(LEARNABLE), learn
    tensors = {name: inputs[name].detach().requires_grad_(name in learn) for name in LEARNABLE}
    x, weight, pw = (tensors[name] for name in LEARNABLE)
    if callable(backend):
        loss = backend(x, weight, inputs["codes"], pw, reduction=reduction, **kwargs)
    else:
        loss = gif_kernels.fused_code_ce(x, weight, inputs["codes"], pw, reduction=reduction,
                                         backend=backend, deterministic=deterministic, **kwargs)
    tensors64 = {name: inputs[name].detach().double().cpu().requires_grad_(name in learn) for name in LEARNABLE}
    expected = reference.fused_code_ce(*(tensors64[name] for name in ("x", "weight")), inputs["codes"].cpu(),
                                       tensors64["position_weight"], reduction=reduction, **kwargs)
    dtype = inputs["x"].dtype
    assert loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    compare(loss.detach(), expected.detach(), dtype, "loss")
    if not learn:
        assert not loss.requires_grad
        return
    upstream = inputs["grad_rows"] if reduction == "none" else torch.tensor(1.7, dtype=torch.float64)
    grads = dict(zip(learn, torch.autograd.grad(loss, [tensors[name] for name in learn],
                                                upstream.to(loss.device, loss.dtype))))
    ref_grads = dict(zip(learn, torch.autograd.grad(expected, [tensors64[name] for name in learn], upstream.cpu())))
    if "position_weight" in grads:  # d loss / d position_weight_j sums CE_bj: as accurate as the loss
        assert grads["position_weight"].dtype == pw.dtype
        compare(grads["position_weight"], ref_grads["position_weight"], dtype, "grad_position_weight")
    # With D = 1 a normalized vector has no tangent direction: the exact gradients are 0 and what
    # remains is rounding of cancelled terms, each up to scale * |upstream| * L * lambda / |x|, in sums
    # over V tokens whose rounding grows with V.
    floor = 1.0
    L, V, D = inputs["weight"].shape
    if D == 1 and kwargs.get("normalize", True):
        floor = (kwargs.get("scale", 64.0) * upstream.abs().max().item() * L * pw.max().item()
                 * max(1.0, V / 1000) / inputs["x"].abs().clamp_min(NORM_EPS).min().item())
    for name in ("x", "weight"):
        if name in grads:
            assert grads[name].dtype == dtype
            compare(grads[name], ref_grads[name], dtype, f"grad_{name}", floor)


def arcface_fallback_hit(inputs, m2):
    """True when some target cosine lies in the ArcFace fallback region (theta + m2 > pi)."""
    x = inputs["x"].double().cpu()
    w = inputs["weight"].double().cpu()
    L = w.shape[0]
    feats = x.unsqueeze(1).expand(-1, L, -1) if x.dim() == 2 else x
    cos = torch.einsum("bld,lvd->blv", torch.nn.functional.normalize(feats, dim=-1),
                       torch.nn.functional.normalize(w, dim=-1))
    codes = inputs["codes"].cpu().long()
    valid = codes >= 0
    target = cos.gather(-1, codes.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    return bool((target[valid] < -math.cos(m2)).any())


def op_samples(device):
    """Arguments of the per-row forward ops: shared and per-position features, two dtypes, with
    and without normalization."""
    inputs = make_inputs(5, 3, 7, 6, True, torch.float32, device, seed=11)
    per_position = make_inputs(4, 2, 9, 5, False, torch.float64, device, seed=12)
    for case in (inputs, per_position):
        yield (case["x"], case["weight"], case["codes"], case["position_weight"], 16.0, 0.3, 0.2,
               True, -100)
    yield (inputs["x"], inputs["weight"], inputs["codes"], None, 2.0, 0.0, 0.1, False, -100)


def opcheck_family(family, args):
    """torch.library.opcheck of one kernel family's forward and backward ops."""
    forward = getattr(torch.ops.gif, f"{family}_forward")
    backward = getattr(torch.ops.gif, f"{family}_backward")
    x, weight = args[0].requires_grad_(), args[1].requires_grad_()
    torch.library.opcheck(forward, args)
    loss, lse = forward(*args)
    grad = torch.randn_like(loss)
    torch.library.opcheck(backward, (grad, x.detach(), weight.detach(), *args[2:4], lse.detach(), *args[4:]))


def tiny_norm_inputs(shared, dtype, device="cpu", V=5):
    """Inputs with a zero feature row and weight row and rows whose norm lies below NORM_EPS, where the
    normalization is a division by the constant eps and removes no component along the vector."""
    inputs = make_inputs(4, 2, V, 6, shared, torch.float64, seed=21, ignore=False)
    x, weight = inputs["x"], inputs["weight"]
    x[1] = 0
    x[2] *= 0.3 * NORM_EPS / x[2].norm(dim=-1, keepdim=True)
    weight[0, 1] = 0
    weight[1, 2] *= 0.4 * NORM_EPS / weight[1, 2].norm()
    return {**inputs, "x": x.to(device, dtype), "weight": weight.to(device, dtype)}


def check_empty_batch(backend, reduction, device="cpu", **kwargs):
    """B = 0: an empty (0, L) loss, "sum" 0 and "mean" NaN (0 / 0, as F.cross_entropy of an empty batch),
    and zero gradients of the right shapes for weight and position_weight (learned or fixed: the C++
    backends' two gradient paths)."""
    for x_shape, learn_pw in itertools.product(((0, 6), (0, 3, 6)), (True, False)):
        x = torch.randn(x_shape, device=device, requires_grad=True)
        weight = torch.randn(3, 5, 6, device=device, requires_grad=True)
        pw = torch.rand(3, device=device, requires_grad=learn_pw)
        codes = torch.zeros(0, 3, dtype=torch.int64, device=device)
        loss = gif_kernels.fused_code_ce(x, weight, codes, pw, reduction=reduction, backend=backend, **kwargs)
        expected = {"none": torch.zeros(0, 3), "sum": torch.tensor(0.0), "mean": torch.tensor(float("nan"))}
        torch.testing.assert_close(loss.detach().cpu(), expected[reduction], equal_nan=True)
        loss.sum().backward()
        assert x.grad.shape == x_shape
        assert torch.equal(weight.grad, torch.zeros_like(weight))
        assert not learn_pw or torch.equal(pw.grad, torch.zeros_like(pw))
