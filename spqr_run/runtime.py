"""Load a model for interactive use (REPL, server, generate): device choice, dtype, context, chat template."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch

from spqr_run.chat_template import ChatTemplate, chat_template_for
from spqr_run.devices import default_dtype, resolve_device
from spqr_run.engine.planner import (
    MemoryPlan,
    apply_budget,
    default_budget,
    kv_dtype_of,
    plan_memory,
    resident_bytes,
)
from spqr_run.errors import ConfigError
from spqr_run.generation import Generator
from spqr_run.loading import ModelSource, build_decoder, open_model
from spqr_run.models.decoder import Decoder
from spqr_run.models.kv_cache import KV_CACHE_KINDS
from spqr_run.tokenizer import Tokenizer


@dataclass
class Runtime:
    source: ModelSource
    model: Decoder
    chat_template: ChatTemplate
    device: torch.device
    max_context: int
    plan: MemoryPlan  # the memory budget the KV cache was sized for

    @property
    def tokenizer(self) -> Tokenizer:
        return self.source.tokenizer

    def generator(self) -> Generator:
        """A generator on cache row 0 (one conversation at a time)."""
        return Generator(self.model, self.tokenizer, max_seq_len=self.max_context)


DEFAULT_CONTEXT = 4096  # the context when none is asked for, unless the model's or the memory's is smaller


def load_runtime(
    path: str | Path,
    *,
    device: str | None = None,
    ctx: int | None = None,
    progress=None,
    rows: int = 1,
    memory: int | None = None,
    kv_cache: str = "auto",
    verify_checksums: bool = True,
) -> Runtime:
    """Open and build a model with a KV cache of `rows` sequences sized by the memory planner.

    `memory` is the budget in bytes for weights + workspace + KV cache (default: the device's free memory
    plus what the weights took); on CUDA it also caps this process's allocations. `ctx` asks for a context
    (a ConfigError names the shortfall when it does not fit); without it the context is the longest that fits,
    at most the model's and `DEFAULT_CONTEXT`; a `ctx` above the model's limit is a ConfigError. `kv_cache` "int8" stores the cache in 8 bits (`kv_cache`).
    `verify_checksums=False` loads a `.spqr` without checking its tensors' checksums (`--skip-checksums`).
    """
    dev = resolve_device(device)
    if ctx is not None and ctx < 16:
        raise ConfigError(f"invalid --ctx {ctx}: must be at least 16 tokens")
    if memory is not None:
        apply_budget(dev, memory)
    source = open_model(path, verify_checksums=verify_checksums)
    cfg = source.config
    if ctx is not None and ctx > cfg.max_position_embeddings:  # refused before the weights load, not clamped
        raise ConfigError(
            f"invalid --ctx {ctx}: {cfg.name or Path(path).name} handles at most "
            f"{cfg.max_position_embeddings} tokens (its max_position_embeddings)"
        )
    model = build_decoder(
        source, device=dev, dtype=default_dtype(dev), progress=progress, keep_packed=False
    )  # on a CPU: fp16 weights (`loading.held_dtype`), the packed form freed once decoded
    if dev.type == "cuda":  # load (or NVRTC-compile, once) the SpQR kernels now, not inside a graph capture
        from spqr_run.ops import prepare_kernels

        prepare_kernels(model)
    plan = plan_context(
        model,
        budget=memory if memory is not None else default_budget(dev) + resident_bytes(model)[0],
        ctx=ctx,
        rows=rows,
        quantized=source.kind == "spqr",
        name=cfg.name or Path(path).name,
        kv_cache=kv_cache,
    )
    max_context = plan.max_context
    model.setup_caches(rows, max_context, kind=plan_kv_kind(plan))
    tok = source.tokenizer
    template = chat_template_for(
        tok.chat_template,
        arch=cfg.arch,
        model_name=cfg.name or Path(path).name,
        vocab=tok.vocab_strings(),
        bos_token=tok.bos_token,
        eos_token=tok.eos_token,
    )
    return Runtime(source, model, template, dev, max_context, plan)


def plan_kv_kind(plan: MemoryPlan) -> str:
    """The `KVCache` kind a plan was made for ("int8" or "auto", the model's dtype)."""
    return "int8" if plan.kv_dtype == "int8" else "auto"


def load_transient_bytes(model: Decoder, *, quantized: bool) -> int:
    """Bytes held above the final weights at the peak of loading `model` (`loading.build_decoder`): on the
    native CPU path, the larger of the fp16 embedding and LM head while their int8 rows are made (a quantized
    model) and the largest linear's CPU layout beside its records during the repack; 0 elsewhere."""
    if getattr(model, "native", None) is None or not quantized:
        return 0
    cfg = model.config
    tables = cfg.vocab_size * cfg.hidden_size * 2 * (1 if cfg.tie_word_embeddings else 2)  # fp16
    from spqr_run.models.spqr_linear import SpQRLinear

    repack = max(
        (m.native.nbytes for m in model.modules() if isinstance(m, SpQRLinear) and m.native is not None),
        default=0,
    )
    return max(tables, 2 * repack)


def _longest_context(model: Decoder, kv_dtype: str, common: dict) -> int:
    """The most tokens a KV cache in `kv_dtype` holds with the plan's other terms (0 when none fit)."""
    try:
        return plan_memory(model.config, context=None, kv_dtype=kv_dtype, **common).max_context
    except ConfigError:
        return 0


def plan_context(
    model: Decoder,
    *,
    budget: int,
    ctx: int | None,
    rows: int,
    quantized: bool,
    name: str = "",
    kv_cache: str = "auto",
) -> MemoryPlan:
    """The memory plan of a built `model` (its weights resident) with `rows` KV-cache rows: `ctx` tokens
    each when asked for, else the longest context that fits, capped at `DEFAULT_CONTEXT`.

    `kv_cache` "auto" keeps keys and values in `Decoder.kv_cache_dtype` when that fits; when it does not (the asked
    `ctx` would be refused, or without `ctx` less than `DEFAULT_CONTEXT` (or the model's limit) fits) and an
    int8 cache does better (fits the asked `ctx`, or a longer context), the plan takes int8 and says why in
    `MemoryPlan.kv_note`; `plan_kv_kind` gives the cache kind to allocate. A ConfigError (one line) when not
    even int8 fits."""
    weights, _ = resident_bytes(model)
    if kv_cache not in KV_CACHE_KINDS:
        raise ConfigError(f"invalid --kv-cache {kv_cache!r}: use one of {', '.join(KV_CACHE_KINDS)}")
    native = getattr(model, "native", None) is not None
    common = dict(
        weight_bytes=weights,
        budget_bytes=budget,
        batch=rows,
        quantized=quantized,
        name=name,
        weights_note="as loaded"
        + (", spqr" if quantized else "")
        + (", native CPU kernels" if native else ""),
        native=native,
        transient_bytes=load_transient_bytes(model, quantized=quantized),
    )
    full = kv_dtype_of(kv_cache, model.kv_cache_dtype)  # fp16 on the native CPU path

    def plan(kv_dtype: str) -> MemoryPlan:
        p = plan_memory(model.config, context=ctx, kv_dtype=kv_dtype, **common)  # type: ignore[arg-type]
        if ctx is None and p.max_context > DEFAULT_CONTEXT:
            p = plan_memory(model.config, context=DEFAULT_CONTEXT, kv_dtype=kv_dtype, **common)  # type: ignore[arg-type]
        return p

    if kv_cache != "auto" or full == "int8":
        return plan(full)
    target = ctx if ctx is not None else min(DEFAULT_CONTEXT, model.config.max_position_embeddings)
    try:
        first: MemoryPlan | None = plan(full)
        refused: ConfigError | None = None
    except ConfigError as e:
        first, refused = None, e
    if first is not None and first.max_context >= target:
        return first
    try:
        small = plan("int8")
    except ConfigError:
        if refused is not None:
            raise ConfigError(f"{refused} (an int8 KV cache does not fit either)") from None
        return first  # type: ignore[return-value]
    if first is not None and small.max_context <= first.max_context:
        return first
    fits = first.max_context if first is not None else _longest_context(model, full, common)
    had = f"only {fits}" if fits else "none"
    why = f"--kv-cache auto chose int8: {full} fits {had} of {target} tokens"
    return dataclasses.replace(small, kv_note=why)
