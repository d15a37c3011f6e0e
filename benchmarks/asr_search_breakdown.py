"""Where the time of one attention / joint transcription goes on the GPU, phase by phase (each phase synchronised):
features, encoder, CTC log-probabilities, building the search (step cache and state), eager warm-up steps and graph
capture, replays, reading the results back, CTC rescoring.

    python benchmarks/asr_search_breakdown.py --out benchmarks/results/asr_search_breakdown_h100.json

The model is ``asr_rtf.py``'s (Conformer-S-size encoder, 4-layer decoder, random weights) on random audio, with the
decoder held to 15 characters per second, as there.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from asr_rtf import ours  # noqa: E402

from mmgen.beam_search import BeamSearch  # noqa: E402


class Clock:
    def __init__(self) -> None:
        self.times: dict[str, float] = {}
        self.last = 0.0

    def start(self) -> None:
        torch.cuda.synchronize()
        self.last = time.perf_counter()

    def lap(self, name: str) -> None:
        torch.cuda.synchronize()
        now = time.perf_counter()
        self.times[name] = self.times.get(name, 0.0) + (now - self.last) * 1e3
        self.last = now


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--encoder", choices=("graph", "eager"), default="graph",
                   help="the encoder as recognize() runs it on a GPU (CUDA graph replays) or eagerly")
    a = p.parse_args()
    model = ours("cuda")
    clock = Clock()
    original_run, original_step, original_results = BeamSearch.run, BeamSearch.step, BeamSearch._results
    steps = {"n": 0}

    def step(self, length):  # the eager steps (warm-up) and the one recorded in the graph
        steps["n"] += 1
        return original_step(self, length)

    graph_class = torch.cuda.CUDAGraph

    def new_graph(*args, **kwargs):  # made after the warm-up steps, before the capture
        clock.lap("eager warm-up steps")
        return graph_class(*args, **kwargs)

    torch.cuda.CUDAGraph = new_graph

    def run(self, *args, **kwargs):
        clock.lap("build search")
        return original_run(self, *args, **kwargs)

    def results(self, n):
        clock.lap("capture and replays")
        out = original_results(self, n)
        clock.lap("results to the host")
        return out

    BeamSearch.run, BeamSearch.step, BeamSearch._results = run, step, results
    rows = []
    with torch.inference_mode():
        for seconds, batch in ((10.0, 1), (10.0, 8), (1.0, 1)):
            wave = torch.randn(batch, int(seconds * 16000), device="cuda") * 0.1
            model.hparams.max_target_length = round(15 * seconds)
            for decoding in ("attention", "joint"):
                for r in range(a.repeats + 1):
                    if r == 1:
                        clock.times = {}
                    steps["n"] = 0
                    clock.start()
                    feats = model.source.encode_batch(list(wave))
                    values, mask = feats.values.cuda(), feats.mask.cuda()
                    clock.lap("features")
                    if a.encoder == "graph":
                        memory, mmask, lp = model._encode_for_decoding(values, mask)
                        clock.lap("encoder and ctc log-probs (graph replay)")
                    else:
                        memory, mmask = model.net.encode(values, mask)
                        clock.lap("encoder")
                        lp = model.net.ctc_head(memory).float().log_softmax(-1)
                        clock.lap("ctc log-probs")
                    nbest = model._nbest(memory, mmask, lp, model.hparams.beam_size, decoding == "joint")
                    if decoding == "attention":
                        model._ctc_rescore(nbest, lp, mmask.sum(dim=1))
                        clock.lap("ctc rescoring")
                row = {"seconds": seconds, "batch": batch, "decoding": decoding,
                       **{f"{k}_ms": round(v / a.repeats, 3) for k, v in clock.times.items()},
                       "total_ms": round(sum(clock.times.values()) / a.repeats, 3)}
                print(json.dumps(row), flush=True)
                rows.append(row)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps({"benchmark": "asr_search_breakdown", "device": torch.cuda.get_device_name(),
                                       "torch": torch.__version__, "encoder": a.encoder,
                                       "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
