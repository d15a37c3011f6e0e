"""The fused CTC prefix scorer (mmgen.kernels.ctc_prefix) against the PyTorch one, over simulated search steps.

Without a GPU the kernels run in Triton's interpreter (``TRITON_INTERPRET=1``, set by tests/conftest.py), which is
slow: sizes are small, and the frames are cut into several blocks by shrinking the tiles. The helpers serve the C++
scorer's tests too (tests/test_native_kernels.py, ``native=True``).
"""

from __future__ import annotations

import pytest
import torch

from mmgen.ctc import CTCPrefixScorer

STATE = ("x", "r_blank", "r_any", "start", "last", "prefix")
BLANK = 0
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # the fused scorer's: compiled on a GPU, else interpreted


def assert_same(got: torch.Tensor, want: torch.Tensor, what: str, rtol: float = 1e-9) -> None:
    got = got.cpu()
    if not want.is_floating_point():
        assert torch.equal(got, want), what
        return
    assert torch.equal(got.isfinite(), want.isfinite()), what  # the same -inf entries
    torch.testing.assert_close(got, want, rtol=rtol, atol=1e-12, msg=lambda m: f"{what}: {m}")


def assert_same_state(got: CTCPrefixScorer, want: CTCPrefixScorer, what: str, rtol: float = 1e-9) -> None:
    for name in STATE:
        assert_same(getattr(got, name), getattr(want, name), f"{what}, {name}", rtol)


def scorers(rows: int, t: int, v: int, group: int, lengths: list[int], eos: int, seed: int,
            device: str = "cpu", native: bool = False) -> tuple[CTCPrefixScorer, CTCPrefixScorer]:
    """The PyTorch scorer (on the CPU) and the fused one (on ``device``; with ``native``, the C++ one on the CPU) of
    the same random log-probabilities."""
    g = torch.Generator().manual_seed(seed)
    log_probs = (torch.randn(rows, t, v, generator=g) * 2).log_softmax(-1)
    lengths = torch.tensor(lengths)
    ref = CTCPrefixScorer(log_probs, lengths, BLANK, eos, group, fused=False, native=False)
    fused = CTCPrefixScorer(log_probs.to(device), lengths.to(device), BLANK, eos, group, fused=not native,
                            native=native)
    return ref, fused


def candidates(ref: CTCPrefixScorer, n: int | None, g: torch.Generator) -> torch.Tensor | None:
    """n labels per row as a pre-beam gives them: random, with the row's last label (a repeat) and eos often among
    them, the blank sometimes, and a repeated candidate now and then."""
    if n is None:
        return None
    rows, v, _ = ref.x.shape
    out = torch.stack([torch.randperm(v, generator=g)[:n] for _ in range(rows)])
    last = ref.last
    out[:, 0] = torch.where((last >= 0) & (torch.rand(rows, generator=g) < 0.6), last, out[:, 0])
    if n > 2:
        out[::2, 1] = ref.eos
        out[1::3, 2] = out[1::3, 0]  # the same label twice
    return out


def moves(ref: CTCPrefixScorer, cand: torch.Tensor | None, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's parent (inside its group, several children per parent at times; any row with group=1) and label
    (one of the parent's candidates, never the blank; the parent's last label often, eos rarely)."""
    rows, v, _ = ref.x.shape
    group = ref.group
    if group == 1:
        index = torch.randint(0, rows, (rows,), generator=g)
    else:
        index = torch.randint(0, group, (rows,), generator=g) + torch.arange(rows) // group * group
        index[::2] = torch.arange(0, rows, 2)  # some rows stay
    pool = torch.arange(v).expand(rows, v) if cand is None else cand
    labels = pool[index, torch.randint(0, pool.shape[1], (rows,), generator=g)]
    labels = torch.where(labels == BLANK, 1 + (labels + 1) % (v - 1), labels)  # never the blank
    last = ref.last[index]
    labels = torch.where((last > 0) & (torch.rand(rows, generator=g) < 0.3), last, labels)
    labels[torch.rand(rows, generator=g) < 0.1] = ref.eos
    return index, labels


def simulate(rows: int, t: int, v: int, group: int, lengths: list[int], n: int | None, steps: int, seed: int = 0,
             eos: int | None = None, native: bool = False, rtol: float = 1e-9) -> None:
    """Steps of a search with the PyTorch and the fused (``native``: the C++) scorers side by side: every score and
    state tensor equal (to ``rtol``), the kernels' scorer's tensors (scores buffer included) at the same addresses
    throughout."""
    eos = v - 1 if eos is None else eos
    ref, fused = scorers(rows, t, v, group, lengths, eos, seed, device="cpu" if native else DEVICE, native=native)
    assert_same_state(fused, ref, "start", rtol)
    where = {name: getattr(fused, name).data_ptr() for name in STATE}
    g = torch.Generator().manual_seed(seed + 1)
    psi_at = None
    for step in range(steps):
        # The pre-beam and all labels (λ = 1) in turns.
        cand = candidates(ref, n if step % 2 == 0 else None, g)
        want = ref.scores(cand)
        got = fused.scores(None if cand is None else cand.to(fused.x.device))
        psi_at = psi_at or got.data_ptr()
        assert got.data_ptr() == psi_at
        assert_same(got, want, f"step {step}, psi", rtol)
        index, labels = moves(ref, cand, g)
        ref.advance(index, labels, want)
        fused.advance(index.to(got.device), labels.to(got.device), got)
        assert_same_state(fused, ref, f"step {step}", rtol)
    assert {name: getattr(fused, name).data_ptr() for name in STATE} == where


def test_fused_is_default_only_on_cuda() -> None:
    lp = torch.zeros(2, 3, 4).log_softmax(-1)
    assert not CTCPrefixScorer(lp, torch.tensor([3, 2]), BLANK, 3).fused


def test_groups_with_padded_rows() -> None:
    simulate(rows=6, t=13, v=6, group=3, lengths=[13, 9, 13, 4, 1, 12], n=3, steps=4)


def test_group_of_one_moves_rows_anywhere() -> None:
    """group=1: a row may take any row's hypothesis, and its frames with it (one program for a small batch)."""
    simulate(rows=5, t=11, v=5, group=1, lengths=[11, 7, 11, 2, 10], n=3, steps=4, seed=1)


def test_group_of_one_in_two_launches() -> None:
    """group=1 beyond ONE_PROGRAM rows: the new state is written to scratch, then copied, in a second launch."""
    from mmgen.kernels import ctc_prefix

    rows = ctc_prefix.ONE_PROGRAM + 2
    simulate(rows=rows, t=6, v=5, group=1, lengths=[6 - i % 4 for i in range(rows)], n=2, steps=2, seed=2)


def test_frames_in_several_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tiles too small for the frames: the sums and log-sums are carried from one block of frames to the next."""
    from mmgen.kernels import ctc_prefix

    monkeypatch.setattr(ctc_prefix, "TILE", 32)  # blocks of 16 frames: 37 frames in 3 blocks
    monkeypatch.setattr(ctc_prefix, "ADVANCE_TILE", 32)
    simulate(rows=4, t=37, v=5, group=2, lengths=[37, 20, 16, 33], n=3, steps=3, seed=3)


def test_many_labels_and_candidates() -> None:
    """Several blocks of candidates and of labels: all labels scored by several programs per row, and the labels
    that are not among many candidates filled by the row's first program; eos and blank in the middle."""
    simulate(rows=2, t=5, v=150, group=2, lengths=[5, 3], n=20, steps=2, seed=4, eos=70)


def test_one_frame_and_empty_rows() -> None:
    simulate(rows=4, t=1, v=4, group=2, lengths=[1, 0, 1, 1], n=3, steps=2, seed=5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("rows, group, t, v, n", [(16, 8, 250, 32, 6), (24, 1, 90, 30, 6), (8, 4, 3000, 30, None)])
def test_cuda_graph_replays(rows: int, group: int, t: int, v: int, n: int | None) -> None:
    """scores + advance captured in one CUDA graph and replayed with new inputs (copied into the captured ones)
    equal the PyTorch scorer on the CPU step by step; the large case runs frames in several blocks, and
    (24 rows, group=1) takes two launches."""
    eos = v - 1
    lengths = [t - (i * 7) % (t // 2) for i in range(rows)]
    ref, fused = scorers(rows, t, v, group, lengths, eos, seed=6, device="cuda")
    assert_same_state(fused, ref, "start")
    g = torch.Generator().manual_seed(7)
    cand0 = candidates(ref, n, g)
    index0, labels0 = moves(ref, cand0, g)
    cand = None if cand0 is None else cand0.cuda()
    index, labels = index0.cuda(), labels0.cuda()

    def step() -> torch.Tensor:
        psi = fused.scores(cand)
        fused.advance(index, labels, psi)
        return psi

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # the first step eager (it compiles the kernels), on a side stream
        psi = step()
    torch.cuda.current_stream().wait_stream(side)
    want = ref.scores(cand0)
    assert_same(psi, want, "step 0, psi")
    ref.advance(index0, labels0, want)
    assert_same_state(fused, ref, "step 0")
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        psi = step()
    for s in range(1, 6):
        cand_s = candidates(ref, n, g)
        index_s, labels_s = moves(ref, cand_s, g)
        if cand is not None:
            cand.copy_(cand_s)
        index.copy_(index_s)
        labels.copy_(labels_s)
        graph.replay()
        want = ref.scores(cand_s)
        ref.advance(index_s, labels_s, want)
        torch.cuda.synchronize()
        assert_same(psi, want, f"step {s}, psi")
        assert_same_state(fused, ref, f"step {s}")
