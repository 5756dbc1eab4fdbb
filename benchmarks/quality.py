"""The quality table of BENCHMARKS.md: perplexity of SmolLM2-135M quantized by RTN, GPTQ and SpQR, over several
calibration draws, on two held-out texts of different domains.

Every row except the reference is quantized once per calibration draw (`spqr-quantize --seed S`, S = 0 ..
draws-1: which windows of the calibration text are sampled) and every model is scored on each text
(`spqr-eval --max-tokens N`, windows of 2048): by default `wiki-test.txt` (Wikipedia, the calibration text's
domain) and `austen-persuasion` (a novel, fetched and verified by `benchmarks/texts.py`). The table gives, per
row and text, the mean perplexity over the draws with its min-max spread, and the relative loss against the
reference (mean and spread); `results.json` in the output folder holds every draw's values. The real commands
run as subprocesses, so this measures exactly what a user gets.

Resumable: each finished quantization leaves `KEY-dS.spqr` and `KEY-dS.quant.json`, each finished evaluation
`KEY-dS.TEXT.eval.json`, in `--out-dir`; a rerun with the same flags reuses them (an interrupted quantization
continues with `spqr-quantize --resume`), and reruns what the flags changed. `--report` prints the table from
what is there without running anything.

    python benchmarks/quality.py --out-dir build/quality --draws 3 --eval-tokens 8192 --jobs 1

Rows are data (`ROWS`; `--extra-row 'KEY:FLAGS'` adds one, e.g. `--extra-row 'w3-tau0.25:--preset 3bit
--outlier-threshold 0.25'`), so a new preset or flag is one more row.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

# appended, not first: a benchmarks/ module must not shadow an installed package (as kernels.py, now kernel_bench.py, once did)
sys.path.append(str(Path(__file__).resolve().parent))
from texts import TextError, fetch_text  # noqa: E402 - benchmarks/ is not a package

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
MODEL = DATA / "SmolLM2-135M-Instruct.Q4_1.gguf"
CALIB = DATA / "wiki-calib.txt"
WIKI_TEST = DATA / "wiki-test.txt"
SECOND_TEXT = "austen-persuasion"
REFERENCE = "reference"
ROOT = Path(__file__).resolve().parents[1]
# The code a quantized model depends on beyond its command: a stored quantization (and its evaluations) is
# reused only when these sources are unchanged, so a resumed table never mixes two versions of the quantizer.
QUANTIZER_SOURCES = ("spqr_run/quant/*.py", "spqr_run/quantize_model.py", "spqr_run/calibration.py")


def quantizer_fingerprint(root: Path = ROOT) -> str:
    """sha256 (first 16 hex digits) over the quantizer's source files (`QUANTIZER_SOURCES`, sorted by path)."""
    h = hashlib.sha256()
    for path in sorted(p for pattern in QUANTIZER_SOURCES for p in root.glob(pattern)):
        h.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes())
    return h.hexdigest()[:16]


@dataclass(frozen=True)
class Row:
    """One row of the table: `flags` for spqr-quantize, or None for the unquantized reference."""

    key: str  # file-name-safe identifier, used by --rows and in the output folder
    label: str
    flags: tuple[str, ...] | None
    seeded: bool = True  # False: the result does not depend on the calibration draw (RTN), so one draw


ROWS: list[Row] = [
    Row(REFERENCE, "reference (GGUF dequantized, fp32)", None),
    Row(
        "rtn-4bit-g128",
        "RTN 4-bit g128",
        ("--method", "rtn", "--wbits", "4", "--groupsize", "128"),
        seeded=False,
    ),
    Row("gptq-4bit-g128", "GPTQ 4-bit g128", ("--method", "gptq", "--wbits", "4", "--groupsize", "128")),
    Row("gptq-3bit-g128", "GPTQ 3-bit g128", ("--method", "gptq", "--wbits", "3", "--groupsize", "128")),
    Row("spqr-near-lossless", "SpQR near-lossless", ("--preset", "near-lossless")),
    Row("spqr-3bit", "SpQR 3bit", ("--preset", "3bit")),
]

# (a, b): the table says, per draw and text, whether row a has a lower perplexity than row b
COMPARISONS: list[tuple[str, str]] = [("spqr-3bit", "gptq-4bit-g128")]


class QualityError(RuntimeError):
    """A user mistake or a failed command; the message is meant to be printed as is."""


# ---------------------------------------------------------------------------------------------------------------
# aggregation (pure: tested on fake results)


def spread(values: Sequence[float]) -> dict[str, float]:
    """Mean, min and max of `values` (at least one), as {"mean", "min", "max", "n"}."""
    if not values:
        raise ValueError("spread of no values")
    return {"mean": statistics.fmean(values), "min": min(values), "max": max(values), "n": len(values)}


def aggregate(draws: list[dict], reference: dict[str, float], texts: Sequence[str]) -> dict[str, dict]:
    """Per row: spreads over its draws of avg bits, outliers, quantization seconds, and per text of perplexity
    and relative loss `ppl / reference[text] - 1` (a fraction; +0.05 is 5% worse than the reference).

    `draws`: one dict per finished (row, seed): {"row", "seed", "avg_bits", "outliers", "quant_seconds",
    "ppl": {text: perplexity}}; a draw missing a text is left out of that text's spread (and its "n" says so).
    `reference`: {text: perplexity} of the unquantized model. Returns {row key: {...}} in first-seen order, with
    the per-draw values kept under "seeds" and, per text, "per_draw".
    """
    out: dict[str, dict] = {}
    for d in draws:
        out.setdefault(d["row"], {"draws": []})["draws"].append(d)
    for row, agg in out.items():
        ds = sorted(agg.pop("draws"), key=lambda d: d["seed"])
        agg["seeds"] = [d["seed"] for d in ds]
        for field in ("avg_bits", "outliers", "quant_seconds"):
            agg[field] = spread([d[field] for d in ds])
        agg["texts"] = {}
        for text in texts:
            have = [d for d in ds if text in d["ppl"]]
            if not have:
                continue
            ppl = [d["ppl"][text] for d in have]
            entry = {"ppl": spread(ppl), "per_draw": {str(d["seed"]): d["ppl"][text] for d in have}}
            if text in reference:
                entry["rel_loss"] = spread([p / reference[text] - 1 for p in ppl])
            agg["texts"][text] = entry
        out[row] = agg
    return out


def compare(draws: list[dict], a: str, b: str, texts: Sequence[str]) -> list[dict]:
    """Row `a` against row `b` on each draw (seeds present in both) and text: [{"seed", "text", "a", "b",
    "better"}] where better means a's perplexity is lower, sorted by seed then text order."""
    by = {(d["row"], d["seed"]): d for d in draws}
    seeds = sorted({s for (r, s) in by if r == a} & {s for (r, s) in by if r == b})
    rows = []
    for seed in seeds:
        for text in texts:
            pa, pb = by[(a, seed)]["ppl"].get(text), by[(b, seed)]["ppl"].get(text)
            if pa is not None and pb is not None:
                rows.append({"seed": seed, "text": text, "a": pa, "b": pb, "better": pa < pb})
    return rows


def cost(records: list[dict]) -> str:
    """What the stored results cost: wall and CPU seconds of their quantizations and evaluations, summed (CPU
    only over the commands that recorded it)."""
    parts = []
    for what, wall_key, cpu_key in (("quantization", "quant_seconds", "quant_cpu_seconds"),
                                    ("evaluation", "eval_seconds", "eval_cpu_seconds")):  # fmt: skip
        walls, cpus = [], []
        for r in records:
            w, c = r.get(wall_key), r.get(cpu_key)
            pairs = zip(w.values(), c.values(), strict=True) if isinstance(w, dict) else [(w, c)]
            for wall, cpu in pairs:
                if wall is not None:
                    walls.append(wall)
                    if cpu is not None:
                        cpus.append(cpu)
        if walls:
            if not cpus:
                cpu_note = "CPU not recorded"
            elif len(cpus) < len(walls):
                cpu_note = f"{sum(cpus):.0f} s CPU in the {len(cpus)} that recorded it"
            else:
                cpu_note = f"{sum(cpus):.0f} s CPU"
            parts.append(f"{len(walls)} {what}s: {sum(walls):.0f} s wall, {cpu_note}")
    return "; ".join(parts) or "nothing stored"


def _fmt_spread(s: dict[str, float], fmt: Callable[[float], str]) -> str:
    if s["n"] == 1 or fmt(s["min"]) == fmt(s["max"]):
        return fmt(s["mean"])
    return f"{fmt(s['mean'])} ({fmt(s['min'])} - {fmt(s['max'])})"


def markdown(
    rows: Sequence[Row],
    agg: dict[str, dict],
    reference: dict[str, float],
    texts: Sequence[str],
    comparisons: Iterable[tuple[str, str, list[dict]]] = (),
) -> str:
    """The table: one line per row (missing rows skipped), per text the perplexity and the relative loss
    against the reference as `mean (min - max)` over the draws; then per comparison (label a, label b, the
    result of `compare`) a table per draw and text and the verdict "a beats b on every draw and text"."""
    head = ["method", "draws", "avg bits", "outliers"]
    for t in texts:
        head += [f"{t}: perplexity", f"{t}: vs reference"]
    head.append("quantization time")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    pct = lambda v: f"{v:+.2%}"  # noqa: E731
    for row in rows:
        if row.flags is None:
            if not reference:
                continue
            cells = [row.label, "-", "32 (fp32)", "-"]
            for t in texts:
                cells += [
                    f"{reference[t]:.4f}" if t in reference else "-",
                    "+0.00%" if t in reference else "-",
                ]
            cells.append("-")
        else:
            if row.key not in agg:
                continue
            a = agg[row.key]
            cells = [row.label, str(len(a["seeds"])), _fmt_spread(a["avg_bits"], lambda v: f"{v:.3f}")]
            cells.append(
                "-" if a["outliers"]["max"] == 0 else _fmt_spread(a["outliers"], lambda v: f"{v:.3%}")
            )
            for t in texts:
                e = a["texts"].get(t)
                cells.append(_fmt_spread(e["ppl"], lambda v: f"{v:.3f}") if e else "-")
                cells.append(_fmt_spread(e["rel_loss"], pct) if e and "rel_loss" in e else "-")
            cells.append(f"{a['quant_seconds']['mean']:.0f} s")
        lines.append("| " + " | ".join(cells) + " |")
    for label_a, label_b, result in comparisons:
        if not result:
            continue
        wins = sum(r["better"] for r in result)
        lines += [
            "",
            f"{label_a} vs {label_b}, per calibration draw (same seed, same calibration windows):",
            "",
            f"| draw (seed) | text | {label_a} | {label_b} | {label_a} lower |",
            "|---|---|---|---|---|",
        ]
        for r in result:
            lines.append(
                f"| {r['seed']} | {r['text']} | {r['a']:.3f} | {r['b']:.3f} | {'yes' if r['better'] else 'no'} |"
            )
        verdict = "true" if wins == len(result) else "false"
        lines += [
            "",
            f'"{label_a} beats {label_b} on every draw and text": **{verdict}** ({wins} of {len(result)}).',
        ]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------
# running


@dataclass
class Settings:
    """What the commands depend on (everything else is presentation)."""

    out_dir: Path
    model: Path
    calib: Path
    texts: dict[str, Path]
    nsamples: int
    seqlen: int
    eval_tokens: int
    threads: int
    eval_seqlen: int = 2048
    python: str = sys.executable


def _stem(row: Row, seed: int | None) -> str:
    return row.key if seed is None else f"{row.key}-d{seed}"


def quantize_cmd(s: Settings, row: Row, seed: int) -> list[str]:
    """The spqr-quantize command of `row` at calibration seed `seed` (flags from the row, the rest from `s`)."""
    assert row.flags is not None
    out = s.out_dir / f"{_stem(row, seed)}.spqr"
    return [s.python, "-m", "spqr_run.cli.quantize", str(s.model), "-o", str(out), *row.flags,
            "--calib", str(s.calib), "--nsamples", str(s.nsamples), "--seqlen", str(s.seqlen),
            "--seed", str(seed), "--device", "cpu", "--json"]  # fmt: skip


def eval_cmd(s: Settings, model: Path, text: str) -> list[str]:
    """The spqr-eval command scoring `model` on the first `s.eval_tokens` tokens of text `text`."""
    cmd = [s.python, "-m", "spqr_run.cli.eval", str(model), "--text", str(s.texts[text]), "--seqlen",
           str(s.eval_seqlen), "--device", "cpu", "--json"]  # fmt: skip
    return cmd + (["--max-tokens", str(s.eval_tokens)] if s.eval_tokens else [])


def _portable(cmd: list[str]) -> list[str]:
    """The command as recorded and compared: without the interpreter's path."""
    return ["python" if c == sys.executable else c for c in cmd]


def _run_json(cmd: list[str], env: dict[str, str]) -> dict:
    """Run `cmd`, return the JSON object of its last stdout line with "cpu_seconds" (user + sys of the child,
    from wait4, so exact also when several jobs run at once) added. Raises QualityError on failure."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, text=True, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0), err.seek(0)
        stdout, stderr = out.read(), err.read()
    if proc.returncode != 0:
        tail = (stderr.strip().splitlines() or ["(no output)"])[-1]
        raise QualityError(f"failed (exit {proc.returncode}): {shlex.join(_portable(cmd))}: {tail}")
    result = json.loads(stdout.strip().splitlines()[-1])
    result["cpu_seconds"] = usage.ru_utime + usage.ru_stime
    return result


def _load(path: Path, key: dict) -> dict | None:
    """The stored result at `path` when its recorded command (and inputs) equal `key`; else None."""
    try:
        rec = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return rec["result"] if all(rec.get(k) == v for k, v in key.items()) else None


def _save(path: Path, key: dict, result: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({**key, "result": result}, indent=1))
    tmp.replace(path)


def run_unit(
    s: Settings, row: Row, seed: int | None, log: Callable[[str], None], dry: bool = False
) -> dict | None:
    """Quantize (unless the reference) and evaluate one (row, seed) on every text, reusing finished results.

    Returns the draw's record ({"row", "seed", "avg_bits", "outliers", "quant_seconds", "ppl": {text: ...},
    "scored_tokens": {text: ...}, "commands"}), or, with `dry`, what is stored (None when the quantization is
    missing). Raises QualityError when a command fails.
    """
    env = {**os.environ, "OMP_NUM_THREADS": str(s.threads), "MKL_NUM_THREADS": str(s.threads)}
    stem = _stem(row, seed)
    rec: dict = {
        "row": row.key,
        "seed": seed,
        "ppl": {},
        "scored_tokens": {},
        "eval_seconds": {},
        "eval_cpu_seconds": {},
        "commands": [],
    }
    model = s.model
    qkey: dict = {}
    if row.flags is not None:
        assert seed is not None
        qcmd = quantize_cmd(s, row, seed)
        model = s.out_dir / f"{stem}.spqr"
        qkey = {"cmd": _portable(qcmd), "quantizer": quantizer_fingerprint()}
        qpath = s.out_dir / f"{stem}.quant.json"
        q = _load(qpath, qkey) if model.exists() else None
        if q is None:
            if dry:
                return None
            partial = model.with_name(model.name + ".partial")
            log(f"quantize {stem}" + (" (resuming)" if partial.exists() else ""))
            q = _run_json(qcmd + (["--resume"] if partial.exists() else []), env)
            q = {k: v for k, v in q.items() if k != "layers"}
            _save(qpath, qkey, q)
        rec.update(avg_bits=q["avg_bits"], outliers=q["outlier_fraction"], quant_seconds=q["seconds"])
        rec["quant_cpu_seconds"] = q.get("cpu_seconds")
        rec["commands"].append(_portable(qcmd))
    for text in s.texts:
        ecmd = eval_cmd(s, model, text)
        ekey = {
            "cmd": _portable(ecmd),
            "model_cmd": qkey.get("cmd"),
            "model_quantizer": qkey.get("quantizer"),
        }
        epath = s.out_dir / f"{stem}.{text}.eval.json"
        e = _load(epath, ekey)
        if e is None:
            if dry:
                continue
            log(f"eval {stem} on {text}")
            e = _run_json(ecmd, env)
            _save(epath, ekey, e)
        rec["ppl"][text] = e["ppl"]
        rec["scored_tokens"][text] = e["scored_tokens"]
        rec["eval_seconds"][text] = e["seconds"]
        rec["eval_cpu_seconds"][text] = e.get("cpu_seconds")
        rec["commands"].append(_portable(ecmd))
    return rec


def select_rows(rows: Sequence[Row], keys: str | None, extra: Sequence[str]) -> list[Row]:
    """`rows` (plus `--extra-row KEY:FLAGS` rows), restricted to the comma-separated `keys` when given; the
    reference is always kept (the relative loss needs it) and the others run in the order of `keys`.
    Raises QualityError naming an unknown key or a malformed extra row."""
    out = list(rows)
    for spec in extra:
        key, sep, flags = spec.partition(":")
        if not sep or not key or not flags.strip() or not key.replace("-", "").replace(".", "").isalnum():
            raise QualityError(
                f"--extra-row {spec!r}: expected KEY:FLAGS with KEY of letters, digits, '-', '.'"
            )
        if any(r.key == key for r in out):
            raise QualityError(f"--extra-row {spec!r}: row {key!r} exists already")
        out.append(Row(key, key, tuple(shlex.split(flags))))
    if keys:
        wanted = [k.strip() for k in keys.split(",") if k.strip()]
        unknown = [k for k in wanted if not any(r.key == k for r in out)]
        if unknown:
            raise QualityError(
                f"--rows: unknown {', '.join(unknown)}; known: {', '.join(r.key for r in out)}"
            )
        by_key = {r.key: r for r in out}
        out = [r for r in out if r.flags is None] + [
            by_key[k] for k in dict.fromkeys(wanted) if by_key[k].flags
        ]
    return out


def parse_texts(specs: Sequence[str], cache: Path | None) -> dict[str, Path]:
    """`--text NAME=PATH` specs (default: wiki-test and the fetched second text) as {name: path}."""
    if not specs:
        return {"wiki-test": WIKI_TEST, SECOND_TEXT: fetch_text(SECOND_TEXT, cache)}
    texts: dict[str, Path] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise QualityError(f"--text {spec!r}: expected NAME=PATH")
        if not Path(path).is_file():
            raise QualityError(f"--text {spec!r}: {path} is not a file")
        texts[name] = Path(path)
    return texts


def _display(cmd: list[str]) -> str:
    """A recorded command as a user types it: entry points by name, the shared data and files under the current
    folder by relative paths, the home folder as `~`."""
    names = {"spqr_run.cli.quantize": "spqr-quantize", "spqr_run.cli.eval": "spqr-eval"}
    if cmd[:2] == ["python", "-m"] and cmd[2] in names:
        cmd = [names[cmd[2]], *cmd[3:]]
    home, cwd = str(Path.home()), os.getcwd()
    out = []
    for c in cmd:
        if c.startswith(str(DATA)):
            c = "../shared/data" + c[len(str(DATA)) :]
        elif c.startswith(cwd + os.sep):
            c = c[len(cwd) + 1 :]
        elif c.startswith(home + os.sep):
            c = "~" + c[len(home) :]
        out.append(c)
    return " ".join(shlex.quote(c) if not c.startswith("~") else c for c in out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out-dir", type=Path, default=Path("build/quality"), help="models and results (reused)")
    p.add_argument(
        "--draws", type=int, default=3, help="calibration draws per row: seeds 0 .. N-1 (default 3)"
    )
    p.add_argument(
        "--seeds", default=None, help="comma-separated calibration seeds instead of 0 .. draws-1 (e.g. a second "
        "invocation working on other draws at the same time, in the same --out-dir)"
    )  # fmt: skip
    p.add_argument(
        "--eval-tokens", type=int, default=8192, help="score the first N tokens of each text (0: all)"
    )
    p.add_argument(
        "--rows",
        default=None,
        help=f"comma-separated row keys (default: all: {', '.join(r.key for r in ROWS)})",
    )
    p.add_argument(
        "--extra-row", action="append", default=[], metavar="KEY:FLAGS", help="one more row (repeatable)"
    )
    p.add_argument("--text", action="append", default=[], metavar="NAME=PATH",
                   help=f"held-out texts (repeatable; default: wiki-test and {SECOND_TEXT})")  # fmt: skip
    p.add_argument("--eval-seqlen", type=int, default=2048, help="evaluation window in tokens (default 2048)")
    p.add_argument("--model", type=Path, default=MODEL)
    p.add_argument("--calib", type=Path, default=CALIB)
    p.add_argument("--nsamples", type=int, default=32, help="calibration sequences (default 32)")
    p.add_argument("--seqlen", type=int, default=512, help="tokens per calibration sequence (default 512)")
    p.add_argument("--jobs", type=int, default=1, help="(row, draw) units run in parallel (default 1)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per job (default 1)")
    p.add_argument("--report", action="store_true", help="print the table from finished results; run nothing")
    p.add_argument("--cache-dir", type=Path, default=None, help="where benchmarks/texts.py caches texts")
    args = p.parse_args(argv)
    try:
        if args.draws < 1 or args.jobs < 1 or args.threads < 1 or args.eval_tokens < 0:
            raise QualityError("--draws, --jobs and --threads must be >= 1, --eval-tokens >= 0")
        for what, path in (("--model", args.model), ("--calib", args.calib)):
            if not path.exists():
                raise QualityError(f"{what}: {path} does not exist")
        rows = select_rows(ROWS, args.rows, args.extra_row)
        try:
            seeds = [int(x) for x in args.seeds.split(",")] if args.seeds else list(range(args.draws))
        except ValueError:
            raise QualityError(f"--seeds {args.seeds!r}: expected comma-separated integers") from None
        texts = parse_texts(args.text, args.cache_dir)
    except (QualityError, TextError) as e:
        print(f"quality.py: {e}", file=sys.stderr)
        return 2
    args.out_dir.mkdir(parents=True, exist_ok=True)
    s = Settings(args.out_dir.resolve(), args.model.resolve(), args.calib.resolve(),
                 {k: v.resolve() for k, v in texts.items()}, args.nsamples, args.seqlen, args.eval_tokens,
                 args.threads, args.eval_seqlen)  # fmt: skip
    units: list[tuple[Row, int | None]] = [(r, None) for r in rows if r.flags is None]
    units += [(r, seed) for seed in seeds for r in rows if r.flags and (r.seeded or seed == seeds[0])]
    t0, c0 = time.time(), os.times()

    def log(msg: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)

    errors: list[str] = []

    def one(unit: tuple[Row, int | None]) -> dict | None:
        try:
            return run_unit(s, unit[0], unit[1], log, dry=args.report)
        except QualityError as e:
            errors.append(str(e))
            log(str(e))
        except Exception:  # noqa: BLE001 - keep the other units going; report at the end
            errors.append(traceback.format_exc(limit=2))
        return None

    with ThreadPoolExecutor(args.jobs) as pool:
        done = list(pool.map(one, units))
    records = [r for r in done if r is not None]
    missing = [
        _stem(u[0], u[1]) for u, r in zip(units, done, strict=True) if r is None or len(r["ppl"]) < len(texts)
    ]
    ref_rec = next((r for r in records if r["row"] == REFERENCE), None)
    reference = ref_rec["ppl"] if ref_rec else {}
    draws = [r for r in records if r["row"] != REFERENCE]
    names = list(texts)
    agg = aggregate(draws, reference, names)
    labels = {r.key: r.label for r in rows}
    comps = [(a, b, compare(draws, a, b, names)) for a, b in COMPARISONS if a in labels and b in labels]
    children = os.times()
    scored = {t: sorted({r["scored_tokens"][t] for r in records if t in r["scored_tokens"]}) for t in names}
    machine = f"{platform.machine()} CPU, {os.cpu_count()} cores, {args.threads} torch thread(s) a job, {args.jobs} job(s)"
    print(
        f"SmolLM2-135M-Instruct ({s.model.name}); calibration {s.calib.name}, {args.nsamples} x {args.seqlen} "
        f"tokens, draws (seeds) {','.join(map(str, seeds))}; scored on the first {args.eval_tokens or 'all'} tokens of each "
        f"text, windows of {args.eval_seqlen} (tokens scored: "
        + ", ".join(f"{t} {'/'.join(map(str, v)) or '-'}" for t, v in scored.items())
        + f"); {time.strftime('%Y-%m-%d')}; {machine}.\n"
    )
    print(markdown(rows, agg, reference, names, [(labels[a], labels[b], c) for a, b, c in comps]))
    if missing:
        print(f"\nNot finished ({len(missing)} of {len(units)} units): {', '.join(missing)}.")
    print("\nCommands (S = each seed):\n")
    print("    python benchmarks/quality.py " + shlex.join(argv if argv is not None else sys.argv[1:]))
    for r in rows:
        rec = next((x for x in records if x["row"] == r.key), None)
        for cmd in rec["commands"] if rec else []:
            line = _display(cmd)
            if rec["seed"] is not None and r.seeded:
                line = line.replace(f"--seed {rec['seed']}", "--seed S").replace(f"-d{rec['seed']}.", "-dS.")
            print("    " + line)
    cpu = (children.children_user + children.children_system) - (c0.children_user + c0.children_system)
    print(
        f"\n({cost(records)}; this invocation: {time.time() - t0:.0f} s wall, {cpu:.0f} s CPU in its commands)"
    )
    result = {"reference": reference, "rows": agg, "draws": draws, "comparisons": [
        {"a": a, "b": b, "per_draw": c} for a, b, c in comps], "settings": {
        "nsamples": args.nsamples, "seqlen": args.seqlen, "draws": args.draws, "eval_tokens": args.eval_tokens,
        "scored_tokens": scored, "texts": {k: str(v) for k, v in s.texts.items()}}}  # fmt: skip
    (s.out_dir / "results.json").write_text(json.dumps(result, indent=1))
    if errors:
        print(f"quality.py: {len(errors)} unit(s) failed; first: {errors[0]}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
