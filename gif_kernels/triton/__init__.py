"""Triton kernels, one file per op."""

# Compile options of every launch. FMA contraction stays on explicitly: it is what the kernels were
# verified with on GPUs, and Triton 3.9 warns that its default turns off in 3.10.
LAUNCH_OPTIONS = dict(enable_fp_fusion=True)
