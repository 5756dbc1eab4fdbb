"""Text that is not valid Unicode (issue 23 item 1), one rule at every entry: replaced with U+FFFD, and the sender
told (a notice in the chat, a warning from the commands, an `X-Spqr-Warning` header and a log line from the
server); never a traceback, a 500, or a lost chat session."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import httpx
import pytest
from test_cli import REPO, cli
from test_server_support import API_KEY, MODEL_NAME, Server, needs_model

from spqr_run.chat.conversation import Conversation
from spqr_run.server.app import valid_body
from spqr_run.text import valid_json, valid_text
from tests.test_quantize_model import tiny_model  # noqa: F401 - fixture

LATIN1 = b"caf\xe9 na\xefve"  # "café naïve" in Latin-1: two bytes that are not UTF-8
BAD = "a\ud800b"  # what the JSON "a\\ud800b" parses to: a lone surrogate


# ---- the rule --------------------------------------------------------------------------------------------
def test_lone_surrogates_become_the_replacement_character() -> None:
    assert valid_text(BAD) == ("a\ufffdb", 1)
    assert valid_text(LATIN1.decode("utf-8", "surrogateescape")) == ("caf\ufffd na\ufffdve", 2)
    assert valid_text("fine 😊 ☕") == ("fine 😊 ☕", 0)
    value, paths = valid_json({"messages": [{"content": BAD}, {"content": "ok"}], "stop": ["x", BAD]}, "")
    assert paths == ["messages[0].content", "stop[1]"] and value["messages"][0]["content"] == "a\ufffdb"


def test_request_bodies_are_made_valid_and_the_fields_named() -> None:
    body, fields = valid_body(b'{"prompt": "a\\ud800b", "n": 1}')
    assert json.loads(body) == {"prompt": "a\ufffdb", "n": 1} and fields == ["prompt"]
    body, fields = valid_body(b'{"messages": [{"role": "user", "content": "' + LATIN1 + b'"}]}')
    assert json.loads(body)["messages"][0]["content"] == "caf\ufffd na\ufffdve"
    assert fields == ["messages[0].content"]
    plain = b'{"prompt": "caf\xc3\xa9 \\ud83d\\ude0a"}'  # valid UTF-8 and a valid surrogate pair: untouched
    assert valid_body(plain) == (plain, [])
    assert valid_body(b"{not json \xff") == (b"{not json \xff", [])  # the route reports it


def test_the_tokenizer_never_fails_on_it(tiny_model) -> None:  # noqa: F811
    from spqr_run.loading import open_model

    tok = open_model(tiny_model).tokenizer
    assert tok.encode(BAD, add_bos=False) == tok.encode("a\ufffdb", add_bos=False)


# ---- the chat: piped, typed and pasted; files; the command line -----------------------------------------
@pytest.mark.parametrize("encoding", ["", "utf-8:strict"])  # the C.UTF-8 locale's stdin, and a strict one
def test_piped_chat_answers_and_keeps_going(tiny_model, encoding: str) -> None:  # noqa: F811
    env = {"PYTHONIOENCODING": encoding} if encoding else {}
    stdin = LATIN1 + b"\nhello\n/stats\n"
    full_env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", **env}
    proc = subprocess.run(
        [sys.executable, "-m", "spqr_run.cli.chat", str(tiny_model), "--plain", "--max-tokens", "3", "--device", "cpu"],
        input=stdin, capture_output=True, env=full_env, timeout=300,
    )  # fmt: skip
    out, err = proc.stdout.decode(), proc.stderr.decode()
    assert proc.returncode == 0 and "Traceback" not in err, err
    assert "[your input: 2 characters that are not valid Unicode were replaced with U+FFFD]" in out
    # each reply prints its token count: 3, or fewer where the tiny model sampled its end token (random
    # weights: which depends on the session's RNG state when the fixture was made)
    counts = [int(n) for n in re.findall(r"^(\d+) tokens, ttft", out, re.M)]  # not /stats' "last reply:"
    assert len(counts) == 2 and all(1 <= n <= 3 for n in counts), out
    assert f"replies:    2 ({sum(counts)} tokens generated)" in out


@pytest.mark.slow
def test_typed_and_pasted_bytes_on_a_terminal_keep_the_session(tiny_model, tmp_path) -> None:  # noqa: F811
    pexpect = pytest.importorskip("pexpect")
    env = {**os.environ, "HOME": str(tmp_path), "XDG_DATA_HOME": str(tmp_path / "data"), "TERM": "xterm-256color",
           "PROMPT_TOOLKIT_NO_CPR": "1", "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}  # fmt: skip
    env.pop("SPQR_RUN_CHAT_HISTORY", None)
    argv = ["-m", "spqr_run.cli.chat", str(tiny_model), "--device", "cpu", "--max-tokens", "3"]
    child = pexpect.spawn(sys.executable, argv, cwd=str(REPO), env=env, encoding="utf-8",
                          codec_errors="surrogateescape", timeout=120, dimensions=(40, 160))  # fmt: skip
    child.expect("max context")
    child.expect(">>>")
    typed = LATIN1.decode("utf-8", "surrogateescape")  # sent as the raw Latin-1 bytes
    generated = 0
    for text in (typed, "\x1b[200~" + typed + "\nsecond line\x1b[201~", "hello"):  # typed, pasted, plain
        child.send(text + "\r")
        if text != "hello":
            child.expect(r"your input: 2 characters that are not valid Unicode were replaced with U\+FFFD")
        child.expect(r"(\d+) tokens, ttft")  # 3, or fewer where the tiny model sampled its end token
        generated += int(child.match.group(1))
        child.expect(">>>")
    child.send("/stats\r")
    # rich styles the label
    child.expect(rf"replies:(?:\s|\x1b\[[0-9;]*m)+3 \({generated} tokens generated\)")
    child.expect(">>>")
    child.sendeof()
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0, child.before
    history = (tmp_path / "data" / "spqr-run" / "chat_history").read_bytes().decode("utf-8")  # valid UTF-8
    assert "caf\ufffd na\ufffdve" in history


def test_files_and_arguments_of_the_commands(tiny_model, tmp_path) -> None:  # noqa: F811
    text = tmp_path / "latin1.txt"
    text.write_bytes((LATIN1 + b" the river flows past the old mill. ") * 20)
    ev = cli(
        "eval",
        str(tiny_model),
        "--text",
        str(text),
        "--max-tokens",
        "40",
        "--seqlen",
        "16",
        "--device",
        "cpu",
    )
    assert ev.returncode == 0, ev.stderr
    assert f"warning: --text {text}: 40 bytes that are not valid UTF-8 were replaced with U+FFFD" in ev.stderr
    schema = tmp_path / "schema.json"
    schema.write_bytes(b'{"type": "object", "properties": {"' + LATIN1 + b'": {"enum": ["\\ud800"]}}}')
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "spqr_run.cli.run",
        "generate",
        str(tiny_model),
        "--max-tokens",
        "2",
        "--device",
        "cpu",
    ]
    runs = {
        "argv": subprocess.run([*cmd, "--chat", "--system", b"\xff", "--prompt", LATIN1],
                               capture_output=True, env=env, timeout=300),
        "stdin": subprocess.run([*cmd, "--prompt", "-"], input=LATIN1, capture_output=True, env=env, timeout=300),
        "schema": subprocess.run([*cmd, "--prompt", "x", "--json-schema", str(schema)],
                                 capture_output=True, env=env, timeout=300),
    }  # fmt: skip
    for name, proc in runs.items():
        assert proc.returncode == 0 and b"Traceback" not in proc.stderr, (name, proc.stderr[-2000:])
    assert b"warning: --system: 1 character that is not valid Unicode was replaced" in runs["argv"].stderr
    assert b"warning: --prompt: 2 characters" in runs["argv"].stderr
    assert b"warning: --prompt - (standard input): 2 bytes that are not valid UTF-8" in runs["stdin"].stderr
    assert b"2 bytes that are not valid UTF-8" in runs["schema"].stderr
    assert b"replaced with U+FFFD in $.properties" in runs["schema"].stderr


def test_calibration_file_and_saved_conversation(tiny_model, tmp_path) -> None:  # noqa: F811
    from spqr_run.calibration import windows_from_text
    from spqr_run.loading import open_model

    calib = tmp_path / "calib.txt"
    calib.write_bytes((LATIN1 + b" the river flows past the old mill. ") * 40)
    notes: list[str] = []
    tokens = windows_from_text(calib, open_model(tiny_model), nsamples=2, seqlen=16, warn=notes.append)
    assert tokens.shape == (2, 16) and notes == [
        f"--calib {calib}: 80 bytes that are not valid UTF-8 were replaced with U+FFFD"
    ]
    saved = tmp_path / "chat.json"
    saved.write_bytes(
        b'{"format": "spqr-run-conversation", "version": 1, "system": "\\udc80", '
        b'"messages": [{"role": "user", "content": "' + LATIN1 + b'"}]}'
    )
    notes.clear()
    conv = Conversation.load(saved, warn=notes.append)
    assert conv.system == "\ufffd" and conv.messages[0].content == "caf\ufffd na\ufffdve"
    assert len(notes) == 2 and "system" in notes[1]


# ---- the server ------------------------------------------------------------------------------------------
# The openai Python client cannot send a lone surrogate (it encodes its JSON as UTF-8 and fails first), but
# JavaScript's JSON.stringify writes one as "\ud800", as does json.dumps: these bodies are what such clients send.
def _post(server: Server, route: str, body: bytes, **kw) -> httpx.Response:
    headers = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}
    return httpx.post(f"{server.url}{route}", content=body, headers=headers, timeout=120, **kw)


@needs_model
@pytest.mark.slow
def test_every_field_that_reaches_the_tokenizer(server: Server) -> None:
    """A lone surrogate in the chat messages (streamed or not), a completions prompt, stop strings, a tool's
    description and /tokenize, and Latin-1 bytes in a body: answered (never a 500), with the fields named in
    the X-Spqr-Warning header, exactly as if the client had sent U+FFFD."""
    msgs = '[{"role": "user", "content": "a\\ud800b"}]'
    cases = {
        "/v1/chat/completions": (f'{{"model": "{MODEL_NAME}", "messages": {msgs}, "max_tokens": 4}}', "messages[0].content"),
        "/v1/completions": ('{"prompt": "a\\ud800b", "max_tokens": 4, "stop": ["\\udfff"]}', "prompt, stop[0]"),
        "/tokenize": ('{"prompt": "a\\ud800b"}', "prompt"),
    }  # fmt: skip
    for route, (body, fields) in cases.items():
        r = _post(server, route, body.encode())
        assert r.status_code == 200, (route, r.text)
        assert (
            r.headers["x-spqr-warning"]
            == f"text that is not valid Unicode was replaced with U+FFFD in {fields}"
        )
    same = _post(server, "/tokenize", json.dumps({"prompt": "a\ufffdb"}).encode())
    assert same.json()["tokens"] == _post(server, "/tokenize", b'{"prompt": "a\\ud800b"}').json()["tokens"]
    assert "x-spqr-warning" not in same.headers
    stream = f'{{"messages": {msgs}, "max_tokens": 4, "stream": true}}'.encode()
    headers = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}
    with httpx.stream(
        "POST", f"{server.url}/v1/chat/completions", content=stream, headers=headers, timeout=120
    ) as r:
        events = [line for line in r.iter_lines() if line.startswith("data: ")]
        assert r.status_code == 200 and "messages[0].content" in r.headers["x-spqr-warning"]
    assert events[-1] == "data: [DONE]" and not any('"error"' in e for e in events)
    tools = '[{"type": "function", "function": {"name": "f", "description": "\\udc80", "parameters": {"type": "object"}}}]'
    r = _post(
        server,
        "/v1/chat/completions",
        f'{{"messages": [{{"role": "user", "content": "hi"}}], "tools": {tools}, "max_tokens": 4}}'.encode(),
    )
    assert r.status_code == 200 and r.headers["x-spqr-warning"].endswith("in tools[0].function.description")
    r = _post(
        server,
        "/v1/chat/completions",
        b'{"messages": [{"role": "user", "content": "' + LATIN1 + b'"}], "max_tokens": 2}',
    )
    assert r.status_code == 200 and r.headers["x-spqr-warning"].endswith("in messages[0].content")
