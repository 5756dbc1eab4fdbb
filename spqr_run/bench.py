"""`spqr-bench` core: SpQR against its dense counterpart on the same engine, side by side in one run.

For each method ("spqr", and the dense baseline "fp16"): build the model (a synthetic one, or a real file
and a synthetic counterpart of the same config), check that it fits the memory budget (`engine.planner`),
then per repeat time
- prefill: the whole prompt (B, P) in one forward -> prefill tok/s;
- time to first token: prefill + greedy pick copied to the host, wall clock;
- decode: N greedy steps fed back on the device (`GraphDecodeStep`, a CUDA graph on GPUs) -> tok/s,
  ms/token, and GB/s = bytes one step reads / time per step;
and report medians over the repeats (after `warmup` untimed runs).

Both methods run on the same engine. On a CPU with the native kernels (`spqr_run.cpu`) that is the native
decoder: SpQR linears from their packed bytes (int8 embedding and LM head), and the FP16 row a model whose
weight matrices are all fp16, read by the native dense kernel (fp32 arithmetic); the report names the path
(instruction set) and thread count. There, when both models fit the memory at once, the methods alternate
repeat by repeat (so a load change on a shared machine hits both), and between repeats the machine's read
bandwidth is sampled (`engine.traffic.ReadBandwidth`, same threads): the bandwidth floor of a row is
bytes read per token / that bandwidth, and "% of floor" is floor / measured time per token. Bytes read per
token are what decode reads (`engine.traffic.decode_traffic`: the linears as held, the LM head whole, one
embedding row, norms, and the KV cache up to each step's position), not what the file stores.

`settings.llama_cpp` (a GGUF path) adds llama.cpp's `llama-bench` on that file with the same threads and
tokens, alternated with the repeats (`engine.llama_cpp_peer`), and the ratio of decode speeds.

On CUDA: device events, warm-up, medians over repeats, peak memory after the build; methods one at a time.
Without the native kernels a CPU runs PyTorch (SpQR from a decoded dense copy, dense weights in fp32): the
table says so, and its numbers only show that the command works.
"""

from __future__ import annotations

import gc
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict

import torch

from spqr_run.bench_report import BenchReport, MethodResult
from spqr_run.bench_settings import BenchSettings
from spqr_run.config import ModelConfig
from spqr_run.engine.graphs import GraphDecodeStep
from spqr_run.engine.planner import (
    TORCH_KV_DTYPES,
    apply_budget,
    default_budget,
    dense_weight_bytes,
    kv_dtype_of,
    linear_params,
    plan_memory,
    resident_bytes,
)
from spqr_run.engine.synthetic import build_synthetic, synthetic_config, synthetic_weight_bytes
from spqr_run.engine.traffic import (
    BANDWIDTH_BUFFER_BYTES,
    ReadBandwidth,
    decode_context,
    decode_traffic,
    linear_read_bytes,
)
from spqr_run.errors import ConfigError
from spqr_run.models.decoder import Decoder

METHODS = ("spqr", "fp16")
__all__ = ["METHODS", "BenchReport", "BenchSettings", "MethodResult", "run_bench", "time_region"]


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


def held_linear_bits(model: Decoder) -> float:
    """Bits per weight the decoder blocks' linears hold (what a decode step reads of them; bias included)."""
    nbytes = sum(linear_read_bytes(m) for m in model.layers.modules())
    return nbytes * 8 / linear_params(model.config)


class _Subject:
    """One built model under test: its KV cache, prompt and decode step, and the samples taken of it."""

    def __init__(
        self, model: Decoder, method: str, st: BenchSettings, *, source: str, log: Callable[[str], None]
    ) -> None:
        self.model, self.method, self.st, self.source = model, method, st, source
        device = model.device
        b, p = st.batch, st.prompt_len
        model.setup_caches(b, p + st.new_tokens, kind=st.kv_cache)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        gen = torch.Generator(device=device).manual_seed(1)
        self.prompt = torch.randint(
            0, model.config.vocab_size, (b, p), generator=gen, device=device
        )  # (B, P)
        self.positions = torch.arange(p, device=device).expand(b, p)  # (B, P)
        self.start_pos = torch.full((b, 1), p, device=device)  # (B, 1)
        self.step = _decode_step(model, b, st.graphs and device.type == "cuda", log)
        self.prefill_s: list[float] = []
        self.ttft_s: list[float] = []
        self.decode_s: list[float] = []
        self.decode_cpu_s: list[float] = []  # this process's CPU time (all threads) during each timed decode

    def _prefill(self) -> torch.Tensor:
        return self.model(self.prompt, self.positions, kv_len=self.st.prompt_len, last_only=True)  # (B, 1, V)

    @torch.inference_mode()
    def run(self, *, record: bool = True) -> None:
        """One repeat: prefill, time to first token, decode of `new_tokens` tokens."""
        device = self.model.device
        prefill = time_region(self._prefill, device, repeats=1, warmup=0)
        _sync(device)
        t0 = time.perf_counter()
        first = self._prefill().argmax(dim=-1)  # (B, 1)
        first.tolist()  # the token reaches the host
        ttft = time.perf_counter() - t0

        def decode() -> None:
            self.step.greedy(first, self.start_pos)
            for _ in range(self.st.new_tokens - 1):
                self.step.advance_greedy()

        cpu0 = time.process_time()
        decode_s = time_region(decode, device, repeats=1, warmup=0)
        decode_cpu = time.process_time() - cpu0
        if record:
            self.prefill_s.append(prefill)
            self.ttft_s.append(ttft)
            self.decode_s.append(decode_s)
            self.decode_cpu_s.append(decode_cpu)

    def result(self, engine: str, threads: int | None = None) -> MethodResult:
        model, st = self.model, self.st
        b, n = st.batch, st.new_tokens
        per_token = statistics.median(self.decode_s) / n
        traffic = decode_traffic(model, context=decode_context(st.prompt_len, n))
        read = traffic.total
        device = model.device
        head = model.lm_head if model.lm_head is not None else model.embed_tokens
        weight = getattr(head, "weight", None)
        dtype = "int8" if weight is None else TORCH_KV_DTYPES.get(weight.dtype, str(weight.dtype))
        return MethodResult(
            method=self.method,
            weight_bytes=resident_bytes(model)[0],
            bytes_per_token=read,
            traffic=asdict(traffic),
            bits_per_weight=held_linear_bits(model),
            prefill_tok_s=b * st.prompt_len / statistics.median(self.prefill_s),
            decode_tok_s=b / per_token,
            ms_per_token=per_token * 1e3,
            ttft_ms=statistics.median(self.ttft_s) * 1e3,
            gb_s=read / per_token / 1e9,
            peak_bytes=torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
            kv_cache_bytes=resident_bytes(model)[1],
            graphs=self.step.graphed,
            source=self.source,
            dtype=dtype,
            engine=engine,
            decode_samples_ms=[s / n * 1e3 for s in self.decode_s],
            cpu_share=None
            if device.type != "cpu"
            else statistics.median(c / w for c, w in zip(self.decode_cpu_s, self.decode_s, strict=True))
            / (threads or 1),
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


def _native_cpu(device: torch.device) -> bool:
    if device.type != "cpu":
        return False
    from spqr_run.cpu import lib

    return lib.load() is not None


def engine_name(device: torch.device) -> tuple[str, str | None, int | None]:
    """(the engine in words, the ISA, the threads) that models on `device` run on."""
    if device.type == "cuda":
        return f"CUDA ({torch.cuda.get_device_name(device)})", None, None
    from spqr_run.cpu import lib

    native = lib.load()
    if native is None:
        return f"PyTorch CPU ({lib.unavailable_reason()})", None, torch.get_num_threads()
    threads = int(native.spqr_cpu_threads())
    return f"native CPU ({lib.isa_name()}, {threads} threads)", lib.isa_name(), threads


def _fits(
    cfg: ModelConfig,
    weight_bytes: int,
    st: BenchSettings,
    budget: int,
    *,
    quantized: bool,
    device: torch.device,
) -> str | None:
    native = _native_cpu(device)
    model_dtype = torch.float32 if device.type == "cpu" else torch.float16
    try:
        plan_memory(
            cfg,
            weight_bytes=weight_bytes,
            budget_bytes=budget,
            batch=st.batch,
            quantized=quantized,
            native=native,
            context=min(st.prompt_len + st.new_tokens, cfg.max_position_embeddings),
            kv_dtype=kv_dtype_of(st.kv_cache, model_dtype),
        )
    except ConfigError as e:
        return str(e)
    return None


def _loadavg() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


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
    if st.llama_cpp is not None and device.type != "cpu":
        raise ConfigError("--llama-cpp compares CPU decode: use --device cpu")
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
    native = _native_cpu(device)
    engine, isa, threads = engine_name(device)
    report = BenchReport(model=name, device=_device_name(device), settings=st, engine=engine, isa=isa)
    report.threads = threads
    needs: dict[str, int] = {}
    for method in METHODS:
        real = method == real_method
        if real and source is not None and source.kind == "spqr":
            need = int(source.info.get("file_bytes", 0))
        elif real or method == "fp16":
            need = dense_weight_bytes(cfg)  # fp16 (the native CPU path and GPUs hold fp16)
        else:
            need = synthetic_weight_bytes(cfg, method=method, wbits=st.wbits, outlier_rate=st.outlier_rate)
        if device.type == "cpu" and not native:  # PyTorch CPU path: fp32 dense copies (SpQR too)
            need = dense_weight_bytes(cfg, 4) + (need if method == "spqr" else 0)
        if device.type == "cpu":
            need += BANDWIDTH_BUFFER_BYTES
        why = _fits(cfg, need, st, budget, quantized=method == "spqr", device=device)
        if why is not None:
            report.skipped[method] = why
            log(f"{method}: skipped ({why})")
        else:
            needs[method] = need
    if not needs:
        raise ConfigError(f"nothing fits: {'; '.join(report.skipped.values())}")

    def build(method: str) -> Decoder:
        real = method == real_method
        log(f"{method}: building {'from ' + str(model_path) if real else 'synthetic'} model on {device}")
        if real:
            from spqr_run.devices import default_dtype
            from spqr_run.loading import build_decoder

            assert source is not None
            held = torch.float16 if native and method == "fp16" else None  # the FP16 row holds fp16
            model = build_decoder(source, device=device, dtype=default_dtype(device), weight_dtype=held)
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
        return model

    def subject(method: str) -> _Subject:
        src = str(model_path) if method == real_method else "synthetic"
        return _Subject(build(method), method, st, source=src, log=log)

    repeats = st.repeats or (5 if device.type == "cuda" else 3)
    warmup = st.warmup if st.warmup is not None else 1
    report.alternated = (
        native
        and len(needs) == 2
        and _fits(cfg, sum(needs.values()), st, budget, quantized=True, device=device) is None
    )
    bw = ReadBandwidth(threads or 1) if device.type == "cpu" else None
    peer = _llama_cpp_peer(st, threads or 1, log) if st.llama_cpp is not None else None
    report.loadavg["before"] = _loadavg()

    def sample_between() -> None:
        if bw is not None:
            bw.sample()
        if peer is not None:
            peer.sample()

    try:
        if report.alternated:
            subjects = [subject(m) for m in needs]
            for s in subjects:
                for _ in range(warmup):
                    s.run(record=False)
            for r in range(repeats):
                log(f"repeat {r + 1}/{repeats}")
                for s in subjects:
                    s.run()
                sample_between()
            for s in subjects:
                report.results[s.method] = s.result(engine, threads)
            del subjects
        else:
            for method in needs:
                s = subject(method)
                for _ in range(warmup):
                    s.run(record=False)
                log(f"{method}: timing")
                for _ in range(repeats):
                    s.run()
                    sample_between()
                report.results[method] = s.result(engine, threads)
                del s  # freed before the next model is built
                _release(device)
        report.loadavg["after"] = _loadavg()
        if bw is not None:
            report.bandwidth = {"threads": bw.threads, "gb_s": bw.median, "samples": bw.samples}
            if bw.threads > 1:
                single = ReadBandwidth(1)
                for _ in range(3):
                    single.sample()
                report.bandwidth |= {"single_gb_s": single.median, "single_samples": single.samples}
                single.close()
            for r in report.results.values():
                r.set_floor(bw.median)
        if peer is not None:
            report.llama_cpp = peer.summary()
    finally:
        if bw is not None:
            bw.close()
    return report


def _llama_cpp_peer(st: BenchSettings, threads: int, log: Callable[[str], None]):
    from spqr_run.engine.llama_cpp_peer import LlamaCppPeer

    assert st.llama_cpp is not None
    log(f"llama.cpp: llama-bench on {st.llama_cpp}, {threads} threads, {st.new_tokens} tokens a run")
    return LlamaCppPeer(st.llama_cpp, threads=threads, n_gen=st.new_tokens, build=st.build_llama_cpp)


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return "cpu"
