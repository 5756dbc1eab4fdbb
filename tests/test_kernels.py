"""CUDA kernels (kernels/spqr_matmul.cu via spqr_run.ops) against `spqr_matmul_reference`, on a GPU and on the
CPU through the CUDA execution shim (kernels/testing/: the same sources compiled by g++, every CUDA thread a
fiber, barriers and shuffles as switch points).

Backends: "cuda" (skips without a GPU) and "shim" (skips without g++ or the CUDA toolkit's headers). The shim
runs the case list of its build, $SPQR_SHIM_BUILD (.ci/kernel-shim runs all three): "plain" (the default, the
main list: every feature of the GPU list, with the GPU's large layers cut to a few row tiles, since a kernel
block only ever sees one row tile), "asan" (AddressSanitizer + UBSan, a smaller list) and "tsan"
(ThreadSanitizer: shapes whose x takes several shared-memory segments). Each shim case runs twice with two
different thread orders (forward/reverse/seeded random) and must give bit-identical results.

Accuracy: every output element is bounded on its own by `C_ACC * eps32 * sum_j |w_rj x_j|` plus one fp16 ulp
of the result (the standard bound of an fp32 dot product in another summation order; Higham, "Accuracy and
Stability of Numerical Algorithms", 2nd ed., section 3.1), plus the fp16 rounding of the weights on the
prefill path. Outliers are several times their group's range, so a dropped or misplaced one breaks the bound.
NaN anywhere is a failure. The op registration (fake/meta implementations, opcheck) and the fallback to the
reference are tested on the CPU too.
"""

from __future__ import annotations

import importlib
import importlib.util
import itertools
import math
import os
import zlib
from pathlib import Path

import pytest
import torch

from spqr_run.ops import ext, spqr_matmul
from spqr_run.quant import LinearMeta, QuantizedLinear, UnpackedLinear, spqr_matmul_reference

# the module itself: the package re-exports the function under the same name
ops_module = importlib.import_module("spqr_run.ops.spqr_matmul")
ROOT = Path(__file__).resolve().parents[1]
CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")

EPS32 = 2.0**-24  # fp32 unit roundoff
EPS16 = 2.0**-11  # fp16 unit roundoff (the prefill path rounds each weight to fp16 once)
C_ACC = 32  # multiple of eps32 * sum|w x| allowed for fp32 sums in another order (shim worst: 0.05)


# ---- the shim -----------------------------------------------------------------------------------------------
def load_shim_module():
    """kernels/testing/shim.py as a module (kernels/ is not a Python package)."""
    spec = importlib.util.spec_from_file_location("spqr_cuda_shim", ROOT / "kernels" / "testing" / "shim.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


shim_module = load_shim_module()
SHIM_BUILD = os.environ.get("SPQR_SHIM_BUILD") or "plain"


def _shim_unavailable() -> str | None:
    try:
        shim_module.compiler()
        shim_module.cuda_include_dir()
        if SHIM_BUILD != "plain" and not shim_module._preloaded(SHIM_BUILD):
            return f"the {SHIM_BUILD} shim build needs its sanitizer runtime preloaded (.ci/kernel-shim does that)"
    except shim_module.ShimUnavailable as e:
        return str(e)
    return None


SHIM_MISSING = _shim_unavailable()
needs_shim = pytest.mark.skipif(SHIM_MISSING is not None, reason=f"CUDA shim unavailable: {SHIM_MISSING}")
ORDERS = [("forward", 0), ("reverse", 0), ("random", 1), ("random", 2)]


def shim():
    return shim_module.load(SHIM_BUILD)


def shim_orders(*case) -> tuple[tuple[str, int], tuple[str, int]]:
    """Two different thread orders for a case, chosen by its parameters (so every order gets exercised)."""
    k = zlib.crc32(repr(case).encode())
    first = ORDERS[k % len(ORDERS)]
    second = ORDERS[(k // len(ORDERS) + 1 + k % len(ORDERS)) % len(ORDERS)]
    return first, second if second != first else ORDERS[(k + 1) % len(ORDERS)]


def backend_params(gpu_cases, shim_cases) -> list:
    """pytest params ("cuda", *case) for the GPU list and ("shim", *case) for the shim's."""

    def ident(backend, case):
        return "-".join([backend, *(str(v) for v in case)])

    return [pytest.param("cuda", *c, marks=needs_cuda, id=ident("cuda", c)) for c in gpu_cases] + [
        pytest.param("shim", *c, marks=needs_shim, id=ident("shim", c)) for c in shim_cases
    ]


# ---- layers, bounds and checks ------------------------------------------------------------------------------
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
    """A packed SpQR layer with random codes, statistics, outliers and permutation (fast: no quantizer run).

    Outliers are realistic: 2 to 6 times the range of their group's grid (scale * (2^wbits - 1)), either sign,
    so one dropped or misplaced changes its output element by far more than rounding."""
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
    scale_codes = randint(1 << stat_bits, out_features, groups)
    nnz = int(outlier_fraction * out_features * in_features)
    flat = torch.randperm(out_features * in_features, generator=g, device=device)[:nnz]
    rows, cols = flat // in_features, flat % in_features
    sec = second.float()[rows // 16, cols // 16]  # (nnz, 4)
    group_range = sec[:, 0] * (scale_codes[rows, cols // 16].float() - sec[:, 1]) * ((1 << wbits) - 1)
    sign = torch.randint(0, 2, (nnz,), generator=g, device=device) * 2 - 1
    unpacked = UnpackedLinear(
        meta=meta,
        codes=randint(1 << wbits, out_features, in_features),
        perm=torch.randperm(in_features, generator=g, device=device) if permute else None,
        scale_codes=scale_codes,
        zero_codes=randint(1 << stat_bits, out_features, groups),
        second=second,
        outlier_rows=rows,
        outlier_cols=cols,
        outlier_values=(sign * uniform(2.0, 6.0, nnz) * group_range).half(),
    )
    return QuantizedLinear.pack(unpacked)


def error_bound(
    x: torch.Tensor, q: QuantizedLinear, bias: torch.Tensor | None, fp16_weights: bool
) -> torch.Tensor:
    """Per-element bound (tokens, out) of |y - reference| before the final fp16 rounding:
    C_ACC * eps32 * sum_j |w_rj x_j| (+ eps16 * the same sum when the weights are rounded to fp16 first)."""
    m = q.meta
    xa = x.reshape(-1, m.in_features).float().abs()  # (tokens, in)
    if q.perm is not None:
        xa = xa[:, q.perm_indices()]
    s = torch.empty(xa.shape[0], m.out_features, device=x.device)  # (tokens, out) sum_j |w_rj x_j|
    step = max(16, ((1 << 22) // m.in_features) // 16 * 16)
    for r0 in range(0, m.out_features, step):
        r1 = min(r0 + step, m.out_features)
        s[:, r0:r1] = xa @ q.dequantize(slice(r0, r1)).abs().T
    if bias is not None:
        s += bias.float().abs()
    return (C_ACC * EPS32 + (EPS16 if fp16_weights else 0.0)) * s


def ulp16(v: torch.Tensor) -> torch.Tensor:
    """The fp16 ulp at |v| (subnormal spacing below 2^-14)."""
    _, e = torch.frexp(v.abs().clamp_min(2.0**-14))  # v = m 2^e, m in [0.5, 1)
    return torch.ldexp(torch.ones_like(v), (e - 11).to(torch.int32))


def assert_within_bound(y: torch.Tensor, ref: torch.Tensor, bound: torch.Tensor) -> None:
    """Every element |y - ref| <= bound + one fp16 ulp; NaN or inf anywhere fails (comparisons with NaN are
    False, so the test is written as `not (err <= tol)`)."""
    yf, rf = y.float().reshape(bound.shape), ref.float().reshape(bound.shape)
    err = (yf - rf).abs()
    tol = bound + ulp16(rf.abs() + bound)
    bad = ~(err <= tol)
    if bad.any():
        idx = bad.nonzero()[0].tolist()
        raise AssertionError(
            f"{int(bad.sum())} of {bad.numel()} elements outside the bound (NaN counts); first at {idx}: "
            f"y={yf[tuple(idx)].item()!r} reference={rf[tuple(idx)].item()!r} bound={tol[tuple(idx)].item():.3g}"
        )


def run_cuda(x: torch.Tensor, q: QuantizedLinear, bias: torch.Tensor | None = None) -> torch.Tensor:
    """spqr_matmul on the GPU, twice, each time into an output block pre-filled with NaN: the result must be
    fully written (finite) and bit-identical across runs."""
    m = q.meta
    rows = x.numel() // m.in_features
    outs = []
    for _ in range(2):
        # The first allocation of the call is its output for <= 16 rows, the dequantized weight above: with
        # the allocator's cache emptied, it lands in the block just freed, which holds NaNs.
        numel = rows * m.out_features if rows <= 16 else m.out_features * m.in_features
        torch.cuda.empty_cache()
        junk = torch.full((numel,), float("nan"), dtype=torch.float16, device=x.device)
        ptr = junk.data_ptr()
        del junk
        if rows <= 16:
            y = spqr_matmul(x, q, bias)
            assert y.data_ptr() == ptr, "the output did not land in the poisoned block"
        else:
            w = torch.ops.spqr.dequantize(
                q.codes, q.stats, q.second, q.outlier_values, q.outlier_cols, q.outlier_row_ptr,
                m.wbits, m.stat_bits, m.out_features, m.in_features,
            )  # fmt: skip
            assert w.data_ptr() == ptr, "the dequantized weight did not land in the poisoned block"
            assert torch.isfinite(w).all(), "dequantize left NaN: some weight was not written"
            del w
            y = spqr_matmul(x, q, bias)
        outs.append(y)
    assert torch.isfinite(outs[0]).all(), "output has NaN/inf: some element was not written"
    assert torch.equal(outs[0], outs[1]), "repeated runs differ"
    return outs[0]


def run_shim(x: torch.Tensor, q: QuantizedLinear, bias: torch.Tensor | None, case: tuple) -> torch.Tensor:
    """The kernels on the CPU shim (outputs pre-filled with NaN by the shim), under two thread orders: the
    results must be bit-identical (no order dependence: the kernels sum in a fixed order)."""
    s = shim()
    outs = []
    for order, seed in shim_orders(*case):
        s.configure(order, seed)
        outs.append(s.spqr_matmul(x, q, bias))
    s.configure("forward")
    assert torch.equal(outs[0], outs[1]) or (outs[0].isnan().any() or outs[1].isnan().any()), (
        f"thread orders {shim_orders(*case)} give different results"
    )
    return outs[0]


def check_case(backend: str, shape: tuple[int, int], rows: int | tuple[int, ...], case: tuple, *, bias_dtype=None,
               seed_bias: int = 0, **layer) -> None:  # fmt: skip
    """Builds the layer and input on the backend's device, runs it, and bounds it element by element."""
    device = "cuda" if backend == "cuda" else "cpu"
    torch.manual_seed(zlib.crc32(repr(case).encode()))  # x: reproducible per case
    q = random_layer(*shape, device=device, **layer)
    lead = rows if isinstance(rows, tuple) else (rows,)
    x = torch.randn(*lead, shape[1], device=device).half()
    bias = None
    if bias_dtype is not None:
        bias = torch.randn(shape[0], generator=torch.Generator().manual_seed(seed_bias)).to(
            device, bias_dtype
        )
    y = run_cuda(x, q, bias) if backend == "cuda" else run_shim(x, q, bias, case)
    assert y.shape == (*lead, shape[0])
    ref = spqr_matmul_reference(x, q, bias=bias)
    tokens = math.prod(lead)
    assert_within_bound(y, ref, error_bound(x, q, bias, fp16_weights=tokens > 16))


# ---- case lists ---------------------------------------------------------------------------------------------
LLAMA_7B = [(4096, 4096), (11008, 4096), (4096, 11008)]
FALCON = [(4672, 4544), (18176, 4544), (4544, 18176)]
ODD = [(100, 37), (4100, 4095), (64, 40000), (17, 16), (16, 1)]
ROWS = [1, 2, 5, 16, 17, 64]  # matvec, small batch (capacity 4 and 16), prefill
# The shim runs the same kernels one CPU thread at a time: a layer's row tiles are independent blocks, so its
# lists keep every column count (what decides segments, tails and index widths) with a few row tiles.
ODD_SHIM = [(100, 37), (36, 4095), (20, 40000), (17, 16), (16, 1)]
MODEL_COLS_SHIM = [(36, 4096), (20, 11008), (36, 4544), (20, 18176)]

if SHIM_BUILD == "asan":
    ODD_CASES = list(itertools.product([2, 3, 4], [(100, 37), (36, 4095), (17, 16), (16, 1)], [0.03], [True],
                                       [1, 5, 16, 17]))  # fmt: skip
    MODEL_CASES = [((20, 11008), 3, 4), ((20, 4544), 4, 1)]
    STAT_CASES = [(2, 1), (4, 3)]
    BIAS_CASES = [(torch.float16, 1), (torch.float32, 8)]
    DEQUANT_CASES = [(3, (100, 37)), (4, (36, 4095))]
elif SHIM_BUILD == "tsan":
    # x in shared memory a segment at a time: matvec 8192 columns, small batch 4096 (<= 4 rows) or 1024.
    ODD_CASES = [(w, s, 0.03, True, r) for w, s, r in [(3, (16, 40000), 1), (2, (16, 40000), 3), (4, (16, 40000), 16),
                 (3, (20, 9000), 1), (3, (20, 9000), 4), (3, (20, 2500), 5), (4, (20, 2500), 16)]]  # fmt: skip
    MODEL_CASES = []
    STAT_CASES = []
    BIAS_CASES = []
    DEQUANT_CASES = [(3, (16, 40000))]
else:
    ODD_CASES = list(itertools.product([2, 3, 4], ODD_SHIM, [0.0, 0.03], [False, True], ROWS))
    MODEL_CASES = [(s, w, r) for s in MODEL_COLS_SHIM for w in [2, 3, 4] for r in [1, 4, 16, 100]]
    STAT_CASES = list(itertools.product([2, 4], [1, 3, 32]))
    BIAS_CASES = list(itertools.product([torch.float16, torch.float32], [1, 8, 20]))
    DEQUANT_CASES = list(itertools.product([2, 3, 4], [(100, 37), (36, 4095), (20, 40000)]))


# ---- every path against the reference -----------------------------------------------------------------------
@pytest.mark.parametrize(
    "backend,wbits,shape,outliers,permute,rows",
    backend_params(itertools.product([2, 3, 4], ODD, [0.0, 0.03], [False, True], ROWS), ODD_CASES),
)
def test_kernels_match_reference_on_odd_shapes(backend, wbits, shape, outliers, permute, rows):
    case = (wbits, shape, outliers, permute, rows)
    check_case(backend, shape, rows, case, wbits=wbits, outlier_fraction=outliers, permute=permute)


@pytest.mark.parametrize(
    "backend,shape,wbits,rows",
    backend_params(itertools.product(LLAMA_7B + FALCON, [2, 3, 4], [1, 4, 16, 100]), MODEL_CASES),
)
def test_kernels_match_reference_on_model_shapes(backend, shape, wbits, rows):
    # (batch, tokens, in): leading dims kept
    check_case(
        backend, shape, (1, rows), (shape, wbits, rows), wbits=wbits, outlier_fraction=0.03, seed=wbits
    )


@pytest.mark.parametrize(
    "backend,stat_bits,rows", backend_params(itertools.product([2, 4], [1, 3, 32]), STAT_CASES)
)
def test_other_stat_bits(backend, stat_bits, rows):
    check_case(backend, (300, 520), rows, (stat_bits, rows), stat_bits=stat_bits, outlier_fraction=0.01)


@pytest.mark.parametrize(
    "backend,bias_dtype,rows",
    backend_params(itertools.product([torch.float16, torch.float32], [1, 8, 20]), BIAS_CASES),
)
def test_bias(backend, bias_dtype, rows):
    check_case(backend, (200, 333), rows, (bias_dtype, rows), bias_dtype=bias_dtype, outlier_fraction=0.02)


@pytest.mark.parametrize(
    "backend,wbits,shape",
    backend_params(itertools.product([2, 3, 4], [(100, 37), (4100, 4095), (64, 40000)]), DEQUANT_CASES),
)
def test_dequantize_is_bit_exact(backend, wbits, shape):
    device = "cuda" if backend == "cuda" else "cpu"
    q = random_layer(*shape, wbits=wbits, outlier_fraction=0.03, device=device)
    m = q.meta
    if backend == "cuda":
        torch.cuda.empty_cache()
        junk = torch.full((m.out_features * m.in_features,), float("nan"), dtype=torch.float16, device=device)
        ptr = junk.data_ptr()
        del junk
        w = torch.ops.spqr.dequantize(
            q.codes, q.stats, q.second, q.outlier_values, q.outlier_cols, q.outlier_row_ptr,
            m.wbits, m.stat_bits, m.out_features, m.in_features,
        )  # fmt: skip
        assert w.data_ptr() == ptr, "the output did not land in the poisoned block"
    else:
        w = shim().dequantize(q)  # written into a NaN-filled buffer
    assert torch.equal(w, q.dequantize().half())  # NaN != NaN: an unwritten element fails


@pytest.mark.parametrize(
    "backend", [pytest.param("cuda", marks=needs_cuda), pytest.param("shim", marks=needs_shim)]
)
def test_int16_perm_above_32767(backend):
    """The stored perm is int16 holding unsigned indices; columns past 32767 must not go negative."""
    if backend == "shim" and SHIM_BUILD != "plain":
        pytest.skip("covered by the plain build")
    device = "cuda" if backend == "cuda" else "cpu"
    q = random_layer(48, 40000, outlier_fraction=0.03, device=device)
    q16 = QuantizedLinear(**{**vars(q), "perm": q.perm.to(torch.int16)})
    for rows in (1, 3, 40):
        x = torch.randn(rows, 40000, device=device).half()
        y = run_cuda(x, q16) if backend == "cuda" else run_shim(x, q16, None, (rows,))
        assert_within_bound(y, spqr_matmul_reference(x, q), error_bound(x, q, None, fp16_weights=rows > 16))


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


# ---- the checks themselves ----------------------------------------------------------------------------------
def test_bound_catches_a_dropped_outlier():
    """The per-element bound is tight enough that leaving out one outlier fails it (the old global relative
    tolerance let this through)."""
    q = random_layer(64, 4096, outlier_fraction=0.001, seed=1)
    x = torch.randn(1, 4096).half()
    ref = spqr_matmul_reference(x, q)
    values = q.outlier_values.clone()
    values[0] = 0
    dropped = spqr_matmul_reference(x, QuantizedLinear(**{**vars(q), "outlier_values": values}))
    with pytest.raises(AssertionError, match="outside the bound"):
        assert_within_bound(dropped, ref, error_bound(x, q, None, fp16_weights=False))
    assert_within_bound(ref, ref, error_bound(x, q, None, fp16_weights=False))


def test_bound_fails_on_nan():
    ref = torch.ones(2, 3).half()
    y = ref.clone()
    y[1, 2] = float("nan")
    with pytest.raises(AssertionError, match="1 of 6"):
        assert_within_bound(y, ref, torch.full((2, 3), 1e3))


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
