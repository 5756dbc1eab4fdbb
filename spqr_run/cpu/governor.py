"""`ThreadGovernor`: run decode steps on the whole thread pool or on one thread, whichever is faster now.

On a machine where other processes hold cores, a pool of N threads can be slower than one thread: a worker the
OS deschedules while it holds a chunk of a loop makes the caller wait for the rest of its time slice, and a
decode step runs a few hundred loops (measured on the 2-core box with one core kept busy by another process:
1 thread 106.8 tok/s, 2 threads 82.5, BENCHMARKS.md "CPU decode"). Which is faster depends on the load of the
moment, so it is measured, not guessed: the governor times every decode step (wall clock) in the current
mode, and every `interval` steps runs `probe_steps` steps in the other mode; when the faster of those beats
the median of the last `window` current-mode steps by `margin`, it switches. A probe that confirms the
current mode doubles the interval (up to `max_interval`), so a steady machine pays for few probes: at most
`probe_steps / min_interval` of the steps run in the slower mode (2 of 16 just after a switch, 2 of 256 once
settled). Steps are grouped by a key (the number of rows decoded together), whose costs differ.

The mode never changes results: a loop's output does not depend on how it is split into chunks
(`kernels/cpu/spqr_pool.c`; the kernel tests compare 1 and 2 threads bit for bit).
"""

from __future__ import annotations

import statistics
from collections import deque
from dataclasses import dataclass, field


@dataclass
class _State:
    serial: bool = False  # the current mode
    recent: deque[float] = field(default_factory=lambda: deque(maxlen=8))  # its step times (s)
    since_probe: int = 0  # current-mode steps since the last probe
    interval: int = 16
    probing: int = 0  # probe steps left to run
    probe_times: list[float] = field(default_factory=list)


class ThreadGovernor:
    """Chooses serial (one thread) or parallel (the pool) per decode step; see the module docstring.

    `choose(key)` -> True for serial; after the step, `observe(key, serial, seconds)` with what ran and its
    wall time in seconds."""

    def __init__(
        self,
        *,
        min_interval: int = 16,
        max_interval: int = 256,
        probe_steps: int = 2,
        window: int = 8,
        margin: float = 0.05,
    ) -> None:
        if not (1 <= probe_steps < min_interval <= max_interval) or window < 1 or not 0 <= margin < 1:
            raise ValueError(
                "ThreadGovernor: need 1 <= probe_steps < min_interval <= max_interval, window >= 1"
            )
        self.min_interval, self.max_interval = min_interval, max_interval
        self.probe_steps, self.window, self.margin = probe_steps, window, margin
        self.states: dict[int, _State] = {}
        self.switches = 0  # mode changes so far (all keys)

    def _state(self, key: int) -> _State:
        state = self.states.get(key)
        if state is None:
            state = self.states[key] = _State(recent=deque(maxlen=self.window), interval=self.min_interval)
        return state

    def choose(self, key: int) -> bool:
        """Whether the next step of `key` runs serially (on the calling thread alone)."""
        s = self._state(key)
        if not s.probing and s.since_probe >= s.interval and len(s.recent) == self.window:
            s.probing, s.probe_times = self.probe_steps, []
        return s.serial != bool(s.probing)

    def observe(self, key: int, serial: bool, seconds: float) -> None:
        """Record a step of `key` that ran `serial` (or not) and took `seconds` of wall time."""
        s = self._state(key)
        if serial == s.serial:
            s.recent.append(seconds)
            s.since_probe += 1
            return
        if not s.probing:  # not asked for (the caller ran the other mode anyway): ignore it
            return
        s.probe_times.append(seconds)
        s.probing -= 1
        if s.probing:
            return
        s.since_probe = 0
        if min(s.probe_times) < statistics.median(s.recent) * (1 - self.margin):
            s.serial = not s.serial
            s.recent = deque(s.probe_times, maxlen=self.window)
            s.interval = self.min_interval
            self.switches += 1
        else:
            s.interval = min(2 * s.interval, self.max_interval)

    def serial(self, key: int) -> bool:
        """The current mode of `key` (True: serial)."""
        return self._state(key).serial
