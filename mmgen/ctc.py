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

__all__ = ["ctc_greedy", "ctc_prefix_beam_search", "min_ctc_frames"]

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
