"""The CUDA driver API through ctypes on `libcuda.so.1`: load a cubin, resolve kernels, launch them.

No dependency beyond the driver itself (present wherever a GPU works; torch loads it too), and one code path
for CUDA 12 and 13 drivers: the calls used here have had the same ABI since CUDA 4. `cuda.bindings` is not
used even when installed: it cannot pass the kernels' by-value structs more simply than ctypes does, and
pinning it would fight torch's own pin.

Contexts: modules are loaded into the device's primary context, the one torch uses, made current by torch
before the first launch (the launcher calls `load_module` only after torch has touched the device).

The launcher (`spqr_run.gpu.spqr_matmul`) sees a driver as anything with `load_module`, `get_function`,
`occupancy` and `launch`; the CPU execution shim (kernels/testing/shim.py, `ShimDriver`) offers the same four,
so CI runs the launcher's whole Python path without a GPU.
"""

from __future__ import annotations

import ctypes
import functools
from typing import Protocol

CUDA_SUCCESS = 0


class DriverError(RuntimeError):
    """A CUDA driver call failed: the call, the error's name and its text, one line."""


class Driver(Protocol):
    """What the launcher needs from a driver (`CudaDriver`, or the shim's)."""

    def load_module(self, image: bytes) -> object: ...

    def get_function(self, module: object, name: str) -> object: ...

    def occupancy(self, function: object, block_threads: int, dynamic_smem: int) -> int: ...

    def launch(
        self,
        function: object,
        grid: tuple[int, int, int],
        block: tuple[int, int, int],
        dynamic_smem: int,
        stream: int,
        params: ctypes.Array,
    ) -> None: ...


class CudaDriver:
    """libcuda.so.1 (the NVIDIA driver). Raises DriverError (or OSError from ctypes) when it cannot be loaded."""

    def __init__(self, path: str = "libcuda.so.1") -> None:
        self.lib = ctypes.CDLL(path)
        lib = self.lib
        vp, pvp, ci, cu = ctypes.c_void_p, ctypes.POINTER(ctypes.c_void_p), ctypes.c_int, ctypes.c_uint
        lib.cuInit.argtypes = [cu]
        lib.cuDriverGetVersion.argtypes = [ctypes.POINTER(ci)]
        lib.cuGetErrorName.argtypes = [ci, ctypes.POINTER(ctypes.c_char_p)]
        lib.cuGetErrorString.argtypes = [ci, ctypes.POINTER(ctypes.c_char_p)]
        lib.cuModuleLoadData.argtypes = [pvp, ctypes.c_char_p]
        lib.cuModuleGetFunction.argtypes = [pvp, vp, ctypes.c_char_p]
        lib.cuOccupancyMaxActiveBlocksPerMultiprocessor.argtypes = [
            ctypes.POINTER(ci),
            vp,
            ci,
            ctypes.c_size_t,
        ]
        lib.cuLaunchKernel.argtypes = [vp, cu, cu, cu, cu, cu, cu, cu, vp, pvp, pvp]
        lib.cuLaunchKernel.restype = ci
        self._check(lib.cuInit(0), "cuInit")

    def error_text(self, rc: int) -> str:
        """ "CUDA_ERROR_NO_BINARY_FOR_GPU (no kernel image is available for execution on the device)"."""
        name, text = ctypes.c_char_p(), ctypes.c_char_p()
        self.lib.cuGetErrorName(rc, ctypes.byref(name))
        self.lib.cuGetErrorString(rc, ctypes.byref(text))
        n = name.value.decode() if name.value else f"CUresult {rc}"
        return f"{n} ({text.value.decode()})" if text.value else n

    def _check(self, rc: int, what: str) -> None:
        if rc != CUDA_SUCCESS:
            raise DriverError(f"{what} failed: {self.error_text(rc)}")

    def version(self) -> tuple[int, int]:
        """The CUDA version the driver supports, e.g. (12, 4)."""
        v = ctypes.c_int()
        self._check(self.lib.cuDriverGetVersion(ctypes.byref(v)), "cuDriverGetVersion")
        return v.value // 1000, (v.value % 1000) // 10

    def load_module(self, image: bytes) -> ctypes.c_void_p:
        """cuModuleLoadData of a cubin into the current context (torch's primary context of the device)."""
        module = ctypes.c_void_p()
        self._check(self.lib.cuModuleLoadData(ctypes.byref(module), image), "cuModuleLoadData")
        return module

    def get_function(self, module: object, name: str) -> ctypes.c_void_p:
        function = ctypes.c_void_p()
        self._check(self.lib.cuModuleGetFunction(ctypes.byref(function), module, name.encode()),
                    f"cuModuleGetFunction({name})")  # fmt: skip
        return function

    def occupancy(self, function: object, block_threads: int, dynamic_smem: int) -> int:
        """Resident blocks per SM of `function` at this block size (the occupancy calculator)."""
        n = ctypes.c_int()
        self._check(self.lib.cuOccupancyMaxActiveBlocksPerMultiprocessor(ctypes.byref(n), function, block_threads,
                                                                         dynamic_smem), "cuOccupancy")  # fmt: skip
        return n.value

    def launch(
        self,
        function: object,
        grid: tuple[int, int, int],
        block: tuple[int, int, int],
        dynamic_smem: int,
        stream: int,
        params: ctypes.Array,
    ) -> None:
        """cuLaunchKernel on `stream` (a CUstream handle, torch's `cuda_stream`); `params` holds one pointer to
        each argument's bytes. Raises DriverError."""
        rc = self.lib.cuLaunchKernel(function, *grid, *block, dynamic_smem, stream, params, None)
        if rc != CUDA_SUCCESS:
            raise DriverError(f"cuLaunchKernel failed: {self.error_text(rc)}")


@functools.cache
def cuda_driver() -> CudaDriver:
    """The process's driver binding (loaded once). Raises OSError or DriverError when there is no driver."""
    return CudaDriver()
