"""Validation of one linear's packed tensors read from an untrusted file (raises ModelFormatError).

Any bit pattern of codes and stat codes is valid; everything else (names, dtypes, shapes, finite fp16 numbers,
CSR structure and column range, the permutation) is checked here, before any kernel reads the tensors."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from spqr_run.errors import ModelFormatError
from spqr_run.quant import tile_layout
from spqr_run.quant.meta import LinearMeta
from spqr_run.quant.packing import MAX_COLUMN_INDEX, decode_columns

TENSOR_NAMES = ("tiles", "outliers", "outlier_row_ptr", "codes", "scales", "zeros", "perm")


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
        "tiles": (torch.int32, (rt, meta.num_k_blocks, meta.record_words)),
        "outliers": (torch.int32, (nnz,)),
        "outlier_row_ptr": (torch.int32, (rt * tile_layout.ROWS + 1,)),
    }


def validate_tensors(tensors: Mapping[str, Tensor], meta: LinearMeta, source: str) -> None:
    """Check names, dtypes, shapes, finiteness, CSR structure and the permutation."""
    outliers = tensors.get("outliers")
    nnz = int(outliers.shape[0]) if isinstance(outliers, Tensor) and outliers.ndim == 1 else 0
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
    for name in ("scales", "zeros"):
        if name in specs and not bool(torch.isfinite(tensors[name]).all()):
            raise ModelFormatError(f"{source}: tensor {name!r} holds inf or nan")
    if meta.method == "spqr":
        s0 = meta.record_words - tile_layout.SECOND_WORDS
        if not _finite_halves(tensors["tiles"][..., s0:]):
            raise ModelFormatError(f"{source}: tensor 'tiles' holds an inf or nan second-order statistic")
        if not _finite_halves(tensors["outliers"], pairs=False):
            raise ModelFormatError(f"{source}: tensor 'outliers' holds an inf or nan value")
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


def _finite_halves(words: Tensor, *, pairs: bool = True) -> bool:
    """True when the fp16 bit patterns in int32 `words` (both halves, or only the low one) are finite."""
    w = words.long()
    halves = [w, w >> 16] if pairs else [w]
    return all(not bool(((h & 0x7C00) == 0x7C00).any()) for h in halves)  # exponent all ones: inf/nan


def _check(t: Tensor, name: str, dtype: torch.dtype, shape: tuple[int, ...], source: str) -> None:
    if not isinstance(t, Tensor):
        raise ModelFormatError(f"{source}: {name!r} is not a tensor")
    if t.dtype != dtype:
        raise ModelFormatError(f"{source}: tensor {name!r} has dtype {t.dtype}, expected {dtype}")
    if tuple(t.shape) != shape:
        raise ModelFormatError(f"{source}: tensor {name!r} has shape {tuple(t.shape)}, expected {shape}")


def _check_csr(tensors: Mapping[str, Tensor], meta: LinearMeta, source: str) -> None:
    """CSR pointers over the padded rows (padding rows empty), columns < in, increasing within a row."""
    row_ptr = tensors["outlier_row_ptr"].long()
    nnz = int(tensors["outliers"].shape[0])
    out = meta.out_features
    steps = row_ptr[1:] - row_ptr[:-1]
    if int(row_ptr[0]) != 0 or int(row_ptr[out]) != nnz or int(row_ptr[-1]) != nnz or bool((steps < 0).any()):
        raise ModelFormatError(
            f"{source}: tensor 'outlier_row_ptr' is not a valid CSR row pointer for {nnz} outliers"
        )
    cols = (tensors["outliers"].long() >> 16) & 0xFFFF
    if bool((cols >= meta.in_features).any()):
        raise ModelFormatError(f"{source}: tensor 'outliers' has a column >= in_features {meta.in_features}")
    if nnz > 1:
        rows = torch.repeat_interleave(torch.arange(len(steps), device=row_ptr.device), steps)
        same_row = rows[1:] == rows[:-1]
        if bool((same_row & (cols[1:] <= cols[:-1])).any()):
            raise ModelFormatError(
                f"{source}: tensor 'outliers' has columns not strictly increasing within a row"
            )
