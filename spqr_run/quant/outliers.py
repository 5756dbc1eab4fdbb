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

import torch
from torch import Tensor

from spqr_run.quant.grid import dequantize_codes, fit_minmax, quantize_codes


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
    """
    out, g = group.shape
    base = ((minmax_roundtrip(group, maxq) - group) / u_diag).square().sum(dim=1, keepdim=True)  # (out, 1)
    if g == 1:
        return base  # leaving out the only weight removes all of the error
    ar = torch.arange(g - 1, device=group.device)
    others = ar.unsqueeze(0) + (ar.unsqueeze(0) >= torch.arange(g, device=group.device).unsqueeze(1)).long()
    data = group[:, others]  # (out, g, g-1): row k of others = every column but k
    loo = ((minmax_roundtrip(data, maxq) - data) / u_diag[others]).square().sum(dim=-1)  # (out, g)
    return base - loo


def fit_without_likely_outliers(group: Tensor, u_diag: Tensor, maxq: int, threshold: float) -> Tensor:
    """The group with its likely outliers (leave-one-out gain > threshold) replaced by their row's mean
    of the remaining weights, so the min-max statistics fitted on it ignore them. (out, g) -> (out, g)."""
    likely = leave_one_out_reduction(group, u_diag, maxq) > threshold  # (out, g)
    keep = (~likely).float()
    mean = (group * keep).sum(dim=1, keepdim=True) / keep.sum(dim=1, keepdim=True).clamp_min(1)  # (out, 1)
    return torch.where(likely, mean, group)
