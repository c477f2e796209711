"""The CPU op and the plain head under torch.compile on a loaded machine: the step time of each beside
co-running work, as a slowdown against the same step on a quiet machine, measured in one run.

Loads (each a separate process, started before and stopped after its measurement):
  train    another training process: float32 matrix products on PyTorch's default threads
  python   a pure-Python busy loop (one core)
  loader   data-loader workers, one per core: numpy work on image-sized arrays
Each is measured with the op's OpenMP threads at PyTorch's default (the core count) and at 1.

    python bench/load.py                   # B=512, L=3, V=256, D=512, float32, CosFace
    python bench/load.py --shape 256x2x4096x512 --steps 30
"""
import datetime
import functools
import multiprocessing as mp
import os
import platform
import time

import torch

import gif_kernels
from gif_kernels import reference
from gif_kernels.cli import ArgumentParser, one_line_errors
from harness import median_ms, parse_shape, positive_int

SCALE, MARGIN = 64.0, 0.4
SETTLE_SECONDS = 1.0  # for a load to reach its steady state before the timing starts
# Fresh interpreters for the loads: a forked child of a process whose OpenMP pool is running can hang.
PROCESSES = mp.get_context("spawn")


def train_load(stop):
    a = torch.randn(1024, 1024)
    while not stop.is_set():
        a = torch.tanh(a @ a.T / 1024)


def python_load(stop):
    count = 0
    while not stop.is_set():
        for _ in range(10_000):
            count += 1


def loader_load(stop):
    import numpy as np
    image = np.random.default_rng(0).random((112, 112, 3), dtype=np.float32)
    while not stop.is_set():
        image = np.flip(np.sqrt(image * image + 1e-3), axis=1).copy()


LOADS = {"train": (train_load, 1), "python": (python_load, 1), "loader": (loader_load, os.cpu_count() or 1)}


def build_parser():
    parser = ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", type=parse_shape, default=(512, 3, 256, 512), help="B x L x V x D")
    parser.add_argument("--steps", type=positive_int, default=20, help="timed steps per measurement (median)")
    return parser


def steps(shape):
    """{name: one forward + backward step} of the fused op and of the compiled plain head."""
    B, L, V, D = shape
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(B, D, generator=gen).requires_grad_()
    weight = torch.randn(L, V, D, generator=gen).requires_grad_()
    codes = torch.randint(0, V, (B, L), generator=gen)
    compiled = torch.compile(reference.fused_code_ce)
    losses = {"fused (cpu)": functools.partial(gif_kernels.fused_code_ce, backend="cpu"),
              "torch.compile plain head": compiled}

    def step(loss):
        loss(x, weight, codes, scale=SCALE, m3=MARGIN).backward()
        x.grad = weight.grad = None
    return {name: functools.partial(step, loss) for name, loss in losses.items()}


def measure(step_fns, threads, load, count):
    """{step name: median ms} with `threads` OpenMP threads beside `load` (None: a quiet machine)."""
    torch.set_num_threads(threads)
    stop, workers = PROCESSES.Event(), []
    if load is not None:
        target, processes = LOADS[load]
        workers = [PROCESSES.Process(target=target, args=(stop,), daemon=True) for _ in range(processes)]
        for worker in workers:
            worker.start()
        time.sleep(SETTLE_SECONDS + 2.0 * (load == "train"))  # spawn, and torch's import
    try:
        return {name: median_ms(step, "cpu", count) for name, step in step_fns.items()}
    finally:
        stop.set()
        for worker in workers:
            worker.join()


def main(argv=None):
    args = build_parser().parse_args(argv)
    with one_line_errors():
        run(args)


def run(args):
    step_fns = steps(args.shape)
    default_threads = torch.get_num_threads()
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {datetime.date.today()}, "
          f"shape {'x'.join(map(str, args.shape))}, median of {args.steps} steps; slowdown = loaded / quiet")
    for threads in sorted({default_threads, 1}, reverse=True):
        quiet = measure(step_fns, threads, None, args.steps)
        print(flush=True)
        print(f"{threads} thread(s): quiet " + ", ".join(f"{name} {ms:.2f} ms" for name, ms in quiet.items()))
        print(f"{'load':<8}" + "".join(f"{name:>34}" for name in quiet))
        for load in LOADS:
            loaded = measure(step_fns, threads, load, args.steps)
            print(f"{load:<8}" + "".join(f"{loaded[name]:>20.2f} ms ({loaded[name] / quiet[name]:5.1f}x)"
                                          for name in quiet), flush=True)
    torch.set_num_threads(default_threads)


if __name__ == "__main__":
    main()
