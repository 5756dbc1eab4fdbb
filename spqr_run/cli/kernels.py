"""`spqr-run kernels build` and `spqr-run kernels show`: the CUDA kernels' build, and which path this machine takes.

    spqr-run kernels build --arch sm_86 --compiler nvcc --out DIR          # every (wbits, stat_bits)
    spqr-run kernels build --arch sm_120 --compiler nvrtc --wbits 3 --stat-bits 3 --out DIR
    spqr-run kernels show [--check]

`build` writes one cubin per arch and manifest.json (compiler, options, sources digest, name table): what the
packaging step ships (nvcc, spqr_run/gpu/build.py) or what a GPU would compile at model load (NVRTC, the same
sources and options). `show` says, per visible GPU, which path runs (prebuilt cubin, NVRTC cache, reference) and
why, what the package ships, which NVRTC it would use and where its cache is; `--check` exits 1 unless the
package holds prebuilt cubins built from its kernel sources (CI's proof that the install built them).
"""

from __future__ import annotations

import argparse
import hashlib
import json
from dataclasses import asdict
from pathlib import Path

from spqr_run.errors import ConfigError


def add_parser(sub: argparse._SubParsersAction) -> None:
    k = sub.add_parser(
        "kernels",
        help="build the CUDA kernels, or show which GPU path this machine takes",
        description="Build the SpQR CUDA kernels into cubins (nvcc or NVRTC), or show which GPU path runs here.",
    )
    ks = k.add_subparsers(dest="kernels_command", required=True)
    b = ks.add_parser("build", help="write cubins and their name table (manifest.json) to --out")
    b.add_argument("--arch", nargs="+", default=None, help="e.g. sm_86 (default: sm_80 sm_86 sm_89 sm_90)")
    b.add_argument(
        "--compiler",
        choices=("nvcc", "nvrtc"),
        default="nvcc",
        help="nvcc (what ships) or NVRTC (default: nvcc)",
    )
    b.add_argument("--wbits", type=int, choices=(2, 3, 4), default=None, help="only this pair's kernels")
    b.add_argument(
        "--stat-bits", type=int, choices=(2, 3, 4), default=None, help="with --wbits: that pair only"
    )
    b.add_argument("--out", type=Path, required=True, help="directory for the cubins and manifest.json")
    b.add_argument("--strict", action="store_true", help="nvcc: fail on any warning")
    s = ks.add_parser("show", help="which GPU path this machine takes, and why")
    s.add_argument("--check", action="store_true", help="exit 1 unless the package ships up-to-date cubins")


def run(args: argparse.Namespace) -> int:
    if args.kernels_command == "build":
        return build(args)
    return show(check=args.check)


def build(args: argparse.Namespace) -> int:
    from spqr_run.gpu import build as gb

    if (args.wbits is None) != (args.stat_bits is None):
        raise ConfigError("--wbits and --stat-bits go together")
    bits = [(args.wbits, args.stat_bits)] if args.wbits is not None else list(gb.BITS)
    archs = args.arch or list(gb.ARCHS)
    try:
        for a in archs:
            gb.check_arch(a)
    except ValueError as e:
        raise ConfigError(str(e)) from e
    if args.compiler == "nvcc":
        try:
            manifest, built = gb.build_cubins(args.out, archs, bits=bits, strict=args.strict, force=True)
        except gb.BuildError as e:
            raise ConfigError(str(e).splitlines()[0]) from e
    else:
        manifest = _build_nvrtc(args.out, archs, bits)
    for arch, seconds in sorted(manifest.build_seconds.items()):
        print(f"{args.out / manifest.cubins[arch]}: {manifest.compiler}, {seconds:.1f} s")
    print(f"{args.out / gb.MANIFEST}: {len(manifest.names)} kernel instances")
    return 0


def _build_nvrtc(out: Path, archs: list[str], bits: list[tuple[int, int]]):
    from spqr_run.gpu import build as gb
    from spqr_run.gpu.nvrtc import NvrtcError, NvrtcUnavailable
    from spqr_run.ops.spqr_matmul import _nvrtc_loader

    try:
        nv = _nvrtc_loader()
    except NvrtcUnavailable as e:
        raise ConfigError(str(e)) from e
    sources = gb.read_sources()
    (out / gb.MANIFEST).unlink(missing_ok=True)
    names, shas, seconds, options = None, {}, {}, []
    for arch in archs:
        try:
            r = nv.compile_kernels(arch, bits, sources)
        except NvrtcError as e:
            raise ConfigError(str(e).splitlines()[0]) from e
        if names is not None and r.names != names:
            raise ConfigError(f"NVRTC's kernel symbols for {arch} differ from those of {archs[0]}")
        names, options = r.names, [o for o in r.options if not o.startswith(("-arch", "-I"))]
        gb.write_atomic(out / f"{arch}.cubin", r.image)
        shas[arch], seconds[arch] = hashlib.sha256(r.image).hexdigest(), round(r.seconds, 2)
    manifest = gb.Manifest(compiler=f"nvrtc {nv.version}", options=options, sources_sha256=gb.sources_digest(sources),
                           bits=[list(b) for b in bits], cubins={a: f"{a}.cubin" for a in archs}, cubin_sha256=shas,
                           names=names or {}, build_seconds=seconds)  # fmt: skip
    gb.write_atomic(
        out / gb.MANIFEST, (json.dumps(asdict(manifest), indent=1, sort_keys=True) + "\n").encode()
    )
    return manifest


def show(*, check: bool = False) -> int:
    import torch

    from spqr_run.gpu import build as gb
    from spqr_run.gpu import modules
    from spqr_run.gpu.nvrtc import NvrtcUnavailable
    from spqr_run.ops import kernel_path
    from spqr_run.ops.spqr_matmul import _nvrtc_loader

    print(f"torch {torch.__version__}, CUDA {torch.version.cuda or 'none (a CPU-only build)'}")
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            cap = torch.cuda.get_device_capability(i)
            name = torch.cuda.get_device_name(i)
            print(f"cuda:{i} {name} ({modules.arch_of(cap)}): {kernel_path(torch.device('cuda', i))}")
    else:
        print(f"GPU: {kernel_path()}")
    manifest = gb.read_manifest(gb.SHIPPED_CUBINS)
    problem = None
    if manifest is None:
        problem = f"no prebuilt cubins in {gb.SHIPPED_CUBINS} (reinstall with nvcc on PATH: pip install -e .)"
        print(f"prebuilt: none ({problem})")
    else:
        try:
            same = manifest.sources_sha256 == gb.sources_digest(gb.read_sources())
        except gb.BuildError as e:
            same, problem = False, str(e)
        if not same and problem is None:
            problem = "the kernel sources changed since the cubins were built (rebuild: pip install -e .)"
        if not gb.cubins_intact(gb.SHIPPED_CUBINS, manifest):
            problem = "a prebuilt cubin does not match its manifest (rebuild: pip install -e .)"
        state = "built from these kernel sources" if problem is None else problem
        print(f"prebuilt: {', '.join(sorted(manifest.cubins))} ({manifest.compiler}; {state})")
    try:
        nv = _nvrtc_loader()
        print(f"NVRTC: {nv.version} ({nv.path}; cuda_fp16.h from {nv.include_dir})")
    except NvrtcUnavailable as e:
        print(f"NVRTC: {e}")
    cache = modules.cache_dir()
    entries = len(list(cache.glob("*.json"))) if cache.is_dir() else 0
    print(f"NVRTC cache: {cache} ({entries} entries)")
    if check and problem is not None:
        print(f"kernels show --check: {problem}")
        return 1
    return 0
