"""llama.cpp beside `spqr-bench`: its `llama-bench` on the same GGUF and thread count, in the same run.

The build and the runner are `benchmarks/llama_cpp.py` of a source checkout (llama.cpp's tree from the pinned
`llama-cpp-python` sdist, built once for this CPU and cached under ~/.cache/spqr-run/llama.cpp/); an installed
package without the checkout has no peer and says so in one line. `LlamaCppPeer` runs `llama-bench` once per
`sample()` (one repetition after llama-bench's own warm-up), so a benchmark can alternate it with its own
timed runs and compare medians taken under the same load.
"""

from __future__ import annotations

import importlib.util
import statistics
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

from spqr_run.errors import ConfigError

CHECKOUT_MODULE = Path(__file__).resolve().parents[2] / "benchmarks" / "llama_cpp.py"


def llama_cpp_module() -> ModuleType | None:
    """`benchmarks/llama_cpp.py` of this source checkout, imported (None when spqr-run is not run from one)."""
    if "benchmarks.llama_cpp" in sys.modules:
        return sys.modules["benchmarks.llama_cpp"]
    if not CHECKOUT_MODULE.is_file():
        return None
    spec = importlib.util.spec_from_file_location("spqr_run_llama_cpp_tool", CHECKOUT_MODULE)
    if spec is None or spec.loader is None:
        return None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses / NamedTuples in it look their module up
    spec.loader.exec_module(module)
    return module


def gguf_for(model_path: str | Path) -> Path | None:
    """The GGUF to compare a model file with: the file itself when it is a GGUF, else for a `.spqr` quantized
    from a GGUF the source named in its header (`summary.source`) when that file lies beside it; else None."""
    path = Path(model_path)
    if not path.is_file():
        return None
    with path.open("rb") as f:
        if f.read(4) == b"GGUF":
            return path
    if path.suffix != ".spqr":
        return None
    from spqr_run.errors import ModelFormatError
    from spqr_run.loading.spqr_file import read_header

    try:
        source = read_header(path).get("summary", {}).get("source")
    except ModelFormatError:
        return None
    if not isinstance(source, str) or not source.endswith(".gguf"):
        return None
    beside = path.parent / Path(source).name
    return beside if beside.is_file() else None


def cached_build_exists() -> bool:
    """Whether llama.cpp's tools are built and cached for this checkout's pin (no build is started)."""
    tool = llama_cpp_module()
    return tool is not None and bool(tool.is_built(tool.build_dir()))


class LlamaCppPeer:
    """llama-bench on `gguf` with `threads` threads, `n_gen` generated tokens a sample.

    `build=True` builds the tools when they are not cached (minutes: a cmake build of llama.cpp); otherwise
    a missing build is a ConfigError naming the command that builds it."""

    def __init__(self, gguf: str | Path, *, threads: int, n_gen: int, build: bool = False) -> None:
        tool = llama_cpp_module()
        if tool is None:
            raise ConfigError(f"llama.cpp comparison needs a source checkout ({CHECKOUT_MODULE} is missing)")
        self.tool, self.gguf = tool, Path(gguf)
        if not self.gguf.is_file():
            raise ConfigError(f"--llama-cpp {gguf}: no such GGUF file")
        if not tool.is_built(tool.build_dir()):
            if not build:
                raise ConfigError("llama.cpp is not built; run: python benchmarks/llama_cpp.py build")
            tool.build()
        self.threads, self.n_gen = threads, n_gen
        self.runs: list[dict[str, Any]] = []

    def sample(self) -> float:
        """One llama-bench run (one repetition); returns its decode tok/s. ConfigError when it fails."""
        try:
            result = self.tool.run_llama_bench(self.gguf, self.threads, n_gen=self.n_gen, n_prompt=0, reps=1)
        except self.tool.LlamaCppError as e:
            raise ConfigError(f"llama.cpp: {e}") from None
        self.runs.append(result)
        return float(result["decode_tok_s"])

    @property
    def decode_tok_s(self) -> float:
        """Median decode tok/s over the samples."""
        return statistics.median(float(r["decode_tok_s"]) for r in self.runs)

    def summary(self) -> dict[str, Any]:
        """JSON-ready facts: median decode tok/s, the samples, llama.cpp's build, its peak RSS, a command."""
        last = self.runs[-1]
        return {
            "gguf": str(self.gguf),
            "threads": self.threads,
            "n_gen": self.n_gen,
            "decode_tok_s": self.decode_tok_s,
            "decode_samples_tok_s": [float(r["decode_tok_s"]) for r in self.runs],
            "peak_rss_bytes": max(int(r["peak_rss_bytes"]) for r in self.runs),
            "cpu_s": [r["cpu_s"] for r in self.runs],
            "wall_s": [r["wall_s"] for r in self.runs],
            "build_commit": last.get("build_commit"),
            "llama_cpp_python": last.get("llama_cpp_python"),
            "model_size_bytes": last.get("model_size_bytes"),
            "command": last.get("command"),
        }
