"""Load-time fusion of the SpQR linears that read the same input (q, k, v; gate, up; Falcon-7B: q, k, v, up).

The quantizer gives linears that read the same input one shared Hessian, hence one act_order permutation
(`spqr_run.quant.spqr.quantize_linears`). Such linears are fused into one `SpQRLinear` whose rows are the
members' rows stacked (`QuantizedLinear.concat_rows`): its forward gathers x[..., perm] once and runs one
matmul, and the decoder splits the output (`Attention.project`, `MLP.project`, `Block.forward`). The CPU path
(a dense fp16 copy decoded once, `SpQRLinear.materialize`) runs one matmul on the fused rows as well.

What is fused, per block (`fusion_plan`), first choice first:
- a parallel block with one shared norm (Falcon-7B): q, k, v, [gate,] up -> `in_proj`; when their permutations
  differ, the two groups below instead;
- q, k, v -> `attn.qkv_proj`;  gate, up -> `mlp.gate_up_proj` (gated MLPs).
A group is fused only when every member is a packed spqr `SpQRLinear` with the same in_features, bit widths,
group sizes and permutation, and every member but the last has a multiple of 16 rows (a row tile never
straddles two members). Anything else stays as it was, unfused and correct.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from spqr_run.config import ModelConfig
from spqr_run.quant.quantized import QuantizedLinear

TILE_ROWS = 16  # output rows of one packed row tile: a fused member boundary must fall on one

ATTN = ("attn.q_proj", "attn.k_proj", "attn.v_proj")


def _mlp_inputs(cfg: ModelConfig) -> tuple[str, ...]:
    return ("mlp.gate_proj", "mlp.up_proj") if cfg.mlp_type == "gated_silu" else ("mlp.up_proj",)


def fusion_plan(cfg: ModelConfig) -> list[list[tuple[str, tuple[str, ...]]]]:
    """Per block, the fusions to try in order of preference: each a list of (fused name, member names), names
    relative to the block. An option before the last is taken only when all its groups fuse; the last one is
    taken group by group (`fuse_linears`)."""
    mlp = _mlp_inputs(cfg)
    split = [("attn.qkv_proj", ATTN)]
    if len(mlp) > 1:
        split.append(("mlp.gate_up_proj", mlp))
    if cfg.parallel_residual and cfg.shared_block_norm:
        return [[("in_proj", ATTN + mlp)], split]
    return [split]


def fused_linear_shapes(cfg: ModelConfig) -> dict[str, tuple[int, int]]:
    """(out_features, in_features) of the linears one block runs once fused (a quantized model as loaded):
    `ModelConfig.linear_shapes` with each first-choice group of `fusion_plan` replaced by its fused linear.
    Used for the largest weight the prefill path dequantizes at once (`engine.planner.estimate_workspace`)."""
    shapes = dict(cfg.linear_shapes())
    for name, members in fusion_plan(cfg)[0]:
        rows = sum(shapes.pop(m)[0] for m in members)
        shapes[name] = (rows, cfg.hidden_size)
    return shapes


def _same_perm(a: Tensor | None, b: Tensor | None) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return a.shape == b.shape and bool(torch.equal(a, b))


def can_fuse(modules: list[nn.Module | None]) -> bool:
    """True when `modules` can become one `SpQRLinear` (conditions in the module docstring)."""
    from spqr_run.models.spqr_linear import SpQRLinear

    if len(modules) < 2 or not all(isinstance(m, SpQRLinear) for m in modules):
        return False
    first = modules[0]
    if any(m.packed_released for m in modules) or first.meta.method != "spqr":  # type: ignore[union-attr]
        return False
    for m in modules:
        meta = m.meta  # type: ignore[union-attr]
        if (meta.method, meta.wbits, meta.stat_bits, meta.groupsize, meta.stat_groupsize, meta.in_features) != (
            first.meta.method, first.meta.wbits, first.meta.stat_bits, first.meta.groupsize,  # type: ignore[union-attr]
            first.meta.stat_groupsize, first.meta.in_features,  # type: ignore[union-attr]
        ):  # fmt: skip
            return False
        if not _same_perm(getattr(m, "perm", None), getattr(first, "perm", None)):
            return False
        if (m.dense_weight is None) != (first.dense_weight is None):  # type: ignore[union-attr]
            return False
    return all(m.meta.out_features % TILE_ROWS == 0 for m in modules[:-1])  # type: ignore[union-attr]


def _fused_bias(modules: list[nn.Module]) -> Tensor | None:
    """The members' biases stacked (zeros for a member without one); None when no member has one."""
    biases = [m.bias for m in modules]
    present = [b for b in biases if b is not None]
    if not present:
        return None
    like = present[0]
    return torch.cat(
        [
            b.to(like.dtype) if b is not None else like.new_zeros(m.meta.out_features)  # type: ignore[union-attr]
            for b, m in zip(biases, modules, strict=True)
        ]
    )


def fuse_modules(modules: list[nn.Module]) -> nn.Module:
    """One `SpQRLinear` computing the members' outputs concatenated along the last dimension.

    The packed rows are concatenated (`QuantizedLinear.concat_rows`); a dense copy the members hold (the CPU
    path) is concatenated too, in the members' dtype. Raises ValueError when `can_fuse` is False."""
    from spqr_run.models.spqr_linear import SpQRLinear

    if not can_fuse(modules):
        raise ValueError("these linears cannot be fused (see spqr_run.models.fused.can_fuse)")
    parts: list[QuantizedLinear] = [m.quantized() for m in modules]  # type: ignore[operator]
    fused = SpQRLinear(QuantizedLinear.concat_rows(parts), _fused_bias(modules))
    dense = [m.dense_weight for m in modules]
    if dense[0] is not None:
        fused.register_buffer("dense_weight", torch.cat(dense), persistent=False)  # type: ignore[arg-type]
    return fused


def _try_fuse(block: nn.Module, name: str, members: tuple[str, ...]) -> bool:
    modules = [_member(block, m) for m in members]
    if not can_fuse(modules):
        return False
    fused = fuse_modules(modules)
    for m in members:  # drop the members first: their packed rows then exist only in the fused linear
        owner, _, attr = m.rpartition(".")
        setattr(block.get_submodule(owner), attr, None)
    owner, _, attr = name.rpartition(".")
    setattr(block.get_submodule(owner) if owner else block, attr, fused)
    return True


def fuse_linears(model: nn.Module) -> int:
    """Fuse, in every block of a built `Decoder`, the SpQR linears that read the same input (module
    docstring); returns the number of fused linears made. Idempotent (fused members are gone). Call it
    before `SpQRLinear.materialize(keep_packed=False)`: a linear whose packed form was freed is not fused."""
    return sum(fuse_block(block, model.config) for block in model.layers)  # type: ignore[arg-type, union-attr]


def fuse_block(block: nn.Module, cfg: ModelConfig) -> int:
    """`fuse_linears` for one decoder block of a model of config `cfg`; returns the fused linears made."""
    options = fusion_plan(cfg)
    for k, option in enumerate(options):
        groups = [(n, ms) for n, ms in option if all(_present(block, m) for m in ms)]
        last = k == len(options) - 1
        if not last and not all(can_fuse([_member(block, m) for m in ms]) for _, ms in option):
            continue  # a preferred option applies only whole: try the next one
        return sum(_try_fuse(block, n, ms) for n, ms in groups)
    return 0


def _member(block: nn.Module, name: str) -> nn.Module | None:
    """The block's submodule `name` ("attn.q_proj"), None when it is absent (fused away)."""
    owner, _, attr = name.rpartition(".")
    return getattr(block.get_submodule(owner), attr, None)


def _present(block: nn.Module, name: str) -> bool:
    return _member(block, name) is not None
