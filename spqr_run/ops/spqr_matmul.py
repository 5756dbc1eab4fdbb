"""`spqr_matmul`: y = x @ W^T (+ bias) for a packed SpQR `QuantizedLinear` (v2 `tiles` layout), on the CUDA
kernels when possible.

Two entry points:
- `spqr_matmul(x, q, bias)`: x in input-feature order; gathers x[..., perm] itself, then as below;
- `spqr_matmul_stored(x_stored, q, bias)`: x already in the layer's stored column order (x[..., perm]), for
  callers that permute once for several linears sharing an input (fused q/k/v, gate/up).

Dispatch (`spqr_matmul_stored`):
- CPU, or a layout/dtype without kernels -> the pure-torch reference (`spqr_matmul_reference` semantics);
- CUDA, fp16, 1..16 activation rows -> `spqr::matmul_small`: the tensor-core small-batch kernel (split-K,
  deterministic reduction; kernels/spqr_matmul.cu);
- CUDA, fp16, more rows (prefill) -> `spqr::dequantize` (fp16 W, stored column order, one launch) + cuBLAS.

The kernels are cubins launched through the driver (`spqr_run.gpu`: prebuilt for sm_80/86/89/90, else compiled
by NVRTC at model load and cached), never a torch C++ extension. `kernel_path(device)` says which path runs and
why; `prepare_kernels(model)` loads (or compiles) a model's kernels before any CUDA graph capture. The ops are
`torch.library` custom ops with fake (meta) implementations, so `torch.compile` and CUDA graphs can capture them;
on a CPU tensor, or on a GPU without kernels (one warning naming what is missing), their body computes the
reference instead, so they run (and `torch.library.opcheck` passes) anywhere. GPTQ/RTN layouts have no kernels.
"""

from __future__ import annotations

import contextlib
import functools
import threading
import warnings
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from spqr_run.gpu import modules
from spqr_run.gpu import spqr_matmul as launcher
from spqr_run.gpu.modules import KernelPath
from spqr_run.quant import tile_layout
from spqr_run.quant.grid import dequantize_codes
from spqr_run.quant.spqr_matmul import spqr_matmul_reference

TILE = 16  # the kernels' beta1 = beta2
KERNEL_WBITS = (2, 3, 4)
KERNEL_STAT_BITS = (2, 3, 4)
_BITS = {(w, sb) for w in KERNEL_WBITS for sb in KERNEL_STAT_BITS}
MAX_SMALL_ROWS = 16  # up to this many activation rows use the small-batch kernel, more dequantize + cuBLAS
REFERENCE_BLOCK_ELEMENTS = 1 << 22  # the reference dequantizes about this many weights at a time


# ---- the reference on the raw v2 tensors (the ops' CPU / fallback body) ---------------------------------------
def reference_weight(
    tiles: Tensor,
    outliers: Tensor,
    outlier_row_ptr: Tensor,
    wbits: int,
    stat_bits: int,
    out_features: int,
    in_features: int,
    row_tiles: slice | None = None,
) -> Tensor:
    """The weight of row tiles `row_tiles` (default all) as fp32 (rows, in), stored column order, outliers
    included: `grid.dequantize_codes` on `tile_layout.unpack` (KERNELS_V2_SPEC.md section 2, "the one formula").
    """
    t0, t1, _ = (row_tiles or slice(None)).indices(tiles.shape[0])
    r0, r1 = t0 * TILE, min(t1 * TILE, out_features)
    codes, sc, zc, second = tile_layout.unpack(tiles[t0:t1], r1 - r0, in_features, wbits, stat_bits)
    sec = second.float().repeat_interleave(TILE, dim=0)[: r1 - r0]  # (rows, groups, 4)
    scale = dequantize_codes(sc, sec[..., 0], sec[..., 1])  # (rows, groups)
    zero = dequantize_codes(zc, sec[..., 2], sec[..., 3])
    cols = torch.arange(in_features, device=tiles.device) // TILE
    w = dequantize_codes(codes, scale[:, cols], zero[:, cols])  # (rows, in) fp32
    ptr = outlier_row_ptr.long()
    p0, p1 = int(ptr[r0]), int(ptr[r1])
    if p1 > p0:
        words = outliers[p0:p1].long() & 0xFFFFFFFF
        rows = torch.repeat_interleave(
            torch.arange(r1 - r0, device=w.device), ptr[r0 + 1 : r1 + 1] - ptr[r0:r1]
        )
        v = words & 0xFFFF
        vals = torch.where(v > 0x7FFF, v - 0x10000, v).to(torch.int16).view(torch.float16).float()
        w.index_put_((rows, words >> 16), vals, accumulate=True)
    return w


def _reference_stored(x_stored: Tensor, weight_rows, out_features: int, bias: Tensor | None) -> Tensor:
    """x_stored (tokens, in) -> (tokens, out) in x's dtype: fp32 products and sums, bias in fp32, one rounding.
    weight_rows(t0, t1) gives the fp32 weight of row tiles t0..t1-1."""
    xf = x_stored.float()
    in_features = x_stored.shape[-1]
    y = torch.empty(xf.shape[0], out_features, device=x_stored.device, dtype=torch.float32)
    step = max(1, (REFERENCE_BLOCK_ELEMENTS // max(in_features, 1)) // TILE)  # row tiles a block
    row_tiles = -(-out_features // TILE)
    for t0 in range(0, row_tiles, step):
        t1 = min(t0 + step, row_tiles)
        y[:, t0 * TILE : min(t1 * TILE, out_features)] = xf @ weight_rows(t0, t1).T
    if bias is not None:
        y += bias.float()
    return y.to(x_stored.dtype)


# ---- the GPU kernels of a device -------------------------------------------------------------------------------
_warned: set[tuple[str, tuple[int, int]]] = set()
_warn_lock = threading.Lock()


def _nvrtc_loader():
    """NVRTC of torch's CUDA major version first (its cubins load on any driver that runs torch)."""
    from spqr_run.gpu.nvrtc import load_nvrtc

    major = int(torch.version.cuda.split(".")[0]) if torch.version.cuda else None
    return load_nvrtc(major)


@functools.cache
def cuda_gpu(index: int) -> launcher.CudaGpu:
    """The launcher's state for cuda:`index` (driver, SM count, loaded kernels), made once. Raises OSError or
    DriverError when the CUDA driver cannot be loaded."""
    from spqr_run.gpu.driver import cuda_driver

    return launcher.CudaGpu(torch.device("cuda", index), cuda_driver(), _nvrtc_loader)


def _no_gpu_reason(device: torch.device) -> str | None:
    if device.type != "cuda":
        return f"the model runs on {device.type}"
    if not torch.cuda.is_available():
        return "torch sees no CUDA device" + ("" if torch.version.cuda else " (a CPU-only torch build)")
    return None


def gpu_kernels(device: torch.device, bits: tuple[int, int]) -> launcher.GpuDevice | None:
    """The device's launcher when it has kernels for `bits` (loading or compiling them on first use), else None
    after one warning naming what is missing (then the reference runs)."""
    reason = _no_gpu_reason(device)
    if reason is None:
        try:
            dev = cuda_gpu(device.index if device.index is not None else torch.cuda.current_device())
            dev.kernels(bits)
            return dev
        except modules.KernelsUnavailable as e:
            reason = str(e)
        except OSError as e:  # no libcuda.so.1
            reason = f"the CUDA driver library could not be loaded ({e})"
        except RuntimeError as e:  # DriverError, or a capture that started before the kernels were loaded
            if "CUDA graph capture" in str(e):
                raise
            reason = str(e).splitlines()[0]
    key = (str(device), bits)
    with _warn_lock:
        if key not in _warned:
            _warned.add(key)
            warnings.warn(f"spqr-run: CUDA kernels unavailable on {device} for wbits={bits[0]}, stat_bits={bits[1]}: "
                          f"{reason}; using the slow pure-torch reference path", RuntimeWarning, stacklevel=3)  # fmt: skip
    return None


def _device_guard(device: torch.device):
    """The device current for the launch (the driver launches into the current context): a no-op when it
    already is, as on a one-GPU machine."""
    if device.index is None or device.index == torch.cuda.current_device():
        return contextlib.nullcontext()
    return torch.cuda.device(device)


def kernel_path(device: torch.device | str | None = None, bits: tuple[int, int] | None = None) -> KernelPath:
    """Which GPU path runs on `device` (default cuda:0) for `bits` (default: whatever is loaded there, else the
    3-bit pair) and why: the kernels already loaded say where they came from; otherwise the path is predicted
    without compiling (prebuilt cubin, NVRTC cache or an NVRTC compile at model load, reference)."""
    device = torch.device(device if device is not None else "cuda")
    reason = _no_gpu_reason(device)
    if reason is not None:
        return KernelPath(modules.REFERENCE, reason)
    try:
        dev = cuda_gpu(device.index if device.index is not None else torch.cuda.current_device())
    except (OSError, RuntimeError) as e:
        return KernelPath(
            modules.REFERENCE, f"the CUDA driver could not be loaded ({str(e).splitlines()[0]})"
        )
    loaded = [k for k in dev.loaded() if bits is None or k.bits == tuple(bits)]
    if loaded:
        return KernelPath(loaded[0].image.path, loaded[0].image.origin)
    if bits is not None and tuple(bits) in dev._failed:
        return KernelPath(modules.REFERENCE, dev._failed[tuple(bits)])
    return modules.predict(dev.arch, bits, nvrtc_loader=dev.nvrtc_loader, driver_cuda=dev.driver_cuda)


def _packed_cuda_layers(model: nn.Module) -> list[tuple[torch.device, tuple[int, int]]]:
    """(device, (wbits, stat_bits)) of every packed SpQR layer on CUDA that has kernels, in module order."""
    out = []
    for m in model.modules():
        meta, tiles = getattr(m, "meta", None), getattr(m, "tiles", None)
        if meta is None or not isinstance(tiles, Tensor) or not tiles.is_cuda or meta.method != "spqr":
            continue
        if (meta.groupsize, meta.stat_groupsize) == (TILE, TILE) and (meta.wbits, meta.stat_bits) in _BITS:
            out.append((tiles.device, (meta.wbits, meta.stat_bits)))
    return out


def model_kernel_path(model: nn.Module) -> KernelPath | None:
    """The GPU path of the model's packed SpQR layers (the first (device, bits) they use), None when it has no
    packed SpQR layer on a GPU (a CPU model, a dense model)."""
    layers = _packed_cuda_layers(model)
    return kernel_path(*layers[0]) if layers else None


def prepare_kernels(model: nn.Module) -> dict[tuple[str, tuple[int, int]], KernelPath]:
    """Loads (or NVRTC-compiles, once, into the cache) the kernels of every (wbits, stat_bits) the model's packed
    CUDA layers use, before any CUDA graph capture. Returns {(device, bits): the path each takes}; a pair without
    kernels warns once and runs the reference."""
    wanted = set(_packed_cuda_layers(model))
    out = {}
    for device, bits in sorted(wanted, key=str):
        gpu_kernels(device, bits)
        out[(str(device), bits)] = kernel_path(device, bits)
    return out


# ---- custom ops ---------------------------------------------------------------------------------------------
# Argument order: activations, then the packed tensors, then the layer's numbers.
@torch.library.custom_op("spqr::matmul_small", mutates_args=())
def matmul_small(
    x_stored: Tensor,
    tiles: Tensor,
    outliers: Tensor,
    outlier_row_ptr: Tensor,
    bias: Tensor | None,
    wbits: int,
    stat_bits: int,
    out_features: int,
    in_features: int,
) -> Tensor:
    """x_stored (rows, in) fp16 with 1..16 rows, stored column order -> (rows, out) fp16 (tensor-core kernel)."""
    packed = (tiles, outliers, outlier_row_ptr)
    numbers = (wbits, stat_bits, out_features, in_features)
    dev = gpu_kernels(x_stored.device, (wbits, stat_bits)) if x_stored.is_cuda else None
    if dev is not None:
        with _device_guard(x_stored.device):
            return launcher.matmul_small(dev, x_stored, *packed, bias, *numbers)

    def rows(t0: int, t1: int) -> Tensor:
        return reference_weight(*packed, *numbers, row_tiles=slice(t0, t1))

    return _reference_stored(x_stored, rows, out_features, bias)


@matmul_small.register_fake
def _matmul_small_fake(x_stored: Tensor, *args: Any) -> Tensor:
    out_features = args[-2]
    return x_stored.new_empty((x_stored.shape[0], out_features))


@torch.library.custom_op("spqr::dequantize", mutates_args=())
def dequantize(
    tiles: Tensor,
    outliers: Tensor,
    outlier_row_ptr: Tensor,
    wbits: int,
    stat_bits: int,
    out_features: int,
    in_features: int,
) -> Tensor:
    """The weight (out, in) fp16 in stored (permuted) column order, outliers included (one launch on CUDA)."""
    packed = (tiles, outliers, outlier_row_ptr)
    numbers = (wbits, stat_bits, out_features, in_features)
    dev = gpu_kernels(tiles.device, (wbits, stat_bits)) if tiles.is_cuda else None
    if dev is not None:
        with _device_guard(tiles.device):
            return launcher.dequantize(dev, *packed, *numbers)
    return reference_weight(*packed, *numbers).to(torch.float16)


@dequantize.register_fake
def _dequantize_fake(tiles: Tensor, *args: Any) -> Tensor:
    out_features, in_features = args[-2], args[-1]
    return tiles.new_empty((out_features, in_features), dtype=torch.float16)


# ---- dispatcher -----------------------------------------------------------------------------------------
def kernels_support(x: Tensor, q: Any) -> bool:
    """True when the CUDA kernels cover this input and layer (else the reference path runs)."""
    m = q.meta
    return (
        x.is_cuda
        and x.dtype == torch.float16
        and m.method == "spqr"
        and getattr(q, "tiles", None) is not None
        and q.tiles.device == x.device
        and m.groupsize == TILE
        and m.stat_groupsize == TILE
        and m.wbits in KERNEL_WBITS
        and m.stat_bits in KERNEL_STAT_BITS
    )


def _check_features(x: Tensor, q: Any) -> None:
    if x.shape[-1] != q.meta.in_features:
        raise ValueError(f"input has {x.shape[-1]} features, the layer expects {q.meta.in_features}")


def spqr_matmul_stored(x_stored: Tensor, q: Any, bias: Tensor | None = None) -> Tensor:
    """x_stored (..., in), already permuted to the layer's stored column order (`x[..., q.perm_indices()]`)
    -> (..., out) in x's dtype. Kernels for CUDA fp16 spqr layers (dispatch in the module docstring), else the
    reference: fp32 products and sums of x_stored with `q.dequantize()` (stored order), bias in fp32.

    Raises ValueError when the last dim is not the layer's in_features.
    """
    _check_features(x_stored, q)
    m = q.meta
    if not kernels_support(x_stored, q) or gpu_kernels(x_stored.device, (m.wbits, m.stat_bits)) is None:
        x2 = x_stored.reshape(-1, m.in_features)

        def rows(t0: int, t1: int) -> Tensor:
            return q.dequantize(slice(t0 * TILE, min(t1 * TILE, m.out_features))).float()

        y = _reference_stored(x2, rows, m.out_features, bias)
        return y.reshape(*x_stored.shape[:-1], m.out_features)
    x2 = x_stored.reshape(-1, m.in_features).contiguous()  # (tokens, in)
    tokens = x2.shape[0]
    if tokens == 0:
        return x_stored.new_empty((*x_stored.shape[:-1], m.out_features))
    numbers = (m.wbits, m.stat_bits, m.out_features, m.in_features)
    packed = (q.tiles, q.outliers, q.outlier_row_ptr)
    if tokens <= MAX_SMALL_ROWS:
        if bias is not None and bias.dtype not in (torch.float16, torch.float32):
            bias = bias.float()
        y = torch.ops.spqr.matmul_small(x2, *packed, bias, *numbers)  # (tokens, out)
    else:
        w = torch.ops.spqr.dequantize(*packed, *numbers)  # (out, in) fp16, stored column order
        y = F.linear(x2, w, None if bias is None else bias.to(torch.float16))  # (tokens, out), cuBLAS
    return y.reshape(*x_stored.shape[:-1], m.out_features)


def spqr_matmul(x: Tensor, q: Any, bias: Tensor | None = None) -> Tensor:
    """x (..., in) in input-feature order -> (..., out) in x's dtype, like `spqr_matmul_reference(x, q,
    bias=bias)`: gathers x[..., perm] once, then `spqr_matmul_stored`. CPU inputs, layouts without kernels,
    and every input on a GPU without kernels (one warning) run the reference."""
    _check_features(x, q)
    if not kernels_support(x, q) or gpu_kernels(x.device, (q.meta.wbits, q.meta.stat_bits)) is None:
        return spqr_matmul_reference(x, q, bias=bias)
    perm = q.perm_indices()
    x_stored = x if perm is None else x.index_select(-1, perm)
    return spqr_matmul_stored(x_stored, q, bias)
