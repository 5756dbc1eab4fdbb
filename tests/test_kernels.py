"""CUDA kernels (kernels/spqr_matmul.cu via spqr_run.ops) against `spqr_matmul_reference`.

GPU tests skip without CUDA; the op registration (fake/meta implementations, opcheck) and the fallback to the
reference when the extension cannot be built are tested on the CPU too.
"""

from __future__ import annotations

import importlib
import math

import pytest
import torch

from spqr_run.ops import ext, spqr_matmul
from spqr_run.quant import LinearMeta, QuantizedLinear, UnpackedLinear, spqr_matmul_reference

# the module itself: the package re-exports the function under the same name
ops_module = importlib.import_module("spqr_run.ops.spqr_matmul")
CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU (the kernels have no CPU build)")
REL_TOL = 2e-3  # max |y - ref| / max |ref|: fp32 accumulation in a different order, one fp16 rounding


def random_layer(
    out_features: int,
    in_features: int,
    *,
    wbits: int = 3,
    stat_bits: int = 3,
    outlier_fraction: float = 0.0,
    permute: bool = True,
    seed: int = 0,
    device: str = "cpu",
) -> QuantizedLinear:
    """A packed SpQR layer with random codes, statistics, outliers and permutation (fast: no quantizer run)."""
    g = torch.Generator(device=device).manual_seed(seed)
    meta = LinearMeta(
        method="spqr",
        wbits=wbits,
        groupsize=16,
        stat_bits=stat_bits,
        stat_groupsize=16,
        out_features=out_features,
        in_features=in_features,
    )
    groups, row_groups = math.ceil(in_features / 16), math.ceil(out_features / 16)

    def randint(high: int, *shape: int) -> torch.Tensor:
        return torch.randint(0, high, shape, generator=g, device=device)

    def uniform(lo: float, hi: float, *shape: int) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand(shape, generator=g, device=device)

    # scale = s_scale * (code - z_scale) > 0 with z_scale < 0; zero = s_zero * (code - z_zero) around mid-grid.
    maxs = (1 << stat_bits) - 1
    second = torch.stack(
        [
            uniform(0.002, 0.01, row_groups, groups),
            uniform(-2.0, -0.5, row_groups, groups),
            uniform(0.5, 1.0, row_groups, groups) * ((1 << wbits) - 1) / maxs,
            uniform(-0.5, 0.5, row_groups, groups),
        ],
        dim=-1,
    ).half()  # (row_groups, groups, 4)
    nnz = int(outlier_fraction * out_features * in_features)
    flat = torch.randperm(out_features * in_features, generator=g, device=device)[:nnz]
    unpacked = UnpackedLinear(
        meta=meta,
        codes=randint(1 << wbits, out_features, in_features),
        perm=torch.randperm(in_features, generator=g, device=device) if permute else None,
        scale_codes=randint(1 << stat_bits, out_features, groups),
        zero_codes=randint(1 << stat_bits, out_features, groups),
        second=second,
        outlier_rows=flat // in_features,
        outlier_cols=flat % in_features,
        outlier_values=(0.05 * torch.randn(nnz, generator=g, device=device)).half(),
    )
    return QuantizedLinear.pack(unpacked)


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y.float() - ref.float()).abs().max() / ref.float().abs().max().clamp_min(1e-30))


def poison_allocator(numel: int, device: torch.device) -> None:
    """Leave NaNs in the caching allocator's free blocks, so an output the kernel fails to write shows up."""
    junk = torch.full((numel,), float("nan"), dtype=torch.float16, device=device)
    del junk


def run_checked(x: torch.Tensor, q: QuantizedLinear, bias: torch.Tensor | None = None) -> torch.Tensor:
    """spqr_matmul on poisoned memory, twice: the result must be finite and bit-identical across runs."""
    out_numel = x.numel() // q.meta.in_features * q.meta.out_features
    poison_allocator(max(out_numel, q.num_params), x.device)
    y = spqr_matmul(x, q, bias)
    poison_allocator(max(out_numel, q.num_params), x.device)
    y2 = spqr_matmul(x, q, bias)
    assert torch.isfinite(y).all(), "output has NaN/inf: some element was not written"
    assert torch.equal(y, y2), "repeated runs differ"
    return y


# ---- CUDA: every path against the reference ------------------------------------------------------------
LLAMA_7B = [(4096, 4096), (11008, 4096), (4096, 11008)]
FALCON = [(4672, 4544), (18176, 4544), (4544, 18176)]
ODD = [(100, 37), (4100, 4095), (64, 40000), (17, 16), (16, 1)]
ROWS = [1, 2, 5, 16, 17, 64]  # matvec, small batch (capacity 4 and 16), prefill


@needs_cuda
@pytest.mark.parametrize("wbits", [2, 3, 4])
@pytest.mark.parametrize("shape", ODD)
@pytest.mark.parametrize("outliers", [0.0, 0.03])
@pytest.mark.parametrize("permute", [False, True])
@pytest.mark.parametrize("rows", ROWS)
def test_kernels_match_reference_on_odd_shapes(wbits, shape, outliers, permute, rows):
    q = random_layer(*shape, wbits=wbits, outlier_fraction=outliers, permute=permute, device="cuda")
    x = torch.randn(rows, shape[1], device="cuda").half()
    ref = spqr_matmul_reference(x, q)
    assert rel_err(run_checked(x, q), ref) <= REL_TOL


@needs_cuda
@pytest.mark.parametrize("shape", LLAMA_7B + FALCON)
@pytest.mark.parametrize("wbits", [2, 3, 4])
@pytest.mark.parametrize("rows", [1, 4, 16, 100])
def test_kernels_match_reference_on_model_shapes(shape, wbits, rows):
    q = random_layer(*shape, wbits=wbits, outlier_fraction=0.03, permute=True, seed=wbits, device="cuda")
    x = torch.randn(1, rows, shape[1], device="cuda").half()  # (batch, tokens, in): leading dims kept
    y = run_checked(x, q)
    assert y.shape == (1, rows, shape[0])
    assert rel_err(y, spqr_matmul_reference(x, q)) <= REL_TOL


@needs_cuda
@pytest.mark.parametrize("stat_bits", [2, 4])
@pytest.mark.parametrize("rows", [1, 3, 32])
def test_other_stat_bits(stat_bits, rows):
    q = random_layer(300, 520, stat_bits=stat_bits, outlier_fraction=0.01, device="cuda")
    x = torch.randn(rows, 520, device="cuda").half()
    assert rel_err(run_checked(x, q), spqr_matmul_reference(x, q)) <= REL_TOL


@needs_cuda
@pytest.mark.parametrize("bias_dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("rows", [1, 8, 20])
def test_bias(bias_dtype, rows):
    q = random_layer(200, 333, outlier_fraction=0.02, device="cuda")
    x = torch.randn(rows, 333, device="cuda").half()
    bias = torch.randn(200, device="cuda").to(bias_dtype)
    assert rel_err(run_checked(x, q, bias), spqr_matmul_reference(x, q, bias=bias)) <= REL_TOL


@needs_cuda
@pytest.mark.parametrize("wbits", [2, 3, 4])
@pytest.mark.parametrize("shape", [(100, 37), (4100, 4095), (64, 40000)])
def test_dequantize_is_bit_exact(wbits, shape):
    q = random_layer(*shape, wbits=wbits, outlier_fraction=0.03, device="cuda")
    m = q.meta
    poison_allocator(q.num_params, torch.device("cuda"))
    w = torch.ops.spqr.dequantize(
        q.codes, q.stats, q.second, q.outlier_values, q.outlier_cols, q.outlier_row_ptr,
        m.wbits, m.stat_bits, m.out_features, m.in_features,
    )  # fmt: skip
    assert torch.equal(w, q.dequantize().half())


@needs_cuda
def test_int16_perm_above_32767():
    """The stored perm is int16 holding unsigned indices; columns past 32767 must not go negative."""
    q = random_layer(48, 40000, outlier_fraction=0.03, device="cuda")
    q16 = QuantizedLinear(**{**vars(q), "perm": q.perm.to(torch.int16)})
    for rows in (1, 3, 40):
        x = torch.randn(rows, 40000, device="cuda").half()
        assert rel_err(run_checked(x, q16), spqr_matmul_reference(x, q)) <= REL_TOL


@needs_cuda
def test_cuda_graph_capture():
    q = random_layer(256, 512, outlier_fraction=0.02, device="cuda")
    x = torch.randn(1, 512, device="cuda").half()
    expected = spqr_matmul(x, q)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = spqr_matmul(x, q)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(y, expected)


# ---- CPU: registration, dispatch and fallback -----------------------------------------------------------
def _op_args(q: QuantizedLinear, x: torch.Tensor) -> tuple:
    m = q.meta
    perm = q.perm
    return (x, q.codes, q.stats, q.second, q.outlier_values, q.outlier_cols, q.outlier_row_ptr, perm, None,
            m.wbits, m.stat_bits, m.out_features, m.in_features)  # fmt: skip


def test_fake_ops_give_shapes_on_meta_tensors():
    q = random_layer(40, 70, outlier_fraction=0.02)
    args = _op_args(q, torch.randn(3, 70).half())
    meta_args = tuple(a.to("meta") if isinstance(a, torch.Tensor) else a for a in args)
    y = torch.ops.spqr.matmul_rows(*meta_args)
    assert y.shape == (3, 40) and y.dtype == torch.float16 and y.device.type == "meta"
    y1 = torch.ops.spqr.matmul_rows(meta_args[0][:1], *meta_args[1:])
    assert y1.shape == (1, 40)
    w = torch.ops.spqr.dequantize(*meta_args[1:7], *meta_args[9:])
    assert w.shape == (40, 70) and w.dtype == torch.float16


@pytest.mark.parametrize("rows", [1, 3])
def test_opcheck(rows):
    q = random_layer(32, 48, outlier_fraction=0.02)
    x = torch.randn(rows, 48).half()
    torch.library.opcheck(torch.ops.spqr.matmul_rows.default, _op_args(q, x))
    args = _op_args(q, x)
    torch.library.opcheck(torch.ops.spqr.dequantize.default, (*args[1:7], *args[9:]))


def test_cpu_dispatch_is_the_reference():
    q = random_layer(33, 50, outlier_fraction=0.03)
    x = torch.randn(2, 5, 50)
    assert torch.equal(spqr_matmul(x, q), spqr_matmul_reference(x, q))


def test_fallback_when_the_extension_cannot_build(monkeypatch):
    def broken_build():
        raise RuntimeError("nvcc fatal: no such file\nmore lines")

    monkeypatch.setattr(ext, "missing_toolchain", lambda: None)
    monkeypatch.setattr(ext, "_build", broken_build)
    monkeypatch.setattr(ops_module, "kernels_support", lambda x, q: True)  # pretend this input wants kernels
    ext.load_extension.cache_clear()
    try:
        q = random_layer(20, 40, outlier_fraction=0.02)
        x = torch.randn(1, 40).half()
        with pytest.warns(RuntimeWarning, match="reference path") as record:
            y = spqr_matmul(x, q)
        assert len(record) == 1 and "\n" not in str(record[0].message)
        assert torch.equal(y, spqr_matmul_reference(x, q))
    finally:
        ext.load_extension.cache_clear()
