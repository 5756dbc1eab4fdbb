"""Facts about the loaded model for the banner and /show: size, bits/parameter, memory plan."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from spqr_run.engine.planner import resident_bytes
from spqr_run.runtime import Runtime

WEIGHT_FILE_SUFFIXES = (".safetensors", ".bin", ".gguf", ".spqr", ".pt")


@dataclass(frozen=True)
class ModelFacts:
    name: str
    file: str
    arch: str
    parameters: int
    bits_per_param: float | None
    bits_note: str  # where bits/param comes from ("" when the file reports it)
    device: str
    weights_bytes: int
    workspace_bytes: int  # prefill activations, logits, dequant tile and allocator margin (the planner's)
    kv_cache_bytes: int
    budget_bytes: int
    max_context: int
    context_fit: int  # tokens of KV cache the budget had room for
    max_positions: int  # the model's own limit
    kv_dtype: (
        str  # how the KV cache stores keys and values: fp32, fp16, bf16, int8 (and why, if the planner chose)
    )
    weights_held: str = ""  # how the weights sit in memory, e.g. "fp16 (decoded once from the packed .spqr)"
    kernels: str = ""  # which kernels run it: "native CPU (AVX-512 VNNI, 2 threads)", ...
    metadata_name: str = ""  # the name in the model's own metadata, when it is another than `name`


def display_name(path: Path, metadata_name: str) -> tuple[str, str]:
    """(the model's name, the other name its metadata gives or ""): a model is named by its file or folder
    (what the user typed, and what the README and `spqr-serve` call it); a GGUF's `general.name` or a
    config's `_name_or_path` is often another label (a training run: "Smollm2 135M 8k Lc100K Mix1 Ep2"),
    kept beside it when it is one (ignoring case, spaces and punctuation)."""
    name = path.name if path.is_dir() else path.stem

    def key(s: str) -> str:
        return re.sub(r"[\W_]+", "", s).lower()

    return name, (metadata_name if metadata_name and key(metadata_name) != key(name) else "")


def model_facts(runtime: Runtime) -> ModelFacts:
    source, cfg = runtime.source, runtime.source.config
    params = cfg.num_parameters()
    bits, note = source.info.get("bits_per_param"), ""
    if not isinstance(bits, (int, float)):
        size = _weight_file_bytes(source.path)
        bits, note = (size * 8 / params, f"{source.kind} file size") if size and params else (None, "")
    weights, kv = resident_bytes(runtime.model)
    name, metadata_name = display_name(source.path, cfg.name)
    return ModelFacts(
        name=name,
        metadata_name=metadata_name,
        file=str(source.path),
        arch=cfg.arch,
        parameters=params,
        bits_per_param=float(bits) if bits is not None else None,
        bits_note=note,
        device=str(runtime.device),
        weights_bytes=weights,
        workspace_bytes=runtime.plan.workspace.total + runtime.plan.margin,
        kv_cache_bytes=kv,
        budget_bytes=runtime.plan.budget,
        max_context=runtime.max_context,
        context_fit=runtime.plan.context_fit,
        max_positions=cfg.max_position_embeddings,
        kv_dtype=runtime.plan.kv_dtype + (f"; {runtime.plan.kv_note}" if runtime.plan.kv_note else ""),
        weights_held=weights_held(runtime.model),
        kernels=kernels_used(runtime.model),
    )


DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def weights_held(model: nn.Module) -> str:
    """How a built model holds its weights, in words: the dtype of its matrices, whether quantized linears
    run from a decoded copy (the CPU path) or packed, and the dtype it computes in."""
    from spqr_run.models.spqr_linear import SpQRLinear

    compute = DTYPE_NAMES.get(model.dtype, str(model.dtype))  # type: ignore[arg-type]
    quantized = [m for m in model.modules() if isinstance(m, SpQRLinear)]
    weight = getattr(model.embed_tokens, "weight", None)
    name = "int8 rows" if weight is None else DTYPE_NAMES.get(weight.dtype, str(weight.dtype))
    if quantized and all(m.native is not None for m in quantized):
        return f"packed SpQR (CPU layout), embeddings {name}, computed from the packed bytes in {compute}"
    if not quantized:
        return f"{name}, computed in {compute}"
    if all(m.dense_weight is not None for m in quantized):
        dense = DTYPE_NAMES.get(quantized[0].dense_weight.dtype, "?")
        packed = "packed form freed" if all(m.packed_released for m in quantized) else "packed form kept"
        return f"{dense}, quantized layers decoded once at load ({packed}), computed in {compute}"
    return f"packed SpQR, dequantized on the fly; embeddings {name}, computed in {compute}"


def kernels_used(model: nn.Module) -> str:
    """Which kernels run the model, in words: on a CPU the native path (ISA, threads) or why not; on a GPU the
    SpQR layers' path (prebuilt cubin, NVRTC cache, reference) and why ("" without packed SpQR layers)."""
    if model.device.type != "cpu":  # type: ignore[union-attr]
        from spqr_run.ops import model_kernel_path

        path = model_kernel_path(model)
        return "" if path is None else f"GPU {path}"
    from spqr_run.cpu import lib

    if getattr(model, "native", None) is not None:
        return f"native CPU ({lib.isa_name()}, {lib.load().spqr_cpu_threads()} threads)"  # type: ignore[union-attr]
    reason = lib.unavailable_reason() or "a layer without a CPU layout"
    return f"PyTorch ({reason})"


def _weight_file_bytes(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    if path.is_dir():
        return sum(
            p.stat().st_size for p in path.iterdir() if p.suffix in WEIGHT_FILE_SUFFIXES and p.is_file()
        )
    return 0


def human_count(n: int) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f}{unit}"
    return str(n)


def human_bytes(n: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def describe(facts: ModelFacts) -> list[tuple[str, str]]:
    """(label, value) rows shared by the banner and /show."""
    if facts.bits_per_param is None:
        bits = "unknown"
    else:
        bits = f"{facts.bits_per_param:.2f}" + (f" (from the {facts.bits_note})" if facts.bits_note else "")
    return [
        (
            "model",
            f"{facts.name} ({facts.file}"
            + (f'; its metadata calls it "{facts.metadata_name}")' if facts.metadata_name else ")"),
        ),
        ("architecture", facts.arch),
        ("parameters", human_count(facts.parameters)),
        ("bits/param", bits),
        ("device", facts.device),
        *([("weights held as", facts.weights_held)] if facts.weights_held else []),
        *([("kernels", facts.kernels)] if facts.kernels else []),
        (
            "memory plan",
            f"weights {human_bytes(facts.weights_bytes)} + workspace {human_bytes(facts.workspace_bytes)} "
            f"+ KV cache {human_bytes(facts.kv_cache_bytes)} ({facts.kv_dtype}) "
            f"= {human_bytes(facts.weights_bytes + facts.workspace_bytes + facts.kv_cache_bytes)} "
            f"(budget {human_bytes(facts.budget_bytes)})",
        ),
        (
            "max context",
            f"{facts.max_context} tokens (model limit {facts.max_positions}, "
            f"memory room for {facts.context_fit:,})",
        ),
    ]
