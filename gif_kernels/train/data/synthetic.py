"""Synthetic faces: each identity a face template of random ellipses, each image of it that template over
a random background, lit, warped, noised and partly occluded; a pure function of the seed, rendered in
batches."""
import math

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from .splits import Splits

SYNTHETIC_IMAGES_PER_ID = 64  # training images per synthetic identity, unless told otherwise
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


def synthetic_splits(ids, image_size, images_per_id, holdout_per_id, verify_ids, seed) -> Splits:
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
