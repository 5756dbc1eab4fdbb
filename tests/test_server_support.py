"""Shared helpers for the server tests: start `spqr-serve` on the real model in a subprocess on a free port.

Servers are started once per test session and per argument list (`shared_server`) and stopped at exit, so
several test modules can use the same one. No tests live here.
"""

from __future__ import annotations

import atexit
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

REPO = Path(__file__).resolve().parents[1]
DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
MODEL = DATA / "SmolLM2-135M-Instruct.Q4_1.gguf"
API_KEY = "test-key-123"
MODEL_NAME = "smollm2"

needs_model = pytest.mark.skipif(
    not MODEL.exists(), reason=f"real model not found: {MODEL} (shared data absent)"
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    proc: subprocess.Popen
    port: int
    log: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def wait_ready(self, timeout: float = 180.0) -> None:
        """Poll /health until 200; fail with the server log when it dies or takes too long."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"server exited with {self.proc.returncode}:\n{self.log.read_text()[-3000:]}"
                )
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"server not ready after {timeout} s:\n{self.log.read_text()[-3000:]}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def start_server(*args: str, tmp: Path | None = None) -> Server:
    """Spawn `python -m spqr_run.cli.serve MODEL --port P *args` (not waiting for it to be ready)."""
    port = free_port()
    log = Path(tmp or tempfile.mkdtemp(prefix="spqr-serve-test-")) / f"spqr-serve-{port}.log"
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    # one thread: on a small shared CI box, OpenMP threads spinning against other processes cost far more
    # than they gain on a 135M model (SPQR_TEST_THREADS overrides)
    env["OMP_NUM_THREADS"] = os.environ.get("SPQR_TEST_THREADS", "1")
    cmd = [
        sys.executable,
        "-m",
        "spqr_run.cli.serve",
        str(MODEL),
        "--port",
        str(port),
        "--log-level",
        "warning",
    ]
    with log.open("w") as f:
        proc = subprocess.Popen([*cmd, *args], cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT)
    return Server(proc, port, log)


_SERVERS: dict[tuple[str, ...], Server] = {}


def shared_server(*args: str) -> Server:
    """One ready server per argument list for the whole session (stopped when the interpreter exits)."""
    if args not in _SERVERS:
        server = start_server(*args)
        atexit.register(server.stop)
        server.wait_ready()
        _SERVERS[args] = server
    return _SERVERS[args]


MAIN_ARGS = (
    "--parallel", "4", "--ctx", "1024", "--api-key", API_KEY, "--model-name", MODEL_NAME,
    "--max-body-bytes", "262144",
)  # fmt: skip


def main_server() -> Server:
    """The server most tests share: 4 slots, an API key, a 256 KiB body limit."""
    return shared_server(*MAIN_ARGS)


def metric(server: Server, name: str) -> float:
    """The value of an unlabelled metric from /metrics."""
    for line in httpx.get(f"{server.url}/metrics", timeout=10).text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise KeyError(name)
