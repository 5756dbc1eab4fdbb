"""`spqr_matmul`: y = x @ W^T (+ bias) for a packed SpQR `QuantizedLinear` (v2 `tiles` layout), on the CUDA
kernels when possible.

Two entry points:
- `spqr_matmul(x, q, bias)`: x in input-feature order; gathers x[..., perm] itself, then as below;
- `spqr_matmul_stored(x_stored, q, bias)`: x already in the layer's stored column order (x[..., perm]), for
  callers that permute once for several linears sharing an input (fused q/k/v, gate/up).

Dispatch (`spqr_matmul_stored`):
- CPU, or a layout/dtype without kernels -> the pure-torch reference (`spqr_matmul_reference` semantics);
- CUDA, fp16, 1..16 activation rows -> `spqr::matmul_small`: the tensor-core small-batch kernel (split-K,
  deterministic reduction; kernels/spqr_matmul.cu);
- CUDA, fp16, more rows (prefill) -> `spqr::dequantize` (fp16 W, stored column order, one launch) + cuBLAS.

The ops are `torch.library` custom ops with fake (meta) implementations, so `torch.compile` and CUDA graphs can
capture them; on a CPU tensor, or when the extension cannot be built, their body computes the reference
instead, so they run (and `torch.library.opcheck` passes) anywhere. GPTQ/RTN layouts have no kernels.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from spqr_run.ops.ext import load_extension
from spqr_run.quant import tile_layout
from spqr_run.quant.grid import dequantize_codes
from spqr_run.quant.spqr_matmul import spqr_matmul_reference

TILE = 16  # the kernels' beta1 = beta2
KERNEL_WBITS = (2, 3, 4)
KERNEL_STAT_BITS = (2, 3, 4)
MAX_SMALL_ROWS = 16  # up to this many activation rows use the small-batch kernel, more dequantize + cuBLAS
REFERENCE_BLOCK_ELEMENTS = 1 << 22  # the reference dequantizes about this many weights at a time


# ---- the reference on the raw v2 tensors (the ops' CPU / fallback body) ---------------------------------------
def reference_weight(
    tiles: Tensor,
    outliers: Tensor,
    outlier_row_ptr: Tensor,
    wbits: int,
    stat_bits: int,
    out_features: int,
    in_features: int,
    row_tiles: slice | None = None,
) -> Tensor:
    """The weight of row tiles `row_tiles` (default all) as fp32 (rows, in), stored column order, outliers
    included: `grid.dequantize_codes` on `tile_layout.unpack` (KERNELS_V2_SPEC.md section 2, "the one formula").
    """
    t0, t1, _ = (row_tiles or slice(None)).indices(tiles.shape[0])
    r0, r1 = t0 * TILE, min(t1 * TILE, out_features)
    codes, sc, zc, second = tile_layout.unpack(tiles[t0:t1], r1 - r0, in_features, wbits, stat_bits)
    sec = second.float().repeat_interleave(TILE, dim=0)[: r1 - r0]  # (rows, groups, 4)
    scale = dequantize_codes(sc, sec[..., 0], sec[..., 1])  # (rows, groups)
    zero = dequantize_codes(zc, sec[..., 2], sec[..., 3])
    cols = torch.arange(in_features, device=tiles.device) // TILE
    w = dequantize_codes(codes, scale[:, cols], zero[:, cols])  # (rows, in) fp32
    ptr = outlier_row_ptr.long()
    p0, p1 = int(ptr[r0]), int(ptr[r1])
    if p1 > p0:
        words = outliers[p0:p1].long() & 0xFFFFFFFF
        rows = torch.repeat_interleave(
            torch.arange(r1 - r0, device=w.device), ptr[r0 + 1 : r1 + 1] - ptr[r0:r1]
        )
        v = words & 0xFFFF
        vals = torch.where(v > 0x7FFF, v - 0x10000, v).to(torch.int16).view(torch.float16).float()
        w.index_put_((rows, words >> 16), vals, accumulate=True)
    return w


def _reference_stored(x_stored: Tensor, weight_rows, out_features: int, bias: Tensor | None) -> Tensor:
    """x_stored (tokens, in) -> (tokens, out) in x's dtype: fp32 products and sums, bias in fp32, one rounding.
    weight_rows(t0, t1) gives the fp32 weight of row tiles t0..t1-1."""
    xf = x_stored.float()
    in_features = x_stored.shape[-1]
    y = torch.empty(xf.shape[0], out_features, device=x_stored.device, dtype=torch.float32)
    step = max(1, (REFERENCE_BLOCK_ELEMENTS // max(in_features, 1)) // TILE)  # row tiles a block
    row_tiles = -(-out_features // TILE)
    for t0 in range(0, row_tiles, step):
        t1 = min(t0 + step, row_tiles)
        y[:, t0 * TILE : min(t1 * TILE, out_features)] = xf @ weight_rows(t0, t1).T
    if bias is not None:
        y += bias.float()
    return y.to(x_stored.dtype)


def _kernels_for(t: Tensor) -> Any:
    """The extension module when `t` is on CUDA and it builds, else None."""
    return load_extension() if t.is_cuda else None


# ---- custom ops ---------------------------------------------------------------------------------------------
# Argument order: activations, then the packed tensors, then the layer's numbers.
@torch.library.custom_op("spqr::matmul_small", mutates_args=())
def matmul_small(
    x_stored: Tensor,
    tiles: Tensor,
    outliers: Tensor,
    outlier_row_ptr: Tensor,
    bias: Tensor | None,
    wbits: int,
    stat_bits: int,
    out_features: int,
    in_features: int,
) -> Tensor:
    """x_stored (rows, in) fp16 with 1..16 rows, stored column order -> (rows, out) fp16 (tensor-core kernel)."""
    packed = (tiles, outliers, outlier_row_ptr)
    numbers = (wbits, stat_bits, out_features, in_features)
    ext = _kernels_for(x_stored)
    if ext is not None:
        return ext.matmul_small(x_stored, *packed, bias, *numbers)

    def rows(t0: int, t1: int) -> Tensor:
        return reference_weight(*packed, *numbers, row_tiles=slice(t0, t1))

    return _reference_stored(x_stored, rows, out_features, bias)


@matmul_small.register_fake
def _matmul_small_fake(x_stored: Tensor, *args: Any) -> Tensor:
    out_features = args[-2]
    return x_stored.new_empty((x_stored.shape[0], out_features))


@torch.library.custom_op("spqr::dequantize", mutates_args=())
def dequantize(
    tiles: Tensor,
    outliers: Tensor,
    outlier_row_ptr: Tensor,
    wbits: int,
    stat_bits: int,
    out_features: int,
    in_features: int,
) -> Tensor:
    """The weight (out, in) fp16 in stored (permuted) column order, outliers included (one launch on CUDA)."""
    packed = (tiles, outliers, outlier_row_ptr)
    numbers = (wbits, stat_bits, out_features, in_features)
    ext = _kernels_for(tiles)
    if ext is not None:
        return ext.dequantize(*packed, *numbers)
    return reference_weight(*packed, *numbers).to(torch.float16)


@dequantize.register_fake
def _dequantize_fake(tiles: Tensor, *args: Any) -> Tensor:
    out_features, in_features = args[-2], args[-1]
    return tiles.new_empty((out_features, in_features), dtype=torch.float16)


# ---- dispatcher -----------------------------------------------------------------------------------------
def kernels_support(x: Tensor, q: Any) -> bool:
    """True when the CUDA kernels cover this input and layer (else the reference path runs)."""
    m = q.meta
    return (
        x.is_cuda
        and x.dtype == torch.float16
        and m.method == "spqr"
        and getattr(q, "tiles", None) is not None
        and q.tiles.device == x.device
        and m.groupsize == TILE
        and m.stat_groupsize == TILE
        and m.wbits in KERNEL_WBITS
        and m.stat_bits in KERNEL_STAT_BITS
    )


def _check_features(x: Tensor, q: Any) -> None:
    if x.shape[-1] != q.meta.in_features:
        raise ValueError(f"input has {x.shape[-1]} features, the layer expects {q.meta.in_features}")


def spqr_matmul_stored(x_stored: Tensor, q: Any, bias: Tensor | None = None) -> Tensor:
    """x_stored (..., in), already permuted to the layer's stored column order (`x[..., q.perm_indices()]`)
    -> (..., out) in x's dtype. Kernels for CUDA fp16 spqr layers (dispatch in the module docstring), else the
    reference: fp32 products and sums of x_stored with `q.dequantize()` (stored order), bias in fp32.

    Raises ValueError when the last dim is not the layer's in_features.
    """
    _check_features(x_stored, q)
    m = q.meta
    if not kernels_support(x_stored, q) or load_extension() is None:
        x2 = x_stored.reshape(-1, m.in_features)

        def rows(t0: int, t1: int) -> Tensor:
            return q.dequantize(slice(t0 * TILE, min(t1 * TILE, m.out_features))).float()

        y = _reference_stored(x2, rows, m.out_features, bias)
        return y.reshape(*x_stored.shape[:-1], m.out_features)
    x2 = x_stored.reshape(-1, m.in_features).contiguous()  # (tokens, in)
    tokens = x2.shape[0]
    if tokens == 0:
        return x_stored.new_empty((*x_stored.shape[:-1], m.out_features))
    numbers = (m.wbits, m.stat_bits, m.out_features, m.in_features)
    packed = (q.tiles, q.outliers, q.outlier_row_ptr)
    if tokens <= MAX_SMALL_ROWS:
        if bias is not None and bias.dtype not in (torch.float16, torch.float32):
            bias = bias.float()
        y = torch.ops.spqr.matmul_small(x2, *packed, bias, *numbers)  # (tokens, out)
    else:
        w = torch.ops.spqr.dequantize(*packed, *numbers)  # (out, in) fp16, stored column order
        y = F.linear(x2, w, None if bias is None else bias.to(torch.float16))  # (tokens, out), cuBLAS
    return y.reshape(*x_stored.shape[:-1], m.out_features)


def spqr_matmul(x: Tensor, q: Any, bias: Tensor | None = None) -> Tensor:
    """x (..., in) in input-feature order -> (..., out) in x's dtype, like `spqr_matmul_reference(x, q,
    bias=bias)`: gathers x[..., perm] once, then `spqr_matmul_stored`. CPU inputs, layouts without kernels,
    and every input when the extension cannot be built (one warning) run the reference."""
    _check_features(x, q)
    if not kernels_support(x, q) or load_extension() is None:
        return spqr_matmul_reference(x, q, bias=bias)
    perm = q.perm_indices()
    x_stored = x if perm is None else x.index_select(-1, perm)
    return spqr_matmul_stored(x_stored, q, bias)
