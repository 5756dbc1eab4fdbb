"""quantize_linear end to end: round trip through the stored tensors, bits per weight, quality ordering."""

from __future__ import annotations

import math

import pytest
import torch

from spqr_run.quant import QuantConfig, QuantizedLinear, quantize_linear


def correlated_activations(n: int, tokens: int = 2048) -> torch.Tensor:
    """LLM-like inputs (tokens, in): correlated channels with decaying spectrum, a few loud channels."""
    basis, _ = torch.linalg.qr(torch.randn(n, n))
    spectrum = torch.logspace(0, -2, n)  # singular values 1 .. 0.01
    x = torch.randn(tokens, n) * spectrum @ basis.T
    loud = torch.randperm(n)[: max(1, n // 32)]
    x[:, loud] *= 10
    return x


def hessian_of(x: torch.Tensor) -> torch.Tensor:
    return 2 / x.shape[0] * x.T @ x  # (in, in)


# The round trip below also checks a weight-space sanity bound; on these 256-sample Hessians light damping
# trades weight error for calibration output error beyond it, so these run the SpQR release's damping (1.0).
CONFIGS = [
    QuantConfig(wbits=3, percdamp=1.0),
    QuantConfig(wbits=4, simplified_outliers=True, percdamp=1.0),
    QuantConfig(wbits=3, stat_search=True, percdamp=1.0),
    QuantConfig(wbits=2, stat_bits=4, outlier_threshold=math.inf, act_order=False, percdamp=1.0),
    QuantConfig(method="gptq", wbits=4, groupsize=128, percdamp=1.0),
    QuantConfig(method="gptq", wbits=8, groupsize=48, act_order=False, percdamp=1.0),
    QuantConfig(method="rtn", wbits=3, groupsize=128),
]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: f"{c.method}-w{c.wbits}-g{c.groupsize}")
@pytest.mark.parametrize("shape", [(48, 64), (37, 83)])  # the second is not a multiple of 16 either way
def test_stored_tensors_dequantize_to_the_quantizers_reconstruction(config, shape):
    out, n = shape
    w = torch.randn(out, n)
    res = quantize_linear(w, hessian_of(correlated_activations(n, 256)), config=config)
    q = res.quantized
    loaded = QuantizedLinear.from_tensors(
        {k: v.clone() for k, v in q.tensors().items()}, meta=q.meta.to_dict(), source="t"
    )
    assert torch.equal(loaded.dequantize(), res.reconstruction)  # bit-identical: one formula everywhere
    assert torch.equal(loaded.dequantize(dtype=torch.float16), res.reconstruction.half())
    assert res.reconstruction.shape == (out, n)
    assert 0 < res.relative_error < 0.5 and res.seconds > 0
    if config.method == "rtn":
        assert q.perm is None
    # the reconstruction is close to W in the permuted order (a sanity bound, far from tight)
    perm = q.perm_indices() if q.perm is not None else torch.arange(n)
    rel = ((res.reconstruction - w[:, perm]).norm() / w.norm()).item()
    assert rel < {2: 0.6, 3: 0.3, 4: 0.15, 8: 0.01}[config.wbits], rel


def test_avg_bits_matches_the_formula_for_the_3bit_preset():
    """bits = wbits + (sbits + zbits)/beta1 + 2*(16+16)/(beta1*beta2) + 32*outlier_fraction (paper, DESIGN.md)
    plus what a real file also stores: int32 CSR row pointers (32*(out+1) bits) and the 16-bit perm
    (16*in bits); for 256x256 that is +0.1255 and +0.0625 bits per weight."""
    out = n = 256
    res = quantize_linear(torch.randn(out, n), hessian_of(correlated_activations(n)), config=QuantConfig())
    q = res.quantized
    assert res.outlier_fraction > 0  # the formula's outlier term is exercised
    paper = 3 + (3 + 3) / 16 + 2 * (16 + 16) / (16 * 16) + 32 * res.outlier_fraction
    assert paper == pytest.approx(3.625 + 32 * res.outlier_fraction, abs=1e-12)
    overhead = 32 * (out + 1) / (out * n) + 16 * n / (out * n)
    assert q.avg_bits == pytest.approx(paper + overhead, abs=1e-9)
    assert q.nbytes == sum(t.numel() * t.element_size() for t in q.tensors().values())


def test_avg_bits_4bit_without_outliers_or_perm_is_exactly_4_625():
    cfg = QuantConfig(wbits=4, outlier_threshold=math.inf, act_order=False)
    q = quantize_linear(
        torch.randn(64, 128), hessian_of(correlated_activations(128, 256)), config=cfg
    ).quantized
    assert q.avg_bits == pytest.approx(4.625 + 32 * 65 / (64 * 128), abs=1e-12)  # + empty CSR row pointers


def test_avg_bits_count_the_record_padding():
    """in = 80 is stored as 2 records of 64 columns a row tile (48 padding columns), out = 40 as 3 row tiles:
    the bytes, and so avg_bits, are the padded records + row pointers over the padded rows + the outliers."""
    out, n = 40, 80
    res = quantize_linear(
        torch.randn(out, n), hessian_of(correlated_activations(n, 256)), config=QuantConfig()
    )
    q = res.quantized
    record_bytes = 128 * 3 + 16 * 3 + 32  # 464
    nbytes = 3 * 2 * record_bytes + 4 * (3 * 16 + 1) + 4 * q.num_outliers + 2 * n
    assert q.nbytes == nbytes and q.avg_bits == nbytes * 8 / (out * n)


def test_quality_ordering_spqr_gptq_rtn():
    """SpQR 4-bit (g16 + 3-bit stats + outliers) < GPTQ 4-bit g128 < RTN 4-bit g128 in output error, as the
    paper's tables order them, on heavy-tailed weights and correlated inputs."""
    out, n = 128, 256
    w = torch.randn(out, n) * 0.02
    w[torch.rand(out, n) < 0.005] *= 8  # a few outlier weights
    h = hessian_of(correlated_activations(n))
    err = {
        name: quantize_linear(w, h, config=cfg).relative_error
        for name, cfg in {
            "spqr": QuantConfig(wbits=4),
            "gptq": QuantConfig(method="gptq", wbits=4, groupsize=128),
            "rtn": QuantConfig(method="rtn", wbits=4, groupsize=128),
        }.items()
    }
    assert err["spqr"] < 0.8 * err["gptq"] and err["gptq"] < 0.8 * err["rtn"], err


@pytest.mark.parametrize("wbits,tau", [(3, 0.3), (4, 0.2)])
def test_stat_search_lowers_the_output_error_at_the_same_bits_formula(wbits, tau):
    """The searched stat codes are stored in the same fields (same bits formula, outliers aside) and give
    a lower Hessian-weighted output error than min-max codes on LLM-like weights and inputs."""
    torch.manual_seed(3)
    out, n = 128, 256
    w = torch.randn(out, n)
    w[torch.rand(out, n) < 0.01] *= 5
    h = hessian_of(correlated_activations(n))
    base = quantize_linear(w, h, config=QuantConfig(wbits=wbits, outlier_threshold=tau))
    searched = quantize_linear(w, h, config=QuantConfig(wbits=wbits, outlier_threshold=tau, stat_search=True))
    assert searched.relative_error < 0.97 * base.relative_error, (
        searched.relative_error,
        base.relative_error,
    )
    for res in (base, searched):
        q = res.quantized
        fixed = wbits + (3 + 3) / 16 + 2 * (16 + 16) / (16 * 16) + 32 * (out + 1) / (out * n) + 16 / out
        assert q.avg_bits == pytest.approx(fixed + 32 * res.outlier_fraction, abs=1e-9)
