"""Preallocated key/value cache: one buffer pair per layer, written in place, never reallocated.

Two storage kinds (`KV_CACHE_KINDS`): "auto" keeps keys and values in the model's dtype; "int8" stores them as
int8 with one fp32 scale per (token, head), symmetric absmax: x ~= q * scale, q in [-127, 127],
scale = max |x| / 127 over the head's `head_dim` values (fp32: an fp16 scale would be subnormal for small
heads). That halves the cache (head_dim 128: 264 bytes instead of 512 per token and head for k and v together
with fp16), so twice the context fits the same memory;
what it costs in perplexity is measured with `spqr-eval --kv-cache int8` (BENCHMARKS.md). Attention reads the
cache dequantized to the model's dtype.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

KV_CACHE_KINDS = ("auto", "int8")
INT8_SCALE_DTYPE = torch.float32


def quantize_int8(x: Tensor) -> tuple[Tensor, Tensor]:
    """x (..., D) -> (int8 codes (..., D), fp32 scales (..., 1)) with x ~= codes * scales."""
    scale = (x.float().abs().amax(dim=-1, keepdim=True) / 127).to(INT8_SCALE_DTYPE)  # (..., 1)
    safe = scale.float().clamp_min(torch.finfo(INT8_SCALE_DTYPE).tiny)
    codes = torch.round(x.float() / safe).clamp_(-127, 127).to(torch.int8)
    return codes, scale


class KVCache(nn.Module):
    """Keys and values of one attention layer for `rows` independent sequences (batch rows / server slots).

    Buffers are (rows, max_seq_len, kv_heads, head_dim) so that writing T new positions of B rows is a
    single `index_put_` with (B, T) indices, and reading the first `kv_len` positions is a view (a dequantized
    copy for "int8").
    """

    def __init__(
        self,
        rows: int,
        max_seq_len: int,
        kv_heads: int,
        head_dim: int,
        *,
        dtype: torch.dtype,
        device=None,
        kind: str = "auto",
    ) -> None:
        super().__init__()
        if kind not in KV_CACHE_KINDS:
            raise ValueError(f"unknown KV cache kind {kind!r} (use one of {', '.join(KV_CACHE_KINDS)})")
        self.kind, self.dtype = kind, dtype  # dtype: the model's, which attention reads the cache in
        shape = (rows, max_seq_len, kv_heads, head_dim)
        store = torch.int8 if kind == "int8" else dtype
        self.register_buffer("k", torch.zeros(shape, dtype=store, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=store, device=device), persistent=False)
        scales = (rows, max_seq_len, kv_heads, 1)
        for name in ("k_scale", "v_scale"):
            buf = torch.zeros(scales, dtype=INT8_SCALE_DTYPE, device=device) if kind == "int8" else None
            self.register_buffer(name, buf, persistent=False)

    @property
    def max_seq_len(self) -> int:
        return self.k.shape[1]

    @property
    def rows(self) -> int:
        return self.k.shape[0]

    def update(
        self, positions: Tensor, k: Tensor, v: Tensor, *, rows: Tensor | None, kv_len: int | None
    ) -> tuple[Tensor, Tensor]:
        """Write k, v (B, T, kv_heads, head_dim) at `positions` (B, T) of cache rows `rows` (B,) (None: 0..B-1).

        Returns the cached keys and values of those rows in k's dtype, (B, S, kv_heads, head_dim) with
        S = kv_len (None: the whole buffer, for static shapes under CUDA graphs).
        """
        b, dtype = k.shape[0], k.dtype
        if rows is None:
            row_idx = torch.arange(b, device=k.device)[:, None]  # (B, 1)
        else:
            row_idx = rows[:, None]  # (B, 1)
        where = (row_idx, positions)
        s = self.max_seq_len if kv_len is None else kv_len
        select = (slice(None, b), slice(None, s)) if rows is None else (rows, slice(None, s))
        if self.k_scale is None:
            self.k.index_put_(where, k.to(self.k.dtype))
            self.v.index_put_(where, v.to(self.v.dtype))
            return self.k[select], self.v[select]
        out = []
        for x, codes, scales in ((k, self.k, self.k_scale), (v, self.v, self.v_scale)):
            q, scale = quantize_int8(x)  # (B, T, KH, hd), (B, T, KH, 1)
            codes.index_put_(where, q)
            scales.index_put_(where, scale)
            out.append(codes[select].to(dtype) * scales[select].to(dtype))  # (B, S, KH, hd)
        return out[0], out[1]

    def save_position(self, b: int, pos: int) -> list[Tensor]:
        """Copies of what rows [0, b) hold at `pos` (restore with `restore_position`)."""
        return [buf[:b, pos].clone() for buf in self._buffers.values() if buf is not None]

    def restore_position(self, b: int, pos: int, saved: list[Tensor]) -> None:
        bufs = [buf for buf in self._buffers.values() if buf is not None]
        for buf, value in zip(bufs, saved, strict=True):
            buf[:b, pos] = value

    def reset(self) -> None:
        for buf in self._buffers.values():
            if buf is not None:
                buf.zero_()
