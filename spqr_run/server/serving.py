"""OpenAI serving: requests -> prompt token ids and sampling parameters -> engine jobs -> responses or SSE.

Everything here runs on the event loop; the engine thread posts each sequence's chunks into one asyncio queue
per request with `loop.call_soon_threadsafe`. Leaving an iteration early (a disconnected client, a cancelled
task) cancels the request's sequences, which frees their slots before the next decode step.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel

from spqr_run.errors import SpqrError
from spqr_run.generation import GenerationChunk, TokenLogprob
from spqr_run.runtime import Runtime
from spqr_run.sampling import SamplingParams, resolve_sampling
from spqr_run.server import protocol as P
from spqr_run.server.engine import Engine, Job
from spqr_run.server.protocol import APIError
from spqr_run.server.serving_structured import message_dict
from spqr_run.structured import Constraint, GrammarEngines
from spqr_run.tools import ToolSupport

MIN_TEMPERATURE = 1e-5  # below: greedy


def config_error(e: SpqrError, default_param: str | None = None) -> APIError:
    """A 400 naming the parameter that `e` (e.g. "invalid top_p=...") is about."""
    m = re.match(r"invalid (\w+)", str(e))
    return APIError(400, str(e), param=m.group(1) if m else default_param)


@dataclass
class ChoiceResult:
    """One finished choice, collected from its chunks."""

    text: list[str] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None
    completion_tokens: int = 0
    prompt_logprobs: list[TokenLogprob] | None = None


class OpenAIServing:
    """Turns validated requests into engine jobs and their output into OpenAI responses and stream events."""

    def __init__(self, runtime: Runtime, engine: Engine, model_name: str) -> None:
        self.runtime, self.engine, self.model_name = runtime, engine, model_name
        self.tokenizer = runtime.tokenizer
        self.max_context = engine.max_context
        self.grammars = GrammarEngines(self.tokenizer)  # structured outputs, built on first use
        self.tool_support = ToolSupport.detect(runtime.chat_template.source, self.tokenizer.vocab_strings())
        self.tokenizer.token_string(0)  # builds the logprobs token table now, not in the first request

    # ---- request -> prompts and parameters ----------------------------------------------------------
    def check_model(self, name: str | None) -> None:
        if name is not None and name != self.model_name:
            raise APIError(
                404,
                f"the model {name!r} does not exist; this server serves {self.model_name!r}",
                param="model",
                code="model_not_found",
            )

    def check_ids(self, ids: list[int], param: str) -> None:
        bad = [i for i in ids if i >= self.tokenizer.vocab_size]
        if bad:
            raise APIError(
                400,
                f"token id {bad[0]} is outside the vocabulary (size {self.tokenizer.vocab_size})",
                param=param,
            )

    def completion_prompts(self, req: P.CompletionRequest) -> list[tuple[list[int], str]]:
        """(token ids, text for echo) for each prompt of a completion request."""
        raw = req.prompt
        items: list[str | list[int]]
        if isinstance(raw, str):
            items = [raw]
        elif raw and all(isinstance(x, int) for x in raw):
            items = [raw]  # type: ignore[list-item]
        else:
            items = list(raw)  # type: ignore[arg-type]
        if not items:
            raise APIError(400, "prompt must not be empty", param="prompt")
        out = []
        for item in items:
            if isinstance(item, str):
                ids, text = self.tokenizer.encode(item), item
            else:
                self.check_ids(item, "prompt")
                ids, text = list(item), self.tokenizer.decode(item)
            if not ids:
                raise APIError(400, "prompt must not be empty (it has no tokens)", param="prompt")
            out.append((ids, text))
        return out

    def chat_prompt(
        self, messages: list[P.ChatMessage], tools: list[dict[str, Any]] | None = None
    ) -> list[int]:
        """Prompt ids of `messages`; `tools` (OpenAI tool definitions) are written in as the model expects.
        Message content is text: only the template's own markup becomes special tokens."""
        dicts, extra = self.tool_support.messages([message_dict(m) for m in messages], tools)
        try:
            return self.runtime.chat_template.encode(
                dicts, self.tokenizer, add_generation_prompt=True, **extra
            )
        except SpqrError as e:
            raise APIError(400, str(e), param="messages") from None

    def sampling_params(
        self, req: P.SamplingFields, *, max_tokens: int, logprobs: int | None
    ) -> SamplingParams:
        bias = {int(k): v for k, v in (req.logit_bias or {}).items()}
        self.check_ids(list(bias), "logit_bias")
        # a temperature this small is greedy in effect, and logits / 1e-300 overflow to inf
        temperature = req.temperature
        if temperature is not None and temperature < MIN_TEMPERATURE:
            temperature = 0.0
        # top_p 0 (OpenAI accepts it): the nucleus is the most likely token alone
        top_k, top_p = (1, 1.0) if req.top_p == 0 else (req.top_k, req.top_p)
        requested = {
            "temperature": temperature,
            "top_k": top_k,
            "top_p": top_p,
            "min_p": req.min_p,
            "repetition_penalty": req.repetition_penalty,
        }
        try:  # the request's fields > the model's generation defaults > the global defaults
            return resolve_sampling(
                requested,
                self.runtime.source.generation_defaults,
                max_tokens=max_tokens,
                presence_penalty=req.presence_penalty,
                frequency_penalty=req.frequency_penalty,
                logit_bias=bias,
                seed=req.seed,
                stop=tuple(req.stop or ()),
                logprobs=logprobs,
            )
        except SpqrError as e:
            raise config_error(e) from None

    def budget(self, prompt_len: int, requested: int | None, param: str) -> int:
        """max_tokens for this prompt (requested, or the rest of the context); 400 when they do not fit."""
        max_tokens = requested if requested is not None else self.max_context - prompt_len
        if prompt_len >= self.max_context or prompt_len + max_tokens > self.max_context:
            raise APIError(
                400,
                f"this model's maximum context length is {self.max_context} tokens; you requested "
                f"{prompt_len + max(max_tokens, 0)} tokens ({prompt_len} in the {param}, {max(max_tokens, 0)} "
                "in the completion); reduce the prompt or max_tokens",
                param=param if prompt_len >= self.max_context or requested is None else "max_tokens",
                code="context_length_exceeded",
            )
        return max_tokens

    # ---- engine -> chunks ---------------------------------------------------------------------------
    def start(
        self,
        prompts: list[list[int]],
        params: list[SamplingParams],
        n: int,
        *,
        prompt_logprobs: int | None = None,
        score_only: bool = False,
        constraints: list[Constraint | None] | None = None,
    ) -> RequestRun:
        """Queue the sequences of one request now (a full queue raises 429 before any response starts).

        `prompt_logprobs` k scores the prompt tokens too (echo + logprobs); `score_only` generates nothing;
        `constraints` (one per prompt) restrict each prompt's samples to a grammar (structured output)."""
        return RequestRun(
            self.engine,
            prompts,
            params,
            n,
            prompt_logprobs=prompt_logprobs,
            score_only=score_only,
            constraints=constraints,
        )

    async def collect(self, run: RequestRun) -> list[ChoiceResult]:
        results = [ChoiceResult() for _ in range(run.choices)]
        async for index, chunk in run:
            r = results[index]
            r.text.append(chunk.text)
            r.logprobs += chunk.logprobs or []
            r.completion_tokens += len(chunk.token_ids)
            r.finish_reason = chunk.finish_reason or r.finish_reason
            r.prompt_logprobs = chunk.prompt_logprobs or r.prompt_logprobs
        return results


class RequestRun:
    """The engine jobs of one request; iterate for (choice index, chunk), choice `p * n + j` being prompt
    p's j-th sample. Iteration ends when every choice has finished; leaving early cancels the rest."""

    def __init__(
        self,
        engine: Engine,
        prompts: list[list[int]],
        params: list[SamplingParams],
        n: int,
        *,
        prompt_logprobs: int | None = None,
        score_only: bool = False,
        constraints: list[Constraint | None] | None = None,
    ) -> None:
        self.engine = engine
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[tuple[int, GenerationChunk | BaseException]] = asyncio.Queue()
        self.jobs = []
        for p, (ids, prm) in enumerate(zip(prompts, params, strict=True)):
            for j in range(n):
                seeded = prm if prm.seed is None or j == 0 else prm.updated(seed=_nth_seed(prm.seed, j))
                sink = self._sink(p * n + j)
                job = Job(ids, seeded, sink, prompt_logprobs, score_only)
                if constraints and constraints[p] is not None:  # each sample follows its own copy
                    job.constraint = constraints[p] if j == 0 else constraints[p].copy()
                self.jobs.append(job)
        self.choices = len(self.jobs)
        engine.submit(self.jobs)

    def _sink(self, index: int) -> Callable[[GenerationChunk | BaseException], None]:
        def sink(item: GenerationChunk | BaseException) -> None:  # runs on the engine thread
            try:
                self.loop.call_soon_threadsafe(self.queue.put_nowait, (index, item))
            except RuntimeError:  # the loop is closed: nobody is listening
                pass

        return sink

    def cancel(self) -> None:
        self.engine.cancel(self.jobs)

    async def __aiter__(self) -> AsyncIterator[tuple[int, GenerationChunk]]:
        remaining = self.choices
        try:
            while remaining:
                index, item = await self.queue.get()
                if isinstance(item, BaseException):
                    raise item
                if item.finish_reason is not None:
                    remaining -= 1
                yield index, item
        finally:
            self.cancel()


def _nth_seed(seed: int, j: int) -> int:
    return seed + j if seed + j < 2**64 else seed - j


async def until_disconnected(work: Awaitable[Any], is_disconnected: Callable[[], Awaitable[bool]]) -> Any:
    """Await `work`, cancelling it (and so its sequences) if the client goes away; None then."""
    task = asyncio.ensure_future(work)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=0.2)
            if done:
                return task.result()
            if await is_disconnected():
                task.cancel()
                return None
    finally:
        if not task.done():
            task.cancel()


def sse(obj: BaseModel | dict[str, Any]) -> str:
    data = obj.model_dump_json(exclude_unset=False) if isinstance(obj, BaseModel) else json.dumps(obj)
    return f"data: {data}\n\n"
