"""POST /v1/completions: plain text completion, one or many prompts, `n` samples each, echo and logprobs."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable

from spqr_run.generation import TokenLogprob
from spqr_run.server import protocol as P
from spqr_run.server.serving import ChoiceResult, OpenAIServing, RequestRun, sse, until_disconnected
from spqr_run.server.serving_structured import response_format_constraint

log = logging.getLogger("spqr_run.server")


def _logprobs(
    tokens: list[TokenLogprob],
    *,
    prompt: tuple[list[int], list[TokenLogprob]] | None,
    serving: OpenAIServing,
    offset: int,
) -> P.CompletionLogprobs:
    """OpenAI's legacy logprobs object. With `prompt` (echo: its ids and the scores of all but the first),
    the prompt's tokens come first, the first one with null logprobs as OpenAI gives it."""
    out = P.CompletionLogprobs()

    def add(text: str, logprob: float | None, top: dict[str, float] | None) -> None:
        nonlocal offset
        out.tokens.append(text)
        out.token_logprobs.append(logprob)
        out.top_logprobs.append(top)
        out.text_offset.append(offset)
        offset += len(text)

    if prompt is not None:
        ids, scored = prompt
        add(serving.tokenizer.token_text(ids[0]), None, None)
        for t in scored:
            add(t.text, t.logprob, {text: lp for _, text, lp in t.top})
    for t in tokens:
        add(t.text, t.logprob, {text: lp for _, text, lp in t.top})
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
        lp = None
        if req.logprobs is not None:
            echoed = (ids, r.prompt_logprobs or []) if req.echo else None
            lp = _logprobs(r.logprobs, prompt=echoed, serving=serving, offset=0)
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
    echoed = [not req.echo] * run.choices
    try:
        async for index, c in run:
            if not echoed[index]:  # the prompt first, with its scores when they were asked for
                echoed[index] = True
                ids, text = prompts[index // req.n]
                lp = None
                if req.logprobs is not None:
                    lp = _logprobs([], prompt=(ids, c.prompt_logprobs or []), serving=serving, offset=0)
                offsets[index] = len(text)
                yield chunk([P.CompletionChoice(index=index, text=text, logprobs=lp)])
            if usage is not None:
                usage.completion_tokens += len(c.token_ids)
            if not c.text and c.finish_reason is None and req.logprobs is None:
                continue
            lp = None
            if req.logprobs is not None:
                lp = _logprobs(c.logprobs or [], prompt=None, serving=serving, offset=offsets[index])
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
