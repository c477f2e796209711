"""Numeric constants shared by every backend of the code head.

csrc/code_ce.h repeats them for the C++ kernels; keep the two in step.
"""

# Features and weight rows are divided by max(||v||, NORM_EPS), as torch.nn.functional.normalize does.
NORM_EPS = 1e-12

# ArcFace needs sin(theta) = sqrt(1 - c^2); it is taken as sqrt(max(1 - c^2, SIN_EPS)) so that the
# margin's derivative stays finite at c = +-1 (it is then the derivative of the clamped formula).
SIN_EPS = 1e-12
