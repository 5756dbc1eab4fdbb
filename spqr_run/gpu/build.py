"""Builds the SpQR CUDA kernels (kernels/spqr_matmul.cu) into cubins, with the table of their symbol names.

Standard library only (no torch, nothing else of the package): `setup.py` loads this file by path inside pip's
isolated build environment, and `spqr-run kernels build` and the NVRTC path (`spqr_run.gpu.nvrtc`) use it too.

What a build is:
- the device sources (`KERNEL_FILES`, hashed: `sources_digest`) and one generated translation unit that includes
  them and names the kernel instances to emit (`wrapper_source`): every (wbits, stat_bits) pair of `BITS`, or
  only a model's pair for NVRTC at model load;
- per architecture one cubin (`nvcc -cubin`, or NVRTC's `nvrtcGetCUBIN`): exactly the SASS the SASS report reads
  (`benchmarks/sass_report.py`);
- a manifest (`manifest.json`): compiler and version, options, the sources' digest, the cubin of each arch with
  its sha256, and the name table {instance expression: mangled symbol}, e.g.
  "spqr::spqr_matmul_small_kernel<3, 3, 1>" -> "_ZN4spqr24spqr_matmul_small_kernelILi3ELi3ELi1EEEv9SpqrLayer...".
  The kernels live in the named namespace `spqr`, so the symbols are the same under nvcc, NVRTC and g++ and do not
  depend on the compiling process; the launcher still looks every name up in the table, never mangles one itself.

The shipped build (`package_kernels`, called by setup.py) writes cubins for `ARCHS` into the package
(spqr_run/gpu/cubins/) when an nvcc is found, and is incremental: an up-to-date manifest (same sources, options,
compiler, archs, instances) is kept as it is. Without nvcc it prints one warning line and the package installs
without cubins (the runtime then compiles with NVRTC, or uses the reference).
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

KERNEL_FILES = ("spqr_matmul.cu", "spqr_matmul.h", "spqr_ptx.cuh")  # the device sources, in hash order
MAIN_SOURCE = "spqr_matmul.cu"
NAMESPACE = "spqr"
ARCHS = ("sm_80", "sm_86", "sm_89", "sm_90")  # the shipped cubins
BITS = tuple((w, sb) for w in (2, 3, 4) for sb in (2, 3, 4))  # (wbits, stat_bits) pairs with kernels
# kernel -> its template parameters: the small-batch matmul (NT n-tiles of 8 activation rows) and the dequantize
KERNELS = {"spqr_matmul_small_kernel": ("W", "SB", "NT"), "spqr_dequantize_kernel": ("W", "SB")}
# -O3: the kernels use no transcendental functions, so --use_fast_math would buy nothing and could only change
# results; -lineinfo: source lines for compute-sanitizer and profilers (no change to the SASS)
NVCC_OPTIONS = ("-std=c++20", "-O3")
NVCC_STRICT = ("-Werror", "all-warnings")  # CI: any nvcc/ptxas warning fails the build
NVRTC_OPTIONS = ("-std=c++20", "-lineinfo")
MANIFEST = "manifest.json"
MANIFEST_FORMAT = 1
CUBINS_ENV = "SPQR_RUN_CUBINS"  # "skip": build none; "require": fail the install when they cannot be built
PACKAGE_DIR = Path(__file__).resolve().parent  # spqr_run/gpu
REPO_KERNELS = PACKAGE_DIR.parents[1] / "kernels"  # a source checkout (editable install)
PACKAGED_KERNELS = PACKAGE_DIR / "src"  # the copy a wheel carries (setup.py)
SHIPPED_CUBINS = PACKAGE_DIR / "cubins"


class BuildError(RuntimeError):
    """A kernel build failed (the compiler's output follows the first line)."""


# ---- what is built ------------------------------------------------------------------------------------------
@dataclass(frozen=True, order=True)
class Instance:
    """One kernel template instance, e.g. spqr_matmul_small_kernel with (W, SB, NT) = (3, 3, 1)."""

    kernel: str
    args: tuple[int, ...]

    @property
    def expr(self) -> str:
        """Its C++ name, as NVRTC name expressions and the name table write it."""
        return f"{NAMESPACE}::{self.kernel}<{', '.join(map(str, self.args))}>"


def instances(bits: tuple[tuple[int, int], ...] | list[tuple[int, int]] = BITS) -> list[Instance]:
    """The kernel instances of the given (wbits, stat_bits) pairs: small-batch with 1 and 2 n-tiles, and the
    dequantize kernel. Raises ValueError for a pair without kernels."""
    out = []
    for w, sb in bits:
        if (w, sb) not in BITS:
            raise ValueError(f"no kernels for wbits={w}, stat_bits={sb} (pairs: {BITS})")
        out += [
            Instance("spqr_matmul_small_kernel", (w, sb, 1)),
            Instance("spqr_matmul_small_kernel", (w, sb, 2)),
            Instance("spqr_dequantize_kernel", (w, sb)),
        ]
    return out


def sources_dir() -> Path:
    """The kernel sources: kernels/ of a source checkout (an editable install), else the copy in the package."""
    for d in (REPO_KERNELS, PACKAGED_KERNELS):
        if all((d / f).is_file() for f in KERNEL_FILES):
            return d
    raise BuildError(
        f"the CUDA kernel sources are not found (looked in {REPO_KERNELS} and {PACKAGED_KERNELS})"
    )


def read_sources(directory: Path | None = None) -> dict[str, bytes]:
    """{file name: bytes} of `KERNEL_FILES` in `directory` (default `sources_dir()`)."""
    d = directory or sources_dir()
    return {name: (d / name).read_bytes() for name in KERNEL_FILES}


def sources_digest(sources: dict[str, bytes]) -> str:
    """sha256 (hex) over the sources' names and bytes."""
    h = hashlib.sha256()
    for name in sorted(sources):
        h.update(name.encode() + b"\0" + len(sources[name]).to_bytes(8, "little") + sources[name])
    return h.hexdigest()


def wrapper_source(insts: list[Instance], compiler: str) -> str:
    """The translation unit a build compiles: the kernels' source plus, for nvcc, a reference to each instance
    (taking a kernel's address instantiates it; NVRTC gets the same names as name expressions instead)."""
    lines = [f'#include "{MAIN_SOURCE}"', ""]
    if compiler == "nvcc":
        lines += [
            "// The kernel instances this build emits (spqr_run/gpu/build.py): taking their addresses instantiates them.",
            "[[maybe_unused]] static const void* const spqr_instances[] = {",
            *(f"    reinterpret_cast<const void*>(&{i.expr})," for i in insts),
            "};",
        ]
    return "\n".join(lines) + "\n"


# ---- cubin symbols ----------------------------------------------------------------------------------------
def elf_function_symbols(image: bytes) -> list[str]:
    """Names of the global function symbols of an ELF64 little-endian image (a cubin: its kernels). Raises
    ValueError when `image` is not one."""
    if len(image) < 64 or image[:4] != b"\x7fELF" or image[4] != 2 or image[5] != 1:
        raise ValueError("not an ELF64 little-endian image")
    (shoff, _, _, _, _, shentsize, shnum) = struct.unpack_from("<QIHHHHH", image, 0x28)
    sections = [struct.unpack_from("<IIQQQQIIQQ", image, shoff + i * shentsize) for i in range(shnum)]
    names = []
    for _, sh_type, _, _, offset, size, link, _, _, entsize in sections:
        if sh_type != 2 or entsize != 24:  # SHT_SYMTAB, Elf64_Sym
            continue
        strtab = sections[link]
        str_off, str_size = strtab[4], strtab[5]
        for k in range(size // 24):
            st_name, st_info, _, st_shndx, _, _ = struct.unpack_from("<IBBHQQ", image, offset + 24 * k)
            if (
                st_info & 0xF == 2 and st_info >> 4 in (1, 2) and st_shndx != 0
            ):  # STT_FUNC, GLOBAL/WEAK, defined
                end = image.index(b"\0", str_off + st_name, str_off + str_size)
                names.append(image[str_off + st_name : end].decode())
    return names


def demangle_instance(symbol: str) -> Instance | None:
    """The kernel instance an Itanium-mangled symbol names (`_ZN4spqr<len><kernel>I<Li..E...>E...`), or None
    when it is not a function template of namespace `spqr` with integer arguments."""
    m = re.match(rf"_ZN{len(NAMESPACE)}{NAMESPACE}(\d+)", symbol)
    if not m:
        return None
    n = int(m.group(1))
    kernel = symbol[m.end() : m.end() + n]
    rest = symbol[m.end() + n :]
    a = re.match(r"I((?:Li-?n?\d+E)+)E", rest)
    if len(kernel) != n or not a:
        return None
    return Instance(kernel, tuple(int(v.replace("n", "-")) for v in re.findall(r"Li(n?\d+)E", a.group(1))))


def name_table(image: bytes, insts: list[Instance]) -> dict[str, str]:
    """{instance expression: symbol} for `insts`, read from a cubin's symbols. Raises BuildError when one is
    missing (the build did not emit it)."""
    found = {}
    for sym in elf_function_symbols(image):
        inst = demangle_instance(sym)
        if inst is not None:
            found[inst.expr] = sym
    missing = [i.expr for i in insts if i.expr not in found]
    if missing:
        raise BuildError(f"the cubin lacks {len(missing)} kernel instances, e.g. {missing[0]}")
    return {i.expr: found[i.expr] for i in insts}


# ---- nvcc ---------------------------------------------------------------------------------------------------
def find_nvcc(nvcc: str | None = None) -> str | None:
    """nvcc: the argument, $NVCC, on PATH, under $CUDA_HOME or /usr/local/cuda*; None when there is none."""
    candidates = [nvcc, os.environ.get("NVCC"), shutil.which("nvcc")]
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home:
            candidates.append(str(Path(home) / "bin" / "nvcc"))
    candidates += sorted(glob.glob("/usr/local/cuda-*/bin/nvcc"), reverse=True)
    for c in candidates:
        if c and os.path.isfile(c) and os.access(c, os.X_OK):
            return c
    return None


def nvcc_version(nvcc: str) -> str:
    """ "13.0.88" from `nvcc --version` ("Cuda compilation tools, release 13.0, V13.0.88"). Raises BuildError."""
    res = subprocess.run([nvcc, "--version"], capture_output=True, text=True)
    m = re.search(r"\bV(\d+\.\d+\.\d+)", res.stdout)
    if res.returncode != 0 or not m:
        raise BuildError(
            f"{nvcc} --version did not give a version: {(res.stdout + res.stderr).strip()[:200]}"
        )
    return m.group(1)


def check_arch(arch: str) -> str:
    """`arch` as sm_XY (sm_80 or newer). Raises ValueError."""
    if not re.fullmatch(r"sm_\d{2,3}[af]?", arch) or int(re.sub(r"\D", "", arch)) < 80:
        raise ValueError(f"{arch!r} is not an architecture the kernels support (sm_80 or newer, e.g. sm_86)")
    return arch


def compile_nvcc(
    arch: str, out: Path, *, nvcc: str, source_dir: Path, insts: list[Instance], strict: bool = False
) -> bytes:
    """`nvcc -cubin` of the kernels for one arch into `out` (written atomically); returns the image. Raises
    BuildError with nvcc's output when it fails, or with `strict` when it prints anything (a warning)."""
    check_arch(arch)
    with tempfile.TemporaryDirectory(prefix="spqr-nvcc-") as tmp:
        src = Path(tmp) / "spqr_kernels.cu"
        src.write_text(wrapper_source(insts, "nvcc"))
        cubin = Path(tmp) / f"{arch}.cubin"
        cmd = [nvcc, *NVCC_OPTIONS, *(NVCC_STRICT if strict else ()), f"-arch={arch}", f"-I{source_dir}",
               "-cubin", str(src), "-o", str(cubin)]  # fmt: skip
        res = subprocess.run(cmd, capture_output=True, text=True)
        log = (res.stdout + res.stderr).strip()
        if res.returncode != 0 or (strict and log):
            raise BuildError(f"nvcc failed for {arch} ({' '.join(cmd)}):\n{log}")
        image = cubin.read_bytes()
    write_atomic(out, image)
    return image


def write_atomic(path: Path, data: bytes) -> None:
    """Writes `data` to `path` through a temporary file in the same directory and a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# ---- the manifest ---------------------------------------------------------------------------------------------
@dataclass
class Manifest:
    """What a directory of cubins holds (manifest.json)."""

    compiler: str  # "nvcc 13.0.88", "nvrtc 13.0"
    options: list[str]
    sources_sha256: str
    bits: list[list[int]]  # the (wbits, stat_bits) pairs built
    cubins: dict[str, str]  # arch -> file name
    cubin_sha256: dict[str, str]  # arch -> sha256 of that file
    names: dict[str, str]  # instance expression -> symbol
    format: int = MANIFEST_FORMAT
    build_seconds: dict[str, float] = field(default_factory=dict)

    def key(self) -> tuple:
        """What must match for a build to be reused."""
        return (self.format, self.compiler, tuple(self.options), self.sources_sha256, sorted(map(tuple, self.bits)),
                sorted(self.cubins))  # fmt: skip


def read_manifest(directory: Path) -> Manifest | None:
    """The manifest of `directory`, or None when it is absent or unreadable (an older format, a partial write)."""
    try:
        data = json.loads((directory / MANIFEST).read_text())
        if data.get("format") != MANIFEST_FORMAT:
            return None
        return Manifest(**data)
    except (OSError, ValueError, TypeError):
        return None


def cubins_intact(directory: Path, manifest: Manifest) -> bool:
    """Every cubin the manifest lists is there with its recorded sha256."""
    for arch, name in manifest.cubins.items():
        try:
            if hashlib.sha256((directory / name).read_bytes()).hexdigest() != manifest.cubin_sha256.get(arch):
                return False
        except OSError:
            return False
    return True


def build_cubins(
    out_dir: Path,
    archs: tuple[str, ...] | list[str] = ARCHS,
    *,
    nvcc: str | None = None,
    bits: tuple[tuple[int, int], ...] | list[tuple[int, int]] = BITS,
    strict: bool = False,
    jobs: int | None = None,
    source_dir: Path | None = None,
    force: bool = False,
) -> tuple[Manifest, bool]:
    """nvcc cubins of the kernels for `archs` in `out_dir`, with the manifest (written last). Returns (manifest,
    built): built is False when an up-to-date build was already there (and `force` is not set).

    jobs: parallel nvcc processes (default: the CPU count, at most the number of archs). Raises BuildError when
    no nvcc is found or a compile fails."""
    archs = sorted({check_arch(a) for a in archs})
    nvcc = find_nvcc(nvcc)
    if nvcc is None:
        raise BuildError("no nvcc found (PATH, $NVCC, $CUDA_HOME, /usr/local/cuda*)")
    source_dir = source_dir or sources_dir()
    insts = instances(bits)
    options = [*NVCC_OPTIONS, "-cubin"]
    wanted = Manifest(compiler=f"nvcc {nvcc_version(nvcc)}", options=options,
                      sources_sha256=sources_digest(read_sources(source_dir)), bits=[list(b) for b in bits],
                      cubins={a: f"{a}.cubin" for a in archs}, cubin_sha256={}, names={})  # fmt: skip
    old = read_manifest(out_dir)
    if not force and old is not None and old.key() == wanted.key() and cubins_intact(out_dir, old):
        return old, False
    (out_dir / MANIFEST).unlink(missing_ok=True)  # a reader never pairs the old manifest with new cubins

    def one(arch: str) -> tuple[str, bytes, float]:
        t0 = _now()
        image = compile_nvcc(arch, out_dir / f"{arch}.cubin", nvcc=nvcc, source_dir=source_dir, insts=insts,
                             strict=strict)  # fmt: skip
        return arch, image, round(_now() - t0, 2)

    workers = max(1, min(len(archs), jobs or os.cpu_count() or 1))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        results = list(pool.map(one, archs))
    tables = {arch: name_table(image, insts) for arch, image, _ in results}
    first = tables[archs[0]]
    for arch, table in tables.items():
        if table != first:
            raise BuildError(f"the kernel symbols of {arch} differ from those of {archs[0]}")
    wanted.names = first
    wanted.cubin_sha256 = {arch: hashlib.sha256(image).hexdigest() for arch, image, _ in results}
    wanted.build_seconds = {arch: s for arch, _, s in results}
    write_atomic(out_dir / MANIFEST, (json.dumps(asdict(wanted), indent=1, sort_keys=True) + "\n").encode())
    return wanted, True


def _now() -> float:
    import time

    return time.monotonic()


# ---- the packaging step (setup.py) ----------------------------------------------------------------------------
def package_kernels(out_dir: Path, *, sources_out: Path | None = None, log=print) -> Manifest | None:
    """The packaging step: cubins for `ARCHS` into `out_dir` (incremental), and the kernel sources copied into
    `sources_out` (a wheel's copy, for NVRTC; None for an editable install, which reads kernels/).

    $SPQR_RUN_CUBINS: "skip" builds none; "require" raises BuildError when they cannot be built (CI); otherwise a
    missing nvcc or a failed build logs one warning line and returns None (the install goes on).
    """
    mode = os.environ.get(CUBINS_ENV, "").strip().lower()
    try:
        src = sources_dir()
    except BuildError as e:  # an sdist without kernels/ (MANIFEST.in ships it)
        if mode == "require":
            raise
        log(f"warning: spqr-run: no CUDA kernels in this build ({e}); GPUs will run the reference path")
        return None
    if sources_out is not None:
        sources_out.mkdir(parents=True, exist_ok=True)
        for name in KERNEL_FILES:
            shutil.copyfile(src / name, sources_out / name)
    if mode == "skip":
        log(f"spqr-run: {CUBINS_ENV}=skip: no prebuilt CUDA kernels (the runtime compiles them with NVRTC)")
        return None
    try:
        t0 = _now()
        manifest, built = build_cubins(out_dir, source_dir=src, strict=mode == "require")
    except BuildError as e:
        if mode == "require":
            raise
        first = str(e).splitlines()[0]
        log(f"warning: spqr-run: prebuilt CUDA kernels not built ({first}); GPUs will compile them with "
            "NVRTC at first use (`spqr-run kernels show` says which path runs)")  # fmt: skip
        return None
    what = "built" if built else "up to date"
    log(
        f"spqr-run: CUDA kernels {what}: {', '.join(manifest.cubins)} ({manifest.compiler}, {_now() - t0:.1f} s)"
    )
    return manifest


def main(argv: list[str] | None = None) -> int:
    """`python spqr_run/gpu/build.py --out DIR [--arch sm_80 ...]`: the nvcc build without the package."""
    ap = argparse.ArgumentParser(description="Build the SpQR CUDA kernels into cubins with nvcc.")
    ap.add_argument("--out", type=Path, default=SHIPPED_CUBINS)
    ap.add_argument("--arch", nargs="+", default=list(ARCHS))
    ap.add_argument("--strict", action="store_true", help="fail on any nvcc warning")
    ap.add_argument("--force", action="store_true", help="rebuild even when up to date")
    args = ap.parse_args(argv)
    try:
        manifest, built = build_cubins(args.out, args.arch, strict=args.strict, force=args.force)
    except (BuildError, ValueError) as e:
        print(f"build: {e}", file=sys.stderr)
        return 1
    print(f"{'built' if built else 'up to date'}: {args.out} ({manifest.compiler}, {manifest.build_seconds})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
