"""Preallocated key/value cache: one buffer pair per layer, written in place, never reallocated."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class KVCache(nn.Module):
    """Keys and values of one attention layer for `rows` independent sequences (batch rows / server slots).

    Buffers are (rows, max_seq_len, kv_heads, head_dim) so that writing T new positions of B rows is a
    single `index_put_` with (B, T) indices, and reading the first `kv_len` positions is a view.
    """

    def __init__(
        self, rows: int, max_seq_len: int, kv_heads: int, head_dim: int, *, dtype: torch.dtype, device=None
    ) -> None:
        super().__init__()
        shape = (rows, max_seq_len, kv_heads, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

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

        Returns the cached keys and values of those rows, (B, S, kv_heads, head_dim) with S = kv_len
        (None: the whole buffer, for static shapes under CUDA graphs).
        """
        b = k.shape[0]
        if rows is None:
            row_idx = torch.arange(b, device=k.device)[:, None]  # (B, 1)
        else:
            row_idx = rows[:, None]  # (B, 1)
        self.k.index_put_((row_idx, positions), k.to(self.k.dtype))
        self.v.index_put_((row_idx, positions), v.to(self.v.dtype))
        s = self.max_seq_len if kv_len is None else kv_len
        if rows is None:
            return self.k[:b, :s], self.v[:b, :s]
        return self.k[rows, :s], self.v[rows, :s]

    def reset(self) -> None:
        self.k.zero_()
        self.v.zero_()
