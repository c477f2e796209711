"""The IJB-B / IJB-C 1:1 verification protocol in the layout insightface distributes it (IJB_release):

    ROOT/loose_crop/NAME.jpg                   the face images
    ROOT/meta/ijbc_name_5pts_score.txt         NAME x1 y1 ... x5 y5 faceness-score, one line per image
    ROOT/meta/ijbc_face_tid_mid.txt            NAME template-id media-id, the same images in the same order
    ROOT/meta/ijbc_template_pair_label.txt     template-id template-id 1|0 (same person or not)

(ijbb_ for IJB-B.) Each image is aligned from its landmarks to insightface's 112 x 112 crop.
"""
import os
from typing import NamedTuple

import numpy as np
import torch
from torch.utils.data import Dataset

from ...constants import NORM_EPS
from .align import ARCFACE_SIZE, align_face
from .images import decode_pixels, to_input

IJB_TARGETS = ("IJBB", "IJBC")


class IJBProtocol(NamedTuple):
    names: list[str]          # image file names under ROOT/loose_crop, n of them
    landmarks: np.ndarray     # float64 (n, 5, 2)
    faceness: np.ndarray      # float32 (n,): the detector's score of each face
    templates: np.ndarray     # int64 (n,): the template of each image
    medias: np.ndarray        # int64 (n,): the media (photo or video) of each image
    pairs: np.ndarray         # int64 (p, 2): template pairs to verify
    is_same: np.ndarray       # bool (p,)


def _meta(root: str, target: str, name: str) -> str:
    path = os.path.join(root, "meta", f"{target.lower()}_{name}.txt")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"root: {path} not found (expected insightface's IJB layout: ROOT/meta/ and "
                                f"ROOT/loose_crop/)")
    return path


def _lines(path: str) -> list[list[str]]:
    with open(path) as file:
        return [line.split() for line in file if line.strip()]


def read_ijb(root: str, target: str = "IJBC") -> IJBProtocol:
    """The protocol of IJB-B or IJB-C (target) under root, checked: every image has 5 landmarks and a
    score, the two image lists agree, and every template of a pair has images."""
    if target not in IJB_TARGETS:
        raise ValueError(f"target: expected one of {IJB_TARGETS}, got {target!r}")
    faces_file, members_file, pair_file = (_meta(root, target, name) for name in
                                           ("name_5pts_score", "face_tid_mid", "template_pair_label"))
    faces, members = _lines(faces_file), _lines(members_file)
    if not faces or any(len(fields) != 12 for fields in faces):
        raise ValueError(f"root: {faces_file}: expected lines of a name, 10 landmark coordinates and a score")
    if len(members) != len(faces) or any(len(m) != 3 or m[0] != f[0] for m, f in zip(members, faces)):
        raise ValueError(f"root: {members_file}: expected 'name template media' for the images of "
                         f"{os.path.basename(faces_file)}, in its order")
    try:
        numbers = np.array([fields[1:] for fields in faces], dtype=np.float64)
        ids = np.array([fields[1:] for fields in members], dtype=np.int64)
    except ValueError as error:
        raise ValueError(f"root: {root}: the meta files hold a value that is not a number: {error}") from error
    if not np.isfinite(numbers).all():
        raise ValueError(f"root: {faces_file}: landmarks and scores must be finite")
    try:  # numpy's C parser: IJB-C has 15.7M pairs
        pairs = np.loadtxt(pair_file, dtype=np.int64, ndmin=2)
    except ValueError as error:
        raise ValueError(f"root: {pair_file}: expected lines of 'template template label': {error}") from error
    if pairs.shape[1] != 3 or not len(pairs):
        raise ValueError(f"root: {pair_file}: expected lines of 'template template label'")
    if not np.isin(pairs[:, 2], (0, 1)).all():
        raise ValueError(f"root: {pair_file}: labels must be 0 or 1")
    if pairs[:, 2].min() == pairs[:, 2].max():
        raise ValueError(f"root: {pair_file}: needs pairs of both labels for a ROC")
    known = np.isin(pairs[:, :2], ids[:, 0])
    if not known.all():
        raise ValueError(f"root: template {pairs[:, :2][~known][0]} of a pair has no images")
    for fields in faces:  # names stay inside ROOT/loose_crop
        if os.path.isabs(fields[0]) or ".." in fields[0].replace("\\", "/").split("/"):
            raise ValueError(f"root: image name {fields[0]!r} points outside {os.path.join(root, 'loose_crop')}")
    return IJBProtocol(names=[fields[0] for fields in faces], landmarks=numbers[:, :10].reshape(-1, 5, 2),
                       faceness=numbers[:, 10].astype(np.float32), templates=ids[:, 0], medias=ids[:, 1],
                       pairs=pairs[:, :2], is_same=pairs[:, 2].astype(bool))


class IJBFaces(Dataset):
    """The protocol's images as (aligned input (3, S, S) float32 in [-1, 1], image index) items."""

    def __init__(self, root: str, protocol: IJBProtocol, image_size: int = ARCFACE_SIZE):
        self.folder, self.protocol, self.image_size = os.path.join(root, "loose_crop"), protocol, image_size
        self.input_shape = (3, image_size, image_size)

    def __len__(self):
        return len(self.protocol.names)

    def __getitem__(self, index: int):
        path = os.path.join(self.folder, self.protocol.names[index])
        pixels = decode_pixels(path, None, path)
        return to_input(align_face(pixels, self.protocol.landmarks[index], self.image_size)), index


def template_features(features: torch.Tensor, templates: np.ndarray, medias: np.ndarray) -> tuple:
    """(unit template features (t, D), template ids (t,) ascending) as insightface pools them: the
    mean of each media's image features, summed over a template's media, then normalized."""
    features = torch.as_tensor(features, dtype=torch.float64)
    keys, media_of_image = np.unique(np.stack([templates, medias], 1), axis=0, return_inverse=True)
    media_of_image = torch.from_numpy(media_of_image.reshape(-1))
    counts = torch.bincount(media_of_image, minlength=len(keys)).double()
    media = torch.zeros(len(keys), features.shape[1], dtype=torch.float64).index_add_(0, media_of_image, features)
    media /= counts[:, None]
    template_ids, template_of_media = np.unique(keys[:, 0], return_inverse=True)
    pooled = torch.zeros(len(template_ids), features.shape[1], dtype=torch.float64)
    pooled.index_add_(0, torch.from_numpy(template_of_media.reshape(-1)), media)
    return torch.nn.functional.normalize(pooled, dim=1, eps=NORM_EPS), template_ids
