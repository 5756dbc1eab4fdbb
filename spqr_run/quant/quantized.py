"""`QuantizedLinear`: one linear's packed tensors, exactly as the file stores them and a kernel reads them.

SpQR layout, format version 3 (details and drawings in docs/FORMAT.md; bit positions in `tile_layout`)::

    tiles            int32  (RT, KB, R)    one record per 16 rows x 64 stored columns, row-tile major:
                                           codes in mma fragment order, 128 stat codes, 16 fp16 second-order
    outliers         int32  (nnz,)         bits 0..15 fp16 delta, bits 16..31 stored column (unsigned);
                                           sorted by row, then column
    outlier_row_ptr  int32  (RT*16+1,)     CSR row pointers over the padded rows (padding rows empty)
    perm             int16  (in,)          optional: stored column j is input feature perm[j] (unsigned)

RT = ceil(out/16), KB = ceil(in/64), R = 32*wbits + 4*stat_bits + 8.
gptq / rtn layout: `codes` int32 (out, ceil(in/32)*wbits), `scales`/`zeros` fp16 (out, groups), `perm`.
`perm` holds unsigned 16-bit indices as int16 bit patterns: read it with `perm_indices()`, never
`perm.long()` (wrong above 32767).

Reconstruction, shared by the quantizer, `dequantize` and kernels (all fp32, `grid.dequantize_codes`):
    s = second[0] * (scale_code - second[1]);  z = second[2] * (zero_code - second[3])
    w[r, j] = s * (code - z)  (+ outlier delta where stored)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields, replace
from typing import Any

import torch
from torch import Tensor

from spqr_run.quant import tile_layout
from spqr_run.quant.layout import (
    UnpackedLinear,
    add_outliers,
    baseline_rows,
    pack_rows,
    pack_spqr_dense,
    spqr_dense_rows,
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
    tiles: Tensor | None = None  # spqr: (RT, KB, R) int32
    outliers: Tensor | None = None  # spqr: (nnz,) int32
    outlier_row_ptr: Tensor | None = None  # spqr: (RT*16 + 1,) int32
    codes: Tensor | None = None  # gptq/rtn: (out, row_words) int32
    scales: Tensor | None = None  # gptq/rtn: (out, groups) fp16
    zeros: Tensor | None = None  # gptq/rtn: (out, groups) fp16
    perm: Tensor | None = None  # (in,) int16, unsigned bit patterns

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
        row_ptr, cols, values = coo_to_csr(u.outlier_rows, u.outlier_cols, u.outlier_values, m.out_features)
        outliers, row_ptr = tile_layout.pack_outliers(row_ptr, cols, values, m.out_features)
        return cls(meta=m, tiles=pack_spqr_dense(u), outliers=outliers, outlier_row_ptr=row_ptr, perm=perm)

    @classmethod
    def concat_rows(cls, parts: Sequence[QuantizedLinear]) -> QuantizedLinear:
        """Stack the rows of linears that read the same input (q, k, v; gate, up) into one linear.

        All parts must have the same method, wbits, stat bits, in_features and permutation (both absent
        or equal); for spqr every part but the last must have out_features % 16 == 0, so row tiles never
        straddle parts. The result's `dequantize()` equals the row-concatenation of the parts'
        dequantized weights (rows of part i follow those of part i-1). Raises ValueError otherwise.
        """
        if not parts:
            raise ValueError("concat_rows needs at least one linear")
        first = parts[0].meta
        for i, q in enumerate(parts):
            m = q.meta
            if replace(m, out_features=first.out_features) != first:
                raise ValueError(f"concat_rows: part {i} has another method, bit width or in_features")
            p0, p = parts[0].perm, q.perm
            if (p0 is None) != (p is None) or (p is not None and not torch.equal(p, p0)):
                raise ValueError(f"concat_rows: part {i} has another input permutation than part 0")
            if m.method == "spqr" and i < len(parts) - 1 and m.out_features % tile_layout.ROWS:
                raise ValueError(
                    f"concat_rows: part {i} has {m.out_features} rows, not a multiple of {tile_layout.ROWS}"
                    " (only the last part may end inside a row tile)"
                )
        meta = replace(first, out_features=sum(q.meta.out_features for q in parts))
        if first.method != "spqr":
            cat = {k: torch.cat([getattr(q, k) for q in parts]) for k in ("codes", "scales", "zeros")}
            return cls(meta=meta, perm=parts[0].perm, **cat)
        ptrs, offset = [], 0
        for q in parts:  # each part's pointers without their padding rows, shifted by the outliers before
            ptrs.append(q.outlier_row_ptr[: q.meta.out_features].long() + offset)
            offset += int(q.outlier_row_ptr[-1])
        rows_padded = meta.num_row_groups * tile_layout.ROWS
        ptrs.append(
            torch.full(
                (rows_padded + 1 - meta.out_features,), offset, dtype=torch.long, device=ptrs[0].device
            )
        )
        return cls(
            meta=meta,
            tiles=torch.cat([q.tiles for q in parts]),
            outliers=torch.cat([q.outliers for q in parts]),
            outlier_row_ptr=torch.cat(ptrs).to(torch.int32),
            perm=parts[0].perm,
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
        return 0 if self.outliers is None else int(self.outliers.numel())

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
            rows_per_tile = tile_layout.ROWS
            t0, t1 = start // rows_per_tile, -(-stop // rows_per_tile)
            w = spqr_dense_rows(m, self.tiles, slice(t0, t1))  # (16*(t1-t0), KB*64), padding included
            r0, r1 = start - t0 * rows_per_tile, stop - t0 * rows_per_tile
            if (r0, r1, w.shape[1]) != (0, w.shape[0], m.in_features):  # crop tile padding
                w = w[r0:r1, : m.in_features].contiguous()
            w = add_outliers(w, self.outliers, self.outlier_row_ptr, slice(start, stop))
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
        codes, sc, zc, second = tile_layout.unpack(
            self.tiles, m.out_features, m.in_features, m.wbits, m.stat_bits
        )
        row_ptr, cols, values = tile_layout.unpack_outliers(
            self.outliers, self.outlier_row_ptr, m.out_features
        )
        return UnpackedLinear(
            meta=m,
            codes=codes.long(),
            perm=perm,
            scale_codes=sc.long(),
            zero_codes=zc.long(),
            second=second,
            outlier_rows=csr_rows(row_ptr),
            outlier_cols=cols,
            outlier_values=values,
        )
