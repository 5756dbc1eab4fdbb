"""SpQRLinear: nn.Linear's call on a packed weight, against x[..., perm] @ W_deq^T."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from spqr_run.models.spqr_linear import SpQRLinear
from spqr_run.quant import QuantConfig, QuantizedLinear, quantize_linear, spqr_matmul_reference
from spqr_run.quant import spqr_matmul as spqr_matmul_module


def _quantized(out: int, n: int, config: QuantConfig) -> QuantizedLinear:
    x = torch.randn(512, n) @ (torch.eye(n) + 0.2 * torch.randn(n, n) / math.sqrt(n))
    return quantize_linear(torch.randn(out, n), 2 / 512 * x.T @ x, config=config).quantized


def _expected(x: torch.Tensor, q: QuantizedLinear, bias: torch.Tensor | None = None) -> torch.Tensor:
    xp = x.float() if q.perm is None else x.float()[..., q.perm_indices()]
    y = xp @ q.dequantize().T
    return y if bias is None else y + bias.float()


@pytest.mark.parametrize(
    "config",
    [
        QuantConfig(wbits=3),
        QuantConfig(method="gptq", wbits=4, groupsize=32),
        QuantConfig(method="rtn", wbits=4),
    ],
    ids=lambda c: c.method,
)
@pytest.mark.parametrize("lead", [(5,), (2, 3), ()])
def test_forward_matches_permuted_dequantized_matmul(config, lead):
    q = _quantized(40, 72, config)
    bias = torch.randn(40)
    layer = SpQRLinear(q, bias=bias)
    x = torch.randn(*lead, 72)
    y = layer(x)
    assert y.shape == (*lead, 40) and y.dtype == torch.float32
    torch.testing.assert_close(y, _expected(x, q, bias), rtol=1e-5, atol=1e-5)
    # the module is a thin shell: its forward is exactly the reference op the kernel will replace
    assert torch.equal(SpQRLinear(q)(x), spqr_matmul_reference(x, q))


def test_row_blocks_do_not_change_the_result(monkeypatch):
    q = _quantized(70, 48, QuantConfig(wbits=4))
    x = torch.randn(9, 48)
    whole = spqr_matmul_reference(x, q)
    monkeypatch.setattr(spqr_matmul_module, "ROW_BLOCK_ELEMENTS", 48 * 16)  # 16 rows a block: 5 blocks
    # the weights are bit-identical; only the BLAS may sum a narrower product in another order (~1 ulp)
    torch.testing.assert_close(spqr_matmul_reference(x, q), whole, rtol=1e-5, atol=1e-5)


def test_half_input_rounds_once_and_module_casts_keep_packed_dtypes():
    q = _quantized(32, 64, QuantConfig(wbits=3))
    layer = SpQRLinear(q, bias=torch.randn(32)).half()
    assert layer.tiles.dtype == torch.int32 and layer.outliers.dtype == torch.int32
    assert layer.bias.dtype == torch.float16
    layer = layer.float()  # packed words must survive a module-wide float() unchanged
    assert layer.tiles.dtype == torch.int32 and layer.outlier_row_ptr.dtype == torch.int32
    assert torch.equal(layer.tiles, q.tiles) and torch.equal(layer.outliers, q.outliers)
    x = torch.randn(4, 64).half()
    y = layer.half()(x)
    assert y.dtype == torch.float16
    torch.testing.assert_close(y, _expected(x, q, layer.bias).half(), rtol=0, atol=0)


def test_state_dict_device_move_and_nn_linear_interface():
    q = _quantized(24, 40, QuantConfig(method="gptq", wbits=4, groupsize=16))
    layer = SpQRLinear(q)
    assert set(layer.state_dict()) == set(q.tensors())
    assert layer.in_features == 40 and layer.out_features == 24
    moved = layer.to("cpu")
    x = torch.randn(3, 40)
    torch.testing.assert_close(moved(x), _expected(x, q), rtol=1e-5, atol=1e-5)
    assert "method=gptq" in repr(layer)
    seq = nn.Sequential(nn.Linear(8, 40), layer)
    assert seq(torch.randn(2, 8)).shape == (2, 24)
    with pytest.raises(ValueError, match="features"):
        layer(torch.randn(3, 41))


@pytest.mark.parametrize(
    "config",
    [QuantConfig(wbits=4), QuantConfig(method="gptq", wbits=3, groupsize=32)],
    ids=lambda c: c.method,
)
def test_materialized_cpu_path_equals_the_reference(config):
    """The CPU path decodes the weight once (original column order); outputs equal the reference op."""
    q = _quantized(48, 80, config)
    bias = torch.randn(48)
    x = torch.randn(3, 80)
    layer = SpQRLinear(q, bias=bias)
    reference = layer(x)
    layer.materialize(torch.float32)
    assert layer.dense_weight is not None and layer.dense_weight.shape == (48, 80)
    torch.testing.assert_close(layer(x), reference, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer(x), _expected(x, q, bias), rtol=1e-5, atol=1e-5)


def test_materialize_in_row_chunks_is_exact(monkeypatch):
    """The dense copy is decoded a few row tiles at a time (a fused linear's fp32 copy is never whole) and
    equals the whole decoded weight with its columns put back in input order, bit for bit."""
    from spqr_run.models import spqr_linear

    q = _quantized(70, 48, QuantConfig(wbits=3))
    whole = torch.empty(70, 48)
    whole[:, q.perm_indices()] = q.dequantize()
    calls = []
    real = QuantizedLinear.dequantize
    monkeypatch.setattr(
        QuantizedLinear,
        "dequantize",
        lambda self, rows=None, **kw: calls.append(rows) or real(self, rows, **kw),
    )
    monkeypatch.setattr(spqr_linear, "UPCAST_CHUNK", 48 * 32)  # 32 rows a chunk: 3 chunks
    layer = SpQRLinear(q)
    layer.materialize(torch.float32)
    assert calls == [slice(0, 32), slice(32, 64), slice(64, 70)]
    assert torch.equal(layer.dense_weight, whole)
