"""A reference-trainer run small enough for a few seconds on two CPU cores, and how tests launch one."""
import os
import sys

# Tests add --out and what they vary.
TINY = ["--data", "synthetic", "--ids", "6", "--images-per-id", "4", "--holdout-per-id", "2", "--verify-ids", "3",
        "--image-size", "16", "--backbone", "cnn", "--embedding-dim", "16", "--vocab", "3", "--batch-size", "8",
        "--steps", "6", "--checkpoint-every", "2", "--log-every", "1"]


def command(*args):
    """The trainer's command line with `args`."""
    return [sys.executable, "-m", "gif_kernels.train", *args]


def environment():
    """The environment of a launched run: one thread per process, as two cores hold several."""
    return {**os.environ, "OMP_NUM_THREADS": "1"}
