"""The fused beam search step (mmgen.kernels.beam_step, ``BeamSearch(fused=True)``) against the PyTorch step it
replaces (``fused=False, native=False``): same state after every step and same n-best lists, over a synthetic decoder
whose logits are a fixed function of each hypothesis's labels. On a machine without a GPU the kernel runs in Triton's
interpreter (tests/conftest.py), so the searches are kept small. The helpers serve the C++ kernels' tests too
(tests/test_native_kernels.py, ``native=True``)."""

from __future__ import annotations

import math

import pytest
import torch

from mmgen.beam_search import BeamSearch, lexicon_trie
from mmgen.ctc import CTCPrefixScorer

# Ids: 0 pad, 1 bos, 2 eos, 3 CTC blank, 4... characters, 11 the space of the lexicon.
PAD, BOS, EOS, BLANK, SPACE = 0, 1, 2, 3, 11
WORDS = [[4, 5, 6], [4, 5, 7], [8, 9], [10], [4, 10, 6, 6], [9, 8, 8]]
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


class ToyDecoder:
    """Logits (rows, v) from a fixed random table, indexed by a running hash of each row's labels (state that the
    search's reorder moves, as a KV cache), with ``eos`` made likely from position ``eos_from`` of each utterance."""

    TABLE = 4099

    def __init__(self, b: int, k: int, v: int, eos_from: list[float], seed: int, dtype: torch.dtype,
                 device: torch.device) -> None:
        g = torch.Generator().manual_seed(seed)
        self.table = (torch.randn(self.TABLE, v, generator=g) * 2).to(device)
        self.hash = torch.zeros(b * k, dtype=torch.long, device=device)
        self.eos_from = torch.tensor(eos_from, dtype=torch.float64, device=device).repeat_interleave(k)
        self.dtype = dtype

    def __call__(self, tokens: torch.Tensor, position: torch.Tensor, length: int | None) -> torch.Tensor:
        self.hash.copy_((self.hash * 1009 + tokens * 7 + 1) % self.TABLE)
        logits = self.table[self.hash]
        logits[:, EOS] += torch.where(position >= self.eos_from, 3.0, -2.0).float()
        return logits.to(self.dtype)

    def reorder(self, index: torch.Tensor, length: int | None) -> None:
        self.hash.copy_(self.hash.index_select(0, index))


def make_search(fused: bool | None, *, b: int, k: int, v: int, max_len: int, eos_from: list[float], seed: int = 0,
                dtype: torch.dtype = torch.float32, trie: bool | tuple = False, ctc_weight: float | None = None,
                ctc_fused: bool | None = None, device: torch.device = DEVICE, native: bool = False,
                ctc_native: bool | None = None) -> tuple[BeamSearch, ToyDecoder]:
    """A search over a ToyDecoder; with ``ctc_weight``, joint with a CTC scorer (fused as the search unless
    ``ctc_fused`` says otherwise: a fused search with a fused scorer takes its joint scores from one kernel). ``native``
    (the search's, and the scorer's unless ``ctc_native`` says otherwise): the C++ kernels; off by default, so that
    ``fused=False`` is the PyTorch reference."""
    decoder = ToyDecoder(b, k, v, eos_from, seed, dtype, device)
    ctc = None
    if ctc_weight is not None:
        g = torch.Generator().manual_seed(seed + 1)
        t = 2 * max_len
        log_probs = (torch.randn(b, t, v, generator=g) * 3).log_softmax(-1).to(device)
        lengths = torch.tensor([t - i % 3 for i in range(b)], device=device)
        ctc = CTCPrefixScorer(log_probs.repeat_interleave(k, dim=0), lengths.repeat_interleave(k), BLANK, EOS,
                              group=k, fused=fused if ctc_fused is None else ctc_fused,
                              native=native if ctc_native is None else ctc_native)
    if trie is True:
        trie = lexicon_trie(WORDS, v, EOS, SPACE, device)
    search = BeamSearch(decoder, decoder.reorder, batch=b, beam=k, vocab=v, bos=BOS, eos=EOS,
                        banned=[PAD, BOS, BLANK], max_len=max_len, device=device, ctc=ctc,
                        ctc_weight=ctc_weight or 0.0, pre_beam=k + 2, trie=trie or None, fused=fused, native=native)
    return search, decoder


def assert_same_state(got: BeamSearch, want: BeamSearch, step: int) -> None:
    """Equal state, but for the hypotheses of score -inf (dead): ties among -inf candidates are taken in another
    order than torch.topk's, so their labels, parents and trie nodes may differ (and never matter). And but for the
    spare slot of the finished book (column k), scratch that is never read: the PyTorch step scatters every candidate
    that does not finish there, and which of those duplicate writes ``scatter_`` keeps is unspecified (on the CPU the
    last, rank 2k - 1, which the kernel writes too; on CUDA any of them), so its score and row are not compared."""
    close = dict(rtol=0.0, atol=1e-12, msg=lambda m: f"after step {step}: {m}")
    k = want.k
    torch.testing.assert_close(got.scores, want.scores, **close)
    torch.testing.assert_close(got.fin_scores[:, :k], want.fin_scores[:, :k], **close)
    for name in ("count", "settled", "done", "position", "fin_length"):  # fin_length: the spare slot's too (position)
        assert torch.equal(getattr(got, name), getattr(want, name)), (step, name)
    assert torch.equal(got.fin_row[:, :k], want.fin_row[:, :k]), step
    live = want.scores.view(-1).isfinite()
    assert torch.equal(got.label[live], want.label[live]), step
    assert torch.equal(got.node[live], want.node[live]), step
    for s in range(step - 1, -1, -1):  # the history of every live hypothesis, traced back
        assert torch.equal(got.history_label[s, live], want.history_label[s, live]), (step, s)
        assert torch.equal(got.history_parent[s, live], want.history_parent[s, live]), (step, s)
        live = torch.zeros_like(live).index_fill_(0, want.history_parent[s, live], True)


def assert_same_results(got: list, want: list) -> None:
    assert [[h for h, _ in u] for u in got] == [[h for h, _ in u] for u in want]
    for u, w in zip(got, want, strict=True):
        for (_, s), (_, t) in zip(u, w, strict=True):
            assert s == t or abs(s - t) <= 1e-12, (s, t)


def lockstep(steps_limit: int | None = None, native: bool = False, **config) -> tuple[BeamSearch, list]:
    """Both searches (the kernels': Triton's, or with ``native`` the C++ ones; and PyTorch's) step by step, their
    states compared after each; returns the reference and its results."""
    if native:
        config.setdefault("device", torch.device("cpu"))
    fused, _ = make_search(not native, native=native, **config)
    ref, _ = make_search(False, **config)
    steps = 0
    limit = steps_limit or ref.max_len
    while steps < limit and not bool(ref.done):
        fused.step(steps + 1)
        ref.step(steps + 1)
        steps += 1
        assert_same_state(fused, ref, steps)
    results = ref._results(steps)
    assert_same_results(fused._results(steps), results)
    return ref, results


def test_fused_is_the_default_only_on_cuda() -> None:
    search, _ = make_search(None, b=1, k=2, v=12, max_len=3, eos_from=[1], device=torch.device("cpu"))
    assert search.fused is False
    assert make_search(True, b=1, k=2, v=12, max_len=3, eos_from=[1], device=torch.device("cpu"))[0].fused


@pytest.mark.parametrize("b, k, eos_from", [(1, 1, [3]), (1, 4, [2]), (3, 4, [1, 4, math.inf]), (3, 1, [0, 2, 5])])
def test_fused_step_equals_pytorch_step(b: int, k: int, eos_from: list[float]) -> None:
    """Attention-only steps (log_softmax and the banned ids in the kernel), eos early for some utterances and never
    for others; k = 1 has a single live hypothesis per utterance."""
    ref, results = lockstep(b=b, k=k, v=12, max_len=8, eos_from=eos_from)
    assert int(ref.count.sum()) > 0  # hypotheses finished
    if math.inf in eos_from:
        i = eos_from.index(math.inf)
        assert len(results[i]) == k and all(len(h) == 8 for h, _ in results[i])  # ran to the limit, live ones


@pytest.mark.parametrize("b, k", [(1, 4), (3, 4), (3, 1)])
def test_fused_step_equals_pytorch_step_in_a_lexicon(b: int, k: int) -> None:
    """Only the lexicon's words (many -inf candidates, dead hypotheses from the first step)."""
    ref, results = lockstep(b=b, k=k, v=12, max_len=7, eos_from=[2, 3, 9][:b], trie=True)
    for hyps, count in zip(results, ref.count.tolist(), strict=True):
        for labels, _ in hyps[:count]:  # finished: whole words of the lexicon
            words = " ".join(map(str, labels)).split(str(SPACE))
            assert all(w.split() and [int(i) for i in w.split()] in WORDS for w in words), labels
    assert int(ref.count.sum()) > 0


def test_fused_step_equals_pytorch_step_at_a_dead_end() -> None:
    """A lexicon whose only path ends nowhere: every hypothesis dies (-inf) without finishing; no utterance is
    settled (none has a finished hypothesis), and the search runs to the length limit."""
    allowed = torch.zeros(2, 12, dtype=torch.bool, device=DEVICE)
    allowed[0, 4] = True  # node 0: only id 4, to node 1, which allows nothing
    step = torch.zeros(2, 12, dtype=torch.long, device=DEVICE)
    step[0, 4] = 1
    ref, results = lockstep(b=2, k=2, v=12, max_len=4, eos_from=[0, 1], trie=(allowed, step))
    assert int(ref.position) == 4 and not bool(ref.settled.any()) and int(ref.count.sum()) == 0
    assert results == [[([], -math.inf)]] * 2


@pytest.mark.parametrize("k, ctc_weight, trie", [(4, 0.3, False), (4, 1.0, False), (4, 0.3, True), (1, 0.3, True),
                                                 (1, 1.0, True)])
def test_fused_step_equals_pytorch_step_with_ctc(k: int, ctc_weight: float, trie: bool) -> None:
    """Joint CTC/attention steps: the joint scores from one kernel (FusedJointScores), then the bookkeeping from the
    other; the CTC scorer's groups of 4 rows (a beam) and of 1."""
    ref, _ = lockstep(b=3, k=k, v=12, max_len=6, eos_from=[1, 3, math.inf], ctc_weight=ctc_weight, trie=trie)
    assert ref.ctc is not None and int(ref.position) > 0


def test_fused_step_with_a_pytorch_ctc_scorer() -> None:
    """A fused search with the PyTorch CTC scorer: the joint scores from PyTorch, the bookkeeping from the kernel."""
    fused, _ = make_search(True, b=1, k=2, v=12, max_len=3, eos_from=[1], ctc_weight=0.3, ctc_fused=False)
    assert fused._joint is None
    lockstep(b=3, k=4, v=12, max_len=6, eos_from=[1, 3, math.inf], ctc_weight=0.3, trie=True, ctc_fused=False)


def use_small_joint_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Joint scores with the labels of a row in blocks of 4 (12 labels: 3 blocks; the pre-beam chosen by passes over
    them, not ranked in one tile) and 2 candidates per program (several programs per row)."""
    from mmgen.kernels import ctc_prefix

    monkeypatch.setattr(ctc_prefix, "JOINT_LABELS", 4)
    monkeypatch.setattr(ctc_prefix, "JOINT_CANDIDATES", 2)


def joint_scores_at(k: int, ctc_weight: float, trie: bool,
                    native: bool = False) -> tuple[BeamSearch, BeamSearch, torch.Tensor]:
    """A PyTorch search after two steps and a fused one (``native``: a C++ one) in the same state (CTC scorer and
    trie nodes copied), a hypothesis's CTC prefix made impossible (-inf) in both, and new random logits, a few of
    them -inf."""
    config = dict(b=2, k=k, v=12, max_len=6, eos_from=[1, 2], ctc_weight=ctc_weight, trie=trie)
    ref, _ = make_search(False, **config, device=torch.device("cpu"))
    fused, _ = make_search(not native, native=native, **config, device=torch.device("cpu") if native else DEVICE)
    for _ in range(2):
        ref.step(None)
    for name in ("x", "r_blank", "r_any", "start", "last", "prefix"):
        getattr(fused.ctc, name).copy_(getattr(ref.ctc, name))
    fused.node.copy_(ref.node)
    dead = k  # the second utterance's first hypothesis: its CTC state stays, its prefix is dead
    for search in (ref, fused):
        search.ctc.prefix[dead] = -math.inf
    logits = torch.randn(2 * k, 12, generator=torch.Generator().manual_seed(k)) * 3
    logits[0, [4, 9]] = -math.inf  # labels the decoder rules out
    return ref, fused, logits


@pytest.mark.parametrize("k, ctc_weight, trie, small_blocks", [
    (4, 0.3, False, False), (4, 0.3, True, False), (4, 1.0, True, False), (1, 0.3, False, False),
    (1, 0.3, True, False), (1, 1.0, False, False), (4, 0.3, True, True), (1, 1.0, True, True)])
def test_fused_joint_scores_equal_pytorch(k: int, ctc_weight: float, trie: bool, small_blocks: bool,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """One joint step's scores and psi from the kernel and from PyTorch (BeamSearch._scores), from the same state.
    Scores equal to the last bits (log_softmax sums in another order) and -inf at the same places. psi equal to
    the PyTorch scorer's over the same pre-beam; the pre-beam is the same set as torch.topk's but for labels of
    score -inf (a lexicon allows fewer than pre_beam labels), which torch.topk takes in an unspecified order on the
    CPU: there psi is compared with the pre-beam of a stable sort (the kernel's choice: ties to the lowest label).
    ``small_blocks``: labels in several blocks and candidates over several programs per row."""
    if small_blocks:
        use_small_joint_blocks(monkeypatch)
    check_joint_scores(k, ctc_weight, trie)


def check_joint_scores(k: int, ctc_weight: float, trie: bool, native: bool = False) -> None:
    """test_fused_joint_scores_equal_pytorch for the fused kernel, or with ``native`` the C++ one."""
    ref, fused, logits = joint_scores_at(k, ctc_weight, trie, native)
    want, want_psi = ref._scores(logits)
    got, psi = (x.cpu() for x in fused._joint(logits.to(fused.label.device)))
    assert torch.equal(got.isfinite(), want.isfinite()) and int(want.isfinite().sum()) > 0
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-13)
    assert bool(got[k].isneginf().all())  # the dead prefix
    step = logits.double().log_softmax(-1) + ref.penalty.index_select(0, ref.node)
    if ctc_weight < 1:
        pre = step.sort(dim=1, descending=True, stable=True).indices[:, :ref.pre_beam]
        few = step.isfinite().sum(dim=1) < ref.pre_beam  # rows whose pre-beam takes labels of score -inf
        assert bool(few.any()) == trie
    else:
        pre = None
    expected = ref.ctc.scores(pre)
    assert torch.equal(psi.isfinite(), expected.isfinite())
    torch.testing.assert_close(psi, expected, rtol=1e-12, atol=1e-13)
    sure = step.isfinite()  # labels scored in both, whatever the order of ties
    sure[:, EOS] = True
    torch.testing.assert_close(psi[sure], want_psi[sure], rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("trie, small_blocks", [(False, False), (True, False), (False, True), (True, True)])
def test_fused_joint_scores_take_tied_labels_in_order(trie: bool, small_blocks: bool,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Logits that tie at the pre-beam's boundary (a row of equal logits, a row with six equal ones): the kernel
    takes the lowest tied labels, as a stable sort, and as torch.topk does on CUDA (checked there). Here the set
    decides which labels get a finite score, so the expected scores are the reference's, over that set."""
    if small_blocks:
        use_small_joint_blocks(monkeypatch)
    check_tied_labels(trie)


def check_tied_labels(trie: bool, native: bool = False) -> None:
    """test_fused_joint_scores_take_tied_labels_in_order for the fused kernel, or with ``native`` the C++ one."""
    ref, fused, logits = joint_scores_at(4, 0.3, trie, native)
    logits[0] = 0.0
    logits[1, 4:10] = logits[1].max()
    step = logits.double().log_softmax(-1) + ref.penalty.index_select(0, ref.node)
    pre = step.sort(dim=1, descending=True, stable=True).indices[:, :ref.pre_beam]
    if torch.cuda.is_available():
        assert torch.equal(step.cuda().topk(ref.pre_beam, dim=1).indices.sort(dim=1).values.cpu(),
                           pre.sort(dim=1).values)
    expected = ref.ctc.scores(pre)
    lam, prefix = ref.lam, ref.ctc.prefix[:, None]
    gain = torch.where(prefix.isfinite(), expected - prefix, -math.inf)
    want = torch.where(step > -math.inf, (1 - lam) * step + lam * gain, -math.inf)  # as BeamSearch._scores
    got, psi = (x.cpu() for x in fused._joint(logits.to(fused.label.device)))
    assert torch.equal(psi.isfinite(), expected.isfinite()) and torch.equal(got.isfinite(), want.isfinite())
    torch.testing.assert_close(psi, expected, rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-13)


def test_fused_joint_step_in_small_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Whole joint steps with the labels in several blocks and the candidates over several programs per row."""
    use_small_joint_blocks(monkeypatch)
    lockstep(b=1, k=2, v=12, max_len=4, eos_from=[2], ctc_weight=0.3, trie=True, seed=1)


def test_fused_step_equals_pytorch_step_with_bf16_logits() -> None:
    lockstep(b=3, k=4, v=12, max_len=6, eos_from=[1, 2, 4], dtype=torch.bfloat16, seed=3)


def test_fused_step_over_a_large_vocabulary() -> None:
    """More candidates than one tile holds (several blocks merged into the running best) and log-sums over several
    blocks of labels."""
    ref, _ = lockstep(b=2, k=2, v=2500, max_len=3, eos_from=[1, math.inf])
    assert 2 * 2500 > 2048 and int(ref.position) == 3


def test_fused_run_equals_pytorch_run() -> None:
    check_run()


def check_run(native: bool = False) -> None:
    """Whole searches (run) of the fused kernels, or with ``native`` the C++ ones, and of PyTorch."""
    config = dict(b=3, k=4, v=12, max_len=10, eos_from=[1, 3, 6], seed=5)
    if native:
        config["device"] = torch.device("cpu")
    fused, _ = make_search(not native, native=native, **config)
    ref, _ = make_search(False, **config)
    got, want = fused.run(graph=False), ref.run(graph=False)
    assert_same_results(got, want)
    assert bool(ref.done) and bool(ref.settled.all()) and int(ref.count.min()) < 4  # settled before k finished


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("ctc_weight, trie", [(None, False), (None, True), (0.3, False), (0.3, True), (1.0, True)])
def test_fused_step_replays_in_a_cuda_graph(ctc_weight: float | None, trie: bool) -> None:
    """The kernel captured in the search's CUDA graph and replayed gives the eager PyTorch search's n-best lists, on
    the GPU and on the CPU."""
    config = dict(b=3, k=4, v=40, max_len=12, eos_from=[2, 5, math.inf], ctc_weight=ctc_weight, trie=trie)
    graphed, _ = make_search(None, **config)
    assert graphed.fused  # the default on CUDA
    got = graphed.run(graph=True)
    assert_same_results(got, make_search(False, **config)[0].run(graph=False))
    assert_same_results(got, make_search(False, **config, device=torch.device("cpu"))[0].run(graph=False))
    assert_same_results(got, make_search(True, **config)[0].run(graph=False))
