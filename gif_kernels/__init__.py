"""gif-kernels: fused kernels for identity-code heads in face recognition at scale.

Importing the package loads the compiled extension, which registers torch.ops.gif.*.
"""
import torch  # loads libtorch, which _C links against

try:
    from . import _C
except ImportError as error:  # the extension is built by pip install, not at import
    raise ImportError(
        "gif_kernels._C (the compiled extension) is missing or does not load: build it with "
        "`pip install --no-build-isolation -e .` from the source tree (needs torch, ninja and a "
        f"C++ compiler). Cause: {error}") from error

from . import ops
from .codebook import CodeBook, CodeTrie
from .decode import code_beam_search, exhaustive_code_topk
from .head import CodeHead
from .ops import BACKENDS, fused_code_ce

build_info = _C.build_info

__all__ = ["BACKENDS", "CodeBook", "CodeHead", "CodeTrie", "build_info", "code_beam_search", "exhaustive_code_topk",
           "fused_code_ce", "ops"]
