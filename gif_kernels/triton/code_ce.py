"""Fused cosine-softmax cross-entropy of a multi-position code head, with CosFace/ArcFace margins.

loss[b, j] = position_weight_j * (logsumexp_v logit[b, j, v] - logit[b, j, codes[b, j]]). The (B, L, V)
logits are never stored: the forward keeps an online logsumexp over V tiles; the backward recomputes each
tile from the saved lse (as Cut Cross-Entropy does): by default in one kernel that adds the gradients with
atomics; deterministic, in two kernels, one summing over codes for grad_x and one over samples for
grad_weight, whose partial sums are added in a fixed order, so that gradients are bitwise reproducible.

One file past 500 lines: the forward and the three backward kernels share the tile helpers (cosines,
logits, dLoss/dcos), which only this file uses.
"""
import math

import torch
import triton
import triton.language as tl

from ..constants import NORM_EPS, SIN_EPS
from . import LAUNCH_OPTIONS

_NORM_EPS = tl.constexpr(NORM_EPS)
_SIN_EPS = tl.constexpr(SIN_EPS)
_NEG_INF = tl.constexpr(float("-inf"))


@triton.jit
def _sqrt_rn(x):
    """Correctly rounded sqrt: the GPU's tl.sqrt is approximate in float32 (float64's is exact)."""
    if x.dtype == tl.float32:
        return tl.sqrt_rn(x)
    return tl.sqrt(x)


@triton.jit
def _div_rn(x, y):
    """Correctly rounded division: float32's '/' is approximate on the GPU (float64's is exact)."""
    if x.dtype == tl.float32:
        return tl.div_rn(x, y)
    return x / y


@triton.jit
def _cosine_tile(f_row_ptrs, w_row_ptrs, b_mask, v_mask, D, stride_xd, stride_wd, acc_dtype: tl.constexpr,
                 DOT_DTYPE: tl.constexpr, NORMALIZE: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_V: tl.constexpr,
                 BLOCK_D: tl.constexpr):
    """(BLOCK_B, BLOCK_V) cosines f.w / (||f|| ||w||) and the norms; plain dots and ones if not NORMALIZE."""
    dots = tl.zeros((BLOCK_B, BLOCK_V), dtype=acc_dtype)
    f_sq = tl.zeros((BLOCK_B,), dtype=acc_dtype)
    w_sq = tl.zeros((BLOCK_V,), dtype=acc_dtype)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D).to(tl.int64)
        d_mask = offs_d < D
        f = tl.load(f_row_ptrs[:, None] + offs_d[None, :] * stride_xd,
                    mask=b_mask[:, None] & d_mask[None, :], other=0.0)
        w_t = tl.load(w_row_ptrs[None, :] + offs_d[:, None] * stride_wd,
                      mask=d_mask[:, None] & v_mask[None, :], other=0.0)
        dots += tl.dot(f.to(DOT_DTYPE), w_t.to(DOT_DTYPE), input_precision="ieee")
        if NORMALIZE:  # the norms ride along the dot's D loop: no normalized copies
            f_wide = f.to(acc_dtype)
            w_wide = w_t.to(acc_dtype)
            f_sq += tl.sum(f_wide * f_wide, axis=1)
            w_sq += tl.sum(w_wide * w_wide, axis=0)
    if NORMALIZE:
        # Correctly rounded sqrt and one correctly rounded division (not two reciprocals): parallel
        # vectors then give exactly +-1, where ArcFace's sqrt(1 - c^2) is ill-conditioned.
        nx = tl.maximum(_sqrt_rn(f_sq), _NORM_EPS)
        nw = tl.maximum(_sqrt_rn(w_sq), _NORM_EPS)
        return _div_rn(dots, nx[:, None] * nw[None, :]), nx, nw
    return dots, tl.full((BLOCK_B,), 1.0, acc_dtype), tl.full((BLOCK_V,), 1.0, acc_dtype)


@triton.jit
def _logit_tile(cos, is_target, v_mask, scale, cos_m, sin_m, m3, fallback_shift):
    """Logits scale * cos, with the margin on the target column and -inf past V, and d logit / d cos."""
    # Float arguments arrive as fp64 (exact for float64 inputs); compute in the tile's dtype.
    scale = tl.full((), scale, cos.dtype)
    cos_m = tl.full((), cos_m, cos.dtype)
    sin_m = tl.full((), sin_m, cos.dtype)
    m3 = tl.full((), m3, cos.dtype)
    fallback_shift = tl.full((), fallback_shift, cos.dtype)
    c_t = tl.sum(tl.where(is_target, cos, 0.0), axis=1)  # 0 when the target is in another tile
    sin_sq = 1.0 - c_t * c_t
    sin_t = tl.sqrt(tl.maximum(sin_sq, _SIN_EPS))
    in_arc = c_t >= -cos_m
    phi = tl.where(in_arc, c_t * cos_m - sin_t * sin_m, c_t - fallback_shift)
    # Where the sin clamp is active it has zero gradient.
    dphi = tl.where(in_arc, cos_m + tl.where(sin_sq > _SIN_EPS, sin_m * c_t / sin_t, 0.0), 1.0)
    logits = tl.where(is_target, scale * (phi - m3)[:, None], scale * cos)
    logits = tl.where(v_mask[None, :], logits, _NEG_INF)
    slope = tl.where(is_target, dphi[:, None], 1.0) * scale
    return logits, slope


@triton.jit
def _code_ce_fwd_kernel(x_ptr, w_ptr, codes_ptr, position_weight_ptr, loss_ptr, lse_ptr,
                        B, L, V, D, stride_xb, stride_xl, stride_xd, stride_wl, stride_wv, stride_wd,
                        scale: tl.float64, cos_m: tl.float64, sin_m: tl.float64, m3: tl.float64,
                        fallback_shift: tl.float64, ignore_index,
                        DOT_DTYPE: tl.constexpr, NORMALIZE: tl.constexpr, BLOCK_B: tl.constexpr,
                        BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr):
    """One program per (BLOCK_B samples, position j): loss and lse of those rows."""
    acc_dtype = lse_ptr.dtype.element_ty
    j = tl.program_id(1).to(tl.int64)
    offs_b = tl.program_id(0).to(tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B).to(tl.int64)
    b_mask = offs_b < B
    rows = offs_b * L + j  # codes, loss and lse are contiguous (B, L)
    target = tl.load(codes_ptr + rows, mask=b_mask, other=ignore_index).to(tl.int64)
    # An ignored row has no target column, also when ignore_index is a token in [0, V): its lse is that of
    # the plain logits, as the C++ kernels give.
    ignored = target == ignore_index
    target = tl.where(ignored, -1, target)
    f_row_ptrs = x_ptr + offs_b * stride_xb + j * stride_xl
    row_max = tl.full((BLOCK_B,), _NEG_INF, acc_dtype)
    other_sum = tl.zeros((BLOCK_B,), dtype=acc_dtype)  # sum of exp(logit - row_max) over non-target columns
    target_logit = tl.zeros((BLOCK_B,), dtype=acc_dtype)
    for v0 in range(0, V, BLOCK_V):
        offs_v = v0 + tl.arange(0, BLOCK_V).to(tl.int64)
        v_mask = offs_v < V
        w_row_ptrs = w_ptr + j * stride_wl + offs_v * stride_wv
        cos, _, _ = _cosine_tile(f_row_ptrs, w_row_ptrs, b_mask, v_mask, D, stride_xd, stride_wd,
                                 acc_dtype, DOT_DTYPE, NORMALIZE, BLOCK_B, BLOCK_V, BLOCK_D)
        is_target = offs_v[None, :] == target[:, None]
        logits, _ = _logit_tile(cos, is_target, v_mask, scale, cos_m, sin_m, m3, fallback_shift)
        target_logit += tl.sum(tl.where(is_target, logits, 0.0), axis=1)
        # Online logsumexp; the first tile always has a finite column, so row_max is finite after it.
        new_max = tl.maximum(row_max, tl.max(logits, axis=1))
        other = tl.where(is_target, 0.0, tl.exp(logits - new_max[:, None]))
        other_sum = other_sum * tl.exp(row_max - new_max) + tl.sum(other, axis=1)
        row_max = new_max
    # The target's term is kept apart so that a small loss is not lost to cancellation in lse - target_logit:
    # loss = (row_max - target_logit) + log1p(z), z = exp(target_logit - row_max) - 1 + other_sum >= 0.
    in_range = (target >= 0) & (target < V)
    target_term = tl.where(in_range, tl.exp(target_logit - row_max), 0.0)
    lse = row_max + tl.log(target_term + other_sum)
    z = (target_term - 1.0) + other_sum
    u = 1.0 + z
    u_minus_1 = u - 1.0  # log1p(z) = log(u) * z / (u - 1) corrects the rounding of 1 + z
    log1p_z = tl.where(u_minus_1 == 0.0, z, tl.log(u) * (z / tl.where(u_minus_1 == 0.0, 1.0, u_minus_1)))
    position_weight = tl.load(position_weight_ptr + j)
    loss = position_weight * ((row_max - target_logit) + log1p_z)
    # A bad code shows as NaN (0 / 0: a NaN global would fail Triton's check, NaN != NaN, that globals
    # are unchanged since compilation).
    loss = tl.where(in_range, loss, tl.zeros_like(loss) / tl.zeros_like(loss))
    loss = tl.where(ignored, 0.0, loss)
    tl.store(loss_ptr + rows, loss, mask=b_mask)
    tl.store(lse_ptr + rows, lse, mask=b_mask)


@triton.jit
def _grad_cos_tile(x_ptr, w_ptr, codes_ptr, position_weight_ptr, grad_loss_ptr, lse_ptr, offs_b, offs_v, j,
                   B, L, V, D, stride_xb, stride_xl, stride_xd, stride_wl, stride_wv, stride_wd,
                   scale, cos_m, sin_m, m3, fallback_shift, ignore_index,
                   DOT_DTYPE: tl.constexpr, NORMALIZE: tl.constexpr, BLOCK_B: tl.constexpr,
                   BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr):
    """dloss/dcos of the (BLOCK_B samples, BLOCK_V codes) tile of position j, recomputed from the saved lse
    (Cut Cross-Entropy's way); with the cosines and the norms ||f||, ||w|| of the tile."""
    acc_dtype = lse_ptr.dtype.element_ty
    b_mask = offs_b < B
    v_mask = offs_v < V
    rows = offs_b * L + j  # codes, grad_loss and lse are contiguous (B, L)
    target = tl.load(codes_ptr + rows, mask=b_mask, other=ignore_index).to(tl.int64)
    active = b_mask & (target != ignore_index) & (target >= 0) & (target < V)
    grad_row = tl.load(grad_loss_ptr + rows, mask=b_mask, other=0.0) * tl.load(position_weight_ptr + j)
    lse = tl.load(lse_ptr + rows, mask=b_mask, other=0.0)
    cos, nx, nw = _cosine_tile(x_ptr + offs_b * stride_xb + j * stride_xl, w_ptr + j * stride_wl + offs_v * stride_wv,
                               b_mask, v_mask, D, stride_xd, stride_wd, acc_dtype, DOT_DTYPE, NORMALIZE,
                               BLOCK_B, BLOCK_V, BLOCK_D)
    is_target = offs_v[None, :] == target[:, None]
    logits, slope = _logit_tile(cos, is_target, v_mask, scale, cos_m, sin_m, m3, fallback_shift)
    probs = tl.exp(logits - lse[:, None])
    # where, not a product: inactive rows (ignored, bad code, past B) must give exact zeros, even from NaN/inf.
    grad_cos = tl.where(active[:, None], grad_row[:, None] * (probs - is_target.to(acc_dtype)) * slope, 0.0)
    return grad_cos, cos, nx, nw


@triton.jit
def _accumulate_dot(acc, a, b, in_dtype: tl.constexpr, DOT_DTYPE: tl.constexpr, SPLIT: tl.constexpr):
    """acc + a @ b, with the accumulation-dtype a sent in the input dtype (tensor cores for bf16/fp16). grad_cos
    holds terms of size `scale` that cancel down to O(1), so one 16-bit rounding of it costs ~1% of the
    gradient: SPLIT sends it as hi + lo, two 16-bit values (a second dot), and the error drops to ~1e-4."""
    a_hi = a.to(in_dtype)
    if SPLIT:
        a_lo = (a - a_hi.to(a.dtype)).to(in_dtype).to(DOT_DTYPE)
        acc = tl.dot(a_lo, b, acc, input_precision="ieee")
    return tl.dot(a_hi.to(DOT_DTYPE), b, acc, input_precision="ieee")


@triton.jit
def _code_ce_bwd_atomic_kernel(x_ptr, w_ptr, codes_ptr, position_weight_ptr, grad_loss_ptr, lse_ptr,
                               grad_f_ptr, grad_w_ptr, feat_cos_dot_ptr, row_cos_dot_ptr,
                               B, L, V, D, stride_xb, stride_xl, stride_xd, stride_wl, stride_wv, stride_wd,
                               rows_per_sample,
                               scale: tl.float64, cos_m: tl.float64, sin_m: tl.float64, m3: tl.float64,
                               fallback_shift: tl.float64, ignore_index,
                               DOT_DTYPE: tl.constexpr, SPLIT_GRAD_COS: tl.constexpr, NORMALIZE: tl.constexpr,
                               BLOCK_B: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr):
    """The default backward, one program per (BLOCK_B samples, BLOCK_V codes, position j): each cosine tile is
    recomputed once, and its gradients are added with atomics (so the order of the sums varies run to run):
    grad_f[f_row] += (grad_cos / ||w||) @ W, grad_w[j, v] += (grad_cos / ||f||)^T @ F, and (NORMALIZE)
    feat_cos_dot[f_row] += sum_v grad_cos * cos, row_cos_dot[j, v] += sum_b grad_cos * cos.
    f_row = b * L + j for 3-D x (rows_per_sample = L), b for shared 2-D x (rows_per_sample = 1)."""
    acc_dtype = lse_ptr.dtype.element_ty
    in_dtype = x_ptr.dtype.element_ty
    j = tl.program_id(2).to(tl.int64)
    offs_b = tl.program_id(0).to(tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B).to(tl.int64)
    offs_v = tl.program_id(1).to(tl.int64) * BLOCK_V + tl.arange(0, BLOCK_V).to(tl.int64)
    b_mask = offs_b < B
    v_mask = offs_v < V
    grad_cos, cos, nx, nw = _grad_cos_tile(
        x_ptr, w_ptr, codes_ptr, position_weight_ptr, grad_loss_ptr, lse_ptr, offs_b, offs_v, j,
        B, L, V, D, stride_xb, stride_xl, stride_xd, stride_wl, stride_wv, stride_wd,
        scale, cos_m, sin_m, m3, fallback_shift, ignore_index, DOT_DTYPE, NORMALIZE, BLOCK_B, BLOCK_V, BLOCK_D)
    f_rows = offs_b * rows_per_sample + j * (rows_per_sample // L)  # 3-D x: + j; shared x (1 row): + 0
    w_rows = j * V + offs_v
    if NORMALIZE:
        grad_cos_times_cos = grad_cos * cos
        tl.atomic_add(feat_cos_dot_ptr + f_rows, tl.sum(grad_cos_times_cos, axis=1), mask=b_mask)
        tl.atomic_add(row_cos_dot_ptr + w_rows, tl.sum(grad_cos_times_cos, axis=0), mask=v_mask)
    grad_cos_for_f = grad_cos * (1.0 / nw)[None, :]
    grad_cos_for_w = tl.trans(grad_cos * (1.0 / nx)[:, None])
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D).to(tl.int64)
        d_mask = offs_d < D
        f = tl.load(x_ptr + offs_b[:, None] * stride_xb + j * stride_xl + offs_d[None, :] * stride_xd,
                    mask=b_mask[:, None] & d_mask[None, :], other=0.0).to(DOT_DTYPE)
        w = tl.load(w_ptr + j * stride_wl + offs_v[:, None] * stride_wv + offs_d[None, :] * stride_wd,
                    mask=v_mask[:, None] & d_mask[None, :], other=0.0).to(DOT_DTYPE)
        grad_f_part = _accumulate_dot(tl.zeros((BLOCK_B, BLOCK_D), dtype=acc_dtype), grad_cos_for_f, w,
                                      in_dtype, DOT_DTYPE, SPLIT_GRAD_COS)
        grad_w_part = _accumulate_dot(tl.zeros((BLOCK_V, BLOCK_D), dtype=acc_dtype), grad_cos_for_w, f,
                                      in_dtype, DOT_DTYPE, SPLIT_GRAD_COS)
        tl.atomic_add(grad_f_ptr + f_rows[:, None] * D + offs_d[None, :], grad_f_part,
                      mask=b_mask[:, None] & d_mask[None, :])
        tl.atomic_add(grad_w_ptr + w_rows[:, None] * D + offs_d[None, :], grad_w_part,
                      mask=v_mask[:, None] & d_mask[None, :])


@triton.jit
def _output_tile(D, BLOCK_ROWS: tl.constexpr, BLOCK_DO: tl.constexpr):
    """(row offsets, column offsets, column tile) of a deterministic backward program: program_id(0) is
    row tile * column tiles + column tile."""
    num_d_tiles = tl.cdiv(D, BLOCK_DO)
    pid_d = tl.program_id(0) % num_d_tiles
    offs_rows = (tl.program_id(0) // num_d_tiles).to(tl.int64) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS).to(tl.int64)
    offs_do = pid_d.to(tl.int64) * BLOCK_DO + tl.arange(0, BLOCK_DO).to(tl.int64)
    return offs_rows, offs_do, pid_d


@triton.jit
def _chunk_range(items_per_chunk, num_items):
    """(chunk, first item, end): the items that chunk program_id(2) sums, of num_items in all."""
    chunk = tl.program_id(2).to(tl.int64)
    start = chunk * items_per_chunk
    return chunk, start, tl.minimum(start + items_per_chunk, num_items)


@triton.jit
def _code_ce_bwd_features_kernel(x_ptr, w_ptr, codes_ptr, position_weight_ptr, grad_loss_ptr, lse_ptr,
                                 grad_f_ptr, feat_cos_dot_ptr,
                                 B, L, V, D, stride_xb, stride_xl, stride_xd, stride_wl, stride_wv, stride_wd,
                                 positions_per_row, items_per_chunk,
                                 scale: tl.float64, cos_m: tl.float64, sin_m: tl.float64, m3: tl.float64,
                                 fallback_shift: tl.float64, ignore_index,
                                 DOT_DTYPE: tl.constexpr, SPLIT_GRAD_COS: tl.constexpr, NORMALIZE: tl.constexpr,
                                 BLOCK_B: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
                                 BLOCK_DO: tl.constexpr):
    """Partial gradient of the feature rows: one program per (BLOCK_B samples x BLOCK_DO of D, first position,
    chunk). A feature row serves `positions_per_row` positions from the first one on (L for shared 2-D x, 1 for
    3-D x); the program sums grad_f[row] += (grad_cos / ||w||) @ W over its chunk of the (position, V tile)
    items, and (NORMALIZE) feat_cos_dot[row] += sum_v grad_cos * cos. Chunk c writes slot c of the partials, which
    the finishing kernel adds in order: no atomics, so the result is bitwise reproducible."""
    acc_dtype = lse_ptr.dtype.element_ty
    in_dtype = x_ptr.dtype.element_ty
    num_v_tiles = tl.cdiv(V, BLOCK_V)
    offs_b, offs_do, pid_d = _output_tile(D, BLOCK_B, BLOCK_DO)
    b_mask = offs_b < B
    do_mask = offs_do < D
    first_position = tl.program_id(1).to(tl.int64)
    chunk, item_start, item_end = _chunk_range(items_per_chunk, positions_per_row * num_v_tiles)
    acc = tl.zeros((BLOCK_B, BLOCK_DO), dtype=acc_dtype)
    feat_cos_dot = tl.zeros((BLOCK_B,), dtype=acc_dtype)
    for item in range(item_start, item_end):
        j = first_position + item // num_v_tiles
        offs_v = (item % num_v_tiles) * BLOCK_V + tl.arange(0, BLOCK_V).to(tl.int64)
        grad_cos, cos, nx, nw = _grad_cos_tile(
            x_ptr, w_ptr, codes_ptr, position_weight_ptr, grad_loss_ptr, lse_ptr, offs_b, offs_v, j,
            B, L, V, D, stride_xb, stride_xl, stride_xd, stride_wl, stride_wv, stride_wd,
            scale, cos_m, sin_m, m3, fallback_shift, ignore_index, DOT_DTYPE, NORMALIZE, BLOCK_B, BLOCK_V, BLOCK_D)
        if NORMALIZE:
            feat_cos_dot += tl.sum(grad_cos * cos, axis=1)
        w = tl.load(w_ptr + j * stride_wl + offs_v[:, None] * stride_wv + offs_do[None, :] * stride_wd,
                    mask=(offs_v < V)[:, None] & do_mask[None, :], other=0.0).to(DOT_DTYPE)
        acc = _accumulate_dot(acc, grad_cos * (1.0 / nw)[None, :], w, in_dtype, DOT_DTYPE, SPLIT_GRAD_COS)
    f_rows = offs_b * (L // positions_per_row) + first_position
    part_start = chunk * B * (L // positions_per_row)  # int64 from chunk on: past 2^31 for large B * L
    tl.store(grad_f_ptr + (part_start + f_rows)[:, None] * D + offs_do[None, :], acc,
             mask=b_mask[:, None] & do_mask[None, :])
    if pid_d == 0:  # every column tile computes the same dots; one stores them
        tl.store(feat_cos_dot_ptr + part_start + f_rows, feat_cos_dot, mask=b_mask)


@triton.jit
def _code_ce_bwd_weight_kernel(x_ptr, w_ptr, codes_ptr, position_weight_ptr, grad_loss_ptr, lse_ptr,
                               grad_w_ptr, row_cos_dot_ptr,
                               B, L, V, D, stride_xb, stride_xl, stride_xd, stride_wl, stride_wv, stride_wd,
                               tiles_per_chunk,
                               scale: tl.float64, cos_m: tl.float64, sin_m: tl.float64, m3: tl.float64,
                               fallback_shift: tl.float64, ignore_index,
                               DOT_DTYPE: tl.constexpr, SPLIT_GRAD_COS: tl.constexpr, NORMALIZE: tl.constexpr,
                               BLOCK_B: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
                               BLOCK_DO: tl.constexpr):
    """Partial gradient of the weight rows: one program per (BLOCK_V codes x BLOCK_DO of D, position j, chunk).
    It sums grad_w[j, v] += (grad_cos / ||f||)^T @ F and (NORMALIZE) row_cos_dot[j, v] += sum_b grad_cos * cos
    over its chunk of sample tiles, into slot `chunk` of the partials (added in order by the finishing kernel)."""
    acc_dtype = lse_ptr.dtype.element_ty
    in_dtype = x_ptr.dtype.element_ty
    offs_v, offs_do, pid_d = _output_tile(D, BLOCK_V, BLOCK_DO)
    v_mask = offs_v < V
    do_mask = offs_do < D
    j = tl.program_id(1).to(tl.int64)
    chunk, tile_start, tile_end = _chunk_range(tiles_per_chunk, tl.cdiv(B, BLOCK_B))
    acc = tl.zeros((BLOCK_V, BLOCK_DO), dtype=acc_dtype)
    row_cos_dot = tl.zeros((BLOCK_V,), dtype=acc_dtype)
    for tile in range(tile_start, tile_end):
        offs_b = tile * BLOCK_B + tl.arange(0, BLOCK_B).to(tl.int64)
        grad_cos, cos, nx, nw = _grad_cos_tile(
            x_ptr, w_ptr, codes_ptr, position_weight_ptr, grad_loss_ptr, lse_ptr, offs_b, offs_v, j,
            B, L, V, D, stride_xb, stride_xl, stride_xd, stride_wl, stride_wv, stride_wd,
            scale, cos_m, sin_m, m3, fallback_shift, ignore_index, DOT_DTYPE, NORMALIZE, BLOCK_B, BLOCK_V, BLOCK_D)
        if NORMALIZE:
            row_cos_dot += tl.sum(grad_cos * cos, axis=0)
        f = tl.load(x_ptr + offs_b[:, None] * stride_xb + j * stride_xl + offs_do[None, :] * stride_xd,
                    mask=(offs_b < B)[:, None] & do_mask[None, :], other=0.0).to(DOT_DTYPE)
        acc = _accumulate_dot(acc, tl.trans(grad_cos * (1.0 / nx)[:, None]), f, in_dtype, DOT_DTYPE,
                              SPLIT_GRAD_COS)
    w_rows = j * V + offs_v
    part_start = chunk * L * V  # int64 from chunk on
    tl.store(grad_w_ptr + (part_start + w_rows)[:, None] * D + offs_do[None, :], acc,
             mask=v_mask[:, None] & do_mask[None, :])
    if pid_d == 0:
        tl.store(row_cos_dot_ptr + part_start + w_rows, row_cos_dot, mask=v_mask)


@triton.jit
def _finish_rows_kernel(parts_ptr, cos_dot_parts_ptr, vec_ptr, out_ptr, R, D, num_parts, rows_per_outer, stride_outer,
                        stride_inner, stride_d, NORMALIZE: tl.constexpr, BLOCK_R: tl.constexpr,
                        BLOCK_D: tl.constexpr):
    """out_r = the sum of the partial gradients (num_parts, R, D), in order; with NORMALIZE, chained through
    v / max(||v||, eps): out_r = (acc_r - v_r * cos_dot_r / ||v_r||) / ||v_r||.

    Row r of vec sits at (r // rows_per_outer) * stride_outer + (r % rows_per_outer) * stride_inner. Below eps
    the norm is a constant, so the projection drops out.
    """
    acc_dtype = parts_ptr.dtype.element_ty
    offs_r = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R).to(tl.int64)
    r_mask = offs_r < R
    rows_per_part = tl.cast(R, tl.int64)  # part * R passes 2^31 for large heads
    vec_row_ptrs = vec_ptr + (offs_r // rows_per_outer) * stride_outer + (offs_r % rows_per_outer) * stride_inner
    if NORMALIZE:
        sq = tl.zeros((BLOCK_R,), dtype=acc_dtype)
        for d0 in range(0, D, BLOCK_D):
            offs_d = d0 + tl.arange(0, BLOCK_D).to(tl.int64)
            mask = r_mask[:, None] & (offs_d < D)[None, :]
            vec = tl.load(vec_row_ptrs[:, None] + offs_d[None, :] * stride_d, mask=mask, other=0.0).to(acc_dtype)
            sq += tl.sum(vec * vec, axis=1)
        norm = _sqrt_rn(sq)
        inv_norm = 1.0 / tl.maximum(norm, _NORM_EPS)
        dot = tl.zeros((BLOCK_R,), dtype=acc_dtype)
        for part in range(num_parts):
            dot += tl.load(cos_dot_parts_ptr + part * rows_per_part + offs_r, mask=r_mask, other=0.0)
        coef = tl.where(norm >= _NORM_EPS, dot * inv_norm, 0.0)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D).to(tl.int64)
        mask = r_mask[:, None] & (offs_d < D)[None, :]
        acc = tl.zeros((BLOCK_R, BLOCK_D), dtype=acc_dtype)
        for part in range(num_parts):
            acc += tl.load(parts_ptr + (part * rows_per_part + offs_r)[:, None] * D + offs_d[None, :], mask=mask,
                           other=0.0)
        if NORMALIZE:
            vec = tl.load(vec_row_ptrs[:, None] + offs_d[None, :] * stride_d, mask=mask, other=0.0).to(acc_dtype)
            acc = (acc - vec * coef[:, None]) * inv_norm[:, None]
        tl.store(out_ptr + offs_r[:, None] * D + offs_d[None, :], acc.to(out_ptr.dtype.element_ty), mask=mask)


def _tile_sizes(B, V, D, dtype):
    """(BLOCK_B, BLOCK_V, BLOCK_D, num_warps) of the forward and the atomic backward: powers of two >= 16
    (tl.dot's minimum), capped so that the sm_90 kernels do not spill registers (ptxas -v); fp32/fp64 dots run
    on FMA units and need smaller tiles."""
    if dtype in (torch.float16, torch.bfloat16):
        cap_b, cap_v, cap_d = 64, 128, 32
    else:
        cap_b, cap_v, cap_d = (64 if dtype == torch.float32 else 32), 64, 16
    block_b = min(max(triton.next_power_of_2(B), 16), cap_b)
    block_v = min(max(triton.next_power_of_2(V), 16), cap_v)
    block_d = min(max(triton.next_power_of_2(D), 16), cap_d)
    return block_b, block_v, block_d, 8 if block_b * block_v >= 2048 else 4


def _deterministic_tile_sizes(B, V, D, dtype):
    """Meta-parameters of the deterministic backward's (grad_x, grad_weight) kernels. Each program keeps a float32
    (64, BLOCK_DO) accumulator (rows: samples for grad_x, codes for grad_weight) across its loop over the other
    dimension in steps of 32, and recomputes its cosine tiles over all of D, so a wider BLOCK_DO is fewer
    recomputations. ptxas -v of Triton 3.6's sm_90 code: no spills up to 128 columns for 16-bit inputs, 64 for
    float32 (bench/RESULTS.md)."""
    def tile(n, cap):
        return min(max(triton.next_power_of_2(n), 16), cap)
    _, _, block_d, _ = _tile_sizes(B, V, D, dtype)
    block_do = tile(D, 128 if dtype in (torch.float16, torch.bfloat16) else 64)
    features_rows, weight_rows = tile(B, 64), tile(V, 64)
    return (dict(BLOCK_B=features_rows, BLOCK_V=tile(V, 32), BLOCK_D=block_d, BLOCK_DO=block_do,
                 num_warps=8 if features_rows * block_do >= 4096 else 4),
            dict(BLOCK_B=tile(B, 32), BLOCK_V=weight_rows, BLOCK_D=block_d, BLOCK_DO=block_do,
                 num_warps=8 if weight_rows * block_do >= 4096 else 4))


def _dot_dtype(dtype):
    """The tl dtype of tl.dot operands: the inputs' own, except bfloat16 under the Triton interpreter, whose
    tl.dot multiplies bfloat16 bit patterns. There operands are rounded to bfloat16 and then widened to float32,
    which gives the same products as the GPU's bfloat16 dot with float32 accumulation."""
    if dtype == torch.bfloat16 and not isinstance(_code_ce_fwd_kernel, triton.runtime.JITFunction):
        return tl.float32
    return {torch.float32: tl.float32, torch.float64: tl.float64, torch.float16: tl.float16,
            torch.bfloat16: tl.bfloat16}[dtype]


def _margin_args(scale, m2, m3):
    """scale, cos(m2), sin(m2), m3 and ArcFace's fallback shift m2 * sin(m2), as Python floats (fp64 in the kernel)."""
    return float(scale), math.cos(m2), math.sin(m2), float(m3), m2 * math.sin(m2)


def _features_by_position(x, L):
    """x as (B, L, D); shared 2-D features get stride 0 over L."""
    return x.unsqueeze(1).expand(-1, L, -1) if x.dim() == 2 else x


def _position_weights(position_weight, L, dtype, device):
    """position_weight as a contiguous (L,) tensor in the accumulation dtype; all ones when None."""
    if position_weight is None:
        return torch.ones(L, dtype=dtype, device=device)
    return position_weight.to(device=device, dtype=dtype).contiguous()


def _check_codes(codes, V, ignore_index):
    """Raise on codes outside [0, V) that are not ignore_index (CPU only: on CUDA it would need a host sync)."""
    bad = (codes != ignore_index) & ((codes < 0) | (codes >= V))
    if bool(bad.any()):
        raise ValueError(f"codes: values must be in [0, V) or equal ignore_index (V={V}, "
                         f"ignore_index={ignore_index}); found {codes[bad][0].item()}")


def code_ce_forward(x, weight, codes, position_weight, scale: float, m2: float, m3: float,
                    normalize: bool, ignore_index: int):
    """Returns (loss, lse), both (B, L), float64 if x is float64 else float32."""
    L, V, D = weight.shape
    B = x.shape[0]
    if codes.device.type == "cpu":
        _check_codes(codes, V, ignore_index)
    acc_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    feats = _features_by_position(x, L)
    loss = torch.empty((B, L), dtype=acc_dtype, device=x.device)
    lse = torch.empty_like(loss)
    block_b, block_v, block_d, num_warps = _tile_sizes(B, V, D, x.dtype)
    _code_ce_fwd_kernel[(triton.cdiv(B, block_b), L)](
        feats, weight, codes.contiguous(), _position_weights(position_weight, L, acc_dtype, x.device), loss, lse,
        B, L, V, D, *feats.stride(), *weight.stride(), *_margin_args(scale, m2, m3), ignore_index,
        DOT_DTYPE=_dot_dtype(x.dtype), NORMALIZE=normalize, BLOCK_B=block_b, BLOCK_V=block_v, BLOCK_D=block_d,
        num_warps=num_warps, **LAUNCH_OPTIONS)
    return loss, lse


def _chunks(programs, items, device):
    """(number of chunks, items per chunk): a reduction over `items` tiles is split into chunks, each a
    partial sum, until the grid's programs fill the GPU (two per SM). On CPU tensors (the Triton interpreter)
    a small fixed target, so that the tests exercise chunking."""
    if programs == 0 or items == 0:  # an empty batch: one chunk (of nothing, or that no program runs)
        return 1, max(items, 1)
    target = 2 * torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4
    per_chunk = triton.cdiv(items, min(items, max(1, triton.cdiv(target, programs))))
    return triton.cdiv(items, per_chunk), per_chunk


def _finish_block_sizes(D):
    """BLOCK_R, BLOCK_D of the finishing kernel (32 rows spilled registers on sm_90)."""
    return dict(BLOCK_R=16, BLOCK_D=min(max(triton.next_power_of_2(D), 16), 128))


def _finish_grad(parts, cos_dot_parts, vec, rows_per_outer, stride_outer, stride_inner, normalize, shape, dtype):
    """Sum the (chunks, R, D) partial gradients, apply the normalization's projection (if any) and cast to
    (shape, dtype)."""
    out = torch.empty(shape, dtype=dtype, device=parts.device)
    num_parts, R, D = parts.shape
    blocks = _finish_block_sizes(D)
    _finish_rows_kernel[(triton.cdiv(R, blocks["BLOCK_R"]),)](
        parts, cos_dot_parts, vec, out, R, D, num_parts, rows_per_outer, stride_outer, stride_inner, vec.stride(-1),
        NORMALIZE=normalize, **blocks, **LAUNCH_OPTIONS)
    return out


def code_ce_backward(grad_loss, x, weight, codes, position_weight, lse, scale, m2, m3, normalize, ignore_index,
                     deterministic):
    """Returns (grad_x, grad_weight) in x's and weight's shape and dtype. deterministic: bitwise-reproducible
    sums (two kernels, each recomputing the cosine tiles) instead of atomics (one kernel)."""
    L, V, D = weight.shape
    B = x.shape[0]
    acc_dtype = lse.dtype
    feats = _features_by_position(x, L)
    rows_per_sample = L if x.dim() == 3 else 1  # feature rows per sample: one per position, or one shared
    args = (feats, weight, codes.contiguous(), _position_weights(position_weight, L, acc_dtype, x.device),
            grad_loss.to(acc_dtype).contiguous(), lse.contiguous())
    shapes = (B, L, V, D, *feats.stride(), *weight.stride())
    margins = (*_margin_args(scale, m2, m3), ignore_index)
    meta = dict(DOT_DTYPE=_dot_dtype(x.dtype), SPLIT_GRAD_COS=x.dtype in (torch.float16, torch.bfloat16),
                NORMALIZE=normalize)
    if deterministic:
        grad_f, feat_cos_dot, grad_w, row_cos_dot = _deterministic_partials(
            args, shapes, margins, meta, rows_per_sample, acc_dtype)
    else:
        grad_f = torch.zeros((1, B * rows_per_sample, D), dtype=acc_dtype, device=x.device)
        grad_w = torch.zeros((1, L * V, D), dtype=acc_dtype, device=x.device)
        feat_cos_dot = torch.zeros((1, B * rows_per_sample), dtype=acc_dtype, device=x.device)
        row_cos_dot = torch.zeros((1, L * V), dtype=acc_dtype, device=x.device)
        block_b, block_v, block_d, num_warps = _tile_sizes(B, V, D, x.dtype)
        _code_ce_bwd_atomic_kernel[(triton.cdiv(B, block_b), triton.cdiv(V, block_v), L)](
            *args, grad_f, grad_w, feat_cos_dot, row_cos_dot, *shapes, rows_per_sample, *margins, **meta,
            BLOCK_B=block_b, BLOCK_V=block_v, BLOCK_D=block_d, num_warps=num_warps, **LAUNCH_OPTIONS)
    grad_x = _finish_grad(grad_f, feat_cos_dot, x, rows_per_sample, x.stride(0), x.stride(1) if x.dim() == 3 else 0,
                          normalize, x.shape, x.dtype)
    grad_weight = _finish_grad(grad_w, row_cos_dot, weight, V, weight.stride(0), weight.stride(1),
                               normalize, weight.shape, weight.dtype)
    return grad_x, grad_weight


def _deterministic_partials(args, shapes, margins, meta, rows_per_sample, acc_dtype):
    """(grad_f, feat_cos_dot, grad_w, row_cos_dot) partial sums, (chunks, rows, D) and (chunks, rows), of the two
    atomic-free backward kernels: one summing over codes per feature row, one over samples per weight row."""
    x = args[0]
    B, L, V, D = shapes[:4]
    features_meta, weight_meta = _deterministic_tile_sizes(B, V, D, x.dtype)

    feature_tiles = triton.cdiv(B, features_meta["BLOCK_B"]) * triton.cdiv(D, features_meta["BLOCK_DO"])
    positions_per_row = L // rows_per_sample
    chunks, items_per_chunk = _chunks(feature_tiles * rows_per_sample,
                                      positions_per_row * triton.cdiv(V, features_meta["BLOCK_V"]), x.device)
    grad_f = torch.empty((chunks, B * rows_per_sample, D), dtype=acc_dtype, device=x.device)
    feat_cos_dot = torch.empty((chunks, B * rows_per_sample), dtype=acc_dtype, device=x.device)
    _code_ce_bwd_features_kernel[(feature_tiles, rows_per_sample, chunks)](
        *args, grad_f, feat_cos_dot, *shapes, positions_per_row, items_per_chunk, *margins, **meta, **features_meta,
        **LAUNCH_OPTIONS)

    weight_tiles = triton.cdiv(V, weight_meta["BLOCK_V"]) * triton.cdiv(D, weight_meta["BLOCK_DO"])
    chunks, tiles_per_chunk = _chunks(weight_tiles * L, triton.cdiv(B, weight_meta["BLOCK_B"]), x.device)
    grad_w = torch.empty((chunks, L * V, D), dtype=acc_dtype, device=x.device)
    row_cos_dot = torch.empty((chunks, L * V), dtype=acc_dtype, device=x.device)
    _code_ce_bwd_weight_kernel[(weight_tiles, L, chunks)](
        *args, grad_w, row_cos_dot, *shapes, tiles_per_chunk, *margins, **meta, **weight_meta, **LAUNCH_OPTIONS)
    return grad_f, feat_cos_dot, grad_w, row_cos_dot
