"""Memory planner: hand-computed arithmetic for LLaMA-7B (fp16, 3-bit SpQR) and the 33B under 24 GiB,
budget strings, and the one-line refusals."""

from __future__ import annotations

import dataclasses
import re

import pytest
import torch
from tiny_configs import tiny_llama

from spqr_run.cli.bench import main as bench_main
from spqr_run.engine.planner import (
    GiB,
    apply_budget,
    dense_weight_bytes,
    estimate_workspace,
    parse_memory,
    plan_memory,
    quantized_weight_bytes,
)
from spqr_run.engine.synthetic import SYNTHETIC
from spqr_run.errors import ConfigError

MARGIN = 256 * 2**20  # DEFAULT_MARGIN

# LLaMA-7B: 32 layers, hidden 4096, 32 heads x 128, ffn 11008, vocab 32000, 2048 positions
LIN_7B = 32 * (4 * 4096 * 4096 + 3 * 4096 * 11008)  # 6_476_005_376 weights in linears
FP16_7B = 2 * 32000 * 4096 + 4096 * (2 * 32 + 1)  # embed + head + 65 RMSNorms = 262_410_240
KV_7B = 2 * 32 * 32 * 128 * 2  # 524_288 bytes per token, fp16
WS_7B = 512 * (8 * 4096 + 3 * 11008) * 4 + 512 * 2048 + 512 * 32000 * 4  # 201_326_592 (no dequant)


def test_llama7b_fp16_hand_computed():
    cfg = SYNTHETIC["llama-7b"]
    weights = dense_weight_bytes(cfg)
    assert LIN_7B == 6_476_005_376 and weights == 2 * (LIN_7B + FP16_7B) == 13_476_831_232
    assert cfg.kv_bytes_per_token() == KV_7B == 524_288
    assert estimate_workspace(cfg).total == WS_7B == 201_326_592
    # 13.5 GiB: (14_495_514_624 - 13_476_831_232 - 201_326_592 - 268_435_456) // 524_288 = 1046 tokens
    plan = plan_memory(cfg, weight_bytes=weights, budget_bytes=int(13.5 * GiB))
    assert plan.context_fit == (int(13.5 * GiB) - weights - WS_7B - MARGIN) // KV_7B == 1046
    assert plan.max_context == 1024  # rounded down to a multiple of 256
    assert plan.total <= plan.budget
    # 24 GiB: 22_550 tokens fit, capped by the model's 2048 positions
    plan = plan_memory(cfg, weight_bytes=weights, budget_bytes=24 * GiB)
    assert plan.context_fit == (24 * GiB - 13_476_831_232 - 201_326_592 - MARGIN) // KV_7B == 22_550
    assert plan.max_context == 2048
    assert any(line.startswith("context") and "2048 tokens" in line for line in plan.lines())


def test_llama7b_spqr_3bit_hand_computed():
    cfg = SYNTHETIC["llama-7b"]
    weights = quantized_weight_bytes(cfg, 3.625)  # 3-bit preset without outliers
    assert weights == LIN_7B * 3.625 / 8 + 2 * FP16_7B == 2_934_439_936 + 524_820_480
    dequant = 2 * 11008 * 4096 * 2  # largest linear as run (gate/up fused) as fp16 for the prefill GEMM
    ws = estimate_workspace(cfg, quantized=True)
    assert ws.dequant == dequant and ws.total == WS_7B + dequant == 381_681_664
    # 6 GiB: (6_442_450_944 - 3_459_260_416 - 381_681_664 - 268_435_456) // 524_288 = 4449
    plan = plan_memory(cfg, weight_bytes=weights, budget_bytes=6 * GiB, quantized=True)
    assert plan.context_fit == 4449 and plan.max_context == 2048
    plan8 = plan_memory(cfg, weight_bytes=weights, budget_bytes=6 * GiB, quantized=True, kv_dtype="int8")
    # int8: one byte per number + an fp32 scale per (layer, k/v, head): 262_144 + 2 * 32 * 32 * 4 = 270_336
    # (6_442_450_944 - 3_459_260_416 - 381_681_664 - 268_435_456) // 270_336 = 8630
    assert plan8.kv_bytes_per_token == KV_7B // 2 + 8192 == 270_336 and plan8.context_fit == 8630


def test_llama33b_under_24gib_with_4096_tokens():
    cfg = SYNTHETIC["llama-30b"]  # 60 layers, hidden 6656, 52 heads x 128, ffn 17920, vocab 32000
    lin = 60 * (4 * 6656 * 6656 + 3 * 6656 * 17920)
    assert lin == 32_102_154_240
    weights = quantized_weight_bytes(cfg, 3.9)
    # 32_102_154_240 * 3.9 / 8 = 15_649_800_192, + fp16 (2*32000*6656 + 121*6656) * 2 = 853_578_752
    assert weights == 15_649_800_192 + 853_578_752 == 16_503_378_944
    kv = 2 * 60 * 52 * 128 * 2
    assert cfg.kv_bytes_per_token() == kv == 1_597_440
    # the dequantized-weight buffer: the fused gate/up linear (2 * 17920 rows) in fp16
    ws = 512 * (8 * 6656 + 3 * 17920) * 4 + 512 * 2048 + 512 * 32000 * 4 + 2 * 17920 * 6656 * 2
    assert estimate_workspace(cfg, quantized=True).total == ws == 762_839_040
    plan = plan_memory(cfg, weight_bytes=weights, budget_bytes=24 * GiB, quantized=True)
    # (25_769_803_776 - 16_503_378_944 - 762_839_040 - 268_435_456) // 1_597_440 = 5155 >= 4096
    assert plan.context_fit == 5155
    long_cfg = dataclasses.replace(cfg, max_position_embeddings=4096)  # LLaMA-1 stops at 2048
    plan = plan_memory(long_cfg, weight_bytes=weights, budget_bytes=24 * GiB, quantized=True, context=4096)
    assert plan.max_context == 4096 and plan.total <= 24 * GiB
    assert plan.total == weights + 762_839_040 - 512 * 2048 + 512 * 4096 + MARGIN + 4096 * kv


@pytest.mark.parametrize(
    "text,expected",
    [
        ("24GiB", 24 * GiB),
        ("24GB", 24 * 10**9),
        ("22.5GiB", int(22.5 * GiB)),
        ("512mib", 512 * 2**20),
        ("8", 8 * GiB),
    ],
)
def test_parse_memory(text, expected):
    assert parse_memory(text) == expected


@pytest.mark.parametrize(
    "text,match",
    [
        ("0", "greater than 0"),
        ("0GiB", "greater than 0"),
        ("abc", "expected"),
        ("-1GiB", "expected"),
        ("24 parsecs", "expected"),
    ],
)
def test_parse_memory_rejects(text, match):
    with pytest.raises(ConfigError, match=match):
        parse_memory(text)


def test_too_small_budget_is_one_clear_line():
    cfg = SYNTHETIC["llama-7b"]
    with pytest.raises(ConfigError) as e:
        plan_memory(cfg, weight_bytes=dense_weight_bytes(cfg), budget_bytes=8 * GiB)
    msg = str(e.value)
    assert "\n" not in msg and "8.00 GiB budget" in msg and "needs 13.11 GiB" in msg and "256 tokens" in msg
    with pytest.raises(ConfigError, match="4096 tokens"):  # a requested context that does not fit
        plan_memory(
            dataclasses.replace(cfg, max_position_embeddings=4096),
            weight_bytes=0,
            budget_bytes=GiB,
            context=4096,
        )


@pytest.mark.parametrize(
    "flags,match",
    [
        (["--gpu-memory", "0"], "greater than 0"),
        (["--gpu-memory", "abc"], "expected a size"),
        (["--gpu-memory", "1GiB"], "does not fit a 1.00 GiB budget"),
    ],
)
def test_bench_cli_bad_budgets(flags, match, capsys):
    with pytest.raises(SystemExit) as e:
        bench_main(["--synthetic", "llama-7b", "--device", "cpu", *flags])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert match in err and err.count("error:") == 1


def test_apply_budget_is_noop_on_cpu():
    assert apply_budget(torch.device("cpu"), GiB) is None


# ---- the runtime's context choice -----------------------------------------------------------------
def _tiny_decoder(max_positions: int):
    from spqr_run.models.decoder import Decoder

    return Decoder(
        tiny_llama(vocab_size=256, intermediate_size=160, max_position_embeddings=max_positions, name="tiny")
    )


def test_runtime_context_fits_the_budget():
    from spqr_run.engine.planner import resident_bytes
    from spqr_run.runtime import DEFAULT_CONTEXT, plan_context

    model = _tiny_decoder(32768)
    weights, kv = resident_bytes(model)
    rope_tables = sum(b.numel() * b.element_size() for b in model.buffers())  # no cache yet
    assert kv == 0 and weights == sum(p.numel() * 4 for p in model.parameters()) + rope_tables
    kv_tok = 2 * 2 * 2 * 16 * 4  # k and v, 2 layers, 2 kv heads, head_dim 16, fp32
    fixed = plan_memory(model.config, weight_bytes=weights, budget_bytes=GiB, batch=3).total
    fixed -= plan_memory(model.config, weight_bytes=weights, budget_bytes=GiB, batch=3).kv_bytes

    roomy = plan_context(model, budget=GiB, ctx=None, rows=3, quantized=False)
    assert roomy.max_context == DEFAULT_CONTEXT and roomy.batch == 3  # capped, though 32768 would fit

    # fp32 fits 1000 tokens, rounded down to 768: short of the default 4096, so `--kv-cache auto` takes int8
    # (2 * 2 * 2 * 16 codes + 2 * 2 * 2 fp32 scales = 160 bytes a token), where 3200 fit, rounded to 3072
    kv8 = 2 * 2 * 2 * 16 + 2 * 2 * 2 * 4
    tight = plan_context(model, budget=fixed + 3 * 1000 * kv_tok, ctx=None, rows=3, quantized=False)
    assert tight.kv_dtype == "int8" and tight.context_fit == 3 * 1000 * kv_tok // (3 * kv8) == 3200
    assert tight.max_context == 3072 and tight.headroom >= 0  # rounded down to 256
    assert tight.kv_note == "--kv-cache auto chose int8: fp32 fits only 768 of 4096 tokens"
    assert any("auto chose int8" in line for line in tight.lines())
    budget = fixed + 3 * 1000 * kv_tok
    fp32 = plan_memory(model.config, weight_bytes=weights, budget_bytes=budget, batch=3, kv_dtype="fp32")
    assert fp32.context_fit == 1000 and fp32.max_context == 768  # what auto would have had in fp32

    asked = plan_context(model, budget=fixed + 3 * 1000 * kv_tok, ctx=1000, rows=3, quantized=False)
    assert asked.max_context == 1000 and asked.kv_dtype == "fp32" and asked.kv_note == ""  # fp32 fits
    more = plan_context(model, budget=fixed + 3 * 1000 * kv_tok, ctx=1001, rows=3, quantized=False)
    assert more.max_context == 1001 and more.kv_dtype == "int8"  # refused in fp32, fits in int8
    with pytest.raises(
        ConfigError, match=r"^tiny does not fit a .* budget: .*KV cache .* for 3201 tokens x 3"
    ):
        plan_context(model, budget=fixed + 3 * 1000 * kv_tok, ctx=3201, rows=3, quantized=False, name="tiny")
    with pytest.raises(ConfigError, match=r"for 1001 tokens x 3\) \(an int8 KV cache does not fit either\)$"):
        plan_context(model, budget=fixed + 1000 * kv8, ctx=1001, rows=3, quantized=False, name="tiny")
    # an explicit int8 cache is planned as asked, with no note
    explicit = plan_context(model, budget=GiB, ctx=None, rows=3, quantized=False, kv_cache="int8")
    assert explicit.kv_dtype == "int8" and explicit.kv_note == "" and explicit.max_context == DEFAULT_CONTEXT

    short = _tiny_decoder(300)  # the model's own limit wins over the memory
    assert plan_context(short, budget=GiB, ctx=None, rows=1, quantized=False).max_context == 300


def test_setup_caches_frees_or_reuses():
    model = _tiny_decoder(64)
    model.setup_caches(2, 64)
    first = model.caches[0].k
    first.fill_(1.0)
    model.setup_caches(2, 64)  # same size: same memory, zeroed
    assert model.caches[0].k.data_ptr() == first.data_ptr() and not model.caches[0].k.any()
    model.setup_caches(1, 32)
    assert model.caches[0].k.shape[:2] == (1, 32)


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--gpu-memory", "lots"], "invalid --gpu-memory 'lots'"),
        (["--gpu-memory", "1MiB"], "does not fit a 0.00 GiB budget"),
        # a budget that would hold 8192 tokens in int8 makes `--kv-cache auto` take it (test_runtime_context_...)
        (
            ["--gpu-memory", "0.6GiB", "--ctx", "8192"],
            "GiB for 8192 tokens x 1) (an int8 KV cache does not fit either)",
        ),
    ],
)
def test_generate_cli_refuses_what_does_not_fit(tmp_path, flags, message):
    import subprocess
    import sys

    from conftest import GGUF, require_data

    require_data()
    cmd = [
        sys.executable,
        "-m",
        "spqr_run.cli.run",
        "generate",
        str(GGUF),
        "--prompt",
        "hi",
        "--device",
        "cpu",
    ]
    proc = subprocess.run([*cmd, *flags], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0] and "Traceback" not in proc.stderr, proc.stderr
    assert all(line.startswith("loading ") for line in lines[:-1]) and lines[-1] == errors[0], proc.stderr


def test_host_memory_counts_reclaimable_cache():
    import os

    from spqr_run.engine.planner import host_available_bytes

    total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    available = host_available_bytes()
    assert 0 < available <= total
    assert available >= free * 0.9  # MemAvailable includes free memory (other processes move it a little)


# ---- the native CPU path ------------------------------------------------------------------------------
def test_native_workspace_hand_computed_for_llama33b():
    """kernels/cpu: spqr_decoder.c's arena (x, h, h2, attention and MLP outputs, the in-projections' outputs,
    the attention output; fp32) and spqr_matmul.c's for the widest input (fp32 + int8 copies, 3 fp32 per group
    of 16); no mask, no dequantized weight; logits fp32."""
    cfg = SYNTHETIC["llama-30b"]
    proj = 6656 + 2 * 6656 + 2 * 17920  # q, k, v, gate, up: 55_808 columns
    decoder = 512 * (5 * 6656 + proj + 6656) * 4
    matmul = 512 * (5 * 17920 + 12 * 1120)  # down_proj's 17920 inputs, 1120 groups
    ws = estimate_workspace(cfg, quantized=True, native=True)
    assert (ws.activations, ws.mask, ws.dequant) == (decoder + matmul, 0, 0) == (248_840_192, 0, 0)
    assert ws.logits == 512 * 32000 * 4 and ws.total == 314_376_192
    assert ws.total < estimate_workspace(cfg, quantized=True).total / 2  # 762_839_040 on the PyTorch path


def test_plan_peak_counts_the_load_transient():
    cfg = SYNTHETIC["llama-7b"]
    plan = plan_memory(cfg, weight_bytes=3 * GiB, budget_bytes=8 * GiB, native=True, transient_bytes=GiB // 2)
    assert plan.peak == plan.total  # running holds more than loading here
    assert any(
        line.startswith("load peak") and "3.75 GiB" in line for line in plan.lines()
    )  # 3 + 0.5 + margin
    big = plan_memory(cfg, weight_bytes=3 * GiB, budget_bytes=8 * GiB, native=True, transient_bytes=4 * GiB)
    assert big.peak == 3 * GiB + 4 * GiB + MARGIN > big.total


def test_load_runtime_takes_int8_when_the_context_needs_it(tmp_path):
    """A `.spqr` loaded as `spqr-run generate` does: with a budget where 4096 tokens fit in int8 only,
    `--kv-cache auto` allocates an int8 cache and the banner says why; a roomy budget keeps the model's KV dtype."""
    from spqr_run.chat.info import describe, model_facts
    from spqr_run.engine.synthetic_file import write_synthetic_spqr
    from spqr_run.runtime import load_runtime

    cfg = tiny_llama(vocab_size=256, intermediate_size=160, max_position_embeddings=4096, name="tiny-4k")
    path = write_synthetic_spqr(tmp_path / "tiny.spqr", cfg).path
    roomy = load_runtime(path, device="cpu", ctx=4096)
    auto = "fp16" if roomy.model.native is not None else "fp32"  # `Decoder.kv_cache_dtype`
    assert roomy.plan.kv_dtype == auto and roomy.model.caches[0].kind == "auto"
    fixed = roomy.plan.total - roomy.plan.kv_bytes
    # k and v, 2 layers, 2 kv heads, head_dim 16; int8 adds an fp32 scale per head
    kv_auto, kv8 = 2 * 2 * 2 * 16 * (2 if auto == "fp16" else 4), 2 * 2 * 2 * (16 + 4)
    tight = load_runtime(path, device="cpu", ctx=4096, memory=fixed + 4096 * (kv8 + kv_auto) // 2)
    assert tight.plan.kv_dtype == "int8" and tight.model.caches[0].kind == "int8"
    assert tight.max_context == 4096 and tight.plan.kv_note.startswith("--kv-cache auto chose int8")
    if tight.model.native is not None:  # the native kernels' workspace: no mask, no dequantized weight
        assert tight.plan.workspace.dequant == 0 == tight.plan.workspace.mask
    banner = dict(describe(model_facts(tight)))
    fits = re.search(
        rf"int8; --kv-cache auto chose int8: {auto} fits only (\d+) of 4096 tokens", banner["memory plan"]
    )
    assert fits and 0 < int(fits.group(1)) < 4096, banner["memory plan"]
