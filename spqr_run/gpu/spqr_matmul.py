"""The launcher of the SpQR kernels (kernels/spqr_matmul.cu): split-K plan, grid, a preallocated argument block
per layer, one driver launch per call. No torch C++ extension: the kernels are cubins (`spqr_run.gpu.modules`)
and the launch is `cuLaunchKernel` through ctypes (`spqr_run.gpu.driver`) on torch's current stream.

    dev = spqr_run.ops.spqr_matmul.cuda_gpu(0)     # per device: driver, SM count, loaded kernels
    dev.prepare((3, 3))                            # load (or NVRTC-compile) a model's kernels before capture
    y = matmul_small(dev, x_stored, tiles, outliers, outlier_row_ptr, bias, 3, 3, out, in)

`GpuDevice` is what a launch needs from a device: a driver (`load_module`, `get_function`, `occupancy`,
`launch`), its SM count and arch, memory (`empty`, `zeros`) and the stream. `CudaGpu` is a real GPU through
torch and libcuda; the CPU execution shim's `ShimDevice` (kernels/testing/shim.py) is the same with fenced host
memory and the shim's `cuLaunchKernel`-shaped entry, so CI runs this whole file against the kernels on the CPU.

Kernel arguments (spqr_matmul.h; byte layout by ctypes, one pointer per argument in `params`):
  spqr_matmul_small_kernel<W, SB, NT>(SpqrLayer, const __half* x, int rows, int ldx, SpqrBias, __half* y,
                                       float* workspace, int* counters)   grid (ceil(RT/4), splits), 128 threads
  spqr_dequantize_kernel<W, SB>(SpqrLayer, __half* w)                    grid (KB, ceil(RT/4)), 128 threads
"""

from __future__ import annotations

import contextlib
import ctypes
import threading
import weakref
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from spqr_run.gpu import build, modules
from spqr_run.gpu.driver import Driver

TILE = 16  # rows of a row tile (beta2)
RECORD_COLS = 64  # stored columns of a record
WARPS = 4  # warps (= row tiles) per block
THREADS = 32 * WARPS
MAX_SMALL_ROWS = 16
MAX_SPLITS = 32
PIPELINE_FILL = 2  # a block's pipeline fill, in record times (the plan's cost model)
MAX_GRID_YZ = 65535


class SpqrLayerC(ctypes.Structure):
    """struct SpqrLayer (spqr_matmul.h): 40 bytes."""

    _fields_ = [("tiles", ctypes.c_void_p), ("outliers", ctypes.c_void_p), ("outlier_row_ptr", ctypes.c_void_p),
                ("out_features", ctypes.c_int), ("in_features", ctypes.c_int), ("wbits", ctypes.c_int),
                ("stat_bits", ctypes.c_int)]  # fmt: skip


class SpqrBiasC(ctypes.Structure):
    """struct SpqrBias (spqr_matmul.h): 16 bytes."""

    _fields_ = [("f16", ctypes.c_void_p), ("f32", ctypes.c_void_p)]


class SmallArgs(ctypes.Structure):
    """The argument values of spqr_matmul_small_kernel, each at its own (C-aligned) offset."""

    _fields_ = [("layer", SpqrLayerC), ("x", ctypes.c_void_p), ("rows", ctypes.c_int), ("ldx", ctypes.c_int),
                ("bias", SpqrBiasC), ("y", ctypes.c_void_p), ("workspace", ctypes.c_void_p),
                ("counters", ctypes.c_void_p)]  # fmt: skip


class DequantArgs(ctypes.Structure):
    _fields_ = [("layer", SpqrLayerC), ("w", ctypes.c_void_p)]


def params_of(args: ctypes.Structure) -> ctypes.Array:
    """cuLaunchKernel's `kernelParams`: one pointer to each field of `args` (which must outlive it)."""
    base = ctypes.addressof(args)
    return (ctypes.c_void_p * len(args._fields_))(
        *[base + getattr(type(args), f).offset for f, _ in args._fields_]
    )


# ---- the plan ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SmallPlan:
    """How spqr_matmul_small_kernel splits a layer: `splits` blocks share each group of 4 row tiles along K (1:
    no workspace); the launch needs `workspace_floats` floats and `counters` zeroed ints (left zeroed)."""

    splits: int
    workspace_floats: int
    counters: int


def small_plan(
    out_features: int, in_features: int, num_sms: int, blocks_per_sm: int, nt: int = 2
) -> SmallPlan:
    """The split-K count for a GPU with `num_sms` SMs of `blocks_per_sm` resident blocks (kernels/spqr_matmul.cu,
    "Work split"): the smallest S <= 32 minimising waves(S) * (ceil(KB/S) + 2) + [S > 1], waves(S) =
    ceil(groups * S / (SMs * blocks per SM)); whole waves of equal-length blocks. Workspace: 32 * 4 * NT floats
    per warp and split (sized for NT = 2, as before)."""
    row_tiles = -(-out_features // TILE)
    groups = -(-row_tiles // WARPS)
    kblocks = -(-in_features // RECORD_COLS)
    slots = max(num_sms, 1) * max(blocks_per_sm, 1)
    best, best_cost = 1, -(-groups // slots) * (kblocks + PIPELINE_FILL)
    for s in range(2, min(kblocks, MAX_SPLITS) + 1):
        cost = -(-(groups * s) // slots) * (-(-kblocks // s) + PIPELINE_FILL) + 1
        if cost < best_cost:
            best, best_cost = s, cost
    if best == 1:
        return SmallPlan(1, 0, 0)
    return SmallPlan(best, groups * best * WARPS * 32 * 8, groups)


# ---- one device -------------------------------------------------------------------------------------------
@dataclass
class Kernels:
    """One (wbits, stat_bits)'s kernels on one device: resolved functions and their occupancy."""

    bits: tuple[int, int]
    image: modules.KernelImage
    small: dict[int, object]  # NT (1 or 2) -> function
    dequantize: object
    blocks_per_sm: dict[int, int]  # NT -> resident blocks per SM


class GpuDevice:
    """What the launcher needs from a device. Subclasses give the driver, memory and stream; this class loads
    each (wbits, stat_bits)'s kernels once (`prepare`) and keeps one `LayerLaunch` per packed layer."""

    driver: Driver
    arch: str
    num_sms: int

    def __init__(self) -> None:
        self._kernels: dict[tuple[int, int], Kernels] = {}
        self._failed: dict[tuple[int, int], str] = {}
        self._layers: dict[tuple, LayerLaunch] = {}
        self._lock = threading.Lock()

    # memory and streams (subclasses)
    def empty(self, shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
        raise NotImplementedError

    def zeros(self, shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
        raise NotImplementedError

    def stream(self) -> int:
        raise NotImplementedError

    def images(self, bits: tuple[int, int], reasons: list[str]):
        """The kernel images to try for `bits`, best first (subclasses: `modules.candidates`)."""
        raise NotImplementedError

    def capturing(self) -> bool:
        """Whether a CUDA graph is being captured on the current stream (module loading is not capturable)."""
        return False

    def current(self) -> contextlib.AbstractContextManager:
        """This device made current while its modules load (they load into the current context)."""
        return contextlib.nullcontext()

    # kernels
    def kernels(self, bits: tuple[int, int]) -> Kernels:
        """The loaded kernels for `bits`: loaded (or compiled, then cached) on first use. Raises
        modules.KernelsUnavailable with the one-line reason when there are none."""
        k = self._kernels.get(bits)
        if k is not None:
            return k
        with self._lock:
            if bits in self._kernels:
                return self._kernels[bits]
            if bits in self._failed:
                raise modules.KernelsUnavailable(self._failed[bits])
            if self.capturing():
                raise RuntimeError(f"spqr: the wbits={bits[0]}, stat_bits={bits[1]} kernels were not loaded before "
                                   "CUDA graph capture (spqr_run.ops.prepare_kernels(model) loads them)")  # fmt: skip
            reasons: list[str] = []
            with self.current():
                return self._first_loadable(bits, reasons)

    def _first_loadable(self, bits: tuple[int, int], reasons: list[str]) -> Kernels:
        """Loads the first image of `images(bits)` the driver takes (lock held)."""
        for image in self.images(bits, reasons):
            try:
                k = self._load(bits, image)
            except Exception as e:  # a cubin this driver refuses: try the next source
                reasons.append(f"{image.origin}: {str(e).splitlines()[0]}")
                continue
            self._kernels[bits] = k
            return k
        self._failed[bits] = "; ".join(reasons) or "no kernel image"
        raise modules.KernelsUnavailable(self._failed[bits])

    def prepare(self, bits: tuple[int, int]) -> Kernels:
        """`kernels(bits)`: load and resolve before any CUDA graph capture."""
        return self.kernels(bits)

    def loaded(self) -> list[Kernels]:
        return list(self._kernels.values())

    def _load(self, bits: tuple[int, int], image: modules.KernelImage) -> Kernels:
        module = self.driver.load_module(image.image)
        w, sb = bits
        fn = {i: self.driver.get_function(module, image.names[i.expr]) for i in build.instances([bits])}
        small = {nt: fn[build.Instance("spqr_matmul_small_kernel", (w, sb, nt))] for nt in (1, 2)}
        deq = fn[build.Instance("spqr_dequantize_kernel", (w, sb))]
        occ = {nt: max(1, self.driver.occupancy(f, THREADS, 0)) for nt, f in small.items()}
        return Kernels(bits, image, small, deq, occ)

    def layer(self, tiles: Tensor, outliers: Tensor, outlier_row_ptr: Tensor, wbits: int, stat_bits: int,
              out_features: int, in_features: int) -> LayerLaunch:  # fmt: skip
        """The layer's launch state (created on first use: validates its tensors once)."""
        key = (tiles.data_ptr(), outliers.data_ptr(), outlier_row_ptr.data_ptr(), wbits, stat_bits, out_features,
               in_features)  # fmt: skip
        lay = self._layers.get(key)
        if lay is None:
            kern = self.kernels((wbits, stat_bits))
            lay = LayerLaunch(self, kern, tiles, outliers, outlier_row_ptr, out_features, in_features)
            self._layers[key] = lay
            weakref.finalize(tiles, self._layers.pop, key, None)  # no launch state outlives its layer
        return lay


class CudaGpu(GpuDevice):
    """A CUDA device through torch (memory, stream, capability) and libcuda (modules, launches)."""

    def __init__(self, device: torch.device, driver: Driver, nvrtc_loader: Callable[[], object]) -> None:
        super().__init__()
        self.device = device
        self.driver = driver
        self.nvrtc_loader = nvrtc_loader
        props = torch.cuda.get_device_properties(device)
        self.arch = modules.arch_of((props.major, props.minor))
        self.num_sms = props.multi_processor_count
        version = getattr(driver, "version", None)
        self.driver_cuda = version() if version else None

    def empty(self, shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
        return torch.empty(shape, dtype=dtype, device=self.device)

    def zeros(self, shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
        return torch.zeros(shape, dtype=dtype, device=self.device)

    def stream(self) -> int:
        return torch.cuda.current_stream(self.device).cuda_stream

    def capturing(self) -> bool:
        return torch.cuda.is_current_stream_capturing()

    def current(self) -> contextlib.AbstractContextManager:
        return torch.cuda.device(self.device)

    def images(self, bits: tuple[int, int], reasons: list[str]):
        torch.empty(0, device=self.device)  # torch's primary context is current here before a module loads
        return modules.candidates(self.arch, bits, nvrtc_loader=self.nvrtc_loader, driver_cuda=self.driver_cuda,
                                  reasons=reasons)  # fmt: skip


# ---- one layer ----------------------------------------------------------------------------------------------
class LayerLaunch:
    """A packed layer's preallocated argument blocks (one per NT), plans, grids and split-K ticket counters.

    The counters (ints, zero) are allocated here, before any capture, and every launch leaves them zero; a
    layer's launches must not overlap on two streams (they share them). The blocks hold the packed tensors'
    addresses, not the tensors: the device drops this state when `tiles` is freed."""

    def __init__(self, dev: GpuDevice, kern: Kernels, tiles: Tensor, outliers: Tensor, outlier_row_ptr: Tensor,
                 out_features: int, in_features: int) -> None:  # fmt: skip
        w, sb = kern.bits
        row_tiles, kblocks = -(-out_features // TILE), -(-in_features // RECORD_COLS)
        if not (0 < out_features < 1 << 30 and 0 < in_features <= 65536):
            raise ValueError(f"spqr: a layer of {out_features} x {in_features} is outside the kernels' range")
        record = 32 * w + 4 * sb + 8
        _check(tiles, "tiles", torch.int32, (row_tiles, kblocks, record), align=16)
        _check(outliers, "outliers", torch.int32, None)
        _check(outlier_row_ptr, "outlier_row_ptr", torch.int32, (row_tiles * TILE + 1,))
        if outliers.dim() != 1:
            raise ValueError(f"spqr: outliers must be 1-d, got shape {tuple(outliers.shape)}")
        self.dev, self.kern = dev, kern
        self.out_features, self.in_features, self.kblocks = out_features, in_features, kblocks
        self.groups = -(-row_tiles // WARPS)
        if self.groups > MAX_GRID_YZ:
            raise ValueError(f"spqr: {out_features} output features need more than {MAX_GRID_YZ} blocks")
        layer = SpqrLayerC(tiles.data_ptr(), outliers.data_ptr() if outliers.numel() else None,
                           outlier_row_ptr.data_ptr(), out_features, in_features, w, sb)  # fmt: skip
        self.plans = {
            nt: small_plan(out_features, in_features, dev.num_sms, kern.blocks_per_sm[nt]) for nt in (1, 2)
        }
        need = max(p.counters for p in self.plans.values())
        self.counters = dev.zeros((max(need, 1),), torch.int32)
        self.small_args = {nt: SmallArgs(layer=layer) for nt in (1, 2)}
        self.small_params = {nt: params_of(a) for nt, a in self.small_args.items()}
        self.deq_args = DequantArgs(layer=layer)
        self.deq_params = params_of(self.deq_args)

    def matmul_small(self, x: Tensor, bias: Tensor | None, *, splits: int | None = None) -> Tensor:
        """y (rows, out) fp16 for x_stored (rows, in) fp16 contiguous, 1 <= rows <= 16. `splits` forces a split-K
        count (tests; default: the plan)."""
        rows = x.shape[0]
        nt = 1 if rows <= 8 else 2
        plan = self.plans[nt]
        if splits is not None:
            if not 1 <= splits <= min(self.kblocks, MAX_GRID_YZ):
                raise ValueError(f"spqr: {splits} splits for {self.kblocks} k-blocks")
            plan = SmallPlan(splits, 0 if splits == 1 else self.groups * splits * WARPS * 32 * 8, self.groups)
            if plan.counters > self.counters.numel():
                self.counters = self.dev.zeros((plan.counters,), torch.int32)
        dev = self.dev
        ldx = self.in_features
        if ldx % RECORD_COLS or x.data_ptr() % 16:  # the kernel reads whole 16-byte-aligned records of x
            ldx = -(-self.in_features // RECORD_COLS) * RECORD_COLS
            xp = dev.zeros((rows, ldx), torch.float16)
            xp[:, : self.in_features] = x
            x = xp
        y = dev.empty((rows, self.out_features), torch.float16)
        a = self.small_args[nt]
        a.x, a.rows, a.ldx, a.y = x.data_ptr(), rows, ldx, y.data_ptr()
        a.bias.f16 = a.bias.f32 = None
        if bias is not None:
            if bias.dtype == torch.float16:
                a.bias.f16 = bias.data_ptr()
            else:
                a.bias.f32 = bias.data_ptr()
        workspace = None
        if plan.splits > 1:
            workspace = dev.empty((plan.workspace_floats,), torch.float32)
            a.workspace, a.counters = workspace.data_ptr(), self.counters.data_ptr()
        else:
            a.workspace = a.counters = None
        dev.driver.launch(self.kern.small[nt], (self.groups, plan.splits, 1), (THREADS, 1, 1), 0, dev.stream(),
                          self.small_params[nt])  # fmt: skip
        del workspace  # the caching allocator (or the shim) keeps it until the stream is done with it
        return y

    def dequantize(self) -> Tensor:
        """W (out, in) fp16, stored column order, outliers included."""
        w = self.dev.empty((self.out_features, self.in_features), torch.float16)
        self.deq_args.w = w.data_ptr()
        self.dev.driver.launch(self.kern.dequantize, (self.kblocks, self.groups, 1), (THREADS, 1, 1), 0,
                               self.dev.stream(), self.deq_params)  # fmt: skip
        return w


def _check(t: Tensor, name: str, dtype: torch.dtype, shape: tuple[int, ...] | None, align: int = 4) -> None:
    if t.dtype != dtype:
        raise ValueError(f"spqr: {name} has dtype {t.dtype}, expected {dtype}")
    if shape is not None and tuple(t.shape) != shape:
        raise ValueError(f"spqr: {name} has shape {tuple(t.shape)}, expected {shape}")
    if not t.is_contiguous():
        raise ValueError(f"spqr: {name} must be contiguous")
    if t.numel() and t.data_ptr() % align:
        raise ValueError(f"spqr: {name} must be {align}-byte aligned")


# ---- the calls ------------------------------------------------------------------------------------------------
def matmul_small(
    dev: GpuDevice,
    x_stored: Tensor,
    tiles: Tensor,
    outliers: Tensor,
    outlier_row_ptr: Tensor,
    bias: Tensor | None,
    wbits: int,
    stat_bits: int,
    out_features: int,
    in_features: int,
    *,
    splits: int | None = None,
) -> Tensor:
    """y (rows, out) fp16 = x_stored (rows, in) fp16 @ W^T (+ bias, fp16 or fp32) for 1..16 rows in stored column
    order, on `dev`. Raises ValueError (one line) for arguments outside the kernels' rules, KernelsUnavailable
    when the device has no kernels for (wbits, stat_bits), DriverError when a launch fails."""
    if x_stored.dtype != torch.float16 or x_stored.dim() != 2 or x_stored.shape[1] != in_features:
        raise ValueError(f"spqr: x_stored must be float16 (rows, {in_features}), got {x_stored.dtype} "
                         f"{tuple(x_stored.shape)}")  # fmt: skip
    if not 1 <= x_stored.shape[0] <= MAX_SMALL_ROWS:
        raise ValueError(f"spqr: the small-batch kernel takes 1..16 rows, got {x_stored.shape[0]}")
    if bias is not None and (bias.dtype not in (torch.float16, torch.float32) or tuple(bias.shape) != (out_features,)
                             or not bias.is_contiguous()):  # fmt: skip
        raise ValueError(f"spqr: bias must be contiguous float16/float32 ({out_features},), got {bias.dtype} "
                         f"{tuple(bias.shape)}")  # fmt: skip
    lay = dev.layer(tiles, outliers, outlier_row_ptr, wbits, stat_bits, out_features, in_features)
    return lay.matmul_small(x_stored.contiguous(), bias, splits=splits)


def dequantize(
    dev: GpuDevice,
    tiles: Tensor,
    outliers: Tensor,
    outlier_row_ptr: Tensor,
    wbits: int,
    stat_bits: int,
    out_features: int,
    in_features: int,
) -> Tensor:
    """W (out, in) fp16 in stored (permuted) column order, outliers included, on `dev` (one launch)."""
    return dev.layer(
        tiles, outliers, outlier_row_ptr, wbits, stat_bits, out_features, in_features
    ).dequantize()


def describe(dev: GpuDevice) -> list[str]:
    """One line per loaded (wbits, stat_bits): where its kernels came from."""
    return [f"W{k.bits[0]} SB{k.bits[1]}: {k.image.path} ({k.image.origin})" for k in dev.loaded()]
