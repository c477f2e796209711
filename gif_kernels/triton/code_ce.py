"""Fused cosine-softmax cross-entropy of a multi-position code head, with CosFace/ArcFace margins.

loss[b, j] = lambda_j * (logsumexp_v logit[b, j, v] - logit[b, j, codes[b, j]]). The (B, L, V) logits are
never stored: the forward keeps an online logsumexp over V tiles; the backward recomputes each tile from
the saved lse (as Cut Cross-Entropy does) and accumulates the gradients with atomics.
"""
import math

import torch
import triton
import triton.language as tl

from ..constants import NORM_EPS, SIN_EPS

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
def _code_ce_fwd_kernel(x_ptr, w_ptr, codes_ptr, pos_weight_ptr, loss_ptr, lse_ptr,
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
    pos_weight = tl.load(pos_weight_ptr + j)
    loss = pos_weight * ((row_max - target_logit) + log1p_z)
    # A bad code shows as NaN (0 / 0: a NaN global would fail Triton's check, NaN != NaN, that globals
    # are unchanged since compilation).
    loss = tl.where(in_range, loss, tl.zeros_like(loss) / tl.zeros_like(loss))
    loss = tl.where(target == ignore_index, 0.0, loss)
    tl.store(loss_ptr + rows, loss, mask=b_mask)
    tl.store(lse_ptr + rows, lse, mask=b_mask)


@triton.jit
def _code_ce_bwd_kernel(x_ptr, w_ptr, codes_ptr, pos_weight_ptr, grad_loss_ptr, lse_ptr,
                        grad_f_ptr, grad_w_ptr, row_dot_ptr, col_dot_ptr,
                        B, L, V, D, stride_xb, stride_xl, stride_xd, stride_wl, stride_wv, stride_wd,
                        f_rows_per_b, f_row_step,
                        scale: tl.float64, cos_m: tl.float64, sin_m: tl.float64, m3: tl.float64,
                        fallback_shift: tl.float64, ignore_index,
                        DOT_DTYPE: tl.constexpr, SPLIT_GRAD_COS: tl.constexpr, NORMALIZE: tl.constexpr,
                        BLOCK_B: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr):
    """One program per (BLOCK_B samples, BLOCK_V codes, position j).

    Recomputes the cosine tile, forms grad_cos = dloss/dcos, and atomically adds into
    grad_f[f_row] += (grad_cos / ||w||) @ W and grad_w[j, v] += (grad_cos / ||f||)^T @ F, plus (NORMALIZE)
    row_dot[f_row] += sum_v grad_cos * cos and col_dot[j, v] += sum_b grad_cos * cos for the projection terms.
    f_row = b * f_rows_per_b + j * f_row_step: one row per (b, j) for 3-D x, per b for shared 2-D x.
    """
    acc_dtype = lse_ptr.dtype.element_ty
    in_dtype = x_ptr.dtype.element_ty
    j = tl.program_id(2).to(tl.int64)
    offs_b = tl.program_id(0).to(tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B).to(tl.int64)
    offs_v = tl.program_id(1).to(tl.int64) * BLOCK_V + tl.arange(0, BLOCK_V).to(tl.int64)
    b_mask = offs_b < B
    v_mask = offs_v < V
    rows = offs_b * L + j  # codes, grad_loss and lse are contiguous (B, L)
    target = tl.load(codes_ptr + rows, mask=b_mask, other=ignore_index).to(tl.int64)
    active = b_mask & (target != ignore_index) & (target >= 0) & (target < V)
    grad_row = tl.load(grad_loss_ptr + rows, mask=b_mask, other=0.0) * tl.load(pos_weight_ptr + j)
    lse = tl.load(lse_ptr + rows, mask=b_mask, other=0.0)
    f_row_ptrs = x_ptr + offs_b * stride_xb + j * stride_xl
    w_row_ptrs = w_ptr + j * stride_wl + offs_v * stride_wv
    cos, nx, nw = _cosine_tile(f_row_ptrs, w_row_ptrs, b_mask, v_mask, D, stride_xd, stride_wd,
                               acc_dtype, DOT_DTYPE, NORMALIZE, BLOCK_B, BLOCK_V, BLOCK_D)
    is_target = offs_v[None, :] == target[:, None]
    logits, slope = _logit_tile(cos, is_target, v_mask, scale, cos_m, sin_m, m3, fallback_shift)
    probs = tl.exp(logits - lse[:, None])
    # where, not a product: inactive rows (ignored, bad code, past B) must give exact zeros, even from NaN/inf.
    grad_cos = tl.where(active[:, None], grad_row[:, None] * (probs - is_target.to(acc_dtype)) * slope, 0.0)
    f_rows = offs_b * f_rows_per_b + j * f_row_step
    w_rows = j * V + offs_v
    if NORMALIZE:
        grad_cos_times_cos = grad_cos * cos
        tl.atomic_add(row_dot_ptr + f_rows, tl.sum(grad_cos_times_cos, axis=1), mask=b_mask)
        tl.atomic_add(col_dot_ptr + w_rows, tl.sum(grad_cos_times_cos, axis=0), mask=v_mask)
    # Operands of the gradient dots in the input dtype (tensor cores for bf16/fp16). grad_cos holds terms of
    # size `scale` that cancel down to O(1), so one 16-bit rounding of it costs ~1% of the gradient:
    # SPLIT_GRAD_COS sends it as hi + lo, two 16-bit values (a second dot), and the error drops to ~1e-4.
    grad_cos_for_f = grad_cos * (1.0 / nw)[None, :]
    grad_cos_for_w = tl.trans(grad_cos * (1.0 / nx)[:, None])
    grad_cos_for_f_hi = grad_cos_for_f.to(in_dtype)
    grad_cos_for_w_hi = grad_cos_for_w.to(in_dtype)
    if SPLIT_GRAD_COS:
        grad_cos_for_f_lo = (grad_cos_for_f - grad_cos_for_f_hi.to(acc_dtype)).to(in_dtype).to(DOT_DTYPE)
        grad_cos_for_w_lo = (grad_cos_for_w - grad_cos_for_w_hi.to(acc_dtype)).to(in_dtype).to(DOT_DTYPE)
    grad_cos_for_f_hi = grad_cos_for_f_hi.to(DOT_DTYPE)
    grad_cos_for_w_hi = grad_cos_for_w_hi.to(DOT_DTYPE)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D).to(tl.int64)
        d_mask = offs_d < D
        f = tl.load(f_row_ptrs[:, None] + offs_d[None, :] * stride_xd,
                    mask=b_mask[:, None] & d_mask[None, :], other=0.0).to(DOT_DTYPE)
        w = tl.load(w_row_ptrs[:, None] + offs_d[None, :] * stride_wd,
                    mask=v_mask[:, None] & d_mask[None, :], other=0.0).to(DOT_DTYPE)
        grad_f_part = tl.dot(grad_cos_for_f_hi, w, input_precision="ieee")
        grad_w_part = tl.dot(grad_cos_for_w_hi, f, input_precision="ieee")
        if SPLIT_GRAD_COS:
            grad_f_part += tl.dot(grad_cos_for_f_lo, w, input_precision="ieee")
            grad_w_part += tl.dot(grad_cos_for_w_lo, f, input_precision="ieee")
        tl.atomic_add(grad_f_ptr + f_rows[:, None] * D + offs_d[None, :], grad_f_part,
                      mask=b_mask[:, None] & d_mask[None, :])
        tl.atomic_add(grad_w_ptr + w_rows[:, None] * D + offs_d[None, :], grad_w_part,
                      mask=v_mask[:, None] & d_mask[None, :])


@triton.jit
def _project_rows_kernel(acc_ptr, dot_ptr, vec_ptr, out_ptr, R, D, rows_per_outer, stride_outer, stride_inner,
                         stride_d, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """Chain rule through v / max(||v||, eps): out_r = (acc_r - v_r * dot_r / ||v_r||) / ||v_r||.

    acc (R, D) and dot (R,) are contiguous; row r of vec sits at (r // rows_per_outer) * stride_outer
    + (r % rows_per_outer) * stride_inner. Below eps the norm is a constant, so the projection drops out.
    """
    acc_dtype = acc_ptr.dtype.element_ty
    offs_r = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R).to(tl.int64)
    r_mask = offs_r < R
    vec_row_ptrs = vec_ptr + (offs_r // rows_per_outer) * stride_outer + (offs_r % rows_per_outer) * stride_inner
    sq = tl.zeros((BLOCK_R,), dtype=acc_dtype)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D).to(tl.int64)
        mask = r_mask[:, None] & (offs_d < D)[None, :]
        vec = tl.load(vec_row_ptrs[:, None] + offs_d[None, :] * stride_d, mask=mask, other=0.0).to(acc_dtype)
        sq += tl.sum(vec * vec, axis=1)
    norm = _sqrt_rn(sq)
    inv_norm = 1.0 / tl.maximum(norm, _NORM_EPS)
    dot = tl.load(dot_ptr + offs_r, mask=r_mask, other=0.0)
    coef = tl.where(norm >= _NORM_EPS, dot * inv_norm, 0.0)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D).to(tl.int64)
        mask = r_mask[:, None] & (offs_d < D)[None, :]
        vec = tl.load(vec_row_ptrs[:, None] + offs_d[None, :] * stride_d, mask=mask, other=0.0).to(acc_dtype)
        acc = tl.load(acc_ptr + offs_r[:, None] * D + offs_d[None, :], mask=mask, other=0.0)
        out = (acc - vec * coef[:, None]) * inv_norm[:, None]
        tl.store(out_ptr + offs_r[:, None] * D + offs_d[None, :], out.to(out_ptr.dtype.element_ty), mask=mask)


def _tile_sizes(B, V, D, dtype):
    """(BLOCK_B, BLOCK_V, BLOCK_D, num_warps): powers of two >= 16 (tl.dot's minimum), capped so that the sm_90
    kernels do not spill registers (ptxas -v); fp32/fp64 dots run on FMA units and need smaller tiles."""
    if dtype in (torch.float16, torch.bfloat16):
        cap_b, cap_v, cap_d = 64, 128, 32
    else:
        cap_b, cap_v, cap_d = (64 if dtype == torch.float32 else 32), 64, 16
    block_b = min(max(triton.next_power_of_2(B), 16), cap_b)
    block_v = min(max(triton.next_power_of_2(V), 16), cap_v)
    block_d = min(max(triton.next_power_of_2(D), 16), cap_d)
    return block_b, block_v, block_d, 8 if block_b * block_v >= 2048 else 4


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
    """lambda as a contiguous (L,) tensor in the accumulation dtype; all ones when None."""
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
        num_warps=num_warps)
    return loss, lse


def _finish_grad(acc, dots, vec, rows_per_outer, stride_outer, stride_inner, normalize, shape, dtype):
    """Apply the normalization's projection (if any) to a (R, D) accumulator and cast it to (shape, dtype)."""
    if not normalize:
        return acc.view(shape).to(dtype)
    out = torch.empty(shape, dtype=dtype, device=acc.device)
    R, D = acc.shape
    block_r, block_d = 32, min(max(triton.next_power_of_2(D), 16), 128)
    _project_rows_kernel[(triton.cdiv(R, block_r),)](
        acc, dots, vec, out, R, D, rows_per_outer, stride_outer, stride_inner, vec.stride(-1),
        BLOCK_R=block_r, BLOCK_D=block_d)
    return out


def code_ce_backward(grad_loss, x, weight, codes, position_weight, lse, scale, m2, m3, normalize, ignore_index):
    """Returns (grad_x, grad_weight) in x's and weight's shape and dtype."""
    L, V, D = weight.shape
    B = x.shape[0]
    acc_dtype = lse.dtype
    feats = _features_by_position(x, L)
    f_rows_per_b = L if x.dim() == 3 else 1
    grad_f = torch.zeros((B * f_rows_per_b, D), dtype=acc_dtype, device=x.device)
    grad_w = torch.zeros((L * V, D), dtype=acc_dtype, device=x.device)
    row_dot = torch.zeros(B * f_rows_per_b, dtype=acc_dtype, device=x.device)
    col_dot = torch.zeros(L * V, dtype=acc_dtype, device=x.device)
    block_b, block_v, block_d, num_warps = _tile_sizes(B, V, D, x.dtype)
    _code_ce_bwd_kernel[(triton.cdiv(B, block_b), triton.cdiv(V, block_v), L)](
        feats, weight, codes.contiguous(), _position_weights(position_weight, L, acc_dtype, x.device),
        grad_loss.to(acc_dtype).contiguous(), lse.contiguous(), grad_f, grad_w, row_dot, col_dot,
        B, L, V, D, *feats.stride(), *weight.stride(), f_rows_per_b, 1 if x.dim() == 3 else 0,
        *_margin_args(scale, m2, m3), ignore_index,
        DOT_DTYPE=_dot_dtype(x.dtype), SPLIT_GRAD_COS=x.dtype in (torch.float16, torch.bfloat16),
        NORMALIZE=normalize, BLOCK_B=block_b, BLOCK_V=block_v, BLOCK_D=block_d, num_warps=num_warps)
    grad_x = _finish_grad(grad_f, row_dot, x, f_rows_per_b, x.stride(0), x.stride(1) if x.dim() == 3 else 0,
                          normalize, x.shape, x.dtype)
    grad_weight = _finish_grad(grad_w, col_dot, weight, V, weight.stride(0), weight.stride(1),
                               normalize, weight.shape, weight.dtype)
    return grad_x, grad_weight
