"""Pre-norm Transformer blocks and stacks (encoder, decoder with optional cross-attention) on the shared attention.

Notation: ``b`` batch, ``s`` target length, ``t`` memory (encoder output) length, ``d`` model width.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from mmgen.blocks.attention import KVCache, MultiHeadAttention

__all__ = ["DecoderCache", "FeedForward", "TransformerBlock", "TransformerStack"]


class FeedForward(nn.Module):
    """Position-wise MLP ``d -> d_ff -> d`` with GELU (or SiLU, the Conformer's Swish)."""

    def __init__(self, d_model: int, d_ff: int, bias: bool = False, dropout: float = 0.0,
                 activation: str = "gelu") -> None:
        super().__init__()
        acts = {"gelu": nn.GELU, "silu": nn.SiLU, "relu": nn.ReLU}
        if activation not in acts:
            raise ValueError(f"activation={activation!r}; accepted: {', '.join(acts)}")
        self.fc = nn.Linear(d_model, d_ff, bias=bias)
        self.act = acts[activation]()
        self.proj = nn.Linear(d_ff, d_model, bias=bias)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.drop(self.proj(self.act(self.fc(x))))


class TransformerBlock(nn.Module):
    """One pre-norm block: self-attention, optional cross-attention, feed-forward, each ``x + f(norm(x))``."""

    def __init__(self, d_model: int, num_heads: int, d_ff: int, *, cross_attention: bool = False,
                 d_memory: int | None = None, bias: bool = False, dropout: float = 0.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(d_model, bias=bias)
        self.self_attn = MultiHeadAttention(d_model, num_heads, bias=bias, dropout=dropout)
        self.cross_attn = None
        if cross_attention:
            self.norm_cross = nn.LayerNorm(d_model, bias=bias)
            self.cross_attn = MultiHeadAttention(d_model, num_heads, d_context=d_memory, bias=bias, dropout=dropout)
        self.norm2 = nn.LayerNorm(d_model, bias=bias)
        self.ff = FeedForward(d_model, d_ff, bias=bias, dropout=dropout)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor, *, key_padding_mask: Tensor | None = None, causal: bool = False,
                memory: Tensor | None = None, memory_mask: Tensor | None = None,
                self_cache: KVCache | None = None, cross_cache: KVCache | None = None) -> Tensor:
        """x (b, s, d) -> (b, s, d). ``memory`` (b, t, d_memory) with ``memory_mask`` (b, t), True on real frames."""
        x = x + self.drop(self.self_attn(self.norm1(x), key_padding_mask=key_padding_mask, causal=causal,
                                         cache=self_cache))
        if self.cross_attn is not None:
            if memory is None and (cross_cache is None or not cross_cache.static):
                raise ValueError("this block has cross-attention: pass `memory` or a filled cross cache")
            x = x + self.drop(self.cross_attn(self.norm_cross(x), memory, key_padding_mask=memory_mask,
                                              cache=cross_cache))
        return x + self.ff(self.norm2(x))


class DecoderCache:
    """The KV caches of every layer of a stack: self-attention caches grow, cross-attention ones are filled once."""

    def __init__(self, self_caches: list[KVCache], cross_caches: list[KVCache | None]) -> None:
        self.self_caches = self_caches
        self.cross_caches = cross_caches

    @property
    def length(self) -> int:
        return self.self_caches[0].length

    @property
    def max_len(self) -> int:
        return self.self_caches[0].max_len

    def reorder(self, index: Tensor, memory: bool = True) -> None:
        """Beam search: batch row ``i`` becomes old row ``index[i]`` in every layer. ``memory=False`` leaves the
        cross-attention caches as they are, for a reorder that keeps each row's memory (beams of one utterance,
        which share it): the encoder's keys and values are then not copied at every step."""
        for c in self.self_caches:
            c.reorder(index)
        if memory:
            for c in self.cross_caches:
                if c is not None:
                    c.reorder(index)

    def reset(self) -> None:
        for c in self.self_caches:
            c.reset()
        for c in self.cross_caches:
            if c is not None:
                c.reset()


class TransformerStack(nn.Module):
    """``num_layers`` pre-norm blocks and a final LayerNorm: an encoder (``causal=False``) or a decoder.

    Args:
        num_layers: number of blocks.
        d_model: model width.
        num_heads: attention heads per block.
        d_ff: feed-forward width; defaults to ``4 * d_model``.
        causal: causal self-attention (decoder).
        cross_attention: add cross-attention to a memory in every block (encoder-decoder).
        d_memory: memory width; defaults to ``d_model``.
        bias: biases in linear layers and LayerNorms.
        dropout: dropout on attention weights and residual branches.
    """

    def __init__(self, num_layers: int, d_model: int, num_heads: int, d_ff: int | None = None, *,
                 causal: bool = False, cross_attention: bool = False, d_memory: int | None = None,
                 bias: bool = False, dropout: float = 0.0) -> None:
        super().__init__()
        self.causal = causal
        self.d_model = d_model
        self.blocks = nn.ModuleList(
            TransformerBlock(d_model, num_heads, d_ff or 4 * d_model, cross_attention=cross_attention,
                             d_memory=d_memory, bias=bias, dropout=dropout) for _ in range(num_layers))
        self.norm = nn.LayerNorm(d_model, bias=bias)
        self._compiled_blocks: list[nn.Module] | None = None
        self.reset_parameters()

    def compile_blocks(self, **compile_kwargs) -> None:
        """Regional compilation: ``torch.compile`` each block rather than the whole network. The blocks share their
        code, so one block's graph is compiled once and reused by the others, which cuts cold-start compilation.
        The compiled blocks run where gradients are on and there is no cache (training); evaluation and
        incremental decoding keep the eager blocks, whose shapes change from call to call."""
        self._compiled_blocks = [torch.compile(b, **compile_kwargs) for b in self.blocks]

    def reset_parameters(self) -> None:
        """GPT-2 initialisation: N(0, 0.02), residual output projections scaled by 1/sqrt(2 * num_layers)."""
        for name, p in self.named_parameters():
            if p.dim() == 2:
                std = 0.02
                if name.endswith("out_proj.weight") or name.endswith("ff.proj.weight"):
                    std = 0.02 / math.sqrt(2 * len(self.blocks))
                nn.init.normal_(p, mean=0.0, std=std)
            elif name.endswith("bias"):
                nn.init.zeros_(p)

    def forward(self, x: Tensor, *, key_padding_mask: Tensor | None = None, memory: Tensor | None = None,
                memory_mask: Tensor | None = None, cache: DecoderCache | None = None) -> Tensor:
        """x (b, s, d) -> (b, s, d).

        Args:
            x: input tokens.
            key_padding_mask: (b, s) True on real tokens; with a cache, (b, cached + s).
            memory: encoder output (b, t, d_memory) for cross-attention.
            memory_mask: (b, t) True on real memory frames.
            cache: from :meth:`make_cache`; decoding appends ``s`` positions to it.
        """
        blocks = self.blocks
        if self._compiled_blocks is not None and cache is None and torch.is_grad_enabled():
            blocks = self._compiled_blocks
        for i, block in enumerate(blocks):
            x = block(x, key_padding_mask=key_padding_mask, causal=self.causal, memory=memory,
                      memory_mask=memory_mask,
                      self_cache=None if cache is None else cache.self_caches[i],
                      cross_cache=None if cache is None else cache.cross_caches[i])
        return self.norm(x)

    def make_cache(self, batch: int, max_len: int, *, memory: Tensor | None = None,
                   memory_mask: Tensor | None = None, device: torch.device | None = None,
                   dtype: torch.dtype | None = None) -> DecoderCache:
        """Preallocate self-attention caches for ``max_len`` positions; with ``memory``, compute each layer's
        cross-attention keys and values once."""
        ref = next(self.parameters())
        device = device or ref.device
        dtype = dtype or ref.dtype
        self_caches, cross_caches = [], []
        for block in self.blocks:
            a = block.self_attn
            self_caches.append(KVCache(batch, a.num_heads, max_len, a.d_head_qk, a.d_head_v, device, dtype))
            c = block.cross_attn
            if c is None or memory is None:
                cross_caches.append(None)
                continue
            k, v = c.project_kv(memory)
            cache = KVCache(batch, c.num_heads, k.shape[2], c.d_head_qk, c.d_head_v, device, k.dtype)
            cache.fill(k, v, memory_mask)
            cross_caches.append(cache)
        return DecoderCache(self_caches, cross_caches)
