"""CodeHead: the code head as an nn.Module, a drop-in replacement for a face-recognition softmax head.

Labels are identity ids; the CodeBook maps them to codes on the labels' device, L small margin
classifiers score them through fused_code_ce, and identify() finds the best valid codes by beam
search over the CodeBook's trie.
"""
import math

import torch
import torch.nn.functional as F
from torch import nn

from .codebook import CodeBook
from .constants import NORM_EPS
from .decode import code_beam_search
from .ops import BACKENDS, check_scale, fused_code_ce
from .tokenize import random_vectors

# The margin of each kind when m is not given (insightface's ArcFace and CosFace defaults).
DEFAULT_MARGINS = {"cosface": 0.4, "arcface": 0.5, "none": 0.0}


def margin_args(margin: str, m: float | None) -> tuple[float, float]:
    """(m2, m3) of fused_code_ce for a margin kind: ArcFace's angular m2 or CosFace's additive m3."""
    if margin not in DEFAULT_MARGINS:
        raise ValueError(f"margin: expected one of {tuple(DEFAULT_MARGINS)}, got {margin!r}")
    m = DEFAULT_MARGINS[margin] if m is None else float(m)
    if margin == "none" and m != 0.0:
        raise ValueError(f"m: margin 'none' takes no m, got {m}")
    return (m, 0.0) if margin == "arcface" else (0.0, m)


# Weight of L_AR beside the code loss, whose sum over L positions at scale 64 is 100-200 at the start:
# at 1000 L_AR pulls each feature to its anchor as strongly as the code loss sorts its tokens
# (bench/accuracy.py measured 100 and 3000 to train worse verification embeddings at 1000 identities).
DEFAULT_GAMMA = 1000.0


def anchor_loss(features: torch.Tensor, anchors: torch.Tensor) -> torch.Tensor:
    """L_AR = 1/2 (z . h_y - 1)^2 averaged over the batch: z the normalized feature, h_y its
    identity's normalized anchor vector."""
    z = F.normalize(features.float(), dim=-1, eps=NORM_EPS)
    h = F.normalize(anchors.float(), dim=-1, eps=NORM_EPS)
    return 0.5 * ((z * h).sum(-1) - 1.0).square().mean()


class CodeHead(nn.Module):
    """L margin classifiers over V tokens, trained on the codes of a CodeBook.

    feature_dim: D of the backbone's features. scale, margin ("cosface", "arcface", "none") and m
    (default DEFAULT_MARGINS[margin]) shape the logits as in fused_code_ce. position_weight: (L,)
    position_weight_j, default all 1. proj_dim: adds one linear projection per position, (B, D) ->
    (B, L, proj_dim), before the classifiers. Anchors, one vector per identity, add gamma * L_AR (see
    anchor_loss) and re-rank identify()'s answers; either anchor_seed: the rows of
    gif_kernels.tokenize.random_vectors(ids, D, anchor_seed), made for each batch's identities from
    their ids, with no table; or anchor_vectors: an (N, D) table, which stays where it is given
    (pinned when on the CPU) and of which only the batch's rows are gathered and moved. The recipe
    measured best (the trainer's default) uses anchor_seed, the codes from the PQ of those vectors
    (L = 6), and starts the classifier with init_from_vectors. identity_weight: adds that times
    identity_ce, a softmax over whole identities scored through the same classifiers (see identity_ce), over the
    batch's identities and identity_samples others. backend: fused_code_ce's and code_beam_search's.
    """

    def __init__(self, feature_dim: int, codebook: CodeBook, scale: float = 64.0, margin: str = "cosface",
                 m: float | None = None, position_weight=None, proj_dim: int | None = None,
                 anchor_vectors: torch.Tensor | None = None, anchor_seed: int | None = None,
                 gamma: float = DEFAULT_GAMMA, identity_weight: float = 0.0, identity_samples: int = 0,
                 backend: str = "auto"):
        super().__init__()
        if not isinstance(codebook, CodeBook):
            raise TypeError(f"codebook: expected a CodeBook, got {type(codebook)}")
        for name, value in (("feature_dim", feature_dim), ("proj_dim", proj_dim)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name}: expected an integer >= 1, got {value!r}")
        check_scale(scale)
        for name, value in (("gamma", gamma), ("identity_weight", identity_weight)):
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"{name}: expected a finite number >= 0, got {value}")
        if isinstance(identity_samples, bool) or not isinstance(identity_samples, int) or identity_samples < 0:
            raise ValueError(f"identity_samples: expected an integer >= 0, got {identity_samples!r}")
        self.identity_weight, self.identity_samples = float(identity_weight), identity_samples
        if backend not in BACKENDS:
            raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")
        self.m2, self.m3 = margin_args(margin, m)
        self.codebook = codebook
        self.feature_dim, self.proj_dim = feature_dim, proj_dim
        self.scale, self.margin, self.gamma, self.backend = float(scale), margin, float(gamma), backend
        length, vocab = codebook.length, codebook.vocab
        if position_weight is None:
            self.position_weight = None
        else:
            position_weight = torch.as_tensor(position_weight, dtype=torch.float32)
            if tuple(position_weight.shape) != (length,):
                raise ValueError(f"position_weight: expected shape (L,) = ({length},), got "
                                 f"{tuple(position_weight.shape)}")
            self.register_buffer("position_weight", position_weight)
        if proj_dim is None:
            self.proj_weight = self.proj_bias = None
        else:
            bound = 1.0 / math.sqrt(feature_dim)  # nn.Linear's initialization, per position
            self.proj_weight = nn.Parameter(torch.empty(length, feature_dim, proj_dim).uniform_(-bound, bound))
            self.proj_bias = nn.Parameter(torch.empty(length, proj_dim).uniform_(-bound, bound))
        # insightface's N(0, 0.01) (only a row's direction matters)
        self.weight = nn.Parameter(torch.normal(0.0, 0.01, (length, vocab, proj_dim or feature_dim)))
        if anchor_seed is not None and (isinstance(anchor_seed, bool) or not isinstance(anchor_seed, int)
                                        or anchor_seed < 0):
            raise ValueError(f"anchor_seed: expected an integer >= 0, got {anchor_seed!r}")
        if anchor_seed is not None and anchor_vectors is not None:
            raise ValueError("anchor_seed: expected None when anchor_vectors is given (one source of anchors)")
        self.anchor_seed, self.anchor_vectors = anchor_seed, None
        if anchor_vectors is not None:
            if tuple(anchor_vectors.shape) != (codebook.num_ids, feature_dim):
                raise ValueError(f"anchor_vectors: expected shape (N, D) = ({codebook.num_ids}, "
                                 f"{feature_dim}), got {tuple(anchor_vectors.shape)}")
            if not anchor_vectors.dtype.is_floating_point:
                raise TypeError(f"anchor_vectors: expected a float dtype, got {anchor_vectors.dtype}")
            if anchor_vectors.device.type == "cpu" and torch.cuda.is_available():
                anchor_vectors = anchor_vectors.pin_memory()  # rows gathered per step copy without a stall
            self.anchor_vectors = anchor_vectors  # data, not a parameter: kept out of state_dict

    @torch.no_grad()
    def init_from_vectors(self, vectors: torch.Tensor):
        """Sets each token's classifier row to the mean of the normalized identity vectors (N, D) of the
        identities whose code has that token at that position (a token no code uses keeps its row), so
        that the classifier starts where the codes put the identities instead of at random: codes made
        from a trained backbone's features are then scored well from the first step, and the backbone
        gets no gradient from a random classifier. Without projection heads only (they change the space)."""
        if self.proj_dim is not None:
            raise ValueError("init_from_vectors: the classifiers see projections (proj_dim), not the vectors' space")
        n, length, vocab = self.codebook.num_ids, self.codebook.length, self.codebook.vocab
        if tuple(vectors.shape) != (n, self.feature_dim) or not vectors.dtype.is_floating_point:
            raise ValueError(f"vectors: expected a float tensor (N, D) = ({n}, {self.feature_dim}), got "
                             f"{vectors.dtype} {tuple(vectors.shape)}")
        unit = F.normalize(vectors.to(self.weight.device, torch.float32), dim=-1, eps=NORM_EPS)
        codes = self.codebook.codes.to(self.weight.device, torch.int64)
        for j in range(length):  # one position at a time: N x D at most, never N x L x D
            sums = torch.zeros(vocab, self.feature_dim, device=unit.device).index_add_(0, codes[:, j], unit)
            used = torch.bincount(codes[:, j], minlength=vocab) > 0
            self.weight[j, used] = F.normalize(sums[used], dim=-1, eps=NORM_EPS).to(self.weight.dtype)

    def extra_repr(self):
        return (f"feature_dim={self.feature_dim}, codebook={self.codebook}, scale={self.scale}, "
                f"margin={self.margin!r}, m2={self.m2}, m3={self.m3}, proj_dim={self.proj_dim}, "
                f"anchors={self.has_anchors}, gamma={self.gamma}, backend={self.backend!r}")

    def position_features(self, features: torch.Tensor) -> torch.Tensor:
        """The classifiers' input: features (B, D), or their L projections (B, L, proj_dim)."""
        if features.dim() != 2 or features.shape[1] != self.feature_dim:
            raise ValueError(f"features: expected shape (B, {self.feature_dim}), got {tuple(features.shape)}")
        if self.proj_weight is None:
            return features
        return torch.einsum("bd,ldp->blp", features, self.proj_weight.to(features.dtype)) + \
            self.proj_bias.to(features.dtype)

    @property
    def has_anchors(self) -> bool:
        return self.anchor_seed is not None or self.anchor_vectors is not None

    def anchors(self, ids: torch.Tensor, device: torch.device) -> torch.Tensor:
        """The anchor rows (len(ids), D) of identities `ids` on `device`."""
        if self.anchor_seed is not None:
            return random_vectors(ids.to(device), self.feature_dim, self.anchor_seed)
        table = self.anchor_vectors
        if table.device.type == "cpu":
            rows = table.index_select(0, ids.cpu())  # a host sync when ids live on a GPU
            return rows.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else rows
        return table.index_select(0, ids.to(table.device)).to(device)

    def forward(self, features: torch.Tensor, labels: torch.Tensor):
        """Loss of a batch: features (B, D), labels (B,) identity ids in [0, N).

        Returns (loss, parts): loss = code_ce + gamma * anchor; parts holds each term, detached."""
        if labels.dim() != 1 or labels.shape[0] != features.shape[0]:
            raise ValueError(f"labels: expected shape (B,) = ({features.shape[0]},), got {tuple(labels.shape)}")
        labels = labels.to(features.device)
        codes = self.codebook.codes_for(labels)
        x = self.position_features(features)
        code_ce = fused_code_ce(x, self.weight.to(x.dtype), codes, self.position_weight, self.scale,
                                self.m2, self.m3, backend=self.backend)
        parts = {"code_ce": code_ce.detach()}
        loss = code_ce
        if self.has_anchors and self.gamma > 0:
            anchor = anchor_loss(features, self.anchors(labels, features.device))
            parts["anchor"] = anchor.detach()
            loss = loss + self.gamma * anchor
        if self.identity_weight > 0:
            identity = self.identity_ce(features, labels)
            parts["identity_ce"] = identity.detach()
            loss = loss + self.identity_weight * identity
        return loss, parts

    def cosines(self, features: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Cosines (B, L, V) in `dtype` of the classifiers' inputs with their weight rows."""
        x = F.normalize(self.position_features(features).to(dtype), dim=-1, eps=NORM_EPS)
        weight = F.normalize(self.weight.to(dtype), dim=-1, eps=NORM_EPS)
        return torch.einsum("bd,lvd->blv" if x.dim() == 2 else "bld,lvd->blv", x, weight)

    def identity_ce(self, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Cross-entropy over identities, each scored by scale * the mean over positions of the cosine
        with its code's token there (the label's less CosFace's m3): the batch's identities compete with
        one another and with identity_samples others drawn uniformly. The per-position loss only asks
        each position to tell its token from the V - 1 others, whose rows mix several identities; this
        term asks the positions together to tell an identity from each other one, as a softmax head
        does, for B * K * L gathers of the cosines that the head forms anyway."""
        cos = self.cosines(features, torch.float64 if features.dtype == torch.float64 else torch.float32)
        candidates = labels.unique()
        if self.identity_samples:
            drawn = torch.randint(0, self.codebook.num_ids, (self.identity_samples,), device=labels.device)
            candidates = torch.cat([candidates, drawn]).unique()
        target = torch.searchsorted(candidates, labels)
        codes = self.codebook.codes_for(candidates)                                  # (K, L)
        positions = torch.arange(codes.shape[1], device=codes.device)
        logits = cos[:, positions, codes].mean(-1)                                   # (B, K)
        logits = logits - self.m3 * F.one_hot(target, len(candidates)).to(logits.dtype)
        return F.cross_entropy(self.scale * logits, target)

    @torch.no_grad()
    def position_scores(self, features: torch.Tensor) -> torch.Tensor:
        """Per-position log-probabilities (B, L, V) float32: log-softmax of scale * cosine, no margin."""
        return torch.log_softmax(self.scale * self.cosines(features), dim=-1)

    @torch.no_grad()
    def identify(self, features: torch.Tensor, beam: int = 32, topk: int = 5, exact: bool = False,
                 rerank: bool | None = None):
        """The `topk` most likely identities of each face: (ids (B, topk) int64, scores (B, topk)
        float32, exact (B,) bool), by code_beam_search over the trie: id -1 past the last candidate.

        rerank (default: when the head has anchors): the beam's `beam` best codes are the candidates,
        ordered by the cosine of the face's features with each candidate's anchor, which are the scores;
        an anchor, pulled to by L_AR, sits where its identity's features are, which the L classifiers
        together can only approximate. That costs `beam` anchor rows and dot products per face and is
        never certified: exact is all False. Without it, the scores are the codes' summed
        log-probabilities and exact[q] certifies answer q (see code_beam_search)."""
        rerank = self.has_anchors if rerank is None else rerank
        if rerank and not self.has_anchors:
            raise ValueError("rerank: this head has no anchors (anchor_seed or anchor_vectors) to re-rank by")
        if rerank and exact:
            raise ValueError("exact: re-ranked answers are not certified; pass rerank=False for exact search")
        if rerank and topk > beam:
            raise ValueError(f"topk: expected <= beam = {beam} when re-ranking the beam's codes, got {topk}")
        scores = self.position_scores(features)
        trie = self.codebook.trie(scores.device)
        if not rerank:
            return code_beam_search(scores, trie, beam, topk, backend=self.backend, exact=exact)
        ids, _, _ = code_beam_search(scores, trie, beam, beam, backend=self.backend)
        found = ids >= 0
        anchors = self.anchors(ids.clamp(min=0).flatten(), features.device).view(*ids.shape, self.feature_dim)
        cosines = torch.einsum("bd,bkd->bk", F.normalize(features.float(), dim=-1, eps=NORM_EPS),
                               F.normalize(anchors.float(), dim=-1, eps=NORM_EPS))
        cosines = cosines.masked_fill(~found, float("-inf"))
        best, order = cosines.topk(topk, dim=1)
        ids = ids.gather(1, order).masked_fill(best == float("-inf"), -1)
        return ids, best, torch.zeros(len(ids), dtype=torch.bool, device=ids.device)

    def config(self) -> dict:
        """The constructor's arguments (JSON-able) beside the CodeBook and anchor table, which are
        data kept in their own files."""
        return {"feature_dim": self.feature_dim, "scale": self.scale, "margin": self.margin,
                "m": self.m2 if self.margin == "arcface" else self.m3, "proj_dim": self.proj_dim,
                "anchor_seed": self.anchor_seed, "gamma": self.gamma, "identity_weight": self.identity_weight,
                "identity_samples": self.identity_samples, "backend": self.backend,
                "position_weight": None if self.position_weight is None else self.position_weight.tolist(),
                "codebook_shape": [self.codebook.num_ids, self.codebook.length, self.codebook.vocab]}

    def get_extra_state(self):
        return self.config()

    def set_extra_state(self, state):
        expected = [self.codebook.num_ids, self.codebook.length, self.codebook.vocab]
        if list(state["codebook_shape"]) != expected:
            raise ValueError(f"state_dict: saved for a CodeBook of (N, L, V) = {tuple(state['codebook_shape'])}, "
                             f"this head has {tuple(expected)}")

    @classmethod
    def from_state_dict(cls, state_dict: dict, codebook: CodeBook, anchor_vectors=None, prefix: str = ""):
        """Rebuild a head saved with state_dict() and load its weights."""
        config = dict(state_dict[prefix + "_extra_state"])
        config.pop("codebook_shape")
        gamma = config.pop("gamma")
        head = cls(codebook=codebook, anchor_vectors=anchor_vectors, gamma=gamma, **config)
        head.load_state_dict({k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)})
        return head
