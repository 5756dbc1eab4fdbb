"""`QuantizedLinear`: one linear's packed tensors, exactly as the file stores them and a kernel reads them.

SpQR layout (beta2 x beta1 = 16 x 16 tiles, details and drawings in docs/FORMAT.md)::

    codes            int32  (row_tiles, col_tiles, 16*16*wbits/32)  256 codes a tile, row-major, bit-packed
    stats            int32  (row_tiles, col_tiles, 2*16*stat_bits/32) 16 scale codes then 16 zero codes
    second           fp16   (row_tiles, col_tiles, 4)  [scale.scale, scale.zero, zero.scale, zero.zero]
    outlier_values   fp16   (nnz,)        added to the dense reconstruction (w = dense + value)
    outlier_cols     int16  (nnz,)        unsigned 16-bit permuted column index (bit pattern)
    outlier_row_ptr  int32  (out+1,)      CSR row pointers
    perm             int16  (in,)         optional: permuted column j is input feature perm[j] (unsigned)

gptq / rtn layout: `codes` int32 (out, ceil(in/32)*wbits), `scales`/`zeros` fp16 (out, groups), `perm`.
`perm` holds unsigned 16-bit indices as int16 bit patterns (like `outlier_cols`): read it with
`perm_indices()`, never `perm.long()` (wrong above 32767).

Reconstruction, shared by the quantizer, `dequantize` and kernels (all fp32, `grid.dequantize_codes`):
    s = second[0] * (scale_code - second[1]);  z = second[2] * (zero_code - second[3])
    w[r, j] = s * (code - z)  (+ outlier value where stored)
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

import torch
from torch import Tensor

from spqr_run.quant.layout import (
    UnpackedLinear,
    add_outliers,
    baseline_rows,
    pack_rows,
    pack_spqr_dense,
    spqr_dense_rows,
    spqr_dense_tiles,
)
from spqr_run.quant.meta import LinearMeta
from spqr_run.quant.packing import coo_to_csr, csr_rows, decode_columns, encode_columns, unpack_bits
from spqr_run.quant.validate import TENSOR_NAMES, validate_tensors


@dataclass
class QuantizedLinear:
    """The packed tensors of one quantized linear (layout in the module docstring and docs/FORMAT.md).

    Construct with `pack(unpacked)` (the quantizer) or `from_tensors` (a file: validated); the plain
    constructor trusts its arguments.
    """

    meta: LinearMeta
    codes: Tensor
    stats: Tensor | None = None
    second: Tensor | None = None
    scales: Tensor | None = None
    zeros: Tensor | None = None
    outlier_values: Tensor | None = None
    outlier_cols: Tensor | None = None
    outlier_row_ptr: Tensor | None = None
    perm: Tensor | None = None

    # ---- construction ---------------------------------------------------------------------------
    @classmethod
    def pack(cls, u: UnpackedLinear) -> QuantizedLinear:
        """Pack plain codes and statistics into the stored layout."""
        m = u.meta
        perm = None if u.perm is None else encode_columns(u.perm)
        if m.method != "spqr":
            return cls(
                meta=m, codes=pack_rows(u.codes, m), scales=u.scales.half(), zeros=u.zeros.half(), perm=perm
            )
        codes, stats, second = pack_spqr_dense(u)
        row_ptr, cols, values = coo_to_csr(u.outlier_rows, u.outlier_cols, u.outlier_values, m.out_features)
        return cls(
            meta=m,
            codes=codes,
            stats=stats,
            second=second,
            outlier_values=values,
            outlier_cols=cols,
            outlier_row_ptr=row_ptr,
            perm=perm,
        )

    def tensors(self) -> dict[str, Tensor]:
        """The stored tensors by name (the container prefixes them with the module name)."""
        return {
            f.name: getattr(self, f.name)
            for f in fields(self)
            if f.name != "meta" and getattr(self, f.name) is not None
        }

    @classmethod
    def from_tensors(
        cls, tensors: Mapping[str, Tensor], *, meta: LinearMeta | Mapping[str, Any], source: str
    ) -> QuantizedLinear:
        """Validate every name, dtype, shape and index of untrusted tensors; raises ModelFormatError."""
        if not isinstance(meta, LinearMeta):
            meta = LinearMeta.from_dict(dict(meta), source=source)
        validate_tensors(tensors, meta, source)
        return cls(meta=meta, **{name: tensors[name] for name in TENSOR_NAMES if name in tensors})

    def perm_indices(self) -> Tensor | None:
        """The stored column permutation as int64 indices (None: identity); stored column j = input perm[j]."""
        return None if self.perm is None else decode_columns(self.perm)

    # ---- sizes ----------------------------------------------------------------------------------
    @property
    def num_params(self) -> int:
        return self.meta.out_features * self.meta.in_features

    @property
    def num_outliers(self) -> int:
        return 0 if self.outlier_values is None else int(self.outlier_values.numel())

    @property
    def outlier_fraction(self) -> float:
        return self.num_outliers / self.num_params

    @property
    def nbytes(self) -> int:
        """Bytes of all stored tensors (what the file holds for this linear, header excluded)."""
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    @property
    def avg_bits(self) -> float:
        """Stored bits per weight: nbytes * 8 / (out * in), padding, row pointers and perm included."""
        return self.nbytes * 8 / self.num_params

    # ---- reconstruction -------------------------------------------------------------------------
    def dequantize(self, rows: slice | None = None, *, dtype: torch.dtype = torch.float32) -> Tensor:
        """Reconstructed rows (R, in), *permuted* columns; decodes only the tiles covering `rows`."""
        m = self.meta
        start, stop, step = (rows or slice(None)).indices(m.out_features)
        if step != 1:
            raise ValueError("dequantize needs a contiguous row slice")
        stop = max(stop, start)
        if m.method == "spqr":
            b2 = m.stat_groupsize
            t0, t1 = start // b2, -(-stop // b2)
            w = spqr_dense_tiles(m, self.codes, self.stats, self.second, slice(t0, t1))  # (R, groups*b1)
            r0, r1 = start - t0 * b2, stop - t0 * b2
            if (r0, r1, w.shape[1]) != (0, w.shape[0], m.in_features):  # crop tile padding
                w = w[r0:r1, : m.in_features].contiguous()
            w = add_outliers(
                w,
                self.outlier_row_ptr,
                self.outlier_cols,
                self.outlier_values,
                slice(start, stop),
            )
        else:
            w = baseline_rows(m, self.codes, self.scales, self.zeros, slice(start, stop))
        return w.to(dtype)

    def unpack(self) -> UnpackedLinear:
        """All codes and statistics as plain tensors (inverse of `pack`; for tests and tools)."""
        m = self.meta
        perm = self.perm_indices()
        if m.method != "spqr":
            codes = unpack_bits(self.codes, m.wbits)[:, : m.in_features]
            return UnpackedLinear(meta=m, codes=codes, perm=perm, scales=self.scales, zeros=self.zeros)
        rg = m.num_row_groups
        c, sc, zc, _ = spqr_dense_rows(m, self.codes, self.stats, self.second, slice(0, rg))
        out, inp = m.out_features, m.in_features
        return UnpackedLinear(
            meta=m,
            codes=c[:out, :inp],
            perm=perm,
            scale_codes=sc[:out],
            zero_codes=zc[:out],
            second=self.second,
            outlier_rows=csr_rows(self.outlier_row_ptr),
            outlier_cols=decode_columns(self.outlier_cols),
            outlier_values=self.outlier_values,
        )
