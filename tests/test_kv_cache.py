"""The KV cache: int8 storage against its definition, decoding through it, and its perplexity cost on the
real model."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tiny_configs import tiny_llama

from spqr_run.engine.planner import kv_bytes_per_token
from spqr_run.models.decoder import Decoder
from spqr_run.models.kv_cache import KVCache, quantize_int8

TINY = tiny_llama(vocab_size=128, max_position_embeddings=64)


@settings(max_examples=40, deadline=None, derandomize=True)
@given(
    shape=st.tuples(
        st.integers(1, 3), st.integers(1, 5), st.integers(1, 4), st.sampled_from([1, 7, 64, 128])
    ),
    magnitude=st.sampled_from([1e-3, 1.0, 300.0]),
    seed=st.integers(0, 2**16),
)
def test_int8_codes_follow_the_definition(shape, magnitude, seed):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * magnitude
    codes, scale = quantize_int8(x)
    assert codes.dtype == torch.int8 and scale.dtype == torch.float32 and scale.shape == (*shape[:-1], 1)
    absmax = x.abs().amax(-1, keepdim=True)
    assert torch.allclose(scale, absmax / 127, rtol=1e-6)
    assert codes.abs().max() <= 127
    err = (codes.float() * scale - x).abs()
    assert (err <= scale * (0.5 + 1e-4)).all()  # round to nearest


def test_int8_zero_head_stays_zero():
    codes, scale = quantize_int8(torch.zeros(2, 3, 8))
    assert not codes.any() and not scale.any()


def test_int8_cache_writes_where_told_and_reads_back_dequantized():
    cache = KVCache(3, 16, 2, 8, dtype=torch.float32, kind="int8")
    assert cache.k.dtype == torch.int8 and cache.k_scale.shape == (3, 16, 2, 1)
    g = torch.Generator().manual_seed(0)
    k, v = torch.randn(2, 4, 2, 8, generator=g), torch.randn(2, 4, 2, 8, generator=g)
    rows = torch.tensor([2, 0])
    positions = torch.tensor([[0, 1, 2, 3], [5, 6, 7, 8]])
    keys, values = cache.update(positions, k, v, rows=rows, kv_len=10)
    assert keys.shape == values.shape == (2, 10, 2, 8) and keys.dtype == torch.float32
    for b in range(len(rows)):
        for t, pos in enumerate(positions[b].tolist()):
            assert torch.allclose(keys[b, pos], k[b, t], atol=k[b, t].abs().max().item() / 127)
            assert torch.allclose(values[b, pos], v[b, t], atol=v[b, t].abs().max().item() / 127)
        untouched = [p for p in range(10) if p not in positions[b].tolist()]
        assert not keys[b, untouched].any()
    assert not cache.k[1].any()  # row 1 never written
    saved = cache.save_position(3, 5)
    cache.k[:, 5] = 1
    cache.k_scale[:, 5] = 1
    cache.restore_position(3, 5, saved)
    assert torch.equal(cache.k[:, 5], saved[0]) and torch.equal(cache.k_scale[:, 5], saved[2])


def test_decoding_through_int8_cache_tracks_full_precision():
    torch.manual_seed(0)
    model = Decoder(TINY).eval()
    tokens = torch.randint(0, TINY.vocab_size, (2, 24))
    logits = {}
    for kind in ("auto", "int8"):
        model.setup_caches(2, 32, kind=kind)
        with torch.inference_mode():
            steps = [model(tokens[:, :16], kv_len=16)[:, -1]]
            for t in range(16, 24):
                positions = torch.full((2, 1), t)
                steps.append(model(tokens[:, t : t + 1], positions, kv_len=t + 1)[:, -1])
        logits[kind] = torch.stack(steps, 1)  # (B, 9, V)
    scale = logits["auto"].abs().max()
    diff = (logits["int8"] - logits["auto"]).abs().max()
    assert 0 < diff < 0.02 * scale  # quantized (not bit-equal), and close
    model.setup_caches(1, 32)  # kind None keeps int8
    assert model.caches[0].kind == "int8"


def test_int8_halves_the_planned_cache():
    cfg = tiny_llama(head_dim=128, hidden_size=512)
    assert kv_bytes_per_token(cfg, "fp16") == 2 * 2 * 2 * 128 * 2
    assert kv_bytes_per_token(cfg, "int8") == 2 * 2 * 2 * (128 + 4)  # codes + one fp32 scale per head
    cache = KVCache(1, 10, 2, 128, dtype=torch.float16, kind="int8")
    stored = sum(b.numel() * b.element_size() for b in cache.buffers())
    assert stored == 10 * kv_bytes_per_token(cfg, "int8") // cfg.num_layers


def test_int8_cache_costs_little_perplexity(real_model, real_source):
    """The real model through the int8 cache scores within 1% of no cache (and differs: it is quantized)."""
    from conftest import WIKI_TEST

    from spqr_run.eval import perplexity

    ids = real_source.tokenizer.encode(WIKI_TEST.read_text()[:20000], add_bos=False, special=False)[:2048]
    exact = perplexity(real_model, ids, seqlen=1024)
    int8 = perplexity(real_model, ids, seqlen=1024, kv_cache="int8")
    assert int8.scored_tokens == exact.scored_tokens
    assert int8.ppl != exact.ppl and abs(int8.ppl / exact.ppl - 1) < 0.01
    real_model.caches = None  # leave the shared model as other tests expect it


def test_generate_cli_with_int8_cache():
    import subprocess
    import sys

    from conftest import GGUF, require_data

    require_data()
    cmd = [sys.executable, "-m", "spqr_run.cli.run", "generate", str(GGUF), "--device", "cpu", "--ctx", "256"]
    cmd += [
        "--prompt",
        "The capital of France is",
        "--max-tokens",
        "8",
        "--temperature",
        "0",
        "--kv-cache",
        "int8",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "Paris" in proc.stdout
