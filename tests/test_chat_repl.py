"""The real `spqr-chat` REPL in a pseudo-terminal on the real SmolLM2-135M GGUF model (greedy, short replies),
and the rich view alone on a pseudo-terminal whose reader lags behind.

Every wait is a bounded timeout on a visible marker (the stats line, a command's output, EOF).
"""

from __future__ import annotations

import json
import os
import re
import select
import sys
from pathlib import Path

import pytest

pexpect = pytest.importorskip("pexpect")

REPO = Path(__file__).resolve().parents[1]
DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
MODEL = DATA / "SmolLM2-135M-Instruct.Q4_1.gguf"

# the tests that run spqr-chat on the real model
real_model = pytest.mark.skipif(
    not MODEL.exists(), reason=f"real model not found: {MODEL} (../shared/data is absent)"
)

# the prompt part: a prefill rate, or how much of the prompt the KV cache already held (later turns)
STATS = (
    r"(\d+) tokens, ttft [\d.]+ s, (?:prefill [\d.]+ tok/s|prompt \d+ of \d+ tokens cached), "
    r"decode [\d.]+ tok/s( \(([a-z ]+)\))?"
)
PROMPT = ">>>"
# prompt_toolkit turns bracketed paste off when the prompt returns: what follows is the program's output
INPUT_DONE = r"\x1b\[\?2004l"
# a word of the reply: letters not preceded by the tail of an escape sequence such as "\x1b[0m"
WORD = r"(?<![0-9;?\[])[A-Za-z]{3,}"
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b\][^\x07]*\x07|\x1b[()][A-Z0-9]|\x1b[=>]")
TIMEOUT = 120  # seconds for one model load or one short reply on a busy 2-core machine


def plain(text: str) -> str:
    return ANSI.sub("", text)


def spawn(home: Path, *args: str, dimensions: tuple[int, int] = (40, 160)):
    env = {
        **os.environ,
        "HOME": str(home),
        "XDG_DATA_HOME": str(home / "data"),
        "XDG_CONFIG_HOME": str(home / "config"),
        "XDG_CACHE_HOME": str(home / "cache"),
        "TERM": "xterm-256color",
        "PROMPT_TOOLKIT_NO_CPR": "1",  # nothing answers cursor-position requests in a test pty
        "PYTHONPATH": str(REPO),
    }
    env.pop("SPQR_RUN_CHAT_HISTORY", None)
    argv = ["-m", "spqr_run.cli.chat", str(MODEL), "--device", "cpu", *args]
    child = pexpect.spawn(
        sys.executable, argv, cwd=str(REPO), env=env, encoding="utf-8", timeout=TIMEOUT, dimensions=dimensions
    )
    child.expect("max context")
    child.expect(PROMPT)
    return child


def command(child, line: str, expected: str) -> str:
    """Run a slash command; returns the output up to `expected` (a regex)."""
    child.send(line + "\r")
    child.expect(expected)
    out = plain(child.before + child.after)
    child.expect(PROMPT)
    return out


def ask(child, text: str) -> tuple[str, re.Match]:
    """Send a message and wait for its stats line; returns the reply text (with the echo) and the stats match."""
    child.send(text + "\r")
    child.expect(STATS)
    reply, match = plain(child.before), child.match
    child.expect(PROMPT)
    return reply, match


def finish(child, status: int = 0) -> None:
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == status, child.before


@pytest.mark.slow
@real_model
def test_chat_save_ctrl_c_and_load_in_a_new_session(tmp_path: Path) -> None:
    saved = tmp_path / "chat.json"
    child = spawn(tmp_path, "--plain", "--max-tokens", "24")
    assert "temperature = 0.0" in command(child, "/set temperature 0", "temperature = 0.0")
    assert "unknown command /frobnicate" in command(child, "/frobnicate", "type /help for the list")
    assert "invalid top_p" in command(child, "/set top_p 7", r"must be in \(0, 1\]")
    assert "memory plan" in command(child, "/show", "system prompt:")

    # two turns: the second answer depends on the first
    ask(child, "I have a cat named Whiskers.")
    reply, stats = ask(child, "What is my cat's name?")
    assert "Whiskers" in reply  # the question itself does not contain it
    # the first turn came from the KV cache: no prefill rate over tokens that were not computed
    assert "tokens cached" in stats.group(0) and "prefill" not in stats.group(0)
    assert f"saved 4 messages to {saved}" in command(child, f"/save {saved}", "saved .* messages to .*json")

    # Ctrl-C in the middle of a long reply stops it, keeps it, and the next question works
    command(child, "/set max_tokens 400", "max_tokens = 400")
    child.send("Write a long story about a dragon who learns to fly.\r")
    child.expect(INPUT_DONE)
    child.expect(WORD)  # the reply has started
    child.sendintr()
    child.expect(STATS)
    assert child.match.group(3) == "stopped" and 0 < int(child.match.group(1)) < 400
    child.expect(PROMPT)
    command(child, "/set max_tokens 12", "max_tokens = 12")
    ask(child, "Thank you!")
    assert "context" in command(child, "/stats", r"context: .* tokens \(8 messages\)")

    # Ctrl-C at the empty prompt only hints; /exit quits with status 0
    child.sendintr()
    child.expect("type /exit or press Ctrl-D")
    child.send("/exit\r")
    finish(child)

    data = json.loads(saved.read_text())
    assert data["version"] == 1 and [m["role"] for m in data["messages"]] == ["user", "assistant"] * 2
    history = (tmp_path / "data" / "spqr-run" / "chat_history").read_text()
    assert "What is my cat's name?" in history and "/exit" in history

    # a new session (rich output this time) continues the saved conversation; Ctrl-D quits with status 0
    child = spawn(tmp_path, "--temperature", "0", "--max-tokens", "24")
    assert "loaded 4 messages" in command(child, f"/load {saved}", "loaded .* messages")
    reply, _ = ask(child, "What is my cat's name?")
    assert "Whiskers" in reply  # the question itself does not contain it
    child.sendeof()
    finish(child)


@pytest.mark.slow
@real_model
def test_conversation_longer_than_the_context(tmp_path: Path) -> None:
    child = spawn(tmp_path, "--plain", "--ctx", "256", "--max-tokens", "8", "--temperature", "0")
    # ~90-token messages typed over several lines with Esc+Enter: the third one overflows 256 - 8 tokens
    note = "\x1b\r".join(["The quick brown fox jumps over the lazy dog near the river bank."] * 6)
    ask(child, "Note one: " + note)
    ask(child, "Note two: " + note)
    child.send("Note three: " + note + "\r")
    child.expect(r"context full: dropped the 2 oldest messages")
    child.expect(STATS)
    child.expect(PROMPT)
    # a single pasted message larger than the whole context: a clear one-line error, no crash
    huge = "\n".join(["Every line of this pasted block is long enough to add up to many tokens."] * 30)
    child.send("\x1b[200~" + huge + "\x1b[201~\r")
    child.expect(r"error: your message needs (\d+) tokens with the chat template, but only (\d+) fit")
    assert int(child.match.group(1)) > 256
    child.expect(PROMPT)
    # the REPL keeps working
    ask(child, "Hello!")
    child.send("/exit\r")
    finish(child)


class _Screen:
    """A VT100 screen (pyte) fed with everything the child writes: what the user actually sees."""

    def __init__(self, rows: int, cols: int) -> None:
        pyte = pytest.importorskip("pyte")
        self.screen = pyte.Screen(cols, rows)
        self.stream = pyte.Stream(self.screen)

    def write(self, data: str) -> None:
        self.stream.feed(data)

    def flush(self) -> None:
        pass

    def rows(self) -> list[str]:
        return [row.rstrip() for row in self.screen.display]


@pytest.mark.slow
@real_model
def test_ctrl_c_mid_reply_draws_each_line_once(tmp_path: Path) -> None:
    """Ctrl-C while a wrapped reply streams in the rich view: the reply's first line is on the screen once.

    The terminal echoes Ctrl-C as "^C" behind the renderer's back; after a full-width line it wraps and the
    live area's redraw started one line too low, leaving its first line twice on the screen."""
    rows, cols = 60, 50  # narrow: the reply wraps after a few words
    question = "Tell me a long story about a dragon."  # one screen row with the prompt
    child = spawn(tmp_path, "--temperature", "0", "--max-tokens", "300", dimensions=(rows, cols))
    screen = _Screen(rows, cols)
    screen.write(child.before + child.after)  # the banner and the first prompt
    child.logfile_read = screen

    def reply_rows() -> list[str]:
        shown = screen.rows()
        asked = max(i for i, row in enumerate(shown) if row.startswith(">>> " + question[:20]))
        return shown[asked + 1 :]

    child.send(question + "\r")
    child.expect(INPUT_DONE)
    # wait (bounded by the pexpect timeout) until the reply fills two screen rows: it has wrapped
    while sum(1 for row in reply_rows() if row.strip()) < 2:
        child.expect(WORD)
    child.sendintr()
    child.expect(STATS)
    assert child.match.group(3) == "stopped"
    child.expect(PROMPT)
    shown = reply_rows()
    end = next(i for i, row in enumerate(shown) if re.match(r"\d+ tokens, ttft", row))  # the stats line
    reply = [row for row in shown[:end] if row.strip()]
    assert len(reply) >= 2, shown
    assert screen.rows().count(reply[0]) == 1, "\n".join(shown[: end + 2])
    assert len(set(reply)) == len(reply), "\n".join(shown[: end + 2])  # no line drawn twice
    child.sendeof()
    finish(child)


class _SlaveWriter:
    """The program's end of a pseudo-terminal (`slave`), keeping a copy of everything written.

    Writes never block: with nobody reading the other end, a full buffer fails the test instead of hanging it."""

    def __init__(self, slave: int) -> None:
        self.fd = os.open(os.ttyname(slave), os.O_WRONLY | os.O_NOCTTY | os.O_NONBLOCK)
        self.written: list[str] = []

    def write(self, text: str) -> int:
        self.written.append(text)
        data = text.encode()
        while data:
            try:
                data = data[os.write(self.fd, data) :]
            except BlockingIOError:
                raise AssertionError(f"the terminal's buffer is full after {self.size()} bytes") from None
        return len(text)

    def flush(self) -> None:
        pass

    def size(self) -> int:
        return sum(len(text.encode()) for text in self.written)


def _read_until(fd: int, marker: str, timeout_s: float = 10.0) -> str:
    """What the terminal end `fd` reads up to and including the first line holding `marker`."""
    data = b""
    while marker.encode() not in data or not data.endswith(b"\n"):
        ready, _, _ = select.select([fd], [], [], timeout_s)
        assert ready, f"no {marker!r} after {timeout_s} s; read so far: {data[-300:]!r}"
        data += os.read(fd, 65536)
    return data.decode()


def test_ctrl_c_while_the_terminal_lags_loses_no_output(monkeypatch) -> None:
    """Ctrl-C while the terminal has not yet read the last kilobytes of a streamed reply: none of it is lost.

    The terminal driver used to discard the output its reader had not taken yet when Ctrl-C arrived (termios
    NOFLSH off): a slow terminal then missed part of the live area's redraws, its cursor-up count no longer
    matched the screen, and the reply was drawn shifted (lines twice, or over the question). The terminal
    here reads nothing until the reply has ended, so the loss does not depend on timing."""
    pytest.importorskip("termios")
    from rich.console import Console

    from spqr_run.chat.render import RichOutput
    from spqr_run.chat.repl import StopFlag

    monkeypatch.setenv("TERM", "xterm-256color")  # rich draws no live area on a dumb terminal
    rows, cols = 60, 50
    words = (
        "Once upon a time a small green dragon lived on a hill above the sea and wanted to fly " * 12
    ).split()
    master, slave = os.openpty()
    term = None
    try:
        stdin = os.fdopen(os.dup(slave), "r")
        monkeypatch.setattr("sys.stdin", stdin)  # the terminal whose modes the REPL sets during a reply
        term = _SlaveWriter(slave)
        console = Console(
            file=term, width=cols, height=rows, force_terminal=True, force_interactive=True, highlight=False
        )
        out = RichOutput(console, show_stats=False)
        out.MIN_INTERVAL_S = 0.0  # a redraw for every word: the output does not depend on the clock
        console.print(">>> Tell me a story about a dragon.")
        sent = []
        with StopFlag().installed():
            out.reply_start()
            # more than the 4 KiB the driver holds for a reader that lags, less than it buffers in all (~19 KiB)
            while term.size() < 8000:
                sent.append(words[len(sent)])
                out.reply_text(sent[-1] + " ")
            os.write(master, b"\x03x\n")  # Ctrl-C, then a line: read back once the Ctrl-C has been handled
            assert os.read(slave, 16) == b"x\n"
            for _ in range(3):
                sent.append(words[len(sent)])
                out.reply_text(sent[-1] + " ")
            out.reply_end("cancelled", None)
        stdin.close()
        received = _read_until(master, "(stopped)")
    finally:
        os.close(master)
        os.close(slave)
        if term is not None:
            os.close(term.fd)

    assert received == "".join(term.written).replace("\n", "\r\n")  # every byte arrived (ONLCR: \n -> \r\n)
    screen = _Screen(rows, cols)
    screen.write(received)
    shown = screen.rows()
    end = shown.index("(stopped)")
    assert shown[0] == ">>> Tell me a story about a dragon."
    assert " ".join(shown[1:end]).split() == sent, "\n".join(shown[: end + 1])  # each word once, in order
