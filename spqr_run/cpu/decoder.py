"""`NativeDecoder`: a built `Decoder` run by the native CPU kernels, every layer in one call.

`Decoder.forward` hands over here when `loading.build_decoder` found the native library: embeddings, norms,
the SpQR linears from their packed bytes (`SpQRLinear.to_native`), dense linears (GGUF / Hugging Face sources
and the FP16 baseline, as held), rotary embedding, the KV-cache write, attention and the LM head all run in
`spqr_cpu_forward` (kernels/cpu/spqr_decoder.c), so a decode step costs one Python call, not dozens per
layer. The C structs point into the modules' own tensors (no copies); `bind_caches` points them at the KV
cache whenever `Decoder.setup_caches` makes one.

Each token's result depends only on its own row (the kernels' arithmetic is per row and attention reads keys
0 .. position), so a sequence decodes bit-identically alone or in any batch (`batch_invariant`).
"""

from __future__ import annotations

import ctypes
import threading
import time

import torch
from torch import Tensor, nn

from spqr_run.cpu import lib as native
from spqr_run.cpu.embedding import Q8Embedding
from spqr_run.cpu.governor import ThreadGovernor
from spqr_run.cpu.weights import NativeWeight, dense_weight


def _ptr(t: Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _f32(t: Tensor | None) -> Tensor | None:
    return None if t is None else t.detach().to(torch.float32).contiguous()


class NativeDecoder:
    """Runs `model`'s forward natively. Build with `NativeDecoder.for_model`, which returns None (with a
    reason from `unsupported`) when some module has no native form."""

    batch_invariant = True  # per-row arithmetic: a row's logits do not depend on the other rows

    def __init__(self, model: nn.Module) -> None:
        cfg = model.config
        self.model_ref = model
        self._keep: list[object] = []  # tensors and NativeWeights the structs point into
        self._lock = threading.Lock()  # the library's scratch memory serves one forward at a time
        self.governor = ThreadGovernor()  # decode steps: the pool, or one thread when that is faster now
        m = native.Model()
        m.hidden, m.ffn, m.n_layers = cfg.hidden_size, cfg.intermediate_size, cfg.num_layers
        m.n_heads, m.n_kv_heads, m.head_dim, m.vocab = (
            cfg.num_heads,
            cfg.num_kv_heads,
            cfg.head_dim,
            cfg.vocab_size,
        )
        m.norm_rms = int(cfg.norm_type == "rms")
        m.mlp_gated = int(cfg.mlp_type == "gated_silu")
        m.parallel = int(cfg.parallel_residual)
        m.norm_eps = cfg.norm_eps
        cos, sin = model.rotary.cos.contiguous(), model.rotary.sin.contiguous()  # (max_pos, hd/2)
        self._keep += [cos, sin]
        m.rope_cos, m.rope_sin, m.rope_max_pos = cos.data_ptr(), sin.data_ptr(), cos.shape[0]
        m.embed = self._embedding(model.embed_tokens)
        m.lm_head = m.embed if model.lm_head is None else self._weight(model.lm_head)
        m.final_norm_w, m.final_norm_b = self._norm(model.norm)
        self.layers = (native.Layer * cfg.num_layers)()
        for i, block in enumerate(model.layers):
            self._layer(self.layers[i], block)
        m.layers = ctypes.cast(self.layers, ctypes.POINTER(native.Layer))
        self.struct = m
        self.bind_caches(model.caches)

    # ---- building -----------------------------------------------------------------------------------
    @staticmethod
    def unsupported(model: nn.Module) -> str | None:
        """Why `model` cannot run natively (one line), or None."""
        from spqr_run.models.linear import Linear
        from spqr_run.models.spqr_linear import SpQRLinear

        if native.load() is None:
            return native.unavailable_reason()
        if model.device.type != "cpu" or model.dtype != torch.float32:
            return "the native kernels run fp32 activations on the CPU"
        for name, mod in model.named_modules():
            if isinstance(mod, SpQRLinear) and mod.native is None:
                return f"{name}: a {mod.meta.method} layer without a CPU layout"
            if isinstance(mod, nn.Linear) and not isinstance(mod, Linear):
                return f"{name}: an unexpected linear type {type(mod).__name__}"
            if isinstance(mod, nn.Linear) and mod.weight.dtype not in (torch.float32, torch.float16):
                return f"{name}: weights held as {mod.weight.dtype}"
        return None

    @classmethod
    def for_model(cls, model: nn.Module) -> NativeDecoder | None:
        return None if cls.unsupported(model) else cls(model)

    def _weight(self, mod: nn.Module) -> native.Weight:
        w: NativeWeight = (
            mod.native if getattr(mod, "native", None) is not None else dense_weight(mod.weight, mod.bias)
        )
        self._keep.append(w)
        return w.struct

    def _embedding(self, emb: nn.Module) -> native.Weight:
        if isinstance(emb, Q8Embedding):
            return emb.native.struct
        w = dense_weight(emb.weight)
        self._keep.append(w)
        return w.struct

    def _norm(self, norm: nn.Module) -> tuple[int | None, int | None]:
        w, b = _f32(norm.weight), _f32(getattr(norm, "bias", None))
        self._keep += [w, b]
        return _ptr(w), _ptr(b)

    def _layer(self, layer: native.Layer, block: nn.Module) -> None:
        layer.attn_norm_w, layer.attn_norm_b = self._norm(block.attn_norm)
        if block.mlp_norm is not None:
            layer.mlp_norm_w, layer.mlp_norm_b = self._norm(block.mlp_norm)
        attn, mlp = block.attn, block.mlp
        if block.in_proj is not None:  # Falcon-7B: one linear for q, k, v, [gate,] up
            parts = [(block.in_proj, 0)]
        else:
            qkv = [attn.qkv_proj] if attn.qkv_proj is not None else [attn.q_proj, attn.k_proj, attn.v_proj]
            if mlp.gate_up_proj is not None:
                ins = [mlp.gate_up_proj]
            else:
                ins = [mlp.gate_proj, mlp.up_proj] if mlp.gated else [mlp.up_proj]
            parts = [(m, 0) for m in qkv] + [(m, 1) for m in ins]
        for i, (mod, src) in enumerate(parts):
            layer.in_proj[i] = self._weight(mod)
            layer.in_proj_src[i] = src
        layer.n_in_proj = len(parts)
        layer.o_proj = self._weight(attn.o_proj)
        layer.down_proj = self._weight(mlp.down_proj)

    # ---- KV cache -------------------------------------------------------------------------------------
    def bind_caches(self, caches: nn.ModuleList | None) -> None:
        """Point every layer at its KV cache (None: forward needs `use_cache=False`)."""
        m = self.struct
        if caches is None:
            m.kv_rows = m.kv_max_seq = 0
            for layer in self.layers:
                layer.k_cache = layer.v_cache = layer.k_scale = layer.v_scale = None
            return
        first = caches[0]
        kinds = {torch.float32: native.KV_F32, torch.float16: native.KV_F16}
        if first.kind == "int8":
            m.kv_kind = native.KV_INT8
        elif first.k.dtype in kinds:
            m.kv_kind = kinds[first.k.dtype]
        else:
            raise ValueError(
                f"the native CPU decoder keeps its KV cache in fp32, fp16 or int8, not {first.k.dtype}"
            )
        m.kv_rows, m.kv_max_seq = first.rows, first.max_seq_len
        for layer, cache in zip(self.layers, caches, strict=True):
            layer.k_cache, layer.v_cache = cache.k.data_ptr(), cache.v.data_ptr()
            layer.k_scale, layer.v_scale = _ptr(cache.k_scale), _ptr(cache.v_scale)

    # ---- running ----------------------------------------------------------------------------------------
    def forward(
        self,
        tokens: Tensor,
        positions: Tensor,
        *,
        rows: Tensor | None = None,
        use_cache: bool = True,
        last_only: bool = False,
    ) -> Tensor:
        """tokens, positions (B, T) int64 -> logits (B, T or 1, vocab) fp32, as `Decoder.forward`.

        With the cache, keys and values are written at `positions` of cache rows `rows` (B,) (None: 0..B-1)
        and each token attends to its row's keys 0 .. its position. Without it (`use_cache=False`), the T
        tokens attend to each other causally in an fp32 cache of their own (no cache rounding). Raises ValueError for a token, position
        or row out of range."""
        lib = native.load()
        assert lib is not None
        b, t = tokens.shape
        tokens = tokens.to(torch.int64).contiguous()
        positions = positions.to(torch.int64).expand(b, t).contiguous()
        rows_t = None if rows is None else rows.to(torch.int64).contiguous()
        out_t = 1 if last_only else t
        logits = torch.empty(b, out_t, self.struct.vocab, dtype=torch.float32)
        cfg = self.model_ref.config
        with self._lock:
            saved = None
            if not use_cache or self.model_ref.caches is None:  # a cache of this call's own, then restored
                saved = (self.struct.kv_kind, self.struct.kv_rows, self.struct.kv_max_seq,
                         [(x.k_cache, x.v_cache, x.k_scale, x.v_scale) for x in self.layers])  # fmt: skip
                seq = int(positions.max()) + 1 if positions.numel() else 1
                shape = (b, seq, cfg.num_kv_heads, cfg.head_dim)
                # fp32: no cache means no cache rounding (as the Python decoder; spqr-eval's default)
                temp = [torch.empty(shape) for _ in range(2 * cfg.num_layers)]
                self.struct.kv_kind, self.struct.kv_rows, self.struct.kv_max_seq = native.KV_F32, b, seq
                for i, layer in enumerate(self.layers):
                    layer.k_cache, layer.v_cache = temp[2 * i].data_ptr(), temp[2 * i + 1].data_ptr()
                rows_t = None
            governed = t == 1 and use_cache and saved is None and lib.spqr_cpu_threads() > 1  # decode steps
            serial = self.governor.choose(b) if governed else False
            lib.spqr_cpu_set_serial(int(serial))
            start = time.perf_counter()
            try:
                rc = lib.spqr_cpu_forward(
                    self.struct, tokens.data_ptr(), positions.data_ptr(), _ptr(rows_t), b, t, int(last_only),
                    logits.data_ptr(),
                )  # fmt: skip
                if governed:
                    self.governor.observe(b, serial, time.perf_counter() - start)
            finally:
                lib.spqr_cpu_set_serial(0)
                if saved is not None:
                    self.struct.kv_kind, self.struct.kv_rows, self.struct.kv_max_seq = saved[:3]
                    for layer, (k, v, ks, vs) in zip(self.layers, saved[3], strict=True):
                        layer.k_cache, layer.v_cache, layer.k_scale, layer.v_scale = k, v, ks, vs
        if rc != 0:
            raise ValueError(
                f"native forward refused its input: a token id outside [0, {cfg.vocab_size}), a position outside "
                f"the KV cache ({self.struct.kv_max_seq}) or a cache row outside [0, {self.struct.kv_rows})"
            )
        return logits
