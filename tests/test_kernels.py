"""The v2 CUDA kernels (kernels/spqr_matmul.cu via spqr_run.ops) against pure-torch references, on a GPU and on the
CPU through the CUDA execution shim (kernels/testing/: the same sources compiled by g++, every CUDA thread a
fiber, barriers, shuffles and mma/ldmatrix as switch points, cp.async copied at the wait).

Backends: "cuda" (skips without a GPU) and "shim" (skips without g++ or the CUDA toolkit's headers). The shim
runs the case list of its build, $SPQR_SHIM_BUILD (.ci/kernel-shim runs all three): "plain" (the main list),
"asan" (AddressSanitizer + UBSan, a smaller list) and "tsan" (ThreadSanitizer, a few split-K shapes). Each shim
case runs twice with two different thread orders and must give bit-identical results; the shim also fails a
call whose split-K ticket counters are not reset to zero.

What is compared:
- The kernels compute the weights in fp16 (kernels/spqr_matmul.cu, "Dequantization" and "Numerics"): the stats in
  fp16x2, the codes as exact subnormals, one HFMA2 a pair, the weight scaled by 2^-k (the weight exponent of a
  record or a warp's k-range). `kernel_weight16` emulates every one of those fp16 operations (each an exact
  float64 result rounded once), with the record's k; `test_kernel_numerics_follow_the_spec_rule` checks it
  against the fp32 definition (`true_weight`, written here from the unpacked codes) within the file's rule.
- Small batch (1..16 rows): y against x_stored @ (w16 + outlier deltas)^T in float64, each element within
  C_ACC * eps32 * sum_j |w_rj x_j| + sum_j |x_j| range_tolerance_rj (k per k-range, not per record) plus one
  fp16 ulp (an fp32 dot product in another order; Higham, "Accuracy
  and Stability of Numerical Algorithms", 2nd ed., section 3.1). Tight enough that one dropped outlier fails.
- Prefill (17+ rows): the dequantized W is bit-identical to fp16(w16 + delta); y is bounded like above.
NaN anywhere is a failure (bounds are written as `not (err <= tol)`).
"""

from __future__ import annotations

import importlib
import importlib.util
import itertools
import math
import os
import sys
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from spqr_run.gpu.modules import KernelsUnavailable
from spqr_run.ops import spqr_matmul, spqr_matmul_stored
from spqr_run.ops.spqr_matmul import reference_weight
from spqr_run.quant import LinearMeta, spqr_matmul_reference
from spqr_run.quant import tile_layout as tl
from spqr_run.quant.grid import dequantize_codes
from spqr_run.quant.packing import decode_columns, encode_columns

# the module itself: the package re-exports the function under the same name
ops_module = importlib.import_module("spqr_run.ops.spqr_matmul")
ROOT = Path(__file__).resolve().parents[1]
CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")

EPS32 = 2.0**-24  # fp32 unit roundoff
C_ACC = 32  # multiple of eps32 * sum|w x| allowed for fp32 sums in another order


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


# ---- layers -------------------------------------------------------------------------------------------------
@dataclass
class Layer:
    """A v2 SpQR linear as the kernels read it (the attributes of `QuantizedLinear` for method spqr), plus the
    unpacked numbers it was packed from (for the references)."""

    meta: LinearMeta
    tiles: torch.Tensor  # int32 (RT, KB, R)
    outliers: torch.Tensor  # int32 (nnz,)
    outlier_row_ptr: torch.Tensor  # int32 (RT*16 + 1,)
    perm: torch.Tensor | None  # int16 (in,) unsigned bit patterns
    codes: torch.Tensor  # (out, in) stored order
    scale_codes: torch.Tensor  # (out, groups)
    zero_codes: torch.Tensor
    second: torch.Tensor  # (RT, groups, 4) fp16
    o_rows: torch.Tensor  # (nnz,) int64, sorted by row then column
    o_cols: torch.Tensor
    o_vals: torch.Tensor  # fp16

    def perm_indices(self) -> torch.Tensor | None:
        return None if self.perm is None else decode_columns(self.perm)

    def dequantize(self, rows: slice | None = None, *, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """fp32 reference rows (stored column order), as `QuantizedLinear.dequantize`."""
        m = self.meta
        r0, r1, _ = (rows or slice(None)).indices(m.out_features)
        t0, t1 = r0 // 16, -(-r1 // 16)
        w = reference_weight(self.tiles, self.outliers, self.outlier_row_ptr, m.wbits, m.stat_bits,
                             m.out_features, m.in_features, row_tiles=slice(t0, t1))  # fmt: skip
        return w[r0 - 16 * t0 : r1 - 16 * t0].to(dtype)


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
    stat_scale: float = 1.0,
) -> Layer:
    """A packed v2 layer with random codes, statistics, outliers and permutation (no quantizer run).

    Outliers are realistic: 2 to 6 times the range of their group's grid (scale * (2^wbits - 1)), either sign,
    so one dropped or misplaced changes its output element by far more than rounding. `stat_scale` multiplies
    every s_scale (so every scale and weight): the kernels' weight exponent k follows it."""
    g = torch.Generator().manual_seed(seed)
    groups, rt = math.ceil(in_features / 16), math.ceil(out_features / 16)

    def randint(high: int, *shape: int) -> torch.Tensor:
        return torch.randint(0, high, shape, generator=g)

    def uniform(lo: float, hi: float, *shape: int) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand(shape, generator=g)

    maxs = (1 << stat_bits) - 1
    second = torch.stack(
        [
            uniform(0.002, 0.01, rt, groups) * stat_scale,
            uniform(-2.0, -0.5, rt, groups),
            uniform(0.5, 1.0, rt, groups) * ((1 << wbits) - 1) / maxs,
            uniform(-0.5, 0.5, rt, groups),
        ],
        dim=-1,
    ).half()  # (RT, groups, 4)
    codes = randint(1 << wbits, out_features, in_features)
    scale_codes = randint(1 << stat_bits, out_features, groups)
    zero_codes = randint(1 << stat_bits, out_features, groups)
    nnz = int(outlier_fraction * out_features * in_features)
    flat = torch.randperm(out_features * in_features, generator=g)[:nnz].sort().values
    rows, cols = flat // in_features, flat % in_features
    sec = second.float()[rows // 16, cols // 16]  # (nnz, 4)
    group_range = sec[:, 0] * (scale_codes[rows, cols // 16].float() - sec[:, 1]) * ((1 << wbits) - 1)
    sign = torch.randint(0, 2, (nnz,), generator=g) * 2 - 1
    values = (sign * uniform(2.0, 6.0, nnz) * group_range).half()
    row_ptr = torch.zeros(out_features + 1, dtype=torch.int64)
    row_ptr[1:] = torch.bincount(rows, minlength=out_features).cumsum(0)
    outliers, outlier_row_ptr = tl.pack_outliers(row_ptr, cols, values, out_features)
    meta = LinearMeta(method="spqr", wbits=wbits, groupsize=16, stat_bits=stat_bits, stat_groupsize=16,
                      out_features=out_features, in_features=in_features)  # fmt: skip
    perm = encode_columns(torch.randperm(in_features, generator=g)) if permute else None
    layer = Layer(meta=meta, tiles=tl.pack(codes, scale_codes, zero_codes, second, wbits, stat_bits),
                  outliers=outliers, outlier_row_ptr=outlier_row_ptr, perm=perm, codes=codes,
                  scale_codes=scale_codes, zero_codes=zero_codes, second=second, o_rows=rows, o_cols=cols,
                  o_vals=values)  # fmt: skip
    return to_device(layer, device)


def to_device(q: Layer, device: str) -> Layer:
    moved = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in vars(q).items()}
    return Layer(**moved)


# ---- references -----------------------------------------------------------------------------------------------
def stats(q: Layer) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 scale and zero (out, in) per weight: the formula of grid.dequantize_codes on the unpacked codes."""
    m = q.meta
    sec = q.second.float().cpu().repeat_interleave(16, dim=0)[: m.out_features]  # (out, groups, 4)
    scale = dequantize_codes(q.scale_codes.cpu(), sec[..., 0], sec[..., 1])
    zero = dequantize_codes(q.zero_codes.cpu(), sec[..., 2], sec[..., 3])
    cols = torch.arange(m.in_features) // 16
    return scale[:, cols], zero[:, cols]


def deltas(q: Layer) -> torch.Tensor:
    """The outlier deltas as a dense fp32 (out, in) matrix (0 elsewhere)."""
    m = q.meta
    d = torch.zeros(m.out_features, m.in_features)
    d[q.o_rows.cpu(), q.o_cols.cpu()] = q.o_vals.cpu().float()
    return d


def true_weight(q: Layer) -> torch.Tensor:
    """The definition (fp32): scale * (code - zero) + outlier delta, stored column order."""
    scale, zero = stats(q)
    return dequantize_codes(q.codes.cpu(), scale, zero) + deltas(q)


def record_exponents(q: Layer) -> torch.Tensor:
    """The weight exponent k of each record (kernels/spqr_matmul.cu, weight_exponent): int64 (RT, KB), from the
    bound |s_scale| * max(|z_scale|, |2^SB - 1 - z_scale|) over the record's 4 groups: k = e + 9 for bound = m 2^e,
    m in [0.5, 1), clamped to [-3, 24]; 0 for a record of padding."""
    m = q.meta
    sec = q.second.float().cpu()  # (RT, groups, 4)
    kb = math.ceil(m.in_features / 64)
    ss, zs = sec[..., 0].abs(), sec[..., 1]
    bound = ss * torch.maximum(zs.abs(), ((1 << m.stat_bits) - 1 - zs).abs())  # (RT, groups) fp32
    bound = (
        torch.nn.functional.pad(bound, (0, 4 * kb - bound.shape[1])).reshape(bound.shape[0], kb, 4).amax(-1)
    )
    _, e = torch.frexp(bound)
    return torch.where(bound > 0, (e.long() + 9).clamp(-3, 24), torch.zeros_like(e, dtype=torch.long))


def weight_exponents(q: Layer) -> torch.Tensor:
    """`record_exponents` spread to every weight: int64 (out, in)."""
    m = q.meta
    k = record_exponents(q).repeat_interleave(16, 0).repeat_interleave(64, 1)
    return k[: m.out_features, : m.in_features]


def _h(x: torch.Tensor) -> torch.Tensor:
    """Round float64 to fp16 and back: one fp16 operation's rounding (its exact result computed in float64)."""
    return x.half().double()


def pair_exponents(wbits: int, out: int, in_: int) -> torch.Tensor:
    """The bit position p' (mod 9 for 3-bit) at which the kernels read each weight's code: int64 (out, in); its
    pair enters the fp16 arithmetic as code * 2^(p'-24) times the row's S0 * 2^-p' (decode_record). 4-bit: 4 in
    rows 8..15 of a row tile; 2-bit: 4 in columns 8..15 of a group; 3-bit: tile_layout.CODE3_ROW_EXPONENTS."""
    r = (torch.arange(out) % 16 >= 8).long().unsqueeze(1)  # (out, 1): row g + 8
    c = (torch.arange(in_) % 16 >= 8).long().unsqueeze(0)  # (1, in): column half
    if wbits == 4:
        return (4 * r).expand(out, in_)
    if wbits == 2:
        return (4 * c).expand(out, in_)
    table = torch.tensor(tl.CODE3_ROW_EXPONENTS)  # (tile j, row half)
    j = (torch.arange(in_) // 16 % 4).unsqueeze(0)  # (1, in)
    return table[j, r]


def kernel_weight16(q: Layer) -> torch.Tensor:
    """The kernels' dense weight, fp16, with the weight exponent k of its record: the fp16x2 operations of
    kernels/spqr_matmul.cu (decode_record), each emulated as its exact float64 result rounded once to fp16
    (subnormals included): s' = s_scale * 2^(12-k), S12 = fma(scale code, s', -z_scale * s') (= S0 * 2^-12),
    Z = fma(zero code, s_zero, -z_zero * s_zero), C = (S12 * -2^-12) * Z, S = S12 * 2^(12-p') (`pair_exponents`;
    2-bit: S12 * 2^12, then * 2^-p'), w'' = fma(code * 2^(p'-24), S, C), w = fp16(w'' * 2^k)."""
    m = q.meta
    sec = q.second.double().cpu().repeat_interleave(16, dim=0)[: m.out_features]  # (out, groups, 4)
    ss, zs, sz, zz = sec.unbind(-1)
    k = weight_exponents(q).double()[:, ::16]  # (out, groups): a group never straddles records
    s1 = _h(ss * torch.exp2(12 - k))
    s12 = _h(q.scale_codes.cpu().double() * s1 + _h(s1 * -zs))  # S0 * 2^-12
    zero = _h(q.zero_codes.cpu().double() * sz + _h(sz * -zz))
    c = _h(_h(s12 * -(2.0**-12)) * zero)
    cols = torch.arange(m.in_features) // 16
    s12, c, k = s12[:, cols], c[:, cols], k[:, cols]
    p = pair_exponents(m.wbits, m.out_features, m.in_features).double()
    published = p if m.wbits != 2 else torch.zeros_like(p)  # 2-bit: the quad publishes S0, tiles scale it
    s = _h(_h(s12 * torch.exp2(12 - published)) * torch.exp2(published - p))
    w2 = _h(q.codes.cpu().double() * torch.exp2(p - 24) * s + c)  # w'' = w * 2^-k
    return (w2 * torch.exp2(k)).half()


def range_tolerance(q: Layer) -> torch.Tensor:
    """Per weight (out, in) float64: how far the small-batch kernel's weight may be from `kernel_weight16`. The
    kernel takes k over a warp's k-range (the maximum of its records', <= the row tile's maximum K), not per
    record; the two computations are exact scalings of each other except where an fp16 subnormal is rounded
    (|w''|, |scale * 2^-k| or |scale*zero * 2^-k| below 2^-14, i.e. below 2^(K-14) unscaled): within 2^(K-20)
    (the rounding of scale * 2^-k, within 2^(K-25), times a zero of at most 15, and those of w'' and C)."""
    m = q.meta
    k_rt = (
        record_exponents(q).amax(1).repeat_interleave(16)[: m.out_features].double().unsqueeze(1)
    )  # (out, 1)
    scale, zero = stats(q)
    w = kernel_weight16(q).double()
    lim = torch.exp2(k_rt - 13)
    small = (w.abs() < lim) | ((scale * zero).double().abs() < lim) | (scale.double().abs() < lim)
    return torch.where(small, torch.exp2(k_rt - 20), torch.zeros_like(w))


def dequant_expected(q: Layer) -> torch.Tensor:
    """What spqr_dequantize writes: fp16(w16 + delta) where an outlier sits (fp32 sum, one rounding), else w16."""
    w16 = kernel_weight16(q)
    d = deltas(q)
    return torch.where(d != 0, (w16.float() + d).half(), w16)


def check_against_emulation(y: torch.Tensor, x_stored: torch.Tensor, w64: torch.Tensor,
                            bias64: torch.Tensor | None, w_tol: torch.Tensor | None = None) -> None:  # fmt: skip
    """|y - x_stored @ w64^T - bias| <= C_ACC eps32 sum|w x| (+|bias|) + sum|x| w_tol + one fp16 ulp, element by
    element (w_tol: per-weight uncertainty of w64, e.g. `range_tolerance`)."""
    xs = x_stored.reshape(-1, x_stored.shape[-1]).cpu().double()
    exact = xs @ w64.T
    mag = xs.abs() @ w64.abs().T
    if bias64 is not None:
        exact += bias64
        mag += bias64.abs()
    bound = C_ACC * EPS32 * mag
    if w_tol is not None:
        bound = bound + xs.abs() @ w_tol.T
    yf = y.reshape(exact.shape).cpu().double()
    tol = bound + ulp16(exact.abs() + bound)
    err = (yf - exact).abs()
    bad = ~(err <= tol)
    if bad.any():
        idx = bad.nonzero()[0].tolist()
        raise AssertionError(
            f"{int(bad.sum())} of {bad.numel()} elements outside the bound (NaN counts); first at {idx}: "
            f"y={yf[tuple(idx)].item()!r} expected={exact[tuple(idx)].item()!r} bound={tol[tuple(idx)].item():.3g}"
        )


def ulp16(v: torch.Tensor) -> torch.Tensor:
    """The fp16 ulp at |v| (subnormal spacing below 2^-14)."""
    _, e = torch.frexp(v.abs().clamp_min(2.0**-14))  # v = m 2^e, m in [0.5, 1)
    return torch.ldexp(torch.ones_like(v), (e - 11).to(torch.int32))


# ---- running a case -----------------------------------------------------------------------------------------
def run_cuda(x: torch.Tensor, q: Layer, bias: torch.Tensor | None) -> torch.Tensor:
    """spqr_matmul on the GPU, twice, each time into an output block pre-filled with NaN: the result must be
    fully written (finite) and bit-identical across runs."""
    m = q.meta
    rows = x.numel() // m.in_features
    outs = []
    for _ in range(2):
        numel = rows * m.out_features if rows <= 16 else m.out_features * m.in_features
        torch.cuda.empty_cache()
        junk = torch.full((numel,), float("nan"), dtype=torch.float16, device=x.device)
        del junk
        outs.append(spqr_matmul(x, q, bias))
    assert torch.isfinite(outs[0]).all(), "output has NaN/inf: some element was not written"
    assert torch.equal(outs[0], outs[1]), "repeated runs differ"
    return outs[0]


def run_shim(x: torch.Tensor, q: Layer, bias: torch.Tensor | None, case: tuple, **kw) -> torch.Tensor:
    """The kernels on the CPU shim (outputs and workspace pre-filled with NaN), under two thread orders: the
    results must be bit-identical."""
    s = shim()
    outs = []
    for order, seed in shim_orders(*case):
        s.configure(order, seed)
        outs.append(s.spqr_matmul(x, q, bias, **kw))
    s.configure("forward")
    assert torch.equal(outs[0], outs[1]) or (outs[0].isnan().any() or outs[1].isnan().any()), (
        f"thread orders {shim_orders(*case)} give different results"
    )
    return outs[0]


def check_case(backend: str, shape: tuple[int, int], rows: int | tuple[int, ...], case: tuple, *, bias_dtype=None,
               splits: int = 0, **layer) -> None:  # fmt: skip
    """Builds the layer and input on the backend's device, runs spqr_matmul (gather + kernels), and bounds every
    element against the float64 product with the kernels' weights."""
    device = "cuda" if backend == "cuda" else "cpu"
    torch.manual_seed(zlib.crc32(repr(case).encode()))  # x: reproducible per case
    q = random_layer(*shape, **layer)
    lead = rows if isinstance(rows, tuple) else (rows,)
    x = torch.randn(*lead, shape[1]).half()
    bias = None
    if bias_dtype is not None:
        bias = torch.randn(shape[0], generator=torch.Generator().manual_seed(7)).to(bias_dtype)
    if backend == "cuda":
        y = run_cuda(x.to(device), to_device(q, device), None if bias is None else bias.to(device))
    else:
        y = run_shim(x, q, bias, case, splits=splits)
    assert y.shape == (*lead, shape[0])
    tokens = math.prod(lead)
    perm = q.perm_indices()
    x_stored = x if perm is None else x[..., perm]
    w_tol = None
    if tokens <= 16:
        w64 = kernel_weight16(q).double() + deltas(q).double()
        b64 = None if bias is None else bias.double()
        w_tol = range_tolerance(q)
    else:
        w64 = dequant_expected(q).double()
        b64 = None if bias is None else bias.half().double()
    check_against_emulation(y, x_stored, w64, b64, w_tol)


# ---- case lists ---------------------------------------------------------------------------------------------
LLAMA_7B = [(4096, 4096), (11008, 4096), (4096, 11008)]
FALCON = [(4672, 4544), (18176, 4544), (4544, 18176)]
# tails: in not a multiple of 64 (or 8: unaligned x rows), out not a multiple of 16, single records, cols > 32767
ODD = [(100, 37), (4100, 4095), (64, 40000), (17, 16), (16, 1), (16, 64), (33, 200)]
ROWS = [1, 5, 9, 16, 17, 64]  # one n-tile, two n-tiles, prefill
# A kernel block only ever sees its own row tiles: the shim keeps every column count with a few row tiles.
ODD_SHIM = [(100, 37), (36, 4095), (20, 40000), (17, 16), (16, 1), (16, 64), (33, 200)]
ROWS_SHIM = [1, 5, 9, 16, 17]
MODEL_COLS_SHIM = [(36, 4096), (20, 11008), (36, 4544), (20, 18176)]


def _odd_cases(shapes, rows, wbits=(2, 3, 4)):
    """(wbits, shape, outlier fraction, permute, rows): every wbits x shape x rows, the outlier fraction and the
    permutation alternating along the list."""
    cases = []
    for i, (w, s, r) in enumerate(itertools.product(wbits, shapes, rows)):
        cases.append((w, s, (0.0, 0.03)[i % 2], (True, False)[(i // 2) % 2], r))
    return cases


if SHIM_BUILD == "asan":
    ODD_CASES = _odd_cases([(100, 37), (36, 4095), (17, 16), (16, 1)], [1, 9, 17])
    MODEL_CASES = [((20, 11008), 3, 4), ((20, 4544), 4, 16)]
    STAT_CASES = [(2, 1), (4, 12)]
    BIAS_CASES = [(torch.float16, 1), (torch.float32, 20)]
    SPLIT_CASES = [(3, 1), (5, 12)]
    DEQUANT_CASES = [(3, (100, 37)), (4, (36, 4095))]
elif SHIM_BUILD == "tsan":
    ODD_CASES = [(3, (36, 4095), 0.03, True, 1), (4, (20, 9000), 0.03, True, 16)]
    MODEL_CASES = []
    STAT_CASES = []
    BIAS_CASES = []
    SPLIT_CASES = [(3, 1), (8, 16)]
    DEQUANT_CASES = [(3, (20, 9000))]
else:
    ODD_CASES = _odd_cases(ODD_SHIM, ROWS_SHIM)
    MODEL_CASES = [(s, w, r) for s in MODEL_COLS_SHIM for w, r in [(2, 1), (3, 16), (4, 4), (3, 100)]]
    STAT_CASES = list(itertools.product([2, 4], [1, 3, 12, 32]))
    BIAS_CASES = list(itertools.product([torch.float16, torch.float32], [1, 8, 16, 20]))
    SPLIT_CASES = list(itertools.product([2, 3, 5, 7, 8], [1, 12]))
    DEQUANT_CASES = list(itertools.product([2, 3, 4], [(100, 37), (36, 4095), (20, 40000), (17, 16)]))


# ---- every path against the emulated kernel numerics ----------------------------------------------------------
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
        backend, shape, (1, rows), (shape, wbits, rows), wbits=wbits, outlier_fraction=0.01, seed=wbits
    )


@pytest.mark.parametrize(
    "backend,stat_bits,rows", backend_params(itertools.product([2, 4], [1, 3, 12, 32]), STAT_CASES)
)
def test_other_stat_bits(backend, stat_bits, rows):
    check_case(backend, (300, 520), rows, (stat_bits, rows), stat_bits=stat_bits, outlier_fraction=0.01)


@pytest.mark.parametrize(
    "backend,bias_dtype,rows",
    backend_params(itertools.product([torch.float16, torch.float32], [1, 8, 16, 20]), BIAS_CASES),
)
def test_bias(backend, bias_dtype, rows):
    check_case(backend, (200, 333), rows, (bias_dtype, rows), bias_dtype=bias_dtype, outlier_fraction=0.02)


@needs_shim
@pytest.mark.parametrize("splits,rows", SPLIT_CASES)
def test_shim_split_k_counts_that_do_not_divide_the_k_blocks(splits, rows):
    """8 k-blocks split 2..8 ways (3, 5, 7 leave unequal ranges), 3 row-tile groups with a partial last one; the
    last block of each group sums the partials in split order (bit-identical under any thread order) and resets
    its ticket counter (the shim fails the call otherwise)."""
    check_case("shim", (150, 64 * 7 + 5), rows, ("split", splits, rows), splits=splits, outlier_fraction=0.02,
               bias_dtype=torch.float32)  # fmt: skip


@needs_shim
@pytest.mark.parametrize("fraction", [0.0, 0.01, 0.03])
def test_shim_outliers_of_realistic_size(fraction):
    """Outliers 2-6x their group's range at 0%, 1% and 3% of the weights, through the small kernel (split-K as
    planned for an H100) and prefill."""
    if SHIM_BUILD != "plain":
        pytest.skip("covered by the plain build")
    for rows in (1, 16, 17):
        check_case("shim", (32, 4096), rows, ("outliers", fraction, rows), outlier_fraction=fraction)


@pytest.mark.parametrize("stat_scale", [1e-4, 300.0])
@pytest.mark.parametrize("wbits", [3, 4])
def test_shim_scales_far_from_one(stat_scale, wbits):
    """Tiny scales (weight exponent clamped at its floor, many fp16 subnormals) and large ones (k = 13, 14):
    every path still within the emulation's bound."""
    if SHIM_BUILD != "plain":
        pytest.skip("covered by the plain build")
    for rows in (1, 9, 17):
        case = ("stat-scale", stat_scale, wbits, rows)
        check_case("shim", (40, 700), rows, case, wbits=wbits, stat_scale=stat_scale, outlier_fraction=0.01)
    q = random_layer(40, 700, wbits=wbits, stat_scale=stat_scale)
    k = record_exponents(q)
    if stat_scale < 1:
        assert int(k.max()) == -3  # clamped: the bounds are ~2^-16
    else:
        assert int(k.min()) >= 13  # bounds ~2^4..2^5


@pytest.mark.parametrize(
    "backend,wbits,shape",
    backend_params(itertools.product([2, 3, 4], [(100, 37), (4100, 4095), (64, 40000)]), DEQUANT_CASES),
)
def test_dequantize_is_the_kernel_numerics_bit_for_bit(backend, wbits, shape):
    q = random_layer(*shape, wbits=wbits, outlier_fraction=0.03)
    if backend == "cuda":
        qc = to_device(q, "cuda")
        m = q.meta
        w = torch.ops.spqr.dequantize(qc.tiles, qc.outliers, qc.outlier_row_ptr, m.wbits, m.stat_bits,
                                      m.out_features, m.in_features).cpu()  # fmt: skip
    else:
        w = shim().dequantize(q)  # written into a NaN-filled buffer
    assert torch.equal(w, dequant_expected(q))  # NaN != NaN: an unwritten element fails


@pytest.mark.parametrize(
    "backend", [pytest.param("cuda", marks=needs_cuda), pytest.param("shim", marks=needs_shim)]
)
def test_columns_above_32767(backend):
    """Stored columns (perm and outlier words) are unsigned 16-bit: columns past 32767 must not go negative."""
    if backend == "shim" and SHIM_BUILD != "plain":
        pytest.skip("covered by the plain build")
    q = random_layer(32, 40000, outlier_fraction=0.03)
    assert int(q.o_cols.max()) > 32767 and int(q.perm_indices().max()) > 32767
    for rows in (1, 3, 20):
        check_case(backend, (32, 40000), rows, ("wide", rows), outlier_fraction=0.03)


@needs_cuda
def test_cuda_graph_capture():
    q = to_device(random_layer(256, 512, outlier_fraction=0.02), "cuda")
    x = torch.randn(1, 512, device="cuda").half()
    expected = spqr_matmul(x, q)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = spqr_matmul(x, q)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(y, expected)


# ---- the references and the checks themselves -----------------------------------------------------------------
@pytest.mark.parametrize("wbits,stat_bits", [(2, 2), (3, 3), (4, 4), (3, 2)])
def test_kernel_numerics_follow_the_spec_rule(wbits, stat_bits):
    """The fp16 weights the kernels compute are within the rule of kernels/spqr_matmul.cu ("Numerics") of the
    fp32 definition, and the op's reference weight is the definition exactly. With u = 2^-11 (fp16 rounding), S =
    scale, Z = zero, q = code: |w_kernel - w| <= u ((|q| + |Z|)(|S| + |s_scale z_scale|) + |S| (2|Z| + |s_zero
    z_zero|) + |w|) (1 + 8u) + 2^(k-20): the roundings of S (relative to |S| + |s_scale z_scale|), Z, C and w''."""
    q = random_layer(70, 300, wbits=wbits, stat_bits=stat_bits, outlier_fraction=0.02)
    w_true = true_weight(q)
    m = q.meta
    args = (q.tiles, q.outliers, q.outlier_row_ptr, m.wbits, m.stat_bits, m.out_features, m.in_features)
    assert torch.equal(reference_weight(*args), w_true)
    scale, zero = stats(q)
    dense = w_true - deltas(q)
    err = (kernel_weight16(q).double() - dense.double()).abs()
    k = weight_exponents(q).double()
    m = q.meta
    sec = q.second.double().repeat_interleave(16, dim=0)[: m.out_features][
        :, torch.arange(m.in_features) // 16
    ]
    s, z, qc = scale.double().abs(), zero.double().abs(), q.codes.double()
    u = 2.0**-11
    rule = u * (
        (qc + z) * (s + (sec[..., 0] * sec[..., 1]).abs()) + s * (2 * z + (sec[..., 2] * sec[..., 3]).abs())
    )
    rule = (rule + u * dense.double().abs()) * (1 + 8 * u) + torch.exp2(k - 20)
    assert (err <= rule).all()
    assert (err > 2.0**-10 * (dense.abs() + (scale * zero).abs())).any()  # the fp16 stats do cost precision


def test_bound_catches_a_dropped_outlier():
    """The per-element bound is tight enough that leaving out one outlier fails it."""
    q = random_layer(64, 4096, outlier_fraction=0.001, seed=1)
    x = torch.randn(1, 4096).half()
    w64 = kernel_weight16(q).double() + deltas(q).double()
    y = (x.double() @ w64.T).half()
    check_against_emulation(y, x, w64, None)
    dropped = w64.clone()
    dropped[q.o_rows[0], q.o_cols[0]] -= q.o_vals[0].double()
    with pytest.raises(AssertionError, match="outside the bound"):
        check_against_emulation((x.double() @ dropped.T).half(), x, w64, None)


def test_bound_fails_on_nan():
    w = torch.ones(3, 4).double()
    x = torch.ones(2, 4).half()
    y = (x.double() @ w.T).half()
    y[1, 2] = float("nan")
    with pytest.raises(AssertionError, match="1 of 6"):
        check_against_emulation(y, x, w, None)


# ---- CPU: registration, dispatch and fallback -----------------------------------------------------------------
def _op_args(q: Layer, x: torch.Tensor) -> tuple:
    m = q.meta
    return (
        x,
        q.tiles,
        q.outliers,
        q.outlier_row_ptr,
        None,
        m.wbits,
        m.stat_bits,
        m.out_features,
        m.in_features,
    )


def test_fake_ops_give_shapes_on_meta_tensors():
    q = random_layer(40, 70, outlier_fraction=0.02)
    args = _op_args(q, torch.randn(3, 70).half())
    meta_args = tuple(a.to("meta") if isinstance(a, torch.Tensor) else a for a in args)
    y = torch.ops.spqr.matmul_small(*meta_args)
    assert y.shape == (3, 40) and y.dtype == torch.float16 and y.device.type == "meta"
    w = torch.ops.spqr.dequantize(*meta_args[1:4], *meta_args[5:])
    assert w.shape == (40, 70) and w.dtype == torch.float16


@pytest.mark.parametrize("rows", [1, 3])
def test_opcheck(rows):
    q = random_layer(32, 80, outlier_fraction=0.02)
    args = _op_args(q, torch.randn(rows, 80).half())
    torch.library.opcheck(torch.ops.spqr.matmul_small.default, args)
    torch.library.opcheck(torch.ops.spqr.dequantize.default, (*args[1:4], *args[5:]))


def test_cpu_ops_compute_the_reference():
    q = random_layer(33, 150, outlier_fraction=0.03)
    x = torch.randn(3, 150).half()
    y = torch.ops.spqr.matmul_small(*_op_args(q, x))
    assert torch.equal(y, (x.float() @ true_weight(q).T).half())
    w = torch.ops.spqr.dequantize(*_op_args(q, x)[1:4], *_op_args(q, x)[5:])
    assert torch.equal(w, true_weight(q).half())


def test_cpu_dispatch_is_the_reference():
    q = random_layer(33, 50, outlier_fraction=0.03)
    x = torch.randn(2, 5, 50)
    assert torch.equal(spqr_matmul(x, q), spqr_matmul_reference(x, q))
    perm = q.perm_indices()
    bias = torch.randn(33)
    assert torch.equal(spqr_matmul_stored(x[..., perm], q, bias), spqr_matmul_reference(x, q, bias=bias))


def test_wrong_feature_count_is_one_clear_error():
    q = random_layer(16, 64)
    for fn in (spqr_matmul, spqr_matmul_stored):
        with pytest.raises(ValueError, match="input has 63 features, the layer expects 64"):
            fn(torch.randn(1, 63), q)


class _NoKernels:
    """A CUDA device whose kernels cannot be had (what `spqr_run.ops.cuda_gpu` returns on such a GPU)."""

    def kernels(self, bits):
        raise KernelsUnavailable("no prebuilt cubin for sm_120 (shipped: sm_80, sm_90); no NVRTC found: pip install "
                                 "nvidia-cuda-nvrtc (torch's CUDA wheels bring it)")  # fmt: skip


def test_a_gpu_without_kernels_warns_once_in_one_line_and_runs_the_reference(monkeypatch):
    monkeypatch.setattr(ops_module, "_no_gpu_reason", lambda device: None)  # pretend torch sees the GPU
    monkeypatch.setattr(ops_module, "cuda_gpu", lambda index: _NoKernels())
    monkeypatch.setattr(ops_module, "_warned", set())
    cuda0 = torch.device("cuda", 0)
    with pytest.warns(RuntimeWarning, match="reference path") as record:
        assert ops_module.gpu_kernels(cuda0, (3, 3)) is None
    assert len(record) == 1
    message = str(record[0].message)
    assert (
        "\n" not in message
        and "pip install nvidia-cuda-nvrtc" in message
        and "wbits=3, stat_bits=3" in message
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the second time: no warning
        assert ops_module.gpu_kernels(cuda0, (3, 3)) is None
    # the ops then compute the reference
    monkeypatch.setattr(ops_module, "kernels_support", lambda x, q: True)  # pretend this input wants kernels
    monkeypatch.setattr(ops_module, "gpu_kernels", lambda device, bits: None)
    q = random_layer(20, 40, outlier_fraction=0.02)
    x = torch.randn(1, 40).half()
    assert torch.equal(spqr_matmul(x, q), spqr_matmul_reference(x, q))


def test_kernel_benchmark_dry_run(capsys):
    """benchmarks/kernel_bench.py runs end to end without a GPU (--dry-run: tiny shapes, CPU reference)."""
    spec = importlib.util.spec_from_file_location("bench_kernels", ROOT / "benchmarks" / "kernel_bench.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    assert module.main(["--dry-run", "--models", "LLaMA-7B", "--batches", "1", "17"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| LLaMA-7B")]
    assert len(rows) == 2 and "small (mma)" in rows[0] and "dequant+cuBLAS" in rows[1]


def _quantized_linear(q: Layer):
    """The same layer as the project's `QuantizedLinear` (packed by its own `pack`)."""
    from spqr_run.quant import QuantizedLinear, UnpackedLinear

    u = UnpackedLinear(meta=q.meta, codes=q.codes, perm=q.perm_indices(), scale_codes=q.scale_codes,
                       zero_codes=q.zero_codes, second=q.second, outlier_rows=q.o_rows, outlier_cols=q.o_cols,
                       outlier_values=q.o_vals)  # fmt: skip
    return QuantizedLinear.pack(u)


@needs_shim
def test_shim_runs_quantized_linear_and_fused_rows():
    """The kernels read `QuantizedLinear` v2 as packed by the quantizer's path, and a `concat_rows` fusion
    (q/k/v-style, one permutation) through `spqr_matmul_stored` equals the parts run one by one."""
    if SHIM_BUILD != "plain":
        pytest.skip("covered by the plain build")
    from spqr_run.quant import QuantizedLinear

    parts = [random_layer(out, 200, outlier_fraction=0.02, seed=3) for out in (32, 16, 40)]
    for p in parts[1:]:
        p.perm = parts[0].perm  # linears reading one input share the permutation
    qs = [_quantized_linear(p) for p in parts]
    assert torch.equal(qs[0].tiles, parts[0].tiles) and torch.equal(qs[0].outliers, parts[0].outliers)
    fused = QuantizedLinear.concat_rows(qs)
    x = torch.randn(3, 200).half()
    xs = x[:, fused.perm_indices()]
    y = shim().spqr_matmul_stored(xs, fused)
    singles = torch.cat([shim().spqr_matmul(x, q) for q in qs], dim=-1)
    w64 = torch.cat([kernel_weight16(p).double() + deltas(p).double() for p in parts])
    w_tol = torch.cat([range_tolerance(p) for p in parts])
    check_against_emulation(y, xs, w64, None, w_tol)
    check_against_emulation(singles, xs, w64, None, w_tol)
