"""SpQR's unstructured-outlier machinery: the threshold scale and the leave-one-out refit.

Criterion (paper Alg. 1, official `spqr_engine.py`): weight (i, j) is an outlier when
`((w - q) / U[j, j])**2 > tau * s`, with U the upper Cholesky factor of the damped inverse Hessian.

Where `s` comes from: the official code (Vahe1994/SpQR, `spqr_engine.py`, `SPQRUtil.quantize`) computes
`outlier_scale = (weight.var(dim=0) / torch.diag(H_inv_cho).square()).mean()` once, before the GPTQ loop,
on the *permuted* weight with dead columns zeroed and no GPTQ update applied yet, using torch's default
unbiased variance over output rows. `outlier_scale` does exactly that (population variance when there is a
single output row, where the unbiased one is undefined).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from spqr_run.quant.grid import (
    EPS,
    dequantize_codes,
    fit_minmax,
    minmax_from_range,
    quantize_codes,
    widen_degenerate,
)


def outlier_scale(weight: Tensor, u_diag: Tensor) -> float:
    """s = mean_j(Var_rows(W[:, j]) / U[j, j]**2) for the permuted weight (out, in) and diag(U) (in,)."""
    correction = 1 if weight.shape[0] > 1 else 0
    return float((weight.var(dim=0, correction=correction) / u_diag.square()).mean())


def minmax_roundtrip(x: Tensor, maxq: int) -> Tensor:
    """Quantize-dequantize `x` (..., n) on its own first-order min-max grid over the last dim."""
    scale, zero = fit_minmax(x, maxq)
    scale, zero = scale.unsqueeze(-1), zero.unsqueeze(-1)
    return dequantize_codes(quantize_codes(x, scale, zero, maxq), scale, zero)


def leave_one_out_reduction(group: Tensor, u_diag: Tensor, maxq: int) -> Tensor:
    """How much the group's Hessian-weighted error drops when each weight is left out of its row's grid.

    group (out, g) weights, u_diag (g,) their diag(U) -> (out, g): baseline error of the row minus the
    error of the other g-1 weights quantized on a grid fitted without weight k (weight k itself, kept at
    full precision, costs nothing). First-order grids only, as in the official `get_leave_one_out_error`.

    Vectorised over the whole group: leaving weight k out changes a row's min-max grid only when k is the
    row's argmin (the grid then starts at the second smallest value) or its argmax (ends at the second
    largest). So every row needs just three grids: the full one, "without the argmin" and "without the
    argmax", i.e. an (out, 3, g) error tensor instead of the (out, g, g-1) one of a literal implementation.
    """
    out, g = group.shape
    group = group.float()
    if g == 1:  # leaving out the only weight removes all of the error
        return ((minmax_roundtrip(group, maxq) - group) / u_diag).square()
    lo, arg_lo = group.min(dim=1, keepdim=True)  # (out, 1); a constant row may give arg_lo == arg_hi
    hi, arg_hi = group.max(dim=1, keepdim=True)
    lo2 = group.scatter(1, arg_lo, math.inf).amin(dim=1, keepdim=True)  # second smallest (out, 1)
    hi2 = group.scatter(1, arg_hi, -math.inf).amax(dim=1, keepdim=True)  # second largest (out, 1)
    # (out, 3) ranges: full, without the argmin, without the argmax
    lo3, hi3 = torch.cat([lo, lo2, lo], dim=1), torch.cat([hi, hi, hi2], dim=1)
    scale, zero = minmax_from_range(*widen_degenerate(lo3, hi3, maxq), maxq)  # (out, 3)
    scale, zero = scale.unsqueeze(-1), zero.unsqueeze(-1)  # (out, 3, 1)
    # quantize_codes then dequantize_codes on (out, 3, g), in place: the same expressions, fewer buffers
    err = group.unsqueeze(1) / scale.clamp_min(EPS)
    err.add_(zero).round_().clamp_(0, maxq).sub_(zero).mul_(scale)  # dequantized (out, 3, g)
    err.sub_(group.unsqueeze(1)).div_(u_diag).square_()  # ((deq - w) / U[j, j])**2
    # the argmin / argmax left out: the others on the changed grid, summed without weight k itself
    err[:, 1].scatter_(1, arg_lo, 0.0)
    err[:, 2].scatter_(1, arg_hi, 0.0)
    sums = err.sum(dim=2, keepdim=True)  # (out, 3, 1): base, without argmin, without argmax
    base = sums[:, 0]  # (out, 1)
    loo = base - err[:, 0]  # (out, g): the other weights on the (unchanged) full grid
    loo.scatter_(1, arg_lo, sums[:, 1]).scatter_(1, arg_hi, sums[:, 2])
    return base - loo


def fit_without_likely_outliers(
    group: Tensor, u_diag: Tensor, maxq: int, threshold: float | Tensor
) -> Tensor:
    """The group with its likely outliers (leave-one-out gain > threshold) replaced by their row's mean
    of the remaining weights, so the min-max statistics fitted on it ignore them. (out, g) -> (out, g).
    `threshold` is a number or a tensor broadcast against (out, g), e.g. (out, 1) for one per row."""
    threshold = torch.as_tensor(threshold, dtype=torch.float32, device=group.device)
    if group.device.type == "cpu":
        # Leaving one weight out never removes more than the row's whole error on the full grid (`base`),
        # so a row with base <= threshold has no likely outlier: only the other rows need the three grids.
        # Exact (the margin covers summation order); on CPUs it skips most rows of 4-bit groups. Not on
        # GPUs, where the row selection would wait for the device.
        base = ((minmax_roundtrip(group, maxq) - group) / u_diag).square().sum(dim=1, keepdim=True)
        candidate = (base > threshold * (1 - 1e-4)).squeeze(1)  # (out,)
        if not bool(candidate.any()):
            return group
        rows = candidate.nonzero().squeeze(1)
        row_threshold = threshold[rows] if threshold.ndim == 2 and threshold.shape[0] > 1 else threshold
        likely = torch.zeros(group.shape, dtype=torch.bool)
        likely[rows] = leave_one_out_reduction(group[rows], u_diag, maxq) > row_threshold
    else:
        likely = leave_one_out_reduction(group, u_diag, maxq) > threshold  # (out, g)
    keep = (~likely).float()
    mean = (group * keep).sum(dim=1, keepdim=True) / keep.sum(dim=1, keepdim=True).clamp_min(1)  # (out, 1)
    return torch.where(likely, mean, group)
