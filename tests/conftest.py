import sys

import pytest
import torch

from gif_kernels.triton import interpreted


def triton_available() -> bool:
    """Triton kernels run on a GPU, or on CPU tensors under the Triton interpreter."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available() or interpreted()


def pytest_collection_modifyitems(config, items):
    skip_cuda = pytest.mark.skip(reason="needs a CUDA GPU")
    skip_triton = pytest.mark.skip(reason="needs a CUDA GPU or TRITON_INTERPRET=1")
    for item in items:
        if "cuda" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_cuda)
        if "triton" in item.keywords and not triton_available():
            item.add_marker(skip_triton)


def pytest_terminal_summary(terminalreporter):
    """The number of cases each fuzz test tried (tests/test_fuzz.py)."""
    fuzz = sys.modules.get("tests.test_fuzz")
    for name, count in sorted(fuzz.CASES.items()) if fuzz else ():
        terminalreporter.write_line(f"fuzz: {name}: {count} cases")
