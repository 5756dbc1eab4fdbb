"""The serving engine on the real SmolLM2 model, without HTTP: chunked prefill interleaved with decoding, and
prompt scoring (echo + logprobs) against a plain forward pass."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest
import torch

from spqr_run.generation import GenerationChunk
from spqr_run.loading import build_decoder
from spqr_run.sampling import SamplingParams
from spqr_run.server.engine import Engine, Job
from spqr_run.server.metrics import Metrics

CHUNK = 16


class Recorder:
    """Sinks for jobs that append (name, chunk) to one ordered event list; `done[name]` is set at the end."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.events: list[tuple[str, GenerationChunk]] = []
        self.done: dict[str, threading.Event] = {}
        self.first: dict[str, threading.Event] = {}

    def sink(self, name: str):
        self.done[name], self.first[name] = threading.Event(), threading.Event()

        def put(item: GenerationChunk | BaseException) -> None:
            if isinstance(item, BaseException):
                raise AssertionError(f"job {name} failed: {item!r}")
            with self.lock:
                self.events.append((name, item))
            self.first[name].set()
            if item.finish_reason is not None:
                self.done[name].set()

        return put

    def mark(self) -> int:
        with self.lock:
            return len(self.events)

    def wait(self, name: str, event: str = "done") -> None:
        assert getattr(self, event)[name].wait(timeout=120), f"job {name} did not progress"


def _started_engine(source) -> Engine:
    """2 rows of 512 tokens on a model of its own (an engine owns its model's caches), prefill chunks of CHUNK."""
    model = build_decoder(source)
    eng = Engine(
        model, source.tokenizer, slots=2, max_context=512, max_queue=4, metrics=Metrics(), prefill_chunk=CHUNK
    )
    eng.start()
    return eng


@pytest.fixture(scope="module")
def engine(real_source) -> Iterator[Engine]:
    eng = _started_engine(real_source)
    yield eng
    eng.stop()


def _prompt(tokenizer, n: int) -> list[int]:
    text = "The history of the city begins with a small settlement on the river. " * 40
    ids = tokenizer.encode(text, add_bos=False)
    assert len(ids) >= n
    return ids[:n]


def test_long_prefill_interleaves_with_running_streams(engine: Engine, real_source) -> None:
    rec = Recorder()
    greedy = SamplingParams(temperature=0, max_tokens=200, ignore_eos=True)
    engine.submit([Job(_prompt(real_source.tokenizer, 8), greedy, rec.sink("a"))])
    rec.wait("a", "first")  # a is decoding
    chunks = 10
    long_prompt = _prompt(real_source.tokenizer, chunks * CHUNK)
    engine.submit([Job(long_prompt, greedy.updated(max_tokens=2), rec.sink("b"))])
    after_submit = rec.mark()
    rec.wait("b")
    rec.wait("a")
    events = rec.events[after_submit:]
    first_b = next(i for i, (name, _) in enumerate(events) if name == "b")
    # from b's admission, every engine step feeds one chunk of b and decodes a once: a keeps streaming
    assert sum(name == "a" for name, _ in events[:first_b]) >= chunks - 1
    a_tokens = [t for name, c in rec.events if name == "a" for t in c.token_ids]
    assert len(a_tokens) == 200


def test_prompt_scores_equal_a_plain_forward(engine: Engine, real_source) -> None:
    ids = _prompt(real_source.tokenizer, 3 * CHUNK + 5)  # crosses chunk boundaries
    rec = Recorder()
    params = SamplingParams(temperature=0, max_tokens=1)
    engine.submit([Job(ids, params, rec.sink("s"), prompt_logprobs=2, score_only=True)])
    rec.wait("s")
    [(_, chunk)] = rec.events
    assert chunk.finish_reason == "length" and chunk.token_ids == [] and chunk.stats.completion_tokens == 0
    scored = chunk.prompt_logprobs
    assert [t.token_id for t in scored] == ids[1:]

    reference = build_decoder(real_source)
    reference.setup_caches(
        1, len(ids)
    )  # the engine's cache kind (fp16 on the native CPU path): same rounding
    with torch.inference_mode():
        logits = reference(torch.tensor([ids]))[0, :-1]  # (T-1, V): position i predicts ids[i + 1]
    lp = torch.log_softmax(logits.float(), dim=-1)
    expected = lp.gather(1, torch.tensor(ids[1:])[:, None])[:, 0]
    assert torch.tensor([t.logprob for t in scored]) == pytest.approx(expected, abs=1e-4)
    top2 = torch.topk(lp, 2, dim=-1).indices.tolist()
    assert [[i for i, _, _ in t.top] for t in scored] == top2


def test_prefix_reuse_is_bit_identical(engine: Engine, real_source) -> None:
    """A prompt extending an earlier one reuses its whole chunks from the row, and its tokens and logprobs
    are exactly those of a fresh engine computing everything."""
    tok = real_source.tokenizer
    first = _prompt(tok, 2 * CHUNK + 9)
    longer = first + tok.encode(" Then the railway arrived and the town grew.", add_bos=False)
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, logprobs=0)

    def run(eng: Engine, ids: list[int], name: str) -> tuple[Job, list[tuple[int, float]]]:
        rec = Recorder()
        job = Job(ids, params, rec.sink(name))
        eng.submit([job])
        rec.wait(name)
        return job, [(t.token_id, t.logprob) for _, c in rec.events for t in c.logprobs or []]

    run(engine, first, "first")
    cached_before = engine.metrics.cached_prompt_tokens
    job, reused = run(engine, longer, "longer")
    assert job.reused == 2 * CHUNK  # the whole chunks of `first`; its partial last chunk is recomputed
    assert engine.metrics.cached_prompt_tokens - cached_before == 2 * CHUNK

    fresh = _started_engine(real_source)
    try:
        fresh_job, recomputed = run(fresh, longer, "fresh")
    finally:
        fresh.stop()
    assert fresh_job.reused == 0 and len(recomputed) == 6
    assert reused == recomputed  # bit-identical tokens and logprobs
