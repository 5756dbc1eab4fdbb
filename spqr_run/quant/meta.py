"""`LinearMeta`: the few numbers needed to interpret one quantized linear's packed tensors."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from spqr_run.errors import ModelFormatError
from spqr_run.quant import tile_layout
from spqr_run.quant.config import METHODS, TILE, QuantConfig
from spqr_run.quant.packing import CHUNK, MAX_COLUMN_INDEX


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(frozen=True, kw_only=True)
class LinearMeta:
    """Shape and quantization parameters of one packed linear (stored in the file header per linear).

    `stat_bits` and `stat_groupsize` are 0 for the gptq/rtn baselines, which have no bilevel statistics.
    spqr linears have `groupsize == stat_groupsize == 16` (the v2 tile layout, docs/FORMAT.md).
    """

    method: str
    wbits: int
    groupsize: int  # beta1
    stat_bits: int
    stat_groupsize: int  # beta2
    out_features: int
    in_features: int

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            ok = isinstance(value, str) if f.name == "method" else _is_int(value)
            if not ok:
                raise ModelFormatError(f"linear meta field {f.name!r} has the wrong type: {value!r}")
        spqr = self.method == "spqr"
        checks = {
            "method": self.method in METHODS,
            "wbits": self.wbits in ((2, 3, 4) if spqr else (2, 3, 4, 8)),
            "groupsize": self.groupsize == TILE if spqr else self.groupsize > 0,
            "stat_bits": 1 <= self.stat_bits <= 8 if spqr else self.stat_bits == 0,
            "stat_groupsize": self.stat_groupsize == TILE if spqr else self.stat_groupsize == 0,
            "out_features": self.out_features > 0,
            "in_features": self.in_features > 0 and (not spqr or self.in_features <= MAX_COLUMN_INDEX + 1),
        }
        for name, ok in checks.items():
            if not ok:
                raise ModelFormatError(
                    f"linear meta field {name!r} has an invalid value: {getattr(self, name)!r}"
                )

    @classmethod
    def from_config(cls, config: QuantConfig, out_features: int, in_features: int) -> LinearMeta:
        spqr = config.method == "spqr"
        return cls(
            method=config.method,
            wbits=config.wbits,
            groupsize=config.groupsize,
            stat_bits=config.stat_bits if spqr else 0,
            stat_groupsize=config.stat_groupsize if spqr else 0,
            out_features=out_features,
            in_features=in_features,
        )

    # ---- derived sizes --------------------------------------------------------------------------
    @property
    def num_groups(self) -> int:
        """Column groups per row (= column tiles for spqr); the last one may be partial."""
        return ceil_div(self.in_features, self.groupsize)

    @property
    def num_row_groups(self) -> int:
        """spqr: row tiles of `stat_groupsize` rows; the last one may be partial."""
        return ceil_div(self.out_features, self.stat_groupsize)

    @property
    def num_k_blocks(self) -> int:
        """spqr: k-blocks of 64 stored columns (4 groups) per row tile; the last one may be partial."""
        return ceil_div(self.in_features, tile_layout.COLS)

    @property
    def record_words(self) -> int:
        """spqr: int32 words of one 16 x 64 record (`tile_layout.record_words`)."""
        return tile_layout.record_words(self.wbits, self.stat_bits)

    @property
    def row_words(self) -> int:
        """gptq/rtn: int32 words of codes per row (row padded to a multiple of 32 codes)."""
        return ceil_div(self.in_features, CHUNK) * self.wbits

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Any, *, source: str = "linear meta") -> LinearMeta:
        """Inverse of `to_dict` for an untrusted header; raises ModelFormatError naming `source`."""
        if not isinstance(d, dict):
            raise ModelFormatError(f"{source}: linear meta must be a JSON object")
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(d) - set(names))
        missing = [n for n in names if n not in d]
        if unknown or missing:
            raise ModelFormatError(f"{source}: linear meta has unknown {unknown} / missing {missing} fields")
        try:
            return cls(**d)
        except ModelFormatError as e:
            raise ModelFormatError(f"{source}: {e}") from None


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
