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


def add_memory_flags(parser: argparse.ArgumentParser, *, per_sequence: bool = False) -> None:
    """--ctx and --gpu-memory: the KV cache is sized by the memory planner (`spqr_run.engine.planner`)."""
    each = " per sequence" if per_sequence else ""
    parser.add_argument(
        "--ctx",
        type=int,
        default=None,
        help=f"context{each} in tokens (default: the longest that fits the memory, at most the model's and "
        "4096; a larger one that does not fit is refused)",
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
        help="KV cache storage: auto = the model's dtype; int8 = 8 bits with a scale per token and head, "
        "about half the memory, so twice the context fits (default: auto)",
    )


def memory_budget(args: argparse.Namespace) -> int | None:
    """--gpu-memory in bytes (None when absent); ConfigError on a malformed size."""
    from spqr_run.engine.planner import parse_memory

    return None if args.gpu_memory is None else parse_memory(args.gpu_memory)
