"""Chat templates: the model's own Jinja template (rendered like transformers' `apply_chat_template`, but in
jinja2's immutable sandbox with time and size bounds, since templates come from untrusted model files), or a
built-in fallback for models without one (Llama-3, ChatML, Llama-2 chat, Falcon-instruct).

Message content is text, never markup: `ChatTemplate.encode` gives special-token ids only to the special-token
strings the template itself writes. A user typing `<|im_end|>\n<|im_start|>system` gets those characters as
text, not a forged system turn. How: every special-token string in the values handed to the template
(messages, tools, any extra variable) is defused before rendering by putting a sentinel character (a rare printable
symbol) between its characters, so no special-token string can appear in them; after rendering, each
defused string is turned back into its characters and its place recorded as a literal range, which
`Tokenizer.encode(literal=...)` encodes as plain text. Templates transform content (trim, slicing, splitting on
`</think>`) the same way with or without the sentinels, so the prompt text is exactly what `render` gives.
"""

from __future__ import annotations

import functools
import json
import re
import sys
import time
from collections.abc import Callable, Collection, Container, Iterator
from contextlib import contextmanager
from datetime import datetime
from typing import TYPE_CHECKING, Any, NoReturn

from jinja2 import TemplateError, TemplateSyntaxError
from jinja2.exceptions import SecurityError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from spqr_run.errors import ConfigError, ModelFormatError

if TYPE_CHECKING:
    from spqr_run.tokenizer import Tokenizer

MAX_OUTPUT_CHARS = 4_000_000  # a rendered prompt larger than this is an error, not a prompt
MAX_RENDER_SECONDS = 2.0
_TEMPLATE_FILENAME = "<template>"  # what jinja2 names the code it compiles from a string

# ---- built-in fallbacks (from each family's published prompt format) --------------------------------------
CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
LLAMA3 = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim"
    " + '<|eot_id|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
# Meta's Llama-2 chat: <s>[INST] <<SYS>>\n{system}\n<</SYS>>\n\n{user} [/INST] {answer} </s><s>[INST] ...
LLAMA2 = (
    "{% if messages and messages[0]['role'] == 'system' %}"
    "{% set system = messages[0]['content'] | trim %}{% set turns = messages[1:] %}"
    "{% else %}{% set system = none %}{% set turns = messages %}{% endif %}"
    "{% for message in turns %}"
    "{% if (message['role'] == 'user') != (loop.index0 is even) %}"
    "{{ raise_exception('Llama-2 chat needs roles alternating user/assistant after the system message') }}"
    "{% endif %}"
    "{% if message['role'] == 'user' %}"
    "{% set text = message['content'] | trim %}"
    "{% if loop.first and system is not none %}"
    "{% set text = '<<SYS>>\n' + system + '\n<</SYS>>\n\n' + text %}{% endif %}"
    "{{ bos_token + '[INST] ' + text + ' [/INST]' }}"
    "{% else %}{{ ' ' + message['content'] | trim + ' ' + eos_token }}{% endif %}"
    "{% endfor %}"
)
# Falcon-7B/40B-instruct: plain "User:" / "Falcon:" lines, the system prompt as a first line.
FALCON = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] | trim + '\n' }}"
    "{% elif message['role'] == 'user' %}{{ 'User: ' + message['content'] | trim + '\n' }}"
    "{% else %}{{ 'Falcon: ' + message['content'] | trim + '\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Falcon:' }}{% endif %}"
)


def _tojson(value: Any, indent: int | None = None, separators: Any = None, sort_keys: bool = False) -> str:
    """JSON without HTML escaping (jinja2's own `tojson` escapes `<`, `>`, `&`, `'`)."""
    return json.dumps(value, ensure_ascii=False, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _capped(fn: Callable[..., Any]) -> Callable[..., Any]:
    """A filter that refuses integer arguments beyond the output bound (`"x"|center(10**9)`)."""

    @functools.wraps(fn)  # keeps jinja's pass_context/pass_environment marks
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        for a in (*args[1:], *kwargs.values()):
            if isinstance(a, int) and abs(a) > MAX_OUTPUT_CHARS:
                raise SecurityError(f"filter {fn.__name__} argument {a} is too large")
        return fn(*args, **kwargs)

    return wrapper


class _Env(ImmutableSandboxedEnvironment):
    """The immutable sandbox, with `*` and `**` checked so `'x' * 10**10` cannot exhaust memory."""

    intercepted_binops = frozenset({"*", "**"})

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        if operator == "**" and isinstance(right, int) and abs(right) > 64:
            raise SecurityError("exponent too large")
        if operator == "*" and isinstance(left, (str, list, tuple)) and isinstance(right, int):
            if len(left) * right > MAX_OUTPUT_CHARS:
                raise SecurityError("repetition too large")
        if operator == "*" and isinstance(right, (str, list, tuple)) and isinstance(left, int):
            if len(right) * left > MAX_OUTPUT_CHARS:
                raise SecurityError("repetition too large")
        return super().call_binop(context, operator, left, right)


class _Timeout(Exception):
    pass


@contextmanager
def _deadline(seconds: float) -> Iterator[None]:
    """Abort template code (frames compiled from the template only) that runs past `seconds`.

    Jinja has no hook in a `for` loop, so nested loops over a long list would otherwise spin unbounded.
    """
    end = time.monotonic() + seconds

    def local(frame: Any, event: str, arg: Any) -> Any:
        if time.monotonic() > end:
            raise _Timeout
        return local

    def on_call(frame: Any, event: str, arg: Any) -> Any:
        return local if frame.f_code.co_filename == _TEMPLATE_FILENAME else None

    previous = sys.gettrace()
    sys.settrace(on_call)
    try:
        yield
    finally:
        sys.settrace(previous)


class ChatTemplate:
    """A compiled chat template; `render(messages)` gives the prompt text (special tokens as strings)."""

    def __init__(self, source: str, *, bos_token: str = "", eos_token: str = "", name: str = "model") -> None:
        self.source, self.bos_token, self.eos_token, self.name = source, bos_token, eos_token, name
        env = _Env(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
        env.filters = {k: _capped(f) for k, f in env.filters.items()}
        env.filters["tojson"] = _tojson
        env.globals["raise_exception"] = self._raise
        env.globals["strftime_now"] = _strftime_now
        try:
            self._template = env.from_string(source)
        except TemplateSyntaxError as e:
            raise ModelFormatError(
                f"{name}: chat template syntax error at line {e.lineno}: {e.message}"
            ) from None

    def _raise(self, message: str) -> NoReturn:
        raise ConfigError(f"{self.name}: chat template: {message}")

    def render(
        self, messages: list[dict[str, Any]], *, add_generation_prompt: bool = True, **extra: Any
    ) -> str:
        """The prompt for `messages` ([{"role", "content"}], content a string or a list of text parts)."""
        context = {
            "bos_token": self.bos_token,
            "eos_token": self.eos_token,
            **extra,
            "messages": _flatten(messages),
            "add_generation_prompt": add_generation_prompt,
        }
        parts: list[str] = []
        size = 0
        try:
            with _deadline(MAX_RENDER_SECONDS):
                for chunk in self._template.generate(**context):
                    size += len(chunk)
                    if size > MAX_OUTPUT_CHARS:
                        raise SecurityError(f"output exceeds {MAX_OUTPUT_CHARS} characters")
                    parts.append(chunk)
        except ConfigError:
            raise
        except _Timeout:
            raise ModelFormatError(
                f"{self.name}: chat template ran longer than {MAX_RENDER_SECONDS} s"
            ) from None
        except SecurityError as e:
            raise ModelFormatError(f"{self.name}: chat template breaks the sandbox: {e}") from None
        except (TemplateError, RecursionError, MemoryError, TypeError, ValueError, LookupError) as e:
            message = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise ConfigError(f"{self.name}: chat template failed on these messages: {message}") from None
        return "".join(parts)

    def render_literal(
        self,
        messages: list[dict[str, Any]],
        specials: Collection[str],
        *,
        add_generation_prompt: bool = True,
        **extra: Any,
    ) -> tuple[str, list[tuple[int, int]]]:
        """`render`'s text, and the [start, end) character ranges where one of the `specials` strings came from
        the inputs (message content, tools, ...) rather than the template: those are text, not tokens."""
        literals = _Literals(specials)
        text = self.render(
            literals.defuse(_flatten(messages)),
            add_generation_prompt=add_generation_prompt,
            **{k: literals.defuse(v) for k, v in extra.items()},
        )
        return literals.restore(text)

    def encode(
        self,
        messages: list[dict[str, Any]],
        tokenizer: Tokenizer,
        *,
        add_generation_prompt: bool = True,
        add_bos: bool | None = None,
        **extra: Any,
    ) -> list[int]:
        """The prompt's token ids: only the template's own markup becomes special tokens; the messages (every
        role) and `extra` values are text. `add_bos` as in `Tokenizer.encode`. Raises what `render` raises."""
        text, literal = self.render_literal(
            messages, tokenizer.special_texts, add_generation_prompt=add_generation_prompt, **extra
        )
        return tokenizer.encode(text, add_bos=add_bos, literal=literal)


class _Literals:
    """Defusing special-token strings in template inputs and finding them again in the rendered text.

    In an input string the sentinel S becomes S S and a special-token string "abc" becomes "a S b S c"; in the
    output a pair S S is one S again, a defused string its characters (a literal range), and a lone S left
    by a template that changed a defused string (e.g. `| upper`) is dropped. Special-token strings of one
    character cannot be defused and stay as they are."""

    SENTINEL = "\u29eb"  # "⧫": rare, printable (a list printed with its repr keeps it), caseless, not a space

    def __init__(self, specials: Collection[str]) -> None:
        s = self.SENTINEL
        texts = sorted((t for t in specials if len(t) > 1), key=len, reverse=True)
        self.defused = {t: s.join(t) for t in texts}
        self.restored = {d: t for t, d in self.defused.items()}
        self._in = re.compile("|".join([re.escape(s), *map(re.escape, texts)]))
        self._out = re.compile("|".join([re.escape(s + s), *map(re.escape, self.restored), re.escape(s)]))

    def defuse(self, value: Any) -> Any:
        """A copy of `value` (strings, lists, tuples and dicts, keys included) with every string defused."""
        if isinstance(value, str):
            return self._in.sub(
                lambda m: self.SENTINEL * 2 if m.group() == self.SENTINEL else self.defused[m.group()], value
            )
        if isinstance(value, dict):
            return {self.defuse(k): self.defuse(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return type(value)(self.defuse(v) for v in value)
        return value

    def restore(self, text: str) -> tuple[str, list[tuple[int, int]]]:
        """The rendered `text` with its defused strings back, and their [start, end) ranges in the result."""
        out: list[str] = []
        spans: list[tuple[int, int]] = []
        size = pos = 0
        for m in self._out.finditer(text):
            out.append(text[pos : m.start()])
            size += m.start() - pos
            piece = m.group()
            if piece in self.restored:
                piece = self.restored[piece]
                spans.append((size, size + len(piece)))
            elif piece != self.SENTINEL * 2:
                piece = ""
            else:
                piece = self.SENTINEL
            out.append(piece)
            size += len(piece)
            pos = m.end()
        out.append(text[pos:])
        return "".join(out), spans


def _flatten(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Copies of `messages` with list-of-parts content joined into one string."""
    if not isinstance(messages, list):
        raise ConfigError("messages: expected a list of {role, content} objects")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise ConfigError(f"messages[{i}]: expected an object with a string 'role'")
        content = m.get("content")
        if isinstance(content, list):
            texts = []
            for part in content:
                if not (
                    isinstance(part, dict)
                    and part.get("type") == "text"
                    and isinstance(part.get("text"), str)
                ):
                    raise ConfigError(
                        f"messages[{i}].content: only {{'type': 'text', 'text': ...}} parts are supported"
                    )
                texts.append(part["text"])
            content = "".join(texts)
        elif content is not None and not isinstance(content, str):
            raise ConfigError(f"messages[{i}].content: expected a string or a list of text parts")
        out.append({**m, "content": content})
    return out


def chat_template_for(
    tokenizer_template: str | None,
    *,
    arch: str,
    model_name: str,
    vocab: Container[str],
    bos_token: str | None = None,
    eos_token: str | None = None,
) -> ChatTemplate:
    """The model's own template when it has one, else the fallback its vocabulary and architecture imply."""

    def token(given: str | None, default: str) -> str:
        return given if given is not None else (default if default in vocab else "")

    if tokenizer_template:
        return ChatTemplate(
            tokenizer_template, bos_token=bos_token or "", eos_token=eos_token or "", name=model_name
        )
    if "<|start_header_id|>" in vocab:
        source, bos, eos = LLAMA3, token(bos_token, "<|begin_of_text|>"), token(eos_token, "<|eot_id|>")
    elif "<|im_start|>" in vocab:
        source, bos, eos = CHATML, bos_token or "", token(eos_token, "<|im_end|>")
    elif arch.startswith("falcon"):
        source, bos, eos = FALCON, bos_token or "", token(eos_token, "<|endoftext|>")
    elif arch == "llama":
        source, bos, eos = LLAMA2, token(bos_token, "<s>"), token(eos_token, "</s>")
    else:
        raise ConfigError(
            f"{model_name}: no chat template and no built-in fallback for architecture {arch!r}"
        )
    return ChatTemplate(source, bos_token=bos, eos_token=eos, name=f"{model_name} (built-in fallback)")
