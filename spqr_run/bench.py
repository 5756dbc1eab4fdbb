"""`spqr-bench` core: SpQR against its dense counterpart on the same engine, side by side in one run.

The dense baseline is called "fp16" in the JSON keys (its name on GPUs); each result's `dtype` says what it
really ran in (fp32 on CPUs), and the table labels the row with it.

For each method: build the model (a synthetic one, or a real file and a synthetic counterpart of the same
config), check that it fits the memory budget (`engine.planner`), then time
- prefill: the whole prompt (B, P) in one forward, median over repeats -> prefill tok/s;
- time to first token: prefill + greedy pick copied to the host, wall clock;
- decode: N greedy steps fed back on the device (`GraphDecodeStep`, a CUDA graph on GPUs) -> tok/s,
  ms/token, and effective GB/s = weight bytes read per step / time per step.
On CUDA: device events, warm-up, medians over repeats, peak memory after the build. On CPU: perf_counter,
so the command runs anywhere (numbers there only say that it works).
"""

from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from rich.table import Table
from rich.text import Text

from spqr_run.config import ModelConfig
from spqr_run.engine.graphs import GraphDecodeStep
from spqr_run.engine.planner import (
    TORCH_KV_DTYPES,
    GiB,
    apply_budget,
    default_budget,
    dense_weight_bytes,
    kv_dtype_of,
    module_weight_bytes,
    plan_memory,
    resident_bytes,
)
from spqr_run.engine.synthetic import build_synthetic, synthetic_config, synthetic_weight_bytes
from spqr_run.errors import ConfigError
from spqr_run.models.decoder import Decoder

METHODS = ("spqr", "fp16")


@dataclass
class BenchSettings:
    prompt_len: int = 32
    new_tokens: int = 128
    batch: int = 1
    repeats: int | None = None  # default: 5 on CUDA, 1 on CPU
    warmup: int | None = None  # default: 1 on CUDA, 0 on CPU
    graphs: bool = True
    layers: int | None = None
    wbits: int = 3
    outlier_rate: float = 0.01
    budget_bytes: int | None = None  # None: the device's free memory minus a reserve
    kv_cache: str = "auto"  # "int8": the 8-bit KV cache (models.kv_cache)
    verify_checksums: bool = True  # check a .spqr's tensors against its header's checksums when loading

    @classmethod
    def from_args(cls, args: Any) -> BenchSettings:
        """From parsed command-line flags (`--prompt-len`, ..., `--gpu-memory`); absent flags keep defaults."""
        from spqr_run.engine.planner import parse_memory

        names = (
            "prompt_len",
            "new_tokens",
            "batch",
            "repeats",
            "layers",
            "wbits",
            "outlier_rate",
            "kv_cache",
        )
        kwargs = {n: getattr(args, n) for n in names if getattr(args, n, None) is not None}
        memory = getattr(args, "gpu_memory", None)
        return cls(
            **kwargs,
            graphs=not getattr(args, "no_graphs", False),
            verify_checksums=not getattr(args, "skip_checksums", False),
            budget_bytes=None if memory is None else parse_memory(memory),
        )

    def check(self) -> None:
        for name in ("prompt_len", "new_tokens", "batch"):
            if getattr(self, name) < 1:
                raise ConfigError(f"invalid --{name.replace('_', '-')} {getattr(self, name)}: must be >= 1")
        if self.repeats is not None and self.repeats < 1:
            raise ConfigError(f"invalid --repeats {self.repeats}: must be >= 1")


@dataclass
class MethodResult:
    method: str
    weight_bytes: int  # as stored (packed for spqr)
    bytes_per_token: int  # weights read by one decode step (embedding table excluded unless tied)
    bits_per_weight: float  # linears only, as stored
    prefill_tok_s: float
    decode_tok_s: float
    ms_per_token: float
    ttft_ms: float
    gb_s: float
    peak_bytes: int | None  # torch.cuda.max_memory_allocated after the build (None on CPU)
    kv_cache_bytes: int  # the KV cache allocated for batch x (prompt + new tokens)
    graphs: bool
    source: str  # "synthetic" or the model file
    dtype: str = "fp16"  # what the dense weights and activations are held in: fp16 on GPUs, fp32 on CPUs

    @property
    def label(self) -> str:
        """The table's name for this row: "spqr", or the dense baseline's real dtype ("fp32" on a CPU)."""
        return self.method if self.method == "spqr" else self.dtype


@dataclass
class BenchReport:
    model: str
    device: str
    settings: BenchSettings
    results: dict[str, MethodResult] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)  # method -> why (does not fit, ...)
    gpu_kernels: str = ""  # the SpQR layers' GPU kernel path and why (spqr_run.ops.kernel_path), on a GPU

    def ratios(self) -> dict[str, float]:
        s, f = self.results.get("spqr"), self.results.get("fp16")
        if s is None or f is None:
            return {}
        r = {
            "decode_tok_s": s.decode_tok_s / f.decode_tok_s,
            "prefill_tok_s": s.prefill_tok_s / f.prefill_tok_s,
            "ttft": s.ttft_ms / f.ttft_ms,
            "weight_bytes": s.weight_bytes / f.weight_bytes,
        }
        if s.peak_bytes and f.peak_bytes:
            r["peak_memory"] = s.peak_bytes / f.peak_bytes
        return r

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"model": self.model, "device": self.device, "settings": asdict(self.settings)}
        out |= {m: asdict(r) for m, r in self.results.items()}
        out["ratios"] = self.ratios()
        out["skipped"] = self.skipped
        if self.gpu_kernels:
            out["gpu_kernels"] = self.gpu_kernels
        return out

    def table(self) -> Table:
        """The report as a rich Table (the model name is printed literally, never as markup)."""
        st = self.settings
        t = Table(
            title=Text(
                f"{self.model} on {self.device}: batch {st.batch}, prompt {st.prompt_len}, "
                f"{st.new_tokens} new tokens" + (f", {st.kv_cache} KV cache" if st.kv_cache != "auto" else "")
            )
        )
        cols = ["", "bits/w", "weights GiB", "prefill tok/s", "decode tok/s", "ms/token", "TTFT ms", "GB/s"]
        for c in [*cols, "peak GiB", "graphs"]:
            t.add_column(c, justify="left" if c == "" else "right")
        for r in self.results.values():
            peak = "-" if r.peak_bytes is None else f"{r.peak_bytes / GiB:.2f}"
            t.add_row(
                r.label,
                f"{r.bits_per_weight:.2f}",
                f"{r.weight_bytes / GiB:.2f}",
                f"{r.prefill_tok_s:.1f}",
                f"{r.decode_tok_s:.1f}",
                f"{r.ms_per_token:.2f}",
                f"{r.ttft_ms:.1f}",
                f"{r.gb_s:.1f}",
                peak,
                "yes" if r.graphs else "no",
            )
        ratios = self.ratios()
        if ratios:
            t.add_row(
                f"spqr/{self.results['fp16'].label}",
                "",
                f"{ratios['weight_bytes']:.2f}x",
                f"{ratios['prefill_tok_s']:.2f}x",
                f"{ratios['decode_tok_s']:.2f}x",
                "",
                f"{ratios['ttft']:.2f}x",
                "",
                f"{ratios['peak_memory']:.2f}x" if "peak_memory" in ratios else "",
                "",
            )
        for m, why in self.skipped.items():
            t.add_row("spqr" if m == "spqr" else "dense", Text(f"skipped: {why}"))
        if self.gpu_kernels:
            t.caption = Text(f"GPU kernels: {self.gpu_kernels}")
        return t


# ---- timing -------------------------------------------------------------------------------------
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_region(fn: Callable[[], object], device: torch.device, *, repeats: int, warmup: int) -> float:
    """Median seconds of `fn` (device events on CUDA, perf_counter elsewhere) after `warmup` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def decode_bytes_per_token(model: Decoder) -> int:
    """Weights one decode step reads: everything stored except the embedding table (one row of it is read),
    which is read whole when it doubles as the LM head."""
    total = module_weight_bytes(model)
    if model.lm_head is not None:
        emb = model.embed_tokens.weight
        total -= emb.numel() * emb.element_size()
    return total


def linear_bits(model: Decoder) -> float:
    """Stored bits per weight of the decoder blocks' linears."""
    nbytes = module_weight_bytes(model.layers)
    norms = sum(p.numel() * p.element_size() for n, p in model.layers.named_parameters() if "norm" in n)
    params = sum(o * i for o, i in model.config.linear_shapes().values()) * len(model.layers)
    return (nbytes - norms) * 8 / params


@torch.inference_mode()
def bench_model(
    model: Decoder,
    method: str,
    st: BenchSettings,
    *,
    source: str,
    log: Callable[[str], None] = lambda _: None,
) -> MethodResult:
    """Time one built model (see the module docstring). Allocates its KV cache for prompt + new tokens."""
    device = model.device
    cuda = device.type == "cuda"
    repeats = st.repeats or (5 if cuda else 1)
    warmup = st.warmup if st.warmup is not None else int(cuda)
    b, p, n = st.batch, st.prompt_len, st.new_tokens
    model.setup_caches(b, p + n, kind=st.kv_cache)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    gen = torch.Generator(device=device).manual_seed(1)
    prompt = torch.randint(0, model.config.vocab_size, (b, p), generator=gen, device=device)  # (B, P)
    positions = torch.arange(p, device=device).expand(b, p)  # (B, P)

    def prefill() -> torch.Tensor:
        return model(prompt, positions, kv_len=p, last_only=True)  # (B, 1, V)

    prefill_s = time_region(prefill, device, repeats=repeats, warmup=warmup)
    ttft = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        first = prefill().argmax(dim=-1)  # (B, 1)
        first.tolist()  # the token reaches the host
        ttft.append(time.perf_counter() - t0)
    step = _decode_step(model, b, st.graphs and device.type == "cuda", log)
    start_pos = torch.full((b, 1), p, device=device)  # (B, 1)

    def decode() -> None:
        step.greedy(first, start_pos)
        for _ in range(n - 1):
            step.advance_greedy()

    decode_s = time_region(decode, device, repeats=repeats, warmup=warmup)
    per_token = decode_s / n
    read = decode_bytes_per_token(model)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    return MethodResult(
        method=method,
        weight_bytes=module_weight_bytes(model),
        bytes_per_token=read,
        bits_per_weight=linear_bits(model),
        prefill_tok_s=b * p / prefill_s,
        decode_tok_s=b / per_token,
        ms_per_token=per_token * 1e3,
        ttft_ms=statistics.median(ttft) * 1e3,
        gb_s=read / per_token / 1e9,
        peak_bytes=peak,
        kv_cache_bytes=resident_bytes(model)[1],
        graphs=step.graphed,
        source=source,
        dtype=TORCH_KV_DTYPES.get(model.embed_tokens.weight.dtype, str(model.embed_tokens.weight.dtype)),
    )


def _decode_step(model: Decoder, batch: int, graphs: bool, log: Callable[[str], None]) -> GraphDecodeStep:
    if graphs:
        try:
            return GraphDecodeStep(model, batch, use_graph=True)
        except RuntimeError as e:
            log(f"decode runs eagerly: {e}")
    return GraphDecodeStep(model, batch, use_graph=False)


# ---- whole runs ---------------------------------------------------------------------------------
def _release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _fits(cfg: ModelConfig, weight_bytes: int, st: BenchSettings, budget: int, quantized: bool) -> str | None:
    try:
        plan_memory(
            cfg,
            weight_bytes=weight_bytes,
            budget_bytes=budget,
            batch=st.batch,
            quantized=quantized,
            context=min(st.prompt_len + st.new_tokens, cfg.max_position_embeddings),
            kv_dtype=kv_dtype_of(st.kv_cache, torch.float16),  # planned as on a GPU (CPU caches are fp32)
        )
    except ConfigError as e:
        return str(e)
    return None


def run_bench(
    *,
    device: torch.device,
    settings: BenchSettings,
    synthetic: str | ModelConfig | None = None,
    model_path: str | None = None,
    log: Callable[[str], None] = lambda _: None,
) -> BenchReport:
    """Benchmark a synthetic model by name, or a real model file against a synthetic counterpart of the
    same config (a .spqr file is the SpQR entry; an HF folder / GGUF file is the FP16 entry)."""
    st = settings
    st.check()
    if (synthetic is None) == (model_path is None):
        raise ConfigError("give a model file or --synthetic NAME (one of them)")
    budget = st.budget_bytes if st.budget_bytes is not None else default_budget(device)
    if st.budget_bytes is not None:
        apply_budget(device, st.budget_bytes)
    source = None
    if model_path is not None:
        if st.layers is not None:
            raise ConfigError("--layers only applies to --synthetic models")
        from spqr_run.loading import open_model

        source = open_model(model_path, verify_checksums=st.verify_checksums)
        cfg = source.config
        real_method = "spqr" if source.kind == "spqr" else "fp16"
        name = cfg.name or model_path
    else:
        assert synthetic is not None
        cfg = synthetic_config(synthetic, layers=st.layers)
        real_method, name = None, cfg.name or "synthetic"
    if st.prompt_len + st.new_tokens > cfg.max_position_embeddings:
        raise ConfigError(
            f"prompt + new tokens = {st.prompt_len + st.new_tokens} exceeds the model's "
            f"{cfg.max_position_embeddings} positions"
        )
    report = BenchReport(model=name, device=_device_name(device), settings=st)
    cpu_dense = 4 if device.type == "cpu" else 0  # CPUs keep fp32 dense copies (SpQR too)
    for method in METHODS:
        real = method == real_method
        if real and source is not None and source.kind == "spqr":
            need = int(source.info.get("file_bytes", 0))
        elif real:
            need = dense_weight_bytes(cfg)
        else:
            need = synthetic_weight_bytes(cfg, method=method, wbits=st.wbits, outlier_rate=st.outlier_rate)
        if cpu_dense:
            need = dense_weight_bytes(cfg, cpu_dense) + (need if method == "spqr" else 0)
        why = _fits(cfg, need, st, budget, quantized=method == "spqr")
        if why is not None:
            report.skipped[method] = why
            log(f"{method}: skipped ({why})")
            continue
        log(f"{method}: building {'from ' + str(model_path) if real else 'synthetic'} model on {device}")
        if real:
            from spqr_run.devices import default_dtype
            from spqr_run.loading import build_decoder

            assert source is not None
            model = build_decoder(source, device=device, dtype=default_dtype(device))
        else:
            model = build_synthetic(
                cfg, method=method, wbits=st.wbits, outlier_rate=st.outlier_rate, device=device
            )
        if method == "spqr" and device.type == "cuda":
            from spqr_run.ops import model_kernel_path, prepare_kernels

            prepare_kernels(model)
            path = model_kernel_path(model)
            report.gpu_kernels = str(path) if path is not None else "no packed SpQR layer"
            log(f"spqr: GPU kernels: {report.gpu_kernels}")
        log(f"{method}: timing")
        report.results[method] = bench_model(
            model, method, st, source=str(model_path) if real else "synthetic", log=log
        )
        del model
        _release(device)
    if not report.results:
        raise ConfigError(f"nothing fits: {'; '.join(report.skipped.values())}")
    return report


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return "cpu"
