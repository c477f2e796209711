"""The Triton kernel of code_beam_search against the C++ kernel (the same bits for float32 scores) and
exhaustive top-k: on a GPU, or on CPU tensors under TRITON_INTERPRET=1 (slow, so small tries)."""
import pytest
import torch

import gif_kernels
from tests.helpers.beam_search_cases import random_codebook

pytestmark = pytest.mark.triton
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("num_ids,vocab,length,beam,topk", [
    (50, 4, 3, 4, 2), (300, 16, 3, 8, 5), (1, 3, 2, 2, 1), (7, 4, 2, 5, 5), (97, 2, 9, 8, 3)])
def test_matches_the_cpp_kernel(num_ids, vocab, length, beam, topk):
    book, gen = random_codebook(num_ids, vocab, length, seed=num_ids + beam)
    trie = book.trie(DEVICE)
    scores = torch.randn(3, length, vocab, generator=gen).log_softmax(-1)
    # Ties too: scores on a coarse grid make equal totals common.
    scores[0] = (scores[0] * 2).round() / 2
    arrays = (trie.child_offsets.cpu(), trie.child_tokens.cpu(), trie.leaf_ids.cpu())
    expected = torch.ops.gif.code_beam_search(scores, *arrays, beam, topk)
    got = gif_kernels.code_beam_search(scores.to(DEVICE), trie, beam=beam, topk=topk, backend="triton")
    for name, e, g in zip(("ids", "total", "exact"), expected, got):
        assert torch.equal(e, g.cpu()), f"{name}: {g} != {e}"


def test_bfloat16_and_exact_research():
    book, gen = random_codebook(200, 8, 3, seed=5)
    trie = book.trie(DEVICE)
    scores = torch.randn(4, 3, 8, generator=gen).log_softmax(-1).to(DEVICE, torch.bfloat16)
    ids, total, exact = gif_kernels.code_beam_search(scores, trie, beam=2, topk=2, backend="triton", exact=True)
    ref_ids, ref_total = gif_kernels.exhaustive_code_topk(scores, trie, topk=2)
    assert exact.all()
    assert torch.equal(ids, ref_ids) and torch.equal(total, ref_total)


def test_beam_limit_is_named():
    book, gen = random_codebook(20, 4, 2, seed=6)
    trie = book.trie(DEVICE)
    scores = torch.randn(1, 2, 4, generator=gen).to(DEVICE)
    arrays = (trie.child_offsets, trie.child_tokens, trie.leaf_ids)
    with pytest.raises(ValueError, match="beam: the Triton kernel"):
        torch.ops.gif.triton_code_beam_search(scores, *arrays, gif_kernels.ops.MAX_BEAM['triton'] + 1, 1)
