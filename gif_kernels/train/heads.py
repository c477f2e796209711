"""The heads the trainer compares: the code head, full softmax and Partial FC.

Every head takes (features (B, D), labels (B,)) and returns (loss, parts), and identifies faces with
identify(features, topk) -> (ids, scores, exact). Full softmax and Partial FC are the classic N-way
margin heads, written as insightface writes them (the logits of the batch are materialized).
"""
import torch
import torch.nn.functional as F
from torch import nn

from .. import reference
from ..constants import NORM_EPS
from ..head import CodeHead, margin_args
from ..ops import check_scale

HEADS = ("gif", "full", "partial_fc")


@torch.no_grad()
def partial_fc_classes(labels: torch.Tensor, num_ids: int, num_sample: int, generator=None):
    """Partial FC's sampling (insightface partial_fc_v2.sample): every class of the batch, then
    random others up to num_sample classes. Returns (class ids ascending, labels remapped into them)."""
    positives = labels.unique()
    if positives.numel() >= num_sample:
        index = positives
    else:  # random priorities, the positives' forced above every draw
        priority = torch.rand(num_ids, generator=generator, device=labels.device)
        priority[positives] = 2.0
        index = priority.topk(num_sample).indices.sort().values
    return index, torch.searchsorted(index, labels)


class FullSoftmaxHead(nn.Module):
    """Softmax over all N identities with the same margin as the code head (a code of length 1)."""

    def __init__(self, feature_dim: int, num_ids: int, scale: float = 64.0, margin: str = "cosface",
                 m: float | None = None):
        super().__init__()
        self.m2, self.m3 = margin_args(margin, m)
        check_scale(scale)
        self.scale = float(scale)
        self.weight = nn.Parameter(torch.normal(0.0, 0.01, (num_ids, feature_dim)))

    def _check_labels(self, labels):
        if labels.device.type == "cpu" and labels.numel() and not (
                (labels >= 0) & (labels < self.weight.shape[0])).all():
            bad = labels[(labels < 0) | (labels >= self.weight.shape[0])][0].item()
            raise ValueError(f"labels: identity {bad} is outside [0, {self.weight.shape[0]})")

    def _margin_loss(self, features, weight, targets):
        rows = reference.code_ce_rows(features, weight.to(features.dtype).unsqueeze(0), targets.unsqueeze(1),
                                      scale=self.scale, m2=self.m2, m3=self.m3)
        return reference.reduce_loss(rows, "mean")

    def forward(self, features: torch.Tensor, labels: torch.Tensor):
        self._check_labels(labels)
        loss = self._margin_loss(features, self.weight, labels.to(features.device))
        return loss, {"softmax_ce": loss.detach()}

    @torch.no_grad()
    def identify(self, features: torch.Tensor, topk: int = 5, **_search_args):
        """Top-k identities by cosine over every class (always exact)."""
        cos = F.normalize(features.float(), dim=-1, eps=NORM_EPS) @ \
            F.normalize(self.weight.float(), dim=-1, eps=NORM_EPS).T
        scores, ids = cos.topk(min(topk, cos.shape[1]), dim=1)
        return ids, self.scale * scores, torch.ones(ids.shape[0], dtype=torch.bool, device=ids.device)


class PartialFCHead(FullSoftmaxHead):
    """Partial FC (An et al.): each step's softmax runs over the batch's identities plus random others,
    sample_rate * N classes in all. Draw k is seeded by (seed, k) and the draw count is part of
    state_dict, so a resumed run draws the same classes."""

    def __init__(self, feature_dim: int, num_ids: int, sample_rate: float = 0.1, scale: float = 64.0,
                 margin: str = "cosface", m: float | None = None, seed: int = 0):
        super().__init__(feature_dim, num_ids, scale, margin, m)
        if not 0.0 < sample_rate <= 1.0:
            raise ValueError(f"sample_rate: expected a fraction in (0, 1], got {sample_rate}")
        self.num_sample = max(1, int(sample_rate * num_ids))
        self.seed, self.draws = seed, 0

    def sample(self, labels: torch.Tensor):
        """(sampled class ids ascending, labels remapped into them): the batch's classes are always in."""
        generator = torch.Generator(labels.device).manual_seed(self.seed * 1_000_003 + self.draws)
        self.draws += 1
        return partial_fc_classes(labels, self.weight.shape[0], self.num_sample, generator)

    def forward(self, features: torch.Tensor, labels: torch.Tensor):
        self._check_labels(labels)
        index, targets = self.sample(labels.to(features.device))
        loss = self._margin_loss(features, self.weight[index], targets)
        return loss, {"softmax_ce": loss.detach()}

    def get_extra_state(self):
        return {"seed": self.seed, "draws": self.draws}

    def set_extra_state(self, state):
        self.seed, self.draws = state["seed"], state["draws"]


def build_head(kind: str, feature_dim: int, codebook=None, num_ids: int | None = None, sample_rate: float = 0.1,
               seed: int = 0, **margin_and_code_args) -> nn.Module:
    """One of HEADS. The code head needs the CodeBook; the others the identity count."""
    if kind == "gif":
        return CodeHead(feature_dim, codebook, **margin_and_code_args)
    scale_margin = {k: margin_and_code_args[k] for k in ("scale", "margin", "m") if k in margin_and_code_args}
    if kind == "full":
        return FullSoftmaxHead(feature_dim, num_ids, **scale_margin)
    if kind == "partial_fc":
        return PartialFCHead(feature_dim, num_ids, sample_rate, seed=seed, **scale_margin)
    raise ValueError(f"head: expected one of {HEADS}, got {kind!r}")
