"""Reading `.spqr` format 2 spqr linears: the 3-bit code order converted, exactly, to format 3.

Format 2 differed from format 3 only in where a 3-bit record keeps its codes (everything else, and every 2-
and 4-bit record, is the same bit for bit): words 0..63 were a 2-bit plane of the codes' bits 0-1 (the layout
of a 2-bit record: lane L at words 2L, 2L+1, tile j's a{k} pair at bits 2*(4*(j mod 2) + k) of word
2L + j // 2) and words 64..95 a 1-bit plane of bit 2 (lane L at word 64 + L, pair at bit
8*(j mod 2) + 4*(k // 2) + 2*(1 - j // 2) + (k mod 2), plus 16 for the .y code). The converter decodes those
planes to the codes and packs them again (`tile_layout.pack` order), leaving the other words untouched.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from spqr_run.quant import tile_layout
from spqr_run.quant.meta import LinearMeta
from spqr_run.quant.packing import to_int32_bits


def v2_high_bit_position(j: int, k: int) -> int:
    """Format 2, 3-bit records: the bit (of the low half) holding bit 2 of tile j's a{k} .x code in lane word
    64 + L."""
    return 8 * (j % 2) + 4 * (k // 2) + 2 * (1 - j // 2) + k % 2


def v2_code3_blocks(tiles: Tensor) -> Tensor:
    """The 3-bit codes of format 2 records int32 (RT, KB, R) as uint8 (RT, KB, 16, 64)."""
    rt, kb = tiles.shape[:2]
    low = tile_layout.decode_plane(tiles[..., :64], 2)  # (RT, KB, 1024): bits 0-1
    high = tiles[..., 64:96].long() & 0xFFFFFFFF  # (RT, KB, 32 lanes)
    words = torch.zeros_like(high)  # the 1-bit plane in the generic plane order: field 16c + 4j + k
    for c in range(2):
        for j in range(4):
            for k in range(4):
                words |= ((high >> (16 * c + v2_high_bit_position(j, k))) & 1) << (16 * c + 4 * j + k)
    high_codes = tile_layout.decode_plane(to_int32_bits(words), 1)
    return (low | (high_codes << 2)).reshape(rt, kb, tile_layout.ROWS, tile_layout.COLS)


def convert_v2_tiles(tiles: Tensor, wbits: int) -> Tensor:
    """Format 2 records int32 (RT, KB, R) -> format 3 records (a new tensor for wbits 3, else `tiles`)."""
    if wbits != 3:
        return tiles
    converted = tiles.clone()
    converted[..., :96] = tile_layout.pack_code3(v2_code3_blocks(tiles))
    return converted


def convert_v2_tensors(tensors: Mapping[str, Tensor], meta: LinearMeta) -> dict[str, Tensor]:
    """A format 2 linear's tensors -> format 3 (only 3-bit spqr `tiles` change). Tiles of a wrong dtype or
    shape are passed on unchanged: `QuantizedLinear.from_tensors` then names what is wrong."""
    converted = dict(tensors)
    tiles = tensors.get("tiles")
    if (
        meta.method == "spqr"
        and meta.wbits == 3
        and isinstance(tiles, Tensor)
        and tiles.dtype == torch.int32
        and tiles.ndim == 3
        and tiles.shape[2] == tile_layout.record_words(3, meta.stat_bits)
    ):
        converted["tiles"] = convert_v2_tiles(tiles, 3)
    return converted
