"""A decoder stack's incremental step as one C++ call on the CPU (``csrc/decoder_step.cpp``).

:meth:`mmgen.blocks.TransformerStack.step` in PyTorch is some hundred operators per step; at a beam's few rows each
costs its dispatch, not its arithmetic. :class:`NativeDecoder` packs the stack's weights once (matrices transposed,
in the order the C++ loop reads them) and the memory's keys and values once per search, and runs the whole step (all
layers and the final layer norm) in one call on the :class:`~mmgen.blocks.transformer.StepCache`'s buffer of keys and
values. Beams move without copying keys, as in the Triton step (:mod:`mmgen.kernels.decoder_step`): the keys and
values written at position ``p`` by row ``r`` stay in row ``r``'s slot, and ``lineage[p, i]`` says which row's slot
holds hypothesis ``i``'s entry for position ``p``; a reorder gathers that small table instead of copying the filled
positions (at batch 8 about 5 MB a step, through main memory). The PyTorch step is the reference; tests compare the
two.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from mmgen.kernels import per_weights
from mmgen.kernels.native import native_ops

if TYPE_CHECKING:
    from mmgen.blocks.transformer import StepCache, TransformerStack

__all__ = ["NativeDecoder", "native_decoder_unsupported"]

ACTIVATIONS = {nn.GELU: 0, nn.SiLU: 1, nn.ReLU: 2}


def native_decoder_unsupported(stack: TransformerStack, memory: bool) -> str | None:
    """Why the C++ step cannot run ``stack`` (None when it can): float32 weights, heads splitting the model width
    evenly in every attention, one LayerNorm epsilon, a GELU (exact), SiLU or ReLU feed-forward, and a ``memory``
    exactly where the blocks have cross-attention."""
    ref = next(stack.parameters())
    if any((block.cross_attn is not None) != memory for block in stack.blocks):
        return "cross-attention without a memory, or a memory without cross-attention"
    if ref.dtype != torch.float32 or ref.device.type != "cpu":
        return f"weights are {ref.dtype} on {ref.device}, not float32 on the CPU"
    d = stack.d_model
    eps = {stack.norm.eps}
    for block in stack.blocks:
        for a in (block.self_attn, block.cross_attn):
            if a is not None and not (a.num_heads * a.d_head_qk == d == a.num_heads * a.d_head_v
                                      and a.num_heads == block.self_attn.num_heads):
                return "attention widths other than the model width"
        act = block.ff.act
        if type(act) not in ACTIVATIONS or getattr(act, "approximate", "none") != "none":
            return f"activation {act}"
        eps |= {n.eps for n in (block.norm1, block.norm2, getattr(block, "norm_cross", block.norm1))}
    if len(eps) > 1:
        return f"LayerNorms with different eps {sorted(eps)}"
    return None


def _vector(p: nn.Module | None, name: str, width: int, ref: Tensor) -> Tensor:
    value = getattr(p, name, None) if p is not None else None
    return value.reshape(-1) if value is not None else ref.new_zeros(width)


def _pack(stack: TransformerStack) -> Tensor:
    d = stack.d_model
    parts: list[Tensor] = []
    ref = stack.norm.weight

    def norm(n: nn.LayerNorm) -> None:
        parts.extend([n.weight.reshape(-1), _vector(n, "bias", d, ref)])

    def linear(*layers: nn.Linear) -> None:  # stacked outputs, transposed: (in, out)
        parts.append(torch.cat([m.weight for m in layers]).t().reshape(-1))
        parts.append(torch.cat([_vector(m, "bias", m.out_features, ref) for m in layers]))

    for block in stack.blocks:
        a = block.self_attn
        norm(block.norm1)
        linear(a.q_proj, a.k_proj, a.v_proj)
        linear(a.out_proj)
        if block.cross_attn is not None:
            norm(block.norm_cross)
            linear(block.cross_attn.q_proj)
            linear(block.cross_attn.out_proj)
        norm(block.norm2)
        linear(block.ff.fc)
        linear(block.ff.proj)
    norm(stack.norm)
    return torch.cat(parts).contiguous()


class NativeDecoder:
    """The C++ step of ``stack`` for one search: the packed weights (shared by every search while the weights stay
    the same tensors, unchanged) and the memory's keys and values ``memory_kv`` (layers, 2, b, h, t, e), each key
    block (an utterance's head) stored transposed, (e, t)."""

    def __init__(self, stack: TransformerStack, memory_kv: list[tuple[Tensor, Tensor] | None], rows: int,
                 max_len: int) -> None:
        reason = native_decoder_unsupported(stack, bool(memory_kv))
        if reason is not None:
            raise ValueError(f"the C++ decoder step cannot run this stack: {reason}")
        self.weights = per_weights(stack, "_native_pack", _pack)
        first = stack.blocks[0]
        self.heads = first.self_attn.num_heads
        self.d_ff = first.ff.fc.out_features
        self.eps = float(stack.norm.eps)
        self.activation = ACTIVATIONS[type(first.ff.act)]
        # Keys transposed within each (utterance, head): the C++ loop scores all frames as sums of key rows.
        kv = [torch.stack([k.transpose(-2, -1).reshape(k.shape), v]) for k, v in (p for p in memory_kv if p)]
        self.memory_kv = torch.stack(kv).contiguous() if kv else self.weights.new_zeros(0)
        # (max_len, rows): the row whose slot holds each hypothesis's entry for each position; each its own at first.
        self.lineage = torch.arange(rows).expand(max_len, rows).contiguous()
        self.ops = native_ops()

    def reorder(self, index: Tensor, length: int | None) -> None:
        """Hypothesis ``i`` becomes old hypothesis ``index[i]``: only the lineage of the first ``length`` positions
        (all without) moves, not the keys and values."""
        n = self.lineage.shape[0] if length is None else length
        self.lineage[:n] = self.lineage[:n].index_select(1, index)

    def __call__(self, x: Tensor, position: Tensor, cache: StepCache, length: int | None) -> Tensor:
        """x (rows, d) at ``position`` -> (rows, d), as :meth:`TransformerStack.step`; ``length`` None attends to
        the positions up to ``position`` (what the fixed-shape step's mask allows)."""
        alive = cache.memory_alive
        return self.ops.decoder_step(x, position, -1 if length is None else length, cache.kv, self.weights,
                                     self.memory_kv, cache.memory_mask, alive, self.lineage, self.heads, self.d_ff,
                                     self.eps, self.activation, cache.group)
