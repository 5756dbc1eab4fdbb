"""Python driver of the CUDA execution shim: builds kernels/*.cu with g++ into a shared library and runs the SpQR
kernels on the CPU through the real Python launcher (spqr_run/gpu/spqr_matmul.py).

The library exposes each kernel instance with a `cuLaunchKernel`-shaped entry (grid, block, shared memory, one
pointer per argument) and fenced host memory. `ShimDriver` is a driver for the launcher on top of it (module
load checks the cubin's symbols, functions resolve by symbol, occupancy is fixed), and `ShimDevice` is a
launcher device whose memory is fenced host memory: so the plan, argument blocks, grids, name tables and the
cache lookup that a GPU gets all run here, and each launch is checked against the reference on the CPU.

Builds (`BUILDS`): "plain" (-O2), "asan" (AddressSanitizer + UndefinedBehaviorSanitizer) and "tsan"
(ThreadSanitizer). A sanitized library needs its runtime loaded first into the process: run Python with
`preload_env(build)` (LD_PRELOAD of libasan/libtsan); `load()` says so in one line otherwise. Builds are
cached under build/cuda_shim/<build>-<hash of sources, flags and compiler>/ (git-ignored); a changed source
rebuilds. The fp16 types and conversions are the CUDA toolkit's own cuda_fp16.h (host implementations), found
through CUDA_HOME, nvcc on PATH, or /usr/local/cuda*.

    shim = load("plain")
    shim.configure(order="random", seed=3)
    y = shim.spqr_matmul(x, q)            # same dispatch as spqr_run.ops.spqr_matmul on a GPU
    with shim.device() as dev:            # or the launcher itself, on fenced buffers
        y = launcher.matmul_small(dev, dev.input(x, "x"), ...)
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
import sys
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
KERNELS = HERE.parent
ROOT = KERNELS.parent
if str(ROOT) not in sys.path:  # the package (spqr_run.gpu) when this file is loaded by path; an installed
    sys.path.append(str(ROOT))  # one comes first

from spqr_run.gpu import build as gpu_build  # noqa: E402
from spqr_run.gpu import modules  # noqa: E402
from spqr_run.gpu import spqr_matmul as launcher  # noqa: E402
from spqr_run.gpu.driver import DriverError  # noqa: E402

BUILD_ROOT = ROOT / "build" / "cuda_shim"
BUILDS = ("plain", "asan", "tsan")
ORDERS = {"forward": 0, "reverse": 1, "random": 2}
MAX_SMALL_ROWS = 16  # as spqr_run.ops.spqr_matmul: more rows dequantize and multiply
BLOCKS_PER_SM = 4  # what the shim's occupancy query answers
KERNEL_TABLE = "spqr_kernels_shim.cpp"  # generated: includes the kernel source, lists its instances

# (source, is CUDA): the kernel sources are compiled unchanged as C++ with the prelude force-included; the SpQR
# kernels through the generated table (`kernel_table`), which includes kernels/spqr_matmul.cu.
SOURCES = (
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


def kernel_table(kernel_source: Path) -> str:
    """The translation unit of the SpQR kernels: their source, and the table of every instance
    (spqr_run/gpu/build.py `instances()`) with its cuLaunchKernel-style launcher."""
    insts = gpu_build.instances()
    lines = [f'#include "{kernel_source}"', "",
             "namespace {", "const cuda_shim::KernelEntry kEntries[] = {"]  # fmt: skip
    for i in insts:
        lines.append(
            f'    {{"{i.expr}", &cuda_shim::launch_params<&{i.expr}>, reinterpret_cast<const void*>(&{i.expr})}},'
        )
    lines += ["};", "}  // namespace", "",
              'extern "C" size_t cuda_shim_kernel_entries(const cuda_shim::KernelEntry** out) {',
              "  *out = kEntries;", "  return sizeof(kEntries) / sizeof(kEntries[0]);", "}"]  # fmt: skip
    return "\n".join(lines) + "\n"


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
    kernel_source = (kernel_source or KERNELS / "spqr_matmul.cu").resolve()
    table = kernel_table(kernel_source)
    digest = hashlib.sha256()
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True).stdout
    for part in (version, str(include), build, table, *COMMON_FLAGS, *cpu_flags(), *BUILD_FLAGS[build]):
        digest.update(part.encode())
    for path in [s for s, _ in SOURCES] + list(HEADERS) + [kernel_source]:
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
        (tmp / KERNEL_TABLE).write_text(table)
        sources = [(tmp / KERNEL_TABLE, True), *SOURCES]  # the kernels first: they take longest
        includes = [f"-I{HERE / 'include'}", f"-I{KERNELS}", f"-I{kernel_source.parent}", f"-I{include}"]

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


class ShimModule:
    """A "loaded" cubin: the symbols its ELF image defines (None: the shim's own table, no image)."""

    def __init__(self, image: bytes) -> None:
        self.symbols = set(gpu_build.elf_function_symbols(image)) if image else None


class ShimDriver:
    """The launcher's driver interface (spqr_run.gpu.driver.Driver) on the shim library: cuModuleGetFunction
    resolves a symbol the module's cubin defines to the shim's instance of the same symbol (g++ mangles as nvcc
    and NVRTC do), cuLaunchKernel runs the grid on the CPU."""

    def __init__(self, shim: Shim, blocks_per_sm: int = BLOCKS_PER_SM) -> None:
        self.shim = shim
        self.blocks_per_sm = blocks_per_sm
        self.index = {symbol: i for i, (_, symbol) in enumerate(shim.kernels()) if symbol}

    def load_module(self, image: bytes) -> ShimModule:
        try:
            return ShimModule(image)
        except ValueError as e:
            raise DriverError(f"cuModuleLoadData failed: CUDA_ERROR_INVALID_IMAGE ({e})") from e

    def get_function(self, module: ShimModule, name: str) -> int:
        if module.symbols is not None and name not in module.symbols:
            raise DriverError(f"cuModuleGetFunction({name}) failed: CUDA_ERROR_NOT_FOUND (not in the cubin)")
        if name not in self.index:
            raise DriverError(f"cuModuleGetFunction({name}) failed: the shim has no kernel with this symbol")
        return self.index[name]

    def occupancy(self, function: int, block_threads: int, dynamic_smem: int) -> int:
        return self.blocks_per_sm

    def launch(
        self, function: int, grid, block, dynamic_smem: int, stream: int, params: ctypes.Array
    ) -> None:
        rc = self.shim.lib.cuda_shim_launch(function, *grid, *block, dynamic_smem, params)
        if rc != 0:
            raise self.shim._error(rc)


class ShimDevice(launcher.GpuDevice):
    """A launcher device on the shim: fenced host memory (outputs and workspaces start as NaN, inputs read-only,
    every buffer ends at a guard page), the shim's driver, and kernel images from `images` (default: the shim's
    own table, no cubin). A context manager: on exit it checks that every layer's split-K ticket counters are
    zero again (the launcher's contract for reusing them) and unmaps every buffer: copy results out first."""

    def __init__(self, shim: Shim, *, num_sms: int = 132, arch: str = "sm_80",
                 images: Callable[[tuple[int, int], list[str]], Iterable[modules.KernelImage]] | None = None) -> None:  # fmt: skip
        super().__init__()
        self.shim, self.driver, self.num_sms, self.arch = shim, ShimDriver(shim), num_sms, arch
        self._images = images

    def images(self, bits: tuple[int, int], reasons: list[str]) -> Iterable[modules.KernelImage]:
        if self._images is not None:
            return self._images(bits, reasons)
        return [self.shim.image(bits, self.arch)]

    def _alloc(
        self, name: str, shape, dtype: torch.dtype, fill: int, src: torch.Tensor | None
    ) -> torch.Tensor:
        numel = 1
        for n in shape:
            numel *= n
        nbytes = numel * torch.empty(0, dtype=dtype).element_size()
        if nbytes == 0:
            return torch.empty(shape, dtype=dtype)
        ptr = self.shim.lib.cuda_shim_alloc(name.encode(), None if src is None else src.data_ptr(), nbytes, fill,
                                            int(src is not None))  # fmt: skip
        if not ptr:
            raise MemoryError(f"cuda shim: cannot map {nbytes} bytes for {name}")
        raw = (ctypes.c_char * nbytes).from_address(ptr)
        return torch.frombuffer(raw, dtype=torch.uint8).view(dtype).view(shape)

    def empty(self, shape, dtype: torch.dtype) -> torch.Tensor:
        return self._alloc("output", shape, dtype, 0xFF, None)

    def zeros(self, shape, dtype: torch.dtype) -> torch.Tensor:
        return self._alloc("zeros", shape, dtype, 0, None)

    def input(self, t: torch.Tensor | None, name: str) -> torch.Tensor | None:
        """A read-only fenced copy of `t` (None stays None)."""
        if t is None:
            return None
        t = t.contiguous()
        return self._alloc(name, tuple(t.shape), t.dtype, 0, t)

    def stream(self) -> int:
        return 0

    def __enter__(self) -> ShimDevice:
        return self

    def __exit__(self, *exc) -> None:
        try:
            if exc[0] is None:
                for lay in list(self._layers.values()):
                    if bool(lay.counters.ne(0).any()):
                        i = int(lay.counters.ne(0).nonzero()[0])
                        raise ShimError(f"spqr_matmul_small left ticket counter {i} at {int(lay.counters[i])} "
                                        "(must be reset to 0)")  # fmt: skip
        finally:
            self._layers.clear()
            self.shim.lib.cuda_shim_free_all()


class Shim:
    """One loaded shim library: the SpQR kernels and the self-test kernels on CPU tensors."""

    def __init__(self, path: Path, build: str):
        self.build = build
        self.path = path
        self._kernels: list[tuple[str, str]] | None = None
        self.lib = ctypes.CDLL(str(path))
        self.lib.cuda_shim_last_error.restype = ctypes.c_char_p
        self.lib.cuda_shim_build.restype = ctypes.c_char_p
        self.lib.cuda_shim_shared_bytes.restype = ctypes.c_size_t
        self.lib.cuda_shim_configure.argtypes = [ctypes.c_int, ctypes.c_ulonglong]
        self.lib.cuda_shim_kernel_expr.restype = ctypes.c_char_p
        self.lib.cuda_shim_kernel_symbol.restype = ctypes.c_char_p
        self.lib.cuda_shim_launch.argtypes = [ctypes.c_int, *[ctypes.c_uint] * 7, ctypes.c_void_p]
        self.lib.cuda_shim_alloc.restype = ctypes.c_void_p
        self.lib.cuda_shim_alloc.argtypes = [ctypes.c_char_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int,
                                             ctypes.c_int]  # fmt: skip
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

    def kernels(self) -> list[tuple[str, str]]:
        """(C++ name, symbol) of each kernel instance the library holds, in launch-index order."""
        if self._kernels is None:
            n = self.lib.cuda_shim_kernel_count()
            self._kernels = [(self.lib.cuda_shim_kernel_expr(i).decode(), self.lib.cuda_shim_kernel_symbol(i).decode())
                             for i in range(n)]  # fmt: skip
        return self._kernels

    def image(self, bits: tuple[int, int], arch: str = "sm_80") -> modules.KernelImage:
        """The shim's own "kernel image" of a (wbits, stat_bits): no cubin, the name table from its symbols."""
        table = dict(self.kernels())
        names = {i.expr: table[i.expr] for i in gpu_build.instances([bits])}
        return modules.KernelImage(b"", names, arch, "shim", "the CPU execution shim's own kernels")

    def device(self, **kw) -> ShimDevice:
        """A launcher device on this library (see `ShimDevice`)."""
        return ShimDevice(self, **kw)

    def dequantize(self, q) -> torch.Tensor:
        """W (out, in) fp16 in stored column order (the spqr::dequantize op), written into a NaN-filled buffer."""
        m = q.meta
        with self.device() as dev:
            packed = [dev.input(t, n) for t, n in ((q.tiles, "tiles"), (q.outliers, "outliers"),
                                                   (q.outlier_row_ptr, "outlier_row_ptr"))]  # fmt: skip
            return launcher.dequantize(
                dev, *packed, m.wbits, m.stat_bits, m.out_features, m.in_features
            ).clone()

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
        spqr_run.ops.spqr_matmul on a GPU, through the launcher: the small-batch kernel for 1..16 rows (`splits`
        forces a split-K count; default the plan for `num_sms` SMs), dequantize + an fp32-accumulated matmul
        above."""
        m = q.meta
        x2 = x_stored.reshape(-1, m.in_features).contiguous()  # (tokens, in)
        rows = x2.shape[0]
        numbers = (m.wbits, m.stat_bits, m.out_features, m.in_features)
        with self.device(num_sms=num_sms) as dev:
            packed = [dev.input(t, n) for t, n in ((q.tiles, "tiles"), (q.outliers, "outliers"),
                                                   (q.outlier_row_ptr, "outlier_row_ptr"))]  # fmt: skip
            if rows <= MAX_SMALL_ROWS:
                if bias is not None and bias.dtype not in (torch.float16, torch.float32):
                    bias = bias.float()
                y = launcher.matmul_small(dev, dev.input(x2, "x"), *packed, dev.input(bias, "bias"), *numbers,
                                          splits=splits or None).clone()  # fmt: skip
            else:
                w = launcher.dequantize(dev, *packed, *numbers).float()  # (out, in), stored column order
                y = x2.float() @ w.T  # cuBLAS: fp16 inputs, fp32 accumulation
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
