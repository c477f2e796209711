"""Plain-PyTorch versions of every op: the ground truth the kernels are tested against.

Gradients come from autograd. Compute in float64 (pass float64 tensors) for test references.
Margins: m2 and m3 are those of insightface's combined margin (m1, m2, m3), the target logit
scale * (cos(m1 * theta + m2) - m3) with m1 = 1: m2 is ArcFace's additive angle, m3 CosFace's
additive cosine margin. Every backend, and every other mention of m2 / m3, follows this.
"""
import math

import torch
import torch.nn.functional as F

from .constants import NORM_EPS, SIN_EPS


def arcface_phi(cos: torch.Tensor, m2: float) -> torch.Tensor:
    """cos(theta + m2) where theta + m2 <= pi, else ArcFace's fallback cos - m2 * sin(m2)."""
    cos_m, sin_m = math.cos(m2), math.sin(m2)
    sin_t = torch.sqrt(torch.clamp(1.0 - cos * cos, min=SIN_EPS))
    return torch.where(cos >= -cos_m, cos * cos_m - sin_t * sin_m, cos - m2 * sin_m)


def margin_logits(x, weight, codes, scale=64.0, m2=0.0, m3=0.0, normalize=True, ignore_index=-100):
    """(logits (B, L, V), target_logit (B, L), ignored (B, L)): scale * cos with the margin on each row's
    target; a row whose code is ignore_index has no target, so no margin, even when ignore_index is a
    token in [0, V)."""
    num_positions = weight.shape[0]
    feats = x.unsqueeze(1).expand(-1, num_positions, -1) if x.dim() == 2 else x
    if normalize:
        feats = F.normalize(feats, dim=-1, eps=NORM_EPS)
        weight = F.normalize(weight, dim=-1, eps=NORM_EPS)
    cos = torch.einsum("bld,lvd->blv", feats, weight)
    ignored = codes == ignore_index
    target = codes.masked_fill(ignored, 0).long().unsqueeze(-1)
    target_logit = scale * (arcface_phi(cos.gather(-1, target), m2) - m3)
    logits = torch.where(ignored.unsqueeze(-1), scale * cos, (scale * cos).scatter(-1, target, target_logit))
    return logits, target_logit.squeeze(-1), ignored


def code_ce_lse(x, weight, codes, scale=64.0, m2=0.0, m3=0.0, normalize=True, ignore_index=-100):
    """The logsumexp of each row's logits (B, L): the forward kernels' second output."""
    return torch.logsumexp(margin_logits(x, weight, codes, scale, m2, m3, normalize, ignore_index)[0], dim=-1)


def code_ce_rows(x, weight, codes, position_weight=None, scale=64.0, m2=0.0, m3=0.0,
                 normalize=True, ignore_index=-100):
    """Per-sample, per-position loss position_weight_j * CE_bj, shape (B, L); 0 where
    codes == ignore_index."""
    logits, target_logit, ignored = margin_logits(x, weight, codes, scale, m2, m3, normalize, ignore_index)
    ce = torch.logsumexp(logits, dim=-1) - target_logit
    if position_weight is not None:
        ce = ce * position_weight
    return ce.masked_fill(ignored, 0.0)


def reduce_loss(rows: torch.Tensor, reduction: str) -> torch.Tensor:
    """'none' -> (B, L); 'sum' -> scalar; 'mean' -> sum / B (the per-sample sum over positions, averaged)."""
    if reduction == "none":
        return rows
    total = rows.sum()
    return total if reduction == "sum" else total / rows.shape[0]


def fused_code_ce(x, weight, codes, position_weight=None, scale=64.0, m2=0.0, m3=0.0,
                  normalize=True, ignore_index=-100, reduction="mean"):
    rows = code_ce_rows(x, weight, codes, position_weight, scale, m2, m3, normalize, ignore_index)
    return reduce_loss(rows, reduction)
