"""Hugging Face model folders: config.json + safetensors (single or sharded) + tokenizer files.

Checkpoint names are mapped onto the decoder's canonical names by one declarative table per architecture;
Falcon's fused query_key_value is split into q/k/v by an explicit step.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from safetensors import safe_open
from torch import Tensor

from spqr_run.config import ModelConfig
from spqr_run.errors import ModelFormatError

# checkpoint-name regex -> canonical name template ({0} = layer index)
LLAMA_NAMES: dict[str, str] = {
    r"model\.embed_tokens\.weight": "embed_tokens.weight",
    r"model\.layers\.(\d+)\.input_layernorm\.weight": "layers.{0}.attn_norm.weight",
    r"model\.layers\.(\d+)\.post_attention_layernorm\.weight": "layers.{0}.mlp_norm.weight",
    r"model\.layers\.(\d+)\.self_attn\.([qkvo])_proj\.(weight|bias)": "layers.{0}.attn.{1}_proj.{2}",
    r"model\.layers\.(\d+)\.mlp\.(gate|up|down)_proj\.(weight|bias)": "layers.{0}.mlp.{1}_proj.{2}",
    r"model\.norm\.weight": "norm.weight",
    r"lm_head\.weight": "lm_head.weight",
}

FALCON_NAMES: dict[str, str] = {
    r"transformer\.word_embeddings\.weight": "embed_tokens.weight",
    r"transformer\.h\.(\d+)\.(?:input_layernorm|ln_attn)\.(weight|bias)": "layers.{0}.attn_norm.{1}",
    r"transformer\.h\.(\d+)\.(?:post_attention_layernorm|ln_mlp)\.(weight|bias)": "layers.{0}.mlp_norm.{1}",
    r"transformer\.h\.(\d+)\.self_attention\.query_key_value\.(weight|bias)": "layers.{0}.attn.qkv.{1}",
    r"transformer\.h\.(\d+)\.self_attention\.dense\.(weight|bias)": "layers.{0}.attn.o_proj.{1}",
    r"transformer\.h\.(\d+)\.mlp\.dense_h_to_4h\.(weight|bias)": "layers.{0}.mlp.up_proj.{1}",
    r"transformer\.h\.(\d+)\.mlp\.dense_4h_to_h\.(weight|bias)": "layers.{0}.mlp.down_proj.{1}",
    r"transformer\.ln_f\.(weight|bias)": "norm.{0}",
    r"lm_head\.weight": "lm_head.weight",
}


def read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelFormatError(f"{path}: file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelFormatError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ModelFormatError(f"{path}: expected a JSON object")
    return data


def safetensors_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.exists():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ModelFormatError(f"{index}: missing 'weight_map'")
        files = sorted({folder / str(f) for f in weight_map.values()})
        for f in files:
            if f.parent != folder or not f.exists():
                raise ModelFormatError(f"{index}: shard {f.name} not found in {folder}")
        return files
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ModelFormatError(
            f"{folder}: no *.safetensors weights found (pickled .bin files are not loaded)"
        )
    return files


class HFWeights(Mapping[str, Tensor]):
    """Lazy canonical-name view of a safetensors checkpoint: each access reads one tensor (mmap)."""

    def __init__(self, folder: Path, cfg: ModelConfig) -> None:
        self.cfg = cfg
        self._where: dict[str, tuple[Path, str]] = {}  # canonical -> (file, checkpoint name)
        table = [
            (re.compile(p), t) for p, t in (FALCON_NAMES if cfg.arch == "falcon" else LLAMA_NAMES).items()
        ]
        for file in safetensors_files(folder):
            try:
                with safe_open(file, framework="pt") as f:
                    keys = list(f.keys())
            except Exception as e:  # safetensors raises its own error types for corrupt headers
                raise ModelFormatError(f"{file}: corrupt or truncated safetensors file ({e})") from None
            for key in keys:
                canonical = _map_name(key, table)
                if canonical is None:
                    if key.endswith("rotary_emb.inv_freq"):
                        continue  # recomputed from the config
                    raise ModelFormatError(f"{file}: unexpected tensor {key!r} for a {cfg.arch} model")
                self._where[canonical] = (file, key)
        if cfg.tie_word_embeddings:
            self._where.pop("lm_head.weight", None)
        self._names = self._canonical_names()

    def _canonical_names(self) -> list[str]:
        names = []
        for name in self._where:
            if name.endswith(("attn.qkv.weight", "attn.qkv.bias")):
                prefix, _, kind = name.rpartition(".qkv.")
                names += [f"{prefix}.{p}_proj.{kind}" for p in "qkv"]
            else:
                names.append(name)
        return names

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)

    def _read(self, canonical: str) -> Tensor:
        file, key = self._where[canonical]
        try:
            with safe_open(file, framework="pt") as f:
                return f.get_tensor(key)
        except Exception as e:
            raise ModelFormatError(f"{file}: cannot read tensor {key!r} ({e})") from None

    def __getitem__(self, name: str) -> Tensor:
        if name in self._where:
            return self._read(name)
        m = re.fullmatch(r"(layers\.\d+\.attn)\.([qkv])_proj\.(weight|bias)", name)
        if m is None or f"{m[1]}.qkv.{m[3]}" not in self._where:
            raise KeyError(name)
        fused = self._read(f"{m[1]}.qkv.{m[3]}")
        return split_falcon_qkv(fused, self.cfg)["qkv".index(m[2])]


def _map_name(key: str, table: list[tuple[re.Pattern[str], str]]) -> str | None:
    for pattern, template in table:
        m = pattern.fullmatch(key)
        if m:
            return template.format(*m.groups())
    return None


def split_falcon_qkv(fused: Tensor, cfg: ModelConfig) -> tuple[Tensor, Tensor, Tensor]:
    """Falcon's fused query_key_value rows (or bias) -> q (H*hd, ...), k (KH*hd, ...), v (KH*hd, ...).

    Row layouts: new_decoder_architecture / grouped: per KV group [H/KH query heads, 1 key, 1 value];
    multi-query (Falcon-7B): [H query heads, 1 key, 1 value]; multi-head: per head [q, k, v].
    """
    h, kh, hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    rest = fused.shape[1:]
    expected = (h + 2 * kh) * hd
    if fused.shape[0] != expected:
        raise ModelFormatError(f"query_key_value has {fused.shape[0]} rows, config implies {expected}")
    if kh == h and h > 1:
        per_head = fused.view(h, 3, hd, *rest)  # (H, 3, hd, ...)
        q, k, v = per_head[:, 0], per_head[:, 1], per_head[:, 2]
    else:
        groups = fused.view(kh, h // kh + 2, hd, *rest)  # (KH, H/KH + 2, hd, ...)
        q, k, v = groups[:, :-2], groups[:, -2], groups[:, -1]
    return tuple(z.reshape(-1, *rest).contiguous() for z in (q, k, v))  # type: ignore[return-value]


def load_hf_config(folder: Path) -> ModelConfig:
    path = folder / "config.json"
    if not path.exists():
        raise ModelFormatError(f"{folder}: no config.json (not a Hugging Face model folder)")
    hf = read_json(path)
    cfg = ModelConfig.from_hf_config(hf, source=str(path))
    gen = folder / "generation_config.json"
    if gen.exists() and not cfg.eos_token_ids:
        eos = read_json(gen).get("eos_token_id")
        if eos is not None:
            ids = tuple(eos) if isinstance(eos, list) else (int(eos),)
            cfg = dataclasses.replace(cfg, eos_token_ids=ids)
    return cfg


def load_generation_defaults(folder: Path) -> dict[str, Any]:
    """The model's recommended sampling settings from generation_config.json (temperature, top_p, top_k,
    min_p, repetition_penalty; `do_sample: false` means greedy), validated by `clean_model_defaults`."""
    from spqr_run.sampling import clean_model_defaults

    path = folder / "generation_config.json"
    if not path.exists():
        return {}
    gen = read_json(path)
    if gen.get("do_sample") is False:
        gen = {**gen, "temperature": 0.0}  # transformers ignores the sampling fields then: greedy
    return clean_model_defaults(gen, source=str(path))
