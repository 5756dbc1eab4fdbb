"""Text that is not valid Unicode, one rule everywhere: replaced with U+FFFD (the replacement character), and
whoever sent it is told.

Where it comes from: bytes that are not UTF-8 (Latin-1 text piped into `spqr-chat`, a file given with
`--text`, `--calib`, `--json-schema`, `/load` or `/format`, a command-line argument, a request body), which
Python carries as lone surrogates (U+DC80-U+DCFF, "surrogateescape"), and lone surrogates written as JSON
escapes in a request ("\\ud800"). Neither can be encoded as UTF-8, so a tokenizer, a template or a JSON
response would fail on them. Each such code point (each such byte) becomes one U+FFFD before the text
reaches the tokenizer or a template; the chat prints a notice, the commands a warning on standard error, and
the server logs a warning and answers with an `X-Spqr-Warning` header naming the request fields.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from spqr_run.errors import ConfigError

REPLACEMENT = "\ufffd"
_SURROGATE = re.compile("[\ud800-\udfff]")


def valid_text(text: str) -> tuple[str, int]:
    """`text` with every lone surrogate (what undecodable bytes and JSON's "\\ud800" become) replaced by
    U+FFFD, and how many were replaced."""
    return _SURROGATE.subn(REPLACEMENT, text)


def valid_json(value: Any, path: str = "$") -> tuple[Any, list[str]]:
    """A parsed JSON value with `valid_text` applied to every string (object keys too), and the paths of the
    strings that changed ("messages[0].content"; `path` names the root)."""
    changed: list[str] = []

    def walk(v: Any, where: str) -> Any:
        if isinstance(v, str):
            clean, n = valid_text(v)
            if n:
                changed.append(where)
            return clean
        if isinstance(v, list):
            return [walk(x, f"{where}[{i}]") for i, x in enumerate(v)]
        if isinstance(v, dict):
            out = {}
            for k, x in v.items():
                key, n = valid_text(k) if isinstance(k, str) else (k, 0)
                if n:
                    changed.append(f"{where} (a key)")
                out[key] = walk(x, _member(where, key))
            return out
        return v

    return walk(value, path), changed


def _member(where: str, key: Any) -> str:
    name = str(key)
    if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
        return name if where == "" else f"{where}.{name}"
    return f"{where}[{json.dumps(name)}]"  # ASCII: safe in an HTTP header


def replaced_note(what: str, count: int, unit: str = "character") -> str:
    """One line: '--text notes.txt: 3 bytes that are not valid UTF-8 were replaced with U+FFFD' (unit
    "byte"), '--system: 1 character that is not valid Unicode was replaced with U+FFFD' (unit "character")."""
    valid = "UTF-8" if unit == "byte" else "Unicode"
    if count == 1:
        return f"{what}: 1 {unit} that is not valid {valid} was replaced with U+FFFD"
    return f"{what}: {count} {unit}s that are not valid {valid} were replaced with U+FFFD"


def fields_note(what: str, paths: list[str]) -> str:
    """One line: 'x.json: text that is not valid Unicode was replaced with U+FFFD in a.b, c[0]'."""
    shown = ", ".join(paths[:4]) + (f" and {len(paths) - 4} more" if len(paths) > 4 else "")
    return f"{what}: text that is not valid Unicode was replaced with U+FFFD in {shown}"


Warn = Callable[[str], None]


def read_text_file(path: str | Path, what: str, warn: Warn | None = None) -> str:
    """A text file's contents as UTF-8, bytes that are not UTF-8 replaced with U+FFFD (`warn` is told how
    many); ConfigError naming `what` when it cannot be read."""
    path = Path(path).expanduser()
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"{what}: file not found") from None
    except OSError as e:
        raise ConfigError(f"{what}: cannot read it ({e.strerror or e})") from None
    return decode_text(raw, what, warn)


def decode_text(raw: bytes, what: str, warn: Warn | None = None) -> str:
    """`raw` decoded as UTF-8, each byte that is not UTF-8 replaced with U+FFFD (`warn` is told how many)."""
    text, n = valid_text(raw.decode("utf-8", errors="surrogateescape"))
    if n and warn is not None:
        warn(replaced_note(what, n, "byte"))
    return text


def valid_json_warn(value: Any, what: str, warn: Warn | None = None) -> Any:
    """`valid_json(value)`, `warn` told which strings changed."""
    value, changed = valid_json(value)
    if changed and warn is not None:
        warn(fields_note(what, changed))
    return value
