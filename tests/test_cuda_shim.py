"""The CUDA execution shim itself (kernels/testing/): CUDA semantics of barriers and warp collectives, poisoned
shared memory, thread orders, and one diagnostic per kind of fault, each naming the kernel's file and line.

The kernels are kernels/testing/shim_selftest.cu; they run in the build named by $SPQR_SHIM_BUILD (plain by
default), like tests/test_kernels.py.
"""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
import torch
from test_kernels import SHIM_BUILD, SHIM_MISSING, shim, shim_module

pytestmark = pytest.mark.skipif(SHIM_MISSING is not None, reason=f"CUDA shim unavailable: {SHIM_MISSING}")
SELFTEST = "shim_selftest.cu"


def line_of(text: str, after: str = "") -> int:
    """Line number in shim_selftest.cu of the first line containing `text` (below the first containing `after`)."""
    lines = (shim_module.HERE / SELFTEST).read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if after in line)
    return next(i + 1 for i, line in enumerate(lines) if i >= start and text in line)


def run(name: str, inp: torch.Tensor | None = None, n_out: int = 64, order: str = "forward", seed: int = 0):
    s = shim()
    s.configure(order, seed)
    try:
        return s.selftest(name, torch.arange(64.0) if inp is None else inp, n_out)
    finally:
        s.configure("forward")


def fault(name: str, inp: torch.Tensor | None = None) -> str:
    with pytest.raises(shim_module.ShimError) as info:
        run(name, inp)
    return str(info.value)


racy = pytest.mark.skipif(SHIM_BUILD == "tsan", reason="a deliberate race: the tsan build reports it (below)")


@pytest.mark.parametrize("order,seed", [("forward", 0), ("reverse", 0), ("random", 7)])
def test_block_reduction_with_barrier_is_exact_in_every_order(order, seed):
    x = torch.randn(1024)
    out = run("block_sum", x, 4, order, seed)
    torch.testing.assert_close(out, x.view(4, 256).sum(1), rtol=1e-5, atol=1e-4)


@racy
def test_a_missing_barrier_reads_poisoned_shared_memory():
    """Without __syncthreads thread 0 reads warp sums not written yet: NaN (poison) in forward order."""
    out = run("block_sum_no_barrier", torch.ones(1024), 4)
    assert out.isnan().all()


def test_shared_memory_is_poisoned_before_each_block():
    assert run("read_unwritten_shared").isnan().all()
    # every __shared__ array of every kernel instantiation was found: 9 (wbits, stat_bits) pairs, 32 KiB of x
    # each in the matvec kernel and in both small-batch kernels
    assert shim().shared_bytes() >= 27 * 32 * 1024


def test_shuffle_and_vote_lane_arithmetic():
    """Lane l holds l: the PTX ISA's shfl.sync (idx, up, down, bfly with width) and vote results."""
    out = run("shuffles", torch.arange(32.0), 8 * 32).view(8, 32).long()
    lanes = torch.arange(32)
    seg8 = lanes // 8 * 8
    assert out[0].tolist() == [5] * 32
    assert out[1].tolist() == torch.where(lanes >= 3, lanes - 3, lanes).tolist()
    assert out[2].tolist() == torch.where(lanes + 3 < 32, lanes + 3, lanes).tolist()
    assert out[3].tolist() == (lanes ^ 6).tolist()
    assert out[4].tolist() == (lanes ^ 1).tolist()
    assert out[5].tolist() == torch.where(lanes - seg8 + 2 < 8, lanes + 2, lanes).tolist()
    assert out[6].tolist() == [0xFFFF] * 32  # ballot of lanes 16..31, shifted down by 16
    assert out[7].tolist() == [3] * 32  # any (lane 31) + 2 * all


@racy  # the ticket counter is a deliberate race (the shim's fibers never run at the same time)
@pytest.mark.parametrize(
    "order,expected",
    [("forward", list(range(64))), ("reverse", list(range(63, -1, -1)))],
)
def test_thread_order(order, expected):
    assert run("start_order", order=order).long().tolist() == expected


@racy
def test_random_order_is_seeded():
    a = run("start_order", order="random", seed=5).long().tolist()
    assert a == run("start_order", order="random", seed=5).long().tolist()
    assert a != run("start_order", order="random", seed=6).long().tolist()
    assert sorted(a) == list(range(64)) and a != list(range(64))


# ---- diagnostics: kind, place (file:line), thread ------------------------------------------------------------
def test_barrier_some_threads_never_reach():
    msg = fault("barrier_in_divergent_code")
    assert "divergent __syncthreads" in msg and "exited while 16 threads" in msg
    assert f"{SELFTEST}:{line_of('if (threadIdx.x < 16) __syncthreads();')}" in msg


def test_barrier_reached_after_others_exited():
    msg = fault("barrier_after_exit")
    assert "reached after 1 threads of the block exited" in msg and "thread (0,0,0)" in msg
    assert f"{SELFTEST}:{line_of('if (threadIdx.x == 0) return;') + 1}" in msg


def test_two_different_barriers():
    msg = fault("two_different_barriers")
    first = line_of("if (threadIdx.x & 1) {") + 1
    assert "different __syncthreads" in msg
    assert f"{SELFTEST}:{first}" in msg and f"{SELFTEST}:{first + 2}" in msg


def test_shuffle_in_divergent_code():
    msg = fault("shuffle_in_divergent_code")
    assert "collective mask mismatch" in msg and "__shfl_xor_sync(mask 0xffffffff)" in msg
    assert f"{SELFTEST}:{line_of('if (threadIdx.x < 16) v = __shfl_xor_sync(0xffffffffu, v, 1);')}" in msg


def test_deadlock_names_both_wait_points():
    msg = fault("shuffle_then_barrier_deadlock")
    line = line_of("if (threadIdx.x != 31) v = __shfl_xor_sync")
    assert msg.count("deadlock") == 1 and "lane 31" in msg
    assert f"{SELFTEST}:{line}" in msg and f"__syncthreads at {SELFTEST}:{line + 1}" in msg


def test_shuffle_mask_without_the_calling_lane():
    msg = fault("shuffle_mask_without_caller")
    assert "mask 0x0000ffff does not include the calling lane 16" in msg
    assert f"{SELFTEST}:{line_of('out[threadIdx.x] = __shfl_xor_sync(0x0000ffffu')}" in msg


def test_shuffle_reading_a_lane_outside_the_mask():
    msg = fault("shuffle_reads_outside_mask")
    assert re.search(r"lane \d+ reads lane \d+, which is not in the mask", msg)


def test_misaligned_vector_load():
    msg = fault("misaligned_ldg")
    assert "misaligned vector load" in msg and "16-byte type" in msg
    assert f"{SELFTEST}:{line_of('__ldg(reinterpret_cast<const float4*>(in + 1))')}" in msg


no_faults_under_tsan = pytest.mark.skipif(
    SHIM_BUILD == "tsan",
    reason="ThreadSanitizer's signal interception: memory faults are the plain/asan builds' checks",
)


@no_faults_under_tsan
def test_read_past_the_end_of_a_buffer():
    """Every buffer ends at a guard page: one element too far faults, and the message names the buffer."""
    msg = fault("read_past_end", torch.arange(32.0))
    assert "read past the end of 'in' (128 bytes), 0 bytes beyond it" in msg and "thread (31,0,0)" in msg


@no_faults_under_tsan
def test_write_into_an_input():
    assert "a write into the read-only input 'in'" in fault("write_into_input", torch.arange(32.0))


def test_the_shim_recovers_after_a_fault():
    fault("misaligned_ldg")
    x = torch.randn(1024)
    torch.testing.assert_close(run("block_sum", x, 4), x.view(4, 256).sum(1), rtol=1e-5, atol=1e-4)


def test_unknown_build_and_order_are_one_line_errors():
    with pytest.raises(ValueError, match="unknown thread order 'sideways'"):
        shim().configure("sideways")
    with pytest.raises(shim_module.ShimUnavailable, match="SPQR_SHIM_BUILD='msan'"):
        shim_module.load("msan")


@pytest.mark.skipif(SHIM_BUILD != "tsan", reason="the race detector runs in the tsan build (.ci/kernel-shim)")
@pytest.mark.parametrize(
    "kernel,racing_line",
    [
        ("block_sum_no_barrier", "if ((threadIdx.x & 31) == 0) warp_sums[threadIdx.x >> 5] = v;"),
        ("shared_race", "if (threadIdx.x < 2) cell = static_cast<float>(threadIdx.x);"),
    ],
)
def test_race_detector_reports_unordered_shared_memory(kernel, racing_line):
    """Barriers are the only happens-before edges between a block's threads: ThreadSanitizer reports the read
    of a warp sum without __syncthreads, and two threads writing one shared word, at their lines."""
    assert shim().build == "tsan"
    code = (
        "import sys, torch; sys.path.insert(0, sys.argv[1]); import shim; "
        "shim.load('tsan').selftest(sys.argv[2], torch.ones(1024), 64)"
    )
    env = shim_module.preload_env("tsan")
    env["TSAN_OPTIONS"] = "halt_on_error=1:report_signal_unsafe=0"
    res = subprocess.run(
        [sys.executable, "-c", code, str(shim_module.HERE), kernel], env=env, capture_output=True, text=True
    )
    assert res.returncode != 0
    assert "ThreadSanitizer: data race" in res.stderr
    assert f"{SELFTEST}:{line_of(racing_line, after=f'__global__ void {kernel}(')}" in res.stderr
