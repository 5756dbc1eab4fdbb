"""Slash-command parsing and /set values: every mistake is a one-line CommandError, never a traceback."""

from __future__ import annotations

import re

import pytest

from spqr_run.chat.commands import (
    COMMANDS,
    Command,
    CommandError,
    apply_setting,
    help_text,
    is_command,
    parse_command,
    parse_setting,
)
from spqr_run.chat.input import block_state, unwrap_block
from spqr_run.sampling import SamplingParams


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("/help", Command("help", "")),
        ("/HELP", Command("help", "")),
        ("/exit", Command("exit", "")),
        ("/quit", Command("exit", "")),
        ("/system You are terse.", Command("system", "You are terse.")),
        ("/system", Command("system", "")),
        ("/set  temperature   0 ", Command("set", "temperature   0")),
        ("/save my chat.json", Command("save", "my chat.json")),
        ("/load x.json", Command("load", "x.json")),
    ],
)
def test_parse_command(line: str, expected: Command) -> None:
    assert is_command(line)
    assert parse_command(line) == expected


@pytest.mark.parametrize("line", ["hello", "/", "/ 2", "//comment", "a/b", " /help"])
def test_text_that_is_not_a_command(line: str) -> None:
    assert not is_command(line)


@pytest.mark.parametrize(
    ("line", "hint"),
    [
        ("/hepl", "unknown command /hepl (did you mean /help?)"),
        ("/frobnicate", "unknown command /frobnicate; type /help"),
        ("/set", "usage: /set NAME VALUE"),
        ("/save", "usage: /save FILE"),
        ("/clear now", "/clear takes no argument"),
    ],
)
def test_bad_commands_give_a_hint(line: str, hint: str) -> None:
    with pytest.raises(CommandError, match=re.escape(hint)) as e:
        parse_command(line)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize(
    ("arg", "field", "value"),
    [
        ("temperature 0", "temperature", 0.0),
        ("top_p 0.9", "top_p", 0.9),
        ("top-p 0.5", "top_p", 0.5),
        ("top_k 40", "top_k", 40),
        ("min_p 0.05", "min_p", 0.05),
        ("repeat_penalty 1.1", "repetition_penalty", 1.1),
        ("max_tokens 64", "max_tokens", 64),
        ("seed 7", "seed", 7),
        ("seed none", "seed", None),
    ],
)
def test_parse_setting(arg: str, field: str, value: object) -> None:
    assert parse_setting(arg) == (field, value)
    params, message = apply_setting(SamplingParams(), arg)
    assert getattr(params, field) == value
    assert field in message


@pytest.mark.parametrize(
    ("arg", "hint"),
    [
        ("temperature", "usage: /set NAME VALUE"),
        ("temprature 1", "did you mean temperature?"),
        ("colour blue", "unknown setting 'colour'"),
        ("top_k 1.5", "top_k must be an integer"),
        ("temperature hot", "temperature must be a number"),
        ("temperature -1", "invalid temperature"),
        ("top_p 2", "invalid top_p"),
        ("max_tokens 0", "invalid max_tokens"),
    ],
)
def test_bad_settings_give_a_hint(arg: str, hint: str) -> None:
    with pytest.raises(CommandError, match=hint):
        apply_setting(SamplingParams(), arg)


def test_help_lists_every_command() -> None:
    text = help_text()
    for name in COMMANDS:
        assert f"/{name}" in text
    assert '"""' in text and "Esc" in text


def test_triple_quote_blocks() -> None:
    assert block_state("hello") == "none"
    assert block_state('"""') == "open"
    assert block_state('"""\nline one\nline two') == "open"
    assert block_state('"""\nline one\n"""') == "closed"
    assert unwrap_block('"""\nline one\n\nline two\n"""') == "line one\n\nline two"
    assert unwrap_block("just text") == "just text"
