"""Fused q/k/v and gate/up SpQR linears (issue 11, item 3): the quantizer gives linears that read the same input
one permutation, the loader fuses them into one linear (one gather, one matmul), and the fused decoder gives the
unfused decoder's logits, on the packed path and on the CPU path (weights decoded once to fp16).

Models are tiny random LLaMA / Falcon checkpoints written by transformers and quantized by the real quantizer
(`quantize_model.quantize_block`, block by block on random calibration tokens)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import pytest
import torch
from torch import nn

from spqr_run.engine.planner import estimate_workspace, resident_bytes
from spqr_run.loading import ModelSource, build_decoder
from spqr_run.loading.hf import HFWeights, load_hf_config
from spqr_run.models import fused as fused_module
from spqr_run.models.decoder import Rotary
from spqr_run.models.fused import can_fuse, fuse_linears, fused_linear_shapes
from spqr_run.models.spqr_linear import SpQRLinear
from spqr_run.quant import QuantConfig, QuantizedLinear
from spqr_run.quantize_model import load_block, quantize_block, run_block
from tests.tiny_configs import TINY_FALCON, TINY_LLAMA, randomize_hf_model

transformers = pytest.importorskip("transformers")

QCFG = QuantConfig(method="spqr", wbits=3, stat_bits=3, outlier_threshold=0.2)

# name -> (transformers config class, kwargs); every shape a multiple of 16 rows so each group can fuse
MODELS = {
    "llama_gqa": ("LlamaConfig", dict(
        vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128,
    )),
    "llama_bias": ("LlamaConfig", dict(
        vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, attention_bias=True, mlp_bias=True, head_dim=32, max_position_embeddings=128,
    )),
    "falcon7b": ("FalconConfig", dict(
        vocab_size=101, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=128,
        alibi=False, multi_query=True, parallel_attn=True, new_decoder_architecture=False, bias=False,
    )),
    "falcon40b_bias": ("FalconConfig", dict(
        vocab_size=101, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=128,
        alibi=False, new_decoder_architecture=True, num_kv_heads=2, bias=True,
    )),
}  # fmt: skip


def _hf_source(name: str, folder) -> tuple[ModelSource, nn.Module]:
    cls, kwargs = MODELS[name]
    cfg = getattr(transformers, cls)(**kwargs)
    model = randomize_hf_model(getattr(transformers, cls.replace("Config", "ForCausalLM"))(cfg))
    model.save_pretrained(folder, safe_serialization=True)
    cfg = load_hf_config(folder)
    return ModelSource(folder, "hf", cfg, HFWeights(folder, cfg), tokenizer=None), model  # type: ignore[arg-type]


def quantize_source(source: ModelSource, *, n: int = 8, seqlen: int = 32) -> dict[str, QuantizedLinear]:
    """Every linear of `source` quantized by the real quantizer (GPTQ/SpQR, sequential groups with shared
    Hessians) on random calibration tokens: canonical linear name -> packed linear."""
    cfg = source.config
    gen = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, cfg.vocab_size, (n, seqlen), generator=gen)
    inps = source.weights["embed_tokens.weight"].float()[tokens]  # (N, T, hidden)
    rotary, device = Rotary(cfg), torch.device("cpu")
    packed: dict[str, QuantizedLinear] = {}
    for i in range(cfg.num_layers):
        block = load_block(source, i, device)
        block_packed, _ = quantize_block(block, i, cfg, QCFG, rotary, inps, device)
        packed.update(block_packed)
        inps = run_block(block, rotary, inps, device)
    return packed


def quantized_source(source: ModelSource, packed: Mapping[str, QuantizedLinear]) -> ModelSource:
    """`source` with its linears replaced by `packed` (as a `.spqr` file's source builds them)."""
    weights = {k: v for k, v in source.weights.items() if k.rpartition(".")[0] not in packed}
    biases = {k.rpartition(".")[0]: v for k, v in source.weights.items() if k.endswith(".bias")}

    def factory(name: str) -> nn.Module | None:
        return SpQRLinear(packed[name], biases.get(name)) if name in packed else None

    return dataclasses.replace(source, kind="spqr", weights=weights, linear_factory=factory)


@pytest.fixture(scope="module")
def quantize_model_named(tmp_path_factory):
    """name -> (source, packed linears) of that tiny model, quantized once per module."""
    cache: dict[str, tuple[ModelSource, dict[str, QuantizedLinear]]] = {}

    def get(name: str) -> tuple[ModelSource, dict[str, QuantizedLinear]]:
        if name not in cache:
            source, _ = _hf_source(name, tmp_path_factory.mktemp(name))
            cache[name] = (source, quantize_source(source))
        return cache[name]

    return get


@pytest.fixture(scope="module", params=sorted(MODELS))
def quantized(request, quantize_model_named):
    return request.param, *quantize_model_named(request.param)


def _unfused(monkeypatch) -> None:
    monkeypatch.setattr(fused_module, "fuse_linears", lambda model: 0)


def _build(source, monkeypatch, *, fuse: bool, packed_path: bool, **kw):
    """The Python decoder (fused or not); the native CPU decoder is tested in tests/test_cpu_decoder.py."""
    kw.setdefault("native", False)
    with monkeypatch.context() as m:
        if not fuse:
            _unfused(m)
        model = build_decoder(source, dtype=torch.float32, **kw)
    if packed_path:  # drop the CPU path's dense copies: forward runs the packed reference matmul
        for mod in model.modules():
            if isinstance(mod, SpQRLinear):
                mod.dense_weight = None
    return model


# ---- the quantizer shares one permutation between linears that read the same input ------------------------
def test_quantizer_gives_shared_inputs_one_permutation(quantized):
    name, source, packed = quantized
    cfg = source.config
    groups = [("attn.q_proj", "attn.k_proj", "attn.v_proj")]
    if cfg.mlp_type == "gated_silu":
        groups.append(("mlp.gate_proj", "mlp.up_proj"))
    if cfg.parallel_residual and cfg.shared_block_norm:  # Falcon-7B: the MLP reads attention's input too
        groups = [groups[0] + ("mlp.up_proj",)]
    for i in range(cfg.num_layers):
        for group in groups:
            perms = [packed[f"layers.{i}.{m}"].perm_indices() for m in group]
            assert perms[0] is not None and not torch.equal(perms[0], torch.arange(cfg.hidden_size))
            for m, p in zip(group[1:], perms[1:], strict=True):
                assert torch.equal(p, perms[0]), (
                    f"{name} layer {i}: {m} has another permutation than {group[0]}"
                )
        # and the linears reading other inputs get their own
        o = packed[f"layers.{i}.attn.o_proj"].perm_indices()
        assert o.shape != perms[0].shape or not torch.equal(o, perms[0])


# ---- fusion -------------------------------------------------------------------------------------------------
EXPECTED_FUSED = {
    "llama_gqa": ("attn.qkv_proj", "mlp.gate_up_proj"),
    "llama_bias": ("attn.qkv_proj", "mlp.gate_up_proj"),
    "falcon7b": ("in_proj",),
    "falcon40b_bias": ("attn.qkv_proj",),
}

MEMBERS = {
    "in_proj": ("attn.q_proj", "attn.k_proj", "attn.v_proj", "mlp.up_proj"),
    "attn.qkv_proj": ("attn.q_proj", "attn.k_proj", "attn.v_proj"),
    "mlp.gate_up_proj": ("mlp.gate_proj", "mlp.up_proj"),
}


def _spqr_calls(model) -> dict[str, int]:
    """SpQRLinear forward calls per qualified name during one model call (installed hooks)."""
    calls: dict[str, int] = {}
    for qname, mod in model.named_modules():
        if isinstance(mod, SpQRLinear):
            mod.register_forward_hook(lambda *_a, _n=qname: calls.__setitem__(_n, calls.get(_n, 0) + 1))
    return calls


@pytest.mark.parametrize("packed_path", [True, False], ids=["packed", "cpu_dense"])
def test_fused_decoder_gives_the_unfused_logits(quantized, monkeypatch, packed_path):
    name, source, packed = quantized
    qsource = quantized_source(source, packed)
    cfg = source.config
    ref = _build(qsource, monkeypatch, fuse=False, packed_path=packed_path)
    model = _build(qsource, monkeypatch, fuse=True, packed_path=packed_path)
    # the fused linears are there, their members gone
    for block in model.layers:
        for fname in EXPECTED_FUSED[name]:
            assert isinstance(block.get_submodule(fname), SpQRLinear), f"{name}: {fname} not fused"
        assert block.attn.q_proj is None and block.attn.k_proj is None and block.attn.v_proj is None
    per_block = {n.split(".", 2)[2] for n in dict(model.named_modules()) if n.startswith("layers.0.")}
    assert not {m for f in EXPECTED_FUSED[name] for m in MEMBERS[f]} & per_block
    # one call per fused linear, i.e. one per distinct input
    calls = _spqr_calls(model)
    tokens = torch.randint(0, cfg.vocab_size, (2, 13), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = ref(tokens, use_cache=False)
        got = model(tokens, use_cache=False)
    n_linears = len(cfg.linear_shapes()) - sum(len(MEMBERS[f]) - 1 for f in EXPECTED_FUSED[name])
    assert len(calls) == cfg.num_layers * n_linears and set(calls.values()) == {1}
    # same weights bit for bit, only BLAS summation order may differ: logits O(1) agree to ~1e-6
    assert want.abs().max() > 0.1
    err = (got - want).abs().max().item()
    assert err <= 2e-5 * want.abs().max().item(), f"{name}: fused logits differ by {err}"
    # decode steps through the KV cache (one row) agree as well
    for m in (ref, model):
        m.setup_caches(2, 32)
    with torch.no_grad():
        ref(tokens[:, :12], kv_len=12)
        model(tokens[:, :12], kv_len=12)
        pos = torch.full((2, 1), 12)
        one_want = ref(tokens[:, 12:], pos, kv_len=13)
        one_got = model(tokens[:, 12:], pos, kv_len=13)
    assert (one_got - one_want).abs().max().item() <= 2e-5 * one_want.abs().max().item()
    torch.testing.assert_close(one_got[:, 0], got[:, 12], rtol=1e-4, atol=1e-4)


def test_fused_weights_are_the_members_rows(quantized, monkeypatch):
    """The fused packed linear reconstructs exactly the members' rows stacked; its bias is theirs stacked;
    no member's packed tensors survive (no second copy of the weights)."""
    name, source, packed = quantized
    qsource = quantized_source(source, packed)
    model = _build(qsource, monkeypatch, fuse=True, packed_path=True)
    ref = _build(qsource, monkeypatch, fuse=False, packed_path=True)
    for fname in EXPECTED_FUSED[name]:
        members = MEMBERS[fname]
        for i in range(source.config.num_layers):
            f = model.layers[i].get_submodule(fname)
            parts = [ref.layers[i].get_submodule(m) for m in members]
            want = torch.cat([p.quantized().dequantize() for p in parts])
            assert torch.equal(f.quantized().dequantize(), want)
            if parts[0].bias is None:
                assert f.bias is None
            else:
                assert torch.equal(f.bias, torch.cat([p.bias for p in parts]))

    # no second copy: the packed bytes are the members' bytes, less the permutations the members shared
    def packed_bytes(m):
        return sum(x.quantized().nbytes for x in m.modules() if isinstance(x, SpQRLinear))

    hidden = source.config.hidden_size
    shared_perms = sum(len(MEMBERS[f]) - 1 for f in EXPECTED_FUSED[name]) * source.config.num_layers
    # (and one int32 CSR row pointer per junction of two members); held in memory, each member also had its
    # decoded int32 permutation (`SpQRLinear.perm_index`)
    saved = packed_bytes(ref) - packed_bytes(model)
    assert shared_perms * hidden * 2 <= saved <= shared_perms * (hidden * 2 + 4), (saved, shared_perms)
    saved = resident_bytes(ref)[0] - resident_bytes(model)[0]
    assert shared_perms * hidden * 6 <= saved <= shared_perms * (hidden * 6 + 4), (saved, shared_perms)


def test_cpu_fallback_path_fuses_and_frees_the_packed_form(quantized, monkeypatch):
    """The CPU load without the native kernels (`keep_packed=False`): one fp16 dense matrix per fused linear,
    packed form freed, and outputs within fp16 rounding of the packed reference."""
    name, source, packed = quantized
    qsource = quantized_source(source, packed)
    model = build_decoder(qsource, dtype=torch.float32, keep_packed=False, native=False)
    fused = [model.layers[0].get_submodule(f) for f in EXPECTED_FUSED[name]]
    for f in fused:
        assert f.packed_released and f.dense_weight.dtype == torch.float16
        assert f.dense_weight.shape == (f.out_features, f.in_features)
    ref = _build(qsource, monkeypatch, fuse=False, packed_path=True)
    tokens = torch.randint(0, source.config.vocab_size, (1, 9), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        want, got = ref(tokens, use_cache=False), model(tokens, use_cache=False)
    assert (got - want).abs().max().item() <= 2e-3 * want.abs().max().item()


def test_planner_sizes_the_prefill_buffer_for_the_fused_linears():
    """The dequantized-weight workspace is the largest linear as run: the fused gate/up (LLaMA) or in_proj
    (Falcon-7B), not the largest unfused one."""
    for cfg in (TINY_LLAMA, TINY_FALCON):
        shapes = fused_linear_shapes(cfg)
        biggest = max(o * i for o, i in shapes.values())
        assert estimate_workspace(cfg, quantized=True).dequant == biggest * 2
    llama = fused_linear_shapes(TINY_LLAMA)
    assert llama["mlp.gate_up_proj"] == (2 * TINY_LLAMA.intermediate_size, TINY_LLAMA.hidden_size)
    assert "attn.q_proj" not in llama and "mlp.down_proj" in llama
    falcon = fused_linear_shapes(TINY_FALCON)
    assert falcon["in_proj"] == (
        TINY_FALCON.q_dim + 2 * TINY_FALCON.kv_dim + TINY_FALCON.intermediate_size,
        64,
    )


def test_linears_that_cannot_fuse_stay_apart(quantize_model_named, monkeypatch):
    """Another permutation, or a member whose rows end inside a row tile, keeps a group unfused (still correct)."""
    source, packed = quantize_model_named("llama_gqa")
    changed = dict(packed)
    q = packed["layers.0.attn.k_proj"]
    perm = q.perm.clone()
    perm[[0, 1]] = perm[[1, 0]]
    changed["layers.0.attn.k_proj"] = dataclasses.replace(q, perm=perm)
    model = _build(quantized_source(source, changed), monkeypatch, fuse=True, packed_path=True)
    assert model.layers[0].attn.qkv_proj is None and model.layers[0].attn.q_proj is not None
    assert model.layers[0].mlp.gate_up_proj is not None and model.layers[1].attn.qkv_proj is not None
    odd = SpQRLinear(dataclasses.replace(packed["layers.0.attn.q_proj"]))
    odd.meta = dataclasses.replace(odd.meta, out_features=60)
    assert not can_fuse([odd, SpQRLinear(packed["layers.0.attn.k_proj"])])
    assert fuse_linears(model) == 0  # idempotent: nothing left to fuse


def test_falcon7b_falls_back_to_qkv_when_the_mlp_has_another_permutation(quantize_model_named, monkeypatch):
    """Falcon-7B fuses q/k/v/up into in_proj only when all four share a permutation; otherwise q/k/v alone,
    and the logits still equal the unfused model's."""
    source, packed = quantize_model_named("falcon7b")
    changed = dict(packed)
    for i in range(source.config.num_layers):
        q = packed[f"layers.{i}.mlp.up_proj"]
        perm = q.perm.clone()
        perm[[0, 1]] = perm[[1, 0]]
        changed[f"layers.{i}.mlp.up_proj"] = dataclasses.replace(q, perm=perm)
    qsource = quantized_source(source, changed)
    model = _build(qsource, monkeypatch, fuse=True, packed_path=True)
    ref = _build(qsource, monkeypatch, fuse=False, packed_path=True)
    for block in model.layers:
        assert block.in_proj is None and isinstance(block.attn.qkv_proj, SpQRLinear)
        assert isinstance(block.mlp.up_proj, SpQRLinear)
    tokens = torch.randint(0, source.config.vocab_size, (1, 11), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        want, got = ref(tokens, use_cache=False), model(tokens, use_cache=False)
    assert (got - want).abs().max().item() <= 2e-5 * want.abs().max().item()


def test_kernel_path_gathers_each_input_once(quantized, monkeypatch):
    """On the kernel path (forced here on the CPU), each fused linear receives x[..., perm] gathered once and
    makes one `spqr_matmul_stored` call; the logits equal the reference path's."""
    from spqr_run.models import spqr_linear
    from spqr_run.ops import spqr_matmul_stored

    name, source, packed = quantized
    model = _build(quantized_source(source, packed), monkeypatch, fuse=True, packed_path=True)
    tokens = torch.randint(0, source.config.vocab_size, (1, 7), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        want = model(tokens, use_cache=False)
    seen: list[tuple[int, int]] = []
    inputs: dict[int, torch.Tensor] = {}
    for mod in model.modules():
        if isinstance(mod, SpQRLinear):
            mod.register_forward_pre_hook(lambda m, args: inputs.__setitem__(id(m), args[0]))

    def stored(x_stored, q, bias=None):
        owner = next(m for m in model.modules() if isinstance(m, SpQRLinear) and m.meta is q.meta)
        assert torch.equal(x_stored, inputs[id(owner)][..., q.perm_indices()])  # the stored column order
        seen.append((q.meta.out_features, q.meta.in_features))
        return spqr_matmul_stored(x_stored, q, bias)

    monkeypatch.setattr(spqr_linear, "kernels_support", lambda x, q: True)
    monkeypatch.setattr(spqr_linear, "spqr_matmul_stored", stored)
    with torch.no_grad():
        got = model(tokens, use_cache=False)
    cfg = source.config
    per_block = len(cfg.linear_shapes()) - sum(len(MEMBERS[f]) - 1 for f in EXPECTED_FUSED[name])
    assert len(seen) == cfg.num_layers * per_block
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_loading_frees_each_groups_parts_as_it_fuses(quantize_model_named, monkeypatch):
    """While `build_decoder` fuses, the packed tensors of the groups already fused are gone: the host never
    holds the whole model's q/k/v and gate/up twice."""
    import weakref

    source, packed = quantize_model_named("llama_gqa")
    qsource = quantized_source(source, packed)
    refs: list[weakref.ref] = []  # weakrefs to each member's packed tiles, in load order (not by id(): a
    # freed member's id is reused by a later one)

    factory = qsource.linear_factory

    def tracked(name: str):
        module = factory(name)
        if module is None:
            return None
        # a private copy, so the test's own `packed` dict holds no reference to what the model loads
        q = module.quantized()
        module = SpQRLinear(
            dataclasses.replace(q, **{k: v.clone() for k, v in q.tensors().items()}), module.bias
        )
        module.ref_index = len(refs)
        refs.append(weakref.ref(module.tiles))
        return module

    calls: list[list[int]] = []
    real = fused_module.fuse_modules

    def fuse_and_check(modules):
        for earlier in calls:  # every member of an earlier group is freed by now
            assert all(refs[i]() is None for i in earlier), "an earlier group's packed tensors are still held"
        calls.append([m.ref_index for m in modules])
        return real(modules)

    monkeypatch.setattr(fused_module, "fuse_modules", fuse_and_check)
    model = build_decoder(dataclasses.replace(qsource, linear_factory=tracked), dtype=torch.float32)
    assert len(calls) == 2 * source.config.num_layers
    assert all(refs[i]() is None for group in calls for i in group)
    assert model.layers[1].mlp.gate_up_proj is not None
