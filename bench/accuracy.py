"""Accuracy of the code head against full softmax and Partial FC, trained and evaluated the same way.

For each identity count, every run trains with the reference trainer on the same data, backbone,
number of steps and seed (each of --seeds), and is evaluated the same way: identification of held-out
images of the training identities (the code head through its beam decoder, whose candidates its
anchors re-rank, and the share of answers it proves exact: none once re-ranked) and verification, TAR
at FAR 1e-3 and 1e-4 over all pairs of identities not trained on. One table per identity count (mean
and, over several seeds, the spread), and a JSON report.

A run is one head with its recipe, named in RUNS (or added with --run NAME=ARGS): trainer arguments
on top of the shared ones. Head FLOPs per step come from the model of bench/scale_ids.py. Runs whose
metrics.json is already in --out are read back, not trained again, so a long table can be resumed.

    python bench/accuracy.py                                  # synthetic, 100 and 1000 identities
    python bench/accuracy.py --ids 100 --seeds 0,1,2 --runs full,partial_fc,gif-random6
    python bench/accuracy.py --data imagefolder:/data/faces --ids 1000 --epochs 20 --image-size 112
"""
import argparse
import contextlib
import json
import shlex
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch

import gif_kernels
from gif_kernels.cli import ArgumentParser, one_line_errors
from gif_kernels.files import atomic_write
from gif_kernels.train.trainer import parse_run, train
from harness import comma_list, head_flops, partial_fc_class_count, positive_int

# Each run's trainer arguments, beside the shared ones (data, ids, budget, seed, --out).
# The recipes measured before the trainer's default had no L_AR and a random classifier start; they keep them.
NO_ANCHORS = ["--gamma", "0", "--classifier-init", "random"]
RUNS = {
    "full": ["--head", "full"],
    "partial_fc": ["--head", "partial_fc"],
    # the trainer's defaults: L_AR toward random identity vectors, their PQ codes (L = 6), the
    # classifier started at each token's mean of them
    "gif": ["--head", "gif"],
    "gif-no-anchors": ["--head", "gif", "--gamma", "0"],
    "gif-random6": ["--head", "gif", "--code-method", "random", "--length", "6", *NO_ANCHORS],
    "gif-pq6-retokenized": ["--head", "gif", "--code-method", "pq", "--length", "6", "--retokenize-after", "2",
                            "--identity-vectors", "backbone", *NO_ANCHORS],
    # Partial FC for 3 epochs, then the code head on codes from its features
    "gif-pfc-pq6": ["--head", "gif", "--first-head", "partial_fc", "--code-method", "pq", "--length", "6",
                    "--retokenize-after", "3", *NO_ANCHORS],
}
DEFAULT_RUNS = tuple(RUNS)
# Synthetic data's budget per identity count (training images per identity, epochs): the same for every
# run, about 2 minutes a run on 2 CPU cores with the small CNN.
SYNTHETIC_BUDGETS = {100: (64, 8), 1000: (16, 4)}
FALLBACK_BUDGET = (16, 4)
METRICS = ("ident_top1", "ident_top5", "ident_exact", "tar@far=1e-3", "tar@far=1e-4", "images_per_s",
           "wall_s", "head_flops", "flops_ratio_vs_full")


def parse_run_spec(text):
    """NAME=ARGS: a run named NAME with trainer arguments ARGS (shell words)."""
    name, sep, args = text.partition("=")
    if not sep or not name.strip() or "/" in name:
        raise argparse.ArgumentTypeError(f"expected NAME=ARGS like 'gif-l8=--length 8', got {text!r}")
    return name.strip(), shlex.split(args)


def build_parser():
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="results/accuracy", help="folder of the runs and accuracy.json")
    p.add_argument("--data", default="synthetic", help="the trainer's --data")
    p.add_argument("--ids", type=comma_list(positive_int), default=[100, 1000],
                   help="identity counts, one table each")
    p.add_argument("--seeds", type=comma_list(int), default=[0], help="seeds; each run trains once per seed")
    p.add_argument("--runs", type=comma_list(str), default=list(DEFAULT_RUNS),
                   help=f"runs to train, of {', '.join(RUNS)} and those given by --run")
    p.add_argument("--run", type=parse_run_spec, action="append", default=[], metavar="NAME=ARGS",
                   help="add a run: NAME=trainer arguments (repeatable); it joins --runs")
    p.add_argument("--images-per-id", type=positive_int,
                   help=f"synthetic training images per identity (default by ids: {SYNTHETIC_BUDGETS})")
    p.add_argument("--epochs", type=float, help="epochs of every run (default by ids, as above)")
    p.add_argument("--trainer-args", default="",
                   help="more trainer arguments for every run, e.g. '--backbone cnn --image-size 32'")
    return p


def parse_args(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    args.extra_runs = dict(args.run)
    known = {**RUNS, **args.extra_runs}
    unknown = [name for name in args.runs if name not in known]
    if unknown:
        parser.error(f"--runs: unknown {', '.join(unknown)}; expected some of {', '.join(known)}")
    args.runs = list(dict.fromkeys(args.runs + list(args.extra_runs)))
    if args.epochs is not None and args.epochs <= 0:
        parser.error(f"--epochs: expected a number > 0, got {args.epochs}")
    try:
        args.trainer_args = shlex.split(args.trainer_args)
    except ValueError as error:
        parser.error(f"--trainer-args: {error}")
    return args


def budget(args, num_ids):
    """(images per identity, epochs) of every run at num_ids."""
    images, epochs = SYNTHETIC_BUDGETS.get(num_ids, FALLBACK_BUDGET)
    return args.images_per_id or images, args.epochs or epochs


def trainer_argv(args, name, num_ids, seed, out):
    images_per_id, epochs = budget(args, num_ids)
    shared = ["--data", args.data, "--ids", str(num_ids), "--seed", str(seed), "--epochs", str(epochs),
              "--out", str(out)]
    if args.data == "synthetic":
        shared += ["--images-per-id", str(images_per_id)]
    return shared + args.trainer_args + {**RUNS, **args.extra_runs}[name]


def head_cost(metrics, run):
    """(head FLOPs per step over the run's steps, full softmax's over that) from scale_ids' model; with
    --retokenize-after, the first stage's head counts for the steps before the switch."""
    num_ids, batch, dim = metrics["num_ids"], run["batch_size"], run["embedding_dim"]

    def flops_of(kind):
        if kind == "full":
            return head_flops(batch, dim, num_ids)
        if kind == "partial_fc":
            return head_flops(batch, dim, partial_fc_class_count(run["sample_rate"], num_ids, batch))
        width = run["proj_dim"] or dim
        flops = head_flops(batch, width, metrics["code_length"] * metrics["vocab"])
        if run["proj_dim"]:  # one width-P projection per position
            flops += head_flops(batch, dim, run["proj_dim"] * metrics["code_length"])
        return flops

    flops = flops_of(metrics["head"])
    switch = metrics.get("retokenized_at")
    if switch is not None:
        flops = (switch * flops_of(run["first_head"]) + (metrics["steps"] - switch) * flops) / metrics["steps"]
    return flops, head_flops(batch, dim, num_ids) / flops


def train_or_read(args, name, num_ids, seed):
    """One trained run's metrics (with wall_s and the head cost): read back if it finished before."""
    out = Path(args.out) / f"ids-{num_ids}" / f"seed-{seed}" / name
    argv = trainer_argv(args, name, num_ids, seed, out)
    run = parse_run(argv)
    done = out / "accuracy-run.json"
    if done.exists():
        saved = json.loads(done.read_text())
        if saved["argv"] == argv:
            return saved["metrics"]
        raise ValueError(f"--out: {out} holds a run with other arguments ({shlex.join(saved['argv'])}); "
                         f"choose another --out")
    if out.exists():  # an interrupted run: train it again from the start, so that wall_s is whole
        shutil.rmtree(out)
    print(f"training {name}, {num_ids} ids, seed {seed}: {shlex.join(argv)}", file=sys.stderr, flush=True)
    start = time.perf_counter()
    with contextlib.redirect_stdout(sys.stderr):  # the trainer's own log; the tables go to stdout
        metrics = train(run)
    metrics["wall_s"] = time.perf_counter() - start
    metrics["head_flops"], metrics["flops_ratio_vs_full"] = head_cost(metrics, run)
    if metrics["head"] != "gif":
        metrics.pop("ident_exact", None)  # softmax heads score every identity: exact by construction
    write_json(done, {"argv": argv, "metrics": metrics})
    return metrics


def write_json(path, value):
    """path holds the whole of value or its previous content, never a part: a run read back must parse.
    Keys keep their order (the rows their run order)."""
    with atomic_write(path) as tmp:
        Path(tmp).write_text(json.dumps(value, indent=2) + "\n")


def summarize(values):
    """{mean, std (None for one value), values} of the non-missing values, or None."""
    values = [v for v in values if v is not None]
    if not values:
        return None
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else None,
            "values": values}


def targets(rows, num_ids):
    """The targets at one identity count for the best code-head run by TAR@FAR=1e-3: its TARs at least
    each softmax head's, ident top-1 within 1% of full softmax's and, from 1000 identities, a head
    cost at least 10x below full softmax's."""
    def mean(name, key):
        return rows[name][key]["mean"]

    gif = [name for name, row in rows.items() if row["head"] == "gif"]
    softmax = [name for name, row in rows.items() if row["head"] != "gif"]
    if not gif or not softmax:
        return None
    best = max(gif, key=lambda name: mean(name, "tar@far=1e-3"))
    checks = {}
    for other in softmax:
        for key in ("tar@far=1e-3", "tar@far=1e-4"):
            checks[f"{key} >= {other}"] = mean(best, key) >= mean(other, key)
        if rows[other]["head"] == "full":
            checks[f"ident_top1 >= 0.99 x {other}"] = mean(best, "ident_top1") >= 0.99 * mean(other, "ident_top1")
    if num_ids >= 1000:
        checks["head cost >= 10x below full softmax"] = mean(best, "flops_ratio_vs_full") >= 10
    return {"best_code_head": best, "checks": checks}


def run_benchmark(args):
    """The report: {"config", "tables": {num_ids: {"rows": {run: {metric: summary}}, "targets"}}}."""
    tables = {}
    for num_ids in args.ids:
        rows = {}
        for name in args.runs:
            per_seed = [train_or_read(args, name, num_ids, seed) for seed in args.seeds]
            rows[name] = {"head": per_seed[0]["head"],
                          **{key: summarize([m.get(key) for m in per_seed]) for key in METRICS}}
        tables[str(num_ids)] = {"rows": rows, "targets": targets(rows, num_ids),
                                "budget": dict(zip(("images_per_id", "epochs"), budget(args, num_ids)))}
    config = {key: value for key, value in vars(args).items() if key not in ("run", "extra_runs")}
    config.update(runs={name: {**RUNS, **args.extra_runs}[name] for name in args.runs},
                  torch=torch.__version__, build_info=gif_kernels.build_info())
    return {"config": config, "tables": tables}


def format_cell(summary, spec):
    if summary is None:
        return "-"
    text = format(summary["mean"], spec)
    return text if not summary["std"] else f"{text} ± {format(summary['std'], spec)}"  # one seed, or all alike


def format_table(num_ids, table):
    lines = [f"## {num_ids} identities ({table['budget']['images_per_id']} images each, "
             f"{table['budget']['epochs']:g} epochs)", "",
             "| run | ident top-1 | top-5 | exact | TAR@1e-3 | TAR@1e-4 | images/s | wall s | "
             "head FLOPs/step | fewer than full |", "|---|---|---|---|---|---|---|---|---|---|"]
    for name, row in table["rows"].items():
        lines.append(f"| {name} | {format_cell(row['ident_top1'], '.3f')} | {format_cell(row['ident_top5'], '.3f')} | "
                     f"{format_cell(row['ident_exact'], '.3f')} | {format_cell(row['tar@far=1e-3'], '.3f')} | "
                     f"{format_cell(row['tar@far=1e-4'], '.3f')} | {format_cell(row['images_per_s'], '.0f')} | "
                     f"{format_cell(row['wall_s'], '.0f')} | {format_cell(row['head_flops'], '.3g')} | "
                     f"{format_cell(row['flops_ratio_vs_full'], '.3g')}x |")
    if table["targets"]:
        checks = ", ".join(f"{check}: {'met' if ok else 'NOT met'}"
                           for check, ok in table["targets"]["checks"].items())
        lines += ["", f"Targets for the best code head ({table['targets']['best_code_head']}): {checks}."]
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    with one_line_errors():
        report = run_benchmark(args)
    for num_ids, table in report["tables"].items():
        print(format_table(num_ids, table) + "\n")
    path = Path(args.out) / "accuracy.json"
    write_json(path, report)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
