"""The benchmark scripts of bench/ as modules. They import bench/harness.py from their own folder, as
they do when run, so that folder goes on sys.path."""
import functools
import importlib.util
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "bench"


@functools.cache
def bench_script(name: str):
    """bench/<name>.py, loaded once as module `name`."""
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module
