"""What a decode step of the serving engine computes, on tiny random models without HTTP.

- Native CPU kernels (batch-invariant, `Decoder.batch_invariant`): a step runs only the busy rows, so the model
  computes each token exactly once (prompt tokens in prefill, generated tokens after the first in decode) and a
  lone request decodes one row per step; a request's tokens and logprobs are bit-identical alone and beside
  requests of other lengths that join and leave while it streams. Dense and SpQR (int8 activations, outliers)
  weights both.
- Torch kernels (`native=False`): a step still runs every slot, with the key length padded to `kv_bucket`,
  and that keeps the same bit-identity.

The schedule is made deterministic without sleeps: a job's sink submits the next jobs from the engine thread
when the job has streamed a given number of tokens.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from spqr_run.cpu import lib as native
from spqr_run.generation import GenerationChunk
from spqr_run.loading import build_decoder, open_model
from spqr_run.models.decoder import Decoder
from spqr_run.sampling import SamplingParams
from spqr_run.server.engine import Engine, Job
from spqr_run.server.metrics import Metrics
from tests import test_quantize_model

SLOTS, CHUNK, BUCKET = 4, 16, 64
needs_native = pytest.mark.skipif(
    native.load() is None, reason=f"native CPU kernels unavailable: {native.unavailable_reason()}"
)


@pytest.fixture(scope="module")
def tiny_spqr(tiny_spqr_file) -> Path:
    return tiny_spqr_file(3)


@dataclass
class Call:
    """One model call as the engine made it: tokens (B, T), its rows, positions (B, T) and key length."""

    batch: int
    length: int
    rows: list[int]
    positions: torch.Tensor
    kv_len: int | None


@dataclass
class Served:
    """An engine on its own model, with every model call it makes recorded."""

    engine: Engine
    model: Decoder
    calls: list[Call] = field(default_factory=list)


def _serve(source, *, native_kernels: bool) -> Iterator[Served]:
    model = build_decoder(source, native=native_kernels)
    assert (model.native is not None) == native_kernels
    engine = Engine(
        model, source.tokenizer, slots=SLOTS, max_context=128, max_queue=8, metrics=Metrics(),
        prefill_chunk=CHUNK, kv_bucket=BUCKET, prefix_reuse=False,
    )  # fmt: skip
    served = Served(engine, model)

    def record(_: Decoder, args: tuple, kwargs: dict) -> None:
        tokens, positions = args
        rows = kwargs["rows"].tolist()
        served.calls.append(Call(*tokens.shape, rows, positions.clone(), kwargs.get("kv_len")))

    handle = model.register_forward_pre_hook(record, with_kwargs=True)
    engine.start()
    yield served
    engine.stop()
    handle.remove()


@pytest.fixture(scope="module", params=[pytest.param(p, marks=needs_native) for p in ("dense", "spqr")])
def native_served(request, tiny_hf: Path) -> Iterator[Served]:
    path = tiny_hf if request.param == "dense" else request.getfixturevalue("tiny_spqr")
    yield from _serve(open_model(path), native_kernels=True)


@pytest.fixture(scope="module")
def torch_served(tiny_hf: Path) -> Iterator[Served]:
    yield from _serve(open_model(tiny_hf), native_kernels=False)


# ---- a scripted workload --------------------------------------------------------------------------------
@dataclass
class Request:
    prompt: int  # prompt tokens
    params: SamplingParams
    then: dict[int, list[str]] = field(default_factory=dict)  # after its n-th token: submit these requests


GREEDY = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True, logprobs=2)
WORKLOAD = {
    "a": Request(7, GREEDY, then={3: ["b", "c"], 20: ["d"]}),
    "b": Request(19, GREEDY.updated(max_tokens=5)),  # joins, leaves while a streams
    "c": Request(2 * CHUNK + 3, GREEDY.updated(max_tokens=25)),  # a three-chunk prefill between a's steps
    "d": Request(4, SamplingParams(temperature=0.9, seed=3, max_tokens=30, ignore_eos=True, logprobs=1)),
}

Stream = list[tuple[int, float, list[tuple[int, float]]]]  # per token: id, logprob, top alternatives


def _prompt(served: Served, n: int) -> list[int]:
    return served.engine.tokenizer.encode(test_quantize_model.CORPUS, add_bos=False)[:n]


def run(served: Served, first: list[str], *, follow: bool = True) -> tuple[dict[str, Stream], list[Call]]:
    """Submit `first`, and (`follow`) each request's `then` as its tokens stream; wait for all. Returns each
    request's tokens with their logprobs, and the model calls made meanwhile."""
    engine = served.engine
    names = set(first)
    if follow:
        for r in WORKLOAD.values():
            names |= {n for ns in r.then.values() for n in ns}
    streams: dict[str, Stream] = {n: [] for n in names}
    done = {n: threading.Event() for n in names}
    failures: list[BaseException] = []

    def sink(name: str) -> Callable[[GenerationChunk | BaseException], None]:
        def put(item: GenerationChunk | BaseException) -> None:
            if isinstance(item, BaseException):
                failures.append(item)
                done[name].set()
                return
            for t in item.logprobs or []:
                streams[name].append((t.token_id, t.logprob, [(i, v) for i, _, v in t.top]))
            for later in WORKLOAD[name].then.get(len(streams[name]), []) if follow else []:
                submit(later)  # from the engine thread, before its next step
            if item.finish_reason is not None:
                done[name].set()

        return put

    def submit(name: str) -> None:
        r = WORKLOAD[name]
        engine.submit([Job(_prompt(served, r.prompt), r.params, sink(name))])

    start = len(served.calls)
    for name in first:
        submit(name)
    for name, event in done.items():
        assert event.wait(timeout=120), f"request {name} did not finish"
    assert not failures, failures
    assert all(len(s) == WORKLOAD[n].params.max_tokens for n, s in streams.items())
    return streams, served.calls[start:]


def computed_rows(calls: list[Call]) -> int:
    """Token positions the model computed: rows x tokens over all calls."""
    return sum(c.batch * c.length for c in calls)


def needed_rows(names: list[str]) -> int:
    """Token positions a request needs: its prompt, and each generated token but the last fed back once."""
    return sum(WORKLOAD[n].prompt + WORKLOAD[n].params.max_tokens - 1 for n in names)


def _alone_and_together(served: Served) -> tuple[dict[str, Stream], dict[str, Stream], list[Call]]:
    alone: dict[str, Stream] = {}
    for name in WORKLOAD:
        streams, _ = run(served, [name], follow=False)
        alone |= streams
    together, calls = run(served, ["a"])
    return alone, together, calls


# ---- native kernels: busy rows only ----------------------------------------------------------------------
@needs_native
def test_native_model_is_batch_invariant_and_torch_is_not(tiny_hf: Path) -> None:
    assert build_decoder(open_model(tiny_hf)).batch_invariant
    assert not build_decoder(open_model(tiny_hf), native=False).batch_invariant


def test_native_output_is_bit_identical_alone_and_among_joining_and_leaving_requests(
    native_served: Served,
) -> None:
    alone, together, calls = _alone_and_together(native_served)
    assert max(c.batch for c in calls) >= 3  # the requests did overlap
    for name in WORKLOAD:
        assert together[name] == alone[name], name  # tokens, logprobs and top alternatives, bit for bit


def test_native_decode_runs_only_the_busy_rows(native_served: Served) -> None:
    # a lone request: one row per step, every token computed once
    for name in WORKLOAD:
        _, calls = run(native_served, [name], follow=False)
        assert all(c.batch == 1 for c in calls), name
        assert computed_rows(calls) == needed_rows([name])
    # requests joining and leaving: still no row computed that no request needs
    _, calls = run(native_served, ["a"])
    assert computed_rows(calls) == needed_rows(list(WORKLOAD))
    decode = [c for c in calls if c.length == 1]
    assert {c.batch for c in decode} >= {1, 2, 3}  # steps ran 1..3 rows as requests came and went
    for c in decode:
        assert len(set(c.rows)) == c.batch  # each busy row once
        assert c.kv_len == int(c.positions.max()) + 1  # the keys needed, unpadded


# ---- torch kernels: every slot, padded keys --------------------------------------------------------------
def test_torch_decode_pads_every_step_and_stays_bit_identical(torch_served: Served) -> None:
    alone, together, calls = _alone_and_together(torch_served)
    for name in WORKLOAD:
        assert together[name] == alone[name], name
    prefill = [c for c in calls if c.batch == 1]
    decode = [c for c in calls if c.batch > 1]
    assert sum(c.length for c in prefill) == sum(r.prompt for r in WORKLOAD.values())
    for c in decode:
        assert c.length == 1 and sorted(c.rows) == list(range(SLOTS))  # all slots, idle ones as dummies
        assert c.kv_len is not None and c.kv_len % BUCKET == 0
    assert computed_rows(calls) == computed_rows(prefill) + SLOTS * len(decode) > needed_rows(list(WORKLOAD))
