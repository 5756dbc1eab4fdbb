"""Issue 21 item 7 on this machine: a LLaMA-33B-shape `.spqr` on a 24 GiB CPU box, and the LLaMA-7B-shape pair.

    python -m benchmarks.big_model big --threads 2 --tokens 16 --ctx 4096     # from the repo root
    python -m benchmarks.big_model pair --threads 1 2 --new-tokens 16 --repeats 3

`big` writes a synthetic LLaMA-33B-shape file (60 layers, hidden 6656, FFN 17920, 52 heads, vocab 32000, 4096
positions; random 3-bit codes and 0.8% outliers written straight into the format, 3.88 bits a weight:
`spqr_run.engine.synthetic_file`) to build/ once (cached by its settings), waits until the machine has
`--min-available` GiB available (others share it), then in a fresh process loads it as `spqr-run generate
--threads N --ctx 4096` does (`runtime.load_runtime`: the memory planner sizes the KV cache; `--kv-cache
auto` takes int8 when the context only fits that way), decodes `--tokens` greedy tokens past a short prompt
(`Generator`, end-of-sequence ignored so exactly that many come), and reports the process's peak resident set
(VmHWM of /proc/self/status, the whole process: Python, torch, weights, KV cache, workspace) against the
plan the runtime printed, decode speed, bytes read per token and % of the bandwidth floor (read bandwidth
sampled in this parent process before and after the child, same thread count).

`pair` runs `spqr-bench --synthetic llama-7b --device cpu` once per thread count (fresh processes): SpQR
3-bit and FP16 on the same native engine, alternated repeat by repeat when both fit the free memory, with
the read bandwidth sampled between repeats; it prints tok/s, the ratio, bytes per token and % of floor.

Both print markdown for BENCHMARKS.md and a JSON line per result (`--json-out` also writes them to a file).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
GiB = 1 << 30
MiB = 1 << 20
DEFAULT_FILE = ROOT / "build" / "llama-33b-3bit.spqr"
PROMPT = "t101 t2002 t30003 t404 t5005 t606 t7007 t808"


# ---- small helpers (standard library only, so the parent stays small) ------------------------------
def proc_status(*keys: str) -> dict[str, int]:
    """Fields of /proc/self/status in bytes (VmHWM: peak resident set; VmRSS; RssAnon; RssFile)."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            name, _, value = line.partition(":")
            if name in keys:
                out[name] = int(value.split()[0]) * 1024
    return out


def mem_available() -> int:
    """MemAvailable of /proc/meminfo in bytes."""
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise OSError("no MemAvailable in /proc/meminfo")


def loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def cpu_name() -> str:
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return "cpu"


def wait_for_memory(min_bytes: int, wait_s: float, poll_s: float = 60.0) -> tuple[bool, int]:
    """Poll MemAvailable until it reaches `min_bytes` or `wait_s` passes; (reached, last value)."""
    deadline = time.monotonic() + wait_s
    while True:
        avail = mem_available()
        if avail >= min_bytes:
            return True, avail
        if time.monotonic() >= deadline:
            return False, avail
        print(
            f"waiting: {avail / GiB:.1f} GiB available, need {min_bytes / GiB:.1f} (load {loadavg()})",
            file=sys.stderr,
            flush=True,
        )
        time.sleep(poll_s)


# ---- the child: load and decode as a user would -----------------------------------------------------
def measure(path: Path, *, threads: int, ctx: int, tokens: int, kv_cache: str) -> dict[str, Any]:
    """Load `path` with `load_runtime` (as `spqr-run generate --threads N --ctx C` does), decode `tokens`
    greedy tokens, and return the plan, the peak resident set and the speeds (bytes, seconds)."""
    from spqr_run.cpu import configure_threads

    configure_threads(threads)
    baseline = proc_status("VmHWM", "VmRSS")  # Python + torch + spqr_run imported, nothing loaded
    from spqr_run.chat.info import kernels_used
    from spqr_run.engine.traffic import decode_context, decode_traffic
    from spqr_run.runtime import load_runtime
    from spqr_run.sampling import SamplingParams

    t0 = time.perf_counter()
    rt = load_runtime(path, device="cpu", ctx=ctx, kv_cache=kv_cache)
    load_s = time.perf_counter() - t0
    after_load = proc_status("VmHWM", "VmRSS", "RssAnon", "RssFile")
    plan = rt.plan
    print("\n".join(plan.lines()), file=sys.stderr, flush=True)
    ids = rt.tokenizer.encode(PROMPT)
    params = SamplingParams(max_tokens=tokens, temperature=0, ignore_eos=True)
    result = rt.generator().generate(ids, params)
    end = proc_status("VmHWM", "VmRSS", "RssAnon", "RssFile")
    stats = result.stats
    traffic = decode_traffic(rt.model, context=decode_context(len(ids), tokens - 1))
    return {
        "file": str(path),
        "file_bytes": path.stat().st_size,
        "threads": threads,
        "engine": kernels_used(rt.model),
        "ctx": ctx,
        "max_context": rt.max_context,
        "kv_cache_flag": kv_cache,
        "kv_dtype": plan.kv_dtype,
        "kv_note": plan.kv_note,
        "kv_cache_kind": rt.model.caches[0].kind,
        "plan_lines": plan.lines(),
        "plan": {
            "weights": plan.weights,
            "workspace": plan.workspace.total,
            "margin": plan.margin,
            "kv_cache": plan.kv_bytes,
            "transient": plan.transient,
            "total": plan.total,
            "peak": plan.peak,
            "budget": plan.budget,
        },
        "rss": {"baseline": baseline, "after_load": after_load, "end": end},
        "peak_rss": end["VmHWM"],
        "peak_rss_over_plan": end["VmHWM"] / plan.peak,
        "load_s": load_s,
        "prompt_tokens": stats.prompt_tokens,
        "completion_tokens": stats.completion_tokens,
        "finish_reason": result.finish_reason,
        "prefill_s": stats.prefill_s,
        "ttft_s": stats.ttft_s,
        "decode_s": stats.decode_s,
        "decode_tok_s": stats.decode_tok_s,
        "bytes_per_token": traffic.total,
        "traffic": traffic.__dict__,
        "text": result.text[:200],
    }


# ---- the parent ---------------------------------------------------------------------------------------
def _bandwidth(threads: int, samples: int) -> list[float]:
    from spqr_run.engine.traffic import ReadBandwidth

    bw = ReadBandwidth(threads)
    try:
        return [bw.sample() for _ in range(samples)]
    finally:
        bw.close()


def run_big(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Write (cached), wait for memory, then per thread count a fresh process measures (see module doc)."""
    from spqr_run.engine.synthetic_file import cached_synthetic_spqr, synthetic_file_config

    cfg = synthetic_file_config(args.model, max_positions=args.ctx)
    t0 = time.perf_counter()
    path, written = cached_synthetic_spqr(args.file, cfg, log=lambda m: print(m, file=sys.stderr, flush=True))
    write_s = time.perf_counter() - t0
    results = []
    for threads in args.threads:
        ok, avail = wait_for_memory(int(args.min_available * GiB), args.wait_minutes * 60)
        if not ok:
            results.append(
                {"threads": threads, "skipped": f"only {avail / GiB:.1f} GiB available after waiting"}
            )
            continue
        before = {"loadavg": loadavg(), "available": avail, "bandwidth": _bandwidth(threads, 3)}
        cmd = [sys.executable, "-m", "benchmarks.big_model", "measure", str(path)]
        cmd += ["--threads", str(threads), "--ctx", str(args.ctx), "--tokens", str(args.tokens)]
        cmd += ["--kv-cache", args.kv_cache]
        print(f"$ {shlex.join(cmd)}", file=sys.stderr, flush=True)
        proc = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.PIPE, text=True)
        after = {"loadavg": loadavg(), "bandwidth": _bandwidth(threads, 3)}
        if proc.returncode != 0:
            results.append({"threads": threads, "failed": proc.returncode})
            continue
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        samples = before["bandwidth"] + after["bandwidth"]
        gb_s = sorted(samples)[len(samples) // 2]
        ms = 1e3 / r["decode_tok_s"]
        floor_ms = r["bytes_per_token"] / (gb_s * 1e9) * 1e3
        r |= {
            "command": shlex.join(cmd),
            "written_now": written,
            "write_s": write_s if written else None,
            "loadavg_before": before["loadavg"],
            "loadavg_after": after["loadavg"],
            "available_before": before["available"],
            "bandwidth_samples": samples,
            "bandwidth_gb_s": gb_s,
            "ms_per_token": ms,
            "floor_ms": floor_ms,
            "floor_pct": floor_ms / ms * 100,
        }
        results.append(r)
    return results


def big_markdown(results: list[dict[str, Any]]) -> list[str]:
    lines = [
        "| threads | KV cache | context | load s | decode tok/s | ms/token | MB read/token | floor ms | % of floor "
        "| peak RSS GiB | plan GiB (peak) | RSS / plan | load average before / after |",
        "|" + "---|" * 13,
    ]
    for r in results:
        if "skipped" in r or "failed" in r:
            lines.append(
                f"| {r['threads']} | {r.get('skipped') or 'failed: exit ' + str(r['failed'])} |" + " |" * 11
            )
            continue
        lines.append(
            f"| {r['threads']} | {r['kv_dtype']} | {r['max_context']} | {r['load_s']:.0f} | {r['decode_tok_s']:.3f} "
            f"| {r['ms_per_token']:.0f} | {r['bytes_per_token'] / 1e6:.0f} | {r['floor_ms']:.0f} "
            f"| {r['floor_pct']:.0f}% | {r['peak_rss'] / GiB:.2f} | {r['plan']['peak'] / GiB:.2f} "
            f"| {r['peak_rss_over_plan']:.3f} | {r['loadavg_before']} / {r['loadavg_after']} |"
        )
    return lines


def run_pair(args: argparse.Namespace) -> list[dict[str, Any]]:
    """`spqr-bench --synthetic llama-7b` once per thread count, each in a fresh process."""
    results = []
    for threads in args.threads:
        cmd = [sys.executable, "-m", "spqr_run.cli.bench", "--synthetic", args.model, "--device", "cpu"]
        cmd += ["--threads", str(threads), "--prompt-len", str(args.prompt_len)]
        cmd += ["--new-tokens", str(args.new_tokens), "--repeats", str(args.repeats), "--json"]
        if args.memory is not None:  # the planner's budget instead of the free memory minus 512 MiB
            cmd += ["--gpu-memory", args.memory]
        print(f"$ {shlex.join(cmd)}", file=sys.stderr, flush=True)
        proc = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.PIPE, text=True)
        if proc.returncode != 0:
            results.append({"threads": threads, "failed": proc.returncode, "command": shlex.join(cmd)})
            continue
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        r["command"] = shlex.join(["spqr-bench", *cmd[3:]])
        results.append(r)
    return results


def pair_markdown(results: list[dict[str, Any]]) -> list[str]:
    lines = [
        "| threads | row | decode tok/s | ms/token | MB read/token | GB/s | floor ms | % of floor | SpQR / FP16 "
        "| CPU share | read GB/s (median, samples) | alternated | load average before / after |",
        "|" + "---|" * 13,
    ]
    for r in results:
        if "failed" in r:
            lines.append(f"| {r['threads']} | failed: exit {r['failed']} |" + " |" * 11)
            continue
        bw = r["bandwidth"]
        samples = ", ".join(f"{x:.1f}" for x in bw["samples"])
        for m in ("spqr", "fp16"):
            if m not in r:
                lines.append(f"| {r['threads']} | {m} skipped: {r['skipped'].get(m)} |" + " |" * 11)
                continue
            x = r[m]
            ratio = (
                f"**{r['ratios']['decode_tok_s']:.2f}x**"
                if m == "spqr" and "decode_tok_s" in r["ratios"]
                else ""
            )
            label = "SpQR 3-bit" if m == "spqr" else x["dtype"].upper()
            lines.append(
                f"| {r['threads']} | {label} | {x['decode_tok_s']:.3f} | {x['ms_per_token']:.0f} "
                f"| {x['bytes_per_token'] / 1e6:.0f} | {x['gb_s']:.1f} | {x['floor_ms']:.0f} | {x['floor_pct']:.0f}% "
                f"| {ratio} | {x['cpu_share']:.2f} | {bw['gb_s']:.1f} ({samples}) | {'yes' if r['alternated'] else 'no'} "
                f"| {r['loadavg']['before']} / {r['loadavg']['after']} |"
            )
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    big = sub.add_parser(
        "big", help="the LLaMA-33B-shape file: write (cached), load, decode, peak RSS vs plan"
    )
    big.add_argument("--model", default="llama-30b", help="synthetic shape (default: llama-30b, LLaMA's 33B)")
    big.add_argument("--file", type=Path, default=DEFAULT_FILE)
    big.add_argument("--threads", type=int, nargs="+", default=[2])
    big.add_argument("--ctx", type=int, default=4096, help="KV cache tokens (also the file's positions)")
    big.add_argument("--tokens", type=int, default=16, help="tokens to decode")
    big.add_argument("--kv-cache", default="auto", choices=["auto", "int8"])
    big.add_argument("--min-available", type=float, default=21.0, help="GiB available before starting")
    big.add_argument("--wait-minutes", type=float, default=60.0)
    big.add_argument("--json-out", type=Path, default=None)
    one = sub.add_parser("measure", help="(the child process of `big`) load FILE and decode")
    one.add_argument("file", type=Path)
    one.add_argument("--threads", type=int, required=True)
    one.add_argument("--ctx", type=int, required=True)
    one.add_argument("--tokens", type=int, required=True)
    one.add_argument("--kv-cache", default="auto")
    pair = sub.add_parser(
        "pair", help="SpQR 3-bit vs FP16 on the native engine, per thread count (spqr-bench)"
    )
    pair.add_argument("--model", default="llama-7b")
    pair.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    pair.add_argument("--prompt-len", type=int, default=32)
    pair.add_argument("--new-tokens", type=int, default=16)
    pair.add_argument("--repeats", type=int, default=3)
    pair.add_argument("--memory", default=None, help="spqr-bench's memory budget (--gpu-memory), e.g. 14GiB")
    pair.add_argument("--json-out", type=Path, default=None)
    args = p.parse_args(argv)
    if args.command == "measure":
        r = measure(args.file, threads=args.threads, ctx=args.ctx, tokens=args.tokens, kv_cache=args.kv_cache)
        print(json.dumps(r), flush=True)
        return 0
    print(f"{cpu_name()}, {os.cpu_count()} cores, {mem_available() / GiB:.1f} GiB available, "
          f"{datetime.datetime.now().isoformat(timespec='minutes')}, load average {loadavg()}")  # fmt: skip
    print(f"command: `{shlex.join(['python', '-m', 'benchmarks.big_model', *(argv or sys.argv[1:])])}`\n")
    results = run_big(args) if args.command == "big" else run_pair(args)
    print("\n".join(big_markdown(results) if args.command == "big" else pair_markdown(results)))
    for r in results:
        print(json.dumps(r))
    if args.json_out is not None:
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        args.json_out.write_text("".join(json.dumps(r) + "\n" for r in results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
