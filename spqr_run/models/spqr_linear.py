"""`SpQRLinear`: a drop-in `nn.Linear` replacement whose weight is a packed `QuantizedLinear`."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from spqr_run.models.linear import UPCAST_CHUNK, held_linear
from spqr_run.ops import kernels_support, spqr_matmul_stored
from spqr_run.quant.quantized import QuantizedLinear
from spqr_run.quant.spqr_matmul import spqr_matmul_reference

ROW_TILE = 16  # rows of one packed row tile (beta2 of the kernels' layout)


def _device_of(q: QuantizedLinear) -> torch.device:
    """The device of a packed linear's tensors."""
    return next(iter(q.tensors().values())).device


class SpQRLinear(nn.Module):
    """y = x @ W^T + b with W stored packed (SpQR, GPTQ or RTN layout, see docs/FORMAT.md).

    The packed tensors are buffers, so `.to(device)` and `state_dict()` carry them; dtype casts of the
    module (`.half()`, `.to(torch.bfloat16)`) change only the bias: packed data keeps its stored dtypes.
    """

    def __init__(self, quantized: QuantizedLinear, bias: Tensor | None = None) -> None:
        super().__init__()
        self.meta = quantized.meta
        self.in_features = quantized.meta.in_features
        self.out_features = quantized.meta.out_features
        self._packed_names = tuple(quantized.tensors())
        for name, tensor in quantized.tensors().items():
            self.register_buffer(name, tensor)
        if bias is not None and tuple(bias.shape) != (self.out_features,):
            raise ValueError(f"bias must have shape ({self.out_features},), got {tuple(bias.shape)}")
        self.register_buffer("bias", bias)
        self.register_buffer("dense_weight", None, persistent=False)  # set by materialize()
        self.native = None  # set by to_native(): the CPU layout the native kernels read (`spqr_run.cpu`)
        # the stored column order as int32 indices, decoded once: forward gathers x[..., perm] with it
        perm = quantized.perm_indices()
        self.register_buffer("perm_index", None if perm is None else perm.int(), persistent=False)

    def quantized(self) -> QuantizedLinear:
        """The packed weight as a `QuantizedLinear` viewing this module's (possibly moved) buffers.

        Raises RuntimeError when `materialize(keep_packed=False)` released them."""
        if self.packed_released:
            raise RuntimeError("this layer's packed weight was released after decoding it (the CPU path)")
        return QuantizedLinear(meta=self.meta, **{name: getattr(self, name) for name in self._packed_names})

    @property
    def packed_released(self) -> bool:
        """True after `materialize(keep_packed=False)` or `to_native()`."""
        return any(getattr(self, name) is None for name in self._packed_names)

    def to_native(self, *, keep_packed: bool = False, act_residual: bool = False) -> None:
        """Repack the weight into the CPU layout of the native kernels (`spqr_run.cpu.weights.spqr_weight`)
        and free the file's records: from now on `forward` computes from the packed bytes on the CPU
        (fp32 activations), and the layer holds 2.7-4.8% more bytes than stored, never a dense copy.
        `keep_packed=True` keeps the file's records too (to read the stored bits back; twice the memory).
        `act_residual`: activations to ~2^-15 instead of int8 (`cpu.weights.spqr_weight`).

        Raises ValueError for a layout without CPU kernels (gptq/rtn) and RuntimeError when the native
        library is unavailable (`spqr_run.cpu.lib.unavailable_reason`)."""
        from spqr_run.cpu import lib as native_lib
        from spqr_run.cpu.weights import spqr_weight

        if native_lib.load() is None:
            raise RuntimeError(native_lib.unavailable_reason())
        if _device_of(self.quantized()).type != "cpu":
            raise ValueError("to_native() needs the layer on the CPU")
        weight = spqr_weight(self.quantized(), self.bias, act_residual=act_residual)
        if not keep_packed:
            for name in self._packed_names:
                setattr(self, name, None)
            self.perm_index = None
        for name, tensor in weight.tensors.items():  # buffers: counted by `resident_bytes`, not saved
            if name != "bias":
                self.register_buffer(f"native_{name}", tensor, persistent=False)
        self.native = weight

    def materialize(self, dtype: torch.dtype = torch.float16, *, keep_packed: bool = True) -> None:
        """Keep a dense copy of the weight (original column order) in `dtype` and use it in `forward`.

        The CPU path: dequantizing on every call costs more than the matmul itself (20-40x for one row of SmolLM2-135M), so on
        CPUs the weight is decoded once at load. fp16 holds the decoded weights to 2^-11 relative (their
        statistics are fp16 already) at half the memory of fp32; `forward` computes in the input's dtype
        (`held_linear`). `keep_packed=False` frees the packed tensors afterwards (a runtime that only runs the
        layer needs just the dense copy; `quantized()` and moving the layer to another device then fail).
        """
        q = self.quantized()
        m = self.meta
        perm = q.perm_indices()
        dense = torch.empty(m.out_features, m.in_features, dtype=dtype, device=_device_of(q))
        # decoded in row chunks (whole row tiles): a fused linear's fp32 copy is never made whole
        step = max(ROW_TILE, UPCAST_CHUNK // max(m.in_features, 1) // ROW_TILE * ROW_TILE)
        for r0 in range(0, m.out_features, step):
            rows = slice(r0, min(r0 + step, m.out_features))
            w = q.dequantize(rows)  # (rows, in) fp32, permuted columns
            if perm is None:
                dense[rows] = w
            else:
                dense[rows, perm] = w.to(dtype)
        self.register_buffer("dense_weight", dense, persistent=False)
        if not keep_packed:  # forward reads only the dense copy now; state_dict() then holds just the bias
            for name in self._packed_names:
                setattr(self, name, None)
            self.perm_index = None

    def forward(self, x: Tensor) -> Tensor:
        """x (..., in) -> (..., out) in x's dtype (fp32 products and accumulation).

        Packed weights: x is gathered into the stored column order once (`x[..., perm]`) and multiplied in one
        call (`ops.spqr_matmul_stored`: the CUDA kernels by row count, else the reference). A fused linear
        (q/k/v or gate/up, `models.fused`) thus permutes its input once for all its members."""
        if self.native is not None:  # the CPU layout: native kernels, fp32 activations (bias included)
            return self.native.matmul(x.float()).to(x.dtype)
        if self.dense_weight is not None:
            return held_linear(x, self.dense_weight, self.bias)
        if x.shape[-1] != self.in_features:
            raise ValueError(f"input has {x.shape[-1]} features, the layer expects {self.in_features}")
        q = self.quantized()
        if not kernels_support(x, q):  # CPU, or a layout without kernels: the reference (it permutes itself)
            return spqr_matmul_reference(x, q, bias=self.bias)  # (..., out)
        # (..., in) in the stored column order: the one gather of this input
        x_stored = x if self.perm_index is None else x.index_select(-1, self.perm_index)
        return spqr_matmul_stored(x_stored, q, self.bias)  # (..., out)

    def _apply(self, fn: Any, recurse: bool = True) -> SpQRLinear:
        before = {name: getattr(self, name) for name in self._packed_names}
        native_ptrs = {n: b.data_ptr() for n, b in self.named_buffers() if n.startswith("native_")}
        super()._apply(fn, recurse)
        if any(getattr(self, n).data_ptr() != p for n, p in native_ptrs.items()):
            raise RuntimeError(
                "a layer in the native CPU layout cannot be moved or cast (load it again instead)"
            )
        for name, old in before.items():
            new = getattr(self, name)
            # a module-wide dtype cast: keep the packed bits, follow the device
            if old is not None and new.dtype != old.dtype:
                setattr(self, name, old.to(device=new.device))
        return self

    def extra_repr(self) -> str:
        m = self.meta
        return (
            f"in_features={m.in_features}, out_features={m.out_features}, method={m.method}, "
            f"wbits={m.wbits}, bias={self.bias is not None}"
        )
