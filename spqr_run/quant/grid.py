"""Asymmetric min-max quantization grids: fitting, rounding and THE reconstruction formula.

Every dequantized number in this package, at both levels of SpQR's bilevel statistics and in the
baselines, is `scale * (code - zero)` computed in fp32 by `dequantize_codes`: the quantizer, the reference
matmul and (later) the CUDA kernel evaluate exactly this expression, so reconstructions agree bit for bit.
"""

from __future__ import annotations

import torch
from torch import Tensor

EPS = 1e-9  # scales are clamped to at least this before dividing (as the official SpQR code does)
FP16_MAX = 65504.0


def max_code(bits: int) -> int:
    """Largest code of a `bits`-bit unsigned grid."""
    return (1 << bits) - 1


def grid_range(x: Tensor, maxq: int) -> tuple[Tensor, Tensor]:
    """Range (lo, hi) (...,) of the min-max grid over the last dim of `x` (..., n).

    Normally (min, max). Degenerate rows (all equal, or a range so small relative to the values that the
    zero point would exceed ~1000 steps) get the GPTQ convention instead: the range widened to include 0,
    so both the value and 0 are grid points and the zero point stays small.
    """
    x = x.float()
    return widen_degenerate(x.amin(dim=-1), x.amax(dim=-1), maxq)


def widen_degenerate(lo: Tensor, hi: Tensor, maxq: int) -> tuple[Tensor, Tensor]:
    """`grid_range` given the raw (min, max) (...,) of the values: widen degenerate ranges to include 0."""
    degenerate = (hi - lo) * 1024 <= maxq * torch.maximum(lo.abs(), hi.abs())
    lo = torch.where(degenerate, lo.clamp(max=0), lo)
    hi = torch.where(degenerate, hi.clamp(min=0), hi)
    return lo, hi


def fit_minmax(x: Tensor, maxq: int) -> tuple[Tensor, Tensor]:
    """Asymmetric min-max grid over the last dim of `x` (..., n) -> scale, zero (...,) fp32.

    `scale = (hi - lo) / maxq`, `zero = -lo / scale`, not rounded (like the official SpQR quantizer, so the
    bilevel zero quantizer sees real numbers); `grid_range` gives (lo, hi). An all-zero row gets scale 0,
    zero 0, which reconstructs 0.
    """
    return minmax_from_range(*grid_range(x, maxq), maxq)


def minmax_from_range(lo: Tensor, hi: Tensor, maxq: int) -> tuple[Tensor, Tensor]:
    """`fit_minmax`'s (scale, zero) from a grid range (lo, hi) as `grid_range` returns it."""
    scale = (hi - lo) / maxq
    zero = torch.where(scale > 0, -lo / scale.clamp_min(EPS), torch.zeros_like(scale))
    return scale, zero


def fit_minmax_fp16(x: Tensor, maxq: int) -> tuple[Tensor, Tensor]:
    """`fit_minmax` with the (scale, zero) pair stored in fp16 -> fp16 tensors (...,).

    The zero is recomputed from the rounded scale so the grid still starts at `lo`. A scale that is 0
    (all-zero row) becomes 1 and one that underflows fp16 becomes 2**-24, keeping `x / scale` finite.
    """
    lo, hi = grid_range(x, maxq)
    scale = (hi - lo) / maxq
    scale16 = scale.clamp(max=FP16_MAX).half()
    fallback = torch.where(scale > 0, 2.0**-24, 1.0).to(scale16.dtype)
    scale16 = torch.where(scale16 > 0, scale16, fallback)
    zero16 = (-lo / scale16.float()).clamp(-FP16_MAX, FP16_MAX).half()
    return scale16, zero16


def quantize_codes(x: Tensor, scale: Tensor, zero: Tensor, maxq: int) -> Tensor:
    """Nearest grid codes of `x` as fp32 integers in [0, maxq] (`scale`, `zero` broadcast against `x`)."""
    return torch.clamp(torch.round(x / scale.clamp_min(EPS) + zero), 0, maxq)


def dequantize_codes(codes: Tensor, scale: Tensor, zero: Tensor) -> Tensor:
    """THE reconstruction formula, fp32: `scale * (code - zero)` (all operands upcast to fp32 first)."""
    return scale.float() * (codes.float() - zero.float())


def quantize_row_groups(values: Tensor, groupsize: int, bits: int) -> tuple[Tensor, Tensor, Tensor]:
    """SpQR's second-order step: quantize per-row statistics (..., out) in groups of `groupsize` rows.

    Each group of consecutive rows (the last one may be partial) gets its own min-max grid of `bits` bits
    stored as fp16 (scale, zero). Returns codes (..., out) fp32, stats (..., groups, 2) fp16 and the
    dequantized values (..., out) fp32, computed with `dequantize_codes` exactly as a reader will. Leading
    dimensions are independent (the quantizer does a group's scales and zeros in one call).
    """
    out = values.shape[-1]
    groups = -(-out // groupsize)
    pad = groups * groupsize - out
    if pad:  # replicate the last row: same min/max
        values = torch.cat([values, values[..., -1:].expand(*values.shape[:-1], pad)], dim=-1)
    maxq = max_code(bits)
    scale16, zero16 = fit_minmax_fp16(values.reshape(*values.shape[:-1], groups, groupsize), maxq)
    scale_rows = scale16.float().repeat_interleave(groupsize, dim=-1)  # (..., groups * groupsize)
    zero_rows = zero16.float().repeat_interleave(groupsize, dim=-1)
    codes = quantize_codes(values, scale_rows, zero_rows, maxq)
    deq = dequantize_codes(codes, scale_rows, zero_rows)
    stats = torch.stack([scale16, zero16], dim=-1)  # (..., groups, 2)
    return codes[..., :out], stats, deq[..., :out]


def weighted_grid_error(x: Tensor, weight: Tensor, scale: Tensor, zero: Tensor, maxq: int) -> Tensor:
    """Weighted squared rounding error sum_j weight_j (x_j - deq_j)**2 of rows `x` (..., g) on grids.

    `scale`, `zero` (...,) are one grid per row (broadcast against `x`'s leading dims, e.g. (out, K, M)
    candidate grids for x (out, 1, 1, g)); `weight` (g,) >= 0 per column. Rounding is exactly the
    quantizer's (`quantize_codes` then `dequantize_codes`). Returns (...,) fp32.
    """
    s, z = scale.float().unsqueeze(-1), zero.float().unsqueeze(-1)
    # quantize_codes then dequantize_codes, in place on one buffer: the same fp32 expressions
    deq = torch.add(x / s.clamp_min(EPS), z)
    deq.round_().clamp_(0, maxq).sub_(z).mul_(s).sub_(x).square_()
    return deq.matmul(weight.to(deq.dtype))


STAT_SEARCH_WINDOW = ((-1, 2), (-2, 2))  # code offsets tried around the min-max (scale, zero) codes


def search_stat_codes(
    x: Tensor,
    weight: Tensor,
    stats: Tensor,
    codes: Tensor,
    groupsize: int,
    bits: int,
    maxq: int,
    window: tuple[tuple[int, int], tuple[int, int]] | None = STAT_SEARCH_WINDOW,
) -> tuple[Tensor, Tensor]:
    """SpQR's quantized first-order stats, re-chosen per row on the fixed second-order grids.

    x (out, g) the group's weights, weight (g,) column weights (1 / U[j, j]**2), `stats` (2, row_groups, 2)
    fp16 and `codes` (2, out) as `quantize_row_groups` returned them for (scales, zeros). Each row's
    (scale code, zero code) pair is replaced by the candidate pair on its row group's grids that minimises
    the weighted rounding error of the row (`weighted_grid_error`). Candidates: the min-max codes offset by
    `window` ((lo, hi) inclusive for the scale code, then the zero code, clamped to the code range; on
    SmolLM2-like weights the best pair lies there for ~99% of rows), or all 2**bits x 2**bits pairs with
    `window=None`. The min-max pair is a candidate and is kept on ties, so no row's error grows. Only
    codes change: the stored fp16 stats are the same, so the bits are too.
    Returns the new codes (2, out) fp32 and dequantized (scale, zero) (2, out) fp32, by `dequantize_codes`.
    """
    out = x.shape[0]
    top = max_code(bits)
    rows = torch.arange(out, device=x.device) // groupsize
    grid = stats.float()[:, rows]  # (2, out, 2): per row its group's (scale, zero) of scales and zeros
    cand = []
    for k in range(2):
        if window is None:
            c = torch.arange(top + 1, dtype=torch.float32, device=x.device).expand(out, top + 1)
        else:
            offsets = torch.arange(window[k][0], window[k][1] + 1, dtype=torch.float32, device=x.device)
            c = (codes[k].unsqueeze(1) + offsets).clamp_(0, top)  # (out, C_k)
        cand.append(c)
    values = [dequantize_codes(cand[k], grid[k, :, 0:1], grid[k, :, 1:2]) for k in range(2)]  # (out, C_k)
    err = weighted_grid_error(
        x.float()[:, None, None, :], weight, values[0][:, :, None], values[1][:, None, :], maxq
    )  # (out, C_s, C_z)
    nz = cand[1].shape[1]
    flat = err.reshape(out, -1)
    best = flat.argmin(dim=1)
    # the min-max pair's own error (its codes are among the candidates): keep it unless strictly worse
    current = dequantize_codes(codes, grid[..., 0], grid[..., 1])  # (2, out)
    base = weighted_grid_error(x.float(), weight, current[0], current[1], maxq)  # (out,)
    better = flat.gather(1, best[:, None]).squeeze(1) < base
    si, zi = (best // nz)[:, None], (best % nz)[:, None]
    new_codes = torch.stack([cand[0].gather(1, si).squeeze(1), cand[1].gather(1, zi).squeeze(1)])
    new_deq = torch.stack([values[0].gather(1, si).squeeze(1), values[1].gather(1, zi).squeeze(1)])
    return torch.where(better, new_codes, codes), torch.where(better, new_deq, current)
