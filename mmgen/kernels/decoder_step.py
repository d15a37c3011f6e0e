"""One decoding step of a whole pre-norm Transformer decoder stack in a few Triton kernels.

:meth:`mmgen.blocks.TransformerStack.step` in PyTorch is a few dozen tiny kernels per layer (layer norms, a dozen
matrix-vector products, the attention's scores, softmax and sums, residual adds): in a CUDA graph each costs a
couple of microseconds whatever its size, so a 4-layer step costs ~100 launches' worth of time for a few hundred
thousand multiply-adds. Here each layer is three kernels (self-attention by row and head, cross-attention by row and
head, the feed-forward by row and block of its hidden layer), plus one for the final layer norm; each head or block
projects its own share of the output, and the next kernel sums those partial rows. Hand-written because no maintained
library fuses a whole decoder step with a beam's cache; the PyTorch step is the reference, and tests compare the two
(under Triton's interpreter on a CPU).

Beams move without copying keys: the keys and values written at position ``p`` by row ``r`` stay in row ``r``'s slot
of the cache, and ``lineage[p, i]`` says which row's slot holds hypothesis ``i``'s entry for position ``p``. A beam
reorder only gathers that small table (:class:`FusedStepCache.reorder`).

Notation: ``rows`` decoding rows, ``b`` utterances (``group = rows // b`` rows each), ``h`` heads, ``e`` head width,
``d`` model width, ``f`` feed-forward width, ``L`` positions, ``t`` memory frames.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from mmgen.kernels import interpreted, per_weights, pow2

import triton
import triton.language as tl

__all__ = ["FusedStepCache", "fused_decoder_step"]

ACTIVATIONS = {"GELU": 0, "SiLU": 1, "ReLU": 2}


@triton.jit
def _layer_norm(x, w_ptr, b_ptr, od, md, D: tl.constexpr, eps, HAS_BIAS: tl.constexpr):
    mean = tl.sum(x, 0) / D
    xc = tl.where(md, x - mean, 0.0)
    var = tl.sum(xc * xc, 0) / D
    y = xc * (1.0 / tl.sqrt(var + eps)) * tl.load(w_ptr + od, mask=md, other=0.0)
    if HAS_BIAS:
        y += tl.load(b_ptr + od, mask=md, other=0.0)
    return y


@triton.jit
def _rows_times(w_ptr, first, count, h, od, md, on, D: tl.constexpr):
    """W[first:first + count] @ h for a row-major W of width D: (BN,) with zeros past ``count``."""
    mn = on < count
    w = tl.load(w_ptr + (first + on)[:, None] * D + od[None, :], mask=mn[:, None] & md[None, :], other=0.0)
    return tl.sum(w * h[None, :], 1)


@triton.jit
def _cols_tile(w_ptr, first, count, od, md, on, WIDTH: tl.constexpr):
    """W[:, first:first + count] of a row-major W of width WIDTH, as a (BD, BN) tile (loaded early, used late)."""
    return tl.load(w_ptr + od[:, None] * WIDTH + (first + on)[None, :], mask=md[:, None] & (on < count)[None, :],
                   other=0.0)


@triton.jit
def _cols_times(w_ptr, first, count, v, od, md, on, WIDTH: tl.constexpr):
    """W[:, first:first + count] @ v for a row-major W of D rows and width WIDTH: (BD,)."""
    return tl.sum(_cols_tile(w_ptr, first, count, od, md, on, WIDTH) * v[None, :], 1)


@triton.jit
def _bias(b_ptr, first, offs, mask, HAS_BIAS: tl.constexpr):
    if HAS_BIAS:
        return tl.load(b_ptr + first + offs, mask=mask, other=0.0)
    else:
        return tl.zeros(offs.shape, tl.float32)


@triton.jit
def _sum_parts(parts_ptr, row, od, md, N: tl.constexpr, ROWS: tl.constexpr, D: tl.constexpr):
    """The sum of ``N`` partial rows (N, rows, D) of ``row``."""
    y = tl.zeros(od.shape, tl.float32)
    for i in tl.static_range(N):
        y += tl.load(parts_ptr + (i * ROWS + row) * D + od, mask=md, other=0.0)
    return y


@triton.jit
def _residual(base_ptr, parts_ptr, pbias_ptr, row, od, md, NPARTS: tl.constexpr, ROWS: tl.constexpr,
              D: tl.constexpr, HAS_PBIAS: tl.constexpr):
    """The residual stream of ``row``: a base plus the feed-forward's partial outputs (and their bias)."""
    x = tl.load(base_ptr + row * D + od, mask=md, other=0.0).to(tl.float32)
    x += _sum_parts(parts_ptr, row, od, md, NPARTS, ROWS, D) + _bias(pbias_ptr, 0, od, md, HAS_PBIAS)
    return x


@triton.jit
def _attend_block(q, kt, vt, valid, m, s_sum, acc):
    """One block of keys (n, e) and values (n, e), ``valid`` (n,), folded into an online softmax: the running
    maximum ``m``, sum ``s_sum`` and weighted values ``acc`` (e,)."""
    s = tl.where(valid, tl.sum(kt * q[None, :], 1), float("-inf"))
    m_new = tl.maximum(m, tl.max(s, 0))
    alpha = tl.exp(m - m_new)
    pr = tl.exp(s - m_new)
    return m_new, s_sum * alpha + tl.sum(pr, 0), acc * alpha + tl.sum(pr[:, None] * vt, 0)


@triton.jit
def _self_attention_kernel(
        base_ptr, parts_ptr, pbias_ptr, xa_ptr, attn_ptr, pos_ptr, kv_ptr, lineage_ptr,
        ln_w, ln_b, qkv_w, qkv_b, o_w, eps, scale,
        NPARTS: tl.constexpr, HAS_PBIAS: tl.constexpr, ROWS: tl.constexpr, D: tl.constexpr, H: tl.constexpr,
        E: tl.constexpr, L: tl.constexpr, BD: tl.constexpr, BE: tl.constexpr, BL: tl.constexpr,
        HAS_BIAS: tl.constexpr):
    """Program (row, head): the layer's input (stored once for the next kernel's residual), its layer norm, the
    head's query, key and value (the key and value written at the position), attention over positions 0..p, and the
    head's share of the output projection, W_o[:, head] @ out, a partial row (h, rows, d) that the next kernel sums."""
    row = tl.program_id(0)
    hd = tl.program_id(1)
    p = tl.load(pos_ptr).to(tl.int32)
    od = tl.arange(0, BD)
    md = od < D
    oe = tl.arange(0, BE)
    me = oe < E
    ol = tl.arange(0, BL)
    w_out = _cols_tile(o_w, hd * E, E, od, md, oe, D)  # independent of everything before its use: loaded first
    x = _residual(base_ptr, parts_ptr, pbias_ptr, row, od, md, NPARTS, ROWS, D, HAS_PBIAS)
    if hd == 0:
        tl.store(xa_ptr + row * D + od, x, mask=md)
        tl.store(lineage_ptr + p * ROWS + row, row)  # this row's slot holds its own entry for position p
    h = _layer_norm(x, ln_w, ln_b, od, md, D, eps, HAS_BIAS)
    q = _rows_times(qkv_w, hd * E, E, h, od, md, oe, D) + _bias(qkv_b, hd * E, oe, me, HAS_BIAS)
    k = _rows_times(qkv_w, D + hd * E, E, h, od, md, oe, D) + _bias(qkv_b, D + hd * E, oe, me, HAS_BIAS)
    v = _rows_times(qkv_w, 2 * D + hd * E, E, h, od, md, oe, D) + _bias(qkv_b, 2 * D + hd * E, oe, me, HAS_BIAS)
    k_base = kv_ptr  # this layer's keys: (rows, h, L, e); its values follow them
    v_base = kv_ptr + ROWS * H * L * E
    slot = ((row * H + hd) * L + p) * E + oe
    tl.store(k_base + slot, k.to(kv_ptr.dtype.element_ty), mask=me)
    tl.store(v_base + slot, v.to(kv_ptr.dtype.element_ty), mask=me)
    q = q * scale
    m = tl.sum(q * k, 0)  # running max, starting from the new position's score (read from registers)
    s_sum = m * 0.0 + 1.0
    acc = v
    # A fixed trip count with the blocks past p skipped: p lives on the device (CUDA graphs), and Triton's
    # interpreter cannot loop to a loaded bound.
    for start in range(0, L, BL):
        if start < p:
            pos = start + ol
            mp = pos < p
            src = tl.load(lineage_ptr + pos * ROWS + row, mask=mp, other=0)
            at = ((src[:, None] * H + hd) * L + pos[:, None]) * E + oe[None, :]
            mk = mp[:, None] & me[None, :]
            kt = tl.load(k_base + at, mask=mk, other=0.0).to(tl.float32)
            vt = tl.load(v_base + at, mask=mk, other=0.0).to(tl.float32)
            m, s_sum, acc = _attend_block(q, kt, vt, mp, m, s_sum, acc)
    tl.store(attn_ptr + (hd * ROWS + row) * D + od, tl.sum(w_out * (acc / s_sum)[None, :], 1), mask=md)


@triton.jit
def _cross_attention_kernel(
        xa_ptr, attn_ptr, xb_ptr, cross_ptr, mem_ptr, mem_mask_ptr, mem_len,
        o_b, ln_w, ln_b, cq_w, cq_b, co_w, eps, scale,
        ROWS: tl.constexpr, GROUP: tl.constexpr, D: tl.constexpr, H: tl.constexpr, E: tl.constexpr,
        BD: tl.constexpr, BE: tl.constexpr, BT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_MASK: tl.constexpr,
        CROSS: tl.constexpr, T_STATIC: tl.constexpr):
    """Program (row, head): the residual after self-attention (stored once), then the head's cross-attention over
    the row's utterance memory (b, h, t, e) with an online softmax over blocks of frames, and its share of the output
    projection (a partial row, as in the self-attention kernel)."""
    row = tl.program_id(0)
    hd = tl.program_id(1)
    utt = row // GROUP
    od = tl.arange(0, BD)
    md = od < D
    oe = tl.arange(0, BE)
    me = oe < E
    ot = tl.arange(0, BT)
    x = (tl.load(xa_ptr + row * D + od, mask=md, other=0.0) + _sum_parts(attn_ptr, row, od, md, H, ROWS, D)
         + _bias(o_b, 0, od, md, HAS_BIAS))
    if hd == 0:
        tl.store(xb_ptr + row * D + od, x, mask=md)
    if CROSS:
        w_out = _cols_tile(co_w, hd * E, E, od, md, oe, D)
        h = _layer_norm(x, ln_w, ln_b, od, md, D, eps, HAS_BIAS)
        q = (_rows_times(cq_w, hd * E, E, h, od, md, oe, D) + _bias(cq_b, hd * E, oe, me, HAS_BIAS)) * scale
        mk_base = mem_ptr + (utt * H + hd) * mem_len * E  # this layer's memory keys (b, h, t, e); values follow
        mv_base = mk_base + (ROWS // GROUP) * H * mem_len * E
        m = tl.sum(q * 0.0, 0) - 1e30
        s_sum = m * 0.0
        acc = tl.zeros((BE,), tl.float32)
        for start in range(0, T_STATIC if T_STATIC > 0 else mem_len, BT):
            t = start + ot
            mt = t < mem_len
            if HAS_MASK:
                mt = mt & (tl.load(mem_mask_ptr + utt * mem_len + t, mask=mt, other=0) != 0)
            at = t[:, None] * E + oe[None, :]
            mk = mt[:, None] & me[None, :]
            kt = tl.load(mk_base + at, mask=mk, other=0.0).to(tl.float32)
            vt = tl.load(mv_base + at, mask=mk, other=0.0).to(tl.float32)
            m, s_sum, acc = _attend_block(q, kt, vt, mt, m, s_sum, acc)
        # An utterance with no real frame gets a zero attention output, as in MultiHeadAttention.
        out = tl.where(s_sum > 0, acc / tl.maximum(s_sum, 1e-30), 0.0)
        tl.store(cross_ptr + (hd * ROWS + row) * D + od, tl.sum(w_out * out[None, :], 1), mask=md)


@triton.jit
def _feed_forward_kernel(
        xb_ptr, cross_ptr, base_ptr, parts_ptr, co_b, ln_w, ln_b, fc_w, fc_b, pr_w, eps,
        ROWS: tl.constexpr, D: tl.constexpr, H: tl.constexpr, F: tl.constexpr, BD: tl.constexpr,
        BF: tl.constexpr, HAS_BIAS: tl.constexpr, CROSS: tl.constexpr, ACT: tl.constexpr):
    """Program (row, block of the hidden layer): the residual after cross-attention (stored once as the next layer's
    base), the layer norm, and this block's share of the feed-forward, a partial output."""
    row = tl.program_id(0)
    blk = tl.program_id(1)
    od = tl.arange(0, BD)
    md = od < D
    of = tl.arange(0, BF)
    x = tl.load(xb_ptr + row * D + od, mask=md, other=0.0)
    if CROSS:
        x += _sum_parts(cross_ptr, row, od, md, H, ROWS, D) + _bias(co_b, 0, od, md, HAS_BIAS)
    if blk == 0:
        tl.store(base_ptr + row * D + od, x, mask=md)
    h = _layer_norm(x, ln_w, ln_b, od, md, D, eps, HAS_BIAS)
    first = blk * BF
    a = _rows_times(fc_w, first, F - first, h, od, md, of, D) + _bias(fc_b, first, of, (first + of) < F, HAS_BIAS)
    if ACT == 0:
        a = 0.5 * a * (1.0 + tl.math.erf(a * 0.7071067811865476))
    elif ACT == 1:
        a = a / (1.0 + tl.exp(-a))
    else:
        a = tl.maximum(a, 0.0)
    tl.store(parts_ptr + (blk * ROWS + row) * D + od, _cols_times(pr_w, first, F - first, a, od, md, of, F), mask=md)


@triton.jit
def _final_norm_kernel(base_ptr, parts_ptr, pbias_ptr, out_ptr, ln_w, ln_b, eps, NPARTS: tl.constexpr,
                       HAS_PBIAS: tl.constexpr, ROWS: tl.constexpr, D: tl.constexpr, BD: tl.constexpr,
                       HAS_BIAS: tl.constexpr):
    row = tl.program_id(0)
    od = tl.arange(0, BD)
    md = od < D
    x = _residual(base_ptr, parts_ptr, pbias_ptr, row, od, md, NPARTS, ROWS, D, HAS_PBIAS)
    x = _layer_norm(x, ln_w, ln_b, od, md, D, eps, HAS_BIAS)
    tl.store(out_ptr + row * D + od, x.to(out_ptr.dtype.element_ty), mask=md)


def _stack(tensors: list[Tensor | None]) -> Tensor | None:
    if tensors[0] is None:
        return None
    return torch.stack([t.detach().float() for t in tensors]).contiguous()


def _weights(stack) -> dict[str, Tensor | None]:
    """The stack's weights stacked over layers (float32), kept on the stack until a parameter changes
    (:func:`mmgen.kernels.per_weights`)."""
    return per_weights(stack, "_fused_step_weights", _stacked_weights)


def _stacked_weights(stack) -> dict[str, Tensor | None]:
    blocks = list(stack.blocks)
    a = [blk.self_attn for blk in blocks]
    w = {"ln1_w": _stack([blk.norm1.weight for blk in blocks]), "ln1_b": _stack([blk.norm1.bias for blk in blocks]),
         "qkv_w": _stack([torch.cat([x.q_proj.weight, x.k_proj.weight, x.v_proj.weight]) for x in a]),
         "qkv_b": _stack([torch.cat([x.q_proj.bias, x.k_proj.bias, x.v_proj.bias]) if x.q_proj.bias is not None
                          else None for x in a]),
         "o_w": _stack([x.out_proj.weight for x in a]), "o_b": _stack([x.out_proj.bias for x in a]),
         "ln2_w": _stack([blk.norm2.weight for blk in blocks]), "ln2_b": _stack([blk.norm2.bias for blk in blocks]),
         "fc_w": _stack([blk.ff.fc.weight for blk in blocks]), "fc_b": _stack([blk.ff.fc.bias for blk in blocks]),
         "pr_w": _stack([blk.ff.proj.weight for blk in blocks]), "pr_b": _stack([blk.ff.proj.bias for blk in blocks]),
         "lnf_w": stack.norm.weight.detach().float().contiguous(),
         "lnf_b": None if stack.norm.bias is None else stack.norm.bias.detach().float().contiguous()}
    if blocks[0].cross_attn is not None:
        c = [blk.cross_attn for blk in blocks]
        w.update({"lnc_w": _stack([blk.norm_cross.weight for blk in blocks]),
                  "lnc_b": _stack([blk.norm_cross.bias for blk in blocks]),
                  "cq_w": _stack([x.q_proj.weight for x in c]), "cq_b": _stack([x.q_proj.bias for x in c]),
                  "co_w": _stack([x.out_proj.weight for x in c]), "co_b": _stack([x.out_proj.bias for x in c]),
                  "mem_w": torch.cat([t.detach().float() for x in c for t in (x.k_proj.weight, x.v_proj.weight)]),
                  "mem_b": None if c[0].k_proj.bias is None else
                  torch.cat([t.detach().float() for x in c for t in (x.k_proj.bias, x.v_proj.bias)])})
    return w


class FusedStepCache:
    """Decoding state of a :class:`~mmgen.blocks.TransformerStack` for :func:`fused_decoder_step`: the layers'
    weights stacked (float32), every layer's keys and values in one buffer (layers, 2, rows, h, L, e), the lineage
    table (L, rows) and the memory's keys and values (layers, 2, b, h, t, e). Built by
    :meth:`~mmgen.blocks.TransformerStack.step_cache` with ``fused=True``; nothing in it changes address while
    decoding, so a step can be captured in a CUDA graph."""

    def __init__(self, stack, rows: int, max_len: int, memory: Tensor | None, memory_mask: Tensor | None,
                 dtype: torch.dtype) -> None:
        blocks = list(stack.blocks)
        first = blocks[0].self_attn
        ref = next(stack.parameters())
        self.rows, self.d, self.heads, self.e = rows, stack.d_model, first.num_heads, first.d_head_qk
        self.ff = blocks[0].ff.fc.out_features
        self.layers = len(blocks)
        self.eps = blocks[0].norm1.eps
        self.act = ACTIVATIONS.get(type(blocks[0].ff.act).__name__)
        if self.act is None:
            raise ValueError(f"fused step: activation {type(blocks[0].ff.act).__name__}; accepted: {list(ACTIVATIONS)}")
        self.has_bias = blocks[0].norm1.bias is not None
        self.cross = blocks[0].cross_attn is not None and memory is not None
        w = _weights(stack)
        self.memory, self.memory_mask, self.group, self.mem_len = None, None, 1, 1
        if self.cross:
            if rows % memory.shape[0]:
                raise ValueError(f"rows={rows} must be a multiple of the memory's batch {memory.shape[0]}")
            b, t, _ = memory.shape
            self.group = rows // b
            self.memory = self._memory_kv(memory, w).contiguous()
            self.mem_len = t
            if memory_mask is not None and not bool(memory_mask.all()):
                self.memory_mask = memory_mask.to(torch.int8).contiguous()
        self.weights = w
        dev = ref.device
        self.kv = torch.zeros(self.layers, 2, rows, self.heads, max_len, self.e, device=dev, dtype=dtype)
        self.lineage = torch.zeros(max_len, rows, dtype=torch.int32, device=dev)
        # Between the kernels: the layer input, the residual after self-attention, the next layer's base; the heads'
        # partial output projections of both attentions, and the feed-forward blocks' partial outputs.
        self.block_ff = 64
        self.parts = triton.cdiv(self.ff, self.block_ff)
        buf = lambda *shape: torch.zeros(*shape, self.d, device=dev)  # noqa: E731
        self.xa, self.xb, self.base = (buf(rows) for _ in range(3))
        self.attn, self.cross_heads = buf(self.heads, rows), buf(self.heads, rows)  # per-head partial projections
        self.partial = buf(self.parts, rows)
        self.positions: Tensor | None = None  # a position table for the caller's embedding, if it keeps one here

    @property
    def max_len(self) -> int:
        return self.kv.shape[4]

    def _memory_kv(self, memory: Tensor, w: dict[str, Tensor | None]) -> Tensor:
        """Every layer's memory keys and values in one product: (b, t, layers * 2 * d) -> (layers, 2, b, h, t, e)."""
        b, t, _ = memory.shape
        kv = torch.nn.functional.linear(memory.float(), w["mem_w"], w.get("mem_b"))
        return kv.view(b, t, self.layers, 2, self.heads, self.e).permute(2, 3, 0, 4, 1, 5)

    def refill(self, memory: Tensor | None, memory_mask: Tensor | None) -> None:
        """Start again over a new memory of the same shape (and a mask exactly where this cache has one), in place:
        a captured step replays over it, with the weights this cache was built with."""
        if (memory is None) != (self.memory is None):
            raise ValueError("refill: a memory exactly where the cache was built with one")
        if self.memory is not None:
            self.memory.copy_(self._memory_kv(memory, self.weights))
        padded = memory_mask is not None and not bool(memory_mask.all())
        if padded != (self.memory_mask is not None):
            raise ValueError("refill: padding exactly where the cache was built with it")
        if padded:
            self.memory_mask.copy_(memory_mask)
        self.lineage.zero_()

    def reorder(self, index: Tensor, length: int | None = None) -> None:
        """Row ``i`` becomes old row ``index[i]``: only the lineage table moves, never the keys."""
        self.lineage.copy_(self.lineage.index_select(1, index))


def fused_decoder_step(x: Tensor, position: Tensor, cache: FusedStepCache) -> Tensor:
    """x (rows, d) at ``position`` (1-element long tensor on the device) -> (rows, d): every layer and the final
    layer norm, as :meth:`~mmgen.blocks.TransformerStack.step`; writes the new keys and values into the cache. Three
    kernels per layer (self-attention by row and head, cross-attention by row and head, the feed-forward by row and
    block of its hidden layer) and one for the final norm: enough programs to keep many loads in flight, where one
    program per row running a whole layer waits on one load after another."""
    rows, d = x.shape
    if rows != cache.rows or d != cache.d:
        raise ValueError(f"fused step: x is {tuple(x.shape)}, the cache holds ({cache.rows}, {cache.d})")
    w, c = cache.weights, cache
    dummy = w["ln1_w"]

    def g(name: str, layer: int | None = None) -> Tensor:  # absent tensors (biases) are never read
        t = w.get(name)
        return dummy if t is None else t if layer is None else t[layer]

    mem = c.memory if c.memory is not None else dummy
    mem_mask = c.memory_mask if c.memory_mask is not None else c.lineage
    bd, be = pow2(d, 16), pow2(c.e, 16)
    scale = 1.0 / math.sqrt(c.e)
    t_static = c.mem_len if interpreted() else 0  # Triton's interpreter cannot loop to a runtime bound
    base = x.contiguous()
    out = torch.empty_like(base)
    for i in range(c.layers):
        _self_attention_kernel[(rows, c.heads)](
            base, c.partial, g("pr_b", i - 1) if i else dummy, c.xa, c.attn, position, c.kv[i], c.lineage,
            g("ln1_w", i), g("ln1_b", i), g("qkv_w", i), g("qkv_b", i), g("o_w", i), c.eps, scale,
            NPARTS=c.parts if i else 0, HAS_PBIAS=bool(i) and c.has_bias, ROWS=rows, D=d, H=c.heads, E=c.e,
            L=c.max_len, BD=bd, BE=be, BL=min(128, pow2(c.max_len, 16)), HAS_BIAS=c.has_bias, num_warps=8)
        _cross_attention_kernel[(rows, c.heads)](
            c.xa, c.attn, c.xb, c.cross_heads, mem[i] if c.cross else dummy, mem_mask, c.mem_len,
            g("o_b", i), g("lnc_w", i), g("lnc_b", i), g("cq_w", i), g("cq_b", i), g("co_w", i), c.eps, scale,
            ROWS=rows, GROUP=c.group, D=d, H=c.heads, E=c.e, BD=bd, BE=be, BT=min(128, pow2(c.mem_len, 16)),
            HAS_BIAS=c.has_bias, HAS_MASK=c.memory_mask is not None, CROSS=c.cross, T_STATIC=t_static, num_warps=8)
        _feed_forward_kernel[(rows, c.parts)](
            c.xb, c.cross_heads, c.base, c.partial, g("co_b", i), g("ln2_w", i), g("ln2_b", i),
            g("fc_w", i), g("fc_b", i), g("pr_w", i), c.eps,
            ROWS=rows, D=d, H=c.heads, F=c.ff, BD=bd, BF=c.block_ff, HAS_BIAS=c.has_bias, CROSS=c.cross, ACT=c.act,
            num_warps=8)
        base = c.base
    _final_norm_kernel[(rows,)](
        c.base, c.partial, g("pr_b", c.layers - 1), out, g("lnf_w"), g("lnf_b"), c.eps, NPARTS=c.parts,
        HAS_PBIAS=c.has_bias, ROWS=rows, D=d, BD=bd, HAS_BIAS=c.has_bias, num_warps=4)
    return out
