"""Packaging step: builds the native code as part of `pip install` (everything else is in pyproject.toml).

- The native CPU kernels (kernels/cpu, plain C, no libtorch), declared as an optional extension module, so a
  machine without a C compiler still installs (setuptools prints a warning) and runs the decode-to-fp16 path,
  saying why at load (`spqr_run.cpu.lib`). They export a plain C ABI called through ctypes, so one build serves
  every torch version. Sources and flags come from `spqr_run/cpu/build.py`.
- The CUDA kernels (kernels/spqr_matmul.cu), in `build_py`: nvcc cubins for sm_80/86/89/90 with their name table
  (`spqr_run/gpu/build.py`) into the package, and for a wheel a copy of the kernel sources (spqr_run/gpu/src/,
  for NVRTC on other GPUs). An editable install writes the cubins into the source tree (spqr_run/gpu/cubins/,
  git-ignored), where the package is imported from. Without nvcc it prints one warning line and the install goes
  on; $SPQR_RUN_CUBINS=skip builds none, $SPQR_RUN_CUBINS=require fails a wheel build when they cannot be built
  (setuptools reports, but does not fail on, errors of an editable install's build_py: CI checks the cubins with
  `spqr-run kernels show --check`).

Both helper modules are loaded by path: pip's isolated build environment has no torch.
"""

import importlib.util
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_py import build_py

HERE = Path(__file__).resolve().parent


def _load(name: str, path: Path):
    """A module of the package loaded by path (standard library only), without importing the package."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


cpu_build = _load("spqr_cpu_build", HERE / "spqr_run" / "cpu" / "build.py")

cpu_kernels = Extension(
    "spqr_run.cpu._spqr_cpu",
    sources=[f"kernels/cpu/{name}" for name in cpu_build.SOURCES],
    depends=[f"kernels/cpu/{name}" for name in cpu_build.HEADERS],
    extra_compile_args=[*cpu_build.CFLAGS, *cpu_build.define_flags(HERE / "kernels" / "cpu")],
    extra_link_args=list(cpu_build.LDFLAGS),
    optional=True,  # no compiler: install anyway, with setuptools' warning
)


class BuildPyWithKernels(build_py):
    """build_py, then the CUDA cubins (and, for a wheel, the kernel sources) into the package."""

    def run(self) -> None:
        super().run()
        gpu = _load("spqr_run_gpu_build", HERE / "spqr_run" / "gpu" / "build.py")
        if self.editable_mode:
            gpu.package_kernels(HERE / "spqr_run" / "gpu" / "cubins")
        else:
            package = Path(self.build_lib) / "spqr_run" / "gpu"
            gpu.package_kernels(package / "cubins", sources_out=package / "src")


setup(ext_modules=[cpu_kernels], cmdclass={"build_py": BuildPyWithKernels})
