"""The real SmolLM2-135M, quantized by the real quantizer into a `.spqr`, through the CUDA kernels on the CPU shim
against the pure-torch reference (issue 11, "How it is checked", last point).

The model is cut to its first `BLOCKS` blocks (the quantizer and loader take any `num_layers`), calibrated on
windows of ../shared/data/wiki-calib.txt and written by `quantize_model` (3-bit preset: SpQR, 3-bit weights and
statistics, 16x16 groups, act_order, outliers), then loaded by `build_decoder` as the runtime loads it (q/k/v and
gate/up fused). Every quantized linear of the loaded model runs on its real
input (recorded from a forward pass on a wiki-test passage) through the shim's kernels, for one decode step (the
last token's row) and a 20-token prefill, and each output element must lie within

    C_ACC * eps32 * sum_j |w_rj x_j|                    fp32 accumulation in another order (Higham, 3.1)
  + sum_j t_rj |x_j|                                   the kernel's fp16 weight reconstruction: t = the
                                                        rule of kernels/spqr_matmul.cu ("Numerics") per
                                                        weight (`weight_tolerance`)
  + |bias_r| * eps32 + one fp16 ulp of the result       the output rounding

of `spqr_matmul_reference` on the same fp16 input. A dropped or misplaced outlier, a wrong row tile, a wrong
permutation or a wrong group statistic each move an element far past this (the test for the bound's teeth is
`test_bound_catches_a_wrong_weight`). Backends: "shim" (skipped with a reason without g++ or the CUDA headers)
and "cuda" (the `SpQRLinear` module on a GPU; skipped without one; benchmarks/gpu_check.sh runs `-k cuda`).
Everything is skipped with a reason without the real model.
"""

from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path

import pytest
import torch
from torch import Tensor

from spqr_run.calibration import windows_from_text
from spqr_run.loading import build_decoder, open_model
from spqr_run.models.spqr_linear import SpQRLinear
from spqr_run.quant import QuantizedLinear, spqr_matmul_reference
from spqr_run.quantize_model import PRESETS, quantize_model
from tests.conftest import GGUF, WIKI_CALIB, WIKI_TEST, require_data

ROOT = Path(__file__).resolve().parents[1]
BLOCKS = 2  # quantized blocks of the real model (each has every linear shape the model has)
PREFILL = 20  # rows of the short prefill
C_ACC = 32  # multiple of eps32 * sum |w x| allowed for fp32 sums in another order (as tests/test_kernels.py)
EPS32 = 2.0**-24


def _load_shim():
    spec = importlib.util.spec_from_file_location(
        "spqr_cuda_shim_real", ROOT / "kernels" / "testing" / "shim.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


shim_module = _load_shim()
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(scope="module")
def shim():
    try:
        shim_module.compiler()
        shim_module.cuda_include_dir()
    except shim_module.ShimUnavailable as e:
        pytest.skip(f"CUDA shim unavailable: {e}")
    return shim_module.load("plain")


@pytest.fixture(scope="module")
def real_spqr(tmp_path_factory) -> Path:
    """The first BLOCKS blocks of SmolLM2-135M quantized by `quantize_model` with the 3-bit preset (its
    fine-tuning cut to 4 steps: the kernels see fine-tuned statistics and outliers)."""
    require_data()
    source = open_model(GGUF)
    cut = dataclasses.replace(source.config, num_layers=BLOCKS)
    first_blocks = {  # the source's tensors without the blocks from BLOCKS on: the embedding and 3 blocks
        n: source.weights[n]
        for n in source.weights
        if not (n.startswith("layers.") and int(n.split(".")[1]) >= BLOCKS)
    }
    source = dataclasses.replace(source, config=cut, weights=first_blocks)
    out = tmp_path_factory.mktemp("real") / f"smollm2-{BLOCKS}blocks.spqr"
    calib = windows_from_text(WIKI_CALIB, source, nsamples=16, seqlen=128)
    quantize_model(
        source,
        out,
        qcfg=dataclasses.replace(PRESETS["3bit"], finetune_steps=4),  # tuned numbers, an eighth of the cost
        calib_tokens=calib,
        calib_desc="wiki-calib.txt",
        device=torch.device("cpu"),
    )
    return out


@pytest.fixture(scope="module")
def recorded(real_spqr):
    """(name, packed linear, bias, its real input (PREFILL, in) fp16) for every quantized linear of the model
    as the runtime loads it, inputs recorded from a forward pass over a wiki-test passage."""
    source = open_model(real_spqr)
    model = build_decoder(
        source, dtype=torch.float32, native=False
    )  # PyTorch CPU path: modules run, packed kept
    text = WIKI_TEST.read_text(encoding="utf-8")[:2000]
    tokens = torch.tensor([source.tokenizer.encode(text, add_bos=False, special=False)[:PREFILL]])
    assert tokens.shape == (1, PREFILL)
    inputs: dict[str, Tensor] = {}
    handles = []
    for name, mod in model.named_modules():
        if isinstance(mod, SpQRLinear):
            handles.append(
                mod.register_forward_pre_hook(
                    lambda _m, args, _n=name: inputs.__setitem__(_n, args[0].detach())
                )
            )
    with torch.no_grad():
        model(tokens, use_cache=False)
    for h in handles:
        h.remove()
    layers = []
    for name, mod in model.named_modules():
        if isinstance(mod, SpQRLinear):
            x = inputs[name].reshape(PREFILL, mod.in_features).half()
            layers.append((name, mod.quantized(), mod.bias, x))
    return layers


def weight_tolerance(q: QuantizedLinear) -> Tensor:
    """How far (out, in) fp32, stored column order, the kernels' weight may be from the reference's: with u =
    2^-11, u ((|q| + |Z|)(|S| + |s_scale z_scale|) + |S| (2|Z| + |s_zero z_zero|) + |w|) (1 + 8u) + 2^(K-20)
    (S, Z: the group's scale and zero, q: the code, K: the largest weight exponent of the row tile's records;
    kernels/spqr_matmul.cu, "Numerics")."""
    u = q.unpack()
    m = q.meta
    sec = u.second.float()[torch.arange(m.out_features) // m.stat_groupsize]  # (out, groups, 4)
    ss, zs, sz, zz = sec.unbind(-1)
    scale = (ss * (u.scale_codes.float() - zs)).abs()
    zero = (sz * (u.zero_codes.float() - zz)).abs()
    maxc = (1 << m.stat_bits) - 1
    bound = ss.abs() * torch.maximum(zs.abs(), (maxc - zs).abs())  # (out, groups): the kernel's scale bound
    _, e = torch.frexp(bound.amax(1, keepdim=True))  # per row: >= its row tile's records' exponents
    k_max = torch.stack([c.amax() for c in (e + 9).clamp(-3, 24).split(16)]).repeat_interleave(16)
    k_max = k_max[: m.out_features].unsqueeze(1).float()  # (out, 1): the row tile's largest k
    cols = torch.arange(m.in_features) // m.groupsize
    s, z = scale[:, cols], zero[:, cols]
    sszs, szzz = (ss * zs).abs()[:, cols], (sz * zz).abs()[:, cols]
    qc = u.codes.float()
    w = q.dequantize().abs()  # with the outliers: only loosens the |w| term
    t = 2.0**-11 * ((qc + z) * (s + sszs) + s * (2 * z + szzz) + w) * (1 + 2.0**-8)
    return t + torch.exp2(k_max - 20)


def bound(x: Tensor, q: QuantizedLinear, bias: Tensor | None) -> Tensor:
    """Per-element bound (rows, out) of |kernel - reference| before the output's fp16 rounding (docstring)."""
    xa = x.float().abs()
    if q.perm is not None:
        xa = xa[:, q.perm_indices()]  # stored column order
    w = q.dequantize().abs()  # (out, in)
    b = C_ACC * EPS32 * (xa @ w.T) + xa @ weight_tolerance(q).T
    if bias is not None:
        b += bias.float().abs() * EPS32
    return b


def ulp16(v: Tensor) -> Tensor:
    _, e = torch.frexp(v.abs().clamp_min(2.0**-14))
    return torch.ldexp(torch.ones_like(v), (e - 11).to(torch.int32))


def check(y: Tensor, ref: Tensor, b: Tensor, what: str) -> None:
    yf, rf = y.float(), ref.float()
    err = (yf - rf).abs()
    tol = b + ulp16(rf.abs() + b)
    bad = ~(err <= tol)  # NaN fails
    assert not bad.any(), (
        f"{what}: {int(bad.sum())} of {bad.numel()} elements outside the bound; worst ratio "
        f"{(err / tol).nan_to_num(float('inf')).max().item():.3g}"
    )


def kernel_output(backend, x: Tensor, q: QuantizedLinear, bias: Tensor | None) -> Tensor:
    """The kernels for this input as `SpQRLinear.forward` runs them on a GPU: x gathered into the stored
    column order once, then `spqr_matmul_stored` (small-batch kernel up to 16 rows, else dequantize + GEMM).
    `backend`: the shim (its library) or "cuda" (the module itself on the GPU, its kernels required)."""
    b16 = None if bias is None else bias.half()
    if backend != "cuda":
        x_stored = x if q.perm is None else x.index_select(-1, q.perm_indices())
        return backend.spqr_matmul_stored(x_stored, q, b16)
    from spqr_run.ops import prepare_kernels

    layer = SpQRLinear(q, b16).cuda()
    paths = prepare_kernels(layer)
    assert paths and all(p.name != "reference" for p in paths.values()), f"no CUDA kernels would run: {paths}"
    with torch.no_grad():
        return layer(x.cuda()).cpu()


@pytest.fixture(params=["shim", pytest.param("cuda", marks=needs_cuda)])
def backend(request):
    """The shim library, or "cuda"."""
    return request.getfixturevalue("shim") if request.param == "shim" else "cuda"


# ---- tests --------------------------------------------------------------------------------------------------
def test_real_model_file_is_quantized_and_fused_as_loaded(recorded):
    names = [n for n, *_ in recorded]
    per_block = ["attn.qkv_proj", "attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj"]  # q/k/v, gate/up fused
    assert sorted(names) == sorted(f"layers.{i}.{n}" for i in range(BLOCKS) for n in per_block)
    for _, q, _, _ in recorded:
        assert q.meta.method == "spqr" and q.meta.wbits == 3 and q.perm is not None
    assert sum(q.num_outliers for _, q, _, _ in recorded) > 0  # the real quantizer stored outliers


@pytest.mark.parametrize("rows", [1, PREFILL], ids=["decode", "prefill"])
def test_real_linears_through_the_kernels_match_the_reference(backend, recorded, rows):
    for name, q, bias, x in recorded:
        xr = x[-rows:]  # decode: the last token's row
        y = kernel_output(backend, xr, q, bias)
        assert y.shape == (rows, q.meta.out_features) and y.dtype == torch.float16
        ref = spqr_matmul_reference(xr, q, bias=None if bias is None else bias.half())
        check(y, ref, bound(xr, q, bias), f"{name} ({q.meta.out_features}x{q.meta.in_features}), {rows} rows")


def test_bound_catches_a_wrong_weight(backend, recorded):
    """The bound has teeth: one outlier dropped from a real linear moves its output element past it."""
    name, q, bias, x = max(recorded, key=lambda r: r[1].num_outliers)
    u = q.unpack()
    # the outlier whose contribution to the last row's output is largest
    xs = x[-1:].float()[:, q.perm_indices()]
    contrib = (u.outlier_values.float() * xs[0, u.outlier_cols]).abs()
    k = int(contrib.argmax())
    keep = torch.ones(q.num_outliers, dtype=torch.bool)
    keep[k] = False
    dropped = QuantizedLinear.pack(
        dataclasses.replace(
            u,
            outlier_rows=u.outlier_rows[keep],
            outlier_cols=u.outlier_cols[keep],
            outlier_values=u.outlier_values[keep],
        )
    )
    y = kernel_output(backend, x[-1:], dropped, bias)
    ref = spqr_matmul_reference(x[-1:], q, bias=None if bias is None else bias.half())
    with pytest.raises(AssertionError, match="outside the bound"):
        check(y, ref, bound(x[-1:], q, bias), name)
