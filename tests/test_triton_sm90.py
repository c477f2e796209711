"""Every Triton kernel compiled for sm_90 (H100/H200) on this machine, no GPU needed: the compiler's
type, shape and layout checks that the Triton interpreter skips, and for fused_code_ce no register
spills at the tile sizes the code picks (the cubin's resource usage, read with the cuobjdump that
ships with Triton). bench/device_check.sh runs the kernels themselves on a GPU."""
import os
import re
import subprocess
import tempfile

import pytest
import torch
import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget

from gif_kernels.triton import LAUNCH_OPTIONS, beam_search, code_ce

pytestmark = pytest.mark.skipif(
    not isinstance(code_ce._code_ce_fwd_kernel, triton.runtime.JITFunction),
    reason="the Triton interpreter (TRITON_INTERPRET=1) replaces the kernels")

SM90 = GPUTarget("cuda", 90, 32)
TL_TYPES = {torch.bfloat16: ("*bf16", tl.bfloat16), torch.float16: ("*fp16", tl.float16),
            torch.float32: ("*fp32", tl.float32)}
FLOAT_ARGS = ("scale", "cos_m", "sin_m", "m3", "fallback_shift")


def resource_usage(kernel, arg_types, constexprs, num_warps):
    """{REG, STACK, SHARED, LOCAL} of `kernel` compiled for sm_90; arguments not named in arg_types
    are int64 scalars."""
    signature = {name: "constexpr" if name in constexprs else
                 arg_types.get(name, "fp64" if name in FLOAT_ARGS else "i64") for name in kernel.arg_names}
    source = triton.compiler.ASTSource(
        fn=kernel, signature=signature,
        constexprs={(kernel.arg_names.index(name),): value for name, value in constexprs.items()})
    compiled = triton.compile(source, target=SM90, options=dict(num_warps=num_warps, **LAUNCH_OPTIONS))
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(compiled.asm["cubin"])
        cubin.flush()
        report = subprocess.run([cuobjdump, "--dump-resource-usage", cubin.name], capture_output=True, text=True,
                                check=True).stdout
    return {key: int(value) for key, value in re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", report)}


def code_ce_types(dtype):
    pointer, _ = TL_TYPES[dtype]
    types = {name: "*fp32" for name in ("position_weight_ptr", "loss_ptr", "lse_ptr", "grad_loss_ptr", "grad_f_ptr",
                                        "grad_w_ptr", "feat_cos_dot_ptr", "row_cos_dot_ptr", "parts_ptr",
                                        "cos_dot_parts_ptr")}
    return dict(types, x_ptr=pointer, w_ptr=pointer, vec_ptr=pointer, out_ptr=pointer, codes_ptr="*i64")


def code_ce_launches(B, V, D, dtype):
    """(kernel, constexprs, num_warps) of every fused_code_ce kernel, as code_ce_forward/backward pick them."""
    block_b, block_v, block_d, num_warps = code_ce._tile_sizes(B, V, D, dtype)
    common = dict(DOT_DTYPE=TL_TYPES[dtype][1], NORMALIZE=True)
    backward = dict(common, SPLIT_GRAD_COS=dtype != torch.float32)
    tiles = dict(BLOCK_B=block_b, BLOCK_V=block_v, BLOCK_D=block_d)
    features, weight = code_ce._deterministic_tile_sizes(B, V, D, dtype)
    yield code_ce._code_ce_fwd_kernel, dict(common, **tiles), num_warps
    yield code_ce._code_ce_bwd_atomic_kernel, dict(backward, **tiles), num_warps
    for kernel, meta in ((code_ce._code_ce_bwd_features_kernel, features),
                         (code_ce._code_ce_bwd_weight_kernel, weight)):
        meta = dict(meta)
        num_warps = meta.pop("num_warps")
        yield kernel, dict(backward, **meta), num_warps
    yield code_ce._finish_rows_kernel, dict(NORMALIZE=True, **code_ce._finish_block_sizes(D)), 4


# Bytes of stack (register spills) allowed: ptxas's allocator spills a word or two at times even well below
# the register limit; what slows a kernel is spilling its tiles (hundreds of bytes and more).
MAX_STACK = 16


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("B,V,D", [(512, 16, 512), (512, 256, 512), (8192, 32768, 512)])
def test_code_ce_kernels_compile_without_spills(B, V, D, dtype):
    for kernel, constexprs, num_warps in code_ce_launches(B, V, D, dtype):
        usage = resource_usage(kernel, code_ce_types(dtype), constexprs, num_warps)
        assert usage["LOCAL"] == 0 and usage["STACK"] <= MAX_STACK, f"{kernel.__name__} spills: {usage}"


@pytest.mark.parametrize("V,beam,topk", [(16, 32, 5), (4096, 8, 1), (16, 256, 10)])
def test_beam_search_kernel_compiles(V, beam, topk):
    types = dict(scores_ptr="*fp32", offsets_ptr="*i64", tokens_ptr="*i32", leaf_ids_ptr="*i64",
                 position_max_ptr="*fp32", ids_ptr="*i64", totals_ptr="*fp32", exact_ptr="*i1")
    usage = resource_usage(beam_search._beam_search_kernel, types, beam_search.block_sizes(V, beam, topk), 4)
    assert usage["REG"] > 0
