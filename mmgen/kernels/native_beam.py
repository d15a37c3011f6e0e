"""The non-decoder work of a beam search step on the CPU as C++ kernels (``csrc/beam.cpp``, built by
:mod:`mmgen.kernels.native`): the CPU counterparts of the Triton kernels of :mod:`mmgen.kernels.beam_step` and
:mod:`mmgen.kernels.ctc_prefix`, with the same call contracts, tie rules and results.

In PyTorch, a joint CTC/attention step's work outside the decoder is 140 tiny operators (joint scores, selection,
CTC advance), each a few microseconds of dispatch: 0.47 to 0.85 ms at batch 1, beam 4 (31 labels, 250 frames, pre-beam
6), 1.4 to 2.3 ms at batch 8, on a 2-core CPU. Here it is three operator calls of plain loops over the state tensors,
0.04 to 0.06 ms and 0.2 to 0.25 ms (``benchmarks/native_beam_probe.py``). The PyTorch code stays the reference
(``BeamSearch(native=False)``, ``CTCPrefixScorer(native=False)``), and ``tests/test_native_kernels.py`` compares the
two. Each wrapper binds the state tensors of its search or scorer once and allocates its outputs and scratch once:
the search and the scorer must update their state in place, as they do. Outputs (``index``, ``keep_label``, scores,
psi) are overwritten by the next call.

Differences from the reference, all where it leaves things unspecified (as the Triton kernels'): among tied
candidates the kernels take the lowest index (``torch.topk`` on the CPU: unspecified); -inf candidates tie often,
which changes only the labels, parents and trie nodes of dead hypotheses, while ties among finite scores (not
expected of float32 logits, seen with bf16 ones) may keep or finish another of the tied hypotheses. The pre-beam of
the joint scores ranks labels by logit plus penalty (see :class:`mmgen.kernels.ctc_prefix.FusedJointScores`). Sums
run in another order, and exp and log1p are the kernels' own (last bits); the CTC forward recursion is a loop over
frames instead of the reference's closed form (equal up to float64 rounding: about 1e-15 relative at 250 frames). A
nan step score counts as -inf (a dead candidate).
"""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from mmgen.kernels.native import native_ops, native_usable

if TYPE_CHECKING:
    from mmgen.beam_search import BeamSearch
    from mmgen.ctc import CTCPrefixScorer

__all__ = ["NativeBeamSelect", "NativeCTCPrefix", "NativeJointScores", "use_native"]


class NativeBeamSelect:
    """The bookkeeping of ``search``'s steps (``mmgen_cpu::beam_select``), as :class:`mmgen.kernels.beam_step.
    BeamSelect`: called with the step's scores, it updates the search's state in place (scores, finished book, trie
    nodes, history, label, position, settled, done) and returns ``(index, keep_label)`` (rows,) long, buffers owned
    here."""

    def __init__(self, search: BeamSearch) -> None:
        if search.v < 2:
            raise ValueError(f"the native beam step needs a vocabulary of at least 2 ids, got {search.v}")
        rows = search.b * search.k
        self.search = weakref.proxy(search)  # the search owns this: no reference cycle
        self.index = torch.zeros(rows, dtype=torch.long)
        self.keep_label = torch.zeros(rows, dtype=torch.long)
        self._penalty = search.penalty.contiguous()
        self._trie = search.trie[1].to(torch.long).contiguous() if search.trie is not None else None
        self._op = native_ops().beam_select.default

    def __call__(self, scores: Tensor, *, normalise: bool) -> tuple[Tensor, Tensor]:
        """``scores`` (rows, v): with ``normalise``, the decoder's logits (any float dtype; log_softmax and the
        lexicon penalty are taken in the kernel, in float64), else the step's final float64 scores."""
        s = self.search
        if scores.stride(1) != 1:
            scores = scores.contiguous()
        self._op(scores, self._penalty, self._trie, s.scores, s.node, s.label, s.position, s.count, s.fin_scores,
                 s.fin_length, s.fin_row, s.settled, s.done, s.history_label, s.history_parent, self.index,
                 self.keep_label, s.eos, normalise)
        return self.index, self.keep_label


class NativeCTCPrefix:
    """The native calls of ``scorer`` (built by it with ``native`` on): :meth:`scores` and :meth:`advance` do what
    its PyTorch methods do, on its state tensors, in place (``mmgen_cpu::ctc_scores``, ``mmgen_cpu::ctc_advance``).
    psi comes in a buffer allocated here once, overwritten by the next call."""

    def __init__(self, scorer: CTCPrefixScorer) -> None:
        s = scorer  # its state is contiguous and its rows a multiple of its group (CTCPrefixScorer makes sure)
        rows, v, _ = s.x.shape
        self.scorer = weakref.proxy(s)  # the scorer owns this: no reference cycle
        self.psi = torch.empty(rows, v, dtype=torch.float64)
        # group=1: a row may take any row's hypothesis, and its frames with it (through this buffer).
        self._x_scratch = torch.empty_like(s.x) if s.group == 1 else None
        ops = native_ops()
        self._scores, self._advance = ops.ctc_scores.default, ops.ctc_advance.default

    def scores(self, candidates: Tensor | None) -> Tensor:
        s = self.scorer
        if candidates is not None:
            candidates = candidates.contiguous()
        self._scores(s.x, s.r_blank, s.r_any, s.start, s.last, s.prefix, candidates, self.psi, s.blank, s.eos)
        return self.psi

    def advance(self, index: Tensor, labels: Tensor, psi: Tensor) -> None:
        s = self.scorer
        self._advance(s.x, s.r_blank, s.r_any, s.start, s.last, s.prefix, index.contiguous(), labels.contiguous(),
                      psi.contiguous(), self._x_scratch, s.blank, s.group)


class NativeJointScores:
    """The scores of a joint CTC/attention step of ``search`` (a :class:`~mmgen.beam_search.BeamSearch` with a
    native CTC scorer) in one call (``mmgen_cpu::joint_scores``), as :class:`mmgen.kernels.ctc_prefix.
    FusedJointScores`: called with the decoder's logits (rows, v), any float dtype, it returns the step's scores
    (rows, v) float64 and psi (rows, v) float64 (the scorer's buffer), both overwritten by the next call."""

    def __init__(self, search: BeamSearch) -> None:
        ctc = search.ctc  # of the search's rows and labels (BeamSearch makes sure)
        if ctc is None or not ctc.native:
            raise ValueError("native joint scores: the search needs a native CTC scorer")
        rows, v, _ = ctc.x.shape
        self.search, self.ctc = weakref.proxy(search), ctc  # owned by the search: no cycle
        self.psi = ctc._native.psi
        self.scores = torch.empty(rows, v, dtype=torch.float64)
        self._penalty = search.penalty.contiguous()
        # The pre-beam's size, 0 for every label (λ = 1, or a pre-beam of the whole vocabulary).
        self._pre_beam = search.pre_beam if search.lam < 1 and search.pre_beam < v else 0
        self._op = native_ops().joint_scores.default

    def __call__(self, logits: Tensor) -> tuple[Tensor, Tensor]:
        s, c = self.search, self.ctc
        if logits.stride(1) != 1:
            logits = logits.contiguous()
        self._op(logits, self._penalty, s.node if s.trie is not None else None, c.x, c.r_blank, c.r_any, c.start,
                 c.last, c.prefix, self.psi, self.scores, c.blank, c.eos, s.lam, self._pre_beam)
        return self.scores, self.psi


def use_native(native: bool | None, device: torch.device | str, fused: bool) -> bool:
    """Whether a search or CTC scorer on ``device`` runs these kernels, given its ``native`` argument: None, where its
    tensors are on the CPU, it does not run the Triton kernels (``fused``) and the kernels are built
    (:func:`mmgen.kernels.native.native_usable`: not under ``MMGEN_NATIVE=0``); True, always (an error where they
    cannot run); False, never (the PyTorch code)."""
    on_cpu = torch.device(device).type == "cpu"
    if native is None:
        return on_cpu and not fused and native_usable()
    if native:
        if not on_cpu:
            raise ValueError(f"the native (C++) decoding kernels run on the CPU, not on {device}")
        if fused:
            raise ValueError("native=True and fused=True: a step runs either the C++ or the Triton kernels")
        native_ops()  # raises where the kernels cannot be built or are turned off
    return native
