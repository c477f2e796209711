"""Image folders: one sub-folder of images per identity; and the image decoding RecordIO shares."""
import os

import numpy as np
import torch
from torch.utils.data import Dataset

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


def pillow():
    try:
        from PIL import Image
    except ImportError as error:
        raise ImportError("reading images needs Pillow: pip install pillow") from error
    return Image


def decode_pixels(source, image_size: int | None, name: str) -> torch.Tensor:
    """(3, S, S) uint8 RGB from an image file path or file object, resized (bilinear) if not S x S;
    with image_size None, (3, H, W) as the file has it."""
    Image = pillow()
    try:
        with Image.open(source) as image:
            image = image.convert("RGB")
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        raise ValueError(f"data: cannot decode image {name}: {error}") from error
    if image_size is not None and image.size != (image_size, image_size):
        image = image.resize((image_size, image_size), Image.Resampling.BILINEAR)
    return torch.from_numpy(np.array(image)).permute(2, 0, 1).contiguous()


def to_input(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 pixels as a backbone's float32 input in [-1, 1]: insightface's (x / 255 - 0.5) / 0.5."""
    return pixels.float() / 127.5 - 1


def decode_image(source, image_size: int, name: str) -> torch.Tensor:
    """(3, S, S) float32 in [-1, 1] from an image file path or file object."""
    return to_input(decode_pixels(source, image_size, name))


class _ImageFiles(Dataset):
    def __init__(self, paths: list, image_size: int):
        self.paths, self.image_size = paths, image_size
        self.input_shape = (3, image_size, image_size)

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, index: int) -> torch.Tensor:
        return decode_image(self.paths[index], self.image_size, self.paths[index])


def read_image_folder(path: str, image_size: int):
    """One sub-folder of images per identity; folders without images are not identities."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"data: image folder {path} not found")
    paths, identity, names = [], [], []
    for folder in sorted(entry.name for entry in os.scandir(path) if entry.is_dir()):
        files = sorted(entry.name for entry in os.scandir(os.path.join(path, folder))
                       if entry.is_file() and entry.name.lower().endswith(IMAGE_EXTENSIONS))
        if files:
            paths += [os.path.join(path, folder, file) for file in files]
            identity += [len(names)] * len(files)
            names.append(folder)
    if not paths:
        raise ValueError(f"data: {path} has no images (expected one sub-folder of "
                         f"{'/'.join(IMAGE_EXTENSIONS)} files per identity)")
    return _ImageFiles(paths, image_size), np.array(identity), names
