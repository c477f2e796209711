"""Face alignment as insightface does it: the similarity transform (rotation, uniform scale,
translation) that takes a face's 5 landmarks (eye centres, nose tip, mouth corners) closest, in least
squares, to the ArcFace template, then a bilinear warp of the image to the crop (OpenCV's warpAffine
with a black border, here with torch's grid_sample: pixel centres at integer coordinates)."""
import numpy as np
import torch
import torch.nn.functional as F

# The 5 landmarks of insightface's 112 x 112 crops (face_align.arcface_dst): left eye, right eye,
# nose tip, left and right mouth corner, (x, y) in pixels.
ARCFACE_LANDMARKS = np.array([[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366],
                              [41.5493, 92.3655], [70.7299, 92.2041]])
ARCFACE_SIZE = 112


def similarity_transform(source: np.ndarray, target: np.ndarray) -> np.ndarray:
    """The 2 x 3 matrix M of the similarity transform (no reflection) that maps the points source
    (n, 2) closest in least squares to target (n, 2): target ~ source @ M[:, :2].T + M[:, 2].
    Umeyama's estimate, as scikit-image's SimilarityTransform.estimate (which insightface uses)."""
    source, target = np.asarray(source, np.float64), np.asarray(target, np.float64)
    if source.shape != target.shape or source.ndim != 2 or source.shape[1] != 2 or len(source) < 2:
        raise ValueError(f"landmarks: expected two (n >= 2, 2) point sets of one shape, got {source.shape} "
                         f"and {target.shape}")
    source_mean, target_mean = source.mean(0), target.mean(0)
    source_centered, target_centered = source - source_mean, target - target_mean
    source_variance = (source_centered ** 2).sum() / len(source)
    if not np.isfinite(source_variance) or source_variance <= 0:
        raise ValueError("landmarks: the points coincide or are not finite; no transform fits them")
    covariance = target_centered.T @ source_centered / len(source)
    sign = np.ones(2)
    if np.linalg.det(covariance) < 0:
        sign[1] = -1
    u, singular, vt = np.linalg.svd(covariance)
    rotation = u @ np.diag(sign) @ vt
    scale = (singular * sign).sum() / source_variance
    matrix = np.empty((2, 3))
    matrix[:, :2] = scale * rotation
    matrix[:, 2] = target_mean - scale * rotation @ source_mean
    return matrix


def warp_affine(pixels: torch.Tensor, matrix: np.ndarray, size: int) -> torch.Tensor:
    """uint8 (C, size, size): output pixel (x, y) is the bilinear sample of pixels (C, H, W) at the
    point that the 2 x 3 matrix maps to (x, y), 0 outside the image."""
    channels, height, width = pixels.shape
    full = np.vstack([matrix, [0.0, 0.0, 1.0]])
    inverse = torch.from_numpy(np.linalg.inv(full)[:2])  # output -> input coordinates
    ys, xs = torch.meshgrid(torch.arange(size, dtype=torch.float64), torch.arange(size, dtype=torch.float64),
                            indexing="ij")
    points = torch.stack([xs, ys, torch.ones_like(xs)], -1) @ inverse.T  # (size, size, 2): x, y in the input
    # grid_sample's align_corners=True puts -1 and 1 at the centres of the first and last pixels
    scale = torch.tensor([max(width - 1, 1), max(height - 1, 1)], dtype=torch.float64)
    grid = (2 * points / scale - 1)[None]
    warped = F.grid_sample(pixels[None].double(), grid, mode="bilinear", padding_mode="zeros", align_corners=True)
    return warped[0].round().clamp(0, 255).to(torch.uint8)


def align_face(pixels: torch.Tensor, landmarks: np.ndarray, size: int = ARCFACE_SIZE) -> torch.Tensor:
    """The size x size crop (uint8 (3, size, size)) of the face in pixels (3, H, W) whose 5 landmarks
    (5, 2) are given, aligned to the ArcFace template (scaled by size / 112)."""
    landmarks = np.asarray(landmarks, np.float64)
    if landmarks.shape != (5, 2):
        raise ValueError(f"landmarks: expected 5 (x, y) points, shape (5, 2), got {landmarks.shape}")
    matrix = similarity_transform(landmarks, ARCFACE_LANDMARKS * (size / ARCFACE_SIZE))
    return warp_affine(pixels, matrix, size)
