"""The quantizer's CPU fast paths against the plain algorithm they replace.

`reference_spqr` below is the quantizer as it was before the speed work, written out plainly: one linear,
one column at a time in torch, each scaled error sent to every later column at once, U from a triangular
solve against the identity. The fast paths (NumPy column loop, linears sharing a Hessian quantized as one
stack, blocked triangular inverse, NumPy bit packing) must give the same numbers up to float rounding.
"""

from __future__ import annotations

import math

import pytest
import torch

import spqr_run.quant.spqr as spqr
from spqr_run.quant import QuantConfig, quantize_linear, quantize_linears
from spqr_run.quant.grid import EPS, fit_minmax, quantize_row_groups
from spqr_run.quant.outliers import fit_without_likely_outliers, outlier_scale
from spqr_run.quant.packing import _pack_bits_numpy, _pack_bits_torch, unpack_bits


def _hessian(n: int, tokens: int = 512, dead: tuple[int, ...] = ()) -> torch.Tensor:
    """H = 2/N X^T X of correlated activations with a few loud channels (in, in)."""
    mix = torch.randn(n, n) / math.sqrt(n) + torch.eye(n) * torch.rand(n) * 2
    x = torch.randn(tokens, n) @ mix
    x[:, : max(1, n // 32)] *= 8
    x[:, list(dead)] = 0
    return 2 / tokens * x.T @ x


def reference_spqr(w: torch.Tensor, h: torch.Tensor, cfg: QuantConfig):
    """Plain SpQR (act_order on): codes (out, in), reconstruction (out, in), outlier mask, permutation."""
    w, h = w.clone(), h.clone()
    out, n = w.shape
    dead = h.diagonal() == 0
    perm = torch.argsort(h.diagonal(), descending=True, stable=True)
    h[dead, dead] = 1
    w[:, dead] = 0
    w, h = w[:, perm], h[perm][:, perm]
    h.diagonal().add_(cfg.percdamp * h.diagonal().mean())
    chol = torch.linalg.cholesky(h.flip(0, 1))
    u = torch.linalg.solve_triangular(chol, torch.eye(n), upper=False).flip(0, 1)  # H^-1 = U^T U
    ud = u.diagonal()
    threshold = cfg.outlier_threshold * outlier_scale(w, ud)
    maxq, gs = 2**cfg.wbits - 1, cfg.groupsize
    codes, recon = torch.zeros(out, n), torch.zeros(out, n)
    outlier = torch.zeros(out, n, dtype=torch.bool)
    for j in range(n):
        if j % gs == 0:
            group = fit_without_likely_outliers(w[:, j : j + gs], ud[j : j + gs], maxq, threshold)
            scale, zero = fit_minmax(group, maxq)
            scale = quantize_row_groups(scale, cfg.stat_groupsize, cfg.stat_bits)[2]
            zero = quantize_row_groups(zero, cfg.stat_groupsize, cfg.stat_bits)[2]
        q = torch.clamp(torch.round(w[:, j] / scale.clamp_min(EPS) + zero), 0, maxq)
        deq = scale * (q - zero)
        diff = w[:, j] - deq
        outlier[:, j] = (diff / ud[j]).square() > threshold
        deq = torch.where(outlier[:, j], deq + diff.half().float(), deq)
        codes[:, j], recon[:, j] = q, deq
        e = (w[:, j] - deq) / ud[j]
        w[:, j + 1 :] -= torch.outer(e, u[j, j + 1 :])
    return codes, recon, outlier, perm


def _outlier_mask(q, shape) -> torch.Tensor:
    u = q.unpack()
    mask = torch.zeros(shape, dtype=torch.bool)
    mask[u.outlier_rows, u.outlier_cols] = True
    return mask


CONFIGS = [
    QuantConfig(wbits=3, outlier_threshold=0.2),
    QuantConfig(wbits=4, outlier_threshold=0.2, percdamp=0.1, blocksize=32),
]


@pytest.mark.parametrize("cfg", CONFIGS, ids=["w3", "w4-blocks32"])
def test_quantizer_matches_the_plain_reference(cfg):
    torch.manual_seed(0)
    w, h = torch.randn(64, 96), _hessian(96, dead=(5, 40))
    w[3, 7] = 9.0  # a clear outlier
    res = quantize_linear(w, h, config=cfg)
    codes, recon, outlier, perm = reference_spqr(w, h, cfg)
    q = res.quantized
    assert torch.equal(q.perm_indices(), perm)
    got_codes = q.unpack().codes.float()
    # the same arithmetic in another order: a weight within float rounding of a rounding boundary may
    # round the other way and nudge its successors, so demand near-total agreement, not bit equality
    agree = (got_codes == codes).float().mean().item()
    assert agree > 0.995, agree
    mask = _outlier_mask(q, w.shape)
    assert outlier.sum() > 0 and (mask == outlier).float().mean().item() > 0.995
    same = got_codes == codes
    torch.testing.assert_close(res.reconstruction[same], recon[same], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    "cfg",
    [
        *CONFIGS,
        QuantConfig(method="gptq", wbits=4, groupsize=32),
        QuantConfig(wbits=3, simplified_outliers=True),
    ],
    ids=["w3", "w4-blocks32", "gptq", "simplified"],
)
def test_numpy_column_loop_equals_the_torch_loop_bit_for_bit(cfg, monkeypatch):
    """The CPU loop (NumPy views) evaluates the torch loop's expressions (the GPU path) exactly."""
    torch.manual_seed(1)
    w, h = torch.randn(48, 80), _hessian(80, dead=(3,))
    fast = quantize_linear(w, h, config=cfg)
    monkeypatch.setattr(spqr, "_round_columns_numpy", spqr._round_columns_torch)
    slow = quantize_linear(w, h, config=cfg)
    assert torch.equal(fast.reconstruction, slow.reconstruction)
    for name, t in fast.quantized.tensors().items():
        assert torch.equal(t, slow.quantized.tensors()[name]), name


@pytest.mark.parametrize("method", ["spqr", "gptq", "rtn"])
def test_linears_sharing_a_hessian_equal_separate_runs(method):
    """q/k/v quantized as one stack give each linear's own result (per-linear outlier threshold)."""
    torch.manual_seed(2)
    n = 64
    h = _hessian(n)
    ws = [torch.randn(32, n), torch.randn(16, n) * 3, torch.randn(48, n) * 0.5]
    cfg = QuantConfig(method=method, wbits=3, groupsize=16)
    together = quantize_linears(ws, h, config=cfg)
    for w, t in zip(ws, together, strict=True):
        alone = quantize_linear(w, h, config=cfg)
        assert t.quantized.meta == alone.quantized.meta
        same = t.reconstruction == alone.reconstruction
        assert same.float().mean().item() > 0.995
        assert t.relative_error == pytest.approx(alone.relative_error, rel=1e-3)
        assert t.outlier_fraction == pytest.approx(alone.outlier_fraction, abs=2 / w.numel())
        assert t.seconds > 0
        assert torch.equal(t.quantized.dequantize(), t.reconstruction)  # the stored slice is consistent


def test_linears_not_aligned_to_stat_groups_fall_back_to_separate_runs():
    torch.manual_seed(3)
    h = _hessian(32)
    ws = [torch.randn(20, 32), torch.randn(16, 32)]  # 20 rows: a second-order group would straddle
    cfg = QuantConfig(wbits=3)
    for t, w in zip(quantize_linears(ws, h, config=cfg), ws, strict=True):
        alone = quantize_linear(w, h, config=cfg)
        assert torch.equal(t.reconstruction, alone.reconstruction)


def test_linears_sharing_a_hessian_need_the_same_inputs():
    with pytest.raises(Exception, match="same number of input features"):
        quantize_linears([torch.randn(16, 32), torch.randn(16, 48)], _hessian(32), config=QuantConfig())


@pytest.mark.parametrize("n", [100, 300, 700])
def test_blocked_triangular_inverse(n):
    torch.manual_seed(n)
    lower = torch.linalg.cholesky(_hessian(n, tokens=2 * n) + 0.01 * torch.eye(n))
    inv = spqr._lower_triangular_inverse(lower)
    ref = torch.linalg.solve_triangular(lower, torch.eye(n), upper=False)
    assert torch.equal(inv.triu(1), torch.zeros(n, n))
    torch.testing.assert_close(inv, ref, rtol=1e-4, atol=1e-5 * ref.abs().max().item())


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 7, 8])
def test_numpy_bit_packing_equals_the_torch_packing(bits):
    torch.manual_seed(bits)
    codes = torch.randint(0, 2**bits, (3, 5, 64))
    fast, slow = _pack_bits_numpy(codes, bits), _pack_bits_torch(codes, bits)
    assert fast.dtype == slow.dtype == torch.int32 and torch.equal(fast, slow)
    assert torch.equal(unpack_bits(fast, bits), codes)
