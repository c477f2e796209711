"""pytest-benchmark micro-benchmarks of fused_code_ce, forward and forward + backward, on every
backend of the machine and on the plain-PyTorch reference for comparison. Kept out of the default
test run (pyproject's testpaths is tests/):

    python -m pytest bench/ --benchmark-only
"""
import pytest
import torch

import gif_kernels

SHAPES = [(512, 6, 16, 512), (512, 3, 256, 512)]  # B, L, V, D: 16.7M identities either way
HAS_CUDA = torch.cuda.is_available()
NEEDS_CUDA = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
NEEDS_CUDA_KERNELS = pytest.mark.skipif(not (HAS_CUDA and gif_kernels.ops.has_cuda_kernels()),
                                        reason="needs a GPU and gif_kernels built with CUDA")
BACKENDS = [pytest.param("cpu", "reference", id="cpu-reference"), pytest.param("cpu", "cpu", id="cpu-cpu"),
            pytest.param("cuda", "reference", id="cuda-reference", marks=NEEDS_CUDA),
            pytest.param("cuda", "triton", id="cuda-triton", marks=NEEDS_CUDA),
            pytest.param("cuda", "cuda", id="cuda-cuda", marks=NEEDS_CUDA_KERNELS)]


def code_head_inputs(B, L, V, D, device):
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(B, D, generator=gen).to(device, dtype).requires_grad_()
    weight = torch.randn(L, V, D, generator=gen).to(device, dtype).requires_grad_()
    codes = torch.randint(0, V, (B, L), generator=gen).to(device)
    return x, weight, codes


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("B,L,V,D", SHAPES, ids=lambda value: str(value))
@pytest.mark.parametrize("backward", [False, True], ids=["forward", "forward_backward"])
def test_fused_code_ce(benchmark, B, L, V, D, device, backend, backward):
    benchmark.group = f"fused_code_ce {B}x{L}x{V}x{D} {'fwd+bwd' if backward else 'fwd'}"
    x, weight, codes = code_head_inputs(B, L, V, D, device)

    def step():
        with torch.set_grad_enabled(backward):
            loss = gif_kernels.fused_code_ce(x, weight, codes, m3=0.4, backend=backend)
            if backward:
                torch.autograd.grad(loss, (x, weight))
        if device == "cuda":
            torch.cuda.synchronize()
        return loss

    assert torch.isfinite(benchmark(step))
