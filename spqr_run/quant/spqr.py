"""The SpQR / GPTQ quantizer of one weight matrix, given its Hessian (docs: /work/shared/DESIGN.md).

`quantize_linear` is a pure function: weight (out, in) + Hessian (in, in) -> packed `QuantizedLinear` plus
the quantizer's own reconstruction, which `QuantizedLinear.dequantize()` reproduces bit for bit.

Algorithm (GPTQ, Frantar et al. 2022, with SpQR's additions, Dettmers et al. 2024, Alg. 1):
  1. dead columns (diag H == 0): weight zeroed, H[j, j] = 1 (as GPTQ); act_order permutation =
     argsort(diag H, descending) of the *input* Hessian (dead columns go last);
     damping H[i, i] += percdamp * mean(diag H).
  2. U = upper Cholesky factor of H^-1 (fp32, retried in float64 if fp32 fails).
  3. Columns in blocks; when the loop reaches a group of `groupsize` columns it fits per-row min-max
     statistics on the already error-updated weights (spqr: leave-one-out refit without likely outliers,
     then scales and zeros each quantized to `stat_bits` per `stat_groupsize` rows with fp16 stats).
  4. Each column is rounded to its grid; spqr marks outliers by ((w - q) / U[j, j])**2 > tau * s and
     stores them as fp16 deltas so they contribute (almost) no error; the error (w - q) / U[j, j] is
     propagated to later columns through U.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor

from spqr_run.errors import ConfigError, ModelFormatError
from spqr_run.quant.config import QuantConfig
from spqr_run.quant.grid import (
    EPS,
    FP16_MAX,
    dequantize_codes,
    fit_minmax,
    fit_minmax_fp16,
    max_code,
    quantize_row_groups,
)
from spqr_run.quant.layout import UnpackedLinear
from spqr_run.quant.meta import LinearMeta
from spqr_run.quant.outliers import fit_without_likely_outliers, outlier_scale
from spqr_run.quant.packing import MAX_COLUMN_INDEX
from spqr_run.quant.quantized import QuantizedLinear
from spqr_run.quant.rtn import quantize_rtn


@dataclass(frozen=True)
class QuantizationResult:
    """What quantizing one linear produced."""

    quantized: QuantizedLinear
    reconstruction: Tensor  # (out, in) fp32, permuted columns; == quantized.dequantize() bit for bit
    outlier_fraction: float  # stored outliers / (out * in)
    relative_error: float  # ||(W - Q) X|| / ||W X|| via the Hessian; ||W - Q|| / ||W|| without one
    seconds: float


@dataclass
class _GroupStats:
    scale: Tensor  # (out,) fp32 dequantized first-order scale used for rounding
    zero: Tensor  # (out,) fp32
    stored: tuple[
        Tensor, ...
    ]  # spqr: scale codes, zero codes, second (row_groups, 4); gptq: fp16 scale, zero


def quantize_linear(weight: Tensor, hessian: Tensor | None, *, config: QuantConfig) -> QuantizationResult:
    """Quantize weight (out, in) with Hessian H = 2/N X X^T (in, in); `hessian` may be None only for rtn."""
    start = time.perf_counter()
    w = _checked_weight(weight, config)
    h = _checked_hessian(hessian, w, config)
    if config.method == "rtn":
        unpacked, recon = quantize_rtn(w, config)
        h_perm = h
    else:
        unpacked, recon = _gptq(w, h, config)
        perm = unpacked.perm
        w = w if perm is None else w[:, perm]
        h_perm = h if perm is None else h[perm][:, perm]
    quantized = QuantizedLinear.pack(unpacked)
    return QuantizationResult(
        quantized=quantized,
        reconstruction=recon,
        outlier_fraction=quantized.outlier_fraction,
        relative_error=relative_error(w, recon, h_perm),
        seconds=time.perf_counter() - start,
    )


def relative_error(weight: Tensor, recon: Tensor, hessian: Tensor | None) -> float:
    """sqrt(tr(E H E^T) / tr(W H W^T)) with E = W - Q (the ||(W-Q)X|| / ||WX|| proxy); Frobenius without H."""
    err = weight - recon  # (out, in)
    if hessian is None:
        num, den = err.square().sum(), weight.square().sum()
    else:
        num, den = ((err @ hessian) * err).sum(), ((weight @ hessian) * weight).sum()
    num, den = float(num.clamp_min(0)), float(den)
    return math.sqrt(num / den) if den > 0 else (0.0 if num == 0 else math.inf)


def _gptq(weight: Tensor, hessian: Tensor, config: QuantConfig) -> tuple[UnpackedLinear, Tensor]:
    out, n = weight.shape
    w = weight.clone()  # (out, in), updated in place by the error feedback
    h = hessian.clone()  # (in, in)
    dead = h.diagonal() == 0
    perm = torch.argsort(h.diagonal(), descending=True, stable=True) if config.act_order else None
    h[dead, dead] = 1
    w[:, dead] = 0
    if perm is not None:
        w, h = w[:, perm], h[perm][:, perm]
    h.diagonal().add_(config.percdamp * h.diagonal().mean())
    u = _inverse_cholesky_upper(h)  # (in, in) fp32
    u_diag = u.diagonal()  # (in,)
    threshold = config.outlier_threshold * outlier_scale(w, u_diag) if config.has_outliers else math.inf

    maxq = max_code(config.wbits)
    gs = config.groupsize
    block = -(-config.blocksize // gs) * gs  # whole groups per block: stats see fully updated weights
    track_outliers = threshold < math.inf
    dev = w.device
    # Work on W^T so that a column of W is a contiguous row: the rank-1 updates then stream memory.
    wt = w.T.contiguous()  # (in, out)
    codes = torch.empty(n, out, device=dev)  # (in, out) fp32 integer codes
    recon = torch.empty(n, out, device=dev)  # (in, out) fp32
    # Outliers as dense masks and fp16 deltas, compacted once at the end: no host sync in the loop.
    is_outlier = torch.zeros(n, out, dtype=torch.bool, device=dev) if track_outliers else None
    deltas = torch.zeros(n, out, dtype=torch.half, device=dev) if track_outliers else None
    groups: list[_GroupStats] = []
    for b0 in range(0, n, block):
        b1 = min(b0 + block, n)
        err = torch.empty(b1 - b0, out, device=dev)  # (block, out) scaled errors
        # Three-level lazy updates: rank-1 inside a sub-block of <= SUB_BLOCK columns, one rank-(s1-s0)
        # matmul for the rest of the block after each sub-block, one matmul for the rest of W per block.
        # Everything but that last matmul works on a few (out,)..(block, out) tensors: one CPU thread.
        with _one_cpu_thread(dev):
            for s0, s1 in _sub_blocks(b0, b1, gs):
                for j in range(s0, s1):
                    if j % gs == 0:
                        g1 = min(j + gs, n)
                        groups.append(_fit_group(wt[j:g1].T, u_diag[j:g1], threshold, config))
                        scale, zero = groups[-1].scale, groups[-1].zero
                        safe_scale = scale.clamp_min(EPS)
                    col = wt[j]  # (out,) column j of W
                    q = torch.round(col / safe_scale + zero).clamp_(0, maxq)  # == grid.quantize_codes
                    deq = dequantize_codes(q, scale, zero)  # (out,)
                    if track_outliers:
                        diff = col - deq
                        mask = (diff / u_diag[j]).square() > threshold
                        delta = diff.half()
                        deq = torch.where(mask, deq + delta.float(), deq)  # same expression as the reader's
                        is_outlier[j], deltas[j] = mask, delta
                    codes[j], recon[j] = q, deq
                    e = err[j - b0]
                    torch.sub(col, deq, out=e).div_(u_diag[j])
                    if j + 1 < s1:
                        wt[j + 1 : s1].addr_(u[j, j + 1 : s1], e, alpha=-1)
                if s1 < b1:
                    wt[s1:b1].addmm_(u[s0:s1, s1:b1].T, err[s0 - b0 : s1 - b0], alpha=-1)
        if b1 < n:
            wt[b1:].addmm_(u[b0:b1, b1:].T, err, alpha=-1)

    outliers = None
    if track_outliers:
        cols, rows = is_outlier.nonzero(as_tuple=True)  # column-major order, as the loop visits them
        outliers = (rows, cols, deltas[cols, rows])
    codes, recon = codes.T, recon.T.contiguous()  # (out, in)
    unpacked = _unpacked(config, weight.shape, codes, groups, outliers, perm)
    return unpacked, recon


@contextmanager
def _one_cpu_thread(device: torch.device) -> Iterator[None]:
    """Run the per-column / per-group work on one CPU thread (restored afterwards).

    Those ops touch 10-100 KB each; splitting them over threads costs more than it saves, and on a shared
    or oversubscribed CPU each parallel region can wait milliseconds for a descheduled worker (measured
    here: the same quantization took 10-20x the CPU time with 2 threads than with 1). CUDA: no-op.
    """
    threads = torch.get_num_threads()
    if device.type != "cpu" or threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


SUB_BLOCK = 16  # columns per inner lazy-update step (error feedback is exact math at any size)


def _sub_blocks(b0: int, b1: int, gs: int) -> list[tuple[int, int]]:
    """[b0, b1) cut at every multiple of SUB_BLOCK and at every group start (a group's stats are fitted
    when the loop reaches it, so all earlier errors must have reached the whole group by then)."""
    cuts = sorted({b0, b1} | set(range(b0, b1, SUB_BLOCK)) | set(range(b0 - b0 % gs + gs, b1, gs)))
    return list(zip(cuts[:-1], cuts[1:], strict=True))


def _fit_group(group: Tensor, u_diag: Tensor, threshold: float, config: QuantConfig) -> _GroupStats:
    """First-order stats of a column group (out, g) at the moment the GPTQ loop reaches it."""
    maxq = max_code(config.wbits)
    if config.method == "gptq":
        scale16, zero16 = fit_minmax_fp16(group, maxq)  # (out,) fp16
        return _GroupStats(scale16.float(), zero16.float(), (scale16, zero16))
    if threshold < math.inf and not config.simplified_outliers:
        group = fit_without_likely_outliers(group, u_diag, maxq, threshold)
    scale, zero = fit_minmax(group, maxq)  # (out,) fp32
    scale_codes, scale_stats, scale_deq = quantize_row_groups(scale, config.stat_groupsize, config.stat_bits)
    zero_codes, zero_stats, zero_deq = quantize_row_groups(zero, config.stat_groupsize, config.stat_bits)
    second = torch.cat([scale_stats, zero_stats], dim=-1)  # (row_groups, 4) fp16
    return _GroupStats(scale_deq, zero_deq, (scale_codes, zero_codes, second))


def _unpacked(
    config: QuantConfig,
    shape: torch.Size,
    codes: Tensor,
    groups: list[_GroupStats],
    outliers: tuple[Tensor, Tensor, Tensor] | None,  # rows, columns, fp16 deltas
    perm: Tensor | None,
) -> UnpackedLinear:
    out, n = shape
    meta = LinearMeta.from_config(config, out, n)
    stored = [torch.stack([g.stored[k] for g in groups], dim=1) for k in range(len(groups[0].stored))]
    if config.method == "gptq":
        return UnpackedLinear(meta=meta, codes=codes.long(), perm=perm, scales=stored[0], zeros=stored[1])
    dev = codes.device
    if outliers is None:
        empty = torch.zeros(0, dtype=torch.long, device=dev)
        outliers = (empty, empty.clone(), torch.zeros(0, dtype=torch.half, device=dev))
    rows, cols, values = outliers
    return UnpackedLinear(
        meta=meta,
        codes=codes.long(),
        perm=perm,
        scale_codes=stored[0].long(),  # (out, groups)
        zero_codes=stored[1].long(),  # (out, groups)
        second=stored[2],  # (row_groups, groups, 4) fp16
        outlier_rows=rows,
        outlier_cols=cols,
        outlier_values=values,
    )


def _inverse_cholesky_upper(h: Tensor) -> Tensor:
    """Upper Cholesky factor U of H^-1 (H^-1 = U^T U) as fp32; float64 when fp32 is not accurate enough.

    Computed without forming H^-1: with J the index reversal, J H J = L L^T gives H^-1 = (J L^-T J)(J L^-1 J),
    and J L^-1 J is upper triangular with a positive diagonal, so it is U (the factor is unique). One
    Cholesky and one triangular solve: much faster than `cholesky_inverse` + a second Cholesky on CPUs.
    """
    n = h.shape[0]
    for dtype in (torch.float32, torch.float64):
        chol, info = torch.linalg.cholesky_ex(h.to(dtype).flip(0, 1))
        if int(info) == 0:
            eye = torch.eye(n, dtype=dtype, device=h.device)
            u = torch.linalg.solve_triangular(chol, eye, upper=False).flip(0, 1)
            if bool(torch.isfinite(u).all()):
                return u.float()
    raise ConfigError("the Hessian is not positive definite even in float64; increase percdamp")


def _checked_weight(weight: Tensor, config: QuantConfig) -> Tensor:
    if (
        not isinstance(weight, Tensor)
        or weight.ndim != 2
        or not weight.is_floating_point()
        or weight.numel() == 0
    ):
        raise ConfigError("weight must be a non-empty 2-D floating-point tensor (out_features, in_features)")
    w = weight.detach().float()
    if not bool((w.abs() <= FP16_MAX).all()):  # also catches nan
        raise ModelFormatError("weight holds inf, nan or values beyond the fp16 range")
    if config.method == "spqr" and w.shape[1] > MAX_COLUMN_INDEX + 1:
        raise ConfigError(
            f"spqr supports in_features <= {MAX_COLUMN_INDEX + 1} (16-bit outlier column indices)"
        )
    if config.method == "gptq" and config.act_order and w.shape[1] > MAX_COLUMN_INDEX + 1:
        raise ConfigError(
            f"act_order supports in_features <= {MAX_COLUMN_INDEX + 1} (16-bit permutation); "
            "use act_order=False"
        )
    return w


def _checked_hessian(hessian: Tensor | None, w: Tensor, config: QuantConfig) -> Tensor | None:
    if hessian is None:
        if config.method != "rtn":
            raise ConfigError(f"method {config.method!r} needs a Hessian (only rtn works without one)")
        return None
    n = w.shape[1]
    if not isinstance(hessian, Tensor) or tuple(hessian.shape) != (n, n):
        raise ConfigError(f"hessian must be a ({n}, {n}) tensor for a weight with {n} input features")
    h = hessian.detach().to(device=w.device, dtype=torch.float32)
    if not bool(torch.isfinite(h).all()):
        raise ConfigError("hessian holds inf or nan")
    return h
