"""Pre-norm Transformer blocks and stacks (encoder, decoder with optional cross-attention) on the shared attention.

Notation: ``b`` batch, ``s`` target length, ``t`` memory (encoder output) length, ``d`` model width.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmgen.blocks.attention import KVCache, MultiHeadAttention
from mmgen.kernels import triton_usable
from mmgen.kernels.native import native_usable
from mmgen.kernels.native_decoder import NativeDecoder, native_decoder_unsupported

if TYPE_CHECKING:
    from mmgen.kernels.decoder_step import FusedStepCache

__all__ = ["DecoderCache", "FeedForward", "StepCache", "StepLinear", "TransformerBlock", "TransformerStack"]


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

    def reorder(self, index: Tensor) -> None:
        """Beam search: batch row ``i`` becomes old row ``index[i]`` in every layer."""
        for c in self.self_caches:
            c.reorder(index)
        for c in self.cross_caches:
            if c is not None:
                c.reorder(index)

    def reset(self) -> None:
        for c in self.self_caches:
            c.reset()
        for c in self.cross_caches:
            if c is not None:
                c.reset()


def _few_query_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
    """``softmax(q kᵀ / √e) v`` for a few queries per row (decoding steps), every row with an allowed key. On a GPU
    the fused kernels of ``scaled_dot_product_attention`` parallelise over queries, and one query over a few hundred
    keys takes them about 29 µs in float32; the plain formula's two batched products and softmax take 12-14 µs
    (H100: ``benchmarks/step_kernels_probe.py``). On the CPU the fused kernel is the faster one."""
    if not q.is_cuda:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    scores = (q @ k.transpose(-2, -1)) * (q.shape[-1] ** -0.5)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return scores.softmax(dim=-1) @ v


class StepLinear:
    """A projection's weights for decoding steps. On a GPU with more than 8 rows the weight is kept transposed and
    applied with ``addmm``: cuBLAS then picks a kernel about 3x faster than for ``F.linear``'s layout at these sizes
    (32 x 144 -> 432 in float32 on an H100, ``benchmarks/step_kernels_probe.py``); with few rows ``F.linear`` is the
    faster."""

    def __init__(self, weights: list[Tensor], biases: list[Tensor | None], transposed: bool) -> None:
        weight = torch.cat(weights) if len(weights) > 1 else weights[0]
        self.weight = weight.t().contiguous() if transposed else weight
        self.bias = None if biases[0] is None else (torch.cat(biases) if len(biases) > 1 else biases[0])
        self.transposed = transposed

    @classmethod
    def of(cls, *layers: nn.Linear, transposed: bool = False) -> StepLinear:
        """One projection from one or more linear layers (stacked: query, key and value in one product)."""
        return cls([m.weight for m in layers], [m.bias for m in layers], transposed)

    def __call__(self, x: Tensor) -> Tensor:
        if not self.transposed:
            return F.linear(x, self.weight, self.bias)
        return x @ self.weight if self.bias is None else torch.addmm(self.bias, x, self.weight)


class StepCache:
    """Fixed-shape decoding state of a stack for :meth:`TransformerStack.step`: every layer's self-attention keys and
    values in one buffer (so a beam reorder is one copy), the memory's keys and values per layer, and the fused
    query/key/value weights. Nothing in it changes shape while decoding, which lets a step be captured in a CUDA
    graph; build it with :meth:`TransformerStack.step_cache`.

    ``kv`` is (layers, 2, rows, h, max_len, e). The memory is per utterance, (b, h, t, e), shared by the ``group``
    consecutive rows of each (the beams of a beam search). ``linears`` holds each layer's projections by name
    (``qkv``, ``out``, ``cross_q``, ``cross_out``, ``fc``, ``proj``); none when ``native`` runs the step.
    """

    def __init__(self, kv: Tensor, memory_kv: list[tuple[Tensor, Tensor]], memory_mask: Tensor | None,
                 memory_alive: Tensor | None, linears: list[dict[str, StepLinear]], group: int) -> None:
        self.kv = kv
        self.memory_kv = memory_kv
        self.memory_mask = memory_mask
        self.memory_alive = memory_alive
        self.linears = linears
        self.group = group
        self.positions: Tensor | None = None  # a position table for the caller's embedding, if it keeps one here
        self.native: NativeDecoder | None = None  # the C++ step, where it runs (see TransformerStack.step_cache)
        self._spare: Tensor | None = None  # the reorder's second buffer

    @property
    def max_len(self) -> int:
        return self.kv.shape[4]

    def reorder(self, index: Tensor, length: int | None = None) -> None:
        """Row ``i`` becomes old row ``index[i]`` in every layer. The rows are gathered into a second buffer of the
        same shape. With ``length`` (eager steps) only the ``length`` filled positions are gathered and the two
        buffers swap; without it (fixed shapes, CUDA graphs) the whole buffer is gathered and written back, so it
        keeps its address. (Neither allocates per step. Against a fresh copy of the whole cache per step, a 150-step
        CPU search came out 5-10 % faster, within that CPU's noise: ``benchmarks/asr_cpu_step_probe.py``.)"""
        if self.native is not None:  # the C++ step's lineage table moves, not the keys
            self.native.reorder(index, length)
            return
        if self._spare is None:
            self._spare = torch.empty_like(self.kv)
        if length is None:
            torch.index_select(self.kv, 2, index, out=self._spare)
            self.kv.copy_(self._spare)
        else:
            torch.index_select(self.kv[..., :length, :], 2, index, out=self._spare[..., :length, :])
            self.kv, self._spare = self._spare, self.kv


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

    @torch.no_grad()
    def step_cache(self, rows: int, max_len: int, *, memory: Tensor | None = None,
                   memory_mask: Tensor | None = None, transposed: bool | None = None,
                   fused: bool | None = None, native: bool | None = None) -> StepCache | FusedStepCache:
        """A :class:`StepCache` for ``rows`` decoding rows and ``max_len`` positions. ``memory`` (b, t, d_memory),
        with ``rows`` a multiple of b: each utterance's memory serves ``rows // b`` consecutive rows.
        ``transposed``: how :class:`StepLinear` keeps the weights (default: transposed on a GPU for more than 8
        rows). ``fused``: a :class:`~mmgen.kernels.decoder_step.FusedStepCache` instead, whose steps run as one
        Triton kernel (default: on a GPU with Triton, float32 weights, no autocast; ``True`` elsewhere runs the kernel
        in Triton's interpreter, for tests). ``native``: steps of the returned :class:`StepCache` run as one C++ call
        (:class:`~mmgen.kernels.native_decoder.NativeDecoder`; default: on the CPU with float32 weights, no autocast,
        where the kernels build and the stack's shape allows it; ``True`` requires it)."""
        ref = next(self.parameters())
        first = self.blocks[0].self_attn
        if first.d_head_qk != first.d_head_v:
            raise ValueError("step decoding needs equal query/key and value widths per head")
        dtype = ref.dtype
        autocast = torch.is_autocast_enabled(ref.device.type)
        if autocast:  # e.g. validation in a bf16-mixed run: keys come in that dtype
            dtype = torch.get_autocast_dtype(ref.device.type)
        if fused is None:
            fused = triton_usable(ref.device) and ref.dtype == torch.float32 and not autocast
        if fused:
            from mmgen.kernels.decoder_step import FusedStepCache  # imports Triton

            return FusedStepCache(self, rows, max_len, memory, memory_mask, torch.float32)
        kv = torch.zeros(len(self.blocks), 2, rows, first.num_heads, max_len, first.d_head_qk, device=ref.device,
                         dtype=dtype)
        if native is None:
            native = (ref.device.type == "cpu" and dtype == torch.float32 and not autocast
                      and native_decoder_unsupported(self, memory is not None) is None and native_usable())
        transposed = ref.is_cuda and rows > 8 if transposed is None else transposed
        linears = []
        for block in self.blocks if not native else ():  # the C++ step reads its own packed weights
            a, c, ff = block.self_attn, block.cross_attn, block.ff
            layer = {"qkv": StepLinear.of(a.q_proj, a.k_proj, a.v_proj, transposed=transposed),
                     "out": StepLinear.of(a.out_proj, transposed=transposed),
                     "fc": StepLinear.of(ff.fc, transposed=transposed),
                     "proj": StepLinear.of(ff.proj, transposed=transposed)}
            if c is not None:
                layer["cross_q"] = StepLinear.of(c.q_proj, transposed=transposed)
                layer["cross_out"] = StepLinear.of(c.out_proj, transposed=transposed)
            linears.append(layer)
        memory_kv, mask, alive, group = [], None, None, 1
        if memory is not None:
            if rows % memory.shape[0]:
                raise ValueError(f"rows={rows} must be a multiple of the memory's batch {memory.shape[0]}")
            group = rows // memory.shape[0]
            memory_kv = [block.cross_attn.project_kv(memory) if block.cross_attn is not None else None
                         for block in self.blocks]
            if memory_mask is not None and not bool(memory_mask.all()):
                alive = memory_mask.any(dim=1)
                # An utterance with no real frame attends everywhere and its cross-attention output is zeroed, as in
                # MultiHeadAttention.
                mask = (memory_mask | ~alive[:, None])[:, None, None, :]  # shape: (b, 1, 1, t)
                alive = None if bool(alive.all()) else alive.repeat_interleave(group)[:, None].to(ref.dtype)
        cache = StepCache(kv, memory_kv, mask, alive, linears, group)
        if native:
            cache.native = NativeDecoder(self, memory_kv, rows, max_len)
        return cache

    def step(self, x: Tensor, position: Tensor, cache: StepCache, length: int | None = None) -> Tensor:
        """Incremental decoding, one new position per row, in inference: x (rows, d) at ``position`` (a 1-element
        long tensor on the device) -> (rows, d), the same as :meth:`forward` with a :class:`DecoderCache`.

        With ``length`` (the positions filled after this one, a host integer) attention reads that many cached
        positions; without it, the whole buffer under a mask up to ``position``, so every shape is fixed and the
        step can be captured in a CUDA graph. Written beside :meth:`forward` rather than through it for speed: a
        decoding step is a few dozen tiny operations, so here the query/key/value projections are one matrix
        product, all layers' caches are one buffer, and no module call or mask logic runs per layer; attention over
        a few queries takes the faster of two forms per device (:func:`_few_query_attention`). Tests check this step
        against :meth:`forward`.
        """
        if not isinstance(cache, StepCache):  # a FusedStepCache: the whole step is one kernel
            from mmgen.kernels.decoder_step import fused_decoder_step

            return fused_decoder_step(x, position, cache)
        if cache.native is not None:
            return cache.native(x, position, cache, length)
        rows, d = x.shape
        group = cache.group
        self_mask = None
        if length is None:
            length = cache.max_len
            self_mask = (torch.arange(length, device=x.device) <= position)[None, :]  # shape: (1, max_len)
        for i, block in enumerate(self.blocks):
            a = block.self_attn
            heads, e = a.num_heads, a.d_head_qk
            h = F.layer_norm(x, (d,), block.norm1.weight, block.norm1.bias, block.norm1.eps)
            lin = cache.linears[i]
            qkv = lin["qkv"](h).view(rows, 3, heads, 1, e)
            cache.kv[i].index_copy_(3, position, qkv[:, 1:].transpose(0, 1).to(cache.kv.dtype))
            keys, values = cache.kv[i, 0, :, :, :length], cache.kv[i, 1, :, :, :length]
            out = _few_query_attention(qkv[:, 0], keys, values, self_mask)  # shape: (rows, h, 1, e)
            x = x + lin["out"](out.view(rows, heads * e))
            c = block.cross_attn
            if c is not None and cache.memory_kv:
                h = F.layer_norm(x, (d,), block.norm_cross.weight, block.norm_cross.bias, block.norm_cross.eps)
                # The rows of an utterance are the queries of one attention over its memory.
                q = lin["cross_q"](h).view(rows // group, group, c.num_heads, c.d_head_qk)
                mk, mv = cache.memory_kv[i]
                out = _few_query_attention(q.transpose(1, 2), mk, mv, cache.memory_mask)
                out = out.transpose(1, 2).reshape(rows, c.num_heads * c.d_head_v)
                if cache.memory_alive is not None:
                    out = out * cache.memory_alive
                x = x + lin["cross_out"](out)
            ff = block.ff
            h = F.layer_norm(x, (d,), block.norm2.weight, block.norm2.bias, block.norm2.eps)
            x = x + lin["proj"](ff.act(lin["fc"](h)))
        return F.layer_norm(x, (d,), self.norm.weight, self.norm.bias, self.norm.eps)

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
