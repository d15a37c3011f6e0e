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
    The forward recursion over frames is linear in probability space, so each step solves it in closed form with
    cumulative sums and ``logcumsumexp`` (float64, as the closed form subtracts large log-probabilities) instead of a
    Python loop over frames: a few large operations per label, not three small ones per frame. ``log_probs``
    (rows, t, v) and ``lengths`` (rows,): each row's real frames; frames past a row's length are treated as certain
    blanks, which leaves every probability unchanged.
    """

    FLOOR = -1e4  # log-probability standing for "impossible" inside the sums (exp underflows to exactly 0)

    def __init__(self, log_probs: Tensor, lengths: Tensor, blank: int, eos: int) -> None:
        rows, t, v = log_probs.shape
        pad = torch.arange(t, device=log_probs.device)[None, :] >= lengths[:, None]  # shape: (rows, t)
        x = log_probs.double().masked_fill(pad[:, :, None], NEG_INF)
        x = x.masked_fill(pad[:, :, None] & (torch.arange(v, device=x.device) == blank), 0.0)
        self.x = x.clamp_min(self.FLOOR)
        self.blank, self.eos = blank, eos
        self.step = 0  # labels in every live hypothesis
        # Per row and frame: log P of the alignments of g up to that frame ending in a label (0) or a blank (1).
        self.r = torch.stack([torch.full((rows, t), NEG_INF, dtype=x.dtype, device=x.device),
                              self.x[:, :, blank].cumsum(dim=1)], dim=-1)
        self.last = torch.full((rows,), -1, dtype=torch.long, device=x.device)  # g's last label (-1: g is empty)
        self.prefix = torch.zeros(rows, dtype=x.dtype, device=x.device)  # log P_ctc(g ...)

    def scores(self, candidates: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """-> (``psi`` (rows, v): log prefix probability of ``g + c`` for every candidate label ``c``, -inf for the
        others, and of exactly ``g`` at ``eos``; the recursion's new state, for :meth:`advance`).

        ``candidates`` (rows, n): the labels to score per row (a search's pre-beam, e.g. the attention decoder's
        best few), every label by default. Scoring few labels is cheaper; the scores of those labels are the same.
        """
        x, (rows, t, v) = self.x, self.x.shape
        if candidates is None:
            candidates = torch.arange(v, device=x.device).expand(rows, v)
        n = candidates.shape[1]
        xc = x.gather(2, candidates[:, None, :].expand(rows, t, n))  # shape: (rows, t, n)
        r_label, r_blank = self.r[..., 0], self.r[..., 1]
        # phi: alignments of g that may be followed by a new label c; a repeat of g's last label needs a blank first.
        repeat = (candidates == self.last[:, None])[:, None, :]  # shape: (rows, 1, n)
        phi = torch.where(repeat, r_blank[:, :, None], torch.logaddexp(r_label, r_blank)[:, :, None])
        # g + c ending in c at frame 0: only when g is empty.
        first = xc[:, :1] if self.step == 0 else torch.full_like(xc[:, :1], NEG_INF)
        # Ending in c at frame f: label[f] = (label[f-1] (+) phi[f-1]) + x[f]. With L[f] = x[1] + ... + x[f],
        # label[f] - L[f] = (label[f-1] - L[f-1]) (+) (phi[f-1] - L[f-1]): a running log-sum.
        cum = xc.cumsum(dim=1) - xc[:, :1]
        label = torch.logcumsumexp(torch.cat([first, (phi - cum)[:, :-1]], dim=1), dim=1) + cum
        # Ending in blank: blank[f] = (label[f-1] (+) blank[f-1]) + x_blank[f], the same way.
        xb = x[:, :, self.blank, None]
        cum_b = xb.cumsum(dim=1) - xb[:, :1]
        none = torch.full_like(first, NEG_INF)
        blank = torch.logcumsumexp(torch.cat([none, (label - cum_b)[:, :-1]], dim=1), dim=1) + cum_b
        # The prefix probability: g + c's first emission of c, at any frame.
        psi_c = torch.logsumexp(torch.cat([first, phi[:, :-1] + xc[:, 1:]], dim=1), dim=1)
        psi = torch.full((rows, v), NEG_INF, dtype=x.dtype, device=x.device).scatter_(1, candidates, psi_c)
        psi[:, self.eos] = torch.logaddexp(r_label[:, -1], r_blank[:, -1])
        psi = psi.masked_fill(psi <= self.FLOOR / 2, NEG_INF)  # a path through an impossible frame is impossible
        psi[:, self.blank] = NEG_INF
        self._candidates = candidates
        return psi, torch.stack([label, blank], dim=2)

    def advance(self, index: Tensor, labels: Tensor, psi: Tensor, state: Tensor) -> None:
        """Row ``i`` becomes hypothesis ``index[i]`` extended by ``labels[i]`` (a candidate of the last
        :meth:`scores`)."""
        column = (self._candidates.index_select(0, index) == labels[:, None]).int().argmax(dim=1)
        self.r = state[index, :, :, column]  # shape: (rows, t, 2)
        self.prefix = psi[index, labels]
        self.last = labels
        self.x = self.x.index_select(0, index)
        self.step += 1
