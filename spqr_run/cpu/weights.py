"""Weights as the native CPU kernels hold them: the CPU layout of an SpQR linear (repacked at load from the
file's records), int8 rows for the embedding / LM head, and dense fp32 / fp16 matrices.

Each `NativeWeight` owns its tensors and the `spqr_weight` struct that points into them, so the struct stays
valid while the object lives. The CPU layout (docs/FORMAT.md, "CPU layout"; kernels/cpu/spqr_internal.h)
holds the same code bits as the file, nibble stat codes (+0.125 bits per weight over 3-bit stats), the same
fp16 second-order numbers, and outliers as uint16 columns + fp32 values (6 bytes instead of 4, so that adding
them costs three loads and an fma): 2.7% (4-bit codes) to 4.8% (2-bit) more bytes than the stored records,
plus 2 bytes an outlier.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from spqr_run.cpu import lib as native
from spqr_run.quant import tile_layout
from spqr_run.quant.quantized import QuantizedLinear

ROWS, KCOLS = 16, 64


def stat_group_bytes(stat_bits: int) -> int:
    return 16 if stat_bits <= 4 else 32


def stat_block_bytes(stat_bits: int) -> int:
    """Bytes of one k-block's stat section: 4 groups of stat codes + 16 fp16 second-order numbers."""
    return 4 * stat_group_bytes(stat_bits) + 32


@dataclass
class NativeWeight:
    """One weight matrix for the native kernels: its tensors and the C struct viewing them."""

    struct: native.Weight
    tensors: dict[str, Tensor]  # kept alive: the struct points into them

    @property
    def out_features(self) -> int:
        return int(self.struct.out_features)

    @property
    def in_features(self) -> int:
        return int(self.struct.in_features)

    @property
    def nbytes(self) -> int:
        """Bytes this weight holds (what a decode step reads, plus bias and indices)."""
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    def matmul(self, x: Tensor) -> Tensor:
        """x (..., in) fp32 -> (..., out) fp32 on the native kernels (bias included)."""
        lib = native.load()
        assert lib is not None
        if x.dtype != torch.float32:
            raise TypeError(f"the native CPU kernels take fp32 activations, got {x.dtype}")
        if x.shape[-1] != self.in_features:
            raise ValueError(f"input has {x.shape[-1]} features, the layer expects {self.in_features}")
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        if x2.stride(-1) != 1:
            x2 = x2.contiguous()
        y = torch.empty(x2.shape[0], self.out_features, dtype=torch.float32)
        rc = lib.spqr_cpu_matmul(
            self.struct, x2.data_ptr(), x2.stride(0), y.data_ptr(), y.stride(0), x2.shape[0]
        )
        if rc != 0:
            raise RuntimeError("spqr_cpu_matmul failed")
        return y.reshape(*lead, self.out_features)


def _ptr(t: Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _bias(bias: Tensor | None) -> Tensor | None:
    return None if bias is None else bias.detach().to(torch.float32).contiguous()


def spqr_weight(
    q: QuantizedLinear, bias: Tensor | None = None, *, act_residual: bool = False
) -> NativeWeight:
    """Repack an spqr `QuantizedLinear` (format 3 records) into the CPU layout (native, on the pool).

    `act_residual`: the kernel also runs a second int8 pass over the activations' rounding residual (4 more
    integer dot products a group and row), for inputs where int8 activations cost measurable perplexity.

    Raises ValueError for a gptq/rtn layout or bit widths the kernels lack (wbits 2-4, stat_bits 1-8)."""
    lib = native.load()
    assert lib is not None
    m = q.meta
    if m.method != "spqr" or m.wbits not in (2, 3, 4) or not 1 <= m.stat_bits <= 8:
        raise ValueError(f"no CPU kernel for method {m.method} with wbits {m.wbits}, stat_bits {m.stat_bits}")
    tiles = q.tiles.contiguous()
    rt, kb = tiles.shape[:2]
    codes = torch.empty(rt, kb, 128 * m.wbits, dtype=torch.uint8)
    stats = torch.empty(rt, kb, stat_block_bytes(m.stat_bits), dtype=torch.uint8)
    if lib.spqr_cpu_repack(
        tiles.data_ptr(), rt, kb, m.wbits, m.stat_bits, codes.data_ptr(), stats.data_ptr()
    ):
        raise ValueError(f"spqr_cpu_repack refused wbits {m.wbits}, stat_bits {m.stat_bits}")
    words = q.outliers.long() & 0xFFFFFFFF  # (nnz,) fp16 delta | column << 16
    halves = (words & 0xFFFF).to(torch.int32).to(torch.int16)  # wraps to the 16-bit pattern
    tensors = {
        "codes": codes,
        "stats": stats,
        "outlier_cols": (words >> 16).to(torch.int32).to(torch.int16).contiguous(),  # unsigned 16-bit
        "outlier_vals": halves.view(torch.float16).float().contiguous(),  # exact
        # copies, so that no tensor keeps the file's memory map (and its resident pages) alive
        "outlier_row_ptr": q.outlier_row_ptr.clone(memory_format=torch.contiguous_format),
    }
    if q.perm is not None:  # unsigned 16-bit column indices, as stored (int16 bit patterns)
        tensors["perm"] = q.perm.clone(memory_format=torch.contiguous_format)
    b = _bias(bias)
    if b is not None:
        tensors["bias"] = b
    struct = native.Weight(
        kind=native.W_SPQR,
        out_features=m.out_features,
        in_features=m.in_features,
        wbits=m.wbits,
        stat_bits=m.stat_bits,
        row_tiles=rt,
        k_blocks=kb,
        act_residual=int(act_residual),
        codes=codes.data_ptr(),
        stats=stats.data_ptr(),
        outlier_cols=tensors["outlier_cols"].data_ptr(),
        outlier_vals=tensors["outlier_vals"].data_ptr(),
        outlier_row_ptr=tensors["outlier_row_ptr"].data_ptr(),
        perm=_ptr(tensors.get("perm")),
        bias=_ptr(b),
    )
    return NativeWeight(struct, tensors)


def dense_weight(w: Tensor, bias: Tensor | None = None) -> NativeWeight:
    """A dense (out, in) fp32 or fp16 matrix, row-major, used as it is (no copy when contiguous)."""
    if w.dtype not in (torch.float32, torch.float16) or w.dim() != 2:
        raise ValueError(f"dense weights must be 2-D fp32 or fp16, got {w.dtype} {tuple(w.shape)}")
    w = w.detach().contiguous()
    b = _bias(bias)
    tensors = {"dense": w} | ({"bias": b} if b is not None else {})
    struct = native.Weight(
        kind=native.W_F32 if w.dtype == torch.float32 else native.W_F16,
        out_features=w.shape[0],
        in_features=w.shape[1],
        dense=w.data_ptr(),
        bias=_ptr(b),
    )
    return NativeWeight(struct, tensors)


Q8_COLS = 64  # columns sharing one fp16 scale of a row


def q8_quantize(w: Tensor) -> tuple[Tensor, Tensor]:
    """w (out, in) -> codes int8 (out, in_pad) and fp16 scales (out, in_pad / 64): for each row and 64
    columns, scale = max |w| / 127 rounded to fp16, up to the next fp16 where rounding went below (so that no
    code clips: every |w - code * scale| <= scale / 2), and code = round(w / scale) (nearest even; 0 where
    the scale is 0). in_pad = in rounded up to 64 (padding codes 0). The kernels are tested against this."""
    out, in_ = w.shape
    pad = -in_ % Q8_COLS
    wb = torch.nn.functional.pad(w.float(), (0, pad)).reshape(out, -1, Q8_COLS)  # (out, KB, 64)
    amax = wb.abs().amax(-1)  # (out, KB)
    scale = (amax / 127).clamp_max(65504).half()
    low = scale.float() * 127 < amax  # rounded down: one fp16 step up (positive: the next bit pattern)
    scale = torch.where(low, (scale.view(torch.int16) + 1).view(torch.float16), scale)
    s = scale.float()[..., None]
    codes = torch.where(s > 0, torch.round(wb / torch.where(s > 0, s, 1)), 0).clamp(-127, 127)
    return codes.reshape(out, -1).to(torch.int8), scale


def q8_weight(w: Tensor) -> NativeWeight:
    """A dense (out, in) matrix in int8 with an fp16 scale per row and 64 columns (8.25 bits a weight;
    llama.cpp keeps its Q8_0 embedding with one per 32), in quads of 16 rows x 4 columns: the embedding /
    LM head. One scale per row instead costs +0.18% perplexity on SmolLM2 (BENCHMARKS.md "CPU decode").
    Quantized straight into that layout a chunk of row tiles at a time (a few MB of transients, never a second
    copy of the table). Rows are read back with `q8_rows`."""
    if w.dtype not in (torch.float32, torch.float16) or w.dim() != 2:
        raise ValueError(f"q8 weights are made from 2-D fp32 or fp16, got {w.dtype} {tuple(w.shape)}")
    out, in_ = w.shape
    rt, kb = -(-out // ROWS), -(-in_ // Q8_COLS)
    quads = torch.empty(rt, kb * 16, 64, dtype=torch.uint8)  # byte 4*r + c of quad q = row r, column 4q + c
    tile_scales = torch.zeros(rt, kb, ROWS, dtype=torch.float16)  # (RT, KB, 16)
    step = max(1, (1 << 22) // max(kb * Q8_COLS * ROWS, 1))  # row tiles a chunk: ~4M weights of transients
    for t0 in range(0, rt, step):
        t1 = min(rt, t0 + step)
        rows = w[t0 * ROWS : t1 * ROWS].detach()
        c, sc = q8_quantize(rows)  # (rows, KB*64) int8, (rows, KB) fp16
        pad = (t1 - t0) * ROWS - rows.shape[0]  # the last tile's padding rows: code 0 (byte 128), scale 0
        c = torch.nn.functional.pad(c, (0, 0, 0, pad)).to(torch.int16).add_(128).to(torch.uint8)
        quads[t0:t1] = c.reshape(t1 - t0, ROWS, kb * 16, 4).permute(0, 2, 1, 3).reshape(t1 - t0, kb * 16, 64)
        tile_scales[t0:t1] = (
            torch.nn.functional.pad(sc, (0, 0, 0, pad)).reshape(t1 - t0, ROWS, kb).transpose(1, 2)
        )
    struct = native.Weight(
        kind=native.W_Q8,
        out_features=out,
        in_features=in_,
        row_tiles=rt,
        k_blocks=kb,
        codes=quads.data_ptr(),
        scales=tile_scales.data_ptr(),
    )
    return NativeWeight(struct, {"codes": quads, "scales": tile_scales})


def q8_rows(w: NativeWeight, ids: Tensor) -> Tensor:
    """Rows `ids` (n,) int64 of a Q8 weight as fp32 (n, in): the embedding lookup."""
    lib = native.load()
    assert lib is not None
    ids = ids.to(torch.int64).contiguous()
    out = torch.empty(ids.numel(), w.in_features, dtype=torch.float32)
    lib.spqr_cpu_q8_rows(w.struct, ids.data_ptr(), ids.numel(), out.data_ptr())
    return out


# ---- the layout in torch: the specification the native repack is tested against --------------------------
def pack_cpu_layout(q: QuantizedLinear) -> tuple[Tensor, Tensor]:
    """The CPU layout (codes (RT, KB, 128*wbits), stats (RT, KB, stat block)) of an spqr linear, computed
    in torch from `tile_layout.unpack` (kernels/cpu/spqr_internal.h describes the bytes)."""
    m = q.meta
    b, sb = m.wbits, m.stat_bits
    rt, kb = q.tiles.shape[:2]
    codes, sc, zc, second = tile_layout.unpack(q.tiles, rt * ROWS, kb * KCOLS, b, sb)
    blocks = codes.reshape(rt, ROWS, kb, KCOLS).permute(0, 2, 1, 3).long()  # (RT, KB, 16, 64)
    quads = (
        blocks.reshape(rt, kb, ROWS, 16, 4).permute(0, 1, 3, 2, 4).reshape(rt, kb, 16, 64)
    )  # (.., quad, 4r+c)
    if b == 4:
        chunks = quads[:, :, 0::2] | (quads[:, :, 1::2] << 4)  # (RT, KB, 8, 64)
    elif b == 2:
        q4 = quads.reshape(rt, kb, 4, 4, 64)
        chunks = q4[:, :, :, 0] | (q4[:, :, :, 1] << 2) | (q4[:, :, :, 2] << 4) | (q4[:, :, :, 3] << 6)
    else:
        q8 = quads.reshape(rt, kb, 2, 8, 64)  # (.., pair P, i, byte)
        a = q8[:, :, :, 0] | (q8[:, :, :, 1] << 3) | ((q8[:, :, :, 2] & 3) << 6)
        bb = q8[:, :, :, 3] | (q8[:, :, :, 4] << 3) | ((q8[:, :, :, 5] & 3) << 6)
        c = (
            q8[:, :, :, 6]
            | (q8[:, :, :, 7] << 3)
            | ((q8[:, :, :, 2] >> 2) << 6)
            | ((q8[:, :, :, 5] >> 2) << 7)
        )
        chunks = torch.stack([a, bb, c], dim=3)  # (RT, KB, 2, 3, 64)
    out_codes = chunks.reshape(rt, kb, 128 * b).to(torch.uint8)

    def by_group(x: Tensor) -> Tensor:  # (RT*16, KB*4) codes -> (RT, KB, group, row)
        return x.long().reshape(rt, ROWS, kb, 4).permute(0, 2, 3, 1)

    s, z = by_group(sc), by_group(zc)
    groups = s | (z << 4) if sb <= 4 else torch.cat([s, z], dim=-1)  # (RT, KB, 4, 16 or 32)
    sec = second.reshape(rt, kb, 16).contiguous().view(torch.int16).view(torch.uint8).reshape(rt, kb, 32)
    out_stats = torch.cat([groups.reshape(rt, kb, -1).to(torch.uint8), sec], dim=-1)
    return out_codes, out_stats
