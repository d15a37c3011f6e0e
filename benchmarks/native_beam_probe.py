"""The non-decoder work of a joint CTC/attention beam search step on the CPU: the C++ kernels
(``mmgen.kernels.native_beam``, ``native=True``) against the PyTorch code (``native=False``).

    python benchmarks/native_beam_probe.py --out benchmarks/results/native_beam_probe_cpu.json [--threads 1]

At batch 1 and 8, beam 4, a vocabulary of 31, 250 CTC frames (rows of different lengths), pre-beam 6, no lexicon:
one step's joint scores (log_softmax, pre-beam, CTC prefix scores, weights), selection (the search's bookkeeping)
and CTC advance, from the logits of a fixed random decoder (the decoder itself is not timed). Each round restores the
state of a search 20 steps in and times ``--steps`` consecutive steps; each time is per step, the fastest and the
median of the rounds (this shared CPU's timings move between rounds), with the median of each part; and the aten
operators one such step dispatches in PyTorch (``pytorch_operators_per_step``).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from mmgen.beam_search import BeamSearch
from mmgen.ctc import CTCPrefixScorer

V, T, BEAM, PRE_BEAM, BOS, EOS, BLANK, WARM = 31, 250, 4, 6, 1, 2, 0, 20
SEARCH_STATE = ("scores", "node", "label", "position", "count", "fin_scores", "fin_length", "fin_row", "settled",
                "done", "history_label", "history_parent")
CTC_STATE = ("x", "r_blank", "r_any", "start", "last", "prefix")


def make(b: int, native: bool, steps: int) -> tuple[BeamSearch, torch.Tensor]:
    """A joint search of ``b`` utterances after WARM steps, and the logits its decoder returns."""
    g = torch.Generator().manual_seed(0)
    rows = b * BEAM
    log_probs = (torch.randn(b, T, V, generator=g) * 3).log_softmax(-1).repeat_interleave(BEAM, dim=0)
    lengths = torch.tensor([T - 20 * i for i in range(b)]).repeat_interleave(BEAM)
    logits = torch.randn(rows, V, generator=g) * 2
    logits[:, EOS] -= 6.0  # the search goes on
    ctc = CTCPrefixScorer(log_probs, lengths, BLANK, EOS, group=BEAM, fused=False, native=native)
    search = BeamSearch(lambda tokens, position, length: logits, lambda index, length: None, batch=b, beam=BEAM,
                        vocab=V, bos=BOS, eos=EOS, banned=[BLANK, BOS], max_len=WARM + steps,
                        device=torch.device("cpu"), ctc=ctc, ctc_weight=0.3, pre_beam=PRE_BEAM, fused=False,
                        native=native)
    for _ in range(WARM):
        search.step(None)
    return search, logits


def step_parts(search: BeamSearch, logits: torch.Tensor) -> tuple[float, float, float]:
    """One step without the decoder, as ``BeamSearch.step`` runs it; seconds of each part."""
    t0 = time.perf_counter()
    scores, psi = search._scores(logits) if search._joint is None else search._joint(logits)
    t1 = time.perf_counter()
    if search._select is None:
        index, keep_label = search._bookkeeping(scores)
    else:
        index, keep_label = search._select(scores, normalise=False)
    t2 = time.perf_counter()
    search.ctc.advance(index, keep_label, psi)
    t3 = time.perf_counter()
    return t1 - t0, t2 - t1, t3 - t2


class CountOps(TorchDispatchMode):
    """Counts the aten operators dispatched inside it."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


def operators_per_step(search: BeamSearch, logits: torch.Tensor) -> int:
    """The aten operators one step without the decoder dispatches (on the search's current state, which it moves)."""
    with CountOps() as counter:
        step_parts(search, logits)
    return counter.count


def timed(search: BeamSearch, logits: torch.Tensor, rounds: int, steps: int) -> dict:
    saved = {name: getattr(search, name).clone() for name in SEARCH_STATE}
    saved_ctc = {name: getattr(search.ctc, name).clone() for name in CTC_STATE}
    per_step, parts = [], []
    for _ in range(rounds + 1):  # the first round warms up
        for name, value in saved.items():
            getattr(search, name).copy_(value)
        for name, value in saved_ctc.items():
            getattr(search.ctc, name).copy_(value)
        times = [step_parts(search, logits) for _ in range(steps)]
        per_step.append(sum(map(sum, times)) / steps * 1e6)
        parts.append([sum(t[i] for t in times) / steps * 1e6 for i in range(3)])
    per_step, parts = per_step[1:], parts[1:]
    us = lambda x: round(x, 1)  # noqa: E731
    return {"min_us": us(min(per_step)), "median_us": us(statistics.median(per_step)),
            **{f"{name}_median_us": us(statistics.median(p[i] for p in parts))
               for i, name in enumerate(("joint_scores", "select", "ctc_advance"))}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--steps", type=int, default=10, help="consecutive steps timed per round")
    p.add_argument("--threads", type=int, default=None, help="torch's intra-op threads (default: torch's)")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    out: dict = {"benchmark": "native_beam_probe", "host": platform.node(), "torch": torch.__version__,
                 "threads": torch.get_num_threads(), "vocab": V, "frames": T, "beam": BEAM, "pre_beam": PRE_BEAM,
                 "ctc_weight": 0.3, "lexicon": False, "rounds": a.rounds, "steps_per_round": a.steps, "batches": []}
    with torch.inference_mode():
        for b in (1, 8):
            native, logits = make(b, True, a.steps)
            reference, _ = make(b, False, a.steps)
            # Both ran the same steps: the same state (the kernels' results are the reference's).
            torch.testing.assert_close(native.scores, reference.scores, rtol=1e-12, atol=1e-12)
            assert torch.equal(native.history_label, reference.history_label)
            row = {"batch": b, "rows": b * BEAM, "native": timed(native, logits, a.rounds, a.steps),
                   "pytorch": timed(reference, logits, a.rounds, a.steps)}
            row["speedup_median"] = round(row["pytorch"]["median_us"] / row["native"]["median_us"], 1)
            row["pytorch_operators_per_step"] = operators_per_step(*make(b, False, 1))
            out["batches"].append(row)
            print(json.dumps(row), flush=True)
    with open(a.out, "w") as f:
        json.dump(out, f, indent=2)
        f.write("\n")


if __name__ == "__main__":
    main()
