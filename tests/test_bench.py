"""spqr-bench on CPU: the real command as a subprocess (JSON line with both methods, the engine, bytes read
per token, the bandwidth floor and ratios), the report on a tiny config in process, the decode-traffic
accounting against the native models' parts, and llama.cpp beside (a stand-in: no build in the tests)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from rich.console import Console
from tiny_configs import tiny_llama

from spqr_run.bench import BenchSettings, run_bench
from spqr_run.cpu import lib as native
from spqr_run.engine.planner import GiB, MiB, kv_bytes_per_token
from spqr_run.errors import ConfigError

LIB = native.load()

ROOT = Path(__file__).resolve().parents[1]
TINY = tiny_llama(
    vocab_size=256, intermediate_size=160, num_kv_heads=4, max_position_embeddings=512, name="tiny"
)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_spqr_bench_cli_json_subprocess():
    cmd = [sys.executable, "-m", "spqr_run.cli.bench", "--synthetic", "llama-7b", "--layers", "1"]
    cmd += ["--device", "cpu", "--prompt-len", "8", "--new-tokens", "4", "--json", "--threads", "1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # memory-bound matvecs; no thread contention
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["model"] == "llama-7b" and out["device"] == "cpu"
    for method in ("spqr", "fp16"):
        r = out[method]
        assert r["decode_tok_s"] > 0 and r["prefill_tok_s"] > 0 and r["ttft_ms"] > 0 and r["gb_s"] > 0
        assert r["ms_per_token"] == pytest.approx(1e3 / r["decode_tok_s"])
    ratios = out["ratios"]
    assert ratios["decode_tok_s"] == pytest.approx(out["spqr"]["decode_tok_s"] / out["fp16"]["decode_tok_s"])
    assert set(ratios) >= {"decode_tok_s", "prefill_tok_s", "ttft", "weight_bytes", "bytes_per_token"}
    assert out["settings"]["layers"] == 1 and out["skipped"] == {}
    for method in ("spqr", "fp16"):
        r = out[method]
        assert r["bytes_per_token"] == sum(r["traffic"].values())
        assert r["gb_s"] == pytest.approx(r["bytes_per_token"] / r["ms_per_token"] / 1e6)
        assert 0 < r["cpu_share"] < 1.2  # CPU time / (wall x threads) while decoding
    if LIB is None:  # PyTorch CPU path: fp32 dense copies, stored bits
        assert out["fp16"]["dtype"] == "fp32" and out["engine"].startswith("PyTorch CPU")
        return
    # native: 3-bit codes, nibble stats and fp16 second-order numbers hold 3.75 bits a weight, 1% outliers 0.48
    # (a 16-bit column and an fp32 value each in the CPU layout)
    assert 4.2 < out["spqr"]["bits_per_weight"] < 4.26
    assert out["fp16"]["dtype"] == "fp16" and out["fp16"]["bits_per_weight"] == 16.0  # a real fp16 model
    assert out["engine"] == f"native CPU ({native.isa_name()}, 1 threads)" and out["threads"] == 1
    assert out["isa"] == native.isa_name() and out["spqr"]["engine"] == out["fp16"]["engine"] == out["engine"]
    bw = out["bandwidth"]
    assert bw["threads"] == 1 and len(bw["samples"]) == 3 and bw["gb_s"] > 0  # one sample a repeat
    for method in ("spqr", "fp16"):
        r = out[method]
        assert r["floor_ms"] == pytest.approx(r["bytes_per_token"] / bw["gb_s"] / 1e6)
        assert r["floor_pct"] == pytest.approx(r["floor_ms"] / r["ms_per_token"] * 100)
    assert out["alternated"] and len(out["loadavg"]["before"]) == 3


def test_run_bench_tiny_report_and_table():
    st = BenchSettings(prompt_len=6, new_tokens=5, batch=2, warmup=0, repeats=2)
    report = run_bench(device=torch.device("cpu"), settings=st, synthetic=TINY)
    assert set(report.results) == {"spqr", "fp16"}
    s = report.results["spqr"]
    assert not s.graphs and s.peak_bytes is None and len(s.decode_samples_ms) == 2
    console = Console(width=250, record=True)
    console.print(report.table())
    text = console.export_text()
    dense = "fp16" if LIB is not None else "fp32"  # the native engine holds a real fp16 model
    assert f"spqr/{dense}" in text and "decode tok/s" in text and "% of floor" in text and "MB/token" in text
    assert report.engine in text and "read bandwidth" in text and "load average" in text


def _traffic_by_hand(model, context: int, kv_element: int) -> dict[str, int]:
    """What `decode_traffic` must count for a tiny native model, from its parts."""
    from spqr_run.cpu.embedding import Q8Embedding, Q8Linear
    from spqr_run.models.spqr_linear import SpQRLinear

    linears = 0
    for m in model.layers.modules():
        if isinstance(m, SpQRLinear):
            linears += sum(t.numel() * t.element_size() for t in m.native.tensors.values())
        elif isinstance(m, torch.nn.Linear):
            linears += m.weight.numel() * 2  # fp16, no bias
    emb, head = model.embed_tokens, model.lm_head
    if isinstance(emb, Q8Embedding):  # one 16-row tile of codes (the quad layout) and of fp16 scales
        blocks = -(-TINY.hidden_size // 64)  # a scale per row and 64 columns
        embedding = 16 * blocks * 64 + 16 * blocks * 2
        assert isinstance(head, Q8Linear)
        head_bytes = head.codes.numel() + head.scales.numel() * 2  # read whole
    else:
        embedding, head_bytes = TINY.hidden_size * 2, head.weight.numel() * 2
    norms = (2 * TINY.num_layers + 1) * TINY.hidden_size * 4
    kv = context * TINY.num_layers * 2 * TINY.num_kv_heads * TINY.head_dim * kv_element
    return {"linears": linears, "head": head_bytes, "embedding": embedding, "norms": norms, "kv_cache": kv}


@pytest.mark.skipif(LIB is None, reason="native CPU kernels unavailable")
@pytest.mark.parametrize("method", ["spqr", "fp16"])
def test_decode_traffic_counts_what_the_native_decoder_reads(method):
    from spqr_run.engine.synthetic import build_synthetic
    from spqr_run.engine.traffic import decode_context, decode_traffic

    model = build_synthetic(TINY, method=method, device="cpu")
    assert model.native is not None  # the same engine for both rows
    if method == "fp16":  # a real fp16 model: every matrix (embedding and head too) held in fp16
        mats = [p for n, p in model.named_parameters() if p.dim() == 2]
        assert mats and all(p.dtype == torch.float16 for p in mats)
    model.setup_caches(1, 64)  # fp16 keys and values under the native decoder
    t = decode_traffic(model, context=decode_context(8, 5))  # positions 8..12 read 9..13 keys: mean 11
    assert decode_context(8, 5) == 11
    assert asdict(t) == _traffic_by_hand(model, 11, 2)
    assert t.total == sum(asdict(t).values()) and t.weights == t.total - t.kv_cache
    model.setup_caches(1, 64, kind="int8")  # one byte a number + an fp32 scale per (position, head)
    t8 = decode_traffic(model, context=11)
    assert t8.kv_cache == 11 * TINY.num_layers * 2 * TINY.num_kv_heads * (TINY.head_dim + 4)


def test_read_bandwidth_samples_and_restores_torch_threads():
    from spqr_run.engine.traffic import ReadBandwidth

    before = torch.get_num_threads()
    bw = ReadBandwidth(2, nbytes=8 * 2**20)
    assert bw.sample(repeats=2) > 0 and bw.sample() > 0 and len(bw.samples) == 2
    assert bw.median == pytest.approx(sum(bw.samples) / 2) and bw.best == max(bw.samples)
    assert torch.get_num_threads() == before
    bw.close()


def test_llama_cpp_peer_runs_beside_and_gives_the_ratio(monkeypatch):
    """llama.cpp alternated with the repeats (a stand-in for llama-bench: no build in the tests)."""
    import spqr_run.engine.llama_cpp_peer as peer_mod

    calls = []

    class FakePeer:
        def __init__(self, gguf, *, threads, n_gen, build=False):
            calls.append(("init", gguf, threads, n_gen, build))
            self.samples = []

        def sample(self):
            self.samples.append(50.0 + len(self.samples))
            return self.samples[-1]

        def summary(self):
            return {
                "gguf": "m.gguf",
                "threads": 1,
                "n_gen": 3,
                "decode_tok_s": 51.0,
                "model_size_bytes": GiB // 4,
            }

    monkeypatch.setattr(peer_mod, "LlamaCppPeer", FakePeer)
    st = BenchSettings(prompt_len=4, new_tokens=3, warmup=0, repeats=3, llama_cpp="m.gguf")
    report = run_bench(device=torch.device("cpu"), settings=st, synthetic=TINY)
    assert calls == [("init", "m.gguf", report.threads, 3, False)]
    assert report.llama_cpp["decode_tok_s"] == 51.0
    ratio = report.ratios()["llama_cpp_decode_tok_s"]
    assert ratio == pytest.approx(report.results["spqr"].decode_tok_s / 51.0)
    console = Console(width=250, record=True)
    console.print(report.table())
    text = console.export_text()
    assert "llama.cpp (m.gguf)" in text and f"{ratio:.2f}x" in text and "spqr/llama.cpp" in text
    assert report.to_json()["llama_cpp"]["decode_tok_s"] == 51.0
    with pytest.raises(ConfigError, match="--device cpu"):
        run_bench(device=torch.device("meta"), settings=st, synthetic=TINY)


def test_gguf_for_and_the_default_peer(tmp_path, monkeypatch):
    """The GGUF a bench compares with: the model when it is one, or the GGUF beside a .spqr made from it; the
    CLI runs llama.cpp by default only when its build is cached."""
    import spqr_run.cli.bench as cli_bench
    import spqr_run.engine.llama_cpp_peer as peer_mod
    from spqr_run.engine.synthetic_file import write_synthetic_spqr

    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF" + bytes(60))
    assert peer_mod.gguf_for(gguf) == gguf
    spqr = write_synthetic_spqr(tmp_path / "m.spqr", TINY).path
    assert peer_mod.gguf_for(spqr) is None  # a synthetic file names no GGUF
    import json as _json

    from spqr_run.loading import spqr_file

    header = spqr_file.read_header(spqr)
    header["summary"]["source"] = "m.gguf"
    with spqr_file.safe_open(spqr, framework="pt") as f:
        tensors = [(n, (lambda n=n: spqr_file._read(spqr, [n], {})[n])) for n in f.keys()]
    quantized = tmp_path / "q.spqr"
    body = {
        k: v for k, v in _json.loads(_json.dumps(header)).items() if k not in ("format", "format_version")
    }
    spqr_file.write_spqr(quantized, body, tensors)
    assert peer_mod.gguf_for(quantized) == gguf
    gguf.unlink()
    assert peer_mod.gguf_for(quantized) is None  # not beside it: nothing to compare with
    gguf.write_bytes(b"GGUF" + bytes(60))
    monkeypatch.setattr(peer_mod, "cached_build_exists", lambda: False)
    assert cli_bench._default_llama_cpp(str(quantized)) is None  # never a minutes-long build by default
    monkeypatch.setattr(peer_mod, "cached_build_exists", lambda: True)
    assert cli_bench._default_llama_cpp(str(quantized)) == str(gguf)


def test_run_bench_with_int8_kv_cache():
    tokens = 6 + 3
    reports = {
        kind: run_bench(
            device=torch.device("cpu"),
            settings=BenchSettings(prompt_len=6, new_tokens=3, warmup=0, kv_cache=kind),
            synthetic=TINY,
        )
        for kind in ("auto", "int8")
    }
    assert reports["int8"].to_json()["settings"]["kv_cache"] == "int8"
    for method in ("spqr", "fp16"):
        int8 = reports["int8"].results[method].kv_cache_bytes
        assert int8 == tokens * kv_bytes_per_token(TINY, "int8")
        auto = reports["auto"].results[method].kv_cache_bytes  # fp16 (native) or fp32 numbers, no scales
        assert auto == tokens * kv_bytes_per_token(TINY, "fp16" if LIB is not None else "fp32") > 1.5 * int8


def test_run_bench_skips_what_does_not_fit_and_refuses_when_nothing_does():
    st = BenchSettings(prompt_len=4, new_tokens=2, budget_bytes=300 * MiB)
    with pytest.raises(ConfigError, match="nothing fits"):
        run_bench(device=torch.device("cpu"), settings=st, synthetic="llama-7b")
    with pytest.raises(ConfigError, match="exceeds the model's 512 positions"):
        run_bench(
            device=torch.device("cpu"),
            settings=BenchSettings(prompt_len=500, new_tokens=100),
            synthetic=TINY,
        )
    with pytest.raises(ConfigError, match="--new-tokens 0"):
        run_bench(device=torch.device("cpu"), settings=BenchSettings(new_tokens=0), synthetic="llama-7b")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_bench_cuda_graphs_and_peak_memory():
    st = BenchSettings(prompt_len=8, new_tokens=8, repeats=2)
    report = run_bench(device=torch.device("cuda"), settings=st, synthetic=TINY)
    f = report.results["fp16"]
    assert f.graphs and f.peak_bytes is not None and f.peak_bytes > f.weight_bytes


def test_piped_table_is_sized_to_its_content_and_labels_the_real_dtype(monkeypatch, capsys):
    """Piped (not a terminal): the whole table, not one cut to 80 columns; the dense row is named by what it
    holds (fp16 on the native engine, fp32 on the PyTorch CPU path)."""
    import spqr_run.cli.bench as cli_bench

    report = run_bench(
        device=torch.device("cpu"),
        settings=BenchSettings(prompt_len=4, new_tokens=2, warmup=0),
        synthetic=TINY,
    )
    monkeypatch.setattr(cli_bench, "run_bench", lambda **_: report)
    with pytest.raises(SystemExit) as e:
        cli_bench.main(["--synthetic", "llama-7b", "--device", "cpu"])
    assert e.value.code == 0
    lines = capsys.readouterr().out.splitlines()
    header = next(line for line in lines if "bits/w" in line)
    columns = (
        "weights GiB",
        "MB/token",
        "prefill tok/s",
        "decode tok/s",
        "ms/token",
        "floor ms",
        "% of floor",
    )
    for column in (*columns, "GB/s", "TTFT ms", "peak GiB"):
        assert column in header, header  # one header line: no column squeezed or wrapped
    assert max(len(line) for line in lines) > 80
    rows = {line.split()[1] for line in lines if line.startswith("│")}
    dense = "fp16" if LIB is not None else "fp32"
    assert {"spqr", dense, f"spqr/{dense}"} <= rows, rows
