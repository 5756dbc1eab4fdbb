"""Structured outputs: a grammar (a JSON schema, any JSON object, or a Lark grammar) turned into a token mask
applied to the logits before sampling, so the text a sequence generates always matches it.

The grammar engine is llguidance (PyPI `llguidance`, Microsoft's guidance-ai; Rust, no Python dependencies).
It was picked over xgrammar by measurement on SmolLM2's 49,152-token vocabulary (`benchmarks/structured_mask.py`):
xgrammar computes a mask faster (~0.01 ms against ~0.05-0.17 ms of CPU a token, both far below SmolLM2's
~85 ms decode step on one core), but it compiles a schema ~10x slower (14 ms against 1.5 ms for a five-field schema),
and it silently ignores keywords it cannot enforce (`uniqueItems`, `not`,
`contains`, `if`/`then`), so its output may not validate; llguidance refuses them, which a server turns into a
400. xgrammar also pulls in transformers and triton.

Refusals name the keyword and its JSON path in one sentence (`explain_refusal`), found by walking the
schema: llguidance names the keyword but not where it is. `oneOf` is enforced when its alternatives exclude
each other (llguidance proves it: different types, or a property with a different `const` in each); one
whose alternatives a single value could match at once is refused, because approximating it with `anyOf`
(llguidance's `coerce_one_of`, which no request can set) would let through values that match two.

Pieces:
- `token_bytes`: every token's own bytes (byte-level BPE alphabet or SentencePiece pieces decoded), what the
  engine matches grammars against; special tokens are flagged and never match grammar text.
- `GrammarEngine`: one per tokenizer (building it indexes the vocabulary once, ~0.5 s); `compile_json_schema`,
  `compile_json_object` and `compile_lark` give a `Constraint` or raise `GrammarError` naming the problem.
- `Constraint`: the grammar state of one sequence; `compute_mask()` -> allowed tokens (V,) bool, `accept(t)`.
- `MaskBatch`: computes the masks of many sequences in a worker thread (llguidance drops the GIL) while the
  caller runs the model step, so masks cost no latency on top of the step when the step is longer.
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import llguidance
import torch
from torch import Tensor

from spqr_run.errors import ConfigError
from spqr_run.text import decode_text, valid_json_warn
from spqr_run.tokenizer import Tokenizer

# JSON layout the grammar allows: one separator form, no free whitespace (a free-whitespace grammar lets a
# weak model emit newlines until max_tokens); ", " and ": " are what json.dumps writes, hence what models saw.
JSON_OPTIONS: dict[str, Any] = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
MAX_SCHEMA_CHARS = 200_000


class GrammarError(ConfigError):
    """A schema or grammar the engine cannot compile; the message names the problem."""


def _gpt2_byte_alphabet() -> dict[str, int]:
    """GPT-2's byte-level BPE alphabet (Radford et al. 2019, `bytes_to_unicode`): printable bytes stand for
    themselves, the other 68 bytes for code points 256 and up. Returns char -> byte."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    table = {chr(b): b for b in printable}
    extra = 0
    for b in range(256):
        if b not in printable:
            table[chr(256 + extra)] = b
            extra += 1
    return table


def token_bytes(tokenizer: Tokenizer) -> tuple[list[bytes], list[int]]:
    """Each token's own bytes, by id, and the ids of special tokens.

    Byte-level BPE vocabularies (every piece spelled in GPT-2's byte alphabet) map each character back to its
    byte; SentencePiece-style ones turn "▁" into a space and `<0xNN>` into byte NN. Added tokens are their text.
    Ids without a piece (gaps before added tokens) are given as special, so no grammar ever allows them.
    """
    backend = tokenizer._backend  # the pieces as stored; the public API only decodes whole texts
    n = tokenizer.vocab_size
    pieces = [backend.piece(i) for i in range(n)]
    if hasattr(backend, "tok"):  # tokenizers backend: its added tokens
        added = set(backend.tok.get_added_tokens_decoder())
    else:
        added = set(backend.added) | set(backend.special_ids)
    special = [i for i in range(n) if tokenizer.is_special(i) or pieces[i] is None]
    alphabet = _gpt2_byte_alphabet()
    normal = [p for i, p in enumerate(pieces) if p is not None and i not in added]
    byte_level = all(c in alphabet for p in normal for c in p)
    out: list[bytes] = []
    for i, piece in enumerate(pieces):
        if piece is None:
            out.append(f"<unused_{i}>".encode())
        elif i in added:
            out.append(piece.encode())
        elif byte_level:
            out.append(bytes(alphabet[c] for c in piece))
        elif len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
            out.append(bytes([int(piece[3:5], 16)]))
        else:
            out.append(piece.replace("\u2581", " ").encode())
    return out, special


class _VocabView:
    """What `llguidance.TokenizerWrapper` reads: token bytes, specials, EOS/BOS, and a text tokenizer."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self.tokens, self.special_token_ids = token_bytes(tokenizer)
        eos = sorted(tokenizer.eos_ids)
        self.eos_token_id = eos[0] if eos else tokenizer.vocab_size - 1
        self.bos_token_id = tokenizer.bos_id

    def __call__(self, text: str | bytes) -> list[int]:
        if isinstance(text, bytes):
            text = text.decode("utf-8", errors="replace")
        return self.tokenizer.encode(text, add_bos=False, special=False)


class Constraint:
    """The grammar state of one sequence: which tokens may come next, advanced by each sampled token."""

    def __init__(self, matcher: llguidance.LLMatcher, vocab_size: int, description: str) -> None:
        self.matcher, self.vocab_size, self.description = matcher, vocab_size, description
        self.words = torch.full((-(-vocab_size // 32),), -1, dtype=torch.int32)  # (ceil(V / 32),) bits
        self.allowed: Tensor | None = None  # (V,) bool: the next token's mask, once `fill` ran

    def copy(self) -> Constraint:
        """An independent copy in the same state (one per sampled choice)."""
        return Constraint(self.matcher.deep_copy(), self.vocab_size, self.description)

    def fill(self) -> None:
        """Compute the next-token mask (llguidance and torch both release the GIL meanwhile)."""
        self.matcher.unsafe_compute_mask_ptr(self.words.data_ptr(), self.words.numel() * 4)
        self.allowed = unpack_bitmask(self.words, self.vocab_size)

    def compute_mask(self) -> Tensor:
        """Allowed next tokens, (V,) bool on the CPU: the mask computed by `fill` (or now when none is)."""
        if self.allowed is None:
            self.fill()
        allowed, self.allowed = self.allowed, None
        assert allowed is not None
        return allowed

    def accept(self, token: int) -> None:
        """Advance past `token`; ConfigError if the grammar does not allow it (the mask was not applied)."""
        self.allowed = None
        if not self.matcher.consume_token(token):
            raise ConfigError(f"token {token} breaks the {self.description}: {self.matcher.get_error()}")


_SHIFTS = torch.arange(32, dtype=torch.int32)  # (32,)


def unpack_bitmask(words: Tensor, vocab_size: int) -> Tensor:
    """Bit j of word i (int32, (ceil(V / 32),)) is token 32 i + j; returns (vocab_size,) bool."""
    bits = (words[:, None] >> _SHIFTS) & 1  # (W, 32)
    return bits.reshape(-1)[:vocab_size].bool()


def apply_mask(logits: Tensor, allowed: Tensor) -> Tensor:
    """`logits` (V',) with the tokens not `allowed` (V,) set to -inf; ids from V up (padding rows of the
    output layer beyond the tokenizer's vocabulary) are never allowed."""
    if logits.shape[-1] == len(allowed):
        return logits.masked_fill(~allowed.to(logits.device), float("-inf"))
    out = torch.full_like(logits, float("-inf"))
    n = min(len(allowed), logits.shape[-1])
    keep = allowed[:n].to(logits.device)
    out[:n] = torch.where(keep, logits[:n], out[:n])
    return out


class GrammarEngine:
    """Compiles grammars for one tokenizer. Building it indexes the vocabulary (~0.5 s on SmolLM2)."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.vocab_size = tokenizer.vocab_size
        view = _VocabView(tokenizer)
        self.lltokenizer = llguidance.LLTokenizer(
            llguidance.TokenizerWrapper(view), n_vocab=self.vocab_size, eos_token=sorted(tokenizer.eos_ids)
        )

    def _matcher(self, grammar: str, description: str) -> Constraint:
        matcher = llguidance.LLMatcher(self.lltokenizer, grammar, log_level=0)
        if matcher.is_error():
            raise GrammarError(f"cannot compile the {description}: {_first_line(matcher.get_error())}")
        return Constraint(matcher, self.vocab_size, description)

    def compile_json_schema(self, schema: Any, *, what: str = "JSON schema", where: str = "$") -> Constraint:
        """A constraint to JSON text valid under `schema` (a dict, or True for any JSON value).

        GrammarError when the engine cannot enforce it: one sentence naming the keyword and its JSON path,
        written from `where` (the schema's own path in a request, e.g. "response_format.json_schema.schema";
        default "$", the schema's root)."""
        if not isinstance(schema, (dict, bool)):
            raise GrammarError(f"the {what} must be a JSON object, not {type(schema).__name__}")
        text = json.dumps(schema)
        if len(text) > MAX_SCHEMA_CHARS:
            raise GrammarError(f"the {what} is larger than {MAX_SCHEMA_CHARS} characters")
        try:
            grammar = llguidance.LLMatcher.grammar_from_json_schema(text, defaults=JSON_OPTIONS)
            matcher = llguidance.LLMatcher(self.lltokenizer, grammar, log_level=0)
            problem = matcher.get_error() if matcher.is_error() else None
        except ValueError as e:
            problem = str(e)
        if problem is not None:
            why = explain_refusal(schema, problem, where, self.compiles) or _first_line(problem)
            raise GrammarError(f"cannot compile the {what}: {why}")
        return Constraint(matcher, self.vocab_size, what)

    def compiles(self, schema: Any) -> bool:
        """Whether the engine can enforce `schema` (no error)."""
        try:
            grammar = llguidance.LLMatcher.grammar_from_json_schema(json.dumps(schema), defaults=JSON_OPTIONS)
        except ValueError:
            return False
        return not llguidance.LLMatcher(self.lltokenizer, grammar, log_level=0).is_error()

    def compile_json_object(self) -> Constraint:
        """A constraint to any JSON object (`response_format: {"type": "json_object"}`)."""
        return self.compile_json_schema({"type": "object"}, what="JSON object format")

    def compile_lark(self, lark: str, *, what: str = "grammar") -> Constraint:
        """A constraint to a Lark grammar (llguidance's dialect: `%json {schema}` embeds a JSON schema)."""
        return self._matcher(llguidance.LLMatcher.grammar_from_lark(lark), what)


class GrammarEngines:
    """Builds the `GrammarEngine` of a tokenizer on first use, once, from any thread."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self._engine: GrammarEngine | None = None
        self._lock = threading.Lock()

    def get(self) -> GrammarEngine:
        with self._lock:
            if self._engine is None:
                self._engine = GrammarEngine(self.tokenizer)
            return self._engine


class MaskBatch:
    """Computes the next-token masks of several constraints in one worker thread, while the caller works.

    `start(constraints)` returns at once; `wait()` blocks until every mask is in its constraint's `words`
    (then `Constraint.compute_mask` uses it). llguidance releases the GIL while it computes, so the model step
    the caller runs meanwhile (torch releases it too) overlaps with it.
    """

    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="spqr-grammar")
        self._pending: Future[None] | None = None

    def start(self, constraints: Sequence[Constraint]) -> None:
        self.wait()
        if constraints:
            self._pending = self._pool.submit(_fill_all, list(constraints))

    def wait(self) -> None:
        if self._pending is not None:
            pending, self._pending = self._pending, None
            pending.result()

    def close(self) -> None:
        self._pool.shutdown(wait=True)


def _fill_all(constraints: list[Constraint]) -> None:
    for c in constraints:
        try:
            c.fill()
        except Exception:  # noqa: BLE001 - left unset: compute_mask retries and fails that sequence only
            c.allowed = None


_GRAMMAR_LISTING = re.compile(r"^\s*\d+\s*\|")  # "  4 | fn0: %json {...}": the grammar source, quoted


def _first_line(message: str) -> str:
    """The engine's message on one line (regex errors span several: pattern, caret, reason), without the
    grammar source it quotes, bounded."""
    lines = [line.strip() for line in message.splitlines()]
    text = " ".join(
        line for line in lines if line and set(line) != {"^"} and not _GRAMMAR_LISTING.match(line)
    )
    return (text[:400] + "...") if len(text) > 400 else (text or "unknown error")


# JSON Schema keywords whose values are schemas (maps of them, lists of them, or one): where a keyword can be
SUBSCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")
SUBSCHEMA_LISTS = ("anyOf", "allOf", "oneOf", "prefixItems")
SUBSCHEMA_ONE = (
    "items", "additionalItems", "additionalProperties", "not", "if", "then", "else", "contains",
    "propertyNames", "unevaluatedItems", "unevaluatedProperties",
)  # fmt: skip


def schema_nodes(schema: Any, path: tuple[str | int, ...] = ()) -> Any:
    """Every (path, subschema) of a JSON schema, depth first in document order, the root first."""
    if not isinstance(schema, dict):
        return
    yield path, schema
    for key, value in schema.items():
        if key in SUBSCHEMA_MAPS and isinstance(value, dict):
            for name, sub in value.items():
                yield from schema_nodes(sub, (*path, key, name))
        elif key in SUBSCHEMA_LISTS and isinstance(value, list):
            for i, sub in enumerate(value):
                yield from schema_nodes(sub, (*path, key, i))
        elif key in SUBSCHEMA_ONE:
            subs = enumerate(value) if isinstance(value, list) else [(None, value)]
            for i, sub in subs:
                yield from schema_nodes(sub, (*path, key) if i is None else (*path, key, i))


def json_path(where: str, path: tuple[str | int, ...]) -> str:
    """`where` plus `path` as a readable path: .name, ["odd name"], [3]."""
    out = where
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        elif re.fullmatch(r"[A-Za-z_$][A-Za-z0-9_$-]*", part):
            out += f".{part}"
        else:
            out += f"[{json.dumps(part)}]"
    return out


def explain_refusal(schema: Any, problem: str, where: str, compiles: Any) -> str | None:
    """One sentence for llguidance's refusal `problem` of `schema`: the keyword and its JSON path (from
    `where`), and what to do; None when the problem is not one it knows. `compiles(schema) -> bool` tests a
    part of the schema (to find which `oneOf` the engine refused)."""
    m = re.search(r"Unimplemented keys: (\[[^\]]*\])", problem)
    if m:
        try:
            keys = [k for k in json.loads(m.group(1)) if isinstance(k, str)]
        except ValueError:
            keys = []
        for key in keys:
            path = next((p for p, node in schema_nodes(schema) if key in node), None)
            if path is not None:
                others = [k for k in keys if k != key]
                also = f" (so are {', '.join(repr(k) for k in others)})" if others else ""
                return (
                    f'"{key}" at {json_path(where, (*path, key))} is a JSON Schema keyword the grammar engine '
                    f"cannot enforce{also}, so the output could break it; remove it and check that part "
                    "after generating"
                )
        return None
    if "oneOf" in problem:
        defs = {k: schema[k] for k in ("$defs", "definitions") if isinstance(schema, dict) and k in schema}
        found = [p for p, node in schema_nodes(schema) if isinstance(node.get("oneOf"), list)]
        if not found:
            return None
        bad = next((p for p in found if not compiles({**defs, **_node_at(schema, p)})), found[0])
        return (
            f'"oneOf" at {json_path(where, (*bad, "oneOf"))} has alternatives that one value could match at '
            "once, and the grammar engine enforces a oneOf only when its alternatives exclude each other "
            '(different types, or a property with a different "const" in each); use "anyOf" if any match '
            "will do"
        )
    return None


def _node_at(schema: Any, path: tuple[str | int, ...]) -> dict[str, Any]:
    node = schema
    for part in path:
        node = node[part]
    return {"oneOf": node["oneOf"]}


def read_schema(source: str, *, warn: Callable[[str], None] | None = None) -> tuple[dict[str, Any], str]:
    """The schema a command-line argument names, and a name for messages: "json" is any JSON object, else
    `source` is the path of a JSON schema file. ConfigError names the file when it is missing or not JSON.
    Text that is not valid Unicode in it is replaced with U+FFFD, and `warn` is told (`spqr_run.text`)."""
    if source.strip().lower() == "json":
        return {"type": "object"}, "JSON object format"
    path = Path(source).expanduser()
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the JSON schema ({e.strerror or e})") from None
    try:
        schema = json.loads(decode_text(raw, str(path), warn))
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not a JSON file ({e})") from None
    schema = valid_json_warn(schema, str(path), warn)
    if not isinstance(schema, dict):
        raise ConfigError(f"{path}: a JSON schema must be a JSON object, not {type(schema).__name__}")
    return schema, f"JSON schema {path}"
