"""Device selection shared by every command."""

from __future__ import annotations

import torch

from spqr_run.errors import ConfigError


def resolve_device(name: str | None) -> torch.device:
    """'auto'/None -> cuda when available else cpu; 'cuda' without a GPU is a clear error."""
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"invalid --device {name!r} (use cpu, cuda or cuda:N)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA GPU is available (use --device cpu)")
    if device.type not in ("cpu", "cuda"):
        raise ConfigError(f"invalid --device {name!r} (use cpu, cuda or cuda:N)")
    return device


def default_dtype(device: torch.device) -> torch.dtype:
    """fp16 on GPUs; fp32 on CPUs (fp16 matmuls are slow there and bf16 loses accuracy)."""
    return torch.float16 if device.type == "cuda" else torch.float32
