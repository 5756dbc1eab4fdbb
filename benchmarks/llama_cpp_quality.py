"""llama.cpp's rows of the quality table (BENCHMARKS.md): SmolLM2-135M quantized by llama.cpp's own K-quant
and i-quant types with an importance matrix from the same calibration windows our quantizer uses, scored by
our evaluator on the same texts as the SpQR rows.

Per calibration draw S (S = 0 .. draws-1) and llama.cpp type TYPE (default IQ3_S, Q3_K_S, Q3_K_M, Q4_K_S,
Q4_K_M), in `--out-dir`:

    f16.gguf              llama-quantize --allow-requantize MODEL.Q4_1.gguf f16.gguf F16 THREADS
                          (the demo model is Q4_1; F16 holds its dequantized weights: llama.cpp's starting point)
    calib-dS.txt          the calibration windows of `spqr-quantize --seed S`: spqr_run.calibration.windows_from_text(
                          wiki-calib.txt, nsamples=32, seqlen=512, seed=S), decoded to text with the model's tokenizer
                          (see Calibration below)
    imatrix-dS.gguf       llama-imatrix -m f16.gguf -f calib-dS.txt --parse-special -c 512 --chunks 32 --no-ppl
                          -t THREADS --output-format gguf -o imatrix-dS.gguf
    TYPE-dS.gguf          llama-quantize --allow-requantize --imatrix imatrix-dS.gguf f16.gguf TYPE-dS.gguf TYPE THREADS
    TYPE-dS.TEXT.eval.json  spqr-eval TYPE-dS.gguf --text TEXT --seqlen 2048 --device cpu --json --max-tokens 8192

and the reference, `reference.TEXT.eval.json`: spqr-eval of the Q4_1 GGUF itself on the same text (the files
`benchmarks/quality.py` writes under the same name and with the same recorded command are reused as they are).
The loss of a row is `ppl / reference ppl - 1` per draw and text; the table gives each draw's loss, their mean,
and the bits per weight of the decoder's linear layers (attention q/k/v/output and MLP gate/up/down of every
block; not the embeddings, norms or output head) from the GGUF's tensor sizes: sum(bytes) * 8 / sum(weights).
The model's rows are 576 wide, not a multiple of llama.cpp's 256-weight super-blocks, so llama-quantize falls
back to other types on many tensors; the table lists the types each row's linear layers ended up with.

Calibration: llama-imatrix reads text, not token ids, so the windows are decoded and llama.cpp tokenizes them
again. Re-tokenizing decoded text may shift window boundaries slightly: the windows are cut at arbitrary token
offsets, and where two decoded windows are simply concatenated the tokenizer can merge the end of one with the
start of the next (measured on the demo model: draws 0 and 1 then give 16,383 tokens instead of 16,384, and only
14 and 13 of the 32 chunks of 512 tokens coincide with a window). So each window's last token is replaced by
`<|endoftext|>`, read as the special token (`--parse-special`), which forces a token boundary: chunk i of
llama-imatrix is then window i's first 511 tokens and the separator (the model has no BOS to add). Where the end
of a window does not re-tokenize as itself (two "\n" tokens become one "\n\n" at the end of a fragment: windows
14 and 22 of draw 1), its last two or more tokens are replaced by separators instead (`calibration_text`). The
script checks with the model's own tokenizer that the file tokenizes to exactly these chunks (a mismatch is
recorded in calib-dS.json and printed under the table) and that llama-imatrix computed over exactly `nsamples`
chunks; it still assumes that llama.cpp's tokenizer agrees with ours, and the imatrix sees a separator position
or two per window that our quantizer does not.

Resumable like quality.py: each step leaves a JSON record beside its output with the command and the records of
its inputs, and a rerun skips the steps whose record matches; `--report` prints the table from what is there
without running anything. The llama.cpp tools are the pinned build of `benchmarks/llama_cpp.py` (built on first use).

    python benchmarks/llama_cpp_quality.py --out-dir build/llama-quality --draws 3 --threads 1
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import re
import shlex
import statistics
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path

# appended, not first: a benchmarks/ module must not shadow an installed package
sys.path.append(str(Path(__file__).resolve().parent))
try:  # from the repository root (the tests); the bare name could be the llama-cpp-python package
    from benchmarks import llama_cpp
except ImportError:  # run as a script: benchmarks/ is sys.path[0]
    import llama_cpp  # noqa: E402
import quality  # noqa: E402 - benchmarks/ is not a package
from quality import CALIB, MODEL, REFERENCE, QualityError, Settings  # noqa: E402
from texts import TextError  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_TYPES = ("IQ3_S", "Q3_K_S", "Q3_K_M", "Q4_K_S", "Q4_K_M")
# the decoder's linear layers in llama.cpp's tensor names (attn_output is o_proj)
LINEAR_NAMES = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")
_LINEAR_RE = re.compile(r"blk\.\d+\.(" + "|".join(LINEAR_NAMES) + r")\.weight")
SEPARATOR = "<|endoftext|>"
MAX_TRIM = 16  # at most this many tokens at the end of a calibration window are replaced by separators
CALIBRATION_METHOD = 2  # bumped when calibration_text changes what it writes
# the code the calibration text depends on: a stored calibration file is reused only when these are unchanged
CALIBRATION_SOURCES = ("spqr_run/calibration.py", "spqr_run/tokenizer.py", "spqr_run/text.py")


# ---------------------------------------------------------------------------------------------------------------
# pure logic (tested)


def is_decoder_linear(name: str) -> bool:
    """True for the weight of a decoder block's linear layer (`blk.N.attn_q.weight`, ..., `blk.N.ffn_down.weight`)."""
    return _LINEAR_RE.fullmatch(name) is not None


def linear_bits(path: Path) -> dict:
    """Bits per weight of the decoder's linear layers in a GGUF file: their stored bytes * 8 / their weights.

    Returns {"bits", "bytes", "params", "tensors" (how many), "types" ({ggml type name: tensors of that type},
    most common first), "other_types" ({name: type} of the tensors outside the count)}. Raises QualityError when
    the file has no decoder linear tensors.
    """
    from gguf import GGUFReader  # lazy: --help and the tests of other functions need no gguf

    reader = GGUFReader(str(path))
    nbytes = params = 0
    types: Counter[str] = Counter()
    other: dict[str, str] = {}
    for t in reader.tensors:
        if is_decoder_linear(t.name):
            nbytes += int(t.n_bytes)
            params += int(t.n_elements)
            types[t.tensor_type.name] += 1
        elif not t.name.startswith("blk."):
            other[t.name] = t.tensor_type.name
    if params == 0:
        raise QualityError(f"{path}: no decoder linear tensors (blk.N.{{{','.join(LINEAR_NAMES)}}}.weight)")
    return {"bits": nbytes * 8 / params, "bytes": nbytes, "params": params, "tensors": sum(types.values()),
            "types": dict(types.most_common()), "other_types": other}  # fmt: skip


def parse_types(spec: str) -> list[str]:
    """`--types` (comma-separated llama-quantize type names, any case) as upper-case names in the given order,
    duplicates dropped. Raises QualityError on an empty list or a name that is not a type name."""
    out = []
    for name in (x.strip().upper() for x in spec.split(",")):
        if not name:
            continue
        if not re.fullmatch(r"[A-Z][A-Z0-9_]*", name):
            raise QualityError(f"--types: {name!r} is not a llama-quantize type name (e.g. Q4_K_M)")
        if name not in out:
            out.append(name)
    if not out:
        raise QualityError("--types: no type given")
    return out


def calibration_text(
    windows: Sequence[Sequence[int]],
    decode: Callable[[list[int]], str],
    encode: Callable[[str], list[int]],
    separator_id: int,
    max_trim: int = MAX_TRIM,
) -> tuple[str, list[int], list[int]]:
    """The text given to llama-imatrix, the token ids it should tokenize to (special tokens parsed), and how many
    separators end each window.

    Per window: its first k tokens decoded, then SEPARATOR in place of each of the other len - k tokens (a forced
    token boundary, so each window stays one chunk of its own length). k is the largest of len - 1 ..
    len - max_trim for which `encode(decode(first k))` gives those k tokens back (the end of a window is not
    always tokenized as its decoded text would be: a lone "\n" "\n" at the end of a fragment becomes one "\n\n"
    token, a character split between tokens decodes to U+FFFD), else len - 1.
    """
    parts: list[str] = []
    ids: list[int] = []
    seps: list[int] = []
    for w in windows:
        w = list(w)
        candidates = range(len(w) - 1, max(len(w) - 1 - max_trim, 0), -1)
        keep = next((k for k in candidates if encode(decode(w[:k])) == w[:k]), len(w) - 1)
        parts.append(decode(w[:keep]) + SEPARATOR * (len(w) - keep))
        ids += w[:keep] + [separator_id] * (len(w) - keep)
        seps.append(len(w) - keep)
    return "".join(parts), ids, seps


def alignment(got: Sequence[int], expected: Sequence[int], seqlen: int) -> dict:
    """How the re-tokenized calibration text lines up with the windows: {"tokens" (got), "expected_tokens",
    "chunks_equal" (seqlen-token chunks identical to the expected ones), "chunks", "aligned" (all equal and the
    same length)}."""
    chunks = len(expected) // seqlen
    equal = sum(list(got[i * seqlen : (i + 1) * seqlen]) == list(expected[i * seqlen : (i + 1) * seqlen])
                for i in range(chunks))  # fmt: skip
    return {"tokens": len(got), "expected_tokens": len(expected), "chunks_equal": equal, "chunks": chunks,
            "aligned": equal == chunks and len(got) == len(expected)}  # fmt: skip


def parse_imatrix_chunks(log: str) -> int | None:
    """The chunk count llama-imatrix reports ("computing over N chunks"), or None when the log lacks it."""
    m = re.search(r"computing over (\d+) chunks", log)
    return int(m.group(1)) if m else None


def f16_cmd(quantize: Path, model: Path, out: Path, threads: int) -> list[str]:
    """llama-quantize converting the (already quantized) GGUF to F16."""
    return [str(quantize), "--allow-requantize", str(model), str(out), "F16", str(threads)]


def imatrix_cmd(
    imatrix: Path, f16: Path, calib: Path, out: Path, seqlen: int, nsamples: int, threads: int
) -> list[str]:
    """llama-imatrix over `nsamples` chunks of `seqlen` tokens of the calibration text, written as GGUF."""
    return [str(imatrix), "-m", str(f16), "-f", str(calib), "--parse-special", "-c", str(seqlen),
            "--chunks", str(nsamples), "--no-ppl", "-t", str(threads), "--output-format", "gguf",
            "-o", str(out)]  # fmt: skip


def quantize_cmd(quantize: Path, f16: Path, imatrix: Path, out: Path, qtype: str, threads: int) -> list[str]:
    """llama-quantize from F16 to `qtype` with the importance matrix."""
    return [
        str(quantize),
        "--allow-requantize",
        "--imatrix",
        str(imatrix),
        str(f16),
        str(out),
        qtype,
        str(threads),
    ]


def summarize(
    records: Sequence[Mapping], reference: Mapping[str, float], texts: Sequence[str]
) -> dict[str, dict]:
    """Per type (first-seen order): {"seeds", "bits" (mean over draws), "types" (linear tensor types of the first
    draw), and per text {"ppl": {seed: ppl}, "loss": {seed: ppl / reference - 1}, "mean_loss", "mean_ppl"}}.

    `records`: one per finished (type, seed): {"type", "seed", "bits", "types", "ppl": {text: ppl}}; a text
    without a reference gets no loss, a draw without a text is left out of that text.
    """
    out: dict[str, dict] = {}
    for r in records:
        out.setdefault(r["type"], {"records": []})["records"].append(r)
    for agg in out.values():
        rs = sorted(agg.pop("records"), key=lambda r: r["seed"])
        agg["seeds"] = [r["seed"] for r in rs]
        agg["bits"] = statistics.fmean(r["bits"] for r in rs)
        agg["bits_per_draw"] = {str(r["seed"]): r["bits"] for r in rs}
        agg["types"] = rs[0]["types"]
        agg["texts"] = {}
        for text in texts:
            have = [r for r in rs if text in r["ppl"]]
            if not have:
                continue
            entry: dict = {"ppl": {str(r["seed"]): r["ppl"][text] for r in have}}
            entry["mean_ppl"] = statistics.fmean(entry["ppl"].values())
            if text in reference:
                entry["loss"] = {s: p / reference[text] - 1 for s, p in entry["ppl"].items()}
                entry["mean_loss"] = statistics.fmean(entry["loss"].values())
            agg["texts"][text] = entry
    return out


def markdown(types: Sequence[str], summary: Mapping[str, dict], reference: Mapping[str, float],
             texts: Sequence[str], seeds: Sequence[int]) -> str:  # fmt: skip
    """The table: one line per type (missing ones skipped): bits of the linear layers, and per text the loss
    against the reference of each draw (in `seeds` order, '-' where missing), their mean and the mean perplexity;
    then the reference line and the tensor types each row's linear layers ended up with."""
    pct = lambda v: f"{v:+.2%}"  # noqa: E731
    head = ["llama.cpp type", "draws", "bits (linear layers)"]
    for t in texts:
        head += [
            f"{t}: loss per draw ({', '.join(f'd{s}' for s in seeds)})",
            f"{t}: mean loss",
            f"{t}: mean ppl",
        ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for qtype in types:
        a = summary.get(qtype)
        if a is None:
            continue
        bits = {f"{v:.3f}" for v in a["bits_per_draw"].values()}
        cells = [
            qtype,
            str(len(a["seeds"])),
            f"{a['bits']:.3f}" if len(bits) == 1 else f"{a['bits']:.3f} (varies)",
        ]
        for t in texts:
            e = a["texts"].get(t)
            if e is None or "loss" not in e:
                cells += ["-", "-", f"{e['mean_ppl']:.3f}" if e else "-"]
                continue
            cells.append(" / ".join(pct(e["loss"][str(s)]) if str(s) in e["loss"] else "-" for s in seeds))
            cells += [pct(e["mean_loss"]), f"{e['mean_ppl']:.3f}"]
        lines.append("| " + " | ".join(cells) + " |")
    if reference:
        cells = ["reference: the Q4_1 GGUF", "-", "-"]
        for t in texts:
            cells += ["-", "+0.00%", f"{reference[t]:.4f}" if t in reference else "-"]
        lines.append("| " + " | ".join(cells) + " |")
    shown = [q for q in types if q in summary]
    if shown:
        lines += [
            "",
            "Tensor types of the linear layers (tensors of each type, of the first draw's file):",
            "",
        ]
        for qtype in shown:
            kinds = ", ".join(f"{k} {n}" for k, n in summary[qtype]["types"].items())
            lines.append(f"- {qtype}: {kinds}")
    return "\n".join(lines)


def generic(cmd: Sequence[str], seed: int | None, qtype: str | None) -> list[str]:
    """A recorded command with the draw's seed as S and the type as TYPE (in file names and as an argument)."""
    out = []
    for c in cmd:
        if qtype is not None and c == qtype:
            c = "TYPE"
        else:
            head, sep, name = c.rpartition("/")
            if qtype is not None:
                name = name.replace(f"{qtype}-d", "TYPE-d")
            if seed is not None:
                name = name.replace(f"-d{seed}.", "-dS.")
            c = head + sep + name
        out.append(c)
    return out


# ---------------------------------------------------------------------------------------------------------------
# running


def _fingerprint(patterns: Iterable[str], root: Path = ROOT) -> str:
    h = hashlib.sha256()
    for path in sorted(p for pattern in patterns for p in root.glob(pattern)):
        h.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes())
    return h.hexdigest()[:16]


def _run_tool(cmd: list[str], log_path: Path) -> dict:
    """Run a llama.cpp tool with its output in `log_path`; {"seconds", "cpu_seconds"}. Raises QualityError."""
    with log_path.open("w") as log:
        log.write(f"$ {shlex.join(cmd)}\n")
        log.flush()
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        tail = (log_path.read_text(errors="replace").strip().splitlines() or ["(no output)"])[-1]
        raise QualityError(f"failed (exit {proc.returncode}, log {log_path}): {shlex.join(cmd)}: {tail}")
    return {"seconds": round(seconds, 2), "cpu_seconds": round(usage.ru_utime + usage.ru_stime, 2)}


class Runner:
    """The steps, each reusing its stored result when the recorded key (command and inputs) matches."""

    def __init__(self, s: Settings, dry: bool, log: Callable[[str], None]) -> None:
        self.s, self.dry, self.log = s, dry, log
        self.env = {**os.environ, "OMP_NUM_THREADS": str(s.threads), "MKL_NUM_THREADS": str(s.threads)}
        info = llama_cpp.read_build_info(llama_cpp.build_dir()) or {}
        self.commit = info.get("llama_cpp_commit")
        self._tools: dict[str, Path] = {}

    def tool(self, name: str) -> Path:
        if name not in self._tools:
            try:
                self._tools[name] = llama_cpp.tool_path(name)
            except llama_cpp.LlamaCppError:
                if self.dry:  # --report never builds: the recorded paths are those of the default cache
                    return llama_cpp.build_dir() / "bin" / name
                self.log("llama.cpp is not built: building it (minutes)")
                llama_cpp.build()
                self._tools[name] = llama_cpp.tool_path(name)
        return self._tools[name]

    def _step(
        self, record: Path, outputs: Sequence[Path], key: dict, run: Callable[[], dict], what: str
    ) -> dict | None:
        """The stored result of a step when `record` matches `key` and its outputs exist; else run it (unless dry)."""
        got = quality._load(record, key) if all(p.exists() for p in outputs) else None
        if got is not None or self.dry:
            return got
        self.log(what)
        result = run()
        quality._save(record, key, result)
        return result

    def f16(self) -> tuple[dict, dict | None]:
        out = self.s.out_dir / "f16.gguf"
        cmd = f16_cmd(self.tool("llama-quantize"), self.s.model, out, self.s.threads)
        key = {"cmd": cmd, "llama_cpp": self.commit}
        return key, self._step(self.s.out_dir / "f16.json", [out], key,
                               lambda: _run_tool(cmd, self.s.out_dir / "f16.log"), "convert the model to F16")  # fmt: skip

    def calibration(self, seed: int) -> tuple[dict, dict | None]:
        out = self.s.out_dir / f"calib-d{seed}.txt"
        key = {"model": str(self.s.model), "calib": str(self.s.calib), "nsamples": self.s.nsamples,
               "seqlen": self.s.seqlen, "seed": seed, "separator": SEPARATOR, "max_trim": MAX_TRIM,
               "method": CALIBRATION_METHOD, "code": _fingerprint(CALIBRATION_SOURCES)}  # fmt: skip

        def run() -> dict:
            from spqr_run.calibration import windows_from_text
            from spqr_run.loading import open_model

            source = open_model(self.s.model)
            tok = source.tokenizer
            windows = windows_from_text(self.s.calib, source, nsamples=self.s.nsamples, seqlen=self.s.seqlen,
                                        seed=seed).tolist()  # fmt: skip
            sep = tok.encode(SEPARATOR, add_bos=False, special=True)
            if len(sep) != 1:
                raise QualityError(f"{SEPARATOR} is not one special token of this tokenizer ({sep})")
            text, expected, seps = calibration_text(
                windows, tok.decode, lambda t: tok.encode(t, add_bos=False, special=False), sep[0]
            )
            got = tok.encode(text, add_bos=False, special=True)
            res = alignment(got, expected, self.s.seqlen)
            res["separators"] = seps
            if not res["aligned"]:
                self.log(f"calib-d{seed}.txt: re-tokenized, {res['chunks_equal']} of {res['chunks']} chunks equal "
                         f"the windows ({res['tokens']} tokens, expected {res['expected_tokens']})")  # fmt: skip
            out.write_text(text, encoding="utf-8")
            return {**res, "sha256": hashlib.sha256(text.encode()).hexdigest()}

        return key, self._step(self.s.out_dir / f"calib-d{seed}.json", [out], key, run,
                               f"calibration text of draw {seed}")  # fmt: skip

    def imatrix(self, seed: int, f16_key: dict, calib_sha256: str) -> tuple[dict, dict | None]:
        out = self.s.out_dir / f"imatrix-d{seed}.gguf"
        calib = self.s.out_dir / f"calib-d{seed}.txt"
        cmd = imatrix_cmd(self.tool("llama-imatrix"), self.s.out_dir / "f16.gguf", calib, out, self.s.seqlen,
                          self.s.nsamples, self.s.threads)  # fmt: skip
        key = {"cmd": cmd, "f16": f16_key, "calib_sha256": calib_sha256}  # the text itself, whatever made it
        log_path = self.s.out_dir / f"imatrix-d{seed}.log"

        def run() -> dict:
            res = _run_tool(cmd, log_path)
            res["chunks"] = parse_imatrix_chunks(log_path.read_text(errors="replace"))
            if res["chunks"] != self.s.nsamples:
                self.log(f"llama-imatrix computed over {res['chunks']} chunks, not {self.s.nsamples}")
            return res

        return key, self._step(
            self.s.out_dir / f"imatrix-d{seed}.json", [out], key, run, f"imatrix of draw {seed}"
        )

    def quantize(self, qtype: str, seed: int, f16_key: dict, imatrix_key: dict) -> tuple[dict, dict | None]:
        stem = f"{qtype}-d{seed}"
        out = self.s.out_dir / f"{stem}.gguf"
        cmd = quantize_cmd(self.tool("llama-quantize"), self.s.out_dir / "f16.gguf",
                           self.s.out_dir / f"imatrix-d{seed}.gguf", out, qtype, self.s.threads)  # fmt: skip
        key = {"cmd": cmd, "f16": f16_key, "imatrix": imatrix_key}

        def run() -> dict:
            res = _run_tool(cmd, self.s.out_dir / f"{stem}.quantize.log")
            return {**res, **linear_bits(out)}

        return key, self._step(self.s.out_dir / f"{stem}.quant.json", [out], key, run, f"quantize {stem}")

    def evaluate(self, stem: str, model: Path, text: str, model_key: dict | None) -> dict | None:
        """spqr-eval of `model` on `text`; the key of the reference is that of quality.py, so its files are reused."""
        cmd = quality.eval_cmd(self.s, model, text)
        if model_key is None:
            key = {"cmd": quality._portable(cmd), "model_cmd": None, "model_quantizer": None}
        else:
            key = {"cmd": quality._portable(cmd), "model": model_key}
        return self._step(self.s.out_dir / f"{stem}.{text}.eval.json", [model], key,
                          lambda: quality._run_json(cmd, self.env), f"eval {stem} on {text}")  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--out-dir", type=Path, default=Path("build/llama-quality"), help="models and results (reused)"
    )
    p.add_argument("--draws", type=int, default=3, help="calibration draws: seeds 0 .. N-1 (default 3)")
    p.add_argument("--seeds", default=None, help="comma-separated calibration seeds instead of 0 .. draws-1")
    p.add_argument("--types", default=",".join(DEFAULT_TYPES),
                   help=f"comma-separated llama-quantize types (default {','.join(DEFAULT_TYPES)})")  # fmt: skip
    p.add_argument(
        "--threads", type=int, default=1, help="threads of the llama.cpp tools and spqr-eval (default 1)"
    )
    p.add_argument(
        "--eval-tokens", type=int, default=8192, help="score the first N tokens of each text (0: all)"
    )
    p.add_argument("--eval-seqlen", type=int, default=2048, help="evaluation window in tokens (default 2048)")
    p.add_argument("--text", action="append", default=[], metavar="NAME=PATH",
                   help=f"held-out texts (repeatable; default: wiki-test and {quality.SECOND_TEXT})")  # fmt: skip
    p.add_argument("--model", type=Path, default=MODEL)
    p.add_argument("--calib", type=Path, default=CALIB)
    p.add_argument("--nsamples", type=int, default=32, help="calibration windows (default 32)")
    p.add_argument("--seqlen", type=int, default=512, help="tokens per calibration window (default 512)")
    p.add_argument("--report", action="store_true", help="print the table from finished results; run nothing")
    p.add_argument("--cache-dir", type=Path, default=None, help="where benchmarks/texts.py caches texts")
    args = p.parse_args(argv)
    try:
        if args.draws < 1 or args.threads < 1 or args.eval_tokens < 0 or args.nsamples < 1 or args.seqlen < 2:
            raise QualityError(
                "--draws, --threads, --nsamples must be >= 1, --seqlen >= 2, --eval-tokens >= 0"
            )
        for what, path in (("--model", args.model), ("--calib", args.calib)):
            if not path.exists():
                raise QualityError(f"{what}: {path} does not exist")
        types = parse_types(args.types)
        try:
            seeds = [int(x) for x in args.seeds.split(",")] if args.seeds else list(range(args.draws))
        except ValueError:
            raise QualityError(f"--seeds {args.seeds!r}: expected comma-separated integers") from None
        texts = quality.parse_texts(args.text, args.cache_dir)
    except (QualityError, TextError) as e:
        print(f"llama_cpp_quality.py: {e}", file=sys.stderr)
        return 2
    args.out_dir.mkdir(parents=True, exist_ok=True)
    s = Settings(args.out_dir.resolve(), args.model.resolve(), args.calib.resolve(),
                 {k: v.resolve() for k, v in texts.items()}, args.nsamples, args.seqlen, args.eval_tokens,
                 args.threads, args.eval_seqlen)  # fmt: skip
    t0, c0 = time.time(), os.times()

    def log(msg: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)

    r = Runner(s, args.report, log)
    errors: list[str] = []
    notes: list[str] = []  # departures from the intended calibration, printed under the table
    reference: dict[str, float] = {}
    records: list[dict] = []
    commands: dict[str, list[list[str]]] = {}  # step -> its generic commands (one per text for evaluations)

    def command(step: str, cmd: list[str]) -> None:
        if cmd not in commands.setdefault(step, []):
            commands[step].append(cmd)

    try:
        for text in texts:
            e = r.evaluate(REFERENCE, s.model, text, None)
            if e is not None:
                reference[text] = e["ppl"]
            command("reference", quality._portable(quality.eval_cmd(s, s.model, text)))
        f16_key, f16 = r.f16()
        command("f16", f16_key["cmd"])
        for seed in seeds if f16 is not None else []:
            _, calib = r.calibration(seed)
            im_key, im = r.imatrix(seed, f16_key, calib["sha256"]) if calib is not None else ({}, None)
            if calib is not None and not calib["aligned"]:
                notes.append(
                    f"calib-d{seed}.txt re-tokenizes to {calib['chunks_equal']} of {calib['chunks']} windows"
                )
            if im is not None and im.get("chunks") != args.nsamples:
                notes.append(f"llama-imatrix of draw {seed} computed over {im.get('chunks')} chunks")
            if im is None:
                continue
            command("imatrix", generic(im_key["cmd"], seed, None))
            for qtype in types:
                try:
                    q_key, q = r.quantize(qtype, seed, f16_key, im_key)
                    if q is None:
                        continue
                    command("quantize", generic(q_key["cmd"], seed, qtype))
                    rec = {"type": qtype, "seed": seed, "bits": q["bits"], "types": q["types"],
                           "other_types": q["other_types"], "quant_seconds": q["seconds"], "ppl": {},
                           "scored_tokens": {}, "eval_seconds": {}}  # fmt: skip
                    model = s.out_dir / f"{qtype}-d{seed}.gguf"
                    for text in texts:
                        e = r.evaluate(f"{qtype}-d{seed}", model, text, q_key)
                        ecmd = quality._portable(quality.eval_cmd(s, model, text))
                        command("eval", generic(ecmd, seed, qtype))
                        if e is not None:
                            rec["ppl"][text] = e["ppl"]
                            rec["scored_tokens"][text] = e["scored_tokens"]
                            rec["eval_seconds"][text] = e["seconds"]
                    if rec["ppl"]:  # quantized but not yet scored: not a row yet
                        records.append(rec)
                except QualityError as e:
                    errors.append(str(e))
                    log(str(e))
    except QualityError as e:
        errors.append(str(e))
        log(str(e))

    names = list(texts)
    summary = summarize(records, reference, names)
    machine = f"{platform.machine()} CPU, {os.cpu_count()} cores, {args.threads} thread(s)"
    print(
        f"SmolLM2-135M-Instruct ({s.model.name}) quantized by llama.cpp {r.commit or '(commit unknown)'} "
        f"(llama-cpp-python {llama_cpp.LLAMA_CPP_PYTHON_VERSION}) from F16, imatrix from the calibration windows "
        f"of {s.calib.name} ({args.nsamples} x {args.seqlen} tokens), draws (seeds) {','.join(map(str, seeds))}; "
        f"scored by spqr-eval on the first {args.eval_tokens or 'all'} tokens of each text, windows of "
        f"{args.eval_seqlen}; loss = ppl / ppl of the Q4_1 GGUF - 1; {time.strftime('%Y-%m-%d')}; {machine}.\n"
    )
    print(markdown(types, summary, reference, names, seeds))
    for note in notes:
        print(f"\nNote: {note}.")
    expected = [f"{q}-d{sd}" for sd in seeds for q in types]
    done = {f"{x['type']}-d{x['seed']}" for x in records if len(x["ppl"]) == len(names)}
    missing = [u for u in expected if u not in done]
    if missing:
        print(f"\nNot finished ({len(missing)} of {len(expected)}): {', '.join(missing)}.")
    print("\nCommands (S = each seed, TYPE = each type):\n")
    print(
        "    python benchmarks/llama_cpp_quality.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    )
    for step in ("reference", "f16", "imatrix", "quantize", "eval"):
        if step == "imatrix" and "imatrix" in commands:
            print(f"    calib-dS.txt: the {args.nsamples} windows of windows_from_text(..., seed=S), each decoded "
                  f"without its last token (or last few: calibration_text) and ended by as many {SEPARATOR}")  # fmt: skip
        for cmd in commands.get(step, []):
            print("    " + quality._display(cmd))
    spent = [x["quant_seconds"] for x in records] + [v for x in records for v in x["eval_seconds"].values()]
    children = os.times()
    cpu = (children.children_user + children.children_system) - (c0.children_user + c0.children_system)
    print(f"\n(stored quantizations and evaluations: {sum(spent):.0f} s wall; this invocation: "
          f"{time.time() - t0:.0f} s wall, {cpu:.0f} s CPU in its commands)")  # fmt: skip
    result = {"reference": reference, "types": summary, "records": records, "llama_cpp_commit": r.commit,
              "settings": {"nsamples": args.nsamples, "seqlen": args.seqlen, "seeds": seeds, "types": types,
                           "eval_tokens": args.eval_tokens, "eval_seqlen": args.eval_seqlen,
                           "texts": {k: str(v) for k, v in s.texts.items()}}}  # fmt: skip
    (s.out_dir / "results.json").write_text(json.dumps(result, indent=1))
    if errors:
        print(f"llama_cpp_quality.py: {len(errors)} error(s); first: {errors[0]}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
