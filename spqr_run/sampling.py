"""Sampling parameters and next-token selection: penalties, logit bias, temperature, top-k, top-p, min-p."""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any

import torch
from torch import Tensor

from spqr_run.errors import ConfigError

MIN_TEMPERATURE = 1e-5  # below this, sampling is greedy (logits / T would overflow to inf)

# What a model file may recommend (HF generation_config.json, GGUF `general.sampling.*`, a .spqr header).
MODEL_DEFAULT_FIELDS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")

# The settings used for a field that neither the request (flag, /set, API field) nor the model sets.
# Truncation keeps a small model on topic: without it, one unlikely token from the long tail (each tiny, together
# a sizeable share) now and then derails the rest of a reply. min-p (Nguyen et al., "Turning Up the Heat: Min-p
# Sampling for Creative and Coherent LLM Outputs", 2024, arXiv:2407.01082) drops every token less likely than
# `min_p` times the most likely one, so it cuts hard where the model is sure and keeps alternatives where it is
# not; top-p 0.9 also bounds the tail when the distribution is flat. Temperature 0.7 is moderate: varied replies
# with the tail damped. Measured on the 4-bit SmolLM2-135M GGUF (4 simple questions x 5 seeds, 48 tokens,
# tests/test_sampling_defaults.py): the old temperature 0.7 without truncation left 4 of 20 replies wrong or
# rambling past 48 tokens, these settings 1 (a near-tie of "The" and "Der" for Germany), the model card's 0.2/0.9 none.
GLOBAL_DEFAULTS: dict[str, Any] = {"temperature": 0.7, "top_p": 0.9, "min_p": 0.1}


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


def clean_model_defaults(raw: Mapping[str, Any], *, source: str) -> dict[str, Any]:
    """The usable sampling recommendations of a model file: the `MODEL_DEFAULT_FIELDS` among `raw` whose
    values are numbers `SamplingParams` accepts. Other keys are ignored; a bad value is dropped with a one-line
    warning naming `source` and the field (a model stays loadable when its recommendations are not)."""
    out: dict[str, Any] = {}
    for name in MODEL_DEFAULT_FIELDS:
        value = raw.get(name)
        if value is None:
            continue
        problem = None
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            problem = "not a number"
        elif name == "top_k" and not float(value).is_integer():
            problem = "not an integer"
        else:
            value = int(value) if name == "top_k" else float(value)
            try:
                SamplingParams(**{name: value})
            except ConfigError:
                problem = "out of range"
        if problem:
            warnings.warn(f"{source}: ignoring the recommended {name}={value!r} ({problem})", stacklevel=2)
            continue
        out[name] = value
    return out


def resolve_sampling(
    requested: Mapping[str, Any] | None = None, model: Mapping[str, Any] | None = None, **fixed: Any
) -> SamplingParams:
    """The sampling parameters of a reply, each field from the first of these that sets it:

    1. `requested` (a CLI flag, a chat `/set`, a field of an API request; a value of None means "not set");
    2. `model`, the model's recommended defaults (`ModelSource.generation_defaults`, see `clean_model_defaults`);
    3. `GLOBAL_DEFAULTS`;
    4. the `SamplingParams` field defaults.

    `fixed` fields (max_tokens, stop, logprobs...) are set as given. Raises ConfigError naming the field for
    an unknown name or a value out of range. spqr-chat, spqr-serve and spqr-run all resolve through here, so
    they agree on what a reply is sampled with.
    """
    known = set(SamplingParams.field_names())
    values: dict[str, Any] = dict(GLOBAL_DEFAULTS)
    values.update({k: v for k, v in (model or {}).items() if k in MODEL_DEFAULT_FIELDS and v is not None})
    values.update({k: v for k, v in (requested or {}).items() if v is not None})
    values.update(fixed)
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"unknown sampling parameter {unknown[0]!r}")
    return SamplingParams(**values)
