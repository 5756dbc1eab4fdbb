"""Decode speed on 1 thread, on 2 threads with the thread governor, and on 2 threads always on the pool, with
another process keeping one core busy (`--busy`), the three settings alternated round by round; issue 21 item 5.

    python -m benchmarks.cpu_threads build/bench/nl.spqr --busy --rounds 3      # from the repo root

Each setting runs in a fresh process: the model is loaded, then `--repeats` times an 8-token prefill and
`--tokens` greedy decode steps; it prints the tok/s of each repeat and the governor's switches. "pool" pins the
governor's choice to the pool (`NativeDecoder.governor`), which is what 2 threads did before the governor.
Prints a markdown table and the medians against 1 thread.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

SETTINGS = {
    "1 thread": (1, "auto"),
    "2 threads, governor": (2, "auto"),
    "2 threads, pool always": (2, "pool"),
}


def one(model: str, threads: int, mode: str, tokens: int, repeats: int) -> dict:
    """Load `model` and time `repeats` decodes of `tokens` greedy steps (in this process)."""
    import torch

    from spqr_run.cpu import configure_threads
    from spqr_run.loading import build_decoder, open_model

    configure_threads(threads)
    m = build_decoder(open_model(model), keep_packed=False)
    if m.native is None:
        raise SystemExit("the native CPU kernels are not available")
    gov = m.native.governor
    if mode == "pool":
        gov.choose = lambda key: False  # type: ignore[method-assign]
    m.setup_caches(1, 16 + tokens)
    rates = []
    with torch.inference_mode():
        for _ in range(repeats):
            m(torch.arange(1, 9)[None])  # (1, 8) prefill
            tok, t0 = 9, time.perf_counter()
            for pos in range(8, 8 + tokens):
                logits = m(torch.tensor([[tok]]), torch.tensor([[pos]]))  # (1, 1, vocab)
                tok = int(logits[0, -1].argmax())
            rates.append(tokens / (time.perf_counter() - t0))
    return {"tok_s": rates, "switches": gov.switches}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--busy", action="store_true", help="keep one core busy with another process meanwhile")
    p.add_argument("--one", nargs=2, metavar=("THREADS", "MODE"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.one:
        print(json.dumps(one(args.model, int(args.one[0]), args.one[1], args.tokens, args.repeats)))
        return 0
    hog = subprocess.Popen(["sh", "-c", "while :; do :; done"]) if args.busy else None
    results: dict[str, list[list[float]]] = {name: [] for name in SETTINGS}
    try:
        for _ in range(args.rounds):
            for name, (threads, mode) in SETTINGS.items():
                cmd = [
                    sys.executable,
                    "-m",
                    "benchmarks.cpu_threads",
                    args.model,
                    "--one",
                    str(threads),
                    mode,
                ]
                cmd += ["--tokens", str(args.tokens), "--repeats", str(args.repeats)]
                out = subprocess.run(
                    cmd, capture_output=True, text=True, check=True, cwd=Path(__file__).parents[1]
                )
                results[name].append(json.loads(out.stdout.strip().splitlines()[-1])["tok_s"])
    finally:
        if hog is not None:
            hog.kill()
            hog.wait()
    print("| round | " + " | ".join(SETTINGS) + " |")
    print("|---" * (len(SETTINGS) + 1) + "|")
    for r in range(args.rounds):
        cells = [", ".join(f"{x:.1f}" for x in results[name][r]) for name in SETTINGS]
        print(f"| {r + 1} | " + " | ".join(cells) + " |")
    base = statistics.median(x for rates in results["1 thread"] for x in rates)
    meds = {name: statistics.median(x for rates in results[name] for x in rates) for name in SETTINGS}
    print("| median | " + " | ".join(f"{m:.1f} ({m / base:.2f}x)" for m in meds.values()) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
