"""Fine-tune what SpQR's codes leave free: the continuous numbers of a quantized model, codes fixed.

A `.spqr` linear stores integer codes (weights, 3-bit first-order statistics) and a few continuous numbers:
per 16 x 16 tile the four fp16 second-order statistics (scale and zero of the scale codes, scale and zero of
the zero codes), the fp16 outlier deltas, and, outside the linears, the fp16 RMSNorm weights. With every code
fixed, the model is a differentiable function of those numbers, so they can be trained against the unquantized
model's next-token distributions on the calibration tokens (knowledge distillation, as AQLM's end-to-end
fine-tuning and PV-tuning's continuous step do for their formats: Egiazarian et al. 2024, Sec. 3.4;
Malinovskii et al. 2024, Sec. 3). The format, the codes and the bytes of every tensor stay as they were; only
values change, and the trained model computes with exactly the fp16 numbers the file stores (each forward
rounds them to fp16; gradients pass the rounding straight through, Bengio et al. 2013).

Objective: mean over calibration tokens of KL(p_ref || p_q), the reference's next-token distribution against
the quantized model's, in fp32 on the CPU (or GPU).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from spqr_run.config import ModelConfig
from spqr_run.models.decoder import Decoder, RMSNorm, materialize_fp32
from spqr_run.quant import QuantizedLinear
from spqr_run.quant.grid import FP16_MAX
from spqr_run.quant.layout import UnpackedLinear
from spqr_run.quant.tile_layout import ROWS

GROUP = 16  # columns sharing one first-order (scale, zero) pair: the format's beta1


@dataclass(frozen=True)
class FinetuneConfig:
    """How long and how fast to train. `steps` optimizer steps of `batch` calibration sequences each,
    cycling through the calibration set; Adam with learning rate `lr` in *relative* units (each number moves
    by about lr times its own size a step; zero points in stat-code units), cosine-decayed to 0."""

    steps: int = 32
    batch: int = 2
    seqlen: int = 512  # longer calibration sequences are cut into pieces of this many tokens (memory, time)
    lr: float = 1e-4
    norms: bool = True  # also train the RMSNorm weights (stored fp16 beside the linears)
    report_sequences: int = 4  # the objective before/after is measured on the first this many sequences


@dataclass
class FinetuneReport:
    """What one fine-tuning did: the objective (mean KL, nats/token) on the first `report_sequences`
    calibration sequences before and after training, steps run, wall seconds."""

    kl_before: float
    kl_after: float
    steps: int
    seconds: float


class _StoredValue(torch.autograd.Function):
    """value0 + unit * u rounded to fp16, as the file will store it; value0 itself where u is exactly 0 (so an
    untrained number, a stored -0.0 included, repacks to the same bits). The backward pass treats the rounding
    as the identity (straight-through, Bengio et al. 2013): d/du = unit."""

    @staticmethod
    def forward(ctx, value0: Tensor, unit: Tensor, u: Tensor) -> Tensor:
        ctx.save_for_backward(unit)
        value = torch.where(u == 0, value0, value0 + unit * u)
        return value.clamp(-FP16_MAX, FP16_MAX).half().float()

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[None, None, Tensor]:
        (unit,) = ctx.saved_tensors
        return None, None, grad * unit


def _stored(value0: Tensor, unit: Tensor, u: Tensor) -> Tensor:
    """The fp16 number the file stores for value0 + unit * u (fp32 dtype), differentiable in u."""
    return _StoredValue.apply(value0, unit, u)


class TunableSpQRLinear(nn.Module):
    """An SpQR linear whose weight is computed from fixed codes and trainable continuous numbers.

    The weight is exactly `QuantizedLinear.dequantize()` of the packed result of `to_quantized()` (same fp32
    formula, `spqr_run.quant.layout.spqr_dense_rows`): s = a (scale_code - b), z = c (zero_code - d),
    w = (code - z) s, plus the outlier deltas, columns un-permuted. a..d and the deltas are stored fp16.
    Parameters are offsets in relative units: value = value0 + unit * u, u trained from 0.
    """

    def __init__(self, q: QuantizedLinear) -> None:
        super().__init__()
        u = q.unpack()
        m = u.meta
        if m.method != "spqr":
            raise ValueError(f"TunableSpQRLinear needs an spqr linear, got {m.method}")
        self.meta = m
        k = m.in_features
        groups = -(-k // GROUP)
        codes = F.pad(u.codes.to(torch.uint8), (0, groups * GROUP - k))  # (out, groups*16)
        self.register_buffer("codes", codes, persistent=False)
        self.register_buffer("scale_codes", u.scale_codes.to(torch.uint8), persistent=False)  # (out, groups)
        self.register_buffer("zero_codes", u.zero_codes.to(torch.uint8), persistent=False)
        second = u.second.float()  # (row_groups, groups, 4): a, b, c, d
        self.register_buffer("second0", second, persistent=False)
        # a, c (scales): relative steps; b, d (zero points, in stat-code units): steps of one code
        unit = torch.ones_like(second)
        unit[..., 0::2] = second[..., 0::2].abs()
        self.register_buffer("second_unit", unit, persistent=False)
        self.second_u = nn.Parameter(torch.zeros_like(second))
        self.register_buffer("outlier_rows", u.outlier_rows, persistent=False)
        self.register_buffer("outlier_cols", u.outlier_cols, persistent=False)
        vals = u.outlier_values.float()  # (nnz,)
        self.register_buffer("outlier0", vals, persistent=False)
        scale = vals.abs().pow(2).mean().sqrt() if vals.numel() else torch.tensor(1.0)
        self.register_buffer("outlier_unit", scale.expand_as(vals).clone(), persistent=False)
        self.outlier_u = nn.Parameter(torch.zeros_like(vals))
        inv = None if u.perm is None else torch.argsort(u.perm)  # input feature i = stored column inv[i]
        self.register_buffer("inv_perm", inv, persistent=False)
        self.register_buffer("perm", u.perm, persistent=False)  # stored column j = input feature perm[j]

    def second(self) -> Tensor:
        """The second-order statistics as stored (fp16 values, fp32 dtype): (row_groups, groups, 4)."""
        return _stored(self.second0, self.second_unit, self.second_u)

    def outliers(self) -> Tensor:
        """The outlier deltas as stored (fp16 values, fp32 dtype): (nnz,)."""
        return _stored(self.outlier0, self.outlier_unit, self.outlier_u)

    def weight(self) -> Tensor:
        """The dequantized weight (out, in) fp32, input features in the model's order."""
        out = self.meta.out_features
        sec = self.second().repeat_interleave(ROWS, dim=0)[:out]  # (out, groups, 4)
        scale = sec[..., 0] * (self.scale_codes.float() - sec[..., 1])  # (out, groups)
        zero = sec[..., 2] * (self.zero_codes.float() - sec[..., 3])
        return _DequantizedWeight.apply(scale, zero, self.outliers(), self)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight())

    @torch.no_grad()
    def to_quantized(self) -> QuantizedLinear:
        """The packed linear with the trained numbers (same codes, positions and tensor shapes)."""
        codes = self.codes[:, : self.meta.in_features].long()  # (out, in): the uint8 buffer, padding cut
        tuned = UnpackedLinear(
            meta=self.meta, codes=codes, perm=self.perm, scale_codes=self.scale_codes.long(),
            zero_codes=self.zero_codes.long(), second=self.second().half(), outlier_rows=self.outlier_rows,
            outlier_cols=self.outlier_cols, outlier_values=self.outliers().half(),
        )  # fmt: skip
        return QuantizedLinear.pack(tuned)


class _DequantizedWeight(torch.autograd.Function):
    """(scale, zero (out, groups), outlier deltas (nnz,)) -> the weight (out, in) fp32, model column order:
    w[r, j] = (code[r, j] - zero[r, j // 16]) * scale[r, j // 16] (+ delta), `spqr_dense_rows`' formula.

    Written out so that nothing of weight size is kept for the backward pass (autograd would keep several
    (out, in) fp32 temporaries a linear): the gradients are reduced from grad_w directly,
    d/dscale = sum_j g (code - zero), d/dzero = -scale sum_j g, d/ddelta = g at the outlier."""

    @staticmethod
    def forward(ctx, scale: Tensor, zero: Tensor, deltas: Tensor, lin: TunableSpQRLinear) -> Tensor:
        ctx.lin = lin
        ctx.save_for_backward(scale, zero)
        out, k = lin.meta.out_features, lin.meta.in_features
        w = lin.codes.view(out, -1, GROUP).float()  # (out, groups, 16)
        w = w.sub_(zero.unsqueeze(-1)).mul_(scale.unsqueeze(-1)).view(out, -1)[:, :k]  # stored column order
        if deltas.numel():
            w.index_put_((lin.outlier_rows, lin.outlier_cols), deltas, accumulate=True)
        return w if lin.inv_perm is None else w[:, lin.inv_perm]

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, Tensor, Tensor, None]:
        lin: TunableSpQRLinear = ctx.lin
        scale, zero = ctx.saved_tensors
        out, k = lin.meta.out_features, lin.meta.in_features
        g = grad if lin.perm is None else grad[:, lin.perm]  # (out, in), stored column order
        g_deltas = g[lin.outlier_rows, lin.outlier_cols]  # (nnz,)
        g = F.pad(g, (0, lin.codes.shape[1] - k)).view(out, -1, GROUP)  # (out, groups, 16)
        g_sum = g.sum(-1)  # (out, groups)
        g_code = (g * lin.codes.view(out, -1, GROUP)).sum(-1)  # sum_j g code
        return g_code - zero * g_sum, -scale * g_sum, g_deltas, None


class TunableNorm(nn.Module):
    """RMSNorm with weight = weight0 (1 + u), stored fp16, u trained from 0."""

    def __init__(self, norm: RMSNorm) -> None:
        super().__init__()
        self.eps = norm.eps
        self.register_buffer("weight0", norm.weight.detach().float().clone(), persistent=False)
        self.u = nn.Parameter(torch.zeros_like(self.weight0))

    @property
    def weight(self) -> Tensor:
        return _stored(self.weight0, self.weight0, self.u)

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float()
        return self.weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps))


def file_linears(path: Path) -> dict[str, QuantizedLinear]:
    """Every quantized linear of a `.spqr` file, validated, by canonical module name ("layers.0.attn.q_proj");
    raises ModelFormatError for a damaged file."""
    from spqr_run.loading import open_model
    from spqr_run.loading.spqr_file import read_header

    source = open_model(path)
    out = {}
    for name in read_header(path)["linears"]:
        module = source.linear_factory(name)
        out[name] = QuantizedLinear(meta=module.meta, **{k: getattr(module, k) for k in module._packed_names})
    return out


def dense_decoder(cfg: ModelConfig, weights: Mapping[str, Tensor], device: torch.device) -> Decoder:
    """An fp32 `Decoder` with every weight read from `weights` (canonical names), for training or as the
    reference; raises ValueError naming a missing or misshapen tensor."""
    with torch.device("meta"):
        model = Decoder(cfg)
    materialize_fp32(model, weights, device)
    model.rotary = type(model.rotary)(cfg).to(device)
    return model.eval()


def memory_bytes(cfg: ModelConfig, batch: int, seqlen: int) -> int:
    """About the peak memory of `finetune` (bytes): the reference and the trained model in fp32 (the trained
    one's weights are rebuilt each step), the weight gradients, and per token of a step the activations
    autograd keeps (~24 numbers of the hidden or FFN width a layer) and three fp32 logit rows."""
    weights = 4 * cfg.num_parameters()
    tokens = batch * seqlen
    per_token = 4 * (cfg.num_layers * 24 * max(cfg.hidden_size, cfg.intermediate_size) + 3 * cfg.vocab_size)
    return 3 * weights + tokens * per_token


def _kl(ref_logits: Tensor, logits: Tensor) -> Tensor:
    """Mean over tokens of KL(softmax(ref) || softmax(logits)); both (..., vocab) fp32 -> scalar."""
    ref = F.log_softmax(ref_logits.flatten(0, -2), dim=-1)
    q = F.log_softmax(logits.flatten(0, -2), dim=-1)
    return F.kl_div(q, ref, log_target=True, reduction="batchmean")


def finetune(
    cfg: ModelConfig,
    reference: Mapping[str, Tensor],
    linears: Mapping[str, QuantizedLinear],
    tokens: Tensor,
    ft: FinetuneConfig,
    *,
    device: torch.device,
    on_step: Callable[[int, float], None] | None = None,
) -> tuple[dict[str, QuantizedLinear], dict[str, Tensor], FinetuneReport]:
    """Train the continuous numbers of `linears` (and the norms) to match `reference` on `tokens`.

    cfg: the model; reference: the unquantized weights by canonical name (fp16/fp32, read lazily is fine);
    linears: canonical module name ("layers.0.attn.q_proj") -> its spqr `QuantizedLinear`; tokens: (N, T) int64
    calibration sequences. Returns (the tuned linears, same names and tensor shapes; the tuned norm weights by
    parameter name, fp16; a report). `on_step(step, loss)` is called after every optimizer step.
    Raises ValueError when a linear is not spqr or a reference weight is missing.
    """
    t0 = time.perf_counter()
    ref_model = dense_decoder(cfg, reference, device)
    student = dense_decoder(cfg, reference, device)
    tunable: dict[str, TunableSpQRLinear] = {}
    for name, q in linears.items():
        owner, _, attr = name.rpartition(".")
        module = TunableSpQRLinear(q).to(device)
        setattr(student.get_submodule(owner), attr, module)
        tunable[name] = module
    norms: dict[str, TunableNorm] = {}
    if ft.norms:
        for name, module in list(student.named_modules()):
            if isinstance(module, RMSNorm):
                owner, _, attr = name.rpartition(".")
                tn = TunableNorm(module).to(device)
                setattr(student.get_submodule(owner) if owner else student, attr, tn)
                norms[name] = tn
    params = [p for p in student.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=ft.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / max(ft.steps, 1)))
    )
    if tokens.shape[1] > ft.seqlen:  # (N, T) -> (N * (T // L), L): a step's cost and memory stay fixed
        pieces = tokens.shape[1] // ft.seqlen
        tokens = tokens[:, : pieces * ft.seqlen].reshape(-1, ft.seqlen)
    tokens = tokens.to(device)
    n = tokens.shape[0]

    def objective() -> float:
        with torch.no_grad():
            total, m = 0.0, min(n, ft.report_sequences)
            for s in range(0, m, ft.batch):
                x = tokens[s : min(s + ft.batch, m)]
                total += float(_kl(ref_model(x, use_cache=False), student(x, use_cache=False))) * x.shape[0]
            return total / m

    before = objective()
    for step in range(ft.steps):
        s = (step * ft.batch) % n
        x = tokens[s : s + ft.batch]  # (b, T)
        with torch.no_grad():
            ref_logits = ref_model(x, use_cache=False)  # (b, T, vocab)
        loss = _kl(ref_logits, student(x, use_cache=False))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if on_step:
            on_step(step, float(loss.detach()))
    after = objective()
    tuned = {name: m.to_quantized() for name, m in tunable.items()}
    norm_weights = {f"{name}.weight": m.weight.detach().half().cpu() for name, m in norms.items()}
    report = FinetuneReport(
        kl_before=before, kl_after=after, steps=ft.steps, seconds=time.perf_counter() - t0
    )
    return {k: _cpu(v) for k, v in tuned.items()}, norm_weights, report


def _cpu(q: QuantizedLinear) -> QuantizedLinear:
    return QuantizedLinear(meta=q.meta, **{k: v.cpu() for k, v in q.tensors().items()})
