"""The decoder against Hugging Face transformers on random tiny configs (fp32, same weights via our loader)."""

from __future__ import annotations

import pytest
import torch

from spqr_run.loading import ModelSource, build_decoder
from spqr_run.loading.hf import HFWeights, load_hf_config
from tests.tiny_configs import randomize_hf_model

transformers = pytest.importorskip("transformers")

LLAMA_BASE = dict(
    vocab_size=101,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=128,
    rms_norm_eps=1e-5,
)
LLAMA_CASES = {
    "mha": dict(num_key_value_heads=4),
    "gqa": dict(num_key_value_heads=2, rope_theta=50000.0),
    "mqa_tied": dict(num_key_value_heads=1, tie_word_embeddings=True),
    "bias_headdim": dict(num_key_value_heads=2, attention_bias=True, mlp_bias=True, head_dim=32),
    "llama3_rope": dict(
        num_key_value_heads=2,
        rope_scaling=dict(
            rope_type="llama3",
            factor=8.0,
            low_freq_factor=1.0,
            high_freq_factor=4.0,
            original_max_position_embeddings=16,
        ),
    ),
}
FALCON_BASE = dict(
    vocab_size=101,
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=128,
    alibi=False,
)
FALCON_CASES = {
    "falcon7b_mqa": dict(multi_query=True, parallel_attn=True, new_decoder_architecture=False, bias=False),
    "falcon40b_new_arch": dict(new_decoder_architecture=True, num_kv_heads=2, bias=False),
    "falcon_new_arch_bias": dict(new_decoder_architecture=True, num_kv_heads=4, bias=True),
    "falcon_mha_sequential": dict(
        multi_query=False, parallel_attn=False, new_decoder_architecture=False, bias=True
    ),
}


def _save(hf_model, tmp_path):
    hf_model.save_pretrained(tmp_path, safe_serialization=True)
    cfg = load_hf_config(tmp_path)
    return ModelSource(tmp_path, "hf", cfg, HFWeights(tmp_path, cfg), tokenizer=None)  # type: ignore[arg-type]


def _compare(hf_model, source, seq=17):
    ours = build_decoder(source, dtype=torch.float32)
    tokens = torch.randint(0, source.config.vocab_size, (2, seq))
    with torch.no_grad():
        ref = hf_model(tokens).logits
        got = ours(tokens, use_cache=False)
    assert got.shape == ref.shape
    assert (got - ref).abs().max().item() <= 1e-4
    return ours, tokens


@pytest.mark.parametrize("case", sorted(LLAMA_CASES))
def test_llama_matches_transformers(case, tmp_path):
    hf_cfg = transformers.LlamaConfig(**LLAMA_BASE, **LLAMA_CASES[case])
    hf_model = randomize_hf_model(transformers.LlamaForCausalLM(hf_cfg))
    source = _save(hf_model, tmp_path)
    _compare(hf_model, source, seq=40 if case == "llama3_rope" else 17)


@pytest.mark.parametrize("case", sorted(FALCON_CASES))
def test_falcon_matches_transformers(case, tmp_path):
    hf_cfg = transformers.FalconConfig(**FALCON_BASE, **FALCON_CASES[case])
    hf_model = randomize_hf_model(transformers.FalconForCausalLM(hf_cfg))
    source = _save(hf_model, tmp_path)
    _compare(hf_model, source)


@pytest.mark.parametrize("arch", ["llama", "falcon"])
def test_kv_cache_decode_equals_full_recompute(arch, tmp_path):
    if arch == "llama":
        hf_model = randomize_hf_model(
            transformers.LlamaForCausalLM(transformers.LlamaConfig(**LLAMA_BASE, num_key_value_heads=2))
        )
    else:
        hf_model = randomize_hf_model(
            transformers.FalconForCausalLM(
                transformers.FalconConfig(**FALCON_BASE, **FALCON_CASES["falcon40b_new_arch"])
            )
        )
    model = build_decoder(_save(hf_model, tmp_path))
    tokens = torch.randint(0, 101, (1, 20))
    with torch.no_grad():
        full = model(tokens, use_cache=False)  # (1, 20, V)
        model.setup_caches(1, 64, dtype=torch.float32)  # the decoder's math: no fp16 cache rounding
        first = model(tokens[:, :12], kv_len=12)  # prefill 12 tokens
        steps = [first]
        for i in range(12, 20):
            steps.append(model(tokens[:, i : i + 1], torch.tensor([[i]]), kv_len=i + 1))
        cached = torch.cat(steps, dim=1)
    assert (cached - full).abs().max().item() <= 1e-4


def test_batched_rows_with_different_positions(tmp_path):
    """Two cache rows at different lengths decode together exactly like each alone."""
    hf_model = randomize_hf_model(
        transformers.LlamaForCausalLM(transformers.LlamaConfig(**LLAMA_BASE, num_key_value_heads=2))
    )
    model = build_decoder(_save(hf_model, tmp_path))
    a, b = torch.randint(0, 101, (1, 9)), torch.randint(0, 101, (1, 5))
    with torch.no_grad():
        ref_a = model(a, use_cache=False)[0, -1]
        ref_b = model(b, use_cache=False)[0, -1]
        model.setup_caches(2, 32, dtype=torch.float32)
        model(a[:, :-1], rows=torch.tensor([0]), kv_len=8)
        model(b[:, :-1], rows=torch.tensor([1]), kv_len=4)
        step = model(
            torch.tensor([[a[0, -1]], [b[0, -1]]]),
            torch.tensor([[8], [4]]),
            rows=torch.tensor([0, 1]),
            kv_len=9,
        )
    assert (step[0, 0] - ref_a).abs().max().item() <= 1e-4
    assert (step[1, 0] - ref_b).abs().max().item() <= 1e-4
