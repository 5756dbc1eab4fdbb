"""Tool (function) calling: how tools and tool calls are written into a prompt, how a model's tool calls are read
back from its text, and the grammar that forces valid calls when a call is required.

Two output styles, chosen from the chat template (and vocabulary) of the model:
- `HermesFormat`: ChatML models (SmolLM2, Qwen2/2.5, Hermes) write each call as
  `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`; results come back in `<tool_response>` tags.
- `Llama3Format`: Llama-3.1 writes a call as a bare JSON object `{"name": ..., "parameters": {...}}`
  (optionally after `<|python_tag|>`, several joined by ";"); results come back with the `ipython` role.

Reading: a call is parsed from the text the model wrote; the text around calls is the content. Tool markup
never reaches the content: an output cut by `max_tokens` inside a call reports that call as far as it was
written (its name, and its arguments as the raw text so far, as OpenAI reports a cut call) with
finish_reason "length", and drops a cut opening tag; a call that is complete but not valid (unknown function,
not JSON) is not a call, and the output stays content as the model wrote it. A stream (`ToolStream`) holds
back whatever may be part of a call and ends with exactly the content and calls of the non-streamed parse.

Rendering: a template that uses the Hugging Face `tools` variable gets the tools and the messages as
transformers passes them (`tool_calls` with `arguments` as an object, `tool` role messages); otherwise a
built-in system message describes the tools in the model's style, and earlier calls and their results are
written as text in that style.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import jinja2
import jinja2.meta

from spqr_run.structured import JSON_OPTIONS


@dataclass
class ToolCallText:
    """A parsed call: the function name and its arguments as JSON text."""

    name: str
    arguments: str
    id: str = ""

    def __post_init__(self) -> None:
        if not self.id:
            self.id = f"call_{uuid.uuid4().hex[:24]}"


def _arguments_object(arguments: Any) -> Any:
    """OpenAI sends arguments as JSON text; templates expect an object. Unparsable text stays text."""
    if isinstance(arguments, str):
        try:
            return json.loads(arguments)
        except ValueError:
            return arguments
    return arguments


def _parameters(function: dict[str, Any]) -> dict[str, Any]:
    params = function.get("parameters")
    return params if isinstance(params, dict) else {"type": "object", "properties": {}}


class ToolFormat:
    """How one family of models writes tool calls; subclasses fill in the style."""

    name = "base"
    arguments_key = "arguments"
    separator = "\n"  # between parallel calls

    # ---- writing into the prompt -------------------------------------------------------------------
    def system_prompt(self, tools: list[dict[str, Any]]) -> str:
        raise NotImplementedError

    def call_text(self, name: str, arguments: Any) -> str:
        raise NotImplementedError

    def result_message(self, contents: list[str]) -> dict[str, Any]:
        raise NotImplementedError

    # ---- reading the output -----------------------------------------------------------------------
    def parse(
        self, text: str, known: Iterable[str], *, cut: bool = False
    ) -> tuple[str | None, list[ToolCallText]]:
        """(content, calls) of a finished output; no calls when it holds none or any is malformed. `cut`:
        max_tokens ended the output, so its last call may be incomplete (reported as far as written)."""
        raise NotImplementedError

    latches = False  # once the output is seen not to start with a call, none can follow

    def hold_from(self, text: str) -> int | None:
        """Where in `text` (the output so far) a tool call may start: a stream holds the text from there
        back until the end; None when no call can be under way."""
        raise NotImplementedError

    # ---- forcing a call -----------------------------------------------------------------------------
    def call_schema(self, function: dict[str, Any]) -> dict[str, Any]:
        """JSON schema of one call object to `function` (name first, then the arguments)."""
        return {
            "type": "object",
            "properties": {
                "name": {"const": function["name"]},
                self.arguments_key: _parameters(function),
            },
            "required": ["name", self.arguments_key],
            "additionalProperties": False,
            "x-guidance": JSON_OPTIONS,
        }

    def call_rule(self) -> str:
        """Lark rule body of one call, `body` being the JSON object."""
        raise NotImplementedError

    def lark(self, functions: list[dict[str, Any]], *, parallel: bool) -> str:
        """A grammar (llguidance Lark) of one call, or with `parallel` one or more, to any of `functions`."""
        bodies = [f"fn{i}" for i in range(len(functions))]
        lines = [
            "start: call" + (f' ("{_lark_escape(self.separator)}" call)*' if parallel else ""),
            "call: " + self.call_rule(),
            "body: " + " | ".join(bodies),
        ]
        for rule, function in zip(bodies, functions, strict=True):
            lines.append(f"{rule}: %json {json.dumps(self.call_schema(function))}")
        return "\n".join(lines)


class HermesFormat(ToolFormat):
    name = "hermes"
    OPEN, CLOSE = "<tool_call>", "</tool_call>"
    _CALL = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.DOTALL)

    def system_prompt(self, tools: list[dict[str, Any]]) -> str:
        listing = "\n".join(json.dumps(t, ensure_ascii=False) for t in tools)
        return (
            "You can call functions to help answer. The available functions, one JSON signature per line, "
            f"are inside <tools></tools>:\n<tools>\n{listing}\n</tools>\n\n"
            "To call a function, reply with a JSON object holding its name and arguments inside "
            "<tool_call></tool_call> tags, one block per call:\n"
            '<tool_call>\n{"name": "function_name", "arguments": {"argument": "value"}}\n</tool_call>'
        )

    def call_text(self, name: str, arguments: Any) -> str:
        body = json.dumps({"name": name, "arguments": _arguments_object(arguments)}, ensure_ascii=False)
        return f"{self.OPEN}\n{body}\n{self.CLOSE}"

    def result_message(self, contents: list[str]) -> dict[str, Any]:
        text = "\n".join(f"<tool_response>\n{c}\n</tool_response>" for c in contents)
        return {"role": "user", "content": text}

    def parse(
        self, text: str, known: Iterable[str], *, cut: bool = False
    ) -> tuple[str | None, list[ToolCallText]]:
        names = set(known)
        outside: list[str] = []  # the text before, between and after the calls
        calls: list[ToolCallText] = []
        markup, pos = False, 0
        while True:
            start = text.find(self.OPEN, pos)
            if start < 0:
                tail = text[pos:]
                if cut and (keep := _partial_start(tail, self.OPEN)) < len(tail):
                    tail, markup = tail[:keep], True  # cut inside an opening tag
                outside.append(tail)
                break
            markup = True
            outside.append(text[pos:start])
            close = text.find(self.CLOSE, start)
            body = text[start + len(self.OPEN) : len(text) if close < 0 else close]
            if close < 0 and cut:
                body = body[: _partial_start(body, self.CLOSE)]  # cut inside the closing tag
            call = _call_from_json(body.strip(), names, self.arguments_key)
            if call is None:
                if not (cut and close < 0 and not _is_json(body)):
                    return text, []  # a malformed call is no call: the output stays content
                partial = _partial_call(body, self.arguments_key)  # cut by max_tokens inside it
                calls += [partial] if partial is not None else []
                break
            calls.append(call)
            pos = len(text) if close < 0 else close + len(self.CLOSE)
        if not markup:
            return text, []
        parts = [outside[0].rstrip(), *(o.strip() for o in outside[1:])]
        return "\n".join(p for p in parts if p) or None, calls

    def hold_from(self, text: str) -> int | None:
        i = text.find(self.OPEN)
        if i < 0:
            i = _partial_start(text, self.OPEN)
        i = len(text[:i].rstrip())  # the whitespace before a call is not content either
        return i if i < len(text) else None

    def call_rule(self) -> str:
        return f'"{_lark_escape(self.OPEN)}\\n" body "\\n{_lark_escape(self.CLOSE)}"'


class Llama3Format(ToolFormat):
    name = "llama3"
    arguments_key = "parameters"
    separator = "; "
    TAG = "<|python_tag|>"

    def system_prompt(self, tools: list[dict[str, Any]]) -> str:
        listing = "\n\n".join(json.dumps(t, ensure_ascii=False, indent=4) for t in tools)
        return (
            "You have access to the following functions. To call a function, respond with only a JSON object "
            'of the form {"name": function name, "parameters": object of argument names and values}; '
            "no other text.\n\n" + listing
        )

    def call_text(self, name: str, arguments: Any) -> str:
        return json.dumps({"name": name, "parameters": _arguments_object(arguments)}, ensure_ascii=False)

    def result_message(self, contents: list[str]) -> dict[str, Any]:
        return {"role": "ipython", "content": "\n".join(contents)}

    def parse(
        self, text: str, known: Iterable[str], *, cut: bool = False
    ) -> tuple[str | None, list[ToolCallText]]:
        body = text.strip()
        if body.startswith(self.TAG):
            body = body[len(self.TAG) :].strip()
        if not body.startswith("{"):
            return text, []
        names, decoder, calls, pos = set(known), json.JSONDecoder(), [], 0
        while pos < len(body):
            try:
                obj, end = decoder.raw_decode(body, pos)
            except ValueError:
                if not cut:
                    return text, []
                partial = _partial_call(body[pos:], self.arguments_key)  # cut by max_tokens inside it
                if partial is None and not calls:
                    return text, []  # nothing shows it was a call
                return None, calls + ([partial] if partial is not None else [])
            call = _call_from_object(obj, names, self.arguments_key)
            if call is None:
                return text, []
            calls.append(call)
            pos = end
            while pos < len(body) and body[pos] in " \t\r\n;":
                pos += 1
        return None, calls

    latches = True

    def hold_from(self, text: str) -> int | None:
        body = text.lstrip()
        if not body or body.startswith("{") or body.startswith(self.TAG) or self.TAG.startswith(body):
            return 0
        return None

    def call_rule(self) -> str:
        return "body"


class ToolStream:
    """Splits a streamed output into content to send now and, at the end, the tool calls: text that may be a
    call is held back until the output ends (then it is either parsed into calls or sent as content)."""

    def __init__(self, fmt: ToolFormat, known: Iterable[str]) -> None:
        self.fmt, self.known = fmt, list(known)
        self.text, self.sent, self.free = "", 0, False

    def push(self, piece: str) -> str:
        """Add output text; returns the content that can be sent now."""
        self.text += piece
        hold = None if self.free else self.fmt.hold_from(self.text)
        if hold is None and self.fmt.latches:
            self.free = True
        end = len(self.text) if hold is None else max(hold, self.sent)
        out, self.sent = self.text[self.sent : end], end
        return out

    def finish(self, *, cut: bool = False) -> tuple[str, list[ToolCallText]]:
        """At the end of the output (`cut`: by max_tokens): (content still to send, tool calls), so that the
        content sent in all is the non-streamed parse's content."""
        if self.free:
            rest, calls = self.text[self.sent :], []
        else:
            content, calls = self.fmt.parse(self.text, self.known, cut=cut)
            sent = self.text[: self.sent]
            # what was sent is a prefix of the content (`hold_from` never lets out a call's first character
            # nor the whitespace before it); anything else would be a bug, and sent text cannot be taken back
            rest = (content or "")[len(sent) :] if (content or "").startswith(sent) else ""
        self.sent = len(self.text)
        return rest, calls


def _partial_start(text: str, tag: str) -> int:
    """Where `text` ends with the start of `tag` ("<tool_c"), or len(text) when it does not."""
    partial = [k for k in range(1, len(tag)) if text.endswith(tag[:k])]
    return len(text) - max(partial) if partial else len(text)


def _is_json(text: str) -> bool:
    try:
        json.loads(text)
    except ValueError:
        return False
    return True


_NAME = re.compile(r'"name"\s*:\s*"((?:[^"\\]|\\.)*)')


def _partial_call(body: str, arguments_key: str) -> ToolCallText | None:
    """A call cut by max_tokens: its name as far as written and its arguments as the raw text written so far
    (OpenAI's form of a cut call); None before the name has begun."""
    m = _NAME.search(body)
    if m is None:
        return None
    raw = m.group(1).rstrip("\\")  # a cut escape sequence
    try:
        name = json.loads(f'"{raw}"')
    except ValueError:
        name = raw
    rest = body[m.end() :]
    keys = "|".join(re.escape(k) for k in dict.fromkeys((arguments_key, "arguments", "parameters")))
    a = re.search(rf'"(?:{keys})"\s*:\s*', rest)
    return ToolCallText(name, rest[a.end() :].rstrip() if a else "")


def _call_from_json(text: str, names: set[str], arguments_key: str) -> ToolCallText | None:
    try:
        obj = json.loads(text)
    except ValueError:
        return None
    return _call_from_object(obj, names, arguments_key)


def _call_from_object(obj: Any, names: set[str], arguments_key: str) -> ToolCallText | None:
    """A call from {"name", "arguments"|"parameters"}; None when it is not one or names an unknown tool."""
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or obj["name"] not in names:
        return None
    args = obj.get(arguments_key, obj.get("arguments", obj.get("parameters", {})))
    if isinstance(args, str):  # some models write the arguments as a JSON string
        try:
            args = json.loads(args)
        except ValueError:
            return None
    if not isinstance(args, dict):
        return None
    return ToolCallText(obj["name"], json.dumps(args, ensure_ascii=False))


def _lark_escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _template_variables(source: str) -> set[str]:
    """Names a Jinja template reads from its context (parsing only; nothing is run)."""
    try:
        return set(jinja2.meta.find_undeclared_variables(jinja2.Environment().parse(source)))
    except jinja2.TemplateSyntaxError:
        return set()


@dataclass
class ToolSupport:
    """What a chat template does with tools, and the model's tool-call style."""

    format: ToolFormat
    template_tools: bool  # the template renders `tools` itself
    template_calls: bool  # ... and assistant `tool_calls` and `tool` messages

    @classmethod
    def detect(cls, template_source: str, vocab: Iterable[str] = ()) -> ToolSupport:
        """From the template's text: `<tool_call>` means Hermes style, `<|python_tag|>` or Llama-3 headers
        mean Llama-3.1 style; a template without tools falls back to the vocabulary's family."""
        variables = _template_variables(template_source)
        uses_tools = "tools" in variables
        if "<tool_call>" in template_source:
            fmt: ToolFormat = HermesFormat()
        elif "<|python_tag|>" in template_source or "<|start_header_id|>" in template_source:
            fmt = Llama3Format()
        elif "<|start_header_id|>" in set(vocab):
            fmt = Llama3Format()
        else:
            fmt = HermesFormat()
        return cls(fmt, uses_tools, uses_tools and "tool_calls" in template_source)

    def messages(
        self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None
    ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        """The messages (OpenAI shapes: `tool_calls`, `tool` role) rewritten for the template, and the extra
        template variables (`tools`). Without the template's own support, the tools become a system message
        and calls and results become text in the model's style."""
        if self.template_calls:
            out = [_hf_message(m) for m in messages]
            return out, ({"tools": tools} if tools else {})
        out: list[dict[str, Any]] = []
        results: list[str] = []
        for m in messages:
            if m["role"] == "tool":
                results.append(m.get("content") or "")
                continue
            if results:
                out.append(self.format.result_message(results))
                results = []
            if m["role"] == "assistant" and m.get("tool_calls"):
                calls = [
                    self.format.call_text(c["function"]["name"], c["function"]["arguments"])
                    for c in m["tool_calls"]
                ]
                text = "\n".join(([m["content"]] if m.get("content") else []) + calls)
                out.append({"role": "assistant", "content": text})
            else:
                out.append({k: v for k, v in m.items() if k not in ("tool_calls", "tool_call_id")})
        if results:
            out.append(self.format.result_message(results))
        if tools and self.template_tools:
            return out, {"tools": tools}
        if tools:
            prompt = self.format.system_prompt(tools)
            if out and out[0]["role"] == "system":
                out[0] = {**out[0], "content": f"{out[0].get('content') or ''}\n\n{prompt}".lstrip()}
            else:
                out.insert(0, {"role": "system", "content": prompt})
        return out, {}


def _hf_message(m: dict[str, Any]) -> dict[str, Any]:
    """An OpenAI message as transformers' chat templates expect it (arguments as objects)."""
    if m["role"] == "assistant" and m.get("tool_calls"):
        calls = [
            {
                "id": c.get("id"),
                "type": "function",
                "function": {
                    "name": c["function"]["name"],
                    "arguments": _arguments_object(c["function"]["arguments"]),
                },
            }
            for c in m["tool_calls"]
        ]
        return {**m, "content": m.get("content") or "", "tool_calls": calls}
    return m
