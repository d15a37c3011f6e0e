"""The bookkeeping of one beam search step (:meth:`mmgen.beam_search.BeamSearch.step`) in one Triton launch.

Given the step's scores of every continuation, the PyTorch step runs some sixty tiny kernels (``log_softmax``, the
lexicon penalty, ``topk``, the finished book's scatters, ``argsort``, gathers, cumulative sums, the history writes,
the settled and done flags); inside a CUDA graph each still costs a couple of microseconds on the GPU, which
dominates once the decoder step itself is fused. Hand-written because no library fuses a beam search step: the
searches of torchaudio are CTC-only, and the generic ones (ESPnet, fairseq) keep this bookkeeping in Python.

One program (``grid=(1,)``) holds every utterance in the rows of 2-D tiles, so the flags that need all utterances
(``done``) come without a second launch or atomics. Per utterance the ``2k`` best of the ``k * v`` candidates are
chosen by ``2k`` selection passes (the largest not yet taken, ties to the lowest candidate index) over blocks of
candidates merged into a running list; the rest of the step works on those ``2k`` in registers and writes the state
with scattered stores. The search's state is read before a barrier and written after it, in place, so the launch can
be captured in a CUDA graph and replayed.

Equal to the PyTorch step (the reference, ``BeamSearch(fused=False)``), except where it leaves things unspecified:
among tied candidates ``torch.topk`` keeps an unspecified order while this kernel takes the lowest index first; ties
are not expected among finite float64 scores, but ``-inf`` candidates tie often (the first step, lexicon and banned
ids), and the labels, parents and trie nodes of the dead (``-inf``) hypotheses they become may differ, which changes
no result. The spare slot of the finished book (scratch, never read) takes the candidate of rank ``2k - 1``, as
PyTorch's sequential scatter on the CPU leaves it; on CUDA, ``scatter_`` keeps an unspecified one of its duplicate
writes there. With ``normalise``, ``log_softmax`` sums in another order than PyTorch's: the scores may differ in
the last bits.
"""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING

import torch
import triton
import triton.language as tl
from torch import Tensor

if TYPE_CHECKING:
    from mmgen.beam_search import BeamSearch

__all__ = ["BeamSelect"]

TILE = 2048  # elements per 2-D tile (registers: a float64 value and an index each, over 4 warps)
NEG_INF = tl.constexpr(float("-inf"))
LAST = tl.constexpr(2**31 - 1)  # above every candidate index (fillers included)


@triton.jit
def _beam_step_kernel(step_ptr, step_stride, penalty_ptr, trie_ptr, lse_ptr,
                      scores_ptr, node_ptr, label_ptr, position_ptr, count_ptr, fin_scores_ptr, fin_length_ptr,
                      fin_row_ptr, settled_ptr, done_ptr, history_label_ptr, history_parent_ptr, index_ptr,
                      keep_label_ptr, b, eos,
                      K: tl.constexpr, V: tl.constexpr, NORMALISE: tl.constexpr, HAS_TRIE: tl.constexpr,
                      B_BLOCK: tl.constexpr, K_BLOCK: tl.constexpr, TOPK: tl.constexpr, BLOCK_N: tl.constexpr,
                      R_BLOCK: tl.constexpr, V_BLOCK: tl.constexpr):
    """One step for ``b`` utterances of ``K`` beams over ``V`` labels. ``step`` (rows, V): the raw decoder logits
    (``NORMALISE``: log_softmax and the lexicon penalty are taken here, in float64) or the step's final float64
    scores. ``lse`` (2, rows): scratch for each row's max and log-sum-exp. Writes the state (see ``BeamSearch``) and
    ``index``/``keep_label`` (rows,): the row each new hypothesis extends and its label."""
    rows = b * K
    pos = tl.load(position_ptr)

    # 1. Each row's max and log-sum-exp, as torch.log_softmax: (x - max) - log(sum(exp(x - max))).
    if NORMALISE:
        r_offs = tl.arange(0, R_BLOCK)
        v_offs = tl.arange(0, V_BLOCK)
        for r0 in range(0, B_BLOCK * K, R_BLOCK):  # a constexpr bound (>= rows): the interpreter needs one
            r = r0 + r_offs
            r_ok = r < rows
            row_max = tl.full((R_BLOCK,), NEG_INF, tl.float64)
            for v0 in range(0, V, V_BLOCK):
                lab = v0 + v_offs
                ok = r_ok[:, None] & (lab < V)[None, :]
                x = tl.load(step_ptr + r[:, None] * step_stride + lab[None, :], mask=ok, other=NEG_INF)
                row_max = tl.maximum(row_max, tl.max(x.to(tl.float64), axis=1))
            row_max = tl.where(r_ok, row_max, 0.0)  # no -inf - -inf in the rows past the last
            total = tl.zeros((R_BLOCK,), tl.float64)
            for v0 in range(0, V, V_BLOCK):
                lab = v0 + v_offs
                ok = r_ok[:, None] & (lab < V)[None, :]
                x = tl.load(step_ptr + r[:, None] * step_stride + lab[None, :], mask=ok, other=NEG_INF)
                total += tl.sum(tl.exp(x.to(tl.float64) - row_max[:, None]), axis=1)
            tl.store(lse_ptr + r, row_max, mask=r_ok)
            tl.store(lse_ptr + rows + r, tl.log(tl.where(r_ok, total, 1.0)), mask=r_ok)
        tl.debug_barrier()  # the sums are read back by other threads

    # 2. The 2K best candidates c = beam * V + label of each utterance (rows of the tiles), best first.
    u = tl.arange(0, B_BLOCK)  # shape: (B,)
    u_ok = u < b
    tk = tl.arange(0, TOPK)  # shape: (TOPK,)
    top_v = tl.full((B_BLOCK, TOPK), NEG_INF, tl.float64)
    top_i = tl.zeros((B_BLOCK, TOPK), tl.int32) + (1 << 29) + tk[None, :]  # fillers: behind every real candidate
    for c0 in range(0, K * V, BLOCK_N):
        c = c0 + tl.arange(0, BLOCK_N)  # shape: (N,)
        beam = c // V
        lab = c % V
        ok = u_ok[:, None] & (c < K * V)[None, :]  # shape: (B, N)
        row = u[:, None] * K + beam[None, :]
        x = tl.load(step_ptr + row * step_stride + lab[None, :], mask=ok, other=0.0).to(tl.float64)
        if NORMALISE:
            x = (x - tl.load(lse_ptr + row, mask=ok, other=0.0)) - tl.load(lse_ptr + rows + row, mask=ok, other=0.0)
            if HAS_TRIE:
                pen_row = tl.load(node_ptr + row, mask=ok, other=0)
            else:
                pen_row = tl.zeros((B_BLOCK, BLOCK_N), tl.int64)
            x = x + tl.load(penalty_ptr + pen_row * V + lab[None, :], mask=ok, other=0.0)
        val = tl.load(scores_ptr + row, mask=ok, other=NEG_INF) + x  # scores (b, K) is laid out as the rows
        val = tl.where(ok, val, NEG_INF)
        idx = tl.where(ok, c[None, :], (1 << 30) + c[None, :])
        # Merge the block into the running list: 2K passes, each taking the best (value, then lowest index) of those
        # behind the one taken last.
        prev_v = tl.full((B_BLOCK,), float("inf"), tl.float64)
        prev_i = tl.full((B_BLOCK,), -1, tl.int32)
        new_v = tl.full((B_BLOCK, TOPK), NEG_INF, tl.float64)
        new_i = tl.zeros((B_BLOCK, TOPK), tl.int32) + (1 << 29) + tk[None, :]
        for p in range(2 * K):
            e_blk = (val < prev_v[:, None]) | ((val == prev_v[:, None]) & (idx > prev_i[:, None]))
            e_top = (top_v < prev_v[:, None]) | ((top_v == prev_v[:, None]) & (top_i > prev_i[:, None]))
            m = tl.maximum(tl.max(tl.where(e_blk, val, NEG_INF), axis=1),
                           tl.max(tl.where(e_top, top_v, NEG_INF), axis=1))
            i = tl.minimum(tl.min(tl.where(e_blk & (val == m[:, None]), idx, LAST), axis=1),
                           tl.min(tl.where(e_top & (top_v == m[:, None]), top_i, LAST), axis=1))
            new_v = tl.where(tk[None, :] == p, m[:, None], new_v)
            new_i = tl.where(tk[None, :] == p, i[:, None], new_i)
            prev_v, prev_i = m, i
        top_v, top_i = new_v, new_i

    # 3. The book of finished hypotheses and the live selection, on the (B, TOPK) list.
    in2k = tk[None, :] < 2 * K
    beam = top_i // V
    lab = top_i % V
    ends = in2k & (lab == eos)
    settled = tl.load(settled_ptr + u, mask=u_ok, other=1) != 0
    count = tl.load(count_ptr + u, mask=u_ok, other=K)
    # Finished: eos among the best K candidates of an utterance not yet settled, while it has free slots.
    new = ends & (tk[None, :] < K) & (tl.abs(top_v) < float("inf")) & ~settled[:, None]
    slot = count[:, None] + tl.cumsum(new.to(tl.int64), axis=1) - 1
    new = new & (slot < K) & u_ok[:, None]
    count_new = count + tl.sum(new.to(tl.int64), axis=1)
    # Live: the best K candidates that do not end, then (fewer than K) the ending ones, masked.
    goes_on = in2k & ~ends
    dest = tl.where(goes_on, tl.cumsum(goes_on.to(tl.int32), axis=1) - 1,
                    tl.sum(goes_on.to(tl.int32), axis=1)[:, None] + tl.cumsum(ends.to(tl.int32), axis=1) - 1)
    live = in2k & (dest < K) & u_ok[:, None]
    kept = tl.where(ends, NEG_INF, top_v)
    parent = u[:, None] * K + beam
    dst = u[:, None] * K + dest
    if HAS_TRIE:
        node = tl.load(trie_ptr + tl.load(node_ptr + parent, mask=live, other=0) * V + lab, mask=live, other=0)
    # The best finished score: the slots' old best and the new ones (the other slots were -inf).
    kb = tl.arange(0, K_BLOCK)
    old = tl.load(fin_scores_ptr + u[:, None] * (K + 1) + kb[None, :], mask=u_ok[:, None] & (kb < K)[None, :],
                  other=NEG_INF)
    best = tl.maximum(tl.max(old, axis=1), tl.max(tl.where(new, top_v, NEG_INF), axis=1))
    settled = settled | ((count_new > 0) & (best >= tl.max(tl.where(live, kept, NEG_INF), axis=1)))
    done = (tl.min(tl.where(u_ok, settled, 1).to(tl.int32), axis=0) > 0) | \
        (tl.min(tl.where(u_ok, count_new >= K, 1).to(tl.int32), axis=0) > 0)
    tl.debug_barrier()  # every thread has read the state it replaces

    # 4. Writes.
    fin = u[:, None] * (K + 1) + tl.where(new, slot, K)
    spare = (tk[None, :] == 2 * K - 1) & u_ok[:, None]  # never new: the spare slot's last write
    tl.store(fin_scores_ptr + fin, top_v, mask=new | spare)
    tl.store(fin_length_ptr + fin, tl.zeros((B_BLOCK, TOPK), tl.int64) + pos, mask=new | spare)
    tl.store(fin_row_ptr + fin, parent.to(tl.int64), mask=new | spare)
    tl.store(count_ptr + u, count_new, mask=u_ok)
    tl.store(scores_ptr + dst, kept, mask=live)
    tl.store(index_ptr + dst, parent.to(tl.int64), mask=live)
    tl.store(keep_label_ptr + dst, lab.to(tl.int64), mask=live)
    tl.store(label_ptr + dst, lab.to(tl.int64), mask=live)
    tl.store(history_label_ptr + pos * rows + dst, lab.to(tl.int64), mask=live)
    tl.store(history_parent_ptr + pos * rows + dst, parent.to(tl.int64), mask=live)
    if HAS_TRIE:
        tl.store(node_ptr + dst, node, mask=live)
    tl.store(settled_ptr + u, settled.to(tl.uint8), mask=u_ok)
    tl.store(done_ptr, done.to(tl.uint8))
    tl.store(position_ptr, pos + 1)


class BeamSelect:
    """The fused bookkeeping of ``search``'s steps: call it with the step's scores, it updates ``search``'s state in
    place (scores, finished book, trie nodes, history, label, position, settled, done) in one launch and returns
    ``(index, keep_label)`` (rows,) long, for the caller's reorder of the decoder's state and CTC scorer. Those two
    and a scratch buffer are allocated here once, so every call reads and writes the same memory (CUDA graphs).

    Built once per search: the block sizes are fixed here, and the state tensors are bound (the bool flags through
    ``uint8`` views), so the search must update them in place, as it does.
    """

    def __init__(self, search: BeamSearch) -> None:
        b, k, v = search.b, search.k, search.v
        if v < 2:
            raise ValueError(f"the fused beam step needs a vocabulary of at least 2 ids, got {v}")
        rows = b * k
        device = search.scores.device
        self.search = weakref.proxy(search)  # the search owns this: no reference cycle (see mmgen.graphs.capture)
        self.index = torch.zeros(rows, dtype=torch.long, device=device)
        self.keep_label = torch.zeros(rows, dtype=torch.long, device=device)
        self._lse = torch.zeros(2, rows, dtype=torch.float64, device=device)
        self._settled = search.settled.view(torch.uint8)
        self._done = search.done.view(torch.uint8)
        self._penalty = search.penalty.contiguous()
        self._trie = search.trie[1].to(torch.long).contiguous() if search.trie is not None else search.node
        pow2 = triton.next_power_of_2
        b_block = pow2(b)
        v_block = min(pow2(v), TILE)
        self._meta = dict(K=k, V=v, HAS_TRIE=search.trie is not None, B_BLOCK=b_block, K_BLOCK=pow2(k),
                          TOPK=pow2(2 * k), BLOCK_N=max(min(pow2(k * v), TILE // b_block), 16),
                          R_BLOCK=min(pow2(rows), max(TILE // v_block, 1)), V_BLOCK=v_block, num_warps=4)

    def __call__(self, scores: Tensor, *, normalise: bool) -> tuple[Tensor, Tensor]:
        """``scores`` (rows, v): with ``normalise``, the decoder's logits (any float dtype; log_softmax and the
        lexicon penalty are taken in the kernel, in float64), else the step's final float64 scores."""
        s = self.search
        if scores.stride(1) != 1:
            scores = scores.contiguous()
        if not normalise and scores.dtype != torch.float64:
            raise TypeError(f"the step's final scores must be float64, got {scores.dtype}")
        _beam_step_kernel[(1,)](
            scores, scores.stride(0), self._penalty, self._trie, self._lse,
            s.scores, s.node, s.label, s.position, s.count, s.fin_scores, s.fin_length, s.fin_row, self._settled,
            self._done, s.history_label, s.history_parent, self.index, self.keep_label, s.b, s.eos,
            NORMALISE=normalise, **self._meta)
        return self.index, self.keep_label
