"""The v2 packed layout of an SpQR linear: one record per 16 rows x 64 stored columns, in mma fragment order.

This module is the single source of truth for where every code, statistic and outlier of an SpQR linear sits
in `.spqr` format version 2 (docs/FORMAT.md, "SpQR layout"; the contract is KERNELS_V2_SPEC.md section 2).

A linear `out x in` is cut into RT = ceil(out/16) row tiles and KB = ceil(in/64) k-blocks; record (rt, kb)
covers rows 16*rt .. +15 and stored columns 64*kb .. +63 = four 16 x 16 groups j = 0..3 (one SpQR group of
one row tile each, i.e. exactly one A operand of `mma.sync.m16n8k16`). Padding rows/columns hold code 0,
stat codes 0 and second-order numbers 0. `tiles` is int32 (RT, KB, R), R = `record_words(wbits, stat_bits)`.

One record (word offsets; wbits = 3, stat_bits = 3: R = 116 words = 464 bytes)::

    word 0                    64                 96           108        116
    +-------------------------+------------------+------------+----------+
    | codes, low plane (bits  | codes, high      | stats:     | second:  |
    | 0-1): lane L at 2L, 2L+1| plane (bit 2):   | 128 codes  | 16 fp16  |
    | word w = tiles 2w, 2w+1 | lane L at 64+L   | x 3 bits   | [ss zs sz zz] x group 0..3
    +-------------------------+------------------+------------+----------+
    wbits = 4: 128 words, lane L's 4 words at 4L (word j = tile j); wbits = 2: 64 words at 2L, 2L+1.

Lane L (g = L >> 2, t = L & 3) owns, in each 16 x 16 tile, the PTX ISA A fragment a0 = (row g, cols 2t,
2t+1), a1 = (row g+8, same cols), a2 = (row g, cols 2t+8, 2t+9), a3 = (row g+8, cols 2t+8, 2t+9). In a code
word of a plane with b bits per code (P = 16/b pairs per word), pair p has its .x (lower column) code at bits
[b*p, b*p+b) and its .y code at bits [16+b*p, 16+b*p+b); tile j's a0..a3 are pairs p = 4*(j mod (P/4)) + k
in the 4- and 2-bit planes, and p = 8*(j mod 2) + 4*(k >> 1) + 2*(1 - (j >> 1)) + (k mod 2) in the 1-bit
plane of wbits = 3 (`pair_position`): there the high bit of low-plane pair p_l = 2q + o of low word w sits at
bit 4q + 2*(1 - w) + o, so one select (LOP3, mask 0x33333333) of low word w shifted right by 2*o with the high
word shifted right by o - 2*w (left when negative) gives a word whose nibble q holds the whole 3-bit code of
pair 2q + o in its bits 0-2 (the decoder in kernels/spqr_matmul.cu).

One lane's word for wbits = 4, tile j (x/y = codes of columns c, c+1)::

    bit 31          24          16 15           8           0
        | a3.y| a2.y| a1.y| a0.y | a3.x| a2.x| a1.x| a0.x |       (w >> 4p) & 0x000F000F = pair p
                                                                  in the low bits of both halves

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


def code_planes(wbits: int) -> list[tuple[int, int, int]]:
    """The code planes of a record: (bits per code b, lowest code bit held, first word) for each plane.

    wbits 4 -> one 4-bit plane, 2 -> one 2-bit plane, 3 -> a 2-bit plane of bits 0-1 (words 0..63) and a
    1-bit plane of bit 2 (words 64..95), so no code straddles a word.
    """
    return {4: [(4, 0, 0)], 2: [(2, 0, 0)], 3: [(2, 0, 0), (1, 2, 64)]}[wbits]


def pair_position(b: int, j: int, k: int) -> int:
    """Pair index p (bits [b*p, b*p + b) of each half) of tile j's fragment register a{k} in its b-bit plane word.

    4- and 2-bit planes: 4*(j mod (P/4)) + k (P = 16/b). 1-bit plane (bit 2 of 3-bit codes): 8*(j mod 2) +
    4*(k >> 1) + 2*(1 - (j >> 1)) + (k mod 2), the position that lines the high bit up with its low-plane pair
    (module docstring).
    """
    if b == 1:
        return 8 * (j % 2) + 4 * (k >> 1) + 2 * (1 - (j >> 1)) + (k % 2)
    return 4 * (j % (16 // b // 4)) + k


def _high_plane_index(device: torch.device) -> Tensor:
    """Field permutation of the 1-bit plane: new field c*16 + pair_position(1, j, k) takes old field
    c*16 + 4*j + k (the order `_plane_order` produces)."""
    src = torch.empty(32, dtype=torch.long)
    for c in range(2):
        for j in range(4):
            for k in range(4):
                src[16 * c + pair_position(1, j, k)] = 16 * c + 4 * j + k
    return src.to(device)


def _plane_order(block: Tensor, b: int) -> Tensor:
    """Codes of records (RT, KB, 16, 64) -> (RT, KB, 32*b words, 32/b fields) in a b-bit plane's order.

    Field f of a word = c*P + p (c = 0: .x, 1: .y; P = 16/b pairs); the field sits at bit 16*c + b*p.
    Record row = g + 8*rh, column = 16*j + 8*ch + 2*t + c; fragment k = rh + 2*ch; j = jw*(4/b) + jr;
    word = b*L + jw with L = 4*g + t; pair p = 4*jr + k = 4*jr + 2*ch + rh for the 4- and 2-bit planes,
    p = `pair_position(1, j, k)` for the 1-bit plane.
    """
    rt, kb = block.shape[:2]
    tpw = 4 // b  # tiles per word
    x = block.reshape(rt, kb, 2, 8, b, tpw, 2, 4, 2)  # (RT, KB, rh, g, jw, jr, ch, t, c)
    x = x.permute(0, 1, 3, 7, 4, 8, 5, 6, 2)  # (RT, KB, g, t, jw, c, jr, ch, rh)
    x = x.reshape(rt, kb, 32 * b, 32 // b)  # (RT, KB, words, fields c*P + 4*jr + k)
    return x[..., _high_plane_index(x.device)] if b == 1 else x


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
    k-block. One gather per plane (no loop over records)."""
    rt, kb = tiles.shape[:2]
    block = None
    for b, low_bit, w0 in code_planes(wbits):
        fields = _plane_fields(tiles[..., w0 : w0 + 32 * b], b).reshape(rt * kb, ROWS * COLS)
        idx = _plane_gather_index(b, tiles.device).expand(rt * kb, ROWS * COLS)
        plane = torch.gather(fields, 1, idx)  # (RT*KB, 1024) in record position order
        block = plane if block is None else block.bitwise_or_(plane << low_bit)
    return block.reshape(rt, kb, ROWS, COLS)


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
    for b, low_bit, w0 in code_planes(wbits):
        fields = _plane_order(block, b)  # (RT, KB, 32b, 32/b) uint8
        mask = (1 << b) - 1
        words = torch.zeros(rt, kb, 32 * b, dtype=torch.int64, device=dev)
        for f, shift in enumerate(_field_shifts(b, dev).tolist()):  # at most 32 fields, each vectorized
            words |= ((fields[..., f].long() >> low_bit) & mask) << shift
        tiles[..., w0 : w0 + 32 * b] = to_int32_bits(words)

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
