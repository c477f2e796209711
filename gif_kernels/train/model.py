"""The trained model (backbone + head) and the identity codes it is trained on."""
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..codebook import CodeBook
from ..constants import NORM_EPS
from ..tokenize import default_length, random_vectors, spread
from .backbones import build_backbone
from .heads import build_head

# Images per identity embedded to get its mean feature when codes are built from the backbone.
MEAN_FEATURE_IMAGES = 8
# --identity-vectors besides a .npy file: drawn at random, or the initial backbone's mean features.
RANDOM_VECTORS, BACKBONE_VECTORS = "random", "backbone"
# The code head's default recipe, the best that bench/accuracy.py measured (bench/RESULTS.md, "Accuracy
# against the softmax heads"): L_AR toward random identity vectors, weighted to dominate the code loss
# (a sum over L positions at scale 64), puts every identity about as far from every other as a softmax
# head's learnt class centres are, which verification needs and which shared code tokens alone do not
# give; PQ codes of those vectors (at least DEFAULT_LENGTH positions) with each token's classifier
# started at the mean of its identities' vectors keep the positions learnable and the codes decodable.
# L_AR's weight is CodeHead's DEFAULT_GAMMA.
DEFAULT_VECTORS, DEFAULT_CODE_METHOD, DEFAULT_LENGTH = RANDOM_VECTORS, "pq", 6


class FaceModel(nn.Module):
    """Backbone + head; forward(inputs, labels) -> (loss, parts) so that DDP wraps the whole step."""

    def __init__(self, backbone: nn.Module, head: nn.Module):
        super().__init__()
        self.backbone, self.head = backbone, head

    def forward(self, inputs, labels):
        return self.head(self.backbone(inputs), labels)


def feature_dim_of(run: dict, input_shape: tuple) -> int:
    """D of the features a run's head sees: the embedding width, or features data's own."""
    return input_shape[0] if len(input_shape) == 1 else run["embedding_dim"]


def build_backbone_for(run: dict, input_shape: tuple) -> tuple[nn.Module, int]:
    """(backbone, feature dim) of a run. Features data trains the head alone: no backbone."""
    if len(input_shape) == 1:
        return nn.Identity(), feature_dim_of(run, input_shape)
    return build_backbone(run["backbone"], run["embedding_dim"], input_shape[-1]), feature_dim_of(run, input_shape)


def build_run_head(run: dict, kind: str, feature_dim: int, num_ids: int, codebook: CodeBook | None,
                   anchor_vectors: torch.Tensor | None = None, anchor_seed: int | None = None) -> nn.Module:
    """The head of kind `kind` (one of HEADS) with a run's arguments (the code head's anchors: see CodeHead)."""
    margin = {"scale": run["scale"], "margin": run["margin"], "m": run["m"]}
    code_args = {"proj_dim": run["proj_dim"], "anchor_vectors": anchor_vectors, "anchor_seed": anchor_seed,
                 "gamma": run["gamma"], "identity_weight": run["identity_weight"],
                 "identity_samples": run["identity_samples"], "backend": run["backend"]} if kind == "gif" else {}
    return build_head(kind, feature_dim, codebook=codebook, num_ids=num_ids, sample_rate=run["sample_rate"],
                      seed=run["seed"], **margin, **code_args)


@torch.no_grad()
def embed(backbone: nn.Module, dataset, device, batch_size: int = 256, workers: int = 0, flip: bool = False):
    """(features (n, D) float32, labels (n,) int64) of every item of dataset, in order, on the CPU.
    With flip, each image's features are the sum of those of the image and of its mirror image
    (insightface's flip test; inputs (B, 3, S, S) are mirrored along their width)."""
    was_training = backbone.training
    backbone.eval()
    features, labels = [], []
    for inputs, batch_labels in torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=workers):
        inputs = inputs.to(device)
        output = backbone(inputs)
        if flip:
            output = output + backbone(inputs.flip(-1))
        features.append(output.float().cpu())
        labels.append(torch.as_tensor(batch_labels, dtype=torch.int64))
    backbone.train(was_training)
    if not features:
        return torch.empty(0, 0), torch.empty(0, dtype=torch.int64)
    return torch.cat(features), torch.cat(labels)


def mean_features(backbone: nn.Module, train_set, train_labels: torch.Tensor, num_ids: int, device,
                  workers: int = 0) -> torch.Tensor:
    """One unit vector per identity: the normalized mean of up to MEAN_FEATURE_IMAGES normalized
    features of its training images."""
    order = torch.argsort(train_labels, stable=True)
    sorted_labels = train_labels[order]
    first = torch.searchsorted(sorted_labels, sorted_labels)  # index of each label's first image
    rank = torch.arange(len(order)) - first
    picked = order[rank < MEAN_FEATURE_IMAGES]
    features, _ = embed(backbone, torch.utils.data.Subset(train_set, picked.tolist()), device, workers=workers)
    features = F.normalize(features, dim=1, eps=NORM_EPS)
    sums = torch.zeros(num_ids, features.shape[1]).index_add_(0, train_labels[picked], features)
    return F.normalize(sums, dim=1, eps=NORM_EPS)


def identity_vectors(run: dict, backbone: nn.Module, splits, device, workers: int = 0) -> torch.Tensor:
    """The run's identity vectors (--identity-vectors): "random" (drawn from --seed at the features'
    width), "backbone" (the backbone's mean features) or a .npy file."""
    if run["identity_vectors"] == RANDOM_VECTORS:
        return random_vectors(splits.num_ids, feature_dim_of(run, splits.input_shape), seed=run["seed"])
    if run["identity_vectors"] != BACKBONE_VECTORS:
        vectors = torch.from_numpy(np.ascontiguousarray(np.load(run["identity_vectors"], allow_pickle=False)))
        if vectors.dim() != 2 or vectors.shape[0] != splits.num_ids or not vectors.dtype.is_floating_point:
            raise ValueError(f"identity_vectors: expected a float array (N, D) with N = {splits.num_ids} "
                             f"training identities, got {vectors.dtype} {tuple(vectors.shape)}")
        return vectors.float()
    return mean_features(backbone, splits.train, splits.train_labels, splits.num_ids, device, workers)


def build_codebook(run: dict, vectors: torch.Tensor | None, num_ids: int) -> CodeBook:
    """The run's CodeBook: loaded from --codes, else tokenized from the identity vectors."""
    if run["codes"]:
        codebook = CodeBook.load(run["codes"])
        if codebook.num_ids != num_ids:
            raise ValueError(f"codes: {run['codes']} has codes for {codebook.num_ids} identities, "
                             f"the data has {num_ids} training identities")
        return codebook
    if run["spread_steps"]:
        vectors = spread(vectors, run["spread_steps"], seed=run["seed"])
    length = run["length"] or max(DEFAULT_LENGTH, default_length(num_ids, run["vocab"]))
    return CodeBook.build(vectors, run["vocab"], length, method=run["code_method"], seed=run["seed"])
