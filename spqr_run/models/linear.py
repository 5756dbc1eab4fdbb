"""The linear-layer seam: the decoder builds every projection with `make_linear`, and a quantized layer with
the same call (`forward(x: (..., in)) -> (..., out)`) is swapped in by `replace_linears`."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn


def make_linear(in_features: int, out_features: int, *, bias: bool = False) -> nn.Module:
    """A dense projection in nn.Linear's weight layout (out, in)."""
    return nn.Linear(in_features, out_features, bias=bias)


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
