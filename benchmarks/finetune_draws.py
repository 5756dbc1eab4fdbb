"""Fine-tuning (issue 24 item 1) measured over calibration draws, from `benchmarks/quality.py`'s files.

`spqr-quantize --finetune-steps N` quantizes and then fine-tunes (`spqr_run.finetune.finetune`). To measure the
fine-tuning alone, and without quantizing every draw again, this script takes the files `quality.py` wrote for a
row (`KEY-dS.spqr`, calibration seed S) and runs the same function on them with the same calibration windows
(`--calib`, `--nsamples`, `--seqlen`, seed S: `spqr_run.calibration.windows_from_text`, as spqr-quantize does),
writing `KEY-ftN-dS.spqr` beside them. It then scores both with `spqr-eval` on quality.py's texts and prints,
per draw and text, the loss against the reference before and after (reusing quality.py's evaluations).

    python benchmarks/finetune_draws.py --out-dir build/q24 --row spqr-near-lossless --draws 3 --steps 32 --lr 1e-4
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.texts import fetch_text  # noqa: E402
from spqr_run.calibration import windows_from_text  # noqa: E402
from spqr_run.finetune import FinetuneConfig, file_linears, finetune  # noqa: E402
from spqr_run.loading import open_model  # noqa: E402
from spqr_run.loading.spqr_file import _read, read_header, write_spqr  # noqa: E402

DATA = ROOT.parent / "shared" / "data"


def tune_file(src: Path, out: Path, reference: Path, tokens: torch.Tensor, ft: FinetuneConfig) -> dict:
    """Fine-tune `src` against `reference` on `tokens` and write `out` (same tensors, new values)."""
    source = open_model(reference)
    t0 = time.perf_counter()
    tuned, norms, report = finetune(
        source.config, source.weights, file_linears(src), tokens, ft, device=torch.device("cpu"),
        on_step=lambda s, loss: print(f"  step {s + 1}/{ft.steps}: KL {loss:.4f}", flush=True),
    )  # fmt: skip
    header = read_header(src)
    header.pop("checksums", None)
    header["quant_config"] = {**header["quant_config"], "finetune_steps": ft.steps, "finetune_lr": ft.lr}
    header["summary"] = {**header["summary"], "finetune": report.__dict__}
    from safetensors import safe_open

    with safe_open(src, framework="pt") as f:
        names = list(f.keys())

    def load(name: str):
        module, _, field = name.rpartition(".")
        if module in tuned:
            return lambda: tuned[module].tensors()[field]
        if name in norms:
            return lambda: norms[name]
        return lambda: _read(src, [name], {})[name]

    write_spqr(out, header, [(n, load(n)) for n in names])
    return {**report.__dict__, "cpu_wall_seconds": time.perf_counter() - t0}


def evaluate(model: Path, text: Path, tokens: int, cache: Path) -> float:
    """spqr-eval's perplexity of `model` on the first `tokens` tokens of `text` (cached in `cache`)."""
    if cache.exists():
        return json.loads(cache.read_text())["ppl"]
    cmd = [sys.executable, "-m", "spqr_run.cli.eval", str(model), "--text", str(text), "--seqlen", "2048",
           "--device", "cpu", "--json", "--max-tokens", str(tokens)]  # fmt: skip
    result = json.loads(
        subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.splitlines()[-1]
    )
    cache.write_text(json.dumps({"cmd": cmd[1:], **result}))
    return result["ppl"]


def quality_ppl(path: Path) -> float:
    """The perplexity in one of quality.py's `*.eval.json` files."""
    d = json.loads(path.read_text())
    return d["result"]["ppl"]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out-dir", type=Path, required=True, help="quality.py's output folder")
    p.add_argument("--row", required=True, help="the quality.py row whose draws to fine-tune")
    p.add_argument("--draws", type=int, default=3)
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--model", type=Path, default=DATA / "SmolLM2-135M-Instruct.Q4_1.gguf")
    p.add_argument("--calib", type=Path, default=DATA / "wiki-calib.txt")
    p.add_argument("--nsamples", type=int, default=32)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--eval-tokens", type=int, default=8192)
    args = p.parse_args()
    texts = {"wiki-test": DATA / "wiki-test.txt", "austen-persuasion": fetch_text("austen-persuasion")}
    ref = {t: quality_ppl(args.out_dir / f"reference.{t}.eval.json") for t in texts}
    ft = FinetuneConfig(steps=args.steps, lr=args.lr)
    rows = []
    for seed in range(args.draws):
        base = args.out_dir / f"{args.row}-d{seed}.spqr"
        tuned = args.out_dir / f"{args.row}-ft{args.steps}-d{seed}.spqr"
        report_path = tuned.with_suffix(".finetune.json")
        if not report_path.exists():
            print(f"fine-tuning {base.name} ({args.steps} steps, lr {args.lr:g})", flush=True)
            tokens = windows_from_text(
                args.calib, open_model(args.model), nsamples=args.nsamples, seqlen=args.seqlen, seed=seed
            )
            report_path.write_text(json.dumps(tune_file(base, tuned, args.model, tokens, ft)))
        report = json.loads(report_path.read_text())
        row = {"draw": seed, **{k: report[k] for k in ("kl_before", "kl_after", "seconds")}}
        for t, path in texts.items():
            before = quality_ppl(args.out_dir / f"{args.row}-d{seed}.{t}.eval.json")
            after = evaluate(tuned, path, args.eval_tokens, tuned.with_suffix(f".{t}.eval.json"))
            row[t] = (before / ref[t] - 1, after / ref[t] - 1)
        rows.append(row)
        print(json.dumps(row), flush=True)
    print(f"\n| draw | KL before -> after | {' | '.join(texts)} | fine-tuning s |")
    print("|---|---|" + "---|" * len(texts) + "---|")
    for r in rows:
        cells = " | ".join(f"{100 * r[t][0]:+.2f}% -> {100 * r[t][1]:+.2f}%" for t in texts)
        print(f"| {r['draw']} | {r['kl_before']:.4f} -> {r['kl_after']:.4f} | {cells} | {r['seconds']:.0f} |")
    for t in texts:
        b = sum(r[t][0] for r in rows) / len(rows)
        a = sum(r[t][1] for r in rows) / len(rows)
        print(f"mean {t}: {100 * b:+.2f}% -> {100 * a:+.2f}% ({1 - a / b:.1%} less loss)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
