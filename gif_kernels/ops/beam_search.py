"""code_beam_search's glue: backend choice, argument checks, the Triton kernel's registration and
the fake kernels (the C++ family has a CPU kernel, csrc/cpu/beam_search.cpp, and a CUDA one,
csrc/cuda/beam_search.cu; the schemas are in csrc/gif_ops.cpp). The Python API with exact
re-search is gif_kernels/decode.py.
"""
import torch

from .common import BACKENDS, FLOAT_DTYPES, require_triton

BEAM_SEARCH_OPS = {"cpu": "code_beam_search", "cuda": "code_beam_search",
                   "triton": "triton_code_beam_search"}


def has_beam_search_kernel(backend: str, device: torch.device) -> bool:
    """Whether `backend` has a code_beam_search kernel for tensors on `device` in this build."""
    name = BEAM_SEARCH_OPS[backend]
    return hasattr(torch.ops.gif, name) and torch._C._dispatch_has_kernel_for_dispatch_key(
        f"gif::{name}", "CPU" if device.type == "cpu" else "CUDA")


def resolve_beam_search_backend(backend: str, device: torch.device, beam: int) -> str:
    """The backend that runs; "auto" on CUDA tensors: the CUDA kernel, else Triton, the first whose widest
    beam (MAX_BEAM) takes `beam`."""
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        if device.type == "cpu":
            return "cpu"
        available = [b for b in ("cuda", "triton") if has_beam_search_kernel(b, device)]
        if not available:
            raise RuntimeError(f"scores: code_beam_search has no kernel for tensors on {device} in this "
                               f"build (see gif_kernels.build_info()); use CPU tensors or backend='reference'")
        backend = next((b for b in available if beam <= MAX_BEAM[b]), available[-1])
    if backend == "reference":
        return backend
    if backend in ("cpu", "cuda") and device.type != backend:
        raise ValueError(f"backend: {backend!r} needs {backend} tensors, got tensors on {device}")
    if backend == "triton":
        require_triton(device)
    if not has_beam_search_kernel(backend, device):
        raise RuntimeError(f"backend: {backend!r} has no code_beam_search kernel in this build "
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
    require_triton(scores.device)
    _check_beam_search_args(scores, child_offsets, child_tokens, leaf_ids, beam, topk)
    if beam > MAX_BEAM["triton"]:
        raise ValueError(f"beam: the Triton kernel takes beam <= {MAX_BEAM['triton']}, got {beam}")
    if child_offsets.numel() - 1 >= 2**32:
        raise ValueError(f"child_offsets: the Triton kernel ranks nodes by 32-bit keys, got "
                         f"{child_offsets.numel() - 1} nodes")
    from ..triton.beam_search import code_beam_search  # imported on first use: triton is slow to import
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
