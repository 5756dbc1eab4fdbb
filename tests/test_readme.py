"""The README's examples as a new user pastes them (issue 23 item 8): the serve example, run by bash exactly as
written (the model file and port swapped for the test's), prints an answer; and it says how to know the
server is ready, as `spqr-serve --help` does."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_server_support import MODEL, free_port, needs_model

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text(encoding="utf-8")
DEMO = "models/SmolLM2-135M-Instruct.spqr"


def serve_example() -> str:
    """The README's bash block that starts spqr-serve in the background and asks it a question."""
    blocks = re.findall(r"```bash\n(.*?)```", README, re.DOTALL)
    found = [b for b in blocks if "spqr-serve " in b and "&\n" in b and "curl" in b]
    assert len(found) == 1, "the README has one serve example"
    return found[0]


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def test_the_readme_and_help_say_how_to_know_the_server_is_ready() -> None:
    from spqr_run.cli.serve import DESCRIPTION

    for text in (README, DESCRIPTION):
        assert "/health" in text and "503" in text and "200" in text
    assert "--retry-connrefused" in serve_example()


def test_every_route_is_in_the_help_and_the_readme() -> None:
    """Issue 23: `spqr-serve --help` left out /tokenizer_info."""
    from spqr_run.cli.serve import DESCRIPTION
    from spqr_run.server.app import ROUTES

    for route in ROUTES:
        assert route in DESCRIPTION and f"`{route}`" in README, route


def test_the_readme_says_what_the_demo_leaves_in_models_and_why_the_spqr_is_larger() -> None:
    """Issue 23: the downloaded GGUF stays in models/ beside the .spqr, and the .spqr is the larger file
    because of its fp16 embeddings."""
    text = " ".join(README.split())
    assert "`SmolLM2-135M-Instruct.Q4_1.gguf` (94 MiB) beside it" in text
    assert "holds the token embeddings (49,152 x 576, shared with the output layer) in fp16" in text


@needs_model
@pytest.mark.slow
@pytest.mark.skipif(shutil.which("curl") is None, reason="the README example uses curl")
def test_the_serve_example_works_as_pasted(tmp_path: Path) -> None:
    port = free_port()
    script = serve_example()
    assert DEMO in script and "localhost:8000" in script and "--port" not in script
    script = script.replace(DEMO, f"{MODEL} --port {port} --device cpu").replace(
        "localhost:8000", f"localhost:{port}"
    )
    bin_dir = str(Path(sys.executable).parent)  # spqr-serve of this checkout's environment
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}", "OMP_NUM_THREADS": "1"}
    if shutil.which("spqr-serve", path=env["PATH"]) is None:
        pytest.skip("spqr-serve is not installed in this environment (pip install -e .)")
    out_file, err_file = (tmp_path / "out.txt").open("w"), (tmp_path / "err.txt").open("w")
    # files, not pipes: the server the example leaves in the background keeps its output open after bash ends
    proc = subprocess.Popen(
        ["bash", "-c", script], cwd=tmp_path, env=env, stdout=out_file, stderr=err_file,
        start_new_session=True,  # its own process group: the background server is stopped below
    )  # fmt: skip
    try:
        proc.wait(timeout=300)
    finally:
        # the server the example left running in the background: SIGTERM (a non-interactive shell starts
        # background jobs with SIGINT ignored), then wait until none of the group is left
        os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and _group_alive(proc.pid):
            time.sleep(0.1)
        if _group_alive(proc.pid):
            os.killpg(proc.pid, signal.SIGKILL)
        out_file.close(), err_file.close()
    out, err = (tmp_path / "out.txt").read_text(), (tmp_path / "err.txt").read_text()
    assert proc.returncode == 0, err[-3000:]
    answer = out.strip().splitlines()[-1]
    assert '"choices"' in answer and '"content"' in answer and '"model":"smol"' in answer, out
