"""Packaging step: builds the native CPU kernels (kernels/cpu, plain C, no libtorch) as part of `pip install`.

The library is declared as an optional extension module, so a machine without a C compiler still installs
(setuptools prints a warning) and runs the decode-to-fp16 path, saying why at load (`spqr_run.cpu.lib`). It
exports a plain C ABI called through ctypes, so one build serves every torch version. Sources and flags come
from `spqr_run/cpu/build.py`, loaded by path: pip's isolated build environment has no torch.
"""

import importlib.util
from pathlib import Path

from setuptools import Extension, setup

HERE = Path(__file__).resolve().parent
_spec = importlib.util.spec_from_file_location("spqr_cpu_build", HERE / "spqr_run" / "cpu" / "build.py")
cpu_build = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(cpu_build)

cpu_kernels = Extension(
    "spqr_run.cpu._spqr_cpu",
    sources=[f"kernels/cpu/{name}" for name in cpu_build.SOURCES],
    depends=[f"kernels/cpu/{name}" for name in cpu_build.HEADERS],
    extra_compile_args=[*cpu_build.CFLAGS, *cpu_build.define_flags(HERE / "kernels" / "cpu")],
    extra_link_args=list(cpu_build.LDFLAGS),
    optional=True,  # no compiler: install anyway, with setuptools' warning
)

setup(ext_modules=[cpu_kernels])
