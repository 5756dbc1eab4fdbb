"""Text generation: prefill + decode with the KV cache, streaming text pieces with stop handling and timings.

Two layers:
- `SequenceState`: everything about one sequence that does not touch the model (sampling, incremental
  detokenization, EOS / stop-string / length handling, logprobs). A batching server drives many of these.
- `Generator`: runs one sequence on a `Decoder` (cache row 0), reusing the cached prefix of the previous
  call (a chat's earlier turns are not recomputed). Its `decode_step` is a plain callable so a CUDA-graph
  step can replace it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from spqr_run.errors import ConfigError
from spqr_run.models.decoder import Decoder
from spqr_run.sampling import Sampler, SamplingParams
from spqr_run.structured import Constraint, apply_mask
from spqr_run.tokenizer import IncrementalDetokenizer, Tokenizer


@dataclass
class TokenLogprob:
    token_id: int
    text: str
    logprob: float
    top: list[tuple[int, str, float]] = field(default_factory=list)  # (id, text, logprob), best first


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens reused from the KV cache (not recomputed)
    completion_tokens: int = 0
    ttft_s: float = 0.0  # request start -> first token sampled
    prefill_s: float = 0.0
    decode_s: float = 0.0
    # why a "length" finish happened: the context (KV cache) was full, or max_tokens was reached; and that
    # limit in tokens (the context size, or max_tokens)
    context_full: bool = False
    token_limit: int = 0

    @property
    def prefill_tok_s(self) -> float:
        computed = self.prompt_tokens - self.cached_tokens
        return computed / self.prefill_s if self.prefill_s > 0 else 0.0

    @property
    def decode_tok_s(self) -> float:
        n = self.completion_tokens - 1  # the first token comes from the prefill
        return n / self.decode_s if n > 0 and self.decode_s > 0 else 0.0


@dataclass
class GenerationChunk:
    text: str  # new text, never a partial UTF-8 character nor a possible prefix of a stop string
    token_ids: list[int]
    logprobs: list[TokenLogprob] | None = None
    finish_reason: str | None = None  # "stop" | "length" | "cancelled" on the last chunk
    stats: GenerationStats | None = None  # on the last chunk
    prompt_logprobs: list[TokenLogprob] | None = None  # on the first chunk, when the prompt was scored


@dataclass
class GenerationResult:
    text: str
    token_ids: list[int]
    finish_reason: str
    stats: GenerationStats
    logprobs: list[TokenLogprob] | None = None


class SequenceState:
    """The model-independent half of generating one sequence."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        prompt_ids: Sequence[int],
        params: SamplingParams,
        eos_ids: Sequence[int],
        constraint: Constraint | None = None,
    ) -> None:
        self.tokenizer, self.params = tokenizer, params
        self.constraint = constraint  # structured output: only tokens its grammar allows are sampled
        self.sampler = Sampler(params, tokenizer.vocab_size, list(prompt_ids))
        self.detok = IncrementalDetokenizer(tokenizer, prompt_ids=prompt_ids)
        self.stop_ids = set(params.stop_token_ids) | (set() if params.ignore_eos else set(eos_ids))
        self.token_ids: list[int] = []
        self.text = ""  # all text so far (a stop string and what follows it are cut off)
        self.emitted = 0  # characters of `text` already handed out
        self.finish_reason: str | None = None
        self._max_stop = max((len(s) for s in params.stop), default=0)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def sample(self, logits: Tensor) -> tuple[int, TokenLogprob | None]:
        """Pick the next token from raw logits (V,) and, if asked for, its logprob and the top alternatives
        (of the raw distribution: a constraint changes which token is picked, not the reported logprobs)."""
        if self.constraint is not None:
            token = self.sampler.sample(apply_mask(logits, self.constraint.compute_mask()))
        else:
            token = self.sampler.sample(logits)
        info = None
        if self.params.logprobs is not None:
            lp = torch.log_softmax(logits.float(), dim=-1)
            top = []
            if self.params.logprobs > 0:
                vals, ids = torch.topk(lp, self.params.logprobs)
                top = [
                    (int(i), self.tokenizer.token_text(int(i)), float(v))
                    for v, i in zip(vals, ids, strict=True)
                ]
            info = TokenLogprob(token, self.tokenizer.token_text(token), float(lp[token]), top)
        return token, info

    def accept(self, token: int, logprob: TokenLogprob | None = None) -> GenerationChunk:
        """Record a sampled token; returns the text it released (maybe "") and whether the sequence ended."""
        self.sampler.accept(token)
        if self.constraint is not None:
            self.constraint.accept(token)
        self.token_ids.append(token)
        logprobs = [logprob] if logprob is not None else None
        if token in self.stop_ids:
            self.finish_reason = "stop"
            self.text += self.detok.flush()
            return GenerationChunk(self._release(len(self.text)), [token], logprobs, "stop")
        self.text += self.detok.push(token)
        if self.params.stop:
            hit = self._find_stop()
            if hit is not None:
                self.text = self.text[:hit]
                self.finish_reason = "stop"
                return GenerationChunk(self._release(hit), [token], logprobs, "stop")
        if len(self.token_ids) >= self.params.max_tokens:
            return self.finish("length", [token], logprobs)
        return GenerationChunk(self._release(self._safe_end()), [token], logprobs)

    def finish(
        self, reason: str, token_ids: list[int] | None = None, logprobs: list[TokenLogprob] | None = None
    ) -> GenerationChunk:
        """End the sequence (length, context full, cancelled): flush the text held back."""
        self.finish_reason = reason
        self.text += self.detok.flush()
        end = len(self.text)
        if self.params.stop:
            hit = self._find_stop()
            if hit is not None:
                self.text, end, self.finish_reason = self.text[:hit], hit, "stop"
        return GenerationChunk(self._release(end), token_ids or [], logprobs, self.finish_reason)

    def _find_stop(self) -> int | None:
        start = max(0, self.emitted - self._max_stop)
        hits = [i for s in self.params.stop if (i := self.text.find(s, start)) >= 0]
        return min(hits) if hits else None

    def _safe_end(self) -> int:
        """End of the text that cannot be the start of a stop string."""
        text, end = self.text, len(self.text)
        for s in self.params.stop:
            for k in range(min(len(s) - 1, len(text)), 0, -1):
                if text.endswith(s[:k]):
                    end = min(end, len(text) - k)
                    break
        return max(end, self.emitted)

    def _release(self, end: int) -> str:
        piece = self.text[self.emitted : end]
        self.emitted = max(self.emitted, end)
        return piece


DecodeStep = Callable[[Tensor, Tensor], Tensor]  # (tokens (B, 1), positions (B, 1)) -> logits (B, 1, V)


class Generator:
    """Generates one sequence at a time on cache row 0 of `model`, streaming `GenerationChunk`s."""

    def __init__(
        self,
        model: Decoder,
        tokenizer: Tokenizer,
        *,
        max_seq_len: int | None = None,
        prefill_chunk: int = 512,
        decode_step: DecodeStep | None = None,
    ) -> None:
        self.model, self.tokenizer = model, tokenizer
        if model.caches is None or (max_seq_len and model.max_seq_len != max_seq_len):
            model.setup_caches(1, max_seq_len or model.config.max_position_embeddings)
        self.max_seq_len = model.max_seq_len
        self.prefill_chunk = prefill_chunk
        self.device = model.device
        self.decode_step = decode_step or self._eager_step
        self.eos_ids = model.config.eos_token_ids
        self._cached: list[int] = []  # tokens whose keys/values are in cache row 0, in order

    def _eager_step(self, tokens: Tensor, positions: Tensor) -> Tensor:
        return self.model(tokens, positions, kv_len=int(positions.max()) + 1)

    def reset(self) -> None:
        """Forget the cached prefix (the cache memory is reused as is)."""
        self._cached = []

    @torch.inference_mode()
    def prefill(self, prompt_ids: Sequence[int]) -> tuple[Tensor, int]:
        """Run the prompt through the model, reusing the longest cached prefix.

        Returns the logits (V,) after the last prompt token and how many prompt tokens were reused.
        """
        reuse = 0
        limit = min(len(self._cached), len(prompt_ids) - 1)
        while reuse < limit and self._cached[reuse] == prompt_ids[reuse]:
            reuse += 1
        self._cached = list(prompt_ids[:reuse])
        logits = None
        for start in range(reuse, len(prompt_ids), self.prefill_chunk):
            chunk = list(prompt_ids[start : start + self.prefill_chunk])
            tokens = torch.tensor([chunk], dtype=torch.long, device=self.device)  # (1, T)
            positions = torch.arange(start, start + len(chunk), device=self.device)[None]  # (1, T)
            logits = self.model(tokens, positions, kv_len=start + len(chunk), last_only=True)
            self._cached += chunk
        assert logits is not None
        return logits[0, -1], reuse

    def stream(
        self,
        prompt_ids: Sequence[int],
        params: SamplingParams,
        *,
        should_stop: Callable[[], bool] | None = None,
        constraint: Constraint | None = None,
    ) -> Iterator[GenerationChunk]:
        """Generate from `prompt_ids`; the last chunk carries finish_reason and stats.

        `should_stop` is polled between tokens (Ctrl-C in the REPL, a disconnected client); when it returns
        True the sequence ends with finish_reason "cancelled" and what was generated so far is kept.
        `constraint` (structured output, `spqr_run.structured`) restricts the tokens to its grammar.
        """
        if not prompt_ids:
            raise ConfigError("the prompt is empty (no tokens)")
        if len(prompt_ids) >= self.max_seq_len:
            raise ConfigError(
                f"the prompt has {len(prompt_ids)} tokens, the context holds {self.max_seq_len}"
            )
        t0 = time.perf_counter()
        stats = GenerationStats(prompt_tokens=len(prompt_ids))
        state = SequenceState(self.tokenizer, prompt_ids, params, self.eos_ids, constraint)
        logits, stats.cached_tokens = self.prefill(prompt_ids)
        t1 = time.perf_counter()
        stats.prefill_s = t1 - t0
        pos = len(prompt_ids)
        while True:
            token, info = state.sample(logits)
            if stats.completion_tokens == 0:
                stats.ttft_s = time.perf_counter() - t0
            stats.completion_tokens += 1
            chunk = state.accept(token, info)
            if not state.finished and pos + 1 >= self.max_seq_len:
                tail = state.finish("length")
                chunk.text += tail.text
                chunk.finish_reason = tail.finish_reason
                stats.context_full, stats.token_limit = tail.finish_reason == "length", self.max_seq_len
            elif not state.finished and should_stop is not None and should_stop():
                tail = state.finish("cancelled")
                chunk.text += tail.text
                chunk.finish_reason = tail.finish_reason
            if state.finished:
                stats.decode_s = time.perf_counter() - (t0 + stats.ttft_s)
                if state.finish_reason == "length" and not stats.context_full:
                    stats.token_limit = params.max_tokens
                chunk.stats = stats
                yield chunk
                return
            yield chunk
            with torch.inference_mode():
                step_in = torch.tensor([[token]], dtype=torch.long, device=self.device)  # (1, 1)
                logits = self.decode_step(step_in, torch.tensor([[pos]], device=self.device))[0, -1]
            self._cached.append(token)
            pos += 1

    def generate(
        self, prompt_ids: Sequence[int], params: SamplingParams, constraint: Constraint | None = None
    ) -> GenerationResult:
        text, ids, logprobs = [], [], []
        last = None
        for chunk in self.stream(prompt_ids, params, constraint=constraint):
            text.append(chunk.text)
            ids += chunk.token_ids
            logprobs += chunk.logprobs or []
            last = chunk
        assert last is not None and last.stats is not None and last.finish_reason is not None
        return GenerationResult(
            "".join(text),
            ids,
            last.finish_reason,
            last.stats,
            logprobs if params.logprobs is not None else None,
        )
