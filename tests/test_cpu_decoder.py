"""The native CPU decoder (`spqr_run.cpu.decoder`, kernels/cpu/spqr_decoder.c) against the Python decoder.

- Dense fp32 weights (the native path then computes with exact activations): every architecture flag (GQA,
  LayerNorm + GELU, parallel residual with one or two norms, biases, RoPE scaling) matches the Python
  decoder's logits to fp32 rounding, with and without the KV cache, fp32 and int8 cache.
- A quantized `.spqr` model: within the int8-activation tolerance of the Python reference path.
- Exact properties of the native path: a row's logits do not depend on the other rows of the batch nor on the
  thread count, and a prefill without the cache equals one through it; a prefill of T tokens gives the logits
  of T decode steps (to fp32 rounding: several queries share a pass over the keys, one query takes dot
  products); bad input raises.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from spqr_run.config import RopeScaling
from spqr_run.cpu import lib as native
from spqr_run.cpu.decoder import NativeDecoder
from spqr_run.loading import build_decoder, open_model
from spqr_run.models.decoder import Decoder
from tests.tiny_configs import TINY_FALCON, TINY_LLAMA

LIB = native.load()
pytestmark = pytest.mark.skipif(
    LIB is None, reason=f"native CPU kernels unavailable: {native.unavailable_reason()}"
)

CONFIGS = {
    "llama_gqa": TINY_LLAMA,
    "llama_bias_rope3": dataclasses.replace(
        TINY_LLAMA,
        attention_bias=True,
        mlp_bias=True,
        rope_theta=50000.0,
        rope_scaling=RopeScaling(8.0, 1.0, 4.0, 32),
    ),  # fmt: skip
    "falcon7b": TINY_FALCON,
    "falcon40b": dataclasses.replace(
        TINY_FALCON, shared_block_norm=False, num_kv_heads=2, tie_word_embeddings=False
    ),
    "llama_mha_odd": dataclasses.replace(
        TINY_LLAMA, num_kv_heads=4, hidden_size=80, head_dim=20, intermediate_size=72
    ),
}


def random_decoder(cfg, seed: int = 0) -> Decoder:
    torch.manual_seed(seed)
    model = Decoder(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.1 * torch.randn_like(p)) if name.endswith("weight") else p.normal_(0, 0.1)
            else:
                p.normal_(0, 0.08)
    return model.eval()


def pair(cfg, seed: int = 0) -> tuple[Decoder, Decoder]:
    """(Python decoder, the same weights run natively)."""
    ref = random_decoder(cfg, seed)
    nat = random_decoder(cfg, seed)
    nat.native = NativeDecoder.for_model(nat)
    assert nat.native is not None, NativeDecoder.unsupported(nat)
    return ref, nat


def close(a: torch.Tensor, b: torch.Tensor, rel: float) -> None:
    assert not b.isnan().any()
    err = (a - b).abs().max().item()
    assert err <= rel * a.abs().max().item(), f"max error {err:.3g} (scale {a.abs().max().item():.3g})"


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_dense_native_matches_the_python_decoder(name):
    ref, nat = pair(CONFIGS[name])
    tokens = torch.randint(0, ref.config.vocab_size, (2, 11), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        close(ref(tokens, use_cache=False), nat(tokens, use_cache=False), 1e-5)
        for kind, dtype in (("auto", torch.float32), ("auto", torch.float16), ("int8", None)):
            for m in (ref, nat):
                m.setup_caches(2, 32, kind=kind, dtype=dtype)
            want = [
                ref(tokens[:, :6], kv_len=6),
                ref(tokens[:, 6:], torch.arange(6, 11).expand(2, 5), kv_len=11),
            ]
            got = [
                nat(tokens[:, :6], kv_len=6),
                nat(tokens[:, 6:], torch.arange(6, 11).expand(2, 5), kv_len=11),
            ]
            for w, g in zip(want, got, strict=True):
                # fp16 / int8: a value within fp32 rounding of a rounding boundary may take the other code
                close(w, g, 1e-5 if dtype == torch.float32 else 2e-3)


@pytest.mark.parametrize("name", ["llama_gqa", "falcon40b", "llama_mha_odd"])
def test_prefill_equals_decode_steps(name):
    _, nat = pair(CONFIGS[name], seed=3)
    tokens = torch.randint(0, nat.config.vocab_size, (1, 9), generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        nat.setup_caches(1, 16, dtype=torch.float32)  # fp32, as the cache a call without one makes
        whole = nat(tokens)  # (1, 9, V)
        nat.setup_caches(1, 16, dtype=torch.float32)
        steps = torch.cat([nat(tokens[:, i : i + 1], torch.tensor([[i]])) for i in range(9)], dim=1)
        close(whole, steps, 1e-5)
        assert torch.equal(nat(tokens, use_cache=False), whole)


def test_rows_threads_and_batch_do_not_change_a_rows_logits():
    _, nat = pair(CONFIGS["llama_gqa"], seed=4)
    gen = torch.Generator().manual_seed(5)
    tokens = torch.randint(0, nat.config.vocab_size, (3, 7), generator=gen)
    with torch.inference_mode():
        nat.setup_caches(4, 16)
        batch = nat(tokens, rows=torch.tensor([2, 0, 3]))
        alone = [nat(tokens[i : i + 1], rows=torch.tensor([r])) for i, r in enumerate([1, 0, 3])]
        assert all(torch.equal(batch[i : i + 1], a) for i, a in enumerate(alone))
        LIB.spqr_cpu_set_threads(2, -1)
        try:
            assert torch.equal(nat(tokens, rows=torch.tensor([2, 0, 3])), batch)
        finally:
            LIB.spqr_cpu_set_threads(1, -1)
        # decode one token per row, rows in another order: each row's logits as when it ran alone
        nxt = torch.randint(0, nat.config.vocab_size, (3, 1), generator=gen)
        pos = torch.full((3, 1), 7)
        step = nat(nxt, pos, rows=torch.tensor([3, 2, 0]))
        for i, r in enumerate([3, 2, 0]):
            assert torch.equal(step[i : i + 1], nat(nxt[i : i + 1], pos[i : i + 1], rows=torch.tensor([r])))


def test_native_kv_cache_is_fp16_by_default_and_converts_like_torch():
    """`auto` KV cache under the native decoder: fp16 (half the bytes attention reads); the C conversion
    rounds like torch's .half() (nearest even, subnormals, overflow to infinity)."""
    import ctypes

    _, nat = pair(CONFIGS["llama_gqa"])
    nat.setup_caches(1, 8)
    assert nat.caches[0].k.dtype == torch.float16 and nat.kv_cache_dtype == torch.float16
    with torch.inference_mode():
        nat(torch.tensor([[3, 4, 5]]))
    k = nat.caches[1].k[0, :3]
    assert k.abs().sum() > 0  # written, as fp16
    # the conversion itself, through the library's store path: one position per value
    values = torch.cat(
        [
            torch.randn(2000) * 10.0 ** torch.randint(-9, 5, (2000,)),
            torch.tensor([65519.0, 65520.0, 1e9, -0.0, 6e-8, 3e-8, 2.9802322e-08]),
        ]
    )
    f = LIB.cdll.spqr_float_to_half_array
    f.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
    out = torch.empty(values.numel(), dtype=torch.int16)
    f(values.data_ptr(), out.data_ptr(), values.numel())
    assert torch.equal(out, values.half().view(torch.int16))


def test_bad_input_raises_one_clear_error():
    _, nat = pair(CONFIGS["llama_gqa"])
    nat.setup_caches(1, 8)
    with pytest.raises(ValueError, match="token id"):
        nat(torch.tensor([[nat.config.vocab_size]]))
    with pytest.raises(ValueError, match="position"):
        nat(torch.tensor([[1]]), torch.tensor([[8]]))
    with pytest.raises(ValueError, match="row"):
        nat(torch.tensor([[1]]), rows=torch.tensor([1]))


# ---- a quantized model ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_spqr(tiny_spqr_file) -> Path:
    return tiny_spqr_file(3)


def test_quantized_native_matches_the_reference_path(tiny_spqr: Path):
    """The native path (int8 activations, int8 embedding / head) against the Python decoder on the stored
    records (exact activations): the same next-token choices, logits within the int8 tolerance."""
    nat = build_decoder(open_model(tiny_spqr), keep_packed=False)
    ref = build_decoder(open_model(tiny_spqr), native=False)
    for m in ref.modules():  # run the packed reference matmul, not the fp16 decoded copy
        if hasattr(m, "dense_weight"):
            m.dense_weight = None
    assert nat.native is not None and ref.native is None
    tokens = torch.randint(0, nat.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        a, b = ref(tokens, use_cache=False), nat(tokens, use_cache=False)
    close(a, b, 3e-2)
    agree = (a.argmax(-1) == b.argmax(-1)).float().mean().item()
    assert agree >= 0.9, agree
