"""Synthetic `.spqr` files (`engine.synthetic_file`): a tiny LLaMA shape written straight into the format loads
through the normal validating loader, runs natively and on the decode-to-dense path, decodes, and is
reproducible and cached; the sizes in the header come from `synthetic_specs` without drawing anything."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from tiny_configs import tiny_llama

import spqr_run.engine.synthetic_file as sf
from spqr_run.cpu import lib as native_lib
from spqr_run.engine.synthetic_file import (
    cached_synthetic_spqr,
    synthetic_file_config,
    synthetic_specs,
    synthetic_tokenizer,
    write_synthetic_spqr,
)
from spqr_run.errors import ConfigError
from spqr_run.loading import build_decoder, expected_shapes, open_model
from spqr_run.loading.spqr_file import read_header
from spqr_run.sampling import SamplingParams

# hidden 80 and ffn 144: neither a multiple of 64, so the last k-block and row tile are padding
TINY = tiny_llama(
    vocab_size=300,
    hidden_size=80,
    intermediate_size=144,
    num_heads=5,
    num_kv_heads=5,
    head_dim=16,
    max_position_embeddings=256,
    name="tiny-synthetic",
)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tiny_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("synthetic") / "tiny.spqr"
    return write_synthetic_spqr(path, TINY, wbits=3, outlier_rate=0.01, seed=7)


def test_header_and_tensors_match_the_specs(tiny_file):
    specs = synthetic_specs(TINY, wbits=3, outlier_rate=0.01)
    with safe_open(tiny_file.path, framework="pt") as f:
        names = list(f.keys())
        assert sorted(names) == sorted(specs)
        for name in names:
            t = f.get_tensor(name)
            assert (t.dtype, tuple(t.shape)) == specs[name], name
    dense = {n for n in specs if n.endswith(".weight")}
    assert dense == set(expected_shapes(TINY)) - {
        f"layers.{i}.{lin}.weight" for i in range(TINY.num_layers) for lin in TINY.linear_shapes()
    }
    header = read_header(tiny_file.path)
    summary = header["summary"]
    assert summary["synthetic"] == json.loads(json.dumps(tiny_file.settings()))
    assert summary["avg_bits"] == pytest.approx(tiny_file.avg_bits)
    # every packed byte over the weights: records of whole 16 x 64 tiles (80 and 144 columns pad to 128 and
    # 192), 1% outliers x 32 bits, perm and row pointers
    records = sum(-(-o // 16) * -(-i // 64) * 16 * 64 * 3.625 / 8 for o, i in TINY.linear_shapes().values())
    assert tiny_file.packed_bytes > TINY.num_layers * records
    assert tiny_file.avg_bits == tiny_file.packed_bytes * 8 / tiny_file.quantized_params
    assert tiny_file.file_bytes == tiny_file.path.stat().st_size


def test_llama33b_shape_is_under_3_9_bits_without_writing():
    cfg = synthetic_file_config("llama-30b", max_positions=4096)
    assert (cfg.num_layers, cfg.hidden_size, cfg.intermediate_size, cfg.num_heads, cfg.vocab_size) == (
        60,
        6656,
        17920,
        52,
        32000,
    )
    specs = synthetic_specs(cfg, wbits=3, outlier_rate=sf.DEFAULT_OUTLIER_RATE)
    packed = sum(
        torch.empty(shape, dtype=dtype, device="meta").numel() * torch.empty(0, dtype=dtype).element_size()
        for name, (dtype, shape) in specs.items()
        if name.rpartition(".")[2] in sf.PACKED_FIELDS
    )
    bits = packed * 8 / (cfg.num_layers * sum(o * i for o, i in cfg.linear_shapes().values()))
    assert 3.85 < bits <= 3.9


@pytest.mark.parametrize("native", [True, False])
def test_loads_through_the_validating_loader_and_decodes(tiny_file, native):
    if native and native_lib.load() is None:
        pytest.skip(f"native CPU kernels unavailable: {native_lib.unavailable_reason()}")
    source = open_model(tiny_file.path)
    assert source.kind == "spqr" and source.config == TINY
    model = build_decoder(source, native=native)
    assert (model.native is not None) == native
    model.setup_caches(1, 64)
    from spqr_run.generation import Generator

    gen = Generator(model, source.tokenizer, max_seq_len=64)
    ids = source.tokenizer.encode("t5 t6 t7")
    out = gen.generate(ids, SamplingParams(max_tokens=16, temperature=0, ignore_eos=True))
    assert len(out.token_ids) == 16 and out.finish_reason == "length"
    assert all(0 <= t < TINY.vocab_size for t in out.token_ids)
    logits = model(torch.tensor([ids]), last_only=True)  # random weights, but finite activations
    assert torch.isfinite(logits).all()


def test_native_and_dense_paths_agree_on_the_file(tiny_file):
    if native_lib.load() is None:
        pytest.skip("native CPU kernels unavailable")
    ids = torch.tensor([[1, 5, 6, 7, 8]])
    ref = build_decoder(open_model(tiny_file.path), native=False)(ids, use_cache=False)
    nat = build_decoder(open_model(tiny_file.path), native=True)(ids, use_cache=False)
    # int8 activations, int8 embedding / head on the native path: close, not equal
    assert torch.nn.functional.cosine_similarity(ref.flatten(), nat.flatten(), dim=0) > 0.99


def test_reproducible_and_cached(tmp_path, tiny_file, monkeypatch):
    again = write_synthetic_spqr(tmp_path / "again.spqr", TINY, wbits=3, outlier_rate=0.01, seed=7)
    assert again.path.read_bytes() == tiny_file.path.read_bytes()
    path, written = cached_synthetic_spqr(tmp_path / "again.spqr", TINY, wbits=3, outlier_rate=0.01, seed=7)
    assert path == again.path and not written  # same settings in the header: reused
    drawn = []
    real = sf.random_spqr_linear
    monkeypatch.setattr(sf, "random_spqr_linear", lambda meta, **kw: drawn.append(meta) or real(meta, **kw))
    path, written = cached_synthetic_spqr(tmp_path / "again.spqr", TINY, wbits=3, outlier_rate=0.01, seed=8)
    assert written and read_header(path)["summary"]["synthetic"]["seed"] == 8
    # one draw per linear: its four tensors are written from one draw, and sizes come from the specs
    assert len(drawn) == TINY.num_layers * len(TINY.linear_shapes())


def test_tokenizer_and_refusals():
    tok = synthetic_tokenizer(10)
    assert tok.vocab_size == 10 and tok.bos_id == 1 and tok.eos_id == 2
    assert tok.encode("t3 t9") == [1, 3, 9] and tok.decode([3, 9]) == "t3 t9"
    with pytest.raises(ConfigError, match="at least 4 tokens"):
        synthetic_tokenizer(3)
    with pytest.raises(ConfigError, match="LLaMA shapes"):
        write_synthetic_spqr("/nonexistent/x.spqr", synthetic_file_config("falcon-7b", layers=1))
    with pytest.raises(ConfigError, match="max_positions"):
        synthetic_file_config("llama-7b", max_positions=0)
