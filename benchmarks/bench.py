"""The BENCHMARKS.md table: every synthetic model that fits this device (SpQR 3-bit and FP16 side by side)
plus a real model file if given, printed as markdown with the GPU, the date and the command.

    python -m benchmarks.bench                      # from the repo root: all synthetic shapes that fit
    python -m benchmarks.bench models/llama-7b.spqr --new-tokens 256 --gpu-memory 24GiB
"""

from __future__ import annotations

import argparse
import datetime
import shlex
import sys

import torch

from spqr_run.bench import BenchReport, BenchSettings, run_bench
from spqr_run.cli.common import run_cli
from spqr_run.devices import resolve_device
from spqr_run.engine.planner import GiB
from spqr_run.engine.synthetic import SYNTHETIC
from spqr_run.engine.traffic import MB
from spqr_run.errors import ConfigError

HEADER = (
    "| model | method | engine | bits/w | weights GiB | MB read/token | prefill tok/s | decode tok/s | ms/token "
    "| floor ms | % of floor | GB/s | TTFT ms | peak GiB | decode x | prefill x |"
)
COLUMNS = HEADER.count("|") - 1


def markdown_rows(report: BenchReport) -> list[str]:
    """One markdown row per method (+ llama.cpp when it ran beside), then the skipped ones."""
    ratios = report.ratios()
    rows = []
    for m, r in report.results.items():
        peak = "-" if r.peak_bytes is None else f"{r.peak_bytes / GiB:.2f}"
        dx = f"{ratios['decode_tok_s']:.2f}" if m == "spqr" and "decode_tok_s" in ratios else ""
        px = f"{ratios['prefill_tok_s']:.2f}" if m == "spqr" and "prefill_tok_s" in ratios else ""
        floor = "-" if r.floor_ms is None else f"{r.floor_ms:.2f}"
        pct = "-" if r.floor_pct is None else f"{r.floor_pct:.0f}%"
        rows.append(
            f"| {report.model} | {r.label}{'' if r.graphs else ' (eager)'} | {r.engine} | {r.bits_per_weight:.2f} "
            f"| {r.weight_bytes / GiB:.2f} | {r.bytes_per_token / MB:.1f} | {r.prefill_tok_s:.1f} "
            f"| {r.decode_tok_s:.2f} | {r.ms_per_token:.2f} | {floor} | {pct} | {r.gb_s:.1f} | {r.ttft_ms:.1f} "
            f"| {peak} | {dx} | {px} |"
        )
    if report.llama_cpp:
        lc = report.llama_cpp
        lx = (
            f"{ratios['llama_cpp_decode_tok_s']:.2f} (spqr/llama.cpp)"
            if "llama_cpp_decode_tok_s" in ratios
            else ""
        )
        rows.append(
            f"| {report.model} | llama.cpp {lc.get('build_commit')} | llama-bench, {lc['threads']} threads | "
            f"| {(lc.get('model_size_bytes') or 0) / GiB:.2f} | | | {lc['decode_tok_s']:.2f} "
            f"| {1e3 / lc['decode_tok_s']:.2f} | | | | | | {lx} | |"
        )
    for m, why in report.skipped.items():
        rows.append(f"| {report.model} | {m} | skipped: {why} |" + " |" * (COLUMNS - 3))
    return rows


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", nargs="?", help="a real model file to add to the table")
    p.add_argument("--only", nargs="*", choices=sorted(SYNTHETIC), help="synthetic names (default: all)")
    p.add_argument("--device", default="auto")
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--gpu-memory", default=None)
    p.add_argument("--layers", type=int, default=None, help="truncate synthetic models (smoke runs)")
    p.add_argument("--no-graphs", action="store_true")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: the cores)")
    p.add_argument("--llama-cpp", default=None, metavar="GGUF", help="llama-bench on this GGUF beside (CPU)")
    args = p.parse_args(argv)

    def body() -> int:
        device = resolve_device(args.device)
        if device.type == "cpu":
            from spqr_run.cpu import configure_threads

            configure_threads(args.threads)
        settings = BenchSettings.from_args(args)
        settings.build_llama_cpp = args.llama_cpp is not None
        gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name()
        print(f"device: {gpu}, torch {torch.__version__}, {datetime.date.today().isoformat()}")
        print(f"command: `{shlex.join(['python', '-m', 'benchmarks.bench', *sys.argv[1:]])}`")
        print(f"batch {args.batch}, prompt {args.prompt_len} tokens, {args.new_tokens} new tokens\n")
        print(HEADER)
        print("|" + "---|" * COLUMNS)
        targets: list[tuple[str | None, str | None]] = [(n, None) for n in (args.only or SYNTHETIC)]
        if args.model and args.layers is None:
            targets.append((None, args.model))
        for name, path in targets:
            try:
                report = run_bench(
                    device=device,
                    settings=settings,
                    synthetic=name,
                    model_path=path,
                    log=lambda msg: print(msg, file=sys.stderr),
                )
            except ConfigError as e:
                print(f"| {name or path} | - | skipped: {e} |" + " |" * (COLUMNS - 3), flush=True)
                continue
            print("\n".join(markdown_rows(report)), flush=True)
            notes = [report.bandwidth_line(), f"load average before/after: {report.loadavg}"]
            print("\n".join(f"<!-- {report.model}: {n} -->" for n in notes if n), flush=True)
        return 0

    run_cli(body)


def _cpu_name() -> str:
    """The CPU's model name from /proc/cpuinfo ("cpu" where it cannot be read)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "cpu"


if __name__ == "__main__":
    main()
