"""Shared attention blocks: one multi-head attention, Transformer blocks and stacks."""

from mmgen.blocks.attention import KVCache, MultiHeadAttention, combine_masks
from mmgen.blocks.transformer import DecoderCache, FeedForward, TransformerBlock, TransformerStack

__all__ = ["DecoderCache", "FeedForward", "KVCache", "MultiHeadAttention", "TransformerBlock", "TransformerStack",
           "combine_masks"]
