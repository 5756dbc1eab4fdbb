"""The chat loop: read a line, run a slash command or stream a reply; Ctrl-C stops a reply, Ctrl-D quits."""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict
from types import FrameType

try:
    import termios
except ImportError:  # not on POSIX: no terminal modes to change
    termios = None  # type: ignore[assignment]

from spqr_run.chat.commands import Command, apply_setting, help_text, is_command, parse_command, parse_format
from spqr_run.chat.conversation import Conversation
from spqr_run.chat.info import describe, model_facts
from spqr_run.chat.input import InputReader
from spqr_run.chat.render import PlainOutput, RichOutput, stats_line
from spqr_run.chat.session import ChatSession
from spqr_run.errors import SpqrError
from spqr_run.text import replaced_note, valid_text

Output = PlainOutput | RichOutput
SHOWN_SETTINGS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "max_tokens", "seed")


@contextmanager
def terminal_echo_off(fd: int | None = None) -> Iterator[None]:
    """Turn the terminal's echo off for the block (standard input by default; nothing when it is no terminal).

    While a reply streams, the terminal itself would echo what is typed, Ctrl-C as "^C", at the cursor. The
    rich view redraws its live area by moving the cursor up as many lines as it drew; its lines are padded
    to the full width, so a "^C" echoed after the last one wraps onto a new line, the redraw then starts
    one line too low and the live area's first line is left on the screen twice. With echo off the
    keystrokes still arrive (Ctrl-C still sends SIGINT) but nothing is drawn behind the renderer's back.

    NOFLSH is set too: by default Ctrl-C makes the terminal driver discard the output that the terminal has
    not read yet, and the typed-ahead input. A terminal that lags behind the reply (a loaded machine, ssh)
    would then miss part of the live area's redraws, whose cursor-up counts no longer match the screen: the
    reply is drawn shifted, lines twice or over the question. With NOFLSH all of the reply (which is kept in
    the conversation) reaches the screen, and typed-ahead text waits for the next prompt.
    """
    saved = None
    if termios is not None:
        try:
            fd = sys.stdin.fileno() if fd is None else fd
            if os.isatty(fd):
                saved = termios.tcgetattr(fd)
                quiet = list(saved)
                quiet[3] &= ~(termios.ECHO | termios.ECHONL)  # lflag
                quiet[3] |= termios.NOFLSH  # Ctrl-C discards no output not yet shown (see above)
                termios.tcsetattr(fd, termios.TCSANOW, quiet)  # TCSANOW: keep what was typed ahead
        except (OSError, ValueError, AttributeError, termios.error):  # no usable standard input
            saved = None
    if saved is None:
        yield
        return
    try:
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSANOW, saved)


class StopFlag:
    """Set by Ctrl-C while a reply is generated; a second Ctrl-C raises KeyboardInterrupt at once."""

    def __init__(self) -> None:
        self.stop = False

    def __call__(self) -> bool:
        return self.stop

    def _on_sigint(self, signum: int, frame: FrameType | None) -> None:
        if self.stop:
            raise KeyboardInterrupt
        self.stop = True

    @contextmanager
    def installed(self) -> Iterator[StopFlag]:
        """Catch SIGINT only for the duration of the block (the prompt handles Ctrl-C itself), with the
        terminal's echo off so that "^C" is not drawn into the streaming reply (`terminal_echo_off`)."""
        self.stop = False
        previous = signal.signal(signal.SIGINT, self._on_sigint)
        try:
            with terminal_echo_off():
                yield self
        finally:
            signal.signal(signal.SIGINT, previous)


def context_use(session: ChatSession) -> str:
    """/stats' context row: tokens the conversation takes as the next prompt (the chat template's markup and
    the next turn's opening included) of the context. When the last reply filled the context that count can
    exceed it (the reply ran to the last slot, and closing it adds markup): then it says so, and what the next
    message does, instead of printing "166 of 160"."""
    used, size = session.context_tokens(), session.runtime.max_context
    messages = f"{len(session.conversation.messages)} messages"
    if used <= size:
        return f"{used} of {size} tokens ({messages})"
    stats = session.last_stats
    if stats is not None and stats.context_full:
        head = f"full: the last reply used all {size} tokens"
    else:
        head = f"full: the conversation needs more than the {size} tokens"
    return (
        f"{head}; with the chat template the {messages} take {used}, so the oldest are dropped when you send "
        "the next message (/clear starts afresh)"
    )


class Repl:
    def __init__(self, session: ChatSession, reader: InputReader, out: Output) -> None:
        self.session, self.reader, self.out = session, reader, out
        self.flag = StopFlag()

    def banner(self) -> None:
        self.out.table(describe(model_facts(self.session.runtime)))
        self.out.line("Type a message, /help for commands, Ctrl-D or /exit to quit.", style="dim")

    def run(self) -> int:
        """Loop until /exit or Ctrl-D; returns the exit status."""
        while True:
            try:
                text = self.reader.read()
            except KeyboardInterrupt:
                self.out.line("(Ctrl-C: type /exit or press Ctrl-D to quit)", style="dim")
                continue
            except EOFError:
                self.out.line()
                return 0
            text, replaced = valid_text(text)  # what is not valid Unicode: U+FFFD, and the user is told
            if replaced:
                self.out.notice(f"[{replaced_note('your input', replaced)}]")
            if not text.strip():
                continue
            try:
                if is_command(text.strip()):
                    if self.command(parse_command(text)) == "exit":
                        return 0
                else:
                    with self.flag.installed() as flag:
                        self.session.send(text, self.out, flag)
            except SpqrError as e:  # one line, never a traceback
                self.out.error(str(e))
            except Exception as e:  # noqa: BLE001 - a bug: say so in one line, but never lose the conversation
                self.out.error(
                    f"internal error ({type(e).__name__}: {e}); the message was not sent and the conversation "
                    "is kept (/save FILE keeps it on disk)"
                )

    def command(self, cmd: Command) -> str | None:
        """Run one slash command; returns "exit" to end the loop."""
        s, out = self.session, self.out
        if cmd.name == "exit":
            return "exit"
        if cmd.name == "help":
            out.line(help_text())
        elif cmd.name == "clear":
            s.conversation.clear()
            out.notice("[new conversation]")
        elif cmd.name == "system":
            self._system(cmd.arg)
        elif cmd.name == "set":
            s.params, message = apply_setting(s.params, cmd.arg)
            out.line(message, style="dim")
        elif cmd.name == "format":
            if not cmd.arg:
                out.line(
                    f"replies follow the {s.format[1]}" if s.format else "replies are free text", style="dim"
                )
            else:
                schema = parse_format(cmd.arg, warn=lambda note: out.notice(f"[{note}]"))
                out.line(s.set_format(schema), style="dim")
        elif cmd.name == "show":
            self._show()
        elif cmd.name == "retry":
            with self.flag.installed() as flag:
                s.retry(out, flag)
        elif cmd.name == "save":
            path = s.conversation.save(cmd.arg)
            out.line(f"saved {len(s.conversation.messages)} messages to {path}", style="dim")
        elif cmd.name == "load":
            s.conversation = Conversation.load(cmd.arg, warn=lambda note: out.notice(f"[{note}]"))
            system = " and a system prompt" if s.conversation.system else ""
            out.line(f"loaded {len(s.conversation.messages)} messages{system} from {cmd.arg}", style="dim")
        elif cmd.name == "stats":
            self._stats()
        return None

    def _system(self, arg: str) -> None:
        conv = self.session.conversation
        if not arg:
            self.out.line(
                f"system prompt: {conv.system!r}"
                if conv.system
                else "no system prompt (the template's default)"
            )
        elif arg == "-":
            conv.system = None
            self.out.line("system prompt removed", style="dim")
        else:
            conv.system = arg
            self.out.line("system prompt set", style="dim")

    def _show(self) -> None:
        params = asdict(self.session.params)
        rows = describe(model_facts(self.session.runtime))
        rows.append(("settings", ", ".join(f"{k}={params[k]}" for k in SHOWN_SETTINGS)))
        rows.append(("system prompt", repr(self.session.conversation.system)))
        self.out.table(rows)

    def _stats(self) -> None:
        s = self.session
        last = stats_line(s.last_finish or "", s.last_stats) if s.last_stats else "no reply yet"
        self.out.table(
            [
                ("last reply", last),
                ("replies", f"{s.replies} ({s.total_completion_tokens} tokens generated)"),
                ("context", context_use(s)),
            ]
        )
