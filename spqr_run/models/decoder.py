"""One config-driven decoder for the LLaMA family and Falcon.

Architecture differences are flags on `ModelConfig` (norm type, MLP type, parallel residual, shared norm,
number of KV heads, RoPE scaling), not separate files. Module names are the project's canonical weight names:

    embed_tokens.weight                              (vocab, hidden)
    layers.{i}.attn_norm.{weight,bias}               (hidden,)        bias only for LayerNorm
    layers.{i}.mlp_norm.{weight,bias}                (hidden,)        absent when shared_block_norm
    layers.{i}.attn.{q,k,v,o}_proj.{weight,bias}     nn.Linear layout (out, in)
    layers.{i}.mlp.{gate,up,down}_proj.{weight,bias} gate only for gated_silu
    norm.{weight,bias}                               (hidden,)
    lm_head.weight                                   (vocab, hidden)  absent when tie_word_embeddings

Every linear is created by `make_linear` and can be swapped for a quantized module with the same call
(`spqr_run.models.linear.replace_linears`), so this file never changes for a new weight format.

Fused projections (`spqr_run.models.fused.fuse_linears`, done at load time): linears that read the same input
and share one act_order permutation become one linear whose output is split, so the input is gathered and
the weights are streamed in one launch:

    layers.{i}.attn.qkv_proj       q, k, v rows stacked        (q_dim + 2 kv_dim, hidden)
    layers.{i}.mlp.gate_up_proj    gate, up rows stacked       (2 ffn, hidden)          gated_silu only
    layers.{i}.in_proj             q, k, v, [gate,] up stacked (q_dim + 2 kv_dim + ffn, hidden): a parallel
                                   block with one shared norm (Falcon-7B), where attention and MLP read it
The fused members are then None; `Attention.project`, `MLP.project` and `Block.forward` compute either form.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from spqr_run.config import ModelConfig, rope_inv_freq
from spqr_run.models.kv_cache import KVCache
from spqr_run.models.linear import held_linear, make_linear


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def make_norm(cfg: ModelConfig) -> nn.Module:
    if cfg.norm_type == "rms":
        return RMSNorm(cfg.hidden_size, cfg.norm_eps)
    return nn.LayerNorm(cfg.hidden_size, eps=cfg.norm_eps)


class Rotary(nn.Module):
    """RoPE in the rotate-half layout (HF LLaMA/Falcon): pairs are (i, i + head_dim/2)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        inv_freq = torch.tensor(rope_inv_freq(cfg), dtype=torch.float32)  # (hd/2,)
        pos = torch.arange(cfg.max_position_embeddings, dtype=torch.float32)
        angles = torch.outer(pos, inv_freq)  # (max_pos, hd/2)
        self.register_buffer("cos", angles.cos(), persistent=False)
        self.register_buffer("sin", angles.sin(), persistent=False)

    def forward(self, x: Tensor, positions: Tensor) -> Tensor:
        """x: (B, T, H, hd), positions: (B, T) -> rotated x, same shape and dtype."""
        cos = self.cos[positions][:, :, None, :]  # (B, T, 1, hd/2)
        sin = self.sin[positions][:, :, None, :]
        x1, x2 = x.float().chunk(2, dim=-1)  # (B, T, H, hd/2) each
        out = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
        return out.to(x.dtype)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        h = cfg.hidden_size
        self.q_proj = make_linear(h, cfg.q_dim, bias=cfg.attention_bias)
        self.k_proj = make_linear(h, cfg.kv_dim, bias=cfg.attention_bias)
        self.v_proj = make_linear(h, cfg.kv_dim, bias=cfg.attention_bias)
        self.o_proj = make_linear(cfg.q_dim, h, bias=cfg.has_o_bias)
        self.qkv_proj: nn.Module | None = None  # set by `fused.fuse_linears`: q, k, v as one linear
        self.splits = (cfg.q_dim, cfg.kv_dim, cfg.kv_dim)  # output columns of q, k, v in qkv_proj

    def project(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """x (..., hidden) -> q (..., q_dim), k, v (..., kv_dim): one fused call when fused (views of its output)."""
        if self.qkv_proj is not None:
            return self.qkv_proj(x).split(self.splits, dim=-1)  # type: ignore[return-value]
        return self.q_proj(x), self.k_proj(x), self.v_proj(x)

    def forward(
        self,
        x: Tensor,
        rotary: Rotary,
        positions: Tensor,
        mask: Tensor | None,
        cache: KVCache | None,
        rows: Tensor | None,
        kv_len: int | None,
        qkv: tuple[Tensor, ...] | None = None,
    ) -> Tensor:
        """x (B, T, hidden) -> (B, T, hidden); `qkv`: the projections of x when the caller computed them."""
        b, t, _ = x.shape
        q, k, v = self.project(x) if qkv is None else qkv
        q = q.view(b, t, self.num_heads, self.head_dim)  # (B, T, H, hd)
        k = k.view(b, t, self.num_kv_heads, self.head_dim)  # (B, T, KH, hd)
        v = v.view(b, t, self.num_kv_heads, self.head_dim)
        q, k = rotary(q, positions), rotary(k, positions)
        if cache is not None:
            k, v = cache.update(positions, k, v, rows=rows, kv_len=kv_len)  # (B, S, KH, hd)
        q, k, v = (z.transpose(1, 2) for z in (q, k.to(q.dtype), v.to(q.dtype)))  # (B, heads, T|S, hd)
        gqa = self.num_heads != self.num_kv_heads
        if mask is None:  # no cache and a plain causal prefix: let SDPA build the mask
            y = F.scaled_dot_product_attention(q, k, v, is_causal=t > 1, enable_gqa=gqa)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
        y = y.transpose(1, 2).reshape(b, t, self.num_heads * self.head_dim)  # (B, T, H*hd)
        return self.o_proj(y)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.gated = cfg.mlp_type == "gated_silu"
        h, f = cfg.hidden_size, cfg.intermediate_size
        if self.gated:
            self.gate_proj = make_linear(h, f, bias=cfg.mlp_bias)
        self.up_proj = make_linear(h, f, bias=cfg.mlp_bias)
        self.down_proj = make_linear(f, h, bias=cfg.mlp_bias)
        self.gate_up_proj: nn.Module | None = None  # set by `fused.fuse_linears`: gate, up as one linear
        self.splits = (f, f) if self.gated else (f,)  # output columns of [gate,] up

    def project(self, x: Tensor) -> tuple[Tensor, ...]:
        """x (..., hidden) -> ([gate,] up) each (..., ffn): one fused call when fused."""
        if self.gate_up_proj is not None:
            return self.gate_up_proj(x).split(self.splits, dim=-1)
        return (self.gate_proj(x), self.up_proj(x)) if self.gated else (self.up_proj(x),)

    def finish(self, parts: tuple[Tensor, ...]) -> Tensor:
        """([gate,] up) from `project` -> the MLP output (..., hidden)."""
        if self.gated:
            gate, up = parts
            return self.down_proj(F.silu(gate) * up)
        return self.down_proj(F.gelu(parts[0]))

    def forward(self, x: Tensor) -> Tensor:
        return self.finish(self.project(x))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.parallel = cfg.parallel_residual
        self.attn_norm = make_norm(cfg)
        self.mlp_norm = None if cfg.shared_block_norm else make_norm(cfg)
        self.attn = Attention(cfg)
        self.mlp = MLP(cfg)
        # set by `fused.fuse_linears` on a parallel block with one shared norm: q, k, v, [gate,] up as one linear
        self.in_proj: nn.Module | None = None
        self.splits = self.attn.splits + self.mlp.splits

    def forward(self, x: Tensor, rotary: Rotary, positions, mask, cache, rows, kv_len) -> Tensor:
        h = self.attn_norm(x)
        if self.in_proj is not None:  # every projection of h in one call
            parts = self.in_proj(h).split(self.splits, dim=-1)
            a = self.attn(h, rotary, positions, mask, cache, rows, kv_len, qkv=parts[:3])
            return x + a + self.mlp.finish(parts[3:])
        a = self.attn(h, rotary, positions, mask, cache, rows, kv_len)
        if self.parallel:  # Falcon: both branches read the block input
            m = self.mlp(h if self.mlp_norm is None else self.mlp_norm(x))
            return x + a + m
        x = x + a
        return x + self.mlp(self.mlp_norm(x))


class Decoder(nn.Module):
    """Token ids -> next-token logits, with an optional preallocated KV cache per layer."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.num_layers))
        self.norm = make_norm(cfg)
        self.lm_head = None if cfg.tie_word_embeddings else make_linear(cfg.hidden_size, cfg.vocab_size)
        self.rotary = Rotary(cfg)
        self.caches: nn.ModuleList | None = None
        # set by `loading.build_decoder` on a CPU with the native kernels: `forward` runs there, every layer
        # in one call (`spqr_run.cpu.decoder.NativeDecoder`)
        self.native = None

    # ---- KV cache -------------------------------------------------------------------------------
    def setup_caches(
        self, rows: int, max_seq_len: int, *, dtype: torch.dtype | None = None, kind: str | None = None
    ) -> None:
        """Allocate a zeroed KV cache: `rows` sequences of up to `max_seq_len` tokens, stored as `kind`
        ("auto": `kv_cache_dtype`, "int8": see `kv_cache`; None: the current cache's kind, else "auto"). The
        old cache is freed first, or zeroed and kept when it already has that size, so a cache never exists
        twice."""
        cfg = self.config
        if max_seq_len > cfg.max_position_embeddings:
            max_seq_len = cfg.max_position_embeddings
        dtype = dtype or self.kv_cache_dtype
        device = self.device
        if kind is None:
            kind = self.caches[0].kind if self.caches is not None else "auto"
        if self.caches is not None:
            c = self.caches[0]
            if (c.rows, c.max_seq_len, c.kind, c.dtype) == (rows, max_seq_len, kind, dtype):
                for cache in self.caches:  # already this size: reuse the memory, zeroed
                    cache.reset()
                return
        self.caches = None  # free the old cache before allocating the new one
        self.caches = nn.ModuleList(
            KVCache(rows, max_seq_len, cfg.num_kv_heads, cfg.head_dim, dtype=dtype, device=device, kind=kind)
            for _ in range(cfg.num_layers)
        )
        if self.native is not None:
            self.native.bind_caches(self.caches)

    @property
    def device(self) -> torch.device:
        """The device the model computes on."""
        return self.norm.weight.device

    @property
    def kv_cache_dtype(self) -> torch.dtype:
        """What an "auto" KV cache stores: fp16 under the native CPU decoder (attention reads half the bytes
        a step; llama.cpp's default on CPUs too), else the model's dtype."""
        return torch.float16 if self.native is not None else self.dtype

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the model computes in (activations, KV cache): its norms'. Weight matrices may be held
        narrower (fp16 on a CPU, see `loading.build_decoder`)."""
        return self.norm.weight.dtype

    @property
    def batch_invariant(self) -> bool:
        """Whether a row's logits are bit for bit the same whatever else is in the batch and however many
        keys `kv_len` reads: true when the native CPU kernels run the forward (per-row arithmetic, attention
        over keys 0 .. position; `NativeDecoder.batch_invariant`), false for torch's kernels, whose fp32 matmul
        and attention results depend on the number of rows and on the key length."""
        return bool(getattr(self.native, "batch_invariant", False))

    @property
    def max_seq_len(self) -> int:
        return self.caches[0].max_seq_len if self.caches is not None else self.config.max_position_embeddings

    # ---- forward ----------------------------------------------------------------------------------
    def forward(
        self,
        tokens: Tensor,
        positions: Tensor | None = None,
        *,
        rows: Tensor | None = None,
        kv_len: int | None = None,
        use_cache: bool = True,
        last_only: bool = False,
    ) -> Tensor:
        """tokens (B, T) -> logits (B, T, vocab) in fp32 ((B, 1, vocab) with `last_only`).

        positions (B, T): absolute position of each token (default 0..T-1). With a cache (see
        `setup_caches`), keys/values are written at those positions of cache rows `rows` (B,) and attention
        reads the first `kv_len` cached positions (None: all, static shapes), masked causally per row.
        """
        b, t = tokens.shape
        if positions is None:
            positions = torch.arange(t, device=tokens.device).expand(b, t)  # (B, T)
        if self.native is not None:
            return self.native.forward(tokens, positions, rows=rows, use_cache=use_cache, last_only=last_only)
        cached = use_cache and self.caches is not None
        mask = None
        if cached:
            s = self.max_seq_len if kv_len is None else kv_len
            key_pos = torch.arange(s, device=tokens.device)  # (S,)
            mask = (key_pos[None, None, :] <= positions[:, :, None])[:, None]  # (B, 1, T, S)
        x = self.embed_tokens(tokens).to(self.dtype)  # (B, T, hidden)
        for i, layer in enumerate(self.layers):
            cache = self.caches[i] if cached else None
            x = layer(x, self.rotary, positions, mask, cache, rows, kv_len)
        if last_only:
            x = x[:, -1:]
        x = self.norm(x)
        if self.lm_head is not None:
            return self.lm_head(x).float()
        if isinstance(self.embed_tokens, nn.Embedding):
            return held_linear(x, self.embed_tokens.weight).float()
        return self.embed_tokens.head(x)  # a quantized table computes its own tied head (`cpu.embedding`)


def materialize_fp32(
    module: nn.Module, weights: Mapping[str, Tensor], device: torch.device, prefix: str = ""
) -> nn.Module:
    """Give every parameter of `module` (built on the meta device) its tensor `weights[prefix + name]` in fp32 on
    `device`, frozen; returns `module` in eval mode. Used for the quantizer's blocks and the fine-tuning's dense
    models. Raises ValueError naming a missing tensor or one whose shape differs from the parameter's."""
    for name, p in list(module.named_parameters()):
        key = prefix + name
        try:
            w = weights[key]  # (not `key in weights`: a lazy mapping would read the tensor twice)
        except KeyError:
            raise ValueError(f"weight {key} is missing") from None
        if tuple(w.shape) != tuple(p.shape):
            raise ValueError(f"weight {key} has shape {tuple(w.shape)}, expected {tuple(p.shape)}")
        owner, _, attr = name.rpartition(".")
        module.get_submodule(owner)._parameters[attr] = nn.Parameter(
            w.to(device, torch.float32), requires_grad=False
        )
    return module.eval()
