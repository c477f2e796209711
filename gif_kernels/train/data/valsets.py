"""insightface's verification sets: lfw.bin, cfp_fp.bin, agedb_30.bin, calfw.bin, cplfw.bin, ...

A .bin is a pickle of (images, is_same): 2P encoded images (JPEG or PNG bytes) and P flags, pair p
being images 2p and 2p + 1. insightface writes them with Python 2's pickle (strings) or Python 3's
(bytes), the flags as a list of bools or a numpy array. A pickle can name any function to call while
it loads, so the file is read by an unpickler that resolves only the few globals such files use (those
that rebuild numpy arrays and scalars, and `_codecs.encode`, with which Python 3 pickles bytes at
protocols below 3); any other global is refused with UnsafePickleError before it is imported or called.
"""
import io
import os
import pickle

import numpy as np
import torch
from torch.utils.data import Dataset

from .images import decode_pixels, pillow, to_input

# The verification sets insightface ships in its training folders (arcface_torch's val_targets).
VAL_SET_NAMES = ("lfw", "cfp_fp", "agedb_30", "calfw", "cplfw", "cfp_ff", "vgg2_fp")
BIN_SUFFIX = ".bin"

_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),  # protocol 5 arrays
    ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
}


class UnsafePickleError(pickle.UnpicklingError):
    """A .bin names a global other than those a verification set needs: it could run code."""


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file, name: str):
        super().__init__(file, encoding="bytes")  # Python 2 strings are image bytes, not text
        self.name = name

    def find_class(self, module, name):
        if (module, name) not in _ALLOWED_GLOBALS:
            raise UnsafePickleError(f"val set {self.name}: refuses to load the global {module}.{name}: a "
                                    f"verification .bin holds only image bytes and is-same flags")
        return super().find_class(module, name)


def _image_bytes(item, index: int, name: str) -> bytes:
    if isinstance(item, (bytes, bytearray)):
        return bytes(item)
    if isinstance(item, np.ndarray) and item.dtype == np.uint8 and item.ndim == 1:
        return item.tobytes()
    raise ValueError(f"val set {name}: image {index} is {type(item).__name__}, expected encoded image bytes")


def read_bin(path, image_size: int = 112) -> tuple[torch.Tensor, np.ndarray]:
    """(images uint8 (2P, 3, S, S) RGB, is_same bool (P,)) of an insightface verification .bin;
    images not S x S are resized (bilinear). Raises UnsafePickleError for a pickle that names any
    other global, ValueError for anything else that is not such a file."""
    name = os.fspath(path)
    with open(path, "rb") as file:
        try:
            loaded = _RestrictedUnpickler(file, name).load()
        except UnsafePickleError:
            raise
        except Exception as error:  # a damaged pickle raises many kinds of errors
            raise ValueError(f"val set {name}: not a readable verification .bin: {type(error).__name__}: {error}") \
                from error
    if not (isinstance(loaded, (tuple, list)) and len(loaded) == 2):
        raise ValueError(f"val set {name}: expected a pickled (images, is_same) pair, got {type(loaded).__name__}")
    images, flags = loaded
    try:
        is_same = np.asarray(flags)
    except Exception as error:
        raise ValueError(f"val set {name}: is_same is not a list of flags: {error}") from error
    if is_same.ndim != 1 or not (is_same.dtype == np.bool_ or np.issubdtype(is_same.dtype, np.integer)) \
            or not np.isin(is_same, (0, 1)).all():
        raise ValueError(f"val set {name}: is_same must be a flat list of booleans, got {is_same.dtype} "
                         f"{is_same.shape}")
    if not isinstance(images, (list, tuple)) or len(images) != 2 * len(is_same):
        raise ValueError(f"val set {name}: expected 2 images per is_same flag ({2 * len(is_same)}), got "
                         f"{len(images) if isinstance(images, (list, tuple)) else type(images).__name__}")
    decoded = torch.empty(len(images), 3, image_size, image_size, dtype=torch.uint8)
    for index, item in enumerate(images):
        decoded[index] = decode_pixels(io.BytesIO(_image_bytes(item, index, name)), image_size, f"{index} of {name}")
    return decoded, is_same.astype(bool)


def write_bin(path, images: list, is_same, image_format: str = "png"):
    """Write a verification .bin as insightface does: images are uint8 (H, W, 3) arrays (encoded as
    image_format) or already encoded bytes, two per flag of is_same."""
    if len(images) != 2 * len(is_same):
        raise ValueError(f"images: expected 2 per is_same flag ({2 * len(is_same)}), got {len(images)}")
    encoded = []
    for image in images:
        if not isinstance(image, bytes):
            buffer = io.BytesIO()
            pillow().fromarray(np.asarray(image, np.uint8)).save(buffer, format=image_format)
            image = buffer.getvalue()
        encoded.append(image)
    with open(path, "wb") as file:
        pickle.dump((encoded, [bool(flag) for flag in is_same]), file, protocol=pickle.HIGHEST_PROTOCOL)


class VerificationPairs(Dataset):
    """The images of one verification set as (input (3, S, S) float32 in [-1, 1], pair index) items,
    images 2p and 2p + 1 forming pair p; `is_same` (P,) says which pairs are one person."""

    def __init__(self, name: str, images: torch.Tensor, is_same: np.ndarray):
        self.name, self.images, self.is_same = name, images, is_same
        self.input_shape = tuple(images.shape[1:])

    def __len__(self):
        return len(self.images)

    def __getitem__(self, index: int):
        return to_input(self.images[index]), index // 2


def parse_val_targets(text: str) -> list[str]:
    """The entries of a comma-separated --val-targets."""
    return [target.strip() for target in text.split(",") if target.strip()]


def val_set_path(target: str, data: str) -> str:
    """The .bin file of a --val-targets entry: a path ending in .bin as it is, else NAME.bin in the
    folder of the training data (a recordio:/imagefolder: folder, or the folder of its .rec file),
    where insightface's datasets keep them."""
    if target.endswith(BIN_SUFFIX):
        return target
    kind, _, location = data.partition(":")
    if kind not in ("recordio", "imagefolder"):
        raise ValueError(f"val_targets: {target!r} is a name, which is looked up beside recordio: or imagefolder: "
                         f"data; with --data {data}, give the path of its .bin")
    folder = location if os.path.isdir(location) else os.path.dirname(location)
    return os.path.join(folder, target + BIN_SUFFIX)


def load_val_sets(targets, data: str, image_size: int) -> list[VerificationPairs]:
    """The verification sets that --val-targets names (see val_set_path), read and checked."""
    sets = []
    for target in targets:
        path = val_set_path(target, data)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"val_targets: {path} not found (insightface's {', '.join(VAL_SET_NAMES[:3])}, "
                                    f"... .bin files, or the path of one)")
        sets.append(VerificationPairs(os.path.basename(path)[:-len(BIN_SUFFIX)], *read_bin(path, image_size)))
    names = [pairs.name for pairs in sets]
    if len(set(names)) != len(names):
        raise ValueError(f"val_targets: names repeat ({', '.join(names)}); each set is reported under its file name")
    return sets
