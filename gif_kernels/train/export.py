"""Export a checkpoint's backbone to ONNX for deployment: images (batch, 3, S, S) in [-1, 1] to
embeddings (batch, D), not normalized, the batch dimension dynamic.

    python -m gif_kernels.train.export OUT/checkpoint-S.safetensors --onnx backbone.onnx

Where onnxruntime is installed, the exported file is run on a batch of random images of another
size than the traced one, and its output is compared with PyTorch's (the largest difference is
printed; beyond EXPORT_TOLERANCE the export fails). Needs the onnx and onnxscript packages (pip
install "gif-kernels[onnx]", which brings onnxruntime too).
"""
import os

import torch

from ..cli import ArgumentParser, one_line_errors
from ..files import atomic_write
from . import checkpoint

ONNX_OPSET = 18
EXPORT_TOLERANCE = 1e-3  # largest |onnxruntime - torch| of float32 embeddings, relative to their largest value
TRACE_BATCH, CHECK_BATCH = 2, 3


def export_onnx(backbone: torch.nn.Module, image_size: int, path, opset: int = ONNX_OPSET):
    """Write backbone (in eval mode) as an ONNX graph with input "images" and output "embeddings"."""
    try:  # torch.onnx's exporter needs both; importing them here names what is missing
        import onnx  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError as error:
        raise ImportError('ONNX export needs the onnx and onnxscript packages: pip install onnx onnxscript '
                          '(or "gif-kernels[onnx]")') from error
    backbone = backbone.eval()
    images = torch.zeros(TRACE_BATCH, 3, image_size, image_size)
    # torch.export's exporter: the TorchScript one cannot express the small CNN's adaptive pooling to
    # 4 x 4 from a map whose side is not a multiple of 4 (7 x 7 at 112 x 112).
    with atomic_write(path) as tmp:
        torch.onnx.export(backbone, (images,), tmp, input_names=["images"], output_names=["embeddings"],
                          dynamic_shapes=({0: torch.export.Dim("batch")},), opset_version=opset, dynamo=True,
                          external_data=False)


def check_onnx(backbone: torch.nn.Module, image_size: int, path, seed: int = 0) -> float | None:
    """Largest |onnxruntime - torch| over a random batch of CHECK_BATCH images, relative to the largest
    |torch| output; None where onnxruntime is not installed."""
    try:
        import onnxruntime
    except ImportError:
        return None
    images = torch.rand(CHECK_BATCH, 3, image_size, image_size, generator=torch.Generator().manual_seed(seed)) * 2 - 1
    with torch.no_grad():
        expected = backbone.eval()(images)
    session = onnxruntime.InferenceSession(os.fspath(path), providers=["CPUExecutionProvider"])
    (actual,) = session.run(["embeddings"], {"images": images.numpy()})
    return float((torch.from_numpy(actual) - expected).abs().max() / expected.abs().max().clamp_min(1e-12))


def main(argv=None):
    parser = ArgumentParser(prog="python -m gif_kernels.train.export", description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", help="a checkpoint-S.safetensors file, or the run's output folder (its newest)")
    parser.add_argument("--onnx", required=True, help="the .onnx file to write")
    parser.add_argument("--opset", type=int, default=ONNX_OPSET, help="ONNX opset version")
    args = parser.parse_args(argv)
    with one_line_errors():
        saved = checkpoint.load_given(args.checkpoint)
        backbone = checkpoint.restore_backbone(saved)
        image_size = saved["run"]["image_size"]
        export_onnx(backbone, image_size, args.onnx, args.opset)
        difference = check_onnx(backbone, image_size, args.onnx)
        if difference is None:
            print(f"wrote {args.onnx} (not checked: onnxruntime is not installed)")
        elif difference > EXPORT_TOLERANCE:
            os.unlink(args.onnx)
            raise ValueError(f"onnx: onnxruntime's embeddings differ from PyTorch's by {difference:.2e} (relative), "
                             f"more than {EXPORT_TOLERANCE:.0e}; the file was removed")
        else:
            print(f"wrote {args.onnx}; onnxruntime matches PyTorch within {difference:.1e} (relative) "
                  f"on a batch of {CHECK_BATCH}")


if __name__ == "__main__":
    main()
