"""The GPU delivery path without a GPU (issue 22): the launcher (spqr_run/gpu/spqr_matmul.py), where kernels come
from (spqr_run/gpu/modules.py: prebuilt cubin, NVRTC cache, reference), the cubin build and its name table
(spqr_run/gpu/build.py), NVRTC (spqr_run/gpu/nvrtc.py), and their reporting.

The launcher's whole Python path runs against the CPU execution shim: `ShimDevice` takes kernel images from the
real resolution (the package's cubins, or an NVRTC compile into a temporary cache), its driver checks every
symbol the name table gives against the cubin's own symbol table and runs the shim's kernel of that symbol
through a cuLaunchKernel-shaped entry, so each launch a GPU would get (plan, grid, argument block) is checked
against the reference on the CPU. Tests that need the cubins or NVRTC skip without them, except under CI
(CI=true), where .ci/run installs both and their absence fails.
"""

from __future__ import annotations

import ctypes
import json
import os
import re
import warnings
from pathlib import Path

import pytest
import torch
from test_kernels import (
    SHIM_BUILD,
    SHIM_MISSING,
    check_against_emulation,
    deltas,
    dequant_expected,
    kernel_weight16,
    random_layer,
    range_tolerance,
    shim,
)

from spqr_run.gpu import build, modules
from spqr_run.gpu import spqr_matmul as launcher
from spqr_run.gpu.driver import DriverError
from spqr_run.gpu.nvrtc import NvrtcUnavailable, load_nvrtc

IN_CI = os.environ.get("CI") == "true"
needs_shim = pytest.mark.skipif(SHIM_MISSING is not None, reason=f"CUDA shim unavailable: {SHIM_MISSING}")
plain_only = pytest.mark.skipif(SHIM_BUILD != "plain", reason="covered by the plain build")


def _nvrtc():
    try:
        return load_nvrtc(13)
    except NvrtcUnavailable as e:
        if IN_CI:
            pytest.fail(f"CI installs torch's NVRTC (.ci/run): {e}")
        pytest.skip(str(e))


def _shipped() -> build.Manifest:
    m = build.read_manifest(build.SHIPPED_CUBINS)
    if m is None:
        if IN_CI:
            pytest.fail(
                "CI's install builds the cubins (SPQR_RUN_CUBINS=require): spqr_run/gpu/cubins is empty"
            )
        pytest.skip("no prebuilt cubins (installed without nvcc)")
    return m


# ---- the plan and the argument block ------------------------------------------------------------------------
@pytest.mark.parametrize(
    "out_features,in_features,splits",
    [(4096, 4096, 16), (8192, 8192, 9), (22016, 8192, 3)],  # kernels/spqr_matmul.cu, "Work split"
)
def test_plan_fills_whole_waves_as_the_design_says(out_features, in_features, splits):
    plan = launcher.small_plan(out_features, in_features, num_sms=132, blocks_per_sm=9)
    groups = -(-out_features // 64)
    assert plan.splits == splits
    assert plan.counters == groups and plan.workspace_floats == groups * splits * 4 * 32 * 8
    assert groups * splits <= 132 * 9  # one wave


def test_plan_without_split_needs_no_workspace():
    plan = launcher.small_plan(64 * 2000, 64, num_sms=132, blocks_per_sm=4)  # one k-block: nothing to split
    assert plan == launcher.SmallPlan(1, 0, 0)


def test_argument_block_is_the_c_layout_of_the_kernel_parameters():
    assert ctypes.sizeof(launcher.SpqrLayerC) == 40 and ctypes.sizeof(launcher.SpqrBiasC) == 16
    offsets = {f: getattr(launcher.SmallArgs, f).offset for f, _ in launcher.SmallArgs._fields_}
    assert offsets == {"layer": 0, "x": 40, "rows": 48, "ldx": 52, "bias": 56, "y": 72, "workspace": 80,
                       "counters": 88}  # fmt: skip
    args = launcher.SmallArgs()
    params = launcher.params_of(args)
    assert [params[i] - ctypes.addressof(args) for i in range(8)] == list(offsets.values())


# ---- the launcher on the shim, every source of kernels ----------------------------------------------------------
def _run_layer(dev: launcher.GpuDevice, q, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """matmul_small (or dequantize for more than 16 rows) through the launcher on fenced copies."""
    m = q.meta
    packed = [dev.input(t, n) for t, n in ((q.tiles, "tiles"), (q.outliers, "outliers"),
                                           (q.outlier_row_ptr, "outlier_row_ptr"))]  # fmt: skip
    numbers = (m.wbits, m.stat_bits, m.out_features, m.in_features)
    if x.shape[0] > 16:
        return launcher.dequantize(dev, *packed, *numbers).clone()
    return launcher.matmul_small(dev, dev.input(x, "x"), *packed, dev.input(bias, "bias"), *numbers).clone()


def _check_path(images, arch: str, expect_path: str) -> None:
    """Three (wbits, stat_bits) and both n-tile variants through a ShimDevice whose kernels come from `images`,
    each result equal to the shim's own table's and within the emulation's bound."""
    s = shim()
    for wbits, stat_bits, rows in ((3, 3, 1), (4, 3, 12), (2, 4, 5)):
        q = random_layer(72, 300, wbits=wbits, stat_bits=stat_bits, outlier_fraction=0.02, seed=rows)
        x = torch.randn(rows, 300, generator=torch.Generator().manual_seed(rows)).half()
        bias = torch.randn(72, generator=torch.Generator().manual_seed(1))
        with s.device(arch=arch, images=images) as dev:
            y = _run_layer(dev, q, x, bias)
            (kern,) = dev.loaded()
            assert kern.image.path == expect_path and kern.image.image  # a real cubin, symbols checked
        with s.device(arch=arch) as ref_dev:  # the shim's own table
            y_ref = _run_layer(ref_dev, q, x, bias)
        assert torch.equal(y, y_ref)
        check_against_emulation(y, x, kernel_weight16(q).double() + deltas(q).double(), bias.double(),
                                range_tolerance(q))  # fmt: skip
        with s.device(arch=arch, images=images) as dev:
            assert torch.equal(_run_layer(dev, q, torch.zeros(17, 300).half(), None), dequant_expected(q))


@needs_shim
@plain_only
def test_launcher_runs_the_shipped_cubins_names_on_the_shim():
    """sm_86 takes the prebuilt sm_86 cubin; sm_87 runs the sm_86 one (same major, older minor)."""
    _shipped()

    def images(bits, reasons):
        return modules.candidates("sm_87", bits, nvrtc_loader=lambda: pytest.fail("NVRTC was not needed"),
                                  reasons=reasons)  # fmt: skip

    _check_path(images, "sm_87", modules.PREBUILT)


@needs_shim
@plain_only
def test_launcher_compiles_with_nvrtc_caches_and_reuses_the_cubin(tmp_path, monkeypatch):
    """A GPU without a shipped cubin (sm_120): NVRTC compiles the pair's kernels once into the cache (cubin,
    then the .json naming it), later loads read the cache without compiling."""
    nv = _nvrtc()
    monkeypatch.setenv("SPQR_RUN_KERNEL_CACHE", str(tmp_path))
    reasons: list[str] = []
    compiled = []

    class Counting:
        version, path, include_dir = nv.version, nv.path, nv.include_dir
        options = staticmethod(nv.options)

        def compile_kernels(self, *a, **kw):
            compiled.append(a)
            return nv.compile_kernels(*a, **kw)

    def images(bits, r):
        return modules.candidates("sm_120", bits, nvrtc_loader=Counting, reasons=reasons)

    _check_path(images, "sm_120", modules.NVRTC)
    assert "no prebuilt cubin for sm_120" in reasons[0]
    assert len(compiled) == 3  # one compile per (wbits, stat_bits), then cache hits
    entries = sorted(tmp_path.glob("*.json"))
    assert len(entries) == 3 and len(list(tmp_path.glob("*.cubin"))) == 3
    meta = json.loads(entries[0].read_text())
    assert meta["arch"] == "sm_120" and meta["nvrtc"] == nv.version and len(meta["names"]) == 3
    assert not list(tmp_path.glob("*.tmp"))  # written through a rename


@needs_shim
@plain_only
def test_a_symbol_missing_from_the_cubin_is_refused_like_the_driver_would():
    m = _shipped()
    s = shim()
    image = (build.SHIPPED_CUBINS / m.cubins["sm_80"]).read_bytes()
    module = s.device().driver.load_module(image)
    with pytest.raises(DriverError, match="CUDA_ERROR_NOT_FOUND"):
        s.device().driver.get_function(module, "_ZN4spqr7missingEv")
    with pytest.raises(DriverError, match="INVALID_IMAGE"):
        s.device().driver.load_module(b"not a cubin")


@needs_shim
def test_the_name_tables_of_nvcc_nvrtc_and_gxx_agree():
    """The kernels' symbols are the same whoever compiles them (named namespace): the shipped nvcc table, an
    NVRTC compile's lowered names and the shim's g++ symbols."""
    shipped = _shipped().names
    nv = _nvrtc().compile_kernels("sm_80", [(3, 3)])
    assert nv.names == {e: shipped[e] for e in nv.names}
    gxx = dict(shim().kernels())
    assert gxx == shipped


# ---- where the kernels come from -----------------------------------------------------------------------------
def test_prebuilt_is_refused_with_a_reason_when_it_does_not_fit(tmp_path):
    m = _shipped()
    sources = build.read_sources()
    img = modules.prebuilt("sm_90", (3, 3), sources=sources)
    assert img.path == modules.PREBUILT and img.arch == "sm_90" and len(img.names) == 3
    cases = [
        ({"arch": "sm_100"}, "no prebuilt cubin for sm_100"),
        (
            {"sources": {**sources, "spqr_ptx.cuh": sources["spqr_ptx.cuh"] + b"// edited\n"}},
            "sources differ",
        ),
        ({"driver_cuda": (12, 4)}, "this driver supports CUDA 12.4"),
        ({"directory": tmp_path}, "no prebuilt cubins"),
    ]
    for kw, message in cases:
        args = {"arch": "sm_80", "sources": sources} | kw
        with pytest.raises(modules.KernelsUnavailable, match=message):
            modules.prebuilt(args.pop("arch"), (3, 3), **args)
    assert m.compiler.startswith("nvcc 13.")


def test_a_torn_or_foreign_cache_entry_is_a_miss(tmp_path):
    key = "k" * 16
    (tmp_path / f"{key}.cubin").write_bytes(b"cubin")
    meta = {"format": modules.CACHE_FORMAT, "arch": "sm_80", "nvrtc": "13.0", "names": {},
            "cubin_sha256": "0" * 64}  # fmt: skip
    (tmp_path / f"{key}.json").write_text(json.dumps(meta))
    assert modules.cached(tmp_path, key) is None  # the cubin is not the one the .json names
    import hashlib

    meta["cubin_sha256"] = hashlib.sha256(b"cubin").hexdigest()
    (tmp_path / f"{key}.json").write_text(json.dumps(meta))
    assert modules.cached(tmp_path, key).image == b"cubin"
    (tmp_path / f"{key}.json").write_text('{"format": ')  # a partial write
    assert modules.cached(tmp_path, key) is None


def test_cache_key_follows_sources_options_arch_and_version():
    s = {"spqr_matmul.cu": b"a", "spqr_matmul.h": b"b", "spqr_ptx.cuh": b"c"}
    base = modules.cache_key(s, (3, 3), ["-std=c++20"], "sm_120", "13.0")
    changed = [
        modules.cache_key({**s, "spqr_matmul.h": b"B"}, (3, 3), ["-std=c++20"], "sm_120", "13.0"),
        modules.cache_key(s, (4, 3), ["-std=c++20"], "sm_120", "13.0"),
        modules.cache_key(s, (3, 3), ["-std=c++17"], "sm_120", "13.0"),
        modules.cache_key(s, (3, 3), ["-std=c++20"], "sm_100", "13.0"),
        modules.cache_key(s, (3, 3), ["-std=c++20"], "sm_120", "13.1"),
    ]
    assert len({base, *changed}) == 6


def test_predicted_path_names_the_missing_piece_and_the_fix(tmp_path, monkeypatch):
    monkeypatch.setenv("SPQR_RUN_KERNEL_CACHE", str(tmp_path))

    def no_nvrtc():
        raise NvrtcUnavailable("no NVRTC found: pip install nvidia-cuda-nvrtc (torch's CUDA wheels bring it)")

    path = modules.predict("sm_120", (3, 3), nvrtc_loader=no_nvrtc)
    assert path.name == modules.REFERENCE and "\n" not in str(path)
    assert "no prebuilt cubin for sm_120" in path.reason and "pip install nvidia-cuda-nvrtc" in path.reason
    if build.read_manifest(build.SHIPPED_CUBINS) is not None:
        assert modules.predict("sm_89", (3, 3), nvrtc_loader=no_nvrtc).name == modules.PREBUILT


def test_a_gpu_older_than_sm80_gets_the_reference_with_why():
    path = modules.predict("sm_75", (3, 3), nvrtc_loader=lambda: pytest.fail("NVRTC is not asked"))
    assert path.name == modules.REFERENCE and "sm_80 or newer" in path.reason and "sm_75" in path.reason
    reasons: list[str] = []
    assert list(modules.candidates("sm_75", (3, 3), nvrtc_loader=lambda: None, reasons=reasons)) == []
    assert "sm_75" in reasons[0]


def test_kernel_path_without_a_gpu_is_the_reference_with_why():
    from spqr_run.ops import kernel_path

    assert kernel_path("cpu").name == modules.REFERENCE and "cpu" in kernel_path("cpu").reason
    if not torch.cuda.is_available():
        assert "no CUDA device" in kernel_path().reason


# ---- the launcher's contract ---------------------------------------------------------------------------------
@needs_shim
@plain_only
def test_kernels_are_not_loaded_inside_a_graph_capture():
    class Capturing(type(shim().device())):
        def capturing(self) -> bool:
            return True

    dev = Capturing(shim())
    with pytest.raises(RuntimeError, match="not loaded before CUDA graph capture"):
        dev.kernels((3, 3))
    dev.__exit__(None, None, None)


@needs_shim
@plain_only
def test_bad_arguments_are_one_line_errors():
    q = random_layer(32, 128)
    m = q.meta
    with shim().device() as dev:
        packed = [dev.input(t, n) for t, n in ((q.tiles, "t"), (q.outliers, "o"), (q.outlier_row_ptr, "r"))]
        numbers = (m.wbits, m.stat_bits, m.out_features, m.in_features)
        bad = [
            (torch.zeros(17, 128).half(), None, "1..16 rows"),
            (torch.zeros(2, 128), None, "float16"),
            (torch.zeros(2, 128).half(), torch.zeros(31), "bias must be"),
        ]
        for x, bias, message in bad:
            with pytest.raises(ValueError, match=message) as info:
                launcher.matmul_small(dev, x, *packed, bias, *numbers)
            assert "\n" not in str(info.value)
        with pytest.raises(ValueError, match="tiles has shape"):
            launcher.matmul_small(dev, torch.zeros(1, 128).half(), packed[0][:1], *packed[1:], None, *numbers)


@needs_shim
@plain_only
def test_a_layers_launch_state_goes_with_its_tensors():
    q = random_layer(32, 128)
    m = q.meta
    with shim().device() as dev:
        tiles = q.tiles.clone()
        launcher.dequantize(dev, tiles, q.outliers, q.outlier_row_ptr, m.wbits, m.stat_bits, m.out_features,
                            m.in_features)  # fmt: skip
        assert len(dev._layers) == 1
        del tiles
        assert len(dev._layers) == 0


# ---- the build -----------------------------------------------------------------------------------------------
def test_demangle_and_elf_symbols_of_a_shipped_cubin():
    m = _shipped()
    image = (build.SHIPPED_CUBINS / m.cubins["sm_80"]).read_bytes()
    symbols = build.elf_function_symbols(image)
    insts = {build.demangle_instance(s) for s in symbols} - {None}
    assert insts == set(build.instances())
    assert build.demangle_instance("_ZN4spqr22spqr_dequantize_kernelILi4ELi3EEEv9SpqrLayerP6__half") == \
        build.Instance("spqr_dequantize_kernel", (4, 3))  # fmt: skip
    assert build.demangle_instance("_Z6kernelPf") is None
    with pytest.raises(ValueError, match="not an ELF64"):
        build.elf_function_symbols(b"\x7fELF" + b"\0" * 10)


def test_packaging_step_without_nvcc_warns_in_one_line_and_ships_the_sources(tmp_path, monkeypatch):
    monkeypatch.setattr(build, "find_nvcc", lambda nvcc=None: None)
    monkeypatch.delenv(build.CUBINS_ENV, raising=False)
    lines: list[str] = []
    assert build.package_kernels(tmp_path / "cubins", sources_out=tmp_path / "src", log=lines.append) is None
    assert len(lines) == 1 and lines[0].startswith("warning:") and "NVRTC" in lines[0]
    assert sorted(p.name for p in (tmp_path / "src").iterdir()) == sorted(build.KERNEL_FILES)
    assert not (tmp_path / "cubins").exists()
    monkeypatch.setenv(build.CUBINS_ENV, "require")
    with pytest.raises(build.BuildError, match="no nvcc"):
        build.package_kernels(tmp_path / "cubins", log=lines.append)
    monkeypatch.setenv(build.CUBINS_ENV, "skip")
    assert build.package_kernels(tmp_path / "cubins", log=lines.append) is None and "skip" in lines[-1]
    monkeypatch.delenv(build.CUBINS_ENV)

    def no_sources():
        raise build.BuildError("the CUDA kernel sources are not found")

    monkeypatch.setattr(build, "sources_dir", no_sources)  # an sdist without kernels/
    assert build.package_kernels(tmp_path / "cubins", log=lines.append) is None
    assert lines[-1].startswith("warning:") and "reference" in lines[-1]


def test_packaging_step_keeps_an_up_to_date_build():
    m = _shipped()
    if build.find_nvcc() is None:
        pytest.skip("no nvcc")
    if m.sources_sha256 != build.sources_digest(
        build.read_sources()
    ):  # not rebuilt here: that takes a minute
        if IN_CI:
            pytest.fail("the shipped cubins are older than the kernel sources right after the install")
        pytest.skip("the kernel sources changed since the cubins were built (pip install -e . rebuilds them)")
    lines: list[str] = []
    again = build.package_kernels(build.SHIPPED_CUBINS, log=lines.append)
    assert again is not None and again.cubin_sha256 == m.cubin_sha256 and "up to date" in lines[0]


# ---- reporting -----------------------------------------------------------------------------------------------
def test_metrics_name_the_gpu_path_with_escaped_labels():
    from spqr_run.server.metrics import Metrics

    metrics = Metrics()
    assert "spqr_gpu_kernels" not in metrics.render()
    metrics.gpu_kernels = (modules.NVRTC, 'sm_120 cubin "compiled"\nin 1.2 s')
    line = next(x for x in metrics.render().splitlines() if x.startswith("spqr_gpu_kernels{"))
    assert line == 'spqr_gpu_kernels{path="NVRTC cache",reason="sm_120 cubin \\"compiled\\"\\nin 1.2 s"} 1'


def test_banner_row_and_kernels_show(capsys):
    from spqr_run.chat.info import ModelFacts, describe
    from spqr_run.cli import run as cli_run

    facts = ModelFacts("m", "m.spqr", "llama", 1, 3.9, "", "cuda:0", 1, 1, 1, 1, 16, 16, 16, "fp16",
                       kernels="GPU prebuilt cubin (sm_86 cubin shipped with the package)")  # fmt: skip
    assert ("kernels", "GPU prebuilt cubin (sm_86 cubin shipped with the package)") in describe(facts)
    with pytest.raises(SystemExit) as code:
        cli_run.main(["kernels", "show"])
    assert code.value.code == 0
    out = capsys.readouterr().out
    assert "GPU: reference" in out or "cuda:0" in out
    assert "prebuilt:" in out and "NVRTC cache:" in out


def test_kernels_build_with_nvrtc_writes_cubins_and_a_name_table(tmp_path):
    _nvrtc()
    from spqr_run.cli import run as cli_run

    with pytest.raises(SystemExit) as code:
        cli_run.main(["kernels", "build", "--compiler", "nvrtc", "--arch", "sm_89", "--wbits", "2", "--stat-bits",
                      "2", "--out", str(tmp_path)])  # fmt: skip
    assert code.value.code == 0
    m = build.read_manifest(tmp_path)
    assert m.compiler.startswith("nvrtc") and m.bits == [[2, 2]] and list(m.cubins) == ["sm_89"]
    image = (tmp_path / m.cubins["sm_89"]).read_bytes()
    assert set(m.names.values()) <= set(build.elf_function_symbols(image))


def test_kernels_build_refuses_an_unsupported_arch_in_one_line(capsys):
    from spqr_run.cli import run as cli_run

    with pytest.raises(SystemExit) as code:
        cli_run.main(["kernels", "build", "--arch", "sm_75", "--out", "/nonexistent"])
    assert code.value.code == 2
    assert "sm_75" in capsys.readouterr().err


def test_prepare_kernels_without_packed_gpu_layers_does_nothing():
    from spqr_run.ops import model_kernel_path, prepare_kernels

    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert prepare_kernels(model) == {}
    assert model_kernel_path(model) is None


# ---- the GPU scripts, without a GPU ------------------------------------------------------------------------------
ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_dry_run_installs_as_a_user_without_the_toolkit(tmp_path):
    import subprocess

    out = tmp_path / "check.txt"
    res = subprocess.run(["bash", "benchmarks/gpu_check.sh", "--dry-run", "--out", str(out), "--budget", "480"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert res.returncode == 0, res.stderr
    steps = [line.split(" (limit")[0].removeprefix("[dry-run] ") for line in res.stdout.splitlines()
             if line.startswith("[dry-run]")]  # fmt: skip
    for name in ("package (pip wheel: nvcc cubins for sm_80/86/89/90)", "user install (no CUDA toolkit on PATH)",
                 "prebuilt path taken", "delivery: module load, first-use NVRTC, launch cost",
                 "CUDA tests (installed wheel)", "CUDA tests on the NVRTC path"):  # fmt: skip
        assert name in steps
    user_path = re.search(r"PATH=(\S+)", res.stdout.split("[dry-run] prebuilt path taken")[1]).group(1)
    assert not [d for d in user_path.split(":") if (Path(d) / "nvcc").exists()]
    assert "PYTHONPATH" not in out.read_text()  # the user's steps import the installed wheel


@needs_shim
@plain_only
def test_gpu_delivery_dry_run_walks_its_steps(capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location("gpu_delivery", ROOT / "benchmarks" / "gpu_delivery.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main(["--dry-run"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line[:2] for line in lines] == ["1.", "2.", "3.", "4.", "5."]
