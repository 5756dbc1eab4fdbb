"""Ops: kernel wrappers with dispatch to the pure-torch references (see `spqr_matmul`).

The CUDA extension is built lazily on first CUDA use (`ext.load_extension`); importing this package compiles
nothing.
"""

from spqr_run.ops.spqr_matmul import kernels_support, spqr_matmul, spqr_matmul_stored

__all__ = ["kernels_support", "spqr_matmul", "spqr_matmul_stored"]
