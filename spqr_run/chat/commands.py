"""Slash commands of the chat REPL: parsing and `/set` values. No I/O here; errors are one-line hints."""

from __future__ import annotations

import difflib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from spqr_run.errors import ConfigError, SpqrError
from spqr_run.sampling import SamplingParams
from spqr_run.structured import read_schema


class CommandError(SpqrError):
    """A slash command is unknown or has a bad argument; the message is a one-line hint."""


@dataclass(frozen=True)
class CommandSpec:
    name: str
    usage: str
    help: str
    takes_arg: str  # "none" | "optional" | "required"


COMMANDS: dict[str, CommandSpec] = {
    c.name: c
    for c in [
        CommandSpec("help", "/help", "show this help", "none"),
        CommandSpec("clear", "/clear", "start a new conversation (the system prompt stays)", "none"),
        CommandSpec(
            "system",
            "/system [TEXT | -]",
            "set the system prompt (no TEXT: show it; -: remove it)",
            "optional",
        ),
        CommandSpec(
            "set",
            "/set NAME VALUE",
            "change a setting: "
            + ", ".join(["temperature", "top_p", "top_k", "min_p", "repeat_penalty", "max_tokens", "seed"]),
            "required",
        ),
        CommandSpec(
            "format",
            "/format [json | FILE | off]",
            "constrain replies to JSON: any object, or valid under the JSON schema in FILE (no argument: show)",
            "optional",
        ),
        CommandSpec("show", "/show", "model, bits/param, memory plan and settings", "none"),
        CommandSpec("retry", "/retry", "regenerate the last reply", "none"),
        CommandSpec("save", "/save FILE", "save the conversation as JSON", "required"),
        CommandSpec("load", "/load FILE", "load a conversation saved with /save", "required"),
        CommandSpec("stats", "/stats", "timings of the last reply and context usage", "none"),
        CommandSpec("exit", "/exit", "quit (also Ctrl-D)", "none"),
    ]
}
ALIASES = {"quit": "exit", "q": "exit", "?": "help", "reset": "clear"}

# /set NAME -> (SamplingParams field, type); "seed" also takes "none"/"random"
SETTINGS: dict[str, tuple[str, type]] = {
    "temperature": ("temperature", float),
    "top_p": ("top_p", float),
    "top_k": ("top_k", int),
    "min_p": ("min_p", float),
    "repeat_penalty": ("repetition_penalty", float),
    "max_tokens": ("max_tokens", int),
    "seed": ("seed", int),
}
SETTING_ALIASES = {
    "repetition_penalty": "repeat_penalty",
    "temp": "temperature",
    "max_new_tokens": "max_tokens",
}


@dataclass(frozen=True)
class Command:
    name: str  # canonical name, a key of COMMANDS
    arg: str  # the rest of the line, stripped ("" when none)


def is_command(line: str) -> bool:
    """A line is a command when it starts with '/' followed by a letter or '?' (so '/ 2' or '//x' are text)."""
    return len(line) > 1 and line[0] == "/" and (line[1].isalpha() or line[1] == "?")


def parse_command(line: str) -> Command:
    """Parse '/name args'; unknown names and missing/extra arguments raise CommandError with a hint."""
    head, _, rest = line.strip()[1:].partition(" ")
    name = ALIASES.get(head.lower(), head.lower())
    arg = rest.strip()
    spec = COMMANDS.get(name)
    if spec is None:
        close = difflib.get_close_matches(name, list(COMMANDS), n=1)
        hint = f" (did you mean /{close[0]}?)" if close else ""
        raise CommandError(f"unknown command /{head}{hint}; type /help for the list")
    if spec.takes_arg == "required" and not arg:
        raise CommandError(f"usage: {spec.usage}")
    if spec.takes_arg == "none" and arg:
        raise CommandError(f"/{name} takes no argument (usage: {spec.usage})")
    return Command(name, arg)


def parse_setting(arg: str) -> tuple[str, Any]:
    """'NAME VALUE' of /set -> (SamplingParams field, typed value); bad names/values raise CommandError."""
    parts = arg.split()
    if len(parts) != 2:
        raise CommandError(f"usage: /set NAME VALUE, NAME one of {', '.join(SETTINGS)}")
    raw_name, raw_value = parts
    name = raw_name.lower().replace("-", "_")
    name = SETTING_ALIASES.get(name, name)
    if name not in SETTINGS:
        close = difflib.get_close_matches(name, list(SETTINGS), n=1)
        hint = f"did you mean {close[0]}? " if close else ""
        raise CommandError(f"unknown setting {raw_name!r}; {hint}settings: {', '.join(SETTINGS)}")
    field, kind = SETTINGS[name]
    if name == "seed" and raw_value.lower() in ("none", "random", "off"):
        return field, None
    try:
        value = kind(raw_value)
    except ValueError:
        what = "an integer" if kind is int else "a number"
        raise CommandError(f"{name} must be {what}, got {raw_value!r}") from None
    return field, value


def apply_setting(params: SamplingParams, arg: str) -> tuple[SamplingParams, str]:
    """Apply '/set NAME VALUE' to `params`; returns the new params and a one-line confirmation."""
    field, value = parse_setting(arg)
    try:
        new = params.updated(**{field: value})
    except ConfigError as e:
        raise CommandError(str(e)) from None
    return new, f"{field} = {value}"


def help_text() -> str:
    """The /help listing plus the input keys."""
    width = max(len(c.usage) for c in COMMANDS.values())
    lines = [f"  {c.usage:<{width}}  {c.help}" for c in COMMANDS.values()]
    lines += [
        "",
        "  Enter sends; Esc then Enter (or Alt+Enter) inserts a newline; pasted blocks keep their newlines.",
        '  A line that is just """ opens a multi-line block; another """ line closes and sends it.',
        "  Ctrl-C stops a reply; Ctrl-D (or /exit) quits. Up/Down browse the input history.",
    ]
    return "\n".join(lines)


def parse_format(arg: str, *, warn: Callable[[str], None] | None = None) -> tuple[dict[str, Any], str] | None:
    """'/format ARG' -> (JSON schema, its name) or None for "off"; a missing or non-JSON file raises
    CommandError naming it (`warn` hears of text in it that is not valid Unicode, replaced with U+FFFD). An
    empty ARG is the caller's (show the current format)."""
    if arg.strip().lower() in ("off", "none", "text"):
        return None
    try:
        return read_schema(arg.strip(), warn=warn)
    except ConfigError as e:
        raise CommandError(str(e)) from None
