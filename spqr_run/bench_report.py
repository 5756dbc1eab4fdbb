"""`spqr-bench`'s results: one `MethodResult` per row, the `BenchReport` with its ratios, JSON and table.

Units: bytes (ints), tokens per second, milliseconds (`*_ms`), GB/s = 1e9 bytes per second, GiB = 2**30 bytes
in the table's "weights" and "peak" columns, MB = 1e6 bytes in "MB/token". What each number means is in
`spqr_run.bench` (how it is timed) and `spqr_run.engine.traffic` (what a decode step reads).
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from typing import Any

from rich.table import Table
from rich.text import Text

from spqr_run.bench_settings import BenchSettings
from spqr_run.engine.planner import GiB
from spqr_run.engine.traffic import MB


@dataclass
class MethodResult:
    method: str
    weight_bytes: int  # held by the built model (the CPU layout / int8 tables on the native path)
    bytes_per_token: int  # what one decode step reads (`traffic`'s total)
    # `engine.traffic.DecodeTraffic` by kind: linears, head, embedding, norms, kv_cache
    traffic: dict[str, int]
    bits_per_weight: float  # the decoder blocks' linears as held (bias included)
    prefill_tok_s: float
    decode_tok_s: float
    ms_per_token: float
    ttft_ms: float
    gb_s: float  # bytes_per_token / time per token
    peak_bytes: int | None  # torch.cuda.max_memory_allocated after the build (None on CPU)
    kv_cache_bytes: int  # the KV cache allocated for batch x (prompt + new tokens)
    graphs: bool
    source: str  # "synthetic" or the model file
    dtype: str = "fp16"  # what the dense baseline's weight matrices are held in ("spqr" rows: packed)
    engine: str = ""  # "native CPU (AVX-512 VNNI, 2 threads)", "PyTorch CPU", "CUDA (...)"
    decode_samples_ms: list[float] = field(default_factory=list)  # ms per token of every timed repeat
    # CPU time of this process (all threads) / (wall time x threads) while decoding, median over the repeats:
    # 1.0 = every thread ran all the time; less = the cores were shared with other processes
    cpu_share: float | None = None
    floor_ms: float | None = None  # bytes_per_token / the run's median read bandwidth (CPU, `set_floor`)
    floor_pct: float | None = None  # floor_ms / ms_per_token * 100

    def set_floor(self, bandwidth_gb_s: float) -> None:
        """The bandwidth floor of this row at a read bandwidth in GB/s, and the share of it reached."""
        self.floor_ms = self.bytes_per_token / (bandwidth_gb_s * 1e9) * 1e3
        self.floor_pct = self.floor_ms / self.ms_per_token * 100

    @property
    def label(self) -> str:
        """The table's name for this row: "spqr", or the dense baseline's real dtype (fp16, or fp32 on a CPU
        without the native kernels)."""
        return self.method if self.method == "spqr" else self.dtype


@dataclass
class BenchReport:
    model: str
    device: str
    settings: BenchSettings
    results: dict[str, MethodResult] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)  # method -> why (does not fit, ...)
    engine: str = ""  # the path both rows ran on
    isa: str | None = None  # native CPU: "AVX-512 VNNI", "AVX2", "portable C"
    threads: int | None = None  # CPU threads of the run (the native pool)
    alternated: bool = False  # the methods' repeats alternated (both models held at once)
    bandwidth: dict[str, Any] | None = None  # CPU read bandwidth in GB/s: run threads and 1 thread
    loadavg: dict[str, list[float]] = field(default_factory=dict)  # /proc/loadavg before / after
    llama_cpp: dict[str, Any] | None = None  # `LlamaCppPeer.summary()`
    gpu_kernels: str = ""  # the SpQR layers' GPU kernel path and why (spqr_run.ops.kernel_path), on a GPU

    def ratios(self) -> dict[str, float]:
        s, f = self.results.get("spqr"), self.results.get("fp16")
        r: dict[str, float] = {}
        if s is not None and f is not None:
            r = {
                "decode_tok_s": s.decode_tok_s / f.decode_tok_s,
                "prefill_tok_s": s.prefill_tok_s / f.prefill_tok_s,
                "ttft": s.ttft_ms / f.ttft_ms,
                "weight_bytes": s.weight_bytes / f.weight_bytes,
                "bytes_per_token": s.bytes_per_token / f.bytes_per_token,
            }
            if s.peak_bytes and f.peak_bytes:
                r["peak_memory"] = s.peak_bytes / f.peak_bytes
        if s is not None and self.llama_cpp:
            r["llama_cpp_decode_tok_s"] = s.decode_tok_s / self.llama_cpp["decode_tok_s"]
        return r

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"model": self.model, "device": self.device, "settings": asdict(self.settings)}
        out |= {
            "engine": self.engine,
            "isa": self.isa,
            "threads": self.threads,
            "alternated": self.alternated,
        }
        out |= {"bandwidth": self.bandwidth, "loadavg": self.loadavg, "llama_cpp": self.llama_cpp}
        if self.gpu_kernels:
            out["gpu_kernels"] = self.gpu_kernels
        out |= {m: asdict(r) for m, r in self.results.items()}
        out["ratios"] = self.ratios()
        out["skipped"] = self.skipped
        return out

    def title(self) -> str:
        st = self.settings
        text = (
            f"{self.model} on {self.device}, {self.engine}: batch {st.batch}, prompt {st.prompt_len}, "
            f"{st.new_tokens} new tokens" + (f", {st.kv_cache} KV cache" if st.kv_cache != "auto" else "")
        )
        if self.loadavg.get("before"):
            text += f"; load average {' '.join(f'{x:.2f}' for x in self.loadavg['before'])}"
        return text

    def bandwidth_line(self) -> str:
        """The read bandwidth the floors use, in words ("" on a GPU)."""
        bw = self.bandwidth
        if not bw:
            return ""
        line = (
            f"read bandwidth {bw['gb_s']:.1f} GB/s on {bw['threads']} thread(s) (median of {len(bw['samples'])} "
            f"samples between the timed runs, best {max(bw['samples']):.1f})"
        )
        if bw.get("single_gb_s") is not None:
            line += f"; 1 thread {bw['single_gb_s']:.1f} GB/s"
        return line + (", methods alternated" if self.alternated else ", methods one after the other")

    def table(self) -> Table:
        """The report as a rich Table (the model name is printed literally, never as markup)."""
        captions = [self.bandwidth_line()] if self.bandwidth else []
        if self.gpu_kernels:
            captions.append(f"GPU kernels: {self.gpu_kernels}")
        t = Table(title=Text(self.title()), caption=Text("\n".join(captions)) if captions else None)
        cols = ["", "bits/w", "weights GiB", "MB/token", "prefill tok/s", "decode tok/s", "ms/token"]
        cols += ["floor ms", "% of floor", "GB/s", "TTFT ms", "peak GiB", "graphs"]
        for c in cols:
            t.add_column(c, justify="left" if c == "" else "right")
        for r in self.results.values():
            t.add_row(
                r.label,
                f"{r.bits_per_weight:.2f}",
                f"{r.weight_bytes / GiB:.2f}",
                f"{r.bytes_per_token / MB:.1f}",
                f"{r.prefill_tok_s:.1f}",
                f"{r.decode_tok_s:.2f}",
                f"{r.ms_per_token:.2f}",
                "-" if r.floor_ms is None else f"{r.floor_ms:.2f}",
                "-" if r.floor_pct is None else f"{r.floor_pct:.0f}%",
                f"{r.gb_s:.1f}",
                f"{r.ttft_ms:.1f}",
                "-" if r.peak_bytes is None else f"{r.peak_bytes / GiB:.2f}",
                "yes" if r.graphs else "no",
            )
        ratios = self.ratios()
        if "decode_tok_s" in ratios:
            t.add_row(
                f"spqr/{self.results['fp16'].label}",
                "",
                f"{ratios['weight_bytes']:.2f}x",
                f"{ratios['bytes_per_token']:.2f}x",
                f"{ratios['prefill_tok_s']:.2f}x",
                f"{ratios['decode_tok_s']:.2f}x",
                "",
                "",
                "",
                "",
                f"{ratios['ttft']:.2f}x",
                f"{ratios['peak_memory']:.2f}x" if "peak_memory" in ratios else "",
                "",
            )
        if self.llama_cpp:
            lc = self.llama_cpp
            t.add_row(
                Text(f"llama.cpp ({os.path.basename(lc['gguf'])})"),
                "",
                f"{(lc.get('model_size_bytes') or 0) / GiB:.2f}",
                *[""] * 2,
                f"{lc['decode_tok_s']:.2f}",
                f"{1e3 / lc['decode_tok_s']:.2f}",
                *[""] * 6,
            )
            if "llama_cpp_decode_tok_s" in ratios:
                t.add_row("spqr/llama.cpp", *[""] * 4, f"{ratios['llama_cpp_decode_tok_s']:.2f}x", *[""] * 7)
        for m, why in self.skipped.items():
            t.add_row("spqr" if m == "spqr" else "dense", Text(f"skipped: {why}"))
        return t
