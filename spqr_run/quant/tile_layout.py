"""The packed layout of an SpQR linear: one record per 16 rows x 64 stored columns, in mma fragment order.

This module is the single source of truth for where every code, statistic and outlier of an SpQR linear sits
in `.spqr` format version 3 (docs/FORMAT.md, "SpQR layout"; the contract is KERNELS_V2_SPEC.md section 2;
format 2 differed only in the order of 3-bit codes, `format_v2` converts it).

A linear `out x in` is cut into RT = ceil(out/16) row tiles and KB = ceil(in/64) k-blocks; record (rt, kb)
covers rows 16*rt .. +15 and stored columns 64*kb .. +63 = four 16 x 16 groups j = 0..3 (one SpQR group of
one row tile each, i.e. exactly one A operand of `mma.sync.m16n8k16`). Padding rows/columns hold code 0,
stat codes 0 and second-order numbers 0. `tiles` is int32 (RT, KB, R), R = `record_words(wbits, stat_bits)`.

One record (word offsets; wbits = 3, stat_bits = 3: R = 116 words = 464 bytes)::

    word 0                    64                 96           108        116
    +-------------------------+------------------+------------+----------+
    | codes: lane L's words   | codes: lane L's  | stats:     | second:  |
    | W0 = 2L, W1 = 2L+1      | W2 = 64+L        | 128 codes  | 16 fp16  |
    |                         |                  | x 3 bits   | [ss zs sz zz] x group 0..3
    +-------------------------+------------------+------------+----------+
    wbits = 4: 128 words, lane L's 4 words at 4L (word j = tile j); wbits = 2: 64 words at 2L, 2L+1.

Lane L (g = L >> 2, t = L & 3) owns, in each 16 x 16 tile, the PTX ISA A fragment a0 = (row g, cols 2t,
2t+1), a1 = (row g+8, same cols), a2 = (row g, cols 2t+8, 2t+9), a3 = (row g+8, cols 2t+8, 2t+9). A pair
(the two codes of one a{k}) sits at the same bits of both halves of a word: its .x (lower column) code at
bits [p, p+b) and its .y code at [16+p, 16+p+b).
- 4- and 2-bit ("b-bit plane", P = 16/b pairs a word): word b*L + j // (P/4), pair 4*(j mod (P/4)) + k at
  p = b*(4*(j mod (P/4)) + k).
- 3-bit: five codes a half, slot (w, i) of word W_w at p = 3i (i = 0..4), and a 16th pair spread over bit 15
  of each half of W0, W1, W2 (`CODE3_SLOTS`): no code straddles a word or a half, so each pair costs the
  kernel one mask (slots 3, 4 after one shift of the word by 9), and the pairs of one row of a tile share
  their bit position mod 9, so one multiply per tile and record scales the row's scale (kernels/spqr_matmul.cu).

One lane's word for wbits = 4, tile j (x/y = codes of columns c, c+1)::

    bit 31          24          16 15           8           0
        | a3.y| a2.y| a1.y| a0.y | a3.x| a2.x| a1.x| a0.x |       (w >> 4p) & 0x000F000F = pair p
                                                                  in the low bits of both halves

One half of a 3-bit word W_w (the other half alike, 16 bits up)::

    bit 15  14 .. 12  11 .. 9   8 .. 6   5 .. 3   2 .. 0
        | s_w | (w,4)  | (w,3)  | (w,2)  | (w,1)  | (w,0)  |     s_w: bit w of the spread pair's code

Stats: the 128 stat codes form one little-endian bit string; code 4L + i (bits [sb*(4L+i), +sb)) is, for
group j = t of the record: i = 0 scale code of row g, 1 scale code of row g+8, 2 zero code of row g, 3 zero
code of row g+8. Second: group j's [s_scale, z_scale, s_zero, z_zero] are fp16 halves 4j .. 4j+3 (half 2n in
the low 16 bits of word n).

Outliers: one int32 word each, bits 0..15 = fp16 bit pattern of the delta, bits 16..31 = stored column as
unsigned 16 bits, sorted by row then column; CSR row pointers over the RT*16 padded rows.
"""

from __future__ import annotations

import functools
import sys

import torch
from torch import Tensor
from torch.nn import functional as F

from spqr_run.quant.packing import pack_bits, to_int32_bits, unpack_bits

ROWS = 16  # rows of a row tile (beta2)
GROUP = 16  # stored columns of a group (beta1)
GROUPS_PER_BLOCK = 4  # groups (16 x 16 tiles) per record
COLS = GROUP * GROUPS_PER_BLOCK  # 64 stored columns per record ("k-block")
LANES = 32
SECOND_WORDS = 8  # 16 fp16 second-order numbers per record


def record_words(wbits: int, stat_bits: int) -> int:
    """int32 words R of one record: 32*wbits (codes) + 4*stat_bits (stats) + 8 (second).

    A record is 4*R = 128*wbits + 16*stat_bits + 32 bytes, always a multiple of 16. Raises ValueError for
    wbits outside 2..4 or stat_bits outside 1..8.
    """
    if wbits not in (2, 3, 4):
        raise ValueError(f"the v2 tile layout supports wbits 2, 3, 4, got {wbits}")
    if not 1 <= stat_bits <= 8:
        raise ValueError(f"the v2 tile layout supports stat_bits 1..8, got {stat_bits}")
    return 32 * wbits + 4 * stat_bits + SECOND_WORDS


# 3-bit records (format 3): lane L's code words are W0 = 2L, W1 = 2L + 1 and W2 = 64 + L. Half c of word W_w
# holds five codes, slot (w, i) at bits 16c + 3i .. 16c + 3i + 2 (i = 0..4); bit 16c + 15 of W_b is bit b of
# the 16th pair's code (the spread slot, None below). CODE3_SLOTS[j][k] is where tile j's fragment register
# a{k} sits. A pair read at bit p enters the fp16 arithmetic as code * 2^(p' - 24) with p' = p mod 9 (slots 3
# and 4 are read after a shift by 9), and the spread pair is assembled at p' = 6; the slots are chosen so that
# in each tile the pairs of one row share p' (row g: 0, 0, 3, 3 in tiles 0..3; row g + 8: 0, 3, 6, 6), so the
# kernel scales each tile's (row g, row g + 8) scale once (`CODE3_ROW_EXPONENTS`).
CODE3_SLOTS: tuple[tuple[tuple[int, int] | None, ...], ...] = (
    ((0, 0), (1, 0), (2, 0), (0, 3)),
    ((1, 3), (0, 1), (2, 3), (1, 1)),
    ((2, 1), (0, 2), (0, 4), (1, 2)),
    ((1, 4), (2, 2), (2, 4), None),
)
CODE3_ROW_EXPONENTS = ((0, 0), (0, 3), (3, 6), (3, 6))  # p' of (row g, row g + 8) pairs in tile j


@functools.cache
def _code3_field_positions(device: torch.device) -> Tensor:
    """int64 (32 lanes * 32 fields,): the record position 64*row + col of lane L's field f = 2s + c, where
    s = 5w + i is slot (w, i) and s = 15 the spread slot, c the half (0 = .x)."""
    pos = torch.empty(32, 32, dtype=torch.long)
    for lane in range(32):
        g, t = lane >> 2, lane & 3
        for j in range(4):
            for k in range(4):
                slot = CODE3_SLOTS[j][k]
                s = 15 if slot is None else 5 * slot[0] + slot[1]
                row, col = g + 8 * (k & 1), 16 * j + 2 * t + 8 * (k >> 1)
                for c in (0, 1):
                    pos[lane, 2 * s + c] = 64 * row + col + c
    return pos.reshape(-1).to(device)


def _code3_shifts(device: torch.device) -> Tensor:
    """Bit shift of slot (w, i) half c in its word: (5, 2) int64 [i][c] = 16c + 3i."""
    return (torch.arange(5).unsqueeze(1) * 3 + torch.tensor([0, 16])).to(device)


def pack_code3(block: Tensor) -> Tensor:
    """3-bit codes of records (RT, KB, 16, 64) uint8 -> the 96 code words int32 (RT, KB, 96)."""
    rt, kb = block.shape[:2]
    dev = block.device
    fields = block.reshape(rt, kb, ROWS * COLS)[..., _code3_field_positions(dev)].long()  # (RT, KB, 1024)
    fields = fields.reshape(rt, kb, 32, 16, 2)  # (RT, KB, lane, slot s, half c)
    slots = fields[..., :15, :].reshape(rt, kb, 32, 3, 5, 2)  # (RT, KB, lane, w, i, c)
    words = (slots << _code3_shifts(dev)).sum(dim=(-2, -1))  # (RT, KB, lane, w): fields never overlap
    spread = fields[..., 15, :]  # (RT, KB, lane, c)
    for b in range(3):  # bit b of the spread pair's codes -> bits 15, 31 of W_b
        words[..., b] |= (((spread >> b) & 1) << torch.tensor([15, 31], device=dev)).sum(-1)
    out = torch.empty(rt, kb, 96, dtype=torch.int64, device=dev)
    out[..., 0:64:2], out[..., 1:64:2], out[..., 64:96] = words.unbind(-1)
    return to_int32_bits(out)


def _unpack_code3(words: Tensor) -> Tensor:
    """Inverse of `pack_code3`: int32 (RT, KB, 96) -> uint8 codes (RT, KB, 16, 64)."""
    rt, kb = words.shape[:2]
    lw = torch.stack([words[..., 0:64:2], words[..., 1:64:2], words[..., 64:96]], dim=-1)  # (RT, KB, lane, w)
    fields = torch.empty(rt, kb, 32, 32, dtype=torch.uint8, device=words.device)  # (RT, KB, lane, 2s + c)
    slots = fields[..., :30].view(rt, kb, 32, 3, 5, 2)  # (RT, KB, lane, w, i, c)
    for i in range(5):  # one pass per field position: a third of the time of one broadcast shift
        for c in range(2):  # int32 shifts are arithmetic, but every field is masked below bit 32 - shift
            slots[..., i, c] = (lw >> (16 * c + 3 * i)) & 7
    for c in range(2):  # spread pair: bit w of its code = bit 16c + 15 of W_w
        top = (lw >> (16 * c + 15)) & 1  # (RT, KB, lane, w)
        fields[..., 30 + c] = top[..., 0] | (top[..., 1] << 1) | (top[..., 2] << 2)
    idx = _code3_gather_index(words.device).expand(rt * kb, ROWS * COLS)
    return torch.gather(fields.reshape(rt * kb, ROWS * COLS), 1, idx).reshape(rt, kb, ROWS, COLS)


@functools.cache
def _code3_gather_index(device: torch.device) -> Tensor:
    """For each record position 64*row + col, its index among a record's 3-bit lane fields (the inverse of
    `_code3_field_positions`)."""
    return _code3_field_positions(device).argsort()


def _plane_order(block: Tensor, b: int) -> Tensor:
    """Codes of records (RT, KB, 16, 64) -> (RT, KB, 32*b words, 32/b fields) in a b-bit plane's order.

    Field f of a word = c*P + p (c = 0: .x, 1: .y; P = 16/b pairs); the field sits at bit 16*c + b*p.
    Record row = g + 8*rh, column = 16*j + 8*ch + 2*t + c; fragment k = rh + 2*ch; j = jw*(4/b) + jr;
    word = b*L + jw with L = 4*g + t; pair p = 4*jr + k = 4*jr + 2*ch + rh.
    """
    rt, kb = block.shape[:2]
    tpw = 4 // b  # tiles per word
    x = block.reshape(rt, kb, 2, 8, b, tpw, 2, 4, 2)  # (RT, KB, rh, g, jw, jr, ch, t, c)
    x = x.permute(0, 1, 3, 7, 4, 8, 5, 6, 2)  # (RT, KB, g, t, jw, c, jr, ch, rh)
    return x.reshape(rt, kb, 32 * b, 32 // b)  # (RT, KB, words, fields c*P + 4*jr + k)


@functools.cache
def _plane_gather_index(b: int, device: torch.device) -> Tensor:
    """For each record position 64*row + col, its index among a b-bit plane's fields (word-major, each word's
    fields in bit order): the inverse of `_plane_order`, as an int64 (1024,) index."""
    pos = torch.arange(ROWS * COLS).reshape(1, 1, ROWS, COLS)
    return _plane_order(pos, b).reshape(-1).argsort().to(device)


def _plane_fields(words: Tensor, b: int) -> Tensor:
    """b-bit plane words int32 (..., n) -> their fields uint8 (..., n * 32/b) in bit order (field f = bits
    [b*f, b*f + b)). Works on bytes (a field never crosses one): four times less traffic than int32 shifts."""
    mask = (1 << b) - 1
    if sys.byteorder == "little":
        by = words.contiguous().view(torch.uint8)  # (..., 4n): byte k of word w at 4w + k
    else:  # pragma: no cover - big-endian hosts
        by = torch.stack([(words >> (8 * k)) & 0xFF for k in range(4)], dim=-1).flatten(-2).to(torch.uint8)
    shifts = torch.arange(0, 8, b, dtype=torch.uint8, device=words.device)  # (8/b,)
    return ((by.unsqueeze(-1) >> shifts) & mask).flatten(-2)  # (..., 4n * 8/b)


def unpack_code_blocks(tiles: Tensor, wbits: int) -> Tensor:
    """The codes of records (RT, KB, R) as uint8 (RT, KB, 16, 64): record row, stored column within the
    k-block. One gather (no loop over records)."""
    rt, kb = tiles.shape[:2]
    if wbits == 3:
        return _unpack_code3(tiles[..., :96])
    return decode_plane(tiles[..., : 32 * wbits], wbits).reshape(rt, kb, ROWS, COLS)


def decode_plane(words: Tensor, b: int) -> Tensor:
    """The codes of a b-bit plane (b = 1, 2, 4; words int32 (RT, KB, 32*b) in `_plane_order`) as uint8
    (RT, KB, 1024) in record position order 64*row + col."""
    rt, kb = words.shape[:2]
    fields = _plane_fields(words, b).reshape(rt * kb, ROWS * COLS)
    idx = _plane_gather_index(b, words.device).expand(rt * kb, ROWS * COLS)
    return torch.gather(fields, 1, idx).reshape(rt, kb, ROWS * COLS)


def _field_shifts(b: int, device: torch.device) -> Tensor:
    """Bit position of each of the 32/b fields of a b-bit plane word: 16*c + b*p for field c*P + p."""
    p = torch.arange(16 // b, device=device) * b
    return torch.cat([p, p + 16])  # (32/b,)


def _stat_order(scale_codes: Tensor, zero_codes: Tensor, rt: int, kb: int) -> Tensor:
    """Padded stat codes (RT*16, KB*4) x2 -> (RT, KB, 128) in record order 16*g + 4*t + 2*kind + rh."""
    s = torch.stack([scale_codes, zero_codes])  # (kind, RT*16, KB*4)
    s = s.reshape(2, rt, 2, 8, kb, 4)  # (kind, RT, rh, g, KB, t)
    return s.permute(1, 4, 3, 5, 0, 2).reshape(rt, kb, 128)  # (RT, KB, g, t, kind, rh)


def _stat_unorder(s: Tensor, rt: int, kb: int) -> tuple[Tensor, Tensor]:
    """Inverse of `_stat_order`: (RT, KB, 128) -> scale, zero codes (RT*16, KB*4)."""
    s = s.reshape(rt, kb, 8, 4, 2, 2).permute(4, 0, 5, 2, 1, 3)  # (kind, RT, rh, g, KB, t)
    s = s.reshape(2, rt * ROWS, kb * GROUPS_PER_BLOCK)
    return s[0], s[1]


def _check_codes(x: Tensor, bits: int, name: str) -> Tensor:
    """Integer tensor with values in [0, 2**bits) -> uint8; ValueError naming `name` otherwise."""
    if x.dtype.is_floating_point or x.dtype == torch.bool:
        raise ValueError(f"{name} must be an integer tensor, got {x.dtype}")
    if x.numel() and (int(x.min()) < 0 or int(x.max()) >= 1 << bits):
        raise ValueError(f"{name} must lie in [0, {1 << bits}) for {bits}-bit codes")
    return x.to(torch.uint8)


def pack(
    codes: Tensor, scale_codes: Tensor, zero_codes: Tensor, second: Tensor, wbits: int, stat_bits: int
) -> Tensor:
    """Pack one SpQR linear's dense part into v2 records.

    Args:
        codes: (out, in) integer codes in [0, 2**wbits), stored (permuted) column order (uint8 preferred).
        scale_codes, zero_codes: (out, ceil(in/16)) integer first-order stat codes in [0, 2**stat_bits).
        second: (ceil(out/16), ceil(in/16), 4) fp16 [s_scale, z_scale, s_zero, z_zero] per 16 x 16 group.
        wbits: 2, 3 or 4. stat_bits: 1..8.

    Returns:
        tiles: int32 (RT, KB, R) with RT = ceil(out/16), KB = ceil(in/64), R = record_words(wbits, stat_bits).

    Raises ValueError on inconsistent shapes or out-of-range codes. Vectorized: no loop over records.
    """
    r = record_words(wbits, stat_bits)
    out, in_ = codes.shape
    groups = -(-in_ // GROUP)
    rt, kb = -(-out // ROWS), -(-in_ // COLS)
    if scale_codes.shape != (out, groups) or zero_codes.shape != (out, groups):
        raise ValueError(
            f"scale_codes/zero_codes must be ({out}, {groups}), got {tuple(scale_codes.shape)} "
            f"and {tuple(zero_codes.shape)}"
        )
    if second.shape != (rt, groups, 4):
        raise ValueError(f"second must be ({rt}, {groups}, 4), got {tuple(second.shape)}")
    codes = _check_codes(codes, wbits, "codes")
    sc = _check_codes(scale_codes, stat_bits, "scale_codes")
    zc = _check_codes(zero_codes, stat_bits, "zero_codes")
    dev = codes.device
    tiles = torch.empty(rt, kb, r, dtype=torch.int32, device=dev)

    # codes: pad to whole records, (RT, KB, 16, 64)
    c = F.pad(codes, (0, kb * COLS - in_, 0, rt * ROWS - out))  # (RT*16, KB*64) uint8
    block = c.reshape(rt, ROWS, kb, COLS).transpose(1, 2)  # (RT, KB, 16, 64) view
    if wbits == 3:
        tiles[..., :96] = pack_code3(block)
    else:
        fields = _plane_order(block, wbits)  # (RT, KB, 32b, 32/b) uint8
        words = torch.zeros(rt, kb, 32 * wbits, dtype=torch.int64, device=dev)
        for f, shift in enumerate(_field_shifts(wbits, dev).tolist()):  # at most 16 fields, each vectorized
            words |= fields[..., f].long() << shift
        tiles[..., : 32 * wbits] = to_int32_bits(words)

    # stats: one little-endian bit string of 128 codes per record
    pad_s = (0, kb * GROUPS_PER_BLOCK - groups, 0, rt * ROWS - out)
    s = _stat_order(F.pad(sc, pad_s), F.pad(zc, pad_s), rt, kb)  # (RT, KB, 128)
    s0 = 32 * wbits
    tiles[..., s0 : s0 + 4 * stat_bits] = pack_bits(s.cpu(), stat_bits).to(dev)

    # second: 16 fp16 per record, half 2n in the low 16 bits of word n (endian-independent)
    sec = F.pad(second.half(), (0, 0, 0, kb * GROUPS_PER_BLOCK - groups))  # (RT, KB*4, 4)
    tiles[..., s0 + 4 * stat_bits :] = halves_to_words(sec.reshape(rt, kb, 16))
    return tiles


def halves_to_words(h: Tensor) -> Tensor:
    """fp16 (..., 2n) -> int32 (..., n): half 2i in the low 16 bits of word i (any host byte order)."""
    b = h.half().contiguous().view(torch.int16).long() & 0xFFFF
    b = b.reshape(*h.shape[:-1], h.shape[-1] // 2, 2)  # (..., n, 2)
    return to_int32_bits(b[..., 0] | (b[..., 1] << 16))


def unpack(
    tiles: Tensor, out: int, in_: int, wbits: int, stat_bits: int
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Exact inverse of `pack`, cropped to `out` x `in_`.

    Args:
        tiles: int32 (RT, KB, R) records; RT may cover only some row tiles (then `out` <= 16*RT counts the
            rows wanted from the first one on), KB = ceil(in_/64).

    Returns:
        codes (out, in_) uint8, scale_codes (out, ceil(in_/16)) uint8, zero_codes (same) uint8,
        second (RT, ceil(in_/16), 4) fp16.
    """
    r = record_words(wbits, stat_bits)
    rt, kb = tiles.shape[:2]
    if tiles.shape[2] != r or kb != -(-in_ // COLS) or not 0 <= out <= rt * ROWS:
        raise ValueError(
            f"tiles {tuple(tiles.shape)} do not fit a {out}x{in_} linear (wbits {wbits}, stat_bits {stat_bits})"
        )
    groups = -(-in_ // GROUP)
    block = unpack_code_blocks(tiles, wbits)  # (RT, KB, 16, 64)
    codes = block.transpose(1, 2).reshape(rt * ROWS, kb * COLS)[:out, :in_]

    s0 = 32 * wbits
    s = unpack_bits(tiles[..., s0 : s0 + 4 * stat_bits].contiguous(), stat_bits, torch.uint8)  # (RT, KB, 128)
    sc, zc = _stat_unorder(s, rt, kb)

    w = tiles[..., s0 + 4 * stat_bits :].long() & 0xFFFFFFFF  # (RT, KB, 8)
    h = torch.stack([w & 0xFFFF, w >> 16], dim=-1)  # (RT, KB, 8, 2) uint16 values
    h = torch.where(h > 0x7FFF, h - 0x10000, h).to(torch.int16).view(torch.float16)
    second = h.reshape(rt, kb * GROUPS_PER_BLOCK, 4)[:, :groups]
    return (
        codes.contiguous(),
        sc[:out, :groups].contiguous(),
        zc[:out, :groups].contiguous(),
        second.contiguous(),
    )


def pack_outliers(row_ptr: Tensor, cols: Tensor, values: Tensor, out: int) -> tuple[Tensor, Tensor]:
    """CSR outliers -> v2 outlier words and row pointers over the padded rows.

    Args:
        row_ptr: (out+1,) integer CSR pointers (entries sorted by row, then column).
        cols: (nnz,) stored column indices in [0, 65536): int64, or int16 holding unsigned bit patterns.
        values: (nnz,) fp16 deltas.
        out: rows of the linear.

    Returns:
        outliers int32 (nnz,) = fp16 bits | column << 16 (as int32 bit patterns);
        row_ptr int32 (RT*16 + 1,), RT = ceil(out/16): the padding rows hold no outliers.
    """
    if row_ptr.shape != (out + 1,) or cols.shape != values.shape or cols.ndim != 1:
        raise ValueError("pack_outliers needs row_ptr (out+1,) and cols, values of the same (nnz,) shape")
    if cols.dtype != torch.int16 and cols.numel() and (int(cols.min()) < 0 or int(cols.max()) > 0xFFFF):
        raise ValueError("outlier columns must lie in [0, 65536)")
    c = cols.long() & 0xFFFF
    v = values.half().contiguous().view(torch.int16).long() & 0xFFFF
    rows_padded = -(-out // ROWS) * ROWS
    ptr = torch.cat([row_ptr.long(), row_ptr[-1:].long().expand(rows_padded - out)])
    return to_int32_bits(v | (c << 16)), ptr.to(torch.int32)


def unpack_outliers(outliers: Tensor, row_ptr: Tensor, out: int) -> tuple[Tensor, Tensor, Tensor]:
    """Inverse of `pack_outliers`: -> row_ptr int32 (out+1,), cols int64 (nnz,), values fp16 (nnz,)."""
    w = outliers.long() & 0xFFFFFFFF
    cols = w >> 16
    v = w & 0xFFFF
    values = torch.where(v > 0x7FFF, v - 0x10000, v).to(torch.int16).view(torch.float16)
    return row_ptr[: out + 1].to(torch.int32), cols, values
