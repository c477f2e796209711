"""The splits of face data: Splits, and how real data (every kind of file) is split by identity."""
from typing import NamedTuple

import numpy as np
import torch
from torch.utils.data import Dataset


class Splits(NamedTuple):
    """Datasets of (input, label) items: float32 inputs, int labels."""
    train: Dataset           # labels in [0, num_ids)
    ident_test: Dataset      # held-out images of the training identities, labels in [0, num_ids)
    verify: Dataset          # identities not trained on, labels in [0, number of verify identities)
    num_ids: int
    input_shape: tuple       # (3, S, S) for images, (D,) for features
    train_labels: torch.Tensor  # int64 (len(train),): the label of each train item, in item order
    names: list[str] | None  # each training identity's folder name or label value; None if synthetic


def split_identities(inputs: Dataset, identity: np.ndarray, names: list, ids: int | None, holdout_per_id: int,
                     verify_ids: int | None, seed: int) -> Splits:
    """The Splits of real data, as every reader gives it: `inputs`, a dataset of inputs only; `identity`,
    the identity (0 .. K-1) of each of its items; `names`, the K identity names. See load_data."""
    num_identities = len(names)
    if verify_ids is None:
        verify_ids = max(2, num_identities // 10) if num_identities >= 4 else 0
    if verify_ids >= num_identities:
        raise ValueError(f"verify_ids: {verify_ids} leaves none of the {num_identities} identities "
                         f"to train on")
    shuffled = torch.randperm(num_identities, generator=torch.Generator().manual_seed(seed)).numpy()
    verify = np.sort(shuffled[:verify_ids])
    trainable = shuffled[verify_ids:]
    if ids is not None and ids > len(trainable):
        raise ValueError(f"ids: {ids}, but only {len(trainable)} of the {num_identities} identities "
                         f"are left after verify_ids={verify_ids}")
    train = np.sort(trainable[:ids])

    # Rank of each item among its identity's items, in item order, to find each identity's last ones.
    counts = np.bincount(identity, minlength=num_identities)
    order = np.argsort(identity, kind="stable")
    rank = np.empty_like(identity)
    rank[order] = np.arange(len(identity)) - np.repeat(np.cumsum(counts) - counts, counts)
    count = counts[identity]
    held_out = (count > holdout_per_id) & (rank >= count - holdout_per_id)

    def relabel(chosen):  # new label of each identity: its position in chosen, or -1
        labels = np.full(num_identities, -1)
        labels[chosen] = np.arange(len(chosen))
        return labels[identity]

    train_label, verify_label = relabel(train), relabel(verify)
    train_items = np.flatnonzero((train_label >= 0) & ~held_out)
    test_items = np.flatnonzero((train_label >= 0) & held_out)
    verify_items = np.flatnonzero(verify_label >= 0)
    return Splits(
        train=_Relabeled(inputs, train_items, train_label[train_items]),
        ident_test=_Relabeled(inputs, test_items, train_label[test_items]),
        verify=_Relabeled(inputs, verify_items, verify_label[verify_items]),
        num_ids=len(train),
        input_shape=inputs.input_shape,
        train_labels=torch.from_numpy(train_label[train_items]),
        names=[names[i] for i in train],
    )


class _Relabeled(Dataset):
    """Items `indices` of a dataset of inputs, paired with `labels`."""

    def __init__(self, inputs: Dataset, indices: np.ndarray, labels: np.ndarray):
        self.inputs, self.indices, self.labels = inputs, indices, labels

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, index: int):
        return self.inputs[int(self.indices[index])], int(self.labels[index])
