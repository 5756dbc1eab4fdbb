"""Reading the user's input: prompt_toolkit on a terminal (history file, multi-line, completion), lines on a pipe.

Multi-line input on a terminal: Esc then Enter (Alt+Enter) inserts a newline; a pasted block keeps its
newlines (bracketed paste); a first line that is exactly `\"\"\"` opens a block that Enter extends until a line
that is exactly `\"\"\"` closes it. `read()` returns the text, raises EOFError on Ctrl-D and
KeyboardInterrupt on Ctrl-C.
"""

from __future__ import annotations

import io
import os
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Protocol, TextIO

from prompt_toolkit import PromptSession
from prompt_toolkit.completion import CompleteEvent, Completer, Completion
from prompt_toolkit.document import Document
from prompt_toolkit.history import FileHistory, History, InMemoryHistory
from prompt_toolkit.key_binding import KeyBindings, KeyPressEvent

from spqr_run.chat.commands import COMMANDS, SETTINGS
from spqr_run.text import valid_text

PROMPT = ">>> "
BLOCK_FENCE = '"""'


class InputReader(Protocol):
    def read(self) -> str: ...


def history_path() -> Path:
    """`$SPQR_RUN_CHAT_HISTORY`, else `$XDG_DATA_HOME/spqr-run/chat_history` (~/.local/share by default)."""
    if os.environ.get("SPQR_RUN_CHAT_HISTORY"):
        return Path(os.environ["SPQR_RUN_CHAT_HISTORY"]).expanduser()
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base).expanduser() / "spqr-run" / "chat_history"


def block_state(text: str) -> str:
    """'none' (ordinary input), 'open' (a \"\"\" block still open) or 'closed' (a complete block)."""
    lines = text.split("\n")
    if lines[0].strip() != BLOCK_FENCE:
        return "none"
    return "closed" if len(lines) > 1 and lines[-1].strip() == BLOCK_FENCE else "open"


def unwrap_block(text: str) -> str:
    """The text inside a \"\"\" block (unchanged when `text` is not a block)."""
    if block_state(text) == "closed":
        return "\n".join(text.split("\n")[1:-1])
    return text


class SlashCompleter(Completer):
    """Completes command names after '/', and setting names after '/set '."""

    def get_completions(self, document: Document, complete_event: CompleteEvent) -> Iterable[Completion]:
        text = document.text_before_cursor
        if not text.startswith("/") or "\n" in text:
            return
        if " " not in text:
            for name in COMMANDS:
                if ("/" + name).startswith(text):
                    yield Completion("/" + name, start_position=-len(text), display_meta=COMMANDS[name].help)
        elif text.startswith("/set ") and text.count(" ") == 1:
            word = text[len("/set ") :]
            for name in SETTINGS:
                if name.startswith(word):
                    yield Completion(name, start_position=-len(word))


def _bindings() -> KeyBindings:
    kb = KeyBindings()

    @kb.add("enter")
    def _enter(event: KeyPressEvent) -> None:
        buf = event.current_buffer
        if block_state(buf.text) == "open":
            buf.insert_text("\n")
        else:
            buf.validate_and_handle()

    @kb.add("escape", "enter")
    def _newline(event: KeyPressEvent) -> None:
        event.current_buffer.insert_text("\n")

    return kb


class TerminalReader:
    """prompt_toolkit input with a persistent history file."""

    def __init__(self, history_file: Path | None = None) -> None:
        self.session: PromptSession[str] = PromptSession(
            history=_open_history(history_file or history_path()),
            completer=SlashCompleter(),
            complete_while_typing=False,
            key_bindings=_bindings(),
            multiline=True,  # Enter is bound above: it submits unless a \"\"\" block is open
            prompt_continuation="... ",
            enable_history_search=False,
        )

    def read(self) -> str:
        return unwrap_block(self.session.prompt(PROMPT))


class _ValidHistory(FileHistory):
    """The history file, written as valid UTF-8: an entry holding what is not valid Unicode (bytes typed or
    pasted that are not UTF-8 reach prompt_toolkit as lone surrogates) is stored with U+FFFD in their place
    (writing them as they are would raise UnicodeEncodeError and end the chat)."""

    def store_string(self, string: str) -> None:
        super().store_string(valid_text(string)[0])


def _open_history(path: Path) -> History:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch(exist_ok=True)
    except OSError:
        return InMemoryHistory()  # read-only home: no history across runs, but chat still works
    return _ValidHistory(str(path))


class LineReader:
    """Input from a pipe or file: one message a line; \"\"\" lines bracket a multi-line message."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stdin

    def _line(self) -> str:
        line = self.stream.readline()
        if not line:
            raise EOFError
        return line.rstrip("\n")

    def read(self) -> str:
        first = self._line()
        if first.strip() != BLOCK_FENCE:
            return first
        lines = []
        while (line := self._line()).strip() != BLOCK_FENCE:
            lines.append(line)
        return "\n".join(lines)


def make_reader() -> InputReader:
    """A prompt_toolkit reader on a terminal, a line reader otherwise.

    Piped input that is not valid UTF-8 (Latin-1 text, say) must not end the chat: standard input is read
    with "surrogateescape", so such bytes reach the REPL as lone surrogates, which it replaces with U+FFFD
    and reports (`spqr_run.text`); prompt_toolkit decodes a terminal's input the same way."""
    if sys.stdin.isatty() and sys.stdout.isatty():
        return TerminalReader()
    if isinstance(sys.stdin, io.TextIOWrapper):
        sys.stdin.reconfigure(errors="surrogateescape")
    return LineReader()
