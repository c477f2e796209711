"""Identification throughput of the code head: beam search over the trie of valid codes versus
brute-force identification, at the same identity count N, in one run.

For each trie (N identities with random unique codes of length L over V tokens) it times
  brute force        features (Q, D) @ identity vectors (N, D).T, then top-k: what a user runs
                     without codes. Vectors are streamed in blocks of at most 1M rows; above 1M
                     the same block is streamed again, so N = 10M costs 10M rows of work without
                     holding 20 GB of vectors.
  exhaustive         gif_kernels.exhaustive_code_topk: all N codes scored from the head's scores
  beam <w> <backend> gif_kernels.code_beam_search for each beam width and backend of the device
Code-head rows include the head itself (features @ head weight (L*V, D), log_softmax). Recall is
measured against exhaustive scoring of the same scores: recall@1 = top-1 ids equal, recall@5 =
share of the exhaustive top-5 found in the top-5. "certified" is the share of queries flagged exact.
Scores mimic a trained head: each query is drawn around one identity, whose token at each position
gets a logit margin of N(3, 2) over unit Gaussian noise: most queries are confident, some
are not (a margin below 0 at one position or more).

    python bench/decode.py                       # N = 1M (V 16, L 5) and 10M (V 16, L 6; V 256, L 3)
    python bench/decode.py --tries 1Mx16x5 --queries 512 --device cuda
"""
import argparse
import platform

import torch

import gif_kernels
from gif_kernels import CodeBook, code_beam_search, exhaustive_code_topk
from gif_kernels.cli import ArgumentParser
from harness import brute_force_topk, elapsed_ms, parse_count, times_ms

BRUTE_FORCE_BLOCK = 1 << 20  # identity vectors held at once by the brute-force baseline
DEFAULT_TRIES = ("1Mx16x5", "10Mx16x6", "10Mx256x3")
MARGIN_MEAN, MARGIN_STD = 3.0, 2.0  # logit margin of the query's identity token, over unit noise


def parse_trie(text):
    """NxVxL with N like 1M or 250K: identities, vocabulary, code length."""
    try:
        count, vocab, length = text.split("x")
        spec = parse_count(count), int(vocab), int(length)
    except (ValueError, argparse.ArgumentTypeError):
        raise argparse.ArgumentTypeError(f"expected NxVxL like 1Mx16x5, got {text!r}") from None
    if spec[1] < 2 or spec[2] < 1 or spec[1] ** spec[2] < spec[0]:
        raise argparse.ArgumentTypeError(f"{text!r} needs V >= 2, L >= 1, V**L >= N")
    return spec


def random_unique_codes(num_ids, vocab, length, gen):
    keys = torch.randperm(vocab ** length, generator=gen)[:num_ids]
    return torch.stack([(keys // vocab ** (length - 1 - j)) % vocab for j in range(length)], dim=1)


def peaked_logits(codes, num_queries, vocab, gen):
    """Head logits (Q, L, V): unit noise plus a margin on each position's token of a random identity."""
    targets = torch.randint(0, codes.shape[0], (num_queries,), generator=gen)
    logits = torch.randn(num_queries, codes.shape[1], vocab, generator=gen)
    margin = MARGIN_MEAN + MARGIN_STD * torch.randn(num_queries, codes.shape[1], 1, generator=gen)
    return logits.scatter_add(2, codes[targets].unsqueeze(2), margin)


def best_seconds(fn, device, repeats):
    """Fastest of `repeats` timed calls after one warm-up call."""
    fn()
    return min(times_ms(fn, device, repeats)) / 1e3


def recall(ids, reference_ids, k):
    """Share of the reference top-k found in the top-k (k = 1: top-1 ids equal)."""
    hits = (ids[:, :k, None] == reference_ids[:, None, :k]) & (reference_ids[:, None, :k] >= 0)
    return hits.any(1).float().sum(1).div(k).mean().item()


def beam_search_backends(device):
    """The device's C++ kernel and Triton, where each runs (Triton on CPU tensors only in its interpreter)."""
    triton_runs = device.type == "cuda" or gif_kernels.triton.interpreted()
    return [b for b in (device.type, "triton")
            if (b != "triton" or triton_runs) and gif_kernels.ops.has_beam_search_kernel(b, device)]


def main():
    parser = ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="cpu", help="cpu or cuda (times every backend of the device)")
    parser.add_argument("--tries", type=parse_trie, nargs="+", default=[parse_trie(t) for t in DEFAULT_TRIES],
                        help="NxVxL, e.g. 1Mx16x5")
    parser.add_argument("--beams", type=int, nargs="+", default=[8, 16, 32, 64])
    parser.add_argument("--topk", type=int, default=5)
    parser.add_argument("--queries", type=int, default=256, help="queries per timed batch")
    parser.add_argument("--dim", type=int, default=512, help="feature size D")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if min(args.beams) < args.topk:
        parser.error(f"--beams: expected each >= --topk = {args.topk}, got {min(args.beams)}")
    device = torch.device(args.device)
    gen = torch.Generator().manual_seed(args.seed)
    print(f"# {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, device "
          f"{device}, torch {torch.__version__}; Q = {args.queries}, D = {args.dim}, top-{args.topk}\n")
    print("| N | V | L | method | queries/s | vs brute force | recall@1 | recall@5 | certified |")
    print("|---|---|---|---|---|---|---|---|---|")
    features = torch.nn.functional.normalize(torch.randn(args.queries, args.dim, generator=gen), dim=1)
    features = features.to(device)
    brute_force_qps = {}
    for num_ids, vocab, length in args.tries:
        if num_ids not in brute_force_qps:
            vectors = torch.randn(min(num_ids, BRUTE_FORCE_BLOCK), args.dim, generator=gen).to(device)
            seconds = best_seconds(lambda: brute_force_topk(features, vectors, args.topk, num_ids, BRUTE_FORCE_BLOCK),
                                   device, args.repeats)
            brute_force_qps[num_ids] = args.queries / seconds
            del vectors
        baseline = brute_force_qps[num_ids]
        print(f"| {num_ids:,} | {vocab} | {length} | brute force | {baseline:,.0f} | 1.0x | | | |", flush=True)

        codes = random_unique_codes(num_ids, vocab, length, gen)
        trie = CodeBook(codes, vocab).trie(device)
        head = torch.randn(length * vocab, args.dim, generator=gen).to(device)
        scores = peaked_logits(codes, args.queries, vocab, gen).log_softmax(-1).to(device)

        def head_scores():
            return (features @ head.T).view(-1, length, vocab).log_softmax(-1)

        head_seconds = best_seconds(head_scores, device, args.repeats)
        exhaustive = []  # slow at 10M: timed once, without a warm-up
        exhaustive_ms = elapsed_ms(lambda: exhaustive.append(exhaustive_code_topk(scores, trie, args.topk)[0]),
                                   device)
        reference_ids = exhaustive[0]
        qps = args.queries / (head_seconds + exhaustive_ms / 1e3)
        print(f"| {num_ids:,} | {vocab} | {length} | exhaustive | {qps:,.0f} | {qps / baseline:,.1f}x | "
              f"1.000 | 1.000 | 1.000 |", flush=True)
        for beam in args.beams:
            for backend in beam_search_backends(device):
                def search(beam=beam, backend=backend):
                    return code_beam_search(scores, trie, beam=beam, topk=args.topk, backend=backend)

                qps = args.queries / (head_seconds + best_seconds(search, device, args.repeats))
                ids, _, certified = search()
                print(f"| {num_ids:,} | {vocab} | {length} | beam {beam} {backend} | {qps:,.0f} | "
                      f"{qps / baseline:,.1f}x | {recall(ids, reference_ids, 1):.3f} | "
                      f"{recall(ids, reference_ids, args.topk):.3f} | {certified.float().mean().item():.3f} |",
                      flush=True)
        del codes, trie, scores


if __name__ == "__main__":
    main()
