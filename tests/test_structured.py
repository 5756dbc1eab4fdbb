"""Structured outputs: the token bytes the grammar engine sees, the mask on the real SmolLM2 vocabulary, generation
that always validates (`jsonschema`), and `response_format` through the real `openai` client, alone and batched."""

from __future__ import annotations

import json
import threading

import httpx
import jsonschema
import openai
import pytest
import torch
from test_server_support import API_KEY, MODEL_NAME, Server, needs_model

from spqr_run.sampling import SamplingParams
from spqr_run.structured import GrammarEngine, GrammarError, apply_mask, token_bytes, unpack_bitmask

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 24},
        "age": {"type": "integer", "minimum": 0, "maximum": 130},
        "role": {"enum": ["admin", "user", "guest"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 12}, "maxItems": 3},
    },
    "required": ["name", "age", "role", "tags"],
    "additionalProperties": False,
}
# Bounded schemas (string lengths, integer ranges, item counts): a document ends within a known number of
# tokens, so a constrained answer finishes with "stop" whatever the (weak) model prefers.
CITY = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 30},
        "population": {"type": "integer", "minimum": 0, "maximum": 10**9},
    },
    "required": ["city", "population"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def tokenizer(gguf_path):
    from spqr_run.loading.gguf import open_gguf, read_metadata
    from spqr_run.tokenizer import Tokenizer

    return Tokenizer.from_gguf_metadata(read_metadata(open_gguf(gguf_path), gguf_path), source="smollm2")


@pytest.fixture(scope="module")
def engine(tokenizer) -> GrammarEngine:
    return GrammarEngine(tokenizer)


# ---- the vocabulary and the mask -------------------------------------------------------------------------
@pytest.mark.parametrize(
    "text", ["héllo wörld", "Reply with one emoji: 😊🎉", "おはよう\n\tcafé ☕", '{"a": [1, 2]}']
)
def test_token_bytes_rebuild_the_text(tokenizer, text: str) -> None:
    table, special = token_bytes(tokenizer)
    assert len(table) == tokenizer.vocab_size == 49152
    ids = tokenizer.encode(text, add_bos=False, special=False)
    assert b"".join(table[i] for i in ids) == text.encode()
    assert {0, 1, 2} <= set(special)  # <|endoftext|>, <|im_start|>, <|im_end|>: never grammar text
    assert table[2] == b"<|im_end|>"


@pytest.mark.parametrize("source", ["hf_folder", "gguf_llama"])
def test_token_bytes_sentencepiece(source: str, tmp_path, gguf_path) -> None:
    """SentencePiece vocabularies (both backends): "▁" is a space, `<0xNN>` pieces are single bytes."""
    spm = pytest.importorskip("sentencepiece")
    from test_tokenizer import llama_gguf_meta

    from spqr_run.tokenizer import Tokenizer

    wiki = (gguf_path.parent / "wiki-test.txt").read_text(encoding="utf-8")[:200_000]
    (tmp_path / "corpus.txt").write_text(wiki, encoding="utf-8")
    spm.SentencePieceTrainer.train(
        input=str(tmp_path / "corpus.txt"), model_prefix=str(tmp_path / "tokenizer"), vocab_size=600,
        model_type="bpe", byte_fallback=True, character_coverage=0.999, add_dummy_prefix=True,
        normalization_rule_name="identity", remove_extra_whitespaces=False, allow_whitespace_only_pieces=True,
        control_symbols=["<|im_end|>"], minloglevel=2,
    )  # fmt: skip
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "tokenizer.model"))
    tok = (
        Tokenizer.from_hf_folder(tmp_path)
        if source == "hf_folder"
        else Tokenizer.from_gguf_metadata(llama_gguf_meta(sp))
    )
    table, special = token_bytes(tok)
    assert sp.piece_to_id("<|im_end|>") in special
    for text in ["héllo wörld", "😊 おはよう", "a  b\n c"]:
        joined = b"".join(table[i] for i in tok.encode(text, add_bos=False, special=False))
        assert joined in (text.encode(), b" " + text.encode()), (text, joined)
    assert table[sp.piece_to_id("<0xF0>")] == b"\xf0"


def test_bitmask_unpacking_and_masking() -> None:
    words = torch.tensor([0b1011, -(2**31)], dtype=torch.int32)  # bits 0, 1, 3 and 63
    allowed = unpack_bitmask(words, 64)
    assert allowed.nonzero().flatten().tolist() == [0, 1, 3, 63]
    logits = torch.arange(70, dtype=torch.float32)  # wider than the vocabulary: padding rows are masked
    out = apply_mask(logits, allowed)
    assert torch.isfinite(out).nonzero().flatten().tolist() == [0, 1, 3, 63]
    assert out[63] == 63


def test_schema_mask_walk(tokenizer, engine: GrammarEngine) -> None:
    """Every token of a valid document is allowed in turn; a wrong kind of value and special tokens are not;
    at the end only an end-of-turn token is."""
    doc = {"name": "Ada", "age": 36, "role": "admin", "tags": ["math"]}
    c = engine.compile_json_schema(PERSON)
    prefix = '{"name": '
    for i in tokenizer.encode(prefix, add_bos=False, special=False):
        assert c.compute_mask()[i]
        c.accept(i)
    allowed = c.compute_mask()
    digit = tokenizer.encode("7", add_bos=False)[0]
    assert not allowed[digit] and allowed[tokenizer.encode('"', add_bos=False)[0]]
    assert not allowed[1] and not allowed[2]
    rest = json.dumps(doc)[len(prefix) :]
    for i in tokenizer.encode(rest, add_bos=False, special=False):
        assert c.compute_mask()[i], tokenizer.decode([i])
        c.accept(i)
    final = c.compute_mask()
    assert set(final.nonzero().flatten().tolist()) <= set(tokenizer.eos_ids) and final.any()


def test_mask_batch_fills_masks_in_a_worker(tokenizer, engine: GrammarEngine) -> None:
    """What the engine overlaps with the model step gives the same masks as computing them in place."""
    from spqr_run.structured import MaskBatch

    a, b = engine.compile_json_schema(PERSON), engine.compile_json_object()
    expected = [a.copy().compute_mask(), b.copy().compute_mask()]
    batch = MaskBatch()
    try:
        batch.start([a, b])
        batch.wait()
        assert a.allowed is not None and b.allowed is not None
        assert torch.equal(a.compute_mask(), expected[0]) and torch.equal(b.compute_mask(), expected[1])
        assert a.allowed is None  # handed over once; the next token needs a new one
    finally:
        batch.close()


def test_a_token_outside_the_grammar_is_refused(tokenizer, engine: GrammarEngine) -> None:
    c = engine.compile_json_object()
    with pytest.raises(Exception, match="breaks the JSON object format"):
        c.accept(tokenizer.encode("hello", add_bos=False)[0])


@pytest.mark.parametrize(
    ("schema", "named"),
    [
        ({"type": "strin"}, "strin"),
        ({"type": "array", "uniqueItems": True}, "uniqueItems"),
        ({"not": {"type": "string"}}, "not"),
        ({"type": "object", "properties": {"a": {"$ref": "#/defs/x"}}}, "/defs/x"),
        ({"type": "string", "pattern": "(?<=a)b"}, "look"),
        ([1, 2], "list"),
    ],
)
def test_uncompilable_schemas_name_the_problem(engine: GrammarEngine, schema, named: str) -> None:
    with pytest.raises(GrammarError, match="cannot compile|must be a JSON object") as e:
        engine.compile_json_schema(schema)
    assert named in str(e.value) and "\n" not in str(e.value)


def test_one_of_is_enforced_when_its_alternatives_exclude_each_other(
    tokenizer, engine: GrammarEngine
) -> None:
    """Issue 23: `oneOf` whose alternatives no value can match twice (different types, a property with a
    different const in each) compiles, and the grammar only lets through values of one alternative."""
    schema = {
        "type": "object",
        "properties": {
            "shape": {
                "oneOf": [
                    {"type": "object", "properties": {"kind": {"const": "circle"}, "r": {"type": "number"}},
                     "required": ["kind", "r"], "additionalProperties": False},
                    {"type": "object", "properties": {"kind": {"const": "square"}, "side": {"type": "integer"}},
                     "required": ["kind", "side"], "additionalProperties": False},
                ]
            },
            "label": {"oneOf": [{"type": "string"}, {"type": "integer"}]},
        },
        "required": ["shape", "label"],
        "additionalProperties": False,
    }  # fmt: skip

    def allows(text: str) -> bool:
        c = engine.compile_json_schema(schema)
        for i in tokenizer.encode(text, add_bos=False, special=False):
            if not c.compute_mask()[i]:
                return False
            c.accept(i)
        return True

    assert allows('{"shape": {"kind": "circle", "r": 1.5}, "label": 3}')
    assert not allows('{"shape": {"kind": "circle", "side": 2}')


@pytest.mark.parametrize(
    ("schema", "keyword", "path"),
    [
        ({"type": "object", "properties": {"n": {"oneOf": [{"type": "integer"}, {"type": "number"}]}}},
         "oneOf", "response_format.json_schema.schema.properties.n.oneOf"),
        ({"type": "object", "properties": {"tags": {"type": "array", "items": {"anyOf": [
            {"type": "string"}, {"type": "array", "uniqueItems": True}]}}}},
         "uniqueItems", "response_format.json_schema.schema.properties.tags.items.anyOf[1].uniqueItems"),
        ({"$defs": {"p": {"type": "object", "properties": {"x y": {"not": {"type": "null"}}}}},
          "type": "object", "properties": {"p": {"$ref": "#/$defs/p"}}},
         "not", 'response_format.json_schema.schema.$defs.p.properties["x y"].not'),
        ({"if": {"type": "string"}, "then": {"minLength": 3}}, "if", "response_format.json_schema.schema.if"),
    ],
)  # fmt: skip
def test_a_refused_keyword_is_named_with_its_json_path(engine: GrammarEngine, schema, keyword, path) -> None:
    """Issue 23: one sentence naming the keyword and where it is, with what to do; no advice that no request
    can follow (llguidance's "enable coerce_one_of")."""
    with pytest.raises(GrammarError) as e:
        engine.compile_json_schema(schema, what="JSON schema 'x'", where="response_format.json_schema.schema")
    message = str(e.value)
    assert "\n" not in message and f'"{keyword}" at {path}' in message, message
    assert "coerce_one_of" not in message and "Unimplemented" not in message
    assert message.count(". ") == 0 and len(message) < 400, message


def test_mask_walk_admits_a_valid_document_and_restricts(tokenizer, engine: GrammarEngine) -> None:
    """Walking a valid document token by token: every mask admits the next token of the document and bans part
    of the 49,152-token vocabulary; after the closing brace only the end tokens are allowed. (The cost of this walk,
    ~0.1-0.2 ms a token, is measured by `python -m benchmarks.structured_mask`, not asserted here.)"""
    doc = json.dumps(
        {"name": "Grace Hopper", "age": 85, "role": "user", "tags": ["navy", "cobol", "compilers"]}
    )
    ids = tokenizer.encode(doc, add_bos=False, special=False)
    logits = torch.randn(tokenizer.vocab_size)
    c = engine.compile_json_schema(PERSON)
    for i in ids:
        masked = apply_mask(logits, c.compute_mask())  # (V,)
        assert torch.isfinite(masked[i]), tokenizer.decode([i])
        assert torch.isinf(masked).any()
        c.accept(i)
    assert set(c.compute_mask().nonzero().flatten().tolist()) == set(tokenizer.eos_ids)


# ---- generation on the real model -------------------------------------------------------------------------
@pytest.mark.slow
def test_generation_always_validates(gguf_path, engine: GrammarEngine) -> None:
    from spqr_run.runtime import load_runtime

    rt = load_runtime(str(gguf_path), ctx=512)
    prompt = [{"role": "user", "content": "Describe a person as JSON."}]
    ids = rt.tokenizer.encode(rt.chat_template.render(prompt))
    gen = rt.generator()
    for temperature, seed in [(0.0, None), (1.0, 1), (1.3, 2)]:
        params = SamplingParams(max_tokens=200, temperature=temperature, seed=seed)
        result = gen.generate(ids, params, constraint=engine.compile_json_schema(PERSON))
        assert result.finish_reason == "stop", result.text
        jsonschema.validate(json.loads(result.text), PERSON)
    cut = gen.generate(
        ids, SamplingParams(max_tokens=4, temperature=0), constraint=engine.compile_json_object()
    )
    assert cut.finish_reason == "length" and cut.text.startswith("{")


# ---- the server, through the openai client (fixtures `server`, `client`: tests/conftest.py) ----------------
def _schema_format(schema: dict, name: str = "answer") -> dict:
    return {"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": True}}


def _chat(client: openai.OpenAI, content: str, **kw):
    return client.chat.completions.create(
        model=MODEL_NAME, messages=[{"role": "user", "content": content}], **kw
    )


def _streamed_text(stream) -> tuple[str, str | None]:
    pieces, finish = [], None
    for chunk in stream:
        for c in chunk.choices:
            pieces.append(c.delta.content or "")
            finish = c.finish_reason or finish
    return "".join(pieces), finish


@needs_model
@pytest.mark.slow
def test_json_schema_plain_and_streamed(client: openai.OpenAI) -> None:
    kw = dict(response_format=_schema_format(CITY), temperature=0, max_tokens=60)
    full = _chat(client, "Name a big city and its population.", **kw)
    text = full.choices[0].message.content
    assert full.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(text), CITY)
    streamed, finish = _streamed_text(_chat(client, "Name a big city and its population.", stream=True, **kw))
    assert streamed == text and finish == "stop"


@needs_model
@pytest.mark.slow
def test_json_object_and_sampled_choices_validate(client: openai.OpenAI) -> None:
    r = _chat(client, "What is 2+2? Answer in JSON.", response_format={"type": "json_object"}, max_tokens=80,
              temperature=0)  # fmt: skip
    c = r.choices[0]
    assert c.finish_reason == "stop" and isinstance(json.loads(c.message.content), dict)
    r = _chat(client, "Describe a user.", response_format=_schema_format(PERSON), n=3, temperature=1.2, seed=7,
              max_tokens=200)  # fmt: skip
    assert len(r.choices) == 3
    for c in r.choices:
        assert c.finish_reason == "stop", c.message.content
        jsonschema.validate(json.loads(c.message.content), PERSON)


@needs_model
@pytest.mark.slow
def test_cut_by_max_tokens_is_length(client: openai.OpenAI) -> None:
    r = _chat(client, "Describe a user.", response_format=_schema_format(PERSON), max_tokens=5, temperature=0)
    c = r.choices[0]
    assert c.finish_reason == "length" and c.message.content.startswith("{")


@needs_model
@pytest.mark.slow
def test_completions_response_format(client: openai.OpenAI) -> None:
    r = client.completions.create(
        model=MODEL_NAME,
        prompt=["A city described in JSON:", "Another one:"],
        max_tokens=60,
        temperature=0,
        extra_body={"response_format": _schema_format(CITY)},
    )
    assert len(r.choices) == 2
    for c in r.choices:
        assert c.finish_reason == "stop"
        jsonschema.validate(json.loads(c.text), CITY)


@needs_model
@pytest.mark.slow
def test_batched_with_plain_requests(client: openai.OpenAI) -> None:
    """Constrained and plain requests share decode steps: every constrained answer validates and every plain
    answer is the one it gets alone (a row's greedy tokens do not depend on the others)."""
    plain = {"content": "Name three rivers.", "max_tokens": 24, "temperature": 0}
    alone = _chat(client, plain["content"], max_tokens=24, temperature=0).choices[0].message.content
    results: dict[str, object] = {}

    def run(key: str, **kw) -> None:
        try:
            results[key] = _chat(client, **kw)
        except Exception as e:  # noqa: BLE001 - reported by the assertions below
            results[key] = e

    jobs = {
        "person": dict(content="Describe a user.", response_format=_schema_format(PERSON), temperature=0,
                       max_tokens=200),
        "city": dict(content="Name a big city.", response_format=_schema_format(CITY), temperature=0.8, seed=3,
                     max_tokens=60, stream=False),
        "plain1": plain,
        "plain2": plain,
    }  # fmt: skip
    threads = [threading.Thread(target=run, args=(k,), kwargs=v) for k, v in jobs.items()]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for key, schema in (("person", PERSON), ("city", CITY)):
        r = results[key]
        assert not isinstance(r, Exception), r
        jsonschema.validate(json.loads(r.choices[0].message.content), schema)
    for key in ("plain1", "plain2"):
        assert results[key].choices[0].message.content == alone


@needs_model
@pytest.mark.parametrize(
    ("fmt", "named"),
    [
        ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "array", "uniqueItems": True}}},
         "uniqueItems"),
        ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "strin"}}}, "strin"),
        ({"type": "xml"}, "response_format"),
    ],
)  # fmt: skip
def test_bad_schema_is_400(server: Server, fmt: dict, named: str) -> None:
    body = {"model": MODEL_NAME, "messages": [{"role": "user", "content": "x"}], "response_format": fmt}
    r = httpx.post(
        f"{server.url}/v1/chat/completions",
        json=body,
        headers={"Authorization": f"Bearer {API_KEY}"},
        timeout=60,
    )
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert named in error["message"] or named == error["param"]
    assert error["param"] is not None and error["param"].startswith("response_format")


@needs_model
def test_a_refused_keyword_in_tool_parameters_is_one_sentence(server: Server) -> None:
    """Issue 23: a keyword the engine cannot enforce in a forced tool's `parameters` is a 400 naming the
    keyword and its path in the request, not a cut-off dump of the internal grammar."""
    tools = [
        {"type": "function", "function": {"name": "ok", "parameters": {"type": "object"}}},
        {"type": "function", "function": {"name": "tag", "parameters": {
            "type": "object", "properties": {"tags": {"type": "array", "uniqueItems": True}}}}},
    ]  # fmt: skip
    body = {"model": MODEL_NAME, "messages": [{"role": "user", "content": "x"}], "tools": tools,
            "tool_choice": "required"}  # fmt: skip
    r = httpx.post(
        f"{server.url}/v1/chat/completions",
        json=body,
        headers={"Authorization": f"Bearer {API_KEY}"},
        timeout=60,
    )
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == "tools"
    assert '"uniqueItems" at tools[1].function.parameters.properties.tags.uniqueItems' in error["message"]
    assert (
        "%json" not in error["message"] and "call:" not in error["message"] and "..." not in error["message"]
    )


# ---- spqr-run generate --json-schema and /format in spqr-chat ---------------------------------------------
def test_format_command_arguments(tmp_path) -> None:
    from spqr_run.chat.commands import CommandError, parse_command, parse_format

    assert parse_command("/format off").name == "format" and parse_format("off") is None
    assert parse_format("json") == ({"type": "object"}, "JSON object format")
    path = tmp_path / "city.json"
    path.write_text(json.dumps(CITY))
    assert parse_format(str(path))[0] == CITY
    with pytest.raises(CommandError, match="nope.json: cannot read"):
        parse_format(str(tmp_path / "nope.json"))
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(CommandError, match="bad.json: not a JSON file"):
        parse_format(str(tmp_path / "bad.json"))


@pytest.mark.slow
def test_format_in_a_chat_session_and_the_cli(gguf_path, tmp_path) -> None:
    import subprocess
    import sys

    from spqr_run.chat.commands import parse_format
    from spqr_run.chat.session import ChatSession
    from spqr_run.runtime import load_runtime

    path = tmp_path / "city.json"
    path.write_text(json.dumps(CITY))
    session = ChatSession(load_runtime(str(gguf_path), ctx=512), SamplingParams(max_tokens=60, temperature=0))
    assert "city.json" in session.set_format(parse_format(str(path)))

    class Sink:
        def notice(self, text: str) -> None: ...
        def reply_start(self) -> None: ...
        def reply_text(self, piece: str) -> None: ...
        def reply_end(self, finish_reason: str, stats) -> None: ...

    for question in ("Name a big city.", "And another one?"):
        reply = session.send(question, Sink(), lambda: False)
        assert reply.finish_reason == "stop"
        jsonschema.validate(json.loads(reply.text), CITY)
    assert session.set_format(None) == "replies are free text"
    (tmp_path / "bad.json").write_text(json.dumps({"type": "array", "uniqueItems": True}))
    with pytest.raises(GrammarError, match="uniqueItems"):
        session.set_format(parse_format(str(tmp_path / "bad.json")))

    cmd = [sys.executable, "-m", "spqr_run.cli.run", "generate", str(gguf_path), "--chat", "--ctx", "512"]
    out = subprocess.run(
        [*cmd, "--prompt", "Name a big city.", "--temperature", "0", "--json-schema", str(path)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    jsonschema.validate(json.loads(out.stdout), CITY)
    bad = subprocess.run(
        [*cmd, "--prompt", "x", "--json-schema", str(tmp_path / "bad.json")], capture_output=True, text=True
    )
    assert bad.returncode == 2 and "uniqueItems" in bad.stderr and "Traceback" not in bad.stderr
