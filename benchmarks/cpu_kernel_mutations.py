"""Mutation check of the native CPU kernels' tests: inject one fault at a time into a copy of kernels/cpu, build
that copy (spqr_run/cpu/build.py), and run tests/test_cpu_kernels.py and tests/test_cpu_decoder.py against it
(SPQR_CPU_LIB). A mutant is caught when that run fails. Prints a markdown table.

    python benchmarks/cpu_kernel_mutations.py                  # every mutation
    python benchmarks/cpu_kernel_mutations.py --only q8_scale_row

MUTATIONS is data: a mutation whose text is not in its file exactly once (the kernels changed) is reported
"n/a"; update the entries when the kernels change.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
KERNELS = ROOT / "kernels" / "cpu"
sys.path.insert(0, str(ROOT))
from spqr_run.cpu.build import build_library  # noqa: E402

TESTS = ("tests/test_cpu_kernels.py", "tests/test_cpu_decoder.py")
TIMEOUT_S = 300  # the unmutated tests take ~15 s

# name -> (file, what it does, exact text, replacement)
MUTATIONS = {
    "avx512_b3_spread_bit": (
        "spqr_matmul_avx512.c",
        "3-bit AVX-512: bit 2 of quad 2 taken from bit 5 of chunk C instead of bit 6",
        "_mm512_srli_epi16(A, 6), _mm512_srli_epi16(C, 4), m3, 0xE4",
        "_mm512_srli_epi16(A, 6), _mm512_srli_epi16(C, 3), m3, 0xE4",
    ),
    "avx512_b4_nibble_order": (
        "spqr_matmul_avx512.c",
        "4-bit AVX-512: the two quads of a chunk swapped (high nibble read first)",
        "    q[0] = _mm512_and_si512(x, m);\n    q[1] = _mm512_and_si512(_mm512_srli_epi16(x, 4), m);",
        "    q[1] = _mm512_and_si512(x, m);\n    q[0] = _mm512_and_si512(_mm512_srli_epi16(x, 4), m);",
    ),
    "avx512_zero_stat_product": (
        "spqr_matmul_avx512.c",
        "AVX-512: the zero's offset uses z.zero alone instead of z.scale * z.zero (second-order numbers)",
        "_mm512_set1_ps(pq[16 + 4 * j + 3])",
        "_mm512_set1_ps(pq[4 * j + 3])",
    ),
    "avx2_zero_code_shift": (
        "spqr_matmul_avx2.c",
        "AVX2: zero codes read from bits 3..6 of the stat byte instead of 4..7",
        "zc[h] = _mm256_cvtepi32_ps(_mm256_srli_epi32(v, 4));",
        "zc[h] = _mm256_cvtepi32_ps(_mm256_srli_epi32(v, 3));",
    ),
    "portable_b2_plane": (
        "spqr_matmul.c",
        "portable: 2-bit quads read at bit 2*(quad & 1) instead of 2*(quad & 3)",
        "v = (c[64 * (quad >> 2) + n] >> (2 * (quad & 3))) & 3;",
        "v = (c[64 * (quad >> 2) + n] >> (2 * (quad & 1))) & 3;",
    ),
    "dropped_outlier": (
        "spqr_matmul.c",
        "epilogue: the last outlier of every row is skipped",
        "k < w->outlier_row_ptr[r + 1]; k++)",
        "k < w->outlier_row_ptr[r + 1] - 1; k++)",
    ),
    "activation_truncation": (
        "spqr_matmul.c",
        "activation quantization truncates instead of rounding to nearest",
        "float q = nearbyintf(v[k] * inv);",
        "float q = truncf(v[k] * inv);",
    ),
    "q8_scale_row": (
        "spqr_matmul_avx512.c",
        "Q8 AVX-512: the 64-column scales of the first row used for all 16 rows of a tile",
        "_mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(scales + 16 * kb)))",
        "_mm512_set1_ps(spqr_half_to_float(scales[16 * kb]))",
    ),
    "repack_stat_kind": (
        "spqr_repack.c",
        "repack: scale and zero codes swapped in the stat byte",
        "grp[row] |= (uint8_t)(v << (4 * kind));",
        "grp[row] |= (uint8_t)(v << (4 * (1 - kind)));",
    ),
    "repack_code3_slot": (
        "spqr_repack.c",
        "repack: 3-bit slot (w, i) read at 3i + 1",
        "v = (w3[w] >> (16 * c + 3 * i)) & 7;",
        "v = (w3[w] >> (16 * c + 3 * i + 1)) & 7;",
    ),
    "pool_last_chunk": (
        "spqr_pool.c",
        "thread pool: the last chunk of every loop is never run",
        "    if (idx >= chunks) return;",
        "    if (idx + 1 >= chunks) return;",
    ),
    "attention_skips_own_key": (
        "spqr_decoder.c",
        "attention (decode): a token does not attend to its own key (keys 0 .. pos - 1)",
        "  const int64_t keys = pos + 1;",
        "  const int64_t keys = pos > 0 ? pos : 1;",
    ),
    "rope_sign": (
        "spqr_decoder.c",
        "rotary: the sign of the sine term of the first half flipped",
        "      x[i] = x1 * cos[i] - x2 * sin[i];",
        "      x[i] = x1 * cos[i] + x2 * sin[i];",
    ),
    "cache_row_ignored": (
        "spqr_decoder.c",
        "KV cache: every batch row written to cache row 0",
        "    const int64_t pos = c->positions[n], row = c->rows ? c->rows[n / c->seq] : n / c->seq;\n    float *q = ",
        "    const int64_t pos = c->positions[n], row = 0;\n    float *q = ",
    ),
}


def run_one(name: str, work: Path) -> tuple[str, str, float]:
    file, _, old, new = MUTATIONS[name]
    src = (KERNELS / file).read_text()
    if src.count(old) != 1:
        return "n/a", "text not found exactly once", 0.0
    t0 = time.time()
    tree = work / name
    shutil.copytree(KERNELS, tree)
    (tree / file).write_text(src.replace(old, new))
    lib = work / f"{name}.so"
    try:
        build_library(lib, kernels_dir=tree)
    except RuntimeError as e:
        return "build failed", str(e)[:80], time.time() - t0
    env = dict(os.environ, SPQR_CPU_LIB=str(lib))
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *TESTS, "-k", "not quantized"],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=TIMEOUT_S,
        )  # fmt: skip
    except subprocess.TimeoutExpired:  # a mutant that hangs (a loop that never completes) fails the run too
        return "caught", f"hung: no result in {TIMEOUT_S} s", time.time() - t0
    if proc.returncode == 0:
        return "MISSED", "", time.time() - t0
    failed = next((ln.split(" ")[1] for ln in proc.stdout.splitlines() if ln.startswith("FAILED")), "?")
    return "caught", failed.split("::")[-1][:70], time.time() - t0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", nargs="*", choices=sorted(MUTATIONS), help="run these mutations only")
    args = p.parse_args()
    names = args.only or list(MUTATIONS)
    print("| mutation | what it does | result | first failing test | s |\n|---|---|---|---|---:|")
    missed = 0
    with tempfile.TemporaryDirectory(prefix="spqr-cpu-mutants-") as tmp:
        for name in names:
            result, detail, secs = run_one(name, Path(tmp))
            missed += result != "caught"
            print(f"| {name} | {MUTATIONS[name][1]} | {result} | {detail} | {secs:.0f} |", flush=True)
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
