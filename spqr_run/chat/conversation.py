"""A chat conversation: system prompt + turns, trimming to the context, and its JSON file format.

File format (version 1), written atomically (temporary name, then rename)::

    {
      "format": "spqr-run-conversation",
      "version": 1,
      "system": "You are ..." | null,
      "messages": [{"role": "user" | "assistant", "content": "..."}, ...]
    }
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from spqr_run.errors import SpqrError
from spqr_run.text import decode_text, valid_json_warn

FILE_FORMAT = "spqr-run-conversation"
FILE_VERSION = 1
ROLES = ("user", "assistant")


class ConversationError(SpqrError):
    """A conversation file cannot be read or written, or a message cannot fit the context."""


@dataclass
class Message:
    role: str  # "user" | "assistant"
    content: str

    def as_dict(self) -> dict[str, str]:
        return {"role": self.role, "content": self.content}


@dataclass
class Conversation:
    """The system prompt (kept when trimming) and the user/assistant turns, oldest first."""

    system: str | None = None
    messages: list[Message] = field(default_factory=list)

    def for_template(self) -> list[dict[str, str]]:
        """Messages as the chat template takes them (system first when set)."""
        head = [{"role": "system", "content": self.system}] if self.system else []
        return head + [m.as_dict() for m in self.messages]

    def add(self, role: str, content: str) -> None:
        self.messages.append(Message(role, content))

    def clear(self) -> None:
        """Start a new conversation; the system prompt stays."""
        self.messages.clear()

    def pop_last_reply(self) -> str | None:
        """For /retry: drop the last assistant message; return the user message it answered (None: nothing)."""
        if len(self.messages) >= 2 and self.messages[-1].role == "assistant":
            self.messages.pop()
            return self.messages[-1].content if self.messages[-1].role == "user" else None
        return None

    # ---- trimming ---------------------------------------------------------------------------------
    def trim_to_fit(self, count_tokens: Callable[[Conversation], int], budget: int) -> int:
        """Drop the oldest turns (never the system prompt nor the last message) until the prompt fits.

        `count_tokens` measures the rendered prompt of a conversation. Returns how many messages were
        dropped. Raises ConversationError, leaving the conversation unchanged, when even the system prompt
        plus the last message do not fit.
        """
        trial = Conversation(self.system, list(self.messages))
        while (n := count_tokens(trial)) > budget:
            if len(trial.messages) <= 1:
                what = "your message" if trial.messages else "the system prompt"
                raise ConversationError(
                    f"{what} needs {n} tokens with the chat template, but only {budget} fit in the context "
                    "(shorten it, or start with a larger --ctx)"
                )
            # drop a whole turn: the oldest message and, if it is a user message, the reply to it
            cut = 2 if len(trial.messages) > 2 and trial.messages[0].role == "user" else 1
            del trial.messages[:cut]
        dropped = len(self.messages) - len(trial.messages)
        self.messages = trial.messages
        return dropped

    # ---- file format ------------------------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        return {
            "format": FILE_FORMAT,
            "version": FILE_VERSION,
            "system": self.system,
            "messages": [m.as_dict() for m in self.messages],
        }

    @classmethod
    def from_json(cls, data: Any, *, source: str = "conversation") -> Conversation:
        """Validate and build a conversation from parsed JSON; any problem is one ConversationError line."""
        if not isinstance(data, dict) or data.get("format") != FILE_FORMAT:
            raise ConversationError(
                f'{source}: not a spqr-run conversation file (no "format": "{FILE_FORMAT}")'
            )
        version = data.get("version")
        if version != FILE_VERSION:
            raise ConversationError(
                f"{source}: conversation format version {version!r} is not supported (this build reads "
                f"version {FILE_VERSION})"
            )
        system = data.get("system")
        if system is not None and not isinstance(system, str):
            raise ConversationError(f"{source}: field 'system' must be a string or null")
        raw = data.get("messages")
        if not isinstance(raw, list):
            raise ConversationError(f"{source}: field 'messages' must be a list")
        messages = []
        for i, m in enumerate(raw):
            if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
                raise ConversationError(
                    f'{source}: message {i} must be {{"role": "user" | "assistant", "content": string}}'
                )
            messages.append(Message(m["role"], m["content"]))
        return cls(system or None, messages)

    def save(self, path: str | Path) -> Path:
        """Write the conversation as JSON: to a temporary file in the same folder, then rename over `path`."""
        target = Path(path).expanduser()
        text = json.dumps(self.to_json(), ensure_ascii=False, indent=2) + "\n"
        try:
            fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
        except OSError as e:
            raise ConversationError(f"cannot write {target}: {e.strerror}") from None
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(text)
            os.replace(tmp, target)
        except OSError as e:
            Path(tmp).unlink(missing_ok=True)
            raise ConversationError(f"cannot write {target}: {e.strerror}") from None
        return target

    @classmethod
    def load(cls, path: str | Path, *, warn: Callable[[str], None] | None = None) -> Conversation:
        """Read a file written by `save`; text that is not valid Unicode in it becomes U+FFFD (`warn` is told:
        `spqr_run.text`), any other problem is one ConversationError line."""
        source = Path(path).expanduser()
        try:
            raw = source.read_bytes()
        except OSError as e:
            raise ConversationError(f"cannot read {source}: {e.strerror}") from None
        try:
            data = json.loads(decode_text(raw, str(source), warn))
        except json.JSONDecodeError as e:
            raise ConversationError(f"{source}: not valid JSON ({e.msg} at line {e.lineno})") from None
        return cls.from_json(valid_json_warn(data, str(source), warn), source=str(source))
