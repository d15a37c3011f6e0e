"""Multi-head scaled dot-product attention shared by every task, with masks and a preallocated KV cache.

Notation: ``b`` batch, ``s`` query length, ``t`` key length, ``d`` model width, ``h`` heads,
``e`` per-head query/key width, ``f`` per-head value width.

Mask polarity, stated once for the whole package: a boolean mask is SDPA's, ``True`` means *may attend*.
A ``key_padding_mask`` of shape (b, t) is ``True`` on real tokens and ``False`` on padding.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["KVCache", "MultiHeadAttention", "combine_masks"]


class KVCache:
    """Preallocated keys and values of one attention layer for incremental decoding.

    Buffers have a fixed shape (b, h, max_len, e|f), so memory is taken once; ``length`` says how much is filled.
    A cross-attention cache is filled once from the encoder output (``static=True``) and never grows.
    """

    def __init__(self, batch: int, heads: int, max_len: int, d_key: int, d_value: int,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        self.k = torch.zeros(batch, heads, max_len, d_key, device=device, dtype=dtype)
        self.v = torch.zeros(batch, heads, max_len, d_value, device=device, dtype=dtype)
        self.length = 0
        self.static = False
        self.key_padding_mask: Tensor | None = None  # (b, t) for static (cross) caches

    @property
    def max_len(self) -> int:
        return self.k.shape[2]

    def append(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Write ``k`` (b, h, s, e) and ``v`` (b, h, s, f) after what is stored; return all keys and values so far."""
        s = k.shape[2]
        end = self.length + s
        if end > self.max_len:
            raise ValueError(f"KV cache overflow: {end} positions requested, cache holds {self.max_len}")
        self.k[:, :, self.length:end] = k
        self.v[:, :, self.length:end] = v
        self.length = end
        return self.k[:, :, :end], self.v[:, :, :end]

    def fill(self, k: Tensor, v: Tensor, key_padding_mask: Tensor | None = None) -> None:
        """Store the keys and values of an encoder output once (cross-attention)."""
        self.length = 0
        self.append(k, v)
        self.static = True
        self.key_padding_mask = key_padding_mask

    def reorder(self, index: Tensor) -> None:
        """Select batch rows (beam search): row ``i`` becomes old row ``index[i]``."""
        self.k = self.k.index_select(0, index)
        self.v = self.v.index_select(0, index)
        if self.key_padding_mask is not None:
            self.key_padding_mask = self.key_padding_mask.index_select(0, index)

    def reset(self) -> None:
        self.length = 0
        self.static = False
        self.key_padding_mask = None


def combine_masks(key_padding_mask: Tensor | None, attn_mask: Tensor | None) -> Tensor | None:
    """Merge a (b, t) key padding mask and a (s, t) or (b, 1|h, s, t) mask into one broadcastable boolean mask."""
    mask = None
    if key_padding_mask is not None:
        mask = key_padding_mask[:, None, None, :].bool()  # shape: (b, 1, 1, t)
    if attn_mask is not None:
        m = attn_mask.bool()
        mask = m if mask is None else mask & m
    return mask


class MultiHeadAttention(nn.Module):
    """Multi-head attention ``softmax(Q Kᵀ / √e) V`` on :func:`torch.nn.functional.scaled_dot_product_attention`.

    Self-, cross- and causal attention in one module. q, k, v and the output are separate projections, so a caller
    can wrap each in spectral norm, and the query/key width may differ from the value width (SAGAN uses d/8).
    Positions are the caller's business.

    Args:
        d_model: width of the query input and, by default, of the output.
        num_heads: number of heads; ``d_qk`` and ``d_v`` must divide by it.
        d_context: width of the key/value input (cross-attention); defaults to ``d_model``.
        d_qk: total query/key width over all heads; defaults to ``d_model``.
        d_v: total value width over all heads; defaults to ``d_model``.
        d_out: output width; defaults to ``d_model``.
        bias: whether the projections have biases.
        dropout: dropout on attention weights, in training only.
    """

    def __init__(self, d_model: int, num_heads: int, *, d_context: int | None = None, d_qk: int | None = None,
                 d_v: int | None = None, d_out: int | None = None, bias: bool = False, dropout: float = 0.0) -> None:
        super().__init__()
        d_context = d_context or d_model
        d_qk = d_qk or d_model
        d_v = d_v or d_model
        d_out = d_out or d_model
        if d_qk % num_heads or d_v % num_heads:
            raise ValueError(f"d_qk={d_qk} and d_v={d_v} must be divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.d_head_qk = d_qk // num_heads
        self.d_head_v = d_v // num_heads
        self.dropout = dropout
        self.q_proj = nn.Linear(d_model, d_qk, bias=bias)
        self.k_proj = nn.Linear(d_context, d_qk, bias=bias)
        self.v_proj = nn.Linear(d_context, d_v, bias=bias)
        self.out_proj = nn.Linear(d_v, d_out, bias=bias)

    def _split(self, x: Tensor, d_head: int) -> Tensor:
        b, s, _ = x.shape
        return x.view(b, s, self.num_heads, d_head).transpose(1, 2)  # shape: (b, h, s, e)

    def project_kv(self, context: Tensor) -> tuple[Tensor, Tensor]:
        """Keys (b, h, t, e) and values (b, h, t, f) of a context (b, t, d_context); cross caches store these."""
        return self._split(self.k_proj(context), self.d_head_qk), self._split(self.v_proj(context), self.d_head_v)

    def forward(self, x: Tensor, context: Tensor | None = None, *, key_padding_mask: Tensor | None = None,
                attn_mask: Tensor | None = None, causal: bool = False, cache: KVCache | None = None,
                need_weights: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        """Attend from ``x`` to ``context`` (or to ``x`` itself).

        Args:
            x: queries' input (b, s, d_model).
            context: keys'/values' input (b, t, d_context); ``None`` for self-attention.
            key_padding_mask: (b, t), True on real keys. For a cached self-attention layer, it covers every position
                stored so far plus the new ones.
            attn_mask: boolean (s, t) or (b, 1|h, s, t), True where attention is allowed.
            causal: query ``i`` attends only to keys ``<= i`` (offset by what the cache already holds).
            cache: a :class:`KVCache`; a self-attention cache grows by ``s``; a filled cross cache is read as is.
            need_weights: also return the attention weights (b, h, s, t), computed by the plain formula.

        Returns:
            (b, s, d_out), and the weights when ``need_weights``.
        """
        q = self._split(self.q_proj(x), self.d_head_qk)  # shape: (b, h, s, e)
        offset = 0
        if cache is not None and cache.static:
            k, v = cache.k[:, :, :cache.length], cache.v[:, :, :cache.length]
            if key_padding_mask is None:
                key_padding_mask = cache.key_padding_mask
        else:
            k, v = self.project_kv(x if context is None else context)
            if cache is not None:
                offset = cache.length
                k, v = cache.append(k, v)
        s, t = q.shape[2], k.shape[2]
        mask = combine_masks(key_padding_mask, attn_mask)
        use_causal_kernel = causal and mask is None and offset == 0 and s == t
        # One new query after a cache sits at the last position: every stored key is in its past.
        needs_causal_mask = causal and not use_causal_kernel and not (s == 1 and offset == t - 1)
        if needs_causal_mask:
            # Query i sits at absolute position offset + i; it may see keys up to there.
            allowed = torch.arange(t, device=x.device)[None, :] <= (torch.arange(s, device=x.device)[:, None] + offset)
            mask = allowed if mask is None else mask & allowed
        alive = None
        if mask is not None:
            # A row with no allowed key would give NaN; let it attend everywhere, then zero its output (and gradient).
            alive = mask.any(dim=-1, keepdim=True)  # shape: (b|1, 1|h, s, 1)
            mask = mask | ~alive
        dropout = self.dropout if self.training else 0.0
        if need_weights:
            scores = (q @ k.transpose(-2, -1)) / math.sqrt(self.d_head_qk)  # shape: (b, h, s, t)
            if use_causal_kernel:
                scores = scores.masked_fill(~torch.ones(s, t, dtype=torch.bool, device=x.device).tril(), float("-inf"))
            elif mask is not None:
                scores = scores.masked_fill(~mask, float("-inf"))
            weights = scores.softmax(dim=-1)
            if alive is not None:
                weights = weights * alive
            out = F.dropout(weights, dropout, self.training) @ v
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout,
                                                 is_causal=use_causal_kernel)
            if alive is not None:
                out = out * alive
        b = x.shape[0]
        out = out.transpose(1, 2).reshape(b, s, self.num_heads * self.d_head_v)  # shape: (b, s, h*f)
        out = self.out_proj(out)
        return (out, weights) if need_weights else out
