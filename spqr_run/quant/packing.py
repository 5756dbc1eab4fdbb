"""Bit-level packing primitives shared by every packed layout (see docs/FORMAT.md).

Codes of `b` bits are packed 32 at a time into `b` 32-bit words with no wasted bit: code `k` of a chunk
occupies bits `[k*b, (k+1)*b)` of the little-endian 32*b-bit number `word0 | word1 << 32 | ...`, so a 3-bit
code may straddle two words (codes 10 and 21 of each chunk). Words are stored as int32 bit patterns because
int32 is what every framework, safetensors and CUDA handle natively.

Sparse outliers are CSR: int32 row pointers, column indices as *unsigned* 16-bit numbers stored in an int16
tensor (bit pattern), fp16 values.
"""

from __future__ import annotations

import sys

import numpy as np
import torch
from torch import Tensor

CHUNK = 32  # codes per packed chunk; a chunk of b-bit codes is exactly b words
MAX_COLUMN_INDEX = 0xFFFF  # unsigned 16-bit column indices: in_features <= 65536


def _chunk_layout(bits: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """For the 32 codes of a chunk: index of the word holding each code's first bit, and its bit offset."""
    offsets = torch.arange(CHUNK, device=device) * bits  # (32,)
    return offsets // 32, offsets % 32


def pack_bits(codes: Tensor, bits: int) -> Tensor:
    """Pack integer codes (..., n) in [0, 2**bits) into int32 words (..., n*bits/32); n % 32 == 0."""
    n = codes.shape[-1]
    if n % CHUNK:
        raise ValueError(f"pack_bits needs a multiple of {CHUNK} codes, got {n}")
    if codes.device.type == "cpu" and sys.byteorder == "little":
        return _pack_bits_numpy(codes, bits)
    return _pack_bits_torch(codes, bits)


def _pack_bits_numpy(codes: Tensor, bits: int) -> Tensor:
    """`pack_bits` for CPU tensors on little-endian hosts (several times faster than the torch version).

    The words of a row are one little-endian bit stream with code k at bits [k*b, (k+1)*b): spell every
    code's bits out LSB first and let NumPy pack the stream, then read it as int32 words.
    """
    lead, n = codes.shape[:-1], codes.shape[-1]
    bit = np.arange(bits, dtype=np.uint8)
    stream = (codes.numpy().astype(np.uint8)[..., None] >> bit) & 1  # (..., n, bits)
    packed = np.packbits(stream.reshape(*lead, n * bits), axis=-1, bitorder="little")
    return torch.from_numpy(np.ascontiguousarray(packed).view(np.int32))  # (..., n*bits/32)


def _pack_bits_torch(codes: Tensor, bits: int) -> Tensor:
    """`pack_bits` with torch ops only (any device, any byte order)."""
    lead, n = codes.shape[:-1], codes.shape[-1]
    word, shift = _chunk_layout(bits, codes.device)
    placed = codes.long().reshape(*lead, n // CHUNK, CHUNK) << shift  # (..., chunks, 32) < 2**40
    # The codes' bit ranges are disjoint, so summing them into their words is the same as OR-ing them;
    # the bits of a code that straddles a word boundary (shift + bits > 32) go to the next word.
    words = torch.zeros(*lead, n // CHUNK, bits + 1, dtype=torch.int64, device=codes.device)
    words.index_add_(-1, word, placed & 0xFFFFFFFF)
    words.index_add_(-1, word + 1, placed >> 32)
    return to_int32_bits(words[..., :bits]).reshape(*lead, n * bits // 32)


def unpack_bits(words: Tensor, bits: int, dtype: torch.dtype = torch.int64) -> Tensor:
    """Inverse of `pack_bits`: int32 words (..., m) -> codes (..., m*32/bits) of `dtype`; m % bits == 0.

    Works on int32 words (int64 only for >= 5-bit groups); `>>` is an arithmetic shift, so every extracted
    field is masked to its own bits.
    """
    m = words.shape[-1]
    if m % bits:
        raise ValueError(f"unpack_bits needs a multiple of {bits} words, got {m}")
    words = words.to(torch.int32)
    lead = words.shape[:-1]
    mask = (1 << bits) - 1
    if CHUNK % bits == 0:  # 1, 2, 4, 8 bits: no code straddles a word, word w holds codes w*32/bits...
        shifts = torch.arange(0, 32, bits, dtype=torch.int32, device=words.device)  # (32/bits,)
        codes = (words.unsqueeze(-1) >> shifts).bitwise_and_(mask)  # (..., m, 32/bits)
        return codes.reshape(*lead, m * 32 // bits).to(dtype)
    # Other widths: 8 codes fill exactly `bits` bytes of the little-endian stream; read each such group of
    # bytes as one integer (<= 56 bits) and shift the 8 codes out of it.
    stream = words.view(torch.uint8)  # (..., 4m), the stream's bytes on a little-endian host
    if sys.byteorder != "little":
        stream = stream.reshape(*lead, m, 4).flip(-1).reshape(*lead, 4 * m)
    stream = stream.reshape(*lead, 4 * m // bits, bits)  # (..., groups of 8 codes, bits bytes)
    wide = torch.int32 if bits <= 3 else torch.int64
    value = stream[..., 0].to(wide)
    for i in range(1, bits):
        value |= stream[..., i].to(wide) << (8 * i)
    shifts = torch.arange(0, 8 * bits, bits, dtype=wide, device=words.device)  # (8,)
    codes = (value.unsqueeze(-1) >> shifts).bitwise_and_(mask)  # (..., groups, 8)
    return codes.reshape(*lead, m // bits * CHUNK).to(dtype)


def to_int32_bits(x: Tensor) -> Tensor:
    """Values in [0, 2**32) (int64) -> int32 tensor with the same bit pattern."""
    x = x.long()
    return torch.where(x >= 2**31, x - 2**32, x).to(torch.int32)


def encode_columns(cols: Tensor) -> Tensor:
    """Column indices in [0, 65535] -> int16 tensor holding their unsigned 16-bit pattern."""
    cols = cols.long()
    return torch.where(cols > 0x7FFF, cols - 0x10000, cols).to(torch.int16)


def decode_columns(cols16: Tensor) -> Tensor:
    """Inverse of `encode_columns`: int16 bit patterns -> int64 indices in [0, 65535]."""
    return cols16.long() & 0xFFFF


def coo_to_csr(rows: Tensor, cols: Tensor, values: Tensor, num_rows: int) -> tuple[Tensor, Tensor, Tensor]:
    """(rows, cols, values) of nnz entries -> (row_ptr int32 (num_rows+1,), cols int16 (nnz,), values fp16).

    Entries are sorted by (row, column); columns must already be < 65536.
    """
    rows, cols = rows.long(), cols.long()
    order = torch.argsort(rows * (MAX_COLUMN_INDEX + 1) + cols)
    counts = torch.bincount(rows, minlength=num_rows)  # (num_rows,)
    row_ptr = torch.zeros(num_rows + 1, dtype=torch.int64, device=rows.device)
    row_ptr[1:] = torch.cumsum(counts, dim=0)
    return row_ptr.to(torch.int32), encode_columns(cols[order]), values[order].half()


def csr_rows(row_ptr: Tensor) -> Tensor:
    """Row index (int64) of every stored entry, from CSR row pointers (num_rows+1,)."""
    counts = (row_ptr[1:] - row_ptr[:-1]).long()
    return torch.repeat_interleave(torch.arange(len(counts), device=row_ptr.device), counts)
