"""Identity tokenizer: unique in-range codes for every method and awkward size, k-means codes that
put near vectors under shared prefixes, determinism, spread, argument checks and the CLI."""
import subprocess
import sys

import numpy as np
import pytest
import torch

from gif_kernels import CodeBook
from gif_kernels.tokenize import (METHODS, default_length, prefix_spread, random_vectors, spread, tokenize,
                                  uniformity_loss)


def blobs(num_blobs, per_blob, dim, scale, seed=0):
    """Gaussian blobs of unit noise around num_blobs centers of the given scale; returns
    (vectors (num_blobs * per_blob, dim), blob of each row), rows shuffled."""
    generator = torch.Generator().manual_seed(seed)
    centers = scale * torch.randn(num_blobs, dim, generator=generator)
    shuffle = torch.randperm(num_blobs * per_blob, generator=generator)
    blob = torch.arange(num_blobs).repeat_interleave(per_blob)[shuffle]
    return centers[blob] + torch.randn(len(blob), dim, generator=generator), blob


def check_codes(codes, num_ids, vocab, length):
    assert codes.dtype == torch.int64 and codes.device.type == "cpu"
    assert codes.shape == (num_ids, length)
    assert int(codes.min()) >= 0 and int(codes.max()) < vocab
    assert len(torch.unique(codes, dim=0)) == num_ids


@pytest.mark.parametrize("num_ids,vocab,expected", [
    (1, 2, 1), (2, 2, 1), (3, 2, 2), (16, 16, 1), (17, 16, 2), (64, 4, 3), (65, 4, 4),
    (16 ** 6, 16, 6), (16 ** 6 + 1, 16, 7), (10 ** 30, 10, 30), (10 ** 30 + 1, 10, 31)])
def test_default_length(num_ids, vocab, expected):
    assert default_length(num_ids, vocab) == expected


# (N, vocab, length or None for the default): at and just above/below vocab**L, N = 1, vocab 2,
# a large vocab, and codes much longer than needed.
SIZES = [(1, 16, None), (1, 3, 4), (64, 4, 3), (63, 4, 3), (65, 4, None), (256, 16, 2), (257, 16, None),
         (37, 2, None), (37, 2, 9), (5000, 4096, 2), (101, 3, 7), (997, 16, None)]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("num_ids,vocab,length", SIZES)
def test_codes_unique_and_in_range(method, num_ids, vocab, length):
    vectors = torch.randn(num_ids, 11, generator=torch.Generator().manual_seed(num_ids))
    codes = tokenize(vectors, vocab, length, method)
    check_codes(codes, num_ids, vocab, length or default_length(num_ids, vocab))


@pytest.mark.parametrize("method", ["sequential", "random"])
def test_num_ids_without_vectors(method):
    check_codes(tokenize(None, 5, method=method, num_ids=126), 126, 5, 4)


def test_random_codes_beyond_int64():
    # 2**70 codes: drawn row by row, duplicates redrawn.
    check_codes(tokenize(None, 2, 70, "random", num_ids=1009), 1009, 2, 70)
    check_codes(tokenize(None, 16, 20, "random", num_ids=311), 311, 16, 20)


def test_sequential_is_base_vocab_digits():
    codes = tokenize(None, 3, 5, "sequential", num_ids=211)
    values = (codes * torch.tensor([81, 27, 9, 3, 1])).sum(1)
    assert torch.equal(values, torch.arange(211))


@pytest.mark.parametrize("name,vectors", [
    ("identical", torch.ones(131, 5)),
    ("two points", torch.tensor([[0.0, 1.0], [3.0, -1.0]]).repeat(67, 1)),
    ("one big blob", torch.cat([0.01 * blobs(1, 241, 3, 1.0)[0], blobs(3, 4, 3, 9.0)[0]])),
])
def test_kmeans_degenerate_vectors(name, vectors):
    # Capacity binds hard: 253 or 134 identities over 4**4 = 256 codes.
    codes = tokenize(vectors, 4, 4)
    check_codes(codes, len(vectors), 4, 4)
    assert int(torch.bincount(codes[:, 0]).max()) <= 64


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_kmeans_float_dtypes(dtype):
    vectors, _ = blobs(5, 31, 6, 4.0)
    check_codes(tokenize(vectors.to(dtype), 4), 155, 4, 4)


def test_kmeans_puts_blobs_under_shared_first_tokens():
    vectors, blob = blobs(16, 64, 16, 10.0)
    codes = tokenize(vectors, 16)
    random_codes = tokenize(vectors, 16, method="random")
    assert prefix_spread(vectors, codes, 1) < 0.3 * prefix_spread(vectors, random_codes, 1)
    # Well separated blobs of 64 (capacity 256 per first token): each blob is one first-token group.
    for b in range(16):
        assert len(torch.unique(codes[blob == b, 0])) == 1
    assert len(torch.unique(codes[:, 0])) == 16


def reference_kmeans_error(vectors, k, seeds=8, iterations=50):
    """Mean squared distance to the nearest of k centers: plain Lloyd from k random points, best seed."""
    best = float("inf")
    for seed in range(seeds):
        pick = torch.randperm(len(vectors), generator=torch.Generator().manual_seed(seed))[:k]
        centers = vectors[pick].double()
        for _ in range(iterations):
            labels = torch.cdist(vectors.double(), centers).argmin(1)
            for j in range(k):
                if (labels == j).any():
                    centers[j] = vectors[labels == j].double().mean(0)
        error = torch.cdist(vectors.double(), centers).min(1).values.pow(2).mean().item()
        best = min(best, error)
    return best


def test_kmeans_level1_error_near_unconstrained_kmeans():
    # Overlapping blobs, more blobs than tokens: level 1 is a real k-means problem (capacity 256
    # per token does not bind at 997 / 16 per token).
    vectors, _ = blobs(40, 25, 13, 2.0, seed=3)
    vectors = vectors[:997]
    codes = tokenize(vectors, 16)
    assert prefix_spread(vectors, codes, 1) <= 1.2 * reference_kmeans_error(vectors, 16)


def test_deeper_prefixes_are_tighter():
    vectors, _ = blobs(64, 16, 8, 5.0, seed=1)
    codes, random_codes = tokenize(vectors, 8), tokenize(vectors, 8, method="random")
    spreads = [prefix_spread(vectors, codes, depth) for depth in range(5)]
    assert spreads == sorted(spreads, reverse=True) and spreads[4] == 0.0
    assert spreads[2] < 0.3 * prefix_spread(vectors, random_codes, 2)


def same_partition(tokens, truth):
    """Whether two labelings of the same items split them alike (equal up to renaming the labels)."""
    pairs = torch.unique(torch.stack([tokens, truth], 1), dim=0)
    return len(pairs) == len(torch.unique(tokens)) == len(torch.unique(truth))


def test_pq_recovers_each_blocks_clusters():
    # 64 identities with every code of 4**3: block j of the vectors (2 columns) sits near centre
    # truth[:, j] of its own 4 centres. PQ's position j is block j's partition, whatever the prefix.
    generator = torch.Generator().manual_seed(2)
    truth = torch.cartesian_prod(*[torch.arange(4)] * 3)[torch.randperm(64, generator=generator)]
    centres = 10 * torch.randn(3, 4, 2, generator=generator)
    vectors = torch.cat([centres[j, truth[:, j]] for j in range(3)], 1) + 0.1 * torch.randn(64, 6, generator=generator)
    codes = tokenize(vectors, 4, 3, "pq")
    check_codes(codes, 64, 4, 3)
    assert all(same_partition(codes[:, j], truth[:, j]) for j in range(3))


def test_rq_recovers_residual_levels():
    # vectors = a coarse centre + a finer one + a finer still: RQ's position j is level j.
    generator = torch.Generator().manual_seed(3)
    truth = torch.cartesian_prod(*[torch.arange(4)] * 3)[torch.randperm(64, generator=generator)]
    centres = torch.randn(3, 4, 5, generator=generator) * torch.tensor([100.0, 10.0, 1.0])[:, None, None]
    vectors = sum(centres[j, truth[:, j]] for j in range(3)) + 0.01 * torch.randn(64, 5, generator=generator)
    codes = tokenize(vectors, 4, 3, "rq")
    check_codes(codes, 64, 4, 3)
    assert all(same_partition(codes[:, j], truth[:, j]) for j in range(3))


@pytest.mark.parametrize("method", ["pq", "rq"])
def test_quantizer_codes_stay_unique_when_capacity_binds(method):
    # Every identity on one of two points: the nearest centres would give two codes for 250 identities.
    vectors = torch.tensor([[0.0, 1.0, 2.0, 4.0], [3.0, -1.0, 0.5, 0.0]]).repeat(125, 1)
    codes = tokenize(vectors, 4, 4, method)
    check_codes(codes, 250, 4, 4)
    assert int(torch.bincount(codes[:, 0]).max()) <= 64


@pytest.mark.parametrize("method", ["kmeans", "pq", "rq", "random"])
def test_seeded_codes_are_deterministic(method):
    vectors, _ = blobs(7, 43, 9, 3.0)
    first = tokenize(vectors, 6, method=method, seed=5)
    assert torch.equal(first, tokenize(vectors, 6, method=method, seed=5))
    assert not torch.equal(first, tokenize(vectors, 6, method=method, seed=6))


def test_prefix_spread_by_hand():
    vectors = torch.tensor([[0.0], [2.0], [10.0], [12.0]])
    codes = torch.tensor([[0, 0], [0, 1], [1, 0], [1, 1]])
    assert prefix_spread(vectors, codes, 0) == pytest.approx(26.0)
    assert prefix_spread(vectors, codes, 1) == pytest.approx(1.0)
    assert prefix_spread(vectors, codes, 2) == 0.0


def test_spread_lowers_uniformity_loss_on_the_sphere():
    vectors, _ = blobs(3, 97, 5, 3.0)
    start = torch.nn.functional.normalize(vectors, dim=1)
    spread_out = spread(vectors, steps=60, batch=128)
    assert spread_out.shape == vectors.shape and spread_out.dtype == vectors.dtype
    assert torch.allclose(spread_out.norm(dim=1), torch.ones(len(vectors)), atol=1e-5)
    assert uniformity_loss(spread_out).item() < uniformity_loss(start).item() - 0.5
    assert torch.equal(spread(vectors, steps=0), start)


def test_random_vectors_are_unit_seeded_and_spread_as_on_the_sphere():
    vectors = random_vectors(3000, 512, seed=5)
    assert vectors.shape == (3000, 512) and vectors.dtype == torch.float32
    assert torch.allclose(vectors.norm(dim=1), torch.ones(3000), atol=1e-5)
    assert torch.equal(vectors, random_vectors(3000, 512, seed=5))
    assert not torch.equal(vectors, random_vectors(3000, 512, seed=6))
    cosines = (vectors[:1500] * vectors[1500:]).sum(1)  # 1500 independent pairs
    assert abs(cosines.mean().item()) < 0.005 and cosines.std().item() == pytest.approx(512 ** -0.5, rel=0.06)
    # the columns are as independent as the rows: no sign pattern shared across identities
    columns = vectors.T @ vectors * (512 / 3000) - torch.eye(512)
    assert columns.abs().max().item() < 6 / 3000 ** 0.5


@pytest.mark.parametrize("dim", [1, 15, 16, 17, 512])
def test_random_vectors_of_some_ids_are_those_rows_of_the_table(dim):
    """A head makes the anchors of a batch's identities from their ids: each row is a function of its
    own id (and the seed) only, also for ids past 2^32."""
    table = random_vectors(100, dim, seed=3)
    ids = torch.tensor([99, 0, 7, 7, 42], dtype=torch.int32)
    assert torch.equal(random_vectors(ids, dim, seed=3), table[ids.long()])
    assert random_vectors(ids[:0], dim).shape == (0, dim)
    far = random_vectors(torch.tensor([2 ** 40 + 7, 7]), dim, seed=3)
    assert torch.equal(far[1], table[7]) and far[0].abs().eq(dim ** -0.5).all()
    if dim >= 16:
        assert not torch.equal(far[0], far[1])
        assert not torch.equal(random_vectors(torch.tensor([7]), dim, seed=2 ** 40 + 3), table[7:8])


@pytest.mark.parametrize("call,argument", [
    (lambda x: tokenize(x, 1), "vocab"),
    (lambda x: tokenize(x, 4.0), "vocab"),
    (lambda x: tokenize(x, 4, 0), "length"),
    (lambda x: tokenize(x, 4, 3), "length"),
    (lambda x: tokenize(x, 4, method="hierarchical"), "method"),
    (lambda x: tokenize(x[:, 0], 4), "vectors"),
    (lambda x: tokenize(x[:0], 4), "vectors"),
    (lambda x: tokenize(x.long(), 4), "vectors"),
    (lambda x: tokenize(None, 4, num_ids=10), "vectors"),
    (lambda x: tokenize(None, 4, method="pq", num_ids=10), "vectors"),
    (lambda x: tokenize(x, 2, 4, method="pq"), "length"),
    (lambda x: tokenize(None, 4, method="random"), "num_ids"),
    (lambda x: tokenize(x, 4, num_ids=101), "num_ids"),
    (lambda x: tokenize(x, 4, seed=-1), "seed"),
    (lambda x: default_length(0, 16), "num_ids"),
    (lambda x: default_length(10, 1), "vocab"),
    (lambda x: spread(x, -1), "steps"),
    (lambda x: spread(x, 5, t=0.0), "t"),
    (lambda x: spread(x, 5, lr=float("nan")), "lr"),
    (lambda x: spread(x, 5, batch=1), "batch"),
    (lambda x: random_vectors(0, 4), "ids"),
    (lambda x: random_vectors(torch.tensor([0.0, 1.0]), 4), "ids"),
    (lambda x: random_vectors(torch.tensor([[0, 1]]), 4), "ids"),
    (lambda x: random_vectors(torch.tensor([3, -1]), 4), "ids"),
    (lambda x: random_vectors(4, 0), "dim"),
    (lambda x: random_vectors(4, 4, seed=-1), "seed"),
])
def test_bad_arguments_name_the_argument(call, argument):
    with pytest.raises(ValueError, match=f"^{argument}:"):
        call(torch.randn(100, 3))


def test_length_too_short_message():
    message = r"^length: 3 tokens over vocab 4 give 64 codes, fewer than N = 100 identities$"
    with pytest.raises(ValueError, match=message):
        tokenize(torch.randn(100, 3), 4, 3)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("function", [tokenize, spread], ids=["tokenize", "spread"])
def test_non_finite_vectors_name_the_first_bad_row(bad, function):
    vectors = torch.randn(53, 3)
    vectors[17, 1] = vectors[40, 0] = bad
    with pytest.raises(ValueError, match=r"^vectors: row 17 "):
        function(vectors, 4)


@pytest.mark.cuda
@pytest.mark.parametrize("method", METHODS)
def test_cuda_codes_unique_and_in_range(method):
    vectors, _ = blobs(11, 89, 17, 3.0)
    codes = tokenize(vectors.cuda(), 16, method=method)
    check_codes(codes, 979, 16, 3)
    assert prefix_spread(vectors, tokenize(vectors, 16, device="cuda"), 1) < prefix_spread(
        vectors, tokenize(vectors, 16, method="random"), 1)


def test_cli_end_to_end(tmp_path):
    vectors, _ = blobs(9, 23, 11, 4.0)
    np.save(tmp_path / "vecs.npy", vectors.numpy())
    out = tmp_path / "codes.safetensors"
    result = subprocess.run([sys.executable, "-m", "gif_kernels.tokenize", "--vectors", str(tmp_path / "vecs.npy"),
                             "--vocab", "5", "--seed", "2", "--out", str(out)],
                            capture_output=True, text=True, check=True)
    book = CodeBook.load(out)
    assert book.vocab == 5 and torch.equal(book.codes, tokenize(vectors, 5, seed=2))
    assert "N = 207, L = 4, V = 5" in result.stdout and "vs random codes" in result.stdout
