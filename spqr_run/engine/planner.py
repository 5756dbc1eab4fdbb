"""Memory planner: what a model needs on a device (weights, prefill workspace, KV cache per token), the
longest context that fits a budget, and enforcing a budget smaller than the card (`apply_budget`).

All sizes are bytes (ints); GiB = 2**30. The arithmetic, as `plan_memory` does it:

    kv_bytes_per_token = 2 (k and v) * layers * kv_heads * head_dim * kv_element_bytes
                         (+ 2 * layers * kv_heads * 4 for int8: an fp32 scale per token and head)
    workspace          = activations + mask + logits + dequant
        activations    = batch * chunk * (8 * hidden + 3 * ffn) * 4    (fp32 upper bound: x, norms, q/k/v,
                                                                        RoPE temporaries, gate/up/product)
        mask           = batch * chunk * max_positions                  (bool prefill mask)
        logits         = batch * chunk * vocab * 4                      (fp32)
        dequant        = out * in * 2 of the largest linear as run      (quantized models: one fp16 weight
                                                                        buffer for the prefill GEMM; fused
                                                                        q/k/v, gate/up count as one linear)
      on the native CPU kernels (`native=True`; kernels/cpu, one forward per call, no mask, no dequant):
        activations    = tokens * (5 * hidden + P + q_dim) * 4          (spqr_decoder.c's arena: x, h, h2, attn
                                                                        and mlp outputs, the in-projections'
                                                                        P = q + 2 kv + (2 or 1) ffn columns,
                                                                        attention output)
                         + tokens * (5 * widest + 12 * widest / 16)     (spqr_matmul.c's arena for the widest
                                                                        input: fp32 copy, int8 copy, 3 fp32 per
                                                                        group of 16), tokens = batch * chunk
    free_for_kv        = budget - weights - workspace - margin
    context_fit        = free_for_kv // (batch * kv_bytes_per_token)
    max_context        = min(context_fit rounded down to 256, max_positions)

`transient` (optional): bytes held above the final weights at the peak of loading (on the native CPU path:
the fp16 embedding and LM head while their int8 rows are made, or one linear's records beside its CPU
layout); `MemoryPlan.peak` is the larger of the running total and weights + transient + margin.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass

import torch
from rich.table import Table
from torch import nn

from spqr_run.config import ModelConfig
from spqr_run.errors import ConfigError
from spqr_run.models.fused import fused_linear_shapes
from spqr_run.models.kv_cache import INT8_SCALE_DTYPE

GiB = 1 << 30
MiB = 1 << 20
MIN_CONTEXT = 256  # the smallest context worth running; also the rounding granularity of max_context
DEFAULT_RESERVE = 512 * MiB  # left to the CUDA context / other processes when the budget is "free memory"
DEFAULT_MARGIN = 256 * MiB  # allocator fragmentation and small buffers inside the budget
KV_DTYPES = {"fp32": 4, "fp16": 2, "bf16": 2, "fp8": 1, "int8": 1, "8bit": 1}
TORCH_KV_DTYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}

_UNITS = {"": GiB, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12}
_UNITS |= {"kib": 1 << 10, "mib": MiB, "gib": GiB, "tib": 1 << 40}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-z]*)\s*$", re.IGNORECASE)


def parse_memory(text: str, *, flag: str = "--gpu-memory") -> int:
    """'24GiB', '24GB', '22.5GiB', '512MiB' (a bare number means GiB) -> bytes; ConfigError otherwise."""
    m = _SIZE.match(str(text))
    unit = m.group(2).lower() if m else ""
    if m is None or unit not in _UNITS:
        raise ConfigError(f"invalid {flag} {text!r}: expected a size such as 24GiB, 24GB, 22.5GiB or 512MiB")
    size = int(float(m.group(1)) * _UNITS[unit])
    if size <= 0:
        raise ConfigError(f"invalid {flag} {text!r}: the memory budget must be greater than 0")
    return size


def kv_element_bytes(kv_dtype: str) -> int:
    try:
        return KV_DTYPES[kv_dtype.lower()]
    except KeyError:
        raise ConfigError(
            f"invalid KV cache dtype {kv_dtype!r} (use one of {', '.join(KV_DTYPES)})"
        ) from None


def kv_dtype_of(kind: str, model_dtype: torch.dtype) -> str:
    """The planner's name for how a KV cache of `kind` ("auto": the model's dtype, "int8") stores numbers."""
    return "int8" if kind == "int8" else TORCH_KV_DTYPES[model_dtype]


def kv_bytes_per_token(cfg: ModelConfig, kv_dtype: str) -> int:
    """KV-cache bytes per token of one sequence; int8 adds its fp32 scale per (layer, k/v, head)."""
    per_token = cfg.kv_bytes_per_token(kv_element_bytes(kv_dtype))
    if kv_dtype.lower() in ("int8", "8bit"):
        scale_bytes = torch.finfo(INT8_SCALE_DTYPE).bits // 8
        per_token += 2 * cfg.num_layers * cfg.num_kv_heads * scale_bytes
    return per_token


def fmt_gib(n: float) -> str:
    return f"{n / GiB:.2f} GiB"


# ---- what a model needs -----------------------------------------------------------------------------
def linear_params(cfg: ModelConfig) -> int:
    """Weights inside the decoder blocks' linears (what SpQR quantizes)."""
    return cfg.num_layers * sum(o * i for o, i in cfg.linear_shapes().values())


def fp16_params(cfg: ModelConfig) -> int:
    """Weights kept in fp16 by every format: embeddings, LM head (unless tied) and norms."""
    norm = cfg.hidden_size * (2 if cfg.norm_type == "layer" else 1)  # LayerNorm has a bias
    norms_per_block = 1 if cfg.shared_block_norm else 2
    embed = cfg.vocab_size * cfg.hidden_size * (1 if cfg.tie_word_embeddings else 2)
    return embed + norm * (cfg.num_layers * norms_per_block + 1)


def dense_weight_bytes(cfg: ModelConfig, element_bytes: int = 2) -> int:
    """Every weight dense (fp16 by default; biases of biased linears are ignored: they are tiny)."""
    return (linear_params(cfg) + fp16_params(cfg)) * element_bytes


def quantized_weight_bytes(cfg: ModelConfig, bits_per_weight: float) -> int:
    """Linears at `bits_per_weight` (as stored, outliers and statistics included) + fp16 everything else."""
    return math.ceil(linear_params(cfg) * bits_per_weight / 8) + fp16_params(cfg) * 2


def resident_bytes(model: nn.Module) -> tuple[int, int]:
    """Bytes a built model holds on its device: (weights: parameters and every buffer but the KV cache,
    KV cache). Unlike `module_weight_bytes`, dense copies kept for the CPU path count."""
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    kv = 0
    for name, buf in model.named_buffers():
        size = buf.numel() * buf.element_size()
        if name.startswith("caches."):
            kv += size
        else:
            weights += size
    return weights, kv


def module_weight_bytes(model: nn.Module) -> int:
    """Bytes of a built model's stored tensors (packed buffers as stored; caches and dense copies are
    non-persistent buffers and are not counted)."""
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


@dataclass(frozen=True)
class Workspace:
    activations: int
    mask: int
    logits: int
    dequant: int

    @property
    def total(self) -> int:
        return self.activations + self.mask + self.logits + self.dequant


def estimate_workspace(
    cfg: ModelConfig,
    *,
    prefill_chunk: int = 512,
    batch: int = 1,
    quantized: bool = False,
    native: bool = False,
) -> Workspace:
    """Bytes of the transient buffers of a prefill of `batch` x `prefill_chunk` tokens (module docstring)."""
    tokens = batch * prefill_chunk
    if native:
        ffn_cols = (2 if cfg.mlp_type == "gated_silu" else 1) * cfg.intermediate_size
        proj = cfg.q_dim + 2 * cfg.kv_dim + ffn_cols  # P: the in-projections' outputs side by side
        widest = -(-max(cfg.hidden_size, cfg.q_dim, cfg.intermediate_size) // 16) * 16  # padded to groups
        decoder = tokens * (5 * cfg.hidden_size + proj + cfg.q_dim) * 4
        matmul = tokens * (5 * widest + 12 * (widest // 16))
        return Workspace(activations=decoder + matmul, mask=0, logits=tokens * cfg.vocab_size * 4, dequant=0)
    # the largest linear as run: q/k/v and gate/up are fused into one each at load (`models.fused`)
    dequant = max(o * i for o, i in fused_linear_shapes(cfg).values()) * 2 if quantized else 0
    return Workspace(
        activations=tokens * (8 * cfg.hidden_size + 3 * cfg.intermediate_size) * 4,
        mask=tokens * cfg.max_position_embeddings,
        logits=tokens * cfg.vocab_size * 4,
        dequant=dequant,
    )


# ---- the plan -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class MemoryPlan:
    name: str
    budget: int
    weights: int
    weights_note: str  # e.g. "spqr 3.90 bits/weight" or "fp16"
    workspace: Workspace
    margin: int
    kv_dtype: str
    kv_bytes_per_token: int
    batch: int
    context_fit: int  # tokens per sequence that fit, before rounding and the model's cap
    max_context: int  # what to allocate: rounded, capped by the model's positions (or the request)
    max_positions: int
    transient: int = 0  # bytes above the weights at the peak of loading (module docstring)
    kv_note: str = ""  # why this KV storage, when the planner chose it (`--kv-cache auto` falling to int8)

    @property
    def kv_bytes(self) -> int:
        return self.kv_bytes_per_token * self.max_context * self.batch

    @property
    def total(self) -> int:
        return self.weights + self.workspace.total + self.margin + self.kv_bytes

    @property
    def peak(self) -> int:
        """The most this plan holds at once: running (`total`) or loading (weights + transient + margin)."""
        return max(self.total, self.weights + self.transient + self.margin)

    @property
    def headroom(self) -> int:
        return self.budget - self.total

    def rows(self) -> list[tuple[str, str, str]]:
        w = self.workspace
        kv_note = (
            f"{self.max_context} tokens x {self.batch} seq, {self.kv_dtype}, "
            f"{self.kv_bytes_per_token / MiB:.3f} MiB/token" + (f" ({self.kv_note})" if self.kv_note else "")
        )
        load = []
        if self.transient:
            load = [
                (
                    "load peak",
                    fmt_gib(self.weights + self.transient + self.margin),
                    f"weights + {fmt_gib(self.transient)} held while loading + margin",
                )
            ]
        return [
            ("budget", fmt_gib(self.budget), ""),
            ("weights", fmt_gib(self.weights), self.weights_note),
            (
                "workspace",
                fmt_gib(w.total),
                f"activations {fmt_gib(w.activations)}, logits {fmt_gib(w.logits)}, "
                f"dequant {fmt_gib(w.dequant)}, mask {fmt_gib(w.mask)}",
            ),
            ("margin", fmt_gib(self.margin), "allocator fragmentation, small buffers"),
            ("KV cache", fmt_gib(self.kv_bytes), kv_note),
            *load,
            ("headroom", fmt_gib(self.headroom), ""),
            (
                "context",
                f"{self.max_context} tokens",
                f"fits {self.context_fit}, model max {self.max_positions}",
            ),
        ]

    def lines(self) -> list[str]:
        return [f"{k:<10} {v:>12}  {note}".rstrip() for k, v, note in self.rows()]

    def table(self) -> Table:
        t = Table(title=f"memory plan: {self.name}" if self.name else "memory plan")
        for col, justify in (("item", "left"), ("size", "right"), ("detail", "left")):
            t.add_column(col, justify=justify)  # type: ignore[arg-type]
        for row in self.rows():
            t.add_row(*row)
        return t


def plan_memory(
    cfg: ModelConfig,
    *,
    weight_bytes: int,
    budget_bytes: int,
    kv_dtype: str = "fp16",
    batch: int = 1,
    prefill_chunk: int = 512,
    quantized: bool = False,
    context: int | None = None,
    margin_bytes: int = DEFAULT_MARGIN,
    name: str = "",
    weights_note: str = "",
    native: bool = False,
    transient_bytes: int = 0,
) -> MemoryPlan:
    """Plan one model on a budget; `context` asks for a fixed context (capped by the model's positions).
    `native`: the workspace of the native CPU kernels (`estimate_workspace`); `transient_bytes`: held above
    the weights while loading (`MemoryPlan.peak`, informational: loading is over when a plan is made).

    Raises ConfigError (one line naming the budget and the need) when not even `MIN_CONTEXT` tokens (or
    the requested context) fit.
    """
    if batch < 1:
        raise ConfigError(f"invalid batch {batch}: must be at least 1")
    kv_tok = kv_bytes_per_token(cfg, kv_dtype)
    ws = estimate_workspace(cfg, prefill_chunk=prefill_chunk, batch=batch, quantized=quantized, native=native)
    fixed = weight_bytes + ws.total + margin_bytes
    fit = max(0, (budget_bytes - fixed) // (batch * kv_tok))
    cap = cfg.max_position_embeddings
    need_ctx = min(context, cap) if context is not None else min(MIN_CONTEXT, cap)
    label = name or cfg.name or cfg.arch
    if fit < need_ctx:
        need = fixed + need_ctx * batch * kv_tok
        raise ConfigError(
            f"{label} does not fit a {fmt_gib(budget_bytes)} budget: it needs {fmt_gib(need)} "
            f"(weights {fmt_gib(weight_bytes)} + workspace {fmt_gib(ws.total + margin_bytes)} + KV cache "
            f"{fmt_gib(need_ctx * batch * kv_tok)} for {need_ctx} tokens x {batch})"
        )
    if context is not None:
        max_ctx = need_ctx
    else:
        max_ctx = min(cap, max(MIN_CONTEXT, fit // MIN_CONTEXT * MIN_CONTEXT))
    return MemoryPlan(
        name=label,
        budget=budget_bytes,
        weights=weight_bytes,
        weights_note=weights_note,
        workspace=ws,
        margin=margin_bytes,
        kv_dtype=kv_dtype,
        kv_bytes_per_token=kv_tok,
        batch=batch,
        context_fit=int(fit),
        max_context=int(max_ctx),
        max_positions=cap,
        transient=transient_bytes,
    )


# ---- the device side ------------------------------------------------------------------------------
def default_budget(device: torch.device, *, reserve: int = DEFAULT_RESERVE) -> int:
    """Free memory of the device (available host RAM for CPUs) minus `reserve`."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
    else:
        free = host_available_bytes()
    return max(0, free - reserve)


def host_available_bytes() -> int:
    """RAM a new allocation can get: Linux's MemAvailable (free + reclaimable page cache), else free pages."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def apply_budget(device: torch.device, budget_bytes: int) -> float | None:
    """Cap this process's CUDA allocations at `budget_bytes` (simulates a smaller card); no-op on CPU.

    Returns the fraction of the card set (None on CPU). A budget above the card's memory is an error.
    """
    if device.type != "cuda":
        return None
    total = torch.cuda.get_device_properties(device).total_memory
    if budget_bytes > total:
        raise ConfigError(f"--gpu-memory {fmt_gib(budget_bytes)} is more than the GPU has ({fmt_gib(total)})")
    fraction = budget_bytes / total
    torch.cuda.set_per_process_memory_fraction(fraction, device)
    return fraction
