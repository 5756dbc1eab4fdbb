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
from spqr_run.errors import ConfigError

HEADER = (
    "| model | method | bits/w | weights GiB | prefill tok/s | decode tok/s | ms/token | TTFT ms | GB/s "
    "| peak GiB | decode x | prefill x |"
)


def markdown_rows(report: BenchReport) -> list[str]:
    ratios = report.ratios()
    rows = []
    for m, r in report.results.items():
        peak = "-" if r.peak_bytes is None else f"{r.peak_bytes / GiB:.2f}"
        dx = f"{ratios['decode_tok_s']:.2f}" if m == "spqr" and ratios else ""
        px = f"{ratios['prefill_tok_s']:.2f}" if m == "spqr" and ratios else ""
        rows.append(
            f"| {report.model} | {m}{'' if r.graphs else ' (eager)'} | {r.bits_per_weight:.2f} "
            f"| {r.weight_bytes / GiB:.2f} | {r.prefill_tok_s:.1f} | {r.decode_tok_s:.1f} "
            f"| {r.ms_per_token:.2f} | {r.ttft_ms:.1f} | {r.gb_s:.0f} | {peak} | {dx} | {px} |"
        )
    for m, why in report.skipped.items():
        rows.append(f"| {report.model} | {m} | skipped: {why} |" + " |" * 9)
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
    args = p.parse_args(argv)

    def body() -> int:
        device = resolve_device(args.device)
        settings = BenchSettings.from_args(args)
        gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
        print(f"GPU: {gpu}, torch {torch.__version__}, {datetime.date.today().isoformat()}")
        print(f"command: `{shlex.join(['python', '-m', 'benchmarks.bench', *sys.argv[1:]])}`")
        print(f"batch {args.batch}, prompt {args.prompt_len} tokens, {args.new_tokens} new tokens\n")
        print(HEADER)
        print("|" + "---|" * 12)
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
                print(f"| {name or path} | - | skipped: {e} |" + " |" * 9, flush=True)
                continue
            print("\n".join(markdown_rows(report)), flush=True)
        return 0

    run_cli(body)


if __name__ == "__main__":
    main()
