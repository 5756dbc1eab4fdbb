"""CUDA-graph decode: one captured graph runs a whole per-token decode step (every layer, the LM head and a
greedy argmax), so batch-1 decode is not bound by Python launch overhead.

The step uses static shapes: token and position buffers (B, 1) that the caller fills, attention over the
whole preallocated KV cache (`kv_len=None`, positions beyond each row's own masked out), logits written into
a static (B, 1, V) buffer. Size the cache to the context actually needed: every step reads all of it.
Without CUDA (or with `use_graph=False`) the same static-shape step runs eagerly, which is what the CPU
tests compare token for token with the reference `Generator`.

Capture follows PyTorch's CUDA-graph recipe: warm-up iterations on a side stream, then
`torch.cuda.graph`. Warm-up and capture write one KV position (the cache's last); its previous contents
are saved and restored, so a step can be created after a prefill. The graph holds the cache buffers'
addresses: re-running `setup_caches` needs a new `GraphDecodeStep`. Everything the step runs must be
capturable (no host synchronisation): on CUDA that needs the SpQR kernels (`spqr_run.ops`), not the
pure-torch reference matmul, whose outlier pass reads sizes to the host. Their modules are loaded (or compiled
by NVRTC) and resolved before the warm-up (`prepare_kernels`): module loading cannot be captured; the warm-up
then makes every layer's argument block and split-K counters.
"""

from __future__ import annotations

import torch
from torch import Tensor

from spqr_run.models.decoder import Decoder


class GraphDecodeStep:
    """`(tokens (B, 1), positions (B, 1)) -> logits (B, 1, V)` for cache rows 0..B-1: the `Generator`'s
    `decode_step` signature. The returned logits are a static buffer, valid until the next call."""

    def __init__(self, model: Decoder, batch: int, *, use_graph: bool | None = None, warmup: int = 3) -> None:
        if model.caches is None:
            raise ValueError("GraphDecodeStep needs the KV cache: call model.setup_caches(...) first")
        rows = model.caches[0].rows
        if not 1 <= batch <= rows:
            raise ValueError(f"batch {batch} is not within the cache's {rows} rows")
        self.model, self.batch = model, batch
        self.device = model.device
        vocab = model.config.vocab_size
        kw = {"device": self.device}
        with torch.inference_mode():
            self.tokens = torch.zeros(batch, 1, dtype=torch.long, **kw)  # (B, 1)
            self.positions = torch.zeros(batch, 1, dtype=torch.long, **kw)  # (B, 1)
            self.logits = torch.zeros(batch, 1, vocab, dtype=torch.float32, **kw)  # (B, 1, V)
            self.next_tokens = torch.zeros(batch, 1, dtype=torch.long, **kw)  # (B, 1) greedy choice
        self.graph: torch.cuda.CUDAGraph | None = None
        want = self.device.type == "cuda" if use_graph is None else use_graph
        if want:
            if self.device.type != "cuda":
                raise ValueError("CUDA graphs need a CUDA device")
            self._capture(warmup)

    @property
    def graphed(self) -> bool:
        return self.graph is not None

    # ---- running ----------------------------------------------------------------------------------
    def _forward(self) -> None:
        logits = self.model(self.tokens, self.positions)  # (B, 1, V) fp32, static shapes (kv_len=None)
        self.logits.copy_(logits)
        self.next_tokens.copy_(logits.argmax(dim=-1))  # (B, 1)

    def run(self) -> None:
        """One step from the current `tokens` / `positions` buffers (no host synchronisation)."""
        with torch.inference_mode():
            if self.graph is not None:
                self.graph.replay()
            else:
                self._forward()

    def __call__(self, tokens: Tensor, positions: Tensor) -> Tensor:
        with torch.inference_mode():
            self.tokens.copy_(tokens)
            self.positions.copy_(positions)
        self.run()
        return self.logits

    def greedy(self, tokens: Tensor, positions: Tensor) -> Tensor:
        """One step, returning the argmax tokens (B, 1) on the device (a static buffer)."""
        self(tokens, positions)
        return self.next_tokens

    def advance_greedy(self) -> None:
        """Feed the last greedy tokens back at the next positions and run (all on the device)."""
        with torch.inference_mode():
            self.tokens.copy_(self.next_tokens)
            self.positions.add_(1)
        self.run()

    # ---- capture ----------------------------------------------------------------------------------
    def _capture(self, warmup: int) -> None:
        from spqr_run.ops import prepare_kernels

        caches = self.model.caches
        assert caches is not None
        prepare_kernels(self.model)  # every kernel module loaded and resolved before capture (not capturable)
        last = self.model.max_seq_len - 1
        b = self.batch
        with torch.inference_mode():
            saved = [c.save_position(b, last) for c in caches]
            self.positions.fill_(last)
            stream = torch.cuda.Stream(self.device)
            stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(stream):
                for _ in range(warmup):
                    self._forward()
            torch.cuda.current_stream(self.device).wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            try:
                with torch.cuda.graph(graph):
                    self._forward()
            except RuntimeError as e:
                raise RuntimeError(
                    f"CUDA graph capture of the decode step failed ({e}); run without graphs "
                    "(--no-graphs) or make the step capturable"
                ) from e
            for c, values in zip(caches, saved, strict=True):
                c.restore_position(b, last, values)
            self.positions.zero_()
        self.graph = graph
