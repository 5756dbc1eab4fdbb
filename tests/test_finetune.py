"""Fine-tuning the continuous numbers of a quantized model (`spqr_run.finetune`, issue 24 item 1).

The tunable linear must compute exactly what the packed file decodes to, before and after training; training
must lower its objective; and a file quantized with fine-tuning must keep every tensor's dtype and shape
(hence its size and bits) and decode the same on every path."""

from __future__ import annotations

import pytest
import torch

from spqr_run.finetune import FinetuneConfig, TunableSpQRLinear, file_linears, finetune
from spqr_run.loading import build_decoder, open_model
from spqr_run.loading.spqr_file import read_header
from spqr_run.quant import QuantConfig, QuantizedLinear, quantize_linears
from tests import test_quantize_model as tq

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _quantized(out: int, k: int, *, wbits: int = 3, seed: int = 0, tau: float = 0.2) -> QuantizedLinear:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, k, generator=g)
    w[torch.rand(out, k, generator=g) < 0.01] *= 8  # some outliers
    x = torch.randn(4 * k, k, generator=g)
    h = 2 * x.T @ x / x.shape[0]
    cfg = QuantConfig(method="spqr", wbits=wbits, outlier_threshold=tau)
    return quantize_linears([w], h, config=cfg)[0].quantized


def _unpermuted(q: QuantizedLinear) -> torch.Tensor:
    w = q.dequantize()  # (out, in), stored column order
    if q.perm is None:
        return w
    out = torch.empty_like(w)
    out[:, q.perm_indices()] = w
    return out


@pytest.mark.parametrize(("out", "k", "wbits"), [(32, 64, 3), (40, 72, 4), (17, 48, 2)])
def test_tunable_linear_is_the_packed_linear(out: int, k: int, wbits: int) -> None:
    """Untrained: the weight equals `dequantize()` bit for bit and repacking gives the same tensors; with
    changed numbers, the repacked file's `dequantize()` equals the tunable weight bit for bit again."""
    q = _quantized(out, k, wbits=wbits)
    assert q.num_outliers > 0
    t = TunableSpQRLinear(q)
    assert torch.equal(t.weight().detach(), _unpermuted(q))
    for name, tensor in t.to_quantized().tensors().items():
        assert torch.equal(tensor, q.tensors()[name]), name
    with torch.no_grad():
        t.second_u.normal_(0, 0.05)
        t.outlier_u.normal_(0, 0.5)
    tuned = t.to_quantized()
    assert torch.equal(t.weight().detach(), _unpermuted(tuned))
    assert {n: (v.dtype, v.shape) for n, v in tuned.tensors().items()} == {
        n: (v.dtype, v.shape) for n, v in q.tensors().items()
    }
    # only the continuous numbers moved: the codes, stat codes and outlier positions are those of q
    a, b = q.unpack(), tuned.unpack()
    for name in ("codes", "scale_codes", "zero_codes", "outlier_rows", "outlier_cols"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert not torch.equal(a.second, b.second) and not torch.equal(a.outlier_values, b.outlier_values)


def test_gradients_reach_every_continuous_number() -> None:
    q = _quantized(32, 64)
    t = TunableSpQRLinear(q)
    x = torch.randn(8, 64)
    t(x).pow(2).sum().backward()
    assert t.second_u.grad is not None and t.second_u.grad.abs().sum() > 0
    assert t.outlier_u.grad is not None and (t.outlier_u.grad != 0).all()


def test_gradients_match_autograd_through_the_formula() -> None:
    """The hand-written backward of the weight against autograd through the plain formula."""
    q = _quantized(40, 72, wbits=4, seed=3)
    t = TunableSpQRLinear(q)
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        t.second_u.copy_(0.01 * torch.randn(t.second_u.shape, generator=g))
    r = torch.randn(40, 72, generator=g)
    (t.weight() * r).sum().backward()
    got = t.second_u.grad.clone(), t.outlier_u.grad.clone()
    t.zero_grad()
    out = 40
    sec = t.second().repeat_interleave(16, dim=0)[:out]
    scale = sec[..., 0] * (t.scale_codes.float() - sec[..., 1])
    zero = sec[..., 2] * (t.zero_codes.float() - sec[..., 3])
    w = (t.codes.view(out, -1, 16).float() - zero.unsqueeze(-1)) * scale.unsqueeze(-1)
    w = w.view(out, -1)[:, :72].index_put((t.outlier_rows, t.outlier_cols), t.outliers(), accumulate=True)
    w = w[:, t.inv_perm] if t.inv_perm is not None else w
    assert torch.equal(w.detach(), t.weight().detach())
    (w * r).sum().backward()
    # the same sums in another order: equal to fp32 rounding of the largest terms
    for mine, ref in zip(got, (t.second_u.grad, t.outlier_u.grad), strict=True):
        assert torch.isfinite(mine).all()
        torch.testing.assert_close(mine, ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())


def test_finetuning_lowers_its_objective(tiny_hf, tiny_spqr_file) -> None:
    source = open_model(tiny_hf)
    linears = file_linears(tiny_spqr_file(3))
    # two sequences of 64 tokens, trained as four pieces of 32
    tokens = torch.randint(0, source.config.vocab_size, (2, 64), generator=torch.Generator().manual_seed(1))
    torch.manual_seed(0)
    tuned, norms, report = finetune(
        source.config, source.weights, linears, tokens, FinetuneConfig(steps=12, batch=2, seqlen=32, lr=1e-2),
        device=torch.device("cpu"),
    )  # fmt: skip
    assert report.kl_before > 0 and report.kl_after < 0.9 * report.kl_before
    assert set(tuned) == set(linears)
    for name, q in tuned.items():
        assert {n: (v.dtype, v.shape) for n, v in q.tensors().items()} == {
            n: (v.dtype, v.shape) for n, v in linears[name].tensors().items()
        }
    num_norms = 2 * source.config.num_layers + 1
    assert len(norms) == num_norms and all(w.dtype == torch.float16 for w in norms.values())


def test_quantize_with_finetuning_keeps_size_and_decodes_alike(tiny_hf, tiny_spqr_file, tmp_path) -> None:
    """`finetune_steps` changes the numbers, not the bytes: same tensor names, dtypes and shapes (so the same
    tensor bytes and bits; only the header grows by the fine-tuning's report) as the file quantized without
    it; the native CPU path and torch's agree on it as on any file."""
    plain = tiny_spqr_file(3)
    out = tmp_path / "tuned.spqr"
    summary = tq._quantize(
        tiny_hf, out, qcfg=QuantConfig(method="spqr", wbits=3, outlier_threshold=0.2, finetune_steps=6)
    )
    assert summary.finetune is not None and summary.finetune["kl_after"] < summary.finetune["kl_before"]
    h0, h1 = read_header(plain), read_header(out)
    assert h1["quant_config"]["finetune_steps"] == 6
    from safetensors import safe_open

    with safe_open(plain, framework="pt") as a, safe_open(out, framework="pt") as b:
        assert sorted(a.keys()) == sorted(b.keys())
        for n in a.keys():
            assert (a.get_slice(n).get_dtype(), a.get_slice(n).get_shape()) == (
                b.get_slice(n).get_dtype(),
                b.get_slice(n).get_shape(),
            ), n
    assert h0["summary"]["avg_bits"] == h1["summary"]["avg_bits"]
    # the native path (int8 activations and embedding) against the Python decoder on the stored records
    nat = build_decoder(open_model(out), keep_packed=False)
    if nat.native is None:
        pytest.skip("the native CPU kernels are not built here")
    ref = build_decoder(open_model(out), native=False)
    for m in ref.modules():  # the packed reference matmul, not an fp16 decoded copy
        if hasattr(m, "dense_weight"):
            m.dense_weight = None
    tokens = torch.randint(0, nat.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        a, b = ref(tokens, use_cache=False), nat(tokens, use_cache=False)
    assert torch.isfinite(a).all() and torch.isfinite(b).all()
    assert (a - b).abs().max() <= 3e-2 * a.abs().max()
    assert (a.argmax(-1) == b.argmax(-1)).float().mean() >= 0.9


def test_finetune_settings_are_checked() -> None:
    from spqr_run.errors import ConfigError

    with pytest.raises(ConfigError, match="finetune_steps must be >= 0"):
        QuantConfig(finetune_steps=-1)
    with pytest.raises(ConfigError, match="finetune_lr"):
        QuantConfig(finetune_steps=4, finetune_lr=0.0)
    with pytest.raises(ConfigError, match="spqr only"):
        QuantConfig(method="gptq", wbits=4, groupsize=128, finetune_steps=4)


def test_cli_refuses_at_once_when_finetuning_would_not_fit(tiny_hf, tmp_path, capsys, monkeypatch) -> None:
    """Too little memory for the fine-tuning: one line naming --finetune-steps 0, before any work (no
    partial folder), exit 2."""
    import spqr_run.cli.quantize as cli
    import spqr_run.engine.planner as planner

    monkeypatch.setattr(planner, "default_budget", lambda device, reserve=0: 1 << 20)
    out = tmp_path / "o.spqr"
    args = [str(tiny_hf), "-o", str(out), "--nsamples", "2", "--seqlen", "16", "--device", "cpu"]
    with pytest.raises(SystemExit) as e:
        cli.main([*args, "--finetune-steps", "2"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "--finetune-steps 0" in lines[0] and "Traceback" not in err, err
    assert not out.exists() and not (tmp_path / "o.spqr.partial").exists()
