"""Mutation check of the CUDA shim's test builds: inject one fault at a time into a copy of kernels/spqr_matmul.cu
and record which shim build (plain, asan, tsan) catches it.

    python benchmarks/kernel_mutations.py                       # every mutation, every build
    python benchmarks/kernel_mutations.py --builds plain --only dropped_outlier

Each mutant is compiled into its own cached shim library (build/cuda_shim/, keyed by the source's hash) and
the build's case list of tests/test_kernels.py and tests/test_cuda_shim.py runs against it in a child pytest
(SPQR_SHIM_KERNEL_SOURCE points the shim at the copy; sanitized builds get their runtime preloaded). A mutant
is caught when that run fails; the report names the first failing test and the kind of evidence (a shim
diagnostic, a sanitizer report, a result outside the per-element bound). Prints a markdown table; a mutation whose text is not in the current source is listed as n/a (MUTATIONS is
data: the v1 entries match the kernels before issue #11, the v2 entries the tensor-core kernels).
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT / "kernels" / "spqr_matmul.cu"
sys.path.insert(0, str(ROOT / "kernels" / "testing"))
import shim  # noqa: E402

# name -> (what it does, exact text in spqr_matmul.cu or a compiled regex (re.sub replacement), replacement).
# Data, not code: a mutation whose text is not in the current source exactly once (the kernels changed) is
# reported "n/a" and skipped; add or update entries when the kernels change. The v1 entries apply to the kernels before issue #11, the v2 entries to the tensor-core kernels.
MUTATIONS = {
    # ---- v1 kernels (per-block gather of x[perm], FFMA decode) ----
    "removed_syncthreads": (
        "matvec: no barrier between gathering x into shared memory and reading it",
        "    gather_x_f32(xs, x, layer.perm, layer.in_features, seg0 * kTile, seg_tiles * kTile);\n"
        "    __syncthreads();\n",
        "    gather_x_f32(xs, x, layer.perm, layer.in_features, seg0 * kTile, seg_tiles * kTile);\n",
    ),
    "wrong_shuffle_offset": (
        "matvec: the final butterfly starts at lane offset 1 instead of 2 (mixes the two half tiles)",
        "for (int offset = 2; offset < 32; offset <<= 1) acc[i] += __shfl_xor_sync(kFullMask, acc[i], offset);",
        "for (int offset = 1; offset < 32; offset <<= 1) acc[i] += __shfl_xor_sync(kFullMask, acc[i], offset);",
    ),
    "off_by_one_tail_read": (
        "gather of x: `c <= in_features` reads one element past the end of x / perm",
        "    xs[j] = c < in_features ? x_at(x, perm, c) : 0.0f;",
        "    xs[j] = c <= in_features ? x_at(x, perm, c) : 0.0f;",
    ),
    "dropped_outlier": (
        "matvec: the last outlier of every row is skipped",
        "      for (int p = __ldg(layer.outlier_row_ptr + row) + lane; p < p1; p += 32) {\n"
        "        const int c = __ldg(layer.outlier_cols + p);\n"
        "        const float xv = x_in_smem",
        "      for (int p = __ldg(layer.outlier_row_ptr + row) + lane; p < p1 - 1; p += 32) {\n"
        "        const int c = __ldg(layer.outlier_cols + p);\n"
        "        const float xv = x_in_smem",
    ),
    "swapped_funnelshift": (
        "bits_at: __funnelshift_r(w[i + 1], w[i], s) (codes straddling two words come out wrong)",
        "__funnelshift_r(w[i], w[i + 1], s)",
        "__funnelshift_r(w[i + 1], w[i], s)",
    ),
    "shuffle_in_divergent_code": (
        "matvec: the outlier warp_sum moved into the per-lane loop (lanes with fewer outliers skip it)",
        "        s = fmaf(__half2float(__ldg(layer.outlier_values + p)), xv, s);\n      }\n    }\n    s = warp_sum(s);",
        "        s = fmaf(__half2float(__ldg(layer.outlier_values + p)), xv, s);\n        s = warp_sum(s);\n      }\n"
        "    }",
    ),
    # ---- v2 kernels (tiles layout, cp.async pipeline, ldmatrix + mma.sync) ----
    "v2_missing_cp_async_wait": (
        "small: the steady-state loop reads a stage without cp.async.wait_group (the copy has not landed)",
        re.compile(
            r"(for \(int stage = 0; stage < kStages; \+\+stage\) \{\n\s*)cp_async_wait<kStages - 2>\(\);"
        ),
        r"\1",
    ),
    "v2_missing_barrier_after_wait": (
        "small: no __syncthreads after the steady-state wait (other threads' cp.async of the stage are not visible)",
        re.compile(r"(cp_async_wait<kStages - 2>\(\);)\s*\n\s*__syncthreads\(\);(\s*\n\s*const __half\* xr)"),
        r"\1\2",
    ),
    "v2_missing_commit": (
        "small: the main loop does not commit its cp.async group (the wait counts the wrong groups)",
        re.compile(r"(issue\([^;]*kStages - 1\);)\s*\n\s*cp_async_commit\(\);"),
        r"\1",
    ),
    "v2_swapped_ldmatrix_halves": (
        "small: ldmatrix row addresses swap the tile and the k half (B fragments of the wrong columns)",
        "16 * (m >> 1) + 8 * (m & 1));",
        "16 * (m & 1) + 8 * (m >> 1));",
    ),
    "v2_mma_in_divergent_code": (
        "small: lane 31 skips the mma (a warp collective in divergent code)",
        "          mma_m16n8k16_f16f32(acc[n], a[2 * jp + jj], bf, acc[n]);",
        "          if (lane != 31) mma_m16n8k16_f16f32(acc[n], a[2 * jp + jj], bf, acc[n]);",
    ),
    "v2_swapped_row_scales": (
        "decode: rows g and g+8 use each other's scale",
        "(k & 1) ? __high2half2(s) : __low2half2(s)",
        "(k & 1) ? __low2half2(s) : __high2half2(s)",
    ),
    "v2_output_not_rescaled": (
        "small: the accumulators are not multiplied back by 2^k (weight exponent) before the output",
        "acc[n][e] * unscale + bias_at(bias, row)",
        "acc[n][e] + bias_at(bias, row)",
    ),
    "v2_outlier_seed_not_scaled": (
        "small: the outlier sums seed the accumulators without the 2^-k of the dense weights",
        "os[b] * pow2f(-kexp);  // exact",
        "os[b];",
    ),
    "v2_weight_exponent_one_low": (
        "decode: k one lower than the scale bound allows (S0 may overflow fp16)",
        "return min(24, max(-3, e + 9));",
        "return min(24, max(-3, e + 8));",
    ),
    "v2_zero_term_sign": (
        "decode: C = +scale*zero * 2^-k (the zero point added instead of subtracted)",
        "__float2half2_rn(-0x1p-12f)",
        "__float2half2_rn(0x1p-12f)",
    ),
    "v2_4bit_row_scale_not_published": (
        "decode, 4-bit: row g+8's pairs (at bit 4) use S0 instead of S0 * 2^-4",
        "__floats2half2_rn(4096.0f, 256.0f)",
        "__floats2half2_rn(4096.0f, 4096.0f)",
    ),
    "v3_3bit_row_scale_not_published": (
        "decode, 3-bit: group 1's row g+8 pairs (read at bit 3) use S0 instead of S0 * 2^-3",
        "t == 1 ? 512.0f : 64.0f",
        "t == 1 ? 4096.0f : 64.0f",
    ),
    "v3_spread_pair_wrong_word": (
        "decode, 3-bit: bit 1 of the spread pair's code is taken from W2 instead of W1",
        "lop3<kSelectLow>(sh[0], wd[1] >> 8, 0x00400040u)",
        "lop3<kSelectLow>(sh[0], wd[2] >> 8, 0x00400040u)",
    ),
    "v2_split_overlap": (
        "small: split-K ranges overlap by one record (kb1 one too far: double counts, reads past the end)",
        "  const int kb1 = static_cast<int>((static_cast<long long>(split + 1) * kblocks) / splits);",
        "  const int kb1 = static_cast<int>((static_cast<long long>(split + 1) * kblocks) / splits) + 1;",
    ),
    "v2_dropped_outlier": (
        "small: the last outlier of every row is skipped",
        "p < p_end; p += 2 * splits) {",
        "p < p_end - 1; p += 2 * splits) {",
    ),
}


def occurrences(old: str | re.Pattern, text: str) -> int:
    return len(old.findall(text)) if isinstance(old, re.Pattern) else text.count(old)


def applies(name: str, text: str) -> bool:
    """Whether the mutation's text occurs exactly once in the source."""
    return occurrences(MUTATIONS[name][1], text) == 1


def mutant(name: str) -> Path:
    """Writes the mutated copy under build/mutants/<name>/ and returns its path."""
    _, old, new = MUTATIONS[name]
    text = SOURCE.read_text()
    if occurrences(old, text) != 1:
        raise SystemExit(
            f"kernel_mutations: {name}: the text to mutate occurs {occurrences(old, text)} times in {SOURCE}"
        )
    path = ROOT / "build" / "mutants" / name / "spqr_matmul.cu"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(old.sub(new, text) if isinstance(old, re.Pattern) else text.replace(old, new))
    return path


def evidence(output: str) -> str:
    """The kind of failure a run reported."""
    if m := re.search(r"ThreadSanitizer: (data race|[\w ]+)", output):
        return f"TSan {m.group(1)}"
    if m := re.search(r"AddressSanitizer: ([\w-]+)", output):
        return f"ASan {m.group(1)}"
    if "runtime error:" in output:
        return "UBSan runtime error"
    if m := re.search(r"cuda_shim: .*?: (deadlock|collective mask mismatch|divergent __syncthreads|misaligned vector"
                      r" load|misaligned cp_async_\d+|ldmatrix_\w+: row address [^\n]*?(?:aligned|variable)|"
                      r"cp_async_\d+: destination [^\n]*?variable|a \.sync\.aligned warp instruction needs all 32 lanes|"
                      r"invalid memory access \(\w+\)[^\n]*?(?:past the end of '\w+')?)", output):  # fmt: skip
        return f"shim: {m.group(1)}"
    if "outside the bound" in output:
        return "result outside the per-element bound"
    if "thread orders" in output and "different results" in output:
        return "results differ between thread orders"
    if "assert torch.equal" in output or "AssertionError" in output:
        return "wrong result (assertion)"
    if "Fatal Python error: Aborted" in output:
        return "process aborted (sanitizer)"
    return "failed (see log)"


def run(name: str, build: str, timeout: int) -> tuple[str, float]:
    src = mutant(name)
    shim.build(build, kernel_source=src)
    env = shim.preload_env(build)
    env["SPQR_SHIM_KERNEL_SOURCE"] = str(src)
    env["PYTHONPATH"] = str(ROOT) + (":" + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["OMP_NUM_THREADS"] = "1"
    # --capture=sys: sanitizer reports go to fd 2 (and may end the process), so they reach this pipe
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "--capture=sys", "-k", "shim",
           "tests/test_kernels.py", "tests/test_cuda_shim.py"]  # fmt: skip
    t0 = time.time()
    try:
        res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return "timeout", time.time() - t0
    out = res.stdout + res.stderr
    if res.returncode == 0:
        return "missed", time.time() - t0
    first = re.search(r"(?:FAILED|ERROR) (tests/\S+?\[.*?\]|tests/\S+)", out)
    where = f" in {first.group(1).split('::')[-1]}" if first else ""
    return f"caught: {evidence(out)}{where}", time.time() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--builds", nargs="+", default=list(shim.BUILDS), choices=shim.BUILDS)
    ap.add_argument("--only", nargs="+", choices=list(MUTATIONS), help="these mutations only")
    ap.add_argument("--timeout", type=int, default=900, help="seconds per mutant and build")
    args = ap.parse_args()
    names = args.only or list(MUTATIONS)
    text = SOURCE.read_text()
    print("| mutation | " + " | ".join(args.builds) + " |")
    print("|---|" + "---|" * len(args.builds))
    missed_everywhere = []
    applied = 0
    for name in names:
        if not applies(name, text):
            print(f"| {name}: {MUTATIONS[name][0]} | " + " | ".join(["n/a (text not in the source)"] * len(args.builds))
                  + " |", flush=True)  # fmt: skip
            continue
        applied += 1
        cells = []
        for b in args.builds:
            verdict, seconds = run(name, b, args.timeout)
            cells.append(f"{verdict} ({seconds:.0f} s)")
        if all(c.startswith("missed") for c in cells):
            missed_everywhere.append(name)
        print(f"| {name}: {MUTATIONS[name][0]} | " + " | ".join(cells) + " |", flush=True)
    if missed_everywhere:
        print(f"\nnot caught by any build: {', '.join(missed_everywhere)}", file=sys.stderr)
    if not applied:
        print("\nno mutation applies to the current source: update MUTATIONS", file=sys.stderr)
    return 1 if missed_everywhere or not applied else 0


if __name__ == "__main__":
    sys.exit(main())
