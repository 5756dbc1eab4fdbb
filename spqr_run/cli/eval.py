"""spqr-eval: perplexity of a model on a text file."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from rich.console import Console
from rich.progress import Progress
from rich.table import Table
from rich.text import Text

from spqr_run.cli.common import (
    ArgumentParser,
    add_kv_cache_flag,
    add_model_flags,
    apply_threads,
    check_dependencies,
    int_arg,
    print_warning,
    run_cli,
    wide_console,
)
from spqr_run.cli.progress import make_progress
from spqr_run.errors import ConfigError


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(
        prog="spqr-eval",
        description="Perplexity over non-overlapping windows of the first N tokens of a text file "
        "(tokenized without special tokens).",
        epilog="example (the demo model that spqr-chat prepares, on any text file you have):\n"
        "  spqr-eval models/SmolLM2-135M-Instruct.spqr --text README.md --max-tokens 20000",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_model_flags(p)
    p.add_argument("--text", required=True, help="a UTF-8 text file to score")
    p.add_argument(
        "--max-tokens", type=int_arg(2), default=None, help="score only the first N tokens (default: all)"
    )
    p.add_argument(
        "--seqlen",
        type=int_arg(2),
        default=None,
        help="window length in tokens (default 2048, or the model's context if smaller)",
    )
    add_kv_cache_flag(p)  # int8: score through the 8-bit cache, to measure what it costs
    p.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    return p


def main(argv: list[str] | None = None) -> None:
    run_cli(lambda: _main(argv))


def _main(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    check_dependencies()
    apply_threads(args)
    from spqr_run.default_model import find_model
    from spqr_run.devices import default_dtype, resolve_device
    from spqr_run.eval import perplexity
    from spqr_run.loading import build_decoder, open_model
    from spqr_run.text import read_text_file

    console = wide_console(stderr_=args.json)
    model_path = find_model(args.model)  # a path, or a bare name in the models folder
    text_path = Path(args.text)
    text = read_text_file(
        text_path, f"--text {text_path}", warn=print_warning
    )  # not UTF-8: U+FFFD, a warning
    device = resolve_device(args.device)
    source = open_model(model_path, verify_checksums=not args.skip_checksums)
    seqlen = args.seqlen or min(2048, source.config.max_position_embeddings)
    if not 2 <= seqlen <= source.config.max_position_embeddings:
        raise ConfigError(
            f"invalid --seqlen {seqlen}: must be in [2, {source.config.max_position_embeddings}] for this model"
        )
    ids = source.tokenizer.encode(text, add_bos=False, special=False)
    if args.max_tokens is not None:
        ids = ids[: args.max_tokens]
    if len(ids) < 2:
        raise ConfigError(f"--text {text_path}: fewer than 2 tokens to score")
    dtype = default_dtype(device)
    status = Console(stderr=True, highlight=False)  # progress: bars on a terminal, else plain lines
    with make_progress(*Progress.get_default_columns(), console=status, transient=True) as bar:
        task = bar.add_task(f"loading {model_path.name}", total=None)
        model = build_decoder(
            source, device=device, dtype=dtype, progress=lambda i, n: bar.update(task, completed=i, total=n)
        )
        bar.update(task, description=f"scoring {text_path.name}", completed=0, total=None)
        result = perplexity(
            model,
            ids,
            seqlen=seqlen,
            kv_cache=None if args.kv_cache == "auto" else args.kv_cache,  # auto: no cache, the same numbers
            progress=lambda i, n: bar.update(task, completed=i, total=n),
        )
    table = Table(title=Text(f"perplexity of {model_path.name}"))  # a file name: literal, not markup
    for col in ("text", "tokens scored", "windows x seqlen", "ppl", "seconds"):
        table.add_column(col)
    table.add_row(
        Text(text_path.name),
        str(result.scored_tokens),
        f"{result.windows} x {seqlen}",
        f"{result.ppl:.4f}",
        f"{result.seconds:.1f}",
    )
    console.print(table)
    if args.json:
        print(
            json.dumps(
                {
                    "model": str(args.model),
                    "text": str(text_path),
                    "device": str(device),
                    "kv_cache": args.kv_cache,
                    **result.to_dict(),
                }
            )
        )
    return 0


if __name__ == "__main__":
    main()
