"""fused_code_ce on CUDA tensors: every GPU backend against reference.py in float64 on the shape
grid, the CUDA kernels' path boundaries, reproducibility, opcheck, and sizes whose element offsets
pass 2^31. Needs a GPU; bench/device_check.sh runs these."""
import pytest
import torch

import gif_kernels
from tests.helpers.code_ce_cases import (CUDA_BOUNDARIES, MARGINS, SIZES, check_against_reference, make_inputs, op_samples,
                           opcheck_family)

pytestmark = pytest.mark.cuda


def gpu_backends():
    return ["auto", "triton"] + (["cuda"] if gif_kernels.ops.has_cuda_kernels() else [])


def needs(backend):
    if backend not in gpu_backends():
        pytest.skip(f"backend {backend!r} not built")


@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shared", [True, False], ids=["shared_x", "per_position_x"])
@pytest.mark.parametrize("B,L,V,D", SIZES)
def test_shape_grid(B, L, V, D, shared, dtype, backend):
    needs(backend)
    margin = list(MARGINS)[(B + L + V + D) % len(MARGINS)]
    inputs = make_inputs(B, L, V, D, shared, dtype, "cuda", seed=B * L * V * D)
    check_against_reference(backend, inputs, **MARGINS[margin])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64],
                         ids=["fp32", "bf16", "fp16", "fp64"])
@pytest.mark.parametrize("shared", [True, False], ids=["shared_x", "per_position_x"])
@pytest.mark.parametrize("B,L,V,D", CUDA_BOUNDARIES)
def test_cuda_kernel_boundaries(B, L, V, D, shared, dtype):
    needs("cuda")
    inputs = make_inputs(B, L, V, D, shared, dtype, "cuda", seed=B + L + V + D)
    check_against_reference("cuda", inputs, **MARGINS["both"])


@pytest.mark.parametrize("backend", ["auto", "triton", "cuda"])
def test_auto_and_options(backend):
    needs(backend)
    inputs = make_inputs(33, 3, 37, 64, False, torch.float32, "cuda", seed=31)
    check_against_reference(backend, inputs, reduction="mean", **MARGINS["both"])
    inputs["x"], inputs["weight"] = inputs["x"] * 0.25, inputs["weight"] * 0.25
    check_against_reference(backend, inputs, normalize=False, scale=2.0, m3=0.3)


def test_auto_follows_the_table():
    pick = gif_kernels.ops.resolve_backend
    cuda = gif_kernels.ops.has_cuda_kernels()
    device = torch.device("cuda")
    for V, expected in ((16, "cuda"), (64, "triton"), (4096, "cuda")):
        assert pick("auto", device, V, False) == (expected if cuda else "triton")
    if cuda:
        assert pick("auto", device, 64, True) == "cuda"  # deterministic


@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("B,L,V,D", [(512, 6, 16, 512), (300, 2, 1000, 64), (2000, 2, 4096, 512)])
def test_deterministic_gradients_are_bitwise_equal(B, L, V, D, backend):
    needs(backend)
    inputs = make_inputs(B, L, V, D, True, torch.bfloat16, "cuda", seed=33)
    grads = []
    for _ in range(3):
        x = inputs["x"].detach().requires_grad_()
        w = inputs["weight"].detach().requires_grad_()
        gif_kernels.fused_code_ce(x, w, inputs["codes"], m3=0.4, backend=backend, deterministic=True).backward()
        grads.append((x.grad, w.grad))
    for grad_x, grad_w in grads[1:]:
        assert torch.equal(grad_x, grads[0][0]) and torch.equal(grad_w, grads[0][1])


def test_gemm_path_over_several_blocks():
    """B * L * V past the CUDA GEMM path's block of 2^26 cosines, against float64 on the GPU."""
    needs("cuda")
    inputs = make_inputs(1030, 1, 65600, 16, True, torch.float32, "cuda", seed=34, arcface_fallback=False)
    x = inputs["x"].detach().requires_grad_()
    w = inputs["weight"].detach().requires_grad_()
    loss = gif_kernels.fused_code_ce(x, w, inputs["codes"], m3=0.4, reduction="sum", backend="cuda")
    loss.backward()
    x64 = inputs["x"].detach().double().requires_grad_()
    w64 = inputs["weight"].detach().double().requires_grad_()
    expected = gif_kernels.fused_code_ce(x64, w64, inputs["codes"], m3=0.4, reduction="sum",
                                         backend="reference")
    expected.backward()
    torch.testing.assert_close(loss.double(), expected, rtol=2e-5, atol=0)
    for grad, ref in ((x.grad, x64.grad), (w.grad, w64.grad)):
        assert (grad.double() - ref).abs().max() <= 2e-5 * max(ref.abs().max().item(), 1.0)


@pytest.mark.parametrize("family", ["code_ce", "triton_code_ce"])
@pytest.mark.parametrize("sample", list(range(3)))
def test_opcheck_on_cuda(family, sample):
    if family == "code_ce":
        needs("cuda")
    opcheck_family(family, list(op_samples("cuda"))[sample])


def test_out_of_range_codes_give_nan_not_a_fault():
    """On CUDA a bad code cannot raise without a host sync: its row's loss is NaN, nothing faults."""
    for backend in gpu_backends():
        if backend == "auto":
            continue
        for V in (16, 300):
            x = torch.randn(4, 8, device="cuda", requires_grad=True)
            w = torch.randn(2, V, 8, device="cuda", requires_grad=True)
            codes = torch.randint(0, V, (4, 2), device="cuda")
            codes[1, 0], codes[2, 1] = V, -7
            loss = gif_kernels.fused_code_ce(x, w, codes, reduction="none", backend=backend)
            loss.sum().backward()
            torch.cuda.synchronize()
            assert loss[1, 0].isnan() and loss[2, 1].isnan() and loss[0].isfinite().all(), backend


def test_sanitizer_cases():
    """Small cases through every GPU kernel; bench/device_check.sh runs this under compute-sanitizer."""
    for backend, deterministic in [(b, False) for b in gpu_backends()[1:]] + [("triton", True)]:
        for B, L, V, D, shared in [(5, 3, 16, 40, True), (6, 2, 7, 300, False), (3, 2, 70, 24, True),
                                   (4, 3, 70, 8, False), (70, 2, 9, 130, True)]:
            inputs = make_inputs(B, L, V, D, shared, torch.bfloat16, "cuda", seed=B + V)
            check_against_reference(backend, inputs, deterministic=deterministic, **MARGINS["both"])


@pytest.mark.parametrize("backend", ["triton", "triton-det", "cuda"])
def test_offsets_past_2_31(backend):
    """L * V * D > 2^31 elements (4 GB of bf16 weights): must not fault and must match in float32."""
    backend, _, deterministic = backend.partition("-")
    needs(backend)
    B, L, V, D = 4, 2, (1 << 20) + 3, 1024
    gen = torch.Generator(device="cuda").manual_seed(32)
    x = torch.randn(B, D, device="cuda", dtype=torch.bfloat16, generator=gen).requires_grad_()
    weight = torch.randn(L, V, D, device="cuda", dtype=torch.bfloat16, generator=gen).requires_grad_()
    codes = torch.randint(0, V, (B, L), device="cuda", generator=gen)
    codes[0, 1] = V - 1  # a target in the last row, past 2^31 elements
    loss = gif_kernels.fused_code_ce(x, weight, codes, m3=0.4, reduction="none", backend=backend,
                                     deterministic=bool(deterministic))
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
