"""Tiny random-model configs shared by the tests (no tests here): one LLaMA-style, one Falcon-7B-style."""

from __future__ import annotations

import dataclasses

from spqr_run.config import ModelConfig

TINY_LLAMA = ModelConfig(
    arch="llama",
    vocab_size=101,
    hidden_size=64,
    intermediate_size=128,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=16,
    max_position_embeddings=128,
    name="tiny-llama",
)
TINY_FALCON = ModelConfig(
    arch="falcon",
    vocab_size=101,
    hidden_size=64,
    intermediate_size=256,
    num_layers=2,
    num_heads=4,
    num_kv_heads=1,
    head_dim=16,
    max_position_embeddings=128,
    norm_type="layer",
    mlp_type="gelu",
    parallel_residual=True,
    shared_block_norm=True,
    tie_word_embeddings=True,
    name="tiny-falcon",
)


def tiny_llama(**overrides) -> ModelConfig:
    """TINY_LLAMA with some fields changed."""
    return dataclasses.replace(TINY_LLAMA, **overrides)
