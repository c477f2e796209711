"""Identification by code: the best valid codes of each query under per-position scores.

A code's score is the sum of scores[q, j, code_j] over its L positions (log-probabilities from the
code head). code_beam_search walks the trie of valid codes (torch.ops.gif.code_beam_search);
exhaustive_code_topk scores all N codes, the reference and a fast path for small N. Both rank by
score, ties by lower identity, and sum positions in order 0..L-1 in float32 (float64 for float64
scores), so on the same inputs they agree bit for bit wherever the beam search is exact.
"""
import torch

from . import ops
from .codebook import CodeTrie

# Scores gathered per chunk of codes in exhaustive_code_topk: queries x codes (64 MB in float32).
EXHAUSTIVE_CHUNK_ELEMENTS = 1 << 24


def _check_scores(scores, length, min_vocab):
    if not isinstance(scores, torch.Tensor) or scores.dim() != 3:
        raise ValueError(f"scores: expected a tensor of shape (Q, L, V), got "
                         f"{tuple(scores.shape) if isinstance(scores, torch.Tensor) else type(scores)}")
    if scores.dtype not in ops.FLOAT_DTYPES:
        raise TypeError(f"scores: expected one of {ops.FLOAT_DTYPES}, got {scores.dtype}")
    if scores.shape[1] != length:
        raise ValueError(f"scores: expected L = {length} positions (the codes' length), got shape "
                         f"{tuple(scores.shape)}")
    if scores.shape[2] < min_vocab:
        raise ValueError(f"scores: expected V >= {min_vocab} (the codes' vocabulary), got shape "
                         f"{tuple(scores.shape)}")


def _best_k(totals, ids, k):
    """The k best columns of each row by total descending, then id ascending, in that order.

    ids (Q, n) must ascend along each row. topk finds the k-th total; of the columns tied with it,
    the lowest ids fill the places left."""
    k = min(k, totals.shape[1])
    kth = totals.topk(k, dim=1).values[:, -1:]
    above, tied = totals > kth, totals == kth
    keep = above | (tied & (tied.cumsum(1) <= k - above.sum(1, keepdim=True)))
    kept_totals, kept_ids = totals[keep].view(-1, k), ids[keep].view(-1, k)
    order = kept_totals.sort(dim=1, descending=True, stable=True).indices
    return kept_totals.gather(1, order), kept_ids.gather(1, order)


def exhaustive_code_topk(scores, codes, topk=5):
    """The best `topk` of all N codes for each query, scoring every code in bounded-memory chunks.

    scores: (Q, L, V) float; codes: a CodeTrie, or the code table (N, L) integer with row i the code
    of identity i. Returns (ids (Q, topk) int64, total (Q, topk)) best first, ties by lower id;
    total is float64 for float64 scores, else float32 (summed in that dtype). NaN totals rank as
    -inf. Fewer than topk codes: the rest is id -1, total -inf."""
    if isinstance(codes, CodeTrie):
        codes = codes.codes()
    if not isinstance(codes, torch.Tensor) or codes.dim() != 2 or codes.shape[0] < 1:
        raise ValueError(f"codes: expected a CodeTrie or a code table (N, L) with N >= 1, got "
                         f"{tuple(codes.shape) if isinstance(codes, torch.Tensor) else type(codes)}")
    if codes.dtype.is_floating_point or codes.dtype.is_complex or codes.dtype == torch.bool:
        raise TypeError(f"codes: expected an integer dtype, got {codes.dtype}")
    _check_scores(scores, codes.shape[1], 1)  # tokens are range-checked below
    if isinstance(topk, bool) or not isinstance(topk, int) or topk < 1:
        raise ValueError(f"topk: expected an integer >= 1, got {topk!r}")
    num_queries, length, num_tokens = scores.shape
    codes = codes.to(scores.device, torch.int64)
    if codes.numel() and (codes.min() < 0 or codes.max() >= num_tokens):
        raise ValueError(f"codes: expected tokens in [0, V) = [0, {num_tokens}) of scores")
    acc_dtype = torch.float64 if scores.dtype == torch.float64 else torch.float32
    scores = scores.to(acc_dtype)
    chunk = max(1, EXHAUSTIVE_CHUNK_ELEMENTS // max(num_queries, 1))
    best_totals = scores.new_empty((num_queries, 0))
    best_ids = torch.empty((num_queries, 0), dtype=torch.int64, device=scores.device)
    for start in range(0, codes.shape[0], chunk):
        block = codes[start:start + chunk]
        totals = scores[:, 0].index_select(1, block[:, 0])
        for level in range(1, length):  # positions added in order, as the beam search adds them
            totals += scores[:, level].index_select(1, block[:, level])
        totals = totals.masked_fill(totals.isnan(), float("-inf"))
        ids = torch.arange(start, start + block.shape[0], device=scores.device).expand(num_queries, -1)
        by_id = best_ids.argsort(dim=1)  # earlier chunks' ids, all below this chunk's
        best_totals, best_ids = _best_k(torch.cat([best_totals.gather(1, by_id), totals], 1),
                                        torch.cat([best_ids.gather(1, by_id), ids], 1), topk)
    missing = topk - best_ids.shape[1]
    return (torch.nn.functional.pad(best_ids, (0, missing), value=-1),
            torch.nn.functional.pad(best_totals, (0, missing), value=float("-inf")))


def code_beam_search(scores, trie, beam=32, topk=5, backend="auto", exact=False):
    """The best `topk` valid codes of each query, found by beam search of width `beam` over the trie.

    scores: (Q, L, V) per-position log-probabilities (float32, bfloat16, float16 or float64);
    trie: the CodeTrie of valid codes (CodeBook.trie(device)) on the scores' device.
    backend: "auto", "cpu", "cuda", "triton" or "reference" (exhaustive scoring).
    exact: re-search the queries whose answer is not certified exact with a doubled beam until it
    is (a beam of N codes is exhaustive; past a GPU kernel's widest beam, ops.MAX_BEAM, the rest is
    scored exhaustively); this syncs with the host once per doubling.
    Returns (ids (Q, topk) int64, total (Q, topk) float32, exact (Q,) bool): best first, ties by
    lower id; id -1 and total -inf past the last code; exact[q] is True only when the answer is
    provably the exhaustive top-k (see torch.ops.gif.code_beam_search)."""
    if not isinstance(trie, CodeTrie):
        raise TypeError(f"trie: expected a CodeTrie (CodeBook.trie(device)), got {type(trie)}")
    _check_scores(scores, trie.length, trie.vocab)
    if scores.device != trie.device:
        raise ValueError(f"trie: expected it on the scores' device {scores.device}, got {trie.device}")
    for name, value in (("beam", beam), ("topk", topk)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}: expected an integer >= 1, got {value!r}")
    if beam < topk:
        raise ValueError(f"beam: expected >= topk = {topk}, got {beam}")
    trie.check_unchanged()
    backend = ops.resolve_beam_search_backend(backend, scores.device, beam)
    if backend == "reference":
        ids, total = exhaustive_code_topk(scores, trie, topk)
        return ids, total.float(), torch.ones(scores.shape[0], dtype=torch.bool, device=scores.device)
    search = getattr(torch.ops.gif, ops.BEAM_SEARCH_OPS[backend])
    arrays = (trie.child_offsets, trie.child_tokens, trie.leaf_ids)
    ids, total, certified = search(scores, *arrays, beam, topk)
    num_ids = trie.leaf_ids.numel()
    max_beam = ops.MAX_BEAM.get(backend, num_ids)
    while exact and beam < num_ids:
        pending = (~certified).nonzero().squeeze(1)
        if pending.numel() == 0:
            break
        beam = min(2 * beam, num_ids)
        if beam > max_beam:  # past the kernel's widest beam: score every code of what is left
            ids[pending], pending_total = exhaustive_code_topk(scores[pending], trie, topk)
            total[pending], certified[pending] = pending_total.float(), True
            break
        ids[pending], total[pending], certified[pending] = search(scores[pending], *arrays, beam, topk)
    return ids, total, certified
