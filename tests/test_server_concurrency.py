"""Continuous batching under load: 8 streaming clients, greedy streams identical to the same request run alone;
a cancelled stream frees its slot; a full queue answers 429."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
from test_server_support import API_KEY, MODEL_NAME, Server, main_server, metric, needs_model, shared_server

pytestmark = needs_model

PROMPTS = [
    "Write a haiku about the sea.",
    "What is the capital of Italy?",
    "List two prime numbers.",
    "Say hello in French.",
    "Why is the sky blue?",
    "Give me a word that rhymes with cat.",
    "What is 7 times 6?",
    "Name a planet.",
]


def stream_chat(client: openai.OpenAI, prompt: str, max_tokens: int = 12) -> str:
    stream = client.chat.completions.create(
        model=MODEL_NAME, messages=[{"role": "user", "content": prompt}], max_tokens=max_tokens, temperature=0,
        stream=True,
    )  # fmt: skip
    return "".join(c.choices[0].delta.content or "" for c in stream if c.choices)


@pytest.mark.slow
def test_eight_streaming_clients_match_solo_runs() -> None:
    server = main_server()
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0, timeout=120)
    alone = {p: stream_chat(client, p) for p in PROMPTS}  # one request at a time
    assert all(alone.values())

    def worker(k: int) -> list[tuple[str, str]]:
        out = []
        for i in range(5):
            prompt = PROMPTS[(k + i) % len(PROMPTS)]
            out.append((prompt, stream_chat(client, prompt)))
        return out

    with ThreadPoolExecutor(8) as pool:
        results = [r for rs in pool.map(worker, range(8)) for r in rs]
    assert len(results) == 40
    mismatched = [(p, got, alone[p]) for p, got in results if got != alone[p]]
    assert not mismatched, mismatched[:3]
    assert metric(server, "spqr_slots_busy") == 0 and metric(server, "spqr_queue_depth") == 0


@pytest.fixture(scope="module")
def single_slot() -> Server:
    """One slot and a queue of one: the third concurrent sequence is refused."""
    return shared_server("--parallel", "1", "--max-queue", "1", "--ctx", "512", "--model-name", MODEL_NAME)


def test_cancelled_stream_frees_its_slot(single_slot: Server) -> None:
    client = openai.OpenAI(base_url=f"{single_slot.url}/v1", api_key="unused", max_retries=0, timeout=60)
    before = metric(single_slot, "spqr_sequences_cancelled_total")
    stream = client.completions.create(
        model=MODEL_NAME,
        prompt="1, 2, 3,",
        max_tokens=400,
        temperature=0,
        stream=True,
        logit_bias={str(i): -100 for i in (0, 1, 2)},  # no end-of-text: it would run 400 tokens
    )
    for i, _ in enumerate(stream):
        if i == 2:
            break
    stream.close()  # the client goes away mid-stream
    t0 = time.monotonic()
    r = client.completions.create(model=MODEL_NAME, prompt="Hi", max_tokens=2, temperature=0)
    assert r.choices[0].finish_reason == "length"
    assert time.monotonic() - t0 < 20  # did not wait for 400 tokens
    assert metric(single_slot, "spqr_sequences_cancelled_total") == before + 1
    assert metric(single_slot, "spqr_slots_busy") == 0


def test_full_queue_is_429(single_slot: Server) -> None:
    url = f"{single_slot.url}/v1/completions"
    body = {
        "model": MODEL_NAME, "prompt": "1, 2, 3,", "max_tokens": 100, "temperature": 0,
        "logit_bias": {str(i): -100 for i in (0, 1, 2)},  # no early end-of-text
    }  # fmt: skip
    results: list[int] = []

    def post() -> None:
        results.append(httpx.post(url, json=body, timeout=120).status_code)

    threads = [threading.Thread(target=post) for _ in range(2)]  # one in the slot, one in the queue
    for t in threads:
        t.start()
        time.sleep(0.3)
    deadline = time.monotonic() + 10
    while metric(single_slot, "spqr_queue_depth") < 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    r = httpx.post(url, json={**body, "max_tokens": 1}, timeout=30)
    assert r.status_code == 429, r.text
    err = r.json()["error"]
    assert err["type"] == "rate_limit_error" and err["code"] == "queue_full"
    with pytest.raises(openai.RateLimitError):
        openai.OpenAI(base_url=f"{single_slot.url}/v1", api_key="x", max_retries=0).completions.create(
            model=MODEL_NAME, prompt="x", max_tokens=1
        )
    for t in threads:
        t.join()
    assert results == [200, 200]
