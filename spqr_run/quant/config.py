"""`QuantConfig`: the quantization method and its hyper-parameters, validated, (de)serialisable."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from spqr_run.errors import ConfigError, ModelFormatError

METHODS = ("spqr", "gptq", "rtn")
TILE = 16  # the SpQR tile edge the packed layout is built from (see docs/FORMAT.md)


@dataclass(frozen=True, kw_only=True)
class QuantConfig:
    """How one linear layer is quantized.

    `spqr` is the paper's method (GPTQ + bilevel 3-bit statistics + unstructured fp16 outliers);
    `gptq` is the same GPTQ loop with plain fp16 per-row-per-group scale/zero; `rtn` is round-to-nearest
    min-max without a Hessian. Fields marked "spqr only" are ignored by the baselines, and `percdamp`,
    `blocksize`, `act_order` are ignored by `rtn`.
    """

    method: str = "spqr"
    wbits: int = 3  # bits per weight code: 2, 3, 4 (spqr); also 8 for gptq/rtn
    groupsize: int = 16  # beta1: consecutive (permuted) input columns sharing first-order stats
    stat_bits: int = 3  # spqr only: bits of the quantized first-order scales and zeros
    stat_groupsize: int = 16  # spqr only, beta2: consecutive output rows sharing second-order stats
    outlier_threshold: float = 0.2  # spqr only, tau: relative outlier threshold; inf disables outliers
    simplified_outliers: bool = False  # spqr only: skip the leave-one-out refit (faster, a bit worse)
    # spqr only: re-choose each row's 3-bit (scale, zero) codes on the fixed second-order grids by the
    # Hessian-weighted rounding error (min-max codes are a candidate)
    stat_search: bool = False
    # spqr/gptq, whole-model runs only: target each linear's output on the *full-precision* model's inputs
    # (asymmetric calibration): W is replaced by W + W (X_fp - X_q) X_q^T (X_q X_q^T + damping)^-1 before
    # quantizing, so ||W X_fp - Q X_q|| is minimised instead of ||W X_q - Q X_q||
    fp_targets: bool = False
    # spqr/gptq: passes of coordinate descent over the codes after the GPTQ loop (QuantEase, Behdin et al.
    # 2023): with the statistics and the outlier positions fixed, each column in turn takes the grid codes
    # (outliers: the fp16 values) minimising tr((W - Q) H (W - Q)^T) given all other columns; 0 = off
    cd_passes: int = 0
    # spqr, whole-model runs only: after every block is quantized, optimizer steps training the continuous
    # numbers the codes leave free (second-order statistics, outlier deltas, norms) against the unquantized
    # model's next-token distributions on the calibration tokens (`spqr_run.finetune`); 0 = off. Same bytes.
    finetune_steps: int = 0
    finetune_lr: float = 1e-4  # Adam learning rate in relative units (see `finetune.FinetuneConfig`)
    # H[i, i] += percdamp * mean(diag H). 0.01 is GPTQ's default (Frantar et al., 2023); the SpQR release ran
    # 1.0, which on SmolLM2 costs every method 1.5-2.5 points of perplexity (sweep in BENCHMARKS.md)
    percdamp: float = 0.01
    blocksize: int = 128  # GPTQ lazy-update block; affects speed only (rounded up to the group size)
    act_order: bool = True  # permute input columns by descending diag(H)

    def __post_init__(self) -> None:
        _check_types(self)
        if self.method not in METHODS:
            raise ConfigError(f"quantization method must be one of {', '.join(METHODS)}, got {self.method!r}")
        allowed_bits = (2, 3, 4) if self.method == "spqr" else (2, 3, 4, 8)
        if self.wbits not in allowed_bits:
            raise ConfigError(f"wbits must be one of {allowed_bits} for {self.method}, got {self.wbits}")
        if self.groupsize <= 0:
            raise ConfigError(f"groupsize must be positive, got {self.groupsize}")
        if self.method == "spqr":
            for name in ("groupsize", "stat_groupsize"):
                value = getattr(self, name)
                if value != TILE:  # the packed layout is built from 16 x 16 mma tiles (docs/FORMAT.md)
                    raise ConfigError(f"{name} must be {TILE} for spqr (the packed tile layout), got {value}")
            if not 1 <= self.stat_bits <= 8:
                raise ConfigError(f"stat_bits must be in 1..8, got {self.stat_bits}")
        if not self.outlier_threshold > 0:  # also rejects nan
            raise ConfigError(f"outlier_threshold must be > 0 (inf disables), got {self.outlier_threshold}")
        if not (self.percdamp >= 0 and math.isfinite(self.percdamp)):
            raise ConfigError(f"percdamp must be a finite number >= 0, got {self.percdamp}")
        if self.cd_passes < 0:
            raise ConfigError(f"cd_passes must be >= 0, got {self.cd_passes}")
        if self.finetune_steps < 0:
            raise ConfigError(f"finetune_steps must be >= 0, got {self.finetune_steps}")
        if self.finetune_steps and self.method != "spqr":
            raise ConfigError(
                f"finetune_steps is for spqr only (it trains SpQR's fp16 statistics), got {self.method}"
            )
        if not (self.finetune_lr > 0 and math.isfinite(self.finetune_lr)):
            raise ConfigError(f"finetune_lr must be a finite number > 0, got {self.finetune_lr}")
        if self.blocksize <= 0:
            raise ConfigError(f"blocksize must be positive, got {self.blocksize}")

    @property
    def has_outliers(self) -> bool:
        """True when this config can produce outliers (spqr with a finite threshold)."""
        return self.method == "spqr" and math.isfinite(self.outlier_threshold)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (inf threshold as the string "inf": JSON has no infinity)."""
        d = dataclasses.asdict(self)
        if math.isinf(self.outlier_threshold):
            d["outlier_threshold"] = "inf"
        return d

    @classmethod
    def from_dict(cls, d: Any, *, source: str = "quantization config") -> QuantConfig:
        """Inverse of `to_dict`; `d` may come from an untrusted file header (raises ModelFormatError)."""
        if not isinstance(d, dict):
            raise ModelFormatError(f"{source}: quantization config must be a JSON object")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ModelFormatError(f"{source}: unknown quantization config field(s) {', '.join(unknown)}")
        kwargs = dict(d)
        if kwargs.get("outlier_threshold") == "inf":
            kwargs["outlier_threshold"] = math.inf
        try:
            return cls(**kwargs)
        except ConfigError as e:
            raise ModelFormatError(f"{source}: {e}") from None


_TYPES = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}


def _check_types(cfg: QuantConfig) -> None:
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        expected = {"int": int, "float": float, "bool": bool, "str": str}[str(f.type)]
        if expected is float:
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
            if ok:
                object.__setattr__(cfg, f.name, float(value))
        elif expected is int:
            ok = isinstance(value, int) and not isinstance(value, bool)
        else:
            ok = isinstance(value, expected)
        if not ok:
            raise ConfigError(f"{f.name} must be {_TYPES[expected]}, got {value!r}")
