"""POST /v1/completions: plain text completion, one or many prompts, `n` samples each, echo and logprobs."""

from __future__ import annotations

import codecs
import logging
from collections.abc import AsyncIterator, Awaitable, Callable

from spqr_run.generation import TokenLogprob
from spqr_run.server import protocol as P
from spqr_run.server.serving import ChoiceResult, OpenAIServing, RequestRun, sse, until_disconnected
from spqr_run.server.serving_structured import response_format_constraint
from spqr_run.tokenizer import Tokenizer

log = logging.getLogger("spqr_run.server")


class _TextOffsets:
    """The character offset in the returned text at which each token starts, from the tokens' own bytes.

    A token that starts inside a character (the second token of a character split over two) gets that
    character's offset; one that starts a character gets its offset. Bytes are decoded incrementally as UTF-8 (invalid
    bytes are one U+FFFD per maximal invalid subpart, as in the text), so the offsets are the same however
    the tokens arrive (streamed or not)."""

    def __init__(self, start: int = 0) -> None:
        self.chars = start
        self._decoder = codecs.getincrementaldecoder("utf-8")("replace")

    def feed(self, raw: bytes) -> int:
        """The offset of the token whose bytes are `raw` (after the ones fed before)."""
        offset = self.chars
        pending = self._decoder.getstate()[0]
        if pending and raw:  # a character is incomplete: does this token continue it or replace it?
            try:
                codecs.getincrementaldecoder("utf-8")("strict").decode(pending + raw[:1])
            except UnicodeDecodeError:
                offset += len(pending.decode("utf-8", "replace"))
        self.chars += len(self._decoder.decode(raw))
        return offset


class _ChoiceLogprobs:
    """OpenAI's legacy logprobs object of one choice, built token by token and handed out in order.

    Tokens are `Tokenizer.token_string`s (distinct per token, so `top_logprobs` has exactly k keys and the
    best value of each); `text_offset` indexes the choice's returned text (the echoed prompt first). A token
    is handed out once the text at its offset has been (`take(emitted)`), or at the end, with offsets past
    the end of the text (a stop string cut off) set to its length: streamed and whole answers agree."""

    def __init__(self, tok: Tokenizer, *, echo: tuple[list[int], str, list[TokenLogprob]] | None) -> None:
        self.tok = tok
        self.offsets = _TextOffsets()
        self.pending: list[tuple[str, float | None, dict[str, float] | None, int]] = []
        self.shift = 0  # characters the prompt's bytes have before the echoed text (a SentencePiece "▁")
        if echo is not None:  # the prompt's first token has no logprob: nothing predicts it
            ids, text, scored = echo
            raw = [tok.token_bytes(i) for i in ids]
            decoded = b"".join(raw).decode("utf-8", "replace")
            self.shift = 1 if decoded != text and decoded[:1] == " " and decoded[1:] == text else 0
            self._add(ids[0], raw[0], None, None)
            for t, b in zip(scored, raw[1:], strict=False):
                self._add(t.token_id, b, t.logprob, t.top)
            self.offsets = _TextOffsets(len(text))  # generated text follows the echoed prompt as sent
            self.shift = 0

    def _add(
        self, token_id: int, raw: bytes, logprob: float | None, top: list[tuple[int, str, float]] | None
    ) -> None:
        string = self.tok.token_string
        alternatives = None if top is None else {string(i): lp for i, _, lp in top}
        offset = max(self.offsets.feed(raw) - self.shift, 0)
        self.pending.append((string(token_id), logprob, alternatives, offset))

    def add(self, tokens: list[TokenLogprob]) -> None:
        """Generated tokens; a special one (an end of turn) is not in the text and adds no characters."""
        for t in tokens:
            raw = b"" if self.tok.is_special(t.token_id) else self.tok.token_bytes(t.token_id)
            self._add(t.token_id, raw, t.logprob, t.top)

    def take(self, emitted: int, final: bool) -> P.CompletionLogprobs:
        """The pending tokens whose offset is in the first `emitted` characters of the text (all when
        `final`, `emitted` being then the text's length)."""
        n = len(self.pending) if final else sum(1 for *_, offset in self.pending if offset < emitted)
        out = P.CompletionLogprobs()
        for token, logprob, top, offset in self.pending[:n]:
            out.tokens.append(token)
            out.token_logprobs.append(logprob)
            out.top_logprobs.append(top)
            out.text_offset.append(min(offset, emitted))
        del self.pending[:n]
        return out


async def create_completion(
    serving: OpenAIServing, req: P.CompletionRequest, is_disconnected: Callable[[], Awaitable[bool]]
) -> P.CompletionResponse | AsyncIterator[str] | None:
    """A response, an SSE stream (when `req.stream`), or None when the client left before the end."""
    serving.check_model(req.model)
    prompts = serving.completion_prompts(req)
    budgets = [serving.budget(len(ids), req.max_tokens, "prompt") for ids, _ in prompts]
    # max_tokens 0 scores the prompt without generating; the sampler still needs a positive limit
    params = [serving.sampling_params(req, max_tokens=max(b, 1), logprobs=req.logprobs) for b in budgets]
    ids_list = [ids for ids, _ in prompts]
    rid, created, n = P.new_id("cmpl"), P.now(), req.n
    constraint = await response_format_constraint(serving, req.response_format)
    constraints = [
        constraint if i == 0 or constraint is None else constraint.copy() for i in range(len(ids_list))
    ]
    usage = P.Usage(prompt_tokens=sum(len(ids) for ids in ids_list))
    score = req.echo and req.logprobs is not None
    run = serving.start(
        ids_list,
        params,
        n,
        prompt_logprobs=req.logprobs if score else None,
        score_only=req.max_tokens == 0,
        constraints=constraints,
    )
    if req.stream:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        return _stream(serving, req, run, prompts, rid, created, usage if include_usage else None)
    results: list[ChoiceResult] | None = await until_disconnected(serving.collect(run), is_disconnected)
    if results is None:
        return None
    choices = []
    for index, r in enumerate(results):
        ids, prompt_text = prompts[index // n]
        prefix = prompt_text if req.echo else ""
        text = prefix + "".join(r.text)
        lp = None
        if req.logprobs is not None:
            tracker = _ChoiceLogprobs(
                serving.tokenizer, echo=(ids, prompt_text, r.prompt_logprobs or []) if req.echo else None
            )
            tracker.add(r.logprobs)
            lp = tracker.take(len(text), final=True)
        choices.append(P.CompletionChoice(index=index, text=text, logprobs=lp, finish_reason=r.finish_reason))
        usage.completion_tokens += r.completion_tokens
    usage.total_tokens = usage.prompt_tokens + usage.completion_tokens
    return P.CompletionResponse(
        id=rid, created=created, model=serving.model_name, choices=choices, usage=usage
    )


async def _stream(
    serving: OpenAIServing,
    req: P.CompletionRequest,
    run: RequestRun,
    prompts: list[tuple[list[int], str]],
    rid: str,
    created: int,
    usage: P.Usage | None,
) -> AsyncIterator[str]:
    def chunk(choices: list[P.CompletionChoice]) -> str:
        body = P.CompletionResponse(id=rid, created=created, model=serving.model_name, choices=choices)
        return sse(body.model_dump(exclude_none=True))

    emitted = [0] * run.choices  # characters of each choice's text sent so far
    trackers: list[_ChoiceLogprobs | None] = [None] * run.choices
    try:
        async for index, c in run:
            tracker = trackers[index]
            if tracker is None:  # the first chunk: the prompt first when echoed, with its scores if asked for
                ids, text = prompts[index // req.n]
                echo = (ids, text, c.prompt_logprobs or []) if req.echo else None
                tracker = trackers[index] = _ChoiceLogprobs(serving.tokenizer, echo=echo)
                if req.echo:
                    emitted[index] = len(text)
                    lp = tracker.take(emitted[index], False) if req.logprobs is not None else None
                    yield chunk([P.CompletionChoice(index=index, text=text, logprobs=lp)])
            if usage is not None:
                usage.completion_tokens += len(c.token_ids)
            emitted[index] += len(c.text)
            lp = None
            if req.logprobs is not None:
                tracker.add(c.logprobs or [])
                lp = tracker.take(emitted[index], c.finish_reason is not None)
            if not c.text and c.finish_reason is None and not (lp and lp.tokens):
                continue
            yield chunk(
                [P.CompletionChoice(index=index, text=c.text, logprobs=lp, finish_reason=c.finish_reason)]
            )
        if usage is not None:
            usage.total_tokens = usage.prompt_tokens + usage.completion_tokens
            body = P.CompletionResponse(
                id=rid, created=created, model=serving.model_name, choices=[], usage=usage
            )
            yield sse(body)
    except Exception as e:  # noqa: BLE001 - headers are sent: report in the stream, log for the bug hunt
        log.exception("completion stream failed")
        yield sse(P.APIError(500, f"internal error: {type(e).__name__}", type="server_error").body())
    finally:
        run.cancel()
    yield "data: [DONE]\n\n"
