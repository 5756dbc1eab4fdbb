"""Quantization: the SpQR / GPTQ / RTN quantizer of one linear and its packed per-linear layout.

Public API: `QuantConfig`, `quantize_linear` -> `QuantizationResult` (`quantize_linears` for several
linears sharing one input), `QuantizedLinear` (packed tensors,
`tensors()` / `from_tensors()` / `dequantize()`), `LinearMeta`, `spqr_matmul_reference`.
The layout is documented in docs/FORMAT.md.
"""

from spqr_run.quant.config import QuantConfig
from spqr_run.quant.layout import UnpackedLinear
from spqr_run.quant.meta import LinearMeta
from spqr_run.quant.quantized import QuantizedLinear
from spqr_run.quant.spqr import QuantizationResult, quantize_linear, quantize_linears, relative_error
from spqr_run.quant.spqr_matmul import spqr_matmul_reference

__all__ = [
    "LinearMeta",
    "QuantConfig",
    "QuantizationResult",
    "QuantizedLinear",
    "UnpackedLinear",
    "quantize_linear",
    "quantize_linears",
    "relative_error",
    "spqr_matmul_reference",
]
