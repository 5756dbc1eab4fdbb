"""What a `.spqr` model holds on a CPU: with the native kernels (issue 21) the packed bytes in the CPU layout
and int8 embeddings, never a dense copy; without them (issue 14, defect 8) weight matrices in fp16 (quantized
linears decoded once, their packed form freed), compute in fp32, and the same outputs as the old fp32 copies
within tolerance."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from spqr_run.engine.planner import resident_bytes
from spqr_run.loading import build_decoder, open_model
from spqr_run.models import linear
from spqr_run.models.linear import held_linear
from spqr_run.models.spqr_linear import SpQRLinear


@pytest.fixture(scope="module")
def tiny_spqr(tiny_spqr_file) -> Path:
    return tiny_spqr_file(4)


def _old_layout(path: Path):
    """The model as loaded before: every weight in fp32, packed form kept."""
    return build_decoder(open_model(path), weight_dtype=torch.float32, native=False)


def test_held_linear_multi_row_is_the_fp32_product() -> None:
    torch.manual_seed(0)
    w = (torch.randn(48, 32) * 0.1).half()
    x, b = torch.randn(2, 5, 32), torch.randn(48).half()
    ref = F.linear(x, w.float(), b.float())
    assert torch.allclose(held_linear(x, w, b), ref, rtol=1e-6, atol=1e-6)
    x1 = torch.randn(1, 1, 32)  # one row: the half-precision matrix-vector product, rounded once to fp16
    one = held_linear(x1, w, b)
    assert one.dtype == torch.float32
    assert (one - F.linear(x1, w.float(), b.float())).abs().max() <= 2e-3 * F.linear(
        x1, w.float()
    ).abs().max()


def test_held_linear_chunks_do_not_change_the_result(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    w, x = torch.randn(50, 16).half(), torch.randn(7, 16)
    whole = held_linear(x, w)
    monkeypatch.setattr(linear, "UPCAST_CHUNK", 16 * 8)  # 8 output rows per fp32 chunk
    assert torch.allclose(held_linear(x, w), whole, rtol=1e-6, atol=1e-6)


def test_cpu_spqr_fallback_holds_fp16_weights_below_the_old_memory(tiny_spqr: Path) -> None:
    old = _old_layout(tiny_spqr)
    new = build_decoder(open_model(tiny_spqr), keep_packed=False, native=False)  # no native kernels
    assert new.dtype == torch.float32 and new.embed_tokens.weight.dtype == torch.float16
    spqr = [m for m in new.modules() if isinstance(m, SpQRLinear)]
    assert spqr and all(m.dense_weight.dtype == torch.float16 and m.packed_released for m in spqr)
    assert all(p.dtype == torch.float32 for n, p in new.named_parameters() if "norm" in n)
    old_bytes, new_bytes = resident_bytes(old)[0], resident_bytes(new)[0]
    params = new.config.num_parameters()
    assert old_bytes > 4 * params  # fp32 copies plus the packed form
    assert new_bytes < 2.1 * params  # fp16 matrices, fp32 norms, nothing else
    with pytest.raises(RuntimeError, match="released"):
        spqr[0].quantized()


def test_cpu_spqr_fallback_outputs_match_the_fp32_layout(tiny_spqr: Path) -> None:
    old = _old_layout(tiny_spqr)
    new = build_decoder(open_model(tiny_spqr), keep_packed=False, native=False)
    tokens = torch.randint(0, old.config.vocab_size, (1, 24), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        a, b = old(tokens, use_cache=False), new(tokens, use_cache=False)  # prefill: fp32 products
        assert (a - b).abs().max() <= 1e-3 * a.abs().max()
        # decode, one token at a time through the KV cache: the half-precision matrix-vector path
        for model in (old, new):
            model.setup_caches(1, 32)
        steps = [
            (old(tokens[:, i : i + 1], torch.tensor([[i]])), new(tokens[:, i : i + 1], torch.tensor([[i]])))
            for i in range(tokens.shape[1])
        ]
    worst = max(((x - y).abs().max() / x.abs().max()).item() for x, y in steps)
    assert worst <= 1e-2
    assert all(int(x.argmax()) == int(y.argmax()) for x, y in steps)


def test_native_cpu_spqr_holds_the_packed_bytes_and_int8_embeddings(tiny_spqr: Path) -> None:
    """The runtime's CPU load with the native kernels: every SpQR linear in the CPU layout (no dense copy,
    the file's records freed, within 10% of their stored bytes), the embedding in int8 rows."""
    from spqr_run.cpu.embedding import Q8Embedding, Q8Linear

    packed = build_decoder(open_model(tiny_spqr), native=False)  # keeps the stored records
    stored = {n: m.quantized().nbytes for n, m in packed.named_modules() if isinstance(m, SpQRLinear)}
    model = build_decoder(open_model(tiny_spqr), keep_packed=False)
    assert model.native is not None and isinstance(model.embed_tokens, Q8Embedding)
    assert isinstance(model.lm_head, Q8Linear)
    spqr = {n: m for n, m in model.named_modules() if isinstance(m, SpQRLinear)}
    assert spqr.keys() == stored.keys()
    for name, m in spqr.items():
        assert m.dense_weight is None and m.packed_released and m.native is not None
        assert stored[name] <= m.native.nbytes <= 1.10 * stored[name], name
    vocab, hidden = model.config.vocab_size, model.config.hidden_size
    assert model.embed_tokens.native.nbytes <= -(-vocab // 16) * 16 * hidden + 4 * vocab


def test_banner_says_what_the_cpu_path_holds(tiny_spqr: Path) -> None:
    from spqr_run.chat.info import describe, model_facts
    from spqr_run.cpu import lib
    from spqr_run.runtime import load_runtime

    runtime = load_runtime(tiny_spqr, device="cpu", ctx=32)
    rows = dict(describe(model_facts(runtime)))
    assert rows["weights held as"] == (
        "packed SpQR (CPU layout), embeddings int8 rows, computed from the packed bytes in fp32"
    )
    assert rows["kernels"] == f"native CPU ({lib.isa_name()}, {lib.load().spqr_cpu_threads()} threads)"
    # under one byte a parameter even at this size (fp32 norms and the rotary tables are much of it)
    assert resident_bytes(runtime.model)[0] < 1.0 * runtime.source.config.num_parameters()


def test_without_the_native_library_the_fp16_path_runs_and_says_why(tiny_spqr: Path, tmp_path: Path) -> None:
    """A machine where the kernels could not be built (here: $SPQR_CPU_LIB names a file that is not there):
    generation still works, on the decode-to-fp16 path, and one warning line says why."""
    import os
    import subprocess
    import sys

    env = dict(os.environ, SPQR_CPU_LIB=str(tmp_path / "missing.so"))
    proc = subprocess.run(
        [sys.executable, "-m", "spqr_run.cli.run", "generate", str(tiny_spqr), "--prompt", "hello",
         "--max-tokens", "4", "--temperature", "0", "--device", "cpu"],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if "CPU decode from the packed weights unavailable" in ln]
    assert len(lines) == 1 and "missing.so" in lines[0] and "decoding each layer to fp16" in lines[0]
