"""Face data for the reference trainer: a synthetic identity generator, image folders, insightface
RecordIO and precomputed features, split into training, held-out and verification sets; and
insightface's verification sets (.bin files: valsets.py).

`load_data(spec)` takes `synthetic`, `imagefolder:PATH`, `recordio:PATH` or `features:PATH`. Images
come out as float32 (3, S, S) RGB scaled to [-1, 1] as insightface does ((x / 255 - 0.5) / 0.5).
One module per source (synthetic, images, recordio, features); splits.py makes the splits of real data.
"""
from .features import read_features
from .images import read_image_folder
from .recordio import RECORDIO_MAGIC, read_recordio, write_recordio
from .splits import Splits, split_identities
from .synthetic import SYNTHETIC_IMAGES_PER_ID, synthetic_splits
from .valsets import UnsafePickleError, load_val_sets, parse_val_targets, read_bin, write_bin

DATA_KINDS = ("synthetic", "imagefolder", "recordio", "features")

__all__ = ["DATA_KINDS", "RECORDIO_MAGIC", "SYNTHETIC_IMAGES_PER_ID", "Splits", "UnsafePickleError", "load_data",
           "load_splits", "load_val_sets", "parse_val_targets", "read_bin", "write_bin", "write_recordio"]


def load_data(spec: str, ids: int | None = None, image_size: int = 112,
              images_per_id: int = SYNTHETIC_IMAGES_PER_ID,
              holdout_per_id: int = 2, verify_ids: int | None = None, seed: int = 0) -> Splits:
    """The splits of the data named by `spec`; deterministic given `seed`.

    synthetic: `ids` identities (default 100) with `images_per_id` train and `holdout_per_id`
    ident_test images each; verify holds `verify_ids` further identities (default
    max(20, ids // 5)) with images_per_id + holdout_per_id images each.

    Real data (imagefolder, recordio, features): the identities are shuffled by `seed`;
    `verify_ids` of them (default max(2, K // 10) of K identities, 0 when K < 4) form verify, and
    the first `ids` of the rest (default all) are trained on. Each training identity with more than
    `holdout_per_id` images gives its last `holdout_per_id` (in file order) to ident_test.
    `images_per_id` applies to synthetic data only.
    """
    kind, _, path = spec.partition(":")
    if kind not in DATA_KINDS or (kind == "synthetic") != (path == ""):  # a path for all but synthetic
        raise ValueError(f"data: expected 'synthetic', 'imagefolder:PATH', 'recordio:PATH' or "
                         f"'features:PATH', got {spec!r}")
    if ids is not None and ids < 1:
        raise ValueError(f"ids: expected an integer >= 1, got {ids}")
    if image_size < 16:
        raise ValueError(f"image_size: expected an integer >= 16, got {image_size}")
    if holdout_per_id < 0:
        raise ValueError(f"holdout_per_id: expected an integer >= 0, got {holdout_per_id}")
    if verify_ids is not None and verify_ids < 0:
        raise ValueError(f"verify_ids: expected an integer >= 0, got {verify_ids}")
    if kind == "synthetic":
        return synthetic_splits(100 if ids is None else ids, image_size, images_per_id,
                                 holdout_per_id, verify_ids, seed)
    if kind == "imagefolder":
        inputs, identity, names = read_image_folder(path, image_size)
    elif kind == "recordio":
        inputs, identity, names = read_recordio(path, image_size)
    else:
        inputs, identity, names = read_features(path)
    return split_identities(inputs, identity, names, ids, holdout_per_id, verify_ids, seed)


def load_splits(run: dict) -> Splits:
    """The splits of a trainer run's data (its --data, --ids, ... as parse_run gives them)."""
    return load_data(run["data"], ids=run["ids"], image_size=run["image_size"],
                     images_per_id=run["images_per_id"], holdout_per_id=run["holdout_per_id"],
                     verify_ids=run["verify_ids"], seed=run["seed"])
