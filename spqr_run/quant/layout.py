"""`UnpackedLinear` (codes as plain integers) <-> packed tensors, and the dequantization of row ranges.

The packed arrangement is drawn in docs/FORMAT.md. SpQR: the (out, in) code matrix is cut into tiles of
beta2 rows x beta1 columns (16 x 16), tails padded with code 0 to whole tiles; tiles are stored row-tile
major, each tile's codes row-major and bit-packed (`packing.pack_bits`). Baselines: one bit-packed run of
codes per row, padded to a multiple of 32 codes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from torch.nn import functional as F

from spqr_run.quant.grid import dequantize_codes
from spqr_run.quant.meta import LinearMeta
from spqr_run.quant.packing import csr_rows, decode_columns, pack_bits, unpack_bits


@dataclass
class UnpackedLinear:
    """Every number of a quantized linear as plain tensors (what the quantizer produces before packing).

    Columns are the *permuted* input columns (column j is input feature `perm[j]`).
    """

    meta: LinearMeta
    codes: Tensor  # (out, in) int64 in [0, 2**wbits)
    perm: Tensor | None  # (in,) int64 or None (identity)
    # spqr only
    scale_codes: Tensor | None = None  # (out, groups) int64 in [0, 2**stat_bits)
    zero_codes: Tensor | None = None  # (out, groups) int64 in [0, 2**stat_bits)
    second: Tensor | None = None  # (row_groups, groups, 4) fp16: scale's (scale, zero), zero's (scale, zero)
    outlier_rows: Tensor | None = None  # (nnz,) int64
    outlier_cols: Tensor | None = None  # (nnz,) int64, permuted column index
    outlier_values: Tensor | None = None  # (nnz,) fp16: value added to the dense reconstruction
    # gptq / rtn only
    scales: Tensor | None = None  # (out, groups) fp16
    zeros: Tensor | None = None  # (out, groups) fp16


# ---- SpQR tiles -----------------------------------------------------------------------------------
def to_tiles(x: Tensor, rows: int, cols: int) -> Tensor:
    """(out, in)-like matrix -> (row_tiles, col_tiles, rows*cols) with zero padding, tile-major."""
    rt, ct = -(-x.shape[0] // rows), -(-x.shape[1] // cols)
    x = F.pad(x, (0, ct * cols - x.shape[1], 0, rt * rows - x.shape[0]))  # (rt*rows, ct*cols)
    return x.reshape(rt, rows, ct, cols).permute(0, 2, 1, 3).reshape(rt, ct, rows * cols)


def from_tiles(t: Tensor, rows: int, cols: int) -> Tensor:
    """Inverse of `to_tiles` without cropping: (rt, ct, rows*cols) -> (rt*rows, ct*cols)."""
    rt, ct = t.shape[:2]
    return t.reshape(rt, ct, rows, cols).permute(0, 2, 1, 3).reshape(rt * rows, ct * cols)


def pack_spqr_dense(u: UnpackedLinear) -> tuple[Tensor, Tensor, Tensor]:
    """codes (rt, ct, tile_words) int32, stats (rt, ct, tile_stat_words) int32, second (rt, ct, 4) fp16."""
    m = u.meta
    b1, b2 = m.groupsize, m.stat_groupsize
    codes = pack_bits(to_tiles(u.codes, b2, b1), m.wbits)  # (rt, ct, b2*b1*w/32)
    sc = to_tiles(u.scale_codes, b2, 1)  # (rt, ct, b2)
    zc = to_tiles(u.zero_codes, b2, 1)  # (rt, ct, b2)
    stats = pack_bits(torch.cat([sc, zc], dim=-1), m.stat_bits)  # (rt, ct, 2*b2*sb/32)
    return codes, stats, u.second.half()


def spqr_dense_rows(
    meta: LinearMeta, codes: Tensor, stats: Tensor, second: Tensor, tiles: slice
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Unpack the row tiles `tiles`: codes (R, ct*b1), scale/zero codes (R, ct) int64 and the four
    second-order numbers expanded per row (R, ct, 4) fp16, with R = rows of those tiles (padding included)."""
    b1, b2 = meta.groupsize, meta.stat_groupsize
    c = from_tiles(unpack_bits(codes[tiles], meta.wbits), b2, b1)  # (R, ct*b1)
    s = unpack_bits(stats[tiles], meta.stat_bits)  # (nt, ct, 2*b2)
    sc = from_tiles(s[..., :b2].contiguous(), b2, 1)  # (R, ct)
    zc = from_tiles(s[..., b2:].contiguous(), b2, 1)  # (R, ct)
    sec = second[tiles].repeat_interleave(b2, dim=0)  # (R, ct, 4)
    return c, sc, zc, sec


def spqr_dense_tiles(meta: LinearMeta, codes: Tensor, stats: Tensor, second: Tensor, tiles: slice) -> Tensor:
    """Dequantized dense part (no outliers) of the row tiles `tiles` -> (R, ct*b1) fp32, padding included.

    The same numbers as `spqr_dense_rows` + `spqr_group_stats` + `dense_from_groups`, computed in the tile
    order the codes are stored in (int32 unpacking, one strided write into the row-major result).
    """
    b1, b2 = meta.groupsize, meta.stat_groupsize
    c = unpack_bits(codes[tiles], meta.wbits, torch.int32)  # (nt, ct, b2*b1)
    nt, ct = c.shape[:2]
    s = unpack_bits(stats[tiles], meta.stat_bits, torch.int32)  # (nt, ct, 2*b2)
    sec = second[tiles].float().unsqueeze(-2)  # (nt, ct, 1, 4)
    scale = dequantize_codes(s[..., :b2], sec[..., 0], sec[..., 1])  # (nt, ct, b2)
    zero = dequantize_codes(s[..., b2:], sec[..., 2], sec[..., 3])  # (nt, ct, b2)
    tile_rows = c.view(nt, ct, b2, b1).permute(0, 2, 1, 3)  # (nt, b2, ct, b1) view
    scale, zero = scale.transpose(1, 2).unsqueeze(-1), zero.transpose(1, 2).unsqueeze(-1)  # (nt, b2, ct, 1)
    w = torch.empty(nt, b2, ct, b1, device=c.device)
    torch.mul(scale, tile_rows - zero, out=w)  # == dequantize_codes: int32 codes promote to fp32 exactly
    return w.view(nt * b2, ct * b1)


def spqr_group_stats(sc: Tensor, zc: Tensor, sec: Tensor) -> tuple[Tensor, Tensor]:
    """First-order (scale, zero) fp32 (..., groups) from their codes and the fp16 second-order stats."""
    scale = dequantize_codes(sc, sec[..., 0], sec[..., 1])
    zero = dequantize_codes(zc, sec[..., 2], sec[..., 3])
    return scale, zero


def dense_from_groups(codes: Tensor, scale: Tensor, zero: Tensor, groupsize: int) -> Tensor:
    """Dequantize codes (R, groups*groupsize) with per-row-per-group (R, groups) scale/zero -> fp32."""
    r, g = scale.shape
    c = codes.reshape(r, g, groupsize)  # (R, groups, groupsize)
    return dequantize_codes(c, scale.unsqueeze(-1), zero.unsqueeze(-1)).reshape(r, g * groupsize)


# ---- baselines ----------------------------------------------------------------------------------
def pack_rows(codes: Tensor, meta: LinearMeta) -> Tensor:
    """gptq/rtn codes (out, in) -> (out, row_words) int32, each row padded to a multiple of 32 codes."""
    pad = meta.row_words * 32 // meta.wbits - codes.shape[1]
    return pack_bits(F.pad(codes, (0, pad)), meta.wbits)


def baseline_rows(meta: LinearMeta, codes: Tensor, scales: Tensor, zeros: Tensor, rows: slice) -> Tensor:
    """Dequantize rows of a gptq/rtn layout -> (R, in) fp32."""
    c = unpack_bits(codes[rows], meta.wbits, torch.int32)  # (R, padded in)
    g = meta.groupsize
    c = F.pad(c, (0, meta.num_groups * g - c.shape[1]))[:, : meta.num_groups * g]  # (R, groups*g)
    return dense_from_groups(c, scales[rows], zeros[rows], g)[:, : meta.in_features]


def add_outliers(w: Tensor, row_ptr: Tensor, cols: Tensor, values: Tensor, rows: slice) -> Tensor:
    """Add the CSR outliers of rows `rows` to their dense reconstruction `w` (R, in) fp32, in place."""
    p0, p1 = int(row_ptr[rows.start]), int(row_ptr[rows.stop])
    if p1 > p0:
        r = csr_rows(row_ptr[rows.start : rows.stop + 1])  # (nnz_rows,) relative to rows.start
        c = decode_columns(cols[p0:p1])
        w[r, c] = w[r, c] + values[p0:p1].float()
    return w
