"""llama.cpp's CPU tools, built from a pinned source, to put llama.cpp beside spqr-run in benchmarks.

The source is the llama.cpp tree vendored in the PyPI sdist of `llama-cpp-python` (GitHub is not always
reachable, PyPI is), at the version pinned in LLAMA_CPP_PYTHON_VERSION and checked against SDIST_SHA256.
It is built with cmake for this CPU only (GGML_NATIVE=ON, no GPU backend, no network code, static
libraries) and cached under $XDG_CACHE_HOME/spqr-run/llama.cpp/<version>/ (default ~/.cache/...):

    bin/llama-bench, bin/llama-quantize, ...   the tools (static, so the folder can move)
    build-info.json                              written last: its presence means the build is complete
    build.log                                    cmake's configure and build output
    source/                                      the unpacked sdist (llama.cpp in source/vendor/llama.cpp)

A build runs in a hidden `.<version>.partial.<pid>` folder beside it and is renamed into place only when
every tool is there, so an interrupted build never counts as done. The binaries use this CPU's
instruction set (-march=native): do not copy the cache to another machine.

    nice -n 10 python benchmarks/llama_cpp.py build -j 2
    python benchmarks/llama_cpp.py bench MODEL.gguf --threads 2 -n 128 -p 0 --reps 3 [--json]
    python benchmarks/llama_cpp.py path llama-quantize      # or just: quantize

Other scripts call `run_llama_bench(model, threads)` and `tool_path("llama-imatrix")`. This module imports
only the standard library (no torch), so it stays quick to load.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

# The pin: llama-cpp-python 0.3.36 vendors llama.cpp commit 0c1e57098bba43ac29e6e3b677cdceebdd22334f.
LLAMA_CPP_PYTHON_VERSION = "0.3.36"
SDIST_NAME = f"llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}.tar.gz"
SDIST_SHA256 = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"

# Built by `build`. In this llama.cpp, `llama-cli` is a client of the HTTP server stack (it needs
# LLAMA_BUILD_SERVER and the web UI assets, which the build downloads); `llama-completion` is the
# classic one-shot generator that `llama-cli` used to be, so it is built instead.
TOOLS: tuple[str, ...] = (
    "llama-bench",
    "llama-quantize",
    "llama-imatrix",
    "llama-perplexity",
    "llama-completion",
)

CMAKE_OPTIONS: tuple[str, ...] = (
    "-DCMAKE_BUILD_TYPE=Release",
    "-DGGML_NATIVE=ON",
    "-DGGML_CUDA=OFF",
    "-DGGML_VULKAN=OFF",
    "-DGGML_METAL=OFF",
    "-DGGML_RPC=OFF",
    "-DBUILD_SHARED_LIBS=OFF",  # static tools: the build folder can be renamed into the cache
    "-DLLAMA_OPENSSL=OFF",  # this llama.cpp's HTTPS option (LLAMA_CURL is deprecated and ignored)
    "-DLLAMA_BUILD_TOOLS=ON",
    "-DLLAMA_BUILD_SERVER=OFF",
    "-DLLAMA_BUILD_APP=OFF",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
)

MIN_CMAKE = (3, 15)  # llama.cpp needs 3.14; `cmake --build --target A B` needs 3.15
BUILD_INFO = "build-info.json"
_LOG_PREFIX = "[llama.cpp]"


class LlamaCppError(RuntimeError):
    """A failure with a one-line message meant for the user (missing tool, failed build, bad output)."""


# --- where things live ---------------------------------------------------------------------------


def cache_root(env: Mapping[str, str] | None = None) -> Path:
    """The folder holding every cached llama.cpp build: $XDG_CACHE_HOME/spqr-run/llama.cpp.

    An unset or relative XDG_CACHE_HOME means ~/.cache, as the XDG base-directory spec says.
    """
    env = os.environ if env is None else env
    base = env.get("XDG_CACHE_HOME", "")
    if not base or not os.path.isabs(base):
        home = env.get("HOME") or os.path.expanduser("~")
        base = os.path.join(home, ".cache")
    return Path(base) / "spqr-run" / "llama.cpp"


def build_dir(version: str = LLAMA_CPP_PYTHON_VERSION, env: Mapping[str, str] | None = None) -> Path:
    """The folder of one finished build: cache_root()/<version>."""
    return cache_root(env) / version


def is_built(folder: Path) -> bool:
    """True when `folder` holds a complete build: the build-info marker and every tool it lists."""
    info = read_build_info(folder)
    if info is None:
        return False
    return all((folder / "bin" / tool).is_file() for tool in info.get("tools", TOOLS))


def read_build_info(folder: Path) -> dict[str, Any] | None:
    """The build's build-info.json as a dict, or None when it is absent or unreadable."""
    try:
        return json.loads((folder / BUILD_INFO).read_text())
    except (OSError, ValueError):
        return None


def canonical_tool_name(tool: str) -> str:
    """'quantize' -> 'llama-quantize'; the full name is returned as is. Unknown names raise."""
    name = tool if tool.startswith("llama-") else f"llama-{tool}"
    if name not in TOOLS:
        raise LlamaCppError(f"unknown llama.cpp tool {tool!r}; built tools: {', '.join(TOOLS)}")
    return name


def tool_path(
    tool: str, version: str = LLAMA_CPP_PYTHON_VERSION, env: Mapping[str, str] | None = None
) -> Path:
    """The path of a built tool ('llama-quantize' or 'quantize'); raises LlamaCppError if not built."""
    name = canonical_tool_name(tool)
    folder = build_dir(version, env)
    path = folder / "bin" / name
    if not is_built(folder) or not path.is_file():
        raise LlamaCppError(
            f"{name} is not built (looked in {folder}); run: python benchmarks/llama_cpp.py build"
        )
    return path


# --- build ---------------------------------------------------------------------------------------


def _say(message: str) -> None:
    print(f"{_LOG_PREFIX} {message}", flush=True)


def _which(name: str, env: Mapping[str, str] | None) -> str | None:
    path = None if env is None else env.get("PATH", "")
    return shutil.which(name, path=path)


def check_build_prerequisites(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """Find cmake (>= 3.15) and C and C++ compilers; raise LlamaCppError naming what is missing.

    Returns {'cmake': path, 'cc': path, 'cxx': path, 'generator': 'Ninja' or ''}. CC and CXX from the
    environment are checked when set (cmake itself picks the compilers, honouring them).
    """
    env_vars = os.environ if env is None else env
    cmake = _which("cmake", env)
    if cmake is None:
        raise LlamaCppError("cmake not found on PATH; install it (Debian: apt-get install cmake)")
    out = subprocess.run([cmake, "--version"], capture_output=True, text=True, check=False).stdout
    m = re.search(r"version (\d+)\.(\d+)", out)
    if m is None or (int(m.group(1)), int(m.group(2))) < MIN_CMAKE:
        found = m.group(0) if m else "an unknown version"
        raise LlamaCppError(
            f"cmake {'.'.join(map(str, MIN_CMAKE))} or newer is needed, found {found} ({cmake})"
        )

    def compiler(var: str, names: Sequence[str], what: str) -> str:
        given = env_vars.get(var)
        if given:
            found = _which(shlex.split(given)[0], env)
            if found is None:
                raise LlamaCppError(f"{var}={given} is not an executable on PATH")
            return found
        for name in names:
            found = _which(name, env)
            if found is not None:
                return found
        raise LlamaCppError(
            f"no {what} compiler found ({', '.join(names)}); install one (Debian: apt-get install build-essential)"
        )

    cc = compiler("CC", ("cc", "gcc", "clang"), "C")
    cxx = compiler("CXX", ("c++", "g++", "clang++"), "C++")
    generator = "Ninja" if _which("ninja", env) else ""
    return {"cmake": cmake, "cc": cc, "cxx": cxx, "generator": generator}


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fetch_sdist(dest: Path, sdist: Path | None = None) -> Path:
    """The pinned sdist in `dest`: copied from `sdist` if given, else downloaded with pip from the
    configured index. Its sha256 must equal SDIST_SHA256."""
    dest.mkdir(parents=True, exist_ok=True)
    if sdist is not None:
        if not sdist.is_file():
            raise LlamaCppError(f"sdist not found: {sdist}")
        path = dest / SDIST_NAME
        shutil.copyfile(sdist, path)
    else:
        _say(f"downloading llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION} (sdist) with pip")
        cmd = [
            sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps",
            f"llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION}", "-d", str(dest),
        ]  # fmt: skip
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        path = dest / SDIST_NAME
        if proc.returncode != 0 or not path.is_file():
            last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            raise LlamaCppError(
                f"pip download of llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION} failed ({last}); "
                f"fetch {SDIST_NAME} by hand and pass --sdist PATH"
            )
    digest = _sha256(path)
    if digest != SDIST_SHA256:
        raise LlamaCppError(f"{path.name} has sha256 {digest}, the pin says {SDIST_SHA256}")
    _say(f"sdist verified: {path.name} sha256 {digest[:16]}...")
    return path


def _unpack(archive: Path, dest: Path) -> Path:
    """Unpack the sdist into `dest` and return the folder of llama.cpp inside it."""
    with tarfile.open(archive) as tar:
        if hasattr(tarfile, "data_filter"):
            tar.extractall(dest, filter="data")
        else:  # Python without extraction filters: refuse paths that leave `dest`
            root = dest.resolve()
            for member in tar.getmembers():
                if not (root / member.name).resolve().is_relative_to(root):
                    raise LlamaCppError(f"{archive.name} holds a path outside the archive: {member.name}")
            tar.extractall(dest)
    top = dest / archive.name.removesuffix(".tar.gz")
    source = top / "vendor" / "llama.cpp"
    if not (source / "CMakeLists.txt").is_file():
        raise LlamaCppError(f"{archive.name} has no vendor/llama.cpp/CMakeLists.txt")
    return source


def vendored_commit(source: Path) -> str | None:
    """The llama.cpp commit the sdist vendors, read from its git metadata without running git.

    llama-cpp-python ships the submodule's git folder: vendor/llama.cpp/.git is a file pointing at
    .git/modules/vendor/llama.cpp, whose HEAD holds the commit hash.
    """
    git = source / ".git"
    try:
        if git.is_file():
            target = git.read_text().strip().removeprefix("gitdir:").strip()
            git = (source / target).resolve()
        head = (git / "HEAD").read_text().strip()
        if head.startswith("ref:"):
            head = (git / head.removeprefix("ref:").strip()).read_text().strip()
    except OSError:
        return None
    return head if re.fullmatch(r"[0-9a-f]{40}", head) else None


def _remove_stale_partials(root: Path, version: str) -> None:
    """Delete partial build folders of `version` whose building process no longer runs."""
    for partial in root.glob(f".{version}.partial.*"):
        try:
            pid = int(partial.name.rsplit(".", 1)[1])
            os.kill(pid, 0)
        except (ValueError, ProcessLookupError):
            _say(f"removing an abandoned partial build: {partial}")
            shutil.rmtree(partial, ignore_errors=True)
        except PermissionError:  # the pid is alive (another user's process)
            pass


def _run_logged(cmd: list[str], log: Path, echo: Callable[[str], bool]) -> int:
    """Run `cmd`, appending its output to `log` and printing the lines that `echo` accepts."""
    with log.open("a") as f:
        f.write(f"$ {shlex.join(cmd)}\n")
        f.flush()
        proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace"
        )
        assert proc.stdout is not None
        for line in proc.stdout:
            f.write(line)
            if echo(line):
                print(f"{_LOG_PREFIX}   {line.rstrip()}", flush=True)
        return proc.wait()


def _print_tail(path: Path, n: int = 25) -> None:
    """Print the last `n` lines of a log to stderr (the context of a failed build step)."""
    try:
        lines = path.read_text(errors="replace").splitlines()[-n:]
    except OSError:
        return
    for line in lines:
        print(f"{_LOG_PREFIX}   {line}", file=sys.stderr)


class _Progress:
    """Accepts a compile output line for echoing when it is a link step or crosses the next 10%.

    Understands both progress styles: Ninja's "[12/180] ..." and Makefiles' "[ 45%] ...".
    """

    pattern = re.compile(r"^\[\s*(\d+)(?:/(\d+)|%)\]")

    def __init__(self) -> None:
        self.next_step = 10

    def __call__(self, line: str) -> bool:
        m = self.pattern.match(line)
        if m is None:
            return False
        done, total = int(m.group(1)), m.group(2)
        percent = 100 * done // int(total) if total else done
        if "Linking" in line:
            return True
        if percent >= self.next_step:
            self.next_step = (percent // 10 + 1) * 10
            return True
        return False


def build(jobs: int | None = None, sdist: Path | None = None, force: bool = False) -> Path:
    """Build the pinned llama.cpp's CPU tools into the cache and return the build folder.

    Returns at once when the build is already there. `jobs` is the parallel compile count (default:
    all CPUs; run the whole command under `nice` on a shared machine). `sdist` is a local copy of the
    pinned sdist to use instead of downloading it. `force` rebuilds over an existing folder.
    """
    version = LLAMA_CPP_PYTHON_VERSION
    final = build_dir(version)
    if is_built(final) and not force:
        _say(f"already built: {final}")
        return final
    if final.exists() and not force:
        raise LlamaCppError(f"{final} exists but is not a complete build; rerun with --force to rebuild it")
    prereq = check_build_prerequisites()
    jobs = jobs or os.cpu_count() or 1

    root = final.parent
    root.mkdir(parents=True, exist_ok=True)
    _remove_stale_partials(root, version)
    work = root / f".{version}.partial.{os.getpid()}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    log = work / "build.log"
    failed_log = root / f"{version}.failed-build.log"  # where the log is kept when the build fails
    started = time.monotonic()
    try:
        archive = fetch_sdist(work / "download", sdist)
        _say(f"unpacking {archive.name}")
        _unpack(archive, work / "unpacked")
        (work / "unpacked" / archive.name.removesuffix(".tar.gz")).rename(work / "source")
        shutil.rmtree(work / "unpacked")
        shutil.rmtree(work / "download")
        source = work / "source" / "vendor" / "llama.cpp"
        commit = vendored_commit(source)
        _say(f"llama.cpp commit {commit or 'unknown'}")

        cmake_build = work / "cmake-build"
        configure = [prereq["cmake"], "-S", str(source), "-B", str(cmake_build), *CMAKE_OPTIONS]
        if prereq["generator"]:
            configure += ["-G", prereq["generator"]]
        _say("configuring: " + shlex.join(configure))
        if _run_logged(configure, log, lambda line: line.startswith("-- The ") or "GGML_NATIVE" in line) != 0:
            _print_tail(log)
            raise LlamaCppError(f"cmake configure failed; log: {failed_log}")

        compile_cmd = [prereq["cmake"], "--build", str(cmake_build), "--config", "Release", "-j", str(jobs)]
        compile_cmd += ["--target", *TOOLS]
        _say(f"compiling {len(TOOLS)} tools with {jobs} jobs (took 4.6 min with -j 2 on a 2-core machine)")
        if _run_logged(compile_cmd, log, _Progress()) != 0:
            _print_tail(log)
            raise LlamaCppError(f"compile failed; log: {failed_log}")

        (work / "bin").mkdir()
        for tool in TOOLS:
            built = cmake_build / "bin" / tool
            if not built.is_file():
                raise LlamaCppError(f"the build finished without {tool} (expected at {built})")
            shutil.copy2(built, work / "bin" / tool)
        shutil.rmtree(cmake_build)  # object files; the static tools do not need them

        version_out = subprocess.run(
            [str(work / "bin" / "llama-bench"), "--version"], capture_output=True, text=True, check=False
        )
        version_line = (version_out.stdout + version_out.stderr).strip()
        seconds = time.monotonic() - started
        info = {
            "llama_cpp_python": version,
            "sdist_sha256": SDIST_SHA256,
            "llama_cpp_commit": commit,
            "llama_bench_version": version_line,
            "tools": list(TOOLS),
            "cmake_options": list(CMAKE_OPTIONS),
            "cmake": prereq["cmake"],
            "jobs": jobs,
            "build_seconds": round(seconds, 1),
            "built_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        (work / BUILD_INFO).write_text(json.dumps(info, indent=2) + "\n")  # the completion marker
        if force and final.exists():
            shutil.rmtree(final)
        try:
            work.rename(final)
        except OSError:
            if not is_built(final):
                raise
            _say(f"another process finished the same build first; using {final}")
            shutil.rmtree(work, ignore_errors=True)
            return final
    except BaseException:
        if log.is_file():
            shutil.copyfile(log, failed_log)
        shutil.rmtree(work, ignore_errors=True)
        raise
    _say(f"built in {seconds / 60:.1f} min: {final / 'bin'}")
    _say(f"llama-bench --version: {version_line.splitlines()[0] if version_line else '?'}")
    return final


# --- llama-bench ---------------------------------------------------------------------------------


def parse_llama_bench_json(text: str) -> list[dict[str, Any]]:
    """The list of tests in llama-bench's `-o json` output (a JSON array of objects, one per test)."""
    start = text.find("[")
    try:
        tests = json.loads(text[start:]) if start >= 0 else None
    except ValueError as e:
        raise LlamaCppError(f"llama-bench output is not valid JSON ({e})") from None
    if not isinstance(tests, list) or not tests or not all(isinstance(t, dict) for t in tests):
        raise LlamaCppError("llama-bench printed no test results (expected a JSON array of objects)")
    for test in tests:
        missing = [k for k in ("n_prompt", "n_gen", "avg_ts", "stddev_ts") if k not in test]
        if missing:
            raise LlamaCppError(f"llama-bench JSON lacks {', '.join(missing)}")
    return tests


def summarize_llama_bench(tests: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Decode (and, if measured, prompt) tokens/s and the model facts from parsed llama-bench tests.

    The decode test is the one with n_gen > 0 and n_prompt == 0 ("tg128"), the prompt test the one with
    n_prompt > 0 and n_gen == 0 ("pp512"); llama-bench reports their mean and standard deviation over
    the repetitions, and the per-repetition values in samples_ts.
    """
    first = tests[0]
    out: dict[str, Any] = {
        "model_type": first.get("model_type"),
        "model_size_bytes": first.get("model_size"),
        "model_n_params": first.get("model_n_params"),
        "n_threads": first.get("n_threads"),
        "cpu_info": first.get("cpu_info"),
        "backends": first.get("backends"),
        "build_commit": first.get("build_commit"),
        "build_number": first.get("build_number"),
    }
    for kind, pick in (
        ("decode", lambda t: t["n_gen"] > 0 and t["n_prompt"] == 0),
        ("prompt", lambda t: t["n_prompt"] > 0 and t["n_gen"] == 0),
    ):
        test = next((t for t in tests if pick(t)), None)
        if test is None:
            continue
        out[f"{kind}_tokens"] = test["n_gen"] if kind == "decode" else test["n_prompt"]
        out[f"{kind}_tok_s"] = float(test["avg_ts"])
        out[f"{kind}_tok_s_stddev"] = float(test["stddev_ts"])
        out[f"{kind}_samples_tok_s"] = [float(x) for x in test.get("samples_ts", [])]
    return out


def llama_bench_command(
    bench: Path, model: Path, threads: int, n_gen: int = 128, n_prompt: int = 0, reps: int = 3
) -> list[str]:
    """The llama-bench argv for one model, thread count and test shape, with JSON output."""
    return [
        str(bench), "-m", str(model), "-t", str(threads), "-n", str(n_gen), "-p", str(n_prompt),
        "-r", str(reps), "-o", "json",
    ]  # fmt: skip


class _Measured(NamedTuple):
    returncode: int
    stdout: str
    stderr: str
    peak_rss_bytes: int
    wall_s: float
    cpu_s: float  # user + system time of the child, all its threads
    involuntary_switches: int  # times the child was preempted: high when other processes want the cores


def _run_measured(cmd: Sequence[str]) -> _Measured:
    """Run `cmd` and return its exit code, output, peak RSS, wall and CPU time, and preemptions.

    The numbers are the child's own rusage, read from wait4() for that pid (RUSAGE_CHILDREN would give
    the maximum RSS over every child this process ever waited for).
    """
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(list(cmd), stdout=out, stderr=err, text=True)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here: keep Popen from waiting again
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
    return _Measured(
        proc.returncode,
        stdout,
        stderr,
        usage.ru_maxrss * scale,
        wall,
        usage.ru_utime + usage.ru_stime,
        usage.ru_nivcsw,
    )


def _loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def run_llama_bench(model: Path, threads: int, n_gen: int = 128, n_prompt: int = 0, reps: int = 3) -> dict:
    """Run the cached llama-bench on `model` and return its numbers.

    Keys: decode_tok_s, decode_tok_s_stddev, decode_samples_tok_s (and prompt_* when n_prompt > 0),
    model_type, model_size_bytes, model_n_params, n_threads, cpu_info, build_commit, build_number,
    peak_rss_bytes (llama-bench's own peak resident set), wall_s, cpu_s (its user + system time),
    involuntary_switches (how often it was preempted: a contention sign on a shared machine, as is
    cpu_s / wall_s well under `threads`; llama.cpp's threads spin while waiting for each other, so a
    preempted thread stalls the rest), loadavg_before / loadavg_after (1/5/15-minute load averages), command (a shell-quoted string), argv, llama_cpp_python (the pin)
    and tests (llama-bench's raw JSON). Raises LlamaCppError when llama-bench is not built, the model
    is missing, or llama-bench fails.
    """
    model = Path(model)
    if not model.is_file():
        raise LlamaCppError(f"model not found: {model}")
    if threads < 1 or reps < 1 or n_gen < 0 or n_prompt < 0 or n_gen + n_prompt == 0:
        raise LlamaCppError("need threads >= 1, reps >= 1 and some tokens to generate or process")
    cmd = llama_bench_command(tool_path("llama-bench"), model, threads, n_gen, n_prompt, reps)
    load_before = _loadavg()
    run = _run_measured(cmd)
    if run.returncode != 0:
        last = (run.stderr.strip().splitlines() or ["no output"])[-1]
        raise LlamaCppError(f"llama-bench failed (exit {run.returncode}): {last}")
    tests = parse_llama_bench_json(run.stdout)
    result: dict[str, Any] = {
        "engine": "llama.cpp",
        "llama_cpp_python": LLAMA_CPP_PYTHON_VERSION,
        "model": str(model),
        **summarize_llama_bench(tests),
        "peak_rss_bytes": run.peak_rss_bytes,
        "wall_s": round(run.wall_s, 2),
        "cpu_s": round(run.cpu_s, 2),
        "involuntary_switches": run.involuntary_switches,
        "loadavg_before": load_before,
        "loadavg_after": _loadavg(),
        "command": shlex.join(cmd),
        "argv": cmd,
        "tests": tests,
    }
    return result


def format_bench(result: Mapping[str, Any]) -> str:
    """A few human-readable lines for a run_llama_bench result."""
    lines = [f"llama.cpp {result.get('build_commit')} (llama-cpp-python {result.get('llama_cpp_python')})"]
    lines.append(
        f"model: {result.get('model_type')}, {result['model_size_bytes'] / 2**20:.1f} MiB, "
        f"{result['model_n_params'] / 1e6:.1f} M params"
    )
    for kind in ("prompt", "decode"):
        if f"{kind}_tok_s" in result:
            samples = ", ".join(f"{x:.2f}" for x in result[f"{kind}_samples_tok_s"])
            lines.append(
                f"{kind} ({result[f'{kind}_tokens']} tokens, {result['n_threads']} threads): "
                f"{result[f'{kind}_tok_s']:.2f} +- {result[f'{kind}_tok_s_stddev']:.2f} tok/s  [{samples}]"
            )
    lines.append(
        f"peak RSS: {result['peak_rss_bytes'] / 2**20:.1f} MiB; wall {result['wall_s']:.1f} s, "
        f"CPU {result['cpu_s']:.1f} s, preempted {result['involuntary_switches']} times"
    )
    lines.append(f"load average before/after: {result['loadavg_before']} / {result['loadavg_after']}")
    lines.append(f"command: {result['command']}")
    return "\n".join(lines)


# --- CLI -----------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    """The command line: build | bench | path. Errors print one line and exit with status 1."""
    p = argparse.ArgumentParser(
        prog="llama_cpp.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = p.add_subparsers(dest="command", required=True)
    b = sub.add_parser(
        "build", help="build the pinned llama.cpp CPU tools into the cache (instant when cached)"
    )
    b.add_argument("-j", "--jobs", type=int, default=None, help="parallel compile jobs (default: all CPUs)")
    b.add_argument(
        "--sdist", type=Path, default=None, help=f"use this local {SDIST_NAME} instead of pip download"
    )
    b.add_argument("--force", action="store_true", help="rebuild even if the cache has a build")
    r = sub.add_parser("bench", help="run llama-bench on a GGUF model and print decode tokens/s")
    r.add_argument("model", type=Path)
    r.add_argument("-t", "--threads", type=int, required=True)
    r.add_argument("-n", "--n-gen", type=int, default=128, help="tokens to generate (default 128)")
    r.add_argument("-p", "--n-prompt", type=int, default=0, help="prompt tokens to process (default 0: none)")
    r.add_argument("-r", "--reps", type=int, default=3, help="repetitions (default 3)")
    r.add_argument("--json", action="store_true", help="print the whole result as JSON")
    t = sub.add_parser("path", help="print the path of a built tool (llama-quantize or quantize, ...)")
    t.add_argument("tool")
    args = p.parse_args(argv)

    try:
        if args.command == "build":
            folder = build(jobs=args.jobs, sdist=args.sdist, force=args.force)
            for tool in TOOLS:
                print(folder / "bin" / tool)
        elif args.command == "bench":
            result = run_llama_bench(args.model, args.threads, args.n_gen, args.n_prompt, args.reps)
            print(json.dumps(result, indent=2) if args.json else format_bench(result))
        else:
            print(tool_path(args.tool))
    except LlamaCppError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
