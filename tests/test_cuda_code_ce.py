"""fused_code_ce on CUDA tensors: every GPU backend against reference.py in float64 on the shape
grid, and sizes whose element offsets pass 2^31."""
import itertools

import pytest
import torch

import gif_kernels
from code_ce_cases import MARGINS, check_against_reference, make_inputs

pytestmark = pytest.mark.cuda


def gpu_backends():
    return ["auto", "triton"] + (["cuda"] if gif_kernels.ops.has_cuda_kernels() else [])


SIZES = list(itertools.product([1, 5, 64], [1, 3, 6], [2, 16, 37, 300, 5000], [1, 8, 130]))


@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shared", [True, False], ids=["shared_x", "per_position_x"])
@pytest.mark.parametrize("B,L,V,D", SIZES)
def test_shape_grid(B, L, V, D, shared, dtype, backend):
    if backend not in gpu_backends():
        pytest.skip(f"backend {backend!r} not built")
    margin = list(MARGINS)[(B + L + V + D) % len(MARGINS)]
    inputs = make_inputs(B, L, V, D, shared, dtype, "cuda", seed=B * L * V * D)
    check_against_reference(backend, inputs, **MARGINS[margin])


@pytest.mark.parametrize("backend", ["auto", "triton", "cuda"])
def test_auto_and_options(backend):
    if backend not in gpu_backends():
        pytest.skip(f"backend {backend!r} not built")
    inputs = make_inputs(33, 3, 37, 64, False, torch.float32, "cuda", seed=31)
    check_against_reference(backend, inputs, reduction="mean", **MARGINS["both"])
    inputs["x"], inputs["weight"] = inputs["x"] * 0.25, inputs["weight"] * 0.25
    check_against_reference(backend, inputs, normalize=False, scale=2.0, m3=0.3)


@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_offsets_past_2_31(backend):
    """L * V * D > 2^31 elements (4 GB of bf16 weights): must not fault and must match in float32."""
    if backend not in gpu_backends():
        pytest.skip(f"backend {backend!r} not built")
    B, L, V, D = 4, 2, (1 << 20) + 3, 1024
    gen = torch.Generator(device="cuda").manual_seed(32)
    x = torch.randn(B, D, device="cuda", dtype=torch.bfloat16, generator=gen).requires_grad_()
    weight = torch.randn(L, V, D, device="cuda", dtype=torch.bfloat16, generator=gen).requires_grad_()
    codes = torch.randint(0, V, (B, L), device="cuda", generator=gen)
    codes[0, 1] = V - 1  # a target in the last row, past 2^31 elements
    loss = gif_kernels.fused_code_ce(x, weight, codes, m3=0.4, reduction="none", backend=backend)
    loss.sum().backward()
    # Reference in float32, one position at a time to bound memory.
    for j in range(L):
        xr = x.detach().float().requires_grad_()
        wr = weight.detach()[j:j + 1].float().requires_grad_()
        expected = gif_kernels.fused_code_ce(xr, wr, codes[:, j:j + 1], m3=0.4, reduction="none",
                                             backend="reference")
        expected.sum().backward()
        torch.testing.assert_close(loss[:, j:j + 1].detach(), expected.detach(), rtol=1e-2, atol=1e-2)
        rows = torch.cat([codes[:, j], torch.tensor([0, V - 2, V - 1], device="cuda")])
        torch.testing.assert_close(weight.grad[j, rows].float(), wr.grad[0, rows], rtol=2e-2, atol=1e-3)
        del xr, wr, expected
    torch.cuda.synchronize()
