"""Streaming output: Markdown block boundaries, and the rich view printing every line exactly once."""

from __future__ import annotations

import io

import pytest
from rich.console import Console
from rich.text import Text

from spqr_run.chat.render import PlainOutput, RichOutput, complete_blocks_end, printable, stats_line
from spqr_run.generation import GenerationStats

REPLY = """Here is the code:

```python
def add(a, b):

    return a + b
```

1. **First** item
   continued

   - nested point

2. Second item

Done."""


@pytest.mark.parametrize(
    ("text", "complete"),
    [
        ("one paragraph", ""),
        ("one paragraph\n\nsecond", "one paragraph\n\n"),
        ("one paragraph\n\n", ""),  # the next block's kind is not known yet
        ("```\ncode\n\nmore code\n", ""),  # a blank line inside an open fence ends nothing
        ("```\ncode\n```\n\nafter", "```\ncode\n```\n\n"),
        ("1. item\n\n   continued", ""),  # an indented continuation stays with its item
        ("1. item\n\n2. next", "1. item\n\n"),
    ],
)
def test_complete_blocks_end(text: str, complete: str) -> None:
    assert text[: complete_blocks_end(text)] == complete


def stream(out, text: str) -> None:
    stats = GenerationStats(prompt_tokens=5, completion_tokens=11, ttft_s=0.1, prefill_s=0.1, decode_s=1.0)
    out.MIN_INTERVAL_S = 0.0  # re-render after every character
    out.reply_start()
    for ch in text:
        out.reply_text(ch)
    out.reply_end("stop", stats)


def test_rich_output_prints_every_line_once() -> None:
    buf = io.StringIO()
    out = RichOutput(Console(file=buf, width=60, height=12, force_terminal=False), show_stats=True)
    stream(out, REPLY)
    text = buf.getvalue()
    for expected in [
        "Here is the code:",
        "def add(a, b):",
        "return a + b",
        "First item",
        "continued",
        "nested point",
        "Second item",
        "Done.",
    ]:
        assert text.count(expected) == 1, (expected, text)
    assert "```" not in text and "**" not in text  # rendered, not raw Markdown
    assert text.index("def add") < text.index("return a + b") < text.index("First") < text.index("Done.")
    assert text.rstrip().endswith("decode 10.0 tok/s")


def test_plain_output_is_the_raw_text() -> None:
    buf = io.StringIO()
    stream(PlainOutput(buf), REPLY)
    assert buf.getvalue().startswith(REPLY + "\n")
    assert "tokens, ttft 0.10 s" in buf.getvalue()


def test_stats_line_shows_cached_prompt_tokens_not_a_prefill_rate() -> None:
    fresh = GenerationStats(prompt_tokens=40, completion_tokens=5, ttft_s=0.2, prefill_s=0.2, decode_s=0.4)
    assert stats_line("stop", fresh) == "5 tokens, ttft 0.20 s, prefill 200.0 tok/s, decode 10.0 tok/s"
    cached = GenerationStats(
        prompt_tokens=240, cached_tokens=230, completion_tokens=5, ttft_s=0.05, prefill_s=0.05, decode_s=0.4
    )
    line = stats_line("cancelled", cached)
    assert line == "5 tokens, ttft 0.05 s, prompt 230 of 240 tokens cached, decode 10.0 tok/s (stopped)"


OUTSIDE_TEXT = "[bold]not bold[/] [/] [gguf] \x1b[2J\x1b[31mred?\x9b"


def test_rich_output_prints_outside_text_literally() -> None:
    """Model output, metadata and messages: rich markup shows as typed, escape sequences as visible text."""
    buf = io.StringIO()
    out = RichOutput(Console(file=buf, width=200, force_terminal=True, color_system="truecolor"))
    out.table([("model", OUTSIDE_TEXT)])
    out.line(OUTSIDE_TEXT)
    out.notice(OUTSIDE_TEXT)
    out.error(OUTSIDE_TEXT)
    stream(out, "Reply with " + OUTSIDE_TEXT)
    raw = buf.getvalue()
    assert "\x1b[2J" not in raw and "\x1b[31m" not in raw and "\x9b" not in raw  # nothing the terminal runs
    visible = Text.from_ansi(raw).plain
    literal = "[bold]not bold[/] [/] [gguf] \\x1b[2J\\x1b[31mred?\\x9b"
    assert visible.count(literal) == 5, visible  # table, line, notice, error, and the Markdown reply


def test_printable_keeps_newlines_and_tabs() -> None:
    assert printable("a\tb\nc\r\nd\x07") == "a\tb\nc\nd\\x07"
