"""One config dataclass for every supported architecture (LLaMA family and Falcon).

The decoder in `spqr_run.models` is driven only by these fields; loaders translate their source format
(Hugging Face `config.json`, GGUF metadata, `.spqr` header) into a `ModelConfig`.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from spqr_run.errors import ModelFormatError

ARCHITECTURES = ("llama", "falcon")


@dataclass(frozen=True)
class RopeScaling:
    """Llama-3 style frequency-dependent RoPE scaling (`rope_type: llama3`)."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int


@dataclass(frozen=True)
class ModelConfig:
    arch: str  # "llama" or "falcon": only used for naming and display
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int
    norm_type: str = "rms"  # "rms" (LLaMA) or "layer" (Falcon, with bias)
    norm_eps: float = 1e-5
    mlp_type: str = "gated_silu"  # "gated_silu" (gate/up/down) or "gelu" (up/down)
    parallel_residual: bool = False  # Falcon: x + attn(ln(x)) + mlp(ln'(x))
    shared_block_norm: bool = False  # Falcon-7B: one LayerNorm feeds both attention and MLP
    attention_bias: bool = False  # bias on q/k/v/o
    attention_out_bias: bool | None = None  # bias on o_proj; None means "same as attention_bias"
    mlp_bias: bool = False
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    name: str = ""
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        checks = {
            "arch": self.arch in ARCHITECTURES,
            "norm_type": self.norm_type in ("rms", "layer"),
            "mlp_type": self.mlp_type in ("gated_silu", "gelu"),
            "vocab_size": self.vocab_size > 0,
            "hidden_size": self.hidden_size > 0,
            "intermediate_size": self.intermediate_size > 0,
            "num_layers": self.num_layers > 0,
            "num_heads": self.num_heads > 0,
            "num_kv_heads": 0 < self.num_kv_heads <= self.num_heads
            and self.num_heads % self.num_kv_heads == 0,
            "head_dim": self.head_dim > 0 and self.head_dim % 2 == 0,
            "max_position_embeddings": self.max_position_embeddings > 0,
        }
        for name, ok in checks.items():
            if not ok:
                raise ModelFormatError(f"config field {name!r} has an invalid value: {getattr(self, name)!r}")

    # ---- derived fields -------------------------------------------------------------------------
    @property
    def q_dim(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def has_o_bias(self) -> bool:
        return self.attention_bias if self.attention_out_bias is None else self.attention_out_bias

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """(out_features, in_features) of every linear inside one decoder block, by module name."""
        shapes = {
            "attn.q_proj": (self.q_dim, self.hidden_size),
            "attn.k_proj": (self.kv_dim, self.hidden_size),
            "attn.v_proj": (self.kv_dim, self.hidden_size),
            "attn.o_proj": (self.hidden_size, self.q_dim),
            "mlp.up_proj": (self.intermediate_size, self.hidden_size),
            "mlp.down_proj": (self.hidden_size, self.intermediate_size),
        }
        if self.mlp_type == "gated_silu":
            shapes["mlp.gate_proj"] = (self.intermediate_size, self.hidden_size)
        return shapes

    def num_parameters(self) -> int:
        per_block = sum(o * i for o, i in self.linear_shapes().values())
        embed = self.vocab_size * self.hidden_size
        head = 0 if self.tie_word_embeddings else embed
        return self.num_layers * per_block + embed + head

    def kv_bytes_per_token(self, bytes_per_element: int = 2) -> int:
        return 2 * self.num_layers * self.kv_dim * bytes_per_element

    # ---- (de)serialisation ----------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["eos_token_ids"] = list(self.eos_token_ids)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any], *, source: str = "config") -> ModelConfig:
        """Inverse of `to_dict`; validates field names and types (the dict may come from an untrusted file)."""
        if not isinstance(d, dict):
            raise ModelFormatError(f"{source}: model config must be a JSON object")
        known = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - set(known))
        if unknown:
            raise ModelFormatError(f"{source}: unknown model config field(s) {', '.join(unknown)}")
        kwargs: dict[str, Any] = {}
        for name, value in d.items():
            if name == "rope_scaling":
                kwargs[name] = None if value is None else _rope_scaling_from_dict(value, source)
            elif name == "eos_token_ids":
                if not isinstance(value, list) or not all(isinstance(v, int) for v in value):
                    raise ModelFormatError(f"{source}: field 'eos_token_ids' must be a list of integers")
                kwargs[name] = tuple(value)
            elif name == "extra":
                if not isinstance(value, dict):
                    raise ModelFormatError(f"{source}: field 'extra' must be an object")
                kwargs[name] = value
            else:
                kwargs[name] = _check_type(name, value, known[name].type, source)
        missing = [
            f.name
            for f in dataclasses.fields(cls)
            if f.name not in kwargs
            and f.default is dataclasses.MISSING
            and f.default_factory is dataclasses.MISSING
        ]
        if missing:
            raise ModelFormatError(f"{source}: missing model config field(s) {', '.join(missing)}")
        return cls(**kwargs)

    @classmethod
    def from_hf_config(cls, hf: dict[str, Any], *, source: str = "config.json") -> ModelConfig:
        """Translate a Hugging Face `config.json` (LLaMA, Mistral, Falcon) into a ModelConfig."""
        model_type = hf.get("model_type")
        try:
            if model_type in ("llama", "mistral"):
                return _llama_from_hf(hf, source)
            if model_type in ("falcon", "RefinedWeb", "RefinedWebModel"):
                return _falcon_from_hf(hf, source)
        except KeyError as e:
            raise ModelFormatError(f"{source}: missing field {e.args[0]!r}") from None
        raise ModelFormatError(
            f"{source}: unsupported architecture {model_type!r} (supported: llama, mistral, falcon)"
        )


def _check_type(name: str, value: Any, type_str: Any, source: str) -> Any:
    t = str(type_str)
    ok: bool
    if t == "int":
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif t == "float":
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif t == "bool":
        ok = isinstance(value, bool)
    elif t == "str":
        ok = isinstance(value, str)
    elif t == "int | None":
        ok = value is None or (isinstance(value, int) and not isinstance(value, bool))
    elif t == "bool | None":
        ok = value is None or isinstance(value, bool)
    else:  # pragma: no cover - every field is covered above
        ok = True
    if not ok:
        raise ModelFormatError(f"{source}: field {name!r} has the wrong type ({type(value).__name__})")
    return value


def _rope_scaling_from_dict(d: Any, source: str) -> RopeScaling:
    if not isinstance(d, dict):
        raise ModelFormatError(f"{source}: field 'rope_scaling' must be an object")
    try:
        return RopeScaling(
            factor=float(d["factor"]),
            low_freq_factor=float(d["low_freq_factor"]),
            high_freq_factor=float(d["high_freq_factor"]),
            original_max_position_embeddings=int(d["original_max_position_embeddings"]),
        )
    except (KeyError, TypeError, ValueError) as e:
        raise ModelFormatError(f"{source}: invalid 'rope_scaling' ({e})") from None


def _eos_ids(hf: dict[str, Any]) -> tuple[int, ...]:
    eos = hf.get("eos_token_id")
    if eos is None:
        return ()
    return tuple(eos) if isinstance(eos, list) else (int(eos),)


def _hf_rope(hf: dict[str, Any], source: str) -> tuple[float, RopeScaling | None]:
    # transformers >= 5 nests theta and scaling in `rope_parameters`; older configs use top-level keys.
    params = hf.get("rope_parameters") or {}
    theta = float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))
    scaling = hf.get("rope_scaling") or (params if params.get("rope_type") not in (None, "default") else None)
    if not scaling:
        return theta, None
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind in (None, "default"):
        return theta, None
    if kind != "llama3":
        raise ModelFormatError(f"{source}: unsupported rope scaling type {kind!r} (supported: llama3)")
    return theta, _rope_scaling_from_dict(scaling, source)


def _llama_from_hf(hf: dict[str, Any], source: str) -> ModelConfig:
    if hf.get("hidden_act", "silu") != "silu":
        raise ModelFormatError(f"{source}: unsupported hidden_act {hf['hidden_act']!r} (LLaMA needs silu)")
    num_heads = int(hf["num_attention_heads"])
    hidden = int(hf["hidden_size"])
    max_pos = int(hf.get("max_position_embeddings", 2048))
    window = hf.get("sliding_window")
    extra: dict[str, Any] = {}
    if window is not None and int(window) < max_pos:
        # Sliding-window attention is not implemented: within the window it equals full attention, so
        # the usable context is capped at the window instead of silently computing something else.
        extra["context_capped_by_sliding_window"] = int(window)
        max_pos = int(window)
    theta, scaling = _hf_rope(hf, source)
    return ModelConfig(
        arch="llama",
        vocab_size=int(hf["vocab_size"]),
        hidden_size=hidden,
        intermediate_size=int(hf["intermediate_size"]),
        num_layers=int(hf["num_hidden_layers"]),
        num_heads=num_heads,
        num_kv_heads=int(hf.get("num_key_value_heads") or num_heads),
        head_dim=int(hf.get("head_dim") or hidden // num_heads),
        max_position_embeddings=max_pos,
        norm_type="rms",
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        mlp_type="gated_silu",
        attention_bias=bool(hf.get("attention_bias", False)),
        mlp_bias=bool(hf.get("mlp_bias", False)),
        rope_theta=theta,
        rope_scaling=scaling,
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        bos_token_id=hf.get("bos_token_id"),
        eos_token_ids=_eos_ids(hf),
        name=str(hf.get("_name_or_path", "")),
        extra=extra,
    )


def _falcon_from_hf(hf: dict[str, Any], source: str) -> ModelConfig:
    if hf.get("alibi", False):
        raise ModelFormatError(f"{source}: Falcon with ALiBi positions is not supported (rotary only)")
    if hf.get("rope_scaling"):
        raise ModelFormatError(f"{source}: Falcon rope scaling is not supported")
    hidden = int(hf["hidden_size"])
    num_heads = int(hf.get("num_attention_heads", hf.get("n_head", 0)))
    new_arch = bool(hf.get("new_decoder_architecture", False))
    if new_arch:
        num_kv = int(hf.get("num_kv_heads", hf.get("n_head_kv", num_heads)))
    elif hf.get("multi_query", True):
        num_kv = 1
    else:
        num_kv = num_heads
    parallel = bool(hf.get("parallel_attn", True)) or new_arch
    two_norms = new_arch and int(hf.get("num_ln_in_parallel_attn") or 2) == 2
    bias = bool(hf.get("bias", False))
    theta, _ = _hf_rope(hf, source)
    return ModelConfig(
        arch="falcon",
        vocab_size=int(hf["vocab_size"]),
        hidden_size=hidden,
        intermediate_size=int(hf.get("ffn_hidden_size") or 4 * hidden),
        num_layers=int(hf.get("num_hidden_layers", hf.get("n_layer", 0))),
        num_heads=num_heads,
        num_kv_heads=num_kv,
        head_dim=hidden // num_heads,
        max_position_embeddings=int(hf.get("max_position_embeddings", 2048)),
        norm_type="layer",
        norm_eps=float(hf.get("layer_norm_epsilon", 1e-5)),
        mlp_type="gelu",
        parallel_residual=parallel,
        shared_block_norm=parallel and not two_norms,
        attention_bias=bias,
        mlp_bias=bias,
        rope_theta=theta,
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", True)),
        bos_token_id=hf.get("bos_token_id"),
        eos_token_ids=_eos_ids(hf),
        name=str(hf.get("_name_or_path", "")),
    )


def rope_inv_freq(cfg: ModelConfig) -> list[float]:
    """Inverse RoPE frequencies (head_dim/2 of them), with Llama-3 scaling applied when configured.

    Llama-3 scaling (Meta's reference, also used by transformers): wavelengths longer than
    original_max / low_freq_factor are divided by `factor`, shorter than original_max / high_freq_factor
    are kept, and the band between is interpolated smoothly.
    """
    half = cfg.head_dim // 2
    inv = [1.0 / (cfg.rope_theta ** (2 * i / cfg.head_dim)) for i in range(half)]
    s = cfg.rope_scaling
    if s is None:
        return inv
    low_wavelen = s.original_max_position_embeddings / s.low_freq_factor
    high_wavelen = s.original_max_position_embeddings / s.high_freq_factor
    out = []
    for f in inv:
        wavelen = 2 * math.pi / f
        if wavelen < high_wavelen:
            out.append(f)
        elif wavelen > low_wavelen:
            out.append(f / s.factor)
        else:
            smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (
                s.high_freq_factor - s.low_freq_factor
            )
            out.append((1 - smooth) * f / s.factor + smooth * f)
    return out
