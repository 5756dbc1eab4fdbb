"""Reading `.spqr` format 1 spqr linears: their tensors converted, exactly, to the current (format 3) layout.

Format 1 stored an spqr linear (groupsize = stat_groupsize = 16) as::

    codes            int32  (RT, CT, 8*wbits)   each 16 x 16 tile's 256 codes row-major, one little-endian
                                                 bit stream (`packing.pack_bits`; 3-bit codes straddle words)
    stats            int32  (RT, CT, stat_bits) the tile's 16 scale codes then its 16 zero codes, one stream
    second           fp16   (RT, CT, 4)         [s_scale, z_scale, s_zero, z_zero]
    outlier_values   fp16   (nnz,)              deltas, CSR order
    outlier_cols     int16  (nnz,)              unsigned 16-bit stored column
    outlier_row_ptr  int32  (out+1,)
    perm             int16  (in,)               optional, unchanged since

with CT = ceil(in/16). The codes and statistics decode to the same integers and fp16 numbers that
the current format packs (`tile_layout.pack`), so the converted linear dequantizes bit for bit as the format 1 one did.
gptq/rtn linears did not change between the formats.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from spqr_run.errors import ModelFormatError
from spqr_run.quant import tile_layout
from spqr_run.quant.meta import LinearMeta
from spqr_run.quant.packing import unpack_bits

V1_SPQR_TENSORS = ("codes", "stats", "second", "outlier_values", "outlier_cols", "outlier_row_ptr")


def v1_specs(meta: LinearMeta, nnz: int) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    """dtype and shape of each required format 1 spqr tensor (`perm` optional, checked after conversion)."""
    rt, ct = meta.num_row_groups, meta.num_groups
    return {
        "codes": (torch.int32, (rt, ct, 8 * meta.wbits)),
        "stats": (torch.int32, (rt, ct, meta.stat_bits)),
        "second": (torch.float16, (rt, ct, 4)),
        "outlier_values": (torch.float16, (nnz,)),
        "outlier_cols": (torch.int16, (nnz,)),
        "outlier_row_ptr": (torch.int32, (meta.out_features + 1,)),
    }


def _from_tiles(t: Tensor, cols: int) -> Tensor:
    """(RT, CT, 16*cols) tile-major values -> (RT*16, CT*cols) row-major matrix."""
    rt, ct = t.shape[:2]
    return t.reshape(rt, ct, 16, cols).permute(0, 2, 1, 3).reshape(rt * 16, ct * cols)


def convert_v1_tensors(tensors: Mapping[str, Tensor], meta: LinearMeta, source: str) -> dict[str, Tensor]:
    """A format 1 linear's tensors -> the current-format tensors of the same linear (gptq/rtn: unchanged).

    Checks the format 1 names, dtypes and shapes first (ModelFormatError naming `source` and the tensor);
    the result still goes through `QuantizedLinear.from_tensors`, which checks the values (finite fp16
    numbers, CSR structure, columns, permutation).
    """
    if meta.method != "spqr":
        return dict(tensors)
    values = tensors.get("outlier_values")
    nnz = int(values.shape[0]) if isinstance(values, Tensor) and values.ndim == 1 else 0
    specs = v1_specs(meta, nnz)
    unknown = sorted(set(tensors) - set(specs) - {"perm"})
    if unknown:
        raise ModelFormatError(
            f"{source}: unexpected tensor(s) {', '.join(unknown)} for a format 1 spqr linear"
        )
    for name, (dtype, shape) in specs.items():
        t = tensors.get(name)
        if not isinstance(t, Tensor):
            raise ModelFormatError(f"{source}: missing tensor {name!r} (format 1)")
        if t.dtype != dtype or tuple(t.shape) != shape:
            raise ModelFormatError(
                f"{source}: format 1 tensor {name!r} is {t.dtype} {tuple(t.shape)}, expected {dtype} {shape}"
            )
    out, inp, wbits, sb = meta.out_features, meta.in_features, meta.wbits, meta.stat_bits
    codes = _from_tiles(unpack_bits(tensors["codes"], wbits, torch.uint8), 16)[:out, :inp]  # (out, in)
    stats = unpack_bits(tensors["stats"], sb, torch.uint8)  # (RT, CT, 32): 16 scale codes, 16 zero codes
    scale_codes = _from_tiles(stats[..., :16].contiguous(), 1)[:out]  # (out, CT)
    zero_codes = _from_tiles(stats[..., 16:].contiguous(), 1)[:out]  # (out, CT)
    tiles = tile_layout.pack(codes, scale_codes, zero_codes, tensors["second"], wbits, sb)
    row_ptr = tensors["outlier_row_ptr"]
    if int(row_ptr[-1]) != nnz:  # pack_outliers pads the pointers with the last one
        raise ModelFormatError(f"{source}: tensor 'outlier_row_ptr' does not end at the {nnz} outliers")
    outliers, row_ptr = tile_layout.pack_outliers(row_ptr, tensors["outlier_cols"], values, out)
    converted = {"tiles": tiles, "outliers": outliers, "outlier_row_ptr": row_ptr}
    if "perm" in tensors:
        converted["perm"] = tensors["perm"]
    return converted
