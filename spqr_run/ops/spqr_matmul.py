"""`spqr_matmul`: y = x @ W^T (+ bias) for a packed SpQR `QuantizedLinear`, on the CUDA kernels when possible.

Dispatch (`spqr_matmul`):
- CPU, or a layout/dtype without kernels -> `spqr_matmul_reference` (pure torch, the definition of the result);
- CUDA, fp16, 1..16 activation rows -> `spqr::matmul_rows`: the fused batch-1 GEMV for one row, the small-batch
  kernel (each weight tile decoded once for all rows) for 2..16 (kernels/spqr_matmul.cu);
- CUDA, fp16, more rows (prefill)   -> `spqr::dequantize` (fp16 W, stored column order) + cuBLAS on x[:, perm].

The two ops are `torch.library` custom ops with fake (meta) implementations, so `torch.compile` and CUDA
graphs can capture them; on a CPU tensor, or when the extension cannot be built, their body computes the
reference instead, so they run (and `torch.library.opcheck` passes) anywhere. GPTQ/RTN baseline layouts have
no kernels: they always take the reference path.
"""

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from spqr_run.ops.ext import load_extension
from spqr_run.quant.meta import LinearMeta
from spqr_run.quant.quantized import QuantizedLinear
from spqr_run.quant.spqr_matmul import spqr_matmul_reference

TILE = 16  # the kernels' beta1 = beta2
KERNEL_WBITS = (2, 3, 4)
KERNEL_STAT_BITS = (2, 3, 4)
MAX_SMALL_ROWS = 16  # up to this many activation rows use the small-batch kernel, more dequantize + cuBLAS


# ---- helpers --------------------------------------------------------------------------------------------
def _reference_layer(
    codes: Tensor,
    stats: Tensor,
    second: Tensor,
    outlier_values: Tensor,
    outlier_cols: Tensor,
    outlier_row_ptr: Tensor,
    perm: Tensor | None,
    wbits: int,
    stat_bits: int,
    out_features: int,
    in_features: int,
) -> QuantizedLinear:
    """The op arguments as a `QuantizedLinear` for the reference path (perm decoded to int64 indices)."""
    meta = LinearMeta(
        method="spqr",
        wbits=wbits,
        groupsize=TILE,
        stat_bits=stat_bits,
        stat_groupsize=TILE,
        out_features=out_features,
        in_features=in_features,
    )
    return QuantizedLinear(
        meta=meta,
        codes=codes,
        stats=stats,
        second=second,
        outlier_values=outlier_values,
        outlier_cols=outlier_cols,
        outlier_row_ptr=outlier_row_ptr,
        perm=perm,
    )


def _kernels_for(t: Tensor) -> Any:
    """The extension module when `t` is on CUDA and it builds, else None."""
    return load_extension() if t.is_cuda else None


# ---- custom ops -----------------------------------------------------------------------------------------
# Argument order: x, then the packed tensors, then the layer's numbers.
@torch.library.custom_op("spqr::matmul_rows", mutates_args=())
def matmul_rows(
    x: Tensor,
    codes: Tensor,
    stats: Tensor,
    second: Tensor,
    outlier_values: Tensor,
    outlier_cols: Tensor,
    outlier_row_ptr: Tensor,
    perm: Tensor | None,
    bias: Tensor | None,
    wbits: int,
    stat_bits: int,
    out_features: int,
    in_features: int,
) -> Tensor:
    """x (rows, in) fp16 with 1..16 rows -> (rows, out) fp16: the fused matvec for one row, the small-batch
    kernel (each weight tile decoded once for all rows) for more."""
    packed = (codes, stats, second, outlier_values, outlier_cols, outlier_row_ptr, perm)
    numbers = (wbits, stat_bits, out_features, in_features)
    ext = _kernels_for(x)
    if ext is not None:
        kernel = ext.matvec if x.shape[0] == 1 else ext.matmul_small
        return kernel(x, *packed, bias, *numbers)
    return spqr_matmul_reference(x, _reference_layer(*packed, *numbers), bias=bias)


@matmul_rows.register_fake
def _matmul_rows_fake(x: Tensor, *args: Any) -> Tensor:
    out_features = args[-2]
    return x.new_empty((*x.shape[:-1], out_features))


@torch.library.custom_op("spqr::dequantize", mutates_args=())
def dequantize(
    codes: Tensor,
    stats: Tensor,
    second: Tensor,
    outlier_values: Tensor,
    outlier_cols: Tensor,
    outlier_row_ptr: Tensor,
    wbits: int,
    stat_bits: int,
    out_features: int,
    in_features: int,
) -> Tensor:
    """The weight (out, in) fp16 in stored (permuted) column order, outliers included."""
    packed = (codes, stats, second, outlier_values, outlier_cols, outlier_row_ptr)
    numbers = (wbits, stat_bits, out_features, in_features)
    ext = _kernels_for(codes)
    if ext is not None:
        return ext.dequantize(*packed, *numbers)
    return _reference_layer(*packed, None, *numbers).dequantize().to(torch.float16)


@dequantize.register_fake
def _dequantize_fake(codes: Tensor, *args: Any) -> Tensor:
    out_features, in_features = args[-2], args[-1]
    return codes.new_empty((out_features, in_features), dtype=torch.float16)


# ---- dispatcher -----------------------------------------------------------------------------------------
def kernels_support(x: Tensor, q: QuantizedLinear) -> bool:
    """True when the CUDA kernels cover this input and layout (else the reference path runs)."""
    m = q.meta
    return (
        x.is_cuda
        and x.dtype == torch.float16
        and q.codes.device == x.device
        and m.method == "spqr"
        and m.groupsize == TILE
        and m.stat_groupsize == TILE
        and m.wbits in KERNEL_WBITS
        and m.stat_bits in KERNEL_STAT_BITS
    )


def spqr_matmul(x: Tensor, q: QuantizedLinear, bias: Tensor | None = None) -> Tensor:
    """x (..., in) -> (..., out) in x's dtype, like `spqr_matmul_reference(x, q, bias=bias)`.

    CUDA fp16 inputs of spqr layers run the kernels (dispatch in the module docstring); everything else, and
    every input when the extension cannot be built (one warning), runs the reference.
    """
    m = q.meta
    if not kernels_support(x, q) or load_extension() is None:
        return spqr_matmul_reference(x, q, bias=bias)
    if x.shape[-1] != m.in_features:
        raise ValueError(f"input has {x.shape[-1]} features, the layer expects {m.in_features}")
    x2 = x.reshape(-1, m.in_features).contiguous()  # (tokens, in)
    rows = x2.shape[0]
    if rows == 0:
        return x.new_empty((*x.shape[:-1], m.out_features))
    perm = q.perm  # int16 holding unsigned 16-bit indices, as stored and as the kernels read it
    numbers = (m.wbits, m.stat_bits, m.out_features, m.in_features)
    outliers = (q.outlier_values, q.outlier_cols, q.outlier_row_ptr)
    if rows <= MAX_SMALL_ROWS:
        if bias is not None and bias.dtype not in (torch.float16, torch.float32):
            bias = bias.float()
        y = torch.ops.spqr.matmul_rows(
            x2, q.codes, q.stats, q.second, *outliers, perm, bias, *numbers
        )  # (tokens, out)
    else:
        # (out, in) fp16 weight in stored column order
        w = torch.ops.spqr.dequantize(q.codes, q.stats, q.second, *outliers, *numbers)
        xp = x2 if perm is None else x2.index_select(1, q.perm_indices())  # (tokens, in) stored order
        y = F.linear(xp, w, None if bias is None else bias.to(torch.float16))  # (tokens, out)
    return y.reshape(*x.shape[:-1], m.out_features)
