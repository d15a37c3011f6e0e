"""CTC decoding: greedy (best path) and prefix beam search, and the label-length rule CTC imposes.

Written here rather than taken from torchaudio: ``torchaudio.models.decoder.ctc_decoder`` needs the flashlight-text
package (not a dependency) and ``cuda_ctc_decoder`` runs on CUDA only; the search below is the textbook prefix beam
search (Graves 2012; Hannun et al. 2014) without a language model, on the CPU.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from mmgen.kernels import triton_usable
from mmgen.kernels.native_beam import NativeCTCPrefix, use_native

__all__ = ["CTCPrefixScorer", "ctc_greedy", "ctc_prefix_beam_search", "min_ctc_frames"]

NEG_INF = -math.inf


def min_ctc_frames(labels: Sequence[int] | Tensor) -> int:
    """Frames CTC needs to emit ``labels``: one per label, plus a blank between each pair of equal neighbours."""
    if isinstance(labels, Tensor):
        labels = labels.tolist()
    repeats = sum(1 for a, b in zip(labels, labels[1:]) if a == b)
    return len(labels) + repeats


def ctc_greedy(log_probs: Tensor, lengths: Tensor, blank: int) -> list[list[int]]:
    """Best path: the most likely label per frame, repeats merged, blanks dropped. log_probs (b, t, v)."""
    best = log_probs.argmax(dim=-1).cpu()  # shape: (b, t)
    out = []
    for row, n in zip(best, lengths.tolist()):
        row = row[:n]
        keep = torch.ones_like(row, dtype=torch.bool)
        keep[1:] = row[1:] != row[:-1]
        out.append([t for t in row[keep].tolist() if t != blank])
    return out


def ctc_prefix_beam_search(log_probs: Tensor, blank: int, beam_size: int = 8,
                           token_beam: int | None = None) -> list[tuple[list[int], float]]:
    """The ``beam_size`` most likely label sequences of one utterance and their log-probabilities (summed over all
    alignments), best first. log_probs (t, v), already restricted to the utterance's real frames.

    ``token_beam`` (default ``beam_size``) limits the labels tried at each frame to the most likely ones.
    """
    lp = log_probs.detach().double().cpu().numpy()
    k = min(token_beam or beam_size, lp.shape[1])
    # Each prefix keeps two log-probabilities: of the alignments ending in blank, and ending in its last label.
    beams: dict[tuple[int, ...], tuple[float, float]] = {(): (0.0, NEG_INF)}
    for frame in lp:
        candidates = [int(c) for c in np.argpartition(-frame, k - 1)[:k] if c != blank]
        nxt: dict[tuple[int, ...], list[float]] = {}

        def add(prefix: tuple[int, ...], blank_lp: float = NEG_INF, label_lp: float = NEG_INF) -> None:
            entry = nxt.setdefault(prefix, [NEG_INF, NEG_INF])
            entry[0] = np.logaddexp(entry[0], blank_lp)
            entry[1] = np.logaddexp(entry[1], label_lp)

        for prefix, (p_b, p_l) in beams.items():
            total = np.logaddexp(p_b, p_l)
            add(prefix, blank_lp=total + frame[blank])
            last = prefix[-1] if prefix else None
            if last is not None:
                add(prefix, label_lp=p_l + frame[last])  # the last label repeated: the prefix does not grow
            for c in candidates:
                # A label equal to the last one extends the prefix only across a blank.
                add(prefix + (c,), label_lp=(p_b if c == last else total) + frame[c])
        ranked = sorted(nxt.items(), key=lambda kv: -np.logaddexp(*kv[1]))[:beam_size]
        beams = {p: (v[0], v[1]) for p, v in ranked}
    return [(list(p), float(np.logaddexp(*v))) for p, v in sorted(beams.items(), key=lambda kv: -np.logaddexp(*kv[1]))]


class CTCPrefixScorer:
    """CTC prefix scores for a label-synchronous beam search (joint CTC/attention decoding, Watanabe et al. 2017):
    for every live hypothesis ``g`` (a row) and every label ``c``, ``log P_ctc(g + c ... | x)``, the probability of
    all label sequences that start with ``g + c``; for ``eos``, the probability of exactly ``g``. A hypothesis's
    score can only fall as it grows, and a finished one carries its full CTC log-likelihood.

    Written here: torchaudio's CTC decoders are CTC-only searches and offer no prefix scorer to join to another model.
    The forward recursion over frames is linear in probability space, so it is solved in closed form with cumulative
    sums and ``logcumsumexp`` (float64, as the closed form subtracts large log-probabilities) instead of a Python loop
    over frames. Scoring a candidate needs only a log-sum over frames; the recursion itself runs in :meth:`advance`,
    for the extensions the search keeps (one per row), not for every candidate.

    Every operation has a fixed shape and none reads a value back to the host, so a step can be captured in a CUDA
    graph; :meth:`advance` updates the state in place.

    With ``fused``, :meth:`scores` is one Triton launch and :meth:`advance` one (two for ``group=1`` beyond 16 rows)
    instead of some seventy small PyTorch kernels (:class:`mmgen.kernels.ctc_prefix.FusedCTCPrefix`), on the same
    state tensors; the scores then come in a buffer owned by the scorer, overwritten by the next :meth:`scores`. The
    results are the PyTorch code's (the reference, ``fused=False``) up to the order of float64 sums (last bits). A
    fused :class:`~mmgen.beam_search.BeamSearch` over a fused scorer does not call :meth:`scores`: its joint scores
    come from one launch that includes them (:class:`mmgen.kernels.ctc_prefix.FusedJointScores`, into the same
    buffer).

    With ``native`` (the default on the CPU), :meth:`scores` and :meth:`advance` are one call each of C++ kernels
    (:class:`mmgen.kernels.native_beam.NativeCTCPrefix`), the scores in a buffer of the scorer's as with ``fused``;
    :meth:`advance` runs the forward recursion as a plain loop over frames (equal to the closed form up to float64
    rounding). A native :class:`~mmgen.beam_search.BeamSearch` over a native scorer takes its joint scores from one
    call (:class:`mmgen.kernels.native_beam.NativeJointScores`).

    Args:
        log_probs: (rows, t, v) CTC log-probabilities.
        lengths: (rows,) real frames per row; frames past a row's length are treated as certain blanks, which leaves
            every probability unchanged.
        blank: the blank id.
        eos: the id scored as "the hypothesis ends here".
        group: rows come in groups of ``group`` consecutive rows that score the same utterance (the beams of a beam
            search), and :meth:`advance` moves rows only within their group, so the inputs are not reordered.
        fused: run :meth:`scores` and :meth:`advance` as Triton kernels; default: on CUDA with Triton
            (:func:`mmgen.kernels.triton_usable`). Elsewhere only when asked for, under Triton's interpreter.
        native: run them as C++ kernels on the CPU (:mod:`mmgen.kernels.native_beam`). None (default): where the
            log-probabilities are on the CPU, ``fused`` is not on and the kernels can be built (not under
            ``MMGEN_NATIVE=0``); True: required (an error where they cannot run); False: the PyTorch code (the
            reference, with ``fused=False``). ``fused=False`` alone does not turn them off.
    """

    FLOOR = -1e4  # log-probability standing for "impossible" inside the sums (exp underflows to exactly 0)

    def __init__(self, log_probs: Tensor, lengths: Tensor, blank: int, eos: int, group: int = 1,
                 fused: bool | None = None, native: bool | None = None) -> None:
        self.blank, self.eos, self.group = blank, eos, group
        # Label-major (rows, v, t): the sums over frames run along contiguous memory.
        self.x = self._frames(log_probs, lengths)
        rows, _, t = self.x.shape
        if rows % group:
            raise ValueError(f"rows={rows} must be a multiple of group={group}")
        dev, dt = self.x.device, self.x.dtype
        # The state (values at the start: _start_over), every tensor contiguous, updated in place. Per row and frame
        # f, log P of the alignments of g over frames 0..f ending in a blank, and ending in either:
        self.r_blank = torch.empty(rows, t, dtype=dt, device=dev)
        self.r_any = torch.empty(rows, t, dtype=dt, device=dev)
        self.start = torch.empty(rows, dtype=dt, device=dev)  # log P of the prefix emitted before frame 0
        self.last = torch.empty(rows, dtype=torch.long, device=dev)  # g's last label (-1: g is empty)
        self.prefix = torch.empty(rows, dtype=dt, device=dev)  # log P_ctc(g ...)
        self._start_over()
        self.fused = triton_usable(dev) if fused is None else fused
        if self.fused:
            from mmgen.kernels.ctc_prefix import FusedCTCPrefix  # imports Triton: only when asked for

            self._fused = FusedCTCPrefix(self)
        self.native = use_native(native, dev, self.fused)
        if self.native:
            self._native = NativeCTCPrefix(self)

    def _frames(self, log_probs: Tensor, lengths: Tensor) -> Tensor:
        """(rows, t, v) log-probabilities -> (rows, v, t) float64, padded frames certain blanks, floored."""
        rows, t, v = log_probs.shape
        pad = torch.arange(t, device=log_probs.device)[None, :] >= lengths[:, None]  # shape: (rows, t)
        x = log_probs.double().masked_fill(pad[:, :, None], NEG_INF)
        x = x.masked_fill(pad[:, :, None] & (torch.arange(v, device=x.device) == self.blank), 0.0)
        return x.clamp_min(self.FLOOR).transpose(1, 2).contiguous()

    def refill(self, log_probs: Tensor, lengths: Tensor) -> None:
        """Start again over new log-probabilities of the same shape, in place (every state tensor keeps its address,
        so a captured search step replays over them)."""
        self.x.copy_(self._frames(log_probs, lengths))
        self._start_over()

    def _start_over(self) -> None:
        """The state of the empty hypothesis: only blanks so far; before frame 0, log 1 (the empty prefix)."""
        torch.cumsum(self.x[:, self.blank], dim=1, out=self.r_blank)
        self.r_any.copy_(self.r_blank)
        self.start.zero_()
        self.last.fill_(-1)
        self.prefix.zero_()

    def _shift(self, r: Tensor) -> Tensor:
        """r (rows, t) one frame later, with the start state before frame 0: the alignments a new label may follow."""
        return torch.cat([self.start[:, None], r[:, :-1]], dim=1)

    def scores(self, candidates: Tensor | None = None) -> Tensor:
        """``psi`` (rows, v): the log prefix probability of ``g + c`` for every candidate label ``c`` (-inf for the
        others), and of exactly ``g`` at ``eos``.

        ``candidates`` (rows, n): the labels to score per row (a search's pre-beam, e.g. the attention decoder's
        best few), every label by default. Scoring few labels is cheaper; the scores of those labels are the same.
        """
        if self.fused:
            return self._fused.scores(candidates)
        if self.native:
            return self._native.scores(candidates)
        x, (rows, v, t) = self.x, self.x.shape
        if candidates is None:
            candidates = torch.arange(v, device=x.device).expand(rows, v)
        n = candidates.shape[1]
        xc = x.gather(1, candidates[:, :, None].expand(rows, n, t))  # shape: (rows, n, t)
        # c's first emission at frame f follows an alignment of g over frames < f; a repeat of g's last label must
        # follow one that ends in a blank.
        repeat = (candidates == self.last[:, None])[:, :, None]  # shape: (rows, n, 1)
        phi = torch.where(repeat, self._shift(self.r_blank)[:, None, :], self._shift(self.r_any)[:, None, :])
        psi_c = torch.logsumexp(phi + xc, dim=2)  # shape: (rows, n)
        psi = torch.full((rows, v), NEG_INF, dtype=x.dtype, device=x.device).scatter_(1, candidates, psi_c)
        psi[:, self.eos] = self.r_any[:, -1]
        psi = psi.masked_fill(psi <= self.FLOOR / 2, NEG_INF)  # a path through an impossible frame is impossible
        psi[:, self.blank] = NEG_INF
        return psi

    def advance(self, index: Tensor, labels: Tensor, psi: Tensor) -> None:
        """Row ``i`` becomes hypothesis ``index[i]`` extended by ``labels[i]`` (a candidate of the last
        :meth:`scores`, whose ``psi`` is passed back)."""
        if self.fused:
            self._fused.advance(index, labels, psi)
            return
        if self.native:
            self._native.advance(index, labels, psi)
            return
        x = self.x if self.group > 1 else self.x.index_select(0, index)
        xl = x.gather(1, labels[:, None, None].expand(-1, 1, x.shape[2]))[:, 0]  # shape: (rows, t)
        repeat = (labels == self.last.index_select(0, index))[:, None]
        phi = torch.where(repeat, self._shift(self.r_blank).index_select(0, index),
                          self._shift(self.r_any).index_select(0, index))
        # Ending in c at frame f: label[f] = (label[f-1] (+) phi[f]) + x[f], label[-1] = log 0. With L[f] =
        # x[0] + ... + x[f], label[f] - L[f] = (label[f-1] - L[f-1]) (+) (phi[f] - L[f-1]): a running log-sum.
        cum = xl.cumsum(dim=1)
        label = torch.logcumsumexp(phi - (cum - xl), dim=1) + cum
        # Ending in blank at frame f: blank[f] = (label[f-1] (+) blank[f-1]) + x_blank[f], blank[-1] = log 0.
        xb = x[:, self.blank]
        cum_b = xb.cumsum(dim=1)
        blank = torch.logcumsumexp(self._none_then(label) - (cum_b - xb), dim=1) + cum_b
        self.r_blank.copy_(blank)
        self.r_any.copy_(torch.logaddexp(label, blank))
        self.start.fill_(NEG_INF)
        self.prefix.copy_(psi[index, labels])
        self.last.copy_(labels)
        if self.group == 1:
            self.x.copy_(x)

    @staticmethod
    def _none_then(r: Tensor) -> Tensor:
        return torch.cat([torch.full_like(r[:, :1], NEG_INF), r[:, :-1]], dim=1)
