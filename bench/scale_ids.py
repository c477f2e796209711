"""Headline benchmark: what a face-recognition head costs per training step as identities grow.

For each identity count N it compares one step of the head (forward + backward) of
  full softmax        an (N, D) weight; CosFace margin cross-entropy over all N classes
  partial fc R%       insightface's Partial FC (An et al. 2021): the batch's positive classes plus
                      uniformly sampled negatives, R*N classes in all, rows gathered from (N, D)
  code head eager     gif_kernels.reference.fused_code_ce: L V-way classifiers with V^L >= N
  code head compile   the same under torch.compile
  fused <backend>     gif_kernels.fused_code_ce on each backend of the device
Every row gets the analytic head FLOPs and parameter / gradient / optimizer bytes. Rows whose step
fits the free memory are also run: median step time, and on CUDA the peak memory beyond
parameters and inputs. The others say what they would need. All heads use normalized features
and weights, scale 64 and CosFace margin 0.4.

    python bench/scale_ids.py --ids 10M
    python bench/scale_ids.py --ids 1M,10M,100M --out results/big --threads 2

The report (scale_ids.json, scale_ids.csv and, with matplotlib, scale_ids.png) goes to --out,
by default a new folder under results/; the last line printed names it.
"""
import argparse
import csv
import dataclasses
import functools
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

import gif_kernels
from gif_kernels import reference
from gif_kernels.cli import ArgumentParser
from gif_kernels.tokenize import default_length
from gif_kernels.train.heads import partial_fc_classes
from harness import (comma_list, format_count, format_si, free_bytes, has_matplotlib, head_flops, is_out_of_memory,
                     one_of, parse_count, parse_rate, partial_fc_class_count, positive_int, release_memory, times_ms)

SCALE = 64.0
MARGIN = 0.4  # CosFace m3, as in fused_code_ce(m3=0.4)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
FULL_SOFTMAX = "full softmax"
METHOD_KINDS = ("full", "partial", "eager", "compile", "fused")
# What a row's speedup is measured against, by preference: full softmax where it ran, else the
# fastest Partial FC, else the fastest code head in plain PyTorch (eager or torch.compile).
BASELINE_KINDS = (("full",), ("partial",), ("eager", "compile"))
RESULT_FIELDS = ("method", "ids", "length", "classes", "head_flops", "flops_ratio_vs_full",
                 "param_bytes", "grad_bytes", "optimizer_bytes", "state_bytes", "step_bytes_estimate",
                 "time_ms", "timed_steps", "speedup", "speedup_baseline", "peak_extra_bytes", "skipped")
REPORT_NAME = "scale_ids"  # the report's files in --out: scale_ids.json, .csv, .png
NOTES = {
    "head_flops": "the three matrix products of a C-class head, 6*B*D*C (logits, grad of the "
                  "features, grad of the weight); normalization, margin and softmax are O(B*C + C*D) "
                  "elementwise terms, under 1% for B and D in the hundreds, and are not counted",
    "classes": "full softmax N; Partial FC max(int(rate*N), min(B, N)) (its positives at most B); "
               "code head L*V",
    "param_bytes": "full softmax and Partial FC keep all N*D parameters; the code head L*V*D",
    "grad_bytes": "Partial FC indexes the full weight as insightface's partial_fc_v2 does, so "
                  "autograd returns a dense (N, D) gradient, zero outside the sampled rows",
    "optimizer_bytes": "SGD with momentum: one buffer the size of the parameters",
    "flops_ratio_vs_full": "full softmax's head FLOPs over the row's: how many times fewer FLOPs",
    "speedup": "the speedup_baseline's time over the row's time at the same N: full softmax where "
               "it ran, else the fastest measured Partial FC, else the fastest plain-PyTorch code head",
    "time_ms": "median of the timed steps after warm-up; a step is forward + backward of the head "
               "alone (CUDA events on a GPU, perf_counter on the CPU), its gradients dropped after",
    "step_bytes_estimate": "what a measured step is expected to hold at its peak, parameters "
                           "included; a row runs only where it fits the free memory",
    "peak_extra_bytes": "CUDA only: torch.cuda.max_memory_allocated() during one step minus what "
                        "was allocated before it (parameters and inputs); PyTorch keeps no allocator "
                        "statistics for CPU tensors, so it is null on the CPU",
}


@dataclasses.dataclass(frozen=True)
class Method:
    name: str
    kind: str  # one of METHOD_KINDS
    rate: float | None = None  # Partial FC's sample rate
    backend: str | None = None  # fused_code_ce's backend


# ----------------------------------------------------------------------------- argument parsing

def build_parser():
    parser = ArgumentParser(description=__doc__)
    parser.add_argument("--ids", type=comma_list(parse_count), default=[10**6, 10**7, 10**8],
                        help="identity counts, e.g. 10M or 1M,10M,100M (also 1e7, 10000000; default: 1M,10M,100M)")
    parser.add_argument("--batch", type=positive_int, default=512, help="batch size B")
    parser.add_argument("--dim", type=positive_int, default=512, help="feature size D")
    parser.add_argument("--vocab", type=positive_int, default=16, help="code vocabulary V (>= 2)")
    parser.add_argument("--length", type=positive_int,
                        help="code length L (default: the smallest with V^L >= N)")
    parser.add_argument("--dtype", choices=list(DTYPES), help="default: bf16 on GPU, fp32 on CPU")
    parser.add_argument("--sample-rate", type=comma_list(parse_rate), default=[0.1, 0.3],
                        help="Partial FC sample rates in (0, 1] (default: 0.1,0.3)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu",
                        help="where the steps run")
    parser.add_argument("--threads", type=positive_int, help="CPU threads (default: torch's, one per core)")
    parser.add_argument("--methods", type=comma_list(one_of(METHOD_KINDS)), default=list(METHOD_KINDS),
                        help=f"which methods to include (default: all of {','.join(METHOD_KINDS)})")
    parser.add_argument("--repeats", type=positive_int, default=20, help="timed steps per row at most")
    parser.add_argument("--max-seconds", type=float, default=20.0,
                        help="stop timing a row after this many seconds of timed steps (at least one)")
    parser.add_argument("--max-memory-gb", type=float, default=16.0,
                        help="on the CPU, run only steps that fit this much RAM in all")
    parser.add_argument("--seed", type=int, default=0, help="random seed of the inputs")
    parser.add_argument("--out", help="folder for the report (default: a new results/scale_ids-DATE-TIME)")
    parser.add_argument("--json", help="write the JSON report here instead of into --out")
    parser.add_argument("--csv", help="write the CSV rows here instead of into --out")
    parser.add_argument("--plot", help="write the PNG plot here instead of into --out (needs matplotlib)")
    return parser


def parse_args(argv=None):
    """Parsed arguments with the defaults that depend on the device filled in."""
    parser = build_parser()
    args = parser.parse_args(argv)
    args.ids = sorted(set(args.ids))
    if args.vocab < 2:
        parser.error(f"argument --vocab: expected at least 2, got {args.vocab}")
    if args.length is not None and args.vocab ** args.length < args.ids[-1]:
        parser.error(f"argument --length: vocab {args.vocab} and length {args.length} give "
                     f"{args.vocab ** args.length} codes, fewer than {args.ids[-1]} identities")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("argument --device: cuda is not available here")
    if args.plot and not has_matplotlib():
        parser.error("argument --plot: needs matplotlib (pip install matplotlib)")
    args.dtype = args.dtype or ("bf16" if args.device == "cuda" else "fp32")
    return args


# ----------------------------------------------------------------------------- analytic model

def head_classes(method, num_ids, batch, vocab, length):
    """Classes C the head scores per step (for Partial FC the most it can sample)."""
    if method.kind == "full":
        return num_ids
    if method.kind == "partial":
        return partial_fc_class_count(method.rate, num_ids, batch)
    return length * vocab


def state_bytes(method, num_ids, classes, dim, elem_size):
    """Parameter, gradient and optimizer (SGD momentum) bytes the head keeps between steps."""
    rows = num_ids if method.kind in ("full", "partial") else classes
    size = rows * dim * elem_size
    return {"param_bytes": size, "grad_bytes": size, "optimizer_bytes": size}


def step_bytes_estimate(method, num_ids, classes, batch, dim, length, elem_size):
    """Upper estimate of the memory a measured step holds at its peak, parameters included."""
    features = 4 * batch * dim * elem_size  # x, its normalized copy and their gradients
    if method.kind in ("full", "partial"):
        weight = 2 * num_ids * dim * elem_size  # the weight and its dense gradient
        rows = classes * dim * elem_size  # the normalized rows (Partial FC: also the gathered ones)
        gathered = rows if method.kind == "partial" else 0
        # The peak comes in the softmax's backward (three float32 (B, C) tensors and the cosines in
        # the compute dtype, beside the normalized rows) or in normalize's backward (the rows, their
        # gradient and temporaries).
        peak = max(rows + batch * classes * (3 * 4 + elem_size), 5 * rows)
        sampling = 4 * num_ids + 16 * classes if method.kind == "partial" else 0
        return weight + gathered + peak + sampling + features
    # Code heads: weight and gradient (with temporaries), per-position features, (B, L, V) logits.
    per_position = 3 * batch * length * dim * elem_size
    return 6 * classes * dim * elem_size + 8 * batch * classes * 4 + per_position + features


# ----------------------------------------------------------------------------- the heads

def margin_cross_entropy(x, rows, labels):
    """CosFace cross-entropy of features x against weight rows, float32 logits as in insightface."""
    logits = F.linear(F.normalize(x), F.normalize(rows)).float()
    logits[torch.arange(len(labels), device=labels.device), labels] -= MARGIN
    return F.cross_entropy(logits.mul_(SCALE), labels)


def partial_fc_loss(x, weight, labels, rate):
    """Partial FC: every positive class of the batch, then random negatives up to int(rate * N)
    classes (the trainer's sampling); the loss runs over the gathered rows only."""
    index, local_labels = partial_fc_classes(labels, weight.shape[0], int(rate * weight.shape[0]))
    return margin_cross_entropy(x, weight[index], local_labels)


def make_head(method, num_ids, length, args, compiled_loss):
    """(loss(), parameters) for one method at num_ids, on fresh random tensors."""
    device, dtype = args.device, DTYPES[args.dtype]
    torch.manual_seed(args.seed)
    x = torch.randn(args.batch, args.dim, device=device, dtype=dtype).requires_grad_()
    if method.kind in ("full", "partial"):
        weight = torch.empty(num_ids, args.dim, device=device, dtype=dtype).normal_(0, 0.01)
        weight.requires_grad_()
        labels = torch.randint(0, num_ids, (args.batch,), device=device)
        if method.kind == "full":
            return (lambda: margin_cross_entropy(x, weight, labels)), (x, weight)
        return (lambda: partial_fc_loss(x, weight, labels, method.rate)), (x, weight)
    weight = torch.empty(length, args.vocab, args.dim, device=device, dtype=dtype).normal_(0, 0.01)
    weight.requires_grad_()
    # Random codes stand in for the codebook lookup of each sample's identity (one gather).
    codes = torch.randint(0, args.vocab, (args.batch, length), device=device)
    code_loss = {"eager": reference.fused_code_ce, "compile": compiled_loss,
                 "fused": functools.partial(gif_kernels.fused_code_ce, backend=method.backend)}
    loss_fn = code_loss[method.kind]
    return (lambda: loss_fn(x, weight, codes, scale=SCALE, m3=MARGIN)), (x, weight)


def training_step(loss, params):
    """Forward + backward; the gradients are dropped after so that every step starts alike."""
    def step():
        loss().backward()
        for param in params:
            param.grad = None
    return step


def methods_for(args):
    """The methods --methods selects, each Partial FC rate and each fused backend of the device."""
    kinds = set(args.methods)
    methods = [Method(FULL_SOFTMAX, "full")] if "full" in kinds else []
    if "partial" in kinds:
        methods += [Method(f"partial fc {rate:.0%}", "partial", rate=rate) for rate in args.sample_rate]
    if "eager" in kinds:
        methods.append(Method("code head eager", "eager"))
    if "compile" in kinds:
        methods.append(Method("code head compile", "compile"))
    if "fused" in kinds:
        if args.device == "cuda":
            backends = ["triton"] + (["cuda"] if gif_kernels.ops.has_cuda_kernels() else [])
        else:
            backends = ["cpu"]
        methods += [Method(f"fused {backend}", "fused", backend=backend) for backend in backends]
    return methods


# ----------------------------------------------------------------------------- measuring

def cuda_peak_extra_bytes(step):
    """Peak CUDA memory of one step beyond what was allocated before it."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    step()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before


def measure(method, num_ids, length, args, compiled_loss):
    """{time_ms, timed_steps, peak_extra_bytes} of one row; raises what the step raises."""
    loss, params = make_head(method, num_ids, length, args, compiled_loss)
    step = training_step(loss, params)
    for _ in range(2 if args.device == "cuda" else 1):  # compiles, allocator and caches warm up
        step()
    peak = cuda_peak_extra_bytes(step) if args.device == "cuda" else None
    times = times_ms(step, args.device, args.repeats, args.max_seconds)
    return {"time_ms": statistics.median(times), "timed_steps": len(times), "peak_extra_bytes": peak}


def run_row(row, method, args, compiled_loss):
    """Measures one row in place, or records why it was skipped."""
    needed = row["step_bytes_estimate"]
    free = free_bytes(args.device, args.max_memory_gb * 1e9)
    if needed > free:
        row["skipped"] = f"skipped: needs {format_si(needed, 'B')}, {format_si(free, 'B')} free"
        return
    try:
        row.update(measure(method, row["ids"], row["length"], args, compiled_loss))
    except Exception as error:  # noqa: BLE001 - a failed row is a result; the others still run
        reason = "out of memory" if is_out_of_memory(error) else type(error).__name__
        first_line = (str(error).splitlines() or [""])[0]
        row["skipped"] = f"skipped: {reason}: {first_line[:200]}"
    finally:
        release_memory(args.device)


def analytic_row(method, num_ids, args):
    """A result row with the analytic figures filled in and the measured ones None."""
    length = args.length or default_length(num_ids, args.vocab)
    classes = head_classes(method, num_ids, args.batch, args.vocab, length)
    elem_size = DTYPES[args.dtype].itemsize
    state = state_bytes(method, num_ids, classes, args.dim, elem_size)
    flops = head_flops(args.batch, args.dim, classes)
    return {"method": method.name, "ids": num_ids,
            "length": None if method.kind in ("full", "partial") else length,
            "classes": classes, "head_flops": flops,
            "flops_ratio_vs_full": head_flops(args.batch, args.dim, num_ids) / flops,
            **state, "state_bytes": sum(state.values()),
            "step_bytes_estimate": step_bytes_estimate(method, num_ids, classes, args.batch, args.dim,
                                                       length, elem_size),
            "time_ms": None, "timed_steps": None, "speedup": None, "speedup_baseline": None,
            "peak_extra_bytes": None, "skipped": None}


def add_speedups(results, methods):
    """Measured speedup of each row at N against the first of BASELINE_KINDS measured at N (the
    fastest row of that kind); rows at an N where no baseline ran have none."""
    kinds = {method.name: method.kind for method in methods}
    for num_ids in dict.fromkeys(row["ids"] for row in results):
        rows = [row for row in results if row["ids"] == num_ids and row["time_ms"] is not None]
        for baseline_kinds in BASELINE_KINDS:
            candidates = [row for row in rows if kinds[row["method"]] in baseline_kinds]
            if candidates:
                baseline = min(candidates, key=lambda row: row["time_ms"])
                for row in rows:
                    row["speedup"] = baseline["time_ms"] / row["time_ms"]
                    row["speedup_baseline"] = baseline["method"]
                break


def run_benchmark(args):
    """The report: {"device", "config", "notes", "results": [one row per (N, method)]}."""
    methods = methods_for(args)
    compiled_loss = torch.compile(reference.fused_code_ce, dynamic=False)  # compiles on first use
    plan = [(method, num_ids) for num_ids in args.ids for method in methods]
    results = [analytic_row(method, num_ids, args) for method, num_ids in plan]
    progress = tqdm(list(zip(plan, results)), desc="measuring", unit="row", file=sys.stderr)
    for (method, num_ids), row in progress:
        progress.set_postfix_str(f"{method.name}, {format_count(num_ids)} ids")
        run_row(row, method, args, compiled_loss)
    add_speedups(results, methods)
    device = (torch.cuda.get_device_name() if args.device == "cuda"
              else f"{platform.processor() or 'cpu'}, {torch.get_num_threads()} threads")
    config = {key: value for key, value in vars(args).items() if key not in ("out", "json", "csv", "plot")}
    config.update(scale=SCALE, margin_m3=MARGIN, torch=torch.__version__,
                  build_info=gif_kernels.build_info(),
                  lengths={str(n): args.length or default_length(n, args.vocab) for n in args.ids})
    return {"device": device, "config": config, "notes": NOTES, "results": results}


# ----------------------------------------------------------------------------- output

def format_ms(value):
    if value is None:
        return "-"
    return f"{value:,.0f} ms" if value >= 100 else f"{value:.3g} ms"


def format_ratio(value):
    if value is None:
        return "-"
    return f"{value:,.0f}x" if value >= 100 else f"{value:.3g}x"


def format_fewer(value):
    """How many times fewer: 104167 -> '104,167x fewer'; 1 -> 'same'."""
    return "same" if value == 1 else f"{format_ratio(value)} fewer"


def format_speedup(row):
    if row["speedup"] is None:
        return "-"
    return f"{format_ratio(row['speedup'])} vs {row['speedup_baseline']}"


def format_table(results):
    header = ("method", "ids", "L", "classes", "head FLOPs", "FLOPs vs full", "params+grad+optim",
              "time", "speedup", "peak extra", "note")
    lines = [header]
    for row in results:
        lines.append((row["method"], format_count(row["ids"]),
                      "-" if row["length"] is None else str(row["length"]),
                      format_count(row["classes"]), format_si(row["head_flops"], "FLOP"),
                      format_fewer(row["flops_ratio_vs_full"]), format_si(row["state_bytes"], "B"),
                      format_ms(row["time_ms"]),
                      format_speedup(row), format_si(row["peak_extra_bytes"], "B"),
                      row["skipped"] or ""))
    widths = [max(len(line[col]) for line in lines) for col in range(len(header))]
    left_aligned = {0, len(header) - 1}
    return "\n".join("  ".join(cell.ljust(width) if col in left_aligned else cell.rjust(width)
                               for col, (cell, width) in enumerate(zip(line, widths))).rstrip()
                     for line in lines)


def write_csv(results, path):
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=RESULT_FIELDS)
        writer.writeheader()
        writer.writerows(results)


def write_plot(report, path):
    """Log-log panels against identities, one line per method: analytic FLOPs and state bytes,
    measured step time and peak extra memory."""
    import matplotlib
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    panels = (("head_flops", "head FLOPs per step (analytic)"),
              ("state_bytes", "params + grads + SGD momentum, bytes (analytic)"),
              ("time_ms", "step time, ms (measured)"),
              ("peak_extra_bytes", "peak extra memory, bytes (measured)"))
    results = report["results"]
    methods = list(dict.fromkeys(row["method"] for row in results))
    figure, axes = plt.subplots(2, 2, figsize=(12, 8.5))
    # One color per method in every panel; markers and dashes tell apart lines that coincide.
    styles = {method: dict(color=f"C{i % 10}", marker="osv^D<>P*X"[i % 10],
                           linestyle=("-", "--", ":", "-.")[i % 4])
              for i, method in enumerate(methods)}
    for axis, (key, title) in zip(axes.flat, panels):
        for method in methods:
            points = [(row["ids"], row[key]) for row in results
                      if row["method"] == method and row[key] is not None]
            if points:
                axis.plot(*zip(*points), label=method, **styles[method])
        if axis.lines:
            axis.set_xscale("log")
            axis.set_yscale("log")
        else:
            axis.text(0.5, 0.5, "not measured here", ha="center", va="center", transform=axis.transAxes)
        axis.set_title(title)
        axis.set_xlabel("identities")
        axis.grid(True, which="both", alpha=0.3)
    axes.flat[0].legend(fontsize="small")
    config = report["config"]
    figure.suptitle(f"head step (forward + backward), batch {config['batch']}, dim {config['dim']}, "
                    f"vocab {config['vocab']}, {config['dtype']}, {report['device']}")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def report_paths(args):
    """{"json", "csv", "plot"}: each where --json / --csv / --plot say, else in the --out folder
    (the plot only where matplotlib is installed)."""
    out = Path(args.out or Path("results") / f"{REPORT_NAME}-{time.strftime('%Y%m%d-%H%M%S')}")
    plot = args.plot or (out / f"{REPORT_NAME}.png" if has_matplotlib() else None)
    return {"json": args.json or out / f"{REPORT_NAME}.json", "csv": args.csv or out / f"{REPORT_NAME}.csv",
            "plot": plot}


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    paths = report_paths(args)
    report = run_benchmark(args)
    config = report["config"]
    print(f"head step (forward + backward) on {report['device']}: batch {config['batch']}, "
          f"dim {config['dim']}, vocab {config['vocab']}, {config['dtype']}, scale {SCALE:g}, "
          f"CosFace m3 {MARGIN:g}; FLOPs and params+grad+optim are analytic, time and peak extra "
          f"measured")
    print(format_table(report["results"]))
    if args.device == "cpu":
        print("peak extra: measured on CUDA only (PyTorch keeps no allocator statistics for CPU tensors)")
    for path in paths.values():
        if path is not None:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(paths["json"], "w") as f:
        json.dump(report, f, indent=2)
    write_csv(report["results"], paths["csv"])
    if paths["plot"] is not None:
        write_plot(report, paths["plot"])
    written = [str(path) for path in paths.values() if path is not None]
    folders = sorted({str(Path(path).parent) for path in written})
    print(f"wrote {', '.join(Path(path).name for path in written)} to {', '.join(folders)}"
          + ("" if paths["plot"] else " (no plot: pip install matplotlib)"))


if __name__ == "__main__":
    main()
