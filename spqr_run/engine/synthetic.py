"""Synthetic models: the real shapes of LLaMA/Falcon checkpoints with random weights, for benchmarks.

`build_synthetic` builds a `Decoder` directly on the target device, one linear at a time (never a whole
model in host memory): random packed SpQR linears (`method="spqr"`) or random dense ones (`"fp16"`), with
fp16 embeddings and norms. Speed does not depend on the values, only on the shapes and the layout, but the
values are kept realistic so activations stay finite through every layer.

Random SpQR linear: every bit pattern of the packed code and statistic words is a valid code, so uniform
random int32 words are exactly "uniform random codes, then `QuantizedLinear.pack`" without the cost of
packing (20 s a 7B MLP matrix on a CPU); outliers, second-order statistics and the permutation are drawn
as an `UnpackedLinear` would hold them. `tests/test_graphs.py` checks that `pack(unpack(q))` gives the
same words back and that the CPU fast path reconstructs exactly what `SpQRLinear.materialize` does.
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import Tensor, nn

from spqr_run.config import ModelConfig
from spqr_run.engine.planner import fp16_params, linear_params
from spqr_run.errors import ConfigError
from spqr_run.models.decoder import Decoder, Rotary
from spqr_run.models.fused import fuse_linears, fusion_plan
from spqr_run.models.linear import Linear
from spqr_run.models.spqr_linear import SpQRLinear
from spqr_run.quant import LinearMeta, QuantConfig, QuantizedLinear, tile_layout
from spqr_run.quant.packing import encode_columns

METHODS = ("spqr", "fp16")


def _llama(hidden: int, ffn: int, layers: int, heads: int, name: str) -> ModelConfig:
    return ModelConfig(
        arch="llama",
        vocab_size=32000,
        hidden_size=hidden,
        intermediate_size=ffn,
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=heads,
        head_dim=hidden // heads,
        max_position_embeddings=2048,
        norm_eps=1e-6,
        bos_token_id=1,
        eos_token_ids=(2,),
        name=name,
    )


def _falcon(hidden: int, layers: int, heads: int, kv_heads: int, two_norms: bool, name: str) -> ModelConfig:
    return ModelConfig(
        arch="falcon",
        vocab_size=65024,
        hidden_size=hidden,
        intermediate_size=4 * hidden,
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=hidden // heads,
        max_position_embeddings=2048,
        norm_type="layer",
        mlp_type="gelu",
        parallel_residual=True,
        shared_block_norm=not two_norms,
        tie_word_embeddings=True,
        eos_token_ids=(11,),
        name=name,
    )


SYNTHETIC: dict[str, ModelConfig] = {
    "llama-7b": _llama(4096, 11008, 32, 32, "llama-7b"),
    "llama-13b": _llama(5120, 13824, 40, 40, "llama-13b"),
    "llama-30b": _llama(6656, 17920, 60, 52, "llama-30b"),
    "llama-65b": _llama(8192, 22016, 80, 64, "llama-65b"),
    "falcon-7b": _falcon(4544, 32, 71, 1, False, "falcon-7b"),
    "falcon-40b": _falcon(8192, 60, 128, 8, True, "falcon-40b"),
}


def synthetic_config(name: str | ModelConfig, *, layers: int | None = None) -> ModelConfig:
    """A synthetic name (or a ModelConfig) -> its config, optionally truncated to `layers` blocks."""
    if isinstance(name, ModelConfig):
        cfg = name
    elif name in SYNTHETIC:
        cfg = SYNTHETIC[name]
    else:
        raise ConfigError(f"unknown synthetic model {name!r} (known: {', '.join(SYNTHETIC)})")
    if layers is not None:
        if not 1 <= layers <= cfg.num_layers:
            raise ConfigError(f"invalid --layers {layers}: {cfg.name or cfg.arch} has {cfg.num_layers}")
        cfg = dataclasses.replace(cfg, num_layers=layers)
    return cfg


def spqr_meta(out_features: int, in_features: int, wbits: int) -> LinearMeta:
    return LinearMeta.from_config(QuantConfig(method="spqr", wbits=wbits), out_features, in_features)


# ---- one random SpQR linear -----------------------------------------------------------------------
def _uniform(
    shape: tuple[int, ...], std: float, gen: torch.Generator, device: torch.device, dtype=None
) -> Tensor:
    """Uniform in [-std*sqrt(3), std*sqrt(3)] (standard deviation `std`; 3x cheaper than normals on CPUs)."""
    a = std * math.sqrt(3)
    return torch.empty(shape, device=device, dtype=dtype).uniform_(-a, a, generator=gen)


def _stratified_positions(n: int, k: int, gen: torch.Generator, device: torch.device) -> Tensor:
    """k distinct sorted positions in [0, n): one uniform draw in each of k equal strata."""
    if k == 0:
        return torch.zeros(0, dtype=torch.int64, device=device)
    lo = torch.arange(k, device=device) * n // k  # (k,) stratum starts
    hi = torch.arange(1, k + 1, device=device) * n // k  # (k,) stratum ends (exclusive)
    u = torch.rand(k, generator=gen, device=device, dtype=torch.float64)
    return lo + ((hi - lo) * u).long().clamp_max(hi - lo - 1)


def _random_words(shape: tuple[int, ...], gen: torch.Generator, device: torch.device) -> Tensor:
    """Uniform random int32 words (every bit pattern), i.e. uniform random packed codes."""
    return torch.randint(-(2**31), 2**31, shape, generator=gen, device=device, dtype=torch.int64).to(
        torch.int32
    )


def random_spqr_linear(
    meta: LinearMeta,
    *,
    outlier_rate: float,
    gen: torch.Generator,
    device: torch.device,
    perm: Tensor | None = None,
) -> QuantizedLinear:
    """A random SpQR linear whose reconstructed weights have std ~ 1/sqrt(in_features).

    Codes c and scale codes sc are uniform; zero = 1.0 * zero_code (uniform in the stat range) and
    scale = a * (sc + 1) with a chosen so that scale * (c - zero) has the target std; outliers are
    uniform with std 3 * std at `outlier_rate` of all positions (distinct, one per equal stratum).
    `perm` (in,) int16 (unsigned 16-bit patterns) is the act-order permutation; random when None.
    """
    out, inp = meta.out_features, meta.in_features
    rt, kb = meta.num_row_groups, meta.num_k_blocks
    tiles = _random_words((rt, kb, meta.record_words), gen, device)  # (RT, KB, R): codes and stats random
    nq, ns = 1 << meta.wbits, 1 << meta.stat_bits
    code_var = (nq * nq - 1) / 12 + (ns * ns - 1) / 12  # Var(c - zero), both uniform
    mean_sc = (ns - 1) / 2 + 1  # E[sc + 1]
    target = 1.0 / math.sqrt(inp)
    a = target / (mean_sc * math.sqrt(code_var))
    second = torch.tensor(
        [a, -1.0, 1.0, 0.0], dtype=torch.float16, device=device
    )  # [s.scale, s.zero, z.scale, z.zero]
    tiles[..., -tile_layout.SECOND_WORDS :] = tile_layout.halves_to_words(second.repeat(4))  # 4 groups
    _zero_padding(tiles, meta)
    nnz = int(round(outlier_rate * out * inp))
    flat = _stratified_positions(out * inp, nnz, gen, device)  # (nnz,) sorted, distinct
    values = _uniform((nnz,), 3 * target, gen, device).half()  # (nnz,)
    row_ptr = torch.searchsorted(flat, torch.arange(out + 1, device=device) * inp).to(torch.int32)
    outliers, row_ptr = tile_layout.pack_outliers(row_ptr, flat % inp, values, out)  # CSR order: row, column
    # (in,) int16 holding the unsigned 16-bit pattern, as files store it
    if perm is None:
        perm = encode_columns(torch.randperm(inp, generator=gen, device=device))
    return QuantizedLinear(meta=meta, tiles=tiles, outliers=outliers, outlier_row_ptr=row_ptr, perm=perm)


def _zero_padding(tiles: Tensor, meta: LinearMeta) -> None:
    """Clear the padding of the last row tile and the last k-block (code 0, stat 0, second 0, as `pack`
    writes it) by unpacking and repacking just those records; in place."""
    out, inp, wb, sb = meta.out_features, meta.in_features, meta.wbits, meta.stat_bits
    last_cols = inp - tile_layout.COLS * (meta.num_k_blocks - 1)
    if last_cols < tile_layout.COLS:
        tiles[:, -1:] = tile_layout.pack(*tile_layout.unpack(tiles[:, -1:], out, last_cols, wb, sb), wb, sb)
    last_rows = out - tile_layout.ROWS * (meta.num_row_groups - 1)
    if last_rows < tile_layout.ROWS:
        tiles[-1:] = tile_layout.pack(*tile_layout.unpack(tiles[-1:], last_rows, inp, wb, sb), wb, sb)


# ---- whole models ---------------------------------------------------------------------------------
def _param(t: Tensor) -> nn.Parameter:
    return nn.Parameter(t, requires_grad=False)


def build_synthetic(
    name: str | ModelConfig,
    *,
    method: str = "spqr",
    wbits: int = 3,
    outlier_rate: float = 0.01,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    layers: int | None = None,
    seed: int = 0,
    native: bool | None = None,
) -> Decoder:
    """A random-weight decoder of a synthetic (or given) config on `device`, built one linear at a time.

    `dtype` (default fp16 on CUDA, fp32 on CPU) is the activation dtype. On a CPU with the native kernels
    (`native` None or True, fp32 activations; `spqr_run.cpu`) the model runs as `loading.build_decoder`
    runs a file there: SpQR linears in the CPU layout computed from their packed bytes, with int8 embedding
    and LM head (`cpu.embedding`); the dense ("fp16") model holds every weight matrix in fp16 (embedding and
    LM head too), which the native dense kernel reads directly; `model.native` runs the forward. Without the
    native kernels (`native=False` or the library missing) a CPU model holds its matrices in `dtype`, the
    SpQR linears as a decoded dense copy (the decode-to-dense path).
    """
    if method not in METHODS:
        raise ConfigError(f"invalid method {method!r} (use {' or '.join(METHODS)})")
    if not 0 <= outlier_rate < 1:
        raise ConfigError(f"invalid outlier rate {outlier_rate}: must be in [0, 1)")
    dev = torch.device(device)
    dtype = dtype or (torch.float16 if dev.type == "cuda" else torch.float32)
    use_native = dev.type == "cpu" and dtype == torch.float32 and native is not False and _native_loads()
    if native and not use_native:
        raise ConfigError("native=True needs the native CPU kernels, a CPU device and fp32 activations")
    matrix_dtype = torch.float16 if use_native else dtype  # the dense model's weight matrices
    cfg = synthetic_config(name, layers=layers)
    gen = torch.Generator(device=dev).manual_seed(seed)
    with torch.device("meta"):
        model = Decoder(cfg)
    groups = {m: members for _, members in fusion_plan(cfg)[0] for m in members}
    for block in model.layers:
        perms: dict[tuple[str, ...], Tensor] = {}  # one act-order permutation per fusion group, as quantized
        for lname, (out, inp) in cfg.linear_shapes().items():
            parent_name, _, attr = lname.rpartition(".")
            parent = block.get_submodule(parent_name)
            old: nn.Module = getattr(parent, attr)
            bias = getattr(old, "bias", None)
            b = None if bias is None else torch.zeros(out, dtype=dtype, device=dev)  # (out,)
            if method == "spqr":
                key = groups.get(lname, (lname,))
                if key not in perms:
                    perms[key] = encode_columns(torch.randperm(inp, generator=gen, device=dev))
                q = random_spqr_linear(
                    spqr_meta(out, inp, wbits),
                    outlier_rate=outlier_rate,
                    gen=gen,
                    device=dev,
                    perm=perms[key],
                )
                new: nn.Module = SpQRLinear(q, b)
                if dev.type == "cpu" and not use_native:
                    new.materialize(dtype)  # the decode-to-dense CPU path, as when a .spqr file loads
            else:
                new = Linear(inp, out, bias=b is not None, device="meta")
                w = _uniform((out, inp), 1.0 / math.sqrt(inp), gen, dev, matrix_dtype)  # (out, in)
                new.weight = _param(w)
                if b is not None:
                    new.bias = _param(b)
            setattr(parent, attr, new)
    for pname, p in list(model.named_parameters()):
        if p.device.type != "meta":
            continue
        owner, _, attr = pname.rpartition(".")
        if pname in ("embed_tokens.weight", "lm_head.weight"):
            # embeddings small (like LLaMA's init) so that, tied as the LM head, they do not simply
            # echo the input token; an untied head maps unit-RMS states to unit-std logits
            std = 0.02 if pname == "embed_tokens.weight" else 1.0 / math.sqrt(cfg.hidden_size)
            t = _uniform(tuple(p.shape), std, gen, dev, matrix_dtype)
        elif attr == "bias":
            t = torch.zeros(p.shape, device=dev, dtype=dtype)
        else:  # norm weights
            t = torch.ones(p.shape, device=dev, dtype=dtype)
        model.get_submodule(owner)._parameters[attr] = _param(t)
    model.rotary = Rotary(cfg).to(dev)
    if method == "spqr":
        fuse_linears(model)  # as `build_decoder` does: q/k/v and gate/up run as one linear each
    if use_native:
        _to_native(model, quantized=method == "spqr")
    return model.eval()


def _native_loads() -> bool:
    from spqr_run.cpu import lib

    return lib.load() is not None


def _to_native(model: Decoder, *, quantized: bool) -> None:
    """Put a CPU model on the native kernels as `loading.build_decoder` does: SpQR linears repacked into the
    CPU layout (their records freed), a quantized model's embedding / LM head in int8 rows, the native
    forward."""
    from spqr_run.cpu.decoder import NativeDecoder
    from spqr_run.cpu.embedding import Q8Embedding, Q8Linear

    for module in model.modules():
        if isinstance(module, SpQRLinear):
            module.to_native(keep_packed=False)
    if quantized:
        model.embed_tokens = Q8Embedding(model.embed_tokens.weight)
        if model.lm_head is not None and model.lm_head.bias is None:
            model.lm_head = Q8Linear(model.lm_head.weight)
    model.native = NativeDecoder.for_model(model)
    if model.native is None:
        raise RuntimeError(
            f"the native CPU decoder cannot run this model: {NativeDecoder.unsupported(model)}"
        )


def synthetic_weight_bytes(
    cfg: ModelConfig, *, method: str, wbits: int = 3, outlier_rate: float = 0.01
) -> int:
    """Bytes `build_synthetic` stores (packed layout for spqr, fp16 elsewhere), computed without building
    (linear biases, absent from every synthetic config, are not counted)."""
    fp16 = 2 * fp16_params(cfg)
    if method == "fp16":
        return fp16 + 2 * linear_params(cfg)
    per_block = 0
    # members after the first of a fused group (`fuse_linears`): the group keeps one perm and one row_ptr end
    shared = {m for _, members in fusion_plan(cfg)[0] for m in members[1:]}
    for name, (out, inp) in cfg.linear_shapes().items():
        m = spqr_meta(out, inp, wbits)
        records = m.num_row_groups * m.num_k_blocks
        nnz = round(outlier_rate * out * inp)
        own = name not in shared
        per_block += records * m.record_words * 4  # codes, stats, second
        per_block += nnz * 4  # outlier words
        per_block += (m.num_row_groups * 16 + own) * 4 + own * inp * 2  # row_ptr (i32), perm (u16)
    return fp16 + cfg.num_layers * per_block
