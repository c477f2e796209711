"""Training checkpoints: one safetensors file per save, written atomically (files.save_safetensors).

Tensors (model, optimizer state) go in the file's tensors; everything else (the step, the run's
arguments, modules' extra state, optimizer hyper-parameters) in its JSON header. No pickle.
restore_for_evaluation rebuilds a run's model from a checkpoint and the codes beside it.
"""
import json
import os
import re
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open

from ..codebook import CodeBook
from ..files import save_safetensors
from ..tokenize import random_vectors
from .backbones import build_backbone
from .data import load_splits
from .model import RANDOM_VECTORS, FaceModel, build_backbone_for, build_run_head

FILE_PATTERN = re.compile(r"checkpoint-(\d+)\.safetensors")
# Beside the checkpoints in a run's output folder: the codes it trains on and the identity vectors
# they were built from (the L_AR anchors), except random ones, which are made again from --seed. A
# run with --retokenize-after trains in two stages: its --first-head (on the codes made at start when
# that is the code head), then the code head on codes made again from the features learnt, in the
# RETOKENIZED_ files. The stats of each checkpoint past the switch hold its step ("retokenized_at").
CODES_FILE = "codes.safetensors"
VECTORS_FILE = "identity_vectors.npy"
RETOKENIZED_CODES_FILE = "codes-retokenized.safetensors"
RETOKENIZED_VECTORS_FILE = "identity_vectors-retokenized.npy"
STAGE_VECTORS = {CODES_FILE: VECTORS_FILE, RETOKENIZED_CODES_FILE: RETOKENIZED_VECTORS_FILE}
KEEP = 2  # checkpoints kept on disk: the newest, and one before it in case the newest is damaged


def _split(prefix: str, tree, tensors: dict, plain: dict):
    """Flatten nested dicts: tensor leaves into `tensors`, the rest (JSON-able) into `plain`."""
    if isinstance(tree, torch.Tensor):
        tensors[prefix] = tree.detach().to("cpu").contiguous()
    elif isinstance(tree, dict) and tree and all(isinstance(k, (str, int)) for k in tree):
        for key, value in tree.items():
            _split(f"{prefix}/{key}", value, tensors, plain)
    else:
        plain[prefix] = tree


def _join(tensors: dict, plain: dict) -> dict:
    root = {}
    for path, value in [*tensors.items(), *plain.items()]:
        node, keys = root, path.split("/")[1:]
        for key in keys[:-1]:
            node = node.setdefault(key, {})
        node[keys[-1]] = value
    return root


def _int_keys(state: dict) -> dict:
    """Optimizer state is keyed by parameter index (int), which the flat names turned into strings."""
    return {int(k): v for k, v in state.items()}


def save(directory, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer, run: dict,
         stats: dict) -> Path:
    """Write directory/checkpoint-{step}.safetensors atomically and drop all but the newest KEEP."""
    directory = Path(directory)
    tensors, plain = {}, {}
    _split("", {"model": model.state_dict(), "optimizer": optimizer.state_dict()}, tensors, plain)
    path = directory / f"checkpoint-{step}.safetensors"
    # atomic: a kill mid-write leaves the previous checkpoint as the latest
    save_safetensors(path, tensors, {"step": str(step), "run": json.dumps(run), "stats": json.dumps(stats),
                                     "plain": json.dumps(plain)})
    for old in sorted(checkpoints(directory))[:-KEEP]:
        old[1].unlink(missing_ok=True)
    return path


def checkpoints(directory) -> list[tuple[int, Path]]:
    """(step, path) of each checkpoint in directory."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), directory / m.group(0)) for m in map(FILE_PATTERN.fullmatch, os.listdir(directory)) if m]
    return sorted(found)


def load(path) -> dict:
    """{"step", "run", "stats", "model" (state dict), "optimizer" (state dict)} of a checkpoint file."""
    try:
        with safe_open(os.fspath(path), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {key: f.get_tensor(key) for key in f.keys()}
        plain = json.loads(metadata["plain"])
        step, run, stats = int(metadata["step"]), json.loads(metadata["run"]), json.loads(metadata["stats"])
    except Exception as error:
        raise ValueError(f"checkpoint: {path} is not a readable checkpoint (damaged or not one): {error}") from error
    tree = _join(tensors, plain)
    optimizer = tree.get("optimizer", {})
    optimizer["state"] = _int_keys(optimizer.get("state", {}))
    return {"step": step, "run": run, "stats": stats, "model": tree.get("model", {}), "optimizer": optimizer}


def load_latest(directory) -> dict | None:
    """The newest readable checkpoint in directory (older ones if the newest is damaged), or None."""
    errors = []
    for _, path in reversed(checkpoints(directory)):
        try:
            return {**load(path), "path": path}
        except ValueError as error:
            errors.append(str(error))
    if errors:
        raise ValueError("checkpoint: no readable checkpoint in " + os.fspath(directory) + ": " + "; ".join(errors))
    return None


def load_given(path) -> dict:
    """load() of a checkpoint file, or load_latest() of a run's output folder, with its "path"; the
    tools' CHECKPOINT argument."""
    path = Path(path)
    if not path.exists():
        raise ValueError(f"checkpoint: {path} does not exist")
    saved = load_latest(path) if path.is_dir() else {**load(path), "path": path}
    if saved is None:
        raise ValueError(f"checkpoint: no checkpoint in {path}")
    return saved


def stage_head(run: dict, stats: dict) -> tuple[str, str | None]:
    """(head kind, codes file or None) that a checkpoint with these stats trains: the run's --head on
    CODES_FILE; with --retokenize-after, its --first-head until the switch and then the code head on
    RETOKENIZED_CODES_FILE."""
    if run["head"] != "gif":
        return run["head"], None
    if "retokenized_at" in stats:
        return "gif", RETOKENIZED_CODES_FILE
    kind = "gif" if run["retokenize_after"] is None else run["first_head"]
    return kind, CODES_FILE if kind == "gif" else None


def stage_vectors(run: dict, out: Path, codes: str, feature_dim: int, num_ids: int, device):
    """(identity vectors (N, D) or None, anchor table or None, anchor seed or None) of the code-head stage
    on codes file `codes` in OUT. The vectors, which --classifier-init vectors starts the classifier at,
    are those saved beside the codes, else --identity-vectors random's made again from --seed (on the
    codes made at start). The anchors (with --gamma) are the same vectors: random ones as the
    CodeHead's anchor_seed, without a table; others as a table, kept on the CPU unless the model
    trains on a GPU (see CodeHead)."""
    saved = out / STAGE_VECTORS[codes]  # a run that saved its random vectors keeps them
    hashed = codes == CODES_FILE and run["identity_vectors"] == RANDOM_VECTORS and not saved.exists()
    vectors = None
    if run["classifier_init"] == "vectors" or (run["gamma"] > 0 and not hashed):
        vectors = (random_vectors(num_ids, feature_dim, seed=run["seed"]) if hashed else
                   torch.from_numpy(np.load(saved, allow_pickle=False)))
        if vectors.shape[1] != feature_dim:
            raise ValueError(f"--identity-vectors: --gamma and --classifier-init vectors need identity vectors of "
                             f"the features' width {feature_dim}, got {vectors.shape[1]}")
    if run["gamma"] == 0:
        return vectors, None, None
    if hashed:
        return vectors, None, run["seed"]
    device = torch.device(device)
    return vectors, vectors.to(device) if device.type == "cuda" else vectors, None


def restore_for_evaluation(saved: dict, out: Path, device):
    """(model with the checkpoint's weights, data splits, run arguments, CodeBook or None) of a saved checkpoint."""
    run = saved["run"]
    splits = load_splits(run)
    backbone, feature_dim = build_backbone_for(run, splits.input_shape)
    kind, codes = stage_head(run, saved["stats"])
    codebook, anchors, seed = None, None, None
    if codes:  # the code head's anchors re-rank its identifications
        codebook = CodeBook.load(out / codes)
        _, anchors, seed = stage_vectors(run, out, codes, feature_dim, splits.num_ids, "cpu")
    model = FaceModel(backbone, build_run_head(run, kind, feature_dim, splits.num_ids, codebook, anchors, seed))
    model.load_state_dict(saved["model"])
    return model.to(device), splits, run, codebook


def restore_backbone(saved: dict) -> torch.nn.Module:
    """The backbone of a saved checkpoint with its weights (on the CPU, in eval mode), without the data
    or the head."""
    run = saved["run"]
    if run["backbone"] == "none":
        raise ValueError("checkpoint: this run trained a head on features data; it has no backbone")
    backbone = build_backbone(run["backbone"], run["embedding_dim"], run["image_size"])
    prefix = "backbone."
    backbone.load_state_dict({key[len(prefix):]: value for key, value in saved["model"].items()
                              if key.startswith(prefix)})
    return backbone.eval()
