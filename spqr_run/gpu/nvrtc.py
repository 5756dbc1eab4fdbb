"""NVRTC through ctypes: compiles the SpQR kernels to a cubin at run time, without nvcc or a host compiler.

The library is the one torch's CUDA wheels install (`nvidia-cuda-nvrtc` 13.x for torch 2.11+, under
site-packages/nvidia/cu13/lib; `nvidia-cuda-nvrtc-cu12` 12.x before, under nvidia/cuda_nvrtc/lib), else a
toolkit's ($CUDA_HOME/lib64), else $SPQR_RUN_NVRTC (a path to libnvrtc.so.*). `cuda_fp16.h` comes from the CUDA
runtime wheel torch installs beside it (nvidia/cu13/include, nvidia/cuda_runtime/include) or a toolkit.
Standard library only (no torch).

    nv = load_nvrtc()                     # NvrtcUnavailable says what is missing, in one line
    result = nv.compile_kernels("sm_86", bits=[(3, 3)])
    result.image, result.names            # cubin bytes, {instance expression: lowered name}
"""

from __future__ import annotations

import ctypes
import functools
import glob
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from spqr_run.gpu import build

NVRTC_ENV = "SPQR_RUN_NVRTC"


class NvrtcUnavailable(RuntimeError):
    """No usable NVRTC (library or cuda_fp16.h) on this machine."""


class NvrtcError(RuntimeError):
    """NVRTC failed to compile the kernels (the log follows the first line)."""


def _site_dirs() -> list[Path]:
    return [Path(p) for p in sys.path if p and os.path.isdir(p)]


def nvrtc_candidates(cuda_major: int | None = None) -> list[Path]:
    """Paths of libnvrtc to try, best first: $SPQR_RUN_NVRTC, the pip wheels' (the CUDA major version of torch,
    `cuda_major`, first), the toolkits'."""
    out: list[Path] = []
    if os.environ.get(NVRTC_ENV):
        out.append(Path(os.environ[NVRTC_ENV]))
    wheels = []
    for site in _site_dirs():
        for lib in glob.glob(str(site / "nvidia" / "*" / "lib" / "libnvrtc.so.*")):
            if ".alt." not in lib and "builtins" not in lib:
                wheels.append(Path(lib))
    wheels.sort(key=lambda p: (_major_of(p) != cuda_major, -(_major_of(p) or 0), str(p)))
    out += wheels
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home:
            out += sorted(Path(home).glob("lib*/libnvrtc.so*"), reverse=True)
    seen, unique = set(), []
    for p in out:
        if p.is_file() and p.resolve() not in seen:
            seen.add(p.resolve())
            unique.append(p)
    return unique


def _major_of(lib: Path) -> int | None:
    """12 from libnvrtc.so.12, 13 from libnvrtc.so.13.0.88."""
    parts = lib.name.split(".so.")
    try:
        return int(parts[1].split(".")[0]) if len(parts) > 1 else None
    except ValueError:
        return None


def cuda_include_dirs(lib: Path) -> list[Path]:
    """Directories holding cuda_fp16.h for the NVRTC at `lib`: the wheel's own include/ (nvidia/cu13), the CUDA
    runtime wheel's (nvidia/cuda_runtime/include for 12.x), then the toolkits'."""
    cands = [lib.parent.parent / "include"]
    for site in _site_dirs():
        cands += [site / "nvidia" / "cu13" / "include", site / "nvidia" / "cuda_runtime" / "include"]
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home:
            cands.append(Path(home) / "include")
    nvcc = build.find_nvcc()
    if nvcc:
        cands.append(Path(nvcc).resolve().parent.parent / "include")
    out = []
    for c in cands:
        if (c / "cuda_fp16.h").is_file() and c not in out:
            out.append(c)
    return out


@dataclass(frozen=True)
class CompileResult:
    """A cubin from NVRTC: the image, {instance expression: lowered name}, and what produced it."""

    image: bytes
    names: dict[str, str]
    arch: str
    version: str  # NVRTC's, "13.0"
    options: tuple[str, ...]
    seconds: float
    log: str


class Nvrtc:
    """One loaded libnvrtc (and the directory of the cuda_fp16.h it compiles against)."""

    def __init__(self, lib_path: Path, include_dir: Path) -> None:
        for builtins in sorted(lib_path.parent.glob("libnvrtc-builtins.so.*")):  # NVRTC dlopens it by soname
            if ".alt." not in builtins.name:
                ctypes.CDLL(str(builtins), mode=ctypes.RTLD_GLOBAL)
        self.path = lib_path
        self.include_dir = include_dir
        self.lib = ctypes.CDLL(str(lib_path))
        lib = self.lib
        lib.nvrtcGetErrorString.restype = ctypes.c_char_p
        lib.nvrtcCreateProgram.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.c_char_p, ctypes.c_char_p,
                                           ctypes.c_int, ctypes.POINTER(ctypes.c_char_p),
                                           ctypes.POINTER(ctypes.c_char_p)]  # fmt: skip
        lib.nvrtcCompileProgram.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.POINTER(ctypes.c_char_p)]
        lib.nvrtcAddNameExpression.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
        lib.nvrtcGetLoweredName.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.POINTER(ctypes.c_char_p)]
        for fn in ("nvrtcGetProgramLogSize", "nvrtcGetCUBINSize"):
            getattr(lib, fn).argtypes = [ctypes.c_void_p, ctypes.POINTER(ctypes.c_size_t)]
        for fn in ("nvrtcGetProgramLog", "nvrtcGetCUBIN"):
            getattr(lib, fn).argtypes = [ctypes.c_void_p, ctypes.c_char_p]
        lib.nvrtcDestroyProgram.argtypes = [ctypes.POINTER(ctypes.c_void_p)]
        major, minor = ctypes.c_int(), ctypes.c_int()
        self._check(lib.nvrtcVersion(ctypes.byref(major), ctypes.byref(minor)), "nvrtcVersion")
        self.version = f"{major.value}.{minor.value}"

    def _check(self, rc: int, what: str) -> None:
        if rc != 0:
            raise NvrtcError(f"{what} failed: {self.lib.nvrtcGetErrorString(rc).decode()}")

    def compile(
        self,
        source: str,
        *,
        headers: dict[str, bytes],
        options: list[str],
        name_expressions: list[str],
        name: str = "spqr_kernels.cu",
    ) -> tuple[bytes, dict[str, str], str]:
        """(cubin, {name expression: lowered name}, log) of `source` with in-memory `headers`. `options` must
        name a real architecture (-arch=sm_XY) for NVRTC to produce a cubin. Raises NvrtcError."""
        prog = ctypes.c_void_p()
        hnames = list(headers)
        hsrc = (ctypes.c_char_p * len(hnames))(*[headers[h] for h in hnames])
        hnm = (ctypes.c_char_p * len(hnames))(*[h.encode() for h in hnames])
        self._check(self.lib.nvrtcCreateProgram(ctypes.byref(prog), source.encode(), name.encode(), len(hnames),
                                                hsrc, hnm), "nvrtcCreateProgram")  # fmt: skip
        try:
            for expr in name_expressions:
                self._check(self.lib.nvrtcAddNameExpression(prog, expr.encode()), "nvrtcAddNameExpression")
            opts = (ctypes.c_char_p * len(options))(*[o.encode() for o in options])
            rc = self.lib.nvrtcCompileProgram(prog, len(options), opts)
            size = ctypes.c_size_t()
            self.lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
            buf = ctypes.create_string_buffer(size.value)
            self.lib.nvrtcGetProgramLog(prog, buf)
            log = buf.value.decode(errors="replace").strip()
            if rc != 0:
                raise NvrtcError(f"NVRTC {self.version} could not compile the kernels "
                                 f"({self.lib.nvrtcGetErrorString(rc).decode()}):\n{log}")  # fmt: skip
            lowered = {}
            for expr in name_expressions:
                out = ctypes.c_char_p()
                self._check(
                    self.lib.nvrtcGetLoweredName(prog, expr.encode(), ctypes.byref(out)),
                    "nvrtcGetLoweredName",
                )
                lowered[expr] = out.value.decode()
            self._check(self.lib.nvrtcGetCUBINSize(prog, ctypes.byref(size)), "nvrtcGetCUBINSize")
            if size.value == 0:
                raise NvrtcError(f"NVRTC gave no cubin (options {options}: a real architecture is needed)")
            image = ctypes.create_string_buffer(size.value)
            self._check(self.lib.nvrtcGetCUBIN(prog, image), "nvrtcGetCUBIN")
            return image.raw, lowered, log
        finally:
            self.lib.nvrtcDestroyProgram(ctypes.byref(prog))

    def options(self, arch: str) -> list[str]:
        """The options of a kernel build for `arch` (the cache key includes them)."""
        return [*build.NVRTC_OPTIONS, f"-arch={build.check_arch(arch)}", f"-I{self.include_dir}"]

    def compile_kernels(
        self,
        arch: str,
        bits: list[tuple[int, int]] | tuple[tuple[int, int], ...] = build.BITS,
        sources: dict[str, bytes] | None = None,
    ) -> CompileResult:
        """The kernel instances of `bits` for `arch` (sources: default `build.read_sources()`). The name table
        comes from nvrtcGetLoweredName and is checked against the cubin's symbols. Raises NvrtcError."""
        sources = sources if sources is not None else build.read_sources()
        insts = build.instances(bits)
        options = self.options(arch)
        t0 = time.monotonic()
        image, names, log = self.compile(build.wrapper_source(insts, "nvrtc"), headers=sources, options=options,
                                         name_expressions=[i.expr for i in insts])  # fmt: skip
        seconds = time.monotonic() - t0
        symbols = set(build.elf_function_symbols(image))
        missing = [n for n in names.values() if n not in symbols]
        if missing:
            raise NvrtcError(f"NVRTC's cubin lacks the kernel {missing[0]} it named")
        return CompileResult(image, names, arch, self.version, tuple(options), seconds, log)


@functools.cache
def load_nvrtc(cuda_major: int | None = None) -> Nvrtc:
    """The first usable NVRTC (`nvrtc_candidates`) with a cuda_fp16.h to compile against. Raises
    NvrtcUnavailable with one line naming what is missing and the command that installs it."""
    problems = []
    for lib in nvrtc_candidates(cuda_major):
        includes = cuda_include_dirs(lib)
        if not includes:
            problems.append(f"no cuda_fp16.h for {lib}")
            continue
        try:
            return Nvrtc(lib, includes[0])
        except (OSError, NvrtcError) as e:
            problems.append(f"{lib}: {str(e).splitlines()[0]}")
    wheel = "nvidia-cuda-nvrtc-cu12" if cuda_major == 12 else "nvidia-cuda-nvrtc"
    detail = f" ({'; '.join(problems)})" if problems else ""
    raise NvrtcUnavailable(f"no NVRTC found{detail}: pip install {wheel} (torch's CUDA wheels bring it)")
