"""Lazy build of the CUDA extension (kernels/spqr_ops.cpp + kernels/spqr_matmul.cu).

Nothing compiles at import time: `load_extension()` builds on first CUDA use with
`torch.utils.cpp_extension.load` (ninja, cached under ~/.cache/spqr-run/ext, so later runs only load the
`.so`), for the architectures of the GPUs present. When CUDA, the toolkit or a compiler is missing, or the
build fails, it warns once with one line and returns None; callers then use the pure-torch reference.
"""

from __future__ import annotations

import functools
import os
import shutil
import warnings
from pathlib import Path
from types import ModuleType

import torch

KERNELS_DIR = Path(__file__).resolve().parents[2] / "kernels"
SOURCES = ("spqr_ops.cpp", "spqr_matmul.cu")
# -O3 only: the kernels use no transcendental functions, so --use_fast_math would buy nothing and could only
# change results (flush-to-zero, approximate division).
CUDA_FLAGS = ("-O3", "-lineinfo")
CXX_FLAGS = ("-O3",)


def cache_dir() -> Path:
    """Where ninja keeps the build: $XDG_CACHE_HOME/spqr-run/ext (default ~/.cache/spqr-run/ext)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "spqr-run" / "ext"


def missing_toolchain() -> str | None:
    """Why the extension cannot be built here, or None when it can be tried."""
    from torch.utils import cpp_extension

    if torch.version.cuda is None:
        return "this torch build has no CUDA"
    if not torch.cuda.is_available():
        return "no CUDA device is available"
    if cpp_extension.CUDA_HOME is None:
        return "no CUDA toolkit found (set CUDA_HOME or put nvcc on PATH)"
    if not any(shutil.which(cc) for cc in (os.environ.get("CXX", "c++"), "g++", "clang++")):
        return "no C++ compiler found"
    if not cpp_extension.is_ninja_available():
        return "ninja is not installed (pip install ninja)"
    if not all((KERNELS_DIR / name).exists() for name in SOURCES):
        return f"kernel sources not found under {KERNELS_DIR}"
    return None


def _arch_flags() -> list[str]:
    """-gencode flags for every visible GPU's compute capability (sm_80 or newer)."""
    caps = sorted({torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())})
    return [f"-gencode=arch=compute_{a}{b},code=sm_{a}{b}" for a, b in caps]


def _build() -> ModuleType:
    from torch.utils import cpp_extension

    arch = _arch_flags()
    tag = "-".join(f.rsplit("_", 1)[-1] for f in arch)  # e.g. "sm80-sm90" -> keeps builds per GPU apart
    name = f"spqr_run_kernels_{tag.replace('-', '_')}"
    build_dir = cache_dir() / f"torch{torch.__version__}-cuda{torch.version.cuda}-{tag}"
    build_dir.mkdir(parents=True, exist_ok=True)
    return cpp_extension.load(
        name=name,
        sources=[str(KERNELS_DIR / s) for s in SOURCES],
        extra_cflags=list(CXX_FLAGS),
        extra_cuda_cflags=[*CUDA_FLAGS, *arch],  # explicit arch flags: torch adds none of its own
        extra_include_paths=[str(KERNELS_DIR)],
        build_directory=str(build_dir),
        verbose=False,
    )


@functools.cache
def load_extension() -> ModuleType | None:
    """The compiled kernels, built on first call; None (after one warning) when they cannot be built."""
    reason = missing_toolchain()
    if reason is None:
        try:
            return _build()
        except Exception as e:  # a compiler error, a missing header, a failed load
            first = (str(e).strip().splitlines() or [""])[0][:200]
            reason = f"building them failed ({type(e).__name__}: {first})"
    warnings.warn(
        f"spqr-run: CUDA kernels unavailable: {reason}; using the slow pure-torch reference path",
        RuntimeWarning,
        stacklevel=2,
    )
    return None
