"""Model loading: GGUF tensor types and row permutation, sharded safetensors, and every error path."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from spqr_run.errors import ModelFormatError
from spqr_run.loading import ModelSource, build_decoder, open_model
from spqr_run.loading.gguf import GGUFWeights, config_from_metadata, open_gguf, read_metadata
from spqr_run.loading.hf import HFWeights, load_hf_config

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")

TINY = dict(
    vocab_size=64,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    rms_norm_eps=1e-5,
    rope_theta=10000.0,
)


def _tiny_llama(**overrides):
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**TINY, **overrides})).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.1)
    return model


def _permute_for_llama_cpp(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's converter permutation of q/k rows (pairs interleaved), as documented by its convert script."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _write_gguf(path, hf_model, *, arch="llama", types=None, extra_tensor=None):
    """Write a llama GGUF of `hf_model` (q/k permuted like llama.cpp) with chosen tensor types."""
    cfg = hf_model.config
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(10000.0)
    tokens = ["a", "b", "ab"] + [f"<t{i}>" for i in range(3, cfg.vocab_size)]
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_types([1] * len(tokens))
    w.add_token_merges(["a b"])
    w.add_eos_token_id(1)
    names = {
        "model.embed_tokens.weight": "token_embd.weight",
        "model.norm.weight": "output_norm.weight",
        "lm_head.weight": "output.weight",
    }
    per_block = {
        "input_layernorm.weight": "attn_norm.weight",
        "post_attention_layernorm.weight": "ffn_norm.weight",
        "self_attn.q_proj.weight": "attn_q.weight",
        "self_attn.k_proj.weight": "attn_k.weight",
        "self_attn.v_proj.weight": "attn_v.weight",
        "self_attn.o_proj.weight": "attn_output.weight",
        "mlp.gate_proj.weight": "ffn_gate.weight",
        "mlp.up_proj.weight": "ffn_up.weight",
        "mlp.down_proj.weight": "ffn_down.weight",
    }
    for key, value in hf_model.state_dict().items():
        if key.startswith("model.layers."):
            i, rest = key[len("model.layers.") :].split(".", 1)
            name = f"blk.{i}.{per_block[rest]}"
        else:
            name = names[key]
        arr = value.float().numpy()
        if name.endswith("attn_q.weight"):
            arr = _permute_for_llama_cpp(arr, cfg.num_attention_heads)
        elif name.endswith("attn_k.weight"):
            arr = _permute_for_llama_cpp(arr, cfg.num_key_value_heads)
        qtype = (types or {}).get(name.split(".", 2)[-1] if name.startswith("blk.") else name)
        if qtype is None or arr.ndim == 1:
            w.add_tensor(name, arr)
        else:
            t = gguf.GGMLQuantizationType[qtype]
            w.add_tensor(name, gguf.quants.quantize(arr, t), raw_dtype=t)
    if extra_tensor is not None:
        name, data, raw = extra_tensor
        w.add_tensor(name, data, raw_dtype=raw)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_gguf_unpermutes_q_k_rows_and_matches_transformers(tmp_path):
    hf_model = _tiny_llama()
    path = tmp_path / "tiny.gguf"
    _write_gguf(path, hf_model)
    source = open_model(path)
    model = build_decoder(source)
    tokens = torch.randint(0, 64, (1, 12))
    with torch.no_grad():
        diff = (model(tokens, use_cache=False) - hf_model(tokens).logits).abs().max().item()
    assert diff <= 1e-4


@pytest.mark.parametrize("qtype", ["F16", "BF16", "Q8_0", "Q4_0", "Q4_1"])
def test_gguf_quantized_types_load_close_to_the_original(qtype, tmp_path):
    hf_model = _tiny_llama()
    path = tmp_path / "q.gguf"
    _write_gguf(path, hf_model, types={k: qtype for k in ("attn_q.weight", "ffn_down.weight")})
    weights = open_model(path).weights
    orig = hf_model.state_dict()["model.layers.1.mlp.down_proj.weight"]
    got = weights["layers.1.mlp.down_proj.weight"]
    assert got.shape == orig.shape and got.dtype == torch.float32
    tol = {"F16": 1e-3, "BF16": 1e-2, "Q8_0": 0.01, "Q4_0": 0.12, "Q4_1": 0.12}[qtype]
    assert (got - orig).abs().max().item() <= tol * orig.abs().max().item() * 4
    q_orig = hf_model.state_dict()["model.layers.0.self_attn.q_proj.weight"]
    assert (
        weights["layers.0.attn.q_proj.weight"] - q_orig
    ).abs().max().item() <= tol * q_orig.abs().max() * 4


def _k_quant_blocks(qtype: str, rows: int, cols: int) -> np.ndarray:
    """Random but valid K-quant blocks: random code bytes with sane fp16 super-block scales."""
    block_bytes = {"Q4_K": 144, "Q6_K": 210}[qtype]
    n_blocks = cols // 256
    rng = np.random.default_rng(0)
    data = rng.integers(0, 256, size=(rows, n_blocks, block_bytes), dtype=np.uint8)
    d = np.frombuffer(np.float16(0.01).tobytes(), dtype=np.uint8)
    if qtype == "Q4_K":  # d, dmin (fp16) lead the block
        data[..., 0:2] = d
        data[..., 2:4] = d
    else:  # Q6_K: d (fp16) ends the block
        data[..., 208:210] = d
    return data.reshape(rows, n_blocks * block_bytes)


@pytest.mark.parametrize("qtype", ["Q4_K", "Q6_K"])
def test_gguf_k_quant_tensors_dequantize(qtype, tmp_path):
    hf_model = _tiny_llama(hidden_size=256, intermediate_size=256, num_attention_heads=4)
    path = tmp_path / "k.gguf"
    raw = _k_quant_blocks(qtype, 256, 256)
    _write_gguf(path, hf_model)
    # replace ffn_up of block 0 by the K-quant tensor: write a second file with it swapped in
    path2 = tmp_path / "k2.gguf"
    sd = hf_model.state_dict()
    del sd["model.layers.0.mlp.up_proj.weight"]
    hf_model2 = _tiny_llama(hidden_size=256, intermediate_size=256, num_attention_heads=4)
    hf_model2.model.layers[0].mlp.up_proj = torch.nn.Identity()
    _write_gguf(path2, hf_model2, extra_tensor=("blk.0.ffn_up.weight", raw, gguf.GGMLQuantizationType[qtype]))
    weights = open_model(path2).weights
    got = weights["layers.0.mlp.up_proj.weight"]
    expected = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType[qtype])
    assert got.shape == (256, 256)
    assert torch.equal(got, torch.from_numpy(np.array(expected, dtype=np.float32)))


def test_sharded_safetensors_folder(tmp_path):
    hf_model = _tiny_llama()
    hf_model.save_pretrained(tmp_path, safe_serialization=True, max_shard_size="40KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    cfg = load_hf_config(tmp_path)
    model = build_decoder(ModelSource(tmp_path, "hf", cfg, HFWeights(tmp_path, cfg), tokenizer=None))  # type: ignore[arg-type]
    tokens = torch.randint(0, 64, (1, 8))
    with torch.no_grad():
        assert (model(tokens, use_cache=False) - hf_model(tokens).logits).abs().max().item() <= 1e-4


# ---- errors: one clear line naming the file and the problem ----------------------------------------


def test_missing_file(tmp_path):
    with pytest.raises(ModelFormatError, match=r"nope\.gguf: no such file"):
        open_model(tmp_path / "nope.gguf")


def test_folder_without_config(tmp_path):
    with pytest.raises(ModelFormatError, match="no config.json"):
        open_model(tmp_path)


def test_unsupported_hf_architecture(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "vocab_size": 10}))
    with pytest.raises(ModelFormatError, match=r"config\.json: unsupported architecture 'gpt2'"):
        open_model(tmp_path)


def test_corrupt_safetensors(tmp_path):
    _tiny_llama().config.to_json_file(tmp_path / "config.json")
    (tmp_path / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    with pytest.raises(ModelFormatError, match=r"model\.safetensors: corrupt or truncated safetensors"):
        HFWeights(tmp_path, load_hf_config(tmp_path))


def test_truncated_safetensors(tmp_path):
    _tiny_llama().save_pretrained(tmp_path, safe_serialization=True)
    f = tmp_path / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(ModelFormatError, match=r"model\.safetensors: corrupt or truncated"):
        HFWeights(tmp_path, load_hf_config(tmp_path))


def test_shape_mismatch_names_the_weight(tmp_path):
    _tiny_llama().save_pretrained(tmp_path, safe_serialization=True)
    cfg_path = tmp_path / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["intermediate_size"] = 128
    cfg_path.write_text(json.dumps(cfg))
    c = load_hf_config(tmp_path)
    with pytest.raises(
        ModelFormatError, match=r"weight 'layers\.0\.mlp\.(gate|up|down)_proj\.weight' has shape"
    ):
        build_decoder(ModelSource(tmp_path, "hf", c, HFWeights(tmp_path, c), tokenizer=None))  # type: ignore[arg-type]


def test_truncated_gguf(tmp_path, gguf_path):
    bad = tmp_path / "truncated.gguf"
    with open(gguf_path, "rb") as f:
        bad.write_bytes(f.read(2_000_000))
    with pytest.raises(ModelFormatError, match=r"truncated\.gguf: corrupt or truncated GGUF"):
        open_model(bad)


def test_gguf_unsupported_architecture(tmp_path):
    path = tmp_path / "other.gguf"
    w = gguf.GGUFWriter(str(path), "mamba")
    w.add_tensor("x", np.zeros(4, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    reader = open_gguf(path)
    with pytest.raises(ModelFormatError, match=r"other\.gguf: unsupported GGUF architecture 'mamba'"):
        config_from_metadata(read_metadata(reader, path), path)


def _gguf_dequantizable() -> list[str]:
    """Every tensor type the installed `gguf` package dequantizes (probed here with one zero block each)."""
    names = []
    for qtype in gguf.GGMLQuantizationType:
        if qtype not in gguf.GGML_QUANT_SIZES:
            continue
        try:
            with np.errstate(all="ignore"):
                gguf.quants.dequantize(np.zeros((1, gguf.GGML_QUANT_SIZES[qtype][1]), np.uint8), qtype)
        except NotImplementedError:
            continue
        names.append(qtype.name)
    return names


def _blocks_of(qtype: str, rows: int, cols: int) -> np.ndarray:
    """A (rows, cols) tensor stored as `qtype`: gguf's own quantization of random weights where it can
    quantize that type, else random blocks (random bytes: a scale may decode to inf or NaN, which the
    comparison below counts as equal where both have it)."""
    t = gguf.GGMLQuantizationType[qtype]
    rng = np.random.default_rng(sum(map(ord, qtype)))
    try:
        return gguf.quants.quantize(rng.standard_normal((rows, cols)).astype(np.float32), t)
    except NotImplementedError:
        block, size = gguf.GGML_QUANT_SIZES[t]
        return rng.integers(0, 256, size=(rows, cols // block * size), dtype=np.uint8)


@pytest.mark.parametrize("qtype", _gguf_dequantizable())
def test_every_tensor_type_gguf_dequantizes_loads_as_gguf_dequantizes_it(qtype, tmp_path):
    """Issue 23: Q2_K, Q3_K, IQ3_XXS, IQ3_S, IQ4_NL, IQ4_XS (llama.cpp's Q3_K_* / IQ3_* outputs, and its IQ4_NL
    fallback for rows that are not a multiple of 256) and every other type `gguf` can dequantize load, each
    weight equal to `gguf`'s own dequantization of the blocks written."""
    hf_model = _tiny_llama(hidden_size=256, intermediate_size=256, num_attention_heads=4)
    hf_model.model.layers[0].mlp.up_proj = torch.nn.Identity()
    raw = _blocks_of(qtype, 256, 256)
    path = tmp_path / f"{qtype}.gguf"
    _write_gguf(path, hf_model, extra_tensor=("blk.0.ffn_up.weight", raw, gguf.GGMLQuantizationType[qtype]))
    with np.errstate(all="ignore"):  # random scales may be inf or NaN
        got = open_model(path).weights["layers.0.mlp.up_proj.weight"]
        expected = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType[qtype]).reshape(256, 256)
    assert got.shape == (256, 256) and got.dtype == torch.float32
    np.testing.assert_array_equal(got.numpy(), expected.astype(np.float32))


def test_the_types_issue_23_names_are_accepted():
    assert {"Q2_K", "Q3_K", "IQ3_XXS", "IQ3_S", "IQ4_NL", "IQ4_XS"} <= set(_gguf_dequantizable())


def test_gguf_unsupported_tensor_type(tmp_path):
    """A type `gguf` cannot dequantize (Q8_1, an intermediate type llama.cpp never stores) is refused at open
    with one line naming the tensor and its type."""
    hf_model = _tiny_llama(hidden_size=256, intermediate_size=256)
    hf_model.model.layers[0].mlp.up_proj = torch.nn.Identity()
    raw = np.zeros((256, 256 // 32 * 40), dtype=np.uint8)  # Q8_1: 40 bytes per 32 values
    path = tmp_path / "q81.gguf"
    _write_gguf(path, hf_model, extra_tensor=("blk.0.ffn_up.weight", raw, gguf.GGMLQuantizationType.Q8_1))
    reader = open_gguf(path)
    cfg = config_from_metadata(read_metadata(reader, path), path)
    with pytest.raises(
        ModelFormatError, match=r"q81\.gguf: tensor 'blk\.0\.ffn_up\.weight' has type Q8_1, which the gguf"
    ):
        GGUFWeights(reader, path, cfg)


def test_foreign_file(tmp_path):
    f = tmp_path / "notes.txt"
    f.write_text("hello")
    with pytest.raises(ModelFormatError, match=r"notes\.txt: not a model"):
        open_model(f)


def test_cli_prints_one_line_and_exits_2(tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("some text")
    out = subprocess.run(
        [sys.executable, "-m", "spqr_run.cli.eval", str(tmp_path / "missing.gguf"), "--text", str(text)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 2
    lines = [ln for ln in out.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "missing.gguf' not found: no such file" in lines[0]
    assert "Traceback" not in out.stderr


def test_sliding_window_caps_context(tmp_path):
    hf = transformers.MistralConfig(**{**TINY, "max_position_embeddings": 64}, sliding_window=32)
    hf.save_pretrained(tmp_path)
    cfg = load_hf_config(tmp_path)
    assert cfg.max_position_embeddings == 32
    assert cfg.extra["context_capped_by_sliding_window"] == 32


def test_copy_of_real_gguf_loads(tmp_path, gguf_path):
    """A renamed copy loads from its content (magic bytes), not its name."""
    copy = tmp_path / "model.bin"
    shutil.copy(gguf_path, copy)
    assert open_model(copy).kind == "gguf"
