"""Continuous batching: one engine thread owns the model and runs every active sequence in one decode step.

Each of the `slots` sequences generating at a time owns one KV-cache row. A new sequence is prefilled alone
into a free row, one chunk of `prefill_chunk` tokens per engine step interleaved with the decode steps of the
running batch (a long prompt delays the other streams by one chunk per token, never by its whole length), and
joins the batch when its prompt is in; sequences beyond the slots wait in a bounded queue (`submit` raises a
429 `APIError` when it is full).

Prefix reuse: a row keeps the keys/values of its last prompt after its sequence ends. A new sequence takes the
free row that shares the longest prefix with its prompt and starts its prefill after the shared part (a chat
client resending a growing conversation pays only for the new turn). Only whole prefill chunks computed by an
earlier prefill are reused, so the new prefill starts at a chunk boundary and every chunk has the shape it
would have had from scratch: the result is bit-identical to recomputing.

Results go back through each job's `sink`, which the caller makes thread-safe (the server posts into an
asyncio queue with `loop.call_soon_threadsafe`). Setting `job.cancelled` ends the sequence and frees its row
before the next step.

Determinism: a sequence's tokens and logprobs do not depend on what else runs, and each path keeps that
promise its own way:

- A batch-invariant model (`Decoder.batch_invariant`: the native CPU kernels, whose arithmetic is per row and
  whose attention reads a row's keys 0 .. its position) gives a row the same logits bit for bit in any batch,
  so a decode step runs only the busy rows and reads exactly the keys they need: a lone request costs one
  row per token, N requests N rows.
- Otherwise (torch's kernels: a GPU, or a CPU without the native library) fp32 matmul results depend on the
  number of rows M (M=1 and M=8 differ in the last bits) and attention results on the key length when it is
  not a multiple of the vector width, so every decode step runs all `slots` rows (rows not decoding are
  dummies writing the last position of their row, which a sequence always writes itself before it reads it)
  and reads a key length rounded up to a multiple of `kv_bucket`. Measured on SmolLM2: with both, a row's
  logits are bit-identical whatever the other rows hold and however far the keys are padded (masked keys
  add exact zeros). The price: a lone request pays for `slots` rows per token.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from spqr_run.generation import GenerationChunk, GenerationStats, SequenceState, TokenLogprob
from spqr_run.models.decoder import Decoder
from spqr_run.sampling import SamplingParams
from spqr_run.server.metrics import Metrics
from spqr_run.server.protocol import APIError
from spqr_run.structured import Constraint, MaskBatch
from spqr_run.tokenizer import Tokenizer

log = logging.getLogger("spqr_run.server")

Sink = Callable[[GenerationChunk | BaseException], None]


@dataclass(eq=False)
class Job:
    """One sequence to generate; the engine fills in the fields below `cancelled`."""

    prompt_ids: list[int]
    params: SamplingParams
    sink: Sink
    prompt_logprobs: int | None = None  # k: score every prompt token after the first, with its top k
    score_only: bool = False  # generate nothing: prefill (and score) the prompt, finish with "length"
    constraint: Constraint | None = None  # structured output: the grammar the generated tokens must follow
    arrived: float = field(default_factory=time.perf_counter)
    cancelled: bool = False  # set by the client side; read by the engine between steps
    state: SequenceState | None = None  # set when the whole prompt is in the cache
    slot: int = -1
    prefilled: int = 0  # prompt tokens in the cache (reused from the row's previous prompt, then computed)
    reused: int = 0  # prompt tokens whose keys/values were already in the row
    prompt_info: list[TokenLogprob] = field(default_factory=list)
    pos: int = 0  # position the last sampled token is fed at
    last_token: int = 0
    last_time: float = 0.0
    generated: int = 0


class Engine:
    """Owns `model` in one thread; `submit` jobs from any thread, `cancel` them, `stop` at shutdown."""

    def __init__(
        self,
        model: Decoder,
        tokenizer: Tokenizer,
        *,
        slots: int,
        max_context: int,
        max_queue: int,
        metrics: Metrics,
        prefill_chunk: int = 256,
        kv_bucket: int = 64,
        prefix_reuse: bool = True,
    ) -> None:
        self.model, self.tokenizer, self.metrics = model, tokenizer, metrics
        self.slots, self.max_queue = slots, max_queue
        self.prefill_chunk, self.kv_bucket, self.prefix_reuse = prefill_chunk, kv_bucket, prefix_reuse
        model.setup_caches(slots, max_context)
        self.max_context = model.max_seq_len
        self.busy_rows_only = model.batch_invariant  # decode steps skip idle rows (module docstring)
        self.device = model.device
        self.eos_ids = tuple(model.config.eos_token_ids)
        self._waiting: collections.deque[Job] = collections.deque()
        self._active: dict[int, Job] = {}  # slot -> job (prefilling or decoding)
        self._prefilling: collections.deque[Job] = collections.deque()  # oldest first
        self._free = list(range(slots))
        self._row_prompt: list[list[int]] = [[] for _ in range(slots)]  # reusable whole chunks per row
        self._cond = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="spqr-engine", daemon=True)
        self._masks = MaskBatch()  # grammar masks of the next tokens, computed while the model step runs
        metrics.slots = slots

    # ---- client side (any thread) -------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        self._thread.join(timeout=10)
        self._masks.close()

    def submit(self, jobs: Sequence[Job]) -> None:
        """Queue `jobs` (all or none); 429 when the slots and the queue cannot hold them."""
        with self._cond:
            if len(self._waiting) + len(self._active) + len(jobs) > self.slots + self.max_queue:
                raise APIError(
                    429,
                    f"the server is busy: {self.slots} slots and a queue of {self.max_queue} are full; retry later",
                    type="rate_limit_error",
                    code="queue_full",
                )
            self._waiting.extend(jobs)
            self._publish()
            self._cond.notify_all()

    def cancel(self, jobs: Sequence[Job]) -> None:
        with self._cond:
            for job in jobs:
                job.cancelled = True
            self._cond.notify_all()

    def _publish(self) -> None:
        self.metrics.occupancy(queue_depth=len(self._waiting), busy_slots=len(self._active))

    # ---- engine thread ------------------------------------------------------------------------------
    def _run(self) -> None:
        with torch.inference_mode():
            while True:
                with self._cond:
                    self._drop_cancelled_waiting()
                    while not self._stopping and not self._waiting and not self._active:
                        self._cond.wait()
                        self._drop_cancelled_waiting()
                    if self._stopping:
                        break
                    admitted = []
                    while self._waiting and self._free:
                        job = self._waiting.popleft()
                        self._assign_row(job)
                        self._active[job.slot] = job
                        admitted.append(job)
                    self._publish()
                self._prefilling.extend(admitted)
                if self._prefilling:
                    job = self._prefilling[0]
                    self._guarded([job], self._prefill_step, job)
                    self._reap()
                decoding = [j for j in self._active.values() if j.state is not None and not j.state.finished]
                if decoding:
                    self._guarded(decoding, self._decode_step, decoding)
                    self._reap()
        for job in [*self._waiting, *self._active.values()]:
            job.sink(RuntimeError("the server is shutting down"))

    def _guarded(self, jobs: list[Job], fn: Callable[..., None], *args: object) -> None:
        """Run a model step; a failure (a bug) fails the jobs involved, never the engine thread."""
        try:
            fn(*args)
        except Exception as e:  # noqa: BLE001 - reported to the requests and logged
            log.exception("engine step failed")
            for job in jobs:
                if job.state is None or not job.state.finished:
                    job.sink(e)
                    job.cancelled = True
                    if job.state is not None:
                        job.state.finish_reason = "error"

    def _drop_cancelled_waiting(self) -> None:
        if any(j.cancelled for j in self._waiting):
            self._waiting = collections.deque(j for j in self._waiting if not j.cancelled)
            self._publish()

    def _reap(self) -> None:
        """Free the rows of finished and cancelled sequences."""
        with self._cond:
            for slot, job in list(self._active.items()):
                if job.cancelled and job.state is not None and not job.state.finished:
                    self.metrics.sequence_cancelled()
                    job.sink(self._final(job, job.state.finish("cancelled")))
                if job.cancelled or (job.state is not None and job.state.finished):
                    del self._active[slot]
                    self._free.append(slot)
            self._free.sort()
            self._prefilling = collections.deque(
                j for j in self._prefilling if not j.cancelled and j.state is None
            )
            self._publish()

    def _reusable(self, slot: int, job: Job) -> int:
        """Prompt tokens of `job` whose keys/values row `slot` holds: whole chunks, and never the last
        prompt token (its logits are needed). 0 when the prompt is scored (every position's logits are)."""
        if job.prompt_logprobs is not None or not self.prefix_reuse:
            return 0
        cached, ids = self._row_prompt[slot], job.prompt_ids
        n = 0
        limit = min(len(cached), len(ids) - 1)
        while n < limit and cached[n] == ids[n]:
            n += 1
        return n // self.prefill_chunk * self.prefill_chunk

    def _assign_row(self, job: Job) -> None:
        """Give `job` the free row with the most reusable tokens (ties: the one holding least, then the
        lowest), and start its prefill after them."""
        reusable = {s: self._reusable(s, job) for s in self._free}
        slot = max(self._free, key=lambda s: (reusable[s], -len(self._row_prompt[s]), -s))
        self._free.remove(slot)
        job.slot, job.reused = slot, reusable[slot]
        job.prefilled = job.reused
        self._row_prompt[slot] = job.prompt_ids[: job.reused]  # the rest of the row is overwritten from here

    def _prefill_step(self, job: Job) -> None:
        """Feed the next chunk of `job`'s prompt; after the last one, sample its first token."""
        ids, start = job.prompt_ids, job.prefilled
        part = ids[start : start + self.prefill_chunk]
        tokens = torch.tensor([part], dtype=torch.long, device=self.device)  # (1, T)
        positions = torch.arange(start, start + len(part), device=self.device)[None]  # (1, T)
        rows = torch.tensor([job.slot], device=self.device)  # (1,)
        score = job.prompt_logprobs is not None
        logits = self.model(tokens, positions, rows=rows, kv_len=start + len(part), last_only=not score)
        if score:  # logits (1, T, V): position i predicts prompt token start + i + 1
            job.prompt_info += self._score(logits[0], ids[start + 1 : start + len(part) + 1], job)
        job.prefilled += len(part)
        if job.prefilled < len(ids):
            return
        self._row_prompt[job.slot] = ids[: len(ids) // self.prefill_chunk * self.prefill_chunk]
        self.metrics.tokens(prompt=len(ids), cached=job.reused)
        job.state = SequenceState(self.tokenizer, ids, job.params, self.eos_ids, job.constraint)
        job.pos = len(ids)
        if job.score_only:
            chunk = job.state.finish("length")
            chunk.prompt_logprobs = job.prompt_info if score else None
            job.sink(self._final(job, chunk))
            return
        self._take(job, logits[0, -1])

    def _score(self, logits: Tensor, targets: list[int], job: Job) -> list[TokenLogprob]:
        """Log-probabilities of `targets` under the raw distributions `logits` (T, V), T >= len(targets)."""
        k = job.prompt_logprobs or 0
        lp = torch.log_softmax(logits[: len(targets)].float(), dim=-1)  # (N, V)
        chosen = lp.gather(1, torch.tensor(targets, device=lp.device)[:, None])[:, 0].tolist()  # (N,)
        if k > 0:
            vals, idx = torch.topk(lp, k, dim=-1)  # (N, k)
            top_vals, top_idx = vals.tolist(), idx.tolist()
        text = self.tokenizer.token_text
        out = []
        for n, token in enumerate(targets):
            top = [(i, text(i), v) for i, v in zip(top_idx[n], top_vals[n], strict=True)] if k > 0 else []
            out.append(TokenLogprob(token, text(token), chosen[n], top))
        return out

    def _decode_step(self, jobs: list[Job]) -> None:
        """Feed each job's last token at its position, then sample its next one. A batch-invariant model runs
        only these rows; otherwise idle rows run as dummies and the key length is padded (module docstring)."""
        need = max(j.pos for j in jobs) + 1
        if self.busy_rows_only:
            dummies: list[int] = []
            kv_len = need
        else:
            busy = {j.slot for j in jobs}
            dummies = [s for s in range(self.slots) if s not in busy]
            kv_len = min(self.max_context, -(-need // self.kv_bucket) * self.kv_bucket)
        rows = [j.slot for j in jobs] + dummies  # (B,)
        tokens = torch.tensor(
            [[j.last_token] for j in jobs] + [[0]] * len(dummies), device=self.device
        )  # (B, 1)
        last = self.max_context - 1  # dummies write here: see the module docstring
        positions = torch.tensor(
            [[j.pos] for j in jobs] + [[last]] * len(dummies), device=self.device
        )  # (B, 1)
        # constrained rows: their masks depend only on the tokens fed now, so they are computed meanwhile
        self._masks.start([j.constraint for j in jobs if j.constraint is not None])
        try:
            logits = self.model(tokens, positions, rows=torch.tensor(rows, device=self.device), kv_len=kv_len)
        finally:
            self._masks.wait()
        for i, job in enumerate(jobs):  # logits (B, 1, V)
            job.pos += 1
            self._guarded([job], self._take, job, logits[i, 0])  # a sampling failure fails only its job

    def _take(self, job: Job, logits: Tensor) -> None:
        """Sample the next token of `job` from its logits (V,) and send the text it releases."""
        state = job.state
        assert state is not None
        token, info = state.sample(logits)
        t = time.perf_counter()
        if job.generated == 0:
            self.metrics.observe_ttft(t - job.arrived)
        else:
            self.metrics.observe_tpot(t - job.last_time)
        job.last_time, job.last_token = t, token
        job.generated += 1
        self.metrics.tokens(generated=1)
        chunk = state.accept(token, info)
        if job.generated == 1 and job.prompt_logprobs is not None:
            chunk.prompt_logprobs = job.prompt_info
        if not state.finished and job.pos >= self.max_context:  # no room to feed this token back
            tail = state.finish("length")
            chunk.text += tail.text
            chunk.finish_reason = tail.finish_reason
        job.sink(self._final(job, chunk) if state.finished else chunk)

    def _final(self, job: Job, chunk: GenerationChunk) -> GenerationChunk:
        chunk.stats = GenerationStats(
            prompt_tokens=len(job.prompt_ids), cached_tokens=job.reused, completion_tokens=job.generated
        )
        return chunk
