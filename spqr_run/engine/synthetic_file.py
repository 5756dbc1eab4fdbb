"""Synthetic `.spqr` files: a real model's shapes with random codes, written straight into the file format.

`write_synthetic_spqr` streams one tensor at a time into `loading.spqr_file.write_spqr` (never a whole model
in memory: a LLaMA-33B-shape file is ~15.6 GB, the writer holds one linear, ~0.12 GB, at a time): the packed
records of every linear come from `engine.synthetic.random_spqr_linear` (uniform random words are uniform
random codes, so nothing is quantized), one act-order permutation per fusion group (q/k/v, gate/up) so the
loader fuses them as it does a quantized checkpoint, fp16 embedding / LM head / norms, and a word-level
tokenizer of `vocab_size` tokens ("<unk>", "<s>", "</s>", then "t3", "t4", ...). The file loads through the
normal validating loader (`loading.open_model`), like any `spqr-quantize` output.

Every linear is drawn from its own generator (seeded by the file's seed, the layer and the linear), so a file
is reproducible tensor by tensor and the header's sizes are computed without drawing anything
(`synthetic_specs`).

Bits per weight: 3-bit codes and 3-bit statistics cost 3.625 bits (codes 3, two 3-bit stat codes per 16
weights 0.375, fp16 second-order numbers 0.25), each outlier 32 bits, the permutation 16 bits per column and
the row pointers 32 bits per row; `DEFAULT_OUTLIER_RATE` 0.8% keeps a LLaMA-33B shape at 3.88 bits.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from spqr_run.config import ModelConfig
from spqr_run.engine.synthetic import random_spqr_linear, spqr_meta, synthetic_config
from spqr_run.errors import ConfigError
from spqr_run.models.fused import fusion_plan
from spqr_run.quant import QuantConfig, QuantizedLinear
from spqr_run.quant.packing import encode_columns
from spqr_run.tokenizer import Tokenizer

DEFAULT_OUTLIER_RATE = 0.008  # fraction of weights stored as outliers (32 bits each)
SYNTHETIC_NOTE = "synthetic: random codes (speed and memory only, no language)"
PACKED_FIELDS = ("tiles", "outliers", "outlier_row_ptr", "perm")


@dataclass(frozen=True)
class SyntheticFile:
    """What `write_synthetic_spqr` wrote: sizes in bytes, `avg_bits` of the quantized linears (every packed
    byte counted, as `spqr-quantize` reports it), the wall time in seconds."""

    path: Path
    config: ModelConfig
    wbits: int
    outlier_rate: float
    seed: int
    file_bytes: int
    packed_bytes: int
    quantized_params: int
    avg_bits: float
    seconds: float

    def settings(self) -> dict[str, Any]:
        """The parameters that determine the file's bytes (stored in its header, compared by caches)."""
        return synthetic_settings(self.config, self.wbits, self.outlier_rate, self.seed)


def synthetic_settings(cfg: ModelConfig, wbits: int, outlier_rate: float, seed: int) -> dict[str, Any]:
    """The header's `summary.synthetic` entry: everything the file's bytes depend on."""
    return {"config": cfg.to_dict(), "wbits": wbits, "outlier_rate": outlier_rate, "seed": seed}


def synthetic_file_config(
    name: str | ModelConfig, *, layers: int | None = None, max_positions: int | None = None
) -> ModelConfig:
    """A synthetic config (`engine.synthetic.SYNTHETIC`) for a file: optionally truncated to `layers` blocks
    and with `max_positions` positions (LLaMA-1's 2048 is too short for a 4096-token KV cache)."""
    cfg = synthetic_config(name, layers=layers)
    if max_positions is not None:
        if max_positions < 1:
            raise ConfigError(f"invalid max_positions {max_positions}: must be >= 1")
        cfg = dataclasses.replace(cfg, max_position_embeddings=max_positions)
    return cfg


def synthetic_tokenizer(vocab_size: int) -> Tokenizer:
    """A word-level tokenizer of exactly `vocab_size` tokens: "<unk>" 0, "<s>" 1 (BOS), "</s>" 2 (EOS), then
    "t3" ... split on whitespace. It decodes any id, so generated text prints (as "t123 t4567 ...")."""
    import tokenizers
    from tokenizers import decoders, models, pre_tokenizers

    if vocab_size < 4:
        raise ConfigError(f"a synthetic vocabulary needs at least 4 tokens, got {vocab_size}")
    specials = ["<unk>", "<s>", "</s>"]
    vocab = {tok: i for i, tok in enumerate(specials)} | {f"t{i}": i for i in range(3, vocab_size)}
    tok = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with spaces
    tok.add_special_tokens([tokenizers.AddedToken(t, special=True) for t in specials])
    from spqr_run.tokenizer import _HFBackend

    return Tokenizer(_HFBackend(tok), bos_id=1, eos_id=2, add_bos=True, source="synthetic tokenizer")


def _seed(*parts: object) -> int:
    """A 63-bit seed from the parts (stable across runs and Python versions, unlike `hash`)."""
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def _generator(*parts: object) -> torch.Generator:
    return torch.Generator().manual_seed(_seed(*parts))


def _uniform(shape: tuple[int, ...], std: float, gen: torch.Generator) -> Tensor:
    """fp16 uniform in [-std*sqrt(3), std*sqrt(3)] (standard deviation `std`)."""
    a = std * math.sqrt(3)
    return torch.empty(shape, dtype=torch.float16).uniform_(-a, a, generator=gen)


def synthetic_specs(
    cfg: ModelConfig, *, wbits: int, outlier_rate: float
) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    """name -> (dtype, shape) of every tensor of the file, in the order it is written, computed without
    drawing anything (`random_spqr_linear` puts round(rate * out * in) outliers in each linear)."""
    specs: dict[str, tuple[torch.dtype, tuple[int, ...]]] = {
        "embed_tokens.weight": (torch.float16, (cfg.vocab_size, cfg.hidden_size))
    }
    for i in range(cfg.num_layers):
        for lname, (out, inp) in cfg.linear_shapes().items():
            m = spqr_meta(out, inp, wbits)
            name = f"layers.{i}.{lname}"
            nnz = int(round(outlier_rate * out * inp))
            specs[f"{name}.tiles"] = (torch.int32, (m.num_row_groups, m.num_k_blocks, m.record_words))
            specs[f"{name}.outliers"] = (torch.int32, (nnz,))
            specs[f"{name}.outlier_row_ptr"] = (torch.int32, (m.num_row_groups * 16 + 1,))
            specs[f"{name}.perm"] = (torch.int16, (inp,))
        specs[f"layers.{i}.attn_norm.weight"] = (torch.float16, (cfg.hidden_size,))
        specs[f"layers.{i}.mlp_norm.weight"] = (torch.float16, (cfg.hidden_size,))
    specs["norm.weight"] = (torch.float16, (cfg.hidden_size,))
    if not cfg.tie_word_embeddings:
        specs["lm_head.weight"] = (torch.float16, (cfg.vocab_size, cfg.hidden_size))
    return specs


def _check_supported(cfg: ModelConfig) -> None:
    if cfg.arch != "llama" or cfg.norm_type != "rms" or cfg.parallel_residual:
        raise ConfigError(f"synthetic .spqr files are written for LLaMA shapes, not {cfg.name or cfg.arch}")
    if cfg.attention_bias or cfg.mlp_bias or cfg.has_o_bias:
        raise ConfigError("synthetic .spqr files have no linear biases")


def write_synthetic_spqr(
    path: str | Path,
    cfg: ModelConfig,
    *,
    wbits: int = 3,
    outlier_rate: float = DEFAULT_OUTLIER_RATE,
    seed: int = 0,
    log: Callable[[str], None] = lambda _: None,
) -> SyntheticFile:
    """Write a `.spqr` file of `cfg`'s shapes (a LLaMA config) with random SpQR codes; see the module docstring.

    Memory: one linear's records (plus the embedding table while it is written). Time on the 2-core
    developers' box: about 2 minutes of drawing plus the disk's write time for a LLaMA-33B shape."""
    from spqr_run.loading.spqr_file import write_spqr

    _check_supported(cfg)
    if not 0 <= outlier_rate < 1:
        raise ConfigError(f"invalid outlier rate {outlier_rate}: must be in [0, 1)")
    qcfg = QuantConfig(method="spqr", wbits=wbits)
    path = Path(path)
    t0 = time.perf_counter()
    groups = {m: members for _, members in fusion_plan(cfg)[0] for m in members}
    current: dict[
        str, QuantizedLinear
    ] = {}  # the one linear drawn last: its four tensors are written in a row

    def linear(layer: int, lname: str) -> QuantizedLinear:
        key = f"layers.{layer}.{lname}"
        if key not in current:
            current.clear()
            out, inp = cfg.linear_shapes()[lname]
            group = groups.get(lname, (lname,))
            perm = encode_columns(
                torch.randperm(inp, generator=_generator(seed, layer, group))
            )  # (in,) int16
            current[key] = random_spqr_linear(
                spqr_meta(out, inp, wbits),
                outlier_rate=outlier_rate,
                gen=_generator(seed, layer, lname),
                device=torch.device("cpu"),
                perm=perm,
            )
            if lname == next(iter(cfg.linear_shapes())):
                log(f"layer {layer + 1}/{cfg.num_layers}")
        return current[key]

    def packed(layer: int, lname: str, field: str) -> Callable[[], Tensor]:
        return lambda: linear(layer, lname).tensors()[field]

    def dense(name: str, shape: tuple[int, ...]) -> Callable[[], Tensor]:
        if name == "embed_tokens.weight":  # small, like LLaMA's init; an untied head keeps logits ~ unit std
            return lambda: _uniform(shape, 0.02, _generator(seed, name))
        if name == "lm_head.weight":
            return lambda: _uniform(shape, 1.0 / math.sqrt(cfg.hidden_size), _generator(seed, name))
        return lambda: torch.ones(shape, dtype=torch.float16)  # RMSNorm weights

    specs = synthetic_specs(cfg, wbits=wbits, outlier_rate=outlier_rate)
    tensors: list[tuple[str, Callable[[], Tensor]]] = []
    for name, (_, shape) in specs.items():
        module, _, field = name.rpartition(".")
        if field in PACKED_FIELDS:
            _, layer, lname = module.split(".", 2)
            tensors.append((name, packed(int(layer), lname, field)))
        else:
            tensors.append((name, dense(name, shape)))
    metas = {
        f"layers.{i}.{lname}": spqr_meta(out, inp, wbits).to_dict()
        for i in range(cfg.num_layers)
        for lname, (out, inp) in cfg.linear_shapes().items()
    }
    packed_bytes = sum(
        math.prod(shape) * torch.empty(0, dtype=dtype).element_size()
        for name, (dtype, shape) in specs.items()
        if name.rpartition(".")[2] in PACKED_FIELDS
    )
    params = cfg.num_layers * sum(o * i for o, i in cfg.linear_shapes().values())
    nnz = cfg.num_layers * sum(int(round(outlier_rate * o * i)) for o, i in cfg.linear_shapes().values())
    header = {
        "model_config": cfg.to_dict(),
        "quant_config": qcfg.to_dict(),
        "tokenizer": synthetic_tokenizer(cfg.vocab_size).to_json_dict(),
        "generation_defaults": {},
        "linears": metas,
        "summary": {
            "avg_bits": packed_bytes * 8 / params,
            "outlier_fraction": nnz / params,
            "quantized_params": params,
            "calibration": SYNTHETIC_NOTE,
            "source": "synthetic",
            "synthetic": synthetic_settings(cfg, wbits, outlier_rate, seed),
        },
    }
    file_bytes = write_spqr(path, header, tensors, specs=specs)
    return SyntheticFile(
        path=path,
        config=cfg,
        wbits=wbits,
        outlier_rate=outlier_rate,
        seed=seed,
        file_bytes=file_bytes,
        packed_bytes=packed_bytes,
        quantized_params=params,
        avg_bits=packed_bytes * 8 / params,
        seconds=time.perf_counter() - t0,
    )


def cached_synthetic_spqr(
    path: str | Path,
    cfg: ModelConfig,
    *,
    wbits: int = 3,
    outlier_rate: float = DEFAULT_OUTLIER_RATE,
    seed: int = 0,
    log: Callable[[str], None] = lambda _: None,
) -> tuple[Path, bool]:
    """`path`, written by `write_synthetic_spqr` unless a file there already has these settings (its header's
    `summary.synthetic`). Returns (path, whether it was written now)."""
    from spqr_run.errors import ModelFormatError
    from spqr_run.loading.spqr_file import read_header

    path = Path(path)
    want = synthetic_settings(cfg, wbits, outlier_rate, seed)
    if path.is_file():
        try:
            have = read_header(path).get("summary", {}).get("synthetic")
        except ModelFormatError:
            have = None
        if have == want:
            log(f"{path}: cached")
            return path, False
        log(f"{path}: other settings or not a synthetic file; writing it again")
    path.parent.mkdir(parents=True, exist_ok=True)
    write_synthetic_spqr(path, cfg, wbits=wbits, outlier_rate=outlier_rate, seed=seed, log=log)
    return path, True
