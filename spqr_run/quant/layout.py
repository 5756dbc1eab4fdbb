"""`UnpackedLinear` (codes as plain integers) <-> packed tensors, and the dequantization of row ranges.

The packed arrangement is drawn in docs/FORMAT.md. SpQR: records of 16 rows x 64 stored columns in mma
fragment order (`tile_layout`, the single source of truth for bit positions). Baselines: one bit-packed run
of codes per row, padded to a multiple of 32 codes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from torch.nn import functional as F

from spqr_run.quant import tile_layout
from spqr_run.quant.grid import dequantize_codes
from spqr_run.quant.meta import LinearMeta
from spqr_run.quant.packing import csr_rows, pack_bits, unpack_bits


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


# ---- SpQR (v2 records, spqr_run/quant/tile_layout.py) -------------------------------------------------
def pack_spqr_dense(u: UnpackedLinear) -> Tensor:
    """The dense part of an spqr `UnpackedLinear` -> tiles int32 (RT, KB, R) (`tile_layout.pack`)."""
    m = u.meta
    return tile_layout.pack(u.codes, u.scale_codes, u.zero_codes, u.second, m.wbits, m.stat_bits)


def spqr_dense_rows(meta: LinearMeta, tiles: Tensor, row_tiles: slice) -> Tensor:
    """Dequantized dense part (no outliers) of the row tiles `row_tiles` -> (16*nt, KB*64) fp32, padding
    included (padded positions hold 0: codes and stats 0, second-order numbers 0).

    THE formula (`grid.dequantize_codes`, all fp32): scale = s_scale*(scale_code - z_scale),
    zero = s_zero*(zero_code - z_zero), w = scale*(code - zero); bit-identical to the quantizer's values.
    """
    t = tiles[row_tiles]  # (nt, KB, R)
    nt, kb = t.shape[:2]
    rows, cols = nt * tile_layout.ROWS, kb * tile_layout.COLS
    codes, sc, zc, sec = tile_layout.unpack(t, rows, cols, meta.wbits, meta.stat_bits)
    # codes (rows, cols) uint8; sc, zc (rows, groups) uint8; sec (nt, groups, 4) fp16
    sec = sec.float().repeat_interleave(tile_layout.ROWS, dim=0)  # (rows, groups, 4)
    scale = dequantize_codes(sc, sec[..., 0], sec[..., 1]).unsqueeze(-1)  # (rows, groups, 1)
    zero = dequantize_codes(zc, sec[..., 2], sec[..., 3]).unsqueeze(-1)  # (rows, groups, 1)
    # == dequantize_codes(codes, scale, zero), computed in one fp32 buffer: (code - zero) * scale
    w = torch.sub(codes.view(rows, -1, tile_layout.GROUP), zero)  # (rows, groups, 16): uint8 -> fp32 exactly
    return w.mul_(scale).view(rows, cols)


def add_outliers(w: Tensor, outliers: Tensor, row_ptr: Tensor, rows: slice) -> Tensor:
    """Add the outlier deltas of rows `rows` to their dense reconstruction `w` (R, in) fp32, in place."""
    p0, p1 = int(row_ptr[rows.start]), int(row_ptr[rows.stop])
    if p1 > p0:
        ptr, c, v = tile_layout.unpack_outliers(
            outliers[p0:p1], row_ptr[rows.start : rows.stop + 1] - p0, rows.stop - rows.start
        )
        r = csr_rows(ptr)  # (nnz_rows,) relative to rows.start
        w[r, c] = w[r, c] + v.float()
    return w


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
