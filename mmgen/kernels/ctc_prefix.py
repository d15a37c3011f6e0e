"""The CTC prefix scorer of joint CTC/attention decoding (:class:`mmgen.ctc.CTCPrefixScorer`) in one Triton launch
per call (two for :meth:`~mmgen.ctc.CTCPrefixScorer.advance` with ``group=1`` beyond ``ONE_PROGRAM`` rows).

In PyTorch, :meth:`~mmgen.ctc.CTCPrefixScorer.scores` and :meth:`~mmgen.ctc.CTCPrefixScorer.advance` are some
seventy tiny kernels per beam search step (gathers, ``where``, ``cat``, ``logsumexp``, scatters, cumulative sums,
``logcumsumexp``, ``logaddexp``, copies): inside a CUDA graph each still costs a couple of microseconds, which
dominates joint decoding once the decoder step and the search's bookkeeping are fused. Hand-written because no
maintained library offers a CTC prefix scorer kernel for joint decoding (torchaudio's CTC decoders are CTC-only
searches; ESPnet's ``CTCPrefixScoreTH`` is PyTorch operations in a loop over frames). The PyTorch code stays the
reference (``CTCPrefixScorer(fused=False)``), and tests compare the two (under Triton's interpreter on a CPU).

Everything is float64, as in the reference, and follows its closed form (cumulative sums and log-cumulative-sums over
frames, ``tl.cumsum`` and ``tl.associative_scan`` with a log-add-exp combine); sums run in another order than
PyTorch's, so values may differ in the last bits. Frames are taken in blocks (a power of two, at most ``TILE`` or
``ADVANCE_TILE`` elements per 2-D tile with the candidates or rows), the running values carried from block to block,
so any number of frames works with the same kernels. Integers that only bound loops (the frame count) stay runtime
arguments on the GPU, so a new utterance length compiles nothing; under the interpreter, which cannot loop to a
runtime bound, they are constants.

Scores (``_scores_kernel``): one program per row and block of candidates; the log-sum over frames of each candidate
runs online (running maximum and sum). With a candidate list, the row's other labels are filled by the row's first
program, skipping the candidates, so no two programs write the same entry and no ordering is needed.

Advance (``_advance_kernel``): row ``i`` reads the old state of its parent ``index[i]`` and replaces its own, in
place, so no row may be written before every row that reads it has read. Parents lie in the row's group, so one
program takes a whole group (its rows are the rows of 2-D tiles): it writes the new forward variables to a scratch
buffer while it reads the old state, then, after a barrier, copies them into place and writes the small per-row state
(``start``, ``last``, ``prefix``). A barrier (``tl.debug_barrier``) orders the threads of one program only, hence one
program per group; the scratch buffer, rather than registers, lets frames come in blocks whatever the length, and it
also hands the label recursion's values to the blank recursion one frame later (read back, across threads, after a
barrier: Triton cannot shift a tensor in registers). Double buffering is not an option: a CUDA graph replays the same
addresses every step. With ``group=1`` a row's parent may be any row, and the frames ``x`` move with it: a batch of
at most ``ONE_PROGRAM`` rows is taken by a single program as one group; a larger one takes two launches, the first
writing every new value (and the moved frames) to scratch, the second copying them into place.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import triton
import triton.language as tl
from torch import Tensor

from mmgen.kernels import interpreted, pow2

if TYPE_CHECKING:
    from mmgen.ctc import CTCPrefixScorer

__all__ = ["FusedCTCPrefix"]

TILE = 2048  # float64 elements per 2-D tile of the scores (over 4 warps)
# ... of advance, over 8 warps: its log-add-exp scans keep many float64 temporaries live (more spills registers)
ADVANCE_TILE = 1024
ONE_PROGRAM = 16  # group=1: the most rows advanced by one program in one launch (more: two launches, all parallel)
NEG_INF = tl.constexpr(float("-inf"))


@triton.jit
def _logaddexp(a, b):
    """log(exp(a) + exp(b)), -inf when both are (as torch.logaddexp)."""
    m = tl.maximum(a, b)
    m_safe = tl.where(m == NEG_INF, 0.0, m)  # no -inf - -inf
    return tl.where(m == NEG_INF, NEG_INF, m + tl.log(1.0 + tl.exp(tl.minimum(a, b) - m_safe)))


@triton.jit
def _at_last(x, lane, BT: tl.constexpr):
    """x (rows, BT) -> (rows,): each row's value in the block's last lane."""
    return tl.max(tl.where((lane == BT - 1)[None, :], x, NEG_INF), axis=1)


@triton.jit
def _scores_kernel(x_ptr, r_blank_ptr, r_any_ptr, start_ptr, last_ptr, cand_ptr, psi_ptr, t, blank, eos, dead,
                   V: tl.constexpr, N: tl.constexpr, HAS_CAND: tl.constexpr, BN: tl.constexpr, BT: tl.constexpr,
                   BV: tl.constexpr, BF: tl.constexpr, T_STATIC: tl.constexpr):
    """psi (rows, V) for N candidates per row (``cand`` (rows, N), or every label without ``HAS_CAND``): program
    (row, j) scores candidates j * BN ... as ``CTCPrefixScorer.scores``; entries at or below ``dead`` are -inf."""
    row = tl.program_id(0).to(tl.int64)
    on = tl.program_id(1) * BN + tl.arange(0, BN)
    mn = on < N
    if HAS_CAND:
        c = tl.load(cand_ptr + row * N + on, mask=mn, other=0).to(tl.int64)
    else:
        c = on.to(tl.int64)
    start = tl.load(start_ptr + row)
    # c's first emission at frame f follows an alignment of g over frames < f (the start state before frame 0); a
    # repeat of g's last label must follow one that ends in a blank.
    repeat = (c == tl.load(last_ptr + row))[:, None]  # shape: (BN, 1)
    ot = tl.arange(0, BT)
    m = tl.full((BN,), NEG_INF, tl.float64)  # running max and sum of exp(. - max) over frames
    acc = tl.zeros((BN,), tl.float64)
    for t0 in range(0, T_STATIC if T_STATIC > 0 else t, BT):
        f = t0 + ot
        mf = f < t
        prev = mf & (f > 0)
        pb = tl.where(f == 0, start, tl.load(r_blank_ptr + row * t + f - 1, mask=prev, other=0.0))
        pa = tl.where(f == 0, start, tl.load(r_any_ptr + row * t + f - 1, mask=prev, other=0.0))
        ok = mn[:, None] & mf[None, :]
        xc = tl.load(x_ptr + (row * V + c[:, None]) * t + f[None, :], mask=ok, other=0.0)  # shape: (BN, BT)
        s = tl.where(ok, tl.where(repeat, pb[None, :], pa[None, :]) + xc, NEG_INF)
        m_new = tl.maximum(m, tl.max(s, axis=1))
        m_safe = tl.where(m_new == NEG_INF, 0.0, m_new)  # no -inf - -inf while all are -inf
        acc = acc * tl.exp(m - m_safe) + tl.sum(tl.exp(s - m_safe[:, None]), axis=1)
        m = m_new
    psi = tl.where(acc > 0, tl.log(tl.where(acc > 0, acc, 1.0)) + m, NEG_INF)  # acc > 0: m is finite
    ends = tl.load(r_any_ptr + row * t + t - 1)  # eos: exactly g
    ends = tl.where(ends <= dead, NEG_INF, ends)  # a path through an impossible frame is impossible
    psi = tl.where(psi <= dead, NEG_INF, psi)
    psi = tl.where(c == eos, ends, psi)
    psi = tl.where(c == blank, NEG_INF, psi)
    tl.store(psi_ptr + row * V + c, psi, mask=mn)  # equal candidates write equal values
    if HAS_CAND:
        if tl.program_id(1) == 0:  # the labels that are not candidates: -inf, and eos's score
            ov = tl.arange(0, BV)
            for v0 in range(0, V, BV):
                lab = v0 + ov
                hits = tl.zeros((BV,), tl.int32)
                for n0 in range(0, N, BF):
                    oc = n0 + tl.arange(0, BF)
                    cc = tl.load(cand_ptr + row * N + oc, mask=oc < N, other=-1)
                    hits += tl.sum((lab[:, None] == cc[None, :]).to(tl.int32), axis=1)
                fill = tl.where((lab == eos) & (lab != blank), ends, NEG_INF)
                tl.store(psi_ptr + row * V + lab, fill, mask=(lab < V) & (hits == 0))


@triton.jit
def _advance_kernel(x_ptr, r_blank_ptr, r_any_ptr, start_ptr, last_ptr, prefix_ptr, index_ptr, labels_ptr, psi_ptr,
                    scratch_ptr, x_scratch_ptr, rows, t, blank,
                    V: tl.constexpr, G: tl.constexpr, BG: tl.constexpr, BT: tl.constexpr, BX: tl.constexpr,
                    READ: tl.constexpr, WRITE: tl.constexpr, MOVE_X: tl.constexpr, T_STATIC: tl.constexpr):
    """Rows G * p ... G * p + G - 1 (program p) become their parents ``index`` extended by ``labels``, as
    ``CTCPrefixScorer.advance``. ``READ``: the new r_blank and r_any go to ``scratch`` (3, rows, t) (and with
    ``MOVE_X`` the parent's frames to ``x_scratch``); ``WRITE``: those are copied into place and ``start``, ``last``,
    ``prefix`` written. Both in one launch only when every parent lies among the program's own rows."""
    og = tl.arange(0, BG)
    r = tl.program_id(0) * G + og
    mg = (og < G) & (r < rows)
    r = r.to(tl.int64)
    ot = tl.arange(0, BT)
    if READ:
        parent = tl.load(index_ptr + r, mask=mg, other=0).to(tl.int64)
        lab = tl.load(labels_ptr + r, mask=mg, other=0).to(tl.int64)
        repeat = (lab == tl.load(last_ptr + parent, mask=mg, other=-1))[:, None]  # shape: (BG, 1)
        start = tl.load(start_ptr + parent, mask=mg, other=0.0)[:, None]
        if MOVE_X:  # whose frames: the parent's; with groups, the row's own (its utterance's)
            src = parent
        else:
            src = r
        # Running values carried over blocks of frames, per row: the sums of x of the label and of the blank, and
        # the log-sums so far of the label's and the blank's closed forms.
        cum = tl.zeros((BG,), tl.float64)
        cum_b = tl.zeros((BG,), tl.float64)
        run = tl.full((BG,), NEG_INF, tl.float64)
        run_b = tl.full((BG,), NEG_INF, tl.float64)
        for t0 in range(0, T_STATIC if T_STATIC > 0 else t, BT):
            f = t0 + ot
            ok = mg[:, None] & (f < t)[None, :]  # shape: (BG, BT)
            prev = ok & (f > 0)[None, :]
            at = parent[:, None] * t + f[None, :] - 1
            phi = tl.where(repeat, tl.load(r_blank_ptr + at, mask=prev, other=0.0),
                           tl.load(r_any_ptr + at, mask=prev, other=0.0))
            phi = tl.where((f == 0)[None, :], start, phi)
            xl = tl.load(x_ptr + (src[:, None] * V + lab[:, None]) * t + f[None, :], mask=ok, other=0.0)
            xb = tl.load(x_ptr + (src[:, None] * V + blank) * t + f[None, :], mask=ok, other=0.0)
            # Ending in c at frame f: label[f] = (label[f-1] (+) phi[f]) + x[f], label[-1] = log 0. With L[f] =
            # x[0] + ... + x[f], label[f] - L[f] = (label[f-1] - L[f-1]) (+) (phi[f] - L[f-1]): a running log-sum.
            c = cum[:, None] + tl.cumsum(xl, axis=1)
            z = tl.where(ok, phi - (c - xl), NEG_INF)
            s = tl.associative_scan(z, 1, _logaddexp)
            if t0 > 0:  # the log-sum of the blocks before (-inf in the first block: nothing to add)
                s = _logaddexp(run[:, None], s)
            label = s + c
            out = scratch_ptr + r[:, None] * t + f[None, :]  # scratch (3, rows, t): blank, any, label
            tl.store(out + 2 * rows * t, label, mask=ok)
            tl.debug_barrier()  # label[f - 1] is read back by other threads (for f = t0: from the last block)
            # Ending in blank at frame f: blank[f] = (label[f-1] (+) blank[f-1]) + x_blank[f], blank[-1] = log 0.
            label_before = tl.load(out + 2 * rows * t - 1, mask=prev, other=NEG_INF)
            cb = cum_b[:, None] + tl.cumsum(xb, axis=1)
            zb = tl.where(ok, label_before - (cb - xb), NEG_INF)
            sb = tl.associative_scan(zb, 1, _logaddexp)
            if t0 > 0:
                sb = _logaddexp(run_b[:, None], sb)
            blank_f = sb + cb
            tl.store(out, blank_f, mask=ok)
            tl.store(out + rows * t, _logaddexp(label, blank_f), mask=ok)
            if t0 + BT < t:  # more blocks: the running values are the block's last frame's
                cum = _at_last(c, ot, BT)
                cum_b = _at_last(cb, ot, BT)
                run = _at_last(s, ot, BT)
                run_b = _at_last(sb, ot, BT)
        if MOVE_X:  # the parent's frames, for the rows that change utterance
            ox = tl.arange(0, BX)
            moved = mg & (parent != r)
            for o0 in range(0, V * T_STATIC if T_STATIC > 0 else V * t, BX):
                o = o0 + ox
                mo = moved[:, None] & (o < V * t)[None, :]
                tl.store(x_scratch_ptr + r[:, None] * V * t + o[None, :],
                         tl.load(x_ptr + parent[:, None] * V * t + o[None, :], mask=mo, other=0.0), mask=mo)
    if READ and WRITE:
        tl.debug_barrier()  # every thread has read the old state it replaces
    if WRITE:
        for t0 in range(0, T_STATIC if T_STATIC > 0 else t, BT):
            f = t0 + ot
            ok = mg[:, None] & (f < t)[None, :]
            at = r[:, None] * t + f[None, :]
            tl.store(r_blank_ptr + at, tl.load(scratch_ptr + at, mask=ok, other=0.0), mask=ok)
            tl.store(r_any_ptr + at, tl.load(scratch_ptr + rows * t + at, mask=ok, other=0.0), mask=ok)
        parent = tl.load(index_ptr + r, mask=mg, other=0).to(tl.int64)
        lab = tl.load(labels_ptr + r, mask=mg, other=0).to(tl.int64)
        if MOVE_X:
            ox = tl.arange(0, BX)
            moved = mg & (parent != r)
            for o0 in range(0, V * T_STATIC if T_STATIC > 0 else V * t, BX):
                o = o0 + ox
                mo = moved[:, None] & (o < V * t)[None, :]
                at = r[:, None] * V * t + o[None, :]
                tl.store(x_ptr + at, tl.load(x_scratch_ptr + at, mask=mo, other=0.0), mask=mo)
        tl.store(prefix_ptr + r, tl.load(psi_ptr + parent * V + lab, mask=mg, other=0.0), mask=mg)
        tl.store(last_ptr + r, lab, mask=mg)
        tl.store(start_ptr + r, tl.full((BG,), NEG_INF, tl.float64), mask=mg)


class FusedCTCPrefix:
    """The fused calls of ``scorer`` (built by it with ``fused=True``): :meth:`scores` and :meth:`advance` do what
    the scorer's PyTorch methods do, on its state tensors, in place. The scores are written to a buffer allocated
    here once (returned, and overwritten by the next call), as are the scratch buffers, so every call reads and
    writes the same memory (CUDA graphs)."""

    def __init__(self, scorer: CTCPrefixScorer) -> None:
        s = scorer
        rows, v, t = s.x.shape
        for name in ("x", "r_blank", "r_any", "start", "last", "prefix"):
            if not getattr(s, name).is_contiguous():
                raise ValueError(f"fused CTC prefix scorer: state {name} must be contiguous")
        if rows % s.group:
            raise ValueError(f"rows={rows} must be a multiple of group={s.group}")
        self.scorer, self.rows, self.v, self.t = s, rows, v, t
        dev = s.x.device
        self.psi = torch.empty(rows, v, dtype=torch.float64, device=dev)
        self._scratch = torch.empty(3, rows, t, dtype=torch.float64, device=dev)
        # A group of rows for one program: parents lie inside it. group=1 lets a row take any parent (and its frames).
        self._move_x = s.group == 1 and rows > 1
        self._one_launch = not self._move_x or rows <= ONE_PROGRAM
        g = (s.group if s.group > 1 else rows) if self._one_launch else 2
        self._x_scratch = torch.empty_like(s.x) if self._move_x else self._scratch
        bg = pow2(g, 2)
        tile = max(ADVANCE_TILE // bg, 16)
        self._advance_meta = dict(V=v, G=g, BG=bg, BT=min(pow2(t, 16), tile), BX=tile, MOVE_X=self._move_x,
                                  T_STATIC=t if interpreted() else 0, num_warps=8)

    def scores(self, candidates: Tensor | None) -> Tensor:
        s = self.scorer
        rows, v, t = self.rows, self.v, self.t
        n = v if candidates is None else candidates.shape[1]
        if candidates is not None:
            if candidates.shape[0] != rows:
                raise ValueError(f"candidates: {tuple(candidates.shape)}, expected ({rows}, n)")
            candidates = candidates.contiguous()
        bn = min(pow2(n, 2), 8)
        _scores_kernel[(rows, triton.cdiv(n, bn))](
            s.x, s.r_blank, s.r_any, s.start, s.last, self.psi if candidates is None else candidates, self.psi,
            t, s.blank, s.eos, s.FLOOR / 2,
            V=v, N=n, HAS_CAND=candidates is not None, BN=bn, BT=min(pow2(t, 16), max(TILE // bn, 16)),
            BV=min(pow2(v, 2), 64), BF=min(pow2(n, 2), 16), T_STATIC=t if interpreted() else 0, num_warps=4)
        return self.psi

    def advance(self, index: Tensor, labels: Tensor, psi: Tensor) -> None:
        s = self.scorer
        rows, t = self.rows, self.t
        if psi.shape != (rows, self.v) or psi.dtype != torch.float64:
            raise ValueError(f"psi: {tuple(psi.shape)} {psi.dtype}, expected ({rows}, {self.v}) float64")
        index, labels, psi = index.contiguous(), labels.contiguous(), psi.contiguous()
        meta = self._advance_meta
        args = (s.x, s.r_blank, s.r_any, s.start, s.last, s.prefix, index, labels, psi, self._scratch,
                self._x_scratch, rows, t, s.blank)
        grid = (triton.cdiv(rows, meta["G"]),)
        if self._one_launch:
            _advance_kernel[grid](*args, READ=True, WRITE=True, **meta)
        else:
            _advance_kernel[grid](*args, READ=True, WRITE=False, **meta)
            _advance_kernel[grid](*args, READ=False, WRITE=True, **meta)
