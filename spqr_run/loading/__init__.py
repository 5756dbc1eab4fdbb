"""Open a model from any supported source into one `ModelSource` (config + lazy weights + tokenizer),
then build a `Decoder` from it. Sources: a Hugging Face folder, a GGUF file, a `.spqr` file."""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from spqr_run.config import ModelConfig
from spqr_run.errors import ModelFormatError
from spqr_run.models.decoder import Decoder, Rotary
from spqr_run.tokenizer import Tokenizer


@dataclass
class ModelSource:
    """Everything a loaded model needs, with weights read lazily (one tensor at a time) by canonical name."""

    path: Path
    kind: str  # "hf" | "gguf" | "spqr"
    config: ModelConfig
    weights: Mapping[str, Tensor]
    tokenizer: Tokenizer
    # the model's recommended sampling settings (`spqr_run.sampling.clean_model_defaults`); requests and flags
    # override them, `sampling.GLOBAL_DEFAULTS` fill in the rest (`sampling.resolve_sampling`)
    generation_defaults: dict[str, Any] = field(default_factory=dict)
    # kind "spqr": builds the quantized module for a linear's canonical name (None: dense weight)
    linear_factory: Callable[[str], nn.Module | None] | None = None
    info: dict[str, Any] = field(default_factory=dict)  # display facts: bits/param, quantization config


def open_model(path: str | Path, *, verify_checksums: bool = True) -> ModelSource:
    """Open a model folder or file; raises ModelFormatError with one line on any problem.

    A `.spqr` file's tensors are checked against the checksums in its header as they are read (a corrupt
    tensor is a ModelFormatError naming it); `verify_checksums=False` skips that."""
    p = Path(path).expanduser()
    if not p.exists():
        raise ModelFormatError(f"{p}: no such file or folder")
    if p.is_dir():
        return _open_hf(p)
    with p.open("rb") as f:
        magic = f.read(8)
    if magic[:4] == b"GGUF":
        return _open_gguf(p)
    if p.suffix == ".spqr":
        from spqr_run.loading.spqr_file import open_spqr

        return open_spqr(p, verify=verify_checksums)
    raise ModelFormatError(f"{p}: not a model (expected a Hugging Face folder, a .gguf or a .spqr file)")


def _open_hf(folder: Path) -> ModelSource:
    from spqr_run.loading.hf import HFWeights, load_generation_defaults, load_hf_config

    cfg = load_hf_config(folder)
    weights = HFWeights(folder, cfg)
    tokenizer = Tokenizer.from_hf_folder(folder)
    cfg = _with_tokenizer_eos(cfg, tokenizer)
    return ModelSource(folder, "hf", cfg, weights, tokenizer, load_generation_defaults(folder))


def _open_gguf(path: Path) -> ModelSource:
    from spqr_run.loading.gguf import (
        GGUFWeights,
        config_from_metadata,
        generation_defaults_from_metadata,
        open_gguf,
        read_metadata,
    )

    reader = open_gguf(path)
    meta = read_metadata(reader, path)
    cfg = config_from_metadata(meta, path)
    weights = GGUFWeights(reader, path, cfg)
    cfg = dataclasses.replace(cfg, tie_word_embeddings=weights.tied)
    weights.cfg = cfg
    tokenizer = Tokenizer.from_gguf_metadata(meta, source=str(path))
    cfg = _with_tokenizer_eos(cfg, tokenizer)
    return ModelSource(path, "gguf", cfg, weights, tokenizer, generation_defaults_from_metadata(meta, path))


def _with_tokenizer_eos(cfg: ModelConfig, tokenizer: Tokenizer) -> ModelConfig:
    eos = tuple(sorted(set(cfg.eos_token_ids) | set(tokenizer.eos_ids)))
    return dataclasses.replace(cfg, eos_token_ids=eos)


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Canonical weight name -> shape, for a dense decoder of this config."""
    with torch.device("meta"):
        model = Decoder(cfg)
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


def held_dtype(source: ModelSource, device: str | torch.device, dtype: torch.dtype) -> torch.dtype:
    """The dtype a model's weight matrices are held in when it computes in `dtype` on `device`.

    A `.spqr` model on a CPU holds them in fp16 and computes in fp32: its dense tensors are stored in fp16 and
    its quantized weights decode to fp16 within 2^-11 relative, so fp32 copies would double the memory for no
    accuracy (SmolLM2-135M: 575 MiB of fp32 weights, 259 MiB in fp16 with the packed form freed; perplexity
    23.3066 vs 23.3055 with `spqr-eval`, README "Memory"). Everything else holds `dtype`.
    """
    if torch.device(device).type == "cpu" and source.kind == "spqr" and dtype == torch.float32:
        return torch.float16
    return dtype


def build_decoder(
    source: ModelSource,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    progress: Callable[[int, int], None] | None = None,
    weight_dtype: torch.dtype | None = None,
    keep_packed: bool = True,
    native: bool | None = None,
) -> Decoder:
    """Build the decoder on `device`, reading weights one at a time (no second full copy in host memory).

    It computes in `dtype`; weight matrices (embedding, LM head, linears, dense or decoded from a `.spqr`) are
    held in `weight_dtype` (None: `held_dtype`), norms and biases in `dtype`. The SpQR linears that read the
    same input are fused into one each (`models.fused.fuse_linears`) first.

    On a CPU with the native kernels (`native` None or True; `spqr_run.cpu.lib`), SpQR linears are repacked
    into the CPU layout and computed from their packed bytes, the embedding of a quantized model is held in
    int8 rows (`cpu.embedding.Q8Embedding`), and `Decoder.forward` runs natively (`cpu.decoder`); the file's
    records are freed unless `keep_packed`, block by block as they are read (`_native_block`). Otherwise
    (`native=False`, or the library is missing: a one-line warning says why), quantized linears run from a
    dense copy decoded once (`SpQRLinear.materialize`); `keep_packed=False` then frees their packed form.
    """
    cfg = source.config
    held = weight_dtype or held_dtype(source, device, dtype)
    on_cpu = torch.device(device).type == "cpu"
    use_native = on_cpu and dtype == torch.float32 and native is not False and _native_available(native)
    with torch.device("meta"):
        model = Decoder(cfg)
    quantized: dict[str, nn.Module] = {}
    replaced: set[str] = set()  # every linear the source gave a quantized module for (fused away or not)
    if source.linear_factory is not None:
        from spqr_run.models.linear import replace_linears

        def swap(name: str, _: nn.Linear) -> nn.Module | None:
            module = source.linear_factory(name)  # type: ignore[misc]
            if module is not None:
                quantized[name] = module
                replaced.add(name)
            return module

        if use_native:  # block by block: one block's records are read, fused and repacked, then freed
            for i, block in enumerate(model.layers):
                prefix = f"layers.{i}."
                replace_linears(block, lambda n, lin, p=prefix: swap(p + n, lin))
                for name in [n for n in quantized if n.startswith(prefix)]:
                    del quantized[name]  # no reference to a member outlives its fusion
                converted = _native_block(block, prefix, cfg, held, keep_packed)
                quantized |= converted
                replaced |= set(converted)
        else:
            replace_linears(model, swap)
    expected = {n: tuple(t.shape) for n, t in model.state_dict().items() if not _inside(n, replaced)}
    missing = sorted(set(expected) - set(source.weights))
    if missing:
        raise ModelFormatError(
            f"{source.path}: missing weight {missing[0]!r} ({len(missing)} missing in all)"
        )
    extra = sorted(set(source.weights) - set(expected))
    if extra:
        raise ModelFormatError(f"{source.path}: unexpected weight {extra[0]!r} for this config")
    for i, name in enumerate(expected):
        w = source.weights[name]
        if tuple(w.shape) != expected[name]:
            raise ModelFormatError(
                f"{source.path}: weight {name!r} has shape {tuple(w.shape)}, config implies {expected[name]}"
            )
        owner, _, attr = name.rpartition(".")
        module = model.get_submodule(owner)
        to = held if w.dim() == 2 else dtype  # matrices held narrow, norms and biases as computed
        module._parameters[attr] = nn.Parameter(w.to(device=device, dtype=to), requires_grad=False)
        if progress:
            progress(i + 1, len(expected))
    if quantized:  # q/k/v and gate/up with one permutation become one linear each (`models.fused`)
        from spqr_run.models.fused import fuse_linears
        from spqr_run.models.spqr_linear import SpQRLinear

        quantized.clear()  # no references to the members: each group's parts are freed as it fuses
        fuse_linears(model)
        quantized = {n: m for n, m in model.named_modules() if isinstance(m, SpQRLinear)}
    for name, module in quantized.items():
        if module.native is not None or module.dense_weight is not None:  # type: ignore[union-attr]
            continue  # converted with its block (`_native_block`)
        module.to(device)
        if use_native and module.meta.method == "spqr":  # type: ignore[union-attr]
            residual = name.rpartition(".")[2] in PRECISE_INPUTS
            module.to_native(keep_packed=keep_packed, act_residual=residual)  # type: ignore[operator]
        elif on_cpu:  # no native kernels: quantized linears run from a once-decoded dense weight
            module.materialize(held, keep_packed=keep_packed)  # type: ignore[operator]
    model.rotary = Rotary(cfg).to(device)
    if use_native:
        from spqr_run.cpu.decoder import NativeDecoder
        from spqr_run.cpu.embedding import Q8Embedding, Q8Linear

        if quantized:  # a quantized model keeps its embedding and LM head in int8 rows
            model.embed_tokens = Q8Embedding(model.embed_tokens.weight)
            if model.lm_head is not None and model.lm_head.bias is None:
                model.lm_head = Q8Linear(model.lm_head.weight)
        model.native = NativeDecoder.for_model(model)
    if on_cpu:
        release_free_memory()
    return model.eval()


def release_free_memory() -> None:
    """Hand the memory freed by loading (file reads, repacking, quantized embeddings) back to the OS.

    glibc keeps freed blocks in its heap, and raises its mmap threshold after large frees, so the transients
    of a CPU load stayed in the process's RSS (+140 MiB for SmolLM2-135M). `malloc_trim(0)` returns the free
    pages; elsewhere (no glibc) this does nothing."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.malloc_trim(0)
    except (OSError, AttributeError):
        pass


# Linears whose input the native CPU kernels take to ~2^-15 instead of int8 (a second int8 pass over the
# rounding residual): int8 activations cost +0.046% perplexity at the q/k/v input of SmolLM2-135M and
# nothing measurable elsewhere (o, gate/up, down within +-0.03%; BENCHMARKS.md "CPU decode").
PRECISE_INPUTS = ("qkv_proj", "q_proj", "k_proj", "v_proj", "in_proj")


def _native_block(
    block: nn.Module, prefix: str, cfg: ModelConfig, held: torch.dtype, keep_packed: bool
) -> dict[str, nn.Module]:
    """Fuse one block's quantized linears and put them in their CPU form (spqr: the native layout; gptq/rtn:
    a decoded dense copy in `held`), so that the file's records of this block (and the pages of the file's
    memory map they were read from) are freed before the next block is read: the peak of loading a model is
    then its final size plus about one block, not every record at once. Returns the block's quantized
    linears (fused ones included) by full name."""
    from spqr_run.models.fused import fuse_block
    from spqr_run.models.spqr_linear import SpQRLinear

    fuse_block(block, cfg)
    out = {}
    for name, module in block.named_modules():
        if isinstance(module, SpQRLinear):
            if module.meta.method == "spqr":
                residual = name.rpartition(".")[2] in PRECISE_INPUTS
                module.to_native(keep_packed=keep_packed, act_residual=residual)
            else:
                module.materialize(held, keep_packed=keep_packed)
            out[prefix + name] = module
    return out


def _native_available(native: bool | None) -> bool:
    """Whether the native CPU kernels load; a one-line warning (once) when they do not and were wanted."""
    from spqr_run.cpu import lib

    if lib.load() is not None:
        return True
    if native is None:
        warnings.warn(
            f"spqr-run: CPU decode from the packed weights unavailable: {lib.unavailable_reason()}; "
            "decoding each layer to fp16 at load instead",
            RuntimeWarning,
            stacklevel=3,
        )
    return False


def _inside(name: str, modules: Mapping[str, Any] | set[str]) -> bool:
    prefix = name.rpartition(".")[0]
    return prefix in modules


def load_model(
    path: str | Path, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> tuple[Decoder, ModelSource]:
    source = open_model(path)
    return build_decoder(source, device=device, dtype=dtype), source
