"""Writing a file so that no reader, and no kill or machine crash mid-write, ever leaves half of it."""
import contextlib
import os
from pathlib import Path

from safetensors.torch import save


@contextlib.contextmanager
def atomic_write(path):
    """Yields a temporary path beside `path` to write the whole file to; on leaving the block the
    file is renamed onto `path` in one step (the previous file, if any, stays until then), or, if
    the block raised, removed. A stale temporary of a killed write is overwritten."""
    path = os.fspath(path)
    tmp = f"{path}.tmp"
    try:
        yield tmp
        # The contents reach the disk before the rename does: else a machine crash can keep the
        # rename and lose the data, leaving an empty or partial file under the name.
        with open(tmp, "r+b") as f:  # writable, as Windows flushes only handles opened for writing
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_directory(os.path.dirname(os.path.abspath(path)))


def _fsync_directory(directory):
    """Makes the rename survive a machine crash: it lives in the directory's entries."""
    if os.name == "nt":  # Windows cannot open a directory to sync it: there the file system alone decides
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_safetensors(path, tensors: dict, metadata: dict):
    """Write tensors and metadata as a safetensors file through atomic_write. The bytes are
    serialized here and written to atomic_write's temporary: safetensors' save_file would write a
    randomly named temporary of its own, which a kill mid-write leaves behind."""
    data = save(tensors, metadata=metadata)
    with atomic_write(path) as tmp:
        Path(tmp).write_bytes(data)
