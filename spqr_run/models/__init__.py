"""Decoder models: one config-driven implementation for LLaMA and Falcon."""

from spqr_run.models.decoder import Decoder
from spqr_run.models.fused import fuse_linears
from spqr_run.models.kv_cache import KVCache
from spqr_run.models.linear import make_linear, replace_linears

__all__ = ["Decoder", "KVCache", "fuse_linears", "make_linear", "replace_linears"]
