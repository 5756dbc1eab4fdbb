"""benchmarks/quality.py (the robust quality table) and benchmarks/texts.py (the second held-out text): the
aggregation over calibration draws on fake results, the text pipeline on a hand-made Debian package holding an R
lazy-load database, the hash check, and one tiny end-to-end run of the real commands (with resumption)."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import struct
import subprocess
import sys
import tarfile
import zlib
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
# appended, not first: a benchmarks/ module must not shadow an installed package (as kernels.py, now kernel_bench.py, once did)
sys.path.append(str(ROOT / "benchmarks"))

import quality  # noqa: E402
import texts  # noqa: E402

from tests.tiny_configs import write_tiny_hf_llama  # noqa: E402

# ---------------------------------------------------------------------------------------------------------------
# aggregation


def _draw(row, seed, wiki, book, bits=4.0):
    return {"row": row, "seed": seed, "avg_bits": bits, "outliers": 0.01 * seed, "quant_seconds": 10.0 + seed,
            "ppl": {"wiki": wiki, "book": book}}  # fmt: skip


REF = {"wiki": 20.0, "book": 30.0}
DRAWS = [
    _draw("q3", 0, 22.0, 36.0, bits=3.9),
    _draw("q3", 1, 24.0, 33.0, bits=4.0),
    _draw("q3", 2, 23.0, 34.5, bits=4.1),
    _draw("g4", 0, 23.0, 35.0),
    _draw("g4", 1, 25.0, 34.0),
    _draw("g4", 2, 22.5, 36.0),
]


def test_aggregate_mean_spread_and_relative_loss():
    agg = quality.aggregate(DRAWS, REF, ["wiki", "book"])
    q3 = agg["q3"]
    assert q3["seeds"] == [0, 1, 2]
    assert q3["avg_bits"] == pytest.approx({"mean": 4.0, "min": 3.9, "max": 4.1, "n": 3})
    assert q3["quant_seconds"]["mean"] == pytest.approx(11.0)
    wiki = q3["texts"]["wiki"]
    assert wiki["ppl"] == pytest.approx({"mean": 23.0, "min": 22.0, "max": 24.0, "n": 3})
    # relative loss per draw: 22/20-1 = 0.10, 24/20-1 = 0.20, 23/20-1 = 0.15
    assert wiki["rel_loss"] == pytest.approx({"mean": 0.15, "min": 0.10, "max": 0.20, "n": 3})
    assert wiki["per_draw"] == {"0": 22.0, "1": 24.0, "2": 23.0}
    book = q3["texts"]["book"]
    assert book["rel_loss"] == pytest.approx({"mean": 0.15, "min": 0.10, "max": 0.20, "n": 3})


def test_aggregate_missing_text_counts_only_the_draws_that_have_it():
    draws = [*DRAWS[:2], {**DRAWS[2], "ppl": {"wiki": 23.0}}]
    agg = quality.aggregate(draws, REF, ["wiki", "book"])
    assert agg["q3"]["texts"]["wiki"]["ppl"]["n"] == 3
    assert agg["q3"]["texts"]["book"]["ppl"] == pytest.approx(
        {"mean": 34.5, "min": 33.0, "max": 36.0, "n": 2}
    )


def test_compare_is_per_draw_and_per_text():
    result = quality.compare(DRAWS, "q3", "g4", ["wiki", "book"])
    assert [(r["seed"], r["text"], r["better"]) for r in result] == [
        (0, "wiki", True), (0, "book", False),
        (1, "wiki", True), (1, "book", True),
        (2, "wiki", False), (2, "book", True),
    ]  # fmt: skip


def test_markdown_table_cells_and_verdict():
    rows = [
        quality.Row("reference", "ref", None),
        quality.Row("q3", "Q3", ("--x",)),
        quality.Row("g4", "G4", ("--y",)),
        quality.Row("absent", "Absent", ("--z",)),
    ]
    agg = quality.aggregate(DRAWS, REF, ["wiki", "book"])
    comps = [("Q3", "G4", quality.compare(DRAWS, "q3", "g4", ["wiki", "book"]))]
    md = quality.markdown(rows, agg, REF, ["wiki", "book"], comps)
    lines = md.splitlines()
    assert lines[0].startswith(
        "| method | draws | avg bits | outliers | wiki: perplexity | wiki: vs reference |"
    )
    assert "| ref | - | 32 (fp32) | - | 20.0000 | +0.00% | 30.0000 | +0.00% | - |" in lines
    q3 = next(line for line in lines if line.startswith("| Q3 |"))
    assert "| 3 | 4.000 (3.900 - 4.100) |" in q3
    assert "| 23.000 (22.000 - 24.000) | +15.00% (+10.00% - +20.00%) |" in q3
    assert "| 11 s |" in q3
    assert not any(line.startswith("| Absent") for line in lines)
    assert "| 2 | wiki | 23.000 | 22.500 | no |" in lines
    assert '"Q3 beats G4 on every draw and text": **false** (4 of 6).' in lines


def test_markdown_verdict_true_when_every_draw_wins():
    draws = [_draw("a", s, 20.0, 30.0) for s in range(3)] + [_draw("b", s, 21.0, 31.0) for s in range(3)]
    comps = [("A", "B", quality.compare(draws, "a", "b", ["wiki", "book"]))]
    md = quality.markdown([], {}, {}, ["wiki", "book"], comps)
    assert '"A beats B on every draw and text": **true** (6 of 6).' in md


def test_select_rows_extra_rows_and_commands():
    extra = ["w3-t0.25:--preset 3bit --outlier-threshold 0.25"]
    rows = quality.select_rows(quality.ROWS, "spqr-3bit,w3-t0.25", extra)
    assert [r.key for r in rows] == ["reference", "spqr-3bit", "w3-t0.25"]
    assert rows[-1].flags == ("--preset", "3bit", "--outlier-threshold", "0.25")
    assert [r.key for r in quality.select_rows(quality.ROWS, None, [])] == [r.key for r in quality.ROWS]
    with pytest.raises(quality.QualityError, match="--rows: unknown nope; known: reference, rtn-4bit-g128, "):
        quality.select_rows(quality.ROWS, "spqr-3bit,nope", [])
    with pytest.raises(quality.QualityError, match="--extra-row 'bad': expected KEY:FLAGS"):
        quality.select_rows(quality.ROWS, None, ["bad"])
    with pytest.raises(quality.QualityError, match="row 'spqr-3bit' exists already"):
        quality.select_rows(quality.ROWS, None, ["spqr-3bit:--preset 3bit"])
    s = quality.Settings(
        Path("/o"), Path("/m.gguf"), Path("/c.txt"), {"wiki": Path("/w.txt")}, 32, 512, 8192, 1
    )
    cmd = quality.quantize_cmd(s, rows[-1], 2)
    assert cmd[cmd.index("-o") + 1] == "/o/w3-t0.25-d2.spqr"
    assert cmd[cmd.index("--seed") + 1] == "2" and "--outlier-threshold" in cmd
    assert quality.eval_cmd(s, Path("/o/x.spqr"), "wiki")[-2:] == ["--max-tokens", "8192"]


# ---------------------------------------------------------------------------------------------------------------
# texts


def test_clean_lines_joins_paragraphs_and_normalizes_spaces():
    lines = ["Chapter 1", "", "", "Sir Walter  was a man who,", "   for his own amusement,", None,
             "never took up any book.  ", "", "Finis"]  # fmt: skip
    assert texts.clean_lines(lines) == (
        "Chapter 1\nSir Walter was a man who, for his own amusement,\nnever took up any book.\nFinis\n"
    )
    assert texts.clean_lines([]) == "\n"


def test_verify_sha256_message_names_text_and_both_hashes():
    good = hashlib.sha256(b"abc").hexdigest()
    texts.verify_sha256("abc", good, "x")
    with pytest.raises(texts.TextError) as e:
        texts.verify_sha256("abd", good, "austen-persuasion")
    msg = str(e.value)
    assert "\n" not in msg
    assert msg.startswith("austen-persuasion: sha256 of the cleaned text is ")
    assert hashlib.sha256(b"abd").hexdigest() in msg and f"expected {good}" in msg


# A writer of R's XDR serialization (the subset the reader reads), to make a lazy-load database by hand.
def _i(v: int) -> bytes:
    return struct.pack(">i", v)


def _chars(s: str | None) -> bytes:
    if s is None:
        return _i(9) + _i(-1)
    raw = s.encode("utf-8")
    return _i(9 | (1 << 3)) + _i(len(raw)) + raw  # UTF8_MASK


def _strs(xs, attrs: bytes = b"") -> bytes:
    return _i(16 | ((1 << 9) if attrs else 0)) + _i(len(xs)) + b"".join(map(_chars, xs)) + attrs


def _ints(xs) -> bytes:
    return _i(13) + _i(len(xs)) + b"".join(map(_i, xs))


def _names(names, first_symbol_ref: int | None = None) -> bytes:
    """An attribute pairlist `names = <names>`; the symbol written out, or as a reference to an earlier one."""
    sym = _i(255 | (first_symbol_ref << 8)) if first_symbol_ref else _i(1) + _chars("names")
    return _i(2 | (1 << 10)) + sym + _strs(names) + _i(254)


def _serialize(item: bytes, version: int = 3) -> bytes:
    head = b"X\n" + _i(version) + _i(0x40201) + _i(0x30500)
    if version == 3:
        head += _i(5) + b"UTF-8"
    return head + item


def _lazyload_db(objects: dict[str, bytes]) -> tuple[bytes, bytes]:
    rdb, offsets = b"", []
    for item in objects.values():
        data = _serialize(item)
        blob = struct.pack(">I", len(data)) + zlib.compress(data)
        offsets.append((len(rdb), len(blob)))
        rdb += blob
    # list(variables = <list of c(offset, length)> with names, references = list(), compressed = TRUE)
    variables = (
        _i(19 | (1 << 9)) + _i(len(offsets)) + b"".join(_ints(o) for o in offsets) + _names(list(objects))
    )
    index = (_i(19 | (1 << 9)) + _i(3) + variables + _i(19) + _i(0) + _i(10) + _i(1) + _i(1)
             + _names(["variables", "references", "compressed"], first_symbol_ref=1))  # fmt: skip
    return gzip.compress(_serialize(index, version=2)), rdb


def _deb(files: dict[str, bytes]) -> bytes:
    tar_buf = io.BytesIO()
    with tarfile.open(fileobj=tar_buf, mode="w:xz") as tar:
        for path, data in files.items():
            info = tarfile.TarInfo("./" + path)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))

    def member(name: str, data: bytes) -> bytes:
        header = f"{name:<16}{0:<12}{0:<6}{0:<6}{'100644':<8}{len(data):<10}`\n".encode()
        return header + data + (b"\n" if len(data) % 2 else b"")

    return b"!<arch>\n" + member("debian-binary", b"2.0\n") + member("data.tar.xz", tar_buf.getvalue())


BOOK = ["Persuasion", "", "by", "", "Chapter 1", "", "Sir Walter Elliot, of Kellynch Hall,", "was a man who", None,
        "é and ü survive.", ""]  # fmt: skip


def test_deb_text_reads_the_r_object_cleans_and_verifies(monkeypatch):
    rdx, rdb = _lazyload_db({"emma": _strs(["Emma"]), "persuasion": _strs(BOOK)})
    member = "usr/lib/R/site-library/janeaustenr/data/Rdata"
    deb = _deb({member + ".rdx": rdx, member + ".rdb": rdb, "usr/share/doc/x": b"doc"})
    expected = (
        "Persuasion\nby\nChapter 1\nSir Walter Elliot, of Kellynch Hall, was a man who\né and ü survive.\n"
    )
    spec = texts.TEXTS["austen-persuasion"]
    monkeypatch.setitem(
        texts.TEXTS, "fake", texts.DebText(spec.package, spec.version, member, "persuasion", spec.license,
                                           hashlib.sha256(expected.encode()).hexdigest(), "test"),
    )  # fmt: skip
    assert texts.deb_text("fake", deb) == expected
    assert texts.read_lazyload_object(rdx, rdb, "emma") == ["Emma"]
    with pytest.raises(texts.TextError, match="object 'mansfieldpark' not in the lazy-load database"):
        texts.read_lazyload_object(rdx, rdb, "mansfieldpark")
    monkeypatch.setitem(texts.TEXTS, "fake", texts.DebText(spec.package, spec.version, member, "persuasion",
                                                             spec.license, "0" * 64, "test"))  # fmt: skip
    with pytest.raises(texts.TextError, match="fake: sha256 of the cleaned text is .* expected 0{64}"):
        texts.deb_text("fake", deb)


def test_cached_text_is_reverified_and_the_cli_prints_one_line(tmp_path, capsys):
    cached = tmp_path / "texts" / "austen-persuasion.txt"
    cached.parent.mkdir()
    cached.write_text("not the novel\n")
    assert texts.main(["austen-persuasion", "--cache-dir", str(tmp_path / "texts")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0
    assert err.startswith(f"texts.py: austen-persuasion (cached at {cached}): sha256 of the cleaned text is ")
    assert texts.main(["nope", "--cache-dir", str(tmp_path)]) == 1
    assert "unknown text 'nope'; known: austen-persuasion" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------------
# end to end: the real commands on a tiny model, then a rerun that reuses everything


WORDS = (
    "river mill valley farmer wheat barley spring water autumn wheel slowly house garden letter sister "
    "captain navy evening morning walk town bath friend family"
).split()


def _prose(seed: int, n: int) -> str:
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(len(WORDS), (n,), generator=g).tolist()
    return " ".join(WORDS[i] + ("." if k % 9 == 8 else "") for k, i in enumerate(idx)) + "\n"


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory) -> Path:
    """A 2-layer LLaMA HF folder (hidden 64) with a small byte-level BPE tokenizer, and three texts."""
    pytest.importorskip("tokenizers")
    pytest.importorskip("transformers")
    folder = write_tiny_hf_llama(tmp_path_factory.mktemp("tiny-quality"), _prose(0, 3000))
    (folder / "a.txt").write_text(_prose(1, 400))
    (folder / "b.txt").write_text(_prose(2, 400))
    return folder


@pytest.mark.slow  # about 50 s of CPU: eight real subprocesses (idle 2-core box: about 30 s)
def test_end_to_end_tiny_run_then_resume(tiny_folder, tmp_path):
    """The real spqr-quantize / spqr-eval commands, 2 draws x 2 texts; a rerun reuses every stored result (an
    edited one shows up in the table) and a changed --eval-tokens no longer matches the stored evaluations."""
    out = tmp_path / "q"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "quality.py"), "--out-dir", str(out), "--model", str(tiny_folder),
           "--calib", str(tiny_folder / "calib.txt"), "--text", f"a={tiny_folder / 'a.txt'}",
           "--text", f"b={tiny_folder / 'b.txt'}", "--draws", "2", "--eval-tokens", "256", "--nsamples", "4",
           "--seqlen", "32", "--eval-seqlen", "128", "--extra-row", "gptq-g16:--method gptq --wbits 3 --groupsize 16",
           "--rows", "gptq-g16", "--jobs", "2"]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    first = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert first.returncode == 0, first.stderr[-3000:]
    res = json.loads((out / "results.json").read_text())
    assert set(res["reference"]) == {"a", "b"}
    draws = sorted(res["draws"], key=lambda d: d["seed"])
    assert [(d["row"], d["seed"]) for d in draws] == [("gptq-g16", 0), ("gptq-g16", 1)]
    assert all(set(d["ppl"]) == {"a", "b"} for d in draws)
    assert draws[0]["ppl"] != draws[1]["ppl"]  # the seed reaches the calibration sampling
    assert res["settings"]["scored_tokens"]["a"] == res["settings"]["scored_tokens"]["b"]
    row = res["rows"]["gptq-g16"]["texts"]["a"]
    assert row["ppl"]["n"] == 2
    assert row["rel_loss"]["mean"] == pytest.approx(row["ppl"]["mean"] / res["reference"]["a"] - 1)
    assert "| gptq-g16 | 2 |" in first.stdout
    assert (
        "spqr-quantize " in first.stdout and "--seed S" in first.stdout and "gptq-g16-dS.spqr" in first.stdout
    )

    stored = out / "gptq-g16-d1.b.eval.json"
    rec = json.loads(stored.read_text())
    rec["result"]["ppl"] = 123.456
    stored.write_text(json.dumps(rec))
    again = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "quantize " not in again.stderr and "eval " not in again.stderr, again.stderr
    assert "Not finished" not in again.stdout
    res2 = json.loads((out / "results.json").read_text())
    assert {d["seed"]: d["ppl"]["b"] for d in res2["draws"]}[1] == 123.456

    report = [
        *cmd[: cmd.index("--eval-tokens") + 1],
        "128",
        *cmd[cmd.index("--eval-tokens") + 2 :],
        "--report",
    ]
    third = subprocess.run(report, capture_output=True, text=True, env=env, timeout=300)
    assert third.returncode == 0, third.stderr[-3000:]
    res3 = json.loads((out / "results.json").read_text())
    assert res3["reference"] == {} and all(d["ppl"] == {} for d in res3["draws"]) and len(res3["draws"]) == 2
    assert "Not finished (3 of 3 units): reference, gptq-g16-d0, gptq-g16-d1." in third.stdout


def test_bad_arguments_are_one_line_errors(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "quality.py"), "--out-dir", str(tmp_path), "--rows", "nope",
         "--model", str(tmp_path), "--calib", __file__,
         "--text", f"a={tmp_path / 'missing.txt'}"],
        capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and proc.stderr.startswith("quality.py: --rows: unknown nope")


def test_cost_sums_wall_and_cpu_and_display_shortens_paths():
    recs = [
        {"row": "reference", "eval_seconds": {"a": 10.0, "b": 20.0}, "eval_cpu_seconds": {"a": None, "b": None}},
        {"row": "q", "quant_seconds": 100.0, "quant_cpu_seconds": 80.0, "eval_seconds": {"a": 5.0, "b": 6.0},
         "eval_cpu_seconds": {"a": 4.0, "b": 5.0}},
    ]  # fmt: skip
    assert quality.cost(recs) == (
        "1 quantizations: 100 s wall, 80 s CPU; 4 evaluations: 41 s wall, 9 s CPU in the 2 that recorded it"
    )
    assert quality.cost([]) == "nothing stored"
    cmd = [
        "python",
        "-m",
        "spqr_run.cli.eval",
        str(quality.DATA / "m.gguf"),
        "--text",
        str(Path.home() / "t.txt"),
    ]
    assert quality._display(cmd) == "spqr-eval ../shared/data/m.gguf --text ~/t.txt"
    assert quality._display(["x", str(Path.cwd() / "build" / "a.spqr")]) == "x build/a.spqr"
    assert (
        quality._fmt_spread({"mean": 4.0, "min": 3.9996, "max": 4.0004, "n": 3}, lambda v: f"{v:.3f}")
        == "4.000"
    )


def test_seeds_select_the_draws_and_bad_seeds_are_one_line(tmp_path, capsys):
    text = tmp_path / "t.txt"
    text.write_text("x\n")
    base = ["--out-dir", str(tmp_path / "q"), "--model", str(tmp_path), "--calib", str(text), "--text", f"t={text}",
            "--rows", "gptq-4bit-g128,rtn-4bit-g128", "--report"]  # fmt: skip
    assert quality.main([*base, "--seeds", "1,x"]) == 2
    assert capsys.readouterr().err.strip() == "quality.py: --seeds '1,x': expected comma-separated integers"
    assert quality.main([*base, "--seeds", "2,1"]) == 0
    out = capsys.readouterr().out
    # RTN does not depend on the draw: one unit, at the first seed
    assert (
        "Not finished (4 of 4 units): reference, gptq-4bit-g128-d2, rtn-4bit-g128-d2, gptq-4bit-g128-d1."
        in out
    )


def test_quantizer_fingerprint_follows_the_quantizer_sources_only(tmp_path):
    for rel in (
        "spqr_run/quant/spqr.py",
        "spqr_run/quantize_model.py",
        "spqr_run/calibration.py",
        "spqr_run/chat.py",
    ):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(f"# {rel}\n")
    first = quality.quantizer_fingerprint(tmp_path)
    (tmp_path / "spqr_run/chat.py").write_text("# edited\n")  # not quantizer code
    assert quality.quantizer_fingerprint(tmp_path) == first
    (tmp_path / "spqr_run/quant/spqr.py").write_text("# a new search\n")
    assert quality.quantizer_fingerprint(tmp_path) != first


def test_a_quantization_stored_by_another_quantizer_is_not_reused(tmp_path):
    """The resume key holds the quantizer's fingerprint: a model quantized before a quantizer change is redone."""
    text = tmp_path / "t.txt"
    text.write_text("x\n")
    s = quality.Settings(out_dir=tmp_path, model=tmp_path / "m.gguf", calib=text, texts={"t": text}, nsamples=4,
                         seqlen=32, eval_tokens=0, threads=1)  # fmt: skip
    row = quality.Row("gptq-x", "GPTQ x", ("--method", "gptq"))
    cmd = quality._portable(quality.quantize_cmd(s, row, 0))
    (tmp_path / "gptq-x-d0.spqr").write_bytes(b"model")
    result = {"avg_bits": 4.0, "outlier_fraction": 0.0, "seconds": 1.0}

    def store(fingerprint: str) -> None:
        (tmp_path / "gptq-x-d0.quant.json").write_text(
            json.dumps({"cmd": cmd, "quantizer": fingerprint, "result": result})
        )

    store(quality.quantizer_fingerprint())
    assert quality.run_unit(s, row, 0, log=lambda _: None, dry=True)["avg_bits"] == 4.0  # same code: reused
    store("0123456789abcdef")
    assert quality.run_unit(s, row, 0, log=lambda _: None, dry=True) is None  # another quantizer: redone
