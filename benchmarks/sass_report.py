"""Static performance report of the CUDA kernels: resource use and the SASS of each kernel's hot loop, read from
the cubins the package ships (or any build of them).

    python benchmarks/sass_report.py                       # table (markdown) of the shipped cubins
    python benchmarks/sass_report.py --check               # also fail (exit 1) when a kernel misses its target
    python benchmarks/sass_report.py --ptxas-check         # CI: fail on register spills or local memory
    python benchmarks/sass_report.py --compare DIR         # NVRTC (or other) cubins in DIR against the shipped
    python benchmarks/sass_report.py --cubins DIR          # another build (`spqr-run kernels build --out DIR`)
    python benchmarks/sass_report.py --rev HEAD~3          # the kernels of another git revision ("before" column)

The cubins are what `nvcc -cubin` (or NVRTC) produced, with their manifest.json (spqr_run/gpu/build.py):
spqr_run/gpu/cubins/ after `pip install`, one per arch (sm_80, sm_86, sm_89, sm_90). Registers, shared memory,
stack and local memory come from `cuobjdump -res-usage`, the SASS from `cuobjdump -sass` (the toolkit's, or the
`nvidia-cuda-cuobjdump` and `nvidia-cuda-nvdisasm` wheels installed with `pip install --target
build/tools/<name>`); `--rev` builds the other revision's cubins with nvcc first (revisions before the cubin
build: an object file and `ptxas -v`, as before). Nothing here knows the kernels by name: every kernel of the
cubin is reported, its template parameter names read from the source (`template <int W, int SB, int NT>
__global__ ... name(`), its block size from its `__launch_bounds__` (or a `SPQR_LAUNCH(grid, block, ...)`), with
`constexpr int` constants of the source substituted. Columns, per kernel instantiation and architecture:

- regs: registers per thread; smem: static shared memory per block in bytes; spills: a stack frame or local memory
  (ptxas spill bytes, stores/loads, on the object path);
- blocks/SM and occ: resident blocks per SM at the launch's block size, the minimum of the register,
  shared-memory, thread and block limits of that architecture (the occupancy calculator's formula: registers
  allocated per warp in units of 256, 1 KiB of shared memory reserved per block), and the resulting share of the
  SM's warp slots;
- hot loop: of the address ranges [target, branch] closed by a backward BRA, the one with the most HMMA, then
  the most FFMA, the shortest on a tie (so the innermost such loop); if no loop has either, the one with the
  most HFMA2 (shortest on a tie); the whole kernel when no loop has any of them ("no loop"). Its instructions are counted without NOPs (issue slots of one warp per iteration);
- weights/iter: the weights one thread handles per iteration of that loop:
    mma kernels (the loop has HMMA): each HMMA.16816 multiplies one 16x16 weight tile (the A operand) = 8 weights
      a thread; a tile feeds NT HMMAs when the kernel has NT n-tiles of 8 activation rows (template parameter
      NT, or ceil(BT / 8) for a row capacity BT, else 1): weights = 8 x HMMA / NT;
    dequantize kernels (name contains "dequantize", no HMMA): the fp16 weights the region stores: bytes of its
      STG of 32 bits and wider / 2 (16-bit stores are outlier patches, not counted);
    the v1 kernels (before issue #11, no tensor cores): their fixed decode width (matvec: 2 tiles x 128 codes =
      256; small batch: 64 codes);
- insts/weight = loop instructions / weights/iter; target (issue #11: 3-bit <= 2.5, 4-bit <= 2.0, for the
  tensor-core kernels, i.e. those with HMMA in the hot loop; W = template parameter W); "ok" / "MISS";
- HMMA, LOP3, HFMA2, I2F, SHFL: counts of those instructions in the loop;
- gload: widths in bits of the global loads (LDG, LDGSTS) in the loop; loads first: "yes" when every global load
  of the loop body is issued before its first math instruction (HMMA, HFMA2, FFMA...);
- issue order: the loop as runs of G (global load: LDG / LDGSTS), S (shared load: LDS / LDSM), M (math), W
  (wait: BAR / DEPBAR / LDGDEPBAR), X (shuffle), in issue order, e.g. `W2 G1 S8 M40 S2 M16`.

`--check` exits 1 when a kernel with a target misses it, when any kernel spills or uses local memory, or when
the SASS cannot be read (no cuobjdump): it cannot check what it cannot see. With `--compare DIR` it prints, per
small-batch kernel and arch, instructions per weight and registers of both builds, and `--check` then fails when
DIR's build is more than 1% more instructions per weight or 4 registers more than the shipped one at 1-8 rows
(9-16 rows are reported, not enforced: BENCHMARKS.md says why).
"""

from __future__ import annotations

import argparse
import glob
import math
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT / "kernels" / "spqr_matmul.cu"
sys.path.insert(0, str(ROOT))
from spqr_run.gpu import build as gpu_build  # noqa: E402  (standard library only)

CUBINS = gpu_build.SHIPPED_CUBINS
COMPARE_INSTS = 0.01  # --compare: at most 1% more instructions per weight ...
COMPARE_REGS = 4  # ... and 4 more registers than the shipped build (1-8 rows)
ARCHS = ("80", "86", "89", "90")
# per-SM limits (CUDA C Programming Guide, "Compute Capabilities" table): registers, shared memory usable by
# blocks (bytes), threads, blocks
SM_LIMITS = {
    "80": (65536, 164 * 1024, 2048, 32),
    "86": (65536, 100 * 1024, 1536, 16),
    "89": (65536, 100 * 1024, 1536, 24),
    "90": (65536, 228 * 1024, 2048, 32),
}
TARGETS = {3: 2.5, 4: 2.0}  # issue #11: instructions per weight in the hot loop of the tensor-core kernels
V1_WEIGHTS_PER_ITER = {"spqr_matvec_kernel": 256, "spqr_matmul_small_kernel": 64}  # the kernels before #11
MATH = ("HMMA", "HFMA2", "HADD2", "HMUL2", "FFMA", "FADD", "FMUL", "F2F", "I2F", "F2I", "IMMA", "DFMA")
COUNTED = ("HMMA", "LOP3", "HFMA2", "I2F", "SHFL")


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


# ---- the source: template parameter names and block sizes of each kernel --------------------------------------
def source_constants(text: str) -> dict[str, int]:
    """`constexpr int NAME = EXPR;` of the source, evaluated in order (those that do not evaluate are left out)."""
    consts: dict[str, int] = {}
    for name, expr in re.findall(r"constexpr\s+(?:int|unsigned|size_t)\s+(\w+)\s*=\s*([^;]+);", text):
        if (v := eval_int(expr, consts)) is not None:
            consts[name] = v
    return consts


def eval_int(expr: str, names: dict[str, int]) -> int | None:
    """An integer expression of literals, names, + - * / % ( ); None when it has anything else."""
    expr = expr.strip()
    if not re.fullmatch(r"[\w\s+\-*/%()]+", expr):
        return None
    out = re.sub(
        r"\b([A-Za-z_]\w*)\b", lambda m: str(names[m.group(1)]) if m.group(1) in names else "?", expr
    )
    if "?" in out:
        return None
    try:
        return int(eval(out.replace("/", "//"), {"__builtins__": {}}))  # digits and operators only
    except (SyntaxError, ZeroDivisionError, ValueError):
        return None


@dataclass
class KernelSource:
    params: list[str] = field(default_factory=list)  # template parameter names, in order
    block: str | None = None  # block-size expression (may use the template parameters)


def kernel_sources(text: str) -> dict[str, KernelSource]:
    """{kernel name: its template parameter names and block-size expression} from the CUDA source."""
    out: dict[str, KernelSource] = {}
    decl = re.compile(
        r"(?:template\s*<(?P<tpl>[^<>]*)>\s*)?__global__\s+void\s+(?:__launch_bounds__\((?P<lb>[^()]*(?:\([^()]*\))?"
        r"[^()]*)\)\s*)?(?P<name>\w+)\s*\("
    )
    for m in decl.finditer(text):
        params = [p.split()[-1] for p in (m.group("tpl") or "").split(",") if p.strip()]
        bounds = m.group("lb")  # __launch_bounds__(threads[, min blocks]): the block size is the first
        out[m.group("name")] = KernelSource(params, bounds.split(",")[0].strip() if bounds else None)
    launch = re.compile(r"SPQR_LAUNCH\(\s*([^,]+?)\s*,\s*([^,]+?)\s*,\s*[^,]+?\s*,\s*[^,]+?\s*,\s*(\w+)")
    for m in launch.finditer(text):
        if m.group(3) in out:
            out[m.group(3)].block = m.group(2)
    return out


# ---- ptxas --------------------------------------------------------------------------------------------------
@dataclass
class Kernel:
    arch: str
    mangled: str
    name: str
    args: list[int]
    regs: int = 0
    smem: int = 0
    stack: int = 0
    spill_stores: int = 0
    spill_loads: int = 0
    lmem: bool = False

    def spills(self) -> bool:
        return bool(self.spill_stores or self.spill_loads or self.stack or self.lmem)


def parse_mangled(mangled: str) -> tuple[str, list[int]]:
    """("spqr_matmul_small_kernel", [3, 3, 1]) from _Z24spqr_matmul_small_kernelILi3ELi3ELi1EEv... or the same
    inside namespaces (_ZN<len><ns>...<len><name>I...E...): the innermost name and its integer template
    arguments."""
    if not mangled.startswith("_Z"):
        return mangled, []
    i = 3 if mangled.startswith("_ZN") else 2
    name = mangled
    while i < len(mangled) and mangled[i].isdigit():
        m = re.match(r"\d+", mangled[i:])
        n = int(m.group(0))
        name = mangled[i + m.end() : i + m.end() + n]
        i += m.end() + n
    args: list[int] = []
    if m := re.match(r"I((?:Lin?\d+E)+)E", mangled[i:]):  # integer template arguments
        args = [int(v.replace("n", "-")) for v in re.findall(r"Li(n?\d+)E", m.group(1))]
    return name, args


def dependencies(source: Path) -> list[Path]:
    return [source, *source.parent.glob("*.h"), *source.parent.glob("*.cuh")]


def compile_ptxas(nvcc: str, source: Path, out: Path) -> tuple[list[Kernel], Path]:
    """nvcc -Xptxas -v for every arch: per-kernel resources, and the object file (for cuobjdump). Reuses
    out/spqr_matmul.o and out/ptxas.log when they are newer than the source and its headers (--keep)."""
    obj, log = out / "spqr_matmul.o", out / "ptxas.log"
    newest = max(p.stat().st_mtime for p in dependencies(source))
    if not (obj.exists() and log.exists() and obj.stat().st_mtime > newest):
        gencode = [f for a in ARCHS for f in ("-gencode", f"arch=compute_{a},code=sm_{a}")]
        cmd = [nvcc, "-std=c++20", "-O3", f"-I{source.parent}", *gencode,
               "-Xptxas", "-v,-warn-spills,-warn-lmem-usage", "-c", str(source), "-o", str(obj)]  # fmt: skip
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode != 0:
            sys.exit(f"sass_report: nvcc failed:\n{res.stdout}{res.stderr}")
        log.write_text(res.stdout + res.stderr)
    kernels: list[Kernel] = []
    cur: Kernel | None = None
    for line in log.read_text().splitlines():
        if m := re.search(r"Compiling entry function '(\w+)' for 'sm_(\d+)'", line):
            name, args = parse_mangled(m.group(1))
            cur = Kernel(m.group(2), m.group(1), name, args)
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
        # ptxas's "Local memory used for function ..." warnings are not attributed: they may print before the
        # "Compiling entry function" line of their own kernel (another arch's), and the per-kernel lines above
        # already give its stack frame, spills and lmem.
    return kernels, obj


def block_threads(k: Kernel, src: KernelSource | None, consts: dict[str, int], text: str) -> int | None:
    """Threads per block of the kernel's launch; a block given as a `dim3 NAME(x, y, z)` variable of the source
    counts x * y * z."""
    if src is None or src.block is None:
        return None
    names = dict(consts)
    names.update(zip(src.params, k.args, strict=False))
    block = src.block
    if re.fullmatch(r"\w+", block) and (m := re.search(rf"\bdim3\s+{block}\s*\(([^;]*)\)\s*;", text)):
        block = " * ".join(f"({d})" for d in m.group(1).split(","))
    return eval_int(block, names)


def occupancy(k: Kernel, threads: int | None) -> tuple[int, float] | None:
    """(resident blocks per SM, share of the SM's warp slots) or None when the block size is unknown."""
    if not threads:
        return None
    regs_sm, smem_sm, threads_sm, blocks_sm = SM_LIMITS[k.arch]
    warps = -(-threads // 32)
    regs_per_warp = -(-k.regs * 32 // 256) * 256
    by_regs = regs_sm // (regs_per_warp * warps) if k.regs else blocks_sm
    by_smem = smem_sm // (k.smem + 1024) if k.smem else blocks_sm
    blocks = min(by_regs, by_smem, threads_sm // (warps * 32), blocks_sm)
    return blocks, blocks * warps * 32 / threads_sm


# ---- SASS -----------------------------------------------------------------------------------------------------
def sass_of(cuobjdump: str, nvdisasm: str | None, obj: Path, arch: str) -> dict[str, list[tuple[int, str]]]:
    """Instructions of each kernel for one arch: {mangled name: [(address, "LDG.E.128 R4, [R2.64]"), ...]}."""
    env = dict(os.environ)
    if nvdisasm:
        env["NVDISASM_PATH"] = str(Path(nvdisasm).parent)  # cuobjdump -sass runs nvdisasm
    cmd = [cuobjdump, "-sass", "-arch", f"sm_{arch}", str(obj)]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if res.returncode != 0:
        return {}
    out: dict[str, list[tuple[int, str]]] = {}
    cur = None
    for line in res.stdout.splitlines():
        if m := re.search(r"Function : (\S+)", line):
            cur = out.setdefault(m.group(1), [])
        elif cur is not None and (m := re.match(r"\s*/\*([0-9a-f]{4,})\*/\s+(.*?);", line)):
            cur.append((int(m.group(1), 16), m.group(2).strip()))
    return out


def opcode(text: str) -> str:
    """ "LDG.E.128" -> "LDG" (predicate removed)."""
    return re.sub(r"^@!?U?P\w+\s+", "", text).split(" ")[0].split(".")[0]


def full_op(text: str) -> str:
    return re.sub(r"^@!?U?P\w+\s+", "", text).split(" ")[0]


def hot_loop(insts: list[tuple[int, str]]) -> tuple[list[str], bool]:
    """(the hot loop's instructions, whether it is a loop): see the module docstring."""
    loops = []
    for addr, text in insts:
        m = re.search(r"\bBRA\b.*?0x([0-9a-f]+)", text)
        if m and int(m.group(1), 16) < addr:
            body = [t for a, t in insts if int(m.group(1), 16) <= a <= addr]
            ops = [opcode(t) for t in body]
            loops.append(
                ((ops.count("HMMA"), ops.count("FFMA"), -len(body)), (ops.count("HFMA2"), -len(body)), body)
            )
    for key in (0, 1):  # HMMA, then FFMA; else HFMA2 (an HFMA2 beside the FFMA loop does not make it hotter)
        best = max(loops, key=lambda x: x[key]) if loops else None
        if best and any(best[key][:-1]):
            return best[2], True
    return [t for _, t in insts], False


def access_bits(text: str) -> int:
    """Width in bits of a load or store (LDG.E.128 -> 128; no width suffix: 32)."""
    m = re.search(r"\.(8|16|32|64|128)\b", full_op(text))
    if m:
        return int(m.group(1))
    if re.search(r"\.(U8|S8)\b", full_op(text)):
        return 8
    if re.search(r"\.(U16|S16)\b", full_op(text)):
        return 16
    return 32


def category(op: str) -> str:
    if op in ("LDG", "LDGSTS"):
        return "G"
    if op in ("LDS", "LDSM"):
        return "S"
    if op in ("BAR", "DEPBAR", "LDGDEPBAR", "ARRIVES"):
        return "W"
    if op == "SHFL":
        return "X"
    if op in MATH:
        return "M"
    return ""


@dataclass
class LoopStats:
    is_loop: bool
    insts: int
    counts: dict[str, int]
    gload_widths: str
    loads_first: str
    order: str
    wide_store_bytes: int


def loop_stats(body: list[str], is_loop: bool) -> LoopStats:
    texts = [t for t in body if opcode(t) != "NOP"]
    ops = [opcode(t) for t in texts]
    widths = sorted({access_bits(t) for t, o in zip(texts, ops, strict=True) if o in ("LDG", "LDGSTS")})
    first_math = next((i for i, o in enumerate(ops) if o in MATH), len(ops))
    last_load = max((i for i, o in enumerate(ops) if o in ("LDG", "LDGSTS")), default=-1)
    loads_first = "-" if last_load < 0 else ("yes" if last_load < first_math else "no")
    runs: list[list] = []
    for o in ops:
        c = category(o)
        if not c:
            continue
        if runs and runs[-1][0] == c:
            runs[-1][1] += 1
        else:
            runs.append([c, 1])
    order = " ".join(f"{c}{n}" for c, n in runs[:14]) + (" ..." if len(runs) > 14 else "")
    stores = sum(
        access_bits(t) // 8 for t, o in zip(texts, ops, strict=True) if o == "STG" and access_bits(t) >= 32
    )
    return LoopStats(is_loop, len(ops), {c: ops.count(c) for c in COUNTED}, "/".join(map(str, widths)) or "-",
                     loads_first, order or "-", stores)  # fmt: skip


def weights_per_iter(k: Kernel, params: list[str], st: LoopStats) -> tuple[float | None, str]:
    """(weights a thread handles per hot-loop iteration, the rule used): see the module docstring."""
    named = dict(zip(params, k.args, strict=False))
    if st.counts["HMMA"]:
        nt = named.get("NT") or (math.ceil(named["BT"] / 8) if "BT" in named else 1)
        return 8 * st.counts["HMMA"] / nt, "mma"
    if "dequantize" in k.name:
        return (st.wide_store_bytes / 2, "stores") if st.wide_store_bytes else (None, "-")
    if k.name in V1_WEIGHTS_PER_ITER:
        return V1_WEIGHTS_PER_ITER[k.name], "v1"
    return None, "-"


def target_of(k: Kernel, params: list[str], rule: str) -> float | None:
    """Issue #11's instructions-per-weight target of a tensor-core kernel (template parameter W = 3 or 4)."""
    return TARGETS.get(dict(zip(params, k.args, strict=False)).get("W")) if rule == "mma" else None


# ---- main -----------------------------------------------------------------------------------------------------
def checkout(rev: str, into: Path) -> Path:
    """kernels/ of git revision `rev` under `into`; returns the path of its spqr_matmul.cu."""
    res = subprocess.run(["git", "-C", str(ROOT), "archive", rev, "kernels"], capture_output=True)
    if res.returncode != 0:
        sys.exit(f"sass_report: --rev {rev}: {res.stderr.decode(errors='replace').strip()}")
    with tarfile.open(fileobj=BytesIO(res.stdout)) as tar:
        tar.extractall(into, filter="data")
    return into / "kernels" / "spqr_matmul.cu"


def cubin_kernels(cuobjdump: str, cubin: Path, arch: str) -> list[Kernel]:
    """The kernels of a cubin with their resources (`cuobjdump -res-usage`: REG, STACK, SHARED, LOCAL)."""
    res = subprocess.run([cuobjdump, "-res-usage", str(cubin)], capture_output=True, text=True)
    if res.returncode != 0:
        sys.exit(f"sass_report: cuobjdump -res-usage {cubin} failed: {res.stderr.strip()}")
    out = []
    pattern = r"Function (\S+):\s*\n\s*REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)"
    for m in re.finditer(pattern, res.stdout):
        name, args = parse_mangled(m.group(1))
        k = Kernel(
            arch, m.group(1), name, args, regs=int(m.group(2)), smem=int(m.group(4)), stack=int(m.group(3))
        )
        k.lmem = int(m.group(5)) > 0
        out.append(k)
    return out


@dataclass
class Build:
    """One set of cubins (or an object file) with what the report needs: kernels, SASS, the source text."""

    title: str
    kernels: list[Kernel]
    sass: dict[str, dict[str, list[tuple[int, str]]]]  # arch -> mangled -> instructions
    text: str


def load_cubins(directory: Path, cuobjdump: str | None, nvdisasm: str | None, title: str) -> Build:
    """The cubins of `directory` (its manifest.json) with their SASS when cuobjdump is there."""
    manifest = gpu_build.read_manifest(directory)
    if manifest is None:
        sys.exit(f"sass_report: no cubins in {directory} (pip install -e . builds them with nvcc; "
                 "spqr-run kernels build --out DIR for another build)")  # fmt: skip
    kernels, sass = [], {}
    for arch, name in sorted(manifest.cubins.items()):
        a = arch.removeprefix("sm_")
        if cuobjdump:
            kernels += cubin_kernels(cuobjdump, directory / name, a)
            sass[a] = sass_of(cuobjdump, nvdisasm, directory / name, a)
    text = (gpu_build.sources_dir() / gpu_build.MAIN_SOURCE).read_text()
    return Build(f"{title} ({manifest.compiler}, {', '.join(sorted(manifest.cubins))})", kernels, sass, text)


@dataclass
class Row:
    kernel: Kernel
    args_text: str
    params: list[str]
    per_weight: float | None
    cells: list[str]


def rows_of(b: Build) -> tuple[list[Row], list[str]]:
    """Table rows of a build, and the target misses."""
    sources, consts = kernel_sources(b.text), source_constants(b.text)
    rows, misses = [], []
    for k in sorted(b.kernels, key=lambda k: (k.name, k.args, k.arch)):
        src = sources.get(k.name)
        params = src.params if src else []
        args_text = ", ".join(f"{p}={v}" for p, v in zip(params, k.args, strict=False)) if params else ", ".join(
            map(str, k.args))  # fmt: skip
        occ = occupancy(k, block_threads(k, src, consts, b.text))
        occ_cells = [str(occ[0]), f"{occ[1]:.0%}"] if occ else ["?", "?"]
        spills = (f"{k.spill_stores}/{k.spill_loads} B" if k.spill_stores or k.spill_loads else
                  f"stack {k.stack} B" + (", lmem" if k.lmem else "")) if k.spills() else "none"  # fmt: skip
        insts = b.sass.get(k.arch, {}).get(k.mangled)
        per_weight = None
        if insts:
            st = loop_stats(*hot_loop(insts))
            w, rule = weights_per_iter(k, params, st)
            per_weight = st.insts / w if w else None
            target = target_of(k, params, rule)
            verdict = "-" if target is None else ("ok" if per_weight <= target else "MISS")
            if verdict == "MISS":
                misses.append(f"{k.name}<{args_text}> sm_{k.arch}: {per_weight:.2f} > {target}")
            cells = [f"{st.insts}" + ("" if st.is_loop else " (no loop)"),
                     f"{w:g} ({rule})" if w else "?", f"{per_weight:.2f}" if per_weight else "?",
                     "-" if target is None else f"<= {target} {verdict}",
                     *(str(st.counts[c]) for c in COUNTED), st.gload_widths, st.loads_first, st.order]  # fmt: skip
        else:
            cells = ["n/a"] * 12
        cells = [k.name, args_text, f"sm_{k.arch}", str(k.regs), str(k.smem), spills, *occ_cells, *cells]
        rows.append(Row(k, args_text, params, per_weight, cells))
    return rows, misses


def print_table(rows: list[Row]) -> None:
    print("| kernel | args | arch | regs | smem (B) | spills | blocks/SM | occ | loop insts | weights/iter "
          "| insts/weight | target | HMMA | LOP3 | HFMA2 | I2F | SHFL | gload | loads first | issue order |")  # fmt: skip
    print("|" + "---|" * 20)
    for r in rows:
        print("| " + " | ".join(r.cells) + " |")


def compare(base: list[Row], other: list[Row]) -> list[str]:
    """Prints the small-batch kernels of two builds side by side; returns the enforced misses (1-8 rows)."""
    theirs = {(r.kernel.mangled, r.kernel.arch): r for r in other}
    print("| kernel | args | arch | insts/weight | compared | delta | regs | compared | delta | verdict |")
    print("|" + "---|" * 10)
    misses = []
    for r in base:
        o = theirs.get((r.kernel.mangled, r.kernel.arch))
        nt = dict(zip(r.params, r.kernel.args, strict=False)).get("NT")
        if o is None or r.per_weight is None or o.per_weight is None or nt is None:
            continue
        d_insts = o.per_weight / r.per_weight - 1
        d_regs = o.kernel.regs - r.kernel.regs
        bad = d_insts > COMPARE_INSTS + 1e-9 or d_regs > COMPARE_REGS
        verdict = "ok" if not bad else ("MISS" if nt == 1 else "over (9-16 rows: reported)")
        if bad and nt == 1:
            misses.append(f"{r.kernel.name}<{r.args_text}> sm_{r.kernel.arch}: {o.per_weight:.3f} vs "
                          f"{r.per_weight:.3f} insts/weight, {o.kernel.regs} vs {r.kernel.regs} registers")  # fmt: skip
        print(f"| {r.kernel.name} | {r.args_text} | sm_{r.kernel.arch} | {r.per_weight:.3f} | {o.per_weight:.3f} | "
              f"{d_insts:+.2%} | {r.kernel.regs} | {o.kernel.regs} | {d_regs:+d} | {verdict} |")  # fmt: skip
    return misses


def legacy_build(
    nvcc: str, source: Path, out: Path, cuobjdump: str | None, nvdisasm: str | None, title: str
) -> Build:
    """An object file compiled from a revision before the cubin build (its own host launchers instantiate the
    kernels), with ptxas's resource report."""
    kernels, obj = compile_ptxas(nvcc, source, out)
    sass = {a: sass_of(cuobjdump, nvdisasm, obj, a) for a in ARCHS} if cuobjdump else {}
    return Build(title, kernels, sass, source.read_text())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ptxas-check", action="store_true", help="only check: fail on spills or local memory")
    ap.add_argument("--check", action="store_true", help="exit 1 when a kernel misses its target or spills")
    ap.add_argument(
        "--cubins", type=Path, default=CUBINS, help="the cubins to report (default: the shipped ones)"
    )
    ap.add_argument("--compare", type=Path, help="cubins (e.g. NVRTC's) to compare with --cubins")
    ap.add_argument(
        "--rev", help="report on the kernels of this git revision instead (built with nvcc first)"
    )
    ap.add_argument(
        "--tools", type=Path, default=ROOT / "build" / "tools", help="where to look for cuobjdump"
    )
    ap.add_argument("--keep", type=Path, help="--rev: keep (and reuse) the build in this directory")
    args = ap.parse_args()
    nvcc = find_nvcc()
    cuobjdump = find_tool("cuobjdump", nvcc or "/nonexistent/nvcc", args.tools)
    nvdisasm = find_tool("nvdisasm", nvcc or "/nonexistent/nvcc", args.tools)
    if cuobjdump is None:
        print("sass_report: cuobjdump not found (the toolkit's, or pip install --target build/tools/cuobjdump "
              "nvidia-cuda-cuobjdump, and build/tools/nvdisasm nvidia-cuda-nvdisasm)", file=sys.stderr)  # fmt: skip
        return 1 if args.check or args.ptxas_check else 0
    with tempfile.TemporaryDirectory() as tmp:
        if args.rev:
            if nvcc is None:
                sys.exit("sass_report: --rev needs nvcc (PATH, $CUDA_HOME, /usr/local/cuda*)")
            source = checkout(args.rev, Path(tmp))
            out = args.keep or Path(tmp) / "out"
            out.mkdir(parents=True, exist_ok=True)
            if "namespace spqr {" in source.read_text():
                gpu_build.build_cubins(out, gpu_build.ARCHS, source_dir=source.parent)
                b = load_cubins(
                    out, cuobjdump, nvdisasm, f"SASS report of kernels/spqr_matmul.cu at {args.rev}"
                )
            else:
                b = legacy_build(nvcc, source, out, cuobjdump, nvdisasm, f"SASS report of kernels/spqr_matmul.cu "
                                 f"at {args.rev}")  # fmt: skip
        else:
            b = load_cubins(args.cubins, cuobjdump, nvdisasm, f"SASS report of {args.cubins}")
        bad = [k for k in b.kernels if k.spills()]
        if args.ptxas_check:
            for k in bad:
                print(f"ptxas: {k.name}<{', '.join(map(str, k.args))}> sm_{k.arch}: {k.stack} bytes stack frame, "
                      f"{k.spill_stores} bytes spill stores, {k.spill_loads} bytes spill loads, local memory "
                      f"{'yes' if k.lmem else 'no'}", file=sys.stderr)  # fmt: skip
            print(
                f"ptxas check of {b.title}: {len(b.kernels)} kernels x archs, {len(bad)} with spills or local memory"
            )
            return 1 if bad or not b.kernels else 0
        rows, misses = rows_of(b)
        problems = list(misses)
        if args.compare:
            other = load_cubins(args.compare, cuobjdump, nvdisasm, f"{args.compare}")
            print(f"Small-batch kernels: {b.title} against {other.title}")
            print()
            other_rows, _ = rows_of(other)
            problems = compare(rows, other_rows)
            bad = [k for k in other.kernels if k.spills()]
        else:
            print(b.title)
            print()
            print_table(rows)
        if args.check:
            problems += [f"{k.name}<{', '.join(map(str, k.args))}> sm_{k.arch}: spills" for k in bad]
            if not b.kernels:
                problems.append("no kernels")
            for p in problems:
                print(f"sass_report: {p}", file=sys.stderr)
            print(
                f"sass_report --check: {len(b.kernels)} kernels x archs, {len(problems)} problems",
                file=sys.stderr,
            )
            return 1 if problems else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
