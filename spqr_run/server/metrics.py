"""Server metrics in the Prometheus text exposition format (no client library needed).

Counters: requests by route and status, prompt and generated tokens. Gauges: queue depth, busy slots.
Histograms: time to first token and time per output token. Updated from the engine thread and the event loop,
so every update takes one lock.
"""

from __future__ import annotations

import bisect
import threading
from collections import Counter

TTFT_BUCKETS = (0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
TPOT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class Histogram:
    """Cumulative-bucket histogram: `observe(x)`, rendered as `_bucket{le=...}`, `_sum` and `_count`."""

    def __init__(self, buckets: tuple[float, ...]) -> None:
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)  # last one is +Inf
        self.sum = 0.0
        self.count = 0

    def observe(self, x: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, x)] += 1
        self.sum += x
        self.count += 1

    def render(self, name: str) -> list[str]:
        lines, total = [], 0
        for le, c in zip([*map(str, self.buckets), "+Inf"], self.counts, strict=True):
            total += c
            lines.append(f'{name}_bucket{{le="{le}"}} {total}')
        return [*lines, f"{name}_sum {self.sum:.6f}", f"{name}_count {self.count}"]


class Metrics:
    """All server counters; `render()` gives the /metrics body."""

    def __init__(self, slots: int = 0) -> None:
        self._lock = threading.Lock()
        self.requests: Counter[tuple[str, int]] = Counter()
        self.prompt_tokens = 0
        self.cached_prompt_tokens = 0  # of prompt_tokens: reused from a row's previous prompt
        self.generation_tokens = 0
        self.queue_depth = 0
        self.busy_slots = 0
        self.slots = slots
        self.cancelled = 0
        self.ttft = Histogram(TTFT_BUCKETS)
        self.tpot = Histogram(TPOT_BUCKETS)
        self.gpu_kernels: tuple[str, str] | None = (
            None  # (path, reason) of the model's GPU kernels, when on a GPU
        )

    def request_done(self, route: str, status: int) -> None:
        with self._lock:
            self.requests[(route, status)] += 1

    def tokens(self, *, prompt: int = 0, generated: int = 0, cached: int = 0) -> None:
        with self._lock:
            self.prompt_tokens += prompt
            self.generation_tokens += generated
            self.cached_prompt_tokens += cached

    def occupancy(self, *, queue_depth: int, busy_slots: int) -> None:
        with self._lock:
            self.queue_depth, self.busy_slots = queue_depth, busy_slots

    def observe_ttft(self, seconds: float) -> None:
        with self._lock:
            self.ttft.observe(seconds)

    def observe_tpot(self, seconds: float) -> None:
        with self._lock:
            self.tpot.observe(seconds)

    def sequence_cancelled(self) -> None:
        with self._lock:
            self.cancelled += 1

    def render(self) -> str:
        with self._lock:
            out = [
                "# HELP spqr_requests_total HTTP requests answered, by route and status.",
                "# TYPE spqr_requests_total counter",
            ]
            for (route, status), n in sorted(self.requests.items()):
                out.append(f'spqr_requests_total{{route="{route}",status="{status}"}} {n}')
            simple = [
                ("spqr_prompt_tokens_total", "counter", "Prompt tokens processed.", self.prompt_tokens),
                (
                    "spqr_prompt_tokens_cached_total",
                    "counter",
                    "Prompt tokens whose keys/values were reused from an earlier prompt (not recomputed).",
                    self.cached_prompt_tokens,
                ),
                ("spqr_generation_tokens_total", "counter", "Tokens generated.", self.generation_tokens),
                (
                    "spqr_sequences_cancelled_total",
                    "counter",
                    "Sequences cancelled by a client.",
                    self.cancelled,
                ),
                ("spqr_queue_depth", "gauge", "Sequences waiting for a free slot.", self.queue_depth),
                ("spqr_slots_busy", "gauge", "Slots generating a sequence.", self.busy_slots),
                ("spqr_slots_total", "gauge", "Slots (KV-cache rows).", self.slots),
            ]
            for name, kind, doc, value in simple:
                out += [f"# HELP {name} {doc}", f"# TYPE {name} {kind}", f"{name} {value}"]
            if self.gpu_kernels is not None:
                path, reason = (_label(v) for v in self.gpu_kernels)
                out += ["# HELP spqr_gpu_kernels The GPU kernel path the SpQR layers take (prebuilt cubin, NVRTC "
                        "cache, reference) and why: 1 for the one in use.", "# TYPE spqr_gpu_kernels gauge",
                        f'spqr_gpu_kernels{{path="{path}",reason="{reason}"}} 1']  # fmt: skip
            for name, doc, hist in (
                ("spqr_time_to_first_token_seconds", "Request arrival to first token.", self.ttft),
                ("spqr_time_per_output_token_seconds", "Time between consecutive tokens.", self.tpot),
            ):
                out += [f"# HELP {name} {doc}", f"# TYPE {name} histogram", *hist.render(name)]
        return "\n".join(out) + "\n"


def _label(value: str) -> str:
    """A Prometheus label value: backslash, double quote and newline escaped."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
