"""The Triton kernels of fused_code_ce against reference.py in float64: on a GPU, or on CPU tensors
under TRITON_INTERPRET=1 (slow, so a representative subset of the CPU grid)."""
import pytest
import torch

import gif_kernels
from tests.helpers.code_ce_cases import (MARGINS, check_against_reference, check_empty_batch,
                                        make_inputs, tiny_norm_inputs)
from gif_kernels.triton.code_ce import _deterministic_partials

pytestmark = pytest.mark.triton
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

SIZES = [(1, 1, 2, 1), (5, 3, 37, 130), (33, 3, 300, 8), (17, 2, 16, 24), (3, 1, 5000, 8),
         (64, 6, 16, 130), (64, 1, 5000, 130), (5, 6, 2, 8), (1, 3, 300, 1), (64, 3, 37, 1)]


BACKWARDS = pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "deterministic"])


@BACKWARDS
@pytest.mark.parametrize("shared", [True, False], ids=["shared_x", "per_position_x"])
@pytest.mark.parametrize("B,L,V,D", SIZES)
def test_shapes(B, L, V, D, shared, deterministic):
    margin = list(MARGINS)[(B + L + V + D) % len(MARGINS)]
    inputs = make_inputs(B, L, V, D, shared, torch.float32, DEVICE, seed=B * L * V * D)
    check_against_reference("triton", inputs, deterministic=deterministic, **MARGINS[margin])


@BACKWARDS
@pytest.mark.parametrize("margin", list(MARGINS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_dtypes_and_margins(dtype, margin, deterministic):
    inputs = make_inputs(9, 3, 37, 40, False, dtype, DEVICE, seed=21)
    check_against_reference("triton", inputs, deterministic=deterministic, **MARGINS[margin])


@BACKWARDS
def test_deterministic_follows_the_global_flag(deterministic, monkeypatch):
    """deterministic=None follows torch.use_deterministic_algorithms: the backward's kernels show it."""
    from gif_kernels.triton import code_ce
    called = []
    monkeypatch.setattr(code_ce, "_deterministic_partials",
                        lambda *a: called.append(True) or _deterministic_partials(*a))
    inputs = make_inputs(6, 2, 9, 8, True, torch.float32, DEVICE, seed=27)
    torch.use_deterministic_algorithms(deterministic)
    try:
        check_against_reference("triton", inputs, **MARGINS["cosface"])
    finally:
        torch.use_deterministic_algorithms(False)
    assert called == ([True] if deterministic else [])


@pytest.mark.parametrize("programs,items,expected", [(1, 10, (4, 3)), (3, 10, (2, 5)), (4, 10, (1, 10)),
                                                     (1, 2, (2, 1)), (100, 1, (1, 1)), (0, 7, (1, 7)),
                                                     (3, 0, (1, 1))])
def test_chunks_fill_the_grid_without_empty_chunks(programs, items, expected):
    from gif_kernels.triton.code_ce import _chunks
    assert _chunks(programs, items, torch.device("cpu")) == expected


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_reductions_int32_codes(reduction):
    inputs = make_inputs(7, 2, 16, 8, True, torch.float32, DEVICE, seed=22, codes_dtype=torch.int32)
    check_against_reference("triton", inputs, reduction=reduction, **MARGINS["both"])


def test_unnormalized():
    inputs = make_inputs(11, 2, 20, 16, False, torch.float32, DEVICE, seed=23)
    inputs["x"], inputs["weight"] = inputs["x"] * 0.25, inputs["weight"] * 0.25
    check_against_reference("triton", inputs, normalize=False, scale=2.0, m3=0.3)


def test_noncontiguous_inputs():
    inputs = make_inputs(6, 3, 16, 40, False, torch.float32, DEVICE, seed=24)
    inputs["x"] = inputs["x"][:, :, ::2]
    inputs["weight"] = inputs["weight"][:, :, ::2]
    check_against_reference("triton", inputs, **MARGINS["arcface"])


@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "deterministic"])
def test_opcheck(deterministic):
    inputs = make_inputs(5, 3, 7, 6, True, torch.float32, DEVICE, seed=25)
    args = (inputs["x"].requires_grad_(), inputs["weight"].requires_grad_(), inputs["codes"],
            inputs["position_weight"].float(), 16.0, 0.3, 0.2, True, -100, deterministic)
    torch.library.opcheck(torch.ops.gif.triton_code_ce_forward, args)
    loss, lse = torch.ops.gif.triton_code_ce_forward(*args)
    torch.library.opcheck(torch.ops.gif.triton_code_ce_backward,
                          (torch.randn_like(loss), args[0].detach(), args[1].detach(), *args[2:4],
                           lse.detach(), *args[4:]))


@pytest.mark.skipif(DEVICE != "cpu", reason="the value check runs on CPU tensors only")
def test_out_of_range_codes_raise_on_cpu():
    inputs = make_inputs(4, 2, 5, 8, True, torch.float32, seed=26)
    codes = inputs["codes"].clone()
    codes[2, 1] = 5
    with pytest.raises(ValueError, match="codes"):
        torch.ops.gif.triton_code_ce_forward(inputs["x"], inputs["weight"], codes, None, 64.0, 0.0,
                                             0.0, True, -100, False)


@BACKWARDS
@pytest.mark.parametrize("shared", [True, False], ids=["shared_x", "per_position_x"])
def test_rows_below_the_norm_eps(shared, deterministic):
    check_against_reference("triton", tiny_norm_inputs(shared, torch.float32, DEVICE), deterministic=deterministic,
                            rowwise=True, **MARGINS["both"])


def test_ignored_rows_have_no_margin_in_their_lse():
    inputs = make_inputs(8, 3, 16, 8, False, torch.float64, DEVICE, seed=6, ignore=False)
    codes = inputs["codes"].clone()
    codes[:, 1] = 7  # an ignore_index that is a token: those rows' lse is the plain logits'
    args = (inputs["x"], inputs["weight"], codes, None, 16.0, 0.3, 0.2, True, 7)
    _, lse = torch.ops.gif.triton_code_ce_forward(*args, False)
    torch.testing.assert_close(lse, gif_kernels.reference.code_ce_lse(*args[:3], *args[4:]))


@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
@BACKWARDS
def test_empty_batch(reduction, deterministic):
    check_empty_batch("triton", reduction, DEVICE, deterministic=deterministic)
