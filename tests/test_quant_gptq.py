"""The blocked GPTQ / SpQR loop against a slow column-by-column reference written here from the papers."""

from __future__ import annotations

import math

import pytest
import torch

from spqr_run.errors import ConfigError, ModelFormatError
from spqr_run.quant import QuantConfig, quantize_linear


def _hessian(n: int, tokens: int = 512, dead: tuple[int, ...] = ()) -> torch.Tensor:
    """H = 2/N X^T X of correlated random activations (in, in), optionally with dead (all-zero) inputs."""
    mix = torch.randn(n, n) / math.sqrt(n) + torch.eye(n) * torch.rand(n) * 2
    x = torch.randn(tokens, n) @ mix  # (N, in)
    x[:, list(dead)] = 0
    return 2 / tokens * x.T @ x


def _fp16_stats(group: torch.Tensor, maxq: int):
    lo, hi = group.amin(1), group.amax(1)
    s = ((hi - lo) / maxq).half().float()
    return s, (-lo / s).half().float()


def _bilevel(values: torch.Tensor, bits: int, rows: int = 16) -> torch.Tensor:
    """Second-order quantization of per-row stats in groups of `rows` rows, fp16 (scale, zero)."""
    out = []
    for g0 in range(0, len(values), rows):
        v = values[g0 : g0 + rows]
        s, z = _fp16_stats(v.unsqueeze(0), 2**bits - 1)
        out.append(s * (torch.clamp(torch.round(v / s + z), 0, 2**bits - 1) - z))
    return torch.cat(out)


def _spqr_stats(group: torch.Tensor, maxq: int):
    lo, hi = group.amin(1), group.amax(1)
    s = (hi - lo) / maxq
    return _bilevel(s, 3), _bilevel(-lo / s, 3)


def slow_reference(w, h, *, method, wbits, groupsize, act_order, percdamp):
    """Column-by-column GPTQ without blocks (Frantar et al. 2022, Alg. 1 with lazy batching removed):
    stats of a group are fitted when its first column is reached; after rounding column j its scaled
    error (w_j - q_j) / U[j, j] is subtracted from every later column through row j of U."""
    w, h = w.double().clone(), h.double().clone()
    n = w.shape[1]
    perm = torch.argsort(torch.diag(h), descending=True, stable=True) if act_order else torch.arange(n)
    w, h = w[:, perm], h[perm][:, perm]
    h += torch.eye(n, dtype=h.dtype) * percdamp * torch.diag(h).mean()
    u = torch.linalg.cholesky(torch.linalg.inv(h), upper=True)  # H^-1 = U^T U
    maxq = 2**wbits - 1
    codes = torch.zeros_like(w)
    recon = torch.zeros_like(w)
    for j in range(n):
        if j % groupsize == 0:
            group = w[:, j : j + groupsize].float()
            s, z = _fp16_stats(group, maxq) if method == "gptq" else _spqr_stats(group, maxq)
        q = torch.clamp(torch.round(w[:, j].float() / s + z), 0, maxq)
        codes[:, j], recon[:, j] = q.double(), (s * (q - z)).double()
        e = (w[:, j] - recon[:, j]) / u[j, j]
        w[:, j + 1 :] -= torch.outer(e, u[j, j + 1 :])
    return codes, recon, perm


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize(
    "method,wbits,groupsize,shape",
    [("gptq", 4, 32, (48, 100)), ("gptq", 3, 128, (32, 160)), ("spqr", 3, 16, (40, 72))],
)
def test_gptq_loop_matches_slow_reference(method, wbits, groupsize, shape, act_order):
    out, n = shape
    w, h = torch.randn(out, n), _hessian(n)
    cfg = QuantConfig(
        method=method,
        wbits=wbits,
        groupsize=groupsize,
        blocksize=32,  # several blocks, so the lazy batch update is exercised
        act_order=act_order,
        outlier_threshold=math.inf,
    )
    res = quantize_linear(w, h, config=cfg)
    ref_codes, ref_recon, ref_perm = slow_reference(
        w, h, method=method, wbits=wbits, groupsize=groupsize, act_order=act_order, percdamp=cfg.percdamp
    )
    q = res.quantized
    assert torch.equal(q.perm_indices() if act_order else torch.arange(n), ref_perm)
    codes = q.unpack().codes
    # fp32 blocked vs float64 unblocked: a weight within ~1e-6 of a rounding boundary may round the other
    # way and nudge its successors, so demand near-total agreement rather than bit equality.
    agree = (codes == ref_codes.long()).float().mean().item()
    assert agree > 0.98, agree
    ref_err = (
        (w[:, ref_perm] - ref_recon.float()) @ h[ref_perm][:, ref_perm] * (w[:, ref_perm] - ref_recon.float())
    ).sum()
    ref_rel = math.sqrt(ref_err / ((w @ h) * w).sum())
    assert res.relative_error == pytest.approx(ref_rel, rel=0.02)


def test_gptq_beats_rtn_on_the_same_grid():
    out, n = 64, 256
    w, h = torch.randn(out, n), _hessian(n)
    errs = {
        m: quantize_linear(w, h, config=QuantConfig(method=m, wbits=3, groupsize=64)).relative_error
        for m in ("gptq", "rtn")
    }
    assert errs["gptq"] < 0.9 * errs["rtn"], errs


def test_dead_columns_are_zeroed_and_sorted_last():
    out, n = 16, 48
    dead = (3, 17, 40)
    w, h = torch.randn(out, n), _hessian(n, dead=dead)
    res = quantize_linear(w, h, config=QuantConfig(method="gptq", wbits=4, groupsize=16))
    perm = res.quantized.perm_indices()
    assert set(perm[-3:].tolist()) == set(dead)
    # Dead inputs are always zero, so their weights (zeroed, then rounded to the group's grid) cost nothing;
    # they must not disturb the rest: the error stays that of a healthy layer.
    assert math.isfinite(res.relative_error) and res.relative_error < 0.2
    assert bool(torch.isfinite(res.reconstruction).all())


def test_quantize_linear_rejects_bad_inputs():
    w, h = torch.randn(8, 32), _hessian(32)
    cfg = QuantConfig()
    with pytest.raises(ConfigError, match="Hessian"):
        quantize_linear(w, None, config=cfg)
    with pytest.raises(ConfigError, match="hessian"):
        quantize_linear(w, h[:16, :16], config=cfg)
    with pytest.raises(ConfigError, match="weight"):
        quantize_linear(torch.randn(32), h, config=cfg)
    bad = w.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(ModelFormatError, match="nan"):
        quantize_linear(bad, h, config=cfg)
    with pytest.raises(ConfigError, match="in_features"):
        quantize_linear(torch.randn(1, 70000), None, config=QuantConfig(method="spqr"))
    with pytest.raises(ConfigError, match="act_order"):  # the permutation is stored as 16-bit indices
        quantize_linear(torch.randn(1, 70000), None, config=QuantConfig(method="gptq"))
