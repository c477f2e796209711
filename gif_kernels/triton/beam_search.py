"""code_beam_search in Triton: one program per query walks the trie level by level.

Each level scores the children of the beam's prefixes in chunks and keeps the best `beam` (and the
best pruned prefix, for the exactness bound) by sorting 64-bit keys that order by score descending,
then node (or identity) ascending: the ranking of the C++ kernel (csrc/cpu/beam_search.cpp), whose
comments give the exactness rule. Totals are summed in float32 in position order (float64 scores
too), so for float32 scores both kernels return the same bits.
"""
import torch
import triton
import triton.language as tl

from . import LAUNCH_OPTIONS

_INT64_MIN = tl.constexpr(-(2 ** 63))
_LOW_MASK = tl.constexpr(0xFFFFFFFF)


@triton.jit
def _ranking_key(score, key):
    """int64 that sorts ascending by (score, -key): score's float32 bits made order-preserving (as a
    signed int32) in the high half, 2^32 - 1 - key in the low half."""
    bits = score.to(tl.int32, bitcast=True)
    ordered = bits ^ ((bits >> 31) & 0x7FFFFFFF)
    return (ordered.to(tl.int64) << 32) + (_LOW_MASK - key)


@triton.jit
def _score_of(ranking):
    ordered = (ranking >> 32).to(tl.int32)
    return (ordered ^ ((ordered >> 31) & 0x7FFFFFFF)).to(tl.float32, bitcast=True)


@triton.jit
def _key_of(ranking):
    return _LOW_MASK - (ranking & _LOW_MASK)


@triton.jit
def _first(values, N: tl.constexpr, K: tl.constexpr):
    """values[:K] of a 1-D tensor of N elements (K divides N)."""
    rows = tl.reshape(values, (N // K, K))
    first_row = tl.arange(0, N // K)[:, None] == 0
    return tl.sum(tl.where(first_row, rows, 0), axis=0)


@triton.jit
def _merge_best(best, candidates, M: tl.constexpr):
    """The M highest of two M-element tensors, sorted descending."""
    both = tl.sort(tl.reshape(tl.join(best, candidates), (2 * M,)), descending=True)
    return _first(both, 2 * M, M)


@triton.jit
def _beam_search_kernel(scores_ptr, offsets_ptr, tokens_ptr, leaf_ids_ptr, position_max_ptr,
                        ids_ptr, totals_ptr, exact_ptr,
                        L, V, num_nodes, num_edges, num_leaves, leaf_start, beam, topk,
                        stride_q, stride_l, stride_v,
                        BEAM: tl.constexpr, CHUNK: tl.constexpr, TOPK: tl.constexpr):
    q = tl.program_id(0).to(tl.int64)
    row0 = scores_ptr + q * stride_q
    M: tl.constexpr = BEAM * CHUNK
    # Each position's best score (NaN skipped), for the bound on pruned prefixes.
    for j in range(0, L):
        best_v = tl.full((CHUNK,), float("-inf"), tl.float32)
        for v0 in range(0, V, CHUNK):
            offs = v0 + tl.arange(0, CHUNK)
            s = tl.load(row0 + j * stride_l + offs * stride_v, mask=offs < V, other=float("-inf")).to(tl.float32)
            best_v = tl.maximum(best_v, tl.where(s != s, float("-inf"), s))
        tl.store(position_max_ptr + q * L + j, tl.max(best_v, axis=0))
    tl.debug_barrier()
    slots = tl.arange(0, BEAM)
    beam_nodes = tl.where(slots == 0, 0, -1).to(tl.int64)  # the root
    beam_scores = tl.zeros((BEAM,), tl.float32)
    pruned = tl.zeros((), tl.int32)
    pruned_bound = tl.full((), float("-inf"), tl.float32)
    flat = tl.arange(0, M)
    kept = tl.full((BEAM,), _INT64_MIN, tl.int64)
    for level in range(0, L):
        row = row0 + level * stride_l
        valid_parent = (beam_nodes >= 0) & (beam_nodes < num_nodes)
        parent = tl.where(valid_parent, beam_nodes, 0)
        start = tl.load(offsets_ptr + parent, mask=valid_parent, other=0)
        end = tl.load(offsets_ptr + parent + 1, mask=valid_parent, other=0)
        best = tl.full((M,), _INT64_MIN, tl.int64)
        for c0 in range(0, V, CHUNK):
            edge = start[:, None] + c0 + tl.arange(0, CHUNK)[None, :]
            # Masks keep every read inside its array, whatever the arrays hold.
            valid = valid_parent[:, None] & (edge < end[:, None]) & (edge >= 0) & (edge < num_edges)
            token = tl.load(tokens_ptr + edge, mask=valid, other=0).to(tl.int64)
            valid &= (token >= 0) & (token < V)
            score = beam_scores[:, None] + tl.load(row + token * stride_v, mask=valid, other=0.0).to(tl.float32)
            score = tl.where(score != score, float("-inf"), score)
            if level == L - 1:
                leaf = edge + 1 - leaf_start
                valid &= (leaf >= 0) & (leaf < num_leaves)
                key = tl.load(leaf_ids_ptr + leaf, mask=valid, other=0)
            else:
                key = edge + 1
            ranking = tl.where(valid, _ranking_key(score, key), _INT64_MIN)
            best = _merge_best(best, tl.reshape(ranking, (M,)), M)
        # best is sorted: the first `beam` go on, best[beam] is the best pruned prefix.
        keep = tl.where(level == L - 1, topk, beam)
        pruned_ranking = tl.sum(tl.where(flat == keep, best, 0), axis=0)
        if (level < L - 1) & (pruned_ranking != _INT64_MIN):
            bound = _score_of(pruned_ranking)
            for j in range(level + 1, L):
                bound += tl.load(position_max_ptr + q * L + j)
            pruned = tl.full((), 1, tl.int32)
            pruned_bound = tl.maximum(pruned_bound, bound)
        kept = _first(best, M, BEAM)
        kept = tl.where(slots < keep, kept, _INT64_MIN)
        beam_nodes = tl.where(kept != _INT64_MIN, _key_of(kept), -1)
        beam_scores = _score_of(kept)
    # The last level's beam holds the best topk codes, keyed by identity.
    out = tl.arange(0, TOPK)
    ranked = _first(tl.where(slots < topk, kept, _INT64_MIN), BEAM, TOPK)
    found = ranked != _INT64_MIN
    tl.store(ids_ptr + q * topk + out, tl.where(found, _key_of(ranked), -1), mask=out < topk)
    tl.store(totals_ptr + q * topk + out, tl.where(found, _score_of(ranked), float("-inf")), mask=out < topk)
    count = tl.sum(found.to(tl.int32), axis=0)
    kth_score = tl.where(count > 0, tl.sum(tl.where(out == count - 1, _score_of(ranked), 0.0), axis=0), float("-inf"))
    tl.store(exact_ptr + q, (pruned == 0) | ((count > 0) & (kth_score > pruned_bound)))


# Candidates sorted at once per chunk: BEAM slots x CHUNK children (a sort of twice that many keys).
_CANDIDATES_PER_CHUNK = 2048


def block_sizes(V: int, beam: int, topk: int):
    """The kernel's BEAM, CHUNK and TOPK: beam slots (with room for the best pruned prefix), children per
    slot scored at once, and result slots, as powers of two."""
    BEAM = triton.next_power_of_2(beam + 1)
    return dict(BEAM=BEAM, CHUNK=min(triton.next_power_of_2(V), max(1, _CANDIDATES_PER_CHUNK // BEAM)),
                TOPK=triton.next_power_of_2(topk))


def code_beam_search(scores, child_offsets, child_tokens, leaf_ids, beam: int, topk: int):
    """Returns (ids (Q, topk) int64, total (Q, topk) float32, exact (Q,) bool); the arrays must form a
    trie of depth L (CodeTrie checks that when it is built; reads stay inside the arrays regardless)."""
    Q, L, V = scores.shape
    M = child_offsets.numel() - 1  # nodes
    leaf_start = M - leaf_ids.numel()
    ids = torch.empty((Q, topk), dtype=torch.int64, device=scores.device)
    totals = torch.empty((Q, topk), dtype=torch.float32, device=scores.device)
    exact = torch.empty((Q,), dtype=torch.bool, device=scores.device)
    position_max = torch.empty((Q, L), dtype=torch.float32, device=scores.device)
    if Q:
        _beam_search_kernel[(Q,)](scores, child_offsets, child_tokens, leaf_ids, position_max, ids, totals, exact,
                                  L, V, M, child_tokens.numel(), leaf_ids.numel(), leaf_start, beam, topk,
                                  *scores.stride(), **block_sizes(V, beam, topk), **LAUNCH_OPTIONS)
    return ids, totals, exact
