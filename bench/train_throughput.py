"""Training throughput of a face-recognition model with each head, side by side in one run.

A step is what training does per batch: backbone forward, head loss, backward and an SGD step
(momentum 0.9, weight decay 5e-4, as insightface trains), on one fixed random batch of images and
fixed random labels held on the device, so that compute is measured, not data loading. bf16
autocast on CUDA, float32 on the CPU. Rows:
  backbone     the backbone alone, a trivial loss on its embeddings: the ceiling for every head
  gif          gif_kernels.CodeHead over random codes, V = --vocab,
               L the smallest with V^L >= N
  full         FullSoftmaxHead: an (N, D) weight, softmax over all N identities
  partial_fc   PartialFCHead: the same weight, softmax over --sample-rate * N sampled identities
A row runs only where its estimated memory fits what is free (the dense heads' weight, gradient,
momentum and logits; the code head's codebook, built on the host and copied to the device); the
others, and rows that still run out of memory, say what they need. step_ms is the total time of
the timed steps over their number (CUDA events on a GPU); images/s is batch / step time;
ratio_vs_backbone divides it by the backbone row's.

Performance goal (a target, not checked here): on an H100 or H200 with IResNet-50, 112x112 images,
bf16 and batch 256, the code head at 1M and 10M identities keeps >= 95% of the backbone-alone
images/s.

    python bench/train_throughput.py
    python bench/train_throughput.py --backbone iresnet100 --ids 1M,10M,100M --json out.json
"""
import datetime
import json
import math
import platform
import sys

import torch

import gif_kernels
from gif_kernels.cli import ArgumentParser
from gif_kernels.head import CodeHead
from gif_kernels.tokenize import default_length, tokenize
from gif_kernels.train.backbones import BACKBONES, build_backbone
from gif_kernels.train.heads import FullSoftmaxHead, PartialFCHead
from harness import (comma_list, elapsed_ms, format_count, format_si, free_bytes, is_out_of_memory, parse_count,
                     parse_rate, positive_int, release_memory)

HEADS = ("gif", "full", "partial_fc")
FLOAT32 = 4
INT64 = 8


def parse_args(argv=None):
    parser = ArgumentParser(description=__doc__)
    parser.add_argument("--backbone", choices=BACKBONES, default="iresnet50")
    parser.add_argument("--ids", type=comma_list(parse_count), default=[10**6, 10**7],
                        help="identity counts, e.g. 1M,10M (also 1e7, 10000000)")
    parser.add_argument("--vocab", type=positive_int, default=16, help="code vocabulary V (>= 2)")
    parser.add_argument("--sample-rate", type=parse_rate, default=0.1, help="Partial FC's, in (0, 1]")
    parser.add_argument("--batch", type=positive_int, default=256)
    parser.add_argument("--image-size", type=positive_int, default=112)
    parser.add_argument("--embedding-dim", type=positive_int, default=512)
    parser.add_argument("--steps", type=positive_int, default=20, help="timed steps per row")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps before them")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)
    args.ids = sorted(set(args.ids))
    if args.vocab < 2:
        parser.error(f"argument --vocab: expected at least 2, got {args.vocab}")
    if args.warmup < 0:
        parser.error(f"argument --warmup: expected at least 0, got {args.warmup}")
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("argument --device: cuda is not available here")
    return args


# ----------------------------------------------------------------------------- memory estimates

def dense_head_bytes(num_ids, classes, args):
    """Device memory of a full softmax or Partial FC step beyond the backbone's: five (N, D) float32
    tensors (weight, gradient, momentum, the optimizer's weight-decayed gradient, Partial FC's dense
    gradient of its gather), four (C, D) copies of the scored rows (cast, normalized, their
    gradients), four float32 (B, C) logits and Partial FC's two per-identity sampling buffers."""
    weight = num_ids * args.embedding_dim * FLOAT32
    rows = classes * args.embedding_dim * FLOAT32
    return 5 * weight + 4 * rows + 4 * args.batch * classes * FLOAT32 + 2 * num_ids * FLOAT32


def codebook_host_bytes(num_ids, length):
    """Host memory while the codebook is built: codes, their sorted copy and sort keys, the trie
    (about 160 bytes per identity measured at L = 5 and 6)."""
    return num_ids * (4 * length + 8) * INT64


def code_head_bytes(num_ids, length, args):
    """Device memory of a code head step beyond the backbone's: the codebook's codes (L int64 per
    identity) and trie (about 3) copied to a GPU (the CPU uses the host's), the (L, V, D) weight's
    state and the (B, L, V) logits."""
    codebook = num_ids * (length + 3) * INT64 if args.device == "cuda" else 0
    classes = length * args.vocab
    return codebook + 5 * classes * args.embedding_dim * FLOAT32 + 4 * args.batch * classes * FLOAT32


def shortfall(needs, device):
    """The skip reason for the first memory in needs ({"cpu" or "cuda": bytes}) short of what is
    free, or None when all fit."""
    for where, needed in needs.items():
        free = free_bytes(where, math.inf)
        if needed > free:
            host = " on the host" if where != device else ""
            return f"skipped: needs {format_si(needed, 'B')}, {format_si(free, 'B')} free{host}"
    return None


# ----------------------------------------------------------------------------- measuring

def measure(backbone, head, images, labels, args):
    """{step_ms, images_per_s, peak_cuda_bytes} of training backbone + head (None: the backbone alone)."""
    params = list(backbone.parameters()) + ([] if head is None else list(head.parameters()))
    optimizer = torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=5e-4)
    autocast = torch.autocast(args.device, dtype=torch.bfloat16, enabled=args.device == "cuda")

    def step():
        optimizer.zero_grad(set_to_none=True)
        with autocast:
            embeddings = backbone(images)
            loss = embeddings.float().square().mean() if head is None else head(embeddings, labels)[0]
        loss.backward()
        optimizer.step()

    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for _ in range(args.warmup):  # kernel autotuning, allocator and caches settle
        step()
    step_ms = elapsed_ms(step, args.device, calls=args.steps) / args.steps
    return {"step_ms": step_ms, "images_per_s": args.batch * 1e3 / step_ms,
            "peak_cuda_bytes": torch.cuda.max_memory_allocated() if args.device == "cuda" else None}


def build_head(kind, num_ids, length, args):
    """The head `kind` for num_ids identities, its parameters on the device."""
    if kind == "gif":
        codes = tokenize(None, args.vocab, length, method="random", num_ids=num_ids, seed=0)
        head = CodeHead(args.embedding_dim, gif_kernels.CodeBook(codes, args.vocab))
    elif kind == "full":
        head = FullSoftmaxHead(args.embedding_dim, num_ids)
    else:
        head = PartialFCHead(args.embedding_dim, num_ids, args.sample_rate)
    return head.to(args.device)


def new_row(head, ids=None, length=None, classes=None, param_bytes=None):
    """A result row, its measured fields None."""
    return {"head": head, "ids": ids, "code_length": length, "classes": classes,
            "head_param_bytes": param_bytes, "images_per_s": None, "ratio_vs_backbone": None,
            "step_ms": None, "peak_cuda_bytes": None, "skipped": None}


def head_row(kind, num_ids, backbone, images, extra_bytes, args):
    """One row; extra_bytes is what the backbone's step holds beyond what stays allocated."""
    length = default_length(num_ids, args.vocab) if kind == "gif" else None
    torch.manual_seed(0)
    labels = torch.randint(0, num_ids, (args.batch,), device=args.device)
    if kind == "gif":
        classes = length * args.vocab
        param_bytes = classes * args.embedding_dim * FLOAT32
        device_bytes, host_bytes = code_head_bytes(num_ids, length, args), codebook_host_bytes(num_ids, length)
    else:
        classes = num_ids
        if kind == "partial_fc":  # every label of the batch, then sampled others up to rate * N
            classes = max(int(args.sample_rate * num_ids), 1, labels.unique().numel())
        param_bytes = num_ids * args.embedding_dim * FLOAT32
        device_bytes = dense_head_bytes(num_ids, classes, args)
        host_bytes = param_bytes if args.device == "cuda" else 0  # the weight is initialized on the host
    needs = {args.device: extra_bytes + device_bytes}
    needs["cpu"] = needs.get("cpu", 0) + host_bytes
    row = new_row(kind, num_ids, length, classes, param_bytes)
    row["skipped"] = shortfall(needs, args.device)
    if row["skipped"]:
        return row
    try:
        row.update(measure(backbone, build_head(kind, num_ids, length, args), images, labels, args))
    except Exception as error:  # noqa: BLE001 - a failed row is a result; the others still run
        reason = "skipped: out of memory" if is_out_of_memory(error) else f"failed: {type(error).__name__}"
        row["skipped"] = f"{reason}: {(str(error).splitlines() or [''])[0][:200]}"
    finally:
        backbone.zero_grad(set_to_none=True)
    return row


def run_benchmark(args):
    """Rows: the backbone alone, then each head at each identity count."""
    if args.device == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed shapes: pick the fastest convolutions once
    torch.manual_seed(0)
    backbone = build_backbone(args.backbone, args.embedding_dim, args.image_size).to(args.device).train()
    images = torch.rand(args.batch, 3, args.image_size, args.image_size, device=args.device) * 2 - 1
    baseline = new_row("backbone")
    baseline.update(measure(backbone, None, images, None, args), ratio_vs_backbone=1.0)
    backbone.zero_grad(set_to_none=True)
    release_memory(args.device)
    # The backbone's activations, gradients and momentum come back in every row.
    extra_bytes = baseline["peak_cuda_bytes"] - torch.cuda.memory_allocated() if args.device == "cuda" else 0
    rows = [baseline]
    for num_ids in args.ids:
        for kind in HEADS:
            print(f"{kind} at {format_count(num_ids)} ids", file=sys.stderr, flush=True)
            row = head_row(kind, num_ids, backbone, images, extra_bytes, args)
            release_memory(args.device)
            if row["images_per_s"] is not None:
                row["ratio_vs_backbone"] = row["images_per_s"] / baseline["images_per_s"]
            rows.append(row)
    return rows


# ----------------------------------------------------------------------------- output

def format_table(rows):
    """A markdown table of the rows."""
    lines = ["| head | ids | L | classes/step | head params | images/s | vs backbone | step ms | "
             "peak CUDA | note |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for row in rows:
        def cell(key, fmt):
            return "-" if row[key] is None else fmt(row[key])
        lines.append("| " + " | ".join([
            row["head"], cell("ids", format_count), cell("code_length", str),
            cell("classes", format_count), cell("head_param_bytes", lambda v: format_si(v, "B")),
            cell("images_per_s", "{:,.1f}".format), cell("ratio_vs_backbone", "{:.1%}".format),
            cell("step_ms", "{:,.1f}".format), cell("peak_cuda_bytes", lambda v: format_si(v, "B")),
            row["skipped"] or ""]) + " |")
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    device_name = (torch.cuda.get_device_name() if args.device == "cuda"
                   else f"{platform.processor() or 'cpu'}, {torch.get_num_threads()} threads")
    rows = run_benchmark(args)
    print(f"training step of {args.backbone} + head on {device_name}, "
          f"{'bf16 autocast' if args.device == 'cuda' else 'float32'}, batch {args.batch}, "
          f"{args.image_size}x{args.image_size}, D {args.embedding_dim}, V {args.vocab}, "
          f"Partial FC rate {args.sample_rate:g}; step ms = total of {args.steps} steps / {args.steps}")
    print(format_table(rows))
    if args.json:
        report = {"device": device_name, "torch": torch.__version__,
                  "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                  "args": vars(args), "rows": rows}
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
