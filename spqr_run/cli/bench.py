"""spqr-bench: SpQR against FP16 on the same engine (prefill, decode, TTFT, GB/s, peak memory, ratios)."""

from __future__ import annotations

import argparse
import json

from rich.console import Console
from rich.text import Text

from spqr_run.bench import BenchSettings, run_bench
from spqr_run.cli.common import (
    ArgumentParser,
    add_kv_cache_flag,
    add_threads_flag,
    apply_threads,
    check_dependencies,
    float_arg,
    int_arg,
    printable,
    run_cli,
    wide_console,
)
from spqr_run.devices import resolve_device
from spqr_run.engine.synthetic import SYNTHETIC


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(
        prog="spqr-bench",
        description="Time SpQR and its FP16 counterpart side by side on one device.",
        epilog="examples: spqr-bench --synthetic llama-7b   |   spqr-bench models/llama-7b.spqr --json",
    )
    p.add_argument("model", nargs="?", help="a .spqr file, Hugging Face folder or GGUF file")
    p.add_argument("--synthetic", choices=sorted(SYNTHETIC), help="random weights with a real model's shapes")
    p.add_argument("--device", default="auto", help="cpu, cuda or cuda:N (default: cuda when available)")
    add_threads_flag(p)
    p.add_argument(
        "--prompt-len",
        type=int_arg(1),
        default=32,
        help="prompt tokens per sequence, prefilled in one forward (default: 32)",
    )
    p.add_argument(
        "--new-tokens",
        type=int_arg(1),
        default=128,
        help="tokens decoded per sequence after the prompt, greedily (default: 128)",
    )
    p.add_argument(
        "--batch", type=int_arg(1), default=1, help="sequences prefilled and decoded together (default: 1)"
    )
    p.add_argument(
        "--repeats", type=int_arg(1), default=None, help="timed repeats (default: 5 on GPUs, 1 on CPUs)"
    )
    p.add_argument("--gpu-memory", default=None, help="memory budget, e.g. 24GiB (default: free memory)")
    p.add_argument("--layers", type=int_arg(1), default=None, help="truncate a synthetic model to N blocks")
    p.add_argument("--wbits", type=int, default=3, choices=(2, 3, 4), help="synthetic SpQR code bits")
    p.add_argument(
        "--outlier-rate",
        type=float_arg(0, 1),
        default=0.01,
        help="synthetic SpQR outlier fraction in [0, 1] (default: 0.01)",
    )
    p.add_argument("--no-graphs", action="store_true", help="decode eagerly (no CUDA graphs)")
    add_kv_cache_flag(p)
    p.add_argument("--json", action="store_true", help="print one JSON line instead of a table")
    return p


def main(argv: list[str] | None = None) -> None:
    run_cli(lambda: _bench(build_parser().parse_args(argv)))


def _bench(args: argparse.Namespace) -> int:
    check_dependencies()
    apply_threads(args)
    err = Console(stderr=True, highlight=False)
    device = resolve_device(args.device)
    settings = BenchSettings.from_args(args)
    report = run_bench(
        device=device,
        settings=settings,
        synthetic=args.synthetic,
        model_path=args.model,
        log=lambda msg: err.print(Text(printable(msg))),  # messages hold paths and exception text: literal
    )
    if args.json:
        print(json.dumps(report.to_json()), flush=True)
    else:
        wide_console().print(report.table())  # piped: as wide as the table, not cut to 80 columns
    return 0


if __name__ == "__main__":
    main()
