"""Precomputed features: a .npz with `features` and `labels`, or a folder of memory-mapped .npy files."""
import os

import numpy as np
import torch
from torch.utils.data import Dataset


class _FeatureRows(Dataset):
    def __init__(self, features: np.ndarray):
        self.features = features
        self.input_shape = features.shape[1:]

    def __len__(self):
        return len(self.features)

    def __getitem__(self, index: int) -> torch.Tensor:
        return torch.from_numpy(np.array(self.features[index], dtype=np.float32))


def read_features(path: str):
    """PATH is a .npz with arrays `features` (n, D) and `labels` (n,), or a folder with
    features.npy and labels.npy (memory-mapped, so large files are read as needed)."""
    if os.path.isdir(path):
        files = [os.path.join(path, name) for name in ("features.npy", "labels.npy")]
        for file in files:
            if not os.path.isfile(file):
                raise FileNotFoundError(f"data: features file {file} not found")
        features, labels = (np.load(file, mmap_mode="r", allow_pickle=False) for file in files)
    elif os.path.isfile(path):
        with np.load(path, allow_pickle=False) as archive:
            missing = {"features", "labels"} - set(archive.files)
            if missing:
                raise ValueError(f"data: {path} lacks arrays {sorted(missing)} (expected 'features' "
                                 f"(n, D) and 'labels' (n,))")
            features, labels = archive["features"], archive["labels"]
    else:
        raise FileNotFoundError(f"data: features {path} not found (expected a .npz or a folder with "
                                f"features.npy and labels.npy)")
    if features.ndim != 2 or not np.issubdtype(features.dtype, np.floating):
        raise ValueError(f"data: features in {path} must be a float (n, D) array, got {features.dtype} "
                         f"{features.shape}")
    if labels.shape != features.shape[:1] or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"data: labels in {path} must be an integer ({len(features)},) array, got "
                         f"{labels.dtype} {labels.shape}")
    if len(labels) == 0:
        raise ValueError(f"data: {path} has no features")
    values, identity = np.unique(labels, return_inverse=True)
    return _FeatureRows(features), identity, [str(value) for value in values]
