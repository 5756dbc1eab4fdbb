"""GGUF files (llama architecture): metadata -> ModelConfig, tensors dequantized lazily through `gguf`.

llama.cpp's converter permutes the rows of attn_q / attn_k for its RoPE layout (pairs of adjacent
dimensions); `unpermute_rope_rows` restores the rotate-half layout the decoder uses.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from spqr_run.config import ModelConfig
from spqr_run.errors import ModelFormatError

# GGUF tensor name (after "blk.{i}.") -> canonical name
BLOCK_NAMES = {
    "attn_norm.weight": "attn_norm.weight",
    "ffn_norm.weight": "mlp_norm.weight",
    "attn_q.weight": "attn.q_proj.weight",
    "attn_k.weight": "attn.k_proj.weight",
    "attn_v.weight": "attn.v_proj.weight",
    "attn_output.weight": "attn.o_proj.weight",
    "attn_q.bias": "attn.q_proj.bias",
    "attn_k.bias": "attn.k_proj.bias",
    "attn_v.bias": "attn.v_proj.bias",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
TOP_NAMES = {
    "token_embd.weight": "embed_tokens.weight",
    "output_norm.weight": "norm.weight",
    "output.weight": "lm_head.weight",
}


def _import_gguf():
    try:
        import gguf
    except ImportError:
        raise ModelFormatError(
            "loading GGUF files needs the 'gguf' package (a dependency of spqr-run) in this Python: "
            "pip install gguf, or reinstall the checkout with pip install -e ."
        ) from None
    return gguf


@functools.cache
def supported_types() -> tuple[str, ...]:
    """The tensor types this loader reads: every type the installed `gguf` package dequantizes (gguf 0.19:
    F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K to Q6_K, every IQ type, TQ1_0, TQ2_0, MXFP4, NVFP4).

    Found by asking `gguf` to dequantize one zero block of each type it knows, so a newer `gguf` that learns a
    type extends the list without a change here (and Q8_K, which gguf 0.19 cannot dequantize, is refused when
    the file is opened instead of failing later)."""
    gguf = _import_gguf()
    names = []
    for qtype in gguf.GGMLQuantizationType:
        size = gguf.GGML_QUANT_SIZES.get(qtype)
        if size is None:
            continue
        try:
            with np.errstate(all="ignore"):
                gguf.quants.dequantize(np.zeros((1, size[1]), dtype=np.uint8), qtype)
        except NotImplementedError:
            continue
        except Exception:  # noqa: BLE001 - a type gguf knows but cannot dequantize this way: not supported
            continue
        names.append(qtype.name)
    return tuple(names)


def open_gguf(path: Path):
    gguf = _import_gguf()
    try:
        return gguf.GGUFReader(str(path))
    except Exception as e:  # the reader raises ValueError/IndexError/struct errors on bad files
        raise ModelFormatError(f"{path}: corrupt or truncated GGUF file ({type(e).__name__}: {e})") from None


def read_metadata(reader, path: Path) -> dict[str, Any]:
    meta: dict[str, Any] = {}
    for key, field in reader.fields.items():
        try:
            meta[key] = field.contents()
        except Exception as e:
            raise ModelFormatError(f"{path}: unreadable metadata field {key!r} ({e})") from None
    return meta


def config_from_metadata(meta: dict[str, Any], path: Path) -> ModelConfig:
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise ModelFormatError(f"{path}: unsupported GGUF architecture {arch!r} (supported: llama)")

    def get(key: str, default: Any = None) -> Any:
        value = meta.get(f"llama.{key}", default)
        if value is None:
            raise ModelFormatError(f"{path}: missing metadata field 'llama.{key}'")
        return value

    hidden = int(get("embedding_length"))
    heads = int(get("attention.head_count"))
    tokens = meta.get("tokenizer.ggml.tokens")
    vocab = int(meta.get("llama.vocab_size") or (len(tokens) if tokens else 0))
    eos = meta.get("tokenizer.ggml.eos_token_id")
    return ModelConfig(
        arch="llama",
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=int(get("feed_forward_length")),
        num_layers=int(get("block_count")),
        num_heads=heads,
        num_kv_heads=int(get("attention.head_count_kv", heads)),
        head_dim=int(meta.get("llama.attention.key_length") or hidden // heads),
        max_position_embeddings=int(get("context_length", 2048)),
        norm_type="rms",
        norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=float(get("rope.freq_base", 10000.0)),
        tie_word_embeddings=False,  # decided from the tensors present, see GGUFWeights
        bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
        eos_token_ids=() if eos is None else (int(eos),),
        name=str(meta.get("general.name", "")),
    )


# GGUF `general.sampling.*` metadata (the model's recommended sampler settings, where the converter stored
# them) -> the SamplingParams field it sets.
SAMPLING_KEYS = {
    "general.sampling.temp": "temperature",
    "general.sampling.top_p": "top_p",
    "general.sampling.top_k": "top_k",
    "general.sampling.min_p": "min_p",
    "general.sampling.penalty_repeat": "repetition_penalty",
}


def generation_defaults_from_metadata(meta: dict[str, Any], path: Path) -> dict[str, Any]:
    """The recommended sampling settings in a GGUF file's `general.sampling.*` metadata ({} when absent)."""
    from spqr_run.sampling import clean_model_defaults

    raw = {field: meta[key] for key, field in SAMPLING_KEYS.items() if key in meta}
    return clean_model_defaults(raw, source=f"{path} metadata") if raw else {}


def unpermute_rope_rows(w: Tensor, n_heads: int) -> Tensor:
    """Undo llama.cpp's q/k row permutation: per head, rows (pairs, 2) -> (2, pairs). w: (H*hd, ...)."""
    rest = w.shape[1:]
    hd = w.shape[0] // n_heads
    return w.reshape(n_heads, hd // 2, 2, *rest).transpose(1, 2).reshape(w.shape).contiguous()


class GGUFWeights(Mapping[str, Tensor]):
    """Lazy canonical-name view of a GGUF file's tensors, dequantized to fp32 on access."""

    def __init__(self, reader, path: Path, cfg: ModelConfig) -> None:
        self.path, self.cfg = path, cfg
        self._tensors: dict[str, Any] = {}
        for t in reader.tensors:
            canonical = _canonical(t.name)
            if canonical is None:
                if t.name == "rope_freqs.weight":
                    raise ModelFormatError(f"{path}: per-dimension RoPE frequency factors are not supported")
                raise ModelFormatError(f"{path}: unexpected tensor {t.name!r} for a llama model")
            if t.tensor_type.name not in supported_types():
                raise ModelFormatError(
                    f"{path}: tensor {t.name!r} has type {t.tensor_type.name}, which the gguf package "
                    f"cannot dequantize (it reads {', '.join(supported_types())})"
                )
            self._tensors[canonical] = t

    @property
    def tied(self) -> bool:
        return "lm_head.weight" not in self._tensors

    def __iter__(self) -> Iterator[str]:
        return iter(self._tensors)

    def __len__(self) -> int:
        return len(self._tensors)

    def __getitem__(self, name: str) -> Tensor:
        t = self._tensors[name]
        gguf = _import_gguf()
        try:
            data = gguf.quants.dequantize(t.data, t.tensor_type)
        except Exception as e:
            raise ModelFormatError(f"{self.path}: cannot dequantize tensor {t.name!r} ({e})") from None
        w = torch.from_numpy(np.array(data, dtype=np.float32))  # a writable copy
        if name.endswith("attn.q_proj.weight") or name.endswith("attn.q_proj.bias"):
            w = unpermute_rope_rows(w, self.cfg.num_heads)
        elif name.endswith("attn.k_proj.weight") or name.endswith("attn.k_proj.bias"):
            w = unpermute_rope_rows(w, self.cfg.num_kv_heads)
        return w


def _canonical(name: str) -> str | None:
    if name in TOP_NAMES:
        return TOP_NAMES[name]
    if name.startswith("blk."):
        index, _, rest = name[4:].partition(".")
        if index.isdigit() and rest in BLOCK_NAMES:
            return f"layers.{int(index)}.{BLOCK_NAMES[rest]}"
    return None
