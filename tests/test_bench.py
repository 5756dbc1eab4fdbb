"""spqr-bench on CPU: the real command as a subprocess (JSON line with both methods and ratios), and the
report on a tiny config in process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from rich.console import Console
from tiny_configs import tiny_llama

from spqr_run.bench import BenchSettings, run_bench
from spqr_run.engine.planner import MiB, kv_bytes_per_token
from spqr_run.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
TINY = tiny_llama(
    vocab_size=256, intermediate_size=160, num_kv_heads=4, max_position_embeddings=512, name="tiny"
)


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny ops: one intra-op thread (on a busy shared CPU, a second one costs milliseconds an op)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_spqr_bench_cli_json_subprocess():
    cmd = [sys.executable, "-m", "spqr_run.cli.bench", "--synthetic", "llama-7b", "--layers", "1"]
    cmd += ["--device", "cpu", "--prompt-len", "8", "--new-tokens", "4", "--json"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # memory-bound matvecs; no thread contention
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["model"] == "llama-7b" and out["device"] == "cpu"
    for method in ("spqr", "fp16"):
        r = out[method]
        assert r["decode_tok_s"] > 0 and r["prefill_tok_s"] > 0 and r["ttft_ms"] > 0 and r["gb_s"] > 0
        assert r["ms_per_token"] == pytest.approx(1e3 / r["decode_tok_s"])
    assert 3.9 < out["spqr"]["bits_per_weight"] < 4.0  # 3.625 + 1% outliers * 32 bits + perm/row_ptr
    ratios = out["ratios"]
    assert ratios["decode_tok_s"] == pytest.approx(out["spqr"]["decode_tok_s"] / out["fp16"]["decode_tok_s"])
    assert set(ratios) >= {"decode_tok_s", "prefill_tok_s", "ttft", "weight_bytes"}
    assert out["settings"]["layers"] == 1 and out["skipped"] == {}
    assert out["fp16"]["dtype"] == "fp32"  # the key is the GPU name; the CPU baseline runs in fp32


def test_run_bench_tiny_report_and_table():
    st = BenchSettings(prompt_len=6, new_tokens=5, batch=2, warmup=0)
    report = run_bench(device=torch.device("cpu"), settings=st, synthetic=TINY)
    assert set(report.results) == {"spqr", "fp16"}
    s = report.results["spqr"]
    assert s.bytes_per_token < s.weight_bytes and not s.graphs and s.peak_bytes is None
    console = Console(width=200, record=True)
    console.print(report.table())
    text = console.export_text()
    assert "spqr/fp32" in text and "decode tok/s" in text  # the CPU baseline runs in fp32


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
        assert reports["auto"].results[method].kv_cache_bytes > 1.8 * int8


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
    """Piped (not a terminal): the whole table, not one cut to 80 columns; the CPU baseline is called fp32."""
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
    for column in ("weights GiB", "prefill tok/s", "decode tok/s", "ms/token", "TTFT ms", "GB/s", "peak GiB"):
        assert column in header, header  # one header line: no column squeezed or wrapped
    assert max(len(line) for line in lines) > 80
    rows = {line.split()[1] for line in lines if line.startswith("│")}
    assert {"spqr", "fp32", "spqr/fp32"} <= rows and "fp16" not in rows, rows
