"""Round-to-nearest baseline: per-row-per-group min-max grid, fp16 scale/zero, no Hessian, no permutation."""

from __future__ import annotations

import torch
from torch import Tensor

from spqr_run.quant.config import QuantConfig
from spqr_run.quant.grid import fit_minmax_fp16, max_code, quantize_codes
from spqr_run.quant.layout import UnpackedLinear, dense_from_groups
from spqr_run.quant.meta import LinearMeta


def quantize_rtn(weight: Tensor, config: QuantConfig) -> tuple[UnpackedLinear, Tensor]:
    """weight (out, in) fp32 -> (codes and fp16 stats, reconstruction (out, in) fp32)."""
    out, n = weight.shape
    gs = config.groupsize
    groups = -(-n // gs)
    pad = groups * gs - n
    padded = torch.cat([weight, weight[:, -1:].expand(out, pad)], dim=1) if pad else weight  # same min/max
    grouped = padded.reshape(out, groups, gs)  # (out, groups, gs)
    maxq = max_code(config.wbits)
    scales, zeros = fit_minmax_fp16(grouped, maxq)  # (out, groups) fp16
    codes = quantize_codes(grouped, scales.float().unsqueeze(-1), zeros.float().unsqueeze(-1), maxq)
    codes = codes.reshape(out, groups * gs)  # (out, groups*gs)
    recon = dense_from_groups(codes, scales, zeros, gs)[:, :n]  # (out, in)
    meta = LinearMeta.from_config(config, out, n)
    unpacked = UnpackedLinear(meta=meta, codes=codes[:, :n].long(), perm=None, scales=scales, zeros=zeros)
    return unpacked, recon
