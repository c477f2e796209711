"""Op glue for torch.ops.gif: argument checks, backend choice, autograd and fake kernels.

Schemas live in csrc/gif_ops.cpp; C++ kernels register there per device; the Triton kernels
(gif_kernels/triton) register here. Nothing numeric happens in this file.
"""
import math

import torch

from . import reference
from .triton import interpreted as triton_interpreted

BACKENDS = ("auto", "cpu", "cuda", "triton", "reference")
REDUCTIONS = ("none", "sum", "mean")
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def check_scale(scale):
    """The logits' scale s must be finite and > 0 (s <= 0 inverts or flattens every softmax)."""
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"scale: expected a finite number > 0, got {scale!r}")


def _check_code_ce_args(x, weight, codes, position_weight, scale, m2, m3, normalize, reduction):
    """Shape, dtype and argument checks; they read metadata only, so they also run on fake tensors."""
    if weight.dim() != 3:
        raise ValueError(f"weight: expected shape (L, V, D), got {tuple(weight.shape)}")
    L, V, D = weight.shape
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


def _require_triton(device: torch.device):
    if not (device.type == "cuda" or (device.type == "cpu" and triton_interpreted())):
        raise RuntimeError(f"backend: 'triton' runs on CUDA tensors, or on CPU tensors with "
                           f"TRITON_INTERPRET=1 set before import; got tensors on {device}")


# backend="auto" on CUDA tensors: (largest V, backend), first match wins. From bench/kernels.py on an
# H100 80GB HBM3, 2026-11-27 (bf16, D = 512, CUDA-graph replay; bench/RESULTS.md): V = 16: CUDA C++
# 96 us vs Triton 118; V = 64: Triton 128 vs 165; V = 256: Triton 171 vs 186; V = 4096: CUDA C++
# (cuBLAS GEMMs) 3.46 ms vs 4.04; V = 32768: 61.1 ms vs 62.5.
AUTO_CUDA_TABLE = ((32, "cuda"), (2048, "triton"), (float("inf"), "cuda"))


def _auto_cuda_backend(num_tokens: int) -> str:
    return next(backend for max_tokens, backend in AUTO_CUDA_TABLE if num_tokens <= max_tokens)


def _resolve_backend(backend: str, device: torch.device, num_tokens: int, deterministic: bool) -> str:
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
        _require_triton(device)
    return backend


def fused_code_ce(x, weight, codes, position_weight=None, scale=64.0, m2=0.0, m3=0.0,
                  normalize=True, ignore_index=-100, reduction="mean", backend="auto",
                  deterministic=None):
    """Margin cross-entropy of L code positions, fused; see torch.ops.gif.fused_code_ce.

    x: (B, D) shared or (B, L, D) per-position features; weight: (L, V, D); codes: (B, L) integer
    in [0, V) or ignore_index. Returns the loss reduced by `reduction` ("mean" = sum / B).
    backend: "auto" (fastest for the device and shape), "cpu", "cuda", "triton" or "reference".
    deterministic: bitwise-reproducible gradients. The C++ kernels always are; Triton then runs its
    atomic-free backward. None follows torch.are_deterministic_algorithms_enabled().
    """
    _check_code_ce_args(x, weight, codes, position_weight, scale, m2, m3, normalize, reduction)
    if deterministic is None:
        deterministic = torch.are_deterministic_algorithms_enabled()
    backend = _resolve_backend(backend, x.device, weight.shape[1], deterministic)
    args = (x, weight, codes, position_weight, float(scale), float(m2), float(m3), bool(normalize),
            int(ignore_index))
    if backend == "reference":
        rows = reference.code_ce_rows(*args)
    elif backend == "triton":
        rows, _ = torch.ops.gif.triton_code_ce_forward(*args, bool(deterministic))
    else:
        rows, _ = torch.ops.gif.code_ce_forward(*args)
    return reference.reduce_loss(rows, reduction)


@torch.library.impl("gif::fused_code_ce", "CompositeImplicitAutograd")
def _fused_code_ce_op(x, weight, codes, position_weight=None, scale=64.0, m2=0.0, m3=0.0,
                      normalize=True, ignore_index=-100, reduction="mean"):
    return fused_code_ce(x, weight, codes, position_weight, scale, m2, m3, normalize,
                         ignore_index, reduction)


# Triton kernel family: registered for CUDA, and for CPU tensors under the Triton interpreter.
def _triton_forward(x, weight, codes, position_weight, scale, m2, m3, normalize, ignore_index, deterministic):
    _require_triton(x.device)
    from .triton.code_ce import code_ce_forward  # imported on first use: triton is slow to import
    return code_ce_forward(x, weight, codes, position_weight, scale, m2, m3, normalize, ignore_index)


def _triton_backward(grad_loss, x, weight, codes, position_weight, lse, scale, m2, m3, normalize,
                     ignore_index, deterministic):
    _require_triton(x.device)
    from .triton.code_ce import code_ce_backward
    return code_ce_backward(grad_loss, x, weight, codes, position_weight, lse, scale, m2, m3,
                            normalize, ignore_index, deterministic)


torch.library.impl("gif::triton_code_ce_forward", ("CPU", "CUDA"), _triton_forward)
torch.library.impl("gif::triton_code_ce_backward", ("CPU", "CUDA"), _triton_backward)


# Fake kernels and autograd, the same for every kernel family (the Triton family's extra trailing
# `deterministic` rides along in *options).
def _forward_fake(x, weight, codes, position_weight, *options):
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    return codes.new_empty(codes.shape, dtype=dtype), codes.new_empty(codes.shape, dtype=dtype)


def _backward_fake(grad_loss, x, weight, codes, position_weight, lse, *options):
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


for _family in ("code_ce", "triton_code_ce"):
    _forward_op = f"gif::{_family}_forward"
    _backward_op = getattr(torch.ops.gif, f"{_family}_backward")
    torch.library.register_fake(_forward_op)(_forward_fake)
    torch.library.register_fake(f"gif::{_family}_backward")(_backward_fake)
    torch.library.register_autograd(_forward_op, _backward_of(_backward_op),
                                    setup_context=_setup_context)


# code_beam_search: backend choice, the Triton kernel's registration and fake kernels. The C++ family
# has a CPU kernel (csrc/cpu/beam_search.cpp) and a CUDA one (csrc/cuda/beam_search.cu).
BEAM_SEARCH_OPS = {"cpu": "code_beam_search", "cuda": "code_beam_search",
                   "triton": "triton_code_beam_search"}


def has_beam_search_kernel(backend: str, device: torch.device) -> bool:
    """Whether `backend` has a code_beam_search kernel for tensors on `device` in this build."""
    name = BEAM_SEARCH_OPS[backend]
    return hasattr(torch.ops.gif, name) and torch._C._dispatch_has_kernel_for_dispatch_key(
        f"gif::{name}", "CPU" if device.type == "cpu" else "CUDA")


def resolve_beam_search_backend(backend: str, device: torch.device) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        if device.type == "cpu":
            return "cpu"
        backend = next((b for b in ("cuda", "triton") if has_beam_search_kernel(b, device)), None)
        if backend is None:
            raise RuntimeError(f"scores: code_beam_search has no kernel for tensors on {device} yet; "
                               f"use CPU tensors or backend='reference'")
    if backend == "reference":
        return backend
    if backend in ("cpu", "cuda") and device.type != backend:
        raise ValueError(f"backend: {backend!r} needs {backend} tensors, got tensors on {device}")
    if backend == "triton":
        _require_triton(device)
    if not has_beam_search_kernel(backend, device):
        raise RuntimeError(f"backend: {backend!r} has no code_beam_search kernel in this build yet "
                           f"(gif::{BEAM_SEARCH_OPS[backend]} for {device.type} tensors); use 'cpu' or "
                           f"'reference'")
    return backend


def _check_beam_search_args(scores, child_offsets, child_tokens, leaf_ids, beam, topk):
    """The metadata checks of csrc/beam_search.cpp, for fake tensors."""
    if scores.dim() != 3 or scores.shape[1] < 1 or scores.shape[2] < 1:
        raise ValueError(f"scores: expected shape (Q, L, V) with L, V >= 1, got {tuple(scores.shape)}")
    if scores.dtype not in FLOAT_DTYPES:
        raise TypeError(f"scores: expected one of {FLOAT_DTYPES}, got {scores.dtype}")
    for name, array, dtype in (("child_offsets", child_offsets, torch.int64),
                               ("child_tokens", child_tokens, torch.int32), ("leaf_ids", leaf_ids, torch.int64)):
        if array.dim() != 1 or array.dtype != dtype:
            raise ValueError(f"{name}: expected a 1-D {dtype} tensor, got {array.dtype} {tuple(array.shape)}")
    devices = [t.device for t in (scores, child_offsets, child_tokens, leaf_ids)]
    if len(set(devices)) > 1:
        raise ValueError(f"scores, child_offsets, child_tokens and leaf_ids must be on one device, got "
                         f"{', '.join(map(str, devices))}")
    if topk < 1:
        raise ValueError(f"topk: expected >= 1, got {topk}")
    if beam < topk:
        raise ValueError(f"beam: expected >= topk = {topk}, got {beam}")


# The widest beam of each GPU kernel: Triton holds beam + 1 candidates per program in registers; the
# CUDA kernel gives each beam slot one thread (kMaxBeam in csrc/cuda/beam_search.cu).
MAX_BEAM = {"triton": 1024, "cuda": 256}


def _triton_beam_search(scores, child_offsets, child_tokens, leaf_ids, beam, topk):
    _require_triton(scores.device)
    _check_beam_search_args(scores, child_offsets, child_tokens, leaf_ids, beam, topk)
    if beam > MAX_BEAM["triton"]:
        raise ValueError(f"beam: the Triton kernel takes beam <= {MAX_BEAM['triton']}, got {beam}")
    from .triton.beam_search import code_beam_search  # imported on first use: triton is slow to import
    return code_beam_search(scores, child_offsets, child_tokens, leaf_ids, beam, topk)


torch.library.impl("gif::triton_code_beam_search", ("CPU", "CUDA"), _triton_beam_search)


def _beam_search_fake(scores, child_offsets, child_tokens, leaf_ids, beam, topk):
    _check_beam_search_args(scores, child_offsets, child_tokens, leaf_ids, beam, topk)
    num_queries = scores.shape[0]
    return (scores.new_empty((num_queries, topk), dtype=torch.int64),
            scores.new_empty((num_queries, topk), dtype=torch.float32),
            scores.new_empty((num_queries,), dtype=torch.bool))


for _name in set(BEAM_SEARCH_OPS.values()):
    if hasattr(torch.ops.gif, _name):
        torch.library.register_fake(f"gif::{_name}")(_beam_search_fake)
