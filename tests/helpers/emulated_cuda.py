"""Builds the project's CUDA C++ sources as a CPU library that runs their kernels under the emulator of
tests/cuda_emulation/include/gif_emulated_cuda.h, and registers their ops as torch.ops.gif_emulated_cuda.*
(the CUDA functions themselves: input checks, host code and kernels, on CPU tensors)."""
import functools
import glob
import os
import re

import torch
from torch.utils import cpp_extension

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
INCLUDE = os.path.join(ROOT, "tests", "cuda_emulation", "include")
BUILD = os.path.join(ROOT, "build", "emulated_cuda")

# The constructs of a .cu file that C++ cannot parse or the emulator must see, and what it takes instead.
LAUNCH = re.compile(r"(\w+(?:<[^<>;]*>)?)\s*<<<(.*?)>>>\s*\(", re.S)
EXTERN_SHARED = re.compile(r"extern __shared__ (?:__align__\(\d+\) )?([\w ]+?) (\w+)\[\];")
STATIC_SHARED = re.compile(r"^(\s*)__shared__ ([^;]+);", re.M)
REGISTRATION = re.compile(r"TORCH_LIBRARY_IMPL\(gif, CUDA, m\)")


def static_shared(match):
    """`__shared__ T a[n], b;` as statics that each block starts poisoned (see poison_static_shared)."""
    declaration = match.group(2)
    names = [part.split()[-1] for part in re.sub(r"\[[^\]]*\]", "", declaration).split(",")]
    return f"{match.group(1)}static {declaration}; ::gif_emulated_cuda::poison_static_shared({', '.join(names)});"


def emulated_source(path):
    """The C++ text of one .cu file: launches through the emulator and, in a file that registers ops, its
    op functions defined (schemas inferred from their C++ types) in the gif_emulated_cuda library instead
    of implementing gif's on CUDA."""
    with open(path) as f:
        text = f.read()
    text, launches = LAUNCH.subn(r"::gif_emulated_cuda::launch(\1, \2)(", text)
    text = EXTERN_SHARED.sub(r"\1* \2 = ::gif_emulated_cuda::dynamic_shared<\1>();", text)
    text = STATIC_SHARED.sub(static_shared, text)
    parts = REGISTRATION.split(text)
    if "<<<" in text or len(parts) > 2 or (launches == 0 and len(parts) == 1):
        raise RuntimeError(f"{path}: expected kernel launches or one TORCH_LIBRARY_IMPL(gif, CUDA, m), "
                           "and no launch the emulator cannot parse")
    if len(parts) == 1:
        return text
    return parts[0] + "TORCH_LIBRARY_FRAGMENT(gif_emulated_cuda, m)" + parts[1].replace("m.impl(", "m.def(")


def write_if_changed(path, text):
    """Writes text to path unless path holds it already, so that ninja rebuilds only what changed."""
    if not os.path.exists(path) or open(path).read() != text:
        with open(path, "w") as f:
            f.write(text)
    return path


def build(name, sources, directory):
    """Compiles (ninja rebuilds what changed) and loads sources as the library name, the emulator
    force-included."""
    cpp_extension.load(
        name=name, sources=sources, build_directory=directory, is_python_module=False,
        extra_include_paths=[INCLUDE, os.path.join(ROOT, "csrc", "cuda")],
        # CUDA code reads arrays through uint4 for 16-byte loads: no strict-aliasing assumptions.
        extra_cflags=["-O2", "-std=c++20", "-fno-strict-aliasing", "-include",
                      os.path.join(INCLUDE, "gif_emulated_cuda.h")],
        verbose=False)


@functools.cache
def load():
    """Compiles (once) and loads the emulated CUDA library."""
    os.makedirs(BUILD, exist_ok=True)
    sources = []
    for path in sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu"))):
        target = os.path.join(BUILD, os.path.basename(path) + ".cpp")
        sources.append(write_if_changed(target, emulated_source(path)))
    # The host code the CUDA sources share with the CPU kernels (checks, the GEMM driver); not the CPU
    # kernels and their registrations.
    sources += sorted(glob.glob(os.path.join(ROOT, "csrc", "*.cpp")))
    sources.remove(os.path.join(ROOT, "csrc", "gif_ops.cpp"))
    build("gif_emulated_cuda", sources, BUILD)
    return torch.ops.gif_emulated_cuda


def load_test_kernel(name, source):
    """Compiles and loads a test's own .cu text (kernels and their TORCH_LIBRARY_IMPL(gif, CUDA, m)) as
    the library name: its ops join torch.ops.gif_emulated_cuda."""
    directory = os.path.join(BUILD, name)
    os.makedirs(directory, exist_ok=True)
    path = write_if_changed(os.path.join(directory, name + ".cu"), source)
    build(name, [write_if_changed(path + ".cpp", emulated_source(path))], directory)
    return torch.ops.gif_emulated_cuda
