"""Shared attention blocks: one multi-head attention, Transformer and Conformer blocks and stacks."""

from mmgen.blocks.attention import KVCache, MultiHeadAttention, combine_masks
from mmgen.blocks.conformer import ConformerBlock, ConformerStack, ConvModule, sinusoidal_positions
from mmgen.blocks.transformer import (DecoderCache, FeedForward, StepCache, StepLinear, TransformerBlock,
                                     TransformerStack)

__all__ = ["ConformerBlock", "ConformerStack", "ConvModule", "DecoderCache", "FeedForward", "KVCache",
           "MultiHeadAttention", "StepCache", "StepLinear", "TransformerBlock", "TransformerStack", "combine_masks",
           "sinusoidal_positions"]
