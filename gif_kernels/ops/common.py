"""What the ops' glue shares: the backends' names, the float dtypes the kernels take, and whether
Triton can run on a device."""
import torch

from ..triton import interpreted as triton_interpreted

BACKENDS = ("auto", "cpu", "cuda", "triton", "reference")
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def require_triton(device: torch.device):
    """Raises unless Triton can run on tensors on `device`: CUDA, or the CPU under its interpreter."""
    if not (device.type == "cuda" or (device.type == "cpu" and triton_interpreted())):
        raise RuntimeError(f"backend: 'triton' runs on CUDA tensors, or on CPU tensors with "
                           f"TRITON_INTERPRET=1 set before import; got tensors on {device}")
