"""`spqr_matmul_reference`: y = x @ W^T for a packed `QuantizedLinear`, in pure torch.

The CUDA kernel (same file stem under kernels/ and its wrapper) replaces this function; this one defines
what it must compute. The weight is dequantized a block of rows at a time so a large layer is never
materialised whole.
"""

from __future__ import annotations

import torch
from torch import Tensor

from spqr_run.quant.quantized import QuantizedLinear

ROW_BLOCK_ELEMENTS = 1 << 22  # dequantize about this many weights (16 MiB fp32) at a time


def spqr_matmul_reference(x: Tensor, q: QuantizedLinear, *, bias: Tensor | None = None) -> Tensor:
    """x (..., in) -> (..., out) in x's dtype: x's last dim permuted by `q.perm`, fp32 products and sums,
    plus `bias` (out,) in fp32 before the single rounding to x's dtype."""
    m = q.meta
    if x.shape[-1] != m.in_features:
        raise ValueError(f"input has {x.shape[-1]} features, the layer expects {m.in_features}")
    xf = x.reshape(-1, m.in_features).float()  # (tokens, in)
    if q.perm is not None:
        xf = xf[:, q.perm_indices()]  # (tokens, in) permuted to the stored column order
    step = max(m.stat_groupsize or 16, (ROW_BLOCK_ELEMENTS // m.in_features) // 16 * 16)
    y = torch.empty(xf.shape[0], m.out_features, device=x.device, dtype=torch.float32)  # (tokens, out)
    for r0 in range(0, m.out_features, step):
        r1 = min(r0 + step, m.out_features)
        y[:, r0:r1] = xf @ q.dequantize(slice(r0, r1)).T  # (tokens, in) @ (in, rows)
    if bias is not None:
        y += bias.float()
    return y.to(x.dtype).reshape(*x.shape[:-1], m.out_features)
