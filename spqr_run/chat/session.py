"""One chat with a loaded model: the conversation, sampling settings, context trimming and streaming replies.

No terminal code here: text goes to a `ReplySink` (see `render.py`), cancellation comes from a callable.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from spqr_run.chat.conversation import Conversation, ConversationError
from spqr_run.generation import GenerationStats
from spqr_run.runtime import Runtime
from spqr_run.sampling import SamplingParams
from spqr_run.structured import Constraint, GrammarEngine


class ReplySink(Protocol):
    """Where a streaming reply goes."""

    def notice(self, text: str) -> None: ...
    def reply_start(self) -> None: ...
    def reply_text(self, piece: str) -> None: ...
    def reply_end(self, finish_reason: str, stats: GenerationStats | None) -> None:
        """The reply is over: finish_reason "stop" | "length" | "cancelled", or "error" (stats None)."""


@dataclass
class Reply:
    text: str
    finish_reason: str  # "stop" | "length" | "cancelled"
    stats: GenerationStats | None
    dropped_messages: int


def reply_reserve(params: SamplingParams, max_context: int) -> int:
    """Tokens kept free for the reply when trimming the prompt: max_tokens, at most a quarter of the context."""
    return max(1, min(params.max_tokens, max_context // 4))


class ChatSession:
    """A conversation with one model; each `send` reuses the KV cache of the shared prompt prefix."""

    def __init__(self, runtime: Runtime, params: SamplingParams, system: str | None = None) -> None:
        self.runtime = runtime
        self.params = params
        self.conversation = Conversation(system=system or None)
        self.generator = runtime.generator()
        self.last_stats: GenerationStats | None = None
        self.last_finish: str | None = None
        self.total_completion_tokens = 0
        self.replies = 0
        self.format: tuple[Constraint, str] | None = None  # /format: replies follow this grammar
        self._grammars: GrammarEngine | None = None

    # ---- prompt -----------------------------------------------------------------------------------
    def prompt_ids(self, conversation: Conversation | None = None) -> list[int]:
        conv = conversation or self.conversation
        # message content is text: only the template's own markup becomes special tokens
        return self.runtime.chat_template.encode(conv.for_template(), self.runtime.tokenizer)

    def context_tokens(self) -> int:
        """Tokens the current conversation takes (with the generation prompt)."""
        return len(self.prompt_ids())

    @property
    def prompt_budget(self) -> int:
        return self.runtime.max_context - reply_reserve(self.params, self.runtime.max_context)

    def set_format(self, schema: tuple[dict, str] | None) -> str:
        """/format: constrain the replies to `schema` (a JSON schema and its name), or None for free text.
        Returns a one-line confirmation; GrammarError (one line) when the schema cannot be compiled."""
        if schema is None:
            self.format = None
            return "replies are free text"
        if self._grammars is None:
            self._grammars = GrammarEngine(self.runtime.tokenizer)
        self.format = (self._grammars.compile_json_schema(schema[0], what=schema[1]), schema[1])
        return f"replies follow the {schema[1]}"

    # ---- replies ----------------------------------------------------------------------------------
    def send(self, text: str, sink: ReplySink, should_stop: Callable[[], bool]) -> Reply:
        """Add a user message and stream the reply; on an error the message is taken back out."""
        self.conversation.add("user", text)
        try:
            return self._reply(sink, should_stop)
        except BaseException:
            if self.conversation.messages and self.conversation.messages[-1].role == "user":
                self.conversation.messages.pop()
            raise

    def retry(self, sink: ReplySink, should_stop: Callable[[], bool]) -> Reply:
        """Regenerate the last reply; ConversationError when there is none."""
        if self.conversation.pop_last_reply() is None:
            raise ConversationError("nothing to retry yet: send a message first")
        return self._reply(sink, should_stop)

    def _reply(self, sink: ReplySink, should_stop: Callable[[], bool]) -> Reply:
        dropped = self.conversation.trim_to_fit(lambda c: len(self.prompt_ids(c)), self.prompt_budget)
        if dropped:
            turns = "message" if dropped == 1 else "messages"
            sink.notice(
                f"[context full: dropped the {dropped} oldest {turns} to fit {self.runtime.max_context} tokens; "
                "the system prompt is kept]"
            )
        ids = self.prompt_ids()
        pieces: list[str] = []
        finish, stats = "cancelled", None
        sink.reply_start()
        try:
            fmt = {"constraint": self.format[0].copy()} if self.format is not None else {}
            for chunk in self.generator.stream(ids, self.params, should_stop=should_stop, **fmt):
                if chunk.text:
                    pieces.append(chunk.text)
                    sink.reply_text(chunk.text)
                if chunk.finish_reason is not None:
                    finish, stats = chunk.finish_reason, chunk.stats
        except KeyboardInterrupt:
            finish = "cancelled"  # a second Ctrl-C: stop at once, keep what we have
        except BaseException:
            sink.reply_end("error", None)  # close the live display; the caller reports the error
            raise
        text = "".join(pieces)
        self.conversation.add("assistant", text)
        self.last_stats, self.last_finish = stats, finish
        self.replies += 1
        self.total_completion_tokens += stats.completion_tokens if stats else 0
        sink.reply_end(finish, stats)
        return Reply(text, finish, stats, dropped)
