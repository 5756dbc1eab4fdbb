"""What one decode step reads from memory, and how fast this machine reads: the bandwidth floor of decode.

Batch-1 decode is memory-bound: a step reads every weight matrix once, one embedding row, and the keys and
values of every cached position, so its time is at least bytes read / read bandwidth (the "floor").
`decode_traffic` counts the bytes a built model's decode step actually reads, from what it holds:

- a linear on the native CPU kernels: its `NativeWeight.nbytes` (codes, stats, outliers, row pointers and
  permutation of an SpQR layer in the CPU layout; the fp16 or fp32 matrix of a dense one; bias);
- a linear that runs from a decoded dense copy (the fallback CPU path): that copy; a packed layer on a GPU:
  its packed tensors; a dense `nn.Linear`: its weight and bias;
- the LM head (or the tied embedding serving as one): read whole;
- the embedding: one row (int8 rows in the native quad layout interleave 16 rows per 64-byte line, so a
  lookup touches its whole 16-row tile: 16 x hidden bytes and the tile's fp16 scales, counted so);
- norms: their weights (fp32 on the native path);
- the KV cache: keys and values (and int8 scales) of positions 0 .. p for a token at position p, in the
  cache's own storage (fp16 under the native CPU decoder, int8, or the model's dtype).

Activations and the rotary tables are a few KB per layer and stay in cache: not counted.

`read_bandwidth` measures the machine's read bandwidth the same way every time: a sum over a buffer far
larger than any cache (`torch.Tensor.sum` over 512 MiB viewed as int64: one pass, one add per 8 bytes, the
fastest of torch's reductions on the developers' box) on `threads` threads, in GB/s (1e9 bytes per second).
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch
from torch import nn

MB = 10**6
BANDWIDTH_BUFFER_BYTES = 512 * 2**20


@dataclass(frozen=True)
class DecodeTraffic:
    """Bytes one decode step reads, by kind (ints, bytes)."""

    linears: int  # the decoder blocks' linears
    head: int  # the LM head (the tied embedding read whole when it serves as one)
    embedding: int  # the token's embedding row(s) as the lookup touches them
    norms: int
    kv_cache: int  # keys and values of the positions attended to (see `decode_traffic`'s `context`)

    @property
    def weights(self) -> int:
        return self.linears + self.head + self.embedding + self.norms

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache


def _nbytes(*tensors: torch.Tensor | None) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def linear_read_bytes(module: nn.Module) -> int:
    """Bytes one batch-1 matmul of `module` reads (see the module docstring), 0 for a non-linear."""
    from spqr_run.models.spqr_linear import SpQRLinear

    native = getattr(module, "native", None)
    if native is not None and hasattr(native, "nbytes"):  # SpQRLinear.to_native, Q8Linear
        return int(native.nbytes)
    if isinstance(module, SpQRLinear):
        if module.dense_weight is not None:
            return _nbytes(module.dense_weight, module.bias)
        return _nbytes(*module.quantized().tensors().values(), module.bias)
    if isinstance(module, nn.Linear):
        return _nbytes(module.weight, module.bias)
    return 0


def _embedding_row_bytes(embedding: nn.Module) -> int:
    """Bytes one token's embedding lookup reads (int8 quad layout: its 16-row tile, see module docstring)."""
    native = getattr(embedding, "native", None)
    if native is not None:  # `cpu.embedding.Q8Embedding`: codes (RT, in_pad/4, 64), fp16 scales (RT, KB, 16)
        codes, scales = native.tensors["codes"], native.tensors["scales"]
        return _nbytes(codes[0], scales[0])  # the row's tile: its codes and scales interleave 16 rows'
    weight = embedding.weight
    return weight.shape[1] * weight.element_size()


def _head_bytes(model: nn.Module) -> int:
    if model.lm_head is not None:
        return linear_read_bytes(model.lm_head)
    emb = model.embed_tokens
    native = getattr(emb, "native", None)
    return int(native.nbytes) if native is not None else _nbytes(emb.weight)


def kv_bytes_per_position(model: nn.Module) -> int:
    """Bytes of keys and values (and int8 scales) one cached position holds for one sequence, all layers,
    in the cache's own storage (0 without a cache)."""
    if model.caches is None:
        return 0
    total = 0
    for cache in model.caches:
        per_row = cache.k.shape[1] * cache.k.shape[0]  # positions x rows
        total += _nbytes(cache.k, cache.v, cache.k_scale, cache.v_scale) // per_row
    return total


def decode_traffic(model: nn.Module, *, context: float) -> DecodeTraffic:
    """Bytes one batch-1 decode step of a built `model` (with its KV cache set up) reads when it attends to
    `context` positions (its own included; a mean over the timed steps may be fractional)."""
    linears = sum(linear_read_bytes(m) for m in model.layers.modules())
    norms = sum(
        p.numel() * 4 for name, p in model.named_parameters() if "norm" in name.rpartition(".")[0]
    )  # the native path reads fp32 copies; elsewhere they are the model's dtype, at most as big
    return DecodeTraffic(
        linears=linears,
        head=_head_bytes(model),
        embedding=_embedding_row_bytes(model.embed_tokens),
        norms=norms,
        kv_cache=round(kv_bytes_per_position(model) * context),
    )


def decode_context(prompt_len: int, new_tokens: int) -> float:
    """Mean positions attended to over a decode of `new_tokens` steps after a `prompt_len` prompt: the step
    at position p reads p + 1 of them, p = prompt_len .. prompt_len + new_tokens - 1."""
    return prompt_len + (new_tokens + 1) / 2


# ---- the machine's read bandwidth ---------------------------------------------------------------------
class ReadBandwidth:
    """Samples of this machine's read bandwidth (GB/s) on `threads` threads, taken whenever `sample()` is
    called (a benchmark calls it between its timed runs, so the floor sees the same load as the runs).

    The buffer (`nbytes`, default 512 MiB) is allocated and touched once at construction; `close()` frees it.
    torch's intra-op pool is set to `threads` for the measurement and restored afterwards (the native
    kernels keep torch at one thread while they decode, `spqr_run.cpu.configure_threads`)."""

    def __init__(self, threads: int, *, nbytes: int = BANDWIDTH_BUFFER_BYTES) -> None:
        self.threads = threads
        self.samples: list[float] = []
        self._buf: torch.Tensor | None = torch.ones(nbytes // 8, dtype=torch.int64)  # (n,) touched: ones

    def sample(self, repeats: int = 3) -> float:
        """Time `repeats` full reads; record and return the fastest as one sample (GB/s)."""
        assert self._buf is not None, "closed"
        before = torch.get_num_threads()
        torch.set_num_threads(self.threads)
        try:
            best = float("inf")
            for _ in range(repeats):
                t0 = time.perf_counter()
                self._buf.sum()
                best = min(best, time.perf_counter() - t0)
        finally:
            torch.set_num_threads(before)
        gb_s = self._buf.numel() * 8 / best / 1e9
        self.samples.append(gb_s)
        return gb_s

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    @property
    def best(self) -> float:
        return max(self.samples)

    def close(self) -> None:
        self._buf = None


def read_bandwidth(threads: int, *, samples: int = 5, nbytes: int = BANDWIDTH_BUFFER_BYTES) -> float:
    """Median of `samples` read-bandwidth samples (GB/s) on `threads` threads (see `ReadBandwidth`)."""
    bw = ReadBandwidth(threads, nbytes=nbytes)
    try:
        for _ in range(samples):
            bw.sample()
        return bw.median
    finally:
        bw.close()
