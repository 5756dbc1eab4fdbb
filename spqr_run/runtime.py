"""Load a model for interactive use (REPL, server, generate): device choice, dtype, context, chat template."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from spqr_run.chat_template import ChatTemplate, chat_template_for
from spqr_run.devices import default_dtype, resolve_device
from spqr_run.errors import ConfigError
from spqr_run.generation import Generator
from spqr_run.loading import ModelSource, build_decoder, open_model
from spqr_run.models.decoder import Decoder
from spqr_run.tokenizer import Tokenizer


@dataclass
class Runtime:
    source: ModelSource
    model: Decoder
    chat_template: ChatTemplate
    device: torch.device
    max_context: int

    @property
    def tokenizer(self) -> Tokenizer:
        return self.source.tokenizer

    def generator(self) -> Generator:
        """A generator on cache row 0 (one conversation at a time)."""
        return Generator(self.model, self.tokenizer, max_seq_len=self.max_context)


def load_runtime(
    path: str | Path, *, device: str | None = None, ctx: int | None = None, progress=None
) -> Runtime:
    """Open and build a model; `ctx` caps the context (default: the model's, at most 4096 on CPU)."""
    dev = resolve_device(device)
    source = open_model(path)
    cfg = source.config
    if ctx is not None and ctx < 16:
        raise ConfigError(f"invalid --ctx {ctx}: must be at least 16 tokens")
    max_context = min(ctx or 4096, cfg.max_position_embeddings)
    dtype = default_dtype(dev)
    model = build_decoder(source, device=dev, dtype=dtype, progress=progress)
    model.setup_caches(1, max_context)
    tok = source.tokenizer
    template = chat_template_for(
        tok.chat_template,
        arch=cfg.arch,
        model_name=cfg.name or Path(path).name,
        vocab=tok.vocab_strings(),
        bos_token=tok.bos_token,
        eos_token=tok.eos_token,
    )
    return Runtime(source, model, template, dev, max_context)
