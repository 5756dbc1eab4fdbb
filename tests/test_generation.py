"""Sampling, stop handling and the generator's prefix reuse."""

from __future__ import annotations

import pytest
import torch

from spqr_run.errors import ConfigError
from spqr_run.generation import Generator, SequenceState
from spqr_run.sampling import Sampler, SamplingParams


def _logits(seed: int = 0, v: int = 50) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(v, generator=g) * 3


@pytest.mark.parametrize(
    "field,value",
    [
        ("temperature", -1.0),
        ("top_p", 0.0),
        ("top_k", -2),
        ("min_p", 1.5),
        ("max_tokens", 0),
        ("repetition_penalty", 0.0),
        ("repetition_penalty", 0.001),
        ("presence_penalty", 3.0),
        ("logprobs", 21),
        ("stop", ("",)),
    ],
)
def test_invalid_sampling_params_name_the_field(field, value):
    with pytest.raises(ConfigError, match=f"invalid {field}="):
        SamplingParams(**{field: value})


def test_greedy_and_degenerate_filters_pick_argmax():
    logits = _logits()
    best = int(torch.argmax(logits))
    for params in (
        SamplingParams(temperature=0),
        SamplingParams(temperature=1.5, top_k=1, seed=1),
        SamplingParams(temperature=1.0, top_p=1e-6, seed=2),
        SamplingParams(temperature=1.0, min_p=1.0, seed=3),
        SamplingParams(temperature=1e-30, seed=4),  # tiny but positive: greedy, never inf/nan
    ):
        assert Sampler(params, 50, []).sample(logits) == best


def test_seed_reproducible_and_sampling_follows_distribution():
    logits = _logits(1)
    params = SamplingParams(temperature=1.0, seed=7)
    a = [Sampler(params, 50, []).sample(logits) for _ in range(3)]
    assert len(set(a)) == 1
    s = Sampler(SamplingParams(temperature=1.0, seed=3), 50, [])
    draws = torch.tensor([s.sample(logits) for _ in range(4000)])
    freq = torch.bincount(draws, minlength=50).float() / 4000
    assert (freq - torch.softmax(logits, -1)).abs().max() < 0.03


def test_top_k_and_top_p_restrict_support():
    logits = _logits(2)
    top5 = set(torch.topk(logits, 5).indices.tolist())
    s = Sampler(SamplingParams(temperature=2.0, top_k=5, seed=0), 50, [])
    assert {s.sample(logits) for _ in range(300)} <= top5
    probs = torch.softmax(logits, -1)
    sorted_p, order = torch.sort(probs, descending=True)
    n_keep = int((torch.cumsum(sorted_p, 0) < 0.5).sum()) + 1
    nucleus = set(order[:n_keep].tolist())
    s = Sampler(SamplingParams(temperature=1.0, top_p=0.5, seed=0), 50, [])
    assert {s.sample(logits) for _ in range(300)} <= nucleus


def test_penalties_and_logit_bias():
    logits = torch.zeros(10)
    logits[3] = 2.0
    s = Sampler(SamplingParams(temperature=0, repetition_penalty=4.0), 10, prompt_ids=[3])
    assert s.process(logits)[3] == pytest.approx(0.5)
    s = Sampler(SamplingParams(temperature=0, frequency_penalty=1.0, presence_penalty=0.5), 10, [])
    s.accept(3)
    s.accept(3)
    assert s.process(logits)[3] == pytest.approx(2.0 - 2.0 - 0.5)
    s = Sampler(SamplingParams(temperature=0, logit_bias={7: 100.0}), 10, [])
    assert s.sample(logits) == 7


def _feed(tokenizer, text: str, params: SamplingParams, eos=()):
    ids = tokenizer.encode(text, add_bos=False, special=False)
    state = SequenceState(tokenizer, [], params, eos)
    chunks = []
    for t in ids:
        chunks.append(state.accept(t))
        if state.finished:
            break
    else:
        chunks.append(state.finish("length"))
    return chunks, state


def test_stop_string_is_cut_and_never_leaks(real_source):
    tok = real_source.tokenizer
    text = "The answer is 42.\nUser: and the next question"
    chunks, state = _feed(tok, text, SamplingParams(max_tokens=100, stop=("\nUser:",)))
    emitted = "".join(c.text for c in chunks)
    assert emitted == "The answer is 42."
    assert state.finish_reason == "stop" and chunks[-1].finish_reason == "stop"


def test_held_back_prefix_is_released_when_it_is_not_a_stop(real_source):
    tok = real_source.tokenizer
    text = "alpha STO beta STOP gamma"
    chunks, _ = _feed(tok, text, SamplingParams(max_tokens=100, stop=("STOP",)))
    # emitted text cannot be taken back: had "ST" of "STOP" leaked, it would be in the concatenation
    assert "".join(c.text for c in chunks) == "alpha STO beta "


def test_eos_and_length(real_source):
    tok = real_source.tokenizer
    ids = tok.encode("one two three four five", add_bos=False)
    state = SequenceState(tok, [], SamplingParams(max_tokens=3), eos_ids=[ids[1]])
    state.accept(ids[0])
    chunk = state.accept(ids[1])
    assert chunk.finish_reason == "stop" and state.text == "one"
    state = SequenceState(tok, [], SamplingParams(max_tokens=3), eos_ids=[])
    reasons = [state.accept(t).finish_reason for t in ids[:3]]
    assert reasons == [None, None, "length"] and state.text == "one two three"


@pytest.mark.slow
def test_prefix_reuse_gives_the_same_tokens_as_a_fresh_generator(real_model, real_source):
    tok = real_source.tokenizer
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    first = tok.encode("Paris is the capital of")
    gen = Generator(real_model, tok, max_seq_len=256)
    r1 = gen.generate(first, params)
    follow = first + r1.token_ids + tok.encode(" Berlin is the capital of", add_bos=False)
    r2 = gen.generate(follow, params)
    assert r2.stats.cached_tokens >= len(first)
    fresh = Generator(real_model, tok, max_seq_len=256)
    fresh.reset()
    r3 = fresh.generate(follow, params)
    assert r3.stats.cached_tokens == 0 and r2.token_ids == r3.token_ids


@pytest.mark.slow
def test_context_full_ends_with_length(real_model, real_source):
    tok = real_source.tokenizer
    gen = Generator(real_model, tok, max_seq_len=24)
    ids = tok.encode("Once upon a time there was")
    r = gen.generate(ids, SamplingParams(temperature=0, max_tokens=100, ignore_eos=True))
    assert r.finish_reason == "length" and len(ids) + len(r.token_ids) == 24
    with pytest.raises(ConfigError, match="the prompt has 30 tokens, the context holds 24"):
        gen.generate([5] * 30, SamplingParams())
