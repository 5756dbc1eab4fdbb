"""Static performance report of the CUDA kernels: ptxas resource use and the SASS of each kernel's hot loop.

    python benchmarks/sass_report.py                 # table (markdown) for BENCHMARKS.md
    python benchmarks/sass_report.py --ptxas-check   # CI: fail on register spills or local memory (.ci/kernel-shim)

Compiles kernels/spqr_matmul.cu with nvcc for sm_80, sm_86, sm_89 and sm_90 (`-Xptxas -v`), then, when
`cuobjdump` and `nvdisasm` are available (the toolkit's, or the `nvidia-cuda-cuobjdump` and
`nvidia-cuda-nvdisasm` wheels installed with `pip install --target build/tools/<name>`), disassembles each
kernel and prints per kernel variant (wbits W, stat bits SB, row capacity BT) and architecture:

- regs: registers per thread (ptxas); smem: static shared memory per block in bytes;
- blocks/SM: resident blocks per SM at the launch configuration, the minimum of the register, shared-memory,
  thread and block limits of that architecture (the occupancy calculator's formula, register allocation
  granularity 256 per warp; shared memory with the 1 KiB per-block reservation);
- loop insts/weight: SASS instructions of the innermost backward-branch loop (the hot loop) divided by the weights
  one thread decodes per iteration (matvec: 2 tiles x 128 codes; small batch: 64; dequantize: 16, no loop: the
  whole kernel);
- gload width: widths in bits of the global loads (LDG) in that loop;
- loads first: "yes" when every global load of the loop body is issued before its first floating-point math
  instruction (so the loads of one iteration are in flight together instead of load-use-load-use).
"""

from __future__ import annotations

import argparse
import glob
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT / "kernels" / "spqr_matmul.cu"
ARCHS = ("80", "86", "89", "90")
# per-SM limits (CUDA C Programming Guide, "Compute Capabilities" table): registers, shared memory usable by
# blocks (bytes), threads, blocks
SM_LIMITS = {
    "80": (65536, 164 * 1024, 2048, 32),
    "86": (65536, 100 * 1024, 1536, 16),
    "89": (65536, 100 * 1024, 1536, 24),
    "90": (65536, 228 * 1024, 2048, 32),
}
THREADS = {"matvec": 256, "small": 256, "dequantize": 512}  # block sizes of the launchers
WEIGHTS_PER_ITER = {"matvec": 256, "small": 64, "dequantize": 16}
FLOAT_MATH = ("FFMA", "FADD", "FMUL", "HFMA2", "HADD2", "HMUL2", "F2F", "I2F", "F2I")


def find_nvcc() -> str | None:
    for c in [os.environ.get("NVCC"), shutil.which("nvcc"), f"{os.environ.get('CUDA_HOME', '/none')}/bin/nvcc",
              "/usr/local/cuda/bin/nvcc", *sorted(glob.glob("/usr/local/cuda-*/bin/nvcc"))]:  # fmt: skip
        if c and os.path.exists(c):
            return c
    return None


def find_tool(name: str, nvcc: str, tools: Path) -> str | None:
    """`name` (cuobjdump, nvdisasm) on PATH, next to nvcc, or from the pip wheels under `tools`."""
    for c in [shutil.which(name), str(Path(nvcc).parent / name),
              *glob.glob(str(tools / "**" / "bin" / name), recursive=True)]:  # fmt: skip
        if c and os.path.exists(c):
            return c
    return None


@dataclass
class Kernel:
    arch: str
    mangled: str
    kind: str
    variant: str
    regs: int = 0
    smem: int = 0
    stack: int = 0
    spill_stores: int = 0
    spill_loads: int = 0
    lmem: bool = False


def demangled_variant(mangled: str) -> tuple[str, str]:
    """("matvec" | "small" | "dequantize", "W3 SB3" / "W3 SB3 BT16") from the mangled kernel name."""
    m = re.search(r"spqr_(matvec|matmul_small|dequantize)_kernel((?:ILi\d+E)?(?:Li\d+E)*)", mangled)
    kind = {"matvec": "matvec", "matmul_small": "small", "dequantize": "dequantize"}[m.group(1)]
    nums = re.findall(r"Li(\d+)E", m.group(2))
    names = ["W", "SB", "BT"]
    return kind, " ".join(f"{n}{v}" for n, v in zip(names, nums, strict=False))


def compile_ptxas(nvcc: str, out: Path) -> tuple[list[Kernel], Path]:
    """nvcc -Xptxas -v for every arch: per-kernel resources, and the object file (for cuobjdump). Reuses
    out/spqr_matmul.o and out/ptxas.log when they are newer than the source (--keep)."""
    obj, log = out / "spqr_matmul.o", out / "ptxas.log"
    if not (obj.exists() and log.exists() and obj.stat().st_mtime > SOURCE.stat().st_mtime):
        gencode = [f for a in ARCHS for f in ("-gencode", f"arch=compute_{a},code=sm_{a}")]
        cmd = [nvcc, "-std=c++20", "-O3", f"-I{ROOT / 'kernels'}", *gencode,
               "-Xptxas", "-v,-warn-spills,-warn-lmem-usage", "-c", str(SOURCE), "-o", str(obj)]  # fmt: skip
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode != 0:
            sys.exit(f"sass_report: nvcc failed:\n{res.stdout}{res.stderr}")
        log.write_text(res.stdout + res.stderr)
    kernels: list[Kernel] = []
    cur: Kernel | None = None
    for line in log.read_text().splitlines():
        if m := re.search(r"Compiling entry function '(\w+)' for 'sm_(\d+)'", line):
            kind, variant = demangled_variant(m.group(1))
            cur = Kernel(m.group(2), m.group(1), kind, variant)
            kernels.append(cur)
        elif cur and (
            m := re.search(
                r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line
            )
        ):
            cur.stack, cur.spill_stores, cur.spill_loads = map(int, m.groups())
        elif cur and (m := re.search(r"Used (\d+) registers", line)):
            cur.regs = int(m.group(1))
            if s := re.search(r"(\d+) bytes smem", line):
                cur.smem = int(s.group(1))
            if re.search(r"\d+ bytes lmem", line) and not re.search(r"\b0 bytes lmem", line):
                cur.lmem = True
        elif "warning" in line.lower() and cur:
            cur.lmem = cur.lmem or "lmem" in line.lower() or "local memory" in line.lower()
    return kernels, obj


def blocks_per_sm(k: Kernel) -> int:
    regs_sm, smem_sm, threads_sm, blocks_sm = SM_LIMITS[k.arch]
    threads = THREADS[k.kind]
    warps = threads // 32
    regs_per_warp = -(-k.regs * 32 // 256) * 256
    by_regs = regs_sm // (regs_per_warp * warps) if k.regs else blocks_sm
    by_smem = smem_sm // (k.smem + 1024) if k.smem else blocks_sm
    return min(by_regs, by_smem, threads_sm // threads, blocks_sm)


def sass_of(cuobjdump: str, nvdisasm: str | None, obj: Path, arch: str) -> dict[str, list[tuple[int, str]]]:
    """Instructions of each kernel for one arch: {mangled name: [(address, "LDG.E.128 R4, [R2.64]"), ...]}."""
    env = dict(os.environ)
    if nvdisasm:
        env["NVDISASM_PATH"] = str(Path(nvdisasm).parent)  # cuobjdump -sass runs nvdisasm
    cmd = [cuobjdump, "-sass", "-arch", f"sm_{arch}", str(obj)]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if res.returncode != 0:
        return {}
    out: dict[str, list[str]] = {}
    cur = None
    for line in res.stdout.splitlines():
        if m := re.search(r"Function : (\S+)", line):
            cur = out.setdefault(m.group(1), [])
        elif cur is not None and (m := re.match(r"\s*/\*([0-9a-f]{4,})\*/\s+(.*?);", line)):
            cur.append((int(m.group(1), 16), m.group(2).strip()))
    return out


def hot_loop(insts: list[tuple[int, str]]) -> list[str]:
    """The hot loop: of the ranges [target, branch] closed by a backward BRA, the one with the most FFMA (the
    decode-and-accumulate loop), the shortest on a tie (an enclosing loop without more math); the whole kernel
    when no loop has an FFMA (dequantize: its loops are the outlier search)."""
    loops = []
    for addr, text in insts:
        m = re.search(r"\bBRA\b.*?0x([0-9a-f]+)", text)
        if m and int(m.group(1), 16) < addr:
            body = [t for a, t in insts if int(m.group(1), 16) <= a <= addr]
            loops.append((-sum(t.split(" ")[0].startswith("FFMA") for t in re_ops(body)), len(body), body))
    best = min(loops, key=lambda x: (x[0], x[1])) if loops else None
    return best[2] if best and best[0] < 0 else [t for _, t in insts]  # no FFMA in any loop: the whole kernel


def re_ops(texts: list[str]) -> list[str]:
    """Instructions without their predicate (@P0 / @!P1 ...)."""
    return [re.sub(r"^@!?U?P\w+\s+", "", t) for t in texts]


def loop_stats(loop: list[str]) -> tuple[int, str, str]:
    ops = re_ops(loop)
    ops = [o for o in ops if not o.startswith("NOP")]
    widths = set()
    first_math = next((i for i, o in enumerate(ops) if o.split(".")[0].split(" ")[0] in FLOAT_MATH), len(ops))
    last_load = -1
    for i, o in enumerate(ops):
        if o.startswith("LDG"):
            m = re.match(r"LDG\S*?\.(\d+)\b", o)
            widths.add(int(m.group(1)) if m else 32)
            last_load = i
    loads_first = "-" if last_load < 0 else ("yes" if last_load < first_math else "no")
    return len(ops), "/".join(str(w) for w in sorted(widths)) or "-", loads_first


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ptxas-check", action="store_true", help="only check: fail on spills or local memory")
    ap.add_argument(
        "--tools", type=Path, default=ROOT / "build" / "tools", help="where to look for cuobjdump"
    )

    ap.add_argument(
        "--keep", type=Path, help="keep (and reuse) the object file and ptxas log in this directory"
    )
    args = ap.parse_args()
    nvcc = find_nvcc()
    if nvcc is None:
        print("sass_report: nvcc not found (PATH, $CUDA_HOME, /usr/local/cuda*): skipping", file=sys.stderr)
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        if args.keep:
            args.keep.mkdir(parents=True, exist_ok=True)
        kernels, obj = compile_ptxas(nvcc, args.keep or Path(tmp))
        bad = [k for k in kernels if k.spill_stores or k.spill_loads or k.stack or k.lmem]
        if args.ptxas_check:
            for k in bad:
                print(f"ptxas: {k.kind} {k.variant} sm_{k.arch}: {k.stack} bytes stack frame, {k.spill_stores} "
                      f"bytes spill stores, {k.spill_loads} bytes spill loads (local memory)", file=sys.stderr)  # fmt: skip
            print(f"ptxas check: {len(kernels)} kernels x archs, {len(bad)} with spills or local memory")
            return 1 if bad or not kernels else 0
        cuobjdump = find_tool("cuobjdump", nvcc, args.tools)
        nvdisasm = find_tool("nvdisasm", nvcc, args.tools)
        sass = {a: sass_of(cuobjdump, nvdisasm, obj, a) for a in ARCHS} if cuobjdump else {}
        print("| kernel | variant | arch | regs | smem (B) | blocks/SM | loop insts/weight | gload width | "
              "loads first | spills |")  # fmt: skip
        print("|---|---|---|---|---|---|---|---|---|---|")
        order = {"matvec": 0, "small": 1, "dequantize": 2}
        for k in sorted(kernels, key=lambda k: (order[k.kind], k.variant, k.arch)):
            insts = sass.get(k.arch, {}).get(k.mangled)
            if insts:
                n, widths, first = loop_stats(hot_loop(insts))
                per_weight = f"{n / WEIGHTS_PER_ITER[k.kind]:.2f}"
            else:
                per_weight, widths, first = "n/a", "n/a", "n/a"
            spills = "none" if k not in bad else f"{k.spill_stores}/{k.spill_loads} B"
            print(f"| {k.kind} | {k.variant} | sm_{k.arch} | {k.regs} | {k.smem} | {blocks_per_sm(k)} | {per_weight} "
                  f"| {widths} | {first} | {spills} |")  # fmt: skip
        if not cuobjdump:
            print("\n(cuobjdump not found: SASS columns n/a; pip install --target build/tools/cuobjdump "
                  "nvidia-cuda-cuobjdump)", file=sys.stderr)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
