"""Native CPU kernels: SpQR matmuls from the packed bytes and a whole-decoder forward (kernels/cpu), loaded
through ctypes (`lib`), with the weights in their CPU layout (`weights`, `embedding`) and the decoder that runs
on them (`decoder`). `configure_threads` sizes the one thread pool every command uses."""

from __future__ import annotations

import os

import torch


def default_threads() -> int:
    """The cores this process may run on (its CPU affinity), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # no sched_getaffinity (macOS)
        return max(1, os.cpu_count() or 1)


def configure_threads(threads: int | None = None, *, torch_work: bool = False) -> int:
    """Use `threads` threads (None: `default_threads()`) for this process's CPU work, in one pool.

    With the native kernels, their pool gets the threads and torch's intra-op pool gets one: the decode loop
    runs natively, and torch's OpenMP workers spinning between its own ops would otherwise take cores from
    the native workers (oversubscription: on a busy 2-core machine 2 threads fell below 1 thread's speed).
    Without the native kernels, or for torch-heavy work (`torch_work`: quantization), torch gets them too.
    Returns the thread count in effect."""
    from spqr_run.cpu import lib

    n = threads or default_threads()
    native = lib.load()
    if native is None or torch_work:
        torch.set_num_threads(n)
    if native is None:
        return n
    if not torch_work:
        torch.set_num_threads(1)
    return int(native.spqr_cpu_set_threads(n, -1))
