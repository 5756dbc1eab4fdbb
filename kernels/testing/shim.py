"""Python driver of the CUDA execution shim: builds kernels/*.cu with g++ into a shared library and calls the
SpQR kernels on torch CPU tensors through ctypes.

Builds (`BUILDS`): "plain" (-O2), "asan" (AddressSanitizer + UndefinedBehaviorSanitizer) and "tsan"
(ThreadSanitizer). A sanitized library needs its runtime loaded first into the process: run Python with
`preload_env(build)` (LD_PRELOAD of libasan/libtsan); `load()` says so in one line otherwise. Builds are
cached under build/cuda_shim/<build>-<hash of sources, flags and compiler>/ (git-ignored); a changed source
rebuilds. The fp16 types and conversions are the CUDA toolkit's own cuda_fp16.h (host implementations), found
through CUDA_HOME, nvcc on PATH, or /usr/local/cuda*.

    shim = load("plain")
    shim.configure(order="random", seed=3)
    y = shim.spqr_matmul(x, q)            # same dispatch as spqr_run.ops.spqr_matmul on a GPU
"""

from __future__ import annotations

import ctypes
import fcntl
import functools
import glob
import hashlib
import os
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
KERNELS = HERE.parent
ROOT = KERNELS.parent
BUILD_ROOT = ROOT / "build" / "cuda_shim"
BUILDS = ("plain", "asan", "tsan")
ORDERS = {"forward": 0, "reverse": 1, "random": 2}
OPS = {"matmul_small": 1, "dequantize": 2}
MAX_SMALL_ROWS = 16  # as spqr_run.ops.spqr_matmul: more rows dequantize and multiply

# (source, is CUDA): the kernel sources are compiled unchanged as C++ with the prelude force-included.
SOURCES = (
    (KERNELS / "spqr_matmul.cu", True),
    (HERE / "shim_selftest.cu", True),
    (HERE / "shim_runtime.cpp", False),
    (HERE / "shim_api.cpp", False),
)
HEADERS = (HERE / "cuda_shim.h", HERE / "shim_runtime.h", HERE / "include" / "cuda_runtime.h",
           KERNELS / "spqr_matmul.h", KERNELS / "spqr_ptx.cuh")  # fmt: skip
COMMON_FLAGS = (
    "-std=c++20", "-fPIC", "-g", "-Wall", "-Wextra", "-Werror",
    "-Wno-unknown-pragmas",  # #pragma unroll is nvcc's
    "-Wno-class-memaccess",  # memcpy into __half2, as the kernels do
    "-ffp-contract=off",  # no fused multiply-add unless written (fmaf), like __fmul_rn/__fadd_rn on the GPU
    "-fno-strict-aliasing",
)  # fmt: skip
BUILD_FLAGS = {
    "plain": ("-O2",),
    "asan": ("-O1", "-fno-omit-frame-pointer", "-fsanitize=address,undefined", "-fno-sanitize-recover=all"),
    "tsan": ("-O1", "-fno-omit-frame-pointer", "-fsanitize=thread", "-DSHIM_TSAN=1"),
}
SANITIZER_LIB = {"asan": "libasan.so", "tsan": "libtsan.so"}
SANITIZER_OPTIONS = {
    "asan": ("ASAN_OPTIONS", "detect_leaks=0:abort_on_error=1:allow_user_segv_handler=1"),
    "tsan": ("TSAN_OPTIONS", "halt_on_error=1:abort_on_error=1:report_signal_unsafe=0"),
}


class ShimUnavailable(RuntimeError):
    """The shim cannot be built or loaded here (no g++, no cuda_fp16.h, sanitizer runtime not preloaded)."""


class ShimError(RuntimeError):
    """A kernel fault the shim diagnosed (deadlock, divergent barrier, mask mismatch, invalid access...)."""


def compiler() -> str:
    """The C++ compiler: $CXX or g++."""
    cxx = os.environ.get("CXX") or "g++"
    if shutil.which(cxx) is None:
        raise ShimUnavailable(f"no C++ compiler ({cxx}) on PATH")
    return cxx


@functools.cache
def cuda_include_dir() -> Path:
    """The CUDA toolkit's include directory (holding cuda_fp16.h)."""
    candidates = []
    if os.environ.get("CUDA_HOME"):
        candidates.append(Path(os.environ["CUDA_HOME"]) / "include")
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(Path(nvcc).resolve().parent.parent / "include")
    candidates += [
        Path("/usr/local/cuda/include"),
        *map(Path, sorted(glob.glob("/usr/local/cuda-*/include"))),
    ]
    for c in candidates:
        if (c / "cuda_fp16.h").exists() and (c / "driver_types.h").exists():
            return c
    raise ShimUnavailable(
        "CUDA toolkit headers not found (cuda_fp16.h under $CUDA_HOME, nvcc's or /usr/local/cuda*)"
    )


def sanitizer_runtime(build: str) -> str | None:
    """Path of the sanitizer runtime a build needs preloaded (None for plain)."""
    if build not in SANITIZER_LIB:
        return None
    out = subprocess.run(
        [compiler(), f"-print-file-name={SANITIZER_LIB[build]}"], capture_output=True, text=True
    )
    path = out.stdout.strip()
    if out.returncode != 0 or not os.path.isabs(path):
        raise ShimUnavailable(f"the compiler has no {SANITIZER_LIB[build]}")
    return path


def preload_env(build: str, env: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for a child process that loads a `build` library: LD_PRELOAD and sanitizer options."""
    env = dict(os.environ if env is None else env)
    lib = sanitizer_runtime(build)
    if lib is not None:
        env["LD_PRELOAD"] = lib
        name, options = SANITIZER_OPTIONS[build]
        env[name] = options + (":" + env[name] if env.get(name) else "")
    env["SPQR_SHIM_BUILD"] = build
    return env


@functools.cache
def cpu_flags() -> tuple[str, ...]:
    """-mfma when this CPU has FMA: fmaf becomes one instruction instead of a libm call. Results are the same
    (fmaf is correctly rounded either way, and -ffp-contract=off fuses nothing else); builds are per machine."""
    try:
        with open("/proc/cpuinfo") as f:
            has_fma = any(line.startswith("flags") and " fma " in line + " " for line in f)
    except OSError:
        return ()
    return ("-mfma",) if has_fma and os.uname().machine == "x86_64" else ()


def _flags(build: str, sanitize_runtime: bool) -> list[str]:
    flags = [*COMMON_FLAGS, *cpu_flags(), *BUILD_FLAGS[build]]
    if build == "tsan" and not sanitize_runtime:  # the scheduler's bookkeeping is not the kernels' business
        flags.remove("-fsanitize=thread")
    return flags


def build(build: str = "plain", *, kernel_source: Path | None = None, verbose: bool = False) -> Path:
    """Compiles the shim library for `build` (cached) and returns its path.

    kernel_source: a replacement for kernels/spqr_matmul.cu (the mutation check compiles altered copies).
    Raises ShimUnavailable without a compiler or toolkit headers, RuntimeError with the compiler's output when a
    source does not compile.
    """
    if build not in BUILDS:
        raise ValueError(f"unknown shim build {build!r}; expected one of {', '.join(BUILDS)}")
    cxx = compiler()
    include = cuda_include_dir()
    sources = [
        (kernel_source or src, cuda) if src.name == "spqr_matmul.cu" else (src, cuda) for src, cuda in SOURCES
    ]
    digest = hashlib.sha256()
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True).stdout
    for part in (version, str(include), build, *COMMON_FLAGS, *cpu_flags(), *BUILD_FLAGS[build]):
        digest.update(part.encode())
    for path in [s for s, _ in sources] + list(HEADERS):
        digest.update(path.name.encode() + path.read_bytes())
    out_dir = BUILD_ROOT / f"{build}-{digest.hexdigest()[:16]}"
    lib = out_dir / "libcuda_shim.so"
    if lib.exists():
        return lib
    BUILD_ROOT.mkdir(parents=True, exist_ok=True)
    with open(BUILD_ROOT / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one build at a time (parallel pytest processes)
        if lib.exists():
            return lib
        for stale in BUILD_ROOT.glob("*.tmp*"):  # left by an interrupted build (we hold the lock)
            shutil.rmtree(stale, ignore_errors=True)
        tmp = out_dir.with_name(out_dir.name + f".tmp{os.getpid()}")
        tmp.mkdir(parents=True)
        includes = [f"-I{HERE / 'include'}", f"-I{KERNELS}", f"-I{include}"]

        def compile_one(item: tuple[Path, bool]) -> Path:
            src, cuda = item
            obj = tmp / (src.stem + ".o")
            lang = ["-x", "c++"] if cuda else []
            prelude = ["-include", str(HERE / "cuda_shim.h")]
            cmd = [cxx, *_flags(build, sanitize_runtime=cuda or src.name == "shim_api.cpp"), *includes, *prelude,
                   *lang, "-c", str(src), "-o", str(obj)]  # fmt: skip
            if verbose:
                print(" ".join(cmd), flush=True)
            res = subprocess.run(cmd, capture_output=True, text=True)
            if res.returncode != 0:
                raise RuntimeError(f"cuda shim: compiling {src} failed:\n{res.stdout}{res.stderr}")
            return obj

        with ThreadPoolExecutor(max_workers=max(1, min(len(sources), os.cpu_count() or 1))) as pool:
            # the kernel sources first: they take longest
            objs = list(pool.map(compile_one, sources))
        link = [cxx, "-shared", *BUILD_FLAGS[build], "-o", str(tmp / lib.name), *map(str, objs)]
        res = subprocess.run(link, capture_output=True, text=True)
        if res.returncode != 0:
            raise RuntimeError(f"cuda shim: linking failed:\n{res.stdout}{res.stderr}")
        shutil.rmtree(out_dir, ignore_errors=True)
        tmp.rename(out_dir)
    return lib


def _preloaded(build: str) -> bool:
    name = SANITIZER_LIB[build]
    with open("/proc/self/maps") as f:
        return any(name in line for line in f)


class Shim:
    """One loaded shim library: the SpQR kernels and the self-test kernels on CPU tensors."""

    def __init__(self, path: Path, build: str):
        self.build = build
        self.path = path
        self.lib = ctypes.CDLL(str(path))
        self.lib.cuda_shim_last_error.restype = ctypes.c_char_p
        self.lib.cuda_shim_build.restype = ctypes.c_char_p
        self.lib.cuda_shim_shared_bytes.restype = ctypes.c_size_t
        self.lib.cuda_shim_configure.argtypes = [ctypes.c_int, ctypes.c_ulonglong]
        self.lib.spqr_shim_call.argtypes = [
            ctypes.c_int, ctypes.POINTER(ctypes.c_int), ctypes.POINTER(ctypes.c_void_p),
            ctypes.POINTER(ctypes.c_size_t), ctypes.c_void_p, ctypes.c_size_t,
        ]  # fmt: skip
        self.lib.cuda_shim_selftest.argtypes = [
            ctypes.c_char_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p, ctypes.c_size_t,
        ]  # fmt: skip

    def configure(self, order: str = "forward", seed: int = 0) -> None:
        """Thread order of the following launches: "forward", "reverse" or "random" (drawn from `seed`)."""
        if order not in ORDERS:
            raise ValueError(f"unknown thread order {order!r}; expected one of {', '.join(ORDERS)}")
        self.lib.cuda_shim_configure(ORDERS[order], seed)

    def shared_bytes(self) -> int:
        """Bytes of __shared__ variables the shim found in the library (poisoned before every block)."""
        return int(self.lib.cuda_shim_shared_bytes())

    def _error(self, rc: int) -> ShimError:
        return ShimError(self.lib.cuda_shim_last_error().decode(errors="replace") or f"error {rc}")

    def call(
        self,
        op: str,
        q,
        x: torch.Tensor | None,
        bias: torch.Tensor | None,
        out: torch.Tensor,
        *,
        splits: int = 0,
        num_sms: int = 132,
    ) -> torch.Tensor:
        """Runs launcher `op` ("matmul_small", "dequantize") of the v2 layer `q` (`tiles`, `outliers`,
        `outlier_row_ptr`, `meta`), writing `out` (fp16, its final shape). `x` is x_stored (rows, in) fp16.
        splits: forced split-K count (0: the launcher's plan for `num_sms` SMs). Raises ShimError on a
        diagnosed fault or a CUDA error."""
        m = q.meta
        rows = 0 if x is None else x.numel() // m.in_features
        bias_kind = 0 if bias is None else {torch.float16: 1, torch.float32: 2}[bias.dtype]
        tensors = [q.tiles, q.outliers, q.outlier_row_ptr, x, bias]
        tensors = [None if t is None or t.numel() == 0 else t.contiguous() for t in tensors]
        ptrs = (ctypes.c_void_p * 5)(*[None if t is None else t.data_ptr() for t in tensors])
        sizes = (ctypes.c_size_t * 5)(*[0 if t is None else t.numel() * t.element_size() for t in tensors])
        ldx = m.in_features
        if x is not None and m.in_features % 64:  # the kernel reads whole records of x: pad with zeros
            ldx = -(-m.in_features // 64) * 64
            x = torch.nn.functional.pad(x.reshape(rows, m.in_features), (0, ldx - m.in_features))
            tensors[3] = x.contiguous()
            ptrs[3] = x.data_ptr()
            sizes[3] = x.numel() * x.element_size()
        ints = (ctypes.c_int * 9)(m.wbits, m.stat_bits, m.out_features, m.in_features, rows, bias_kind, splits,
                                  num_sms, ldx)  # fmt: skip
        assert out.is_contiguous() and out.dtype == torch.float16
        rc = self.lib.spqr_shim_call(OPS[op], ints, ptrs, sizes, out.data_ptr(), out.numel() * 2)
        if rc != 0:
            raise self._error(rc)
        return out

    def dequantize(self, q) -> torch.Tensor:
        """W (out, in) fp16 in stored column order (the spqr::dequantize op)."""
        m = q.meta
        return self.call(
            "dequantize", q, None, None, torch.empty(m.out_features, m.in_features, dtype=torch.half)
        )

    def spqr_matmul_stored(
        self,
        x_stored: torch.Tensor,
        q,
        bias: torch.Tensor | None = None,
        *,
        splits: int = 0,
        num_sms: int = 132,
    ) -> torch.Tensor:
        """x_stored (..., in) fp16, already in stored column order -> (..., out) fp16 with the dispatch of
        spqr_run.ops.spqr_matmul on a GPU: the small-batch kernel for 1..16 rows, dequantize + an
        fp32-accumulated matmul above."""
        m = q.meta
        x2 = x_stored.reshape(-1, m.in_features).contiguous()  # (tokens, in)
        rows = x2.shape[0]
        if rows <= MAX_SMALL_ROWS:
            if bias is not None and bias.dtype not in (torch.float16, torch.float32):
                bias = bias.float()
            out = torch.empty(rows, m.out_features, dtype=torch.half)
            y = self.call("matmul_small", q, x2, bias, out, splits=splits, num_sms=num_sms)
        else:
            w = self.dequantize(q)  # (out, in) fp16, stored column order
            y = x2.float() @ w.float().T  # cuBLAS: fp16 inputs, fp32 accumulation
            if bias is not None:
                y += bias.half().float()
            y = y.half()
        return y.reshape(*x_stored.shape[:-1], m.out_features)

    def spqr_matmul(self, x: torch.Tensor, q, bias: torch.Tensor | None = None, **kw) -> torch.Tensor:
        """x (..., in) fp16 -> (..., out) fp16: gathers x[..., perm] and runs `spqr_matmul_stored`."""
        perm = q.perm_indices()
        xs = x if perm is None else x.index_select(-1, perm)
        return self.spqr_matmul_stored(xs, q, bias, **kw)

    def selftest(self, name: str, inp: torch.Tensor, n_out: int) -> torch.Tensor:
        """Runs self-test kernel `name` (kernels/testing/shim_selftest.cu) on float32 `inp`; returns n_out floats."""
        inp = inp.float().contiguous()
        out = torch.empty(n_out)
        rc = self.lib.cuda_shim_selftest(name.encode(), inp.data_ptr(), inp.numel(), out.data_ptr(), n_out)
        if rc != 0:
            raise self._error(rc)
        return out


@functools.cache
def load(build: str | None = None) -> Shim:
    """The shim library for `build` (default: $SPQR_SHIM_BUILD or "plain"), built on first use, from
    $SPQR_SHIM_KERNEL_SOURCE instead of kernels/spqr_matmul.cu when set.

    Raises ShimUnavailable when it cannot be built here or, for a sanitized build, when the process was not
    started with its runtime preloaded (see `preload_env`)."""
    build = build or os.environ.get("SPQR_SHIM_BUILD") or "plain"
    if build not in BUILDS:
        raise ShimUnavailable(f"SPQR_SHIM_BUILD={build!r} is not one of {', '.join(BUILDS)}")
    if build != "plain" and not _preloaded(build):
        raise ShimUnavailable(
            f"the {build} shim needs LD_PRELOAD={sanitizer_runtime(build)} (use kernels/testing/shim.py preload_env)"
        )
    source = os.environ.get("SPQR_SHIM_KERNEL_SOURCE")  # a mutated copy (benchmarks/kernel_mutations.py)
    return Shim(build_lib(build, kernel_source=Path(source) if source else None), build)


build_lib = build  # `load` takes a parameter named build
