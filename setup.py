"""Builds gif_kernels._C: with the CUDA kernels (a CUDAExtension) or without (a CppExtension).

The CUDA kernels are built where torch has CUDA, a CUDA toolkit is found, and either a GPU is
visible or TORCH_CUDA_ARCH_LIST names the architectures to build for; otherwise the CPU extension,
with one line on stderr saying why and how to build the CUDA kernels anyway (`pip install -v`
shows it; gif_kernels.build_info() tells afterwards what was built). Environment:

- TORCH_CUDA_ARCH_LIST: CUDA architectures, e.g. "9.0" or "8.0;9.0" (default: the visible GPUs').
- CUDA_HOME (or CUDA_PATH): the toolkit's root; default: the root that nvcc on PATH reports for
  itself (which sees through wrapper scripts and links), else /usr/local/cuda.
- MAX_JOBS: parallel compile jobs (read by torch.utils.cpp_extension).
- GIF_FORCE_CPU=1: the CPU extension only.

Importing this file (as the tests do) builds nothing: setup() runs only as a script, which is how
pip's build backend runs it too.
"""
import glob
import os
import re
import shutil
import subprocess
import sys

import torch
from torch.utils import cpp_extension

# Where toolkits keep libcudart, relative to their root (Linux x86-64 / aarch64 layouts).
CUDA_LIBRARY_DIRS = ("lib64", "lib", "targets/x86_64-linux/lib", "targets/sbsa-linux/lib")


def nvcc_root(nvcc: str) -> str | None:
    """The toolkit root that nvcc reports for itself (`nvcc --dryrun` prints TOP=<root>), or None."""
    try:
        listing = subprocess.run([nvcc, "--dryrun", "-E", "-x", "cu", os.devnull], capture_output=True,
                                 text=True, timeout=60).stderr
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r"^#\$ TOP=(.+)$", listing, re.MULTILINE)
    return os.path.realpath(match.group(1).strip()) if match else None


def find_cuda_toolkit(environ) -> tuple[str | None, str]:
    """(toolkit root or None, where it came from)."""
    for variable in ("CUDA_HOME", "CUDA_PATH"):
        if environ.get(variable):
            return environ[variable], variable
    nvcc = shutil.which("nvcc", path=environ.get("PATH"))
    if nvcc is not None:
        return nvcc_root(nvcc) or os.path.dirname(os.path.dirname(nvcc)), f"nvcc at {nvcc}"
    if os.path.isdir("/usr/local/cuda"):
        return "/usr/local/cuda", "the default location"
    return None, "no CUDA_HOME, no nvcc on PATH, no /usr/local/cuda"


def cuda_library_dir(root: str) -> str | None:
    """The toolkit's folder holding libcudart.so, or None."""
    for relative in CUDA_LIBRARY_DIRS:
        if glob.glob(os.path.join(root, relative, "libcudart.so*")):
            return os.path.join(root, relative)
    return None


def choose_build(environ, torch_cuda: str | None, gpu_count: int) -> tuple[str | None, str]:
    """(toolkit root for a CUDA build, or None for the CPU build; the one line that says why)."""
    if environ.get("GIF_FORCE_CPU", "0") == "1":
        return None, "gif-kernels: GIF_FORCE_CPU=1: building the CPU extension only"
    if torch_cuda is None:
        return None, f"gif-kernels: torch {torch.__version__} has no CUDA: building the CPU extension"
    root, origin = find_cuda_toolkit(environ)
    if root is None:
        return None, (f"gif-kernels: no CUDA toolkit found ({origin}): building the CPU extension; "
                      "set CUDA_HOME to build the CUDA kernels")
    arch_list = environ.get("TORCH_CUDA_ARCH_LIST")
    if gpu_count == 0 and not arch_list:
        return None, (f"gif-kernels: CUDA toolkit at {root} but no GPU visible: building the CPU extension; "
                      "set TORCH_CUDA_ARCH_LIST (e.g. 9.0) to build the CUDA kernels anyway")
    if cuda_library_dir(root) is None:
        raise SystemExit(f"error: CUDA_HOME: the CUDA toolkit at {root} (from {origin}) has no libcudart.so "
                         f"under {', '.join(CUDA_LIBRARY_DIRS)}; set CUDA_HOME to the toolkit's root, or "
                         "GIF_FORCE_CPU=1 for the CPU extension")
    archs = arch_list or "those of the visible GPUs"
    return root, f"gif-kernels: building the CUDA kernels for {archs} with the CUDA toolkit at {root} (from {origin})"


def cuda_archs():
    """Architectures nvcc will target, as torch.utils.cpp_extension chooses them ("8.0;9.0a")."""
    flags = " ".join(cpp_extension._get_cuda_arch_flags())
    return ";".join(sorted({f"{major}.{minor}{suffix}"
                            for major, minor, suffix in re.findall(r"code=sm_(\d+)(\d)(a?)", flags)}))


def extension():
    """(the extension to build, the line saying which and why), as the environment says."""
    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp")) + ["python/bindings.cpp"]
    cuda_sources = sorted(glob.glob("csrc/cuda/*.cu") + glob.glob("csrc/cuda/*.cpp"))
    gpu_count = torch.cuda.device_count() if torch.version.cuda is not None else 0
    toolkit, reason = choose_build(os.environ, torch.version.cuda, gpu_count)
    openmp = [] if sys.platform == "darwin" else ["-fopenmp"]
    cxx = ["-O3", "-std=c++20"] + openmp
    if toolkit is None:
        return cpp_extension.CppExtension(
            "gif_kernels._C", sources, extra_compile_args={"cxx": cxx}, extra_link_args=openmp), reason
    # torch.utils.cpp_extension finds nvcc, headers and libraries through its CUDA_HOME, guessed at
    # import as nvcc's grandparent folder: wrong for a wrapper script such as /usr/local/bin/nvcc.
    cpp_extension.CUDA_HOME = toolkit
    os.environ["CUDA_HOME"] = toolkit
    archs = cuda_archs()
    defines = ["-DGIF_WITH_CUDA", f'-DGIF_CUDA_ARCHS="{archs}"']
    return cpp_extension.CUDAExtension(
        "gif_kernels._C", sources + cuda_sources,
        library_dirs=[cuda_library_dir(toolkit)],
        extra_compile_args={"cxx": cxx + defines,
                            "nvcc": ["-O3", "-std=c++20", "-lineinfo"] + defines},
        extra_link_args=openmp), reason


class BuildExtension(cpp_extension.BuildExtension):
    """torch's build_ext, first saying which extension it builds and why (once per build, where
    setup.py itself runs once per build-backend hook)."""

    reason = ""

    def run(self):
        print(self.reason, file=sys.stderr, flush=True)
        super().run()


if __name__ == "__main__":
    from setuptools import setup

    ext, BuildExtension.reason = extension()
    setup(ext_modules=[ext], cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)})
