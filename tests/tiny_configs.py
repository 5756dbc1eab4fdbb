"""Tiny random models shared by the tests (no tests here): one LLaMA-style and one Falcon-7B-style config, and a
2-layer LLaMA written as a Hugging Face folder."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch

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


def randomize_hf_model(model: torch.nn.Module) -> torch.nn.Module:
    """Fresh random weights for a (tiny) transformers model, seed 0, in eval mode: norms ~ 1 + 0.1 N(0, 1)
    (biases 0.1 N), everything else 0.08 N(0, 1), so activations neither vanish nor blow up over a few layers."""
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or "ln" in name:
                p.copy_(1 + 0.1 * torch.randn_like(p)) if name.endswith("weight") else p.normal_(0, 0.1)
            else:
                p.normal_(0, 0.08)
    return model.eval()


def tiny_llama(**overrides) -> ModelConfig:
    """TINY_LLAMA with some fields changed."""
    return dataclasses.replace(TINY_LLAMA, **overrides)


def write_tiny_hf_llama(folder: Path, corpus: str) -> Path:
    """Write a 2-layer LLaMA (hidden 64, GQA, weights ~ N(0, 0.1), seed 0) with a 300-token byte-level BPE
    tokenizer trained on `corpus` into `folder` as a Hugging Face folder, plus `calib.txt` = `corpus`."""
    import tokenizers
    import transformers

    tok = tokenizers.Tokenizer(tokenizers.models.BPE())
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<s>", "</s>"],
        initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator([corpus], trainer)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))
    (folder / "calib.txt").write_text(corpus)
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=tok.get_vocab_size(), hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, bos_token_id=0, eos_token_id=1,
    )  # fmt: skip
    model = transformers.LlamaForCausalLM(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.1)
    model.save_pretrained(folder, safe_serialization=True)
    return folder
