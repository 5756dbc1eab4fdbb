"""The static-shape decode step (what the CUDA graph captures) against the reference Generator, and the
synthetic SpQR layers against the package's own packing and decoding."""

from __future__ import annotations

from collections.abc import Sequence

import pytest
import torch
from tiny_configs import TINY_FALCON, TINY_LLAMA

from spqr_run.config import ModelConfig
from spqr_run.engine.graphs import GraphDecodeStep
from spqr_run.engine.planner import module_weight_bytes
from spqr_run.engine.synthetic import (
    build_synthetic,
    random_spqr_linear,
    spqr_meta,
    synthetic_weight_bytes,
)
from spqr_run.generation import Generator
from spqr_run.models.decoder import Decoder
from spqr_run.models.spqr_linear import SpQRLinear
from spqr_run.quant import QuantizedLinear
from spqr_run.sampling import SamplingParams

pytestmark = pytest.mark.usefixtures("one_torch_thread")


class NumberTokenizer:
    """Just enough of `Tokenizer` for `Generator`: token i is the text ' i'."""

    vocab_size = 101
    eos_ids: frozenset[int] = frozenset()
    byte_run_ids: frozenset[int] = frozenset()

    def decode(self, ids: Sequence[int], *, skip_special: bool = False) -> str:
        return "".join(f" {i}" for i in ids)

    def is_special(self, token_id: int) -> bool:
        return False

    def token_text(self, token_id: int) -> str:
        return f" {token_id}"


def _random_decoder(cfg: ModelConfig, seed: int = 0) -> Decoder:
    torch.manual_seed(seed)
    model = Decoder(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
    return model


def _greedy(model: Decoder, prompt: list[int], *, static: bool, n: int = 24) -> list[int]:
    model.setup_caches(1, 48)
    step = GraphDecodeStep(model, 1) if static else None
    gen = Generator(model, NumberTokenizer(), max_seq_len=48, decode_step=step)  # type: ignore[arg-type]
    params = SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)
    return gen.generate(prompt, params).token_ids


@pytest.mark.parametrize("cfg", [TINY_LLAMA, TINY_FALCON], ids=lambda c: c.name)
@pytest.mark.parametrize("method", ["dense", "spqr"])
def test_static_step_matches_reference_generator(cfg: ModelConfig, method: str):
    if method == "dense":
        model = _random_decoder(cfg)
    else:
        # a seed whose random model has a greedy stream of several distinct tokens for both configs: random
        # tiny-falcon weights often collapse to a near-constant stream, which would make the check vacuous
        model = build_synthetic(cfg, method="spqr", outlier_rate=0.02, device="cpu", seed=1)
    prompt = [5, 17, 42, 3, 99, 1, 64]
    ref = _greedy(model, prompt, static=False)
    got = _greedy(model, prompt, static=True)
    assert got == ref
    assert len(set(ref)) > 3  # not a degenerate constant stream


def test_static_step_logits_and_greedy_buffer():
    model = _random_decoder(TINY_LLAMA, seed=1)
    model.setup_caches(2, 32)
    tokens = torch.tensor([[3, 7, 9], [4, 4, 8]])  # (B, T)
    model(tokens, torch.arange(3).expand(2, 3), kv_len=3)
    step = GraphDecodeStep(model, 2)
    assert not step.graphed  # CPU: eager
    nxt = torch.tensor([[11], [12]])
    pos = torch.tensor([[3], [3]])
    logits = step(nxt, pos).clone()  # (B, 1, V)
    model.setup_caches(2, 32)  # fresh cache, reference path with kv_len
    model(tokens, torch.arange(3).expand(2, 3), kv_len=3)
    ref = model(nxt, pos, kv_len=4)
    torch.testing.assert_close(logits, ref, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="CUDA"):
        GraphDecodeStep(model, 2, use_graph=True)
    with pytest.raises(ValueError, match="rows"):
        GraphDecodeStep(model, 3)


def test_random_spqr_linear_is_valid_packed_layout():
    gen = torch.Generator().manual_seed(0)
    q = random_spqr_linear(spqr_meta(48, 80, 3), outlier_rate=0.05, gen=gen, device=torch.device("cpu"))
    QuantizedLinear.from_tensors(q.tensors(), meta=q.meta, source="synthetic")  # the file's validation passes
    again = QuantizedLinear.pack(q.unpack())
    for name, t in q.tensors().items():
        assert torch.equal(getattr(again, name), t), name
    assert 0.03 < q.outlier_fraction <= 0.05
    layer = SpQRLinear(q)
    layer.materialize(torch.float32)
    w = layer.dense_weight
    assert 0.5 / 80**0.5 < float(w.std()) < 2.0 / 80**0.5  # std ~ 1/sqrt(in)


@pytest.mark.parametrize("cfg", [TINY_LLAMA, TINY_FALCON], ids=["llama", "falcon"])
@pytest.mark.parametrize("method", ["spqr", "fp16"])
def test_synthetic_bytes_match_built_model(method: str, cfg: ModelConfig):
    model = build_synthetic(cfg, method=method, outlier_rate=0.01, device="cpu", dtype=torch.float16)
    assert module_weight_bytes(model) == synthetic_weight_bytes(cfg, method=method, outlier_rate=0.01)
    assert all(p.device.type == "cpu" for p in model.state_dict().values())
    names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
    fused = {"qkv_proj", "in_proj"} & names  # spqr models run fused, as a loaded .spqr file does
    assert bool(fused) == (method == "spqr")
    assert ("q_proj" in names) == (method != "spqr")


def _graph_case() -> Decoder:
    model = _random_decoder(TINY_LLAMA, seed=2).half().cuda()
    model.setup_caches(1, 64)
    return model


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA GPU")
def test_cuda_graph_step_matches_eager_and_restores_scratch():
    model = _graph_case()
    prompt = torch.randint(0, 101, (1, 8), device="cuda")
    with torch.inference_mode():
        model(prompt, torch.arange(8, device="cuda")[None], kv_len=8)
        last_k = [c.k[:1, -1].clone() for c in model.caches]
    graph = GraphDecodeStep(model, 1, use_graph=True)
    assert graph.graphed
    assert all(torch.equal(c.k[:1, -1], k) for c, k in zip(model.caches, last_k, strict=True))
    eager = GraphDecodeStep(model, 1, use_graph=False)
    tok, pos = torch.tensor([[5]], device="cuda"), torch.tensor([[8]], device="cuda")
    a = graph(tok, pos).clone()
    b = eager(tok, pos).clone()
    torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-3)
    seq_g, seq_e = [], []
    for step, seq in ((graph, seq_g), (eager, seq_e)):
        step.greedy(tok, pos)
        for _ in range(10):
            step.advance_greedy()
            seq.append(int(step.next_tokens))
    assert seq_g == seq_e
