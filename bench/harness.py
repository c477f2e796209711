"""What the benchmark scripts share: timing on either device, counts and lists on their command lines,
the FLOP model of a head, free memory and out-of-memory errors, and how figures are printed. The scripts import it from their
own folder (python puts a script's folder first on sys.path)."""
import argparse
import gc
import math
import os
import re
import statistics
import time
from decimal import Decimal, DecimalException

import torch
import torch.nn.functional as F

MAX_COUNT = 10**12  # counts past this are a typo, and would make the analytic figures meaningless
COUNT_SUFFIXES = {"": 1, "K": 10**3, "M": 10**6, "G": 10**9}
COUNT = re.compile(r"(\d+\.?\d*|\.\d+)(e[+-]?\d+)?([kmg]?)", re.IGNORECASE)


# ----------------------------------------------------------------------------- timing

def elapsed_ms(fn, device, calls=1):
    """Wall time in ms of `calls` calls of fn back to back: CUDA events on a GPU (so the host does not
    wait between calls), perf_counter on the CPU."""
    if torch.device(device).type != "cuda":
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        return (time.perf_counter() - start) * 1e3
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(calls):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end)


def times_ms(fn, device, repeats, max_seconds=math.inf):
    """The times in ms of up to `repeats` calls of fn, each timed alone; fewer once they have taken
    max_seconds. Warming up is the caller's."""
    times = []
    while len(times) < repeats and sum(times) < max_seconds * 1e3:
        times.append(elapsed_ms(fn, device))
    return times


def median_ms(fn, device, repeats):
    """Median time of fn() in ms after three warm-up calls."""
    for _ in range(3):
        fn()
    return statistics.median(times_ms(fn, device, repeats))


# ----------------------------------------------------------------------------- the baseline head

def plain_code_head(x, weight, codes, scale=64.0, m2=0.0, m3=0.0):
    """The code head as a user writes it in plain PyTorch, the baseline the fused op is measured against:
    normalize, einsum, the margin on the one-hot target (ArcFace through torch.where on cos(acos(c) + m2)),
    F.cross_entropy over every position, summed and divided by the batch (fused_code_ce's "mean"). Logits
    in float32, as insightface computes them."""
    num_tokens = weight.shape[1]
    cos = torch.einsum("bd,lvd->blv", F.normalize(x, dim=-1), F.normalize(weight, dim=-1)).float()
    target = F.one_hot(codes, num_tokens).bool()
    if m2 > 0:
        cos = torch.where(target, torch.cos(torch.acos(cos.clamp(-1 + 1e-7, 1 - 1e-7)) + m2), cos)
    logits = scale * (cos - m3 * target)
    return F.cross_entropy(logits.flatten(0, 1), codes.flatten(), reduction="sum") / x.shape[0]


# ----------------------------------------------------------------------------- identification without codes

def brute_force_topk(features, vectors, topk, num_ids=None, block=1 << 16):
    """Ids (Q, topk) of the top-k of features @ vectors.T, best first: what a user runs without an
    index. Rows are scored `block` at a time; there are num_ids of them (default: all of vectors),
    row r being vectors[r % len(vectors)], so that N rows can be timed without holding them all."""
    num_ids = vectors.shape[0] if num_ids is None else num_ids
    best_scores = features.new_empty((features.shape[0], 0))
    best_ids = torch.empty((features.shape[0], 0), dtype=torch.int64, device=features.device)
    start = 0
    while start < num_ids:
        first = start % vectors.shape[0]
        rows = min(block, num_ids - start, vectors.shape[0] - first)
        block_scores, block_ids = (features @ vectors[first:first + rows].T).topk(min(topk, rows), dim=1)
        merged = torch.cat([best_scores, block_scores], 1)
        best_scores, pick = merged.topk(min(topk, merged.shape[1]), dim=1)
        best_ids = torch.cat([best_ids, block_ids + start], 1).gather(1, pick)
        start += rows
    return best_ids


def has_matplotlib():
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


# ----------------------------------------------------------------------------- command lines

def parse_count(text):
    """'10M', '1.5M', '100K', '1e7', '10000000', '1G' -> a positive integer."""
    match = COUNT.fullmatch(text.strip())
    if not match:
        raise argparse.ArgumentTypeError(
            f"expected a count like 10M, 1.5M, 100K, 1e7 or 10000000, got {text!r}")
    too_large = argparse.ArgumentTypeError(f"expected at most {MAX_COUNT:.0e}, got {text!r}")
    try:
        value = Decimal(match[1] + (match[2] or "")) * COUNT_SUFFIXES[match[3].upper()]
    except DecimalException:  # an exponent past what Decimal holds
        raise too_large from None
    if value > MAX_COUNT:
        raise too_large
    if value < 1 or value != value.to_integral_value():
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}")
    return int(value)


def comma_list(parse_item):
    """An argparse type that applies parse_item to each item of a comma-separated list."""
    def parse(text):
        return [parse_item(item) for item in text.split(",")]
    return parse


def one_of(choices):
    """An argparse type that accepts one of `choices` (a comma_list of them takes several)."""
    def parse(text):
        if text not in choices:
            raise argparse.ArgumentTypeError(f"expected some of {', '.join(choices)}, got {text!r}")
        return text
    return parse


def parse_rate(text):
    try:
        rate = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {text!r}") from None
    if not 0.0 < rate <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a sample rate in (0, 1], got {text!r}")
    return rate


def parse_shape(text):
    """A head shape BxLxVxD of positive integers."""
    try:
        shape = tuple(int(part) for part in text.lower().split("x"))
    except ValueError:
        shape = ()
    if len(shape) != 4 or min(shape) < 1:
        raise argparse.ArgumentTypeError(f"expected BxLxVxD of whole numbers >= 1 like 512x6x16x512, got {text!r}")
    return shape


def positive_int(text):
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}")
    return value


# ----------------------------------------------------------------------------- the FLOP model of a head

def head_flops(batch, dim, classes):
    """Forward + backward FLOPs of a C-class head: logits, grad of the features, grad of the weight.
    Normalization, margin and softmax are O(B*C + C*D) elementwise terms and are not counted."""
    return 3 * 2 * batch * dim * classes


def partial_fc_class_count(rate, num_ids, batch):
    """The most classes Partial FC scores per step: rate * N, or the batch's positives (at most B)."""
    return max(int(rate * num_ids), min(batch, num_ids))


# ----------------------------------------------------------------------------- memory

def free_bytes(device, budget_bytes):
    """Memory a step may use now: free GPU memory, or on the CPU (Linux /proc) the available RAM
    capped by what is left of the budget after this process's resident memory."""
    if device == "cuda":
        return torch.cuda.mem_get_info()[0]
    with open("/proc/meminfo") as f:
        available = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    with open("/proc/self/statm") as f:
        resident = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    return max(0, min(available, budget_bytes - resident))


def is_out_of_memory(error):
    text = str(error).lower()
    return isinstance(error, torch.cuda.OutOfMemoryError) or "out of memory" in text or "alloc" in text


def release_memory(device):
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------- output

def format_count(value):
    """10000000 -> '10M', 1500000 -> '1.5M', 512 -> '512'."""
    for suffix, unit in (("G", 10**9), ("M", 10**6), ("K", 10**3)):
        if value >= unit:
            return f"{value / unit:.4g}{suffix}"
    return str(value)


def format_si(value, unit):
    """Three significant digits with a decimal prefix: format_si(1.57e13, 'FLOP') -> '15.7 TFLOP'."""
    if value is None:
        return "-"
    for prefix, scale in (("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(value) >= scale:
            return f"{value / scale:.3g} {prefix}{unit}"
    return f"{value:.3g} {unit}"
