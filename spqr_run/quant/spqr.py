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
     then scales and zeros each quantized to `stat_bits` per `stat_groupsize` rows with fp16 stats;
     with `stat_search`, each row's scale and zero codes are then re-chosen on those fixed second-order
     grids to minimise the row's rounding error weighted by 1 / U[j, j]**2, `grid.search_stat_codes`).
  4. Each column is rounded to its grid; spqr marks outliers by ((w - q) / U[j, j])**2 > tau * s and
     stores them as fp16 deltas so they contribute (almost) no error; the error (w - q) / U[j, j] is
     propagated to later columns through U.
  5. with `cd_passes`, coordinate descent over the finished codes (QuantEase, Behdin et al. 2023):
     statistics and outlier positions fixed, each column takes its best grid values given the others
     (`refine_codes`).

Linears that read the same input (q/k/v, gate/up) share their Hessian: `quantize_linears` runs them as one
row-stacked matrix (rows are independent given H), so steps 1-2 and every per-column operation happen once.
On CPUs the per-column work goes through NumPy views of the same tensors (`_round_columns_numpy`, the same
expressions as the torch loop that serves GPUs), because it is bound by per-operation overhead there.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
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
    search_stat_codes,
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
    return quantize_linears([weight], hessian, config=config)[0]


def quantize_linears(
    weights: Sequence[Tensor], hessian: Tensor | None, *, config: QuantConfig
) -> list[QuantizationResult]:
    """Quantize several linears that read the same input, so share one Hessian H (in, in): q/k/v, gate/up.

    Each result is `quantize_linear(weight, hessian)` for that weight alone: GPTQ treats rows
    independently given H, and the outlier threshold tau * s is still computed per linear. The weights are
    stacked into one (sum out, in) matrix for the column loop, so the permutation, the inverse Cholesky
    factor and every per-column and per-group operation are done once for all of them (that loop is
    bound by per-operation overhead on CPUs). Only the order of float additions in the error feedback
    matmuls may differ from a separate run. Stacking needs every weight but the last to have a multiple of
    `stat_groupsize` rows (second-order groups must not straddle two linears); otherwise, and for rtn,
    the weights are quantized one by one. Each result's `seconds` is the shared time split by rows.
    """
    if not weights:
        raise ConfigError("quantize_linears needs at least one weight")
    start = time.perf_counter()
    ws = [_checked_weight(w, config) for w in weights]
    n = ws[0].shape[1]
    h = _checked_hessian(hessian, ws[0], config)
    if any(w.shape[1] != n for w in ws):
        raise ConfigError("weights sharing a Hessian must have the same number of input features")
    if config.method == "rtn":
        if len(ws) > 1:
            return [quantize_linear(w, hessian, config=config) for w in weights]
        unpacked, recon = quantize_rtn(ws[0], config)
        parts, h_perm = [(unpacked, recon)], h
    else:
        row_multiple = config.stat_groupsize if config.method == "spqr" else 1
        if any(w.shape[0] % row_multiple for w in ws[:-1]):
            return [quantize_linear(w, hessian, config=config) for w in weights]
        with torch.no_grad():
            parts = _gptq(ws, h, config)
        perm = parts[0][0].perm
        ws = ws if perm is None else [w[:, perm] for w in ws]
        h_perm = h if perm is None else h[perm][:, perm]
    total_rows = sum(w.shape[0] for w in ws)
    seconds = time.perf_counter() - start
    results = []
    for w, (unpacked, recon) in zip(ws, parts, strict=True):
        quantized = QuantizedLinear.pack(unpacked)
        results.append(
            QuantizationResult(
                quantized=quantized,
                reconstruction=recon,
                outlier_fraction=quantized.outlier_fraction,
                relative_error=relative_error(w, recon, h_perm),
                seconds=seconds * w.shape[0] / total_rows,
            )
        )
    extra = (time.perf_counter() - start - seconds) / len(results)  # packing and error, about even
    return [dataclasses.replace(r, seconds=r.seconds + extra) for r in results]


def relative_error(weight: Tensor, recon: Tensor, hessian: Tensor | None) -> float:
    """sqrt(tr(E H E^T) / tr(W H W^T)) with E = W - Q (the ||(W-Q)X|| / ||WX|| proxy); Frobenius without H."""
    err = weight - recon  # (out, in)
    if hessian is None:
        num, den = err.square().sum(), weight.square().sum()
    else:
        num, den = ((err @ hessian) * err).sum(), ((weight @ hessian) * weight).sum()
    num, den = float(num.clamp_min(0)), float(den)
    return math.sqrt(num / den) if den > 0 else (0.0 if num == 0 else math.inf)


def _gptq(weights: list[Tensor], hessian: Tensor, config: QuantConfig) -> list[tuple[UnpackedLinear, Tensor]]:
    """The GPTQ / SpQR loop over the row-stacked weights [(out_i, in)] -> per weight (unpacked, recon)."""
    outs = [w.shape[0] for w in weights]
    n = hessian.shape[0]
    h = hessian.clone()  # (in, in)
    dead = h.diagonal() == 0
    perm = torch.argsort(h.diagonal(), descending=True, stable=True) if config.act_order else None
    h[dead, dead] = 1
    if perm is not None:
        h = h[perm][:, perm]
    h.diagonal().add_(config.percdamp * h.diagonal().mean())
    u = _inverse_cholesky_upper(h)  # (in, in) fp32
    u_diag = u.diagonal()  # (in,)
    dev = u.device
    # Work on W^T, the weights side by side (in, sum out): a column of W is a contiguous row, so the
    # rank-1 updates stream memory. Dead columns zeroed, columns permuted.
    wt = torch.cat([w.T for w in weights], dim=1)  # (in, sum out)
    wt[dead] = 0
    if perm is not None:
        wt = wt[perm]
    out = wt.shape[1]
    threshold = None
    if config.has_outliers:  # tau * s per linear (s from its own permuted, dead-zeroed weight), per row
        s = [outlier_scale(part.T.contiguous(), u_diag) for part in wt.split(outs, dim=1)]
        threshold = torch.cat(
            [torch.full((o,), config.outlier_threshold * si) for o, si in zip(outs, s, strict=True)]
        )
        threshold = threshold.to(dev)  # (sum out,) fp32, as the scalar was compared in fp32

    w0t = wt.clone() if config.cd_passes else None  # (in, out) the target of the refinement
    gs = config.groupsize
    block = -(-config.blocksize // gs) * gs  # whole groups per block: stats see fully updated weights
    st = _LoopState(
        wt=wt,
        u=u,
        u_diag=u_diag,
        codes=torch.empty(n, out, device=dev),  # (in, out) fp32 integer codes
        recon=torch.empty(n, out, device=dev),  # (in, out) fp32
        err=torch.empty(block, out, device=dev),  # (block, out) scaled errors of the current block
        # Outliers as dense masks and fp16 deltas, compacted once at the end: no host sync in the loop.
        is_outlier=torch.zeros(n, out, dtype=torch.bool, device=dev) if threshold is not None else None,
        deltas=torch.zeros(n, out, dtype=torch.half, device=dev) if threshold is not None else None,
        maxq=max_code(config.wbits),
        threshold=threshold,
    )
    round_columns = _round_columns_numpy if dev.type == "cpu" else _round_columns_torch
    err = st.err
    groups: list[_GroupStats] = []
    for b0 in range(0, n, block):
        b1 = min(b0 + block, n)
        # Three-level lazy updates: rank-1 inside a sub-block of <= SUB_BLOCK columns, one rank-(s1-s0)
        # matmul for the rest of the block after each sub-block, one matmul for the rest of W per block.
        # Everything but that last matmul works on a few (out,)..(block, out) tensors: one CPU thread.
        with _one_cpu_thread(dev):
            for s0, s1 in _sub_blocks(b0, b1, gs):
                if s0 % gs == 0:  # a group starts: fit its stats on the weights updated so far
                    g1 = min(s0 + gs, n)
                    groups.append(_fit_group(wt[s0:g1].T, u_diag[s0:g1], threshold, config))
                round_columns(st, groups[-1], s0, s1, b0)
                if s1 < b1:
                    wt[s1:b1].addmm_(u[s0:s1, s1:b1].T, err[s0 - b0 : s1 - b0], alpha=-1)
        if b1 < n:
            wt[b1:].addmm_(u[b0:b1, b1:].T, err[: b1 - b0], alpha=-1)
    if w0t is not None:
        with _one_cpu_thread(dev):
            refine_codes(st, w0t, h, groups, gs, config.cd_passes)

    parts = []
    r0 = 0
    for o in outs:
        rows = slice(r0, r0 + o)
        outliers = None
        if st.is_outlier is not None:
            cols, r = st.is_outlier[:, rows].nonzero(as_tuple=True)  # column-major, as the loop visits them
            outliers = (r, cols, st.deltas[:, rows][cols, r])
        codes, recon = st.codes[:, rows].T, st.recon[:, rows].T.contiguous()  # (o, in)
        parts.append((_unpacked(config, (o, n), codes, groups, rows, outliers, perm), recon))
        r0 += o
    return parts


@dataclass
class _LoopState:
    """The GPTQ loop's working tensors, all on one device, column j of W stored as row j."""

    wt: Tensor  # (in, out) fp32 weights, updated in place by the error feedback
    u: Tensor  # (in, in) fp32 upper Cholesky factor of H^-1
    u_diag: Tensor  # (in,)
    codes: Tensor  # (in, out) fp32 integer codes
    recon: Tensor  # (in, out) fp32 reconstruction (outliers included)
    err: Tensor  # (block, out) fp32 scaled errors (w - q) / U[j, j] of the current block
    is_outlier: Tensor | None  # (in, out) bool, or None when outliers are off
    deltas: Tensor | None  # (in, out) fp16 outlier deltas
    maxq: int
    threshold: Tensor | None  # (out,) fp32 outlier threshold per row, None when outliers are off


def _round_columns_torch(st: _LoopState, g: _GroupStats, s0: int, s1: int, b0: int) -> None:
    """Round columns [s0, s1) one by one, each after the errors of the earlier ones reached it (any device).

    Per column: codes = clamp(round(w / scale + zero)), deq = scale * (code - zero) (`dequantize_codes`);
    an outlier ((w - deq) / U[j, j])**2 > threshold keeps deq + fp16(w - deq), the reader's expression;
    the scaled error e = (w - deq) / U[j, j] goes to err and, rank-1, to the sub-block's later columns.
    """
    wt, u, u_diag, err = st.wt, st.u, st.u_diag, st.err
    safe_scale = g.scale.clamp_min(EPS)
    for j in range(s0, s1):
        col = wt[j]  # (out,) column j of W
        q = torch.round(col / safe_scale + g.zero).clamp_(0, st.maxq)  # == grid.quantize_codes
        deq = dequantize_codes(q, g.scale, g.zero)  # (out,)
        if st.threshold is not None:
            diff = col - deq
            mask = (diff / u_diag[j]).square() > st.threshold
            delta = diff.half()
            deq = torch.where(mask, deq + delta.float(), deq)  # same expression as the reader's
            st.is_outlier[j], st.deltas[j] = mask, delta
        st.codes[j], st.recon[j] = q, deq
        e = err[j - b0]
        torch.sub(col, deq, out=e).div_(u_diag[j])
        if j + 1 < s1:
            wt[j + 1 : s1].addr_(u[j, j + 1 : s1], e, alpha=-1)


def _round_columns_numpy(st: _LoopState, g: _GroupStats, s0: int, s1: int, b0: int) -> None:
    """`_round_columns_torch` on CPU tensors through NumPy views of the same memory, same expressions.

    The per-column work touches vectors of a few KB, where a NumPy call costs about a microsecond and a
    torch call several: this is the quantizer's hot loop on CPUs (about 4x faster, same numbers up to the
    rounding of the rank-1 update, which may or may not be fused).
    """
    wt, u, err, codes, recon = st.wt.numpy(), st.u.numpy(), st.err.numpy(), st.codes.numpy(), st.recon.numpy()
    u_diag = st.u_diag.numpy()
    scale, zero = g.scale.numpy(), g.zero.numpy()
    safe_scale = np.maximum(scale, np.float32(EPS))  # torch's clamp_min(EPS) in fp32
    maxq = np.float32(st.maxq)
    outliers = st.threshold is not None
    if outliers:
        threshold, is_outlier, deltas = st.threshold.numpy(), st.is_outlier.numpy(), st.deltas.numpy()
    for j in range(s0, s1):
        col = wt[j]  # (out,) column j of W
        q = col / safe_scale
        q += zero
        np.rint(q, out=q)  # round half to even, as torch.round
        np.clip(q, 0, maxq, out=q)
        deq = q - zero
        deq *= scale  # scale * (code - zero), `dequantize_codes`
        if outliers:
            diff = col - deq
            t = diff / u_diag[j]
            mask = np.greater(t * t, threshold, out=is_outlier[j])
            delta = diff.astype(np.float16)
            deltas[j] = delta
            np.add(deq, delta.astype(np.float32), out=deq, where=mask)
        codes[j] = q
        recon[j] = deq
        e = err[j - b0]
        np.subtract(col, deq, out=e)
        e /= u_diag[j]
        if j + 1 < s1:
            wt[j + 1 : s1] -= np.outer(u[j, j + 1 : s1], e)


CD_BLOCK = 128  # columns per lazy update of R in the coordinate descent (exact math at any size)


def refine_codes(
    st: _LoopState,
    w0t: Tensor,
    h: Tensor,
    groups: Sequence[_GroupStats],
    groupsize: int,
    passes: int,
) -> None:
    """Coordinate descent over the codes after the GPTQ loop (QuantEase, Behdin et al. 2023, arXiv 2309.01885).

    Minimises f(Q) = tr((W - Q) H (W - Q)^T) over the codes with the first-order statistics (`groups`) and
    the outlier positions fixed; `w0t` (in, out) is W^T before the loop's error feedback, `h` (in, in) the
    damped, permuted Hessian the loop used, `st` holds the loop's codes, reconstruction and outliers (all
    updated in place). With D = W - Q and R = D H, changing column j of Q by c changes f by
    -2 c.R[:, j] + H[j, j] |c|^2 per row, so the best value of column j given the others is
    t = Q[:, j] + R[:, j] / H[j, j]: each row takes the grid point nearest to t (the grid's own rounding,
    `grid.quantize_codes`, then `dequantize_codes`), an outlier the dense value plus fp16(t - dense), the
    reader's expression. f cannot rise (up to float rounding): the current value is among the candidates.
    R is recomputed at each pass and updated by blocks of `CD_BLOCK` columns (lazy, as GPTQ's updates).
    Rows are independent; `passes` sweeps over the columns in the loop's (act_order) order.
    """
    refine = _refine_columns_numpy if w0t.device.type == "cpu" else _refine_columns_torch
    n = w0t.shape[0]
    scale = torch.stack([g.scale for g in groups])  # (groups, out)
    zero = torch.stack([g.zero for g in groups])
    dt = w0t - st.recon  # (in, out) D^T
    change = torch.empty(CD_BLOCK, dt.shape[1], device=dt.device)  # (block, out) this block's Q changes
    for _ in range(passes):
        rt = h @ dt  # (in, out) R^T = H D^T (H symmetric)
        for b0 in range(0, n, CD_BLOCK):
            b1 = min(b0 + CD_BLOCK, n)
            refine(st, dt, rt, h, scale, zero, groupsize, b0, b1, change)
            if b1 < n:
                rt[b1:].addmm_(h[b1:, b0:b1], change[: b1 - b0], alpha=-1)


def _refine_columns_torch(
    st: _LoopState,
    dt: Tensor,
    rt: Tensor,
    h: Tensor,
    scale: Tensor,
    zero: Tensor,
    gs: int,
    b0: int,
    b1: int,
    change: Tensor,
) -> None:
    """Coordinate steps for columns [b0, b1) (`refine_codes`); their Q changes go to change[: b1 - b0]."""
    for j in range(b0, b1):
        g = j // gs
        s, z = scale[g], zero[g]
        t = st.recon[j] + rt[j] / h[j, j]  # (out,) the unconstrained best column given the others
        q = torch.round(t / s.clamp_min(EPS) + z).clamp_(0, st.maxq)  # == grid.quantize_codes
        deq = dequantize_codes(q, s, z)
        if st.is_outlier is not None:
            mask = st.is_outlier[j]
            delta = (t - deq).clamp_(-FP16_MAX, FP16_MAX).half()
            deq = torch.where(mask, deq + delta.float(), deq)  # same expression as the reader's
            st.deltas[j] = torch.where(mask, delta, st.deltas[j])
        c = change[j - b0]
        torch.sub(deq, st.recon[j], out=c)
        st.codes[j], st.recon[j] = q, deq
        dt[j] -= c
        if j + 1 < b1:
            rt[j + 1 : b1].addr_(h[j + 1 : b1, j], c, alpha=-1)


def _refine_columns_numpy(
    st: _LoopState,
    dt: Tensor,
    rt: Tensor,
    h: Tensor,
    scale: Tensor,
    zero: Tensor,
    gs: int,
    b0: int,
    b1: int,
    change: Tensor,
) -> None:
    """`_refine_columns_torch` on CPU tensors through NumPy views of the same memory, same expressions."""
    recon, codes, dt_, rt_, h_, ch = (x.numpy() for x in (st.recon, st.codes, dt, rt, h, change))
    scale_, zero_ = scale.numpy(), zero.numpy()
    safe_scale = np.maximum(scale_, np.float32(EPS))
    maxq = np.float32(st.maxq)
    outliers = st.is_outlier is not None
    if outliers:
        is_outlier, deltas = st.is_outlier.numpy(), st.deltas.numpy()
    for j in range(b0, b1):
        g = j // gs
        t = rt_[j] / h_[j, j]
        t += recon[j]
        q = t / safe_scale[g]
        q += zero_[g]
        np.rint(q, out=q)
        np.clip(q, 0, maxq, out=q)
        deq = q - zero_[g]
        deq *= scale_[g]
        if outliers:
            mask = is_outlier[j]
            delta = np.clip(t - deq, -FP16_MAX, FP16_MAX).astype(np.float16)
            np.copyto(deltas[j], delta, where=mask)
            np.add(deq, delta.astype(np.float32), out=deq, where=mask)
        c = ch[j - b0]
        np.subtract(deq, recon[j], out=c)
        codes[j] = q
        recon[j] = deq
        dt_[j] -= c
        if j + 1 < b1:
            rt_[j + 1 : b1] -= np.outer(h_[j + 1 : b1, j], c)


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


def _fit_group(group: Tensor, u_diag: Tensor, threshold: Tensor | None, config: QuantConfig) -> _GroupStats:
    """First-order stats of a column group (out, g) at the moment the GPTQ loop reaches it; `threshold`
    is the outlier threshold per row (out,), None without outliers."""
    maxq = max_code(config.wbits)
    if config.method == "gptq":
        scale16, zero16 = fit_minmax_fp16(group, maxq)  # (out,) fp16
        return _GroupStats(scale16.float(), zero16.float(), (scale16, zero16))
    if threshold is not None and not config.simplified_outliers:
        group = fit_without_likely_outliers(group, u_diag, maxq, threshold.unsqueeze(1))
    weight = u_diag.float().square().reciprocal()  # (g,) cost of a unit error in each column (OBS)
    scale, zero = fit_minmax(group, maxq)  # (out,) fp32
    # scales and zeros together: (2, out) codes and dequantized values, (2, row_groups, 2) fp16 stats
    codes, stats, deq = quantize_row_groups(
        torch.stack([scale, zero]), config.stat_groupsize, config.stat_bits
    )
    if config.stat_search:
        codes, deq = search_stat_codes(
            group, weight, stats, codes, config.stat_groupsize, config.stat_bits, maxq
        )
    second = torch.cat([stats[0], stats[1]], dim=-1)  # (row_groups, 4) fp16: scale's, then zero's
    return _GroupStats(deq[0], deq[1], (codes[0], codes[1], second))


def _unpacked(
    config: QuantConfig,
    shape: tuple[int, int],
    codes: Tensor,
    groups: list[_GroupStats],
    rows: slice,
    outliers: tuple[Tensor, Tensor, Tensor] | None,  # rows, columns, fp16 deltas
    perm: Tensor | None,
) -> UnpackedLinear:
    """One linear's `UnpackedLinear`: its codes (out, in), and rows `rows` of the stacked group stats."""
    out, n = shape
    meta = LinearMeta.from_config(config, out, n)
    stored = [torch.stack([g.stored[k] for g in groups], dim=1) for k in range(len(groups[0].stored))]
    if config.method == "gptq":
        return UnpackedLinear(
            meta=meta, codes=codes.long(), perm=perm, scales=stored[0][rows], zeros=stored[1][rows]
        )
    dev = codes.device
    if outliers is None:
        empty = torch.zeros(0, dtype=torch.long, device=dev)
        outliers = (empty, empty.clone(), torch.zeros(0, dtype=torch.half, device=dev))
    outlier_rows, cols, values = outliers
    sg = config.stat_groupsize  # rows.start is a multiple of it (see quantize_linears)
    return UnpackedLinear(
        meta=meta,
        codes=codes.long(),
        perm=perm,
        scale_codes=stored[0][rows].long(),  # (out, groups)
        zero_codes=stored[1][rows].long(),  # (out, groups)
        second=stored[2][rows.start // sg : -(-rows.stop // sg)],  # (row_groups, groups, 4) fp16
        outlier_rows=outlier_rows,
        outlier_cols=cols,
        outlier_values=values,
    )


def _inverse_cholesky_upper(h: Tensor) -> Tensor:
    """Upper Cholesky factor U of H^-1 (H^-1 = U^T U) as fp32; float64 when fp32 is not accurate enough.

    Computed without forming H^-1: with J the index reversal, J H J = L L^T gives H^-1 = (J L^-T J)(J L^-1 J),
    and J L^-1 J is upper triangular with a positive diagonal, so it is U (the factor is unique). One
    Cholesky and one triangular inverse: much faster than `cholesky_inverse` + a second Cholesky on CPUs.
    """
    for dtype in (torch.float32, torch.float64):
        chol, info = torch.linalg.cholesky_ex(h.to(dtype).flip(0, 1))
        if int(info) == 0:
            u = _lower_triangular_inverse(chol).flip(0, 1)
            if bool(torch.isfinite(u).all()):
                return u.float()
    raise ConfigError("the Hessian is not positive definite even in float64; increase percdamp")


def _lower_triangular_inverse(lower: Tensor) -> Tensor:
    """L^-1 of a lower-triangular L (n, n) by halves: [[A, 0], [B, C]]^-1 = [[A^-1, 0], [-C^-1 B A^-1, C^-1]].

    The standard blocked triangular inversion (as LAPACK's trtri): about n^3 / 2 flops in matrix products
    where a triangular solve against the identity spends n^3 (the solve is kept for blocks <= 256).
    """
    n = lower.shape[0]
    if n <= 256:
        eye = torch.eye(n, dtype=lower.dtype, device=lower.device)
        return torch.linalg.solve_triangular(lower, eye, upper=False)
    k = n // 2
    inv = torch.zeros_like(lower)
    a_inv, c_inv = _lower_triangular_inverse(lower[:k, :k]), _lower_triangular_inverse(lower[k:, k:])
    inv[:k, :k], inv[k:, k:] = a_inv, c_inv
    torch.matmul(c_inv, lower[k:, :k] @ a_inv, out=inv[k:, :k]).neg_()
    return inv


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
