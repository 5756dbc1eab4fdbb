"""Serving benchmark: throughput and latency percentiles of spqr-serve for 1, 4 and 8 concurrent clients.

Each client sends streamed /v1/completions requests back to back (temperature 0, fixed prompts) and records the
time to first token (TTFT) and the time per output token after the first (TPOT). Prints a markdown table.
`--shared-prefix N` puts the same N-sentence document before every prompt (a long system prompt, a RAG context);
with `--model`, `--compare-reuse` runs everything twice, with and without prefix reuse, on the same settings.

`--targets` (with `--model`) measures issue 21's serving targets in one run, side by side: a lone request's time
per output token on the server against `spqr-run generate --stats` on the same model, prompt and `--threads`
(target: at most 1.2x), and the total tok/s of 4 concurrent clients against 1 (target: at least 2.5x). The
configurations alternate for `--repeats` rounds; it prints each round, the medians, the ratios and the load
average, and the model's own decode step with 4 rows against 1 (in this process, before the server starts): what
batching can gain in the model itself. Server requests ban the end-of-text token (logit_bias), so each makes
exactly `--max-tokens`.

    python benchmarks/serve.py --model /path/to/model.gguf --parallel 8      # starts its own server
    python benchmarks/serve.py --url http://127.0.0.1:8000 --api-key KEY      # against a running server
    python benchmarks/serve.py --model m.gguf --shared-prefix 40 --compare-reuse --clients 1,4
    python benchmarks/serve.py --model m.spqr --targets --parallel 4 --threads 2 --max-tokens 64
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx

PROMPTS = [
    "Write a short story about a lighthouse keeper.",
    "Explain how a bicycle works.",
    "Describe the water cycle in detail.",
    "List some facts about the Moon.",
    "Tell me about the history of bread.",
    "How do birds navigate when they migrate?",
    "What makes a good cup of tea?",
    "Describe a walk through a forest in autumn.",
]


@dataclass
class Sample:
    ttft_s: float
    tpot_s: float | None  # None when only one token came back
    tokens: int


def one_request(
    client: httpx.Client,
    url: str,
    prompt: str,
    max_tokens: int,
    headers: dict[str, str],
    extra: dict | None = None,
) -> Sample:
    """One streamed greedy completion; `extra` is merged into the request body."""
    body = {
        "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
        "stream_options": {"include_usage": True}, **(extra or {}),
    }  # fmt: skip
    t0 = time.perf_counter()
    first = last = None
    tokens = 0
    with client.stream("POST", f"{url}/v1/completions", json=body, headers=headers, timeout=600) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if event.get("usage"):
                tokens = event["usage"]["completion_tokens"]
            if event.get("choices"):
                now = time.perf_counter()
                first = first or now
                last = now
    assert first is not None and last is not None
    tpot = (last - first) / (tokens - 1) if tokens > 1 else None
    return Sample(first - t0, tpot, tokens)


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    if not xs:
        return float("nan")
    k = (len(xs) - 1) * q / 100
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


DOCUMENT_SENTENCE = (
    "The harbour town kept its records in a stone house by the water, and every ship was logged. "
)


def run_level(
    url: str,
    clients: int,
    requests: int,
    max_tokens: int,
    headers: dict[str, str],
    prefix: str = "",
    extra: dict | None = None,
) -> dict:
    """`clients` concurrent clients, each sending `requests` requests back to back: total tok/s over the wall
    time, TTFT and TPOT percentiles (ms)."""

    def client_loop(c: int) -> list[Sample]:
        with httpx.Client() as http:
            return [
                one_request(http, url, prefix + PROMPTS[(c + i) % len(PROMPTS)], max_tokens, headers, extra)
                for i in range(requests)
            ]

    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        samples = [s for ss in pool.map(client_loop, range(clients)) for s in ss]
    wall = time.perf_counter() - t0
    ttft = [s.ttft_s * 1000 for s in samples]
    tpot = [s.tpot_s * 1000 for s in samples if s.tpot_s is not None]
    return {
        "clients": clients,
        "requests": len(samples),
        "tokens": sum(s.tokens for s in samples),
        "tok_s": sum(s.tokens for s in samples) / wall,
        "ttft": [percentile(ttft, q) for q in (50, 90, 99)],
        "tpot": [percentile(tpot, q) for q in (50, 90, 99)],
        "mean_tpot": statistics.mean(tpot) if tpot else float("nan"),
    }


def no_eos_bias(url: str, headers: dict[str, str]) -> dict:
    """A `logit_bias` body field banning the tokenizer's end-of-text token ({} when it has none)."""
    eos = httpx.get(f"{url}/tokenizer_info", headers=headers, timeout=30).json().get("eos_token")
    if not eos:
        return {}
    r = httpx.post(f"{url}/tokenize", json={"prompt": eos}, headers=headers, timeout=30).json()
    return {"logit_bias": {str(i): -100 for i in r["tokens"]}} if r["count"] == 1 else {}


GENERATE_PROMPT = "Once upon a time, in a small village by the sea,"  # SmolLM2 runs on past 64 tokens
GENERATE_STATS = re.compile(r"(\d+) prompt \+ (\d+) tokens.*decode ([\d.]+) tok/s")


def generate_ms_per_token(model: str, prompt: str, max_tokens: int, ctx: int, threads: list[str]) -> float:
    """Greedy `spqr-run generate --stats` in a fresh process: its decode time per token (ms). Refuses a prompt
    the model ends early (generate cannot ban the end-of-text token)."""
    cmd = [sys.executable, "-m", "spqr_run.cli.run", "generate", model, "--prompt", prompt, "--max-tokens",
           str(max_tokens), "--temperature", "0", "--ctx", str(ctx), "--stats", *threads]  # fmt: skip
    repo = Path(__file__).resolve().parents[1]
    r = subprocess.run(cmd, cwd=repo, capture_output=True, text=True, check=True)
    m = GENERATE_STATS.search(" ".join(r.stderr.split()))
    if m is None:
        raise SystemExit(f"no --stats line from spqr-run generate:\n{r.stderr[-2000:]}")
    if int(m.group(2)) != max_tokens:
        raise SystemExit(
            f"spqr-run generate stopped after {m.group(2)} of {max_tokens} tokens: pick another prompt"
        )
    return 1000 / float(m.group(3))


def step_cost(
    model: str, threads: int | None, ctx: int, rounds: int = 6, steps: int = 32
) -> tuple[float, float]:
    """Median ms of one decode step of the model alone (in this process, `threads` threads) with 1 row and
    with 4 rows, alternating, at positions 32-63 of a prefilled cache: batching 4 requests gains 4 x the 1-row
    step / the 4-row step in the model itself."""
    import torch

    from spqr_run.cpu import configure_threads
    from spqr_run.loading import build_decoder, open_model

    configure_threads(threads)
    m = build_decoder(open_model(model))
    m.setup_caches(4, min(ctx, 256))
    gen = torch.Generator().manual_seed(0)
    times: dict[int, list[float]] = {1: [], 4: []}
    with torch.inference_mode():
        m(torch.randint(0, 1000, (4, 32), generator=gen), rows=torch.arange(4))  # (4, 32) prompt per row
        for r in range(rounds):
            for b in (1, 4) if r % 2 == 0 else (4, 1):
                tokens = torch.randint(0, 1000, (b, 1), generator=gen)  # (B, 1)
                t0 = time.perf_counter()
                for pos in range(32, 32 + steps):
                    m(tokens, torch.full((b, 1), pos), rows=torch.arange(b))
                times[b].append((time.perf_counter() - t0) / steps * 1000)
    return statistics.median(times[1]), statistics.median(times[4])


def loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "n/a"


def run_targets(args: argparse.Namespace, threads: list[str]) -> None:
    """Issue 21 item 8: lone request vs `spqr-run generate` per token, 4 concurrent clients vs 1 in total tok/s.
    The three measurements alternate order every round; medians and their ratios at the end."""
    step1, step4 = step_cost(args.model, args.threads, args.ctx)
    proc, url = start_server(args.model, args.parallel, args.ctx, *threads)
    rounds: list[tuple[float, float, float, float]] = []
    try:
        extra = no_eos_bias(url, {})
        one_request(httpx.Client(), url, "Warm up.", 4, {}, extra)
        print(f"--parallel {args.parallel}, {' '.join(threads) or 'default threads'}, {args.max_tokens} tokens, "
              f"greedy, {args.requests} requests per client, {os.cpu_count()} CPUs, "
              f"load average {loadavg()} at the start\n")  # fmt: skip
        print("| round | generate ms/token | server, 1 client: TPOT p50 ms | tok/s | 4 clients: tok/s |")
        print("|---:|---:|---:|---:|---:|")
        for i in range(args.repeats):
            steps = ["generate", "one", "four"]
            got: dict[str, object] = {}
            for step in steps if i % 2 == 0 else steps[::-1]:
                if step == "generate":
                    got[step] = generate_ms_per_token(
                        args.model, GENERATE_PROMPT, args.max_tokens, args.ctx, threads
                    )
                else:
                    n = 1 if step == "one" else 4
                    got[step] = run_level(url, n, args.requests, args.max_tokens, {}, extra=extra)
            gen, one, four = got["generate"], got["one"], got["four"]
            assert isinstance(gen, float) and isinstance(one, dict) and isinstance(four, dict)
            rounds.append((gen, one["tpot"][0], one["tok_s"], four["tok_s"]))
            print(f"| {i + 1} | {gen:.1f} | {one['tpot'][0]:.1f} | {one['tok_s']:.1f} | {four['tok_s']:.1f} |",
                  flush=True)  # fmt: skip
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    gen, tpot, one, four = (statistics.median(col) for col in zip(*rounds, strict=True))
    print(f"| median | {gen:.1f} | {tpot:.1f} | {one:.1f} | {four:.1f} |\n")
    print(f"lone request on the server / spqr-run generate, per token: {tpot / gen:.2f}x (target <= 1.2x)")
    print(f"4 concurrent clients / 1, total tok/s: {four / one:.2f}x (target >= 2.5x)")
    print(f"the model's decode step alone, in-process: {step1:.1f} ms with 1 row, {step4:.1f} ms with 4 rows "
          f"({step4 / step1:.2f}x): 4 rows per step give the model {4 * step1 / step4:.2f}x the tok/s of one "
          "(the server's gain also counts prefill and per-request costs)")  # fmt: skip
    print(f"load average at the end: {loadavg()}")


def start_server(model: str, parallel: int, ctx: int, *extra: str) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": f"{repo}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    cmd = [sys.executable, "-m", "spqr_run.cli.serve", model, "--port", str(port), "--parallel", str(parallel),
           "--ctx", str(ctx), "--log-level", "warning", *extra]  # fmt: skip
    proc = subprocess.Popen(cmd, env=env, cwd=repo)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    proc.kill()
    raise SystemExit("server did not become ready in 180 s")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--url", help="a running server")
    where.add_argument("--model", help="start a server on this model for the run")
    p.add_argument("--parallel", type=int, default=8, help="--parallel of the started server (default 8)")
    p.add_argument("--ctx", type=int, default=1024, help="--ctx of the started server (default 1024)")
    p.add_argument("--api-key", default=None)
    p.add_argument("--clients", default="1,4,8", help="concurrency levels (default 1,4,8)")
    p.add_argument("--requests", type=int, default=4, help="requests per client (default 4)")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--shared-prefix", type=int, default=0, help="sentences of a document before every prompt")
    p.add_argument("--compare-reuse", action="store_true", help="with --model: also run without prefix reuse")
    p.add_argument("--threads", type=int, default=None, help="--threads of the started server (and generate)")
    p.add_argument(
        "--targets",
        action="store_true",
        help="with --model: lone request vs spqr-run generate, and 4 clients vs 1, alternating (see above)",
    )
    p.add_argument("--repeats", type=int, default=5, help="rounds of --targets (default 5)")
    args = p.parse_args()
    if (args.compare_reuse or args.targets) and not args.model:
        p.error("--compare-reuse and --targets need --model (they start the servers)")
    threads = ["--threads", str(args.threads)] if args.threads else []
    if args.targets:
        run_targets(args, threads)
        return
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    prefix = DOCUMENT_SENTENCE * args.shared_prefix
    variants = [("prefix reuse", ())] + ([("no reuse", ("--no-prefix-reuse",))] if args.compare_reuse else [])
    print(f"max_tokens={args.max_tokens}, {args.requests} requests per client, temperature 0, streamed, "
          f"shared prefix of {args.shared_prefix} sentences\n")  # fmt: skip
    print(
        "| server | clients | requests | tokens | tok/s | TTFT p50 / p90 / p99 (ms) | TPOT p50 / p90 / p99 (ms) |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, extra in variants:
        proc, url = (
            (None, args.url)
            if not args.model
            else start_server(args.model, args.parallel, args.ctx, *extra, *threads)
        )
        try:
            one_request(httpx.Client(), url, "Warm up.", 4, headers)
            for c in args.clients.split(","):
                r = run_level(url, int(c), args.requests, args.max_tokens, headers, prefix)
                ttft = " / ".join(f"{x:.0f}" for x in r["ttft"])
                tpot = " / ".join(f"{x:.1f}" for x in r["tpot"])
                print(
                    f"| {name} | {r['clients']} | {r['requests']} | {r['tokens']} | {r['tok_s']:.1f} | {ttft} "
                    f"| {tpot} |",
                    flush=True,
                )
        finally:
            if proc is not None:
                proc.terminate()
                proc.wait(timeout=30)


if __name__ == "__main__":
    main()
