"""Coordinate-descent refinement of the codes after GPTQ (`QuantConfig.cd_passes`, QuantEase)."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

import spqr_run.quant.spqr as spqr
from spqr_run.errors import ConfigError
from spqr_run.quant import QuantConfig, QuantizedLinear, quantize_linear


def _spd_hessian(n: int, seed: int) -> torch.Tensor:
    """A random SPD matrix (in, in) with correlated columns and a few large diagonal entries."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(4 * n, n, generator=g) @ (torch.randn(n, n, generator=g) / math.sqrt(n) + torch.eye(n))
    x[:, : n // 16] *= 6
    return 2 / x.shape[0] * x.T @ x


def _objective(w: torch.Tensor, h: torch.Tensor, res, percdamp: float) -> float:
    """tr((W - Q) H_d (W - Q)^T) in the quantizer's permuted order, H_d the damped Hessian it refines on."""
    perm = res.quantized.perm_indices()
    hp = h[perm][:, perm].double()
    hp.diagonal().add_(percdamp * hp.diagonal().mean())
    e = (w[:, perm] - res.reconstruction).double()
    return float(((e @ hp) * e).sum())


@pytest.mark.parametrize(
    "base",
    [
        QuantConfig(wbits=3, outlier_threshold=0.3, stat_search=True),
        QuantConfig(wbits=4, outlier_threshold=0.2, percdamp=0.1),
        QuantConfig(wbits=3, outlier_threshold=math.inf),
        QuantConfig(method="gptq", wbits=4, groupsize=32),
    ],
    ids=["w3", "w4", "w3-no-outliers", "gptq"],
)
def test_refinement_lowers_the_layer_objective_pass_after_pass(base):
    torch.manual_seed(0)
    out, n = 64, 160  # n: 1.25 blocks of CD_BLOCK columns, so the lazy block update is exercised
    w = torch.randn(out, n)
    w[torch.rand(out, n) < 0.01] *= 6
    h = _spd_hessian(n, seed=1)
    f = {}
    for passes in (0, 1, 2, 4):
        cfg = dataclasses.replace(base, cd_passes=passes)
        res = quantize_linear(w, h, config=cfg)
        f[passes] = _objective(w, h, res, cfg.percdamp)
        if passes:  # only codes and outlier values change: same stats, same outlier positions, same bytes
            before = quantize_linear(w, h, config=base).quantized
            assert res.quantized.nbytes == before.nbytes
            assert res.quantized.num_outliers == before.num_outliers
    assert f[1] < 0.99 * f[0], f  # strictly (and clearly) lower than GPTQ's
    assert f[2] <= f[1] * (1 + 1e-6) and f[4] <= f[2] * (1 + 1e-6), f


@pytest.mark.parametrize(
    "cfg",
    [
        QuantConfig(wbits=4, stat_search=True, cd_passes=2),
        QuantConfig(wbits=2, stat_bits=4, outlier_threshold=0.1, act_order=False, cd_passes=1),
        QuantConfig(method="gptq", wbits=3, groupsize=48, cd_passes=2),
    ],
    ids=["w4", "w2-many-outliers", "gptq"],
)
@pytest.mark.parametrize("shape", [(48, 64), (37, 150)])
def test_refined_file_dequantizes_to_the_reconstruction_bit_for_bit(cfg, shape):
    torch.manual_seed(2)
    w = torch.randn(*shape)
    res = quantize_linear(w, _spd_hessian(shape[1], seed=3), config=cfg)
    q = res.quantized
    assert cfg.method == "gptq" or q.num_outliers > 0
    loaded = QuantizedLinear.from_tensors(
        {k: v.clone() for k, v in q.tensors().items()}, meta=q.meta.to_dict(), source="t"
    )
    assert torch.equal(loaded.dequantize(), res.reconstruction)


def test_numpy_refinement_equals_the_torch_refinement_bit_for_bit(monkeypatch):
    """The CPU path (NumPy views) evaluates the GPU path's expressions exactly."""
    torch.manual_seed(4)
    w, h = torch.randn(48, 150), _spd_hessian(150, seed=5)
    cfg = QuantConfig(wbits=3, outlier_threshold=0.15, cd_passes=2)
    fast = quantize_linear(w, h, config=cfg)
    monkeypatch.setattr(spqr, "_refine_columns_numpy", spqr._refine_columns_torch)
    slow = quantize_linear(w, h, config=cfg)
    assert fast.quantized.num_outliers > 0
    assert torch.equal(fast.reconstruction, slow.reconstruction)
    for name, t in fast.quantized.tensors().items():
        assert torch.equal(t, slow.quantized.tensors()[name]), name


def _two_column_state(outlier: bool) -> tuple[spqr._LoopState, torch.Tensor, torch.Tensor]:
    """One row w = (0.4, 0.4), integer grid 0..15 (scale 1, zero 0), H = [[1, 0.9], [0.9, 1]], Q = (0, 0)."""
    w0t = torch.tensor([[0.4], [0.4]])  # (in, out) = W^T
    h = torch.tensor([[1.0, 0.9], [0.9, 1.0]])
    st = spqr._LoopState(
        wt=w0t.clone(),
        u=torch.eye(2),
        u_diag=torch.ones(2),
        codes=torch.zeros(2, 1),
        recon=torch.zeros(2, 1),
        err=torch.zeros(2, 1),
        is_outlier=torch.tensor([[False], [outlier]]),
        deltas=torch.zeros(2, 1, dtype=torch.half),
        maxq=15,
        threshold=torch.ones(1),
    )
    return st, w0t, h


@pytest.mark.parametrize("numpy_path", [True, False])
def test_two_columns_reach_the_hand_computed_optimum(numpy_path, monkeypatch):
    """f(q) = d^T H d, d = w - q. From Q = (0, 0): R = D H = (0.76, 0.76), so column 0 moves to
    round(0 + 0.76 / 1) = 1; then d = (-0.6, 0.4), R[1] = 0.9 * -0.6 + 0.4 = -0.14 and column 1 stays at
    round(0 - 0.14) = 0. f: 0.608 -> 0.088, the minimum over all 16 x 16 grid points (brute force below).
    With column 1 an outlier it takes its continuous optimum 0.4 - 0.54 = -0.14 (as fp16 delta over code 0):
    f = 0.36 * (1 - 0.81) = 0.0684."""
    if not numpy_path:
        monkeypatch.setattr(spqr, "_refine_columns_numpy", spqr._refine_columns_torch)
    grid = spqr._GroupStats(scale=torch.ones(1), zero=torch.zeros(1), stored=())
    st, w0t, h = _two_column_state(outlier=False)
    spqr.refine_codes(st, w0t, h, [grid], 16, passes=2)
    assert st.codes.flatten().tolist() == [1.0, 0.0] and st.recon.flatten().tolist() == [1.0, 0.0]
    d = (w0t - st.recon).flatten().double()
    f = float(d @ h.double() @ d)
    brute = min(
        float(dd @ h.double() @ dd)
        for a in range(16)
        for b in range(16)
        for dd in [torch.tensor([0.4 - a, 0.4 - b], dtype=torch.float64)]
    )
    assert f == pytest.approx(0.088, abs=1e-6) and f == pytest.approx(brute, abs=1e-6)

    st, w0t, h = _two_column_state(outlier=True)
    spqr.refine_codes(st, w0t, h, [grid], 16, passes=1)
    delta = torch.tensor(-0.14).half()
    assert st.codes.flatten().tolist() == [1.0, 0.0]
    assert st.deltas[1, 0] == delta and st.recon[1, 0] == delta.float()  # dense 0 + the fp16 delta
    d = (w0t - st.recon).flatten().double()
    assert float(d @ h.double() @ d) == pytest.approx(0.0684, abs=1e-4)


def test_cd_passes_is_validated_and_reaches_the_cli():
    from spqr_run.cli.quantize import build_parser, quant_config_from_args
    from spqr_run.quantize_model import PRESETS

    with pytest.raises(ConfigError, match="cd_passes"):
        QuantConfig(cd_passes=-1)
    with pytest.raises(ConfigError, match="cd_passes"):
        QuantConfig(cd_passes=1.5)  # type: ignore[arg-type]
    args = build_parser().parse_args(["m.gguf", "-o", "x.spqr", "--preset", "3bit", "--cd-passes", "3"])
    assert quant_config_from_args(args).cd_passes == 3
    for passes in (0, 2):  # the near-lossless preset refines with 2 passes; 0 turns it off
        args = build_parser().parse_args(["m.gguf", "-o", "x.spqr", "--cd-passes", str(passes)])
        assert quant_config_from_args(args) == dataclasses.replace(PRESETS["near-lossless"], cd_passes=passes)
    assert PRESETS["near-lossless"].cd_passes == 2 and PRESETS["3bit"].cd_passes == 0
    assert QuantConfig.from_dict(QuantConfig(cd_passes=2).to_dict()).cd_passes == 2
    assert QuantConfig.from_dict({"method": "spqr"}).cd_passes == 0  # files written before the field
