"""The native CPU kernels (kernels/cpu) against pure-torch references, on fresh random layers.

Every configuration runs on every instruction set this machine supports (portable C, AVX2, AVX-512 VNNI):
- the repack gives exactly the CPU layout `weights.pack_cpu_layout` specifies (from `tile_layout.unpack`);
- the activation quantization equals its torch definition (per 16 stored columns, absmax / 127, nearest even);
- the SpQR matmul equals the dequantized weight times the dequantized activations to fp32 rounding, and the
  exact-activation reference within the rigorous bound of the int8 activations;
- the ISA variants agree bit for bit, 1 and 2 threads agree bit for bit, and a row's result does not depend
  on the other rows of the batch;
- outputs start poisoned (NaN): every element must be written.
The library is the installed one, or $SPQR_CPU_LIB (CI runs this file again on ASan+UBSan and TSan builds).
"""

from __future__ import annotations

import itertools

import pytest
import torch

from spqr_run.cpu import lib as native
from spqr_run.cpu import weights as W
from spqr_run.engine.synthetic import random_spqr_linear
from spqr_run.quant import LinearMeta
from spqr_run.quant.spqr_matmul import spqr_matmul_reference

LIB = native.load()
pytestmark = pytest.mark.skipif(
    LIB is None, reason=f"native CPU kernels unavailable: {native.unavailable_reason()}"
)
ISAS = [] if LIB is None else [isa for isa in (0, 1, 2) if isa <= LIB.spqr_cpu_best_isa()]


@pytest.fixture(autouse=True)
def _restore_isa_and_threads():
    yield
    if LIB is not None:
        LIB.spqr_cpu_set_isa(LIB.spqr_cpu_best_isa())
        LIB.spqr_cpu_set_threads(1, -1)


def layer(out: int, inp: int, wbits: int, stat_bits: int, *, seed: int, outliers: float = 0.01, scale=None):
    meta = LinearMeta(
        method="spqr", wbits=wbits, groupsize=16, stat_bits=stat_bits, stat_groupsize=16,
        out_features=out, in_features=inp,
    )  # fmt: skip
    gen = torch.Generator().manual_seed(seed)
    q = random_spqr_linear(meta, outlier_rate=outliers, gen=gen, device=torch.device("cpu"))
    if scale is not None:  # second-order scales far from the synthetic default
        from spqr_run.quant import tile_layout

        # [s.scale, s.zero, z.scale, z.zero]: z.scale not 1, so that z.scale * z.zero differs from z.zero
        second = torch.tensor([scale, -1.0, 0.75, 0.5], dtype=torch.float16).repeat(4)
        q.tiles[..., -tile_layout.SECOND_WORDS :] = tile_layout.halves_to_words(second)
    return q


def quantize_reference(x_stored: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The activation quantization, defined in torch: x_stored (rows, in) -> xq (rows, G*16) int8 codes and
    dx (rows, G) fp32 steps, G = ceil(in / 16), padding columns 0."""
    rows, inp = x_stored.shape
    g = -(-inp // 16)
    x = torch.nn.functional.pad(x_stored, (0, 16 * g - inp)).reshape(rows, g, 16)
    amax = x.abs().amax(-1)  # (rows, G)
    # 127 / amax as a true fp32 division (a Python scalar over a tensor computes 127 * (1 / amax) in torch)
    inv = torch.where(amax > 0, torch.full_like(amax, 127.0) / amax, torch.zeros_like(amax))
    xq = torch.round(x * inv[..., None]).clamp(-127, 127)
    return xq.reshape(rows, 16 * g).to(torch.int8), amax / 127.0


def native_quantize(x: torch.Tensor, perm: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    rows, inp = x.shape
    g = -(-inp // 16)
    xq = torch.empty(rows, 16 * g, dtype=torch.int8)
    dx = torch.empty(rows, g, dtype=torch.float32)
    p = None if perm is None else perm.to(torch.int16).contiguous()  # unsigned 16-bit patterns
    LIB.spqr_cpu_quantize_rows(x.data_ptr(), x.stride(0), rows, inp, None if p is None else p.data_ptr(),
                               xq.data_ptr(), dx.data_ptr())  # fmt: skip
    return xq, dx


def run(nw: W.NativeWeight, x: torch.Tensor) -> torch.Tensor:
    """The kernel's output into a NaN-poisoned buffer (every element must be written)."""
    y = torch.full((x.shape[0], nw.out_features), float("nan"))
    assert (
        LIB.spqr_cpu_matmul(nw.struct, x.data_ptr(), x.stride(0), y.data_ptr(), y.stride(0), x.shape[0]) == 0
    )
    assert not y.isnan().any(), "an output element was not written (or is NaN)"
    return y


def check_against_references(
    q, nw, x: torch.Tensor, y: torch.Tensor, bias: torch.Tensor | None = None
) -> None:
    """y against (1) the dequantized weight times the dequantized activations, in fp64: fp32 rounding only;
    (2) the exact-activation reference: within sum_j |w_j| |x_j - xhat_j| (the int8 activations' error)."""
    perm = q.perm_indices()
    xs = x if perm is None else x[:, perm]  # (rows, in) stored order
    xq, dx = quantize_reference(xs)
    xhat = (xq.double().reshape(x.shape[0], -1, 16) * dx.double()[..., None]).reshape(x.shape[0], -1)
    xhat = xhat[:, : q.meta.in_features]
    w = q.dequantize(dtype=torch.float64)  # (out, in) stored order, outliers included
    dense = w.clone()
    rows, cols, vals = _outliers(q)
    dense[rows, cols] -= vals  # outliers are added from the exact activations
    want = xhat @ dense.T + xs.double() @ (w - dense).T
    if bias is not None:
        want += bias.double()
    terms = xhat.abs() @ dense.abs().T + xs.double().abs() @ (w - dense).abs().T
    tol = 2.0**-19 * terms + 1e-30  # fp32 accumulation over ~in/16 groups, generous by a few ulps
    err = (y.double() - want).abs()
    assert (err <= tol).all(), f"max error {err.max():.3g} over the fp32 bound {tol[err > tol].min():.3g}"
    # the int8 activations: within their rigorous bound of the exact reference
    exact = spqr_matmul_reference(x, q, bias=bias).double()
    bound = (xs.double() - torch.nn.functional.pad(xhat, (0, 0))).abs() @ dense.abs().T + tol + 1e-6
    assert ((y.double() - exact).abs() <= bound).all()


def _outliers(q):
    from spqr_run.quant import tile_layout

    row_ptr, cols, vals = tile_layout.unpack_outliers(q.outliers, q.outlier_row_ptr, q.meta.out_features)
    counts = (row_ptr[1:] - row_ptr[:-1]).long()
    rows = torch.repeat_interleave(torch.arange(q.meta.out_features), counts)
    return rows, cols, vals.double()


SHAPES = [(16, 64), (40, 80), (17, 65), (100, 200), (576, 576), (48, 1000)]
SHAPE_IDS = [f"{o}x{i}" for o, i in SHAPES]  # the sanitizer builds skip the large ones (.ci/cpu-kernels)
CONFIGS = [(wb, sb) for wb in (2, 3, 4) for sb in (1, 3, 4, 5, 8)]


@pytest.mark.parametrize("wbits,stat_bits", CONFIGS)
@pytest.mark.parametrize("shape", SHAPES[:4], ids=SHAPE_IDS[:4])
def test_repack_is_the_specified_cpu_layout(wbits, stat_bits, shape):
    q = layer(*shape, wbits, stat_bits, seed=hash((wbits, stat_bits, shape)) % 1000)
    nw = W.spqr_weight(q)
    codes, stats = W.pack_cpu_layout(q)
    assert torch.equal(nw.tensors["codes"], codes)
    assert torch.equal(nw.tensors["stats"], stats)
    if (
        2 <= stat_bits <= 4
    ):  # nibble stats: within 10% of the stored bytes (1-bit and 5-7-bit stats cost more)
        assert nw.nbytes <= 1.10 * q.nbytes


@pytest.mark.parametrize("perm", [True, False])
@pytest.mark.parametrize("inp", [16, 64, 80, 576, 1000])
def test_activation_quantization_is_its_torch_definition(inp, perm):
    x = torch.randn(5, inp) * torch.logspace(-3, 2, inp)  # groups of very different magnitudes
    x[1] = 0.0  # an all-zero row: dx 0, codes 0
    p = torch.randperm(inp) if perm else None
    xq, dx = native_quantize(x, p)
    ref_q, ref_dx = quantize_reference(x if p is None else x[:, p])
    assert torch.equal(xq, ref_q) and torch.equal(dx, ref_dx)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("wbits,stat_bits", [(2, 3), (3, 3), (4, 3), (3, 5), (4, 8), (2, 1)])
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_spqr_matmul_matches_the_references(isa, wbits, stat_bits, shape):
    LIB.spqr_cpu_set_isa(isa)
    seed = hash((isa, wbits, stat_bits, shape)) % 10_000
    q = layer(*shape, wbits, stat_bits, seed=seed)
    bias = torch.randn(shape[0]) if seed % 2 else None
    nw = W.spqr_weight(q, bias)
    for rows in (1, 3, 9):
        x = torch.randn(rows, shape[1], generator=torch.Generator().manual_seed(seed + rows))
        check_against_references(q, nw, x, run(nw, x), bias)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("wbits", [3, 4])
def test_activation_residual_makes_the_activations_nearly_exact(isa, wbits):
    """act_residual: a second int8 pass over x - xhat (step dx / 254): the result is within the fp32 bound of
    the exact-activation reference plus |w| times the residual's own rounding (dx / 508 per element); the
    ISA variants agree bit for bit."""
    q = layer(200, 576, wbits, 3, seed=31 + wbits)
    nw = W.spqr_weight(q, act_residual=True)
    x = torch.randn(5, 576) * torch.logspace(-2, 1, 576)
    LIB.spqr_cpu_set_isa(isa)
    y = run(nw, x)
    LIB.spqr_cpu_set_isa(0)
    assert torch.equal(run(nw, x), y)
    perm = q.perm_indices()
    xs = x[:, perm]
    _, dx = quantize_reference(xs)
    step = (dx / 254).repeat_interleave(16, dim=1)[
        :, :576
    ].double() / 2  # (rows, in): the residual's rounding
    w = q.dequantize(dtype=torch.float64)
    exact = spqr_matmul_reference(x, q).double()
    bound = step @ w.abs().T + 2.0**-19 * (xs.double().abs() @ w.abs().T)
    assert ((y.double() - exact).abs() <= bound).all()
    int8 = run(W.spqr_weight(q), x).double()
    assert (y.double() - exact).abs().mean() < (int8 - exact).abs().mean() / 50


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("scale", [1e-4, 300.0])
def test_second_order_scales_far_from_one(scale, isa):
    LIB.spqr_cpu_set_isa(isa)
    q = layer(64, 192, 3, 3, seed=7, scale=scale)
    nw = W.spqr_weight(q)
    x = torch.randn(4, 192)
    check_against_references(q, nw, x, run(nw, x))


def test_isa_variants_agree_bit_for_bit():
    outs = {}
    for isa in ISAS:
        LIB.spqr_cpu_set_isa(isa)
        for wbits, stat_bits, (o, i) in itertools.product((2, 3, 4), (3, 6), [(40, 80), (200, 576)]):
            q = layer(o, i, wbits, stat_bits, seed=wbits * 10 + stat_bits)
            x = torch.randn(11, i, generator=torch.Generator().manual_seed(1))
            outs.setdefault((wbits, stat_bits, o), []).append(run(W.spqr_weight(q), x))
    for key, ys in outs.items():
        assert all(torch.equal(ys[0], y) for y in ys[1:]), key


@pytest.mark.parametrize("isa", ISAS)
def test_rows_and_threads_do_not_change_a_rows_result(isa):
    """Batch invariance (what the server relies on) and thread-count invariance, bit for bit."""
    LIB.spqr_cpu_set_isa(isa)
    q = layer(300, 576, 3, 3, seed=11)
    nw = W.spqr_weight(q, torch.randn(300))
    x = torch.randn(17, 576)
    whole = run(nw, x)
    for r in range(x.shape[0]):
        assert torch.equal(run(nw, x[r : r + 1]), whole[r : r + 1])
    assert torch.equal(run(nw, x[3:12]), whole[3:12])
    LIB.spqr_cpu_set_threads(2, -1)
    assert torch.equal(run(nw, x), whole)
    assert torch.equal(run(nw, x[:1]), whole[:1])


@pytest.mark.parametrize("isa", ISAS)
def test_q8_rows_and_matmul(isa):
    """Int8 codes with an fp16 scale per row and 64 columns (`weights.q8_quantize` defines them)."""
    LIB.spqr_cpu_set_isa(isa)
    torch.manual_seed(isa)
    w = torch.randn(100, 200) * torch.rand(100, 1) * 3  # rows of different scales; 200 = 3 x 64 + 8
    w[5] = 0.0
    w[7, 64:128] = 0.0
    nw = W.q8_weight(w.half())
    codes, scales = W.q8_quantize(w.half())
    s = scales.float().repeat_interleave(64, dim=1)[:, :200]
    deq = codes.double()[:, :200] * s.double()  # (100, 200)
    # the definition: scale = fp16(absmax / 127) per row and 64 columns, code = round(w / scale)
    blocks = torch.nn.functional.pad(w.half().float(), (0, 56)).reshape(100, 4, 64)
    amax = blocks.abs().amax(-1)
    assert (scales.float() * 127 >= amax).all() and (
        scales.float() - amax / 127 <= 2**-9 * amax / 127
    ).all()  # one fp16 step
    assert (deq - w.half().double()).abs().le(s.double() / 2 + 1e-12).all()
    ids = torch.tensor([0, 5, 7, 99, 17])
    assert torch.equal(W.q8_rows(nw, ids).double(), deq[ids])
    x = torch.randn(6, 200)
    xq, dx = quantize_reference(x)
    # the head's activations: int8, plus their residual in int8 with step dx / 254 (`quantize_row`)
    xg = torch.nn.functional.pad(x, (0, 8)).reshape(6, -1, 16)
    r = xg - dx[..., None] * xq.float().reshape(6, -1, 16)
    inv2 = torch.where(dx > 0, torch.full_like(dx, 254.0) / dx, torch.zeros_like(dx))
    rq = torch.round(r * inv2[..., None]).clamp(-127, 127)
    assert (r.abs() <= dx[..., None] / 2 * (1 + 1e-6)).all()
    parts = [
        xq.double().reshape(6, -1, 16) * dx.double()[..., None],
        rq.double() * (dx / 254).double()[..., None],
    ]
    xhat = sum(p.reshape(6, -1)[:, :200] for p in parts)
    assert (xhat - x.double()).abs().max() <= dx.max() / 400  # the head sees x to ~2^-15 of its group max
    want = xhat @ deq.T
    y = run(nw, x)
    terms = sum(p.reshape(6, -1)[:, :200].abs() for p in parts) @ deq.abs().T
    assert ((y.double() - want).abs() <= 2.0**-19 * terms + 1e-30).all()


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_dense_matmul(isa, dtype):
    LIB.spqr_cpu_set_isa(isa)
    w, b = torch.randn(70, 99).to(dtype), torch.randn(70)
    nw = W.dense_weight(w, b)
    for rows in (1, 2, 5):
        x = torch.randn(rows, 99)
        want = x.double() @ w.double().T + b.double()
        y = run(nw, x)
        terms = x.double().abs() @ w.double().abs().T + b.double().abs()
        assert ((y.double() - want).abs() <= 2.0**-20 * terms).all()


def test_matmul_takes_strided_rows_and_checks_inputs():
    q = layer(48, 64, 4, 3, seed=3)
    nw = W.spqr_weight(q)
    big = torch.randn(4, 100)
    x = big[:, 10:74]  # row stride 100, not 64
    assert torch.equal(nw.matmul(x), nw.matmul(x.contiguous()))
    with pytest.raises(ValueError, match="expects 64"):
        nw.matmul(torch.randn(2, 63))
    with pytest.raises(TypeError, match="fp32"):
        nw.matmul(torch.randn(2, 64).half())


def test_thread_pool_runs_every_chunk_once_under_contention():
    """Many short parallel loops back to back with more threads than cores (workers descheduled while holding
    chunks, late wake-ups): every result identical to one thread's."""
    q = layer(160, 320, 3, 3, seed=21)
    nw = W.spqr_weight(q)
    x = torch.randn(3, 320)
    want = run(nw, x)
    for threads in (2, 3, 4):
        LIB.spqr_cpu_set_threads(threads, 0 if threads == 3 else 50)  # spin 0: every wake-up is a futex
        for _ in range(30):
            assert torch.equal(run(nw, x), want)
