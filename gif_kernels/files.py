"""Writing a file so that no reader, and no crash or kill mid-write, ever leaves half of it."""
import contextlib
import os


@contextlib.contextmanager
def atomic_write(path):
    """Yields a temporary path beside `path` to write the whole file to; on leaving the block the
    file is renamed onto `path` in one step (the previous file, if any, stays until then), or, if
    the block raised, removed."""
    path = os.fspath(path)
    tmp = f"{path}.tmp"
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
