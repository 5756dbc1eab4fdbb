"""Calibration sequences for quantization: random windows of a text file, or text sampled from the model.

Text file (the paper's recipe, with any corpus): the file is tokenized once without special tokens and
`nsamples` windows of `seqlen` tokens are drawn at random offsets (seeded, so runs are reproducible).

Built-in default (no file, no download): the model writes its own calibration text. Each sequence starts from
the BOS token (or a random vocabulary token when the model has none) and is sampled at temperature 1 with the
full-precision model; data-free calibration of this kind is known to work well for GPTQ-style methods
(LLM-QAT, Liu et al. 2023, generate their calibration data the same way). It needs the whole model in memory
once, so for models larger than the device, pass `--calib FILE`.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

from spqr_run.errors import ConfigError
from spqr_run.loading import ModelSource, build_decoder
from spqr_run.text import read_text_file


def windows_from_text(
    path: Path,
    source: ModelSource,
    *,
    nsamples: int,
    seqlen: int,
    seed: int = 0,
    warn: Callable[[str], None] | None = None,
) -> Tensor:
    """(nsamples, seqlen) token ids from random windows of a text file; bytes that are not UTF-8 are
    replaced with U+FFFD and `warn` is told (`spqr_run.text`)."""
    text = read_text_file(path, f"--calib {path}", warn)
    ids = source.tokenizer.encode(text, add_bos=False, special=False)
    need = nsamples * seqlen
    if len(ids) < need:
        raise ConfigError(
            f"--calib {path}: has {len(ids)} tokens, too short for --nsamples {nsamples} x --seqlen {seqlen} "
            f"= {need} (use a longer file or fewer/shorter samples)"
        )
    rng = random.Random(seed)
    # non-overlapping windows when the text allows it: the file is cut into nsamples equal strides and each
    # window starts at a random offset inside its stride
    stride = len(ids) // nsamples
    starts = [i * stride + rng.randrange(0, stride - seqlen + 1) for i in range(nsamples)]
    return torch.tensor([ids[s : s + seqlen] for s in starts], dtype=torch.long)


@torch.inference_mode()
def sample_from_model(
    source: ModelSource,
    *,
    nsamples: int,
    seqlen: int,
    device: torch.device,
    seed: int = 0,
    batch: int = 64,
    progress: Callable[[int, int], None] | None = None,
) -> Tensor:
    """(nsamples, seqlen) token ids sampled from the full-precision model itself at temperature 1."""
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    model = build_decoder(source, device=device, dtype=dtype)
    cfg = source.config
    seqlen = min(seqlen, cfg.max_position_embeddings)
    gen = torch.Generator().manual_seed(seed)
    out = []
    done = 0
    for start in range(0, nsamples, batch):
        b = min(batch, nsamples - start)
        model.setup_caches(b, seqlen)
        if cfg.bos_token_id is not None:
            first = torch.full((b, 1), cfg.bos_token_id, dtype=torch.long)
        else:
            first = torch.randint(0, cfg.vocab_size, (b, 1), generator=gen)
        seqs = [first]
        tok = first.to(device)
        for pos in range(seqlen - 1):
            positions = torch.full((b, 1), pos, device=device)
            logits = model(tok, positions, kv_len=pos + 1)[:, -1]  # (b, V)
            probs = torch.softmax(logits.float(), dim=-1).cpu()
            nxt = torch.multinomial(probs, 1, generator=gen)  # (b, 1)
            seqs.append(nxt)
            tok = nxt.to(device)
            done += b
            if progress:
                progress(done, nsamples * (seqlen - 1))
        out.append(torch.cat(seqs, dim=1))
    del model
    return torch.cat(out, dim=0)
