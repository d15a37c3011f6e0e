"""The C++ kernels of a beam search step on the CPU (mmgen.kernels.native_beam, ``native=True``) against the PyTorch
code they replace (``native=False, fused=False``): the same state after every step (scores to 1e-12, indices exact)
and the same n-best lists, with the helpers of the fused kernels' tests (tests/test_beam_kernels.py,
tests/speech/test_ctc_kernels.py). The kernels are built on first use (tens of seconds, once per source version)."""

from __future__ import annotations

import math

import pytest
import torch

from mmgen.beam_search import BeamSearch
from mmgen.ctc import CTCPrefixScorer
from mmgen.kernels.native import native_ops, native_usable
from mmgen.kernels.native_beam import NativeBeamSelect, NativeCTCPrefix, NativeJointScores
from tests.speech.test_ctc_kernels import simulate
from tests.test_beam_kernels import DEVICE, check_joint_scores, check_run, check_tied_labels, lockstep, make_search

CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def built() -> None:
    """Every test here needs the kernels: fail (not skip) where they cannot be built."""
    assert native_usable(), "the C++ kernels could not be built (see the warning)"


def small(native: bool | None, fused: bool | None = None, **overrides) -> BeamSearch:
    """A joint search of one utterance, beam 2 (its scorer native as the search unless ``ctc_native`` says)."""
    config = dict(b=1, k=2, v=12, max_len=3, eos_from=[1], ctc_weight=0.3, device=CPU) | overrides
    return make_search(fused, native=native, **config)[0]


def test_native_is_the_default_on_the_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """On by default (``fused=False`` does not turn it off), off with ``native=False`` or ``MMGEN_NATIVE=0``."""
    for fused in (None, False):
        search = small(None, fused)
        assert search.native and search.ctc.native and not search.fused
        assert isinstance(search._select, NativeBeamSelect) and isinstance(search._joint, NativeJointScores)
        assert isinstance(search.ctc._native, NativeCTCPrefix)
    off = small(False)
    assert not off.native and off._select is None and off._joint is None
    scorer = CTCPrefixScorer(torch.zeros(2, 3, 4).log_softmax(-1), torch.tensor([3, 2]), 0, 3, native=False)
    assert not scorer.native
    monkeypatch.setenv("MMGEN_NATIVE", "0")
    search = small(None)
    assert not search.native and not search.ctc.native and search._select is None
    with pytest.raises(RuntimeError, match="not available"):
        small(True)


def test_native_and_fused_exclude_each_other() -> None:
    with pytest.raises(ValueError, match="either the C"):
        small(True, True)
    assert not small(None, True).native  # fused asked for: Triton's kernels (interpreted here)


@pytest.mark.parametrize("b, k, eos_from", [(1, 1, [3]), (1, 2, [1]), (1, 4, [2]), (3, 4, [1, 4, math.inf]),
                                            (3, 2, [2, 0, 3]), (3, 1, [0, 2, 5])])
def test_native_step_equals_pytorch_step(b: int, k: int, eos_from: list[float]) -> None:
    """Attention-only steps: log_softmax and the banned ids in the kernel (select with normalise)."""
    ref, results = lockstep(b=b, k=k, v=12, max_len=8, eos_from=eos_from, native=True)
    assert int(ref.count.sum()) > 0
    if math.inf in eos_from:
        i = eos_from.index(math.inf)
        assert len(results[i]) == k and all(len(h) == 8 for h, _ in results[i])


@pytest.mark.parametrize("b, k", [(1, 4), (3, 4), (3, 2), (3, 1)])
def test_native_step_equals_pytorch_step_in_a_lexicon(b: int, k: int) -> None:
    ref, _ = lockstep(b=b, k=k, v=12, max_len=7, eos_from=[2, 3, 9][:b], trie=True, native=True)
    assert int(ref.count.sum()) > 0


@pytest.mark.parametrize("ctc_weight", [None, 0.3])
def test_native_step_at_a_dead_end(ctc_weight: float | None) -> None:
    """Every hypothesis dies (-inf) without finishing; the search runs to the length limit."""
    allowed = torch.zeros(2, 12, dtype=torch.bool)
    allowed[0, 4] = True  # node 0: only id 4, to node 1, which allows nothing
    step = torch.zeros(2, 12, dtype=torch.long)
    step[0, 4] = 1
    ref, results = lockstep(b=2, k=2, v=12, max_len=4, eos_from=[0, 1], trie=(allowed, step), ctc_weight=ctc_weight,
                            native=True)
    assert int(ref.position) == 4 and not bool(ref.settled.any()) and int(ref.count.sum()) == 0
    assert results == [[([], -math.inf)]] * 2


@pytest.mark.parametrize("b", [1, 3])
@pytest.mark.parametrize("k", [1, 2, 4])
@pytest.mark.parametrize("ctc_weight", [0.3, 1.0])
@pytest.mark.parametrize("trie", [False, True])
def test_native_step_equals_pytorch_step_with_ctc(b: int, k: int, ctc_weight: float, trie: bool) -> None:
    """Joint CTC/attention steps: joint scores, selection and CTC advance in C++; padded CTC rows (lengths differ
    by utterance), the scorer's groups of k rows (one with k = 1)."""
    ref, _ = lockstep(b=b, k=k, v=12, max_len=6, eos_from=[1, 3, math.inf][:b], ctc_weight=ctc_weight, trie=trie,
                      native=True)
    assert int(ref.position) > 0


def test_native_search_with_a_pytorch_ctc_scorer() -> None:
    """A native search over a PyTorch scorer: joint scores from PyTorch, the selection from C++."""
    assert small(True, ctc_native=False)._joint is None
    lockstep(b=3, k=4, v=12, max_len=6, eos_from=[1, 3, math.inf], ctc_weight=0.3, trie=True, ctc_native=False,
             native=True)


@pytest.mark.parametrize("k, ctc_weight, trie", [(4, 0.3, False), (4, 0.3, True), (4, 1.0, True), (1, 0.3, False),
                                                 (1, 1.0, False)])
def test_native_joint_scores_equal_pytorch(k: int, ctc_weight: float, trie: bool) -> None:
    """One joint step's scores and psi from a state with a dead CTC prefix and -inf logits."""
    check_joint_scores(k, ctc_weight, trie, native=True)


@pytest.mark.parametrize("trie", [False, True])
def test_native_joint_scores_take_tied_labels_in_order(trie: bool) -> None:
    check_tied_labels(trie, native=True)


def test_native_step_with_bf16_logits() -> None:
    lockstep(b=3, k=4, v=12, max_len=6, eos_from=[1, 2, 4], dtype=torch.bfloat16, seed=3, native=True)
    lockstep(b=3, k=4, v=12, max_len=6, eos_from=[1, 2, 4], dtype=torch.bfloat16, seed=3, ctc_weight=0.3,
             native=True)


def test_native_step_over_a_large_vocabulary() -> None:
    lockstep(b=2, k=2, v=2500, max_len=3, eos_from=[1, math.inf], native=True)


def test_native_run_equals_pytorch_run() -> None:
    check_run(native=True)


def test_native_ctc_groups_with_padded_rows() -> None:
    simulate(rows=6, t=13, v=6, group=3, lengths=[13, 9, 13, 4, 1, 12], n=3, steps=4, native=True, rtol=1e-12)


def test_native_ctc_group_of_one_moves_rows_anywhere() -> None:
    """group=1: a row may take any row's hypothesis, and its frames with it."""
    simulate(rows=5, t=11, v=5, group=1, lengths=[11, 7, 11, 2, 10], n=3, steps=4, seed=1, native=True, rtol=1e-12)


def test_native_ctc_many_labels_and_candidates() -> None:
    simulate(rows=2, t=5, v=150, group=2, lengths=[5, 3], n=20, steps=2, seed=4, eos=70, native=True, rtol=1e-12)


def test_native_ctc_one_frame_and_empty_rows() -> None:
    simulate(rows=4, t=1, v=4, group=2, lengths=[1, 0, 1, 1], n=3, steps=2, seed=5, native=True, rtol=1e-12)


@pytest.mark.parametrize("group", [4, 1])
def test_native_ctc_at_speech_lengths(group: int) -> None:
    """Hundreds of frames: the loop over frames and the reference's closed form agree to float64 rounding."""
    lengths = [250 - (i * 37) % 125 for i in range(8)]
    simulate(rows=8, t=250, v=31, group=group, lengths=lengths, n=6, steps=6, seed=6, native=True, rtol=1e-12)


def test_native_kernels_check_their_inputs() -> None:
    """Wrong dtypes, shapes and indices are errors with the tensor's name, not reads of stray memory."""
    search = small(True, ctc_weight=None)
    with pytest.raises(RuntimeError, match="final scores must be float64"):
        search._select(torch.zeros(2, 12), normalise=False)
    with pytest.raises(RuntimeError, match="step must have shape"):
        search._select(torch.zeros(3, 12), normalise=True)
    scorer = small(True).ctc
    psi = scorer.scores(None)
    with pytest.raises(RuntimeError, match=r"index\[1\] = 7 is out of range"):
        scorer.advance(torch.tensor([0, 7]), torch.tensor([4, 5]), psi)
    with pytest.raises(RuntimeError, match="candidates must be Long"):
        scorer.scores(torch.zeros(2, 3, dtype=torch.int32))
    with pytest.raises(RuntimeError, match="psi must be Double"):
        native_ops().ctc_scores(scorer.x, scorer.r_blank, scorer.r_any, scorer.start, scorer.last, scorer.prefix,
                                None, psi.float(), scorer.blank, scorer.eos)


@pytest.mark.parametrize("native", [True, False])
def test_a_dropped_search_is_freed_at_once(native: bool) -> None:
    """The kernel wrappers hold their search and scorer weakly: a search dropped (from the GPU reuse cache, say) is
    freed by reference counting, with its CUDA graph on a GPU, and never by a garbage collection that could run
    inside another capture (see mmgen.graphs.capture)."""
    import gc
    import weakref

    # Triton's kernels run where they would in use: compiled on a GPU, interpreted on the CPU without one.
    search = small(native, fused=None, device=CPU) if native else small(False, fused=True, device=DEVICE)
    assert (search._select is not None) and (search._joint is not None) and search.ctc is not None
    search.run()
    refs = [weakref.ref(search), weakref.ref(search.ctc)]
    collecting = gc.isenabled()
    gc.disable()
    try:
        del search
        assert [r() for r in refs] == [None, None]
    finally:
        if collecting:
            gc.enable()
