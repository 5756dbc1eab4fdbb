"""What every command shares: one-line errors with exit status 2, checked numeric flags, the --device/--ctx
flags, the dependency check, and consoles that print text we did not write literally.

Text from outside the program (paths, model names and metadata, chat templates, model output, logs) is never
given to rich as markup: it goes in `rich.text.Text` objects (or a column with markup off), so `[bold]` in a
file name stays `[bold]` and `[/]` cannot raise a MarkupError; control characters are made visible
(`printable`), so it cannot move the cursor or recolour the terminal either.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import math
import sys
from collections.abc import Callable
from typing import NoReturn

from rich.console import Console
from rich.text import Text

from spqr_run.errors import ConfigError, SpqrError

stderr = Console(stderr=True, highlight=False)

MIN_CONTEXT = 16  # the smallest --ctx any command accepts (tokens)

# (import name, distribution) of the core dependencies the chat, generate and serve paths import; each is in
# pyproject.toml's `dependencies`, so `pip install -e .` brings it.
CORE_MODULES = (
    ("torch", "torch"),
    ("numpy", "numpy"),
    ("gguf", "gguf"),
    ("tokenizers", "tokenizers"),
    ("sentencepiece", "sentencepiece"),
    ("safetensors", "safetensors"),
    ("jinja2", "jinja2"),
    ("rich", "rich"),
    ("prompt_toolkit", "prompt_toolkit"),
)
SERVER_MODULES = (("fastapi", "fastapi"), ("uvicorn", "uvicorn"))


# C0/C1 control characters other than newline and tab, which a terminal would act on (ESC starts cursor
# movement and colour sequences): shown as visible escapes ("\x1b", "\x9b", ...)
_CONTROLS = {c: f"\\x{c:02x}" for c in (*range(0x00, 0x09), *range(0x0B, 0x20), 0x7F, *range(0x80, 0xA0))}
_CONTROLS[0x0D] = None  # a bare carriage return: dropped (CRLF line ends stay line ends)


def printable(text: str) -> str:
    """`text` with terminal control characters made visible (newlines and tabs kept): model output, file
    metadata and request data are shown as text, never run as cursor or colour commands."""
    return text.translate(_CONTROLS)


class LiteralLogArgs(logging.Filter):
    """A logging filter that makes control characters in a record's string arguments (model names, request
    paths, error messages) visible, so a log line cannot move the cursor or recolour the terminal."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple):
            record.args = tuple(printable(a) if isinstance(a, str) else a for a in record.args)
        elif isinstance(record.args, dict):
            record.args = {k: printable(v) if isinstance(v, str) else v for k, v in record.args.items()}
        return True


class MissingDependencyError(SpqrError):
    """A core dependency of spqr-run cannot be imported (a broken or partial install)."""


def print_error(message: str, console: Console | None = None) -> None:
    """Print 'error: MESSAGE' on one line; MESSAGE is printed literally (never parsed as rich markup)."""
    (console or stderr).print(Text.assemble(("error:", "bold red"), " ", printable(message)), soft_wrap=True)


def print_warning(message: str, console: Console | None = None) -> None:
    """Print 'warning: MESSAGE' on one line (literally)."""
    (console or stderr).print(
        Text.assemble(("warning:", "bold yellow"), " ", printable(message)), soft_wrap=True
    )


def text_arg(flag: str) -> Callable[[str], str]:
    """An argparse `type` for free text (a prompt, a system prompt, a name): text that is not valid Unicode
    (bytes of the command line that are not UTF-8) is replaced with U+FFFD, with a warning (`spqr_run.text`)."""
    from spqr_run.text import replaced_note, valid_text

    def parse(text: str) -> str:
        clean, n = valid_text(text)
        if n:
            print_warning(replaced_note(flag, n))
        return clean

    parse.__name__ = "text"
    return parse


def run_cli(main: Callable[[], int | None]) -> None:
    """Run a command's body: user errors print one line and exit 2; Ctrl-C exits 130 without a traceback."""
    try:
        code = main()
    except SpqrError as e:
        print_error(str(e))
        sys.exit(2)
    except KeyboardInterrupt:
        stderr.print("interrupted")
        sys.exit(130)
    sys.exit(code or 0)


def check_dependencies(modules: tuple[tuple[str, str], ...] = CORE_MODULES) -> None:
    """Import each of `modules` ((import name, distribution) pairs); MissingDependencyError names the first
    that fails and how to install it. Commands call this before downloading or loading anything."""
    for module, dist in modules:
        try:
            importlib.import_module(module)
        except ImportError as e:
            raise MissingDependencyError(
                f"the Python package '{dist}' that spqr-run needs cannot be imported ({e}); install the "
                f"project's dependencies into this Python ({sys.executable}): `pip install {dist}`, or "
                "reinstall the checkout with `pip install -e .`"
            ) from None


class ArgumentParser(argparse.ArgumentParser):
    """argparse with one-line errors: 'error: argument --ctx: ...' on standard error, exit status 2."""

    def error(self, message: str) -> NoReturn:
        print_error(f"{message} (see {self.prog} --help)")
        sys.exit(2)


def int_arg(low: int | None = None, high: int | None = None, *, unit: str = "") -> Callable[[str], int]:
    """An argparse `type` for an integer in [low, high] (either bound optional); errors name the range."""
    suffix = f" {unit}" if unit else ""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if (low is not None and value < low) or (high is not None and value > high):
            if high is None:
                why = f"must be at least {low}{suffix}"
            elif low is None:
                why = f"must be at most {high}{suffix}"
            else:
                why = f"must be in [{low}, {high}]{suffix}"
            raise argparse.ArgumentTypeError(f"invalid value {value}: {why}")
        return value

    parse.__name__ = "integer"
    return parse


def float_arg(
    low: float | None = None, high: float | None = None, *, low_open: bool = False
) -> Callable[[str], float]:
    """An argparse `type` for a finite number in [low, high] ((low, high] with `low_open`)."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        bad_low = low is not None and (value <= low if low_open else value < low)
        bad_high = high is not None and value > high
        if not math.isfinite(value) or bad_low or bad_high:
            left = "(" if low_open else "["
            lo = "-inf" if low is None else f"{low:g}"
            hi = "inf" if high is None else f"{high:g}"
            raise argparse.ArgumentTypeError(f"invalid value {text}: must be in {left}{lo}, {hi}]")
        return value

    parse.__name__ = "number"
    return parse


def sampling_arg(field: str, kind: type) -> Callable[[str], float | int]:
    """An argparse `type` for a `SamplingParams` field, checked by SamplingParams itself (one range each)."""
    from spqr_run.sampling import SamplingParams

    def parse(text: str) -> float | int:
        try:
            value = kind(text)
        except ValueError:
            what = "a whole number" if kind is int else "a number"
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        try:
            SamplingParams(**{field: value})
        except ConfigError as e:
            raise argparse.ArgumentTypeError(str(e).replace(f"invalid {field}=", "invalid value ")) from None
        return value

    parse.__name__ = kind.__name__
    return parse


def add_sampling_flags(parser: argparse.ArgumentParser) -> None:
    """--temperature, --top-p, --top-k, --min-p, --repeat-penalty, --seed (default: the model's settings)."""
    parser.add_argument(
        "--temperature",
        type=sampling_arg("temperature", float),
        default=None,
        help="0 = greedy (default: the model's)",
    )
    parser.add_argument(
        "--top-p",
        type=sampling_arg("top_p", float),
        default=None,
        help="nucleus sampling mass in (0, 1] (default: the model's)",
    )
    parser.add_argument(
        "--top-k",
        type=sampling_arg("top_k", int),
        default=None,
        help="keep the k most likely tokens; 0 = off (default: the model's)",
    )
    parser.add_argument(
        "--min-p",
        type=sampling_arg("min_p", float),
        default=None,
        help="drop tokens less likely than MIN_P x the most likely one, in [0, 1]; 0 = off (default: the model's)",
    )
    parser.add_argument(
        "--repeat-penalty",
        type=sampling_arg("repetition_penalty", float),
        default=None,
        dest="repetition_penalty",
        help="penalize tokens already in the prompt or reply (HF-style: positive logits divided by it, "
        "negative ones multiplied), in [0.01, 10]; 1 = off (default: the model's)",
    )
    parser.add_argument(
        "--seed",
        type=int_arg(0, 2**64 - 1),
        default=None,
        help="random seed for sampling (reproducible replies)",
    )


SAMPLING_FLAGS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "seed")


def wide_console(*, stderr_: bool = False) -> Console:
    """A console for tables: the terminal's width on a terminal; elsewhere (a pipe, a file) wide enough that
    a table is sized to its content instead of being cut to 80 columns."""
    console = Console(stderr=stderr_, highlight=False)
    if not console.is_terminal:
        console = Console(stderr=stderr_, highlight=False, width=1000)
    return console


def add_model_flags(parser: argparse.ArgumentParser, *, model_required: bool = True) -> None:
    parser.add_argument(
        "model",
        nargs=None if model_required else "?",
        help="a .spqr file, a Hugging Face model folder or a GGUF file, or the bare name of one in models/ "
        "or $SPQR_RUN_MODELS (NAME, NAME.spqr or NAME.gguf)",
    )
    parser.add_argument("--device", default="auto", help="cpu, cuda or cuda:N (default: cuda when available)")
    add_checksum_flag(parser)
    add_threads_flag(parser)


def add_threads_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--threads",
        type=int_arg(1, 256),
        default=None,
        help="CPU threads, in one pool (default: the cores this process may use)",
    )


def apply_threads(args: argparse.Namespace) -> int:
    """Size the process's one CPU thread pool from --threads (`spqr_run.cpu.configure_threads`)."""
    from spqr_run.cpu import configure_threads

    return configure_threads(getattr(args, "threads", None))


def add_checksum_flag(parser: argparse.ArgumentParser) -> None:
    """--skip-checksums: load a .spqr without checking its tensors against the checksums in its header."""
    parser.add_argument(
        "--skip-checksums",
        action="store_true",
        help="load a .spqr file without checking each tensor against the CRC-32 stored in its header "
        "(a corrupt file is then not detected; the check costs a few percent of the load time)",
    )


def add_memory_flags(parser: argparse.ArgumentParser, *, per_sequence: bool = False) -> None:
    """--ctx and --gpu-memory: the KV cache is sized by the memory planner (`spqr_run.engine.planner`)."""
    each = " per sequence" if per_sequence else ""
    parser.add_argument(
        "--ctx",
        type=int_arg(MIN_CONTEXT, unit="tokens"),
        default=None,
        help=f"context{each} in tokens (default: the longest that fits the memory, at most the model's limit "
        "and 4096); a context above the model's limit, or one that does not fit the memory, is refused",
    )
    parser.add_argument(
        "--gpu-memory",
        default=None,
        metavar="SIZE",
        help="memory budget for weights + KV cache, e.g. 24GiB (default: the free memory; on a GPU it also "
        "caps this process, to try a smaller card)",
    )
    add_kv_cache_flag(parser)


def add_kv_cache_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--kv-cache",
        choices=["auto", "int8"],
        default="auto",
        help="KV cache storage: auto = the model's dtype (fp16 with the native CPU kernels), or int8 when "
        "only that fits the context (--ctx, else 4096 tokens or the model's limit; the plan says so); int8 = 8 "
        "bits with a scale per token and head, about half the memory, so twice the context fits (default: auto)",
    )


def memory_budget(args: argparse.Namespace) -> int | None:
    """--gpu-memory in bytes (None when absent); ConfigError on a malformed size."""
    from spqr_run.engine.planner import parse_memory

    return None if args.gpu_memory is None else parse_memory(args.gpu_memory)
