"""The tokenizer's command line: identity vectors (.npy) in, a CodeBook file out, and a summary of
the codes' quality against random ones.

    python -m gif_kernels.tokenize --vectors vecs.npy --vocab 16 --out codes.safetensors
"""
import os
import time

import numpy as np
import torch

from ..cli import ArgumentParser, one_line_errors
from ..codebook import CodeBook
from . import DEFAULT_METHOD, METHODS, format_summary, spread, summary, tokenize


def load_vectors(path: str, device) -> torch.Tensor:
    """The (N, D) float identity vectors of a .npy file, as the CLI's --vectors."""
    try:
        array = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise ValueError(f"--vectors: no file {path}") from None
    except (OSError, ValueError) as error:
        raise ValueError(f"--vectors: {path} is not a readable .npy array: {error}") from None
    if array.ndim != 2 or not np.issubdtype(array.dtype, np.floating):
        raise ValueError(f"--vectors: expected a float (N, D) array in {path}, got {array.dtype} {array.shape}")
    return torch.from_numpy(np.ascontiguousarray(array)).to(device)


def main(argv=None):
    parser = ArgumentParser(prog="python -m gif_kernels.tokenize",
                            description="Give each identity a unique code of L tokens over vocab V.")
    parser.add_argument("--vectors", required=True, help=".npy file of (N, D) float identity vectors")
    parser.add_argument("--vocab", type=int, required=True, help="tokens per position, V >= 2")
    parser.add_argument("--length", type=int, help="tokens per code (default: smallest L with V**L >= N)")
    parser.add_argument("--method", choices=METHODS, default=DEFAULT_METHOD, help="how codes are assigned")
    parser.add_argument("--spread-steps", type=int, default=0, help="steps of spread() before tokenizing")
    parser.add_argument("--seed", type=int, default=0, help="random seed")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--progress", action="store_true", help="progress bars")
    parser.add_argument("--out", required=True, help="output .safetensors (CodeBook)")
    args = parser.parse_args(argv)

    with one_line_errors():
        if args.device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError(f"--device: {args.device} is not available here")
        folder = os.path.dirname(os.path.abspath(args.out))
        if not os.path.isdir(folder):
            raise ValueError(f"--out: folder {folder} does not exist")
        vectors = load_vectors(args.vectors, args.device)
        if args.spread_steps:
            start = time.perf_counter()
            vectors = spread(vectors, args.spread_steps, seed=args.seed, progress=args.progress)
            print(f"spread: {args.spread_steps} steps, {time.perf_counter() - start:.1f} s")
        start = time.perf_counter()
        codes = tokenize(vectors, args.vocab, args.length, args.method, seed=args.seed, progress=args.progress)
        print(f"tokenize: method {args.method}, {time.perf_counter() - start:.1f} s")
        CodeBook(codes, args.vocab).save(args.out)
    print(f"saved {args.out}")
    print(format_summary(summary(vectors, codes, args.vocab, seed=args.seed)))


if __name__ == "__main__":
    main()
