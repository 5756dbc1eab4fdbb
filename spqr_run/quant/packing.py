"""Bit-level packing primitives shared by every packed layout (see docs/FORMAT.md).

Codes of `b` bits are packed 32 at a time into `b` 32-bit words with no wasted bit: code `k` of a chunk
occupies bits `[k*b, (k+1)*b)` of the little-endian 32*b-bit number `word0 | word1 << 32 | ...`, so a 3-bit
code may straddle two words (codes 10 and 21 of each chunk). Words are stored as int32 bit patterns because
int32 is what every framework, safetensors and CUDA handle natively.

Sparse outliers are CSR: int32 row pointers, column indices as *unsigned* 16-bit numbers stored in an int16
tensor (bit pattern), fp16 values.
"""

from __future__ import annotations

import torch
from torch import Tensor

CHUNK = 32  # codes per packed chunk; a chunk of b-bit codes is exactly b words
MAX_COLUMN_INDEX = 0xFFFF  # unsigned 16-bit column indices: in_features <= 65536


def pack_bits(codes: Tensor, bits: int) -> Tensor:
    """Pack integer codes (..., n) in [0, 2**bits) into int32 words (..., n*bits/32); n % 32 == 0."""
    n = codes.shape[-1]
    if n % CHUNK:
        raise ValueError(f"pack_bits needs a multiple of {CHUNK} codes, got {n}")
    codes = codes.long()
    shifts = torch.arange(bits, device=codes.device)
    stream = (codes.unsqueeze(-1) >> shifts) & 1  # (..., n, bits): one bit per entry, LSB first
    stream = stream.reshape(*codes.shape[:-1], n * bits // 32, 32)  # (..., words, 32)
    words = (stream << torch.arange(32, device=codes.device)).sum(dim=-1)  # (..., words) in [0, 2**32)
    return to_int32_bits(words)


def unpack_bits(words: Tensor, bits: int) -> Tensor:
    """Inverse of `pack_bits`: int32 words (..., m) -> int64 codes (..., m*32/bits); m % bits == 0."""
    m = words.shape[-1]
    if m % bits:
        raise ValueError(f"unpack_bits needs a multiple of {bits} words, got {m}")
    w64 = words.long() & 0xFFFFFFFF
    w64 = w64.reshape(*words.shape[:-1], m // bits, bits)  # (..., chunks, bits)
    w64 = torch.nn.functional.pad(w64, (0, 1))  # (..., chunks, bits + 1): a zero word for the last code
    offsets = torch.arange(CHUNK, device=words.device) * bits  # (32,) bit offset of each code
    lo = w64[..., offsets // 32]  # (..., chunks, 32) word holding the code's first bit
    hi = w64[..., offsets // 32 + 1]  # (..., chunks, 32) next word, for codes straddling a boundary
    codes = ((lo | (hi << 32)) >> (offsets % 32)) & ((1 << bits) - 1)
    return codes.reshape(*words.shape[:-1], m // bits * CHUNK)


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
