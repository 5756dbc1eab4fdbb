"""`spqr-bench`'s settings (`BenchSettings`): prompt and decode lengths, repeats, the synthetic model's
quantization, the memory budget, the KV cache kind and llama.cpp beside."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from spqr_run.errors import ConfigError


@dataclass
class BenchSettings:
    prompt_len: int = 32
    new_tokens: int = 128
    batch: int = 1
    repeats: int | None = None  # default: 5 on CUDA, 3 on CPU
    warmup: int | None = None  # default: 1
    graphs: bool = True
    layers: int | None = None
    wbits: int = 3
    outlier_rate: float = 0.01
    budget_bytes: int | None = None  # None: the device's free memory minus a reserve
    kv_cache: str = "auto"  # "int8": the 8-bit KV cache (models.kv_cache)
    llama_cpp: str | None = None  # a GGUF file: run llama.cpp's llama-bench on it beside (CPU only)
    build_llama_cpp: bool = False  # build llama.cpp when it is not cached (else a missing build is an error)
    verify_checksums: bool = True  # check a .spqr's tensors against its header's checksums when loading

    @classmethod
    def from_args(cls, args: Any) -> BenchSettings:
        """From parsed command-line flags (`--prompt-len`, ..., `--gpu-memory`); absent flags keep defaults."""
        from spqr_run.engine.planner import parse_memory

        names = (
            "prompt_len",
            "new_tokens",
            "batch",
            "repeats",
            "warmup",
            "layers",
            "wbits",
            "outlier_rate",
            "kv_cache",
            "llama_cpp",
        )
        kwargs = {n: getattr(args, n) for n in names if getattr(args, n, None) is not None}
        memory = getattr(args, "gpu_memory", None)
        return cls(
            **kwargs,
            graphs=not getattr(args, "no_graphs", False),
            verify_checksums=not getattr(args, "skip_checksums", False),
            budget_bytes=None if memory is None else parse_memory(memory),
        )

    def check(self) -> None:
        for name in ("prompt_len", "new_tokens", "batch"):
            if getattr(self, name) < 1:
                raise ConfigError(f"invalid --{name.replace('_', '-')} {getattr(self, name)}: must be >= 1")
        if self.repeats is not None and self.repeats < 1:
            raise ConfigError(f"invalid --repeats {self.repeats}: must be >= 1")
        if self.warmup is not None and self.warmup < 0:
            raise ConfigError(f"invalid --warmup {self.warmup}: must be >= 0")
