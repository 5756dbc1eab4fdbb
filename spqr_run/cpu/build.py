"""Build the native CPU kernels (kernels/cpu/*.c) into one plain shared library: no libtorch, no Python API.

Torch-free on purpose: `setup.py` loads this file by path inside pip's isolated build environment (which has
only setuptools) to describe the extension it builds at `pip install`, and the tests build sanitizer variants
(`build_library(..., sanitize="asan")`) with the same sources and flags.

ISA variants are not separate builds: `spqr_matmul_avx2.c` and `spqr_matmul_avx512.c` set their own target
with a pragma, and `spqr_matmul.c` picks one at run time from the CPU's features (`spqr_cpu_best_isa`).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

KERNELS_DIR = Path(__file__).resolve().parents[2] / "kernels" / "cpu"
SOURCES = (
    "spqr_pool.c",
    "spqr_repack.c",
    "spqr_matmul.c",
    "spqr_matmul_avx2.c",
    "spqr_matmul_avx512.c",
    "spqr_decoder.c",
)
HEADERS = ("spqr_cpu.h", "spqr_internal.h")
# -ffp-contract=off: every fused multiply-add is an explicit fmaf / _fma intrinsic, so the portable and SIMD
# paths round identically (bit-identical results, tests/test_cpu_kernels.py)
CFLAGS = (
    "-O3",
    "-std=gnu11",
    "-Wall",
    "-Wextra",
    "-ffp-contract=off",
    "-fno-math-errno",
    "-pthread",
    "-fPIC",
)
LDFLAGS = ("-pthread", "-lm")
SANITIZE = {
    "asan": ("-fsanitize=address,undefined", "-fno-omit-frame-pointer", "-fno-sanitize-recover=undefined"),
    "tsan": ("-fsanitize=thread",),
}


def source_hash(kernels_dir: Path = KERNELS_DIR) -> str:
    """sha256 (first 16 hex digits) of the sources and headers: a built library records it, so a stale one
    (sources edited after `pip install -e .`) is noticed (`spqr_run.cpu.lib`)."""
    h = hashlib.sha256()
    for name in (*HEADERS, *SOURCES):
        h.update(name.encode() + b"\0" + (kernels_dir / name).read_bytes())
    return h.hexdigest()[:16]


def define_flags(kernels_dir: Path = KERNELS_DIR) -> list[str]:
    return [f'-DSPQR_SOURCE_HASH="{source_hash(kernels_dir)}"']


def find_compiler() -> str | None:
    """The C compiler: $CC, else cc / gcc / clang on PATH."""
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def build_library(out: Path, *, sanitize: str | None = None, kernels_dir: Path = KERNELS_DIR) -> Path:
    """Compile and link the library to `out` (written to a temporary name, renamed when complete).

    Raises RuntimeError naming the compiler error's first line, or when no compiler is found."""
    cc = find_compiler()
    if cc is None:
        raise RuntimeError("no C compiler found (set CC, or install gcc)")
    extra = SANITIZE[sanitize] if sanitize else ()
    opt = ("-O1", "-g") if sanitize else ()
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=out.name + ".", suffix=".tmp", dir=out.parent)
    os.close(fd)
    cmd = [
        cc, *CFLAGS, *opt, *extra, *define_flags(kernels_dir), "-shared", "-o", tmp,
        *[str(kernels_dir / s) for s in SOURCES], *LDFLAGS,
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        Path(tmp).unlink(missing_ok=True)
        first = next(
            (line for line in proc.stderr.splitlines() if "error" in line), proc.stderr.strip()[:200]
        )
        raise RuntimeError(f"building the CPU kernels failed: {first}")
    os.replace(tmp, out)
    return out


if __name__ == "__main__":  # python spqr_run/cpu/build.py OUT [asan|tsan]
    print(build_library(Path(sys.argv[1]), sanitize=sys.argv[2] if len(sys.argv) > 2 else None))
