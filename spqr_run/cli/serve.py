"""spqr-serve: serve a model to OpenAI clients (/v1/completions, /v1/chat/completions) over HTTP."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from spqr_run.cli.common import (
    CORE_MODULES,
    SERVER_MODULES,
    ArgumentParser,
    LiteralLogArgs,
    add_memory_flags,
    add_model_flags,
    apply_threads,
    check_dependencies,
    float_arg,
    int_arg,
    memory_budget,
    print_error,
    run_cli,
    text_arg,
)

DESCRIPTION = """\
Serve a model over HTTP with OpenAI's API, so any OpenAI client can use it:

  spqr-serve models/llama-7b.spqr --port 8000
  curl localhost:8000/v1/chat/completions -H 'Content-Type: application/json' \\
       -d '{"messages": [{"role": "user", "content": "Hello"}]}'

Endpoints: POST /v1/completions, POST /v1/chat/completions, GET /v1/models, POST /tokenize,
POST /detokenize, GET /tokenizer_info, GET /health, GET /metrics (Prometheus text).

Ready: the socket opens once Python has started (a few seconds) and the model then loads in the background;
GET /health answers 503 (code "model_loading") until it is loaded, then 200 {"status": "ok"}, and the log
says "ready: model ... loaded". To wait for it in a script:

  curl -s --retry 120 --retry-delay 1 --retry-connrefused localhost:8000/health

Up to --parallel sequences generate together
(continuous batching; each holds one KV-cache row of --ctx tokens, sized to fit --gpu-memory); more requests
wait in a queue and get 429 when it is full. Greedy output (temperature 0) is the same whether a request runs alone or batched.
"""


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(
        prog="spqr-serve", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_model_flags(p)
    p.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, local only)"
    )
    p.add_argument(
        "--port", type=int_arg(0, 65535), default=8000, help="TCP port; 0 = any free port (default: 8000)"
    )
    p.add_argument(
        "--api-key",
        default=os.environ.get("SPQR_API_KEY"),
        help="require 'Authorization: Bearer KEY' on the API routes (default: $SPQR_API_KEY, else no key)",
    )
    p.add_argument(
        "--parallel",
        type=int_arg(1),
        default=4,
        help="sequences generated at once (KV-cache rows, default: 4)",
    )
    add_memory_flags(p, per_sequence=True)
    p.add_argument(
        "--model-name",
        type=text_arg("--model-name"),
        default=None,
        help="the model id clients send and see (default: file name stem)",
    )
    p.add_argument(
        "--log-level",
        default="info",
        choices=["debug", "info", "warning", "error"],
        help="how much the server logs: debug, info (startup, and one access line per request), warning "
        "or error (default: info)",
    )
    # hidden: tuning and test hooks
    p.add_argument("--max-queue", type=int_arg(0), default=64, help=argparse.SUPPRESS)
    p.add_argument("--no-prefix-reuse", action="store_true", help=argparse.SUPPRESS)  # benchmarks compare
    p.add_argument("--max-body-bytes", type=int_arg(1024), default=4 * 1024 * 1024, help=argparse.SUPPRESS)
    p.add_argument("--load-delay", type=float_arg(0), default=0.0, help=argparse.SUPPRESS)
    return p


def _serve(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)  # numeric flags are checked here, before anything loads
    check_dependencies((*CORE_MODULES, *SERVER_MODULES))
    apply_threads(args)
    import uvicorn

    from spqr_run.default_model import find_model
    from spqr_run.server.app import ServerConfig, create_app

    path = find_model(args.model)  # a path, or a bare name in the models folder (one line when neither)
    config = ServerConfig(
        model_path=str(path),
        model_name=args.model_name or path.stem,
        device=args.device,
        ctx=args.ctx,
        memory=memory_budget(args),
        kv_cache=args.kv_cache,
        parallel=args.parallel,
        max_queue=args.max_queue,
        prefix_reuse=not args.no_prefix_reuse,
        api_key=args.api_key or None,
        max_body_bytes=args.max_body_bytes,
        load_delay_s=args.load_delay,
        verify_checksums=not args.skip_checksums,
    )
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    failure: list[str] = []

    def on_load_failed(message: str) -> None:
        failure.append(message)
        server.should_exit = True

    app = create_app(config, on_load_failed=on_load_failed)
    server = uvicorn.Server(
        uvicorn.Config(
            app, host=args.host, port=args.port, log_level=args.log_level, timeout_graceful_shutdown=5
        )
    )
    literal_logs()  # after uvicorn.Config, which installs uvicorn's own handlers
    server.run()
    if failure:
        print_error(failure[0])
        return 2
    return 0 if server.started else 1


def literal_logs() -> None:
    """Log lines print their arguments (model names, paths, request data) literally: control characters in
    them are shown as escapes on every handler of the root and uvicorn loggers (`LiteralLogArgs`)."""
    names = ("", "uvicorn", "uvicorn.error", "uvicorn.access", "spqr_run")
    for handler in {h for name in names for h in logging.getLogger(name).handlers}:
        if not any(isinstance(f, LiteralLogArgs) for f in handler.filters):
            handler.addFilter(LiteralLogArgs())


def main(argv: list[str] | None = None) -> None:
    run_cli(lambda: _serve(argv if argv is not None else sys.argv[1:]))


if __name__ == "__main__":
    main()
