"""Min-max grids, SpQR's bilevel (second-order) statistics and QuantConfig validation."""

from __future__ import annotations

import math

import pytest
import torch

from spqr_run.errors import ConfigError, ModelFormatError
from spqr_run.quant import QuantConfig
from spqr_run.quant.grid import (
    dequantize_codes,
    fit_minmax,
    fit_minmax_fp16,
    quantize_codes,
    quantize_row_groups,
    search_stat_codes,
    weighted_grid_error,
)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_minmax_grid_covers_range_and_error_is_half_a_step(bits):
    maxq = 2**bits - 1
    x = torch.randn(50, 16) * torch.rand(50, 1) * 3  # rows with different spreads
    scale, zero = fit_minmax(x, maxq)  # (50,)
    s, z = scale.unsqueeze(1), zero.unsqueeze(1)
    rec = dequantize_codes(quantize_codes(x, s, z, maxq), s, z)
    torch.testing.assert_close(
        dequantize_codes(torch.zeros(1), s, z).squeeze(1), x.amin(1), atol=1e-6, rtol=1e-5
    )
    torch.testing.assert_close(
        dequantize_codes(torch.full((1,), maxq), s, z).squeeze(1), x.amax(1), atol=1e-5, rtol=1e-5
    )
    assert bool(((rec - x).abs() <= s / 2 * (1 + 1e-4) + 1e-7).all())


def test_degenerate_rows_reconstruct_exactly():
    x = torch.tensor([[0.0] * 16, [0.37] * 16, [-2.5] * 16])  # constant rows, incl. all zero
    for fit in (fit_minmax, fit_minmax_fp16):
        scale, zero = fit(x, 7)
        s, z = scale.float().unsqueeze(1), zero.float().unsqueeze(1)
        rec = dequantize_codes(quantize_codes(x, s, z, 7), s, z)
        assert bool(torch.isfinite(rec).all())
        torch.testing.assert_close(rec, x, atol=2e-3, rtol=2e-3)  # fp16 stats: ~1e-3 relative
        assert rec[0].abs().max() == 0  # zero stays exactly zero


def _direct_bilevel(values: torch.Tensor, groupsize: int, bits: int):
    """Straightforward loop over row groups: min-max of the group, fp16 (scale, zero), round, dequantize."""
    maxq = 2**bits - 1
    codes, deq, stats = [], [], []
    for g0 in range(0, len(values), groupsize):
        v = values[g0 : g0 + groupsize]
        lo, hi = v.min(), v.max()
        s16 = ((hi - lo) / maxq).half()
        z16 = (-lo / s16.float()).half()
        c = torch.clamp(torch.round(v / s16.float() + z16.float()), 0, maxq)
        codes.append(c)
        deq.append(s16.float() * (c - z16.float()))
        stats.append(torch.stack([s16, z16]))
    return torch.cat(codes), torch.stack(stats), torch.cat(deq)


@pytest.mark.parametrize("out", [16, 48, 37, 5])
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_bilevel_stats_match_direct_reference(out, bits):
    scales = torch.rand(out) * 0.05 + 0.01  # first-order scales of one column group
    zeros = torch.rand(out) * 7  # unrounded first-order zeros
    for values in (scales, zeros):
        codes, stats, deq = quantize_row_groups(values, 16, bits)
        ref_codes, ref_stats, ref_deq = _direct_bilevel(values, 16, bits)
        assert stats.dtype == torch.float16 and stats.shape == (math.ceil(out / 16), 2)
        assert torch.equal(codes, ref_codes)
        assert torch.equal(stats, ref_stats)
        assert torch.equal(deq, ref_deq)
        step = stats[:, 0].float().repeat_interleave(16)[:out]
        assert bool(((deq - values).abs() <= step * 0.51 + 1e-6).all())  # half a step (+ fp16 zero rounding)


def test_config_validation_and_dict_round_trip():
    cfg = QuantConfig(method="spqr", wbits=4, outlier_threshold=math.inf, percdamp=1)
    assert cfg.percdamp == 1.0 and isinstance(cfg.percdamp, float)
    assert QuantConfig.from_dict(cfg.to_dict()) == cfg
    assert cfg.to_dict()["outlier_threshold"] == "inf"
    assert QuantConfig(method="gptq", wbits=8, groupsize=128).groupsize == 128
    bad = [
        {"method": "awq"},
        {"wbits": 8},  # spqr: 2, 3, 4 only
        {"wbits": True},
        {"groupsize": 24},  # spqr tiles are 16 x 16
        {"groupsize": 32},  # the packed layout is built from 16 x 16 mma tiles only
        {"stat_groupsize": 32},
        {"stat_groupsize": 0},
        {"stat_bits": 9},
        {"outlier_threshold": 0.0},
        {"outlier_threshold": float("nan")},
        {"percdamp": -1.0},
        {"blocksize": 0},
        {"act_order": 1},
    ]
    for kwargs in bad:
        with pytest.raises(ConfigError):
            QuantConfig(**kwargs)
    with pytest.raises(ModelFormatError, match="unknown"):
        QuantConfig.from_dict({"wbits": 3, "bogus": 1}, source="x.spqr")
    with pytest.raises(ModelFormatError, match="x.spqr"):
        QuantConfig.from_dict({"wbits": 7}, source="x.spqr")


def _bilevel_minmax(x, bits=3, stat_bits=3, stat_groupsize=16):
    """Min-max first-order stats of rows x (out, g), quantized as SpQR does: codes, stats, dequantized."""
    scale, zero = fit_minmax(x, 2**bits - 1)
    return quantize_row_groups(torch.stack([scale, zero]), stat_groupsize, stat_bits)


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("out", [48, 37])
def test_stat_code_search_never_increases_the_weighted_error(bits, out):
    torch.manual_seed(bits * 100 + out)
    maxq = 2**bits - 1
    x = torch.randn(out, 16) * torch.rand(out, 1) * 2 + torch.randn(out, 1) * 0.3
    x[torch.rand(out, 16) < 0.05] *= 4  # a few large weights stretch the min-max range
    weight = torch.rand(16) * 3 + 0.1  # 1 / U[j, j]**2: a known Hessian diagonal
    codes, stats, deq = _bilevel_minmax(x, bits)
    new_codes, new_deq = search_stat_codes(x, weight, stats, codes, 16, 3, maxq)
    before = weighted_grid_error(x, weight, deq[0], deq[1], maxq)  # (out,)
    after = weighted_grid_error(x, weight, new_deq[0], new_deq[1], maxq)
    assert bool((after <= before).all())
    assert float(after.sum()) < 0.9 * float(before.sum())  # and it is really better on the whole
    # the new codes are plain 3-bit codes on the unchanged fp16 second-order grids, read back exactly
    assert bool(((new_codes >= 0) & (new_codes <= 7) & (new_codes == new_codes.round())).all())
    rows = torch.arange(out) // 16
    for k in range(2):
        grid = stats[k].float()[rows]  # (out, 2)
        assert torch.equal(dequantize_codes(new_codes[k], grid[:, 0], grid[:, 1]), new_deq[k])
    # brute force over all 64 pairs for a few rows: the full search finds the minimum
    _, full_deq = search_stat_codes(x, weight, stats, codes, 16, 3, maxq, window=None)
    full = weighted_grid_error(x, weight, full_deq[0], full_deq[1], maxq)
    assert bool((full <= after).all())
    for r in (0, out // 2, out - 1):
        grid = stats.float()[:, rows[r]]
        best = min(
            float(weighted_grid_error(x[r], weight, dequantize_codes(torch.tensor(float(a)), *grid[0]),
                                      dequantize_codes(torch.tensor(float(b)), *grid[1]), maxq))
            for a in range(8) for b in range(8)
        )  # fmt: skip
        assert float(full[r]) == pytest.approx(best, rel=1e-6)
