"""fused_code_ce on the CPU backend (C++ kernels) against reference.py in float64, plus the op's
registration (opcheck, gradcheck, torch.compile) and its input checks."""
import os
import platform
import subprocess
import sys

import pytest
import torch

import gif_kernels
from tests.helpers.code_ce_cases import (MARGINS, SIZES, arcface_fallback_hit, check_against_reference,
                                        check_empty_batch, make_inputs, op_samples,
                                        opcheck_family, tiny_norm_inputs)


@pytest.mark.parametrize("shared", [True, False], ids=["shared_x", "per_position_x"])
@pytest.mark.parametrize("B,L,V,D", SIZES)
def test_shape_grid(B, L, V, D, shared):
    # Each shape takes one margin in turn, so the grid covers all four without quadrupling it.
    margin = list(MARGINS)[(B + L + V + D) % len(MARGINS)]
    inputs = make_inputs(B, L, V, D, shared, torch.float32, seed=B * L * V * D)
    check_against_reference("cpu", inputs, **MARGINS[margin])


@pytest.mark.parametrize("shared", [True, False], ids=["shared_x", "per_position_x"])
@pytest.mark.parametrize("B,L,V,D", SIZES)
def test_shape_grid_gradients_in_forward(B, L, V, D, shared):
    """Reduction "mean" / "sum" with a fixed position_weight: the gradients come from the forward."""
    margin = list(MARGINS)[(B + L + V + D + 1) % len(MARGINS)]
    reduction = "mean" if (B + V) % 2 else "sum"
    inputs = make_inputs(B, L, V, D, shared, torch.float32, seed=B * L * V * D + 1)
    check_against_reference("cpu", inputs, reduction=reduction, learn=("x", "weight"), **MARGINS[margin])


@pytest.mark.parametrize("learn", [(), ("x",), ("weight",), ("x", "weight"), ("x", "weight", "position_weight"),
                                   ("position_weight",)], ids=lambda learn: "+".join(learn) or "frozen")
@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_every_combination_of_requires_grad(reduction, learn, dtype):
    inputs = make_inputs(11, 3, 37, 20, reduction != "sum", dtype, seed=len(learn))
    check_against_reference("cpu", inputs, reduction=reduction, learn=learn, **MARGINS["both"])


@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
def test_autograd_semantics(reduction):
    """Scaled, repeated and accumulated backward, a frozen input, and double backward, on both paths:
    gradients in the forward (sum, mean) and recomputed in the backward (none)."""
    inputs = make_inputs(9, 3, 37, 16, True, torch.float64, seed=15)
    upstream = inputs["grad_rows"] if reduction == "none" else torch.tensor(1.0, dtype=torch.float64)

    def loss_of(x, weight, backend="cpu"):
        return gif_kernels.fused_code_ce(x, weight, inputs["codes"], inputs["position_weight"], m3=0.4,
                                         reduction=reduction, backend=backend)

    x = inputs["x"].clone().requires_grad_()
    weight = inputs["weight"].clone().requires_grad_()
    expected = torch.autograd.grad(loss_of(x, weight, "reference"), (x, weight), upstream)
    loss = loss_of(x, weight)
    assert ("ForwardGrad" in type(loss.grad_fn).__name__) == (reduction != "none")
    loss.backward(upstream, retain_graph=True)
    torch.testing.assert_close(x.grad, expected[0])
    loss.backward(upstream, retain_graph=True)  # a second backward through the retained graph accumulates
    torch.testing.assert_close(x.grad, 2 * expected[0])
    (3 * loss).backward(upstream)  # scaled
    torch.testing.assert_close(x.grad, 5 * expected[0])
    torch.testing.assert_close(weight.grad, 5 * expected[1])
    loss_of(x, weight).backward(upstream)  # a new graph accumulates into .grad as well
    torch.testing.assert_close(weight.grad, 6 * expected[1])
    frozen = inputs["weight"].clone()
    x.grad = None
    loss_of(x, frozen).backward(upstream)
    assert frozen.grad is None
    torch.testing.assert_close(x.grad, expected[0])
    grad_x, = torch.autograd.grad(loss_of(x, weight), x, upstream, create_graph=True)
    with pytest.raises(RuntimeError, match="differentiate twice|double backward|not supported|derivative"):
        grad_x.sum().backward()
    with torch.no_grad():
        torch.testing.assert_close(loss_of(x, weight), loss_of(x, weight, "reference"))


def test_gradients_in_forward_take_three_matrix_products():
    """A training step (forward + backward) with reduction "mean" or "sum": three GEMM-family calls, whose
    FLOPs are those of the three products 6 * B * L * V * D, and no recompute."""
    gemms = {"aten::mm", "aten::addmm", "aten::addmm_", "aten::bmm", "aten::baddbmm", "aten::baddbmm_",
             "aten::matmul"}
    for B, L, V, D, shared, reduction in ((64, 6, 16, 32, True, "mean"), (32, 2, 300, 24, True, "sum"),
                                          (16, 3, 40, 8, False, "mean")):
        inputs = make_inputs(B, L, V, D, shared, torch.float32, seed=V)
        x = inputs["x"].requires_grad_()
        weight = inputs["weight"].requires_grad_()
        with torch.profiler.profile(record_shapes=True) as prof:
            gif_kernels.fused_code_ce(x, weight, inputs["codes"], reduction=reduction, backend="cpu").backward()
        # The outermost GEMM-family calls (matmul's own mm is not counted twice).
        calls = [e for e in prof.events() if e.name in gemms and not any(
            parent.name in gemms for parent in _parents(e))]
        flops = sum(2 * _gemm_size(e) for e in calls)
        assert len(calls) == 3, [(e.name, e.input_shapes) for e in calls]
        assert flops <= 6 * B * L * V * D, (flops, [(e.name, e.input_shapes) for e in calls])


def _parents(event):
    while event.cpu_parent is not None:
        event = event.cpu_parent
        yield event


def _gemm_size(event):
    """m * n * k of a recorded mm / addmm / bmm / baddbmm call (times the batch)."""
    shapes = [s for s in event.input_shapes if len(s) >= 2]
    a, b = shapes[-2], shapes[-1]
    batch = a[0] if len(a) == 3 else 1
    return batch * a[-2] * a[-1] * b[-1]


@pytest.mark.parametrize("margin", list(MARGINS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("shared", [True, False], ids=["shared_x", "per_position_x"])
@pytest.mark.parametrize("B,L,V,D", [(5, 3, 37, 130), (64, 6, 16, 8), (1, 1, 300, 1)])
def test_dtypes_and_margins(B, L, V, D, shared, dtype, margin):
    inputs = make_inputs(B, L, V, D, shared, dtype, seed=7)
    check_against_reference("cpu", inputs, **MARGINS[margin])


def test_arcface_fallback_region_is_exercised():
    inputs = make_inputs(5, 3, 37, 130, True, torch.float32)
    assert arcface_fallback_hit(inputs, MARGINS["arcface"]["m2"])
    check_against_reference("cpu", inputs, **MARGINS["arcface"])


@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
@pytest.mark.parametrize("shared", [True, False], ids=["shared_x", "per_position_x"])
def test_reductions(reduction, shared):
    inputs = make_inputs(17, 3, 37, 24, shared, torch.float32, seed=3)
    check_against_reference("cpu", inputs, reduction=reduction, **MARGINS["cosface"])


def test_mean_is_sum_over_positions_averaged_over_samples():
    inputs = make_inputs(9, 4, 11, 16, True, torch.float64, seed=4)
    args = (inputs["x"], inputs["weight"], inputs["codes"], inputs["position_weight"])
    rows = gif_kernels.fused_code_ce(*args, reduction="none")
    assert torch.allclose(gif_kernels.fused_code_ce(*args, reduction="mean"), rows.sum() / 9)


@pytest.mark.parametrize("shared", [True, False], ids=["shared_x", "per_position_x"])
def test_unnormalized(shared):
    inputs = make_inputs(13, 3, 37, 16, shared, torch.float32, seed=5)
    inputs["x"], inputs["weight"] = inputs["x"] * 0.25, inputs["weight"] * 0.25
    check_against_reference("cpu", inputs, normalize=False, scale=2.0, m3=0.3)


def test_ignore_index_and_position_weight():
    inputs = make_inputs(8, 3, 16, 8, True, torch.float64, seed=6)
    codes = inputs["codes"].clone()
    codes[codes == -100] = 7
    codes[:, 1] = 7  # a custom ignore_index that is also a valid token elsewhere
    codes[2, 0] = 7
    inputs["codes"] = codes
    check_against_reference("cpu", inputs, ignore_index=7, m3=0.4)
    rows = gif_kernels.fused_code_ce(inputs["x"], inputs["weight"], codes, inputs["position_weight"],
                                     ignore_index=7, reduction="none")
    assert (rows[codes == 7] == 0).all() and (rows[codes != 7] > 0).all()
    unweighted = gif_kernels.fused_code_ce(inputs["x"], inputs["weight"], codes, ignore_index=7,
                                           reduction="none")
    assert torch.allclose(rows, unweighted * inputs["position_weight"])


def test_int32_codes_and_noncontiguous_inputs():
    inputs = make_inputs(6, 3, 16, 40, False, torch.float32, codes_dtype=torch.int32, seed=8)
    inputs["x"] = inputs["x"].transpose(0, 1).contiguous().transpose(0, 1)
    inputs["weight"] = inputs["weight"][:, :, ::2]
    inputs["x"] = inputs["x"][:, :, ::2]
    assert not inputs["x"].is_contiguous() and not inputs["weight"].is_contiguous()
    check_against_reference("cpu", inputs, **MARGINS["both"])


def test_all_ignored_gives_zero_loss_and_gradients():
    inputs = make_inputs(4, 2, 5, 8, True, torch.float32, seed=9)
    x = inputs["x"].requires_grad_()
    w = inputs["weight"].requires_grad_()
    codes = torch.full((4, 2), -100)
    loss = gif_kernels.fused_code_ce(x, w, codes)
    loss.backward()
    assert loss.item() == 0 and (x.grad == 0).all() and (w.grad == 0).all()


@pytest.mark.parametrize("margin", list(MARGINS))
@pytest.mark.parametrize("shared", [True, False], ids=["shared_x", "per_position_x"])
def test_gradcheck(margin, shared):
    inputs = make_inputs(3, 2, 5, 4, shared, torch.float64, seed=10)
    x = inputs["x"].requires_grad_()
    w = inputs["weight"].requires_grad_()

    def loss(x, w):
        return gif_kernels.fused_code_ce(x, w, inputs["codes"], inputs["position_weight"], scale=4.0,
                                         reduction="none", backend="cpu", **MARGINS[margin])

    assert torch.autograd.gradcheck(loss, (x, w))


@pytest.mark.parametrize("sample", list(range(3)))
def test_opcheck_forward_and_backward(sample):
    opcheck_family("code_ce", list(op_samples("cpu"))[sample])


@pytest.mark.parametrize("output_mask", [(True, True), (True, False), (False, True)])
@pytest.mark.parametrize("sample", list(range(3)))
def test_opcheck_forward_grad(sample, output_mask):
    args = list(op_samples("cpu"))[sample]
    args[0].requires_grad_(output_mask[0])
    args[1].requires_grad_(output_mask[1])
    for reduction in ("mean", "sum"):
        torch.library.opcheck(torch.ops.gif.code_ce_forward_grad, (*args, reduction, list(output_mask)))


@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
def test_opcheck_public_op(reduction):
    args = next(op_samples("cpu"))
    x, weight = args[0].requires_grad_(), args[1].requires_grad_()
    torch.library.opcheck(torch.ops.gif.fused_code_ce, (x, weight, args[2]),
                          dict(position_weight=args[3], m3=0.4, reduction=reduction))


def test_public_op_matches_python_api():
    inputs = make_inputs(5, 3, 16, 8, False, torch.float32, seed=13)
    args = (inputs["x"], inputs["weight"], inputs["codes"], inputs["position_weight"])
    assert torch.equal(torch.ops.gif.fused_code_ce(*args, m2=0.5),
                       gif_kernels.fused_code_ce(*args, m2=0.5))


def test_torch_compile_fullgraph():
    inputs = make_inputs(6, 3, 16, 8, True, torch.float32, seed=14)

    def step(x, w, codes, pw):
        return gif_kernels.fused_code_ce(x, w, codes, pw, m3=0.4) + torch.ops.gif.fused_code_ce(
            x, w, codes, pw, m2=0.5, reduction="sum")

    compiled = torch.compile(step, fullgraph=True)
    results = []
    for fn in (step, compiled):
        x = inputs["x"].clone().requires_grad_()
        w = inputs["weight"].clone().requires_grad_()
        loss = fn(x, w, inputs["codes"], inputs["position_weight"])
        loss.backward()
        results.append((loss.detach(), x.grad, w.grad))
    for eager, comp in zip(*results):
        torch.testing.assert_close(comp, eager)


def test_reference_backend_matches_cpu():
    inputs = make_inputs(7, 3, 37, 8, True, torch.float64, seed=15)
    args = (inputs["x"], inputs["weight"], inputs["codes"], inputs["position_weight"])
    torch.testing.assert_close(gif_kernels.fused_code_ce(*args, backend="reference", m2=0.5),
                               gif_kernels.fused_code_ce(*args, backend="cpu", m2=0.5))


def _bad_calls():
    x, w = torch.randn(4, 8), torch.randn(3, 5, 8)
    codes = torch.randint(0, 5, (4, 3))
    bad_codes = codes.clone()
    bad_codes[1, 2] = 5
    negative = codes.clone()
    negative[0, 0] = -1
    return {
        "codes_out_of_range": (dict(codes=bad_codes), "codes", ValueError),
        "codes_negative": (dict(codes=negative), "codes", ValueError),
        "codes_shape": (dict(codes=codes[:, :2]), "codes", ValueError),
        "codes_float": (dict(codes=codes.float()), "codes", TypeError),
        "feature_size": (dict(x=torch.randn(4, 7)), "x", ValueError),
        "x_positions": (dict(x=torch.randn(4, 2, 8)), "x", ValueError),
        "dtype_mismatch": (dict(weight=w.double()), "weight", TypeError),
        "int_x": (dict(x=torch.ones(4, 8, dtype=torch.int64), weight=w.long()), "x", TypeError),
        "weight_rank": (dict(weight=w[0]), "weight", ValueError),
        "scale_inf": (dict(scale=float("inf")), "scale", ValueError),
        "scale_nan": (dict(scale=float("nan")), "scale", ValueError),
        "scale_zero": (dict(scale=0), "scale", ValueError),
        "scale_negative": (dict(scale=-64.0), "scale", ValueError),
        "reduction": (dict(reduction="avg"), "reduction", ValueError),
        "m2_unnormalized": (dict(m2=0.5, normalize=False), "m2", ValueError),
        "position_weight_shape": (dict(position_weight=torch.ones(2)), "position_weight", ValueError),
        "backend": (dict(backend="tpu"), "backend", ValueError),
        "cuda_backend_on_cpu": (dict(backend="cuda"), "backend", ValueError),
    }, dict(x=x, weight=w, codes=codes)


@pytest.mark.parametrize("case", list(_bad_calls()[0]))
def test_bad_input_names_the_argument(case):
    cases, good = _bad_calls()
    change, argument, error = cases[case]
    with pytest.raises(error, match=argument):
        gif_kernels.fused_code_ce(**{**good, **change})


def test_cpp_kernel_checks_codes_itself():
    x, w = torch.randn(4, 8), torch.randn(3, 5, 8)
    codes = torch.randint(0, 5, (4, 3))
    codes[3, 1] = 9
    with pytest.raises(ValueError, match=r"codes: .* found 9 at \[3, 1\]"):
        torch.ops.gif.code_ce_forward(x, w, codes, None, 64.0, 0.0, 0.0, True, -100)
    with pytest.raises(TypeError, match="weight: dtype"):
        torch.ops.gif.code_ce_forward(x, w.double(), codes.clamp(max=4), None, 64.0, 0.0, 0.0, True, -100)


def test_build_info():
    info = gif_kernels.build_info()
    assert info["torch_version"].split("+")[0] == torch.__version__.split("+")[0]
    assert isinstance(info["cuda"], bool) and isinstance(info["cuda_archs"], str)


def test_triton_backend_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    x, w, codes = torch.randn(4, 8), torch.randn(3, 5, 8), torch.randint(0, 5, (4, 3))
    with pytest.raises(RuntimeError, match="backend: 'triton'.*TRITON_INTERPRET"):
        gif_kernels.fused_code_ce(x, w, codes, backend="triton")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        torch.ops.gif.triton_code_ce_forward(x, w, codes, None, 64.0, 0.0, 0.0, True, -100, False)


def test_fake_kernels_run_the_real_paths_checks():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x, w = torch.randn(4, 8), torch.randn(3, 5, 8)
        codes = torch.zeros(4, 3, dtype=torch.int64)
        rows, lse = torch.ops.gif.code_ce_forward(x, w, codes, None, 64.0, 0.0, 0.0, True, -100)
        assert rows.shape == (4, 3) and lse.shape == (4, 3)
        with pytest.raises(TypeError, match="weight: dtype"):
            torch.ops.gif.code_ce_forward(x, w.double(), codes, None, 64.0, 0.0, 0.0, True, -100)
        with pytest.raises(ValueError, match="scale"):
            torch.ops.gif.code_ce_backward(rows, x, w, codes, None, lse, 0.0, 0.0, 0.0, True, -100)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shared", [True, False], ids=["shared_x", "per_position_x"])
def test_rows_below_the_norm_eps(shared, dtype):
    check_against_reference("cpu", tiny_norm_inputs(shared, dtype), rowwise=True, **MARGINS["both"])


def test_ignored_rows_have_no_margin_in_their_lse():
    inputs = make_inputs(8, 3, 16, 8, False, torch.float64, seed=6, ignore=False)
    codes = inputs["codes"].clone()
    codes[:, 1] = 7  # an ignore_index that is a token: those rows' lse is the plain logits'
    args = (inputs["x"], inputs["weight"], codes, None, 16.0, 0.3, 0.2, True, 7)
    _, lse = torch.ops.gif.code_ce_forward(*args)
    torch.testing.assert_close(lse, gif_kernels.reference.code_ce_lse(*args[:3], *args[4:]))


@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_empty_batch(backend, reduction):
    check_empty_batch(backend, reduction)


# Run in a fresh process per instruction set: ATen reads ATEN_CPU_CAPABILITY once, at its first use.
CAPABILITY_SCRIPT = """
import torch
import gif_kernels
from tests.helpers.code_ce_cases import MARGINS, make_inputs, check_against_reference, tiny_norm_inputs
for (B, L, V, D), shared in [((7, 3, 37, 20), True), ((5, 2, 70, 13), False), ((3, 1, 1, 9), True)]:
    for dtype in (torch.float32, torch.float64):
        inputs = make_inputs(B, L, V, D, shared, dtype, seed=B * V + D)
        check_against_reference("cpu", inputs, **MARGINS["arcface"])
        check_against_reference("cpu", inputs, reduction="mean", learn=("x", "weight"), **MARGINS["both"])
check_against_reference("cpu", tiny_norm_inputs(True, torch.float32), rowwise=True, **MARGINS["cosface"])
print(gif_kernels.build_info()["cpu_capability"])
"""
CPU_CAPABILITIES = ["DEFAULT", "AVX2", "AVX512"]  # ATen's, in increasing order


@pytest.mark.parametrize("capability", CPU_CAPABILITIES)
def test_every_cpu_capability_build(capability):
    """Each build of the row steps (code_ce_rows_<capability>.cpp) against the reference, picked the way
    ATen picks its own kernels: by the machine, or lower by ATEN_CPU_CAPABILITY."""
    best = torch.backends.cpu.get_cpu_capability()
    if best not in CPU_CAPABILITIES or CPU_CAPABILITIES.index(capability) > CPU_CAPABILITIES.index(best):
        pytest.skip(f"this CPU runs ATen at {best}")
    expected = capability if platform.machine() in ("x86_64", "AMD64") else "DEFAULT"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, ATEN_CPU_CAPABILITY=capability.lower())
    result = subprocess.run([sys.executable, "-c", CAPABILITY_SCRIPT], cwd=root, env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split()[-1] == expected
