"""Builds gif_kernels._C: a CUDAExtension where torch has CUDA and a toolkit is found, else a CppExtension.

Environment: TORCH_CUDA_ARCH_LIST picks CUDA architectures (e.g. "9.0"); MAX_JOBS caps parallel
compile jobs (both read by torch.utils.cpp_extension); GIF_FORCE_CPU=1 builds the CPU extension only.
"""
import glob
import os
import re
import sys

import torch
from setuptools import setup
from torch.utils import cpp_extension


def cuda_archs():
    """Architectures nvcc will target, as torch.utils.cpp_extension chooses them ("8.0;9.0a")."""
    flags = " ".join(cpp_extension._get_cuda_arch_flags())
    return ";".join(sorted({f"{major}.{minor}{suffix}"
                            for major, minor, suffix in re.findall(r"code=sm_(\d+)(\d)(a?)", flags)}))


def extension():
    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp")) + ["python/bindings.cpp"]
    cuda_sources = sorted(glob.glob("csrc/cuda/*.cu") + glob.glob("csrc/cuda/*.cpp"))
    with_cuda = (torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None
                 and os.environ.get("GIF_FORCE_CPU", "0") != "1")
    openmp = [] if sys.platform == "darwin" else ["-fopenmp"]
    cxx = ["-O3", "-std=c++20"] + openmp
    if not with_cuda:
        return cpp_extension.CppExtension(
            "gif_kernels._C", sources, extra_compile_args={"cxx": cxx}, extra_link_args=openmp)
    archs = cuda_archs()
    defines = ["-DGIF_WITH_CUDA", f'-DGIF_CUDA_ARCHS="{archs}"']
    return cpp_extension.CUDAExtension(
        "gif_kernels._C", sources + cuda_sources,
        extra_compile_args={"cxx": cxx + defines,
                            "nvcc": ["-O3", "-std=c++20", "-lineinfo"] + defines},
        extra_link_args=openmp)


setup(
    ext_modules=[extension()],
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
)
