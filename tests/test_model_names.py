"""Bare model names (issue 23 item 9): one rule in every command that takes a model (`default_model.find_model`):
MODEL as a path first, then, when it is a bare name, NAME, NAME.spqr or NAME.gguf in $SPQR_RUN_MODELS and the
checkout's models/; a name found nowhere is one line saying where it was looked for."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from test_cli import REPO, cli, one_error_line
from test_server_support import free_port

from spqr_run import default_model
from spqr_run.default_model import DefaultModelError, find_model
from tests.test_quantize_model import CORPUS
from tests.tiny_configs import write_tiny_hf_llama

pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory) -> Path:
    """A models folder holding one model, the tiny LLaMA as a Hugging Face folder named `tiny-llama`."""
    folder = tmp_path_factory.mktemp("my-models")
    (folder / "tiny-llama").mkdir()
    write_tiny_hf_llama(folder / "tiny-llama", CORPUS)
    return folder


def test_the_error_says_where_it_looked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SPQR_RUN_MODELS", str(tmp_path))
    checkout = tmp_path / "checkout"  # not the real models/: a prepared demo model there would be found
    monkeypatch.setattr(default_model, "CHECKOUT_ROOT", checkout)
    with pytest.raises(DefaultModelError) as e:
        find_model("SmolLM2-135M-Instruct.spqr")
    message = str(e.value)
    assert "\n" not in message and str(tmp_path) in message and str(checkout / "models") in message
    assert "SmolLM2-135M-Instruct.spqr" in message
    with pytest.raises(DefaultModelError, match="no such file or folder") as e:
        find_model(str(tmp_path / "sub" / "x.spqr"))  # a path is not looked up by name
    assert str(checkout / "models") not in str(e.value)  # and no folder was searched


COMMANDS = {
    "run": ["generate", "{m}", "--prompt", "the river", "--max-tokens", "2", "--device", "cpu"],
    "eval": ["{m}", "--text", "{text}", "--max-tokens", "40", "--seqlen", "16", "--device", "cpu"],
    "bench": ["{m}", "--prompt-len", "4", "--new-tokens", "2", "--device", "cpu"],
    "quantize": ["{m}", "-o", "{out}", "--nsamples", "2", "--seqlen", "16", "--calib", "{text}", "--device", "cpu"],
    "chat": ["{m}", "--plain", "--max-tokens", "2", "--device", "cpu"],
}  # fmt: skip


@pytest.mark.parametrize("command", sorted([*COMMANDS, "serve"]))
def test_every_command_refuses_an_unknown_name_in_one_line_naming_the_folders(
    command: str, tmp_path: Path
) -> None:
    template = COMMANDS.get(command, ["{m}", "--port", "0", "--device", "cpu"])
    args = [a.format(m="no-such-model", text=tmp_path / "t.txt", out=tmp_path / "o.spqr") for a in template]
    proc = cli(command, *args, env={"SPQR_RUN_MODELS": str(tmp_path)})
    assert proc.returncode == 2, proc.stderr
    line = one_error_line(proc.stderr)
    assert "model 'no-such-model' not found" in line and str(tmp_path) in line and "models" in line


@pytest.mark.slow
@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_command_finds_a_bare_name_in_the_models_folder(
    command: str, models_dir: Path, tmp_path: Path
) -> None:
    text = models_dir / "tiny-llama" / "calib.txt"
    args = [a.format(m="tiny-llama", text=text, out=tmp_path / "o.spqr") for a in COMMANDS[command]]
    proc = cli(command, *args, env={"SPQR_RUN_MODELS": str(models_dir)}, stdin="hello\n")
    assert proc.returncode == 0, proc.stderr[-2000:]


@pytest.mark.slow
def test_serve_finds_a_bare_name(models_dir: Path, tmp_path: Path) -> None:
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "SPQR_RUN_MODELS": str(models_dir)}
    log = (tmp_path / "serve.log").open("w")
    cmd = [sys.executable, "-m", "spqr_run.cli.serve", "tiny-llama", "--port", str(port), "--device", "cpu"]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                r = httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=2)
                if r.status_code == 200:
                    assert r.json()["data"][0]["id"] == "tiny-llama"
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        else:
            pytest.fail(f"server not ready: {(tmp_path / 'serve.log').read_text()[-2000:]}")
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=30)
