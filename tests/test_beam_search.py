"""code_beam_search (CPU kernel) and exhaustive_code_topk against a float64 top-k of all codes, the
exact flag's guarantee, the op's registration and its input checks."""
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import gif_kernels
from gif_kernels import CodeBook, code_beam_search, exhaustive_code_topk
from gif_kernels.codebook import CodeTrie


def random_codes(num_ids, length, vocab, seed, clusters=0):
    """Unique codes in random id order. With clusters > 0 they share a few random prefixes, so the
    trie is skewed: a few wide subtrees, many single-child chains."""
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, vocab, (4 * num_ids + 8, length), generator=gen)
    if clusters:
        centers = torch.randint(0, vocab, (clusters, length), generator=gen)
        shared = torch.randint(0, length, (codes.shape[0], 1), generator=gen)  # prefix length kept
        center = centers[torch.randint(0, clusters, (codes.shape[0],), generator=gen)]
        codes = torch.where(torch.arange(length) < shared, center, codes)
    codes = codes.unique(dim=0)
    assert codes.shape[0] >= num_ids
    return codes[torch.randperm(codes.shape[0], generator=gen)[:num_ids]]


def peaked_scores(num_queries, length, vocab, seed, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(num_queries, length, vocab, generator=gen, dtype=torch.float64) * 3
    return logits.log_softmax(-1).to(dtype)


def reference_topk(scores, codes, topk):
    """Every code's total summed in float64 in position order; best first, ties by lower id."""
    scores = scores.double()
    totals = sum(scores[:, j, codes[:, j]] for j in range(codes.shape[1])).numpy()
    ids = np.full((scores.shape[0], topk), -1)
    best = np.full((scores.shape[0], topk), -np.inf)
    for q, row in enumerate(totals):
        order = np.lexsort((np.arange(row.size), -row))[:topk]
        ids[q, :order.size], best[q, :order.size] = order, row[order]
    return torch.from_numpy(ids), torch.from_numpy(best)


def code_totals(scores, codes, ids):
    """Float64 sums of scores along the codes of `ids` (Q, k); -inf where id is -1."""
    picked = codes[ids.clamp(min=0)]  # (Q, k, L)
    rows = torch.arange(scores.shape[0])[:, None]
    totals = sum(scores.double()[rows, j, picked[..., j]] for j in range(codes.shape[1]))
    return totals.masked_fill(ids < 0, float("-inf"))


def check_search(scores, codes, vocab, beam, topk):
    """Invariants of one search against the float64 top-k; returns the exact flags."""
    trie = CodeBook(codes, vocab).trie()
    ids, total, exact = code_beam_search(scores, trie, beam=beam, topk=topk)
    num_ids = codes.shape[0]
    assert ids.shape == total.shape == (scores.shape[0], topk) and exact.shape == (scores.shape[0],)
    assert ids.dtype == torch.int64 and total.dtype == torch.float32 and exact.dtype == torch.bool
    found = min(topk, num_ids)
    assert (ids[:, :found] >= 0).all() and (ids[:, found:] == -1).all()
    assert (total[:, found:] == float("-inf")).all()
    assert (total[:, 1:] <= total[:, :-1]).all()
    assert all(len(set(row)) == found for row in ids[:, :found].tolist())
    torch.testing.assert_close(total.double(), code_totals(scores, codes, ids), rtol=1e-6, atol=1e-5)
    ref_ids, ref_total = reference_topk(scores, codes, topk)
    assert torch.equal(ids[exact], ref_ids[exact])
    if beam >= num_ids:
        assert exact.all()
        assert torch.equal(ids, ref_ids)
        torch.testing.assert_close(total.double(), ref_total, rtol=1e-6, atol=1e-5)
    return exact


CASES = {  # name: (num_ids, length, vocab, clusters)
    "random": (211, 4, 7, 0),
    "skewed": (307, 5, 16, 3),
    "fewer_than_topk": (3, 3, 5, 0),
    "one_code": (1, 4, 3, 0),
    "one_level": (37, 1, 53, 0),
    "binary": (300, 11, 2, 0),
    "vocab_4096": (401, 2, 4096, 0),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("beam,topk", [(1, 1), (5, 5), (8, 3), (1000, 5)])
def test_against_exhaustive(case, beam, topk):
    num_ids, length, vocab, clusters = CASES[case]
    codes = random_codes(num_ids, length, vocab, seed=num_ids + beam, clusters=clusters)
    check_search(peaked_scores(13, length, vocab, seed=beam * topk), codes, vocab, beam, topk)


def test_narrow_beams_are_certified_or_not_as_the_answer_goes():
    # A dense trie and peaked scores certify most queries at beam 8 and not all at beam 1; a sparse
    # trie certifies few (the bound uses each position's best token, valid or not).
    codes = random_codes(900, 5, 4, seed=1)
    scores = peaked_scores(64, 5, 4, seed=2)
    assert check_search(scores, codes, 4, 8, 5).float().mean() > 0.9
    assert not check_search(scores, codes, 4, 1, 1).all()
    sparse = random_codes(300, 5, 16, seed=1, clusters=3)
    assert check_search(peaked_scores(64, 5, 16, seed=2), sparse, 16, 8, 5).float().mean() < 0.5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_low_precision_scores_sum_in_float32(dtype):
    codes = random_codes(211, 4, 7, seed=3)
    scores = peaked_scores(17, 4, 7, seed=4, dtype=dtype)
    trie = CodeBook(codes, 7).trie()
    ids, total, exact = code_beam_search(scores, trie, beam=6, topk=4)
    ref_ids, ref_total = exhaustive_code_topk(scores, trie, 4)  # the same float32 sums
    assert ref_total.dtype == torch.float32 and exact.any()
    assert torch.equal(ids[exact], ref_ids[exact]) and torch.equal(total[exact], ref_total[exact])
    torch.testing.assert_close(total.double(), code_totals(scores, codes, ids), rtol=1e-5, atol=1e-4)


def test_exact_mode_researches_until_certified():
    codes = random_codes(500, 6, 4, seed=5, clusters=2)
    scores = peaked_scores(31, 6, 4, seed=6) / 4  # flat scores: a beam of 5 rarely certifies
    trie = CodeBook(codes, 4).trie()
    assert not code_beam_search(scores, trie, beam=5, topk=5)[2].all()
    ids, total, exact = code_beam_search(scores, trie, beam=5, topk=5, exact=True)
    ref_ids, ref_total = reference_topk(scores, codes, 5)
    assert exact.all() and torch.equal(ids, ref_ids)
    torch.testing.assert_close(total.double(), ref_total, rtol=1e-6, atol=1e-5)


def test_reference_backend_and_exhaustive_chunks(monkeypatch):
    codes = random_codes(229, 3, 9, seed=7)
    scores = peaked_scores(11, 3, 9, seed=8).round(decimals=1)  # rounded: many ties across chunks
    monkeypatch.setattr(gif_kernels.decode, "EXHAUSTIVE_CHUNK_ELEMENTS", 11 * 17)
    ref_ids, ref_total = reference_topk(scores, codes, 7)
    ids, total = exhaustive_code_topk(scores, codes, 7)
    assert torch.equal(ids, ref_ids) and torch.equal(total, ref_total)
    ids, total, exact = code_beam_search(scores, CodeBook(codes, 9).trie(), beam=7, topk=7,
                                         backend="reference")
    assert torch.equal(ids, ref_ids) and exact.all() and total.dtype == torch.float32


def test_trie_codes_in_id_order():
    for num_ids, length, vocab in [(1, 1, 2), (300, 11, 2), (401, 2, 4096)]:
        codes = random_codes(num_ids, length, vocab, seed=num_ids)
        assert torch.equal(CodeBook(codes, vocab).trie().codes(), codes)


@settings(max_examples=60, deadline=None)
@given(num_ids=st.integers(1, 60), length=st.integers(1, 4), vocab=st.integers(2, 6),
       levels=st.integers(1, 4), beam=st.integers(1, 8), topk=st.integers(1, 8), seed=st.integers(0, 2**16))
def test_exact_flag_is_never_wrong(num_ids, length, vocab, levels, beam, topk, seed):
    """exact[q] implies the exhaustive top-k, ids included, even when scores take only a few values
    and totals tie everywhere."""
    num_ids = min(num_ids, vocab ** length)
    gen = torch.Generator().manual_seed(seed)
    keys = torch.randperm(vocab ** length, generator=gen)[:num_ids]
    codes = torch.stack([(keys // vocab ** (length - 1 - j)) % vocab for j in range(length)], 1)
    scores = -torch.randint(0, levels, (7, length, vocab), generator=gen).double()
    beam = max(beam, topk)
    ids, total, exact = code_beam_search(scores, CodeBook(codes, vocab).trie(), beam=beam, topk=topk)
    ref_ids, ref_total = reference_topk(scores, codes, topk)
    assert torch.equal(ids[exact], ref_ids[exact])
    assert torch.equal(total[exact].double(), ref_total[exact])


def op_args(num_ids=53, length=3, vocab=6, num_queries=5, seed=9):
    trie = CodeBook(random_codes(num_ids, length, vocab, seed=seed), vocab).trie()
    return (peaked_scores(num_queries, length, vocab, seed, torch.float32), trie.child_offsets,
            trie.child_tokens, trie.leaf_ids)


def test_opcheck_and_compile():
    args = op_args()
    for beam, topk in [(1, 1), (4, 3), (64, 5)]:
        torch.library.opcheck(torch.ops.gif.code_beam_search.default, (*args, beam, topk))
    torch.library.opcheck(torch.ops.gif.code_beam_search.default, (args[0][:0], *args[1:], 4, 2))
    compiled = torch.compile(lambda s: torch.ops.gif.code_beam_search(s, *args[1:], 8, 3), fullgraph=True)
    for got, want in zip(compiled(args[0]), torch.ops.gif.code_beam_search(*args, 8, 3)):
        assert torch.equal(got, want)


def bad_trie_arrays():
    scores, offsets, tokens, leaves = op_args()
    decreasing = offsets.clone()
    decreasing[1] = decreasing[2] + 1
    return {
        "offsets not monotone": (decreasing, tokens, leaves,
                                 f"child_offsets: expected non-decreasing offsets, got {int(decreasing[1])} "
                                 f"then {int(decreasing[2])} at node 1"),
        "last offset != len(tokens)": (torch.cat([offsets[:-1], offsets[-1:] - 1]), tokens, leaves,
                                       "child_offsets: last offset"),
        "tokens too short": (offsets, tokens[:-1], leaves, r"child_tokens: expected shape \(M - 1,\)"),
        "token past V": (offsets, torch.where(tokens == tokens.max(), 6, tokens), leaves,
                         r"child_tokens: expected tokens in \[0, V\) = \[0, 6\) of scores, found 6"),
        "token below 0": (offsets, torch.where(tokens == tokens.min(), -3, tokens), leaves,
                          r"child_tokens: expected tokens in \[0, V\) = \[0, 6\) of scores, found -3"),
        "offsets int32": (offsets.int(), tokens, leaves, "child_offsets: expected int64"),
        "tokens int64": (offsets, tokens.long(), leaves, "child_tokens: expected int32"),
        "leaf count": (offsets, tokens, leaves[:-1], "leaf_ids: expected one id per leaf"),
        "leaf id past N": (offsets, tokens, torch.where(leaves == 0, leaves.numel(), leaves),
                           r"leaf_ids: expected each id of \[0, N\)"),
        "leaf id twice": (offsets, tokens, torch.where(leaves == 0, 1, leaves), r"leaf_ids: expected each id"),
    }


@pytest.mark.parametrize("case", list(bad_trie_arrays()))
def test_op_rejects_inconsistent_tries(case):
    scores = op_args()[0]
    offsets, tokens, leaves, message = bad_trie_arrays()[case]
    with pytest.raises((ValueError, TypeError), match=message):
        torch.ops.gif.code_beam_search(scores, offsets, tokens, leaves, 4, 2)


def test_op_rejects_bad_arguments():
    scores, *arrays = op_args()
    cases = [
        ((scores[0], *arrays, 4, 2), r"scores: expected shape \(Q, L, V\)"),
        ((scores[:, :2], *arrays, 4, 2), "scores: expected L = 3 positions"),
        ((scores[..., :5], *arrays, 4, 2), r"child_tokens: expected tokens in \[0, V\) = \[0, 5\)"),
        ((scores, *arrays, 2, 4), "beam: expected >= topk = 4"),
        ((scores, *arrays, 4, 0), "topk: expected >= 1"),
        # mixed devices: a meta tensor sends the call to the fake kernel, which checks them too
        ((scores, arrays[0], arrays[1], arrays[2].to("meta"), 4, 2), "must be on one device"),
    ]
    for args, message in cases:
        with pytest.raises(ValueError, match=message):
            torch.ops.gif.code_beam_search(*args)
    with pytest.raises(TypeError, match="scores: expected float32"):
        torch.ops.gif.code_beam_search(scores.int(), *arrays, 4, 2)


def test_api_rejects_bad_arguments():
    codes = random_codes(53, 3, 6, seed=9)
    trie = CodeBook(codes, 6).trie()
    scores = peaked_scores(5, 3, 6, seed=9)
    cases = [
        (dict(scores=scores[0]), ValueError, r"scores: expected a tensor of shape \(Q, L, V\)"),
        (dict(scores=scores[:, :2]), ValueError, "scores: expected L = 3 positions"),
        (dict(scores=scores[..., :5]), ValueError, "scores: expected V >= 6"),
        (dict(beam=3, topk=4), ValueError, "beam: expected >= topk = 4"),
        (dict(beam=0, topk=1), ValueError, "beam: expected an integer >= 1"),
        (dict(topk=0), ValueError, "topk: expected an integer >= 1"),
        (dict(trie=trie.to("meta")), ValueError, "trie: expected it on the scores' device"),
        (dict(trie=codes), TypeError, "trie: expected a CodeTrie"),
        (dict(backend="fastest"), ValueError, "backend: expected one of"),
        (dict(backend="cuda"), ValueError, "backend: 'cuda' needs cuda tensors"),
        (dict(backend="triton"), RuntimeError, "backend: 'triton'"),
    ]
    for overrides, error, message in cases:
        kwargs = dict(scores=scores, trie=trie, beam=4, topk=2) | overrides
        with pytest.raises(error, match=message):
            code_beam_search(**kwargs)
    with pytest.raises(ValueError, match=r"codes: expected tokens in \[0, V\) = \[0, 5\)"):
        exhaustive_code_topk(scores[..., :5], codes, 2)


def test_op_checks_a_trie_again_after_an_in_place_change():
    scores, offsets, tokens, leaves = op_args()
    torch.ops.gif.code_beam_search(scores, offsets, tokens, leaves, 4, 2)  # checked, and remembered
    leaves[0] = leaves.numel()
    with pytest.raises(ValueError, match="leaf_ids: expected each id"):
        torch.ops.gif.code_beam_search(scores, offsets, tokens, leaves, 4, 2)


def crafted_tries():
    """CodeTrie arguments with one thing wrong each, and the error it must raise."""
    trie = CodeBook(random_codes(40, 3, 5, seed=4), 5).trie()
    fields = dict(child_offsets=trie.child_offsets, child_tokens=trie.child_tokens,
                  level_starts=trie.level_starts, leaf_ids=trie.leaf_ids, vocab=trie.vocab)
    offsets, tokens, starts, leaves = (fields[k].clone() for k in list(fields)[:4])
    first_sibling = int(torch.nonzero(offsets[1:] - offsets[:-1] >= 2)[0])
    swapped = tokens.clone()
    e = int(offsets[first_sibling])
    swapped[e], swapped[e + 1] = tokens[e + 1], tokens[e]
    decreasing = offsets.clone()
    decreasing[2] = offsets[1] - 1
    return {
        "decreasing offset": (dict(child_offsets=decreasing), "child_offsets: expected offsets from 0"),
        "unsorted tokens": (dict(child_tokens=swapped), "child_tokens: expected each node's children in strictly"),
        "token >= vocab": (dict(vocab=int(tokens.max())), r"child_tokens: expected tokens in \[0, vocab\)"),
        "leaf id past N": (dict(leaf_ids=torch.where(leaves == 0, leaves.numel(), leaves)),
                           r"leaf_ids: expected a permutation"),
        "level_starts": (dict(level_starts=starts[:-1]), "level_starts: expected"),
        "int32 offsets": (dict(child_offsets=offsets.int()), "child_offsets: expected a 1-D torch.int64"),
        "vocab": (dict(vocab=0), "vocab: expected an integer >= 1"),
    }, fields


@pytest.mark.parametrize("case", list(crafted_tries()[0]))
def test_code_trie_rejects_crafted_arrays(case):
    cases, fields = crafted_tries()
    overrides, message = cases[case]
    with pytest.raises(ValueError, match=message):
        CodeTrie(**(fields | overrides))


def test_search_checks_a_trie_changed_in_place():
    codes = random_codes(40, 3, 5, seed=4)
    trie = CodeBook(codes, 5).trie()
    scores = peaked_scores(2, 3, 5, seed=4)
    trie.leaf_ids[0] = 99
    for backend in ("cpu", "reference"):
        with pytest.raises(ValueError, match="leaf_ids: expected a permutation"):
            code_beam_search(scores, trie, beam=4, topk=2, backend=backend)


def test_auto_backend_takes_the_kernel_whose_beam_fits(monkeypatch):
    from gif_kernels.ops import beam_search
    monkeypatch.setattr(beam_search, "has_beam_search_kernel", lambda backend, device: True)
    monkeypatch.setattr(beam_search, "require_triton", lambda device: None)
    cuda = torch.device("cuda")
    assert beam_search.resolve_beam_search_backend("auto", cuda, beam_search.MAX_BEAM["cuda"]) == "cuda"
    assert beam_search.resolve_beam_search_backend("auto", cuda, beam_search.MAX_BEAM["cuda"] + 1) == "triton"
    monkeypatch.setattr(beam_search, "has_beam_search_kernel", lambda backend, device: backend == "cuda")
    assert beam_search.resolve_beam_search_backend("auto", cuda, 300) == "cuda"  # which then names its limit
