"""spqr-serve end to end with the official `openai` client on the real SmolLM2 model: endpoints, sampling
fields, streaming, stop strings, n, echo, logprobs, usage, and every error status in OpenAI's shape."""

from __future__ import annotations

import time

import httpx
import openai
import pytest
from test_server_support import API_KEY, MODEL_NAME, Server, main_server, metric, needs_model, start_server

pytestmark = needs_model

CHAT = [{"role": "system", "content": "You are brief."}, {"role": "user", "content": "Name three colors."}]


@pytest.fixture(scope="module")
def server() -> Server:
    return main_server()


@pytest.fixture(scope="module")
def client(server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0, timeout=60)


def error_of(resp: httpx.Response) -> dict:
    body = resp.json()
    assert set(body) >= {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    return body["error"]


def test_models(client: openai.OpenAI) -> None:
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL_NAME]


def test_chat_plain_and_streamed_agree(client: openai.OpenAI) -> None:
    kw = dict(model=MODEL_NAME, messages=CHAT, max_tokens=24, temperature=0)
    full = client.chat.completions.create(**kw)
    text = full.choices[0].message.content
    assert text and full.choices[0].finish_reason in ("stop", "length")
    assert full.object == "chat.completion" and full.id and full.created > 0 and full.model == MODEL_NAME
    u = full.usage
    assert (
        u.prompt_tokens > 0
        and 0 < u.completion_tokens <= 24
        and u.total_tokens == u.prompt_tokens + u.completion_tokens
    )
    stream = client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True})
    pieces, finish, usage = [], None, None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            pieces.append(c.delta.content or "")
            finish = c.finish_reason or finish
    assert "".join(pieces) == text and finish == full.choices[0].finish_reason
    assert usage is not None and usage.completion_tokens == u.completion_tokens


def test_completion_plain_streamed_and_default_length(client: openai.OpenAI) -> None:
    full = client.completions.create(model=MODEL_NAME, prompt="The capital of France is", temperature=0)
    assert full.usage.completion_tokens <= 16  # OpenAI's default max_tokens
    streamed = client.completions.create(
        model=MODEL_NAME, prompt="The capital of France is", temperature=0, stream=True
    )
    assert "".join(c.choices[0].text for c in streamed if c.choices) == full.choices[0].text
    assert "Paris" in full.choices[0].text


def test_length_finish_and_token_prompts(client: openai.OpenAI, server: Server) -> None:
    ids = httpx.post(
        f"{server.url}/tokenize",
        json={"prompt": "Once upon a time"},
        headers={"Authorization": f"Bearer {API_KEY}"},
    ).json()["tokens"]
    by_text = client.completions.create(
        model=MODEL_NAME, prompt="Once upon a time", max_tokens=5, temperature=0
    )
    by_ids = client.completions.create(model=MODEL_NAME, prompt=[ids, ids], max_tokens=5, temperature=0)
    assert by_text.choices[0].finish_reason == "length" and by_text.usage.completion_tokens == 5
    assert by_text.usage.prompt_tokens == len(ids)
    assert [c.text for c in by_ids.choices] == [by_text.choices[0].text] * 2
    assert by_ids.usage.prompt_tokens == 2 * len(ids)
    detok = httpx.post(
        f"{server.url}/detokenize", json={"tokens": ids}, headers={"Authorization": f"Bearer {API_KEY}"}
    ).json()
    assert detok["prompt"] == "Once upon a time"


def test_stop_strings_plain_and_streamed(client: openai.OpenAI) -> None:
    kw = dict(model=MODEL_NAME, prompt="Count: 1, 2, 3, 4, 5,", max_tokens=20, temperature=0)
    free = client.completions.create(**kw).choices[0].text
    stop = free[4:7]  # three characters from the middle, usually across a token boundary
    assert len(stop) == 3
    cut = free[: free.index(stop)]
    full = client.completions.create(**kw, stop=[stop, "unlikely-stop"])
    assert full.choices[0].text == cut and full.choices[0].finish_reason == "stop"
    pieces = [c.choices[0].text for c in client.completions.create(**kw, stop=stop, stream=True)]
    assert "".join(pieces) == cut
    assert all(stop[:2] not in p for p in pieces if p)  # no part of the stop string leaked


def test_n_seed_and_sampling_fields(client: openai.OpenAI) -> None:
    kw = dict(
        model=MODEL_NAME, messages=CHAT, max_tokens=8, temperature=0.9, top_p=0.95, seed=7, n=2,
        presence_penalty=0.5, frequency_penalty=0.3, logit_bias={"0": -5}, user="tester",
        extra_body={"top_k": 40, "min_p": 0.05, "repetition_penalty": 1.1, "unknown_field": 1},
    )  # fmt: skip
    a = client.chat.completions.create(**kw)
    b = client.chat.completions.create(**kw)
    assert [c.index for c in a.choices] == [0, 1]
    assert [c.message.content for c in a.choices] == [c.message.content for c in b.choices]  # seeded
    streamed = client.chat.completions.create(**kw, stream=True)
    texts = ["", ""]
    for chunk in streamed:
        for c in chunk.choices:
            texts[c.index] += c.delta.content or ""
    assert texts == [c.message.content for c in a.choices]


def test_echo_and_completion_logprobs(client: openai.OpenAI) -> None:
    r = client.completions.create(
        model=MODEL_NAME, prompt="Hello, my name is", max_tokens=4, temperature=0, echo=True, logprobs=3
    )
    choice = r.choices[0]
    assert choice.text.startswith("Hello, my name is") and len(choice.text) > len("Hello, my name is")
    lp = choice.logprobs
    n_prompt = r.usage.prompt_tokens
    assert len(lp.tokens) == n_prompt + 4 == len(lp.token_logprobs) == len(lp.text_offset)
    assert "".join(lp.tokens) == choice.text
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None  # nothing predicts the first token
    assert all(x is not None and x <= 0 for x in lp.token_logprobs[1:])
    assert all(len(t) == 3 for t in lp.top_logprobs[1:])


def test_echo_scores_the_prompt_like_generation(client: openai.OpenAI) -> None:
    """Scoring prompt + greedy continuation with max_tokens=0 (how lm-eval-harness asks for loglikelihoods)
    gives the continuation the logprobs it was generated with, and each is the top-1 of its position."""
    prompt = "The capital of France is"
    gen = client.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=6, temperature=0, logprobs=1)
    generated = gen.choices[0].logprobs
    scored = client.completions.create(
        model=MODEL_NAME, prompt=prompt + gen.choices[0].text, max_tokens=0, echo=True, logprobs=1
    )
    choice = scored.choices[0]
    assert choice.text == prompt + gen.choices[0].text and choice.finish_reason == "length"
    assert scored.usage.completion_tokens == 0
    n_prompt = gen.usage.prompt_tokens
    tail = choice.logprobs.token_logprobs[n_prompt:]
    assert choice.logprobs.tokens[n_prompt:] == generated.tokens
    assert tail == pytest.approx(generated.token_logprobs, abs=1e-3)
    for token, top in zip(generated.tokens, choice.logprobs.top_logprobs[n_prompt:], strict=True):
        assert list(top) == [token]
    streamed = client.completions.create(
        model=MODEL_NAME,
        prompt=prompt + gen.choices[0].text,
        max_tokens=0,
        echo=True,
        logprobs=1,
        stream=True,
    )
    chunks = [c.choices[0] for c in streamed if c.choices]
    assert "".join(c.text for c in chunks) == choice.text
    assert [
        x for c in chunks if c.logprobs for x in c.logprobs.token_logprobs
    ] == choice.logprobs.token_logprobs


def test_chat_logprobs(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(
        model=MODEL_NAME, messages=CHAT, max_tokens=4, temperature=0, logprobs=True, top_logprobs=2
    )
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    for t in content:
        assert t.logprob <= 0 and len(t.top_logprobs) == 2
        assert t.top_logprobs[0].logprob >= t.top_logprobs[1].logprob
        assert t.top_logprobs[0].logprob == pytest.approx(t.logprob)  # greedy picks the best
    text_parts = client.chat.completions.create(
        model=MODEL_NAME, max_tokens=4, temperature=0,
        messages=[{"role": "user", "content": [{"type": "text", "text": "Name three "}, {"type": "text", "text": "colors."}]}],
    )  # fmt: skip
    plain = client.chat.completions.create(
        model=MODEL_NAME,
        max_tokens=4,
        temperature=0,
        messages=[{"role": "user", "content": "Name three colors."}],
    )
    assert text_parts.choices[0].message.content == plain.choices[0].message.content


# ---- errors ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "body, param",
    [
        ({"temperature": 5}, "temperature"),
        ({"top_p": -0.5}, "top_p"),
        ({"n": 0}, "n"),
        ({"max_tokens": -1}, "max_tokens"),
        ({"stop": ""}, "stop"),
        ({"logprobs": 99}, "logprobs"),
        ({"logit_bias": {"999999": 1}}, "logit_bias"),
        ({"prompt": [[1, 2], [-3]]}, "prompt"),
        ({"prompt": []}, "prompt"),
        ({"prompt": None}, "prompt"),
        ({"repetition_penalty": 0.001}, "repetition_penalty"),
    ],
)
def test_invalid_values_are_400_naming_the_parameter(server: Server, body: dict, param: str) -> None:
    req = {"model": MODEL_NAME, "prompt": "hi", "max_tokens": 2, **body}
    r = httpx.post(f"{server.url}/v1/completions", json=req, headers={"Authorization": f"Bearer {API_KEY}"})
    assert r.status_code == 400, r.text
    err = error_of(r)
    assert err["type"] == "invalid_request_error" and err["param"] == param, err


def test_extreme_but_valid_values_do_not_fail(server: Server) -> None:
    """Found by fuzzing: a temperature of 1e-300 overflowed logits / temperature (now treated as greedy)."""
    req = {
        "prompt": "hi",
        "max_tokens": 2,
        "temperature": 1e-300,
        "top_p": 5e-324,
        "repetition_penalty": 0.01,
    }
    r = httpx.post(f"{server.url}/v1/completions", json=req, headers={"Authorization": f"Bearer {API_KEY}"})
    assert r.status_code == 200, r.text


def test_client_errors_map_to_openai_exceptions(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL_NAME, messages=CHAT, max_tokens=100_000)
    assert e.value.status_code == 400 and e.value.code == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL_NAME, messages=[{"role": "user", "content": "x " * 1200}])
    assert e.value.code == "context_length_exceeded" and e.value.param == "messages"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL_NAME, messages=[{"role": "wizard", "content": "x"}])
    assert e.value.param and e.value.param.startswith("messages")
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-17", messages=CHAT, max_tokens=2)
    assert e.value.code == "model_not_found"
    bad = openai.OpenAI(base_url=client.base_url, api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()


def test_http_errors(server: Server) -> None:
    auth = {"Authorization": f"Bearer {API_KEY}"}
    r = httpx.get(f"{server.url}/v1/models")
    assert r.status_code == 401 and error_of(r)["code"] == "invalid_api_key"
    r = httpx.get(f"{server.url}/v1/models", headers={"Authorization": "Bearer nope"})
    assert r.status_code == 401
    r = httpx.get(f"{server.url}/v1/nothing-here", headers=auth)
    assert r.status_code == 404 and error_of(r)
    r = httpx.post(
        f"{server.url}/v1/completions",
        content=b"{not json",
        headers={**auth, "Content-Type": "application/json"},
    )
    assert r.status_code == 400 and error_of(r)["type"] == "invalid_request_error"
    big = {"model": MODEL_NAME, "prompt": "x" * 300_000, "max_tokens": 1}
    r = httpx.post(f"{server.url}/v1/completions", json=big, headers=auth)
    assert r.status_code == 413 and error_of(r)["code"] == "request_too_large"
    assert httpx.get(f"{server.url}/health").status_code == 200  # health needs no key
    metrics = httpx.get(f"{server.url}/metrics").text
    for name in ("spqr_requests_total", "spqr_prompt_tokens_total", "spqr_generation_tokens_total",
                 "spqr_queue_depth", "spqr_time_to_first_token_seconds_bucket",
                 "spqr_time_per_output_token_seconds_count"):  # fmt: skip
        assert name in metrics


def test_503_while_loading(tmp_path) -> None:
    loading = start_server("--load-delay", "60", tmp=tmp_path)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                r = httpx.get(f"{loading.url}/health", timeout=2)
                break
            except httpx.HTTPError:
                assert time.monotonic() < deadline and loading.proc.poll() is None, loading.log.read_text()
                time.sleep(0.1)
        assert r.status_code == 503 and error_of(r)["code"] == "model_loading"
        r = httpx.post(f"{loading.url}/v1/completions", json={"prompt": "hi"})
        assert r.status_code == 503 and error_of(r)["type"] == "service_unavailable"
    finally:
        loading.stop()


def test_conversation_reuses_its_prefix(client: openai.OpenAI, server: Server) -> None:
    """A second request sharing a long system prompt reuses its whole prefill chunks (see /metrics)."""
    system = "You answer questions about rivers. " + "Rivers flow from sources to mouths. " * 60
    before = metric(server, "spqr_prompt_tokens_cached_total")
    for question in ("Name a long river.", "Name a short river."):
        r = client.chat.completions.create(
            model=MODEL_NAME,
            messages=[{"role": "system", "content": system}, {"role": "user", "content": question}],
            max_tokens=4,
            temperature=0,
        )
        assert r.usage.prompt_tokens > 256
    assert metric(server, "spqr_prompt_tokens_cached_total") - before >= 256
