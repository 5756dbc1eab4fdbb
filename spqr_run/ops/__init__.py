"""Ops: kernel wrappers with dispatch to the pure-torch references (see `spqr_matmul`).

The CUDA kernels are cubins launched through the driver (`spqr_run.gpu`); a GPU loads them on first use, or at
model load with `prepare_kernels`. Importing this package compiles and loads nothing. `kernel_path(device)` says
which GPU path runs (prebuilt cubin, NVRTC cache, reference) and why.
"""

from spqr_run.gpu.modules import KernelPath
from spqr_run.ops.spqr_matmul import (
    kernel_path,
    kernels_support,
    model_kernel_path,
    prepare_kernels,
    spqr_matmul,
    spqr_matmul_stored,
)

__all__ = [
    "KernelPath",
    "kernel_path",
    "kernels_support",
    "model_kernel_path",
    "prepare_kernels",
    "spqr_matmul",
    "spqr_matmul_stored",
]
