"""Where this machine's SpQR kernels come from: a prebuilt cubin, the NVRTC cache, or nowhere (the reference).

In order, for a GPU of architecture `arch` and a model's (wbits, stat_bits):
1. **prebuilt cubin**: the package's cubins (spqr_run/gpu/cubins/, built by nvcc when the package was built),
   when they cover the arch (or an older arch of the same major: sm_86 code runs on sm_87/sm_89), the pair, the
   driver (cubins of CUDA 13 need a driver for CUDA 13: >= 580), and were built from the kernel sources this
   package has (an editable install after a kernel edit no longer matches);
2. **NVRTC cache**: else the pair's kernels compiled by NVRTC for exactly this arch, once, and kept in
   $XDG_CACHE_HOME/spqr-run/kernels (default ~/.cache/spqr-run/kernels), keyed by a hash of the sources, the
   instances, NVRTC's options, the arch and NVRTC's version; written atomically (temporary file + rename);
3. **reference**: else none; the one-line reason names what is missing and the command that fixes it.

$SPQR_RUN_KERNELS=nvrtc skips the prebuilt cubins (to time or test the NVRTC path on a GPU that has them),
=prebuilt skips NVRTC. Standard library only: the caller gives the arch, NVRTC and the driver's CUDA version.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from spqr_run.gpu import build

PREBUILT = "prebuilt cubin"
NVRTC = "NVRTC cache"
REFERENCE = "reference"
CACHE_FORMAT = 1
SOURCE_ENV = "SPQR_RUN_KERNELS"  # "nvrtc" or "prebuilt": only that source


@dataclass(frozen=True)
class KernelPath:
    """Which GPU path runs and why, for the banner, `spqr-bench`, `/metrics` and `spqr-run kernels show`.

    name: PREBUILT, NVRTC or REFERENCE; reason: one line (for the reference, what is missing and the command
    that fixes it)."""

    name: str
    reason: str

    def __str__(self) -> str:
        return f"{self.name} ({self.reason})"


@dataclass(frozen=True)
class KernelImage:
    """A cubin with the symbols of its kernel instances, and where it came from (one line)."""

    image: bytes
    names: dict[str, str]  # instance expression -> symbol
    arch: str
    path: str  # PREBUILT or NVRTC
    origin: str  # e.g. "sm_86 cubin shipped with the package (nvcc 13.0.88)"


class KernelsUnavailable(RuntimeError):
    """No kernels for this GPU: the message is the one-line reason (what is missing, how to fix it)."""


def cache_dir() -> Path:
    """$SPQR_RUN_KERNEL_CACHE, else $XDG_CACHE_HOME/spqr-run/kernels (default ~/.cache/spqr-run/kernels)."""
    if os.environ.get("SPQR_RUN_KERNEL_CACHE"):
        return Path(os.environ["SPQR_RUN_KERNEL_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "spqr-run" / "kernels"


def arch_of(capability: tuple[int, int]) -> str:
    """ "sm_86" for compute capability (8, 6)."""
    return f"sm_{capability[0]}{capability[1]}"


def supported(arch: str) -> bool:
    """Whether the kernels can run on `arch` (sm_80 or newer)."""
    try:
        build.check_arch(arch)
        return True
    except ValueError:
        return False


def _arch_numbers(arch: str) -> tuple[int, int]:
    digits = re.sub(r"\D", "", arch)
    return int(digits[:-1]), int(digits[-1])


# ---- prebuilt -------------------------------------------------------------------------------------------------
def prebuilt(
    arch: str,
    bits: tuple[int, int],
    *,
    directory: Path = build.SHIPPED_CUBINS,
    sources: dict[str, bytes] | None = None,
    driver_cuda: tuple[int, int] | None = None,
) -> KernelImage:
    """The shipped cubin that runs `arch` for `bits`. Raises KernelsUnavailable saying why there is none."""
    manifest = build.read_manifest(directory)
    if manifest is None:
        raise KernelsUnavailable("this install has no prebuilt cubins (no nvcc when it was built)")
    major, minor = _arch_numbers(arch)
    usable = [a for a in manifest.cubins if _arch_numbers(a)[0] == major and _arch_numbers(a)[1] <= minor]
    if not usable:
        raise KernelsUnavailable(
            f"no prebuilt cubin for {arch} (shipped: {', '.join(sorted(manifest.cubins))})"
        )
    if list(bits) not in manifest.bits:
        raise KernelsUnavailable(
            f"the prebuilt cubins have no kernels for wbits={bits[0]}, stat_bits={bits[1]}"
        )
    sources = sources if sources is not None else build.read_sources()
    if manifest.sources_sha256 != build.sources_digest(sources):
        raise KernelsUnavailable("the kernel sources differ from those the prebuilt cubins were built from")
    m = re.search(r"(\d+)\.(\d+)", manifest.compiler)
    built_cuda = (int(m.group(1)), int(m.group(2))) if m else (0, 0)
    if driver_cuda is not None and driver_cuda[0] < built_cuda[0]:
        raise KernelsUnavailable(f"the prebuilt cubins are CUDA {built_cuda[0]}.{built_cuda[1]} and this driver "
                                 f"supports CUDA {driver_cuda[0]}.{driver_cuda[1]}")  # fmt: skip
    best = max(usable, key=_arch_numbers)
    image = (directory / manifest.cubins[best]).read_bytes()
    if hashlib.sha256(image).hexdigest() != manifest.cubin_sha256.get(best):
        raise KernelsUnavailable(
            f"the prebuilt {best} cubin does not match its manifest (reinstall the package)"
        )
    exprs = [i.expr for i in build.instances([bits])]
    names = {e: manifest.names[e] for e in exprs}
    how = "" if best == arch else f", runs {arch}"
    return KernelImage(
        image, names, best, PREBUILT, f"{best} cubin shipped with the package ({manifest.compiler}{how})"
    )


# ---- the NVRTC cache -----------------------------------------------------------------------------------------
def cache_key(
    sources: dict[str, bytes], bits: tuple[int, int], options: list[str], arch: str, version: str
) -> str:
    """sha256 (hex) of what determines an NVRTC build: sources, instances, options, arch, NVRTC version."""
    h = hashlib.sha256()
    for part in (str(CACHE_FORMAT), build.sources_digest(sources), *[i.expr for i in build.instances([bits])],
                 *options, arch, version):  # fmt: skip
        h.update(part.encode() + b"\0")
    return h.hexdigest()


def _include_independent(options: list[str]) -> list[str]:
    """The options without -I (where cuda_fp16.h was found does not change the build)."""
    return [o for o in options if not o.startswith("-I")]


def cached(directory: Path, key: str) -> KernelImage | None:
    """The cache entry `key` (its .json names the instances and the cubin's sha256), None when absent or torn."""
    try:
        meta = json.loads((directory / f"{key}.json").read_text())
        image = (directory / f"{key}.cubin").read_bytes()
    except (OSError, ValueError):
        return None
    if meta.get("format") != CACHE_FORMAT or hashlib.sha256(image).hexdigest() != meta.get("cubin_sha256"):
        return None
    return KernelImage(image, meta["names"], meta["arch"], NVRTC,
                       f"{meta['arch']} cubin from the NVRTC cache (NVRTC {meta['nvrtc']}, {directory})")  # fmt: skip


def nvrtc_image(
    arch: str,
    bits: tuple[int, int],
    *,
    nvrtc_loader: Callable[[], object],
    directory: Path | None = None,
    sources: dict[str, bytes] | None = None,
    compile_missing: bool = True,
) -> KernelImage:
    """The pair's kernels for `arch` from the NVRTC cache, compiled and cached first when absent (unless
    `compile_missing` is False). nvrtc_loader: returns an `nvrtc.Nvrtc` or raises NvrtcUnavailable. Raises
    KernelsUnavailable (no NVRTC, a failed compile: the first line of its log)."""
    from spqr_run.gpu.nvrtc import NvrtcError, NvrtcUnavailable

    directory = directory or cache_dir()
    sources = sources if sources is not None else build.read_sources()
    try:
        nv = nvrtc_loader()
    except NvrtcUnavailable as e:
        raise KernelsUnavailable(str(e)) from e
    key = cache_key(sources, bits, _include_independent(nv.options(arch)), arch, nv.version)
    hit = cached(directory, key)
    if hit is not None or not compile_missing:
        if hit is None:
            raise KernelsUnavailable(
                f"the {arch} kernels are not in the NVRTC cache yet (compiled at model load)"
            )
        return hit
    try:
        result = nv.compile_kernels(arch, [bits], sources)
    except NvrtcError as e:
        raise KernelsUnavailable(str(e).splitlines()[0]) from e
    meta = {"format": CACHE_FORMAT, "arch": arch, "bits": list(bits), "nvrtc": nv.version,
            "options": list(result.options), "names": result.names, "seconds": round(result.seconds, 3),
            "cubin_sha256": hashlib.sha256(result.image).hexdigest()}  # fmt: skip
    build.write_atomic(
        directory / f"{key}.cubin", result.image
    )  # the cubin first: the .json makes it an entry
    build.write_atomic(directory / f"{key}.json", (json.dumps(meta, indent=1) + "\n").encode())
    return KernelImage(result.image, result.names, arch, NVRTC,
                       f"{arch} cubin compiled by NVRTC {nv.version} in {result.seconds:.1f} s, cached in {directory}")  # fmt: skip


# ---- in order -------------------------------------------------------------------------------------------------
def candidates(
    arch: str,
    bits: tuple[int, int],
    *,
    nvrtc_loader: Callable[[], object],
    driver_cuda: tuple[int, int] | None = None,
    compile_missing: bool = True,
    reasons: list[str] | None = None,
) -> Iterator[KernelImage]:
    """The images to try in order (prebuilt, then NVRTC), each found only when the previous one is not taken;
    the reasons the skipped ones gave are appended to `reasons`."""
    reasons = reasons if reasons is not None else []
    only = os.environ.get(SOURCE_ENV, "").strip().lower()
    if not supported(arch):
        reasons.append(f"the kernels need sm_80 or newer (mma.sync m16n8k16, cp.async); this GPU is {arch}")
        return
    try:
        sources = build.read_sources()
    except build.BuildError as e:
        reasons.append(str(e))
        return
    if only == "nvrtc":
        reasons.append(f"{SOURCE_ENV}=nvrtc: the prebuilt cubins are not used")
    else:
        try:
            yield prebuilt(arch, bits, sources=sources, driver_cuda=driver_cuda)
        except KernelsUnavailable as e:
            reasons.append(str(e))
    if only == "prebuilt":
        reasons.append(f"{SOURCE_ENV}=prebuilt: NVRTC is not used")
        return
    try:
        yield nvrtc_image(
            arch, bits, nvrtc_loader=nvrtc_loader, sources=sources, compile_missing=compile_missing
        )
    except KernelsUnavailable as e:
        reasons.append(str(e))


def predict(
    arch: str,
    bits: tuple[int, int] | None,
    *,
    nvrtc_loader: Callable[[], object],
    driver_cuda: tuple[int, int] | None = None,
) -> KernelPath:
    """The path a GPU of `arch` would take for `bits` (default: the 3-bit pair), without compiling anything."""
    bits = bits or (3, 3)
    if not supported(arch):
        return KernelPath(
            REFERENCE, f"the kernels need sm_80 or newer (mma.sync m16n8k16, cp.async); this GPU is {arch}"
        )
    reasons: list[str] = []
    try:
        sources = build.read_sources()
        try:
            if os.environ.get(SOURCE_ENV, "").strip().lower() == "nvrtc":
                raise KernelsUnavailable(f"{SOURCE_ENV}=nvrtc: the prebuilt cubins are not used")
            img = prebuilt(arch, bits, sources=sources, driver_cuda=driver_cuda)
            return KernelPath(PREBUILT, img.origin)
        except KernelsUnavailable as e:
            reasons.append(str(e))
        try:
            img = nvrtc_image(arch, bits, nvrtc_loader=nvrtc_loader, sources=sources, compile_missing=False)
            return KernelPath(NVRTC, f"{reasons[0]}; {img.origin}")
        except KernelsUnavailable as e:
            if "not in the NVRTC cache yet" in str(e):
                nv = nvrtc_loader()
                return KernelPath(NVRTC, f"{reasons[0]}; NVRTC {nv.version} ({nv.path}) compiles them for {arch} "
                                         f"at model load (~1 s) into {cache_dir()}")  # fmt: skip
            reasons.append(str(e))
    except build.BuildError as e:
        reasons.append(str(e))
    return KernelPath(REFERENCE, "; ".join(reasons))
