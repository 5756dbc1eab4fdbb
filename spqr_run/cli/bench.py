"""spqr-bench: SpQR against FP16 on the same engine (prefill, decode, TTFT, bytes read per token, GB/s, the
bandwidth floor on CPUs, peak memory, ratios), optionally beside llama.cpp's llama-bench."""

from __future__ import annotations

import argparse
import json

from rich.console import Console
from rich.text import Text

from spqr_run.bench import BenchSettings, run_bench
from spqr_run.cli.common import (
    ArgumentParser,
    add_checksum_flag,
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
    p.add_argument(
        "model", nargs="?", help="a .spqr file, Hugging Face folder or GGUF file, or its bare name in models/"
    )
    p.add_argument("--synthetic", choices=sorted(SYNTHETIC), help="random weights with a real model's shapes")
    p.add_argument("--device", default="auto", help="cpu, cuda or cuda:N (default: cuda when available)")
    add_checksum_flag(p)
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
        "--repeats", type=int_arg(1), default=None, help="timed repeats (default: 5 on GPUs, 3 on CPUs)"
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
    p.add_argument(
        "--warmup", type=int_arg(0), default=None, help="untimed runs of each method first (default: 1)"
    )
    p.add_argument("--no-graphs", action="store_true", help="decode eagerly (no CUDA graphs)")
    add_kv_cache_flag(p)
    p.add_argument(
        "--llama-cpp",
        metavar="GGUF",
        default=None,
        help="also run llama.cpp's llama-bench on this GGUF with the same threads and tokens, alternated with "
        "the repeats, and print the ratio (CPU; builds llama.cpp from the pinned sdist when not cached). "
        "Default: the model itself when it is a GGUF, or the GGUF a .spqr was quantized from when it lies "
        "beside it, if llama.cpp's build is cached (benchmarks/llama_cpp.py)",
    )
    p.add_argument("--no-llama-cpp", action="store_true", help="never run llama.cpp beside")
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
    model = None
    if args.model is not None:
        from spqr_run.default_model import find_model

        model = str(find_model(args.model))  # a path, or a bare name in the models folder
    settings.build_llama_cpp = args.llama_cpp is not None  # asked for by name: build it if needed
    if args.no_llama_cpp:
        settings.llama_cpp = None
    elif settings.llama_cpp is None and model is not None and device.type == "cpu":
        settings.llama_cpp = _default_llama_cpp(model)
    report = run_bench(
        device=device,
        settings=settings,
        synthetic=args.synthetic,
        model_path=model,
        log=lambda msg: err.print(Text(printable(msg))),  # messages hold paths and exception text: literal
    )
    if args.json:
        print(json.dumps(report.to_json()), flush=True)
    else:
        wide_console().print(report.table())  # piped: as wide as the table, not cut to 80 columns
    return 0


def _default_llama_cpp(model: str) -> str | None:
    """The GGUF to run llama.cpp on by default: only when its build is cached (no minutes-long build)."""
    from spqr_run.engine.llama_cpp_peer import cached_build_exists, gguf_for

    gguf = gguf_for(model)
    return str(gguf) if gguf is not None and cached_build_exists() else None


if __name__ == "__main__":
    main()
