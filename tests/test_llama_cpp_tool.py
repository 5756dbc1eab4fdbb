"""benchmarks/llama_cpp.py without building llama.cpp: the parser of llama-bench's JSON (on output captured
from a real run), the cache paths and the completion marker, the one-line errors when a tool is missing, and
run_llama_bench end to end against a stand-in llama-bench script."""

from __future__ import annotations

import json
import os
import stat
import sys
from pathlib import Path

import pytest

from benchmarks import llama_cpp as lc

# `llama-bench -m SmolLM2-135M-Instruct.Q4_1.gguf -t 1 -n 128 -p 0 -r 3 -o json` (stdout), llama.cpp 0c1e570
# from llama-cpp-python 0.3.36 built by this tool, on the 2-core AMD EPYC dev machine.
SAMPLE_TG = """[
  {
    "build_commit": "0c1e570",
    "build_number": 1,
    "cpu_info": "AMD EPYC",
    "gpu_info": "",
    "backends": "CPU",
    "model_filename": "/work/shared/data/SmolLM2-135M-Instruct.Q4_1.gguf",
    "model_type": "llama 256M Q4_1",
    "model_size": 96576768,
    "model_n_params": 134515008,
    "n_batch": 2048,
    "n_ubatch": 512,
    "n_threads": 1,
    "cpu_mask": "0x0",
    "cpu_strict": false,
    "poll": 50,
    "type_k": "f16",
    "type_v": "f16",
    "n_gpu_layers": -1,
    "n_cpu_moe": 0,
    "split_mode": "layer",
    "main_gpu": 0,
    "no_kv_offload": false,
    "flash_attn": -1,
    "devices": "auto",
    "tensor_split": "0.00",
    "tensor_buft_overrides": "none",
    "load_mode": "auto",
    "lazy_mode": "auto",
    "embeddings": false,
    "no_op_offload": 0,
    "no_host": false,
    "repack": true,
    "fit_target": 0,
    "fit_min_ctx": 0,
    "n_prompt": 0,
    "n_gen": 128,
    "n_depth": 0,
    "test_time": "2026-12-07T12:53:44Z",
    "avg_ns": 1451191030,
    "stddev_ns": 26616227,
    "avg_ts": 88.223023,
    "stddev_ts": 1.603877,
    "samples_ns": [ 1481371115, 1441130300, 1431071676 ],
    "samples_ts": [ 86.4064, 88.8192, 89.4435 ]
  }
]
"""


def sample_with_prompt_test() -> str:
    """The sample with a prompt test first, as `-p 64 -n 16 -r 2` prints it (numbers of such a real run)."""
    decode = json.loads(SAMPLE_TG)[0]
    prompt = dict(
        decode, n_prompt=64, n_gen=0, avg_ts=121.636866, stddev_ts=15.498303, samples_ts=[110.678, 132.596]
    )
    decode = dict(decode, n_gen=16, avg_ts=66.529452, stddev_ts=16.649701, samples_ts=[54.7563, 78.3026])
    return json.dumps([prompt, decode], indent=2)


# --- parsing -----------------------------------------------------------------------------------------


def test_parse_real_decode_output():
    tests = lc.parse_llama_bench_json(SAMPLE_TG)
    assert len(tests) == 1
    s = lc.summarize_llama_bench(tests)
    assert s["decode_tok_s"] == pytest.approx(88.223023)
    assert s["decode_tok_s_stddev"] == pytest.approx(1.603877)
    assert s["decode_samples_tok_s"] == pytest.approx([86.4064, 88.8192, 89.4435])
    assert s["decode_tokens"] == 128
    assert s["model_size_bytes"] == 96576768
    assert s["model_n_params"] == 134515008
    assert s["model_type"] == "llama 256M Q4_1"
    assert s["n_threads"] == 1
    assert s["build_commit"] == "0c1e570"
    assert "prompt_tok_s" not in s


def test_parse_prompt_and_decode_tests():
    s = lc.summarize_llama_bench(lc.parse_llama_bench_json(sample_with_prompt_test()))
    assert (s["prompt_tokens"], s["prompt_tok_s"]) == (64, pytest.approx(121.636866))
    assert (s["decode_tokens"], s["decode_tok_s"]) == (16, pytest.approx(66.529452))


def test_parse_tolerates_a_line_before_the_array():
    assert lc.parse_llama_bench_json("warming up\n" + SAMPLE_TG)[0]["n_gen"] == 128


@pytest.mark.parametrize(
    "text, message",
    [
        ("", "no test results"),
        ("error: failed to load model", "no test results"),
        ("[]", "no test results"),
        ('[\n  {\n    "n_gen": 128,', "not valid JSON"),
        ('[{"n_prompt": 0, "n_gen": 128}]', "lacks avg_ts, stddev_ts"),
    ],
)
def test_parse_rejects_bad_output(text, message):
    with pytest.raises(lc.LlamaCppError, match=message):
        lc.parse_llama_bench_json(text)


# --- cache paths and the completion marker -------------------------------------------------------------


def test_cache_path_follows_xdg_cache_home():
    env = {"XDG_CACHE_HOME": "/data/cache", "HOME": "/home/u"}
    assert lc.build_dir(env=env) == Path("/data/cache/spqr-run/llama.cpp") / lc.LLAMA_CPP_PYTHON_VERSION
    assert lc.build_dir("9.9.9", env=env) == Path("/data/cache/spqr-run/llama.cpp/9.9.9")


@pytest.mark.parametrize("xdg", [None, "", "relative/cache"])
def test_cache_path_defaults_to_home_cache(xdg):
    env = {"HOME": "/home/u"} if xdg is None else {"HOME": "/home/u", "XDG_CACHE_HOME": xdg}
    assert lc.cache_root(env) == Path("/home/u/.cache/spqr-run/llama.cpp")


def make_build(folder: Path, tools=lc.TOOLS, marker: bool = True) -> Path:
    """A stand-in finished (or half-finished) build: empty executables and, if `marker`, build-info.json."""
    (folder / "bin").mkdir(parents=True)
    for tool in tools:
        path = folder / "bin" / tool
        path.write_text("#!/bin/sh\nexit 0\n")
        path.chmod(path.stat().st_mode | stat.S_IXUSR)
    if marker:
        (folder / lc.BUILD_INFO).write_text(json.dumps({"tools": list(lc.TOOLS)}))
    return folder


def test_only_a_marked_complete_build_counts(tmp_path):
    assert not lc.is_built(tmp_path / "absent")
    assert not lc.is_built(make_build(tmp_path / "no-marker", marker=False))
    assert not lc.is_built(make_build(tmp_path / "missing-tool", tools=lc.TOOLS[:-1]))
    assert lc.is_built(make_build(tmp_path / "complete"))


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    """An empty XDG cache; returns where the pinned build would go."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return lc.build_dir()


def test_cached_build_returns_at_once_without_cmake(cache, monkeypatch, capsys):
    make_build(cache)
    monkeypatch.setenv("PATH", "")  # no cmake, no compiler: a cached build must not look for them
    assert lc.build() == cache
    assert "already built" in capsys.readouterr().out
    assert lc.tool_path("quantize") == cache / "bin" / "llama-quantize"
    assert lc.tool_path("llama-imatrix") == cache / "bin" / "llama-imatrix"


def test_half_finished_build_is_refused_without_force(cache):
    make_build(cache, marker=False)
    with pytest.raises(lc.LlamaCppError, match="not a complete build.*--force"):
        lc.build()


# --- missing tools -------------------------------------------------------------------------------------


def test_tool_missing_is_one_line_error(cache, capsys):
    with pytest.raises(lc.LlamaCppError, match="llama-bench is not built .*llama_cpp.py build"):
        lc.tool_path("llama-bench")
    assert lc.main(["path", "quantize"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: llama-quantize is not built") and err.count("\n") == 1


def test_unknown_tool(cache):
    make_build(cache)
    with pytest.raises(lc.LlamaCppError, match="unknown llama.cpp tool 'llama-server'"):
        lc.tool_path("llama-server")


def write_script(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(0o755)
    return path


def fake_build_tools(bin_dir: Path) -> None:
    """cmake, gcc and g++ stand-ins that pass the prerequisite check (and would fail any real use)."""
    write_script(bin_dir / "cmake", "#!/bin/sh\necho 'cmake version 3.25.1'\n")
    write_script(bin_dir / "gcc", "#!/bin/sh\nexit 1\n")
    write_script(bin_dir / "g++", "#!/bin/sh\nexit 1\n")


def test_failed_build_leaves_no_build_behind(cache, tmp_path, monkeypatch):
    fake_build_tools(tmp_path / "bin")
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    bad = tmp_path / lc.SDIST_NAME
    bad.write_bytes(b"not the pinned sdist")
    with pytest.raises(
        lc.LlamaCppError, match=f"^{lc.SDIST_NAME} has sha256 .*the pin says {lc.SDIST_SHA256}$"
    ):
        lc.build(sdist=bad)
    assert not cache.exists()
    assert list(cache.parent.iterdir()) == []  # the partial folder is gone too
    with pytest.raises(lc.LlamaCppError, match="^sdist not found"):
        lc.build(sdist=tmp_path / "absent.tar.gz")


def test_missing_cmake_and_compilers(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    env = {"PATH": str(bin_dir)}
    with pytest.raises(lc.LlamaCppError, match="^cmake not found on PATH; install it"):
        lc.check_build_prerequisites(env)
    write_script(bin_dir / "cmake", "#!/bin/sh\necho 'cmake version 3.10.2'\n")
    with pytest.raises(lc.LlamaCppError, match="cmake 3.15 or newer is needed, found version 3.10"):
        lc.check_build_prerequisites(env)
    write_script(bin_dir / "cmake", "#!/bin/sh\necho 'cmake version 3.25.1'\n")
    with pytest.raises(lc.LlamaCppError, match="^no C compiler found"):
        lc.check_build_prerequisites(env)
    write_script(bin_dir / "gcc", "#!/bin/sh\n")
    with pytest.raises(lc.LlamaCppError, match="^no C\\+\\+ compiler found"):
        lc.check_build_prerequisites(env)
    write_script(bin_dir / "g++", "#!/bin/sh\n")
    found = lc.check_build_prerequisites(env)
    assert found == {
        "cmake": str(bin_dir / "cmake"),
        "cc": str(bin_dir / "gcc"),
        "cxx": str(bin_dir / "g++"),
        "generator": "",
    }


# --- run_llama_bench against a stand-in llama-bench ----------------------------------------------------


def fake_llama_bench(cache: Path, body: str) -> Path:
    make_build(cache)
    return write_script(cache / "bin" / "llama-bench", f"#!{sys.executable}\nimport sys\n{body}\n")


def test_run_llama_bench_end_to_end(cache, tmp_path):
    argv_file = tmp_path / "argv.json"
    fake_llama_bench(
        cache,
        f"import json; json.dump(sys.argv[1:], open({str(argv_file)!r}, 'w'))\n"
        f"block = bytearray(8 << 20)  # some memory for the peak-RSS reading\n"
        f"print({SAMPLE_TG!r})",
    )
    model = tmp_path / "m.gguf"
    model.write_bytes(b"GGUF")
    r = lc.run_llama_bench(model, threads=2, n_gen=64, reps=5)
    assert json.loads(argv_file.read_text()) == [
        "-m",
        str(model),
        "-t",
        "2",
        "-n",
        "64",
        "-p",
        "0",
        "-r",
        "5",
        "-o",
        "json",
    ]
    assert r["command"] == f"{cache / 'bin' / 'llama-bench'} -m {model} -t 2 -n 64 -p 0 -r 5 -o json"
    assert r["decode_tok_s"] == pytest.approx(88.223023)
    assert r["model_size_bytes"] == 96576768 and r["model_n_params"] == 134515008
    assert r["peak_rss_bytes"] > 8 << 20  # the child's own peak, in bytes
    assert 0 < r["cpu_s"] < 10 * r["wall_s"] and r["involuntary_switches"] >= 0
    assert r["llama_cpp_python"] == lc.LLAMA_CPP_PYTHON_VERSION
    json.dumps(r)  # the result is plain JSON for other scripts
    assert "decode (128 tokens, 1 threads): 88.22 +- 1.60 tok/s" in lc.format_bench(r)


def test_run_llama_bench_failure_is_one_line(cache, tmp_path):
    fake_llama_bench(cache, "sys.stderr.write('loading\\nerror: failed to load model\\n'); sys.exit(1)")
    model = tmp_path / "m.gguf"
    model.write_bytes(b"GGUF")
    with pytest.raises(
        lc.LlamaCppError, match=r"^llama-bench failed \(exit 1\): error: failed to load model$"
    ):
        lc.run_llama_bench(model, threads=1)


def test_run_llama_bench_needs_model_and_build(cache, tmp_path):
    with pytest.raises(lc.LlamaCppError, match="model not found"):
        lc.run_llama_bench(tmp_path / "absent.gguf", threads=1)
    model = tmp_path / "m.gguf"
    model.write_bytes(b"GGUF")
    with pytest.raises(lc.LlamaCppError, match="llama-bench is not built"):
        lc.run_llama_bench(model, threads=1)


def test_module_does_not_import_torch():
    import subprocess

    code = "import sys; from benchmarks import llama_cpp; sys.exit('torch' in sys.modules)"
    root = Path(__file__).resolve().parents[1]
    assert (
        subprocess.run(
            [sys.executable, "-c", code], cwd=root, env={**os.environ, "PYTHONPATH": str(root)}
        ).returncode
        == 0
    )
