"""Perplexity over non-overlapping windows of a text file (the quality number of every table here)."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from spqr_run.models.decoder import Decoder


@dataclass
class PerplexityResult:
    ppl: float
    nll: float  # mean negative log-likelihood per scored token (nats)
    scored_tokens: int
    windows: int
    seqlen: int
    seconds: float

    def to_dict(self) -> dict[str, float | int]:
        return {
            "ppl": self.ppl,
            "nll": self.nll,
            "scored_tokens": self.scored_tokens,
            "windows": self.windows,
            "seqlen": self.seqlen,
            "seconds": self.seconds,
        }


@torch.inference_mode()
def perplexity(
    model: Decoder,
    token_ids: list[int],
    *,
    seqlen: int,
    kv_cache: str | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> PerplexityResult:
    """exp(mean NLL) over windows [0, L), [L, 2L), ...; each window is scored independently, and within a
    window every token but the first is scored. A final partial window of >= 2 tokens counts too.

    `kv_cache` None runs each window without a cache; a kind ("auto", "int8") writes the window into a cache
    of that kind and attends to what the cache gives back, as generation does (for "int8": its rounding)."""
    t0 = time.perf_counter()
    device = model.device
    windows = [token_ids[i : i + seqlen] for i in range(0, len(token_ids), seqlen)]
    windows = [w for w in windows if len(w) >= 2]
    total_nll, scored = 0.0, 0
    if kv_cache is not None:
        model.setup_caches(1, seqlen, kind=kv_cache)
    for i, window in enumerate(windows):
        tokens = torch.tensor([window], dtype=torch.long, device=device)  # (1, L)
        if kv_cache is None:
            logits = model(tokens, use_cache=False)[0, :-1]  # (L-1, V) fp32
        else:
            logits = model(tokens, kv_len=len(window))[0, :-1]
        total_nll += F.cross_entropy(logits, tokens[0, 1:], reduction="sum").item()
        scored += len(window) - 1
        if progress:
            progress(i + 1, len(windows))
    nll = total_nll / max(scored, 1)
    return PerplexityResult(math.exp(nll), nll, scored, len(windows), seqlen, time.perf_counter() - t0)
