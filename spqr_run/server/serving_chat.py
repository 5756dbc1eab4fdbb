"""POST /v1/chat/completions: messages rendered with the model's chat template, `n` samples, logprobs."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable

from spqr_run.generation import TokenLogprob
from spqr_run.server import protocol as P
from spqr_run.server.protocol import APIError
from spqr_run.server.serving import ChoiceResult, OpenAIServing, RequestRun, sse, until_disconnected
from spqr_run.server.serving_structured import ChatPlan, chat_plan, tool_call_deltas, tool_calls
from spqr_run.tokenizer import Tokenizer

log = logging.getLogger("spqr_run.server")


def _top(tok: Tokenizer, token_id: int, logprob: float) -> P.TopLogprob:
    """`token`: distinct per token ("bytes:\\xf0\\x9f" for part of a character, see `Tokenizer.token_string`);
    `bytes`: the token's own UTF-8 bytes, so a choice's joined bytes are its content; null for a special token
    (an end of turn), which adds nothing to the content."""
    raw = None if tok.is_special(token_id) else list(tok.token_bytes(token_id))
    return P.TopLogprob(token=tok.token_string(token_id), logprob=logprob, bytes=raw)


def _logprobs(tok: Tokenizer, tokens: list[TokenLogprob]) -> P.ChatLogprobs:
    return P.ChatLogprobs(
        content=[
            P.ChatTokenLogprob(
                **_top(tok, t.token_id, t.logprob).model_dump(),
                top_logprobs=[_top(tok, i, lp) for i, _, lp in t.top],
            )
            for t in tokens
        ]
    )


async def create_chat_completion(
    serving: OpenAIServing, req: P.ChatCompletionRequest, is_disconnected: Callable[[], Awaitable[bool]]
) -> P.ChatCompletionResponse | AsyncIterator[str] | None:
    """A response, an SSE stream (when `req.stream`), or None when the client left before the end."""
    serving.check_model(req.model)
    if req.top_logprobs is not None and not req.logprobs:
        raise APIError(400, "top_logprobs requires logprobs to be true", param="top_logprobs")
    plan = await chat_plan(serving, req)  # response_format, tools, tool_choice
    ids = serving.chat_prompt(req.messages, plan.prompt_tools)
    requested = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    max_tokens = serving.budget(len(ids), requested, "messages")
    params = serving.sampling_params(
        req, max_tokens=max_tokens, logprobs=(req.top_logprobs or 0) if req.logprobs else None
    )
    rid, created = P.new_id("chatcmpl"), P.now()
    usage = P.Usage(prompt_tokens=len(ids))
    run = serving.start([ids], [params], req.n, constraints=[plan.constraint])
    if req.stream:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        return _stream(serving, req, run, rid, created, usage if include_usage else None, plan)
    results: list[ChoiceResult] | None = await until_disconnected(serving.collect(run), is_disconnected)
    if results is None:
        return None
    choices = []
    for index, r in enumerate(results):
        content, calls = plan.parse("".join(r.text), cut=r.finish_reason == "length")
        message = P.AssistantMessage(content=content, tool_calls=tool_calls(calls) if calls else None)
        finish = "tool_calls" if calls and r.finish_reason == "stop" else r.finish_reason
        lp = _logprobs(serving.tokenizer, r.logprobs) if req.logprobs else None
        choices.append(P.ChatChoice(index=index, message=message, logprobs=lp, finish_reason=finish))
        usage.completion_tokens += r.completion_tokens
    usage.total_tokens = usage.prompt_tokens + usage.completion_tokens
    return P.ChatCompletionResponse(
        id=rid, created=created, model=serving.model_name, choices=choices, usage=usage
    )


async def _stream(
    serving: OpenAIServing,
    req: P.ChatCompletionRequest,
    run: RequestRun,
    rid: str,
    created: int,
    usage: P.Usage | None,
    plan: ChatPlan,
) -> AsyncIterator[str]:
    def chunk(choices: list[P.ChatChunkChoice], **extra: object) -> str:
        body = P.ChatCompletionChunk(
            id=rid, created=created, model=serving.model_name, choices=choices, **extra
        )
        return sse(body.model_dump(exclude_none=True))

    tool_streams = [plan.stream() for _ in range(run.choices)]  # None without tools
    try:
        for index in range(run.choices):
            yield chunk([P.ChatChunkChoice(index=index, delta=P.ChatDelta(role="assistant", content=""))])
        async for index, c in run:
            if usage is not None:
                usage.completion_tokens += len(c.token_ids)
            lp = _logprobs(serving.tokenizer, c.logprobs) if req.logprobs and c.logprobs else None
            ts = tool_streams[index]
            text = c.text if ts is None else ts.push(c.text)  # text that may be a tool call is held back
            if text or lp is not None:
                yield chunk([P.ChatChunkChoice(index=index, delta=P.ChatDelta(content=text), logprobs=lp)])
            if c.finish_reason is not None:
                finish = c.finish_reason
                if ts is not None:
                    rest, calls = ts.finish(cut=finish == "length")
                    if rest:
                        yield chunk([P.ChatChunkChoice(index=index, delta=P.ChatDelta(content=rest))])
                    if calls:
                        delta = P.ChatDelta(tool_calls=tool_call_deltas(calls))
                        yield chunk([P.ChatChunkChoice(index=index, delta=delta)])
                        finish = "tool_calls" if finish == "stop" else finish
                yield chunk([P.ChatChunkChoice(index=index, delta=P.ChatDelta(), finish_reason=finish)])
        if usage is not None:
            usage.total_tokens = usage.prompt_tokens + usage.completion_tokens
            yield chunk([], usage=usage)
    except Exception as e:  # noqa: BLE001 - headers are sent: report in the stream, log for the bug hunt
        log.exception("chat stream failed")
        yield sse(APIError(500, f"internal error: {type(e).__name__}", type="server_error").body())
    finally:
        run.cancel()
    yield "data: [DONE]\n\n"
