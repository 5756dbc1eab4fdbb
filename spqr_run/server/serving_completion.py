"""POST /v1/completions: plain text completion, one or many prompts, `n` samples each, echo and logprobs."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable

from spqr_run.generation import TokenLogprob
from spqr_run.server import protocol as P
from spqr_run.server.serving import ChoiceResult, OpenAIServing, RequestRun, sse, until_disconnected

log = logging.getLogger("spqr_run.server")


def _logprobs(
    tokens: list[TokenLogprob], *, echo_ids: list[int], serving: OpenAIServing, offset: int
) -> P.CompletionLogprobs:
    """OpenAI's legacy logprobs object; echoed prompt tokens carry null logprobs (not computed)."""
    out = P.CompletionLogprobs()
    for token_id in echo_ids:
        text = serving.tokenizer.token_text(token_id)
        out.tokens.append(text)
        out.token_logprobs.append(None)
        out.top_logprobs.append(None)
        out.text_offset.append(offset)
        offset += len(text)
    for t in tokens:
        out.tokens.append(t.text)
        out.token_logprobs.append(t.logprob)
        out.top_logprobs.append({text: lp for _, text, lp in t.top})
        out.text_offset.append(offset)
        offset += len(t.text)
    return out


async def create_completion(
    serving: OpenAIServing, req: P.CompletionRequest, is_disconnected: Callable[[], Awaitable[bool]]
) -> P.CompletionResponse | AsyncIterator[str] | None:
    """A response, an SSE stream (when `req.stream`), or None when the client left before the end."""
    serving.check_model(req.model)
    prompts = serving.completion_prompts(req)
    params = [
        serving.sampling_params(
            req, max_tokens=serving.budget(len(ids), req.max_tokens, "prompt"), logprobs=req.logprobs
        )
        for ids, _ in prompts
    ]
    ids_list = [ids for ids, _ in prompts]
    rid, created, n = P.new_id("cmpl"), P.now(), req.n
    usage = P.Usage(prompt_tokens=sum(len(ids) for ids in ids_list))
    run = serving.start(ids_list, params, n)
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
        lp = None
        if req.logprobs is not None:
            lp = _logprobs(r.logprobs, echo_ids=ids if req.echo else [], serving=serving, offset=0)
        choices.append(
            P.CompletionChoice(
                index=index, text=prefix + "".join(r.text), logprobs=lp, finish_reason=r.finish_reason
            )
        )
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

    offsets = [0] * run.choices
    try:
        if req.echo:
            for index in range(run.choices):
                ids, text = prompts[index // req.n]
                lp = None
                if req.logprobs is not None:
                    lp = _logprobs([], echo_ids=ids, serving=serving, offset=0)
                offsets[index] = len(text)
                yield chunk([P.CompletionChoice(index=index, text=text, logprobs=lp)])
        async for index, c in run:
            if usage is not None:
                usage.completion_tokens += len(c.token_ids)
            if not c.text and c.finish_reason is None and req.logprobs is None:
                continue
            lp = None
            if req.logprobs is not None:
                lp = _logprobs(c.logprobs or [], echo_ids=[], serving=serving, offset=offsets[index])
            offsets[index] += len(c.text)
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
