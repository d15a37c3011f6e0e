"""CTC decoding against exhaustive enumeration and hand-computed probabilities."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from mmgen.ctc import CTCPrefixScorer, ctc_greedy, ctc_prefix_beam_search, min_ctc_frames


def collapse(path: tuple[int, ...], blank: int) -> tuple[int, ...]:
    out = []
    for i, c in enumerate(path):
        if c != blank and (i == 0 or path[i - 1] != c):
            out.append(c)
    return tuple(out)


def exact_label_probs(log_probs: torch.Tensor, blank: int) -> dict[tuple[int, ...], float]:
    """Every label sequence's probability, summing every alignment path (t^v paths)."""
    t, v = log_probs.shape
    probs: dict[tuple[int, ...], float] = {}
    for path in itertools.product(range(v), repeat=t):
        p = math.exp(sum(float(log_probs[i, c]) for i, c in enumerate(path)))
        key = collapse(path, blank)
        probs[key] = probs.get(key, 0.0) + p
    return probs


def test_min_ctc_frames() -> None:
    assert min_ctc_frames([]) == 0
    assert min_ctc_frames([5, 6, 7]) == 3
    assert min_ctc_frames([5, 5, 6, 6, 6]) == 8  # a blank between each equal pair
    assert min_ctc_frames(torch.tensor([1, 2, 1])) == 3


def test_hand_computed_two_frames() -> None:
    # Blank 0, label 1, two frames: "a" comes from (a, a), (a, -), (-, a).
    p = torch.tensor([[0.4, 0.6], [0.7, 0.3]], dtype=torch.float64)
    expected = 0.6 * 0.3 + 0.6 * 0.7 + 0.4 * 0.3
    best = ctc_prefix_beam_search(p.log(), blank=0, beam_size=4)
    scores = dict((tuple(s), math.exp(lp)) for s, lp in best)
    assert math.isclose(scores[(1,)], expected, rel_tol=1e-12)
    assert math.isclose(scores[()], 0.4 * 0.7, rel_tol=1e-12)
    nll = F.ctc_loss(p.float().log()[:, None], torch.tensor([[1]]), torch.tensor([2]), torch.tensor([1]), blank=0)
    assert math.isclose(math.exp(-float(nll)), expected, rel_tol=1e-6)


def test_prefix_beam_search_equals_exhaustive_enumeration() -> None:
    torch.manual_seed(0)
    for trial in range(5):
        log_probs = torch.randn(5, 4, dtype=torch.float64).mul(2).log_softmax(-1)
        exact = exact_label_probs(log_probs, blank=0)
        ranked = sorted(exact.items(), key=lambda kv: -kv[1])
        # A beam as wide as the number of prefixes keeps everything: the search is exact.
        found = ctc_prefix_beam_search(log_probs, blank=0, beam_size=10**4, token_beam=4)
        assert tuple(found[0][0]) == ranked[0][0]
        for labels, lp in found[:10]:
            assert math.isclose(math.exp(lp), exact[tuple(labels)], rel_tol=1e-9)
        # Its score is CTC's: exp(-ctc_loss) of the same labels.
        best = torch.tensor(found[0][0])
        if len(best):
            nll = F.ctc_loss(log_probs.float()[:, None], best[None], torch.tensor([5]), torch.tensor([len(best)]), blank=0,
                             reduction="sum")
            assert math.isclose(-float(nll), found[0][1], rel_tol=1e-4, abs_tol=1e-4)


def test_greedy_collapses_repeats_and_drops_blanks() -> None:
    frames = torch.tensor([[0, 3, 3, 0, 3, 2, 2, 0], [1, 1, 0, 0, 0, 0, 0, 0]])
    log_probs = F.one_hot(frames, 4).float().add(1e-3).log()
    assert ctc_greedy(log_probs, torch.tensor([8, 3]), blank=0) == [[3, 3, 2], [1]]
    assert ctc_greedy(log_probs, torch.tensor([3, 1]), blank=0) == [[3], [1]]  # only real frames count


@pytest.mark.parametrize("native", [False, True])
def test_prefix_scores_equal_exhaustive_enumeration_with_padding_and_reordering(native: bool) -> None:
    """Every prefix score is the summed probability of all label sequences that start with the prefix (and at
    ``eos``, of exactly the prefix), by enumeration of every alignment; rows of different lengths share a padded
    batch, and rows are reordered between steps as a beam search does. For the PyTorch scorer and the C++ one."""
    torch.manual_seed(1)
    blank, eos, v = 0, 3, 4
    log_probs = torch.randn(3, 5, v, dtype=torch.float64).mul(2).log_softmax(-1)
    lengths = torch.tensor([5, 4, 2])
    exact = [exact_label_probs(log_probs[r, :int(n)], blank) for r, n in enumerate(lengths)]

    def prefix_prob(row: int, prefix: tuple[int, ...]) -> float:
        return sum(p for labels, p in exact[row].items() if labels[:len(prefix)] == prefix)

    scorer = CTCPrefixScorer(log_probs.float(), lengths, blank, eos, native=native)
    owner, prefixes = [0, 1, 2], [(), (), ()]  # which utterance each row scores, and its hypothesis
    for index, labels in ([[0, 1, 2], [1, 2, 2]], [[1, 0, 2], [2, 2, 1]], [[2, 2, 0], [1, 1, 2]]):
        # Scoring a few candidate labels per row gives those labels the same scores, the others none.
        few = torch.tensor([[2], [1], [2]])
        psi_few = scorer.scores(few).clone()  # the C++ scorer's next call overwrites its buffer
        psi = scorer.scores()
        for row in range(3):
            c = int(few[row, 0])
            assert math.isclose(float(psi_few[row, c]), float(psi[row, c]), rel_tol=1e-9, abs_tol=1e-9)
            assert float(psi_few[row, 3 - c]) == -math.inf and float(psi_few[row, eos]) == float(psi[row, eos])
        for row in range(3):
            for c in (1, 2, eos):
                want = exact[owner[row]].get(prefixes[row], 0.0) if c == eos else prefix_prob(owner[row],
                                                                                         prefixes[row] + (c,))
                got = math.exp(float(psi[row, c]))
                assert math.isclose(got, want, rel_tol=1e-4, abs_tol=1e-7), (row, prefixes[row], c, got, want)
            assert psi[row, blank] == -math.inf
        scorer.advance(torch.tensor(index), torch.tensor(labels), psi)
        owner = [owner[i] for i in index]
        prefixes = [prefixes[i] + (c,) for i, c in zip(index, labels)]
        for row in range(3):  # the state's own prefix score is the chosen candidate's
            assert math.isclose(math.exp(float(scorer.prefix[row])), prefix_prob(owner[row], prefixes[row]),
                                rel_tol=1e-4, abs_tol=1e-7)
