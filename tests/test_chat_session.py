"""ChatSession and the REPL loop on a fake model (fast): trimming notices, cancel, errors, commands, SIGINT flag."""

from __future__ import annotations

import io
import os
import signal
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from spqr_run.chat.conversation import Conversation
from spqr_run.chat.render import PlainOutput
from spqr_run.chat.repl import Repl, StopFlag
from spqr_run.chat.session import ChatSession
from spqr_run.generation import GenerationChunk, GenerationStats
from spqr_run.sampling import SamplingParams


class FakeTemplate:
    def render(self, messages: list[dict[str, str]], *, add_generation_prompt: bool = True) -> str:
        return " ".join(f"<{m['role']}> {m['content']}" for m in messages) + (
            " <assistant>" if add_generation_prompt else ""
        )

    def encode(self, messages: list[dict[str, str]], tokenizer: FakeTokenizer) -> list[int]:
        return tokenizer.encode(self.render(messages))


class FakeTokenizer:
    def encode(self, text: str) -> list[int]:
        return [len(w) for w in text.split()]  # one token a word


@dataclass
class FakeGenerator:
    """Streams the words "w0 w1 ..." (max_tokens of them), polling should_stop after each."""

    prompts: list[list[int]] = field(default_factory=list)
    stop_after: int | None = None  # simulate Ctrl-C: should_stop is made true after this many tokens

    def stream(
        self, prompt_ids: Sequence[int], params: SamplingParams, *, should_stop: Callable[[], bool]
    ) -> Iterator[GenerationChunk]:
        self.prompts.append(list(prompt_ids))
        stats = GenerationStats(prompt_tokens=len(prompt_ids))
        for i in range(params.max_tokens):
            stats.completion_tokens += 1
            last = i == params.max_tokens - 1
            if self.stop_after is not None and i + 1 >= self.stop_after:
                yield GenerationChunk(f"w{i} ", [i], finish_reason="cancelled", stats=stats)
                return
            yield GenerationChunk(
                f"w{i} ", [i], finish_reason="length" if last else None, stats=stats if last else None
            )


@dataclass
class FakeRuntime:
    max_context: int
    gen: FakeGenerator = field(default_factory=FakeGenerator)
    chat_template: FakeTemplate = field(default_factory=FakeTemplate)
    tokenizer: FakeTokenizer = field(default_factory=FakeTokenizer)

    def generator(self) -> FakeGenerator:
        return self.gen


def make_session(max_context: int = 64, max_tokens: int = 4) -> tuple[ChatSession, FakeRuntime, io.StringIO]:
    runtime = FakeRuntime(max_context)
    session = ChatSession(runtime, SamplingParams(max_tokens=max_tokens), system="be brief")  # type: ignore[arg-type]
    return session, runtime, io.StringIO()


def test_reply_is_streamed_and_kept() -> None:
    session, runtime, buf = make_session()
    reply = session.send("hello there", PlainOutput(buf), lambda: False)
    assert reply.text == "w0 w1 w2 w3 " and reply.finish_reason == "length"
    assert [m.role for m in session.conversation.messages] == ["user", "assistant"]
    out = buf.getvalue()
    assert out.startswith("w0 w1 w2 w3 \n") and "4 tokens, ttft" in out and "(stopped at max_tokens)" in out


def test_cancelled_reply_is_kept_in_history() -> None:
    session, runtime, buf = make_session(max_tokens=50)
    runtime.gen.stop_after = 3
    reply = session.send("tell me a story", PlainOutput(buf), lambda: False)
    assert reply.finish_reason == "cancelled" and reply.text == "w0 w1 w2 "
    assert session.conversation.messages[-1].content == "w0 w1 w2 "
    assert "(stopped)" in buf.getvalue()


def test_old_turns_dropped_with_a_notice() -> None:
    session, runtime, buf = make_session(max_context=40, max_tokens=4)
    for i in range(6):
        session.send(f"question {i} with some extra words", PlainOutput(buf), lambda: False)
    assert "context full: dropped the 2 oldest messages" in buf.getvalue()
    assert session.conversation.system == "be brief"
    assert all(len(p) <= 40 - 4 for p in runtime.gen.prompts)


def test_too_large_message_is_an_error_and_history_survives(tmp_path: Path) -> None:
    session, runtime, buf = make_session(max_context=40)
    repl = Repl(session, iter_reader(["hi", "word " * 100, "/stats", "/exit"]), PlainOutput(buf))
    assert repl.run() == 0
    out = buf.getvalue()
    assert "error: your message needs" in out and "Traceback" not in out
    assert [m.content for m in session.conversation.messages] == ["hi", "w0 w1 w2 w3 "]


def test_a_bug_in_one_turn_never_ends_the_chat() -> None:
    """Issue 23: whatever fails while a message is answered (here the model step) is one error line; the
    message is taken back, the conversation kept and the chat goes on."""
    session, runtime, buf = make_session()
    real = runtime.gen.stream
    calls: list[int] = []

    def flaky(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise TypeError("TextInputSequence must be str")
        return real(*args, **kwargs)

    runtime.gen.stream = flaky  # type: ignore[method-assign]
    repl = Repl(session, iter_reader(["first", "second", "third", "/exit"]), PlainOutput(buf))
    assert repl.run() == 0
    out = buf.getvalue()
    assert (
        "error: internal error (TypeError: TextInputSequence must be str)" in out and "Traceback" not in out
    )
    assert [m.content for m in session.conversation.messages] == [
        "first",
        "w0 w1 w2 w3 ",
        "third",
        "w0 w1 w2 w3 ",
    ]


def test_repl_commands(tmp_path: Path) -> None:
    session, runtime, buf = make_session()
    saved = tmp_path / "c.json"
    lines = [
        "/set temperature 0",
        "/set top_k x",
        "/nope",
        "/system Be terse.",
        "/system",
        "hello",
        "/retry",
        f"/save {saved}",
        "/clear",
        f"/load {saved}",
        "/help",
        "/load /missing.json",
    ]
    repl = Repl(session, iter_reader(lines), PlainOutput(buf))
    assert repl.run() == 0  # end of input (Ctrl-D) exits with 0
    out = buf.getvalue()
    for expected in [
        "temperature = 0.0",
        "error: top_k must be an integer",
        "error: unknown command /nope",
        "system prompt: 'Be terse.'",
        "saved 2 messages",
        "[new conversation]",
        "loaded 2 messages and a system prompt",
        "/retry",
        "error: cannot read",
    ]:
        assert expected in out, expected
    assert session.params.temperature == 0
    assert len(runtime.gen.prompts) == 2 and runtime.gen.prompts[0] == runtime.gen.prompts[1]  # /retry
    assert Conversation.load(saved).system == "Be terse."


def test_stop_flag_handles_sigint_only_while_installed() -> None:
    flag = StopFlag()
    before = signal.getsignal(signal.SIGINT)
    with flag.installed():
        os.kill(os.getpid(), signal.SIGINT)
        assert flag()
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)  # a second Ctrl-C stops at once
    assert signal.getsignal(signal.SIGINT) is before


def iter_reader(lines: list[str]):
    class Reader:
        def __init__(self) -> None:
            self.it = iter(lines)

        def read(self) -> str:
            try:
                return next(self.it)
            except StopIteration:
                raise EOFError from None

    return Reader()


def test_terminal_echo_is_off_while_a_reply_streams() -> None:
    """Ctrl-C's "^C" echo would be drawn under the live reply: echo is off inside `installed()`, restored after."""
    termios = pytest.importorskip("termios")
    from spqr_run.chat.repl import terminal_echo_off

    leader, follower = os.openpty()
    try:
        before = termios.tcgetattr(follower)
        assert before[3] & termios.ECHO
        with terminal_echo_off(follower):
            during = termios.tcgetattr(follower)
            assert not during[3] & termios.ECHO and during[3] & termios.ISIG  # Ctrl-C still signals
        assert termios.tcgetattr(follower) == before
        read_end, write_end = os.pipe()
        with terminal_echo_off(read_end):  # not a terminal: nothing to do, no error
            pass
        os.close(read_end)
        os.close(write_end)
    finally:
        os.close(leader)
        os.close(follower)


def test_stop_flag_turns_echo_off_on_a_terminal_stdin(monkeypatch) -> None:
    termios = pytest.importorskip("termios")
    leader, follower = os.openpty()
    try:
        stdin = os.fdopen(os.dup(follower), "r")
        monkeypatch.setattr("sys.stdin", stdin)
        with StopFlag().installed():
            assert not termios.tcgetattr(follower)[3] & termios.ECHO
        assert termios.tcgetattr(follower)[3] & termios.ECHO
        stdin.close()
    finally:
        os.close(leader)
        os.close(follower)


def test_a_reply_that_fills_the_context_is_counted_and_labelled_as_such(tmp_path: Path) -> None:
    """Issue 23: /stats said "166 of 160 tokens" after a reply that filled the context, and the reply was
    labelled "stopped at the token limit". A context-full stop is labelled so (max_tokens is another label),
    and /stats never counts more tokens than the context holds without saying what that means."""
    import re

    pytest.importorskip("transformers")
    from spqr_run.runtime import load_runtime
    from tests.test_quantize_model import CORPUS
    from tests.tiny_configs import write_tiny_hf_llama

    (tmp_path / "m").mkdir()
    runtime = load_runtime(write_tiny_hf_llama(tmp_path / "m", CORPUS), device="cpu", ctx=64)
    params = SamplingParams(max_tokens=500, temperature=0, ignore_eos=True)  # more than the context holds
    session = ChatSession(runtime, params)
    buf = io.StringIO()
    repl = Repl(session, iter_reader(["the river flows", "/stats", "/set max_tokens 3", "and the mill", "/stats"]),
                PlainOutput(buf))  # fmt: skip
    assert repl.run() == 0
    out = buf.getvalue()
    first, second = out.split("last reply:")[1:3]
    assert "(stopped: the context is full, 64 tokens)" in out.split("last reply:")[0]
    assert "(stopped: the context is full, 64 tokens)" in first
    context = re.search(r"context:\s+(.*)", first).group(1)
    assert context.startswith("full: the last reply used all 64 tokens"), context
    for used, total in re.findall(r"(\d+) of (\d+) tokens", out):
        assert int(used) <= int(total), out
    assert "(stopped at max_tokens, 3 tokens)" in second
