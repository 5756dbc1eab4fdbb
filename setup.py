"""The packaging step that builds native code (everything else is in pyproject.toml).

`build_py` also builds the CUDA kernels: nvcc cubins for sm_80/86/89/90 with their name table
(spqr_run/gpu/build.py, loaded by path: pip's isolated build environment has no torch) into the package, and
for a wheel a copy of the kernel sources (spqr_run/gpu/src/, for NVRTC on other GPUs). An editable install
writes the cubins into the source tree (spqr_run/gpu/cubins/, git-ignored), where the package is imported from.
Without nvcc it prints one warning line and the install goes on; $SPQR_RUN_CUBINS=skip builds none,
$SPQR_RUN_CUBINS=require fails a wheel build when they cannot be built (setuptools reports, but does not fail
on, errors of an editable install's build_py: CI checks the cubins with `spqr-run kernels show --check`).
"""

import importlib.util
import sys
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = Path(__file__).resolve().parent


def _gpu_build():
    """spqr_run/gpu/build.py as a standalone module (standard library only)."""
    spec = importlib.util.spec_from_file_location(
        "spqr_run_gpu_build", HERE / "spqr_run" / "gpu" / "build.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


class BuildPyWithKernels(build_py):
    """build_py, then the CUDA cubins (and, for a wheel, the kernel sources) into the package."""

    def run(self) -> None:
        super().run()
        gpu = _gpu_build()
        if self.editable_mode:
            gpu.package_kernels(HERE / "spqr_run" / "gpu" / "cubins")
        else:
            package = Path(self.build_lib) / "spqr_run" / "gpu"
            gpu.package_kernels(package / "cubins", sources_out=package / "src")


setup(cmdclass={"build_py": BuildPyWithKernels})
