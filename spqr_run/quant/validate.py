"""Validation of one linear's packed tensors read from an untrusted file (raises ModelFormatError)."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from spqr_run.errors import ModelFormatError
from spqr_run.quant.meta import LinearMeta
from spqr_run.quant.packing import MAX_COLUMN_INDEX, decode_columns

TENSOR_NAMES = (
    "codes",
    "stats",
    "second",
    "scales",
    "zeros",
    "outlier_values",
    "outlier_cols",
    "outlier_row_ptr",
    "perm",
)


def expected_specs(meta: LinearMeta, nnz: int) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    """Required tensors (dtype, shape) of a layout; `perm` (int16, (in,)) is optional everywhere."""
    out, g = meta.out_features, meta.num_groups
    if meta.method != "spqr":
        return {
            "codes": (torch.int32, (out, meta.row_words)),
            "scales": (torch.float16, (out, g)),
            "zeros": (torch.float16, (out, g)),
        }
    rt = meta.num_row_groups
    return {
        "codes": (torch.int32, (rt, g, meta.tile_words)),
        "stats": (torch.int32, (rt, g, meta.tile_stat_words)),
        "second": (torch.float16, (rt, g, 4)),
        "outlier_values": (torch.float16, (nnz,)),
        "outlier_cols": (torch.int16, (nnz,)),
        "outlier_row_ptr": (torch.int32, (out + 1,)),
    }


def validate_tensors(tensors: Mapping[str, Tensor], meta: LinearMeta, source: str) -> None:
    """Check names, dtypes, shapes, finiteness, CSR structure and the permutation."""
    nnz = _nnz(tensors)
    specs = expected_specs(meta, nnz)
    unknown = sorted(set(tensors) - set(specs) - {"perm"})
    if unknown:
        raise ModelFormatError(
            f"{source}: unexpected tensor(s) {', '.join(unknown)} for a {meta.method} linear"
        )
    for name, (dtype, shape) in specs.items():
        if name not in tensors:
            raise ModelFormatError(f"{source}: missing tensor {name!r}")
        _check(tensors[name], name, dtype, shape, source)
    for name in ("second", "scales", "zeros", "outlier_values"):
        if name in specs and not bool(torch.isfinite(tensors[name]).all()):
            raise ModelFormatError(f"{source}: tensor {name!r} holds inf or nan")
    if meta.method == "spqr":
        _check_csr(tensors, meta, source)
    if "perm" in tensors:
        perm = tensors["perm"]
        _check(perm, "perm", torch.int16, (meta.in_features,), source)
        if meta.in_features > MAX_COLUMN_INDEX + 1:
            raise ModelFormatError(
                f"{source}: tensor 'perm' needs in_features <= {MAX_COLUMN_INDEX + 1} (16-bit indices)"
            )
        p = decode_columns(perm)  # unsigned 16-bit values, so never negative
        ok = bool((p < meta.in_features).all()) and bool(
            (torch.bincount(p, minlength=meta.in_features) == 1).all()
        )
        if not ok:
            raise ModelFormatError(
                f"{source}: tensor 'perm' is not a permutation of 0..{meta.in_features - 1}"
            )


def _nnz(tensors: Mapping[str, Tensor]) -> int:
    values = tensors.get("outlier_values")
    return int(values.shape[0]) if values is not None and values.ndim == 1 else 0


def _check(t: Tensor, name: str, dtype: torch.dtype, shape: tuple[int, ...], source: str) -> None:
    if not isinstance(t, Tensor):
        raise ModelFormatError(f"{source}: {name!r} is not a tensor")
    if t.dtype != dtype:
        raise ModelFormatError(f"{source}: tensor {name!r} has dtype {t.dtype}, expected {dtype}")
    if tuple(t.shape) != shape:
        raise ModelFormatError(f"{source}: tensor {name!r} has shape {tuple(t.shape)}, expected {shape}")


def _check_csr(tensors: Mapping[str, Tensor], meta: LinearMeta, source: str) -> None:
    row_ptr = tensors["outlier_row_ptr"].long()
    nnz = int(tensors["outlier_values"].shape[0])
    steps = row_ptr[1:] - row_ptr[:-1]
    if int(row_ptr[0]) != 0 or int(row_ptr[-1]) != nnz or bool((steps < 0).any()):
        raise ModelFormatError(
            f"{source}: tensor 'outlier_row_ptr' is not a valid CSR row pointer for {nnz} values"
        )
    cols = decode_columns(tensors["outlier_cols"])
    if bool((cols >= meta.in_features).any()):
        raise ModelFormatError(
            f"{source}: tensor 'outlier_cols' has a column >= in_features {meta.in_features}"
        )
    if nnz > 1:
        rows = torch.repeat_interleave(torch.arange(meta.out_features, device=row_ptr.device), steps)
        same_row = rows[1:] == rows[:-1]
        if bool((same_row & (cols[1:] <= cols[:-1])).any()):
            raise ModelFormatError(f"{source}: tensor 'outlier_cols' is not strictly increasing within a row")
