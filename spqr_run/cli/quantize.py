"""spqr-quantize: a Hugging Face folder or GGUF file -> one `.spqr` file (SpQR, or the GPTQ / RTN baselines)."""

from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
from pathlib import Path

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    ProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table
from rich.text import Text
from torch import Tensor

from spqr_run.calibration import sample_from_model, windows_from_text
from spqr_run.cli.common import add_threads_flag, print_warning, run_cli
from spqr_run.cli.progress import make_progress
from spqr_run.cpu import configure_threads
from spqr_run.default_model import find_model
from spqr_run.devices import resolve_device
from spqr_run.errors import ConfigError, DiskFullError
from spqr_run.loading import open_model
from spqr_run.quant import QuantConfig
from spqr_run.quantize_model import (
    PRESETS,
    QuantizeSummary,
    check_finetune_memory,
    check_interrupted,
    quantize_model,
)


def progress_columns() -> tuple[ProgressColumn, ...]:
    """Bar columns of every long step: what, bar, done/total, elapsed, and the estimated time left."""
    return (
        TextColumn("{task.description}", markup=False),  # layer names come from the file: literal
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
    )


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="spqr-quantize",
        description="Quantize a model (Hugging Face folder or GGUF file) into one .spqr file with SpQR "
        "(or the GPTQ / round-to-nearest baselines), block by block with calibration data.",
        epilog="examples:\n"
        "  spqr-quantize ./Llama-2-7b-hf -o models/llama2-7b.spqr --calib wiki.txt\n"
        "  spqr-quantize model.gguf -o model-3bit.spqr --preset 3bit\n"
        "  spqr-quantize model.gguf -o gptq.spqr --method gptq --wbits 4 --groupsize 128",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "source", help="a Hugging Face model folder or a GGUF file, or the bare name of one in models/"
    )
    p.add_argument("-o", "--output", required=True, help="the .spqr file to write")
    p.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        default="near-lossless",
        help="start from a paper config (default: near-lossless, ~4.7 bits)",
    )
    p.add_argument(
        "--method",
        choices=["spqr", "gptq", "rtn"],
        help="spqr (default), or a baseline: gptq (fp16 group stats) or rtn",
    )
    p.add_argument("--wbits", type=int, help="bits per weight (2, 3, 4; gptq/rtn also 8)")
    p.add_argument("--groupsize", type=int, help="input columns per first-order group (beta1; spqr: 16 only)")
    p.add_argument("--stat-bits", type=int, help="bits of the quantized group scales and zeros (spqr)")
    p.add_argument("--stat-groupsize", type=int, help="output rows per second-order group (beta2; spqr)")
    p.add_argument(
        "--outlier-threshold", type=float, help="tau: smaller keeps more outliers; inf disables them"
    )
    p.add_argument("--simplified-outliers", action="store_true", help="skip the leave-one-out refit (faster)")
    p.add_argument(
        "--stat-search",
        action=argparse.BooleanOptionalAction,
        help="spqr: choose each row's quantized scale/zero codes by Hessian-weighted error (preset default)",
    )
    p.add_argument(
        "--fp-targets",
        action=argparse.BooleanOptionalAction,
        help="spqr/gptq: fit each layer to the full-precision model's outputs (asymmetric calibration)",
    )
    p.add_argument(
        "--cd-passes",
        type=int,
        help="spqr/gptq: coordinate-descent passes refining the codes after GPTQ (QuantEase; 0 = off)",
    )
    p.add_argument(
        "--finetune-steps",
        type=int,
        help="spqr: after quantizing, train the fp16 statistics, outlier values and norms against the "
        "original model on the calibration tokens for this many steps (codes and size unchanged; 0 = off; "
        "both presets: 32)",
    )
    p.add_argument(
        "--finetune-lr",
        type=float,
        help="spqr: the fine-tuning's Adam learning rate, relative to each number (default 1e-4)",
    )
    p.add_argument(
        "--percdamp",
        type=float,
        help="Hessian damping relative to its mean diagonal (default 0.01; the near-lossless preset: 0.1)",
    )
    p.add_argument("--calib", help="calibration text file (default: text sampled from the model itself)")
    p.add_argument("--nsamples", type=int, default=128, help="calibration sequences (paper: 128)")
    p.add_argument("--seqlen", type=int, default=2048, help="tokens per calibration sequence (paper: 2048)")
    p.add_argument("--seed", type=int, default=0, help="seed of the calibration sampling")
    p.add_argument("--device", default="auto", help="cpu, cuda or cuda:N (default: cuda when available)")
    add_threads_flag(p)
    p.add_argument(
        "--resume", action="store_true", help="continue an interrupted run from its last finished block"
    )
    p.add_argument("--json", action="store_true", help="print one JSON summary object as the last line")
    return p


def quant_config_from_args(args: argparse.Namespace) -> QuantConfig:
    settings = PRESETS[args.preset].to_dict()
    if args.method and args.method != "spqr":
        settings = dict(method=args.method, wbits=4, groupsize=128)
    for flag in (
        "method",
        "wbits",
        "groupsize",
        "stat_bits",
        "stat_groupsize",
        "outlier_threshold",
        "percdamp",
        "stat_search",
        "fp_targets",
        "cd_passes",
        "finetune_steps",
        "finetune_lr",
    ):
        value = getattr(args, flag)
        if value is not None:
            settings[flag] = value
    if args.simplified_outliers:
        settings["simplified_outliers"] = True
    return QuantConfig(**settings)  # type: ignore[arg-type]


def main(argv: list[str] | None = None) -> None:
    run_cli(lambda: _main(argv))


def resume_command(argv: list[str]) -> str:
    """The command line that continues this run: the same arguments with --resume."""
    return shlex.join(["spqr-quantize", *argv, *([] if "--resume" in argv else ["--resume"])])


def _main(argv: list[str] | None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        return _quantize(argv)
    except DiskFullError as e:
        e.resume = resume_command(argv)
        raise


def _quantize(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    console = Console(stderr=args.json, highlight=False)  # the summary
    status = Console(stderr=True, highlight=False)  # progress: bars on a terminal, else plain lines
    out = Path(args.output)
    if out.suffix != ".spqr":
        raise ConfigError(f"--output {out}: the file name must end in .spqr")
    if not out.parent.exists():
        raise ConfigError(f"--output {out}: folder {out.parent} does not exist")
    if args.nsamples < 1 or args.seqlen < 16:
        raise ConfigError("--nsamples must be >= 1 and --seqlen >= 16")
    qcfg = quant_config_from_args(args)
    configure_threads(args.threads, torch_work=True)
    check_interrupted(out, args.resume)  # before loading or sampling anything
    device = resolve_device(args.device)
    source = open_model(find_model(args.source))  # a path, or a bare name in the models folder
    if source.kind == "spqr":
        raise ConfigError(f"{args.source}: already a .spqr file; quantize the original model instead")
    seqlen = min(args.seqlen, source.config.max_position_embeddings)
    if qcfg.finetune_steps:  # before the calibration and the blocks: fail in a second, not after minutes
        check_finetune_memory(source.config, device, seqlen)
    with make_progress(*progress_columns(), console=status) as bar:
        if args.calib:
            desc = f"{Path(args.calib).name}: {args.nsamples} x {seqlen} tokens (seed {args.seed})"

            def calibration() -> Tensor:
                return windows_from_text(
                    Path(args.calib), source, nsamples=args.nsamples, seqlen=seqlen, seed=args.seed,
                    warn=lambda note: print_warning(note, status),
                )  # fmt: skip
        else:
            desc = f"sampled from the model: {args.nsamples} x {seqlen} tokens (seed {args.seed})"

            def calibration() -> Tensor:
                task = bar.add_task(
                    "sampling calibration text from the model", total=args.nsamples * (seqlen - 1)
                )
                return sample_from_model(
                    source, nsamples=args.nsamples, seqlen=seqlen, device=device, seed=args.seed,
                    progress=lambda i, n: bar.update(task, completed=i),
                )  # fmt: skip

        blocks = bar.add_task("quantizing blocks", total=source.config.num_layers, visible=False)
        linears_per_block = len(source.config.linear_shapes())
        layer_task = bar.add_task("  linears", total=linears_per_block, visible=False)

        started: list[int] = []

        def on_block_start(i: int, n: int) -> None:
            what = f"quantizing block {i + 1}/{n}"
            if not started:  # start the clock (and the ETA) when quantizing starts, after calibration
                started.append(i)
                bar.reset(blocks, completed=i, visible=True, description=what)
            else:
                bar.update(blocks, completed=i, description=what)
            bar.reset(layer_task, total=linears_per_block, visible=True, description="  linears")

        tune_task = bar.add_task("fine-tuning fp16 statistics", total=qcfg.finetune_steps, visible=False)

        def on_finetune_step(step: int, loss: float) -> None:
            if step == 0:
                bar.update(blocks, completed=source.config.num_layers)
                bar.update(layer_task, visible=False)
                bar.reset(tune_task, total=qcfg.finetune_steps, visible=True)
            bar.update(tune_task, completed=step + 1, description=f"fine-tuning (KL {loss:.4f})")

        summary = quantize_model(
            source, out, qcfg=qcfg, calib_tokens=calibration, calib_desc=desc, device=device,
            resume=args.resume, on_block_start=on_block_start,
            on_linear=lambda name: bar.update(layer_task, advance=1, description=f"  {name}"),
            on_finetune_step=on_finetune_step,
        )  # fmt: skip
        bar.update(blocks, completed=source.config.num_layers)
    print_summary(console, summary, qcfg)
    if args.json:
        print(json.dumps(summary.to_dict()))
    return 0


def print_summary(console: Console, s: QuantizeSummary, qcfg: QuantConfig) -> None:
    worst = sorted(s.layers, key=lambda r: -r.relative_error)[:8]
    table = Table(title="worst layers by relative error ||(W-Q)X|| / ||WX||")
    for col in ("layer", "shape", "bits", "outliers", "rel. error", "seconds"):
        table.add_column(col, justify="right" if col != "layer" else "left")
    for r in worst:
        table.add_row(
            Text(r.name),
            f"{r.out_features}x{r.in_features}",
            f"{r.avg_bits:.3f}",
            f"{r.outlier_fraction:.3%}",
            f"{r.relative_error:.4f}",
            f"{r.seconds:.1f}",
        )
    console.print(table)
    mean_err = sum(r.relative_error for r in s.layers) / len(s.layers)
    tau = "inf" if math.isinf(qcfg.outlier_threshold) else f"{qcfg.outlier_threshold:g}"
    t = Table(title=Text(f"wrote {s.path}"), show_header=False)  # paths are printed literally
    t.add_column(style="bold")
    t.add_column()
    t.add_row(
        "method",
        f"{s.method} w{qcfg.wbits} g{qcfg.groupsize}"
        + (f" stats {qcfg.stat_bits}-bit/{qcfg.stat_groupsize} tau {tau}" if s.method == "spqr" else ""),
    )
    t.add_row("avg bits / quantized weight", f"{s.avg_bits:.3f} (from the bytes stored)")
    t.add_row(
        "file bits / parameter",
        f"{s.file_bits_per_param:.3f} ({s.file_bytes / 2**20:.1f} MiB, fp16 embeddings included)",
    )
    t.add_row("outlier fraction", f"{s.outlier_fraction:.3%}")
    t.add_row("quantized parameters", f"{s.quantized_params:,} of {s.total_params:,}")
    t.add_row("mean relative error", f"{mean_err:.4f}")
    t.add_row("calibration", Text(s.calibration))
    if s.finetune:
        f = s.finetune
        t.add_row(
            "fine-tuning",
            f"{f['steps']} steps, KL to the original {f['kl_before']:.3g} -> {f['kl_after']:.3g} nats/token "
            f"({f['seconds']:.0f} s)",
        )
    calib = (
        "reused from the interrupted run" if s.calibration_seconds == 0 else f"{s.calibration_seconds:.1f} s"
    )
    t.add_row("time", f"{s.seconds:.1f} s (calibration {calib}, quantization {s.quantization_seconds:.1f} s)")
    console.print(t)


if __name__ == "__main__":
    main()
