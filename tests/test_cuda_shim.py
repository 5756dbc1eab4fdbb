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
    # every instantiation of a template kernel has its own __shared__ array: each one is found and poisoned
    for name in ("read_unwritten_shared", "read_unwritten_shared_2", "read_unwritten_shared_3"):
        assert run(name).isnan().all(), name
    # ... and counted (with the other self-test kernels' arrays and the SpQR kernels')
    assert shim().shared_bytes() >= (1 + 2 + 3) * 64 * 4 + 4 * 448 + 4 * 128


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


def test_shuffle_source_lane_may_differ_between_lanes():
    """shfl.sync takes each lane's own source lane (and bfly its own lane mask)."""
    x = torch.arange(32.0) * 3 + 1
    out = run("shuffle_per_lane_source", x, 64)
    lanes = torch.arange(32)
    assert out[:32].tolist() == x[(7 * lanes + 3) % 32].tolist()
    assert out[32:].tolist() == x[lanes ^ (lanes & 7)].tolist()


# ---- PTX primitives (kernels/spqr_ptx.cuh) against plain computations ------------------------------------------
# The fragment layouts below are written from the PTX ISA documentation ("Matrix Fragments for
# mma.m16n8k16 with floating point type", "ldmatrix"), element by element, independently of the shim's code.
def as_f32(words: torch.Tensor) -> torch.Tensor:
    """uint32 values (in an int64 tensor) -> float32 tensor with those bits."""
    words = words.to(torch.int64) & 0xFFFFFFFF
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32).view(torch.float32)


def as_u32(f: torch.Tensor) -> torch.Tensor:
    """float32 tensor -> its bits as uint32 values in an int64 tensor."""
    return f.contiguous().view(torch.int32).to(torch.int64) & 0xFFFFFFFF


def half_bits(h: torch.Tensor) -> torch.Tensor:
    return h.contiguous().view(torch.int16).to(torch.int64) & 0xFFFF


def mma_registers(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """(32, 10) register words of one warp for A (16, 16) fp16, B (16, 8) fp16, C (16, 8) fp32: the f16x2
    registers a0..a3 (elements a0..a7), b0, b1 (elements b0..b3), then the f32 c0..c3."""
    ab, bb, cb = half_bits(a), half_bits(b), as_u32(c)
    regs = torch.zeros(32, 10, dtype=torch.int64)
    for lane in range(32):
        group, tig = lane // 4, lane % 4  # groupID, threadID_in_group
        for i in range(8):  # element ai is in register i // 2, half i % 2
            row = group if i in (0, 1, 4, 5) else group + 8
            col = tig * 2 + (i & 1) + (8 if i >= 4 else 0)
            regs[lane, i // 2] |= ab[row, col] << (16 * (i % 2))
        for i in range(4):  # element bi
            row = tig * 2 + (i & 1) + (8 if i >= 2 else 0)
            regs[lane, 4 + i // 2] |= bb[row, group] << (16 * (i % 2))
        for i in range(4):  # ci
            regs[lane, 6 + i] = cb[group if i < 2 else group + 8, tig * 2 + (i & 1)]
    return regs


def mma_result(d: torch.Tensor) -> torch.Tensor:
    """(32, 4) fp32 d0..d3 of one warp -> D (16, 8)."""
    out = torch.full((16, 8), float("nan"))
    for lane in range(32):
        group, tig = lane // 4, lane % 4
        for i in range(4):
            out[group if i < 2 else group + 8, tig * 2 + (i & 1)] = d[lane, i]
    return out


def run_mma(mats: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], order: str = "forward") -> list:
    """One mma per warp of the ptx_mma kernel (two warps)."""
    regs = torch.cat([mma_registers(*m) for m in mats])
    out = run("ptx_mma", as_f32(regs.flatten()), 4 * 64, order=order, seed=3).view(64, 4)
    return [mma_result(out[32 * w : 32 * w + 32]) for w in range(2)]


def test_mma_m16n8k16_exact_on_small_integers():
    """Small integers: every product and sum is exact, so D must equal A B + C bit for bit (any layout slip
    moves an element)."""
    g = torch.Generator().manual_seed(0)
    mats = [
        (
            torch.randint(-8, 9, (16, 16), generator=g).half(),
            torch.randint(-8, 9, (16, 8), generator=g).half(),
            torch.randint(-100, 101, (16, 8), generator=g).float(),
        )
        for _ in range(2)
    ]
    for (a, b, c), d in zip(mats, run_mma(mats, order="random"), strict=True):
        assert torch.equal(d, a.float() @ b.float() + c)


def test_mma_m16n8k16_random_fp16_within_the_fp32_accumulation_bound():
    g = torch.Generator().manual_seed(1)
    mats = [
        (
            (torch.randn(16, 16, generator=g) * 4).half(),
            torch.randn(16, 8, generator=g).half(),
            torch.randn(16, 8, generator=g) * 10,
        )
        for _ in range(2)
    ]
    for (a, b, c), d in zip(mats, run_mma(mats), strict=True):
        ref = a.double() @ b.double() + c.double()
        # fp32 accumulation of 16 exact products and C: at most 17 roundings of 2^-24 of the running magnitude
        bound = 17 * 2.0**-24 * (a.double().abs() @ b.double().abs() + c.double().abs())
        assert ((d.double() - ref).abs() <= bound).all()
        torch.testing.assert_close(d, a.float() @ b.float() + c, rtol=1e-5, atol=1e-4)  # torch fp32 matmul


def test_ldmatrix_fragments_of_a_known_shared_matrix():
    g = torch.Generator().manual_seed(2)
    halves = torch.randint(0, 2**16, (32, 8), generator=g)  # 32 rows of 8 b16 in shared memory
    words = halves[:, 0::2] | halves[:, 1::2] << 16
    row_of_lane = torch.randperm(32, generator=g)  # lane i gives the address of shared row row_of_lane[i]
    inp = torch.cat([as_f32(words.flatten()), row_of_lane.float()])
    out = as_u32(run("ptx_ldmatrix", inp, 320))
    x4, x2, x4t = out[:128].view(32, 4), out[128:192].view(32, 2), out[192:].view(32, 4)

    def matrix(j: int) -> torch.Tensor:  # matrix j (8x8): row r at the address lane 8j + r gave
        return halves[row_of_lane[8 * j : 8 * j + 8]]

    for lane in range(32):
        r, c = lane // 4, 2 * (lane % 4)  # thread i holds row i / 4, elements 2 (i % 4), +1
        for j in range(4):
            m = matrix(j)
            assert x4[lane, j] == m[r, c] | m[r, c + 1] << 16
            assert x4t[lane, j] == m.T[r, c] | m.T[r, c + 1] << 16
            if j < 2:
                assert x2[lane, j] == m[r, c] | m[r, c + 1] << 16


def test_cp_async_lands_at_the_wait():
    x = torch.randn(448)
    assert torch.equal(as_u32(run("ptx_cp_async_wait", x, 448, order="random", seed=4)), as_u32(x))


def test_cp_async_without_the_wait_reads_poison():
    out = as_u32(run("ptx_cp_async_no_wait", torch.randn(448), 448))
    assert (out == 0xFFFFFFFF).all()


def test_cp_async_wait_group_1_leaves_the_newest_group_in_flight():
    x = torch.randn(448)
    out = as_u32(run("ptx_cp_async_two_groups", x, 448))
    assert torch.equal(out[:256], as_u32(x[:256]))  # the first group (16-byte copies) has landed
    assert (out[256:] == 0xFFFFFFFF).all()  # the second is still in flight: poisoned destination


def test_lop3_all_256_luts_against_the_truth_table():
    g = torch.Generator().manual_seed(5)
    abc = torch.randint(0, 2**32, (32, 3), generator=g)
    abc[0] = torch.tensor([0xF0, 0xCC, 0xAA])  # the defining inputs: lop3 gives the LUT itself
    out = as_u32(run("ptx_lop3", as_f32(abc.flatten()), 256 * 32)).view(256, 32)
    bit = torch.arange(32)
    index = ((abc[:, 0:1] >> bit) & 1) * 4 + ((abc[:, 1:2] >> bit) & 1) * 2 + ((abc[:, 2:3] >> bit) & 1)
    for lut in range(256):
        expected = (((lut >> index) & 1) << bit).sum(1)
        assert torch.equal(out[lut], expected), f"LUT 0x{lut:02x}"
    assert (out[:, 0] & 0xFF).tolist() == list(range(256))


def test_prmt_default_mode():
    g = torch.Generator().manual_seed(6)
    abs_ = torch.randint(0, 2**32, (32, 3), generator=g)
    abs_[:8, 2] = torch.tensor([0x3210, 0x7654, 0x5410, 0x7632, 0x0000, 0x8888, 0xFB73, 0x1111_4321])
    abs_[8:, 0] |= 0x80808080 * (torch.arange(24) % 2)  # sign bits for the replicate mode
    out = as_u32(run("ptx_prmt", as_f32(abs_.flatten()), 32))
    for lane in range(32):
        a, b, sel = abs_[lane].tolist()
        src = [(a >> (8 * i)) & 0xFF for i in range(4)] + [(b >> (8 * i)) & 0xFF for i in range(4)]
        expected = 0
        for i in range(4):
            nibble = (sel >> (4 * i)) & 0xF
            byte = src[nibble & 7]
            if nibble & 8:
                byte = 0xFF if byte & 0x80 else 0
            expected |= byte << (8 * i)
        assert out[lane].item() == expected, f"lane {lane}: prmt(0x{a:08x}, 0x{b:08x}, 0x{sel:x})"


def test_mma_in_divergent_code_is_diagnosed():
    msg = fault("mma_in_divergent_code")
    assert "collective mask mismatch" in msg and "mma_m16n8k16_f16f32(mask 0xffffffff)" in msg
    assert f"{SELFTEST}:{line_of('if (threadIdx.x < 16) mma_m16n8k16_f16f32(d, a, b, c);')}" in msg


def test_mma_at_two_places_is_diagnosed():
    msg = fault("mma_at_two_places")
    first = line_of("mma_m16n8k16_f16f32(d, a, b, c);", after="void mma_at_two_places(")
    assert "collective mask mismatch" in msg
    assert f"{SELFTEST}:{first}" in msg and f"{SELFTEST}:{first + 2}" in msg


@pytest.mark.parametrize(
    "kernel,message,line",
    [
        ("ldmatrix_misaligned", "ldmatrix_x4: row address", "ldmatrix_x4(r, &rows[4 * threadIdx.x + 1]);"),
        ("ldmatrix_from_global", "is not inside a __shared__ variable", "ldmatrix_x2(r, in + 4"),
        ("cp_async_misaligned", "misaligned cp_async_16", "cp_async_16(&buf[4 * threadIdx.x], &in[4"),
        (
            "cp_async_into_global",
            "cp_async_4: destination",
            "cp_async_4(&out[threadIdx.x], &in[threadIdx.x]);",
        ),
    ],
)
def test_primitive_faults_name_the_line(kernel, message, line):
    msg = fault(kernel, torch.arange(256.0))
    assert message in msg and f"{SELFTEST}:{line_of(line)}" in msg
