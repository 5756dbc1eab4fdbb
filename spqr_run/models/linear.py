"""The linear-layer seam: the decoder builds every projection with `make_linear`, and a quantized layer with
the same call (`forward(x: (..., in)) -> (..., out)`) is swapped in by `replace_linears`.

Weights may be held in a narrower dtype than the activations (`held_linear`): on a CPU a `.spqr` model keeps
its weight matrices in fp16, half the memory of fp32, and computes in fp32.
"""

from __future__ import annotations

from collections.abc import Callable

import torch.nn.functional as F
from torch import Tensor, nn

# Largest fp32 copy of a weight made at once when an fp16-held weight meets several fp32 rows (elements; 64 MiB).
UPCAST_CHUNK = 16 * 2**20


def held_linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """y = x @ weight^T + bias in x's dtype, for a weight (out, in) held in the same or a narrower dtype.

    Same dtype: `F.linear`. A narrower weight (fp16 weights, fp32 activations on a CPU):
    - one row (decode): x is rounded to the weight's dtype and torch's CPU half-precision matrix-vector
      product (fp32 accumulation) runs on the held weight, its result rounded to that dtype once: about as
      fast as fp32, with fp16 rounding of the input and output (relative 2^-11, as on a GPU);
    - more rows (prefill, scoring): the weight is converted to x's dtype in chunks of output rows
      (`UPCAST_CHUNK` elements at most), so the product is computed in x's dtype exactly as from an fp32 weight,
      with a transient copy no larger than one chunk.
    x: (..., in); weight: (out, in); bias: (out,) or None -> (..., out) in x's dtype.
    """
    if weight.dtype == x.dtype:
        return F.linear(x, weight, bias)
    out_features, in_features = weight.shape
    if x.numel() == in_features:
        y = F.linear(x.to(weight.dtype), weight).to(x.dtype)
    else:
        step = max(1, UPCAST_CHUNK // max(in_features, 1))
        if step >= out_features:
            y = F.linear(x, weight.to(x.dtype))
        else:  # written chunk by chunk into the result: no second full-size output while concatenating
            y = x.new_empty((*x.shape[:-1], out_features))
            for i in range(0, out_features, step):
                y[..., i : i + step] = F.linear(x, weight[i : i + step].to(x.dtype))
    return y if bias is None else y + bias.to(x.dtype)


class Linear(nn.Linear):
    """`nn.Linear` whose weight may be held in a narrower dtype than its input (see `held_linear`)."""

    def forward(self, x: Tensor) -> Tensor:
        return held_linear(x, self.weight, self.bias)


def make_linear(in_features: int, out_features: int, *, bias: bool = False) -> nn.Module:
    """A dense projection in nn.Linear's weight layout (out, in)."""
    return Linear(in_features, out_features, bias=bias)


def linear_names(model: nn.Module) -> list[str]:
    """Qualified names of every dense linear of `model`, in module order (embeddings are not linears)."""
    return [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]


def replace_linears(model: nn.Module, build: Callable[[str, nn.Linear], nn.Module | None]) -> int:
    """Replace each nn.Linear for which `build(qualified_name, module)` returns a module; returns the count."""
    count = 0
    for name in linear_names(model):
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        new = build(name, getattr(parent, child))
        if new is not None:
            setattr(parent, child, new)
            count += 1
    return count
