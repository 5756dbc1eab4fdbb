"""Structured outputs and tool calls for the OpenAI endpoints: `response_format`, `tools`, `tool_choice` ->
a grammar constraint for the engine, the tools for the prompt, and the tool calls read back from the output.

Compiling runs in a worker thread (the first one builds the vocabulary index, ~0.5 s) so the event loop
keeps serving; a schema or grammar the engine refuses is a 400 naming the parameter and the problem.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

from spqr_run.server import protocol as P
from spqr_run.server.protocol import APIError
from spqr_run.structured import Constraint, GrammarEngine, GrammarError
from spqr_run.tools import ToolCallText, ToolFormat, ToolStream


@dataclass
class ChatPlan:
    """What a chat request asks beyond plain text."""

    constraint: Constraint | None = None
    prompt_tools: list[dict[str, Any]] | None = None  # tools written into the prompt
    tool_format: ToolFormat | None = None  # set when the output is to be read for tool calls
    tool_names: list[str] = field(default_factory=list)

    def parse(self, text: str, *, cut: bool = False) -> tuple[str | None, list[ToolCallText]]:
        """(content, tool calls) of a finished output (`cut`: max_tokens ended it, maybe inside a call)."""
        if self.tool_format is None:
            return text, []
        return self.tool_format.parse(text, self.tool_names, cut=cut)

    def stream(self) -> ToolStream | None:
        return ToolStream(self.tool_format, self.tool_names) if self.tool_format is not None else None


def _compile(engine: GrammarEngine, fmt: P.ResponseFormat) -> Constraint | None:
    if fmt.type == "json_object":
        return engine.compile_json_object()
    if fmt.type == "json_schema":
        if fmt.json_schema is None:
            raise GrammarError("response_format of type json_schema needs a json_schema object")
        schema = fmt.json_schema.schema_
        if schema is None:
            return engine.compile_json_object()
        return engine.compile_json_schema(
            schema, what=f"JSON schema {fmt.json_schema.name!r}", where="response_format.json_schema.schema"
        )
    return None


async def response_format_constraint(serving: Any, fmt: P.ResponseFormat | None) -> Constraint | None:
    """The constraint of `response_format` (None for text); 400 when it cannot be compiled."""
    if fmt is None or fmt.type == "text":
        return None
    try:
        return await asyncio.to_thread(lambda: _compile(serving.grammars.get(), fmt))
    except GrammarError as e:
        raise APIError(400, str(e), param="response_format") from None


async def chat_plan(serving: Any, req: P.ChatCompletionRequest) -> ChatPlan:
    """Check `tools` / `tool_choice` / `response_format` together and build the plan; 400 on conflicts."""
    tools = [t.model_dump(exclude_none=True) for t in req.tools or []]
    names = [t["function"]["name"] for t in tools]
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise APIError(400, f"tools: the function name {dup!r} appears more than once", param="tools")
    choice = req.tool_choice if req.tool_choice is not None else ("auto" if tools else "none")
    if not tools and (choice == "required" or isinstance(choice, P.NamedToolChoice)):
        raise APIError(400, "tool_choice needs a non-empty tools list", param="tool_choice")
    forced: list[dict[str, Any]] = []
    if isinstance(choice, P.NamedToolChoice):
        name = choice.function.name
        if name not in names:
            raise APIError(
                400, f"tool_choice names the function {name!r}, which is not in tools", param="tool_choice"
            )
        forced = [tools[names.index(name)]["function"]]
    elif choice == "required":
        forced = [t["function"] for t in tools]
    fmt_constraint = await response_format_constraint(serving, req.response_format)
    if fmt_constraint is not None and forced:
        raise APIError(
            400,
            "response_format cannot be combined with tool_choice 'required' or a named function",
            param="response_format",
        )
    if choice == "none" or not tools:
        return ChatPlan(constraint=fmt_constraint)
    fmt = serving.tool_support.format
    plan = ChatPlan(
        constraint=fmt_constraint,
        prompt_tools=tools,
        tool_format=fmt if fmt_constraint is None else None,
        tool_names=names,
    )
    if forced:
        lark = fmt.lark(forced, parallel=req.parallel_tool_calls and choice == "required")
        try:
            plan.constraint = await asyncio.to_thread(
                lambda: serving.grammars.get().compile_lark(lark, what="tool parameters schema")
            )
        except GrammarError as e:
            detail = await asyncio.to_thread(_tool_refusal, serving.grammars.get(), forced, names)
            raise APIError(400, detail or str(e), param="tools") from None
    return plan


def _tool_refusal(engine: GrammarEngine, forced: list[dict[str, Any]], names: list[str]) -> str | None:
    """Which forced tool's `parameters` the engine refuses, in one sentence with the keyword's path in the
    request (`tools[i].function.parameters...`); None when each compiles alone."""
    for function in forced:
        params = function.get("parameters")
        if not isinstance(params, dict):
            continue
        i = names.index(function["name"])
        try:
            engine.compile_json_schema(
                params,
                what=f"parameters of tool {function['name']!r}",
                where=f"tools[{i}].function.parameters",
            )
        except GrammarError as e:
            return str(e)
    return None


def tool_calls(calls: list[ToolCallText]) -> list[P.ToolCall]:
    return [P.ToolCall(id=c.id, function=P.FunctionCall(name=c.name, arguments=c.arguments)) for c in calls]


def tool_call_deltas(calls: list[ToolCallText]) -> list[P.ToolCallDelta]:
    """OpenAI's streamed form: per call, its id and name (empty arguments), then its arguments."""
    out = []
    for k, c in enumerate(calls):
        out.append(
            P.ToolCallDelta(
                index=k, id=c.id, type="function", function=P.FunctionCallDelta(name=c.name, arguments="")
            )
        )
        out.append(P.ToolCallDelta(index=k, function=P.FunctionCallDelta(arguments=c.arguments)))
    return out


def message_dict(m: P.ChatMessage) -> dict[str, Any]:
    """A request message as the chat template (and `ToolSupport.messages`) reads it."""
    d: dict[str, Any] = {"role": "system" if m.role == "developer" else m.role, "content": m.text()}
    if m.tool_calls:
        d["tool_calls"] = [c.model_dump() for c in m.tool_calls]
    if m.tool_call_id is not None:
        d["tool_call_id"] = m.tool_call_id
    if m.name is not None:
        d["name"] = m.name
    return d
