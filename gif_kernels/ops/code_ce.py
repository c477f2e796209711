"""fused_code_ce's glue: argument checks, backend choice, the functional API, the Triton kernel
family's registration, and the fake kernels and autograd of both kernel families (the C++ one,
gif::code_ce_*, registers its kernels in csrc/; the schemas are in csrc/gif_ops.cpp). Nothing
numeric happens here.
"""
import math

import torch

from .. import reference
from .common import BACKENDS, FLOAT_DTYPES, require_triton

REDUCTIONS = ("none", "sum", "mean")


def check_scale(scale):
    """The logits' scale s must be finite and > 0 (s <= 0 inverts or flattens every softmax)."""
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"scale: expected a finite number > 0, got {scale!r}")


def _check_code_ce_args(x, weight, codes, position_weight, scale, m2, m3, normalize, reduction):
    """Shape, dtype and argument checks; they read metadata only, so they also run on fake tensors."""
    if weight.dim() != 3:
        raise ValueError(f"weight: expected shape (L, V, D), got {tuple(weight.shape)}")
    L, V, D = weight.shape
    if min(L, V, D) < 1:
        raise ValueError(f"weight: expected L, V, D >= 1, got shape {tuple(weight.shape)}")
    if x.dim() not in (2, 3):
        raise ValueError(f"x: expected shape (B, D) or (B, L, D), got {tuple(x.shape)}")
    if x.shape[-1] != D:
        raise ValueError(f"x: feature size {x.shape[-1]} does not match weight's D = {D}")
    if x.dim() == 3 and x.shape[1] != L:
        raise ValueError(f"x: expected (B, L, D) with L = {L}, got {tuple(x.shape)}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"x: expected one of {FLOAT_DTYPES}, got {x.dtype}")
    if weight.dtype != x.dtype:
        raise TypeError(f"weight: dtype {weight.dtype} does not match x's dtype {x.dtype}")
    if tuple(codes.shape) != (x.shape[0], L):
        raise ValueError(f"codes: expected shape (B, L) = ({x.shape[0]}, {L}), got {tuple(codes.shape)}")
    if codes.dtype.is_floating_point or codes.dtype.is_complex or codes.dtype == torch.bool:
        raise TypeError(f"codes: expected an integer dtype, got {codes.dtype}")
    if weight.device != x.device or codes.device != x.device:
        raise ValueError(f"x, weight and codes must be on one device, got {x.device}, "
                         f"{weight.device}, {codes.device}")
    if position_weight is not None:
        if tuple(position_weight.shape) != (L,):
            raise ValueError(f"position_weight: expected shape (L,) = ({L},), got {tuple(position_weight.shape)}")
        if not position_weight.dtype.is_floating_point:
            raise TypeError(f"position_weight: expected a float dtype, got {position_weight.dtype}")
        if position_weight.device != x.device:
            raise ValueError(f"position_weight: expected device {x.device}, got {position_weight.device}")
    check_scale(scale)
    if not (math.isfinite(m2) and 0.0 <= m2 <= math.pi):
        raise ValueError(f"m2: expected a finite angle in [0, pi], got {m2}")
    if not math.isfinite(m3):
        raise ValueError(f"m3: expected a finite number, got {m3}")
    if not normalize and m2 != 0.0:
        raise ValueError(f"m2: must be 0 when normalize=False (an angular margin needs cosines), got {m2}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction: expected one of {REDUCTIONS}, got {reduction!r}")


def has_cuda_kernels() -> bool:
    """Whether gif_kernels._C was built with the CUDA C++ kernels."""
    return torch._C._dispatch_has_kernel_for_dispatch_key("gif::code_ce_forward", "CUDA")


# backend="auto" on CUDA tensors: (largest V, backend), first match wins. From bench/kernels.py on an
# H100 80GB HBM3, 2026-11-27 (bf16, D = 512, CUDA-graph replay; bench/RESULTS.md): V = 16: CUDA C++
# 96 us vs Triton 118; V = 64: Triton 128 vs 165; V = 256: Triton 171 vs 186; V = 4096: CUDA C++
# (cuBLAS GEMMs) 3.46 ms vs 4.04; V = 32768: 61.1 ms vs 62.5.
AUTO_CUDA_TABLE = ((32, "cuda"), (2048, "triton"), (float("inf"), "cuda"))


def _auto_cuda_backend(num_tokens: int) -> str:
    return next(backend for max_tokens, backend in AUTO_CUDA_TABLE if num_tokens <= max_tokens)


def resolve_backend(backend: str, device: torch.device, num_tokens: int, deterministic: bool) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        if device.type == "cpu":
            return "cpu"
        if device.type != "cuda":
            raise ValueError(f"x: no kernels for device {device}; use backend='reference'")
        if not has_cuda_kernels():
            backend = "triton"
        else:  # the table measured the default (atomic) Triton backward; the CUDA C++ kernels are deterministic
            backend = "cuda" if deterministic else _auto_cuda_backend(num_tokens)
    if backend in ("cpu", "cuda") and device.type != backend:
        raise ValueError(f"backend: {backend!r} needs {backend} tensors, got tensors on {device}")
    if backend == "cuda" and not has_cuda_kernels():
        raise RuntimeError("backend: 'cuda' needs the CUDA kernels, but gif_kernels._C was built without "
                           "them (gif_kernels.build_info()['cuda'] is False); rebuild where a GPU is visible, "
                           "or name its architecture: TORCH_CUDA_ARCH_LIST=9.0 pip install --no-build-isolation -e .")
    if backend == "triton":
        require_triton(device)
    return backend


def fused_code_ce(x, weight, codes, position_weight=None, scale=64.0, m2=0.0, m3=0.0,
                  normalize=True, ignore_index=-100, reduction="mean", backend="auto",
                  deterministic=None):
    """Margin cross-entropy of L code positions, fused; see torch.ops.gif.fused_code_ce.

    x: (B, D) shared or (B, L, D) per-position features; weight: (L, V, D); codes: (B, L) integer
    in [0, V) or ignore_index. Returns the loss reduced by `reduction` ("mean" = sum / B).
    With reduction "mean" or "sum", the C++ backends compute the gradients of x and weight (those that
    require grad) in the forward, in the sweep that computes the loss, and keep them for the backward,
    which only scales them by the incoming gradient: three matrix products per training step instead
    of four (the backward would recompute the dot products). The price is memory: tensors of x's and
    weight's size live from the forward to the backward.
    backend: "auto" (fastest for the device and shape), "cpu", "cuda", "triton" or "reference".
    deterministic: bitwise-reproducible gradients. The C++ kernels always are; Triton then runs its
    atomic-free backward. None follows torch.are_deterministic_algorithms_enabled().
    """
    _check_code_ce_args(x, weight, codes, position_weight, scale, m2, m3, normalize, reduction)
    if deterministic is None:
        deterministic = torch.are_deterministic_algorithms_enabled()
    backend = resolve_backend(backend, x.device, weight.shape[1], deterministic)
    # The kernels' autograd differentiates x and weight only. A position_weight that needs a gradient
    # scales the kernels' unweighted rows here instead (a (B, L) product), and autograd does the rest.
    learned_weight = (position_weight is not None and position_weight.requires_grad
                      and torch.is_grad_enabled() and backend != "reference")
    args = (x, weight, codes, None if learned_weight else position_weight, float(scale), float(m2),
            float(m3), bool(normalize), int(ignore_index))
    output_mask = [x.requires_grad, weight.requires_grad]
    if (backend in ("cpu", "cuda") and reduction != "none" and not learned_weight
            and torch.is_grad_enabled() and any(output_mask)):
        return torch.ops.gif.code_ce_forward_grad(*args, reduction, output_mask)[0]
    if backend == "reference":  # in the kernels' accumulation dtype, which is also the loss's
        acc_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        x_acc, weight_acc, pw_acc = (None if t is None else t.to(acc_dtype) for t in (x, weight, args[3]))
        rows = reference.code_ce_rows(x_acc, weight_acc, codes, pw_acc, *args[4:])
    elif backend == "triton":
        rows, _ = torch.ops.gif.triton_code_ce_forward(*args, bool(deterministic))
    else:
        rows, _ = torch.ops.gif.code_ce_forward(*args)
    if learned_weight:
        rows = rows * position_weight.to(rows.dtype)
    return reference.reduce_loss(rows, reduction)


@torch.library.impl("gif::fused_code_ce", "CompositeImplicitAutograd")
def _fused_code_ce_op(x, weight, codes, position_weight=None, scale=64.0, m2=0.0, m3=0.0,
                      normalize=True, ignore_index=-100, reduction="mean"):
    return fused_code_ce(x, weight, codes, position_weight, scale, m2, m3, normalize,
                         ignore_index, reduction)


# Triton kernel family: registered for CUDA, and for CPU tensors under the Triton interpreter.
def _triton_forward(x, weight, codes, position_weight, scale, m2, m3, normalize, ignore_index, deterministic):
    require_triton(x.device)
    from ..triton.code_ce import code_ce_forward  # imported on first use: triton is slow to import
    return code_ce_forward(x, weight, codes, position_weight, scale, m2, m3, normalize, ignore_index)


def _triton_backward(grad_loss, x, weight, codes, position_weight, lse, scale, m2, m3, normalize,
                     ignore_index, deterministic):
    require_triton(x.device)
    from ..triton.code_ce import code_ce_backward
    return code_ce_backward(grad_loss, x, weight, codes, position_weight, lse, scale, m2, m3,
                            normalize, ignore_index, deterministic)


torch.library.impl("gif::triton_code_ce_forward", ("CPU", "CUDA"), _triton_forward)
torch.library.impl("gif::triton_code_ce_backward", ("CPU", "CUDA"), _triton_backward)


# Fake kernels and autograd, the same for every kernel family (ignore_index, and the Triton family's
# extra trailing `deterministic`, ride along in *options). The fakes run the real path's metadata checks.
def _forward_fake(x, weight, codes, position_weight, scale, m2, m3, normalize, *options):
    _check_code_ce_args(x, weight, codes, position_weight, scale, m2, m3, normalize, "none")
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    return codes.new_empty(codes.shape, dtype=dtype), codes.new_empty(codes.shape, dtype=dtype)


def _backward_fake(grad_loss, x, weight, codes, position_weight, lse, scale, m2, m3, normalize, *options):
    _check_code_ce_args(x, weight, codes, position_weight, scale, m2, m3, normalize, "none")
    return torch.empty_like(x), torch.empty_like(weight)


def _setup_context(ctx, inputs, output):
    x, weight, codes, position_weight, *scalars = inputs
    ctx.save_for_backward(x, weight, codes, position_weight, output[1])
    ctx.scalars = scalars


def _backward_of(backward_op):
    def backward(ctx, grad_loss, _grad_lse):
        x, weight, codes, position_weight, lse = ctx.saved_tensors
        grad_x, grad_weight = backward_op(grad_loss, x, weight, codes, position_weight, lse,
                                          *ctx.scalars)
        return (grad_x, grad_weight) + (None,) * (2 + len(ctx.scalars))
    return backward


class _FirstOrderOnly(torch.autograd.Function):
    """The identity on a gradient the kernels computed under create_graph=True, whose own derivative they
    do not have: differentiating it raises instead of silently dropping terms."""

    @staticmethod
    def forward(ctx, grad, _anchor):
        return grad.view_as(grad)

    @staticmethod
    def backward(ctx, _grad):
        raise RuntimeError("fused_code_ce: double backward is not supported (the kernels' gradients are "
                           "not differentiable); use backend='reference' for higher derivatives")


def _first_order(backward):
    """A kernel family's backward, run without recording; under create_graph=True its gradients carry
    a node that raises if a second backward reaches them."""
    def first_order_backward(ctx, *grads):
        with torch.no_grad():
            results = backward(ctx, *grads)
        if not torch.is_grad_enabled():
            return results
        anchor = torch.zeros((), requires_grad=True)
        return tuple(None if r is None else _FirstOrderOnly.apply(r, anchor) for r in results)
    return first_order_backward


# Gradients in the forward: the saved gradients times the incoming scalar.
def _forward_grad_fake(x, weight, codes, position_weight, scale, m2, m3, normalize, ignore_index,
                       reduction, output_mask):
    _check_code_ce_args(x, weight, codes, position_weight, scale, m2, m3, normalize, reduction)
    if reduction == "none":
        raise ValueError("reduction: expected 'mean' or 'sum' with gradients in the forward, got 'none'")
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    return (x.new_empty((), dtype=dtype), torch.empty_like(x) if output_mask[0] else x.new_empty(0),
            torch.empty_like(weight) if output_mask[1] else weight.new_empty(0))


def _forward_grad_backward(ctx, grad_loss, _grad_x, _grad_weight):
    # loss.backward() sends 1: then the saved gradients are the gradients, without a pass over tensors
    # of weight's size (autograd copies them where it must, e.g. for a retained graph). The test costs
    # a device sync on CUDA, and a traced graph (torch.compile, opcheck: tensor subclasses) cannot
    # branch on data, so it is made for plain CPU tensors only.
    unit = type(grad_loss) is torch.Tensor and grad_loss.device.type == "cpu" and grad_loss.item() == 1.0
    grad_x, grad_weight = (None if not wanted else grad if unit else grad * grad_loss.to(grad.dtype)
                           for grad, wanted in zip(ctx.saved_tensors, ctx.output_mask))
    return (grad_x, grad_weight) + (None,) * 9


class _ForwardGrad(torch.autograd.Function):
    """code_ce_forward_grad's autograd kernel. It is registered for the Autograd key directly rather than
    through torch.library.register_autograd, whose glue rebuilds the schema's argument list on every
    call (about 60 us on a CPU, a fifth of a small training step, and garbage that runs Python's
    collector); the op below it runs as register_autograd would run it."""

    @staticmethod
    def forward(ctx, *inputs):
        with torch._C._AutoDispatchBelowAutograd():
            output = torch.ops.gif.code_ce_forward_grad(*inputs)
        ctx.output_mask = inputs[-1]
        ctx.mark_non_differentiable(output[1], output[2])
        ctx.save_for_backward(output[1], output[2])
        return output

    backward = staticmethod(_first_order(_forward_grad_backward))


torch.library.register_fake("gif::code_ce_forward_grad")(_forward_grad_fake)
torch.library.impl("gif::code_ce_forward_grad", "Autograd", _ForwardGrad.apply)

for _family in ("code_ce", "triton_code_ce"):
    _forward_op = f"gif::{_family}_forward"
    _backward_op = getattr(torch.ops.gif, f"{_family}_backward")
    torch.library.register_fake(_forward_op)(_forward_fake)
    torch.library.register_fake(f"gif::{_family}_backward")(_backward_fake)
    torch.library.register_autograd(_forward_op, _first_order(_backward_of(_backward_op)),
                                    setup_context=_setup_context)
