"""Generation defaults: read from model files, carried in the .spqr, and resolved with one precedence
(request/flag > the model's recommendation > `GLOBAL_DEFAULTS`) by spqr-chat, spqr-serve and spqr-run; and the
demo model answering simple questions at those defaults (issue 14, defect 3)."""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path
from types import SimpleNamespace

import pytest

from spqr_run.errors import ConfigError
from spqr_run.loading.hf import load_generation_defaults
from spqr_run.sampling import GLOBAL_DEFAULTS, clean_model_defaults, resolve_sampling
from tests import test_quantize_model

tiny_hf = test_quantize_model.tiny_model  # the module-scoped fixture: a tiny LLaMA HF folder

MODEL = {"temperature": 0.2, "top_p": 0.9}


def test_request_beats_model_beats_global() -> None:
    p = resolve_sampling({"top_p": 0.5, "temperature": None}, MODEL, max_tokens=7)
    assert p.top_p == 0.5  # requested
    assert p.temperature == 0.2  # the model's (None in the request means "not set")
    assert p.min_p == GLOBAL_DEFAULTS["min_p"]  # global: neither sets it
    assert p.max_tokens == 7
    assert resolve_sampling({}, {}).temperature == GLOBAL_DEFAULTS["temperature"]
    assert resolve_sampling({"temperature": 0}, MODEL).greedy


def test_global_defaults_truncate_the_tail() -> None:
    p = resolve_sampling()
    assert 0 < p.temperature <= 1 and (p.min_p > 0 or p.top_p < 1)


def test_bad_values_name_the_parameter() -> None:
    with pytest.raises(ConfigError, match="top_p"):
        resolve_sampling({"top_p": 0.0}, MODEL)
    with pytest.raises(ConfigError, match="'tempreature'"):
        resolve_sampling({"tempreature": 1.0})


def test_model_defaults_are_validated() -> None:
    raw = {"temperature": 0.6, "top_k": 50.0, "top_p": 7, "min_p": "high", "do_sample": True, "other": 1}
    with pytest.warns(UserWarning) as caught:
        out = clean_model_defaults(raw, source="model.json")
    assert sorted(str(w.message) for w in caught) == [
        "model.json: ignoring the recommended min_p='high' (not a number)",
        "model.json: ignoring the recommended top_p=7.0 (out of range)",
    ]
    assert out == {"temperature": 0.6, "top_k": 50}


def test_hf_generation_config(tmp_path: Path) -> None:
    (tmp_path / "generation_config.json").write_text(
        json.dumps({"do_sample": True, "temperature": 0.6, "top_p": 0.9, "eos_token_id": 2})
    )
    assert load_generation_defaults(tmp_path) == {"temperature": 0.6, "top_p": 0.9}
    (tmp_path / "generation_config.json").write_text(json.dumps({"do_sample": False, "temperature": 0.6}))
    assert load_generation_defaults(tmp_path) == {"temperature": 0.0}  # transformers would decode greedily


def test_gguf_sampling_metadata(tmp_path: Path) -> None:
    gguf = pytest.importorskip("gguf")
    from spqr_run.loading import open_model
    from tests.test_loading import _tiny_llama, _write_gguf

    plain = tmp_path / "plain.gguf"
    _write_gguf(plain, _tiny_llama())
    assert open_model(plain).generation_defaults == {}
    # the same file with the sampling keys llama.cpp's converter writes (gguf.Keys.General.SAMPLING_*)
    reader = gguf.GGUFReader(str(plain))
    with_keys = tmp_path / "sampling.gguf"
    w = gguf.GGUFWriter(str(with_keys), "llama")
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        value = field.contents()
        vtype = field.types[0]
        if vtype == gguf.GGUFValueType.ARRAY:
            w.add_key_value(key, value, vtype, sub_type=field.types[-1])
        else:
            w.add_key_value(key, value, vtype)
    w.add_float32(gguf.Keys.General.SAMPLING_TEMP, 0.3)
    w.add_float32(gguf.Keys.General.SAMPLING_MIN_P, 0.05)
    w.add_int32(gguf.Keys.General.SAMPLING_TOP_K, 20)
    for t in reader.tensors:
        w.add_tensor(t.name, t.data, raw_dtype=t.tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    assert open_model(with_keys).generation_defaults == pytest.approx(
        {"temperature": 0.3, "min_p": 0.05, "top_k": 20}
    )


def test_spqr_carries_the_model_defaults(tiny_hf: Path, tmp_path: Path) -> None:
    from spqr_run.loading import open_model
    from tests.test_quantize_model import _quantize

    gen = {"do_sample": True, **MODEL, "eos_token_id": 1}
    (tiny_hf / "generation_config.json").write_text(json.dumps(gen))
    assert open_model(tiny_hf).generation_defaults == MODEL  # from generation_config.json
    out = tmp_path / "m.spqr"
    _quantize(tiny_hf, out)
    assert open_model(out).generation_defaults == MODEL  # carried into the .spqr and read back


def _chat_args(**flags) -> argparse.Namespace:
    from spqr_run.cli.chat import build_parser

    argv = [f"--{k.replace('_', '-')}={v}" for k, v in flags.items()]
    return build_parser().parse_args(argv)


def test_chat_flags_over_model_over_global() -> None:
    from spqr_run.cli.chat import DEFAULT_MAX_TOKENS, sampling_params

    p = sampling_params(_chat_args(top_p=0.5), MODEL)
    assert (p.temperature, p.top_p, p.min_p) == (0.2, 0.5, GLOBAL_DEFAULTS["min_p"])
    assert p.max_tokens == DEFAULT_MAX_TOKENS
    p = sampling_params(_chat_args(), {})
    assert (p.temperature, p.top_p, p.min_p) == tuple(
        GLOBAL_DEFAULTS[k] for k in ("temperature", "top_p", "min_p")
    )


def test_server_request_over_model_over_global() -> None:
    from spqr_run.server import protocol as P
    from spqr_run.server.serving import OpenAIServing

    tokenizer = SimpleNamespace(vocab_size=100, vocab_strings=lambda: [], token_string=lambda i: "")
    runtime = SimpleNamespace(
        tokenizer=tokenizer,
        chat_template=SimpleNamespace(source=""),
        source=SimpleNamespace(generation_defaults=MODEL),
    )
    serving = OpenAIServing(runtime, SimpleNamespace(max_context=64), "m")  # type: ignore[arg-type]
    req = P.ChatCompletionRequest(messages=[{"role": "user", "content": "hi"}], top_p=0.5)
    p = serving.sampling_params(req, max_tokens=8, logprobs=None)
    assert (p.temperature, p.top_p, p.min_p) == (0.2, 0.5, GLOBAL_DEFAULTS["min_p"])
    req = P.CompletionRequest(prompt="hi", temperature=1.5, min_p=0.0)
    p = serving.sampling_params(req, max_tokens=8, logprobs=None)
    assert (p.temperature, p.top_p, p.min_p) == (1.5, 0.9, 0.0)
    serving.runtime = SimpleNamespace(
        tokenizer=runtime.tokenizer, source=SimpleNamespace(generation_defaults={})
    )
    p = serving.sampling_params(P.CompletionRequest(prompt="hi"), max_tokens=8, logprobs=None)
    assert p.temperature == GLOBAL_DEFAULTS["temperature"]


# ---- the demo model at its default settings -------------------------------------------------------------
# Simple questions this 4-bit 135M model knows: at temperature 0 its GGUF answers each right and stops at
# <|im_end|>. At the old defaults (temperature 0.7, no truncation, nothing from the model) a sampled tail token
# derails some replies (seed 3 of the Germany question: "Der Königin der Deutschland, ..."). "What is the capital of France?" is not
# here: this model itself is split on it (first token "The" 15%, "L" 14%, "La" 10%: it answers in invented
# French at any temperature that samples, and greedily too once re-quantized to .spqr), which no sampling
# setting short of greedy decoding fixes.
QUESTIONS = [
    ("What is the capital of Germany?", ("berlin",)),
    ("What is the capital of Japan?", ("tokyo",)),
    ("What is the capital of the United Kingdom?", ("london",)),
    ("How many days are in a week?", ("7", "seven")),
]
SEEDS = range(5)


def demo_answers(runtime, defaults: dict) -> list[tuple[str, int, str, str]]:
    """(question, seed, reply, finish reason) for every question and seed, at the resolved default settings."""
    gen = runtime.generator()
    out = []
    for question, _ in QUESTIONS:
        text = runtime.chat_template.render(
            [{"role": "user", "content": question}], add_generation_prompt=True
        )
        ids = runtime.tokenizer.encode(text, add_bos=False)
        for seed in SEEDS:
            params = resolve_sampling({"seed": seed, "max_tokens": 48}, defaults)
            r = gen.generate(ids, params)
            out.append((question, seed, r.text, r.finish_reason))
    return out


def check_answers(answers: list[tuple[str, int, str, str]]) -> None:
    expected = dict(QUESTIONS)
    wrong = [
        (q, s, t) for q, s, t, _ in answers if not re.search(rf"\b({'|'.join(expected[q])})\b", t.lower())
    ]
    assert not wrong, f"wrong answers at the default settings: {wrong}"
    unstopped = [(q, s, t) for q, s, t, reason in answers if reason != "stop"]
    assert not unstopped, f"replies that did not end at <|im_end|>: {unstopped}"


@pytest.mark.slow
def test_demo_gguf_answers_at_default_settings(gguf_path) -> None:
    """The demo's source GGUF with the settings its prepared .spqr carries (the card's, then the global ones)."""
    from spqr_run.default_model import DEFAULT_MODEL_GENERATION
    from spqr_run.runtime import load_runtime

    runtime = load_runtime(gguf_path, device="cpu", ctx=256)
    assert runtime.source.generation_defaults == {}  # this GGUF carries none: the .spqr gets the card's
    check_answers(demo_answers(runtime, DEFAULT_MODEL_GENERATION))
