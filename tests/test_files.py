"""atomic_write, behind every file the package writes (CodeBook, checkpoints, metrics.json): the
file appears whole or not at all, also when the writer is killed at any moment (and a run so killed
resumes); a failed write leaves the previous one and no temporary; the file and its rename are
synced to the disk."""
import os
import random
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from gif_kernels import CodeBook
from gif_kernels.files import atomic_write
from gif_kernels.train import checkpoint
from gif_kernels.train.trainer import parse_run, train
from tests.helpers.trainer_runs import TINY, environment


def test_a_write_replaces_the_file_whole(tmp_path):
    path = tmp_path / "f.json"
    path.write_text("old")
    with atomic_write(path) as tmp:
        with open(tmp, "w") as f:
            f.write("new")
        assert path.read_text() == "old"  # readers see the previous file until the block ends
    assert path.read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["f.json"]


def test_a_failed_write_keeps_the_previous_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "f.json"
    path.write_text("old")
    with pytest.raises(RuntimeError, match="disk full"):
        with atomic_write(path) as tmp:
            with open(tmp, "w") as f:
                f.write("half")
            raise RuntimeError("disk full")
    assert path.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["f.json"]


def test_a_stale_temporary_of_a_killed_write_is_overwritten(tmp_path):
    path = tmp_path / "f.json"
    (tmp_path / "f.json.tmp").write_text("the longer half of a killed write")
    with atomic_write(path) as tmp:
        with open(tmp, "w") as f:
            f.write("new")
    assert path.read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["f.json"]


def inode(path):
    stat = os.stat(path)
    return stat.st_dev, stat.st_ino


def test_a_write_syncs_the_file_before_the_rename_and_then_the_directory(tmp_path, monkeypatch):
    path = tmp_path / "f.json"
    path.write_text("old")
    synced, fsync = [], os.fsync

    def record(fd):  # what was synced, and what `path` held then
        stat = os.fstat(fd)
        synced.append(((stat.st_dev, stat.st_ino), path.read_text()))
        fsync(fd)
    monkeypatch.setattr(os, "fsync", record)
    with atomic_write(path) as tmp:
        with open(tmp, "w") as f:
            f.write("new")
    assert synced == [(inode(path), "old"), (inode(tmp_path), "new")]


def codebook_versions():
    """Two different code tables of 100k identities (1.2 MB files: a write takes milliseconds)."""
    ids = torch.randperm(256**3, generator=torch.Generator().manual_seed(0))[:100_000]
    codes = torch.stack([ids // 256**2, ids // 256 % 256, ids % 256], dim=1)
    return codes, codes.flip(0)


def checkpoint_version(step, versions):
    """The saved state written as checkpoint `step`: the tiny run's two checkpoints in turn."""
    return versions[step % 2]


def same_state(loaded, expected):
    return loaded.keys() == expected.keys() and all(
        torch.equal(value, expected[key]) if isinstance(value, torch.Tensor) else value == expected[key]
        for key, value in loaded.items())


def serve_writers(out):
    """Child process of the crash test: for each kind read from stdin, forks a writer that writes
    that kind's versions in turn until killed, printing its pid once a first write is complete;
    prints "reaped" once it is gone. Forked, so that a writer starts with torch already imported."""
    codebooks = [CodeBook(codes, 256) for codes in codebook_versions()]
    states = [checkpoint.load(path) for _, path in checkpoint.checkpoints(out)]
    for kind in sys.stdin:
        pid = os.fork()
        if pid == 0:
            try:
                for written in range(sys.maxsize):
                    if kind.strip() == "codebook":
                        codebooks[written % 2].save(out / "codebook.safetensors")
                    else:
                        step = checkpoint.checkpoints(out)[-1][0] + 1
                        saved = checkpoint_version(step, states)
                        # checkpoint.save asks the model and optimizer only for their state_dict
                        model = SimpleNamespace(state_dict=lambda: saved["model"])
                        optimizer = SimpleNamespace(state_dict=lambda: saved["optimizer"])
                        checkpoint.save(out, step, model, optimizer, saved["run"], saved["stats"])
                    if written == 0:
                        print(os.getpid(), flush=True)
            except BaseException:
                traceback.print_exc()
            finally:
                os._exit(1)
        os.waitpid(pid, 0)
        print("reaped", flush=True)


def test_writers_killed_at_random_moments_leave_whole_files_and_a_run_that_resumes(tmp_path):
    out = tmp_path / "run"
    train(parse_run([*TINY, "--out", str(out)]))  # checkpoints 4 and 6, the versions rewritten below
    states = [checkpoint.load(path) for _, path in checkpoint.checkpoints(out)]
    codes = codebook_versions()
    server = subprocess.Popen([sys.executable, "-c", f"from tests.test_files import serve_writers; "
                               f"from pathlib import Path; serve_writers(Path({str(out)!r}))"],
                              cwd=Path(__file__).parents[1], env=environment(), text=True,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    delays, torn, writer = random.Random(0), {"codebook": 0, "checkpoint": 0}, None
    try:
        for kill in range(60):  # 30 of each kind
            kind = ["codebook", "checkpoint"][kill % 2]
            server.stdin.write(kind + "\n")
            server.stdin.flush()
            writer = int(server.stdout.readline())
            time.sleep(delays.uniform(0, 0.05))
            os.kill(writer, signal.SIGKILL)
            assert server.stdout.readline() == "reaped\n"
            writer = None
            if kind == "codebook":
                path = out / "codebook.safetensors"
                loaded = CodeBook.load(path).codes
                assert any(torch.equal(loaded, version) for version in codes), kill
                temporary = Path(f"{path}.tmp")
            else:
                step, path = checkpoint.checkpoints(out)[-1]
                loaded = checkpoint.load(path)
                expected = checkpoint_version(step, states)["model"]
                assert loaded["step"] == step and same_state(loaded["model"], expected), kill
                temporary = out / f"checkpoint-{step + 1}.safetensors.tmp"
            # The first complete write consumed any temporary left before: one now is the killed write's.
            torn[kind] += temporary.exists()
    finally:
        if writer is not None:  # else it would write on after the test
            os.kill(writer, signal.SIGKILL)
        server.kill()
        server.wait()
    assert any(torn.values()), "no kill landed inside atomic_write: kill sooner after the first write"
    # Nothing else is left behind: only atomic_write's own temporaries, which the next write replaces.
    written = ("codebook.safetensors", "codes.safetensors", "identity_vectors.npy", "log.csv", "metrics.json")
    stray = [p.name for p in out.iterdir() if p.is_file() and not p.name.endswith(".tmp")
             and p.name not in written and not checkpoint.FILE_PATTERN.fullmatch(p.name)]
    assert stray == [], stray
    newest = checkpoint.checkpoints(out)[-1][0]
    metrics = train(parse_run([*TINY, "--steps", str(newest + 1), "--out", str(out), "--resume"]))
    assert metrics["steps"] == newest + 1 and checkpoint.load_latest(out)["step"] == newest + 1
