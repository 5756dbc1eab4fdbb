"""`Q8Embedding` and `Q8Linear`: the token embedding and the LM head (tied or not) held as int8 rows with an
fp16 scale per row and 64 columns.

The embedding and the tied LM head of a small model are much of what a decode step reads (SmolLM2-135M: 56 MB
of fp16 against 63 MB of SpQR linears), so on the CPU a quantized model keeps them in 8 bits, as llama.cpp
keeps its Q8_0 embedding: (vocab, hidden) bytes plus 2 bytes of scale per 64, in the quad layout of the native
kernels (`spqr_run.cpu.weights.q8_weight`). Lookups dequantize rows (`scale * code`); the LM head runs the
native int8 matmul. What it costs in perplexity is in BENCHMARKS.md ("CPU decode").
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from spqr_run.cpu.weights import NativeWeight, q8_rows, q8_weight


class Q8Embedding(nn.Module):
    """An `nn.Embedding` replacement (forward(ids) -> (..., hidden) fp32) that also computes the tied head."""

    def __init__(self, weight: Tensor) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim = weight.shape
        self.native: NativeWeight = q8_weight(weight)
        for name, tensor in self.native.tensors.items():
            self.register_buffer(name, tensor, persistent=False)

    def forward(self, ids: Tensor) -> Tensor:
        """ids (...) int64 -> (..., hidden) fp32."""
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.num_embeddings):
            raise IndexError(f"token id out of range [0, {self.num_embeddings})")
        return q8_rows(self.native, ids.reshape(-1)).reshape(*ids.shape, self.embedding_dim)

    def head(self, x: Tensor) -> Tensor:
        """The tied LM head: x (..., hidden) -> logits (..., vocab) fp32."""
        return self.native.matmul(x.float())

    def dequantized(self) -> Tensor:
        """The whole table as fp32 (vocab, hidden): for tests and tools, not for decoding."""
        return self(torch.arange(self.num_embeddings))

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, int8 rows"


class Q8Linear(nn.Module):
    """An untied LM head in int8 rows: forward(x (..., in)) -> (..., out) fp32 (no bias)."""

    def __init__(self, weight: Tensor) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.native: NativeWeight = q8_weight(weight)
        for name, tensor in self.native.tensors.items():
            self.register_buffer(name, tensor, persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.native.matmul(x.float())

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 rows"
