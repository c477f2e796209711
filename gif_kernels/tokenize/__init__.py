"""Identity tokenizer: one unique code of L tokens over a vocabulary of V per identity (V**L >= N).

"kmeans" (the GIF paper's) puts similar identities under shared prefixes by recursive k-means over
one vector per identity, split into capacity-limited clusters so that every code is unique; its
tokens below the first mean different things under different prefixes. "pq" and "rq" (product and
residual quantization) give every position one partition of all identities instead, the same under
every prefix, which is what L independent classifiers on one embedding can learn. "sequential" and
"random" are the baselines. `spread` is the paper's optional refinement of the vectors before
tokenizing; `random_vectors` draws identity vectors that need no backbone. Everything is batched
torch, so it runs on CPU or CUDA tensors.
The command line (`python -m gif_kernels.tokenize`) is __main__.py beside this file.
"""
import math
import numbers

import torch
import torch.nn.functional as F
from tqdm import tqdm

METHODS = ("kmeans", "pq", "rq", "sequential", "random")
VECTOR_METHODS = ("kmeans", "pq", "rq")  # the methods that read the identity vectors
DEFAULT_METHOD = "kmeans"

# Each chunk of k-means nodes holds about this many floats in its padded (G, n_max, D) tensors;
# a single node larger than that is a chunk of its own.
CHUNK_FLOATS = 2 ** 24
LLOYD_ITERATIONS = 10
# Rounds of centroid update + capacity-limited reassignment after the first constrained assignment.
REFINE_ROUNDS = 2


# ---------------------------------------------------------------------------------------------
# argument checks


def _check_int(name, value, minimum):
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name}: expected an integer >= {minimum}, got {value!r}")
    return int(value)


def _check_positive(name, value):
    if not isinstance(value, numbers.Real) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name}: expected a finite number > 0, got {value!r}")
    return float(value)


def _check_vectors(vectors):
    if not isinstance(vectors, torch.Tensor):
        raise ValueError(f"vectors: expected a torch.Tensor, got {type(vectors).__name__}")
    if vectors.dim() != 2 or vectors.shape[0] < 1 or vectors.shape[1] < 1:
        raise ValueError(f"vectors: expected shape (N, D) with N >= 1 and D >= 1, got {tuple(vectors.shape)}")
    if not vectors.dtype.is_floating_point:
        raise ValueError(f"vectors: expected a float dtype, got {vectors.dtype}")
    bad_rows = (~torch.isfinite(vectors).all(dim=1)).nonzero()
    if len(bad_rows):
        raise ValueError(f"vectors: row {bad_rows[0].item()} is not finite (NaN or inf); "
                         f"{len(bad_rows)} such rows in all")


def _work_dtype(dtype):
    """float64 stays float64; everything else is computed in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def default_length(num_ids: int, vocab: int) -> int:
    """Smallest L >= 1 with vocab**L >= num_ids (exact integer arithmetic)."""
    num_ids = _check_int("num_ids", num_ids, 1)
    vocab = _check_int("vocab", vocab, 2)
    length = 1
    while vocab ** length < num_ids:
        length += 1
    return length


# ---------------------------------------------------------------------------------------------
# k-means pieces on padded batches of nodes: x (G, n, D), mask (G, n) marks real members


def _sq_dist(x, x_sq, centers):
    """Squared distances (G, n, m) from x (G, n, D) with x_sq = |x|^2 (G, n) to centers (G, m, D)."""
    c_sq = (centers * centers).sum(-1)
    return torch.baddbmm(x_sq[..., None] + c_sq[:, None, :], x, centers.transpose(1, 2), alpha=-2).clamp_min_(0)


def _sample(weights, mask, count, generator):
    """count indices (G, count) per node drawn with probability proportional to weights (G, n);
    uniformly over the members where all weights of a node are zero (all points on centers)."""
    weights = weights.double()
    weights = torch.where(weights.sum(1, keepdim=True) > 0, weights, mask.double())
    cdf = weights.cumsum(1)
    u = torch.rand(cdf.shape[0], count, generator=generator, device=cdf.device, dtype=cdf.dtype)
    # searchsorted (right) picks the first index whose cdf exceeds u, which has positive weight.
    return torch.searchsorted(cdf, u * cdf[:, -1:], right=True).clamp_max_(cdf.shape[1] - 1)


def _gather_rows(x, index):
    """x (G, n, D), index (G, m) -> (G, m, D)."""
    return x.gather(1, index[..., None].expand(-1, -1, x.shape[2]))


def _kmeans_plus_plus(x, x_sq, mask, k, generator):
    """Greedy k-means++ (as scikit-learn): each new center is the best of a few sampled candidates."""
    G, n, D = x.shape
    trials = 2 + int(math.log(k))
    weight = mask.to(x.dtype)
    centers = torch.empty(G, k, D, dtype=x.dtype, device=x.device)
    centers[:, :1] = _gather_rows(x, _sample(weight, mask, 1, generator))
    closest = _sq_dist(x, x_sq, centers[:, :1]).squeeze(2) * weight
    for j in range(1, k):
        candidates = _gather_rows(x, _sample(closest, mask, trials, generator))   # (G, T, D)
        closest_if = torch.minimum(closest[..., None], _sq_dist(x, x_sq, candidates)) * weight[..., None]
        best = closest_if.sum(1).argmin(1)                                        # (G,)
        closest = closest_if.gather(2, best[:, None, None].expand(G, n, 1)).squeeze(2)
        centers[:, j] = candidates[torch.arange(G, device=x.device), best]
    return centers


def _centroids(x, labels, mask, centers):
    """Member means per cluster; an empty cluster keeps its previous center."""
    k = centers.shape[1]
    one_hot = ((labels[..., None] == torch.arange(k, device=x.device)) & mask[..., None]).to(x.dtype)
    counts = one_hot.sum(1)                                                       # (G, k)
    means = torch.bmm(one_hot.transpose(1, 2), x) / counts.clamp_min(1)[..., None]
    return torch.where(counts[..., None] > 0, means, centers)


def _assign_with_capacity(dist, mask, capacity):
    """Labels (G, n) with at most `capacity` members per cluster, greedily by distance: in rounds,
    every unassigned point proposes to its nearest non-full cluster, and each cluster accepts its
    closest proposers up to its remaining room. A round either places everyone or fills a cluster,
    so k + 1 rounds suffice (nodes must have n <= k * capacity)."""
    G, n, k = dist.shape
    labels = torch.full((G, n), -1, dtype=torch.long, device=dist.device)
    room = torch.full((G * k,), capacity, dtype=torch.long, device=dist.device)
    unassigned = mask.clone()
    for _ in range(k + 1):
        proposers = unassigned.flatten().nonzero().squeeze(1)
        if len(proposers) == 0:
            break
        node = proposers // n
        open_dist = dist.view(G * n, k)[proposers].masked_fill((room == 0).view(G, k)[node], math.inf)
        nearest_dist, choice = open_dist.min(1)
        cluster = node * k + choice                           # flat (node, cluster) id
        # Order proposers by cluster, closest first, then rank them within their cluster.
        order = nearest_dist.argsort(stable=True)
        order = order[cluster[order].argsort(stable=True)]
        cluster = cluster[order]
        rank = torch.arange(len(cluster), device=dist.device) - torch.searchsorted(cluster, cluster)
        accepted = rank < room[cluster]
        placed = proposers[order[accepted]]
        labels.view(-1)[placed] = cluster[accepted] % k
        unassigned.view(-1)[placed] = False
        room -= torch.bincount(cluster[accepted], minlength=G * k)
    return labels


def _lloyd(x, x_sq, mask, k, generator):
    """k centers (G, k, D) per node of a padded batch: k-means++ seeding, then Lloyd's iterations."""
    centers = _kmeans_plus_plus(x, x_sq, mask, k, generator)
    labels = None
    for _ in range(LLOYD_ITERATIONS):
        new_labels = _sq_dist(x, x_sq, centers).argmin(2)
        if labels is not None and torch.equal(new_labels, labels):
            break
        labels = new_labels
        centers = _centroids(x, labels, mask, centers)
    return centers


def _split_nodes(x, mask, k, capacity, generator):
    """Cluster labels (G, n) in [0, k) for a padded batch of nodes, at most `capacity` per cluster."""
    x_sq = (x * x).sum(-1)
    centers = _lloyd(x, x_sq, mask, k, generator)
    labels = _assign_with_capacity(_sq_dist(x, x_sq, centers), mask, capacity)
    for _ in range(REFINE_ROUNDS):
        centers = _centroids(x, labels, mask, centers)
        labels = _assign_with_capacity(_sq_dist(x, x_sq, centers), mask, capacity)
    return labels


def _chunks(sizes, width):
    """(start, stop) ranges over node sizes sorted in decreasing order, each chunk's padded
    (G, n_max, width) tensor holding at most CHUNK_FLOATS floats (or a single node)."""
    start = 0
    while start < len(sizes):
        stop = min(len(sizes), start + max(1, CHUNK_FLOATS // (sizes[start] * width)))
        yield start, stop
        start = stop


def _padded_nodes(nodes, sizes, starts, width):
    """(positions, mask) per chunk of `nodes`: positions (G, n_max) index the nodes' members in the
    grouped order, padding slots repeating a node's first member; mask (G, n_max) marks real members."""
    nodes = nodes[sizes[nodes].argsort(descending=True, stable=True)]
    node_sizes = sizes[nodes].tolist()
    for start, stop in _chunks(node_sizes, width):
        chunk, n_max = nodes[start:stop], node_sizes[start]
        offsets = torch.arange(n_max, device=sizes.device)
        mask = offsets < sizes[chunk, None]
        yield torch.where(mask, starts[chunk, None] + offsets, starts[chunk, None]), mask


def _codes_by_level(num_ids, vocab, length, device, progress, fill):
    """Codes (N, L), level by level. At depth d the identities sit in `perm` grouped by node (their code
    prefix so far; `sizes` and `starts` in that order); `token` (N,), in the same order, starts as each
    member's rank in its node, and fill(depth, perm, sizes, starts, token) overwrites what it chooses.
    fill must give no token of a node more than vocab**(length - d - 1) members, which keeps every code
    unique (a node's members then fit its children). Children are each node's members sorted by token
    (stable, so identity order is kept)."""
    codes = torch.zeros(num_ids, length, dtype=torch.long, device=device)
    perm = torch.arange(num_ids, device=device)       # identities, grouped by node
    sizes = torch.tensor([num_ids], device=device)     # node sizes, in perm order
    levels = tqdm(range(length), desc="tokenize", unit="level", disable=not progress)
    for depth in levels:
        starts = sizes.cumsum(0) - sizes
        node_of_position = torch.repeat_interleave(torch.arange(len(sizes), device=device), sizes)
        token = torch.arange(num_ids, device=device) - starts[node_of_position]
        fill(depth, perm, sizes, starts, token)
        codes[perm, depth] = token
        levels.set_postfix(nodes=len(sizes))
        key = node_of_position * vocab + token
        order = key.argsort(stable=True)
        perm = perm[order]
        sizes = torch.unique_consecutive(key[order], return_counts=True)[1]
    return codes


def _kmeans_codes(x, vocab, length, generator, progress):
    """Recursive capacity-limited k-means: a node of n > vocab members at depth d splits into vocab
    clusters of at most vocab**(length - d - 1) each; a node of n <= vocab gives its members the tokens
    0..n-1 (in identity order), which is also all the last level ever needs."""
    def fill(depth, perm, sizes, starts, token):
        capacity = vocab ** (length - depth - 1)
        big = (sizes > vocab).nonzero().squeeze(1)
        for positions, mask in _padded_nodes(big, sizes, starts, max(x.shape[1], vocab)):
            labels = _split_nodes(x[perm[positions]], mask, vocab, min(capacity, positions.shape[1]), generator)
            token[positions[mask]] = labels[mask]

    return _codes_by_level(x.shape[0], vocab, length, x.device, progress, fill)


# ---------------------------------------------------------------------------------------------
# quantizer codes: every position one partition of all identities, the same under every prefix


def _shared_centers(z, vocab, generator):
    """vocab k-means centers (vocab, d) of all rows of z (N, d)."""
    return _lloyd(z[None], (z * z).sum(-1)[None], torch.ones(1, len(z), dtype=torch.bool, device=z.device),
                  vocab, generator)[0]


def _quantizer_codes(x, vocab, length, generator, progress, residual):
    """Product quantization (residual=False: position j is the nearest of vocab centers in the j-th of L
    column blocks of x) or residual quantization (residual=True: position j is the nearest of vocab
    centers to what positions < j leave of x). Each position's centers are shared by all identities,
    so a token means one thing whatever the prefix; the assignment is capacity-limited within each
    prefix (vocab**(length - d - 1) per token at depth d), which keeps the codes unique."""
    blocks = torch.tensor_split(torch.arange(x.shape[1], device=x.device), length)
    left = x.clone()

    def fill(depth, perm, sizes, starts, token):
        z = left if residual else x[:, blocks[depth]]
        centers = _shared_centers(z, vocab, generator)
        z_sq, capacity = (z * z).sum(-1), vocab ** (length - depth - 1)
        everything = torch.arange(len(sizes), device=x.device)
        for positions, mask in _padded_nodes(everything, sizes, starts, max(z.shape[1], vocab)):
            members = perm[positions]
            dist = _sq_dist(z[members], z_sq[members], centers.expand(len(members), -1, -1))
            labels = _assign_with_capacity(dist, mask, min(capacity, positions.shape[1]))
            token[positions[mask]] = labels[mask]
        if residual:
            left[perm] -= centers[token]

    return _codes_by_level(x.shape[0], vocab, length, x.device, progress, fill)


# ---------------------------------------------------------------------------------------------
# baselines


def _digits(values, vocab, length):
    """Base-vocab digits (N, length) of values (N,) int64, most significant first."""
    digits = torch.empty(len(values), length, dtype=torch.long, device=values.device)
    for j in reversed(range(length)):
        digits[:, j] = values % vocab
        values = values // vocab
    return digits


def _random_codes(num_ids, vocab, length, generator, device):
    """A uniformly random injective map from identities to codes."""
    num_codes = vocab ** length
    if num_codes <= 4 * num_ids:          # dense: a random permutation of all codes
        return _digits(torch.randperm(num_codes, generator=generator, device=device)[:num_ids], vocab, length)
    # Sparse (also past 2**63 codes): draw rows and redraw all but the first of any duplicates;
    # each redraw collides with probability < 1/4, so this ends in a few rounds.
    codes = torch.randint(0, vocab, (num_ids, length), generator=generator, device=device)
    index = torch.arange(num_ids, device=device)
    while True:
        unique, inverse = torch.unique(codes, dim=0, return_inverse=True)
        first = torch.full((len(unique),), num_ids, device=device).scatter_reduce_(0, inverse, index, "amin")
        repeated = first[inverse] != index
        count = int(repeated.sum())
        if count == 0:
            return codes
        codes[repeated] = torch.randint(0, vocab, (count, length), generator=generator, device=device)


# ---------------------------------------------------------------------------------------------
# public API


def tokenize(vectors: torch.Tensor | None, vocab: int, length: int | None = None, method: str = DEFAULT_METHOD,
             seed: int = 0, device=None, num_ids: int | None = None, progress: bool = False) -> torch.Tensor:
    """Unique codes (N, L) int64 on CPU, one row per identity (row i = identity i).

    vectors: (N, D) float identity vectors (required for "kmeans", "pq", "rq"; for "sequential"/"random" only N
    is used, or num_ids when vectors is None). length: default_length(N, vocab) when None.
    device: where to compute (default: vectors' device, else CPU). Deterministic for a seed on a
    given device."""
    vocab = _check_int("vocab", vocab, 2)
    if method not in METHODS:
        raise ValueError(f"method: expected one of {METHODS}, got {method!r}")
    if vectors is None:
        if method in VECTOR_METHODS:
            raise ValueError(f"vectors: method {method!r} needs the identity vectors, got None")
        num_ids = _check_int("num_ids", num_ids, 1)
    else:
        _check_vectors(vectors)
        if num_ids is not None and num_ids != vectors.shape[0]:
            raise ValueError(f"num_ids: {num_ids!r} does not match the {vectors.shape[0]} rows of vectors")
        num_ids = vectors.shape[0]
    if length is None:
        length = default_length(num_ids, vocab)
    length = _check_int("length", length, 1)
    if vocab ** length < num_ids:
        raise ValueError(f"length: {length} tokens over vocab {vocab} give {vocab ** length} codes, "
                         f"fewer than N = {num_ids} identities")
    if method == "pq" and vectors.shape[1] < length:
        raise ValueError(f"length: method 'pq' splits the D = {vectors.shape[1]} columns of vectors into L "
                         f"blocks, so L must be <= D, got {length}")
    seed = _check_int("seed", seed, 0)
    device = torch.device(device) if device is not None else (
        vectors.device if vectors is not None else torch.device("cpu"))
    generator = torch.Generator(device=device).manual_seed(seed)

    if method in VECTOR_METHODS:
        x = vectors.to(device=device, dtype=_work_dtype(vectors.dtype))
        codes = (_kmeans_codes(x, vocab, length, generator, progress) if method == "kmeans" else
                 _quantizer_codes(x, vocab, length, generator, progress, residual=method == "rq"))
    elif method == "sequential":
        codes = _digits(torch.arange(num_ids, device=device), vocab, length)
    else:
        codes = _random_codes(num_ids, vocab, length, generator, device)
    return codes.cpu()


def uniformity_loss(vectors: torch.Tensor, t: float = 2.0) -> torch.Tensor:
    """log(mean_{i,j} exp(-t * |h_i - h_j|^2)) over all pairs of rows (diagonal included)."""
    sq = (vectors * vectors).sum(1)
    # -t * |h_i - h_j|^2 = -t * (|h_i|^2 + |h_j|^2) + 2t * h_i.h_j in one addmm (few passes over B x B).
    exponent = torch.addmm(-t * (sq[:, None] + sq[None, :]), vectors, vectors.T, alpha=2 * t).clamp_max(0)
    return torch.logsumexp(exponent.flatten(), 0) - 2 * math.log(len(vectors))


# Multipliers of the identity vectors' hash: odd, and below 2**31 so that a 32-bit value times one
# stays below 2**63 in int64 arithmetic (torch has no unsigned 64-bit multiply on every device).
_HASH_MULTIPLIERS = (0x7FEB352D, 0x5BD1E995)
_MASK32 = 0xFFFFFFFF
SIGNS_PER_HASH = 16


def _hash32(x: torch.Tensor) -> torch.Tensor:
    """A bijective hash of int64 tensors holding values in [0, 2**32): xorshift-multiply rounds."""
    for multiplier in _HASH_MULTIPLIERS:
        x = x ^ (x >> 16)
        x = (x * multiplier) & _MASK32
    return x ^ (x >> 15)


def _hash_words(state: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """state hashed with both 32-bit halves of the int64 values (broadcast)."""
    for word in (value & _MASK32, (value >> 32) & _MASK32):
        state = _hash32(state ^ word)
    return state


def random_vectors(ids, dim: int, seed: int = 0, device=None) -> torch.Tensor:
    """Identity vectors that owe nothing to a backbone: float32 unit vectors of `dim` random signs,
    +-1/sqrt(dim), each sign a hash of (seed, identity id, column). `ids` is a count N (the rows of
    identities 0..N-1, on `device`) or a 1-D integer tensor of ids (their rows, on its device; negative
    ids raise on the CPU, and on a GPU, where the check would be a host sync, get rows too). A row
    depends only on its own id, so a head makes the rows of a batch's identities when it needs them,
    with no (N, dim) table. In D dimensions two of them have a cosine of mean 0 and spread
    1/sqrt(D), as two random points of the sphere do, so as L_AR anchors they put every identity
    about as far from every other as the sphere allows, which a softmax head's learnt class centres
    do too."""
    dim = _check_int("dim", dim, 1)
    seed = _check_int("seed", seed, 0)
    if isinstance(ids, torch.Tensor):
        if ids.dim() != 1 or ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
            raise ValueError(f"ids: expected a 1-D integer tensor, got {ids.dtype} {tuple(ids.shape)}")
        ids = ids.to(torch.int64)
        if ids.device.type == "cpu" and len(ids) and int(ids.min()) < 0:
            raise ValueError(f"ids: expected ids >= 0, got {int(ids.min())}")
    else:
        ids = torch.arange(_check_int("ids", ids, 1), device=device)
    seed_state = _hash_words(torch.zeros((), dtype=torch.int64, device=ids.device),
                             torch.tensor(seed, dtype=torch.int64, device=ids.device))
    rows = _hash_words(seed_state, ids)[:, None]
    # one hash per SIGNS_PER_HASH columns, whose signs are its upper (best mixed) bits
    words = _hash32(torch.arange(-(-dim // SIGNS_PER_HASH), dtype=torch.int64, device=ids.device) + 1)
    shifts = torch.arange(32 - SIGNS_PER_HASH, 32, dtype=torch.int64, device=ids.device)
    bits = (_hash32(rows ^ words[None, :])[:, :, None] >> shifts) & 1
    return (bits.flatten(1)[:, :dim] * 2 - 1).to(torch.float32) * dim ** -0.5


def spread(vectors: torch.Tensor, steps: int, t: float = 2.0, lr: float = 0.1, batch: int = 4096,
           seed: int = 0, progress: bool = False) -> torch.Tensor:
    """The paper's refinement: unit-normalize, then `steps` steps of Adam minimizing
    uniformity_loss over a random subset of `batch` identities per step, re-normalizing onto the
    unit sphere after each step. Returns the new (N, D) unit vectors (same device/dtype).

    Adam is SparseAdam: only the sampled rows move, and only their moment estimates update."""
    _check_vectors(vectors)
    steps = _check_int("steps", steps, 0)
    t = _check_positive("t", t)
    lr = _check_positive("lr", lr)
    batch = _check_int("batch", batch, 2)
    seed = _check_int("seed", seed, 0)
    num_ids = vectors.shape[0]
    weight = torch.nn.Parameter(F.normalize(vectors.to(_work_dtype(vectors.dtype)), dim=1))
    optimizer = torch.optim.SparseAdam([weight], lr=lr)
    generator = torch.Generator(device=vectors.device).manual_seed(seed)
    for _ in tqdm(range(steps), desc="spread", unit="step", disable=not progress):
        ids = torch.randperm(num_ids, generator=generator, device=vectors.device)[:batch]
        loss = uniformity_loss(F.embedding(ids, weight, sparse=True), t)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            weight[ids] = F.normalize(weight[ids], dim=1)
    return weight.detach().to(vectors.dtype)


# ---------------------------------------------------------------------------------------------
# code quality summary (CLI, tests, bench)


def prefix_spread(vectors: torch.Tensor, codes: torch.Tensor, depth: int) -> float:
    """Mean squared distance of each vector to the mean of its prefix group (the identities sharing
    its first `depth` tokens); depth 0 gives the total variance. Lower = tighter prefixes."""
    x = vectors.detach().double().cpu()
    if depth == 0:
        group = torch.zeros(len(x), dtype=torch.long)
    else:
        group = torch.unique(codes[:, :depth].cpu(), dim=0, return_inverse=True)[1]
    counts = torch.bincount(group)
    means = torch.zeros(len(counts), x.shape[1], dtype=x.dtype).index_add_(0, group, x) / counts[:, None]
    return (x - means[group]).pow(2).sum(1).mean().item()


def summary(vectors: torch.Tensor, codes: torch.Tensor, vocab: int, seed: int = 0) -> dict:
    """Level-1 balance and prefix spread at depths 1 and 2 (where L allows) of `codes`, next to
    the same figures for random codes of the same shape."""
    num_ids, length = codes.shape
    first = torch.bincount(codes[:, 0], minlength=vocab)
    random = tokenize(None, vocab, length, "random", seed=seed, num_ids=num_ids)
    depths = range(1, min(length, 2) + 1)
    return {"ids": num_ids, "length": length, "vocab": vocab,
            "level1_largest": int(first.max()), "level1_smallest": int(first.min()),
            "level1_ideal": num_ids / vocab,
            "total_variance": prefix_spread(vectors, codes, 0),
            "prefix_spread": {depth: prefix_spread(vectors, codes, depth) for depth in depths},
            "random_prefix_spread": {depth: prefix_spread(vectors, random, depth) for depth in depths}}


def format_summary(stats: dict) -> str:
    lines = [f"N = {stats['ids']}, L = {stats['length']}, V = {stats['vocab']}",
             f"level-1 groups: largest {stats['level1_largest']}, smallest {stats['level1_smallest']}, "
             f"ideal {stats['level1_ideal']:.1f}",
             f"total variance {stats['total_variance']:.4g}"]
    for depth, value in stats["prefix_spread"].items():
        random = stats["random_prefix_spread"][depth]
        # Random codes spread 0 where every identity has a prefix of its own (N <= V**depth).
        ratio = f" ({value / random:.2f}x)" if random > 0 else ""
        lines.append(f"prefix spread, first {depth} token(s): {value:.4g} vs random codes {random:.4g}{ratio}")
    return "\n".join(lines)
