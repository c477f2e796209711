"""The reference trainer: a backbone with the code head (or full softmax / Partial FC to compare).

    python -m gif_kernels.train --data synthetic --ids 100 --out runs/demo
    torchrun --nproc_per_node 2 -m gif_kernels.train --data synthetic --ids 50 --out runs/ddp
    python -m gif_kernels.train --out runs/demo --resume

One process, or many through torchrun (DDP: gloo on CPU, nccl on GPU; every process holds the
whole code head, which is small). --batch-size is the global batch, split across processes.
Checkpoints are written atomically every --checkpoint-every steps; --resume continues from the
newest. At the end the model is evaluated (gif_kernels.train.evaluate) into OUT/metrics.json.
With --val-targets, insightface's verification sets (lfw.bin, ...) are scored every --val-every steps
(log.csv, TensorBoard) and at the end (metrics.json).
"""
import argparse
import csv
import json
import math
import os
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler

from ..cli import ArgumentParser, one_line_errors
from ..codebook import CodeBook
from ..files import atomic_write
from ..head import DEFAULT_GAMMA, DEFAULT_MARGINS, CodeHead
from ..ops import BACKENDS, check_scale
from ..tokenize import METHODS, VECTOR_METHODS
from . import checkpoint
from .backbones import BACKBONES, load_backbone_weights
from .data import SYNTHETIC_IMAGES_PER_ID, load_splits, load_val_sets, parse_val_targets
from .evaluate import evaluate, run_description, val_set_metrics, write_metrics
from .heads import HEADS
from .model import (BACKBONE_VECTORS, DEFAULT_CODE_METHOD, DEFAULT_LENGTH, DEFAULT_VECTORS,
                    RANDOM_VECTORS, FaceModel, build_backbone_for, build_codebook, build_run_head, feature_dim_of,
                    identity_vectors, mean_features)

# Beam width of the evaluation's identification. With anchors the beam's codes are the candidates that
# their anchors re-rank (CodeHead.identify), so a wider beam finds more right answers: at 1000
# identities, 32 -> 128 lifts top-1 from 0.70 to 0.86 (bench/RESULTS.md) for 128 anchor rows per face.
EVAL_BEAM = 128

# Arguments a resumed run must share with the run it continues. Others given on its command line
# (e.g. --steps to train longer, --workers) replace the saved ones.
RESUME_KEYS = ("data", "ids", "images_per_id", "holdout_per_id", "verify_ids", "image_size", "backbone",
               "init_backbone", "embedding_dim", "head", "sample_rate", "margin", "m", "scale", "vocab", "length",
               "proj_dim", "gamma", "identity_weight", "identity_samples", "codes", "code_method", "identity_vectors",
               "spread_steps", "retokenize_after", "first_head", "classifier_init",
               "optimizer", "lr", "momentum", "weight_decay", "warmup", "batch_size", "grad_clip", "seed")


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="python -m gif_kernels.train", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="output folder: checkpoints, codes, log.csv, metrics.json")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    data = p.add_argument_group("data")
    data.add_argument("--data", default="synthetic",
                      help="synthetic | imagefolder:PATH | recordio:PATH | features:PATH (.npz or folder)")
    data.add_argument("--ids", type=int, help="training identities (synthetic: 100; real data: all)")
    data.add_argument("--images-per-id", type=int, default=SYNTHETIC_IMAGES_PER_ID,
                      help="synthetic: training images per identity")
    data.add_argument("--holdout-per-id", type=int, default=2, help="images per identity held out for identification")
    data.add_argument("--verify-ids", type=int, help="identities held out for verification (default: data's)")
    data.add_argument("--image-size", type=int,
                      help="default 112 (insightface's crop); 64 for synthetic data with the cnn backbone "
                           "(the synthetic faces are drawn at 64x64), which keeps CPU runs short")
    data.add_argument("--workers", type=int, default=0, help="DataLoader worker processes")
    data.add_argument("--threads", type=int,
                      help="CPU threads of each training process (default: PyTorch's, OMP_NUM_THREADS or the "
                           "core count; see bench/RESULTS.md for the trainer beside its data-loader workers)")
    data.add_argument("--val-targets", default="",
                      help="insightface verification sets to score, comma-separated: names (lfw,cfp_fp,agedb_30) "
                           "of .bin files beside recordio:/imagefolder: data, or paths of .bin files")
    data.add_argument("--val-every", type=int, default=2000, help="steps between scores of --val-targets")
    model = p.add_argument_group("model")
    model.add_argument("--backbone", default="auto", choices=("auto",) + BACKBONES,
                       help="auto: iresnet50 on a GPU, cnn on the CPU (unused for features data)")
    model.add_argument("--init-backbone",
                       help="initial backbone weights: a .pth state dict of the same --backbone, e.g. insightface's "
                            "IResNet-50/100 model zoo files (read with torch.load(weights_only=True))")
    model.add_argument("--embedding-dim", type=int, default=512, help="width of the backbone's embeddings")
    model.add_argument("--head", default="gif", choices=HEADS, help="gif: the code head; full / partial_fc to compare")
    model.add_argument("--sample-rate", type=float, default=0.1, help="partial_fc: fraction of classes per step")
    model.add_argument("--margin", default="cosface", choices=tuple(DEFAULT_MARGINS), help="margin kind")
    model.add_argument("--m", type=float, help="margin (default: 0.4 cosface, 0.5 arcface)")
    model.add_argument("--scale", type=float, default=64.0, help="logit scale s, > 0")
    model.add_argument("--backend", default="auto", choices=BACKENDS, help="code head kernels")
    codes = p.add_argument_group("codes (gif head)")
    codes.add_argument("--codes", help="a CodeBook file (python -m gif_kernels.tokenize); else built at start")
    codes.add_argument("--vocab", type=int, default=16, help="tokens per code position, V")
    codes.add_argument("--length", type=int,
                       help=f"default: {DEFAULT_LENGTH}, or the smallest L with vocab**L >= ids where that is more")
    codes.add_argument("--code-method", default=DEFAULT_CODE_METHOD, choices=METHODS, help="how codes are assigned")
    codes.add_argument("--identity-vectors", default=DEFAULT_VECTORS,
                       help=f"identity vectors to build codes from and for L_AR: {RANDOM_VECTORS} (random signs "
                            f"hashed from --seed and the identity at the features' width, made when needed), "
                            f"{BACKBONE_VECTORS} (mean features of the initial backbone) or a .npy (N, D)")
    codes.add_argument("--spread-steps", type=int, default=0, help="uniformity steps on the vectors first")
    codes.add_argument("--retokenize-after", type=float,
                       help="epochs on the first codes; then codes are made again (--code-method) from the mean "
                            "features of the backbone trained so far, and training goes on with them")
    codes.add_argument("--first-head", default="gif", choices=HEADS,
                       help="head of the epochs before --retokenize-after's switch: gif, the code head on the "
                            "first codes; full / partial_fc, a softmax head that the code head then replaces")
    codes.add_argument("--classifier-init", default="auto", choices=("auto", "random", "vectors"),
                       help="the code classifier's first weights: random, or each token's mean of the identity "
                            "vectors its codes were made from; auto: vectors, random with --proj-dim")
    codes.add_argument("--proj-dim", type=int, help="per-position projection heads of this width")
    codes.add_argument("--gamma", type=float, default=DEFAULT_GAMMA,
                       help="weight of L_AR toward the identity vectors (needs them at the features' width)")
    codes.add_argument("--identity-weight", type=float, default=0.0,
                       help="weight of the identity-level cross-entropy through the code classifiers")
    codes.add_argument("--identity-samples", type=int, default=0,
                       help="identities drawn per step beside the batch's for that cross-entropy")
    codes.add_argument("--eval-beam", type=int, default=EVAL_BEAM, help="beam width of identification")
    optim = p.add_argument_group("optimization")
    optim.add_argument("--optimizer", default="adamw", choices=("adamw", "sgd"), help="optimizer")
    optim.add_argument("--lr", type=float, default=0.002, help="peak learning rate")
    optim.add_argument("--momentum", type=float, default=0.9, help="sgd")
    optim.add_argument("--weight-decay", type=float, default=0.05, help="weight decay")
    optim.add_argument("--warmup", type=float, default=0.05, help="fraction of steps of linear warmup")
    optim.add_argument("--epochs", type=float, default=8, help="passes over the training images")
    optim.add_argument("--steps", type=int, help="total steps (overrides --epochs)")
    optim.add_argument("--batch-size", type=int, default=64, help="global batch, split across processes")
    optim.add_argument("--grad-clip", type=float, default=5.0, help="max gradient norm (0: off)")
    optim.add_argument("--seed", type=int, default=0, help="seed of data splits, initial weights and order")
    optim.add_argument("--checkpoint-every", type=int, default=200, help="steps between checkpoints")
    optim.add_argument("--log-every", type=int, default=20, help="steps between log.csv rows")
    return p


def parse_run(argv=None) -> dict:
    parser = build_parser()
    run = vars(parser.parse_args(argv))
    run["explicit"] = sorted(k for k, v in run.items() if v != parser.get_default(k))
    run["val_targets"] = parse_val_targets(run["val_targets"])
    if run["data"].startswith("features:"):
        run["backbone"] = "none"  # precomputed embeddings train the head alone
    elif run["backbone"] == "auto":
        run["backbone"] = "iresnet50" if torch.cuda.is_available() else "cnn"
    if run["image_size"] is None:
        run["image_size"] = 64 if run["data"] == "synthetic" and run["backbone"] == "cnn" else 112
    minimums = {"threads": 1, "ids": 1, "verify_ids": 0, "length": 1, "proj_dim": 1, "identity_samples": 0,
                "steps": 1, "batch_size": 1, "checkpoint_every": 1, "log_every": 1, "val_every": 1}
    for key, minimum in minimums.items():
        if run[key] is not None and run[key] < minimum:
            parser.error(f"--{key.replace('_', '-')}: expected an integer >= {minimum}, got {run[key]}")
    if run["first_head"] != "gif" and run["retokenize_after"] is None:
        parser.error(f"--first-head: {run['first_head']} trains the first stage of --retokenize-after; "
                     f"give --retokenize-after too")
    if run["retokenize_after"] is not None:
        if not run["retokenize_after"] > 0:
            parser.error(f"--retokenize-after: expected a number of epochs > 0, got {run['retokenize_after']}")
        if run["head"] != "gif" or run["codes"] or run["code_method"] not in VECTOR_METHODS:
            parser.error(f"--retokenize-after: needs --head gif, codes built at start (no --codes) and a "
                         f"--code-method that reads identity vectors ({', '.join(VECTOR_METHODS)})")
    if run["backbone"] == "none" and (run["val_targets"] or run["init_backbone"]):
        parser.error(f"--{'val-targets' if run['val_targets'] else 'init-backbone'}: features data trains no "
                     f"backbone")
    if run["classifier_init"] == "vectors" and run["proj_dim"]:
        parser.error("--classifier-init vectors: the classifiers see projections with --proj-dim; use one of them")
    if run["classifier_init"] == "auto":
        run["classifier_init"] = "random" if run["proj_dim"] else "vectors"
    try:
        check_scale(run["scale"])
    except ValueError as error:
        parser.error(f"--{error}")
    return run


def setup_distributed():
    """(rank, world size, device): torchrun sets WORLD_SIZE; gloo on CPU, nccl on GPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        return dist.get_rank(), world, device
    return 0, 1, device


def barrier(world):
    if world > 1:
        dist.barrier()


def learning_rate(run: dict, step: int, total: int) -> float:
    """Linear warmup over run["warmup"] of the steps, then cosine decay to 0."""
    warmup = int(run["warmup"] * total)
    if step < warmup:
        return run["lr"] * (step + 1) / warmup
    return run["lr"] * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(total - warmup, 1)))


def make_codes(run: dict, out: Path, backbone, splits, device, rank: int, world: int):
    """The codes a code head trains on from the start, made once by rank 0 into OUT, so that all
    processes (and a resumed run) train on the same codes."""
    if rank == 0 and not (out / checkpoint.CODES_FILE).exists():
        saves_vectors = run["identity_vectors"] != RANDOM_VECTORS  # random ones are made again from --seed
        uses_vectors = run["gamma"] > 0 or run["classifier_init"] == "vectors"
        needs_vectors = not run["codes"] or (saves_vectors and uses_vectors)
        vectors = identity_vectors(run, backbone, splits, device, run["workers"]) if needs_vectors else None
        build_codebook(run, vectors, splits.num_ids).save(out / checkpoint.CODES_FILE)
        if vectors is not None and saves_vectors:
            np.save(out / checkpoint.VECTORS_FILE, vectors.numpy())
    barrier(world)


def stage_code_head(run: dict, out: Path, codes: str, feature_dim: int, num_ids: int, device) -> CodeHead:
    """The code head on a stage's codes file in OUT, with L_AR's anchors (--gamma) and the classifier
    started at the identity vectors' means per token (--classifier-init vectors): see
    checkpoint.stage_vectors."""
    codebook = CodeBook.load(out / codes)
    vectors, anchors, seed = checkpoint.stage_vectors(run, out, codes, feature_dim, num_ids, device)
    head = build_run_head(run, "gif", feature_dim, num_ids, codebook, anchors, seed)
    if run["classifier_init"] == "vectors":
        head.init_from_vectors(vectors)
    return head.to(device)


def retokenize_step(run: dict, per_epoch: int, total: int) -> int | None:
    """The step of --retokenize-after's switch (None without it); it must fall inside the run."""
    if run["retokenize_after"] is None:
        return None
    switch = round(run["retokenize_after"] * per_epoch)
    if not 0 < switch < total:
        raise ValueError(f"--retokenize-after: {run['retokenize_after']} epochs is step {switch}, expected one "
                         f"in (0, {total}): inside the run's {total} steps")
    return switch


def retokenize(run: dict, out: Path, model, optimizer, splits, device, rank: int, world: int) -> CodeBook:
    """The switch of --retokenize-after: codes made by rank 0 from the mean features of the backbone
    trained so far, read by every rank, and a new code head on them in place of the first stage's head
    (the same initial draw everywhere), its parameters in the optimizer in place of the old head's,
    whose state is dropped. Returns the new CodeBook."""
    codes = checkpoint.RETOKENIZED_CODES_FILE
    if rank == 0:
        vectors = mean_features(model.backbone, splits.train, splits.train_labels, splits.num_ids, device,
                                run["workers"])
        build_codebook(run, vectors, splits.num_ids).save(out / codes)
        np.save(out / checkpoint.STAGE_VECTORS[codes], vectors.numpy())
    barrier(world)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(run["seed"] + 1)
        head = stage_code_head(run, out, codes, feature_dim_of(run, splits.input_shape), splits.num_ids, device)
    old = {id(p) for p in model.head.parameters()}
    for group in optimizer.param_groups:  # the head's parameters come last, as in a newly built optimizer
        for p in group["params"]:
            if id(p) in old:
                optimizer.state.pop(p, None)
        group["params"] = [p for p in group["params"] if id(p) not in old]
    optimizer.param_groups[-1]["params"].extend(head.parameters())
    model.head = head
    return head.codebook


def resumed_run(run: dict, saved: dict) -> dict:
    """The saved run's arguments, with those given on this command line that may change."""
    previous = saved["run"]
    for key in RESUME_KEYS:
        if key in run["explicit"] and run[key] != previous.get(key):
            raise ValueError(f"--{key.replace('_', '-')}: {run[key]!r} differs from the run being resumed "
                             f"({previous.get(key)!r}); start a new --out to change it")
    # Options newer than the saved run take this command line's values (their defaults if not given).
    return {**run, **previous, **{k: run[k] for k in run["explicit"]}, "explicit": run["explicit"]}


class Log:
    """log.csv (appended across resumes) and TensorBoard where installed; rank 0 only."""

    def __init__(self, out: Path):
        self.path = out / "log.csv"
        self.writer = None
        try:
            from torch.utils.tensorboard import SummaryWriter
            self.writer = SummaryWriter(out / "tensorboard")
        except ImportError:
            pass

    def write(self, step: int, values: dict):
        row = {"step": step, **values}
        rows, fields = [], []
        if self.path.exists():
            with open(self.path, newline="") as f:
                reader = csv.DictReader(f)
                fields = list(reader.fieldnames or [])
                if not set(row) <= set(fields):  # new columns (the loss parts change at --retokenize-after)
                    rows = list(reader)
        if fields and set(row) <= set(fields):
            with open(self.path, "a", newline="") as f:
                csv.DictWriter(f, fieldnames=fields, restval="").writerow(row)
        else:  # the whole file again under the union of the columns, earlier rows blank in the new ones
            fields += [key for key in row if key not in fields]
            with atomic_write(self.path) as tmp, open(tmp, "w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=fields, restval="")
                writer.writeheader()
                writer.writerows([*rows, row])
        if self.writer is not None:
            for key, value in values.items():
                self.writer.add_scalar(key, value, step)

    def close(self):
        if self.writer is not None:
            self.writer.close()


def start_or_resume(run: dict, out: Path, world: int) -> tuple[dict, dict | None]:
    """(the run's arguments, the checkpoint it resumes or None); refuses what cannot go on."""
    if run["resume"]:
        saved = checkpoint.load_latest(out)
        if saved is None:
            raise ValueError(f"--resume: no checkpoint in {out} to resume; drop --resume to start a new run")
        run = resumed_run(run, saved)
    else:
        saved = None
        if checkpoint.checkpoints(out):
            raise ValueError(f"--out: {out} already holds checkpoints; pass --resume to continue, or another --out")
    if run["batch_size"] % world:
        raise ValueError(f"--batch-size: {run['batch_size']} does not split over {world} processes")
    return run, saved


def build_training(run: dict, out: Path, splits, device, rank: int, world: int, stats: dict, resuming: bool):
    """(model, optimizer, codebook or None) on `device` for the stage that a checkpoint with these
    stats trains (checkpoint.stage_head), with the same initial weights in every process (--init-backbone's
    unless resuming: the checkpoint's weights replace them)."""
    torch.manual_seed(run["seed"])
    backbone, feature_dim = build_backbone_for(run, splits.input_shape)
    if run["init_backbone"] and not resuming:  # before the codes are made from the initial backbone's features
        load_backbone_weights(backbone, run["init_backbone"])
    backbone.to(device)
    kind, codes = checkpoint.stage_head(run, stats)
    if codes == checkpoint.CODES_FILE:
        make_codes(run, out, backbone, splits, device, rank, world)
    if codes is None:
        head = build_run_head(run, kind, feature_dim, splits.num_ids, None)
    else:
        head = stage_code_head(run, out, codes, feature_dim, splits.num_ids, device)
    model = FaceModel(backbone, head)
    codebook = head.codebook if codes else None
    model.to(device)
    if run["optimizer"] == "sgd":
        optimizer = torch.optim.SGD(model.parameters(), lr=run["lr"], momentum=run["momentum"],
                                    weight_decay=run["weight_decay"])
    else:
        optimizer = torch.optim.AdamW(model.parameters(), lr=run["lr"], weight_decay=run["weight_decay"])
    return model, optimizer, codebook


def train_steps(run: dict, out: Path, model, optimizer, splits, val_sets, device, rank: int, world: int,
                step: int, stop: int, total: int, per_epoch: int, stats: dict) -> tuple[int, dict]:
    """Train from `step` to `stop` of `total` steps (per_epoch steps an epoch; the learning rate follows
    `total`), logging, scoring the verification sets `val_sets` (rank 0's; empty on the others) every
    --val-every steps and at the last, and checkpointing; returns (the last step, its scores if it was
    scored, else {})."""
    batch = run["batch_size"] // world
    step_model = DistributedDataParallel(model) if world > 1 else model
    sampler = DistributedSampler(splits.train, num_replicas=world, rank=rank, shuffle=True, seed=run["seed"],
                                 drop_last=True)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    log = Log(out) if rank == 0 else None
    progress = None
    if rank == 0:
        from tqdm import tqdm
        progress = tqdm(total=total, initial=step, desc=f"train {run['head']}", unit="step", dynamic_ncols=True)
    timed_images, timed_seconds, last = 0, 0.0, None
    scores = {}
    while step < stop:
        epoch, offset = divmod(step, per_epoch)
        sampler.set_epoch(epoch)
        order = list(sampler)
        batches = [order[i * batch:(i + 1) * batch] for i in range(offset, per_epoch)]
        loader = DataLoader(splits.train, batch_sampler=batches, num_workers=run["workers"],
                            pin_memory=device.type == "cuda")
        for inputs, labels in loader:
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(run, step, total)
            with autocast:
                loss, parts = step_model(inputs.to(device, non_blocking=True), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if run["grad_clip"] > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), run["grad_clip"])
            optimizer.step()
            step += 1
            now = time.perf_counter()
            if last is not None:  # the first step of each loader (its start-up) is not timed
                timed_images, timed_seconds = timed_images + batch * world, timed_seconds + now - last
            last = now
            scoring = bool(run["val_targets"]) and (step % run["val_every"] == 0 or step == total)
            if rank == 0:
                progress.update(1)
                scores = val_set_metrics(model.backbone, val_sets, device, run["workers"]) if scoring else {}
                values = dict(scores)
                if step % run["log_every"] == 0 or step == total:
                    values.update({"epoch": epoch, "lr": optimizer.param_groups[0]["lr"], "loss": loss.item(),
                                   **{k: v.item() for k, v in parts.items()}})
                    if timed_seconds:
                        values["images_per_s"] = timed_images / timed_seconds
                    progress.set_postfix(loss=f"{values['loss']:.3f}")
                if values:
                    log.write(step, values)
            if scoring:  # the other processes wait for rank 0's scoring here rather than in DDP's all-reduce
                barrier(world)
            if step % run["checkpoint_every"] == 0 or step in (stop, total):
                if timed_seconds:
                    stats["images_per_s"] = timed_images / timed_seconds
                if rank == 0:
                    checkpoint.save(out, step, model, optimizer, run, stats)
                barrier(world)
            if step >= stop:
                break
        last = None
    if rank == 0:
        progress.close()
        log.close()
    return step, scores


def train(run: dict) -> dict | None:
    """Train, checkpoint and evaluate as `run` (parse_run's dict) says; rank 0 returns the metrics.

    Bad arguments and data raise ValueError (or OSError) before anything is written; an output
    folder that this call created is removed again if setting up the run fails."""
    rank, world, device = setup_distributed()
    if run["threads"] is not None:
        torch.set_num_threads(run["threads"])
    out = Path(run["out"])
    run, saved = start_or_resume(run, out, world)
    splits = load_splits(run)
    val_sets = load_val_sets(run["val_targets"], run["data"], run["image_size"]) if rank == 0 else []
    per_epoch = len(splits.train) // world // (run["batch_size"] // world)  # DistributedSampler drops the rest
    if per_epoch == 0:
        raise ValueError(f"--batch-size: {run['batch_size']} is more than the {len(splits.train)} training images")
    total = run["steps"] or max(1, round(run["epochs"] * per_epoch))
    switch = retokenize_step(run, per_epoch, total)
    created = rank == 0 and not out.exists()
    stats = {**saved["stats"], "processes": world} if saved is not None else {"processes": world}
    try:
        if rank == 0:
            out.mkdir(parents=True, exist_ok=True)
        barrier(world)
        model, optimizer, codebook = build_training(run, out, splits, device, rank, world, stats, saved is not None)
    except BaseException:
        if created:
            shutil.rmtree(out, ignore_errors=True)
        raise
    step = 0
    if saved is not None:
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        step = saved["step"]
        if rank == 0:
            print(f"resumed from step {step} ({saved['path']})", flush=True)
    if switch is not None and checkpoint.stage_head(run, stats)[1] != checkpoint.RETOKENIZED_CODES_FILE:
        # the first stage (nothing left of it when resumed at the switch), then the switch
        step, _ = train_steps(run, out, model, optimizer, splits, val_sets, device, rank, world, step, switch,
                              total, per_epoch, stats)
        codebook = retokenize(run, out, model, optimizer, splits, device, rank, world)
        stats["retokenized_at"] = step
        if rank == 0:
            checkpoint.save(out, step, model, optimizer, run, stats)
        barrier(world)
    step, scores = train_steps(run, out, model, optimizer, splits, val_sets, device, rank, world, step, total,
                               total, per_epoch, stats)

    metrics = None
    if rank == 0:
        metrics = evaluate(model, splits, device, run["eval_beam"], run["workers"], run["seed"])
        # the last step's scores; scored here only when a resumed run had no step left to train
        metrics.update(scores or val_set_metrics(model.backbone, val_sets, device, run["workers"]))
        metrics.update(run_description(run, splits.num_ids, codebook, step, stats))
        write_metrics(out, metrics)
        print(json.dumps(metrics, sort_keys=True), flush=True)
    barrier(world)
    if world > 1:
        dist.destroy_process_group()
    return metrics


def main(argv=None):
    run = parse_run(argv)
    with one_line_errors():
        train(run)
