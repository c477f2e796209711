"""Triton kernels, one file per op."""
import os

# Compile options of every launch. FMA contraction stays on explicitly: it is what the kernels were
# verified with on GPUs, and Triton 3.9 warns that its default turns off in 3.10.
LAUNCH_OPTIONS = dict(enable_fp_fusion=True)


def interpreted() -> bool:
    """Whether Triton runs its kernels in its interpreter, on CPU tensors: TRITON_INTERPRET=1, which
    Triton reads when it is imported."""
    return os.environ.get("TRITON_INTERPRET") == "1"
