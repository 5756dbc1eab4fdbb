"""The quality table of BENCHMARKS.md: perplexity of SmolLM2-135M quantized by RTN, GPTQ and SpQR.

Each row runs the real commands (`spqr-quantize`, then `spqr-eval`) as subprocesses and the table is printed as
markdown with the exact commands. Rows run in parallel (`--jobs`), one torch thread each.

    python benchmarks/quality.py --out-dir /tmp/quality --nsamples 32 --seqlen 512 --eval-tokens 32768 --jobs 2
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
MODEL = DATA / "SmolLM2-135M-Instruct.Q4_1.gguf"

ROWS: list[tuple[str, list[str] | None]] = [
    ("reference (GGUF dequantized, fp32)", None),
    ("RTN 4-bit g128", ["--method", "rtn", "--wbits", "4", "--groupsize", "128"]),
    ("GPTQ 4-bit g128", ["--method", "gptq", "--wbits", "4", "--groupsize", "128"]),
    ("GPTQ 3-bit g128", ["--method", "gptq", "--wbits", "3", "--groupsize", "128"]),
    ("SpQR near-lossless", ["--preset", "near-lossless"]),
    ("SpQR 3bit", ["--preset", "3bit"]),
]


def run(cmd: list[str], env: dict[str, str]) -> dict:
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if out.returncode != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def row(name: str, flags: list[str] | None, args: argparse.Namespace) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    py = sys.executable
    model = str(MODEL)
    result: dict = {"name": name, "commands": []}
    if flags is not None:
        out = Path(args.out_dir) / (
            name.lower().replace(" ", "-").replace("(", "").replace(")", "") + ".spqr"
        )
        q_cmd = [py, "-m", "spqr_run.cli.quantize", model, "-o", str(out), *flags, "--calib", str(DATA / "wiki-calib.txt"),
                 "--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen), "--device", "cpu", "--json"]  # fmt: skip
        if out.exists():
            out.unlink()
        q = run(q_cmd, env)
        result.update(avg_bits=q["avg_bits"], outliers=q["outlier_fraction"], quant_seconds=q["seconds"])
        result["commands"].append(q_cmd)
        model = str(out)
    e_cmd = [py, "-m", "spqr_run.cli.eval", model, "--text", str(DATA / "wiki-test.txt"), "--seqlen", "2048",
             "--device", "cpu", "--json"] + (["--max-tokens", str(args.eval_tokens)] if args.eval_tokens else [])  # fmt: skip
    e = run(e_cmd, env)
    result.update(ppl=e["ppl"], scored_tokens=e["scored_tokens"], eval_seconds=e["seconds"])
    result["commands"].append(e_cmd)
    print(f"done: {name}: ppl {e['ppl']:.4f}", file=sys.stderr, flush=True)
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out-dir", default="/tmp/spqr-quality")
    p.add_argument("--nsamples", type=int, default=128)
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--eval-tokens", type=int, default=0, help="score only the first N tokens (0: all)")
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--threads", type=int, default=1, help="torch threads per job")
    args = p.parse_args()
    Path(args.out_dir).mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    with ThreadPoolExecutor(args.jobs) as pool:
        results = list(pool.map(lambda r: row(r[0], r[1], args), ROWS))
    ref = results[0]["ppl"]
    machine = f"{platform.machine()} CPU, {os.cpu_count()} cores, {args.threads} thread(s) a job"
    print(f"SmolLM2-135M-Instruct, wiki-test.txt ({results[0]['scored_tokens']} tokens scored, windows of 2048); "
          f"calibration wiki-calib.txt {args.nsamples} x {args.seqlen}; {time.strftime('%Y-%m-%d')}; {machine}\n")  # fmt: skip
    print("| method | avg bits | outliers | perplexity | vs reference | quantization time |")
    print("|---|---|---|---|---|---|")
    for r in results:
        bits = f"{r['avg_bits']:.3f}" if "avg_bits" in r else "32 (fp32)"
        outl = f"{r['outliers']:.3%}" if "outliers" in r else "-"
        qt = f"{r['quant_seconds']:.0f} s" if "quant_seconds" in r else "-"
        print(f"| {r['name']} | {bits} | {outl} | {r['ppl']:.4f} | {(r['ppl'] / ref - 1):+.2%} | {qt} |")
    print("\nCommands:\n")
    for r in results:
        for cmd in r["commands"]:
            print("    " + " ".join(Path(c).name if c == sys.executable else c for c in cmd))
    print(f"\n(total {time.time() - t0:.0f} s)")
    Path(args.out_dir, "results.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
