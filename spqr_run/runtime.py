"""Load a model for interactive use (REPL, server, generate): device choice, dtype, context, chat template."""

from __future__ import annotations

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
    model.setup_caches(rows, max_context, kind=kv_cache)
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
    each when asked for, else the longest context that fits, capped at `DEFAULT_CONTEXT`."""
    weights, _ = resident_bytes(model)
    if kv_cache not in KV_CACHE_KINDS:
        raise ConfigError(f"invalid --kv-cache {kv_cache!r}: use one of {', '.join(KV_CACHE_KINDS)}")
    kv_dtype = kv_dtype_of(kv_cache, model.kv_cache_dtype)
    common = dict(
        weight_bytes=weights,
        budget_bytes=budget,
        batch=rows,
        quantized=quantized,
        name=name,
        kv_dtype=kv_dtype,
    )
    note = "as loaded" + (", spqr" if quantized else "")
    plan = plan_memory(model.config, context=ctx, weights_note=note, **common)  # type: ignore[arg-type]
    if ctx is None and plan.max_context > DEFAULT_CONTEXT:
        plan = plan_memory(model.config, context=DEFAULT_CONTEXT, weights_note=note, **common)  # type: ignore[arg-type]
    return plan
