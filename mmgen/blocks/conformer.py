"""Conformer encoder blocks (Gulati et al., 2020) on the shared attention, and sinusoidal positions.

torchaudio ships a Conformer, but on its own ``nn.MultiheadAttention``; this one uses mmgen's
:class:`~mmgen.blocks.attention.MultiHeadAttention`, so every task shares one attention implementation (masks,
weights for attention maps). Two departures from the paper, both for batch independence: the convolution module
normalises with LayerNorm instead of BatchNorm, and padded frames are zeroed before the depthwise convolution, so an
utterance encodes the same alone and inside a padded batch. Positions are absolute (sinusoidal, added by the caller)
rather than relative.

Notation: ``b`` batch, ``t`` frames, ``d`` model width.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmgen.blocks.attention import MultiHeadAttention
from mmgen.blocks.transformer import FeedForward

__all__ = ["ConformerBlock", "ConformerStack", "ConvModule", "sinusoidal_positions"]


def sinusoidal_positions(length: int, d_model: int, offset: int = 0, device: torch.device | None = None) -> Tensor:
    """The Transformer's fixed position table (length, d): sin on even, cos on odd features."""
    pos = torch.arange(offset, offset + length, device=device, dtype=torch.float32)[:, None]
    freq = torch.exp(torch.arange(0, d_model, 2, device=device, dtype=torch.float32) * (-math.log(10000.0) / d_model))
    table = torch.zeros(length, d_model, device=device)
    table[:, 0::2] = torch.sin(pos * freq)
    table[:, 1::2] = torch.cos(pos * freq[: d_model // 2])
    return table


class ConvModule(nn.Module):
    """LayerNorm -> pointwise conv (2d) + GLU -> depthwise conv -> LayerNorm -> SiLU -> pointwise conv -> dropout."""

    def __init__(self, d_model: int, kernel_size: int = 15, dropout: float = 0.0, bias: bool = True) -> None:
        super().__init__()
        if kernel_size % 2 == 0:
            raise ValueError(f"conv_kernel_size={kernel_size}; accepted: an odd number (a centred window)")
        self.norm = nn.LayerNorm(d_model, bias=bias)
        self.pointwise_in = nn.Conv1d(d_model, 2 * d_model, 1, bias=bias)
        self.depthwise = nn.Conv1d(d_model, d_model, kernel_size, padding=kernel_size // 2, groups=d_model, bias=bias)
        self.conv_norm = nn.LayerNorm(d_model, bias=bias)
        self.pointwise_out = nn.Conv1d(d_model, d_model, 1, bias=bias)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        """x (b, t, d), mask (b, t) True on real frames -> (b, t, d)."""
        y = F.glu(self.pointwise_in(self.norm(x).transpose(1, 2)), dim=1)  # shape: (b, d, t)
        if mask is not None:
            y = y * mask[:, None, :]
        y = self.depthwise(y).transpose(1, 2)  # shape: (b, t, d)
        y = self.pointwise_out(F.silu(self.conv_norm(y)).transpose(1, 2)).transpose(1, 2)
        return self.drop(y)


class ConformerBlock(nn.Module):
    """Half-step feed-forward, self-attention, convolution module, half-step feed-forward, LayerNorm."""

    def __init__(self, d_model: int, num_heads: int, d_ff: int, kernel_size: int = 15, dropout: float = 0.0,
                 bias: bool = True) -> None:
        super().__init__()
        self.norm_ff1 = nn.LayerNorm(d_model, bias=bias)
        self.ff1 = FeedForward(d_model, d_ff, bias=bias, dropout=dropout, activation="silu")
        self.norm_attn = nn.LayerNorm(d_model, bias=bias)
        self.attn = MultiHeadAttention(d_model, num_heads, bias=bias, dropout=dropout)
        self.conv = ConvModule(d_model, kernel_size, dropout, bias)
        self.norm_ff2 = nn.LayerNorm(d_model, bias=bias)
        self.ff2 = FeedForward(d_model, d_ff, bias=bias, dropout=dropout, activation="silu")
        self.norm_out = nn.LayerNorm(d_model, bias=bias)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor, *, key_padding_mask: Tensor | None = None) -> Tensor:
        x = x + 0.5 * self.ff1(self.norm_ff1(x))
        x = x + self.drop(self.attn(self.norm_attn(x), key_padding_mask=key_padding_mask))
        x = x + self.conv(x, key_padding_mask)
        x = x + 0.5 * self.ff2(self.norm_ff2(x))
        return self.norm_out(x)


class ConformerStack(nn.Module):
    """``num_layers`` Conformer blocks; the same call as an encoder :class:`~mmgen.blocks.TransformerStack`."""

    def __init__(self, num_layers: int, d_model: int, num_heads: int, d_ff: int | None = None, *,
                 kernel_size: int = 15, dropout: float = 0.0, bias: bool = True) -> None:
        super().__init__()
        self.d_model = d_model
        self.blocks = nn.ModuleList(ConformerBlock(d_model, num_heads, d_ff or 4 * d_model, kernel_size, dropout, bias)
                                    for _ in range(num_layers))

    def forward(self, x: Tensor, *, key_padding_mask: Tensor | None = None) -> Tensor:
        for block in self.blocks:
            x = block(x, key_padding_mask=key_padding_mask)
        return x
