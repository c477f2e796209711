"""Evaluation of a trained model: identification and verification.

- Identification: held-out images of the training identities, top-1 / top-5 of head.identify()
  (beam search over the code trie for the code head, its candidates re-ranked by their anchors when
  it has them; every class for the softmax heads).
- Verification: genuine / impostor pairs among images of identities never trained on, scored by
  the cosine of backbone embeddings; TAR at FAR 1e-3 and 1e-4 from scikit-learn's ROC.
- insightface's verification sets (lfw.bin, cfp_fp.bin, ...): 10-fold accuracy of flip-test
  embeddings, computed as insightface's verification.py does, so that it compares with published numbers.

    python -m gif_kernels.train.evaluate OUT/checkpoint-S.safetensors [--out DIR] [--val-targets lfw,...]
"""
import json
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..cli import ArgumentParser, one_line_errors
from ..codebook import CodeBook
from ..constants import NORM_EPS
from ..files import atomic_write
from . import checkpoint
from .data import load_val_sets, parse_val_targets
from .model import embed

FARS = (1e-3, 1e-4)
# Pairs scored for verification: all of them up to this many, else this many sampled.
MAX_PAIRS = 4_000_000
PAIR_CHUNK = 1 << 16  # pairs whose embeddings are gathered at once
IDENTIFY_BATCH = 1024
# insightface's verification-set accuracy: 10 folds, thresholds on the squared distance of unit embeddings.
VAL_FOLDS = 10
VAL_THRESHOLDS = np.arange(0, 4, 0.01)


@torch.no_grad()
def identification(head, features: torch.Tensor, labels: torch.Tensor, device, beam: int) -> dict:
    """Top-1 and top-5 accuracy of head.identify on features (n, D) with true labels (n,)."""
    hits1 = hits5 = certified = 0
    for start in range(0, len(labels), IDENTIFY_BATCH):
        batch = features[start:start + IDENTIFY_BATCH].to(device)
        ids, _, exact = head.identify(batch, beam=beam, topk=5)
        truth = labels[start:start + IDENTIFY_BATCH, None].to(ids.device)
        hits1 += int((ids[:, :1] == truth).sum())
        hits5 += int((ids == truth).any(1).sum())
        certified += int(exact.sum())
    count = max(len(labels), 1)
    return {"ident_top1": hits1 / count, "ident_top5": hits5 / count, "ident_exact": certified / count,
            "ident_queries": len(labels)}


def verification_pairs(labels: torch.Tensor, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(i, j) index pairs, i < j: all pairs of the n images when there are at most MAX_PAIRS, else
    every genuine pair (up to MAX_PAIRS / 2, sampled) and random impostor pairs to fill."""
    n = len(labels)
    if n * (n - 1) // 2 <= MAX_PAIRS:
        return torch.triu_indices(n, n, offset=1).unbind(0)
    generator = torch.Generator().manual_seed(seed)
    order = torch.argsort(labels, stable=True)
    counts = torch.unique_consecutive(labels[order], return_counts=True)[1]
    genuine = [torch.combinations(group, 2) for group in torch.split(order, counts.tolist()) if len(group) > 1]
    genuine = torch.cat(genuine) if genuine else torch.empty(0, 2, dtype=torch.long)
    if len(genuine) > MAX_PAIRS // 2:
        genuine = genuine[torch.randperm(len(genuine), generator=generator)[:MAX_PAIRS // 2]]
    draw = torch.randint(n, (2, MAX_PAIRS - len(genuine)), generator=generator)
    impostor = draw[:, labels[draw[0]] != labels[draw[1]]].T
    pairs = torch.cat([genuine, impostor]).sort(dim=1).values
    return pairs[:, 0], pairs[:, 1]


def sklearn_roc_curve():
    """scikit-learn's roc_curve, which every TAR@FAR here reads off; a named error without it."""
    try:
        from sklearn.metrics import roc_curve
    except ImportError as error:
        raise ImportError("verification needs scikit-learn: pip install scikit-learn "
                          "(or gif-kernels[train])") from error
    return roc_curve


def verification(embeddings: torch.Tensor, labels: torch.Tensor, seed: int = 0) -> dict:
    """TAR at each FAR in FARS over the pairs of verification_pairs, by cosine similarity."""
    roc_curve = sklearn_roc_curve()
    first, second = verification_pairs(labels, seed)
    z = F.normalize(embeddings.float(), dim=1, eps=NORM_EPS)
    similarity = torch.cat([(z[first[i:i + PAIR_CHUNK]] * z[second[i:i + PAIR_CHUNK]]).sum(1)
                            for i in range(0, len(first), PAIR_CHUNK)]).numpy()
    genuine = (labels[first] == labels[second]).numpy()
    result = {"genuine_pairs": int(genuine.sum()), "impostor_pairs": int((~genuine).sum())}
    if result["genuine_pairs"] == 0 or result["impostor_pairs"] == 0:
        return {**result, **{f"tar@far={far:.0e}".replace("e-0", "e-"): math.nan for far in FARS}}
    fpr, tpr, _ = roc_curve(genuine, similarity)
    for far in FARS:  # the best TAR among thresholds whose FAR does not exceed the target
        result[f"tar@far={far:.0e}".replace("e-0", "e-")] = float(tpr[np.searchsorted(fpr, far, side="right") - 1])
    return result


def ten_fold_accuracy(embeddings: torch.Tensor, is_same: np.ndarray, folds: int = VAL_FOLDS) -> tuple[float, float]:
    """(mean, standard deviation) over folds of insightface's verification accuracy: embeddings (2P, D)
    of P pairs (2p, 2p + 1), is_same (P,). The P pairs are cut into `folds` consecutive folds; for
    each, the threshold on the squared distance of the normalized embeddings (of VAL_THRESHOLDS) that
    is most accurate on the other folds (the first of equals) is scored on this one."""
    z = F.normalize(embeddings.double(), dim=1, eps=NORM_EPS)
    distance = ((z[0::2] - z[1::2]) ** 2).sum(1).numpy()
    is_same = np.asarray(is_same, dtype=bool)
    if len(distance) != len(is_same) or len(embeddings) % 2:
        raise ValueError(f"embeddings: expected 2 per is_same flag ({2 * len(is_same)}), got {len(embeddings)}")
    if len(is_same) < folds:
        raise ValueError(f"is_same: {len(is_same)} pairs cannot make {folds} folds")
    correct = (distance[:, None] < VAL_THRESHOLDS[None, :]) == is_same[:, None]  # (P, thresholds)
    accuracy = []
    for test in np.array_split(np.arange(len(is_same)), folds):
        train = np.ones(len(is_same), dtype=bool)
        train[test] = False
        best = np.argmax(correct[train].mean(0))
        accuracy.append(correct[test, best].mean())
    return float(np.mean(accuracy)), float(np.std(accuracy))


def val_set_metrics(backbone, val_sets, device, workers: int = 0) -> dict:
    """{NAME_accuracy, NAME_accuracy_std} of each verification set (data.valsets.VerificationPairs):
    ten_fold_accuracy of flip-test embeddings, as insightface reports them."""
    metrics = {}
    for pairs in val_sets:
        embeddings, _ = embed(backbone, pairs, device, workers=workers, flip=True)
        metrics[f"{pairs.name}_accuracy"], metrics[f"{pairs.name}_accuracy_std"] = \
            ten_fold_accuracy(embeddings, pairs.is_same)
    return metrics


def evaluate(model, splits, device, beam: int = 32, workers: int = 0, seed: int = 0) -> dict:
    """Identification and verification metrics of a FaceModel on the held-out splits."""
    was_training = model.training
    model.eval()
    ident_features, ident_labels = embed(model.backbone, splits.ident_test, device, workers=workers)
    metrics = identification(model.head, ident_features, ident_labels, device, beam) if len(ident_labels) else {}
    verify_embeddings, verify_labels = embed(model.backbone, splits.verify, device, workers=workers)
    if len(verify_labels):
        metrics.update(verification(verify_embeddings, verify_labels, seed))
    model.train(was_training)
    return metrics


def run_description(run: dict, num_ids: int, codebook: CodeBook | None, step: int, stats: dict) -> dict:
    """The keys of metrics.json that say what was measured (beside the measurements)."""
    description = {"head": run["head"], "steps": step, "images_per_s": stats.get("images_per_s"),
                   "backbone": run["backbone"], "num_ids": num_ids, "processes": stats.get("processes"),
                   "threads": torch.get_num_threads()}
    if codebook is not None:
        description.update(code_length=codebook.length, vocab=codebook.vocab)
    if "retokenized_at" in stats:
        description["retokenized_at"] = stats["retokenized_at"]
    return description


def write_metrics(directory, metrics: dict) -> Path:
    """Merge `metrics` into directory/metrics.json (keys it does not name are kept), atomically."""
    Path(directory).mkdir(parents=True, exist_ok=True)
    path = Path(directory) / "metrics.json"
    merged = {**(json.loads(path.read_text()) if path.exists() else {}), **metrics}
    with atomic_write(path) as tmp:
        Path(tmp).write_text(json.dumps(merged, indent=2, sort_keys=True) + "\n")
    return path


def main(argv=None):
    parser = ArgumentParser(prog="python -m gif_kernels.train.evaluate",
                            description="Evaluate a checkpoint of the reference trainer.")
    parser.add_argument("checkpoint", help="a checkpoint-S.safetensors file, or the run's output folder (its newest)")
    parser.add_argument("--out", help="folder for metrics.json (default: the checkpoint's folder)")
    parser.add_argument("--beam", type=int, help="beam width of identify() (default: the run's --eval-beam)")
    parser.add_argument("--workers", type=int, default=0, help="DataLoader worker processes")
    parser.add_argument("--val-targets", help="verification sets as the trainer's --val-targets (default: the run's)")
    args = parser.parse_args(argv)
    if args.beam is not None and args.beam < 1:
        parser.error(f"--beam: expected an integer >= 1, got {args.beam}")
    with one_line_errors():
        saved = checkpoint.load_given(args.checkpoint)
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        model, splits, run, codebook = checkpoint.restore_for_evaluation(saved, Path(saved["path"]).parent, device)
        metrics = evaluate(model, splits, device, args.beam or run["eval_beam"], args.workers, run["seed"])
        targets = run.get("val_targets", []) if args.val_targets is None else parse_val_targets(args.val_targets)
        val_sets = load_val_sets(targets, run["data"], run["image_size"])
        metrics.update(val_set_metrics(model.backbone, val_sets, device, args.workers))
        metrics.update(run_description(run, splits.num_ids, codebook, saved["step"], saved["stats"]))
        print(json.dumps(metrics, indent=2, sort_keys=True))
        print(f"wrote {write_metrics(args.out or Path(saved['path']).parent, metrics)}")


if __name__ == "__main__":
    main()
