"""Quantize a whole model block by block into one `.spqr` file, resumably.

Only one decoder block's weights are materialised at a time (read lazily from the source file); the
calibration activations live on the CPU between blocks. For each block, linears are quantized in
sequential groups (q/k/v, then o, then gate/up, then down — as the official SpQR code does): a group's
Hessians `H = 2/N sum x x^T` are collected with the earlier groups already quantized, and the block's
outputs are recomputed with all its quantized weights to feed the next block.

After every block the packed tensors and the next block's inputs are saved in `OUT.partial/`, so an
interrupted run continues with `resume=True` from the last finished block.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from spqr_run.config import ModelConfig
from spqr_run.errors import ConfigError, DiskFullError, is_disk_full
from spqr_run.finetune import FinetuneConfig, FinetuneReport, finetune, memory_bytes
from spqr_run.loading import ModelSource
from spqr_run.loading.spqr_file import DENSE_DTYPE, FORMAT_VERSION, write_spqr
from spqr_run.models.decoder import Block, Rotary, materialize_fp32
from spqr_run.quant import QuantConfig, QuantizedLinear, quantize_linears
from spqr_run.quant.grid import FP16_MAX

# Paper configs (Dettmers et al. 2024, Sec. 4): beta1 = beta2 = 16 with 3-bit statistics; tau tuned so the
# near-lossless preset stays under 4.75 bits and the 3-bit preset under 4.0 bits (see BENCHMARKS.md).
# tau and percdamp tuned on SmolLM2 (sweeps in BENCHMARKS.md): near-lossless damps 0.1, whose result is both
# better and smaller than 0.01's there (fewer outliers keep it under 4.75 bits); 3bit uses the default 0.01.
# stat_search (issue 13): each row's 3-bit scale/zero codes chosen by Hessian-weighted error on the fixed
# second-order grids, same bits (`--no-stat-search` turns it off). Measured on SmolLM2 (16 x 512 calibration,
# seed 0, first 8,192 tokens; loss vs the unquantized model on wiki-test / Persuasion): 3bit +29.2% / +21.2%
# -> +20.0% / +15.1%, near-lossless +7.0% / +6.8% -> +5.1% / +4.9%, bits unchanged within 0.003.
# near-lossless since issue 13's goal (BENCHMARKS.md, three draws of 32 x 512, loss on wiki-test / Persuasion):
# tau 0.2 -> 0.16 (4.717 -> 4.731 bits) and 2 passes of coordinate descent over the codes (`cd_passes`):
# +5.46% / +4.72% -> +4.70% / +3.93% (tau alone +5.17% / +4.16%, the passes alone +5.35% / +4.70%).
# Both fine-tune 32 steps at lr 1e-4 after quantizing (issue 24, `spqr_run.finetune`; same bits, three draws):
# near-lossless +4.84% / +4.18% -> +3.98% / +3.52%, 3bit +17.76% / +13.02% -> +15.30% / +11.62%.
PRESETS: dict[str, QuantConfig] = {
    "near-lossless": QuantConfig(method="spqr", wbits=4, groupsize=16, stat_bits=3, stat_groupsize=16, outlier_threshold=0.16, percdamp=0.1, stat_search=True, cd_passes=2, finetune_steps=32, finetune_lr=1e-4),
    "3bit": QuantConfig(method="spqr", wbits=3, groupsize=16, stat_bits=3, stat_groupsize=16, outlier_threshold=0.3, stat_search=True, finetune_steps=32, finetune_lr=1e-4),
}  # fmt: skip
LLAMA_GROUPS = [["attn.q_proj", "attn.k_proj", "attn.v_proj"], ["attn.o_proj"], ["mlp.gate_proj", "mlp.up_proj"], ["mlp.down_proj"]]  # fmt: skip
FALCON_GROUPS = [["attn.q_proj", "attn.k_proj", "attn.v_proj"], ["attn.o_proj"], ["mlp.up_proj"], ["mlp.down_proj"]]  # fmt: skip


@dataclass
class LayerReport:
    name: str
    out_features: int
    in_features: int
    avg_bits: float
    outlier_fraction: float
    relative_error: float
    seconds: float


@dataclass
class QuantizeSummary:
    path: str
    method: str
    avg_bits: (
        float  # stored bits per quantized weight (bytes in the file * 8 / params), all overheads included
    )
    file_bits_per_param: float  # whole file (fp16 embeddings, head, norms, header) * 8 / all params
    outlier_fraction: float
    quantized_params: int
    total_params: int
    file_bytes: int
    calibration: str
    seconds: float  # this run's wall time, calibration included (an interrupted run's earlier part not)
    calibration_seconds: float = 0.0  # making the calibration tokens (0 when a resumed run reused them)
    quantization_seconds: float = 0.0  # the rest: quantizing the blocks and writing the file
    layers: list[LayerReport] = field(default_factory=list)
    finetune: dict[str, Any] | None = None  # `finetune.FinetuneReport` as a dict, when fine-tuning ran

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["layers"] = [asdict(r) for r in self.layers]
        return d


def sequential_groups(cfg: ModelConfig) -> list[list[str]]:
    return FALCON_GROUPS if cfg.mlp_type == "gelu" else LLAMA_GROUPS


def load_block(source: ModelSource, i: int, device: torch.device) -> Block:
    """Decoder block `i` in fp32 on `device`, weights read from the source one tensor at a time."""
    with torch.device("meta"):
        block = Block(source.config)
    try:
        return materialize_fp32(block, source.weights, device, prefix=f"layers.{i}.")
    except ValueError as e:
        raise ConfigError(f"{source.path}: {e}") from None


RUN_BATCH = 8  # calibration sequences per block forward
REUSE_MAX_BYTES = 4 << 30  # activation copies kept between one block's Hessian passes (collect_hessian)


@torch.inference_mode()
def run_block(
    block: Block, rotary: Rotary, inps: Tensor, device: torch.device, batch: int = RUN_BATCH
) -> Tensor:
    """Block outputs for all calibration sequences: inps (N, T, hidden) on CPU -> same shape on CPU."""
    n, t, _ = inps.shape
    out = torch.empty_like(inps)
    positions = torch.arange(t, device=device)
    for s in range(0, n, batch):
        x = inps[s : s + batch].to(device, torch.float32)  # (b, T, hidden)
        pos = positions.expand(x.shape[0], t)  # (b, T)
        out[s : s + batch] = block(x, rotary, pos, None, None, None, None).to(out.dtype).cpu()
    return out


class _StopForward(Exception):
    """Raised by the Hessian hook once it has what it needs: the rest of the block is not computed."""


@torch.inference_mode()
def collect_hessian(
    block: Block,
    name: str,
    rotary: Rotary,
    inps: Tensor,
    device: torch.device,
    reuse: _PassCache | None = None,
) -> Tensor:
    """H = 2/N sum_x x x^T (in, in) fp32 over every calibration token of the input of linear `name`.

    Each batch's forward stops at that linear (nothing after it is needed), so collecting the Hessian of
    q/k/v costs a norm, not a block. The linears of a sequential group read the same input (q/k/v the
    attention norm's output, gate/up the MLP's input), so one Hessian serves the whole group.

    With `reuse` (one per block, groups collected in order), later passes start from what earlier ones
    recorded instead of from the block input: once q/k/v are final, attention is replayed from o_proj's
    recorded inputs (o_proj applied, nothing else), and down_proj's pass runs the MLP on its recorded
    inputs. The numbers are the same; the cost is two (N, T, hidden) fp32 activation copies on the CPU,
    so `quantize_block` reuses only when they take at most `REUSE_MAX_BYTES` together.
    """
    linear = block.get_submodule(name)
    total = torch.zeros(linear.in_features, linear.in_features, device=device)
    count = 0
    record = reuse.recorder(name) if reuse is not None else None

    def hook(_module: nn.Module, args: tuple[Tensor, ...]) -> None:
        nonlocal count
        x = args[0].reshape(-1, args[0].shape[-1]).float()  # (tokens, in)
        total.addmm_(x.T, x)
        count += x.shape[0]
        if record is not None:
            record.append(args[0].to("cpu", torch.float32))  # fp32 as computed: replays are exact
        raise _StopForward

    handle = linear.register_forward_pre_hook(hook)
    n, t, _ = inps.shape
    positions = torch.arange(t, device=device)
    try:
        for b, s in enumerate(range(0, n, RUN_BATCH)):
            try:
                if reuse is not None and name == "mlp.down_proj" and reuse.mlp_inputs:
                    block.mlp(reuse.mlp_inputs[b].to(device, torch.float32))
                    continue
                x = inps[s : s + RUN_BATCH].to(device, torch.float32)  # (b, T, hidden)
                with reuse.attention(block, b, name) if reuse is not None else nullcontext():
                    block(x, rotary, positions.expand(x.shape[0], t), None, None, None, None)
            except _StopForward:
                pass
    finally:
        handle.remove()
    return total.mul_(2.0 / count)


@torch.inference_mode()
def collect_hessian_and_cross(
    block: Block,
    fp_block: Block,
    name: str,
    rotary: Rotary,
    inps: Tensor,
    fp_inps: Tensor,
    device: torch.device,
) -> tuple[Tensor, Tensor]:
    """H = 2/N sum x_q x_q^T and D = 2/N sum (x_fp - x_q) x_q^T, both (in, in) fp32, for linear `name`.

    x_q is the input of `name` in `block` (earlier groups quantized) on the quantized model's block inputs
    `inps`, x_fp the same linear's input in the unquantized `fp_block` on the full-precision model's block
    inputs `fp_inps` (N, T, hidden), token for token. Used by `fp_target_weight`.
    """
    lin, fp_lin = block.get_submodule(name), fp_block.get_submodule(name)
    k = lin.in_features
    h = torch.zeros(k, k, device=device)
    d = torch.zeros(k, k, device=device)
    seen: list[Tensor] = []
    count = 0

    def hook(_module: nn.Module, args: tuple[Tensor, ...]) -> None:
        seen.append(args[0].reshape(-1, args[0].shape[-1]).float())  # (tokens, in)
        raise _StopForward

    handles = [lin.register_forward_pre_hook(hook), fp_lin.register_forward_pre_hook(hook)]
    n, t, _ = inps.shape
    positions = torch.arange(t, device=device)
    try:
        for s in range(0, n, RUN_BATCH):
            seen.clear()
            for blk, src in ((block, inps), (fp_block, fp_inps)):
                x = src[s : s + RUN_BATCH].to(device, torch.float32)  # (b, T, hidden)
                try:
                    blk(x, rotary, positions.expand(x.shape[0], t), None, None, None, None)
                except _StopForward:
                    pass
            xq, xf = seen
            h.addmm_(xq.T, xq)
            d.addmm_((xf - xq).T, xq)
            count += xq.shape[0]
    finally:
        for handle in handles:
            handle.remove()
    return h.mul_(2.0 / count), d.mul_(2.0 / count)


def fp_target_weight(weight: Tensor, hessian: Tensor, cross: Tensor, percdamp: float) -> Tensor:
    """W* = W + W D (H + lambda I)^-1 with lambda = percdamp * mean(diag H): weight (out, in) -> (out, in).

    The least-squares weight on the quantized model's inputs X_q that best reproduces the full-precision
    outputs W X_fp: argmin_V ||W X_fp - V X_q||^2 = W X_fp X_q^T (X_q X_q^T)^-1 = W + W (X_fp - X_q) X_q^T H^-1,
    damped like GPTQ's own H; quantizing W* with H then minimises ||W X_fp - Q X_q|| (asymmetric
    calibration, as in GPTAQ, Li et al. 2025). Solved in float64; D = 0 gives W back exactly.
    """
    h = hessian.double()
    h.diagonal().add_(percdamp * h.diagonal().mean() + 1e-12)
    correction = torch.linalg.solve(h, cross.double().T @ weight.double().T).T  # (out, in) = W D H^-1
    return (weight.double() + correction).float().clamp(-FP16_MAX, FP16_MAX)


class _PassCache:
    """What one block's Hessian passes recorded for the later ones (see `collect_hessian`): o_proj's
    inputs (attention output before o_proj, q/k/v final) and the MLP's inputs (o_proj final), per batch."""

    def __init__(self) -> None:
        self.o_inputs: list[Tensor] = []
        self.mlp_inputs: list[Tensor] = []

    def recorder(self, name: str) -> list[Tensor] | None:
        if name == "attn.o_proj":
            return self.o_inputs
        if name in ("mlp.gate_proj", "mlp.up_proj"):
            return self.mlp_inputs
        return None

    @contextmanager
    def attention(self, block: Block, batch: int, name: str) -> Iterator[None]:
        """While collecting `name` (after o_proj's pass): block.attn replaced by o_proj(recorded input)."""
        if name in ("attn.q_proj", "attn.o_proj") or not self.o_inputs:
            yield
            return
        attn = block.attn
        replay = _AttentionReplay(attn.o_proj, self.o_inputs[batch])
        block.attn = replay  # type: ignore[assignment]
        try:
            yield
        finally:
            block.attn = attn


class _AttentionReplay(nn.Module):
    """Stands in for a block's attention: o_proj of a recorded input (B, T, q_dim)."""

    def __init__(self, o_proj: nn.Module, y: Tensor) -> None:
        super().__init__()
        self.o_proj, self.y = o_proj, y

    def forward(self, x: Tensor, *_args: Any) -> Tensor:
        return self.o_proj(self.y.to(x.device, x.dtype))


def _fingerprint(**kwargs: Any) -> str:
    return hashlib.sha256(json.dumps(kwargs, sort_keys=True, default=str).encode()).hexdigest()[:16]


def check_interrupted(out: Path, resume: bool) -> bool:
    """Before any calibration work: True when `OUT.partial/` holds an interrupted run to continue.

    Raises ConfigError naming `--resume` when there is one and `resume` is False (so a rerun fails in a
    second instead of after sampling calibration text again)."""
    partial = Path(out).with_name(Path(out).name + ".partial")
    if partial.exists() and not resume:
        raise ConfigError(
            f"{partial} holds an interrupted run: pass --resume to continue it (its calibration is kept), "
            "or delete the folder to start over"
        )
    return partial.exists()


class Checkpoint:
    """`OUT.partial/`: the calibration token ids, finished blocks' packed tensors and the next block's
    inputs, for `--resume`. Created only once the calibration exists; every file is written under a
    temporary name and renamed, so an interruption at any moment leaves a consistent folder."""

    def __init__(self, out: Path, fingerprint: str) -> None:
        self.out = out
        self.dir = out.with_name(out.name + ".partial")
        self.fingerprint = fingerprint
        self.state_path = self.dir / "state.json"
        self.calib_path = self.dir / "calibration.safetensors"

    def next_block(self, resume: bool) -> int | None:
        """The first block still to do, or None when there is no partial run (start with `begin`)."""
        if not check_interrupted(self.out, resume):
            return None
        try:
            state = json.loads(self.state_path.read_text())
        except (OSError, json.JSONDecodeError):
            raise ConfigError(f"{self.state_path}: unreadable; delete {self.dir} to start over") from None
        if state.get("fingerprint") != self.fingerprint:
            raise ConfigError(
                f"{self.dir} was made with other settings (source, quantization or calibration); "
                "delete it to start over or rerun with the same settings"
            )
        return int(state["next_block"])

    def begin(self, calib_tokens: Tensor) -> None:
        """Create the folder with the calibration token ids (N, T) int64 and state "block 0 next".

        Built as `OUT.partial.tmp/` and renamed: the folder appears complete or not at all."""
        tmp = self.dir.with_name(self.dir.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            tmp.mkdir(parents=True)
            _save({"tokens": calib_tokens.to(torch.int64).contiguous()}, tmp / self.calib_path.name, {})
            _write_text(
                tmp / self.state_path.name, json.dumps({"fingerprint": self.fingerprint, "next_block": 0})
            )
            os.replace(tmp, self.dir)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)  # a full disk gets its space back
            raise

    def load_calibration(self) -> Tensor:
        """The stored calibration token ids (N, T) int64."""
        try:
            with safe_open(self.calib_path, framework="pt") as f:
                return f.get_tensor("tokens")
        except Exception:  # missing or damaged file: safetensors raises several types
            raise ConfigError(
                f"{self.calib_path}: missing or unreadable; delete {self.dir} to start over"
            ) from None

    def _write_state(self, next_block: int) -> None:
        tmp = self.state_path.with_suffix(".tmp")
        _write_text(tmp, json.dumps({"fingerprint": self.fingerprint, "next_block": next_block}))
        os.replace(tmp, self.state_path)

    def finished_blocks(self) -> int | None:
        """How many blocks the folder holds (None when it does not exist or its state is unreadable)."""
        try:
            return int(json.loads(self.state_path.read_text())["next_block"])
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def kept(self, num_layers: int) -> str:
        """What an interrupted run leaves for --resume, in words (for DiskFullError)."""
        done = self.finished_blocks()
        if done is None:
            return f"nothing yet (no file under {self.out} either)"
        blocks = f"all {num_layers} blocks" if done == num_layers else f"{done} of {num_layers} blocks"
        return f"{blocks} and the calibration in {self.dir} (no file under {self.out} yet)"

    def save_block(
        self,
        i: int,
        packed: dict[str, QuantizedLinear],
        reports: list[LayerReport],
        inps: Tensor,
        fp_inps: Tensor | None = None,
    ) -> None:
        tensors = {
            f"{name}.{k}": v.contiguous() for name, q in packed.items() for k, v in q.tensors().items()
        }
        meta = {
            "metas": json.dumps({name: q.meta.to_dict() for name, q in packed.items()}),
            "reports": json.dumps([asdict(r) for r in reports]),
        }
        _atomic_save(tensors, self.dir / f"block_{i:04d}.safetensors", meta)
        saved = {"inps": inps.contiguous()}
        if fp_inps is not None:
            saved["fp_inps"] = fp_inps.contiguous()
        _atomic_save(saved, self.dir / "inps.safetensors", {})
        self._write_state(i + 1)

    def load_inps(self) -> tuple[Tensor, Tensor | None]:
        """The next block's inputs (N, T, hidden), and the full-precision model's when they were saved."""
        with safe_open(self.dir / "inps.safetensors", framework="pt") as f:
            fp = f.get_tensor("fp_inps") if "fp_inps" in f.keys() else None
            return f.get_tensor("inps"), fp

    def block_file(self, i: int) -> Path:
        return self.dir / f"block_{i:04d}.safetensors"

    def block_info(self, i: int) -> tuple[dict[str, dict[str, Any]], list[LayerReport], list[str]]:
        with safe_open(self.block_file(i), framework="pt") as f:
            meta = f.metadata()
            names = list(f.keys())
        return json.loads(meta["metas"]), [LayerReport(**r) for r in json.loads(meta["reports"])], names

    def remove(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


def _atomic_save(tensors: dict[str, Tensor], path: Path, meta: dict[str, str]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    _save(tensors, tmp, meta, final=path)
    os.replace(tmp, path)


def _save(tensors: dict[str, Tensor], path: Path, meta: dict[str, str], *, final: Path | None = None) -> None:
    """safetensors' `save_file`; a write that fails for lack of space removes what it wrote and becomes a
    DiskFullError naming `final` (default `path`) and the bytes it needed."""
    try:
        save_file(tensors, str(path), metadata=meta)
    except Exception as e:
        path.unlink(missing_ok=True)
        if is_disk_full(e):
            needed = sum(t.numel() * t.element_size() for t in tensors.values())
            raise DiskFullError(final or path, needed) from None
        raise


def _write_text(path: Path, text: str) -> None:
    """`path.write_text(text)`; lack of space becomes a DiskFullError (the partial file removed)."""
    try:
        path.write_text(text)
    except OSError as e:
        path.unlink(missing_ok=True)
        if is_disk_full(e):
            raise DiskFullError(path, len(text.encode())) from None
        raise


def quantize_block(
    block: Block,
    i: int,
    cfg: ModelConfig,
    qcfg: QuantConfig,
    rotary: Rotary,
    inps: Tensor,
    device: torch.device,
    on_linear: Callable[[str], None] | None = None,
    fp_block: Block | None = None,
    fp_inps: Tensor | None = None,
) -> tuple[dict[str, QuantizedLinear], list[LayerReport]]:
    """Quantize one block's linears in sequential groups, replacing each weight by its reconstruction.

    With `qcfg.fp_targets`, `fp_block` (the unquantized block) and `fp_inps` (the full-precision model's
    inputs to it) give each group's targets (`fp_target_weight`)."""
    packed: dict[str, QuantizedLinear] = {}
    reports: list[LayerReport] = []
    n, t, hidden = inps.shape
    asym = qcfg.fp_targets and qcfg.method != "rtn" and fp_block is not None and fp_inps is not None
    reuse = _PassCache() if 2 * n * t * hidden * 4 <= REUSE_MAX_BYTES and not asym else None
    for group in sequential_groups(cfg):
        hessian = None
        linears = [block.get_submodule(name) for name in group]
        weights = [lin.weight.data for lin in linears]
        if asym:
            assert fp_block is not None and fp_inps is not None
            hessian, cross = collect_hessian_and_cross(
                block, fp_block, group[0], rotary, inps, fp_inps, device
            )
            weights = [fp_target_weight(w, hessian, cross, qcfg.percdamp) for w in weights]
            del cross
        elif qcfg.method != "rtn":
            hessian = collect_hessian(block, group[0], rotary, inps, device, reuse)
        results = quantize_linears(weights, hessian, config=qcfg)
        for name, linear, result in zip(group, linears, results, strict=True):
            q = result.quantized
            recon = result.reconstruction  # (out, in), permuted columns
            if q.perm is not None:
                unpermuted = torch.empty_like(recon)
                unpermuted[:, q.perm_indices().to(recon.device)] = recon
                recon = unpermuted
            linear.weight.data.copy_(recon)
            packed[f"layers.{i}.{name}"] = QuantizedLinear(
                **{**q.__dict__, **{k: v.cpu() for k, v in q.tensors().items()}}
            )
            reports.append(
                LayerReport(f"layers.{i}.{name}", q.meta.out_features, q.meta.in_features, q.avg_bits,
                            result.outlier_fraction, result.relative_error, result.seconds)
            )  # fmt: skip
            if on_linear:
                on_linear(name)
        del hessian
    del reuse
    return packed, reports


def quantize_model(
    source: ModelSource,
    out: Path,
    *,
    qcfg: QuantConfig,
    calib_tokens: Tensor | Callable[[], Tensor],
    calib_desc: str,
    device: torch.device,
    resume: bool = False,
    fingerprint_extra: dict[str, Any] | None = None,
    on_block_start: Callable[[int, int], None] | None = None,
    on_linear: Callable[[str], None] | None = None,
    on_finetune_step: Callable[[int, float], None] | None = None,
) -> QuantizeSummary:
    """Quantize every linear of `source` with `qcfg` on calibration tokens (N, T) int64 and write `out`.

    `calib_tokens` may be a function that makes them (sampling from the model, reading a file): it is
    called only when there is no interrupted run to continue, after the check for one, and its time is
    reported as `QuantizeSummary.calibration_seconds`. With `qcfg.finetune_steps`, the continuous numbers
    of the quantized model are then trained against `source` on the same tokens (`spqr_run.finetune`;
    `on_finetune_step(step, loss)` after each step); the result is kept in `OUT.partial/` like a block.
    An interrupted run (`OUT.partial/`) raises ConfigError naming `--resume` unless `resume`; with `resume` it continues from its last finished block
    with the calibration it stored. `calib_desc` and `fingerprint_extra` must match the stored run's.

    A full disk (while a block is saved, or found before the final write) raises DiskFullError saying what
    failed, the space needed and what was kept for `--resume`; a caller that knows the exact command to
    continue sets its `resume`.
    """
    t0 = time.perf_counter()
    out = Path(out)
    if qcfg.finetune_steps and isinstance(calib_tokens, Tensor):  # (a callable's: the caller checks)
        check_finetune_memory(source.config, device, calib_tokens.shape[1])
    ckpt = Checkpoint(
        out,
        _fingerprint(
            src=str(source.path),
            q=qcfg.to_dict(),
            calib=calib_desc,
            file_format=FORMAT_VERSION,  # finished blocks hold packed tensors of this format
            **(fingerprint_extra or {}),
        ),
    )
    try:
        return _quantize(source, out, ckpt, qcfg, calib_tokens, calib_desc, device, resume, t0,
                         on_block_start, on_linear, on_finetune_step)  # fmt: skip
    except DiskFullError as e:
        e.kept = ckpt.kept(source.config.num_layers)
        e.resume = e.resume or "the same command with --resume"
        raise


def _quantize(
    source: ModelSource,
    out: Path,
    ckpt: Checkpoint,
    qcfg: QuantConfig,
    calib_tokens: Tensor | Callable[[], Tensor],
    calib_desc: str,
    device: torch.device,
    resume: bool,
    t0: float,
    on_block_start: Callable[[int, int], None] | None,
    on_linear: Callable[[str], None] | None,
    on_finetune_step: Callable[[int, float], None] | None,
) -> QuantizeSummary:
    cfg = source.config
    start = ckpt.next_block(resume)
    calib_seconds = 0.0
    if start is None:  # a fresh run: make the calibration now, then create the partial folder
        if callable(calib_tokens):
            calib_tokens = calib_tokens()
            calib_seconds = time.perf_counter() - t0
        ckpt.begin(calib_tokens)
        start = 0
    elif start == 0:  # interrupted in the first block: its stored calibration, not a new one
        calib_tokens = ckpt.load_calibration()
    rotary = Rotary(cfg).to(device)
    act_dtype = torch.float16 if device.type == "cuda" else torch.float32
    if start == 0:
        assert isinstance(calib_tokens, Tensor)
        with torch.inference_mode():
            inps = torch.cat(
                [
                    source.weights["embed_tokens.weight"][calib_tokens[s : s + 8]].to(act_dtype)
                    for s in range(0, len(calib_tokens), 8)
                ]
            )
        fp_inps = inps.clone() if qcfg.fp_targets else None
    else:
        inps, fp_inps = ckpt.load_inps()
    for i in range(start, cfg.num_layers):
        if on_block_start:
            on_block_start(i, cfg.num_layers)
        block = load_block(source, i, device)
        fp_block = load_block(source, i, device) if fp_inps is not None else None
        packed, reports = quantize_block(
            block, i, cfg, qcfg, rotary, inps, device, on_linear, fp_block=fp_block, fp_inps=fp_inps
        )
        inps = run_block(block, rotary, inps, device)
        if fp_block is not None and fp_inps is not None:
            fp_inps = run_block(fp_block, rotary, fp_inps, device)
        ckpt.save_block(i, packed, reports, inps, fp_inps)
        del block, fp_block, packed
    del inps, fp_inps
    tuned = _finetune(source, qcfg, ckpt, device, on_finetune_step) if qcfg.finetune_steps else None
    summary = _write_file(source, out, qcfg, ckpt, calib_desc, t0, tuned)
    summary.calibration_seconds = calib_seconds
    summary.quantization_seconds = summary.seconds - calib_seconds
    ckpt.remove()
    return summary


def check_finetune_memory(cfg: ModelConfig, device: torch.device, seqlen: int) -> None:
    """ConfigError naming `--finetune-steps 0` when fine-tuning on sequences of `seqlen` tokens
    (`finetune.memory_bytes`) would not fit the device's free memory (available RAM on a CPU)."""
    from spqr_run.engine.planner import default_budget

    ft = FinetuneConfig()
    need, free = memory_bytes(cfg, ft.batch, min(seqlen, ft.seqlen)), default_budget(device, reserve=0)
    if need > free:
        raise ConfigError(
            f"fine-tuning this model needs about {need / 2**30:.1f} GiB on {device}, {free / 2**30:.1f} GiB are "
            "free: pass --finetune-steps 0 (or a device with more memory)"
        )


def _finetune(
    source: ModelSource,
    qcfg: QuantConfig,
    ckpt: Checkpoint,
    device: torch.device,
    on_step: Callable[[int, float], None] | None,
) -> tuple[Path, list[str], FinetuneReport]:
    """Fine-tune the finished blocks' continuous numbers (`spqr_run.finetune`) on the stored calibration
    tokens, or reuse the result an interrupted run saved; returns (its file, tensor names, report)."""
    path = ckpt.dir / "finetuned.safetensors"
    if path.exists():
        with safe_open(path, framework="pt") as f:
            report = FinetuneReport(**json.loads(f.metadata()["report"]))
            return path, list(f.keys()), report
    cfg = source.config
    linears: dict[str, QuantizedLinear] = {}
    for i in range(cfg.num_layers):
        metas, _, names = ckpt.block_info(i)
        with safe_open(ckpt.block_file(i), framework="pt") as f:
            for module, meta in metas.items():
                parts = {
                    n.rpartition(".")[2]: f.get_tensor(n) for n in names if n.rpartition(".")[0] == module
                }
                linears[module] = QuantizedLinear.from_tensors(
                    parts, meta=meta, source=str(ckpt.block_file(i))
                )
    ft = FinetuneConfig(steps=qcfg.finetune_steps, lr=qcfg.finetune_lr)
    tuned, norms, report = finetune(
        cfg, source.weights, linears, ckpt.load_calibration(), ft, device=device, on_step=on_step
    )
    tensors = {f"{name}.{k}": v.contiguous() for name, q in tuned.items() for k, v in q.tensors().items()}
    tensors.update({name: w.to(DENSE_DTYPE).contiguous() for name, w in norms.items()})
    _atomic_save(tensors, path, {"report": json.dumps(asdict(report))})
    return path, list(tensors), report


def _write_file(
    source: ModelSource,
    out: Path,
    qcfg: QuantConfig,
    ckpt: Checkpoint,
    calib_desc: str,
    t0: float,
    tuned: tuple[Path, list[str], FinetuneReport] | None = None,
) -> QuantizeSummary:
    """Write `out` from the finished blocks in `ckpt`, dense tensors from `source`; `tuned` (a file, its
    tensor names, the report) replaces the packed tensors and norm weights it holds."""
    cfg = source.config
    metas: dict[str, dict[str, Any]] = {}
    reports: list[LayerReport] = []
    tensors: list[tuple[str, Callable[[], Tensor]]] = []

    def from_block(path: Path, name: str) -> Callable[[], Tensor]:
        def load() -> Tensor:
            with safe_open(path, framework="pt") as f:
                return f.get_tensor(name)

        return load

    def dense(name: str) -> Callable[[], Tensor]:
        return lambda: source.weights[name].to(DENSE_DTYPE)

    quantized_modules = set()
    for i in range(cfg.num_layers):
        block_metas, block_reports, names = ckpt.block_info(i)
        metas.update(block_metas)
        reports += block_reports
        quantized_modules |= set(block_metas)
        tensors += [(n, from_block(ckpt.block_file(i), n)) for n in names]
    for name in source.weights:
        module, _, attr = name.rpartition(".")
        if module in quantized_modules and attr == "weight":
            continue
        tensors.append((name, dense(name)))
    if tuned is not None:
        path, names, _ = tuned
        replaced = set(names)
        tensors = [(n, from_block(path, n) if n in replaced else load) for n, load in tensors]
    qbytes = sum(
        _nbytes(n, load)
        for n, load in tensors
        if n.rpartition(".")[0] in quantized_modules and not n.endswith(".bias")
    )
    qparams = sum(r.out_features * r.in_features for r in reports)
    outliers = sum(r.outlier_fraction * r.out_features * r.in_features for r in reports)
    summary = QuantizeSummary(
        path=str(out), method=qcfg.method, avg_bits=qbytes * 8 / qparams, file_bits_per_param=0.0,
        outlier_fraction=outliers / qparams, quantized_params=qparams, total_params=cfg.num_parameters(),
        file_bytes=0, calibration=calib_desc, seconds=0.0, layers=reports,
        finetune=None if tuned is None else asdict(tuned[2]),
    )  # fmt: skip
    header = {
        "model_config": cfg.to_dict(),
        "quant_config": qcfg.to_dict(),
        "tokenizer": source.tokenizer.to_json_dict(),
        "generation_defaults": source.generation_defaults,
        "linears": metas,
        "summary": {
            "avg_bits": summary.avg_bits, "outlier_fraction": summary.outlier_fraction,
            "quantized_params": qparams, "calibration": calib_desc, "source": Path(source.path).name,
            **({"finetune": summary.finetune} if summary.finetune else {}),
        },
    }  # fmt: skip
    summary.file_bytes = write_spqr(out, header, tensors)
    summary.file_bits_per_param = summary.file_bytes * 8 / summary.total_params
    summary.seconds = time.perf_counter() - t0
    return summary


def _nbytes(name: str, load: Callable[[], Tensor]) -> int:
    t = load()
    return t.numel() * t.element_size()
