"""Bit packing, the packed per-linear layouts, their validation and their dequantization."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from spqr_run.errors import ModelFormatError
from spqr_run.quant import LinearMeta, QuantizedLinear, UnpackedLinear
from spqr_run.quant.packing import pack_bits, unpack_bits
from spqr_run.quant.tile_layout import record_words, unpack_outliers

SETTINGS = settings(max_examples=40, deadline=None)


@SETTINGS
@given(bits=st.integers(1, 8), chunks=st.integers(1, 6), lead=st.integers(1, 3), seed=st.integers(0, 2**31))
def test_pack_unpack_bits_round_trip(bits, chunks, lead, seed):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 2**bits, (lead, chunks * 32), generator=g)
    words = pack_bits(codes, bits)
    assert words.dtype == torch.int32 and words.shape == (lead, chunks * bits)  # no wasted bit
    assert torch.equal(unpack_bits(words, bits), codes)


def test_bit_order_is_a_little_endian_stream():
    codes = torch.zeros(32, dtype=torch.long)
    codes[10] = 0b101  # 3-bit code 10 occupies bits 30..32: straddles words 0 and 1
    codes[31] = 0b111  # last code: bits 93..95 of word 2
    words = pack_bits(codes, 3).long() & 0xFFFFFFFF
    assert words.tolist() == [0b01 << 30, 0b1, 0b111 << 29]


def random_unpacked(method, out, inp, wbits, groupsize, nnz, seed, perm=True) -> UnpackedLinear:
    """Random codes and statistics of a valid layout (outliers at distinct random positions)."""
    g = torch.Generator().manual_seed(seed)
    spqr = method == "spqr"
    meta = LinearMeta(
        method=method,
        wbits=wbits,
        groupsize=groupsize,
        stat_bits=3 if spqr else 0,
        stat_groupsize=16 if spqr else 0,
        out_features=out,
        in_features=inp,
    )
    groups = meta.num_groups
    u = UnpackedLinear(
        meta=meta,
        codes=torch.randint(0, 2**wbits, (out, inp), generator=g),
        perm=torch.randperm(inp, generator=g) if perm else None,
    )
    if not spqr:
        u.scales = (torch.rand(out, groups, generator=g) * 0.1 + 1e-3).half()
        u.zeros = (torch.rand(out, groups, generator=g) * 2**wbits).half()
        return u
    u.scale_codes = torch.randint(0, 8, (out, groups), generator=g)
    u.zero_codes = torch.randint(0, 8, (out, groups), generator=g)
    sec = torch.rand(meta.num_row_groups, groups, 4, generator=g)
    sec[..., 0] *= 0.01  # scale of the scales
    sec[..., 1] = -sec[..., 1] * 4  # zero of the scales: negative, so every scale is positive
    u.second = sec.half()
    flat = torch.randperm(out * inp, generator=g)[:nnz]
    u.outlier_rows, u.outlier_cols = flat // inp, flat % inp
    u.outlier_values = torch.randn(len(flat), generator=g).half()
    return u


def direct_dequantize(u: UnpackedLinear) -> torch.Tensor:
    """The documented formula applied element by element-group, with no tiles and no bit packing."""
    m = u.meta
    col_group = torch.arange(m.in_features) // m.groupsize  # (in,)
    if m.method != "spqr":
        s, z = u.scales.float()[:, col_group], u.zeros.float()[:, col_group]
        return s * (u.codes.float() - z)
    rg = torch.arange(m.out_features) // m.stat_groupsize  # (out,)
    sec = u.second.float()[rg]  # (out, groups, 4)
    scale = sec[..., 0] * (u.scale_codes.float() - sec[..., 1])  # (out, groups)
    zero = sec[..., 2] * (u.zero_codes.float() - sec[..., 3])
    w = scale[:, col_group] * (u.codes.float() - zero[:, col_group])
    w[u.outlier_rows, u.outlier_cols] += u.outlier_values.float()
    return w


def assert_same_unpacked(a: UnpackedLinear, b: UnpackedLinear) -> None:
    for name in ("codes", "perm", "scale_codes", "zero_codes", "second", "scales", "zeros"):
        x, y = getattr(a, name), getattr(b, name)
        assert (x is None) == (y is None), name
        if x is not None:
            assert torch.equal(x.long() if not x.is_floating_point() else x, y), name
    if a.meta.method == "spqr":
        key = lambda u: (u.outlier_rows * u.meta.in_features + u.outlier_cols).tolist()  # noqa: E731
        order_a, order_b = torch.argsort(torch.tensor(key(a))), torch.argsort(torch.tensor(key(b)))
        assert sorted(key(a)) == sorted(key(b))
        assert torch.equal(a.outlier_values[order_a], b.outlier_values[order_b])


def check_round_trip(u: UnpackedLinear) -> QuantizedLinear:
    q = QuantizedLinear.pack(u)
    assert_same_unpacked(q.unpack(), u)
    loaded = QuantizedLinear.from_tensors(q.tensors(), meta=q.meta.to_dict(), source="test.spqr")
    full = loaded.dequantize()
    assert full.shape == (u.meta.out_features, u.meta.in_features)
    torch.testing.assert_close(full, direct_dequantize(u), rtol=0, atol=0)
    assert torch.equal(full, q.dequantize())
    return loaded


@SETTINGS
@given(
    out=st.integers(1, 40),
    inp=st.integers(1, 70),
    wbits=st.sampled_from([2, 3, 4]),
    nnz_frac=st.floats(0, 0.2),
    perm=st.booleans(),
    seed=st.integers(0, 2**31),
)
def test_spqr_layout_round_trip(out, inp, wbits, nnz_frac, perm, seed):
    u = random_unpacked("spqr", out, inp, wbits, 16, int(nnz_frac * out * inp), seed, perm)
    q = check_round_trip(u)
    m = q.meta
    assert q.tiles.shape == (math.ceil(out / 16), math.ceil(inp / 64), record_words(wbits, 3))
    assert q.outlier_row_ptr.shape == (math.ceil(out / 16) * 16 + 1,)
    r0 = seed % out
    r1 = min(out, r0 + 1 + seed % 23)
    assert torch.equal(q.dequantize(slice(r0, r1)), q.dequantize()[r0:r1])  # any row range, tile-unaligned
    assert q.nbytes * 8 == round(q.avg_bits * m.out_features * m.in_features)


@SETTINGS
@given(
    method=st.sampled_from(["gptq", "rtn"]),
    out=st.integers(1, 30),
    inp=st.integers(1, 90),
    wbits=st.sampled_from([2, 3, 4, 8]),
    groupsize=st.integers(1, 40),
    seed=st.integers(0, 2**31),
)
def test_baseline_layout_round_trip(method, out, inp, wbits, groupsize, seed):
    q = check_round_trip(random_unpacked(method, out, inp, wbits, groupsize, 0, seed, perm=method == "gptq"))
    assert q.codes.shape == (out, math.ceil(inp / 32) * wbits)
    assert torch.equal(q.dequantize(slice(out // 2, out)), q.dequantize()[out // 2 :])


@pytest.mark.parametrize("inp", [40001, 65536])
def test_wide_layer_with_outliers_in_high_columns(inp):
    """Column indices above 32767 need the unsigned 16-bit reading (a signed one breaks)."""
    u = random_unpacked("spqr", 16, inp, 3, 16, 0, seed=1)
    cols = [32767, 32768, 40000, inp - 1]
    u.outlier_rows = torch.tensor([0, 3, 3, 15])
    u.outlier_cols = torch.tensor(cols)
    u.outlier_values = torch.tensor([1.0, -2.0, 3.5, 0.25]).half()
    q = check_round_trip(u)
    assert q.perm.dtype == torch.int16 and torch.equal(q.perm_indices(), u.perm)  # values above 32767 too
    assert int(q.perm_indices().max()) == inp - 1 and bool((q.perm < 0).any()) == (inp > 32768)
    assert ((q.outliers.long() >> 16) & 0xFFFF).tolist() == cols  # unsigned column in the high half
    w = q.dequantize(slice(3, 4))
    base = QuantizedLinear.pack(random_unpacked("spqr", 16, inp, 3, 16, 0, seed=1)).dequantize(slice(3, 4))
    assert torch.equal((w - base).nonzero()[:, 1], torch.tensor([32768, 40000]))


def test_outliers_are_sorted_by_row_then_column():
    u = random_unpacked("spqr", 20, 40, 4, 16, 0, seed=2)
    u.outlier_rows = torch.tensor([5, 1, 5, 19, 1])
    u.outlier_cols = torch.tensor([9, 30, 2, 0, 4])
    u.outlier_values = torch.arange(5).half()
    q = QuantizedLinear.pack(u)
    row_ptr, cols, values = unpack_outliers(q.outliers, q.outlier_row_ptr, 20)
    assert cols.tolist() == [4, 30, 2, 9, 0]
    assert values.tolist() == [4, 1, 2, 0, 3]
    assert row_ptr.tolist() == [0, 0, 2, 2, 2, 2, 4] + [4] * 13 + [5]
    assert q.outlier_row_ptr.tolist() == row_ptr.tolist() + [5] * 12  # padding rows 20..31: empty


def _tampered(q: QuantizedLinear, name: str, value) -> dict:
    t = dict(q.tensors())
    if value is None:
        del t[name]
    else:
        t[name] = value
    return t


def test_from_tensors_rejects_bad_data_naming_the_tensor():
    u = random_unpacked("spqr", 20, 40, 3, 16, 0, seed=3)
    u.outlier_rows, u.outlier_cols = torch.tensor([2, 2, 7]), torch.tensor([1, 5, 39])
    u.outlier_values = torch.ones(3).half()
    q = QuantizedLinear.pack(u)
    meta = q.meta.to_dict()
    s0 = q.tiles.shape[-1] - 8  # first second-order word of a record
    inf_second = q.tiles.clone()
    inf_second[1, 0, s0 + 3] = 0x7C00  # half 6 = +inf
    nan_value = q.outliers.clone()
    nan_value[1] = (nan_value[1] & ~0xFFFF) | 0x7E00
    in_padding = q.outlier_row_ptr.clone()
    in_padding[8:21] = 2  # row 7's outlier moved to padding row 20: pointers still monotone, end at nnz
    cases = {
        "tiles": _tampered(q, "tiles", q.tiles.to(torch.int64)),
        "tiles ": _tampered(q, "tiles", q.tiles[:, :, :-1]),
        "tiles  ": _tampered(q, "tiles", inf_second),
        "outliers": _tampered(q, "outliers", nan_value),
        "outliers ": _tampered(q, "outliers", q.outliers | (40 << 16)),  # column 40 >= in_features
        "outliers  ": _tampered(q, "outliers", None),
        "outliers   ": _tampered(q, "outliers", q.outliers.to(torch.int16)),
        "outlier_row_ptr": _tampered(q, "outlier_row_ptr", q.outlier_row_ptr.flip(0)),
        "outlier_row_ptr ": _tampered(q, "outlier_row_ptr", q.outlier_row_ptr[:21]),  # v1 length (out+1)
        "outlier_row_ptr  ": _tampered(q, "outlier_row_ptr", in_padding),
        "perm": _tampered(q, "perm", torch.zeros_like(q.perm)),  # not a permutation
        "perm ": _tampered(q, "perm", q.perm.to(torch.int32)),  # the old int32 layout: wrong dtype
        "perm  ": _tampered(q, "perm", torch.where(q.perm == 0, 40, q.perm)),  # 40 >= in_features
        "perm   ": _tampered(q, "perm", torch.where(q.perm == 0, -1, q.perm)),  # 65535 >= in_features
        "bogus": {**q.tensors(), "bogus": torch.zeros(1)},
        "codes": {**q.tensors(), "codes": torch.zeros(1)},  # a v1 tensor in a v2 spqr linear
    }
    for name, tensors in cases.items():
        with pytest.raises(ModelFormatError, match=f"layer.0.*{name.strip()}"):
            QuantizedLinear.from_tensors(tensors, meta=meta, source="layer.0")
    swapped = q.outliers.clone()
    swapped[[0, 1]] = swapped[[1, 0]]  # row 2: column 5 then 1
    with pytest.raises(ModelFormatError, match="increasing"):
        QuantizedLinear.from_tensors(_tampered(q, "outliers", swapped), meta=meta, source="layer.0")
    with pytest.raises(ModelFormatError, match="wbits"):
        QuantizedLinear.from_tensors(q.tensors(), meta={**meta, "wbits": 5}, source="layer.0")
    with pytest.raises(ModelFormatError, match="in_features"):
        LinearMeta.from_dict({**meta, "in_features": 70000}, source="layer.0")
    with pytest.raises(ModelFormatError, match="groupsize"):  # the v2 layout is built from 16 x 16 tiles
        LinearMeta.from_dict({**meta, "groupsize": 32}, source="layer.0")


def _part(out: int, inp: int, nnz: int, seed: int, perm: torch.Tensor | None, method: str = "spqr"):
    u = random_unpacked(method, out, inp, 3, 16, nnz, seed, perm=False)
    u.perm = perm
    return QuantizedLinear.pack(u)


@pytest.mark.parametrize("outs", [(32, 16, 21), (48,), (16, 5), (64, 64, 64)])
def test_concat_rows_dequantizes_to_the_row_concatenation(outs):
    perm = torch.randperm(70, generator=torch.Generator().manual_seed(4))
    parts = [_part(o, 70, nnz=7 * (i + 1), seed=i, perm=perm) for i, o in enumerate(outs)]
    fused = QuantizedLinear.concat_rows(parts)
    assert fused.meta.out_features == sum(outs) and torch.equal(fused.perm, parts[0].perm)
    want = torch.cat([q.dequantize() for q in parts])
    assert torch.equal(fused.dequantize(), want)
    assert fused.num_outliers == sum(q.num_outliers for q in parts)
    loaded = QuantizedLinear.from_tensors(fused.tensors(), meta=fused.meta.to_dict(), source="fused")
    assert torch.equal(loaded.dequantize(), want)
    r0 = outs[0] - 3  # a row range across the first part boundary
    assert torch.equal(fused.dequantize(slice(r0, r0 + 9)), want[r0 : r0 + 9])


def test_concat_rows_of_baselines():
    parts = [_part(o, 40, 0, seed=o, perm=None, method="gptq") for o in (7, 9)]
    fused = QuantizedLinear.concat_rows(parts)
    assert torch.equal(fused.dequantize(), torch.cat([q.dequantize() for q in parts]))


def test_concat_rows_refuses_parts_that_cannot_share_one_layout():
    perm = torch.randperm(40, generator=torch.Generator().manual_seed(5))
    a, b = _part(16, 40, 3, 0, perm), _part(16, 40, 3, 1, perm)
    with pytest.raises(ValueError, match="part 1 has another input permutation"):
        QuantizedLinear.concat_rows([a, _part(16, 40, 3, 1, perm.flip(0))])
    with pytest.raises(ValueError, match="part 1 has another input permutation"):
        QuantizedLinear.concat_rows([a, _part(16, 40, 3, 1, None)])
    with pytest.raises(ValueError, match="part 0 has 20 rows, not a multiple of 16"):
        QuantizedLinear.concat_rows([_part(20, 40, 3, 0, perm), b])
    with pytest.raises(ValueError, match="part 1 has another method"):
        QuantizedLinear.concat_rows([a, _part(16, 48, 3, 1, None)])
    with pytest.raises(ValueError, match="at least one"):
        QuantizedLinear.concat_rows([])
