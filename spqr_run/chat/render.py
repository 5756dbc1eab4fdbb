"""Terminal output of the chat: plain text (pipes, `--plain`) or rich (Markdown rendered live, dim stats).

Both write the reply as it is generated. The rich view renders Markdown as it streams (at most 10 times a
second): Markdown blocks that later text cannot change are printed once, and only the block being generated
is re-rendered, so long replies scroll normally and code blocks are never cut in half.
"""

from __future__ import annotations

import io
import sys
import time
from typing import TextIO

from rich.console import Console
from rich.live import Live
from rich.markdown import Markdown
from rich.text import Text

from spqr_run.cli.common import printable
from spqr_run.generation import GenerationStats

__all__ = ["PlainOutput", "RichOutput", "complete_blocks_end", "end_line", "printable", "stats_line"]


def finish_note(finish_reason: str, stats: GenerationStats | None) -> str | None:
    """Why a reply stopped early, in words (None when it ended by itself): the context was full, max_tokens
    was reached (both are finish_reason "length"), or the user stopped it."""
    if finish_reason == "cancelled":
        return "stopped"
    if finish_reason != "length":
        return None
    limit = f", {stats.token_limit} tokens" if stats is not None and stats.token_limit else ""
    if stats is not None and stats.context_full:
        return f"stopped: the context is full{limit}"
    return f"stopped at max_tokens{limit}"


def end_line(finish_reason: str, stats: GenerationStats | None, show_stats: bool) -> str | None:
    """The line after a reply: the stats (when shown), or just why it stopped early, or nothing."""
    if show_stats and stats is not None:
        return stats_line(finish_reason, stats)
    note = finish_note(finish_reason, stats)
    return f"({note})" if note else None


def stats_line(finish_reason: str, stats: GenerationStats) -> str:
    """'12 tokens, ttft 0.31 s, prefill 250.0 tok/s, decode 21.4 tok/s' (+ why it stopped early).

    When part of the prompt came from the KV cache (the earlier turns of the conversation), a prefill rate
    would count tokens that were not computed: the line says 'prompt 230 of 240 tokens cached' instead.
    """
    note = finish_note(finish_reason, stats)
    if stats.cached_tokens:
        prompt = f"prompt {stats.cached_tokens} of {stats.prompt_tokens} tokens cached"
    else:
        prompt = f"prefill {stats.prefill_tok_s:.1f} tok/s"
    text = (
        f"{stats.completion_tokens} tokens, ttft {stats.ttft_s:.2f} s, {prompt}, "
        f"decode {stats.decode_tok_s:.1f} tok/s"
    )
    return f"{text} ({note})" if note else text


class PlainOutput:
    """Plain text on a stream: no colour, no cursor movement (parseable)."""

    def __init__(self, stream: TextIO | None = None, *, show_stats: bool = True) -> None:
        self.stream = stream or sys.stdout
        self.show_stats = show_stats
        self._at_line_start = True

    def _write(self, text: str) -> None:
        if text:
            self.stream.write(text)
            self.stream.flush()
            self._at_line_start = text.endswith("\n")

    def line(self, text: str = "", *, style: str = "") -> None:
        del style
        self._write(text + "\n")

    def notice(self, text: str) -> None:
        self.line(text)

    def error(self, text: str) -> None:
        self.line(f"error: {text}")

    def table(self, rows: list[tuple[str, str]]) -> None:
        width = max(len(k) for k, _ in rows)
        for key, value in rows:
            self.line(f"{key + ':':<{width + 1}} {value}")

    def reply_start(self) -> None:
        self._at_line_start = True

    def reply_text(self, piece: str) -> None:
        self._write(piece)

    def reply_end(self, finish_reason: str, stats: GenerationStats | None) -> None:
        if not self._at_line_start:
            self._write("\n")
        if (line := end_line(finish_reason, stats, self.show_stats)) is not None:
            self.line(line)


def complete_blocks_end(text: str, start: int = 0) -> int:
    """End of the Markdown blocks of `text[start:]` that later text cannot change (`start` when none).

    A block is complete when a blank line outside a code fence is followed by a line that starts in
    column 0 (so a list item's indented continuation or a nested list stays with its item).
    """
    end, pos, in_fence, after_blank = start, start, False, False
    for line in text[start:].splitlines(keepends=True):
        stripped = line.strip()
        if after_blank and stripped and not line[0].isspace() and not in_fence:
            end = pos
        if not line.endswith("\n"):
            break  # an unfinished line: only its first character counts
        if stripped.startswith(("```", "~~~")):
            in_fence = not in_fence
        after_blank = not stripped and not in_fence
        pos += len(line)
    return end


class RichOutput:
    """Rich console output: Markdown replies rendered as they stream, a dim stats line, styled notices.

    Complete Markdown blocks are printed once, for good; the block being generated is re-rendered in a live
    area. A block taller than the screen scrolls: its lines above the live area are printed as they go.
    """

    MIN_INTERVAL_S = 0.1

    def __init__(self, console: Console | None = None, *, show_stats: bool = True) -> None:
        self.console = console or Console(highlight=False)
        self.show_stats = show_stats
        self._text = ""
        self._done = 0  # characters of _text whose blocks are printed
        self._printed = 0  # lines of the current block already printed (a block taller than the screen)
        self._blocks = 0
        self._last = 0.0
        self._live: Live | None = None

    # Text objects throughout: file names, model metadata and messages are printed literally, never as markup
    def line(self, text: str = "", *, style: str = "") -> None:
        self.console.print(Text(printable(text), style=style), soft_wrap=True)

    def notice(self, text: str) -> None:
        self.line(text, style="yellow")

    def error(self, text: str) -> None:
        self.console.print(Text.assemble(("error: ", "bold red"), printable(text)), soft_wrap=True)

    def table(self, rows: list[tuple[str, str]]) -> None:
        width = max(len(k) for k, _ in rows)
        for key, value in rows:
            self.console.print(
                Text.assemble((f"{key + ':':<{width + 1}} ", "bold"), printable(value)), soft_wrap=True
            )

    def reply_start(self) -> None:
        self._text, self._done, self._printed, self._blocks, self._last = "", 0, 0, 0, 0.0
        self._live = Live(Text(""), console=self.console, auto_refresh=False, vertical_overflow="visible")
        self._live.start()

    def reply_text(self, piece: str) -> None:
        self._text += printable(piece)  # rendered as Markdown, never as rich markup or terminal escapes
        now = time.monotonic()
        if now - self._last >= self.MIN_INTERVAL_S:
            self._last = now
            self._update(final=False)

    def reply_end(self, finish_reason: str, stats: GenerationStats | None) -> None:
        self._update(final=True)
        if (line := end_line(finish_reason, stats, self.show_stats)) is not None:
            self.line(line, style="dim")

    def _render(self, markdown: str) -> list[str]:
        buf = io.StringIO()
        console = Console(
            file=buf, width=self.console.width, color_system=self.console.color_system, force_terminal=True
        )
        console.print(Markdown(markdown, code_theme="monokai"))
        lines = buf.getvalue().splitlines(keepends=True)
        if self._blocks and lines and Text.from_ansi(lines[0]).plain.strip():
            lines.insert(0, "\n")  # the blank line Markdown puts between blocks
        return lines

    def _emit(self, lines: list[str]) -> None:
        if lines and self._live is not None:
            self._live.console.print(Text.from_ansi("".join(lines).rstrip("\n")))

    def _update(self, *, final: bool) -> None:
        live = self._live
        if live is None:
            return
        end = complete_blocks_end(self._text, self._done)
        if end > self._done:  # blocks completed: print what is not printed yet, for good
            lines = self._render(self._text[self._done : end])
            self._emit(lines[self._printed :])
            self._done, self._printed, self._blocks = end, 0, self._blocks + 1
        lines = self._render(self._text[self._done :]) if self._text[self._done :].strip() else []
        room = max(4, self.console.height - 4)
        if not final and len(lines) - self._printed > room:  # taller than the screen: scroll its top out
            self._emit(lines[self._printed : len(lines) - room])
            self._printed = len(lines) - room
        live.update(Text.from_ansi("".join(lines[self._printed :]).rstrip("\n")), refresh=True)
        if final:
            live.transient = len(lines) <= self._printed  # nothing left to show: leave no blank line
            live.stop()
            self._live = None
