"""spqr-run: one-shot commands (`spqr-run generate MODEL --prompt ...`, `spqr-run kernels build|show`)."""

from __future__ import annotations

import argparse
import sys

from rich.console import Console
from rich.progress import Progress

from spqr_run.cli import kernels
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
    print_warning,
    run_cli,
    text_arg,
)
from spqr_run.cli.progress import make_progress

DEFAULT_MAX_TOKENS = 128


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="spqr-run", description="One-shot commands of spqr-run.")
    sub = p.add_subparsers(dest="command", required=True)
    g = sub.add_parser(
        "generate",
        help="stream a continuation (or a chat reply with --chat) of a prompt",
        description="Stream a continuation of --prompt, or with --chat the assistant's reply to it.",
        epilog='example: spqr-run generate model.gguf --chat --prompt "Name three rivers." --temperature 0',
    )
    add_model_flags(g)
    g.add_argument(
        "--prompt",
        type=text_arg("--prompt"),
        required=True,
        help="the prompt text ('-' reads standard input)",
    )
    g.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    g.add_argument("--system", type=text_arg("--system"), default=None, help="system prompt (with --chat)")
    g.add_argument(
        "--max-tokens",
        type=int_arg(1),
        default=None,
        help=f"length limit in tokens (default: {DEFAULT_MAX_TOKENS})",
    )
    add_sampling_flags(g)
    g.add_argument(
        "--json-schema",
        metavar="FILE",
        default=None,
        help="constrain the output to JSON valid under the JSON schema in FILE ('json': any JSON object)",
    )
    add_memory_flags(g)
    g.add_argument("--stats", action="store_true", help="print timings to standard error")
    kernels.add_parser(sub)
    return p


def main(argv: list[str] | None = None) -> None:
    def run() -> int:
        args = build_parser().parse_args(argv)
        return kernels.run(args) if args.command == "kernels" else _generate(args)

    run_cli(run)


def _generate(args: argparse.Namespace) -> int:
    check_dependencies()
    apply_threads(args)
    from spqr_run.default_model import find_model
    from spqr_run.runtime import load_runtime
    from spqr_run.sampling import resolve_sampling
    from spqr_run.structured import GrammarEngine, read_schema
    from spqr_run.text import decode_text

    err = Console(stderr=True, highlight=False)
    model = find_model(args.model)  # a path, or a bare name in the models folder (one line when neither)
    if args.prompt == "-":  # standard input as bytes: what is not UTF-8 becomes U+FFFD, with a warning
        prompt = decode_text(sys.stdin.buffer.read(), "--prompt - (standard input)", print_warning)
    else:
        prompt = args.prompt
    schema = (
        read_schema(args.json_schema, warn=print_warning) if args.json_schema else None
    )  # a bad file fails before loading
    memory = memory_budget(args)  # a malformed --gpu-memory too
    with make_progress(*Progress.get_default_columns(), console=err, transient=True) as bar:
        task = bar.add_task(f"loading {model.name}", total=None)
        rt = load_runtime(
            model,
            progress=lambda done, total: bar.update(task, completed=done, total=total),
            device=args.device,
            ctx=args.ctx,
            memory=memory,
            kv_cache=args.kv_cache,
            verify_checksums=not args.skip_checksums,
        )
    flags = {name: getattr(args, name) for name in SAMPLING_FLAGS}  # flags > the model's > global defaults
    max_tokens = args.max_tokens if args.max_tokens is not None else DEFAULT_MAX_TOKENS
    params = resolve_sampling(flags, rt.source.generation_defaults, max_tokens=max_tokens)
    if args.chat:
        messages = ([{"role": "system", "content": args.system}] if args.system else []) + [
            {"role": "user", "content": prompt}
        ]
        ids = rt.chat_template.encode(messages, rt.tokenizer, add_bos=False)  # content stays text
    else:
        ids = rt.tokenizer.encode(prompt)
    constraint = None
    if schema is not None:
        constraint = GrammarEngine(rt.tokenizer).compile_json_schema(schema[0], what=schema[1])
    last = None
    for chunk in rt.generator().stream(ids, params, constraint=constraint):
        sys.stdout.write(chunk.text)
        sys.stdout.flush()
        last = chunk
    sys.stdout.write("\n")
    sys.stdout.flush()
    if args.stats and last is not None and last.stats is not None:
        s = last.stats
        err.print(
            f"[dim]{s.prompt_tokens} prompt + {s.completion_tokens} tokens, ttft {s.ttft_s * 1000:.0f} ms, "
            f"prefill {s.prefill_tok_s:.1f} tok/s, decode {s.decode_tok_s:.1f} tok/s ({last.finish_reason})[/]"
        )
    return 0


if __name__ == "__main__":
    main()
