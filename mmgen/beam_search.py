"""Label-synchronous beam search over an incremental decoder, kept on the device.

Every step has fixed shapes and reads nothing back to the host: the decoder step, optional CTC prefix scores (joint
CTC/attention decoding) and lexicon constraints, the choice of the best continuations, the book of finished
hypotheses and the reorder of the decoder's state. On a GPU one step is captured once as a CUDA graph and replayed,
so a step costs one graph launch instead of a few hundred kernel launches from Python; on the CPU the same step runs
eagerly. With ``fused`` (the default on CUDA), the bookkeeping after the decoder's scores is one Triton kernel
(:mod:`mmgen.kernels.beam_step`) instead of some sixty small ones, and a joint CTC/attention step's scores one more
(:class:`mmgen.kernels.ctc_prefix.FusedJointScores`) instead of some twenty. On the CPU (``native``, the default
there), the same work is done by C++ kernels of the same contracts (:mod:`mmgen.kernels.native_beam`): three calls
for a joint step where PyTorch dispatches some 150 tiny operators. Written here: the beam searches of torchaudio
are CTC-only, and the generic ones (ESPnet, fairseq) keep their bookkeeping in Python, one host round trip per step.

Notation: ``b`` utterances, ``k`` beam, ``rows = b * k`` hypotheses, ``v`` vocabulary, ``L`` positions.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import Tensor

from mmgen.ctc import CTCPrefixScorer
from mmgen.graphs import capture
from mmgen.kernels import triton_usable
from mmgen.kernels.native_beam import NativeBeamSelect, NativeJointScores, use_native

__all__ = ["BeamSearch", "lexicon_trie"]

NEG_INF = -math.inf

# decoder(tokens (rows,), position (1,) long tensor, length) -> logits (rows, v); ``length`` is the number of filled
# positions after this step (a host integer) in eager steps and None in fixed-shape (captured) steps.
StepFn = Callable[[Tensor, Tensor, "int | None"], Tensor]
# reorder(index (rows,), length): row i of the decoder's state becomes old row index[i].
ReorderFn = Callable[[Tensor, "int | None"], None]


def lexicon_trie(words: Sequence[Sequence[int]], vocab: int, eos: int, space: int | None = None,
                 device: torch.device | str | None = None) -> tuple[Tensor, Tensor]:
    """Words (label ids) as the trie :class:`BeamSearch` takes: ``allowed`` (nodes, v) says which ids may follow each
    node, ``step`` (nodes, v) gives the node an id leads to. Node 0 is a word's start; ``space`` (after a whole word)
    leads back to it, and ``eos`` may follow a whole word. Written here: torchaudio's lexicon decoder is CTC-only and
    needs flashlight-text."""
    children: list[dict[int, int]] = [{}]
    whole = [False]
    for word in words:
        node = 0
        for i in word:
            if i not in children[node]:
                children[node][i] = len(children)
                children.append({})
                whole.append(False)
            node = children[node][i]
        whole[node] = True
    allowed = torch.zeros(len(children), vocab, dtype=torch.bool)
    step = torch.zeros(len(children), vocab, dtype=torch.long)
    for node, kids in enumerate(children):
        for i, child in kids.items():
            allowed[node, i], step[node, i] = True, child
        if whole[node] and node != 0:
            allowed[node, eos] = True
            if space is not None:
                allowed[node, space] = True  # step: back to node 0
    return allowed.to(device), step.to(device)


class BeamSearch:
    """Beam search with ``k`` beams per utterance over ``decoder``, every hypothesis starting with ``bos``.

    A step scores each live hypothesis's continuations ``log p(c | g)``; with a CTC scorer, ``(1 - λ) log p(c | g) +
    λ (log p_ctc(g + c ...) - log p_ctc(g ...))``, for the ``pre_beam`` best labels of the decoder (all when λ = 1),
    so a finished hypothesis scores ``(1 - λ) log p_att + λ log p_ctc``. The ``k`` best continuations of each
    utterance that end in ``eos`` are finished (up to ``k`` per utterance); the ``k`` best others live on. An
    utterance is settled once a finished hypothesis scores at least its best live one: scores only fall as
    hypotheses grow, so none can overtake it.

    Args:
        decoder: the step function (see ``StepFn``); it owns its state (a KV cache).
        reorder: reorders that state as beams move (see ``ReorderFn``).
        batch: utterances ``b``; rows ``i * k ... i * k + k - 1`` are utterance ``i``'s beams.
        beam: ``k``.
        vocab: ``v``.
        bos, eos: the start and end ids.
        banned: ids never produced.
        max_len: most steps (labels, ``eos`` included); the decoder holds ``max_len`` positions.
        device: where the search runs.
        ctc: prefix scorer over the same rows (built with ``group=beam``), or None.
        ctc_weight: λ.
        pre_beam: labels per hypothesis scored by CTC (the decoder's best), when λ < 1.
        trie: the lexicon as ``(allowed (nodes, v), step (nodes, v))``: which ids may follow each trie node and the
            node they lead to; node 0 starts a word.
        fused: a step's bookkeeping (from the step's scores to the new state: choice of the best continuations,
            finished book, trie nodes, history, flags; with no CTC scorer, the ``log_softmax`` and lexicon penalty
            too) runs as one Triton kernel (:class:`mmgen.kernels.beam_step.BeamSelect`) instead of some sixty small
            PyTorch ones; with a fused CTC scorer, the step's joint scores from the logits (log_softmax, penalty,
            pre-beam, CTC prefix scores, weights) are one more (:class:`mmgen.kernels.ctc_prefix.FusedJointScores`)
            instead of some twenty; default: on CUDA with Triton (:func:`mmgen.kernels.triton_usable`); on the CPU
            only under Triton's interpreter, as tests run it. Same results; the PyTorch code is the reference
            (``fused=False, native=False``).
        native: the same work as ``fused`` by C++ kernels on the CPU (:mod:`mmgen.kernels.native_beam`: the
            bookkeeping as :class:`~mmgen.kernels.native_beam.NativeBeamSelect`, with a native CTC scorer the joint
            scores as :class:`~mmgen.kernels.native_beam.NativeJointScores`), built with the machine's compiler on
            first use (:mod:`mmgen.kernels.native`). None (default): where the search runs on the CPU, ``fused`` is
            not on and the kernels can be built (not under ``MMGEN_NATIVE=0``); True: required (an error where they
            cannot run); False: the PyTorch code. ``fused=False`` alone does not turn them off. Same results as the
            PyTorch code (the tie rules of ``fused``).
    """

    def __init__(self, decoder: StepFn, reorder: ReorderFn, *, batch: int, beam: int, vocab: int, bos: int,
                 eos: int, banned: Sequence[int], max_len: int, device: torch.device,
                 ctc: CTCPrefixScorer | None = None, ctc_weight: float = 0.0, pre_beam: int | None = None,
                 trie: tuple[Tensor, Tensor] | None = None, fused: bool | None = None,
                 native: bool | None = None) -> None:
        self.decoder, self.reorder = decoder, reorder
        self.b, self.k, self.v, self.eos, self.max_len = batch, beam, vocab, eos, max_len
        self.ctc, self.lam, self.trie = ctc, ctc_weight, trie
        if ctc is not None and ctc.x.shape[:2] != (batch * beam, vocab):
            raise ValueError(f"CTC scorer of {ctc.x.shape[0]} rows and {ctc.x.shape[1]} labels for a search of "
                             f"{batch * beam} rows and {vocab} labels")
        self.pre_beam = min(vocab, max(beam + 1, pre_beam or beam))
        b, k, rows = batch, beam, batch * beam
        long = dict(dtype=torch.long, device=device)
        # What each lexicon node (one node without a lexicon) allows, as 0 or -inf to add to the scores.
        allowed = torch.ones(1, vocab, dtype=torch.bool, device=device) if trie is None else trie[0]
        allowed = allowed.clone()
        allowed[:, list(banned)] = False
        self.penalty = torch.zeros(allowed.shape, dtype=torch.float64, device=device).masked_fill(~allowed, NEG_INF)
        self.base = torch.arange(b, **long)[:, None] * k  # shape: (b, 1); each utterance's first row
        self.first_k = torch.arange(2 * k, **long)[None, :] < k  # the best k of 2k candidates
        self.rank = torch.arange(2 * k, **long)[None, :].expand(b, -1)
        # State, all updated in place (its values at the start: reset).
        self.position = torch.zeros(1, **long)  # the position of the labels being fed (= steps taken)
        self.label = torch.zeros(rows, **long)  # each hypothesis's last label, fed to the next step
        # Step s gave row i label[s, i] after the hypothesis of row parent[s, i]: hypotheses are traced back from
        # these at the end, so no step copies whole label sequences.
        self.history_label = torch.zeros(max_len, rows, **long)
        self.history_parent = torch.zeros(max_len, rows, **long)
        # Scores in float64: they are sums over many steps, and the CTC prefix scores are float64.
        self.scores = torch.zeros(b, k, dtype=torch.float64, device=device)
        self.node = torch.zeros(rows, **long)  # each hypothesis's place in the lexicon trie
        # Finished hypotheses: k slots per utterance and a spare one that takes the writes that are not kept.
        self.count = torch.zeros(b, **long)
        self.fin_scores = torch.zeros(b, k + 1, dtype=torch.float64, device=device)
        self.fin_row = torch.zeros(b, k + 1, **long)  # the row whose hypothesis (up to fin_length) ended
        self.fin_length = torch.zeros(b, k + 1, **long)
        self.settled = torch.zeros(b, dtype=torch.bool, device=device)
        self.done = torch.zeros((), dtype=torch.bool, device=device)
        self._bos = bos
        self.reset()  # the values at the start
        self._graph: torch.cuda.CUDAGraph | None = None  # the captured step, kept for reuse (see reset)
        self.fused = triton_usable(device) if fused is None else fused
        self.native = use_native(native, device, self.fused)
        # The kernels' calls (else None: PyTorch): the bookkeeping, and with a CTC scorer of the same kind the joint
        # scores.
        self._select = self._joint = None
        if self.fused:
            from mmgen.kernels.beam_step import BeamSelect  # imports Triton: only when asked for

            self._select = BeamSelect(self)
            if ctc is not None and ctc.fused:
                from mmgen.kernels.ctc_prefix import FusedJointScores

                self._joint = FusedJointScores(self)
        elif self.native:
            self._select = NativeBeamSelect(self)
            if ctc is not None and ctc.native:
                self._joint = NativeJointScores(self)

    def reset(self) -> None:
        """The state at the start, in place (every state tensor keeps its address): also for another search of the
        same shape over a decoder state and CTC scorer refilled in place by the caller, where a captured step is then
        replayed from the first step on, with no eager step and no capture."""
        self.position.zero_()
        self.label.fill_(self._bos)
        self.scores.fill_(NEG_INF)
        self.scores[:, 0] = 0.0  # one live hypothesis per utterance at the start
        self.node.zero_()
        self.count.zero_()
        self.fin_scores.fill_(NEG_INF)
        self.fin_row.zero_()
        self.fin_length.zero_()
        self.settled.zero_()
        self.done.zero_()

    def step(self, length: int | None) -> None:
        """One label for every hypothesis; ``length``: positions filled after it (eager) or None (fixed shapes)."""
        logits = self.decoder(self.label, self.position, length)
        psi = None
        if self._select is not None and self.ctc is None:  # one call from the logits, log_softmax and penalty included
            index, keep_label = self._select(logits, normalise=True)
        else:
            # With a CTC scorer of the same kernels: one call from the logits to the joint scores and psi (else
            # PyTorch).
            scores, psi = self._scores(logits) if self._joint is None else self._joint(logits)
            if self._select is None:
                index, keep_label = self._bookkeeping(scores)
            else:
                index, keep_label = self._select(scores, normalise=False)
        self.reorder(index, length)
        if self.ctc is not None:
            self.ctc.advance(index, keep_label, psi)

    def _scores(self, logits: Tensor) -> tuple[Tensor, Tensor | None]:
        """The step's scores (rows, v) float64 from the decoder's logits, and with a CTC scorer its psi (rows, v)
        (else None), in PyTorch (the reference of the fused and native joint scores,
        :class:`mmgen.kernels.ctc_prefix.FusedJointScores`, :class:`mmgen.kernels.native_beam.NativeJointScores`)."""
        penalty = self.penalty.index_select(0, self.node) if self.trie is not None else self.penalty
        scores = logits.double().log_softmax(dim=-1) + penalty
        psi = None
        if self.ctc is not None:
            lam = self.lam
            candidates = None if lam >= 1 else scores.topk(self.pre_beam, dim=1).indices
            psi = self.ctc.scores(candidates)
            live = self.ctc.prefix.isfinite()[:, None]  # a dead row (its prefix impossible) stays dead
            gain = torch.where(live, psi - self.ctc.prefix[:, None], NEG_INF)
            # Masked labels stay masked whatever the weights (where λ = 1, 0 * -inf would be nan).
            scores = torch.where(scores > NEG_INF, (1 - lam) * scores + lam * gain, NEG_INF)
        return scores, psi

    def _bookkeeping(self, scores: Tensor) -> tuple[Tensor, Tensor]:
        """From the step's scores (rows, v) to the new state, in PyTorch (the fused kernel's reference); returns
        each new hypothesis's row ``index`` and label, for the reorder of the decoder's state and the CTC scorer.
        The reference of the fused and native kernels' (``BeamSelect``, ``NativeBeamSelect``)."""
        b, k, v = self.b, self.k, self.v
        candidates = (self.scores.view(b * k, 1) + scores).view(b, k * v)
        top_scores, top = candidates.topk(2 * k, dim=1)  # shape: (b, 2k); at most k of them end in eos
        beam, label = top.div(v, rounding_mode="floor"), top.remainder(v)
        ends = label == self.eos
        # Finished: eos among the best k candidates of an utterance not yet settled, while it has free slots.
        new = ends & self.first_k & top_scores.isfinite() & ~self.settled[:, None]
        slot = self.count[:, None] + new.long().cumsum(dim=1) - 1
        new = new & (slot < k)
        slot = torch.where(new, slot, k)  # the spare slot
        self.fin_scores.scatter_(1, slot, top_scores)
        self.fin_length.scatter_(1, slot, self.position.expand(b, 2 * k))
        self.fin_row.scatter_(1, slot, self.base + beam)
        self.count += new.sum(dim=1)
        # Live: the best k candidates that do not end.
        order = (ends.long() * (4 * k) + self.rank).argsort(dim=1)[:, :k]
        keep_beam, keep_label = beam.gather(1, order), label.gather(1, order).view(-1)
        self.scores.copy_(top_scores.gather(1, order).masked_fill(ends.gather(1, order), NEG_INF))
        index = (self.base + keep_beam).view(-1)
        if self.trie is not None:
            self.node.copy_(self.trie[1][self.node.index_select(0, index), keep_label])
        self.history_label.index_copy_(0, self.position, keep_label[None])
        self.history_parent.index_copy_(0, self.position, index[None])
        self.label.copy_(keep_label)
        self.position += 1
        best_finished = self.fin_scores[:, :k].max(dim=1).values
        self.settled |= (self.count > 0) & (best_finished >= self.scores.max(dim=1).values)
        self.done.copy_(self.settled.all() | (self.count >= k).all())
        return index, keep_label

    def run(self, graph: bool | None = None, fixed_shapes: bool | None = None,
            warmup: int = 1) -> list[list[tuple[list[int], float]]]:
        """Search until every utterance is settled, every utterance has ``k`` finished hypotheses, or ``max_len``
        steps. ``graph`` (default: on CUDA) captures one step in a CUDA graph after ``warmup`` eager ones and
        replays it; after :meth:`reset`, a search that captured one replays it from the first step.
        ``fixed_shapes`` (default: with a graph) runs steps in fixed shapes without one (tests compare the two). Returns each utterance's finished hypotheses (labels without bos/eos, score), in the order they
        finished; an utterance with fewer than ``k`` that is not settled also gets its live hypotheses as they stand.
        """
        device = self.label.device
        graph = device.type == "cuda" if graph is None else graph
        fixed_shapes = graph if fixed_shapes is None else fixed_shapes or graph
        steps = 0
        captured = self._graph if graph else None
        if graph and captured is None:
            side = torch.cuda.Stream(device)
            side.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(side):  # eager warm-up steps on a side stream, as graph capture asks
                while steps < min(warmup, self.max_len):
                    self.step(None)
                    steps += 1
            torch.cuda.current_stream(device).wait_stream(side)
            if steps < self.max_len and not bool(self.done):
                captured = self._graph = torch.cuda.CUDAGraph()
                with capture(captured):
                    self.step(None)  # recorded, not run
        if captured is None:
            while steps < self.max_len and not bool(self.done):
                self.step(None if fixed_shapes else steps + 1)
                steps += 1
            return self._results(steps)
        # Replays run ahead of the host: after each, the done flag is copied to pinned memory, and the host reads the
        # previous step's copy, so the GPU never waits for the host; the search runs at most one step past done,
        # which changes nothing (finished and settled utterances take no more hypotheses).
        flags = torch.zeros(2, dtype=torch.bool, pin_memory=True)
        events = [torch.cuda.Event(), torch.cuda.Event()]
        while steps < self.max_len:
            captured.replay()
            flags[steps % 2].copy_(self.done, non_blocking=True)
            events[steps % 2].record()
            steps += 1
            if steps >= 2:
                events[steps % 2].synchronize()  # the step before this one
                if bool(flags[steps % 2]):
                    break
        return self._results(steps)

    def _results(self, steps: int) -> list[list[tuple[list[int], float]]]:
        count, settled = self.count.tolist(), self.settled.tolist()
        fin_scores, fin_length, fin_row = self.fin_scores.tolist(), self.fin_length.tolist(), self.fin_row.tolist()
        scores = self.scores.tolist()
        labels, parents = self.history_label[:steps].cpu().numpy(), self.history_parent[:steps].cpu().numpy()

        # Every hypothesis to report, as (utterance, row at its last step, length, score); then all are traced back
        # through the back-pointers at once, longest first, so that those still being traced at a position are a
        # prefix: two vectorised gathers per position (a Python loop per hypothesis and position took milliseconds
        # at batch 8).
        wanted: list[tuple[int, int, int, float]] = []
        for i in range(self.b):
            wanted += [(i, fin_row[i][j], fin_length[i][j], fin_scores[i][j]) for j in range(count[i])]
            if not settled[i] and count[i] < self.k:  # hypotheses that never ended compete as they stand
                wanted += [(i, i * self.k + j, steps, scores[i][j]) for j in range(self.k)
                           if math.isfinite(scores[i][j])]
        order = sorted(range(len(wanted)), key=lambda q: -wanted[q][2])
        row = np.array([wanted[q][1] for q in order], dtype=np.int64)
        length = np.array([wanted[q][2] for q in order], dtype=np.int64)
        longest = int(length.max(initial=0))
        tracing = np.searchsorted(-length, -np.arange(longest), side="left")  # hypotheses longer than each position
        traced = np.zeros((longest, len(wanted)), dtype=np.int64)
        for step in range(longest - 1, -1, -1):
            n = tracing[step]
            traced[step, :n] = labels[step, row[:n]]
            row[:n] = parents[step, row[:n]]
        traced_by = dict(zip(order, traced.T.tolist()))
        out: list[list[tuple[list[int], float]]] = [[] for _ in range(self.b)]
        for q, (i, _, n, score) in enumerate(wanted):
            out[i].append((traced_by[q][:n], score))
        out = [hyps or [([], NEG_INF)] for hyps in out]  # no finite score at all (a diverged model): empty transcript
        return out
