"""What every command shares: one-line errors with exit status 2, and the --device/--ctx flags."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from rich.console import Console

from spqr_run.errors import SpqrError

stderr = Console(stderr=True, highlight=False)


def run_cli(main: Callable[[], int | None]) -> None:
    """Run a command's body: user errors print one line and exit 2; Ctrl-C exits 130 without a traceback."""
    try:
        code = main()
    except SpqrError as e:
        stderr.print(f"[bold red]error:[/] {e}", markup=True, soft_wrap=True)
        sys.exit(2)
    except KeyboardInterrupt:
        stderr.print("interrupted")
        sys.exit(130)
    sys.exit(code or 0)


def add_model_flags(parser: argparse.ArgumentParser, *, model_required: bool = True) -> None:
    parser.add_argument(
        "model",
        nargs=None if model_required else "?",
        help="a .spqr file, a Hugging Face model folder or a GGUF file",
    )
    parser.add_argument("--device", default="auto", help="cpu, cuda or cuda:N (default: cuda when available)")
