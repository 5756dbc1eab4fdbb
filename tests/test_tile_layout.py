"""The v2 record layout (spqr_run/quant/tile_layout.py) against KERNELS_V2_SPEC.md section 2.

The ownership tests read the records with plain per-lane loops written from the PTX ISA fragment table
(mma.m16n8k16, A operand), independent of the vectorized packer.
"""

from __future__ import annotations

import pytest
import torch

from spqr_run.quant import tile_layout as tl


def _u32(x: int) -> int:
    return x & 0xFFFFFFFF


def _random_dense(out: int, in_: int, wbits: int, stat_bits: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    groups = -(-in_ // 16)
    codes = torch.randint(0, 1 << wbits, (out, in_), generator=g, dtype=torch.uint8)
    sc = torch.randint(0, 1 << stat_bits, (out, groups), generator=g, dtype=torch.uint8)
    zc = torch.randint(0, 1 << stat_bits, (out, groups), generator=g, dtype=torch.uint8)
    second = (torch.randn(-(-out // 16), groups, 4, generator=g) * 100).half()
    return codes, sc, zc, second


SHAPES = [(16, 64), (37, 150), (1, 1), (48, 200), (33, 65)]


@pytest.mark.parametrize("wbits", [2, 3, 4])
@pytest.mark.parametrize("stat_bits", [2, 3, 4])
@pytest.mark.parametrize("shape", SHAPES)
def test_pack_unpack_round_trip_is_exact(wbits, stat_bits, shape):
    out, in_ = shape
    codes, sc, zc, second = _random_dense(out, in_, wbits, stat_bits)
    tiles = tl.pack(codes, sc, zc, second, wbits, stat_bits)
    rt, kb = -(-out // 16), -(-in_ // 64)
    assert tiles.dtype == torch.int32 and tiles.shape == (rt, kb, tl.record_words(wbits, stat_bits))
    c2, sc2, zc2, sec2 = tl.unpack(tiles, out, in_, wbits, stat_bits)
    assert c2.dtype == sc2.dtype == zc2.dtype == torch.uint8 and sec2.dtype == torch.float16
    assert torch.equal(c2, codes) and torch.equal(sc2, sc) and torch.equal(zc2, zc)
    assert torch.equal(sec2.view(torch.int16), second.view(torch.int16))  # bit for bit (incl. -0.0)


def test_unpack_of_some_row_tiles_gives_their_rows():
    codes, sc, zc, second = _random_dense(70, 130, 3, 3)
    tiles = tl.pack(codes, sc, zc, second, 3, 3)
    c, s, z, sec = tl.unpack(tiles[1:3], 32, 130, 3, 3)
    assert torch.equal(c, codes[16:48]) and torch.equal(s, sc[16:48]) and torch.equal(z, zc[16:48])
    assert torch.equal(sec.view(torch.int16), second[1:3].view(torch.int16))


@pytest.mark.parametrize(
    ("wbits", "stat_bits", "nbytes"), [(3, 3, 464), (4, 3, 592), (2, 3, 336), (4, 4, 608)]
)
def test_record_size_is_the_spec_formula_and_a_multiple_of_16_bytes(wbits, stat_bits, nbytes):
    assert tl.record_words(wbits, stat_bits) * 4 == nbytes == 128 * wbits + 16 * stat_bits + 32
    for sb in range(1, 9):
        assert tl.record_words(wbits, sb) * 4 % 16 == 0


def _fragment(lane: int):
    """PTX ISA mma.m16n8k16 A fragment of `lane`: [(row, col of .x)] for a0..a3; .y is col + 1."""
    g, t = lane >> 2, lane & 3
    return [(g, 2 * t), (g + 8, 2 * t), (g, 2 * t + 8), (g + 8, 2 * t + 8)]


# 3-bit slots of tile j's a{k} (docs/FORMAT.md): (word w, slot i) = bits 16c + 3i of W_w, or None = the spread
# pair (bit 16c + 15 of W0, W1, W2 = code bits 0, 1, 2)
_SLOTS3 = [
    [(0, 0), (1, 0), (2, 0), (0, 3)],
    [(1, 3), (0, 1), (2, 3), (1, 1)],
    [(2, 1), (0, 2), (0, 4), (1, 2)],
    [(1, 4), (2, 2), (2, 4), None],
]


def _lane_code(rec: list[int], wbits: int, lane: int, j: int, k: int, c: int) -> int:
    """Code of fragment register a{k} half c (0 = .x) of tile j, read as the spec words it."""
    if wbits == 4:
        return (rec[4 * lane + j] >> (4 * k + 16 * c)) & 0xF
    if wbits == 2:
        return (rec[2 * lane + j // 2] >> (2 * (4 * (j % 2) + k) + 16 * c)) & 0x3
    words = [rec[2 * lane], rec[2 * lane + 1], rec[64 + lane]]
    slot = _SLOTS3[j][k]
    if slot is None:
        return sum(((words[b] >> (16 * c + 15)) & 1) << b for b in range(3))
    w, i = slot
    return (words[w] >> (16 * c + 3 * i)) & 0x7


def test_3bit_pairs_of_a_tile_row_share_their_bit_position_mod_9():
    for j in range(4):
        for rh in (0, 1):  # row g: a0, a2; row g + 8: a1, a3
            p = {6 if _SLOTS3[j][k] is None else 3 * _SLOTS3[j][k][1] % 9 for k in (rh, rh + 2)}
            assert p == {tl.CODE3_ROW_EXPONENTS[j][rh]}, (j, rh)


@pytest.mark.parametrize("wbits", [2, 3, 4])
def test_each_lane_words_hold_exactly_its_fragment_codes(wbits):
    out, in_ = 32, 128  # 2 x 2 records
    r = torch.arange(out).unsqueeze(1)
    col = torch.arange(in_).unsqueeze(0)
    codes = ((r * 5 + col * 3 + (r * col) % 7) % (1 << wbits)).to(torch.uint8)  # code = f(row, col)
    groups = in_ // 16
    zeros = torch.zeros(out, groups, dtype=torch.uint8)
    tiles = tl.pack(codes, zeros, zeros, torch.zeros(2, groups, 4).half(), wbits, 3)
    for rt in range(2):
        for kb in range(2):
            rec = [_u32(w) for w in tiles[rt, kb].tolist()]
            for lane in range(32):
                for j in range(4):
                    for k, (row, c0) in enumerate(_fragment(lane)):
                        for c in (0, 1):
                            want = int(codes[16 * rt + row, 64 * kb + 16 * j + c0 + c])
                            assert _lane_code(rec, wbits, lane, j, k, c) == want, (rt, kb, lane, j, k, c)


@pytest.mark.parametrize("wbits", [2, 3, 4])
def test_random_codes_also_sit_at_their_fragment_positions(wbits):
    codes, sc, zc, second = _random_dense(16, 64, wbits, 3, seed=wbits)
    rec = [_u32(w) for w in tl.pack(codes, sc, zc, second, wbits, 3)[0, 0].tolist()]
    for lane in range(32):
        for j in range(4):
            for k, (row, c0) in enumerate(_fragment(lane)):
                for c in (0, 1):
                    assert _lane_code(rec, wbits, lane, j, k, c) == int(codes[row, 16 * j + c0 + c])


@pytest.mark.parametrize("stat_bits", [2, 3, 4])
@pytest.mark.parametrize("wbits", [3, 4])
def test_stats_and_second_sit_where_each_lane_reads_them(wbits, stat_bits):
    out, in_ = 32, 128
    codes, sc, zc, second = _random_dense(out, in_, wbits, stat_bits, seed=7)
    tiles = tl.pack(codes, sc, zc, second, wbits, stat_bits)
    s0, sb = 32 * wbits, stat_bits
    for rt in range(2):
        for kb in range(2):
            rec = [_u32(w) for w in tiles[rt, kb].tolist()]
            bits = sum(w << (32 * i) for i, w in enumerate(rec[s0 : s0 + 4 * sb]))  # little-endian string
            for lane in range(32):
                g, t = lane >> 2, lane & 3
                want = [sc[16 * rt + g, 4 * kb + t], sc[16 * rt + g + 8, 4 * kb + t]]
                want += [zc[16 * rt + g, 4 * kb + t], zc[16 * rt + g + 8, 4 * kb + t]]
                for i in range(4):
                    got = (bits >> (sb * (4 * lane + i))) & ((1 << sb) - 1)
                    assert got == int(want[i]), (rt, kb, lane, i)
            sec_words = rec[s0 + 4 * sb :]
            assert len(sec_words) == 8
            for j in range(4):
                for q in range(4):
                    h = 4 * j + q
                    half_bits = (sec_words[h // 2] >> (16 * (h % 2))) & 0xFFFF
                    assert half_bits == int(second[rt, 4 * kb + j, q].view(torch.int16)) & 0xFFFF


def test_padding_holds_code_0_stat_0_and_second_0():
    codes, sc, zc, second = _random_dense(20, 70, 3, 3)
    codes, sc, zc = codes | 1, sc | 1, zc | 1  # no real zero anywhere
    tiles = tl.pack(codes, sc, zc, second, 3, 3)
    c, s, z, sec = tl.unpack(tiles, 32, 128, 3, 3)  # read past the crop: 32 x 128 padded
    assert int(c[20:].max()) == 0 and int(c[:, 70:].max()) == 0 and int(c[:20, :70].min()) == 1
    assert int(s[20:].max()) == 0 and int(s[:, 5:].max()) == 0 and int(z[20:].max()) == 0
    assert bool((sec[:, 5:] == 0).all())


def test_pack_rejects_out_of_range_codes_and_bad_shapes():
    codes, sc, zc, second = _random_dense(16, 64, 3, 3)
    with pytest.raises(ValueError, match="codes"):
        tl.pack(codes | 8, sc, zc, second, 3, 3)
    with pytest.raises(ValueError, match="scale_codes"):
        tl.pack(codes, sc | 8, zc, second, 3, 3)
    with pytest.raises(ValueError, match="second"):
        tl.pack(codes, sc, zc, second[:, :1], 3, 3)
    with pytest.raises(ValueError, match="wbits"):
        tl.record_words(5, 3)


def test_outlier_words_hold_value_bits_low_and_column_high():
    out = 20
    rows = [0, 0, 3, 19, 19]
    cols = torch.tensor([5, 40000, 32767, 0, 65535])
    values = torch.tensor([1.5, -2.0, 65504.0, -0.0, 2.0**-24]).half()
    row_ptr = torch.zeros(out + 1, dtype=torch.int32)
    for r in rows:
        row_ptr[r + 1 :] += 1
    words, ptr = tl.pack_outliers(row_ptr, cols, values, out)
    assert words.dtype == torch.int32 and ptr.dtype == torch.int32
    assert ptr.shape == (33,) and ptr[:21].tolist() == row_ptr.tolist() and set(ptr[20:].tolist()) == {5}
    for w, c, v in zip(words.tolist(), cols.tolist(), values.view(torch.int16).tolist(), strict=True):
        assert _u32(w) & 0xFFFF == v & 0xFFFF and _u32(w) >> 16 == c
    ptr2, cols2, values2 = tl.unpack_outliers(words, ptr, out)
    assert torch.equal(ptr2, row_ptr) and cols2.dtype == torch.int64 and torch.equal(cols2, cols)
    assert torch.equal(values2.view(torch.int16), values.view(torch.int16))


def test_pack_outliers_accepts_int16_bit_patterns_and_rejects_wide_columns():
    row_ptr = torch.tensor([0, 2], dtype=torch.int32)
    values = torch.ones(2).half()
    words, _ = tl.pack_outliers(row_ptr, torch.tensor([-1, 7], dtype=torch.int16), values, 1)
    assert [_u32(w) >> 16 for w in words.tolist()] == [65535, 7]
    with pytest.raises(ValueError, match="columns"):
        tl.pack_outliers(row_ptr, torch.tensor([0, 65536]), values, 1)


def test_empty_outliers():
    words, ptr = tl.pack_outliers(
        torch.zeros(3, dtype=torch.int32), torch.zeros(0, dtype=torch.long), torch.zeros(0).half(), 2
    )
    assert words.shape == (0,) and ptr.tolist() == [0] * 17
    p, c, v = tl.unpack_outliers(words, ptr, 2)
    assert p.tolist() == [0, 0, 0] and c.numel() == 0 and v.dtype == torch.float16
