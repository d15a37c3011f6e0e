"""The CTC prefix scorer of joint CTC/attention decoding (:class:`mmgen.ctc.CTCPrefixScorer`) in one Triton launch
per call (two for :meth:`~mmgen.ctc.CTCPrefixScorer.advance` with ``group=1`` beyond ``ONE_PROGRAM`` rows), and a
joint search step's scores from the decoder's logits in one launch (:class:`FusedJointScores`).

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

Joint scores (``_joint_scores_kernel``): what :class:`~mmgen.beam_search.BeamSearch` does between the decoder's
logits and its bookkeeping in a joint step (``log_softmax`` in float64, the lexicon penalty, the pre-beam's ``topk``,
the prefix scores of its labels, the weighting: some twenty launches in PyTorch), with the scores kernel's code for
the prefix scores (``_prefix_scores``). The grid is the scores kernel's, (row, block of candidates); each program
takes its row's log-sum-exp and, with a pre-beam, the ``N`` best labels, both again in every program of a row, as
programs of one launch cannot wait for one another: that is cheap next to the prefix scores (``N`` is a few times the
beam), and a large vocabulary without a pre-beam gets more candidates per program. The ``N`` best: a row of at most
``RANK_LABELS`` labels is ranked at once (each label's rank counted in a (labels, labels) tile, no serial loop), a
longer one by ``N`` passes, each taking the best label behind the one taken last. The row's first program writes
the other labels, told apart from the candidates by their rank (against the ``N``-th: no list to search).

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

import weakref
from typing import TYPE_CHECKING

import torch
import triton
import triton.language as tl
from torch import Tensor

from mmgen.kernels import interpreted, pow2

if TYPE_CHECKING:
    from mmgen.beam_search import BeamSearch
    from mmgen.ctc import CTCPrefixScorer

__all__ = ["FusedCTCPrefix", "FusedJointScores"]

TILE = 2048  # float64 elements per 2-D tile of the scores (over 4 warps)
# ... of advance, over 8 warps: its log-add-exp scans keep many float64 temporaries live (more spills registers)
ADVANCE_TILE = 1024
ONE_PROGRAM = 16  # group=1: the most rows advanced by one program in one launch (more: two launches, all parallel)
JOINT_CANDIDATES = 8  # joint scores: candidates per program (at least)
JOINT_LABELS = 1024  # ... labels per block of the passes over a row (log_softmax, the pre-beam's selection)
RANK_LABELS = 64  # ... the most labels ranked at once in one (labels, labels) tile (more: a pass per candidate)
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
def _ends(r_any_ptr, row, t, dead):
    """eos's score of ``row``: log P_ctc of exactly g, its forward variable at the last frame (-inf at or below
    ``dead``: a path through an impossible frame is impossible)."""
    ends = tl.load(r_any_ptr + row * t + t - 1)
    return tl.where(ends <= dead, NEG_INF, ends)


@triton.jit
def _prefix_scores(x_ptr, r_blank_ptr, r_any_ptr, start_ptr, last_ptr, row, c, mn, ends, t, blank, eos, dead,
                   V: tl.constexpr, BN: tl.constexpr, BT: tl.constexpr, T_STATIC: tl.constexpr):
    """psi (BN,) of ``row`` for the labels ``c`` (BN,) where ``mn``, as ``CTCPrefixScorer.scores``: ``ends`` (see
    ``_ends``) at eos, -inf at the blank and at or below ``dead``."""
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
    psi = tl.where(psi <= dead, NEG_INF, psi)
    psi = tl.where(c == eos, ends, psi)
    return tl.where(c == blank, NEG_INF, psi)


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
    ends = _ends(r_any_ptr, row, t, dead)
    psi = _prefix_scores(x_ptr, r_blank_ptr, r_any_ptr, start_ptr, last_ptr, row, c, mn, ends, t, blank, eos, dead,
                         V, BN, BT, T_STATIC)
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


@triton.jit
def _rank_key(at, pen, lab, V: tl.constexpr):
    """The pre-beam's ranking of labels ``lab``: logit plus penalty, float64, nan as -inf (beyond V: -inf)."""
    key = tl.load(at + lab, mask=lab < V, other=NEG_INF).to(tl.float64) + tl.load(pen + lab, mask=lab < V, other=0.0)
    return tl.where(key == key, key, NEG_INF)


@triton.jit
def _joint(at, pen, lab, ok, row_max, lse, psi, prefix, live, w_att, w_ctc):
    """The joint scores of labels ``lab`` (where ``ok``) as ``BeamSearch._scores``: (1 - λ) (log_softmax + penalty)
    + λ (psi - prefix), -inf where log_softmax + penalty is (a masked label stays masked whatever the weights) and
    where the prefix is dead (not ``live``). The masked terms are zeroed before the products, only to make no nan."""
    s = (tl.load(at + lab, mask=ok, other=NEG_INF).to(tl.float64) - row_max) - lse
    s = s + tl.load(pen + lab, mask=ok, other=NEG_INF)
    gain = tl.where(live, psi - tl.where(live, prefix, 0.0), NEG_INF)
    keep = s > NEG_INF
    return tl.where(keep, w_att * tl.where(keep, s, 0.0) + w_ctc * gain, NEG_INF)


@triton.jit
def _joint_scores_kernel(logits_ptr, logits_stride, penalty_ptr, node_ptr, weight_ptr, x_ptr, r_blank_ptr,
                         r_any_ptr, start_ptr, last_ptr, prefix_ptr, psi_ptr, scores_ptr, t, blank, eos, dead,
                         V: tl.constexpr, N: tl.constexpr, PRE_BEAM: tl.constexpr, RANK: tl.constexpr,
                         HAS_TRIE: tl.constexpr, BN: tl.constexpr, BT: tl.constexpr, BV: tl.constexpr,
                         T_STATIC: tl.constexpr):
    """A joint CTC/attention step's scores (rows, V) float64 and psi (rows, V) from the decoder's ``logits`` (rows,
    V), as the PyTorch code of ``BeamSearch._scores``: program (row, j) scores the row's candidates of rank j * BN
    ...: the N best labels by ``log_softmax(logits) + penalty`` with ``PRE_BEAM`` (``RANK``: ranked in one (BV, BV)
    tile, else chosen by N passes over the row), else every label (in order).
    ``penalty`` (nodes, V): 0 or -inf per lexicon node (``node`` (rows,), with ``HAS_TRIE``; else one row).
    ``weight`` (2,) float64: 1 - λ and λ."""
    row = tl.program_id(0).to(tl.int64)
    at = logits_ptr + row * logits_stride
    if HAS_TRIE:
        pen = penalty_ptr + tl.load(node_ptr + row) * V
    else:
        pen = penalty_ptr
    ov = tl.arange(0, BV)
    # 1. log_softmax = (x - max) - log(sum(exp(x - max))) in float64, as PyTorch's (nan everywhere when a row has a
    # nan or +inf or only -inf, as there).
    top = tl.full((BV,), NEG_INF, tl.float64)
    for v0 in range(0, V, BV):
        lab = v0 + ov
        top = tl.maximum(top, tl.load(at + lab, mask=lab < V, other=NEG_INF).to(tl.float64))
    row_max = tl.max(top, axis=0)
    total = tl.zeros((BV,), tl.float64)
    for v0 in range(0, V, BV):
        lab = v0 + ov
        x = tl.load(at + lab, mask=lab < V, other=NEG_INF).to(tl.float64)
        total += tl.where(lab < V, tl.exp(x - row_max), 0.0)
    lse = tl.log(tl.sum(total, axis=0))
    # 2. The candidates: the N best labels, ties to the lowest label, as torch.topk on CUDA takes them. They are
    # ranked by the logit plus the penalty (nan as -inf), which log_softmax keeps in order (it subtracts one number
    # from a whole row, and rounding is monotonic), so the last bits of lse cannot change the choice.
    first = tl.program_id(1) * BN
    on = tl.arange(0, BN)
    if PRE_BEAM:
        if RANK:  # one block (BV >= V): every label's rank at once, the labels before it counted
            key = _rank_key(at, pen, ov, V)
            before = (key[None, :] > key[:, None]) | ((key[None, :] == key[:, None]) & (ov[None, :] < ov[:, None]))
            rank = tl.sum((before & (ov < V)[None, :]).to(tl.int32), axis=1)  # shape: (BV,)
            rank = tl.where(ov < V, rank, N)  # past the last label: never a candidate
            c = tl.sum(tl.where(rank[None, :] == (first + on)[:, None], ov[None, :], 0), axis=1)  # rank -> label
            c = tl.where(first + on < N, c, V).to(tl.int64)
        else:  # N passes, each taking the best label behind the one taken last in that order
            c = tl.full((BN,), V, tl.int64)  # V: no label (ranks beyond N)
            prev_k = tl.full((), float("inf"), tl.float64)
            prev_i = tl.full((), -1, tl.int64)
            for p in range(N):
                best_k = tl.full((BV,), NEG_INF, tl.float64)  # per lane over the blocks: the best, the first if tied
                best_i = tl.full((BV,), V, tl.int64)
                for v0 in range(0, V, BV):
                    lab = (v0 + ov).to(tl.int64)
                    key = _rank_key(at, pen, lab, V)
                    behind = (lab < V) & ((key < prev_k) | ((key == prev_k) & (lab > prev_i)))
                    take = behind & ((key > best_k) | (best_i == V))
                    best_k = tl.where(take, key, best_k)
                    best_i = tl.where(take, lab, best_i)
                prev_k = tl.max(best_k, axis=0)
                prev_i = tl.min(tl.where((best_k == prev_k) & (best_i < V), best_i, V), axis=0)
                c = tl.where(on == p - first, prev_i, c)
            # (prev_k, prev_i): the N-th; the labels behind it are not candidates.
    else:
        c = (first + on).to(tl.int64)
    mn = c < V
    # 3. psi of the candidates and their joint scores.
    w_att = tl.load(weight_ptr)
    w_ctc = tl.load(weight_ptr + 1)
    prefix = tl.load(prefix_ptr + row)
    live = tl.abs(prefix) < float("inf")
    ends = _ends(r_any_ptr, row, t, dead)
    psi = _prefix_scores(x_ptr, r_blank_ptr, r_any_ptr, start_ptr, last_ptr, row, c, mn, ends, t, blank, eos, dead,
                         V, BN, BT, T_STATIC)
    tl.store(psi_ptr + row * V + c, psi, mask=mn)
    s = _joint(at, pen, c, mn, row_max, lse, psi, prefix, live, w_att, w_ctc)
    tl.store(scores_ptr + row * V + c, s, mask=mn)
    if PRE_BEAM:
        if tl.program_id(1) == 0:  # the labels that are not candidates: psi -inf (eos's: ends), and their scores
            for v0 in range(0, V, BV):
                lab = (v0 + ov).to(tl.int64)
                if RANK:
                    rest = (lab < V) & (rank >= N)
                else:
                    key = _rank_key(at, pen, lab, V)
                    rest = (lab < V) & ((key < prev_k) | ((key == prev_k) & (lab > prev_i)))
                fill = tl.where((lab == eos) & (lab != blank), ends, NEG_INF)
                tl.store(psi_ptr + row * V + lab, fill, mask=rest)
                tl.store(scores_ptr + row * V + lab,
                         _joint(at, pen, lab, lab < V, row_max, lse, fill, prefix, live, w_att, w_ctc), mask=rest)


class FusedCTCPrefix:
    """The fused calls of ``scorer`` (built by it with ``fused=True``): :meth:`scores` and :meth:`advance` do what
    the scorer's PyTorch methods do, on its state tensors, in place. The scores are written to a buffer allocated
    here once (returned, and overwritten by the next call), as are the scratch buffers, so every call reads and
    writes the same memory (CUDA graphs)."""

    def __init__(self, scorer: CTCPrefixScorer) -> None:
        s = scorer  # its state is contiguous and its rows a multiple of its group (CTCPrefixScorer makes sure)
        rows, v, t = s.x.shape
        self.scorer, self.rows, self.v, self.t = weakref.proxy(s), rows, v, t  # owned by the scorer: no cycle
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


class FusedJointScores:
    """The scores of a joint CTC/attention step of ``search`` (a :class:`~mmgen.beam_search.BeamSearch` with a fused
    CTC scorer) in one launch: called with the decoder's logits (rows, v), it returns the step's scores (rows, v)
    float64, for the search's fused bookkeeping, and psi (rows, v) float64, for the scorer's ``advance``, as
    ``BeamSearch._scores`` (the PyTorch reference) does with log_softmax, the lexicon penalty, the pre-beam's
    ``topk``, :meth:`~mmgen.ctc.CTCPrefixScorer.scores` and the weighting, some twenty launches. Both are written
    to buffers allocated once (psi to the scorer's; both overwritten by the next call), and the state (trie nodes,
    the scorer's) is read where the search and the scorer update it in place, so a CUDA graph can replay the call.

    The pre-beam is the same set of labels as ``topk``'s (the order inside it does not matter: psi is written by
    label). The kernel ranks labels by logit plus penalty, ties to the lowest label. log_softmax subtracts one number
    from a whole row and rounding is monotonic, so it never reorders two labels; it can round two different logits
    to one value only when they differ by less than a float64 rounding step of their log-probability (float32
    logits that close both lie within about 1e-9 |log p| of zero), and only there would ``topk`` see a tie that the
    kernel does not. Among tied values ``topk`` on CUDA takes the lowest indices (its radix selection collects the
    values equal to the k-th in index order), as the kernel does; on the CPU its choice is unspecified. Masked labels
    (-inf: lexicon, banned ids) tie whenever a row allows fewer than ``pre_beam`` labels: they score -inf in either
    set, and only their psi differs (-inf or their CTC prefix score); ``advance`` reads psi only at a chosen label,
    a masked one only for a dead hypothesis (score -inf), which stays dead whatever its CTC state, so no result
    changes. Ties among finite scores (not expected of float32 logits, likelier of bf16 ones) decide which of the
    tied labels are scored at all: there only CUDA's order is matched. A row with a nan or +inf logit scores -inf
    everywhere in both (its log_softmax is nan); its pre-beam (nan ranked as -inf) sets only psi, which no live
    hypothesis reads.
    """

    def __init__(self, search: BeamSearch) -> None:
        ctc = search.ctc  # of the search's rows and labels (BeamSearch makes sure)
        if ctc is None or not ctc.fused:
            raise ValueError("fused joint scores: the search needs a fused CTC scorer")
        rows, v, t = ctc.x.shape
        self.search, self.ctc = weakref.proxy(search), ctc  # owned by the search: no cycle
        dev = ctc.x.device
        self.psi = ctc._fused.psi
        self.scores = torch.empty(rows, v, dtype=torch.float64, device=dev)
        lam = search.lam
        # λ and 1 - λ from memory: Triton passes Python floats to a kernel as fp32.
        self._weight = torch.tensor([1 - lam, lam], dtype=torch.float64, device=dev)
        self._penalty = search.penalty.contiguous()
        pre_beam = lam < 1 and search.pre_beam < v  # pre_beam = v: every label, as without
        n = search.pre_beam if pre_beam else v
        # Candidates per program: more for a large vocabulary without a pre-beam, where every program also reads
        # the whole row for log_softmax.
        bn = min(pow2(n, 2), max(JOINT_CANDIDATES, pow2(v) // 64))
        self._grid = (rows, triton.cdiv(n, bn))
        bv = min(pow2(v, 2), JOINT_LABELS)
        self._meta = dict(V=v, N=n, PRE_BEAM=pre_beam, RANK=bv >= v and bv <= RANK_LABELS,
                          HAS_TRIE=search.trie is not None, BN=bn, BT=min(pow2(t, 16), max(TILE // bn, 16)), BV=bv,
                          T_STATIC=t if interpreted() else 0, num_warps=4)

    def __call__(self, logits: Tensor) -> tuple[Tensor, Tensor]:
        """``logits`` (rows, v), any float dtype (taken in float64, as the reference's ``double()``); returns
        ``(scores, psi)``."""
        s, c = self.search, self.ctc
        if logits.shape != self.scores.shape:
            raise ValueError(f"logits: {tuple(logits.shape)}, expected {tuple(self.scores.shape)}")
        if logits.stride(1) != 1:
            logits = logits.contiguous()
        _joint_scores_kernel[self._grid](
            logits, logits.stride(0), self._penalty, s.node, self._weight, c.x, c.r_blank, c.r_any, c.start, c.last,
            c.prefix, self.psi, self.scores, c.x.shape[2], c.blank, c.eos, c.FLOOR / 2, **self._meta)
        return self.scores, self.psi
