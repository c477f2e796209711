"""The CUDA C++ sources run on the CPU under tests/cuda_emulation (one fiber per CUDA thread; see its
header for what it models): their host code and kernels against reference.py in float64 and the C++
CPU kernels, on machines without a GPU. The GPU runs the same sources through tests/test_cuda_*.py."""
import pytest
import torch

from tests.helpers import emulated_cuda
from tests.helpers.beam_search_cases import random_codebook
from tests.helpers.code_ce_cases import (CUDA_BOUNDARIES, MARGINS, check_against_reference,
                                        make_inputs, tiny_norm_inputs)
from gif_kernels import reference


@pytest.fixture(scope="module")
def ops():
    return emulated_cuda.load()


def emulated_code_ce(ops):
    """fused_code_ce through the emulated CUDA ops, as gif_kernels.fused_code_ce calls them: for reduction
    "mean" / "sum" with inputs that require grad the forward computes the gradients, else the forward
    and backward ops."""
    class CodeCEWithGrad(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, weight, codes, position_weight, *args):
            ctx.output_mask = ctx.needs_input_grad[:2]
            loss, grad_x, grad_weight = ops.code_ce_forward_grad(x, weight, codes, position_weight, *args,
                                                                 list(ctx.output_mask))
            ctx.save_for_backward(grad_x, grad_weight)
            return loss

        @staticmethod
        def backward(ctx, grad_loss):
            grads = (g * grad_loss if wanted else None for g, wanted in zip(ctx.saved_tensors, ctx.output_mask))
            return (*grads,) + (None,) * 8

    class CodeCE(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, weight, codes, position_weight, *args):
            rows, lse = ops.code_ce_forward(x, weight, codes, position_weight, *args)
            ctx.save_for_backward(x, weight, codes, position_weight, lse)
            ctx.args = args
            return rows

        @staticmethod
        def backward(ctx, grad_rows):
            x, weight, codes, position_weight, lse = ctx.saved_tensors
            grad_x, grad_weight = ops.code_ce_backward(grad_rows, x, weight, codes, position_weight, lse,
                                                       *ctx.args)
            return (grad_x, grad_weight) + (None,) * (2 + len(ctx.args))

    def loss(x, weight, codes, position_weight, scale=64.0, m2=0.0, m3=0.0, normalize=True,
             ignore_index=-100, reduction="mean"):
        args = (x, weight, codes, position_weight, scale, m2, m3, normalize, ignore_index)
        if reduction != "none" and (x.requires_grad or weight.requires_grad):
            return CodeCEWithGrad.apply(*args, reduction)
        return reference.reduce_loss(CodeCE.apply(*args), reduction)

    return loss


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64],
                         ids=["fp32", "bf16", "fp16", "fp64"])
@pytest.mark.parametrize("shared", [True, False], ids=["shared_x", "per_position_x"])
@pytest.mark.parametrize("B,L,V,D", CUDA_BOUNDARIES)
def test_code_ce_kernel_boundaries(ops, B, L, V, D, shared, dtype):
    inputs = make_inputs(B, L, V, D, shared, dtype, seed=B + L + V + D)
    check_against_reference(emulated_code_ce(ops), inputs, **MARGINS["both"])


@pytest.mark.parametrize("learn", [("x", "weight"), ("x",), ("weight",)], ids="+".join)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("B,L,V,D", CUDA_BOUNDARIES)
def test_code_ce_gradients_in_forward(ops, B, L, V, D, dtype, learn):
    inputs = make_inputs(B, L, V, D, (B + D) % 2 == 0, dtype, seed=B * V + D)
    check_against_reference(emulated_code_ce(ops), inputs, reduction="mean" if V % 2 else "sum", learn=learn,
                            **MARGINS["both"])


@pytest.mark.parametrize("margin", list(MARGINS))
@pytest.mark.parametrize("B,L,V,D", [(1, 1, 2, 1), (5, 3, 16, 8), (4, 6, 37, 130), (6, 2, 300, 40)])
def test_code_ce_small_shapes_and_margins(ops, B, L, V, D, margin):
    inputs = make_inputs(B, L, V, D, (B + V) % 2 == 0, torch.float32, seed=B * L * V * D)
    check_against_reference(emulated_code_ce(ops), inputs, **MARGINS[margin])


@pytest.fixture
def float32_output_gemms():
    """CPU kernels for aten::mm.dtype and aten::bmm.dtype (16-bit operands, float32 output), which the CPU
    lacks and CUDA has: with them the GEMM driver takes the branch it takes on CUDA, 16-bit operands with
    gradient factors split in high and low halves."""
    library = torch.library.Library("aten", "IMPL")
    for name, product in (("mm.dtype", torch.mm), ("bmm.dtype", torch.bmm)):
        library.impl(name, lambda a, b, out_dtype, product=product: product(a.float(), b.float()).to(out_dtype),
                     "CPU")
    yield
    library._destroy()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("B,L,V,D,shared", [(9, 2, 300, 40, True), (6, 3, 70, 24, False), (5, 1, 5000, 16, True)])
@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_code_ce_gemm_path_on_16bit_operands(ops, float32_output_gemms, B, L, V, D, shared, dtype, reduction):
    inputs = make_inputs(B, L, V, D, shared, dtype, seed=B + V)
    check_against_reference(emulated_code_ce(ops), inputs, reduction=reduction, **MARGINS["both"])


@pytest.mark.parametrize("V", [37, 300])
def test_code_ce_reductions_and_raw_dots(ops, V):
    inputs = make_inputs(33, 3, V, 64, False, torch.float32, seed=31)
    check_against_reference(emulated_code_ce(ops), inputs, reduction="mean", **MARGINS["both"])
    inputs["x"], inputs["weight"] = inputs["x"] * 0.25, inputs["weight"] * 0.25
    check_against_reference(emulated_code_ce(ops), inputs, reduction="sum", normalize=False, scale=2.0, m3=0.3)


@pytest.mark.parametrize("V", [5, 70], ids=["small_v", "gemm"])
@pytest.mark.parametrize("shared", [True, False], ids=["shared_x", "per_position_x"])
def test_code_ce_rows_below_the_norm_eps(ops, V, shared):
    check_against_reference(emulated_code_ce(ops), tiny_norm_inputs(shared, torch.float32, V=V), rowwise=True,
                            **MARGINS["both"])


def test_code_ce_gemm_path_over_several_blocks(ops):
    """B * L * V past the CUDA GEMM path's block of 2^26 cosines."""
    inputs = make_inputs(1030, 1, 65600, 4, True, torch.float32, seed=34, arcface_fallback=False)
    check_against_reference(emulated_code_ce(ops), inputs, reduction="sum", m3=0.4)


@pytest.mark.parametrize("V", [16, 300])
def test_out_of_range_codes_give_nan_rows(ops, V):
    """The CUDA host code cannot check codes without a host sync: a bad code's row is NaN, the rest exact."""
    inputs = make_inputs(4, 2, V, 8, True, torch.float32, seed=V, ignore=False)
    inputs["codes"][1, 0], inputs["codes"][2, 1] = V, -7
    rows, lse = ops.code_ce_forward(inputs["x"], inputs["weight"], inputs["codes"], None, 64.0, 0.0, 0.4, True,
                                    -100)
    assert rows[1, 0].isnan() and rows[2, 1].isnan() and rows[0].isfinite().all() and rows[3].isfinite().all()
    grad_x, grad_weight = ops.code_ce_backward(torch.ones_like(rows), inputs["x"], inputs["weight"],
                                               inputs["codes"], None, lse, 64.0, 0.0, 0.4, True, -100)
    assert grad_x[0].isfinite().all() and grad_x[1].isnan().any()


def in_both_orders(monkeypatch, run):
    """run() with the emulated threads in ascending, then descending order between barriers."""
    results = []
    for order in ("ascending", "descending"):
        monkeypatch.setenv("GIF_EMULATED_CUDA_ORDER", order)
        results.append(run())
    return results


@pytest.mark.parametrize("B,L,V,D,shared", [(9, 3, 16, 300, True), (6, 4, 37, 40, False), (5, 2, 300, 24, True)])
def test_code_ce_kernels_have_no_races(ops, monkeypatch, B, L, V, D, shared):
    """The kernels have no atomics: the same bits whatever the order of threads between barriers."""
    inputs = make_inputs(B, L, V, D, shared, torch.bfloat16, seed=B + V)
    args = (inputs["x"], inputs["weight"], inputs["codes"], inputs["position_weight"])
    margins = (64.0, 0.3, 0.2, True, -100)

    def run():
        rows, lse = ops.code_ce_forward(*args, *margins)
        return (rows, lse, *ops.code_ce_backward(inputs["grad_rows"].float(), *args, lse, *margins))

    for first, second in zip(*in_both_orders(monkeypatch, run)):
        assert torch.equal(first, second)


@pytest.mark.parametrize("num_ids,vocab,length,beam,topk", [
    (1, 3, 2, 2, 1), (7, 4, 2, 5, 5), (50, 4, 3, 4, 2), (2000, 16, 4, 32, 5), (3000, 700, 2, 64, 5),
    (500, 2, 12, 8, 3), (4000, 16, 4, 256, 10)])
def test_beam_search_matches_the_cpp_kernel(ops, num_ids, vocab, length, beam, topk):
    """The same bits as the C++ CPU kernel for float32 scores, ties included."""
    book, gen = random_codebook(num_ids, vocab, length, seed=num_ids + beam)
    scores = torch.randn(5, length, vocab, generator=gen).log_softmax(-1)
    scores[:2] = (scores[:2] * 2).round() / 2  # ties
    trie = book.trie()
    arrays = (trie.child_offsets, trie.child_tokens, trie.leaf_ids)
    expected = torch.ops.gif.code_beam_search(scores, *arrays, beam, topk)
    got = ops.code_beam_search(scores, *arrays, beam, topk)
    for name, e, g in zip(("ids", "total", "exact"), expected, got):
        assert torch.equal(e, g), f"{name}: {g} != {e}"


def test_beam_search_low_precision_and_beam_limit(ops):
    book, gen = random_codebook(300, 8, 3, seed=5)
    trie = book.trie()
    arrays = (trie.child_offsets, trie.child_tokens, trie.leaf_ids)
    scores = torch.randn(3, 3, 8, generator=gen).log_softmax(-1).to(torch.bfloat16)
    expected = torch.ops.gif.code_beam_search(scores, *arrays, 4, 3)
    for e, g in zip(expected, ops.code_beam_search(scores, *arrays, 4, 3)):
        assert torch.equal(e, g)
    with pytest.raises(ValueError, match="beam: the CUDA kernel takes beam <= 256"):
        ops.code_beam_search(scores, *arrays, 257, 3)


def test_beam_search_kernel_has_no_races(ops, monkeypatch):
    book, gen = random_codebook(3000, 16, 4, seed=9)
    trie = book.trie()
    scores = (torch.randn(3, 4, 16, generator=gen).log_softmax(-1) * 2).round() / 2  # ties
    arrays = (trie.child_offsets, trie.child_tokens, trie.leaf_ids)
    first, second = in_both_orders(monkeypatch, lambda: ops.code_beam_search(scores, *arrays, 64, 5))
    for a, b in zip(first, second):
        assert torch.equal(a, b)


# Block 0 writes its static shared memory, block 1 only reads it.
STATIC_SHARED_KERNEL = r"""
#include <ATen/ATen.h>
#include <torch/library.h>

__global__ void read_static_shared_kernel(float* floats, int64_t* ints) {
  __shared__ float value[2];
  __shared__ int64_t count;
  if (blockIdx.x == 0) {
    value[threadIdx.x] = 1.0f + threadIdx.x;
    if (threadIdx.x == 0) count = 3;
  }
  __syncthreads();
  floats[blockIdx.x * 2 + threadIdx.x] = value[threadIdx.x];
  ints[blockIdx.x * 2 + threadIdx.x] = count;
}

std::tuple<at::Tensor, at::Tensor> read_static_shared() {
  at::Tensor floats = at::empty({2, 2}, at::kFloat), ints = at::empty({2, 2}, at::kLong);
  read_static_shared_kernel<<<2, 2>>>(floats.data_ptr<float>(), ints.data_ptr<int64_t>());
  return {floats, ints};
}

TORCH_LIBRARY_IMPL(gif, CUDA, m) { m.impl("read_static_shared", &read_static_shared); }
"""


def test_static_shared_memory_starts_each_block_poisoned(monkeypatch):
    """As dynamic shared memory: a block reads 0xFF bytes where it wrote nothing, not the last block's values."""
    ops = emulated_cuda.load_test_kernel("gif_emulated_static_shared", STATIC_SHARED_KERNEL)
    for floats, ints in in_both_orders(monkeypatch, ops.read_static_shared):
        assert floats[0].tolist() == [1.0, 2.0] and ints[0].tolist() == [3, 3]
        assert floats[1].isnan().all() and ints[1].tolist() == [-1, -1]
