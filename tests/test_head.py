"""CodeHead and the softmax heads the trainer compares it with, against the reference math in float64."""
import math

import pytest
import torch
import torch.nn.functional as F

from gif_kernels import CodeBook, exhaustive_code_topk, reference
from gif_kernels.head import CodeHead, anchor_loss
from gif_kernels.tokenize import random_vectors
from gif_kernels.train.heads import FullSoftmaxHead, PartialFCHead, build_head


def codebook(num_ids=37, vocab=5, seed=0):
    from gif_kernels.tokenize import tokenize
    return CodeBook(tokenize(None, vocab, method="random", seed=seed, num_ids=num_ids), vocab)


def batch(num_ids, size=13, dim=11, seed=1, dtype=torch.float64):
    generator = torch.Generator().manual_seed(seed)
    features = torch.randn(size, dim, generator=generator, dtype=dtype)
    labels = torch.randint(num_ids, (size,), generator=generator)
    return features, labels


@pytest.mark.parametrize("margin, m, m2, m3", [("arcface", None, 0.5, 0.0), ("cosface", 0.3, 0.0, 0.3),
                                                ("none", None, 0.0, 0.0)])
@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_loss_is_the_reference_math(margin, m, m2, m3, backend):
    book = codebook()
    features, labels = batch(book.num_ids)
    position_weight = torch.tensor([0.5, 1.5, 1.0])[:book.length]
    anchors = torch.randn(book.num_ids, features.shape[1], dtype=torch.float64)
    head = CodeHead(features.shape[1], book, scale=17.0, margin=margin, m=m, position_weight=position_weight,
                    anchor_vectors=anchors, gamma=0.7, backend=backend).double()
    loss, parts = head(features, labels)
    code_ce = reference.fused_code_ce(features, head.weight, book.codes[labels], position_weight.double(),
                                      17.0, m2, m3)
    z, h = F.normalize(features, dim=1), F.normalize(anchors[labels], dim=1)
    anchor = 0.5 * ((z * h).sum(1) - 1).square().mean()
    torch.testing.assert_close(parts["code_ce"], code_ce, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(parts["anchor"].double(), anchor, rtol=1e-6, atol=1e-7)  # L_AR is float32
    torch.testing.assert_close(loss, code_ce + 0.7 * anchor, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("samples", [0, 5, 400])
def test_identity_ce_is_a_softmax_over_identities(samples):
    book = codebook()
    features, labels = batch(book.num_ids)
    head = CodeHead(features.shape[1], book, scale=13.0, m=0.3, identity_weight=0.6, identity_samples=samples,
                    backend="cpu").double()
    torch.manual_seed(4)
    loss, parts = head(features, labels)
    torch.manual_seed(4)  # the same draw of other identities, by hand
    candidates = labels.unique()
    if samples:
        candidates = torch.cat([candidates, torch.randint(0, book.num_ids, (samples,))]).unique()
    x, w = F.normalize(features, dim=1), F.normalize(head.weight, dim=2)
    logits = torch.stack([torch.stack([sum(x[b] @ w[j, book.codes[k, j]] for j in range(book.length)) / book.length
                                       for k in candidates.tolist()]) for b in range(len(labels))])
    target = torch.tensor([candidates.tolist().index(label) for label in labels.tolist()])
    logits[torch.arange(len(labels)), target] -= 0.3
    expected = F.cross_entropy(13.0 * logits, target)
    torch.testing.assert_close(parts["identity_ce"], expected, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(loss, parts["code_ce"] + 0.6 * expected, rtol=1e-10, atol=1e-10)
    if samples == 400:  # every identity drawn: the softmax over all of them
        assert len(candidates) == book.num_ids
    loss.backward()
    assert head.weight.grad.abs().sum() > 0


def test_projection_heads_feed_one_feature_per_position():
    book = codebook()
    features, labels = batch(book.num_ids)
    head = CodeHead(features.shape[1], book, margin="cosface", proj_dim=7, backend="cpu").double()
    projected = torch.einsum("bd,ldp->blp", features, head.proj_weight) + head.proj_bias
    expected = reference.fused_code_ce(projected, head.weight, book.codes[labels], None, 64.0, 0.0, 0.4)
    torch.testing.assert_close(head(features, labels)[0], expected, rtol=1e-10, atol=1e-10)
    assert head.position_scores(features).shape == (len(labels), book.length, book.vocab)


def test_gradients_reach_backbone_and_head():
    book = codebook()
    backbone = torch.nn.Sequential(torch.nn.Linear(9, 16), torch.nn.PReLU(), torch.nn.Linear(16, 11))
    head = CodeHead(11, book, proj_dim=6, anchor_vectors=torch.randn(book.num_ids, 11), gamma=1.0)
    images, labels = torch.randn(13, 9), torch.randint(book.num_ids, (13,))
    loss, _ = head(backbone(images), labels)
    loss.backward()
    for name, parameter in [*backbone.named_parameters(), *head.named_parameters()]:
        assert parameter.grad is not None and parameter.grad.isfinite().all(), name
        assert parameter.grad.abs().sum() > 0, name


@pytest.mark.parametrize("num_ids, vocab", [(1, 2), (37, 5), (200, 7)])
def test_identify_matches_exhaustive_scoring(num_ids, vocab):
    book = codebook(num_ids, vocab)
    head = CodeHead(11, book, scale=8.0)
    features, _ = batch(num_ids, size=29, dtype=torch.float32)
    topk = min(5, num_ids)
    expected_ids, expected_scores = exhaustive_code_topk(head.position_scores(features), book.codes, topk)
    ids, scores, exact = head.identify(features, beam=max(topk, 4), topk=topk, exact=True)
    assert exact.all()
    assert torch.equal(ids, expected_ids)
    torch.testing.assert_close(scores, expected_scores)
    # A beam as wide as N is exhaustive on its own.
    ids, _, exact = head.identify(features, beam=num_ids, topk=topk)
    assert exact.all() and torch.equal(ids, expected_ids)


def test_identify_ranks_by_the_cosine_logits_without_margin():
    book = codebook()
    head = CodeHead(11, book, scale=5.0, margin="arcface")
    features, _ = batch(book.num_ids, dtype=torch.float32)
    cos = torch.einsum("bd,lvd->blv", F.normalize(features, dim=1), F.normalize(head.weight.detach(), dim=-1))
    torch.testing.assert_close(head.position_scores(features), torch.log_softmax(5.0 * cos, -1))


def test_state_dict_rebuilds_the_head():
    book = codebook()
    features, labels = batch(book.num_ids, dtype=torch.float32)
    head = CodeHead(11, book, scale=30.0, margin="cosface", m=0.25, position_weight=[1.0, 2.0, 0.5], proj_dim=4,
                    identity_weight=0.5)
    state = head.state_dict()
    rebuilt = CodeHead.from_state_dict(state, book)
    assert rebuilt.config() == head.config()
    torch.testing.assert_close(rebuilt(features, labels)[0], head(features, labels)[0], rtol=0, atol=0)
    with pytest.raises(ValueError, match="state_dict"):
        CodeHead(11, codebook(num_ids=38), scale=30.0, margin="cosface", proj_dim=4,
                 position_weight=[1.0, 2.0, 0.5]).load_state_dict(state)


def test_bad_input_names_the_argument():
    book = codebook()
    head = CodeHead(11, book)
    features, labels = batch(book.num_ids, dtype=torch.float32)
    with pytest.raises(ValueError, match="labels: identity 37 is outside"):
        head(features, torch.full_like(labels, book.num_ids))
    with pytest.raises(ValueError, match="labels: expected shape"):
        head(features, labels[:-1])
    with pytest.raises(ValueError, match="features: expected shape"):
        head(features[:, :-1], labels)
    with pytest.raises(ValueError, match="margin"):
        CodeHead(11, book, margin="sphereface")
    for scale in (0.0, -64.0, float("nan")):
        with pytest.raises(ValueError, match="scale: expected a finite number > 0"):
            CodeHead(11, book, scale=scale)
    with pytest.raises(ValueError, match="m: margin 'none'"):
        CodeHead(11, book, margin="none", m=0.2)
    with pytest.raises(ValueError, match="anchor_vectors"):
        CodeHead(11, book, anchor_vectors=torch.randn(book.num_ids, 10))
    with pytest.raises(ValueError, match="position_weight"):
        CodeHead(11, book, position_weight=[1.0])
    with pytest.raises(ValueError, match="identity_weight: expected a finite number >= 0"):
        CodeHead(11, book, identity_weight=-1.0)
    for samples in (-1, 2.5, True):
        with pytest.raises(ValueError, match="identity_samples: expected an integer >= 0"):
            CodeHead(11, book, identity_samples=samples)
    with pytest.raises(TypeError, match="codebook"):
        CodeHead(11, book.codes)
    with pytest.raises(ValueError, match="labels: identity"):
        FullSoftmaxHead(11, 10)(features, labels + 10)


def test_init_from_vectors_puts_each_token_at_its_identities_mean():
    torch.manual_seed(0)
    codes = torch.tensor([[0, 2], [0, 1], [1, 1], [0, 0], [1, 2]])  # token 2 of position 0 unused
    vectors = torch.randn(5, 7, dtype=torch.float64)
    head = CodeHead(7, CodeBook(codes, vocab=3))
    unused = head.weight[0, 2].clone()
    head.init_from_vectors(vectors)
    unit = F.normalize(vectors, dim=-1)
    for j in range(2):
        for v in codes[:, j].unique().tolist():
            expected = F.normalize(unit[codes[:, j] == v].sum(0), dim=0).float()
            torch.testing.assert_close(head.weight[j, v].detach(), expected)
    assert torch.equal(head.weight[0, 2], unused)
    with pytest.raises(ValueError, match=r"vectors: expected a float tensor \(N, D\) = \(5, 7\)"):
        head.init_from_vectors(vectors[:, :6])
    with pytest.raises(ValueError, match="init_from_vectors: .*proj_dim"):
        CodeHead(7, CodeBook(codes, vocab=3), proj_dim=4).init_from_vectors(vectors)


def test_anchor_loss_is_zero_on_the_anchor():
    anchors = torch.randn(5, 8)
    assert anchor_loss(3 * anchors, anchors) < 1e-12
    assert math.isclose(anchor_loss(anchors, -anchors).item(), 2.0, rel_tol=1e-6)


def test_anchor_seed_makes_the_anchors_of_random_vectors_without_a_table():
    book = codebook()
    features, labels = batch(book.num_ids, dtype=torch.float32)
    table = random_vectors(book.num_ids, features.shape[1], seed=4)
    seeded = CodeHead(features.shape[1], book, anchor_seed=4, gamma=0.7, backend="reference")
    tabled = CodeHead(features.shape[1], book, anchor_vectors=table, gamma=0.7, backend="reference")
    tabled.load_state_dict(seeded.state_dict())
    assert seeded.anchor_vectors is None and seeded.has_anchors
    _, parts = seeded(features, labels)
    torch.testing.assert_close(parts["anchor"], tabled(features, labels)[1]["anchor"], rtol=0, atol=0)
    rebuilt = CodeHead.from_state_dict(seeded.state_dict(), book)
    assert rebuilt.anchor_seed == 4 and rebuilt.config() == seeded.config()
    with pytest.raises(ValueError, match="anchor_seed: expected None when anchor_vectors"):
        CodeHead(features.shape[1], book, anchor_seed=4, anchor_vectors=table)
    for seed in (-1, 1.5, True):
        with pytest.raises(ValueError, match="anchor_seed: expected an integer >= 0"):
            CodeHead(features.shape[1], book, anchor_seed=seed)


@pytest.mark.parametrize("num_ids, beam, topk", [(1, 4, 1), (37, 8, 5), (37, 64, 5), (200, 16, 16)])
def test_identify_reranks_the_beam_by_the_anchors(num_ids, beam, topk):
    """With anchors the answers are the beam's `beam` codes ordered by their anchors' cosines."""
    book = codebook(num_ids, 5 if num_ids > 1 else 2)
    features, _ = batch(num_ids, size=23, dtype=torch.float32)
    head = CodeHead(11, book, scale=8.0, anchor_seed=2)
    candidates, _, _ = head.identify(features, beam=beam, topk=beam, rerank=False)
    ids, scores, exact = head.identify(features, beam=beam, topk=topk)
    assert not exact.any() and ids.shape == scores.shape == (23, topk)
    anchors = random_vectors(num_ids, 11, seed=2)
    cosines = F.normalize(features, dim=1) @ anchors.T  # (23, N)
    for q in range(23):
        found = candidates[q][candidates[q] >= 0]
        count = min(topk, len(found))
        answer = ids[q, :count]
        assert set(answer.tolist()) <= set(found.tolist()) and len(answer.unique()) == count
        assert (ids[q, count:] == -1).all() and (scores[q, count:] == float("-inf")).all()
        torch.testing.assert_close(scores[q, :count], cosines[q, answer])  # each answer's own cosine,
        torch.testing.assert_close(scores[q, :count], cosines[q, found].topk(count).values)  # the best ones
    with pytest.raises(ValueError, match="exact: re-ranked answers"):
        head.identify(features, beam=beam, topk=topk, exact=True)
    with pytest.raises(ValueError, match="topk: expected <= beam"):
        head.identify(features, beam=4, topk=5)
    with pytest.raises(ValueError, match="rerank: this head has no anchors"):
        CodeHead(11, book).identify(features, rerank=True)


def test_full_softmax_head_is_a_code_of_length_one():
    features, labels = batch(23)
    head = FullSoftmaxHead(11, 23, scale=16.0, margin="cosface").double()
    expected = reference.fused_code_ce(features, head.weight[None], labels[:, None], None, 16.0, 0.0, 0.4)
    torch.testing.assert_close(head(features, labels)[0], expected)
    ids, _, exact = head.identify(features, topk=3)
    cos = F.normalize(features, dim=1) @ F.normalize(head.weight.detach(), dim=1).T
    assert torch.equal(ids, cos.topk(3).indices) and exact.all()


def test_partial_fc_samples_positives_and_random_negatives():
    features, labels = batch(101, size=17)
    head = PartialFCHead(11, 101, sample_rate=0.3, scale=16.0, seed=3).double()
    index, targets = head.sample(labels)
    assert len(index) == 30 and torch.equal(index, index.sort().values)
    assert torch.equal(index[targets], labels)  # every positive is in, labels remapped onto it
    loss, _ = head(features, labels)
    replay = PartialFCHead(11, 101, sample_rate=0.3, scale=16.0, seed=3).double()
    replay.load_state_dict(head.state_dict())
    other_index, _ = replay.sample(labels)  # draws continue where the saved head stopped
    assert torch.equal(other_index, head.sample(labels)[0])
    fresh = PartialFCHead(11, 101, sample_rate=0.3, seed=3)
    assert torch.equal(fresh.sample(labels)[0], index)  # draw k is a function of (seed, k)
    with pytest.raises(ValueError, match="sample_rate"):
        PartialFCHead(11, 101, sample_rate=0.0)
    with pytest.raises(ValueError, match="head: expected one of"):
        build_head("arcface", 11, num_ids=10)


@pytest.mark.cuda
def test_cuda_head_matches_the_cpu_head():
    book = codebook(num_ids=500, vocab=8)
    features, labels = batch(book.num_ids, size=67, dtype=torch.float32)
    head = CodeHead(11, book, proj_dim=9, anchor_vectors=torch.randn(book.num_ids, 11), gamma=0.5)
    loss, parts = head(features, labels)
    ids, scores, _ = head.identify(features, beam=16)
    head.cuda()
    cuda_loss, cuda_parts = head(features.cuda(), labels.cuda())
    torch.testing.assert_close(cuda_loss.cpu(), loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cuda_parts["anchor"].cpu(), parts["anchor"], rtol=1e-5, atol=1e-6)
    cuda_ids, cuda_scores, _ = head.identify(features.cuda(), beam=16)
    assert (cuda_ids.cpu() == ids).float().mean() > 0.99  # float rounding may swap near-ties
    torch.testing.assert_close(cuda_scores.cpu(), scores, rtol=1e-4, atol=1e-4)
