"""Face data for the reference trainer: a synthetic identity generator, image folders, insightface
RecordIO and precomputed features, split into training, held-out and verification sets.

`load_data(spec)` takes `synthetic`, `imagefolder:PATH`, `recordio:PATH` or `features:PATH`. Images
come out as float32 (3, S, S) RGB scaled to [-1, 1] as insightface does ((x / 255 - 0.5) / 0.5).
"""
import io
import math
import mmap
import os
import struct
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

DATA_KINDS = ("synthetic", "imagefolder", "recordio", "features")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
SYNTHETIC_IMAGES_PER_ID = 64  # training images per synthetic identity, unless told otherwise


class Splits(NamedTuple):
    """Datasets of (input, label) items: float32 inputs, int labels."""
    train: Dataset           # labels in [0, num_ids)
    ident_test: Dataset      # held-out images of the training identities, labels in [0, num_ids)
    verify: Dataset          # identities not trained on, labels in [0, number of verify identities)
    num_ids: int
    input_shape: tuple       # (3, S, S) for images, (D,) for features
    train_labels: torch.Tensor  # int64 (len(train),): the label of each train item, in item order
    names: list[str] | None  # each training identity's folder name or label value; None if synthetic


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
        return _synthetic_splits(100 if ids is None else ids, image_size, images_per_id,
                                 holdout_per_id, verify_ids, seed)
    if kind == "imagefolder":
        inputs, identity, names = _image_folder(path, image_size)
    elif kind == "recordio":
        inputs, identity, names = _recordio(path, image_size)
    else:
        inputs, identity, names = _features(path)
    return _split(inputs, identity, names, ids, holdout_per_id, verify_ids, seed)


def load_splits(run: dict) -> Splits:
    """The splits of a trainer run's data (its --data, --ids, ... as parse_run gives them)."""
    return load_data(run["data"], ids=run["ids"], image_size=run["image_size"],
                     images_per_id=run["images_per_id"], holdout_per_id=run["holdout_per_id"],
                     verify_ids=run["verify_ids"], seed=run["seed"])


# ----------------------------------------------------------------------------------------------
# Synthetic faces

TEMPLATE_SIZE = 64  # side of the cached per-identity face, warped up or down to image_size

# Palettes the face colours are interpolated from (RGB in [0, 1]).
SKIN_TONES = ((0.98, 0.87, 0.77), (0.92, 0.74, 0.60), (0.80, 0.58, 0.42), (0.60, 0.42, 0.30),
              (0.38, 0.26, 0.18))
HAIR_COLOURS = ((0.08, 0.06, 0.05), (0.30, 0.18, 0.10), (0.55, 0.38, 0.20), (0.85, 0.72, 0.45),
                (0.60, 0.22, 0.10), (0.70, 0.70, 0.70))
IRIS_COLOURS = ((0.35, 0.20, 0.10), (0.15, 0.10, 0.06), (0.25, 0.45, 0.70), (0.30, 0.50, 0.30),
                (0.45, 0.48, 0.50))


def _uniforms(*keys, count: int) -> torch.Tensor:
    """(B, count) uniforms in [0, 1): entry (i, j) is a hash (splitmix64 rounds) of
    (keys[0][i], keys[1][i], ..., j), so every draw is a pure function of its key, with no RNG state."""
    with np.errstate(over="ignore"):  # uint64 arithmetic wraps by design
        columns = [np.asarray(key).astype(np.uint64)[:, None] for key in keys]
        state = np.zeros((len(keys[0]), 1), np.uint64)
        for column in columns + [np.arange(count, dtype=np.uint64)]:
            state = state + column * np.uint64(0x9E3779B97F4A7C15)
            state = (state ^ (state >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
            state = (state ^ (state >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
            state = state ^ (state >> np.uint64(31))
    return torch.from_numpy((state >> np.uint64(40)).astype(np.float32) / 2**24)


class _Draw:
    """Hands out the columns of a (B, n) tensor of uniforms one at a time, mapped to [lo, hi)."""

    def __init__(self, uniforms: torch.Tensor):
        self._columns = iter(uniforms.unbind(1))

    def __call__(self, lo: float, hi: float) -> torch.Tensor:
        return lo + (hi - lo) * next(self._columns)

    def colour(self, palette=None) -> torch.Tensor:
        """(B, 3): a point on the polyline through the palette's colours, or any colour."""
        if palette is None:
            return torch.stack([self(0, 1) for _ in range(3)], 1)
        position = self(0, len(palette) - 1)
        index = position.long().clamp(max=len(palette) - 2)
        palette = torch.tensor(palette)
        return torch.lerp(palette[index], palette[index + 1], (position - index)[:, None])


def _face_ellipses(uniforms: torch.Tensor) -> torch.Tensor:
    """(B, E, 9) ellipses (x, y, radius x, radius y, angle, r, g, b, opacity), painted in order,
    that make up B faces: a symmetric layout of head, hair, ears, eyes, brows, nose, mouth, maybe a
    beard, plus three asymmetric marks. Coordinates span [-1, 1], y pointing down."""
    draw = _Draw(uniforms)
    zero = torch.zeros(uniforms.shape[0])
    skin = (draw.colour(SKIN_TONES) * draw(0.93, 1.07)[:, None]).clamp(max=1)
    hair = draw.colour(HAIR_COLOURS)
    iris = draw.colour(IRIS_COLOURS)
    lips = skin * torch.tensor([1.0, 0.72, 0.72]) * draw(0.75, 1.0)[:, None]
    head_rx, head_ry, head_y = draw(0.55, 0.72), draw(0.72, 0.9), draw(0.0, 0.1)
    eye_x, eye_y = draw(0.2, 0.32), draw(-0.15, 0.05)
    eye_rx, eye_ry = draw(0.09, 0.14), draw(0.045, 0.08)
    gaze_x, gaze_y = draw(-0.03, 0.03), draw(-0.015, 0.015)
    brow_y, brow_rx, brow_ry = draw(0.12, 0.2), draw(0.1, 0.16), draw(0.02, 0.05)
    brow_tilt = draw(-0.35, 0.35)
    beard_opacity = (draw(-1.5, 1.0)).clamp(min=0)  # no beard for 60% of identities

    def ellipse(x, y, rx, ry, angle, colour, opacity=1.0):
        return torch.cat([torch.stack([x + zero, y + zero, rx + zero, ry + zero, angle + zero], 1),
                          colour, (opacity + zero)[:, None]], 1)

    def pair(x, y, rx, ry, angle, colour):  # mirror images about the vertical axis
        return [ellipse(-x, y, rx, ry, angle, colour), ellipse(x, y, rx, ry, -angle, colour)]

    ellipses = [
        ellipse(0, head_y - draw(0.1, 0.3), head_rx * draw(1.02, 1.15), draw(0.6, 1.0), 0, hair),
        *pair(head_rx * 0.95, head_y + 0.05, draw(0.07, 0.12), draw(0.14, 0.2), 0, skin * 0.95),
        ellipse(0, 0.95, draw(0.25, 0.35), 0.4, 0, skin * 0.88),
        ellipse(0, head_y, head_rx, head_ry, 0, skin),
        ellipse(0, head_y - head_ry * draw(0.7, 0.95), head_rx * draw(0.9, 1.05), draw(0.2, 0.45),
                draw(-0.3, 0.3), hair),
        ellipse(0, head_y + 0.55, head_rx * draw(0.6, 0.85), draw(0.25, 0.4), 0, hair * 0.9,
                beard_opacity),
        *pair(eye_x, eye_y, eye_rx, eye_ry, 0, torch.full_like(skin, 0.92)),
        *pair(eye_x + gaze_x, eye_y + gaze_y, eye_ry * 0.9, eye_ry * 0.9, 0, iris),
        *pair(eye_x, eye_y - brow_y, brow_rx, brow_ry, brow_tilt, hair * 0.8),
        ellipse(0, draw(0.12, 0.28), draw(0.05, 0.1), draw(0.1, 0.2), 0, skin * 0.82),
        ellipse(0, draw(0.4, 0.55), draw(0.15, 0.28), draw(0.03, 0.08), 0, lips),
    ]
    for _ in range(3):
        colour = draw.colour()
        radius = draw(0.03, 0.09)
        ellipses.append(ellipse(draw(-0.5, 0.5), draw(-0.4, 0.6), radius, radius, 0, colour))
    return torch.stack(ellipses, 1)


def _paint(ellipses: torch.Tensor, size: int) -> torch.Tensor:
    """(B, 4, size, size) premultiplied RGBA images of the (B, E, 9) ellipses painted in order on a
    transparent canvas, with edges antialiased over about one pixel."""
    x, y, rx, ry, angle = (ellipses[..., i, None, None] for i in range(5))
    colour, opacity = ellipses[..., 5:8], ellipses[..., 8, None, None]
    ticks = (torch.arange(size) + 0.5) * (2 / size) - 1
    dx, dy = ticks[None, None, None, :] - x, ticks[None, None, :, None] - y
    cos, sin = torch.cos(angle), torch.sin(angle)
    distance = torch.hypot((dx * cos + dy * sin) / rx, (dy * cos - dx * sin) / ry)
    cover = opacity * torch.sigmoid((1 - distance) * torch.minimum(rx, ry) * (size / 2))
    canvas = torch.zeros(ellipses.shape[0], 4, size, size)
    for e in range(ellipses.shape[1]):
        paint = torch.cat([colour[:, e], torch.ones_like(colour[:, e, :1])], 1)[:, :, None, None]
        a = cover[:, e, None]
        canvas = canvas * (1 - a) + paint * a
    return canvas


class _FaceRenderer:
    """Draws synthetic face images, each a pure function of (seed, identity, sample index).

    An identity is a face template, cached. An image of it puts the template over a random
    background, lights it (contrast, brightness, a linear gradient, colour gains), warps it (rotation
    up to 15 degrees, scale 0.9-1.1, a slight yaw-like squeeze, a shift of up to 3%), then adds
    Gaussian noise and an occluding rectangle. Colour work happens at template resolution, before
    the warp: the warp is affine, so a linear gradient stays one.
    """

    CHUNK = 32  # images rendered together: enough to amortize per-call overheads, few enough for cache

    def __init__(self, seed: int, image_size: int):
        self.seed = seed
        self.image_size = image_size
        self._templates = {}  # identity -> uint8 (4, T, T): a quarter of float's memory, ample precision
        self._noise = None
        ticks = (torch.arange(image_size) + 0.5) * (2 / image_size) - 1
        y, x = torch.meshgrid(ticks, ticks, indexing="ij")
        self._pixels = torch.stack([x, y, torch.ones_like(x)], -1).view(-1, 3)  # (S * S, 3): x, y, 1

    def _template_batch(self, identities: list) -> torch.Tensor:
        """(B, 4, T, T) premultiplied RGBA faces in [0, 1]."""
        missing = sorted(set(identities) - self._templates.keys())
        if missing:
            faces = _face_ellipses(_uniforms([self.seed] * len(missing), missing, count=64))
            for identity, face in zip(missing, _paint(faces, TEMPLATE_SIZE)):
                self._templates[identity] = (face * 255).round().to(torch.uint8)
        return torch.stack([self._templates[i] for i in identities]).float() / 255

    def _noise_pool(self) -> torch.Tensor:
        """Gaussian noise of twice an image's size; each image adds a window of it at a random
        offset, much cheaper than drawing fresh noise per image."""
        if self._noise is None:
            generator = torch.Generator().manual_seed(self.seed)
            self._noise = torch.randn(2 * 3 * self.image_size ** 2, generator=generator)
        return self._noise

    def render(self, identities: list, samples: list) -> list:
        """The (3, S, S) images in [-1, 1] of identities[i], sample samples[i]. A list, not one
        tensor: the DataLoader stacks the batch anyway, so an extra copy here would be wasted."""
        return [image for start in range(0, len(identities), self.CHUNK)
                for image in self._render_chunk(identities[start:start + self.CHUNK],
                                                samples[start:start + self.CHUNK])]

    def _render_chunk(self, identities: list, samples: list) -> torch.Tensor:
        batch, size = len(identities), self.image_size
        draw = _Draw(_uniforms([self.seed] * batch, identities, samples, count=32))

        def per_image(values):  # (B,) or (B, 3) -> broadcastable over (B, C, H, W)
            return values.view(batch, -1, 1, 1)

        face = self._template_batch(identities)
        image = face[:, :3] + per_image(draw.colour() * 0.8 + 0.1) * (1 - face[:, 3:])
        ticks = (torch.arange(TEMPLATE_SIZE) + 0.5) / TEMPLATE_SIZE - 0.5
        direction, strength = draw(0, 2 * math.pi), draw(0, 0.3)
        gradient = (per_image(strength * torch.cos(direction)) * ticks
                    + per_image(strength * torch.sin(direction)) * ticks[:, None])
        contrast, brightness, gains = draw(0.7, 1.3), draw(-0.15, 0.15), draw.colour() * 0.3 + 0.85
        image = (image - 0.5) * per_image(contrast) + per_image(0.5 + brightness) + gradient
        image = image * per_image(gains)

        angle, scale, squeeze = draw(-math.pi / 12, math.pi / 12), draw(0.9, 1.1), draw(0.9, 1.0)
        cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
        theta = torch.stack([torch.stack([cos / squeeze, -sin / squeeze, draw(-0.06, 0.06)], 1),
                             torch.stack([sin, cos, draw(-0.06, 0.06)], 1)], 1)
        grid = (self._pixels @ theta.mT).view(batch, size, size, 2)  # as F.affine_grid, but faster
        # Border padding extends the background (and hair, neck) past the template's edge.
        image = F.grid_sample(image * 2 - 1, grid, padding_mode="border", align_corners=False)

        noise, pixels = self._noise_pool(), 3 * size * size
        offsets, sigmas = (draw(0, 1) * pixels).long().tolist(), draw(0.02, 0.12).tolist()  # of [-1, 1]
        width, height = draw(0.1, 0.35) * size, draw(0.1, 0.35) * size
        left, top = draw(0, 1) * (size - width), draw(0, 1) * (size - height)
        boxes = torch.stack([top, top + height, left, left + width], 1).long().tolist()
        fill = per_image(draw.colour() * 2 - 1)
        for i, (y0, y1, x0, x1) in enumerate(boxes):
            image[i].add_(noise[offsets[i]:offsets[i] + pixels].view(3, size, size), alpha=sigmas[i])
            image[i, :, y0:y1, x0:x1] = fill[i]
        return image.clamp_(-1, 1)


class _SyntheticFaces(Dataset):
    """Identities first_id .. first_id + num_ids - 1 (labels 0 .. num_ids - 1), each with the
    samples first_sample .. first_sample + per_id - 1, identity-major."""

    def __init__(self, renderer: _FaceRenderer, first_id: int, num_ids: int, first_sample: int,
                 per_id: int):
        self.renderer = renderer
        self.first_id, self.num_ids = first_id, num_ids
        self.first_sample, self.per_id = first_sample, per_id

    def __len__(self):
        return self.num_ids * self.per_id

    def __getitems__(self, indices: list) -> list:
        """Items of a whole batch, rendered together (DataLoader calls this when it exists)."""
        indices = [int(index) for index in indices]
        for index in indices:
            if not 0 <= index < len(self):
                raise IndexError(f"index {index} out of range for {len(self)} items")
        labels = [index // self.per_id for index in indices]
        images = self.renderer.render([self.first_id + label for label in labels],
                                      [self.first_sample + index % self.per_id for index in indices])
        return list(zip(images, labels))

    def __getitem__(self, index: int):
        return self.__getitems__([index])[0]


def _synthetic_splits(ids, image_size, images_per_id, holdout_per_id, verify_ids, seed) -> Splits:
    if images_per_id < 1:
        raise ValueError(f"images_per_id: expected an integer >= 1, got {images_per_id}")
    if verify_ids is None:
        verify_ids = max(20, ids // 5)
    renderer = _FaceRenderer(seed, image_size)
    return Splits(
        train=_SyntheticFaces(renderer, 0, ids, 0, images_per_id),
        ident_test=_SyntheticFaces(renderer, 0, ids, images_per_id, holdout_per_id),
        verify=_SyntheticFaces(renderer, ids, verify_ids, 0, images_per_id + holdout_per_id),
        num_ids=ids,
        input_shape=(3, image_size, image_size),
        train_labels=torch.arange(ids).repeat_interleave(images_per_id),
        names=None,
    )


# ----------------------------------------------------------------------------------------------
# Real data: every kind yields (inputs, identity, names): a dataset of inputs only, the identity
# (0 .. K-1) of each of its items, and the K identity names; _split makes the Splits.

def _split(inputs: Dataset, identity: np.ndarray, names: list, ids: int | None, holdout_per_id: int,
           verify_ids: int | None, seed: int) -> Splits:
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


def _pillow():
    try:
        from PIL import Image
    except ImportError as error:
        raise ImportError("reading images needs Pillow: pip install pillow") from error
    return Image


def _decode_image(source, image_size: int, name: str) -> torch.Tensor:
    """(3, S, S) float32 in [-1, 1] from an image file path or file object."""
    Image = _pillow()
    try:
        with Image.open(source) as image:
            image = image.convert("RGB")
    except (OSError, SyntaxError, ValueError) as error:
        raise ValueError(f"data: cannot decode image {name}: {error}") from error
    if image.size != (image_size, image_size):
        image = image.resize((image_size, image_size), Image.Resampling.BILINEAR)
    pixels = torch.from_numpy(np.array(image)).permute(2, 0, 1).contiguous()
    return pixels.float() / 127.5 - 1  # insightface's (x / 255 - 0.5) / 0.5


class _ImageFiles(Dataset):
    def __init__(self, paths: list, image_size: int):
        self.paths, self.image_size = paths, image_size
        self.input_shape = (3, image_size, image_size)

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, index: int) -> torch.Tensor:
        return _decode_image(self.paths[index], self.image_size, self.paths[index])


def _image_folder(path: str, image_size: int):
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


# insightface / MXNet IndexedRecordIO: records of [magic, lrecord, payload, padding to 4 bytes];
# lrecord holds a continuation flag (top 3 bits) and the payload length (low 29 bits).
RECORDIO_MAGIC = 0xCED7230A
_MAGIC_BYTES = struct.pack("<I", RECORDIO_MAGIC)
_IR_HEADER = struct.Struct("<IfQQ")  # flag, label, id, id2; then `flag` float32 labels if flag > 0


def _recordio_parts(payload: bytes) -> list:
    """The parts a RecordIO writer stores payload as: cut at each 4-byte-aligned occurrence of the
    magic number, which is dropped (the reader puts it back), so magic only ever starts a record."""
    words = np.frombuffer(payload, "<u4", count=len(payload) // 4)
    starts = [0] + [4 * int(at) + 4 for at in np.flatnonzero(words == RECORDIO_MAGIC)]
    ends = [start - 4 for start in starts[1:]] + [len(payload)]
    return [payload[start:end] for start, end in zip(starts, ends)]


def write_recordio(path_rec: str, path_idx: str, images: list, labels: list, image_format: str = "png",
                   header_record: bool = True):
    """Write images with integer labels as insightface RecordIO (.rec and .idx).

    Each image is a uint8 (H, W, 3) array, encoded as image_format ("png" or "jpeg"), or the bytes
    of an already encoded image, stored as they are. With header_record (as in insightface's
    datasets), record 0 is a header with flag 2 and labels (n + 1, n + 1) and the images are
    records 1..n; without, the images are records 0..n-1.
    """
    if len(images) != len(labels):
        raise ValueError(f"images and labels differ in length: {len(images)} vs {len(labels)}")
    records = []
    if header_record:
        n = len(images)
        records.append(_IR_HEADER.pack(2, 0.0, 0, 0) + struct.pack("<2f", n + 1, n + 1))
    for image, label in zip(images, labels):
        if not isinstance(image, bytes):
            encoded = io.BytesIO()
            _pillow().fromarray(np.asarray(image, np.uint8)).save(encoded, format=image_format)
            image = encoded.getvalue()
        records.append(_IR_HEADER.pack(0, float(label), len(records), 0) + image)
    with open(path_rec, "wb") as rec, open(path_idx, "w") as idx:
        for key, payload in enumerate(records):
            idx.write(f"{key}\t{rec.tell()}\n")
            parts = _recordio_parts(payload)
            # Part flags: 0 a whole record, else 1 its first part, 2 a middle one, 3 the last.
            flags = [0] if len(parts) == 1 else [1] + [2] * (len(parts) - 2) + [3]
            for flag, part in zip(flags, parts):
                rec.write(struct.pack("<II", RECORDIO_MAGIC, flag << 29 | len(part)))
                rec.write(part + bytes(-len(part) % 4))


class _RecordIO(Dataset):
    """The image records of an insightface RecordIO file, read by offset (no MXNet needed)."""

    def __init__(self, path_rec: str, path_idx: str, image_size: int):
        self.path_rec, self.image_size = path_rec, image_size
        self.input_shape = (3, image_size, image_size)
        self._map = None
        with open(path_idx) as file:
            fields = file.read().split()
        try:
            table = np.array(fields, dtype=np.int64).reshape(-1, 2)
        except ValueError as error:
            raise ValueError(f"data: {path_idx} is not a RecordIO index of 'key<TAB>offset' lines") from error
        if len(table) == 0:
            raise ValueError(f"data: {path_idx} has no records")
        # Records in index order, then, as insightface's MXFaceDataset does, keys 1 .. label[0] - 1
        # when record 0 is a header (flag > 0).
        self.keys, self.offsets = table[:, 0], table[:, 1]
        if 0 in self.keys:
            flag, label = self._header(int(np.flatnonzero(self.keys == 0)[0]))
            if flag > 0:
                self._select(np.arange(1, int(label)), path_idx)

    def _select(self, keys: np.ndarray, path_idx: str):
        """Keep just the records `keys`, in that order."""
        order = np.argsort(self.keys)
        found = order[np.minimum(np.searchsorted(self.keys, keys, sorter=order), len(order) - 1)]
        if np.any(self.keys[found] != keys):
            raise ValueError(f"data: {path_idx} lacks some of records 1..{len(keys)} that its header "
                             f"record 0 announces")
        self.keys, self.offsets = keys, self.offsets[found]

    def __getstate__(self):  # the memory map is reopened in each process that unpickles this
        return {**self.__dict__, "_map": None}

    def __len__(self):
        return len(self.keys)

    def _bytes(self):
        if self._map is None:
            with open(self.path_rec, "rb") as file:
                empty = os.fstat(file.fileno()).st_size == 0  # which mmap refuses
                self._map = b"" if empty else mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ)
        return self._map

    def _corrupt(self, index: int, why: str) -> ValueError:
        key = int(self.keys[index])
        return ValueError(f"data: corrupt RecordIO record {key} in {self.path_rec}: {why}")

    def _payload(self, index: int, size: int | None = None) -> bytes:
        """Record index's payload, or just enough of it for its first `size` bytes."""
        data, at, parts, have = self._bytes(), int(self.offsets[index]), [], 0
        while True:
            if at + 8 > len(data):
                raise self._corrupt(index, f"truncated at byte {at}")
            magic, lrecord = struct.unpack_from("<II", data, at)
            flag, length = lrecord >> 29, lrecord & (1 << 29) - 1
            if magic != RECORDIO_MAGIC:
                raise self._corrupt(index, f"no magic number at byte {at}")
            if flag not in ((2, 3) if parts else (0, 1)):
                raise self._corrupt(index, f"part flag {flag} out of sequence at byte {at}")
            if at + 8 + length > len(data):
                raise self._corrupt(index, f"truncated at byte {len(data)}")
            parts.append(data[at + 8:at + 8 + length])
            have += length
            if flag in (0, 3) or (size is not None and have >= size):
                return _MAGIC_BYTES.join(parts)
            at += 8 + length + (-length % 4)

    def _header(self, index: int):
        """(flag, label) of record index: label is the first of the extra labels when flag > 0."""
        head = self._payload(index, _IR_HEADER.size + 4)
        flag = struct.unpack_from("<I", head)[0] if len(head) >= 4 else 0
        label_at = _IR_HEADER.size if flag > 0 else 4  # the first extra label, or the header's own
        if len(head) < max(_IR_HEADER.size, label_at + 4):
            raise self._corrupt(index, "shorter than its header")
        return flag, struct.unpack_from("<f", head, label_at)[0]

    def labels(self) -> np.ndarray:
        """The label of every image record, from the record headers alone."""
        return np.array([self._header(index)[1] for index in range(len(self))]).astype(np.int64)

    def __getitem__(self, index: int) -> torch.Tensor:
        flag, _ = self._header(index)
        encoded = self._payload(index)[_IR_HEADER.size + 4 * flag:]
        name = f"record {int(self.keys[index])} of {self.path_rec}"
        return _decode_image(io.BytesIO(encoded), self.image_size, name)


def _recordio(path: str, image_size: int):
    """PATH is a folder with train.rec and train.idx, or a .rec file with its .idx beside it."""
    if os.path.isdir(path):
        path_rec, path_idx = os.path.join(path, "train.rec"), os.path.join(path, "train.idx")
    else:
        path_rec, path_idx = path, os.path.splitext(path)[0] + ".idx"
    for file in (path_rec, path_idx):
        if not os.path.isfile(file):
            raise FileNotFoundError(f"data: RecordIO file {file} not found (expected a folder with "
                                    f"train.rec and train.idx, or a .rec with its .idx beside it)")
    records = _RecordIO(path_rec, path_idx, image_size)
    values, identity = np.unique(records.labels(), return_inverse=True)
    return records, identity, [str(value) for value in values]


class _FeatureRows(Dataset):
    def __init__(self, features: np.ndarray):
        self.features = features
        self.input_shape = features.shape[1:]

    def __len__(self):
        return len(self.features)

    def __getitem__(self, index: int) -> torch.Tensor:
        return torch.from_numpy(np.array(self.features[index], dtype=np.float32))


def _features(path: str):
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
