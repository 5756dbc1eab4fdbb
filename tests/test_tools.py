"""Tool calls: parsing model-style output (ChatML `<tool_call>` and Llama-3.1 styles), streaming it, rendering
tools and earlier calls into prompts, and `tools` / `tool_choice` through the real `openai` client."""

from __future__ import annotations

import json
import threading

import httpx
import jsonschema
import openai
import pytest
from test_server_support import API_KEY, MODEL_NAME, Server, needs_model

from spqr_run.chat_template import CHATML, LLAMA3, ChatTemplate
from spqr_run.tools import HermesFormat, Llama3Format, ToolStream, ToolSupport

WEATHER = {
    "name": "get_weather",
    "description": "Current weather of a city",
    "parameters": {
        "type": "object",
        "properties": {
            "city": {"type": "string", "maxLength": 40},
            "unit": {"enum": ["celsius", "fahrenheit"]},
        },
        "required": ["city", "unit"],
        "additionalProperties": False,
    },
}
TIME = {
    "name": "get_time",
    "description": "Current time in a time zone",
    "parameters": {
        "type": "object",
        "properties": {"zone": {"type": "string", "maxLength": 40}},
        "required": ["zone"],
        "additionalProperties": False,
    },
}
TOOLS = [{"type": "function", "function": f} for f in (WEATHER, TIME)]
NAMES = ["get_weather", "get_time"]


# ---- parsing fixed model-style text ----------------------------------------------------------------------
def test_hermes_parse() -> None:
    fmt = HermesFormat()
    content, calls = fmt.parse(
        'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}\n'
        '</tool_call>\n<tool_call>\n{"name": "get_time", "arguments": "{\\"zone\\": \\"CET\\"}"}\n</tool_call>',
        NAMES,
    )
    assert content == "Let me check."
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [
        ("get_weather", {"city": "Paris", "unit": "celsius"}),
        ("get_time", {"zone": "CET"}),
    ]
    assert calls[0].id.startswith("call_") and calls[0].id != calls[1].id
    # a call the model ended without its closing tag still counts; plain text has none
    _, calls = fmt.parse('<tool_call>\n{"name": "get_time", "arguments": {"zone": "UTC"}}', NAMES)
    assert [c.name for c in calls] == ["get_time"]
    assert fmt.parse("Paris is sunny.", NAMES) == ("Paris is sunny.", [])


@pytest.mark.parametrize(
    "text",
    [
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Pa',  # ended (not cut) inside a call
        '<tool_call>\n{"name": "send_mail", "arguments": {}}\n</tool_call>',  # not a tool of the request
        '<tool_call>\n["get_weather"]\n</tool_call>',
    ],
)
def test_hermes_malformed_calls_stay_content(text: str) -> None:
    assert HermesFormat().parse(text, NAMES) == (text, [])


def test_llama3_parse() -> None:
    fmt = Llama3Format()
    content, calls = fmt.parse(
        '{"name": "get_weather", "parameters": {"city": "Oslo", "unit": "celsius"}}', NAMES
    )
    assert content is None and json.loads(calls[0].arguments) == {"city": "Oslo", "unit": "celsius"}
    _, calls = fmt.parse(
        '<|python_tag|>{"name": "get_time", "parameters": {"zone": "UTC"}}; '
        '{"name": "get_weather", "arguments": {"city": "Rome", "unit": "celsius"}}',
        NAMES,
    )
    assert [c.name for c in calls] == ["get_time", "get_weather"]
    assert fmt.parse("The weather is fine.", NAMES) == ("The weather is fine.", [])
    assert fmt.parse('{"name": "get_time", "parameters": {"zone": "UTC"}} and more', NAMES)[1] == []


def _feed(stream: ToolStream, text: str, step: int = 3) -> str:
    return "".join(stream.push(text[i : i + step]) for i in range(0, len(text), step))


def test_stream_holds_back_calls_only() -> None:
    text = 'Checking a < b.\n<tool_call>\n{"name": "get_time", "arguments": {"zone": "UTC"}}\n</tool_call>'
    s = ToolStream(HermesFormat(), NAMES)
    sent = _feed(s, text, step=1)
    rest, calls = s.finish()
    assert sent + rest == "Checking a < b." and [c.name for c in calls] == ["get_time"]
    plain = "x <tool it is not>"
    s = ToolStream(HermesFormat(), NAMES)
    sent = _feed(s, plain, step=2)
    rest, calls = s.finish()
    assert sent + rest == plain and calls == []
    # Llama-3.1 style: an answer starting with "{" is held to the end; one starting with text is not
    s = ToolStream(Llama3Format(), NAMES)
    assert _feed(s, "Sure: {1}") == "Sure: {1}"
    s = ToolStream(Llama3Format(), NAMES)
    assert _feed(s, '{"name": "get_time", "parameters": {"zone": "UTC"}}') == ""
    assert [c.name for c in s.finish()[1]] == ["get_time"]


# ---- outputs cut by max_tokens (issue 23 item 2) ----------------------------------------------------------
CALL_W = '{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}'
CALL_T = '{"name": "get_time", "arguments": {"zone": "UTC"}}'
FULL = {"get_weather": CALL_W, "get_time": CALL_T}
HERMES_OUTPUTS = [
    f"<tool_call>\n{CALL_W}\n</tool_call>",  # tool_choice named or required
    f"<tool_call>\n{CALL_W}\n</tool_call>\n<tool_call>\n{CALL_T}\n</tool_call>",  # required, parallel
    f"Let me check.\n<tool_call>\n{CALL_T}\n</tool_call>",  # auto: text, then a call
]


def _check_cut(content: str | None, calls, full: str, prose: str) -> None:
    """What a cut output may give: content a prefix of the prose around the calls, never markup; each call
    a prefix of a real one (name, then raw arguments text), all but the last complete."""
    assert not content or prose.startswith(content.rstrip()), (content, full)
    for k, c in enumerate(calls):
        whole = next((FULL[n] for n in FULL if n.startswith(c.name)), None)
        assert whole is not None, (c.name, full)
        args = whole[whole.index('"arguments": ') + len('"arguments": ') : -1]
        if k < len(calls) - 1:
            assert json.loads(c.arguments) == json.loads(args)
        assert args.startswith(c.arguments), (c.arguments, full)


@pytest.mark.parametrize("full", HERMES_OUTPUTS)
def test_hermes_cut_anywhere_leaks_no_markup_and_stream_agrees(full: str) -> None:
    """Cut by max_tokens at every character: no tool markup in content (not even a lone "<"), the partial
    call reported in tool_calls (name and arguments as far as written), and the same content and calls
    from the stream (fed in 1- and 4-character pieces) as from the whole text."""
    prose = full.split("<tool_call>")[0].rstrip()
    fmt = HermesFormat()
    for k in range(len(full) + 1):
        text, cut = full[:k], k < len(full)
        content, calls = fmt.parse(text, NAMES, cut=cut)
        _check_cut(content, calls, full, prose)
        if cut and k > len(prose) + len("<tool_call>\n") + len('{"name": "'):
            assert calls, text  # the name has begun: the call is reported
        for step in (1, 4):
            s = ToolStream(HermesFormat(), NAMES)
            sent = _feed(s, text, step)
            rest, streamed = s.finish(cut=cut)
            assert sent + rest == (content or ""), (text, sent, rest)
            assert [(c.name, c.arguments) for c in streamed] == [(c.name, c.arguments) for c in calls]


def test_the_cuts_issue_23_reported() -> None:
    fmt = HermesFormat()
    content, calls = fmt.parse('<tool_call>\n{"name": "get_', NAMES, cut=True)
    assert content is None and [(c.name, c.arguments) for c in calls] == [("get_", "")]
    content, calls = fmt.parse(f"<tool_call>\n{CALL_W}\n</tool_call>\n<", NAMES, cut=True)
    assert content is None and [c.name for c in calls] == ["get_weather"]
    content, calls = fmt.parse(
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Pa', NAMES, cut=True
    )
    assert content is None and [(c.name, c.arguments) for c in calls] == [("get_weather", '{"city": "Pa')]


def test_llama3_cut_anywhere() -> None:
    full = '{"name": "get_time", "parameters": {"zone": "UTC"}}; {"name": "get_weather", "parameters": {"city": "Oslo", "unit": "celsius"}}'
    fmt = Llama3Format()
    for k in range(1, len(full) + 1):
        text, cut = full[:k], k < len(full)
        content, calls = fmt.parse(text, NAMES, cut=cut)
        s = ToolStream(Llama3Format(), NAMES)
        sent = _feed(s, text, 3)
        rest, streamed = s.finish(cut=cut)
        assert sent + rest == (content or "")
        assert [(c.name, c.arguments) for c in streamed] == [(c.name, c.arguments) for c in calls]
        if '"name": "' in text:
            assert content is None and calls, text
            assert "get_time".startswith(calls[0].name) or calls[0].name == "get_time"


# ---- rendering ---------------------------------------------------------------------------------------------
CONVERSATION = [
    {"role": "user", "content": "Weather in Paris?"},
    {
        "role": "assistant",
        "content": "",
        "tool_calls": [
            {
                "id": "call_1",
                "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "celsius"}'},
            }
        ],
    },
    {"role": "tool", "tool_call_id": "call_1", "content": '{"temperature": 21}'},
]


def test_builtin_rendering_for_a_template_without_tools() -> None:
    support = ToolSupport.detect(CHATML)
    assert isinstance(support.format, HermesFormat) and not support.template_tools
    messages, extra = support.messages(CONVERSATION, TOOLS)
    text = ChatTemplate(CHATML).render(messages, **extra)
    assert text.startswith("<|im_start|>system\n") and '"name": "get_weather"' in text.split("<|im_end|>")[0]
    assert (
        '<|im_start|>assistant\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", '
        '"unit": "celsius"}}\n</tool_call><|im_end|>' in text
    )
    assert '<|im_start|>user\n<tool_response>\n{"temperature": 21}\n</tool_response><|im_end|>' in text
    assert text.endswith("<|im_start|>assistant\n")


def test_builtin_llama3_style() -> None:
    support = ToolSupport.detect(LLAMA3)
    assert isinstance(support.format, Llama3Format)
    messages, _ = support.messages(CONVERSATION, TOOLS)
    text = ChatTemplate(LLAMA3).render(messages)
    assert '{"name": "get_weather", "parameters": {"city": "Paris", "unit": "celsius"}}' in text
    assert '<|start_header_id|>ipython<|end_header_id|>\n\n{"temperature": 21}<|eot_id|>' in text


# A template in the style of Qwen2.5's: renders `tools`, assistant `tool_calls` (arguments as an object) and
# `tool` messages itself.
TOOL_TEMPLATE = (
    "{% if tools %}<|im_start|>system\n# Tools\n<tools>{% for t in tools %}\n{{ t | tojson }}{% endfor %}\n"
    "</tools><|im_end|>\n{% endif %}"
    "{% for m in messages %}"
    "{% if m.role == 'assistant' and m.tool_calls %}<|im_start|>assistant\n{{ m.content }}"
    "{% for c in m.tool_calls %}<tool_call>\n{{ {'name': c.function.name, 'arguments': c.function.arguments}"
    " | tojson }}\n</tool_call>{% endfor %}<|im_end|>\n"
    "{% elif m.role == 'tool' %}<|im_start|>user\n<tool_response>\n{{ m.content }}\n</tool_response><|im_end|>\n"
    "{% else %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def test_template_with_its_own_tool_support() -> None:
    support = ToolSupport.detect(TOOL_TEMPLATE)
    assert support.template_tools and support.template_calls and isinstance(support.format, HermesFormat)
    messages, extra = support.messages(CONVERSATION, TOOLS)
    assert extra == {"tools": TOOLS}
    assert messages[1]["tool_calls"][0]["function"]["arguments"] == {"city": "Paris", "unit": "celsius"}
    text = ChatTemplate(TOOL_TEMPLATE).render(messages, **extra)
    assert '"name": "get_time"' in text.split("</tools>")[0]
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}' in text
    assert '<tool_response>\n{"temperature": 21}\n</tool_response>' in text


def test_forced_call_grammar_accepts_exactly_valid_calls(gguf_path) -> None:
    from spqr_run.loading.gguf import open_gguf, read_metadata
    from spqr_run.structured import GrammarEngine
    from spqr_run.tokenizer import Tokenizer

    tok = Tokenizer.from_gguf_metadata(read_metadata(open_gguf(gguf_path), gguf_path), source="smollm2")
    engine = GrammarEngine(tok)
    fmt = HermesFormat()
    good = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}\n</tool_call>'
    bad = (
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "kelvin"}}\n</tool_call>'
    )

    def accepted(text: str, parallel: bool) -> bool:
        c = engine.compile_lark(fmt.lark([WEATHER, TIME], parallel=parallel))
        for i in tok.encode(text, add_bos=False, special=False):
            if not c.compute_mask()[i]:
                return False
            c.accept(i)
        return bool(c.compute_mask()[2])  # <|im_end|> may follow: the calls are complete

    assert accepted(good, parallel=False) and not accepted(bad, parallel=False)
    assert accepted(good + "\n" + good, parallel=True) and not accepted(good + "\n" + good, parallel=False)


# ---- the server, through the openai client (fixtures `server`, `client`: tests/conftest.py) ----------------
USER = [{"role": "user", "content": "What is the weather in Paris? Use celsius."}]
SCHEMAS = {"get_weather": WEATHER["parameters"], "get_time": TIME["parameters"]}


def _check_calls(calls) -> None:
    assert calls
    for c in calls:
        jsonschema.validate(json.loads(c.function.arguments), SCHEMAS[c.function.name])
        assert c.type == "function" and c.id


def _stream_calls(stream) -> tuple[str, dict[int, dict], str | None]:
    content, calls, finish = [], {}, None
    for chunk in stream:
        for ch in chunk.choices:
            content.append(ch.delta.content or "")
            for d in ch.delta.tool_calls or []:
                call = calls.setdefault(d.index, {"id": None, "name": "", "arguments": ""})
                call["id"] = d.id or call["id"]
                if d.function is not None:
                    call["name"] += d.function.name or ""
                    call["arguments"] += d.function.arguments or ""
            finish = ch.finish_reason or finish
    return "".join(content), calls, finish


@needs_model
@pytest.mark.slow
def test_required_plain_and_streamed(client: openai.OpenAI) -> None:
    kw = dict(
        model=MODEL_NAME, messages=USER, tools=TOOLS, tool_choice="required", temperature=0, max_tokens=200
    )
    r = client.chat.completions.create(**kw, parallel_tool_calls=False)
    c = r.choices[0]
    assert c.finish_reason == "tool_calls" and c.message.content is None and len(c.message.tool_calls) == 1
    _check_calls(c.message.tool_calls)
    content, calls, finish = _stream_calls(
        client.chat.completions.create(**kw, parallel_tool_calls=False, stream=True)
    )
    assert content == "" and finish == "tool_calls" and len(calls) == 1
    assert (calls[0]["name"], calls[0]["arguments"]) == (
        c.message.tool_calls[0].function.name,
        c.message.tool_calls[0].function.arguments,
    )
    r = client.chat.completions.create(**{**kw, "temperature": 1.0}, n=2, seed=5, parallel_tool_calls=False)
    for c in r.choices:  # sampled, still valid by construction (the parameter schemas are bounded)
        assert c.finish_reason == "tool_calls"
        _check_calls(c.message.tool_calls)


def _cut_after(tokens: list[str], end: str) -> int:
    """How many of `tokens` (the texts of a generated output's tokens) end the text with `end`."""
    text = ""
    for k, t in enumerate(tokens, 1):
        text += t
        if text.endswith(end):
            return k
    raise AssertionError(f"{end!r} not in {''.join(tokens)!r}")


@needs_model
@pytest.mark.slow
@pytest.mark.parametrize(
    ("choice", "end", "names"),
    [
        ({"type": "function", "function": {"name": "get_weather"}}, '"name": "get_', ["get_"]),
        ({"type": "function", "function": {"name": "get_weather"}}, '{"city": "Paris', ["get_weather"]),
        ("required", "</tool_call>\n<", ["get_weather"]),  # a parallel second call cut in its opening tag
        ("required", '</tool_call>\n<tool_call>\n{"', ["get_weather"]),  # ... cut before its name
    ],
)
def test_a_call_cut_by_max_tokens_is_reported_the_same_streamed_or_not(
    client: openai.OpenAI, choice, end: str, names: list[str]
) -> None:
    """Issue 23: a forced or required call that max_tokens cuts never leaks its markup as content; the cut
    call is in tool_calls as far as it was written (finish_reason "length"), identically when streamed."""
    kw = dict(model=MODEL_NAME, messages=USER, tools=TOOLS, tool_choice=choice, temperature=0)
    if choice == "required":
        kw["parallel_tool_calls"] = True
    whole = client.chat.completions.create(**kw, max_tokens=200, logprobs=True).choices[0]
    tokens = [bytes(t.bytes or []).decode("utf-8", errors="replace") for t in whole.logprobs.content]
    cut = _cut_after(tokens, end)
    r = client.chat.completions.create(**kw, max_tokens=cut).choices[0]
    assert r.finish_reason == "length" and r.message.content is None
    got = [(c.function.name, c.function.arguments) for c in r.message.tool_calls]
    assert [name for name, _ in got] == names
    for (name, args), full in zip(got, whole.message.tool_calls, strict=False):
        assert full.function.name.startswith(name) and full.function.arguments.startswith(args)
        assert all(c.id.startswith("call_") for c in r.message.tool_calls)
    content, calls, finish = _stream_calls(client.chat.completions.create(**kw, max_tokens=cut, stream=True))
    assert content == "" and finish == "length"
    assert [(c["name"], c["arguments"]) for _, c in sorted(calls.items())] == got


@needs_model
@pytest.mark.slow
def test_named_function_is_forced(client: openai.OpenAI) -> None:
    choice = {"type": "function", "function": {"name": "get_time"}}
    r = client.chat.completions.create(
        model=MODEL_NAME, messages=USER, tools=TOOLS, tool_choice=choice, temperature=0, max_tokens=120
    )
    c = r.choices[0]
    assert c.finish_reason == "tool_calls" and [t.function.name for t in c.message.tool_calls] == ["get_time"]
    _check_calls(c.message.tool_calls)
    # the README's next turn: the client's own message object goes back with the tool's result
    call = c.message.tool_calls[0]
    turn = [*USER, c.message, {"role": "tool", "tool_call_id": call.id, "content": '{"time": "12:00"}'}]
    r = client.chat.completions.create(
        model=MODEL_NAME, messages=turn, tools=TOOLS, temperature=0, max_tokens=20
    )
    assert r.choices[0].finish_reason in ("stop", "length", "tool_calls")


@needs_model
@pytest.mark.slow
def test_auto_and_none_plumbing_and_the_next_turn(client: openai.OpenAI, server: Server) -> None:
    """`auto` and `none` answer (the weak model mostly answers in text); a conversation carrying an assistant
    tool call and a tool result renders both and is answered."""
    for choice in ("auto", "none"):
        r = client.chat.completions.create(
            model=MODEL_NAME, messages=USER, tools=TOOLS, tool_choice=choice, temperature=0, max_tokens=30
        )
        c = r.choices[0]
        if choice == "none" or c.message.tool_calls is None:
            assert c.message.content and c.finish_reason in ("stop", "length")
        else:
            assert c.finish_reason == "tool_calls"
            _check_calls(c.message.tool_calls)
    turn = [
        *USER,
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_7",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "celsius"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_7", "content": '{"temperature": 21, "sky": "clear"}'},
    ]
    r = client.chat.completions.create(
        model=MODEL_NAME, messages=turn, tools=TOOLS, temperature=0, max_tokens=30
    )
    assert r.choices[0].message.content or r.choices[0].message.tool_calls
    auth = {"Authorization": f"Bearer {API_KEY}"}
    ids = httpx.post(f"{server.url}/tokenize", json={"messages": turn}, headers=auth, timeout=30).json()[
        "tokens"
    ]
    text = httpx.post(f"{server.url}/detokenize", json={"tokens": ids}, headers=auth, timeout=30).json()[
        "prompt"
    ]
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}' in text
    assert '<tool_response>\n{"temperature": 21, "sky": "clear"}\n</tool_response>' in text


@needs_model
@pytest.mark.slow
def test_tool_calls_batched_with_other_requests(client: openai.OpenAI) -> None:
    results: dict[str, object] = {}

    def run(key: str, **kw) -> None:
        try:
            if kw.pop("streamed", False):
                results[key] = _stream_calls(client.chat.completions.create(**kw, stream=True))
            else:
                results[key] = client.chat.completions.create(**kw)
        except Exception as e:  # noqa: BLE001 - reported by the assertions below
            results[key] = e

    base = dict(model=MODEL_NAME, messages=USER, temperature=0, max_tokens=200)
    jobs = {
        "required": dict(base, tools=TOOLS, tool_choice="required", parallel_tool_calls=False),
        "named_stream": dict(base, tools=TOOLS, tool_choice={"type": "function", "function": {"name": "get_weather"}},
                             streamed=True),
        "plain": dict(base, max_tokens=24),
        "plain_stream": dict(base, max_tokens=24, streamed=True),
    }  # fmt: skip
    threads = [threading.Thread(target=run, args=(k,), kwargs=v) for k, v in jobs.items()]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for r in results.values():
        assert not isinstance(r, Exception), r
    assert results["required"].choices[0].finish_reason == "tool_calls"
    _check_calls(results["required"].choices[0].message.tool_calls)
    _, calls, finish = results["named_stream"]
    assert finish == "tool_calls" and calls[0]["name"] == "get_weather"
    jsonschema.validate(json.loads(calls[0]["arguments"]), WEATHER["parameters"])
    assert results["plain"].choices[0].message.content == results["plain_stream"][0]


@needs_model
@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
        ({"tools": None, "tool_choice": "required"}, "tool_choice"),
        ({"tool_choice": "required", "response_format": {"type": "json_object"}}, "response_format"),
        ({"tools": TOOLS + TOOLS[:1]}, "tools"),
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "strin"}}}],
          "tool_choice": "required"}, "tools"),
    ],
)  # fmt: skip
def test_tool_request_errors_are_400(server: Server, extra: dict, param: str) -> None:
    body = {"model": MODEL_NAME, "messages": USER, "tools": TOOLS, **extra}
    body = {k: v for k, v in body.items() if v is not None}
    r = httpx.post(
        f"{server.url}/v1/chat/completions",
        json=body,
        headers={"Authorization": f"Bearer {API_KEY}"},
        timeout=60,
    )
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param
