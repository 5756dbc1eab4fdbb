"""`SpQRLinear`: a drop-in `nn.Linear` replacement whose weight is a packed `QuantizedLinear`."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from spqr_run.ops import spqr_matmul
from spqr_run.quant.quantized import QuantizedLinear
from spqr_run.quant.spqr_matmul import spqr_matmul_reference


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

    def quantized(self) -> QuantizedLinear:
        """The packed weight as a `QuantizedLinear` viewing this module's (possibly moved) buffers."""
        return QuantizedLinear(meta=self.meta, **{name: getattr(self, name) for name in self._packed_names})

    def materialize(self, dtype: torch.dtype = torch.float32) -> None:
        """Keep a dense copy of the weight (original column order) and use it in `forward`.

        The CPU path: dequantizing on every call costs more than the matmul itself, so on CPUs the weight is
        decoded once at load (the same numbers as the reference, at the memory cost of a dense model).
        """
        q = self.quantized()
        w = q.dequantize()  # (out, in) fp32, permuted columns
        if q.perm is not None:
            dense = torch.empty_like(w)
            dense[:, q.perm_indices()] = w
            w = dense
        self.register_buffer("dense_weight", w.to(dtype), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        """x (..., in) -> (..., out) in x's dtype (fp32 products and accumulation)."""
        if self.dense_weight is not None:
            bias = None if self.bias is None else self.bias.to(x.dtype)
            return F.linear(x, self.dense_weight.to(x.dtype), bias)
        if x.is_cuda:
            return spqr_matmul(x, self.quantized(), self.bias)  # CUDA kernels, by batch size
        return spqr_matmul_reference(x, self.quantized(), bias=self.bias)  # (..., out)

    def _apply(self, fn: Any, recurse: bool = True) -> SpQRLinear:
        before = {name: getattr(self, name) for name in self._packed_names}
        super()._apply(fn, recurse)
        for name, old in before.items():
            new = getattr(self, name)
            if new.dtype != old.dtype:  # a module-wide dtype cast: keep the packed bits, follow the device
                setattr(self, name, old.to(device=new.device))
        return self

    def extra_repr(self) -> str:
        m = self.meta
        return (
            f"in_features={m.in_features}, out_features={m.out_features}, method={m.method}, "
            f"wbits={m.wbits}, bias={self.bias is not None}"
        )
