"""Conversation history: trimming to the context and the versioned JSON file format."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from spqr_run.chat.conversation import FILE_FORMAT, FILE_VERSION, Conversation, ConversationError, Message


def words(conv: Conversation) -> int:
    """A stand-in token count: words of every message plus 2 per message of template overhead."""
    return sum(len(m["content"].split()) + 2 for m in conv.for_template())


def make(system: str | None, *contents: str) -> Conversation:
    conv = Conversation(system)
    for i, text in enumerate(contents):
        conv.add("user" if i % 2 == 0 else "assistant", text)
    return conv


def test_nothing_dropped_when_it_fits() -> None:
    conv = make("be brief", "hello there", "hi", "how are you")
    assert conv.trim_to_fit(words, budget=100) == 0
    assert len(conv.messages) == 3


def test_oldest_turns_dropped_system_kept() -> None:
    conv = make("be brief", "one two three", "four five", "six seven", "eight", "nine ten eleven")
    before = words(conv)
    dropped = conv.trim_to_fit(words, budget=before - 1)
    assert dropped == 2  # one whole turn: the oldest user message and its reply
    assert conv.system == "be brief"
    assert [m.content for m in conv.messages] == ["six seven", "eight", "nine ten eleven"]
    assert words(conv) <= before - 1


def test_trims_down_to_the_last_message() -> None:
    conv = make(None, "a " * 10, "b " * 10, "c " * 10, "d " * 10, "last question")
    dropped = conv.trim_to_fit(words, budget=5)
    assert dropped == 4
    assert conv.messages == [Message("user", "last question")]


def test_a_message_larger_than_the_context_is_a_clear_error() -> None:
    conv = make("sys", "hi", "hello", "x " * 500)
    with pytest.raises(ConversationError, match=r"your message needs \d+ tokens.*only 50 fit"):
        conv.trim_to_fit(words, budget=50)
    assert [m.content for m in conv.messages] == ["hi", "hello", "x " * 500]  # nothing lost on the error


def test_retry_pops_the_last_reply() -> None:
    conv = make(None, "q1", "a1", "q2", "a2")
    assert conv.pop_last_reply() == "q2"
    assert [m.content for m in conv.messages] == ["q1", "a1", "q2"]
    assert conv.pop_last_reply() is None  # the last message is a user message now
    assert Conversation().pop_last_reply() is None


def test_save_and_load_round_trip(tmp_path: Path) -> None:
    conv = make("You are terse.", "My name is Ada.", "Hello Ada!", 'Unicode é 漢字 and "quotes"\nand lines')
    path = conv.save(tmp_path / "chat.json")
    data = json.loads(path.read_text(encoding="utf-8"))
    assert data["format"] == FILE_FORMAT and data["version"] == FILE_VERSION
    loaded = Conversation.load(path)
    assert loaded == conv
    assert [p.name for p in tmp_path.iterdir()] == ["chat.json"]  # no temporary file left behind


def test_save_replaces_atomically(tmp_path: Path) -> None:
    path = tmp_path / "chat.json"
    make(None, "first").save(path)
    make(None, "second").save(path)
    assert Conversation.load(path).messages == [Message("user", "second")]


def test_save_into_a_missing_folder_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ConversationError, match="cannot write"):
        make(None, "x").save(tmp_path / "nope" / "chat.json")


@pytest.mark.parametrize(
    ("content", "error"),
    [
        ("{not json", "not valid JSON"),
        ("[]", "not a spqr-run conversation file"),
        ('{"format": "something-else", "version": 1}', "not a spqr-run conversation file"),
        ('{"format": "spqr-run-conversation", "version": 99, "messages": []}', "version 99 is not supported"),
        ('{"format": "spqr-run-conversation", "version": 1, "messages": {}}', "'messages' must be a list"),
        (
            '{"format": "spqr-run-conversation", "version": 1, "system": 3, "messages": []}',
            "'system' must be",
        ),
        (
            '{"format": "spqr-run-conversation", "version": 1, "messages": [{"role": "tool", "content": "x"}]}',
            "message 0 must be",
        ),
        (
            '{"format": "spqr-run-conversation", "version": 1, "messages": [{"role": "user", "content": 5}]}',
            "message 0 must be",
        ),
    ],
)
def test_bad_files_give_a_clear_error(tmp_path: Path, content: str, error: str) -> None:
    path = tmp_path / "bad.json"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(ConversationError, match=error) as e:
        Conversation.load(path)
    assert str(path) in str(e.value) and "\n" not in str(e.value)


def test_missing_and_binary_files(tmp_path: Path) -> None:
    with pytest.raises(ConversationError, match="cannot read"):
        Conversation.load(tmp_path / "missing.json")
    binary = tmp_path / "bin.json"
    binary.write_bytes(b"\xff\xfe\x00garbage")  # its bytes that are not UTF-8 become U+FFFD: then not JSON
    notes: list[str] = []
    with pytest.raises(ConversationError, match="bin.json: not valid JSON"):
        Conversation.load(binary, warn=notes.append)
    assert notes == [f"{binary}: 2 bytes that are not valid UTF-8 were replaced with U+FFFD"]
