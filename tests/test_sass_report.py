"""benchmarks/sass_report.py without a GPU or nvcc: its reading of the source, mangled names, SASS loops and the
rules for weights per iteration and targets, on small hand-written inputs."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

# loaded by path: benchmarks/ on sys.path would shadow installed packages (its kernels.py is not Hugging Face's
# `kernels`, which transformers imports)
_spec = importlib.util.spec_from_file_location(
    "sass_report", Path(__file__).resolve().parents[1] / "benchmarks" / "sass_report.py"
)
sr = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = sr  # dataclasses look their module up there
_spec.loader.exec_module(sr)

SOURCE = """
constexpr int kWarps = 4;
constexpr int kRows = 16;
constexpr int kBig = kWarps * kRows + 1;
template <int W, int SB, int NT>
__global__ void __launch_bounds__(kWarps * 32)
    spqr_matmul_small_kernel(const SpqrLayer layer) {}
template <int W, int SB>
__global__ void spqr_dequantize_kernel(const SpqrLayer layer, __half* w) {}
void launch() {
  SPQR_LAUNCH(grid, kWarps * 32, 0, stream, spqr_matmul_small_kernel<W, SB, 1>)(layer);
  const dim3 block(8, kRows);
  SPQR_LAUNCH(grid, block, 0, stream, spqr_dequantize_kernel<W, SB>)(layer, w);
}
"""


def test_kernel_sources_and_block_sizes_come_from_the_source():
    srcs = sr.kernel_sources(SOURCE)
    consts = sr.source_constants(SOURCE)
    assert consts == {"kWarps": 4, "kRows": 16, "kBig": 65}
    assert srcs["spqr_matmul_small_kernel"].params == ["W", "SB", "NT"]
    assert srcs["spqr_dequantize_kernel"].params == ["W", "SB"]
    small = sr.Kernel("80", "", "spqr_matmul_small_kernel", [3, 3, 1])
    deq = sr.Kernel("80", "", "spqr_dequantize_kernel", [3, 3])
    assert sr.block_threads(small, srcs["spqr_matmul_small_kernel"], consts, SOURCE) == 128
    assert sr.block_threads(deq, srcs["spqr_dequantize_kernel"], consts, SOURCE) == 128


def test_eval_int_takes_only_arithmetic():
    assert sr.eval_int("(kA + 3) * 2 / 4", {"kA": 5}) == 4
    assert sr.eval_int("kMissing * 2", {}) is None
    assert sr.eval_int("__import__('os')", {}) is None


@pytest.mark.parametrize(
    "mangled,name,args",
    [
        ("_Z24spqr_matmul_small_kernelILi3ELi3ELi1EEv9SpqrLayerPK6__half", "spqr_matmul_small_kernel", [3, 3, 1]),
        ("_ZN47_GLOBAL__N__7a7ca757_14_spqr_matmul_cu_c84c868218spqr_matvec_kernelILi2ELi4EEEv9SpqrLayer",
         "spqr_matvec_kernel", [2, 4]),
        ("_Z1kILin2EEvv", "k", [-2]),
        ("_Z6kernelPf", "kernel", []),
    ],
)  # fmt: skip
def test_parse_mangled(mangled, name, args):
    assert sr.parse_mangled(mangled) == (name, args)


def sass(lines: list[str]) -> list[tuple[int, str]]:
    return [(16 * i, t) for i, t in enumerate(lines)]


# An outer loop (0x10 .. 0xb0) around an inner mma loop (0x30 .. 0x90), and a later FFMA-only loop.
LISTING = sass(
    [
        "MOV R1, c[0x0][0x28]",  # 0x00
        "LDG.E.128 R4, [R2.64]",  # 0x10  outer loop starts
        "BAR.SYNC.DEFER_BLOCKING 0x0",  # 0x20
        "DEPBAR.LE SB0, 0x2",  # 0x30  inner loop starts
        "LDGSTS.E.BYPASS.128 [R5], [R2.64]",  # 0x40
        "LOP3.LUT R8, R9, 0xf000f, RZ, 0xc0, !PT",  # 0x50
        "HFMA2 R8, R8, R10, R11",  # 0x60
        "LDSM.16.M88.4 R12, [R14]",  # 0x70
        "HMMA.16816.F32 R16, R8, R12, R16",  # 0x80
        "@P0 BRA 0x30",  # 0x90  inner loop ends
        "HMMA.16816.F32 R20, R8, R12, R20",  # 0xa0
        "@P1 BRA 0x10",  # 0xb0  outer loop ends
        "FFMA R1, R2, R3, R1",  # 0xc0
        "FFMA R1, R2, R3, R1",  # 0xd0
        "@P2 BRA 0xc0",  # 0xe0
        "EXIT",
    ]
)


def test_hot_loop_is_the_mma_loop_and_its_stats():
    body, is_loop = sr.hot_loop(LISTING)
    assert is_loop
    # both loops have HMMA; the outer has 2, the inner 1: the most HMMA wins
    assert body[0].startswith("LDG.E.128") and body[-1] == "@P1 BRA 0x10"
    st = sr.loop_stats(body, is_loop)
    assert st.counts == {"HMMA": 2, "LOP3": 1, "HFMA2": 1, "I2F": 0, "SHFL": 0}
    assert st.gload_widths == "128" and st.loads_first == "yes"
    assert st.order == "G1 W2 G1 M1 S1 M2"
    k = sr.Kernel("80", "", "spqr_matmul_small_kernel", [3, 3, 2])
    w, rule = sr.weights_per_iter(k, ["W", "SB", "NT"], st)
    assert (w, rule) == (8 * 2 / 2, "mma")  # two HMMAs on NT = 2 n-tiles: one 16x16 tile, 8 weights a thread
    assert sr.target_of(k, ["W", "SB", "NT"], rule) == 2.5
    assert sr.target_of(sr.Kernel("80", "", "x", [4, 4, 1]), ["W", "SB", "NT"], rule) == 2.0
    assert sr.target_of(sr.Kernel("80", "", "x", [2, 2, 1]), ["W", "SB", "NT"], rule) is None


def test_the_innermost_loop_wins_a_tie_and_ffma_loops_without_mma():
    tie = sass(["NOP", "HMMA.16816.F32 R0, R2, R4, R0", "@P0 BRA 0x10", "IADD3 R1, R1, 1, RZ", "@P1 BRA 0x0"])
    assert sr.hot_loop(tie)[0] == ["HMMA.16816.F32 R0, R2, R4, R0", "@P0 BRA 0x10"]
    ffma = sass(["MOV R0, RZ", "FFMA R1, R2, R3, R1", "@P0 BRA 0x10", "EXIT"])
    body, is_loop = sr.hot_loop(ffma)
    assert is_loop and body == ["FFMA R1, R2, R3, R1", "@P0 BRA 0x10"]


def test_dequantize_weights_are_its_wide_fp16_stores_and_no_loop_is_the_whole_kernel():
    listing = sass(["LDG.E.128 R4, [R2.64]", "HFMA2 R4, R4, R5, R6", "STG.E.64 [R8.64], R4",
                    "STG.E [R10.64], R6", "STG.E.U16 [R12.64], R7", "EXIT"])  # fmt: skip
    body, is_loop = sr.hot_loop(listing)
    assert not is_loop and len(body) == 6
    st = sr.loop_stats(body, is_loop)
    k = sr.Kernel("80", "", "spqr_dequantize_kernel", [3, 3])
    assert sr.weights_per_iter(k, ["W", "SB"], st) == ((8 + 4) / 2, "stores")  # the 16-bit patch not counted
    assert sr.target_of(k, ["W", "SB"], "stores") is None


def test_occupancy_formula():
    # 128 threads, 56 registers, 14084 B shared on sm_80: registers allow 9 blocks (1792 per warp), shared
    # memory 11, threads 16, the block limit 32
    k = sr.Kernel("80", "", "k", [], regs=56, smem=14084)
    assert sr.occupancy(k, 128) == (9, 9 * 4 * 32 / 2048)
    assert sr.occupancy(k, None) is None
