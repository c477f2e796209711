"""setup.py's choice between the CUDA and the CPU extension, with torch, the toolkit and the GPUs
faked: a CUDA build of torch on a machine with a toolkit but no GPU builds the CPU extension unless
TORCH_CUDA_ARCH_LIST is given, and a CUDA build finds the toolkit through nvcc's own report."""
import importlib.util
import os
import shutil
import stat
from pathlib import Path

import pytest
import torch
from torch.utils import cpp_extension

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("gif_setup", ROOT / "setup.py")
gif_setup = importlib.util.module_from_spec(spec)
spec.loader.exec_module(gif_setup)  # defines the functions; setup() runs only as a script


def fake_toolkit(tmp_path, with_libraries=True):
    """A toolkit under tmp_path/cuda-13.0 whose nvcc is reached through a wrapper script in
    tmp_path/bin, as /usr/local/bin/nvcc is on some machines. Returns (root, PATH)."""
    root = tmp_path / "cuda-13.0"
    (root / "bin").mkdir(parents=True)
    (root / "include").mkdir()
    if with_libraries:
        (root / "lib64").mkdir()
        (root / "lib64" / "libcudart.so").write_bytes(b"")
    nvcc = root / "bin" / "nvcc"
    nvcc.write_text(f"#!/bin/sh\necho '#$ _HERE_={root}/bin' >&2\necho '#$ TOP={root}/bin/..' >&2\n")
    wrapper = tmp_path / "bin" / "nvcc"
    wrapper.parent.mkdir()
    wrapper.write_text(f"#!/bin/sh\nexec {nvcc} \"$@\"\n")
    for script in (nvcc, wrapper):
        script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return root, f"{wrapper.parent}{os.pathsep}/usr/bin{os.pathsep}/bin"


@pytest.fixture
def cuda_torch_without_gpu(monkeypatch):
    """torch looks like a CUDA build that sees no GPU; setup.py's changes to CUDA_HOME are undone."""
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    monkeypatch.setattr(cpp_extension, "CUDA_HOME", cpp_extension.CUDA_HOME)
    for variable in ("CUDA_HOME", "CUDA_PATH", "TORCH_CUDA_ARCH_LIST", "GIF_FORCE_CPU"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.chdir(ROOT)


def test_cuda_torch_and_toolkit_without_a_gpu_build_the_cpu_extension(tmp_path, monkeypatch, cuda_torch_without_gpu):
    root, path = fake_toolkit(tmp_path)
    monkeypatch.setenv("PATH", path)
    ext, reason = gif_setup.extension()
    assert not any(source.endswith(".cu") for source in ext.sources)
    assert "-DGIF_WITH_CUDA" not in ext.extra_compile_args["cxx"]
    assert reason == (f"gif-kernels: CUDA toolkit at {root} but no GPU visible: building the CPU extension; "
                      "set TORCH_CUDA_ARCH_LIST (e.g. 9.0) to build the CUDA kernels anyway")


def test_an_arch_list_builds_the_cuda_kernels_against_the_toolkit_behind_a_wrapper(tmp_path, monkeypatch,
                                                                                   cuda_torch_without_gpu):
    root, path = fake_toolkit(tmp_path)
    monkeypatch.setenv("PATH", path)
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "9.0")
    ext, reason = gif_setup.extension()
    assert any(source.endswith(".cu") for source in ext.sources)
    assert str(root / "lib64") in ext.library_dirs and "cudart" in ext.libraries
    assert '-DGIF_CUDA_ARCHS="9.0"' in ext.extra_compile_args["nvcc"]
    assert cpp_extension.CUDA_HOME == str(root)  # not the wrapper's grandparent folder
    assert reason == (f"gif-kernels: building the CUDA kernels for 9.0 with the CUDA toolkit at {root} "
                      f"(from nvcc at {tmp_path / 'bin' / 'nvcc'})")


def test_cuda_home_wins_and_a_toolkit_without_libraries_is_named(tmp_path, cuda_torch_without_gpu):
    root, path = fake_toolkit(tmp_path, with_libraries=False)
    other = tmp_path / "other"
    (other / "lib").mkdir(parents=True)
    (other / "lib" / "libcudart.so.13").write_bytes(b"")
    assert gif_setup.choose_build({"PATH": path, "CUDA_HOME": str(other), "TORCH_CUDA_ARCH_LIST": "9.0"},
                                  "13.0", 0)[0] == str(other)
    with pytest.raises(SystemExit, match=rf"error: CUDA_HOME: the CUDA toolkit at {root} .* has no libcudart.so"):
        gif_setup.choose_build({"PATH": path, "TORCH_CUDA_ARCH_LIST": "9.0"}, "13.0", 0)


def test_a_visible_gpu_needs_no_arch_list(tmp_path, cuda_torch_without_gpu):
    root, path = fake_toolkit(tmp_path)
    assert gif_setup.choose_build({"PATH": path}, "13.0", 1)[0] == str(root)


@pytest.mark.parametrize("environ,torch_cuda,words", [
    ({"GIF_FORCE_CPU": "1"}, "13.0", "GIF_FORCE_CPU=1"),
    ({}, None, "has no CUDA"),
    ({"PATH": "/nonexistent"}, "13.0", "no CUDA toolkit found"),
])
def test_cpu_builds_say_why(tmp_path, monkeypatch, environ, torch_cuda, words):
    isdir = os.path.isdir
    monkeypatch.setattr(os.path, "isdir", lambda path: path != "/usr/local/cuda" and isdir(path))
    toolkit, reason = gif_setup.choose_build(environ, torch_cuda, 1)
    assert toolkit is None and words in reason


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="no nvcc on PATH")
def test_the_real_nvcc_reports_its_toolkit():
    root = gif_setup.nvcc_root(shutil.which("nvcc"))
    assert root is not None and (Path(root) / "bin" / "nvcc").exists()
