"""benchmarks/llama_cpp_quality.py without llama.cpp: bits per weight of the decoder linears from a GGUF written
here, the calibration text that keeps each window one llama-imatrix chunk (also on the real tokenizer when the demo
model is there), the commands, the loss table, the resumable steps, and `--report` on an empty folder."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
# appended, not first: a benchmarks/ module must not shadow an installed package
sys.path.append(str(ROOT / "benchmarks"))

import llama_cpp_quality as lq  # noqa: E402

# ---------------------------------------------------------------------------------------------------------------
# bits per weight


def _write_gguf(path: Path, tensors: dict[str, tuple[str, tuple[int, int] | tuple[int]]]) -> None:
    """A GGUF holding `tensors` ({name: (type, numpy shape)}), type F32, F16 or Q8_0, filled with a ramp."""
    import gguf

    w = gguf.GGUFWriter(str(path), "llama")
    for name, (kind, shape) in tensors.items():
        data = np.linspace(-1, 1, int(np.prod(shape)), dtype=np.float32).reshape(shape)
        if kind == "Q8_0":
            q = gguf.quants.quantize(data, gguf.GGMLQuantizationType.Q8_0)
            w.add_tensor(name, q, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            w.add_tensor(name, data.astype(np.float16 if kind == "F16" else np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_linear_bits_counts_only_the_decoder_linears(tmp_path):
    path = tmp_path / "m.gguf"
    _write_gguf(
        path,
        {
            "token_embd.weight": ("F32", (8, 32)),  # not counted: embeddings
            "blk.0.attn_norm.weight": ("F32", (64,)),  # not counted: norm
            "blk.0.attn_q.weight": ("F16", (2, 64)),  # 128 weights, 256 bytes
            "blk.0.ffn_down.weight": ("Q8_0", (2, 64)),  # 128 weights, 4 blocks of 34 bytes = 136 bytes
            "blk.1.attn_output.weight": ("Q8_0", (1, 64)),  # 64 weights, 2 blocks = 68 bytes
            "output_norm.weight": ("F32", (64,)),
            "output.weight": ("F16", (8, 32)),  # not counted: output head
        },
    )
    got = lq.linear_bits(path)
    assert got["params"] == 128 + 128 + 64
    assert got["bytes"] == 256 + 136 + 68
    assert got["bits"] == (256 + 136 + 68) * 8 / 320  # 11.5 exactly
    assert got["bits"] == 11.5
    assert got["tensors"] == 3
    assert got["types"] == {"Q8_0": 2, "F16": 1}
    assert got["other_types"] == {
        "token_embd.weight": "F32",
        "output_norm.weight": "F32",
        "output.weight": "F16",
    }


def test_linear_bits_without_linears_is_an_error(tmp_path):
    path = tmp_path / "m.gguf"
    _write_gguf(path, {"token_embd.weight": ("F32", (8, 32))})
    with pytest.raises(lq.QualityError, match="no decoder linear tensors"):
        lq.linear_bits(path)


@pytest.mark.parametrize(
    ("name", "linear"),
    [
        ("blk.0.attn_q.weight", True),
        ("blk.29.attn_k.weight", True),
        ("blk.3.attn_v.weight", True),
        ("blk.3.attn_output.weight", True),
        ("blk.3.ffn_gate.weight", True),
        ("blk.3.ffn_up.weight", True),
        ("blk.3.ffn_down.weight", True),
        ("blk.3.attn_norm.weight", False),
        ("blk.3.ffn_norm.weight", False),
        ("blk.3.attn_q.bias", False),
        ("token_embd.weight", False),
        ("output.weight", False),
        ("xblk.0.attn_q.weight", False),
    ],
)
def test_is_decoder_linear(name, linear):
    assert lq.is_decoder_linear(name) is linear


# ---------------------------------------------------------------------------------------------------------------
# flags, commands, logs


def test_parse_types_normalizes_and_dedups():
    assert lq.parse_types(" q4_k_m, IQ3_S,,Q4_K_M ") == ["Q4_K_M", "IQ3_S"]
    assert lq.parse_types(",".join(lq.DEFAULT_TYPES)) == ["IQ3_S", "Q3_K_S", "Q3_K_M", "Q4_K_S", "Q4_K_M"]
    with pytest.raises(lq.QualityError, match="no type"):
        lq.parse_types(" , ")
    with pytest.raises(lq.QualityError, match="not a llama-quantize type"):
        lq.parse_types("Q4-K")


def test_commands():
    t = Path("/bin")
    assert lq.f16_cmd(t / "q", Path("m.gguf"), Path("f16.gguf"), 2) == [
        "/bin/q", "--allow-requantize", "m.gguf", "f16.gguf", "F16", "2"
    ]  # fmt: skip
    im = lq.imatrix_cmd(t / "im", Path("f16.gguf"), Path("c.txt"), Path("i.gguf"), 512, 32, 1)
    assert im[:5] == ["/bin/im", "-m", "f16.gguf", "-f", "c.txt"]
    assert "--parse-special" in im and "--no-ppl" in im
    for flag, value in (
        ("-c", "512"),
        ("--chunks", "32"),
        ("-t", "1"),
        ("-o", "i.gguf"),
        ("--output-format", "gguf"),
    ):
        assert im[im.index(flag) + 1] == value
    assert lq.quantize_cmd(t / "q", Path("f16.gguf"), Path("i.gguf"), Path("o.gguf"), "Q3_K_M", 1) == [
        "/bin/q", "--allow-requantize", "--imatrix", "i.gguf", "f16.gguf", "o.gguf", "Q3_K_M", "1"
    ]  # fmt: skip


def test_parse_imatrix_chunks():
    log = (
        "0.00.276.856 I compute_imatrix: tokenization took 33.744 ms\n"
        "0.00.276.915 I compute_imatrix: computing over 32 chunks, n_ctx=512, batch_size=2048, n_seq=4\n"
    )
    assert lq.parse_imatrix_chunks(log) == 32
    assert lq.parse_imatrix_chunks("tokenizing the input ..\n") is None


def test_generic_command_names_seed_and_type():
    cmd = ["/x/llama-quantize", "--imatrix", "/o-d1/imatrix-d1.gguf", "/o-d1/f16.gguf", "/o-d1/Q4_K_M-d1.gguf",
           "Q4_K_M", "1"]  # fmt: skip
    assert lq.generic(cmd, 1, "Q4_K_M") == [
        "/x/llama-quantize", "--imatrix", "/o-d1/imatrix-dS.gguf", "/o-d1/f16.gguf", "/o-d1/TYPE-dS.gguf", "TYPE", "1"
    ]  # fmt: skip
    assert lq.generic(["e", "/o/Q3_K_S-d2.gguf", "--text", "/t/wiki.txt"], 2, "Q3_K_S") == [
        "e", "/o/TYPE-dS.gguf", "--text", "/t/wiki.txt"
    ]  # fmt: skip


# ---------------------------------------------------------------------------------------------------------------
# calibration text


# a toy tokenizer: ids are pieces; encoding joins "\n" "\n" into "\n\n" at the end of a text (as byte-level BPE does
# at the end of a fragment) and is otherwise greedy over the pieces
PIECES = ["<|endoftext|>", "ab", "c", " d", "\n", "\n\n"]


def _decode(ids):
    return "".join(PIECES[i] for i in ids)


def _encode(text):
    ids = []
    while text:
        if text == "\n\n":
            return ids + [5]
        i = next(i for i in (1, 2, 3, 4) if text.startswith(PIECES[i]))
        ids.append(i)
        text = text[len(PIECES[i]) :]
    return ids


def test_calibration_text_replaces_each_windows_last_token_by_the_separator():
    windows = [[1, 2, 3], [3, 1, 2]]
    text, ids, seps = lq.calibration_text(windows, _decode, _encode, 0)
    assert text == "abc<|endoftext|> dab<|endoftext|>"
    assert ids == [1, 2, 0, 3, 1, 0]
    assert seps == [1, 1]


def test_calibration_text_trims_an_end_that_does_not_retokenize_as_itself():
    # window 0 without its last token ends in "\n" "\n", which would come back as one "\n\n" token: so two
    # separators; window 1 cannot be fixed within max_trim=1 and keeps one separator (the check then fails)
    windows = [[1, 4, 4, 2], [1, 4, 4, 2]]
    text, ids, seps = lq.calibration_text(windows, _decode, _encode, 0, max_trim=2)
    assert seps == [2, 2]
    assert text == "ab\n<|endoftext|><|endoftext|>" * 2
    assert ids == [1, 4, 0, 0, 1, 4, 0, 0]
    _, ids, seps = lq.calibration_text(windows[:1], _decode, _encode, 0, max_trim=1)
    assert seps == [1] and ids == [1, 4, 4, 0]


def test_alignment():
    expected = [1, 2, 0, 4, 1, 0]
    assert lq.alignment(expected, expected, 3) == {
        "tokens": 6, "expected_tokens": 6, "chunks_equal": 2, "chunks": 2, "aligned": True
    }  # fmt: skip
    # a merge across the first boundary: one token fewer, the second chunk shifted
    merged = [1, 2, 4, 1, 0]
    assert lq.alignment(merged, expected, 3) == {
        "tokens": 5, "expected_tokens": 6, "chunks_equal": 0, "chunks": 2, "aligned": False
    }  # fmt: skip
    # same length, one chunk differs
    assert lq.alignment([1, 2, 0, 4, 2, 0], expected, 3)["chunks_equal"] == 1


MODEL = lq.MODEL


@pytest.mark.slow  # reading the GGUF's tokenizer takes seconds
@pytest.mark.skipif(not MODEL.is_file(), reason=f"demo model not found: {MODEL}")
def test_calibration_text_retokenizes_to_the_windows_with_the_real_tokenizer(tmp_path):
    """On the demo model's tokenizer, windows cut at random token offsets of Wikipedia text come back as the same
    tokens, chunk for chunk, once each ends with the separator: the property llama-imatrix's chunking needs."""
    from spqr_run.calibration import windows_from_text
    from spqr_run.loading import open_model

    source = open_model(MODEL)
    tok = source.tokenizer
    calib = tmp_path / "calib.txt"
    calib.write_text(
        lq.CALIB.read_text(encoding="utf-8")[:60_000] if lq.CALIB.is_file() else "", encoding="utf-8"
    )
    if calib.stat().st_size == 0:
        pytest.skip(f"calibration text not found: {lq.CALIB}")
    windows = windows_from_text(calib, source, nsamples=24, seqlen=64, seed=1).tolist()
    sep = tok.encode(lq.SEPARATOR, add_bos=False, special=True)
    assert len(sep) == 1
    text, expected, seps = lq.calibration_text(
        windows, tok.decode, lambda t: tok.encode(t, add_bos=False, special=False), sep[0]
    )
    assert len(expected) == 24 * 64 and all(1 <= n <= lq.MAX_TRIM for n in seps)
    got = tok.encode(text, add_bos=False, special=True)
    assert lq.alignment(got, expected, 64)["aligned"]


# ---------------------------------------------------------------------------------------------------------------
# the table


def _rec(qtype, seed, wiki, book=None, bits=3.5):
    ppl = {"wiki": wiki} | ({"book": book} if book is not None else {})
    return {"type": qtype, "seed": seed, "bits": bits, "types": {"Q3_K": 60, "IQ4_NL": 30}, "ppl": ppl}


def test_summarize_loss_per_draw_and_mean():
    records = [
        _rec("Q3_K_M", 1, 22.0, 44.0),
        _rec("Q3_K_M", 0, 21.0, 42.0),
        _rec("Q4_K_M", 0, 20.5, bits=4.75),
    ]
    agg = lq.summarize(records, {"wiki": 20.0, "book": 40.0}, ["wiki", "book"])
    assert list(agg) == ["Q3_K_M", "Q4_K_M"]
    q3 = agg["Q3_K_M"]
    assert q3["seeds"] == [0, 1]
    assert q3["bits"] == 3.5
    assert q3["texts"]["wiki"]["loss"] == pytest.approx({"0": 0.05, "1": 0.10})
    assert q3["texts"]["wiki"]["mean_loss"] == pytest.approx(0.075)
    assert q3["texts"]["wiki"]["mean_ppl"] == pytest.approx(21.5)
    assert q3["texts"]["book"]["loss"] == pytest.approx({"0": 0.05, "1": 0.10})
    q4 = agg["Q4_K_M"]
    assert q4["bits"] == 4.75 and "book" not in q4["texts"]
    assert q4["texts"]["wiki"]["mean_loss"] == pytest.approx(0.025)
    # no reference for a text: perplexities but no loss
    assert "loss" not in lq.summarize(records, {}, ["wiki"])["Q3_K_M"]["texts"]["wiki"]


def test_markdown_table():
    records = [
        _rec("Q3_K_M", 0, 21.0, 42.0),
        _rec("Q3_K_M", 2, 22.0, 44.0),
        _rec("Q4_K_M", 0, 20.5, 41.0, 4.75),
    ]
    ref = {"wiki": 20.0, "book": 40.0}
    table = lq.markdown(["IQ3_S", "Q3_K_M", "Q4_K_M"], lq.summarize(records, ref, ["wiki", "book"]), ref,
                        ["wiki", "book"], [0, 1, 2])  # fmt: skip
    lines = table.splitlines()
    assert lines[0].startswith(
        "| llama.cpp type | draws | bits (linear layers) | wiki: loss per draw (d0, d1, d2) |"
    )
    rows = [
        ln for ln in lines if ln.startswith("| Q") or ln.startswith("| IQ") or ln.startswith("| reference")
    ]
    assert rows == [
        "| Q3_K_M | 2 | 3.500 | +5.00% / - / +10.00% | +7.50% | 21.500 | +5.00% / - / +10.00% | +7.50% | 43.000 |",
        "| Q4_K_M | 1 | 4.750 | +2.50% / - / - | +2.50% | 20.500 | +2.50% / - / - | +2.50% | 41.000 |",
        "| reference: the Q4_1 GGUF | - | - | - | +0.00% | 20.0000 | - | +0.00% | 40.0000 |",
    ]
    assert "- Q3_K_M: Q3_K 60, IQ4_NL 30" in lines


# ---------------------------------------------------------------------------------------------------------------
# running


def _settings(tmp_path):
    return lq.Settings(tmp_path, tmp_path / "m.gguf", tmp_path / "c.txt", {}, 32, 512, 8192, 1)


def test_step_reuses_a_matching_record_and_reruns_a_changed_one(tmp_path):
    out = tmp_path / "x.gguf"
    calls = []

    def run():
        calls.append(1)
        out.write_text("model")
        return {"n": len(calls)}

    r = lq.Runner(_settings(tmp_path), dry=False, log=lambda m: None)
    assert r._step(tmp_path / "x.json", [out], {"cmd": ["a"]}, run, "x") == {"n": 1}
    assert r._step(tmp_path / "x.json", [out], {"cmd": ["a"]}, run, "x") == {"n": 1}  # reused
    assert len(calls) == 1
    assert r._step(tmp_path / "x.json", [out], {"cmd": ["b"]}, run, "x") == {"n": 2}  # the command changed
    out.unlink()
    assert r._step(tmp_path / "x.json", [out], {"cmd": ["b"]}, run, "x") == {"n": 3}  # the output is gone
    dry = lq.Runner(_settings(tmp_path), dry=True, log=lambda m: None)
    assert dry._step(tmp_path / "x.json", [out], {"cmd": ["b"]}, run, "x") == {"n": 3}
    assert dry._step(tmp_path / "x.json", [out], {"cmd": ["c"]}, run, "x") is None  # --report runs nothing
    assert len(calls) == 3
    assert json.loads((tmp_path / "x.json").read_text()) == {"cmd": ["b"], "result": {"n": 3}}


def test_run_tool_failure_names_the_log_and_its_last_line(tmp_path):
    ok = lq._run_tool([sys.executable, "-c", "print('fine')"], tmp_path / "ok.log")
    assert set(ok) == {"seconds", "cpu_seconds"}
    assert (tmp_path / "ok.log").read_text().splitlines()[-1] == "fine"
    with pytest.raises(lq.QualityError, match=r"exit 3.*boom"):
        lq._run_tool([sys.executable, "-c", "print('boom'); raise SystemExit(3)"], tmp_path / "bad.log")


def test_report_on_an_empty_folder_runs_nothing(tmp_path, capsys):
    model, calib, text = tmp_path / "m.gguf", tmp_path / "c.txt", tmp_path / "t.txt"
    for p in (model, calib, text):
        p.write_text("x")
    out = tmp_path / "out"
    rc = lq.main(["--out-dir", str(out), "--model", str(model), "--calib", str(calib), "--text", f"t={text}",
                  "--types", "Q4_K_M,IQ3_S", "--draws", "2", "--report"])  # fmt: skip
    assert rc == 0
    printed = capsys.readouterr().out
    assert "Not finished (4 of 4): Q4_K_M-d0, IQ3_S-d0, Q4_K_M-d1, IQ3_S-d1." in printed
    assert sorted(p.name for p in out.iterdir()) == ["results.json"]
    assert json.loads((out / "results.json").read_text())["settings"]["types"] == ["Q4_K_M", "IQ3_S"]
