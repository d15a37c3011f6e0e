"""Where a batch-1 decoding step goes on the CPU: the numbers behind the CPU notes in docs/benchmarks.md.

    python benchmarks/asr_cpu_step_probe.py --out benchmarks/results/asr_cpu_step_probe.json [--compile]

``asr_rtf.py``'s model (Conformer-S-size encoder, 4-layer decoder, random weights) on one 10 s clip, beam 4 (4 rows):
the decoder step (``SpeechRecognizer.net.decode_step`` over a 150-position cache, 71 positions filled), its 24 matrix
products alone (the step's weights and shapes), a whole 150-step attention search with the beam reorder as it is
(gathering the filled positions into a reused buffer) and as it was before session 7 (a fresh copy of the whole cache
per step), and with ``--compile`` the step under ``torch.compile`` (inductor's C++ backend; fixed shapes). Each time is
the fastest and the median of several rounds: this shared CPU's timings move between rounds. Since session 8 it also
times the C++ kernels (``mmgen.kernels.native``): the decoder step, and whole attention and joint searches against
the same searches with the PyTorch steps.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from asr_rtf import ours  # noqa: E402

from mmgen.blocks import StepCache  # noqa: E402


def timed(fn, rounds: int = 20, calls: int = 50) -> dict[str, float]:
    fn()
    per_call = []
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        per_call.append((time.perf_counter() - start) / calls * 1e3)
    return {"min_ms": round(min(per_call), 4), "median_ms": round(statistics.median(per_call), 4)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--compile", action="store_true", help="also time the step under torch.compile (tens of seconds)")
    a = p.parse_args()
    model = ours("cpu")
    net = model.net
    out: dict = {"benchmark": "asr_cpu_step_probe", "host": platform.node(), "torch": torch.__version__,
                 "threads": torch.get_num_threads()}
    with torch.inference_mode():
        feats = model.source.collate([model.source.features(torch.randn(160000) * 0.1)])
        memory, mask = net.encode(feats.values, feats.mask)
        cache = net.step_cache(4, 150, memory, mask, fused=False, native=False)
        ids, position = torch.zeros(4, dtype=torch.long), torch.tensor([70])
        out["decoder_step"] = timed(lambda: net.decode_step(ids, position, cache, 71))
        native = net.step_cache(4, 150, memory, mask, native=True)  # the C++ step (builds the kernels once)
        out["decoder_step_native"] = timed(lambda: net.decode_step(ids, position, native, 71))
        linears = [(lin, lin.weight.shape[1]) for layer in cache.linears for lin in layer.values()]
        inputs = {k: torch.randn(4, k) for _, k in linears}
        out["matmuls"] = len(linears)
        out["decoder_step_matmuls_only"] = timed(lambda: [lin(inputs[k]) for lin, k in linears])
        log_probs = net.ctc_head(memory).float().log_softmax(dim=-1)
        model.hparams.max_target_length = 150

        def search(joint: bool = False) -> None:
            model._nbest(memory, mask, log_probs, 4, joint=joint)

        for joint in (False, True):  # whole searches: the C++ kernels (the default), then the PyTorch steps
            name = "joint" if joint else "attention"
            out[f"search_150_steps_{name}_native"] = timed(lambda: search(joint), rounds=9, calls=1)
            model.fused_decoding = False
            out[f"search_150_steps_{name}_pytorch"] = timed(lambda: search(joint), rounds=9, calls=1)
            model.fused_decoding = True
        model.fused_decoding = False  # the reorder A/B below is of the PyTorch steps
        out["search_150_steps_reorder_reused_buffer"] = timed(search, rounds=9, calls=1)
        reorder = StepCache.reorder

        def fresh_copy(self: StepCache, index: torch.Tensor, length: int | None = None) -> None:
            self.kv = self.kv.index_select(2, index)  # the reorder before session 7 (eager steps)

        StepCache.reorder = fresh_copy
        try:
            out["search_150_steps_reorder_fresh_copy"] = timed(search, rounds=9, calls=1)
        finally:
            StepCache.reorder = reorder
        if a.compile:
            step = torch.compile(net.decode_step, dynamic=False)
            start = time.perf_counter()
            step(ids, position, cache, None)
            out["compile_s"] = round(time.perf_counter() - start, 1)
            out["decoder_step_compiled_fixed_shapes"] = timed(lambda: step(ids, position, cache, None))
            out["decoder_step_eager_fixed_shapes"] = timed(lambda: net.decode_step(ids, position, cache, None))
    print(json.dumps(out, indent=2))
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
