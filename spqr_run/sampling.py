"""Sampling parameters and next-token selection: penalties, logit bias, temperature, top-k, top-p, min-p."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, replace
from typing import Any

import torch
from torch import Tensor

from spqr_run.errors import ConfigError

MIN_TEMPERATURE = 1e-5  # below this, sampling is greedy (logits / T would overflow to inf)


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens and when to stop. `temperature == 0` means greedy."""

    max_tokens: int = 256
    temperature: float = 0.7
    top_k: int = 0  # 0 = off
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0  # HF-style, over prompt + generated tokens; 1 = off
    presence_penalty: float = 0.0  # OpenAI-style, over generated tokens
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] = field(default_factory=dict)
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None  # None: off; k >= 0: chosen token's logprob plus the top k

    def __post_init__(self) -> None:
        checks = [
            ("max_tokens", self.max_tokens >= 1, "must be >= 1"),
            (
                "temperature",
                0 <= self.temperature <= 100 and math.isfinite(self.temperature),
                "must be in [0, 100]",
            ),
            ("top_k", self.top_k >= 0, "must be >= 0"),
            ("top_p", 0 < self.top_p <= 1, "must be in (0, 1]"),
            ("min_p", 0 <= self.min_p <= 1, "must be in [0, 1]"),
            ("repetition_penalty", 0.01 <= self.repetition_penalty <= 10, "must be in [0.01, 10]"),
            ("presence_penalty", -2 <= self.presence_penalty <= 2, "must be in [-2, 2]"),
            ("frequency_penalty", -2 <= self.frequency_penalty <= 2, "must be in [-2, 2]"),
            ("logprobs", self.logprobs is None or 0 <= self.logprobs <= 20, "must be in [0, 20]"),
            ("stop", all(isinstance(s, str) and s for s in self.stop), "must be non-empty strings"),
        ]
        for name, ok, why in checks:
            if not ok:
                raise ConfigError(f"invalid {name}={getattr(self, name)!r}: {why}")
        for tok, bias in self.logit_bias.items():
            if not isinstance(tok, int) or not -100 <= bias <= 100:
                raise ConfigError(f"invalid logit_bias entry {tok!r}: {bias!r} (bias must be in [-100, 100])")

    @property
    def greedy(self) -> bool:
        """Temperature 0, or so close to it that dividing by it would overflow the logits."""
        return self.temperature < MIN_TEMPERATURE

    def updated(self, **changes: Any) -> SamplingParams:
        return replace(self, **changes)

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]


class Sampler:
    """Stateful per-sequence sampler: owns the RNG and the token counts the penalties need."""

    def __init__(self, params: SamplingParams, vocab_size: int, prompt_ids: list[int], device=None) -> None:
        self.params = params
        self.vocab_size = vocab_size
        self.rng = torch.Generator()  # CPU: the same seed gives the same text on every device
        self.rng.manual_seed(params.seed if params.seed is not None else torch.seed() % (2**63))
        self.counts = torch.zeros(vocab_size, dtype=torch.float32, device=device)  # generated-token counts
        self.seen = torch.zeros(vocab_size, dtype=torch.bool, device=device)  # prompt + generated
        prompt = torch.tensor([t for t in prompt_ids if 0 <= t < vocab_size], dtype=torch.long, device=device)
        self.seen[prompt] = True
        self._bias_ids = torch.tensor([t for t in params.logit_bias if 0 <= t < vocab_size], dtype=torch.long)
        self._bias_vals = torch.tensor(
            [params.logit_bias[int(t)] for t in self._bias_ids], dtype=torch.float32
        )

    def process(self, logits: Tensor) -> Tensor:
        """Apply penalties and logit bias to raw logits (V,) fp32; returns new logits."""
        p = self.params
        x = logits.float().clone()
        if p.repetition_penalty != 1.0:
            sel = x[self.seen]
            x[self.seen] = torch.where(sel > 0, sel / p.repetition_penalty, sel * p.repetition_penalty)
        if p.frequency_penalty or p.presence_penalty:
            x -= p.frequency_penalty * self.counts + p.presence_penalty * (self.counts > 0).float()
        if len(self._bias_ids):
            x[self._bias_ids.to(x.device)] += self._bias_vals.to(x.device)
        return x

    def sample(self, logits: Tensor) -> int:
        """Pick the next token from raw logits (V,)."""
        p = self.params
        x = self.process(logits)
        if p.greedy:
            return int(torch.argmax(x))
        x = x / p.temperature
        if p.top_k and p.top_k < x.numel():
            kth = torch.topk(x, p.top_k).values[-1]
            x = x.masked_fill(x < kth, float("-inf"))
        probs = torch.softmax(x, dim=-1)
        if p.top_p < 1.0:
            sorted_p, order = torch.sort(probs, descending=True)
            cum = torch.cumsum(sorted_p, dim=-1)
            drop = cum - sorted_p > p.top_p  # keep the smallest prefix whose mass reaches top_p
            sorted_p = sorted_p.masked_fill(drop, 0.0)
            probs = torch.zeros_like(probs).scatter_(0, order, sorted_p)
        if p.min_p > 0:
            probs = probs.masked_fill(probs < p.min_p * probs.max(), 0.0)
        token = torch.multinomial(probs.cpu(), 1, generator=self.rng)
        return int(token)

    def accept(self, token: int) -> None:
        if 0 <= token < self.vocab_size:
            self.counts[token] += 1
            self.seen[token] = True
