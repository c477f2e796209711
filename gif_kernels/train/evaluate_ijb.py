"""IJB-B / IJB-C 1:1 verification of a checkpoint's backbone, as insightface's eval_ijbc.py computes it.

    python -m gif_kernels.train.evaluate_ijb --root IJB_release/IJBC --target IJBC OUT/checkpoint-S.safetensors
    python -m gif_kernels.train.evaluate_ijb --root IJB_release/IJBC --backbone iresnet100 backbone.pth

Each face is aligned from its 5 landmarks to the 112 x 112 crop; its feature is the sum of the
backbone's embeddings of the crop and of its mirror image (flip test), not normalized, times the
detector's faceness score; media features are the mean of their images', template features the sum
of their media's, normalized; a pair's score is the cosine of its templates' features. TAR at each FAR
is read off the ROC at the point whose FAR is nearest the target (the highest TAR among equals), as
eval_ijbc.py reads it, so the table compares with published IJB numbers (and a model zoo .pth,
evaluated here, with insightface's own). Writes TARGET.json (the table), TARGET.npy (every pair's
score) and TARGET.png (the ROC, log FAR) into --out.
"""
import json
from pathlib import Path

import numpy as np
import torch

from ..cli import ArgumentParser, one_line_errors
from ..files import atomic_write
from . import checkpoint
from .backbones import BACKBONES, build_backbone, load_backbone_weights
from .data.align import ARCFACE_SIZE
from .data.ijb import IJB_TARGETS, IJBFaces, read_ijb, template_features
from .evaluate import PAIR_CHUNK, sklearn_roc_curve
from .model import embed

IJB_FARS = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)


def tar_at_far(fpr: np.ndarray, tpr: np.ndarray, fars=IJB_FARS) -> dict:
    """{far: TAR} of a ROC (scikit-learn's roc_curve order), each at its point whose FAR is nearest far
    (of equally near ones, the highest TAR): insightface's rule for the IJB tables."""
    fpr, tpr = fpr[::-1], tpr[::-1]  # argmin takes the first of equals: here the highest TAR
    return {far: float(tpr[np.argmin(np.abs(fpr - far))]) for far in fars}


def pair_scores(features: torch.Tensor, protocol) -> np.ndarray:
    """The cosine of each protocol pair's template features, pooled from image features (n, D)."""
    pooled, template_ids = template_features(features, protocol.templates, protocol.medias)
    first, second = (torch.from_numpy(np.searchsorted(template_ids, protocol.pairs[:, k])) for k in (0, 1))
    return torch.cat([(pooled[first[i:i + PAIR_CHUNK]] * pooled[second[i:i + PAIR_CHUNK]]).sum(1)
                      for i in range(0, len(first), PAIR_CHUNK)]).numpy()


def pyplot():
    """matplotlib's pyplot, drawing to files."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as error:
        raise ImportError('the ROC plot needs matplotlib: pip install matplotlib (or "gif-kernels[train]")') from error
    return plt


def plot_roc(fpr: np.ndarray, tpr: np.ndarray, title: str, path: Path):
    plt = pyplot()
    figure, axes = plt.subplots(figsize=(6, 4.5))
    axes.plot(fpr, tpr, lw=1)
    axes.set(xscale="log", xlim=(IJB_FARS[0], IJB_FARS[-1]), ylim=(0.3, 1.0), xlabel="False accept rate",
             ylabel="True accept rate", title=title)
    axes.grid(linestyle="--")
    figure.tight_layout()
    with atomic_write(path) as tmp:
        figure.savefig(tmp, format="png", dpi=120)
    plt.close(figure)


def load_model(path: str, backbone_name: str, embedding_dim: int) -> tuple:
    """(backbone, image size, {"model", "step"}, default output folder) of a trainer checkpoint (file
    or run folder) or of a .pth state dict of backbone_name at insightface's 112 x 112."""
    if path.endswith(".pth"):
        backbone = load_backbone_weights(build_backbone(backbone_name, embedding_dim, ARCFACE_SIZE), path,
                                         argument="model")
        return backbone.eval(), ARCFACE_SIZE, {"model": path}, Path(path).parent
    saved = checkpoint.load_given(path)
    return (checkpoint.restore_backbone(saved), saved["run"]["image_size"],
            {"model": str(saved["path"]), "step": saved["step"]}, Path(saved["path"]).parent)


def main(argv=None):
    parser = ArgumentParser(prog="python -m gif_kernels.train.evaluate_ijb", description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="a checkpoint-S.safetensors file, a run's output folder (its newest "
                                      "checkpoint), or a .pth state dict of --backbone (insightface's model zoo)")
    parser.add_argument("--backbone", default="iresnet50", choices=BACKBONES, help="the backbone of a .pth model")
    parser.add_argument("--embedding-dim", type=int, default=512, help="the embedding width of a .pth model")
    parser.add_argument("--root", required=True, help="the protocol's folder, holding meta/ and loose_crop/")
    parser.add_argument("--target", default="IJBC", choices=IJB_TARGETS, help="IJB-B or IJB-C")
    parser.add_argument("--out", help="folder for the results (default: the checkpoint's folder)")
    parser.add_argument("--batch-size", type=int, default=256, help="images per backbone call")
    parser.add_argument("--workers", type=int, default=0, help="DataLoader worker processes (reading, aligning)")
    args = parser.parse_args(argv)
    if args.batch_size < 1:
        parser.error(f"--batch-size: expected an integer >= 1, got {args.batch_size}")
    with one_line_errors():
        sklearn_roc_curve(), pyplot()  # before the images are embedded
        backbone, image_size, source, folder = load_model(args.model, args.backbone, args.embedding_dim)
        protocol = read_ijb(args.root, args.target)
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        backbone = backbone.to(device)
        faces = IJBFaces(args.root, protocol, image_size)
        features, _ = embed(backbone, faces, device, args.batch_size, args.workers, flip=True)
        features = features * torch.from_numpy(protocol.faceness)[:, None]
        scores = pair_scores(features, protocol)
        fpr, tpr, _ = sklearn_roc_curve()(protocol.is_same, scores)  # one sort of the scores (15.7M on IJB-C)
        table = tar_at_far(fpr, tpr)
        out = Path(args.out or folder)
        out.mkdir(parents=True, exist_ok=True)
        stem = out / args.target.lower()
        result = {"target": args.target, **source, "images": len(protocol.names), "pairs": len(scores),
                  "tar@far": {f"{far:.0e}": tar for far, tar in table.items()}}
        with atomic_write(stem.with_suffix(".json")) as tmp:
            Path(tmp).write_text(json.dumps(result, indent=2) + "\n")
        with atomic_write(stem.with_suffix(".npy")) as tmp, open(tmp, "wb") as file:
            np.save(file, scores)
        plot_roc(fpr, tpr, f"ROC on {args.target}: {Path(source['model']).name}",
                 stem.with_suffix(".png"))
        print(f"{'FAR':>10}" + "".join(f"{far:>9.0e}" for far in table))
        print(f"{'TAR (%)':>10}" + "".join(f"{100 * tar:>9.2f}" for tar in table.values()))
        print(f"wrote {stem.with_suffix('.json')}, .npy, .png")


if __name__ == "__main__":
    main()
