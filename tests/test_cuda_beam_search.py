"""The GPU kernels of code_beam_search on CUDA tensors against the C++ CPU kernel: the same bits for
float32 scores, ties included, from small tries to V = 4096 and the widest beams. Needs a GPU."""
import pytest
import torch

import gif_kernels
from tests.helpers.beam_search_cases import random_codebook

pytestmark = pytest.mark.cuda


def gpu_backends():
    device = torch.device("cuda")
    return [b for b in ("cuda", "triton") if gif_kernels.ops.has_beam_search_kernel(b, device)]


@pytest.mark.parametrize("num_ids,vocab,length,beam,topk", [
    (1, 3, 2, 2, 1), (7, 4, 2, 5, 5), (50, 4, 3, 4, 2), (5000, 16, 4, 32, 5), (20000, 16, 6, 256, 10),
    (3000, 4096, 2, 64, 5), (2000, 2, 12, 8, 3), (100000, 256, 3, 128, 5)])
def test_matches_the_cpp_kernel(num_ids, vocab, length, beam, topk):
    book, gen = random_codebook(num_ids, vocab, length, seed=num_ids + beam)
    scores = torch.randn(33, length, vocab, generator=gen).log_softmax(-1)
    scores[:8] = (scores[:8] * 2).round() / 2  # ties
    trie = book.trie("cpu")
    expected = torch.ops.gif.code_beam_search(scores, trie.child_offsets, trie.child_tokens, trie.leaf_ids,
                                              beam, topk)
    for backend in gpu_backends():
        got = gif_kernels.code_beam_search(scores.cuda(), book.trie("cuda"), beam=beam, topk=topk,
                                           backend=backend)
        for name, e, g in zip(("ids", "total", "exact"), expected, got):
            assert torch.equal(e, g.cpu()), f"{backend} {name}"


def test_exact_research_and_beam_limits():
    book, gen = random_codebook(3000, 8, 4, seed=7)
    scores = torch.randn(16, 4, 8, generator=gen).log_softmax(-1).cuda()
    trie = book.trie("cuda")
    ref_ids, ref_total = gif_kernels.exhaustive_code_topk(scores, trie, topk=3)
    arrays = (trie.child_offsets, trie.child_tokens, trie.leaf_ids)
    for backend in gpu_backends():
        ids, total, exact = gif_kernels.code_beam_search(scores, trie, beam=3, topk=3, backend=backend,
                                                         exact=True)
        assert exact.all() and torch.equal(ids, ref_ids) and torch.equal(total, ref_total)
        op = getattr(torch.ops.gif, gif_kernels.ops.BEAM_SEARCH_OPS[backend])
        op(scores, *arrays, gif_kernels.ops.MAX_BEAM[backend], 3)
        with pytest.raises(ValueError, match="beam: the"):
            op(scores, *arrays, gif_kernels.ops.MAX_BEAM[backend] + 1, 3)
    torch.cuda.synchronize()


def test_sanitizer_cases():
    """A small case through every beam search kernel; bench/device_check.sh runs it under compute-sanitizer."""
    book, gen = random_codebook(300, 16, 3, seed=8)
    scores = torch.randn(5, 3, 16, generator=gen).log_softmax(-1).cuda()
    for backend in gpu_backends():
        gif_kernels.code_beam_search(scores, book.trie("cuda"), beam=8, topk=3, backend=backend)
    torch.cuda.synchronize()
