"""Op glue for torch.ops.gif, one file per op (as gif_kernels/triton/ and csrc/ are): each holds
its op's argument checks, backend choice, fake kernels, autograd and Triton registrations.

Schemas live in csrc/gif_ops.cpp; the C++ kernels register there per device. Importing this
package registers the Python side of every op.
"""
from .beam_search import BEAM_SEARCH_OPS, MAX_BEAM, has_beam_search_kernel, resolve_beam_search_backend
from .code_ce import REDUCTIONS, check_scale, fused_code_ce, has_cuda_kernels, resolve_backend
from .common import BACKENDS, FLOAT_DTYPES

__all__ = ["BACKENDS", "BEAM_SEARCH_OPS", "FLOAT_DTYPES", "MAX_BEAM", "REDUCTIONS", "check_scale", "fused_code_ce",
           "has_beam_search_kernel", "has_cuda_kernels", "resolve_backend", "resolve_beam_search_backend"]
