"""Identity tokenizer: seconds and peak memory of tokenize() on N x D clustered vectors, the prefix
spread of its codes against random codes, and (where gif_kernels.codebook exists) the cost of
CodeBook + trie over 10M codes.

    python bench/tokenizer.py                              # 1M x 64, vocab 16, kmeans, CPU
    python bench/tokenizer.py --ids 100000 --method random --json out.json
"""
import json
import os
import platform
import resource
import time

import torch

from gif_kernels.cli import ArgumentParser
from gif_kernels.tokenize import DEFAULT_METHOD, METHODS, format_summary, summary, tokenize


def clustered_vectors(ids, dim, clusters, seed):
    """ids x dim float32: Gaussian blobs of unit noise around `clusters` centers of scale 3,
    filled in slices so that making them never holds more than the result plus a slice."""
    generator = torch.Generator().manual_seed(seed)
    centers = 3 * torch.randn(clusters, dim, generator=generator)
    vectors = torch.empty(ids, dim)
    for start in range(0, ids, 1 << 16):
        stop = min(ids, start + (1 << 16))
        members = torch.randint(0, clusters, (stop - start,), generator=generator)
        vectors[start:stop] = centers[members] + torch.randn(stop - start, dim, generator=generator)
    return vectors


def rss_bytes():
    """Resident memory now (Linux /proc), and the peak so far (getrusage reports KiB on Linux)."""
    with open("/proc/self/statm") as f:
        now = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    return now, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def bench_tokenize(args):
    vectors = clustered_vectors(args.ids, args.dim, args.clusters, args.seed).to(args.device)
    rss_before, _ = rss_bytes()
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    start = time.perf_counter()
    codes = tokenize(vectors, args.vocab, method=args.method, seed=args.seed, progress=args.progress)
    seconds = time.perf_counter() - start
    _, rss_peak = rss_bytes()
    result = {"ids": args.ids, "dim": args.dim, "vocab": args.vocab, "method": args.method,
              "device": args.device, "seconds": seconds,
              "rss_before_mib": rss_before / 2**20, "rss_peak_mib": rss_peak / 2**20,
              "extra_peak_mib": (rss_peak - rss_before) / 2**20}
    if args.device.startswith("cuda"):
        result["cuda_extra_peak_mib"] = (torch.cuda.max_memory_allocated() - base) / 2**20
    result["summary"] = summary(vectors, codes, args.vocab, seed=args.seed)
    return result


def bench_codebook(ids, vocab, length):
    """CodeBook validation + trie build over `ids` random codes; trie bytes per identity."""
    from gif_kernels.codebook import CodeBook
    codes = tokenize(None, vocab, length, "random", num_ids=ids)
    start = time.perf_counter()
    book = CodeBook(codes, vocab)
    trie = book.trie("cpu")
    seconds = time.perf_counter() - start
    trie_bytes = sum(t.nbytes for t in vars(trie).values() if isinstance(t, torch.Tensor))
    return {"ids": ids, "vocab": vocab, "length": length, "seconds": seconds,
            "trie_bytes_per_id": trie_bytes / ids}


def main():
    parser = ArgumentParser(description=__doc__)
    parser.add_argument("--ids", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--vocab", type=int, default=16)
    parser.add_argument("--method", choices=METHODS, default=DEFAULT_METHOD)
    parser.add_argument("--clusters", type=int, default=1000, help="Gaussian blobs in the synthetic vectors")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--codebook-ids", type=int, default=10_000_000, help="0 skips the CodeBook timing")
    parser.add_argument("--progress", action="store_true")
    parser.add_argument("--json", help="also write the figures here")
    args = parser.parse_args()

    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads, device {args.device}")
    result = {"tokenize": bench_tokenize(args)}
    t = result["tokenize"]
    print(f"tokenize {args.ids} x {args.dim}, vocab {args.vocab}, {args.method}: {t['seconds']:.1f} s, "
          f"peak RSS {t['rss_peak_mib']:.0f} MiB ({t['extra_peak_mib']:.0f} MiB above the "
          f"{t['rss_before_mib']:.0f} MiB before)"
          + (f", CUDA peak {t['cuda_extra_peak_mib']:.0f} MiB" if "cuda_extra_peak_mib" in t else ""))
    print(format_summary(t["summary"]))

    if args.codebook_ids:
        try:
            import gif_kernels.codebook  # noqa: F401
        except ImportError:
            print("CodeBook: gif_kernels.codebook is not there yet, skipped")
        else:
            c = result["codebook"] = bench_codebook(args.codebook_ids, 16, 6)
            print(f"CodeBook + trie('cpu') over {c['ids']} random codes (vocab 16, L 6): {c['seconds']:.1f} s, "
                  f"trie {c['trie_bytes_per_id']:.1f} bytes per identity")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
